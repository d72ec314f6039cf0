"""Connection-level tests of the wire protocol: the whole conversation, every state x every message, the
hand-off rules, sticky errors, framing limits, and the channel integrity (replay, reorder, tamper).

Pure tests (no I/O): two Connection objects talk through bytes. Deterministic rngs from
sevmigd.wire.testing so failures reproduce.
"""

from __future__ import annotations

import numpy as np
import pytest

from sevmigd.wire import (CLOSED, NEED_DATA, TRANSITIONS, AbortCode, Connection, Limits, LocalProtocolError,
                          RemoteProtocolError, Role, State, messages as m)
from sevmigd.wire.connection import DIRECT_READ_MIN
from sevmigd.wire.framing import PREFIX, array_header, bin_header, uint
from sevmigd.wire.limits import MIN_MAX_FRAME, PAGE_SIZE, SEV_HDR_SIZE
from sevmigd.wire.messages import MsgType
from sevmigd.wire.testing import (fixed_rng, forge, pair, sample_accept, sample_hello, sample_pages,
                                  sample_start, sample_vcpu_state, script, transfer)

S, D = Role.SOURCE, Role.DESTINATION
# (the settlement query's own states, QUERIED and ANSWERED, are off the migration's path: test_wire_query.py)
LIVE_STATES = [s for s in State if s not in (State.REFUSED, State.ABORTED, State.ERROR, State.QUERIED,
                                             State.ANSWERED)]


def expect(exc_type, code, fn, *args):
    with pytest.raises(exc_type) as ei:
        fn(*args)
    assert ei.value.code == code, ei.value
    return ei.value


# ------------------------------------------------------------------------------------------ conversation
@pytest.mark.parametrize("es", [False, True])
def test_full_conversation_reaches_done_with_handoff_to_destination(es):
    hello = sample_hello(es=es, vcpus=3)
    src = Connection(S, rng=fixed_rng("a"))
    dst = Connection(D, rng=fixed_rng("b"))
    for role, make in script(hello):
        a, b = (src, dst) if role is S else (dst, src)
        msg = make()
        assert transfer(a, b, msg) == msg
        assert src.state == dst.state
        if isinstance(msg, m.Go):
            assert src.handoff == dst.handoff == "uncertain"
        elif not isinstance(msg, m.Started):
            assert src.handoff == dst.handoff == "source"
    assert src.state == dst.state == "DONE"
    assert src.handoff == dst.handoff == "destination"
    assert src.session_id == dst.session_id and len(src.session_id) == 32
    assert src.pages_total == dst.pages_total == 4
    src.receive_data(b"")
    assert src.next_event() is CLOSED
    assert src.next_event() is CLOSED


def test_keys_differ_per_connection_and_direction():
    a, _ = pair(until=State.ACCEPTED, seed=1)
    b, _ = pair(until=State.ACCEPTED, seed=2)
    assert a.session_id != b.session_id
    assert a._send_key != a._recv_key


def test_refuse_ends_the_conversation():
    src, dst = pair(until=State.HELLO_SENT)
    ev = transfer(dst, src, m.Refuse(AbortCode.UNTRUSTED_PLATFORM, "unknown ARK"))
    assert ev == m.Refuse(AbortCode.UNTRUSTED_PLATFORM, "unknown ARK")
    assert src.state == dst.state == "REFUSED" and src.handoff == "source"
    src.receive_data(b"")
    assert src.next_event() is CLOSED
    with pytest.raises(LocalProtocolError):
        src.send(sample_start(sample_hello()))


def test_multiple_frames_in_one_read_and_byte_by_byte():
    src, dst = pair(until=State.PRECOPY)
    data = src.send(sample_pages(0, [3, 4], [5])) + src.send(m.RoundEnd(0, 3, 0)) + src.send(m.Bitmap(64, bytes(8)))
    got = []
    for i in range(len(data)):
        dst.receive_data(data[i:i + 1])
        while (ev := dst.next_event()) is not NEED_DATA:
            got.append(ev)
    assert [type(e) for e in got] == [m.Pages, m.RoundEnd, m.Bitmap]
    src2, dst2 = pair(until=State.PRECOPY)
    dst2.receive_data(src2.send(sample_pages(0, [3], [])) + src2.send(m.RoundEnd(0, 1, 0)))
    assert isinstance(dst2.next_event(), m.Pages) and isinstance(dst2.next_event(), m.RoundEnd)
    assert dst2.next_event() is NEED_DATA


