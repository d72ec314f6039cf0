"""Structured logging for the daemon: structlog to stdout, JSON lines or console lines.

Owns `configure_logging(level, fmt)` and the processor chain. We log to **stdout** (structlog's and
systemd's convention: journald captures stdout, a container runtime too); JSON lines when stdout is
not a TTY (machines read it), readable coloured lines on a TTY (people read it). Context such as
`migration_id`, `guest` and `round` is bound with `structlog.contextvars.bound_contextvars(...)` by
the code doing the work and merged into every line logged inside that task.

This module must never let a secret out: a last-line-of-defence processor drops fields whose name
says they hold key material or page contents, and replaces any raw `bytes` value by its length. The
first line of defence is still not passing such values to a logger at all.

Exceptions (`exc_info=True`, `log.exception`) are rendered here, by `_render_exception`, as Python's
plain traceback text: file, line, function and the exception's own message, **never frame locals**.
structlog's default dict traceback (and rich/better-exceptions renderers) show every frame's locals,
which put raw control request lines, guest image bytes and a `Start` repr with its session blob into the
log, around the redaction filter. Code that logs a failure caused by untrusted input uses
`exception_summary(exc)` instead, which omits the message too (it may quote the input).
"""

from __future__ import annotations

import logging as _stdlib_logging
import sys
import traceback
from typing import Any, TextIO

import structlog

from sevmigd.errors import ConfigError

_LEVELS = {
    "debug": _stdlib_logging.DEBUG,
    "info": _stdlib_logging.INFO,
    "warning": _stdlib_logging.WARNING,
    "error": _stdlib_logging.ERROR,
    "critical": _stdlib_logging.CRITICAL,
}

# Field names that must never reach a log line, whatever a caller passes: memory/transport keys,
# session blobs, private keys, and page contents (guest-write payloads and guest-read results).
REDACTED_FIELDS = frozenset({
    "vek", "tek", "tik", "kek", "kik", "key", "private_key", "pdh_private", "secret", "session",
    "master_secret", "data", "data_hex", "plaintext", "ciphertext", "page", "pages_data", "trans",
})


def _redact(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for name in list(event_dict):
        if name.lower() in REDACTED_FIELDS:
            event_dict[name] = "<redacted>"
        else:
            v = event_dict[name]
            if isinstance(v, (bytes, bytearray, memoryview)):
                event_dict[name] = f"<{len(v)} bytes>"
    return event_dict


# Frames kept from the innermost end of a logged traceback (the failure is there; a deep trio stack is not).
TRACEBACK_FRAMES = 30


def _render_exception(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace `exc_info` by `exception`: traceback text without locals (see the module docstring)."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if isinstance(exc_info, BaseException):
        exc = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = sys.exc_info()[1]
    if exc is None:
        return event_dict
    try:
        text = "".join(traceback.TracebackException.from_exception(
            exc, limit=-TRACEBACK_FRAMES, capture_locals=False).format())
    except Exception:  # noqa: BLE001 - a logging aid must never fail the log call
        text = type(exc).__name__
    event_dict["exception"] = text
    return event_dict


def exception_summary(exc: BaseException) -> dict[str, Any]:
    """Log fields for a failure whose message may quote untrusted input (a control request, a frame):
    the exception type and where it was raised (file:line function, innermost last), no message and no
    locals."""
    frames = traceback.extract_tb(exc.__traceback__, limit=-TRACEBACK_FRAMES)
    return {"error_type": type(exc).__name__,
            "where": [f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno} {f.name}" for f in frames]}


def _resolve_format(fmt: str, stream: TextIO) -> str:
    if fmt == "auto":
        try:
            return "console" if stream.isatty() else "json"
        except (AttributeError, ValueError):
            return "json"
    if fmt not in ("json", "console"):
        raise ConfigError("log_format", f"must be auto, json or console; got {fmt!r}")
    return fmt


def configure_logging(level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None) -> str:
    """Configure structlog process-wide; returns the format actually used ("json" or "console").

    Safe to call again (SIGHUP changes the level): loggers are not cached, so the new level applies to
    loggers that already exist.
    """
    if level not in _LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(_LEVELS)}; got {level!r}")
    out = stream if stream is not None else sys.stdout
    used = _resolve_format(fmt, out)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _render_exception,
        _redact,
    ]
    if used == "json":
        processors += [structlog.processors.JSONRenderer(sort_keys=False)]
    else:
        # exc_info is already rendered (no locals); plain_traceback only prints that text.
        processors += [structlog.dev.ConsoleRenderer(colors=_supports_color(out),
                                                     exception_formatter=structlog.dev.plain_traceback)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return used


def _supports_color(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(**initial: Any) -> Any:
    """A bound logger; `initial` values are bound to every line it logs."""
    return structlog.get_logger("sevmigd").bind(**initial)


__all__ = ["configure_logging", "get_logger", "exception_summary", "REDACTED_FIELDS"]
