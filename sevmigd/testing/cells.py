"""One cell of the fault matrix: a fault kind at a phase with a seed, run against two real daemons,
then every invariant checked (sevmigd/testing/invariants.py). Shared by `tests/test_faults.py` (a
representative subset) and `python -m sevmigd.bench.faults` (the whole matrix, `make faults`).

`Harness` owns two daemons of one fleet and one guest. Daemons are reused across cells: a cell ends with
a fresh (fault-free) migration of the guest (invariant 3), so the guest sits on the other daemon and the
next cell migrates in the opposite direction. A killed daemon is restarted on its state dir and port; a
guest lost with its host (the source killed) is launched again.

A cell:
  1. baseline of both daemons (fds, server-info, guests); log positions
  2. migrate source -> FaultProxy -> destination with the fault scripted at the phase
  3. wait for both sides to finish (deadline), SIGCONT a stopped daemon, restart a killed one,
     "the network is back" (the proxy goes transparent)
  4. I1 on the snapshot (an uncertain hand-off is allowed only after "go" reached the proxy), then, if
     uncertain: wait for its automatic settlement (the source's settlement query through the proxy, now
     transparent: the network is back), else one `resolve` command -- needed only when the destination
     daemon was killed after it started the guest (it died with the daemon); then exactly one copy
  5. I2 on the survivor, I4 detection from the proxy's fire time to each daemon's failure log line
  6. I3: both daemons answer, a fresh migration succeeds; I5: leaks against the baseline
"""

from __future__ import annotations

import pathlib
import signal
import time
from dataclasses import dataclass, field

import trio

from sevmigd.testing import invariants as inv
from sevmigd.testing.daemons import ControlFailure, DaemonProcess, DaemonStartError, Fleet, astart_daemon, start_daemon
from sevmigd.testing.faultproxy import PHASES, Fault, FaultProxy

# Test daemon configuration: a short peer timeout keeps stall cells short (a separate test shows the
# default 10 s applies); keepalives at a quarter of it. 3 s rather than less so that the detection bounds
# below keep "at once" (a reset, a corrupt frame) apart from "by the peer timeout" with room for a loaded
# machine's scheduling delays.
PEER_TIMEOUT_S = 3.0
KEEPALIVE_S = 0.75
HANDSHAKE_TIMEOUT_S = 2.0
# Pre-copy gives up (CONVERGENCE_FAILED) after this long: a collapsed network must end in a clean give-up
# within it, not in a migration that runs for hours (normal cells take ~1 s).
MAX_TOTAL_S = 6.0
# Guest and migration shape: 16 MiB, a 0.5 MiB working set dirtied at 4 MiB/s, migrated at 32 MiB/s with
# an 8 ms downtime limit, so that every migration has a first round (~0.5 s), at least one later round and
# a stop-and-copy (measured: 3 rounds, ~0.5 s total on an idle box).
GUEST_MEMORY = "16M"
GUEST_BYTES = 16 << 20
GUEST_ARGS = {"dirty_rate": 4.0, "working_set": 0.5, "shared_fraction": 0.1}
DOWNTIME_LIMIT_MS = 8
BANDWIDTH_MIB_S = 32.0
# Bandwidth collapse (to 256 KiB/s: a 16 MiB first round would take a minute) and latency cells.
COLLAPSE_BYTES_S = 256 << 10
LATENCY_S = 0.05
# Slack over a detection bound for scheduling on a loaded 2-core box (two daemons, the harness and a
# benchmark sharing it: timers and log lines arrive late by up to ~1-2 s there). An "immediate" fault may
# need the next frame, a keepalive interval away (bound 2.5 s, still under the 3 s peer timeout); a stalled
# peer must be reported by the peer timeout (bound 5 s, still under max_total_s).
DETECT_SLACK_S = 1.75
STALL_SLACK_S = 2.0
# A cell's migration never takes longer than this (deadline; a hang is reported, not waited out).
CELL_MIGRATE_TIMEOUT_S = 45.0
# Settlement queries (issue 17) at once, then every 0.25 s doubling to 1 s: once the network is back an
# uncertain hand-off settles within about a second plus one query.
SETTLE_RETRY_INITIAL_S = 0.25
SETTLE_RETRY_MAX_S = 1.0
# How long the harness waits for an uncertain hand-off to resolve itself before it issues `resolve`.
AUTO_RESOLVE_WAIT_S = PEER_TIMEOUT_S * 3 + SETTLE_RETRY_MAX_S

