"""The VMM socket protocol: length-prefixed msgpack request/reply between a daemon and a guest's VMM.

Sans-I/O (like `sevmigd.wire`): `encode` makes a frame, `FrameDecoder.feed` turns bytes into messages;
the daemon (blocking socket) and the VMM (trio) do the I/O. Versioned: the first request on every
connection is `hello` carrying `VMM_PROTOCOL`; the VMM's answer carries its own. A daemon that reads
another number reports the guest `incompatible` and leaves the VMM running, so the hello exchange must
stay readable by every version: a frame is a 4-byte big-endian length and a msgpack map, and the keys
"op", "id", "ok", "protocol", "pid", "name", "sevmigd" keep their meaning forever.

Requests: {"op": str, "id": int, ...arguments}. Replies: {"id": same, "ok": true, ...results} or
{"id", "ok": false, "error": {"type": str, "message": str}}. The hello reply also brings the guest's RAM
and state memfds as SCM_RIGHTS ancillary data (two descriptors, in that order).

Operations (`OPS`): hello, bind (the PSP handle and ASID of an incoming guest, after RECEIVE_START: the
manifest names them, so a restarted daemon knows whose context it is), boot (key slot, guest config, boot entropy: after LAUNCH_FINISH),
resume_incoming (key slot: after RECEIVE_FINISH), verify, guest_write, guest_read, guest_secret, reboot,
status, quit, inject_nmi (QEMU's inject-nmi: the guest kernel panics, the guest is `crashed`; added within
protocol 1: a daemon never needs it, an older VMM answers it with an unknown-operation error). Pause, resume, throttle, the dirty log and both bitmaps are not messages: they live in the
shared state area (sevmigd/guest/shared.py).

Must never: accept a frame longer than MAX_FRAME, or hand the caller something other than a dict with
an int id (VmmProtocolError otherwise).
"""

from __future__ import annotations

import hashlib
import struct

import msgpack

from sevmigd.errors import SevmigdError

#: Bump on any change a peer of the previous version could misread.
VMM_PROTOCOL = 1
#: Large enough for a guest_read of 16 MiB (hex is not used on this socket: bytes travel as bytes).
MAX_FRAME = 32 << 20
OPS = ("hello", "bind", "boot", "resume_incoming", "verify", "guest_write", "guest_read", "guest_secret", "reboot",
       "status", "quit", "inject_nmi")
_LEN = struct.Struct(">I")
#: The directory of VMM sockets (<id>.sock), manifests (<id>.json) and logs (<id>.log) in the runtime dir.
VMM_DIR = "vmm"


def vmm_id(name: str, nonce: bytes) -> str:
    """A short socket name (sun_path <= 107 bytes): 8 hex of SHA-256(name) and 8 of a nonce (two VMMs of
    one name can exist for a moment: a migrated guest's and its incoming copy's)."""
    return hashlib.sha256(name.encode()).hexdigest()[:8] + bytes(nonce[:4]).hex()


class VmmProtocolError(SevmigdError):
    """A frame or message that breaks the VMM protocol."""


def encode(msg: dict) -> bytes:
    """One frame: length ‖ msgpack(msg)."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise VmmProtocolError(f"message of {len(body)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, messages out. `feed(data) -> list[dict]`; `pending` = bytes of an unfinished frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise VmmProtocolError(f"frame of {n} bytes exceeds MAX_FRAME ({MAX_FRAME})")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            out.append(_decode(body))
        return out


def _decode(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types for garbage
        raise VmmProtocolError(f"frame is not msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise VmmProtocolError("a message is a map")
    mid = msg.get("id")
    if isinstance(mid, bool) or not isinstance(mid, int):
        raise VmmProtocolError("a message carries an integer id")
    return msg


def request(op: str, mid: int, **args) -> dict:
    if op not in OPS:
        raise VmmProtocolError(f"unknown operation {op!r}")
    return {"op": op, "id": mid, **args}


def reply(mid: int, **results) -> dict:
    return {"id": mid, "ok": True, **results}


def error_reply(mid: int, type_: str, message: str) -> dict:
    return {"id": mid, "ok": False, "error": {"type": str(type_), "message": str(message)}}


def check_request(msg: dict) -> str:
    """The request's operation (VmmProtocolError for an unknown one)."""
    op = msg.get("op")
    if op not in OPS:
        raise VmmProtocolError(f"unknown operation {op!r}")
    return op


def arg(msg: dict, key: str, kind: type | tuple[type, ...]):
    """msg[key] of type `kind` (VmmProtocolError naming the key otherwise); bool is never an int."""
    v = msg.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
        raise VmmProtocolError(f"{msg.get('op')}: {key} must be {'/'.join(k.__name__ for k in kinds)}")
    return v


__all__ = ["VMM_PROTOCOL", "VMM_DIR", "vmm_id", "MAX_FRAME", "OPS", "VmmProtocolError", "encode", "FrameDecoder", "request",
           "reply", "error_reply", "check_request", "arg"]
