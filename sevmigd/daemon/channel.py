"""The one I/O adapter between a byte stream and the sans-I/O wire `Connection` (hypercorn / trio-websocket style).

Owns, per migration connection: the read loop that feeds the Connection and hands decoded messages to the
driver; the send path (Connection.send then stream.send_all under one lock, because sequence numbers and
the channel MAC make the order of frames on the wire the order of `send` calls); keepalives every
`keepalive_interval_s` while idle; the peer timeout (no frame at all for `peer_timeout_s` while we wait
for one = the peer is dead); TCP_USER_TIMEOUT / TCP keepalive on TCP sockets so the kernel agrees; on plain
TCP the zero-copy data path (a large frame's rest read with recv_into into its reassembly buffer, a Pages
frame's pieces written with one sendmsg; TLS streams go through trio's SSLStream as they are); and the
mapping of every way a connection can end (trio Broken/Closed, EOF, timeout, the peer's Abort, a protocol
violation) onto one outcome: a `MigrationError` recorded as `Channel.failure` (the first one wins).

`run_channel(stream, conn, body, ...)` runs `body(channel)` with the read loop and keepalive task in one
nursery. When anything fails the nursery is cancelled, an Abort is sent to the peer when the failure is
ours (shielded, bounded), the stream is closed, and the first error is raised unwrapped. Cleanup of
firmware and guest state is the drivers' business, not this module's.

This module must never look inside pages or keys: it moves frames.
"""

from __future__ import annotations

import errno
import math
import socket
import ssl
from typing import Awaitable, Callable, TypeVar

import trio

from sevmigd.migrate.errors import MigrationError
from sevmigd.wire import CLOSED, NEED_DATA, Connection, Role
from sevmigd.wire import messages as m
from sevmigd.wire.errors import AbortCode, LocalProtocolError, ProtocolError, RemoteProtocolError

T = TypeVar("T")

# Bytes asked of the stream per read: a few Pages frames' worth (one frame of 256 pages is ~1 MiB), so a
# fast peer is drained in few syscalls without holding much memory per connection.
RECEIVE_SIZE = 256 * 1024
# Decoded messages buffered between the read loop and the driver. Small on purpose: when the driver is
# slow (firmware busy), the read loop stops reading and TCP flow control slows the sender down. Two
# lets the next frame be decoded while the firmware applies the current one.
EVENT_BUFFER = 2
# Socket send/receive buffers of the migration connection (Linux doubles the value). Every byte queued
# between the source's pre-copy and the destination's firmware is a byte the destination still has to
# apply *after* the source pauses the guest, i.e. downtime the planner cannot see. Kernel autotuning grows
# loopback buffers to several MiB (measured: 190 ms downtime for an idle 256 MiB guest); 1 MiB keeps it at
# ~15-35 ms with no loss of throughput here, and still covers a 10 Gbit/s path with ~1.5 ms RTT.
SOCKET_BUFFER = 1 << 20
# Plain TCP (no TLS): the rest of a large frame (a Pages frame, once its length is known) is read with
# recv_into straight into the frame's reassembly buffer, not received as bytes and copied there; and the
# socket's SO_RCVLOWAT is raised meanwhile to the frame's missing bytes, at most this much, so the loop
# wakes when a good part of the frame is there instead of for every segment the sender managed to push
# (the kernel still wakes it on EOF, an error, or a receive window that can open no further). 1 (the
# default) whenever no such frame is open: a small message must never wait for more bytes.
DIRECT_LOWAT_MAX = 512 * 1024
# The read loop's peer-timeout deadline moves only when it lags by more than this share of the timeout
# (a deadline change is a heap operation in trio's run loop; reads come every 16 KiB through TLS).
PEER_TIMEOUT_REARM = 0.05
# How long we try to tell the peer why we abort, and then wait for it to close (a lingering close: if we
# closed at once, our RST could destroy the Abort frame in the peer's receive queue).
ABORT_SEND_TIMEOUT_S = 2.0
ABORT_LINGER_S = 1.0

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


def _closed_error(peer: str, detail: str = "") -> MigrationError:
    text = f"connection to {peer} closed" + (f": {detail}" if detail else "")
    return MigrationError(AbortCode.PROTOCOL_ERROR, text)


