"""The optional compiled page loop of SEND/RECEIVE_UPDATE_DATA, and the PSP's parallel crypto engines.

Owns: whether the compiled module `sevmigd.psp._accel` (psp/_accel.c, built by `pip install -e .` when a C
compiler and OpenSSL's headers are there) is used, and how one batch command is split into page ranges
that run on several threads at once.

Why it exists (issue 16): the pure-Python batch reached 8.4 µs per page against a 6.1 µs crypto floor, and
two threads ran *slower* than one (0.81x / 0.71x), because the Python between the crypto calls holds the
GIL. The compiled loop does a whole batch in one call with the GIL released: memory-engine decrypt (or
encrypt), AES-128-CTR under the TEK and HMAC-SHA256 under the TIK per page, exactly the bytes of the pure
path (tests/test_psp_accel.py holds the two byte-identical, golden vectors included).

Which path runs:
* the compiled one when it was built, unless the environment says `SEVMIGD_PSP_PURE=1` (tests and A/B
  benchmarks; the daemon reads it at start) or the firmware is built with `accel=False`;
* otherwise the pure-Python one (crypto.py + memengine.py). `describe()` says which, and why.

Parallel engines (`workers` > 1): the emulated PSP stays one device that runs one command at a time (the
daemon's PspRunner serialises commands). Inside one SEND/RECEIVE_UPDATE_DATA batch, like a PSP that feeds
its CCP's several queues, the pages are split into contiguous ranges, one per worker; the calling thread
runs the first range, a small process-wide pool the others, and the command returns when all are done.
The command's result is the same as one range after the other:
* SEND: each range writes its own slice of the headers and the ciphertext; IVs were drawn before.
* RECEIVE: pages are written only after every MAC before them verified. The ranges first verify in
  parallel (all MACs computed in full); then the pages before the first bad packet are decrypted and
  written, again in parallel. When a page number repeats in the batch ("later packets win"), the ranges
  could race on it, so such a batch runs in one range.

Must never: hold a key past the call (the C side cleanses its contexts), run with the pure path's
semantics differing (the tests compare both), or let a pool thread outlive an error silently (`result()`
re-raises in the caller).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .crypto import HEADER_SIZE, _uninit
from sevmigd.units import PAGE_SIZE

try:
    from . import _accel
except ImportError:          # not built (no compiler / no OpenSSL headers at install): pure-Python path
    _accel = None

#: Environment variable that forces the pure-Python path ("1"), e.g. for A/B benchmarks.
ENV_PURE = "SEVMIGD_PSP_PURE"
AVAILABLE = _accel is not None
#: A range smaller than this is not worth a thread hand-off (~20-50 µs against ~3 µs of crypto per page).
MIN_RANGE_PAGES = 32

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def forced_pure() -> bool:
    return os.environ.get(ENV_PURE, "").strip() not in ("", "0")


def enabled() -> bool:
    """True when the compiled path is built and not switched off by SEVMIGD_PSP_PURE."""
    return AVAILABLE and not forced_pure()


def describe(active: bool | None = None) -> str:
    """One line saying which page path runs and why (for logs and benchmark reports)."""
    if active is None:
        active = enabled()
    if active:
        return f"compiled (sevmigd.psp._accel, {_accel.openssl_version})"
    if AVAILABLE:
        return f"pure-Python ({ENV_PURE} set or accel=False)"
    return "pure-Python (the compiled accelerator was not built: no C compiler or OpenSSL headers at install)"


def _executor(extra: int) -> ThreadPoolExecutor:
    """The process-wide pool of the PSP's extra engines, grown to `extra` threads on demand."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < extra:
            # A bigger pool replaces a smaller one; the old one is left to idle (not shut down: another
            # thread may be submitting to it right now). Sizes only grow, so this happens once or twice.
            _pool = ThreadPoolExecutor(max_workers=extra, thread_name_prefix="psp-engine")
            _pool_size = extra
        return _pool


