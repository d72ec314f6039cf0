"""The hypervisor's view of an emulated SEV guest (host side: never decrypts anything).

Owns what KVM and the VMM know about a guest: the dirty log (KVM_GET_DIRTY_LOG get-and-clear), the
page-encryption bitmap the VMM keeps from the guest's hypercalls (KVM_HC_MAP_GPA_RANGE handled in
userspace after KVM_EXIT_HYPERCALL, or the RFC's KVM_HC_PAGE_ENC_STATUS; plus the RFC's
GET/SET/RESET bitmap ioctls), MSR_KVM_MIGRATION_CONTROL as the guest last wrote it (MSR filter),
pause/resume/throttle of the vCPUs, raw DRAM access (ciphertext for private pages) and the vCPU
registers of non-ES guests.

Must never: import the memory engine or ask the firmware for one (tests/test_layering.py checks),
expose plaintext of a private page, or expose SEV-ES register state (it lives in the encrypted VMSA,
exported only by the PSP's SEND_UPDATE_VMSA).

Hypercall errors follow KVM: 0 on success, -KVM_EINVAL (-22) for a malformed request (GPA not page
aligned, npages 0, range beyond guest memory or wrapping, attribute bits other than 4 and 3:0 set,
page-size hint > 2, PAGE_ENC_STATUS enc not 0/1, argument not a u64), -KVM_ENOSYS (-1000) for a
hypercall number the VMM does not handle. A malformed call never raises and never changes the bitmap.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np

from ..errors import ConfigError, SevmigdError
from .memory import PAGE_SIZE, GuestRam, as_pfns
from .vcpu import check_regs

# Hypercall/MSR numbers, duplicated from guest/kernel.py on purpose: the host side does not import
# guest-side modules (the values are an ABI, like kvm_para.h shared by guest and host).
KVM_HC_MAP_GPA_RANGE = 12
KVM_HC_PAGE_ENC_STATUS = 13
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF
MAX_PAGE_SZ_HINT = 2          # 4K, 2M, 1G
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
KVM_MIGRATION_READY = 1
KVM_ENOSYS = 1000
KVM_EINVAL = 22
_U64 = (1 << 64) - 1

__all__ = ["PAGE_SIZE", "HostView", "VcpuStateProtected", "UnknownMsr"]


class VcpuStateProtected(SevmigdError):
    """SEV-ES: the registers are in the encrypted VMSA; only the PSP can export them."""


class UnknownMsr(SevmigdError):
    """The guest wrote an MSR the VMM does not handle (a #GP on hardware)."""


class HostView:
    """What the hypervisor sees and controls of one guest."""

    def __init__(self, ram: GuestRam, *, policy: int, handle: int, vcpu_regs: list[dict[str, int]],
                 es: bool):
        self._ram = ram
        self.npages = ram.npages
        self.memory_bytes = ram.memory_bytes
        self.policy = policy
        self.handle = handle
        self._regs = vcpu_regs          # shared with the guest side (the vCPUs' register file)
        self._es = es
        self._enc = np.ones(self.npages, dtype=bool)
        self._msr = 0
        self._msr_seen = False
        self.paused = False
        self.throttle_pct = 0
        self.hypercalls = 0             # handled hypercalls (success or error), for stats

    # ---------------------------------------------------------------- migration control MSR
    @property
    def migration_control(self) -> int:
        return self._msr

    @property
    def migration_control_supported(self) -> bool:
        """True once the guest kernel has opted in (written KVM_MIGRATION_READY) since its boot."""
        return self._msr_seen

    def wrmsr(self, msr: int, value: int) -> None:
        """Guest WRMSR intercepted by the MSR filter (guest -> host exit)."""
        if msr != MSR_KVM_MIGRATION_CONTROL:
            raise UnknownMsr(f"WRMSR 0x{msr:x} not handled")
        self._msr = int(value) & KVM_MIGRATION_READY
        if self._msr:
            self._msr_seen = True

    @property
    def is_es(self) -> bool:
        return self._es

    # ---------------------------------------------------------------- run control
    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def set_throttle(self, pct: int) -> None:
        """Take `pct` % of vCPU time away (auto-converge); 0 = full speed, at most 99."""
        if isinstance(pct, bool) or not isinstance(pct, numbers.Integral) or not 0 <= pct <= 99:
            raise ConfigError("throttle", "must be an integer percentage 0..99")
        self.throttle_pct = int(pct)

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
    def page_enc_bitmap(self) -> np.ndarray:
        """Copy of the bitmap (bool per page, True = private/encrypted)."""
        return self._enc.copy()

    def page_enc_status(self, pfns) -> np.ndarray:
        """The bitmap's bits of `pfns` only (bool per pfn, True = private): what a migration batch needs,
        without copying the whole bitmap (2 MiB per call for an 8 GiB guest)."""
        return self._enc[as_pfns(pfns, self.npages)]

    def set_page_enc_bitmap(self, bits) -> None:
        b = np.asarray(bits)
        if b.shape != (self.npages,) or b.dtype != bool:
            raise ValueError(f"page-encryption bitmap must be a bool array of {self.npages} pages")
        self._enc[:] = b

    def reset_page_enc_bitmap(self) -> None:
        self._enc[:] = True

    def set_page_enc_status(self, pfns, enc: bool) -> None:
        self._enc[as_pfns(pfns, self.npages)] = bool(enc)

    def handle_hypercall(self, nr: int, a0: int, a1: int, a2: int) -> int:
        """KVM_EXIT_HYPERCALL for the VMM: returns the value written to run->hypercall.ret."""
        self.hypercalls += 1
        if not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= _U64
                   for a in (nr, a0, a1, a2)):
            return -KVM_EINVAL
        if nr == KVM_HC_MAP_GPA_RANGE:
            if a2 & ~(KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_MASK):
                return -KVM_EINVAL
            if (a2 & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK) > MAX_PAGE_SZ_HINT:
                return -KVM_EINVAL
            enc = bool(a2 & KVM_MAP_GPA_RANGE_ENCRYPTED)
        elif nr == KVM_HC_PAGE_ENC_STATUS:
            if a2 not in (0, 1):
                return -KVM_EINVAL
            enc = bool(a2)
        else:
            return -KVM_ENOSYS
        if a0 % PAGE_SIZE or a1 == 0 or a0 // PAGE_SIZE + a1 > self.npages:
            return -KVM_EINVAL
        first = a0 // PAGE_SIZE
        self._enc[first:first + a1] = enc
        return 0

    # ---------------------------------------------------------------- raw DRAM
    def populate_ram(self, stop=None) -> bool:
        """Prefault the guest's RAM (GuestRam.populate): a migration destination runs this in a worker
        thread while it applies pages. Host-side and content-free: it only makes pages resident."""
        return self._ram.populate(stop)

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
        return copy.deepcopy(self._regs)

    def set_vcpu_state(self, regs: list[dict[str, int]]) -> None:
        if self._es:
            raise VcpuStateProtected("SEV-ES guest: registers are set through RECEIVE_UPDATE_VMSA")
        check_regs(regs, len(self._regs))
        for mine, theirs in zip(self._regs, regs):
            mine.clear()
            mine.update(theirs)

    # ---------------------------------------------------------------- reboot (VMM side)
    def _reset_for_reboot(self) -> None:
        self.reset_page_enc_bitmap()
        self._msr = 0
        self._msr_seen = False
