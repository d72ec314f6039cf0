"""Emulated platform identities: a fleet CA (ARK + ASK) and per-platform CEK/OCA/PEK/PDH keys.

Owns: issuing the certificate chain an emulated PSP presents (reference §5.3, §8), PEK_GEN / PDH_GEN
key rotation semantics (§2.4), and serialising all of it to ``dict[str, bytes]`` (file name →
content) so that `sevmigd.store` can write it. Real AMD keys are not available, so every fleet has
its own emulated ARK/ASK; real chains can only be verified (see `sevmigd.psp.chain`).

Must never: do file I/O (store.py does), log or print private keys, or use a randomness source other
than the injected ``rng``. Determinism: key ids and all EC private keys (CEK, OCA, PEK, PDH) are
derived from ``rng`` bytes (``ec.derive_private_key``), so the same rng stream gives the same keys.
RSA keys (ARK/ASK) come from OpenSSL's generator (the ``cryptography`` API takes no RNG), and
ECDSA/RSA-PSS signatures use OpenSSL's nonces/salts, so certificate *signature bytes* differ between
runs while public keys and bodies do not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevmigd.errors import SevmigdError
from sevmigd.psp.certs import (
    Algo,
    AmdCert,
    SevCert,
    Usage,
    new_sev_cert,
    sign_amd_cert,
    sev_signer,
    sign_sev_cert,
    verify_amd_cert,
    verify_sev_cert,
)
from sevmigd.psp.chain import ChainError, verify_platform_chain
from sevmigd.psp.status import SevError, SevStatus

Rng = Callable[[int], bytes]
_Cert = TypeVar("_Cert", SevCert, AmdCert)

# RSA public exponent of the emulated ARK/ASK (AMD's keys use 65537 too).
RSA_PUBLIC_EXPONENT = 65537
# Default ARK/ASK size: 4096 bits like Rome and later; 2048 (Naples) is allowed for fast tests.
DEFAULT_RSA_BITS = 4096
# Algorithms the firmware gives the keys it generates (§2.4 PEK_GEN/PDH_GEN).
SIGN_ALGO = Algo.ECDSA_SHA256
PDH_ALGO = Algo.ECDH_SHA256
DEFAULT_API_MAJOR = 1
DEFAULT_API_MINOR = 55

_P384_N = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)

# Order of secp256k1, the curve of the chip-unique key behind GET_ID (FW `sev_get_id`).
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

CA_FILES = ("ark.cert", "ask.cert", "ark.key", "ask.key")
CHAIN_FILES = ("ark.cert", "ask.cert", "cek.cert", "oca.cert", "pek.cert", "pdh.cert")
PLATFORM_KEY_FILES = ("cek.key", "oca.key", "pek.key", "pdh.key")
PLATFORM_FILES = CHAIN_FILES + PLATFORM_KEY_FILES
#: An externally owned platform (after PEK_CERT_IMPORT) holds no OCA private key.
OWNED_PLATFORM_FILES = tuple(n for n in PLATFORM_FILES if n != "oca.key")


class IdentityError(SevmigdError):
    """Serialised identity material is missing, undecodable or inconsistent; `name` is the file."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


_P256_N = int("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551", 16)
_CURVE_ORDERS = {"secp384r1": _P384_N, "secp256r1": _P256_N}


