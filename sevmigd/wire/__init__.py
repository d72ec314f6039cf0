"""sevmigd.wire: the migration protocol as a pure, sans-I/O state machine (h11 style).

Normative specification: protocol/PROTOCOL.md. The API other layers use:

    from sevmigd.wire import Connection, Role, Limits, NEED_DATA, CLOSED, messages as m, errors
    conn = Connection(Role.SOURCE, rng=os.urandom, limits=Limits())
    data = conn.send(m.Hello(...)); conn.receive_data(chunk); ev = conn.next_event()

This package never does I/O, never reads a clock, and never imports trio (tests/test_layering.py).
"""

from . import errors, messages
from .connection import (CLOSED, FIRST_ROUND, KEEPALIVE_INTERVAL_S, NEED_DATA, PEER_DEAD_TIMEOUT_S,
                         PROTOCOL_VERSION, SUPPORTED_FEATURES, TRANSITIONS, Connection, Role, State,
                         decode_frame, encode_frame, negotiate_version)
from .errors import AbortCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .limits import Limits

__all__ = ["Connection", "Role", "State", "Limits", "NEED_DATA", "CLOSED", "messages", "errors", "AbortCode",
           "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "PROTOCOL_VERSION",
           "SUPPORTED_FEATURES", "FIRST_ROUND", "KEEPALIVE_INTERVAL_S", "PEER_DEAD_TIMEOUT_S", "TRANSITIONS",
           "negotiate_version", "encode_frame", "decode_frame"]
