"""Guests whose vCPUs run in VMM processes (`vmm = "process"`, issue 17): spawn, map, talk, adopt, bury.

The daemon keeps its roles (KVM, the PSP, libvirtd, QEMU's migration thread); each guest's vCPUs and RAM
live in a `sevmigd vmm` process (sevmigd/vmm/process.py) that outlives the daemon. This module is the
daemon's side of that split:

* `VmmClient`: the VMM socket's request/reply client (blocking, one request at a time under a lock;
  async callers run it in a worker thread, the few synchronous call sites of the drivers call it
  directly: a VMM answers between two vCPU ticks). The hello reply brings the guest's RAM and state
  memfds (SCM_RIGHTS); the daemon maps both MAP_SHARED.
* `ProcessVm`: a `SevVm` over that shared memory, so the migration drivers, `migrate/ram.py` and the
  PSP work unchanged: the dirty log, both bitmaps, pause (acknowledged by the VMM before the final sync),
  throttle and the registers of a plain SEV guest are cells of the state area; the PSP maps the RAM
  memfd for LAUNCH_UPDATE_DATA and SEND/RECEIVE_UPDATE_DATA. What only the guest can do (boot, resume
  after RECEIVE_FINISH, verify, the agent, reboot) is a request to the VMM, which opens the PSP's key
  slot itself: the daemon passes the sealed blob on and never holds the guest's key.
* `spawn_vmm` (own session: the daemon's death does not reach it), `adopt_all` (a starting daemon finds
  RUNTIME/vmm/*.json, says hello, restores each guest as it was, or reports it `incompatible` /
  `orphaned` and leaves it running), `watch` (a pidfd per VMM: a VMM that dies makes its guest
  `crashed`, its PSP context decommissioned and its ASID released; nothing resumes it).

Must never: kill a VMM it cannot restore, resume a crashed guest, decode a key slot, or let one VMM's
failure reach another guest or the daemon's loop (errors are typed: VmmError / VmmGone).
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

import structlog
import trio

from sevmigd import __version__
from sevmigd.daemon.errors import DaemonError, InvalidState
from sevmigd.guest.memory import GuestRam
from sevmigd.guest.shared import SharedDirtyLog, StateArea, StateError, state_size
from sevmigd.guest.vm import GuestConfig, SevVm, VerifyReport, _teardown
from sevmigd.migrate.errors import MigrationError
from sevmigd.psp.policy import Policy
from sevmigd.psp.status import SevError
from sevmigd.units import PAGE_SIZE
from sevmigd.vmm import protocol as vp
from sevmigd.wire.errors import AbortCode

if TYPE_CHECKING:
    from sevmigd.daemon.server import Daemon, HostedGuest

_log = structlog.get_logger("sevmigd")

#: A VMM has this long to listen after it was started (a Python start with numpy and cryptography on a
#: loaded 2-core host takes seconds).
SPAWN_TIMEOUT_S = 60.0
#: Connecting and hello.
CONNECT_TIMEOUT_S = 10.0
#: Ordinary requests; boot (prefill) and verify walk the whole RAM and get LONG_CALL_TIMEOUT_S.
CALL_TIMEOUT_S = 30.0
#: How often the daemon looks at a VMM-process guest's error flag (see watch).
GUEST_WATCH_S = 0.25
GUEST_CRASHED_REASON = "the guest kernel died inside its VMM (see the VMM's log in RUNTIME/vmm/)"
LONG_CALL_TIMEOUT_S = 600.0
#: The VMM acknowledges a pause at its next vCPU tick (10 ms); this bounds a stuck or stopped VMM.
PAUSE_ACK_TIMEOUT_S = 10.0


class VmmError(DaemonError):
    """A VMM refused a request or broke the protocol (the message says which guest and why)."""

    error_class = "VmmError"


class VmmGone(VmmError):
    """The VMM's connection is gone (the process died or closed it)."""


class VmmStalled(MigrationError):
    """A VMM did not acknowledge a pause (it died, or did not answer in time) while a migration needed
    it: the migration fails and rolls back like any other failure (a MigrationError, INTERNAL_ERROR)."""

    def __init__(self, message: str):
        super().__init__(AbortCode.INTERNAL_ERROR, message)


# ------------------------------------------------------------------------------------------ the client


