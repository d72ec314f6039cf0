"""Security of a running daemon: control-socket permissions, hostile network peers, limits, trust,
secrets on disk and in logs. Real `sevmigd serve` subprocesses, real TCP on loopback.

Rules for this file: every daemon is a real subprocess (`python -m sevmigd serve`) with its own state
dir, control socket and log file in tmp dirs; readiness is READY=1 on a NOTIFY_SOCKET the test binds
(never a sleep); loopback and port 0 only; every blocking wait has a timeout; tests that need root
(setuid to another user) skip with the reason otherwise.

The harness here (`RealDaemon`, `make_state`) is also used by tests/test_systemd.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from sevmigd.daemon.client import ControlClient, ControlError

IO_TIMEOUT = 30
NOBODY = 65534


# ----------------------------------------------------------------------------- fleet + state dirs


_CA_CACHE: dict[str, object] = {}


def fleet_ca(name: str = "fleet"):
    """A throwaway emulated fleet CA (2048-bit ARK/ASK for speed), one per name per test session."""
    from sevmigd.psp.identity import FleetCA
    if name not in _CA_CACHE:
        _CA_CACHE[name] = FleetCA.create(os.urandom, rsa_bits=2048)
    return _CA_CACHE[name]


def make_state(path: pathlib.Path, *, fleet: str = "fleet", trust: tuple[str, ...] | None = None) -> str:
    """A state dir holding a platform of `fleet`, trusting the ARKs of `trust` (default: its own)."""
    from sevmigd import store
    from sevmigd.psp.identity import PlatformIdentity
    ca = fleet_ca(fleet)
    store.save_platform(path, PlatformIdentity.create(ca, os.urandom))
    for t in (trust if trust is not None else (fleet,)):
        store.save_trusted_root(path, fleet_ca(t).ark)
    return str(path)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_toml(path: pathlib.Path, cfg: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --------------------------------------------------------------------------------- daemon harness


class RealDaemon:
    """`sevmigd serve` in a subprocess, observed through its NOTIFY_SOCKET, control socket and log."""

    def __init__(self, workdir: pathlib.Path, *, state_dir: str, config: dict | None = None,
                 listen: str | None = "127.0.0.1:0", control: str | None = None,
                 env: dict[str, str] | None = None, launcher: list[str] | None = None,
                 stderr_pipe: bool = False):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.notify_path = str(workdir / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.messages: list[dict[str, str]] = []
        self.control = control or str(workdir / "control.sock")
        self.log_path = workdir / "daemon.log"
        cmd = [sys.executable, "-m", "sevmigd", "serve", "--state-dir", state_dir, "--control", self.control,
               "--log-format", "json", "--log-level", "debug"]
        if listen is not None:
            cmd += ["--listen", listen]
        if config:
            cmd += ["--config", write_toml(workdir / "sevmigd.toml", config)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
        full_env["NOTIFY_SOCKET"] = self.notify_path
        full_env.update(env or {})
        self.env = full_env
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*(launcher or []), *cmd], stdout=self._log,
                                     stderr=subprocess.PIPE if stderr_pipe else subprocess.STDOUT,
                                     env=full_env, cwd=workdir)

    # -- observation ------------------------------------------------------------------------
    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_notify(self, predicate, timeout: float = IO_TIMEOUT, *, since: int = 0) -> dict[str, str]:
        """Receive notifications until one (at index >= `since` in `messages`) satisfies `predicate`;
        fail (with the log) on exit or timeout."""
        for m in self.messages[since:]:
            if predicate(m):
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no matching sd_notify message within {timeout}s; got {self.messages[-5:]}\n"
                            f"log:\n{self.log_text()[-4000:]}")
            self.notify.settimeout(min(left, 0.5))
            try:
                data = self.notify.recv(65536).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    pytest.fail(f"daemon exited with {self.proc.returncode} before the expected message\n"
                                f"log:\n{self.log_text()[-4000:]}")
                continue
            msg = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            self.messages.append(msg)
            if predicate(msg):
                return msg

    def wait_ready(self, timeout: float = IO_TIMEOUT) -> dict[str, str]:
        return self.wait_notify(lambda m: m.get("READY") == "1", timeout)

    # -- control ----------------------------------------------------------------------------
    def ctl(self, verb: str, on_event=None, timeout: float | None = IO_TIMEOUT, **args) -> dict:
        with ControlClient(self.control, timeout=timeout) as c:
            return c.execute(verb, args, on_event=on_event)

    @property
    def listen(self) -> str:
        return self.ctl("server-info")["listen"]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    # -- lifecycle --------------------------------------------------------------------------
    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = IO_TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
        self._log.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def daemons(tmp_path):
    """Factory: daemons(name, **kwargs) -> started RealDaemon (READY=1 received); all killed at the end."""
    started: list[RealDaemon] = []

    def start(name: str, *, wait: bool = True, state_dir: str | None = None, fleet: str = "fleet",
              trust: tuple[str, ...] | None = None, **kwargs) -> RealDaemon:
        if state_dir is None:
            state_dir = make_state(tmp_path / name / "state", fleet=fleet, trust=trust)
        d = RealDaemon(tmp_path / name, state_dir=state_dir, **kwargs)
        started.append(d)
        if wait:
            d.wait_ready()
        return d

    yield start
    for d in started:
        d.close()


def migration_available() -> bool:
    try:
        import sevmigd.daemon.migration  # noqa: F401
        import sevmigd.guest.vm  # noqa: F401
    except ImportError:
        return False
    return True


needs_migration = pytest.mark.skipif(not migration_available(),
                                     reason="the migration engine (sevmigd.daemon.migration) is not in this tree yet")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (setuid)")


def _as_user_connect(path: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> str:
    """Try to connect to the unix socket `path` as uid/gid in a forked child; return 'ok' or the errno name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the user, try, report, exit without running any cleanup
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
                res = "ok"
            except OSError as exc:
                res = __import__("errno").errorcode.get(exc.errno, str(exc.errno))
            os.write(w, res.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        res = f.read().decode()
    os.waitpid(pid, 0)
    return res


# ------------------------------------------------------------------------------- control socket


@pytest.fixture
def open_dir():
    """A world-traversable directory (0755) so that only the socket's own mode protects it."""
    import tempfile
    d = tempfile.mkdtemp(prefix="sevmigd-sec-")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_control_socket_is_0600_and_owner_only(daemons, open_dir):
    d = daemons("host", control=str(open_dir / "control.sock"))
    st = os.stat(d.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert d.ctl("server-info")["listen"]  # the owner can talk to it


@needs_root
def test_non_owner_cannot_connect_to_control_socket(daemons, open_dir):
    d = daemons("host", control=str(open_dir / "control.sock"))
    assert _as_user_connect(d.control, NOBODY, NOBODY) == "EACCES"
    # The refusal comes from the socket's mode (the directory is open): loosen it and nobody gets in,
    # which shows the check above can fail.
    os.chmod(d.control, 0o666)
    assert _as_user_connect(d.control, NOBODY, NOBODY) == "ok"


@needs_root
def test_control_group_members_can_connect_others_cannot(daemons, open_dir):
    import grp
    group = next((g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY) and g.gr_gid >= 1), None)
    if group is None:
        pytest.skip("no spare group on this system")
    d = daemons("host", control=str(open_dir / "control.sock"), config={"control_group": group.gr_name})
    st = os.stat(d.control)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    assert _as_user_connect(d.control, NOBODY, NOBODY, (group.gr_gid,)) == "ok"
    assert _as_user_connect(d.control, NOBODY, NOBODY) == "EACCES"


# ---------------------------------------------------------------------------------- state on disk


def _walk(root: pathlib.Path):
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            yield pathlib.Path(dirpath) / n
        for n in filenames:
            yield pathlib.Path(dirpath) / n


def test_self_created_state_is_private(daemons, tmp_path):
    """First start with an empty state dir: every key written 0600 inside 0700 directories."""
    d = daemons("fresh", state_dir=str(tmp_path / "fresh-state"))
    keys = []
    for p in _walk(tmp_path / "fresh-state"):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            assert mode & 0o077 == 0, f"{p} is {mode:04o}"
        elif p.suffix == ".key":
            keys.append(p)
            assert mode == 0o600, f"{p} is {mode:04o}"
    assert {p.name for p in keys} >= {"cek.key", "oca.key", "pek.key", "pdh.key", "ark.key", "ask.key"}
    assert d.ctl("server-info")


# --------------------------------------------------------------------------------------- secrets


def _secret_needles(state_dir: pathlib.Path) -> list[str]:
    """Strings that would betray a private key in a log: PEM armour, and every key file's bytes as
    hex and base64 (any 24-char window of them)."""
    import base64
    needles = ["-----BEGIN", "PRIVATE KEY"]
    for p in _walk(state_dir):
        if p.suffix == ".key" and p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            body = data
            if b"-----BEGIN" in data:  # PEM: the base64 body is what could leak
                body = base64.b64decode(b"".join(l for l in data.splitlines() if not l.startswith(b"-----")))
            needles += [body.hex()[i:i + 32] for i in range(0, max(1, len(body.hex()) - 32), 97)]
            needles += [base64.b64encode(body).decode()[i:i + 24] for i in range(0, max(1, len(body) - 24), 61)]
    return needles


def test_private_keys_never_logged(daemons, tmp_path):
    d = daemons("host", state_dir=str(tmp_path / "keys-state"))
    d.ctl("server-info")
    mark = len(d.messages)
    d.signal(signal.SIGHUP)  # a reload logs the config again
    d.wait_notify(lambda m: m.get("RELOADING") == "1", since=mark)
    d.wait_notify(lambda m: m.get("READY") == "1", since=mark)
    assert d.stop() == 0
    log = d.log_text()
    assert "ready" in log  # the log is really there
    needles = _secret_needles(tmp_path / "keys-state")
    assert len(needles) > 10
    leaked = [n for n in needles if n in log]
    assert not leaked, f"key material in the daemon log: {leaked[:3]}"


# ------------------------------------------------------------------------------ migrations helpers


class BackgroundMigration:
    """`ctl migrate` in a thread: progress events collected, `moving` set once pages are flowing."""

    def __init__(self, source: RealDaemon, name: str, to: str, **args):
        self.events: list[dict] = []
        self.moving = threading.Event()
        self.result: dict | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(source, name, to, args), daemon=True)
        self._thread.start()

    def _on_event(self, _name: str, data: dict) -> None:
        self.events.append(data)
        if data.get("transferred", 0) > 0:
            self.moving.set()

    def _run(self, source, name, to, args):
        try:
            self.result = source.ctl("migrate", name=name, to=to, on_event=self._on_event, timeout=120, **args)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        finally:
            self.moving.set()

    def wait_moving(self, timeout: float = IO_TIMEOUT) -> None:
        assert self.moving.wait(timeout), "the migration never started moving pages"

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "ctl migrate did not return"


