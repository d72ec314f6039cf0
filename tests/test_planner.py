"""Pure tests of the pre-copy planner and the token bucket (no I/O, no clock: seconds are handed in)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmigd.migrate.planner import (
    BANDWIDTH_WINDOW_S,
    Decision,
    PrecopyPlanner,
    THROTTLE_INITIAL_PCT,
    THROTTLE_MAX_PCT,
)
from sevmigd.migrate.ratelimit import TokenBucket

PAGE = 4096
MiB = 1 << 20


def planner(**kw) -> PrecopyPlanner:
    kw.setdefault("downtime_limit_s", 0.3)
    return PrecopyPlanner(PAGE, **kw)


def test_first_decision_is_iterate_and_downtime_unknown():
    p = planner()
    assert p.decision() is Decision.ITERATE
    assert math.isinf(p.expected_downtime)


def test_stops_when_remaining_fits_bandwidth_times_downtime_limit():
    p = planner()
    # 100 MiB in 1 s -> 100 MiB/s; 300 ms of that is 30 MiB.
    p.round_done(100 * MiB, 1.0, dirty_pages=(30 * MiB) // PAGE)
    assert p.bandwidth == pytest.approx(100 * MiB)
    assert p.expected_downtime == pytest.approx(0.3)
    assert p.decision() is Decision.STOP_AND_COPY


def test_iterates_when_remaining_exceeds_threshold():
    p = planner()
    p.round_done(100 * MiB, 1.0, dirty_pages=(31 * MiB) // PAGE)
    assert p.expected_downtime == pytest.approx(0.31)
    assert p.decision() is Decision.ITERATE


def test_nothing_dirty_stops_at_once():
    p = planner()
    p.round_done(4 * MiB, 0.5, dirty_pages=0)
    assert p.expected_downtime == 0.0
    assert p.decision() is Decision.STOP_AND_COPY


def test_shrinking_rounds_converge():
    p = planner()
    dirty = 10_000
    decisions = []
    for _ in range(10):
        p.round_done(dirty * PAGE, dirty * PAGE / (50 * MiB), dirty_pages=dirty // 3)
        decisions.append(p.decision())
        if decisions[-1] is not Decision.ITERATE:
            break
        dirty //= 3
    assert decisions[-1] is Decision.STOP_AND_COPY
    assert p.throttle_pct == 0  # rounds shrank: no reason to throttle


def test_auto_converge_steps_20_30_40_like_qemu():
    """Dirty bytes > 50 % of transferred in a period: throttle on every second such period, 20 then +10."""
    p = planner(max_rounds=0, max_total_s=0)
    seen = []
    for _ in range(8):
        # 1 s periods; 10 MiB sent, 8 MiB dirtied -> 80 % > 50 %, and far above the downtime threshold
        p.round_done(10 * MiB, 1.0, dirty_pages=(8 * MiB) // PAGE)
        seen.append(p.throttle_pct)
        assert p.decision() is Decision.ITERATE
    assert seen == [0, 20, 20, 30, 30, 40, 40, 50]


def test_auto_converge_capped_at_99():
    p = planner(max_rounds=0, max_total_s=0, downtime_limit_s=0.001)
    for _ in range(40):
        p.round_done(10 * MiB, 1.0, dirty_pages=(8 * MiB) // PAGE)
    assert p.throttle_pct == THROTTLE_MAX_PCT


def test_no_throttle_when_dirty_below_half_of_transferred():
    p = planner(max_rounds=0, max_total_s=0, downtime_limit_s=0.001)
    for _ in range(6):
        p.round_done(10 * MiB, 1.0, dirty_pages=(4 * MiB) // PAGE)  # 40 % < 50 %
    assert p.throttle_pct == 0


def test_throttle_period_accumulates_short_rounds():
    """Rounds shorter than a second are summed into one QEMU-style period before the check."""
    p = planner(max_rounds=0, max_total_s=0, downtime_limit_s=0.001)
    pcts = []
    for _ in range(8):  # four 1-s periods of two 0.5-s rounds each
        p.round_done(5 * MiB, 0.5, dirty_pages=(4 * MiB) // PAGE)
        pcts.append(p.throttle_pct)
    assert pcts == [0, 0, 0, THROTTLE_INITIAL_PCT, THROTTLE_INITIAL_PCT, THROTTLE_INITIAL_PCT,
                    THROTTLE_INITIAL_PCT, THROTTLE_INITIAL_PCT + 10]


def test_auto_converge_can_be_disabled():
    p = planner(max_rounds=0, max_total_s=0, auto_converge=False)
    for _ in range(6):
        p.round_done(10 * MiB, 1.0, dirty_pages=(8 * MiB) // PAGE)
    assert p.throttle_pct == 0


def test_gives_up_after_max_rounds():
    p = planner(max_rounds=5, max_total_s=0)
    for i in range(5):
        p.round_done(10 * MiB, 1.0, dirty_pages=(8 * MiB) // PAGE)
        assert p.decision() is (Decision.GIVE_UP if i == 4 else Decision.ITERATE)
    assert "5 rounds" in p.give_up_reason()


def test_gives_up_after_max_total_time():
    p = planner(max_rounds=0, max_total_s=10)
    p.round_done(10 * MiB, 6.0, dirty_pages=(8 * MiB) // PAGE)
    assert p.decision() is Decision.ITERATE
    p.round_done(10 * MiB, 4.0, dirty_pages=(8 * MiB) // PAGE)
    assert p.decision() is Decision.GIVE_UP
    assert "10.0 s" in p.give_up_reason()


def test_converging_round_wins_over_the_round_limit():
    """The last allowed round that converges stops and copies rather than giving up."""
    p = planner(max_rounds=1)
    p.round_done(100 * MiB, 1.0, dirty_pages=1)
    assert p.decision() is Decision.STOP_AND_COPY


def test_bandwidth_cap_bounds_the_estimate_and_the_threshold():
    p = planner(max_bandwidth=10 * MiB)
    # The loopback measured 100 MiB/s but we are capped at 10 MiB/s: 3 MiB fit in 300 ms, 20 MiB do not.
    p.round_done(100 * MiB, 1.0, dirty_pages=(20 * MiB) // PAGE)
    assert p.bandwidth == pytest.approx(10 * MiB)
    assert p.threshold_bytes == pytest.approx(3 * MiB)
    assert p.expected_downtime == pytest.approx(2.0)
    assert p.decision() is Decision.ITERATE


def test_bandwidth_window_ignores_a_single_tiny_round():
    p = planner()
    p.round_done(100 * MiB, 1.0, dirty_pages=1000)
    # a 1 ms round that moved one page would claim 4 MB/s alone; the 100 ms window keeps the big round in
    p.round_done(PAGE, 0.001, dirty_pages=1000)
    assert p.bandwidth == pytest.approx((100 * MiB + PAGE) / 1.001)
    assert BANDWIDTH_WINDOW_S == 0.1


def test_rejects_nonsense():
    with pytest.raises(ValueError):
        PrecopyPlanner(0)
    with pytest.raises(ValueError):
        PrecopyPlanner(PAGE, downtime_limit_s=0)
    with pytest.raises(ValueError):
        planner().round_done(-1, 1.0, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 34), st.floats(0, 100), st.integers(0, 1 << 24)),
                min_size=1, max_size=40))
def test_planner_invariants(rounds):
    p = planner(max_rounds=30, max_total_s=600)
    last = 0
    for b, s, d in rounds:
        p.round_done(b, s, d)
        dec = p.decision()
        assert 0 <= p.throttle_pct <= THROTTLE_MAX_PCT
        assert p.throttle_pct >= last
        last = p.throttle_pct
        if dec is Decision.STOP_AND_COPY:
            assert d == 0 or d * PAGE <= p.bandwidth * 0.3 + 1e-6
        if p.rounds >= 30 and dec is Decision.ITERATE:
            pytest.fail("iterated past max_rounds")


def test_token_bucket_unlimited_never_waits():
    tb = TokenBucket(0)
    assert tb.reserve(1 << 30, 0.0) == 0.0


def test_token_bucket_enforces_long_run_rate():
    rate = 10 * MiB
    tb = TokenBucket(rate, now=0.0)
    now, sent = 0.0, 0
    for _ in range(100):
        delay = tb.reserve(MiB, now)
        now += delay  # the caller sleeps the delay before sending
        sent += MiB
    # 100 MiB at 10 MiB/s with a 1 MiB burst: at least 9.9 s
    assert now == pytest.approx((100 * MiB - tb.capacity) / rate)
    assert sent / now <= rate * 1.02


def test_token_bucket_refills_while_idle_up_to_the_burst():
    tb = TokenBucket(MiB, now=0.0)
    assert tb.reserve(int(tb.capacity), 0.0) == 0.0
    assert tb.reserve(PAGE, 0.0) == pytest.approx(PAGE / MiB, rel=1e-3)
    # after a long idle time only one burst is available, not the whole idle time's worth
    assert tb.reserve(int(tb.capacity), 1000.0) == 0.0
    assert tb.reserve(PAGE, 1000.0) == pytest.approx(PAGE / MiB, rel=1e-3)


def test_switchover_cost_adds_to_expected_downtime_but_not_to_the_decision():
    a = PrecopyPlanner(PAGE, downtime_limit_s=0.3)
    b = PrecopyPlanner(PAGE, downtime_limit_s=0.3, switchover_s=0.012)
    for p in (a, b):
        p.round_done(100 * MiB, 1.0, dirty_pages=(25 * MiB) // PAGE)
    assert b.expected_downtime == pytest.approx(a.expected_downtime + 0.012)
    assert a.decision() is b.decision() is Decision.STOP_AND_COPY
    c = PrecopyPlanner(PAGE, switchover_s=0.01)
    c.round_done(10 * MiB, 0.5, dirty_pages=0)
    assert c.expected_downtime == pytest.approx(0.01)
    with pytest.raises(ValueError):
        PrecopyPlanner(PAGE, switchover_s=-1)
