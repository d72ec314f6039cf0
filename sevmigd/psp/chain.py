"""Certificate chain rules: what the firmware checks on SEND_START, and trust decisions for humans.

Owns: the PDH sanity check (§3.5), SEND_START "validate_platform" / "validate_domain" (§2.4 steps
5–6, §5.4) with the firmware's exact status codes, the fused root-key hash, and
`verify_platform_chain`, the whole-chain check the CLI and the daemon use to decide whether a remote
platform is trusted (reports every link by name).

Must never: do I/O, or accept a chain whose root is not proven: either the ARK's self-signature
verifies, or the caller pinned that exact ARK (key id + key hash) as trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from sevmigd.psp.certs import (
    SEV_CERT_SIZE,
    Algo,
    AmdCert,
    SevCert,
    Usage,
    ask_signer,
    sev_signer,
    verify_amd_cert,
    verify_sev_cert,
)
from sevmigd.psp.status import SevError, SevStatus

PLAT_CERTS_SIZE = 3 * SEV_CERT_SIZE  # PEK ‖ OCA ‖ CEK = 0x186C
# ASK ‖ ARK: two 2K certs (Naples) or two 4K certs (Rome and later).
AMD_CHAIN_SIZES = (0x680, 0xC80)

NAPLES_UNSIGNED_ARK_HINT = (
    "the Naples ARK as published by AMD lacks its self-signature; append ark.cert.sig "
    "(the 256-byte signature AMD published separately: cat ark.cert.bad ark.cert.sig > ark.cert) "
    "or pin this ARK as trusted (--ark FILE)"
)


class ChainError(SevError):
    """A chain link failed; `link` names it (e.g. "ASK -> CEK"), `status` is the SEV status."""

    def __init__(self, link: str, status: SevStatus | int, message: str = ""):
        super().__init__(status, f"{link}: {message}" if message else link)
        self.link = link


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """Outcome of a successful `verify_platform_chain`: each link checked, in order, with its status."""

    links: list[tuple[str, SevStatus]]
    ark_key_id: bytes
    ark_pinned: bool  # the ARK matched one of `trusted_arks`
    ark_self_signed: bool  # False only for an unsigned ARK accepted through a pin


def ark_key_hash(ark: AmdCert) -> bytes:
    """SHA-384 of the ARK's fixed part ‖ pubexp ‖ modulus: the firmware's fused root-key hash."""
    return hashlib.sha384(ark.signed_part()).digest()


def split_plat_certs(b: bytes) -> tuple[bytes, bytes, bytes]:
    """PEK ‖ OCA ‖ CEK → (pek, oca, cek)."""
    if len(b) != PLAT_CERTS_SIZE:
        raise SevError(SevStatus.INVALID_LENGTH, f"plat_certs must be 0x{PLAT_CERTS_SIZE:x} bytes, got 0x{len(b):x}")
    s = SEV_CERT_SIZE
    return bytes(b[:s]), bytes(b[s : 2 * s]), bytes(b[2 * s :])


def split_amd_certs(b: bytes) -> tuple[bytes, bytes]:
    """ASK ‖ ARK → (ask, ark); both certs have the same size (2K Naples or 4K Rome+)."""
    if len(b) not in AMD_CHAIN_SIZES:
        raise SevError(SevStatus.INVALID_LENGTH, f"amd_certs must be 0x680 or 0xc80 bytes, got 0x{len(b):x}")
    half = len(b) // 2
    return bytes(b[:half]), bytes(b[half:])


def pdh_sanity_check(pdh: bytes) -> ec.EllipticCurvePublicKey:
    """§3.5: version 1, usage PDH, algo exactly ECDH_SHA256, valid P-384 point; returns the key."""
    cert = SevCert.decode(pdh)
    return _pdh_key(cert)


def _pdh_key(cert: SevCert) -> ec.EllipticCurvePublicKey:
    if cert.version != 1:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"PDH version {cert.version} (expected 1)")
    if cert.pubkey_usage != Usage.PDH:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"PDH usage 0x{cert.pubkey_usage:x} (expected 0x1003)")
    if cert.pubkey_algo != Algo.ECDH_SHA256:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"PDH algorithm 0x{cert.pubkey_algo:x} (expected ECDH_SHA256 0x3)")
    return cert.ec_public_key()


def _decode_sev(data: bytes, usage: Usage) -> SevCert:
    """Decode a SEV cert of the given usage inside an already length-checked buffer."""
    try:
        cert = SevCert.decode(data)
    except SevError as exc:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"{usage.name}: {exc.message}") from exc
    if cert.pubkey_usage != usage:
        raise SevError(
            SevStatus.INVALID_CERTIFICATE, f"{usage.name} certificate has usage 0x{cert.pubkey_usage:x}"
        )
    return cert


def _decode_amd(data: bytes, name: str) -> AmdCert:
    try:
        return AmdCert.decode(data)
    except SevError as exc:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"{name}: {exc.message}") from exc


def _check_ark_shape(ark: AmdCert) -> None:
    if ark.key_usage != Usage.ARK:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"ARK key usage 0x{ark.key_usage:x} (expected 0x0)")
    if ark.certifying_id != ark.key_id:
        raise SevError(SevStatus.INVALID_CERTIFICATE, "ARK is not self-certified (certifying id != key id)")


def _check_ask(ask: AmdCert, ark: AmdCert) -> None:
    if ask.key_usage != Usage.ASK:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"ASK key usage 0x{ask.key_usage:x} (expected 0x13)")
    verify_amd_cert(ask, ark, "ASK")


def validate_platform(
    amd_certs: bytes, plat_certs: bytes, pdh: bytes, *, root_key_id: bytes, root_key_hash: bytes
) -> None:
    """SEND_START step 5 (SEV policy bit): ARK (root) → ASK → CEK → PEK (CEK slot) → remote PDH.

    Lengths → INVALID_LENGTH; a certificate of the wrong shape (usage, version, sizes, ids, not the
    fused root) → INVALID_CERTIFICATE; a signature that does not verify → BAD_SIGNATURE, including
    the ARK's self-signature (its signed part is already pinned by the fused hash, so only the
    signature bytes can be wrong there). SEV certificates follow the slot rules of §2.6.
    """
    if len(plat_certs) != PLAT_CERTS_SIZE:
        raise SevError(SevStatus.INVALID_LENGTH, "plat_certs length")
    if len(pdh) != SEV_CERT_SIZE:
        raise SevError(SevStatus.INVALID_LENGTH, "pdh_cert length")
    ask_b, ark_b = split_amd_certs(amd_certs)
    pek_b, _oca_b, cek_b = split_plat_certs(plat_certs)

    ark = _decode_amd(ark_b, "ARK")
    _check_ark_shape(ark)
    if ark.key_id != root_key_id:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"ARK key id {ark.key_id.hex()} is not the root key id")
    if ark_key_hash(ark) != root_key_hash:
        raise SevError(SevStatus.INVALID_CERTIFICATE, "ARK key hash does not match the fused root-key hash")
    verify_amd_cert(ark, ark, "ARK")

    ask = _decode_amd(ask_b, "ASK")
    _check_ask(ask, ark)

    cek = _decode_sev(cek_b, Usage.CEK)
    verify_sev_cert(cek, ask_signer(ask), "CEK")
    pek = _decode_sev(pek_b, Usage.PEK)
    verify_sev_cert(pek, sev_signer(cek), "PEK")
    pdh_cert = _decode_sev(pdh, Usage.PDH)
    verify_sev_cert(pdh_cert, sev_signer(pek), "PDH")


def validate_domain(plat_certs: bytes, pdh: bytes, local_oca: bytes) -> None:
    """SEND_START step 6 (DOMAIN policy bit): OCA self-signed → PEK → PDH, remote OCA == local OCA."""
    if len(plat_certs) != PLAT_CERTS_SIZE:
        raise SevError(SevStatus.INVALID_LENGTH, "plat_certs length")
    if len(pdh) != SEV_CERT_SIZE:
        raise SevError(SevStatus.INVALID_LENGTH, "pdh_cert length")
    pek_b, oca_b, _cek_b = split_plat_certs(plat_certs)
    oca = _decode_sev(oca_b, Usage.OCA)
    verify_sev_cert(oca, sev_signer(oca), "OCA")
    pek = _decode_sev(pek_b, Usage.PEK)
    verify_sev_cert(pek, sev_signer(oca), "PEK")
    pdh_cert = _decode_sev(pdh, Usage.PDH)
    verify_sev_cert(pdh_cert, sev_signer(pek), "PDH")
    if bytes(oca_b) != bytes(local_oca):
        raise SevError(SevStatus.POLICY_FAILURE, "the remote OCA is not this platform's OCA (different domain)")


def _find_pin(ark: AmdCert, trusted_arks: Sequence[AmdCert]) -> bool:
    h = ark_key_hash(ark)
    return any(t.key_id == ark.key_id and ark_key_hash(t) == h for t in trusted_arks)


def verify_platform_chain(
    ark: AmdCert,
    ask: AmdCert,
    cek: SevCert,
    oca: SevCert,
    pek: SevCert,
    pdh: SevCert,
    *,
    trusted_arks: Sequence[AmdCert] | None = None,
) -> ChainReport:
    """Verify the whole chain, link by link; the first failure raises ChainError naming the link.

    Without `trusted_arks`, the ARK is only checked to be self-signed (the caller decides whether that
    root is acceptable, e.g. by its key id). With `trusted_arks`, the ARK must equal one of them by key
    id and key hash; an unsigned ARK (Naples as published) is then accepted on the strength of the pin.
    """
    links: list[tuple[str, SevStatus]] = []

    def link(name: str, fn) -> None:
        try:
            fn()
        except ChainError:
            raise
        except SevError as exc:
            raise ChainError(name, exc.status, exc.message) from exc
        links.append((name, SevStatus.SUCCESS))

    pinned = False
    if trusted_arks is not None:
        def pin() -> None:
            if not _find_pin(ark, trusted_arks):
                raise SevError(
                    SevStatus.INVALID_CERTIFICATE,
                    f"ARK {ark.key_id.hex()} is not one of the {len(trusted_arks)} trusted root(s)",
                )

        link("ARK pinned", pin)
        pinned = True

    def ark_self() -> None:
        _check_ark_shape(ark)
        if ark.signature is None:
            raise SevError(SevStatus.INVALID_CERTIFICATE, NAPLES_UNSIGNED_ARK_HINT)
        verify_amd_cert(ark, ark, "ARK")

    self_signed = ark.signature is not None
    if self_signed or not pinned:
        link("ARK -> ARK", ark_self)
    else:
        link("ARK -> ARK (unsigned; trusted by pin)", lambda: _check_ark_shape(ark))

    link("ARK -> ASK", lambda: _check_ask(ask, ark))

    def usage(cert: SevCert, expected: Usage) -> None:
        if cert.pubkey_usage != expected:
            raise SevError(
                SevStatus.INVALID_CERTIFICATE,
                f"{expected.name} certificate has usage 0x{cert.pubkey_usage:x}",
            )

    def cek_link() -> None:
        usage(cek, Usage.CEK)
        verify_sev_cert(cek, ask_signer(ask), "CEK")

    def oca_link() -> None:
        usage(oca, Usage.OCA)
        verify_sev_cert(oca, sev_signer(oca), "OCA")

    def pek_oca() -> None:
        usage(pek, Usage.PEK)
        verify_sev_cert(pek, sev_signer(oca), "PEK")

    def pek_cek() -> None:
        usage(pek, Usage.PEK)
        verify_sev_cert(pek, sev_signer(cek), "PEK")

    def pdh_link() -> None:
        _pdh_key(pdh)
        verify_sev_cert(pdh, sev_signer(pek), "PDH")

    link("ASK -> CEK", cek_link)
    link("OCA -> OCA", oca_link)
    link("OCA -> PEK", pek_oca)
    link("CEK -> PEK", pek_cek)
    link("PEK -> PDH", pdh_link)
    return ChainReport(links, ark.key_id, pinned, self_signed)
