"""vCPU register state of an emulated SEV guest, and its SEV-ES VMSA encoding.

Owns: the fixed register set (architectural registers plus the few the guest kernel keeps for itself:
the ledger roots, the workload's RNG position and counters) and the byte layout of those registers
inside each vCPU's 4 KiB VMSA page (architectural registers at the hardware's SEV-ES save-area offsets). Must never: decide who may read the registers (that is the host view's job:
plain for SEV guests, refused for SEV-ES guests whose VMSA is encrypted by the PSP).

Why the guest kernel keeps state in registers: registers migrate with the guest (the host copies them
for SEV, the PSP exports the VMSA for SEV-ES) but, unlike guest RAM, a host that rolls back or swaps
RAM pages cannot roll them back together with the pages. The ledger's top-level roots therefore live
here (see `ledger.py`). Every value is a u64, like a real register, so the state serialises as plain
64-bit integers (msgpack-safe).
"""

from __future__ import annotations

import struct

# vCPU scheduling quantum. 10 ms is the Linux CFS default latency order of magnitude and fine enough
# that a guest's dirty rate looks continuous to a migration round (rounds last 100s of ms).
VCPU_TICK_S = 0.010
# A vCPU task that was starved (its event loop busy, e.g. launching another guest) does not get to replay all
# the time it missed in one go: like a descheduled vCPU, the lost wall time is simply lost.
VCPU_MAX_SLICE_S = 0.100

#: Architectural registers saved for every vCPU (the subset a KVM_GET_REGS/SREGS user sees first).
ARCH_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
             "rip", "rflags", "cr0", "cr3", "cr4", "efer")

#: Number of ledger root registers. 64 roots localise a damaged ledger-directory page exactly for
#: guests up to 16 GiB (one directory page covers 256 ledger pages x 256 entries = 256 MiB of guest);
#: beyond that a root covers several directory pages (see ledger.py). 64 u64s keep the VMSA small.
LEDGER_ROOTS = 64

#: Registers the guest kernel keeps for itself on the boot vCPU (vCPU 0).
KERNEL_REGS = (
    "kpfn",        # pfn of the kernel state page (it follows the launch image)
    "kstate",      # 64-bit digest of the kernel state page (ledger keys, layout, workload parameters)
    "hc_nr",       # hypercall the kernel uses to report encryption-status changes
    "wl_seq",      # last page version issued (global write sequence number)
    "wl_step",     # workload RNG position: number of run() steps taken
    "wl_dcarry",   # fractional page-write carry, fixed point 2^-32 pages
    "wl_fcarry",   # fractional flip carry, fixed point 2^-32 flips
    "wl_fparity",  # flip direction alternation when the shared count is on target
    "shared",      # number of pages the kernel currently has shared (C-bit clear)
    "wl_shared",   # of which workload pages (the workload keeps this at its configured target)
    "boots",       # kernel boot counter (reboot derives fresh ledger keys from it)
    "jlen",        # records in the ledger journal
) + tuple(f"lg{i}" for i in range(LEDGER_ROOTS))

BSP_REGS = ARCH_REGS + KERNEL_REGS
U64 = (1 << 64) - 1


def reset_state(vcpu: int) -> dict[str, int]:
    """Register values right after reset (the BSP starts at the firmware entry point)."""
    regs = {name: 0 for name in (BSP_REGS if vcpu == 0 else ARCH_REGS)}
    regs["rip"] = 0xFFF0            # x86 reset vector offset
    regs["rflags"] = 0x2           # bit 1 is always set
    regs["cr0"] = 0x60000010       # CD | NW | ET, the architectural reset value
    return regs


def check_regs(regs: list[dict[str, int]], vcpus: int) -> None:
    """Raise ValueError unless `regs` has the exact register set of `vcpus` vCPUs, every value a u64."""
    if not isinstance(regs, list) or len(regs) != vcpus:
        raise ValueError(f"expected register state for {vcpus} vCPU(s)")
    for i, r in enumerate(regs):
        _check_one(r, i)


#: The register encoding must end before the VMSA's reserved trailer, which the firmware requires to be zero
#: (SEND/RECEIVE_UPDATE_VMSA validate it); the VMSA's size and layout are the firmware's.
from sevmigd.psp.firmware import VMSA_RESERVED_OFFSET as VMSA_REGS_LIMIT  # noqa: E402
from sevmigd.psp.firmware import VMSA_SIZE  # noqa: E402,F401

