"""The PSP's per-guest contexts outlive the Firmware object (issue 17): sealed export / import, the key
slot the VMM opens, the ASID flush state, and what the firmware reports as changed for the store.

A context exported in any live state and imported into a fresh Firmware (same identity, same sealing
key: a restarted daemon on the same runtime directory) continues exactly: the commands between *_START and
*_FINISH go on producing / accepting the same packets. Any altered, truncated or foreign blob is a
SealError (a SevError with a status and a reason), never another exception.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevmigd.psp import crypto, seal
from sevmigd.psp.firmware import VMSA_PADDR, Firmware, GuestState, PlatformState
from sevmigd.psp.keyslot import key_slot_target, open_key_slot
from sevmigd.psp.memengine import PAGE_SIZE
from sevmigd.psp.policy import Policy
from sevmigd.psp.seal import SealError
from sevmigd.psp.status import SevError, SevStatus

from test_firmware import launch, owner_launch, start_migration, vmsa_page
from test_firmware import fleet, ident_a, ident_b  # noqa: F401  (module fixtures, shared)
from test_firmware_states import LIVE_STATES, guest_in
from conftest import seeded_rng

PAGES = 16
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
FUZZ = int(os.environ.get("SEVMIGD_FUZZ_EXAMPLES", "0")) or 80


def fw_of(ident, seed, key=KEY_A) -> Firmware:
    fw = Firmware(ident, rng=seeded_rng(seed), sealing_key=key)
    fw.init()
    return fw


def restarted(fw: Firmware, ident, seed, key=KEY_A) -> Firmware:
    """What a daemon restart does to the PSP: every context exported, a fresh Firmware, imported again."""
    flush = fw.export_flush_state()
    blobs = [fw.export_guest(h) for h in fw.handles]
    new = fw_of(ident, seed, key)
    new.import_flush_state(flush)
    for b in blobs:
        new.import_guest(b)
    return new


def raises_seal(reason, status, fn, *a, **kw) -> SealError:
    with pytest.raises(SealError) as ei:
        fn(*a, **kw)
    assert ei.value.reason == reason and ei.value.status == status, ei.value
    return ei.value


# --- byte-exact continuation --------------------------------------------------------------------------------

@pytest.mark.parametrize("es", [False, True])
def test_send_continues_after_import_byte_exact(ident_a, ident_b, es):
    policy = Policy.ES if es else 0
    src, dst = fw_of(ident_a, 11), fw_of(ident_b, 12, KEY_B)
    h, ram, plain, vmsa_plain = launch(src, policy=policy, pages=PAGES)
    vmsa = src._guests[h].vmsa[0] if es else None
    dh, dram, dvmsa = start_migration(src, h, dst, ident_b, pages=PAGES, es=es)
    hdrs, ct = src.send_update_data_batch(h, range(0, 8))
    dst.receive_update_data_batch(dh, range(0, 8), hdrs, ct)

    src2 = restarted(src, ident_a, 21)
    assert src2.guest_status(h) == src.guest_status(h)
    assert src2.guest_status(h).state == GuestState.SUPDATE
    src2.map_guest_memory(h, ram, vmsa)
    # The same IVs give the very same packets from the original and from the imported context.
    src._rng, src2._rng = seeded_rng(77), seeded_rng(77)
    assert src.send_update_data_batch(h, range(8, PAGES)) == src2.send_update_data_batch(h, range(8, PAGES))
    hdrs, ct = src2.send_update_data_batch(h, range(8, PAGES))
    dst.receive_update_data_batch(dh, range(8, PAGES), hdrs, ct)
    if es:
        dst.receive_update_vmsa(dh, *src2.send_update_vmsa(h))
    src2.send_finish(h)
    dst.receive_finish(dh)
    assert dst.memory_engine(dh).read(dram, 0, len(dram)) == plain
    if es:
        assert dst.memory_engine(dh).decrypt(VMSA_PADDR, bytes(dvmsa)) == vmsa_plain
    assert src2.guest_status(h).state == GuestState.SENT


def test_receive_continues_after_import(ident_a, ident_b):
    src, dst = fw_of(ident_a, 13), fw_of(ident_b, 14, KEY_B)
    h, _ram, plain, _ = launch(src, policy=Policy.NOKS, pages=PAGES)
    dh, dram, _ = start_migration(src, h, dst, ident_b, asid=7, pages=PAGES)
    hdrs, ct = src.send_update_data_batch(h, range(PAGES))
    dst.receive_update_data_batch(dh, range(6), hdrs[:6 * 0x34], ct[:6 * PAGE_SIZE])

    dst2 = restarted(dst, ident_b, 24, KEY_B)
    assert dst2.guest_status(dh).state == GuestState.RUPDATE and dst2.guest_status(dh).asid == 7
    assert dst2.platform_state == PlatformState.WORKING
    dst2.map_guest_memory(dh, dram)
    dst2.receive_update_data_batch(dh, range(6, PAGES), hdrs[6 * 0x34:], ct[6 * PAGE_SIZE:])
    # a packet altered in flight is still refused by the restored TIK
    bad = bytearray(ct[:PAGE_SIZE])
    bad[0] ^= 1
    with pytest.raises(SevError) as ei:
        dst2.receive_update_data(dh, hdrs[:0x34], 0, bytes(bad))
    assert ei.value.status == SevStatus.BAD_MEASUREMENT
    dst2.receive_finish(dh)
    assert dst2.memory_engine(dh).read(dram, 0, len(dram)) == plain


def test_launch_continues_after_import_in_lupdate_and_lsecret(ident_a):
    fw = fw_of(ident_a, 15)
    owner, h, ram, image = owner_launch(fw, halves=1)

    fw = restarted(fw, ident_a, 25)                      # mid-LUPDATE: half the image measured
    assert fw.launch_digest(h) == hashlib.sha256(image[:4 * PAGE_SIZE]).digest()
    fw.map_guest_memory(h, ram)
    fw.launch_update_data(h, 4 * PAGE_SIZE, 4 * PAGE_SIZE)
    measure, mnonce = fw.launch_measure(h)
    assert measure == owner.expected_measure(fw, image, mnonce)

    fw = restarted(fw, ident_a, 26)                      # LSECRET: MEASURE and TEK/TIK kept
    assert fw.guest_status(h).state == GuestState.LSECRET
    assert fw.launch_digest(h) == hashlib.sha256(image).digest()
    fw.map_guest_memory(h, ram)
    secret = b"s3cret-of-the-owner-16b" + bytes(9)
    hdr, packet_ct = crypto.packet_seal(owner.tek, owner.tik, b"\x07" * 16, secret,
                                        ctx=crypto.CTX_LAUNCH_SECRET, measure=measure)
    fw.launch_secret(h, hdr, 0, packet_ct)
    fw.launch_finish(h)
    assert fw.memory_engine(h).read(ram, 0, len(secret)) == secret


def test_es_launch_mid_vmsa_and_shared_keys(ident_a):
    fw = fw_of(ident_a, 16)
    h = fw.launch_start(policy=Policy.ES)
    fw.activate(h, 1)
    ram, vmsas = bytearray(2 * PAGE_SIZE), [vmsa_page(1), vmsa_page(2)]
    plain_vmsas = [bytes(v) for v in vmsas]
    fw.map_guest_memory(h, ram, vmsas)
    fw.launch_update_data(h, 0, len(ram))
    fw.launch_update_vmsa(h, vcpu=0)
    h2 = fw.launch_start(policy=Policy.ES, handle=h)       # shares h's VEK
    fw = restarted(fw, ident_a, 27)
    fw.map_guest_memory(h, ram, vmsas)
    fw.launch_update_vmsa(h, vcpu=1)
    fw.launch_measure(h)
    assert fw.launch_digest(h) == hashlib.sha256(bytes(2 * PAGE_SIZE) + b"".join(plain_vmsas)).digest()
    assert fw.memory_engine(h).decrypt(VMSA_PADDR - PAGE_SIZE, bytes(vmsas[1])) == plain_vmsas[1]
    # the key-sharing guest still has the same VEK: it reads h's memory
    fw.map_guest_memory(h2, ram)
    assert fw.memory_engine(h2).read(ram, 0, 16) == bytes(16)
    assert fw.guest_status(h2).state == GuestState.LUPDATE


def test_restored_context_keeps_asid_binding_and_flush_rule(ident_a):
    fw = fw_of(ident_a, 17)
    h, *_ = launch(fw, asid=5, pages=2)
    g, *_ = launch(fw, asid=6, pages=2)
    fw.deactivate(g)
    fw.decommission(g)
    fw2 = restarted(fw, ident_a, 28)
    assert fw2.guest_count == 1 and fw2.guest_status(h).asid == 5
    assert fw2.asids_awaiting_flush == {6}
    g2 = fw2.launch_start(policy=0)
    with pytest.raises(SevError) as ei:
        fw2.activate(g2, 5)
    assert ei.value.status == SevStatus.ASID_OWNED
    with pytest.raises(SevError) as ei:
        fw2.activate(g2, 6)                                   # flush-before-reuse survives the restart
    assert ei.value.status == SevStatus.DF_FLUSH_REQUIRED
    with pytest.raises(SevError) as ei:
        fw2.df_flush()                                        # and so does the pending WBINVD
    assert ei.value.status == SevStatus.WBINVD_REQUIRED
    fw2.wbinvd()
    fw2.df_flush()
    fw2.activate(g2, 6)


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
def test_every_live_state_round_trips(ident_a, ident_b, state):
    fw, h = guest_in(state, (ident_a, ident_b))
    before = fw.guest_status(h), fw.launch_digest(h)
    new = Firmware(ident_b, rng=seeded_rng(40))
    new.init()
    new._sealing_key = fw._key()
    assert new.import_guest(fw.export_guest(h)) == h
    assert (new.guest_status(h), new.launch_digest(h)) == before
    assert new.export_guest(h) != fw.export_guest(h)        # a fresh nonce per seal


# --- typed errors -------------------------------------------------------------------------------------------

def test_conflicting_foreign_and_wrong_kind_blobs(ident_a):
    fw = fw_of(ident_a, 18)
    h, *_ = launch(fw, asid=9, pages=2)
    blob = fw.export_guest(h)
    raises_seal("conflict", SevStatus.INVALID_GUEST, fw.import_guest, blob)
    other = fw_of(ident_a, 29, KEY_B)
    raises_seal("foreign", SevStatus.SECURE_DATA_INVALID, other.import_guest, blob)
    other2 = fw_of(ident_a, 30)
    x = other2.launch_start(policy=0)
    other2.launch_start(policy=0)
    other2.activate(x + 1, 9)
    other2.decommission(x)
    raises_seal("conflict", SevStatus.ASID_OWNED, other2.import_guest, blob)
    raises_seal("kind", SevStatus.SECURE_DATA_INVALID, fw_of(ident_a, 31).import_guest, fw.key_slot(h))
    raises_seal("kind", SevStatus.SECURE_DATA_INVALID, fw_of(ident_a, 32).import_flush_state, blob)
    # an unknown format version is UNSUPPORTED, not a crash
    newer = bytearray(blob)
    newer[8] = 2
    raises_seal("version", SevStatus.UNSUPPORTED, fw_of(ident_a, 33).import_guest, bytes(newer))
    # the platform must be up
    down = Firmware(ident_a, rng=seeded_rng(34), sealing_key=KEY_A)
    with pytest.raises(SevError) as ei:
        down.import_guest(blob)
    assert ei.value.status == SevStatus.INVALID_PLATFORM_STATE


def test_blob_hides_the_keys(ident_a, ident_b):
    src = fw_of(ident_a, 19)
    h, *_ = launch(src, pages=2)
    start_migration(src, h, fw_of(ident_b, 35), ident_b, pages=2)
    g = src._guests[h]
    for blob in (src.export_guest(h), src.key_slot(h)):
        for secret in (g.vek, g.vek[:16], g.vek[16:], g.channel.tek, g.channel.tik):
            assert secret not in blob
    assert "vek" not in repr(seal.SealError(SevStatus.SECURE_DATA_INVALID, "damaged"))


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_tampered_context_blob_is_a_seal_error(ident_a, data):
    fw = fw_of(ident_a, 20)
    h, *_ = launch(fw, pages=1)
    blob = bytearray(fw.export_guest(h))
    fw.deactivate(h)
    fw.decommission(h)
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "replace"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif how == "append":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    else:
        blob = bytearray(data.draw(st.binary(max_size=400)))
    with pytest.raises(SealError) as ei:
        fw.import_guest(bytes(blob))
    assert ei.value.reason in seal.REASONS
    assert fw.guest_count == 0


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(i=st.integers(0, 200), x=st.integers(1, 255))
def test_any_tampered_key_slot_or_flush_state_is_a_seal_error(ident_a, i, x):
    fw = fw_of(ident_a, 36)
    h, *_ = launch(fw, pages=1)
    for blob, opener in ((fw.key_slot(h), lambda b: open_key_slot(b, KEY_A)),
                         (fw.export_flush_state(), fw.import_flush_state)):
        bad = bytearray(blob)
        bad[i % len(bad)] ^= x
        with pytest.raises(SealError):
            opener(bytes(bad))


# --- the key slot -------------------------------------------------------------------------------------------

def test_key_slot_opens_to_the_guests_memory_engine(ident_a):
    fw = fw_of(ident_a, 37)
    h, ram, plain, _ = launch(fw, asid=42, pages=2)
    blob = fw.key_slot(h)
    assert key_slot_target(blob) == (h, 42)
    engine = open_key_slot(blob, KEY_A, handle=h, asid=42)
    assert engine.read(ram, 0, len(ram)) == plain
    raises_seal("binding", SevStatus.SECURE_DATA_INVALID, open_key_slot, blob, KEY_A, asid=41)
    raises_seal("binding", SevStatus.SECURE_DATA_INVALID, open_key_slot, blob, KEY_A, handle=h + 1)
    raises_seal("foreign", SevStatus.SECURE_DATA_INVALID, open_key_slot, blob, KEY_B)
    # the binding is authenticated: a slot relabelled to another ASID does not open
    relabelled = bytearray(blob)
    relabelled[20:24] = (h).to_bytes(2, "little") + (41).to_bytes(2, "little")
    raises_seal("damaged", SevStatus.SECURE_DATA_INVALID, open_key_slot, bytes(relabelled), KEY_A)
    fw.deactivate(h)
    with pytest.raises(SevError) as ei:
        fw.key_slot(h)
    assert ei.value.status == SevStatus.INACTIVE


# --- what the store hears -----------------------------------------------------------------------------------

def test_changes_cover_context_commands_and_not_the_page_path(ident_a, ident_b):
    src, dst = fw_of(ident_a, 38), fw_of(ident_b, 39, KEY_B)
    h, *_ = launch(src, pages=4)
    assert src.take_changes() == (frozenset({h}), False)
    assert src.take_changes() == (frozenset(), False)
    dh, _dram, _ = start_migration(src, h, dst, ident_b, pages=4)
    assert src.take_changes() == (frozenset({h}), False)             # SEND_START
    assert dst.take_changes() == (frozenset({dh}), False)            # RECEIVE_START, ACTIVATE
    hdrs, ct = src.send_update_data_batch(h, range(4))
    dst.receive_update_data_batch(dh, range(4), hdrs, ct)
    src.send_update_data(h, 0, PAGE_SIZE)
    assert not src.changes_pending and not dst.changes_pending       # the per-page path persists nothing
    src.send_finish(h)
    src.deactivate(h)
    src.decommission(h)
    assert src.take_changes() == (frozenset({h}), True)              # gone: the store deletes it
    src.wbinvd()
    src.df_flush()
    assert src.take_changes() == (frozenset(), True)
