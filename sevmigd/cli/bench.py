"""`sevmigd bench` (also `make bench`): every benchmark in one run, a table, and JSON.

Each section is a module under `sevmigd.bench` with `run(**options) -> dict` of figures. Sections
that cannot run here (QEMU not installed, a layer not built yet) report `skipped` with the reason
rather than failing the whole run: a benchmark is a measurement, never a test that fails on a slow
machine. Targets (issue 8) are evaluated from the figures and printed as met / missed.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

# Order matters only for the printout: micro-benchmarks first, the long migration runs last.
SECTIONS = ("psp", "guest", "wire", "qemu", "migration")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks, print a table, write JSON")
    p.add_argument("--json", metavar="FILE", help="write all figures to FILE as JSON")
    p.add_argument("--only", metavar="SECTIONS",
                   help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true",
                   help="smaller guests and fewer repeats (a smoke run, figures not comparable)")
    p.set_defaults(func=_bench)


def _run_section(name: str, quick: bool) -> dict:
    try:
        mod = importlib.import_module(f"sevmigd.bench.{name}")
    except ImportError as exc:
        return {"skipped": f"benchmark module not available: {exc}"}
    start = time.monotonic()
    try:
        kwargs = {"quick": True} if quick and "quick" in mod.run.__code__.co_varnames else {}
        figures = mod.run(**kwargs)
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


def evaluate_targets(results: dict) -> list[tuple[str, str, str]]:
    """Issue 8 targets from the figures: (target, measured, verdict)."""
    out = []
    q = _get(results, "qemu.total_time_ms")
    priv = _get(results, "migration.private_idle.total_time_ms")
    shared = _get(results, "migration.shared_idle.total_time_ms")
    if q and priv:
        r = priv / q
        out.append(("private 1 GiB within 2x of QEMU", f"{r:.2f}x", "met" if r <= 2 else "missed"))
    if q and shared:
        r = shared / q
        out.append(("shared 1 GiB within 1.2x of QEMU", f"{r:.2f}x", "met" if r <= 1.2 else "missed"))
    limit = _get(results, "psp.crypto_limit_mb_s")
    thr = _get(results, "migration.private_idle.throughput_mb_s")
    if limit and thr:
        r = thr / limit
        out.append((">= 80% of the crypto limit", f"{100 * r:.0f}%", "met" if r >= 0.8 else "missed"))
    down = _get(results, "migration.dirty_32.downtime_ms")
    if down is not None:
        out.append(("downtime <= 300 ms (32 MiB/s guest)", f"{down:.0f} ms",
                    "met" if down <= 300 else "missed"))
    exp = _get(results, "migration.dirty_32.expected_downtime_ms")
    if down is not None and exp:
        r = abs(down - exp) / exp
        out.append(("downtime within 25% of expected", f"{100 * r:.0f}%",
                    "met" if r <= 0.25 else "missed"))
    for side in ("source", "destination"):
        rss = _get(results, f"migration.private_idle.peak_rss_{side}_mib")
        gib = _get(results, "migration.private_idle.guest_mib")
        if rss and gib:
            out.append((f"peak RSS {side} <= guest + 100 MiB", f"{rss:.0f} MiB",
                        "met" if rss <= gib + 100 else "missed"))
    agg = _get(results, "migration.concurrent_4.aggregate_over_single")
    if agg:
        out.append(("4 concurrent >= 90% of one", f"{100 * agg:.0f}%", "met" if agg >= 0.9 else "missed"))
    return out


def _bench(args) -> int:
    wanted = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"sevmigd bench: unknown section(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nfigures written to {args.json}")
    return 0
