"""The guest's self-check ledger, kept inside guest RAM so that it migrates with the guest.

Owns: the ledger layout, per-page entries (a table plus an append-only journal), the accumulators
that protect both, and `verify`. Guest side only (it sees plaintext through the guest's memory
accessor); it must never be imported by host-side code.

Theory of operation
-------------------
Every guest page p has a logical 16-byte entry E_p = (w0, w1):

    w0 = version << 8 | kind << 2 | SHARED << 1 | WRITTEN        w1 = content digest (or 0)

`version` is the global write sequence number at the page's last write, so a stale copy of a page
(older version) never matches. Workload pages have w1 = 0: their content is a pure function of
(key, pfn, version) (`workload_content`), so verify regenerates and compares the whole page and a write
costs no hashing. Agent and image pages carry w1 = keyed BLAKE2b-64(pfn ‖ version ‖ content).
An all-zero entry means "never written": the guest makes no claim about that page (this is what makes
an 8 GiB guest creatable without 8 GiB of work; such pages are not counted in pages_checked).

Where entries live (all private pages):
* the *table*: entry of p at slot p % 256 of table page p // 256;
* the *journal*: 32-byte records (pfn, w0, w1, 0), appended in write order; a record overrides the
  table. Writes append (sequential, one journal page per 128 writes) instead of re-encrypting one
  table page per scattered write: a guest page write costs about one page encryption, and a run step
  dirties ~1/128 extra page per write instead of one extra table page per write. When the journal is
  full, compaction applies it to the table (each table page then absorbs many records at once).

Protection: each table or journal page i has a *directory entry* D_i = (A_i, 1) in a directory page,
A_i = XOR over the page's non-empty slots of a keyed mix of (slot, contents); D_i = (0, 0) marks a
page never initialised (implicitly empty, never read), so table pages are created lazily. Each
directory page d has B_d = XOR of mix(i, D_i) over its entries, and vCPU 0 register lg[d % 64] = XOR of
the B_d mapping to it. Registers migrate with the guest but cannot be rolled back with RAM.
All updates are incremental (XOR out the old contribution, XOR in the new) and start from what DRAM
holds, so damage already present in a page survives later updates (the discrepancy is kept).

Localisation (VerifyResult.mismatches): the kernel state page (register kstate, checked by the kernel);
directory pages whose root fails (exact up to 64 directory pages, i.e. guests up to ~16 GiB; beyond,
every directory page sharing that root); table and journal pages whose A fails; data pages whose
content fails their entry. Data pages are not judged when the claims about them are unknown: those of
a failed table page, and all of them when a journal page failed (then only the journal page is named).

The guest keeps a *mirror* of the logical entries (16 bytes per guest page, lazily backed) so writers
know a page's kind and state without decrypting the table. It is derived state: rebuilt lazily from RAM
after a migration (table page + journal), never trusted by verify, never written back to RAM wholesale.

`mix` is a keyed 64-bit mixer (splitmix64 finaliser rounds with secret keys from the kernel state
page), chosen because it vectorises in numpy; it detects accidental or migration-bug damage with
probability 1 - 2^-64 per check; it is not a cryptographic MAC (the host cannot see its keys, which live
in a private page, but it is not designed against an adversary who can).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .vcpu import LEDGER_ROOTS

from sevmigd.units import PAGE_SIZE
ENTRY_BYTES = 16
ENTRIES_PER_PAGE = PAGE_SIZE // ENTRY_BYTES  # 256 table entries per page
RECORD_WORDS = 4
RECORDS_PER_PAGE = PAGE_SIZE // (8 * RECORD_WORDS)  # 128 journal records per page
DIR_PER_PAGE = PAGE_SIZE // ENTRY_BYTES      # 256

#: Journal size: 1/8 of the table (so a compaction brings ~16 records per table page when writes are
#: uniformly scattered: amortised < 1 us per write), at least 16 pages, at most 1024 pages (4 MiB,
#: 128 Ki records: bounds the time and dirty pages of one compaction).
JOURNAL_MIN_PAGES = 16
JOURNAL_MAX_PAGES = 1024
#: Pages verify / compaction process per batch: 1 MiB, big enough to amortise the engine's per-call
#: cost, small enough to keep memory flat for big guests.
VERIFY_CHUNK = 256

F_WRITTEN = 1
F_SHARED = 2
KIND_SHIFT = 2
KIND_MASK = 3 << KIND_SHIFT
KIND_WORKLOAD = 0
KIND_AGENT = 1
KIND_IMAGE = 2
VERSION_SHIFT = 8

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_U64 = (1 << 64) - 1
_CONTENT_BLOCKS = np.arange(PAGE_SIZE // 16, dtype=np.uint64)[None, :]


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
    m = np.atleast_1d(mix(key, idx, w0, w1))
    m[(np.asarray(w0) == 0) & (np.asarray(w1) == 0)] = 0
    return m


def record_contrib(key: int, slot, rec: np.ndarray) -> np.ndarray:
    """Contribution of journal records rec[..., 4] at journal slots `slot` (0 for empty records)."""
    inner = mix(key ^ 0x5A5A, rec[..., 0], rec[..., 1], rec[..., 2])
    m = np.atleast_1d(mix(key, slot, inner, rec[..., 3]))
    m[~rec.any(axis=-1)] = 0
    return m


def workload_content(key: int, pfns: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """Plaintext of workload pages: (n, 4096) uint8. Words 0, 1: pfn, version; the rest of the page is
    AES-128-ECB (key = LE64(key) twice) over the 255 counter blocks (mix(key, pfn, version), j).

    So every byte of the page depends on (key, pfn, version) (a corrupted byte, another page's content
    (swap) or an older version (stale) all differ from the regenerated page), and the page looks like
    random bytes: nothing compresses or dedups it, like the random guest RAM of QEMU's baseline. One ECB
    call per batch (~2 GB/s) keeps it cheap enough for the workload, verify and the boot-time prefill.
    """
    n = len(pfns)
    p = np.asarray(pfns, dtype=np.uint64)
    v = np.asarray(versions, dtype=np.uint64)
    ctr = np.empty((n, PAGE_SIZE // 16, 2), dtype=np.uint64)
    ctr[:, :, 0] = mix(key, p, v, 1)[:, None]
    ctr[:, :, 1] = _CONTENT_BLOCKS
    buf = bytearray(n * PAGE_SIZE + 16)      # update_into wants block_size - 1 bytes of slack
    if n:
        # a context per call: the content key differs per guest, and contexts must not be shared
        # between the vCPU loop and a launch in a worker thread
        enc = Cipher(algorithms.AES((int(key) & _U64).to_bytes(8, "little") * 2), modes.ECB()).encryptor()
        enc.update_into(memoryview(ctr).cast("B"), buf)
    out = np.frombuffer(buf, dtype=np.uint64, count=n * (PAGE_SIZE // 8)).reshape(n, PAGE_SIZE // 16, 2)
    out[:, 0, 0] = p
    out[:, 0, 1] = v
    return out.view(np.uint8).reshape(n, PAGE_SIZE)


def content_digest(key: bytes, pfn: int, version: int, content) -> int:
    """Keyed BLAKE2b-64 over pfn ‖ version ‖ content (agent and image pages)."""
    h = hashlib.blake2b(key=key, digest_size=8)
    h.update(pfn.to_bytes(8, "little") + version.to_bytes(8, "little"))
    h.update(content)
    return int.from_bytes(h.digest(), "little")


def _last_wins(pfns: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of each pfn, sorted by pfn."""
    rev = pfns[::-1]
    _, idx = np.unique(rev, return_index=True)
    return len(pfns) - 1 - idx


