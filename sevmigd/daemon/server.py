"""The sevmigd daemon: one emulated PSP, the guests it hosts, the migration listener, the control socket.

Owns `Daemon` (the process-wide state every other daemon module works through) and `run(config)` (the
entry `sevmigd serve` calls: signals, reload, graceful shutdown). Split by job (issue 17): the guests
(`HostedGuest`, launch/stop/status) are daemon/guests.py, the platform and the PSP daemon/platform.py,
server-info and STATUS= daemon/status.py, VMM processes daemon/vmmhost.py; `Daemon` combines their mixins
and keeps serving: listeners, the control socket, shutdown, reload. The shape follows trio's servers: `await nursery.start(daemon.serve)` returns the
bound migration address once the listener *and* the control socket accept connections, which is also
when systemd hears READY=1.

Lifetimes: every task (vCPU loops, control connections, incoming migration connections, outgoing
migrations started from the control socket) runs in the daemon's nursery, so a migration outlives
the control client that asked for it and the whole tree is cancelled together at exit.

This module must never: touch a guest's memory key or page plaintext (guest I/O goes through the
guest's own agent; migration code gets `vm.host`), let one guest's or one connection's failure take
the daemon down (those tasks catch, log and end themselves), or remove a control socket that another
daemon is serving.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket as stdlib_socket
import stat
import time
from collections.abc import AsyncIterator, Callable

import structlog
import trio

from sevmigd import __version__
from sevmigd.daemon import control, pspstate, replay, systemd, vmmhost
from sevmigd.daemon.guests import GUEST_STATES, GuestsMixin, HostedGuest
from sevmigd.daemon.platform import PlatformMixin, TlsContexts, _read_trusted_roots
from sevmigd.daemon.status import StatusMixin
from sevmigd.daemon.config import Config, load_config, split_host_port
from sevmigd.daemon.errors import StartupError
from sevmigd.daemon.logging import configure_logging, exception_summary
from sevmigd.daemon.loopwatch import StepWatch
from sevmigd.daemon.migration import MigrationManager
from sevmigd.daemon.metrics import DaemonMetrics
from sevmigd.daemon.psprunner import PspRunner
from sevmigd.daemon.slots import PreHelloSlots, WatchedStream
from sevmigd.errors import ConfigError, SevmigdError
from sevmigd.guest.vcpu import VCPU_TICK_S
from sevmigd.guest.vm import SevVm
from sevmigd.kvm.asid import AsidSpace
from sevmigd.psp.certs import AmdCert
from sevmigd.psp.firmware import Firmware
from sevmigd.psp.identity import PlatformIdentity
from sevmigd.psp.status import SevError

# Bounded graceful shutdown: migrations get this long to abort or finish cleanly after SIGTERM, well
# inside systemd's TimeoutStopSec (60 s in our unit) so the final cleanup still runs.
SHUTDOWN_MIGRATIONS_S = 20.0
# After migrations have settled at shutdown, control requests get this long to send their replies.
CONTROL_DRAIN_S = 2.0
# At most max_unauthenticated migration connections wait for their Hello to be accepted; a new one
# beyond that evicts the stalest waiting one (sevmigd.daemon.slots), so a flood of idle connections can
# neither pin memory and descriptors nor refuse a real source.

_log = structlog.get_logger("sevmigd")


# --------------------------------------------------------------------------------- the daemon


class Daemon(GuestsMixin, PlatformMixin, StatusMixin):
    """Process-wide daemon state: the configuration, the platform (identity, firmware and the PSP runner
    every firmware command goes through), the hosted guests, the migration manager, the listeners.

    Construct with a validated Config; `identity`, `fw` and `trusted_roots` may be injected (tests);
    otherwise `serve()` loads them from the state dir (creating a fresh platform on first start).
    """

    def __init__(self, config: Config, *, identity: PlatformIdentity | None = None, fw: Firmware | None = None,
                 trusted_roots: list[AmdCert] | None = None, rng: Callable[[int], bytes] = os.urandom,
                 config_source: tuple[str | None, dict] | None = None,
                 vm_launcher: Callable[..., SevVm] | None = None):
        self.config = config
        self.identity = identity
        self.fw = fw
        self._psp = PspRunner(fw) if fw is not None else None
        self.trusted_roots: list[AmdCert] = list(trusted_roots) if trusted_roots is not None else []
        self._roots_injected = trusted_roots is not None
        self.rng = rng
        self.guests: dict[str, HostedGuest] = {}
        self.log = structlog.get_logger("sevmigd")
        self.migrations = MigrationManager(self)
        self.shutting_down = False
        self.nursery: trio.Nursery | None = None
        self.listen_address: str | None = None
        self.listen_addresses: list[tuple[str, int]] = []
        self.control_path: str = config.control
        self.started_at: float | None = None
        self._config_source = config_source or (None, {})
        self._vm_launcher = vm_launcher
        self._asid_space: AsidSpace | None = None
        self._shutdown_requested = trio.Event()
        self._stopped = trio.Event()
        self._listener_scope = trio.CancelScope()
        self._serve_scope: trio.CancelScope | None = None
        self._incoming_connections = 0
        self._pre_hello = PreHelloSlots()
        self._inflight_requests = 0
        self._requests_idle = trio.Event()
        self._requests_idle.set()
        self.replay: replay.ReplayRecord | None = None  # opened by serve() (or on first use)
        self._control_inode: tuple[int, int] | None = None
        self.platform_created = False
        self.metrics = DaemonMetrics(self, GUEST_STATES)  # per-daemon registry (issue 12)
        self.step_watch: StepWatch | None = None
        # The PSP's persistent state in RUNTIME/psp (issue 17), when the daemon made its own Firmware.
        self.psp_store: pspstate.PspStore | None = None
        self.psp_restored: pspstate.RestoreReport | None = None
        self._tls: TlsContexts | None = None       # tls_contexts()   # installed by run() when slow_step_warn_ms is set

    # ------------------------------------------------------------------ pinned small helpers

    # ------------------------------------------------------------------ platform

    # ------------------------------------------------------------------ guests (used by control)

    # ------------------------------------------------------------------ serving
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load the platform, bind the listener and the control socket, then serve until
        `request_shutdown()`; `task_status.started(listen_address)` once both accept connections."""
        inherited = systemd.inherited_listeners()
        tcp_inherited = [l for l in inherited if l.socket.family != stdlib_socket.AF_UNIX]
        unix_inherited = [l for l in inherited if l.socket.family == stdlib_socket.AF_UNIX]
        # A bad [tls] section fails the start, not the first migration. All read files: worker thread.
        await trio.to_thread.run_sync(self._lock_runtime_dir)
        await trio.to_thread.run_sync(self._load_platform)
        await trio.to_thread.run_sync(self._setup_tls)
        await trio.to_thread.run_sync(self._open_replay_record)
        await self.migrations.settle.restore()   # in-flight migration records (daemon/settle.py)
        with trio.CancelScope() as serve_scope:
            self._serve_scope = serve_scope
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    listeners = tcp_inherited or await self._open_listeners()
                    self.listen_addresses = [_sockname(l.socket) for l in listeners]
                    self.listen_address = _fmt_addr(*self.listen_addresses[0])
                    if unix_inherited:
                        control_listener = unix_inherited[0]
                        self.control_path = systemd.socket_address(control_listener.socket)
                    else:
                        try:
                            control_listener, self._control_inode = await control.bind_control_socket(
                                self.config.control, self.config.control_group)
                        except BaseException:
                            for listener in listeners:
                                await trio.aclose_forcefully(listener)
                            raise
                        self.control_path = self.config.control
                    # Guests whose VMMs outlived the previous daemon: listed before anyone can ask.
                    await vmmhost.adopt_all(self)
                    # ... and what the previous process left in flight is settled before anyone can ask
                    # (a settlement query, `list`): daemon/settle.py.
                    await self.migrations.settle.resume()
                    await nursery.start(self._serve_migration_listeners, listeners)
                    await nursery.start(control.serve_control, self, control_listener)
                    if self.config.metrics_listen is not None:
                        await nursery.start(self.metrics.serve, self.config.metrics_listen)
                    self.started_at = time.monotonic()
                    systemd.ready(status=self.status_text())
                    nursery.start_soon(systemd.status_task, self.status_text)
                    nursery.start_soon(systemd.watchdog_task)
                    if self.psp_store is not None:
                        await nursery.start(self.psp_store.watch, self._psp)
                    self.log.info("ready", listen=self.listen_address, control=self.control_path,
                                  metrics=self.metrics.address,
                                  platform_id=self.platform_id, state_dir=self.config.state_dir,
                                  socket_activated=bool(tcp_inherited), pid=os.getpid(),
                                  version=__version__)
                    task_status.started(self.listen_address)
                    await self._shutdown_requested.wait()
                    await self._graceful_shutdown()
                    nursery.cancel_scope.cancel()
            finally:
                self._cleanup_control_socket()
                self.nursery = None
                self._unlock_runtime_dir()
                self._stopped.set()
        self.log.info("stopped", forced=serve_scope.cancelled_caught)

    async def _open_listeners(self) -> list[trio.SocketListener]:
        host, port = split_host_port(self.config.listen, key="listen")
        try:
            return await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise StartupError(f"cannot listen on {self.config.listen}: "
                               f"{exc.strerror or exc}") from None

    async def _serve_migration_listeners(self, listeners: list, *, task_status=trio.TASK_STATUS_IGNORED):
        with self._listener_scope:
            await trio.serve_listeners(self._incoming_connection, listeners, handler_nursery=self.nursery,
                                       task_status=task_status)
        self.log.info("listener_closed", listen=self.listen_address)

    async def _incoming_connection(self, stream: trio.abc.Stream) -> None:
        peer = _peer_of(stream)
        if self.shutting_down:
            self.log.warning("incoming_refused", peer=peer, reason="shutting down")
            await trio.aclose_forcefully(stream)
            return
        cap = self.config.max_unauthenticated
        slot, evicted = self._pre_hello.admit(peer, cap)
        for victim in evicted:
            self.log.warning("incoming_evicted", peer=victim.peer, idle=not victim.active,
                             reason=f"more than {cap} connections waiting for their hello (max_unauthenticated)")
        self._incoming_connections += 1
        token = self._pre_hello.bind(slot)
        try:
            # TLS (when configured) is wrapped by migrations.handle_incoming itself, under its handshake
            # timeout; the context built at startup only makes a bad [tls] section fail early.
            with slot.scope:
                await self.migrations.handle_incoming(WatchedStream(stream, slot), peer)
        except Exception as exc:  # one connection's failure is logged and contained in its task
            self.log.error("incoming_connection_failed", peer=peer, **exception_summary(exc))
        finally:
            self._pre_hello.unbind(token)
            slot.release()
            self._incoming_connections -= 1
            await trio.aclose_forcefully(stream)

    def request_started(self) -> None:
        """Control bookkeeping: a request is being served (see _graceful_shutdown)."""
        self._inflight_requests += 1
        if self._requests_idle.is_set():
            self._requests_idle = trio.Event()

    def request_finished(self) -> None:
        self._inflight_requests -= 1
        if self._inflight_requests == 0:
            self._requests_idle.set()

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (SIGTERM/SIGINT). Idempotent."""
        self._shutdown_requested.set()

    def force_stop(self) -> None:
        """Cancel everything now (a second SIGTERM/SIGINT during shutdown)."""
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _graceful_shutdown(self) -> None:
        self.shutting_down = True
        active = self.migrations.active()
        systemd.stopping(f"stopping: {active} migration(s) to settle")
        self.log.info("shutting_down", guests=len(self.guests), migrations=active)
        self._listener_scope.cancel()
        with trio.move_on_after(SHUTDOWN_MIGRATIONS_S) as scope:
            try:
                await self.migrations.shutdown()
            except Exception:
                self.log.error("migration_shutdown_failed", exc_info=True)
        if scope.cancelled_caught:
            self.log.warning("migration_shutdown_timeout", seconds=SHUTDOWN_MIGRATIONS_S)
        # Let control requests that were waiting on those migrations (`ctl migrate`) send their final
        # reply, so the user reads "cancelled: daemon shutting down" rather than a dropped connection.
        with trio.move_on_after(CONTROL_DRAIN_S):
            while self._inflight_requests:
                await self._requests_idle.wait()
        live = [g.name for g in self.guests.values() if g.state in ("running", "paused", "migrating")
                and not isinstance(g.vm, vmmhost.ProcessVm)]
        if live:
            self.log.warning("guests_stopped_by_shutdown", guests=live)
        kept = []
        for hosted in list(self.guests.values()):
            if isinstance(hosted.vm, (vmmhost.ProcessVm, vmmhost.DetachedVm)):
                # Its VMM runs on and the next daemon adopts it; the PSP keeps its context (pspstate).
                if isinstance(hosted.vm, vmmhost.ProcessVm) and not hosted.vm.released:
                    hosted.vm.detach()
                    kept.append(hosted.name)
                continue
            hosted.stop_vcpus()
            try:
                hosted.vm.release()
            except Exception:
                self.log.warning("guest_release_failed", guest=hosted.name, exc_info=True)
            hosted.state = "stopped"
        if self.psp_store is not None:
            # What the drivers' rollbacks did directly (SEND_CANCEL) is on disk before we go: the next
            # daemon restores exactly the PSP these guests have (the watch task may not have run since).
            with trio.CancelScope(shield=True):
                try:
                    await self._psp.persist_now()
                except Exception:  # noqa: BLE001 - logged; the store reports its own failed saves
                    self.log.error("psp_state_save_failed_at_shutdown", exc_info=True)
        if kept:
            self.log.info("guests_left_running", guests=kept, note="their VMM processes run on; the next "
                                                                   "daemon on this runtime directory adopts them")
            return   # the PSP's contexts stay as they are for the next daemon (a host keeps its PSP)
        if self._asid_space is not None:
            self._asid_space.clear()
        if self.fw is not None:
            try:
                self.fw.shutdown()
            except SevError:
                self.log.warning("firmware_shutdown_failed", exc_info=True)
        if self.psp_store is not None:
            await self.psp.persist_now()       # what the shutdown released is forgotten on disk too

    def _cleanup_control_socket(self) -> None:
        """Remove our control socket file, but only if it is still the one we bound."""
        if self._control_inode is None:
            return
        path = self.config.control
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._control_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.warning("control_socket_cleanup_failed", path=path, error=exc.strerror)
        self._control_inode = None

    # ------------------------------------------------------------------ reload
    async def reload(self) -> bool:
        """SIGHUP: re-read the configuration; apply the reloadable keys (trusted roots, limits, log
        level). On any error keep the old configuration (and say so). Returns True when applied.
        The files are read in a worker thread: guests and migrations keep running meanwhile."""
        systemd.reloading()
        try:
            candidate, apply, ignored, roots = await trio.to_thread.run_sync(self._read_reload)
        except (ConfigError, SevmigdError, OSError) as exc:
            self.log.error("reload_failed", error=str(exc))
            systemd.ready(status=self.status_text())
            return False
        self.config = candidate
        self.trusted_roots = roots
        if "log_level" in apply:
            configure_logging(candidate.log_level, candidate.log_format)
        self.migrations.config_changed()
        self.log.info("reloaded", changed=sorted(apply), restart_needed_for=sorted(ignored),
                      trusted_roots=len(roots))
        systemd.ready(status=self.status_text())
        return True

    def _read_reload(self) -> tuple[Config, dict, list[str], list[AmdCert]]:
        """The configuration and trusted roots a reload would apply (blocking reads; no state changed)."""
        path, overrides = self._config_source
        new = load_config(path, overrides)
        apply, ignored = self.config.reloadable_changes(new)
        candidate = dataclasses.replace(self.config, **apply)
        # Re-read the roots even when their setting is unchanged: the files may have been replaced.
        roots = self.trusted_roots if self._roots_injected else _read_trusted_roots(candidate)
        return candidate, apply, ignored, roots


def _sockname(sock: trio.socket.SocketType) -> tuple[str, int]:
    addr = sock.getsockname()
    return str(addr[0]), int(addr[1])


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return _fmt_addr(str(addr[0]), int(addr[1]))


# ------------------------------------------------------------------------------- entry point


async def run(config: Config, *, config_path: str | None = None, overrides: dict | None = None,
              daemon: Daemon | None = None) -> int:
    """Run a daemon until SIGTERM/SIGINT (graceful; a second one forces), SIGHUP reloads.
    Returns the process exit status."""
    if daemon is None:
        daemon = Daemon(config, config_source=(config_path, dict(overrides or {})))
    if config.slow_step_warn_ms > 0:
        daemon.step_watch = StepWatch(config.slow_step_warn_ms / 1000)
        trio.lowlevel.add_instrument(daemon.step_watch)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signal_loop, daemon, signals)
            await daemon.serve()
            nursery.cancel_scope.cancel()
    return 0


async def _signal_loop(daemon: Daemon, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            daemon.log.info("signal", signal="SIGHUP", action="reload")
            await daemon.reload()
        elif daemon.shutting_down or daemon._shutdown_requested.is_set():
            daemon.log.warning("signal", signal=signal.Signals(signum).name, action="force stop")
            daemon.force_stop()
        else:
            daemon.log.info("signal", signal=signal.Signals(signum).name, action="shutdown")
            daemon.request_shutdown()


__all__ = ["Daemon", "HostedGuest", "run", "GUEST_STATES", "VCPU_TICK_S"]