class VmmClient:
    """One connection to a VMM (blocking). `connect` does the hello and keeps its reply and memfds."""

    def __init__(self, sock: socket.socket, name: str):
        self._sock = sock
        self._name = name
        self._dec = vp.FrameDecoder()
        self._lock = threading.Lock()
        self._next_id = 1
        self.hello: dict = {}
        self.fds: list[int] = []

    @classmethod
    def connect(cls, path: str, name: str = "?", *, timeout: float = CONNECT_TIMEOUT_S) -> "VmmClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise VmmGone(f"VMM of guest {name!r}: cannot connect to {path}: {exc.strerror or exc}") from None
        client = cls(sock, name)
        try:
            client.hello, client.fds = client._call("hello", timeout, want_fds=True,
                                                    protocol=vp.VMM_PROTOCOL, sevmigd=__version__)
        except BaseException:
            client.close()
            raise
        return client

    def call(self, op: str, timeout: float = CALL_TIMEOUT_S, **args) -> dict:
        """Send one request and return the reply's results; VmmError for an error reply, VmmGone when the
        connection broke (the VMM is then presumably dead: the watcher reports it)."""
        return self._call(op, timeout, **args)[0]

    def _call(self, op: str, timeout: float, *, want_fds: bool = False, **args) -> tuple[dict, list[int]]:
        with self._lock:
            if self._sock is None:
                raise VmmGone(f"VMM of guest {self._name!r}: connection closed")
            mid = self._next_id
            self._next_id += 1
            try:
                self._sock.settimeout(timeout)
                self._sock.sendall(vp.encode(vp.request(op, mid, **args)))
                fds: list[int] = []
                while True:
                    if want_fds and not fds:
                        data, got, _flags, _addr = socket.recv_fds(self._sock, 1 << 16, 4)
                        fds.extend(got)
                    else:
                        data = self._sock.recv(1 << 16)
                    if not data:
                        raise VmmGone(f"VMM of guest {self._name!r} closed the connection during {op}")
                    msgs = self._dec.feed(data)
                    if msgs:
                        break
            except socket.timeout:
                self._close_locked()
                raise VmmError(f"VMM of guest {self._name!r} did not answer {op} within {timeout:g} s") from None
            except OSError as exc:
                self._close_locked()
                raise VmmGone(f"VMM of guest {self._name!r}: {op} failed: {exc.strerror or exc}") from None
            except vp.VmmProtocolError as exc:
                self._close_locked()
                raise VmmError(f"VMM of guest {self._name!r}: {exc}") from None
        msg = msgs[0]
        if len(msgs) > 1 or msg.get("id") != mid:
            raise VmmError(f"VMM of guest {self._name!r}: reply out of order")
        if not msg.get("ok"):
            err = msg.get("error") or {}
            raise VmmError(f"guest {self._name!r}: {err.get('type', 'Error')}: {err.get('message', '')}")
        return msg, fds

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


# ------------------------------------------------------------------------------------------ the process


class VmmProcess:
    """What the daemon knows of one VMM process: pid (and the Popen when it is our child), its files,
    the connection, and whether its exit is expected (quit) or a crash."""

    def __init__(self, runtime_dir: str, vid: str, pid: int, name: str, popen: subprocess.Popen | None = None):
        self.vid, self.pid, self.name, self.popen = vid, pid, name, popen
        base = os.path.join(runtime_dir, vp.VMM_DIR, vid)
        self.sock_path, self.manifest_path, self.log_path = base + ".sock", base + ".json", base + ".log"
        self.client: VmmClient | None = None
        self.quitting = False
        self.exited = trio.Event()
        self.exit_reason: str | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def wait_for(self, pred: Callable[[], bool], what: str) -> None:
        """StateArea's wait: poll the shared cell (sub-millisecond) until `pred`, bounded; VmmGone when
        the process is gone, VmmError after PAUSE_ACK_TIMEOUT_S."""
        deadline = time.monotonic() + PAUSE_ACK_TIMEOUT_S
        delay = 0.0002
        while not pred():
            if not self.alive():
                raise VmmStalled(f"VMM of guest {self.name!r} (pid {self.pid}) is gone; no {what} acknowledgement")
            if time.monotonic() > deadline:
                raise VmmStalled(f"VMM of guest {self.name!r} (pid {self.pid}) did not acknowledge {what} "
                               f"within {PAUSE_ACK_TIMEOUT_S:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    def describe_exit(self) -> str:
        """Why the process ended: its exit status when it is our child, else what we can tell."""
        if self.popen is not None:
            rc = self.popen.wait()
            if rc < 0:
                try:
                    import signal as _signal
                    sig = _signal.Signals(-rc).name
                except ValueError:
                    sig = f"signal {-rc}"
                return f"VMM pid {self.pid} killed by {sig}"
            return f"VMM pid {self.pid} exited with status {rc}"
        return f"connection lost, pid {self.pid} gone"


# ------------------------------------------------------------------------------------------ the guest


class _AgentProxy:
    """The in-guest agent of a VMM process guest (same interface as guest/agent.GuestAgent)."""

    def __init__(self, vm: "ProcessVm"):
        self._vm = vm

    def write(self, gpa: int, data: bytes, shared: bool = False) -> None:
        self._vm.call("guest_write", gpa=int(gpa), data=bytes(data), shared=bool(shared))

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self._vm.call("guest_read", gpa=int(gpa), length=int(length))["data"])

    def launch_secret(self):
        import uuid

        entries = self._vm.call("guest_secret")["entries"]
        return None if entries is None else [(uuid.UUID(g), bytes(d)) for g, d in entries]


