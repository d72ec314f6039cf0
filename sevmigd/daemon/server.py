"""The sevmigd daemon: one emulated PSP, the guests it hosts, the migration listener, the control socket.

Owns `Daemon` (the process-wide state every other daemon module works through), `HostedGuest` (a
guest plus its vCPU task) and `run(config)` (the entry `sevmigd serve` calls: signals, reload,
graceful shutdown). The shape follows trio's servers: `await nursery.start(daemon.serve)` returns the
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
import ssl
import stat
import time
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, TypeVar

import structlog
import trio

from sevmigd import __version__, store
from sevmigd.daemon import control, pspstate, replay, systemd, tls, vmmhost
from sevmigd.daemon.config import Config, TlsConfig, load_config, split_host_port
from sevmigd.daemon.errors import (
    DaemonError,
    GuestExists,
    GuestNotFound,
    InvalidState,
    ResourceLimit,
    ShuttingDown,
    StartupError,
)
from sevmigd.daemon.logging import configure_logging, exception_summary
from sevmigd.daemon.loopwatch import StepWatch
from sevmigd.daemon.malloc import release_free_heap
from sevmigd.daemon.migration import MigrationManager
from sevmigd.daemon.metrics import DaemonMetrics
from sevmigd.daemon.psprunner import PspRunner
from sevmigd.daemon.slots import PreHelloSlots, WatchedStream
from sevmigd.errors import ConfigError, SevmigdError
from sevmigd.guest.vcpu import VCPU_MAX_SLICE_S, VCPU_TICK_S
from sevmigd.guest.vm import GuestConfig, SevVm
from sevmigd.kvm.asid import AsidExhausted, AsidSpace, firmware_flush
from sevmigd.kvm.sev import SevDevice
from sevmigd.migrate.stats import MigrationStats
from sevmigd.psp.certs import AmdCert
from sevmigd.psp.firmware import Firmware, PlatformState
from sevmigd.psp.identity import PlatformIdentity
from sevmigd.psp.policy import Policy
from sevmigd.psp.status import SevError

GUEST_STATES = ("running", "paused", "migrating", "migrated", "incoming", "stopped", "launching",
                # a guest's VMM process died (exit status / reason in `error`); never resumed by itself
                "crashed",
                # a VMM found at start that this daemon does not drive (another VMM protocol version; no
                # PSP context; never started): reported with the reason and left running
                "incompatible", "orphaned")

# Bounded graceful shutdown: migrations get this long to abort or finish cleanly after SIGTERM, well
# inside systemd's TimeoutStopSec (60 s in our unit) so the final cleanup still runs.
SHUTDOWN_MIGRATIONS_S = 20.0
# After migrations have settled at shutdown, control requests get this long to send their replies.
CONTROL_DRAIN_S = 2.0
# At most max_unauthenticated migration connections wait for their Hello to be accepted; a new one
# beyond that evicts the stalest waiting one (sevmigd.daemon.slots), so a flood of idle connections can
# neither pin memory and descriptors nor refuse a real source.

_log = structlog.get_logger("sevmigd")
T = TypeVar("T")


# ------------------------------------------------------------------------------- hosted guests


class HostedGuest:
    """A guest this daemon hosts: the SevVm, its lifecycle state, and its vCPU task.

    `state` is one of GUEST_STATES; the migration code sets migrating/migrated/incoming, the daemon
    core sets running/paused/stopped. `migration` holds the latest stats dict (or None).
    """

    def __init__(self, daemon: Daemon, name: str, vm: SevVm, state: str):
        if state not in GUEST_STATES:
            raise ValueError(f"unknown guest state {state!r}")
        self.daemon = daemon
        self.name = name
        self.vm = vm
        self.state = state
        self.migration: MigrationStats | None = None
        self.error: str | None = None
        self.created = time.time()
        self._vcpu_scope: trio.CancelScope | None = None

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, new: str) -> None:
        # A crashed guest stays crashed (a migration that was under way when its VMM died must not roll it
        # back to "running"); only `stop` ends it.
        if getattr(self, "_state", None) == "crashed" and new != "stopped":
            return
        self._state = new

    @property
    def vcpus_running(self) -> bool:
        return self._vcpu_scope is not None

    @property
    def in_vmm(self) -> bool:
        """The guest's vCPUs run in a VMM process (vmm = "process"), not in this daemon."""
        return isinstance(self.vm, vmmhost.ProcessVm)

    async def guest_call(self, fn: Callable[[], T]) -> T:
        """Run a guest operation (verify, agent, reboot): inline here; for a VMM-process guest in a worker
        thread, since it is a request the VMM answers (the event loop keeps serving meanwhile)."""
        if isinstance(self.vm, (vmmhost.ProcessVm, vmmhost.DetachedVm)):
            return await trio.to_thread.run_sync(fn)
        return fn()

    def start_vcpus(self, nursery: trio.Nursery | None = None) -> None:
        """Start the vCPU task (idempotent): vm.run(dt) every VCPU_TICK_S in `nursery` (default: the
        daemon's). A VMM-process guest's vCPUs run in its VMM (as long as the state area says so)."""
        if self._vcpu_scope is not None or self.in_vmm:
            return
        nursery = nursery if nursery is not None else self.daemon.nursery
        if nursery is None:
            raise DaemonError("the daemon is not serving; cannot start vCPUs")
        scope = trio.CancelScope()
        self._vcpu_scope = scope
        nursery.start_soon(self._vcpu_loop, scope, name=f"vcpu:{self.name}")

    def stop_vcpus(self) -> None:
        """Stop the vCPU task. Synchronous and final: once this returns, vm.run() is not called again
        (the task can only be parked at a checkpoint while we run, and it wakes up cancelled)."""
        scope, self._vcpu_scope = self._vcpu_scope, None
        if scope is not None:
            scope.cancel()
        if self.in_vmm and not self.vm.released:
            self.vm.host._st.request_pause()   # the VMM stops at its next tick; release() quits it

    async def _vcpu_loop(self, scope: trio.CancelScope) -> None:
        with scope, structlog.contextvars.bound_contextvars(guest=self.name):
            last = trio.current_time()
            while True:
                await trio.sleep(VCPU_TICK_S)
                now = trio.current_time()
                dt, last = min(now - last, VCPU_MAX_SLICE_S), now
                try:
                    self.vm.run(dt)
                except Exception as exc:  # a guest bug must not take the other guests down
                    self.error = f"{type(exc).__name__}: {exc}"
                    self.state = "stopped"
                    self._vcpu_scope = None
                    _log.error("guest_crashed", error=self.error, exc_info=True)
                    return


