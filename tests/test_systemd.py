"""systemd protocols (sevmigd/daemon/systemd.py): sd_notify, socket activation, watchdog.

Rules for this file: notifications are received on a real AF_UNIX datagram socket the test binds in
a tmp dir (or the abstract namespace); socket activation uses a real listening socket inherited by a
real subprocess at fd 3; timing of the watchdog runs under trio's MockClock (autojump_clock), real
I/O tests under fail_after. Loopback and port 0 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing

from sevmigd.daemon import systemd

IO_TIMEOUT = 10


@pytest.fixture
def notify_sock(tmp_path, monkeypatch):
    """A bound datagram socket playing the service manager; NOTIFY_SOCKET points at it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(IO_TIMEOUT)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _recv(sock) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def _pending(sock) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


# ----------------------------------------------------------------------------------------- notify


def test_notify_address_forms():
    assert systemd.notify_address(None) is None
    assert systemd.notify_address("") is None
    assert systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_address("@sd-notify") == b"\0sd-notify"
    assert systemd.notify_address("@") is None
    assert systemd.notify_address("relative/path") is None
    assert systemd.notify_address("vsock:2:1234") is None


def test_message_format_and_newline_injection_refused():
    assert systemd.message(READY=1, STATUS="up") == "READY=1\nSTATUS=up"
    with pytest.raises(ValueError):
        systemd.message(STATUS="x\nREADY=1")


def test_notify_without_manager_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("up") is False


def test_notify_to_missing_socket_returns_false_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.notify("READY=1") is False


def test_notify_arrives_on_path_socket(notify_sock):
    assert systemd.notify("READY=1\nSTATUS=serving") is True
    assert _recv(notify_sock) == {"READY": "1", "STATUS": "serving"}


def test_notify_arrives_on_abstract_socket(monkeypatch):
    name = f"sevmigd-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(IO_TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1") is True
        assert sock.recv(100) == b"WATCHDOG=1"


def test_ready_stopping_reloading_extend(notify_sock):
    systemd.ready("2 guests")
    assert _recv(notify_sock) == {"READY": "1", "STATUS": "2 guests"}
    systemd.stopping()
    assert _recv(notify_sock) == {"STOPPING": "1", "STATUS": "stopping"}
    systemd.reloading()
    msg = _recv(notify_sock)
    assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) > 0
    systemd.extend_timeout(30)
    assert _recv(notify_sock) == {"EXTEND_TIMEOUT_USEC": "30000000"}


def test_status_is_one_clipped_line(notify_sock):
    systemd.status("guest a\nREADY=1 " + "x" * 500)
    msg = notify_sock.recv(4096).decode()
    assert "\n" not in msg and msg.startswith("STATUS=guest a READY=1 ")
    assert len(msg) <= len("STATUS=") + systemd.STATUS_MAX_LEN


def test_status_text_counts_guests_and_migrations():
    assert systemd.status_text([]) == "0 guests; migrations: 0 out, 0 in"
    text = systemd.status_text(["running", "migrating", "running", "incoming", "stopped"],
                               listening="127.0.0.1:4446")
    assert text == ("5 guests: 2 running, 1 migrating, 1 incoming, 1 stopped; "
                    "migrations: 1 out, 1 in; listening on 127.0.0.1:4446")
    assert systemd.status_text(["running"], shutting_down=True).startswith("shutting down; 1 guest:")


async def test_status_task_sends_only_changes(autojump_clock):
    states = ["running"]
    sent = []
    async with trio.open_nursery() as n:
        await n.start(lambda task_status: systemd.status_task(lambda: systemd.status_text(states), interval=1.0,
                                                              send=sent.append, task_status=task_status))
        await trio.sleep(5.5)
        assert sent == ["1 guest: 1 running; migrations: 0 out, 0 in"]
        states[0] = "migrating"
        await trio.sleep(1.0)
        n.cancel_scope.cancel()
    assert sent[-1] == "1 guest: 1 migrating; migrations: 1 out, 0 in" and len(sent) == 2


# ------------------------------------------------------------------------------- socket activation


def test_listen_fds_count_semantics():
    me = 1234
    assert systemd.listen_fds_count({}, me) == 0
    assert systemd.listen_fds_count({"LISTEN_PID": "1234", "LISTEN_FDS": "2"}, me) == 2
    assert systemd.listen_fds_count({"LISTEN_PID": "999", "LISTEN_FDS": "2"}, me) == 0  # a parent's
    assert systemd.listen_fds_count({"LISTEN_PID": "1234", "LISTEN_FDS": "x"}, me) == 0
    assert systemd.listen_fds_count({"LISTEN_PID": "1234", "LISTEN_FDS": "-1"}, me) == 0
    assert systemd.listen_fds_count({"LISTEN_PID": "", "LISTEN_FDS": "1"}, me) == 0


