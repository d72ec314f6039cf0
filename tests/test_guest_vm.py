"""Emulated SEV guest: launch through the PSP, workload, agent, reboot, ES VMSA, trust boundary.

Pure tests (no I/O): a real Firmware with real crypto, seeded RNGs, simulated time through run(dt).
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from sevmigd.errors import ConfigError
from sevmigd.guest import vcpu as vc
from sevmigd.guest.agent import GuestNotRunning
from sevmigd.guest.hypervisor import MSR_KVM_MIGRATION_CONTROL, VcpuStateProtected
from sevmigd.guest.ledger import F_SHARED
from sevmigd.guest.vm import GuestConfig, SevVm, default_image
from sevmigd.psp.firmware import VMSA_PADDR
from sevmigd.psp.policy import Policy

from conftest import seeded_firmware, seeded_rng

MiB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def fw():
    return seeded_firmware(1)


_asids = itertools.count(1)


@pytest.fixture
def launch(fw):
    vms = []

    def _launch(**kw):
        kw.setdefault("name", "g")
        kw.setdefault("memory_bytes", 8 * MiB)
        vm = SevVm.launch(fw, GuestConfig(**kw), asid=next(_asids), rng=seeded_rng(99))
        vms.append(vm)
        return vm

    yield _launch
    for vm in vms:
        vm.release()


def guest_shared_truth(vm) -> np.ndarray:
    """The guest kernel's own page state (True = private), read from its page table (ledger entries)."""
    k = vm._kernel
    tx = k.ledger.begin(np.arange(vm.npages))
    return (tx.w0 & np.uint64(F_SHARED)) == 0


# ---------------------------------------------------------------------------------------- launch
def test_launch_measures_exactly_the_image(launch):
    image = bytes(range(256)) * 64 + b"tail-16-bytes!!!"   # 16 KiB + 16: not page aligned
    vm = launch(image=image)
    assert vm.launch_digest == hashlib.sha256(image).digest()
    assert len(vm.measurement) == 32
    assert vm.sev_state == "RUNNING"
    assert vm.verify().ok


def test_default_image_is_measured(launch):
    vm = launch()
    assert vm.launch_digest == hashlib.sha256(default_image()).digest()


def test_es_launch_measures_image_then_vmsa(launch):
    vm = launch(policy=int(Policy.ES))
    image = default_image()
    reset_vmsa = vc.encode_vmsa(vc.reset_state(0), 0)
    assert vm.launch_digest == hashlib.sha256(image + reset_vmsa).digest()


def test_es_launch_measures_one_vmsa_per_vcpu_in_order(launch):
    vm = launch(policy=int(Policy.ES), vcpus=3)
    pages = b"".join(vc.encode_vmsa(vc.reset_state(i), i) for i in range(3))
    assert vm.launch_digest == hashlib.sha256(default_image() + pages).digest()


def test_bad_config_is_a_config_error(fw):
    for kw, key in [(dict(memory_bytes=4096), "memory_bytes"), (dict(image=b"x" * 15), "image"),
                    (dict(shared_fraction=1.5), "shared_fraction"), (dict(dirty_rate_mib_s=-1), "dirty_rate_mib_s"),
                    (dict(vcpus=0), "vcpus"), (dict(policy=-1), "policy"),
                    (dict(working_set_mib=0), "working_set_mib")]:
        cfg = dict(name="g", memory_bytes=8 * MiB)
        cfg.update(kw)
        with pytest.raises(ConfigError) as ei:
            SevVm.launch(fw, GuestConfig(**cfg), asid=next(_asids), rng=seeded_rng(1))
        assert ei.value.key == key