def _code(exc: ControlError) -> str | None:
    """The AbortCode name a failed `migrate` reply carries (error.code)."""
    return (exc.reply.get("error") or {}).get("code")


def _guests(d: RealDaemon) -> dict[str, str]:
    return {g["name"]: g["state"] for g in d.ctl("list")["guests"]}


def _fake_hello(port: int, *, platform: dict, memory_bytes: int = 1 << 20, raw: bytes | None = None):
    """Play a source: send one Hello (or `raw` bytes) and return the destination's first message
    (Accept / Refuse), or None when it closed the connection without one."""
    from sevmigd.wire import NEED_DATA, Connection, Role, RemoteProtocolError, messages as m
    conn = Connection(Role.SOURCE)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(raw if raw is not None else conn.send(m.Hello(
            version=1, features=(), platform=platform, guest_name="intruder", memory_bytes=memory_bytes,
            policy=0, vcpus=1, es=False, migration_id="0123456789abcdef")))
        ev = NEED_DATA
        while ev is NEED_DATA:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            conn.receive_data(data)
            try:
                ev = conn.next_event()
            except RemoteProtocolError:
                return None
        return ev


def _platform_of(fleet: str = "fleet") -> dict[str, bytes]:
    from sevmigd.migrate.trust import platform_files
    from sevmigd.psp.identity import PlatformIdentity
    return platform_files(PlatformIdentity.create(fleet_ca(fleet), os.urandom))


