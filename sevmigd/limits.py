"""What a guest may be asked to be: the one guest-name rule and the bounds of the launch knobs.

A top-level pure module (no numpy, no daemon, no guest internals) so that `sevmigd ctl`, the control
socket, the guest layer and the migration drivers (which reach the guest only through kvm) all apply the
same rule and numbers.

The name rule applies to guests launched here and to guests arriving by migration.

A guest name is what an operator types (`ctl status NAME`), what a log line, a systemd STATUS= line and
a file name can carry unquoted: 1-64 characters of ASCII letters, digits, '_', '.', '-', starting with a
letter or digit. So no path separators ('../../etc/passwd'), no '.'/'..', no whitespace or control
characters, no Unicode look-alikes or bidirectional overrides (U+202E), nothing a shell or a terminal
interprets. The wire allows up to 255 characters of any text (PROTOCOL.md §5.1 field syntax); the
destination applies this rule at Hello and refuses with PROTOCOL_ERROR before anything is reserved.

Pure: no I/O.
"""

from __future__ import annotations

import re

from sevmigd.errors import ConfigError

#: Upper bounds of the workload knobs (`launch --dirty-rate / --flip-rate`). A guest's vCPU runs in its
#: daemon's event loop, so its work per scheduling slice (up to 100 ms of guest time) is time the
#: control socket and the migrations wait. Measured on the 2-core dev box: one page write (encrypted
#: through the guest's memory engine) ~7.5 us, one private<->shared flip ~10 us. At these bounds a
#: slice costs at most ~50 ms of writes (256 MiB/s x 0.1 s = 6554 pages) plus ~10-15 ms of flips, so a
#: control reply never waits more than a few slices. Faster dirtying is what a real guest can do, not
#: what this emulation can run without starving its own host; the bounds are refused, not clamped.
MAX_DIRTY_RATE_MIB_S = 256.0
MAX_FLIP_RATE = 10_000.0
#: The initial image of a launch (measured by LAUNCH_UPDATE_DATA): at most 8 MiB (OVMF is 2-4 MiB).
#: `ctl` reads it and sends it in the request; the daemon never opens a path a client names.
MAX_IMAGE_BYTES = 8 << 20

MAX_GUEST_NAME = 64
GUEST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (MAX_GUEST_NAME - 1))
GUEST_NAME_RULE = (f"guest names are 1-{MAX_GUEST_NAME} characters: ASCII letters, digits, '_', '.', '-' "
                   "(starting with a letter or digit)")


def guest_name_problem(name: object) -> str | None:
    """None when `name` follows the rule, else why not (the name itself shown escaped, so a hostile
    name cannot reorder or forge the text around it)."""
    if not isinstance(name, str):
        return f"a guest name is a string, got {type(name).__name__}"
    if GUEST_NAME_RE.fullmatch(name) is None:
        shown = ascii(name[:80]) + ("..." if len(name) > 80 else "")
        return f"{GUEST_NAME_RULE}; got {shown} ({len(name)} characters)"
    return None


def check_guest_name(name: object, key: str = "name") -> str:
    """`name` when it follows the rule, else ConfigError(key)."""
    problem = guest_name_problem(name)
    if problem is not None:
        raise ConfigError(key, problem)
    return name  # type: ignore[return-value]


__all__ = ["MAX_DIRTY_RATE_MIB_S", "MAX_FLIP_RATE", "MAX_IMAGE_BYTES", "MAX_GUEST_NAME", "GUEST_NAME_RE", "GUEST_NAME_RULE", "guest_name_problem", "check_guest_name"]
