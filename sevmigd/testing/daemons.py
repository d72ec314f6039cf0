"""Real `sevmigd serve` subprocesses: the one launcher of the tests, the fault matrix (`make faults`), the
demo (`make demo`) and the migration benchmark.

What it gives you (the pytest fixtures that wrap it are in tests/conftest.py):

* Fleets. `fleet(name="fleet")` is the process-wide fleet CA of that name (every daemon started on it
  trusts the others); `Fleet()` is a brand-new one. `make_state_dir(path, fleet, trust=[...])` writes a
  platform identity issued by `fleet` that trusts its own ARK plus the ARKs of the fleets in `trust`.
* `write_config(path, values)`: the one TOML writer (flat keys plus one level of tables, e.g. `tls`).
* `start_daemon(root, name, ...) -> DaemonProcess` (or `await astart_daemon(...)` from trio code): a
  daemon with its own work dir `root/name` (state dir, config file, notify socket), a control socket in
  a short private /tmp dir (sun_path is limited to 107 bytes) unless `control=` names one, the migration
  listener on 127.0.0.1 port 0. Returns once the daemon logged its `ready` line (listener and control
  socket accepting); `wait=False` returns at once (e.g. under systemd-socket-activate, which starts the
  daemon on the first connection). `launcher=[...]` prefixes the command (`ip netns exec NS`,
  `systemd-socket-activate ...`, a sandbox); `notify=True` binds a NOTIFY_SOCKET and records what the
  daemon tells systemd (`messages`, `wait_notify`).
* `DaemonProcess`: output is read by threads as it comes (`logs`: JSON log lines, each stamped with its
  arrival `time.monotonic()` under the key `_t`, and under `_t_emit` when the daemon wrote it, on the same
  clock: `_t` less the line's age by its `timestamp`; `raw_stdout`, `raw_stderr`, `output()`); waits are
  deadlines on a condition, never sleeps: `wait_for_log`, `wait_output`, `wait_notify`.
  Control: `execute(verb, {args} | **args)` in-process (sevmigd.daemon.client.ControlClient),
  `await call(verb, ...)` from trio code without threads, `ctl(*argv)` / `ctl_json(*argv)` / `await actl(*argv)` run
  `sevmigd ctl` as a user does. Lifecycle: `terminate()` (SIGTERM, exit status), `send_signal`, `kill()`
  (a crashed host), `kill_nowait()`, `freeze()` / `thaw()` (SIGSTOP/SIGCONT, a hung host), `restart()`
  (same state dir and migration port), `stop()` (SIGTERM, SIGKILL after a deadline, never raises),
  `cleanup()` (always safe). Probes: `open_fds()`, `rss_bytes()`, `peak_rss_mib()`. `log_file=` also
  appends everything the daemon prints to a file.
  `BackgroundMigration(src, name, to)`: a `migrate` request running in a thread while the test acts.
* `call_control(path, verb, args)`: the async control client, sharing its protocol code with
  ControlClient. Errors are the client's: `ControlError` (an error reply), `DaemonNotRunning`,
  `ConnectionLost`, all `ControlFailure`.

Rules kept here: loopback and port 0 unless told otherwise; every wait has a deadline and fails with the
daemon's output attached; a daemon dies with the thread that forked it (PR_SET_PDEATHSIG), so fork from a
long-lived thread (the event loop's, in trio code: `astart_daemon` does); `cleanup()` leaves no process,
socket or directory behind.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import trio

from sevmigd import store
from sevmigd.daemon.config import default_runtime_dir
from sevmigd.daemon.client import (ConnectionLost, ControlClient, ControlError, ControlFailure, DaemonNotRunning,
                                   MAX_REPLY_BYTES, encode_request, read_reply_line)
from sevmigd.psp.identity import FleetCA, PlatformIdentity

# Deadlines, never sleeps: generous for a loaded 2-core machine shared with other work.
READY_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# Test fleets use 2048-bit RSA for the ARK/ASK (Naples size; 4096 is slow to generate).
TEST_RSA_BITS = 2048
# Environment a daemon must not inherit from the test runner (it would think systemd started it).
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
                "SEVMIGD_CONTROL", "STATE_DIRECTORY", "RUNTIME_DIRECTORY")

LogPredicate = Callable[[dict], bool]


# Every runtime directory a harness daemon was started with in this process: VMMs outlive daemons by design,
# so a test run ends by looking for VMMs still running in one of them (leaked_vmms, tests/conftest.py).
_RUNTIME_DIRS: set[str] = set()


def leaked_vmms() -> list[tuple[int, str]]:
    """(pid, runtime dir) of each `sevmigd vmm` still running in a runtime directory this process's harness
    daemons used: a test that did not clean up after itself. Other runs' VMMs (another checkout's tests on the
    same machine) are not ours and are not listed."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in
                    pathlib.Path("/proc", entry, "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "vmm" in argv and "--runtime-dir" in argv[:-1]:
            rdir = argv[argv.index("--runtime-dir") + 1]
            if rdir in _RUNTIME_DIRS:
                found.append((int(entry), rdir))
    return found


class DaemonStartError(AssertionError):
    """The daemon exited, or did not log what was awaited in time (the message carries its output)."""


# ----------------------------------------------------------------------------------------- fleets


class Fleet:
    """A fleet CA: daemons whose platforms it issued trust each other."""

    def __init__(self, name: str = "fleet"):
        self.name = name
        self.ca = FleetCA.create(os.urandom, rsa_bits=TEST_RSA_BITS)

    def make_state_dir(self, state_dir: os.PathLike | str, *, trust: Sequence[FleetRef] = ()) -> PlatformIdentity:
        return make_state_dir(state_dir, self, trust=trust)


FleetRef = Union[Fleet, str]
_fleets: dict[str, Fleet] = {}
_fleets_lock = threading.Lock()


def fleet(name: str = "fleet") -> Fleet:
    """The fleet of that name, created once per process (so every test of a session can share it)."""
    with _fleets_lock:
        if name not in _fleets:
            _fleets[name] = Fleet(name)
        return _fleets[name]


def _fleet_of(ref: FleetRef | None) -> Fleet:
    if ref is None:
        return fleet()
    return fleet(ref) if isinstance(ref, str) else ref


def make_state_dir(state_dir: os.PathLike | str, fleet_ref: FleetRef | None = None, *,
                   trust: Sequence[FleetRef] = ()) -> PlatformIdentity:
    """Write a fresh platform identity issued by `fleet_ref` (default: the shared fleet) into `state_dir`,
    trusting its ARK and the ARKs of the fleets in `trust`. Returns the identity."""
    from sevmigd.testing.pki import provision

    f = _fleet_of(fleet_ref)
    # platform, its fleet root trusted, and the TLS identity `platform init` writes (a certificate naming
    # its chip; the TLS CAs of its fleet and of every trusted fleet)
    return provision(state_dir, f.ca, trust=[_fleet_of(other).ca for other in trust])


# ------------------------------------------------------------------------------------------ config


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, os.PathLike)):
        return json.dumps(os.fspath(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: os.PathLike | str, values: Mapping[str, object]) -> pathlib.Path:
    """Write `values` as a TOML config file: flat keys, plus one level of tables ({"tls": {...}})."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, Mapping)]
    for name, table in values.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    p = pathlib.Path(path)
    p.write_text("\n".join(lines) + "\n")
    return p


# ------------------------------------------------------------------------------------------ control


async def call_control(path: str, verb: str, args: dict | None = None, *,
                       on_event: Callable[[str, dict], None] | None = None,
                       timeout: float = CTL_TIMEOUT_S) -> dict:
    """One control request from trio code: the `return` dict, or ControlError / DaemonNotRunning /
    ConnectionLost (trio.TooSlowError after `timeout`)."""
    with trio.fail_after(timeout):
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise DaemonNotRunning(path, exc.strerror or str(exc)) from None
        async with stream:
            try:
                await stream.send_all(encode_request(verb, args, 1))
            except (trio.BrokenResourceError, OSError) as exc:
                raise ConnectionLost(f"cannot send to the daemon: {exc}") from None
            buf = bytearray()
            while True:
                nl = buf.find(b"\n")
                if nl >= 0:
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    reply = read_reply_line(line, on_event)
                    if reply is not None:
                        return reply
                    continue
                if len(buf) > MAX_REPLY_BYTES:
                    raise ConnectionLost("reply from the daemon is too large")
                try:
                    chunk = await stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise ConnectionLost(f"connection to the daemon failed: {exc}") from None
                if not chunk:
                    raise ConnectionLost("the daemon closed the connection before replying (stopped or crashed)")
                buf += chunk


# ------------------------------------------------------------------------------------------ process


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that forked it dies (no orphaned daemons)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _read_lag(record: dict, wall: float) -> float:
    """How long ago (s) the daemon wrote a log line that reached us at wall-clock `wall`: its own UTC ISO
    `timestamp` against ours (0 without one). On a loaded machine the pipe and this reader thread add up
    to seconds; a detection bound is about when the daemon logged, not when we read it."""
    ts = record.get("timestamp")
    if not isinstance(ts, str):
        return 0.0
    try:
        t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if t.tzinfo is None:
        return 0.0
    return min(max(0.0, wall - t.timestamp()), 60.0)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test runner's environment without systemd's variables, unbuffered output, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class DaemonProcess:
    """One `sevmigd serve` subprocess and everything it printed (see the module docstring)."""

    def __init__(self, root: os.PathLike | str, name: str = "d", *, state_dir: os.PathLike | str | None = None,
                 listen: str | None = "127.0.0.1:0", control: str | None = None, config: Mapping | None = None,
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None, launcher: Sequence[str] = (),
                 log_level: str = "debug", notify: bool = False, owns_root: bool = False,
                 log_file: os.PathLike | str | None = None):
        if log_level not in ("debug", "info"):
            raise ValueError("readiness is detected from the info-level 'ready' log line: use debug or info")
        self.root = pathlib.Path(root)
        self.name = name
        self.workdir = self.root / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = pathlib.Path(state_dir) if state_dir is not None else self.workdir / "state"
        self._sock_dir: str | None = None
        if control is None:
            self._sock_dir = tempfile.mkdtemp(prefix="smgd-", dir="/tmp")
            control = os.path.join(self._sock_dir, "control.sock")
        self.control = control
        self.listen_arg = listen
        self.config = dict(config or {})
        self.extra_args = list(args)
        self.env = dict(env or {})
        self.launcher = list(launcher)
        self.log_level = log_level
        self._owns_root = owns_root
        self._log_file = open(log_file, "a") if log_file is not None else None
        self.proc: subprocess.Popen | None = None
        self.ready: dict | None = None
        self.address: str | None = None   # HOST:PORT the listener is bound to (pass it as `migrate --to`)
        self.logs: list[dict] = []        # parsed JSON log lines of every incarnation, with "_t"
        self.raw_stdout: list[str] = []
        self.raw_stderr: list[str] = []
        self.messages: list[dict[str, str]] = []   # sd_notify messages (notify=True)
        self.starts = 0
        self.killed = False
        self._cond = threading.Condition()
        self._eof = True
        self._mark = 0
        self._notify_mark = 0
        self._threads: list[threading.Thread] = []
        self.notify_path: str | None = None
        self._notify: socket.socket | None = None
        if notify:
            self.notify_path = str(self.workdir / "notify.sock")
            if os.path.exists(self.notify_path):
                os.unlink(self.notify_path)
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(self.notify_path)
            self._notify.settimeout(0.5)
            threading.Thread(target=self._read_notify, daemon=True).start()

    # -- lifecycle --------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [*self.launcher, sys.executable, "-m", "sevmigd", "serve", "--state-dir", str(self.state_dir),
               "--control", self.control, "--log-format", "json", "--log-level", self.log_level]
        if self._sock_dir is not None:   # short, private, kept across restart(): VMM sockets live there
            cmd += ["--runtime-dir", os.path.join(self._sock_dir, "run")]
        if self.listen_arg is not None:
            cmd += ["--listen", self.listen_arg]
        if self.config:
            cmd += ["--config", str(write_config(self.workdir / "sevmigd.toml", self.config))]
        return cmd + self.extra_args

    def spawn(self) -> None:
        """Fork the daemon (it dies with the forking thread: see the module docstring)."""
        if os.path.exists(self.control) and self._sock_dir is not None:
            os.unlink(self.control)  # a stale socket of a killed incarnation
        env = dict(self.env)
        if self.notify_path is not None:
            env.setdefault("NOTIFY_SOCKET", self.notify_path)
        _RUNTIME_DIRS.add(self.runtime_dir)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env(env), cwd=self.workdir,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        self.killed = False
        with self._cond:
            self._eof = False
            self._mark = len(self.logs)
            self._notify_mark = len(self.messages)
        self._threads = [threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True),
                         threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True)]
        for t in self._threads:
            t.start()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        """Until this incarnation logged `ready` (and, with notify=True, sent READY=1); records the bound
        address (a restart reuses its port)."""
        self.ready = self.wait_for_log("ready", timeout=timeout, start=self._mark)
        if self.notify_path is not None:
            self.wait_notify(lambda m: m.get("READY") == "1", timeout, since=self._notify_mark)
        self.address = self.ready["listen"]
        if self.listen_arg is not None:
            self.listen_arg = self.address
        return self.ready

    def restart(self) -> None:
        """Start again after kill(): same state dir (platform identity), same migration port. An incarnation
        that does not get ready is killed before the error propagates: never a half-started daemon that
        `alive` calls running while it has no control socket (spawn() removed the old one)."""
        self.kill()
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise

    async def arestart(self) -> None:
        """restart() for trio code: fork from the event loop's thread, wait in a worker thread (a
        cancellation kills the new incarnation too, shielded, as a failed wait does)."""
        await trio.to_thread.run_sync(self.kill)
        self.spawn()
        try:
            await trio.to_thread.run_sync(self.wait_ready)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.kill)
            raise

    async def serving(self, timeout: float = 30.0) -> str | None:
        """None when this daemon runs and answers a control request (server-info) within `timeout`; else
        why not. A live process is not enough: between spawn() and `ready`, or once a stopping or
        crashing daemon removed its control socket and has not exited yet, it runs and serves nothing."""
        if not self.alive:
            rc = self.proc.poll() if self.proc is not None else None
            return f"daemon {self.name} is not running (killed={self.killed}, rc={rc})"
        _, err = await self.try_call("server-info", timeout=timeout)
        if err is None:
            return None
        sock = "present" if os.path.exists(self.control) else "missing"
        return f"{err} (process {self.pid} running, control socket {sock})"

    def state_line(self) -> str:
        """One line: incarnations, process state, control socket, the last stderr line (a traceback's end)."""
        rc = self.proc.poll() if self.proc is not None else None
        sock = "present" if os.path.exists(self.control) else "missing"
        with self._cond:
            last_err = self.raw_stderr[-1].strip() if self.raw_stderr else ""
        return (f"daemon {self.name}: starts={self.starts} killed={self.killed} rc={rc} control socket {sock}"
                + (f"; stderr: {last_err[:300]}" if last_err else ""))

    def describe(self, tail: int = 20) -> str:
        """state_line() and the last `tail` output lines: what a harness error should show."""
        return f"{self.state_line()}\n{self.output(max(1, tail))}"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """A graceful stop that never raises: SIGTERM (after SIGCONT), SIGKILL if it has not exited within
        `timeout`. Returns the exit status (None if never started)."""
        if self.proc is None:
            return None
        self.thaw()
        self.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._join()
        return self.proc.returncode

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (after SIGCONT, in case it is frozen) and the exit status; AssertionError with the
        output if it does not exit in time."""
        assert self.proc is not None
        self.thaw()
        self.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon {self.name} did not exit within {timeout} s of SIGTERM:\n"
                                 f"{self.output()}") from None
        self._join()
        return rc

    def kill(self) -> None:
        """SIGKILL (a crashed host) and reap."""
        self.killed = True
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
            self._join()

    def kill_nowait(self) -> None:
        """SIGKILL without waiting (callable from inside an event loop, e.g. a FaultProxy action)."""
        self.killed = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def freeze(self) -> None:
        """SIGSTOP: the process is frozen, its sockets stay open (a hung host)."""
        if self.alive:
            self.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.alive:
            self.send_signal(signal.SIGCONT)

    @property
    def runtime_dir(self) -> str:
        """The runtime directory this daemon uses (kept across restart()): the one the harness gave it, else the
        one its command line, config or environment chooses, resolved as the daemon resolves it. Teardown
        finds the VMM processes to reap there, so a test that picks its own control socket (the sandboxed
        unit test) must not leave its VMMs running behind it."""
        if self._sock_dir is not None:
            return os.path.join(self._sock_dir, "run")
        if "--runtime-dir" in self.extra_args[:-1]:
            return self.extra_args[self.extra_args.index("--runtime-dir") + 1]
        if self.config.get("runtime_dir"):
            return str(self.config["runtime_dir"])
        return default_runtime_dir(self.control, {**os.environ, **self.env})

    def vmm_manifests(self) -> dict[str, dict]:
        """{guest name: manifest} of the VMM processes in this daemon's runtime directory (vmm = "process")."""
        out: dict[str, dict] = {}
        for path in sorted(pathlib.Path(self.runtime_dir, "vmm").glob("*.json")):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            out[str(info.get("name"))] = info
        return out

    def kill_vmms(self) -> None:
        """SIGKILL every VMM process of this daemon's runtime directory (they outlive the daemon by design;
        a test's end must not leave them behind). Only processes that are still a `sevmigd vmm`."""
        for info in self.vmm_manifests().values():
            pid = info.get("pid")
            if not isinstance(pid, int):
                continue
            try:
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vmm" in cmdline and b"--runtime-dir" in cmdline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> None:
        """Kill if still running (and its VMM processes); close pipes and sockets; remove the socket dir (and
        the root if ours)."""
        self.kill()
        self.kill_vmms()
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _join(self) -> None:
        for t in self._threads:
            t.join(STOP_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.killed and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def host(self) -> str:
        assert self.address is not None, "the daemon has not logged `ready` yet"
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        assert self.address is not None, "the daemon has not logged `ready` yet"
        return int(self.address.rsplit(":", 1)[1])

    # -- output ------------------------------------------------------------------------------------------
    def _read_stdout(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now, wall = time.monotonic(), time.time()
            with self._cond:
                self.raw_stdout.append(line)
                self._copy_to_log(line)
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    obj["_t"] = now
                    obj["_t_emit"] = now - _read_lag(obj, wall)
                    self.logs.append(obj)
                self._cond.notify_all()
        with self._cond:
            if proc is self.proc:
                self._eof = True
            self._cond.notify_all()

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._cond:
                self.raw_stderr.append(line)
                self._copy_to_log(line)
                self._cond.notify_all()

    def _copy_to_log(self, line: str) -> None:
        if self._log_file is not None:
            self._log_file.write(line)
            self._log_file.flush()

    def _read_notify(self) -> None:
        while (sock := self._notify) is not None:
            try:
                data = sock.recv(65536).decode(errors="replace")
            except TimeoutError:
                continue
            except OSError:
                return
            msg = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def output(self, tail: int | None = None) -> str:
        """What the daemon printed so far (stdout, then stderr; the last `tail` lines of each)."""
        with self._cond:
            out, err = self.raw_stdout, self.raw_stderr
            if tail is not None:
                out, err = out[-tail:], err[-tail:]
            return "".join(out) + "".join(err)

    def _wait(self, what: str, find: Callable[[], object], timeout: float, *, on_exit: bool = True) -> object:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = find()
                if found is not None:
                    return found
                if on_exit and self._eof:
                    rc = self.proc.poll() if self.proc is not None else None
                    raise DaemonStartError(f"daemon {self.name} exited (rc={rc}) before {what}:\n"
                                           f"{self.output(200)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonStartError(f"daemon {self.name}: no {what} within {timeout} s:\n{self.output(200)}")
                self._cond.wait(min(left, 1.0))

    def wait_for_log(self, event: str | LogPredicate, timeout: float = READY_TIMEOUT_S, start: int = 0) -> dict:
        """The first log line (from index `start`) whose event is `event` (or that the predicate accepts)."""
        pred = event if callable(event) else (lambda d: d.get("event") == event)
        found = self._wait(f"log line {event!r}", lambda: next((r for r in self.logs[start:] if pred(r)), None),
                           timeout)
        assert isinstance(found, dict)
        return found

    def find_logs(self, pred: LogPredicate, start: int = 0) -> list[dict]:
        with self._cond:
            return [r for r in self.logs[start:] if pred(r)]

    def wait_output(self, pred: Callable[[str], bool], *, stream: str = "stderr",
                    timeout: float = READY_TIMEOUT_S) -> str:
        """The first raw line of `stream` ("stdout"/"stderr", e.g. a launcher's) that `pred` accepts."""
        lines = self.raw_stderr if stream == "stderr" else self.raw_stdout
        found = self._wait(f"{stream} line", lambda: next((x for x in lines if pred(x)), None), timeout,
                           on_exit=False)
        assert isinstance(found, str)
        return found

    def wait_notify(self, pred: Callable[[dict[str, str]], bool], timeout: float = READY_TIMEOUT_S, *,
                    since: int = 0) -> dict[str, str]:
        """The first sd_notify message (index >= `since` in `messages`) that `pred` accepts."""
        assert self.notify_path is not None, "start the daemon with notify=True"
        found = self._wait("such sd_notify message",
                           lambda: next((m for m in self.messages[since:] if pred(m)), None), timeout)
        assert isinstance(found, dict)
        return found

    # -- control -----------------------------------------------------------------------------------------
    def client(self, timeout: float | None = CTL_TIMEOUT_S) -> ControlClient:
        return ControlClient(self.control, timeout=timeout)

    def execute(self, verb: str, args: dict | None = None, /, *, on_event: Callable[[str, dict], None] | None = None,
                timeout: float | None = CTL_TIMEOUT_S, **kwargs: object) -> dict:
        """One control request in-process: `execute("launch", {"name": "g"})` or `execute("launch", name="g")`.
        Raises sevmigd.daemon.client.ControlError on an error reply."""
        with self.client(timeout) as c:
            return c.execute(verb, {**(args or {}), **kwargs} or None, on_event=on_event)

    async def call(self, verb: str, args: dict | None = None, /, *,
                   on_event: Callable[[str, dict], None] | None = None,
                   timeout: float = CTL_TIMEOUT_S, **kwargs: object) -> dict:
        """execute() for trio code (no thread): see call_control."""
        return await call_control(self.control, verb, {**(args or {}), **kwargs} or None, on_event=on_event,
                                  timeout=timeout)

    async def try_call(self, verb: str, args: dict | None = None, /, **kw: object) -> tuple[dict | None, str | None]:
        """(reply, None) or (None, error text): for probes that must not raise."""
        try:
            return await self.call(verb, args, **kw), None  # type: ignore[arg-type]
        except ControlFailure as exc:
            return None, f"{self.name}: {exc}"
        except trio.TooSlowError:
            return None, f"{self.name}: control request {verb} timed out"

    def ctl(self, *argv: object, timeout: float = CTL_TIMEOUT_S, check: bool = False) -> subprocess.CompletedProcess:
        """Run `sevmigd ctl --control PATH *argv` as a user would (text output captured)."""
        cmd = [sys.executable, "-m", "sevmigd", "ctl", "--control", self.control, *map(str, argv)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}{res.stderr}")
        return res

    async def actl(self, *argv: object, timeout: float = CTL_TIMEOUT_S,
                   check: bool = False) -> subprocess.CompletedProcess:
        """ctl() for trio code (the subprocess is waited for in a worker thread)."""
        return await trio.to_thread.run_sync(lambda: self.ctl(*argv, timeout=timeout, check=check))

    def ctl_json(self, *argv: object, timeout: float = CTL_TIMEOUT_S) -> object:
        """`ctl *argv --json`, checked, parsed."""
        return json.loads(self.ctl(*argv, "--json", timeout=timeout, check=True).stdout)

    def guests(self) -> dict[str, str]:
        """{name: state} of the guests the daemon lists."""
        return {g["name"]: g["state"] for g in self.execute("list")["guests"]}

    # -- probes ------------------------------------------------------------------------------------------
    def open_fds(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except (OSError, AssertionError):
            return None

    def _status_kib(self, field: str) -> int | None:
        """A `field:` of /proc/PID/status in KiB (None when the process is gone or has no such line)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except (OSError, AssertionError):
            return None
        return None

    def peak_rss_mib(self) -> float | None:
        """VmHWM of the daemon process (its peak resident set), MiB."""
        kib = self._status_kib("VmHWM")
        return kib / 1024 if kib is not None else None

    def rss_bytes(self) -> int | None:
        kib = self._status_kib("VmRSS")
        return kib * 1024 if kib is not None else None


class BackgroundMigration:
    """`migrate` through the control socket in a thread: progress events collected in `events`,
    `wait_moving()` returns once pages are flowing; `join()`, then `result` or `error`."""

    def __init__(self, source: DaemonProcess, name: str, to: str, *, timeout: float = CTL_TIMEOUT_S,
                 **args: object):
        self.events: list[dict] = []
        self.moving = threading.Event()
        self.result: dict | None = None
        self.error: Exception | None = None
        self._timeout = timeout
        self._thread = threading.Thread(target=self._run, args=(source, {"name": name, "to": to, **args}),
                                        daemon=True)
        self._thread.start()

    def _on_event(self, _name: str, data: dict) -> None:
        self.events.append(data)
        if data.get("transferred", 0) > 0:
            self.moving.set()

    def _run(self, source: DaemonProcess, args: dict) -> None:
        try:
            self.result = source.execute("migrate", args, on_event=self._on_event, timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        finally:
            self.moving.set()

    def wait_moving(self, timeout: float = READY_TIMEOUT_S) -> None:
        assert self.moving.wait(timeout), "the migration never started moving pages"

    def join(self, timeout: float = CTL_TIMEOUT_S) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "migrate did not return"


def _new_daemon(root: os.PathLike | str | None, name: str, kw: dict) -> DaemonProcess:
    """A DaemonProcess in `root/name` (root: a new temp dir that cleanup() removes, when None)."""
    owns_root = root is None
    root_path = pathlib.Path(root) if root is not None else pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-test-"))
    return DaemonProcess(root_path, name, owns_root=owns_root, **kw)


def start_daemon(root: os.PathLike | str | None = None, name: str = "d", *, fleet: FleetRef | None = None,
                 trust: Sequence[FleetRef] = (), init_platform: bool = True, wait: bool = True,
                 ready_timeout: float = READY_TIMEOUT_S, **kw: object) -> DaemonProcess:
    """Start `sevmigd serve` in `root/name` and (unless wait=False) wait until it is ready.

    root: parent of the daemon's work dir (default: a new temp dir, removed by cleanup()).
    fleet / trust: the platform's fleet (default: the shared one) and fleets whose ARKs it also trusts.
    init_platform=False, or a `state_dir` of yours: the platform is not made here (an empty state dir
    makes the daemon create a self-contained platform).
    Other keywords go to DaemonProcess: state_dir, listen, control, config, args, env, launcher,
    log_level, notify.
    """
    d = _new_daemon(root, name, kw)
    try:
        if init_platform and "state_dir" not in kw:
            make_state_dir(d.state_dir, fleet, trust=trust)
        d.spawn()
        if wait:
            d.wait_ready(ready_timeout)
    except BaseException:
        d.cleanup()
        raise
    return d


async def astart_daemon(root: os.PathLike | str | None = None, name: str = "d", *, fleet: FleetRef | None = None,
                        trust: Sequence[FleetRef] = (), init_platform: bool = True,
                        ready_timeout: float = READY_TIMEOUT_S, **kw: object) -> DaemonProcess:
    """start_daemon for trio code: the state dir is made and readiness awaited in worker threads, the
    fork happens on the event loop's thread (which outlives the daemon: see the module docstring)."""
    d = _new_daemon(root, name, kw)
    try:
        if init_platform and "state_dir" not in kw:
            await trio.to_thread.run_sync(lambda: make_state_dir(d.state_dir, fleet, trust=trust))
        d.spawn()
        await trio.to_thread.run_sync(d.wait_ready, ready_timeout)
    except BaseException:
        with trio.CancelScope(shield=True):   # a cancelled start must not leave its daemon running
            await trio.to_thread.run_sync(d.cleanup)
        raise
    return d


__all__ = ["Fleet", "fleet", "make_state_dir", "write_config", "call_control", "child_env", "DaemonProcess",
           "DaemonStartError", "BackgroundMigration", "start_daemon", "astart_daemon", "ControlError", "ControlFailure",
           "DaemonNotRunning", "ConnectionLost", "READY_TIMEOUT_S", "CTL_TIMEOUT_S", "STOP_TIMEOUT_S"]
