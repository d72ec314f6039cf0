"""The VMM side of a key slot: the guest's memory engine from the blob `Firmware.key_slot(handle)` made.

Why: on hardware the PSP loads a guest's VEK into the memory controller's slot for its ASID, and the CPU
running the guest encrypts and decrypts with it; no software sees the key. Here the VMM process plays that
CPU (issue 17), so it needs the guest's `MemoryEngine`, while the daemon, which plays the PSP *and* the
host, must hand it over without host-side code being able to use it. The PSP seals the VEK under its
sealing key (sevmigd.psp.seal, Kind.KEY_SLOT, bound to handle and ASID); host code passes the opaque blob
on; the VMM, which may read the hardware's state (the sealing key in RUNTIME/psp/), opens it here.

Trust boundary (tests/test_layering.py): only the PSP and the guest side (the VMM's guest runtime) import
this module; host-side code (daemon, kvm, migrate, wire) never does.

Must never: return an engine for a blob that does not authenticate under the given key, or for a slot
bound to another handle or ASID than the caller expects.
"""

from __future__ import annotations

import struct

from . import seal
from .firmware import key_slot_binding
from .memengine import VEK_SIZE, MemoryEngine
from .status import SevStatus


def key_slot_target(blob: bytes) -> tuple[int, int]:
    """(handle, ASID) the key slot says it is for, NOT authenticated (open_key_slot checks it); SealError
    when the blob is not shaped like a key slot."""
    binding = seal.peek(blob, seal.Kind.KEY_SLOT)
    if len(binding) != 4:
        raise seal.SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "not a key slot binding")
    handle, asid = struct.unpack("<HH", binding)
    return handle, asid


def open_key_slot(blob: bytes, sealing_key: bytes, *, handle: int | None = None,
                  asid: int | None = None) -> MemoryEngine:
    """The memory engine of the guest the key slot is for. With `handle` / `asid`, the slot must be bound
    to exactly those (SealError reason "binding" otherwise). SealError for a damaged blob or one sealed
    under another key ("foreign")."""
    bound_handle, bound_asid = key_slot_target(blob)
    if (handle is not None and handle != bound_handle) or (asid is not None and asid != bound_asid):
        raise seal.SealError(SevStatus.SECURE_DATA_INVALID, "binding",
                             f"key slot is for handle {bound_handle} / ASID {bound_asid}")
    _b, vek = seal.open_blob(sealing_key, blob, seal.Kind.KEY_SLOT,
                             binding=key_slot_binding(bound_handle, bound_asid))
    if len(vek) != VEK_SIZE:
        raise seal.SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "not a VEK")
    return MemoryEngine(vek)


__all__ = ["open_key_slot", "key_slot_target"]
