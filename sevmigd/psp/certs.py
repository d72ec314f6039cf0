"""SEV and AMD certificate codecs, and the signature primitives that sign and verify them.

Owns: the byte layouts of reference §5.1 (SEV certificate, 0x824 bytes) and §5.2 (AMD ARK/ASK
certificate, 832 or 1600 bytes), little-endian big numbers, ECDSA P-384 and RSA-PSS signing and
verification with the firmware's signature-slot rules (§2.6, §5.3).

Must never: make trust decisions (which root is trusted, which signer may sign which certificate:
that is `sevmigd.psp.chain`), do I/O, or raise anything but `SevError` on malformed input — every
certificate is attacker-controlled input on the migration path.

Canonical-encoding choice (reference §9 leaves it open; this is ours, tested in tests/test_certs.py):

* Decoding is structural. `SevCert.decode` rejects only a wrong length (INVALID_LENGTH) and a non-zero
  reserved field at 0x006 (INVALID_CERTIFICATE), so every accepted input re-encodes byte-exactly.
  `AmdCert.decode` additionally requires VERSION = 1, sizes in {2048, 4096} and a zero reserved field
  (INVALID_CERTIFICATE) because the layout itself depends on those fields.
* Public keys are strict: an EC key must be on curve P-384 (id 2), with each coordinate < p, its 24
  padding bytes and the 880 reserved bytes zero, else INVALID_CERTIFICATE. (This matters for the PDH,
  whose bytes are not covered by any signature on RECEIVE_START.)
* Signature fields of a *used* slot are strict: ECDSA r and s must lie in [1, n-1] (so a non-zero
  padding byte, which makes the value >= 2**384 > n, fails) and the 368 reserved bytes must be zero;
  an RSA signature's bytes above the modulus size must be zero. Any violation is BAD_SIGNATURE, the
  status a failed matching slot gives. Hence every single-byte change to a signed body or to a used
  signature slot (header or value) is rejected. The data of an *unused* slot (usage INVALID, algo
  INVALID) is ignored, as the firmware ignores it; its header bytes are still protected by the
  "exactly one of usage/algo INVALID → BAD_SIGNATURE" rule.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from typing import Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from sevmigd.psp.status import SevError, SevStatus


class Usage(enum.IntEnum):
    """Key usage codes (reference §5.1)."""

    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algo(enum.IntEnum):
    """Algorithm ids (reference §5.1); "RSA" is RSA-PSS."""

    INVALID = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103


SEV_CERT_SIZE = 0x824
SEV_CERT_BODY_SIZE = 0x414
SEV_PUBKEY_SIZE = 0x404
SEV_SIG_SIZE = 0x200
SEV_SIG1_OFFSET = 0x414
SEV_SIG2_OFFSET = 0x61C

# EC public key layout inside the 0x404 union, and the signature layout inside a 0x200 slot.
EC_CURVE_P384 = 2
EC_COORD_FIELD = 72  # 48 value bytes + 24 zero bytes
EC_COORD_BYTES = 48
ECDSA_RS_FIELD = 72
RSA_FIELD = 512

AMD_CERT_FIXED_SIZE = 0x40
AMD_KEY_SIZES = (2048, 4096)
# Signed (and unsigned) sizes of the AMD certs that exist: 2K Naples, 4K Rome and later.
AMD_CERT_SIZES = {64 + 3 * 256: 2048, 64 + 3 * 512: 4096}
AMD_CERT_UNSIGNED_SIZES = {64 + 2 * 256: 2048, 64 + 2 * 512: 4096}

_P384_P = 2**384 - 2**128 - 2**96 + 2**32 - 1
_P384_N = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)

_ECDSA_ALGOS = (Algo.ECDSA_SHA256, Algo.ECDSA_SHA384)
_ECDH_ALGOS = (Algo.ECDH_SHA256, Algo.ECDH_SHA384)
_RSA_ALGOS = (Algo.RSA_SHA256, Algo.RSA_SHA384)


def _hash_for(algo: int) -> hashes.HashAlgorithm:
    if algo in (Algo.RSA_SHA256, Algo.ECDSA_SHA256, Algo.ECDH_SHA256):
        return hashes.SHA256()
    if algo in (Algo.RSA_SHA384, Algo.ECDSA_SHA384, Algo.ECDH_SHA384):
        return hashes.SHA384()
    raise SevError(SevStatus.INVALID_CERTIFICATE, f"no hash for algorithm 0x{algo:x}")


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def _pss(h: hashes.HashAlgorithm) -> padding.PSS:
    # Salt length = hash length, MGF1 with the same hash (reference §5.1/§5.2).
    return padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)


def _name(enum_cls, value: int) -> str:
    try:
        return enum_cls(value).name
    except ValueError:
        return f"0x{value:x}"


# ---------------------------------------------------------------------------------------------
# SEV certificate
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SevCert:
    """One SEV certificate (reference §5.1). Raw union/slot bytes are kept as they came."""

    version: int
    api_major: int
    api_minor: int
    pubkey_usage: int
    pubkey_algo: int
    pubkey: bytes
    sig1_usage: int = Usage.INVALID
    sig1_algo: int = Algo.INVALID
    sig1: bytes = bytes(SEV_SIG_SIZE)
    sig2_usage: int = Usage.INVALID
    sig2_algo: int = Algo.INVALID
    sig2: bytes = bytes(SEV_SIG_SIZE)

    def __post_init__(self) -> None:
        if len(self.pubkey) != SEV_PUBKEY_SIZE or len(self.sig1) != SEV_SIG_SIZE or len(self.sig2) != SEV_SIG_SIZE:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "SEV certificate field of wrong size")

    @classmethod
    def decode(cls, data: bytes) -> SevCert:
        data = bytes(data)
        if len(data) != SEV_CERT_SIZE:
            raise SevError(
                SevStatus.INVALID_LENGTH,
                f"SEV certificate must be {SEV_CERT_SIZE} bytes, got {len(data)}",
            )
        version, api_major, api_minor, reserved, usage, algo = struct.unpack_from("<IBBHII", data, 0)
        if reserved != 0:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "SEV certificate reserved field (0x006) is not zero")
        s1u, s1a = struct.unpack_from("<II", data, SEV_SIG1_OFFSET)
        s2u, s2a = struct.unpack_from("<II", data, SEV_SIG2_OFFSET)
        return cls(
            version=version,
            api_major=api_major,
            api_minor=api_minor,
            pubkey_usage=usage,
            pubkey_algo=algo,
            pubkey=data[0x10:0x414],
            sig1_usage=s1u,
            sig1_algo=s1a,
            sig1=data[SEV_SIG1_OFFSET + 8 : SEV_SIG1_OFFSET + 8 + SEV_SIG_SIZE],
            sig2_usage=s2u,
            sig2_algo=s2a,
            sig2=data[SEV_SIG2_OFFSET + 8 : SEV_SIG2_OFFSET + 8 + SEV_SIG_SIZE],
        )

    def body(self) -> bytes:
        """The signed bytes 0x000–0x413."""
        return (
            struct.pack("<IBBHII", self.version, self.api_major, self.api_minor, 0, self.pubkey_usage, self.pubkey_algo)
            + self.pubkey
        )

    def encode(self) -> bytes:
        return (
            self.body()
            + struct.pack("<II", self.sig1_usage, self.sig1_algo)
            + self.sig1
            + struct.pack("<II", self.sig2_usage, self.sig2_algo)
            + self.sig2
        )

    # -- keys ---------------------------------------------------------------------------------

    def ec_public_key(self) -> ec.EllipticCurvePublicKey:
        """The P-384 public key; anything else (wrong algo/curve, bad padding, off-curve) → INVALID_CERTIFICATE."""
        if self.pubkey_algo not in _ECDSA_ALGOS + _ECDH_ALGOS:
            raise SevError(SevStatus.INVALID_CERTIFICATE, f"public key algorithm 0x{self.pubkey_algo:x} is not EC")
        return ec_public_key_from_union(self.pubkey)

    def slots(self) -> tuple[tuple[int, int, bytes], tuple[int, int, bytes]]:
        return ((self.sig1_usage, self.sig1_algo, self.sig1), (self.sig2_usage, self.sig2_algo, self.sig2))

    def with_slot(self, index: int, usage: int, algo: int, sig: bytes) -> SevCert:
        """A copy with signature slot `index` (1 or 2) replaced."""
        if index == 1:
            return dataclasses.replace(self, sig1_usage=usage, sig1_algo=algo, sig1=sig)
        if index == 2:
            return dataclasses.replace(self, sig2_usage=usage, sig2_algo=algo, sig2=sig)
        raise ValueError("signature slot is 1 or 2")

    def without_signatures(self) -> SevCert:
        """Both slots empty (usage INVALID, algo INVALID), like the firmware's exported CEK (§2.4)."""
        empty = bytes(SEV_SIG_SIZE)
        return dataclasses.replace(
            self,
            sig1_usage=Usage.INVALID, sig1_algo=Algo.INVALID, sig1=empty,
            sig2_usage=Usage.INVALID, sig2_algo=Algo.INVALID, sig2=empty,
        )

    def describe(self) -> dict:
        """Human/JSON view (hex for byte strings)."""
        out: dict = {
            "type": "sev",
            "version": self.version,
            "api": f"{self.api_major}.{self.api_minor}",
            "pubkey_usage": _name(Usage, self.pubkey_usage),
            "pubkey_algo": _name(Algo, self.pubkey_algo),
        }
        if self.pubkey_algo in _ECDSA_ALGOS + _ECDH_ALGOS:
            curve, = struct.unpack_from("<I", self.pubkey, 0)
            out["curve"] = curve
            out["qx"] = self.pubkey[4 : 4 + EC_COORD_BYTES][::-1].hex()
            out["qy"] = self.pubkey[0x4C : 0x4C + EC_COORD_BYTES][::-1].hex()
        else:
            out["pubkey"] = self.pubkey.hex()
        for i, (u, a, s) in enumerate(self.slots(), 1):
            out[f"sig{i}_usage"] = _name(Usage, u)
            out[f"sig{i}_algo"] = _name(Algo, a)
            if a in _ECDSA_ALGOS:  # big-endian r and s, as other tools print them (48 bytes unless padded)
                for part, field in (("r", s[:ECDSA_RS_FIELD]), ("s", s[ECDSA_RS_FIELD : 2 * ECDSA_RS_FIELD])):
                    shown = field if any(field[EC_COORD_BYTES:]) else field[:EC_COORD_BYTES]
                    out[f"sig{i}_{part}"] = shown[::-1].hex()
            elif any(s):
                out[f"sig{i}"] = s.hex()  # raw little-endian field
        return out


