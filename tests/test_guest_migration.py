"""A guest migrated in-process between two emulated platforms (PSP SEND_*/RECEIVE_*, no daemon, no
wire) continues on the destination exactly as it would have at home: everything it needs crosses in
its RAM and vCPU state. And a migration that drops a dirty page is caught by the guest's ledger."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sevmigd.guest.ledger import F_SHARED
from sevmigd.guest.vm import GuestConfig, SevVm
from sevmigd.psp.policy import Policy

from conftest import seeded_firmware, seeded_rng

MiB = 1 << 20
#: Fresh ASIDs for every guest on the module-scoped platforms: an ASID is reusable only after
#: WBINVD + DF_FLUSH (firmware DF_FLUSH_REQUIRED), which is what sevmigd.kvm.asid does for the daemon.
_ASIDS = itertools.count(1)


@pytest.fixture(scope="module")
def fws():
    return seeded_firmware(31), seeded_firmware(32), seeded_firmware(33)


STEPS = [0.01, 0.02, 0.01, 0.015]


def plaintext(vm):
    """What the guest claims about its memory: every written page's plaintext (never-written pages
    read as zero: their content is whatever the DRAM held), its page states, and vCPU 0's kernel
    registers (ledger roots, RNG position, counters)."""
    k = vm._kernel
    tx = k.ledger.begin(np.arange(vm.npages))
    shared = (tx.w0 & np.uint64(F_SHARED)) != 0
    regs = {n: v for n, v in vm._regs[0].items()}
    return k._current(tx, shared).tobytes(), shared.tobytes(), tx.w0.tobytes(), regs


def migrate(src, fw_a, fw_b, *, asid, drop=None, between_rounds=(), vmsa_order=None):
    pdh_b, chain_b = fw_b.pdh_cert_export()
    policy, session = fw_a.send_start(src.handle, pdh_cert=pdh_b, plat_certs=chain_b,
                                      amd_certs=fw_b.identity.amd_certs())
    pdh_a, _ = fw_a.pdh_cert_export()
    h = fw_b.receive_start(policy=policy, pdh_cert=pdh_a, session=session)
    dst = SevVm.incoming(fw_b, name=src.name, memory_bytes=src.memory_bytes, policy=policy, handle=h,
                         asid=asid, vcpus=src.vcpus)
    assert dst.host.paused and dst.sev_state == "RUPDATE"

    def send(pfns):
        bm = src.host.page_enc_bitmap()
        priv, shr = pfns[bm[pfns]], pfns[~bm[pfns]]
        if len(priv):
            hdrs, ct = fw_a.send_update_data_batch(src.handle, priv)
            fw_b.receive_update_data_batch(h, priv, hdrs, ct)
        if len(shr):
            dst.host.write_raw_pages(shr, src.host.read_raw_pages(shr))
        dst.host.set_page_enc_status(priv, True)
        dst.host.set_page_enc_status(shr, False)

    src.host.enable_dirty_log()
    send(np.arange(src.npages))
    for dt in between_rounds:           # the guest keeps running during pre-copy
        src.run(dt)
        send(src.host.get_and_clear_dirty_log())
    src.run(0.01)
    src.host.pause()
    last = src.host.get_and_clear_dirty_log()
    if drop is not None:
        last = last[~np.isin(last, drop(last))]
    send(last)
    if src.host.is_es:                 # one SEND/RECEIVE_UPDATE_VMSA per vCPU, each its own page
        packets = [fw_a.send_update_vmsa(src.handle, vcpu=i) for i in range(src.vcpus)]
        for i, j in enumerate(vmsa_order or range(src.vcpus)):
            fw_b.receive_update_vmsa(h, *packets[j], vcpu=i)
    else:
        dst.host.set_vcpu_state(src.host.get_vcpu_state())
    # The final page-encryption bitmap crosses whole at stop-and-copy (flips of never-written pages
    # change no content, so they are not in the dirty log).
    dst.host.set_page_enc_bitmap(src.host.page_enc_bitmap())
    fw_a.send_finish(src.handle)
    fw_b.receive_finish(h)
    dst.start_incoming()
    return dst, last


@pytest.mark.parametrize("policy,vcpus", [(0, 1), (int(Policy.ES), 1), (int(Policy.ES), 4)])
def test_migrated_guest_continues_like_one_that_stayed(fws, policy, vcpus):
    fw_a, fw_b, fw_c = fws
    cfg = dict(name="m", memory_bytes=8 * MiB, policy=policy, dirty_rate_mib_s=40, shared_fraction=0.15,
               flip_rate=300, seed=77, vcpus=vcpus)
    src = SevVm.launch(fw_a, GuestConfig(**cfg), asid=next(_ASIDS), rng=seeded_rng(8))
    twin = SevVm.launch(fw_c, GuestConfig(**cfg), asid=next(_ASIDS), rng=seeded_rng(8))
    try:
        for dt in STEPS:
            src.run(dt)
            twin.run(dt)
        src.agent.write(src._kernel.params.pool_lo * 4096 + 10, b"agent page", shared=True)
        twin.agent.write(twin._kernel.params.pool_lo * 4096 + 10, b"agent page", shared=True)
        dst, _ = migrate(src, fw_a, fw_b, asid=next(_ASIDS), between_rounds=(0.01, 0.02))
        for dt in (0.01, 0.02, 0.01):
            twin.run(dt)
        assert dst.running and dst.sev_state == "RUNNING" and src.sev_state == "SENT"
        assert dst.host.migration_control == 1
        rep = dst.verify()
        assert rep.ok and rep.pages_checked > 100
        assert plaintext(dst) == plaintext(twin)
        for dt in STEPS:                      # carries on with the same RNG stream
            dst.run(dt)
            twin.run(dt)
        assert plaintext(dst) == plaintext(twin)
        assert dst.agent.read(dst._kernel.params.pool_lo * 4096 + 10, 10) == b"agent page"
        assert dst.verify().ok
        dst.reboot()
        assert dst.verify().ok and dst.host.page_enc_bitmap().sum() == dst.private_pages()
        dst.release()
    finally:
        src.release()
        twin.release()


@pytest.mark.parametrize("what", ["data", "all"])
def test_dropped_dirty_pages_are_caught_on_the_destination(fws, what):
    """A migration bug that forgets the last round: dropping only data pages is pinned to exactly
    those pages; dropping metadata too (ledger + directory) is caught at the register-held root."""
    fw_a, fw_b, _ = fws
    src = SevVm.launch(fw_a, GuestConfig("x", 8 * MiB, dirty_rate_mib_s=40, seed=3), asid=next(_ASIDS), rng=seeded_rng(9))
    pool = src._kernel.layout.pool_start
    dir_start = src._kernel.layout.dir_start
    dropped = []

    def drop(pfns):
        d = pfns[pfns >= pool] if what == "data" else pfns
        dropped.extend(d.tolist())
        return d

    try:
        src.run(0.02)
        dst, _ = migrate(src, fw_a, fw_b, asid=next(_ASIDS), drop=drop)
        rep = dst.verify()
        assert not rep.ok
        if what == "data":
            assert dropped and rep.mismatches == sorted(dropped)
        else:
            assert rep.mismatches == [dir_start]
        dst.release()
    finally:
        src.release()


def test_incoming_guest_is_inert_until_started_and_checks_its_state(fws):
    """Before start_incoming nothing runs; starting from a vCPU state that does not match the RAM
    (a daemon that forgot set_vcpu_state) is a typed GuestPanic, not a crash or a silent restart."""
    from sevmigd.guest.agent import GuestNotRunning
    from sevmigd.guest.kernel import GuestPanic
    fw_a, fw_b, _ = fws
    src = SevVm.launch(fw_a, GuestConfig("i", 8 * MiB, dirty_rate_mib_s=10), asid=next(_ASIDS), rng=seeded_rng(4))
    try:
        pdh_b, chain_b = fw_b.pdh_cert_export()
        policy, session = fw_a.send_start(src.handle, pdh_cert=pdh_b, plat_certs=chain_b,
                                          amd_certs=fw_b.identity.amd_certs())
        h = fw_b.receive_start(policy=policy, pdh_cert=fw_a.pdh_cert_export()[0], session=session)
        dst = SevVm.incoming(fw_b, name="i", memory_bytes=src.memory_bytes, policy=policy, handle=h, asid=next(_ASIDS))
        dst.run(1.0)
        with pytest.raises(GuestNotRunning):
            dst.agent.write(0, b"x")
        with pytest.raises(GuestNotRunning):
            dst.verify()
        with pytest.raises(GuestPanic):
            dst.start_incoming()               # still RUPDATE: RECEIVE_FINISH first
        pfns = np.arange(src.npages)
        hdrs, ct = fw_a.send_update_data_batch(src.handle, pfns)
        fw_b.receive_update_data_batch(h, pfns, hdrs, ct)
        fw_a.send_finish(src.handle)
        fw_b.receive_finish(h)
        with pytest.raises(GuestPanic):
            dst.start_incoming()               # registers never transferred
        assert not dst.running
        dst.release()
        assert dst.sev_state == "UNINIT"
    finally:
        src.release()


def test_es_vcpu_pages_swapped_by_the_host_are_caught(fws):
    """The VMSA packet MAC binds no vCPU number (reference §4: a host may reorder packets). A host that
    hands vCPU 0's save area in as vCPU 1's gets a guest that refuses to start (GuestPanic), not one
    that runs on another vCPU's registers."""
    from sevmigd.guest.kernel import GuestPanic
    fw_a, fw_b, _ = fws
    src = SevVm.launch(fw_a, GuestConfig("sw", 8 * MiB, policy=int(Policy.ES), vcpus=2, dirty_rate_mib_s=5),
                       asid=next(_ASIDS), rng=seeded_rng(5))
    try:
        src.run(0.01)
        with pytest.raises(GuestPanic):
            migrate(src, fw_a, fw_b, asid=next(_ASIDS), vmsa_order=[1, 0])
    finally:
        src.release()
        for h in list(fw_b._guests):
            fw_b.deactivate(h)
            fw_b.decommission(h)
