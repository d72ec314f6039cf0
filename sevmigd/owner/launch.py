"""The guest owner's launch: GODH key and session for LAUNCH_START, the LAUNCH_MEASURE check, and the
LAUNCH_SECRET packet (reference §3.2, §3.3, §3.6, §4; sevctl `session`, `measurement`, `secret`).

Why it exists: the policy the firmware enforces on migration (NOSEND, DOMAIN, SEV, ES, the API floor)
is only worth something if the guest owner bound it. The owner does that by making the launch session
itself: the session's POLICY_MAC is keyed by a TIK only the owner and the target PSP know, so a host
that launches with another policy is refused by LAUNCH_START (BAD_MEASUREMENT), and a host that
launches without the owner's session produces a measurement the owner cannot reproduce. Only after the
measurement checks out does the owner release a secret, sealed so that only that launch's PSP can
unwrap it (the MAC covers the MEASURE).

Must never: do I/O; leak TEK/TIK into a repr or exception; accept a platform PDH that fails the
firmware's own sanity check; wrap a secret without the caller having checked the measurement
(`wrap_secret` takes the measurement and recomputes it first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable

from sevmigd.guest import vcpu as vc
from sevmigd.psp import chain, crypto
from sevmigd.psp.certs import Algo, SevCert, Usage, new_sev_cert
from sevmigd.psp.identity import derive_p384_key
from sevmigd.psp.policy import Policy, RESERVED_MASK
from sevmigd.psp.status import SevError

Rng = Callable[[int], bytes]

#: Files of an owner session directory (sevctl writes <name>_godh.b64, _session.b64, _tek.bin, _tik.bin).
SESSION_PUBLIC = ("godh.cert", "session.bin", "policy")   # what the owner hands the host
SESSION_SECRET = ("tek.bin", "tik.bin")                    # what the owner keeps


class OwnerError(ValueError):
    """Owner-side input that cannot be used (bad certificate, policy, sizes); `what` names it."""

    def __init__(self, what: str, message: str):
        super().__init__(f"{what}: {message}")
        self.what = what
        self.message = message


@dataclasses.dataclass(frozen=True)
class LaunchSession:
    """One launch's owner-side secrets and the blobs LAUNCH_START takes."""

    policy: int
    godh_cert: bytes                       # 0x824: the owner's ephemeral DH public key (usage PDH)
    session: bytes                         # 0x80: NONCE ‖ WRAP_TK ‖ WRAP_IV ‖ WRAP_MAC ‖ POLICY_MAC
    tek: bytes = dataclasses.field(repr=False)
    tik: bytes = dataclasses.field(repr=False)

    @classmethod
    def create(cls, pdh_cert: bytes, policy: int, rng: Rng) -> LaunchSession:
        """sevctl `session`: a fresh GODH key, ECDH with the platform's PDH, random TEK/TIK wrapped
        under KEK/KIK, POLICY_MAC over `policy` (reference §3.2). The GODH private key is dropped here:
        nothing after LAUNCH_START needs it."""
        check_policy(policy)
        try:
            pdh = chain.pdh_sanity_check(bytes(pdh_cert))
        except SevError as exc:
            raise OwnerError("PDH certificate", str(exc)) from None
        godh_key = derive_p384_key(rng)
        # GODH: usage PDH, algo ECDH_SHA256, API 0.0, both signature slots empty (the firmware ignores
        # them, reference §3.5; sev-tool self-signs, sevctl does not).
        godh = new_sev_cert(godh_key.public_key(), usage=Usage.PDH, algo=Algo.ECDH_SHA256, api_major=0, api_minor=0)
        z = crypto.ecdh_z(godh_key, pdh)
        tek, tik, nonce, wrap_iv = rng(16), rng(16), rng(16), rng(16)
        session = crypto.build_session(z, tek=tek, tik=tik, nonce=nonce, wrap_iv=wrap_iv, policy=policy)
        return cls(policy, godh.encode(), session, bytes(tek), bytes(tik))

    def to_files(self) -> dict[str, bytes]:
        return {"godh.cert": self.godh_cert, "session.bin": self.session, "policy": f"{self.policy:#010x}\n".encode(),
                "tek.bin": self.tek, "tik.bin": self.tik}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> LaunchSession:
        for name in SESSION_PUBLIC + SESSION_SECRET:
            if name not in files:
                raise OwnerError(name, "missing")
        policy = parse_policy(files["policy"].decode("ascii", "replace").strip(), "policy")
        godh, session = bytes(files["godh.cert"]), bytes(files["session.bin"])
        if len(godh) != 0x824:
            raise OwnerError("godh.cert", f"{len(godh)} bytes; an SEV certificate is 0x824")
        if len(session) != crypto.SESSION_SIZE:
            raise OwnerError("session.bin", f"{len(session)} bytes; a launch session is 0x80")
        tek, tik = bytes(files["tek.bin"]), bytes(files["tik.bin"])
        if len(tek) != 16 or len(tik) != 16:
            raise OwnerError("tek.bin/tik.bin", "TEK and TIK are 16 bytes each")
        if not hmac.compare_digest(crypto.policy_mac(tik, policy), session[0x60:0x80]):
            raise OwnerError("policy", "does not match the session's POLICY_MAC (the policy file was changed)")
        return cls(policy, godh, session, tek, tik)


