"""The fault proxy itself: it must forward faithfully when idle and break exactly what it is told.

Frames here are real wire-format bodies (PROTOCOL.md §4: a msgpack array `[type, seq, fields..., mac]`),
and one test runs a real `sevmigd.wire.Connection` handshake through the proxy so the proxy's frame
detection is checked against the codec, not against itself.
Rules: loopback and port 0 only; fail_after on every test.
"""

from __future__ import annotations

import os
import struct

import msgpack
import trio

from sevmigd.testing.faultproxy import (C2S, S2C, Fault, FaultProxy, corrupt_frame, field_spans, frame_type,
                                        parse_head)

MAC = b"\x5a" * 32


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def pages(seq: int, rnd: int, fill: int) -> bytes:
    return frame([5, seq, rnd, (7).to_bytes(8, "little"), b"\x11" * 52, b"", b"", bytes([fill]) * 4096, MAC])


FRAMES = [frame([1, 0, 1, [], {}, "g", 4096, 0, 1, False, "id", b"k" * 32, 65536, None]),
          frame([4, 1, 0, b"p" * 16, b"s" * 16, MAC]),
          pages(2, 0, 0xAA), pages(3, 0, 0xBB), frame([6, 4, 0, 2, 0, MAC]), pages(5, 1, 0xCC),
          frame([7, 6, 8, b"\x0f", MAC]), frame([9, 7, 3, MAC])]


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


def test_frame_detection_matches_the_real_codec():
    """Frames produced by sevmigd.wire (a real handshake and a Pages frame) are recognised by type."""
    from sevmigd.wire import Connection, Role
    from sevmigd.wire import messages as m
    from sevmigd.wire.limits import Limits
    from sevmigd.psp.identity import FleetCA, PlatformIdentity
    from sevmigd.migrate.trust import platform_files
    import numpy as np

    ca = FleetCA.create(os.urandom, rsa_bits=2048)
    ident = PlatformIdentity.create(ca, os.urandom)
    src = Connection(Role.SOURCE, rng=os.urandom, limits=Limits())
    dst = Connection(Role.DESTINATION, rng=os.urandom, limits=Limits())
    hello = src.send(m.Hello(version=1, features=(), platform=platform_files(ident), guest_name="g",
                             memory_bytes=1 << 20, policy=0, vcpus=1, es=False, migration_id="x"))
    assert frame_type(hello[4:]) == "hello"
    dst.receive_data(hello)
    dst.next_event()
    accept = dst.send(m.Accept(version=1, features=(), platform=platform_files(ident)))
    assert frame_type(accept[4:]) == "accept"
    src.receive_data(accept)
    src.next_event()
    start = src.send(m.Start(policy=0, pdh=ident.pdh.encode(), session=b"\0" * 0x80))
    assert frame_type(start[4:]) == "start"
    pg = src.send_pages(0, np.array([3], dtype=np.uint64), b"\x01" * 52, b"\xee" * 4096,
                        np.array([9], dtype=np.uint64), b"\xdd" * 4096)
    name, seq, rnd = parse_head(pg[4:])
    assert (name, seq, rnd) == ("pages", 2, 0)
    spans = field_spans(pg[4:])
    body = pg[4:]
    assert body[slice(*spans["enc_data"])] == b"\xee" * 4096
    assert body[slice(*spans["shr_data"])] == b"\xdd" * 4096
    assert body[slice(*spans["enc_headers"])] == b"\x01" * 52
    assert len(body[slice(*spans["mac"])]) == 32


async def test_transparent_forwarding_and_capture():
    proxy, got = await _run([], FRAMES, capture=True)
    assert got[-1] == b"".join(FRAMES)
    assert proxy.captured(C2S) == b"".join(FRAMES)
    assert proxy.phases_seen == ["handshake", "first_round", "later_round", "stop_copy"]


async def test_corrupt_flips_exactly_one_byte_in_the_named_field():
    proxy, got = await _run([Fault("corrupt", C2S, msg_type="pages", nth=2, field="enc_data")], FRAMES)
    data = got[-1]
    expected = b"".join(FRAMES)
    diff = [i for i in range(len(expected)) if data[i] != expected[i]]
    assert len(diff) == 1
    start = sum(map(len, FRAMES[:3]))
    assert start < diff[0] < start + len(FRAMES[3])
    assert expected[diff[0]] == 0xBB  # inside the enc_data bytes of the second pages frame
    assert proxy.fired()[0].fired_info.startswith("c2s pages #2")


async def test_phase_triggers():
    # later_round: the first Pages frame of round 1; stop_copy nth=1: the Bitmap
    proxy, got = await _run([Fault("drop_frame", phase="later_round")], FRAMES)
    assert got[-1] == b"".join(FRAMES[:5] + FRAMES[6:])
    proxy, got = await _run([Fault("corrupt", phase="stop_copy", field="bits")], FRAMES)
    expected = b"".join(FRAMES)
    diff = [i for i in range(len(expected)) if got[-1][i] != expected[i]]
    assert len(diff) == 1 and expected[diff[0]] == 0x0F
    proxy, got = await _run([Fault("drop_frame", phase="first_round", nth=2)], FRAMES)
    assert got[-1] == b"".join(FRAMES[:3] + FRAMES[4:])


async def test_drop_duplicate_and_reorder():
    _, got = await _run([Fault("drop_frame", C2S, msg_type="pages", nth=1)], FRAMES)
    assert got[-1] == b"".join(FRAMES[:2] + FRAMES[3:])
    _, got = await _run([Fault("duplicate", C2S, msg_type="hello")], FRAMES)
    assert got[-1] == FRAMES[0] + b"".join(FRAMES)
    _, got = await _run([Fault("reorder", C2S, msg_type="pages", nth=1)], FRAMES)
    assert got[-1] == b"".join(FRAMES[:2] + [FRAMES[3], FRAMES[2]] + FRAMES[4:])


async def test_call_runs_the_action_at_the_trigger():
    hits = []
    _, got = await _run([Fault("call", C2S, msg_type="round_end", action=lambda: hits.append(1), hold=True)],
                        FRAMES)
    assert hits == [1]
    assert got[-1] == b"".join(FRAMES[:4] + FRAMES[5:])


async def test_reset_reaches_the_peer_as_rst():
    _, got = await _run([Fault("reset", C2S, msg_type="pages", nth=1)], FRAMES)
    assert got[-2] == "RST"
    assert b"".join(FRAMES[:2]).startswith(got[-1])  # nothing of the triggering frame or later


async def test_truncate_forwards_half_then_eof():
    _, got = await _run([Fault("truncate", C2S, msg_type="start")], FRAMES)
    assert got[-2] == "EOF"
    assert got[-1] == FRAMES[0] + FRAMES[1][:len(FRAMES[1]) // 2]


def test_corrupt_length_prefix():
    f = FRAMES[0]
    assert corrupt_frame(f, "length")[:4] != f[:4]
    assert corrupt_frame(f, "length")[4:] == f[4:]
