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

import pathlib

import trio

from sevmigd.daemon import tls
from sevmigd.daemon.destination import IncomingMigration
from sevmigd.daemon.source import OutgoingMigration
from sevmigd.errors import ConfigError
from sevmigd.migrate.errors import MigrationError
from sevmigd.migrate.stats import MigrationStats
from sevmigd.psp.policy import Policy
from sevmigd import wire
from sevmigd.wire import limits as wire_limits
from sevmigd.wire.errors import AbortCode

__all__ = ["MigrationManager", "MigrationError"]

# Protocol version this daemon speaks (PROTOCOL.md §6).
PROTOCOL_VERSION = wire.PROTOCOL_VERSION
# Finished migrations kept for `status` / `migrations` queries.
HISTORY = 32


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

    @property
    def protocol_version(self) -> int:
        return PROTOCOL_VERSION

    # -- operator verbs -------------------------------------------------------------------------------------

    async def migrate_out(self, name: str, host: str, port: int, *, downtime_limit_ms=None,
                          max_bandwidth_mib_s=None, progress=None, stream_factory=None) -> dict:
        """Live-migrate guest `name` to the daemon at host:port; returns the final statistics.

        Raises MigrationError (with `.code`) on every failure; before "go" the guest keeps running here.
        `stream_factory` (tests) replaces the TCP connect with `await stream_factory()`.
        """
        cfg = self.daemon.config
        hosted = self.daemon.guests.get(name)
        if hosted is None:
            raise ConfigError("name", f"no guest named {name!r}")
        if name in self.outgoing:
            raise MigrationError(AbortCode.RESOURCE_LIMIT,
                                 f"guest {name!r} is already being migrated (migration {self.outgoing[name].id})")
        if name in self.uncertain:
            raise MigrationError(AbortCode.POLICY_REFUSED,
                                 f"guest {name!r} has an uncertain hand-off: run `resolve` first")
        if downtime_limit_ms is not None and not downtime_limit_ms > 0:
            raise ConfigError("downtime_limit_ms", f"must be > 0, got {downtime_limit_ms}")
        if max_bandwidth_mib_s is not None and not max_bandwidth_mib_s >= 0:
            raise ConfigError("max_bandwidth_mib_s", f"must be >= 0, got {max_bandwidth_mib_s}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError("port", f"must be 1..65535, got {port!r}")
        if self.daemon.shutting_down:
            raise MigrationError(AbortCode.SHUTDOWN, "daemon is shutting down")
        if hosted.state != "running":
            raise MigrationError(AbortCode.POLICY_REFUSED, f"guest {name!r} is {hosted.state}, not running")
        vm = hosted.vm
        if not vm.host.migration_control & 1:
            raise MigrationError(
                AbortCode.POLICY_REFUSED,
                f"guest {name!r} has not opted in to live migration (MSR_KVM_MIGRATION_CONTROL bit 0 is clear): "
                f"its kernel does not report page-encryption changes, so private and shared pages cannot be told apart")
        if vm.policy & Policy.NOSEND:
            raise MigrationError(AbortCode.POLICY_REFUSED,
                                 f"guest {name!r} policy 0x{vm.policy:x} has NOSEND: the guest owner forbids migration")
        if len(self.outgoing) >= cfg.max_outgoing:
            raise MigrationError(AbortCode.RESOURCE_LIMIT,
                                 f"{len(self.outgoing)} migrations already outgoing (max_outgoing = {cfg.max_outgoing})")
        mig = OutgoingMigration(self, hosted, host, port, downtime_limit_ms=downtime_limit_ms,
                                max_bandwidth_mib_s=max_bandwidth_mib_s, progress=progress,
                                stream_factory=stream_factory)
        hosted.migration = mig.stats
        self.outgoing[name] = mig
        self._task_started()
        try:
            return await mig.run()
        finally:
            self.outgoing.pop(name, None)
            self.record_finished(mig.stats)
            self._task_finished()

    def cancel(self, name: str) -> None:
        """Cancel the migration of guest `name` (either side) before "go": the guest keeps running on the source."""
        mig = self.outgoing.get(name) or self.incoming.get(name)
        if mig is None:
            raise ConfigError("name", f"no migration of guest {name!r} is running")
        if not mig.cancel(MigrationError(AbortCode.CANCELLED, "cancelled by the operator")):
            raise ConfigError("name", f"too late to cancel guest {name!r}: the hand-off (go) is under way")

    def resolve(self, name: str, *, run_here: bool) -> dict:
        """Settle an uncertain hand-off (source side; see the module docstring). Returns the stats."""
        mig = self.uncertain.get(name)
        if mig is None:
            raise ConfigError("name", f"guest {name!r} has no uncertain migration to resolve")
        if run_here:
            mig._rollback(MigrationError(AbortCode.CANCELLED, "resolved: run on the source"))
            mig.stats.status = "failed"
            resolution = "resumed on the source"
        else:
            mig._release()
            mig.stats.status = "completed"
            resolution = "released on the source (runs on the destination)"
        del self.uncertain[name]
        self.daemon.log.warning("migration_resolved", guest=name, migration_id=mig.stats.migration_id,
                                resolution=resolution)
        d = mig.stats.to_dict()
        d["resolution"] = resolution
        return d

    def active(self) -> int:
        """Migrations in progress, both directions."""
        return len(self.outgoing) + len(self.incoming)

    async def shutdown(self) -> None:
        """Cancel outgoing migrations before "go" (guests keep running here) and abort incoming ones; wait."""
        err = MigrationError(AbortCode.SHUTDOWN, "daemon shutting down")
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

    def allowed_oca(self) -> list[bytes] | None:
        """The OCA certificates of `allowed_oca` (paths), read once per change of the list."""
        paths = self.daemon.config.allowed_oca
        if paths is None:
            return None
        key = tuple(paths)
        if self._oca_cache is None or self._oca_cache[0] != key:
            out = []
            for p in paths:
                try:
                    out.append(pathlib.Path(p).read_bytes())
                except OSError as exc:
                    raise MigrationError(AbortCode.INTERNAL_ERROR,
                                         f"allowed_oca: cannot read {p}: {exc.strerror or exc}") from None
            self._oca_cache = (key, out)
        return self._oca_cache[1]

    async def wrap_client_tls(self, stream, host: str):
        cfg = self.daemon.config
        if not cfg.tls.enabled:
            return stream
        try:
            ctx = tls.client_context(cfg)
            return await tls.wrap_client(stream, ctx, host, timeout=cfg.handshake_timeout_s)
        except tls.TlsError as exc:
            raise MigrationError(AbortCode.UNTRUSTED_PLATFORM, f"TLS with the destination failed: {exc}") from None

    async def _wrap_server_tls(self, stream, peer: str):
        cfg = self.daemon.config
        if not cfg.tls.enabled:
            return stream
        try:
            ctx = tls.server_context(cfg)
            return await tls.wrap_server(stream, ctx, timeout=cfg.handshake_timeout_s, peer=peer)
        except tls.TlsError as exc:
            raise MigrationError(AbortCode.UNTRUSTED_PLATFORM, f"TLS with {peer} failed: {exc}") from None

    def new_incoming_vm(self, *, name: str, memory_bytes: int, policy: int, handle: int, asid: int, vcpus: int):
        from sevmigd.guest.vm import SevVm

        return SevVm.incoming(self.daemon.fw, name=name, memory_bytes=memory_bytes, policy=policy,
                              handle=handle, asid=asid, vcpus=vcpus)

    def add_incoming_guest(self, name: str, vm):
        """Register the incoming guest (state `incoming`), replacing a same-named guest that left earlier."""
        old = self.daemon.guests.get(name)
        if old is not None:
            if old.state not in self.REPLACEABLE_STATES:
                raise MigrationError(AbortCode.GUEST_EXISTS, f"a guest named {name!r} appeared meanwhile")
            self.daemon.remove_guest(name)
        return self.daemon.add_guest(name, vm, "incoming")

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

    def _task_started(self) -> None:
        self._running += 1
        if self._tasks_done.is_set():
            self._tasks_done = trio.Event()

    def _task_finished(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._tasks_done.set()