class ProcessVm(SevVm):
    """The daemon's side of a guest whose vCPUs run in a VMM process (see the module docstring)."""

    def __init__(self, fw, **kw):
        super().__init__(fw, **kw)
        self.agent = _AgentProxy(self)
        self.vmm: VmmProcess | None = None
        self._state_map: mmap.mmap | None = None
        self.dead = False

    def call(self, op: str, timeout: float = CALL_TIMEOUT_S, **args) -> dict:
        if self.vmm is None or self.vmm.client is None or self.dead:
            raise VmmGone(f"guest {self.name!r}: its VMM is gone")
        return self.vmm.client.call(op, timeout, **args)

    # -- what only the guest does: requests to the VMM -----------------------------------------------
    def finish_launch(self) -> None:
        """LAUNCH_FINISH here, then the VMM boots the guest with the key slot (blocking: prefill may take
        seconds; Daemon runs it in a worker thread)."""
        if not self.awaiting_secret:
            from sevmigd.guest.kernel import GuestPanic
            raise GuestPanic(f"guest {self.name}: launch already finished")
        config, entropy = self._pending_boot
        self._fw.launch_finish(self.handle)
        self._pending_boot = None
        self.boot_in_vmm(config, entropy)

    def boot_in_vmm(self, config: GuestConfig, entropy: bytes) -> None:
        cfg = {k: getattr(config, k) for k in config.__dataclass_fields__}
        # The launch-only blobs stay here: LAUNCH_* measured the image, the owner's session is spent.
        cfg.update(image=None, owner_godh=None, owner_session=None)
        self.call("boot", LONG_CALL_TIMEOUT_S, handle=self.handle, asid=self.asid,
                  key_slot=self._fw.key_slot(self.handle), config=cfg, entropy=bytes(entropy),
                  secret_gpa=int(self.secret_gpa), launch=self.launch_info())

    def launch_info(self) -> dict:
        return {"launch_digest": bytes(self.launch_digest), "measurement": self.measurement,
                "mnonce": self.mnonce}

    def received(self, handle: int) -> None:
        """RECEIVE_START gave `handle`: the VMM's manifest names it from now on (a restarted daemon then
        knows which restored PSP context belongs to this incoming copy)."""
        super().received(handle)
        try:
            self.call("bind", handle=handle, asid=self.asid)
        except VmmError as exc:   # the incoming migration fails cleanly (the destination discards its copy)
            raise VmmStalled(str(exc)) from None

    def start_incoming(self) -> None:
        """After RECEIVE_FINISH: the VMM opens the key slot and the kernel resumes (the registers of a
        plain SEV guest are in the state area already; an SEV-ES guest's in its VMSA pages)."""
        state = self.sev_state
        if state != "RUNNING":
            from sevmigd.guest.kernel import GuestPanic
            raise GuestPanic(f"guest {self.name}: PSP guest state is {state}, not RUNNING (RECEIVE_FINISH first)")
        self.call("resume_incoming", handle=self.handle, asid=self.asid, key_slot=self._fw.key_slot(self.handle))

    def run(self, dt: float) -> None:
        """The vCPUs run in the VMM process."""

    def verify(self) -> VerifyReport:
        r = self.call("verify", LONG_CALL_TIMEOUT_S)
        return VerifyReport(int(r["pages_checked"]), list(r["mismatches"]), not r["mismatches"])

    def reboot(self) -> None:
        self.call("reboot", LONG_CALL_TIMEOUT_S)

    @property
    def running(self) -> bool:
        st = self._state
        return not self.dead and st is not None and st.kernel_running and not st.paused

    def shared_pages(self) -> int:
        return int(self._state.shared_pages) if self._state is not None else 0

    def status(self) -> dict:
        """What `ctl status` shows of the VMM (pid, vCPU runs so far, seconds of guest time run)."""
        st = self._state
        out = {"pid": self.vmm.pid if self.vmm else None, "id": self.vmm.vid if self.vmm else None}
        if st is not None and not self.dead:
            out.update(runs=st.runs, run_s=round(st.run_ns / 1e9, 3), guest_error=st.guest_error)
        return out

    # -- the end ---------------------------------------------------------------------------------------
    def release(self) -> None:
        """DEACTIVATE + DECOMMISSION, unmap, then the VMM quits (the guest is gone: stop, migrated away,
        discarded incoming copy)."""
        if self._released:
            return
        vmm = self.vmm
        if vmm is not None:
            vmm.quitting = True
            if vmm.client is not None and not self.dead:
                try:
                    vmm.client.call("quit", CALL_TIMEOUT_S)
                except VmmError as exc:
                    _log.warning("vmm_quit_failed", guest=self.name, error=str(exc))
                vmm.client.close()
        self.release_local()

    def release_local(self) -> None:
        """The daemon's part of release without asking the VMM anything (its VMM is dead, or quit)."""
        if self._released:
            return
        try:
            super().release()     # DEACTIVATE + DECOMMISSION, the memory slot, our RAM mapping
        finally:
            st, self._state = self._state, None
            if st is not None:
                self.host._st = None   # type: ignore[assignment]
                try:
                    st.release()
                except (BufferError, ValueError):   # a view still exported: freed when collected
                    pass
            if self._state_map is not None:
                try:
                    self._state_map.close()
                except BufferError:
                    pass
                self._state_map = None

    def detach(self) -> None:
        """Daemon shutdown: forget the VMM (it runs on), close our mappings; the PSP context stays."""
        if self.vmm is not None and self.vmm.client is not None:
            self.vmm.client.close()
        self._released = True


