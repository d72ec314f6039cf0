"""End to end, the guest owner: `sevmigd owner` (the tenant's tool) and real daemons exchanging only
files, as sevctl and a host do. The owner verifies the platform, makes the session for its policy, checks
the measurement, seals a secret; the guest reads it, and still does after two live migrations. A host that
changes the policy, or launches without the owner, is caught by the owner's measurement check (or by
LAUNCH_START itself) and gets no secret."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.slow

TIMEOUT = 120
GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")


def sevmigd(*argv, ok=True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "sevmigd", *map(str, argv)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    if ok:
        assert res.returncode == 0, f"sevmigd {argv} -> {res.returncode}\n{res.stdout}{res.stderr}"
    return res


def ctl(d, *argv, ok=True):
    res = d.ctl(*map(str, argv), timeout=TIMEOUT)
    if ok:
        assert res.returncode == 0, f"ctl {argv} -> {res.returncode}\n{res.stdout}{res.stderr}\n{d.output()[-3000:]}"
    return res


def ctl_json(d, *argv):
    return json.loads(ctl(d, *argv, "--json").stdout)


def owner_session(tmp_path, d, policy, name="sess"):
    """The owner gets the platform's chain from the host, verifies it (pinned to the fleet's ARK, which
    it got out of band) and makes a session for `policy`."""
    chain = tmp_path / f"{name}-chain"
    sevmigd("certs", "export", "--state-dir", d.state_dir, chain)
    out = tmp_path / name
    sevmigd("owner", "session", "--chain", chain, "--ark", chain / "ark.cert", "--policy", policy, "--out", out)
    assert (out / "tek.bin").stat().st_mode & 0o077 == 0
    return out


def launch_report(tmp_path, d, name, *argv):
    st = ctl_json(d, "launch", name, "--memory", "32M", *argv)
    path = tmp_path / f"{name}-launch.json"
    path.write_text(json.dumps(st))
    return st, path


def test_owner_secret_reaches_the_guest_and_survives_two_migrations(daemons, tmp_path):
    a, b = daemons(), daemons()
    sess = owner_session(tmp_path, a, "0x1")
    st, report = launch_report(tmp_path, a, "tenant", "--owner-session", sess, "--dirty-rate", "4",
                               "--shared-fraction", "0.2")
    assert st["state"] == "launching" and st["sev_state"] == "LSECRET" and st["policy"] == "0x1"
    # measured but not running: nothing to verify, nothing to migrate yet
    assert ctl(a, "verify", "tenant", ok=False).returncode != 0
    assert ctl(a, "migrate", "tenant", "--to", b.address, ok=False).returncode != 0

    assert "measurement OK" in sevmigd("owner", "measure", "--session", sess, "--launch", report).stdout
    key = tmp_path / "disk.key"
    key.write_bytes(b"correct horse battery staple\n")
    packet = tmp_path / "secret.bin"
    sevmigd("owner", "secret", "--session", sess, "--launch", report, "--secret", f"{GUID}:{key}",
            "--out", packet)
    assert key.read_bytes() not in packet.read_bytes()          # sealed under the TEK

    st = ctl_json(a, "launch-finish", "tenant", "--secret-packet", packet)
    assert st["state"] == "running" and st["sev_state"] == "RUNNING"
    want = [{"guid": str(GUID), "data_hex": key.read_bytes().hex()}]
    assert ctl_json(a, "guest-secret", "tenant")["entries"] == want

    assert ctl_json(a, "migrate", "tenant", "--to", b.address)["status"] == "completed"
    assert ctl_json(b, "guest-secret", "tenant")["entries"] == want
    assert ctl_json(b, "migrate", "tenant", "--to", a.address)["status"] == "completed"
    assert ctl_json(a, "guest-secret", "tenant")["entries"] == want
    v = ctl_json(a, "verify", "tenant")                          # the secret page is in the ledger too
    assert v["ok"] and v["mismatch_count"] == 0
    assert ctl_json(a, "status", "tenant")["policy"] == "0x1"


def test_a_host_that_changes_the_policy_is_caught(daemons, tmp_path):
    (a,) = (daemons(),)
    sess = owner_session(tmp_path, a, "0x9")        # NODBG | NOSEND: this guest must never leave

    # 1. The host ignores the owner and launches the guest itself with policy 0 (migratable, debuggable).
    _st, report = launch_report(tmp_path, a, "hijacked", "--policy", "0")
    res = sevmigd("owner", "measure", "--session", sess, "--launch", report, ok=False)
    assert res.returncode == 1 and "MISMATCH" in res.stderr
    packet = tmp_path / "never.bin"
    res = sevmigd("owner", "secret", "--session", sess, "--launch", report,
                  "--secret", f"{GUID}:{sess / 'policy'}", "--out", packet, ok=False)
    assert res.returncode == 1 and not packet.exists()            # no secret for that launch

    # 2. The host edits the policy it was handed: LAUNCH_START checks the owner's POLICY_MAC.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for n in ("godh.cert", "session.bin"):
        (tampered / n).write_bytes((sess / n).read_bytes())
    (tampered / "policy").write_text("0x0\n")
    res = ctl(a, "launch", "forged", "--memory", "32M", "--owner-session", tampered, ok=False)
    assert res.returncode == 1 and "BAD_MEASUREMENT" in res.stderr, res.stderr
    assert "forged" not in {g["name"] for g in ctl_json(a, "list")}

    # 3. The owner's session, but another image than the owner expects: the digest gives it away.
    image = tmp_path / "other.img"
    image.write_bytes(b"\x90" * 65536)
    _st, report = launch_report(tmp_path, a, "swapped", "--owner-session", sess, "--image", image)
    res = sevmigd("owner", "measure", "--session", sess, "--launch", report, ok=False)
    assert res.returncode == 1 and "MISMATCH" in res.stderr
    # ... and the same launch checked against the image actually used passes (the check is exact).
    sevmigd("owner", "measure", "--session", sess, "--launch", report, "--image", image)

    # 4. A secret sealed for one launch is refused by another launch of the same session.
    _st, report_ok = launch_report(tmp_path, a, "honest", "--owner-session", sess)
    sevmigd("owner", "secret", "--session", sess, "--launch", report_ok, "--secret", f"{GUID}:{sess / 'policy'}",
            "--out", packet)
    res = ctl(a, "launch-finish", "swapped", "--secret-packet", packet, ok=False)
    assert res.returncode == 1 and "BAD_MEASUREMENT" in res.stderr, res.stderr
    assert ctl_json(a, "status", "swapped")["state"] == "launching"
    ctl(a, "stop", "swapped")
    assert ctl_json(a, "launch-finish", "honest", "--secret-packet", packet)["state"] == "running"
    # the policy the owner bound is the one the firmware enforces
    res = ctl(a, "migrate", "honest", "--to", "127.0.0.1:1", ok=False)
    assert res.returncode == 1 and "NOSEND" in res.stderr
