"""A fault-injecting TCP proxy for the migration channel (tests and the `make faults` matrix).

It sits between a source and a destination daemon on loopback and forwards bytes both ways,
frame-aware: it follows the wire framing of PROTOCOL.md §3-§5 (4-byte big-endian length, one msgpack
*array* body `[type, seq, field..., mac]` with integer type codes) so a fault can be scripted by byte
offset, by message type and by migration phase. Faults:

  reset        abort both TCP connections with RST (SO_LINGER 0)
  close        close both connections cleanly (FIN both ways)
  half_close   send FIN towards the receiver of the triggering frame (which is dropped), keep the
               other way open
  blackhole    stop forwarding in both directions and keep the sockets open (a dead peer that
               never closes: only keepalives / peer timeouts can detect it)
  corrupt      flip one byte of the triggering frame; `field` picks where: "length" (the 4-byte
               prefix), "body" (the array header, first body byte), "seq", "mac", or a message field
               name ("enc_data" ciphertext, "enc_headers" SEV packet headers, "shr_data" shared page,
               "bits" bitmap, "key_share", "session", ...): the field's bytes are located inside the
               raw frame by walking the msgpack array and one byte in their middle is flipped
  truncate     forward half of the triggering frame, then close
  duplicate    forward the triggering frame twice
  replay       forward the triggering frame, then an earlier frame of the same direction again
  reorder      hold the triggering frame and forward it after the next one
  delay        add `seconds` of one-way latency to everything after the trigger (a delay line: the
               throughput is unchanged, every byte just arrives later)
  rate         limit forwarding to `bytes_per_s` after the trigger (bandwidth collapse)
  drop_frame   silently drop the triggering frame (a lost message that TCP would never lose)
  call         call `action()` (e.g. SIGKILL/SIGSTOP a daemon), then forward the frame unless
               `hold` (then the frame is dropped: it never reaches its receiver)

Triggers (first match wins, each fault fires once): `byte_offset` (in `direction`), `msg_type` (its
`nth` occurrence in `direction`), or `phase` (the `nth` frame of that phase, see `PHASE_TRIGGERS`).

With `tls=(server_ctx, client_ctx)` (mutual TLS is the daemons' default) the proxy holds both hosts' TLS
keys: it answers the source as the destination and connects to the destination as the source, follows
the frames inside, and applies transport faults (reset, close, half_close, blackhole, delay, rate, call)
to the TCP legs as before. A network cannot touch a frame inside TLS, so the frame faults (corrupt,
truncate, duplicate, replay, reorder, drop_frame) degrade to what TLS makes of them: a damaged TLS record
(`BAD_RECORD`) on the raw TCP stream towards the receiver, which its TLS layer rejects (after the frame
itself for duplicate/replay, instead of it otherwise; then EOF for truncate). `inside=True` applies them
to the frames inside instead (an insider holding both keys: tests of the channel MAC and the PSP).

Every fired fault is recorded with its trio time (`fired_at`), so a test can bound detection time.
The proxy also captures every byte per direction (for the "no private plaintext on the wire" test).
Nothing here knows what a migration *should* do: it only breaks things on request.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import trio

from sevmigd.wire.framing import PREFIX

# Bytes the proxy holds per direction before it stops reading (TCP flow control then slows the sender, as
# a slow or long link would), and its socket buffers: together about what one more TCP hop holds, so a
# `rate` collapse is felt by the sender within a few MiB instead of hiding behind the proxy (with
# autotuned buffers and a deep queue the source could "send" a whole 16 MiB round into buffers, measure a
# bandwidth the link does not have, and pause the guest for a minute while it trickles through).
QUEUE_LIMIT = 256 << 10
SOCKET_BUFFER = 256 << 10
C2S = "c2s"  # source -> destination (the source connects to us)
S2C = "s2c"
# A TLS 1.2/1.3 application-data record whose AEAD tag cannot verify: what a flipped, replayed, reordered or
# lost record looks like to the receiving TLS layer (bad record MAC).
BAD_RECORD = b"\x17\x03\x03\x00\x20" + bytes(range(0x20))
# Frame faults that become a damaged TLS record when the proxy speaks TLS.
FRAME_FAULTS = ("corrupt", "truncate", "duplicate", "replay", "reorder", "drop_frame")
TLS_HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class _Raw:
    """Bytes for the TCP stream under TLS (the delay line sends them past the TLS layer)."""
    data: bytes

# Wire type codes (PROTOCOL.md §5, sevmigd.wire.messages.MsgType) by the names used in fault scripts.
TYPE_NAMES = {1: "hello", 2: "accept", 3: "refuse", 4: "start", 5: "pages", 6: "round_end", 7: "bitmap",
              8: "vcpu_state", 9: "complete", 10: "ready", 11: "go", 12: "started", 13: "keepalive",
              14: "abort", 15: "query", 16: "answer"}
# Field names in wire order after [type, seq] (PROTOCOL.md §5); every body ends with the mac.
FIELDS = {
    "hello": ("version", "features", "platform", "guest_name", "memory_bytes", "policy", "vcpus", "es",
              "migration_id", "key_share", "max_frame"),
    "accept": ("version", "features", "platform", "key_share", "max_frame"),
    "refuse": ("code", "reason"),
    "start": ("policy", "pdh", "session"),
    "pages": ("round", "enc_pfns", "enc_headers", "shr_pfns", "shr_data", "enc_data"),
    "round_end": ("round", "pages", "remaining"),
    "bitmap": ("npages", "bits"),
    "vcpu_state": ("regs", "vmsa_header", "vmsa"),
    "complete": ("pages_total",),
    "ready": (), "go": (), "started": (), "keepalive": (),
    "abort": ("code", "reason"),
    "query": ("magic", "version", "migration_id", "session_id"),
    "answer": ("session_id", "outcome", "reason"),
}

# Phases of a migration, in order, as the issue names them.
PHASES = ("handshake", "first_round", "later_round", "stop_copy", "readiness", "go", "confirmation")
# The frames a phase trigger counts (direction, predicate on (type name, pages round)); the fault fires
# on the nth of them. handshake: Hello; first_round: Pages of round 0; later_round: Pages of a pre-copy
# round >= 1; stop_copy: Bitmap then the frames after it up to Complete; readiness: Ready; go: Go;
# confirmation: Started.
PHASE_TRIGGERS: dict[str, tuple[str, Callable[[str, "_Dir"], bool]]] = {
    "handshake": (C2S, lambda t, d: t == "hello"),
    "first_round": (C2S, lambda t, d: t == "pages" and d.round == 0),
    "later_round": (C2S, lambda t, d: t == "pages" and d.round >= 1 and not d.stop_copy),
    "stop_copy": (C2S, lambda t, d: d.stop_copy and t in ("bitmap", "pages", "round_end", "vcpu_state",
                                                          "complete")),
    "readiness": (S2C, lambda t, d: t == "ready"),
    "go": (C2S, lambda t, d: t == "go"),
    "confirmation": (S2C, lambda t, d: t == "started"),
}


def _uint_at(b, p: int) -> tuple[int, int] | None:
    """(value, next offset) of a msgpack unsigned int at b[p], or None."""
    if p >= len(b):
        return None
    c = b[p]
    if c < 0x80:
        return c, p + 1
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(c)
    if width is None or p + 1 + width > len(b):
        return None
    return int.from_bytes(bytes(b[p + 1:p + 1 + width]), "big"), p + 1 + width


def _array_start(b) -> int | None:
    """Offset of the first element of the top-level array of body `b`, or None."""
    if not b:
        return None
    c = b[0]
    if 0x90 <= c <= 0x9F:
        return 1
    if c == 0xDC:
        return 3
    if c == 0xDD:
        return 5
    return None


def parse_head(body) -> tuple[str | None, int | None, int | None]:
    """(type name, seq, first uint field) of a frame body without decoding the rest; Nones when the body
    is not a frame of the real wire format. The first uint field is Pages.round / RoundEnd.round."""
    p = _array_start(body)
    if p is None:
        return None, None, None
    t = _uint_at(body, p)
    if t is None:
        return None, None, None
    name = TYPE_NAMES.get(t[0], f"type{t[0]}")
    s = _uint_at(body, t[1])
    if s is None:
        return name, None, None
    f = _uint_at(body, s[1])
    return name, s[0], (f[0] if f else None)


def frame_type(body: bytes) -> str | None:
    """The message type name of a frame body (see TYPE_NAMES), or None when it is not one."""
    return parse_head(body)[0]


def field_spans(body: bytes) -> dict[str, tuple[int, int]]:
    """Byte spans (start, end) inside `body` of each element of the top-level array, by name: "type",
    "seq", the message's fields (FIELDS) and "mac". For bin values the span is the payload only."""
    p = _array_start(body)
    if p is None:
        return {}
    name = frame_type(body)
    names = ["type", "seq", *FIELDS.get(name or "", ())]
    up = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=len(body) + 16)
    up.feed(body)
    out: dict[str, tuple[int, int]] = {}
    try:
        n = up.read_array_header()
        for i in range(n):
            start = up.tell()
            value = up.unpack()
            end = up.tell()
            key = names[i] if i < len(names) and i < n - 1 else ("mac" if i == n - 1 else f"extra{i}")
            if isinstance(value, bytes) and len(value) and end - start > len(value):
                start = end - len(value)  # payload of a bin (skip its header)
            out[key] = (start, end)
    except Exception:  # noqa: BLE001 - a garbage body simply has fewer known spans
        pass
    return out


