"""Chain rules: PDH sanity (§3.5), SEND_START validate_platform/validate_domain (§2.4 steps 5–6, §5.4),
and verify_platform_chain on the real Naples chain, all five ARK/ASK generations and emulated fleets."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmigd.psp.certs import Algo, AmdCert, SevCert, Usage, sign_amd_cert
from sevmigd.psp.chain import (
    ChainError,
    ark_key_hash,
    pdh_sanity_check,
    split_amd_certs,
    split_plat_certs,
    validate_domain,
    validate_platform,
    verify_platform_chain,
)
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.psp.status import SevError, SevStatus
from conftest import seeded_rng

VECTORS = pathlib.Path(__file__).parent / "data" / "sev-vectors"
NAPLES = VECTORS / "naples"
EXAMPLES = int(os.environ.get("SEVMIGD_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def fleet():
    ca = FleetCA.create(seeded_rng(1), rsa_bits=2048)
    other_ca = FleetCA.create(seeded_rng(2), rsa_bits=2048)
    a = PlatformIdentity.create(ca, seeded_rng(3))
    b = PlatformIdentity.create(ca, seeded_rng(4))
    stranger = PlatformIdentity.create(other_ca, seeded_rng(5))
    return ca, other_ca, a, b, stranger


@pytest.fixture(scope="module")
def naples():
    c = {n: SevCert.decode((NAPLES / f"{n}.cert").read_bytes()) for n in ("cek", "oca", "pek", "pdh")}
    c["ark"] = AmdCert.decode((VECTORS / "builtin/naples/ark.cert").read_bytes())
    c["ask"] = AmdCert.decode((VECTORS / "builtin/naples/ask.cert").read_bytes())
    c["ark_unsigned"] = AmdCert.decode((NAPLES / "ark.cert.bad").read_bytes(), allow_unsigned=True)
    return c


def status_of(fn, *args, **kw) -> SevStatus:
    try:
        fn(*args, **kw)
    except SevError as exc:
        return exc.status
    return SevStatus.SUCCESS


def flip(raw: bytes, i: int) -> bytes:
    b = bytearray(raw)
    b[i] ^= 1
    return bytes(b)


# -- PDH sanity ----------------------------------------------------------------------------------


def test_pdh_sanity_check(naples):
    raw = naples["pdh"].encode()
    assert isinstance(pdh_sanity_check(raw), ec.EllipticCurvePublicKey)
    pdh = naples["pdh"]
    assert status_of(pdh_sanity_check, raw[:-1]) == SevStatus.INVALID_LENGTH
    for bad in (
        dataclasses.replace(pdh, version=2),
        dataclasses.replace(pdh, pubkey_usage=Usage.PEK),
        dataclasses.replace(pdh, pubkey_algo=Algo.ECDH_SHA384),
        dataclasses.replace(pdh, pubkey=flip(pdh.pubkey, 4)),  # point off the curve
    ):
        assert status_of(pdh_sanity_check, bad.encode()) == SevStatus.INVALID_CERTIFICATE
    # the signature is not part of the sanity check
    assert status_of(pdh_sanity_check, pdh.without_signatures().encode()) == SevStatus.SUCCESS


def test_split_helpers(fleet):
    _ca, _o, a, _b, _s = fleet
    assert split_plat_certs(a.plat_certs()) == (a.pek.encode(), a.oca.encode(), a.cek.encode())
    assert split_amd_certs(a.amd_certs()) == (a.ask.encode(), a.ark.encode())
    assert status_of(split_plat_certs, a.plat_certs()[:-1]) == SevStatus.INVALID_LENGTH
    assert status_of(split_amd_certs, a.amd_certs() + b"\0") == SevStatus.INVALID_LENGTH


def test_ark_key_hash_is_sha384_of_signed_part(naples):
    import hashlib

    raw = (VECTORS / "builtin/naples/ark.cert").read_bytes()
    assert ark_key_hash(naples["ark"]) == hashlib.sha384(raw[:-256]).digest()
    assert ark_key_hash(naples["ark_unsigned"]) == ark_key_hash(naples["ark"])


# -- validate_platform (SEND_START SEV bit) --------------------------------------------------------


def _vp(ident: PlatformIdentity, *, root: AmdCert, amd=None, plat=None, pdh=None):
    return status_of(
        validate_platform,
        ident.amd_certs() if amd is None else amd,
        ident.plat_certs() if plat is None else plat,
        ident.pdh.encode() if pdh is None else pdh,
        root_key_id=root.key_id,
        root_key_hash=ark_key_hash(root),
    )


def test_validate_platform_accepts_real_naples_chain(naples):
    amd = naples["ask"].encode() + naples["ark"].encode()
    plat = naples["pek"].encode() + naples["oca"].encode() + naples["cek"].encode()
    validate_platform(amd, plat, naples["pdh"].encode(),
                      root_key_id=naples["ark"].key_id, root_key_hash=ark_key_hash(naples["ark"]))


def test_validate_platform_accepts_fleet_peers(fleet):
    ca, _o, a, b, _s = fleet
    assert _vp(a, root=ca.ark) == SevStatus.SUCCESS
    assert _vp(b, root=ca.ark) == SevStatus.SUCCESS


def test_validate_platform_statuses(fleet):
    ca, other, a, b, stranger = fleet
    s = SevStatus
    # lengths
    assert _vp(a, root=ca.ark, plat=a.plat_certs()[:-1]) == s.INVALID_LENGTH
    assert _vp(a, root=ca.ark, pdh=a.pdh.encode() + b"\0") == s.INVALID_LENGTH
    assert _vp(a, root=ca.ark, amd=a.amd_certs()[:-1]) == s.INVALID_LENGTH
    # the root: another fleet's ARK, wrong pinned hash, tampered self-signature
    assert _vp(stranger, root=ca.ark) == s.INVALID_CERTIFICATE
    assert status_of(validate_platform, a.amd_certs(), a.plat_certs(), a.pdh.encode(),
                     root_key_id=ca.ark.key_id, root_key_hash=bytes(48)) == s.INVALID_CERTIFICATE
    ark_raw = ca.ark.encode()
    assert _vp(a, root=ca.ark, amd=a.ask.encode() + flip(ark_raw, len(ark_raw) - 5)) == s.BAD_SIGNATURE
    assert _vp(a, root=ca.ark, amd=a.ask.encode() + flip(ark_raw, 0x50)) == s.INVALID_CERTIFICATE  # hash pin
    # ASK: another fleet's (certifying id), bad signature, wrong usage (validly signed)
    assert _vp(a, root=ca.ark, amd=other.ask.encode() + ca.ark.encode()) == s.INVALID_CERTIFICATE
    ask_raw = ca.ask.encode()
    assert _vp(a, root=ca.ark, amd=flip(ask_raw, len(ask_raw) - 1) + ark_raw) == s.BAD_SIGNATURE
    ask_as_ark = sign_amd_cert(dataclasses.replace(ca.ask, key_usage=0, signature=None), ca.ark_private, hashes.SHA256())
    assert _vp(a, root=ca.ark, amd=ask_as_ark.encode() + ark_raw) == s.INVALID_CERTIFICATE
    # CEK: unsigned (as PDH_CERT_EXPORT gives it), signed by another fleet, wrong usage
    unsigned_cek = a.pek.encode() + a.oca.encode() + a.cek.without_signatures().encode()
    assert _vp(a, root=ca.ark, plat=unsigned_cek) == s.INVALID_CERTIFICATE
    foreign_cek = a.pek.encode() + a.oca.encode() + stranger.cek.encode()
    assert _vp(a, root=ca.ark, plat=foreign_cek) == s.BAD_SIGNATURE
    swapped = a.oca.encode() + a.pek.encode() + a.cek.encode()  # OCA where the PEK goes
    assert _vp(a, root=ca.ark, plat=swapped) == s.INVALID_CERTIFICATE
    # PEK of a fleet peer under this CEK, PDH of a fleet peer under this PEK
    assert _vp(a, root=ca.ark, plat=b.pek.encode() + a.oca.encode() + a.cek.encode()) == s.BAD_SIGNATURE
    assert _vp(a, root=ca.ark, pdh=b.pdh.encode()) == s.BAD_SIGNATURE
    assert _vp(a, root=ca.ark, pdh=a.pek.encode()) == s.INVALID_CERTIFICATE
    # a slot with exactly one of usage/algo INVALID
    half = a.pdh.with_slot(2, Usage.INVALID, Algo.ECDSA_SHA256, bytes(0x200))
    assert _vp(a, root=ca.ark, pdh=half.encode()) == s.BAD_SIGNATURE


# -- validate_domain (SEND_START DOMAIN bit) -------------------------------------------------------


def test_validate_domain_statuses(fleet):
    _ca, _o, a, b, _s = fleet
    s = SevStatus
    vd = lambda plat, pdh, oca: status_of(validate_domain, plat, pdh, oca)  # noqa: E731
    assert vd(a.plat_certs(), a.pdh.encode(), a.oca.encode()) == s.SUCCESS
    # a different owner (OCA) is a policy failure, after the signatures check out
    assert vd(a.plat_certs(), a.pdh.encode(), b.oca.encode()) == s.POLICY_FAILURE
    assert vd(a.plat_certs()[:-1], a.pdh.encode(), a.oca.encode()) == s.INVALID_LENGTH
    assert vd(a.plat_certs(), a.pdh.encode()[:-1], a.oca.encode()) == s.INVALID_LENGTH
    oca_raw = a.oca.encode()
    tampered_oca = flip(oca_raw, 0x20)
    plat = a.pek.encode() + tampered_oca + a.cek.encode()
    assert vd(plat, a.pdh.encode(), tampered_oca) in {s.BAD_SIGNATURE, s.INVALID_CERTIFICATE}
    assert vd(b.pek.encode() + a.oca.encode() + a.cek.encode(), a.pdh.encode(), a.oca.encode()) == s.BAD_SIGNATURE
    assert vd(a.plat_certs(), b.pdh.encode(), a.oca.encode()) == s.BAD_SIGNATURE
    # the CEK is not looked at by the domain check
    assert vd(a.pek.encode() + a.oca.encode() + bytes(0x824), a.pdh.encode(), a.oca.encode()) == s.SUCCESS


# -- verify_platform_chain ------------------------------------------------------------------------


def _chain(x, **over):
    parts = dict(ark=x.ark, ask=x.ask, cek=x.cek, oca=x.oca, pek=x.pek, pdh=x.pdh)
    parts.update(over)
    return parts


def _vpc(parts, **kw):
    return verify_platform_chain(parts["ark"], parts["ask"], parts["cek"], parts["oca"], parts["pek"], parts["pdh"], **kw)


def test_naples_chain_verifies(naples):
    report = _vpc(naples)
    assert [n for n, _ in report.links] == [
        "ARK -> ARK", "ARK -> ASK", "ASK -> CEK", "OCA -> OCA", "OCA -> PEK", "CEK -> PEK", "PEK -> PDH"]
    assert all(st_ == SevStatus.SUCCESS for _, st_ in report.links)
    assert report.ark_self_signed and not report.ark_pinned
    assert _vpc(naples, trusted_arks=[naples["ark"]]).ark_pinned


def test_unsigned_naples_ark(naples):
    parts = dict(naples, ark=naples["ark_unsigned"])
    with pytest.raises(ChainError) as exc:
        _vpc(parts)
    assert exc.value.link == "ARK -> ARK"
    assert exc.value.status == SevStatus.INVALID_CERTIFICATE
    assert "lacks its self-signature" in str(exc.value) and "ark.cert.sig" in str(exc.value)
    # pinned by key id + modulus: the pin is the trust
    report = _vpc(parts, trusted_arks=[naples["ark"]])
    assert report.ark_pinned and not report.ark_self_signed
    # a pin on another root does not help
    rome = AmdCert.decode((VECTORS / "builtin/rome/ark.cert").read_bytes())
    with pytest.raises(ChainError) as exc:
        _vpc(parts, trusted_arks=[rome])
    assert exc.value.link == "ARK pinned"


def test_pin_compares_modulus_not_just_key_id(naples, fleet):
    ca = fleet[0]
    impostor = dataclasses.replace(ca.ark, key_id=naples["ark"].key_id)
    with pytest.raises(ChainError) as exc:
        _vpc(naples, trusted_arks=[impostor])
    assert exc.value.link == "ARK pinned"


@pytest.mark.parametrize(
    "swap,link,status",
    [
        ("ask", "ARK -> ASK", SevStatus.INVALID_CERTIFICATE),
        ("cek", "ASK -> CEK", SevStatus.BAD_SIGNATURE),
        ("oca", "OCA -> PEK", SevStatus.BAD_SIGNATURE),
        ("pek", "OCA -> PEK", SevStatus.BAD_SIGNATURE),
        ("pdh", "PEK -> PDH", SevStatus.BAD_SIGNATURE),
    ],
)
def test_chain_names_the_failing_link(fleet, swap, link, status):
    ca, other, a, b, stranger = fleet
    donor = stranger if swap in ("ask", "cek") else b
    parts = _chain(a, **{swap: getattr(donor, swap)})
    with pytest.raises(ChainError) as exc:
        _vpc(parts, trusted_arks=[ca.ark])
    assert (exc.value.link, exc.value.status) == (link, status)
    assert isinstance(exc.value, SevError)


def test_chain_pek_cek_link_and_root_checks(fleet):
    ca, other, a, b, stranger = fleet
    # a PEK validly signed by a's OCA but by b's CEK: only the CEK link fails
    from sevmigd.psp.certs import sign_sev_cert

    pek = sign_sev_cert(a.pek, 2, b.cek_private, Usage.CEK, Algo.ECDSA_SHA256)
    with pytest.raises(ChainError) as exc:
        _vpc(_chain(a, pek=pek))
    assert (exc.value.link, exc.value.status) == ("CEK -> PEK", SevStatus.BAD_SIGNATURE)
    with pytest.raises(ChainError) as exc:
        _vpc(_chain(a), trusted_arks=[other.ark])
    assert exc.value.link == "ARK pinned"
    bad_ark = a.ark.with_signature(flip(a.ark.signature, 3))
    with pytest.raises(ChainError) as exc:
        _vpc(_chain(a, ark=bad_ark))
    assert (exc.value.link, exc.value.status) == ("ARK -> ARK", SevStatus.BAD_SIGNATURE)
    # the whole chain of a fleet peer verifies under the fleet root
    assert len(_vpc(_chain(b), trusted_arks=[ca.ark, other.ark]).links) == 8


# -- hostile input ------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(st.binary(max_size=2200), st.binary(min_size=0x824, max_size=0x824)))
def test_pdh_sanity_check_raises_only_sev_error(data):
    status_of(pdh_sanity_check, data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_validators_raise_only_sev_error_on_mutated_chains(fleet, data):
    ca, _o, a, _b, _s = fleet
    parts = [bytearray(a.amd_certs()), bytearray(a.plat_certs()), bytearray(a.pdh.encode())]
    for _ in range(data.draw(st.integers(1, 4))):
        which = data.draw(st.integers(0, 2))
        buf = parts[which]
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    amd, plat, pdh = (bytes(p) for p in parts)
    status_of(validate_platform, amd, plat, pdh, root_key_id=ca.ark.key_id, root_key_hash=ark_key_hash(ca.ark))
    status_of(validate_domain, plat, pdh, a.oca.encode())