# ------------------------------------------------------------------------------------------ state matrix
def _any_message(mtype: MsgType, hello: m.Hello):
    return {
        MsgType.HELLO: hello, MsgType.ACCEPT: sample_accept(),
        MsgType.REFUSE: m.Refuse(AbortCode.POLICY_REFUSED, "no"), MsgType.START: sample_start(hello),
        MsgType.PAGES: sample_pages(0, [1], []), MsgType.ROUND_END: m.RoundEnd(0, 0, 0),
        MsgType.BITMAP: m.Bitmap(64, bytes(8)), MsgType.VCPU_STATE: sample_vcpu_state(hello),
        MsgType.COMPLETE: m.Complete(0), MsgType.READY: m.Ready(), MsgType.GO: m.Go(),
        MsgType.STARTED: m.Started(), MsgType.KEEPALIVE: m.Keepalive(),
        MsgType.ABORT: m.Abort(AbortCode.CANCELLED, "bye"),
        MsgType.QUERY: m.Query(1, "mig-1", "ab" * 16),
        MsgType.ANSWER: m.Answer("ab" * 16, m.OUTCOME_UNKNOWN, ""),
    }[mtype]


@pytest.mark.parametrize("state", LIVE_STATES, ids=str)
@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.name)
@pytest.mark.parametrize("sender", [S, D], ids=lambda r: r.value)
def test_every_state_every_message(state, mtype, sender):
    """Illegal sends raise LocalProtocolError at the sender; the same frame forged onto the wire raises
    RemoteProtocolError(PROTOCOL_ERROR) at the receiver. Legal ones are accepted by both."""
    hello = sample_hello()
    src, dst = pair(hello=hello, until=state)
    a, b = (src, dst) if sender is S else (dst, src)
    msg = _any_message(mtype, hello)
    legal = (state, sender, mtype) in TRANSITIONS
    if not legal:
        err = expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, a.send, msg)
        assert a.state == "ERROR" and a.error is err
        b.receive_data(forge(a, msg))
        expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, b.next_event)
        assert b.state == "ERROR"
    else:
        # legal by the table; the content guards may still refuse the sample (e.g. a round count), but
        # never with a "state" error, and sender and receiver agree.
        try:
            data = a.send(msg)
        except LocalProtocolError as e:
            assert "in state" not in e.message
            b.receive_data(forge(a, msg))
            with pytest.raises(RemoteProtocolError) as ei:
                b.next_event()
            assert ei.value.code == e.code
        else:
            b.receive_data(data)
            assert b.next_event() == msg
            assert a.state == b.state == TRANSITIONS[(state, sender, mtype)]


def test_messages_after_peer_abort_are_errors():
    src, dst = pair(until=State.PRECOPY)
    assert transfer(dst, src, m.Abort(AbortCode.SHUTDOWN, "going down")).code is AbortCode.SHUTDOWN
    assert src.state == "ABORTED"
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, src.send, m.RoundEnd(0, 0, 0))
    src2, dst2 = pair(until=State.PRECOPY)
    transfer(dst2, src2, m.Abort(AbortCode.SHUTDOWN, "x"))
    src2.receive_data(forge(dst2, m.Keepalive()))
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, src2.next_event)


def test_after_sending_abort_in_flight_frames_are_discarded():
    src, dst = pair(until=State.PRECOPY)
    in_flight = src.send(sample_pages(0, [1], []))
    dst.send(m.Abort(AbortCode.CANCELLED, "operator"))
    dst.receive_data(in_flight)
    assert dst.next_event() is NEED_DATA
    dst.receive_data(b"")
    assert dst.next_event() is CLOSED


# ------------------------------------------------------------------------------------------ hand-off
def test_destination_abort_after_go_gives_the_guest_back_to_the_source():
    src, dst = pair(until=State.GO)
    assert src.handoff == "uncertain"
    transfer(dst, src, m.Abort(AbortCode.FIRMWARE_ERROR, "RECEIVE_FINISH failed"))
    assert src.handoff == dst.handoff == "source"


def test_source_abort_after_go_does_not_revoke_go():
    src, dst = pair(until=State.GO)
    transfer(src, dst, m.Abort(AbortCode.SHUTDOWN, "x"))
    assert src.handoff == dst.handoff == "uncertain"


def test_eof_after_go_is_an_error_and_leaves_uncertain():
    src, dst = pair(until=State.GO)
    src.receive_data(b"")
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, src.next_event)
    assert src.handoff == "uncertain"


def test_abort_and_go_crossing_gives_a_consistent_answer():
    """The destination aborts in READY while the source sends Go: the destination discards Go (it never
    starts) and the source, seeing the destination's Abort in GO, may resume."""
    src, dst = pair(until=State.READY)
    go = src.send(m.Go())
    abort = dst.send(m.Abort(AbortCode.TIMEOUT, "gave up"))
    dst.receive_data(go)
    assert dst.next_event() is NEED_DATA and dst.handoff == "source"
    src.receive_data(abort)
    assert isinstance(src.next_event(), m.Abort)
    assert src.handoff == "source"


