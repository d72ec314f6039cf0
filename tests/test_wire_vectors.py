"""Golden vectors of protocol/PROTOCOL.md §11: every vector decodes to its meaning and re-encodes byte for
byte; the transcript is reproduced by two Connections with the documented seeded rngs; and the MAC and key
derivation are recomputed here from the *specification's* formulas with raw primitives (hashlib, hmac,
cryptography), not through sevmigd.wire, so the prose and the code cannot drift apart unnoticed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevmigd.wire import AbortCode, Connection, RemoteProtocolError, Role
from sevmigd.wire.connection import decode_frame, encode_frame
from sevmigd.wire.jsonform import from_json, to_json
from sevmigd.wire.testing import fixed_rng

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "protocol" / "vectors"
SINGLE = sorted(p for p in VECTORS.glob("*.json") if p.name != "transcript.json")


def _load(p):
    return json.loads(p.read_text())


def test_there_is_a_vector_for_every_message_type():
    types = {_load(p)["type"] for p in SINGLE}
    assert types == set(range(1, 17))


@pytest.mark.parametrize("path", SINGLE, ids=lambda p: p.stem)
def test_vector_decodes_to_its_meaning_and_reencodes_byte_exact(path):
    v = _load(path)
    frame = bytes.fromhex(v["hex"])
    key = bytes.fromhex(v["mac_key"]) if v["mac_key"] else None
    seq, msg, extras = decode_frame(frame, key=key)
    assert seq == v["seq"]
    assert msg == from_json(v["meaning"])
    assert to_json(msg) == v["meaning"]
    want_extras = (bytes.fromhex(v["extras"]["key_share"]), v["extras"]["max_frame"]) if v["extras"] else ()
    assert tuple(extras) == want_extras
    assert encode_frame(from_json(v["meaning"]), seq=v["seq"], key=key, extras=want_extras) == frame


@pytest.mark.parametrize("path", [p for p in SINGLE if _load(p)["mac_key"]], ids=lambda p: p.stem)
def test_vector_mac_follows_the_spec_and_a_wrong_key_fails(path):
    """PROTOCOL.md §9.3: HMAC-SHA256(key, body up to the MAC), for Pages up to enc_data's payload."""
    v = _load(path)
    frame = bytes.fromhex(v["hex"])
    body = frame[4:]
    assert int.from_bytes(frame[:4], "big") == len(body)
    assert body[-34:-32] == b"\xc4\x20"
    if v["meaning"]["type"] == "Pages":
        n_ct = len(v["meaning"]["fields"]["enc_data"]["hex"]) // 2
        covered = body[:len(body) - 34 - n_ct]
    else:
        covered = body[:-34]
    assert hmac.new(bytes.fromhex(v["mac_key"]), covered, hashlib.sha256).digest() == body[-32:]
    with pytest.raises(RemoteProtocolError) as ei:
        decode_frame(frame, key=b"\x00" * 32)
    assert ei.value.code is AbortCode.INTEGRITY_FAILURE


def test_transcript_is_reproduced_byte_exact_by_two_connections():
    t = _load(VECTORS / "transcript.json")
    src = Connection(Role.SOURCE, rng=fixed_rng(t["seed_source"]))
    dst = Connection(Role.DESTINATION, rng=fixed_rng(t["seed_destination"]))
    for f in t["frames"]:
        a, b = (src, dst) if f["sender"] == "source" else (dst, src)
        data = a.send(from_json(f["meaning"]))
        assert data.hex() == f["hex"]
        b.receive_data(data)
        assert to_json(b.next_event()) == f["meaning"]
    assert src.session_id == dst.session_id == t["session_id"]
    assert src.state == t["final_state"] and src.handoff == t["handoff"]


def test_transcript_key_schedule_follows_the_spec():
    """PROTOCOL.md §9.2 from raw primitives: X25519 keys from the seeded rng, transcript hash over the two
    handshake frames, HKDF -> K_s2d, K_d2s, session_id; the third frame (Start) verifies under K_s2d."""
    t = _load(VECTORS / "transcript.json")
    hello_frame = bytes.fromhex(t["frames"][0]["hex"])
    accept_frame = bytes.fromhex(t["frames"][1]["hex"])
    sk_s = X25519PrivateKey.from_private_bytes(fixed_rng(t["seed_source"])(32))
    sk_d = X25519PrivateKey.from_private_bytes(fixed_rng(t["seed_destination"])(32))
    pk_d = sk_d.public_key().public_bytes_raw()
    assert pk_d in accept_frame and sk_s.public_key().public_bytes_raw() in hello_frame
    shared = sk_s.exchange(X25519PublicKey.from_public_bytes(pk_d))
    transcript = hashlib.sha256(b"sevmigd/1 transcript" + hello_frame + accept_frame).digest()
    okm = HKDF(hashes.SHA256(), 80, salt=transcript, info=b"sevmigd/1 channel keys").derive(shared)
    assert okm[64:80].hex() == t["session_id"]
    start = bytes.fromhex(t["frames"][2]["hex"])[4:]
    assert hmac.new(okm[:32], start[:-34], hashlib.sha256).digest() == start[-32:]
    ready = next(bytes.fromhex(f["hex"])[4:] for f in t["frames"] if f["meaning"]["type"] == "Ready")
    assert hmac.new(okm[32:64], ready[:-34], hashlib.sha256).digest() == ready[-32:]


def test_frame_layout_of_a_small_message_by_hand():
    """RoundEnd(0, 3, 70000) at seq 3: 96 = fixarray(6), 06 type, 03 seq, 00 round, 03 pages,
    ce 00011170 remaining (uint32), c4 20 + MAC."""
    v = _load(VECTORS / "round_end.json")
    body = bytes.fromhex(v["hex"])[4:]
    assert body[:10] == bytes.fromhex("96060300" "03" "ce00011170")
