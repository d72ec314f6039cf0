"""The settlement query's own conversation (PROTOCOL.md §7.6): IDLE -Query(S)-> QUERIED -Answer(D)-> ANSWERED,
on a connection of its own, with no channel keys (the TLS channel authenticates it)."""

from __future__ import annotations

import pytest

from sevmigd.wire import CLOSED, NEED_DATA, AbortCode, Connection, LocalProtocolError, RemoteProtocolError, Role
from sevmigd.wire import messages as m
from sevmigd.wire.connection import decode_frame
from sevmigd.wire.framing import PREFIX, array_header, pack
from sevmigd.wire.testing import forge, sample_hello, transfer

SID = "0123456789abcdef" * 2


def _query(**kw):
    return m.Query(**{"version": 1, "migration_id": "m1", "session_id": SID, **kw})


def test_query_and_answer_end_the_conversation_cleanly():
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    q = transfer(src, dst, _query())
    assert q == _query() and dst.state == src.state == "QUERIED"
    a = transfer(dst, src, m.Answer(SID, m.OUTCOME_STARTED, ""))
    assert a.outcome == "started" and src.state == dst.state == "ANSWERED"
    for c in (src, dst):
        c.receive_data(b"")
        assert c.next_event() is CLOSED
    # nothing more may be said after the answer
    with pytest.raises(LocalProtocolError):
        Connection(Role.SOURCE).send(m.Answer(SID, "started", ""))


def test_eof_before_the_answer_is_a_truncated_conversation():
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    transfer(src, dst, _query())
    src.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as ei:
        src.next_event()
    assert ei.value.code is AbortCode.PROTOCOL_ERROR


def test_an_answer_about_another_session_is_refused_by_both_sides():
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    transfer(src, dst, _query())
    with pytest.raises(LocalProtocolError):
        dst.send(m.Answer("f" * 32, m.OUTCOME_STARTED, ""))
    src2, dst2 = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    transfer(src2, dst2, _query())
    src2.receive_data(forge(dst2, m.Answer("f" * 32, m.OUTCOME_STARTED, "")))
    with pytest.raises(RemoteProtocolError) as ei:
        src2.next_event()
    assert ei.value.code is AbortCode.PROTOCOL_ERROR


@pytest.mark.parametrize("bad", ["0" * 31, "0" * 33, "G" * 32, "AB" * 16])
def test_session_id_must_be_32_lower_case_hex_digits(bad):
    with pytest.raises(LocalProtocolError):
        Connection(Role.SOURCE).send(_query(session_id=bad))
    dst = Connection(Role.DESTINATION)
    dst.receive_data(forge(Connection(Role.SOURCE), _query(session_id=bad)))
    with pytest.raises(RemoteProtocolError):
        dst.next_event()


def test_an_unknown_outcome_is_a_protocol_error():
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    transfer(src, dst, _query())
    src.receive_data(forge(dst, m.Answer(SID, "maybe", "")))
    with pytest.raises(RemoteProtocolError) as ei:
        src.next_event()
    assert "outcome" in ei.value.message


def test_a_query_needs_the_magic():
    body = array_header(7) + pack([int(m.MsgType.QUERY), 0, "notsevmigd", 1, "m1", SID])[1:] + b"\xc0"
    with pytest.raises(RemoteProtocolError) as ei:
        decode_frame(PREFIX.pack(len(body)) + body)
    assert "magic" in ei.value.message


def test_query_is_only_the_first_frame_and_not_inside_a_migration():
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    transfer(src, dst, sample_hello())
    with pytest.raises(LocalProtocolError):
        src.send(_query())
    # a destination never asks
    with pytest.raises(LocalProtocolError):
        Connection(Role.DESTINATION).send(_query())


def test_the_destination_may_abort_a_query():
    src, dst = Connection(Role.SOURCE), Connection(Role.DESTINATION)
    transfer(src, dst, _query())
    ab = transfer(dst, src, m.Abort(AbortCode.SHUTDOWN, "going down"))
    assert ab.code is AbortCode.SHUTDOWN and src.state == "ABORTED"
    assert src.next_event() is NEED_DATA
