"""Host evacuation: move every running guest off this host (`sevmigd ctl evacuate`), for maintenance.

Owns `Evacuation(manager, targets, max_parallel=, policy=)`: the plan (each guest that runs here, in name
order, goes to the next destination round-robin; a guest that cannot move - NOSEND policy, no
migration control, a policy refusal, not running - is listed with the reason and left running), and
its run: at most `max_parallel` migrations at once, each an ordinary outgoing job, so `max_outgoing`,
the queue, the policies and the shared bandwidth apply as to any migration; the effective parallelism
is min(max_parallel, max_outgoing). Like Nova's `host-evacuate-live` and a KubeVirt node drain, it
never chooses destinations itself: the caller lists them. A failed migration is reported, not retried
elsewhere (the guest keeps running here).

Design choice: the evacuation runs inside the daemon (a control verb), not in `ctl`. It lives in the
daemon's nursery, so it carries on when the `ctl` that started it is killed or its ssh session drops;
its migrations are visible in `ctl jobs` meanwhile, and only one evacuation runs at a time.

Must never: move a guest that refused (it stays running, with its reason), or run more than
`max_parallel` migrations of its own at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from sevmigd.daemon.config import split_host_port
from sevmigd.daemon.errors import GuestUnavailable
from sevmigd.daemon.migration import in_sync_percent
from sevmigd.errors import ConfigError, SevmigdError
from sevmigd.migrate.errors import MigrationError

if TYPE_CHECKING:  # the migration manager runs evacuations; this module only names its types
    from sevmigd.daemon.migration import Job, MigrationManager

# How often the live table is refreshed for the ctl client (progress events), at most.
SNAPSHOT_INTERVAL_S = 0.5
MAX_TARGETS = 64


@dataclass
class Row:
    guest: str
    state: str                 # planned | queued | migrating | done | failed | left
    to: str | None = None
    reason: str | None = None
    code: str | None = None    # why it was left or failed, typed: an AbortCode name or a GuestUnavailable code
    job: Job | None = None

    def as_dict(self) -> dict:
        d: dict[str, object] = {"guest": self.guest, "state": self.state, "to": self.to, "reason": self.reason,
                             "code": self.code,
                             "job": None, "round": None, "percent": None, "downtime_ms": None,
                             "transferred": None, "total_time_ms": None}
        job = self.job
        if job is not None:
            d["job"] = job.id
            st = job.stats()
            if st is not None:
                d["round"] = st.get("round")
                d["percent"] = in_sync_percent(st)
                d["downtime_ms"] = st.get("downtime_ms")
                d["transferred"] = st.get("transferred")
                d["total_time_ms"] = st.get("total_time_ms")
        return d


def parse_targets(raw: object) -> list[tuple[str, int]]:
    """["host:port", ...] (or one comma-separated string) -> [(host, port)]; ConfigError("to") otherwise."""
    if isinstance(raw, str):
        raw = [t for t in raw.split(",") if t.strip()]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("to", "expected one or more HOST:PORT destinations")
    if len(raw) > MAX_TARGETS:
        raise ConfigError("to", f"at most {MAX_TARGETS} destinations")
    out = []
    for item in raw:
        host, port = split_host_port(item, key="to")
        if port == 0:
            raise ConfigError("to", "port 0 is not a destination")
        out.append((host, port))
    return out


def _code(exc: BaseException) -> str | None:
    """The typed code of a refusal or failure: an AbortCode's name, a GuestUnavailable's code, else None."""
    if isinstance(exc, MigrationError):
        return exc.code.name
    if isinstance(exc, GuestUnavailable):
        return exc.code
    return None


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Evacuation:
    """One evacuation of this host (see the module docstring)."""

    def __init__(self, manager: MigrationManager, targets: list[tuple[str, int]], *, max_parallel: int = 1,
                 policy: str | None = None):
        if max_parallel < 1:
            raise ConfigError("max_parallel", f"must be >= 1, got {max_parallel}")
        self.manager = manager
        self.daemon = manager.daemon
        self.targets = targets
        self.max_parallel = max_parallel
        self.policy = policy
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.rows: list[Row] = []
        self.changed = trio.Event()
        self.done = trio.Event()
        if policy is not None:
            self.daemon.config.policy(policy)  # unknown name: ConfigError now, before anything moves
        self._plan()

    def _plan(self) -> None:
        i = 0
        for name in sorted(self.daemon.guests):
            hosted = self.daemon.guests[name]
            if hosted.state in ("migrated", "stopped", "incoming"):
                continue  # not a guest that runs here (gone, or still arriving)
            # A crashed guest, or a VMM this daemon does not drive (incompatible, orphaned), is listed as
            # left with its typed code: the operator has a guest on this host to deal with.
            err = self.manager.refusal(name)
            if err is not None:
                self.rows.append(Row(name, "left", reason=str(err), code=_code(err)))
                continue
            host, port = self.targets[i % len(self.targets)]
            i += 1
            self.rows.append(Row(name, "planned", to=_fmt(host, port)))

    @property
    def effective_parallel(self) -> int:
        return max(1, min(self.max_parallel, self.daemon.config.max_outgoing or 1))

    def snapshot(self) -> dict:
        rows = [r.as_dict() for r in self.rows]
        for r, row in zip(rows, self.rows):
            if row.state == "queued" and row.job is not None and row.job.state == "running":
                r["state"] = "migrating"
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        # left on this host: refused or failed (planned rows of a dry run are not), and once it is over
        # anything that did not arrive
        left = sum(1 for r in rows if (r["state"] != "done" if self.done.is_set() else r["state"] in ("left", "failed")))
        return {"targets": [_fmt(h, p) for h, p in self.targets], "max_parallel": self.max_parallel,
                "effective_parallel": self.effective_parallel, "policy": self.policy,
                "started_at": round(self.started_at, 3), "done": self.done.is_set(),
                "finished_at": None if self.finished_at is None else round(self.finished_at, 3),
                "counts": counts, "left": left, "guests": rows}

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def run(self) -> dict:
        """Move the planned guests; returns the final snapshot. Never raises for one guest's failure."""
        limiter = trio.CapacityLimiter(self.max_parallel)
        log = self.daemon.log.bind(evacuation=True)
        log.info("evacuation_started", targets=[_fmt(h, p) for h, p in self.targets],
                 max_parallel=self.max_parallel, policy=self.policy,
                 planned=sum(r.state == "planned" for r in self.rows),
                 left=[r.guest for r in self.rows if r.state == "left"])
        try:
            async with trio.open_nursery() as nursery:
                for row in self.rows:
                    if row.state == "planned":
                        row.state = "queued"
                        nursery.start_soon(self._move, row, limiter)
                nursery.start_soon(self._ticker, nursery.cancel_scope)
                # the ticker ends with the last move (see _ticker)
        finally:
            self.finished_at = time.time()
            self.done.set()
            self._notify()
        snap = self.snapshot()
        log.info("evacuation_finished", counts=snap["counts"], left=snap["left"])
        return snap

    async def _ticker(self, scope: trio.CancelScope) -> None:
        while any(r.state in ("queued", "migrating") for r in self.rows):
            await trio.sleep(SNAPSHOT_INTERVAL_S)
            self._notify()

    async def _move(self, row: Row, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            host, port = split_host_port(row.to, key="to")
            try:
                row.job = self.manager.submit(row.guest, host, port, policy=self.policy)
                self._notify()
                await self.manager.run_job(row.job)
                row.state = "done"
            except (SevmigdError, ConfigError) as exc:
                row.state = "failed"
                row.code = _code(exc)
                row.reason = f"{exc.code.name}: {exc}" if isinstance(exc, MigrationError) else str(exc)
            except Exception as exc:  # one guest's failure is reported, never the end of the evacuation
                row.state = "failed"
                row.reason = f"internal error: {type(exc).__name__}: {exc}"
                self.daemon.log.error("evacuation_move_failed", guest=row.guest, exc_info=True)
            self._notify()


__all__ = ["Evacuation", "parse_targets"]
