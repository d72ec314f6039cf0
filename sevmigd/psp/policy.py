"""SEV guest policy (reference §6): the u32 a guest owner binds to a guest at LAUNCH_START.

Owns the bit names and the small helpers that read the API-version fields. It makes no decision:
the firmware (`sevmigd.psp.firmware`) enforces each bit where the AMD firmware does.
"""

from __future__ import annotations

import enum


class Policy(enum.IntFlag):
    """Policy flag bits 0..5 (reference §6). Bits 16..31 carry the minimum API version."""

    NODBG = 0x01   # DBG_DECRYPT / DBG_ENCRYPT refused (POLICY_FAILURE)
    NOKS = 0x02    # no other guest may share this guest's VEK
    ES = 0x04      # SEV-ES guest (needs an ES-initialised platform; enables *_UPDATE_VMSA)
    NOSEND = 0x08  # SEND_START refused
    DOMAIN = 0x10  # SEND_START: target must be in the same OCA domain (OCA certs byte-identical)
    SEV = 0x20     # SEND_START: target chain must verify up to the AMD root key, API >= policy API


#: Bits 6..15 are reserved and must be zero at LAUNCH_START / RECEIVE_START (POLICY_FAILURE otherwise).
RESERVED_MASK = 0x0000FFC0
#: The whole policy is a u32 image.
POLICY_MASK = 0xFFFFFFFF


def policy_api(policy: int) -> tuple[int, int]:
    """(API_MAJOR, API_MINOR) minimum firmware version encoded in bits 16..23 and 24..31."""
    return (policy >> 16) & 0xFF, (policy >> 24) & 0xFF


def make_policy(flags: int = 0, *, api_major: int = 0, api_minor: int = 0) -> int:
    """Build a policy u32 from flag bits and a minimum API version."""
    if not (0 <= api_major <= 0xFF and 0 <= api_minor <= 0xFF):
        raise ValueError("api_major/api_minor must fit in one byte each")
    return (int(flags) & 0xFFFF) | (api_major << 16) | (api_minor << 24)


def reserved_bits(policy: int) -> int:
    """The reserved bits set in `policy` (0 when the policy is well formed)."""
    return policy & RESERVED_MASK


def describe(policy: int) -> str:
    """Human-readable form, e.g. 'NODBG|NOKS api>=1.55' (for logs and the CLI)."""
    names = [f.name for f in Policy if policy & f]
    major, minor = policy_api(policy)
    text = "|".join(names) if names else "0"
    if major or minor:
        text += f" api>={major}.{minor}"
    if reserved_bits(policy):
        text += f" reserved=0x{reserved_bits(policy):04x}"
    return text
