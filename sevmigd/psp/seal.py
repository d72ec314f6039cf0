"""Sealing: the PSP's own authenticated encryption of the state it keeps outside itself.

Why: the PSP's per-guest contexts (keys, states, transport keys of an open migration) live in the PSP and
survive a restart of the host software that drives it (issue 17). The emulated PSP lives in the daemon
process, so its state must be written out and read back across a daemon restart, and the VMM process (the
emulated CPU) must get a guest's memory key without host-side code seeing it. Both go through a *sealed
blob*: AES-256-GCM under the PSP's 32-byte sealing key, which exists once per runtime directory (one per
"boot": a new runtime directory = a new key = every older blob unopenable, as a reboot clears the
hardware).

Blob layout (all integers little-endian), everything before the nonce is the AAD:

    magic "SVMGSEAL" (8) ‖ version u8 (1) ‖ kind u8 ‖ key id (8) ‖ binding length u16 ‖ binding
    ‖ nonce (12) ‖ AES-256-GCM ciphertext ‖ tag (16)

* `kind` says what the blob is (a guest context, a key slot, the ASID flush state): a blob of one kind
  never opens as another.
* `binding` is caller-chosen clear data the tag covers (a key slot's handle and ASID), readable without
  the key so an opener can check it is the blob it expects.
* `key id` = HMAC-SHA256(key, "sevmigd seal key id")[:8] tells a blob sealed under another key (another
  runtime directory: "foreign") from a damaged one, without revealing anything of the key.

Errors: `SealError`, a SevError (SECURE_DATA_INVALID for damaged or foreign blobs, UNSUPPORTED for another
format version) with `reason` in REASONS, so callers never see another exception type for any input.

Must never: put the key or a plaintext into a repr, an exception or a log; open a blob whose tag does not
verify; do I/O.
"""

from __future__ import annotations

import hmac
import struct
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .status import SevError, SevStatus

MAGIC = b"SVMGSEAL"
VERSION = 1
SEALING_KEY_SIZE = 32
KEY_ID_SIZE = 8
NONCE_SIZE = 12
TAG_SIZE = 16
_HEAD = struct.Struct("<8sBB8sH")     # magic, version, kind, key id, binding length
MAX_BINDING = 1024


class Kind:
    """What a sealed blob holds (its `kind` byte)."""

    GUEST_CONTEXT = 1
    KEY_SLOT = 2
    FLUSH_STATE = 3


#: Why a blob was refused: damaged (truncated, altered, not a sealed blob), foreign (sealed under another
#: key), version (another format version), kind (a blob of another kind), binding (not the blob the opener
#: asked for), conflict (the context it holds collides with one the firmware has).
REASONS = ("damaged", "foreign", "version", "kind", "binding", "conflict")


class SealError(SevError):
    """A sealed blob cannot be used. `status` a SevStatus, `reason` one of REASONS."""

    def __init__(self, status: SevStatus | int, reason: str, message: str = ""):
        assert reason in REASONS
        super().__init__(status, f"{reason}: {message}" if message else reason)
        self.reason = reason


def key_id(key: bytes) -> bytes:
    """The 8-byte public name of a sealing key (an HMAC of it: reveals nothing of the key)."""
    return hmac.digest(bytes(key), b"sevmigd seal key id", "sha256")[:KEY_ID_SIZE]


def check_key(key) -> bytes:
    """`key` as bytes when it is a 32-byte sealing key; SevError(INVALID_PARAM) otherwise."""
    if not isinstance(key, (bytes, bytearray, memoryview)) or len(key) != SEALING_KEY_SIZE:
        raise SevError(SevStatus.INVALID_PARAM, "a sealing key is 32 bytes")
    return bytes(key)


def seal(key: bytes, kind: int, plaintext: bytes, rng: Callable[[int], bytes], *, binding: bytes = b"") -> bytes:
    """Seal `plaintext` as a blob of `kind`, its clear `binding` authenticated with it."""
    key = check_key(key)
    binding = bytes(binding)
    if len(binding) > MAX_BINDING:
        raise SevError(SevStatus.INVALID_PARAM, "binding too long")
    nonce = bytes(rng(NONCE_SIZE))
    if len(nonce) != NONCE_SIZE:
        raise SevError(SevStatus.HWERROR_PLATFORM, "RNG returned the wrong number of bytes")
    head = _HEAD.pack(MAGIC, VERSION, kind, key_id(key), len(binding)) + binding
    return head + nonce + AESGCM(key).encrypt(nonce, bytes(plaintext), head)


def peek(blob, kind: int) -> bytes:
    """The clear binding of a blob of `kind`, NOT authenticated (open() checks it): to choose what to
    expect. SealError when the blob is not even shaped like a sealed blob of `kind`."""
    return _split(blob, kind)[1]


def _split(blob, kind: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(head, binding, nonce, ciphertext‖tag) of a blob of `kind`; SealError for anything else."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "a sealed blob is bytes")
    blob = bytes(blob)
    if len(blob) < _HEAD.size + NONCE_SIZE + TAG_SIZE:
        raise SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "too short for a sealed blob")
    magic, version, got_kind, _kid, blen = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "not a sealed blob (bad magic)")
    if version != VERSION:
        raise SealError(SevStatus.UNSUPPORTED, "version", f"format version {version}, this PSP reads {VERSION}")
    if got_kind != kind:
        raise SealError(SevStatus.SECURE_DATA_INVALID, "kind", f"a blob of kind {got_kind}, expected {kind}")
    end = _HEAD.size + blen
    if len(blob) < end + NONCE_SIZE + TAG_SIZE:
        raise SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "truncated")
    return blob[:end], blob[_HEAD.size:end], blob[end:end + NONCE_SIZE], blob[end + NONCE_SIZE:]


def open_blob(key: bytes, blob, kind: int, *, binding: bytes | None = None) -> tuple[bytes, bytes]:
    """(binding, plaintext) of a blob of `kind` sealed under `key`. With `binding`, the blob's must equal it.
    SealError for any blob that is not exactly what `seal` made under this key."""
    key = check_key(key)
    head, got_binding, nonce, body = _split(blob, kind)
    if head[10:10 + KEY_ID_SIZE] != key_id(key):
        raise SealError(SevStatus.SECURE_DATA_INVALID, "foreign",
                        "sealed under another PSP sealing key (another runtime directory or host)")
    if binding is not None and not hmac.compare_digest(got_binding, bytes(binding)):
        raise SealError(SevStatus.SECURE_DATA_INVALID, "binding", "the blob is bound to something else")
    try:
        plain = AESGCM(key).decrypt(nonce, body, head)
    except InvalidTag:
        raise SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "the authentication tag does not verify") from None
    return got_binding, plain


__all__ = ["Kind", "SealError", "REASONS", "SEALING_KEY_SIZE", "seal", "open_blob", "peek", "key_id",
           "check_key"]
