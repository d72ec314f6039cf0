"""End to end, platform ownership: real `sevmigd` CLI runs (oca init, platform pek-csr / oca sign-pek /
platform pek-import, platform own) own real daemons' platforms; a DOMAIN-policy guest then migrates
within one owner's fleet and is refused (POLICY_FAILURE, guest untouched) towards another owner's
platform. Loopback and port 0 only; every wait has a deadline (sevmigd/testing/daemons.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sevmigd.testing.daemons import make_state_dir

pytestmark = pytest.mark.slow

CTL_TIMEOUT = 120
DOMAIN = "0x10"


def sevmigd(*argv) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "sevmigd", *map(str, argv)], capture_output=True, text=True,
                         timeout=CTL_TIMEOUT)
    assert res.returncode == 0, f"sevmigd {argv} -> {res.returncode}\n{res.stdout}{res.stderr}"
    return res


def ctl_json(d, *argv):
    res = d.ctl(*argv, "--json", timeout=CTL_TIMEOUT)
    assert res.returncode == 0, f"ctl {argv} -> {res.returncode}\n{res.stdout}{res.stderr}\n{d.output()[-4000:]}"
    return json.loads(res.stdout)


def owned_daemon(daemons, tmp_path, name, oca_dir, *, via_csr=False):
    root = tmp_path / name
    state = root / "state"
    make_state_dir(state)
    if via_csr:   # the fleet owner never touches the platform: CSR out, signed PEK in
        sevmigd("platform", "pek-csr", "--state-dir", state, "--out", root / "pek.csr")
        sevmigd("oca", "sign-pek", root / "pek.csr", "--oca", oca_dir, "--out", root / "pek.cert")
        sevmigd("platform", "pek-import", "--state-dir", state, "--pek", root / "pek.cert",
                "--oca-cert", oca_dir / "oca.cert")
    else:
        sevmigd("platform", "own", "--state-dir", state, "--oca", oca_dir)
    status = json.loads(sevmigd("platform", "status", "--state-dir", state, "--json").stdout)
    assert status["owner"] == "external"
    return daemons(name, init_platform=False)


def test_domain_guest_migrates_within_one_owner_and_not_to_another(daemons, tmp_path):
    fleet1, fleet2 = tmp_path / "oca1", tmp_path / "oca2"
    sevmigd("oca", "init", fleet1)
    sevmigd("oca", "init", fleet2)
    a = owned_daemon(daemons, tmp_path, "a", fleet1)
    b = owned_daemon(daemons, tmp_path, "b", fleet1, via_csr=True)
    c = owned_daemon(daemons, tmp_path, "c", fleet2)

    ctl_json(a, "launch", "tenant", "--memory", "16M", "--policy", DOMAIN, "--dirty-rate", "2")
    stats = ctl_json(a, "migrate", "tenant", "--to", b.address)
    assert stats["status"] == "completed"
    st = ctl_json(b, "status", "tenant")
    assert st["state"] == "running" and st["policy"] == DOMAIN
    assert ctl_json(b, "verify", "tenant")["ok"]

    # Another owner's platform: SEND_START refuses (the OCAs differ), the guest keeps running on b.
    res = b.ctl("migrate", "tenant", "--to", c.address, timeout=CTL_TIMEOUT)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "POLICY_FAILURE" in res.stderr, res.stderr
    st = ctl_json(b, "status", "tenant")
    assert st["state"] == "running" and st["sev_state"] == "RUNNING"
    assert ctl_json(b, "verify", "tenant")["ok"]
    assert "tenant" not in {g["name"] for g in ctl_json(c, "list")}

    # Back inside the fleet it still migrates.
    assert ctl_json(b, "migrate", "tenant", "--to", a.address)["status"] == "completed"
    assert ctl_json(a, "verify", "tenant")["ok"]


def test_self_owned_platforms_are_separate_domains(daemons):
    """Without an owner every platform is its own domain: the DOMAIN bit pins a guest to its host."""
    a, b = daemons(), daemons()
    ctl_json(a, "launch", "pinned", "--memory", "16M", "--policy", DOMAIN)
    res = a.ctl("migrate", "pinned", "--to", b.address, timeout=CTL_TIMEOUT)
    assert res.returncode == 1 and "POLICY_FAILURE" in res.stderr, res.stdout + res.stderr
    assert ctl_json(a, "status", "pinned")["state"] == "running"
