"""Guest RAM in a migration: QEMU's migration/ram.c, for an SEV guest. Pure: no I/O, no clock of its own.

Owns, on the source (`RamSender`): the dirty-log iteration (round 1 = every page, later rounds = what
the last sync returned), the encryption status of each batch read through the page-encryption bitmap
*windows* the batch spans (KVM_GET_PAGE_ENC_BITMAP, or the VMM's own bitmap: `HostView.page_enc_window`),
never a copy of the whole bitmap while the guest runs, the per-page send state (sent private or shared),
and at stop-and-copy the pages whose encryption status flipped since they were last sent. The driver
asks it for the next batch and nothing else (`next_batch()`), and for the round's bookkeeping (`sync`,
`stop_and_copy`).

On the destination (`RamReceiver`): shared pages stored as they arrive, the page-encryption bitmap
built once from the final Bitmap through KVM_SET_PAGE_ENC_BITMAP and the VMM's own bitmap (whichever
hypercall dialect the guest speaks, the seed's first TODO). The range of every incoming pfn is checked
once, by the wire (`Connection`: pfn < npages); the PSP and the RAM keep their own memory-safety checks.

Page numbers are numpy uint64 arrays from the dirty log to the wire (KVM's gfns are __u64); `range`
objects stand for the whole guest in round 1 so no 8-bytes-per-page array of it is ever built.

Must never: see a private page's plaintext (private pages go to the PSP by number; only shared pages'
raw bytes pass through here), or send a page with a stale status at stop-and-copy (every page whose
status differs from how it was last sent goes again, as what it is now).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .pages import BATCH_PAGES

PFN = np.uint64
_EMPTY = np.zeros(0, dtype=PFN)
#: Pages of one batch more than this many gfns apart are classified through separate bitmap windows:
#: a window costs num_pages / 8 bytes, so a batch scattered over an 8 GiB guest reads at most
#: ~(span / WINDOW_GAP) small windows instead of one 256 KiB one. 4096 pages = 512 bytes of bitmap.
WINDOW_GAP = 4096
#: A window read covers at least this many pages (2 KiB of bitmap, 64 MiB of guest) and serves the
#: batches that fall inside it for up to WINDOW_MAX_AGE_S: one KVM_GET_PAGE_ENC_BITMAP per 64 batches of
#: round 1 instead of one per batch (measured: a window ioctl costs about as much as 10 % of a 256-page
#: batch's crypto on the dev VM).
WINDOW_PAGES = 16384
#: How stale a window may be while the guest runs: a page that flips in between goes out as what it was
#: and is sent again as what it is at stop-and-copy (every page whose status differs from how it was last
#: sent goes again). 50 ms, the refresh period of the whole-bitmap copy this replaces.
WINDOW_MAX_AGE_S = 0.05


class HostRam(Protocol):
    """What ram.py needs from the VMM (guest.hypervisor.HostView)."""

    npages: int

    def enable_dirty_log(self) -> None: ...
    def disable_dirty_log(self) -> None: ...
    def get_and_clear_dirty_log(self) -> np.ndarray: ...
    def page_enc_window(self, start_gfn: int, num_pages: int) -> np.ndarray: ...
    def read_raw_pages(self, pfns) -> bytes: ...
    def write_raw_pages(self, pfns, data) -> None: ...
    def set_page_enc_bitmap(self, bits) -> None: ...


@dataclass(frozen=True)
class Batch:
    """One batch of a round: private pfns (for SEND_UPDATE_DATA) and shared pfns with their raw bytes."""

    enc: np.ndarray
    shr: np.ndarray
    shr_data: bytes

    def __len__(self) -> int:
        return len(self.enc) + len(self.shr)


def as_pfns(pfns) -> np.ndarray:
    """The one page-number type: a uint64 array (no copy when it already is one)."""
    return np.asarray(pfns, dtype=PFN)


class RamSender:
    """The source's RAM iteration (see the module docstring). `clock` (seconds, injected) times the
    bitmap reads for the round statistics."""

    def __init__(self, host: HostRam, *, batch_pages: int = BATCH_PAGES,
                 clock: Callable[[], float] | None = None):
        self.host = host
        self.npages = host.npages
        self.batch_pages = batch_pages
        # Without a clock no window is reused (each batch reads its own): the pure tests' default.
        self._clock = clock if clock is not None else (lambda: 0.0)
        self._reuse = clock is not None
        self._window: tuple[int, np.ndarray, float] | None = None    # (start gfn, bits, read at)
        self.sent_private = np.zeros(self.npages, dtype=bool)   # how each page was last sent
        self._todo: np.ndarray | range = range(0)
        self._pos = 0
        self._final: np.ndarray | None = None    # the final bitmap once the guest is paused
        self.round_pages = 0
        self.bitmap_s = 0.0                      # time spent reading bitmap windows this round
        self.flipped = 0

    # -- rounds ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Dirty logging on; round 1 sends every page."""
        self.host.enable_dirty_log()
        self._begin(range(self.npages))

    def _begin(self, todo) -> None:
        self._todo, self._pos = todo, 0
        self.round_pages = len(todo)
        self.bitmap_s = 0.0

    def sync(self) -> int:
        """End of a pre-copy round: the dirty log (get and clear), plus any pages of this round not handed
        out yet (a round cut short: they are still dirty), become the next round's pages. Returns the
        number of pages the dirty log reported (QEMU's dirty-sync)."""
        dirty = as_pfns(self.host.get_and_clear_dirty_log())
        left = self._left()
        self._begin(np.union1d(dirty, left) if len(left) else dirty)
        return len(dirty)

    def _left(self) -> np.ndarray:
        """The current round's pages not handed out yet."""
        if isinstance(self._todo, range):
            return np.arange(self._todo.start + self._pos, self._todo.stop, dtype=PFN)
        return self._todo[self._pos:]

    @property
    def remaining(self) -> int:
        """Pages of the current round not yet handed out."""
        return self.round_pages - self._pos

    def stop_and_copy(self) -> np.ndarray:
        """The guest is paused: the last round is what the last sync left, what the guest wrote since,
        and every page whose encryption status changed since it was last sent. Returns the final bitmap
        (bool per page, True = private; the one whole read, for the Bitmap message)."""
        dirty = np.union1d(self._left(), as_pfns(self.host.get_and_clear_dirty_log()))
        t0 = self._clock()
        bits = self.host.page_enc_window(0, self.npages)
        self.bitmap_s = self._clock() - t0
        flipped = np.flatnonzero(self.sent_private != bits).astype(PFN)
        self.flipped = len(flipped)
        self._final = bits
        self._window = None
        self._todo, self._pos = np.union1d(dirty, flipped), 0
        self.round_pages = len(self._todo)
        return bits

    def stop_logging(self) -> None:
        self.host.disable_dirty_log()

    # -- batches --------------------------------------------------------------------------------------
    def next_batch(self) -> Batch | None:
        """The next at most `batch_pages` pages of the round, split by encryption status; None at the
        round's end. Marks them as sent the way they go."""
        if self._pos >= self.round_pages:
            return None
        end = min(self._pos + self.batch_pages, self.round_pages)
        if isinstance(self._todo, range):
            chunk = np.arange(self._todo.start + self._pos, self._todo.start + end, dtype=PFN)
        else:
            chunk = self._todo[self._pos:end]
        self._pos = end
        private = self._final[chunk] if self._final is not None else self._status(chunk)
        enc, shr = chunk[private], chunk[~private]
        self.sent_private[enc] = True
        self.sent_private[shr] = False
        return Batch(enc, shr, self.host.read_raw_pages(shr) if len(shr) else b"")

    def _status(self, chunk: np.ndarray) -> np.ndarray:
        """Encryption status of a sorted batch, one bitmap window per cluster of nearby pages (or the
        last window read, while it covers the cluster and is fresh enough)."""
        t0 = self._clock()
        breaks = np.flatnonzero(np.diff(chunk) > WINDOW_GAP) + 1
        parts = []
        for seg in np.split(chunk, breaks) if len(breaks) else (chunk,):
            lo, hi = int(seg[0]), int(seg[-1]) + 1
            start, bits = self._window_for(lo, hi, t0)
            parts.append(bits[(seg - PFN(start)).astype(np.intp)])
        self.bitmap_s += self._clock() - t0
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _window_for(self, lo: int, hi: int, now: float) -> tuple[int, np.ndarray]:
        w = self._window
        if self._reuse and w is not None and w[0] <= lo and hi <= w[0] + len(w[1]) \
                and now - w[2] <= WINDOW_MAX_AGE_S:
            return w[0], w[1]
        n = max(hi - lo, WINDOW_PAGES) if self._reuse else hi - lo
        n = min(n, self.npages - lo)
        bits = self.host.page_enc_window(lo, n)
        self._window = (lo, bits, now)
        return lo, bits


class RamReceiver:
    """The destination's RAM: shared pages stored raw, the bitmap set from the final Bitmap."""

    def __init__(self, host: HostRam):
        self.host = host
        self.npages = host.npages

    def store_shared(self, shr, data) -> None:
        if len(shr):
            self.host.write_raw_pages(as_pfns(shr), data)

    def set_bitmap(self, bits: np.ndarray) -> None:
        """KVM_SET_PAGE_ENC_BITMAP over the whole guest and the VMM's own bitmap (both dialects)."""
        self.host.set_page_enc_bitmap(np.asarray(bits, dtype=bool))


__all__ = ["Batch", "RamSender", "RamReceiver", "as_pfns", "PFN", "WINDOW_GAP", "HostRam"]