#: Where each architectural register lives in the SEV-ES save area (AMD APM vol. 2, "VMCB State Save
#: Area" / SEV-ES VMSA; Linux `struct sev_es_save_area`, arch/x86/include/asm/svm.h, whose
#: BUILD_BUG_ON offsets pin the same numbers). Byte offsets in the 4 KiB VMSA page, u64 little-endian.
VMSA_OFFSETS = {
    "efer": 0x0D0,
    "cr4": 0x148, "cr3": 0x150, "cr0": 0x158,
    "rflags": 0x170, "rip": 0x178,
    "rsp": 0x1D8, "rax": 0x1F8,
    "rcx": 0x308, "rdx": 0x310, "rbx": 0x318,      # 0x320 is reserved: RSP already lives at 0x1D8
    "rbp": 0x328, "rsi": 0x330, "rdi": 0x338,
    "r8": 0x340, "r9": 0x348, "r10": 0x350, "r11": 0x358,
    "r12": 0x360, "r13": 0x368, "r14": 0x370, "r15": 0x378,
}
#: End of the hardware-defined save area (Linux: sizeof(struct sev_es_save_area) = 0x670, the FPU
#: state included); the rest of the page is unused by the CPU.
VMSA_SAVE_AREA_END = 0x670
#: Emulation-only: the guest kernel's own registers (`KERNEL_REGS`, boot vCPU only) are kept in the
#: unused part of the page after the hardware save area, as consecutive u64s. No CPU has such fields;
#: they stand for guest state that must travel with the vCPU (see README, "What is emulated").
VMSA_KERNEL_OFFSET = 0x800

assert set(VMSA_OFFSETS) == set(ARCH_REGS)
assert VMSA_SAVE_AREA_END <= VMSA_KERNEL_OFFSET
assert VMSA_KERNEL_OFFSET + 8 * len(KERNEL_REGS) <= VMSA_REGS_LIMIT


def _field_mask(vcpu: int) -> bytearray:
    """1 for every byte of the page this encoding uses for `vcpu`, 0 elsewhere."""
    mask = bytearray(VMSA_SIZE)
    for off in VMSA_OFFSETS.values():
        mask[off:off + 8] = b"\x01" * 8
    if vcpu == 0:
        mask[VMSA_KERNEL_OFFSET:VMSA_KERNEL_OFFSET + 8 * len(KERNEL_REGS)] = b"\x01" * (8 * len(KERNEL_REGS))
    return mask


#: Bytes no field uses, as one big integer per page kind (boot vCPU, other vCPUs): a page is valid
#: only when it has no bit set there.
_UNUSED = {i: int.from_bytes(bytes(0 if b else 0xFF for b in _field_mask(i)), "little") for i in (0, 1)}


def _check_one(regs: dict[str, int], vcpu: int) -> None:
    if isinstance(vcpu, bool) or not isinstance(vcpu, int) or vcpu < 0:
        raise ValueError("vCPU index must be an int >= 0")
    names = BSP_REGS if vcpu == 0 else ARCH_REGS
    if not isinstance(regs, dict) or set(regs) != set(names):
        raise ValueError(f"vCPU {vcpu}: register set does not match")
    for k, v in regs.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= U64:
            raise ValueError(f"vCPU {vcpu}: register {k} is not a u64")


def encode_vmsa(regs: dict[str, int], vcpu: int) -> bytes:
    """One vCPU's registers -> its 4096-byte VMSA plaintext (hardware offsets; every other byte zero).

    One page per vCPU, as on hardware: LAUNCH_UPDATE_VMSA, SEND_UPDATE_VMSA and RECEIVE_UPDATE_VMSA
    each take one vCPU's page. vCPU 0 additionally carries the guest kernel's registers.
    """
    _check_one(regs, vcpu)
    out = bytearray(VMSA_SIZE)
    for name, off in VMSA_OFFSETS.items():
        struct.pack_into("<Q", out, off, regs[name])
    if vcpu == 0:
        struct.pack_into(f"<{len(KERNEL_REGS)}Q", out, VMSA_KERNEL_OFFSET, *(regs[n] for n in KERNEL_REGS))
    return bytes(out)


def decode_vmsa(data: bytes, vcpu: int) -> dict[str, int]:
    """Inverse of encode_vmsa; ValueError on a page that is not one (a byte outside the fields set)."""
    if len(data) != VMSA_SIZE:
        raise ValueError("a VMSA page is 4096 bytes")
    if isinstance(vcpu, bool) or not isinstance(vcpu, int) or vcpu < 0:
        raise ValueError("vCPU index must be an int >= 0")
    data = bytes(data)
    if int.from_bytes(data, "little") & _UNUSED[0 if vcpu == 0 else 1]:
        raise ValueError(f"vCPU {vcpu}: VMSA has bytes set outside the save-area fields")
    regs = {name: struct.unpack_from("<Q", data, off)[0] for name, off in VMSA_OFFSETS.items()}
    if vcpu == 0:
        regs.update(zip(KERNEL_REGS, struct.unpack_from(f"<{len(KERNEL_REGS)}Q", data, VMSA_KERNEL_OFFSET)))
    return regs
