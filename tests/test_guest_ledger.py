"""The guest's self-check ledger: every kind of damage a host or a broken migration can do to guest
memory is caught by verify, and pinned to exactly the damaged page. Damage is done only through the
host view's raw page access (what a hypervisor or a migration bug could do)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sevmigd.guest.ledger import (ENTRIES_PER_PAGE, RECORDS_PER_PAGE, Layout, contrib, mix, workload_content)
from sevmigd.guest.vm import GuestConfig, SevVm

from conftest import seeded_firmware, seeded_rng

MiB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def fw():
    return seeded_firmware(21)


_asids = itertools.count(1)


@pytest.fixture
def vm(fw):
    """A guest with workload pages (private and shared), agent pages, image pages."""
    v = SevVm.launch(fw, GuestConfig("l", 8 * MiB, dirty_rate_mib_s=30, shared_fraction=0.2, seed=4),
                     asid=next(_asids), rng=seeded_rng(5))
    for _ in range(5):
        v.run(0.01)
    base = v._kernel.layout.pool_start
    v.agent.write(base * PAGE, b"agent private page")
    v.agent.write((base + 1) * PAGE, b"agent shared page", shared=True)
    assert v.verify().ok
    yield v
    v.release()


def written_workload_pages(vm, shared: bool) -> list[int]:
    k = vm._kernel
    tx = k.ledger.begin(np.arange(k.layout.pool_start + 2, vm.npages))
    w = (tx.w0 & np.uint64(1)) != 0
    s = (tx.w0 & np.uint64(2)) != 0
    return tx.pfns[w & (s == shared)].tolist()


def flip_byte(vm, pfn, offset=100):
    raw = bytearray(vm.host.read_raw_pages([pfn]))
    raw[offset] ^= 0x01
    vm.host.write_raw_pages([pfn], bytes(raw))


def assert_caught(vm, pfns):
    rep = vm.verify()
    assert not rep.ok
    assert rep.mismatches == sorted(pfns)


@pytest.mark.parametrize("shared", [False, True])
def test_corrupted_byte(vm, shared):
    pfn = written_workload_pages(vm, shared)[3]
    flip_byte(vm, pfn, offset=4095)
    assert_caught(vm, [pfn])


@pytest.mark.parametrize("shared", [False, True])
def test_lost_page(vm, shared):
    pfn = written_workload_pages(vm, shared)[0]
    vm.host.write_raw_pages([pfn], bytes(PAGE))
    assert_caught(vm, [pfn])


@pytest.mark.parametrize("shared", [False, True])
def test_swapped_pages(vm, shared):
    a, b = written_workload_pages(vm, shared)[1:3]
    ra, rb = vm.host.read_raw_pages([a]), vm.host.read_raw_pages([b])
    vm.host.write_raw_pages([a, b], rb + ra)
    assert_caught(vm, [a, b])


def test_stale_page_old_ciphertext(vm):
    base = vm._kernel.layout.pool_start
    pfn = base + 0                                  # the agent's private page
    old = vm.host.read_raw_pages([pfn])
    vm.agent.write(pfn * PAGE, b"newer content")
    assert vm.verify().ok
    vm.host.write_raw_pages([pfn], old)
    assert_caught(vm, [pfn])


def test_stale_workload_page(vm):
    k = vm._kernel
    pfn = written_workload_pages(vm, False)[0]
    old = vm.host.read_raw_pages([pfn])
    k.write_workload(np.array([pfn]))               # the workload rewrites it (new version)
    assert vm.verify().ok
    vm.host.write_raw_pages([pfn], old)
    assert_caught(vm, [pfn])


def test_stale_shared_agent_page(vm):
    pfn = vm._kernel.layout.pool_start + 1
    old = vm.host.read_raw_pages([pfn])
    vm.agent.write(pfn * PAGE, b"second version", shared=True)
    vm.host.write_raw_pages([pfn], old)
    assert_caught(vm, [pfn])


def test_image_page_damage(vm):
    flip_byte(vm, 2)
    assert_caught(vm, [2])


def journal_home(vm, pfn):
    """The journal page holding pfn's latest record, or None when its entry is in the table."""
    led = vm._kernel.ledger
    recs = led._journal_records()
    hits = np.flatnonzero(recs[:, 0] == pfn)
    if not len(hits):
        return None
    return vm._kernel.layout.journal_start + int(hits[-1]) // RECORDS_PER_PAGE


