"""Emulated fleet CA and platform identities (reference §2.4 PEK_GEN/PDH_GEN, §5.3, §8)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevmigd.psp.certs import Algo, AmdCert, SevCert, Usage, verify_amd_cert
from sevmigd.psp.chain import ark_key_hash, validate_domain, validate_platform, verify_platform_chain
from sevmigd.psp.identity import FleetCA, IdentityError, PlatformIdentity
from conftest import seeded_rng


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.create(seeded_rng(1), rsa_bits=2048)


@pytest.fixture(scope="module")
def ident(ca) -> PlatformIdentity:
    return PlatformIdentity.create(ca, seeded_rng(2))


def test_fleet_ca_shape(ca):
    assert ca.ark.key_usage == Usage.ARK and ca.ask.key_usage == Usage.ASK
    assert ca.ark.certifying_id == ca.ark.key_id == seeded_rng(1)(16)
    assert ca.ask.certifying_id == ca.ark.key_id and len(ca.ask.key_id) == 16
    assert len(ca.ark.encode()) == len(ca.ask.encode()) == 832
    verify_amd_cert(ca.ark, ca.ark)
    verify_amd_cert(ca.ask, ca.ark)


def test_fleet_ca_4096_is_rome_shaped():
    ca4 = FleetCA.create(seeded_rng(9))
    assert len(ca4.ark.encode()) == len(ca4.ask.encode()) == 1600
    verify_amd_cert(ca4.ask, ca4.ark)
    assert ca4.ask.sev_algo == Algo.RSA_SHA384
    ident = PlatformIdentity.create(ca4, seeded_rng(10))
    assert (ident.cek.sig1_usage, ident.cek.sig1_algo) == (Usage.ASK, Algo.RSA_SHA384)
    assert len(ident.amd_certs()) == 0xC80
    verify_platform_chain(ident.ark, ident.ask, ident.cek, ident.oca, ident.pek, ident.pdh, trusted_arks=[ca4.ark])
    validate_platform(ident.amd_certs(), ident.plat_certs(), ident.pdh.encode(),
                      root_key_id=ca4.ark.key_id, root_key_hash=ark_key_hash(ca4.ark))


def test_platform_chain_shape(ident, ca):
    assert ident.cek.pubkey_usage == Usage.CEK and ident.oca.pubkey_usage == Usage.OCA
    assert ident.pek.pubkey_usage == Usage.PEK and ident.pdh.pubkey_usage == Usage.PDH
    assert ident.pdh.pubkey_algo == Algo.ECDH_SHA256 and ident.pek.pubkey_algo == Algo.ECDSA_SHA256
    assert (ident.cek.sig1_usage, ident.cek.sig1_algo) == (Usage.ASK, Algo.RSA_SHA256)
    assert (ident.pek.sig1_usage, ident.pek.sig2_usage) == (Usage.OCA, Usage.CEK)
    assert (ident.oca.sig1_usage, ident.pdh.sig1_usage) == (Usage.OCA, Usage.PEK)
    assert (ident.api_major, ident.api_minor) == (1, 55)
    assert all((c.api_major, c.api_minor) == (1, 55) for c in (ident.cek, ident.oca, ident.pek, ident.pdh))
    assert ident.pdh_private.public_key().public_numbers() == ident.pdh.ec_public_key().public_numbers()
    assert isinstance(ident.pdh_private.curve, ec.SECP384R1)
    report = verify_platform_chain(ident.ark, ident.ask, ident.cek, ident.oca, ident.pek, ident.pdh, trusted_arks=[ca.ark])
    assert [name for name, _ in report.links][-1] == "PEK -> PDH"


def test_views(ident):
    assert ident.plat_certs() == ident.pek.encode() + ident.oca.encode() + ident.cek.encode()
    assert len(ident.plat_certs()) == 0x186C
    assert ident.amd_certs() == ident.ask.encode() + ident.ark.encode()
    assert len(ident.amd_certs()) == 0x680
    assert set(ident.chain_files()) == {"ark.cert", "ask.cert", "cek.cert", "oca.cert", "pek.cert", "pdh.cert"}
    assert ident.platform_id == hashlib.sha256(ident.pek.encode()).hexdigest()
    validate_platform(ident.amd_certs(), ident.plat_certs(), ident.pdh.encode(),
                      root_key_id=ident.ark.key_id, root_key_hash=ark_key_hash(ident.ark))
    validate_domain(ident.plat_certs(), ident.pdh.encode(), ident.oca.encode())


def test_api_version_goes_into_the_certs(ca):
    ident = PlatformIdentity.create(ca, seeded_rng(3), api_major=0, api_minor=24)
    assert (ident.pek.api_major, ident.pek.api_minor) == (0, 24)
    assert (ident.api_major, ident.api_minor) == (0, 24)


def test_keys_are_deterministic_given_rng(ca):
    a = PlatformIdentity.create(ca, seeded_rng(4))
    b = PlatformIdentity.create(ca, seeded_rng(4))
    for name in ("cek", "oca", "pek", "pdh"):
        assert getattr(a, name).body() == getattr(b, name).body()
    c = PlatformIdentity.create(ca, seeded_rng(5))
    assert c.pdh.body() != a.pdh.body()


def test_pek_gen_and_pdh_gen(ident, ca):
    rotated = ident.pek_gen(seeded_rng(6), ca)
    assert rotated.cek == ident.cek and rotated.cek_private is ident.cek_private
    assert rotated.oca.body() != ident.oca.body()
    assert rotated.pek.body() != ident.pek.body()
    assert rotated.pdh.body() != ident.pdh.body()
    assert rotated.platform_id != ident.platform_id
    verify_platform_chain(rotated.ark, rotated.ask, rotated.cek, rotated.oca, rotated.pek, rotated.pdh)
    new_pdh = rotated.pdh_gen(seeded_rng(7))
    assert (new_pdh.oca, new_pdh.pek, new_pdh.cek) == (rotated.oca, rotated.pek, rotated.cek)
    assert new_pdh.pdh.body() != rotated.pdh.body()
    verify_platform_chain(new_pdh.ark, new_pdh.ask, new_pdh.cek, new_pdh.oca, new_pdh.pek, new_pdh.pdh)


def test_pek_gen_refuses_a_foreign_ca(ident):
    other = FleetCA.create(seeded_rng(8), rsa_bits=2048)
    with pytest.raises(IdentityError):
        ident.pek_gen(seeded_rng(6), other)


def test_files_round_trip(ident, ca):
    files = ident.to_files()
    assert set(files) >= {"cek.key", "oca.key", "pek.key", "pdh.key"}
    assert all(files[k].startswith(b"-----BEGIN PRIVATE KEY-----") for k in files if k.endswith(".key"))
    again = PlatformIdentity.from_files(files)
    assert again.to_files() == files
    assert again.platform_id == ident.platform_id
    ca2 = FleetCA.from_files(ca.to_files())
    assert (ca2.ark, ca2.ask) == (ca.ark, ca.ask)
    assert ca2.to_files() == ca.to_files()


def test_from_files_rejects_missing_mismatched_and_corrupt(ident, ca):
    files = ident.to_files()
    missing = dict(files)
    del missing["pdh.key"]
    with pytest.raises(IdentityError) as exc:
        PlatformIdentity.from_files(missing)
    assert exc.value.name == "pdh.key"
    swapped = dict(files, **{"pek.key": files["oca.key"]})
    with pytest.raises(IdentityError) as exc:
        PlatformIdentity.from_files(swapped)
    assert exc.value.name == "pek.key"
    corrupt = dict(files, **{"pdh.cert": files["pdh.cert"][:100]})
    with pytest.raises(IdentityError) as exc:
        PlatformIdentity.from_files(corrupt)
    assert exc.value.name == "pdh.cert"
    garbage = dict(files, **{"cek.key": b"not a key"})
    with pytest.raises(IdentityError):
        PlatformIdentity.from_files(garbage)
    # a consistent key/cert pair whose signature does not chain (PDH re-issued by a foreign PEK)
    foreign = PlatformIdentity.create(ca, seeded_rng(11))
    mixed = dict(files, **{"pdh.cert": foreign.pdh.encode(), "pdh.key": foreign.to_files()["pdh.key"]})
    with pytest.raises(IdentityError) as exc:
        PlatformIdentity.from_files(mixed)
    assert exc.value.name == "PEK -> PDH"
    ca_files = ca.to_files()
    with pytest.raises(IdentityError):
        FleetCA.from_files(dict(ca_files, **{"ark.key": ca_files["ask.key"]}))


def test_private_keys_not_in_repr(ident, ca):
    text = repr(ident) + repr(ca)
    assert "private" not in text.lower()


def test_decoded_chain_certs_are_plain_codecs(ident):
    assert SevCert.decode(ident.pek.encode()) == ident.pek
    assert AmdCert.decode(ident.ask.encode()) == ident.ask


def test_every_single_byte_tamper_of_emulated_cek_and_pdh_is_rejected(ident):
    """The emulated chain is as tamper-evident as AMD's: CEK (RSA-PSS by the ASK) and PDH (ECDSA by the PEK)."""
    from sevmigd.psp.certs import ask_signer, sev_signer, verify_sev_cert
    from sevmigd.psp.status import SevError, SevStatus

    cases = [(ident.cek, ask_signer(ident.ask), 0x414 + 8 + 0x200), (ident.pdh, sev_signer(ident.pek), 0x414 + 8 + 0x200)]
    accepted = []
    for cert, signer, end in cases:  # body + slot 1 (the used slot of both)
        raw = cert.encode()
        for i in range(end):
            b = bytearray(raw)
            b[i] ^= 1
            try:
                verify_sev_cert(SevCert.decode(bytes(b)), signer)
            except SevError as exc:
                assert exc.status in (SevStatus.INVALID_CERTIFICATE, SevStatus.BAD_SIGNATURE)
                continue
            accepted.append((cert.pubkey_usage, i))
    assert not accepted
