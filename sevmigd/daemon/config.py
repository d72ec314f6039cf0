"""Daemon configuration: defaults, the TOML file, command-line overrides, validation.

Owns the `Config` dataclass and `load_config(path, overrides)`. Precedence, lowest first: built-in
defaults (which depend on the environment: root or not, systemd's $STATE_DIRECTORY /
$RUNTIME_DIRECTORY, $XDG_*), the TOML file, then overrides (the `sevmigd serve` flags). Every value is
checked here, once, so the rest of the daemon can trust `Config`; a bad value raises
`ConfigError(key, message)` naming the key (`tls.cert`, `max_incoming`, ...) so the operator gets one
clear line and exit status 2.

This module must never: create files or directories (the daemon does that when it binds), read
certificates (the server loads trusted roots), or accept an unknown key silently (a typo in a limit
would otherwise leave the default in force without anyone noticing).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field

from sevmigd.errors import ConfigError
from sevmigd.migrate.planner import COMPLETION_ACTIONS
from sevmigd.units import check_bool as _boolean
from sevmigd.units import check_int as _int
from sevmigd.units import check_number as _float
from sevmigd.units import parse_size

# The migration port. 4446 is unassigned by IANA and close to QEMU's customary 4444 for `-incoming
# tcp:...` examples, without colliding with a QEMU running on the same host.
DEFAULT_PORT = 4446
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
#: Where guests' vCPUs and RAM live: "process" = one `sevmigd vmm` process per guest (QEMU's role; the
#: guests outlive the daemon, issue 17), "inline" = inside the daemon (unit tests, fallback).
VMM_MODES = ("process", "inline")

# Keys that SIGHUP re-reads and applies to a running daemon. Everything else (sockets, state dir,
# TLS material bound into listeners) needs a restart; the daemon logs which changed keys it ignored.
RELOADABLE = frozenset({
    "log_level", "trusted_roots", "allowed_platforms", "allowed_oca", "max_guest_bytes", "max_incoming",
    "max_outgoing", "handshake_timeout_s", "peer_timeout_s", "keepalive_interval_s", "downtime_limit_ms",
    "max_bandwidth_mib_s", "max_rounds", "max_total_s", "max_unauthenticated",
    # fleet operation (issue 12)
    "policies", "default_policy", "max_queued_outgoing", "outgoing_bandwidth_mib_s",
    "start_timeout_s", "stall_timeout_s", "max_incoming_bytes",
    # settlement of uncertain hand-offs (issue 17)
    "settle_retry_initial_s", "settle_retry_max_s",
})



@dataclass(frozen=True)
class MigrationPolicy:
    """A named migration policy (`[policies.NAME]`, `ctl migrate --policy NAME`).

    Shaped after KubeVirt's MigrationPolicy and Nova's [libvirt] live_migration_* options. Unset values
    (None) fall back to the daemon's own keys (max_bandwidth_mib_s, downtime_limit_ms); a per-request
    flag (`--max-bandwidth`, `--downtime-limit`) overrides both. Timeouts of 0 are off.
    """

    name: str
    bandwidth_mib_s: float | None = None        # KubeVirt bandwidthPerMigration
    downtime_limit_ms: int | None = None        # QEMU downtime-limit
    auto_converge: bool = True                  # KubeVirt allowAutoConverge (QEMU auto-converge)
    completion_timeout_per_gib_s: float = 0.0   # Nova live_migration_completion_timeout (800), KubeVirt 150
    completion_action: str = "abort"            # Nova live_migration_timeout_action
    progress_timeout_s: float = 0.0             # KubeVirt progressTimeout (150)

    def completion_timeout_s(self, memory_bytes: int) -> float:
        """The completion timeout of one guest: per-GiB value x guest RAM in GiB (0 = none)."""
        return self.completion_timeout_per_gib_s * memory_bytes / (1 << 30)


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS on the migration channel: all three paths, or none (off: only with insecure_plaintext).

    Without a [tls] table the paths default to STATE_DIR/tls/{cert,key,ca}.pem, which `sevmigd platform
    init` (or the first `serve` on an empty state dir) writes; `state_dir_default` says so.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    state_dir_default: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class Config:
    """The validated daemon configuration (README "Configuration" says what every key means)."""

    state_dir: str
    control: str
    # Per-boot state that outlives one daemon process but not the host: the VMM processes' sockets,
    # the PSP's per-guest contexts, in-flight migration records. Default: default_runtime_dir().
    runtime_dir: str = ""
    listen: str = DEFAULT_LISTEN
    control_group: str | None = None
    log_level: str = "info"
    log_format: str = "auto"
    trusted_roots: tuple[str, ...] | None = None      # ARK cert paths; None = the state dir's roots
    allowed_platforms: tuple[str, ...] | None = None  # platform ids (hex); None = any verified platform
    allowed_oca: tuple[str, ...] | None = None        # OCA cert paths; None = any
    # 64 GiB: larger than any guest the emulation can hold in RAM on a normal host, so it only stops
    # a typo (64T) or a hostile peer announcing an absurd size.
    max_guest_bytes: int = 64 << 30
    max_incoming: int = 4
    # Nova's max_concurrent_live_migrations default: one outgoing migration at a time, the rest queue
    # (each one then gets the whole link and finishes sooner; raise it for fast links).
    max_outgoing: int = 1
    handshake_timeout_s: float = 10.0
    peer_timeout_s: float = 10.0
    keepalive_interval_s: float = 1.0
    downtime_limit_ms: int = 300        # QEMU's default downtime-limit (300 ms)
    max_bandwidth_mib_s: float = 0.0    # 0 = unlimited
    max_rounds: int = 30
    max_total_s: float = 600.0
    psp_min_command_time_us: int = 0
    # Threads one SEND/RECEIVE_UPDATE_DATA batch is split over (page ranges, like the PSP's CCP queues;
    # psp/accel.py). Used only by the compiled page loop, which releases the GIL; the pure path runs one.
    # Default 1: measured on the 2-core box with both daemons on it (1 GiB private over TLS, 3 runs each,
    # load 3-10): 1 engine 11.9 s median, 13.6 / 17.1 us CPU per page, against 19.2 s, 16.0 / 20.7 us with
    # 2 (each daemon already has about one core; a second engine only waits for the other's core). Raise
    # it on hosts with idle cores.
    psp_workers: int = 1
    slow_step_warn_ms: float = 0.0      # 0 = off; else watch the event loop (daemon/loopwatch.py)
    tls: TlsConfig = field(default_factory=TlsConfig)
    max_unauthenticated: int = 64
    # -- fleet operation (issue 12; README "Operating a fleet") --------------------------------------
    # Prometheus /metrics endpoint, HOST:PORT; None = off.
    metrics_listen: str | None = None
    # Named migration policies and the one used when a request names none (None = the plain keys).
    policies: tuple[MigrationPolicy, ...] = ()
    default_policy: str | None = None
    # Outgoing migrations beyond max_outgoing wait in a FIFO queue of at most this many; beyond it
    # a request is refused with RESOURCE_LIMIT (an orchestrator that floods us hears it at once).
    max_queued_outgoing: int = 64
    # Host-wide cap on all outgoing migrations together, shared fairly (0 = only per-migration caps).
    outgoing_bandwidth_mib_s: float = 0.0
    # Incoming sessions (issue 11): after Accept the source must send Start within start_timeout_s, and
    # after Start something other than keepalives at least every stall_timeout_s; keepalives alone never
    # keep a session (and the guest name it reserves) alive.
    start_timeout_s: float = 30.0
    stall_timeout_s: float = 60.0
    # Guest RAM of all migrations being received at once; None = the host's physical memory.
    max_incoming_bytes: int | None = None

    # Settlement (issue 17, daemon/settle.py): after an uncertain hand-off the source asks the destination
    # over new connections, first at once, then after settle_retry_initial_s, doubling up to
    # settle_retry_max_s between attempts, until it answers or an operator resolves.
    settle_retry_initial_s: float = 0.5
    settle_retry_max_s: float = 30.0

    # Migration channel without TLS. Off by default: then no peer proves which platform it is, so the
    # source never releases its copy on a peer's word (every hand-off ends `uncertain`; PROTOCOL.md §9.7).
    insecure_plaintext: bool = False

    def policy(self, name: str | None) -> MigrationPolicy | None:
        """The named policy (`default_policy` when name is None); ConfigError("policy") when unknown."""
        if name is None:
            name = self.default_policy
            if name is None:
                return None
        for p in self.policies:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.policies) or "none configured"
        raise ConfigError("policy", f"no migration policy named {name!r} (known: {known})")
    # Private pages: true = the batch extension (one PSP crossing per 256-page batch, byte-identical
    # packets); false = one KVM_SEV_SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA ioctl per page, as upstream
    # KVM and QEMU do it (sevmigd.kvm).
    sev_batch_pages: bool = True
    # Guests in VMM processes that outlive the daemon ("process") or inside it ("inline"); VMM_MODES.
    vmm: str = "process"

    # -- derived, for the server -------------------------------------------------------------
    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen, key="listen")[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen, key="listen")[1]

    def reloadable_changes(self, new: Config) -> tuple[dict[str, object], list[str]]:
        """(changes SIGHUP applies, names of changed keys that need a restart)."""
        apply: dict[str, object] = {}
        ignored: list[str] = []
        for f in dataclasses.fields(self):
            old_v, new_v = getattr(self, f.name), getattr(new, f.name)
            if old_v == new_v:
                continue
            if f.name in RELOADABLE:
                apply[f.name] = new_v
            else:
                ignored.append(f.name)
        return apply, ignored


# ------------------------------------------------------------------------------------- defaults


def default_runtime_dir(control: str, environ: dict[str, str] | None = None) -> str:
    """$RUNTIME_DIRECTORY (systemd RuntimeDirectory=, first entry), else a directory named after the
    control socket (`/tmp/a.sock` -> `/tmp/a.run`), so that two daemons with two control sockets on one
    host never share one (the daemon also locks it)."""
    env = os.environ if environ is None else environ
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    return os.path.splitext(control)[0] + ".run"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_state_dir(environ: dict[str, str] | None = None) -> str:
    """$STATE_DIRECTORY (systemd StateDirectory=, first entry), /var/lib/sevmigd as root, else XDG."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if _is_root():
        var = pathlib.Path("/var/lib/sevmigd")
        parent = var if var.exists() else var.parent
        if os.access(parent, os.W_OK):
            return str(var)
    xdg = env.get("XDG_STATE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path(env.get("HOME") or pathlib.Path.home()) / ".local" / "state"
    return str(base / "sevmigd")


def default_control_path(environ: dict[str, str] | None = None) -> str:
    """$RUNTIME_DIRECTORY/control.sock, /run/sevmigd/control.sock as root, else the user's runtime dir."""
    env = os.environ if environ is None else environ
    if env.get("RUNTIME_DIRECTORY"):
        return str(pathlib.Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock")
    if _is_root():
        return "/run/sevmigd/control.sock"
    if env.get("XDG_RUNTIME_DIR"):
        return str(pathlib.Path(env["XDG_RUNTIME_DIR"]) / "sevmigd" / "control.sock")
    return f"/tmp/sevmigd-{os.getuid()}/control.sock"


# ----------------------------------------------------------------------------------- validation


def split_host_port(text: object, *, key: str = "listen") -> tuple[str, int]:
    """'127.0.0.1:4446', '[::1]:4446', 'host.example:4446', ':4446' (all addresses) -> (host, port)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1:].startswith(":"):
            raise ConfigError(key, f"expected [IPV6]:PORT, got {text!r}")
        host, port_s = text[1:close], text[close + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"not an IPv6 address: {host!r}") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise ConfigError(key, f"IPv6 addresses need brackets: [{host}]:{port_s}")
        if not host:
            host = "0.0.0.0"
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(key, f"port must be 0..65535, got {port_s!r}")
    return host, int(port_s)






def _str(key: str, v: object, *, choices: tuple[str, ...] | None = None, nonempty: bool = True) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"expected a string, got {v!r}")
    if nonempty and not v.strip():
        raise ConfigError(key, "must not be empty")
    if choices is not None:
        low = v.lower()
        if low not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}; got {v!r}")
        return low
    return v


def _opt_str_list(key: str, v: object) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ConfigError(key, f"expected a list of strings, got {v!r}")
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{key}[{i}]", f"expected a non-empty string, got {item!r}")
        out.append(item)
    return tuple(out)


def _platform_ids(key: str, v: object) -> tuple[str, ...] | None:
    ids = _opt_str_list(key, v)
    if ids is None:
        return None
    out = []
    for i, pid in enumerate(ids):
        p = pid.strip().lower()
        if len(p) < 16 or any(c not in "0123456789abcdef" for c in p):
            raise ConfigError(f"{key}[{i}]", f"expected a platform id (>= 16 hex digits), got {pid!r}")
        out.append(p)
    return tuple(out)


def _path(key: str, v: object) -> str:
    s = _str(key, v)
    if "\0" in s:
        raise ConfigError(key, "path contains a NUL byte")
    return os.path.expanduser(s)


def _tls(v: object) -> TlsConfig:
    if v is None:
        return TlsConfig()
    if isinstance(v, TlsConfig):
        v = {"cert": v.cert, "key": v.key, "ca": v.ca}  # (state_dir_default is decided in load_config)
    if not isinstance(v, dict):
        raise ConfigError("tls", f"expected a table with cert, key, ca; got {v!r}")
    unknown = sorted(set(v) - {"cert", "key", "ca"})
    if unknown:
        raise ConfigError(f"tls.{unknown[0]}", "unknown key (expected cert, key, ca)")
    vals = {k: (None if v.get(k) is None else _path(f"tls.{k}", v.get(k))) for k in ("cert", "key", "ca")}
    given = [k for k, x in vals.items() if x is not None]
    if given and len(given) != 3:
        missing = [k for k in ("cert", "key", "ca") if vals[k] is None]
        raise ConfigError(f"tls.{missing[0]}", "mutual TLS needs cert, key and ca together")
    return TlsConfig(**vals)


_POLICY_KEYS = {
    "bandwidth_mib_s": lambda k, v: _float(k, v, 0.0),
    "downtime_limit_ms": lambda k, v: _int(k, v, 1),
    "auto_converge": lambda k, v: _boolean(k, v),
    "completion_timeout_per_gib_s": lambda k, v: _float(k, v, 0.0),
    "completion_action": lambda k, v: _str(k, v, choices=COMPLETION_ACTIONS),
    "progress_timeout_s": lambda k, v: _float(k, v, 0.0),
}
POLICY_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")




def _policies(key: str, v: object) -> tuple[MigrationPolicy, ...]:
    """`[policies.NAME]` tables -> MigrationPolicy tuple (sorted by name); every key checked."""
    if v is None:
        return ()
    if isinstance(v, (list, tuple)) and all(isinstance(p, MigrationPolicy) for p in v):
        return tuple(v)
    if not isinstance(v, dict):
        raise ConfigError(key, f"expected [policies.NAME] tables, got {v!r}")
    out = []
    for name, table in sorted(v.items()):
        where = f"{key}.{name}"
        if not name or len(name) > 64 or not set(name) <= POLICY_NAME_CHARS:
            raise ConfigError(where, "policy names are 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(table, dict):
            raise ConfigError(where, f"expected a table, got {table!r}")
        unknown = sorted(set(table) - set(_POLICY_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", f"unknown policy key (expected: {', '.join(_POLICY_KEYS)})")
        vals = {k: _POLICY_KEYS[k](f"{where}.{k}", x) for k, x in table.items()}
        out.append(MigrationPolicy(name=name, **vals))
    return tuple(out)


def _opt_listen(key: str, v: object) -> str | None:
    if v is None:
        return None
    split_host_port(v, key=key)
    return v.strip()


# key -> validator(key, raw value) -> validated value
_VALIDATORS: dict[str, Callable[[str, object], object]] = {
    "state_dir": _path,
    "control": _path,
    "runtime_dir": _path,
    "listen": lambda k, v: (split_host_port(v, key=k), v.strip())[1],
    "control_group": lambda k, v: None if v is None else _str(k, v),
    "log_level": lambda k, v: _str(k, v, choices=LOG_LEVELS),
    "log_format": lambda k, v: _str(k, v, choices=LOG_FORMATS),
    "trusted_roots": lambda k, v: None if v is None else tuple(os.path.expanduser(p) for p in _opt_str_list(k, v)),
    "allowed_platforms": _platform_ids,
    "allowed_oca": lambda k, v: None if v is None else tuple(os.path.expanduser(p) for p in _opt_str_list(k, v)),
    "max_guest_bytes": lambda k, v: _positive_size(k, v),
    "max_incoming": lambda k, v: _int(k, v, 0, 1024),
    "max_outgoing": lambda k, v: _int(k, v, 0, 1024),
    "handshake_timeout_s": lambda k, v: _float(k, v, positive=True),
    "peer_timeout_s": lambda k, v: _float(k, v, positive=True),
    "keepalive_interval_s": lambda k, v: _float(k, v, positive=True),
    "downtime_limit_ms": lambda k, v: _int(k, v, 1),
    "max_bandwidth_mib_s": lambda k, v: _float(k, v, 0.0),
    "max_rounds": lambda k, v: _int(k, v, 1, 100_000),
    "max_total_s": lambda k, v: _float(k, v, positive=True),
    "psp_min_command_time_us": lambda k, v: _int(k, v, 0, 10_000_000),
    "psp_workers": lambda k, v: _int(k, v, 1, 64),
    "slow_step_warn_ms": lambda k, v: _float(k, v, 0.0),
    "tls": lambda k, v: _tls(v),
    "max_unauthenticated": lambda k, v: _int(k, v, 1, 65536),
    "metrics_listen": _opt_listen,
    "policies": _policies,
    "default_policy": lambda k, v: None if v is None else _str(k, v),
    "max_queued_outgoing": lambda k, v: _int(k, v, 0, 100_000),
    "outgoing_bandwidth_mib_s": lambda k, v: _float(k, v, 0.0),
    "sev_batch_pages": lambda k, v: _flag(k, v),
    "vmm": lambda k, v: _str(k, v, choices=VMM_MODES),
    "insecure_plaintext": lambda k, v: _flag(k, v),
    "start_timeout_s": lambda k, v: _float(k, v, positive=True),
    "stall_timeout_s": lambda k, v: _float(k, v, positive=True),
    "max_incoming_bytes": lambda k, v: None if v is None else _positive_size(k, v),
    "settle_retry_initial_s": lambda k, v: _float(k, v, positive=True),
    "settle_retry_max_s": lambda k, v: _float(k, v, positive=True),
}


def _flag(key: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {v!r}")
    return v


def _positive_size(key: str, v: object) -> int:
    if isinstance(v, bool):
        raise ConfigError(key, f"expected a size such as 64G, got {v!r}")
    n = parse_size(v, key=key)
    if n < 4096:
        raise ConfigError(key, f"must be at least 4096 bytes, got {n}")
    return n


KEYS = tuple(_VALIDATORS)


def _check_cross(cfg: Config) -> None:
    if cfg.default_policy is not None:
        try:
            cfg.policy(cfg.default_policy)
        except ConfigError as exc:
            raise ConfigError("default_policy", exc.message) from None
    if cfg.keepalive_interval_s >= cfg.peer_timeout_s:
        raise ConfigError("keepalive_interval_s",
                          f"must be smaller than peer_timeout_s ({cfg.peer_timeout_s}) or a healthy peer "
                          "would look stalled")
    if cfg.settle_retry_initial_s > cfg.settle_retry_max_s:
        raise ConfigError("settle_retry_initial_s",
                          f"must not exceed settle_retry_max_s ({cfg.settle_retry_max_s})")


def read_toml(path: str) -> dict[str, object]:
    """Parse the TOML file; unreadable or malformed -> ConfigError naming the file (and line)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"no such file: {path}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path}: invalid TOML: {exc}") from None


def load_config(path: str | None = None, overrides: dict[str, object] | None = None, *,
                environ: dict[str, str] | None = None) -> Config:
    """Defaults <- TOML file at `path` (when given) <- `overrides` (None values are "not given")."""
    raw: dict[str, object] = {}
    if path is not None:
        data = read_toml(path)
        for k in data:
            if k not in _VALIDATORS:
                raise ConfigError(k, f"unknown configuration key in {path}")
        raw.update(data)
    for k, v in (overrides or {}).items():
        if k not in _VALIDATORS:
            raise ConfigError(k, "unknown configuration key")
        if v is not None:
            raw[k] = v
    values: dict[str, object] = {}
    for k, v in raw.items():
        if v is None and k not in ("control_group", "trusted_roots", "allowed_platforms", "allowed_oca", "tls",
                                   "metrics_listen", "default_policy", "policies", "max_incoming_bytes"):
            raise ConfigError(k, "must not be empty")
        values[k] = _VALIDATORS[k](k, v)
    values.setdefault("state_dir", default_state_dir(environ))
    values.setdefault("control", default_control_path(environ))
    values.setdefault("runtime_dir", default_runtime_dir(values["control"], environ))
    tls = values.get("tls") or TlsConfig()
    if values.get("insecure_plaintext"):
        if tls.enabled:
            raise ConfigError("insecure_plaintext", "true contradicts the [tls] table: choose one")
    elif not tls.enabled:
        from sevmigd.store import tls_paths

        values["tls"] = TlsConfig(**tls_paths(values["state_dir"]), state_dir_default=True)
    cfg = Config(**values)
    _check_cross(cfg)
    return cfg


def config_as_dict(cfg: Config) -> dict[str, object]:
    """JSON-able view (for `server-info` and logs); contains paths, never key material."""
    d = dataclasses.asdict(cfg)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    return d


__all__ = ["Config", "TlsConfig", "MigrationPolicy", "COMPLETION_ACTIONS", "load_config", "default_state_dir", "default_control_path",
           "default_runtime_dir",
           "split_host_port", "config_as_dict", "RELOADABLE", "KEYS", "DEFAULT_PORT", "DEFAULT_LISTEN"]