# ---------------------------------------------------------------------------------------- workload
def test_same_seed_same_memory():
    def one():
        fw = seeded_firmware(5)
        vm = SevVm.launch(fw, GuestConfig("d", 8 * MiB, dirty_rate_mib_s=20, shared_fraction=0.2,
                                          flip_rate=200, seed=42), asid=1, rng=seeded_rng(6))
        for dt in (0.01, 0.02, 0.005, 0.03, 0.01):
            vm.run(dt)
        vm.agent.write(vm._kernel.layout.pool_start * PAGE + 5, b"agent data", shared=True)
        vm.run(0.05)
        k = vm._kernel
        plain = k.mem.read_pages(np.arange(vm.npages), ~guest_shared_truth(vm)).tobytes()
        out = (plain, vm.host.page_enc_bitmap().tobytes(), vm.host.read_raw_pages(range(vm.npages)),
               vm._regs[0].copy())
        vm.release()
        return out

    a, b = one(), one()
    assert a[0] == b[0]          # same plaintext
    assert a[1] == b[1]          # same page-encryption state
    assert a[2] == b[2]          # same DRAM (same VEK from the same firmware RNG)
    assert a[3] == b[3]


def test_different_seed_different_pages(fw):
    seqs = []
    for seed in (1, 2):
        vm = SevVm.launch(fw, GuestConfig("s", 8 * MiB, dirty_rate_mib_s=4, seed=seed),
                          asid=next(_asids), rng=seeded_rng(3))
        vm.host.enable_dirty_log()
        vm.run(0.05)
        seqs.append(vm.host.get_and_clear_dirty_log())
        vm.release()
    assert not np.array_equal(seqs[0], seqs[1])


def _dirty_in_ws(vm, steps: int, dt: float) -> int:
    k = vm._kernel
    lo, hi = k.params.ws_lo, k.params.ws_hi
    vm.host.enable_dirty_log()
    total = 0
    for _ in range(steps):
        vm.run(dt)
        d = vm.host.get_and_clear_dirty_log()
        total += int(np.count_nonzero((d >= lo) & (d < hi)))
    return total


def test_dirty_rate_as_configured(launch):
    vm = launch(memory_bytes=64 * MiB, dirty_rate_mib_s=8, working_set_mib=32)
    n = _dirty_in_ws(vm, 100, 0.01)          # 1 simulated second
    expected = 8 * 256
    assert abs(n - expected) <= 0.05 * expected, n
    assert vm.verify().ok


def test_throttle_reduces_and_pause_stops_work(launch):
    vm = launch(memory_bytes=64 * MiB, dirty_rate_mib_s=8, working_set_mib=32)
    vm.host.set_throttle(50)
    n = _dirty_in_ws(vm, 100, 0.01)
    assert abs(n - 1024) <= 0.06 * 1024, n
    vm.host.pause()
    assert _dirty_in_ws(vm, 20, 0.01) == 0
    vm.host.resume()
    vm.host.set_throttle(0)
    assert _dirty_in_ws(vm, 10, 0.01) > 0
    with pytest.raises(ConfigError):
        vm.host.set_throttle(100)


def test_workload_keeps_shared_fraction_and_flips(launch):
    vm = launch(shared_fraction=0.25, flip_rate=500)
    k = vm._kernel
    target = k.params.shared_target
    assert target > 0 and vm._regs[0]["wl_shared"] == target
    calls = []
    orig = vm.kvm.handle_hypercall
    vm.kvm.handle_hypercall = lambda *a: calls.append(a) or orig(*a)
    for _ in range(20):
        vm.run(0.01)
    assert len(calls) >= 90                     # ~100 flips in 0.2 s (a few skipped is fine)
    assert abs(int(vm._regs[0]["wl_shared"]) - target) <= 1
    truth = guest_shared_truth(vm)
    assert np.count_nonzero(~truth) == vm.shared_pages()
    assert np.array_equal(vm.host.page_enc_bitmap(), truth)
    assert vm.verify().ok


