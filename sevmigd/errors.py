"""Errors shared by every layer that are not firmware (SevError) or protocol (ProtocolError) errors.

Every error says who is at fault and carries something a user can act on.
"""


class SevmigdError(Exception):
    """Base of sevmigd's own errors (not firmware, not protocol)."""


class ConfigError(SevmigdError):
    """Bad configuration, CLI argument or control request: the user's input is at fault.

    `key` names the offending setting (config key, flag or request field) so one clear line can say which.
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
