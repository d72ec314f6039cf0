"""RUNTIME/psp (sevmigd.daemon.pspstate): the PSP's contexts and the ASID space survive a daemon restart on
the same runtime directory and are forgotten with a new one (issue 17).

In-process: the store behind a PspRunner, restored into a fresh Firmware; real daemons: SIGKILL and
restart keep every context (same handles, states, ASIDs), a graceful stop (which stops inline guests)
forgets them, a damaged file is reported and does not stop the other guests from being restored.
"""

from __future__ import annotations

import os
import stat

import pytest
import trio

from sevmigd.daemon import pspstate
from sevmigd.daemon.psprunner import PspRunner
from sevmigd.kvm.asid import AsidSpace, firmware_flush
from sevmigd.migrate.errors import FirmwareCommandError
from sevmigd.psp.firmware import Firmware, GuestState
from sevmigd.psp.keyslot import open_key_slot
from sevmigd.psp.memengine import PAGE_SIZE
from sevmigd.psp.status import SevStatus

from test_firmware import launch, start_migration
from test_firmware import fleet, ident_a, ident_b  # noqa: F401  (module fixtures)
from conftest import seeded_rng


class Host:
    """One daemon incarnation's PSP: Firmware + AsidSpace + PspRunner + PspStore on `runtime`."""

    def __init__(self, ident, runtime, seed):
        self.key = pspstate.load_or_create_sealing_key(runtime, seeded_rng(seed))
        self.fw = Firmware(ident, rng=seeded_rng(seed + 1), sealing_key=self.key)
        self.fw.init()
        self.asids = AsidSpace(firmware_flush(self.fw))
        self.runner = PspRunner(self.fw)
        self.store = pspstate.PspStore(runtime, self.fw, self.asids)
        self.report = self.store.restore()
        self.runner.store = self.store


def files(runtime) -> set[str]:
    return set(os.listdir(pspstate.psp_dir(runtime)))


async def test_contexts_survive_a_restart_and_go_with_decommission(ident_a, ident_b, tmp_path):
    run = tmp_path / "run"
    a = Host(ident_a, run, 1)
    assert files(run) == {"sealing.key"}
    assert stat.S_IMODE(os.stat(pspstate.psp_dir(run)).st_mode) == 0o700
    asid = a.asids.new(False)
    h, ram, plain, _ = await a.runner.run("LAUNCH", lambda: launch(a.fw, asid=asid, pages=8))
    asid2 = a.asids.new(False)
    h2, *_ = await a.runner.run("LAUNCH", lambda: launch(a.fw, asid=asid2, pages=2))
    # saved before run() returned: the files are there now
    assert files(run) == {"sealing.key", "guest-0001.ctx", "guest-0002.ctx", "asids.state"}
    for name in files(run):
        assert stat.S_IMODE(os.stat(pspstate.psp_dir(run) / name).st_mode) == 0o600
    # SEND_START to a destination, a few pages out: a context with an open channel
    dst = Firmware(ident_b, rng=seeded_rng(9))
    dst.init()
    dh, dram, _ = await a.runner.run("SEND_START", lambda: start_migration(a.fw, h, dst, ident_b, pages=8))
    hdrs, ct = await a.runner.run("SEND_UPDATE_DATA", lambda: a.fw.send_update_data_batch(h, range(4)))
    dst.receive_update_data_batch(dh, range(4), hdrs, ct)
    # guest 2 goes away: DEACTIVATE + DECOMMISSION delete its file; its ASID awaits a flush
    await a.runner.run("DECOMMISSION", lambda: (a.fw.deactivate(h2), a.fw.decommission(h2)))
    a.asids.free(asid2)
    assert "guest-0002.ctx" not in files(run)

    b = Host(ident_a, run, 1)                     # the restarted daemon, same runtime dir
    assert b.key == a.key and b.report.handles == [h] and not b.report.damaged
    assert b.fw.guest_status(h) == a.fw.guest_status(h)
    assert b.fw.guest_status(h).state == GuestState.SUPDATE
    assert b.asids.in_use == {asid} and asid2 in b.asids.awaiting_flush
    b.fw.map_guest_memory(h, ram)
    hdrs, ct = await b.runner.run("SEND_UPDATE_DATA", lambda: b.fw.send_update_data_batch(h, range(4, 8)))
    dst.receive_update_data_batch(dh, range(4, 8), hdrs, ct)
    await b.runner.run("SEND_FINISH", lambda: b.fw.send_finish(h))
    dst.receive_finish(dh)
    assert dst.memory_engine(dh).read(dram, 0, len(dram)) == plain
    # the key slot a VMM would open, with the key it reads from the runtime dir
    slot = b.fw.key_slot(h)
    assert open_key_slot(slot, pspstate.read_sealing_key(run)).read(ram, 0, PAGE_SIZE) == plain[:PAGE_SIZE]
    # reusing asid2 waits for WBINVD + DF_FLUSH, as before the restart
    flushes = b.fw.df_flush_count
    b.asids.restore(b.asids.in_use, b.asids.awaiting_flush | set(b.asids.range(False)) - {asid})
    assert b.asids.new(False) in b.asids.range(False) and b.fw.df_flush_count == flushes + 1

    c = Host(ident_a, tmp_path / "new-boot", 1)   # a host reboot: new runtime dir, nothing restored
    assert c.report.handles == [] and c.fw.guest_count == 0