def ec_public_key_from_union(union: bytes) -> ec.EllipticCurvePublicKey:
    curve, = struct.unpack_from("<I", union, 0)
    if curve != EC_CURVE_P384:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"unsupported curve id {curve} (only P-384 = 2)")
    qx_field = union[4 : 4 + EC_COORD_FIELD]
    qy_field = union[0x4C : 0x4C + EC_COORD_FIELD]
    if any(qx_field[EC_COORD_BYTES:]) or any(qy_field[EC_COORD_BYTES:]) or any(union[0x94:]):
        raise SevError(SevStatus.INVALID_CERTIFICATE, "EC public key padding/reserved bytes are not zero")
    x = int.from_bytes(qx_field, "little")
    y = int.from_bytes(qy_field, "little")
    if x >= _P384_P or y >= _P384_P:
        raise SevError(SevStatus.INVALID_CERTIFICATE, "EC coordinate out of range")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    except ValueError as exc:
        raise SevError(SevStatus.INVALID_CERTIFICATE, "EC point is not on P-384") from exc


def ec_union_from_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    if not isinstance(key.curve, ec.SECP384R1):
        raise ValueError("only P-384 keys go into SEV certificates")
    nums = key.public_numbers()
    out = struct.pack("<I", EC_CURVE_P384) + _le(nums.x, EC_COORD_FIELD) + _le(nums.y, EC_COORD_FIELD)
    return out + bytes(SEV_PUBKEY_SIZE - len(out))


