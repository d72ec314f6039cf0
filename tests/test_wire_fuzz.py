"""Property tests of the wire codec (hypothesis): round trips of every message, and hostile input — arbitrary
bytes, truncations, oversized lengths, wrong msgpack types, single-byte flips anywhere in a conversation,
replayed / duplicated / reordered frames — yields only typed errors (LocalProtocolError /
RemoteProtocolError), never another exception, never a silently changed message.

Each property runs twice: a normal-suite variant (~100-200 examples) and a `fuzz`-marked variant with
SEVMIGD_FUZZ_EXAMPLES examples (`make fuzz`, default 10000) that is skipped unless that variable is set.
Pure tests: no I/O, no clocks; deterministic rngs so every failure reproduces.
"""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevmigd.wire import (CLOSED, NEED_DATA, AbortCode, Connection, Limits, LocalProtocolError, ProtocolError,
                          RemoteProtocolError, Role, State, messages as m)
from sevmigd.wire.connection import decode_frame, encode_body, encode_frame
from sevmigd.wire.framing import PREFIX, Reader
from sevmigd.wire.limits import PAGE_SIZE, SEV_CERT_SIZE, SEV_HDR_SIZE, SESSION_SIZE
from sevmigd.wire.messages import MsgType, fields_of, wire_fields
from sevmigd.wire.testing import fixed_rng, pair, sample_accept, sample_hello, sample_platform, script

NORMAL_EXAMPLES = 150
FUZZ_EXAMPLES = int(os.environ.get("SEVMIGD_FUZZ_EXAMPLES", "0") or 0)
S, D = Role.SOURCE, Role.DESTINATION


def both(**strategies):
    """Decorate a property as two tests: (normal suite variant, `fuzz`-marked big variant)."""
    def wrap(fn):
        common = dict(deadline=None, derandomize=False,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        normal = settings(max_examples=NORMAL_EXAMPLES, **common)(given(**strategies)(fn))
        big = settings(max_examples=max(FUZZ_EXAMPLES, 1), **common)(given(**strategies)(fn))
        big = pytest.mark.skipif(not FUZZ_EXAMPLES, reason="set SEVMIGD_FUZZ_EXAMPLES (make fuzz)")(big)
        big = pytest.mark.fuzz(big)
        return normal, big
    return wrap


def assert_typed(exc: BaseException):
    assert isinstance(exc, ProtocolError), f"untyped exception {type(exc).__name__}: {exc}"
    assert isinstance(exc.code, AbortCode)
    # the decoder's last-resort net maps unexpected exceptions; reaching it means a decoder bug
    assert "internal decoder failure" not in exc.message, exc.__cause__


# ------------------------------------------------------------------------------------------ strategies
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(st.characters(min_codepoint=0x20, blacklist_characters="\x7f", blacklist_categories=("Cs",)),
               min_size=1, max_size=30)
reason = st.text(st.characters(min_codepoint=0x20, blacklist_characters="\x7f", blacklist_categories=("Cs",)),
                 max_size=60)
features = st.lists(st.from_regex(r"[a-z0-9._-]{1,16}", fullmatch=True), unique=True, max_size=5).map(tuple)
codes = st.sampled_from(list(AbortCode))


def blob(n: int):
    """n pseudo-random bytes from a drawn seed (hypothesis is slow at drawing kilobytes byte by byte, and
    bulk contents do not steer the codec; lengths do, and those are drawn exactly)."""
    return st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed).bytes(n))


@st.composite
def platforms(draw):
    p = sample_platform(draw(st.integers(0, 255)))
    p["ark"] = draw(st.binary(min_size=64, max_size=200))
    p["ask"] = draw(st.binary(min_size=64, max_size=200))
    return p


def pfn_arrays(n):
    return st.lists(u64, min_size=n, max_size=n).map(lambda x: np.asarray(x, dtype=np.uint64))


@st.composite
def pages(draw, npages: int | None = None):
    ne, ns = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    if npages is None:
        ep, sp = draw(pfn_arrays(ne)), draw(pfn_arrays(ns))
    else:
        ep = np.asarray(draw(st.lists(st.integers(0, npages - 1), min_size=ne, max_size=ne)), dtype=np.uint64)
        sp = np.asarray(draw(st.lists(st.integers(0, npages - 1), min_size=ns, max_size=ns)), dtype=np.uint64)
    return m.Pages(round=draw(u32) if npages is None else 0, enc_pfns=ep,
                   enc_headers=draw(blob(ne * SEV_HDR_SIZE)),
                   enc_data=draw(blob(ne * PAGE_SIZE)),
                   shr_pfns=sp, shr_data=draw(blob(ns * PAGE_SIZE)))