@pytest.mark.parametrize("state", [State.PRECOPY, State.COMPLETE, State.READY], ids=str)
def test_eof_before_go_keeps_the_guest_at_the_source(state):
    src, dst = pair(until=state)
    dst.receive_data(b"")
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)
    assert dst.handoff == src.handoff == "source"


# ------------------------------------------------------------------------------------------ sticky errors
def test_errors_are_sticky_but_one_abort_may_be_sent():
    src, dst = pair(until=State.PRECOPY)
    dst.receive_data(forge(src, m.Go()))
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)
    for call in (dst.next_event, lambda: dst.receive_data(b"x"), lambda: dst.send(m.Keepalive())):
        with pytest.raises(RemoteProtocolError):
            call()
    frame = dst.send(m.Abort(AbortCode.PROTOCOL_ERROR, "bad frame"))
    with pytest.raises(RemoteProtocolError):
        dst.send(m.Abort(AbortCode.PROTOCOL_ERROR, "again"))
    src.receive_data(frame)
    assert src.next_event() == m.Abort(AbortCode.PROTOCOL_ERROR, "bad frame")


def test_local_error_is_sticky():
    src, _ = pair(until=State.PRECOPY)
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, src.send, m.Ready())
    with pytest.raises(LocalProtocolError):
        src.send(m.RoundEnd(0, 0, 0))
    assert src.state == "ERROR"


# ------------------------------------------------------------------------------------------ framing limits
def test_oversized_length_prefix_is_refused_from_four_bytes():
    src, dst = pair(until=State.PRECOPY)
    expect(RemoteProtocolError, AbortCode.FRAME_TOO_LARGE, dst.receive_data,
           PREFIX.pack(dst.limits.max_frame + 1))
    assert dst.state == "ERROR"


def test_handshake_frames_are_capped_before_keys_exist():
    dst = Connection(D, rng=fixed_rng(1))
    expect(RemoteProtocolError, AbortCode.FRAME_TOO_LARGE, dst.receive_data, PREFIX.pack(MIN_MAX_FRAME + 1))


def test_feeding_more_while_a_frame_is_buffered_is_refused():
    src, dst = pair(until=State.PRECOPY)
    dst.receive_data(src.send(m.Keepalive()))
    expect(LocalProtocolError, AbortCode.RESOURCE_LIMIT, dst.receive_data, src.send(m.Keepalive()))


def test_eof_in_the_middle_of_a_frame():
    src, dst = pair(until=State.PRECOPY)
    data = src.send(m.Keepalive())
    dst.receive_data(data[:-1])
    assert dst.next_event() is NEED_DATA
    dst.receive_data(b"")
    e = expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)
    assert "middle of a frame" in e.message


def test_sender_respects_the_peer_max_frame():
    small = Limits(max_frame=MIN_MAX_FRAME)
    src = Connection(S, rng=fixed_rng(1))
    dst = Connection(D, rng=fixed_rng(2), limits=small)
    transfer(src, dst, sample_hello(memory_bytes=1 << 30))
    transfer(dst, src, sample_accept())
    transfer(src, dst, sample_start(sample_hello()))
    assert src.max_send_frame == MIN_MAX_FRAME
    n = src.max_pages_per_frame
    transfer(src, dst, sample_pages(0, list(range(n)), []))
    expect(LocalProtocolError, AbortCode.FRAME_TOO_LARGE, src.send, sample_pages(0, list(range(n + 1)), []))


# ------------------------------------------------------------------------------------------ guards
def test_round_end_must_count_the_pages_of_its_round():
    src, dst = pair(until=State.PRECOPY)
    transfer(src, dst, sample_pages(0, [1, 2], []))
    expect(LocalProtocolError, AbortCode.INTEGRITY_FAILURE, src.send, m.RoundEnd(0, 3, 0))
    dst.receive_data(forge(src, m.RoundEnd(0, 3, 0)))
    expect(RemoteProtocolError, AbortCode.INTEGRITY_FAILURE, dst.next_event)


def test_pages_of_the_wrong_round_or_out_of_range_pfn():
    src, dst = pair(until=State.PRECOPY)
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, src.send, sample_pages(1, [1], []))
    src, dst = pair(until=State.PRECOPY)
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, src.send, sample_pages(0, [64], []))
    dst.receive_data(forge(src, sample_pages(0, [], [64])))
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)


def test_bitmap_and_complete_need_a_closed_round():
    src, dst = pair(until=State.PRECOPY)
    transfer(src, dst, sample_pages(0, [1], []))
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, src.send, m.Bitmap(64, bytes(8)))
    dst.receive_data(forge(src, m.Bitmap(64, bytes(8))))
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)


