"""`sevmigd oca`, `sevmigd platform pek-csr|pek-import|own|reset|status` and `sevmigd owner` as a user
runs them: every refusal is an exit status and one line naming what was wrong, never a traceback."""

from __future__ import annotations

import json
import os

import pytest

from sevmigd import store
from sevmigd.cli import main
from sevmigd.psp.identity import FleetCA, PlatformIdentity


@pytest.fixture(scope="module")
def ca():
    return FleetCA.create(os.urandom, rsa_bits=2048)


@pytest.fixture
def plat(tmp_path, ca):
    state = tmp_path / "state"
    store.save_platform(state, PlatformIdentity.create(ca, os.urandom), trusted_ark=ca.ark)
    return state


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_ownership_refusals_are_exit_codes(capsys, tmp_path, plat):
    oca, other = tmp_path / "oca", tmp_path / "other"
    assert run(capsys, "oca", "init", oca)[0] == 0
    assert run(capsys, "oca", "init", other)[0] == 0
    rc, _, err = run(capsys, "oca", "init", oca)
    assert rc == 1 and "already holds an OCA" in err
    assert (oca / "oca.key").stat().st_mode & 0o077 == 0

    csr = tmp_path / "pek.csr"
    assert run(capsys, "platform", "pek-csr", "--state-dir", plat, "--out", csr)[0] == 0
    pek = tmp_path / "pek.cert"
    assert run(capsys, "oca", "sign-pek", csr, "--oca", oca, "--out", pek)[0] == 0
    rc, _, err = run(capsys, "oca", "sign-pek", pek, "--oca", oca, "--out", tmp_path / "x")   # already signed
    assert rc == 2 and "CSR" in err
    rc, _, err = run(capsys, "oca", "sign-pek", tmp_path / "missing", "--oca", oca, "--out", tmp_path / "x")
    assert rc == 2 and "missing" in err

    # a PEK signed by one OCA, imported with another OCA's certificate: the firmware's BAD_SIGNATURE
    rc, _, err = run(capsys, "platform", "pek-import", "--state-dir", plat, "--pek", pek,
                     "--oca-cert", other / "oca.cert")
    assert rc == 1 and "BAD_SIGNATURE" in err
    rc, _, err = run(capsys, "platform", "pek-import", "--state-dir", plat, "--pek", csr.parent / "oca",
                     "--oca-cert", oca / "oca.cert")
    assert rc == 2
    assert run(capsys, "platform", "pek-import", "--state-dir", plat, "--pek", pek,
               "--oca-cert", oca / "oca.cert")[0] == 0
    rc, _, err = run(capsys, "platform", "own", "--state-dir", plat, "--oca", other)
    assert rc == 1 and "ALREADY_OWNED" in err
    rc, out, _ = run(capsys, "platform", "status", "--state-dir", plat, "--json")
    st = json.loads(out)
    assert rc == 0 and st["owner"] == "external" and len(bytes.fromhex(st["get_id"])) == 64
    assert run(capsys, "platform", "reset", "--state-dir", plat)[0] == 0
    rc, out, _ = run(capsys, "platform", "status", "--state-dir", plat, "--json")
    assert json.loads(out)["owner"] == "self" and json.loads(out)["get_id"] == st["get_id"]
    assert run(capsys, "platform", "own", "--state-dir", plat, "--oca", other)[0] == 0


def test_owner_tool_refusals_are_exit_codes(capsys, tmp_path, plat):
    chain = tmp_path / "chain"
    assert run(capsys, "certs", "export", "--state-dir", plat, chain)[0] == 0
    rc, _, err = run(capsys, "owner", "session", "--chain", chain, "--policy", "0x40", "--out", tmp_path / "s")
    assert rc == 2 and "reserved" in err
    rc, _, _ = run(capsys, "owner", "session", "--chain", tmp_path / "nochain", "--policy", "1", "--out", tmp_path / "s")
    assert rc == 2
    bad = bytearray((chain / "pdh.cert").read_bytes())
    bad[0x420] ^= 1
    (chain / "pdh.cert").write_bytes(bytes(bad))
    rc, out, err = run(capsys, "owner", "session", "--chain", chain, "--ark", chain / "ark.cert", "--policy", "1",
                       "--out", tmp_path / "s")
    assert rc == 1 and "PEK -> PDH" in out and not (tmp_path / "s").exists()   # no session for a bad chain
    assert run(capsys, "certs", "export", "--state-dir", plat, tmp_path / "chain2")[0] == 0
    sess = tmp_path / "sess"
    assert run(capsys, "owner", "session", "--chain", tmp_path / "chain2", "--ark", tmp_path / "chain2" / "ark.cert",
               "--policy", "1", "--out", sess)[0] == 0
    rc, _, err = run(capsys, "owner", "session", "--chain", tmp_path / "chain2", "--policy", "1", "--out", sess)
    assert rc == 2 and "exists" in err
    report = tmp_path / "launch.json"
    report.write_text(json.dumps({"name": "g"}))
    rc, _, err = run(capsys, "owner", "measure", "--session", sess, "--launch", report)
    assert rc == 2 and "launch_measure" in err
    report.write_text(json.dumps({"name": "g", "vcpus": 1, "launch_measure": {
        "measure": "00" * 32, "mnonce": "00" * 16, "api_major": 1, "api_minor": 55, "build": 25}}))
    rc, _, err = run(capsys, "owner", "secret", "--session", sess, "--launch", report, "--secret", "not-a-guid:x",
                     "--out", tmp_path / "p")
    assert rc == 2 and "GUID:FILE" in err
    key = tmp_path / "k"
    key.write_bytes(b"k")
    rc, _, err = run(capsys, "owner", "secret", "--session", sess, "--launch", report,
                     "--secret", f"736869e5-84f0-4973-92ec-06879ce3da0b:{key}", "--out", tmp_path / "p")
    assert rc == 1 and "MISMATCH" in err and not (tmp_path / "p").exists()
    (sess / "policy").write_text("0x0\n")              # the owner's own files, tampered: refused
    rc, _, err = run(capsys, "owner", "measure", "--session", sess, "--launch", report)
    assert rc == 2 and "POLICY_MAC" in err
