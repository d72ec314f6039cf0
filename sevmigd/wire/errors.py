"""Protocol errors of the sevmigd migration channel, and the abort codes both peers share.

Owns: `AbortCode` (the normative table is in protocol/PROTOCOL.md §8; the numeric values are pinned and
travel on the wire in Refuse and Abort) and the two error classes that say *who is at fault*:

* `LocalProtocolError`: we (the code calling `Connection.send`/`receive_data`) misused the protocol, e.g.
  sent a message that is illegal in the current state. A bug or a policy decision on our side.
* `RemoteProtocolError`: the peer (or the network between us) sent something we must not accept: a
  malformed frame, a bad MAC, a replayed sequence number, a message illegal in the current state.

Both carry `.code: AbortCode`, which is what the daemon puts in the Abort frame it sends back.
Must never: import anything with I/O, or carry secrets in messages (messages end up in logs).
"""

from __future__ import annotations

import enum


class AbortCode(enum.IntEnum):
    """Why a migration was refused or aborted. Values are pinned (wire format, PROTOCOL.md §8)."""

    PROTOCOL_ERROR = 1
    VERSION_MISMATCH = 2
    UNTRUSTED_PLATFORM = 3
    POLICY_REFUSED = 4
    RESOURCE_LIMIT = 5
    FIRMWARE_ERROR = 6
    INTEGRITY_FAILURE = 7
    CANCELLED = 8
    TIMEOUT = 9
    SHUTDOWN = 10
    CONVERGENCE_FAILED = 11
    INTERNAL_ERROR = 12
    FRAME_TOO_LARGE = 13
    GUEST_EXISTS = 14
    REPLAYED_SESSION = 15


class ProtocolError(Exception):
    """Base of the channel's errors; `.code` is the AbortCode to send to the peer, `.message` says why."""

    def __init__(self, code: AbortCode, message: str = ""):
        self.code = AbortCode(code)
        self.message = message
        super().__init__(f"{self.code.name}: {message}" if message else self.code.name)


class LocalProtocolError(ProtocolError):
    """We broke the protocol (illegal send, message that fails validation, API misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer (or the network) broke the protocol: malformed, unauthenticated or out-of-order input."""