def _map(client: VmmClient, *, memory_bytes: int, vcpus: int) -> tuple[GuestRam, StateArea, mmap.mmap]:
    """Map the memfds of the hello reply (RAM, state) and close our descriptors of them."""
    if len(client.fds) != 2:
        raise VmmError(f"VMM hello brought {len(client.fds)} descriptors, not 2 (RAM, state)")
    ram_fd, state_fd = client.fds
    size = state_size(memory_bytes // PAGE_SIZE, vcpus)
    try:
        if os.fstat(ram_fd).st_size != memory_bytes or os.fstat(state_fd).st_size != size:
            raise VmmError("VMM memfds have the wrong sizes")
        state_map = mmap.mmap(state_fd, size, flags=mmap.MAP_SHARED)
        try:
            state = StateArea(state_map, npages=memory_bytes // PAGE_SIZE, vcpus=vcpus)
        except StateError as exc:
            state_map.close()
            raise VmmError(str(exc)) from None
        ram = GuestRam(memory_bytes, fd=ram_fd, dirty=SharedDirtyLog(state))
    finally:
        for fd in client.fds:
            os.close(fd)
        client.fds = []
    return ram, state, state_map


# ------------------------------------------------------------------------------------------ spawning


async def spawn_vmm(daemon: "Daemon", *, name: str, memory_bytes: int, vcpus: int, policy: int) -> VmmProcess:
    """Start `sevmigd vmm` for a new guest in its own session and wait until it listens and said hello."""
    runtime_dir = daemon.config.runtime_dir
    vdir = os.path.join(runtime_dir, vp.VMM_DIR)
    os.makedirs(vdir, mode=0o700, exist_ok=True)
    vid = vp.vmm_id(name, daemon.rng(4))
    log_path = os.path.join(vdir, f"{vid}.log")
    r, w = os.pipe()
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            cmd = [sys.executable, "-m", "sevmigd", "vmm", "--runtime-dir", runtime_dir, "--id", vid,
                   "--name", name, "--memory", str(memory_bytes), "--vcpus", str(vcpus), "--policy", str(policy),
                   "--ready-fd", str(w)]
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                     pass_fds=(w,), start_new_session=True, close_fds=True)
        finally:
            os.close(log_fd)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    proc = VmmProcess(runtime_dir, vid, popen.pid, name, popen)
    try:
        ready = trio.lowlevel.FdStream(r)
        got = b""
        with trio.move_on_after(SPAWN_TIMEOUT_S):
            while b"\n" not in got:
                chunk = await ready.receive_some(64)
                if not chunk:
                    break
                got += chunk
        await ready.aclose()
        if not got.startswith(b"ready"):
            popen.kill()
            await trio.to_thread.run_sync(popen.wait)
            raise VmmError(f"VMM of guest {name!r} did not start: {_tail(log_path)}")
        proc.client = await trio.to_thread.run_sync(lambda: VmmClient.connect(proc.sock_path, name))
    except BaseException:
        if popen.poll() is None:
            popen.kill()
        raise
    daemon.log.info("vmm_started", guest=name, pid=popen.pid, id=vid)
    return proc


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip().replace("\n", " | ") or "(no output)"
    except OSError:
        return "(no log)"


def _vm_over(daemon: "Daemon", proc: VmmProcess, *, name: str, memory_bytes: int, policy: int, vcpus: int,
             handle: int | None, asid: int, launch: dict | None = None) -> ProcessVm:
    ram, state, state_map = _map(proc.client, memory_bytes=memory_bytes, vcpus=vcpus)
    state._wait = proc.wait_for
    vmsa = list(state.vmsa) if policy & Policy.ES else None
    launch = launch or {}
    vm = ProcessVm(daemon.fw, name=name, memory_bytes=memory_bytes, policy=policy, handle=handle, asid=asid,
                   vcpus=vcpus, ram=ram, vmsa=vmsa, launch_digest=bytes(launch.get("launch_digest") or b""),
                   measurement=launch.get("measurement"), mnonce=launch.get("mnonce"), state=state)
    vm._state_map = state_map
    vm.vmm = proc
    return vm


async def launch_guest(daemon: "Daemon", gcfg: GuestConfig, asid: int, *, finish: bool) -> ProcessVm:
    """The process-mode launch: VMM up -> LAUNCH_* in our PSP on its RAM -> (finish) LAUNCH_FINISH and boot."""
    proc = await spawn_vmm(daemon, name=gcfg.name, memory_bytes=gcfg.memory_bytes, vcpus=gcfg.vcpus,
                           policy=gcfg.policy)
    try:
        npages, vcpus = gcfg.memory_bytes // PAGE_SIZE, gcfg.vcpus
        ram, state, state_map = _map(proc.client, memory_bytes=gcfg.memory_bytes, vcpus=vcpus)
        state._wait = proc.wait_for
        assert state.npages == npages
        fw = daemon.fw

        def launch() -> ProcessVm:
            return ProcessVm.launch(fw, gcfg, asid=asid, rng=daemon.rng, finish=False, ram=ram, state=state)

        vm = await daemon.psp.run("LAUNCH", launch)
        vm._state_map = state_map
        vm.vmm = proc
        if finish:
            config, entropy = vm._pending_boot
            await daemon.psp.run("LAUNCH_FINISH", lambda: fw.launch_finish(vm.handle))
            vm._pending_boot = None
            await trio.to_thread.run_sync(vm.boot_in_vmm, config, entropy)
    except BaseException:
        with trio.CancelScope(shield=True):
            await _quit_unwanted(proc)
        raise
    return vm


async def incoming_vm(daemon: "Daemon", *, name: str, memory_bytes: int, policy: int, asid: int,
                      vcpus: int) -> ProcessVm:
    """A migration destination's guest: VMM up, its RAM our memory slot, vCPUs paused (RECEIVE_START
    follows through vm.host.sev as for an inline guest)."""
    proc = await spawn_vmm(daemon, name=name, memory_bytes=memory_bytes, vcpus=vcpus, policy=policy)
    try:
        vm = _vm_over(daemon, proc, name=name, memory_bytes=memory_bytes, policy=policy, vcpus=vcpus,
                      handle=None, asid=asid)
        await trio.to_thread.run_sync(vm.host.pause)
    except BaseException:
        with trio.CancelScope(shield=True):
            await _quit_unwanted(proc)
        raise
    return vm


async def _quit_unwanted(proc: VmmProcess) -> None:
    proc.quitting = True
    if proc.client is not None:
        try:
            await trio.to_thread.run_sync(lambda: proc.client.call("quit", 5.0))
        except VmmError:
            pass
        proc.client.close()
    if proc.popen is not None and proc.popen.poll() is None:
        try:
            await trio.to_thread.run_sync(lambda: proc.popen.wait(5.0))
        except subprocess.TimeoutExpired:
            proc.popen.kill()


# ------------------------------------------------------------------------------------------ watching


async def watch(daemon: "Daemon", hosted: "HostedGuest", proc: VmmProcess) -> None:
    """Wait for the VMM to exit (pidfd: children and adopted VMMs alike). An exit nobody asked for makes
    the guest `crashed`: PSP context decommissioned, ASID released, never resumed. Meanwhile (the same task:
    one per guest), watch the guest itself: a guest kernel that dies inside a VMM that lives on is `crashed`
    too (`_guest_died`)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        pidfd = None
    try:
        while pidfd is not None:
            # The guest's error flag is shared memory with no wake-up channel: it is looked at every
            # GUEST_WATCH_S between waits for the exit. That only delays the report and the cleanup: every
            # decision on the guest reads the flag itself (`HostedGuest.state`).
            with trio.move_on_after(GUEST_WATCH_S):
                await trio.lowlevel.wait_readable(pidfd)
                break
            if guest_died_in_vmm(hosted.vm):
                await _guest_died(daemon, hosted, proc)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    reason = await trio.to_thread.run_sync(proc.describe_exit)
    proc.exit_reason = reason
    proc.exited.set()
    if proc.quitting:
        return
    await bury(daemon, hosted, reason)


def guest_died_in_vmm(vm) -> bool:
    """The guest's kernel died inside a VMM that lives on (the state area's guest error flag)."""
    if not isinstance(vm, ProcessVm) or vm.released or vm.dead:
        return False
    st = vm._state
    return st is not None and bool(st.guest_error)


async def _guest_died(daemon: "Daemon", hosted: "HostedGuest", proc: VmmProcess) -> None:
    """A guest kernel that died inside its VMM (the VMM lives on and says so in the state area's guest
    error flag): report it crashed with the VMM's reason, and clean up as for a dead VMM (the VMM quits)."""
    vm = hosted.vm
    reason = GUEST_CRASHED_REASON
    try:
        status = await trio.to_thread.run_sync(lambda: vm.call("status"))
        if status.get("error"):
            reason = f"the guest kernel died in its VMM (pid {proc.pid}): {status['error']}"
    except VmmError:
        pass
    with trio.CancelScope(shield=True):
        await bury(daemon, hosted, reason, quit_vmm=True)


