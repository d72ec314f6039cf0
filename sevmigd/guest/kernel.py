"""The emulated SEV guest kernel: page-encryption changes, their hypercalls, the migration-control MSR.

Owns (guest side, inside the trust boundary): the guest's memory accessor (plaintext through the PSP's
memory engine for private pages, raw for shared ones), boot/resume, set_memory_decrypted /
set_memory_encrypted done the Linux way, the kernel state page, workload execution and verify.
Must never: be imported by host-side code, hand a memory engine or plaintext of a private page to the
host (the only things that leave are hypercall arguments and the MSR value, as on hardware).

Hypercalls (VMMCALL into KVM, `sevmigd.kvm.KvmVm.handle_hypercall`):
* KVM_HC_MAP_GPA_RANGE = 12 (mainline, Linux 5.14+): a0 = GPA, a1 = number of 4 KiB pages,
  a2 = attributes (bits 3:0 page-size hint 0/1/2, bit 4 = encrypted, bits 63:5 must be 0).
* KVM_HC_PAGE_ENC_STATUS: the 2019-2021 RFC's hypercall (a0 = GPA, a1 = npages, a2 = enc 0/1). The RFC
  numbered it 12, which mainline then gave to MAP_GPA_RANGE; we number it 13, the next value unused in
  mainline's include/uapi/linux/kvm_para.h, so both can be served by one VMM. (Choice documented here.)
The kernel reports with the dialect its boot configuration names (GuestConfig.hypercall, kept in
register hc_nr across reboots and migrations): MAP_GPA_RANGE exits from KVM to the VMM, which keeps its
own bitmap; PAGE_ENC_STATUS is handled inside KVM on KVM's bitmap. A guest without migration-control support (GuestConfig.migration_control=False)
models a pre-5.16 kernel: it issues neither hypercall and never writes MSR_KVM_MIGRATION_CONTROL.

Flip order, as Linux's __set_memory_enc_pgtable + early_set_memory_*: read the content in the old
view, change the page state (our page table = the ledger entry's SHARED bit), report it with the
hypercall, write the content back in the new view (which dirties the page).
"""

from __future__ import annotations

import hashlib
import struct
from types import SimpleNamespace

import numpy as np

from ..errors import SevmigdError
from . import workload as wl
from .ledger import (F_SHARED, F_WRITTEN, KIND_AGENT, KIND_IMAGE, KIND_MASK, KIND_SHIFT, KIND_WORKLOAD,
                     VERIFY_CHUNK, VERSION_SHIFT, Layout, Ledger, VerifyResult, content_digest,
                     workload_content)
from .vcpu import KERNEL_REGS

from sevmigd.units import PAGE_SIZE

# The hypercall and MSR ABI the guest kernel speaks (include/uapi/linux/kvm_para.h), defined once in kvm/.
from sevmigd.kvm.uapi import (KVM_EINVAL, KVM_ENOSYS, KVM_HC_MAP_GPA_RANGE, KVM_HC_PAGE_ENC_STATUS,  # noqa: E402,F401
                              KVM_MAP_GPA_RANGE_DECRYPTED, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
                              KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_4K, KVM_MIGRATION_READY,
                              MSR_KVM_MIGRATION_CONTROL)

#: Pages (or flip events) handled per batch in one run step: a long run(dt) (a daemon that was not
#: scheduled for a while) is processed in batches of 16 MiB so memory stays flat.
MAX_BATCH = 4096
#: Pages per write batch of the boot-time prefill: 4 MiB of content at a time keeps the launching
#: daemon's transient memory small (measured: peak RSS guest + 42 MiB with 4096-page batches, + 22 MiB
#: with 1024) while still amortising the per-batch numpy and ledger cost.
PREFILL_BATCH = 1024
#: Pages made shared per set_memory_decrypted call at boot (256 MiB), see boot().
BOOT_FLIP_BATCH = 65536
#: The prefill drops the ledger's mirror (16 B per page, rebuilt lazily from RAM) every this many
#: batches (256 MiB of guest): the daemon's peak RSS then grows by ~1 MiB of mirror, not 16 B per page
#: (32 MiB for an 8 GiB guest), against a target of guest size + 100 MiB.
PREFILL_MIRROR_BATCHES = 64

_KSTATE_MAGIC = b"SEVMIGDK"
_KSTATE_FMT = "<8sIIQQQQQQ32sdQQdQB"   # see _encode_kstate
_U64 = (1 << 64) - 1


