"""`sevmigd oca ...` and `sevmigd platform pek-csr|pek-import|own|reset|status`: platform ownership.

The SEV API lets one organisation own a fleet of platforms: each platform's PEK is signed by that
organisation's OCA (Owner Certificate Authority) instead of the platform's own self-signed OCA. Guests
with the DOMAIN policy bit may then migrate between exactly the platforms of that fleet (SEND_START
requires the target's OCA certificate to be byte-identical to the source's).

The flow, as sev-tool / sevctl do it on hardware:

    sevmigd oca init OCA_DIR                                  (once, by the fleet owner)
    sevmigd platform pek-csr --state-dir S --out pek.csr      (PEK_CSR, on each platform)
    sevmigd oca sign-pek --oca OCA_DIR pek.csr --out pek.cert (the owner signs, off the platform)
    sevmigd platform pek-import --state-dir S --pek pek.cert --oca-cert OCA_DIR/oca.cert
                                                              (PEK_CERT_IMPORT, on the platform)
    sevmigd platform own --state-dir S --oca OCA_DIR          (the three steps above in one go)
    sevmigd platform reset --state-dir S                      (PLATFORM_RESET: self-owned again)

The platform verbs run the firmware command on the stored identity (platform INIT, as the PSP is on
a host with no running guest — PEK_CERT_IMPORT requires INIT) and store the result atomically. A
running daemon reads its identity at start: restart it to serve with the new one.

Must never: print or store the OCA private key anywhere but OCA_DIR (0600); let a firmware refusal
through as a traceback (exit 1 with the SEV status named).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sevmigd import store
from sevmigd.errors import ConfigError
from sevmigd.psp.certs import SEV_CERT_SIZE, SevCert
from sevmigd.psp.firmware import Firmware
from sevmigd.psp.identity import FleetOwner
from sevmigd.psp.status import SevError


def register(sub) -> None:
    oca = sub.add_parser("oca", help="a fleet owner's OCA: sign every platform's PEK (platform ownership)")
    oca.set_defaults(func=_help(oca))
    oca_sub = oca.add_subparsers(dest="oca_command", metavar="ACTION")
    p = oca_sub.add_parser("init", help="create an OCA (P-384, self-signed) in DIR; refuses to overwrite one")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_oca_init)
    p = oca_sub.add_parser("sign-pek", help="sign a platform's PEK CSR (from `platform pek-csr`) with the OCA")
    p.add_argument("csr", metavar="CSR", help="the PEK_CSR output (0x824 bytes)")
    p.add_argument("--oca", required=True, metavar="DIR", help="OCA directory (from `sevmigd oca init`)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the signed PEK certificate")
    p.set_defaults(func=cmd_oca_sign_pek)


def register_platform(plat_sub) -> None:
    """The ownership verbs of the `platform` group (the group itself lives in cli/certs.py)."""
    p = plat_sub.add_parser("pek-csr", help="PEK_CSR: write this platform's PEK signing request")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=cmd_platform_pek_csr)
    p = plat_sub.add_parser("pek-import", help="PEK_CERT_IMPORT: take ownership by the OCA that signed the PEK")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--pek", required=True, metavar="FILE", help="the signed PEK (from `oca sign-pek`)")
    p.add_argument("--oca-cert", required=True, metavar="FILE", help="the owner's oca.cert")
    p.set_defaults(func=cmd_platform_pek_import)
    p = plat_sub.add_parser("own", help="PEK_CSR + sign + PEK_CERT_IMPORT in one step (owner has local access)")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--oca", required=True, metavar="DIR", help="OCA directory (from `sevmigd oca init`)")
    p.set_defaults(func=cmd_platform_own)
    p = plat_sub.add_parser("reset", help="PLATFORM_RESET: new OCA, PEK, PDH, self-owned; the CEK is kept")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.set_defaults(func=cmd_platform_reset)
    p = plat_sub.add_parser("status", help="PLATFORM_STATUS and GET_ID of the stored platform")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_platform_status)


def _help(parser):
    """A group called without an action: its help on stderr, exit 2."""
    def show(args) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


def read_input(path: str | Path, what: str, limit: int = 1 << 20) -> bytes:
    """A user-named input file, at most `limit` bytes; ConfigError naming `what` otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(what, f"{path}: missing") from None
    except OSError as exc:
        raise ConfigError(what, f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError(what, f"{path}: larger than {limit} bytes")
    return data


def _read_cert(path: str, what: str) -> bytes:
    data = read_input(path, what, SEV_CERT_SIZE)
    if len(data) != SEV_CERT_SIZE:
        raise ConfigError(what, f"{path}: {len(data)} bytes; an SEV certificate is {SEV_CERT_SIZE} (0x824)")
    return data


def _write_public(path: str, data: bytes) -> None:
    store.write_atomic(path, data, mode=store.PUBLIC_FILE_MODE)


def _firmware(state_dir: str) -> Firmware:
    """The stored platform's PSP after INIT (no guest: the state PEK_CERT_IMPORT needs)."""
    fw = Firmware(store.load_platform(state_dir), rng=os.urandom)
    fw.init()
    return fw


def _refused(command: str, exc: SevError) -> int:
    print(f"sevmigd: {command} refused by the firmware: {exc}", file=sys.stderr)
    return 1


def cmd_oca_init(args) -> int:
    owner = FleetOwner.create(os.urandom)
    store.save_owner(args.dir, owner)
    print(f"OCA created in {args.dir}: oca.cert (give it to platforms), oca.key (keep it secret)")
    return 0


def cmd_oca_sign_pek(args) -> int:
    owner = store.load_owner(args.oca)
    try:
        csr = SevCert.decode(_read_cert(args.csr, "CSR"))
        signed = owner.sign_pek(csr)
    except SevError as exc:
        raise ConfigError("CSR", f"{args.csr}: {exc}") from None
    _write_public(args.out, signed.encode())
    print(f"signed PEK written to {args.out}")
    return 0


def cmd_platform_pek_csr(args) -> int:
    fw = _firmware(args.state_dir)
    _write_public(args.out, fw.pek_csr())
    print(f"PEK_CSR of platform {fw.identity.platform_id[:16]} written to {args.out}")
    return 0


def _import(state_dir: str, fw: Firmware, pek: bytes, oca: bytes) -> int:
    try:
        fw.pek_cert_import(pek, oca)
    except SevError as exc:
        return _refused("PEK_CERT_IMPORT", exc)
    store.save_platform(state_dir, fw.identity)
    print(f"PEK_CERT_IMPORT: platform {fw.identity.platform_id[:16]} is owned by the OCA "
          f"{fw.identity.oca.describe()['qx'][:16]}... (new PDH; restart its daemon to use it)")
    return 0


def cmd_platform_pek_import(args) -> int:
    pek, oca = _read_cert(args.pek, "--pek"), _read_cert(args.oca_cert, "--oca-cert")
    return _import(args.state_dir, _firmware(args.state_dir), pek, oca)


def cmd_platform_own(args) -> int:
    owner = store.load_owner(args.oca)
    fw = _firmware(args.state_dir)
    signed = owner.sign_pek(SevCert.decode(fw.pek_csr()))
    return _import(args.state_dir, fw, signed.encode(), owner.oca.encode())


def cmd_platform_reset(args) -> int:
    identity = store.load_platform(args.state_dir)
    fw = Firmware(identity, rng=os.urandom)          # UNINIT: the only state PLATFORM_RESET accepts
    fw.platform_reset()
    store.save_platform(args.state_dir, fw.identity)
    print(f"PLATFORM_RESET: platform {identity.platform_id[:16]} is now {fw.identity.platform_id[:16]}, "
          "self-owned (new OCA, PEK, PDH; the CEK and GET_ID are unchanged)")
    return 0


def cmd_platform_status(args) -> int:
    fw = _firmware(args.state_dir)
    st = fw.platform_status()
    out = {
        "api_version": f"{st.api_major}.{st.api_minor}", "build": st.build, "state": st.state.name,
        "owner": "external" if st.externally_owned else "self", "es": st.es, "guest_count": st.guest_count,
        "get_id": fw.get_id().hex(), "platform_id": fw.identity.platform_id,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for key, value in out.items():
        print(f"{key:12} {value}")
    return 0
