"""`sevmigd owner ...`: the guest owner's (tenant's) tool, as virtee's sevctl is on hardware; and the
host-side `ctl launch-finish` / `ctl guest-secret` verbs that carry its answers to a daemon.

The owner never talks to the daemon; files travel between owner and host:

    host:  sevmigd certs export --state-dir S chain/               → the platform's chain
    owner: sevmigd owner verify chain/ --ark ark.cert               (sevctl verify)
    owner: sevmigd owner session --chain chain/ --ark ark.cert --policy 0x5 --out sess/   (sevctl session)
    host:  sevmigd ctl launch g --memory 64M --owner-session sess/ --json > launch.json
           (LAUNCH_START with the owner's GODH + session; the guest stops measured, state "launching")
    owner: sevmigd owner measure --session sess/ --launch launch.json        (sevctl measurement)
    owner: sevmigd owner secret --session sess/ --launch launch.json \\
               --secret 736869e5-84f0-4973-92ec-06879ce3da0b:disk.key --out secret.bin  (sevctl secret build)
    host:  sevmigd ctl launch-finish g --secret-packet secret.bin   (LAUNCH_SECRET, LAUNCH_FINISH, boot)
    guest: sevmigd ctl guest-secret g   (the guest agent reading its secret table)

The host only ever sees godh.cert, session.bin and policy (public) and the sealed packet; tek.bin and
tik.bin stay with the owner (0600). `owner measure`/`owner secret` compare against the digest the owner
computes from the image it expects (`--image`, default: the standard emulated image) with the owner's
own policy; a host that launched another policy, another image, or without the owner's session
cannot produce a measurement that passes (exit 1), and then no secret is wrapped.

Must never: print TEK/TIK; wrap a secret for a measurement that does not check out; trust a PDH whose
chain was not verified.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from sevmigd import store
from sevmigd.errors import ConfigError
from sevmigd.owner.launch import (
    SESSION_PUBLIC,
    SESSION_SECRET,
    LaunchSession,
    Measurement,
    OwnerError,
    expected_digest,
    measurement_ok,
    parse_policy,
    verify_chain,
    wrap_secret,
)
from sevmigd.cli.ownership import _help, read_input
from sevmigd.psp.chain import ChainError


def register(sub) -> None:
    own = sub.add_parser("owner", help="the guest owner's tool: verify a platform, launch session, "
                                       "measurement check, launch secret (as sevctl)")
    own.set_defaults(func=_help(own))
    osub = own.add_subparsers(dest="owner_command", metavar="ACTION")

    p = osub.add_parser("verify", help="verify a platform's certificate chain (ark ask cek oca pek pdh.cert in DIR)")
    p.add_argument("chain", metavar="DIR")
    p.add_argument("--ark", metavar="FILE", help="the root you trust: the chain's ARK must be this one")
    p.set_defaults(func=cmd_verify)

    p = osub.add_parser("session", help="GODH key + launch session for a policy, bound to a verified platform")
    p.add_argument("--chain", required=True, metavar="DIR", help="the platform's chain (from `certs export`)")
    p.add_argument("--ark", metavar="FILE", help="trusted root the chain must lead to (strongly advised)")
    p.add_argument("--policy", required=True, metavar="HEX", help="the guest policy the owner binds, e.g. 0x1")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new directory: godh.cert session.bin policy (give to the host), tek.bin tik.bin (keep)")
    p.set_defaults(func=cmd_session)

    for name, hlp in (("measure", "check the host's LAUNCH_MEASURE against the expected launch digest"),
                      ("secret", "check the measurement, then seal a secret table for LAUNCH_SECRET")):
        p = osub.add_parser(name, help=hlp)
        p.add_argument("--session", required=True, metavar="DIR", help="the session directory (`owner session`)")
        p.add_argument("--launch", required=True, metavar="FILE",
                       help="the host's `ctl launch --json` (or `ctl status --json`) output")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--image", metavar="FILE", help="the image the guest must have been launched from "
                                                       "(default: the standard emulated image)")
        g.add_argument("--digest", metavar="HEX", help="the expected launch digest (SHA-256) instead")
        p.add_argument("--vcpus", type=int, default=None, metavar="N",
                       help="SEV-ES: vCPUs whose VMSAs are measured (default: as the launch reports)")
        if name == "secret":
            p.add_argument("--secret", action="append", required=True, metavar="GUID:FILE",
                           help="one secret table entry (repeatable), as sevctl secret build")
            p.add_argument("--out", required=True, metavar="FILE", help="the packet for `ctl launch-finish`")
            p.set_defaults(func=cmd_secret)
        else:
            p.set_defaults(func=cmd_measure)


def register_ctl(verbs) -> None:
    """Host-side verbs of `sevmigd ctl` for an owner-bound launch."""
    v = verbs.add_parser("launch-finish", help="finish an owner-bound launch: LAUNCH_SECRET (optional), "
                                               "LAUNCH_FINISH, boot")
    v.add_argument("name")
    v.add_argument("--secret-packet", metavar="FILE", help="the owner's packet from `sevmigd owner secret`")
    v.add_argument("--json", action="store_true")
    v.set_defaults(ctl=_ctl_launch_finish)
    v = verbs.add_parser("guest-secret", help="the guest reads its launch secret table (in-guest agent)")
    v.add_argument("name")
    v.add_argument("--json", action="store_true")
    v.set_defaults(ctl=_ctl_guest_secret)


_read = read_input


def _owner_error(exc: OwnerError) -> ConfigError:
    return ConfigError(exc.what, exc.message)


def _chain_files(directory: str) -> dict[str, bytes]:
    return {n: _read(Path(directory) / n, "chain") for n in
            ("ark.cert", "ask.cert", "cek.cert", "oca.cert", "pek.cert", "pdh.cert")}


def _verify(directory: str, ark: str | None) -> bool:
    """Print the link-by-link result; True when the chain verifies."""
    try:
        report = verify_chain(_chain_files(directory), None if ark is None else _read(ark, "--ark"))
    except OwnerError as exc:
        raise _owner_error(exc) from None
    except ChainError as exc:
        print(f"FAIL  {exc.link}: {exc.status.name} (0x{int(exc.status):02x})")
        print(f"sevmigd owner: the platform chain in {directory} does not verify ({exc.link})", file=sys.stderr)
        return False
    for link, _status in report.links:
        print(f"ok    {link}")
    if not report.ark_pinned:
        print("warning: the ARK is self-signed but not pinned; pass --ark FILE with a root you trust",
              file=sys.stderr)
    return True


def cmd_verify(args) -> int:
    return 0 if _verify(args.chain, args.ark) else 1


def cmd_session(args) -> int:
    try:
        policy = parse_policy(args.policy)
    except OwnerError as exc:
        raise _owner_error(exc) from None
    if not _verify(args.chain, args.ark):
        return 1
    out = Path(args.out)
    if out.exists():
        raise ConfigError("--out", f"{out} exists; a session directory is made fresh for every launch")
    try:
        session = LaunchSession.create(_read(Path(args.chain) / "pdh.cert", "chain"), policy, os.urandom)
    except OwnerError as exc:
        raise _owner_error(exc) from None
    os.makedirs(out, mode=0o700)
    for name, data in session.to_files().items():
        store.write_atomic(out / name, data, mode=0o600 if name in SESSION_SECRET else store.PUBLIC_FILE_MODE)
    print(f"launch session for policy {policy:#x} in {out}: give the host "
          f"{', '.join(SESSION_PUBLIC)}; keep {', '.join(SESSION_SECRET)}")
    return 0


def _load_session(directory: str) -> LaunchSession:
    d = Path(directory)
    files = {n: _read(d / n, "--session", 4096) for n in SESSION_PUBLIC + SESSION_SECRET}
    try:
        return LaunchSession.from_files(files)
    except OwnerError as exc:
        raise ConfigError(f"--session {exc.what}", exc.message) from None


def _launch_report(path: str) -> tuple[Measurement, int]:
    """(Measurement, vCPUs) from the host's `ctl launch/status --json` output."""
    try:
        st = json.loads(_read(path, "--launch"))
        lm = st["launch_measure"]
        m = Measurement(bytes.fromhex(lm["measure"]), bytes.fromhex(lm["mnonce"]), int(lm["api_major"]),
                        int(lm["api_minor"]), int(lm["build"]))
        vcpus = int(st.get("vcpus") or 1)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("--launch", f"{path}: not a launch report with a launch_measure "
                                      f"(ctl launch --json): {exc}") from None
    except OwnerError as exc:
        raise ConfigError("--launch", f"{path}: {exc}") from None
    return m, vcpus


