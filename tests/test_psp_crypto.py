"""SEV channel crypto (sevmigd.psp.crypto): known answers from tests/data/sev-vectors, session and packet
round trips, every tamper → BAD_MEASUREMENT, and batch forms byte-identical to single operations."""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import random
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmigd.psp import crypto
from sevmigd.psp.status import SevError, SevStatus

VECTORS = pathlib.Path(__file__).parent / "data" / "sev-vectors"
DERIVED = json.loads((VECTORS / "send_receive_derived.json").read_text())
H = bytes.fromhex


# --- README known answers ---------------------------------------------------------------------------

def test_kdf_master_kek_kik_known_answers():
    master = crypto.kdf(bytes(16), b"sev-master-secret", bytes(16), 16)
    assert master == H("ab4d269fcc62bedb4511d56c386ce706")
    assert crypto.derive_master(bytes(16), bytes(16)) == master
    assert crypto.derive_kek(master) == H("b6abfbfb75ea1ea74ed8750b8afdb973")
    assert crypto.derive_kik(master) == H("53b524bf5669a363f365c864acba8572")


def test_kdf_is_little_endian_sp800_108():
    # Independent restatement of reference §3.1 for a two-block output.
    key, label, ctx = b"k" * 16, b"lbl", b"ctx"
    expect = b"".join(
        hmac.digest(key, struct.pack("<I", i) + label + b"\0" + ctx + struct.pack("<I", 48 * 8), "sha256")
        for i in (1, 2))[:48]
    assert crypto.kdf(key, label, ctx, 48) == expect


def test_session_blob_known_answer():
    blob = crypto.build_session(bytes(16), tek=bytes(16), tik=bytes(16), nonce=bytes(16),
                                wrap_iv=bytes(16), policy=0)
    s = crypto.Session.decode(blob)
    assert s.wrap_tk == H("2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4")
    assert s.wrap_mac == H("3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d")
    assert s.policy_mac == H("aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")
    assert len(blob) == 0x80 and s.encode() == blob


def test_policy_mac_is_hmac_of_le32_policy():
    assert crypto.hmac_sha256(bytes(16), H("00000000")) == H(
        "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")
    assert crypto.policy_mac(bytes(16), 0) == crypto.hmac_sha256(bytes(16), bytes(4))


def test_launch_measure_known_answer():
    m = crypto.launch_measure(H("66320db73158a35a255d051758e95ed4"), api_major=0, api_minor=0x12, build=0x0F,
                              policy=0, digest=hashlib.sha256(b"").digest(),
                              mnonce=H("4fbe0bedbad6c86ae8f68971d103e554"))
    assert m == H("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")


# --- derived send/receive vector ----------------------------------------------------------------------

def _key(hex_be: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(hex_be, 16), ec.SECP384R1())


def _le72(v: int) -> str:
    return (v.to_bytes(48, "big")[::-1] + bytes(24)).hex()


def test_derived_vector_public_keys_and_ecdh():
    src, dst = _key(DERIVED["d_src_be"]), _key(DERIVED["d_dst_be"])
    for k, name in ((src, "src"), (dst, "dst")):
        nums = k.public_key().public_numbers()
        assert _le72(nums.x) == DERIVED[f"{name}_pdh_pub_x_le72"]
        assert _le72(nums.y) == DERIVED[f"{name}_pdh_pub_y_le72"]
    z = crypto.ecdh_z(src, dst.public_key())
    assert z == H(DERIVED["ecdh_Z_x_bigendian48"]) and len(z) == 48
    assert crypto.ecdh_z(dst, src.public_key()) == z


def test_derived_vector_keys_and_session():
    z = H(DERIVED["ecdh_Z_x_bigendian48"])
    nonce, wrap_iv = H(DERIVED["nonce"]), H(DERIVED["wrap_iv"])
    tek, tik = H(DERIVED["tek"]), H(DERIVED["tik"])
    master = crypto.derive_master(z, nonce)
    assert master == H(DERIVED["master_secret"])
    assert crypto.derive_kek(master) == H(DERIVED["kek"])
    assert crypto.derive_kik(master) == H(DERIVED["kik"])
    policy = struct.unpack("<I", H(DERIVED["policy_le32"]))[0]
    blob = crypto.build_session(z, tek=tek, tik=tik, nonce=nonce, wrap_iv=wrap_iv, policy=policy)
    assert blob == H(DERIVED["session_blob_0x80"])
    s = crypto.Session.decode(blob)
    assert (s.wrap_tk, s.wrap_mac, s.policy_mac) == (
        H(DERIVED["wrap_tk"]), H(DERIVED["wrap_mac"]), H(DERIVED["policy_mac"]))
    assert crypto.open_session(z, blob) == (tek, tik)
    crypto.verify_policy_mac(tik, blob, policy)