def _stream_error(peer: str, exc: BaseException, peer_timeout_s: float) -> MigrationError:
    """The error for a broken stream. ETIMEDOUT is the kernel's TCP_USER_TIMEOUT (set by `tune_tcp` to the
    peer timeout): nothing was acknowledged, or the peer's window stayed shut, that long -> TIMEOUT, the
    same code as the application's own peer timeout, not a protocol error."""
    cause = exc.__cause__ or exc.__context__
    reason = getattr(cause, "reason", None) or ""
    if isinstance(cause, ssl.SSLError) and "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        # TLS 1.3: the server checks our certificate after our side of the handshake completed, so its
        # refusal arrives as an alert on the first read: the peer does not admit us to its fleet.
        from sevmigd.daemon.tls import _reason

        return MigrationError(AbortCode.UNTRUSTED_PLATFORM, f"{peer} refused our TLS certificate: {_reason(cause)}")
    if isinstance(cause, OSError) and cause.errno == errno.ETIMEDOUT:
        return MigrationError(AbortCode.TIMEOUT, f"peer {peer} acknowledged nothing for {peer_timeout_s:g} s "
                                                 f"(TCP_USER_TIMEOUT: {cause.strerror})")
    return _closed_error(peer, str(exc) or type(exc).__name__)


def tune_tcp(stream: trio.abc.Stream, *, peer_timeout_s: float, keepalive_interval_s: float) -> None:
    """Kernel-level liveness on TCP streams: unacknowledged data for longer than the peer timeout
    fails the socket (TCP_USER_TIMEOUT), and an idle connection is probed (SO_KEEPALIVE) so a vanished
    host is noticed even when neither side has anything to send. No-op for other streams."""
    inner = stream  # trio.SSLStream (and the listener's WatchedStream) wrap the TCP stream
    while not isinstance(inner, trio.SocketStream) and hasattr(inner, "transport_stream"):
        inner = inner.transport_stream
    if not isinstance(inner, trio.SocketStream):
        return
    try:
        inner.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        inner.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        idle = max(1, math.ceil(keepalive_interval_s))
        if hasattr(socket, "TCP_KEEPIDLE"):
            inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
            inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, math.ceil(peer_timeout_s / idle)))
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(peer_timeout_s * 1000)))
    except OSError:
        pass  # best effort: the application-level peer timeout still holds


def _direct_socket(stream: trio.abc.Stream):
    """The trio socket under a plain TCP stream (trio.SocketStream, possibly inside the listener's
    WatchedStream, whose checks then run before each read), for zero-copy reads; None for TLS and others."""
    checks = []
    inner = stream
    while not isinstance(inner, trio.SocketStream):
        check = getattr(inner, "_check", None)
        if isinstance(inner, trio.SSLStream) or check is None or not hasattr(inner, "transport_stream"):
            return None, ()
        checks.append(check)
        inner = inner.transport_stream
    if inner.socket.type != socket.SOCK_STREAM or inner.socket.family not in (socket.AF_INET, socket.AF_INET6):
        return None, ()
    return inner.socket, tuple(checks)


def _tls_object(stream: trio.abc.Stream):
    """The ssl.SSLObject of a trio.SSLStream, to take records already received without a trip through the
    event loop (`_tls_ready`); None for other streams or a trio without that attribute."""
    if isinstance(stream, trio.SSLStream):
        obj = getattr(stream, "_ssl_object", None)
        if isinstance(obj, ssl.SSLObject):
            return obj
    return None


def _tls_ready(obj: ssl.SSLObject):
    """The plaintext of TLS records trio.SSLStream has already read from the socket, or None when a
    receive_some must wait for more (or report the end). A TLS read returns one 16 KiB record, and each
    `receive_some` costs a pass through trio's scheduler: taken here, the records of one socket read are
    decoded in one go (measured: the TLS destination spent ~5 us of interpreter per shared page, 1.2 over
    plain TCP). Safe beside trio's own use of the object: a read is complete when it returns, and anything
    it may queue for the peer (a post-handshake answer) stays in the outgoing BIO, which trio flushes, in
    order, at the stream's next operation."""
    try:
        return obj.read(RECEIVE_SIZE) or None     # b"": the peer's close_notify, reported by receive_some
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:
        raise trio.BrokenResourceError(f"TLS: {exc}") from exc


