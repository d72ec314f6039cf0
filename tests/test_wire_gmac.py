"""The negotiated frame MAC "mac-aes-gmac" (PROTOCOL.md §9.5): in effect only when both sides list it,
same frame grammar (32-byte bin 8 MAC element: the GMAC tag and 16 zero bytes), every integrity check of
§9 still holds (tamper, replay, wrong key), and the HMAC-SHA256 mode is unchanged without it."""

from __future__ import annotations

import numpy as np
import pytest

from sevmigd.wire import NEED_DATA, SUPPORTED_FEATURES, State, integrity
from sevmigd.wire import messages as m
from sevmigd.wire.connection import encode_body
from sevmigd.wire.errors import AbortCode, RemoteProtocolError
from sevmigd.wire.framing import PREFIX
from sevmigd.wire.limits import PAGE_SIZE, SEV_HDR_SIZE
from sevmigd.wire.messages import MsgType
from sevmigd.wire.testing import pair, sample_hello, script, transfer

G = integrity.FEATURE_GMAC


def _pages_frame(src, shared_byte=0x5A):
    return src.send_pages(src.round, np.array([0, 1], dtype="<u8"), bytes(range(SEV_HDR_SIZE)) * 2,
                          b"\xee" * (2 * PAGE_SIZE), np.array([2], dtype="<u8"), bytes([shared_byte]) * PAGE_SIZE)


def test_daemons_offer_gmac():
    assert G in SUPPORTED_FEATURES


@pytest.mark.parametrize("hello_f, accept_f, want", [((G,), (G,), True), ((G,), (), False), ((), (G,), False)])
def test_gmac_only_when_both_list_it(hello_f, accept_f, want):
    src, dst = pair(hello=sample_hello(features=hello_f), until=State.IDLE)
    steps = iter(script(sample_hello(features=hello_f), accept_f))
    for role, make in steps:
        a, b = (src, dst) if role.value == "source" else (dst, src)
        transfer(a, b, make())
        if src.state == "PRECOPY":
            break
    kind = integrity.GmacKey if want else integrity.MacKey
    assert isinstance(src._send_key, kind) and isinstance(dst._recv_key, kind)
    assert src.features == dst.features == (frozenset({G}) if want else frozenset())


def test_gmac_conversation_runs_to_the_end():
    src, dst = pair(until=State.DONE, features=(G,))
    assert isinstance(src._send_key, integrity.GmacKey) and src._send_key != src._recv_key


def test_gmac_frame_has_tag_and_zero_padding_and_verifies():
    src, dst = pair(until=State.PRECOPY, features=(G,))
    frame = _pages_frame(src)
    assert frame[-34:-32] == b"\xc4\x20" and frame[-16:] == bytes(16) and any(frame[-32:-16])
    dst.receive_data(frame)
    ev = dst.next_event()
    assert isinstance(ev, m.Pages) and bytes(ev.shr_data) == b"\x5a" * PAGE_SIZE


@pytest.mark.parametrize("where", ["shared_page", "tag", "padding", "pfn"])
def test_gmac_detects_tampering(where):
    src, dst = pair(until=State.PRECOPY, features=(G,))
    frame = bytearray(_pages_frame(src))
    off = {"shared_page": len(frame) - 34 - 2 * PAGE_SIZE - 3 - 100, "tag": len(frame) - 20,
           "padding": len(frame) - 1, "pfn": 30}[where]
    frame[off] ^= 0x01
    dst.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError) as ei:
        dst.next_event()
    assert ei.value.code in (AbortCode.INTEGRITY_FAILURE, AbortCode.PROTOCOL_ERROR)


def test_gmac_replay_and_wrong_key_are_refused():
    src, dst = pair(until=State.PRECOPY, features=(G,))
    frame = _pages_frame(src)
    dst.receive_data(frame)
    assert isinstance(dst.next_event(), m.Pages)
    dst.receive_data(frame)                                  # the same frame again: old seq
    with pytest.raises(RemoteProtocolError) as ei:
        dst.next_event()
    assert ei.value.code == AbortCode.INTEGRITY_FAILURE
    # a frame MACed with the HMAC recipe under the same key bytes does not verify in GMAC mode
    src2, dst2 = pair(until=State.PRECOPY, features=(G,))
    body = encode_body(MsgType.KEEPALIVE, [], seq=src2._send_seq, key=integrity.MacKey(src2._send_key.raw))
    dst2.receive_data(PREFIX.pack(len(body)) + body)
    with pytest.raises(RemoteProtocolError) as ei:
        dst2.next_event()
    assert ei.value.code == AbortCode.INTEGRITY_FAILURE


def test_gmac_tag_depends_on_seq_and_key():
    k = integrity.GmacKey(bytes(range(32)))
    tags = set()
    for key, seq in ((k, 1), (k, 2), (integrity.GmacKey(bytes(32)), 1)):
        h = key.start(seq)
        h.update(b"same content")
        tags.add(key.finish(h))
    assert len(tags) == 3
    with pytest.raises(ValueError):
        k.start(None)
    with pytest.raises(TypeError):
        integrity.new_mac(k)
    assert "GmacKey(...)" == repr(k)


def test_gmac_keepalive_roundtrip_after_pages():
    src, dst = pair(until=State.PRECOPY, features=(G,))
    for _ in range(3):
        dst.receive_data(src.send(m.Keepalive()))
        assert dst.next_event() == m.Keepalive() and dst.next_event() is NEED_DATA
