"""The control socket: a QMP-like JSON-lines protocol on a Unix socket, for `sevmigd ctl`.

Theory of operation. One request per line, `{"execute": VERB, "arguments": {...}, "id": ANY?}`; one
reply per request, `{"return": {...}}` or `{"error": {"class": CLASS, "desc": TEXT}}`, carrying the
request's `id` when it had one. `migrate` first streams `{"event": "progress", "data": {...}}` lines.
Unlike QMP there is no greeting and no capability negotiation: the socket is private to the daemon's
user (mode 0600, or 0660 for `control_group`), so whoever can connect may command.

Every request is validated here against a per-verb argument table before the daemon sees it: unknown
verb, unknown/missing/wrong-typed argument, unknown guest, invalid JSON, an oversize line: each is an
error reply naming what was wrong, never a crash and never a dropped connection (except an oversize
line, after which the stream cannot be resynchronised, so we reply and close). Each connection is its
own task, so a slow or idle client holds up nobody.

Hostile input (issue 11): a request line is bounded before it is parsed: its length (MAX_LINE_BYTES),
its JSON nesting depth (at most MAX_JSON_CONTAINERS '[' / '{' bytes, counted before parsing, so a
line of 100 KB of `[` never reaches the recursive parser), its text (UTF-8 only), its numbers (integers
of at most MAX_INT_DIGITS digits, finite floats, no NaN/Infinity). Any exception while serving one
request, whatever it is, becomes a typed `InternalError` reply and a log line naming the exception type
and where it was raised, never the request's text, arguments or the exception message (which may quote
them). A connection's own failure ends that connection only. The daemon never opens a path a client
names: `launch` takes the image bytes (`image_b64`), read by `sevmigd ctl` with the caller's own rights.

This module must never: put guest data (guest-write payloads, guest-read results, images) or keys into
a log line, or let a control client's disconnect cancel a migration it started (migrations run in the
daemon's nursery; the connection only watches).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import os
import socket as stdlib_socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import structlog
import trio

from sevmigd.daemon.config import split_host_port
from sevmigd.daemon.evacuate import Evacuation, parse_targets
from sevmigd.daemon.errors import (DaemonError, GuestUnavailable, InvalidState, ShuttingDown, StartupError,
                                   error_class)
from sevmigd.daemon.logging import exception_summary
from sevmigd.errors import ConfigError, SevmigdError
from sevmigd.limits import MAX_DIRTY_RATE_MIB_S, MAX_FLIP_RATE, MAX_IMAGE_BYTES, check_guest_name
from sevmigd.guest.vm import HYPERCALLS, GuestConfig
from sevmigd.migrate.errors import MigrationError
from sevmigd.psp.status import SevError
from sevmigd.units import PAGE_SIZE, parse_gpa, parse_size
from sevmigd.units import check_bool as _bool
from sevmigd.units import check_int as _int
from sevmigd.units import check_number as _num

if TYPE_CHECKING:  # the daemon imports this module to serve it; this module only names its type
    from sevmigd.daemon.server import Daemon, HostedGuest

# A JSON value as a request argument or a reply carries it.
Json = object
# Sends one event to the client of the request being served: emit(event_name, data).
Emit = Callable[[str, dict], Awaitable[None]]

# A request line is at most 12 MiB: the largest legitimate one is a launch with a MAX_IMAGE_BYTES image
# in base64 (~10.7 MiB) plus a little JSON; anything bigger is a broken or hostile client. Whoever can
# connect is the daemon's user or a control_group member, so this bounds mistakes more than attacks.
MAX_LINE_BYTES = 12 << 20
# Requests nest 2 deep ({"arguments": {...}}) and carry no arrays. A line may contain at most this many
# '[' / '{' bytes (strings included: an IPv6 "to" has one): that bounds the nesting depth before parsing,
# far below Python's recursion limit, whatever the line holds.
MAX_JSON_CONTAINERS = 64
# Integers in requests are sizes, addresses, seeds (u64: 20 digits) and ids; 40 digits is ample. Longer
# digit strings are refused before int() (10^5 digits would cost quadratic time to convert).
MAX_INT_DIGITS = 40
# An error reply's desc is at most this long: it may quote what the client sent (a 100 KB verb name).
MAX_DESC_CHARS = 1024
# guest-write / guest-read move at most 256 KiB per request (512 KiB of hex in one line); the agent is
# a debugging/verification tool, not a bulk data path.
MAX_IO_BYTES = 256 << 10
# Receive granularity; only bounds one read syscall.
RECV_CHUNK = 64 << 10
# Listen backlog for the control socket; ctl connections are short-lived and few.
CONTROL_BACKLOG = 64
# Progress events buffered per migrate request; a client that reads slower than rounds complete
# misses intermediate events (the newest figures matter), never the final reply.
PROGRESS_BUFFER = 64
# How long a daemon already serving the socket may take to accept our probe connection at start.
PROBE_TIMEOUT_S = 1.0
# sun_path is 108 bytes on Linux including the terminating NUL.
MAX_UNIX_PATH = 107
# Guest RAM bounds as the guest API pins them: whole pages, at least 1 MiB.
MIN_GUEST_BYTES = 1 << 20

_log = structlog.get_logger("sevmigd")


# ------------------------------------------------------------------------------- socket setup


def _resolve_group(group: str) -> int:
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ConfigError("control_group", f"no such group: {group!r}") from None


def ensure_control_dir(path: str, group: str | None = None) -> None:
    """The control socket's directory, created 0700 (0750 + group with control_group) when missing. Also
    called before the runtime directory is made (its default lives beside the socket)."""
    gid = _resolve_group(group) if group else None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            os.chmod(parent, 0o750 if gid is not None else 0o700)
            if gid is not None:
                os.chown(parent, -1, gid)
        except OSError as exc:
            raise StartupError(f"cannot create control socket directory {parent}: {exc.strerror}") from None


async def bind_control_socket(path: str, group: str | None = None) -> tuple[trio.SocketListener, tuple[int, int]]:
    """Bind the control socket at `path`: parent dir created 0700 (0750 + group with control_group)
    when missing; refuse when another daemon answers there; remove a stale socket file; bind under
    umask 0o177 so the socket is never connectable by others, then chmod 0600 (0660 + chgrp).
    Returns (listener, (st_dev, st_ino)) so shutdown removes only the socket it bound."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError("control", f"socket path is {len(os.fsencode(path))} bytes; Unix sockets allow "
                                     f"at most {MAX_UNIX_PATH}: {path}")
    ensure_control_dir(path, group)
    gid = _resolve_group(group) if group else None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
        # Is a daemon answering there? A trio connect, so a peer with a full backlog holds up nothing.
        probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            with trio.move_on_after(PROBE_TIMEOUT_S) as probe_scope:
                await probe.connect(path)
            if probe_scope.cancelled_caught:
                raise StartupError(f"another sevmigd daemon is already serving {path} (busy)")
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # stale: left behind by a daemon that died without cleaning up
            except FileNotFoundError:
                pass
            _log.info("control_socket_stale_removed", path=path)
        except OSError as exc:
            raise StartupError(f"cannot check existing control socket {path}: {exc.strerror}") from None
        else:
            raise StartupError(f"another sevmigd daemon is already serving {path}")
        finally:
            probe.close()
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        sock.listen(CONTROL_BACKLOG)
        st = os.stat(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind control socket {path}: {exc.strerror}") from None
    sock.setblocking(False)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    return listener, (st.st_dev, st.st_ino)


async def serve_control(daemon: Daemon, listener: trio.SocketListener, *, task_status=trio.TASK_STATUS_IGNORED):
    """Accept control connections forever; each is handled in its own task in the daemon's nursery."""
    await trio.serve_listeners(partial(handle_connection, daemon), [listener],
                               handler_nursery=daemon.nursery, task_status=task_status)


# ------------------------------------------------------------------------------ connection loop


def _encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _shown(v: object, limit: int = 64) -> str:
    """A client-supplied value inside an error text: escaped (ascii) and cut to `limit` characters."""
    text = ascii(v)
    return text if len(text) <= limit else text[:limit] + "...'"


def error_reply(cls: str, desc: str, req_id: Json = None, **extra: Json) -> dict:
    if len(desc) > MAX_DESC_CHARS:
        desc = desc[:MAX_DESC_CHARS] + "..."
    err: dict[str, Json] = {"class": cls, "desc": desc}
    err.update(extra)
    reply: dict[str, Json] = {"error": err}
    if req_id is not None:
        reply["id"] = req_id
    return reply


class _Conn:
    """Writes lines to one client; after the client goes away, writes become no-ops (a migration
    the client started must keep running)."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.gone = False
        self._lock = trio.Lock()

    async def send(self, obj: dict) -> None:
        if self.gone:
            return
        data = _encode(obj)
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.gone = True


async def handle_connection(daemon: Daemon, stream: trio.abc.Stream) -> None:
    """Read request lines, answer each in order; end on EOF, an oversize line or a broken socket.
    Whatever happens in here ends this connection at worst, never the daemon (its nursery)."""
    try:
        await _serve_connection(daemon, stream)
    except Exception as exc:  # noqa: BLE001 - the outermost loop of one control connection
        _log.error("control_connection_failed", **exception_summary(exc))
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_connection(daemon: Daemon, stream: trio.abc.Stream) -> None:
    conn = _Conn(stream)
    buf = bytearray()
    scanned = 0
    while not conn.gone:
        nl = buf.find(b"\n", scanned)
        if nl < 0:
            if len(buf) > MAX_LINE_BYTES:
                await conn.send(error_reply("InvalidRequest",
                                            f"request line longer than {MAX_LINE_BYTES} bytes"))
                return
            scanned = len(buf)
            try:
                data = await stream.receive_some(RECV_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buf += data
            continue
        line = bytes(buf[:nl])
        del buf[:nl + 1]
        scanned = 0
        if len(line) > MAX_LINE_BYTES:
            await conn.send(error_reply("InvalidRequest", f"request line longer than {MAX_LINE_BYTES} bytes"))
            return
        if not line.strip():
            continue
        daemon.request_started()
        try:
            try:
                reply = await process_line(daemon, line, conn.send)
            except Exception as exc:  # noqa: BLE001 - one request's failure is its reply
                _log.error("control_request_failed", **exception_summary(exc))
                reply = error_reply("InternalError", f"internal error: {type(exc).__name__}")
            await conn.send(reply)
        finally:
            daemon.request_finished()


class RequestParseError(ValueError):
    """A request line that is not acceptable JSON (reply class ParseError)."""


def json_containers(line: bytes) -> int:
    """How many arrays/objects a JSON text can open: its '[' and '{' bytes, counted in C (bytes.count),
    strings included. An upper bound of the nesting depth (depth <= containers) that costs a few
    milliseconds on the largest line we accept, so no line ever reaches the recursive parser deeper
    than MAX_JSON_CONTAINERS."""
    return line.count(b"[") + line.count(b"{")


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise RequestParseError(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise RequestParseError(f"a number of {len(text)} characters (at most 64)")
    v = float(text)
    if not math.isfinite(v):
        raise RequestParseError(f"a number out of range ({text[:32]})")
    return v


def _parse_constant(name: str) -> Json:
    raise RequestParseError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)


def parse_request(line: bytes) -> Json:
    """Bytes of one request line -> the decoded JSON value, or RequestParseError saying what is wrong
    (never quoting the line: error texts go back to the client and may be logged)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestParseError(f"the request is not UTF-8 text (invalid byte at offset {exc.start})") from None
    containers = json_containers(line)
    if containers > MAX_JSON_CONTAINERS:
        raise RequestParseError(f"{containers} '[' or '{{' in one request (at most {MAX_JSON_CONTAINERS}: "
                                "requests nest 2 deep and carry no arrays)")
    try:
        return _DECODER.decode(text)
    except RequestParseError:
        raise
    except json.JSONDecodeError as exc:
        raise RequestParseError(f"invalid JSON: {exc.msg} (offset {exc.pos})") from None
    except (ValueError, RecursionError, OverflowError) as exc:
        raise RequestParseError(f"invalid JSON ({type(exc).__name__})") from None


async def process_line(daemon: Daemon, line: bytes, send: Callable[[dict], Awaitable[None]]) -> dict:
    """One request line -> its reply (events, if any, go through `send` first)."""
    try:
        req = parse_request(line)
    except RequestParseError as exc:
        return error_reply("ParseError", str(exc))
    if not isinstance(req, dict):
        return error_reply("InvalidRequest", 'a request is a JSON object {"execute": VERB, "arguments": {...}}')
    req_id = req.get("id")
    if not (req_id is None or isinstance(req_id, (str, int)) and not isinstance(req_id, bool)) or \
            isinstance(req_id, str) and len(req_id) > 256:
        return error_reply("InvalidRequest", '"id" must be a string of at most 256 characters or an integer')
    extra = sorted(set(req) - {"execute", "arguments", "id"})
    if extra:
        return error_reply("InvalidRequest", f"unknown request member {_shown(extra[0])}", req_id)
    verb = req.get("execute")
    if not isinstance(verb, str):
        return error_reply("InvalidRequest", '"execute" must name a verb (a string)', req_id)
    args = req.get("arguments", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return error_reply("InvalidRequest", '"arguments" must be a JSON object', req_id)
    command = COMMANDS.get(verb)
    if command is None:
        return error_reply("CommandNotFound", f"unknown verb {_shown(verb)} (known: {', '.join(sorted(COMMANDS))})",
                           req_id)

    async def emit(event: str, data: dict) -> None:
        msg: dict[str, Json] = {"event": event, "data": data}
        if req_id is not None:
            msg["id"] = req_id
        await send(msg)

    try:
        parsed = command.parse(args)
        _log.debug("control_request", verb=verb, guest=parsed.get("name"))
        result = await command.handler(daemon, parsed, emit)
    except (SevmigdError, SevError) as exc:
        extra_fields: dict[str, Json] = {}
        if isinstance(exc, MigrationError):
            extra_fields["code"] = exc.code.name
            if exc.stats is not None:
                extra_fields["data"] = _jsonable(exc.stats)
        elif isinstance(exc, SevError):
            extra_fields["status"] = exc.status.name
        elif isinstance(exc, GuestUnavailable):
            extra_fields["code"] = exc.code
        return error_reply(error_class(exc), str(exc) or type(exc).__name__, req_id, **extra_fields)
    except Exception as exc:  # the control loop is an outermost loop: report, log, keep serving
        # Neither the message nor the locals: both may quote the request (arguments, image bytes).
        _log.error("control_request_failed", verb=verb, **exception_summary(exc))
        return error_reply("InternalError", f"internal error in {verb}: {type(exc).__name__}", req_id)
    reply: dict[str, Json] = {"return": _jsonable(result if result is not None else {})}
    if req_id is not None:
        reply["id"] = req_id
    return reply


def _jsonable(obj: object) -> Json:
    """Make a reply JSON-safe: bytes -> hex, enums -> names, NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return str(obj)


# ----------------------------------------------------------------------------- argument tables


def _req_str(key: str, v: Json) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"expected a string, got {type(v).__name__}")
    return v


def _name(key: str, v: Json) -> str:
    return check_guest_name(_req_str(key, v), key)








def _size(key: str, v: Json) -> int:
    if isinstance(v, bool):
        raise ConfigError(key, "expected a size")
    return parse_size(v, key=key)


def _gpa(key: str, v: Json) -> int:
    if isinstance(v, bool):
        raise ConfigError(key, "expected an address")
    return parse_gpa(v, key=key)


def _policy(key: str, v: Json) -> int:
    """An integer, or a hex string with or without 0x (as `sevctl` and our status print it)."""
    if isinstance(v, str):
        try:
            v = int(v, 16)
        except ValueError:
            raise ConfigError(key, f"not a hex policy: {v!r}") from None
    return _int(key, v, 0, 0xFFFFFFFF)


def _image_b64(key: str, v: Json) -> bytes:
    v = _req_str(key, v)
    if len(v) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise ConfigError(key, f"images are at most {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(key, "expected base64 (RFC 4648, with padding)") from None
    if not data:
        raise ConfigError(key, "empty image")
    return data


def _hexdata(key: str, v: Json) -> bytes:
    v = _req_str(key, v)
    try:
        data = bytes.fromhex(v)
    except ValueError:
        raise ConfigError(key, "expected an even number of hex digits") from None
    if not data:
        raise ConfigError(key, "no data")
    if len(data) > MAX_IO_BYTES:
        raise ConfigError(key, f"at most {MAX_IO_BYTES} bytes per request, got {len(data)}")
    return data


def _opt(fn: Callable[[str, Json], object]) -> Callable[[str, Json], object]:
    return lambda k, v: None if v is None else fn(k, v)


@dataclass(frozen=True)
class Arg:
    check: Callable[[str, Json], object]
    required: bool = False
    default: object = None


@dataclass(frozen=True)
class Command:
    handler: Callable[[Daemon, dict, Emit], Awaitable[dict]]
    args: dict[str, Arg]

    def parse(self, raw: dict) -> dict:
        unknown = sorted(set(raw) - set(self.args))
        if unknown:
            key = unknown[0] if len(unknown[0]) <= 64 and unknown[0].isprintable() else _shown(unknown[0])
            raise ConfigError(key, f"unknown argument (expected: {', '.join(self.args) or 'none'})")
        out: dict[str, object] = {}
        for key, spec in self.args.items():
            if key not in raw:
                if spec.required:
                    raise ConfigError(key, "missing required argument")
                out[key] = spec.default
                continue
            out[key] = spec.check(key, raw[key])
        return out


# ----------------------------------------------------------------------------------- handlers


def _guest(daemon: Daemon, name: str) -> HostedGuest:
    return daemon.get_guest(name)


def _require_vm_live(hosted: HostedGuest, verb: str) -> None:
    if hosted.state in GuestUnavailable.CODES:
        raise GuestUnavailable(hosted.name, hosted.state, hosted.error, verb)
    if hosted.state in ("migrated", "incoming", "stopped", "crashed", "incompatible", "orphaned"):
        raise InvalidState(f"guest {hosted.name!r} is {hosted.state}; {verb} needs a guest running here")


async def _launch(daemon: Daemon, a: dict, emit: Emit) -> dict:
    memory = a["memory"]
    if memory % PAGE_SIZE or memory < MIN_GUEST_BYTES:
        raise ConfigError("memory", f"must be a whole number of 4 KiB pages and at least 1 MiB, got {memory}")
    image = a["image_b64"]
    if image is not None and len(image) > memory:
        raise ConfigError("image_b64", f"the image is {len(image)} bytes, larger than the guest's memory ({memory})")
    ws = a["working_set"]
    gcfg = GuestConfig(
        name=a["name"], memory_bytes=memory, policy=a["policy"], image=image,
        dirty_rate_mib_s=a["dirty_rate"], working_set_mib=ws, shared_fraction=a["shared_fraction"],
        flip_rate=a["flip_rate"], seed=a["seed"], migration_control=a["migration_control"], vcpus=a["vcpus"],
        prefill=a["prefill"], owner_godh=a["owner_godh"], owner_session=a["owner_session"], hypercall=a["hypercall"],
    )
    hosted = await daemon.launch_guest(gcfg)
    return daemon.guest_status(hosted)


async def _launch_finish(daemon: Daemon, a: dict, emit: Emit) -> dict:
    try:
        hosted = await daemon.finish_launch(a["name"], a["secret_packet_hex"])
    except ValueError as exc:   # the packet's shape (the PSP's own refusals arrive as SevError)
        raise ConfigError("secret_packet_hex", str(exc)) from None
    return daemon.guest_status(hosted)


async def _list(daemon: Daemon, a: dict, emit: Emit) -> dict:
    guests = []
    for hosted in list(daemon.guests.values()):
        st = daemon.guest_status(hosted)
        row = {k: st[k] for k in ("name", "state", "memory_bytes", "policy", "sev_state",
                                  "private_pages", "shared_pages")}
        row["job"] = _job_summary(daemon, hosted.name)
        guests.append(row)
    return {"guests": guests}


def _job_summary(daemon: Daemon, name: str) -> str | None:
    """The guest's outgoing job as `list` shows it: "queued (2)", "migrating", or None."""
    job = daemon.migrations.pending_jobs.get(name)
    if job is None:
        return None
    if job.state == "queued":
        pos = daemon.migrations.queue_position(job)
        return f"queued ({pos})" if pos else "queued"
    return "migrating" if job.state == "running" else job.state


async def _status(daemon: Daemon, a: dict, emit: Emit) -> dict:
    return daemon.guest_status(_guest(daemon, a["name"]))


async def _verify(daemon: Daemon, a: dict, emit: Emit) -> dict:
    hosted = _guest(daemon, a["name"])
    _require_vm_live(hosted, "verify")
    report = await hosted.guest_call(hosted.vm.verify)
    mismatches = [int(p) for p in report.mismatches]
    return {"name": hosted.name, "ok": bool(report.ok), "pages_checked": int(report.pages_checked),
            "mismatches": mismatches[:1024], "mismatch_count": len(mismatches)}


async def _reboot(daemon: Daemon, a: dict, emit: Emit) -> dict:
    """Restart the guest's kernel: every page private again, the page-encryption bitmaps (KVM's and the
    VMM's) reset, the migration-control MSR cleared until the new kernel opts in again."""
    hosted = _guest(daemon, a["name"])
    if hosted.state != "running":
        raise InvalidState(f"guest {hosted.name!r} is {hosted.state}; reboot needs a running guest")
    await hosted.guest_call(hosted.vm.reboot)
    return daemon.guest_status(hosted)


def _hypercall(key: str, v) -> str:
    if v not in HYPERCALLS:
        raise ConfigError(key, f"must be one of {', '.join(HYPERCALLS)}, got {v!r}")
    return v


async def _stop(daemon: Daemon, a: dict, emit: Emit) -> dict:
    hosted = await daemon.stop_guest(a["name"])
    return {"name": hosted.name, "state": "stopped"}


def _check_range(hosted: HostedGuest, gpa: int, length: int) -> None:
    mem = int(hosted.vm.memory_bytes)
    if gpa + length > mem:
        raise ConfigError("gpa", f"range {gpa:#x}+{length} is outside the guest's {mem} bytes of memory")


async def _guest_write(daemon: Daemon, a: dict, emit: Emit) -> dict:
    hosted = _guest(daemon, a["name"])
    _require_vm_live(hosted, "guest-write")
    data = a["data_hex"]
    _check_range(hosted, a["gpa"], len(data))
    try:
        await hosted.guest_call(lambda: hosted.vm.agent.write(a["gpa"], data, shared=a["shared"]))
    except ValueError as exc:  # the guest agent refusing our (user-supplied) range/alignment
        raise ConfigError("gpa", str(exc)) from None
    return {"name": hosted.name, "gpa": a["gpa"], "length": len(data), "shared": a["shared"]}


async def _guest_read(daemon: Daemon, a: dict, emit: Emit) -> dict:
    hosted = _guest(daemon, a["name"])
    _require_vm_live(hosted, "guest-read")
    _check_range(hosted, a["gpa"], a["length"])
    try:
        data = await hosted.guest_call(lambda: hosted.vm.agent.read(a["gpa"], a["length"]))
    except ValueError as exc:
        raise ConfigError("gpa", str(exc)) from None
    return {"name": hosted.name, "gpa": a["gpa"], "length": len(data), "data_hex": bytes(data).hex()}


async def _guest_secret(daemon: Daemon, a: dict, emit: Emit) -> dict:
    hosted = _guest(daemon, a["name"])
    _require_vm_live(hosted, "guest-secret")
    # the guest answering (in-guest agent), not the host
    entries = await hosted.guest_call(hosted.vm.agent.launch_secret)
    return {"name": hosted.name, "entries": None if entries is None else
            [{"guid": str(g), "data_hex": bytes(d).hex()} for g, d in entries]}


async def _server_info(daemon: Daemon, a: dict, emit: Emit) -> dict:
    return daemon.server_info()


async def _migrate(daemon: Daemon, a: dict, emit: Emit) -> dict:
    if daemon.shutting_down:
        raise ShuttingDown("the daemon is shutting down; no new migrations")
    hosted = _guest(daemon, a["name"])
    if hosted.state in GuestUnavailable.CODES:
        raise GuestUnavailable(hosted.name, hosted.state, hosted.error)
    if hosted.state != "running" and hosted.state != "paused":
        raise InvalidState(f"guest {hosted.name!r} is {hosted.state}; only a running guest can migrate")
    host, port = split_host_port(a["to"], key="to")
    if port == 0:
        raise ConfigError("to", "port 0 is not a destination")
    # Checks, policy lookup and the queue happen now, so a refusal is this request's error reply.
    job = daemon.migrations.submit(hosted.name, host, port, downtime_limit_ms=a["downtime_limit_ms"],
                                   max_bandwidth_mib_s=a["max_bandwidth_mib_s"], policy=a["policy"])
    if a["detach"]:
        async def run_detached() -> None:
            try:
                await daemon.migrations.run_job(job)
            except (SevmigdError, SevError):
                pass  # recorded in the job (ctl jobs) and the log
            except Exception:
                _log.error("migration_crashed", guest=hosted.name, exc_info=True)

        daemon.nursery.start_soon(run_detached, name=f"migrate:{hosted.name}")
        return job.as_dict(queue_position=daemon.migrations.queue_position(job))
    if job.state == "queued":  # say so now: the first progress event comes when it leaves the queue
        await emit("queued", {"job": job.id, "queue_position": daemon.migrations.queue_position(job),
                              "running": len(daemon.migrations.outgoing),
                              "max_outgoing": daemon.config.max_outgoing})
    send_ch, recv_ch = trio.open_memory_channel(PROGRESS_BUFFER)
    result: dict = {}
    failure: list[Exception] = []   # the migration's error, when it failed

    def progress(stats: dict) -> None:
        # Never blocks the migration: a client that reads slower than rounds complete misses
        # intermediate events (the newest figures matter), never the final reply.
        try:
            send_ch.send_nowait(_jsonable(stats))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def run_migration() -> None:
        # Runs in the daemon's nursery: the migration's lifetime is the daemon's, not this client's.
        async with send_ch:
            try:
                result.update(await daemon.migrations.run_job(job, progress=progress))
            except MigrationError as exc:
                if hosted.migration is not None:
                    exc.stats = hosted.migration.to_dict()
                failure.append(exc)
            except (SevmigdError, SevError) as exc:
                failure.append(exc)
            except Exception as exc:
                _log.error("migration_crashed", guest=hosted.name, exc_info=True)
                failure.append(DaemonError(f"internal error in migration: {type(exc).__name__}: {exc}"))

    daemon.nursery.start_soon(run_migration, name=f"migrate:{hosted.name}")
    async with recv_ch:
        async for stats in recv_ch:
            await emit("progress", stats)
    if failure:
        raise failure[0]
    return result


async def _jobs(daemon: Daemon, a: dict, emit: Emit) -> dict:
    jobs = daemon.migrations.list_jobs()
    if a["job"] is not None:
        jobs = [j for j in jobs if j["job"] == a["job"]]
        if not jobs:
            raise ConfigError("job", f"no job {a['job']!r} (jobs are kept while queued or running, and the "
                                     f"last ones after they end)")
    return {"jobs": jobs, "queued": len(daemon.migrations.queue), "running": len(daemon.migrations.outgoing),
            "max_outgoing": daemon.config.max_outgoing, "high_water": daemon.migrations.high_water}


async def _evacuate(daemon: Daemon, a: dict, emit: Emit) -> dict:
    if daemon.shutting_down:
        raise ShuttingDown("the daemon is shutting down; no new migrations")
    mgr = daemon.migrations
    targets = parse_targets(a["to"])
    current = mgr.evacuation
    if current is not None and not current.done.is_set():
        raise InvalidState("an evacuation is already running; follow it with `sevmigd ctl jobs`")
    evac = Evacuation(mgr, targets, max_parallel=a["max_parallel"], policy=a["policy"])
    if a["dry_run"]:
        snap = evac.snapshot()
        snap["dry_run"] = True
        return snap
    if daemon.nursery is None:
        raise InvalidState("the daemon is not serving; nothing can be evacuated")
    # The evacuation lives in the daemon's nursery: a ctl that goes away does not stop it.
    daemon.nursery.start_soon(evac.run, name="evacuate")
    mgr.evacuation = evac
    while True:
        changed = evac.changed  # taken before emitting: a change while we write is not missed
        if evac.done.is_set():
            break
        await emit("evacuation", evac.snapshot())
        await changed.wait()
    return evac.snapshot()


async def _cancel(daemon: Daemon, a: dict, emit: Emit) -> dict:
    _guest(daemon, a["name"])
    daemon.migrations.cancel(a["name"])
    return {"name": a["name"], "cancelled": True}


async def _resolve(daemon: Daemon, a: dict, emit: Emit) -> dict:
    hosted = _guest(daemon, a["name"])
    result = daemon.migrations.resolve(a["name"], run_here=a["run_here"])
    out = dict(result) if isinstance(result, dict) else {}
    out.update({"name": a["name"], "state": hosted.state})
    return out


_NAME = Arg(_name, required=True)

COMMANDS: dict[str, Command] = {
    "launch": Command(_launch, {
        "name": _NAME,
        "memory": Arg(_size, required=True),
        "policy": Arg(_policy, default=0),
        "image_b64": Arg(_opt(_image_b64)),
        "dirty_rate": Arg(lambda k, v: _num(k, v, 0.0, MAX_DIRTY_RATE_MIB_S), default=0.0),
        "working_set": Arg(_opt(lambda k, v: _num(k, v, 1e-9, 1 << 40))),
        "shared_fraction": Arg(lambda k, v: _num(k, v, 0.0, 1.0), default=0.0),
        "flip_rate": Arg(lambda k, v: _num(k, v, 0.0, MAX_FLIP_RATE), default=0.0),
        "seed": Arg(lambda k, v: _int(k, v, 0, (1 << 64) - 1), default=0),
        "migration_control": Arg(_bool, default=True),
        "vcpus": Arg(lambda k, v: _int(k, v, 1, 64), default=1),
        "prefill": Arg(_bool, default=False),
        # the guest owner's launch blobs (`sevmigd owner session`): GODH cert 0x824, session 0x80
        "owner_godh": Arg(_opt(_hexdata)),
        "owner_session": Arg(_opt(_hexdata)),
        "hypercall": Arg(lambda k, v: _hypercall(k, v), default="map-gpa-range"),
    }),
    "launch-finish": Command(_launch_finish, {
        "name": _NAME,
        "secret_packet_hex": Arg(_opt(_hexdata)),
    }),
    "list": Command(_list, {}),
    "status": Command(_status, {"name": _NAME}),
    "migrate": Command(_migrate, {
        "name": _NAME,
        "to": Arg(_req_str, required=True),
        "downtime_limit_ms": Arg(_opt(lambda k, v: _int(k, v, 1)), default=None),
        "max_bandwidth_mib_s": Arg(_opt(lambda k, v: _num(k, v, 0.0)), default=None),
        "policy": Arg(_opt(_req_str), default=None),
        "detach": Arg(_bool, default=False),
    }),
    "jobs": Command(_jobs, {"job": Arg(_opt(_req_str), default=None)}),
    "evacuate": Command(_evacuate, {
        "to": Arg(lambda k, v: v, required=True),  # HOST:PORT list, checked by evacuate.parse_targets
        "max_parallel": Arg(lambda k, v: _int(k, v, 1, 1024), default=1),
        "policy": Arg(_opt(_req_str), default=None),
        "dry_run": Arg(_bool, default=False),
    }),
    "cancel": Command(_cancel, {"name": _NAME}),
    "resolve": Command(_resolve, {"name": _NAME, "run_here": Arg(_bool, required=True)}),
    "verify": Command(_verify, {"name": _NAME}),
    "stop": Command(_stop, {"name": _NAME}),
    "reboot": Command(_reboot, {"name": _NAME}),
    "guest-write": Command(_guest_write, {
        "name": _NAME,
        "gpa": Arg(_gpa, required=True),
        "data_hex": Arg(_hexdata, required=True),
        "shared": Arg(_bool, default=False),
    }),
    "guest-read": Command(_guest_read, {
        "name": _NAME,
        "gpa": Arg(_gpa, required=True),
        "length": Arg(lambda k, v: _int(k, v, 1, MAX_IO_BYTES), required=True),
    }),
    "guest-secret": Command(_guest_secret, {"name": _NAME}),
    "server-info": Command(_server_info, {}),
}

__all__ = ["bind_control_socket", "serve_control", "handle_connection", "process_line", "parse_request",
           "json_containers", "RequestParseError", "COMMANDS", "MAX_LINE_BYTES", "MAX_IO_BYTES",
           "MAX_JSON_CONTAINERS", "error_reply"]