def new_sev_cert(key: ec.EllipticCurvePublicKey, *, usage: int, algo: int, api_major: int, api_minor: int) -> SevCert:
    """An unsigned SEV certificate (both slots empty) for an EC public key."""
    return SevCert(
        version=1,
        api_major=api_major,
        api_minor=api_minor,
        pubkey_usage=usage,
        pubkey_algo=algo,
        pubkey=ec_union_from_public_key(key),
    )


# ---------------------------------------------------------------------------------------------
# AMD certificate (ARK / ASK)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AmdCert:
    """An AMD root (ARK) or signing (ASK) certificate (reference §5.2). pubexp/modulus are ints."""

    key_id: bytes
    certifying_id: bytes
    key_usage: int
    pubexp_bits: int
    modulus_bits: int
    pubexp: int
    modulus: int
    signature: bytes | None  # modulus_bits/8 bytes, little-endian as stored; None = unsigned (Naples ARK)

    @classmethod
    def decode(cls, data: bytes, *, allow_unsigned: bool = False) -> AmdCert:
        data = bytes(data)
        if len(data) < AMD_CERT_FIXED_SIZE:
            raise SevError(SevStatus.INVALID_LENGTH, f"AMD certificate too short ({len(data)} bytes)")
        version, = struct.unpack_from("<I", data, 0)
        if version != 1:
            raise SevError(SevStatus.INVALID_CERTIFICATE, f"AMD certificate version {version} (expected 1)")
        key_id = data[0x04:0x14]
        certifying_id = data[0x14:0x24]
        key_usage, = struct.unpack_from("<I", data, 0x24)
        if any(data[0x28:0x38]):
            raise SevError(SevStatus.INVALID_CERTIFICATE, "AMD certificate reserved field is not zero")
        pubexp_bits, modulus_bits = struct.unpack_from("<II", data, 0x38)
        if pubexp_bits not in AMD_KEY_SIZES or modulus_bits not in AMD_KEY_SIZES:
            raise SevError(
                SevStatus.INVALID_CERTIFICATE,
                f"AMD certificate key sizes {pubexp_bits}/{modulus_bits} bits (must be 2048 or 4096)",
            )
        e_len, n_len = pubexp_bits // 8, modulus_bits // 8
        unsigned_len = AMD_CERT_FIXED_SIZE + e_len + n_len
        signed_len = unsigned_len + n_len
        if len(data) == signed_len:
            signature: bytes | None = data[unsigned_len:]
        elif len(data) == unsigned_len and allow_unsigned:
            signature = None
        elif len(data) == unsigned_len:
            raise SevError(
                SevStatus.INVALID_LENGTH,
                f"AMD certificate of {len(data)} bytes has no signature (expected {signed_len}); "
                "decode with allow_unsigned=True to read it anyway",
            )
        else:
            raise SevError(
                SevStatus.INVALID_LENGTH,
                f"AMD certificate with {modulus_bits}-bit key must be {signed_len} bytes, got {len(data)}",
            )
        off = AMD_CERT_FIXED_SIZE
        pubexp = int.from_bytes(data[off : off + e_len], "little")
        modulus = int.from_bytes(data[off + e_len : off + e_len + n_len], "little")
        return cls(key_id, certifying_id, key_usage, pubexp_bits, modulus_bits, pubexp, modulus, signature)

    def signed_part(self) -> bytes:
        """Everything before SIGNATURE (also the input of the fused root-key hash)."""
        if len(self.key_id) != 16 or len(self.certifying_id) != 16:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "AMD key ids are 16 bytes")
        try:
            return (
                struct.pack("<I", 1)
                + self.key_id
                + self.certifying_id
                + struct.pack("<I", self.key_usage)
                + bytes(16)
                + struct.pack("<II", self.pubexp_bits, self.modulus_bits)
                + _le(self.pubexp, self.pubexp_bits // 8)
                + _le(self.modulus, self.modulus_bits // 8)
            )
        except OverflowError as exc:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "AMD certificate number does not fit its field") from exc

    def encode(self) -> bytes:
        if self.signature is None:
            return self.signed_part()
        return self.signed_part() + self.signature

    def with_signature(self, signature: bytes | None) -> AmdCert:
        return dataclasses.replace(self, signature=signature)

    def rsa_public_key(self) -> rsa.RSAPublicKey:
        try:
            return rsa.RSAPublicNumbers(self.pubexp, self.modulus).public_key()
        except ValueError as exc:
            raise SevError(SevStatus.INVALID_CERTIFICATE, f"AMD certificate RSA key is invalid: {exc}") from exc

    @property
    def hash_algo(self) -> hashes.HashAlgorithm:
        """Hash of the PSS signatures this key makes: SHA-256 for 2K (Naples), SHA-384 for 4K."""
        return hashes.SHA256() if self.modulus_bits == 2048 else hashes.SHA384()

    @property
    def sev_algo(self) -> Algo:
        """The algorithm id this key has when acting as an SEV-style signer (CEK signature, §5.2)."""
        return Algo.RSA_SHA256 if self.modulus_bits == 2048 else Algo.RSA_SHA384

    def describe(self) -> dict:
        return {
            "type": "amd",
            "key_id": self.key_id.hex(),
            "certifying_id": self.certifying_id.hex(),
            "key_usage": _name(Usage, self.key_usage),
            "pubexp_bits": self.pubexp_bits,
            "modulus_bits": self.modulus_bits,
            "pubexp": self.pubexp,
            "modulus": f"{self.modulus:x}",
            "signature": None if self.signature is None else self.signature.hex(),
        }


# ---------------------------------------------------------------------------------------------
# Signing
# ---------------------------------------------------------------------------------------------

SigningKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


def sign_sev_slot(data: bytes, key: SigningKey, algo: int) -> bytes:
    """The 0x200-byte slot content signing `data` with `key` under `algo` (ECDSA or RSA-PSS)."""
    h = _hash_for(algo)
    if algo in _ECDSA_ALGOS:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("ECDSA algorithm needs an EC key")
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h)))
        out = _le(r, ECDSA_RS_FIELD) + _le(s, ECDSA_RS_FIELD)
    elif algo in _RSA_ALGOS:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError("RSA algorithm needs an RSA key")
        out = key.sign(data, _pss(h), h)[::-1]
    else:
        raise ValueError(f"algorithm 0x{algo:x} cannot sign")
    return out + bytes(SEV_SIG_SIZE - len(out))


