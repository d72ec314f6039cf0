"""Migration policies in the pure planner (issue 12): completion timeout with abort / force-complete, the
progress timeout and its robustness to the oscillation of "remaining" (KubeVirt VEP 248), auto-converge
off. A fake clock is injected; nothing sleeps."""

from __future__ import annotations

import pytest

from sevmigd.migrate.planner import Decision, PrecopyPlanner

PAGE = 4096
MiB = 1 << 20


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def planner(clock, **kw):
    kw.setdefault("max_rounds", 0)
    kw.setdefault("max_total_s", 0)
    return PrecopyPlanner(PAGE, downtime_limit_s=0.3, clock=clock, **kw)


def dirty_round(p, clock, *, secs=1.0, bytes_sent=8 * MiB, dirty_mib=64):
    clock.t += secs
    p.round_done(bytes_sent, secs, dirty_mib * MiB // PAGE)
    return p.decision()


def test_completion_timeout_abort_gives_up_and_says_why():
    c = Clock()
    p = planner(c, completion_timeout_s=5.0, completion_action="abort")
    assert p.abort_deadline() == 105.0
    for _ in range(4):
        assert dirty_round(p, c) is Decision.ITERATE
    assert dirty_round(p, c) is Decision.GIVE_UP
    assert p.timeout_kind == "completion"
    assert "completion timeout" in p.give_up_reason() and "abort" in p.give_up_reason()


def test_completion_timeout_force_complete_stops_and_copies_without_an_abort_deadline():
    c = Clock()
    p = planner(c, completion_timeout_s=3.0, completion_action="force-complete")
    assert p.abort_deadline() == float("inf")  # force-complete never cancels a send
    assert dirty_round(p, c) is Decision.ITERATE
    c.t += 2.5
    assert p.timeout_decision() is Decision.FORCE_COMPLETE
    assert dirty_round(p, c, secs=0.1) is Decision.FORCE_COMPLETE


def test_converging_migration_is_not_forced_even_after_the_timeout():
    c = Clock()
    p = planner(c, completion_timeout_s=1.0, completion_action="abort")
    c.t += 5
    p.round_done(64 * MiB, 1.0, 10)  # 40 KiB left at 64 MiB/s: fits the downtime limit
    assert p.decision() is Decision.STOP_AND_COPY


def test_progress_timeout_fires_when_no_new_low_after_sync():
    c = Clock()
    p = planner(c, progress_timeout_s=10.0)
    assert dirty_round(p, c, dirty_mib=64) is Decision.ITERATE      # first sync: a new low
    assert dirty_round(p, c, dirty_mib=48) is Decision.ITERATE      # lower: progress at t=102
    # oscillating above the low water mark: 50, 60, 49, 55 ... never below 48
    for mib in (50, 60, 49, 55, 52, 58, 49, 51, 62, 50):
        d = dirty_round(p, c, dirty_mib=mib)
        if c.t - 102 < 10:
            assert d is Decision.ITERATE
    assert d is Decision.GIVE_UP
    assert p.timeout_kind == "progress" and "no new lowest remaining" in p.give_up_reason()


def test_in_round_samples_after_round_one_do_not_count_as_progress():
    """QEMU's remaining falls to ~0 inside every round; counting those samples would either fire on a
    converging migration or never fire on an oscillating one. Only round 1 (the bulk pass) counts."""
    c = Clock()
    p = planner(c, progress_timeout_s=5.0)
    for left in range(64, 0, -8):  # round 1 takes 8 s > the timeout, but keeps making progress
        c.t += 1.0
        p.in_round(left * MiB)
        assert p.timeout_decision() is None
    c.t += 1.0
    p.round_done(64 * MiB, 8.0, 32 * MiB // PAGE)
    start = c.t
    for _ in range(6):  # rounds >= 2: in-round lows (down to 0) are ignored
        for left in (24, 16, 8, 0):
            c.t += 0.25
            p.in_round(left * MiB)
        p.round_done(32 * MiB, 1.0, 40 * MiB // PAGE)  # dirtied back above the low-water mark
    assert c.t - start >= 5.0
    assert p.decision() is Decision.GIVE_UP and p.timeout_kind == "progress"


def test_stalled_first_round_hits_the_abort_deadline():
    c = Clock()
    p = planner(c, progress_timeout_s=4.0)
    p.in_round(60 * MiB)
    assert p.abort_deadline() == 104.0
    c.t += 3.9
    assert p.timeout_decision() is None
    c.t += 0.2
    assert p.timeout_decision() is Decision.GIVE_UP


def test_auto_converge_off_never_throttles():
    c = Clock()
    on, off = planner(c), planner(c, auto_converge=False)
    for _ in range(10):
        for p in (on, off):
            p.round_done(8 * MiB, 1.0, 64 * MiB // PAGE)
    assert on.throttle_pct > 0 and off.throttle_pct == 0


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError):
        PrecopyPlanner(PAGE, completion_timeout_s=1.0)  # a timeout needs a clock
    with pytest.raises(ValueError):
        PrecopyPlanner(PAGE, clock=Clock(), completion_action="retry")
    with pytest.raises(ValueError):
        PrecopyPlanner(PAGE, clock=Clock(), progress_timeout_s=-1)


def test_shared_bucket_shares_fairly_and_respects_own_caps():
    from sevmigd.migrate.ratelimit import SharedLimit, TokenBucket

    shared = TokenBucket(10 * MiB, now=0.0)
    a = SharedLimit(TokenBucket(0, now=0.0), shared)
    b = SharedLimit(TokenBucket(0, now=0.0), shared)
    slow = SharedLimit(TokenBucket(1 * MiB, now=0.0), shared)
    # event simulation: each migration sends 256 KiB batches as soon as its reservation allows
    ready = {"a": 0.0, "b": 0.0, "slow": 0.0}
    sent = {k: 0 for k in ready}
    lims = {"a": a, "b": b, "slow": slow}
    while True:
        k = min(ready, key=ready.get)
        now = ready[k]
        if now > 20.0:
            break
        ready[k] = now + lims[k].reserve(256 << 10, now)
        sent[k] += 256 << 10
    total = sum(sent.values()) / 20.0
    assert total <= 10.5 * MiB                        # the host cap holds
    assert sent["slow"] / 20.0 <= 1.1 * MiB           # its own cap holds
    assert abs(sent["a"] - sent["b"]) <= 0.03 * sent["a"]  # the two uncapped ones share equally ...
    assert sent["a"] / 20.0 >= 4.0 * MiB              # ... and take what the capped one leaves


def test_shared_bucket_rate_changes_keep_the_debt():
    from sevmigd.migrate.ratelimit import TokenBucket

    b = TokenBucket(0, now=0.0)
    assert b.reserve(10 * MiB, 0.0) == 0.0            # 0 = unlimited
    b.set_rate(1 * MiB, 1.0)                          # a reload sets a cap
    assert b.reserve(1 * MiB, 1.0) == pytest.approx(1.0)
    b.set_rate(2 * MiB, 1.0)                          # raised: the same debt is repaid twice as fast
    assert b.reserve(0, 1.0) == pytest.approx(0.5)
    b.set_rate(0, 1.0)
    assert b.reserve(100 * MiB, 1.0) == 0.0
    with pytest.raises(ValueError):
        b.set_rate(-1, 2.0)


def test_completion_counts_from_the_migration_start_progress_from_the_precopy():
    c = Clock()  # t = 100: the pre-copy starts; the migration (handshake, SEND_START) started at 97
    p = planner(c, start=97.0, completion_timeout_s=10.0, progress_timeout_s=5.0)
    assert p.abort_deadline() == 105.0  # progress: 100 + 5
    p2 = planner(c, start=97.0, completion_timeout_s=4.0, progress_timeout_s=5.0)
    assert p2.abort_deadline() == 101.0  # completion: 97 + 4
