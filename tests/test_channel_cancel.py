"""An operator's cancel reaches the peer as CANCELLED even when it lands in the middle of a frame.

Cancelling `send_all` halfway leaves the stream unusable (half a frame on a plain socket; trio marks a TLS
stream broken), so the peer would only see a truncated conversation (PROTOCOL_ERROR). The channel finishes
the frame first (bounded), then sends the Abort. Lockstep streams make "in the middle of a frame" exact:
the sender's `send_all` returns only when the reader has taken every byte.
"""

from __future__ import annotations

import numpy as np
import trio
import trio.testing

from sevmigd.daemon.channel import ABORT_SEND_TIMEOUT_S, run_channel
from sevmigd.migrate.errors import MigrationError
from sevmigd.units import PAGE_SIZE
from sevmigd.wire import CLOSED, NEED_DATA
from sevmigd.wire import messages as m
from sevmigd.wire.connection import State
from sevmigd.wire.errors import AbortCode, RemoteProtocolError
from sevmigd.wire.testing import pair

NPAGES = 64  # one Pages frame of 256 KiB: many lockstep reads


async def _read_events(stream, conn, got: list, chunk: int, first_chunk_read: trio.Event):
    """The destination's side, reading `chunk` bytes at a time until the source closes."""
    while True:
        data = await stream.receive_some(chunk)
        first_chunk_read.set()
        conn.receive_data(data)
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as err:  # e.g. "connection closed by the peer" mid-frame
                got.append(err)
                return
            if ev is NEED_DATA:
                break
            if ev is CLOSED or isinstance(ev, m.Abort):
                got.append(ev)
                return
            got.append(ev)
        if not data:
            return


async def _run(*, cancel_mid_frame: bool):
    src, dst = pair(until=State.PRECOPY)
    s_stream, d_stream = trio.testing.lockstep_stream_pair()
    got: list = []
    first_chunk_read = trio.Event()
    outcome: list = []
    pfns = np.arange(NPAGES, dtype=np.uint64)
    shared = bytes(PAGE_SIZE * NPAGES)

    async def body(ch):
        async with trio.open_nursery() as n:
            async def cancel_when_writing():
                await first_chunk_read.wait()   # the frame is partly on the wire, the write still blocked
                ch.fail_between_frames(MigrationError(AbortCode.CANCELLED, "cancelled by the operator"))
            if cancel_mid_frame:
                n.start_soon(cancel_when_writing)
            await ch.send_pages(0, np.empty(0, np.uint64), b"", b"", pfns, shared)
            await trio.sleep_forever()  # the next frame would come here; the cancel must stop us

    async def source():
        try:
            await run_channel(s_stream, src, body, peer="dst", keepalive_interval_s=60, peer_timeout_s=60)
        except MigrationError as err:
            outcome.append(err)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(source)
            n.start_soon(_read_events, d_stream, dst, got, 4096, first_chunk_read)
    return outcome, got


async def test_cancel_during_a_frame_finishes_it_and_the_peer_reads_cancelled():
    outcome, got = await _run(cancel_mid_frame=True)
    assert [e.code for e in outcome] == [AbortCode.CANCELLED]
    # The whole Pages frame arrived intact (its MAC verified), then our reason.
    assert isinstance(got[0], m.Pages) and len(got[0].shr_pfns) == NPAGES
    assert isinstance(got[-1], m.Abort) and got[-1].code == AbortCode.CANCELLED


async def test_a_plain_fail_mid_frame_cuts_the_frame(monkeypatch):
    """What the deferral avoids: `fail()` cancels the write, the stream is unusable, no Abort follows."""
    import sevmigd.daemon.channel as channel

    monkeypatch.setattr(channel.Channel, "fail_between_frames", channel.Channel.fail)
    outcome, got = await _run(cancel_mid_frame=True)
    assert [e.code for e in outcome] == [AbortCode.CANCELLED]
    assert not any(isinstance(e, m.Abort) for e in got)
    assert isinstance(got[-1], RemoteProtocolError) and got[-1].code == AbortCode.PROTOCOL_ERROR


def test_the_deferral_is_bounded():
    assert 0 < ABORT_SEND_TIMEOUT_S <= 5