async def test_damaged_foreign_and_misnamed_files_are_reported_not_fatal(ident_a, tmp_path):
    run = tmp_path / "run"
    a = Host(ident_a, run, 2)
    handles = []
    for _ in range(4):
        asid = a.asids.new(False)
        h, *_ = await a.runner.run("LAUNCH", lambda: launch(a.fw, asid=asid, pages=1))
        handles.append(h)
    d = pspstate.psp_dir(run)
    blob = bytearray((d / "guest-0001.ctx").read_bytes())
    blob[-1] ^= 1
    (d / "guest-0001.ctx").write_bytes(bytes(blob))                   # damaged
    os.rename(d / "guest-0002.ctx", d / "guest-0007.ctx")              # another handle's file
    other = Host(ident_a, tmp_path / "other", 3)                      # another runtime dir's handle 4
    for _ in range(4):
        asid = other.asids.new(False)
        await other.runner.run("LAUNCH", lambda: launch(other.fw, asid=asid, pages=1))
    (d / "guest-0004.ctx").write_bytes((pspstate.psp_dir(tmp_path / "other") / "guest-0004.ctx").read_bytes())

    b = Host(ident_a, run, 2)
    assert b.report.handles == [3]
    damaged = dict(b.report.damaged)
    assert set(damaged) == {str(d / "guest-0001.ctx"), str(d / "guest-0007.ctx"), str(d / "guest-0004.ctx")}
    assert "damaged" in damaged[str(d / "guest-0001.ctx")] and "foreign" in damaged[str(d / "guest-0004.ctx")]
    kept = {n.split(".damaged-")[0] for n in files(run) if ".damaged-" in n}
    assert kept == {"guest-0001.ctx", "guest-0007.ctx", "guest-0004.ctx"}          # kept for inspection
    assert Host(ident_a, run, 2).report.damaged == []                                # and reported once


def test_a_damaged_sealing_key_is_set_aside_and_replaced(ident_a, tmp_path):
    run = tmp_path / "run"
    key = pspstate.load_or_create_sealing_key(run, seeded_rng(8))
    assert pspstate.load_or_create_sealing_key(run, seeded_rng(9)) == key == pspstate.read_sealing_key(run)
    path = pspstate.psp_dir(run) / "sealing.key"
    os.chmod(path, 0o644)                                 # others could have read it: not used
    new = pspstate.load_or_create_sealing_key(run, seeded_rng(9))
    assert new != key and len(new) == 32
    assert [n for n in files(run) if n.startswith("sealing.key.damaged-")]
    path.write_bytes(b"short")
    assert pspstate.load_or_create_sealing_key(run, seeded_rng(10)) not in (key, new)


async def test_lost_asid_record_means_every_free_asid_awaits_a_flush(ident_a, tmp_path):
    run = tmp_path / "run"
    a = Host(ident_a, run, 4)
    asid = a.asids.new(True)
    await a.runner.run("LAUNCH", lambda: launch(a.fw, asid=asid, pages=1))
    os.unlink(pspstate.psp_dir(run) / "asids.state")
    b = Host(ident_a, run, 4)
    assert b.asids.in_use == {asid}
    assert b.asids.awaiting_flush == set(range(1, 510)) - {asid}