def test_corrupted_journal_page(vm):
    pfn = written_workload_pages(vm, False)[-1]
    jp = journal_home(vm, pfn)
    assert jp is not None
    flip_byte(vm, jp, offset=32 * 3 + 9)
    assert_caught(vm, [jp])


def test_corrupted_table_page(vm):
    k = vm._kernel
    assert k.ledger.compact()
    assert vm.verify().ok and k.regs["jlen"] == 0
    pfn = written_workload_pages(vm, False)[0]
    lp = k.layout.ledger_start + pfn // ENTRIES_PER_PAGE
    flip_byte(vm, lp, offset=16 * 7 + 3)
    assert_caught(vm, [lp])


def test_stale_journal_page_with_stale_data(vm):
    """Host rolls back a data page AND the journal page with its record to a consistent older
    snapshot: the directory (and its root in the vCPU registers) catch it."""
    k = vm._kernel
    pfn = written_workload_pages(vm, False)[0]
    k.write_workload(np.array([pfn]))
    jp = journal_home(vm, pfn)
    snap = vm.host.read_raw_pages([pfn, jp])
    k.write_workload(np.array([pfn]))
    assert journal_home(vm, pfn) == jp and vm.verify().ok
    vm.host.write_raw_pages([pfn, jp], snap)
    assert_caught(vm, [jp])


def test_stale_table_page_with_stale_data(vm):
    k = vm._kernel
    pfn = written_workload_pages(vm, False)[0]
    lp = k.layout.ledger_start + pfn // ENTRIES_PER_PAGE
    assert k.ledger.compact()
    snap = vm.host.read_raw_pages([pfn, lp])
    k.write_workload(np.array([pfn]))
    assert k.ledger.compact()             # the new entry reaches the table
    assert vm.verify().ok
    vm.host.write_raw_pages([pfn, lp], snap)
    assert_caught(vm, [lp])


def test_stale_metadata_and_directory_caught_by_register_root(vm):
    """Rolling back data, journal and directory pages together is still caught: the root is a register."""
    k = vm._kernel
    lay = k.layout
    pfn = written_workload_pages(vm, False)[0]
    k.write_workload(np.array([pfn]))
    jp = journal_home(vm, pfn)
    snap = vm.host.read_raw_pages([pfn, jp, lay.dir_start])
    k.write_workload(np.array([pfn]))
    vm.host.write_raw_pages([pfn, jp, lay.dir_start], snap)
    assert_caught(vm, [lay.dir_start])


def test_swapped_table_pages(vm):
    k = vm._kernel
    lay = k.layout
    assert k.ledger.compact()
    a, b = lay.ledger_start + 1, lay.ledger_start + lay.n_ledger - 1
    ra, rb = vm.host.read_raw_pages([a]), vm.host.read_raw_pages([b])
    assert ra != rb
    vm.host.write_raw_pages([a, b], rb + ra)
    assert_caught(vm, [a, b])


def test_swapped_journal_pages(vm):
    k = vm._kernel
    lay = k.layout
    while k.regs["jlen"] < 2 * RECORDS_PER_PAGE:
        vm.run(0.01)
    a, b = lay.journal_start, lay.journal_start + 1
    ra, rb = vm.host.read_raw_pages([a]), vm.host.read_raw_pages([b])
    vm.host.write_raw_pages([a, b], rb + ra)
    assert_caught(vm, [a, b])


def test_many_writes_wrap_the_journal_and_stay_verifiable(vm):
    k = vm._kernel
    cap = k.layout.journal_capacity
    before = int(k.regs["wl_seq"])
    for _ in range(40):
        vm.run(0.01)
    assert int(k.regs["wl_seq"]) - before > cap       # at least one compaction happened
    assert vm.verify().ok
    pfn = written_workload_pages(vm, True)[0]
    flip_byte(vm, pfn)
    assert_caught(vm, [pfn])


