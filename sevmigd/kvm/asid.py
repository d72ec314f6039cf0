"""SEV ASIDs as KVM manages them (arch/x86/kvm/svm/sev.c: sev_asid_new, sev_asid_free, sev_flush_asids).

Owns: the host-wide ASID space, split as the CPU requires (CPUID 0x8000001F: ECX = max SEV ASID,
EDX = min_sev_asid): SEV-ES guests take ASIDs 1 .. min_sev_asid - 1, plain SEV guests
min_sev_asid .. max_sev_asid. A freed ASID is not free: it goes to a reclaim set, because the old
guest's dirty cache lines and data-fabric buffers are still tagged with it. Only when a range runs out
does KVM recycle: WBINVD on every core, then the firmware's DF_FLUSH, after which every reclaimed ASID
is free again (KVM flushes once for many ASIDs, not once per guest). An allocation that still finds
nothing fails with -EBUSY.

Must never: hand out an ASID that was freed and not flushed since (the firmware would refuse its
ACTIVATE with DF_FLUSH_REQUIRED), or an ES ASID to a non-ES guest or the reverse.
"""

from __future__ import annotations

from typing import Callable

from .uapi import EBUSY

#: CPUID 0x8000001F ECX: ASIDs for encrypted guests, the firmware's own limit (sevmigd.psp.firmware).
from sevmigd.psp.firmware import MAX_ASID as MAX_SEV_ASID  # noqa: E402
#: CPUID 0x8000001F EDX: the first ASID for a non-ES SEV guest, set by the BIOS option "SEV-ES ASID
#: space limit". We choose 100 (99 SEV-ES ASIDs, 410 SEV ASIDs); a real host reports its own.
MIN_SEV_ASID = 100


class AsidExhausted(Exception):
    """No ASID left in the range even after a flush (sev_asid_new returns -EBUSY)."""

    errno = EBUSY


class AsidSpace:
    """The host's SEV ASIDs. `flush()` must do WBINVD on all cores + DF_FLUSH, raising on failure."""

    def __init__(self, flush: Callable[[], None], *, min_sev_asid: int = MIN_SEV_ASID,
                 max_sev_asid: int = MAX_SEV_ASID):
        if not 1 <= min_sev_asid <= max_sev_asid + 1:
            raise ValueError("need 1 <= min_sev_asid <= max_sev_asid + 1")
        self.min_sev_asid = min_sev_asid
        self.max_sev_asid = max_sev_asid
        self._flush = flush
        self._used: set[int] = set()
        self._reclaim: set[int] = set()
        self.flushes = 0
        #: Bumped by every change of the in-use or reclaim sets: the daemon's PSP store persists the
        #: space's state when it moved (sevmigd.daemon.pspstate).
        self.generation = 0

    def range(self, es: bool) -> range:
        """ASIDs a guest of this kind may use (sev_asid_new's min_asid .. max_asid)."""
        return range(1, self.min_sev_asid) if es else range(self.min_sev_asid, self.max_sev_asid + 1)

    def new(self, es: bool) -> int:
        """The lowest ASID of the range that is neither in use nor awaiting a flush; recycle once
        (flush) when there is none; AsidExhausted when there is still none."""
        r = self.range(es)
        for attempt in (0, 1):
            asid = next((a for a in r if a not in self._used and a not in self._reclaim), None)
            if asid is not None:
                self._used.add(asid)
                self.generation += 1
                return asid
            if attempt == 0 and not self._recycle(r):
                break
        kind = "SEV-ES" if es else "SEV"
        raise AsidExhausted(f"all {len(r)} {kind} ASIDs ({r.start}..{r.stop - 1}) are in use")

    def claim(self, asid: int) -> None:
        """Count `asid` as in use (a guest whose ASID was chosen elsewhere, e.g. injected by a test)."""
        if asid not in self._used or asid in self._reclaim:
            self.generation += 1
        self._used.add(asid)
        self._reclaim.discard(asid)

    def restore(self, in_use, awaiting_flush) -> None:
        """The state a restarted daemon finds (sevmigd.daemon.pspstate): `in_use` claimed, `awaiting_flush`
        back in the reclaim set, so an ASID freed before the restart is reused only after a flush."""
        self._used = {a for a in in_use}
        self._reclaim = {a for a in awaiting_flush if a not in self._used}
        self.generation += 1

    def free(self, asid: int | None) -> None:
        """The guest is gone (DEACTIVATEd): its ASID waits in the reclaim set for the next flush."""
        if asid in self._used:
            self._used.discard(asid)
            self._reclaim.add(asid)
            self.generation += 1

    def _recycle(self, r: range) -> bool:
        """sev_flush_asids + __sev_recycle_asids: nothing to reclaim in `r` -> no flush, False."""
        if not any(a in self._reclaim for a in r):
            return False
        self._flush()
        self.flushes += 1
        self._reclaim.clear()
        self.generation += 1       # the flush covers every reclaimed ASID, SEV and SEV-ES alike
        return True

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._used)

    @property
    def awaiting_flush(self) -> frozenset[int]:
        return frozenset(self._reclaim)

    def clear(self) -> None:
        """Platform shut down: no guest, nothing to flush (SHUTDOWN ends every context)."""
        self._used.clear()
        self._reclaim.clear()
        self.generation += 1


def firmware_flush(fw) -> Callable[[], None]:
    """The flush KVM does, against an emulated PSP: WBINVD on all cores, then DF_FLUSH."""

    def flush() -> None:
        fw.wbinvd()
        fw.df_flush()

    return flush
