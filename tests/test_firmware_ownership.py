"""Platform ownership in the emulated firmware: PEK_CSR → OCA signs → PEK_CERT_IMPORT, PLATFORM_STATUS,
GET_ID and PLATFORM_RESET, and what ownership means for the DOMAIN policy bit on SEND_START."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevmigd.psp.certs import Algo, SevCert, Usage
from sevmigd.psp.chain import verify_platform_chain
from sevmigd.psp.firmware import Firmware, PlatformState
from sevmigd.psp.identity import OWNED_PLATFORM_FILES, PLATFORM_FILES, FleetCA, FleetOwner, PlatformIdentity
from sevmigd.psp.memengine import PAGE_SIZE
from sevmigd.psp.policy import Policy
from sevmigd.psp.status import SevError, SevStatus
from conftest import seeded_rng


@pytest.fixture(scope="module")
def ca():
    return FleetCA.create(seeded_rng(201), rsa_bits=2048)


@pytest.fixture(scope="module")
def owners():
    return FleetOwner.create(seeded_rng(202)), FleetOwner.create(seeded_rng(203))


def _owned(ca, seed: int, owner: FleetOwner | None) -> Firmware:
    fw = Firmware(PlatformIdentity.create(ca, seeded_rng(seed)), rng=seeded_rng(seed + 1000))
    fw.init()
    if owner is not None:
        fw.pek_cert_import(owner.sign_pek(SevCert.decode(fw.pek_csr())).encode(), owner.oca.encode())
    return fw


def test_pek_csr_is_the_pek_body_unsigned(ca):
    fw = _owned(ca, 1, None)
    csr = SevCert.decode(fw.pek_csr())
    assert csr.body() == fw.identity.pek.body()
    assert [(u, a) for u, a, _ in csr.slots()] == [(Usage.INVALID, Algo.INVALID)] * 2
    assert not any(csr.sig1) and not any(csr.sig2)


def test_import_makes_the_platform_owned_by_the_oca(ca, owners):
    fw = _owned(ca, 2, None)
    before = fw.identity
    fw.pek_cert_import(owners[0].sign_pek(SevCert.decode(fw.pek_csr())).encode(), owners[0].oca.encode())
    after = fw.identity
    assert after.externally_owned and after.oca == owners[0].oca and after.oca_private is None
    # PEK: same key, slot 1 the owner's OCA signature, slot 2 the CEK signature copied by the firmware.
    assert after.pek.body() == before.pek.body()
    assert (after.pek.sig1_usage, after.pek.sig2_usage) == (Usage.OCA, Usage.CEK)
    assert after.pek.sig2 == next(s for u, _a, s in before.pek.slots() if u == Usage.CEK)
    # A new PDH, signed by the PEK; the CEK (and so GET_ID) unchanged.
    assert after.pdh.pubkey != before.pdh.pubkey
    assert after.cek == before.cek and after.get_id() == before.get_id()
    assert after.chip_id == before.chip_id and after.platform_id != before.platform_id   # TLS name kept
    verify_platform_chain(after.ark, after.ask, after.cek, after.oca, after.pek, after.pdh, trusted_arks=[ca.ark])
    assert fw.platform_status().externally_owned


def _send_domain(src: Firmware, dst: Firmware) -> None:
    h = src.launch_start(policy=Policy.DOMAIN)
    src.activate(h, 1)
    src.map_guest_memory(h, bytearray(PAGE_SIZE))
    src.launch_measure(h)
    src.launch_finish(h)
    pdh, chain = dst.pdh_cert_export()
    try:
        src.send_start(h, pdh_cert=pdh, plat_certs=chain, amd_certs=b"")
    finally:
        src.deactivate(h)
        src.decommission(h)
        src.wbinvd()            # ASID 1 is reused by the next call: WBINVD + DF_FLUSH first
        src.df_flush()


def test_domain_policy_follows_ownership(ca, owners):
    a, b = _owned(ca, 3, owners[0]), _owned(ca, 4, owners[0])
    _send_domain(a, b)                                  # same OCA: accepted
    c = _owned(ca, 5, owners[1])
    with pytest.raises(SevError) as ei:
        _send_domain(a, c)                              # another owner: POLICY_FAILURE
    assert ei.value.status == SevStatus.POLICY_FAILURE
    d, e = _owned(ca, 6, None), _owned(ca, 7, None)
    with pytest.raises(SevError) as ei:
        _send_domain(d, e)                              # two self-owned platforms are two domains
    assert ei.value.status == SevStatus.POLICY_FAILURE


def test_platform_status_layout_and_uninit_masking(ca, owners):
    fw = Firmware(PlatformIdentity.create(ca, seeded_rng(8)), rng=seeded_rng(9), build=25, es_initialized=True)
    st = fw.platform_status()
    assert (st.state, st.owner, st.config, st.guest_count) == (PlatformState.UNINIT, 0, 0, 0)
    fw.init()
    fw.pek_cert_import(owners[0].sign_pek(SevCert.decode(fw.pek_csr())).encode(), owners[0].oca.encode())
    fw.launch_start(policy=0)
    raw = fw.platform_status().encode()
    assert len(raw) == 12
    api_major, api_minor, state, pflags, cflags, rsvd, build, guests = struct.unpack("<BBBBHBBI", raw)
    assert (api_major, api_minor, build) == (fw.api_major, fw.api_minor, 25)
    assert (state, pflags, cflags, rsvd, guests) == (PlatformState.WORKING, 1, 1, 0, 1)
    # The kernel reads bytes 3..6 as one `flags` u32: owner = bit 0, SEV-ES = bit 8 (SEV_STATUS_FLAGS_CONFIG_ES).
    assert struct.unpack_from("<I", raw, 3)[0] & 0xFFFFFF == 0x101
    fw.shutdown()
    assert fw.platform_status().owner == 0             # invalid while UNINIT, reads 0


def test_get_id_is_a_stable_secp256k1_point(ca, owners):
    fw = _owned(ca, 10, None)
    gid = fw.get_id()
    assert len(gid) == 64
    x, y = int.from_bytes(gid[:32], "big"), int.from_bytes(gid[32:], "big")
    ec.EllipticCurvePublicNumbers(x, y, ec.SECP256K1()).public_key()   # raises unless on the curve
    assert gid != _owned(ca, 11, None).get_id()
    fw.pek_gen()
    fw.pdh_gen()
    fw.pek_cert_import(owners[0].sign_pek(SevCert.decode(fw.pek_csr())).encode(), owners[0].oca.encode())
    fw.shutdown()
    fw.platform_reset()
    assert fw.get_id() == gid


def test_platform_reset_returns_to_self_owned_keeping_the_cek(ca, owners):
    fw = _owned(ca, 12, owners[0])
    owned = fw.identity
    fw.shutdown()
    fw.platform_reset()
    fresh = fw.identity
    assert not fresh.externally_owned and fresh.oca_private is not None
    assert fresh.cek == owned.cek and fresh.chip_id == owned.chip_id
    assert fresh.oca != owned.oca and fresh.pek.pubkey != owned.pek.pubkey and fresh.pdh.pubkey != owned.pdh.pubkey
    verify_platform_chain(fresh.ark, fresh.ask, fresh.cek, fresh.oca, fresh.pek, fresh.pdh, trusted_arks=[ca.ark])
    fw.init()
    fw.pek_cert_import(owners[1].sign_pek(SevCert.decode(fw.pek_csr())).encode(), owners[1].oca.encode())
    assert fw.identity.oca == owners[1].oca


def test_pek_gen_gives_up_external_ownership(ca, owners):
    fw = _owned(ca, 13, owners[0])
    fw.pek_gen()
    assert not fw.identity.externally_owned and not fw.platform_status().externally_owned
    assert fw.identity.oca != owners[0].oca


def test_owned_identity_round_trips_without_an_oca_key(ca, owners):
    ident = _owned(ca, 14, owners[0]).identity
    files = ident.to_files()
    assert sorted(files) == sorted(OWNED_PLATFORM_FILES) and "oca.key" not in files
    back = PlatformIdentity.from_files(files)
    assert back.externally_owned and back.plat_certs() == ident.plat_certs() and back.pdh == ident.pdh
    assert sorted(PlatformIdentity.create(ca, seeded_rng(15)).to_files()) == sorted(PLATFORM_FILES)


def test_owner_signs_only_unsigned_pek_csrs(ca, owners):
    ident = PlatformIdentity.create(ca, seeded_rng(16))
    for bad in (ident.pek, ident.pdh.without_signatures(), ident.oca.without_signatures()):
        with pytest.raises(SevError) as ei:
            owners[0].sign_pek(bad)
        assert ei.value.status == SevStatus.INVALID_CERTIFICATE
    back = FleetOwner.from_files(owners[0].to_files())
    assert back.oca == owners[0].oca
