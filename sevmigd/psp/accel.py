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
its CCP's several queues, the pages are split into contiguous ranges of at least 32 pages, one per
engine; the calling thread runs the first range and threads the C side creates for the call run the
others (no Python and no GIL on them), and the command returns when all are done. The result is that of
the ranges run one after the other:
* SEND: each range writes its own slice of the headers and the ciphertext; the IVs were drawn before.
* RECEIVE: pages are written only after every MAC before them verified. The ranges first verify in
  parallel (all MACs computed in full); then the pages before the first bad packet are decrypted and
  written, again in parallel. When a page number does not strictly increase through the batch (a repeat:
  "later packets win"), ranges could race on it, so such a batch runs as one range.

Must never: hold a key past the call (the C side cleanses its contexts and scratch pages), differ from
the pure path in any byte or error (the tests compare both), or leave an engine thread running after the
command returned (the C side joins every thread it starts).
"""

from __future__ import annotations

import os

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
#: The C side's smallest range (MIN_RANGE_PAGES in _accel.c): a thread costs ~10-30 µs to start and
#: join against ~4 µs of crypto per page.
MIN_RANGE_PAGES = 32


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


def _pfns(pfns) -> np.ndarray:
    return np.ascontiguousarray(pfns, dtype=np.int64)


def send_pages(vek: bytes, tek: bytes, tik: bytes, ctx: int, ram, pfns, ivs: bytes, workers: int = 1):
    """SEND_UPDATE_DATA of whole pages `pfns` (each inside `ram`, checked by the caller) with IV i for
    page i, on `workers` engines -> (headers bytes, ciphertext buffer), byte-identical to the pure batch."""
    p = _pfns(pfns)
    headers = bytearray(p.size * HEADER_SIZE)
    data = _uninit(p.size * PAGE_SIZE)
    _accel.send_pages(vek, tek, tik, ctx, ram, p, ivs, headers, data, workers)
    return bytes(headers), data


def receive_pages(vek: bytes, tek: bytes, tik: bytes, ctx: int, ram, pfns, headers, data, workers: int = 1) -> int:
    """RECEIVE_UPDATE_DATA of whole pages on `workers` engines: verify each packet's MAC, decrypt, write
    under the VEK. Returns how many leading packets were applied (== len(pfns) when all verify); nothing
    at or after the first bad one is written."""
    return _accel.receive_pages(vek, tek, tik, ctx, ram, _pfns(pfns), memoryview(headers).cast("B"),
                                memoryview(data).cast("B"), workers)


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


__all__ = ["AVAILABLE", "ENV_PURE", "enabled", "forced_pure", "describe", "send_pages",
           "receive_pages", "seal_packets", "open_packets"]
