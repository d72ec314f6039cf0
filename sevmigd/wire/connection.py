"""The sans-I/O migration-protocol connection (h11 style): bytes in, events out, messages in, bytes out.

Owns: the one transition table of the protocol (both roles), sequence numbers, the handshake key exchange
and channel MAC, every contextual check (pfn < npages, round bookkeeping, bitmap length, vCPU count), and
the hand-off bookkeeping that says which side may run the guest. Must never: do I/O, read a clock, buffer
more than one incomplete frame (`max_frame + 4` bytes) plus one read (plus, transiently, the one copy that
reassembles a frame spread over several reads, into a small pool of reusable buffers: framing.py), or
raise anything but LocalProtocolError / RemoteProtocolError from its public methods, whatever the peer
sends.

Theory of operation
-------------------
There is one conversation and one state for it, tracked identically by both ends (like h11's pair of
states collapsed into one, because the protocol is strictly source-driven). `TRANSITIONS` maps
(state, sender role, message type) to the next state. `send()` looks up (state, our role, type) and raises
LocalProtocolError if absent; `next_event()` looks up (state, peer role, type) and raises
RemoteProtocolError if absent. Everything else is a *guard* on top of a legal transition (e.g. RoundEnd's
page count must match what the round carried) and raises the same error class.

    IDLE --Hello(S)--> HELLO_SENT --Accept(D)--> ACCEPTED --Start(S)--> PRECOPY
    HELLO_SENT --Refuse(D)--> REFUSED
    PRECOPY: Pages(S), RoundEnd(S) loop; --Bitmap(S)--> STOP_COPY          (the source paused the guest)
    STOP_COPY: Pages, RoundEnd loop; --VcpuState(S)--> STOP_COPY_VCPU
    STOP_COPY_VCPU: Pages, RoundEnd loop; --Complete(S)--> COMPLETE
    COMPLETE --Ready(D)--> READY --Go(S)--> GO --Started(D)--> DONE
    Keepalive(either side): any state from ACCEPTED to DONE, no change.
    Abort(either side): any state but REFUSED/ABORTED/ERROR --> ABORTED.
    The settlement query, its own conversation on a new connection (PROTOCOL.md §7.6):
    IDLE --Query(S)--> QUERIED --Answer(D)--> ANSWERED   (no channel keys: the TLS channel authenticates it)

The hand-off (who may run the guest, `Connection.handoff`): "source" until Go is sent; after Go and before
Started "uncertain" (the source must never resume on its own, the destination holds Go and may start);
"destination" once Started was sent/received. One exception resolves uncertainty safely: an Abort *from
the destination* in state GO is its authenticated promise that it did not and will not start the guest,
which hands the right back to the source ("source").

Errors are sticky: after a LocalProtocolError or RemoteProtocolError every call raises again, except that
`send(Abort(...))` is allowed once so the peer learns the code. After we sent Abort or Refuse, input is
discarded (frames the peer had in flight are not errors) until EOF.
"""

from __future__ import annotations

import enum
import os
from typing import Callable

import numpy as np

from . import integrity
from .errors import AbortCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import (MAC_PREFIX, NIL, PREFIX, FrameBuffer, FramingError, Reader, array_header, bin_header,
                      pack, strict_unpack, uint)
from .limits import MAX_MAX_FRAME, MIN_MAX_FRAME, PAGE_SIZE, SEV_HDR_SIZE, Limits
from .messages import (IGNORABLE_TYPES, MAGIC, N_FIELDS, TYPE_OF, Abort, Accept, Answer, Bitmap, Complete, Go, Hello,
                       MsgType, Pages, Query, RoundEnd, Start, Started, VcpuState, check, fields_of,
                       message_from_fields, wire_fields)

# Protocol version this implementation speaks (PROTOCOL.md §6). It accepts a peer Hello of any higher
# version (answering with this one) and refuses lower ones.
PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
# Features this implementation understands (PROTOCOL.md §6). A feature is in effect only when both
# Hello and Accept list it; unknown names are ignored.
# "mac-aes-gmac" (§9.6): the frame MAC is AES-256-GMAC instead of HMAC-SHA256 (shared pages' plaintext is
# MACed ~20x cheaper).
SUPPORTED_FEATURES: tuple[str, ...] = (integrity.FEATURE_GMAC,)
# Rounds are numbered from 0 (the first full pass over guest memory) and consecutively after that.
FIRST_ROUND = 0

# Timing the daemon implements (PROTOCOL.md §7); the codec itself has no clock.
# A side that has sent nothing for this long sends a Keepalive (1 s: cheap, well below the dead timeout).
KEEPALIVE_INTERVAL_S = 1.0
# A peer from which no frame at all arrived for this long is declared dead (10 s: tolerates a GC pause or
# a slow firmware command on the peer while still noticing a dead host quickly).
PEER_DEAD_TIMEOUT_S = 10.0

#: Frames at least this long may be read straight into their reassembly buffer (`receive_buffer`): a Pages
#: frame; the small messages keep the plain feed path.
DIRECT_READ_MIN = 64 * 1024
_MAC_TAIL = len(MAC_PREFIX) + integrity.MAC_SIZE  # 34 bytes: c4 20 + HMAC-SHA256
# A fixed X25519 scalar for the receive-time key-share check: small-order points give an all-zero result
# for *every* scalar, so one trial exchange detects them without touching the rng.
_PROBE_SCALAR = bytes(range(1, 33))


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> "Role":
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


