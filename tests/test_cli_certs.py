"""sevmigd.store (modes, atomic identity swap, clear errors) and the `ca` / `platform` / `certs` verbs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

from sevmigd import store
from sevmigd.cli import main
from sevmigd.psp.certs import AmdCert
from sevmigd.psp.identity import PLATFORM_FILES, FleetCA, PlatformIdentity
from conftest import seeded_rng

VECTORS = pathlib.Path(__file__).parent / "data" / "sev-vectors"
NAPLES = VECTORS / "naples"
BUILTIN = VECTORS / "builtin"
SEVMIGD = pathlib.Path(sys.executable).parent / "sevmigd"


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.create(seeded_rng(1), rsa_bits=2048)


@pytest.fixture(scope="module")
def ident(ca) -> PlatformIdentity:
    return PlatformIdentity.create(ca, seeded_rng(2))


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---------------------------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------------------------


def test_ca_save_load_modes_and_refusal(tmp_path, ca):
    d = tmp_path / "fleet" / "ca"
    store.save_ca(d, ca)
    assert mode(d) == 0o700
    assert {p.name for p in d.iterdir()} == {"ark.cert", "ask.cert", "ark.key", "ask.key"}
    assert all(mode(p) == 0o600 for p in d.iterdir())
    again = store.load_ca(d)
    assert (again.ark, again.ask) == (ca.ark, ca.ask)
    with pytest.raises(store.StoreError, match="refusing to overwrite"):
        store.save_ca(d, ca)
    store.save_ca(d, ca, overwrite=True)


def test_platform_save_load_round_trip(tmp_path, ident, ca):
    st = tmp_path / "state"
    store.save_platform(st, ident, trusted_ark=ca.ark)
    assert mode(st) == 0o700
    assert store.platform_exists(st)
    gdir = st / os.readlink(st / "platform")
    assert mode(gdir) == 0o700
    assert sorted(p.name for p in gdir.iterdir()) == sorted(PLATFORM_FILES)
    assert all(mode(p) == 0o600 for p in gdir.iterdir())
    loaded = store.load_platform(st)
    assert loaded.to_files() == ident.to_files()
    assert loaded.platform_id == ident.platform_id
    assert store.load_trusted_roots(st) == [ca.ark]
    assert mode(st / "trusted") == 0o700


def test_platform_save_replaces_atomically_and_cleans_up(tmp_path, ident):
    st = tmp_path / "state"
    store.save_platform(st, ident)
    rotated = ident.pek_gen(seeded_rng(3))
    store.save_platform(st, rotated)
    assert store.load_platform(st).platform_id == rotated.platform_id
    gens = [p for p in st.iterdir() if p.name.startswith("platform-")]
    assert len(gens) == 1  # the previous generation is gone
    assert not [p for p in st.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_missing_corrupt_and_wrong_mode_files_name_the_file(tmp_path, ident):
    st = tmp_path / "state"
    with pytest.raises(store.StoreError, match="platform init"):
        st.mkdir(mode=0o700)
        store.load_platform(st)
    store.save_platform(st, ident)
    gdir = st / os.readlink(st / "platform")

    (gdir / "pek.key").chmod(0o644)
    with pytest.raises(store.StoreError) as exc:
        store.load_platform(st)
    assert exc.value.path.endswith("pek.key") and "0644" in str(exc.value)
    (gdir / "pek.key").chmod(0o600)

    (gdir / "pdh.cert").write_bytes(b"\0" * 100)
    with pytest.raises(store.StoreError) as exc:
        store.load_platform(st)
    assert exc.value.path.endswith("pdh.cert")

    (gdir / "pdh.cert").unlink()
    with pytest.raises(store.StoreError) as exc:
        store.load_platform(st)
    assert exc.value.path.endswith("pdh.cert") and "missing" in str(exc.value)

    st.chmod(0o755)  # systemd's default StateDirectoryMode: fine, nobody else can write
    with pytest.raises(store.StoreError, match="pdh.cert"):
        store.load_platform(st)
    st.chmod(0o775)
    with pytest.raises(store.StoreError, match="0775"):
        store.load_platform(st)
    st.chmod(0o700)
    gdir.chmod(0o750)
    with pytest.raises(store.StoreError, match="0750"):
        store.load_platform(st)
    gdir.chmod(0o700)
    (gdir / "pdh.cert").write_bytes(ident.pdh.encode())
    (gdir / "pdh.cert").chmod(0o600)
    (gdir / "pdh.key").unlink()
    (gdir / "pdh.key").symlink_to(gdir / "pek.key")
    with pytest.raises(store.StoreError, match="symlink"):
        store.load_platform(st)


def test_store_errors_never_contain_key_material(tmp_path, ident):
    st = tmp_path / "state"
    store.save_platform(st, ident)
    gdir = st / os.readlink(st / "platform")
    key_text = (gdir / "pek.key").read_bytes()
    (gdir / "pek.key").write_bytes(key_text.replace(b"MI", b"XX", 1))
    with pytest.raises(store.StoreError) as exc:
        store.load_platform(st)
    body = b"".join(key_text.splitlines()[1:-1]).decode()
    assert body[:20] not in str(exc.value)
    assert exc.value.path.endswith("pek.key")


def test_trusted_roots_and_ark_files(tmp_path, ca):
    st = tmp_path / "state"
    assert store.load_trusted_roots(st) == []
    store.save_trusted_root(st, ca.ark)
    naples_ark = AmdCert.decode((BUILTIN / "naples/ark.cert").read_bytes())
    store.save_trusted_root(st, naples_ark)
    assert sorted(r.key_id for r in store.load_trusted_roots(st)) == sorted([ca.ark.key_id, naples_ark.key_id])
    # unsigned Naples ARK loads as a pin
    assert store.load_ark_file(NAPLES / "ark.cert.bad").signature is None
    with pytest.raises(store.StoreError, match="not a root"):
        store.load_ark_file(BUILTIN / "naples/ask.cert")
    with pytest.raises(store.StoreError, match="not an AMD ARK"):
        store.load_ark_file(NAPLES / "pek.cert")
    (st / "trusted" / "junk.cert").write_bytes(b"junk")
    (st / "trusted" / "junk.cert").chmod(0o600)
    with pytest.raises(store.StoreError) as exc:
        store.load_trusted_roots(st)
    assert exc.value.path.endswith("junk.cert")


def test_init_self_contained(tmp_path):
    st = tmp_path / "state"
    ident = store.init_self_contained(st, rng=seeded_rng(5), rsa_bits=2048)
    assert store.load_platform(st).platform_id == ident.platform_id
    assert [r.key_id for r in store.load_trusted_roots(st)] == [ident.ark.key_id]
    assert store.load_ca(st / "ca").ark == ident.ark


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_dirs(tmp_path_factory, ca):
    """A CA dir (2048-bit, saved from the fixture: `ca init` itself is tested once below)."""
    base = tmp_path_factory.mktemp("fleet")
    store.save_ca(base / "ca", ca)
    return base


def test_ca_init_cli(tmp_path, capsys):
    assert main(["ca", "init", str(tmp_path / "ca"), "--rsa-bits", "2048"]) == 0
    out = capsys.readouterr().out
    loaded = store.load_ca(tmp_path / "ca")
    assert loaded.ark.key_id.hex() in out and loaded.ark.modulus_bits == 2048
    assert main(["ca", "init", str(tmp_path / "ca"), "--rsa-bits", "2048"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_platform_verbs(tmp_path, fleet_dirs, capsys, ca):
    st, cadir = str(tmp_path / "st"), str(fleet_dirs / "ca")
    assert main(["platform", "init", "--state-dir", st, "--ca", cadir]) == 0
    first = store.load_platform(st)
    assert store.load_trusted_roots(st) == [ca.ark]
    capsys.readouterr()
    assert main(["platform", "init", "--state-dir", st, "--ca", cadir]) == 1
    assert "--force" in capsys.readouterr().err
    assert store.load_platform(st).platform_id == first.platform_id
    assert main(["platform", "init", "--state-dir", st, "--ca", cadir, "--force"]) == 0
    second = store.load_platform(st)
    assert second.platform_id != first.platform_id

    assert main(["platform", "pek-gen", "--state-dir", st, "--ca", cadir]) == 0
    third = store.load_platform(st)
    assert third.cek == second.cek and third.pek != second.pek and third.oca != second.oca
    assert main(["platform", "pdh-gen", "--state-dir", st]) == 0
    fourth = store.load_platform(st)
    assert fourth.pek == third.pek and fourth.pdh != third.pdh

    capsys.readouterr()
    assert main(["platform", "show", "--state-dir", st, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["platform_id"] == fourth.platform_id
    assert shown["api_version"] == "1.55"
    assert shown["ark_key_id"] == ca.ark.key_id.hex()
    assert main(["platform", "show", "--state-dir", st]) == 0
    text = capsys.readouterr().out
    assert fourth.platform_id in text
    files = fourth.to_files()
    for name in ("cek.key", "oca.key", "pek.key", "pdh.key"):
        body = files[name].splitlines()[1].decode()
        assert body not in text and body not in json.dumps(shown)


def test_platform_pek_gen_with_foreign_ca_is_refused(tmp_path, fleet_dirs, capsys):
    st = str(tmp_path / "st")
    assert main(["platform", "init", "--state-dir", st, "--ca", str(fleet_dirs / "ca")]) == 0
    other = FleetCA.create(seeded_rng(9), rsa_bits=2048)
    store.save_ca(tmp_path / "other", other)
    before = store.load_platform(st).platform_id
    assert main(["platform", "pek-gen", "--state-dir", st, "--ca", str(tmp_path / "other")]) == 2
    assert store.load_platform(st).platform_id == before


def test_platform_show_without_identity(tmp_path, capsys):
    (tmp_path / "st").mkdir(mode=0o700)
    assert main(["platform", "show", "--state-dir", str(tmp_path / "st")]) == 1
    assert "platform init" in capsys.readouterr().err


def test_export_then_verify(tmp_path, fleet_dirs, capsys, ca):
    st, out = str(tmp_path / "st"), tmp_path / "out"
    assert main(["platform", "init", "--state-dir", st, "--ca", str(fleet_dirs / "ca")]) == 0
    assert main(["certs", "export", "--state-dir", st, str(out)]) == 0
    names = {"ark.cert", "ask.cert", "cek.cert", "oca.cert", "pek.cert", "pdh.cert"}
    assert {p.name for p in out.iterdir()} == names
    assert not any(p.name.endswith(".key") for p in out.iterdir())
    ident = store.load_platform(st)
    assert (out / "pek.cert").read_bytes() == ident.pek.encode()
    capsys.readouterr()
    assert main(["certs", "verify", str(out), "--ark", str(fleet_dirs / "ca" / "ark.cert")]) == 0
    text = capsys.readouterr().out
    for link in ("ARK pinned", "ARK -> ASK", "ASK -> CEK", "OCA -> PEK", "CEK -> PEK", "PEK -> PDH"):
        assert f"ok    {link}" in text
    # a foreign root pin fails on the pin link
    assert main(["certs", "verify", str(out), "--ark", str(BUILTIN / "rome/ark.cert")]) == 1
    assert "ARK pinned" in capsys.readouterr().out
    # a PDH from another platform of the fleet: PEK -> PDH fails with BAD_SIGNATURE
    other = PlatformIdentity.create(ca, seeded_rng(7))
    (out / "pdh.cert").write_bytes(other.pdh.encode())
    assert main(["certs", "verify", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAIL  PEK -> PDH: BAD_SIGNATURE (0x0a)" in captured.out
    assert "PEK -> PDH" in captured.err
    # wrong size / undecodable / missing → 2
    (out / "pdh.cert").write_bytes(b"\0" * 10)
    assert main(["certs", "verify", str(out)]) == 2
    (out / "pdh.cert").unlink()
    assert main(["certs", "verify", str(out)]) == 2
    assert main(["certs", "verify", str(tmp_path / "nowhere")]) == 2


def test_verify_naples_variants(tmp_path, capsys):
    d = tmp_path / "nap"
    d.mkdir()
    for n in ("cek", "oca", "pek", "pdh"):
        shutil.copy(NAPLES / f"{n}.cert", d)
    shutil.copy(BUILTIN / "naples/ask.cert", d)
    shutil.copy(NAPLES / "ark.cert.bad", d)
    # unsigned ARK alone: a clear message, link failure
    assert main(["certs", "verify", str(d)]) == 1
    assert "lacks its self-signature" in capsys.readouterr().out
    # ... unless pinned
    assert main(["certs", "verify", str(d), "--ark", str(BUILTIN / "naples/ark.cert")]) == 0
    assert "AMD Naples root" in capsys.readouterr().out
    # with ark.cert.sig next to it, the signature is appended
    shutil.copy(NAPLES / "ark.cert.sig", d)
    assert main(["certs", "verify", str(d)]) == 0
    assert "ark.cert.sig appended" in capsys.readouterr().out
    (d / "ark.cert.sig").write_bytes(b"\0" * 17)
    assert main(["certs", "verify", str(d)]) == 2
    # the unsigned ARK saved under the ordinary name gets the same clear message
    (d / "ark.cert.sig").unlink()
    (d / "ark.cert.bad").rename(d / "ark.cert")
    capsys.readouterr()
    assert main(["certs", "verify", str(d)]) == 1
    assert "lacks its self-signature" in capsys.readouterr().out


def test_certs_show(capsys):
    assert main(["certs", "show", str(NAPLES / "pdh.cert"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pubkey_usage"] == "PDH" and info["pubkey_algo"] == "ECDH_SHA256" and info["api"] == "0.16"
    assert main(["certs", "show", str(BUILTIN / "genoa/ark.cert"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["key_id"] == "9f9d4a8fe761456599f6946c4c010f3a" and info["root"] == "AMD Genoa root"
    assert main(["certs", "show", str(NAPLES / "ark.cert.bad")]) == 0
    assert "AMD Naples root" in capsys.readouterr().out
    assert main(["certs", "show", str(NAPLES / "ark.cert.sig")]) == 2


def test_group_without_action_prints_help(capsys):
    for group in ("ca", "platform", "certs"):
        assert main([group]) == 2
        assert "usage" in capsys.readouterr().err


def test_subprocess_verify_exit_codes(tmp_path):
    """The installed `sevmigd` entry point on the real Naples vectors: 0 good, 1 bad link, 2 unusable."""
    assert SEVMIGD.exists(), SEVMIGD
    ask = str(BUILTIN / "naples/ask.cert")

    def run(*args):
        return subprocess.run([str(SEVMIGD), "certs", "verify", *args], capture_output=True, text=True, timeout=60)

    ok = run(str(NAPLES), "--ask", ask, "--ark", str(BUILTIN / "naples/ark.cert"))
    assert ok.returncode == 0, ok.stderr
    assert "ok    PEK -> PDH" in ok.stdout
    d = tmp_path / "bad"
    shutil.copytree(NAPLES, d)
    raw = bytearray((d / "pdh.cert").read_bytes())
    raw[0x30] ^= 1
    (d / "pdh.cert").write_bytes(bytes(raw))
    bad = run(str(d), "--ask", ask)
    assert bad.returncode == 1 and "PEK -> PDH" in bad.stderr
    unusable = run(str(NAPLES))  # no ask.cert in that directory
    assert unusable.returncode == 2 and "--ask" in unusable.stderr
    assert "Traceback" not in ok.stderr + bad.stderr + unusable.stderr


# ---------------------------------------------------------------------------------------------
# the TLS identity of the migration channel (issued with the platform, names the chip)
# ---------------------------------------------------------------------------------------------


def test_ca_init_creates_the_tls_ca_and_platform_init_issues_a_certificate_naming_the_chip(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from sevmigd.daemon import tls
    from sevmigd.errors import ConfigError
    from sevmigd.tlsca import named_platforms
    cadir, st = tmp_path / "ca", tmp_path / "st"
    assert main(["ca", "init", str(cadir), "--rsa-bits", "2048"]) == 0
    assert "TLS CA" in capsys.readouterr().out
    assert {"tls-ca.crt", "tls-ca.key"} <= {p.name for p in cadir.iterdir()}
    assert mode(cadir / "tls-ca.key") == 0o600
    assert main(["platform", "init", "--state-dir", str(st), "--ca", str(cadir)]) == 0
    ident = store.load_platform(st)
    paths = store.tls_paths(st)
    assert mode(st / "tls") == 0o700 and all(mode(p) == 0o600 for p in paths.values())
    cert = x509.load_pem_x509_certificate(pathlib.Path(paths["cert"]).read_bytes())
    ca_cert = x509.load_pem_x509_certificate((cadir / "tls-ca.crt").read_bytes())
    ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert named_platforms(cert) == {ident.chip_id}
    assert pathlib.Path(paths["ca"]).read_bytes() == (cadir / "tls-ca.crt").read_bytes()
    tls.check_own_certificate(paths, ident.chip_id)  # what serve checks at start
    # PEK_GEN / PDH_GEN keep the CEK, so the certificate still names the platform
    assert main(["platform", "pek-gen", "--state-dir", str(st)]) == 0
    assert main(["platform", "pdh-gen", "--state-dir", str(st)]) == 0
    rotated = store.load_platform(st)
    assert rotated.chip_id == ident.chip_id and rotated.platform_id != ident.platform_id
    tls.check_own_certificate(paths, rotated.chip_id)
    # a certificate of another platform is refused at start, naming the key
    other = PlatformIdentity.create(store.load_ca(cadir), seeded_rng(7))
    with pytest.raises(ConfigError) as ei:
        tls.check_own_certificate(paths, other.chip_id)
    assert ei.value.key == "tls.cert" and "names" in str(ei.value)


def test_tls_cert_verb_upgrades_an_old_state_and_ca_dir(tmp_path, ca, ident, capsys):
    """A CA dir and a state dir made before TLS was the default: `platform tls-cert` creates the CA's TLS CA
    on first use and issues the host certificate; a foreign fleet CA is refused."""
    from sevmigd.tlsca import load_cert, named_platforms
    cadir, st = tmp_path / "old-ca", tmp_path / "old-st"
    store.save_ca(cadir, ca)
    store.save_platform(st, ident, trusted_ark=ca.ark)
    assert not (cadir / "tls-ca.crt").exists() and not (st / "tls").exists()
    assert main(["platform", "tls-cert", "--state-dir", str(st), "--ca", str(cadir)]) == 0
    assert (cadir / "tls-ca.crt").exists() and mode(cadir / "tls-ca.key") == 0o600
    cert = load_cert({"c": pathlib.Path(store.tls_paths(st)["cert"]).read_bytes()}, "c")
    assert named_platforms(cert) == {ident.chip_id}
    other = tmp_path / "other-ca"
    store.save_ca(other, FleetCA.create(seeded_rng(9), rsa_bits=2048))
    assert main(["platform", "tls-cert", "--state-dir", str(st), "--ca", str(other)]) == 2
    assert "not this platform's fleet CA" in capsys.readouterr().err
