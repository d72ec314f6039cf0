"""Daemon-level errors and their control-protocol error classes.

Owns the exception types the daemon core raises (guest registry, control requests, startup) and
`error_class(exc)`, the one mapping from an exception to the `{"error": {"class": ...}}` name a control
client sees (QMP style: a stable CamelCase class plus a human `desc`). Configuration and request
input errors stay `sevmigd.errors.ConfigError` (the user is at fault; it names the key).

This module must never carry secrets in messages: errors are shown to control clients and logged.
"""

from __future__ import annotations

from sevmigd.errors import ConfigError, SevmigdError
from sevmigd.guest.agent import GuestNotRunning
from sevmigd.migrate.errors import FirmwareCommandError, MigrationError
from sevmigd.psp.status import SevError


class DaemonError(SevmigdError):
    """The daemon cannot do what was asked (startup failure, resource limit, wrong state)."""

    error_class = "GenericError"


class StartupError(DaemonError):
    """The daemon cannot start (socket in use, unreadable state dir); exit status 1."""

    error_class = "StartupError"


class GuestNotFound(DaemonError):
    error_class = "GuestNotFound"

    def __init__(self, name: str):
        super().__init__(f"no guest named {name!r}")
        self.name = name


class GuestExists(DaemonError):
    error_class = "GuestExists"

    def __init__(self, name: str):
        super().__init__(f"a guest named {name!r} already exists on this host")
        self.name = name


class InvalidState(DaemonError):
    """The guest is in a state where the request makes no sense (e.g. stop while migrating)."""

    error_class = "InvalidState"


class GuestUnavailable(InvalidState):
    """The guest cannot be moved or driven: its VMM crashed or its kernel panicked (`crashed`), or this daemon
    found its VMM at start and does not drive it (`incompatible`: another VMM protocol; `orphaned`: no PSP
    context, or it does not answer). `code` is stable for clients (the control reply's "code"):
    GUEST_CRASHED, GUEST_INCOMPATIBLE or GUEST_ORPHANED; the message says why (the guest's `error`)."""

    error_class = "GuestUnavailable"
    CODES = {"crashed": "GUEST_CRASHED", "incompatible": "GUEST_INCOMPATIBLE", "orphaned": "GUEST_ORPHANED"}

    def __init__(self, name: str, state: str, reason: str | None, verb: str = "migrate"):
        self.name, self.state = name, state
        self.code = self.CODES[state]
        super().__init__(f"guest {name!r} is {state} ({reason or 'no reason recorded'}); cannot {verb} it")


class ResourceLimit(DaemonError):
    """A configured or hardware limit (ASIDs, max_guest_bytes) would be exceeded."""

    error_class = "ResourceLimit"


class ShuttingDown(DaemonError):
    error_class = "ShuttingDown"

    def __init__(self, what: str = "the daemon is shutting down"):
        super().__init__(what)


def error_class(exc: BaseException) -> str:
    """The control-protocol error class for an exception (stable names; clients may switch on them)."""
    if isinstance(exc, ConfigError):
        return "InvalidParameter"
    if isinstance(exc, (DaemonError, FirmwareCommandError)):
        return exc.error_class
    if isinstance(exc, GuestNotRunning):  # paused or not-yet-started guest kernel
        return "InvalidState"
    if isinstance(exc, MigrationError):
        return "MigrationFailed"
    if isinstance(exc, SevError):
        return "FirmwareError"
    if isinstance(exc, SevmigdError):
        return "GenericError"
    return "InternalError"


__all__ = ["DaemonError", "StartupError", "GuestNotFound", "GuestExists", "InvalidState", "ResourceLimit",
           "ShuttingDown", "error_class"]
