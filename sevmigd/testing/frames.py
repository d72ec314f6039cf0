"""Frame splitting for test taps that sit on a migration stream (in-memory or TCP).

`pop_frames(buf)` takes every complete frame (4-byte big-endian length + msgpack body, as
PROTOCOL.md §2 frames them) off the front of `buf` and yields `(frame, msg_type)`, where
`msg_type` is the integer message type that opens the body's array, or -1 when the body cannot be
classified (a tap must still forward what a hostile or corrupted peer sent). Incomplete trailing
bytes stay in `buf` for the next read.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgpack

from sevmigd.wire.framing import PREFIX

# The type is the first element of the body's array: a few bytes are enough to read it.
_TYPE_PEEK = 32


def message_type(body: bytes) -> int:
    u = msgpack.Unpacker(raw=False)
    u.feed(body[:_TYPE_PEEK])
    try:
        u.read_array_header()
        t = u.unpack()
    except Exception:  # noqa: BLE001 - anything undecodable is "not a frame we can classify"
        return -1
    return t if isinstance(t, int) else -1


def pop_frames(buf: bytearray) -> Iterator[tuple[bytes, int]]:
    while len(buf) >= PREFIX.size:
        (size,) = PREFIX.unpack_from(buf)
        if len(buf) < PREFIX.size + size:
            return
        frame = bytes(buf[:PREFIX.size + size])
        del buf[:PREFIX.size + size]
        yield frame, message_type(frame[PREFIX.size:])
