"""Trust decision about a peer platform: is the chain it presented one we migrate guests to / from?

Parsing and verifying are the psp's (`sevmigd.psp.chain.verify_platform_chain`); this module only applies
the daemon's policy values handed in (trusted roots, allowed platform ids, allowed OCAs) and turns every
failure into one `MigrationError(UNTRUSTED_PLATFORM)` whose message names the failing link. Pure.

Why the daemon verifies at all when SEND_START (SEV policy bit) verifies again: a guest without the SEV
bit would otherwise go to any host that answers, and the destination has no firmware check of the source
chain at all (RECEIVE_START only sanity-checks the source PDH). The daemon's check is the fleet policy; the
firmware's is the guest owner's.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from sevmigd.migrate.errors import MigrationError
from sevmigd.psp.certs import AmdCert, SevCert
from sevmigd.psp.chain import verify_platform_chain
from sevmigd.psp.identity import chip_id
from sevmigd.psp.status import SevError
from sevmigd.wire.errors import AbortCode


def platform_files(identity) -> dict[str, bytes]:
    """The Hello/Accept `platform` map (sevctl names without `.cert`) of a PlatformIdentity."""
    return {name.removesuffix(".cert"): data for name, data in identity.chain_files().items()}


def platform_id(platform: dict[str, bytes]) -> str:
    """Hex SHA-256 of the PEK certificate, as PlatformIdentity.platform_id names a platform."""
    return hashlib.sha256(platform["pek"]).hexdigest()


def check_peer_platform(platform: dict[str, bytes], *, who: str, trusted_roots: Sequence[AmdCert] | None,
                        allowed_platforms: Sequence[str] | None = None,
                        allowed_oca: Sequence[bytes] | None = None) -> str:
    """Verify `platform` (the peer's six certificates); return its platform id.

    `who` ("destination" / "source") starts the error message. `trusted_roots` None means the ARK only has
    to be self-signed (no pin); an empty list trusts nothing. `allowed_platforms` are platform-id prefixes
    (>= 16 hex digits); `allowed_oca` OCA certificates (bytes), byte-identical match.
    """
    try:
        ark = AmdCert.decode(platform["ark"], allow_unsigned=True)
        ask = AmdCert.decode(platform["ask"])
        cek, oca, pek, pdh = (SevCert.decode(platform[n]) for n in ("cek", "oca", "pek", "pdh"))
        verify_platform_chain(ark, ask, cek, oca, pek, pdh,
                              trusted_arks=None if trusted_roots is None else list(trusted_roots))
    except SevError as exc:
        raise MigrationError(AbortCode.UNTRUSTED_PLATFORM,
                             f"{who} platform chain rejected: {exc}") from None
    except KeyError as exc:
        raise MigrationError(AbortCode.UNTRUSTED_PLATFORM, f"{who} platform chain lacks {exc}") from None
    pid = platform_id(platform)
    if allowed_platforms is not None and not any(pid.startswith(p.lower()) for p in allowed_platforms):
        raise MigrationError(AbortCode.UNTRUSTED_PLATFORM,
                             f"{who} platform {pid[:16]} is not in allowed_platforms")
    if allowed_oca is not None and not any(bytes(o) == platform["oca"] for o in allowed_oca):
        raise MigrationError(AbortCode.UNTRUSTED_PLATFORM,
                             f"{who} platform {pid[:16]} has an OCA not in allowed_oca (other owner domain)")
    return pid


def platform_chip(platform: dict[str, bytes]) -> str:
    """The chip id of a (verified) chain: `chip_id` of its CEK, what a TLS certificate names (§1)."""
    try:
        return chip_id(SevCert.decode(platform["cek"]))
    except (SevError, KeyError):
        raise MigrationError(AbortCode.UNTRUSTED_PLATFORM, "platform chain has no usable CEK") from None


def check_channel_identity(peer_platforms: frozenset[str] | None, platform: dict[str, bytes], *, who: str) -> None:
    """The authenticated channel's peer must be the platform whose chain it presented (PROTOCOL.md §9.7).

    `peer_platforms`: the chip ids the peer's verified TLS certificate names, or None on a plaintext channel
    (nothing to compare: the caller applies plaintext rules instead). The chain's chip is `chip_id` of its
    CEK; the chain itself has been verified already, and the CEK signs the PEK which signs the PDH, so this
    one comparison ties the TLS peer to the PDH that SEND_START / RECEIVE_START will use.
    """
    if peer_platforms is None:
        return
    try:
        chip = chip_id(SevCert.decode(platform["cek"]))
    except (SevError, KeyError):
        raise MigrationError(AbortCode.UNTRUSTED_PLATFORM, f"{who} platform chain has no usable CEK") from None
    if chip not in peer_platforms:
        named = ", ".join(sorted(c[:16] for c in peer_platforms)) or "no platform"
        raise MigrationError(AbortCode.UNTRUSTED_PLATFORM,
                             f"{who}'s TLS certificate names {named}, but the chain it presented is platform "
                             f"{chip[:16]}: a host may only speak for its own platform")
