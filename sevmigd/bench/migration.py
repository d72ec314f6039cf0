"""Migration benchmark: real daemons on loopback, figures printed (never asserted).

`run(...) -> dict` measures each scenario between two fresh `sevmigd serve` processes (fresh per scenario
so that each daemon's peak RSS, VmHWM from /proc/PID/status, belongs to that scenario alone). Every guest
is launched with `prefill` (every page written at boot with seeded random-looking content, checked by the
guest's ledger): "random contents", no zero page anywhere. Each figure is the **median of RUNS
migrations after WARMUP warm-up migration(s)** on the same daemon pair (a new guest each time; the
destination verifies it (in-guest ledger over every page), then stops it):

* `dirty_32`: 1 GiB, 75 % private, the workload dirtying 32 MiB/s over a 256 MiB working set
  (the QEMU-style convergence case: rounds, downtime vs the expected downtime reported before switch-over);
* `mixed_idle`: the same guest idle;
* `private_idle`: 1 GiB, 100 % private, idle (bounded by the emulated PSP's SEND/RECEIVE_UPDATE_DATA);
* `shared_idle`: 1 GiB, 100 % shared, idle (no PSP work: the wire and the daemon alone);
* `private_idle_plaintext`, `shared_idle_plaintext`: the same two over a plaintext channel
  (`insecure_plaintext = true`), the transport of QEMU's default peer; every other scenario runs with the
  daemons' default, mutual TLS (each scenario says which in `transport`);
* `concurrent_4`: four 256 MiB private guests migrated at once vs one alone (aggregate / single);
* `scale_8g`: an 8 GiB guest, 75 % private, dirtying 32 MiB/s over 256 MiB: total time, per-round time,
  pages and dirty pages, and the dirty-log + bitmap cost per round when the source reports it
  (`sync_ms` in its round summaries). Needs ~2 x 8 GiB of RAM; with less available it runs without
  prefill (untouched pages are then zero on the source, said in the figures) or is skipped.

Per scenario: total time, throughput (MB/s of guest memory, 10^6 B/s, and Mbit/s on the wire), downtime and
expected downtime, rounds, bytes on the wire per guest byte, private/shared pages, peak RSS of both
daemons, launch time, and whether every destination verify passed. `python -m sevmigd.bench.migration
[--quick] [--only a,b] [--set KEY=VALUE ...]` (`--set` gives every daemon a config key, e.g. psp_workers=1).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

from sevmigd.cli.demo import new_fleet_dirs, start_local_daemon
from sevmigd.testing.daemons import DaemonProcess

MiB = 1 << 20
GiB = 1 << 30
#: Measured migrations per scenario (the figure is their median) and warm-up migrations before them
#: (first-touch page faults of the daemons' heaps, imports, socket buffers).
RUNS = 3
WARMUP = 1
#: The scale guest is big: one warm-up of the 1 GiB size, then SCALE_RUNS measured 8 GiB migrations.
SCALE_SIZE = 8 * GiB
SCALE_RUNS = 1
#: Daemon-side timeouts are generous: a loaded 2-core machine can take minutes for an 8 GiB guest.
CONTROL_TIMEOUT_S = 1800
#: Headroom beyond the two guests' RAM before the scale scenario prefills (other work needs memory too).
SCALE_HEADROOM = 3 * GiB

#: How the figures are timed (carried into the output, next to the QEMU peer's own TIMING).
TIMING = ("wall_ms: client-side wall time from the migrate control call to its return (the destination "
          "has started the guest), the way the QEMU peer is timed; total_time_ms: the source daemon's own "
          "clock, connect to 'started'")

SCENARIOS = ("dirty_32", "mixed_idle", "private_idle", "shared_idle", "private_idle_plaintext",
             "shared_idle_plaintext", "concurrent_4", "scale_8g")
#: The migration channel of each scenario: the daemons' default, or plaintext like QEMU's default peer.
TLS = "mutual TLS (the default)"
PLAINTEXT = "plaintext (insecure_plaintext = true), like QEMU's default"

# Numeric figures of one migration that are reported as medians over the runs.
_MEDIAN_KEYS = ("total_time_ms", "wall_ms", "setup_time_ms", "throughput_mb_s", "wire_mbps", "downtime_ms",
                "expected_downtime_ms", "downtime_error_pct", "rounds", "throttle_pct",
                "wire_bytes_per_guest_byte", "private_pages", "shared_pages", "launch_ms", "verify_ms",
                "cpu_source_us_per_page", "cpu_destination_us_per_page", "cpu_cores_used")


#: Daemon config keys every scenario's daemons get (`--set KEY=VALUE`, e.g. psp_workers=1 for an A/B run).
EXTRA_CONFIG: dict = {}


def _pair(root: pathlib.Path, tag: str, dirs, config: dict | None = None) -> tuple[DaemonProcess, DaemonProcess]:
    if EXTRA_CONFIG:
        config = {**EXTRA_CONFIG, **(config or {})}
    a = start_local_daemon(f"{tag}-a", dirs["a"], config=config)
    try:
        b = start_local_daemon(f"{tag}-b", dirs["b"], config=config)
    except BaseException:
        _stop(a)
        raise
    return a, b


def _stop(*daemons: DaemonProcess) -> None:
    for d in daemons:
        d.stop()
        d.cleanup()


def _fresh_dirs(root: pathlib.Path, tag: str, ca_root: pathlib.Path) -> dict:
    """Per scenario, copies of the two platform state dirs (fresh daemons, same identities)."""
    out = {}
    for side in ("a", "b"):
        d = root / tag / side
        shutil.copytree(ca_root / side, d, symlinks=True)
        out[side] = d
    return out


def _mem_available() -> int:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> float | None:
    """utime + stime of a process so far (seconds), from /proc/PID/stat; None if unreadable."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _one_run(a: DaemonProcess, b: DaemonProcess, name: str, launch: dict, *, verify: bool = True) -> dict:
    """Launch `name` on a, migrate it to b, verify it there, stop it; figures of this one migration."""
    t0 = time.monotonic()
    a.execute("launch", {"name": name, **launch}, timeout=CONTROL_TIMEOUT_S)
    launch_ms = (time.monotonic() - t0) * 1000
    cpu0 = (_cpu_s(a.pid), _cpu_s(b.pid))
    t0 = time.monotonic()
    stats = a.execute("migrate", {"name": name, "to": b.address}, timeout=None)
    wall = time.monotonic() - t0
    cpu1 = (_cpu_s(a.pid), _cpu_s(b.pid))
    cpu = [c1 - c0 if c0 is not None and c1 is not None else None for c0, c1 in zip(cpu0, cpu1)]
    t0 = time.monotonic()
    ver = b.execute("verify", {"name": name}, timeout=CONTROL_TIMEOUT_S) if verify else {}
    verify_ms = (time.monotonic() - t0) * 1000
    try:
        b.execute("stop", {"name": name}, timeout=CONTROL_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a guest left running only costs memory
        pass
    memory = launch["memory"]
    total_s = (stats.get("total_time_ms") or 0) / 1000
    down, exp = stats.get("downtime_ms"), stats.get("expected_downtime_ms")
    return {
        "status": stats.get("status"),
        "total_time_ms": stats.get("total_time_ms"),
        # Client-side wall time of the `migrate` call, sent to returned (the guest started on the
        # destination): measured the way the QEMU peer's `wall_ms` is (see TIMING).
        "wall_ms": round(wall * 1000, 1),
        "setup_time_ms": stats.get("setup_time_ms"),
        "throughput_mb_s": round(memory / 1e6 / total_s, 1) if total_s else None,
        "wire_mbps": stats.get("throughput_mbps"),
        "downtime_ms": down,
        "expected_downtime_ms": exp,
        # |measured - expected| / expected: the "expected downtime" is the planner's estimate at the end
        # of the last pre-copy round, i.e. what was reported before switch-over.
        "downtime_error_pct": round(100 * abs(down - exp) / exp, 1) if down is not None and exp else None,
        "rounds": stats.get("round"),
        "throttle_pct": stats.get("throttle_pct"),
        "wire_bytes_per_guest_byte": round((stats.get("transferred") or 0) / memory, 4),
        "private_pages": stats.get("private_pages"),
        "shared_pages": stats.get("shared_pages"),
        "launch_ms": round(launch_ms, 1),
        # CPU each daemon spent on this migration (whole process, from /proc), per guest page, and the
        # share of the machine's wall time the two daemons together got: on a shared machine this shows
        # whether a migration was bound by its own work or by waiting for a core.
        "cpu_source_us_per_page": round(cpu[0] / (memory // 4096) * 1e6, 2) if cpu[0] is not None else None,
        "cpu_destination_us_per_page": round(cpu[1] / (memory // 4096) * 1e6, 2) if cpu[1] is not None else None,
        "cpu_cores_used": round((cpu[0] + cpu[1]) / wall, 2) if None not in cpu and wall > 0 else None,
        "verify_ms": round(verify_ms, 1) if verify else None,
        "verify_ok": bool(ver.get("ok")) if verify else None,
        "round_summaries": stats.get("rounds") or [],
    }


def _median(runs: list[dict], key: str):
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    if not vals:
        return None
    m = statistics.median(vals)
    return round(m, 3) if isinstance(m, float) else m


def _summarise(runs: list[dict], memory: int, a: DaemonProcess, b: DaemonProcess, warmup: int) -> dict:
    out: dict = {"guest_mib": memory / MiB, "runs": len(runs), "warmup_runs": warmup}
    for k in _MEDIAN_KEYS:
        out[k] = _median(runs, k)
    out["total_time_ms_runs"] = [r["total_time_ms"] for r in runs]
    out["downtime_ms_runs"] = [r["downtime_ms"] for r in runs]
    out["expected_downtime_ms_runs"] = [r["expected_downtime_ms"] for r in runs]
    out["downtime_error_pct_runs"] = [r["downtime_error_pct"] for r in runs]
    out["status"] = ",".join(sorted({str(r["status"]) for r in runs}))
    out["verify_ok"] = all(r["verify_ok"] is not False for r in runs)
    out["peak_rss_source_mib"] = a.peak_rss_mib()
    out["peak_rss_destination_mib"] = b.peak_rss_mib()
    return out


def _scenario(root, tag, base, *, memory: int, launch: dict, runs: int, warmup: int,
              plaintext: bool = False) -> dict:
    a, b = _pair(root, tag, _fresh_dirs(root, tag, base), {"insecure_plaintext": True} if plaintext else None)
    try:
        args = {"memory": memory, "seed": 5, "prefill": True, **launch}
        for i in range(warmup):
            _one_run(a, b, f"warm{i}", args, verify=False)
        measured = [_one_run(a, b, f"run{i}", args) for i in range(runs)]
        out = _summarise(measured, memory, a, b, warmup)
        out["transport"] = PLAINTEXT if plaintext else TLS
        return out
    finally:
        _stop(a, b)


def _concurrent(root, tag, base, *, memory: int, n: int, runs: int, warmup: int) -> dict:
    """One guest alone, then `n` guests migrated at once (one control connection each); `runs` times."""
    a, b = _pair(root, tag, _fresh_dirs(root, tag, base))
    args = {"memory": memory, "seed": 9, "prefill": True}
    try:
        for i in range(warmup):
            _one_run(a, b, f"warm{i}", args, verify=False)
        singles, aggs, walls, completed, errors = [], [], [], 0, []
        for r in range(runs):
            single = _one_run(a, b, f"single{r}", args, verify=False)
            singles.append(memory / 1e6 / (single["total_time_ms"] / 1000))
            batch = [f"c{r}-{i}" for i in range(n)]
            for name in batch:
                a.execute("launch", {"name": name, **args}, timeout=CONTROL_TIMEOUT_S)
            results: dict[str, dict] = {}

            def go(name):
                try:
                    results[name] = a.execute("migrate", {"name": name, "to": b.address}, timeout=None)
                except Exception as exc:  # noqa: BLE001 - reported in the figures
                    errors.append(f"{name}: {exc}")

            threads = [threading.Thread(target=go, args=(nm,)) for nm in batch]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            walls.append(wall)
            aggs.append(len(results) * memory / 1e6 / wall if wall else 0.0)
            completed += sum(1 for x in results.values() if x.get("status") == "completed")
            for name in batch:
                try:
                    b.execute("stop", {"name": name}, timeout=CONTROL_TIMEOUT_S)
                except Exception:  # noqa: BLE001
                    pass
        single_mb_s = statistics.median(singles)
        agg_mb_s = statistics.median(aggs)
        return {"guests": n, "guest_mib": memory / MiB, "runs": runs, "warmup_runs": warmup,
                "single_mb_s": round(single_mb_s, 1), "aggregate_mb_s": round(agg_mb_s, 1),
                "single_mb_s_runs": [round(x, 1) for x in singles],
                "aggregate_mb_s_runs": [round(x, 1) for x in aggs],
                "wall_s": round(statistics.median(walls), 2),
                # Each run measures one guest alone and then four at once, back to back: the ratio of
                # each pair cancels the machine's load drift between runs; its median is the figure
                # (the ratio of the two medians is given too).
                "aggregate_over_single": round(statistics.median(a / s1 for a, s1 in zip(aggs, singles)), 3),
                "aggregate_over_single_runs": [round(a / s1, 3) for a, s1 in zip(aggs, singles)],
                "median_aggregate_over_median_single": round(agg_mb_s / single_mb_s, 3) if single_mb_s else None,
                "completed": completed, "errors": errors, "peak_rss_source_mib": a.peak_rss_mib(),
                "peak_rss_destination_mib": b.peak_rss_mib()}
    finally:
        _stop(a, b)


def _scale(root, tag, base, *, memory: int, warm_memory: int, runs: int) -> dict:
    """A big guest: total time and the per-round costs (dirty-log sync, bitmap) the source reports, or an
    in-process replay of them."""
    need = 2 * memory + SCALE_HEADROOM
    avail = _mem_available()
    prefill = avail >= need
    if avail and avail < memory + SCALE_HEADROOM:
        return {"skipped": f"needs ~{need / GiB:.0f} GiB of available memory, {avail / GiB:.1f} GiB available"}
    a, b = _pair(root, tag, _fresh_dirs(root, tag, base))
    try:
        ws = 256.0 if memory >= GiB else max(16.0, memory / MiB / 4)
        args = {"memory": memory, "seed": 7, "prefill": prefill, "shared_fraction": 0.25, "dirty_rate": 32.0,
                "working_set": ws}
        _one_run(a, b, "warm", {**args, "memory": warm_memory, "prefill": True}, verify=False)
        measured = [_one_run(a, b, f"big{i}", args) for i in range(runs)]
        out = _summarise(measured, memory, a, b, 1)
        out["prefill"] = prefill
        if not prefill:
            out["note"] = (f"run without prefill ({avail / GiB:.1f} GiB available, {need / GiB:.0f} GiB "
                           f"wanted): untouched pages are zero on the source")
        rounds = measured[len(measured) // 2]["round_summaries"]
        out["rounds_detail"] = [{k: r.get(k) for k in ("round", "pages", "dirty_pages", "seconds", "sync_ms",
                                                        "bitmap_ms", "decision") if k in r} for r in rounds]
        syncs = [r["sync_ms"] for r in rounds if isinstance(r.get("sync_ms"), (int, float))]
        bitmaps = [r["bitmap_ms"] for r in rounds if isinstance(r.get("bitmap_ms"), (int, float))]
        # per pre-copy round, as the source measured them (round 1 syncs a whole round's worth of writes)
        out["dirty_sync_ms_per_round"] = syncs or None
        out["bitmap_ms_per_round"] = bitmaps or None
        out["dirty_sync_plus_bitmap_share_of_precopy"] = (
            round(sum(syncs + bitmaps) / 1000 / sum(r.get("seconds") or 0 for r in rounds[:len(syncs)]), 5)
            if syncs and rounds[:len(syncs)] else None)
    finally:
        _stop(a, b)
    if not out.get("dirty_sync_ms_per_round"):
        # The source does not (yet) time its dirty-log syncs: replay each round's dirty-page count on a
        # guest of the same size in this process, with the very HostView calls the source makes.
        out["replay"] = _replay_round_costs(memory, [int(r.get("dirty_pages") or 0) for r in rounds])
    return out


def _replay_round_costs(memory: int, dirty_counts: list[int]) -> dict:
    """Per round: get_and_clear_dirty_log() + page_enc_bitmap() for that round's number of dirty pages
    (scattered over the working set) on a `memory`-byte guest; and one page_enc_bitmap() copy, which the
    source makes per 256-page batch (so a round of N pages costs N/256 copies)."""
    import random

    import numpy as np

    from sevmigd.guest.vm import GuestConfig, SevVm
    from sevmigd.psp.firmware import Firmware
    from sevmigd.psp.identity import FleetCA, PlatformIdentity

    rng = random.Random(3).randbytes
    fw = Firmware(PlatformIdentity.create(FleetCA.create(rng, rsa_bits=2048), rng), rng=rng)
    fw.init()
    vm = SevVm.launch(fw, GuestConfig("replay", memory, shared_fraction=0.25), asid=1, rng=rng)
    try:
        k = vm._kernel
        host = vm.host
        host.enable_dirty_log()
        g = np.random.default_rng(0)
        hi = vm.npages
        lo = max(k.layout.pool_start, hi - (256 << 20) // 4096)   # the 256 MiB working set
        sync_ms = []
        for n in dirty_counts:
            if n:
                k.write_workload(np.unique(g.integers(lo, hi, n)))
            t = time.perf_counter()
            host.get_and_clear_dirty_log()
            host.page_enc_bitmap()
            sync_ms.append(round((time.perf_counter() - t) * 1000, 3))
        copies = []
        for _ in range(20):
            t = time.perf_counter()
            host.page_enc_bitmap()
            copies.append(time.perf_counter() - t)
        copy_ms = statistics.median(copies) * 1000
        return {"sync_ms_per_round": sync_ms,
                "bitmap_copy_ms_per_batch": round(copy_ms, 4),
                "bitmap_copies_ms_round1": round(copy_ms * (vm.npages // 256), 1),
                "note": "in-process replay of the source's HostView calls (the source daemon reports no "
                        "sync_ms yet); round 1 copies the whole bitmap once per 256-page batch"}
    finally:
        vm.release()


def run(quick: bool = False, size: int | None = None, only: str | None = None, runs: int | None = None) -> dict:
    """All scenarios (or `only`, comma-separated). `quick`: 128 MiB guests, one run, no warm-up, a 512 MiB
    scale guest (a smoke run: figures not comparable)."""
    size = size or (128 * MiB if quick else GiB)
    runs = runs or (1 if quick else RUNS)
    warmup = 0 if quick else WARMUP
    wanted = SCENARIOS if not only else tuple(s.strip() for s in only.split(",") if s.strip())
    ws = max(16.0, size / MiB / 4)  # 256 MiB of a 1 GiB guest
    root = pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-bench-"))
    out: dict = {"guest_mib": size / MiB, "runs": runs, "warmup_runs": warmup, "prefill": True,
                 "timing": TIMING}
    try:
        base = root / "base"
        base.mkdir()
        new_fleet_dirs(base, ["a", "b"])
        common = dict(root=root, base=base, runs=runs, warmup=warmup)

        def scen(name, plaintext=False, **launch):
            return _scenario(common["root"], name, common["base"], memory=size, launch=launch,
                             runs=runs, warmup=warmup, plaintext=plaintext)

        table = {
            "dirty_32": lambda: scen("dirty_32", shared_fraction=0.25, dirty_rate=32.0, working_set=ws),
            "mixed_idle": lambda: scen("mixed_idle", shared_fraction=0.25),
            "private_idle": lambda: scen("private_idle", shared_fraction=0.0),
            "shared_idle": lambda: scen("shared_idle", shared_fraction=1.0),
            "private_idle_plaintext": lambda: scen("private_idle_plaintext", shared_fraction=0.0, plaintext=True),
            "shared_idle_plaintext": lambda: scen("shared_idle_plaintext", shared_fraction=1.0, plaintext=True),
            "concurrent_4": lambda: _concurrent(root, "concurrent_4", base, memory=max(size // 4, 32 * MiB), n=4,
                                                runs=runs, warmup=warmup),
            "scale_8g": lambda: _scale(root, "scale_8g", base, memory=512 * MiB if quick else SCALE_SIZE,
                                       warm_memory=size, runs=1 if quick else SCALE_RUNS),
        }
        for name in wanted:
            if name not in table:
                out[name] = {"skipped": f"unknown scenario (known: {', '.join(SCENARIOS)})"}
                continue
            print(f"   migration.{name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                out[name] = table[name]()
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            if isinstance(out[name], dict):
                out[name]["bench_seconds"] = round(time.monotonic() - t0, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = None
    if "--only" in argv:
        only = argv[argv.index("--only") + 1]
    for i, arg in enumerate(argv):
        if arg == "--set" and i + 1 < len(argv):      # --set KEY=VALUE (an int, a float or a string)
            key, _, value = argv[i + 1].partition("=")
            for conv in (int, float):
                try:
                    value = conv(value)
                    break
                except ValueError:
                    pass
            EXTRA_CONFIG[key] = value
    print(json.dumps(run(quick="--quick" in argv, only=only), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