@st.composite
def vcpu_states(draw):
    if draw(st.booleans()):
        regs = draw(st.lists(st.dictionaries(text.filter(lambda s: len(s) <= 32), u64, max_size=6),
                             min_size=1, max_size=4))
        return m.VcpuState(regs=tuple(regs), vmsa_header=None, vmsa=None)
    n = draw(st.integers(1, 3))
    return m.VcpuState(regs=None, vmsa_header=draw(blob(52 * n)),
                       vmsa=draw(blob(4096 * n)))


@st.composite
def bitmaps(draw):
    npages = draw(st.integers(0, 200))
    bits = bytearray(draw(st.binary(min_size=(npages + 7) // 8, max_size=(npages + 7) // 8)))
    if npages % 8:
        bits[-1] &= (1 << (npages % 8)) - 1
    return m.Bitmap(npages=npages, bits=bytes(bits))


any_message = st.one_of(
    st.builds(m.Hello, version=u32, features=features, platform=platforms(), guest_name=text,
              memory_bytes=u64, policy=u32, vcpus=u32, es=st.booleans(), migration_id=text),
    st.builds(m.Accept, version=u32, features=features, platform=platforms()),
    st.builds(m.Refuse, code=codes, reason=reason),
    st.builds(m.Start, policy=u32, pdh=blob(SEV_CERT_SIZE),
              session=blob(SESSION_SIZE)),
    pages(),
    st.builds(m.RoundEnd, round=u32, pages=u64, remaining=u64),
    bitmaps(),
    vcpu_states(),
    st.builds(m.Complete, pages_total=u64),
    st.just(m.Ready()), st.just(m.Go()), st.just(m.Started()), st.just(m.Keepalive()),
    st.builds(m.Abort, code=codes, reason=reason),
)
keys = st.one_of(st.none(), st.binary(min_size=32, max_size=32))


# ------------------------------------------------------------------------------------------ round trips
@both(msg=any_message, seq=u64, key=keys, share=st.binary(min_size=32, max_size=32),
      max_frame=st.integers(1 << 16, 1 << 30))
def _roundtrip(msg, seq, key, share, max_frame):
    if isinstance(msg, m.Pages) and key is None:
        key = b"k" * 32  # Pages exists only after the handshake (PROTOCOL.md §5)
    extras = (share, max_frame) if isinstance(msg, (m.Hello, m.Accept)) else ()
    frame = encode_frame(msg, seq=seq, key=key, extras=extras)
    if isinstance(msg, (m.Hello, m.Accept)):
        try:
            got_seq, got, got_extras = decode_frame(frame, key=key)
        except RemoteProtocolError as e:  # a random 32-byte string can be a small-order X25519 point
            assert e.code is AbortCode.INTEGRITY_FAILURE and "key_share" in e.message
            return
    else:
        got_seq, got, got_extras = decode_frame(frame, key=key)
    assert (got_seq, got, tuple(got_extras)) == (seq, msg, extras)
    assert encode_frame(got, seq=seq, key=key, extras=extras) == frame


test_every_message_round_trips, test_every_message_round_trips_fuzz = _roundtrip


@both(data=st.data())
def _pages_through_connections(data):
    hello = sample_hello(memory_bytes=512 * PAGE_SIZE)
    src, dst = pair(hello=hello, until=State.PRECOPY)
    total = 0
    for _ in range(data.draw(st.integers(1, 3))):
        p = data.draw(pages(npages=512))
        p = m.Pages(src.round, p.enc_pfns, p.enc_headers, p.enc_data, p.shr_pfns, p.shr_data)
        dst.receive_data(src.send(p))
        assert dst.next_event() == p
        total += p.npages
    ev_end = m.RoundEnd(src.round, total, 0)
    dst.receive_data(src.send(ev_end))
    assert dst.next_event() == ev_end and dst.round == src.round == 1


test_pages_round_trip_through_connections, test_pages_round_trip_through_connections_fuzz = \
    _pages_through_connections


# ------------------------------------------------------------------------------------------ conversations
def _record(seed: int):
    """A whole conversation: (the source's byte stream as frames, destination seed, pages' ciphertext spans)."""
    hello = sample_hello(memory_bytes=64 * PAGE_SIZE, vcpus=2)
    src = Connection(S, rng=fixed_rng(f"src{seed}"))
    dst = Connection(D, rng=fixed_rng(f"dst{seed}"))
    frames = []
    for role, make in script(hello):
        a, b = (src, dst) if role is S else (dst, src)
        data = a.send(make())
        if role is S:
            frames.append(data)
        b.receive_data(data)
        b.next_event()
    return frames


FRAMES = _record(0)
STREAM = b"".join(FRAMES)


def _ciphertext_positions(frames) -> set[int]:
    out, base = set(), 0
    for f in frames:
        rd = Reader(f[4:])
        if rd.array_header() == 9 and rd.uint("t") == MsgType.PAGES:
            rd.uint("s"), rd.uint("r")
            for _ in range(4):
                rd.bin("x")
            off, n = rd.bin("enc_data")
            out.update(range(base + 4 + off, base + 4 + off + n))
        base += len(f)
    return out


CIPHERTEXT = _ciphertext_positions(FRAMES)
REPLIES = {m.Hello: lambda ev: sample_accept(), m.Complete: lambda ev: m.Ready(), m.Go: lambda ev: m.Started()}


def deliver(stream: bytes, chunks=(), eof: bool = True, seed: int = 0):
    """Feed `stream` to a fresh destination (seeded like the recording) in chunks, answering as the
    destination driver would; return (destination, events). Raises only what the Connection raises."""
    dst = Connection(D, rng=fixed_rng(f"dst{seed}"))
    events, pos, sizes = [], 0, iter(chunks)
    while True:
        ev = dst.next_event()
        if ev is NEED_DATA:
            if pos >= len(stream):
                if not eof:
                    return dst, events
                dst.receive_data(b"")
                continue
            n = max(1, next(sizes, 1 << 16))
            dst.receive_data(stream[pos:pos + n])
            pos += n
            continue
        if ev is CLOSED:
            return dst, events
        events.append(ev)
        reply = REPLIES.get(type(ev))
        if reply is not None:
            dst.send(reply(ev))


def test_recorded_conversation_replays_to_done():
    dst, events = deliver(STREAM)
    assert dst.state == "DONE" and len(events) == len(FRAMES)


def _enc_data(events) -> bytes:
    return b"".join(bytes(e.enc_data) for e in events if isinstance(e, m.Pages))


@both(pos=st.integers(0, len(STREAM) - 1), bit=st.integers(0, 7), chunks=st.lists(st.integers(1, 5000),
                                                                                       max_size=30))
def _single_flip(pos, bit, chunks):
    """A flipped bit anywhere is detected (typed error), except in private-page ciphertext, which the
    channel passes through unchanged but for that bit (the PSP's MAC catches it in RECEIVE_UPDATE_DATA)."""
    bad = bytearray(STREAM)
    bad[pos] ^= 1 << bit
    try:
        dst, events = deliver(bytes(bad), chunks)
    except ProtocolError as e:
        assert_typed(e)
        assert pos not in CIPHERTEXT, f"ciphertext flip at {pos} was rejected by the channel: {e}"
        return
    assert pos in CIPHERTEXT, f"flip at {pos} went undetected"
    assert dst.state == "DONE"
    got, want = _enc_data(events), _enc_data(deliver(STREAM)[1])
    assert sum(a != b for a, b in zip(got, want)) == 1


test_single_bit_flips_are_detected_except_in_ciphertext, test_single_bit_flips_fuzz = _single_flip


@both(cut=st.integers(0, len(STREAM) - 1), chunks=st.lists(st.integers(1, 5000), max_size=20))
def _truncation(cut, chunks):
    """A conversation cut anywhere before its end and closed is a RemoteProtocolError (or a clean CLOSED
    only when nothing was sent at all); the guest stays with the source."""
    try:
        dst, _ = deliver(STREAM[:cut], chunks)
    except RemoteProtocolError as e:
        assert_typed(e)
        return
    assert cut == 0 and dst.state == "IDLE"


test_truncated_conversations_fail_typed, test_truncated_conversations_fuzz = _truncation


@both(order=st.lists(st.integers(0, len(FRAMES) - 1), min_size=1, max_size=len(FRAMES) + 3))
def _reorder(order):
    """Frames delivered in any order other than the original fail at the first deviation with
    INTEGRITY_FAILURE (seq), and everything before it is accepted."""
    deviation = next((i for i, k in enumerate(order) if k != i), None)
    stream = b"".join(FRAMES[k] for k in order)
    try:
        dst, events = deliver(stream, eof=False)
    except RemoteProtocolError as e:
        assert deviation is not None
        # the deviation at index 0 (before the keys exist) is a wrong-state Hello replacement or seq error
        assert e.code in (AbortCode.INTEGRITY_FAILURE, AbortCode.PROTOCOL_ERROR)
        if deviation > 0:
            assert e.code is AbortCode.INTEGRITY_FAILURE
        return
    assert deviation is None and len(events) == len(order)


test_replayed_duplicated_reordered_frames_fail, test_replayed_duplicated_reordered_frames_fuzz = _reorder


# ------------------------------------------------------------------------------------------ arbitrary input
STATES = [State.IDLE, State.HELLO_SENT, State.PRECOPY, State.STOP_COPY_VCPU, State.GO]


@both(state=st.sampled_from(STATES), role=st.sampled_from([S, D]),
      chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8), eof=st.booleans(),
      prefix=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def _arbitrary_bytes(state, role, chunks, eof, prefix):
    src, dst = pair(until=state)
    conn = src if role is S else dst
    if prefix is not None:
        chunks = [PREFIX.pack(prefix)] + chunks
    try:
        for c in chunks:
            conn.receive_data(c)
            while conn.next_event() not in (NEED_DATA, CLOSED):
                pass
        if eof:
            conn.receive_data(b"")
            while conn.next_event() is not CLOSED:
                pass
    except ProtocolError as e:
        assert_typed(e)
        with pytest.raises(ProtocolError):  # sticky
            conn.next_event()
        if prefix is not None and prefix > conn.limits.max_frame:
            assert e.code is AbortCode.FRAME_TOO_LARGE


test_arbitrary_bytes_give_typed_errors, test_arbitrary_bytes_fuzz = _arbitrary_bytes


@both(length=st.integers(Limits().max_frame + 1, 2**32 - 1), state=st.sampled_from(STATES))
def _oversized(length, state):
    """An oversized length prefix is refused from its 4 bytes alone, with nothing else buffered."""
    src, dst = pair(until=state)
    with pytest.raises(RemoteProtocolError) as ei:
        dst.receive_data(PREFIX.pack(length))
    assert ei.value.code is AbortCode.FRAME_TOO_LARGE
    assert dst._buf.buffered == 0


test_oversized_length_prefix, test_oversized_length_prefix_fuzz = _oversized

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=10)


@both(msg=any_message.filter(lambda x: not isinstance(x, m.Pages) and fields_of(x)), data=st.data(),
      key=keys)
def _wrong_types(msg, data, key):
    """Replace one field by an arbitrary msgpack value, with a valid MAC: a typed error, or (when the value
    happens to be valid for that field) a message that re-encodes to the same frame."""
    extras = [bytes(31) + b"\x09", 1 << 20] if isinstance(msg, (m.Hello, m.Accept)) else []
    fields = wire_fields(msg, extras)
    i = data.draw(st.integers(0, len(fields) - 1))
    fields[i] = data.draw(msgpack_values)
    try:
        body = encode_body(m.TYPE_OF[type(msg)], fields, seq=0, key=key)
    except (TypeError, ValueError, OverflowError):
        return  # msgpack cannot encode it; nothing to send
    frame = PREFIX.pack(len(body)) + body
    try:
        _seq, got, ex = decode_frame(frame, key=key)
    except RemoteProtocolError as e:
        assert_typed(e)
        return
    if isinstance(got, (m.Refuse, m.Abort)) and got.reason.startswith("[unknown abort code"):
        return  # PROTOCOL.md §5.11: an unknown code is reported as PROTOCOL_ERROR, with the number
    assert encode_frame(got, seq=0, key=key, extras=ex) == frame or isinstance(fields[i], (dict, list))


test_wrong_field_types_give_typed_errors, test_wrong_field_types_fuzz = _wrong_types


@both(body=msgpack_values, key=keys)
def _arbitrary_msgpack_bodies(body, key):
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    try:
        decode_frame(PREFIX.pack(len(raw)) + raw, key=key)
    except RemoteProtocolError as e:
        assert_typed(e)


test_arbitrary_msgpack_bodies, test_arbitrary_msgpack_bodies_fuzz = _arbitrary_msgpack_bodies


def test_local_misuse_is_typed():
    src, _ = pair(until=State.PRECOPY)
    with pytest.raises(LocalProtocolError):
        src.send("not a message")


@both(chunks=st.lists(st.integers(1, 20000), min_size=1, max_size=60))
def _chunking(chunks):
    """However the stream is cut into reads, the destination decodes the same conversation to DONE."""
    dst, events = deliver(STREAM, chunks)
    assert dst.state == "DONE"
    assert [type(e) for e in events] == [type(e) for e in REFERENCE_EVENTS]
    assert events == REFERENCE_EVENTS


REFERENCE_EVENTS = deliver(STREAM)[1]
test_any_chunking_gives_the_same_conversation, test_any_chunking_fuzz = _chunking