# ---------------------------------------------------------------------------------------- agent
def test_agent_roundtrip_private_and_shared(launch):
    vm = launch()
    base = vm._kernel.layout.pool_start * PAGE
    vm.agent.write(base + 100, b"private bytes")
    vm.agent.write(base + 3 * PAGE - 4, b"spans two pages", shared=True)
    assert vm.agent.read(base + 100, 13) == b"private bytes"
    assert vm.agent.read(base + 3 * PAGE - 4, 15) == b"spans two pages"
    bm = vm.host.page_enc_bitmap()
    p0 = base // PAGE
    assert bm[p0] and not bm[p0 + 2] and not bm[p0 + 3]
    assert vm.verify().ok


def test_agent_pages_leave_the_workload(launch):
    vm = launch(dirty_rate_mib_s=200)     # writes more pages than the pool has: every page is hit
    gpa = vm._kernel.params.ws_lo * PAGE
    vm.agent.write(gpa, b"mine")
    for _ in range(10):
        vm.run(0.01)
    assert vm.agent.read(gpa, 4) == b"mine"
    assert vm.verify().ok


def test_agent_refuses_bad_requests(launch):
    vm = launch()
    with pytest.raises(ConfigError):
        vm.agent.write(vm.memory_bytes - 2, b"abcd")
    with pytest.raises(ConfigError):
        vm.agent.write(vm._kernel.layout.kstate_pfn * PAGE, b"x")   # kernel metadata
    with pytest.raises(ConfigError):
        vm.agent.read(-1, 4)
    vm.host.pause()
    with pytest.raises(GuestNotRunning):
        vm.agent.write(vm._kernel.layout.pool_start * PAGE, b"x")


# ---------------------------------------------------------------------------------------- trust boundary
def _host_exposed(vm) -> bytes:
    h = vm.host
    parts = [h.read_raw_pages(np.arange(vm.npages)), h.page_enc_bitmap().tobytes(),
             h.get_and_clear_dirty_log().tobytes(), repr(h.get_vcpu_state()).encode(),
             repr(vars(h)).encode(), str(h.migration_control).encode()]
    return b"".join(parts)


def test_host_cannot_see_private_plaintext_but_sees_shared(launch):
    vm = launch(dirty_rate_mib_s=5)
    vm.host.enable_dirty_log()
    canary = b"CANARY-" + hashlib.sha256(b"private").hexdigest().encode()
    gpa = vm._kernel.layout.pool_start * PAGE + 512
    vm.agent.write(gpa, canary)
    vm.run(0.02)
    assert vm.agent.read(gpa, len(canary)) == canary
    assert canary not in _host_exposed(vm)
    canary2 = b"CANARY-" + hashlib.sha256(b"shared").hexdigest().encode()
    vm.agent.write(gpa + 8 * PAGE, canary2, shared=True)
    assert canary2 in _host_exposed(vm)


def test_es_registers_not_readable_by_host(launch, fw):
    vm = launch(policy=int(Policy.ES), dirty_rate_mib_s=5)
    vm.run(0.05)
    with pytest.raises(VcpuStateProtected):
        vm.host.get_vcpu_state()
    with pytest.raises(VcpuStateProtected):
        vm.host.set_vcpu_state([vc.reset_state(0)])
    assert vm.host.is_es
    regs = vm._regs[0]
    plain = vc.encode_vmsa(regs, 0)
    raw = bytes(vm._vmsa[0])
    assert raw != plain and plain[0x178:0x180] not in raw
    seq = regs["wl_seq"].to_bytes(8, "little")
    assert seq not in raw
    # the guest side (and the PSP) see the registers
    assert vc.decode_vmsa(fw.memory_engine(vm.handle).decrypt(VMSA_PADDR, raw), 0) == regs


def test_non_es_vcpu_state_roundtrip(launch):
    vm = launch(vcpus=2)
    regs = vm.host.get_vcpu_state()
    assert len(regs) == 2 and regs[0]["rip"] == 0xFFF0
    regs[1]["rax"] = 7
    vm.host.set_vcpu_state(regs)
    assert vm.host.get_vcpu_state()[1]["rax"] == 7
    with pytest.raises(ValueError):
        vm.host.set_vcpu_state([{"rax": 1}])


