"""A fault-injecting TCP proxy for the migration channel (tests and the `make faults` matrix).

It sits between a source and a destination daemon on loopback and forwards bytes both ways,
frame-aware: it follows the wire framing (4-byte big-endian length, one msgpack body) so a fault can
be scripted by byte offset, by message type and by migration phase. Faults:

  reset        abort both TCP connections with RST (SO_LINGER 0)
  close        close both connections cleanly (FIN both ways)
  half_close   send FIN towards the receiver of the triggering frame, keep the other way open
  blackhole    stop forwarding in both directions and keep the sockets open (a dead peer that
               never closes: only keepalives / peer timeouts can detect it)
  corrupt      flip one byte of the triggering frame; `field` picks where: "length" (the 4-byte
               prefix), "body" (first body byte), or a message field name ("enc_data" ciphertext,
               "enc_headers" SEV packet headers, "shr_data" shared page, "bits" bitmap, ...): the
               field's bytes are located inside the raw frame and one byte in their middle flipped
  truncate     forward half of the triggering frame, then close
  duplicate    forward the triggering frame twice
  replay       forward the triggering frame, then an earlier frame of the same direction again
  reorder      hold the triggering frame and forward it after the next one
  delay        add `seconds` of latency to every chunk after the trigger (and to the trigger)
  rate         limit forwarding to `bytes_per_s` after the trigger (bandwidth collapse)
  drop_frame   silently drop the triggering frame (a lost message that TCP would never lose)

Every fired fault is recorded with its monotonic time, so a test can bound detection time.
The proxy also captures every byte per direction (for the "no private plaintext on the wire" test).
Nothing here knows what a migration *should* do: it only breaks things on request.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import msgpack
import trio

LEN = struct.Struct(">I")
C2S = "c2s"  # source -> destination (the source connects to us)
S2C = "s2c"

# Phases as the proxy infers them from the message types that have crossed (both directions).
PHASES = ("handshake", "first_round", "later_round", "stop_copy", "readiness", "go", "confirmation")


def frame_type(body: bytes) -> str | None:
    """The message type of a frame body, or None when it is not a decodable map with a type."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return None
    if isinstance(obj, dict):
        for key in ("t", "type", "msg"):
            if isinstance(obj.get(key), str):
                return obj[key]
    return None


def decode_body(body: bytes):
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return None


@dataclass
class Fault:
    kind: str
    direction: str | None = None        # C2S / S2C / None = either
    msg_type: str | None = None         # trigger on this message type ...
    nth: int = 1                        # ... its nth occurrence in `direction`
    phase: str | None = None            # or on the first frame seen in this phase
    byte_offset: int | None = None      # or when this many bytes have crossed in `direction`
    field: str = "body"                 # for corrupt
    seconds: float = 0.0                # for delay
    bytes_per_s: float = 0.0            # for rate
    fired_at: float | None = None
    fired_info: str = ""


@dataclass
class _Dir:
    name: str
    buf: bytearray = field(default_factory=bytearray)
    crossed: int = 0
    counts: dict = field(default_factory=dict)
    history: list = field(default_factory=list)   # raw frames forwarded (for replay)
    held: bytes | None = None                     # reorder
    capture: bytearray = field(default_factory=bytearray)


