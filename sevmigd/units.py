"""Parsing of user-facing quantities: SIZE (binary units) and GPA (hex or decimal), and the typed checks
every configuration key and control argument goes through (check_int, check_number, check_bool).

Pure; errors are ConfigError naming the argument so the CLI can print one clear line. A type error names
the type it got, never the value (a control argument may be hostile, or megabytes long).
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

from sevmigd.errors import ConfigError

# The x86 base page: the unit of guest memory, of the dirty log and page-encryption bitmaps, of every
# SEND/RECEIVE_UPDATE_DATA and of the wire's page columns. Defined here once for every layer.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

N = TypeVar("N", int, float)


def check_int(key: str, v: object, lo: int | None = None, hi: int | None = None) -> int:
    """`v` as an integer within [lo, hi] (a bool is not an integer here)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {type(v).__name__}")
    return _in_range(key, v, lo, hi)


def check_number(key: str, v: object, lo: float | None = None, hi: float | None = None, *,
                 positive: bool = False) -> float:
    """`v` (an int or a float) as a finite float within [lo, hi], and > 0 when `positive`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, f"expected a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ConfigError(key, f"must be a finite number, got {f}")
    if positive and f <= 0:
        raise ConfigError(key, f"must be > 0, got {f}")
    return _in_range(key, f, lo, hi)


def _in_range(key: str, v: N, lo: N | None, hi: N | None) -> N:
    if lo is not None and v < lo:
        raise ConfigError(key, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(key, f"must be <= {hi}, got {v}")
    return v


def check_bool(key: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {type(v).__name__}")
    return v


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, key: str = "size") -> int:
    """'64M', '1G', '256MiB', '4096' -> bytes. Units are binary (K = 1024), as QEMU's -m."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(key, f"size must not be negative: {text}")
        return text
    if not isinstance(text, str):
        raise ConfigError(key, f"expected a size such as 64M, got {text!r}")
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(key, f"not a size: {text!r} (use bytes or K/M/G/T, binary units)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_gpa(text: str | int, *, key: str = "gpa") -> int:
    """'0x100000' or '1048576' -> int guest-physical address."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        try:
            value = int(text, 0)
        except ValueError:
            raise ConfigError(key, f"not an address: {text!r} (hex 0x... or decimal)") from None
    else:
        raise ConfigError(key, f"not an address: {text!r}")
    if value < 0:
        raise ConfigError(key, f"address must not be negative: {text!r}")
    return value