def _digest(args, session: LaunchSession, vcpus: int) -> bytes:
    if args.digest is not None:
        try:
            d = bytes.fromhex(args.digest)
        except ValueError:
            d = b""
        if len(d) != 32:
            raise ConfigError("--digest", "a SHA-256 launch digest is 64 hex digits")
        return d
    if args.image is not None:
        image = _read(args.image, "--image", 1 << 30)
    else:
        from sevmigd.guest.vm import default_image
        image = default_image()
    return expected_digest(image, policy=session.policy, vcpus=args.vcpus or vcpus)


def cmd_measure(args) -> int:
    session = _load_session(args.session)
    m, vcpus = _launch_report(args.launch)
    if measurement_ok(session, m, _digest(args, session, vcpus)):
        print(f"measurement OK: launched with policy {session.policy:#x} and the expected image "
              f"(API {m.api_major}.{m.api_minor} build {m.build})")
        return 0
    print("sevmigd owner: measurement MISMATCH: the host did not launch this session's policy and image "
          "(or reported other firmware values); release no secret", file=sys.stderr)
    return 1


def _secret_entries(specs: list[str]) -> list[tuple[uuid.UUID, bytes]]:
    out = []
    for spec in specs:
        guid, sep, path = spec.partition(":")
        try:
            g = uuid.UUID(guid)
        except ValueError:
            g = None
        if not sep or g is None or not path:
            raise ConfigError("--secret", f"{spec!r}: expected GUID:FILE")
        out.append((g, _read(path, "--secret", 4096)))
    return out