async def bury(daemon: "Daemon", hosted: "HostedGuest", reason: str, *, quit_vmm: bool = False) -> None:
    """The guest's VMM died (or, `quit_vmm`, its guest died in it and the VMM is asked to quit): report it
    crashed, decommission its PSP context, release its ASID (once: `vm.asid` is None afterwards)."""
    vm = hosted.vm
    hosted.state = "crashed"
    hosted.error = reason
    daemon.log.error("guest_crashed", guest=hosted.name, reason=reason)
    if isinstance(vm, ProcessVm) and not vm.released and not vm.dead:
        vm.dead = True    # (first: a second bury of the same guest -- watch and stop -- does nothing)
        proc = vm.vmm
        if quit_vmm and proc is not None:
            with trio.CancelScope(shield=True):
                await _quit_unwanted(proc)
        if proc is not None and proc.client is not None:
            proc.client.close()
        with trio.CancelScope(shield=True):
            try:
                await daemon.psp.run("DECOMMISSION", vm.release_local)
            except Exception as exc:  # noqa: BLE001 - the guest is reported crashed either way
                daemon.log.warning("crashed_guest_cleanup_failed", guest=hosted.name, error=str(exc))
        daemon.release_asid(vm.asid)
        vm.asid = None   # (a later `stop` must not free an ASID a new guest may hold by then)