@dataclass
class Fault:
    kind: str
    direction: str | None = None        # C2S / S2C / None = either
    msg_type: str | None = None         # trigger on this message type ...
    nth: int = 1                        # ... its nth occurrence in `direction` (or nth frame of `phase`)
    phase: str | None = None            # or on the nth trigger frame of this phase (PHASE_TRIGGERS)
    byte_offset: int | None = None      # or when this many bytes have crossed in `direction`
    field: str = "body"                 # for corrupt
    seconds: float = 0.0                # for delay
    bytes_per_s: float = 0.0            # for rate
    action: Callable[[], None] | None = None  # for call
    hold: bool = False                  # for call: drop the frame instead of forwarding it
    fired_at: float | None = None       # trio.current_time() when it fired
    fired_mono: float | None = None     # time.monotonic() when it fired (to compare with daemon logs)
    fired_info: str = ""
    phase_count: int = 0


@dataclass
class _Dir:
    name: str
    buf: bytearray = field(default_factory=bytearray)
    crossed: int = 0
    counts: dict = field(default_factory=dict)
    history: list = field(default_factory=list)   # raw frames forwarded (for replay)
    held: bytes | None = None                     # reorder
    capture: bytearray = field(default_factory=bytearray)
    pending: int = 0                              # chunks queued in the delay line, not yet sent
    queued: int = 0                               # bytes queued in the delay line, not yet sent
    conn: dict | None = None                      # both _Dirs of this direction's connection
    drained: trio.Event = field(default_factory=trio.Event)  # set whenever the sender sent a chunk
    round: int = 0                                # current pre-copy round (from Pages / RoundEnd)
    stop_copy: bool = False                       # Bitmap seen

    def reset(self) -> None:
        self.buf.clear()
        self.held = None
        self.crossed = 0
        self.counts.clear()
        self.history.clear()
        self.round = 0
        self.stop_copy = False
        self.pending = 0
        self.queued = 0