# --------------------------------------------------------------------------------- trust refusals


@needs_migration
@pytest.mark.parametrize("cert,offset,link", [
    (None, 0, None),                    # control: the untampered chain is accepted
    ("pek", 0x414 + 17, "PEK"),         # a flipped bit in the PEK's signature
    ("cek", 0x500, "CEK"),              # ... in the CEK's signature (signed by the ASK)
    ("ask", 100, "ASK"),                # ... in the ASK's key (signed by the ARK)
])
def test_tampered_chain_is_refused_with_the_failing_link(daemons, cert, offset, link):
    d = daemons("dest")
    plat = _platform_of("fleet")
    if cert is not None:
        b = bytearray(plat[cert])
        b[offset] ^= 0x01
        plat[cert] = bytes(b)
    reply = _fake_hello(d.port, platform=plat)
    from sevmigd.wire import AbortCode, messages as m
    if cert is None:
        assert isinstance(reply, m.Accept)
        return
    assert isinstance(reply, m.Refuse), reply
    assert reply.code == AbortCode.UNTRUSTED_PLATFORM
    assert "chain rejected" in reply.reason and link in reply.reason
    assert "intruder" not in _guests(d)


@needs_migration
def test_platform_of_another_fleet_is_refused(daemons):
    """A source whose chain ends in another fleet's ARK: refused by the destination, guest stays home."""
    src = daemons("src", fleet="other", trust=("other", "fleet"))
    dst = daemons("dst", fleet="fleet")  # trusts only its own fleet
    src.ctl("launch", name="g1", memory=4 << 20)
    with pytest.raises(ControlError) as ei:
        src.ctl("migrate", name="g1", to=dst.listen, timeout=60)
    assert _code(ei.value) == "UNTRUSTED_PLATFORM" and "source platform chain rejected" in str(ei.value)
    assert _guests(src) == {"g1": "running"}
    assert "g1" not in _guests(dst)


