"""The migration error: what failed, with the AbortCode the peer is told.

Pure (no I/O). The daemon raises it from `MigrationManager.migrate_out` and keeps the first one of a
migration in its statistics (QEMU: "the first error wins").
"""

from __future__ import annotations

from sevmigd.errors import SevmigdError
from sevmigd.psp.status import SevError
from sevmigd.wire.errors import AbortCode


class MigrationError(SevmigdError):
    """A migration failed or was refused. `code` is the AbortCode (sent to the peer in Abort/Refuse)."""

    def __init__(self, code: AbortCode, message: str):
        super().__init__(message)
        self.code = AbortCode(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def sev_error_text(command: str, err: SevError) -> str:
    """'RECEIVE_UPDATE_DATA failed: BAD_MEASUREMENT (0x0b)' from a firmware error."""
    status = getattr(err, "status", None)
    try:
        name, value = status.name, int(status)
        text = f"{command} failed: {name} (0x{value:02x})"
    except AttributeError:
        text = f"{command} failed: {err}"
    detail = getattr(err, "message", "") or ""
    if detail and detail not in text:
        text += f": {detail}"
    return text


def firmware_error(command: str, err: SevError, extra: str = "") -> MigrationError:
    """A firmware SevError as a MigrationError(FIRMWARE_ERROR) naming the command and SEV status."""
    text = sev_error_text(command, err)
    if extra:
        text += f" ({extra})"
    return MigrationError(AbortCode.FIRMWARE_ERROR, text)
