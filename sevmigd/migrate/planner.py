"""Pre-copy planner: when to iterate, when to stop and copy, when to give up, how hard to throttle.

Owns the convergence decision of a live migration, exactly in the shape QEMU's migration driver takes it
(`migration/migration.c: migration_iteration_run`, `migration/ram.c: migration_bitmap_sync` and
`migration_trigger_throttle`): the driver knows nothing of RAM; after each round it reports what it sent,
how long that took and how many pages are dirty again, and asks "iterate, stop-and-copy, or give up?".

* Bandwidth is measured, per round, as bytes put on the wire / wall seconds (over a window of at least
  `BANDWIDTH_WINDOW_S`, QEMU's BUFFER_DELAY of 100 ms, so a few-millisecond round does not give a silly
  figure).
* Stop and copy when the remaining dirty bytes fit in bandwidth x downtime-limit (QEMU's threshold_size);
  the expected downtime is remaining / bandwidth (QEMU's expected-downtime).
* Auto-converge as QEMU: over periods of at least `THROTTLE_PERIOD_S` (QEMU syncs its dirty rate once a
  second), when the bytes dirtied in the period exceed `THROTTLE_TRIGGER_PCT` % of the bytes transferred in
  it, a counter goes up; on its second hit the vCPUs are throttled: first `THROTTLE_INITIAL_PCT`, then
  `+THROTTLE_INCREMENT_PCT` per step, capped at `THROTTLE_MAX_PCT` (cpu-throttle-initial / -increment /
  max-cpu-throttle defaults 20 / 10 / 99).
* Give up (the guest keeps running on the source) after `max_rounds` rounds or `max_total_s` seconds
  without converging. QEMU itself has no such limit; a daemon that must never hang a guest forever does.
* Migration policies (issue 12), decided here with an injected `clock` so the driver only asks:
  - completion timeout (Nova's live_migration_completion_timeout, KubeVirt's completionTimeoutPerGiB;
    the driver scales it by the guest's GiB): when it expires the action is `abort` (GIVE_UP, the guest
    keeps running on the source) or `force-complete` (FORCE_COMPLETE: stop and copy now, whatever the
    downtime; the driver reports the downtime it took);
  - progress timeout (KubeVirt's progressTimeout): GIVE_UP when "remaining" has not reached a new
    lowest value within N seconds. "Remaining" is compared like with like, which makes it robust to the
    oscillation KubeVirt's VEP 248 describes (QEMU's remaining falls towards 0 during every round and jumps
    back at each dirty-bitmap sync, so a low-water mark over raw samples is hit once and then never
    again, or is "improved" by every round of a migration that does not converge): a new low counts
    only for the figure taken right after a sync (round ends), plus, during round 1 (the bulk pass over
    all of memory, which can legitimately take longer than the timeout), the pages still to send in it.

Pure: no I/O, no clock of its own (round seconds are handed in; the policy timeouts read the injected
`clock`), no randomness. Never sees page contents.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

# QEMU BUFFER_DELAY (migration.c): bandwidth is computed over at least 100 ms of transfer.
BANDWIDTH_WINDOW_S = 0.1
# QEMU migration_bitmap_sync: the dirty rate / throttle check runs at most once per second.
THROTTLE_PERIOD_S = 1.0
# QEMU throttle-trigger-threshold default: dirtied bytes > 50 % of transferred bytes in a period.
THROTTLE_TRIGGER_PCT = 50
# QEMU: "If that happens twice, start or increase throttling" (dirty_rate_high_cnt >= 2).
THROTTLE_TRIGGER_COUNT = 2
# QEMU cpu-throttle-initial, cpu-throttle-increment, max-cpu-throttle defaults.
THROTTLE_INITIAL_PCT = 20
THROTTLE_INCREMENT_PCT = 10
THROTTLE_MAX_PCT = 99
# QEMU downtime-limit default (300 ms) and our daemon defaults for giving up.
DEFAULT_DOWNTIME_LIMIT_S = 0.3
DEFAULT_MAX_ROUNDS = 30
DEFAULT_MAX_TOTAL_S = 600.0


class Decision(enum.Enum):
    ITERATE = "iterate"              # send the pages dirtied since the last round, with the guest running
    STOP_AND_COPY = "stop-and-copy"  # pause the guest, send the rest, hand over
    GIVE_UP = "give-up"              # CONVERGENCE_FAILED: cancel, the guest keeps running on the source
    FORCE_COMPLETE = "force-complete"  # completion timeout with action force-complete: stop and copy now


COMPLETION_ACTIONS = ("abort", "force-complete")


@dataclass(frozen=True)
class RoundRecord:
    """What one pre-copy round did (kept for statistics and the per-round log line)."""

    round: int
    bytes_sent: int
    seconds: float
    dirty_pages: int
    bandwidth: float          # bytes/s estimate after this round
    expected_downtime: float  # seconds
    throttle_pct: int


class PrecopyPlanner:
    """Convergence decisions for one migration. Feed `round_done` after each round, then ask `decision()`.

    `page_size` bytes per page; `downtime_limit_s` the longest pause we accept; `max_bandwidth` bytes/s
    (0 = unlimited; the driver rate-limits, this only caps the estimate); `max_rounds` / `max_total_s`
    bound the whole pre-copy (0 = no bound).
    """

    def __init__(
        self,
        page_size: int,
        downtime_limit_s: float = DEFAULT_DOWNTIME_LIMIT_S,
        max_bandwidth: float = 0.0,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        max_total_s: float = DEFAULT_MAX_TOTAL_S,
        *,
        throttle_initial_pct: int = THROTTLE_INITIAL_PCT,
        throttle_increment_pct: int = THROTTLE_INCREMENT_PCT,
        throttle_max_pct: int = THROTTLE_MAX_PCT,
        throttle_period_s: float = THROTTLE_PERIOD_S,
        auto_converge: bool = True,
        switchover_s: float = 0.0,
        clock: Callable[[], float] | None = None,
        start: float | None = None,
        completion_timeout_s: float = 0.0,
        completion_action: str = "abort",
        progress_timeout_s: float = 0.0,
    ):
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        if downtime_limit_s <= 0:
            raise ValueError("downtime_limit_s must be positive")
        if max_bandwidth < 0 or max_rounds < 0 or max_total_s < 0 or switchover_s < 0:
            raise ValueError("limits must not be negative")
        if completion_timeout_s < 0 or progress_timeout_s < 0:
            raise ValueError("timeouts must not be negative")
        if completion_action not in COMPLETION_ACTIONS:
            raise ValueError(f"completion_action must be one of {COMPLETION_ACTIONS}")
        if (completion_timeout_s or progress_timeout_s) and clock is None:
            raise ValueError("completion and progress timeouts need a clock")
        self.page_size = page_size
        self.downtime_limit_s = float(downtime_limit_s)
        self.max_bandwidth = float(max_bandwidth)
        self.max_rounds = int(max_rounds)
        self.max_total_s = float(max_total_s)
        self.throttle_initial_pct = throttle_initial_pct
        self.throttle_increment_pct = throttle_increment_pct
        self.throttle_max_pct = throttle_max_pct
        self.throttle_period_s = throttle_period_s
        self.auto_converge = auto_converge
        # Fixed cost of the switch-over itself (the hand-off's last round trips, RECEIVE_FINISH, starting the
        # guest), added to the expected downtime; the driver passes a measured round trip. QEMU's
        # expected-downtime leaves it out, which at downtimes of 10-30 ms made the estimate 30-70 % low on
        # the dev box (measured - expected was a steady +7-10 ms). Not used by decision(), which stays QEMU's.
        self.switchover_s = float(switchover_s)

        self.rounds = 0
        self.total_s = 0.0
        self.transferred = 0
        self.remaining_pages: int | None = None  # unknown until the first round ends
        self.bandwidth = 0.0                      # bytes/s; 0 until measured
        self.throttle_pct = 0
        self.dirty_pages_rate = 0.0               # pages/s over the last throttle period
        self.history: list[RoundRecord] = []
        self._window: list[tuple[int, float]] = []
        self._period_bytes = 0
        self._period_dirty = 0
        self._period_s = 0.0
        self._high_count = 0
        # policy timeouts (times are clock() values)
        self.clock = clock
        self.completion_timeout_s = float(completion_timeout_s)
        self.completion_action = completion_action
        self.progress_timeout_s = float(progress_timeout_s)
        self.started_at = start if start is not None else (clock() if clock is not None else 0.0)
        self.lowest_remaining: int | None = None   # lowest post-sync remaining bytes so far
        self.lowest_bulk: int | None = None        # lowest bytes still to send in round 1
        # the progress clock starts with the pre-copy (now), the completion clock at `start` (the migration's)
        self.last_progress_at = clock() if clock is not None else self.started_at
        self.timeout_reason: str | None = None     # set when a policy timeout decided
        self.timeout_kind: str | None = None       # "completion" | "progress"

    # -- inputs ---------------------------------------------------------------------------------------

    def round_done(self, bytes_sent: int, seconds: float, dirty_pages: int) -> RoundRecord:
        """Record a finished round: `bytes_sent` on the wire in `seconds`, `dirty_pages` dirty again."""
        if bytes_sent < 0 or seconds < 0 or dirty_pages < 0:
            raise ValueError("round figures must not be negative")
        self.rounds += 1
        self.total_s += seconds
        self.transferred += bytes_sent
        self.remaining_pages = dirty_pages
        self._update_bandwidth(bytes_sent, seconds)
        self._update_throttle(bytes_sent, seconds, dirty_pages)
        self._note_progress(dirty_pages * self.page_size, synced=True)
        rec = RoundRecord(self.rounds, bytes_sent, seconds, dirty_pages, self.bandwidth,
                          self.expected_downtime, self.throttle_pct)
        self.history.append(rec)
        return rec

    def _update_bandwidth(self, bytes_sent: int, seconds: float) -> None:
        # Keep the most recent rounds that together span at least BANDWIDTH_WINDOW_S.
        self._window.append((bytes_sent, seconds))
        total_b, total_s, keep = 0, 0.0, 0
        for b, s in reversed(self._window):
            total_b += b
            total_s += s
            keep += 1
            if total_s >= BANDWIDTH_WINDOW_S:
                break
        self._window = self._window[-keep:]
        if total_s > 0 and total_b > 0:
            bw = total_b / total_s
            if self.max_bandwidth:
                bw = min(bw, self.max_bandwidth)
            self.bandwidth = bw

    def _update_throttle(self, bytes_sent: int, seconds: float, dirty_pages: int) -> None:
        self._period_bytes += bytes_sent
        self._period_dirty += dirty_pages
        self._period_s += seconds
        if self._period_s < self.throttle_period_s:
            return
        self.dirty_pages_rate = self._period_dirty / self._period_s
        dirty_bytes = self._period_dirty * self.page_size
        threshold = self._period_bytes * THROTTLE_TRIGGER_PCT / 100
        if self.auto_converge and dirty_bytes > threshold:
            self._high_count += 1
            if self._high_count >= THROTTLE_TRIGGER_COUNT:
                self._high_count = 0
                if self.throttle_pct == 0:
                    self.throttle_pct = self.throttle_initial_pct
                else:
                    self.throttle_pct = min(self.throttle_pct + self.throttle_increment_pct,
                                            self.throttle_max_pct)
        self._period_bytes = self._period_dirty = 0
        self._period_s = 0.0

    def in_round(self, left_bytes: int) -> None:
        """Mid-round progress (the driver calls it after each batch): bytes still to send in this round.
        Only round 1's count as progress (see the module docstring)."""
        if self.rounds == 0:
            self._note_progress(left_bytes, synced=False)

    def _note_progress(self, remaining: int, *, synced: bool) -> None:
        now = self.clock() if self.clock is not None else None
        if synced:
            if self.lowest_remaining is None or remaining < self.lowest_remaining:
                self.lowest_remaining = remaining
                if now is not None:
                    self.last_progress_at = now
        elif self.lowest_bulk is None or remaining < self.lowest_bulk:
            self.lowest_bulk = remaining
            if now is not None:
                self.last_progress_at = now

    def timeout_decision(self) -> Decision | None:
        """A policy timeout that has expired by now (clock()): GIVE_UP or FORCE_COMPLETE, else None.
        The completion timeout wins over the progress timeout (its action may be to complete)."""
        if self.clock is None:
            return None
        now = self.clock()
        if self.completion_timeout_s and now - self.started_at >= self.completion_timeout_s:
            self.timeout_kind = "completion"
            self.timeout_reason = (
                f"completion timeout: not complete after {now - self.started_at:.1f} s "
                f"(limit {self.completion_timeout_s:.1f} s), action {self.completion_action}")
            return Decision.FORCE_COMPLETE if self.completion_action == "force-complete" else Decision.GIVE_UP
        if self.progress_timeout_s and now - self.last_progress_at >= self.progress_timeout_s:
            low = self.lowest_remaining if self.lowest_remaining is not None else self.lowest_bulk
            self.timeout_kind = "progress"
            self.timeout_reason = (
                f"progress timeout: no new lowest remaining ({low} bytes) for {now - self.last_progress_at:.1f} s "
                f"(limit {self.progress_timeout_s:g} s)")
            return Decision.GIVE_UP
        return None

    def abort_deadline(self) -> float:
        """The clock() time at which a timeout whose action is to give up expires (inf when none): the
        driver cancels what it is doing then (even a send blocked on a stalled peer) and gives up."""
        t = float("inf")
        if self.completion_timeout_s and self.completion_action == "abort":
            t = self.started_at + self.completion_timeout_s
        if self.progress_timeout_s:
            t = min(t, self.last_progress_at + self.progress_timeout_s)
        return t

    # -- answers --------------------------------------------------------------------------------------

    @property
    def remaining_bytes(self) -> int | None:
        return None if self.remaining_pages is None else self.remaining_pages * self.page_size

    @property
    def threshold_bytes(self) -> float:
        """Bytes that can be sent within the downtime limit at the measured bandwidth (QEMU threshold_size)."""
        return self.bandwidth * self.downtime_limit_s

    @property
    def expected_downtime(self) -> float:
        """Seconds the final stop-and-copy would take now: remaining / bandwidth + switchover_s (inf when
        unmeasured)."""
        rem = self.remaining_bytes
        if rem is None:
            return float("inf")
        if rem == 0:
            return self.switchover_s
        return rem / self.bandwidth + self.switchover_s if self.bandwidth > 0 else float("inf")

    def decision(self) -> Decision:
        """Iterate, stop and copy, or give up, from what the rounds so far measured."""
        rem = self.remaining_bytes
        if rem is None:
            return Decision.ITERATE  # nothing sent yet: round 1 sends everything
        if rem == 0 or (self.bandwidth > 0 and rem <= self.threshold_bytes):
            return Decision.STOP_AND_COPY
        timed_out = self.timeout_decision()
        if timed_out is not None:
            return timed_out
        if self.max_rounds and self.rounds >= self.max_rounds:
            return Decision.GIVE_UP
        if self.max_total_s and self.total_s >= self.max_total_s:
            return Decision.GIVE_UP
        return Decision.ITERATE

    def give_up_reason(self) -> str:
        """One line saying why the migration did not converge (for the CONVERGENCE_FAILED message)."""
        if self.timeout_reason is not None:
            return self.timeout_reason
        why = (f"{self.rounds} rounds" if self.max_rounds and self.rounds >= self.max_rounds
               else f"{self.total_s:.1f} s")
        rem = self.remaining_bytes or 0
        return (f"did not converge after {why}: {rem} bytes still dirty, measured bandwidth "
                f"{self.bandwidth / 2**20:.1f} MiB/s, expected downtime {self.expected_downtime * 1000:.0f} ms "
                f"> limit {self.downtime_limit_s * 1000:.0f} ms (throttle {self.throttle_pct} %)")