def held_fds(guests) -> int | None:
    """Descriptors this daemon holds for its VMM-process guests (their RAM and state mappings, pidfds,
    connections), counted from /proc/self/fd: what server-info's `vmm_fds` reports, so a leak check can
    tell a guest that arrived from a descriptor that leaked."""
    socks = set()
    for g in guests:
        vmm = getattr(g.vm, "vmm", None)
        client = vmm.client if vmm is not None else None
        sock = client._sock if client is not None else None
        if sock is not None and sock.fileno() >= 0:
            socks.add(sock.fileno())
    n = 0
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/memfd:sevmigd-") or target == "anon_inode:[pidfd]" or int(fd) in socks:
                n += 1
    except OSError:
        return None
    return n


# ------------------------------------------------------------------------------------------ adoption


class DetachedVm:
    """What the daemon shows of a VMM it cannot drive (another protocol version, no PSP context): the
    manifest's facts only. Every guest operation refuses."""

    def __init__(self, info: dict):
        self.name = str(info.get("name"))
        self.memory_bytes = info.get("memory_bytes")
        self.vcpus = info.get("vcpus")
        self.policy = info.get("policy")
        self.handle = info.get("handle")
        self.asid = None
        self.released = False
        self.vmm: VmmProcess | None = None

    def __getattr__(self, attr):
        raise InvalidState(f"guest {self.name!r} is not driven by this daemon (its VMM is not adopted)")

    def release(self) -> None:
        raise InvalidState(f"guest {self.name!r}: its VMM is left running (not adopted); stop it there")

    def status(self) -> dict:
        return {"pid": self.vmm.pid if self.vmm else None, "id": self.vmm.vid if self.vmm else None}


