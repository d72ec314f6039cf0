"""Page sets of a migration round as numpy arrays: batching, the final page-encryption bitmap codec.

Pure and host-side: pfns and bits only, never page contents. The Bitmap message carries the
page-encryption bitmap packed little-endian (bit i of the guest = bit i%8 of byte i//8, bit set = private),
which is numpy's `packbits(..., bitorder="little")`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

# Pages per Pages frame. 256 pages = 1 MiB of payload: large enough that per-frame costs (msgpack header,
# channel MAC set-up, one send syscall, one firmware batch call) are ~0.1 % of the frame, small enough that
# the guest's vCPU task and keepalives get the event loop every few milliseconds, and far below the wire's
# 16 MiB frame cap. (QEMU sends 4 KiB pages through a 32 KiB QEMUFile buffer; we batch more because each
# batch crosses into the firmware once.)
BATCH_PAGES = 256


def batches(pfns: np.ndarray, size: int = BATCH_PAGES) -> Iterator[np.ndarray]:
    """Consecutive slices of at most `size` pfns (views, no copies)."""
    for i in range(0, len(pfns), size):
        yield pfns[i:i + size]


def split_by_encryption(pfns: np.ndarray, private: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(private pfns, shared pfns) of `pfns`, in order, as uint64 arrays, by the page-encryption bitmap."""
    mask = private[pfns]
    return pfns[mask].astype(np.uint64, copy=False), pfns[~mask].astype(np.uint64, copy=False)


def pack_bitmap(private: np.ndarray) -> bytes:
    """Bool array (True = private) -> packed little-endian bits, padding bits zero."""
    return np.packbits(np.asarray(private, dtype=bool), bitorder="little").tobytes()


def unpack_bitmap(bits: bytes, npages: int) -> np.ndarray:
    """Packed little-endian bits -> bool array of `npages` (True = private)."""
    arr = np.frombuffer(bits, dtype=np.uint8)
    return np.unpackbits(arr, count=npages, bitorder="little").astype(bool)
