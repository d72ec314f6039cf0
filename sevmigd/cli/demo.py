"""`sevmigd demo` (also `make demo`): a live migration on this machine, from nothing, in one command.

What it does, all inside a fresh temporary directory: creates a fleet CA and two platform identities
issued by it (the store layout a real host has), starts two `sevmigd serve` daemons on 127.0.0.1 (free
ports), launches a 256 MiB SEV guest on the first under a live workload (8 MiB/s dirty rate, 25 % of its
pages shared with the host, pages flipping between private and shared), live-migrates it to the second
with a progress line, runs the guest's self-check on the destination and prints a short report.

Everything it started is stopped and the directory removed on every exit path (success, failure, Ctrl-C),
unless `--keep` asks to keep the directory (logs) for a look. Exit 0 when the migration completed and the
guest verified on the destination.

`start_local_daemon` / `new_fleet_dirs` are reused by `sevmigd.bench.migration`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time

from typing import TYPE_CHECKING

from sevmigd.errors import SevmigdError

if TYPE_CHECKING:
    from sevmigd.testing.daemons import DaemonProcess

# Waiting for a daemon to come up (identity load, first RSA use) on a slow, shared machine.
READY_TIMEOUT_S = 60.0
# SIGTERM first (the daemon aborts migrations and DECOMMISSIONs cleanly), SIGKILL after this.
STOP_TIMEOUT_S = 20.0
# RSA size of the demo fleet's ARK/ASK: 2048 bits (Naples size) keeps CA creation to about a second;
# the real AMD roots of Rome and later are 4096-bit (`sevmigd certs ca init` makes those).
DEMO_RSA_BITS = 2048


class DemoError(SevmigdError):
    """The demo could not run or the migration failed (the message says which step)."""


def start_local_daemon(name: str, root: pathlib.Path, *, state_dir: pathlib.Path | None = None,
                       config: dict | None = None) -> DaemonProcess:
    """`sevmigd serve` on 127.0.0.1 (a free port) with the platform in `state_dir` (default root/state),
    its output also in root/daemon.log; returns once it is ready (the harness of sevmigd.testing.daemons:
    the tests, the fault matrix, the demo and the benchmark start daemons the same way)."""
    from sevmigd.testing.daemons import DaemonProcess, DaemonStartError

    d = DaemonProcess(root, name, state_dir=state_dir or root / "state", config=config, log_level="info",
                      log_file=root / "daemon.log")
    try:
        d.spawn()
        d.wait_ready(READY_TIMEOUT_S)
    except DaemonStartError as exc:
        d.stop(STOP_TIMEOUT_S)
        d.cleanup()
        raise DemoError(f"daemon {name} did not become ready: {exc}") from None
    return d


def new_fleet_dirs(root: pathlib.Path, names: list[str]) -> dict[str, pathlib.Path]:
    """A fresh fleet CA under root/ca and one platform identity per name under root/<name>/state, each
    trusting the fleet's ARK (what `sevmigd ca init` + `platform init` do on real hosts)."""
    from sevmigd import store
    from sevmigd.psp.identity import FleetCA, PlatformIdentity

    ca = FleetCA.create(os.urandom, rsa_bits=DEMO_RSA_BITS)
    store.save_ca(root / "ca", ca)
    tls_ca = store.load_tls_ca(root / "ca")  # the fleet's TLS CA, next to the ARK/ASK
    out = {}
    for name in names:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        identity = PlatformIdentity.create(ca, os.urandom)
        store.save_platform(d / "state", identity, trusted_ark=ca.ark)
        # Mutual TLS is the default: a host certificate naming this platform's chip, as `platform init` does.
        store.issue_host_tls(d / "state", tls_ca, identity)
        out[name] = d
    return out


