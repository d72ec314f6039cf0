"""The daemon's migration manager: which guests are being sent or received, and the operator verbs on them.

Owns `MigrationManager(daemon)`: `migrate_out` (refuses at once, with the guest still running, when the
guest has not opted in via MSR_KVM_MIGRATION_CONTROL, its policy has NOSEND, a migration of it is already
running, or a limit is reached; otherwise runs an `OutgoingMigration`), `handle_incoming` (the listener
calls it per accepted connection), `cancel` (any time before "go"), `resolve` (the post-"go" uncertain
state), `active`, `shutdown`, and the small services both drivers share: TLS wrapping, allowed OCAs. Firmware
commands go through the daemon's PSP runner (`daemon.psp`, sevmigd/daemon/psprunner.py).

Uncertain hand-off, documented for operators: when the source has sent "go" but never hears "started",
it cannot know alone whether the destination started the guest. It then keeps the guest paused
(HostedGuest.state `migrating`, stats status `uncertain`) and never resumes it on its own. The
destination is never uncertain: it starts the guest only on "go" (after which the source will not
resume by itself) and discards its copy on any failure before "go". So one command on the source settles
it: look at the destination; if the guest runs there, `resolve(name, run_here=False)` releases the
source copy (SEND_FINISH, DECOMMISSION); if not, `resolve(name, run_here=True)` resumes it on the source
(SEND_CANCEL: it can be migrated again).

It must never: leave a guest running twice or nowhere by its own decision, or hold a page or key.
"""

from __future__ import annotations

import collections
import pathlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from sevmigd.daemon import tls
from sevmigd.daemon.config import MigrationPolicy
from sevmigd.daemon.destination import IncomingMigration
from sevmigd.daemon.errors import GuestUnavailable
from sevmigd.daemon.replay import FILE_NAME as REPLAY_FILE
from sevmigd.daemon.replay import ReplayRecord, ReplayRecordError
from sevmigd.daemon.settle import Settlement
from sevmigd.daemon.source import OutgoingMigration, new_migration_id
from sevmigd.errors import ConfigError
from sevmigd.migrate.errors import MigrationError
from sevmigd.migrate.ratelimit import SharedLimit, TokenBucket
from sevmigd.migrate.stats import MigrationStats
from sevmigd.psp.policy import Policy
from sevmigd import wire
from sevmigd.wire import limits as wire_limits
from sevmigd.wire.errors import AbortCode

if TYPE_CHECKING:
    from sevmigd.daemon.evacuate import Evacuation

__all__ = ["MigrationManager", "MigrationError", "Job"]

# Protocol version this daemon speaks (PROTOCOL.md §6).
PROTOCOL_VERSION = wire.PROTOCOL_VERSION
# Finished migrations kept for `status` / `migrations` queries.
HISTORY = 32


JOB_STATES = ("queued", "running", "completed", "failed", "cancelled", "uncertain")


def in_sync_percent(stats: dict | None) -> float | None:
    """How much of the guest's memory is in sync on the destination, as `ctl jobs` and the evacuation
    table show it: round 1's bulk pass, then what is not dirty again; 100 once completed."""
    if not stats or not stats.get("total"):
        return None
    if stats.get("status") == "completed":
        return 100.0
    total, rem = stats["total"], stats.get("remaining") or 0
    return round(100.0 * max(total - rem, 0) / total, 1)


