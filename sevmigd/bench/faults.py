"""The network-fault matrix (`make faults`, `python -m sevmigd.bench.faults`): every fault kind at every
migration phase with several seeds, against two real daemons, every cell checked for the five
invariants of issue 6 (sevmigd/testing/invariants.py). Prints a table, one row per fault kind, one
column per phase, each cell "3/3 ok" or the invariants that failed ("2/3 I1"), then detection-time
figures and every failure with its reason. Exit status 0 when every cell holds every invariant.

Flags (FAULTS_ARGS in make): --seeds N, --kinds a,b, --phases x,y, --json FILE, --verbose.
It prints figures; it asserts nothing about timings beyond the invariant bounds it reports.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import trio

from sevmigd.testing.cells import DAEMON_DEATHS, KINDS, PEER_TIMEOUT_S, Harness, guests_outlive_daemons
from sevmigd.testing.faultproxy import PHASES


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m sevmigd.bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds (default all: "
                                                              + ", ".join(KINDS) + ")")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases (default all: "
                                                                + ", ".join(PHASES) + ")")
    p.add_argument("--json", metavar="FILE", help="write every cell's result as JSON")
    p.add_argument("--root", metavar="DIR", help="work directory (default: a temp dir, removed)")
    p.add_argument("--verbose", action="store_true", help="print each cell as it finishes")
    p.add_argument("--vmm", choices=("inline", "process"), help="the daemons' `vmm` key (default: theirs); with "
                   "process every daemon death must lose no guest")
    a = p.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if k]
    phases = [x for x in a.phases.split(",") if x]
    bad = [k for k in kinds if k not in KINDS] + [x for x in phases if x not in PHASES]
    if bad:
        p.error(f"unknown kind/phase: {', '.join(bad)}")
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    return a, kinds, phases


def table(results, kinds, phases, seeds) -> str:
    """The outcome table: rows = kinds, columns = phases."""
    width = max(12, *(len(p) for p in phases))
    kw = max(len(k) for k in kinds)
    lines = [" " * kw + " | " + " | ".join(p.ljust(width) for p in phases)]
    lines.append("-" * len(lines[0]))
    for k in kinds:
        cells = []
        for ph in phases:
            rs = [r for r in results if r.kind == k and r.phase == ph]
            ok = sum(r.ok for r in rs)
            if not rs:
                cells.append("-".ljust(width))
                continue
            bad = sorted({t for r in rs if not r.ok for t in r.short().split(",")})
            txt = f"{ok}/{len(rs)} ok" if not bad else f"{ok}/{len(rs)} {','.join(bad)}"
            cells.append(txt.ljust(width))
        lines.append(k.ljust(kw) + " | " + " | ".join(cells))
    return "\n".join(lines)


def outcomes(results, kinds, phases) -> str:
    """How each cell ended (completed / failed / uncertain->daemon / lost), most common per cell."""
    width = max(12, *(len(p) for p in phases))
    kw = max(len(k) for k in kinds)
    lines = [" " * kw + " | " + " | ".join(p.ljust(width) for p in phases)]
    for k in kinds:
        row = []
        for ph in phases:
            rs = [r.outcome.split("->")[0] for r in results if r.kind == k and r.phase == ph]
            row.append((max(set(rs), key=rs.count) if rs else "-").ljust(width))
        lines.append(k.ljust(kw) + " | " + " | ".join(row))
    return "\n".join(lines)


def figures(results) -> str:
    out = []
    for cls in ("immediate", "next_frame", "stall"):
        ds = [r.detect_src_s for r in results if KINDS[r.kind] == cls and r.detect_src_s is not None]
        dd = [r.detect_dst_s for r in results if KINDS[r.kind] == cls and r.detect_dst_s is not None]
        for who, xs in (("source", ds), ("destination", dd)):
            if xs:
                out.append(f"detection {cls:10s} {who:11s}: n={len(xs):3d} median {statistics.median(xs)*1000:7.1f} ms"
                           f"  max {max(xs)*1000:7.1f} ms")
    secs = [r.seconds for r in results]
    if secs:
        out.append(f"cells: {len(results)}, wall {sum(secs):.0f} s, median {statistics.median(secs):.2f} s per cell")
    auto = [r for r in results if r.settled_by_query]
    if auto:
        out.append(f"uncertain hand-offs settled by themselves (settlement query, no command): {len(auto)} cells")
    res = [r for r in results if r.resolve_commands]
    if res:
        out.append(f"uncertain hand-offs settled by resolve commands: {len(res)} cells, "
                   f"max {max(r.resolve_commands for r in res)} command(s)")
    return "\n".join(out)


async def run(kinds, phases, seeds, root: pathlib.Path, *, verbose=False, on_result=None, vmm=None):
    results = []
    async with Harness(root, log=(print if verbose else None), vmm=vmm) as h:
        for seed in range(seeds):
            for k in kinds:
                for ph in phases:
                    r = await h.run_cell(k, ph, seed)
                    results.append(r)
                    if on_result:
                        on_result(r)
                    if verbose or not r.ok:
                        print(f"[{len(results)}] {k}@{ph} seed {seed}: {r.short()} ({r.outcome}, "
                              f"{r.error_code}, {r.seconds} s) {r.fired}", flush=True)
                        for f in r.failures:
                            print(f"      {f}", flush=True)
    return results


def main(argv=None) -> int:
    a, kinds, phases = _parse(argv if argv is not None else sys.argv[1:])
    root = pathlib.Path(a.root) if a.root else pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"fault matrix: {len(kinds)} kinds x {len(phases)} phases x {a.seeds} seeds = "
          f"{len(kinds) * len(phases) * a.seeds} cells (peer_timeout_s {PEER_TIMEOUT_S} s)", flush=True)
    if any(k in DAEMON_DEATHS for k in kinds):
        print("daemon deaths: " + ("the guest must survive (VMM processes)" if guests_outlive_daemons(a.vmm) else
                                   "guests live in the daemon process, so a dead source daemon's guest may be lost "
                                   "(allowed until VMM processes, issue 17)"), flush=True)
    try:
        results = trio.run(lambda: run(kinds, phases, a.seeds, root, verbose=a.verbose, vmm=a.vmm))
    finally:
        if not a.root:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(results, kinds, phases, a.seeds))
    print()
    print("outcomes (most common per cell):")
    print(outcomes(results, kinds, phases))
    print()
    print(figures(results))
    print(f"total wall time {time.monotonic() - t0:.0f} s")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"\n{len(failed)} cell(s) failed:")
        for r in failed:
            print(f"  {r.kind}@{r.phase} seed {r.seed} ({r.outcome}, {r.fired}):")
            for f in r.failures:
                print(f"      {f}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
