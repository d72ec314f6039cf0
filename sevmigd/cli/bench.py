"""`sevmigd bench` (also `make bench`): every benchmark in one run, a table, and JSON.

Each section is a module under `sevmigd.bench` with `run(quick=False, **options) -> dict` of figures.
A section that cannot run here (QEMU not installed) reports `skipped` with the reason rather than
failing the whole run: a benchmark is a measurement, never a test that fails on a slow machine. A
section that fails to import is a bug, and crashes the run. Targets (issue 8) are evaluated from the figures and printed as met / missed.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

# Order matters only for the printout: micro-benchmarks first, the long migration runs last.
SECTIONS = ("psp", "guest", "wire", "workers", "qemu", "migration")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks, print a table, write JSON")
    p.add_argument("--json", metavar="FILE", help="write all figures to FILE as JSON")
    p.add_argument("--only", metavar="SECTIONS",
                   help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true",
                   help="smaller guests and fewer repeats (a smoke run, figures not comparable)")
    p.set_defaults(func=_bench)


def _run_section(name: str, quick: bool) -> dict:
    mod = importlib.import_module(f"sevmigd.bench.{name}")  # every section ships with the package
    start = time.monotonic()
    try:
        figures = mod.run(quick=quick)  # every section's run() takes quick=
    except Exception as exc:  # a broken section must not hide the others' figures
        return {"error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5)}
    if isinstance(figures, dict):
        figures.setdefault("bench_seconds", round(time.monotonic() - start, 1))
    return figures


def _flatten(prefix: str, value, rows: list) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "traceback":
                continue
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    elif isinstance(value, float):
        rows.append((prefix, f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, rows)
    elif isinstance(value, list) and len(value) > 8:
        rows.append((prefix, f"[{len(value)} values]"))
    else:
        rows.append((prefix, str(value)))


def _get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _ratio_to_qemu(results: dict, scenario: str) -> float | None:
    """Migration time of `scenario` over QEMU's for the same guest size (sizes differ only in --quick
    runs; then the times are scaled by size, i.e. the throughputs are compared). Both sides timed the same
    way: client-side `wall_ms` (migrate sent -> guest on the destination) when both have it, else each
    side's own `total_time_ms`."""
    key = "wall_ms" if (_get(results, "qemu.wall_ms") and _get(results, f"migration.{scenario}.wall_ms")) \
        else "total_time_ms"
    q = _get(results, f"qemu.{key}")
    q_bytes = _get(results, "qemu.guest_bytes")
    ours = _get(results, f"migration.{scenario}.{key}")
    mib = _get(results, f"migration.{scenario}.guest_mib")
    if not (q and q_bytes and ours and mib):
        return None
    return (ours / (mib * (1 << 20))) / (q / q_bytes)


# Scenarios whose peak RSS is held to "guest size + 100 MiB" (one guest per daemon at a time).
RSS_SCENARIOS = ("dirty_32", "mixed_idle", "private_idle", "shared_idle", "scale_8g")


