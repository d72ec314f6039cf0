"""Hosted guests: `HostedGuest` (a guest, its state and its vCPU task) and the daemon's guest verbs.

Split out of daemon/server.py by job (issue 17): `GuestsMixin` is the part of `Daemon` that registers,
launches, stops and reports guests, inline ones (vCPU task in the daemon's nursery) and VMM-process ones
(daemon/vmmhost.py: the vCPUs run in their VMM, which outlives the daemon). `GUEST_STATES` are the states
`list` shows.

Must never: touch a guest's memory key or page plaintext (guest I/O goes through the guest's own agent,
or its VMM), let one guest's failure take the daemon down, or revive a crashed guest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import structlog
import trio

from sevmigd.daemon import vmmhost
from sevmigd.daemon.errors import (
    DaemonError,
    GuestExists,
    GuestNotFound,
    InvalidState,
    ResourceLimit,
    ShuttingDown,
)
from sevmigd.daemon.malloc import release_free_heap
from sevmigd.guest.vcpu import VCPU_MAX_SLICE_S, VCPU_TICK_S
from sevmigd.guest.vm import GuestConfig, SevVm
from sevmigd.migrate.stats import MigrationStats
from sevmigd.psp.policy import Policy


GUEST_STATES = ("running", "paused", "migrating", "migrated", "incoming", "stopped", "launching",
                # a guest's VMM process died (exit status / reason in `error`); never resumed by itself
                "crashed",
                # a VMM found at start that this daemon does not drive (another VMM protocol version; no
                # PSP context; never started): reported with the reason and left running
                "incompatible", "orphaned")

if TYPE_CHECKING:  # the mixin's self is the Daemon
    from sevmigd.daemon.server import Daemon

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
        if self._state in ("running", "paused", "migrating") and vmmhost.guest_died_in_vmm(self.vm):
            # Read from the state area on every look, so no decision (migrate, evacuate, resume) is taken on
            # a guest whose kernel died since; vmmhost.watch reports it and cleans up.
            self._state = "crashed"
            self.error = self.error or vmmhost.GUEST_CRASHED_REASON
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


def _hex(b: bytes | None) -> str | None:
    """Hex of a digest; None when there is none (an incoming guest was never launched here)."""
    return bytes(b).hex() if b else None


class GuestsMixin:
    """The guest side of `Daemon` (see the module docstring)."""

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
        if hosted.state == "crashed" and hosted.in_vmm and not hosted.vm.released:
            # its kernel died inside a live VMM, not yet cleaned up by vmmhost.watch: the VMM quits now
            await vmmhost.bury(self, hosted, hosted.error or vmmhost.GUEST_CRASHED_REASON, quit_vmm=True)
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


__all__ = ["GUEST_STATES", "GuestsMixin", "HostedGuest"]