def cmd_secret(args) -> int:
    from sevmigd.guest.secret import SecretTableError, build_table

    session = _load_session(args.session)
    m, vcpus = _launch_report(args.launch)
    digest = _digest(args, session, vcpus)
    try:
        table = build_table(_secret_entries(args.secret))
    except SecretTableError as exc:
        raise ConfigError("--secret", str(exc)) from None
    if not measurement_ok(session, m, digest):
        print("sevmigd owner: measurement MISMATCH: no secret wrapped for this launch", file=sys.stderr)
        return 1
    try:
        packet = wrap_secret(session, m, digest, table, os.urandom)
    except OwnerError as exc:
        raise _owner_error(exc) from None
    store.write_atomic(args.out, packet, mode=store.PUBLIC_FILE_MODE)
    print(f"launch secret packet ({len(table)} bytes of secret table, {len(args.secret)} entr"
          f"{'y' if len(args.secret) == 1 else 'ies'}) written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------- ctl side


def launch_request(directory: str, *, policy_given: bool, policy: int) -> dict:
    """The `launch` request fields of an owner-bound launch, from the owner's session directory."""
    d = Path(directory)
    godh = _read(d / "godh.cert", "--owner-session", 4096)
    session = _read(d / "session.bin", "--owner-session", 4096)
    owner_policy_text = _read(d / "policy", "--owner-session", 64).decode("ascii", "replace").strip()
    try:
        owner_policy = parse_policy(owner_policy_text, "--owner-session policy")
    except OwnerError as exc:
        raise _owner_error(exc) from None
    if policy_given and policy != owner_policy:
        raise ConfigError("--policy", f"{policy:#x} differs from the owner's policy {owner_policy:#x} in "
                                      f"{d / 'policy'}; an owner-bound launch uses the owner's")
    return {"policy": owner_policy, "owner_godh": godh.hex(), "owner_session": session.hex()}


def _ctl_launch_finish(client, args) -> int:
    req: dict = {"name": args.name}
    if args.secret_packet is not None:
        req["secret_packet_hex"] = _read(args.secret_packet, "--secret-packet", 8192).hex()
    st = client.execute("launch-finish", req)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(f"{st['name']}: launch finished{' with the owner secret' if args.secret_packet else ''}, "
              f"state {st.get('state')}, sev_state {st.get('sev_state')}")
    return 0


def _ctl_guest_secret(client, args) -> int:
    r = client.execute("guest-secret", {"name": args.name})
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if r.get("entries") is None:
        print(f"{args.name}: no launch secret")
        return 1
    for e in r["entries"]:
        print(f"{e['guid']}  {e['data_hex']}")
    return 0