# Fault kinds of the matrix. "immediate": must be detected at once (bound: one keepalive interval, in
# case the fault only shows at the next frame, plus slack); "stall": within the peer timeout;
# "next_frame": a lost or held-back frame shows as a sequence gap at the next frame, which is a keepalive
# away at most once keepalives run, but in the handshake (no keepalives yet) nothing follows and only the
# handshake timeout can tell, so the bound is the stall bound; "benign": the migration may succeed (it
# must then still hold every invariant, and a failure must still be detected like a stall).
KINDS = {
    "reset": "immediate", "close": "immediate", "half_close": "immediate", "blackhole": "stall",
    "corrupt_header": "immediate", "corrupt_body": "immediate", "corrupt_data": "immediate",
    "truncate": "immediate", "duplicate": "immediate", "replay": "immediate", "reorder": "next_frame",
    "drop": "next_frame", "latency": "benign", "collapse": "benign",
    "kill_dst": "immediate", "stop_dst": "stall", "kill_src": "immediate",
    "restart_src": "immediate", "restart_dst": "immediate",
}
# Daemon deaths (issue 17): kill_src / kill_dst are SIGKILL at the phase and a restart on the same state dir,
# port and runtime dir; restart_src / restart_dst are a graceful restart (SIGTERM, wait for the exit, start
# again). The guest must survive its daemon's death only where VMM processes keep guests outside the daemon
# (`Harness.guests_survive`); in-daemon guests die with it, which the rules below then allow.
DAEMON_DEATHS = ("kill_src", "kill_dst", "restart_src", "restart_dst")
RESTARTS = ("restart_src", "restart_dst")
# A graceful stop waits for migrations up to the daemon's SHUTDOWN_MIGRATIONS_S (20 s), then exits.
RESTART_EXIT_TIMEOUT_S = 40.0
# Fields corrupted by corrupt_data, per phase (the seed picks one): ciphertext, SEV packet header and a
# shared page in the rounds; the bitmap, the last pages and the vCPU state in stop-and-copy; the MAC of
# the bodiless control messages; the key share / session blob in the handshake.
CORRUPT_FIELDS = {
    "handshake": ("key_share", "platform", "migration_id"),
    "first_round": ("enc_data", "enc_headers", "shr_data"),
    "later_round": ("enc_data", "enc_headers", "shr_pfns"),
    "stop_copy": ("bits", "enc_data", "regs"),
    "readiness": ("mac",), "go": ("mac",), "confirmation": ("mac",),
}


@dataclass
class CellResult:
    kind: str
    phase: str
    seed: int
    failures: list[str] = field(default_factory=list)
    outcome: str = "?"                 # completed | failed | uncertain->X | lost | error
    error_code: str | None = None
    detect_src_s: float | None = None
    detect_dst_s: float | None = None
    fired: str = ""
    resolve_commands: int = 0
    settled_by_query: bool = False     # an uncertain hand-off settled by the settlement query, no command
    seconds: float = 0.0
    logs: list = field(default_factory=list)  # failing cells: both daemons' log lines of the cell (diagnosis)

    @property
    def ok(self) -> bool:
        return not self.failures

    def short(self) -> str:
        """The invariants that failed ("I1,I4"), or "ok"."""
        if self.ok:
            return "ok"
        return ",".join(sorted({f.split()[0] for f in self.failures}))


