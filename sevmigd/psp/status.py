"""SEV firmware status codes (reference §2.6) and the one exception firmware commands raise.

A firmware command either succeeds or raises SevError carrying the exact status the AMD firmware
returns; callers map it to an abort code, never guess from a message.
"""

from __future__ import annotations

import enum


class SevStatus(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DF_FLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18


class SevError(Exception):
    """A firmware command failed with `status` (a SevStatus).

    `written_back` holds the length fields the firmware writes back into the command buffer on the
    length-query path, e.g. SEND_START with a short session buffer gives
    ``SevError(INVALID_LENGTH, session_len=0x80)``.
    """

    #: Batch commands: the number of the packet that failed (the packets before it were applied).
    index: int | None = None

    def __init__(self, status: SevStatus | int, message: str = "", **written_back: int):
        self.status = SevStatus(status)
        self.message = message
        self.written_back = dict(written_back)
        text = f"{self.status.name} (0x{int(self.status):02x})"
        if message:
            text += f": {message}"
        super().__init__(text)