class _Sentinel:
    def __init__(self, name: str):
        self._name = name

    def __repr__(self):
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")


class State(str, enum.Enum):
    IDLE = "IDLE"
    HELLO_SENT = "HELLO_SENT"
    ACCEPTED = "ACCEPTED"
    PRECOPY = "PRECOPY"
    STOP_COPY = "STOP_COPY"
    STOP_COPY_VCPU = "STOP_COPY_VCPU"
    COMPLETE = "COMPLETE"
    READY = "READY"
    GO = "GO"
    DONE = "DONE"
    REFUSED = "REFUSED"
    ABORTED = "ABORTED"
    QUERIED = "QUERIED"
    ANSWERED = "ANSWERED"
    ERROR = "ERROR"

    def __str__(self):
        return self.value


S, D, T = Role.SOURCE, Role.DESTINATION, MsgType

# ------------------------------------------------------------------ the transition table (PROTOCOL.md §7)
TRANSITIONS: dict[tuple[State, Role, MsgType], State] = {
    (State.IDLE, S, T.HELLO): State.HELLO_SENT,
    (State.HELLO_SENT, D, T.ACCEPT): State.ACCEPTED,
    (State.HELLO_SENT, D, T.REFUSE): State.REFUSED,
    (State.ACCEPTED, S, T.START): State.PRECOPY,
    (State.PRECOPY, S, T.PAGES): State.PRECOPY,
    (State.PRECOPY, S, T.ROUND_END): State.PRECOPY,
    (State.PRECOPY, S, T.BITMAP): State.STOP_COPY,
    (State.STOP_COPY, S, T.PAGES): State.STOP_COPY,
    (State.STOP_COPY, S, T.ROUND_END): State.STOP_COPY,
    (State.STOP_COPY, S, T.VCPU_STATE): State.STOP_COPY_VCPU,
    (State.STOP_COPY_VCPU, S, T.PAGES): State.STOP_COPY_VCPU,
    (State.STOP_COPY_VCPU, S, T.ROUND_END): State.STOP_COPY_VCPU,
    (State.STOP_COPY_VCPU, S, T.COMPLETE): State.COMPLETE,
    (State.COMPLETE, D, T.READY): State.READY,
    (State.READY, S, T.GO): State.GO,
    (State.GO, D, T.STARTED): State.DONE,
    (State.IDLE, S, T.QUERY): State.QUERIED,
    (State.QUERIED, D, T.ANSWER): State.ANSWERED,
}
# States in which both sides hold the channel keys: every frame carries seq + MAC.
AUTHENTICATED_STATES = (State.ACCEPTED, State.PRECOPY, State.STOP_COPY, State.STOP_COPY_VCPU,
                        State.COMPLETE, State.READY, State.GO, State.DONE)
for _st in AUTHENTICATED_STATES:
    for _r in (S, D):
        TRANSITIONS[(_st, _r, T.KEEPALIVE)] = _st
for _st in (State.IDLE, State.HELLO_SENT, State.QUERIED) + AUTHENTICATED_STATES:
    for _r in (S, D):
        TRANSITIONS[(_st, _r, T.ABORT)] = State.ABORTED
del _st, _r

CLASS_NAME = {t: c.__name__ for c, t in TYPE_OF.items()}

# Where a clean EOF (CLOSED) is legal; EOF anywhere else is a RemoteProtocolError (truncation).
CLEAN_EOF_STATES = (State.IDLE, State.DONE, State.REFUSED, State.ABORTED, State.ANSWERED)


def negotiate_version(peer_version: int) -> int | None:
    """The version a destination answers a Hello of `peer_version` with, or None (Refuse VERSION_MISMATCH)."""
    if peer_version < MIN_PROTOCOL_VERSION:
        return None
    return min(peer_version, PROTOCOL_VERSION)