def test_complete_must_count_all_pages():
    src, dst = pair(until=State.STOP_COPY_VCPU)
    expect(LocalProtocolError, AbortCode.INTEGRITY_FAILURE, src.send, m.Complete(5))


def test_start_policy_must_match_hello():
    src, dst = pair(until=State.ACCEPTED)
    dst.receive_data(forge(src, m.Start(policy=0x1, pdh=b"\0" * 0x824, session=b"\0" * 0x80)))
    expect(RemoteProtocolError, AbortCode.POLICY_REFUSED, dst.next_event)


def test_vcpu_state_must_match_the_guest():
    src, dst = pair(hello=sample_hello(es=True, vcpus=2), until=State.STOP_COPY)
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, src.send, sample_vcpu_state(sample_hello(vcpus=2)))
    src, dst = pair(hello=sample_hello(vcpus=2), until=State.STOP_COPY)
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, src.send, sample_vcpu_state(sample_hello(vcpus=3)))


def test_send_pages_accepts_lists_and_rejects_bad_columns():
    src, dst = pair(until=State.PRECOPY)
    data = src.send_pages(0, [7, 8], bytes(2 * SEV_HDR_SIZE), bytes(2 * PAGE_SIZE), np.array([9]),
                          bytes(PAGE_SIZE))
    dst.receive_data(data)
    ev = dst.next_event()
    assert ev.enc_pfns.tolist() == [7, 8] and ev.shr_pfns.tolist() == [9] and ev.enc_pfns.dtype == np.uint64
    for bad in ([-1], [1.5], [[1]]):
        s, _ = pair(until=State.PRECOPY)
        expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, s.send_pages, 0, bad, bytes(52), bytes(4096),
               [], b"")
    s, _ = pair(until=State.PRECOPY)
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, s.send_pages, 0, [1], bytes(51), bytes(4096), [], b"")


def test_guest_too_large_for_the_destination():
    src = Connection(S, rng=fixed_rng(1))
    dst = Connection(D, rng=fixed_rng(2), limits=Limits(max_guest_bytes=1 << 20))
    dst.receive_data(src.send(sample_hello(memory_bytes=2 << 20)))
    expect(RemoteProtocolError, AbortCode.RESOURCE_LIMIT, dst.next_event)


# ------------------------------------------------------------------------------------------ integrity
def _pages_frame(src, enc=(1, 2), shr=(3,)):
    return src.send(sample_pages(0, list(enc), list(shr)))


def _offsets(frame: bytes):
    """Byte offsets (in the frame) of the columns of a Pages frame built by send_pages."""
    from sevmigd.wire.framing import Reader
    rd = Reader(frame[4:])
    rd.array_header(), rd.uint("t"), rd.uint("s"), rd.uint("r")
    cols = {name: rd.bin(name) for name in ("enc_pfns", "enc_headers", "shr_pfns", "shr_data", "enc_data")}
    return {k: (o + 4, n) for k, (o, n) in cols.items()}


@pytest.mark.parametrize("column", ["enc_pfns", "enc_headers", "shr_pfns", "shr_data"])
def test_flipped_byte_in_authenticated_columns_fails_the_channel_mac(column):
    src, dst = pair(until=State.PRECOPY)
    frame = bytearray(_pages_frame(src))
    off, n = _offsets(bytes(frame))[column]
    frame[off + n // 2] ^= 0x01
    dst.receive_data(bytes(frame))
    expect(RemoteProtocolError, AbortCode.INTEGRITY_FAILURE, dst.next_event)


def test_flipped_ciphertext_byte_passes_the_channel_for_the_psp_to_catch():
    """The PSP's packet MAC covers the ciphertext; the channel deliberately does not (PROTOCOL.md §9), so
    the flipped byte must reach RECEIVE_UPDATE_DATA (which then fails with BAD_MEASUREMENT)."""
    src, dst = pair(until=State.PRECOPY)
    frame = bytearray(_pages_frame(src))
    off, n = _offsets(bytes(frame))["enc_data"]
    frame[off + 100] ^= 0x80
    dst.receive_data(bytes(frame))
    ev = dst.next_event()
    assert ev.enc_data[100] == 0xEE ^ 0x80 and ev.enc_data[:100] == b"\xee" * 100


@pytest.mark.parametrize("where", [-1, -20, 5, 6])
def test_flipped_byte_in_small_frames_or_mac_fails(where):
    src, dst = pair(until=State.PRECOPY)
    frame = bytearray(src.send(m.RoundEnd(0, 0, 12345)))
    frame[where] ^= 0x04
    dst.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError) as ei:
        dst.next_event()
    assert ei.value.code in (AbortCode.INTEGRITY_FAILURE, AbortCode.PROTOCOL_ERROR)


