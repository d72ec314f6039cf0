"""Synchronous control-socket client (what `sevmigd ctl` and the tests use).

Owns `ControlClient(path).execute(verb, args, on_event=None) -> dict`, the client-side errors, and the
sans-I/O halves of the client protocol (`encode_request`, `read_reply_line`) that the async client of
the test harness (`sevmigd.testing.daemons.call_control`) shares. Plain blocking sockets on purpose: the
CLI is a one-shot program and tests may call it from any thread; no event loop needed.

This module must never hide *why* a call failed: daemon not running, socket permission, a daemon
error reply (class + desc) and a connection dropped mid-reply are different exceptions with messages
a user can act on, and none of them is a traceback.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from sevmigd.errors import SevmigdError

# Replies can carry a guest-read result (up to 512 KiB of hex) or a stats dict; same bound as requests.
MAX_REPLY_BYTES = 4 << 20


class ControlFailure(SevmigdError):
    """A control request that did not return a result: the base of the three reasons below."""


class ControlError(ControlFailure):
    """The daemon answered with an error reply: `error_class` (stable name), `desc` (for humans)."""

    def __init__(self, error_class: str, desc: str, reply: dict | None = None):
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc
        self.reply = reply or {}

    @property
    def data(self) -> dict | None:
        """Figures attached to the error (a failed migration's final stats), when any."""
        d = self.reply.get("error", {}).get("data")
        return d if isinstance(d, dict) else None


class DaemonNotRunning(ControlFailure):
    """Nothing (or nothing we may talk to) is listening on the control socket."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"no sevmigd daemon listening on {path}: {reason}")
        self.path = path
        self.reason = reason


class ConnectionLost(ControlFailure):
    """The daemon closed the connection before replying (it stopped, or crashed)."""


def encode_request(verb: str, args: dict | None, req_id: int) -> bytes:
    """One request line (JSON + newline), as the daemon's control protocol wants it."""
    request: dict[str, object] = {"execute": verb, "id": req_id}
    if args:
        request["arguments"] = args
    return json.dumps(request).encode() + b"\n"


def read_reply_line(line: bytes, on_event: Callable[[str, dict], None] | None = None) -> dict | None:
    """Interpret one line the daemon sent: the `return` value (a dict), or None for an event (passed
    to `on_event(event_name, data)`) or anything else that is not the reply. Raises ControlError for an
    error reply, ConnectionLost for a line that is not JSON."""
    try:
        msg = json.loads(line)
    except ValueError:
        raise ConnectionLost("the daemon sent something that is not JSON") from None
    if not isinstance(msg, dict):
        return None
    if "event" in msg:
        if on_event is not None:
            on_event(str(msg["event"]), msg.get("data") or {})
        return None
    if "return" in msg:
        ret = msg["return"]
        return ret if isinstance(ret, dict) else {"value": ret}
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise ControlError(str(err.get("class", "GenericError")), str(err.get("desc", "error")), msg)
    return None


class ControlClient:
    """One connection to a daemon's control socket, opened on first use; usable as a context manager.

    `timeout` (seconds, None = wait forever) bounds every socket operation; `ctl migrate` waits
    without a timeout because a migration legitimately takes minutes.
    """

    def __init__(self, path: str, *, timeout: float | None = None):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 1

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise DaemonNotRunning(self.path, "no such socket (is `sevmigd serve` running? see --control)") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonNotRunning(self.path, "connection refused (stale socket; the daemon is not running)") from None
        except PermissionError:
            sock.close()
            raise DaemonNotRunning(self.path, "permission denied (the socket is private to the daemon's user "
                                              "or control_group)") from None
        except OSError as exc:
            sock.close()
            raise DaemonNotRunning(self.path, exc.strerror or str(exc)) from None
        self._sock = sock

    def _readline(self) -> bytes:
        assert self._sock is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                return line
            if len(self._buf) > MAX_REPLY_BYTES:
                self.close()
                raise ConnectionLost("reply from the daemon is too large")
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                self.close()
                raise ConnectionLost(f"no reply from the daemon within {self.timeout} s") from None
            except OSError as exc:
                self.close()
                raise ConnectionLost(f"connection to the daemon failed: {exc.strerror or exc}") from None
            if not chunk:
                self.close()
                raise ConnectionLost("the daemon closed the connection before replying (stopped or crashed)")
            self._buf += chunk

    def execute(self, verb: str, args: dict | None = None,
                on_event: Callable[[str, dict], None] | None = None) -> dict:
        """Send one request; return its `return` value. Events (migrate progress) before the reply go
        to `on_event(event_name, data)`. Raises ControlError for an error reply."""
        self.connect()
        assert self._sock is not None
        req_id = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(encode_request(verb, args, req_id))
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"cannot send to the daemon: {exc.strerror or exc}") from None
        while True:
            try:
                reply = read_reply_line(self._readline(), on_event)
            except ConnectionLost:
                self.close()
                raise
            if reply is not None:
                return reply

    def request_raw(self, line: bytes) -> dict:
        """Send raw bytes (a test helper for malformed requests) and return the next reply object."""
        self.connect()
        assert self._sock is not None
        self._sock.sendall(line)
        return json.loads(self._readline())


__all__ = ["ControlClient", "ControlFailure", "ControlError", "DaemonNotRunning", "ConnectionLost",
           "encode_request", "read_reply_line"]
