"""`sevmigd ctl VERB ...`: talk to a running daemon over its control socket.

One subcommand per control verb (see `sevmigd.daemon.control`). Exit statuses: 0 success; 1 the
operation failed or the daemon refused it (unknown guest, migration failed, verify found mismatches,
no daemon listening); 2 unusable input (bad SIZE/GPA/HEX, or the daemon rejected an argument).
The control socket is `--control PATH`, else `--config FILE`'s `control`, else $SEVMIGD_CONTROL, else
the daemon's default path.

This module must never print a traceback for a known failure, nor guest data except what the user
asked `guest-read` for.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import stat
import sys
import time
from typing import Any

from sevmigd.errors import ConfigError
from sevmigd.limits import MAX_DIRTY_RATE_MIB_S, MAX_FLIP_RATE, MAX_IMAGE_BYTES
from sevmigd.kvm.uapi import HYPERCALL_DIALECTS
from sevmigd.units import parse_gpa, parse_size


def register(sub) -> None:
    p = sub.add_parser("ctl", help="control a running daemon (launch, migrate, status, ...)",
                       description="Send one command to a running sevmigd daemon over its control socket.")
    p.add_argument("--control", metavar="PATH", help="control socket (default: the daemon's default path)")
    p.add_argument("--config", metavar="FILE", help="read the control socket path from this daemon config")
    p.add_argument("--timeout", metavar="S", type=float, default=None,
                   help="give up waiting for a reply after S seconds (default: wait; migrate always waits)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    v = verbs.add_parser("launch", help="launch a new SEV guest")
    v.add_argument("name")
    v.add_argument("--memory", required=True, metavar="SIZE", help="guest RAM, e.g. 256M, 1G")
    v.add_argument("--policy", default="0", metavar="HEX",
                   help="SEV guest policy (hex), default 0, chosen by the host and bound by nobody (kept for "
                        "tests and compatibility; the real launch is --owner-session)")
    v.add_argument("--image", metavar="FILE",
                   help="initial image measured at launch: a regular file of at most 8 MiB, read by ctl "
                        "with your rights and sent to the daemon")
    v.add_argument("--dirty-rate", type=_bounded(0.0, MAX_DIRTY_RATE_MIB_S, "--dirty-rate"), default=0.0,
                   metavar="MIB_S", help=f"workload dirty rate, 0..{MAX_DIRTY_RATE_MIB_S:g} MiB/s")
    v.add_argument("--working-set", type=_bounded(1e-6, float(1 << 40), "--working-set"), default=None, metavar="MIB",
                   help="pages the workload touches")
    v.add_argument("--shared-fraction", type=_bounded(0.0, 1.0, "--shared-fraction"), default=0.0, metavar="F",
                   help="fraction of pages the guest keeps shared (0..1)")
    v.add_argument("--flip-rate", type=_bounded(0.0, MAX_FLIP_RATE, "--flip-rate"), default=0.0, metavar="N",
                   help=f"private<->shared flips per s, 0..{MAX_FLIP_RATE:g}")
    v.add_argument("--seed", type=int, default=0, metavar="N", help="workload seed")
    v.add_argument("--vcpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    v.add_argument("--prefill", action="store_true",
                   help="write every page at boot with seeded random content (no zero pages; benchmarks)")
    v.add_argument("--no-migration-control", action="store_true",
                   help="guest kernel does not set MSR_KVM_MIGRATION_CONTROL (migration will be refused)")
    v.add_argument("--hypercall", choices=tuple(HYPERCALL_DIALECTS), default="map-gpa-range",
                   help="how the guest kernel reports page-state changes: map-gpa-range (KVM_HC_MAP_GPA_RANGE, "
                        "Linux 5.14+, exits to the VMM; default) or page-enc-status (the seed RFC's "
                        "KVM_HC_PAGE_ENC_STATUS, kept in KVM's bitmap)")
    v.add_argument("--json", action="store_true", help="print the new guest's status as JSON")
    v.add_argument("--owner-session", metavar="DIR",
                   help="the guest owner's launch session (`sevmigd owner session`): GODH cert, session "
                        "and policy; the guest stops measured until `ctl launch-finish` (the real launch: "
                        "the owner, not the host, binds the policy)")
    v.set_defaults(ctl=_launch)

    v = verbs.add_parser("list", help="list guests")
    v.add_argument("--json", action="store_true")
    v.set_defaults(ctl=_list)

    v = verbs.add_parser("status", help="show one guest")
    v.add_argument("name")
    v.add_argument("--json", action="store_true")
    v.set_defaults(ctl=_status)

    v = verbs.add_parser("migrate", help="live-migrate a guest to another daemon (waits until done)")
    v.add_argument("name")
    v.add_argument("--to", required=True, metavar="HOST:PORT", help="destination daemon's listen address")
    v.add_argument("--downtime-limit", type=int, default=None, metavar="MS", help="max stop-and-copy downtime")
    v.add_argument("--max-bandwidth", type=float, default=None, metavar="MIB_S", help="bandwidth cap")
    v.add_argument("--policy", metavar="NAME", help="migration policy ([policies.NAME] in the daemon's config)")
    v.add_argument("--detach", action="store_true",
                   help="return the job id at once (follow it with `ctl jobs`) instead of waiting")
    v.add_argument("--json", action="store_true", help="print the final figures as JSON")
    v.set_defaults(ctl=_migrate)

    v = verbs.add_parser("jobs", help="outgoing migrations: running, queued and recent, with their figures")
    v.add_argument("job", nargs="?", help="only this job id")
    v.add_argument("--json", action="store_true")
    v.set_defaults(ctl=_jobs)

    v = verbs.add_parser("evacuate", help="move every running guest off this host (maintenance drain)",
                         description="Live-migrate every running guest to the given destinations, round-robin, "
                                     "at most --max-parallel at once. Guests that cannot move are listed with "
                                     "the reason and keep running. Exit 1 if any guest is left on this host. "
                                     "The evacuation runs in the daemon: interrupting ctl does not stop it.")
    v.add_argument("--to", required=True, metavar="HOST:PORT[,HOST:PORT...]", help="destination daemons")
    v.add_argument("--max-parallel", type=int, default=1, metavar="N", help="migrations at once (default 1)")
    v.add_argument("--policy", metavar="NAME", help="migration policy for every guest")
    v.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    v.add_argument("--json", action="store_true", help="print the final per-guest result as JSON")
    v.set_defaults(ctl=_evacuate)

    v = verbs.add_parser("cancel", help="cancel a guest's outgoing migration")
    v.add_argument("name")
    v.set_defaults(ctl=_cancel)

    v = verbs.add_parser("resolve", help="settle a migration left uncertain after 'go'")
    v.add_argument("name")
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-here", action="store_true", help="resume the guest on this host")
    g.add_argument("--discard", action="store_true", help="discard this copy (it runs elsewhere)")
    v.set_defaults(ctl=_resolve)

    v = verbs.add_parser("verify", help="run the guest's self-check (exit 1 on mismatches)")
    v.add_argument("name")
    v.add_argument("--json", action="store_true")
    v.set_defaults(ctl=_verify)

    v = verbs.add_parser("reboot", help="reboot a guest's kernel (page-encryption bitmap reset)")
    v.add_argument("name")
    v.add_argument("--json", action="store_true", help="print the guest's status after the reboot as JSON")
    v.set_defaults(ctl=_reboot)

    v = verbs.add_parser("stop", help="stop a guest (DECOMMISSION) and forget it")
    v.add_argument("name")
    v.set_defaults(ctl=_stop)

    v = verbs.add_parser("guest-write", help="write bytes into guest memory through the in-guest agent")
    v.add_argument("name")
    v.add_argument("gpa", help="guest-physical address (0x... or decimal)")
    v.add_argument("hex", help="data as hex digits")
    v.add_argument("--shared", action="store_true", help="write to a shared (unencrypted) page")
    v.set_defaults(ctl=_guest_write)

    v = verbs.add_parser("guest-read", help="read guest memory through the in-guest agent (prints hex)")
    v.add_argument("name")
    v.add_argument("gpa")
    v.add_argument("length", help="bytes to read (SIZE)")
    v.set_defaults(ctl=_guest_read)

    from sevmigd.cli import owner as _owner
    _owner.register_ctl(verbs)   # launch-finish, guest-secret

    v = verbs.add_parser("server-info", help="daemon version, listen address, platform id, counts")
    v.add_argument("--json", action="store_true")
    v.set_defaults(ctl=_server_info)

    p.set_defaults(func=ctl_main)


def control_path(args: argparse.Namespace) -> str:
    from sevmigd.daemon.config import default_control_path, load_config

    if getattr(args, "control", None):
        return args.control
    if getattr(args, "config", None):
        return load_config(args.config, {}).control
    if os.environ.get("SEVMIGD_CONTROL"):
        return os.environ["SEVMIGD_CONTROL"]
    return default_control_path()


def ctl_main(args: argparse.Namespace) -> int:
    from sevmigd.daemon.client import ControlClient, ControlError, DaemonNotRunning, ConnectionLost

    path = control_path(args)
    timeout = None if args.verb in ("migrate", "evacuate") else args.timeout
    try:
        with ControlClient(path, timeout=timeout) as client:
            return int(args.ctl(client, args) or 0)
    except ControlError as exc:
        print(f"sevmigd ctl {args.verb}: {exc.desc}", file=sys.stderr)
        if exc.error_class == "InvalidParameter":
            return 2
        return 1
    except (DaemonNotRunning, ConnectionLost) as exc:
        print(f"sevmigd ctl: {exc}", file=sys.stderr)
        return 1


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _mib(n: Any) -> str:
    if n is None:
        return "-"
    return f"{n / (1 << 20):.1f} MiB"


def read_image(path: str, *, limit: int) -> bytes:
    """The `--image` file's bytes, read here with the caller's rights (the daemon never opens a path a
    client names). Only a regular file of at most `limit` bytes; opened non-blocking so a FIFO or a
    device is refused at once (ConfigError naming the file), never waited on or read endlessly."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError("--image", f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("--image", f"{path} is not a regular file")
        if st.st_size > limit:
            raise ConfigError("--image", f"{path} is {st.st_size} bytes; at most {limit} (the guest's memory "
                                         f"and {MAX_IMAGE_BYTES} bytes)")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ConfigError("--image", f"{path} grew beyond {limit} bytes while being read")
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError("--image", f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise ConfigError("--image", f"{path} is empty")
    return data


def _bounded(lo: float, hi: float, what: str):
    """argparse type: a finite number in [lo, hi], with an error naming the bounds."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v) or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be from {lo:g} to {hi:g}, got {text}")
        return v
    return parse


def _launch(client, args) -> int:
    try:
        policy = int(args.policy, 16)
    except ValueError:
        raise ConfigError("--policy", f"not a hex number: {args.policy!r}") from None
    req: dict[str, Any] = {
        "name": args.name,
        "memory": parse_size(args.memory, key="--memory"),
        "policy": policy,
        "dirty_rate": args.dirty_rate,
        "shared_fraction": args.shared_fraction,
        "flip_rate": args.flip_rate,
        "seed": args.seed,
        "vcpus": args.vcpus,
        "migration_control": not args.no_migration_control,
        "hypercall": args.hypercall,
    }
    if args.prefill:
        req["prefill"] = True
    if args.working_set is not None:
        req["working_set"] = args.working_set
    if args.image is not None:
        req["image_b64"] = base64.b64encode(read_image(args.image, limit=min(req["memory"], MAX_IMAGE_BYTES))).decode()
    if args.owner_session is not None:
        from sevmigd.cli import owner as _owner
        req.update(_owner.launch_request(args.owner_session, policy_given=args.policy != "0", policy=policy))
    st = client.execute("launch", req)
    if args.json:
        _print_json(st)
    else:
        print(f"launched {st['name']}: {_mib(st.get('memory_bytes'))}, policy {st.get('policy')}, "
              f"sev_state {st.get('sev_state')}, measurement {st.get('measurement') or '-'}")
        if st.get("state") == "launching":
            print(f"measured, waiting for the guest owner: give them `ctl status {st['name']} --json`, then "
                  f"`ctl launch-finish {st['name']} --secret-packet FILE`")
    return 0


def _list(client, args) -> int:
    guests = client.execute("list")["guests"]
    if args.json:
        _print_json(guests)
        return 0
    rows = [("NAME", "STATE", "JOB", "MEMORY", "POLICY", "SEV_STATE", "PRIVATE", "SHARED")]
    for g in guests:
        rows.append((g["name"], g["state"], g.get("job") or "-", _mib(g.get("memory_bytes")), str(g.get("policy")),
                     str(g.get("sev_state")), str(g.get("private_pages")), str(g.get("shared_pages"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _status(client, args) -> int:
    st = client.execute("status", {"name": args.name})
    if args.json:
        _print_json(st)
        return 0
    for key in ("name", "state", "memory_bytes", "policy", "sev_state", "private_pages", "shared_pages",
                "launch_digest", "measurement", "migration_control", "asid", "error"):
        if key in st:
            print(f"{key + ':':19} {'-' if st[key] is None else st[key]}")
    mig = st.get("migration")
    if mig:
        print("migration:")
        for k, v in mig.items():
            print(f"  {k + ':':21} {v}")
    return 0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _ProgressLine:
    """A live one-line progress display on a TTY: round, % of this round, MB/s, remaining, downtime.

    The stats (QEMU names) give `remaining` = dirty bytes left when a round starts and `transferred`
    = bytes sent so far; a round's progress is what was sent since it started over what it had to
    send (the whole RAM for round 0). `throughput_mbps` is megabits/s, as QEMU's "mbps": shown /8.
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = _isatty(stream)
        self.round: Any = None
        self.round_tx0 = 0
        self.round_bytes = 0
        self.last_tx: int | None = None
        self.shown = False

    def __call__(self, event: str, data: dict) -> None:
        if event == "queued" and self.tty:
            self.stream.write(f"\r\x1b[Kqueued: position {data.get('queue_position')}, "
                              f"{data.get('running')} migration(s) running (max_outgoing {data.get('max_outgoing')})")
            self.stream.flush()
            self.shown = True
            return
        if event != "progress" or not self.tty:
            return
        rnd = data.get("round")
        tx = int(data.get("transferred") or 0)
        if rnd != self.round:
            # Events are rate-limited: the round began where the previous event (the last round's
            # forced round-end event) left `transferred`, not where we first hear of the new round.
            self.round, self.round_tx0 = rnd, (tx if self.last_tx is None else self.last_tx)
            first = not isinstance(rnd, int) or rnd <= 1  # stats count rounds from 1 (QEMU dirty-sync-count)
            self.round_bytes = int((data.get("total") if first else data.get("remaining")) or 0)
        self.last_tx = tx
        sent = max(tx - self.round_tx0, 0)
        pct = 100.0 if self.round_bytes <= 0 else min(100.0, 100.0 * sent / self.round_bytes)
        left = max(self.round_bytes - sent, 0)
        mbps = data.get("throughput_mbps") or 0.0
        exp = data.get("expected_downtime_ms")
        line = (f"round {rnd}  {pct:5.1f}%  {mbps / 8:8.1f} MB/s  remaining {_mib(left)}  "
                f"expected downtime {'-' if exp is None else f'{exp:.0f} ms'}  [{data.get('status', '')}]")
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _ms(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.0f} ms"


def _migrate(client, args) -> int:
    from sevmigd.daemon.client import ControlError

    req: dict[str, Any] = {"name": args.name, "to": args.to}
    if args.downtime_limit is not None:
        req["downtime_limit_ms"] = args.downtime_limit
    if args.max_bandwidth is not None:
        req["max_bandwidth_mib_s"] = args.max_bandwidth
    if args.policy is not None:
        req["policy"] = args.policy
    if args.detach:
        req["detach"] = True
        job = client.execute("migrate", req)
        if args.json:
            _print_json(job)
        else:
            where = f" (queue position {job['queue_position']})" if job.get("queue_position") else ""
            print(f"{job['job']}: {args.name} -> {job['to']} {job['state']}{where}")
        return 0
    progress = _ProgressLine(sys.stderr)
    started = time.monotonic()
    try:
        stats = client.execute("migrate", req, on_event=progress)
    except ControlError as exc:
        progress.finish()
        if args.json:
            figures = exc.data
            if figures is None:  # the failed migration's stats stay on the guest's status
                try:
                    figures = client.execute("status", {"name": args.name}).get("migration")
                except ControlError:
                    figures = None
            if figures is not None:
                _print_json(figures)
        raise
    progress.finish()
    if args.json:
        _print_json(stats)
    else:
        print(f"{args.name}: migration {stats.get('status', '?')} in "
              f"{_ms(stats.get('total_time_ms', (time.monotonic() - started) * 1000))}, "
              f"downtime {_ms(stats.get('downtime_ms'))}, {stats.get('round', '-')} round(s), "
              f"{_mib(stats.get('transferred'))} transferred, "
              f"{stats.get('private_pages', '-')} private + {stats.get('shared_pages', '-')} shared pages")
        if stats.get("status") != "completed" and stats.get("error"):
            print(f"sevmigd: {stats['error']}", file=sys.stderr)  # e.g. a plaintext hand-off to resolve
    return 0 if stats.get("status") == "completed" else 1


def _cancel(client, args) -> int:
    client.execute("cancel", {"name": args.name})
    print(f"{args.name}: migration cancel requested")
    return 0


def _resolve(client, args) -> int:
    r = client.execute("resolve", {"name": args.name, "run_here": bool(args.run_here)})
    print(f"{args.name}: {r.get('resolution') or r.get('state', 'resolved')}")
    return 0


def _verify(client, args) -> int:
    r = client.execute("verify", {"name": args.name})
    if args.json:
        _print_json(r)
    elif r["ok"]:
        print(f"{r['name']}: ok ({r['pages_checked']} pages checked)")
    else:
        shown = ", ".join(hex(p) for p in r["mismatches"][:16])
        print(f"{r['name']}: FAILED: {r.get('mismatch_count', len(r['mismatches']))} mismatching page(s) "
              f"of {r['pages_checked']} (pfns {shown}{', ...' if len(r['mismatches']) > 16 else ''})")
    return 0 if r["ok"] else 1


def _reboot(client, args) -> int:
    st = client.execute("reboot", {"name": args.name})
    if args.json:
        _print_json(st)
        return 0
    print(f"{args.name}: rebooted ({st.get('private_pages')} private, {st.get('shared_pages')} shared pages)")
    return 0


def _stop(client, args) -> int:
    client.execute("stop", {"name": args.name})
    print(f"{args.name}: stopped")
    return 0


def _guest_write(client, args) -> int:
    text = args.hex[2:] if args.hex.lower().startswith("0x") else args.hex
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("HEX", "expected an even number of hex digits") from None
    if not data:
        raise ConfigError("HEX", "no data")
    gpa = parse_gpa(args.gpa, key="GPA")
    client.execute("guest-write", {"name": args.name, "gpa": gpa, "data_hex": data.hex(), "shared": args.shared})
    print(f"{args.name}: wrote {len(data)} bytes at {gpa:#x}{' (shared)' if args.shared else ''}")
    return 0


def _guest_read(client, args) -> int:
    gpa = parse_gpa(args.gpa, key="GPA")
    length = parse_size(args.length, key="LENGTH")
    r = client.execute("guest-read", {"name": args.name, "gpa": gpa, "length": length})
    print(r["data_hex"])
    return 0


def _server_info(client, args) -> int:
    info = client.execute("server-info")
    if args.json:
        _print_json(info)
        return 0
    for k, v in info.items():
        if k == "psp_state" and isinstance(v, dict):
            v = _psp_state_line(v)
        print(f"{k + ':':17} {v}")
    return 0


def _psp_state_line(p: dict) -> str:
    """server-info's psp_state in one line: each PSP handle's GUEST_STATUS, what the start restored."""
    ctxs = " ".join(f"{c['handle']}:{c['state']}/asid {c['asid']}" for c in p.get("contexts") or []) or "none"
    line = f"contexts {ctxs}; restored {len(p.get('restored') or [])}"
    if p.get("damaged"):
        line += f"; DAMAGED {', '.join(d['path'] for d in p['damaged'])}"
    if p.get("save_errors"):
        line += f"; save errors {p['save_errors']}"
    return line


def _pct(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.0f}%"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _jobs(client, args) -> int:
    req = {"job": args.job} if args.job else None
    r = client.execute("jobs", req)
    if args.json:
        _print_json(r)
        return 0
    rows = [("JOB", "GUEST", "TO", "STATE", "ROUND", "IN SYNC", "TRANSFERRED", "DOWNTIME", "POLICY", "ERROR")]
    for j in r["jobs"]:
        st = j.get("stats") or {}
        state = j["state"] + (f" ({j['queue_position']})" if j.get("queue_position") else "")
        rows.append((j["job"], j["guest"], j["to"], state, st.get("round") or "-",
                     _pct(j.get("in_sync_percent")), _mib(st.get("transferred")) if st else "-",
                     _ms(st.get("downtime_ms")), j.get("policy") or "-", (j.get("error") or "")[:60]))
    for line in _table(rows):
        print(line)
    print(f"{r['running']} running (max_outgoing {r['max_outgoing']}, at most {r['high_water']} at once so far), "
          f"{r['queued']} queued")
    return 0


class _EvacuationTable:
    """The live per-guest table of `ctl evacuate` on a TTY (redrawn in place), or nothing elsewhere."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tty = _isatty(stream)
        self.lines = 0

    def __call__(self, event: str, data: dict) -> None:
        if event != "evacuation" or not self.tty:
            return
        out = _evacuation_lines(data)
        if self.lines:
            self.stream.write(f"\x1b[{self.lines}F")
        for line in out:
            self.stream.write("\x1b[K" + line + "\n")
        self.stream.flush()
        self.lines = len(out)


def _evacuation_lines(snap: dict) -> list[str]:
    rows = [("GUEST", "STATE", "TO", "ROUND", "IN SYNC", "DOWNTIME", "REASON")]
    for g in snap["guests"]:
        rows.append((g["guest"], g["state"], g.get("to") or "-", g.get("round") or "-", _pct(g.get("percent")),
                     _ms(g.get("downtime_ms")), (g.get("reason") or "")[:100]))
    return _table(rows)


def _evacuate(client, args) -> int:
    targets = [t.strip() for t in args.to.split(",") if t.strip()]
    req: dict[str, Any] = {"to": targets, "max_parallel": args.max_parallel}
    if args.policy is not None:
        req["policy"] = args.policy
    if args.dry_run:
        req["dry_run"] = True
    table = _EvacuationTable(sys.stdout if not args.json else sys.stderr)
    r = client.execute("evacuate", req, on_event=table)
    if args.json:
        _print_json(r)
    else:
        if table.lines:
            table.stream.write(f"\x1b[{table.lines}F")
        for line in _evacuation_lines(r):
            print("\x1b[K" + line if table.lines else line)
        verb = "would be left" if args.dry_run else "left on this host"
        note = ""
        if r["effective_parallel"] < r["max_parallel"]:
            note = f" (max_outgoing limits parallelism to {r['effective_parallel']})"
        print(f"{r['left']} guest(s) {verb}{note}")
    return 1 if r["left"] else 0
