"""Channel-integrity crypto of the migration protocol (PROTOCOL.md §9): the wire layer's one importer of
`cryptography.hazmat`, offering three small recipes to connection.py.

* `KeyShare(rng)`: an ephemeral X25519 key whose private half comes from the injected rng (so tests and
  golden vectors are deterministic) and never leaves this object.
* `derive_keys(share, peer_public, transcript)`: HKDF-SHA256 over the X25519 shared secret, salted with the
  transcript hash of Hello and Accept, giving one HMAC key per direction and a printable session id.
* `MacKey(key)`: HMAC-SHA256 with precomputed inner/outer states (`start(seq)`, `finish(h)`): the per-frame
  MAC on the page path costs two C-level hash copies.
* `GmacKey(key)`: the same interface for the negotiated feature `FEATURE_GMAC` (PROTOCOL.md §9.6): AES-256
  GMAC with the frame's seq as nonce, ~20x cheaper than HMAC-SHA256 per byte here (AES-NI + carry-less
  multiply: 0.18 vs 4 us per 4 KiB), which matters for shared pages, whose plaintext the frame MAC covers.

Must never: log or return private keys or shared secrets; accept an all-zero shared secret (a small-order
peer point, which would make the MAC key public).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_SHARE_SIZE = 32
MAC_SIZE = 32
#: Feature name (PROTOCOL.md §6, §9.6): both sides listing it switch the frame MAC to AES-256-GMAC.
FEATURE_GMAC = "mac-aes-gmac"
GMAC_TAG_SIZE = 16
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


class MacKey:
    """An HMAC-SHA256 key with its inner and outer hash states precomputed (RFC 2104), so that a frame's
    MAC costs two hash-object copies instead of a new HMAC object: this is per frame on the page path."""

    __slots__ = ("raw", "_inner", "_outer")

    def __init__(self, key: bytes):
        key = bytes(key)
        self.raw = key
        k = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(x ^ 0x36 for x in k))
        self._outer = hashlib.sha256(bytes(x ^ 0x5C for x in k))

    def start(self, seq: int | None = None):
        """A hash object to `update()` with the authenticated view; pass it to `finish`. (`seq` is part of
        the authenticated view already; GmacKey needs it as its nonce.)"""
        return self._inner.copy()

    def finish(self, inner) -> bytes:
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def __eq__(self, other):
        return isinstance(other, MacKey) and hmac.compare_digest(self.raw, other.raw)

    __hash__ = None

    def __repr__(self):  # never print keys
        return "MacKey(...)"


class _GmacState:
    """What GmacKey.start returns: `update(data)` authenticates `data` (GCM additional data)."""

    __slots__ = ("_enc", "_aad")

    def __init__(self, enc):
        self._enc = enc
        self._aad = enc.authenticate_additional_data

    def update(self, data) -> None:
        if type(data) is memoryview and data.format != "B":   # e.g. a numpy u64 column's .data
            data = data.cast("B")
        self._aad(data)


class GmacKey:
    """AES-256-GMAC frame MAC (feature FEATURE_GMAC, PROTOCOL.md §9.6): the tag of AES-256-GCM under K_dir
    with nonce LE64(seq) ‖ 0x00000000, empty plaintext and the authenticated view as additional data,
    sent as tag ‖ 16 zero bytes so the frame keeps its 32-byte `bin 8` MAC element.

    Nonces never repeat under a key: K_dir is fresh per connection and direction, and seq grows by one
    per frame in that direction (the receiver refuses any other seq before it looks at the MAC)."""

    __slots__ = ("raw", "_aes")

    def __init__(self, key: bytes):
        key = bytes(key)
        if len(key) != 32:
            raise ValueError("GMAC key must be 32 bytes (AES-256)")
        self.raw = key
        self._aes = algorithms.AES(key)

    def start(self, seq: int | None = None):
        if seq is None or not 0 <= seq < 1 << 64:
            raise ValueError("GMAC needs the frame's u64 seq as its nonce")
        nonce = seq.to_bytes(8, "little") + bytes(4)
        return _GmacState(Cipher(self._aes, modes.GCM(nonce)).encryptor())

    def finish(self, state: _GmacState) -> bytes:
        enc = state._enc
        enc.finalize()
        return enc.tag + bytes(MAC_SIZE - GMAC_TAG_SIZE)

    def __eq__(self, other):
        return isinstance(other, GmacKey) and hmac.compare_digest(self.raw, other.raw)

    __hash__ = None

    def __repr__(self):  # never print keys
        return "GmacKey(...)"


def mac_key(key) -> MacKey | GmacKey:
    return key if isinstance(key, (MacKey, GmacKey)) else MacKey(key)


def frame_keys(keys: "ChannelKeys", features) -> tuple[MacKey | GmacKey, MacKey | GmacKey]:
    """(s2d, d2s) MAC keys for the negotiated features."""
    cls = GmacKey if FEATURE_GMAC in features else MacKey
    return cls(keys.s2d), cls(keys.d2s)


def new_mac(key):
    """A stdlib hmac object (for tools and tests; the connection uses MacKey.start/finish). HMAC keys only."""
    if isinstance(key, GmacKey):
        raise TypeError("new_mac is for HMAC-SHA256 keys; use GmacKey.start(seq) / finish")
    return hmac.new(key.raw if isinstance(key, MacKey) else key, digestmod=hashlib.sha256)


def mac_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(bytes(a), bytes(b))