def _read_manifest(path: str) -> dict:
    with open(path, "rb") as f:
        info = json.loads(f.read(1 << 16))
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not isinstance(info.get("name"), str):
        raise ValueError("not a VMM manifest")
    return info


async def adopt_all(daemon: "Daemon") -> None:
    """At start, after the PSP's contexts are restored: every VMM of the runtime directory is restored as
    a guest, or reported and left running. Runs before the control socket serves."""
    vdir = os.path.join(daemon.config.runtime_dir, vp.VMM_DIR)
    claimed: set[int] = set()
    for path in sorted(glob.glob(os.path.join(vdir, "*.json"))):
        vid = os.path.basename(path)[:-len(".json")]
        try:
            info = await trio.to_thread.run_sync(_read_manifest, path)
        except (OSError, ValueError) as exc:
            daemon.log.warning("vmm_manifest_unreadable", path=path, error=str(exc))
            continue
        try:
            await _adopt(daemon, vid, info)
        except Exception as exc:  # noqa: BLE001 - one VMM's trouble never stops the start
            daemon.log.error("vmm_adoption_failed", guest=info.get("name"), pid=info.get("pid"), error=str(exc),
                             exc_info=True)
        if isinstance(info.get("handle"), int):
            claimed.add(info["handle"])
    # A restored PSP context that no VMM names belonged to a guest that is gone (a VMM whose files were
    # removed, an inline guest of a daemon that died): nothing can ever run it again. Decommission it (and
    # free its ASID), as KVM does when the VM fd of a dead QEMU is closed.
    # Only with vmm = "process": an inline daemon keeps them as pspstate restored them (its guests died with
    # the previous process either way).
    restored = getattr(daemon, "psp_restored", None)
    if daemon.vmm_mode != "process":
        restored = None
    for handle in (restored.handles if restored is not None else ()):
        if handle in claimed or not _psp_has(daemon, handle):
            continue
        asid = daemon.fw.guest_status(handle).asid
        try:
            await daemon.psp.run("DECOMMISSION", lambda h=handle: _teardown(daemon.fw, h))
        except Exception as exc:  # noqa: BLE001
            daemon.log.warning("psp_context_cleanup_failed", handle=handle, error=str(exc))
            continue
        daemon.release_asid(asid)
        daemon.log.warning("psp_context_without_vmm", handle=handle, asid=asid, action="decommissioned")


def _report(daemon: "Daemon", proc: VmmProcess, info: dict, state: str, reason: str):
    name = str(info.get("name"))
    vm = DetachedVm(info)
    vm.vmm = proc
    if name in daemon.guests:
        name = f"{name}@vmm-{proc.vid}"
    hosted = daemon.add_unadopted(name, vm, state, reason)
    daemon.log.warning("vmm_not_adopted", guest=name, pid=proc.pid, state=state, reason=reason)
    return hosted