class _Progress:
    """Migration progress on stderr: one permanent line per finished round, and on a terminal a live
    line rewritten in place in between."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.rounds_shown = 0
        self.live = False

    def __call__(self, event: str, d: dict) -> None:
        if event != "progress":
            return
        rounds = d.get("rounds") or []
        for r in rounds[self.rounds_shown:]:
            self._clear()
            if r.get("decision") == "complete":
                text = (f"  stop-and-copy: guest paused, {r.get('pages')} pages "
                        f"({r.get('flipped_pages', 0)} flipped since sent) in {r.get('seconds', 0) * 1000:.0f} ms")
            else:
                text = (f"  round {r.get('round')}: {r.get('pages')} pages ({r.get('private_pages')} private, "
                        f"{r.get('shared_pages')} shared) in {r.get('seconds', 0):.2f} s at "
                        f"{r.get('bandwidth_mib_s')} MiB/s; {r.get('dirty_pages')} dirty again, expected downtime "
                        f"{_ms(r.get('expected_downtime_ms'))}"
                        + (f", throttle {r['throttle_pct']} %" if r.get("throttle_pct") else "")
                        + f" -> {r.get('decision')}")
            self.stream.write(text + "\n")
        self.rounds_shown = len(rounds)
        if self.tty and d.get("status") == "active":
            line = (f"  round {d.get('round', 0)}: {(d.get('transferred') or 0) / 2**20:.1f} MiB sent, "
                    f"{(d.get('remaining') or 0) / 2**20:.1f} MiB to go, {d.get('throughput_mbps') or 0:.0f} Mbit/s")
            self.stream.write("\r" + line[:120].ljust(120))
            self.live = True
        self.stream.flush()

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r" + " " * 120 + "\r")
            self.live = False

    def finish(self) -> None:
        self._clear()
        self.stream.flush()


def _ms(v) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.0f} ms"


def register(sub) -> None:
    p = sub.add_parser("demo", help="migrate a live 256 MiB SEV guest between two local daemons (self-contained)")
    p.add_argument("--memory", default="256M", metavar="SIZE", help="guest RAM (default 256M)")
    p.add_argument("--dirty-rate", type=float, default=8.0, metavar="MIB_S", help="workload dirty rate (default 8)")
    p.add_argument("--shared-fraction", type=float, default=0.25, metavar="F",
                   help="fraction of pages the guest shares with the host (default 0.25)")
    p.add_argument("--flip-rate", type=float, default=20.0, metavar="N",
                   help="private<->shared page flips per second (default 20)")
    p.add_argument("--policy", default="0x0", metavar="HEX", help="guest policy (0x4 = SEV-ES; default 0)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, identities)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from sevmigd.errors import ConfigError
    from sevmigd.units import parse_size

    memory = parse_size(args.memory, key="--memory")
    try:
        policy = int(args.policy, 16)
    except ValueError:
        raise ConfigError("--policy", f"not a hex number: {args.policy!r}") from None
    root = pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-demo-"))
    daemons: list[DaemonProcess] = []
    out = sys.stderr
    try:
        t0 = time.monotonic()
        print(f"sevmigd demo: working in {root}", file=out)
        dirs = new_fleet_dirs(root, ["host-a", "host-b"])
        print("  fleet CA and two platform identities created (ARK -> ASK -> CEK -> PEK -> PDH), each host with a "
              "TLS certificate naming its platform (mutual TLS, the default)", file=out)
        for name in ("host-a", "host-b"):
            d = start_local_daemon(name, dirs[name])
            daemons.append(d)
            print(f"  {name}: sevmigd serve pid {d.pid}, migration listener {d.address}", file=out)
        a, b = daemons
        st = a.execute("launch", {"name": "demo-guest", "memory": memory, "policy": policy,
                                  "dirty_rate": args.dirty_rate, "shared_fraction": args.shared_fraction,
                                  "flip_rate": args.flip_rate, "seed": 1})
        print(f"  host-a: guest demo-guest launched: {memory >> 20} MiB, policy {st.get('policy')}, "
              f"{st.get('private_pages')} private + {st.get('shared_pages')} shared pages, "
              f"workload {args.dirty_rate:g} MiB/s", file=out)
        print(f"  migrating demo-guest host-a -> host-b ({b.address}), guest running:", file=out)
        progress = _Progress(out)
        try:
            stats = a.execute("migrate", {"name": "demo-guest", "to": b.address}, on_event=progress, timeout=None)
        finally:
            progress.finish()
        verify = b.execute("verify", {"name": "demo-guest"})
        src_state = a.execute("status", {"name": "demo-guest"}).get("state")
        dst_state = b.execute("status", {"name": "demo-guest"}).get("state")
        report = {
            "status": stats.get("status"),
            "total_time_ms": stats.get("total_time_ms"),
            "downtime_ms": stats.get("downtime_ms"),
            "expected_downtime_ms": stats.get("expected_downtime_ms"),
            "rounds": stats.get("round"),
            "transferred_mib": round((stats.get("transferred") or 0) / 2**20, 1),
            "throughput_mbps": stats.get("throughput_mbps"),
            "private_pages": stats.get("private_pages"),
            "shared_pages": stats.get("shared_pages"),
            "verify_ok": bool(verify.get("ok")),
            "verify_pages_checked": verify.get("pages_checked"),
            "verify_mismatches": verify.get("mismatch_count", len(verify.get("mismatches", []))),
            "source_state": src_state,
            "destination_state": dst_state,
            "demo_seconds": round(time.monotonic() - t0, 1),
        }
        ok = report["status"] == "completed" and report["verify_ok"] and dst_state == "running"
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(
                f"\nmigration {report['status']}: {_ms(report['total_time_ms'])} total, downtime "
                f"{_ms(report['downtime_ms'])} (expected {_ms(report['expected_downtime_ms'])}), "
                f"{report['rounds']} round(s)\n"
                f"  {report['transferred_mib']} MiB on the wire at {report['throughput_mbps'] or 0:.0f} Mbit/s; "
                f"{report['private_pages']} private pages through SEND/RECEIVE_UPDATE_DATA, "
                f"{report['shared_pages']} shared pages in the clear\n"
                f"  verify on host-b: {'ok' if report['verify_ok'] else 'FAILED'} "
                f"({report['verify_pages_checked']} pages checked, {report['verify_mismatches']} mismatches); "
                f"host-a shows the guest as {src_state}, host-b as {dst_state}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\nsevmigd demo: interrupted; stopping the daemons", file=out)
        return 130
    except SevmigdError:
        for d in daemons:
            print(f"--- last lines of {d.name}'s log ---\n{d.output(15)}", file=out)
        raise
    finally:
        # Ctrl-C during cleanup must not leave daemons behind: ignore it until we are done.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for d in reversed(daemons):
                d.stop(STOP_TIMEOUT_S)
                d.cleanup()
            if args.keep:
                print(f"sevmigd demo: kept {root}", file=out)
            else:
                shutil.rmtree(root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)