@dataclass(frozen=True)
class Layout:
    """Where the kernel keeps its metadata: [image][kernel state][directory][table][journal][pool]."""

    npages: int
    image_pages: int
    kstate_pfn: int
    dir_start: int
    n_dir: int
    ledger_start: int      # first table page
    n_ledger: int          # table pages
    journal_start: int
    n_journal: int
    pool_start: int

    @classmethod
    def compute(cls, npages: int, image_pages: int) -> "Layout":
        n_ledger = -(-npages // ENTRIES_PER_PAGE)
        n_journal = min(JOURNAL_MAX_PAGES, max(JOURNAL_MIN_PAGES, n_ledger // 8))
        n_dir = -(-(n_ledger + n_journal) // DIR_PER_PAGE)
        kstate = image_pages
        dir_start = kstate + 1
        ledger_start = dir_start + n_dir
        journal_start = ledger_start + n_ledger
        pool_start = journal_start + n_journal
        if pool_start >= npages:
            raise ValueError("guest memory too small for the image plus the kernel's metadata")
        return cls(npages, image_pages, kstate, dir_start, n_dir, ledger_start, n_ledger, journal_start,
                   n_journal, pool_start)

    @property
    def journal_capacity(self) -> int:
        return self.n_journal * RECORDS_PER_PAGE

    def is_metadata(self, pfns: np.ndarray) -> np.ndarray:
        return (pfns >= self.kstate_pfn) & (pfns < self.pool_start)


@dataclass
class VerifyResult:
    pages_checked: int
    mismatches: list[int]


class LedgerTx:
    """Logical entries of a set of pages, for one batched update (see Ledger.begin)."""

    def __init__(self, ledger: "Ledger", pfns: np.ndarray):
        self.ledger = ledger
        self.pfns = pfns                                   # sorted unique
        ledger._load(np.unique(pfns // ENTRIES_PER_PAGE))
        ent = ledger.mirror[pfns]
        self.w0 = ent[:, 0].copy()
        self.w1 = ent[:, 1].copy()

    def commit(self, mask: np.ndarray, new_w0: np.ndarray, new_w1: np.ndarray) -> None:
        """Record new entries for pfns[mask] (journal append, mirror update)."""
        sel = np.flatnonzero(mask)
        if not len(sel):
            return
        new_w0 = np.asarray(new_w0, dtype=np.uint64)
        new_w1 = np.asarray(new_w1, dtype=np.uint64)
        pf = self.pfns[sel]
        self.ledger.append(pf, new_w0, new_w1)
        self.w0[sel] = new_w0
        self.w1[sel] = new_w1


class Ledger:
    """Guest-side ledger operations. `mem` is the guest's memory accessor (kernel.GuestMemoryAccess),
    `regs` vCPU 0's register dict (roots lg0..lg63, journal length jlen), k1/k2 accumulator keys."""

    def __init__(self, layout: Layout, mem, regs: dict, k1: int, k2: int):
        self.layout, self.mem, self.regs, self.k1, self.k2 = layout, mem, regs, k1, k2
        self.mirror = self._new_mirror()
        self.valid = np.zeros(layout.n_ledger, dtype=bool)
        self._jrec: np.ndarray | None = None     # journal records found in RAM at resume
        self._journal_damaged = False            # compaction refused once: do not retry every step

    # ------------------------------------------------------------------ set-up
    def format(self) -> None:
        """Fresh ledger: zeroed directory pages (every table/journal page uninitialised), roots 0."""
        lay = self.layout
        self.mem.write_private(np.arange(lay.dir_start, lay.dir_start + lay.n_dir),
                               bytes(lay.n_dir * PAGE_SIZE))
        for i in range(LEDGER_ROOTS):
            self.regs[f"lg{i}"] = 0
        self.regs["jlen"] = 0
        self.mirror = self._new_mirror()   # fresh calloc'd zeros: writing zeros would make all of it resident
        self.valid[:] = True
        self._jrec = np.zeros((0, RECORD_WORDS), dtype=np.uint64)

    def _new_mirror(self) -> np.ndarray:
        # np.zeros is calloc-backed: an 8 GiB guest's 32 MiB mirror costs nothing until touched
        return np.zeros((self.layout.n_ledger * ENTRIES_PER_PAGE, 2), dtype=np.uint64)

    def drop_mirror(self) -> None:
        """Forget the mirror; it is rebuilt lazily from RAM (table page + journal) exactly as after a
        migration. After writing every page (GuestKernel.prefill) this returns its memory, 16 bytes per
        guest page, so what stays resident is what the running workload touches."""
        self.mirror = self._new_mirror()
        self.valid[:] = False
        self._jrec = None

    def begin(self, pfns) -> LedgerTx:
        p = np.unique(np.asarray(pfns, dtype=np.int64))
        return LedgerTx(self, p)

    # ------------------------------------------------------------------ RAM access helpers
    def _read_dir(self, idx: np.ndarray):
        """Directory pages holding entries `idx` -> (page numbers, their (n, 256, 2) contents)."""
        dps = np.unique(idx // DIR_PER_PAGE)
        pages = self.mem.read_private(self.layout.dir_start + dps).view(np.uint64).reshape(
            len(dps), DIR_PER_PAGE, 2).copy()
        return dps, pages

    def _update_dir(self, dps, dpages, idx: np.ndarray, new: np.ndarray) -> None:
        """Set directory entries idx (sorted unique) to new (n, 2); update roots; write dir pages."""
        di = np.searchsorted(dps, idx // DIR_PER_PAGE)
        de = idx % DIR_PER_PAGE
        old = dpages[di, de].copy()
        dpages[di, de] = new
        ia = idx.astype(np.uint64)
        delta = contrib(self.k2, ia, old[:, 0], old[:, 1]) ^ contrib(self.k2, ia, new[:, 0], new[:, 1])
        starts = np.flatnonzero(np.r_[True, di[1:] != di[:-1]])
        for d, x in zip(di[starts], np.bitwise_xor.reduceat(delta, starts)):
            r = f"lg{int(dps[d]) % LEDGER_ROOTS}"
            self.regs[r] = int(self.regs[r]) ^ int(x)
        touched = np.unique(di)
        self.mem.write_private(self.layout.dir_start + dps[touched], dpages[touched].tobytes())

    def _journal_records(self) -> np.ndarray:
        """The journal's records as RAM holds them, (jlen, 4) u64."""
        lay, jlen = self.layout, int(self.regs["jlen"])
        if not jlen:
            return np.zeros((0, RECORD_WORDS), dtype=np.uint64)
        jp = -(-min(jlen, lay.journal_capacity) // RECORDS_PER_PAGE)
        raw = self.mem.read_private(lay.journal_start + np.arange(jp)).view(np.uint64)
        return raw.reshape(-1, RECORD_WORDS)[:jlen].copy()

    def _load(self, lpages: np.ndarray) -> None:
        """Make the mirror valid for table pages `lpages` (after a migration: table page + journal)."""
        need = lpages[~self.valid[lpages]]
        if not len(need):
            return
        if self._jrec is None:
            self._jrec = self._journal_records()
        lay = self.layout
        dps, dpages = self._read_dir(need)
        dent = dpages[np.searchsorted(dps, need // DIR_PER_PAGE), need % DIR_PER_PAGE]
        init = need[(dent[:, 0] != 0) | (dent[:, 1] != 0)]
        m = self.mirror.reshape(lay.n_ledger, ENTRIES_PER_PAGE, 2)
        m[need] = 0
        if len(init):
            m[init] = self.mem.read_private(lay.ledger_start + init).view(np.uint64).reshape(
                len(init), ENTRIES_PER_PAGE, 2)
        jr = self._jrec
        if len(jr):
            jp = jr[:, 0].astype(np.int64)
            ok = (jp >= 0) & (jp < lay.npages)
            sel = np.flatnonzero(ok)
            sel = sel[np.isin(jp[sel] // ENTRIES_PER_PAGE, need)]
            if len(sel):
                last = sel[_last_wins(jp[sel])]
                self.mirror[jp[last]] = jr[last, 1:3]
        self.valid[need] = True

    # ------------------------------------------------------------------ writes
    def append(self, pfns: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> None:
        """Record new entries (pfns unique). Journal append, or straight to the table when the batch is
        bigger than the journal or the journal cannot be compacted (damaged: evidence is kept)."""
        lay = self.layout
        self.mirror[pfns, 0] = w0
        self.mirror[pfns, 1] = w1
        n = len(pfns)
        cap = lay.journal_capacity
        jlen = int(self.regs["jlen"])
        if jlen + n > cap:
            if self._journal_damaged or not self.compact():
                # keep the damaged journal as evidence (verify names it); write to the table instead
                self._journal_damaged = True
                self._apply_to_table(pfns, w0, w1)
                return
            jlen = 0
        if n > cap:
            self._apply_to_table(pfns, w0, w1)
            return
        slots = jlen + np.arange(n)
        jpages = np.unique(slots // RECORDS_PER_PAGE)
        buf = np.zeros((len(jpages), RECORDS_PER_PAGE, RECORD_WORDS), dtype=np.uint64)
        if jlen % RECORDS_PER_PAGE:
            # the tail page already holds records: start from what RAM holds (keeps any damage visible)
            buf[0] = self.mem.read_private(np.array([lay.journal_start + jpages[0]])).view(
                np.uint64).reshape(RECORDS_PER_PAGE, RECORD_WORDS)
        rec = np.zeros((n, RECORD_WORDS), dtype=np.uint64)
        rec[:, 0] = pfns
        rec[:, 1] = w0
        rec[:, 2] = w1
        bi = np.searchsorted(jpages, slots // RECORDS_PER_PAGE)
        buf[bi, slots % RECORDS_PER_PAGE] = rec
        delta = record_contrib(self.k1, slots.astype(np.uint64), rec)
        starts = np.flatnonzero(np.r_[True, bi[1:] != bi[:-1]])
        pdelta = np.bitwise_xor.reduceat(delta, starts)
        idx = lay.n_ledger + jpages                       # directory index of these journal pages
        dps, dpages = self._read_dir(idx)
        cur = dpages[np.searchsorted(dps, idx // DIR_PER_PAGE), idx % DIR_PER_PAGE]
        new = cur.copy()
        new[:, 0] ^= pdelta
        new[:, 1] = 1
        self.mem.write_private(lay.journal_start + jpages, buf.tobytes())
        self._update_dir(dps, dpages, idx, new)
        self.regs["jlen"] = jlen + n

    def compact(self) -> bool:
        """Apply the journal to the table and empty it. Refuses (False) when a journal page fails its
        check: compacting garbage would erase the evidence verify needs."""
        lay = self.layout
        jlen = int(self.regs["jlen"])
        if not jlen:
            return True
        jp = np.arange(-(-jlen // RECORDS_PER_PAGE))
        idx = lay.n_ledger + jp
        dps, dpages = self._read_dir(idx)
        dent = dpages[np.searchsorted(dps, idx // DIR_PER_PAGE), idx % DIR_PER_PAGE]
        recs = self._journal_records()
        full = np.zeros((len(jp) * RECORDS_PER_PAGE, RECORD_WORDS), dtype=np.uint64)
        full[:jlen] = recs
        acc = np.bitwise_xor.reduce(record_contrib(
            self.k1, np.arange(len(full), dtype=np.uint64), full).reshape(len(jp), RECORDS_PER_PAGE), axis=1)
        if not (np.array_equal(acc, dent[:, 0]) and (dent[:, 1] == 1).all()):
            return False
        pf = recs[:, 0].astype(np.int64)
        if len(pf) and (pf.min() < 0 or pf.max() >= lay.npages):
            return False
        last = _last_wins(pf)
        self._apply_to_table(pf[last], recs[last, 1], recs[last, 2])
        dps, dpages = self._read_dir(idx)
        self._update_dir(dps, dpages, idx, np.zeros((len(idx), 2), dtype=np.uint64))
        self.regs["jlen"] = 0
        self._jrec = np.zeros((0, RECORD_WORDS), dtype=np.uint64)
        return True

    def _apply_to_table(self, pfns: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> None:
        """Write entries into table pages (pfns sorted unique), starting from what RAM holds."""
        lay = self.layout
        lof = pfns // ENTRIES_PER_PAGE
        ul = np.unique(lof)
        for c in range(0, len(ul), VERIFY_CHUNK):
            chunk = ul[c:c + VERIFY_CHUNK]
            lo, hi = np.searchsorted(lof, [chunk[0], chunk[-1] + 1])
            p, a, b = pfns[lo:hi], w0[lo:hi], w1[lo:hi]
            dps, dpages = self._read_dir(chunk)
            dent = dpages[np.searchsorted(dps, chunk // DIR_PER_PAGE), chunk % DIR_PER_PAGE]
            init = (dent[:, 0] != 0) | (dent[:, 1] != 0)
            tab = np.zeros((len(chunk), ENTRIES_PER_PAGE, 2), dtype=np.uint64)
            if init.any():
                tab[init] = self.mem.read_private(lay.ledger_start + chunk[init]).view(np.uint64).reshape(
                    int(init.sum()), ENTRIES_PER_PAGE, 2)
            li = np.searchsorted(chunk, p // ENTRIES_PER_PAGE)
            ei = p % ENTRIES_PER_PAGE
            old = tab[li, ei]
            pu = p.astype(np.uint64)
            delta = contrib(self.k1, pu, old[:, 0], old[:, 1]) ^ contrib(self.k1, pu, a, b)
            tab[li, ei, 0] = a
            tab[li, ei, 1] = b
            starts = np.flatnonzero(np.r_[True, li[1:] != li[:-1]])
            new = dent.copy()
            new[li[starts], 0] ^= np.bitwise_xor.reduceat(delta, starts)
            new[:, 1] = 1
            self.mem.write_private(lay.ledger_start + chunk, tab.tobytes())
            self._update_dir(dps, dpages, chunk, new)

    # ------------------------------------------------------------------ verify
    def verify(self, check_data) -> VerifyResult:
        """Check directory pages against the roots, table and journal pages against the directory,
        and (through `check_data(pfns, w0, w1) -> bad pfn list`) every written page against its
        logical entry. Reads RAM only; the mirror is not trusted."""
        lay = self.layout
        bad: list[int] = []
        checked = 0
        n_idx = lay.n_ledger + lay.n_journal
        dpages = self.mem.read_private(np.arange(lay.dir_start, lay.dir_start + lay.n_dir)).view(
            np.uint64).reshape(lay.n_dir, DIR_PER_PAGE, 2)
        checked += lay.n_dir
        d_idx = (np.arange(lay.n_dir, dtype=np.uint64)[:, None] * np.uint64(DIR_PER_PAGE)
                 + np.arange(DIR_PER_PAGE, dtype=np.uint64)[None, :])
        b = np.bitwise_xor.reduce(contrib(self.k2, d_idx.ravel(), dpages[:, :, 0].ravel(),
                                          dpages[:, :, 1].ravel()).reshape(lay.n_dir, DIR_PER_PAGE), axis=1)
        roots = np.zeros(LEDGER_ROOTS, dtype=np.uint64)
        np.bitwise_xor.at(roots, np.arange(lay.n_dir) % LEDGER_ROOTS, b)
        want = np.array([self.regs[f"lg{i}"] for i in range(LEDGER_ROOTS)], dtype=np.uint64)
        bad_roots = set(np.flatnonzero(roots != want).tolist())
        good_dir = np.array([d % LEDGER_ROOTS not in bad_roots for d in range(lay.n_dir)])
        bad.extend(int(lay.dir_start + d) for d in np.flatnonzero(~good_dir))
        dflat = dpages.reshape(-1, 2)[:n_idx]
        trusted = np.repeat(good_dir, DIR_PER_PAGE)[:n_idx]
        init = ((dflat[:, 0] != 0) | (dflat[:, 1] != 0)) & trusted

        # journal: every initialised journal page must match its accumulator
        jlen = int(self.regs["jlen"])
        jp_init = np.flatnonzero(init[lay.n_ledger:])
        journal_ok = bool(good_dir.all())
        jrecs = np.zeros((0, RECORD_WORDS), dtype=np.uint64)
        if len(jp_init):
            raw = self.mem.read_private(lay.journal_start + jp_init).view(np.uint64).reshape(
                len(jp_init), RECORDS_PER_PAGE, RECORD_WORDS)
            checked += len(jp_init)
            slots = (jp_init.astype(np.uint64)[:, None] * np.uint64(RECORDS_PER_PAGE)
                     + np.arange(RECORDS_PER_PAGE, dtype=np.uint64)[None, :])
            acc = np.bitwise_xor.reduce(record_contrib(self.k1, slots.ravel(), raw.reshape(-1, RECORD_WORDS))
                                        .reshape(len(jp_init), RECORDS_PER_PAGE), axis=1)
            dj = dflat[lay.n_ledger + jp_init]
            ok = (acc == dj[:, 0]) & (dj[:, 1] == 1)
            bad.extend(int(lay.journal_start + j) for j in jp_init[~ok])
            expected_pages = -(-jlen // RECORDS_PER_PAGE)
            if not ok.all() or not np.array_equal(jp_init, np.arange(expected_pages)):
                journal_ok = False
            else:
                jrecs = raw.reshape(-1, RECORD_WORDS)[:jlen]
        elif jlen:
            journal_ok = False
        if not journal_ok:
            # claims about data pages are unknown: name only the damaged metadata
            checked += self._check_table(init, dflat, bad, None)
            return VerifyResult(checked, sorted(set(bad)) or [int(lay.journal_start)])

        jpf = jrecs[:, 0].astype(np.int64)
        if len(jpf) and (jpf.min() < 0 or jpf.max() >= lay.npages):
            bad.append(int(lay.journal_start))
            return VerifyResult(checked, sorted(set(bad)))
        last = _last_wins(jpf) if len(jpf) else np.zeros(0, np.int64)
        jpf, jw = jpf[last], jrecs[last, 1:3]
        bad_tab: list[int] = []
        checked += self._check_table(init, dflat, bad_tab, (jpf, jw, check_data, bad))
        bad.extend(bad_tab)
        return VerifyResult(checked + self._n_checked, sorted(set(bad)))

    def _check_table(self, init, dflat, bad_tab, data) -> int:
        """Check initialised table pages; with `data`, also every written page (logical entries)."""
        lay = self.layout
        self._n_checked = 0
        tp = np.flatnonzero(init[:lay.n_ledger])
        failed = np.zeros(lay.n_ledger, dtype=bool)
        checked = 0
        jpf = jw = None
        if data is not None:
            jpf, jw, check_data, out = data
            jl = jpf // ENTRIES_PER_PAGE
            done = np.zeros(len(jpf), dtype=bool)
        for i in range(0, len(tp), VERIFY_CHUNK):
            lp = tp[i:i + VERIFY_CHUNK]
            ent = self.mem.read_private(lay.ledger_start + lp).view(np.uint64).reshape(
                len(lp), ENTRIES_PER_PAGE, 2).copy()
            checked += len(lp)
            pf = (lp.astype(np.uint64)[:, None] * np.uint64(ENTRIES_PER_PAGE)
                  + np.arange(ENTRIES_PER_PAGE, dtype=np.uint64)[None, :])
            acc = np.bitwise_xor.reduce(contrib(self.k1, pf.ravel(), ent[:, :, 0].ravel(), ent[:, :, 1].ravel())
                                        .reshape(len(lp), ENTRIES_PER_PAGE), axis=1)
            ok = (acc == dflat[lp, 0]) & (dflat[lp, 1] == 1)
            failed[lp[~ok]] = True
            if bad_tab is not None:
                bad_tab.extend(int(lay.ledger_start + x) for x in lp[~ok])
            if data is None:
                continue
            # overlay journal records for these table pages, then check the good pages' data
            sel = np.flatnonzero(np.isin(jl, lp))
            if len(sel):
                li = np.searchsorted(lp, jl[sel])
                ent[li, jpf[sel] % ENTRIES_PER_PAGE] = jw[sel]
                done[sel] = True
            e = ent[ok].reshape(-1, 2)
            pfs = pf[ok].ravel().astype(np.int64)
            self._check_entries(pfs, e, check_data, out)
        if data is not None:
            # journal records whose table page was never initialised
            rest = np.flatnonzero(~done & ~failed[jl])
            if len(rest):
                self._check_entries(jpf[rest], jw[rest], check_data, out)
        return checked

    def _check_entries(self, pfs, e, check_data, out) -> None:
        written = ((e[:, 0] & np.uint64(F_WRITTEN)) != 0) & (pfs < self.layout.npages)
        if written.any():
            wp = pfs[written]
            self._n_checked += len(wp)
            out.extend(check_data(wp, e[written, 0], e[written, 1]))
