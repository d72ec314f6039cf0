"""Host view of an emulated SEV guest: page-encryption hypercalls and bitmap, dirty log, raw pages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sevmigd.guest.hypervisor import (KVM_HC_MAP_GPA_RANGE, KVM_HC_PAGE_ENC_STATUS, HostView, UnknownMsr)
from sevmigd.guest.kernel import KVM_EINVAL, KVM_ENOSYS
from sevmigd.guest.kernel import KVM_HC_MAP_GPA_RANGE as GUEST_MAP_GPA_RANGE
from sevmigd.guest.kernel import KVM_HC_PAGE_ENC_STATUS as GUEST_PAGE_ENC_STATUS
from sevmigd.guest.ledger import F_SHARED
from sevmigd.guest.memory import GuestRam
from sevmigd.guest.vcpu import reset_state
from sevmigd.guest.vm import GuestConfig, SevVm

from conftest import seeded_firmware, seeded_rng

MiB = 1 << 20
PAGE = 4096
ENC = 1 << 4


@pytest.fixture(scope="module")
def fw():
    return seeded_firmware(11)


_asids = itertools.count(1)


@pytest.fixture
def vm(fw):
    v = SevVm.launch(fw, GuestConfig("h", 4 * MiB), asid=next(_asids), rng=seeded_rng(2))
    yield v
    v.release()


def host_only(npages=64) -> HostView:
    return HostView(GuestRam(npages * PAGE), policy=0, handle=1, vcpu_regs=[reset_state(0)], es=False)


def test_hypercall_numbers_agree_between_guest_and_host():
    assert KVM_HC_MAP_GPA_RANGE == GUEST_MAP_GPA_RANGE == 12
    assert KVM_HC_PAGE_ENC_STATUS == GUEST_PAGE_ENC_STATUS


@pytest.mark.parametrize("nr", [KVM_HC_MAP_GPA_RANGE, KVM_HC_PAGE_ENC_STATUS])
def test_every_flip_is_reported_and_reflected(vm, nr):
    vm._kernel.set_hypercall(nr)
    calls = []
    orig = vm.kvm.handle_hypercall
    vm.kvm.handle_hypercall = lambda *a: calls.append(a) or orig(*a)
    base = vm._kernel.layout.pool_start
    vm.agent.write(base * PAGE, b"x" * (3 * PAGE), shared=True)       # pages base..base+2 -> shared
    vm.agent.write((base + 10) * PAGE, b"y", shared=True)
    vm.agent.write((base + 1) * PAGE, b"z", shared=False)              # page base+1 back to private
    if nr == KVM_HC_MAP_GPA_RANGE:
        want = [(12, base * PAGE, 3, 0), (12, (base + 10) * PAGE, 1, 0), (12, (base + 1) * PAGE, 1, ENC)]
    else:
        want = [(nr, base * PAGE, 3, 0), (nr, (base + 10) * PAGE, 1, 0), (nr, (base + 1) * PAGE, 1, 1)]
    assert calls == want
    bm = vm.host.page_enc_bitmap()
    assert list(np.flatnonzero(~bm)) == [base, base + 2, base + 10]
    tx = vm._kernel.ledger.begin(np.arange(vm.npages))
    assert np.array_equal(bm, (tx.w0 & np.uint64(F_SHARED)) == 0)
    assert vm.shared_pages() == 3 and vm.private_pages() == vm.npages - 3
    assert vm.verify().ok


def test_workload_flips_match_bitmap_after_every_step(fw):
    vm = SevVm.launch(fw, GuestConfig("f", 4 * MiB, shared_fraction=0.3, flip_rate=1000,
                                      dirty_rate_mib_s=10), asid=next(_asids), rng=seeded_rng(3))
    try:
        for _ in range(10):
            vm.run(0.01)
            tx = vm._kernel.ledger.begin(np.arange(vm.npages))
            assert np.array_equal(vm.host.page_enc_bitmap(), (tx.w0 & np.uint64(F_SHARED)) == 0)
        assert vm.verify().ok
    finally:
        vm.release()


MALFORMED = [
    (KVM_HC_MAP_GPA_RANGE, 0x1001, 1, 0),            # gpa not page aligned
    (KVM_HC_MAP_GPA_RANGE, 0, 0, 0),                 # npages 0
    (KVM_HC_MAP_GPA_RANGE, 60 * PAGE, 5, 0),         # beyond RAM (64 pages)
    (KVM_HC_MAP_GPA_RANGE, 64 * PAGE, 1, 0),         # starts beyond RAM
    (KVM_HC_MAP_GPA_RANGE, 0, (1 << 64) - 1, 0),     # wraps
    (KVM_HC_MAP_GPA_RANGE, 0, 1, 1 << 5),            # reserved attribute bit
    (KVM_HC_MAP_GPA_RANGE, 0, 1, 1 << 63),
    (KVM_HC_MAP_GPA_RANGE, 0, 1, 3),                 # page-size hint 3
    (KVM_HC_MAP_GPA_RANGE, 0, 1, 0xF | ENC),
    (KVM_HC_MAP_GPA_RANGE, -PAGE, 1, 0),             # not a u64
    (KVM_HC_MAP_GPA_RANGE, 0, 1.0, 0),
    (KVM_HC_PAGE_ENC_STATUS, 0, 1, 2),               # enc must be 0/1
    (KVM_HC_PAGE_ENC_STATUS, 7, 1, 0),
]


@pytest.mark.parametrize("call", MALFORMED)
def test_malformed_hypercalls_return_einval_and_change_nothing(call):
    h = host_only()
    assert h.handle_hypercall(*call) == -KVM_EINVAL
    assert h.page_enc_bitmap().all()


def test_unknown_hypercall_is_enosys():
    h = host_only()
    assert h.handle_hypercall(99, 0, 1, 0) == -KVM_ENOSYS
    assert h.page_enc_bitmap().all()


def test_page_size_hints_accepted():
    h = host_only()
    for hint in (0, 1, 2):
        assert h.handle_hypercall(KVM_HC_MAP_GPA_RANGE, hint * PAGE, 1, hint) == 0
    assert list(np.flatnonzero(~h.page_enc_bitmap())) == [0, 1, 2]
    assert h.handle_hypercall(KVM_HC_MAP_GPA_RANGE, 0, 64, ENC | 1) == 0
    assert h.page_enc_bitmap().all()


u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
anyint = st.one_of(u64, st.integers(min_value=-(1 << 70), max_value=1 << 70), st.sampled_from([0, 1, 12, 13, 4096]))


@settings(max_examples=200, deadline=None)
@given(nr=st.one_of(st.sampled_from([12, 13]), anyint), a0=anyint, a1=anyint, a2=anyint)
def test_arbitrary_hypercalls_never_crash(nr, a0, a1, a2):
    h = host_only()
    before = h.page_enc_bitmap()
    ret = h.handle_hypercall(nr, a0, a1, a2)
    assert ret in (0, -KVM_EINVAL, -KVM_ENOSYS)
    if ret != 0:
        assert np.array_equal(h.page_enc_bitmap(), before)
    else:
        first = a0 // PAGE
        changed = np.flatnonzero(h.page_enc_bitmap() != before)
        assert all(first <= c < first + a1 for c in changed)


def test_bitmap_get_set_reset_and_status():
    h = host_only()
    assert h.page_enc_bitmap().dtype == bool and h.page_enc_bitmap().all()
    bits = np.ones(64, bool)
    bits[[3, 9]] = False
    h.set_page_enc_bitmap(bits)
    got = h.page_enc_bitmap()
    assert np.array_equal(got, bits)
    got[0] = False                      # a copy: the caller cannot change the VMM's bitmap by accident
    assert h.page_enc_bitmap()[0]
    h.set_page_enc_status([10, 11], False)
    h.set_page_enc_status(np.array([3]), True)
    assert list(np.flatnonzero(~h.page_enc_bitmap())) == [9, 10, 11]
    h.reset_page_enc_bitmap()
    assert h.page_enc_bitmap().all()
    with pytest.raises(ValueError):
        h.set_page_enc_bitmap(np.ones(63, bool))
    with pytest.raises(ValueError):
        h.set_page_enc_status([64], True)


def test_dirty_log_get_and_clear(vm):
    h = vm.host
    base = vm._kernel.layout.pool_start
    vm.agent.write(base * PAGE, b"a")          # before logging is enabled: not reported
    h.enable_dirty_log()
    assert len(h.get_and_clear_dirty_log()) == 0
    vm.agent.write((base + 5) * PAGE, b"b")
    vm.agent.write((base + 2) * PAGE, b"c")
    vm.agent.write((base + 5) * PAGE, b"d")
    d = h.get_and_clear_dirty_log()
    assert d.dtype == np.int64 and list(d) == sorted(set(d.tolist()))
    assert {base + 2, base + 5} <= set(d.tolist())
    data_pages = [p for p in d.tolist() if p >= base]
    assert data_pages == [base + 2, base + 5]
    assert len(h.get_and_clear_dirty_log()) == 0
    h.write_raw_pages([base + 7], bytes(PAGE))  # host writes are not guest writes
    assert len(h.get_and_clear_dirty_log()) == 0
    h.disable_dirty_log()
    vm.agent.write((base + 9) * PAGE, b"e")
    assert len(h.get_and_clear_dirty_log()) == 0


def test_raw_pages_roundtrip_and_bounds():
    h = host_only()
    data = bytes(range(256)) * 32
    h.write_raw_pages([5, 7], data)
    assert h.read_raw_pages([7, 5]) == data[PAGE:] + data[:PAGE]
    with pytest.raises(ValueError):
        h.read_raw_pages([64])
    with pytest.raises(ValueError):
        h.write_raw_pages([1], b"short")


def test_private_page_raw_is_ciphertext(vm):
    gpa = vm._kernel.layout.pool_start * PAGE
    vm.agent.write(gpa, b"P" * PAGE)
    assert vm.host.read_raw_pages([gpa // PAGE]) != b"P" * PAGE
    vm.agent.write(gpa + PAGE, b"S" * PAGE, shared=True)
    assert vm.host.read_raw_pages([gpa // PAGE + 1]) == b"S" * PAGE


def test_unknown_msr_is_refused():
    h = host_only()
    with pytest.raises(UnknownMsr):
        h.wrmsr(0x10, 1)


def test_raw_pages_runs_and_gathers_agree_and_page_enc_status_reads_a_subset():
    """Raw page I/O has a memcpy path for contiguous runs and a gather path otherwise: same bytes;
    page_enc_status(pfns) equals the full bitmap indexed by pfns and is a copy."""
    from sevmigd.guest.memory import GuestRam

    for populate in (False, True):
        ram = GuestRam(64 * 4096, populate=populate)
        data = bytes(range(256)) * 16 * 64
        ram.write_raw(np.arange(64), data)
        assert ram.read_raw(np.arange(10, 20)) == data[10 * 4096:20 * 4096]
        scattered = np.array([5, 3, 60, 3])
        assert ram.read_raw(scattered) == b"".join(data[p * 4096:(p + 1) * 4096] for p in scattered)
        ram.write_raw(np.array([7]), b"\x01" * 4096)
        ram.write_raw(np.array([9, 8]), b"\x02" * 4096 + b"\x03" * 4096)
        assert ram.read_raw(np.arange(7, 10)) == b"\x01" * 4096 + b"\x03" * 4096 + b"\x02" * 4096
        ram.release()
    host = host_only(64)
    host.set_page_enc_status([3, 4, 40], False)
    pf = np.array([40, 1, 3, 63])
    got = host.page_enc_status(pf)
    assert got.tolist() == host.page_enc_bitmap()[pf].tolist() == [False, True, False, True]
    got[:] = True                                   # a copy: the host's bitmap is untouched
    assert not host.page_enc_bitmap()[40]
    with pytest.raises(ValueError):
        host.page_enc_status([64])


def test_incoming_guest_on_caller_made_populated_ram(fw):
    """SevVm.incoming(ram=GuestRam(size, populate=True)): the destination may build (and fault in) the
    RAM elsewhere, e.g. in a worker thread; a RAM of the wrong size is a ConfigError."""
    import trio

    from sevmigd.errors import ConfigError

    async def make():
        return await trio.to_thread.run_sync(lambda: GuestRam(2 << 20, populate=True))

    ram = trio.run(make)
    h = fw.launch_start(policy=0)        # any fresh handle works for ACTIVATE + map
    vm = SevVm.incoming(fw, name="in", memory_bytes=2 << 20, policy=0, handle=h, asid=77, ram=ram)
    assert vm.host.read_raw_pages([0]) == bytes(4096) and vm.host.paused
    vm.release()
    with pytest.raises(ConfigError):
        SevVm.incoming(fw, name="in2", memory_bytes=4 << 20, policy=0, handle=fw.launch_start(policy=0),
                       asid=78, ram=GuestRam(2 << 20))


def test_populate_ram_in_a_thread_keeps_contents_and_stops_on_request():
    """populate() makes pages resident without changing any (it may race with writers), stops when asked
    or released, and a released RAM is never touched."""
    import resource
    import threading

    ram = GuestRam(256 * 4096)
    host = HostView(ram, policy=0, handle=1, vcpu_regs=[reset_state(0)], es=False)
    host.write_raw_pages(np.arange(10, 20), b"\x07" * 10 * 4096)
    done = []
    t = threading.Thread(target=lambda: done.append(host.populate_ram()))
    t.start()
    t.join()
    assert host.read_raw_pages(np.arange(10, 20)) == b"\x07" * 10 * 4096
    assert host.read_raw_pages([0]) == bytes(4096)
    data = b"\x01" * 256 * 4096
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    host.write_raw_pages(np.arange(0, 256), data)
    if done == [True]:                                # Linux >= 5.14: everything was resident already
        assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - after < 64
    assert GuestRam(64 * 4096).populate(stop=lambda: True) is True      # stopped before the first chunk
    gone = GuestRam(64 * 4096)
    gone.release()
    assert gone.populate() is True                                      # released: nothing to do