def check_policy(policy: int) -> None:
    if isinstance(policy, bool) or not isinstance(policy, int) or not 0 <= policy <= 0xFFFFFFFF:
        raise OwnerError("policy", "must be a u32")
    if policy & RESERVED_MASK:
        raise OwnerError("policy", f"reserved bits 0x{policy & RESERVED_MASK:04x} are set (LAUNCH_START refuses them)")


def parse_policy(text: str, what: str = "--policy") -> int:
    try:
        policy = int(text, 16)
    except ValueError:
        raise OwnerError(what, f"not a hex number: {text!r}") from None
    check_policy(policy)
    return policy


def expected_digest(image: bytes, *, policy: int, vcpus: int = 1) -> bytes:
    """The launch digest a guest launched from `image` must have: SHA-256 of the LAUNCH_UPDATE_DATA
    plaintext (the image) and, for SEV-ES, of each vCPU's reset VMSA in vCPU order (reference §2.4)."""
    h = hashlib.sha256(bytes(image))
    if policy & Policy.ES:
        for i in range(vcpus):
            h.update(vc.encode_vmsa(vc.reset_state(i), i))
    return h.digest()


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What the host reports after LAUNCH_MEASURE: MEASURE and MNONCE (the 0x30-byte blob), and the
    firmware's API version and build it says the guest was measured by."""

    measure: bytes
    mnonce: bytes
    api_major: int
    api_minor: int
    build: int

    def __post_init__(self) -> None:
        if len(self.measure) != 32 or len(self.mnonce) != 16:
            raise OwnerError("measurement", "MEASURE is 32 bytes and MNONCE 16")
        for name in ("api_major", "api_minor", "build"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
                raise OwnerError(name, "must be 0..255")


def measurement_ok(session: LaunchSession, m: Measurement, digest: bytes) -> bool:
    """sevctl `measurement`: recompute HMAC(TIK, 0x04 ‖ api ‖ build ‖ policy ‖ digest ‖ MNONCE) with the
    owner's TIK and the owner's policy (never the host's) and compare in constant time."""
    want = crypto.launch_measure(session.tik, api_major=m.api_major, api_minor=m.api_minor, build=m.build,
                                 policy=session.policy, digest=digest, mnonce=m.mnonce)
    return hmac.compare_digest(want, m.measure)


def wrap_secret(session: LaunchSession, m: Measurement, digest: bytes, secret: bytes, rng: Rng) -> bytes:
    """sevctl `secret build`: the LAUNCH_SECRET packet, header (0x34) ‖ ciphertext, for `secret` (a
    16-byte multiple, at most one page). Refuses unless the measurement checks out against `digest`."""
    if not measurement_ok(session, m, digest):
        raise OwnerError("measurement", "does not match this session, policy and launch digest: "
                                        "no secret for this launch")
    secret = bytes(secret)
    if not secret or len(secret) % 16 or len(secret) > 4096:
        raise OwnerError("secret", f"{len(secret)} bytes; must be a non-zero multiple of 16, at most 4096")
    hdr, ct = crypto.TransportKeys(session.tek, session.tik).seal(bytes(rng(16)), secret, ctx=crypto.CTX_LAUNCH_SECRET,
                                                            measure=m.measure)
    return hdr + ct


def verify_chain(chain_files: dict[str, bytes], trusted_ark: bytes | None = None):
    """Decode and verify a platform's chain (sevctl `verify`): ARK → ASK → CEK → PEK ← OCA, PEK → PDH.
    Returns the ChainReport; raises chain.ChainError naming the failing link."""
    from sevmigd.psp.certs import AmdCert

    try:
        ark = AmdCert.decode(chain_files["ark.cert"], allow_unsigned=True)
        ask = AmdCert.decode(chain_files["ask.cert"])
        certs = {n: SevCert.decode(chain_files[f"{n}.cert"]) for n in ("cek", "oca", "pek", "pdh")}
        trusted = None if trusted_ark is None else [AmdCert.decode(trusted_ark, allow_unsigned=True)]
    except KeyError as exc:
        raise OwnerError(str(exc.args[0]), "missing") from None
    except SevError as exc:
        raise OwnerError("certificate", str(exc)) from None
    return chain.verify_platform_chain(ark, ask, certs["cek"], certs["oca"], certs["pek"], certs["pdh"],
                                       trusted_arks=trusted)


__all__ = ["LaunchSession", "Measurement", "OwnerError", "expected_digest", "measurement_ok", "wrap_secret",
           "verify_chain", "parse_policy", "check_policy", "SESSION_PUBLIC", "SESSION_SECRET"]