async def test_a_failed_save_is_logged_and_retried(ident_a, tmp_path, monkeypatch):
    run = tmp_path / "run"
    a = Host(ident_a, run, 5)
    real = pspstate.write_atomic

    def full(path, data, mode):
        raise pspstate.StoreError(path, "cannot write: No space left on device")

    monkeypatch.setattr(pspstate, "write_atomic", full)
    asid = a.asids.new(False)
    h, *_ = await a.runner.run("LAUNCH", lambda: launch(a.fw, asid=asid, pages=1))
    assert a.store.save_errors == 2 and a.store.pending()
    assert "guest-0001.ctx" not in files(run)
    monkeypatch.setattr(pspstate, "write_atomic", real)
    await a.runner.persist_now()
    assert not a.store.pending() and {"guest-0001.ctx", "asids.state"} <= files(run)


async def test_a_failing_command_sequence_still_saves_what_it_changed(ident_a, tmp_path):
    run = tmp_path / "run"
    a = Host(ident_a, run, 6)

    def launch_then_fail():
        h = a.fw.launch_start(policy=0)
        a.fw.activate(h, 200)
        a.fw.launch_update_data(h, 8, 16)          # not mapped: INVALID_ADDRESS

    with pytest.raises(FirmwareCommandError) as ei:
        await a.runner.run("LAUNCH", launch_then_fail)
    assert ei.value.status == SevStatus.INVALID_ADDRESS
    assert "guest-0001.ctx" in files(run)


async def test_the_watch_task_saves_direct_firmware_calls(ident_a, tmp_path):
    run = tmp_path / "run"
    a = Host(ident_a, run, 7)
    asid = a.asids.new(False)
    h, *_ = await a.runner.run("LAUNCH", lambda: launch(a.fw, asid=asid, pages=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.store.watch, a.runner)
        a.fw.deactivate(h)                     # e.g. a guest released outside the runner
        a.fw.decommission(h)
        with trio.fail_after(10):
            while "guest-0001.ctx" in files(run):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


# --- real daemons -------------------------------------------------------------------------------------------

def _psp(d) -> dict:
    return d.ctl_json("server-info")["psp_state"]


def test_daemon_restart_restores_the_psp_and_a_new_runtime_dir_forgets(daemon):
    assert daemon.ctl("launch", "g1", "--memory", "4M").returncode == 0
    assert daemon.ctl("launch", "g2", "--memory", "4M", "--policy", "0x4").returncode == 0   # SEV-ES
    before = _psp(daemon)
    assert [c["state"] for c in before["contexts"]] == ["RUNNING", "RUNNING"]
    psp_files = set(os.listdir(before["dir"]))
    assert {"sealing.key", "guest-0001.ctx", "guest-0002.ctx", "asids.state"} <= psp_files
    assert daemon.ctl("stop", "g1").returncode == 0
    assert "guest-0001.ctx" not in os.listdir(before["dir"])

    daemon.restart()                                    # SIGKILL, then the same runtime dir
    after = _psp(daemon)
    assert after["contexts"] == before["contexts"][1:]
    assert after["restored"] == [2] and after["damaged"] == []
    assert daemon.ctl_json("server-info")["psp_guests"] == 1
    human = daemon.ctl("server-info").stdout
    assert "contexts 2:RUNNING/asid " in human and "restored 1" in human
    with open(os.path.join(before["dir"], "sealing.key"), "rb") as f:
        key = f.read()
    assert key.hex() not in daemon.output() and repr(key) not in daemon.output()


def test_daemon_restart_reports_a_damaged_context_and_restores_the_others(daemon):
    for name in ("a", "b"):
        assert daemon.ctl("launch", name, "--memory", "4M").returncode == 0
    psp_dir = _psp(daemon)["dir"]
    daemon.kill()
    path = os.path.join(psp_dir, "guest-0001.ctx")
    with open(path, "r+b") as f:
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0xFF]))
    daemon.spawn()
    daemon.wait_ready()
    info = _psp(daemon)
    assert info["restored"] == [2]
    assert [d["path"] for d in info["damaged"]] == [path]
    assert daemon.wait_for_log("psp_state_damaged")["path"] == path
    assert [n for n in os.listdir(psp_dir) if n.startswith("guest-0001.ctx.damaged-")]
    # the daemon serves on: a new guest gets a fresh handle and an ASID the restored guest does not hold
    assert daemon.ctl("launch", "c", "--memory", "4M").returncode == 0
    asids = [c["asid"] for c in _psp(daemon)["contexts"]]
    assert len(set(asids)) == len(asids) == 2