class Channel:
    """A migration connection as the drivers see it: `send`, `send_pages`, `receive`, `fail`."""

    def __init__(self, stream: trio.abc.Stream, conn: Connection, *, peer: str,
                 keepalive_interval_s: float, peer_timeout_s: float, log=None):
        self.stream = stream
        self.conn = conn
        self.peer = peer
        self.keepalive_interval_s = keepalive_interval_s
        self.peer_timeout_s = peer_timeout_s
        self.log = log
        self.failure: MigrationError | None = None
        self.tell_peer = True
        self.abort_forbidden = False  # set once an Abort would make a promise we can no longer keep
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.keepalives_sent = 0
        self.keepalives_enabled = False
        self._send_lock = trio.Lock()
        self._events_in, self._events_out = trio.open_memory_channel(EVENT_BUFFER)
        self._cancel: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._deferred_failure: MigrationError | None = None
        self._reader_done = trio.Event()
        self._last_send = trio.current_time()
        self._broken = False
        # Plain TCP: the socket itself, for zero-copy reads and one-syscall frame writes (None otherwise).
        self._sock, self._sock_checks = _direct_socket(stream)

    # -- failure -----------------------------------------------------------------------------------

    def fail(self, err: MigrationError, *, tell_peer: bool = True) -> MigrationError:
        """Record `err` unless an earlier failure is recorded, stop the channel's tasks; return the winner.

        `tell_peer=False` when the peer already knows (its Abort or Refuse) or must not be told."""
        if self.failure is None:
            self.failure = err
            self.tell_peer = tell_peer
        if self._cancel is not None:
            self._cancel.cancel()
        return self.failure

    def fail_between_frames(self, err: MigrationError) -> MigrationError:
        """`fail(err)` for a failure of our own choosing (an operator's cancel), delivered so the peer can
        read our reason: a frame already going onto the wire is finished first, at most
        ABORT_SEND_TIMEOUT_S, and the Abort follows it. Cancelling a write halfway would leave the stream
        unusable (a plain socket mid-frame; a TLS stream, which trio then marks broken), so the peer would
        see a truncated conversation (PROTOCOL_ERROR) instead of CANCELLED."""
        if self.failure is not None or self._nursery is None or not self._send_lock.locked():
            return self.fail(err)
        if self._deferred_failure is None:
            self._deferred_failure = err
            self._nursery.start_soon(self._fail_after, err, ABORT_SEND_TIMEOUT_S)
        return self._deferred_failure

    async def _fail_after(self, err: MigrationError, seconds: float) -> None:
        """The bound of `fail_between_frames`: a write that does not finish in time is cut after all."""
        await trio.sleep(seconds)
        self.fail(err)

    def forbid_abort(self) -> None:
        """From now on never send Abort (the destination started the guest: an Abort in state GO would
        tell the source it may resume, PROTOCOL.md §7.3)."""
        self.abort_forbidden = True

    def start_keepalives(self) -> None:
        """Called by the driver once the handshake is over (Keepalive is illegal before)."""
        self.keepalives_enabled = True

    # -- sending -----------------------------------------------------------------------------------

    async def _write(self, data: bytes, parts: list | None = None) -> int:
        """Write one frame: `data`, or the pieces `parts` one after the other (scatter-gather: a Pages
        frame's page columns go from the caller's buffers to the stream, never joined into one copy)."""
        try:
            if parts is None:
                await self.stream.send_all(data)
            elif self._sock is not None:
                await self._sendmsg_all(parts)
            else:
                for piece in parts:
                    await self.stream.send_all(piece)
        except trio.Cancelled:
            # A frame may be half on the wire: nothing more can follow it on this stream (no Abort).
            self._broken = True
            raise
        except _STREAM_ERRORS as exc:
            self._broken = True
            # The peer may have closed after an Abort that the read loop has not yet decoded: give it a
            # moment so the peer's reason, not "connection closed", is the error we keep.
            with trio.move_on_after(ABORT_LINGER_S):
                await self._reader_done.wait()
            raise self.fail(_stream_error(self.peer, exc, self.peer_timeout_s)) from None
        n = len(data) if parts is None else sum(memoryview(p).nbytes for p in parts)
        self._last_send = trio.current_time()
        self.bytes_sent += n
        self.frames_sent += 1
        if self._deferred_failure is not None:
            self.fail(self._deferred_failure)  # the frame is whole on the wire: now the Abort may follow
        return n

    async def _sendmsg_all(self, parts: list) -> None:
        """A frame's pieces with sendmsg (plain TCP): one syscall (and one pass of the event loop) for the
        whole frame while the socket buffer has room, where a send_all per piece costs one each."""
        bufs = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
        sock = self._sock
        while bufs:
            for check in self._sock_checks:
                check()
            try:
                sent = await sock.sendmsg(bufs)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the socket was closed") from exc
                raise trio.BrokenResourceError(str(exc)) from exc
            while sent:
                n = bufs[0].nbytes
                if sent >= n:
                    sent -= n
                    del bufs[0]
                else:
                    bufs[0] = bufs[0][sent:]
                    sent = 0

    def _check(self) -> None:
        if self.failure is None and self._deferred_failure is not None:
            self.fail(self._deferred_failure)
        if self.failure is not None:
            raise self.failure

    async def send(self, msg, *, on_write: Callable[[], None] | None = None) -> int:
        """Send one message; returns the bytes put on the wire. Raises the channel failure if any.

        `on_write` is called at the last moment before the bytes may reach the wire (no checkpoint in
        between): the source's "go" commit point."""
        async with self._send_lock:
            self._check()
            data = self.conn.send(msg)
            if on_write is not None:
                on_write()
            return await self._write(data)

    async def send_pages(self, round: int, enc_pfns, enc_headers: bytes, enc_data: bytes,
                         shr_pfns, shr_data: bytes) -> int:
        """One Pages frame through the Connection's fast path; returns the bytes put on the wire."""
        async with self._send_lock:
            self._check()
            parts = self.conn.send_pages_parts(round, enc_pfns, enc_headers, enc_data, shr_pfns, shr_data)
            return await self._write(b"", parts)

    # -- receiving ---------------------------------------------------------------------------------

    async def receive(self):
        """The next message from the peer (Keepalives and Abort are handled here, never returned).

        A message already decoded is returned even when the channel has failed since (e.g. "started"
        followed at once by the peer's close): what the peer said before it went away still counts.
        """
        try:
            return self._events_out.receive_nowait()
        except trio.WouldBlock:
            pass
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self.failure or _closed_error(self.peer) from None
        try:
            return await self._events_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self.failure or _closed_error(self.peer) from None

    async def receive_expect(self, *types):
        """The next message, which must be one of `types` (else PROTOCOL_ERROR naming what came)."""
        msg = await self.receive()
        if not isinstance(msg, types):
            want = " or ".join(t.__name__ for t in types)
            raise self.fail(MigrationError(AbortCode.PROTOCOL_ERROR,
                                           f"expected {want} from {self.peer}, got {type(msg).__name__}"))
        return msg

    def _tls_refusal(self, exc: BaseException | None = None) -> MigrationError | None:
        """A TLS server that refuses our client certificate does so after our side of the TLS 1.3 handshake
        has completed, and closes without a word: so a TLS connection closed before a single byte answered
        our Hello is that refusal (the destination logs `incoming_tls_failed` with the reason)."""
        cause = exc.__cause__ or exc.__context__ if exc is not None else None
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
            return None  # a TLS error with its own reason (e.g. a damaged record), not a silent close
        if (isinstance(self.stream, trio.SSLStream) and self.bytes_received == 0
                and str(getattr(self.conn.state, "value", self.conn.state)) == "HELLO_SENT"):
            return MigrationError(AbortCode.UNTRUSTED_PLATFORM,
                                  f"{self.peer} closed the TLS connection without answering hello: it does not "
                                  f"accept our TLS certificate (not of its fleet's TLS CA?); see its log")
        return None

    async def _read_loop(self) -> None:
        # The peer timeout is one cancel scope for the whole loop, re-armed lazily (at most every
        # PEER_TIMEOUT_REARM of it) rather than a new move_on_after per read: through TLS a read returns
        # one 16 KiB record, and a fresh timed scope per read cost ~2.5 us per 4 KiB page of the
        # destination's CPU (measured, trio 0.35). Silence of peer_timeout_s (up to 1 + REARM times it)
        # trips it; time spent handing a message to a busy driver never counts (deadline off meanwhile).
        timeout = self.peer_timeout_s
        rearm = timeout * PEER_TIMEOUT_REARM
        conn = self.conn
        sock, checks = self._sock, self._sock_checks
        tls = _tls_object(self.stream)
        lowat = 1
        try:
            armed = trio.current_time()
            with trio.CancelScope(deadline=armed + timeout + rearm) as cs:
                while True:
                    view = conn.receive_buffer() if sock is not None else None
                    if view is not None:
                        want = min(len(view), DIRECT_LOWAT_MAX)
                        n = await self._recv_into(sock, checks, view, want if want != lowat else None)
                        lowat = want
                    else:
                        if lowat != 1:
                            self._set_lowat(sock, 1)
                            lowat = 1
                        data = _tls_ready(tls) if tls is not None else None
                        if data is None:
                            data = await self.stream.receive_some(RECEIVE_SIZE)
                        n = len(data)
                    now = trio.current_time()
                    if now - armed > rearm:
                        armed = now
                        cs.deadline = now + timeout + rearm
                    if not n:
                        # EOF: whatever state we were in, the peer is gone (a clean EOF only happens after
                        # the conversation ended, when nobody waits for this outcome any more).
                        self.fail(self._tls_refusal() or
                                  _closed_error(self.peer, f"the peer closed the connection (in state {self.conn.state})"))
                        return
                    self.bytes_received += n
                    if view is not None:
                        conn.received_into(n)
                    else:
                        conn.receive_data(data)
                    while True:
                        ev = self.conn.next_event()
                        if ev is NEED_DATA:
                            break
                        if ev is CLOSED:
                            self.fail(_closed_error(self.peer, "end of stream"))
                            return
                        if isinstance(ev, m.Keepalive):
                            continue
                        if isinstance(ev, m.Abort):
                            code = _abort_code(ev.code)
                            self.fail(MigrationError(code, f"{self.peer} aborted ({code.name}): {ev.reason}"),
                                      tell_peer=False)
                            return
                        cs.deadline = math.inf
                        await self._events_in.send(ev)
                        armed = trio.current_time()
                        cs.deadline = armed + timeout + rearm
                        if isinstance(ev, m.Refuse):
                            return  # ends the connection; the driver reads the reason
            if cs.cancelled_caught:
                # A peer silent this long will not read an Abort either: no Abort, no linger.
                self.fail(MigrationError(
                    AbortCode.TIMEOUT, f"peer {self.peer} sent nothing for {self.peer_timeout_s:g} s"),
                    tell_peer=False)
        except RemoteProtocolError as exc:
            self.fail(MigrationError(_abort_code(exc.code), f"{self.peer} broke the protocol: {exc}"))
        except _STREAM_ERRORS as exc:
            self.fail(self._tls_refusal(exc) or _stream_error(self.peer, exc, self.peer_timeout_s))
        finally:
            if lowat != 1:
                self._set_lowat(sock, 1)   # the close's reads (EOF, the peer's Abort) are small
            self._events_in.close()
            self._reader_done.set()

    @staticmethod
    def _set_lowat(sock, n: int) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        except OSError:
            pass  # an optimisation only

    async def _recv_into(self, sock, checks, view: memoryview, lowat: int | None) -> int:
        """One zero-copy read into the open frame's buffer (plain TCP), with the stream errors a
        SocketStream would raise (the OSError kept as the cause, e.g. TCP_USER_TIMEOUT's ETIMEDOUT)."""
        for check in checks:
            check()
        if lowat is not None:
            self._set_lowat(sock, lowat)
        try:
            return await sock.recv_into(view)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the socket was closed") from exc
            raise trio.BrokenResourceError(str(exc)) from exc

    async def _keepalive_loop(self) -> None:
        while True:
            await trio.sleep_until(self._last_send + self.keepalive_interval_s)
            if (not self.keepalives_enabled or self._send_lock.locked()
                    or trio.current_time() < self._last_send + self.keepalive_interval_s):
                if trio.current_time() >= self._last_send + self.keepalive_interval_s:
                    self._last_send = trio.current_time()  # skipped this beat; look again one interval later
                continue
            try:
                await self.send(m.Keepalive())
                self.keepalives_sent += 1
            except LocalProtocolError:
                self.keepalives_enabled = False  # connection in a state where keepalives are over
            except MigrationError:
                return

    # -- ending --------------------------------------------------------------------------------------

    async def _tell_peer_and_close(self) -> None:
        """Shielded: send our Abort when the failure is ours, linger for the peer's close, close."""
        with trio.CancelScope(shield=True):
            err = self.failure
            if err is not None and self.tell_peer and not self._broken and not self.abort_forbidden:
                with trio.move_on_after(ABORT_SEND_TIMEOUT_S):
                    try:
                        data = self.conn.send(m.Abort(err.code, err.message[:1000]))
                        await self.stream.send_all(data)
                        try:
                            await self.stream.send_eof()
                        except (AttributeError, NotImplementedError):
                            pass
                        with trio.move_on_after(ABORT_LINGER_S):
                            while await self.stream.receive_some(RECEIVE_SIZE):
                                pass
                    except (ProtocolError, *_STREAM_ERRORS, OSError):
                        pass
            await trio.aclose_forcefully(self.stream)


