"""The five invariants of a migration that met a fault (issue 6), checked against real daemons.

One reusable checker for the fault tests and the `make faults` matrix. It only looks at what an
operator can see — the control socket (`list`, `status`, `verify`, `guest-read`, `server-info`,
`migrate`), the daemons' logs and /proc — never at daemon internals, so a pass means the behaviour is
observable, not just true inside.

  I1 one copy      exactly one runnable copy of the guest: `running` on exactly one daemon, or, in the
                   documented post-"go" uncertain window, the migration reported `uncertain` by the
                   daemons that hold a copy, with no copy running twice. Where the fault came before
                   "go" reached the destination, that copy is the source's.
  I2 guest intact  `verify` on the survivor: ok, zero mismatches; and its workload goes on: two reads
                   of its working set through the guest agent (guest-side plaintext, so a guest whose
                   vCPUs stopped shows no change) differ.
  I3 daemons serve `server-info` and `status` answer on both; a fresh migration (no fault) succeeds.
  I4 detection     the failure was logged within the bound after the fault fired (a reset or a corrupt
                   frame: at once; a stalled peer: within peer_timeout_s) with a clear error (an abort
                   code other than INTERNAL_ERROR, and text), also visible in `status`.
  I5 no leaks      per daemon, against a baseline taken before the cell: open file descriptors
                   (/proc/PID/fd, or server-info `open_fds`), running migrations (`migrations` = 0),
                   registered guests, and — when server-info reports them — live PSP guest handles
                   (`psp_guests`), trio tasks (`tasks`) and guest RAM (`guest_ram_bytes`).

Every check returns a list of failure strings, each starting with its invariant ("I3 ..."); an empty
list is a pass. Waits are deadlines on observable conditions, never sleeps used as synchronisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from sevmigd.testing.daemons import DaemonProcess

# States of a guest that can execute (now or after `resolve`): `running`; `paused` by an operator;
# `migrating` is the source's copy during a migration or an uncertain hand-off (paused).
RUNNING_STATES = ("running", "paused")
# Bytes of the working set read through the guest agent to see the workload progress (it dirties
# pages at the top of guest memory, `working_set` MiB of them).
PROBE_BYTES = 64 << 10
# How long a running workload may take to change the probed bytes (at 4 MiB/s over a 0.5 MiB working
# set every page is rewritten several times a second).
WORKLOAD_DEADLINE_S = 5.0
# Deadline for descriptors and tasks of a finished migration to be closed (the daemon closes a control
# connection asynchronously after our side closed it). Generous for a loaded machine: it is a deadline,
# the check returns as soon as the counts are back.
SETTLE_DEADLINE_S = 20.0
# Server-info keys counted as leaks when the daemon reports them.
LEAK_KEYS = ("open_fds", "tasks", "psp_guests", "guest_ram_bytes")


@dataclass
class Baseline:
    fds: int | None
    info: dict
    guests: dict


@dataclass
class Copies:
    """Where the guest is, as both daemons report it."""
    states: dict[str, str | None]           # daemon name -> guest state (None: no such guest)
    migration: dict[str, dict | None]       # daemon name -> latest migration stats of the guest
    errors: dict[str, str]                  # daemon name -> control error (daemon not answering)

    def running_on(self) -> list[str]:
        return [n for n, s in self.states.items() if s in RUNNING_STATES]

    def uncertain_on(self) -> list[str]:
        return [n for n, m in self.migration.items() if m and m.get("status") == "uncertain"]


@dataclass
class CellReport:
    failures: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, text: str) -> None:
        self.failures.append(text)


async def guest_state(d: DaemonProcess, name: str) -> tuple[str | None, dict | None, str | None]:
    """(state, migration stats, control error) of guest `name` on `d`."""
    st, err = await d.try_call("status", {"name": name}, timeout=30)
    if st is None:
        if err and "GuestNotFound" in err or (err and "no guest" in err.lower()):
            return None, None, None
        return None, None, err
    return st.get("state"), st.get("migration"), None


async def copies(daemons: list[DaemonProcess], name: str) -> Copies:
    c = Copies({}, {}, {})
    for d in daemons:
        if not d.alive:
            c.states[d.name], c.migration[d.name] = None, None
            c.errors[d.name] = "process not running"
            continue
        state, mig, err = await guest_state(d, name)
        c.states[d.name], c.migration[d.name] = state, mig
        if err:
            c.errors[d.name] = err
    return c


async def baseline(d: DaemonProcess) -> Baseline:
    info, _ = await d.try_call("server-info", timeout=30)
    lst, _ = await d.try_call("list", timeout=30)
    guests = {g["name"]: g["state"] for g in (lst or {}).get("guests", [])}
    return Baseline(d.open_fds(), info or {}, guests)


# ----------------------------------------------------------------------------------------------- I1


def check_copies(c: Copies, *, expect_on: str | None = None, allow_uncertain: bool = False,
                 allow_none: bool = False) -> list[str]:
    """I1 on a snapshot. `expect_on`: the daemon that must hold the running copy (None: any one).
    `allow_uncertain`: an uncertain hand-off reported by the daemons holding a copy is acceptable.
    `allow_none`: no copy anywhere is acceptable (the only host of the guest was killed)."""
    out = []
    running = c.running_on()
    if len(running) > 1:
        return [f"I1 two running copies: {c.states}"]
    uncertain = c.uncertain_on()
    if len(running) == 1:
        if expect_on is not None and running[0] != expect_on and not (allow_uncertain and uncertain):
            out.append(f"I1 guest runs on {running[0]}, expected on {expect_on}: {c.states}")
        return out
    if allow_uncertain and uncertain:
        holders = [n for n, s in c.states.items() if s is not None and s not in ("migrated", "stopped")]
        missing = [n for n in holders if n not in uncertain]
        if missing:
            out.append(f"I1 uncertain hand-off not reported by {missing} (which holds a copy): {c.states}, "
                       f"uncertain on {uncertain}")
        return out
    if allow_none:
        return out
    return [f"I1 no running copy (states {c.states}, uncertain on {uncertain or 'none'})"]


# ----------------------------------------------------------------------------------------------- I2


async def check_guest(d: DaemonProcess, name: str, memory_bytes: int) -> list[str]:
    """I2: verify passes and the workload still writes its working set."""
    out = []
    v, err = await d.try_call("verify", {"name": name}, timeout=60)
    if v is None:
        return [f"I2 verify on {d.name} failed: {err}"]
    if not v.get("ok") or v.get("mismatch_count"):
        out.append(f"I2 verify on {d.name}: {v.get('mismatch_count')} mismatches (pages {v.get('mismatches')[:8]})")
    gpa = memory_bytes - PROBE_BYTES
    first, err = await d.try_call("guest-read", {"name": name, "gpa": gpa, "length": PROBE_BYTES}, timeout=30)
    if first is None:
        return out + [f"I2 guest-read on {d.name} failed: {err}"]
    with trio.move_on_after(WORKLOAD_DEADLINE_S):
        while True:
            await trio.sleep(0.05)  # the workload's pace is wall time: look again a little later
            again, err = await d.try_call("guest-read", {"name": name, "gpa": gpa, "length": PROBE_BYTES},
                                          timeout=30)
            if again is None:
                return out + [f"I2 guest-read on {d.name} failed: {err}"]
            if again["data_hex"] != first["data_hex"]:
                return out
    return out + [f"I2 workload of {name} on {d.name} wrote nothing in {WORKLOAD_DEADLINE_S} s (vCPUs stopped?)"]


# ----------------------------------------------------------------------------------------------- I3


async def check_serving(daemons: list[DaemonProcess], name: str) -> list[str]:
    out = []
    for d in daemons:
        if not d.alive:
            out.append(f"I3 {d.name} is not running")
            continue
        info, err = await d.try_call("server-info", timeout=30)
        if info is None:
            out.append(f"I3 server-info on {d.name} failed: {err}")
        st, err = await d.try_call("status", {"name": name}, timeout=30)
        if st is None and "GuestNotFound" not in (err or "") and "no guest" not in (err or "").lower():
            out.append(f"I3 status on {d.name} failed: {err}")
    return out


async def fresh_migration(src: DaemonProcess, dst: DaemonProcess, name: str, *, downtime_limit_ms: int | None = None,
                          max_bandwidth_mib_s: float | None = None, timeout: float = 120.0) -> tuple[dict | None, str | None]:
    args = {"name": name, "to": dst.address}
    if downtime_limit_ms is not None:
        args["downtime_limit_ms"] = downtime_limit_ms
    if max_bandwidth_mib_s is not None:
        args["max_bandwidth_mib_s"] = max_bandwidth_mib_s
    return await src.try_call("migrate", args, timeout=timeout)


# ----------------------------------------------------------------------------------------------- I4


def failure_log(d: DaemonProcess, start: int, migration_id: str | None = None) -> dict | None:
    """The first log line from `start` on that reports the migration's failure, uncertainty or end."""
    events = ("migration_failed", "migration_uncertain", "incoming_failed", "incoming_uncertain",
              "incoming_refused", "migration_completed", "incoming_completed", "incoming_closed_after_start",
              "incoming_closed_before_hello", "incoming_held", "incoming_start_unconfirmed",
              "destination_renounced_after_go")
    for rec in d.find_logs(lambda r: r.get("event") in events, start):
        if migration_id is None or rec.get("migration_id") in (None, migration_id):
            return rec
    return None


