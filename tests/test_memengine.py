"""Memory-encryption engine (sevmigd.psp.memengine): the documented construction, address tweak at
16-byte granularity, determinism, sub-range access, page batches equal to single operations."""

from __future__ import annotations

import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmigd.psp.memengine import PAGE_SIZE, MemoryEngine
from sevmigd.psp.status import SevError, SevStatus

VEK = bytes(range(32))


def _reference_encrypt(vek: bytes, paddr: int, pt: bytes) -> bytes:
    """The module docstring's construction, block by block, straight from AES."""
    k1 = Cipher(algorithms.AES(vek[:16]), modes.ECB())
    k2 = Cipher(algorithms.AES(vek[16:]), modes.ECB())
    out = b""
    for off in range(0, len(pt), 16):
        a = paddr + off
        delta = k2.encryptor().update(a.to_bytes(16, "little"))
        x = bytes(p ^ d for p, d in zip(pt[off:off + 16], delta))
        y = k1.encryptor().update(x)
        out += bytes(c ^ d for c, d in zip(y, delta))
    return out


def test_matches_documented_construction():
    pt = bytes(range(256)) * 2
    for paddr in (0, 16, 4096 * 7 + 48, (1 << 40) + 16):
        assert MemoryEngine(VEK).encrypt(paddr, pt) == _reference_encrypt(VEK, paddr, pt)


def test_same_plaintext_two_addresses_differ_same_address_is_deterministic():
    e = MemoryEngine(VEK)
    block = b"A" * 16
    assert e.encrypt(0, block) != e.encrypt(16, block)
    assert e.encrypt(0, block) != e.encrypt(4096, block)
    assert e.encrypt(32, block) == MemoryEngine(VEK).encrypt(32, block)
    # Within one encryption the repeated plaintext blocks all differ (tweak per 16 bytes).
    ct = e.encrypt(0, block * 256)
    assert len({ct[i:i + 16] for i in range(0, 4096, 16)}) == 256


def test_other_vek_gives_other_ciphertext():
    assert MemoryEngine(VEK).encrypt(0, bytes(64)) != MemoryEngine(bytes(32)).encrypt(0, bytes(64))