@dataclass
class Job:
    """One requested outgoing migration, from the request to its end (`ctl jobs`, `migrate --detach`).

    The job id is the migration id (the same id is in the logs, the stats, and the Prometheus label
    `migration`). A job waits in the manager's FIFO queue while `max_outgoing` migrations run; its
    OutgoingMigration (and so its clock: completion timeouts count from there) exists once it runs.
    """

    id: str
    guest: str
    host: str
    port: int
    policy: MigrationPolicy | None = None
    downtime_limit_ms: int | None = None
    max_bandwidth_mib_s: float | None = None
    state: str = "queued"
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    mig: OutgoingMigration | None = None
    final: dict | None = None
    error: str | None = None
    error_code: str | None = None
    cancel_error: MigrationError | None = None
    had_slot: bool = False
    granted: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def to(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stats(self) -> dict | None:
        if self.final is not None:
            return self.final
        return self.mig.stats.to_dict() if self.mig is not None else None

    def as_dict(self, *, queue_position: int | None = None) -> dict:
        st = self.stats()
        if st is not None:
            st = {k: v for k, v in st.items() if k != "rounds"}
        return {"job": self.id, "guest": self.guest, "to": self.to, "state": self.state,
                "in_sync_percent": in_sync_percent(st),
                "policy": self.policy.name if self.policy is not None else None, "queue_position": queue_position,
                "submitted_at": round(self.submitted_at, 3),
                "started_at": None if self.started_at is None else round(self.started_at, 3),
                "finished_at": None if self.finished_at is None else round(self.finished_at, 3),
                "error": self.error, "error_code": self.error_code, "stats": st}


class MigrationManager:
    """All migrations of one daemon (see the module docstring)."""

    # States of a same-named guest that an incoming one may replace: a guest that left (A -> B -> A).
    REPLACEABLE_STATES = ("migrated",)

    def __init__(self, daemon):
        self.daemon = daemon
        self.outgoing: dict[str, OutgoingMigration] = {}
        self.incoming: dict[str, IncomingMigration] = {}
        self.uncertain: dict[str, OutgoingMigration] = {}
        self.history: list[dict] = []
        self._tasks_done = trio.Event()
        self._tasks_done.set()
        self._running = 0
        self._oca_cache: tuple[tuple, list[bytes]] | None = None
        # Outgoing concurrency (issue 12): jobs by id (queued, running, the last HISTORY finished), the
        # FIFO of jobs waiting for one of max_outgoing slots, the most that ever ran at once, and the
        # host-wide bandwidth bucket every outgoing migration shares (outgoing_bandwidth_mib_s).
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.pending_jobs: dict[str, Job] = {}   # guest -> its queued or running job
        self.high_water = 0
        self._slots_used = 0
        # one bucket for the host, even across reloads (running migrations keep sharing it)
        self._shared_bucket = TokenBucket(daemon.config.outgoing_bandwidth_mib_s * (1 << 20))
        self.evacuation: Evacuation | None = None   # the running or last evacuation (ctl evacuate)
        # Durable in-flight records and the settlement query (issue 17, daemon/settle.py).
        self.settle = Settlement(self)

    @property
    def protocol_version(self) -> int:
        return PROTOCOL_VERSION

    # -- operator verbs -------------------------------------------------------------------------------------

    async def migrate_out(self, name: str, host: str, port: int, *, downtime_limit_ms=None,
                          max_bandwidth_mib_s=None, progress=None, stream_factory=None, policy=None) -> dict:
        """Live-migrate guest `name` to the daemon at host:port; returns the final statistics.

        Raises MigrationError (with `.code`) on every failure; before "go" the guest keeps running here.
        Waits in the outgoing queue first when max_outgoing migrations are running. `policy` names a
        `[policies.NAME]` (None: default_policy). `stream_factory` (tests) replaces the TCP connect.
        """
        job = self.submit(name, host, port, downtime_limit_ms=downtime_limit_ms,
                          max_bandwidth_mib_s=max_bandwidth_mib_s, policy=policy)
        return await self.run_job(job, progress=progress, stream_factory=stream_factory)

    def refusal(self, name: str) -> MigrationError | GuestUnavailable | None:
        """Why guest `name` cannot be sent now (the guest keeps running), or None when it can."""
        hosted = self.daemon.guests.get(name)
        if hosted is None:
            raise ConfigError("name", f"no guest named {name!r}")
        if name in self.pending_jobs:
            job = self.pending_jobs[name]
            return MigrationError(AbortCode.RESOURCE_LIMIT,
                                  f"guest {name!r} is already being migrated (migration {job.id}, {job.state})")
        if name in self.outgoing:
            return MigrationError(AbortCode.RESOURCE_LIMIT,
                                  f"guest {name!r} is already being migrated (migration {self.outgoing[name].id})")
        if name in self.uncertain:
            return MigrationError(AbortCode.POLICY_REFUSED,
                                  f"guest {name!r} has an uncertain hand-off: run `resolve` first")
        if self.daemon.shutting_down:
            return MigrationError(AbortCode.SHUTDOWN, "daemon is shutting down")
        if hosted.state in GuestUnavailable.CODES:   # crashed, or a VMM this daemon does not drive
            return GuestUnavailable(name, hosted.state, hosted.error)
        if hosted.state != "running":
            return MigrationError(AbortCode.POLICY_REFUSED, f"guest {name!r} is {hosted.state}, not running")
        vm = hosted.vm
        if not vm.host.migration_control & 1:
            return MigrationError(
                AbortCode.POLICY_REFUSED,
                f"guest {name!r} has not opted in to live migration (MSR_KVM_MIGRATION_CONTROL bit 0 is clear): "
                f"its kernel does not report page-encryption changes, so private and shared pages cannot be told apart")
        if vm.policy & Policy.NOSEND:
            return MigrationError(AbortCode.POLICY_REFUSED,
                                  f"guest {name!r} policy 0x{vm.policy:x} has NOSEND: the guest owner forbids migration")
        return None

    def submit(self, name: str, host: str, port: int, *, downtime_limit_ms=None, max_bandwidth_mib_s=None,
               policy=None) -> Job:
        """Check that guest `name` can be sent and create its job: it runs at once when fewer than
        max_outgoing migrations run, else it waits (state queued). Raises ConfigError / MigrationError."""
        cfg = self.daemon.config
        if downtime_limit_ms is not None and not downtime_limit_ms > 0:
            raise ConfigError("downtime_limit_ms", f"must be > 0, got {downtime_limit_ms}")
        if max_bandwidth_mib_s is not None and not max_bandwidth_mib_s >= 0:
            raise ConfigError("max_bandwidth_mib_s", f"must be >= 0, got {max_bandwidth_mib_s}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError("port", f"must be 1..65535, got {port!r}")
        pol = cfg.policy(policy)
        err = self.refusal(name)
        if err is not None:
            raise err
        if cfg.max_outgoing == 0:
            raise MigrationError(AbortCode.RESOURCE_LIMIT, "max_outgoing = 0: this host sends no migrations")
        max_queued = cfg.max_queued_outgoing
        if self._slots_used >= cfg.max_outgoing and len(self.queue) >= max_queued:
            raise MigrationError(AbortCode.RESOURCE_LIMIT,
                                 f"{self._slots_used} migrations outgoing (max_outgoing = {cfg.max_outgoing}) and "
                                 f"{len(self.queue)} queued (max_queued_outgoing = {max_queued})")
        if pol is not None:  # request flag > policy > daemon key
            if downtime_limit_ms is None:
                downtime_limit_ms = pol.downtime_limit_ms
            if max_bandwidth_mib_s is None:
                max_bandwidth_mib_s = pol.bandwidth_mib_s
        job = Job(new_migration_id(), name, host, port, policy=pol, downtime_limit_ms=downtime_limit_ms,
                  max_bandwidth_mib_s=max_bandwidth_mib_s)
        self.jobs[job.id] = job
        self.pending_jobs[name] = job
        self.queue.append(job)
        self._dispatch()
        if job.state == "queued":
            self.daemon.log.info("migration_queued", guest=name, migration_id=job.id, position=len(self.queue),
                                 running=self._slots_used, max_outgoing=cfg.max_outgoing)
        return job

    def _dispatch(self) -> None:
        """Hand free slots to queued jobs, first come first served."""
        limit = self.daemon.config.max_outgoing
        while self.queue and self._slots_used < limit:
            job = self.queue.popleft()
            self._slots_used += 1
            job.had_slot = True
            job.state = "running"
            job.granted.set()

    def queue_position(self, job: Job) -> int | None:
        try:
            return self.queue.index(job) + 1
        except ValueError:
            return None

    async def run_job(self, job: Job, *, progress=None, stream_factory=None) -> dict:
        """Wait for the job's slot, run its migration, record the end. Returns the final stats."""
        self._task_started()
        try:
            await job.granted.wait()
            if job.cancel_error is not None:
                raise job.cancel_error
            hosted = self.daemon.guests.get(job.guest)
            err = None
            if hosted is None:
                err = MigrationError(AbortCode.POLICY_REFUSED, f"guest {job.guest!r} is gone")
            elif hosted.state != "running":
                err = MigrationError(AbortCode.POLICY_REFUSED, f"guest {job.guest!r} is {hosted.state}, not running")
            if err is not None:
                raise err
            mig = OutgoingMigration(self, hosted, job.host, job.port, downtime_limit_ms=job.downtime_limit_ms,
                                    max_bandwidth_mib_s=job.max_bandwidth_mib_s, progress=progress,
                                    stream_factory=stream_factory, policy=job.policy, migration_id=job.id)
            job.mig = mig
            job.started_at = time.time()
            hosted.migration = mig.stats
            self.outgoing[job.guest] = mig
            self.high_water = max(self.high_water, len(self.outgoing))
            try:
                return await mig.run()
            finally:
                self.outgoing.pop(job.guest, None)
                self.record_finished(mig.stats)
        except MigrationError as exc:
            if job.mig is None:  # never ran: the queue wait ended in a cancel or the guest went away
                job.state = "cancelled" if exc.code in (AbortCode.CANCELLED, AbortCode.SHUTDOWN) else "failed"
                job.error, job.error_code = str(exc), exc.code.name
            raise
        finally:
            self._finish_job(job)
            self._task_finished()

    def _finish_job(self, job: Job) -> None:
        if job in self.queue:
            self.queue.remove(job)
        if job.had_slot:
            job.had_slot = False
            self._slots_used -= 1
        if self.pending_jobs.get(job.guest) is job:
            del self.pending_jobs[job.guest]
        job.finished_at = time.time()
        if job.mig is not None:
            job.final = job.mig.stats.to_dict()
            job.state = job.final.get("status") if job.final.get("status") in JOB_STATES else "failed"
            job.error, job.error_code = job.final.get("error"), job.final.get("error_code")
        elif job.state in ("queued", "running"):
            job.state = "failed"
        job.done.set()
        finished = [j for j in self.jobs.values() if j.done.is_set()]
        for old in finished[:-HISTORY]:
            del self.jobs[old.id]
        self._dispatch()

    def list_jobs(self) -> list[dict]:
        """Running, queued and recent jobs, oldest first (`ctl jobs`)."""
        return [j.as_dict(queue_position=self.queue_position(j)) for j in list(self.jobs.values())]

    def rate_limiter(self, own: TokenBucket) -> SharedLimit:
        """A migration's own bucket joined with the host-wide one (outgoing_bandwidth_mib_s) so that
        concurrent migrations share it fairly (see migrate/ratelimit.py)."""
        self._shared_bucket.set_rate(self.daemon.config.outgoing_bandwidth_mib_s * (1 << 20), trio.current_time())
        return SharedLimit(own, self._shared_bucket)

    def cancel(self, name: str) -> None:
        """Cancel the migration of guest `name` (either side) before "go": the guest keeps running on the source.
        A queued one leaves the queue."""
        job = self.pending_jobs.get(name)
        if job is not None and job in self.queue:
            self.queue.remove(job)
            job.state = "cancelled"
            job.cancel_error = MigrationError(AbortCode.CANCELLED, "cancelled by the operator while queued")
            job.granted.set()
            return
        mig = self.outgoing.get(name) or self.incoming.get(name)
        if mig is None:
            raise ConfigError("name", f"no migration of guest {name!r} is running")
        if not mig.cancel(MigrationError(AbortCode.CANCELLED, "cancelled by the operator")):
            raise ConfigError("name", f"too late to cancel guest {name!r}: the hand-off (go) is under way")

    def resolve(self, name: str, *, run_here: bool) -> dict:
        """Settle an uncertain hand-off by the operator's word (source side; see the module docstring):
        for a destination that cannot be asked (the settlement query settles the others by itself).
        Returns the stats."""
        if name not in self.uncertain:
            raise ConfigError("name", f"guest {name!r} has no uncertain migration to resolve")
        return self.settle_uncertain(name, run_here=run_here, by="operator")

    def settle_uncertain(self, name: str, *, run_here: bool, by: str) -> dict:
        """Settle the uncertain hand-off of guest `name`: resume it here (`run_here`: SEND_CANCEL) or
        release it (SEND_FINISH, DECOMMISSION). `by`: "operator" (`ctl resolve`) or "query" (the
        destination's answer, daemon/settle.py). The state, the stats, the job and the record say how."""
        mig = self.uncertain.pop(name)
        if run_here:
            mig._rollback(MigrationError(AbortCode.CANCELLED, "resolved: run on the source"))
            mig.stats.status = "failed"
            resolution, settlement = "resumed on the source", "resumed"
        else:
            mig._release()
            mig.stats.status = "completed"
            resolution, settlement = "released on the source (runs on the destination)", "released"
        mig.stats.settlement, mig.stats.settled_by = settlement, by
        self.settle.counts[by] = self.settle.counts.get(by, 0) + 1
        self.daemon.metrics.hand_off_settled(by, settlement)
        self.settle.outgoing_settled_soon(mig, settlement, by)
        self.daemon.log.warning("migration_resolved", guest=name, migration_id=mig.stats.migration_id,
                                resolution=resolution, settled_by=by)
        d = mig.stats.to_dict()
        job = self.jobs.get(mig.id)
        if job is not None and job.final is not None:
            job.final = dict(d)
            job.state = d["status"] if d["status"] in JOB_STATES else "failed"
        for i, h in enumerate(self.history):
            if h.get("migration_id") == mig.id and h.get("role") == "source":
                self.history[i] = dict(d)
        d["resolution"] = resolution
        return d

    def settle_restored_guest(self, name: str, *, run_here: bool) -> None:
        """A guest that outlived its daemon (its VMM, re-adopted) in the middle of an outgoing migration
        of the previous daemon process, settled by daemon/settle.py after a restart: `run_here` (before go,
        or the destination answered not_started) -> SEND_CANCEL (SUPDATE -> RUNNING), dirty log and
        throttle off, resume; else (answered started) -> SEND_FINISH, DECOMMISSION, state migrated."""
        hosted = self.daemon.guests.get(name)
        if hosted is None:
            return
        vm = hosted.vm
        host = vm.host
        log = self.daemon.log.bind(guest=name)
        if run_here:
            steps = (("SEND_CANCEL", host.sev.send_cancel), ("throttle off", lambda: host.set_throttle(0)),
                     ("dirty log off", host.disable_dirty_log), ("resume", host.resume))
        else:
            steps = (("stop vCPUs", hosted.stop_vcpus), ("SEND_FINISH", host.sev.send_finish),
                     ("release", vm.release))
        for what, fn in steps:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a step the context's state already made moot
                log.warning("restored_guest_step_failed", step=what, error=f"{type(exc).__name__}: {exc}")
        hosted.state = "running" if run_here else "migrated"

    def active(self) -> int:
        """Migrations in progress, both directions."""
        return len(self.outgoing) + len(self.incoming)

    async def shutdown(self) -> None:
        """Cancel outgoing migrations before "go" (guests keep running here) and abort incoming ones; wait."""
        err = MigrationError(AbortCode.SHUTDOWN, "daemon shutting down")
        while self.queue:
            job = self.queue.popleft()
            job.state = "cancelled"
            job.cancel_error = err
            job.granted.set()
        for mig in list(self.outgoing.values()) + list(self.incoming.values()):
            mig.cancel(err)
        await self._tasks_done.wait()

    # -- the listener's entry point -------------------------------------------------------------------------

    async def handle_incoming(self, stream: trio.abc.Stream, peer: str) -> None:
        """Serve one incoming migration connection to its end (never raises for a failed migration)."""
        self._task_started()
        try:
            try:
                stream = await self._wrap_server_tls(stream, peer)
            except MigrationError as err:
                self.daemon.log.warning("incoming_tls_failed", peer=peer, error=str(err))
                return
            await IncomingMigration(self, stream, peer).run()
        finally:
            self._task_finished()

    # -- services for the drivers ---------------------------------------------------------------------------

    def wire_limits(self):
        """The codec's hard size limits. The configured max_guest_bytes is applied by the destination
        driver itself, so the source gets a Refuse naming the setting rather than a protocol abort."""
        return wire_limits.Limits()

    async def allowed_oca(self) -> list[bytes] | None:
        """The OCA certificates of `allowed_oca` (paths), read (in a worker thread) once per change of the list."""
        paths = self.daemon.config.allowed_oca
        if paths is None:
            return None
        key = tuple(paths)
        if self._oca_cache is None or self._oca_cache[0] != key:
            self._oca_cache = (key, await trio.to_thread.run_sync(_read_ocas, key))
        return self._oca_cache[1]

    @property
    def replay(self):
        """The daemon's replay record (opened at start by serve(); on first use for daemons that do not
        serve, e.g. in-process tests)."""
        if self.daemon.replay is None:
            self.daemon.replay = ReplayRecord.open(pathlib.Path(self.daemon.config.state_dir) / REPLAY_FILE)
        return self.daemon.replay

    async def claim_session(self, session: bytes) -> None:
        """Refuse a session this destination has accepted before (REPLAYED_SESSION); otherwise record it
        durably. Must complete before RECEIVE_START (daemon/replay.py)."""
        record = self.replay
        digest = record.reserve(session)
        if digest is None:
            raise MigrationError(AbortCode.REPLAYED_SESSION,
                                 "this session was already received once: a replayed migration is refused")
        try:
            await trio.to_thread.run_sync(record.persist, digest)
        except ReplayRecordError as exc:
            raise MigrationError(AbortCode.INTERNAL_ERROR, f"cannot record the session: {exc}") from None

    def peer_platforms(self, stream) -> frozenset[str] | None:
        """Chip ids named by the peer's verified TLS certificate; None on a plaintext channel."""
        return tls.peer_platforms(stream)

    async def wrap_client_tls(self, stream, host: str):
        contexts = self.daemon.tls_contexts()
        if contexts is None:   # insecure_plaintext
            return stream
        try:
            return await tls.wrap_client(stream, contexts.client, host, timeout=self.daemon.config.handshake_timeout_s)
        except tls.TlsError as exc:
            raise MigrationError(AbortCode.UNTRUSTED_PLATFORM, f"TLS with the destination failed: {exc}") from None

    async def _wrap_server_tls(self, stream, peer: str):
        contexts = self.daemon.tls_contexts()
        if contexts is None:   # insecure_plaintext
            return stream
        try:
            return await tls.wrap_server(stream, contexts.server, timeout=self.daemon.config.handshake_timeout_s,
                                         peer=peer)
        except tls.TlsError as exc:
            raise MigrationError(AbortCode.UNTRUSTED_PLATFORM, f"TLS with {peer} failed: {exc}") from None

    def incoming_guest_problem(self, *, memory_bytes: int, policy: int, vcpus: int) -> str | None:
        """Why the guest layer could not host an incoming guest of that shape (SevVm.incoming would refuse
        it), or None: checked at Hello, before anything is reserved or allocated."""
        from sevmigd.guest.vm import check_incoming

        try:
            check_incoming(memory_bytes=memory_bytes, policy=policy, vcpus=vcpus)
        except ConfigError as exc:
            return str(exc)
        return None

    async def new_incoming_vm(self, *, name: str, memory_bytes: int, policy: int, handle: int | None, asid: int,
                              vcpus: int):
        """The destination's guest, vCPUs paused: in a new VMM process (vmm = "process"; `handle` must be
        None: RECEIVE_START goes through vm.host.sev) or in this daemon."""
        from sevmigd.guest.vm import SevVm

        if self.daemon.vmm_mode == "process" and handle is None:
            from sevmigd.daemon import vmmhost

            return await vmmhost.incoming_vm(self.daemon, name=name, memory_bytes=memory_bytes, policy=policy,
                                             asid=asid, vcpus=vcpus)
        return SevVm.incoming(self.daemon.fw, name=name, memory_bytes=memory_bytes, policy=policy,
                              handle=handle, asid=asid, vcpus=vcpus)

    def add_incoming_guest(self, name: str, vm):
        """Register the incoming guest (state `incoming`), replacing a same-named guest that left earlier."""
        old = self.daemon.guests.get(name)
        if old is not None:
            if old.state not in self.REPLACEABLE_STATES:
                raise MigrationError(AbortCode.GUEST_EXISTS, f"a guest named {name!r} appeared meanwhile")
            self.daemon.remove_guest(name)
        hosted = self.daemon.add_guest(name, vm, "incoming")
        self.daemon.watch_vmm(hosted)
        return hosted

    def start_guest(self, hosted) -> None:
        """The incoming guest starts: running state, vCPU task in the daemon's guest nursery."""
        self.daemon.start_guest(hosted)

    def drop_guest(self, name: str, hosted) -> None:
        if self.daemon.guests.get(name) is hosted:
            self.daemon.remove_guest(name)

    def mark_uncertain(self, name: str, mig) -> None:
        self.uncertain[name] = mig

    def record_finished(self, stats: MigrationStats) -> None:
        self.history.append(stats.to_dict())
        del self.history[:-HISTORY]
        self.daemon.metrics.migration_finished(self.history[-1])

    def config_changed(self) -> None:
        """After a reload: a raised max_outgoing starts queued jobs now."""
        self._dispatch()

    def _task_started(self) -> None:
        self._running += 1
        if self._tasks_done.is_set():
            self._tasks_done = trio.Event()

    def _task_finished(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._tasks_done.set()


def _read_ocas(paths: tuple[str, ...]) -> list[bytes]:
    from sevmigd import store
    out = []
    for p in paths:
        try:
            out.append(store.read_regular_file(p))  # non-blocking open: a FIFO is an error, not a stuck thread
        except store.StoreError as exc:
            raise MigrationError(AbortCode.INTERNAL_ERROR, f"allowed_oca: cannot read {exc}") from None
    return out
