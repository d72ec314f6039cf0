"""Guests outlive the daemon (issue 17): real `sevmigd serve` daemons with vmm = "process", real VMM processes.

Every wait has a deadline and waits for a fact (a log line, a process exit, a counter that moved), never
for time. Guests are small (16-32 MiB). The harness kills the VMMs a test leaves behind (DaemonProcess.
cleanup -> kill_vmms).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sevmigd.daemon.client import ControlError
from sevmigd.daemon.vmmhost import VmmClient
from sevmigd.testing.daemons import child_env

pytestmark = pytest.mark.slow

PROCESS = {"vmm": "process"}
CTL_TIMEOUT = 120
#: Deadline for a fact to appear (a counter to move, a process to exit) on a loaded 2-core machine.
DEADLINE_S = 60.0


def _until(what: str, fn, timeout: float = DEADLINE_S):
    """Poll `fn()` until truthy (a fact, not a time), failing after `timeout`."""
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _vmm_status(d, name: str) -> dict:
    """Ask the guest's VMM itself (its own socket), as a second client: works while the daemon is down."""
    info = d.vmm_manifests()[name]
    path = os.path.join(d.runtime_dir, "vmm", f"{info['id']}.sock")
    c = VmmClient.connect(path, name)
    try:
        return c.call("status")
    finally:
        c.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _states(d) -> dict[str, str]:
    return {g["name"]: g["state"] for g in d.execute("list", timeout=CTL_TIMEOUT)["guests"]}


def _launch_three(d):
    d.execute("launch", name="busy", memory="32M", dirty_rate=8.0, flip_rate=2.0, shared_fraction=0.1,
              timeout=CTL_TIMEOUT)
    d.execute("launch", name="idle", memory="16M", timeout=CTL_TIMEOUT)
    d.execute("launch", name="es", memory="16M", policy=0x5, vcpus=2, timeout=CTL_TIMEOUT)
    d.execute("guest-write", name="idle", gpa=0x200000, data_hex="c0ffee" * 100, timeout=CTL_TIMEOUT)
    return ("busy", "idle", "es")


def _check_after_restart(d, names, before: dict):
    assert _states(d) == {n: "running" for n in names}
    for n in names:
        st = d.execute("status", name=n, timeout=CTL_TIMEOUT)
        assert st["sev_state"] == "RUNNING", st
        # exactly as before: identity, launch measurement, ASID, the same VMM process
        for k in ("memory_bytes", "policy", "asid", "launch_digest", "measurement", "vcpus"):
            assert st[k] == before[n][k], (n, k, st[k], before[n][k])
        assert st["vmm"]["pid"] == before[n]["vmm"]["pid"]
        v = d.execute("verify", name=n, timeout=CTL_TIMEOUT)
        assert v["ok"] and v["mismatch_count"] == 0, v
    got = d.execute("guest-read", name="idle", gpa=0x200000, length=300, timeout=CTL_TIMEOUT)
    assert got["data_hex"] == "c0ffee" * 100


@pytest.mark.parametrize("how", ["sigkill", "graceful"])
def test_guests_outlive_a_daemon_restart(daemons, how):
    d = daemons("host", config=PROCESS)
    names = _launch_three(d)
    before = {n: d.execute("status", name=n, timeout=CTL_TIMEOUT) for n in names}
    if how == "sigkill":
        d.kill()
    else:
        assert d.terminate() == 0
        d.wait_for_log("guests_left_running", start=0)
    # The daemon is down: the busy guest's workload runs on (its VMM's own counters move).
    runs0 = _vmm_status(d, "busy")["runs"]
    _until("the busy guest to run while the daemon is down", lambda: _vmm_status(d, "busy")["runs"] > runs0 + 5)
    d.spawn()
    d.wait_ready()
    assert {r["guest"] for r in d.logs[d._mark:] if r.get("event") == "vmm_adopted"} == set(names)
    _check_after_restart(d, names, before)
    after = d.execute("status", name="busy", timeout=CTL_TIMEOUT)["vmm"]
    assert after["runs"] > runs0 + 5 and after["run_s"] > before["busy"]["vmm"]["run_s"]


def test_adopted_guests_still_migrate(daemons):
    """The PSP contexts came back with the VMMs: an adopted guest migrates (SEND_* on the restored context,
    the dirty log and bitmaps of the shared state area) and verifies on the other side."""
    src = daemons("src", config=PROCESS)
    dst = daemons("dst", config=PROCESS)
    src.execute("launch", name="g", memory="32M", dirty_rate=8.0, shared_fraction=0.2, flip_rate=2.0,
                timeout=CTL_TIMEOUT)
    src.execute("launch", name="ges", memory="16M", policy=0x5, timeout=CTL_TIMEOUT)
    src.kill()
    src.spawn()
    src.wait_ready()
    for name in ("g", "ges"):
        r = src.execute("migrate", name=name, to=dst.address, timeout=CTL_TIMEOUT)
        assert r["status"] == "completed", r
        v = dst.execute("verify", name=name, timeout=CTL_TIMEOUT)
        assert v["ok"] and v["mismatch_count"] == 0, v
        assert name not in src.vmm_manifests()       # the source's VMM quit after the hand-off
        assert name in dst.vmm_manifests()