# --------------------------------------------------------------------------------- the daemon


def _hex(b: bytes | None) -> str | None:
    """Hex of a digest; None when there is none (an incoming guest was never launched here)."""
    return bytes(b).hex() if b else None


class Daemon:
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
    @property
    def asids(self) -> AsidSpace:
        """The host's SEV ASIDs as KVM manages them (sevmigd.kvm.asid): SEV-ES below min_sev_asid, SEV
        from it; a freed ASID is reused only after WBINVD + DF_FLUSH on this daemon's PSP."""
        if self._asid_space is None:
            self._asid_space = AsidSpace(firmware_flush(self.fw))
        return self._asid_space

    @property
    def sev_device(self) -> SevDevice:
        """/dev/sev of this host (sevmigd.kvm.sev.SevDevice): PDH_CERT_EXPORT and the platform's chain."""
        return SevDevice(self.fw)

    def allocate_asid(self, es: bool = False) -> int:
        """A free ASID of the SEV-ES or the SEV range (sev_asid_new); ResourceLimit when none is left
        even after a flush."""
        try:
            return self.asids.new(es)
        except AsidExhausted as exc:
            raise ResourceLimit(str(exc)) from None

    def release_asid(self, asid: int | None) -> None:
        """The guest behind `asid` is gone (DEACTIVATEd): the ASID waits for the next flush."""
        self.asids.free(asid)

    def add_unadopted(self, name: str, vm, state: str, reason: str) -> HostedGuest:
        """List a VMM this daemon reports but does not drive (`incompatible`, `orphaned`, `crashed`)."""
        hosted = HostedGuest(self, name, vm, state)
        hosted.error = reason
        self.guests[name] = hosted
        return hosted

    def add_guest(self, name: str, vm: SevVm, state: str) -> HostedGuest:
        """Register a guest (its ASID, vm.asid, counts as used). GuestExists when the name is taken.
        Does not start vCPUs: call `hosted.start_vcpus()` when the guest should run."""
        if name in self.guests:
            raise GuestExists(name)
        hosted = HostedGuest(self, name, vm, state)
        self.asids.claim(vm.asid)
        self.guests[name] = hosted
        return hosted

    @property
    def vmm_mode(self) -> str:
        """Where new guests run: config `vmm`, except that VMM processes need the PSP's persisted sealing key
        (they open their key slots with it): a daemon with an injected firmware (in-process tests) or no
        runtime directory runs its guests inline."""
        return "process" if self.config.vmm == "process" and self.psp_store is not None else "inline"

    def watch_vmm(self, hosted: HostedGuest) -> None:
        """A VMM-process guest: watch its process (vmmhost.watch: an exit nobody asked for = crashed)."""
        vm = hosted.vm
        if isinstance(vm, vmmhost.ProcessVm) and vm.vmm is not None and self.nursery is not None:
            self.nursery.start_soon(vmmhost.watch, self, hosted, vm.vmm, name=f"vmm:{hosted.name}")

    def start_guest(self, hosted: HostedGuest) -> None:
        """Mark a registered guest running and start its vCPU task (e.g. an incoming guest after "go")."""
        hosted.state = "running"
        hosted.start_vcpus()

    def remove_guest(self, name: str) -> HostedGuest:
        """Deregister a guest: stop its vCPUs and free its ASID. Does NOT call vm.release() (the caller
        decides whether the guest's firmware context is to be decommissioned)."""
        hosted = self.get_guest(name)
        hosted.stop_vcpus()
        del self.guests[name]
        self.release_asid(hosted.vm.asid)
        return hosted

    def get_guest(self, name: str) -> HostedGuest:
        try:
            return self.guests[name]
        except KeyError:
            raise GuestNotFound(name) from None

    # ------------------------------------------------------------------ platform
    @property
    def psp(self) -> PspRunner:
        """The runner of every firmware command (see sevmigd.daemon.psprunner); exists once the platform
        is loaded (serve() does that, or inject `fw`)."""
        if self._psp is None:
            raise DaemonError("the platform is not loaded yet")
        return self._psp

    def _load_platform(self) -> None:
        """Read (or on a first start create) the platform identity and the trusted roots, start the
        firmware. Blocking file I/O and key generation: serve() runs it in a worker thread."""
        state_dir = self.config.state_dir
        if self.identity is None:
            self.identity = _load_or_create_platform(self, state_dir)
        if not self.trusted_roots and not self._roots_injected:
            self.trusted_roots = _read_trusted_roots(self.config)
        if self.fw is None:
            # The PSP's contexts outlive this process (RUNTIME/psp, daemon/pspstate.py): the sealing key of
            # this runtime directory, then every context and the ASID state restored, before guests are
            # re-adopted. An injected Firmware (tests) is not persisted.
            runtime = self.config.runtime_dir
            if runtime:   # its default lives beside the control socket: that directory's modes come first
                control.ensure_control_dir(self.config.control, self.config.control_group)
            key = pspstate.load_or_create_sealing_key(runtime, self.rng) if runtime else None
            self.fw = Firmware(self.identity, rng=self.rng, sealing_key=key,
                               min_command_time=self.config.psp_min_command_time_us / 1e6,
                               workers=self.config.psp_workers)
            self._psp = PspRunner(self.fw)
            if runtime:
                self.psp_store = pspstate.PspStore(runtime, self.fw, self.asids)
        if self._psp is not None:
            self.metrics.watch_psp(self._psp)  # PSP command counts and latencies, by command
        if self.fw.platform_state is PlatformState.UNINIT:
            self.fw.init()
        if self.psp_store is not None and self._psp.store is None:
            self.psp_restored = self.psp_store.restore()
            self._psp.store = self.psp_store

    def _setup_tls(self) -> None:
        """Mutual TLS (the default): make sure this host has its certificate, that it names this platform,
        and build the listener context now so a bad [tls] fails at start. Plaintext only with
        insecure_plaintext, loudly."""
        tls_cfg = self.config.tls
        if not tls_cfg.enabled:
            self.log.warning("insecure_plaintext",
                             note="migration channel without TLS: peers are not authenticated as platforms; "
                                  "outgoing hand-offs end uncertain and need `ctl resolve` (PROTOCOL.md §9.7)")
            return
        if tls_cfg.state_dir_default and not os.path.lexists(tls_cfg.cert):
            self._issue_default_tls()
        tls.check_own_certificate(tls_cfg, self.identity.chip_id)
        self._tls = _build_tls_contexts(tls_cfg)

    def tls_contexts(self) -> TlsContexts | None:
        """The (server, client) contexts of mutual TLS, None with insecure_plaintext. Built once from the
        [tls] files: serve() builds them at start in a worker thread (the files need a restart to change,
        like the [tls] keys); a daemon that does not serve (in-process tests) on first use."""
        if self._tls is None and self.config.tls.enabled:
            self._tls = _build_tls_contexts(self.config.tls)
        return self._tls

    def _open_replay_record(self) -> None:
        """The destination's record of accepted sessions (daemon/replay.py). A damaged one cannot say which
        sessions were accepted: rotate the PDH (PDH_GEN: every session wrapped to the old one becomes
        unopenable, so none can be replayed), persist the new identity, start a fresh record."""
        path = os.path.join(self.config.state_dir, replay.FILE_NAME)
        try:
            self.replay = replay.ReplayRecord.open(path)
            return
        except replay.ReplayRecordError as exc:
            self.log.error("replay_record_damaged", path=path, error=exc.message,
                           action="PDH_GEN, then a fresh record (the damaged file is kept)")
            error = exc
        try:
            self.fw.pdh_gen()
            store.save_platform(self.config.state_dir, self.fw.identity)
            self.identity = self.fw.identity
            rec = replay.ReplayRecord(path)
            kept = rec.reset()
        except (replay.ReplayRecordError, store.StoreError, SevmigdError) as exc:
            raise StartupError(f"replay record {path} is damaged ({error.message}) and could not be replaced: "
                               f"{exc}") from None
        self.replay = rec
        self.log.warning("replay_record_reset", path=path, kept=str(kept) if kept else None,
                         platform_id=self.platform_id)

    def _issue_default_tls(self) -> None:
        """No TLS certificate in the state dir. A self-contained state dir (its own fleet CA in STATE/ca,
        from a first start before TLS was the default) issues one now; otherwise say what to run."""
        from sevmigd import store

        ca_dir = os.path.join(self.config.state_dir, store.SELF_CONTAINED_CA_DIR)
        if not store.ca_exists(ca_dir):
            raise ConfigError("tls.cert", f"{self.config.tls.cert} missing: this host has no TLS certificate "
                                          f"for the migration channel. Issue one from the fleet CA with "
                                          f"`sevmigd platform tls-cert --state-dir {self.config.state_dir} "
                                          f"--ca CA_DIR`, or set insecure_plaintext = true (not recommended)")
        tls_ca = store.load_tls_ca(ca_dir, rng=self.rng)
        store.issue_host_tls(self.config.state_dir, tls_ca, self.identity, rng=self.rng)
        self.log.info("tls_certificate_issued", state_dir=self.config.state_dir,
                      platform=self.identity.chip_id[:16])

    @property
    def platform_id(self) -> str | None:
        return self.identity.platform_id if self.identity is not None else None

    # ------------------------------------------------------------------ guests (used by control)
    async def launch_guest(self, gcfg: GuestConfig) -> HostedGuest:
        """LAUNCH_* a new guest from a GuestConfig and start its vCPUs."""
        if self.shutting_down:
            raise ShuttingDown()
        if gcfg.name in self.guests:
            raise GuestExists(gcfg.name)
        if gcfg.memory_bytes > self.config.max_guest_bytes:
            raise ResourceLimit(f"memory {gcfg.memory_bytes} bytes exceeds max_guest_bytes "
                                f"({self.config.max_guest_bytes})")
        asid = self.allocate_asid(es=bool(gcfg.policy & Policy.ES))
        # An owner-bound launch stops measured (LSECRET): the guest owner checks the measurement
        # and answers with a secret before `finish_launch` boots it (state "launching" till then).
        owner = gcfg.owner_session is not None
        try:
            if self.vmm_mode == "process" and self._vm_launcher is None:
                vm = await vmmhost.launch_guest(self, gcfg, asid, finish=not owner)
            else:
                launcher = self._vm_launcher or SevVm.launch
                fw = self.fw
                kw = {"finish": False} if owner else {}
                vm = await self.psp.run("LAUNCH", lambda: launcher(fw, gcfg, asid=asid, rng=self.rng, **kw))
        except BaseException:
            self.release_asid(asid)
            raise
        if gcfg.name in self.guests or self.shutting_down:
            # An incoming migration took the name, or shutdown began, while the PSP worked.
            vm.release()
            self.release_asid(asid)
            raise ShuttingDown() if self.shutting_down else GuestExists(gcfg.name)
        hosted = self.add_guest(gcfg.name, vm, "launching" if owner else "running")
        try:
            if not owner:
                hosted.start_vcpus()
        except BaseException:
            self.remove_guest(gcfg.name)
            vm.release()
            raise
        self.watch_vmm(hosted)
        release_free_heap()  # a launch (prefill) frees MiBs of transient buffers: out of the RSS now
        self.log.info("guest_launched", guest=gcfg.name, memory_bytes=gcfg.memory_bytes,
                      policy=f"{gcfg.policy:#x}", asid=asid)
        return hosted

    async def finish_launch(self, name: str, packet: bytes | None) -> HostedGuest:
        """An owner-bound launch's last steps: LAUNCH_SECRET of the owner's packet (if any), LAUNCH_FINISH,
        the guest kernel boots, vCPUs start. A refused secret (BAD_MEASUREMENT: not this launch's owner)
        leaves the guest measured, waiting; `stop` discards it."""
        hosted = self.get_guest(name)
        if hosted.state != "launching":
            raise InvalidState(f"guest {name!r} is {hosted.state}; only a guest launched with an owner "
                               f"session waits for its launch secret")
        vm = hosted.vm
        if packet is not None:
            await self.psp.run("LAUNCH_SECRET", lambda: vm.launch_secret(packet))
        await self.psp.run("LAUNCH_FINISH", vm.finish_launch)
        self.start_guest(hosted)
        self.log.info("guest_launch_finished", guest=name, secret=packet is not None)
        return hosted

    async def stop_guest(self, name: str) -> HostedGuest:
        """Stop a guest for good: vCPUs off, DECOMMISSION, deregister."""
        hosted = self.get_guest(name)
        if hosted.state in ("migrating", "incoming"):
            raise InvalidState(f"guest {name!r} is {hosted.state}; cancel the migration first")
        if isinstance(hosted.vm, vmmhost.DetachedVm):
            # never killed by us: its VMM speaks another protocol or has no PSP context here
            raise InvalidState(f"guest {name!r} is {hosted.state} ({hosted.error}); this daemon does not "
                               f"drive its VMM (pid {hosted.vm.vmm.pid if hosted.vm.vmm else '?'}) and leaves it "
                               f"running")
        if hosted.state == "crashed" or getattr(hosted.vm, "released", False):
            if self.guests.get(name) is hosted:
                self.remove_guest(name)
            self.log.info("guest_stopped", guest=name, was=hosted.state)
            hosted.state = "stopped"
            return hosted
        hosted.stop_vcpus()
        try:
            await self.psp.run("DECOMMISSION", hosted.vm.release)
        finally:
            if self.guests.get(name) is hosted:
                self.remove_guest(name)
            hosted.state = "stopped"
        self.log.info("guest_stopped", guest=name)
        return hosted

    def guest_status(self, hosted: HostedGuest) -> dict[str, object]:
        vm = hosted.vm

        def safe(fn: Callable[[], object]) -> object:
            # Status reports what it can of a guest in any state: a decommissioned (migrated) guest
            # has no firmware context left, which is a fact to show, not an error to raise.
            try:
                return fn()
            except Exception:
                return None

        policy = safe(lambda: int(vm.policy))
        return {
            "name": hosted.name,
            "state": hosted.state,
            "memory_bytes": safe(lambda: int(vm.memory_bytes)),
            "vcpus": safe(lambda: int(vm.vcpus)),
            "policy": None if policy is None else f"{policy:#x}",
            "sev_state": safe(lambda: str(vm.sev_state)),
            "private_pages": safe(lambda: int(vm.private_pages())),
            "shared_pages": safe(lambda: int(vm.shared_pages())),
            "launch_digest": safe(lambda: _hex(vm.launch_digest)),
            "measurement": safe(lambda: _hex(vm.measurement)),
            # what the guest owner needs to check LAUNCH_MEASURE (`sevmigd owner measure --launch FILE`)
            "launch_measure": safe(lambda: self._launch_measure(vm)),
            "migration_control": safe(lambda: int(vm.host.migration_control)),
            "page_enc_bitmap": safe(lambda: vm.host.page_enc_source),
            "asid": safe(lambda: int(vm.asid)),
            "migration": hosted.migration.to_dict() if hosted.migration is not None else None,
            "error": hosted.error,
            # vmm = "process": the VMM's pid and how much the vCPUs ran (runs, seconds of guest time)
            "vmm": safe(lambda: vm.status()) if hasattr(vm, "status") else None,
        }

    def _launch_measure(self, vm: SevVm) -> dict[str, object] | None:
        if vm.measurement is None or vm.mnonce is None:
            return None
        return {"measure": vm.measurement.hex(), "mnonce": vm.mnonce.hex(), "api_major": int(self.fw.api_major),
                "api_minor": int(self.fw.api_minor), "build": int(self.fw.build)}

    def server_info(self) -> dict[str, object]:
        states: dict[str, int] = {}
        for g in self.guests.values():
            states[g.state] = states.get(g.state, 0) + 1
        fw_api = f"{self.fw.api_major}.{self.fw.api_minor}" if self.fw is not None else None
        return {
            "version": __version__,
            "pid": os.getpid(),
            "listen": self.listen_address,
            "listen_addresses": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.listen_addresses],
            "control": self.control_path,
            "state_dir": self.config.state_dir,
            "platform_id": self.platform_id,
            "api_version": fw_api,
            "guests": len(self.guests),
            "guest_states": states,
            "migrations": self.migrations.active(),
            "shutting_down": self.shutting_down,
            "uptime_s": None if self.started_at is None else round(time.monotonic() - self.started_at, 3),
            "tls": bool(self.config.tls.enabled),
            "log_level": self.config.log_level,
            "metrics": self.metrics.address,
            "outgoing_queue": len(self.migrations.queue),
            "psp_state": self._psp_state_info(),
            **self.resource_counts(),
            **(self.step_watch.figures() if self.step_watch is not None else {}),
        }

    def _psp_state_info(self) -> dict[str, object] | None:
        """The PSP's contexts (GUEST_STATUS of every live handle) and its store (RUNTIME/psp): what was
        restored at start, which files were damaged, failed saves. No key or context content."""
        if self.fw is None:
            return None
        contexts = []
        for h in self.fw.handles:
            st = self.fw.guest_status(h)
            contexts.append({"handle": h, "state": st.state.name, "asid": st.asid, "policy": f"{st.policy:#x}"})
        store, restored = self.psp_store, self.psp_restored
        return {
            "contexts": contexts,
            "dir": str(store.dir) if store is not None else None,
            "restored": list(restored.handles) if restored is not None else [],
            "damaged": [{"path": p, "error": e} for p, e in restored.damaged] if restored is not None else [],
            "save_errors": store.save_errors if store is not None else 0,
        }

    def resource_counts(self) -> dict[str, int | None]:
        """What a failed migration must not leave behind (issue 6, invariant 5): open file descriptors,
        live trio tasks, live PSP guest handles, bytes of guest RAM still mapped by registered guests."""
        try:
            fds: int | None = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = None
        tasks = None
        try:
            todo = [trio.lowlevel.current_root_task()]
            tasks = 0
            while todo:
                t = todo.pop()
                tasks += 1
                for n in t.child_nurseries:
                    todo.extend(n.child_tasks)
        except RuntimeError:  # not inside trio
            pass
        ram = sum(g.vm.memory_bytes for g in self.guests.values() if not g.vm.released)
        return {"open_fds": fds, "tasks": tasks, "psp_guests": self.fw.guest_count if self.fw is not None else None,
                "guest_ram_bytes": ram}

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

    def _lock_runtime_dir(self) -> None:
        """RUNTIME/lock (flock, held while we serve): two daemons never share a runtime directory (its
        VMMs, PSP contexts and migration records). Blocking: serve() runs it in a worker thread."""
        import fcntl

        rdir = self.config.runtime_dir
        control.ensure_control_dir(self.config.control, self.config.control_group)
        missing = []
        d = os.path.abspath(rdir)
        while not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):   # every directory we create is owner-only, like the control socket's
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
        path = os.path.join(rdir, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise StartupError(f"another sevmigd daemon is already serving runtime directory {rdir} "
                               f"(pid {holder} holds {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._runtime_lock = fd

    def _unlock_runtime_dir(self) -> None:
        fd, self._runtime_lock = getattr(self, "_runtime_lock", None), None
        if fd is not None:
            os.close(fd)   # closing the descriptor drops the flock

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

    def status_text(self) -> str:
        """The one-line STATUS= systemd shows (`systemctl status`)."""
        return systemd.status_text([g.state for g in self.guests.values()],
                                   listening=self.listen_address or self.config.listen,
                                   shutting_down=self.shutting_down)


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


class TlsContexts(NamedTuple):
    server: ssl.SSLContext
    client: ssl.SSLContext


def _build_tls_contexts(tls_cfg: TlsConfig) -> TlsContexts:
    """Both TLS contexts of this host (reads the key and certificate files)."""
    server, client = tls.server_context(tls_cfg), tls.client_context(tls_cfg)
    assert server is not None and client is not None  # TLS is enabled: tls_settings gave paths
    return TlsContexts(server, client)


def _read_trusted_roots(config: Config) -> list[AmdCert]:
    """ARK certificates a daemon with `config` trusts: the trusted_roots files, else the state dir's."""
    if config.trusted_roots is None:
        return list(store.load_trusted_roots(config.state_dir))
    roots = []
    for i, path in enumerate(config.trusted_roots):
        key = f"trusted_roots[{i}]"
        try:
            data = store.read_regular_file(path)  # non-blocking open: a FIFO is an error, not a stuck thread
        except store.StoreError as exc:
            raise ConfigError(key, f"cannot read {exc}") from None
        try:
            roots.append(AmdCert.decode(data))
        except SevError as exc:
            raise ConfigError(key, f"{path} is not an AMD ARK certificate: {exc}") from None
    return roots


def _load_or_create_platform(daemon: Daemon, state_dir: str) -> PlatformIdentity:
    """store.load_platform(state_dir); on a first start (no identity there yet) create a fresh
    self-contained fleet CA + platform in the state dir and say so in the log."""
    if store.platform_exists(state_dir):
        return store.load_platform(state_dir)
    daemon.log.warning("platform_created", state_dir=state_dir,
                       note="no platform identity found: created a new self-contained fleet CA and "
                            "platform (use `sevmigd platform init` to join an existing fleet)")
    daemon.platform_created = True
    return store.init_self_contained(state_dir, rng=daemon.rng)


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
