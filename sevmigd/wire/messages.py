"""The messages of the sevmigd migration protocol (PROTOCOL.md §5) and their field codecs.

Owns: one frozen dataclass per message, its wire type code, and the two pure functions the connection
uses for every message except the Pages fast path:

* `fields_of(msg) -> list`: the positional msgpack fields after `[type, seq]` (checked first);
* `message_from_fields(type, fields, err) -> msg`: strict decoding, every field type- and size-checked.

`check(msg, err, limits)` validates a message's *static* shape (types, sizes, ranges) and raises `err`
(LocalProtocolError when we are about to send, RemoteProtocolError when we received it). Checks that need
the negotiated session (pfn < npages, bitmap length, vCPU count) live in connection.py.
Must never: do I/O, hold keys, or accept a value of the wrong msgpack type (no bool for int, no float).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

from .errors import AbortCode, ProtocolError
from .limits import (MAX_AMD_CERT_SIZE, MIN_AMD_CERT_SIZE, PAGE_SIZE, SESSION_SIZE, SEV_CERT_SIZE,
                     SEV_HDR_SIZE, Limits)

U16 = (1 << 16) - 1
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

# Certificate names as sevctl writes them (`sevctl export`: ark.cert ask.cert cek.cert oca.cert pek.cert
# pdh.cert), without the ".cert" suffix. All six are required in Hello and Accept.
SEV_CERT_NAMES = ("cek", "oca", "pek", "pdh")
AMD_CERT_NAMES = ("ark", "ask")
PLATFORM_NAMES = tuple(sorted(SEV_CERT_NAMES + AMD_CERT_NAMES))


class MsgType(enum.IntEnum):
    """Wire type codes (PROTOCOL.md §5). 0x40-0x7F is the ignorable extension range (§6)."""

    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    START = 4
    PAGES = 5
    ROUND_END = 6
    BITMAP = 7
    VCPU_STATE = 8
    COMPLETE = 9
    READY = 10
    GO = 11
    STARTED = 12
    KEEPALIVE = 13
    ABORT = 14
    QUERY = 15
    ANSWER = 16


IGNORABLE_TYPES = range(0x40, 0x80)

# First field of Hello and Accept on the wire (PROTOCOL.md §5.1): says "this is sevmigd's migration
# protocol" to a peer, a capture tool or a confused client, before any version-dependent field.
MAGIC = "sevmigd"


@dataclasses.dataclass(frozen=True)
class Hello:
    """source -> destination: who I am, what guest I want to hand you (PROTOCOL.md §5.1)."""

    version: int
    features: tuple[str, ...]
    platform: dict[str, bytes]
    guest_name: str
    memory_bytes: int
    policy: int
    vcpus: int
    es: bool
    migration_id: str


@dataclasses.dataclass(frozen=True)
class Accept:
    """destination -> source: I take the guest; here is my platform chain (its PDH for SEND_START)."""

    version: int
    features: tuple[str, ...]
    platform: dict[str, bytes]


@dataclasses.dataclass(frozen=True)
class Refuse:
    """destination -> source: I will not take this guest. Ends the connection."""

    code: AbortCode
    reason: str


@dataclasses.dataclass(frozen=True)
class Start:
    """source -> destination after SEND_START: what RECEIVE_START needs (policy, source PDH, session blob)."""

    policy: int
    pdh: bytes
    session: bytes


@dataclasses.dataclass(frozen=True, eq=False)
class Pages:
    """source -> destination: one batch of pages of one round, column-packed (no per-page objects).

    enc_*: private pages as SEND_UPDATE_DATA produced them (52-byte header + 4096 bytes of ciphertext each);
    shr_*: shared (unencrypted) pages in the clear. pfns are numpy uint64 arrays.
    On a *received* Pages, the bulk columns are zero-copy, read-only views into the frame (memoryview for
    enc_headers/enc_data/shr_data, read-only numpy views for the pfns): bytes-like for every use (len,
    slicing, bytes(), numpy.frombuffer, hashing, the firmware's batch commands) but not `bytes` instances.
    """

    round: int
    enc_pfns: Any
    enc_headers: bytes
    enc_data: bytes
    shr_pfns: Any
    shr_data: bytes

    def __eq__(self, other):
        if not isinstance(other, Pages):
            return NotImplemented
        return (self.round == other.round
                and np.array_equal(np.asarray(self.enc_pfns, dtype=np.uint64),
                                   np.asarray(other.enc_pfns, dtype=np.uint64))
                and bytes(self.enc_headers) == bytes(other.enc_headers)
                and bytes(self.enc_data) == bytes(other.enc_data)
                and np.array_equal(np.asarray(self.shr_pfns, dtype=np.uint64),
                                   np.asarray(other.shr_pfns, dtype=np.uint64))
                and bytes(self.shr_data) == bytes(other.shr_data))

    __hash__ = None

    @property
    def npages(self) -> int:
        return len(self.enc_pfns) + len(self.shr_pfns)


@dataclasses.dataclass(frozen=True)
class RoundEnd:
    """source -> destination: round `round` is over; `pages` pages were sent in it (checked by the
    receiver against the Pages frames it got); `remaining` = dirty pages still to send (for progress)."""

    round: int
    pages: int
    remaining: int


@dataclasses.dataclass(frozen=True)
class Bitmap:
    """source -> destination, stop-and-copy: the final page-encryption bitmap (bit set = private page),
    packed little-endian bit order (bit i of the guest is bit i%8 of byte i//8), padding bits zero."""

    npages: int
    bits: bytes


@dataclasses.dataclass(frozen=True)
class VcpuState:
    """source -> destination: vCPU state. Plain SEV: `regs` (one dict per vCPU). SEV-ES: the VMSAs as
    SEND_UPDATE_VMSA packets (`vmsa_header` = vcpus*52 bytes, `vmsa` = vcpus*4096 bytes), `regs` None."""

    regs: tuple[dict[str, int], ...] | None
    vmsa_header: bytes | None
    vmsa: bytes | None


@dataclasses.dataclass(frozen=True)
class Complete:
    """source -> destination: nothing more to send; `pages_total` = pages sent over the whole migration."""

    pages_total: int


@dataclasses.dataclass(frozen=True)
class Ready:
    """destination -> source: RECEIVE_FINISH done; the guest can start as soon as Go arrives."""


@dataclasses.dataclass(frozen=True)
class Go:
    """source -> destination: hand-over. Sending it gives up the source's right to resume the guest."""


@dataclasses.dataclass(frozen=True)
class Started:
    """destination -> source: the guest runs on the destination (the source may now destroy its copy)."""


@dataclasses.dataclass(frozen=True)
class Keepalive:
    """either side, after the handshake: proof of life when idle (PROTOCOL.md §7)."""


@dataclasses.dataclass(frozen=True)
class Abort:
    """either side, any state: the migration is over, `code` says why. Ends the connection."""

    code: AbortCode
    reason: str


# The settlement query (PROTOCOL.md §7.6): its own conversation on a new connection, after a hand-off the
# source could not finish (Go sent, Started not received).
OUTCOME_STARTED = "started"
OUTCOME_NOT_STARTED = "not_started"
OUTCOME_UNKNOWN = "unknown"
OUTCOMES = (OUTCOME_STARTED, OUTCOME_NOT_STARTED, OUTCOME_UNKNOWN)
SESSION_ID_CHARS = 32


@dataclasses.dataclass(frozen=True)
class Query:
    """source -> destination, first frame of a settlement connection: did the migration whose channel had
    `session_id` (PROTOCOL.md §9.2) start the guest on you? `migration_id` names it in the logs."""

    version: int
    migration_id: str
    session_id: str


@dataclasses.dataclass(frozen=True)
class Answer:
    """destination -> source: `outcome` for the queried session ("started", "not_started" -- a promise that it
    never will -- or "unknown"); `session_id` echoes the query's. Ends the connection."""

    session_id: str
    outcome: str
    reason: str


Message = (Hello | Accept | Refuse | Start | Pages | RoundEnd | Bitmap | VcpuState | Complete | Ready | Go
           | Started | Keepalive | Abort | Query | Answer)

TYPE_OF: dict[type, MsgType] = {
    Hello: MsgType.HELLO, Accept: MsgType.ACCEPT, Refuse: MsgType.REFUSE, Start: MsgType.START,
    Pages: MsgType.PAGES, RoundEnd: MsgType.ROUND_END, Bitmap: MsgType.BITMAP,
    VcpuState: MsgType.VCPU_STATE, Complete: MsgType.COMPLETE, Ready: MsgType.READY, Go: MsgType.GO,
    Started: MsgType.STARTED, Keepalive: MsgType.KEEPALIVE, Abort: MsgType.ABORT, Query: MsgType.QUERY,
    Answer: MsgType.ANSWER,
}
CLASS_OF: dict[MsgType, type] = {t: c for c, t in TYPE_OF.items()}

# Number of positional fields after [type, seq] and before the mac, per type (v1). Hello and Accept carry
# three more, connection-level fields that are not part of the dataclass: MAGIC first, and
# (key_share, max_frame) last.
N_FIELDS = {
    MsgType.HELLO: 9 + 3, MsgType.ACCEPT: 3 + 3, MsgType.REFUSE: 2, MsgType.START: 3, MsgType.PAGES: 6,
    MsgType.ROUND_END: 3, MsgType.BITMAP: 2, MsgType.VCPU_STATE: 3, MsgType.COMPLETE: 1,
    MsgType.READY: 0, MsgType.GO: 0, MsgType.STARTED: 0, MsgType.KEEPALIVE: 0, MsgType.ABORT: 2,
    MsgType.QUERY: 1 + 3, MsgType.ANSWER: 3,
}


# ---------------------------------------------------------------------------------------------------------
# Field checks. `err` is the error class to raise (Local when sending, Remote when receiving).

def _fail(err, what: str, code: AbortCode = AbortCode.PROTOCOL_ERROR):
    raise err(code, what)


def _uint(v, bits: int, name: str, err) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        _fail(err, f"{name}: expected an unsigned integer, got {type(v).__name__}")
    v = int(v)
    if v < 0 or v >> bits:
        _fail(err, f"{name}: {v} is out of range for u{bits}")
    return v


def _bool(v, name: str, err) -> bool:
    if type(v) is not bool:
        _fail(err, f"{name}: expected a boolean, got {type(v).__name__}")
    return v


def _bytes(v, name: str, err, *, size: int | None = None, lo: int = 0, hi: int | None = None) -> bytes:
    if not isinstance(v, (bytes, bytearray, memoryview)):
        _fail(err, f"{name}: expected bytes, got {type(v).__name__}")
    n = v.nbytes if isinstance(v, memoryview) else len(v)
    if size is not None and n != size:
        _fail(err, f"{name}: expected {size} bytes, got {n}")
    if n < lo or (hi is not None and n > hi):
        _fail(err, f"{name}: length {n} outside [{lo}, {hi}]")
    return v


def _text(v, name: str, err, *, lo: int, hi: int) -> str:
    if type(v) is not str:
        _fail(err, f"{name}: expected a string, got {type(v).__name__}")
    if not (lo <= len(v) <= hi):
        _fail(err, f"{name}: length {len(v)} outside [{lo}, {hi}]")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        _fail(err, f"{name}: control characters are not allowed")
    return v


def _features(v, err, limits: Limits) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        _fail(err, f"features: expected an array, got {type(v).__name__}")
    if len(v) > limits.max_features:
        _fail(err, f"features: {len(v)} entries, at most {limits.max_features}")
    out = []
    for f in v:
        f = _text(f, "features[]", err, lo=1, hi=limits.max_feature_chars)
        if not all(c.isascii() and (c.islower() or c.isdigit() or c in "-._") for c in f):
            _fail(err, f"features: {f!r} is not lower-case ascii [a-z0-9-._]")
        out.append(f)
    if len(set(out)) != len(out):
        _fail(err, "features: duplicate entries")
    return tuple(out)


def _platform(v, err) -> dict[str, bytes]:
    if not isinstance(v, dict):
        _fail(err, f"platform: expected a map, got {type(v).__name__}")
    if sorted(v) != list(PLATFORM_NAMES):
        _fail(err, f"platform: expected exactly the certificates {', '.join(PLATFORM_NAMES)}, "
                   f"got {', '.join(sorted(map(str, v)))}", AbortCode.UNTRUSTED_PLATFORM)
    out = {}
    for name in PLATFORM_NAMES:
        if name in SEV_CERT_NAMES:
            out[name] = bytes(_bytes(v[name], f"platform.{name}", err, size=SEV_CERT_SIZE))
        else:
            out[name] = bytes(_bytes(v[name], f"platform.{name}", err, lo=MIN_AMD_CERT_SIZE,
                                     hi=MAX_AMD_CERT_SIZE))
    return out


def _code(v, err) -> AbortCode:
    v = _uint(v, 16, "code", err)
    try:
        return AbortCode(v)
    except ValueError:
        # A code from a later version: still an abort, reported as PROTOCOL_ERROR (PROTOCOL.md §8).
        return None  # type: ignore[return-value]


def _regs(v, err, limits: Limits):
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        _fail(err, f"regs: expected an array or nil, got {type(v).__name__}")
    if not (1 <= len(v) <= limits.max_vcpus):
        _fail(err, f"regs: {len(v)} vCPUs outside [1, {limits.max_vcpus}]")
    out = []
    for i, d in enumerate(v):
        if not isinstance(d, dict):
            _fail(err, f"regs[{i}]: expected a map, got {type(d).__name__}")
        if len(d) > limits.max_regs:
            _fail(err, f"regs[{i}]: {len(d)} registers, at most {limits.max_regs}")
        r = {}
        for k, x in d.items():
            _text(k, f"regs[{i}] name", err, lo=1, hi=32)
            r[k] = _uint(x, 64, f"regs[{i}].{k}", err)
        out.append(r)
    return tuple(out)


def _session_id(v, err) -> str:
    v = _text(v, "session_id", err, lo=SESSION_ID_CHARS, hi=SESSION_ID_CHARS)
    if any(c not in "0123456789abcdef" for c in v):
        _fail(err, "session_id: expected 32 lower-case hex digits")
    return v


def check(msg, err, limits: Limits) -> Any:
    """Validate the static shape of `msg`; return it normalised (tuples, bytes, AbortCode). Raises `err`."""
    t = type(msg)
    if t is Hello:
        return Hello(
            version=_uint(msg.version, 32, "version", err),
            features=_features(msg.features, err, limits),
            platform=_platform(msg.platform, err),
            guest_name=_text(msg.guest_name, "guest_name", err, lo=1, hi=limits.max_name_chars),
            memory_bytes=_uint(msg.memory_bytes, 64, "memory_bytes", err),
            policy=_uint(msg.policy, 32, "policy", err),
            vcpus=_uint(msg.vcpus, 32, "vcpus", err),
            es=_bool(msg.es, "es", err),
            migration_id=_text(msg.migration_id, "migration_id", err, lo=1, hi=limits.max_name_chars))
    if t is Accept:
        return Accept(version=_uint(msg.version, 32, "version", err),
                      features=_features(msg.features, err, limits),
                      platform=_platform(msg.platform, err))
    if t is Refuse or t is Abort:
        code = _code(msg.code, err)
        if code is None:
            _fail(err, f"code: {msg.code!r} is not an AbortCode")
        return t(code=code, reason=_text(msg.reason, "reason", err, lo=0, hi=limits.max_reason_chars))
    if t is Start:
        return Start(policy=_uint(msg.policy, 32, "policy", err),
                     pdh=bytes(_bytes(msg.pdh, "pdh", err, size=SEV_CERT_SIZE)),
                     session=bytes(_bytes(msg.session, "session", err, size=SESSION_SIZE)))
    if t is RoundEnd:
        return RoundEnd(round=_uint(msg.round, 32, "round", err), pages=_uint(msg.pages, 64, "pages", err),
                        remaining=_uint(msg.remaining, 64, "remaining", err))
    if t is Bitmap:
        npages = _uint(msg.npages, 64, "npages", err)
        bits = bytes(_bytes(msg.bits, "bits", err, size=(npages + 7) // 8))
        if npages % 8 and bits[-1] >> (npages % 8):
            _fail(err, "bits: padding bits beyond npages must be zero")
        return Bitmap(npages=npages, bits=bits)
    if t is VcpuState:
        regs = _regs(msg.regs, err, limits)
        hdr = None if msg.vmsa_header is None else bytes(_bytes(msg.vmsa_header, "vmsa_header", err))
        vmsa = None if msg.vmsa is None else bytes(_bytes(msg.vmsa, "vmsa", err))
        if regs is not None:
            if hdr is not None or vmsa is not None:
                _fail(err, "VcpuState: either regs (SEV) or vmsa_header+vmsa (SEV-ES), not both")
        else:
            if hdr is None or vmsa is None:
                _fail(err, "VcpuState: needs regs (SEV) or both vmsa_header and vmsa (SEV-ES)")
            n = len(hdr) // SEV_HDR_SIZE
            if not (1 <= n <= limits.max_vcpus) or len(hdr) != n * SEV_HDR_SIZE or len(vmsa) != n * PAGE_SIZE:
                _fail(err, f"VcpuState: vmsa_header ({len(hdr)} bytes) and vmsa ({len(vmsa)} bytes) must "
                           f"be N*{SEV_HDR_SIZE} and N*{PAGE_SIZE} for 1 <= N <= {limits.max_vcpus}")
        return VcpuState(regs=regs, vmsa_header=hdr, vmsa=vmsa)
    if t is Complete:
        return Complete(pages_total=_uint(msg.pages_total, 64, "pages_total", err))
    if t in (Ready, Go, Started, Keepalive):
        return msg
    if t is Query:
        return Query(version=_uint(msg.version, 32, "version", err),
                     migration_id=_text(msg.migration_id, "migration_id", err, lo=1, hi=limits.max_name_chars),
                     session_id=_session_id(msg.session_id, err))
    if t is Answer:
        outcome = _text(msg.outcome, "outcome", err, lo=1, hi=32)
        if outcome not in OUTCOMES:
            _fail(err, f"outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
        return Answer(session_id=_session_id(msg.session_id, err), outcome=outcome,
                      reason=_text(msg.reason, "reason", err, lo=0, hi=limits.max_reason_chars))
    if t is Pages:
        return msg  # checked column by column on the fast path (connection.py)
    _fail(err, f"not a protocol message: {t.__name__}")


def fields_of(msg) -> list:
    """Positional wire fields of a (checked) message, Pages excepted (fast path in connection.py)."""
    t = type(msg)
    if t is Hello:
        return [msg.version, list(msg.features), dict(sorted(msg.platform.items())), msg.guest_name,
                msg.memory_bytes, msg.policy, msg.vcpus, msg.es, msg.migration_id]
    if t is Accept:
        return [msg.version, list(msg.features), dict(sorted(msg.platform.items()))]
    if t is Refuse or t is Abort:
        return [int(msg.code), msg.reason]
    if t is Start:
        return [msg.policy, msg.pdh, msg.session]
    if t is RoundEnd:
        return [msg.round, msg.pages, msg.remaining]
    if t is Bitmap:
        return [msg.npages, msg.bits]
    if t is VcpuState:
        regs = None if msg.regs is None else [dict(sorted(r.items())) for r in msg.regs]
        return [regs, msg.vmsa_header, msg.vmsa]
    if t is Complete:
        return [msg.pages_total]
    if t is Query:
        return [msg.version, msg.migration_id, msg.session_id]
    if t is Answer:
        return [msg.session_id, msg.outcome, msg.reason]
    return []


def wire_fields(msg, extras=()) -> list:
    """All positional wire fields of a non-Pages message: MAGIC + fields + extras for Hello/Accept."""
    if type(msg) in (Hello, Accept, Query):
        return [MAGIC, *fields_of(msg), *extras]
    return fields_of(msg)


def message_from_fields(mtype: MsgType, f: list, err, limits: Limits):
    """Build and check a message from its positional fields (count already checked by the caller)."""
    if mtype is MsgType.HELLO:
        msg = Hello(version=f[0], features=f[1], platform=f[2], guest_name=f[3], memory_bytes=f[4],
                    policy=f[5], vcpus=f[6], es=f[7], migration_id=f[8])
    elif mtype is MsgType.ACCEPT:
        msg = Accept(version=f[0], features=f[1], platform=f[2])
    elif mtype in (MsgType.REFUSE, MsgType.ABORT):
        code = _code(f[0], err)
        reason = _text(f[1], "reason", err, lo=0, hi=limits.max_reason_chars)
        if code is None:
            code, reason = AbortCode.PROTOCOL_ERROR, f"[unknown abort code {f[0]}] {reason}"[:limits.max_reason_chars]
        msg = CLASS_OF[mtype](code=code, reason=reason)
    elif mtype is MsgType.START:
        msg = Start(policy=f[0], pdh=f[1], session=f[2])
    elif mtype is MsgType.ROUND_END:
        msg = RoundEnd(round=f[0], pages=f[1], remaining=f[2])
    elif mtype is MsgType.BITMAP:
        msg = Bitmap(npages=f[0], bits=f[1])
    elif mtype is MsgType.VCPU_STATE:
        msg = VcpuState(regs=f[0], vmsa_header=f[1], vmsa=f[2])
    elif mtype is MsgType.COMPLETE:
        msg = Complete(pages_total=f[0])
    elif mtype is MsgType.QUERY:
        msg = Query(version=f[0], migration_id=f[1], session_id=f[2])
    elif mtype is MsgType.ANSWER:
        msg = Answer(session_id=f[0], outcome=f[1], reason=f[2])
    else:
        msg = CLASS_OF[mtype]()
    return check(msg, err, limits)


__all__ = ["MsgType", "Hello", "Accept", "Refuse", "Start", "Pages", "RoundEnd", "Bitmap", "VcpuState",
           "Complete", "Ready", "Go", "Started", "Keepalive", "Abort", "Query", "Answer", "OUTCOMES",
           "OUTCOME_STARTED", "OUTCOME_NOT_STARTED", "OUTCOME_UNKNOWN", "Message", "TYPE_OF", "CLASS_OF",
           "PLATFORM_NAMES", "ProtocolError"]