def test_derived_vector_packet():
    pk = DERIVED["packet"]
    tek, tik = H(DERIVED["tek"]), H(DERIVED["tik"])
    iv, pt = H(pk["iv"]), H(pk["plaintext"])
    assert crypto.packet_aad(pk["channel_ctx"], pk["flags"], iv, len(pt), len(pt)) == H(pk["aad_29_bytes"])
    hdr, ct = crypto.packet_seal(tek, tik, iv, pt, ctx=pk["channel_ctx"])
    assert ct == H(pk["ciphertext"])
    assert hdr == H(pk["header_52_bytes"]) and hdr[20:] == H(pk["mac"])
    assert crypto.packet_open(tek, tik, hdr, ct) == pt


# --- session round trip and tamper ---------------------------------------------------------------------

def _session(policy=0x5):
    z = bytes(range(48))
    tek, tik = b"T" * 16, b"I" * 16
    return z, tek, tik, crypto.build_session(z, tek=tek, tik=tik, nonce=b"N" * 16, wrap_iv=b"W" * 16,
                                             policy=policy)


def test_session_round_trip():
    z, tek, tik, blob = _session()
    assert crypto.open_session(z, blob) == (tek, tik)
    crypto.verify_policy_mac(tik, blob, 0x5)


@pytest.mark.parametrize("offset", [0, 15, 0x10, 0x2F, 0x30, 0x3F, 0x40, 0x5F])
def test_session_tamper_in_wrapped_part_is_bad_measurement(offset):
    z, _tek, _tik, blob = _session()
    bad = bytearray(blob)
    bad[offset] ^= 0x01
    # NONCE changes the KDF; WRAP_TK / WRAP_MAC break WRAP_MAC; WRAP_IV unwraps to other keys, whose
    # POLICY_MAC then fails.
    with pytest.raises(SevError) as ei:
        tek, tik = crypto.open_session(z, bytes(bad))
        crypto.verify_policy_mac(tik, bytes(bad), 0x5)
    assert ei.value.status == SevStatus.BAD_MEASUREMENT


@pytest.mark.parametrize("offset", [0x60, 0x7F])
def test_policy_mac_tamper_is_bad_measurement(offset):
    z, _tek, _tik, blob = _session()
    bad = bytearray(blob)
    bad[offset] ^= 0x80
    tek, tik = crypto.open_session(z, bytes(bad))
    with pytest.raises(SevError) as ei:
        crypto.verify_policy_mac(tik, bytes(bad), 0x5)
    assert ei.value.status == SevStatus.BAD_MEASUREMENT


def test_other_policy_or_other_z_is_bad_measurement():
    z, _tek, tik, blob = _session()
    with pytest.raises(SevError) as ei:
        crypto.verify_policy_mac(tik, blob, 0x4)
    assert ei.value.status == SevStatus.BAD_MEASUREMENT
    with pytest.raises(SevError) as ei:
        crypto.open_session(bytes(48), blob)
    assert ei.value.status == SevStatus.BAD_MEASUREMENT


def test_session_wrong_size_is_invalid_length():
    with pytest.raises(SevError) as ei:
        crypto.Session.decode(bytes(0x7F))
    assert ei.value.status == SevStatus.INVALID_LENGTH


# --- packets --------------------------------------------------------------------------------------------

def test_packet_matches_independent_aes_ctr_and_hmac():
    tek, tik, iv = b"k" * 16, b"i" * 16, bytes(range(16))
    pt = bytes(range(256)) * 16
    hdr, ct = crypto.packet_seal(tek, tik, iv, pt)
    enc = Cipher(algorithms.AES(tek), modes.CTR(iv)).encryptor()
    assert ct == enc.update(pt) + enc.finalize()
    aad = bytes([2]) + bytes(4) + iv + struct.pack("<II", len(pt), len(pt))
    assert hdr == bytes(4) + iv + hmac.digest(tik, aad + ct, "sha256")


def test_launch_secret_mac_appends_measure():
    tek, tik, iv, measure = b"k" * 16, b"i" * 16, b"v" * 16, b"M" * 32
    pt = b"secret!!" * 4
    hdr, ct = crypto.packet_seal(tek, tik, iv, pt, ctx=crypto.CTX_LAUNCH_SECRET, measure=measure)
    aad = bytes([1]) + bytes(4) + iv + struct.pack("<II", 32, 32)
    assert hdr[20:] == hmac.digest(tik, aad + ct + measure, "sha256")
    assert crypto.packet_open(tek, tik, hdr, ct, ctx=crypto.CTX_LAUNCH_SECRET, measure=measure) == pt
    with pytest.raises(SevError):
        crypto.packet_open(tek, tik, hdr, ct, ctx=crypto.CTX_LAUNCH_SECRET, measure=b"m" * 32)


