"""SEV/AMD certificate codecs and signature rules (reference §5.1, §5.2, §2.6) against real AMD vectors."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmigd.psp.certs import (
    SEV_CERT_SIZE,
    SEV_SIG1_OFFSET,
    SEV_SIG2_OFFSET,
    Algo,
    AmdCert,
    SevCert,
    Signer,
    Usage,
    ask_signer,
    decode_any,
    new_sev_cert,
    sev_signature_status,
    sev_signer,
    sign_sev_cert,
    verify_amd_cert,
    verify_sev_cert,
)
from sevmigd.psp.status import SevError, SevStatus

VECTORS = pathlib.Path(__file__).parent / "data" / "sev-vectors"
NAPLES = VECTORS / "naples"
GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")
REJECTED = {SevStatus.INVALID_CERTIFICATE, SevStatus.BAD_SIGNATURE}
EXAMPLES = int(os.environ.get("SEVMIGD_FUZZ_EXAMPLES", "200"))


def _naples(name: str) -> bytes:
    return (NAPLES / f"{name}.cert").read_bytes()


def _amd(gen: str, name: str) -> bytes:
    return (VECTORS / "builtin" / gen / f"{name}.cert").read_bytes()


@pytest.fixture(scope="module")
def naples():
    certs = {n: SevCert.decode(_naples(n)) for n in ("cek", "oca", "pek", "pdh")}
    certs["ark"] = AmdCert.decode(_amd("naples", "ark"))
    certs["ask"] = AmdCert.decode(_amd("naples", "ask"))
    return certs


# -- codecs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cek", "oca", "pek", "pdh"])
def test_sev_cert_round_trip_is_byte_exact(name):
    raw = _naples(name)
    cert = SevCert.decode(raw)
    assert cert.encode() == raw
    assert cert.body() == raw[:0x414]
    assert cert.version == 1 and cert.pubkey_usage == Usage[name.upper()]


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("name", ["ark", "ask"])
def test_amd_cert_round_trip_is_byte_exact(gen, name):
    raw = _amd(gen, name)
    cert = AmdCert.decode(raw)
    assert cert.encode() == raw
    assert len(raw) == (832 if gen == "naples" else 1600)
    assert cert.modulus_bits == (2048 if gen == "naples" else 4096)
    assert cert.key_usage == (Usage.ARK if name == "ark" else Usage.ASK)


def test_naples_fields_match_the_vector_readme(naples):
    assert naples["pdh"].pubkey_algo == Algo.ECDH_SHA256
    assert (naples["pek"].api_major, naples["pek"].api_minor) == (0, 16)
    assert (naples["cek"].sig1_usage, naples["cek"].sig1_algo) == (Usage.ASK, Algo.RSA_SHA256)
    assert naples["ark"].key_id.hex() == "1bb987c359494606b174945601c9ea5b"
    assert naples["ask"].key_id.hex() == "e139970cfc464377ae61b289e2f9e96e"
    assert naples["ask"].certifying_id == naples["ark"].key_id


def test_unsigned_naples_ark_needs_allow_unsigned():
    raw = (NAPLES / "ark.cert.bad").read_bytes()
    with pytest.raises(SevError) as exc:
        AmdCert.decode(raw)
    assert exc.value.status == SevStatus.INVALID_LENGTH
    ark = AmdCert.decode(raw, allow_unsigned=True)
    assert ark.signature is None and ark.encode() == raw
    sig = (NAPLES / "ark.cert.sig").read_bytes()
    assert ark.with_signature(sig).encode() == _amd("naples", "ark")


def test_wrong_sizes_are_invalid_length():
    with pytest.raises(SevError) as exc:
        SevCert.decode(bytes(SEV_CERT_SIZE - 1))
    assert exc.value.status == SevStatus.INVALID_LENGTH
    with pytest.raises(SevError) as exc:
        AmdCert.decode(_amd("rome", "ark")[:-1])
    assert exc.value.status == SevStatus.INVALID_LENGTH
    with pytest.raises(SevError) as exc:
        AmdCert.decode(b"\x01\0\0")
    assert exc.value.status == SevStatus.INVALID_LENGTH


def test_decode_any_dispatches_on_size():
    assert isinstance(decode_any(_naples("pek")), SevCert)
    assert isinstance(decode_any(_amd("milan", "ask")), AmdCert)


def test_ec_public_key_rejects_bad_curve_padding_and_point(naples):
    pdh = naples["pdh"]
    assert isinstance(pdh.ec_public_key(), ec.EllipticCurvePublicKey)
    union = bytearray(pdh.pubkey)
    bad_curve = bytes(struct.pack("<I", 1) + union[4:])
    bad_pad = bytes(union[:4 + 60] + bytes([1]) + union[4 + 61:])
    off_curve = bytes(union[:4] + bytes([union[4] ^ 1]) + union[5:])
    for pub in (bad_curve, bad_pad, off_curve):
        with pytest.raises(SevError) as exc:
            dataclasses.replace(pdh, pubkey=pub).ec_public_key()
        assert exc.value.status == SevStatus.INVALID_CERTIFICATE
    with pytest.raises(SevError) as exc:
        dataclasses.replace(pdh, pubkey_algo=Algo.RSA_SHA256).ec_public_key()
    assert exc.value.status == SevStatus.INVALID_CERTIFICATE


# -- signatures on the real vectors --------------------------------------------------------------


def test_naples_signatures_verify(naples):
    verify_amd_cert(naples["ark"], naples["ark"], "ARK")
    verify_amd_cert(naples["ask"], naples["ark"], "ASK")
    verify_sev_cert(naples["cek"], ask_signer(naples["ask"]))
    verify_sev_cert(naples["oca"], sev_signer(naples["oca"]))
    verify_sev_cert(naples["pek"], sev_signer(naples["oca"]))
    verify_sev_cert(naples["pek"], sev_signer(naples["cek"]))
    verify_sev_cert(naples["pdh"], sev_signer(naples["pek"]))


@pytest.mark.parametrize("gen", GENERATIONS)
def test_every_generation_ark_signs_ask(gen):
    ark, ask = AmdCert.decode(_amd(gen, "ark")), AmdCert.decode(_amd(gen, "ask"))
    verify_amd_cert(ark, ark, "ARK")
    verify_amd_cert(ask, ark, "ASK")
    # and the generations do not cross-verify
    other = AmdCert.decode(_amd("rome" if gen != "rome" else "milan", "ark"))
    with pytest.raises(SevError):
        verify_amd_cert(ask, other)


# -- the firmware's slot walk (§2.6) -------------------------------------------------------------


def test_slot_rules(naples):
    pek, oca, cek = naples["pek"], naples["oca"], naples["cek"]
    oca_s = sev_signer(oca)
    assert sev_signature_status(pek, oca_s) == SevStatus.SUCCESS
    # no matching slot → INVALID_CERTIFICATE
    assert sev_signature_status(pek, Signer(Usage.PDH, Algo.ECDSA_SHA256, lambda d, s: True)) \
        == SevStatus.INVALID_CERTIFICATE
    # matching slot that fails → BAD_SIGNATURE
    assert sev_signature_status(pek, Signer(Usage.OCA, Algo.ECDSA_SHA256, lambda d, s: False)) == SevStatus.BAD_SIGNATURE
    # last matching slot wins: duplicate the OCA slot into slot 2 with a bad signature...
    dup_bad = pek.with_slot(2, Usage.OCA, Algo.ECDSA_SHA256, bytes(0x200))
    assert sev_signature_status(dup_bad, oca_s) == SevStatus.BAD_SIGNATURE
    # ...and a bad slot 1 followed by a good slot 2 is SUCCESS
    good2 = pek.with_slot(2, pek.sig1_usage, pek.sig1_algo, pek.sig1).with_slot(1, Usage.OCA, Algo.ECDSA_SHA256, bytes(0x200))
    assert sev_signature_status(good2, oca_s) == SevStatus.SUCCESS
    # exactly one of usage/algo INVALID → BAD_SIGNATURE immediately, even before a good slot
    half = pek.with_slot(2, Usage.INVALID, Algo.ECDSA_SHA256, bytes(0x200))
    assert sev_signature_status(half, oca_s) == SevStatus.BAD_SIGNATURE
    half1 = pek.with_slot(1, Usage.PEK, Algo.INVALID, bytes(0x200))
    assert sev_signature_status(half1.with_slot(2, *oca_slot(pek)), oca_s) == SevStatus.BAD_SIGNATURE
    # the ASK slot needs the right algo: a 2K ASK is (0x13, RSA_SHA256); relabelling the slot breaks it
    relabel = cek.with_slot(1, Usage.ASK, Algo.RSA_SHA384, cek.sig1)
    assert sev_signature_status(relabel, ask_signer(naples["ask"])) == SevStatus.INVALID_CERTIFICATE


def oca_slot(pek):
    return pek.sig1_usage, pek.sig1_algo, pek.sig1


def test_ecdh_key_cannot_sign(naples):
    with pytest.raises(SevError) as exc:
        sev_signer(naples["pdh"])
    assert exc.value.status == SevStatus.INVALID_CERTIFICATE


def test_sign_then_verify_both_hashes():
    key = ec.generate_private_key(ec.SECP384R1())
    for algo in (Algo.ECDSA_SHA256, Algo.ECDSA_SHA384):
        cert = new_sev_cert(key.public_key(), usage=Usage.OCA, algo=algo, api_major=1, api_minor=55)
        cert = sign_sev_cert(cert, 1, key, Usage.OCA, algo)
        verify_sev_cert(cert, sev_signer(cert))
        assert SevCert.decode(cert.encode()) == cert


# -- tamper evidence: every single-byte change of a signed body or used slot is rejected -----------


def _flip(raw: bytes, i: int) -> bytes:
    b = bytearray(raw)
    b[i] ^= 0x01
    return bytes(b)


def _used_ranges(cert: SevCert, signer_usage: int, signer_algo: int) -> list[int]:
    positions = list(range(0x414))
    for off, (u, a, _s) in zip((SEV_SIG1_OFFSET, SEV_SIG2_OFFSET), cert.slots()):
        if (u, a) == (signer_usage, signer_algo):
            positions += range(off, off + 8 + 0x200)
    return positions


def _sev_tamper_status(raw: bytes, signer_of) -> SevStatus:
    try:
        cert = SevCert.decode(raw)
        verify_sev_cert(cert, signer_of(cert))
    except SevError as exc:
        return exc.status
    return SevStatus.SUCCESS


@pytest.mark.parametrize(
    "name,signer_name",
    [("cek", "ask"), ("oca", "oca"), ("pek", "oca"), ("pek", "cek"), ("pdh", "pek")],
)
def test_every_single_byte_tamper_of_sev_cert_is_rejected(naples, name, signer_name):
    raw = _naples(name)
    if signer_name == "ask":
        signer = ask_signer(naples["ask"])
        signer_of = lambda c: signer  # noqa: E731
    elif signer_name == name:  # self-signed: the tampered cert carries the signing key too
        signer_of = sev_signer
    else:
        signer = sev_signer(naples[signer_name])
        signer_of = lambda c: signer  # noqa: E731
    cert = SevCert.decode(raw)
    s = signer_of(cert)
    assert _sev_tamper_status(raw, signer_of) == SevStatus.SUCCESS
    accepted = []
    statuses = set()
    for i in _used_ranges(cert, s.usage, s.algo):
        st_ = _sev_tamper_status(_flip(raw, i), signer_of)
        statuses.add(st_)
        if st_ not in REJECTED:
            accepted.append((hex(i), st_))
    assert not accepted
    assert statuses == REJECTED  # both kinds occur (body → BAD_SIGNATURE, slot header → INVALID_CERTIFICATE)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_every_single_byte_tamper_of_amd_certs_is_rejected(gen):
    ark_raw, ask_raw = _amd(gen, "ark"), _amd(gen, "ask")
    ark = AmdCert.decode(ark_raw)

    def status(fn) -> SevStatus:
        try:
            fn()
        except SevError as exc:
            return exc.status
        return SevStatus.SUCCESS

    def ark_check(raw):
        t = AmdCert.decode(raw)
        verify_amd_cert(t, t)
        if t.key_usage != Usage.ARK:
            raise SevError(SevStatus.INVALID_CERTIFICATE)

    def ask_check(raw):
        t = AmdCert.decode(raw)
        verify_amd_cert(t, ark)
        if t.key_usage != Usage.ASK:
            raise SevError(SevStatus.INVALID_CERTIFICATE)

    assert status(lambda: ark_check(ark_raw)) == SevStatus.SUCCESS
    assert status(lambda: ask_check(ask_raw)) == SevStatus.SUCCESS
    accepted = []
    for raw, check in ((ark_raw, ark_check), (ask_raw, ask_check)):
        for i in range(len(raw)):
            st_ = status(lambda: check(_flip(raw, i)))
            if st_ not in REJECTED:
                accepted.append((check.__name__, i, st_))
    assert not accepted


# -- hostile input: decoders raise only SevError ---------------------------------------------------


def _only_sev_error(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except SevError:
        pass


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(st.binary(max_size=3000), st.binary(min_size=SEV_CERT_SIZE, max_size=SEV_CERT_SIZE)))
def test_sev_decoder_raises_only_sev_error(data):
    try:
        cert = SevCert.decode(data)
    except SevError:
        return
    assert cert.encode() == data
    _only_sev_error(cert.ec_public_key)
    _only_sev_error(sev_signer, cert)
    _only_sev_error(verify_sev_cert, cert, Signer(cert.sig1_usage, cert.sig1_algo, lambda d, s: False))
    cert.describe()


_amd_header = st.builds(
    lambda version, usage, e_bits, n_bits, rest: struct.pack("<I", version) + rest[:32]
    + struct.pack("<I", usage) + bytes(16) + struct.pack("<II", e_bits, n_bits),
    st.sampled_from([1, 1, 1, 2]),
    st.sampled_from([0, 0x13, 5]),
    st.sampled_from([2048, 4096, 1024]),
    st.sampled_from([2048, 4096, 3000]),
    st.binary(min_size=32, max_size=32),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_amd_header, st.sampled_from([512, 768, 1024, 1536, 100, 0]), st.booleans(), st.randoms())
def test_amd_decoder_raises_only_sev_error(header, body_len, allow_unsigned, rnd):
    data = header + rnd.randbytes(body_len)
    try:
        cert = AmdCert.decode(data, allow_unsigned=allow_unsigned)
    except SevError:
        return
    assert cert.encode() == data
    _only_sev_error(cert.rsa_public_key)
    _only_sev_error(verify_amd_cert, cert, cert)
    _only_sev_error(ask_signer, cert)
    cert.describe()


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2000))
def test_amd_decoder_arbitrary_bytes(data):
    for allow in (False, True):
        _only_sev_error(AmdCert.decode, data, allow_unsigned=allow)
        _only_sev_error(decode_any, data, allow_unsigned=allow)
