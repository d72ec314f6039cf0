"""Framing and msgpack primitives of the migration channel (PROTOCOL.md §3).

A frame is `u32 big-endian body length ‖ body`; the body is one msgpack array
`[type, seq, field..., mac]`. This module owns:

* the receive buffer (`FrameBuffer`): a list of the caller's chunks, no copy on receive; the length prefix
  is checked against the limit as soon as its 4 bytes are there, before any of the body is waited for;
  for a large frame whose length is known the caller may instead read the rest of the body straight into
  its reassembly buffer (`direct_view` / `commit`: `recv_into`, no chunk, no copy);
* minimal msgpack encoders for the Pages fast path (`uint`, `bin_header`, `array_header`) that produce
  exactly the bytes msgpack-python's packer produces (the smallest encoding), and a `Reader` that parses
  the top-level array of any frame without copying (memoryview offsets), so the MAC can cover a byte
  range of the body and numpy can view the pfn columns in place;
* `strict_unpack`: msgpack-python with every limit set and no ext types, for the small messages.

Must never: buffer more than one frame beyond what the caller handed in; raise anything but
`FramingError` (the connection turns it into a RemoteProtocolError with the right code).
"""

from __future__ import annotations

import collections
import struct
import sys

import msgpack

from .errors import AbortCode

PREFIX = struct.Struct(">I")
MIN_BODY = 4  # the smallest valid body ([type, seq, mac] = 0x93 t s 0xc0) is 4 bytes


class FramingError(Exception):
    def __init__(self, code: AbortCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------------------
# encoders (identical to msgpack-python's output for the same values)

_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_SIGNED = (struct.Struct(">b"), struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">q"))


def uint(v: int) -> bytes:
    if v < 0x80:
        return bytes((v,))
    if v <= 0xFF:
        return b"\xcc" + _U8.pack(v)
    if v <= 0xFFFF:
        return b"\xcd" + _U16.pack(v)
    if v <= 0xFFFFFFFF:
        return b"\xce" + _U32.pack(v)
    return b"\xcf" + _U64.pack(v)


def bin_header(n: int) -> bytes:
    if n <= 0xFF:
        return b"\xc4" + _U8.pack(n)
    if n <= 0xFFFF:
        return b"\xc5" + _U16.pack(n)
    return b"\xc6" + _U32.pack(n)


def array_header(n: int) -> bytes:
    if n <= 15:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return b"\xdc" + _U16.pack(n)
    return b"\xdd" + _U32.pack(n)


MAC_PREFIX = b"\xc4\x20"  # bin 8 of length 32: how every channel MAC ends a body
NIL = b"\xc0"


# ---------------------------------------------------------------------------------------------------------
# zero-copy reader of the top-level array

class Reader:
    """Reads msgpack scalars from a body in place; any valid encoding of the expected type is accepted."""

    __slots__ = ("mv", "pos", "end")

    def __init__(self, body):
        self.mv = memoryview(body)
        self.pos = 0
        self.end = len(self.mv)

    def _need(self, n: int) -> int:
        p = self.pos
        if p + n > self.end:
            raise FramingError(AbortCode.PROTOCOL_ERROR, "truncated msgpack value")
        self.pos = p + n
        return p

    def array_header(self) -> int:
        p = self._need(1)
        c = self.mv[p]
        if 0x90 <= c <= 0x9F:
            return c & 0x0F
        if c == 0xDC:
            return _U16.unpack_from(self.mv, self._need(2))[0]
        if c == 0xDD:
            return _U32.unpack_from(self.mv, self._need(4))[0]
        raise FramingError(AbortCode.PROTOCOL_ERROR, f"frame body is not a msgpack array (0x{c:02x})")

    def uint(self, name: str) -> int:
        p = self._need(1)
        c = self.mv[p]
        if c < 0x80:
            return c
        if c == 0xCC:
            return self.mv[self._need(1)]
        if c == 0xCD:
            return _U16.unpack_from(self.mv, self._need(2))[0]
        if c == 0xCE:
            return _U32.unpack_from(self.mv, self._need(4))[0]
        if c == 0xCF:
            return _U64.unpack_from(self.mv, self._need(8))[0]
        if 0xD0 <= c <= 0xD3:  # int 8/16/32/64: valid msgpack for a non-negative value too (PROTOCOL.md §4)
            st = _SIGNED[c - 0xD0]
            v = st.unpack_from(self.mv, self._need(st.size))[0]
            if v >= 0:
                return v
        raise FramingError(AbortCode.PROTOCOL_ERROR, f"{name}: expected an unsigned integer (0x{c:02x})")

    def bin(self, name: str) -> tuple[int, int]:
        """Return (offset, length) of a bin payload inside the body."""
        p = self._need(1)
        c = self.mv[p]
        if c == 0xC4:
            n = self.mv[self._need(1)]
        elif c == 0xC5:
            n = _U16.unpack_from(self.mv, self._need(2))[0]
        elif c == 0xC6:
            n = _U32.unpack_from(self.mv, self._need(4))[0]
        else:
            raise FramingError(AbortCode.PROTOCOL_ERROR, f"{name}: expected bin (0x{c:02x})")
        return self._need(n), n