def check_detection(rec: dict | None, fired_mono: float | None, bound_s: float | None,
                    who: str) -> tuple[list[str], float | None]:
    """I4 for one daemon: its failure line came within `bound_s` of the fault (None: no time bound, e.g.
    pre-copy giving up on a collapsed bandwidth, which its own limits bound), with a clear error."""
    if fired_mono is None:
        return [], None
    if rec is None:
        return [f"I4 {who} logged no failure of the migration"], None
    # when the daemon logged it (the harness may read a line seconds later on a loaded machine)
    dt = rec.get("_t_emit", rec["_t"]) - fired_mono
    out = []
    if bound_s is not None and dt > bound_s:
        out.append(f"I4 {who} detected the fault after {dt:.2f} s (bound {bound_s:.1f} s): {rec.get('event')}")
    if rec.get("event") in ("migration_failed", "migration_uncertain", "incoming_failed", "incoming_uncertain"):
        code = rec.get("code")
        text = rec.get("error") or ""
        if code == "INTERNAL_ERROR" or not text:
            out.append(f"I4 {who} reported an unclear error: code={code} error={text!r}")
    return out, dt


def check_status_error(mig: dict | None, who: str) -> list[str]:
    """I4: a failed migration's status shows the error."""
    if not mig:
        return []
    if mig.get("status") in ("failed", "cancelled", "uncertain") and not mig.get("error"):
        return [f"I4 {who} status shows migration {mig.get('status')} without an error text"]
    return []


