"""Real `sevmigd serve` subprocesses for tests (import from any test file: `from daemon_helpers import ...`).

What it gives you:

* `start_daemon(**opts) -> DaemonProcess`: a fresh state dir with a platform identity issued by a fleet
  CA (shared by default within the test session, so two daemons trust each other and can migrate),
  a control socket in a short private /tmp dir, the migration listener on 127.0.0.1 port 0. Returns
  once the daemon has logged its `ready` line (listener and control socket accepting), with
  `.listen_port` / `.address` taken from that line. No sleeps: a reader thread parses the daemon's
  JSON log lines from stdout and wakes waiters (`wait_for_log`).
* `DaemonProcess.execute(verb, args)`: in-process control client call (fast); `.ctl(*argv)`: run
  `sevmigd ctl --control PATH ...` as a user would (returns CompletedProcess); `.terminate()`:
  SIGTERM and the exit status; `.kill()`; `.cleanup()` (always safe; the fixtures call it).
* `daemon` / `daemon_factory` pytest fixtures (import them into your test module's namespace).
* `new_fleet()` for a separate (untrusted) fleet; `make_state_dir(path, ca)` to prepare a state dir.
* Async wrappers for trio tests: `astart_daemon`, `DaemonProcess.aexecute`, `.actl`, `.aterminate`
  (they run the blocking call in a worker thread so the test's event loop keeps running).

Rules kept here: loopback and port 0 only; every wait has a deadline and fails with the daemon's
output attached; nothing is left running after a test (fixtures kill and remove everything).
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
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from sevmigd import store
from sevmigd.daemon.client import ControlClient
from sevmigd.psp.identity import FleetCA, PlatformIdentity

# Generous bounds for a 2-core CI box shared with other tests; each is a deadline, never a sleep.
READY_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# Test fleets use 2048-bit RSA for the ARK/ASK (Naples size; 4096 is slow to generate).
TEST_RSA_BITS = 2048

_session_ca: FleetCA | None = None
_ca_lock = threading.Lock()


def new_fleet() -> FleetCA:
    """A brand-new fleet CA (its platforms are not trusted by daemons of the shared fleet)."""
    return FleetCA.create(os.urandom, rsa_bits=TEST_RSA_BITS)


def shared_fleet() -> FleetCA:
    """The session's fleet CA: every daemon started without `ca=` trusts the others."""
    global _session_ca
    with _ca_lock:
        if _session_ca is None:
            _session_ca = new_fleet()
        return _session_ca


def make_state_dir(state_dir: os.PathLike | str, ca: FleetCA | None = None, *,
                   trust: list | None = None) -> PlatformIdentity:
    """Write a fresh platform identity issued by `ca` into `state_dir`, trusting `ca.ark` (and any
    extra ARKs in `trust`). Returns the identity."""
    ca = ca or shared_fleet()
    identity = PlatformIdentity.create(ca, os.urandom)
    store.save_platform(state_dir, identity, trusted_ark=ca.ark)
    for ark in trust or ():
        store.save_trusted_root(state_dir, ark)
    return identity


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_toml(path: os.PathLike | str, values: dict[str, Any]) -> pathlib.Path:
    """Write a flat dict (plus one level of tables, e.g. {"tls": {...}}) as a TOML config file."""
    lines, tables = [], []
    for k, v in values.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    p = pathlib.Path(path)
    p.write_text("\n".join(lines) + "\n")
    return p


class DaemonStartError(AssertionError):
    pass


