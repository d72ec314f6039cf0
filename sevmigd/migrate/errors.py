"""The migration error: what failed, with the AbortCode the peer is told.

Pure (no I/O). The daemon raises it from `MigrationManager.migrate_out` and keeps the first one of a
migration in its statistics (QEMU: "the first error wins").
"""

from __future__ import annotations

from sevmigd.errors import SevmigdError
from sevmigd.psp.status import SevError
from sevmigd.wire.errors import AbortCode


class MigrationError(SevmigdError):
    """A migration failed or was refused. `code` is the AbortCode (sent to the peer in Abort/Refuse);
    `stats`, once the daemon attached them, the migration's final statistics (a dict)."""

    stats: dict | None = None

    def __init__(self, code: AbortCode, message: str):
        super().__init__(message)
        self.code = AbortCode(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def sev_error_text(command: str, err: SevError) -> str:
    """'RECEIVE_UPDATE_DATA failed: BAD_MEASUREMENT (0x0b)' from a firmware error."""
    text = f"{command} failed: {err.status.name} (0x{int(err.status):02x})"
    if err.message:
        text += f": {err.message}"
    return text


class FirmwareCommandError(MigrationError):
    """A firmware command failed: `command` (its SEV API name) and the SEV `status`, with AbortCode
    FIRMWARE_ERROR for the peer. Raised by the daemon's PSP runner for every failed command."""

    error_class = "FirmwareError"

    def __init__(self, command: str, err: SevError, where: str = ""):
        text = sev_error_text(command, err)
        if where:
            text += f" ({where})"
        super().__init__(AbortCode.FIRMWARE_ERROR, text)
        self.command = command
        self.status = err.status