def test_a_killed_vmm_is_a_crashed_guest_and_nothing_else_is(daemons):
    d = daemons("host", config=PROCESS)
    d.execute("launch", name="victim", memory="16M", dirty_rate=4.0, timeout=CTL_TIMEOUT)
    d.execute("launch", name="other", memory="16M", dirty_rate=4.0, timeout=CTL_TIMEOUT)
    victim = d.execute("status", name="victim", timeout=CTL_TIMEOUT)
    pid = victim["vmm"]["pid"]
    mark = len(d.logs)
    os.kill(pid, signal.SIGKILL)
    rec = d.wait_for_log("guest_crashed", timeout=DEADLINE_S, start=mark)
    assert rec["guest"] == "victim" and "SIGKILL" in rec["reason"]
    st = d.execute("status", name="victim", timeout=CTL_TIMEOUT)
    assert st["state"] == "crashed" and "SIGKILL" in st["error"]
    assert st["sev_state"] in (None, "UNINIT")          # its PSP context is decommissioned
    for verb, args in (("verify", {}), ("migrate", {"to": "127.0.0.1:9"})):
        _refused_unavailable(d, verb, "victim", "GUEST_CRASHED", **args)
    # the others are untouched and the daemon serves on
    assert d.execute("verify", name="other", timeout=CTL_TIMEOUT)["ok"]
    d.execute("launch", name="new", memory="16M", timeout=CTL_TIMEOUT)
    assert _states(d) == {"victim": "crashed", "other": "running", "new": "running"}
    # the ASID came back (SEV range starts at 100: victim 100, other 101; new may reuse 100 after a flush)
    assert d.execute("status", name="new", timeout=CTL_TIMEOUT)["asid"] != \
        d.execute("status", name="other", timeout=CTL_TIMEOUT)["asid"]
    d.execute("stop", name="victim", timeout=CTL_TIMEOUT)   # the operator clears it from the list
    assert "victim" not in _states(d)


def _refused_unavailable(d, verb: str, name: str, code: str, **args) -> None:
    """`verb` on guest `name` is refused with the typed GuestUnavailable error and its code."""
    with pytest.raises(ControlError) as ei:
        d.execute(verb, name=name, timeout=CTL_TIMEOUT, **args)
    assert ei.value.error_class == "GuestUnavailable", (verb, ei.value.reply)
    assert ei.value.reply["error"]["code"] == code, (verb, ei.value.reply)


def test_a_guest_that_dies_inside_its_live_vmm_is_crashed_and_never_moved(daemons):
    """The guest kernel panics (an NMI, as QEMU's inject-nmi with unknown_nmi_panic) while its VMM lives on:
    the guest is `crashed` with the VMM's reason, its VMM quits and its PSP context goes; migrate and the
    guest verbs refuse it with GuestUnavailable / GUEST_CRASHED, an evacuation leaves it (with that code)
    and moves the other guest; the daemon serves on."""
    src = daemons("src", config=PROCESS)
    dst = daemons("dst", config=PROCESS)
    src.execute("launch", name="victim", memory="16M", dirty_rate=4.0, timeout=CTL_TIMEOUT)
    src.execute("launch", name="other", memory="16M", dirty_rate=4.0, timeout=CTL_TIMEOUT)
    mark = len(src.logs)
    info = src.vmm_manifests()["victim"]
    c = VmmClient.connect(os.path.join(src.runtime_dir, "vmm", f"{info['id']}.sock"), "victim")
    try:
        c.call("inject_nmi")
    finally:
        c.close()
    rec = src.wait_for_log("guest_crashed", timeout=DEADLINE_S, start=mark)
    assert rec["guest"] == "victim" and "NMI" in rec["reason"], rec
    st = src.execute("status", name="victim", timeout=CTL_TIMEOUT)
    assert st["state"] == "crashed" and "GuestPanic" in st["error"] and "NMI" in st["error"], st
    _until("the victim's VMM to quit", lambda: "victim" not in src.vmm_manifests())
    _until("its PSP context to go", lambda: src.execute("status", name="victim")["sev_state"] in (None, "UNINIT"))
    for verb, args in (("migrate", {"to": dst.address}), ("verify", {}), ("guest-read", {"gpa": 0x200000,
                                                                                        "length": 16})):
        _refused_unavailable(src, verb, "victim", "GUEST_CRASHED", **args)
    ev = src.execute("evacuate", to=[dst.address], timeout=CTL_TIMEOUT)
    rows = {r["guest"]: r for r in ev["guests"]}
    assert rows["victim"]["state"] == "left" and rows["victim"]["code"] == "GUEST_CRASHED", rows
    assert "NMI" in rows["victim"]["reason"]
    assert rows["other"]["state"] == "done", rows
    assert dst.execute("verify", name="other", timeout=CTL_TIMEOUT)["ok"]
    assert _states(src) == {"victim": "crashed", "other": "migrated"} or _states(src) == {"victim": "crashed"}
    src.execute("stop", name="victim", timeout=CTL_TIMEOUT)
    assert "victim" not in _states(src)
    assert src.execute("server-info", timeout=CTL_TIMEOUT)["psp_guests"] == 0


