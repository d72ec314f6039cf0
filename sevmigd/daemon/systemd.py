"""systemd integration: readiness/status notification, socket activation and the watchdog.

Owns the three systemd service-manager protocols sevmigd speaks, implemented from their documented
wire formats (sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3)) so that no libsystemd binding
is needed:

* ``notify(state)`` sends one datagram of newline-separated ``KEY=VALUE`` assignments to the
  AF_UNIX datagram socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
  namespace). When the variable is unset (not started by systemd, or ``Type=simple``) it is a no-op
  returning False, so the daemon calls it unconditionally.
* ``listen_fds()`` takes the sockets systemd passed (``LISTEN_FDS`` fds from fd 3, only when
  ``LISTEN_PID`` is our pid), marks them close-on-exec and unsets the variables so that a child
  process can never mistake them for its own.
* ``watchdog_interval()`` / ``watchdog_task()``: with ``WatchdogSec=`` the manager sets
  ``WATCHDOG_USEC``; we ping ``WATCHDOG=1`` every half of it *from the trio event loop*, so a wedged
  loop (a blocking call, a livelock) stops the pings and systemd restarts the daemon.
* Pure helpers that format messages (``message``, ``status_text``) so that what the daemon says is
  testable without a socket.

This module must never: raise out of ``notify`` (a lost status line must not take the daemon down),
block the event loop for long (the send has a short timeout), log (callers log; this stays quiet and
importable everywhere), or leave an inherited fd without CLOEXEC.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Mapping

import trio

from sevmigd.errors import ConfigError

# First inherited fd, fixed by the protocol (SD_LISTEN_FDS_START in sd-daemon.h).
SD_LISTEN_FDS_START = 3

# Upper bound on one notification send. systemd drains its notify socket promptly; if its queue is
# full we would rather drop a STATUS line than stall every guest's vCPU task on the event loop.
NOTIFY_SEND_TIMEOUT_S = 1.0

# Ping at half the watchdog timeout, as sd_watchdog_enabled(3) recommends: one late ping still
# lands inside the window.
WATCHDOG_FRACTION = 0.5

# A lower bound so that a tiny or hostile WATCHDOG_USEC cannot turn the ping task into a busy loop.
WATCHDOG_MIN_INTERVAL_S = 0.01

# STATUS= is shown by `systemctl status`; keep it one short line.
STATUS_MAX_LEN = 200

_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SocketActivationError(ConfigError):
    """systemd passed something sevmigd cannot listen on: the .socket unit is misconfigured."""

    def __init__(self, message: str):
        super().__init__("LISTEN_FDS", message)


# --------------------------------------------------------------------------------------- sd_notify


def notify_address(value: str | None) -> str | bytes | None:
    """Map a ``$NOTIFY_SOCKET`` value to an AF_UNIX address (pure).

    ``/path`` is a filesystem socket; ``@name`` is the Linux abstract namespace (leading NUL byte).
    Anything else (empty, relative path, ``vsock:`` which systemd >= 254 may use for VMs) is not
    something we can reach, so it is treated as unset rather than guessed at.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def message(**fields: object) -> str:
    """Format ``KEY=VALUE`` assignments as one notify payload (pure): ``message(READY=1, STATUS="up")``.

    Values may not contain a newline (it would start a new assignment); that is a caller bug, so it
    raises ValueError instead of being sent half-parsed.
    """
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text or "\0" in text:
            raise ValueError(f"notify field {key} contains a newline or NUL")
        lines.append(f"{key}={text}")
    return "\n".join(lines)


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager.

    Returns True when the datagram was sent, False when there is no manager to tell or the send
    failed. Never raises: a status line is never worth taking the daemon down for.
    """
    env = os.environ if environ is None else environ
    address = notify_address(env.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT_S)
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False


def ready(status: str | None = None, **extra: object) -> bool:
    """READY=1 (+ STATUS=, MAINPID=...): call once the listener and the control socket are bound."""
    fields: dict[str, object] = {"READY": 1}
    if status is not None:
        fields["STATUS"] = _clip(status)
    fields.update(extra)
    return notify(message(**fields))


def stopping(status: str | None = "stopping") -> bool:
    """STOPPING=1: sent first thing on SIGTERM, so `systemctl status` shows 'deactivating'."""
    fields: dict[str, object] = {"STOPPING": 1}
    if status is not None:
        fields["STATUS"] = _clip(status)
    return notify(message(**fields))


def reloading(status: str | None = "reloading configuration") -> bool:
    """RELOADING=1 with MONOTONIC_USEC (systemd >= 253 requires it; older ones ignore it).

    Send on SIGHUP before re-reading the configuration, then ``ready()`` when done.
    """
    fields: dict[str, object] = {
        "RELOADING": 1,
        "MONOTONIC_USEC": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
    }
    if status is not None:
        fields["STATUS"] = _clip(status)
    return notify(message(**fields))


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC: ask for more time while stopping (a migration past "go" finishing)."""
    return notify(message(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000))))