def sign_sev_cert(cert: SevCert, slot: int, key: SigningKey, usage: int, algo: int) -> SevCert:
    """Return `cert` with slot `slot` holding a signature by `key` (whose usage/algo are given)."""
    return cert.with_slot(slot, usage, algo, sign_sev_slot(cert.body(), key, algo))


def sign_amd_cert(cert: AmdCert, key: rsa.RSAPrivateKey, hash_algo: hashes.HashAlgorithm) -> AmdCert:
    sig_be = key.sign(cert.signed_part(), _pss(hash_algo), hash_algo)
    return cert.with_signature(sig_be[::-1])


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Signer:
    """A signing key as the firmware sees it: (usage, algo) select the slot, `verify` checks it.

    `verify(data, slot_bytes) -> bool` must return False (never raise) for a bad signature.
    """

    usage: int
    algo: int
    verify: Callable[[bytes, bytes], bool]


def _ecdsa_verifier(key: ec.EllipticCurvePublicKey, algo: int) -> Callable[[bytes, bytes], bool]:
    h = _hash_for(algo)

    def verify(data: bytes, slot: bytes) -> bool:
        r = int.from_bytes(slot[:ECDSA_RS_FIELD], "little")
        s = int.from_bytes(slot[ECDSA_RS_FIELD : 2 * ECDSA_RS_FIELD], "little")
        if not (0 < r < _P384_N and 0 < s < _P384_N) or any(slot[2 * ECDSA_RS_FIELD :]):
            return False
        try:
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(h))
        except InvalidSignature:
            return False
        return True

    return verify