def ranges(n: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) page ranges, at most `workers` of them and none under MIN_RANGE_PAGES (except a
    whole batch smaller than that), contiguous and in order."""
    k = max(1, min(workers, n // MIN_RANGE_PAGES))
    if n <= 0:
        return []
    step, extra = divmod(n, k)
    out, s = [], 0
    for i in range(k):
        e = s + step + (1 if i < extra else 0)
        out.append((s, e))
        s = e
    return out


def _parallel(calls: list) -> list:
    """Run zero-argument callables: the first on this thread, the rest on the pool; results in order."""
    if len(calls) == 1:
        return [calls[0]()]
    pool = _executor(len(calls) - 1)
    futs = [pool.submit(c) for c in calls[1:]]
    first_exc = None
    try:
        first = calls[0]()
    except BaseException as exc:      # still wait for the others: they write into our buffers
        first_exc = exc
    rest = [f.result() for f in futs] if first_exc is None else [f.exception() for f in futs]
    if first_exc is not None:
        raise first_exc
    return [first, *rest]


def _pfns(pfns) -> np.ndarray:
    return np.ascontiguousarray(pfns, dtype=np.int64)


def send_pages(vek: bytes, tek: bytes, tik: bytes, ctx: int, ram, pfns, ivs: bytes, workers: int = 1):
    """SEND_UPDATE_DATA of whole pages `pfns` (each inside `ram`, checked by the caller) with IV i for
    page i -> (headers bytes, ciphertext buffer), byte-identical to the pure batch."""
    p = _pfns(pfns)
    n = p.size
    headers = bytearray(n * HEADER_SIZE)
    data = _uninit(n * PAGE_SIZE)
    hv = memoryview(headers)
    iv = memoryview(ivs)

    def job(s: int, e: int):
        return lambda: _accel.send_pages(vek, tek, tik, ctx, ram, p[s:e], iv[16 * s:16 * e],
                                         hv[HEADER_SIZE * s:HEADER_SIZE * e], data[PAGE_SIZE * s:PAGE_SIZE * e])

    _parallel([job(s, e) for s, e in ranges(n, workers)])
    return bytes(headers), data


def receive_pages(vek: bytes, tek: bytes, tik: bytes, ctx: int, ram, pfns, headers, data, workers: int = 1) -> int:
    """RECEIVE_UPDATE_DATA of whole pages: verify each packet's MAC, decrypt, write under the VEK. Returns
    how many leading packets were applied (== len(pfns) when all verify); none after the first bad one."""
    p = _pfns(pfns)
    n = p.size
    hv = memoryview(headers).cast("B")
    dv = memoryview(data).cast("B")
    parts = ranges(n, workers)
    if len(parts) > 1 and not bool((np.diff(p) > 0).all()):
        parts = [(0, n)]                 # a repeated page: one range keeps "later packets win" exact

    def job(s: int, e: int, mode: int):
        return lambda: _accel.receive_pages(vek, tek, tik, ctx, ram, p[s:e], hv[HEADER_SIZE * s:HEADER_SIZE * e],
                                            dv[PAGE_SIZE * s:PAGE_SIZE * e], mode)

    if len(parts) == 1:
        return _accel.receive_pages(vek, tek, tik, ctx, ram, p, hv, dv, 0)
    good = n
    for (s, e), ok in zip(parts, _parallel([job(s, e, 1) for s, e in parts])):
        if s + ok < e:
            good = s + ok
            break
    if good:
        _parallel([job(s, e, 2) for s, e in ranges(good, workers)])
    return good


def seal_packets(tek: bytes, tik: bytes, ctx: int, ivs: bytes, plaintext, packet_len: int):
    """Transport packets alone (any length multiple of 16 up to 0x5000): (headers, ciphertext)."""
    n = len(ivs) // 16
    headers = bytearray(n * HEADER_SIZE)
    out = bytearray(n * packet_len)
    _accel.seal_packets(tek, tik, ctx, ivs, plaintext, packet_len, headers, out)
    return bytes(headers), bytes(out)


def open_packets(tek: bytes, tik: bytes, ctx: int, headers, ciphertext, packet_len: int) -> tuple[int, bytes]:
    """(leading packets that verify, their plaintext)."""
    n = len(headers) // HEADER_SIZE
    out = bytearray(n * packet_len)
    good = _accel.open_packets(tek, tik, ctx, headers, ciphertext, packet_len, out)
    return good, bytes(out[:good * packet_len])


__all__ = ["AVAILABLE", "ENV_PURE", "enabled", "forced_pure", "describe", "ranges", "send_pages",
           "receive_pages", "seal_packets", "open_packets"]
