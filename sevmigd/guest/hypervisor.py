"""The hypervisor's view of an emulated SEV guest (host side: never decrypts anything).

Owns what the VMM (QEMU's role) knows about a guest: the dirty log (KVM_GET_DIRTY_LOG get-and-clear),
its own page-encryption bitmap kept from KVM_EXIT_HYPERCALL exits for KVM_HC_MAP_GPA_RANGE (the final,
5.14+ design), MSR_KVM_MIGRATION_CONTROL as the guest last wrote it (MSR filter), pause/resume/throttle
of the vCPUs, raw DRAM access (ciphertext for private pages) and the vCPU registers of non-ES guests.
It talks to its VM through `sevmigd.kvm`: `self.kvm` (the VM fd: hypercall exits arrive from it) and
`self.sev` (the SEV commands and the RFC's bitmap ioctls, QEMU's target/i386/sev.c).

Two hypercall dialects, one answer. The RFC's KVM_HC_PAGE_ENC_STATUS is handled inside KVM, on KVM's
bitmap (read and written with KVM_GET/SET_PAGE_ENC_BITMAP windows); KVM_HC_MAP_GPA_RANGE exits to
this VMM, which keeps its own bitmap. Both start all-encrypted at boot, a migration destination
writes both from the incoming stream, and a guest reports with one dialect per boot, so the VMM's
answer is: its own bitmap once it has handled a MAP_GPA_RANGE exit since the guest booted (or arrived),
KVM's bitmap otherwise (until the first exit the two are equal). `page_enc_window(start, n)` reads a
window of that answer without copying the rest; a reboot resets both and forgets the exit
(KVM_PAGE_ENC_BITMAP_RESET: the seed's TODO).

Must never: import the memory engine or ask the firmware for one (tests/test_layering.py checks),
expose plaintext of a private page, or expose SEV-ES register state (it lives in the encrypted VMSA,
exported only by the PSP's SEND_UPDATE_VMSA).

Hypercall errors follow KVM: 0 on success, -KVM_EINVAL (-22) for a malformed request (GPA not page
aligned, npages 0, range beyond guest memory or wrapping, attribute bits other than 4 and 3:0 set,
page-size hint > 2, PAGE_ENC_STATUS enc not 0/1, argument not a u64), -KVM_ENOSYS (-1000) for a
hypercall number nobody handles. KVM checks alignment, npages and wrap-around before the exit; this VMM
checks the attributes and the range. A malformed call never raises and never changes a bitmap.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np

from ..errors import ConfigError, SevmigdError
from ..kvm import uapi
from ..kvm.sev import SevGuest
from ..kvm.vm import KvmVm
from .memory import PAGE_SIZE, GuestRam, as_pfns
from .shared import LocalState, StateArea
from .vcpu import check_regs, decode_vmsa, encode_vmsa

# Hypercall/MSR numbers: the uAPI's (the guest side keeps its own copy, like kvm_para.h shared by guest
# and host; tests/test_guest_hypervisor.py checks they agree).
KVM_HC_MAP_GPA_RANGE = uapi.KVM_HC_MAP_GPA_RANGE
KVM_HC_PAGE_ENC_STATUS = uapi.KVM_HC_PAGE_ENC_STATUS
KVM_MAP_GPA_RANGE_ENCRYPTED = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_MASK
MAX_PAGE_SZ_HINT = uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_1G
MSR_KVM_MIGRATION_CONTROL = uapi.MSR_KVM_MIGRATION_CONTROL
KVM_MIGRATION_READY = uapi.KVM_MIGRATION_READY
KVM_ENOSYS = uapi.KVM_ENOSYS
KVM_EINVAL = uapi.KVM_EINVAL

__all__ = ["PAGE_SIZE", "HostView", "VcpuStateProtected", "UnknownMsr"]


class VcpuStateProtected(SevmigdError):
    """SEV-ES: the registers are in the encrypted VMSA; only the PSP can export them."""


class UnknownMsr(SevmigdError):
    """The guest wrote an MSR the VMM does not handle (a #GP on hardware)."""


class HostView:
    """What the hypervisor sees and controls of one guest."""

    def __init__(self, ram: GuestRam, *, policy: int, handle: int, vcpu_regs: list[dict[str, int]],
                 es: bool, kvm: KvmVm | None = None, state: StateArea | None = None):
        self._ram = ram
        self.npages = ram.npages
        self.memory_bytes = ram.memory_bytes
        self.policy = policy
        self.handle = handle
        self._regs = vcpu_regs          # shared with the guest side (the vCPUs' register file)
        self._es = es
        if kvm is None:
            # A VM fd of its own with no PSP behind it: enough for the bitmap and hypercall paths (the
            # host-view unit tests); SevVm passes the real one.
            kvm = KvmVm(None, npages=self.npages)
            kvm.set_user_memory_region(ram.buf)
            kvm.attach_sev(handle=handle, asid=0, es=es)
        self.kvm = kvm
        self.sev = SevGuest(kvm)
        kvm.exit_handler = self._hypercall_exit
        kvm.msr_handler = lambda msr, value: self.wrmsr(msr, value)   # looked up per exit
        # QEMU: kvm_vm_enable_cap(s, KVM_CAP_EXIT_HYPERCALL, 0, 1 << KVM_HC_MAP_GPA_RANGE)
        cap = kvm.user.alloc(uapi.KvmEnableCap.size())
        kvm.user.write(cap, uapi.KvmEnableCap(cap=uapi.KVM_CAP_EXIT_HYPERCALL,
                                              arg0=1 << uapi.KVM_HC_MAP_GPA_RANGE).pack())
        if kvm.ioctl(uapi.KVM_ENABLE_CAP, cap) != 0:
            raise SevmigdError("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) failed")
        kvm.user.unmap(cap)
        # Run state: the VMM's own bitmap (MAP_GPA_RANGE exits), whether an exit was handled since boot,
        # the MSR, pause and throttle. In this object (inline guests) or in the state area the VMM process
        # shares with the daemon (guest/shared.py), where both sides see the same cells.
        self._st = state if state is not None else LocalState(self.npages)
        self._enc = self._st.vmm_enc

    @property
    def paused(self) -> bool:
        return self._st.paused

    @property
    def throttle_pct(self) -> int:
        return self._st.throttle_pct

    @property
    def hypercalls(self) -> int:
        """Page-state hypercalls the guest made (in KVM or exited to us), for stats."""
        return self.kvm.hypercalls_in_kernel + self.kvm.hypercall_exits

    # ---------------------------------------------------------------- migration control MSR
    @property
    def migration_control(self) -> int:
        return self._st.msr

    @property
    def migration_control_supported(self) -> bool:
        """True once the guest kernel has opted in (written KVM_MIGRATION_READY) since its boot."""
        return self._st.msr_seen

    def wrmsr(self, msr: int, value: int) -> None:
        """Guest WRMSR intercepted by the MSR filter (guest -> host exit)."""
        if msr != MSR_KVM_MIGRATION_CONTROL:
            raise UnknownMsr(f"WRMSR 0x{msr:x} not handled")
        self._st.msr = int(value) & KVM_MIGRATION_READY
        if self._st.msr:
            self._st.msr_seen = True

    @property
    def is_es(self) -> bool:
        return self._es

    # ---------------------------------------------------------------- run control
    def pause(self) -> None:
        """Stop the vCPUs; with a VMM process, returns once it acknowledged (guest/shared.py)."""
        self._st.pause()

    def resume(self) -> None:
        self._st.resume()

    def set_throttle(self, pct: int) -> None:
        """Take `pct` % of vCPU time away (auto-converge); 0 = full speed, at most 99."""
        if isinstance(pct, bool) or not isinstance(pct, numbers.Integral) or not 0 <= pct <= 99:
            raise ConfigError("throttle", "must be an integer percentage 0..99")
        self._st.throttle_pct = int(pct)

    # ---------------------------------------------------------------- dirty log
    def enable_dirty_log(self) -> None:
        self._ram.dirty.clear()
        self._ram.dirty.enabled = True

    def disable_dirty_log(self) -> None:
        self._ram.dirty.enabled = False
        self._ram.dirty.clear()

    @property
    def dirty_log_enabled(self) -> bool:
        return self._ram.dirty.enabled

    def get_and_clear_dirty_log(self) -> np.ndarray:
        """Sorted int64 pfns the guest wrote since the last call (empty when logging is off)."""
        return self._ram.dirty.get_and_clear()

    # ---------------------------------------------------------------- page-encryption bitmap
    @property
    def page_enc_source(self) -> str:
        """Where the encryption status comes from now: "vmm" (MAP_GPA_RANGE exits) or "kvm" (the RFC's)."""
        return "vmm" if self._st.own_bitmap else "kvm"

    def page_enc_window(self, start_gfn: int, num_pages: int) -> np.ndarray:
        """Encryption status of gfns [start_gfn, start_gfn + num_pages) (bool, True = private): a window
        of the VMM's bitmap, or KVM_GET_PAGE_ENC_BITMAP of that window (see the module docstring)."""
        if not 0 <= start_gfn <= start_gfn + num_pages <= self.npages:
            raise ValueError(f"window {start_gfn}+{num_pages} outside guest memory (0..{self.npages - 1})")
        if self._st.own_bitmap:
            return self._enc[start_gfn:start_gfn + num_pages].copy()
        return self.sev.get_page_enc_bitmap(start_gfn, num_pages)

    def page_enc_bitmap(self) -> np.ndarray:
        """The whole bitmap (bool per page, True = private), a copy."""
        return self.page_enc_window(0, self.npages)

    def page_enc_status(self, pfns) -> np.ndarray:
        """The bits of `pfns` only (bool per pfn, True = private), read through the window they span."""
        p = as_pfns(pfns, self.npages)
        if not len(p):
            return np.zeros(0, dtype=bool)
        lo, hi = int(p.min()), int(p.max()) + 1
        return self.page_enc_window(lo, hi - lo)[p - lo]

    def set_page_enc_window(self, start_gfn: int, bits) -> None:
        """Write a window of both bitmaps (the VMM's and KVM's, KVM_SET_PAGE_ENC_BITMAP): a migration
        destination builds its bitmap this way whichever dialect the guest speaks."""
        b = np.asarray(bits)
        if b.dtype != bool or b.ndim != 1 or not 0 <= start_gfn <= start_gfn + len(b) <= self.npages:
            raise ValueError(f"page-encryption window must be bools inside the guest's {self.npages} pages")
        self._enc[start_gfn:start_gfn + len(b)] = b
        self.sev.set_page_enc_bitmap(start_gfn, b)

    def set_page_enc_bitmap(self, bits) -> None:
        b = np.asarray(bits)
        if b.shape != (self.npages,) or b.dtype != bool:
            raise ValueError(f"page-encryption bitmap must be a bool array of {self.npages} pages")
        self.set_page_enc_window(0, b)

    def set_page_enc_status(self, pfns, enc: bool) -> None:
        p = as_pfns(pfns, self.npages)
        if not len(p):
            return
        lo, hi = int(p.min()), int(p.max()) + 1
        window = self.page_enc_window(lo, hi - lo)
        window[p - lo] = bool(enc)
        self.set_page_enc_window(lo, window)

    def reset_page_enc_bitmap(self) -> None:
        """Every page private again in both bitmaps (KVM_PAGE_ENC_BITMAP_RESET), and the VMM's bitmap is
        no longer the answer until the next MAP_GPA_RANGE exit."""
        self._enc[:] = True
        self.sev.reset_page_enc_bitmap()
        self._st.own_bitmap = False

    def handle_hypercall(self, nr: int, a0: int, a1: int, a2: int) -> int:
        """A guest's VMMCALL as KVM delivers it (for callers that play the guest): KVM handles
        PAGE_ENC_STATUS, MAP_GPA_RANGE exits to `_hypercall_exit`. Returns the guest's rax."""
        return self.kvm.handle_hypercall(nr, a0, a1, a2)

    def _hypercall_exit(self, run: uapi.KvmRunHypercall) -> None:
        """KVM_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE (the only one enabled): check what KVM left to
        userspace (attributes, range inside guest memory), update our bitmap, set run.ret."""
        gpa, npages, attrs = run.arg0, run.arg1, run.arg2
        if attrs & ~(KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_MASK) \
                or (attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK) > MAX_PAGE_SZ_HINT \
                or gpa // PAGE_SIZE + npages > self.npages:
            run.ret = -KVM_EINVAL
            return
        first = gpa // PAGE_SIZE
        self._enc[first:first + npages] = bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
        self._st.own_bitmap = True
        run.ret = 0

    # ---------------------------------------------------------------- raw DRAM
    def populate_ram(self, stop=None, start: int = 0, end: int | None = None) -> bool:
        """Prefault the guest's RAM (GuestRam.populate): a migration destination runs this in a worker
        thread while it applies pages. Host-side and content-free: it only makes pages resident."""
        return self._ram.populate(stop, start, end)

    def read_raw_pages(self, pfns) -> bytes:
        """DRAM contents: ciphertext for private pages, plaintext for shared ones."""
        return self._ram.read_raw(as_pfns(pfns, self.npages))

    def write_raw_pages(self, pfns, data: bytes) -> None:
        """Store raw bytes (the destination's shared pages; not a guest write, so not dirty-logged)."""
        self._ram.write_raw(as_pfns(pfns, self.npages), data)

    # ---------------------------------------------------------------- vCPU state
    def get_vcpu_state(self) -> list[dict[str, int]]:
        if self._es:
            raise VcpuStateProtected("SEV-ES guest: registers are in the encrypted VMSA (SEND_UPDATE_VMSA)")
        if self._st.shared_regs:   # a VMM process: its vCPUs leave their registers in the state area
            return [decode_vmsa(bytes(page), i) for i, page in enumerate(self._st.vmsa)]
        return copy.deepcopy(self._regs)

    def set_vcpu_state(self, regs: list[dict[str, int]]) -> None:
        if self._es:
            raise VcpuStateProtected("SEV-ES guest: registers are set through RECEIVE_UPDATE_VMSA")
        if self._st.shared_regs:
            check_regs(regs, len(self._st.vmsa))
            for i, (page, r) in enumerate(zip(self._st.vmsa, regs)):
                page[:] = encode_vmsa(r, i)
            return
        check_regs(regs, len(self._regs))
        for mine, theirs in zip(self._regs, regs):
            mine.clear()
            mine.update(theirs)

    # ---------------------------------------------------------------- reboot (VMM side)
    def _reset_for_reboot(self) -> None:
        self.reset_page_enc_bitmap()
        self._st.msr = 0
        self._st.msr_seen = False
