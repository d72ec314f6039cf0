"""Size limits of the migration channel (one `Limits` value per Connection).

Owns: the bounds every received frame and field is checked against *before* anything is buffered or
allocated on its behalf, so a peer cannot make us hold more than `max_frame + 4` bytes plus one read.
Must never: depend on I/O; limits are plain values handed in by the daemon (from its config).
"""

from __future__ import annotations

import dataclasses

from sevmigd.errors import ConfigError
from sevmigd.psp.certs import SEV_CERT_SIZE          # a SEV certificate (PEK, OCA, CEK, PDH): 0x824 bytes
from sevmigd.psp.crypto import HEADER_SIZE as SEV_HDR_SIZE   # a transport packet header: 0x34 bytes
from sevmigd.psp.crypto import SESSION_SIZE          # SEND_START's wrapped session blob: 0x80 bytes
from sevmigd.units import PAGE_SIZE

# The sizes above are the firmware's (sevmigd.psp defines them); the wire checks frames against them.
# AMD certificates (ARK/ASK) are 64 bytes of header + pubexp + modulus + signature; 4096-bit keys give
# 1600 bytes (Rome..Turin), 2048-bit 832 (Naples). 8 KiB leaves room without inviting abuse.
MAX_AMD_CERT_SIZE = 8192
MIN_AMD_CERT_SIZE = 64

# Default frame cap: 16 MiB holds a batch of ~4000 pages (~16 MiB of ciphertext), large enough that the
# per-frame cost (HMAC set-up, syscalls) is amortised, small enough that a receiver's buffer stays modest.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
# No peer may announce less than this: the handshake (six certificates, ~12 KiB) and one page batch
# must always fit. Handshake frames (Hello, Accept, Refuse, and Abort before Accept) must not exceed it.
MIN_MAX_FRAME = 64 * 1024
# The length prefix is a u32; we never accept more than 1 GiB per frame whatever the configuration.
MAX_MAX_FRAME = 1 << 30


@dataclasses.dataclass(frozen=True)
class Limits:
    """What this side is willing to receive. `max_frame` is announced to the peer in Hello/Accept
    (a sender never exceeds the smaller of the two announcements)."""

    max_frame: int = DEFAULT_MAX_FRAME
    # Largest guest we accept (Hello.memory_bytes). 4 TiB: far beyond what an emulated host holds,
    # and it bounds the Bitmap frame (4 TiB / 4 KiB / 8 = 128 MiB > max_frame, so max_frame binds first).
    max_guest_bytes: int = 4 << 40
    # KVM's KVM_MAX_VCPUS on x86 is 1024 (since Linux 5.15); a VMSA per vCPU for SEV-ES.
    max_vcpus: int = 1024
    # Free-text fields (Refuse/Abort reason) are for humans and logs.
    max_reason_chars: int = 1024
    max_name_chars: int = 255
    max_features: int = 64
    max_feature_chars: int = 64
    # Registers per vCPU in VcpuState.regs (the non-ES path carries named registers).
    max_regs: int = 512

    def __post_init__(self):
        if not (MIN_MAX_FRAME <= self.max_frame <= MAX_MAX_FRAME):
            raise ConfigError("max_frame", f"must be within [{MIN_MAX_FRAME}, {MAX_MAX_FRAME}], got {self.max_frame}")
