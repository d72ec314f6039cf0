"""Benchmark of the wire codec's Pages fast path: codec overhead per 4 KiB page.

Target (brief): under 1 µs of codec overhead per page for encode + decode + channel MAC of the metadata
(pfns, SEV headers), excluding the hashing of shared-page plaintext, which is inherent (it must be
authenticated, and HMAC-SHA256 over 4 KiB costs what it costs). So the headline figure uses all-private
batches; a mixed batch is printed too, with the shared-page hashing cost shown separately.

Method: a source/destination Connection pair in PRECOPY; each iteration encodes one batch with
`send_pages` (timed), cuts the frame into 64 KiB reads as a socket would deliver it (untimed: that is
the socket's work), and feeds them to the destination with `receive_data` / `next_event` (timed).
Per-page time = time / pages; each case is the best of REPEATS runs. Prints figures; never asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import time

import numpy as np

from sevmigd.wire import NEED_DATA, State
from sevmigd.wire.integrity import FEATURE_GMAC, GmacKey
from sevmigd.wire.limits import PAGE_SIZE, SEV_HDR_SIZE
from sevmigd.wire.testing import pair, sample_hello

# 256 pages = 1 MiB of ciphertext per frame: about what the migration engine sends per batch.
DEFAULT_BATCH = 256
# 64 KiB: a typical socket read; a frame spread over several reads costs one reassembly copy.
READ_SIZE = 65536
# What sevmigd/daemon/channel.py asks of the stream per read (RECEIVE_SIZE there).
DAEMON_READ_SIZE = 256 * 1024


def _time_batches(batch: int, shared: int, iters: int, read_size: int, features=()) -> dict:
    hello = sample_hello(memory_bytes=1 << 34, features=features)
    src, dst = pair(hello=hello, until=State.PRECOPY, features=features)
    npages = hello.memory_bytes // PAGE_SIZE
    rng = np.random.default_rng(1)
    ne = batch - shared
    enc_pfns = rng.choice(npages, size=ne, replace=False).astype(np.uint64)
    shr_pfns = rng.choice(npages, size=shared, replace=False).astype(np.uint64)
    enc_headers = rng.bytes(ne * SEV_HDR_SIZE)
    enc_data = rng.bytes(ne * PAGE_SIZE)
    shr_data = rng.bytes(shared * PAGE_SIZE)
    t_enc = t_dec = 0.0
    nbytes = 0
    for _ in range(iters):
        t0 = time.perf_counter()
        frame = src.send_pages(src.round, enc_pfns, enc_headers, enc_data, shr_pfns, shr_data)
        t1 = time.perf_counter()
        # What the socket hands the receiver: read_size chunks, fresh in cache (not codec work: untimed).
        mv = memoryview(frame)
        chunks = [frame] if read_size >= len(frame) else [bytes(mv[o:o + read_size])
                                                          for o in range(0, len(frame), read_size)]
        t2 = time.perf_counter()
        ev = None
        for c in chunks:
            dst.receive_data(c)
            ev = dst.next_event()
        t3 = time.perf_counter()
        assert ev is not NEED_DATA and ev.npages == batch
        del ev, chunks, mv
        t_enc += t1 - t0
        t_dec += t3 - t2
        nbytes += len(frame)
    pages = batch * iters
    # Inherent: the frame MAC over the shared plaintext, once by the sender and once by the receiver
    # (HMAC-SHA256, or AES-256-GMAC when the mac-aes-gmac feature is negotiated).
    key = b"k" * 32
    gmac = GmacKey(key) if FEATURE_GMAC in features else None
    t0 = time.perf_counter()
    for i in range(iters):
        if gmac is not None:
            h = gmac.start(i)
            h.update(shr_data)
            gmac.finish(h)
        else:
            hmac.new(key, shr_data, hashlib.sha256).digest()
    t_shr = 2 * (time.perf_counter() - t0) if shared else 0.0
    total = t_enc + t_dec
    return {
        "batch_pages": batch, "shared_pages": shared, "iterations": iters, "read_size": read_size,
        "encode_us_per_page": 1e6 * t_enc / pages,
        "decode_us_per_page": 1e6 * t_dec / pages,
        "codec_us_per_page": 1e6 * total / pages,
        "shared_hash_us_per_page": 1e6 * t_shr / pages,
        "codec_excl_shared_hash_us_per_page": 1e6 * (total - t_shr) / pages,
        "throughput_gib_s": nbytes / total / (1 << 30),
    }


# The machine is shared: each case runs REPEATS times and the fastest run is reported (as timeit does),
# which measures the code rather than the neighbours' load.
REPEATS = 5


def _best(batch: int, shared: int, iters: int, read_size: int, features=()) -> dict:
    runs = [_time_batches(batch, shared, iters, read_size, features) for _ in range(REPEATS)]
    return min(runs, key=lambda r: r["codec_excl_shared_hash_us_per_page"])


def run(batch: int = DEFAULT_BATCH, iters: int = 100, read_size: int = READ_SIZE, quick: bool = False) -> dict:
    """Run the wire benchmarks; returns {case: figures} (best of REPEATS runs each; `quick`: a smoke run
    with a tenth of the iterations, figures not comparable)."""
    if quick:
        iters = max(5, iters // 10)
    return {
        "private_only_64k_reads": _best(batch, 0, iters, read_size),
        "private_only_256k_reads": _best(batch, 0, iters, DAEMON_READ_SIZE),
        "private_only_one_read": _best(batch, 0, iters, 1 << 30),
        "mixed_25pct_shared_64k_reads": _best(batch, batch // 4, iters, read_size),
        # what the daemons negotiate: the frame MAC as AES-256-GMAC (PROTOCOL.md §9.6)
        "mixed_25pct_shared_gmac": _best(batch, batch // 4, iters, read_size, (FEATURE_GMAC,)),
        "all_shared_gmac": _best(batch, batch, iters, read_size, (FEATURE_GMAC,)),
        "small_batch_16_64k_reads": _best(16, 0, iters * 4, read_size),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sevmigd.bench.wire", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    res = run(a.batch, a.iters)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'case':30} {'enc µs/pg':>10} {'dec µs/pg':>10} {'codec µs/pg':>12} {'excl shr-hash':>14} {'GiB/s':>7}")
    for name, r in res.items():
        print(f"{name:30} {r['encode_us_per_page']:10.3f} {r['decode_us_per_page']:10.3f} "
              f"{r['codec_us_per_page']:12.3f} {r['codec_excl_shared_hash_us_per_page']:14.3f} "
              f"{r['throughput_gib_s']:7.2f}")
    print("target: codec excl. shared-page hashing < 1.0 µs per 4 KiB page")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
