"""End to end, SEV-ES with several vCPUs: real daemons migrate a 4-vCPU SEV-ES guest under load; each
vCPU's VMSA page crosses as its own SEND/RECEIVE_UPDATE_VMSA packet (VcpuState carries 4 of them), and
the guest verifies on the destination and again after coming back."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

CTL_TIMEOUT = 120


def ctl_json(d, *argv):
    res = d.ctl(*argv, "--json", timeout=CTL_TIMEOUT)
    assert res.returncode == 0, f"ctl {argv} -> {res.returncode}\n{res.stdout}{res.stderr}\n{d.output()[-4000:]}"
    return json.loads(res.stdout)


def test_four_vcpu_sev_es_guest_migrates_under_load(daemons):
    a, b = daemons(), daemons()
    st = ctl_json(a, "launch", "es4", "--memory", "32M", "--policy", "0x4", "--vcpus", "4",
                  "--dirty-rate", "8", "--shared-fraction", "0.2", "--flip-rate", "5")
    assert st["vcpus"] == 4 and st["policy"] == "0x4"
    stats = ctl_json(a, "migrate", "es4", "--to", b.address)
    assert stats["status"] == "completed" and stats["round"] >= 2
    st = ctl_json(b, "status", "es4")
    assert st["state"] == "running" and st["sev_state"] == "RUNNING" and st["vcpus"] == 4
    v = ctl_json(b, "verify", "es4")
    assert v["ok"] and v["mismatch_count"] == 0 and v["pages_checked"] > 0
    assert ctl_json(b, "migrate", "es4", "--to", a.address)["status"] == "completed"
    v = ctl_json(a, "verify", "es4")
    assert v["ok"] and v["mismatch_count"] == 0