class FaultProxy:
    """`await nursery.start(proxy.serve)` returns the port; connections go to (target_host, target_port)."""

    def __init__(self, target_host: str, target_port: int, faults: list[Fault] | None = None,
                 *, capture: bool = False, max_capture: int = 64 << 20):
        self.target = (target_host, target_port)
        self.faults = list(faults or [])
        self.capture = capture
        self.max_capture = max_capture
        self.phase = "handshake"
        self.port: int | None = None
        self.connections = 0
        self.dirs = {C2S: _Dir(C2S), S2C: _Dir(S2C)}
        self._delay = 0.0
        self._rate = 0.0
        self._blackholed = trio.Event()
        self._cancel: trio.CancelScope | None = None

    # -- public ---------------------------------------------------------------------------------
    def fired(self) -> list[Fault]:
        return [f for f in self.faults if f.fired_at is not None]

    def captured(self, direction: str = C2S) -> bytes:
        return bytes(self.dirs[direction].capture)

    def stop_faults(self) -> None:
        """Forget pending faults and go transparent for new connections (the network is back)."""
        self.faults = [f for f in self.faults if f.fired_at is not None]
        for f in self.faults:
            f.kind = "none"
        self._delay = 0.0
        self._rate = 0.0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    # -- internals ------------------------------------------------------------------------------
    async def _handle(self, client: trio.SocketStream):
        self.connections += 1
        # Each new connection starts transparent unless faults are still pending.
        for d in self.dirs.values():
            d.buf.clear()
            d.held = None
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await _abort(client)
            return
        with trio.CancelScope() as scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, self.dirs[C2S], scope)
                    nursery.start_soon(self._pump, server, client, self.dirs[S2C], scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await _close_quietly(client)
        await _close_quietly(server)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, d: _Dir, scope):
        try:
            while True:
                if self._blackholed.is_set():
                    await trio.sleep_forever()
                data = await src.receive_some(1 << 16)
                if not data:
                    try:
                        await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    return
                d.buf += data
                await self._drain(d, src, dst, scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    def _match(self, d: _Dir, mtype: str | None, start: int, end: int) -> Fault | None:
        for f in self.faults:
            if f.fired_at is not None or f.kind == "none":
                continue
            if f.direction is not None and f.direction != d.name:
                continue
            if f.byte_offset is not None:
                if start <= f.byte_offset < end:
                    return f
                continue
            if f.msg_type is not None:
                if mtype == f.msg_type and d.counts.get(mtype, 0) == f.nth:
                    return f
                continue
            if f.phase is not None and f.phase == self.phase:
                return f
        return None

    def _advance_phase(self, mtype: str | None):
        order = {
            "start": "first_round", "round_end": "later_round", "bitmap": "stop_copy",
            "complete": "stop_copy", "ready": "readiness", "go": "go", "started": "confirmation",
        }
        key = (mtype or "").lower().replace("-", "_")
        nxt = order.get(key)
        if nxt and PHASES.index(nxt) > PHASES.index(self.phase):
            self.phase = nxt

    async def _drain(self, d: _Dir, src, dst, scope):
        while len(d.buf) >= LEN.size:
            (n,) = LEN.unpack_from(d.buf)
            total = LEN.size + n
            if n > (256 << 20):  # garbage length: forward raw, no framing to follow
                frame, mtype = bytes(d.buf), None
                d.buf.clear()
            elif len(d.buf) < total:
                return
            else:
                frame = bytes(d.buf[:total])
                del d.buf[:total]
                mtype = frame_type(frame[LEN.size:])
            if mtype is not None:
                d.counts[mtype] = d.counts.get(mtype, 0) + 1
            start = d.crossed
            d.crossed += len(frame)
            self._advance_phase(mtype)
            fault = self._match(d, mtype, start, d.crossed)
            if fault is None:
                await self._forward(d, dst, frame)
                continue
            fault.fired_at = trio.current_time()
            fault.fired_info = f"{d.name} {mtype} #{d.counts.get(mtype, 0)} phase={self.phase}"
            await self._apply(fault, d, src, dst, frame, scope)

    async def _forward(self, d: _Dir, dst, frame: bytes):
        if d.held is not None:
            held, d.held = d.held, None
            await self._send(d, dst, frame)
            await self._send(d, dst, held)
            return
        await self._send(d, dst, frame)

    async def _send(self, d: _Dir, dst, data: bytes):
        if self._delay:
            await trio.sleep(self._delay)
        if self._rate:
            step = 16 << 10
            for i in range(0, len(data), step):
                chunk = data[i:i + step]
                await trio.sleep(len(chunk) / self._rate)
                await dst.send_all(chunk)
        else:
            await dst.send_all(data)
        if self.capture and len(d.capture) < self.max_capture:
            d.capture += data
        d.history.append(data)
        if len(d.history) > 64:
            del d.history[0]

    async def _apply(self, f: Fault, d: _Dir, src, dst, frame: bytes, scope):
        k = f.kind
        if k == "reset":
            await _abort(src)
            await _abort(dst)
            scope.cancel()
        elif k == "close":
            await _close_quietly(src)
            await _close_quietly(dst)
            scope.cancel()
        elif k == "half_close":
            try:
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            await trio.sleep_forever()
        elif k == "blackhole":
            self._blackholed.set()
            await trio.sleep_forever()
        elif k == "corrupt":
            await self._send(d, dst, corrupt_frame(frame, f.field))
        elif k == "truncate":
            await self._send(d, dst, frame[: max(1, len(frame) // 2)])
            await _close_quietly(dst)
            await _close_quietly(src)
            scope.cancel()
        elif k == "duplicate":
            await self._send(d, dst, frame)
            await self._send(d, dst, frame)
        elif k == "replay":
            earlier = d.history[-2] if len(d.history) >= 2 else (d.history[-1] if d.history else frame)
            await self._send(d, dst, frame)
            await self._send(d, dst, earlier)
        elif k == "reorder":
            d.held = frame
        elif k == "delay":
            self._delay = f.seconds
            await self._send(d, dst, frame)
        elif k == "rate":
            self._rate = f.bytes_per_s
            await self._send(d, dst, frame)
        elif k == "drop_frame":
            pass
        else:
            await self._send(d, dst, frame)


def corrupt_frame(frame: bytes, where: str) -> bytes:
    """Flip one byte of `frame` at the place `where` names (see the module docstring)."""
    out = bytearray(frame)
    if where == "length":
        out[0] ^= 0x7F
        return bytes(out)
    body = frame[LEN.size:]
    if where == "body" or not body:
        out[LEN.size] ^= 0xFF
        return bytes(out)
    obj = decode_body(body)
    value = obj.get(where) if isinstance(obj, dict) else None
    if isinstance(value, (bytes, bytearray)) and len(value) > 0:
        pos = body.find(bytes(value))
        if pos >= 0:
            out[LEN.size + pos + len(value) // 2] ^= 0x01
            return bytes(out)
    # field absent: flip the last body byte (still a corruption, reported by fired_info)
    out[-1] ^= 0x01
    return bytes(out)


async def _abort(stream: trio.SocketStream):
    """Close with RST: SO_LINGER on, timeout 0."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    await _close_quietly(stream)


async def _close_quietly(stream):
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
