"""The test harness itself (sevmigd/testing): what the fault cells rely on when a cell goes wrong.

A fault cell that fails inside the harness calls `Harness._recover()`, which must leave both daemons
serving and the guest running somewhere, whatever state the error left them in. A daemon process that
runs without serving (its control socket gone: a restart the error interrupted, after spawn() removed the
old socket; a daemon that stopped or crashed and removed its socket but has not exited yet) once made
`_recover` raise DaemonNotRunning and fail the next cells too (kill_dst@confirmation, stop_dst@readiness
under load). These tests put a daemon in those states on purpose.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from sevmigd.testing import invariants as inv
from sevmigd.testing.cells import Harness
from sevmigd.testing.daemons import DaemonStartError


async def _serves(d) -> bool:
    _, err = await d.try_call("server-info", timeout=30)
    return err is None


async def _guest_runs_once(h: Harness) -> list[str]:
    c = await inv.copies(h.daemons, h.guest)
    return c.running_on()


async def test_recover_restarts_a_daemon_that_runs_without_its_control_socket(tmp_path):
    async with Harness(tmp_path) as h:
        a = h.daemons[0]
        pid = a.pid
        os.unlink(a.control)          # the process runs on; nothing answers at its socket path
        assert a.alive and not await _serves(a)
        await h._recover()
        assert await _serves(a) and a.pid != pid, "the daemon that did not serve was restarted"
        assert len(await _guest_runs_once(h)) == 1
        assert await _serves(h.daemons[1])


async def test_recover_restarts_a_daemon_whose_restart_was_interrupted(tmp_path):
    async with Harness(tmp_path) as h:
        b = h.daemons[1]
        # A restart cut short right after the fork: the new process has not bound its socket yet.
        await trio.to_thread.run_sync(b.kill)
        b.spawn()
        await h._recover()
        assert await _serves(b)
        assert len(await _guest_runs_once(h)) == 1


async def test_a_restart_that_does_not_get_ready_leaves_no_process(tmp_path, monkeypatch):
    async with Harness(tmp_path) as h:
        b = h.daemons[1]

        def not_ready(timeout: float = 0) -> dict:
            raise DaemonStartError("no ready line (injected)")

        monkeypatch.setattr(b, "wait_ready", not_ready)
        with pytest.raises(DaemonStartError):
            await b.arestart()
        assert not b.alive and b.proc is not None and b.proc.poll() is not None
        monkeypatch.undo()
        real_spawn = b.spawn
        with trio.CancelScope() as scope:   # cancelled between the fork and readiness: killed as well

            def spawn_then_cancel() -> None:
                real_spawn()
                scope.cancel()

            monkeypatch.setattr(b, "spawn", spawn_then_cancel)
            await b.arestart()
        assert scope.cancelled_caught and b.starts >= 2
        assert not b.alive and b.proc is not None and b.proc.poll() is not None
        monkeypatch.undo()
        await h._recover()
        assert await _serves(b)


def test_log_lines_carry_when_the_daemon_wrote_them(daemon):
    """`_t_emit`: the arrival time less the line's age by the daemon's own timestamp, on the same clock."""
    r = daemon.wait_for_log("ready")
    assert isinstance(r.get("timestamp"), str)
    assert r["_t"] - 30.0 < r["_t_emit"] <= r["_t"]   # read at most 30 s after it was written, even loaded


def test_detection_is_timed_from_when_the_daemon_logged():
    """A failure logged 1.0 s after the fault but read 3.0 s after it (a loaded reader) is within a 2.5 s
    bound; one the daemon itself logged late is not."""
    read_late = {"_t": 13.0, "_t_emit": 11.0, "event": "migration_failed", "code": "TIMEOUT", "error": "x"}
    assert inv.check_detection(read_late, 10.0, 2.5, "src") == ([], 1.0)
    logged_late = dict(read_late, _t_emit=12.9)
    assert inv.check_detection(logged_late, 10.0, 2.5, "src")[0][0].startswith("I4 src detected the fault after 2.90 s")


async def test_a_harness_error_reports_each_daemons_state_and_recovers(tmp_path, monkeypatch):
    async with Harness(tmp_path) as h:
        async def broken(res):
            os.unlink(h.daemons[0].control)
            raise RuntimeError("injected")

        monkeypatch.setattr(h, "_cell", broken)
        r = await h.run_cell("reset", "handshake", 0)
        assert r.outcome == "error" and "ERR harness: RuntimeError: injected" in r.failures
        assert any(f.startswith("ERR harness: daemon a:") and "control socket missing" in f for f in r.failures)
        assert any(f.startswith("ERR harness: daemon b:") and "control socket present" in f for f in r.failures)
        assert await _serves(h.daemons[0]) and len(await _guest_runs_once(h)) == 1


async def test_a_cancelled_start_leaves_no_daemon(tmp_path, monkeypatch):
    from sevmigd.testing import daemons as dm
    started = []
    real_spawn = dm.DaemonProcess.spawn
    with trio.CancelScope() as scope:

        def spawn_then_cancel(self) -> None:
            real_spawn(self)
            started.append(self)
            scope.cancel()

        monkeypatch.setattr(dm.DaemonProcess, "spawn", spawn_then_cancel)
        await dm.astart_daemon(tmp_path, "x")
    assert scope.cancelled_caught and len(started) == 1
    d = started[0]
    assert d.proc is not None and d.proc.poll() is not None and not os.path.exists(d.control)


class _FakeDaemon:
    """What check_leaks reads of a daemon: `list` and `server-info` replies."""

    name, alive = "d", True

    def __init__(self, guests: dict, info: dict):
        self.replies = {"list": {"guests": [{"name": n, "state": s} for n, s in guests.items()]},
                        "server-info": info}

    async def try_call(self, verb, args=None, **kw):
        return self.replies[verb], None

    def open_fds(self):
        return None


async def test_leak_check_counts_a_guests_own_tasks_apart(monkeypatch):
    """A guest that arrived brings its own tasks (one vCPU loop inline, a watch and its guest check with a
    VMM process): allowed. A daemon task more (a handler or migration task left behind) is a leak, and so
    is a guest task more when no guest arrived."""
    monkeypatch.setattr(inv, "SETTLE_DEADLINE_S", 0.0)
    base_info = {"open_fds": 30, "tasks": 11, "guest_tasks": 0, "psp_guests": 0, "guest_ram_bytes": 0}
    base = inv.Baseline(None, base_info, {})
    arrived = dict(base_info, open_fds=30, tasks=13, guest_tasks=2, psp_guests=1, guest_ram_bytes=16)
    assert await inv.check_leaks(_FakeDaemon({"g": "running"}, arrived), base, guest="g", guest_bytes=16) == []
    leaked = dict(arrived, tasks=14)
    assert "tasks not of a guest: 11 before the cell, 12 after" in \
        (await inv.check_leaks(_FakeDaemon({"g": "running"}, leaked), base, guest="g", guest_bytes=16))[0]
    stray = dict(base_info, tasks=12, guest_tasks=1)
    assert "no guest arrived" in (await inv.check_leaks(_FakeDaemon({}, stray), base, guest="g"))[0]


def test_server_info_counts_a_guests_own_tasks(daemon):
    before = daemon.execute("server-info")
    assert before["guest_tasks"] == 0 and before["tasks"] > 0
    daemon.execute("launch", name="g", memory="4M")
    assert daemon.execute("server-info")["guest_tasks"] >= 1      # its vCPU loop (or its VMM's watch)
    daemon.execute("stop", name="g")
    deadline = time.monotonic() + 30
    while (n := daemon.execute("server-info")["guest_tasks"]) and time.monotonic() < deadline:
        time.sleep(0.05)   # polling an effect (the stopped guest's tasks end), bounded by the deadline
    assert n == 0


def test_cleanup_reaps_the_vmms_of_a_daemon_with_its_own_control_socket(daemons, tmp_path):
    """VMMs outlive their daemon by design, so the harness reaps them at a test's end. A daemon whose test
    chose its control socket (so the runtime directory is `<control>.run`, not the harness's) once left its
    VMM running for good after the sandboxed-unit test."""
    d = daemons("own", control=str(tmp_path / "own" / "control.sock"), config={"vmm": "process"})
    assert d.runtime_dir == str(tmp_path / "own" / "control.run")
    d.execute("launch", name="g", memory="4M")
    pid = d.vmm_manifests()["g"]["pid"]
    os.kill(pid, 0)                       # the guest's VMM runs
    assert d.terminate() == 0             # a graceful stop leaves VMM guests running ...
    os.kill(pid, 0)
    d.cleanup()                           # ... and the harness's cleanup reaps them
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)   # polling an effect (SIGKILL delivered, the orphan reaped by init), bounded
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