def test_replayed_frame_is_rejected():
    src, dst = pair(until=State.PRECOPY)
    f = _pages_frame(src)
    dst.receive_data(f)
    dst.next_event()
    dst.receive_data(f)
    expect(RemoteProtocolError, AbortCode.INTEGRITY_FAILURE, dst.next_event)


def test_reordered_and_dropped_frames_are_rejected():
    src, dst = pair(until=State.PRECOPY)
    f1, f2 = _pages_frame(src, (1,), ()), _pages_frame(src, (2,), ())
    dst.receive_data(f2)
    expect(RemoteProtocolError, AbortCode.INTEGRITY_FAILURE, dst.next_event)


def test_frame_from_the_other_direction_is_rejected():
    """Per-direction keys: a destination frame reflected back to the destination, with a sequence number
    that is the one expected, still fails the MAC."""
    src, dst = pair(until=State.PRECOPY)
    assert dst._recv_seq == 2 and dst._send_seq == 1
    dst.send(m.Keepalive())
    reflected = dst.send(m.Keepalive())  # seq 2
    dst.receive_data(reflected)
    e = expect(RemoteProtocolError, AbortCode.INTEGRITY_FAILURE, dst.next_event)
    assert "MAC" in e.message


def test_frame_from_another_session_is_rejected():
    src, dst = pair(until=State.PRECOPY, seed=1)
    other_src, _ = pair(until=State.PRECOPY, seed=2)
    dst.receive_data(other_src.send(m.Keepalive()))
    expect(RemoteProtocolError, AbortCode.INTEGRITY_FAILURE, dst.next_event)


def test_unauthenticated_frame_after_handshake_is_rejected():
    src, dst = pair(until=State.PRECOPY)
    body = array_header(3) + uint(MsgType.KEEPALIVE) + uint(src._send_seq) + b"\xc0"
    dst.receive_data(PREFIX.pack(len(body)) + body)
    expect(RemoteProtocolError, AbortCode.INTEGRITY_FAILURE, dst.next_event)


def test_source_abort_crossing_accept_is_understood():
    """The source may abort before it sees Accept; that Abort has no MAC and must still be accepted."""
    src, dst = pair(until=State.HELLO_SENT)
    abort = src.send(m.Abort(AbortCode.CANCELLED, "operator cancelled"))
    dst.send(sample_accept())
    dst.receive_data(abort)
    assert dst.next_event() == m.Abort(AbortCode.CANCELLED, "operator cancelled")


# ------------------------------------------------------------------------------------------ versioning
def test_extension_frames_are_skipped_and_unknown_types_rejected():
    src, dst = pair(until=State.PRECOPY)
    from sevmigd.wire import integrity
    for mtype, ok in ((0x40, True), (0x7F, True), (20, False)):
        body_wo = array_header(4) + uint(mtype) + uint(src._send_seq) + bin_header(1) + b"x"
        mac = integrity.new_mac(src._send_key)
        mac.update(body_wo)
        body = body_wo + b"\xc4\x20" + mac.digest()
        src._send_seq += 1
        dst.receive_data(PREFIX.pack(len(body)) + body)
        if ok:
            assert dst.next_event() is NEED_DATA
        else:
            expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)
    # and after skipping, the sequence continues
    src2, dst2 = pair(until=State.PRECOPY)
    body_wo = array_header(3) + uint(0x41) + uint(src2._send_seq)
    mac = integrity.new_mac(src2._send_key)
    mac.update(body_wo)
    body = body_wo + b"\xc4\x20" + mac.digest()
    src2._send_seq += 1
    dst2.receive_data(PREFIX.pack(len(body)) + body)
    assert dst2.next_event() is NEED_DATA
    assert transfer(src2, dst2, m.Keepalive()) == m.Keepalive()


def test_later_hello_version_interoperates_at_version_1():
    """A v2 source may append Hello fields; a v1 destination decodes the v1 part and answers v1."""
    import msgpack
    from sevmigd.wire import integrity, negotiate_version
    from sevmigd.wire.messages import fields_of
    hello = sample_hello()
    fields = fields_of(hello)
    fields[0] = 2
    share = integrity.KeyShare(fixed_rng("v2")).public
    body = msgpack.packb([1, 0, "sevmigd", *fields, share, 1 << 24, "future-field", None], use_bin_type=True)
    dst = Connection(D, rng=fixed_rng(3))
    dst.receive_data(PREFIX.pack(len(body)) + body)
    ev = dst.next_event()
    assert ev.version == 2 and negotiate_version(ev.version) == 1
    expect(LocalProtocolError, AbortCode.VERSION_MISMATCH, dst.send, m.Accept(2, (), sample_accept().platform))