def derive_ec_key(rng: Rng, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    """A private key on `curve` (P-384 or P-256) from rng bytes: key size + 16 bytes reduced into
    [1, n-1] (bias < 2**-128), so the same rng stream gives the same key."""
    n = _CURVE_ORDERS[curve.name]
    scalar = int.from_bytes(rng(curve.key_size // 8 + 16), "big") % (n - 1) + 1
    return ec.derive_private_key(scalar, curve)


def derive_p384_key(rng: Rng) -> ec.EllipticCurvePrivateKey:
    """A P-384 private key from rng bytes (the firmware's keys: CEK, OCA, PEK, PDH)."""
    return derive_ec_key(rng, ec.SECP384R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(files: dict[str, bytes], name: str, kind: type):
    try:
        data = files[name]
    except KeyError:
        raise IdentityError(name, "missing") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(name, "not a PKCS#8 PEM private key") from exc
    if not isinstance(key, kind):
        raise IdentityError(name, f"wrong key type ({type(key).__name__})")
    if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP384R1):
        raise IdentityError(name, "EC key is not on P-384")
    return key


def _load(files: dict[str, bytes], name: str, codec: Callable[[bytes], _Cert]) -> _Cert:
    """Decode certificate file `name` with `codec`; a missing or bad file is an IdentityError naming it."""
    try:
        return codec(files[name])
    except KeyError:
        raise IdentityError(name, "missing") from None
    except SevError as exc:
        raise IdentityError(name, str(exc)) from exc


def _load_sev(files: dict[str, bytes], name: str) -> SevCert:
    return _load(files, name, SevCert.decode)


def _load_amd(files: dict[str, bytes], name: str) -> AmdCert:
    return _load(files, name, AmdCert.decode)


def _check_ec_pair(name: str, cert: SevCert, key: ec.EllipticCurvePrivateKey) -> None:
    try:
        pub = cert.ec_public_key()
    except SevError as exc:
        raise IdentityError(name, str(exc)) from exc
    if pub.public_numbers() != key.public_key().public_numbers():
        raise IdentityError(name, "private key does not match its certificate")


def _check_rsa_pair(name: str, cert: AmdCert, key: rsa.RSAPrivateKey) -> None:
    nums = key.public_key().public_numbers()
    if (nums.e, nums.n) != (cert.pubexp, cert.modulus):
        raise IdentityError(name, "private key does not match its certificate")


def chip_id(cek: SevCert) -> str:
    """Names a chip: lowercase hex SHA-256 of the CEK certificate's public key field (0x404 bytes).

    The CEK is the chip's own endorsement key (signed by the ASK); it signs the PEK, which signs the PDH.
    Unlike `platform_id` (a hash of the PEK certificate) it stays the same across PEK_GEN, PDH_GEN and an
    owner re-signing the PEK, so it is what a host's TLS certificate names (sevmigd.tlsca).
    """
    h = hashes.Hash(hashes.SHA256())
    h.update(cek.pubkey)
    return h.finalize().hex()


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FleetCA:
    """An emulated AMD root (ARK, self-signed) and signing key (ASK, signed by ARK) for a test fleet."""

    ark: AmdCert
    ask: AmdCert
    ark_private: rsa.RSAPrivateKey = dataclasses.field(repr=False)
    ask_private: rsa.RSAPrivateKey = dataclasses.field(repr=False)

    @classmethod
    def create(cls, rng: Rng, *, rsa_bits: int = DEFAULT_RSA_BITS) -> FleetCA:
        if rsa_bits not in (2048, 4096):
            raise ValueError("rsa_bits must be 2048 or 4096 (the AMD certificate sizes)")
        h: hashes.HashAlgorithm = hashes.SHA256() if rsa_bits == 2048 else hashes.SHA384()
        ark_key = rsa.generate_private_key(RSA_PUBLIC_EXPONENT, rsa_bits)
        ask_key = rsa.generate_private_key(RSA_PUBLIC_EXPONENT, rsa_bits)
        ark_id, ask_id = rng(16), rng(16)

        def amd(key: rsa.RSAPrivateKey, key_id: bytes, usage: int) -> AmdCert:
            n = key.public_key().public_numbers()
            return AmdCert(key_id, ark_id, usage, rsa_bits, rsa_bits, n.e, n.n, None)

        ark = sign_amd_cert(amd(ark_key, ark_id, Usage.ARK), ark_key, h)
        ask = sign_amd_cert(amd(ask_key, ask_id, Usage.ASK), ark_key, h)
        return cls(ark, ask, ark_key, ask_key)

    def to_files(self) -> dict[str, bytes]:
        return {
            "ark.cert": self.ark.encode(),
            "ask.cert": self.ask.encode(),
            "ark.key": _key_pem(self.ark_private),
            "ask.key": _key_pem(self.ask_private),
        }

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> FleetCA:
        ark, ask = _load_amd(files, "ark.cert"), _load_amd(files, "ask.cert")
        ark_key = _load_key(files, "ark.key", rsa.RSAPrivateKey)
        ask_key = _load_key(files, "ask.key", rsa.RSAPrivateKey)
        _check_rsa_pair("ark.key", ark, ark_key)
        _check_rsa_pair("ask.key", ask, ask_key)
        if ark.key_usage != Usage.ARK or ask.key_usage != Usage.ASK:
            raise IdentityError("ark.cert", "ARK/ASK key usages must be 0x0 / 0x13")
        try:
            verify_amd_cert(ark, ark, "ARK")
            verify_amd_cert(ask, ark, "ASK")
        except SevError as exc:
            raise IdentityError("ask.cert", str(exc)) from exc
        return cls(ark, ask, ark_key, ask_key)

    def sign_cek(self, cek: SevCert) -> SevCert:
        """The CEK with slot 1 = ASK signature (usage 0x13, algo RSA_SHA256 for 2K / RSA_SHA384 for 4K)."""
        return sign_sev_cert(cek, 1, self.ask_private, Usage.ASK, self.ask.sev_algo)


# ---------------------------------------------------------------------------------------------


OWNER_FILES = ("oca.cert", "oca.key")


@dataclasses.dataclass(frozen=True)
class FleetOwner:
    """A platform owner's certificate authority (OCA): one self-signed P-384 key that signs the PEK
    of every platform of its fleet (PEK_CSR → `sign_pek` → PEK_CERT_IMPORT). Platforms whose PEKs
    one OCA signed form one DOMAIN: SEND_START with the DOMAIN policy bit accepts exactly them."""

    oca: SevCert
    oca_private: ec.EllipticCurvePrivateKey = dataclasses.field(repr=False)

    @classmethod
    def create(cls, rng: Rng, *, api_major: int = DEFAULT_API_MAJOR, api_minor: int = DEFAULT_API_MINOR) -> FleetOwner:
        key = derive_p384_key(rng)
        oca = new_sev_cert(key.public_key(), usage=Usage.OCA, algo=SIGN_ALGO, api_major=api_major, api_minor=api_minor)
        return cls(sign_sev_cert(oca, 1, key, Usage.OCA, SIGN_ALGO), key)

    def sign_pek(self, csr: SevCert) -> SevCert:
        """The platform's PEK_CSR output signed in slot 1 by this OCA (slot 2 stays free for the CEK
        signature the firmware adds on import). Refuses anything that is not an unsigned PEK CSR."""
        if csr.version != 1 or csr.pubkey_usage != Usage.PEK:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "not a PEK signing request (usage must be PEK 0x1002)")
        if any(u != Usage.INVALID or a != Algo.INVALID for u, a, _s in csr.slots()):
            raise SevError(SevStatus.INVALID_CERTIFICATE, "a PEK CSR has both signature slots empty")
        csr.ec_public_key()  # a P-384 point on the curve, or INVALID_CERTIFICATE
        return sign_sev_cert(csr, 1, self.oca_private, Usage.OCA, SIGN_ALGO)

    def to_files(self) -> dict[str, bytes]:
        return {"oca.cert": self.oca.encode(), "oca.key": _key_pem(self.oca_private)}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> FleetOwner:
        oca = _load_sev(files, "oca.cert")
        key = _load_key(files, "oca.key", ec.EllipticCurvePrivateKey)
        _check_ec_pair("oca.key", oca, key)
        if oca.pubkey_usage != Usage.OCA:
            raise IdentityError("oca.cert", "not an OCA certificate (usage must be 0x1001)")
        try:
            verify_sev_cert(oca, sev_signer(oca), "OCA")
        except SevError as exc:
            raise IdentityError("oca.cert", str(exc)) from exc
        return cls(oca, key)


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlatformIdentity:
    """One emulated platform: fleet ARK/ASK, CEK, OCA, PEK, PDH certificates and private keys."""

    ark: AmdCert
    ask: AmdCert
    cek: SevCert
    oca: SevCert
    pek: SevCert
    pdh: SevCert
    cek_private: ec.EllipticCurvePrivateKey = dataclasses.field(repr=False)
    #: None when the platform is externally owned (PEK_CERT_IMPORT): the owner's OCA key never
    #: reaches the platform, only its certificate does.
    oca_private: ec.EllipticCurvePrivateKey | None = dataclasses.field(repr=False)
    pek_private: ec.EllipticCurvePrivateKey = dataclasses.field(repr=False)
    pdh_private: ec.EllipticCurvePrivateKey = dataclasses.field(repr=False)

    @property
    def api_major(self) -> int:
        return self.pek.api_major

    @property
    def externally_owned(self) -> bool:
        """The firmware's ``is_ext_owned`` bit: the OCA came from PEK_CERT_IMPORT, not from PEK_GEN."""
        return self.oca_private is None

    @property
    def api_minor(self) -> int:
        return self.pek.api_minor

    @classmethod
    def create(
        cls, ca: FleetCA, rng: Rng, *, api_major: int = DEFAULT_API_MAJOR, api_minor: int = DEFAULT_API_MINOR
    ) -> PlatformIdentity:
        if not (0 <= api_major <= 255 and 0 <= api_minor <= 255):
            raise ValueError("API version fields are one byte each")
        cek_key = derive_p384_key(rng)
        cek = new_sev_cert(cek_key.public_key(), usage=Usage.CEK, algo=SIGN_ALGO, api_major=api_major, api_minor=api_minor)
        cek = ca.sign_cek(cek)
        base = cls(ca.ark, ca.ask, cek, cek, cek, cek, cek_key, cek_key, cek_key, cek_key)
        return base._new_pek(rng)

    # -- key rotation (§2.4) ------------------------------------------------------------------

    def _new_pek(self, rng: Rng) -> PlatformIdentity:
        """New OCA (self-signed), PEK (sig1 OCA, sig2 CEK) and PDH, keeping the CEK."""
        major, minor = self.cek.api_major, self.cek.api_minor
        oca_key = derive_p384_key(rng)
        oca = new_sev_cert(oca_key.public_key(), usage=Usage.OCA, algo=SIGN_ALGO, api_major=major, api_minor=minor)
        oca = sign_sev_cert(oca, 1, oca_key, Usage.OCA, SIGN_ALGO)
        pek_key = derive_p384_key(rng)
        pek = new_sev_cert(pek_key.public_key(), usage=Usage.PEK, algo=SIGN_ALGO, api_major=major, api_minor=minor)
        pek = sign_sev_cert(pek, 1, oca_key, Usage.OCA, SIGN_ALGO)
        pek = sign_sev_cert(pek, 2, self.cek_private, Usage.CEK, self.cek.pubkey_algo)
        ident = dataclasses.replace(self, oca=oca, pek=pek, oca_private=oca_key, pek_private=pek_key)
        return ident.pdh_gen(rng)

    def pek_gen(self, rng: Rng, ca: FleetCA | None = None) -> PlatformIdentity:
        """PEK_GEN: new OCA, PEK and PDH; the CEK is unchanged.

        When `ca` is given it must be this platform's fleet (same ARK key id); it is only checked, as a
        guard against rotating a platform's keys with the wrong CA directory.
        """
        if ca is not None and (ca.ark.key_id != self.ark.key_id or ca.ask.key_id != self.ask.key_id):
            raise IdentityError("ca", "the CA is not this platform's fleet CA (ARK/ASK key ids differ)")
        return self._new_pek(rng)

    def reset(self, rng: Rng) -> PlatformIdentity:
        """PLATFORM_RESET: OCA, PEK and PDH deleted and regenerated self-owned; the CEK stays.

        The CEK is derived from the chip-unique secret (FW `sev_cek_derive`), which no command
        changes, so the platform keeps its CEK, its GET_ID and every name derived from the CEK.
        """
        return self._new_pek(rng)

    def pek_csr(self) -> SevCert:
        """PEK_CSR: the PEK body with both signature slots empty (FW `sev_mcmd_pek_csr`)."""
        return self.pek.without_signatures()

    def pek_cert_import(self, pek: SevCert, oca: SevCert, rng: Rng) -> PlatformIdentity:
        """The state change of PEK_CERT_IMPORT once the firmware's checks passed (see
        `Firmware.pek_cert_import`): this platform's CEK signature is copied into the imported PEK's
        free slot, the owner's OCA certificate replaces ours (we never see its private key), the
        platform becomes externally owned and a new PDH is signed by the PEK."""
        cek_slot = next(((u, a, sig) for u, a, sig in self.pek.slots() if u == Usage.CEK), None)
        if cek_slot is None:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "this platform's PEK carries no CEK signature")
        free = next((i for i, (u, a, _s) in enumerate(pek.slots(), 1) if u == Usage.INVALID and a == Algo.INVALID),
                    None)
        if free is None:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "the signed PEK has no free slot for the CEK signature")
        new_pek = pek.with_slot(free, *cek_slot)
        ident = dataclasses.replace(self, pek=new_pek, oca=oca, oca_private=None)
        return ident.pdh_gen(rng)

    def get_id(self) -> bytes:
        """GET_ID: 64 bytes, the x ‖ y (32 bytes each, big-endian) of a secp256k1 public key.

        Hardware: Q = CUK·G with CUK the chip-unique key (FW `sev_get_id`), the same fused secret the
        CEK is derived from. Here the CEK private key stands in for that secret: CUK = KDF(CEK scalar,
        "sevmigd-chip-unique-key") mod n, so GET_ID is stable for as long as the CEK is (every
        PEK_GEN, PEK_CERT_IMPORT and PLATFORM_RESET) and names the same chip as the CEK.
        """
        scalar = self.cek_private.private_numbers().private_value.to_bytes(48, "big")
        seed = hashes.Hash(hashes.SHA512())
        seed.update(b"sevmigd-chip-unique-key\x00" + scalar)
        cuk = int.from_bytes(seed.finalize(), "big") % (_SECP256K1_N - 1) + 1
        pub = ec.derive_private_key(cuk, ec.SECP256K1()).public_key().public_numbers()
        return pub.x.to_bytes(32, "big") + pub.y.to_bytes(32, "big")

    def pdh_gen(self, rng: Rng) -> PlatformIdentity:
        """PDH_GEN: new PDH key (algo ECDH_SHA256, P-384), certificate signed by the PEK (slot 1)."""
        pdh_key = derive_p384_key(rng)
        pdh = new_sev_cert(
            pdh_key.public_key(), usage=Usage.PDH, algo=PDH_ALGO, api_major=self.pek.api_major, api_minor=self.pek.api_minor
        )
        pdh = sign_sev_cert(pdh, 1, self.pek_private, Usage.PEK, self.pek.pubkey_algo)
        return dataclasses.replace(self, pdh=pdh, pdh_private=pdh_key)

    # -- views --------------------------------------------------------------------------------

    def chain_files(self) -> dict[str, bytes]:
        """The public chain under sevctl's file names."""
        return {
            "ark.cert": self.ark.encode(),
            "ask.cert": self.ask.encode(),
            "cek.cert": self.cek.encode(),
            "oca.cert": self.oca.encode(),
            "pek.cert": self.pek.encode(),
            "pdh.cert": self.pdh.encode(),
        }

    def plat_certs(self) -> bytes:
        """PEK ‖ OCA ‖ CEK (0x186C bytes), the PDH_CERT_EXPORT / SEND_START layout."""
        return self.pek.encode() + self.oca.encode() + self.cek.encode()

    def amd_certs(self) -> bytes:
        """ASK ‖ ARK, the SEND_START amd_certs layout."""
        return self.ask.encode() + self.ark.encode()

    @property
    def chip_id(self) -> str:
        """`chip_id(self.cek)`: what this platform's TLS certificate names."""
        return chip_id(self.cek)

    @property
    def platform_id(self) -> str:
        """Hex SHA-256 of the PEK certificate: names this platform (changes on PEK_GEN)."""
        h = hashes.Hash(hashes.SHA256())
        h.update(self.pek.encode())
        return h.finalize().hex()

    # -- serialisation ------------------------------------------------------------------------

    def to_files(self) -> dict[str, bytes]:
        files = self.chain_files()
        files["cek.key"] = _key_pem(self.cek_private)
        if self.oca_private is not None:
            files["oca.key"] = _key_pem(self.oca_private)
        files["pek.key"] = _key_pem(self.pek_private)
        files["pdh.key"] = _key_pem(self.pdh_private)
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> PlatformIdentity:
        """Rebuild from `to_files()` output, checking every key against its certificate and the chain."""
        ark, ask = _load_amd(files, "ark.cert"), _load_amd(files, "ask.cert")
        certs = {n: _load_sev(files, f"{n}.cert") for n in ("cek", "oca", "pek", "pdh")}
        # No oca.key = externally owned (PEK_CERT_IMPORT): the OCA certificate is the fleet owner's.
        names = ("cek", "oca", "pek", "pdh") if "oca.key" in files else ("cek", "pek", "pdh")
        keys = {n: _load_key(files, f"{n}.key", ec.EllipticCurvePrivateKey) for n in names}
        keys.setdefault("oca", None)
        for n in names:
            _check_ec_pair(f"{n}.key", certs[n], keys[n])
        ident = cls(
            ark, ask, certs["cek"], certs["oca"], certs["pek"], certs["pdh"],
            keys["cek"], keys["oca"], keys["pek"], keys["pdh"],
        )
        try:
            verify_platform_chain(ark, ask, ident.cek, ident.oca, ident.pek, ident.pdh, trusted_arks=[ark])
        except ChainError as exc:
            raise IdentityError(exc.link, str(exc)) from exc
        return ident