class DaemonProcess:
    """A running `sevmigd serve` subprocess (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, *, root: pathlib.Path, state_dir: pathlib.Path,
                 control: str, sock_dir: str, owns_root: bool):
        self.proc = proc
        self.root = root
        self.state_dir = state_dir
        self.control = control
        self._sock_dir = sock_dir
        self._owns_root = owns_root
        self.logs: list[dict] = []          # parsed JSON log lines (stdout)
        self.raw_stdout: list[str] = []      # every stdout line as printed
        self.raw_stderr: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.ready: dict | None = None
        self.listen: str | None = None
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -------------------------------------------------------------- output
    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw_stdout.append(line)
                try:
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        self.logs.append(obj)
                except ValueError:
                    pass
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw_stderr.append(line)
                self._cond.notify_all()

    def output(self) -> str:
        """Everything the daemon printed so far (stdout then stderr), for assertion messages."""
        with self._cond:
            return "".join(self.raw_stdout) + "".join(self.raw_stderr)

    def wait_for_log(self, event: str | Callable[[dict], bool], timeout: float = READY_TIMEOUT_S,
                     start: int = 0) -> dict:
        """The first log line (from index `start`) whose event equals `event` (or that the predicate
        accepts); waits for it without polling. AssertionError with the output on timeout/exit."""
        pred = event if callable(event) else (lambda d: d.get("event") == event)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.logs):
                    if pred(self.logs[i]):
                        return self.logs[i]
                    i += 1
                if self._eof:
                    raise DaemonStartError(f"daemon exited (rc={self.proc.poll()}) before logging "
                                           f"{event!r}:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonStartError(f"no {event!r} log line within {timeout} s:\n{self.output()}")
                self._cond.wait(left)

    # -------------------------------------------------------------- addresses
    @property
    def listen_host(self) -> str:
        assert self.listen is not None
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def listen_port(self) -> int:
        assert self.listen is not None
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def address(self) -> str:
        """HOST:PORT to pass as `migrate --to`."""
        assert self.listen is not None
        return self.listen

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -------------------------------------------------------------- control
    def client(self, timeout: float | None = CTL_TIMEOUT_S) -> ControlClient:
        return ControlClient(self.control, timeout=timeout)

    def execute(self, verb: str, args: dict | None = None, *, on_event=None,
                timeout: float | None = CTL_TIMEOUT_S) -> dict:
        """One control request in-process; raises sevmigd.daemon.client.ControlError on an error reply."""
        with self.client(timeout) as c:
            return c.execute(verb, args, on_event=on_event)

    def ctl(self, *argv: str, timeout: float = CTL_TIMEOUT_S, check: bool = False) -> subprocess.CompletedProcess:
        """Run `sevmigd ctl --control PATH *argv` as a subprocess (text output captured)."""
        cmd = [sys.executable, "-m", "sevmigd", "ctl", "--control", self.control, *map(str, argv)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}{res.stderr}")
        return res

    def ctl_json(self, *argv: str, timeout: float = CTL_TIMEOUT_S) -> Any:
        """`ctl *argv --json`, checked, parsed."""
        res = self.ctl(*argv, "--json", timeout=timeout, check=True)
        return json.loads(res.stdout)

    def launch(self, name: str, memory: str = "4M", **kw: Any) -> dict:
        """Launch a guest through the control socket; kwargs are control `launch` arguments."""
        return self.execute("launch", {"name": name, "memory": memory, **kw})

    # -------------------------------------------------------------- lifecycle
    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait for the exit status (AssertionError with the output if it hangs)."""
        self.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit within {timeout} s of SIGTERM:\n{self.output()}") from None
        self._join()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            t.join(STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        """Kill if still running; remove the socket dir (and the root when we created it)."""
        self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -------------------------------------------------------------- async wrappers (trio tests)
    async def aexecute(self, verb: str, args: dict | None = None, **kw: Any) -> dict:
        import trio
        return await trio.to_thread.run_sync(partial(self.execute, verb, args, **kw))

    async def actl(self, *argv: str, **kw: Any) -> subprocess.CompletedProcess:
        import trio
        return await trio.to_thread.run_sync(partial(self.ctl, *argv, **kw))

    async def aterminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        import trio
        return await trio.to_thread.run_sync(partial(self.terminate, timeout))


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                        "WATCHDOG_PID", "SEVMIGD_CONTROL", "STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def start_daemon(root: os.PathLike | str | None = None, *, ca: FleetCA | None = None, trust: list | None = None,
                 init_platform: bool = True, listen: str = "127.0.0.1:0", config: dict | None = None,
                 args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                 log_level: str = "debug", ready_timeout: float = READY_TIMEOUT_S) -> DaemonProcess:
    """Start `sevmigd serve` and wait until it is ready (see the module docstring).

    root: directory for the state dir (default: a new temp dir, removed by cleanup()).
    ca / trust: the platform's fleet CA (default: the session's shared fleet) and extra trusted ARKs.
    init_platform=False: leave the state dir empty (the daemon creates a self-contained platform).
    config: values written to a TOML file passed with --config. args: extra `serve` flags.
    """
    if log_level not in ("debug", "info"):
        raise ValueError("readiness is detected from the info-level 'ready' log line: use debug or info")
    owns_root = root is None
    root_path = pathlib.Path(root) if root is not None else pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-test-"))
    root_path.mkdir(parents=True, exist_ok=True)
    state_dir = root_path / "state"
    if init_platform:
        make_state_dir(state_dir, ca, trust=trust)
    # sun_path is limited to 107 bytes: keep the socket in a short private dir under /tmp.
    sock_dir = tempfile.mkdtemp(prefix="sevmigd-s-", dir="/tmp")
    control = os.path.join(sock_dir, "control.sock")
    cmd = [sys.executable, "-m", "sevmigd", "serve", "--state-dir", str(state_dir), "--control", control,
           "--listen", listen, "--log-format", "json", "--log-level", log_level]
    if config:
        cmd += ["--config", str(write_toml(root_path / "sevmigd.toml", config))]
    cmd += list(args)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_child_env(env), start_new_session=True)
    d = DaemonProcess(proc, root=root_path, state_dir=state_dir, control=control, sock_dir=sock_dir,
                      owns_root=owns_root)
    try:
        d.ready = d.wait_for_log("ready", timeout=ready_timeout)
        d.listen = d.ready["listen"]
    except BaseException:
        d.cleanup()
        raise
    return d


async def astart_daemon(*args: Any, **kw: Any) -> DaemonProcess:
    import trio
    return await trio.to_thread.run_sync(partial(start_daemon, *args, **kw))


@pytest.fixture
def daemon_factory(tmp_path):
    """Call it to start daemons (kwargs as start_daemon); all are cleaned up after the test."""
    started: list[DaemonProcess] = []

    def factory(**kw: Any) -> DaemonProcess:
        kw.setdefault("root", tmp_path / f"d{len(started)}")
        d = start_daemon(**kw)
        started.append(d)
        return d

    yield factory
    for d in started:
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    """One ready daemon on the shared fleet."""
    return daemon_factory()


__all__ = ["DaemonProcess", "DaemonStartError", "start_daemon", "astart_daemon", "new_fleet", "shared_fleet",
           "make_state_dir", "write_toml", "daemon", "daemon_factory"]
