"""The guest owner's side (sevmigd.owner.launch) against the emulated PSP: the session LAUNCH_START
accepts, the measurement formula (virtee's known answer), the secret LAUNCH_SECRET accepts, and every
way a host can get the owner's binding wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

import pytest

from sevmigd.guest import vcpu as vc
from sevmigd.guest.secret import TABLE_GUID, SecretTableError, build_table, parse_table
from sevmigd.guest.vm import GuestConfig, SevVm, default_image
from sevmigd.owner.launch import (
    LaunchSession,
    Measurement,
    OwnerError,
    expected_digest,
    measurement_ok,
    verify_chain,
    wrap_secret,
)
from sevmigd.psp.chain import ChainError
from sevmigd.psp.firmware import Firmware, GuestState
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.psp.memengine import PAGE_SIZE
from sevmigd.psp.policy import Policy
from sevmigd.psp.status import SevError, SevStatus
from conftest import seeded_rng

MiB = 1 << 20
G1 = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")


@pytest.fixture(scope="module")
def ident():
    return PlatformIdentity.create(FleetCA.create(seeded_rng(301), rsa_bits=2048), seeded_rng(302))


@pytest.fixture
def fw(ident):
    f = Firmware(ident, rng=seeded_rng(303))
    f.init()
    return f


def _measured(fw, session: LaunchSession, image: bytes = b"\x5a" * 4096) -> tuple[int, Measurement]:
    h = fw.launch_start(policy=session.policy, dh_cert=session.godh_cert, session=session.session)
    fw.activate(h, 100 + h)
    fw.map_guest_memory(h, bytearray(image + bytes(PAGE_SIZE)))
    fw.launch_update_data(h, 0, len(image))
    measure, mnonce = fw.launch_measure(h)
    return h, Measurement(measure, mnonce, fw.api_major, fw.api_minor, fw.build)


def test_session_is_accepted_and_the_measurement_checks_out(fw, ident):
    session = LaunchSession.create(ident.pdh.encode(), int(Policy.NOKS), seeded_rng(1))
    assert len(session.godh_cert) == 0x824 and len(session.session) == 0x80
    assert session.tek.hex() not in repr(session) and session.tik.hex() not in repr(session)
    image = b"\x5a" * 4096
    h, m = _measured(fw, session, image)
    assert measurement_ok(session, m, hashlib.sha256(image).digest())
    assert not measurement_ok(session, m, hashlib.sha256(b"other").digest())
    assert not measurement_ok(dataclasses.replace(session, policy=0), m, hashlib.sha256(image).digest())
    secret = build_table([(G1, b"s3cret")])
    packet = wrap_secret(session, m, hashlib.sha256(image).digest(), secret, seeded_rng(2))
    fw.launch_secret(h, packet[:0x34], PAGE_SIZE, packet[0x34:])
    assert fw.dbg_decrypt(h, PAGE_SIZE, len(secret)) == secret
    fw.launch_finish(h)
    assert fw.guest_status(h).state == GuestState.RUNNING


def test_measurement_known_answer_from_virtee():
    """virtee/sev session tests (vectors/README.md #4): TIK, API 0.18 build 15, policy 0, empty digest."""
    tik = bytes.fromhex("66320db73158a35a255d051758e95ed4")
    s = LaunchSession(0, bytes(0x824), bytes(0x80), bytes(16), tik)
    m = Measurement(bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea"),
                    bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554"), 0, 0x12, 0x0F)
    assert measurement_ok(s, m, hashlib.sha256(b"").digest())


def test_a_host_launch_with_another_policy_is_refused_by_launch_start(fw, ident):
    session = LaunchSession.create(ident.pdh.encode(), Policy.NOSEND | Policy.NODBG, seeded_rng(3))
    with pytest.raises(SevError) as ei:
        fw.launch_start(policy=0, dh_cert=session.godh_cert, session=session.session)
    assert ei.value.status == SevStatus.BAD_MEASUREMENT
    assert fw.guest_count == 0


def test_a_host_launch_without_the_owner_is_caught_by_the_measurement(fw, ident):
    session = LaunchSession.create(ident.pdh.encode(), 0x1, seeded_rng(4))
    h = fw.launch_start(policy=0x1)              # no GODH: the host's own launch, TIK all zero
    fw.activate(h, 2)
    image = b"\x5a" * 4096
    fw.map_guest_memory(h, bytearray(image + bytes(PAGE_SIZE)))
    fw.launch_update_data(h, 0, len(image))
    measure, mnonce = fw.launch_measure(h)
    m = Measurement(measure, mnonce, fw.api_major, fw.api_minor, fw.build)
    digest = hashlib.sha256(image).digest()
    assert not measurement_ok(session, m, digest)
    with pytest.raises(OwnerError):
        wrap_secret(session, m, digest, bytes(16), seeded_rng(5))


def test_a_secret_for_one_launch_is_refused_by_another(fw, ident):
    session = LaunchSession.create(ident.pdh.encode(), 0x1, seeded_rng(6))
    h1, m1 = _measured(fw, session)
    h2, _m2 = _measured(fw, session)
    digest = hashlib.sha256(b"\x5a" * 4096).digest()
    packet = wrap_secret(session, m1, digest, build_table([(G1, b"x")]), seeded_rng(7))
    with pytest.raises(SevError) as ei:
        fw.launch_secret(h2, packet[:0x34], PAGE_SIZE, packet[0x34:])   # MAC covers MEASURE (MNONCE differs)
    assert ei.value.status == SevStatus.BAD_MEASUREMENT
    fw.launch_secret(h1, packet[:0x34], PAGE_SIZE, packet[0x34:])


def test_session_files_round_trip_and_a_changed_policy_file_is_detected(ident):
    session = LaunchSession.create(ident.pdh.encode(), 0x5, seeded_rng(8))
    files = session.to_files()
    assert LaunchSession.from_files(files) == session
    with pytest.raises(OwnerError) as ei:
        LaunchSession.from_files(dict(files, policy=b"0x1\n"))
    assert ei.value.what == "policy"
    for bad in (b"0x40", b"zz", b"0x100000000"):
        with pytest.raises(OwnerError):
            LaunchSession.from_files(dict(files, policy=bad))


def test_session_refuses_a_bad_pdh_and_reserved_policy_bits(ident):
    with pytest.raises(OwnerError):
        LaunchSession.create(ident.pek.encode(), 0, seeded_rng(9))      # not a PDH (usage PEK)
    with pytest.raises(OwnerError):
        LaunchSession.create(ident.pdh.encode()[:-1], 0, seeded_rng(9))
    with pytest.raises(OwnerError):
        LaunchSession.create(ident.pdh.encode(), 0x40, seeded_rng(9))


def test_expected_digest_matches_the_launch_for_sev_and_sev_es(fw):
    for asid, (policy, vcpus) in enumerate(((0, 2), (int(Policy.ES), 3)), start=20):
        vm = SevVm.launch(fw, GuestConfig("d", 4 * MiB, policy=policy, vcpus=vcpus), asid=asid, rng=seeded_rng(10))
        try:
            assert vm.launch_digest == expected_digest(default_image(), policy=policy, vcpus=vcpus)
        finally:
            vm.release()
    pages = b"".join(vc.encode_vmsa(vc.reset_state(i), i) for i in range(2))
    assert expected_digest(b"img!" * 4, policy=int(Policy.ES), vcpus=2) == hashlib.sha256(b"img!" * 4 + pages).digest()


def test_verify_chain_names_the_failing_link(ident):
    files = ident.chain_files()
    assert [n for n, _ in verify_chain(files, files["ark.cert"]).links][-1] == "PEK -> PDH"
    bad = bytearray(files["pdh.cert"])
    bad[0x420] ^= 1
    with pytest.raises(ChainError) as ei:
        verify_chain(dict(files, **{"pdh.cert": bytes(bad)}))
    assert ei.value.link == "PEK -> PDH"
    with pytest.raises(OwnerError):
        verify_chain({k: v for k, v in files.items() if k != "cek.cert"})


def test_secret_table_format():
    table = build_table([(G1, b"abc"), (TABLE_GUID, b"")])
    assert len(table) % 16 == 0 and table[:16] == TABLE_GUID.bytes_le
    assert int.from_bytes(table[16:20], "little") == 20 + 23 + 20
    page = table + bytes(PAGE_SIZE - len(table))
    assert parse_table(page) == [(G1, b"abc"), (TABLE_GUID, b"")]
    assert parse_table(bytes(PAGE_SIZE)) is None
    with pytest.raises(SecretTableError):
        build_table([(G1, bytes(4096))])
    broken = bytearray(page)
    broken[36:40] = (5000).to_bytes(4, "little")            # first entry claims more than the table
    with pytest.raises(SecretTableError):
        parse_table(bytes(broken))


def test_guest_reads_its_secret_after_launch_finish(fw, ident):
    session = LaunchSession.create(ident.pdh.encode(), 0x1, seeded_rng(11))
    cfg = GuestConfig("o", 4 * MiB, policy=0x1, owner_godh=session.godh_cert, owner_session=session.session)
    vm = SevVm.launch(fw, cfg, asid=10, rng=seeded_rng(12), finish=False)
    try:
        assert vm.awaiting_secret and vm.sev_state == "LSECRET" and not vm.running
        m = Measurement(vm.measurement, vm.mnonce, fw.api_major, fw.api_minor, fw.build)
        packet = wrap_secret(session, m, expected_digest(default_image(), policy=0x1), build_table([(G1, b"k")]),
                             seeded_rng(13))
        with pytest.raises(ValueError):
            vm.launch_secret(packet[:0x34] + packet[0x34:0x35])      # not a 16-byte multiple
        vm.launch_secret(packet)
        vm.finish_launch()
        assert vm.agent.launch_secret() == [(G1, b"k")]
        assert vm.verify().ok
        vm.reboot()                                                   # still there after a reboot
        assert vm.agent.launch_secret() == [(G1, b"k")]
    finally:
        vm.release()
    plain = SevVm.launch(fw, GuestConfig("p", 4 * MiB), asid=11, rng=seeded_rng(14))
    try:
        assert plain.agent.launch_secret() is None
    finally:
        plain.release()