@needs_migration
def test_source_refuses_a_destination_of_another_fleet(daemons):
    src = daemons("src", fleet="fleet")  # trusts only its own fleet
    dst = daemons("dst", fleet="other", trust=("other", "fleet"))
    src.ctl("launch", name="g1", memory=4 << 20)
    with pytest.raises(ControlError) as ei:
        src.ctl("migrate", name="g1", to=dst.listen, timeout=60)
    assert _code(ei.value) == "UNTRUSTED_PLATFORM" and "destination platform chain rejected" in str(ei.value)
    assert _guests(src) == {"g1": "running"}
    assert "g1" not in _guests(dst)


# ----------------------------------------------------------------------------------------- limits


@needs_migration
def test_oversized_guest_is_refused(daemons):
    src = daemons("src")
    dst = daemons("dst", config={"max_guest_bytes": "4M"})
    src.ctl("launch", name="big", memory=8 << 20)
    with pytest.raises(ControlError) as ei:
        src.ctl("migrate", name="big", to=dst.listen, timeout=60)
    msg = str(ei.value)
    # A refusal (not a protocol abort) that names the setting, the announced size and the limit.
    assert _code(ei.value) == "RESOURCE_LIMIT" and "refused" in msg and "max_guest_bytes" in msg, msg
    assert str(8 << 20) in msg and str(4 << 20) in msg, msg
    assert _guests(src) == {"big": "running"}
    assert "big" not in _guests(dst)
    # An absurd announced size from a hand-written source is refused the same way, before allocation.
    from sevmigd.wire import AbortCode, messages as m
    reply = _fake_hello(dst.port, platform=_platform_of(), memory_bytes=1 << 42)
    assert isinstance(reply, m.Refuse) and reply.code == AbortCode.RESOURCE_LIMIT, reply


@needs_migration
def test_silent_connection_is_dropped_at_handshake_timeout(daemons):
    d = daemons("dest", config={"handshake_timeout_s": 1.0, "keepalive_interval_s": 0.2,
                                "peer_timeout_s": 1.0})
    with socket.create_connection(("127.0.0.1", d.port), timeout=IO_TIMEOUT) as s:
        start = time.monotonic()
        received = b""
        try:
            while chunk := s.recv(4096):   # the daemon may say why (an Abort frame) before closing
                received += chunk
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - start
    # Closed by the daemon (EOF), at its deadline, not by our socket timeout.
    assert 0.5 <= elapsed < IO_TIMEOUT
    assert len(received) < 1024
    assert d.ctl("server-info")


