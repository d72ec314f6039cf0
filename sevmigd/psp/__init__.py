"""The emulated AMD Secure Processor (pure layer). See ARCHITECTURE.md for what this layer owns.

Re-exports the names other layers use most, lazily (importing one submodule, e.g. `sevmigd.psp.status`,
does not pull in the firmware and certificate code). `MemoryEngine` is deliberately *not* re-exported:
host-side code must never reach for a guest memory key (tests/test_layering.py).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Firmware": "firmware", "GuestState": "firmware", "GuestStatus": "firmware", "PlatformState": "firmware",
    "Policy": "policy", "RESERVED_MASK": "policy", "policy_api": "policy",
    "SevError": "status", "SevStatus": "status",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