@pytest.mark.parametrize("where", ["flags", "iv", "mac", "ct_first", "ct_last"])
def test_packet_tamper_is_bad_measurement(where):
    tek, tik = b"k" * 16, b"i" * 16
    hdr, ct = crypto.packet_seal(tek, tik, b"v" * 16, b"p" * 4096)
    hdr, ct = bytearray(hdr), bytearray(ct)
    {"flags": lambda: hdr.__setitem__(1, hdr[1] ^ 1), "iv": lambda: hdr.__setitem__(4, hdr[4] ^ 1),
     "mac": lambda: hdr.__setitem__(51, hdr[51] ^ 1), "ct_first": lambda: ct.__setitem__(0, ct[0] ^ 1),
     "ct_last": lambda: ct.__setitem__(4095, ct[4095] ^ 1)}[where]()
    with pytest.raises(SevError) as ei:
        crypto.packet_open(tek, tik, bytes(hdr), bytes(ct))
    assert ei.value.status == SevStatus.BAD_MEASUREMENT


# --- batch == single -------------------------------------------------------------------------------------

CARRY_IVS = [
    bytes(8) + b"\xff" * 8,                      # low 64 bits = 2^64-1: carry into the high half at once
    bytes(8) + b"\xff" * 7 + b"\x80",            # carry in the middle of the page
    b"\x00" * 7 + b"\x01" + b"\xff" * 7 + b"\xf0",
    b"\xff" * 16,                                # 2^128-1: wraps to zero
    b"\xff" * 15 + b"\x10",                      # wraps to zero mid-page
    b"\x12" * 16,
]


def _rand_ivs(rnd: random.Random, n: int) -> bytes:
    return b"".join(CARRY_IVS[i] if i < len(CARRY_IVS) else rnd.randbytes(16) for i in range(n))


@pytest.mark.parametrize("n", [1, 6, 17, 40])
def test_seal_batch_equals_single_packets(n):
    rnd = random.Random(n)
    tek, tik = rnd.randbytes(16), rnd.randbytes(16)
    ivs = _rand_ivs(rnd, n)
    pt = rnd.randbytes(n * 4096)
    ch = crypto.TransportKeys(tek, tik)
    headers, ct = ch.seal_batch(ivs, pt, 4096)
    for i in range(n):
        iv = ivs[16 * i:16 * i + 16]
        h1, c1 = crypto.packet_seal(tek, tik, iv, pt[4096 * i:4096 * (i + 1)])
        enc = Cipher(algorithms.AES(tek), modes.CTR(iv)).encryptor()   # OpenSSL's own 128-bit counter
        assert c1 == enc.update(pt[4096 * i:4096 * (i + 1)]) + enc.finalize()
        assert headers[52 * i:52 * (i + 1)] == h1
        assert ct[4096 * i:4096 * (i + 1)] == c1
    assert crypto.open_batch(tek, tik, headers, ct, 4096) == pt
    assert ch.decrypt_batch(headers, ct, 4096, n) == pt


def test_open_batch_reports_first_bad_packet():
    rnd = random.Random(7)
    tek, tik = rnd.randbytes(16), rnd.randbytes(16)
    headers, ct = crypto.seal_batch(tek, tik, _rand_ivs(rnd, 5), rnd.randbytes(5 * 4096), 4096)
    bad = bytearray(ct)
    bad[3 * 4096 + 100] ^= 1
    bad[4 * 4096] ^= 1
    with pytest.raises(SevError) as ei:
        crypto.open_batch(tek, tik, headers, bytes(bad), 4096)
    assert ei.value.status == SevStatus.BAD_MEASUREMENT and ei.value.index == 3
    assert crypto.TransportKeys(tek, tik).verify_batch(headers, bytes(bad), 4096) == 3


@settings(max_examples=100, deadline=None)
@given(iv=st.binary(min_size=16, max_size=16), blocks=st.integers(1, 300))
def test_counter_blocks_match_integer_arithmetic(iv, blocks):
    got = crypto.ctr_counter_blocks(iv, blocks)
    base = int.from_bytes(iv, "big")
    assert got == b"".join(((base + j) % (1 << 128)).to_bytes(16, "big") for j in range(blocks))


def test_reprs_hide_keys():
    tek, tik = b"\xaa" * 16, b"\xbb" * 16
    for obj in (crypto.TransportKeys(tek, tik), crypto.HmacSha256(tik)):
        r = repr(obj)
        assert "aa" * 4 not in r and "bb" * 4 not in r and "hidden" in r
    _z, _t, _i, blob = _session()
    assert crypto.Session.decode(blob).wrap_tk.hex() not in repr(crypto.Session.decode(blob))
