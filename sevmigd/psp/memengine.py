"""Per-guest memory-encryption engine: what the SEV memory controller does with the guest's VEK.

Owns: the transform between the plaintext a guest sees (C-bit set) and the raw bytes stored in its
"DRAM" buffer, at 16-byte granularity and tweaked by the guest-physical address, plus page-batch forms.
Only `sevmigd.psp` and the guest side of `sevmigd.guest` may hold a MemoryEngine (trust boundary): it is
the VEK. It must never appear in host-side code, a repr, an exception or a log.

Construction (the hardware's algorithm is not part of the SEV API; this one is ours):

    VEK = K1 ‖ K2 (two independent AES-128 keys, 32 bytes from the firmware's RNG)
    for the 16-byte block at physical address a (a ≡ 0 mod 16):
        Δ(a) = AES_K2(LE128(a))
        C    = AES_K1(P ⊕ Δ(a)) ⊕ Δ(a)

Soundness: this is the LRW tweakable block cipher E~(T, P) = E_K1(P ⊕ h(T)) ⊕ h(T) with tweak T = a and
h = AES_K2. Liskov–Rivest–Wagner prove E~ a strong tweakable PRP when h is ε-almost-XOR-universal and
independent of K1 (advantage ≤ q²·ε + the PRP advantage on E_K1). A PRF (AES under a secret independent K2
is a PRP, hence a PRF up to the birthday term) is AXU with ε ≈ 2^-128 for distinct tweaks, so Δ(a) ⊕ Δ(a')
is unpredictable for a ≠ a'. Hence: the same plaintext at two addresses gives unrelated ciphertexts, and
a block moved to another address decrypts to garbage (the hypervisor cannot relocate guest data).

What it leaks, exactly like SEV's own memory encryption (AES with a physical-address tweak, no
freshness): it is deterministic per (VEK, address) — equal plaintext written at the *same* address at two
times gives equal ciphertext, so a host that watches one address learns "unchanged / changed back".
There is no integrity (SEV-SNP's RMP is out of scope): flipping ciphertext gives a random plaintext block.

Why this and not AES-XTS per page (ARCHITECTURE.md first sketched XTS): XTS needs a new cipher context per
tweak (per page), while here Δ for any set of blocks, pages or not contiguous, comes from *one* AES-ECB
call over an address array built with numpy, and the whole batch is two ECB calls and two XORs; it also
makes any 16-aligned sub-range readable and writable without touching the rest of the page.
`sevmigd.bench.psp` measures both (see its output); this construction is the faster one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .status import SevError, SevStatus

#: Guest page size (x86 4 KiB); the unit of page-batch operations and of migration.
PAGE_SIZE = 4096
BLOCK = 16
VEK_SIZE = 32
_BLOCKS_PER_PAGE = PAGE_SIZE // BLOCK
#: Byte offsets of the blocks of one page (int64 to build addresses without overflow tricks).
_PAGE_OFFSETS = np.arange(0, PAGE_SIZE, BLOCK, dtype=np.uint64)


def _check_range(paddr: int, length: int) -> None:
    if paddr < 0 or paddr % BLOCK:
        raise SevError(SevStatus.INVALID_ADDRESS, "address must be 16-byte aligned")
    if length < 0 or length % BLOCK:
        raise SevError(SevStatus.INVALID_LENGTH, "length must be a multiple of 16")


class MemoryEngine:
    """Address-tweaked AES (LRW with an AES mask, see the module docstring) under one guest's VEK."""

    __slots__ = ("_k1_enc", "_k1_dec", "_k2_enc")

    def __init__(self, vek: bytes):
        if len(vek) != VEK_SIZE:
            raise SevError(SevStatus.INVALID_PARAM, "VEK must be 32 bytes (two AES-128 keys)")
        vek = bytes(vek)
        k1, k2 = vek[:16], vek[16:]
        self._k1_enc = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()
        self._k1_dec = Cipher(algorithms.AES(k1), modes.ECB()).decryptor()
        self._k2_enc = Cipher(algorithms.AES(k2), modes.ECB()).encryptor()

    def __repr__(self) -> str:
        return "MemoryEngine(<VEK hidden>)"

    # --- masks --------------------------------------------------------------------------------------
    def _masks_for(self, addrs: np.ndarray) -> bytes:
        """Δ for each block address in `addrs` (uint64 array): AES_K2(LE128(a)) in one ECB call."""
        blk = np.zeros((addrs.size, 2), dtype="<u8")
        blk[:, 0] = addrs.ravel()
        return self._k2_enc.update(blk.tobytes())

    def _masks_range(self, paddr: int, length: int) -> bytes:
        n = length // BLOCK
        addrs = np.arange(n, dtype=np.uint64) * np.uint64(BLOCK) + np.uint64(paddr)
        return self._masks_for(addrs)

    def _masks_pages(self, pfns: np.ndarray) -> bytes:
        addrs = (pfns.astype(np.uint64)[:, None] * np.uint64(PAGE_SIZE)) + _PAGE_OFFSETS[None, :]
        return self._masks_for(addrs)

    def _enc(self, data, masks: bytes) -> bytes:
        d = np.frombuffer(masks, dtype=np.uint64)
        x = np.bitwise_xor(np.frombuffer(data, dtype=np.uint64), d)
        y = np.frombuffer(self._k1_enc.update(x.tobytes()), dtype=np.uint64)
        return np.bitwise_xor(y, d).tobytes()

    def _dec(self, data, masks: bytes) -> bytes:
        d = np.frombuffer(masks, dtype=np.uint64)
        x = np.bitwise_xor(np.frombuffer(data, dtype=np.uint64), d)
        y = np.frombuffer(self._k1_dec.update(x.tobytes()), dtype=np.uint64)
        return np.bitwise_xor(y, d).tobytes()

    # --- pure transforms ----------------------------------------------------------------------------
    def encrypt(self, paddr: int, plaintext) -> bytes:
        """Ciphertext of `plaintext` as stored at physical address `paddr` (16-aligned, len % 16 == 0)."""
        _check_range(paddr, len(plaintext))
        if not len(plaintext):
            return b""
        return self._enc(plaintext, self._masks_range(paddr, len(plaintext)))

    def decrypt(self, paddr: int, ciphertext) -> bytes:
        _check_range(paddr, len(ciphertext))
        if not len(ciphertext):
            return b""
        return self._dec(ciphertext, self._masks_range(paddr, len(ciphertext)))

    # --- on a RAM buffer ----------------------------------------------------------------------------
    @staticmethod
    def _bounds(ram, paddr: int, length: int) -> None:
        if paddr + length > len(ram):
            raise SevError(SevStatus.INVALID_ADDRESS, "range outside guest memory")

    def read(self, ram, paddr: int, length: int) -> bytes:
        """Plaintext of ram[paddr:paddr+length] (what the guest reads with the C-bit set)."""
        _check_range(paddr, length)
        self._bounds(ram, paddr, length)
        if not length:
            return b""
        return self._dec(memoryview(ram)[paddr:paddr + length], self._masks_range(paddr, length))

    def write(self, ram, paddr: int, data) -> None:
        """Encrypt `data` into ram[paddr:...] (what a guest write with the C-bit set stores)."""
        _check_range(paddr, len(data))
        self._bounds(ram, paddr, len(data))
        if not len(data):
            return
        memoryview(ram)[paddr:paddr + len(data)] = self._enc(data, self._masks_range(paddr, len(data)))

    # --- page batches -------------------------------------------------------------------------------
    @staticmethod
    def _pages_view(ram, pfns) -> tuple[np.ndarray, np.ndarray]:
        p = np.asarray(pfns, dtype=np.int64).ravel()
        npages = len(ram) // PAGE_SIZE
        if p.size and (p.min() < 0 or p.max() >= npages):
            raise SevError(SevStatus.INVALID_ADDRESS, "page outside guest memory")
        view = np.frombuffer(ram, dtype=np.uint8, count=npages * PAGE_SIZE).reshape(npages, PAGE_SIZE)
        return view, p

    def read_pages(self, ram, pfns: Sequence[int]) -> bytes:
        """Plaintext of the 4 KiB pages `pfns` (in that order), concatenated."""
        view, p = self._pages_view(ram, pfns)
        if not p.size:
            return b""
        return self._dec(view[p].tobytes(), self._masks_pages(p))

    def write_pages(self, ram, pfns: Sequence[int], data) -> None:
        """Encrypt len(pfns) pages of `data` into RAM at pfn*4096 each (later pfns win on repeats)."""
        view, p = self._pages_view(ram, pfns)
        if len(data) != p.size * PAGE_SIZE:
            raise SevError(SevStatus.INVALID_LENGTH, "data must be len(pfns) * 4096 bytes")
        if not p.size:
            return
        ct = np.frombuffer(self._enc(data, self._masks_pages(p)), dtype=np.uint8).reshape(p.size, PAGE_SIZE)
        if p.size == 1:
            view[p[0]] = ct[0]
        else:
            view[p] = ct

    def encrypt_pages(self, pfns: Sequence[int], plaintext) -> bytes:
        """Pure form of write_pages: ciphertext of pages `pfns` (no RAM)."""
        p = np.asarray(pfns, dtype=np.int64).ravel()
        if len(plaintext) != p.size * PAGE_SIZE:
            raise SevError(SevStatus.INVALID_LENGTH, "data must be len(pfns) * 4096 bytes")
        return self._enc(plaintext, self._masks_pages(p)) if p.size else b""

    def decrypt_pages(self, pfns: Sequence[int], ciphertext) -> bytes:
        p = np.asarray(pfns, dtype=np.int64).ravel()
        if len(ciphertext) != p.size * PAGE_SIZE:
            raise SevError(SevStatus.INVALID_LENGTH, "data must be len(pfns) * 4096 bytes")
        return self._dec(ciphertext, self._masks_pages(p)) if p.size else b""
