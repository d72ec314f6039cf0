"""migrate/ram.py against a real emulated guest's host view: rounds, batches split by the bitmap windows
they span, send state and flips, the one page-number type, and the destination's bitmap."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sevmigd.guest.vm import GuestConfig, SevVm
from sevmigd.migrate import ram as ram_mod
from sevmigd.migrate.ram import PFN, RamReceiver, RamSender

from conftest import seeded_firmware

MiB = 1 << 20


@pytest.fixture(scope="module")
def fw():
    return seeded_firmware(21)


_asid = iter(range(1, 400))


@pytest.fixture(params=["map-gpa-range", "page-enc-status"])
def vm(fw, request):
    v = SevVm.launch(fw, GuestConfig("r", 4 * MiB, shared_fraction=0.3, flip_rate=400, dirty_rate_mib_s=20,
                                     seed=5, hypercall=request.param), asid=next(_asid),
                     rng=random.Random(6).randbytes)
    yield v
    v.release()


class CountingHost:
    """The host view, counting the bitmap windows ram.py reads (and refusing whole-bitmap copies)."""

    def __init__(self, host):
        self._h = host
        self.npages = host.npages
        self.windows = []

    def __getattr__(self, name):
        if name == "page_enc_bitmap":
            raise AssertionError("ram.py must read windows, not the whole bitmap")
        return getattr(self._h, name)

    def page_enc_window(self, start, n):
        self.windows.append((start, n))
        return self._h.page_enc_window(start, n)


def drain(ram):
    out = []
    while (b := ram.next_batch()) is not None:
        out.append(b)
    return out


def test_rounds_batches_and_types(vm):
    host = CountingHost(vm.host)
    ram = RamSender(host, batch_pages=100)
    ram.start()
    assert ram.round_pages == vm.npages
    batches = drain(ram)
    assert sum(len(b) for b in batches) == vm.npages
    for b in batches:
        assert b.enc.dtype == PFN and b.shr.dtype == PFN and len(b.shr_data) == 4096 * len(b.shr)
    truth = vm.host.page_enc_bitmap()
    enc = np.concatenate([b.enc for b in batches])
    assert np.array_equal(np.sort(enc), np.flatnonzero(truth).astype(PFN))
    assert np.array_equal(ram.sent_private, truth)
    # round 1 batches are contiguous: one small window each, never the whole guest
    assert len(host.windows) == len(batches) and all(n <= 100 for _, n in host.windows)
    vm.run(0.05)
    ndirty = ram.sync()
    assert ndirty > 0 and ram.round_pages == ndirty and ram.remaining == ndirty
    second = drain(ram)
    assert sum(len(b) for b in second) == ndirty


def test_scattered_batch_reads_one_window_per_cluster(vm, monkeypatch):
    host = CountingHost(vm.host)
    ram = RamSender(host, batch_pages=1000)
    monkeypatch.setattr(ram_mod, "WINDOW_GAP", 400)
    ram._begin(np.array([1, 2, 3, 300, 301, 600], dtype=PFN))     # gaps <= WINDOW_GAP: one window
    drain(ram)
    assert host.windows == [(1, 600)]
    host.windows.clear()
    ram._begin(np.array([0, 1, 700, 702], dtype=PFN))             # a gap > WINDOW_GAP: two windows
    batch_enc_shr = drain(ram)
    assert host.windows == [(0, 2), (700, 3)]
    got = sorted(int(p) for b in batch_enc_shr for p in np.concatenate([b.enc, b.shr]))
    assert got == [0, 1, 700, 702]


def test_stop_and_copy_resends_flipped_pages(vm):
    ram = RamSender(vm.host)
    ram.start()
    drain(ram)
    ram.sync()
    before = vm.host.page_enc_bitmap()
    vm.run(0.1)                                  # flips and writes while "pre-copy" goes on
    vm.host.pause()
    bits = ram.stop_and_copy()
    assert np.array_equal(bits, vm.host.page_enc_bitmap())
    flipped = np.flatnonzero(before != bits)
    assert len(flipped) and ram.flipped >= len(flipped)
    last = drain(ram)
    resent = np.concatenate([np.concatenate([b.enc, b.shr]) for b in last])
    assert set(flipped.tolist()) <= set(resent.tolist())
    assert np.array_equal(ram.sent_private, bits)  # every page went last as what it is now


def test_receiver_builds_both_bitmaps(fw, vm):
    dst = SevVm.incoming(fw, name="d", memory_bytes=vm.memory_bytes, policy=0, handle=None, asid=next(_asid))
    try:
        bits = vm.host.page_enc_bitmap()
        RamReceiver(dst.host).set_bitmap(bits)
        assert np.array_equal(dst.host.sev.get_page_enc_bitmap(0, dst.npages), bits)   # KVM's (RFC)
        assert np.array_equal(dst.host._enc, bits)                                    # the VMM's
    finally:
        dst.release()


def test_a_fresh_window_serves_the_next_batches(vm):
    host = CountingHost(vm.host)
    now = [0.0]
    ram = RamSender(host, batch_pages=100, clock=lambda: now[0])
    ram.start()
    ram.next_batch()
    ram.next_batch()
    assert host.windows == [(0, min(ram_mod.WINDOW_PAGES, vm.npages))]    # one read for both batches
    now[0] += ram_mod.WINDOW_MAX_AGE_S + 0.01                               # too old now: read again
    b = ram.next_batch()
    assert len(host.windows) == 2 and host.windows[1][0] == 200
    assert np.array_equal(np.sort(np.concatenate([b.enc, b.shr])), np.arange(200, 300, dtype=PFN))