def test_listen_fds_for_another_pid_unsets_env_and_returns_nothing():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "migration"}
    assert systemd.listen_fds(environ=env) == []
    assert env == {}


def test_listen_fd_names():
    assert systemd.listen_fd_names({"LISTEN_FDNAMES": "migration:extra"}, 2) == ["migration", "extra"]
    assert systemd.listen_fd_names({}, 1) == ["unknown"]


# The child: what sevmigd does at startup when socket-activated. It reports what it saw on stdout,
# then serves one connection on the inherited listener through trio.
_CHILD = textwrap.dedent("""
    import fcntl, os, sys, trio
    from sevmigd.daemon import systemd
    fds = systemd.listen_fds()
    cloexec = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in fds]
    left = sorted(k for k in os.environ if k.startswith("LISTEN_"))
    listeners = systemd.inherited_listeners(fds)
    print(fds, cloexec, left, systemd.socket_address(listeners[0].socket) if listeners else None, flush=True)
    async def main():
        if not listeners:
            return
        stream = await listeners[0].accept()
        data = await stream.receive_some(100)
        await stream.send_all(b"echo:" + data)
        await stream.aclose()
    trio.run(main)
""")

# Plays systemd: puts the listening socket at fd 3, sets LISTEN_PID to the pid that will exec the
# daemon (exec keeps the pid), and execs.
_LAUNCHER = textwrap.dedent("""
    import os, sys
    fd, child, pid_offset = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    os.dup2(fd, 3, inheritable=True)
    if fd != 3:
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid() + pid_offset)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_FDNAMES"] = "migration"
    os.execv(sys.executable, [sys.executable, "-c", child])
""")


def _activate(sock: socket.socket, *, pid_offset: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(sock.fileno()), _CHILD, str(pid_offset)],
        pass_fds=[sock.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_listen_fds_with_real_inherited_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        port = lsock.getsockname()[1]
        proc = _activate(lsock)
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"[3] [True] [] 127.0.0.1:{port}", proc.stderr.read() if not line else line
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as c:
            c.sendall(b"ping")
            assert c.recv(100) == b"echo:ping"
        assert proc.wait(timeout=IO_TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()


def test_listen_fds_ignores_sockets_meant_for_another_pid():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        proc = _activate(lsock, pid_offset=1)
    try:
        out, err = proc.communicate(timeout=IO_TIMEOUT)
        assert out.strip() == "[] [] [] None", err
        assert proc.returncode == 0
    finally:
        proc.kill()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (package systemd)")
def test_listen_fds_under_systemd_socket_activate():
    """The same, with systemd's own launcher doing the fd passing."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                             sys.executable, "-c", _CHILD],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # It says "Listening on ADDR as 3." on stderr once bound; the child is spawned on connect.
        assert "Listening on" in proc.stderr.readline()
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as c:
            c.sendall(b"hi")
            c.settimeout(IO_TIMEOUT)
            assert c.recv(100) == b"echo:hi"
        line = proc.stdout.readline()
        assert line.strip() == f"[3] [True] [] 127.0.0.1:{port}"
        assert proc.wait(timeout=IO_TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()


def test_listening_socket_refuses_wrong_kinds(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as d:
        with pytest.raises(systemd.SocketActivationError, match="not a stream socket"):
            systemd.listening_socket(d.fileno())
        assert d.fileno() >= 0  # not closed by the failed adoption
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(systemd.SocketActivationError, match="not listening"):
            systemd.listening_socket(s.fileno())
    f = open(tmp_path / "file", "wb")
    with f, pytest.raises(systemd.SocketActivationError, match="not a socket") as ei:
        systemd.listening_socket(f.fileno())
    assert ei.value.key == "LISTEN_FDS"


def test_listen_fds_claiming_unopened_fd_is_a_clear_error():
    """LISTEN_FDS=2 with only fd 3 open (a broken launcher): a ConfigError naming fd 4, no crash."""
    code = textwrap.dedent("""
        import os, socket
        s = socket.socket(); os.dup2(s.fileno(), 3)
        try:
            os.close(4)
        except OSError:
            pass
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
        from sevmigd.daemon import systemd
        try:
            systemd.listen_fds()
        except systemd.SocketActivationError as e:
            print(e.key, "|", e.message)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=IO_TIMEOUT)
    assert out.stdout.strip() == "LISTEN_FDS | LISTEN_FDS=2 but fd 4 is not open (Bad file descriptor)", out.stderr


# --------------------------------------------------------------------------------------- watchdog


def test_watchdog_interval_semantics():
    assert systemd.watchdog_interval(environ={}) is None
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "junk"}) is None
    assert systemd.watchdog_interval(environ={"WATCHDOG_USEC": "1"}) == systemd.WATCHDOG_MIN_INTERVAL_S