def test_a_guest_that_died_in_its_vmm_while_the_daemon_was_down_is_crashed_after_the_restart(daemons):
    d = daemons("host", config=PROCESS)
    d.execute("launch", name="g", memory="16M", timeout=CTL_TIMEOUT)
    d.kill()
    info = d.vmm_manifests()["g"]
    c = VmmClient.connect(os.path.join(d.runtime_dir, "vmm", f"{info['id']}.sock"), "g")
    try:
        c.call("inject_nmi")
        _until("the guest to panic in its VMM", lambda: c.call("status")["phase"] == "crashed")
    finally:
        c.close()
    d.spawn()
    d.wait_ready()
    st = d.execute("status", name="g", timeout=CTL_TIMEOUT)   # never listed as running
    assert st["state"] == "crashed" and "NMI" in st["error"], st
    _refused_unavailable(d, "migrate", "g", "GUEST_CRASHED", to="127.0.0.1:9")
    _until("its VMM to quit", lambda: d.vmm_manifests() == {})
    d.execute("stop", name="g", timeout=CTL_TIMEOUT)
    assert d.execute("server-info", timeout=CTL_TIMEOUT)["psp_guests"] == 0


def test_a_vmm_that_died_while_the_daemon_was_down_is_reported_crashed(daemons):
    d = daemons("host", config=PROCESS)
    d.execute("launch", name="gone", memory="16M", timeout=CTL_TIMEOUT)
    d.execute("launch", name="kept", memory="16M", timeout=CTL_TIMEOUT)
    pid = d.execute("status", name="gone", timeout=CTL_TIMEOUT)["vmm"]["pid"]
    d.kill()
    os.kill(pid, signal.SIGKILL)
    _until("the VMM to be gone", lambda: not _alive(pid))
    d.spawn()
    d.wait_ready()
    st = d.execute("status", name="gone", timeout=CTL_TIMEOUT)
    assert st["state"] == "crashed" and "gone while the daemon was down" in st["error"]
    assert _states(d)["kept"] == "running"
    assert d.execute("verify", name="kept", timeout=CTL_TIMEOUT)["ok"]


def test_a_vmm_of_another_protocol_version_is_reported_and_left_running(daemons):
    d = daemons("host", config=PROCESS)
    r, w = os.pipe()
    old = subprocess.Popen([sys.executable, "-m", "sevmigd", "vmm", "--runtime-dir", d.runtime_dir,
                            "--id", "0123456789abcdef", "--name", "old", "--memory", str(1 << 20),
                            "--protocol", "99", "--ready-fd", str(w)],
                           pass_fds=(w,), start_new_session=True, env=child_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            assert f.readline() == b"ready\n"
        assert d.terminate() == 0
        d.spawn()
        d.wait_ready()
        st = d.execute("status", name="old", timeout=CTL_TIMEOUT)
        assert st["state"] == "incompatible"
        assert "protocol 99" in st["error"] and "left running" in st["error"]
        with pytest.raises(ControlError) as ei:
            d.execute("stop", name="old", timeout=CTL_TIMEOUT)
        assert ei.value.error_class == "InvalidState"
        _refused_unavailable(d, "migrate", "old", "GUEST_INCOMPATIBLE", to="127.0.0.1:9")
        ev = d.execute("evacuate", to=["127.0.0.1:9"], timeout=CTL_TIMEOUT)
        assert [(r["guest"], r["state"], r["code"]) for r in ev["guests"]] == [("old", "left", "GUEST_INCOMPATIBLE")]
        assert old.poll() is None                   # never killed
        assert d.terminate() == 0
        assert old.poll() is None
    finally:
        old.kill()
        old.wait()


def test_two_daemons_never_share_a_runtime_directory(daemons, tmp_path):
    d = daemons("host", config=PROCESS)
    res = subprocess.run([sys.executable, "-m", "sevmigd", "serve", "--state-dir", str(d.state_dir),
                          "--control", str(tmp_path / "other.sock"), "--runtime-dir", d.runtime_dir,
                          "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60, env=child_env())
    assert res.returncode == 1
    assert "already serving runtime directory" in res.stderr and "Traceback" not in res.stderr
    assert d.execute("list", timeout=CTL_TIMEOUT) == {"guests": []}