def test_old_hello_version_is_for_the_destination_to_refuse():
    from sevmigd.wire import negotiate_version
    assert negotiate_version(0) is None
    src = Connection(S, rng=fixed_rng(1))
    expect(LocalProtocolError, AbortCode.VERSION_MISMATCH, src.send,
           m.Hello(0, (), sample_accept().platform, "g", 4096, 0, 1, False, "id"))


def test_accept_with_a_higher_version_than_offered_is_rejected():
    src, dst = pair(until=State.HELLO_SENT)
    dst.receive_data(b"")  # irrelevant; use forge from a fresh destination-like sender
    src.receive_data(forge(dst, m.Accept(2, (), sample_accept().platform)))
    expect(RemoteProtocolError, AbortCode.VERSION_MISMATCH, src.next_event)


def test_features_are_the_intersection():
    src = Connection(S, rng=fixed_rng(1))
    dst = Connection(D, rng=fixed_rng(2))
    transfer(src, dst, sample_hello(features=("a", "b", "zz-future")))
    transfer(dst, src, sample_accept(features=("b", "a", "c")))
    assert src.features == dst.features == frozenset({"a", "b"})


def test_last_element_must_be_the_mac_or_nil():
    """A body whose last bytes merely look like nil (or like a MAC) but belong to a longer last element is
    malformed: the MAC slot is a whole element (PROTOCOL.md §4)."""
    import msgpack
    from sevmigd.wire.messages import fields_of
    share = _key_share_public()
    fields = fields_of(sample_hello())
    body = msgpack.packb([1, 0, "sevmigd", *fields, share, 1 << 20, b"xx\xc0"], use_bin_type=True)
    assert body[-1:] == b"\xc0"
    dst = Connection(D, rng=fixed_rng(1))
    dst.receive_data(PREFIX.pack(len(body)) + body)
    e = expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)
    assert "last element" in e.message


def _key_share_public():
    from sevmigd.wire import integrity
    return integrity.KeyShare(fixed_rng("k")).public


@pytest.mark.parametrize("name", ["bitmap", "vcpu_state", "start", "go"])
def test_flipped_byte_in_bitmap_vcpu_state_start_go_fails_the_channel_mac(name):
    hello = sample_hello()
    until = {"bitmap": State.PRECOPY, "vcpu_state": State.STOP_COPY, "start": State.ACCEPTED,
             "go": State.READY}[name]
    msg = {"bitmap": m.Bitmap(64, b"\xff" + bytes(7)), "vcpu_state": sample_vcpu_state(hello),
           "start": sample_start(hello), "go": m.Go()}[name]
    for where in range(6, 40, 3):  # bytes inside the body, after prefix/array header/type
        src, dst = pair(hello=hello, until=until)
        frame = bytearray(src.send(msg))
        if where >= len(frame) - 34:
            break
        frame[where] ^= 0x10
        dst.receive_data(bytes(frame))
        with pytest.raises(RemoteProtocolError) as ei:
            dst.next_event()
        assert ei.value.code in (AbortCode.INTEGRITY_FAILURE, AbortCode.PROTOCOL_ERROR)
        assert dst.handoff == "source"


def _feed_in_chunks(dst, frame, size=4096):
    ev = NEED_DATA
    for off in range(0, len(frame), size):
        dst.receive_data(frame[off:off + size])
        ev = dst.next_event()
    return ev


def test_held_pages_events_are_never_overwritten_by_later_frames():
    """Reassembly buffers are reused only when no event refers to them (PROTOCOL-independent safety of
    the zero-copy decode): keep 10 events, decode 10 more, the first ones are intact and read-only."""
    from sevmigd.wire import framing
    src, dst = pair(until=State.PRECOPY)
    held = []
    for i in range(10):
        p = m.Pages(0, np.array([i], dtype=np.uint64), bytes([i]) * SEV_HDR_SIZE, bytes([i]) * PAGE_SIZE,
                    np.array([], dtype=np.uint64), b"")
        ev = _feed_in_chunks(dst, src.send(p))
        assert ev == p
        held.append((p, ev))
    for i in range(10):
        ev = _feed_in_chunks(dst, src.send(sample_pages(0, [5], [6])))
        del ev
    for p, ev in held:
        assert ev == p
        with pytest.raises(TypeError):
            ev.enc_data[0] = 1
    assert len(dst._buf._pool) <= framing.POOL_BUFFERS