def _rsa_verifier(key: rsa.RSAPublicKey, algo: int) -> Callable[[bytes, bytes], bool]:
    h = _hash_for(algo)
    nbytes = (key.key_size + 7) // 8

    def verify(data: bytes, sig_le: bytes) -> bool:
        if len(sig_le) < nbytes or any(sig_le[nbytes:]):
            return False
        try:
            key.verify(sig_le[:nbytes][::-1], data, _pss(h), h)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


def sev_signer(cert: SevCert) -> Signer:
    """The SEV certificate's key as a signer (OCA, PEK, CEK): must be an ECDSA key."""
    if cert.pubkey_algo not in _ECDSA_ALGOS:
        raise SevError(
            SevStatus.INVALID_CERTIFICATE,
            f"{_name(Usage, cert.pubkey_usage)} key with algorithm {_name(Algo, cert.pubkey_algo)} cannot sign",
        )
    return Signer(cert.pubkey_usage, cert.pubkey_algo, _ecdsa_verifier(cert.ec_public_key(), cert.pubkey_algo))


def ask_signer(ask: AmdCert) -> Signer:
    """The ASK acting as an SEV-style RSA key for the CEK (§5.2): usage 0x13, algo 0x001 (2K) / 0x101 (4K)."""
    algo = ask.sev_algo
    return Signer(Usage.ASK, algo, _rsa_verifier(ask.rsa_public_key(), algo))


