"""Emulated SEV firmware (sevmigd.psp.firmware): launch as a guest owner sees it, send → receive between
two platforms of one fleet, policy enforcement, tamper, length queries, pacing, resource limits, and
arbitrary bytes into every bytes input giving only SevError."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevmigd.psp import crypto
from sevmigd.psp.certs import Algo, SevCert, Usage, new_sev_cert
from sevmigd.psp.firmware import (
    MAX_HANDLES,
    VMSA_PADDR,
    VMSA_RESERVED_OFFSET,
    Firmware,
    GuestState,
    PlatformState,
)
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.psp.memengine import PAGE_SIZE
from sevmigd.psp.policy import Policy, make_policy
from sevmigd.psp.status import SevError, SevStatus
from conftest import seeded_rng

PAGES = 24
FUZZ = int(os.environ.get("SEVMIGD_FUZZ_EXAMPLES", "0")) or 60


@pytest.fixture(scope="module")
def fleet():
    return FleetCA.create(seeded_rng(1), rsa_bits=2048)


@pytest.fixture(scope="module")
def ident_a(fleet):
    return PlatformIdentity.create(fleet, seeded_rng(2))


@pytest.fixture(scope="module")
def ident_b(fleet):
    return PlatformIdentity.create(fleet, seeded_rng(3))


@pytest.fixture(scope="module")
def ident_other_fleet():
    return PlatformIdentity.create(FleetCA.create(seeded_rng(4), rsa_bits=2048), seeded_rng(5))


def make_fw(ident, seed=10, **kw) -> Firmware:
    fw = Firmware(ident, rng=seeded_rng(seed), **kw)
    fw.init()
    return fw


def raises(status, fn, *a, **kw) -> SevError:
    with pytest.raises(SevError) as ei:
        fn(*a, **kw)
    assert ei.value.status == status, ei.value
    return ei.value


def vmsa_page(seed=0) -> bytearray:
    v = bytearray(4096)
    v[:VMSA_RESERVED_OFFSET] = random.Random(seed).randbytes(VMSA_RESERVED_OFFSET)
    return v


def launch(fw: Firmware, *, policy=0, pages=PAGES, asid=1, seed=0):
    """A RUNNING guest with random memory (no guest owner channel). Returns (handle, ram, plaintext, vmsa)."""
    h = fw.launch_start(policy=policy)
    fw.activate(h, asid)
    plain = random.Random(seed).randbytes(pages * PAGE_SIZE)
    ram = bytearray(plain)
    vmsa = vmsa_page(seed) if policy & Policy.ES else None
    vmsa_plain = bytes(vmsa) if vmsa is not None else None
    fw.map_guest_memory(h, ram, vmsa)
    fw.launch_update_data(h, 0, len(ram))
    if vmsa is not None:
        fw.launch_update_vmsa(h)
    fw.launch_measure(h)
    fw.launch_finish(h)
    return h, ram, plain, vmsa_plain


def start_migration(src, h, dst, dst_ident, *, asid=1, pages=PAGES, plat_certs=None, es=False):
    """SEND_START on src, RECEIVE_START + ACTIVATE + map on dst. Returns (dst handle, dst ram, dst vmsa)."""
    pdh, _chain = dst.pdh_cert_export()
    policy, session = src.send_start(h, pdh_cert=pdh, plat_certs=plat_certs or dst_ident.plat_certs(),
                                     amd_certs=dst_ident.amd_certs())
    src_pdh, _ = src.pdh_cert_export()
    dh = dst.receive_start(policy=policy, pdh_cert=src_pdh, session=session)
    dst.activate(dh, asid)
    dram = bytearray(pages * PAGE_SIZE)
    dvmsa = bytearray(4096) if es else None
    dst.map_guest_memory(dh, dram, dvmsa)
    return dh, dram, dvmsa


# --- guest owner's view of launch ----------------------------------------------------------------------

class GuestOwner:
    """The guest owner side of LAUNCH_START / LAUNCH_MEASURE / LAUNCH_SECRET, from crypto helpers only."""

    def __init__(self, platform_pdh: bytes, policy: int, seed=99):
        rnd = random.Random(seed)
        self.key = ec.derive_private_key(rnd.randrange(1, 1 << 380), ec.SECP384R1())
        self.godh = new_sev_cert(self.key.public_key(), usage=Usage.PDH, algo=Algo.ECDH_SHA256,
                                 api_major=0, api_minor=0).encode()
        self.tek, self.tik = rnd.randbytes(16), rnd.randbytes(16)
        z = crypto.ecdh_z(self.key, SevCert.decode(platform_pdh).ec_public_key())
        self.policy = policy
        self.session = crypto.build_session(z, tek=self.tek, tik=self.tik, nonce=rnd.randbytes(16),
                                            wrap_iv=rnd.randbytes(16), policy=policy)

    def expected_measure(self, fw: Firmware, image: bytes, mnonce: bytes) -> bytes:
        return crypto.launch_measure(self.tik, api_major=fw.api_major, api_minor=fw.api_minor, build=fw.build,
                                     policy=self.policy, digest=hashlib.sha256(image).digest(), mnonce=mnonce)


def owner_launch(fw, policy=make_policy(Policy.NOKS, api_major=1, api_minor=0), *, halves: int = 2):
    """LAUNCH_START for a guest owner, then LAUNCH_UPDATE_DATA of the first `halves` halves of an 8-page
    image (1: stop mid-LUPDATE). Returns (owner, handle, ram, image)."""
    owner = GuestOwner(fw.pdh_cert_export()[0], policy)
    h = fw.launch_start(policy=policy, dh_cert=owner.godh, session=owner.session)
    fw.activate(h, 3)
    image = random.Random(5).randbytes(8 * PAGE_SIZE)
    ram = bytearray(image)
    fw.map_guest_memory(h, ram)
    for half in range(halves):
        fw.launch_update_data(h, half * 4 * PAGE_SIZE, 4 * PAGE_SIZE)
    return owner, h, ram, image


def test_launch_measurement_matches_guest_owner_and_secret_lands(ident_a):
    fw = make_fw(ident_a)
    owner, h, ram, image = owner_launch(fw)
    assert fw.launch_digest(h) == hashlib.sha256(image).digest()
    measure, mnonce = fw.launch_measure(h)
    assert measure == owner.expected_measure(fw, image, mnonce)
    assert fw.guest_status(h).state == GuestState.LSECRET
    assert bytes(ram) != image and fw.memory_engine(h).read(ram, 0, len(ram)) == image

    secret = b"disk-key:" + bytes(23)
    hdr, ct = crypto.packet_seal(owner.tek, owner.tik, b"\x07" * 16, secret, ctx=crypto.CTX_LAUNCH_SECRET,
                                 measure=measure)
    bad = bytearray(hdr)
    bad[30] ^= 1
    raises(SevStatus.BAD_MEASUREMENT, fw.launch_secret, h, bytes(bad), 0x100, ct)
    # The MAC binds the measurement: a packet made for another MEASURE fails.
    h2, c2 = crypto.packet_seal(owner.tek, owner.tik, b"\x07" * 16, secret, ctx=crypto.CTX_LAUNCH_SECRET,
                                measure=bytes(32))
    raises(SevStatus.BAD_MEASUREMENT, fw.launch_secret, h, h2, 0x100, c2)
    # COMPRESSED with a valid MAC → UNSUPPORTED (MAC is checked first for LAUNCH_SECRET).
    ch = crypto.TransportKeys(owner.tek, owner.tik)
    ch_hdr, ch_ct = ch.seal(b"\x07" * 16, secret, ctx=crypto.CTX_LAUNCH_SECRET, measure=measure,
                            flags=crypto.FLAG_COMPRESSED)
    raises(SevStatus.UNSUPPORTED, fw.launch_secret, h, ch_hdr, 0x100, ch_ct)
    raises(SevStatus.INVALID_ADDRESS, fw.launch_secret, h, hdr, 0x108, ct)
    raises(SevStatus.INVALID_LENGTH, fw.launch_secret, h, hdr + b"\0", 0x100, ct)
    fw.launch_secret(h, hdr, 0x100, ct)
    assert fw.memory_engine(h).read(ram, 0x100, len(secret)) == secret
    assert secret not in bytes(ram)
    fw.launch_finish(h)
    assert fw.guest_status(h).state == GuestState.RUNNING


def test_launch_start_with_wrong_policy_for_session_is_bad_measurement(ident_a):
    fw = make_fw(ident_a)
    owner = GuestOwner(fw.pdh_cert_export()[0], policy=Policy.NODBG)
    raises(SevStatus.BAD_MEASUREMENT, fw.launch_start, policy=0, dh_cert=owner.godh, session=owner.session)
    raises(SevStatus.INVALID_LENGTH, fw.launch_start, policy=1, dh_cert=owner.godh, session=owner.session[:-1])
    raises(SevStatus.INVALID_LENGTH, fw.launch_start, policy=1, dh_cert=owner.godh[:-1], session=owner.session)
    assert fw.guest_count == 0 and fw.platform_state == PlatformState.INIT


def test_launch_without_channel_measures_with_zero_tik(ident_a):
    fw = make_fw(ident_a)
    h = fw.launch_start(policy=0)
    fw.activate(h, 1)
    fw.map_guest_memory(h, bytearray(PAGE_SIZE))
    fw.launch_update_data(h, 0, PAGE_SIZE)
    measure, mnonce = fw.launch_measure(h)
    assert measure == crypto.launch_measure(bytes(16), api_major=1, api_minor=55, build=25, policy=0,
                                            digest=hashlib.sha256(bytes(PAGE_SIZE)).digest(), mnonce=mnonce)


def test_launch_update_checks(ident_a):
    fw = make_fw(ident_a)
    h = fw.launch_start(policy=0)
    fw.map_guest_memory(h, bytearray(2 * PAGE_SIZE))
    raises(SevStatus.INACTIVE, fw.launch_update_data, h, 0, 16)
    fw.activate(h, 1)
    raises(SevStatus.INVALID_ADDRESS, fw.launch_update_data, h, 8, 16)
    raises(SevStatus.INVALID_LENGTH, fw.launch_update_data, h, 0, 0)
    raises(SevStatus.INVALID_LENGTH, fw.launch_update_data, h, 0, 24)
    raises(SevStatus.INVALID_ADDRESS, fw.launch_update_data, h, PAGE_SIZE, 2 * PAGE_SIZE)
    raises(SevStatus.UNSUPPORTED, fw.launch_update_vmsa, h)   # not an ES guest


# --- send → receive ----------------------------------------------------------------------------------------

def _transfer_all(src, h, dst, dh, pages=PAGES, batch=True):
    if batch:
        pfns = list(range(1, pages))
        headers, ct = src.send_update_data_batch(h, pfns)
        assert len(headers) == len(pfns) * 0x34 and len(ct) == len(pfns) * PAGE_SIZE
        dst.receive_update_data_batch(dh, pfns, headers, ct)
        hdr, c = src.send_update_data(h, 0, PAGE_SIZE)
        dst.receive_update_data(dh, hdr, 0, c)
    else:
        for p in range(pages):
            hdr, c = src.send_update_data(h, p * PAGE_SIZE, PAGE_SIZE)
            dst.receive_update_data(dh, hdr, p * PAGE_SIZE, c)


@pytest.mark.parametrize("policy, same_platform", [
    (0, False), (Policy.SEV, False), (Policy.SEV | make_policy(api_major=1, api_minor=55), False),
    (Policy.DOMAIN, True), (Policy.DOMAIN | Policy.SEV | Policy.NOKS, True),
])
@pytest.mark.parametrize("batch", [True, False])
def test_send_receive_moves_pages_exactly(ident_a, ident_b, policy, same_platform, batch):
    src = make_fw(ident_a, seed=11)
    dst_ident = ident_a if same_platform else ident_b
    dst = make_fw(dst_ident, seed=12)
    h, ram, plain, _ = launch(src, policy=policy)
    dh, dram, _ = start_migration(src, h, dst, dst_ident)
    assert src.guest_status(h).state == GuestState.SUPDATE
    assert dst.guest_status(dh) .state == GuestState.RUPDATE and dst.guest_status(dh).policy == policy
    _transfer_all(src, h, dst, dh, batch=batch)
    src.send_finish(h)
    dst.receive_finish(dh)
    assert dst.guest_status(dh).state == GuestState.RUNNING
    assert src.guest_status(h).state == GuestState.SENT
    assert dst.memory_engine(dh).read(dram, 0, len(dram)) == plain
    assert bytes(dram) != bytes(ram)          # a fresh VEK on the destination
    for p in range(PAGES):                    # no plaintext page in destination DRAM
        assert plain[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] not in bytes(dram)


def test_es_guest_moves_vmsa(ident_a, ident_b):
    src, dst = make_fw(ident_a, seed=13), make_fw(ident_b, seed=14)
    h, _ram, _plain, vmsa_plain = launch(src, policy=Policy.ES)
    dh, _dram, dvmsa = start_migration(src, h, dst, ident_b, es=True)
    raises(SevStatus.INVALID_LENGTH, src.send_update_vmsa, h, guest_len=2048)
    hdr, ct = src.send_update_vmsa(h)
    assert len(ct) == 4096
    raises(SevStatus.INVALID_LENGTH, dst.receive_update_vmsa, dh, hdr, ct[:2048])
    dst.receive_update_vmsa(dh, hdr, ct)
    assert bytes(dvmsa) != vmsa_plain
    assert dst.memory_engine(dh).decrypt(VMSA_PADDR, bytes(dvmsa)) == vmsa_plain


def test_invalid_vmsa_is_refused_on_export(ident_a, ident_b):
    src, dst = make_fw(ident_a, seed=15), make_fw(ident_b, seed=16)
    h = src.launch_start(policy=Policy.ES)
    src.activate(h, 1)
    bad = vmsa_page()
    bad[4095] = 1                              # reserved trailer not zero
    src.map_guest_memory(h, bytearray(PAGE_SIZE), bad)
    src.launch_update_data(h, 0, PAGE_SIZE)
    src.launch_update_vmsa(h)
    src.launch_measure(h)
    src.launch_finish(h)
    start_migration(src, h, dst, ident_b, pages=1, es=True)
    raises(SevStatus.INVALID_PARAM, src.send_update_vmsa, h)


def test_vmsa_commands_need_es(ident_a, ident_b):
    src, dst = make_fw(ident_a, seed=17), make_fw(ident_b, seed=18)
    h, *_ = launch(src)
    dh, _, _ = start_migration(src, h, dst, ident_b)
    raises(SevStatus.UNSUPPORTED, src.send_update_vmsa, h)
    hdr, ct = src.send_update_data(h, 0, PAGE_SIZE)
    raises(SevStatus.UNSUPPORTED, dst.receive_update_vmsa, dh, hdr, ct)


def test_domain_between_platforms_with_different_ocas_is_policy_failure(ident_a, ident_b):
    src, dst = make_fw(ident_a), make_fw(ident_b)
    h, *_ = launch(src, policy=Policy.DOMAIN)
    pdh, _ = dst.pdh_cert_export()
    raises(SevStatus.POLICY_FAILURE, src.send_start, h, pdh_cert=pdh, plat_certs=ident_b.plat_certs(),
           amd_certs=ident_b.amd_certs())
    assert src.guest_status(h).state == GuestState.RUNNING


def test_sev_bit_with_chain_from_another_fleet_fails(ident_a, ident_other_fleet):
    src, dst = make_fw(ident_a), make_fw(ident_other_fleet)
    h, *_ = launch(src, policy=Policy.SEV)
    pdh, _ = dst.pdh_cert_export()
    raises(SevStatus.INVALID_CERTIFICATE, src.send_start, h, pdh_cert=pdh,
           plat_certs=ident_other_fleet.plat_certs(), amd_certs=ident_other_fleet.amd_certs())
    # Without the SEV bit the same target is accepted (the chain is not checked at all, §2.4 step 7).
    h2, *_ = launch(src, policy=0, asid=2)
    src.send_start(h2, pdh_cert=pdh, plat_certs=ident_other_fleet.plat_certs(),
                   amd_certs=ident_other_fleet.amd_certs())


def test_sev_bit_needs_signed_cek(ident_a, ident_b):
    src, dst = make_fw(ident_a), make_fw(ident_b)
    h, *_ = launch(src, policy=Policy.SEV)
    pdh, exported_chain = dst.pdh_cert_export()      # CEK unsigned, as Rome+ firmware exports it
    raises(SevStatus.INVALID_CERTIFICATE, src.send_start, h, pdh_cert=pdh, plat_certs=exported_chain,
           amd_certs=ident_b.amd_certs())


def test_sev_bit_target_api_version(fleet, ident_a):
    old = PlatformIdentity.create(fleet, seeded_rng(6), api_major=1, api_minor=40)
    src, dst = make_fw(ident_a), make_fw(old)
    h, *_ = launch(src, policy=Policy.SEV | make_policy(api_major=1, api_minor=50))
    pdh, _ = dst.pdh_cert_export()
    raises(SevStatus.POLICY_FAILURE, src.send_start, h, pdh_cert=pdh, plat_certs=old.plat_certs(),
           amd_certs=old.amd_certs())
    h2, *_ = launch(src, policy=Policy.SEV | make_policy(api_major=1, api_minor=40), asid=2)
    src.send_start(h2, pdh_cert=pdh, plat_certs=old.plat_certs(), amd_certs=old.amd_certs())


def test_receive_start_checks(ident_a, ident_b):
    src, dst = make_fw(ident_a), make_fw(ident_b)
    h, *_ = launch(src, policy=Policy.NODBG)
    pdh, _ = dst.pdh_cert_export()
    policy, session = src.send_start(h, pdh_cert=pdh, plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    src_pdh, _ = src.pdh_cert_export()
    # A host that alters the policy in flight is caught by POLICY_MAC.
    raises(SevStatus.BAD_MEASUREMENT, dst.receive_start, policy=0, pdh_cert=src_pdh, session=session)
    # A session meant for another platform does not open here (WRAP_MAC).
    raises(SevStatus.BAD_MEASUREMENT, src.receive_start, policy=policy, pdh_cert=src_pdh, session=session)
    raises(SevStatus.INVALID_LENGTH, dst.receive_start, policy=policy, pdh_cert=src_pdh, session=session + b"\0")
    raises(SevStatus.INVALID_LENGTH, dst.receive_start, policy=policy, pdh_cert=src_pdh[:-4], session=session)
    not_pdh = bytes(ident_a.pek.encode())
    raises(SevStatus.INVALID_CERTIFICATE, dst.receive_start, policy=policy, pdh_cert=not_pdh, session=session)
    assert dst.guest_count == 0
    dh = dst.receive_start(policy=policy, pdh_cert=src_pdh, session=session)
    assert dst.guest_status(dh).state == GuestState.RUPDATE and dst.platform_state == PlatformState.WORKING


def test_receive_api_version_and_reserved_bits_checked_after_policy_mac(ident_a, ident_b):
    """A session whose POLICY_MAC covers a policy the destination cannot honour: POLICY_FAILURE."""
    dst = make_fw(ident_b, api_minor=40)
    src_pdh = ident_a.pdh.encode()
    z = crypto.ecdh_z(ident_a.pdh_private, ident_b.pdh.ec_public_key())
    for policy in (make_policy(api_major=1, api_minor=50), 0x40, 0x8000):
        session = crypto.build_session(z, tek=b"t" * 16, tik=b"i" * 16, nonce=b"n" * 16, wrap_iv=b"w" * 16,
                                       policy=policy)
        raises(SevStatus.POLICY_FAILURE, dst.receive_start, policy=policy, pdh_cert=src_pdh, session=session)
    es_dst = make_fw(ident_b, es_initialized=False)
    session = crypto.build_session(z, tek=b"t" * 16, tik=b"i" * 16, nonce=b"n" * 16, wrap_iv=b"w" * 16,
                                   policy=Policy.ES)
    raises(SevStatus.UNSUPPORTED, es_dst.receive_start, policy=Policy.ES, pdh_cert=src_pdh, session=session)


@pytest.mark.parametrize("where", ["flags_compressed", "iv", "mac", "ct"])
def test_receive_tamper(ident_a, ident_b, where):
    src, dst = make_fw(ident_a, seed=21), make_fw(ident_b, seed=22)
    h, *_ = launch(src)
    dh, dram, _ = start_migration(src, h, dst, ident_b)
    hdr, ct = src.send_update_data(h, 0, PAGE_SIZE)
    hdr, ct = bytearray(hdr), bytearray(ct)
    if where == "flags_compressed":
        hdr[0] |= 1
        status = SevStatus.UNSUPPORTED
    else:
        {"iv": hdr, "mac": hdr, "ct": ct}[where][{"iv": 5, "mac": 40, "ct": 777}[where]] ^= 0x10
        status = SevStatus.BAD_MEASUREMENT
    raises(status, dst.receive_update_data, dh, bytes(hdr), 0, bytes(ct))
    assert bytes(dram) == bytes(len(dram))     # nothing was written


def test_receive_batch_applies_packets_before_the_first_failure(ident_a, ident_b):
    src, dst = make_fw(ident_a, seed=23), make_fw(ident_b, seed=24)
    h, _ram, plain, _ = launch(src)
    dh, dram, _ = start_migration(src, h, dst, ident_b)
    pfns = list(range(PAGES))
    headers, ct = src.send_update_data_batch(h, pfns)
    bad = bytearray(ct)
    bad[7 * PAGE_SIZE + 5] ^= 1
    err = raises(SevStatus.BAD_MEASUREMENT, dst.receive_update_data_batch, dh, pfns, headers, bytes(bad))
    assert err.index == 7
    eng = dst.memory_engine(dh)
    assert eng.read(dram, 0, 7 * PAGE_SIZE) == plain[:7 * PAGE_SIZE]
    assert bytes(dram[7 * PAGE_SIZE:]) == bytes(len(dram) - 7 * PAGE_SIZE)
    comp = bytearray(headers)
    comp[3 * 0x34] |= 1
    err = raises(SevStatus.UNSUPPORTED, dst.receive_update_data_batch, dh, pfns, bytes(comp), ct)
    assert err.index == 3
    err = raises(SevStatus.INVALID_ADDRESS, dst.receive_update_data_batch, dh, [0, 1, PAGES], headers[:3 * 0x34],
                 ct[:3 * PAGE_SIZE])
    assert err.index == 2
    raises(SevStatus.INVALID_LENGTH, dst.receive_update_data_batch, dh, pfns, headers[:-1], ct)
    dst.receive_update_data_batch(dh, pfns, headers, ct)
    assert eng.read(dram, 0, len(dram)) == plain


def test_send_batch_bytes_identical_to_single_commands(ident_a, ident_b):
    """Same identity, same seeded RNG, same commands: batch output == concatenated single outputs."""
    outs = []
    for mode in ("single", "batch"):
        src = make_fw(ident_a, seed=31)
        h, *_ = launch(src)
        pdh = ident_b.pdh.encode()
        src.send_start(h, pdh_cert=pdh, plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
        pfns = [3, 0, 17, 9, 9, 23] + list(range(4, 20))
        if mode == "single":
            parts = [src.send_update_data(h, p * PAGE_SIZE, PAGE_SIZE) for p in pfns]
            outs.append((b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)))
        else:
            outs.append(src.send_update_data_batch(h, pfns))
    assert outs[0] == outs[1]
    src = make_fw(ident_a, seed=32)
    h, *_ = launch(src)
    src.send_start(h, pdh_cert=ident_b.pdh.encode(), plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    err = raises(SevStatus.INVALID_ADDRESS, src.send_update_data_batch, h, [0, 1, PAGES, 2])
    assert err.index == 2
    assert src.send_update_data_batch(h, []) == (b"", b"")


def test_send_update_data_packet_sizes_and_checks(ident_a, ident_b):
    src, dst = make_fw(ident_a, seed=41), make_fw(ident_b, seed=42)
    h, _ram, plain, _ = launch(src)
    dh, dram, _ = start_migration(src, h, dst, ident_b)
    hdr, ct = src.send_update_data(h, 16, 0x5000)          # up to 20 KiB, any 16-aligned address
    assert len(ct) == 0x5000
    dst.receive_update_data(dh, hdr, 16, ct)
    assert dst.memory_engine(dh).read(dram, 16, 0x5000) == plain[16:16 + 0x5000]
    raises(SevStatus.INVALID_LENGTH, src.send_update_data, h, 0, 0x5010)
    raises(SevStatus.INVALID_LENGTH, src.send_update_data, h, 0, 0)
    raises(SevStatus.INVALID_LENGTH, src.send_update_data, h, 0, 24)
    raises(SevStatus.INVALID_LENGTH, src.send_update_data, h, 0, 4096, trans_len=4080)
    raises(SevStatus.INVALID_ADDRESS, src.send_update_data, h, 8, 16)
    raises(SevStatus.INVALID_ADDRESS, src.send_update_data, h, PAGES * PAGE_SIZE, 16)
    raises(SevStatus.INVALID_LENGTH, dst.receive_update_data, dh, hdr[:0x33], 16, ct)
    raises(SevStatus.INVALID_LENGTH, dst.receive_update_data, dh, hdr, 16, ct + bytes(16))
    raises(SevStatus.INVALID_ADDRESS, dst.receive_update_data, dh, hdr, 8, ct)
    dst.receive_update_data(dh, hdr + b"extra", 16, ct)     # hdr_len >= 0x34 is accepted
    src.deactivate(h)
    raises(SevStatus.INACTIVE, src.send_update_data, h, 0, 16)


# --- length queries ----------------------------------------------------------------------------------------

def test_length_query_paths(ident_a, ident_b):
    fw = make_fw(ident_a)
    err = raises(SevStatus.INVALID_LENGTH, fw.pdh_cert_export, 0, 0)
    assert err.written_back == {"pdh_cert_len": 0x824, "certs_len": 0x186C}
    raises(SevStatus.INVALID_LENGTH, fw.pdh_cert_export, 0x824, 0x186B)
    pdh, certs = fw.pdh_cert_export(0x1000, 0x2000)
    assert len(pdh) == 0x824 and len(certs) == 0x186C
    h = fw.launch_start(policy=0)
    err = raises(SevStatus.INVALID_LENGTH, fw.launch_measure, h, measure_len=0)
    assert err.written_back == {"measure_len": 0x30}
    fw.launch_measure(h)
    fw.launch_finish(h)
    fw.activate(h, 1)
    fw.map_guest_memory(h, bytearray(PAGE_SIZE))
    args = dict(pdh_cert=ident_b.pdh.encode(), plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    err = raises(SevStatus.INVALID_LENGTH, fw.send_start, h, session_len=0, **args)
    assert err.written_back == {"session_len": 0x80}
    assert fw.guest_status(h).state == GuestState.RUNNING
    policy, session = fw.send_start(h, **args)
    assert len(session) == 0x80 and policy == 0
    err = raises(SevStatus.INVALID_LENGTH, fw.send_update_data, h, 0, PAGE_SIZE, hdr_len=0)
    assert err.written_back == {"hdr_len": 0x34}
    err = raises(SevStatus.INVALID_LENGTH, fw.send_update_vmsa, h, hdr_len=0)
    assert err.written_back == {"hdr_len": 0x34}


def test_exported_chain_has_unsigned_cek(ident_a):
    fw = make_fw(ident_a)
    pdh, certs = fw.pdh_cert_export()
    assert pdh == ident_a.pdh.encode()
    assert certs[:0x824] == ident_a.pek.encode() and certs[0x824:0x1048] == ident_a.oca.encode()
    cek = SevCert.decode(certs[0x1048:])
    assert (cek.sig1_usage, cek.sig1_algo, cek.sig2_usage, cek.sig2_algo) == (0x1000, 0, 0x1000, 0)
    assert cek.body() == ident_a.cek.body()


def test_pek_gen_and_pdh_gen_platform_states(ident_a):
    fw = Firmware(ident_a, rng=seeded_rng(50))
    raises(SevStatus.INVALID_PLATFORM_STATE, fw.pdh_gen)
    fw.init()
    raises(SevStatus.INVALID_PLATFORM_STATE, fw.init)
    old_pdh, old_oca = fw.identity.pdh.encode(), fw.identity.oca.encode()
    fw.pdh_gen()
    assert fw.identity.pdh.encode() != old_pdh and fw.identity.oca.encode() == old_oca
    fw.pek_gen()
    assert fw.identity.oca.encode() != old_oca and fw.identity.cek.encode() == ident_a.cek.encode()
    fw.launch_start(policy=0)
    raises(SevStatus.INVALID_PLATFORM_STATE, fw.pek_gen)
    fw.pdh_gen()
    fw.shutdown()
    assert fw.platform_state == PlatformState.UNINIT and fw.guest_count == 0


# --- policy -------------------------------------------------------------------------------------------------

def test_nodbg(ident_a):
    fw = make_fw(ident_a)
    h, ram, plain, _ = launch(fw, policy=Policy.NODBG)
    raises(SevStatus.POLICY_FAILURE, fw.dbg_decrypt, h, 0, 16)
    raises(SevStatus.POLICY_FAILURE, fw.dbg_encrypt, h, 0, bytes(16))
    h2, ram2, plain2, _ = launch(fw, policy=0, asid=2)
    assert fw.dbg_decrypt(h2, 32, 64) == plain2[32:96]
    fw.dbg_encrypt(h2, 32, b"d" * 16)
    assert fw.memory_engine(h2).read(ram2, 32, 16) == b"d" * 16
    raises(SevStatus.INVALID_ADDRESS, fw.dbg_decrypt, h2, 8, 16)
    raises(SevStatus.INVALID_LENGTH, fw.dbg_decrypt, h2, 0, 8)
    fw.deactivate(h2)
    raises(SevStatus.INACTIVE, fw.dbg_decrypt, h2, 0, 16)


def test_key_sharing_and_noks(ident_a):
    fw = make_fw(ident_a)
    h1 = fw.launch_start(policy=0)
    h2 = fw.launch_start(policy=0, handle=h1)
    assert fw.memory_engine(h1).encrypt(0, bytes(16)) == fw.memory_engine(h2).encrypt(0, bytes(16))
    raises(SevStatus.POLICY_FAILURE, fw.launch_start, policy=Policy.NODBG, handle=h1)   # different policy
    h3 = fw.launch_start(policy=Policy.NOKS)
    raises(SevStatus.POLICY_FAILURE, fw.launch_start, policy=Policy.NOKS, handle=h3)
    raises(SevStatus.INVALID_GUEST, fw.launch_start, policy=0, handle=77)
    h4 = fw.launch_start(policy=0)
    assert fw.memory_engine(h4).encrypt(0, bytes(16)) != fw.memory_engine(h1).encrypt(0, bytes(16))


def test_nosend(ident_a, ident_b):
    fw = make_fw(ident_a)
    h, *_ = launch(fw, policy=Policy.NOSEND)
    raises(SevStatus.POLICY_FAILURE, fw.send_start, h, pdh_cert=ident_b.pdh.encode(),
           plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())


@pytest.mark.parametrize("policy", [0x40, 0x8000, 0xFFC0, make_policy(api_major=1, api_minor=56),
                                    make_policy(api_major=2)])
def test_launch_policy_reserved_bits_and_api_version(ident_a, policy):
    fw = make_fw(ident_a)
    raises(SevStatus.POLICY_FAILURE, fw.launch_start, policy=policy)
    assert fw.guest_count == 0


def test_launch_policy_api_equal_to_firmware_is_accepted(ident_a):
    fw = make_fw(ident_a)
    fw.launch_start(policy=make_policy(Policy.NODBG, api_major=1, api_minor=55))


def test_es_needs_es_platform(ident_a):
    raises(SevStatus.UNSUPPORTED, make_fw(ident_a, es_initialized=False).launch_start, policy=Policy.ES)
    make_fw(ident_a).launch_start(policy=Policy.ES)


# --- guest management ------------------------------------------------------------------------------------------

def test_activate_checks(ident_a):
    fw = make_fw(ident_a)
    h1, h2 = fw.launch_start(policy=0), fw.launch_start(policy=0)
    raises(SevStatus.INVALID_ASID, fw.activate, h1, 0)
    raises(SevStatus.INVALID_ASID, fw.activate, h1, 510)
    fw.activate(h1, 5)
    raises(SevStatus.ASID_OWNED, fw.activate, h2, 5)
    raises(SevStatus.ACTIVE, fw.activate, h1, 6)
    raises(SevStatus.INVALID_GUEST, fw.activate, 99, 7)
    fw.deactivate(h1)
    # a deactivated ASID is reusable only after WBINVD + DF_FLUSH (KVM's sev_flush_asids)
    raises(SevStatus.DF_FLUSH_REQUIRED, fw.activate, h2, 5)
    raises(SevStatus.WBINVD_REQUIRED, fw.df_flush)
    fw.wbinvd()
    flushes = fw.df_flush_count
    fw.df_flush()
    assert fw.df_flush_count == flushes + 1
    fw.activate(h2, 5)
    assert fw.guest_status(h2).asid == 5 and fw.guest_status(h1).asid == 0


def test_decommission_from_sent_and_platform_back_to_init(ident_a, ident_b):
    fw = make_fw(ident_a)
    h, *_ = launch(fw)
    fw.send_start(h, pdh_cert=ident_b.pdh.encode(), plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    fw.send_finish(h)
    assert fw.guest_status(h).state == GuestState.SENT
    raises(SevStatus.ACTIVE, fw.decommission, h)
    fw.deactivate(h)
    h2 = fw.launch_start(policy=0)
    fw.decommission(h)
    raises(SevStatus.INVALID_GUEST, fw.guest_status, h)
    assert fw.platform_state == PlatformState.WORKING
    fw.decommission(h2)                      # the last guest: WORKING -> INIT
    assert fw.platform_state == PlatformState.INIT
    raises(SevStatus.INVALID_PLATFORM_STATE, fw.guest_status, h)
    raises(SevStatus.INVALID_PLATFORM_STATE, fw.decommission, h)


def test_resource_limit(ident_a):
    fw = make_fw(ident_a)
    handles = [fw.launch_start(policy=0) for _ in range(MAX_HANDLES)]
    assert sorted(handles) == list(range(1, MAX_HANDLES + 1))
    raises(SevStatus.RESOURCE_LIMIT, fw.launch_start, policy=0)
    fw.decommission(500)
    assert fw.launch_start(policy=0) == 500


def test_send_cancel_returns_to_running_and_can_restart(ident_a, ident_b):
    fw = make_fw(ident_a)
    h, *_ = launch(fw)
    args = dict(pdh_cert=ident_b.pdh.encode(), plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    _, s1 = fw.send_start(h, **args)
    fw.send_cancel(h)
    assert fw.guest_status(h).state == GuestState.RUNNING
    _, s2 = fw.send_start(h, **args)
    assert s1 != s2                       # fresh NONCE, TEK, TIK


# --- pacing ---------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.step = 0.0

    def __call__(self):
        t = self.now
        self.now += self.step
        return t


def test_pacing_debt_with_fake_clock(ident_a, ident_b):
    clock = FakeClock()
    fw = make_fw(ident_a, min_command_time=0.001, clock=clock)   # init() itself: 1 ms
    assert fw.take_pacing_debt() == pytest.approx(0.001)
    assert fw.take_pacing_debt() == 0.0
    h, *_ = launch(fw)        # LAUNCH_START, ACTIVATE, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE, LAUNCH_FINISH
    assert fw.take_pacing_debt() == pytest.approx(0.005)
    fw.send_start(h, pdh_cert=ident_b.pdh.encode(), plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    fw.take_pacing_debt()
    fw.send_update_data_batch(h, list(range(10)))
    assert fw.take_pacing_debt() == pytest.approx(0.010)
    clock.step = 0.0004                                          # each command "takes" 0.4 ms of the 1 ms
    fw.send_update_data(h, 0, PAGE_SIZE)
    assert fw.take_pacing_debt() == pytest.approx(0.0006)
    clock.step = 0.005                                           # slower than the minimum: no debt
    fw.send_update_data(h, 0, PAGE_SIZE)
    assert fw.take_pacing_debt() == 0.0
    clock.step = 0.0
    raises(SevStatus.INVALID_GUEST, fw.guest_status, 77)         # failed commands take time too
    assert fw.take_pacing_debt() == pytest.approx(0.001)


def test_pacing_off_by_default(ident_a):
    fw = make_fw(ident_a)
    launch(fw)
    assert fw.take_pacing_debt() == 0.0


# --- secrets stay out of reprs and errors ------------------------------------------------------------------------

def test_reprs_and_errors_carry_no_keys(ident_a, ident_b):
    fw = make_fw(ident_a, seed=61)
    h, ram, *_ = launch(fw)
    fw.send_start(h, pdh_cert=ident_b.pdh.encode(), plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    g = fw._guests[h]
    secrets = [g.vek.hex(), g.channel._tek.hex(), g.channel._tik.hex()]
    texts = [repr(fw), repr(g), repr(g.engine), repr(g.channel), repr(fw.guest_status(h))]
    with pytest.raises(SevError) as ei:
        fw.send_update_data(h, 0, PAGE_SIZE, hdr_len=1)
    texts.append(str(ei.value))
    for t in texts:
        for s in secrets:
            assert s[:16] not in t


# --- arbitrary bytes in, only SevError out -----------------------------------------------------------------------

def _bytes_near(size):
    return st.one_of(st.binary(max_size=size + 8), st.binary(min_size=size, max_size=size))


def _mutated(valid: bytes):
    return st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)).map(
        lambda t: valid[:t[0]] + bytes([valid[t[0]] ^ t[1]]) + valid[t[0] + 1:])


@pytest.fixture(scope="module")
def migration_world(ident_a, ident_b):
    """One valid migration's inputs (to mutate) for the fuzz tests."""
    src, dst = make_fw(ident_a, seed=71), make_fw(ident_b, seed=72)
    h, *_ = launch(src)
    pdh, _ = dst.pdh_cert_export()
    policy, session = src.send_start(h, pdh_cert=pdh, plat_certs=ident_b.plat_certs(), amd_certs=ident_b.amd_certs())
    hdr, ct = src.send_update_data(h, 0, PAGE_SIZE)
    return dict(policy=policy, session=session, src_pdh=ident_a.pdh.encode(), hdr=hdr, ct=ct,
                plat=ident_b.plat_certs(), amd=ident_b.amd_certs(), dst_pdh=pdh)


