"""`sevmigd ca|platform|certs`: fleet CA, platform identity and certificate-chain verbs.

Owns the command-line surface over `sevmigd.store` (files) and `sevmigd.psp.chain` (trust): create a
fleet CA, create/rotate/show a platform identity, export a chain under sevctl's file names, verify a
chain link by link, decode one certificate.

Must never: print private keys, or print a traceback for bad input. Exit statuses: 0 success, 1 the
operation failed (e.g. a chain link does not verify; the message names the link and the SEV status),
2 unusable input (missing file, wrong size, undecodable certificate, bad arguments).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sevmigd import store
from sevmigd.cli import ownership
from sevmigd.cli.ownership import _help
from sevmigd.errors import ConfigError
from sevmigd.psp.certs import SEV_CERT_SIZE, AmdCert, SevCert, decode_any
from sevmigd.psp.chain import ChainError, ark_key_hash, verify_platform_chain
from sevmigd.psp.identity import DEFAULT_API_MAJOR, DEFAULT_API_MINOR, FleetCA, PlatformIdentity
from sevmigd.psp.status import SevError

# AMD's published root keys (ARK key id → (generation, SHA-384 key hash)), computed from the ARK
# certificates AMD publishes (tests/data/sev-vectors/builtin). Used only to *name* a root in output;
# trust still comes from --ark / the trusted roots.
KNOWN_AMD_ROOTS = {
    "1bb987c359494606b174945601c9ea5b": ("AMD Naples", "bf66a6df42f452d936a91a48943512517147b7d487e9c5b9ad8e53768c93d507e24a5724871ba783b4b5d714d192537f"),
    "e6002122fb58419399d15fee7b131351": ("AMD Rome", "3d2c1157c29ef7bd4207fc0c8b08db080e579ceba267f8c93bec8dce73f5a5e2e60d959ac37ea82176c1a0c61ae203ed"),
    "94c38e4177d0479292a7ae671d083fb6": ("AMD Milan", "569da618dfe64015c343db6d975e77b72fdeacd16edd02d9d09b889b8f0f1d91ffa5dfbd86f7ac574a1a7883b7a1e737"),
    "9f9d4a8fe761456599f6946c4c010f3a": ("AMD Genoa", "b66e16ff0ebeed57f0c4dffa154872c4156f2e5b1c2f4e66e58fc37f1d2a60d31a342ecb6430a9b2510a970c75c37926"),
    "d05c3a8bde484904b49552422ceb3942": ("AMD Turin", "712a28007da1097e8c4fd3a2e8655012b27e04042323a0a30e111fc0cf698961040c6fc3ff2053abe70432cfef411a0e"),
}

CHAIN_NAMES = ("ark", "ask", "cek", "oca", "pek", "pdh")


def register(sub) -> None:
    # -- ca -----------------------------------------------------------------------------------
    ca = sub.add_parser("ca", help="emulated AMD root/signing keys (ARK + ASK) for a test fleet")
    ca.set_defaults(func=_help(ca))
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION")
    p = ca_sub.add_parser("init", help="create a fleet CA in DIR (refuses to overwrite one)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--rsa-bits", type=int, choices=(4096, 2048), default=4096,
                   help="ARK/ASK key size: 4096 (Rome and later, SHA-384) or 2048 (Naples, SHA-256)")
    p.set_defaults(func=cmd_ca_init)

    # -- platform -----------------------------------------------------------------------------
    plat = sub.add_parser("platform", help="this host's emulated PSP identity (CEK, OCA, PEK, PDH)")
    plat.set_defaults(func=_help(plat))
    plat_sub = plat.add_subparsers(dest="platform_command", metavar="ACTION")
    p = plat_sub.add_parser("init", help="create a platform identity signed by a fleet CA")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--ca", required=True, metavar="DIR", help="fleet CA directory (from `sevmigd ca init`)")
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p.add_argument("--api-major", type=int, default=DEFAULT_API_MAJOR, help="firmware API major in the certs")
    p.add_argument("--api-minor", type=int, default=DEFAULT_API_MINOR, help="firmware API minor in the certs")
    p.set_defaults(func=cmd_platform_init)
    p = plat_sub.add_parser("tls-cert", help="(re)issue this host's migration TLS certificate from the fleet CA")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--ca", required=True, metavar="DIR", help="fleet CA directory (its TLS CA is created if missing)")
    p.set_defaults(func=cmd_platform_tls_cert)
    p = plat_sub.add_parser("pek-gen", help="PEK_GEN: new OCA, PEK and PDH (the CEK is kept)")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--ca", metavar="DIR", help="fleet CA directory; checked to be this platform's fleet")
    p.set_defaults(func=cmd_platform_pek_gen)
    p = plat_sub.add_parser("pdh-gen", help="PDH_GEN: new PDH key, signed by the PEK")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.set_defaults(func=cmd_platform_pdh_gen)
    p = plat_sub.add_parser("show", help="platform id, API version, key ids (never private keys)")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_platform_show)
    ownership.register_platform(plat_sub)   # pek-csr, pek-import, own, reset, status

    # -- certs --------------------------------------------------------------------------------
    certs = sub.add_parser("certs", help="export, verify and decode SEV/AMD certificates")
    certs.set_defaults(func=_help(certs))
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="ACTION")
    p = certs_sub.add_parser("export", help="write ark/ask/cek/oca/pek/pdh.cert into OUTDIR")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("outdir", metavar="OUTDIR")
    p.set_defaults(func=cmd_certs_export)
    p = certs_sub.add_parser(
        "verify", help="verify the chain in DIR link by link (exit 0 ok, 1 a link fails, 2 unusable input)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--ark", metavar="FILE", help="trusted root: the chain's ARK must be this one (key id + key)")
    p.add_argument("--ask", metavar="FILE", help="the ASK, when DIR has no ask.cert (AMD publishes it per generation)")
    p.set_defaults(func=cmd_certs_verify)
    p = certs_sub.add_parser("show", help="decode one certificate (SEV or AMD, by size)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_certs_show)


def _root_name(ark: AmdCert) -> str:
    known = KNOWN_AMD_ROOTS.get(ark.key_id.hex())
    if known is None:
        return "not an AMD root (emulated fleet CA or unknown)"
    if known[1] != ark_key_hash(ark).hex():
        return f"claims {known[0]}'s key id but its key differs from AMD's"
    return f"{known[0]} root"


# ------------------------------------------------------------------------------------------------
# ca / platform
# ------------------------------------------------------------------------------------------------


def cmd_ca_init(args) -> int:
    ca = FleetCA.create(os.urandom, rsa_bits=args.rsa_bits)
    store.save_ca(args.dir, ca)
    tls_ca = store.load_tls_ca(args.dir)
    print(f"fleet CA created in {args.dir} ({args.rsa_bits}-bit RSA)")
    print(f"  ARK key id {ca.ark.key_id.hex()}")
    print(f"  ASK key id {ca.ask.key_id.hex()}")
    print(f"  TLS CA     sha256:{tls_ca.fingerprint[:32]} (ECDSA P-256; issues the hosts' migration certificates)")
    print("keep ark.key and ask.key secret; give platforms of this fleet `--ca` access only when issuing")
    return 0


def cmd_platform_init(args) -> int:
    if store.platform_exists(args.state_dir) and not args.force:
        print(f"sevmigd: {args.state_dir} already holds a platform identity; "
              "use --force to replace it (guests' migration peers will see a new platform)", file=sys.stderr)
        return 1
    if not (0 <= args.api_major <= 255 and 0 <= args.api_minor <= 255):
        raise ConfigError("--api-major/--api-minor", "each must be 0..255")
    ca = store.load_ca(args.ca)
    tls_ca = store.load_tls_ca(args.ca)
    identity = PlatformIdentity.create(ca, os.urandom, api_major=args.api_major, api_minor=args.api_minor)
    store.save_platform(args.state_dir, identity, trusted_ark=ca.ark)
    paths = store.issue_host_tls(args.state_dir, tls_ca, identity)
    print(f"platform {identity.platform_id[:16]} created in {args.state_dir} "
          f"(API {identity.api_major}.{identity.api_minor}); fleet root {ca.ark.key_id.hex()} trusted")
    print(f"TLS certificate {paths['cert']} names chip {identity.chip_id[:16]} (mutual TLS is the default)")
    return 0


def cmd_platform_tls_cert(args) -> int:
    identity = store.load_platform(args.state_dir)
    ca = store.load_ca(args.ca)
    if ca.ark.key_id != identity.ark.key_id:
        raise ConfigError("--ca", "is not this platform's fleet CA (ARK key ids differ)")
    paths = store.issue_host_tls(args.state_dir, store.load_tls_ca(args.ca), identity)
    print(f"TLS certificate {paths['cert']} issued for chip {identity.chip_id[:16]}; "
          f"restart the daemon to use it")
    return 0


def cmd_platform_pek_gen(args) -> int:
    identity = store.load_platform(args.state_dir)
    ca = store.load_ca(args.ca) if args.ca else None
    try:
        new = identity.pek_gen(os.urandom, ca)
    except store.IdentityError as exc:
        raise ConfigError("--ca", exc.message) from None
    store.save_platform(args.state_dir, new)
    print(f"PEK_GEN: platform {identity.platform_id[:16]} is now {new.platform_id[:16]} (new OCA, PEK, PDH)")
    return 0


def cmd_platform_pdh_gen(args) -> int:
    identity = store.load_platform(args.state_dir)
    new = identity.pdh_gen(os.urandom)
    store.save_platform(args.state_dir, new)
    print(f"PDH_GEN: new PDH for platform {new.platform_id[:16]}")
    return 0


def _fingerprint(cert: SevCert) -> str:
    import hashlib

    return hashlib.sha256(cert.body()).hexdigest()[:32]


def platform_summary(identity: PlatformIdentity, roots: list[AmdCert]) -> dict:
    return {
        "platform_id": identity.platform_id,
        "chip_id": identity.chip_id,
        "api_version": f"{identity.api_major}.{identity.api_minor}",
        "ark_key_id": identity.ark.key_id.hex(),
        "ask_key_id": identity.ask.key_id.hex(),
        "ark_bits": identity.ark.modulus_bits,
        "root": _root_name(identity.ark),
        "owner": "external" if identity.externally_owned else "self",
        "cek_sha256": _fingerprint(identity.cek),
        "oca_sha256": _fingerprint(identity.oca),
        "pek_sha256": _fingerprint(identity.pek),
        "pdh_sha256": _fingerprint(identity.pdh),
        "trusted_roots": [r.key_id.hex() for r in roots],
    }


def cmd_platform_show(args) -> int:
    identity = store.load_platform(args.state_dir)
    summary = platform_summary(identity, store.load_trusted_roots(args.state_dir))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"platform     {summary['platform_id']}")
    print(f"chip         {summary['chip_id']}  (named by this host's TLS certificate)")
    print(f"API version  {summary['api_version']}")
    print(f"owner        {summary['owner']}")
    print(f"ARK key id   {summary['ark_key_id']}  ({summary['ark_bits']}-bit, {summary['root']})")
    print(f"ASK key id   {summary['ask_key_id']}")
    for name in ("cek", "oca", "pek", "pdh"):
        print(f"{name.upper()} body     sha256:{summary[name + '_sha256']}")
    print("trusted roots " + (", ".join(summary["trusted_roots"]) or "(none)"))
    return 0


# ------------------------------------------------------------------------------------------------
# certs
# ------------------------------------------------------------------------------------------------


def cmd_certs_export(args) -> int:
    identity = store.load_platform(args.state_dir)
    for path in store.export_chain(identity, args.outdir):
        print(path)
    return 0


def _read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "missing") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None


def _load_sev(directory: Path, name: str) -> SevCert:
    path = directory / f"{name}.cert"
    data = _read_input(path)
    if len(data) != SEV_CERT_SIZE:
        raise ConfigError(str(path), f"{len(data)} bytes; an SEV certificate is {SEV_CERT_SIZE} (0x824)")
    try:
        return SevCert.decode(data)
    except SevError as exc:
        raise ConfigError(str(path), f"undecodable: {exc}") from None


def _load_amd(path: Path, data: bytes, *, allow_unsigned: bool = False) -> AmdCert:
    try:
        return AmdCert.decode(data, allow_unsigned=allow_unsigned)
    except SevError as exc:
        raise ConfigError(str(path), f"not an AMD certificate: {exc}") from None


def _load_ark(directory: Path) -> tuple[AmdCert, str | None]:
    """ark.cert, else ark.cert.bad (+ ark.cert.sig when present): the Naples ARK as AMD published it."""
    path = directory / "ark.cert"
    if path.exists():
        ark = _load_amd(path, _read_input(path), allow_unsigned=True)
        return ark, None if ark.signature is not None else "ark.cert is unsigned (the Naples ARK as AMD published it)"
    bad = directory / "ark.cert.bad"
    if not bad.exists():
        raise ConfigError(str(path), "missing (no ark.cert.bad either)")
    data = _read_input(bad)
    sig_path = directory / "ark.cert.sig"
    if sig_path.exists():
        sig = _read_input(sig_path)
        ark = _load_amd(bad, data, allow_unsigned=True)
        if ark.signature is not None or len(sig) != ark.modulus_bits // 8:
            raise ConfigError(str(sig_path), f"{len(sig)} bytes; expected a {ark.modulus_bits // 8}-byte signature "
                                             "to append to the unsigned ark.cert.bad")
        return ark.with_signature(sig), "ARK from ark.cert.bad with ark.cert.sig appended"
    return _load_amd(bad, data, allow_unsigned=True), "ARK from ark.cert.bad (unsigned, as AMD published it)"


def cmd_certs_verify(args) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        raise ConfigError(str(directory), "not a directory")
    trusted = None
    if args.ark:
        try:
            trusted = [store.load_ark_file(args.ark)]
        except store.StoreError as exc:
            raise ConfigError("--ark", str(exc)) from None
    ark, note = _load_ark(directory)
    ask_path = Path(args.ask) if args.ask else directory / "ask.cert"
    if not args.ask and not ask_path.exists():
        raise ConfigError(str(ask_path), "missing; pass --ask FILE (the ASK AMD publishes for the generation)")
    ask = _load_amd(ask_path, _read_input(ask_path))
    sev = {name: _load_sev(directory, name) for name in ("cek", "oca", "pek", "pdh")}
    if note:
        print(f"note: {note}")
    try:
        report = verify_platform_chain(ark, ask, sev["cek"], sev["oca"], sev["pek"], sev["pdh"], trusted_arks=trusted)
    except ChainError as exc:
        print(f"FAIL  {exc.link}: {exc.status.name} (0x{int(exc.status):02x}): {exc.message.removeprefix(exc.link + ': ')}")
        print(f"sevmigd: chain in {directory} does not verify: link {exc.link} failed with "
              f"{exc.status.name} (0x{int(exc.status):02x})", file=sys.stderr)
        return 1
    for link, status in report.links:
        print(f"ok    {link}")
    root = _root_name(ark)
    if report.ark_pinned:
        print(f"chain verifies under the pinned root {ark.key_id.hex()} ({root})")
    else:
        print(f"chain verifies; root ARK {ark.key_id.hex()} ({root}) is self-signed but NOT pinned: "
              "pass --ark FILE to require a root you trust")
    return 0


def cmd_certs_show(args) -> int:
    path = Path(args.file)
    data = _read_input(path)
    try:
        cert = decode_any(data, allow_unsigned=True)
    except SevError as exc:
        raise ConfigError(str(path), f"neither an SEV certificate (0x824 bytes) nor an AMD certificate: {exc}") from None
    info = cert.describe()
    if isinstance(cert, AmdCert):
        info["root"] = _root_name(cert) if cert.key_usage == 0 else None
        info["key_hash_sha384"] = ark_key_hash(cert).hex()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, str) and len(value) > 96:
            value = f"{value[:96]}... ({len(value) // 2} bytes)"
        print(f"{key:16} {value}")
    return 0
