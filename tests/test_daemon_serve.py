"""`sevmigd serve` as a real subprocess, driven by `sevmigd ctl` as a user runs it.

Rules: loopback and port 0 only; readiness from the daemon's own `ready` log line (no sleeps); every
wait has a deadline (see sevmigd/testing/daemons.py); every daemon is killed and removed afterwards.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

from sevmigd.testing.daemons import write_config


def _ok(res):
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_guest_lifecycle_with_ctl(daemon):
    _ok(daemon.ctl("launch", "web", "--memory", "8M", "--policy", "1", "--shared-fraction", "0.1",
                   "--dirty-rate", "2", "--seed", "7"))
    st = daemon.ctl_json("status", "web")
    assert st["name"] == "web" and st["state"] == "running"
    assert st["memory_bytes"] == 8 << 20 and st["policy"] == "0x1"
    assert st["sev_state"] == "RUNNING"
    assert st["private_pages"] + st["shared_pages"] == 2048 and st["shared_pages"] > 0
    assert len(st["launch_digest"]) == 64 and st["migration_control"] == 1 and st["migration"] is None
    guests = daemon.ctl_json("list")
    assert [(g["name"], g["state"]) for g in guests] == [("web", "running")]

    _ok(daemon.ctl("guest-write", "web", "0x200000", "0011aabb"))
    assert _ok(daemon.ctl("guest-read", "web", "0x200000", "4")).stdout.strip() == "0011aabb"
    _ok(daemon.ctl("guest-write", "web", "0x300000", "feed", "--shared"))
    assert _ok(daemon.ctl("guest-read", "web", "3145728", "2")).stdout.strip() == "feed"

    v = daemon.ctl_json("verify", "web")
    assert v["name"] == "web" and v["ok"] is True and v["pages_checked"] > 0 and v["mismatches"] == []

    _ok(daemon.ctl("stop", "web"))
    res = daemon.ctl("status", "web")
    assert res.returncode == 1 and "no guest named 'web'" in res.stderr
    assert daemon.ctl_json("list") == []


def test_unknown_guest_exits_1_with_a_clear_message(daemon):
    for argv in (["status", "ghost"], ["verify", "ghost"], ["stop", "ghost"],
                 ["guest-read", "ghost", "0", "1"], ["migrate", "ghost", "--to", "127.0.0.1:9"]):
        res = daemon.ctl(*argv)
        assert res.returncode == 1, argv
        assert "no guest named 'ghost'" in res.stderr
        assert "Traceback" not in res.stderr


def test_bad_input_exits_2(daemon):
    res = daemon.ctl("launch", "g", "--memory", "lots")
    assert res.returncode == 2 and "--memory" in res.stderr
    res = daemon.ctl("launch", "g", "--memory", "1000")   # not 1 MiB of whole pages: daemon says so
    assert res.returncode == 2 and "memory" in res.stderr
    res = daemon.ctl("guest-write", "g", "0x0", "xyz")
    assert res.returncode == 2 and "HEX" in res.stderr
    assert not any("Traceback" in r for r in (res.stderr,))


def test_no_daemon_is_a_clear_message(tmp_path):
    path = str(tmp_path / "absent.sock")
    res = subprocess.run([sys.executable, "-m", "sevmigd", "ctl", "--control", path, "list"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"no sevmigd daemon listening on {path}" in res.stderr
    assert "Traceback" not in res.stderr


def test_server_info_shows_the_bound_port(daemon):
    info = daemon.ctl_json("server-info")
    assert info["listen"] == daemon.address
    assert daemon.port > 0 and info["listen"].endswith(f":{daemon.port}")
    assert info["control"] == daemon.control
    assert len(info["platform_id"]) == 64
    assert info["pid"] == daemon.pid


def test_sigterm_is_a_clean_exit_and_removes_the_socket(daemon):
    _ok(daemon.ctl("launch", "g", "--memory", "4M", "--dirty-rate", "1"))
    assert os.path.exists(daemon.control)
    assert daemon.terminate() == 0
    assert not os.path.exists(daemon.control)
    events = [line.get("event") for line in daemon.logs]
    assert "shutting_down" in events and "stopped" in events
    # vmm = "process" (the default): the guest's VMM runs on for the next daemon to adopt (issue 17)
    assert any(line.get("event") == "guests_left_running" and line["guests"] == ["g"]
               for line in daemon.logs)


def test_inline_guests_still_run_and_stop_with_their_daemon(daemons):
    """vmm = "inline" (guests inside the daemon, the fallback; the default is "process"): a guest launches,
    runs and verifies in the daemon process itself (no VMM), and a graceful stop stops it."""
    d = daemons("inline", config={"vmm": "inline"})
    _ok(d.ctl("launch", "g", "--memory", "4M", "--dirty-rate", "1"))
    st = d.execute("status", name="g")
    assert st["state"] == "running" and st["vmm"] is None, st
    assert d.vmm_manifests() == {}
    assert d.execute("verify", name="g")["ok"]
    assert d.terminate() == 0
    assert any(line.get("event") == "guests_stopped_by_shutdown" and line["guests"] == ["g"] for line in d.logs)


def test_sigint_is_graceful_too(daemon):
    daemon.send_signal(signal.SIGINT)
    assert daemon.proc.wait(30) == 0
    assert not os.path.exists(daemon.control)


def test_second_daemon_on_the_same_control_socket_is_refused(daemon, tmp_path):
    res = subprocess.run([sys.executable, "-m", "sevmigd", "serve", "--state-dir", str(daemon.state_dir),
                          "--control", daemon.control, "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "already serving" in res.stderr and "Traceback" not in res.stderr
    assert daemon.execute("list") == {"guests": []}  # the first one is unharmed


def test_first_start_creates_a_platform_then_reuses_it(daemons):
    d = daemons("fresh", init_platform=False)
    created = d.wait_for_log("platform_created")
    assert created["state_dir"] == str(d.state_dir)
    pid1 = d.execute("server-info")["platform_id"]
    assert d.terminate() == 0
    d2 = daemons("fresh", init_platform=False)
    assert d2.execute("server-info")["platform_id"] == pid1
    assert not any(line.get("event") == "platform_created" for line in d2.logs)


def test_sighup_reloads_what_can_be_reloaded(daemons):
    d = daemons(config={"max_incoming": 4})
    toml = d.workdir / "sevmigd.toml"
    write_config(toml, {"max_incoming": 2, "log_level": "debug", "listen": "127.0.0.1:1"})
    n = len(d.logs)
    d.send_signal(signal.SIGHUP)
    line = d.wait_for_log("reloaded", start=n)
    assert line["changed"] == ["max_incoming"]         # log_level equals the --log-level flag
    assert "listen" not in line["changed"]              # flags win; listen is not reloadable anyway
    # A broken file on reload keeps the old configuration and the daemon running.
    toml.write_text("max_incoming = 'x'\n")
    n = len(d.logs)
    d.send_signal(signal.SIGHUP)
    failed = d.wait_for_log("reload_failed", start=n)
    assert "max_incoming" in failed["error"]
    assert d.execute("server-info")["shutting_down"] is False


def test_logs_are_json_lines_on_stdout(daemon):
    assert daemon.raw_stdout and all(json.loads(line) for line in daemon.raw_stdout)
    assert {"event", "level", "timestamp"} <= set(daemon.ready)


def test_migrate_to_nowhere_exits_1_and_the_guest_keeps_running(daemon):
    import socket
    with socket.socket() as s:          # a port that is certainly closed: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        _ok(daemon.ctl("launch", "g", "--memory", "4M"))
        res = daemon.ctl("migrate", "g", "--to", f"127.0.0.1:{port}")
    assert res.returncode == 1 and res.stderr.strip() and "Traceback" not in res.stderr
    st = daemon.ctl_json("status", "g")
    assert st["state"] == "running" and st["sev_state"] == "RUNNING"
    assert st["migration"] is not None and st["migration"]["status"] == "failed"


class _FakeTty:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_line_shows_round_percent_rate_and_downtime():
    from sevmigd.cli.ctl import _ProgressLine

    tty = _FakeTty()
    p = _ProgressLine(tty)
    mib = 1 << 20
    p("progress", {"round": 0, "transferred": 1000, "total": 64 * mib, "remaining": 0, "status": "active"})
    p("progress", {"round": 1, "transferred": 1000 + 16 * mib, "total": 64 * mib, "remaining": 0,
                   "throughput_mbps": 400.0, "status": "active"})
    assert "round 1   25.0%" in tty.text and "50.0 MB/s" in tty.text and "remaining 48.0 MiB" in tty.text
    p("progress", {"round": 1, "transferred": 1000 + 64 * mib, "total": 64 * mib, "remaining": 8 * mib,
                   "expected_downtime_ms": 120.4, "status": "active"})
    p("progress", {"round": 2, "transferred": 1000 + 68 * mib, "total": 64 * mib, "remaining": 8 * mib,
                   "expected_downtime_ms": 120.4, "status": "active"})
    assert "round 2   50.0%" in tty.text and "expected downtime 120 ms" in tty.text
    p.finish()
    assert tty.text.endswith("\n")
    quiet = _ProgressLine(io.StringIO())   # not a TTY: no progress output at all
    quiet("progress", {"round": 1})
    assert not quiet.shown


def test_sigterm_during_a_migration_answers_the_waiting_client(daemons):
    """Graceful shutdown cancels an outgoing migration before "go"; the `ctl migrate` that waits on
    it gets a real error reply (exit 1), the destination keeps nothing, both daemons exit 0."""
    a, b = daemons(), daemons()
    _ok(a.ctl("launch", "g", "--memory", "32M"))
    cmd = [sys.executable, "-m", "sevmigd", "ctl", "--control", a.control, "migrate", "g",
           "--to", b.address, "--max-bandwidth", "2"]   # ~16 s at 2 MiB/s: still running when we stop
    mig = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        a.wait_for_log(lambda line: "migration_id" in line and line.get("role", "source") == "source")
        assert a.terminate() == 0
        out, err = mig.communicate(timeout=60)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
    assert mig.returncode == 1
    assert "closed the connection" not in err and "Traceback" not in err
    assert "shut" in err.lower() or "cancel" in err.lower(), err
    assert b.execute("list") == {"guests": []}
    assert b.terminate() == 0
