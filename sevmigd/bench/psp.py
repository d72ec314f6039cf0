"""PSP micro-benchmarks: per-page cost of SEND/RECEIVE_UPDATE_DATA (single commands vs batch), the memory
engine, and this machine's "crypto limit" for the same work.

Batch figures are those of the page path in use (`psp_path`: the compiled loop of psp/accel.py, or the
pure-Python one with SEVMIGD_PSP_PURE=1); with the compiled loop, the pure path's batch figures and the
wall time with two PSP engines are printed beside them.

The crypto limit is what the per-page cryptography costs when each primitive runs in the fastest form the
library offers (one OpenSSL call over a cache-sized buffer, no Python per block):
  source      = memory-engine decrypt (2 AES-ECB passes + XORs) + AES-128-CTR + HMAC-SHA256 over 4 KiB
  destination = HMAC-SHA256 verify + AES-128-CTR + memory-engine encrypt over 4 KiB
Source and destination run on different cores (different hosts in production), so the limit of a
migration stream is the slower side: crypto_limit_mb_s = 4096 B / max(source, destination).

Timings are CPU time of this process (see `_timer`). A benchmark prints figures; it never asserts a timing.
"""

from __future__ import annotations

import hmac
import os
import time
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevmigd.psp import accel
from sevmigd.psp.crypto import HmacSha256
from sevmigd.psp.firmware import Firmware
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.migrate.pages import BATCH_PAGES   # the figures use the batch the migration engine sends
from sevmigd.psp.memengine import PAGE_SIZE, MemoryEngine

#: Guest size for the firmware figures.
GUEST_PAGES = 4096          # 16 MiB
CACHE_CHUNK = 16 * PAGE_SIZE


#: Figures are CPU seconds of this (single-threaded) process, best of the repeats: on a shared machine
#: wall time measures the neighbours; CPU time measures the cost of the work (the crypto limit is then an
#: honest upper bound for a wall-clock migration on an otherwise idle core).
_timer = time.process_time


def _best(fn: Callable[[], None], repeats: int, timer: Callable[[], float] | None = None) -> float:
    """Best CPU time (or `timer` time) of `repeats` runs (seconds)."""
    timer = timer or _timer
    best = float("inf")
    for _ in range(repeats):
        t = timer()
        fn()
        best = min(best, timer() - t)
    return best


def _us(seconds: float, pages: int) -> float:
    return round(seconds / pages * 1e6, 2)


def _mb_s(us_per_page: float) -> float:
    return round(PAGE_SIZE / us_per_page, 1) if us_per_page > 0 else 0.0   # bytes/µs == MB/s


def _setup(pages: int):
    ca = FleetCA.create(os.urandom, rsa_bits=2048)
    a, b = PlatformIdentity.create(ca, os.urandom), PlatformIdentity.create(ca, os.urandom)
    src, dst = Firmware(a), Firmware(b)
    src.init()
    dst.init()
    h = src.launch_start(policy=0)
    src.activate(h, 1)
    ram = bytearray(os.urandom(pages * PAGE_SIZE))
    src.map_guest_memory(h, ram)
    src.launch_update_data(h, 0, len(ram))
    src.launch_measure(h)
    src.launch_finish(h)
    pdh, _ = dst.pdh_cert_export()
    policy, session = src.send_start(h, pdh_cert=pdh, plat_certs=b.plat_certs(), amd_certs=b.amd_certs())
    dh = dst.receive_start(policy=policy, pdh_cert=src.pdh_cert_export()[0], session=session)
    dst.activate(dh, 1)
    dram = bytearray(pages * PAGE_SIZE)
    dst.map_guest_memory(dh, dram)
    return src, h, dst, dh


