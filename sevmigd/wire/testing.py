"""Helpers for tests of the wire layer and of its users (like trio.testing): deterministic rngs, sample
messages, and a pair of connections driven to any state of the conversation.

Must never: be used by the daemon for real migrations (the rngs here are deterministic on purpose).
"""

from __future__ import annotations

import hashlib

import numpy as np

from . import messages as m
from .connection import NEED_DATA, Connection, Role, State
from .limits import PAGE_SIZE, SESSION_SIZE, SEV_CERT_SIZE, SEV_HDR_SIZE, Limits


def fixed_rng(seed: bytes | str | int = 0):
    """A deterministic rng (SHA-256 in counter mode over `seed`): same seed, same bytes."""
    seed = str(seed).encode() if not isinstance(seed, bytes) else seed
    counter = 0

    def rng(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return out[:n]
    return rng


def sample_platform(tag: int = 0) -> dict[str, bytes]:
    """Six certificate blobs of the right sizes (contents are not real certificates: the codec does not
    parse them; chain verification is the daemon's job with sevmigd.psp.chain)."""
    out = {name: bytes([tag, i]) * (SEV_CERT_SIZE // 2) for i, name in enumerate(m.SEV_CERT_NAMES)}
    out["ark"] = bytes([tag, 0xA]) * 416
    out["ask"] = bytes([tag, 0xB]) * 416
    return out


def sample_hello(*, memory_bytes: int = 64 * PAGE_SIZE, vcpus: int = 2, es: bool = False,
                 policy: int = 0x5, features=()) -> m.Hello:
    return m.Hello(version=1, features=tuple(features), platform=sample_platform(1), guest_name="guest-1",
                   memory_bytes=memory_bytes, policy=policy, vcpus=vcpus, es=es, migration_id="mig-0001")


def sample_accept(features=()) -> m.Accept:
    return m.Accept(version=1, features=tuple(features), platform=sample_platform(2))


def sample_start(hello: m.Hello) -> m.Start:
    return m.Start(policy=hello.policy, pdh=b"\x11" * SEV_CERT_SIZE, session=b"\x22" * SESSION_SIZE)


def sample_pages(round: int, pfns_enc, pfns_shr) -> m.Pages:
    ne, ns = len(pfns_enc), len(pfns_shr)
    return m.Pages(round=round, enc_pfns=np.asarray(pfns_enc, dtype=np.uint64),
                   enc_headers=bytes(range(SEV_HDR_SIZE)) * ne, enc_data=b"\xee" * (PAGE_SIZE * ne),
                   shr_pfns=np.asarray(pfns_shr, dtype=np.uint64), shr_data=b"\x5a" * (PAGE_SIZE * ns))


def sample_vcpu_state(hello: m.Hello) -> m.VcpuState:
    if hello.es:
        return m.VcpuState(regs=None, vmsa_header=b"\x01" * (SEV_HDR_SIZE * hello.vcpus),
                           vmsa=b"\x02" * (PAGE_SIZE * hello.vcpus))
    return m.VcpuState(regs=tuple({"rip": 0x1000 + i, "rsp": 0x8000} for i in range(hello.vcpus)),
                       vmsa_header=None, vmsa=None)


def transfer(sender: Connection, receiver: Connection, msg):
    """Send `msg` and return what the receiver decodes (exactly one event)."""
    receiver.receive_data(sender.send(msg))
    ev = receiver.next_event()
    assert receiver.next_event() is NEED_DATA
    return ev


# The happy path of a conversation as (sender role, message factory) up to DONE.
def script(hello: m.Hello, accept_features=()):
    S, D = Role.SOURCE, Role.DESTINATION
    return [
        (S, lambda: hello),
        (D, lambda: sample_accept(features=accept_features)),
        (S, lambda: sample_start(hello)),
        (S, lambda: sample_pages(0, [0, 1], [2])),
        (S, lambda: m.RoundEnd(round=0, pages=3, remaining=1)),
        (S, lambda: m.Bitmap(npages=hello.memory_bytes // PAGE_SIZE,
                             bits=b"\x03" + bytes(hello.memory_bytes // PAGE_SIZE // 8 - 1))),
        (S, lambda: sample_pages(1, [1], [])),
        (S, lambda: m.RoundEnd(round=1, pages=1, remaining=0)),
        (S, lambda: sample_vcpu_state(hello)),
        (S, lambda: m.Complete(pages_total=4)),
        (D, lambda: m.Ready()),
        (S, lambda: m.Go()),
        (D, lambda: m.Started()),
    ]


def pair(*, hello: m.Hello | None = None, until: State = State.IDLE, limits: Limits | None = None,
         seed: int = 0, features=()):
    """A (source, destination) pair driven along the happy path until both are in state `until`.
    `features`: listed by the Accept (and by the Hello when `hello` is not given)."""
    hello = hello or sample_hello(features=features)
    src = Connection(Role.SOURCE, rng=fixed_rng(f"src{seed}"), limits=limits)
    dst = Connection(Role.DESTINATION, rng=fixed_rng(f"dst{seed}"), limits=limits)
    steps = iter(script(hello, features))
    while src._state is not until:
        role, make = next(steps)
        a, b = (src, dst) if role is Role.SOURCE else (dst, src)
        transfer(a, b, make())
    assert dst._state is until
    return src, dst


def forge(sender: Connection, msg) -> bytes:
    """Encode `msg` as `sender`'s next frame (its seq and channel key) *without* any state or content
    check, so tests can deliver messages that are illegal in the receiver's state. Advances sender's seq."""
    from . import integrity
    from .connection import _pfn_column
    from .messages import TYPE_OF, MsgType, wire_fields

    if isinstance(msg, m.Pages):
        return sender._encode_pages(msg.round, _pfn_column(msg.enc_pfns, "enc_pfns"), msg.enc_headers,
                                    msg.enc_data, _pfn_column(msg.shr_pfns, "shr_pfns"), msg.shr_data)
    mtype = TYPE_OF[type(msg)]
    extras = []
    if mtype in (MsgType.HELLO, MsgType.ACCEPT):
        extras = [integrity.KeyShare(fixed_rng("forge")).public, sender.limits.max_frame]
    return sender._encode(mtype, wire_fields(msg, extras))
