"""vCPU register state of an emulated SEV guest, and its SEV-ES VMSA encoding.

Owns: the fixed register set (architectural registers plus the few the guest kernel keeps for itself:
the ledger roots, the workload's RNG position and counters) and the byte layout of those registers
inside a 4 KiB VMSA page. Must never: decide who may read the registers (that is the host view's job:
plain for SEV guests, refused for SEV-ES guests whose VMSA is encrypted by the PSP).

Why the guest kernel keeps state in registers: registers migrate with the guest (the host copies them
for SEV, the PSP exports the VMSA for SEV-ES) but, unlike guest RAM, a host that rolls back or swaps
RAM pages cannot roll them back together with the pages. The ledger's top-level roots therefore live
here (see `ledger.py`). Every value is a u64, like a real register, so the state serialises as plain
64-bit integers (msgpack-safe).
"""

from __future__ import annotations

import struct

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

VMSA_SIZE = 4096
#: Register encoding must end before the VMSA's reserved trailer, which the firmware requires to be zero
#: (sevmigd.psp.firmware.VMSA_RESERVED_OFFSET = 0xC00; SEND/RECEIVE_UPDATE_VMSA validate it).
VMSA_REGS_LIMIT = 0xC00
_VMSA_MAGIC = b"SEVMIGD-VMSA\x00\x01"  # 14 bytes + 2-byte vCPU count = one 16-byte header


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
        names = BSP_REGS if i == 0 else ARCH_REGS
        if not isinstance(r, dict) or set(r) != set(names):
            raise ValueError(f"vCPU {i}: register set does not match")
        for k, v in r.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= U64:
                raise ValueError(f"vCPU {i}: register {k} is not a u64")


def vmsa_capacity() -> int:
    """How many vCPUs fit in one VMSA page with this encoding."""
    return 1 + (VMSA_REGS_LIMIT - 16 - 8 * len(BSP_REGS)) // (8 * len(ARCH_REGS))


def encode_vmsa(regs: list[dict[str, int]]) -> bytes:
    """Registers -> 4096-byte VMSA plaintext: header, then u64 LE registers, the rest zero.

    The firmware API carries one VMSA page per guest; this emulation packs every vCPU's save area into
    it (vCPU 0 with the kernel registers first), which bounds SEV-ES guests to `vmsa_capacity()` vCPUs.
    """
    check_regs(regs, len(regs))
    if len(regs) > vmsa_capacity():
        raise ValueError(f"at most {vmsa_capacity()} vCPUs fit in one VMSA page")
    out = bytearray(VMSA_SIZE)
    out[0:16] = _VMSA_MAGIC + struct.pack("<H", len(regs))
    off = 16
    for i, r in enumerate(regs):
        names = BSP_REGS if i == 0 else ARCH_REGS
        struct.pack_into(f"<{len(names)}Q", out, off, *(r[n] for n in names))
        off += 8 * len(names)
    return bytes(out)


def decode_vmsa(data: bytes) -> list[dict[str, int]]:
    """Inverse of encode_vmsa; ValueError on a malformed page (bad header, non-zero tail)."""
    if len(data) != VMSA_SIZE or data[:14] != _VMSA_MAGIC:
        raise ValueError("not a sevmigd VMSA page")
    (n,) = struct.unpack_from("<H", data, 14)
    if not 1 <= n <= vmsa_capacity():
        raise ValueError("bad vCPU count in VMSA")
    regs = []
    off = 16
    for i in range(n):
        names = BSP_REGS if i == 0 else ARCH_REGS
        vals = struct.unpack_from(f"<{len(names)}Q", data, off)
        regs.append(dict(zip(names, vals)))
        off += 8 * len(names)
    if any(data[off:]):
        raise ValueError("VMSA tail is not zero")
    return regs
