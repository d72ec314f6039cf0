"""Real `sevmigd serve` subprocesses for the fault tests and the `make faults` matrix.

`tests/daemon_helpers.py` serves the ordinary tests (pytest fixtures, sync); the fault harness needs
more, and must also run outside pytest (`python -m sevmigd.bench.faults`), so it has its own small
launcher here:

* `Fleet()`: one fleet CA for a run (every daemon of the fleet trusts the others).
* `DaemonProc.start(fleet, root, name, config=..., netns=...)`: a daemon with its own state dir and a
  short private control socket; returns once its `ready` log line was read (no sleeps: a reader thread
  parses the JSON log lines, stamping each with `time.monotonic()` on arrival, so a test can measure
  when a daemon *logged* a failure). `restart()` starts it again on the same state dir and the same
  migration port (a host coming back after a crash); `kill()`, `stop()` (SIGSTOP), `cont()`.
* `await d.call(verb, args, on_event=...)`: an async control client (JSON lines on the unix socket,
  PROTOCOL of sevmigd/daemon/control.py) so a trio harness needs no threads; `ControlFailed` carries the
  error class and text of an error reply.
* Leak probes that need nothing from the daemon: `open_fds()` (/proc/PID/fd), `rss_bytes()`.

Must never: leave a process or a directory behind (`cleanup()`), or touch anything outside its root
and its /tmp socket dir.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import trio

# Deadlines (never sleeps): a 2-core box shared with other work starts a daemon in well under this.
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
# Test fleets use 2048-bit RSA for ARK/ASK (Naples size; 4096 is slow to generate).
TEST_RSA_BITS = 2048
# Bytes of one control reply line we accept (a status is a few KiB).
MAX_LINE = 16 << 20


class ControlFailed(Exception):
    """An error reply from the control socket (class + desc), or a lost control connection."""

    def __init__(self, error_class: str, desc: str):
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class Fleet:
    """A fleet CA: daemons whose platforms it issued trust each other."""

    def __init__(self):
        from sevmigd.psp.identity import FleetCA

        self.ca = FleetCA.create(os.urandom, rsa_bits=TEST_RSA_BITS)

    def make_state_dir(self, state_dir: pathlib.Path) -> None:
        from sevmigd import store
        from sevmigd.psp.identity import PlatformIdentity

        identity = PlatformIdentity.create(self.ca, os.urandom)
        store.save_platform(state_dir, identity, trusted_ark=self.ca.ark)


def _toml(values: dict[str, Any]) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        raise TypeError(v)
    return "".join(f"{k} = {val(v)}\n" for k, v in values.items())


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (thread) dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                        "WATCHDOG_PID", "SEVMIGD_CONTROL", "STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DaemonProc:
    """One `sevmigd serve` subprocess (see the module docstring)."""

    def __init__(self, root: pathlib.Path, name: str, *, config: dict | None = None,
                 host: str = "127.0.0.1", netns: list[str] | None = None):
        self.root = pathlib.Path(root)
        self.name = name
        self.config = dict(config or {})
        self.host = host
        self.netns = list(netns or [])
        self.state_dir = self.root / f"{name}-state"
        self.sock_dir = tempfile.mkdtemp(prefix="smgf-", dir="/tmp")
        self.control = os.path.join(self.sock_dir, "control.sock")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.logs: list[dict] = []     # every JSON log line of every incarnation, with "_t" = arrival time
        self.raw: list[str] = []
        self.starts = 0
        self.killed = False
        self._cond = threading.Condition()
        self._eof = True
        self._mark = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    @classmethod
    def start(cls, fleet: Fleet, root: pathlib.Path, name: str, **kw) -> "DaemonProc":
        """Create the state dir, spawn, wait until ready (blocking: call it from a worker thread in trio
        code only through `astart`, so the process is forked by the long-lived main thread)."""
        d = cls.prepare(fleet, root, name, **kw)
        d.spawn()
        d.wait_ready()
        return d

    @classmethod
    def prepare(cls, fleet: Fleet, root: pathlib.Path, name: str, **kw) -> "DaemonProc":
        d = cls(root, name, **kw)
        d.state_dir.mkdir(parents=True, exist_ok=True)
        fleet.make_state_dir(d.state_dir)
        return d

    @classmethod
    async def astart(cls, fleet: Fleet, root: pathlib.Path, name: str, **kw) -> "DaemonProc":
        d = await trio.to_thread.run_sync(lambda: cls.prepare(fleet, root, name, **kw))
        d.spawn()
        await trio.to_thread.run_sync(d.wait_ready)
        return d

    async def arestart(self) -> None:
        """restart() for trio code: fork from the event loop's thread (see spawn), wait in a worker."""
        await trio.to_thread.run_sync(self.kill)
        self.killed = False
        self.spawn()
        await trio.to_thread.run_sync(self.wait_ready)

    def _spawn(self) -> None:
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Fork the daemon. It gets SIGKILL when the forking thread dies (PR_SET_PDEATHSIG), so a killed
        harness never leaves daemons behind: fork from a thread that lives as long as the harness."""
        cfg_path = self.root / f"{self.name}.toml"
        cfg_path.write_text(_toml(self.config))
        cmd = [*self.netns, sys.executable, "-m", "sevmigd", "serve", "--state-dir", str(self.state_dir),
               "--control", self.control, "--listen", f"{self.host}:{self.port}", "--log-format", "json",
               "--log-level", "info", "--config", str(cfg_path)]
        if os.path.exists(self.control):
            os.unlink(self.control)  # a stale socket of a killed incarnation
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=_child_env(),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        with self._cond:
            self._eof = False
            self._mark = len(self.logs)
        threading.Thread(target=self._reader, args=(self.proc,), daemon=True).start()

    def wait_ready(self) -> None:
        ready = self.wait_log(lambda d: d.get("event") == "ready", start=self._mark, timeout=READY_TIMEOUT_S)
        self.port = int(ready["listen"].rsplit(":", 1)[1])

    def _reader(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            with self._cond:
                self.raw.append(line)
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    obj["_t"] = now
                    self.logs.append(obj)
                self._cond.notify_all()
        with self._cond:
            if proc is self.proc:
                self._eof = True
            self._cond.notify_all()

    def wait_log(self, pred: Callable[[dict], bool], *, start: int = 0, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.logs):
                    if pred(self.logs[i]):
                        return self.logs[i]
                    i += 1
                if self._eof:
                    raise RuntimeError(f"daemon {self.name} exited (rc={self.proc.poll() if self.proc else None}) "
                                       f"while waiting for a log line:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"daemon {self.name}: no such log line within {timeout} s:\n{self.tail()}")
                self._cond.wait(left)

    def find_logs(self, pred: Callable[[dict], bool], start: int = 0) -> list[dict]:
        with self._cond:
            return [d for d in self.logs[start:] if pred(d)]

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "".join(self.raw[-n:])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.killed and self.proc.poll() is None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL (a crashed host) and reap."""
        self.killed = True
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(STOP_TIMEOUT_S)

    def kill_nowait(self) -> None:
        """SIGKILL without waiting (callable from inside an event loop, e.g. a FaultProxy action)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.killed = True

    def stop(self) -> None:
        """SIGSTOP: the process is frozen, its sockets stay open (a hung host)."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        if self.alive:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Start again after kill(): same state dir (platform identity), same migration port."""
        self.kill()
        self.killed = False
        self._spawn()

    def terminate(self) -> int | None:
        if self.proc is None:
            return None
        if self.alive:
            self.cont()
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def cleanup(self) -> None:
        try:
            self.terminate()
        finally:
            self.kill()
            if self.proc is not None and self.proc.stdout is not None:
                self.proc.stdout.close()
            shutil.rmtree(self.sock_dir, ignore_errors=True)

    # -- probes ----------------------------------------------------------------------------------------------
    def open_fds(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except (OSError, TypeError):
            return None

    def rss_bytes(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, TypeError):
            return None
        return None

    # -- control (async) -------------------------------------------------------------------------------------
    async def call(self, verb: str, args: dict | None = None, *, on_event=None, timeout: float = 120.0) -> dict:
        """One control request; returns its `return` dict or raises ControlFailed."""
        with trio.fail_after(timeout):
            try:
                stream = await trio.open_unix_socket(self.control)
            except OSError as exc:
                raise ControlFailed("DaemonNotRunning", f"{self.name}: {exc.strerror or exc}") from None
            async with stream:
                req = {"execute": verb, "id": 1}
                if args:
                    req["arguments"] = args
                try:
                    await stream.send_all(json.dumps(req).encode() + b"\n")
                except (trio.BrokenResourceError, OSError) as exc:
                    raise ControlFailed("ConnectionLost", str(exc)) from None
                buf = bytearray()
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        try:
                            chunk = await stream.receive_some(1 << 16)
                        except (trio.BrokenResourceError, OSError) as exc:
                            raise ControlFailed("ConnectionLost", str(exc)) from None
                        if not chunk:
                            raise ControlFailed("ConnectionLost", f"{self.name} closed the control connection")
                        buf += chunk
                        if len(buf) > MAX_LINE:
                            raise ControlFailed("ConnectionLost", "reply too large")
                        continue
                    line, buf = bytes(buf[:nl]), buf[nl + 1:]
                    msg = json.loads(line)
                    if "event" in msg:
                        if on_event is not None:
                            on_event(msg["event"], msg.get("data") or {})
                        continue
                    if "return" in msg:
                        return msg["return"]
                    if "error" in msg:
                        err = msg["error"]
                        raise ControlFailed(str(err.get("class")), str(err.get("desc")))

    async def try_call(self, verb: str, args: dict | None = None, **kw) -> tuple[dict | None, str | None]:
        """(reply, None) or (None, error text): for probes that must not raise."""
        try:
            return await self.call(verb, args, **kw), None
        except ControlFailed as exc:
            return None, str(exc)
        except trio.TooSlowError:
            return None, f"{self.name}: control request {verb} timed out"


__all__ = ["Fleet", "DaemonProc", "ControlFailed"]