@needs_migration
def test_flood_and_garbage_do_not_disturb_a_running_migration(daemons):
    """200 idle or garbage-sending connections against the destination while a migration runs there:
    the migration completes, the guest verifies, the daemon still answers, excess connections are shed."""
    src = daemons("src")
    dst = daemons("dst", config={"handshake_timeout_s": 2.0, "max_unauthenticated": 32})
    src.ctl("launch", name="g1", memory=32 << 20, dirty_rate=1.0)
    mig = BackgroundMigration(src, "g1", dst.listen, max_bandwidth_mib_s=8)  # ~4 s of pre-copy
    mig.wait_moving()
    rng = __import__("random").Random(4446)
    socks = []
    try:
        for i in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", dst.port), timeout=IO_TIMEOUT)
            except OSError:
                continue  # backlog full for a moment: that is shedding too
            socks.append(s)
            try:
                if i % 4 == 1:
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(512)))      # random garbage
                elif i % 4 == 2:
                    s.sendall(b"\xff\xff\xff\xff" + b"A" * 256)                    # a 4 GiB length prefix
                elif i % 4 == 3:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")                 # wrong protocol
            except OSError:
                pass  # already shed by the daemon
        assert dst.ctl("server-info")  # the control plane answers during the flood
        assert mig.result is None and mig.error is None, "the flood did not overlap the migration"
        mig.join()
    finally:
        for s in socks:
            s.close()
    assert mig.error is None, mig.error
    assert mig.result["status"] == "completed"
    assert _guests(dst) == {"g1": "running"}
    assert dst.ctl("verify", name="g1")["ok"] is True
    events = [e.get("event") for e in dst.log_events()]
    assert "incoming_refused" in events  # connections beyond the cap were accepted and closed at once


# -------------------------------------------------------------------------------------------- TLS


def _tls_ca(name: str):
    import test_tls as tt
    if ("tls", name) not in _CA_CACHE:
        _CA_CACHE[("tls", name)] = tt.make_ca(name)
    return _CA_CACHE[("tls", name)]


def _tls_files(root: pathlib.Path, name: str, ca_name: str = "tls-fleet", trust: str | None = None) -> dict[str, str]:
    """TLS cert/key/ca for daemon `name`, issued by CA `ca_name`, trusting CA `trust` (default: same)."""
    import test_tls as tt
    ca = _tls_ca(ca_name)
    return tt.write_tls_files(root / f"tls-{name}", ca, tt.make_leaf(ca, name), trust=_tls_ca(trust or ca_name))


@needs_migration
def test_mutual_tls_migration_and_refusals(daemons, tmp_path):
    src = daemons("src", config={"tls": _tls_files(tmp_path, "src")})
    dst = daemons("dst", config={"tls": _tls_files(tmp_path, "dst"), "handshake_timeout_s": 2.0})
    src.ctl("launch", name="g1", memory=4 << 20)
    assert src.ctl("migrate", name="g1", to=dst.listen, timeout=60)["status"] == "completed"
    assert _guests(dst) == {"g1": "running"}

    # A plaintext source gets nothing: no Accept, the connection is closed, the log says why.
    assert _fake_hello(dst.port, platform=_platform_of()) is None

    # A source from another TLS CA that does not trust ours: it refuses the destination itself.
    rogue = daemons("rogue", config={"tls": _tls_files(tmp_path, "rogue", ca_name="other-tls")})
    rogue.ctl("launch", name="g2", memory=4 << 20)
    with pytest.raises(ControlError) as ei:
        rogue.ctl("migrate", name="g2", to=dst.listen, timeout=60)
    assert _code(ei.value) == "UNTRUSTED_PLATFORM" and "certificate verify failed" in str(ei.value), ei.value.reply
    assert _guests(rogue) == {"g2": "running"}

    # A source whose certificate comes from another CA but that trusts ours: the destination refuses it.
    sneaky = daemons("sneaky", config={"tls": _tls_files(tmp_path, "sneaky", ca_name="other-tls",
                                                         trust="tls-fleet")})
    sneaky.ctl("launch", name="g3", memory=4 << 20)
    with pytest.raises(ControlError):
        sneaky.ctl("migrate", name="g3", to=dst.listen, timeout=60)
    assert _guests(sneaky) == {"g3": "running"}
    assert set(_guests(dst)) == {"g1"}
    assert dst.stop() == 0  # the log is complete once the daemon has exited
    log = dst.log_text()
    assert "peer is not speaking TLS" in log          # the plaintext source
    assert "certificate verify failed" in log         # the sneaky source

    # Neither daemon logged a private key: platform keys nor TLS keys.
    for d, name in ((src, "src"), (dst, "dst")):
        d.stop()
        needles = _secret_needles(tmp_path / name / "state") + _secret_needles(tmp_path / f"tls-{name}")
        leaked = [n for n in needles if n in d.log_text()]
        assert not leaked, f"{name}: key material in the log: {leaked[:3]}"
