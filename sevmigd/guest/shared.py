"""The run state a guest's VMM process shares with its daemon: one memory area, no message per page.

Why: with `vmm = "process"` (issue 17) a guest's vCPUs run in their own process (`sevmigd vmm`, QEMU's
role) and the daemon (KVM, the PSP and QEMU's migration thread) must read the dirty log and the
page-encryption bitmaps at memory speed and pause the vCPUs with an acknowledgement. Both map the same
memfd (`state_size` bytes) and see it through `StateArea`; the guest's RAM is a second memfd
(`memory.GuestRam.from_fd`).

Layout (every region page-aligned; all integers little-endian u64 in the header page):

    header   magic "SEVMIGST", layout version, npages, vcpus, the pause handshake (pause_seq, pause_req,
             pause_ack), throttle %, MSR_KVM_MIGRATION_CONTROL value and opt-in, "own bitmap" flag, dirty
             log enabled, counters (vCPU runs, guest nanoseconds run, shared pages), kernel running flag,
             guest error flag
    dirty    one byte per page: the VMM sets a page's byte after writing the page; the daemon collects the
             set bytes, clears exactly those, and only then reads page contents (no write is lost: a write
             after the clear sets the byte again)
    kvm_enc  KVM's page-encryption bitmap (the RFC's, KVM_HC_PAGE_ENC_STATUS), one bool byte per page
    vmm_enc  the VMM's own bitmap (KVM_HC_MAP_GPA_RANGE exits), one bool byte per page
    vmsa     one page per vCPU: SEV-ES, the encrypted VMSA the PSP maps (LAUNCH/SEND/RECEIVE_UPDATE_VMSA);
             plain SEV, the registers in the VMSA's plaintext layout (KVM_GET/SET_REGS of the emulation)

Pause handshake: the host writes a fresh sequence number into pause_req and waits (through an injected
`wait(predicate)`, this module never sleeps) until the VMM copies it into pause_ack; the VMM acks only
between vCPU runs and runs no vCPU while pause_req is non-zero. Once acked, the pages and the dirty log
are what the final sync must read. x86 keeps stores in order (TSO), which is all the ordering this needs.

Holds no key: ciphertext of private pages lives in the RAM memfd, never here; the VMSA pages of an SEV-ES
guest are ciphertext too. Pure: no I/O, the daemon and the VMM map the memfds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sevmigd.units import PAGE_SIZE

MAGIC = int.from_bytes(b"SEVMIGST", "little")
LAYOUT_VERSION = 1

# header slots (u64 each)
_MAGIC, _LAYOUT, _NPAGES, _VCPUS, _PAUSE_SEQ, _PAUSE_REQ, _PAUSE_ACK, _THROTTLE, _MSR, _MSR_SEEN, \
    _OWN_BITMAP, _DIRTY_ON, _RUNS, _RUN_NS, _SHARED, _KERNEL, _ERROR = range(17)


def _pages(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def state_size(npages: int, vcpus: int) -> int:
    """Bytes of the state memfd of a guest of `npages` pages and `vcpus` vCPUs."""
    return PAGE_SIZE + 3 * _pages(npages) + vcpus * PAGE_SIZE


class StateError(ValueError):
    """The state area is not one this code can read (magic, layout version, size)."""


class LocalState:
    """The same run state as `StateArea`, in this process only (`vmm = "inline"`: guests inside the daemon)."""

    shared_regs = False

    def __init__(self, npages: int):
        self.paused = False
        self.throttle_pct = 0
        self.msr = 0
        self.msr_seen = False
        self.own_bitmap = False
        self.vmm_enc = np.ones(npages, dtype=bool)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


class StateArea:
    """A view of the shared state memfd (see the module docstring). `init=True`: the VMM formats a fresh
    area; otherwise the header must match (StateError). `wait(predicate, what)`: the host's bounded wait
    for the VMM (it raises when the VMM does not answer in time); None on the VMM's side."""

    shared_regs = True

    def __init__(self, buf, *, npages: int, vcpus: int, init: bool = False,
                 wait: Callable[[Callable[[], bool], str], None] | None = None):
        if len(buf) < state_size(npages, vcpus):
            raise StateError(f"state area is {len(buf)} bytes, a guest of {npages} pages and {vcpus} vCPUs "
                             f"needs {state_size(npages, vcpus)}")
        self.buf = buf
        self.npages, self.vcpus = npages, vcpus
        self._wait = wait
        self._h = np.frombuffer(buf, dtype="<u8", count=PAGE_SIZE // 8)
        off = PAGE_SIZE
        region = _pages(npages)
        self.dirty = np.frombuffer(buf, dtype=np.uint8, count=npages, offset=off)
        self.kvm_enc = np.frombuffer(buf, dtype=bool, count=npages, offset=off + region)
        self.vmm_enc = np.frombuffer(buf, dtype=bool, count=npages, offset=off + 2 * region)
        base = off + 3 * region
        mv = memoryview(buf)
        self.vmsa = [mv[base + i * PAGE_SIZE: base + (i + 1) * PAGE_SIZE] for i in range(vcpus)]
        h = self._h
        if init:
            h[:] = 0
            h[_MAGIC], h[_LAYOUT], h[_NPAGES], h[_VCPUS] = MAGIC, LAYOUT_VERSION, npages, vcpus
            self.dirty[:] = 0
            self.kvm_enc[:] = True
            self.vmm_enc[:] = True
        elif int(h[_MAGIC]) != MAGIC or int(h[_LAYOUT]) != LAYOUT_VERSION:
            raise StateError(f"state area has magic {int(h[_MAGIC]):#x} layout {int(h[_LAYOUT])}, "
                             f"this sevmigd reads layout {LAYOUT_VERSION}")
        elif int(h[_NPAGES]) != npages or int(h[_VCPUS]) != vcpus:
            raise StateError(f"state area is for {int(h[_NPAGES])} pages / {int(h[_VCPUS])} vCPUs, "
                             f"not {npages} / {vcpus}")

    def release(self) -> None:
        """Drop every view of the buffer (so its mapping can be closed)."""
        self._h = self.dirty = self.kvm_enc = self.vmm_enc = None  # type: ignore[assignment]
        for v in self.vmsa:
            v.release()
        self.vmsa = []

    # -- scalar cells --------------------------------------------------------------------------------
    def _get(self, slot: int) -> int:
        return int(self._h[slot])

    def _set(self, slot: int, value: int) -> None:
        self._h[slot] = value

    throttle_pct = property(lambda s: s._get(_THROTTLE), lambda s, v: s._set(_THROTTLE, v))
    msr = property(lambda s: s._get(_MSR), lambda s, v: s._set(_MSR, v))
    msr_seen = property(lambda s: bool(s._get(_MSR_SEEN)), lambda s, v: s._set(_MSR_SEEN, int(bool(v))))
    own_bitmap = property(lambda s: bool(s._get(_OWN_BITMAP)), lambda s, v: s._set(_OWN_BITMAP, int(bool(v))))
    dirty_enabled = property(lambda s: bool(s._get(_DIRTY_ON)), lambda s, v: s._set(_DIRTY_ON, int(bool(v))))
    shared_pages = property(lambda s: s._get(_SHARED), lambda s, v: s._set(_SHARED, v))
    kernel_running = property(lambda s: bool(s._get(_KERNEL)), lambda s, v: s._set(_KERNEL, int(bool(v))))
    guest_error = property(lambda s: bool(s._get(_ERROR)), lambda s, v: s._set(_ERROR, int(bool(v))))
    runs = property(lambda s: s._get(_RUNS))
    run_ns = property(lambda s: s._get(_RUN_NS))

    # -- the pause handshake -------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """The host asked the vCPUs to stay stopped (pause_req set)."""
        return bool(self._get(_PAUSE_REQ))

    @property
    def pause_acked(self) -> bool:
        req = self._get(_PAUSE_REQ)
        return bool(req) and self._get(_PAUSE_ACK) == req

    def pause(self) -> None:
        """Host: stop the vCPUs and return once the VMM acknowledged (no vCPU runs from then on). A
        pause already acknowledged returns at once."""
        if not self.paused:
            seq = self._get(_PAUSE_SEQ) + 1
            self._set(_PAUSE_SEQ, seq)
            self._set(_PAUSE_REQ, seq)
        if self._wait is not None:
            self._wait(lambda: self.pause_acked, "pause")

    def request_pause(self) -> None:
        """Host: ask for a pause without waiting (the VMM acks at its next vCPU tick)."""
        if not self.paused:
            seq = self._get(_PAUSE_SEQ) + 1
            self._set(_PAUSE_SEQ, seq)
            self._set(_PAUSE_REQ, seq)

    def resume(self) -> None:
        self._set(_PAUSE_REQ, 0)

    # -- the VMM's side ------------------------------------------------------------------------------
    def vmm_may_run(self) -> bool:
        """VMM, between vCPU runs: acknowledge a pending pause; True when the vCPUs may run now."""
        req = self._get(_PAUSE_REQ)
        if req:
            if self._get(_PAUSE_ACK) != req:
                self._set(_PAUSE_ACK, req)
            return False
        return True

    def count_run(self, seconds: float) -> None:
        self._h[_RUNS] += 1
        self._h[_RUN_NS] += int(seconds * 1e9)


class SharedDirtyLog:
    """`memory.DirtyLog` over the state area's dirty bytes (same interface)."""

    __slots__ = ("_area",)

    def __init__(self, area: StateArea):
        self._area = area

    @property
    def enabled(self) -> bool:
        return self._area.dirty_enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._area.dirty_enabled = on

    def mark(self, pfns: np.ndarray) -> None:
        if self._area.dirty_enabled and len(pfns):
            self._area.dirty[pfns] = 1

    def mark_one(self, pfn: int) -> None:
        if self._area.dirty_enabled:
            self._area.dirty[pfn] = 1

    def get_and_clear(self) -> np.ndarray:
        """Sorted int64 pfns whose byte was set; exactly those bytes are cleared (see the module docstring)."""
        d = self._area.dirty
        idx = np.flatnonzero(d)
        d[idx] = 0
        return idx.astype(np.int64, copy=False)

    def clear(self) -> None:
        self._area.dirty[:] = 0


__all__ = ["LAYOUT_VERSION", "LocalState", "SharedDirtyLog", "StateArea", "StateError", "state_size"]