def status(text: str) -> bool:
    """STATUS=<text>: the one-line state `systemctl status sevmigd` shows."""
    return notify(message(STATUS=_clip(text)))


def _clip(text: str) -> str:
    text = " ".join(str(text).split())  # one line, no control characters from guest names
    return text if len(text) <= STATUS_MAX_LEN else text[: STATUS_MAX_LEN - 3] + "..."


def status_text(guest_states: Iterable[str], *, listening: str | None = None,
                shutting_down: bool = False) -> str:
    """The STATUS= line for a set of guest states (pure).

    ``guest_states`` are HostedGuest.state values (running, paused, migrating, migrated, incoming,
    stopped). Example: ``"3 guests: 2 running, 1 migrating; migrations: 1 out, 0 in; listening on
    127.0.0.1:4446"``.
    """
    counts: dict[str, int] = {}
    for s in guest_states:
        counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    order = ("running", "paused", "migrating", "incoming", "migrated", "stopped")
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in order]
    noun = "guest" if total == 1 else "guests"
    text = f"{total} {noun}" + (": " + ", ".join(parts) if parts else "")
    text += f"; migrations: {counts.get('migrating', 0)} out, {counts.get('incoming', 0)} in"
    if listening:
        text += f"; listening on {listening}"
    if shutting_down:
        text = "shutting down; " + text
    return _clip(text)


# How often status_task re-checks the daemon's state. The line only changes on guest or migration
# transitions; one second keeps `systemctl status` current without measurable cost.
STATUS_INTERVAL_S = 1.0