def test_reassembly_buffers_are_reused_when_events_are_dropped():
    src, dst = pair(until=State.PRECOPY)
    for _ in range(20):
        ev = _feed_in_chunks(dst, src.send(sample_pages(0, [1, 2, 3], [4])))
        assert len(dst._buf._pool) == 1 and ev.enc_data.obj is dst._buf._pool[0]
        del ev


def test_destination_abort_after_an_error_in_go_renounces_on_both_sides():
    src, dst = pair(until=State.GO)
    dst.receive_data(forge(src, m.Complete(0)))  # illegal in GO
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)
    assert dst.handoff == "uncertain"
    frame = dst.send(m.Abort(AbortCode.PROTOCOL_ERROR, "bad frame after go"))
    assert dst.handoff == "source"
    src.receive_data(frame)
    assert isinstance(src.next_event(), m.Abort) and src.handoff == "source"


def test_a_peer_without_the_magic_is_refused():
    import msgpack
    from sevmigd.wire.messages import fields_of
    body = msgpack.packb([1, 0, "http", *fields_of(sample_hello()), _key_share_public(), 1 << 20, None],
                         use_bin_type=True)
    dst = Connection(D, rng=fixed_rng(1))
    dst.receive_data(PREFIX.pack(len(body)) + body)
    e = expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)
    assert "magic" in e.message
    dst = Connection(D, rng=fixed_rng(1))
    expect(RemoteProtocolError, AbortCode.FRAME_TOO_LARGE, dst.receive_data, b"GET / HTTP/1.1\r\n")


def _ended(end: str):
    """A pair after the conversation ended: (the side that ended it, the side that was told)."""
    if end == "refused":
        src, dst = pair(until=State.HELLO_SENT)
        transfer(dst, src, m.Refuse(AbortCode.POLICY_REFUSED, "no"))
        return dst, src
    src, dst = pair(until=State.PRECOPY)
    ender, receiver = (src, dst) if end == "aborted-by-source" else (dst, src)
    transfer(ender, receiver, m.Abort(AbortCode.CANCELLED, "x"))
    return ender, receiver


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.name)
@pytest.mark.parametrize("end", ["refused", "aborted-by-source", "aborted-by-destination"])
def test_every_message_after_the_end_is_illegal(end, mtype):
    """In the terminal states nothing may be sent; a frame the ending side still forges is a
    RemoteProtocolError for the side that received the Refuse/Abort."""
    msg = _any_message(mtype, sample_hello())
    ender, receiver = _ended(end)
    assert receiver.state == ("REFUSED" if end == "refused" else "ABORTED")
    expect(LocalProtocolError, AbortCode.PROTOCOL_ERROR, receiver.send, msg)
    ender, receiver = _ended(end)
    receiver.receive_data(forge(ender, msg))
    expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, receiver.next_event)


def test_non_minimal_integer_encodings_are_accepted_negative_ones_refused():
    """PROTOCOL.md §4: receivers accept any valid encoding of a value of the right type (here type, seq and
    round as int 8 / uint 64), and refuse a negative value where an unsigned one is required."""
    from sevmigd.wire import integrity
    src, dst = pair(until=State.PRECOPY)
    for seq_enc, ok in ((b"\xd0" + bytes([src._send_seq]), True),
                        (b"\xcf" + (src._send_seq + 1).to_bytes(8, "big"), True),
                        (b"\xd0\xff", False)):
        body_wo = array_header(3) + b"\xd0\x0d" + seq_enc  # Keepalive with type as int 8
        h = src._send_key.start()
        h.update(body_wo)
        body = body_wo + b"\xc4\x20" + src._send_key.finish(h)
        src._send_seq += 1
        dst.receive_data(PREFIX.pack(len(body)) + body)
        if ok:
            assert dst.next_event() == m.Keepalive()
        else:
            expect(RemoteProtocolError, AbortCode.PROTOCOL_ERROR, dst.next_event)


def test_unknown_abort_code_from_a_later_version_is_reported_as_protocol_error():
    from sevmigd.wire.connection import encode_body
    src, dst = pair(until=State.PRECOPY)
    body = encode_body(MsgType.ABORT, [99, "new reason"], seq=src._send_seq, key=src._send_key)
    dst.receive_data(PREFIX.pack(len(body)) + body)
    ev = dst.next_event()
    assert ev.code is AbortCode.PROTOCOL_ERROR and ev.reason == "[unknown abort code 99] new reason"
    assert dst.state == "ABORTED"


