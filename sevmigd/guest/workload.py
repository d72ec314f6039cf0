"""Deterministic guest workload planning: how many pages to dirty and flip in a run step, and which.

Owns: rate arithmetic (with fractional carries kept in vCPU registers so that many small run(dt)
steps add up to the configured rate exactly), the seeded page choice, and the flip direction that
keeps the configured share of workload pages shared. Pure: no RAM access; the guest kernel executes
the plan (`kernel.GuestKernel.run_step`).

Determinism: the random choices of step n come from a PCG64 generator seeded with (seed, n); the step
counter lives in a register, so the same seed and the same sequence of run(dt) calls give the same
pages, versions and therefore the same memory, on any host and across a migration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bounds of the knobs (refused at launch, see there): in sevmigd.limits, where the CLI reads them too.
from sevmigd.limits import MAX_DIRTY_RATE_MIB_S, MAX_FLIP_RATE  # noqa: F401
from sevmigd.units import PAGE_SIZE
PAGES_PER_MIB = (1 << 20) // PAGE_SIZE
#: Fixed-point scale of the fractional carries kept in registers (u64 registers, so no floats).
CARRY_ONE = 1 << 32
#: Candidates drawn per flip event when looking for a page in the wanted state; with a shared share
#: f, a draw fails with probability ~(1-f) or f, so 8 draws find one except for extreme fractions
#: (the event is then skipped, and the rate slightly undershoots; documented behaviour).
FLIP_CANDIDATES = 8


@dataclass(frozen=True)
class WorkloadParams:
    dirty_rate_mib_s: float
    ws_lo: int              # working set: pfns [ws_lo, ws_hi)
    ws_hi: int
    pool_lo: int            # all workload pages: [pool_lo, pool_hi)
    pool_hi: int
    shared_target: int      # workload pages kept shared
    flip_rate: float        # flips per second
    seed: int

    @classmethod
    def build(cls, *, pool_lo: int, pool_hi: int, dirty_rate_mib_s: float, working_set_mib,
              shared_fraction: float, flip_rate: float, seed: int) -> "WorkloadParams":
        pool = pool_hi - pool_lo
        ws = pool if working_set_mib is None else min(pool, max(1, int(working_set_mib * PAGES_PER_MIB)))
        # The working set sits at the top of the pool, where the initially shared pages are too,
        # so a small working set still sees shared pages.
        target = min(pool, int(round(shared_fraction * pool)))
        return cls(float(dirty_rate_mib_s), pool_hi - ws, pool_hi, pool_lo, pool_hi, target,
                   float(flip_rate), int(seed) & ((1 << 64) - 1))


def _take(regs: dict, carry_key: str, per_s: float, dt: float) -> int:
    total = regs[carry_key] + int(per_s * dt * CARRY_ONE)
    n, regs[carry_key] = divmod(total, CARRY_ONE)
    return n


def plan_counts(p: WorkloadParams, regs: dict, dt: float) -> tuple[int, int]:
    """(page writes, flips) due in a step of `dt` effective seconds; updates the carries."""
    writes = _take(regs, "wl_dcarry", p.dirty_rate_mib_s * PAGES_PER_MIB, dt) if p.dirty_rate_mib_s > 0 else 0
    flips = _take(regs, "wl_fcarry", p.flip_rate, dt) if p.flip_rate > 0 else 0
    return writes, flips


def step_rng(p: WorkloadParams, step: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([p.seed, step]))


def pick_writes(p: WorkloadParams, g: np.random.Generator, n: int) -> np.ndarray:
    """n pages of the working set (sorted, de-duplicated: a page written twice in a step is dirtied once)."""
    return np.unique(g.integers(p.ws_lo, p.ws_hi, n, dtype=np.int64))


def pick_flip_candidates(p: WorkloadParams, g: np.random.Generator, n: int) -> np.ndarray:
    """FLIP_CANDIDATES candidate pages per flip event, in draw order (shape (n, FLIP_CANDIDATES))."""
    return g.integers(p.pool_lo, p.pool_hi, (n, FLIP_CANDIDATES), dtype=np.int64)


def flip_direction(p: WorkloadParams, regs: dict) -> bool:
    """True = make a private page shared. Moves the shared count toward its target; on target it
    alternates (one page out, one back), so flips never drift the configured share."""
    cur = regs["wl_shared"]
    if cur < p.shared_target:
        return True
    if cur > p.shared_target:
        return False
    regs["wl_fparity"] ^= 1
    return bool(regs["wl_fparity"])