def _firmware_figures(pages: int, repeats: int, use_accel: bool | None = None) -> dict:
    src, h, dst, dh = _setup(pages)
    if use_accel is not None:
        src.accel = dst.accel = use_accel and accel.AVAILABLE
    single_n = min(pages, 1024)

    sent: list = []

    def send_single():
        sent.clear()
        for p in range(single_n):
            sent.append(src.send_update_data(h, p * PAGE_SIZE, PAGE_SIZE))

    def recv_single():
        for p, (hdr, ct) in enumerate(sent):
            dst.receive_update_data(dh, hdr, p * PAGE_SIZE, ct)

    t_send1 = _best(send_single, repeats)
    t_recv1 = _best(recv_single, repeats)

    batches: list = []
    pfn_batches = [np.arange(s, min(s + BATCH_PAGES, pages)) for s in range(0, pages, BATCH_PAGES)]

    def send_batch():
        batches.clear()
        for pf in pfn_batches:
            batches.append(src.send_update_data_batch(h, pf))

    def recv_batch():
        for pf, (hdrs, ct) in zip(pfn_batches, batches):
            dst.receive_update_data_batch(dh, pf, hdrs, ct)

    t_sendb = _best(send_batch, repeats)
    t_recvb = _best(recv_batch, repeats)
    # Two PSP engines (page ranges on two threads; only the compiled loop uses them): wall time, since
    # CPU time adds both threads up.
    src.workers = dst.workers = 2
    t_send2 = _best(send_batch, repeats, timer=time.perf_counter)
    t_recv2 = _best(recv_batch, repeats, timer=time.perf_counter)
    src.workers = dst.workers = 1
    fig = {
        "send_update_data_single_us_per_page": _us(t_send1, single_n),
        "receive_update_data_single_us_per_page": _us(t_recv1, single_n),
        "send_update_data_batch_us_per_page": _us(t_sendb, pages),
        "receive_update_data_batch_us_per_page": _us(t_recvb, pages),
        "batch_pages": BATCH_PAGES,
        "psp_path": accel.describe(src.accel),
    }
    if src.accel:
        fig["send_update_data_batch_2_engines_wall_us_per_page"] = _us(t_send2, pages)
        fig["receive_update_data_batch_2_engines_wall_us_per_page"] = _us(t_recv2, pages)
    fig["send_batch_mb_s"] = _mb_s(fig["send_update_data_batch_us_per_page"])
    fig["receive_batch_mb_s"] = _mb_s(fig["receive_update_data_batch_us_per_page"])
    return fig


