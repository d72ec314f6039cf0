"""Watch the daemon's event loop for blocking calls: the longest synchronous step of any task.

Everything of a daemon shares one thread: a task that runs for a long time between two checkpoints (a
blocking read, a synchronous connect, key generation, a whole-guest computation) stalls every guest's
vCPUs, every migration's keepalives and the control socket at once. Like asyncio's debug mode
(`slow_callback_duration`), `StepWatch` is a trio Instrument that times each task step (from
`before_task_step` to `after_task_step`), keeps the longest one, and logs a `slow_step` warning for any
step of at least `warn_s`. The daemon installs it when `slow_step_warn_ms` is set and reports the figures
in `server-info` (`longest_step_ms`, `longest_step_task`, `slow_steps`), which is how the tests prove that
no blocking call is left in the loop.

Off by default: it adds two clock reads and a comparison to every task step.
It must never raise out of a hook (trio would disable the instrument) or log more than once a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
import trio

# At most one slow_step log line per this many seconds (the counter still counts every slow step).
LOG_INTERVAL_S = 1.0


class StepWatch(trio.abc.Instrument):
    """Times task steps; see the module docstring."""

    def __init__(self, warn_s: float, *, clock: Callable[[], float] = time.perf_counter,
                 log: structlog.typing.FilteringBoundLogger | None = None):
        self.warn_s = warn_s
        self.longest_s = 0.0
        self.longest_task: str | None = None
        self.slow_steps = 0
        self._clock = clock
        self._log = log or structlog.get_logger("sevmigd")
        self._t0: float | None = None   # None until a step began under the watch (it is added mid-step)
        self._logged_at = float("-inf")

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t0 = self._clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._t0 is None:
            return
        now = self._clock()
        dt = now - self._t0
        if dt > self.longest_s:
            self.longest_s = dt
            self.longest_task = task.name
        if dt >= self.warn_s:
            self.slow_steps += 1
            if now - self._logged_at >= LOG_INTERVAL_S:
                self._logged_at = now
                self._log.warning("slow_step", task=task.name, ms=round(dt * 1000, 1),
                                  warn_ms=round(self.warn_s * 1000, 1), slow_steps=self.slow_steps)

    def figures(self) -> dict[str, object]:
        """What server-info reports."""
        return {"longest_step_ms": round(self.longest_s * 1000, 3), "longest_step_task": self.longest_task,
                "slow_steps": self.slow_steps}


__all__ = ["StepWatch", "LOG_INTERVAL_S"]
