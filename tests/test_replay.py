"""The destination's replay record (sevmigd/daemon/replay.py): bounded, durable, owner-only, typed errors.

Pure file tests in tmp dirs; the attack it stops (a recorded migration sent again) is in
tests/test_security_attacks.py.
"""

from __future__ import annotations

import os
import stat

import pytest

from sevmigd.daemon.replay import MAGIC, ReplayRecord, ReplayRecordError, session_digest


def _session(i: int) -> bytes:
    return i.to_bytes(4, "big") * 32  # 128 bytes, like SEND_START's blob


def test_a_session_is_accepted_once_and_survives_a_restart(tmp_path):
    path = tmp_path / "replay.record"
    rec = ReplayRecord.open(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    d = rec.reserve(_session(1))
    assert d == session_digest(_session(1))
    assert rec.reserve(_session(1)) is None      # reserved in memory before it is durable
    rec.persist(d)
    again = ReplayRecord.open(path)              # a restarted daemon
    assert _session(1) in again and _session(2) not in again
    assert again.reserve(_session(1)) is None
    assert again.reserve(_session(2)) is not None
    assert path.read_bytes() == MAGIC + session_digest(_session(1))


def test_window_evicts_the_oldest_and_compacts_the_file(tmp_path):
    path = tmp_path / "replay.record"
    rec = ReplayRecord.open(path, window=8)
    for i in range(20):
        rec.persist(rec.reserve(_session(i)))
    assert len(rec) == 8
    assert _session(19) in rec and _session(12) in rec and _session(11) not in rec
    # the file is compacted once it grows a quarter beyond the window: never more than window * 1.25 entries
    assert (path.stat().st_size - len(MAGIC)) // 32 <= 10
    reopened = ReplayRecord.open(path, window=8)
    assert _session(19) in reopened and _session(11) not in reopened


def test_torn_last_append_is_dropped(tmp_path):
    path = tmp_path / "replay.record"
    rec = ReplayRecord.open(path)
    rec.persist(rec.reserve(_session(1)))
    with open(path, "ab") as f:
        f.write(session_digest(_session(2))[:13])  # a crash in the middle of an append
    again = ReplayRecord.open(path)
    assert _session(1) in again and _session(2) not in again
    assert path.stat().st_size == len(MAGIC) + 32


@pytest.mark.parametrize("content", [b"not a replay record at all", b"X" * 16 + b"\0" * 32])
def test_damaged_record_is_a_typed_error_and_reset_keeps_it(tmp_path, content):
    path = tmp_path / "replay.record"
    path.write_bytes(content)
    with pytest.raises(ReplayRecordError) as ei:
        ReplayRecord.open(path)
    assert str(path) in str(ei.value) and "bad header" in str(ei.value)
    rec = ReplayRecord(path)
    kept = rec.reset()
    assert kept is not None and kept.read_bytes() == content
    assert path.read_bytes() == MAGIC
    assert ReplayRecord.open(path).reserve(_session(1)) is not None


def test_special_file_is_refused(tmp_path):
    path = tmp_path / "replay.record"
    os.mkfifo(path)
    with pytest.raises(ReplayRecordError) as ei:
        ReplayRecord.open(path)
    assert "not a regular file" in str(ei.value)