# ---------------------------------------------------------------------------------------- control MSR / reboot
def test_migration_control_set_by_supporting_kernel(launch):
    vm = launch()
    assert vm.host.migration_control == 1
    assert vm.host.migration_control_supported


def test_guest_without_migration_control_is_visible(launch):
    vm = launch(migration_control=False, shared_fraction=0.1, flip_rate=100)
    vm.run(0.1)
    assert vm.host.migration_control == 0
    assert not vm.host.migration_control_supported
    assert vm.shared_pages() > 0
    # no hypercalls: the VMM's bitmap is stale (all private), which is why it must refuse to migrate
    assert vm.host.page_enc_bitmap().all()
    assert vm.verify().ok


def test_reboot_resets_bitmap_msr_and_ledger(launch):
    vm = launch(dirty_rate_mib_s=5)
    gpa = vm._kernel.layout.pool_start * PAGE
    vm.agent.write(gpa, b"shared before reboot", shared=True)
    vm.run(0.05)
    assert not vm.host.page_enc_bitmap().all()
    seen = []
    orig = vm.host.wrmsr
    vm.host.wrmsr = lambda msr, v: (seen.append((msr, v, vm.host.migration_control)), orig(msr, v))
    vm.reboot()
    assert seen == [(MSR_KVM_MIGRATION_CONTROL, 1, 0)]   # MSR was 0 until the new kernel set it
    assert vm.host.page_enc_bitmap().all()
    assert vm.shared_pages() == 0
    assert guest_shared_truth(vm).all()
    rep = vm.verify()
    assert rep.ok and rep.pages_checked < 40   # fresh ledger: only image + metadata are claimed
    vm.run(0.05)
    assert vm.verify().ok


def test_release_decommissions(fw):
    vm = SevVm.launch(fw, GuestConfig("r", 8 * MiB), asid=next(_asids), rng=seeded_rng(1))
    h = vm.handle
    vm.release()
    assert vm.sev_state == "UNINIT"
    vm.release()   # idempotent
    with pytest.raises(Exception):
        fw.guest_status(h)


def test_big_guest_is_lazy():
    fw = seeded_firmware(3)
    vm = SevVm.launch(fw, GuestConfig("big", 8 << 30, dirty_rate_mib_s=100), asid=1, rng=seeded_rng(2))
    vm.host.enable_dirty_log()
    vm.run(0.01)
    d = vm.host.get_and_clear_dirty_log()
    assert 200 < len(d) < 1000
    assert vm.verify().ok
    vm.release()


def test_info_shows_measurement_and_state(launch):
    vm = launch(shared_fraction=0.1)
    info = vm.info()
    assert info["measurement"] == vm.measurement.hex() and info["launch_digest"] == vm.launch_digest.hex()
    assert info["sev_state"] == "RUNNING" and info["migration_control"] == 1
    assert info["shared_pages"] + info["private_pages"] == vm.npages and info["shared_pages"] > 0


# ---------------------------------------------------------------------------------------- VMSA codec
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(vcpu=st.integers(0, 63), vals=st.lists(st.integers(0, vc.U64), min_size=1, max_size=50))
def test_vmsa_roundtrip(vcpu, vals):
    regs = vc.reset_state(vcpu)
    for i, v in enumerate(vals):
        regs[sorted(regs)[i % len(regs)]] = v
    page = vc.encode_vmsa(regs, vcpu)
    assert len(page) == 4096 and not any(page[vc.VMSA_REGS_LIMIT:])
    assert vc.decode_vmsa(page, vcpu) == regs