async def test_watchdog_pings_at_interval(autojump_clock):
    times = []
    start = trio.current_time()
    with trio.move_on_after(10.5):
        await systemd.watchdog_task(2.0, send=lambda m: times.append((trio.current_time() - start, m)))
    assert times == [(t, "WATCHDOG=1") for t in (0.0, 2.0, 4.0, 6.0, 8.0, 10.0)]


async def test_watchdog_withholds_ping_when_unhealthy(autojump_clock):
    healthy = True
    sent = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: systemd.watchdog_task(1.0, healthy=lambda: healthy,
                                                   send=lambda m: sent.append(trio.current_time())))
        await trio.sleep(2.5)
        healthy = False
        await trio.sleep(3.0)
        n.cancel_scope.cancel()
    assert len(sent) == 3  # t=0,1,2 then silence so systemd restarts us


async def test_watchdog_disabled_returns_at_once(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as n:
            assert await n.start(systemd.watchdog_task) is None


async def test_watchdog_pings_reach_notify_socket(notify_sock, monkeypatch):
    """End to end over the real socket: interval from WATCHDOG_USEC, pings arrive."""
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # 40 ms timeout -> 20 ms pings
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notify_sock.setblocking(False)
    got = []
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as n:
            assert await n.start(systemd.watchdog_task) == 0.02
            while len(got) < 3:
                await trio.lowlevel.wait_readable(notify_sock)
                got += _pending(notify_sock)
            n.cancel_scope.cancel()
    assert set(got) == {b"WATCHDOG=1"}


# =========================================================================== the real daemon
# `sevmigd serve` subprocesses (the shared harness: tests/conftest.py `daemons`, started with notify=True so
# that the test holds the NOTIFY_SOCKET): what systemd sees of it.

from sevmigd.testing.daemons import BackgroundMigration  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_ready_status_watchdog_stopping(daemons):
    """READY=1 only once both sockets accept; STATUS= lines; WATCHDOG=1 pings; STOPPING=1 on SIGTERM."""
    d = daemons("host", notify=True, env={"WATCHDOG_USEC": "200000"})  # 0.2 s -> a ping every 0.1 s
    ready = d.wait_notify(lambda m: m.get("READY") == "1")
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("0 guests; migrations: 0 out, 0 in; listening on 127.0.0.1:")
    # READY=1 means both sockets accept connections right now.
    assert d.execute("server-info")["listen"] == ready["STATUS"].rsplit("listening on ", 1)[1]
    with socket.create_connection(("127.0.0.1", d.port), timeout=IO_TIMEOUT):
        pass
    mark = len(d.messages)
    for _ in range(3):
        d.wait_notify(lambda m: m.get("WATCHDOG") == "1", since=len(d.messages))
    assert all(m == {"WATCHDOG": "1"} for m in d.messages[mark:] if "WATCHDOG" in m)
    d.send_signal(signal.SIGTERM)
    stopping = d.wait_notify(lambda m: m.get("STOPPING") == "1")
    assert "stopping" in stopping.get("STATUS", "")
    assert d.proc.wait(IO_TIMEOUT) == 0


def test_daemon_watchdog_pid_for_another_process_means_no_pings(daemons):
    """WATCHDOG_PID naming another process (inherited from a parent): the daemon must not ping."""
    d = daemons("host", notify=True, env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    mark = len(d.messages)
    # A control round trip plus a STATUS refresh window; no ping may be among what arrived meanwhile.
    d.execute("server-info")
    d.send_signal(signal.SIGTERM)
    d.wait_notify(lambda m: m.get("STOPPING") == "1", since=mark)
    assert not [m for m in d.messages if "WATCHDOG" in m]
    assert d.proc.wait(IO_TIMEOUT) == 0


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (package systemd)")
def test_socket_activated_daemon_serves_the_inherited_listener(daemons):
    """Under systemd-socket-activate the daemon uses fd 3 instead of binding `listen`, and a connection
    made *before* the daemon ran (it is what starts it) is served: it is waiting in the backlog."""
    port = _free_port()
    d = daemons("sa", listen="127.0.0.1:1", notify=True, wait=False,  # listen must be ignored
                launcher=["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "NOTIFY_SOCKET"])
    # systemd-socket-activate says "Listening on ... as 3." on stderr once bound, and spawns the
    # daemon on the first connection.
    d.wait_output(lambda line: "Listening on" in line, stream="stderr", timeout=IO_TIMEOUT)
    early = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    d.wait_ready()
    ready = d.wait_notify(lambda m: m.get("READY") == "1")
    assert ready["STATUS"].endswith(f"listening on 127.0.0.1:{port}")
    info = d.execute("server-info")
    assert info["listen"] == f"127.0.0.1:{port}"
    assert d.ready is not None and d.ready.get("socket_activated") is True
    # The early connection reached the daemon's migration handler: garbage gets it closed by the
    # daemon (not by a timeout of ours).
    early.sendall(b"\xff" * 64)
    early.settimeout(IO_TIMEOUT)
    try:
        while early.recv(4096):
            pass
    except ConnectionResetError:
        pass
    early.close()
    assert d.execute("server-info")  # and the daemon is still fine
    assert d.terminate() == 0


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (package systemd)")
def test_socket_activated_destination_receives_a_migration(daemons):
    """The migration's own connection is what starts the destination (systemd-socket-activate spawns on
    the first connection); it waits in the backlog of the inherited socket and the migration completes."""
    src = daemons("src")
    src.execute("launch", name="g1", memory=8 << 20, dirty_rate=1.0)
    port = _free_port()
    dst = daemons("dst", listen="127.0.0.1:1", notify=True, wait=False,
                  launcher=["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "NOTIFY_SOCKET"])
    dst.wait_output(lambda line: "Listening on" in line, stream="stderr", timeout=IO_TIMEOUT)
    stats = src.execute("migrate", name="g1", to=f"127.0.0.1:{port}", timeout=120)
    assert stats["status"] == "completed"
    dst.wait_ready()
    assert dst.guests() == {"g1": "running"}
    assert dst.execute("verify", name="g1")["ok"] is True
    assert dst.terminate() == 0


def test_sigterm_on_destination_mid_migration_keeps_the_guest_on_the_source(daemons):
    src = daemons("src", notify=True)
    dst = daemons("dst", notify=True)
    src.execute("launch", name="g1", memory=32 << 20, dirty_rate=1.0)
    mig = BackgroundMigration(src, "g1", dst.address, max_bandwidth_mib_s=4)  # ~8 s of pre-copy
    mig.wait_moving()
    # `systemctl status` on both hosts shows the migration while it runs (STATUS= refreshes every second).
    src.wait_notify(lambda m: "1 migrating; migrations: 1 out, 0 in" in m.get("STATUS", ""))
    dst.wait_notify(lambda m: "1 incoming; migrations: 0 out, 1 in" in m.get("STATUS", ""))
    dst.send_signal(signal.SIGTERM)
    stopping = dst.wait_notify(lambda m: m.get("STOPPING") == "1")
    assert "1 migration(s)" in stopping["STATUS"]
    assert dst.proc.wait(IO_TIMEOUT) == 0
    mig.join()
    assert mig.result is None and mig.error is not None
    assert (mig.error.reply.get("error") or {}).get("code") in ("SHUTDOWN", "CANCELLED", "PROTOCOL_ERROR")
    guests = src.execute("list")["guests"]
    assert [(g["name"], g["state"]) for g in guests] == [("g1", "running")]
    assert src.execute("verify", name="g1")["ok"] is True


def test_sigterm_on_source_mid_migration_cancels_cleanly(daemons):
    """SIGTERM on the source before "go": the migration is cancelled (the guest never left), the
    destination discards its partial copy, and the source exits 0 within its stop budget."""
    src = daemons("src", notify=True)
    dst = daemons("dst", notify=True)
    src.execute("launch", name="g1", memory=32 << 20, dirty_rate=1.0)
    mig = BackgroundMigration(src, "g1", dst.address, max_bandwidth_mib_s=4)
    mig.wait_moving()
    src.send_signal(signal.SIGTERM)
    src.wait_notify(lambda m: m.get("STOPPING") == "1")
    assert src.proc.wait(IO_TIMEOUT) == 0
    mig.join()
    assert mig.result is None
    # The destination never runs a copy; its incoming guest is gone (not left half-received).
    dst_guests = dst.guests()
    assert dst_guests.get("g1") not in ("running", "incoming", "paused")
    events = [e for e in src.logs if e.get("event") in ("shutting_down", "stopped")]
    assert [e["event"] for e in events] == ["shutting_down", "stopped"]