def fault_for(kind: str, phase: str, seed: int, harness: "Harness", src: DaemonProcess, dst: DaemonProcess) -> Fault:
    """The proxy fault of a cell. The seed varies where in the phase it hits and which field is corrupted."""
    nth = 1
    if phase == "first_round":
        nth = 1 + seed % 4
    elif phase == "stop_copy":
        nth = 1 + seed % 3  # the Bitmap, the first pages after it, or the round's end
    base = dict(phase=phase, nth=nth)
    if kind == "reset":
        return Fault("reset", **base)
    if kind == "close":
        return Fault("close", **base)
    if kind == "half_close":
        return Fault("half_close", **base)
    if kind == "blackhole":
        return Fault("blackhole", **base)
    if kind == "corrupt_header":
        return Fault("corrupt", field="length", **base)
    if kind == "corrupt_body":
        return Fault("corrupt", field="body", **base)
    if kind == "corrupt_data":
        fields = CORRUPT_FIELDS[phase]
        fld = fields[seed % len(fields)]
        if phase == "stop_copy":
            base["nth"] = {"bits": 1, "enc_data": 2, "regs": 4}[fld]  # Bitmap, Pages, RoundEnd, VcpuState
        return Fault("corrupt", field=fld, **base)
    if kind == "truncate":
        return Fault("truncate", **base)
    if kind == "duplicate":
        return Fault("duplicate", **base)
    if kind == "replay":
        return Fault("replay", **base)
    if kind == "reorder":
        return Fault("reorder", **base)
    if kind == "drop":
        return Fault("drop_frame", **base)
    if kind == "latency":
        return Fault("delay", seconds=LATENCY_S, **base)
    if kind == "collapse":
        return Fault("rate", bytes_per_s=COLLAPSE_BYTES_S, **base)
    if kind == "kill_dst":
        return Fault("call", action=dst.kill_nowait, hold=True, **base)
    if kind == "stop_dst":
        return Fault("call", action=dst.freeze, **base)
    if kind == "kill_src":
        return Fault("call", action=src.kill_nowait, **base)
    if kind == "restart_src":
        return Fault("call", action=lambda: src.send_signal(signal.SIGTERM), **base)
    if kind == "restart_dst":
        return Fault("call", action=lambda: dst.send_signal(signal.SIGTERM), **base)
    raise ValueError(f"unknown fault kind {kind!r}")


def proxy_tls_for(src: DaemonProcess, dst: DaemonProcess) -> tuple:
    """(server_ctx, client_ctx) for a FaultProxy holding both hosts' TLS keys (from their state dirs): it
    answers `src` as `dst` and connects to `dst` as `src`."""
    from sevmigd import store
    from sevmigd.daemon import tls
    return (tls.server_context(store.tls_paths(dst.state_dir)), tls.client_context(store.tls_paths(src.state_dir)))