def sev_signature_status(cert: SevCert, signer: Signer) -> SevStatus:
    """The firmware's slot walk (§2.6): the status of the last matching slot, INVALID_CERTIFICATE if none."""
    status = SevStatus.INVALID_CERTIFICATE
    body = cert.body()
    for usage, algo, sig in cert.slots():
        if (usage == Usage.INVALID) != (algo == Algo.INVALID):
            return SevStatus.BAD_SIGNATURE
        if usage != signer.usage or algo != signer.algo:
            continue
        status = SevStatus.SUCCESS if signer.verify(body, sig) else SevStatus.BAD_SIGNATURE
    return status


def verify_sev_cert(cert: SevCert, signer: Signer, what: str = "certificate") -> None:
    """Raise SevError(INVALID_CERTIFICATE | BAD_SIGNATURE) unless `signer` signed `cert`."""
    if cert.version != 1:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"{what}: version {cert.version} (expected 1)")
    status = sev_signature_status(cert, signer)
    if status is not SevStatus.SUCCESS:
        reason = (
            "no signature slot for the signer" if status is SevStatus.INVALID_CERTIFICATE else "signature does not verify"
        )
        raise SevError(
            status,
            f"{what}: {reason} ({_name(Usage, signer.usage)}, {_name(Algo, signer.algo)})",
        )


def amd_signature_valid(cert: AmdCert, signer: AmdCert) -> bool:
    """True when `signer`'s RSA-PSS signature over `cert`'s signed part verifies (no id/usage checks)."""
    if cert.signature is None or len(cert.signature) != signer.modulus_bits // 8:
        return False
    key = signer.rsa_public_key()
    h = signer.hash_algo
    try:
        key.verify(cert.signature[::-1], cert.signed_part(), _pss(h), h)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_amd_cert(cert: AmdCert, signer: AmdCert, what: str = "AMD certificate") -> None:
    """certifying_id = signer key_id (INVALID_CERTIFICATE), signature present and valid (BAD_SIGNATURE)."""
    if cert.certifying_id != signer.key_id:
        raise SevError(
            SevStatus.INVALID_CERTIFICATE,
            f"{what}: certifying id {cert.certifying_id.hex()} is not the signer's key id {signer.key_id.hex()}",
        )
    if cert.signature is None:
        raise SevError(SevStatus.INVALID_CERTIFICATE, f"{what}: unsigned")
    if not amd_signature_valid(cert, signer):
        raise SevError(SevStatus.BAD_SIGNATURE, f"{what}: RSA-PSS signature does not verify")


def decode_any(data: bytes, *, allow_unsigned: bool = False) -> SevCert | AmdCert:
    """Decode by size: 0x824 → SevCert, else an AMD certificate."""
    if len(data) == SEV_CERT_SIZE:
        return SevCert.decode(data)
    return AmdCert.decode(data, allow_unsigned=allow_unsigned)