def test_receive_data_misuse_is_a_local_error():
    dst = Connection(D, rng=fixed_rng(1))
    expect(LocalProtocolError, AbortCode.INTERNAL_ERROR, dst.receive_data, "text")
    dst = Connection(D, rng=fixed_rng(1))
    dst.receive_data(b"")
    expect(LocalProtocolError, AbortCode.INTERNAL_ERROR, dst.receive_data, b"late")
    dst = Connection(D, rng=fixed_rng(1))
    buf = bytearray(Connection(S, rng=fixed_rng(2)).send(sample_hello()))
    dst.receive_data(buf)
    buf[:] = bytes(len(buf))  # the caller reuses its buffer: we copied it
    assert isinstance(dst.next_event(), m.Hello)


def test_send_pages_parts_is_the_frame_in_pieces_without_copying_the_page_columns():
    """Scatter-gather writes (issue 16): the pieces concatenate to exactly the frame send_pages makes, and
    the page columns are the caller's own buffers (not copies), whichever columns are empty."""
    for ne, ns in ((2, 1), (2, 0), (0, 3), (0, 0)):
        a, _ = pair(until=State.PRECOPY)
        b, _ = pair(until=State.PRECOPY)
        enc_data, shr_data = bytes(range(256)) * 16 * ne, b"\x5a" * (PAGE_SIZE * ns)
        args = (0, np.arange(ne, dtype="<u8"), bytes(ne * SEV_HDR_SIZE), enc_data,
                np.arange(10, 10 + ns, dtype="<u8"), shr_data)
        parts = a.send_pages_parts(*args)
        assert b"".join(parts) == b.send_pages(*args)
        assert (enc_data in parts) == bool(ne) and (shr_data in parts) == bool(ns)
        assert any(p is enc_data for p in parts) == bool(ne)
        assert any(p is shr_data for p in parts) == bool(ns)


def _receive_direct(dst, stream: bytes, chunk: int, direct_chunk: int) -> list:
    """Drive `dst` the way the daemon's plain-TCP read loop does: when a large frame is open, read into
    its buffer (`receive_buffer` / `received_into`, `direct_chunk` bytes at most per read), else feed
    `chunk`-byte reads."""
    events, pos = [], 0
    while pos < len(stream):
        view = dst.receive_buffer()
        if view is not None:
            n = min(len(view), direct_chunk, len(stream) - pos)
            view[:n] = stream[pos:pos + n]
            dst.received_into(n)
        else:
            n = min(chunk, len(stream) - pos)
            dst.receive_data(stream[pos:pos + n])
        pos += n
        while (ev := dst.next_event()) is not NEED_DATA:
            events.append(ev)
    return events


@pytest.mark.parametrize("chunk,direct_chunk", [(1, 7), (4, 65536), (100_000, 3000), (256 * 1024, 1 << 20),
                                                (70_000, 1)])
def test_a_large_frame_read_into_its_buffer_gives_the_same_messages(chunk, direct_chunk):
    src, dst = pair(hello=sample_hello(memory_bytes=256 * PAGE_SIZE), until=State.PRECOPY)
    sent = [sample_pages(0, range(0, 40), range(40, 50)), sample_pages(0, [], [60]),
            sample_pages(0, range(100, 130), [])]
    wire = b"".join(src.send(p) for p in sent)
    got = _receive_direct(dst, wire, chunk, direct_chunk)
    assert got == sent
    if chunk < DIRECT_READ_MIN:
        # the large frames' bodies were read into (and handed out as views of) pooled reassembly buffers
        assert got[0].enc_data.obj in dst._buf._pool and got[2].enc_data.obj in dst._buf._pool
    with pytest.raises(TypeError):
        got[0].enc_data[0] = 1


def test_no_receive_buffer_for_small_frames_or_before_the_length_is_known():
    src, dst = pair(until=State.PRECOPY)
    assert dst.receive_buffer() is None                      # nothing received yet
    small = src.send(sample_pages(0, [1], []))               # ~4 KiB, below DIRECT_READ_MIN
    dst.receive_data(small[:10])
    assert dst.receive_buffer() is None
    dst.receive_data(small[10:])
    assert isinstance(dst.next_event(), m.Pages)
    big = src.send(sample_pages(0, range(20), []))
    dst.receive_data(big[:3])                                # prefix incomplete
    assert dst.receive_buffer() is None
    dst.receive_data(big[3:5000])
    view = dst.receive_buffer()
    assert view is not None and len(view) == len(big) - 5000  # exactly the rest of this frame, no more
    with pytest.raises(LocalProtocolError):
        dst.received_into(len(view) + 1)                      # past the frame: a caller bug, refused


def test_an_oversized_frame_gets_no_receive_buffer():
    _src, dst = pair(until=State.PRECOPY, limits=Limits(max_frame=MIN_MAX_FRAME))
    with pytest.raises(RemoteProtocolError):
        dst.receive_data(PREFIX.pack(MIN_MAX_FRAME + 1))
    assert dst.receive_buffer() is None