class Harness:
    """Two daemons and a guest (see the module docstring). `async with Harness(root) as h:`."""

    def __init__(self, root: pathlib.Path, *, guest: str = "g", peer_timeout_s: float = PEER_TIMEOUT_S,
                 keepalive_s: float = KEEPALIVE_S, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 log=None, hosts: tuple[str, str] = ("127.0.0.1", "127.0.0.1"),
                 netns: tuple[list[str] | None, list[str] | None] = (None, None), vmm: str | None = None):
        self.root = pathlib.Path(root)
        self.hosts = hosts
        self.netns = netns
        self.guest = guest
        self.config = {"peer_timeout_s": peer_timeout_s, "keepalive_interval_s": keepalive_s,
                       "handshake_timeout_s": handshake_timeout_s, "max_total_s": MAX_TOTAL_S,
                       "settle_retry_initial_s": SETTLE_RETRY_INITIAL_S, "settle_retry_max_s": SETTLE_RETRY_MAX_S}
        self.peer_timeout_s = peer_timeout_s
        self.keepalive_s = keepalive_s
        self.daemons: list[DaemonProcess] = []
        # Guests outlive their daemon when the daemons run one VMM process per guest (issue 17, the `vmm`
        # config key); then a daemon's death at any phase must lose no guest.
        if vmm is not None:
            self.config["vmm"] = vmm
        self.guests_survive = guests_outlive_daemons(vmm)
        self.loc = 0           # index of the daemon holding the guest
        self.launches = 0
        self.log = log or (lambda *a: None)

    @classmethod
    def create(cls, root: pathlib.Path, **kw) -> "Harness":
        """Synchronous construction (e.g. a module-scoped pytest fixture): daemons forked by the calling
        thread, the guest launched through a short trio run."""
        h = cls(root, **kw)
        fleet = Fleet()
        try:
            for i, name in enumerate(("a", "b")):
                h.daemons.append(start_daemon(h.root, name, **h._daemon_args(fleet, i)))
            trio.run(h.launch, h.daemons[0])
        except BaseException:
            h.close()
            raise
        return h

    def _daemon_args(self, fleet: Fleet, i: int) -> dict:
        return dict(fleet=fleet, config=self.config, listen=f"{self.hosts[i]}:0", launcher=self.netns[i] or (),
                    log_level="info")

    def close(self) -> None:
        for d in self.daemons:
            d.cleanup()

    async def __aenter__(self) -> "Harness":
        fleet = await trio.to_thread.run_sync(Fleet)
        for i, name in enumerate(("a", "b")):
            d = await astart_daemon(self.root, name, **self._daemon_args(fleet, i))
            self.daemons.append(d)
        await self.launch(self.daemons[0])
        return self

    async def __aexit__(self, *exc) -> None:
        for d in self.daemons:
            await trio.to_thread.run_sync(d.cleanup)

    def proxy_tls(self, src: DaemonProcess, dst: DaemonProcess):
        """TLS contexts for a fault proxy between `src` and `dst`, or None when the daemons run plaintext.
        Mutual TLS is the daemons' default, so the matrix runs with it."""
        if self.config.get("insecure_plaintext"):
            return None
        return proxy_tls_for(src, dst)

    async def launch(self, d: DaemonProcess) -> None:
        self.launches += 1
        await d.call("launch", {"name": self.guest, "memory": GUEST_MEMORY, "seed": self.launches, **GUEST_ARGS})
        self.loc = self.daemons.index(d)

    # -- one cell ---------------------------------------------------------------------------------------
    async def run_cell(self, kind: str, phase: str, seed: int) -> CellResult:
        t0 = time.monotonic()
        res = CellResult(kind, phase, seed)
        marks = [len(d.logs) for d in self.daemons]
        try:
            await self._cell(res)
        except Exception as exc:  # noqa: BLE001 - a harness-level surprise is a failed cell, with its reason
            import traceback
            res.failures.append(f"ERR harness: {type(exc).__name__}: {exc}")
            self.log("".join(traceback.format_exception(exc)))
            for d in self.daemons:
                self.log(d.describe())
                res.failures.append(f"ERR harness: {d.state_line()}")
            res.outcome = "error"
            await self._recover()
        res.seconds = round(time.monotonic() - t0, 2)
        if not res.ok:
            res.logs = [dict(daemon=d.name, t=round(r["_t"] - t0, 3),
                             **{k: v for k, v in r.items() if k in LOG_KEYS})
                        for d, m in zip(self.daemons, marks) for r in d.logs[m:]]
            res.logs.sort(key=lambda r: r["t"])
        return res

    async def _recover(self) -> None:
        """After a harness error: make sure both daemons serve and the guest runs somewhere. A daemon is
        restarted unless it answers a control request: a live process is not enough (a restart the error
        interrupted, or a daemon that stopped or crashed and removed its control socket but has not exited)."""
        for d in self.daemons:
            d.thaw()
            why = await d.serving()
            if why is not None:
                self.log(f"recover: restarting {d.name}: {why}")
                await d.arestart()
                why = await d.serving()
                if why is not None:
                    raise DaemonStartError(f"recover: {why}\n{d.describe(200)}")
        c = await inv.copies(self.daemons, self.guest)
        running = c.running_on()
        if running:
            self.loc = [d.name for d in self.daemons].index(running[0])
            return
        for d in self.daemons:
            for n in c.uncertain_on():
                if n == d.name:
                    await d.try_call("resolve", {"name": self.guest, "run_here": d is self.daemons[0]})
        c = await inv.copies(self.daemons, self.guest)
        if c.running_on():
            self.loc = [d.name for d in self.daemons].index(c.running_on()[0])
            return
        for d in self.daemons:
            if c.states.get(d.name) is not None:
                await d.try_call("stop", {"name": self.guest})
        await self.launch(self.daemons[0])

    async def _cell(self, res: CellResult) -> None:
        kind, phase, seed = res.kind, res.phase, res.seed
        src, dst = self.daemons[self.loc], self.daemons[1 - self.loc]
        name = self.guest
        base_src, base_dst = await inv.baseline(src), await inv.baseline(dst)
        ls, ld = len(src.logs), len(dst.logs)
        fault = fault_for(kind, phase, seed, self, src, dst)
        proxy = FaultProxy("127.0.0.1", dst.port, [fault], tls=self.proxy_tls(src, dst))
        outcome: dict = {}

        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            try:
                with trio.fail_after(CELL_MIGRATE_TIMEOUT_S):
                    outcome["result"] = await src.call(
                        "migrate", {"name": name, "to": f"127.0.0.1:{port}",
                                    "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                                    "max_bandwidth_mib_s": BANDWIDTH_MIB_S},
                        timeout=CELL_MIGRATE_TIMEOUT_S)
            except ControlFailure as exc:
                outcome["error"] = exc
            except trio.TooSlowError:
                res.failures.append(f"I4 migration did not end within {CELL_MIGRATE_TIMEOUT_S} s")
                outcome["error"] = None
                await self._cancel_hung(src, ls)
            # Let the destination finish its side (deadline), then: the network is back.
            if dst.alive and kind != "stop_dst":
                await self._wait_dst_settled(dst, ld)
            proxy.stop_faults()
            dst.thaw()
            if kind == "stop_dst" and dst.alive:
                await self._wait_dst_settled(dst, ld)
            if kind in RESTARTS:   # the graceful stop runs its course before the daemon starts again
                await self._wait_exit(src if kind == "restart_src" else dst)
            # The proxy stays, transparent, until the cell is judged: its address is the destination's
            # for the source, whose settlement queries go there once the network is back.
            await self._judge_cell(res, proxy, fault, outcome, src, dst, base_src, base_dst, ls, ld)
            nursery.cancel_scope.cancel()

    async def _judge_cell(self, res: CellResult, proxy: FaultProxy, fault: Fault, outcome: dict, src: DaemonProcess,
                          dst: DaemonProcess, base_src, base_dst, ls: int, ld: int) -> None:
        kind, phase = res.kind, res.phase
        res.fired = fault.fired_info if fault.fired_at is not None else "not fired"
        if fault.fired_at is None:
            res.failures.append(f"ERR fault {kind}@{phase} never fired (phases seen {proxy.phases_seen})")
        killed_src, killed_dst = not src.alive, not dst.alive
        for d in (src, dst):
            if not d.alive:
                await d.arestart()
        go_crossed = proxy.dirs["c2s"].counts.get("go", 0) > 0 and not (kind == "kill_dst" and phase == "go")
        if kind in ("drop", "half_close", "blackhole", "truncate") and phase == "go":
            go_crossed = False  # the Go frame was eaten by the fault
        if "result" in outcome:
            res.outcome = "completed"
        elif isinstance(outcome.get("error"), ControlFailure):
            desc = str(outcome["error"])
            res.outcome = "uncertain" if "uncertain" in desc else ("src_killed" if killed_src else "failed")
        else:
            res.outcome = "src_killed" if killed_src else "failed"

        await self._judge(res, src, dst, base_src, base_dst, ls, ld, killed_src=killed_src, killed_dst=killed_dst,
                          go_crossed=go_crossed, go_sent=proxy.dirs["c2s"].counts.get("go", 0) > 0,
                          hello_seen=proxy.dirs["c2s"].counts.get("hello", 0) > 0, fired_mono=fault.fired_mono,
                          cls=KINDS[kind], dst_frozen=kind == "stop_dst",
                          started_crossed=proxy.dirs["s2c"].counts.get("started", 0) > 0)

    async def _judge(self, res: CellResult, src: DaemonProcess, dst: DaemonProcess, base_src, base_dst, ls: int, ld: int,
                     *, killed_src: bool, killed_dst: bool, go_crossed: bool, go_sent: bool, hello_seen: bool,
                     fired_mono: float | None, cls: str, dst_frozen: bool = False,
                     started_crossed: bool = False) -> None:
        """Invariants I1-I5 after a fault (see the module docstring); appends to res.failures."""
        phase, name = res.phase, self.guest

        # ---- I1 before resolution
        c = await inv.copies(self.daemons, name)
        # Without VMM processes a guest dies with its daemon: the source's copy with a dead source daemon,
        # the destination's (started on go, and Started reached the source, which released its own) with a
        # dead destination daemon. Allowed only then.
        lost_ok = not self.guests_survive and (killed_src or (killed_dst and started_crossed))
        mig_src = c.migration.get(src.name) or {}
        res.error_code = mig_src.get("error_code")
        if killed_src:
            # The destination may only run the guest if "go" reached it. Whether the source's copy outlived
            # its daemon depends on where guests live (VMM processes: they must).
            if c.states.get(dst.name) == "running" and not go_sent:
                res.failures.append(f"I1 destination started the guest without go (source killed at {phase})")
            res.failures += inv.check_copies(c, allow_uncertain=True, allow_none=not self.guests_survive)
        elif killed_dst:
            # A guest started on the destination survives its daemon only in a VMM process.
            expect = None if (self.guests_survive and go_crossed) else src.name
            res.failures += inv.check_copies(c, expect_on=expect, allow_uncertain=go_crossed or phase in ("go", "confirmation"),
                                             allow_none=lost_ok)
        elif res.outcome == "completed":
            res.failures += inv.check_copies(c, expect_on=dst.name)
        else:
            res.failures += inv.check_copies(c, expect_on=None if go_crossed else src.name,
                                             allow_uncertain=go_crossed or fault_after_go(phase))
        res.failures += inv.check_status_error(c.migration.get(src.name), src.name)

        # ---- resolution of an uncertain hand-off
        if c.uncertain_on():
            res.outcome = "uncertain"
            c = await self._resolve(c, src, dst, res)
            if res.resolve_commands and not killed_dst and not killed_src:
                res.failures.append("I1 the uncertain hand-off did not settle by itself with the destination "
                                    "reachable again (settlement query)")
        res.outcome += "->" + ("/".join(c.running_on()) or "none")
        running = c.running_on()
        if len(running) != 1 and not (lost_ok and not running):
            res.failures.append(f"I1 after resolution: running on {running or 'no daemon'} ({c.states})")

        # ---- I2 on the survivor
        survivor = next((d for d in self.daemons if d.name in running), None)
        if survivor is not None:
            res.failures += await inv.check_guest(survivor, name, GUEST_BYTES)

        # ---- I4 detection
        if not res.outcome.startswith("completed") and fired_mono is not None:
            if cls == "immediate":
                bound = self.keepalive_s + DETECT_SLACK_S
            else:  # stall, next_frame: the peer timeout (measured from the last frame, so <= from the fault)
                bound = self.peer_timeout_s + STALL_SLACK_S
                if phase == "handshake":
                    bound = max(bound, float(self.config["handshake_timeout_s"]) + STALL_SLACK_S)
            if cls == "benign":
                # a slow network is no fault to detect at once, but pre-copy must give up within max_total_s
                bound = float(self.config["max_total_s"]) + self.peer_timeout_s + DETECT_SLACK_S
            if not killed_src:
                rec = inv.failure_log(src, ls)
                f, res.detect_src_s = inv.check_detection(rec, fired_mono, bound, f"source {src.name}")
                res.failures += f
            if not killed_dst and not dst_frozen:
                rec = inv.failure_log(dst, ld)
                if rec is not None or hello_seen:
                    f, res.detect_dst_s = inv.check_detection(rec, fired_mono, bound + self.peer_timeout_s
                                                              if cls == "immediate" and bound else bound,
                                                              f"destination {dst.name}")
                    res.failures += f

        # ---- I3: both serve, a fresh migration succeeds
        res.failures += await inv.check_serving(self.daemons, name)
        if survivor is None:
            for d in self.daemons:  # the guest died with its host: drop leftovers, launch it again
                st, _, _ = await inv.guest_state(d, name)
                if st is not None:   # (a "migrated" leftover too: launch needs the name free)
                    await d.try_call("stop", {"name": name})
            await self.launch(src)
            survivor = src
        other = self.daemons[1 - self.daemons.index(survivor)]
        fresh, err = await inv.fresh_migration(survivor, other, name, downtime_limit_ms=DOWNTIME_LIMIT_MS,
                                               max_bandwidth_mib_s=BANDWIDTH_MIB_S)
        if fresh is None or fresh.get("status") != "completed":
            res.failures.append(f"I3 fresh migration {survivor.name}->{other.name} failed: {err or fresh}")
            # Keep the next cells independent of this failure: a new guest on the survivor.
            await survivor.try_call("stop", {"name": name})
            await self.launch(survivor)
        else:
            self.loc = self.daemons.index(other)
            v, err = await other.try_call("verify", {"name": name})
            if v is None or not v.get("ok"):
                res.failures.append(f"I3 guest does not verify after the fresh migration: {err or v}")

        # ---- I5 leaks
        res.failures += await inv.check_leaks(src, base_src, restarted=killed_src, guest=name,
                                              guest_bytes=GUEST_BYTES)
        res.failures += await inv.check_leaks(dst, base_dst, restarted=killed_dst, guest=name,
                                              guest_bytes=GUEST_BYTES)

    # -- a kernel fault (network namespaces, no proxy) ------------------------------------------------
    async def run_kernel_cell(self, label: str, apply, clear, *, when: str = "first_round",
                              cls: str = "immediate") -> CellResult:
        """Migrate directly (no proxy) and call `apply(src_index, dst_index, dst_port)` at `when`
        ("first_round": the source's first progress event after the handshake; "readiness": the
        destination logged incoming_ready, so Go may or may not be on the wire), `clear()` once the
        migration ended (the network is back); then the same invariants as a proxy cell."""
        t0 = time.monotonic()
        res = CellResult(label, when, 0)
        try:
            await self._kernel_cell(res, apply, clear, when, cls)
        except Exception as exc:  # noqa: BLE001
            import traceback
            res.failures.append(f"ERR harness: {type(exc).__name__}: {exc}")
            self.log("".join(traceback.format_exception(exc)))
            res.outcome = "error"
            try:
                clear()
            finally:
                await self._recover()
        res.seconds = round(time.monotonic() - t0, 2)
        return res

    async def _kernel_cell(self, res: CellResult, apply, clear, when: str, cls: str) -> None:
        src, dst = self.daemons[self.loc], self.daemons[1 - self.loc]
        si, di = self.loc, 1 - self.loc
        name = self.guest
        base_src, base_dst = await inv.baseline(src), await inv.baseline(dst)
        ls, ld = len(src.logs), len(dst.logs)
        fired: dict = {}

        def fire() -> None:
            if "t" not in fired:
                fired["t"] = time.monotonic()
                apply(si, di, dst.port)
                res.fired = f"{res.kind} at {when}"

        def on_event(event, data) -> None:
            if when == "first_round" and data.get("status") == "active":
                fire()

        outcome: dict = {}
        async with trio.open_nursery() as nursery:
            if when == "readiness":
                async def watch():
                    await trio.to_thread.run_sync(
                        lambda: dst.wait_for_log(lambda r: r.get("event") == "incoming_ready", start=ld,
                                             timeout=CELL_MIGRATE_TIMEOUT_S), abandon_on_cancel=True)
                    fire()
                nursery.start_soon(watch)
            try:
                outcome["result"] = await src.call(
                    "migrate", {"name": name, "to": dst.address, "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                                "max_bandwidth_mib_s": BANDWIDTH_MIB_S},
                    on_event=on_event, timeout=CELL_MIGRATE_TIMEOUT_S)
            except ControlFailure as exc:
                outcome["error"] = exc
            except trio.TooSlowError:
                res.failures.append(f"I4 migration did not end within {CELL_MIGRATE_TIMEOUT_S} s")
                await self._cancel_hung(src, ls)
            nursery.cancel_scope.cancel()
        if dst.alive:
            await self._wait_dst_settled(dst, ld)
        clear()
        if "t" not in fired:
            res.failures.append(f"ERR fault {res.kind} at {when} never fired")
        if "result" in outcome:
            res.outcome = "completed"
        else:
            err = outcome.get("error")
            res.outcome = "uncertain" if err is not None and "uncertain" in str(err) else "failed"
        await self._judge(res, src, dst, base_src, base_dst, ls, ld, killed_src=False, killed_dst=False,
                          go_crossed=when != "first_round", go_sent=when != "first_round", hello_seen=True,
                          fired_mono=fired.get("t"), cls=cls)

    async def _wait_exit(self, d: DaemonProcess) -> None:
        """Until a SIGTERMed daemon has exited (deadline; then it is killed, which the cell reports)."""
        if d.proc is None:
            return
        try:
            await trio.to_thread.run_sync(lambda: d.proc.wait(RESTART_EXIT_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: a graceful stop that hangs
            d.kill_nowait()
            raise AssertionError(f"daemon {d.name} did not exit within {RESTART_EXIT_TIMEOUT_S} s of SIGTERM")

    async def _cancel_hung(self, src: DaemonProcess, start: int) -> None:
        """A migration that outlived the cell's deadline: cancel it (as an operator would) and wait for the
        source to log its end, so the next checks see a settled daemon."""
        await src.try_call("cancel", {"name": self.guest})
        try:
            await trio.to_thread.run_sync(
                lambda: src.wait_for_log(lambda r: r.get("event") in ("migration_failed", "migration_uncertain",
                                                                  "migration_completed"),
                                     start=start, timeout=30), abandon_on_cancel=True)
        except DaemonStartError:
            pass

    async def _wait_dst_settled(self, dst: DaemonProcess, start: int) -> None:
        """Until the destination logged the end of its side of the migration (deadline)."""
        ends = ("incoming_failed", "incoming_completed", "incoming_closed_after_start", "incoming_uncertain",
                "incoming_closed_before_hello", "incoming_refused", "incoming_held", "incoming_start_unconfirmed")
        try:
            await trio.to_thread.run_sync(
                lambda: dst.wait_for_log(lambda r: r.get("event") in ends, start=start,
                                     timeout=self.peer_timeout_s * 3 + 5))
        except DaemonStartError:
            pass  # reported by the checks (a destination that never ends its side leaks a migration)

    async def _resolve(self, c: inv.Copies, src: DaemonProcess, dst: DaemonProcess, res: CellResult) -> inv.Copies:
        """Settle an uncertain hand-off as an operator would: wait for an automatic resolution; else one
        `resolve` on the source (run here iff the destination does not run the guest). More than one
        command needed is an I1 failure (the issue: one command resolves it)."""
        with trio.move_on_after(AUTO_RESOLVE_WAIT_S):
            while c.uncertain_on():
                await trio.sleep(0.1)  # automatic resolution is the daemons' business: look again
                c = await inv.copies(self.daemons, self.guest)
        if not c.uncertain_on():
            res.settled_by_query = True
            return c
        dst_runs = c.states.get(dst.name) in inv.RUNNING_STATES
        target = src if src.name in c.uncertain_on() else dst
        run_here = (not dst_runs) if target is src else True
        res.resolve_commands += 1
        _, err = await target.try_call("resolve", {"name": self.guest, "run_here": run_here})
        if err:
            res.failures.append(f"I1 resolve on {target.name} failed: {err}")
        c = await inv.copies(self.daemons, self.guest)
        if c.uncertain_on():
            res.failures.append(f"I1 one resolve command did not settle the hand-off: still uncertain on "
                                f"{c.uncertain_on()} ({c.states})")
            for d in self.daemons:  # settle it anyway so the next cells can run
                if d.name in c.uncertain_on():
                    res.resolve_commands += 1
                    runs_elsewhere = any(n != d.name for n in c.running_on())
                    await d.try_call("resolve", {"name": self.guest, "run_here": not runs_elsewhere})
                    c = await inv.copies(self.daemons, self.guest)
        return c


# Log fields kept with a failing cell's result (the --json output of the matrix), enough to follow it.
LOG_KEYS = ("event", "level", "error", "code", "round", "decision", "pages", "bytes", "seconds", "status",
            "migration_id", "role", "detail", "resolution")


def guests_outlive_daemons(vmm: str | None = None) -> bool:
    """True when the daemons run guests in VMM processes that survive the daemon (the `vmm` config key of
    issue 17: `vmm`, else its default, is "process"); False while guests live inside the daemon process."""
    from sevmigd.daemon.config import Config
    f = Config.__dataclass_fields__.get("vmm")
    return (vmm or (f.default if f is not None else "inline")) == "process"


def fault_after_go(phase: str) -> bool:
    return PHASES.index(phase) >= PHASES.index("go")


__all__ = ["Harness", "CellResult", "KINDS", "PHASES", "DAEMON_DEATHS", "fault_for", "guests_outlive_daemons"]