def _abort_code(code) -> AbortCode:
    try:
        return AbortCode(code)
    except ValueError:
        return AbortCode.PROTOCOL_ERROR


async def run_channel(stream: trio.abc.Stream, conn: Connection, body: Callable[[Channel], Awaitable[T]], *,
                      peer: str, keepalive_interval_s: float, peer_timeout_s: float, log=None,
                      on_open: Callable[[Channel], None] | None = None,
                      on_failure: Callable[[MigrationError], Awaitable[None]] | None = None) -> T:
    """Run `body(channel)` over `stream` with the read loop and keepalives; return its result.

    Every failure (the body's MigrationError, a protocol error, the peer's Abort, EOF, a timeout, a
    `channel.fail(...)` from outside such as an operator cancel) ends in one MigrationError raised from
    here, the first one recorded. `on_failure(err)` runs (shielded) as soon as the tasks are stopped and
    *before* the Abort is sent and the close lingers, so the driver's clean-up (guest resumed, partial
    copy dropped) and its failure log do not wait on a slow or dead peer. The stream is always closed on
    return.
    """
    tune_tcp(stream, peer_timeout_s=peer_timeout_s, keepalive_interval_s=keepalive_interval_s)
    ch = Channel(stream, conn, peer=peer, keepalive_interval_s=keepalive_interval_s,
                 peer_timeout_s=peer_timeout_s, log=log)
    result = None
    ok = False
    try:
        async with trio.open_nursery() as nursery:
            ch._cancel = nursery.cancel_scope
            ch._nursery = nursery
            if on_open is not None:
                on_open(ch)
            nursery.start_soon(ch._read_loop)
            nursery.start_soon(ch._keepalive_loop)
            try:
                result = await body(ch)
                ok = True  # what the body achieved stands, whatever the connection does afterwards
            except MigrationError as exc:
                ch.fail(exc)
            except ProtocolError as exc:
                ch.fail(MigrationError(_abort_code(exc.code), f"protocol error: {exc}"))
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if ok:
            await _graceful_close(stream, spoke_last=conn.role is Role.DESTINATION)
        else:
            if ch.failure is None:
                # Cancelled from outside (daemon shutdown) or a bug: the peer still deserves a reason.
                ch.failure = MigrationError(AbortCode.INTERNAL_ERROR, "migration interrupted")
            if on_failure is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await on_failure(ch.failure)
                    except Exception:  # noqa: BLE001 - the close below must still happen
                        if log is not None:
                            log.exception("failure_handler_crashed")
            await ch._tell_peer_and_close()
    if not ok:
        raise ch.failure
    return result


async def _graceful_close(stream: trio.abc.Stream, *, spoke_last: bool = True) -> None:
    """Half-close, wait briefly for the peer's close, then close: our last frame must not be lost to
    an RST caused by closing with unread bytes (keepalives) in our receive queue.

    TLS has no half-close (trio.SSLStream has no send_eof). Then only the side that sent the last frame
    (`spoke_last`: the destination, whose Started ends a migration) waits for the peer to close first; the
    other closes at once, so neither waits out the linger for the other. Closing the destination first
    could reset the connection before the source has read Started: an uncertain hand-off for nothing."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(ABORT_LINGER_S):
            try:
                send_eof = getattr(stream, "send_eof", None)
                if send_eof is not None:
                    await send_eof()
                if send_eof is not None or spoke_last:
                    while await stream.receive_some(RECEIVE_SIZE):
                        pass
            except (NotImplementedError, *_STREAM_ERRORS, OSError):
                pass
        await trio.aclose_forcefully(stream)


async def _close(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)