class GuestPanic(SevmigdError):
    """The guest kernel hit an unrecoverable condition (corrupt kernel state, a refused hypercall)."""


class GuestMemoryAccess:
    """The guest CPU's view of its RAM: private pages through the memory engine, shared pages raw.
    Every write is a guest write, so it feeds the dirty log."""

    def __init__(self, ram, engine):
        self.ram = ram            # memory.GuestRam
        self.engine = engine      # psp MemoryEngine (never leaves the guest side)

    def read_private(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.int64)
        data = self.engine.read_pages(self.ram.buf, pfns) if len(pfns) else b""
        return np.frombuffer(data, dtype=np.uint8).reshape(len(pfns), PAGE_SIZE)

    def write_private(self, pfns: np.ndarray, data) -> None:
        pfns = np.asarray(pfns, dtype=np.int64)
        if len(pfns):
            self.engine.write_pages(self.ram.buf, pfns, data)
            self.ram.dirty.mark(pfns)

    def read_shared(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.int64)
        return self.ram.pages[pfns].copy() if len(pfns) else np.zeros((0, PAGE_SIZE), np.uint8)

    def write_shared(self, pfns: np.ndarray, data) -> None:
        pfns = np.asarray(pfns, dtype=np.int64)
        if len(pfns):
            self.ram.write_raw(pfns, data)
            self.ram.dirty.mark(pfns)

    def read_pages(self, pfns: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """Plaintext of pages in their current state (shared: bool mask)."""
        out = np.empty((len(pfns), PAGE_SIZE), dtype=np.uint8)
        if (~shared).any():
            out[~shared] = self.read_private(pfns[~shared])
        if shared.any():
            out[shared] = self.read_shared(pfns[shared])
        return out

    def write_pages(self, pfns: np.ndarray, shared: np.ndarray, content: np.ndarray) -> None:
        """Write (n, 4096) plaintext pages in their current state (flat uint8 views, no extra copies)."""
        n_sh = int(np.count_nonzero(shared))
        if n_sh == 0:
            self.write_private(pfns, np.ascontiguousarray(content).reshape(-1))
        elif n_sh == len(pfns):
            self.write_shared(pfns, np.ascontiguousarray(content).reshape(-1))
        else:
            self.write_private(pfns[~shared], content[~shared].reshape(-1))
            self.write_shared(pfns[shared], content[shared].reshape(-1))


def _runs(pfns: np.ndarray):
    """Contiguous runs (start, length) of a sorted pfn array."""
    if not len(pfns):
        return
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    for seg in np.split(pfns, breaks):
        yield int(seg[0]), len(seg)


class GuestKernel:
    """One running guest kernel. `host` is what the vCPU exits to: KVM's VM (`sevmigd.kvm.KvmVm`), with
    handle_hypercall(nr, a0, a1, a2) -> int (VMMCALL) and wrmsr(msr, value) (the VMM's MSR filter)."""

    def __init__(self, ram, engine, regs: dict, host):
        self.mem = GuestMemoryAccess(ram, engine)
        self.regs = regs
        self.host = host
        self.npages = ram.npages
        self.layout: Layout | None = None
        self.ledger: Ledger | None = None
        self.params: wl.WorkloadParams | None = None
        self.kc = 0
        self.kdig = b""
        self.mc_supported = False
        self.image_len = 0

    # ------------------------------------------------------------------ boot / resume
    def boot(self, *, image_len: int, config, secret: bytes) -> None:
        """Kernel start: metadata in RAM, ledger formatted, image recorded, shared pages converted,
        migration-control opt-in. `secret` is 64 bytes of guest entropy (ledger and content keys)."""
        boots = self.regs.get("boots", 0)
        for k in KERNEL_REGS:
            self.regs[k] = 0
        self.regs["boots"] = (boots + 1) & _U64
        self.regs["hc_nr"] = (KVM_HC_PAGE_ENC_STATUS if getattr(config, "hypercall", "") == "page-enc-status"
                              else KVM_HC_MAP_GPA_RANGE)
        image_pages = -(-image_len // PAGE_SIZE)
        lay = Layout.compute(self.npages, image_pages)
        k1, k2, kc = struct.unpack_from("<QQQ", secret, 0)
        kdig = secret[32:64]
        kstate = _encode_kstate(lay, image_len, k1, k2, kc, kdig, config)
        self.mem.write_private(np.array([lay.kstate_pfn]), kstate)
        self.regs["kstate"] = _digest64(kstate)
        self.regs["kpfn"] = lay.kstate_pfn
        self._load(kstate)
        self.ledger.format()
        # The image was measured and encrypted by LAUNCH_UPDATE_DATA: record what the guest sees.
        if image_pages:
            tx = self.ledger.begin(np.arange(image_pages))
            content = self.mem.read_private(tx.pfns)
            vers = self._versions(len(tx.pfns))
            w1 = np.array([content_digest(self.kdig, int(p), int(v), content[i])
                           for i, (p, v) in enumerate(zip(tx.pfns, vers))], dtype=np.uint64)
            w0 = (vers << np.uint64(VERSION_SHIFT)) | np.uint64(KIND_IMAGE << KIND_SHIFT | F_WRITTEN)
            tx.commit(np.ones(len(tx.pfns), bool), w0, w1)
        p = self.params
        if p.shared_target:
            # in 256 MiB steps (one hypercall each): one step for all of an 8 GiB guest's shared pages
            # made ~100 MiB of transient arrays, which counts against the daemon's peak RSS
            for lo in range(p.pool_hi - p.shared_target, p.pool_hi, BOOT_FLIP_BATCH):
                self.set_memory_decrypted(np.arange(lo, min(lo + BOOT_FLIP_BATCH, p.pool_hi)))
        if getattr(config, "prefill", False):
            self.prefill()
        if self.mc_supported:
            self.host.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)

    def prefill(self) -> int:
        """Write every workload page once (GuestConfig.prefill): seeded, random-looking content in its
        current state (shared pages stay shared), each recorded in the ledger so verify checks it.

        A freshly booted guest has never written its pool, so its RAM reads as zero and a zero page
        costs a migration less than a real one (a lazily backed mmap page is never faulted in on the
        source). Benchmarks of "a guest with random contents" prefill. Returns the pages written."""
        p = self.params
        done = 0
        for i, lo in enumerate(range(p.pool_lo, p.pool_hi, PREFILL_BATCH)):
            done += self.write_workload(np.arange(lo, min(lo + PREFILL_BATCH, p.pool_hi), dtype=np.int64))
            if (i + 1) % PREFILL_MIRROR_BATCHES == 0:
                self.ledger.drop_mirror()     # keep the ledger's derived mirror from growing with the guest
        self.ledger.drop_mirror()
        return done

    def resume(self) -> None:
        """Continue from the state found in RAM and registers (after migration)."""
        lay_pfn = self.regs.get("kpfn", 0)
        if not 0 <= lay_pfn < self.npages:
            raise GuestPanic("kernel state page register out of range: cannot resume")
        kstate = self.mem.read_private(np.array([lay_pfn])).tobytes()
        if _digest64(kstate) != self.regs.get("kstate"):
            raise GuestPanic("kernel state page does not match its digest register: cannot resume")
        self._load(kstate)
        if self.mc_supported:
            # KVM migrates this MSR with the vCPU's MSRs; the emulation re-asserts it from the kernel.
            self.host.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)

    def reboot_secret(self) -> bytes:
        """Entropy for the next boot, derived from this boot's secret (no RNG needed after migration)."""
        return hashlib.blake2b(self.kdig + self.regs["boots"].to_bytes(8, "little"),
                               person=b"sevmigd-reboot", digest_size=64).digest()

    def boot_config(self) -> SimpleNamespace:
        """The workload configuration this kernel was booted with (read back from its state page), so
        a reboot, also on a migration destination, restarts the same workload."""
        p, lay = self.params, self.layout
        return SimpleNamespace(dirty_rate_mib_s=p.dirty_rate_mib_s,
                               working_set_mib=(p.ws_hi - p.ws_lo) / wl.PAGES_PER_MIB,
                               shared_fraction=p.shared_target / (lay.npages - lay.pool_start),
                               flip_rate=p.flip_rate, seed=p.seed, migration_control=self.mc_supported,
                               vcpus=self.vcpus,
                               hypercall=("page-enc-status" if self.regs.get("hc_nr") == KVM_HC_PAGE_ENC_STATUS
                                          else "map-gpa-range"))

    def _load(self, kstate: bytes) -> None:
        f = struct.unpack_from(_KSTATE_FMT, kstate, 0)
        (_, _fmt, _vc, npages, image_pages, image_len, k1, k2, kc, kdig,
         rate, ws_pages, target, flip_rate, seed, mc) = f
        if npages != self.npages:
            raise GuestPanic("kernel state page describes a different memory size")
        lay = Layout.compute(npages, image_pages)
        self.layout = lay
        self.image_len = image_len
        self.kc, self.kdig, self.mc_supported, self.vcpus = kc, kdig, bool(mc), _vc
        self.ledger = Ledger(lay, self.mem, self.regs, k1, k2)
        pool_hi = npages
        ws = pool_hi - lay.pool_start if ws_pages == 0 else ws_pages
        self.params = wl.WorkloadParams(rate, pool_hi - ws, pool_hi, lay.pool_start, pool_hi, target,
                                        flip_rate, seed)

    # ------------------------------------------------------------------ helpers
    def _versions(self, n: int) -> np.ndarray:
        start = self.regs["wl_seq"]
        self.regs["wl_seq"] = start + n
        return np.arange(start + 1, start + n + 1, dtype=np.uint64)

    def _report(self, pfns: np.ndarray, encrypted: bool) -> None:
        """Tell the host about a page-state change (every contiguous run, one hypercall each)."""
        if not self.mc_supported:
            return
        nr = self.regs["hc_nr"]
        for start, n in _runs(np.sort(pfns)):
            if nr == KVM_HC_PAGE_ENC_STATUS:
                ret = self.host.handle_hypercall(nr, start * PAGE_SIZE, n, int(encrypted))
            else:
                attrs = (KVM_MAP_GPA_RANGE_ENCRYPTED if encrypted else KVM_MAP_GPA_RANGE_DECRYPTED) \
                    | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
                ret = self.host.handle_hypercall(KVM_HC_MAP_GPA_RANGE, start * PAGE_SIZE, n, attrs)
            if ret != 0:
                raise GuestPanic(f"hypercall {nr} refused by the host ({ret})")

    def _flip(self, tx, sel: np.ndarray, to_shared: bool) -> None:
        """Flip tx.pfns[sel] (all currently in the other state) the Linux way, and record it."""
        if not sel.any():
            return
        idx = np.flatnonzero(sel)
        pfns = tx.pfns[idx]
        w0 = tx.w0[idx]
        written = (w0 & np.uint64(F_WRITTEN)) != 0
        content = None
        if written.any():
            wp = pfns[written]
            content = self.mem.read_shared(wp) if not to_shared else self.mem.read_private(wp)
        self._report(pfns, encrypted=not to_shared)
        if content is not None:
            if to_shared:
                self.mem.write_shared(pfns[written], content.reshape(-1))
            else:
                self.mem.write_private(pfns[written], content.reshape(-1))
        new_w0 = (w0 | np.uint64(F_SHARED)) if to_shared else (w0 & ~np.uint64(F_SHARED))
        tx.commit(sel, new_w0, tx.w1[idx])
        n = len(pfns)
        wl_n = int(np.count_nonzero(((w0 & np.uint64(KIND_MASK)) >> np.uint64(KIND_SHIFT)) == KIND_WORKLOAD))
        sign = 1 if to_shared else -1
        self.regs["shared"] = (self.regs["shared"] + sign * n) & _U64
        self.regs["wl_shared"] = (self.regs["wl_shared"] + sign * wl_n) & _U64

    def _state_flip(self, pfns, to_shared: bool) -> None:
        tx = self.ledger.begin(pfns)
        is_shared = (tx.w0 & np.uint64(F_SHARED)) != 0
        self._flip(tx, ~is_shared if to_shared else is_shared, to_shared)

    def set_memory_decrypted(self, pfns) -> None:
        """Make pages shared (C-bit clear), keeping their content."""
        self._state_flip(self._check_pool(pfns), True)

    def set_memory_encrypted(self, pfns) -> None:
        """Make pages private again, keeping their content."""
        self._state_flip(self._check_pool(pfns), False)

    def _check_pool(self, pfns) -> np.ndarray:
        p = np.unique(np.asarray(pfns, dtype=np.int64))
        if len(p) and (p[0] < 0 or p[-1] >= self.npages or self.layout.is_metadata(p).any()):
            raise ValueError("pages outside guest memory or in the kernel's own metadata")
        return p

    def set_hypercall(self, nr: int) -> None:
        """Choose how flips are reported (KVM_HC_MAP_GPA_RANGE or KVM_HC_PAGE_ENC_STATUS)."""
        if nr not in (KVM_HC_MAP_GPA_RANGE, KVM_HC_PAGE_ENC_STATUS):
            raise ValueError("unknown page-encryption hypercall")
        self.regs["hc_nr"] = nr

    # ------------------------------------------------------------------ workload
    def run_step(self, dt: float) -> int:
        """Do `dt` effective seconds of workload; returns the number of pages written."""
        p = self.params
        n_w, n_f = wl.plan_counts(p, self.regs, dt)
        if not n_w and not n_f:
            return 0
        step = self.regs["wl_step"]
        self.regs["wl_step"] = step + 1
        g = wl.step_rng(p, step)
        for i in range(0, n_f, MAX_BATCH):
            self._flip_events(p, g, min(MAX_BATCH, n_f - i))
        done = 0
        if n_w:
            picks = wl.pick_writes(p, g, n_w)
            for i in range(0, len(picks), MAX_BATCH):
                done += self.write_workload(picks[i:i + MAX_BATCH])
        return done

    def _flip_events(self, p, g, n: int) -> None:
        cand = wl.pick_flip_candidates(p, g, n)
        tx = self.ledger.begin(cand.ravel())
        pos = {int(pf): i for i, pf in enumerate(tx.pfns)}
        kind = (tx.w0 & np.uint64(KIND_MASK)) >> np.uint64(KIND_SHIFT)
        eligible = kind == KIND_WORKLOAD
        shared = (tx.w0 & np.uint64(F_SHARED)) != 0
        to_sh = np.zeros(len(tx.pfns), bool)
        to_pr = np.zeros(len(tx.pfns), bool)
        for row in cand:
            want_shared = wl.flip_direction(p, self.regs)
            for pf in row:
                i = pos[int(pf)]
                if eligible[i] and not to_sh[i] and not to_pr[i] and shared[i] != want_shared:
                    (to_sh if want_shared else to_pr)[i] = True
                    # keep the running count current so the next event's direction is right
                    self.regs["wl_shared"] += 1 if want_shared else -1
                    break
        # _flip re-applies the count change; undo the provisional one first
        self.regs["wl_shared"] -= int(to_sh.sum()) - int(to_pr.sum())
        self._flip(tx, to_sh, True)
        self._flip(tx, to_pr, False)

    def write_workload(self, pfns: np.ndarray) -> int:
        tx = self.ledger.begin(pfns)
        kind = (tx.w0 & np.uint64(KIND_MASK)) >> np.uint64(KIND_SHIFT)
        ok = kind == KIND_WORKLOAD      # agent- and image-owned pages are kept out of the workload
        if not ok.any():
            return 0
        pf = tx.pfns[ok]
        vers = self._versions(len(pf))
        shared_bit = tx.w0[ok] & np.uint64(F_SHARED)
        content = workload_content(self.kc, pf, vers)
        self.mem.write_pages(pf, shared_bit != 0, content)
        w0 = (vers << np.uint64(VERSION_SHIFT)) | shared_bit | np.uint64(F_WRITTEN)
        tx.commit(ok, w0, np.zeros(len(pf), np.uint64))
        return len(pf)

    # ------------------------------------------------------------------ agent support
    def agent_pages(self, gpa: int, length: int) -> np.ndarray:
        if gpa < 0 or length < 0 or gpa + length > self.npages * PAGE_SIZE:
            raise ValueError("range outside guest memory")
        if not length:
            return np.zeros(0, np.int64)
        p = np.arange(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1, dtype=np.int64)
        if self.layout.is_metadata(p).any():
            lay = self.layout
            raise ValueError(
                f"range overlaps the guest kernel's own metadata pages "
                f"({lay.kstate_pfn * PAGE_SIZE:#x}..{lay.pool_start * PAGE_SIZE:#x}); "
                f"the agent may use {lay.pool_start * PAGE_SIZE:#x} and above")
        return p

    def agent_write(self, gpa: int, data: bytes, shared: bool) -> None:
        pfns = self.agent_pages(gpa, len(data))
        if not len(pfns):
            return
        tx = self.ledger.begin(pfns)
        is_shared = (tx.w0 & np.uint64(F_SHARED)) != 0
        self._flip(tx, ~is_shared if shared else is_shared, shared)
        if shared:
            # the pages leave the workload: its shared count no longer includes them
            kind = (tx.w0 & np.uint64(KIND_MASK)) >> np.uint64(KIND_SHIFT)
            n_wl = int(np.count_nonzero(kind == KIND_WORKLOAD))
            self.regs["wl_shared"] = (self.regs["wl_shared"] - n_wl) & _U64
        sh = np.full(len(pfns), shared)
        content = self._current(tx, sh)
        off = gpa - int(pfns[0]) * PAGE_SIZE
        flat = content.reshape(-1)
        flat[off:off + len(data)] = np.frombuffer(data, dtype=np.uint8)
        vers = self._versions(len(pfns))
        self.mem.write_pages(pfns, sh, content)
        w1 = np.array([content_digest(self.kdig, int(p), int(v), content[i])
                       for i, (p, v) in enumerate(zip(pfns, vers))], dtype=np.uint64)
        w0 = (vers << np.uint64(VERSION_SHIFT)) | np.uint64(KIND_AGENT << KIND_SHIFT | F_WRITTEN) \
            | (np.uint64(F_SHARED) if shared else np.uint64(0))
        tx.commit(np.ones(len(pfns), bool), w0, w1)

    def _current(self, tx, shared: np.ndarray) -> np.ndarray:
        """Current plaintext of tx's pages (never-written pages read as zero, like a fresh page)."""
        written = (tx.w0 & np.uint64(F_WRITTEN)) != 0
        out = np.zeros((len(tx.pfns), PAGE_SIZE), dtype=np.uint8)
        if written.any():
            out[written] = self.mem.read_pages(tx.pfns[written], shared[written])
        return out

    def agent_read(self, gpa: int, length: int) -> bytes:
        pfns = self.agent_pages(gpa, length)
        if not len(pfns):
            return b""
        tx = self.ledger.begin(pfns)
        content = self._current(tx, (tx.w0 & np.uint64(F_SHARED)) != 0)
        off = gpa - int(pfns[0]) * PAGE_SIZE
        return content.reshape(-1)[off:off + length].tobytes()

    # ------------------------------------------------------------------ verify
    def verify(self) -> VerifyResult:
        lay = self.layout
        kstate = self.mem.read_private(np.array([lay.kstate_pfn])).tobytes()
        if _digest64(kstate) != self.regs["kstate"]:
            return VerifyResult(1, [lay.kstate_pfn])
        res = self.ledger.verify(self._check_data)
        return VerifyResult(res.pages_checked + 1, res.mismatches)   # + the kernel state page

    def _check_data(self, pfns: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> list[int]:
        bad: list[int] = []
        for i in range(0, len(pfns), VERIFY_CHUNK):
            p, a, b = pfns[i:i + VERIFY_CHUNK], w0[i:i + VERIFY_CHUNK], w1[i:i + VERIFY_CHUNK]
            content = self.mem.read_pages(p, (a & np.uint64(F_SHARED)) != 0)
            vers = a >> np.uint64(VERSION_SHIFT)
            kind = (a & np.uint64(KIND_MASK)) >> np.uint64(KIND_SHIFT)
            w = kind == KIND_WORKLOAD
            if w.any():
                exp = workload_content(self.kc, p[w], vers[w])
                diff = np.any(exp != content[w], axis=1)
                bad.extend(int(x) for x in p[w][diff])
            for j in np.flatnonzero(~w):
                if content_digest(self.kdig, int(p[j]), int(vers[j]), content[j]) != int(b[j]):
                    bad.append(int(p[j]))
        return bad


def _digest64(page: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(page, digest_size=8, person=b"sevmigd-kstate").digest(), "little")


def _encode_kstate(lay: Layout, image_len: int, k1: int, k2: int, kc: int, kdig: bytes, config) -> bytes:
    pool = lay.npages - lay.pool_start
    p = wl.WorkloadParams.build(pool_lo=lay.pool_start, pool_hi=lay.npages,
                                dirty_rate_mib_s=config.dirty_rate_mib_s,
                                working_set_mib=config.working_set_mib,
                                shared_fraction=config.shared_fraction, flip_rate=config.flip_rate,
                                seed=config.seed)
    ws_pages = 0 if p.ws_hi - p.ws_lo == pool else p.ws_hi - p.ws_lo
    body = struct.pack(_KSTATE_FMT, _KSTATE_MAGIC, 1, config.vcpus, lay.npages, lay.image_pages, image_len,
                       k1, k2, kc, kdig, p.dirty_rate_mib_s, ws_pages, p.shared_target, p.flip_rate,
                       p.seed, int(bool(config.migration_control)))
    return body + bytes(PAGE_SIZE - len(body))
