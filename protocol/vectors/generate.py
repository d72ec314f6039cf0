"""Regenerate the golden vectors of PROTOCOL.md §11 from sevmigd.wire:  python protocol/vectors/generate.py

Writes one <name>.json per message type (a fixed MAC key and seq; the frame as hex and its meaning) and
transcript.json (a whole conversation between two connections with seeded random sources).
Only regenerate when the protocol changes on purpose: the vectors are the specification's examples, and
tests/test_wire_vectors.py checks that the code still produces them byte for byte.
"""

from __future__ import annotations

import json
import pathlib

from sevmigd.wire import AbortCode, Role, messages as m
from sevmigd.wire.connection import Connection, encode_frame
from sevmigd.wire.jsonform import to_json
from sevmigd.wire.testing import (fixed_rng, sample_accept, sample_hello, sample_pages, sample_start,
                                  sample_vcpu_state, script)

HERE = pathlib.Path(__file__).resolve().parent
MAC_KEY = bytes(range(32))
KEY_SHARE = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")  # RFC 7748 pk
SEED_SOURCE, SEED_DESTINATION = "sevmigd vectors: source", "sevmigd vectors: destination"


def single_vectors():
    hello = sample_hello(memory_bytes=16 * 4096, vcpus=2)
    es_hello = sample_hello(memory_bytes=16 * 4096, vcpus=1, es=True)
    cases = [
        ("hello", hello, 0, None, (KEY_SHARE, 16 << 20), "source"),
        ("accept", sample_accept(), 0, None, (KEY_SHARE, 1 << 16), "destination"),
        ("refuse", m.Refuse(AbortCode.GUEST_EXISTS, "guest 'guest-1' exists"), 0, None, (), "destination"),
        ("start", sample_start(hello), 1, MAC_KEY, (), "source"),
        ("pages", sample_pages(0, [3, 1], [7]), 2, MAC_KEY, (), "source"),
        ("pages_empty", sample_pages(4, [], []), 300, MAC_KEY, (), "source"),
        ("round_end", m.RoundEnd(round=0, pages=3, remaining=70000), 3, MAC_KEY, (), "source"),
        ("bitmap", m.Bitmap(npages=13, bits=b"\x05\x10"), 4, MAC_KEY, (), "source"),
        ("vcpu_state", sample_vcpu_state(hello), 5, MAC_KEY, (), "source"),
        ("vcpu_state_es", sample_vcpu_state(es_hello), 5, MAC_KEY, (), "source"),
        ("complete", m.Complete(pages_total=1 << 33), 6, MAC_KEY, (), "source"),
        ("ready", m.Ready(), 1, MAC_KEY, (), "destination"),
        ("go", m.Go(), 7, MAC_KEY, (), "source"),
        ("started", m.Started(), 2, MAC_KEY, (), "destination"),
        ("keepalive", m.Keepalive(), 70000, MAC_KEY, (), "destination"),
        ("abort", m.Abort(AbortCode.TIMEOUT, "no frame for 10 s"), 9, MAC_KEY, (), "source"),
        ("abort_unauthenticated", m.Abort(AbortCode.SHUTDOWN, ""), 0, None, (), "destination"),
        ("query", m.Query(version=1, migration_id="5f0c2a9e41d7b3c8",
                          session_id="0f1e2d3c4b5a69788796a5b4c3d2e1f0"), 0, None, (), "source"),
        ("answer", m.Answer(session_id="0f1e2d3c4b5a69788796a5b4c3d2e1f0", outcome="not_started",
                            reason="fenced: the guest will not start here"), 0, None, (), "destination"),
    ]
    for name, msg, seq, key, extras, sender in cases:
        frame = encode_frame(msg, seq=seq, key=key, extras=extras)
        yield name, {
            "name": name, "type": int(m.TYPE_OF[type(msg)]), "sender": sender, "seq": seq,
            "mac_key": key.hex() if key else None,
            "extras": {"key_share": extras[0].hex(), "max_frame": extras[1]} if extras else None,
            "hex": frame.hex(), "meaning": to_json(msg),
        }


def transcript():
    hello = sample_hello(memory_bytes=64 * 4096, vcpus=2)
    src = Connection(Role.SOURCE, rng=fixed_rng(SEED_SOURCE))
    dst = Connection(Role.DESTINATION, rng=fixed_rng(SEED_DESTINATION))
    frames = []
    for role, make in script(hello):
        a, b = (src, dst) if role is Role.SOURCE else (dst, src)
        msg = make()
        data = a.send(msg)
        b.receive_data(data)
        got = b.next_event()
        assert got == msg
        frames.append({"sender": role.value, "hex": data.hex(), "meaning": to_json(msg)})
    return {
        "rng": "SHA-256(seed || counter as 8-byte big-endian), counter from 0, concatenated",
        "seed_source": SEED_SOURCE, "seed_destination": SEED_DESTINATION,
        "session_id": src.session_id, "final_state": src.state, "handoff": src.handoff,
        "frames": frames,
    }


def main():
    for name, v in single_vectors():
        (HERE / f"{name}.json").write_text(json.dumps(v, indent=1) + "\n")
    (HERE / "transcript.json").write_text(json.dumps(transcript(), indent=1) + "\n")


if __name__ == "__main__":
    main()