class FaultProxy:
    """`await nursery.start(proxy.serve)` returns the port; connections go to (target_host, target_port)."""

    def __init__(self, target_host: str, target_port: int, faults: list[Fault] | None = None,
                 *, capture: bool = False, max_capture: int = 64 << 20, host: str = "127.0.0.1",
                 tls: tuple | None = None, inside: bool = False):
        self.target = (target_host, target_port)
        self.tls = tls
        # With TLS: apply frame faults to the frames inside (an insider holding both hosts' keys) instead
        # of degrading them to a damaged record; tests of the channel MAC and the PSP use it.
        self.inside = inside
        self.host = host
        self.faults = list(faults or [])
        self.capture = capture
        self.max_capture = max_capture
        self.phase = "handshake"
        self.phases_seen: list[str] = ["handshake"]
        self.port: int | None = None
        self.connections = 0
        self.dirs = {C2S: _Dir(C2S), S2C: _Dir(S2C)}
        self._capture = {n: d.capture for n, d in self.dirs.items()}   # all connections, per direction
        self._delay = 0.0
        self._rate = 0.0
        self._blackholed = False
        self._transparent = False
        self._scopes: set[trio.CancelScope] = set()

    # -- public ---------------------------------------------------------------------------------
    def fired(self) -> list[Fault]:
        return [f for f in self.faults if f.fired_at is not None]

    def captured(self, direction: str = C2S) -> bytes:
        return bytes(self.dirs[direction].capture)

    def stop_faults(self) -> None:
        """The network is back: forget pending faults, no more delay/rate, and cut connections that are
        black-holed or half-closed (new connections are forwarded transparently)."""
        for f in self.faults:
            if f.fired_at is None:
                f.kind = "none"
        self._delay = 0.0
        self._rate = 0.0
        self._transparent = True
        if self._blackholed:
            for s in list(self._scopes):
                s.cancel()
        self._blackholed = False

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        for lst in listeners:  # inherited by the accepted sockets (the receive window they announce)
            lst.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            lst.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    # -- internals ------------------------------------------------------------------------------
    async def _handle(self, client: trio.SocketStream):
        self.connections += 1
        # Each connection follows its own frames. `self.dirs` are those of the migration connection: the
        # first one, then whichever sends a Hello (a settlement query's connection, PROTOCOL.md §7.6,
        # runs beside a migration connection that may still be open and must not disturb its counts).
        dirs = {n: _Dir(n, capture=self._capture[n]) for n in (C2S, S2C)}
        for d in dirs.values():
            d.conn = dirs
        if self.connections == 1:
            self.dirs = dirs
        try:
            server = await trio.open_tcp_stream(*self.target)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:
            await _abort(client)
            return
        if self.tls is not None:
            # https_compatible: a TCP FIN without close_notify (a daemon that closes with
            # aclose_forcefully) is an EOF like any network's, so the frames already queued for the other
            # side (e.g. the destination's last Started) are still delivered before the FIN, not dropped
            # by a BrokenResourceError that cancels both directions.
            client = trio.SSLStream(client, self.tls[0], server_side=True, https_compatible=True)
            server = trio.SSLStream(server, self.tls[1], server_hostname=None, https_compatible=True)
            try:
                with trio.fail_after(TLS_HANDSHAKE_TIMEOUT_S):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client.do_handshake)
                        nursery.start_soon(server.do_handshake)
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError, ExceptionGroup):
                # (ExceptionGroup: either handshake's failure, from the nursery; e.g. a settlement query
                # arriving while the destination daemon restarts)
                await _abort(client)
                await _abort(server)
                return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, dirs[C2S], scope)
                    nursery.start_soon(self._pump, server, client, dirs[S2C], scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._scopes.discard(scope)
        await _close_quietly(client)
        await _close_quietly(server)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, d: _Dir, scope):
        # A delay line per direction: chunks are stamped on arrival and sent `delay` later by `_sender`.
        send_ch, recv_ch = trio.open_memory_channel(math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender, recv_ch, dst, d, scope)
            await self._receiver(src, dst, d, scope, send_ch)

    async def _receiver(self, src, dst, d: _Dir, scope, send_ch):
        try:
            while True:
                while d.queued > QUEUE_LIMIT:
                    d.drained = trio.Event()
                    await d.drained.wait()
                data = await src.receive_some(1 << 16)
                if self._blackholed:
                    await trio.sleep_forever()
                if not data:
                    send_ch.send_nowait((None, trio.current_time()))
                    return
                d.buf += data
                await self._drain(d, src, dst, scope, send_ch)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    async def _sender(self, recv_ch, dst, d: _Dir, scope):
        try:
            async for data, t in recv_ch:
                if self._delay:
                    await trio.sleep_until(t + self._delay)
                if self._blackholed:
                    await trio.sleep_forever()
                if data is None:
                    try:
                        # Under TLS a FIN on the TCP stream, without close_notify: what a network does.
                        await getattr(dst, "transport_stream", dst).send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    return
                if isinstance(data, _Raw):
                    await dst.transport_stream.send_all(data.data)
                    d.pending -= 1
                    d.drained.set()
                    continue
                i = 0
                while i < len(data):
                    rate = self._rate  # may change at any checkpoint (stop_faults)
                    if rate:
                        chunk = data[i:i + (16 << 10)]
                        await trio.sleep(len(chunk) / rate)
                    else:
                        chunk = data[i:]
                    await dst.send_all(chunk)
                    i += len(chunk)
                d.pending -= 1
                d.queued -= len(data)
                d.drained.set()
                if self.capture and len(d.capture) < self.max_capture:
                    d.capture += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    def _match(self, d: _Dir, mtype: str | None, start: int, end: int) -> Fault | None:
        for f in self.faults:
            if f.fired_at is not None or f.kind == "none":
                continue
            if f.byte_offset is not None:
                if (f.direction is None or f.direction == d.name) and start <= f.byte_offset < end:
                    return f
                continue
            if f.msg_type is not None:
                if ((f.direction is None or f.direction == d.name) and mtype == f.msg_type
                        and d.counts.get(mtype, 0) == f.nth):
                    return f
                continue
            if f.phase is not None:
                trig = PHASE_TRIGGERS.get(f.phase)
                if trig is None or trig[0] != d.name or mtype is None or not trig[1](mtype, d):
                    continue
                f.phase_count += 1
                if f.phase_count == f.nth:
                    return f
        return None

    def _track(self, d: _Dir, mtype: str | None, first_uint: int | None) -> None:
        """Follow rounds and phases from the frames that cross (before the fault match)."""
        if mtype == "hello" and d.conn is not None and d.conn is not self.dirs:
            self.dirs = d.conn
        if mtype == "pages" and first_uint is not None:
            d.round = first_uint
        elif mtype == "bitmap":
            d.stop_copy = True
        phase = {"start": "first_round", "bitmap": "stop_copy", "ready": "readiness", "go": "go",
                 "started": "confirmation"}.get(mtype or "")
        if mtype == "pages" and d.round >= 1 and not d.stop_copy:
            phase = "later_round"
        if phase and PHASES.index(phase) > PHASES.index(self.phase):
            self.phase = phase
            self.phases_seen.append(phase)

    def _after(self, d: _Dir, mtype: str | None, first_uint: int | None) -> None:
        if mtype == "round_end" and first_uint is not None:
            d.round = first_uint + 1

    async def _drain(self, d: _Dir, src, dst, scope, out):
        while len(d.buf) >= PREFIX.size:
            (n,) = PREFIX.unpack_from(d.buf)
            total = PREFIX.size + n
            if n > (256 << 20):  # garbage length: forward raw, no framing to follow
                frame, mtype, first = bytes(d.buf), None, None
                d.buf.clear()
            elif len(d.buf) < total:
                return
            else:
                frame = bytes(d.buf[:total])
                del d.buf[:total]
                mtype, _seq, first = parse_head(frame[PREFIX.size:])
            if mtype is not None:
                d.counts[mtype] = d.counts.get(mtype, 0) + 1
            start = d.crossed
            d.crossed += len(frame)
            self._track(d, mtype, first)
            fault = None if self._transparent else self._match(d, mtype, start, d.crossed)
            if fault is None:
                self._forward(d, out, frame)
            else:
                fault.fired_at = trio.current_time()
                fault.fired_mono = time.monotonic()
                fault.fired_info = f"{d.name} {mtype} #{d.counts.get(mtype, 0)} phase={self.phase}"
                await self._apply(fault, d, src, dst, frame, scope, out)
            self._after(d, mtype, first)

    def _forward(self, d: _Dir, out, frame: bytes):
        if d.held is not None:
            held, d.held = d.held, None
            self._send(d, out, frame)
            self._send(d, out, held)
            return
        self._send(d, out, frame)

    def _send(self, d: _Dir, out, data: bytes):
        d.pending += 1
        d.queued += len(data)
        out.send_nowait((data, trio.current_time()))
        d.history.append(data)
        if len(d.history) > 64:
            del d.history[0]

    async def _apply(self, f: Fault, d: _Dir, src, dst, frame: bytes, scope, out):
        k = f.kind
        if self.tls is not None and not self.inside and k in FRAME_FAULTS:
            f.fired_info += " (inside TLS: a damaged TLS record)"
            if k in ("duplicate", "replay"):
                self._send(d, out, frame)
            d.pending += 1
            out.send_nowait((_Raw(BAD_RECORD), trio.current_time()))
            if k == "truncate":
                out.send_nowait((None, trio.current_time()))
                await trio.sleep_forever()
            return
        if k in ("reset", "close"):
            # what was forwarded before the fault leaves first (bounded: the peer may not be reading)
            with trio.move_on_after(1.0):
                while d.pending > 0:
                    await trio.sleep(0.005)
        if k == "reset":
            await _abort(src)
            await _abort(dst)
            scope.cancel()
        elif k == "close":
            await _close_quietly(src)
            await _close_quietly(dst)
            scope.cancel()
        elif k == "half_close":
            out.send_nowait((None, trio.current_time()))
            await trio.sleep_forever()
        elif k == "blackhole":
            self._blackholed = True
            await trio.sleep_forever()
        elif k == "corrupt":
            bad, where = corrupt_frame_info(frame, f.field)
            f.fired_info += f" corrupt {where}"
            self._send(d, out, bad)
        elif k == "truncate":
            self._send(d, out, frame[: max(1, len(frame) // 2)])
            out.send_nowait((None, trio.current_time()))  # EOF right after the half frame
            await trio.sleep_forever()
        elif k == "duplicate":
            self._send(d, out, frame)
            self._send(d, out, frame)
        elif k == "replay":
            earlier = d.history[-1] if d.history else frame
            self._send(d, out, frame)
            self._send(d, out, earlier)
        elif k == "reorder":
            d.held = frame
        elif k == "delay":
            self._delay = f.seconds
            self._send(d, out, frame)
        elif k == "rate":
            self._rate = f.bytes_per_s
            self._send(d, out, frame)
        elif k == "drop_frame":
            pass
        elif k == "call":
            if f.action is not None:
                f.action()
            if not f.hold:
                self._send(d, out, frame)
        else:
            self._send(d, out, frame)


def corrupt_frame_info(frame: bytes, where: str) -> tuple[bytes, str]:
    """Flip one byte of `frame` at the place `where` names (see the module docstring); returns the
    corrupted frame and a description of the byte flipped."""
    out = bytearray(frame)
    if where == "length":
        out[0] ^= 0x7F
        return bytes(out), "length prefix byte 0"
    body = frame[PREFIX.size:]
    if where == "body" or not body:
        out[PREFIX.size] ^= 0xFF
        return bytes(out), "body byte 0 (array header)"
    spans = field_spans(body)
    span = spans.get(where)
    if span is None or span[1] <= span[0]:
        # field absent (or empty) in this frame: corrupt the MAC, still a corruption of this frame
        span, where = spans.get("mac", (len(body) - 1, len(body))), f"mac (no {where} in this frame)"
    pos = PREFIX.size + (span[0] + span[1] - 1) // 2
    out[pos] ^= 0x01
    return bytes(out), f"{where} at body offset {pos - PREFIX.size}"


def corrupt_frame(frame: bytes, where: str) -> bytes:
    """Flip one byte of `frame` at the place `where` names (see the module docstring)."""
    return corrupt_frame_info(frame, where)[0]


async def _abort(stream: trio.SocketStream):
    """Close with RST: SO_LINGER on, timeout 0 (on the TCP stream under TLS: no close_notify)."""
    tcp = getattr(stream, "transport_stream", stream)
    try:
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    await _close_quietly(tcp)


async def _close_quietly(stream):
    stream = getattr(stream, "transport_stream", stream)  # TLS: close the TCP stream, no close_notify
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