# ----------------------------------------------------------------------------------------------- I5


async def check_leaks(d: DaemonProcess, base: Baseline, *, restarted: bool = False, guest: str | None = None,
                      guest_bytes: int | None = None) -> list[str]:
    """I5 against `base` (skipped for counters when the daemon was restarted: a new process). `guest`:
    the cell's guest, which may have arrived here; any other new guest entry is a leak."""
    out = []
    if not d.alive:
        return [f"I5 {d.name} not running"]
    lst, _ = await d.try_call("list", timeout=30)
    now = {g["name"]: g["state"] for g in (lst or {}).get("guests", [])}
    extra = sorted(set(now) - set(base.guests) - {guest})
    if extra:
        out.append(f"I5 {d.name} holds guests that appeared during the cell: {extra}")
    # The cell's guest may have left or arrived: one live guest = one PSP handle, its RAM, one vCPU task.
    live = ("running", "paused", "migrating", "incoming")
    delta = int(now.get(guest) in live) - int(base.guests.get(guest) in live)
    ram = guest_bytes if guest_bytes is not None else 0
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while True:
        problems = []
        info, err = await d.try_call("server-info", timeout=30)
        if info is None:
            return [f"I5 server-info on {d.name} failed: {err}"]
        if info.get("migrations"):
            problems.append(f"I5 {d.name} still has {info['migrations']} migration(s) running")
        if not restarted:
            fds = info.get("open_fds", None)
            base_fds = base.info.get("open_fds", None)
            if fds is None or base_fds is None:
                fds, base_fds = d.open_fds(), base.fds
                # our own control connection is open while server-info runs, not while /proc is read
            # A guest in a VMM process holds descriptors here (its mappings, pidfd, connection): those of
            # the guests that arrived or left are not leaks (server-info counts them as vmm_fds).
            if fds is not None and base_fds is not None and info.get("vmm_fds") is not None \
                    and base.info.get("vmm_fds") is not None:
                fds, base_fds = fds - info["vmm_fds"], base_fds - base.info["vmm_fds"]
            if fds is not None and base_fds is not None and fds > base_fds:
                problems.append(f"I5 {d.name} has {fds - base_fds} more open fds than before the cell "
                                f"({base_fds} -> {fds})")
            allowed = {"tasks": delta, "psp_guests": delta, "guest_ram_bytes": delta * ram}
            if info.get("guest_tasks") is not None and base.info.get("guest_tasks") is not None:
                # A guest's own tasks (vCPU loop, or the watch of its VMM process) come and go with the guest:
                # the daemon's other tasks must not grow at all, a guest's only when a guest arrived.
                own, base_own = info["tasks"] - info["guest_tasks"], base.info["tasks"] - base.info["guest_tasks"]
                if own > base_own:
                    problems.append(f"I5 {d.name} tasks not of a guest: {base_own} before the cell, {own} after")
                if delta <= 0 and info["guest_tasks"] > base.info["guest_tasks"]:
                    problems.append(f"I5 {d.name} guest tasks: {base.info['guest_tasks']} before the cell, "
                                    f"{info['guest_tasks']} after, no guest arrived")
                allowed["tasks"] = info["tasks"] - base.info["tasks"]   # judged above
            for key in LEAK_KEYS[1:]:
                if info.get(key) is not None and base.info.get(key) is not None \
                        and info[key] > base.info[key] + allowed[key]:
                    problems.append(f"I5 {d.name} {key}: {base.info[key]} before the cell, {info[key]} after "
                                    f"(guest {guest} {base.guests.get(guest)} -> {now.get(guest)})")
        if not problems or time.monotonic() >= deadline:
            return out + problems
        await trio.sleep(0.1)  # closing is asynchronous in the daemon: look again until the deadline


__all__ = ["Baseline", "Copies", "CellReport", "baseline", "copies", "check_copies", "check_guest",
           "check_serving", "fresh_migration", "failure_log", "check_detection", "check_status_error",
           "check_leaks", "RUNNING_STATES"]