def test_moved_ciphertext_does_not_decrypt():
    e = MemoryEngine(VEK)
    ct = e.encrypt(4096, b"secret-page-data" * 4)
    assert e.decrypt(8192, ct) != b"secret-page-data" * 4
    assert e.decrypt(4096, ct) == b"secret-page-data" * 4


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_aligned_subrange_of_a_write_reads_back(data):
    e = MemoryEngine(VEK)
    ram = bytearray(4 * PAGE_SIZE)
    start = data.draw(st.integers(0, 4 * PAGE_SIZE // 16 - 1)) * 16
    length = data.draw(st.integers(1, (4 * PAGE_SIZE - start) // 16)) * 16
    payload = data.draw(st.binary(min_size=length, max_size=length))
    e.write(ram, start, payload)
    assert bytes(ram[start:start + length]) == e.encrypt(start, payload)
    sub_start = data.draw(st.integers(0, length // 16 - 1)) * 16
    sub_len = data.draw(st.integers(1, (length - sub_start) // 16)) * 16
    assert e.read(ram, start + sub_start, sub_len) == payload[sub_start:sub_start + sub_len]


def test_page_batches_equal_single_operations():
    rnd = random.Random(3)
    e = MemoryEngine(VEK)
    ram_a, ram_b = bytearray(64 * PAGE_SIZE), bytearray(64 * PAGE_SIZE)
    pfns = [5, 0, 63, 17, 18, 40] + list(range(20, 40))   # > one 16-page chunk, unordered
    data = rnd.randbytes(len(pfns) * PAGE_SIZE)
    e.write_pages(ram_a, pfns, data)
    for i, p in enumerate(pfns):
        e.write(ram_b, p * PAGE_SIZE, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
    assert ram_a == ram_b
    assert e.read_pages(ram_a, pfns) == data
    assert e.read_pages(ram_a, np.array(pfns[::-1])) == b"".join(
        data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(len(pfns) - 1, -1, -1))
    assert e.encrypt_pages(pfns, data) == b"".join(bytes(ram_a[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]) for p in pfns)
    assert e.decrypt_pages(pfns, e.encrypt_pages(pfns, data)) == data


def test_single_page_batch_and_empty_batch():
    e = MemoryEngine(VEK)
    ram = bytearray(4 * PAGE_SIZE)
    e.write_pages(ram, [2], b"x" * PAGE_SIZE)
    assert e.read(ram, 2 * PAGE_SIZE, PAGE_SIZE) == b"x" * PAGE_SIZE
    assert e.read_pages(ram, [2]) == b"x" * PAGE_SIZE
    assert e.read_pages(ram, []) == b""
    e.write_pages(ram, [], b"")


def test_works_on_memoryview_and_ram_holds_ciphertext():
    e = MemoryEngine(VEK)
    backing = bytearray(2 * PAGE_SIZE)
    e.write(memoryview(backing), 16, b"plaintext-secret")
    assert b"plaintext-secret" not in backing
    assert e.read(memoryview(backing), 16, 16) == b"plaintext-secret"


@pytest.mark.parametrize("call, status", [
    (lambda e, ram: e.encrypt(8, bytes(16)), SevStatus.INVALID_ADDRESS),
    (lambda e, ram: e.decrypt(0, bytes(15)), SevStatus.INVALID_LENGTH),
    (lambda e, ram: e.read(ram, 2 * PAGE_SIZE, 16), SevStatus.INVALID_ADDRESS),
    (lambda e, ram: e.write(ram, 2 * PAGE_SIZE - 16, bytes(32)), SevStatus.INVALID_ADDRESS),
    (lambda e, ram: e.read_pages(ram, [0, 2]), SevStatus.INVALID_ADDRESS),
    (lambda e, ram: e.read_pages(ram, [-1]), SevStatus.INVALID_ADDRESS),
    (lambda e, ram: e.write_pages(ram, [0, 1], bytes(PAGE_SIZE)), SevStatus.INVALID_LENGTH),
])
def test_bad_ranges_are_typed_errors(call, status):
    with pytest.raises(SevError) as ei:
        call(MemoryEngine(VEK), bytearray(2 * PAGE_SIZE))
    assert ei.value.status == status


def test_vek_size_and_repr():
    with pytest.raises(SevError):
        MemoryEngine(bytes(16))
    r = repr(MemoryEngine(VEK))
    assert VEK.hex()[:8] not in r and "hidden" in r


def test_one_engine_used_from_several_threads():
    """The daemon runs PSP commands in a worker thread while the guest's vCPU loop uses the same engine:
    concurrent use must neither raise (cryptography contexts refuse concurrent borrows) nor corrupt."""
    import threading

    e = MemoryEngine(VEK)
    rams = [bytearray(256 * PAGE_SIZE) for _ in range(3)]
    data = random.Random(9).randbytes(256 * PAGE_SIZE)
    errors = []

    def work(ram):
        try:
            for _ in range(10):
                e.write_pages(ram, list(range(256)), data)
                assert e.read_pages(ram, list(range(256))) == data
                e.write(ram, 0, data)                       # 1 MiB in one call: long OpenSSL calls
                assert e.read(ram, 0, len(data)) == data
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(r,)) for r in rams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_read_pages_into_equals_single_reads_across_gather_chunks():
    """Scattered batches are gathered a chunk at a time: many chunks, repeats, one run, into a buffer."""
    rnd = random.Random(5)
    e = MemoryEngine(VEK)
    ram = bytearray(rnd.randbytes(600 * PAGE_SIZE))
    scattered = rnd.sample(range(600), 300) + [7, 7]
    for pfns in (scattered, list(range(100, 400))):
        want = b"".join(e.read(ram, p * PAGE_SIZE, PAGE_SIZE) for p in pfns)
        assert e.read_pages(ram, pfns) == want
        out = bytearray(len(pfns) * PAGE_SIZE)
        e.read_pages_into(ram, np.array(pfns), out)
        assert out == want
    with pytest.raises(SevError) as ei:
        e.read_pages_into(ram, [1, 2], bytearray(PAGE_SIZE))
    assert ei.value.status == SevStatus.INVALID_LENGTH
