"""Process-wide allocator tuning for the daemon: keep big transient buffers in the heap.

Why: the migration page path allocates and frees MiB-sized buffers per batch (firmware batch output,
frames, socket reads, numpy temporaries). glibc serves allocations above M_MMAP_THRESHOLD (128 KiB
initially, adjusted dynamically) with a fresh mmap and returns them with munmap, so every batch
page-faults its buffers in again: measured on the 2-core dev VM, ~480 minor faults per 1 MiB batch and
~2 us per fault, i.e. the memory engine's batch read went from 2.7 to 6.8 us per page and the source's
SEND_UPDATE_DATA batch from ~9 to ~13 us per page. With a fixed 32 MiB mmap threshold (glibc's maximum on
64-bit) the freed buffers are reused from the heap and never fault again; the trim threshold bounds how
much free heap is kept (the working set of one batch pipeline is a few MiB, below it). Guest RAM is
an explicit mmap (sevmigd.guest.memory) and is not affected.

Best effort: on a libc without mallopt (musl, macOS) nothing happens. Must never raise.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger values are refused by mallopt.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap kept for reuse instead of being returned to the kernel: a few
#: batches' worth (a batch holds ~4 x 1 MiB at once). It counts in the daemon's RSS (target: guest size
#: + 100 MiB), so not more: 64 MiB measured guest + 98-108 MiB after a launch, 16 MiB guest + 76.
TRIM_THRESHOLD = 16 << 20


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


def release_free_heap() -> bool:
    """Give free heap memory back to the kernel now (glibc malloc_trim(0)): after a one-off burst such
    as launching a guest with every page written, so the transient buffers do not stay in the daemon's
    RSS (up to TRIM_THRESHOLD of them would). True when glibc released something."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    try:
        return bool(trim(0))
    except Exception:  # noqa: BLE001 - best effort
        return False


def tune_malloc() -> bool:
    """Set the thresholds above; True when glibc accepted both."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    try:
        return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except Exception:  # noqa: BLE001 - tuning must never stop the daemon
        return False
