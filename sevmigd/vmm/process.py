"""`sevmigd vmm`: the process that runs one guest (QEMU's role), started by the daemon, outliving it.

Owns the guest's RAM (a memfd) and its run state (a second memfd, guest/shared.py), the vCPUs (the
guest kernel, workload, agent and ledger of `sevmigd.guest`, through `runtime.VmmGuest`) on this
process's own trio loop, and a Unix socket `RUNTIME/vmm/<id>.sock` (0600) that speaks the VMM protocol
(`protocol.py`). `RUNTIME/vmm/<id>.json` (0600, written atomically) is its manifest: pid, guest name,
protocol and sevmigd versions, when it was created; a (re)starting daemon finds it there.

Life: created (memfds, socket, manifest; `--ready-fd` gets "ready\\n") -> the daemon connects, maps the
memfds it receives with the hello reply, runs LAUNCH_* or RECEIVE_* in its PSP -> `boot` or
`resume_incoming` (with the PSP's key slot) -> running, the vCPUs ticking every VCPU_TICK_S unless the
state area says paused -> `quit` (or SIGTERM): socket and manifest removed, exit 0. The daemon may die
and come back any number of times meanwhile: every connection starts with hello and gets the memfds again.

Started in its own session (the daemon's `start_new_session`), so the daemon's death or its process
group's signals do not reach it; under systemd the unit's KillMode=process leaves it running on restart.

Must never: run a vCPU while the state area asks for a pause, exit because a daemon connection broke,
or let one bad request end the guest (a request's failure is its error reply).
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket as stdlib_socket
import sys
import time
import traceback
from array import array

import trio

from sevmigd import __version__
from sevmigd.daemon.pspstate import read_sealing_key
from sevmigd.guest.agent import GuestNotRunning
from sevmigd.guest.kernel import GuestPanic
from sevmigd.guest.shared import state_size
from sevmigd.guest.vcpu import VCPU_MAX_SLICE_S, VCPU_TICK_S
from sevmigd.psp.seal import SealError
from sevmigd.units import PAGE_SIZE

from . import protocol as p
from .protocol import VMM_DIR
from .runtime import VmmGuest, guest_config, shared_ram

def _log(event: str, **kw) -> None:
    """One JSON line on stderr (the daemon points it at RUNTIME/vmm/<id>.log)."""
    rec = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid(), **kw}
    try:
        sys.stderr.write(json.dumps(rec, default=str) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Vmm:
    def __init__(self, *, runtime_dir: str, vid: str, name: str, memory_bytes: int, vcpus: int, policy: int,
                 protocol: int = p.VMM_PROTOCOL):
        self.runtime_dir = runtime_dir
        self.dir = os.path.join(runtime_dir, VMM_DIR)
        self.vid, self.name = vid, name
        self.memory_bytes, self.vcpus, self.policy = memory_bytes, vcpus, policy
        self.protocol = protocol
        self.sock_path = os.path.join(self.dir, f"{vid}.sock")
        self.manifest_path = os.path.join(self.dir, f"{vid}.json")
        self.created = time.time()
        npages = memory_bytes // PAGE_SIZE
        self.ram_fd = os.memfd_create(f"sevmigd-ram:{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, memory_bytes)
        self.state_fd = os.memfd_create(f"sevmigd-state:{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.state_fd, state_size(npages, vcpus))
        self._state_map = mmap.mmap(self.state_fd, state_size(npages, vcpus), flags=mmap.MAP_SHARED)
        self.ram, self.state = shared_ram(self.ram_fd, self._state_map, memory_bytes=memory_bytes, vcpus=vcpus,
                                          init=True)
        self.guest: VmmGuest | None = None
        self.phase = "created"           # created | running | crashed
        self.error: str | None = None
        self._nmi = False   # an NMI injected (`inject_nmi`) and not yet delivered to the guest
        self.launch: dict = {}           # what the daemon shows of the launch (digest, measurement, ...)
        self.handle: int | None = None
        self.asid: int | None = None
        self._quit = trio.Event()
        self._key: bytes | None = None
        try:
            self._sealing_key()
        except Exception as exc:  # noqa: BLE001 - read again when a guest needs it (the error then counts)
            _log("sealing_key_unreadable", error=str(exc))

    # -- files -----------------------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        body = {"id": self.vid, "pid": os.getpid(), "name": self.name, "protocol": self.protocol,
                "sevmigd": __version__, "created": self.created, "memory_bytes": self.memory_bytes,
                "vcpus": self.vcpus, "policy": self.policy, "handle": self.handle, "asid": self.asid}
        tmp = self.manifest_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:   # no fsync: the runtime directory does not outlive a reboot
            json.dump(body, f)
        os.replace(tmp, self.manifest_path)

    def _remove_files(self) -> None:
        for path in (self.sock_path, self.manifest_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- main ------------------------------------------------------------------------------------------
    async def run(self, ready_fd: int | None) -> int:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            await sock.bind(self.sock_path)
        finally:
            os.umask(old)
        os.chmod(self.sock_path, 0o600)
        sock.listen(8)
        listener = trio.SocketListener(sock)
        self._write_manifest()
        _log("vmm_ready", guest=self.name, socket=self.sock_path, memory_bytes=self.memory_bytes,
             protocol=self.protocol)
        if ready_fd is not None:
            try:
                os.write(ready_fd, b"ready\n")
            except OSError as exc:
                # The daemon that started us died before it read this (EPIPE): nobody ever used us and no
                # daemon will (we hold no guest): go, leaving no files that a restarted daemon would list.
                self._remove_files()
                _log("vmm_unused_exit", reason=f"the daemon that started us is gone ({exc.strerror or exc})")
                return 0
            finally:
                os.close(ready_fd)
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._signals, signals)
                    nursery.start_soon(self._vcpu_loop)
                    nursery.start_soon(trio.serve_listeners, self._connection, [listener])
                    await self._quit.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._remove_files()
        _log("vmm_exit", guest=self.name, phase=self.phase)
        return 0

    async def _signals(self, signals) -> None:
        async for signum in signals:
            _log("vmm_signal", signal=signal.Signals(signum).name, action="quit (the guest stops)")
            self._quit.set()

    async def _vcpu_loop(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(VCPU_TICK_S)
            now = trio.current_time()
            dt, last = min(now - last, VCPU_MAX_SLICE_S), now
            if not self.state.vmm_may_run():     # acknowledges a pause between two runs
                continue
            guest = self.guest
            if guest is None or self.phase != "running":
                continue
            try:
                if self._nmi:
                    # The guest kernel panics on an NMI it did not expect (Linux with
                    # kernel.unknown_nmi_panic = 1, the setting kdump tests use with QEMU's inject-nmi).
                    self._nmi = False
                    raise GuestPanic("Kernel panic - not syncing: NMI: Not continuing")
                guest.run(dt)
            except Exception as exc:  # a guest bug ends this guest, never the VMM's socket
                self.phase = "crashed"
                self.error = f"{type(exc).__name__}: {exc}"
                self.state.guest_error = True
                self.state.kernel_running = False
                _log("guest_crashed", error=self.error, traceback=traceback.format_exc())
                continue
            self.state.count_run(dt)

    # -- the socket --------------------------------------------------------------------------------------
    async def _connection(self, stream: trio.SocketStream) -> None:
        dec = p.FrameDecoder()
        try:
            while True:
                data = await stream.receive_some(1 << 16)
                if not data:
                    return
                for msg in dec.feed(data):
                    out, fds = self._handle(msg)
                    frame = p.encode(out)
                    if fds:
                        sent = await stream.socket.sendmsg(
                            [frame], [(stdlib_socket.SOL_SOCKET, stdlib_socket.SCM_RIGHTS, array("i", fds))])
                        if sent < len(frame):
                            await stream.send_all(frame[sent:])
                    else:
                        await stream.send_all(frame)
                    if msg.get("op") == "quit" and out.get("ok"):
                        self._quit.set()
                        return
        except p.VmmProtocolError as exc:
            _log("vmm_protocol_error", error=str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass   # the daemon went away; the guest runs on
        finally:
            await trio.aclose_forcefully(stream)

    def _handle(self, msg: dict) -> tuple[dict, list[int]]:
        mid = msg["id"]
        try:
            op = p.check_request(msg)
            fn = getattr(self, f"_op_{op}")
            result = fn(msg)
            if op == "hello":
                return p.reply(mid, **result), [self.ram_fd, self.state_fd]
            return p.reply(mid, **result), []
        except p.VmmProtocolError as exc:
            return p.error_reply(mid, "VmmProtocolError", str(exc)), []
        except (GuestNotRunning, GuestPanic, ValueError) as exc:
            return p.error_reply(mid, type(exc).__name__, str(exc)), []
        except Exception as exc:  # noqa: BLE001 - one request's failure is its reply, the guest runs on
            _log("request_failed", op=msg.get("op"), error=repr(exc), traceback=traceback.format_exc())
            return p.error_reply(mid, type(exc).__name__, str(exc)), []

    # -- operations ----------------------------------------------------------------------------------
    def _status(self) -> dict:
        return {"protocol": self.protocol, "sevmigd": __version__, "pid": os.getpid(), "name": self.name,
                "vmm_id": self.vid, "memory_bytes": self.memory_bytes, "vcpus": self.vcpus, "policy": self.policy,
                "phase": self.phase, "error": self.error, "handle": self.handle, "asid": self.asid,
                "launch": self.launch, "created": self.created, "runs": self.state.runs,
                "run_ns": self.state.run_ns}

    def _op_hello(self, msg: dict) -> dict:
        _log("vmm_hello", daemon_protocol=msg.get("protocol"), daemon_version=msg.get("sevmigd"))
        return self._status()

    def _op_status(self, msg: dict) -> dict:
        return self._status()

    def _op_inject_nmi(self, msg: dict) -> dict:
        """QEMU's `inject-nmi`: an NMI to the guest's vCPU 0 at its next run (its kernel panics on it)."""
        self._running_guest()
        self._nmi = True
        return {}

    def _op_bind(self, msg: dict) -> dict:
        """An incoming guest's PSP handle and ASID (RECEIVE_START ran in the daemon): into the manifest."""
        if self.guest is not None:
            raise GuestPanic(f"guest {self.name}: already running")
        self.handle, self.asid = p.arg(msg, "handle", int), p.arg(msg, "asid", int)
        self._write_manifest()
        return {}

    def _sealing_key(self, fresh: bool = False) -> bytes:
        """The runtime directory's PSP sealing key (the CPU reading its own key-slot hardware): read once at
        start, so opening a key slot costs no file read (it is on the hand-off's critical path after
        RECEIVE_FINISH); read again when a slot does not open with it (a replaced key)."""
        if fresh or self._key is None:
            self._key = read_sealing_key(self.runtime_dir)
        return self._key

    def _new_guest(self, msg: dict) -> VmmGuest:
        if self.guest is not None:
            raise GuestPanic(f"guest {self.name}: already running in this VMM")
        handle, asid = p.arg(msg, "handle", int), p.arg(msg, "asid", int)
        kw = dict(name=self.name, memory_bytes=self.memory_bytes, policy=self.policy, handle=handle, asid=asid,
                  vcpus=self.vcpus, ram=self.ram, state=self.state, key_slot=p.arg(msg, "key_slot", bytes))
        try:
            guest = VmmGuest(**kw, sealing_key=self._sealing_key())
        except SealError:
            guest = VmmGuest(**kw, sealing_key=self._sealing_key(fresh=True))
        self.handle, self.asid = handle, asid
        return guest

    def _op_boot(self, msg: dict) -> dict:
        """After LAUNCH_FINISH: the guest firmware and kernel boot (prefill included)."""
        guest = self._new_guest(msg)
        cfg = guest_config(p.arg(msg, "config", dict))
        guest.secret_gpa = p.arg(msg, "secret_gpa", int)
        guest.boot_kernel(cfg, p.arg(msg, "entropy", bytes))
        self.launch = p.arg(msg, "launch", dict)
        self.guest, self.phase = guest, "running"
        self._write_manifest()   # now with the handle: a daemon finding us dead decommissions it
        _log("guest_booted", handle=guest.handle, asid=guest.asid)
        return self._status()

    def _op_resume_incoming(self, msg: dict) -> dict:
        """After RECEIVE_FINISH: the kernel resumes from what the migration wrote (the host resumes the vCPUs)."""
        guest = self._new_guest(msg)
        guest.resume_kernel()
        self.guest, self.phase = guest, "running"
        self._write_manifest()
        _log("guest_resumed_incoming", handle=guest.handle, asid=guest.asid)
        return self._status()

    def _running_guest(self) -> VmmGuest:
        if self.guest is None or self.phase != "running":
            raise GuestNotRunning(f"guest {self.name}: {self.phase}" + (f" ({self.error})" if self.error else ""))
        return self.guest

    def _op_verify(self, msg: dict) -> dict:
        report = self._running_guest().verify()
        return {"pages_checked": int(report.pages_checked), "mismatches": [int(x) for x in report.mismatches]}

    def _op_guest_write(self, msg: dict) -> dict:
        self._running_guest().agent.write(p.arg(msg, "gpa", int), p.arg(msg, "data", bytes),
                                          shared=p.arg(msg, "shared", bool))
        return {}

    def _op_guest_read(self, msg: dict) -> dict:
        data = self._running_guest().agent.read(p.arg(msg, "gpa", int), p.arg(msg, "length", int))
        return {"data": bytes(data)}

    def _op_guest_secret(self, msg: dict) -> dict:
        entries = self._running_guest().agent.launch_secret()
        return {"entries": None if entries is None else [[str(g), bytes(d)] for g, d in entries]}

    def _op_reboot(self, msg: dict) -> dict:
        self._running_guest().reboot()
        return self._status()

    def _op_quit(self, msg: dict) -> dict:
        _log("vmm_quit", guest=self.name)
        return {}


def main(args) -> int:
    """`sevmigd vmm` (argparse namespace from cli/vmm.py)."""
    vmm = Vmm(runtime_dir=args.runtime_dir, vid=args.id, name=args.name, memory_bytes=args.memory,
              vcpus=args.vcpus, policy=args.policy, protocol=args.protocol)
    return trio.run(vmm.run, args.ready_fd)


__all__ = ["Vmm", "main"]
