"""Fair admission of incoming migration connections: connections that have not been accepted at Hello
cannot starve a real migration.

Owns `PreHelloSlots` (the listener's book of connections not yet accepted at Hello), `WatchedStream`
(records whether a peer has sent anything yet) and `hello_accepted()`, which the destination calls once
a Hello has passed every check (the connection then leaves the book: it is a session, bounded by
`max_incoming` and by the destination's Start and stall deadlines instead).

Policy. At most `max_unauthenticated` connections may wait for their Hello to be accepted. When a new
connection arrives and the book is full, the new one is not refused (a flood would then refuse every
real source); instead the stalest waiting connection is evicted: one whose peer has sent nothing yet
before one that has, the oldest first within each group. A real source sends its first bytes (TLS
ClientHello or Hello) at once, so an idle flood evicts only itself; each waiting connection is also
bounded by `handshake_timeout_s`. An evicted connection is cancelled and its stream is marked closed,
so it is gone at once (no Abort sent to it, no linger).

What this does not do: tell apart two peers behind one address (every test peer is 127.0.0.1), or stop
a peer that sends garbage fast (it gets a protocol error and is closed at its first frame).

Must never: evict a connection whose Hello was accepted (a migration in progress).
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable

import trio

_current: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "sevmigd_incoming_slot", default=None)


def hello_accepted() -> None:
    """The current incoming connection's Hello passed every check: it can no longer be evicted.
    No-op outside a listener connection (in-process tests driving the destination directly)."""
    fn = _current.get()
    if fn is not None:
        fn()


class Slot:
    """One connection waiting for its Hello to be accepted."""

    __slots__ = ("seq", "peer", "scope", "active", "evicted", "book")

    def __init__(self, seq: int, peer: str, book: PreHelloSlots):
        self.seq = seq
        self.peer = peer
        self.scope = trio.CancelScope()
        self.active = False      # the peer has sent at least one byte
        self.evicted = False
        self.book: PreHelloSlots | None = book

    def accepted(self) -> None:
        if self.book is not None:
            self.book._remove(self)

    def release(self) -> None:
        self.accepted()


class PreHelloSlots:
    """The book of connections not yet accepted at Hello (see the module docstring)."""

    def __init__(self) -> None:
        self._slots: dict[int, Slot] = {}  # insertion (= arrival) order
        self._seq = itertools.count()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def admit(self, peer: str, capacity: int) -> tuple[Slot, list[Slot]]:
        """Book a new connection; returns (its slot, the slots evicted to make room for it)."""
        evicted = []
        while len(self._slots) >= max(1, capacity):
            victim = self._stalest()
            self._remove(victim)
            victim.evicted = True
            victim.scope.cancel()
            evicted.append(victim)
        self.evictions += len(evicted)
        slot = Slot(next(self._seq), peer, self)
        self._slots[slot.seq] = slot
        return slot, evicted

    def _stalest(self) -> Slot:
        for slot in self._slots.values():  # oldest first
            if not slot.active:
                return slot
        return next(iter(self._slots.values()))

    def _remove(self, slot: Slot) -> None:
        self._slots.pop(slot.seq, None)
        slot.book = None

    def bind(self, slot: Slot) -> contextvars.Token:
        """Make `slot` the current task's (for hello_accepted); reset with `unbind(token)`."""
        return _current.set(slot.accepted)

    @staticmethod
    def unbind(token: contextvars.Token) -> None:
        _current.reset(token)


class WatchedStream(trio.abc.HalfCloseableStream):
    """A stream that marks its slot active at the first byte received, and fails every operation once
    its slot is evicted (so the cancelled connection's clean-up does not talk to the peer)."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, slot: Slot):
        self.transport_stream = stream
        self._slot = slot

    def _check(self) -> None:
        if self._slot.evicted:
            raise trio.ClosedResourceError("evicted: too many connections waiting for their hello")

    async def send_all(self, data) -> None:
        self._check()
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self._check()
        await self.transport_stream.send_eof()

    async def receive_some(self, max_bytes=None):
        self._check()
        data = await self.transport_stream.receive_some(max_bytes)
        if data:
            self._slot.active = True
        return data

    async def aclose(self) -> None:
        await self.transport_stream.aclose()

    def setsockopt(self, *args, **kwargs):  # pragma: no cover - passthrough for tune_tcp-style callers
        return self.transport_stream.setsockopt(*args, **kwargs)

    @property
    def socket(self):
        return self.transport_stream.socket


__all__ = ["PreHelloSlots", "Slot", "WatchedStream", "hello_accepted"]
