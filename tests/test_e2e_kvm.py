"""End to end through the KVM layer: real daemons, real TCP on loopback, the CLI as a user runs it.

* Each page-state hypercall dialect (`ctl launch --hypercall map-gpa-range | page-enc-status`) migrates a
  guest under load (writes, shared pages, private<->shared flips) with 0 mismatches, there and back; the
  destination builds its bitmap either way (the way back depends on it), and `ctl reboot` on the
  destination resets the bitmaps (the guest boots again, re-reports its shared pages, and migrates back).
* The faithful per-page path (config `sev_batch_pages = false`: one KVM_SEV_SEND/RECEIVE_UPDATE_DATA ioctl
  per page, as upstream KVM and QEMU) migrates a guest under load with 0 mismatches too.

Rules as tests/test_e2e_migration.py: loopback and port 0 only, every wait has a deadline, no sleeps.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def ctl_json(d, *argv):
    return d.ctl_json(*argv)      # the harness's: `ctl ... --json`, checked, parsed


def verified(d, name):
    v = ctl_json(d, "verify", name)
    assert v["ok"] and v["mismatch_count"] == 0 and v["pages_checked"] > 0, v
    return v


@pytest.mark.parametrize("dialect,bitmap", [("map-gpa-range", "vmm"), ("page-enc-status", "kvm")])
def test_each_hypercall_dialect_migrates_under_load_and_reboot_resets_the_bitmap(daemons, dialect, bitmap):
    a, b = daemons(), daemons()
    st = ctl_json(a, "launch", "g", "--memory", "32M", "--dirty-rate", "8", "--shared-fraction", "0.25",
                  "--flip-rate", "40", "--seed", "11", "--hypercall", dialect)
    assert st["page_enc_bitmap"] == bitmap          # who keeps the answer: the VMM (exits) or KVM (RFC)
    stats = ctl_json(a, "migrate", "g", "--to", b.address)
    assert stats["status"] == "completed" and stats["private_pages"] > 0 and stats["shared_pages"] > 0
    verified(b, "g")
    before = ctl_json(b, "status", "g")
    st = ctl_json(b, "reboot", "g")
    assert st["state"] == "running" and st["sev_state"] == "RUNNING"
    assert st["shared_pages"] > 0 and st["private_pages"] + st["shared_pages"] == before["private_pages"] + before["shared_pages"]
    verified(b, "g")
    back = ctl_json(b, "migrate", "g", "--to", a.address)
    assert back["status"] == "completed" and back["shared_pages"] > 0
    verified(a, "g")
    assert ctl_json(a, "status", "g")["page_enc_bitmap"] in ("vmm", "kvm")


def test_reboot_is_refused_for_a_guest_that_is_not_running_here(daemons):
    a, b = daemons(), daemons()
    ctl_json(a, "launch", "g", "--memory", "16M")
    assert ctl_json(a, "migrate", "g", "--to", b.address)["status"] == "completed"
    res = a.ctl("reboot", "g")
    assert res.returncode != 0 and "migrated" in (res.stdout + res.stderr)
    res = a.ctl("reboot", "nosuch")
    assert res.returncode != 0


def test_one_ioctl_per_page_path_migrates_under_load(daemons):
    cfg = {"sev_batch_pages": False}
    a, b = daemons(config=cfg), daemons(config=cfg)
    ctl_json(a, "launch", "p", "--memory", "16M", "--dirty-rate", "4", "--shared-fraction", "0.2",
             "--flip-rate", "20", "--seed", "5", "--hypercall", "page-enc-status")
    stats = ctl_json(a, "migrate", "p", "--to", b.address)
    assert stats["status"] == "completed" and stats["private_pages"] > 0 and stats["shared_pages"] > 0
    verified(b, "p")
