"""Channel-integrity crypto of the migration protocol (PROTOCOL.md §9): the wire layer's one importer of
`cryptography.hazmat`, offering three small recipes to connection.py.

* `KeyShare(rng)`: an ephemeral X25519 key whose private half comes from the injected rng (so tests and
  golden vectors are deterministic) and never leaves this object.
* `derive_keys(share, peer_public, transcript)`: HKDF-SHA256 over the X25519 shared secret, salted with the
  transcript hash of Hello and Accept, giving one HMAC key per direction and a printable session id.
* `new_mac(key)`: an HMAC-SHA256 object (stdlib hmac: faster than hazmat for many small frames).

Must never: log or return private keys or shared secrets; accept an all-zero shared secret (a small-order
peer point, which would make the MAC key public).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_SHARE_SIZE = 32
MAC_SIZE = 32
HKDF_INFO = b"sevmigd/1 channel keys"
TRANSCRIPT_LABEL = b"sevmigd/1 transcript"


class KeyShareError(ValueError):
    """The peer's key share is not a usable X25519 public key (connection.py maps it to a protocol error)."""


class KeyShare:
    """One side's ephemeral X25519 key pair for one connection."""

    def __init__(self, rng: Callable[[int], bytes]):
        self._private = X25519PrivateKey.from_private_bytes(bytes(rng(KEY_SHARE_SIZE)))
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def exchange(self, peer_public: bytes) -> bytes:
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        except ValueError as e:  # wrong length, or all-zero result (small-order point)
            raise KeyShareError(str(e)) from None
        if not any(shared):
            raise KeyShareError("all-zero X25519 shared secret")
        return shared


@dataclasses.dataclass(frozen=True, repr=False)
class ChannelKeys:
    """Per-direction HMAC keys (source->destination, destination->source) and a public session id."""

    s2d: bytes
    d2s: bytes
    session_id: str

    def __repr__(self):  # never print keys
        return f"ChannelKeys(session_id={self.session_id!r})"


def transcript_hash(hello_frame: bytes, accept_frame: bytes) -> bytes:
    """SHA-256 over the label and the two handshake frames exactly as sent (length prefix included)."""
    return hashlib.sha256(TRANSCRIPT_LABEL + bytes(hello_frame) + bytes(accept_frame)).digest()


def derive_keys(share: KeyShare, peer_public: bytes, transcript: bytes) -> ChannelKeys:
    shared = share.exchange(peer_public)
    okm = HKDF(algorithm=hashes.SHA256(), length=80, salt=transcript, info=HKDF_INFO).derive(shared)
    return ChannelKeys(s2d=okm[:32], d2s=okm[32:64], session_id=okm[64:80].hex())


def new_mac(key: bytes):
    return hmac.new(key, digestmod=hashlib.sha256)


def mac_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(bytes(a), bytes(b))