async def _adopt(daemon: "Daemon", vid: str, info: dict) -> None:
    name, pid = str(info["name"]), int(info["pid"])
    proc = VmmProcess(daemon.config.runtime_dir, vid, pid, name)
    unused = not isinstance(info.get("handle"), int)   # it never held a guest (started, never launched/bound)
    connect_error = None
    if proc.alive():
        # A VMM still starting (or going away) when the previous daemon died refuses connections for a
        # moment: ask again until it answers or exits, within CONNECT_TIMEOUT_S.
        deadline = trio.current_time() + CONNECT_TIMEOUT_S
        while True:
            try:
                proc.client = await trio.to_thread.run_sync(lambda: VmmClient.connect(proc.sock_path, name))
                break
            except VmmError as exc:
                connect_error = exc
            if not proc.alive() or trio.current_time() >= deadline:
                break
            await trio.sleep(0.1)   # (a bounded retry of a connection, not a synchronisation)
    if not proc.alive() and unused:
        # It held no guest and is gone (e.g. its starting daemon died before using it): nothing to report.
        for p in (proc.manifest_path, proc.sock_path):
            try:
                os.unlink(p)
            except OSError:
                pass
        daemon.log.info("vmm_unused_gone", guest=name, pid=pid)
        return None
    if not proc.alive():
        # It died while no daemon watched it: a crashed guest (its PSP context, if restored, goes).
        handle = info.get("handle")
        hosted = _report(daemon, proc, info, "crashed", f"VMM pid {pid} gone while the daemon was down")
        if isinstance(handle, int) and _psp_has(daemon, handle):
            await daemon.psp.run("DECOMMISSION", lambda: _teardown(daemon.fw, handle))
        for p in (proc.manifest_path, proc.sock_path):
            try:
                os.unlink(p)
            except OSError:
                pass
        return hosted
    if proc.client is None:
        return _report(daemon, proc, info, "orphaned", f"VMM pid {pid} does not answer: {connect_error}")
    hello = proc.client.hello
    if hello.get("protocol") != vp.VMM_PROTOCOL:
        proc.client.close()
        proc.client = None
        hosted = _report(daemon, proc, info, "incompatible",
                         f"VMM pid {pid} speaks VMM protocol {hello.get('protocol')!r} (sevmigd "
                         f"{hello.get('sevmigd')}), this daemon speaks {vp.VMM_PROTOCOL}; left running")
        daemon.nursery.start_soon(_watch_detached, daemon, hosted, proc)
        return hosted
    memory_bytes, vcpus, policy = int(hello["memory_bytes"]), int(hello["vcpus"]), int(hello["policy"])
    handle, asid, phase = hello.get("handle"), hello.get("asid"), hello.get("phase")
    if phase == "created" and (handle is None or not _psp_has(daemon, handle)):
        # Started for a launch or an incoming migration that never reached the PSP (or whose context was
        # not saved before the daemon died): it holds no guest that could ever run.
        await _quit_unwanted(proc)
        daemon.log.warning("vmm_unused_quit", guest=name, pid=pid,
                           reason="started for a launch or incoming migration that never reached the PSP")
        return None
    # "crashed": its guest kernel died while no daemon watched; adopted like a running guest, then the state
    # area's error flag makes it `crashed` and `watch` cleans up (the VMM quits, the context goes).
    if phase not in ("running", "created", "crashed") or not isinstance(handle, int) or not _psp_has(daemon, handle):
        why = (f"VMM phase {phase!r}" if phase not in ("running", "crashed") else
               f"the PSP has no context for handle {handle} (not restored)")
        proc.client.close()
        proc.client = None
        hosted = _report(daemon, proc, info, "orphaned", f"not adopted: {why}; left running")
        daemon.nursery.start_soon(_watch_detached, daemon, hosted, proc)
        return hosted
    vm = _vm_over(daemon, proc, name=name, memory_bytes=memory_bytes, policy=policy, vcpus=vcpus,
                  handle=handle, asid=int(asid), launch=hello.get("launch"))
    vm.kvm.attach_sev(handle=handle, asid=int(asid), es=bool(policy & Policy.ES))
    daemon.fw.map_guest_memory(handle, vm._ram.buf, vmsa=list(vm._state.vmsa) if policy & Policy.ES else None)
    # "incoming": a migration's copy that was not started (the destination daemon died before Go, or after
    # Go before the start): vCPUs paused; the settlement of that migration starts it (`vm.start_incoming()`
    # then `daemon.start_guest`) or stops it. Otherwise the guest runs on ("paused": a migration had paused
    # it; its settlement resumes it with `vm.host.resume()` after SEND_CANCEL).
    state = "incoming" if phase == "created" else ("paused" if vm._state.paused else "running")
    hosted = daemon.add_guest(name, vm, state)
    hosted.created = float(hello.get("created") or hosted.created)
    if phase == "crashed":
        hosted.error = f"the guest kernel died in its VMM (pid {pid}): {hello.get('error')}"
    daemon.nursery.start_soon(watch, daemon, hosted, proc)
    daemon.log.info("vmm_adopted", guest=name, pid=pid, handle=handle, asid=asid, state=hosted.state,
                    runs=vm._state.runs)
    return hosted


async def _watch_detached(daemon: "Daemon", hosted: "HostedGuest", proc: VmmProcess) -> None:
    """A VMM we report but do not drive: when it exits, say so (nothing of ours to clean up)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        pidfd = None
    if pidfd is not None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
    hosted.error = f"{hosted.error}; VMM pid {proc.pid} has exited since"
    daemon.log.warning("unadopted_vmm_exited", guest=hosted.name, pid=proc.pid)


def _psp_has(daemon: "Daemon", handle: int) -> bool:
    try:
        daemon.fw.guest_status(handle)
    except SevError:
        return False
    return True


__all__ = ["VmmClient", "VmmError", "VmmGone", "VmmProcess", "ProcessVm", "DetachedVm", "spawn_vmm",
           "launch_guest", "incoming_vm", "watch", "bury", "adopt_all"]
