"""Migration statistics, named as QEMU's `query-migrate` names them.

Owns the `MigrationStats` record that a migration updates live and the control socket, the logs and the
final report read. Pure: it holds numbers and strings, never a key, never page contents. Times are
handed in by the caller (the daemon's clock), so it can be tested without one.

Status values (QEMU MigrationStatus names): setup, active, device (stop-and-copy, guest paused),
completed, failed, cancelled; plus **uncertain** (source only): the source sent "go" and never heard
"started", so it cannot know on its own whether the guest runs on the destination; `resolve` settles it
(see daemon/migration.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STATUSES = ("setup", "active", "device", "completed", "failed", "cancelled", "uncertain")
FINAL_STATUSES = ("completed", "failed", "cancelled")


@dataclass
class MigrationStats:
    migration_id: str
    role: str                      # "source" | "destination"
    peer: str                      # "host:port" of the other daemon
    guest: str
    total: int = 0                 # guest RAM bytes
    status: str = "setup"
    round: int = 0                 # current pre-copy round (QEMU dirty-sync-count)
    transferred: int = 0           # bytes on the wire so far (this side sent / received), framing included
    remaining: int = 0             # dirty bytes still to send (QEMU "remaining")
    private_pages: int = 0         # pages sent / received through SEND/RECEIVE_UPDATE_DATA (resends count)
    shared_pages: int = 0          # pages sent / received in the clear (shared with the hypervisor)
    dirty_pages_rate: float = 0.0  # pages dirtied per second, last measurement
    throughput_mbps: float = 0.0   # megabits per second over the whole migration so far (QEMU "mbps")
    expected_downtime_ms: float | None = None
    downtime_ms: float | None = None
    total_time_ms: float = 0.0
    setup_time_ms: float | None = None
    throttle_pct: int = 0          # auto-converge vCPU throttle now in force
    error: str | None = None       # the first error (QEMU keeps the first)
    error_code: str | None = None  # its AbortCode name
    policy: str | None = None      # migration policy name (config [policies.NAME]), if any
    forced_completion: bool = False  # the completion timeout forced the stop-and-copy (force-complete)
    started_at: float = 0.0        # daemon clock at start (not exported)
    rounds: list[dict] = field(default_factory=list)  # one summary per finished round
    # The channel's handshake id (PROTOCOL.md §9.2): equal in both daemons' figures and logs iff they saw
    # the same handshake (no one in the middle). None until Accept.
    session_id: str | None = None
    # An uncertain hand-off once settled (issue 17): "released" | "resumed", and by whom: "query" (the
    # destination's answer to the settlement query), "operator" (`ctl resolve`) or "restart".
    settlement: str | None = None
    settled_by: str | None = None
    settle_attempts: int = 0       # settlement queries tried (source, after an uncertain hand-off)
    settlement_note: str | None = None  # why it could not settle by itself (e.g. the peer does not know it)

    def enter_round(self, wire_round: int) -> int:
        """The migration is in round `wire_round` as the wire numbers it (from 0, PROTOCOL.md); statistics
        and logs count rounds from 1 like QEMU's dirty-sync-count. The one place that converts; returns
        the round as users see it."""
        self.round = wire_round + 1
        return self.round

    def fail(self, code_name: str, message: str) -> bool:
        """Record an error; only the first one is kept. Returns True when this one was recorded."""
        if self.error is not None:
            return False
        self.error, self.error_code = message, code_name
        return True

    def tick(self, now: float) -> None:
        """Refresh the time-derived figures (total time, mean throughput) at `now`."""
        elapsed = max(now - self.started_at, 0.0)
        self.total_time_ms = round(elapsed * 1000, 3)
        if elapsed > 0:
            self.throughput_mbps = round(self.transferred * 8 / 1e6 / elapsed, 3)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("started_at")
        return d