class Connection:
    """One migration connection, either role. See the module docstring for the state machine."""

    def __init__(self, role: Role, *, rng: Callable[[int], bytes] = os.urandom, limits: Limits | None = None):
        self.role = role
        self.limits = limits or Limits()
        self._rng = rng
        self._state = State.IDLE
        self._error: ProtocolError | None = None
        self._buf = FrameBuffer()
        self._eof = False
        self._discard = False            # we sent Abort/Refuse: drop input until EOF
        self._abort_sent_after_error = False
        self._send_seq = 0
        self._recv_seq = 0
        self._share: integrity.KeyShare | None = None
        self._peer_share: bytes | None = None
        self._hello_frame: bytes | None = None
        self._keys: integrity.ChannelKeys | None = None
        self._send_key: integrity.MacKey | None = None
        self._recv_key: integrity.MacKey | None = None
        self._peer_max_frame = MIN_MAX_FRAME
        self.hello: Hello | None = None      # the Hello of this conversation (sent or received)
        self.accept: Accept | None = None    # the Accept of this conversation (sent or received)
        self.query: Query | None = None      # the settlement Query of this conversation (sent or received)
        self.version: int | None = None
        self.features: frozenset[str] = frozenset()
        self.npages: int | None = None
        self._round = FIRST_ROUND
        self._round_open = False
        self._round_pages = 0
        self._pages_total = 0
        self._go = False
        self._started = False
        self._renounced = False

    # ----------------------------------------------------------------------------------- public state
    @property
    def state(self) -> str:
        return self._state.value

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    @property
    def session_id(self) -> str | None:
        """Printable id derived with the channel keys: equal on both ends unless the handshake was MITM'd."""
        return self._keys.session_id if self._keys else None

    @property
    def max_send_frame(self) -> int:
        """Largest frame we may send: the smaller of the peer's announcement and our own limit."""
        return min(self._peer_max_frame, self.limits.max_frame)

    @property
    def max_pages_per_frame(self) -> int:
        """How many pages (private or shared) fit one Pages frame under `max_send_frame`."""
        return max(1, (self.max_send_frame - 64) // (PAGE_SIZE + SEV_HDR_SIZE + 8))

    @property
    def round(self) -> int:
        """The current round number (the one the next Pages/RoundEnd must carry)."""
        return self._round

    @property
    def pages_total(self) -> int:
        return self._pages_total

    @property
    def handoff(self) -> str:
        """Which side may run the guest: "source", "destination" or "uncertain" (PROTOCOL.md §7.3)."""
        if not self._go or self._renounced:
            return "source"
        if self._started:
            return "destination"
        return "uncertain"

    # ----------------------------------------------------------------------------------- errors
    def _raise_sticky(self):
        e = self._error
        raise type(e)(e.code, f"connection is in the ERROR state after: {e.message}")

    def _fail(self, e: ProtocolError):
        if self._error is None:
            self._error = e
            self._state = State.ERROR
        raise e

    # ----------------------------------------------------------------------------------- receiving
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; b"" means EOF. Call next_event() until NEED_DATA in between."""
        if self._error is not None:
            self._raise_sticky()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            self._fail(LocalProtocolError(AbortCode.INTERNAL_ERROR,
                                          f"receive_data() takes bytes, not {type(data).__name__}"))
        if self._eof:
            if data:
                self._fail(LocalProtocolError(AbortCode.INTERNAL_ERROR, "receive_data() after EOF"))
            return
        if not data:
            self._eof = True
            return
        if self._discard:
            return
        if self._buf.has_frame():
            self._fail(LocalProtocolError(
                AbortCode.RESOURCE_LIMIT, "a whole frame is still buffered: call next_event() until it "
                                          "returns NEED_DATA before feeding more data"))
        self._buf.feed(data if type(data) is bytes else bytes(data))
        self._check_prefix()

    def receive_buffer(self, min_bytes: int = DIRECT_READ_MIN) -> memoryview | None:
        """Zero-copy receive: a writable view into which the caller may read (`recv_into`) the rest of the
        frame being received, then call `received_into(n)`; None when there is no such frame (length not
        read yet, smaller than `min_bytes`, already whole) and the caller reads and feeds `receive_data`
        as usual. Only after the length prefix passed the frame limit; the view never reaches past it."""
        if self._error is not None or self._eof or self._discard:
            return None
        return self._buf.direct_view(min_bytes)

    def received_into(self, n: int) -> None:
        """`n` bytes were read into the view `receive_buffer()` returned (0 = EOF, as receive_data(b""))."""
        if not n:
            self.receive_data(b"")
            return
        if self._error is not None:
            self._raise_sticky()
        try:
            self._buf.commit(n)
        except ValueError as e:
            self._fail(LocalProtocolError(AbortCode.INTERNAL_ERROR, str(e)))

    def _frame_limit(self) -> int:
        # Until the channel keys exist nothing is authenticated: hold at most a handshake-sized frame.
        return self.limits.max_frame if self._recv_key is not None else MIN_MAX_FRAME

    def _check_prefix(self):
        try:
            self._buf.check_prefix(self._frame_limit())
        except FramingError as e:
            self._buf.clear()
            self._fail(RemoteProtocolError(e.code, e.message))

    def next_event(self):
        """Next message from the peer, NEED_DATA, or CLOSED (clean EOF)."""
        if self._error is not None:
            self._raise_sticky()
        if self._discard:
            self._buf.clear()
            return CLOSED if self._eof else NEED_DATA
        while True:
            body = self._buf.pop()
            if body is None:
                if self._eof:
                    if self._buf.buffered or self._buf.need is not None:
                        self._fail(RemoteProtocolError(AbortCode.PROTOCOL_ERROR,
                                                       "connection closed in the middle of a frame"))
                    if self._state in CLEAN_EOF_STATES:
                        return CLOSED
                    self._fail(RemoteProtocolError(
                        AbortCode.PROTOCOL_ERROR, f"connection closed by the peer in state {self._state}"))
                return NEED_DATA
            try:
                msg = self._receive_body(body)
            except ProtocolError as e:
                self._fail(e)
            except FramingError as e:
                self._fail(RemoteProtocolError(e.code, e.message))
            except Exception as e:  # safety net: the peer's bytes must never raise anything else
                err = RemoteProtocolError(AbortCode.PROTOCOL_ERROR,
                                          f"internal decoder failure on a malformed frame: {type(e).__name__}")
                err.__cause__ = e
                self._fail(err)
            self._check_prefix()
            if msg is not None:
                return msg

    def _receive_body(self, body):
        peer = self.role.peer
        new_state = None

        def on_type(mtype: MsgType):
            nonlocal new_state
            new_state = TRANSITIONS.get((self._state, peer, mtype))
            if new_state is None:
                raise RemoteProtocolError(
                    AbortCode.PROTOCOL_ERROR,
                    f"{CLASS_NAME[mtype]} from the {peer.value} is illegal in state {self._state}")

        # (the one unauthenticated frame after the handshake: the source's Abort sent before it saw our
        # Accept, PROTOCOL.md §7.1; it can only end the connection, which a network attacker can do anyway)
        race = self._state is State.ACCEPTED and self.role is Role.DESTINATION and self._recv_seq == 1
        _seq, msg, extras = decode_body(body, key=self._recv_key, limits=self.limits,
                                        expected_seq=self._recv_seq, unauth_abort_ok=race, on_type=on_type)
        if msg is None:  # an authenticated frame of the ignorable extension range (PROTOCOL.md §6.4)
            self._recv_seq += 1
            return None
        self._guard(peer, msg, RemoteProtocolError, extras)
        self._recv_seq += 1
        self._apply(peer, msg, new_state, frame=PREFIX.pack(len(body)) + bytes(body) if extras else None,
                    extras=extras)
        return msg

    # ----------------------------------------------------------------------------------- guards
    def _guard(self, sender: Role, msg, err, extras=()):
        """Contextual checks of a legal transition (same rules for send and receive)."""
        t = type(msg)
        lim = self.limits
        if t is Hello:
            if err is LocalProtocolError:  # received extras were checked by decode_body
                _check_extras(*extras, err)
            if msg.memory_bytes < PAGE_SIZE or msg.memory_bytes % PAGE_SIZE:
                raise err(AbortCode.PROTOCOL_ERROR, f"memory_bytes {msg.memory_bytes} is not a positive "
                                                    f"multiple of {PAGE_SIZE}")
            if msg.memory_bytes > lim.max_guest_bytes:
                raise err(AbortCode.RESOURCE_LIMIT, f"guest of {msg.memory_bytes} bytes exceeds the limit "
                                                    f"of {lim.max_guest_bytes}")
            if not (1 <= msg.vcpus <= lim.max_vcpus):
                raise err(AbortCode.RESOURCE_LIMIT, f"vcpus {msg.vcpus} outside [1, {lim.max_vcpus}]")
            if sender is self.role and msg.version != PROTOCOL_VERSION:
                raise err(AbortCode.VERSION_MISMATCH, f"we speak version {PROTOCOL_VERSION}, not {msg.version}")
        elif t is Accept:
            if err is LocalProtocolError:
                _check_extras(*extras, err)
            hv = self.hello.version
            if not (MIN_PROTOCOL_VERSION <= msg.version <= min(hv, PROTOCOL_VERSION)):
                raise err(AbortCode.VERSION_MISMATCH,
                          f"Accept version {msg.version} is not within [{MIN_PROTOCOL_VERSION}, "
                          f"{min(hv, PROTOCOL_VERSION)}] (Hello offered {hv})")
        elif t is Query:
            if sender is self.role and msg.version != PROTOCOL_VERSION:
                raise err(AbortCode.VERSION_MISMATCH, f"we speak version {PROTOCOL_VERSION}, not {msg.version}")
            if msg.version < MIN_PROTOCOL_VERSION:
                raise err(AbortCode.VERSION_MISMATCH, f"query of version {msg.version}: not supported")
        elif t is Answer:
            if msg.session_id != self.query.session_id:
                raise err(AbortCode.PROTOCOL_ERROR, "the answer is about another session than the query")
        elif t is Start:
            if msg.policy != self.hello.policy:
                raise err(AbortCode.POLICY_REFUSED, f"Start policy {msg.policy:#x} differs from Hello's "
                                                    f"{self.hello.policy:#x}")
        elif t is Pages:
            if msg.round != self._round:
                raise err(AbortCode.PROTOCOL_ERROR, f"Pages of round {msg.round} during round {self._round}")
            for name, pfns in (("enc_pfns", msg.enc_pfns), ("shr_pfns", msg.shr_pfns)):
                if len(pfns) and int(pfns.max()) >= self.npages:
                    raise err(AbortCode.PROTOCOL_ERROR, f"{name}: pfn {int(pfns.max())} beyond the guest's "
                                                        f"{self.npages} pages")
        elif t is RoundEnd:
            if msg.round != self._round:
                raise err(AbortCode.PROTOCOL_ERROR, f"RoundEnd of round {msg.round} during round {self._round}")
            if msg.pages != self._round_pages:
                raise err(AbortCode.INTEGRITY_FAILURE, f"RoundEnd announces {msg.pages} pages, round "
                                                       f"{self._round} carried {self._round_pages}")
        elif t is Bitmap:
            if self._round_open:
                raise err(AbortCode.PROTOCOL_ERROR, f"Bitmap while round {self._round} is open (send RoundEnd)")
            if msg.npages != self.npages:
                raise err(AbortCode.PROTOCOL_ERROR, f"Bitmap of {msg.npages} pages, guest has {self.npages}")
        elif t is VcpuState:
            n = self.hello.vcpus
            if self.hello.es:
                if msg.regs is not None or len(msg.vmsa_header) != n * SEV_HDR_SIZE:
                    raise err(AbortCode.PROTOCOL_ERROR, f"SEV-ES guest: VcpuState needs {n} VMSA packets")
            elif msg.regs is None or len(msg.regs) != n:
                raise err(AbortCode.PROTOCOL_ERROR, f"SEV guest: VcpuState needs regs for {n} vCPUs")
        elif t is Complete:
            if self._round_open:
                raise err(AbortCode.PROTOCOL_ERROR, f"Complete while round {self._round} is open")
            if msg.pages_total != self._pages_total:
                raise err(AbortCode.INTEGRITY_FAILURE, f"Complete announces {msg.pages_total} pages, "
                                                       f"{self._pages_total} were sent")

    # ----------------------------------------------------------------------------------- state update
    def _apply(self, sender: Role, msg, new_state: State, frame: bytes | None = None, extras=()):
        t = type(msg)
        if extras and sender is not self.role:
            self._peer_share, self._peer_max_frame = extras
        if t is Hello:
            self.hello = msg
            self.npages = msg.memory_bytes // PAGE_SIZE
            self._hello_frame = frame
        elif t is Accept:
            self.accept = msg
            self.version = msg.version
            self.features = frozenset(self.hello.features) & frozenset(msg.features)
            transcript = integrity.transcript_hash(self._hello_frame, frame)
            try:
                self._keys = integrity.derive_keys(self._share, self._peer_share, transcript)
            except integrity.KeyShareError as e:
                cls = RemoteProtocolError if sender is not self.role else LocalProtocolError
                raise cls(AbortCode.INTEGRITY_FAILURE, f"key exchange failed: {e}") from None
            s2d, d2s = integrity.frame_keys(self._keys, self.features)
            self._send_key, self._recv_key = (s2d, d2s) if self.role is Role.SOURCE else (d2s, s2d)
        elif t is Query:
            self.query = msg
        elif t is Pages:
            self._round_open = True
            self._round_pages += msg.npages
            self._pages_total += msg.npages
        elif t is RoundEnd:
            self._round += 1
            self._round_open = False
            self._round_pages = 0
        elif t is Go:
            self._go = True
        elif t is Started:
            self._started = True
        elif t is Abort:
            if sender is Role.DESTINATION and self._state is State.GO:
                self._renounced = True
        self._state = new_state

    # ----------------------------------------------------------------------------------- sending
    def send(self, msg) -> bytes:
        """Encode `msg` as the next frame; LocalProtocolError if it is illegal now (state or content)."""
        if isinstance(msg, Pages):
            return self.send_pages(msg.round, msg.enc_pfns, msg.enc_headers, msg.enc_data, msg.shr_pfns,
                                   msg.shr_data)
        L = LocalProtocolError
        if self._error is not None:
            if type(msg) is Abort and not self._abort_sent_after_error and not self._discard:
                msg = check(msg, L, self.limits)
                frame = self._encode(MsgType.ABORT, fields_of(msg))
                self._abort_sent_after_error = True
                if self.role is Role.DESTINATION and self._go and not self._started:
                    self._renounced = True  # PROTOCOL.md §7.3 rule 6: we will not start the guest
                return frame
            self._raise_sticky()
        try:
            mtype = TYPE_OF.get(type(msg))
            if mtype is None:
                raise L(AbortCode.INTERNAL_ERROR, f"not a protocol message: {type(msg).__name__}")
            new_state = TRANSITIONS.get((self._state, self.role, mtype))
            if new_state is None or self._discard:
                raise L(AbortCode.PROTOCOL_ERROR,
                        f"the {self.role.value} may not send {type(msg).__name__} in state {self._state}")
            msg = check(msg, L, self.limits)
            extras = ()
            if mtype in (MsgType.HELLO, MsgType.ACCEPT):
                share = integrity.KeyShare(self._rng)
                extras = (share.public, self.limits.max_frame)
            self._guard(self.role, msg, L, extras)
            frame = self._encode(mtype, wire_fields(msg, extras))
            if extras:
                self._share = share
            self._apply(self.role, msg, new_state, frame=frame if extras else None, extras=extras)
            if mtype in (MsgType.ABORT, MsgType.REFUSE):
                self._discard = True
                self._buf.clear()
            return frame
        except ProtocolError as e:
            self._fail(e)

    def _encode(self, mtype: MsgType, fields: list) -> bytes:
        body = encode_body(mtype, fields, seq=self._send_seq, key=self._send_key)
        self._check_send_size(len(body))
        self._send_seq += 1
        return PREFIX.pack(len(body)) + body

    def _check_send_size(self, size: int):
        limit = self.max_send_frame if self._send_key is not None else MIN_MAX_FRAME
        if size > limit:
            raise LocalProtocolError(AbortCode.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds {limit}")

    def send_pages(self, round: int, enc_pfns, enc_headers: bytes, enc_data: bytes, shr_pfns,
                   shr_data: bytes) -> bytes:
        """Fast path for a Pages frame: columns go to the wire as one bin each, no per-page objects."""
        return b"".join(self.send_pages_parts(round, enc_pfns, enc_headers, enc_data, shr_pfns, shr_data))

    def send_pages_parts(self, round: int, enc_pfns, enc_headers, enc_data, shr_pfns, shr_data) -> list:
        """`send_pages` as the frame's pieces in order, for a scatter-gather write: the small ones joined,
        the two page columns (`shr_data`, `enc_data`) as the caller's own buffers, never copied into a
        joined frame (1 MiB per batch). Their concatenation is exactly `send_pages`'s frame."""
        L = LocalProtocolError
        if self._error is not None:
            self._raise_sticky()
        try:
            new_state = TRANSITIONS.get((self._state, self.role, MsgType.PAGES))
            if new_state is None or self._discard:
                raise L(AbortCode.PROTOCOL_ERROR,
                        f"the {self.role.value} may not send Pages in state {self._state}")
            ep = _pfn_column(enc_pfns, "enc_pfns")
            sp = _pfn_column(shr_pfns, "shr_pfns")
            if type(round) is not int or not (0 <= round <= 0xFFFFFFFF):
                raise L(AbortCode.PROTOCOL_ERROR, f"round must be a u32, got {round!r}")
            ne, ns = len(ep), len(sp)
            for name, col, want in (("enc_headers", enc_headers, ne * SEV_HDR_SIZE),
                                    ("enc_data", enc_data, ne * PAGE_SIZE),
                                    ("shr_data", shr_data, ns * PAGE_SIZE)):
                if not isinstance(col, (bytes, bytearray, memoryview)):
                    raise L(AbortCode.PROTOCOL_ERROR, f"{name} must be bytes, got {type(col).__name__}")
                if memoryview(col).nbytes != want:
                    raise L(AbortCode.PROTOCOL_ERROR, f"{name} is {memoryview(col).nbytes} bytes, "
                                                      f"expected {want}")
            msg = Pages(round=round, enc_pfns=ep, enc_headers=enc_headers, enc_data=enc_data,
                        shr_pfns=sp, shr_data=shr_data)
            self._guard(self.role, msg, L)
            parts = self._encode_pages_parts(round, ep, enc_headers, enc_data, sp, shr_data)
            self._apply(self.role, msg, new_state)
            return parts
        except ProtocolError as e:
            self._fail(e)

    def _encode_pages(self, round: int, ep: np.ndarray, enc_headers, enc_data, sp: np.ndarray, shr_data) -> bytes:
        return b"".join(self._encode_pages_parts(round, ep, enc_headers, enc_data, sp, shr_data))

    def _encode_pages_parts(self, round: int, ep: np.ndarray, enc_headers, enc_data, sp: np.ndarray,
                            shr_data) -> list:
        pieces, size = encode_pages_body_parts(round, ep, enc_headers, enc_data, sp, shr_data,
                                               seq=self._send_seq, key=self._send_key)
        self._check_send_size(size)
        self._send_seq += 1
        # pieces: head, ep, bin_hdr, enc_headers, bin_hdr, sp, bin_hdr, shr_data, bin_hdr, enc_data, tail
        small = b"".join([PREFIX.pack(size), *pieces[:7]])
        parts = [small]
        for big, after in ((pieces[7], pieces[8]), (pieces[9], pieces[10])):
            if _nbytes(big):
                parts.append(big)
                parts.append(after)
            else:
                parts[-1] += after      # a few bytes: joined to the small piece before
        return parts


_U64LE = np.dtype("<u8")


def _pfn_column(pfns, name: str) -> np.ndarray:
    """A contiguous little-endian u64 array of page frame numbers, from a numpy array or ints."""
    if type(pfns) is np.ndarray and pfns.dtype == _U64LE and pfns.ndim == 1 and pfns.flags.c_contiguous:
        return pfns  # the fast path: what the migration engine hands us
    try:
        a = np.asarray(pfns)
        if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise LocalProtocolError(AbortCode.PROTOCOL_ERROR, f"{name} must be a 1-d array of integers")
        if a.size and np.issubdtype(a.dtype, np.signedinteger) and int(a.min()) < 0:
            raise LocalProtocolError(AbortCode.PROTOCOL_ERROR, f"{name} contains a negative pfn")
        return np.ascontiguousarray(a, dtype="<u8")
    except (OverflowError, ValueError, TypeError) as e:
        raise LocalProtocolError(AbortCode.PROTOCOL_ERROR, f"{name}: {e}") from None


# ------------------------------------------------------------------ frame codec (stateless)
def decode_body(body, *, key: bytes | None, limits: Limits, expected_seq: int | None = None,
                unauth_abort_ok: bool = False, on_type: Callable[[MsgType], None] | None = None):
    """Decode one frame body in the order of PROTOCOL.md §9.3: header, seq, MAC, type, fields.

    Returns (seq, message or None for a skipped extension frame, extras) where extras is
    (key_share, max_frame) for Hello/Accept and () otherwise. `on_type` is called with the type after the
    MAC verified and before the fields are decoded (the connection checks its state table there).
    Raises RemoteProtocolError or FramingError. No state-dependent guards (that is Connection._guard).
    """
    R = RemoteProtocolError
    rd = Reader(body)
    n = rd.array_header()
    if n < 3:
        raise R(AbortCode.PROTOCOL_ERROR, f"frame array has {n} elements, at least 3 needed")
    mtype = rd.uint("type")
    seq = rd.uint("seq")
    if expected_seq is not None and seq != expected_seq:
        raise R(AbortCode.INTEGRITY_FAILURE,
                f"sequence number {seq}, expected {expected_seq}: replayed, reordered or lost frame")
    # ---- channel MAC (before anything else of the frame is believed)
    has_mac = len(body) >= _MAC_TAIL and body[-_MAC_TAIL:-integrity.MAC_SIZE] == MAC_PREFIX
    has_nil = body[-1:] == NIL
    pages_cols = None
    if key is None:
        if not has_nil:
            raise R(AbortCode.PROTOCOL_ERROR, "handshake frame must end with nil (no channel keys yet)")
    elif has_mac:
        if mtype == MsgType.PAGES:
            pages_cols = _parse_pages(rd, n)
            covered = memoryview(body)[:pages_cols[-1]]
        else:
            covered = memoryview(body)[:-_MAC_TAIL]
        mk = integrity.mac_key(key)
        h = mk.start(seq)
        h.update(covered)
        if not integrity.mac_equal(mk.finish(h), body[-integrity.MAC_SIZE:]):
            raise R(AbortCode.INTEGRITY_FAILURE, "channel MAC mismatch: frame altered or forged")
    elif not (has_nil and mtype == MsgType.ABORT and unauth_abort_ok):
        raise R(AbortCode.INTEGRITY_FAILURE, "frame without channel MAC after the handshake")
    # ---- type
    if mtype not in MsgType._value2member_map_:
        if mtype in IGNORABLE_TYPES and key is not None and has_mac:
            return seq, None, ()
        raise R(AbortCode.PROTOCOL_ERROR, f"unknown message type {mtype}")
    mtype = MsgType(mtype)
    if on_type is not None:
        on_type(mtype)
    # ---- fields
    extras = ()
    if mtype == MsgType.PAGES:
        if pages_cols is None:
            pages_cols = _parse_pages(rd, n)
        return seq, _pages_from_cols(body, pages_cols, R), ()
    obj = strict_unpack(body, max_array=limits.max_vcpus + 16, max_map=max(limits.max_regs, 16))
    want = N_FIELDS[mtype] + 3
    if not isinstance(obj, list):
        raise R(AbortCode.PROTOCOL_ERROR, "frame body is not an array")
    tail = obj[-1]
    if not ((tail is None and not (key is not None and has_mac))
            or (key is not None and has_mac and type(tail) is bytes and len(tail) == integrity.MAC_SIZE)):
        raise R(AbortCode.PROTOCOL_ERROR, "the last element of a frame must be its MAC (bin 8 of 32) or nil")
    if (mtype == MsgType.HELLO and len(obj) > want and obj[2] == MAGIC and type(obj[3]) is int
            and obj[3] > PROTOCOL_VERSION):
        obj = obj[:want - 1] + obj[-1:]  # a later version may append Hello fields (PROTOCOL.md §6.2)
    if len(obj) != want:
        raise R(AbortCode.PROTOCOL_ERROR, f"{CLASS_NAME[mtype]} has {len(obj) - 3} fields, expected {want - 3}")
    fields = obj[2:-1]
    if mtype in (MsgType.HELLO, MsgType.ACCEPT, MsgType.QUERY):
        if type(fields[0]) is not str or fields[0] != MAGIC:
            raise R(AbortCode.PROTOCOL_ERROR, f"bad magic {fields[0]!r}: the peer does not speak {MAGIC!r}")
        if mtype is MsgType.QUERY:
            fields = fields[1:]
        else:
            extras = tuple(fields[-2:])
            fields = fields[1:-2]
            _check_extras(extras[0], extras[1], R)
    return seq, message_from_fields(mtype, fields, R, limits), extras


def _check_extras(share, max_frame, err):
    if not isinstance(share, bytes) or len(share) != integrity.KEY_SHARE_SIZE:
        raise err(AbortCode.PROTOCOL_ERROR, "key_share must be 32 bytes (X25519)")
    if isinstance(max_frame, bool) or not isinstance(max_frame, int) or not (MIN_MAX_FRAME <= max_frame <= MAX_MAX_FRAME):
        raise err(AbortCode.PROTOCOL_ERROR, f"max_frame must be within [{MIN_MAX_FRAME}, {MAX_MAX_FRAME}]")
    if err is RemoteProtocolError:
        try:
            integrity.KeyShare(lambda n: _PROBE_SCALAR).exchange(share)
        except integrity.KeyShareError as e:
            raise err(AbortCode.INTEGRITY_FAILURE, f"unusable key_share: {e}") from None


def _parse_pages(rd: Reader, n: int):
    if n != 9:
        raise RemoteProtocolError(AbortCode.PROTOCOL_ERROR, f"Pages has {n - 3} fields, expected 6")
    rnd = rd.uint("round")
    cols = [rnd]
    for name in ("enc_pfns", "enc_headers", "shr_pfns", "shr_data", "enc_data"):
        cols.append(rd.bin(name))
    _mac_off, mac_len = rd.bin("mac")
    if mac_len != integrity.MAC_SIZE or rd.pos != rd.end:
        raise RemoteProtocolError(AbortCode.PROTOCOL_ERROR, "Pages must end with its 32-byte MAC")
    cols.append(cols[5][0])  # the MAC covers the body up to the first byte of enc_data's payload
    return cols


def _pages_from_cols(body, cols, err):
    rnd, (ep_o, ep_n), (eh_o, eh_n), (sp_o, sp_n), (sd_o, sd_n), (ed_o, ed_n), _ = cols
    if rnd >> 32:
        raise err(AbortCode.PROTOCOL_ERROR, f"round {rnd} out of range for u32")
    if ep_n % 8 or sp_n % 8:
        raise err(AbortCode.PROTOCOL_ERROR, "pfn columns must be a multiple of 8 bytes (u64 LE)")
    ne, ns = ep_n // 8, sp_n // 8
    if eh_n != ne * SEV_HDR_SIZE or ed_n != ne * PAGE_SIZE or sd_n != ns * PAGE_SIZE:
        raise err(AbortCode.PROTOCOL_ERROR,
                  f"Pages columns disagree: {ne} private pfns, {eh_n} header bytes, {ed_n} data bytes, "
                  f"{ns} shared pfns, {sd_n} shared bytes")
    # Zero copy: the columns are read-only views into the received frame (bytes-like memoryviews; the pfn
    # columns numpy uint64 views). Copy them (bytes(...)) only if they must outlive a huge frame.
    mv = memoryview(body)
    return Pages(round=rnd,
                 enc_pfns=np.frombuffer(mv, dtype="<u8", count=ne, offset=ep_o),
                 enc_headers=mv[eh_o:eh_o + eh_n],
                 enc_data=mv[ed_o:ed_o + ed_n],
                 shr_pfns=np.frombuffer(mv, dtype="<u8", count=ns, offset=sp_o),
                 shr_data=mv[sd_o:sd_o + sd_n])


def encode_body(mtype: MsgType, fields: list, *, seq: int, key: bytes | None) -> bytes:
    """Body of a non-Pages frame: [type, seq, *fields, mac] with mac = HMAC(key, body before it) or nil."""
    head = pack([int(mtype), seq, *fields])
    n = len(fields) + 3
    body_wo_mac = array_header(n) + head[len(array_header(n - 1)):]  # same array, one element more
    if key is None:
        return body_wo_mac + NIL
    mk = integrity.mac_key(key)
    h = mk.start(seq)
    h.update(body_wo_mac)
    return body_wo_mac + MAC_PREFIX + mk.finish(h)


def encode_pages_body_parts(round: int, ep: np.ndarray, enc_headers, enc_data, sp: np.ndarray, shr_data, *,
                            seq: int, key: bytes | None) -> tuple[list, int]:
    """Pieces of a Pages body ([5, seq, round, enc_pfns, enc_headers, shr_pfns, shr_data, enc_data, mac])
    and its total length. enc_data comes last so the MAC covers one contiguous prefix of the body: all of
    it up to the first byte of the ciphertext (enc_data's bin header, hence its length, included)."""
    ep_n, sp_n = ep.nbytes, sp.nbytes
    eh_n, enc_n, shr_n = _nbytes(enc_headers), _nbytes(enc_data), _nbytes(shr_data)
    # the small msgpack headers travel with the column before them, so the MAC takes few update() calls
    head = array_header(9) + uint(MsgType.PAGES) + uint(seq) + uint(round) + bin_header(ep_n)
    pieces = [head, ep.data, bin_header(eh_n), enc_headers, bin_header(sp_n), sp.data, bin_header(shr_n),
              shr_data, bin_header(enc_n)]
    if key is None:  # only reachable through testing.forge (Pages is illegal before the keys exist)
        tail = NIL
    else:
        mk = integrity.mac_key(key)
        h = mk.start(seq)
        for p in pieces:
            h.update(p)
        tail = MAC_PREFIX + mk.finish(h)
    size = (len(head) + ep_n + eh_n + sp_n + shr_n + enc_n + len(tail)
            + len(pieces[2]) + len(pieces[4]) + len(pieces[6]) + len(pieces[8]))
    pieces += [enc_data, tail]
    return pieces, size


def _nbytes(b) -> int:
    return b.nbytes if type(b) is memoryview else len(b)


def encode_frame(msg, *, seq: int = 0, key: bytes | None = None, extras=()) -> bytes:
    """One complete frame for `msg` (no state or guard checks; for vectors, tools and tests).
    `extras` = (key_share, max_frame) for Hello/Accept."""
    if isinstance(msg, Pages):
        pieces, size = encode_pages_body_parts(msg.round, _pfn_column(msg.enc_pfns, "enc_pfns"),
                                               msg.enc_headers, msg.enc_data,
                                               _pfn_column(msg.shr_pfns, "shr_pfns"), msg.shr_data,
                                               seq=seq, key=key)
        return b"".join([PREFIX.pack(size), *pieces])
    body = encode_body(TYPE_OF[type(msg)], wire_fields(msg, extras), seq=seq, key=key)
    return PREFIX.pack(len(body)) + body


def decode_frame(frame: bytes, *, key: bytes | None = None, limits: Limits | None = None):
    """Decode one complete frame without a connection: (seq, message, extras). For vectors and tools."""
    frame = bytes(frame)
    if len(frame) < PREFIX.size or PREFIX.unpack_from(frame)[0] != len(frame) - PREFIX.size:
        raise RemoteProtocolError(AbortCode.PROTOCOL_ERROR, "length prefix does not match the frame")
    try:
        return decode_body(frame[PREFIX.size:], key=key, limits=limits or Limits())
    except FramingError as e:
        raise RemoteProtocolError(e.code, e.message) from None
