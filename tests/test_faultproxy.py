"""The fault proxy itself: it must forward faithfully when idle and break exactly what it is told.

Rules: loopback and port 0 only; fail_after on every test.
"""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio

from sevmigd.testing.faultproxy import C2S, Fault, FaultProxy, corrupt_frame


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def _sink(received: list, done: trio.Event, *, task_status):
    async def handler(stream):
        buf = b""
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                received.append("RST")
                break
            if not data:
                received.append("EOF")
                break
            buf += data
        received.append(buf)
        done.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def _run(faults, frames, *, capture=False):
    received: list = []
    done = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            port = await n.start(_sink, received, done)
            proxy = FaultProxy("127.0.0.1", port, faults, capture=capture)
            pport = await n.start(proxy.serve)
            s = await trio.open_tcp_stream("127.0.0.1", pport)
            for f in frames:
                try:
                    await s.send_all(f)
                except trio.BrokenResourceError:
                    break
            try:
                await s.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await done.wait()
            await s.aclose()
            n.cancel_scope.cancel()
    return proxy, received


FRAMES = [frame({"t": "hello", "v": 1}), frame({"t": "pages", "enc_data": b"\xaa" * 64}),
          frame({"t": "pages", "enc_data": b"\xbb" * 64}), frame({"t": "complete"})]


async def test_transparent_forwarding_and_capture():
    proxy, got = await _run([], FRAMES, capture=True)
    assert got[-1] == b"".join(FRAMES)
    assert proxy.captured(C2S) == b"".join(FRAMES)
    assert proxy.phase == "stop_copy"


async def test_corrupt_flips_exactly_one_byte_in_the_named_field():
    proxy, got = await _run([Fault("corrupt", C2S, msg_type="pages", nth=2, field="enc_data")], FRAMES)
    data = got[-1]
    expected = b"".join(FRAMES)
    diff = [i for i in range(len(expected)) if data[i] != expected[i]]
    assert len(diff) == 1
    start = len(FRAMES[0]) + len(FRAMES[1])
    assert start < diff[0] < start + len(FRAMES[2])
    assert expected[diff[0]] == 0xBB  # inside the enc_data bytes of the second pages frame
    assert proxy.fired()[0].fired_info.startswith("c2s pages #2")


async def test_drop_duplicate_and_reorder():
    _, got = await _run([Fault("drop_frame", C2S, msg_type="pages", nth=1)], FRAMES)
    assert got[-1] == FRAMES[0] + FRAMES[2] + FRAMES[3]
    _, got = await _run([Fault("duplicate", C2S, msg_type="hello")], FRAMES)
    assert got[-1] == FRAMES[0] + b"".join(FRAMES)
    _, got = await _run([Fault("reorder", C2S, msg_type="pages", nth=1)], FRAMES)
    assert got[-1] == FRAMES[0] + FRAMES[2] + FRAMES[1] + FRAMES[3]


async def test_reset_reaches_the_peer_as_rst():
    _, got = await _run([Fault("reset", C2S, msg_type="pages", nth=1)], FRAMES)
    assert got[-2] == "RST"
    assert got[-1] == FRAMES[0]


def test_corrupt_length_prefix():
    f = FRAMES[0]
    assert corrupt_frame(f, "length")[:4] != f[:4]
    assert corrupt_frame(f, "length")[4:] == f[4:]