def test_vmsa_uses_the_hardware_save_area_offsets():
    """AMD APM vol. 2 SEV-ES save area / Linux `struct sev_es_save_area`: each register at its offset."""
    regs = vc.reset_state(1)
    for i, name in enumerate(vc.ARCH_REGS):
        regs[name] = 0x1111111111111111 * (i % 15 + 1)
    page = vc.encode_vmsa(regs, 1)
    expect = {"rax": 0x1F8, "rsp": 0x1D8, "rip": 0x178, "rflags": 0x170, "cr0": 0x158, "cr3": 0x150,
              "cr4": 0x148, "efer": 0xD0, "rcx": 0x308, "rdx": 0x310, "rbx": 0x318, "rbp": 0x328, "rsi": 0x330,
              "rdi": 0x338, "r8": 0x340, "r15": 0x378}
    for name, off in expect.items():
        assert int.from_bytes(page[off:off + 8], "little") == regs[name], name
    assert not any(page[0x320:0x328])       # reserved: RSP already lives at 0x1D8
    assert not any(page[vc.VMSA_SAVE_AREA_END:])   # an AP's page: nothing past the hardware save area


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=4100), vcpu=st.integers(0, 3))
def test_vmsa_decode_rejects_garbage_with_valueerror(data, vcpu):
    try:
        vc.decode_vmsa(data, vcpu)
    except ValueError:
        pass


def test_vmsa_decode_rejects_a_byte_outside_the_fields():
    page = bytearray(vc.encode_vmsa(vc.reset_state(2), 2))
    page[0x320] = 1
    with pytest.raises(ValueError):
        vc.decode_vmsa(bytes(page), 2)


def test_prefill_writes_every_pool_page_with_random_looking_ledgered_content(launch):
    """GuestConfig.prefill: no pool page is zero or repetitive, shared pages stay shared, verify checks
    every one, and a damaged prefilled page is named (the ledger covers them)."""
    vm = launch(memory_bytes=4 * MiB, shared_fraction=0.25, prefill=True, seed=4)
    k = vm._kernel
    lay = k.layout
    pool = np.arange(lay.pool_start, vm.npages)
    raw = vm._ram.pages[pool]
    assert raw.any(axis=1).all()                      # DRAM holds data in every pool page
    shared = ~vm.host.page_enc_bitmap()[pool]
    assert shared.sum() == round(0.25 * len(pool))    # the guest's shared share is unchanged
    plain = k.mem.read_pages(pool, shared)
    # random-looking: per page almost all 8-byte words distinct (not a short repeated pattern)
    words = plain.view(np.uint64)
    assert min(len(np.unique(w)) for w in words[:64]) > 500
    rep = vm.verify()
    assert rep.ok and rep.pages_checked >= len(pool)
    victim = int(pool[len(pool) // 2])
    vm._ram.pages[victim, 100] ^= 1
    assert vm.verify().mismatches == [victim]


def test_prefill_is_seeded_and_off_by_default(fw):
    a = SevVm.launch(fw, GuestConfig("pa", 2 * MiB, prefill=True, seed=8), asid=next(_asids), rng=seeded_rng(5))
    b = SevVm.launch(fw, GuestConfig("pb", 2 * MiB, prefill=True, seed=8), asid=next(_asids), rng=seeded_rng(5))
    c = SevVm.launch(fw, GuestConfig("pc", 2 * MiB, seed=8), asid=next(_asids), rng=seeded_rng(5))
    try:
        pool = np.arange(a._kernel.layout.pool_start, a.npages)
        shared = np.zeros(len(pool), bool)
        pa = a._kernel.mem.read_pages(pool, shared)
        assert np.array_equal(pa, b._kernel.mem.read_pages(pool, shared))
        assert not c._ram.pages[pool].any()           # without prefill the pool is untouched
        with pytest.raises(ConfigError) as ei:
            GuestConfig("x", 2 * MiB, prefill=1).validate()
        assert ei.value.key == "prefill"
    finally:
        for vm in (a, b, c):
            vm.release()