def _only_sev_errors(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except SevError:
        pass


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_receive_side_inputs(ident_b, migration_world, data):
    w = migration_world
    dst = make_fw(ident_b, seed=73)
    session = data.draw(st.one_of(_bytes_near(0x80), _mutated(w["session"]), st.just(w["session"])))
    pdh = data.draw(st.one_of(_bytes_near(0x824), _mutated(w["src_pdh"]), st.just(w["src_pdh"])))
    try:
        dh = dst.receive_start(policy=w["policy"], pdh_cert=pdh, session=session)
    except SevError:
        dh = dst.receive_start(policy=w["policy"], pdh_cert=w["src_pdh"], session=w["session"])
    dst.activate(dh, 1)
    dst.map_guest_memory(dh, bytearray(2 * PAGE_SIZE), bytearray(4096))
    hdr = data.draw(st.one_of(_bytes_near(0x34), _mutated(w["hdr"])))
    ct = data.draw(st.one_of(st.binary(max_size=64), _mutated(w["ct"])))
    _only_sev_errors(dst.receive_update_data, dh, hdr, 0, ct)
    _only_sev_errors(dst.receive_update_vmsa, dh, hdr, ct)
    _only_sev_errors(dst.receive_update_data_batch, dh, [0], hdr, ct)
    _only_sev_errors(dst.receive_update_data_batch, dh, [0, 1], hdr, ct)


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_send_start_and_launch_inputs(ident_a, migration_world, data):
    w = migration_world
    fw = make_fw(ident_a, seed=74)
    h, *_ = launch(fw)
    pdh = data.draw(st.one_of(_bytes_near(0x824), _mutated(w["dst_pdh"])))
    plat = data.draw(st.one_of(_bytes_near(0x186C), _mutated(w["plat"]), st.just(w["plat"])))
    amd = data.draw(st.one_of(_bytes_near(0x680), _mutated(w["amd"]), st.just(w["amd"])))
    for flags in (0, Policy.SEV, Policy.DOMAIN):
        fw._guests[h].policy = flags             # exercise every validation path on the same guest
        _only_sev_errors(fw.send_start, h, pdh_cert=pdh, plat_certs=plat, amd_certs=amd)
        if fw.guest_status(h).state == GuestState.SUPDATE:
            fw.send_cancel(h)
    godh = data.draw(st.one_of(_bytes_near(0x824), _mutated(w["src_pdh"])))
    session = data.draw(st.one_of(_bytes_near(0x80), _mutated(w["session"])))
    _only_sev_errors(fw.launch_start, policy=0, dh_cert=godh, session=session)
    h2 = fw.launch_start(policy=0)
    fw.activate(h2, 9)
    fw.map_guest_memory(h2, bytearray(PAGE_SIZE))
    fw.launch_measure(h2)
    hdr = data.draw(_bytes_near(0x34))
    trans = data.draw(st.binary(max_size=80))
    _only_sev_errors(fw.launch_secret, h2, hdr, 0, trans)
    _only_sev_errors(fw.dbg_encrypt, h, 0, data.draw(st.binary(max_size=48)))


def test_batch_with_the_os_rng_moves_pages_exactly_with_fresh_ivs(ident_a, ident_b):
    """The os.urandom fast path (all IVs in one read): every packet has its own IV and decrypts."""
    import os as _os
    src = Firmware(ident_a, rng=_os.urandom)
    src.init()
    dst = make_fw(ident_b, seed=31)
    h, _ram, plain, _ = launch(src)
    dh, dram, _ = start_migration(src, h, dst, ident_b)
    pfns = list(range(PAGES))
    headers, ct = src.send_update_data_batch(h, pfns)
    ivs = {bytes(headers[i * 0x34 + 4:i * 0x34 + 20]) for i in range(PAGES)}
    assert len(ivs) == PAGES
    dst.receive_update_data_batch(dh, pfns, headers, ct)
    assert dst.memory_engine(dh).read(dram, 0, len(dram)) == plain
