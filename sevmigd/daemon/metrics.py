"""Prometheus metrics of one daemon, served from trio on `metrics_listen` (off by default).

Owns `DaemonMetrics(daemon)`: a per-daemon `prometheus_client.CollectorRegistry` (never the process-wide
default one, so two daemons in one process - the driver tests - never mix their figures), the event
counters the migration manager bumps when a migration ends, the PSP command counters and latency
histograms (an observer on the daemon's PspRunner, which every firmware command goes through), and a collector
that reads the daemon's state at scrape time (guests by state, leak counters, queue, active migrations,
per-migration figures shaped like KubeVirt's `kubevirt_vmi_migration_*`). `serve(listen)` is a small
HTTP/1.1 responder on trio that answers `GET /metrics` with `prometheus_client`'s own encoder (text or
OpenMetrics, as the scraper's Accept header asks): no thread, no blocking server inside the event loop.

Metric names are listed in README "Operating a fleet". Per-migration series are labelled
guest / migration (the migration id = the job id of `ctl jobs`) / role, and exist for the migrations in
progress plus the last `HISTORY` finished ones (the same bound as `ctl jobs`), so label sets stay bounded;
the `_total` counters are what alert rules and rates should use.

This module must never: block the event loop for long (a scrape walks small dicts), put a guest's page
contents or keys in a label (names and ids only), or let a scrape failure reach the daemon (the HTTP
task catches, logs, answers 500 and goes on).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from sevmigd import __version__
from sevmigd.daemon.config import split_host_port
from sevmigd.daemon.errors import StartupError
from sevmigd.wire.errors import AbortCode

from sevmigd.units import PAGE_SIZE

if TYPE_CHECKING:  # the daemon and its migration manager import this module; it only names their types
    from sevmigd.daemon.migration import MigrationManager
    from sevmigd.daemon.psprunner import PspRunner
    from sevmigd.daemon.server import Daemon
    from sevmigd.migrate.stats import MigrationStats
    from sevmigd.psp.status import SevStatus
# PSP command latency buckets: the emulated PSP answers single commands in 10s of microseconds and a
# 1 MiB SEND_UPDATE_DATA batch in milliseconds; a real PSP takes 100s of microseconds per command.
PSP_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
# HTTP side: a scrape request is one line and a few headers; anything bigger or slower is not Prometheus.
MAX_REQUEST_BYTES = 16 << 10
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16
ROLES = ("source", "destination")

_log = structlog.get_logger("sevmigd")


class DaemonMetrics:
    """All metrics of one daemon (see the module docstring)."""

    def __init__(self, daemon: Daemon, guest_states: tuple[str, ...] = ()):
        self.daemon = daemon
        # No `_created` series next to every counter: noise for Prometheus, which tracks resets itself.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.succeeded = Counter("sevmigd_migrations_succeeded", "Migrations that completed (guest runs on the "
                                 "destination)", ["role"], registry=r)
        self.failed = Counter("sevmigd_migrations_failed", "Migrations that failed (before the hand-off: the "
                              "guest kept running on the source), by abort code", ["role", "code"], registry=r)
        self.cancelled = Counter("sevmigd_migrations_cancelled", "Migrations cancelled by an operator or a "
                                 "shutdown (guest kept running on the source)", ["role"], registry=r)
        self.uncertain = Counter("sevmigd_migrations_uncertain", "Outgoing migrations whose hand-off was left "
                                 "uncertain ('go' sent, 'started' never heard): needs `ctl resolve`", registry=r)
        self.settled = Counter("sevmigd_migrations_settled", "Uncertain hand-offs settled, by how ('query': the "
                               "destination's answer to the settlement query; 'operator': `ctl resolve`) and "
                               "the resolution (released | resumed)", ["by", "resolution"], registry=r)
        for by in ("query", "operator"):
            for resolution in ("released", "resumed"):
                self.settled.labels(by, resolution)
        self.data_processed = Counter("sevmigd_migrations_data_processed_bytes", "Bytes put on (source) or "
                                      "taken off (destination) the wire by finished migrations", ["role"],
                                      registry=r)
        self.psp_commands = Counter("sevmigd_psp_commands", "Firmware commands run by the emulated PSP, by "
                                    "command and SEV status", ["command", "status"], registry=r)
        self.psp_latency = Histogram("sevmigd_psp_command_duration_seconds", "Firmware command latency",
                                     ["command"], buckets=PSP_BUCKETS, registry=r)
        for role in ROLES:  # every series exists from the first scrape (increase() needs a start)
            self.succeeded.labels(role)
            self.cancelled.labels(role)
            self.data_processed.labels(role)
            for code in AbortCode:
                self.failed.labels(role, code.name)
        r.register(_StateCollector(daemon, guest_states))
        self.address: str | None = None
        self._connections = 0

    # -- events --------------------------------------------------------------------------------------

    def migration_finished(self, stats: MigrationStats | dict) -> None:
        """Count a finished migration (MigrationStats or its dict) by its final status."""
        d = stats if isinstance(stats, dict) else stats.to_dict()
        role = d.get("role") if d.get("role") in ROLES else "source"
        status = d.get("status")
        if status == "completed":
            self.succeeded.labels(role).inc()
        elif status == "cancelled":
            self.cancelled.labels(role).inc()
        elif status == "uncertain":
            self.uncertain.inc()
        else:
            code = d.get("error_code") or "INTERNAL_ERROR"
            self.failed.labels(role, str(code)).inc()
        self.data_processed.labels(role).inc(max(int(d.get("transferred") or 0), 0))

    def hand_off_settled(self, by: str, resolution: str) -> None:
        """An uncertain hand-off was settled (daemon/settle.py, `ctl resolve`)."""
        self.settled.labels(by, resolution).inc()

    def watch_psp(self, runner: PspRunner) -> None:
        """Count and time every firmware command the daemon runs: an observer on its PspRunner (the one
        place every command goes through). Idempotent."""
        if self.observe_psp not in runner.observers:
            runner.observers.append(self.observe_psp)

    def observe_psp(self, command: str, seconds: float, status: SevStatus | None) -> None:
        """PspRunner observer: `status` None on success, else the SevStatus the firmware answered."""
        self.psp_commands.labels(command, "SUCCESS" if status is None else status.name).inc()
        self.psp_latency.labels(command).observe(seconds)

    # -- HTTP ----------------------------------------------------------------------------------------

    async def serve(self, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve /metrics on `listen` (HOST:PORT, port 0 = any) until cancelled; started(bound address)."""
        host, port = split_host_port(listen, key="metrics_listen")
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise StartupError(f"cannot listen on metrics_listen {listen}: {exc.strerror or exc}") from None
        addr = listeners[0].socket.getsockname()
        self.address = f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
        _log.info("metrics_listening", metrics=self.address)
        async with trio.open_nursery() as nursery:
            task_status.started(self.address)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._connections >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                head = await _read_head(stream)
                status, ctype, body = self._respond(head)
                await _send_response(stream, status, ctype, body, head_only=head is not None
                                     and head[0] == "HEAD")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # an outermost loop: a scrape bug must not reach the daemon
            _log.error("metrics_request_failed", exc_info=True)
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    def _respond(self, head: tuple[str, str, dict[str, str]] | None) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if head is None:
            return "400 Bad Request", text, b"bad request\n"
        method, target, headers = head
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"only GET\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            try:
                encoder, ctype = choose_encoder(headers.get("accept", ""))
                return "200 OK", ctype, encoder(self.registry)
            except Exception:
                _log.error("metrics_collect_failed", exc_info=True)
                return "500 Internal Server Error", text, b"collecting metrics failed (see the daemon log)\n"
        if path == "/":
            return "200 OK", "text/html; charset=utf-8", (
                b"<html><body><h1>sevmigd</h1><a href=\"/metrics\">/metrics</a></body></html>\n")
        return "404 Not Found", text, b"not found: try /metrics\n"