def test_damaged_journal_is_not_compacted_away(vm):
    """A full journal with a damaged page is not compacted (that would erase the evidence): later
    writes go straight to the table, and verify still names the journal page."""
    k = vm._kernel
    pfn = written_workload_pages(vm, False)[-1]
    jp = journal_home(vm, pfn)
    flip_byte(vm, jp, offset=40)
    assert not k.ledger.compact()
    for _ in range(40):
        vm.run(0.01)
    assert_caught(vm, [jp])


def test_lost_directory_page(vm):
    lay = vm._kernel.layout
    vm.host.write_raw_pages([lay.dir_start], bytes(PAGE))
    assert_caught(vm, [lay.dir_start])


def test_damaged_kernel_state_page(vm):
    lay = vm._kernel.layout
    flip_byte(vm, lay.kstate_pfn, 40)
    assert_caught(vm, [lay.kstate_pfn])


def test_damage_survives_later_updates_of_the_same_table_page(vm):
    """Corrupt an entry, then let compaction update another entry of that table page: the
    incremental accumulator keeps the discrepancy, verify still reports the table page."""
    k = vm._kernel
    lay = k.layout
    assert k.ledger.compact()
    pfn = written_workload_pages(vm, False)[0]
    lp = lay.ledger_start + pfn // ENTRIES_PER_PAGE
    flip_byte(vm, lp, offset=16 * ((pfn + 1) % ENTRIES_PER_PAGE))
    k.write_workload(np.array([pfn]))
    assert k.ledger.compact()
    assert_caught(vm, [lp])


def test_damage_survives_later_appends_to_the_same_journal_page(vm):
    k = vm._kernel
    lay = k.layout
    jlen = int(k.regs["jlen"])
    assert jlen % RECORDS_PER_PAGE > 1
    jp = lay.journal_start + (jlen - 1) // RECORDS_PER_PAGE
    flip_byte(vm, jp, offset=8)
    k.write_workload(np.array(written_workload_pages(vm, False)[:1]))
    assert journal_home(vm, written_workload_pages(vm, False)[0]) == jp
    assert_caught(vm, [jp])


def test_verify_counts_pages(vm):
    rep = vm.verify()
    lay = vm._kernel.layout
    written = len(written_workload_pages(vm, False)) + len(written_workload_pages(vm, True)) + 2
    jpages = -(-int(vm._kernel.regs["jlen"]) // RECORDS_PER_PAGE)
    assert rep.pages_checked == (written + lay.image_pages + 1 + lay.n_dir + jpages
                                 + _initialised_table_pages(vm))


def _initialised_table_pages(vm):
    led = vm._kernel.ledger
    lay = vm._kernel.layout
    idx = np.arange(lay.n_ledger)
    dps, dpages = led._read_dir(idx)
    d = dpages.reshape(-1, 2)[:lay.n_ledger]
    return int(np.count_nonzero((d[:, 0] != 0) | (d[:, 1] != 0)))


# ------------------------------------------------------------------------ pure parts
def test_layout_orders_regions():
    lay = Layout.compute(npages=2048, image_pages=16)
    assert lay.kstate_pfn == 16 and lay.dir_start == 17
    assert lay.n_ledger == 8 and lay.n_dir == 1 and lay.n_journal == 16
    assert lay.journal_start == lay.ledger_start + lay.n_ledger
    assert lay.pool_start == lay.journal_start + lay.n_journal
    big = Layout.compute(npages=(8 << 30) // PAGE, image_pages=16)
    assert big.n_ledger == 8192 and big.n_journal == 1024 and big.n_dir == 36
    with pytest.raises(ValueError):
        Layout.compute(npages=10, image_pages=16)


def test_mix_and_content_depend_on_every_input():
    a = mix(1, [5], [6], [7])
    assert a[0] != mix(2, [5], [6], [7])[0] != mix(1, [5], [6], [8])[0]
    assert contrib(1, np.array([5], np.uint64), np.zeros(1, np.uint64), np.zeros(1, np.uint64))[0] == 0
    c = workload_content(9, np.array([3, 3, 4]), np.array([1, 2, 1]))
    assert c.shape == (3, PAGE)
    assert not np.array_equal(c[0], c[1]) and not np.array_equal(c[0], c[2])
    assert np.array_equal(workload_content(9, np.array([3]), np.array([1]))[0], c[0])
