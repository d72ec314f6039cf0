"""The channel's zero-copy read over plain TCP (daemon/channel.py): the rest of a large frame is read with
recv_into straight into its reassembly buffer, SO_RCVLOWAT raised meanwhile. Real loopback TCP.

What must hold: the messages are those sent, whatever the segmentation; and a small message that follows
a large frame is delivered while the sender stays silent (the raised low-water mark must never make the
reader wait for bytes that will not come)."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from sevmigd.daemon import channel as channel_mod
from sevmigd.daemon.channel import run_channel
from sevmigd.units import PAGE_SIZE
from sevmigd.wire import NEED_DATA
from sevmigd.wire import messages as m
from sevmigd.wire.connection import State
from sevmigd.wire.testing import pair, sample_hello

NPAGES = 1024


def _pages(lo: int, n: int, fill: int) -> m.Pages:
    pfns = np.arange(lo, lo + n, dtype=np.uint64)
    return m.Pages(round=0, enc_pfns=np.zeros(0, dtype=np.uint64), enc_headers=b"", enc_data=b"",
                   shr_pfns=pfns, shr_data=bytes([fill]) * (n * PAGE_SIZE))


async def _tcp_pair():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def test_large_frames_then_a_small_message_over_tcp_while_the_sender_waits(monkeypatch):
    src, dst = pair(hello=sample_hello(memory_bytes=NPAGES * PAGE_SIZE), until=State.PRECOPY)
    direct_reads = []
    real = channel_mod.Channel._recv_into

    TAIL = 100 * 1024
    at_tail = trio.Event()

    async def counting(self, sock, checks, view, lowat):
        if len(view) <= TAIL:
            at_tail.set()                  # reading the last bytes of the large frame
        n = await real(self, sock, checks, view, lowat)
        direct_reads.append(n)
        return n

    monkeypatch.setattr(channel_mod.Channel, "_recv_into", counting)
    sent = [_pages(0, 256, 1), _pages(256, 300, 2), _pages(600, 3, 3)]
    client, server = await _tcp_pair()
    got: list = []
    all_in = trio.Event()

    async def body(ch):
        with trio.fail_after(60):          # a reader stuck on the low-water mark would hang here
            for _ in range(len(sent) + 1):
                got.append(await ch.receive())
        all_in.set()

    async def sender():
        wire = [src.send(p) for p in sent]
        await client.send_all(wire[0])
        await client.send_all(wire[1][:-TAIL])
        # The reader waits for the rest of frame 2 (blocked in the kernel, not merely scheduled): then the
        # last 100 KiB, the small frame and RoundEnd follow, far less than DIRECT_LOWAT_MAX.
        await at_tail.wait()
        await trio.testing.wait_all_tasks_blocked()
        await client.send_all(wire[1][-TAIL:] + wire[2] + src.send(m.RoundEnd(round=0, pages=559, remaining=0)))
        await all_in.wait()                # silent (not closed) until the reader has everything
        await client.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(sender)
        await run_channel(server, dst, body, peer="test", keepalive_interval_s=3600, peer_timeout_s=3600)
    assert got[:3] == sent and isinstance(got[3], m.RoundEnd)
    assert direct_reads and sum(direct_reads) > PAGE_SIZE * 256  # most of the large frames came that way


async def test_tls_and_other_streams_take_the_plain_path():
    a, b = trio.testing.memory_stream_pair()
    assert channel_mod._direct_socket(a) == (None, ())
    client, server = await _tcp_pair()
    sock, checks = channel_mod._direct_socket(server)
    assert sock is server.socket and checks == ()
    for s in (client, server):
        await s.aclose()


async def test_frames_written_with_sendmsg_arrive_whole_through_partial_writes(monkeypatch):
    """The sender writes each Pages frame's pieces with sendmsg; a small send buffer and a reader that
    takes 1000 bytes at a time force partial writes in the middle of pieces."""
    import socket

    src, dst = pair(hello=sample_hello(memory_bytes=NPAGES * PAGE_SIZE), until=State.PRECOPY)
    calls = []
    real = channel_mod.Channel._sendmsg_all

    async def counting(self, parts):
        calls.append(len(parts))
        await real(self, parts)

    monkeypatch.setattr(channel_mod.Channel, "_sendmsg_all", counting)
    client, server = await _tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = [_pages(0, 256, 1), _pages(256, 7, 2), _pages(263, 300, 3)]
    got: list = []

    async def reader():
        while len(got) < len(sent):
            dst.receive_data(await server.receive_some(1000))
            while (ev := dst.next_event()) is not NEED_DATA:
                got.append(ev)

    async def body(ch):
        for p in sent:
            await ch.send_pages(p.round, p.enc_pfns, p.enc_headers, p.enc_data, p.shr_pfns, p.shr_data)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        with trio.fail_after(60):
            await run_channel(client, src, body, peer="test", keepalive_interval_s=3600, peer_timeout_s=3600)
    assert got == sent
    assert len(calls) == len(sent)


def _tls_contexts(tmp_path):
    """A server and a client context over one self-signed P-256 certificate (no verification: the test is
    about reading records, not about who is trusted; test_tls.py covers that)."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "channel-test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    out = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        out.append(ctx)
    return out


async def test_tls_records_already_received_are_taken_without_waiting(tmp_path, monkeypatch):
    """Over TLS the read loop takes the records trio already read from the socket in one go
    (`_tls_ready`); the messages are those sent, and a small one after large frames still arrives while
    the sender waits."""
    server_ctx, client_ctx = _tls_contexts(tmp_path)
    src, dst = pair(hello=sample_hello(memory_bytes=NPAGES * PAGE_SIZE), until=State.PRECOPY)
    taken = []
    real = channel_mod._tls_ready

    def counting(obj):
        data = real(obj)
        if data is not None:
            taken.append(len(data))
        return data

    monkeypatch.setattr(channel_mod, "_tls_ready", counting)
    client_tcp, server_tcp = await _tcp_pair()
    client = trio.SSLStream(client_tcp, client_ctx, server_hostname="channel-test")
    server = trio.SSLStream(server_tcp, server_ctx, server_side=True)
    sent = [_pages(0, 256, 1), _pages(256, 300, 2), _pages(600, 3, 3)]
    got: list = []
    all_in = trio.Event()

    async def body(ch):
        with trio.fail_after(60):
            for _ in range(len(sent) + 1):
                got.append(await ch.receive())
        all_in.set()

    async def sender():
        for p in sent:
            await client.send_all(src.send(p))
        await client.send_all(src.send(m.RoundEnd(round=0, pages=559, remaining=0)))
        await all_in.wait()
        await client.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(server.do_handshake)
        await client.do_handshake()
        n.start_soon(sender)
        await run_channel(server, dst, body, peer="test", keepalive_interval_s=3600, peer_timeout_s=3600)
    assert got[:3] == sent and isinstance(got[3], m.RoundEnd)
    assert taken and sum(taken) > PAGE_SIZE * 100    # records were taken without a receive_some each


def test_a_broken_tls_record_is_a_broken_stream():
    import ssl

    class Broken:
        def read(self, n):
            raise ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")

    class Waiting:
        def read(self, n):
            raise ssl.SSLWantReadError()

    with pytest.raises(trio.BrokenResourceError) as info:
        channel_mod._tls_ready(Broken())
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert channel_mod._tls_ready(Waiting()) is None