async def _read_head(stream: trio.abc.ReceiveStream) -> tuple[str, str, dict[str, str]] | None:
    """Request line and headers, or None when malformed / too large / closed early."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_REQUEST_BYTES:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        buf += data
    lines = bytes(buf).replace(b"\r\n", b"\n").split(b"\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        return None
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        k, sep, v = line.decode("latin-1").partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return method, target, headers


async def _send_response(stream: trio.abc.SendStream, status: str, ctype: str, body: bytes, *,
                         head_only: bool) -> None:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode("latin-1")
    await stream.send_all(head if head_only else head + body)


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class _StateCollector:
    """Gauges read from the daemon at scrape time (in the event loop's thread: the HTTP task calls it)."""

    # (metric suffix, help, stats key, scale): per-migration gauges shaped like kubevirt_vmi_migration_*
    GAUGES = (
        ("data_processed_bytes", "Bytes of this migration on the wire so far (QEMU transferred)", "transferred", 1),
        ("data_remaining_bytes", "Dirty bytes still to send (QEMU remaining)", "remaining", 1),
        ("data_total_bytes", "Guest RAM bytes", "total", 1),
        ("dirty_memory_rate_bytes", "Bytes the guest dirtied per second, last measurement", "dirty_pages_rate",
         PAGE_SIZE),
        ("memory_transfer_rate_bytes", "Mean bytes per second on the wire so far", "throughput_mbps", 1e6 / 8),
        ("round", "Current pre-copy round (QEMU dirty-sync-count)", "round", 1),
        ("expected_downtime_seconds", "Downtime the stop-and-copy would take now", "expected_downtime_ms",
         1e-3),
        ("downtime_seconds", "Actual downtime of the stop-and-copy (set when known)", "downtime_ms", 1e-3),
        ("elapsed_seconds", "Time since the migration started", "total_time_ms", 1e-3),
        ("throttle_ratio", "Auto-converge vCPU throttle in force (0..1)", "throttle_pct", 1e-2),
    )
    COUNTERS = (
        ("private_pages_sent", "Pages sent/received through SEND/RECEIVE_UPDATE_DATA", "private_pages"),
        ("shared_pages_sent", "Pages sent/received in the clear (shared with the hypervisor)", "shared_pages"),
    )

    def __init__(self, daemon: Daemon, guest_states: tuple[str, ...]):
        self.daemon = daemon
        self.guest_states = guest_states  # every state has a series, 0 included

    def describe(self) -> list:
        return []  # names vary with state; the registry must not call collect() at register time

    def collect(self):
        d = self.daemon
        mgr = d.migrations
        states: dict[str, int] = {}
        for s in self.guest_states:
            states[s] = 0
        for g in list(d.guests.values()):
            states[g.state] = states.get(g.state, 0) + 1
        fam = GaugeMetricFamily("sevmigd_guests", "Guests hosted by this daemon, by state", labels=["state"])
        for s, n in states.items():
            fam.add_metric([s], n)
        yield fam

        info = GaugeMetricFamily("sevmigd_info", "Daemon version and platform", labels=["version", "platform_id"])
        info.add_metric([__version__, str(d.platform_id or "")], 1)
        yield info

        # the leak counters of `ctl server-info` (issue 6 invariant 5)
        for key, value in d.resource_counts().items():
            if value is not None:
                yield GaugeMetricFamily(f"sevmigd_{key}", f"server-info {key}: what a failed migration must "
                                                          f"not leave behind", value=value)

        outgoing = len(mgr.outgoing)
        incoming = len(mgr.incoming)
        act = GaugeMetricFamily("sevmigd_migrations_active", "Migrations in progress", labels=["role"])
        act.add_metric(["source"], outgoing)
        act.add_metric(["destination"], incoming)
        yield act
        yield GaugeMetricFamily("sevmigd_outgoing_queue_length", "Outgoing migrations waiting for a slot "
                                "(max_outgoing)", value=len(mgr.queue))
        yield GaugeMetricFamily("sevmigd_outgoing_migrations_high_water", "Most outgoing migrations that ever "
                                "ran at once since the daemon started", value=mgr.high_water)
        yield GaugeMetricFamily("sevmigd_max_outgoing", "Configured max_outgoing", value=d.config.max_outgoing)

        rows = list(_migration_rows(mgr))
        labels = ["guest", "migration", "role"]
        for suffix, help_, key, scale in self.GAUGES:
            fam = GaugeMetricFamily(f"sevmigd_migration_{suffix}", help_, labels=labels)
            for lab, st in rows:
                v = _num(st.get(key))
                if v is not None:
                    fam.add_metric(lab, v * scale)
            yield fam
        for suffix, help_, key in self.COUNTERS:
            fam = CounterMetricFamily(f"sevmigd_migration_{suffix}", help_, labels=labels)
            for lab, st in rows:
                v = _num(st.get(key))
                if v is not None:
                    fam.add_metric(lab, v)
            yield fam
        fam = GaugeMetricFamily("sevmigd_migration_status", "1 for the migration's current status",
                                labels=labels + ["status", "peer", "policy"])
        for lab, st in rows:
            fam.add_metric(lab + [str(st.get("status")), str(st.get("peer")), str(st.get("policy") or "")], 1)
        yield fam


def _migration_rows(mgr: MigrationManager) -> Iterable[tuple[list[str], dict]]:
    """(labels, stats dict) of the migrations in progress and the recent finished ones, newest wins."""
    seen: dict[tuple[str, str], tuple[list[str], dict]] = {}
    for st in list(mgr.history):
        if isinstance(st, dict):
            seen[(st.get("role"), st.get("migration_id"))] = ([str(st.get("guest")), str(st.get("migration_id")),
                                                              str(st.get("role"))], st)
    for table in ("outgoing", "incoming"):
        migrations = mgr.outgoing if table == "outgoing" else mgr.incoming
        for mig in list(migrations.values()):
            st = mig.stats.to_dict()
            seen[(st.get("role"), st.get("migration_id"))] = ([str(st.get("guest")), str(st.get("migration_id")),
                                                              str(st.get("role"))], st)
    return seen.values()


__all__ = ["DaemonMetrics"]
