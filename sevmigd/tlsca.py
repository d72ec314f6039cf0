"""The fleet's X.509 TLS CA and host certificates that name a SEV platform (pure: no file I/O).

Owns: creating the fleet TLS CA (ECDSA P-256, next to the emulated ARK/ASK in the fleet CA directory),
issuing a host's TLS key + certificate for the migration channel, and reading back which SEV platform a
certificate names. `sevmigd.store` writes the files; `sevmigd.daemon.tls` checks peers with it.

Why a certificate must name a platform: mutual TLS alone proves "a member of this fleet", not "the
platform whose chain it shows in Hello/Accept". A fleet member could present another platform's public
chain (`certs export`) and its own PDH, or a recorded Start. So every host certificate carries one SAN URI

    urn:sevmigd:platform:<chip id>

where chip id = `sevmigd.psp.identity.chip_id(cek)`: lowercase hex SHA-256 of the CEK certificate's
public key field. The CEK is the chip's own key (signed by the ASK), it signs the PEK, which signs the
PDH; it does not change on PEK_GEN, PDH_GEN or an owner re-signing the PEK, so the certificate outlives
those rotations. Each daemon checks that the peer's certificate names the chip whose CEK is in the chain
the peer presents (PROTOCOL.md §9.7): then TLS, the chain and the PDH all belong to one platform.

Must never: do file I/O, log, or put a private key in an exception message. Randomness is injected:
private keys and serial numbers come from `rng` (ECDSA signature nonces are OpenSSL's).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sevmigd.psp.certs import SevCert
from sevmigd.psp.identity import IdentityError, chip_id, derive_ec_key

Rng = Callable[[int], bytes]

PLATFORM_URI_PREFIX = "urn:sevmigd:platform:"
# File names inside the fleet CA directory (next to ark/ask.cert/.key).
CA_CERT_FILE = "tls-ca.crt"
CA_KEY_FILE = "tls-ca.key"
TLS_CA_FILES = (CA_CERT_FILE, CA_KEY_FILE)
# Validity: the CA ten years, a host certificate two years (renew with `sevmigd platform tls-cert`).
CA_DAYS = 3650
HOST_DAYS = 730
# Backdating absorbs clock skew between the issuing host and its peers.
BACKDATE = datetime.timedelta(hours=1)

class TlsIdentityError(IdentityError):
    """TLS CA or host certificate material that is missing, undecodable or inconsistent; `name` is the file."""


def _p256_key(rng: Rng) -> ec.EllipticCurvePrivateKey:
    return derive_ec_key(rng, ec.SECP256R1())


def _serial(rng: Rng) -> int:
    return (int.from_bytes(rng(16), "big") >> 1) or 1  # positive, < 2**127 (RFC 5280: <= 20 octets)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def platform_uri(chip: str) -> str:
    return PLATFORM_URI_PREFIX + chip


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass(frozen=True)
class TlsCA:
    """The fleet's TLS certificate authority: one ECDSA P-256 key and its self-signed certificate."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = dataclasses.field(repr=False)

    @classmethod
    def create(cls, rng: Rng, *, name: str = "sevmigd fleet TLS CA", now: datetime.datetime | None = None) -> TlsCA:
        key = _p256_key(rng)
        now = now or _now()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sevmigd"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(_serial(rng))
                .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    def to_files(self) -> dict[str, bytes]:
        return {CA_CERT_FILE: cert_pem(self.cert), CA_KEY_FILE: key_pem(self.key)}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> TlsCA:
        cert = load_cert(files, CA_CERT_FILE)
        try:
            key = serialization.load_pem_private_key(files[CA_KEY_FILE], password=None)
        except KeyError:
            raise TlsIdentityError(CA_KEY_FILE, "missing") from None
        except (ValueError, TypeError):
            raise TlsIdentityError(CA_KEY_FILE, "not a PKCS#8 PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TlsIdentityError(CA_KEY_FILE, f"wrong key type ({type(key).__name__}); expected ECDSA")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise TlsIdentityError(CA_KEY_FILE, "private key does not match tls-ca.crt")
        return cls(cert, key)

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def issue_host(self, cek: SevCert, rng: Rng, *, host_name: str | None = None,
                   now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
        """A TLS key and certificate (both PEM) for the host whose chip has this CEK.

        The certificate names the platform (SAN URI, see the module docstring) and is valid for client and
        server authentication (each daemon is both). Returns (key_pem, cert_pem).
        """
        chip = chip_id(cek)
        key = _p256_key(rng)
        now = now or _now()
        cn = host_name or f"sevmigd platform {chip[:16]}"
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sevmigd"),
                             x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(_serial(rng))
                .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=HOST_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(platform_uri(chip))]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return key_pem(key), cert_pem(cert)


def load_cert(files: dict[str, bytes], name: str) -> x509.Certificate:
    try:
        data = files[name]
    except KeyError:
        raise TlsIdentityError(name, "missing") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsIdentityError(name, "not a PEM X.509 certificate") from None


def named_platforms(cert: x509.Certificate | bytes) -> frozenset[str]:
    """The chip ids a certificate names (its `urn:sevmigd:platform:` SAN URIs); DER or a parsed cert.

    Never raises for a certificate the TLS layer accepted: an undecodable one names no platform.
    """
    try:
        if isinstance(cert, (bytes, bytearray, memoryview)):
            cert = x509.load_der_x509_certificate(bytes(cert))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return frozenset()
    out = set()
    for uri in uris:
        if uri.startswith(PLATFORM_URI_PREFIX):
            chip = uri[len(PLATFORM_URI_PREFIX):].lower()
            if len(chip) == 64 and all(c in "0123456789abcdef" for c in chip):
                out.add(chip)
    return frozenset(out)


__all__ = ["TlsCA", "TlsIdentityError", "named_platforms", "platform_uri", "load_cert", "PLATFORM_URI_PREFIX",
           "TLS_CA_FILES", "CA_CERT_FILE", "CA_KEY_FILE", "key_pem", "cert_pem"]