def _memengine_figures(pages: int, repeats: int) -> dict:
    eng = MemoryEngine(os.urandom(32))
    ram = bytearray(pages * PAGE_SIZE)
    page = os.urandom(PAGE_SIZE)
    n1 = min(pages, 2048)
    t_w1 = _best(lambda: [eng.write(ram, p * PAGE_SIZE, page) for p in range(n1)], repeats)
    t_r1 = _best(lambda: [eng.read(ram, p * PAGE_SIZE, PAGE_SIZE) for p in range(n1)], repeats)
    data = os.urandom(BATCH_PAGES * PAGE_SIZE)
    batches = [np.arange(s, s + BATCH_PAGES) for s in range(0, pages - BATCH_PAGES + 1, BATCH_PAGES)]
    t_wb = _best(lambda: [eng.write_pages(ram, b, data) for b in batches], repeats)
    t_rb = _best(lambda: [eng.read_pages(ram, b) for b in batches], repeats)
    nb = len(batches) * BATCH_PAGES

    # The alternative ARCHITECTURE.md first sketched: AES-128-XTS per page (tweak = page address).
    key = os.urandom(32)

    def xts():
        mv = memoryview(ram)
        for p in range(n1):
            enc = Cipher(algorithms.AES(key), modes.XTS((p * PAGE_SIZE).to_bytes(16, "little"))).encryptor()
            mv[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = enc.update(page)

    t_xts = _best(xts, repeats)
    return {
        "memengine_write_us_per_page": _us(t_w1, n1),
        "memengine_read_us_per_page": _us(t_r1, n1),
        "memengine_write_batch_us_per_page": _us(t_wb, nb),
        "memengine_read_batch_us_per_page": _us(t_rb, nb),
        "xts_per_page_write_us_per_page": _us(t_xts, n1),
    }


def _crypto_limit(repeats: int) -> dict:
    """Per-page cost of the same cryptography in its fastest library form (cache-sized single calls)."""
    buf = os.urandom(CACHE_CHUNK)
    pages = CACHE_CHUNK // PAGE_SIZE
    ecb = Cipher(algorithms.AES(os.urandom(16)), modes.ECB()).encryptor()
    ctr_key, iv, mac_key = os.urandom(16), os.urandom(16), os.urandom(16)
    a = np.frombuffer(buf, dtype=np.uint64)
    b = np.frombuffer(os.urandom(CACHE_CHUNK), dtype=np.uint64)
    reps = 200

    def aes_ecb():
        for _ in range(reps):
            ecb.update(buf)

    def xor():
        for _ in range(reps):
            np.bitwise_xor(a, b)

    def ctr():
        for _ in range(reps):
            Cipher(algorithms.AES(ctr_key), modes.CTR(iv)).encryptor().update(buf)

    pages_view = [buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(pages)]

    def mac():
        for _ in range(reps):
            for p in pages_view:
                hmac.digest(mac_key, p, "sha256")

    keyed = HmacSha256(mac_key)      # precomputed inner/outer states: the faster form on this machine

    def mac_states():
        for _ in range(reps):
            for p in pages_view:
                keyed.mac(p)

    per = lambda fn: _best(fn, repeats) / (reps * pages) * 1e6   # noqa: E731  µs per page
    t_ecb, t_xor, t_ctr = per(aes_ecb), per(xor), per(ctr)
    t_mac = min(per(mac), per(mac_states))
    # Memory engine: Δ = AES_K2(addresses) and C = AES_K1(P ⊕ Δ) ⊕ Δ → two ECB passes and two XORs.
    t_engine = 2 * t_ecb + 2 * t_xor
    src = t_engine + t_ctr + t_mac
    dst = t_mac + t_ctr + t_engine
    limit = max(src, dst)
    return {
        "aes_ecb_us_per_page": round(t_ecb, 3),
        "aes_ctr_us_per_page": round(t_ctr, 3),
        "hmac_sha256_us_per_page": round(t_mac, 3),
        "xor_us_per_page": round(t_xor, 3),
        "crypto_limit_source_us_per_page": round(src, 3),
        "crypto_limit_destination_us_per_page": round(dst, 3),
        "crypto_limit_us_per_page": round(limit, 3),
        "crypto_limit_mb_s": _mb_s(limit),
    }


def run(report: Callable[[str], None] | None = None, *, quick: bool = False) -> dict:
    """Run the PSP benchmarks; returns the figures (µs per 4 KiB page, MB/s = 10^6 B/s)."""
    repeats = 2 if quick else 5
    pages = 1024 if quick else GUEST_PAGES
    fig: dict = {}
    fig.update(_crypto_limit(repeats))
    fig.update(_memengine_figures(pages, repeats))
    fig.update(_firmware_figures(pages, repeats))
    fig["batch_share_of_crypto_limit"] = round(
        fig["crypto_limit_us_per_page"]
        / max(fig["send_update_data_batch_us_per_page"], fig["receive_update_data_batch_us_per_page"]), 3)
    # Issue 16: each side's batch against its own crypto floor (the floor is the primitives' fastest
    # *Python-library* form, so a compiled loop can go below 1.0), and the pure path beside the compiled.
    fig["send_batch_over_source_floor"] = round(
        fig["send_update_data_batch_us_per_page"] / fig["crypto_limit_source_us_per_page"], 3)
    fig["receive_batch_over_destination_floor"] = round(
        fig["receive_update_data_batch_us_per_page"] / fig["crypto_limit_destination_us_per_page"], 3)
    if accel.enabled():
        pure = _firmware_figures(pages, repeats, use_accel=False)
        fig["send_update_data_batch_pure_us_per_page"] = pure["send_update_data_batch_us_per_page"]
        fig["receive_update_data_batch_pure_us_per_page"] = pure["receive_update_data_batch_us_per_page"]
    if report is not None:
        for k, v in fig.items():
            report(f"{k:<42} {v}")
    return fig


def main() -> int:
    run(print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