# ---------------------------------------------------------------------------------------------------------
# strict msgpack for the small messages

def _pairs_no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate map key")
    return d


def _no_ext(code, data):
    raise ValueError(f"msgpack ext type {code} is not allowed")


def strict_unpack(body, *, max_array: int, max_map: int):
    """Unpack one body with strict types: str must be UTF-8 (raw=False), map keys str (strict_map_key),
    no ext types, no duplicate map keys, bounded array/map lengths (memory), bin/str bounded by the body."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               object_pairs_hook=_pairs_no_duplicates, ext_hook=_no_ext,
                               max_ext_len=0, max_array_len=max_array, max_map_len=max_map,
                               max_str_len=len(body), max_bin_len=len(body))
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            msgpack.OutOfData, UnicodeDecodeError, RecursionError) as e:
        raise FramingError(AbortCode.PROTOCOL_ERROR, f"malformed msgpack body: {type(e).__name__}: {e}") from None


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ---------------------------------------------------------------------------------------------------------
# receive buffer

# Reassembly buffers (a frame spread over several reads is copied once into one of these). Reusing them
# matters: a fresh 1 MiB allocation per frame costs ~one page fault per 4 KiB page, more than the copy.
# A buffer is reused only when nothing refers to it any more (the Pages events handed out are read-only
# views into it), so a consumer that keeps events never sees them overwritten. At most POOL_BUFFERS of at
# most POOL_MAX_BYTES each are kept (= 6 MiB per connection at worst); larger frames use a fresh buffer.
POOL_BUFFERS = 6
POOL_MAX_BYTES = 1 << 20 | 1 << 18   # 1.25 MiB: a 256-page batch (~1.06 MiB) fits
_FREE_REFS = 3  # references to a free pooled buffer inside _pooled: the pool list, `buf`, getrefcount's arg


class FrameBuffer:
    """Accumulates the caller's chunks without copying and hands out whole frame bodies.

    The length prefix of the head frame is parsed as soon as 4 bytes are present (`check_prefix`), so an
    oversized frame is refused before a single byte of its body is waited for.
    """

    def __init__(self):
        self._pool: list[bytearray] = []
        self._chunks: collections.deque = collections.deque()
        self._off = 0          # offset of unread data in _chunks[0]
        self.buffered = 0      # bytes held
        self.need: int | None = None  # body length of the head frame, once its prefix was read
        self._direct: memoryview | None = None  # the head frame's reassembly buffer, while read into

    def feed(self, data: bytes) -> None:
        if not data:
            return
        d = self._direct
        if d is not None:      # the head frame is being read into its buffer: its bytes go there
            k = min(len(data), self.need - self.buffered)
            d[self.buffered:self.buffered + k] = memoryview(data)[:k] if k < len(data) else data
            self.buffered += k
            if k == len(data):
                return
            data = memoryview(data)[k:]
        self._chunks.append(data)
        self.buffered += len(data)

    def direct_view(self, min_bytes: int) -> memoryview | None:
        """A writable view of the rest of the head frame's body, for the caller to read into (then
        `commit(n)`), or None: length not known yet, frame shorter than `min_bytes`, or whole already.
        The body bytes buffered so far are moved into the frame's reassembly buffer (a pooled one, as
        for an assembled frame) the first time; `pop` then hands out a read-only view of it."""
        need = self.need
        if need is None or need < min_bytes or self.buffered >= need:
            return None
        if self._direct is None:
            mv = memoryview(self._pooled(need))
            pos = 0
            off = self._off
            for c in self._chunks:
                k = len(c) - off
                mv[pos:pos + k] = memoryview(c)[off:] if off else c
                pos += k
                off = 0
            self._chunks.clear()
            self._off = 0
            self._direct = mv
        return self._direct[self.buffered:need]

    def commit(self, n: int) -> None:
        """`n` bytes were written into the view `direct_view` returned."""
        if self._direct is None or n < 0 or self.buffered + n > self.need:
            raise ValueError("commit() without a direct read in progress, or past the frame")
        self.buffered += n

    def clear(self) -> None:
        self._chunks.clear()
        self._off = 0
        self.buffered = 0
        self.need = None
        self._direct = None

    def has_frame(self) -> bool:
        return self.need is not None and self.buffered >= self.need

    def check_prefix(self, limit: int) -> None:
        if self.need is None and self.buffered >= PREFIX.size:
            (n,) = PREFIX.unpack(self._take(PREFIX.size))
            if n > limit:
                raise FramingError(AbortCode.FRAME_TOO_LARGE,
                                   f"frame of {n} bytes announced, limit is {limit}")
            if n < MIN_BODY:
                raise FramingError(AbortCode.PROTOCOL_ERROR, f"frame body of {n} bytes is too short")
            self.need = n

    def pop(self):
        """The next whole body (bytes, or a read-only memoryview into one received chunk), or None."""
        if not self.has_frame():
            return None
        body = self._take(self.need)
        self.need = None
        return body

    def _take(self, n: int):
        if self._direct is not None:   # only ever the whole head frame (the prefix came before it)
            out = self._direct[:n].toreadonly()
            self._direct = None
            self.buffered -= n
            return out
        c = self._chunks[0]
        off = self._off
        avail = len(c) - off
        if avail >= n:
            # zero copy: a read-only view into the caller's chunk (which it keeps alive)
            out = c if off == 0 and avail == n else memoryview(c)[off:off + n]
            off += n
            if off == len(c):
                self._chunks.popleft()
                off = 0
            self._off = off
        else:
            parts = [memoryview(c)[off:]]
            self._chunks.popleft()
            need = n - avail
            while need:
                c = self._chunks[0]
                if len(c) <= need:
                    parts.append(c)
                    self._chunks.popleft()
                    need -= len(c)
                else:
                    parts.append(memoryview(c)[:need])
                    self._off = need
                    need = 0
                    break
            else:
                self._off = 0
            out = self._assemble(parts, n)
        self.buffered -= n
        return out

    def _pooled(self, n: int) -> bytearray:
        for buf in self._pool:
            if len(buf) >= n and sys.getrefcount(buf) <= _FREE_REFS:
                return buf
        buf = bytearray(max(n, 1 << 16))
        if n <= POOL_MAX_BYTES:
            if len(self._pool) >= POOL_BUFFERS:
                for i, old in enumerate(self._pool):  # replace a free buffer if there is one
                    if sys.getrefcount(old) <= _FREE_REFS:
                        self._pool[i] = buf
                        break
            else:
                self._pool.append(buf)
        return buf

    def _assemble(self, parts, n: int):
        if n < 4096:
            return b"".join(parts)
        mv = memoryview(self._pooled(n))  # memoryview slice assignment: a plain memcpy
        pos = 0
        for p in parts:
            k = len(p)
            mv[pos:pos + k] = p
            pos += k
        return mv[:n].toreadonly()