def evaluate_targets(results: dict) -> list[tuple[str, str, str]]:
    """Issue 8 targets from the figures: (target, measured, verdict). A target whose figures are missing
    (section skipped or failed) is listed as "n/a" rather than silently dropped."""
    out = []

    def add(target, value, fmt, ok):
        if value is None:
            out.append((target, "no figure", "n/a"))
        else:
            out.append((target, fmt(value), "met" if ok(value) else "missed"))

    x = lambda v: f"{v:.2f}x"          # noqa: E731
    add("private 1 GiB (100 % private) within 2x of QEMU", _ratio_to_qemu(results, "private_idle"), x,
        lambda r: r <= 2)
    add("mixed 1 GiB (75 % private) within 2x of QEMU", _ratio_to_qemu(results, "mixed_idle"), x,
        lambda r: r <= 2)
    limit = _get(results, "psp.crypto_limit_mb_s")
    thr = _get(results, "migration.private_idle.throughput_mb_s")
    add(">= 80 % of the crypto limit (private 1 GiB)", thr / limit if limit and thr else None,
        lambda r: f"{100 * r:.0f} % ({thr:.0f} of {limit:.0f} MB/s)", lambda r: r >= 0.8)
    add("shared 1 GiB within 1.2x of QEMU", _ratio_to_qemu(results, "shared_idle"), x, lambda r: r <= 1.2)
    # QEMU's default peer has no TLS: the same two comparisons over a plaintext channel.
    add("private 1 GiB within 3.6x of QEMU, plaintext like QEMU (issue 16)",
        _ratio_to_qemu(results, "private_idle_plaintext"), x, lambda r: r <= 3.6)
    add("shared 1 GiB within 1.2x of QEMU, plaintext like QEMU (issue 16)",
        _ratio_to_qemu(results, "shared_idle_plaintext"), x, lambda r: r <= 1.2)
    # Issue 16: each side's PSP batch and each daemon's CPU per private page against that side's floor.
    for side, batch, floor in (("source", "send_update_data_batch", "source"),
                               ("destination", "receive_update_data_batch", "destination")):
        fl = _get(results, f"psp.crypto_limit_{floor}_us_per_page")
        b = _get(results, f"psp.{batch}_us_per_page")
        add(f"{side} PSP batch per page <= 1.5x its crypto floor (issue 16)", b / fl if b and fl else None,
            lambda r, b=b, fl=fl: f"{r:.2f}x ({b:.2f} of {fl:.2f} us)", lambda r: r <= 1.5)
        sc = "private_idle_plaintext" if _get(results, f"migration.private_idle_plaintext.cpu_{side}_us_per_page") \
            else "private_idle"
        cpu = _get(results, f"migration.{sc}.cpu_{side}_us_per_page")
        add(f"{side} daemon CPU per private page <= 1.5x its crypto floor (issue 16)",
            cpu / fl if cpu and fl else None,
            lambda r, cpu=cpu, fl=fl, sc=sc: f"{r:.2f}x ({cpu:.2f} of {fl:.2f} us, {sc})", lambda r: r <= 1.5)
    load = _get(results, "workers.load_average_1m")
    for side in ("source_alone_to_counting_sink", "destination_alone_recorded_stream"):
        bound = _get(results, f"workers.{side}.speedup_bound_2_idle_cores")
        add(f"{side.replace('_', ' ')}: 2 workers >= 1.7x one (issue 16)",
            _get(results, f"workers.{side}.speedup_2_over_1"),
            lambda r, bound=bound: f"{r:.2f}x" + (f" (CPU bound on 2 idle cores {bound:.2f}x, load {load})"
                                                  if bound else ""), lambda r: r >= 1.7)
    down = _get(results, "migration.dirty_32.downtime_ms")
    add("downtime <= 300 ms (32 MiB/s guest)", down, lambda v: f"{v:.0f} ms", lambda v: v <= 300)
    err = _get(results, "migration.dirty_32.downtime_error_pct")
    pairs = list(zip(_get(results, "migration.dirty_32.downtime_ms_runs") or [],
                     _get(results, "migration.dirty_32.expected_downtime_ms_runs") or []))
    shown = ", ".join(f"{d:.0f}/{e:.0f}" for d, e in pairs if d is not None and e is not None)
    add("downtime within 25 % of the expected downtime", err,
        lambda v: f"{v:.0f} % median |measured - expected| / expected (ms measured/expected: {shown})",
        lambda v: v <= 25)
    for side in ("source", "destination"):
        worst = None
        for sc in RSS_SCENARIOS:
            rss = _get(results, f"migration.{sc}.peak_rss_{side}_mib")
            mib = _get(results, f"migration.{sc}.guest_mib")
            if rss and mib and (worst is None or rss - mib > worst[0]):
                worst = (rss - mib, sc, rss, mib)
        add(f"peak RSS {side} <= guest + 100 MiB", worst,
            lambda w: f"guest + {w[0]:.0f} MiB ({w[1]}: {w[2]:.0f} MiB for {w[3]:.0f} MiB)",
            lambda w: w[0] <= 100)
    agg = _get(results, "migration.concurrent_4.aggregate_over_single")
    add("4 concurrent >= 90 % of one", agg, lambda v: f"{100 * v:.0f} %", lambda v: v >= 0.9)
    return out


def _bench(args) -> int:
    wanted = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"sevmigd bench: unknown section(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    # The daemons tune their allocator at start (sevmigd.daemon.malloc); the in-process sections (psp,
    # guest, wire) run with the same tuning so their figures describe the daemon's code path.
    from sevmigd.daemon.malloc import tune_malloc

    tune_malloc()
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": bool(args.quick)}
    for name in wanted:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        results[name] = _run_section(name, args.quick)
    results["targets"] = [dict(target=t, measured=m, verdict=v) for t, m, v in evaluate_targets(results)]

    rows: list = []
    for name in wanted:
        _flatten(name, results[name], rows)
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'figure':<{width}}  value")
    print(f"{'-' * width}  -----")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if results["targets"]:
        print("\nTargets (issue 8):")
        for t in results["targets"]:
            print(f"  {t['verdict']:<7} {t['target']}: {t['measured']}")
        if results.get("quick"):
            print("  (--quick: small guests and single runs, figures not comparable)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nfigures written to {args.json}")
    return 0
