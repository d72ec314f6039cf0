"""The guest's self-check ledger, kept inside guest RAM so that it migrates with the guest.

Owns: the ledger layout, the per-page entries, the two levels of accumulators that protect the ledger
itself, and `verify`. Guest side only (it sees plaintext through the guest's memory accessor); it must
never be imported by host-side code.

Theory of operation
-------------------
Every guest page p has a 16-byte entry E_p = (w0, w1) in a private *ledger page* (256 entries a page):

    w0 = version << 8 | kind << 2 | SHARED << 1 | WRITTEN        w1 = content digest (or 0)

`version` is the global write sequence number at the page's last write, so a stale copy of a page
(old version) never matches. Workload pages have w1 = 0: their content is a pure function of
(key, pfn, version) (`workload_content`), so verify regenerates and compares the whole page and a write
costs no hashing. Agent and image pages carry w1 = keyed BLAKE2b-64(pfn ‖ version ‖ content).
An all-zero entry means "never written": the guest makes no claim about that page (this is what makes
an 8 GiB guest creatable without 8 GiB of work; such pages are not counted in pages_checked).

Level 1: each ledger page l has a *directory entry* D_l = (A_l, 1) in a private directory page, where
A_l = XOR over its non-empty entries of mix(k1, p, w0, w1). D_l = (0, 0) marks a ledger page that was
never initialised (all its entries are implicitly empty; the page is not even read), so ledger pages
are created lazily on first write.
Level 2: each directory page d has B_d = XOR over its non-empty D_l of mix(k2, l, A_l, flags); root
register lg[d % 64] = XOR of the B_d of the directory pages that map to it. The roots live in vCPU 0's
registers: a host that rolls back RAM cannot roll back registers with it.

All updates are incremental (XOR out the old contribution, XOR in the new), so a write costs O(1)
mixing per entry, no rehash of a ledger page; and damage already present in a ledger page survives any
later update of that page (the accumulator keeps the discrepancy), so verify still reports it.

Localisation: verify reports the kernel state page if its digest (register kstate) fails; directory
pages whose root fails (exact up to 64 directory pages = 16 GiB guests, otherwise every directory page
sharing that root); ledger pages whose A_l fails (their data pages are then not judged: with a damaged
ledger page the claims about them are unknown); and data pages whose content fails their entry.

`mix` is a keyed 64-bit mixer (splitmix64 finaliser rounds with secret keys from the kernel state
page), chosen because it vectorises in numpy; it detects accidental or migration-bug damage with
probability 1 - 2^-64 per check, but it is not a cryptographic MAC against a host that can see
plaintext (which it cannot: the keys live in a private page).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .vcpu import LEDGER_ROOTS

PAGE_SIZE = 4096
ENTRY_BYTES = 16
ENTRIES_PER_PAGE = PAGE_SIZE // ENTRY_BYTES  # 256
DIR_PER_PAGE = PAGE_SIZE // ENTRY_BYTES      # 256

F_WRITTEN = 1
F_SHARED = 2
KIND_SHIFT = 2
KIND_MASK = 3 << KIND_SHIFT
KIND_WORKLOAD = 0
KIND_AGENT = 1
KIND_IMAGE = 2
VERSION_SHIFT = 8
MAX_VERSION = (1 << 56) - 1

#: Pages verify decrypts per batch: 256 pages = 1 MiB, big enough to amortise the engine's per-call
#: cost, small enough to keep verify's memory flat for big guests.
VERIFY_CHUNK = 256

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


def mix(key: int, a, b, c) -> np.ndarray:
    """Keyed 64-bit mix of three u64 arrays (vectorised)."""
    k = np.uint64(key)
    a = np.asarray(a, dtype=np.uint64)
    h = _fmix(a * _GOLD ^ k)
    h = _fmix(h ^ np.asarray(b, dtype=np.uint64))
    return _fmix(h ^ (np.asarray(c, dtype=np.uint64) + k))


def contrib(key: int, idx, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """Accumulator contribution of entries (0 for empty entries so lazily created pages start at 0)."""
    m = mix(key, idx, w0, w1)
    m[(w0 == 0) & (w1 == 0)] = 0
    return m


def workload_content(key: int, pfns: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """Plaintext of workload pages: (n, 4096) uint8. Words: pfn, version, then (A, B) repeated.

    Every byte of the page depends on (key, pfn, version), so a corrupted byte, another page's content
    (swap) or an older version (stale) all differ from the regenerated page.
    """
    n = len(pfns)
    p = np.asarray(pfns, dtype=np.uint64)
    v = np.asarray(versions, dtype=np.uint64)
    out = np.empty((n, PAGE_SIZE // 16, 2), dtype=np.uint64)
    out[:, :, 0] = mix(key, p, v, 1)[:, None]
    out[:, :, 1] = mix(key, p, v, 2)[:, None]
    out[:, 0, 0] = p
    out[:, 0, 1] = v
    return out.view(np.uint8).reshape(n, PAGE_SIZE)


def content_digest(key: bytes, pfn: int, version: int, content) -> int:
    """Keyed BLAKE2b-64 over pfn ‖ version ‖ content (agent and image pages)."""
    h = hashlib.blake2b(key=key, digest_size=8)
    h.update(pfn.to_bytes(8, "little") + version.to_bytes(8, "little"))
    h.update(content)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class Layout:
    """Where the kernel keeps its metadata: [image][kernel state][directory][ledger][pool ...]."""

    npages: int
    image_pages: int
    kstate_pfn: int
    dir_start: int
    n_dir: int
    ledger_start: int
    n_ledger: int
    pool_start: int

    @classmethod
    def compute(cls, npages: int, image_pages: int) -> "Layout":
        n_ledger = -(-npages // ENTRIES_PER_PAGE)
        n_dir = -(-n_ledger // DIR_PER_PAGE)
        kstate = image_pages
        dir_start = kstate + 1
        ledger_start = dir_start + n_dir
        pool_start = ledger_start + n_ledger
        if pool_start >= npages:
            raise ValueError("guest memory too small for the image plus the kernel's metadata")
        return cls(npages, image_pages, kstate, dir_start, n_dir, ledger_start, n_ledger, pool_start)

    def is_metadata(self, pfns: np.ndarray) -> np.ndarray:
        return (pfns >= self.kstate_pfn) & (pfns < self.pool_start)


@dataclass
class VerifyResult:
    pages_checked: int
    mismatches: list[int]


class LedgerTx:
    """Entries of a set of pages loaded for one batched update (see Ledger.begin)."""

    def __init__(self, ledger: "Ledger", pfns: np.ndarray):
        lay = ledger.layout
        self.ledger = ledger
        self.pfns = pfns                                   # sorted unique
        self.l_of = pfns // ENTRIES_PER_PAGE               # ledger page index per pfn
        self.ul = np.unique(self.l_of)                     # ledger pages touched
        self.ud = np.unique(self.ul // DIR_PER_PAGE)       # directory pages touched
        self.dir = ledger.mem.read_private(lay.dir_start + self.ud).view(np.uint64).reshape(
            len(self.ud), DIR_PER_PAGE, 2).copy()
        d_idx = np.searchsorted(self.ud, self.ul // DIR_PER_PAGE)
        self.d_idx = d_idx
        dent = self.dir[d_idx, self.ul % DIR_PER_PAGE]     # (len(ul), 2)
        self.init = (dent[:, 0] != 0) | (dent[:, 1] != 0)
        self.led = np.zeros((len(self.ul), ENTRIES_PER_PAGE, 2), dtype=np.uint64)
        if self.init.any():
            li = np.flatnonzero(self.init)
            self.led[li] = ledger.mem.read_private(lay.ledger_start + self.ul[li]).view(
                np.uint64).reshape(len(li), ENTRIES_PER_PAGE, 2)
        self.li = np.searchsorted(self.ul, self.l_of)
        self.ei = pfns % ENTRIES_PER_PAGE
        ent = self.led[self.li, self.ei]
        self.w0 = ent[:, 0].copy()
        self.w1 = ent[:, 1].copy()

    def commit(self, mask: np.ndarray, new_w0: np.ndarray, new_w1: np.ndarray) -> None:
        """Store new entries for pfns[mask] and update both accumulator levels incrementally."""
        if not mask.any():
            return
        led, lay, reg = self.ledger, self.ledger.layout, self.ledger.regs
        sel = np.flatnonzero(mask)
        pf = self.pfns[sel].astype(np.uint64)
        li, ei = self.li[sel], self.ei[sel]
        delta = contrib(led.k1, pf, self.w0[sel], self.w1[sel]) ^ contrib(led.k1, pf, new_w0, new_w1)
        self.led[li, ei, 0] = new_w0
        self.led[li, ei, 1] = new_w1
        self.w0[sel] = new_w0
        self.w1[sel] = new_w1
        # li is sorted (pfns sorted): one XOR-reduction per touched ledger page
        starts = np.flatnonzero(np.r_[True, li[1:] != li[:-1]])
        lpages = li[starts]
        ldelta = np.bitwise_xor.reduceat(delta, starts)
        l_abs = self.ul[lpages]
        di, de = self.d_idx[lpages], l_abs % DIR_PER_PAGE
        old = self.dir[di, de].copy()
        new = old.copy()
        new[:, 0] ^= ldelta
        new[:, 1] = 1
        self.dir[di, de] = new
        la = l_abs.astype(np.uint64)
        ddelta = contrib(led.k2, la, old[:, 0], old[:, 1]) ^ contrib(led.k2, la, new[:, 0], new[:, 1])
        dstarts = np.flatnonzero(np.r_[True, di[1:] != di[:-1]])
        for d, x in zip(di[dstarts], np.bitwise_xor.reduceat(ddelta, dstarts)):
            r = f"lg{int(self.ud[d]) % LEDGER_ROOTS}"
            reg[r] = int(reg[r]) ^ int(x)
        led.mem.write_private(lay.ledger_start + l_abs, self.led[lpages].tobytes())
        ud = np.unique(di)
        led.mem.write_private(lay.dir_start + self.ud[ud], self.dir[ud].tobytes())


class Ledger:
    """Guest-side ledger operations. `mem` is the guest's memory accessor (kernel.GuestMemoryAccess),
    `regs` vCPU 0's register dict (roots lg0..lg63), k1/k2 the accumulator keys."""

    def __init__(self, layout: Layout, mem, regs: dict, k1: int, k2: int):
        self.layout, self.mem, self.regs, self.k1, self.k2 = layout, mem, regs, k1, k2

    def format(self) -> None:
        """Fresh ledger: zeroed directory pages (every ledger page uninitialised), roots 0."""
        lay = self.layout
        self.mem.write_private(np.arange(lay.dir_start, lay.dir_start + lay.n_dir),
                               bytes(lay.n_dir * PAGE_SIZE))
        for i in range(LEDGER_ROOTS):
            self.regs[f"lg{i}"] = 0

    def begin(self, pfns) -> LedgerTx:
        p = np.unique(np.asarray(pfns, dtype=np.int64))
        return LedgerTx(self, p)

    # ------------------------------------------------------------------ verify
    def verify(self, check_data) -> VerifyResult:
        """Check directory pages against the roots, ledger pages against the directory, and (through
        `check_data(pfns, w0, w1) -> bad pfn list`) every written page against its entry."""
        lay = self.layout
        bad: list[int] = []
        checked = 0
        dpages = self.mem.read_private(np.arange(lay.dir_start, lay.dir_start + lay.n_dir)).view(
            np.uint64).reshape(lay.n_dir, DIR_PER_PAGE, 2)
        checked += lay.n_dir
        l_idx = (np.arange(lay.n_dir, dtype=np.uint64)[:, None] * np.uint64(DIR_PER_PAGE)
                 + np.arange(DIR_PER_PAGE, dtype=np.uint64)[None, :])
        b = np.bitwise_xor.reduce(contrib(self.k2, l_idx, dpages[:, :, 0], dpages[:, :, 1]), axis=1)
        roots = np.zeros(LEDGER_ROOTS, dtype=np.uint64)
        np.bitwise_xor.at(roots, np.arange(lay.n_dir) % LEDGER_ROOTS, b)
        want = np.array([self.regs[f"lg{i}"] for i in range(LEDGER_ROOTS)], dtype=np.uint64)
        bad_roots = set(np.flatnonzero(roots != want).tolist())
        good_dir = np.array([d % LEDGER_ROOTS not in bad_roots for d in range(lay.n_dir)])
        bad.extend(int(lay.dir_start + d) for d in np.flatnonzero(~good_dir))
        # ledger pages that the (trusted) directory says are initialised
        dflat = dpages.reshape(-1, 2)[: lay.n_ledger]
        init = ((dflat[:, 0] != 0) | (dflat[:, 1] != 0)) & np.repeat(good_dir, DIR_PER_PAGE)[: lay.n_ledger]
        lpages = np.flatnonzero(init)
        for i in range(0, len(lpages), VERIFY_CHUNK):
            lp = lpages[i:i + VERIFY_CHUNK]
            ent = self.mem.read_private(lay.ledger_start + lp).view(np.uint64).reshape(
                len(lp), ENTRIES_PER_PAGE, 2)
            checked += len(lp)
            pf = (lp.astype(np.uint64)[:, None] * np.uint64(ENTRIES_PER_PAGE)
                  + np.arange(ENTRIES_PER_PAGE, dtype=np.uint64)[None, :])
            acc = np.bitwise_xor.reduce(contrib(self.k1, pf, ent[:, :, 0], ent[:, :, 1]), axis=1)
            ok = (acc == dflat[lp, 0]) & (dflat[lp, 1] == 1)
            bad.extend(int(lay.ledger_start + x) for x in lp[~ok])
            e = ent[ok].reshape(-1, 2)
            pfs = pf[ok].ravel().astype(np.int64)
            written = (e[:, 0] & np.uint64(F_WRITTEN)) != 0
            written &= pfs < lay.npages
            if written.any():
                wp = pfs[written]
                checked += len(wp)
                bad.extend(check_data(wp, e[written, 0], e[written, 1]))
        return VerifyResult(checked, sorted(set(bad)))
