"""Does one migration use more than one core? Each side alone, with one worker and with two (issue 16).

* **Source alone, sending to a sink that only counts bytes**: round 1 of a private guest, batch by
  batch, the daemon's page path without the daemon: SEND_UPDATE_DATA (the firmware batch), the Pages
  frame (the wire codec, GMAC channel MAC as negotiated by the daemons), written to a loopback socket
  whose other end a thread drains into a reused buffer (`recv_into`) and counts.
  - 1 worker: the firmware with one engine (`Firmware.workers = 1`), each batch in turn on one thread
    (the daemon's inline path);
  - 2 workers: the firmware with two engines (`workers = 2`: each batch split into two page ranges on two
    threads, the daemon's `psp_workers = 2`), and the next batch's SEND_UPDATE_DATA started while this
    thread encodes and writes the current one (a two-deep pipeline).
* **Destination alone, fed a recorded stream**: the frames the source produced, recorded once, fed in
  socket-read-sized chunks to the wire codec (decode, channel MAC), each batch applied with
  RECEIVE_UPDATE_DATA (the firmware batch) into guest memory.
  - 1 worker: one engine, decode and apply in turn on one thread;
  - 2 workers: two engines, and the firmware batch in a worker thread while this thread decodes the next
    frame.

With the compiled page loop (psp/accel.py) the firmware batch runs with the GIL released, so the engines
and the wire work run on different cores; with the pure-Python path (`SEVMIGD_PSP_PURE=1`) the firmware
has one engine whatever `workers` says and the Python between crypto calls holds the GIL. `psp_path` in
the figures says which ran.

Figures: wall time (perf_counter) per run, the speedup of 2 workers over 1 (median of the per-repeat
ratios, each pair run back to back), the process CPU per page, and `speedup_bound_2_idle_cores`: the
one-worker run's time over the two-worker run's CPU divided by two, the best two idle cores could do
with that much work (independent of the machine's load, which the wall figure is not). Threads share one interpreter: the
crypto (OpenSSL AES, hashlib over >= 2 KiB, numpy) releases the GIL, the per-page Python between the
calls does not, which bounds the speedup (Amdahl). On a machine whose cores are busy the speedup
cannot show: `cpu_count` and the load average are printed with the figures. Never asserts.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sevmigd.migrate.pages import BATCH_PAGES
from sevmigd.psp.accel import describe
from sevmigd.wire import NEED_DATA, State
from sevmigd.wire.integrity import FEATURE_GMAC
from sevmigd.wire.limits import PAGE_SIZE
from sevmigd.wire.testing import pair, sample_hello

#: 64 MiB guest (16384 pages): long enough per run (~0.1-0.3 s) to dwarf thread start-up.
GUEST_PAGES = 16384
REPEATS = 5
#: What the daemon asks of the stream per read (sevmigd.daemon.channel.RECEIVE_SIZE).
READ_SIZE = 256 * 1024


class _Sink:
    """The far end of a loopback socket pair: a thread that reads everything into one reused buffer and
    counts the bytes (nothing is decoded)."""

    def __init__(self):
        self.tx, self._rx = socket.socketpair()
        self.count = 0
        self._buf = bytearray(1 << 20)
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        mv = memoryview(self._buf)
        while True:
            n = self._rx.recv_into(mv)
            if not n:
                return
            self.count += n

    def close(self) -> int:
        self.tx.shutdown(socket.SHUT_WR)
        self._t.join()
        self.tx.close()
        self._rx.close()
        return self.count


def _setup(pages: int):
    from sevmigd.bench.psp import _setup as psp_setup

    src, h, dst, dh = psp_setup(pages)
    hello = sample_hello(memory_bytes=pages * PAGE_SIZE, features=(FEATURE_GMAC,))
    return src, h, dst, dh, hello


def _batches(pages: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + BATCH_PAGES, pages), dtype=np.uint64) for s in range(0, pages, BATCH_PAGES)]


def _source_run(src, h, hello, batches, workers: int, record: list | None = None) -> tuple[float, float]:
    """Round 1 of the guest to a counting sink; -> (wall s, CPU s)."""
    cs, _cd = pair(hello=hello, until=State.PRECOPY, features=(FEATURE_GMAC,))
    sink = _Sink()
    empty = np.zeros(0, dtype=np.uint64)
    w0, c0 = time.perf_counter(), time.process_time()

    def emit(pf, out):
        hdrs, data = out
        parts = cs.send_pages_parts(cs.round, pf, hdrs, data, empty, b"")
        for piece in parts:           # scatter-gather, as the daemon's channel writes a Pages frame
            sink.tx.sendall(piece)
        if record is not None:
            record.append((pf, b"".join(parts)))

    src.workers = workers
    if workers <= 1:
        for pf in batches:
            emit(pf, src.send_update_data_batch(h, pf))
    else:
        with ThreadPoolExecutor(max_workers=workers - 1) as pool:
            nxt = pool.submit(src.send_update_data_batch, h, batches[0])
            for i, pf in enumerate(batches):
                out = nxt.result()
                if i + 1 < len(batches):
                    nxt = pool.submit(src.send_update_data_batch, h, batches[i + 1])
                emit(pf, out)
    sink.close()
    return time.perf_counter() - w0, time.process_time() - c0


def _destination_run(dst, dh, hello, frames: list, workers: int) -> tuple[float, float]:
    """The recorded frames fed to the codec and RECEIVE_UPDATE_DATA; -> (wall s, CPU s)."""
    _cs, cd = pair(hello=hello, until=State.PRECOPY, features=(FEATURE_GMAC,))
    chunks = []
    for _pf, frame in frames:        # what the socket hands the daemon: READ_SIZE reads (untimed)
        mv = memoryview(frame)
        chunks.append([bytes(mv[o:o + READ_SIZE]) for o in range(0, len(frame), READ_SIZE)])
    w0, c0 = time.perf_counter(), time.process_time()

    def decode(parts):
        ev = None
        for c in parts:
            cd.receive_data(c)
            while (e := cd.next_event()) is not NEED_DATA:
                ev = e
        return ev

    def apply(ev):
        dst.receive_update_data_batch(dh, ev.enc_pfns, ev.enc_headers, ev.enc_data)

    dst.workers = workers
    if workers <= 1:
        for parts in chunks:
            apply(decode(parts))
    else:
        with ThreadPoolExecutor(max_workers=workers - 1) as pool:
            pending = None
            for parts in chunks:
                ev = decode(parts)
                if pending is not None:
                    pending.result()
                pending = pool.submit(apply, ev)
            if pending is not None:
                pending.result()
    return time.perf_counter() - w0, time.process_time() - c0


def _figures(runs: dict, pages: int) -> dict:
    one, two = runs[1], runs[2]
    ratios = [a[0] / b[0] for a, b in zip(one, two)]
    # What two idle cores could give at best: the two-worker run's CPU spread perfectly over two cores
    # against the one-worker run's CPU on one (wall >= CPU / cores). Unlike the wall-clock speedup it does
    # not depend on whether the machine's other core was free during the run, so it says on a busy box
    # whether the target is reachable at all, and the wall figure says whether it was reached here.
    bounds = [min(a[1], a[0]) / (b[1] / 2) for a, b in zip(one, two)]
    return {
        "wall_ms_1_worker": round(1000 * statistics.median(r[0] for r in one), 1),
        "wall_ms_2_workers": round(1000 * statistics.median(r[0] for r in two), 1),
        "speedup_2_over_1": round(statistics.median(ratios), 3),
        "speedup_2_over_1_runs": [round(x, 3) for x in ratios],
        "speedup_bound_2_idle_cores": round(statistics.median(bounds), 3),
        "cpu_us_per_page_1_worker": round(1e6 * statistics.median(r[1] for r in one) / pages, 2),
        "cpu_us_per_page_2_workers": round(1e6 * statistics.median(r[1] for r in two) / pages, 2),
    }


def run(quick: bool = False) -> dict:
    pages = 4096 if quick else GUEST_PAGES
    repeats = 2 if quick else REPEATS
    src, h, dst, dh, hello = _setup(pages)
    batches = _batches(pages)
    frames: list = []
    _source_run(src, h, hello, batches, 1, record=frames)      # warm-up, and the recorded stream
    _destination_run(dst, dh, hello, frames, 1)                 # warm-up: first touch of guest memory
    s_runs: dict = {1: [], 2: []}
    d_runs: dict = {1: [], 2: []}
    for _ in range(repeats):
        for w in (1, 2):
            s_runs[w].append(_source_run(src, h, hello, batches, w))
        for w in (1, 2):
            d_runs[w].append(_destination_run(dst, dh, hello, frames, w))
    return {
        "guest_pages": pages, "batch_pages": BATCH_PAGES, "repeats": repeats,
        "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
        "psp_path": describe(src.accel),
        "source_alone_to_counting_sink": _figures(s_runs, pages),
        "destination_alone_recorded_stream": _figures(d_runs, pages),
        "method": "in-process page path of each side (firmware batch + wire codec + loopback socket); "
                  "2 workers = two PSP engines (page ranges on two threads) and the firmware batch "
                  "pipelined beside the wire work",
    }


def main() -> int:
    import json

    print(json.dumps(run(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
