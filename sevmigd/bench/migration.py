"""Migration benchmark: real daemons on loopback, figures printed (never asserted).

`run(...) -> dict` measures, each between two fresh `sevmigd serve` processes (fresh so that each
daemon's peak RSS, VmHWM from /proc/PID/status, belongs to that scenario alone):

* `dirty_32`: a 1 GiB guest, 75 % private, its workload dirtying 32 MiB/s over a 256 MiB working set
  (the QEMU-style convergence case: rounds, downtime vs expected downtime);
* `mixed_idle`: the same guest idle;
* `private_idle`: 1 GiB, 100 % private, idle (bounded by the emulated PSP's SEND/RECEIVE_UPDATE_DATA);
* `shared_idle`: 1 GiB, 100 % shared, idle (no PSP work: the wire and the daemon alone);
* `concurrent_4`: four 256 MiB private guests migrated at once vs one alone (aggregate / single).

Per scenario: total time, throughput (MB/s of guest memory and Mbit/s on the wire), downtime and
expected downtime, rounds, bytes on the wire per guest byte, private/shared pages, peak RSS of both
daemons, and the verify result on the destination. `python -m sevmigd.bench.migration [--quick]`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import tempfile
import threading
import time

from sevmigd.cli.demo import LocalDaemon, new_fleet_dirs

MiB = 1 << 20


def _pair(root: pathlib.Path, tag: str, dirs) -> tuple[LocalDaemon, LocalDaemon]:
    a = LocalDaemon(f"{tag}-a", dirs["a"])
    b = LocalDaemon(f"{tag}-b", dirs["b"])
    a.start()
    try:
        b.start()
    except BaseException:
        a.stop()
        raise
    return a, b


def _fresh_dirs(root: pathlib.Path, tag: str, ca_root: pathlib.Path) -> dict:
    """Per scenario, copies of the two platform state dirs (fresh daemons, same identities)."""
    out = {}
    for side in ("a", "b"):
        d = root / tag / side
        shutil.copytree(ca_root / side, d, symlinks=True)
        out[side] = d
    return out


def _figures(stats: dict, verify: dict, guest_bytes: int, a: LocalDaemon, b: LocalDaemon) -> dict:
    total_s = (stats.get("total_time_ms") or 0) / 1000
    return {
        "status": stats.get("status"),
        "guest_mib": guest_bytes / MiB,
        "total_time_ms": stats.get("total_time_ms"),
        "setup_time_ms": stats.get("setup_time_ms"),
        "throughput_mb_s": round(guest_bytes / 1e6 / total_s, 1) if total_s else None,
        "wire_mbps": stats.get("throughput_mbps"),
        "downtime_ms": stats.get("downtime_ms"),
        "expected_downtime_ms": stats.get("expected_downtime_ms"),
        "rounds": stats.get("round"),
        "throttle_pct": stats.get("throttle_pct"),
        "wire_bytes_per_guest_byte": round((stats.get("transferred") or 0) / guest_bytes, 4),
        "private_pages": stats.get("private_pages"),
        "shared_pages": stats.get("shared_pages"),
        "verify_ok": bool(verify.get("ok")),
        "peak_rss_source_mib": a.peak_rss_mib(),
        "peak_rss_destination_mib": b.peak_rss_mib(),
    }


def _one(root, tag, base, *, memory: int, shared: float, dirty: float = 0.0, working_set: float | None = None,
         flip: float = 0.0) -> dict:
    a, b = _pair(root, tag, _fresh_dirs(root, tag, base))
    try:
        a.execute("launch", {"name": "bench", "memory": memory, "shared_fraction": shared, "dirty_rate": dirty,
                             "working_set": working_set, "flip_rate": flip, "seed": 5}, timeout=600)
        stats = a.execute("migrate", {"name": "bench", "to": b.listen}, timeout=None)
        verify = b.execute("verify", {"name": "bench"}, timeout=600)
        return _figures(stats, verify, memory, a, b)
    finally:
        a.stop()
        b.stop()


def _concurrent(root, tag, base, *, memory: int, n: int) -> dict:
    """One guest alone, then `n` guests migrated at once (one control connection each)."""
    a, b = _pair(root, tag, _fresh_dirs(root, tag, base))
    try:
        a.execute("launch", {"name": "single", "memory": memory, "seed": 9}, timeout=600)
        single = a.execute("migrate", {"name": "single", "to": b.listen}, timeout=None)
        single_mb_s = memory / 1e6 / (single["total_time_ms"] / 1000)
        batch = [f"c{i}" for i in range(n)]
        for name in batch:
            a.execute("launch", {"name": name, "memory": memory, "seed": 11}, timeout=600)
        results: dict[str, dict] = {}
        errors: list[str] = []

        def go(name):
            try:
                results[name] = a.execute("migrate", {"name": name, "to": b.listen}, timeout=None)
            except Exception as exc:  # noqa: BLE001 - reported in the figures
                errors.append(f"{name}: {exc}")

        threads = [threading.Thread(target=go, args=(nm,)) for nm in batch]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        agg_mb_s = len(results) * memory / 1e6 / wall if wall else 0.0
        return {"guests": n, "guest_mib": memory / MiB, "single_mb_s": round(single_mb_s, 1),
                "aggregate_mb_s": round(agg_mb_s, 1), "wall_s": round(wall, 2),
                "aggregate_over_single": round(agg_mb_s / single_mb_s, 3) if single_mb_s else None,
                "completed": sum(1 for r in results.values() if r.get("status") == "completed"),
                "errors": errors, "peak_rss_source_mib": a.peak_rss_mib(),
                "peak_rss_destination_mib": b.peak_rss_mib()}
    finally:
        a.stop()
        b.stop()


def run(quick: bool = False, size: int | None = None) -> dict:
    """All scenarios; `quick` uses 128 MiB guests (a smoke run: figures not comparable)."""
    size = size or (128 * MiB if quick else 1 << 30)
    ws = max(16.0, size / MiB / 4)  # 256 MiB of a 1 GiB guest
    root = pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-bench-"))
    out: dict = {"guest_mib": size / MiB}
    try:
        base = root / "base"
        base.mkdir()
        dirs = new_fleet_dirs(base, ["a", "b"])
        del dirs
        out["dirty_32"] = _one(root, "dirty_32", base, memory=size, shared=0.25, dirty=32.0, working_set=ws)
        out["mixed_idle"] = _one(root, "mixed_idle", base, memory=size, shared=0.25)
        out["private_idle"] = _one(root, "private_idle", base, memory=size, shared=0.0)
        out["shared_idle"] = _one(root, "shared_idle", base, memory=size, shared=1.0)
        out["concurrent_4"] = _concurrent(root, "concurrent_4", base, memory=max(size // 4, 32 * MiB), n=4)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(run(quick="--quick" in argv), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