async def status_task(current: Callable[[], str], *, interval: float = STATUS_INTERVAL_S,
                      send: Callable[[str], bool] = status, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep STATUS= current: send `current()` (the daemon's status line) whenever it changes (run in a
    nursery)."""
    task_status.started()
    last = None
    while True:
        text = current()
        if text != last:
            send(text)
            last = text
        await trio.sleep(interval)


# --------------------------------------------------------------------------------- socket activation


def listen_fds_count(environ: Mapping[str, str], pid: int) -> int:
    """How many fds systemd passed to process ``pid`` (pure; sd_listen_fds semantics).

    0 unless LISTEN_PID names exactly this process (the variables are inherited by children that
    must not claim the sockets) and LISTEN_FDS is a positive decimal integer.
    """
    try:
        if int(environ.get("LISTEN_PID", "")) != pid:
            return 0
        n = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return 0
    return n if n > 0 else 0


def listen_fds(unset_env: bool = True, *, environ: dict[str, str] | None = None) -> list[int]:
    """The fds systemd passed us (3, 4, ...), each marked close-on-exec; [] when not socket-activated.

    With ``unset_env`` the LISTEN_* variables are removed (as sd_listen_fds(1) does) so that anything
    we spawn does not believe it was socket-activated.
    """
    env = os.environ if environ is None else environ
    n = listen_fds_count(env, os.getpid())
    if unset_env:
        for key in _LISTEN_ENV:
            env.pop(key, None)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            raise SocketActivationError(f"LISTEN_FDS={n} but fd {fd} is not open ({exc.strerror})") from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fds


def listen_fd_names(environ: Mapping[str, str], count: int) -> list[str]:
    """Names from LISTEN_FDNAMES (FileDescriptorName=), "unknown" where absent (pure)."""
    names = [n for n in environ.get("LISTEN_FDNAMES", "").split(":")] if environ.get("LISTEN_FDNAMES") else []
    return (names + ["unknown"] * count)[:count]


def listening_socket(fd: int) -> socket.socket:
    """Wrap an inherited fd as a listening stream socket, checking it is one.

    A datagram socket, a connected socket or a plain file (``Accept=yes`` or a wrong ListenX= in the
    .socket unit) is refused with a message naming the fd, instead of failing later in accept().
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise SocketActivationError(f"fd {fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SocketActivationError(f"fd {fd} is not a socket (check ListenStream= in sevmigd.socket)")
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM:
            raise SocketActivationError(f"fd {fd} is not a stream socket (use ListenStream=)")
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise SocketActivationError(f"fd {fd} has unsupported address family {sock.family!r}")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SocketActivationError(
                f"fd {fd} is not listening (sevmigd.socket must use Accept=no, the default)")
    except BaseException:
        sock.detach()  # leave the fd to its owner; never close what we failed to adopt
        raise
    sock.setblocking(False)
    return sock


def socket_address(sock: socket.socket) -> str:
    """host:port (or the path) a listening socket is bound to, for logs and STATUS= (pure-ish)."""
    addr = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    if sock.family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    return addr.decode(errors="replace") if isinstance(addr, bytes) else str(addr)


def inherited_listeners(fds: Iterable[int] | None = None) -> list[trio.SocketListener]:
    """trio listeners over the sockets systemd passed (``listen_fds()`` when ``fds`` is None).

    The daemon uses these *instead of* binding ``config.listen`` when the list is non-empty; every
    element can be handed to ``trio.serve_listeners``.
    """
    if fds is None:
        fds = listen_fds()
    return [trio.SocketListener(trio.socket.from_stdlib_socket(listening_socket(fd))) for fd in fds]


# ------------------------------------------------------------------------------------------ watchdog


def watchdog_interval(*, environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when the watchdog is off (sd_watchdog_enabled).

    WATCHDOG_USEC is the timeout systemd enforces (WatchdogSec=); WATCHDOG_PID, when set, must be our
    pid (otherwise the variable was inherited from a parent that is the one being watched). We ping
    at WATCHDOG_FRACTION of the timeout. Malformed values mean "off", never a crash.
    """
    env = os.environ if environ is None else environ
    me = os.getpid() if pid is None else pid
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != me:
                return None
        except ValueError:
            return None
    return max(WATCHDOG_MIN_INTERVAL_S, usec / 1_000_000 * WATCHDOG_FRACTION)


async def watchdog_task(interval: float | None = None, *, healthy: Callable[[], bool] | None = None,
                        send: Callable[[str], bool] = notify,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Send WATCHDOG=1 every ``interval`` seconds from the event loop, forever (run in a nursery).

    ``interval`` defaults to ``watchdog_interval()``; when that is None (no WatchdogSec=) the task
    returns at once. Running on the loop is the point: if the loop is wedged, pings stop and systemd
    kills and restarts us (Restart=on-failure). ``healthy``, when given, is asked before every ping;
    returning False withholds the ping (e.g. the listener task died) so the restart still happens.
    """
    if interval is None:
        interval = watchdog_interval()
    task_status.started(interval)
    if interval is None:
        return
    while True:
        if healthy is None or healthy():
            send("WATCHDOG=1")
        await trio.sleep(interval)


__all__ = [
    "SD_LISTEN_FDS_START", "SocketActivationError", "notify", "notify_address", "message", "ready",
    "stopping", "reloading", "extend_timeout", "status", "status_text",
    "status_task", "listen_fds", "listen_fds_count", "listen_fd_names", "listening_socket",
    "socket_address", "inherited_listeners", "watchdog_interval", "watchdog_task",
]
