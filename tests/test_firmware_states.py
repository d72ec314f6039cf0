"""Every firmware command × every guest state and platform state (reference §2.4, §2.5): a command in a
wrong guest state fails with INVALID_GUEST_STATE, in a wrong platform state with INVALID_PLATFORM_STATE,
and checks run in the firmware's order. Inputs are otherwise valid so that the check under test is the one
that fails."""

from __future__ import annotations


import pytest

from sevmigd.psp import crypto
from sevmigd.psp.firmware import Firmware, GuestState, PlatformState
from sevmigd.psp.identity import FleetCA, FleetOwner, PlatformIdentity
from sevmigd.psp.memengine import PAGE_SIZE
from sevmigd.psp.policy import Policy
from sevmigd.psp.status import SevError, SevStatus
from conftest import seeded_rng

LIVE_STATES = [GuestState.LUPDATE, GuestState.LSECRET, GuestState.RUNNING, GuestState.SUPDATE,
               GuestState.RUPDATE, GuestState.SENT]


@pytest.fixture(scope="module")
def idents():
    ca = FleetCA.create(seeded_rng(101), rsa_bits=2048)
    return PlatformIdentity.create(ca, seeded_rng(102)), PlatformIdentity.create(ca, seeded_rng(103))


def _session_from(peer: PlatformIdentity, me: PlatformIdentity, policy: int) -> bytes:
    """What the peer's SEND_START would produce for `me` (client side with the peer's PDH key)."""
    z = crypto.ecdh_z(peer.pdh_private, me.pdh.ec_public_key())
    return crypto.build_session(z, tek=b"t" * 16, tik=b"i" * 16, nonce=b"n" * 16, wrap_iv=b"w" * 16, policy=policy)


def guest_in(state: GuestState, idents, policy=Policy.ES) -> tuple[Firmware, int]:
    peer, me = idents
    fw = Firmware(me, rng=seeded_rng(int(state)))
    fw.init()
    if state == GuestState.RUPDATE:
        h = fw.receive_start(policy=policy, pdh_cert=peer.pdh.encode(), session=_session_from(peer, me, policy))
    else:
        h = fw.launch_start(policy=policy)
    fw.activate(h, 1)
    fw.map_guest_memory(h, bytearray(2 * PAGE_SIZE), bytearray(4096))
    if state == GuestState.RUPDATE or state == GuestState.LUPDATE:
        pass
    else:
        fw.launch_measure(h)
        if state != GuestState.LSECRET:
            fw.launch_finish(h)
        if state in (GuestState.SUPDATE, GuestState.SENT):
            fw.send_start(h, pdh_cert=peer.pdh.encode(), plat_certs=peer.plat_certs(), amd_certs=peer.amd_certs())
        if state == GuestState.SENT:
            fw.send_finish(h)
    assert fw.guest_status(h).state == state
    return fw, h


HDR = bytes(0x34)


def _cmds(idents):
    peer, _me = idents
    return {
        "launch_update_data": (GuestState.LUPDATE, lambda fw, h: fw.launch_update_data(h, 0, 16)),
        "launch_update_vmsa": (GuestState.LUPDATE, lambda fw, h: fw.launch_update_vmsa(h)),
        "launch_measure": (GuestState.LUPDATE, lambda fw, h: fw.launch_measure(h)),
        "launch_secret": (GuestState.LSECRET, lambda fw, h: fw.launch_secret(h, HDR, 0, bytes(16))),
        "launch_finish": (GuestState.LSECRET, lambda fw, h: fw.launch_finish(h)),
        "send_start": (GuestState.RUNNING, lambda fw, h: fw.send_start(
            h, pdh_cert=peer.pdh.encode(), plat_certs=peer.plat_certs(), amd_certs=peer.amd_certs())),
        "send_update_data": (GuestState.SUPDATE, lambda fw, h: fw.send_update_data(h, 0, 16)),
        "send_update_data_batch": (GuestState.SUPDATE, lambda fw, h: fw.send_update_data_batch(h, [0, 1])),
        "send_update_vmsa": (GuestState.SUPDATE, lambda fw, h: fw.send_update_vmsa(h)),
        "send_finish": (GuestState.SUPDATE, lambda fw, h: fw.send_finish(h)),
        "send_cancel": (GuestState.SUPDATE, lambda fw, h: fw.send_cancel(h)),
        "receive_update_data": (GuestState.RUPDATE, lambda fw, h: fw.receive_update_data(h, HDR, 0, bytes(16))),
        "receive_update_data_batch": (GuestState.RUPDATE, lambda fw, h: fw.receive_update_data_batch(
            h, [0], HDR, bytes(PAGE_SIZE))),
        "receive_update_vmsa": (GuestState.RUPDATE, lambda fw, h: fw.receive_update_vmsa(h, HDR, bytes(4096))),
        "receive_finish": (GuestState.RUPDATE, lambda fw, h: fw.receive_finish(h)),
    }


COMMANDS = ["launch_update_data", "launch_update_vmsa", "launch_measure", "launch_secret", "launch_finish",
            "send_start", "send_update_data", "send_update_data_batch", "send_update_vmsa", "send_finish",
            "send_cancel", "receive_update_data", "receive_update_data_batch", "receive_update_vmsa",
            "receive_finish"]


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("command", COMMANDS)
def test_command_in_every_guest_state(idents, command, state):
    legal, call = _cmds(idents)[command]
    fw, h = guest_in(state, idents)
    if state == legal:
        try:
            call(fw, h)
        except SevError as exc:      # may fail later (e.g. zero header → BAD_MEASUREMENT), never on state
            assert exc.status != SevStatus.INVALID_GUEST_STATE
    else:
        with pytest.raises(SevError) as ei:
            call(fw, h)
        assert ei.value.status == SevStatus.INVALID_GUEST_STATE
        assert fw.guest_status(h).state == state            # a refused command changes nothing


def test_every_command_is_covered():
    names = {n for n in dir(Firmware) if not n.startswith("_")}
    state_independent = {"activate", "deactivate", "decommission", "guest_status", "dbg_decrypt", "dbg_encrypt"}
    platform = {"init", "shutdown", "pdh_cert_export", "pek_gen", "pdh_gen", "launch_start", "receive_start",
                "platform_reset", "platform_status", "pek_csr", "pek_cert_import", "get_id",
                "df_flush"}
    extras = {"map_guest_memory", "memory_engine", "launch_digest", "take_pacing_debt", "platform_state",
              "guest_count", "wbinvd",
              # persistence (issue 17): tests/test_psp_persist.py
              "export_guest", "import_guest", "key_slot", "export_flush_state", "import_flush_state",
              "take_changes", "changes_pending", "has_guest", "handles", "asids_awaiting_flush"}
    assert names == set(COMMANDS) | state_independent | platform | extras


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
def test_state_independent_commands_in_every_live_state(idents, state):
    fw, h = guest_in(state, idents, policy=Policy.ES)
    st = fw.guest_status(h)
    assert st.state == state and st.asid == 1 and st.policy == Policy.ES
    fw.dbg_encrypt(h, 32, b"x" * 16)
    assert fw.dbg_decrypt(h, 32, 16) == b"x" * 16
    fw.deactivate(h)
    fw.activate(h, 2)
    fw.deactivate(h)
    fw.decommission(h)
    with pytest.raises(SevError) as ei:
        fw.guest_status(h)
    assert ei.value.status == SevStatus.INVALID_PLATFORM_STATE     # last guest gone: platform INIT


# --- platform states --------------------------------------------------------------------------------------------

def _platform_cmds(idents):
    peer, me = idents
    session = _session_from(peer, me, 0)
    cmds = {name: (lambda fw, c=call: c(fw, 1)) for name, (_s, call) in _cmds(idents).items()}
    cmds.update({
        "activate": lambda fw: fw.activate(1, 1),
        "deactivate": lambda fw: fw.deactivate(1),
        "decommission": lambda fw: fw.decommission(1),
        "guest_status": lambda fw: fw.guest_status(1),
        "dbg_decrypt": lambda fw: fw.dbg_decrypt(1, 0, 16),
        "dbg_encrypt": lambda fw: fw.dbg_encrypt(1, 0, bytes(16)),
        "launch_start": lambda fw: fw.launch_start(policy=0),
        "receive_start": lambda fw: fw.receive_start(policy=0, pdh_cert=peer.pdh.encode(), session=session),
        "pdh_cert_export": lambda fw: fw.pdh_cert_export(),
        "pdh_gen": lambda fw: fw.pdh_gen(),
        "pek_gen": lambda fw: fw.pek_gen(),
        "pek_csr": lambda fw: fw.pek_csr(),
        "pek_cert_import": lambda fw: fw.pek_cert_import(_OWNER.sign_pek(fw.identity.pek_csr()).encode(),
                                                         _OWNER.oca.encode()),
        "platform_reset": lambda fw: fw.platform_reset(),
        "platform_status": lambda fw: fw.platform_status(),
        "get_id": lambda fw: fw.get_id(),
    })
    return cmds


_OWNER = FleetOwner.create(seeded_rng(104))


ALLOWED = {   # platform states each command accepts (reference §2.4, §2.5)
    "launch_start": {PlatformState.INIT, PlatformState.WORKING},
    "receive_start": {PlatformState.INIT, PlatformState.WORKING},
    "pdh_cert_export": {PlatformState.INIT, PlatformState.WORKING},
    "pdh_gen": {PlatformState.INIT, PlatformState.WORKING},
    "pek_gen": {PlatformState.INIT},
    "pek_csr": {PlatformState.INIT, PlatformState.WORKING},
    "pek_cert_import": {PlatformState.INIT},
    "platform_reset": {PlatformState.UNINIT},
    "platform_status": {PlatformState.UNINIT, PlatformState.INIT, PlatformState.WORKING},
    "get_id": {PlatformState.UNINIT, PlatformState.INIT, PlatformState.WORKING},
}
OWNERSHIP_CMDS = ["pek_csr", "pek_cert_import", "platform_reset", "platform_status", "get_id"]
ALL_PLATFORM_CMDS = COMMANDS + ["activate", "deactivate", "decommission", "guest_status", "dbg_decrypt",
                                "dbg_encrypt", "launch_start", "receive_start", "pdh_cert_export", "pdh_gen",
                                "pek_gen"] + OWNERSHIP_CMDS


@pytest.mark.parametrize("pstate", [PlatformState.UNINIT, PlatformState.INIT], ids=lambda s: s.name)
@pytest.mark.parametrize("command", ALL_PLATFORM_CMDS)
def test_command_in_uninit_and_init_platform(idents, command, pstate):
    fw = Firmware(idents[1], rng=seeded_rng(7))
    if pstate == PlatformState.INIT:
        fw.init()
    call = _platform_cmds(idents)[command]
    allowed = ALLOWED.get(command, {PlatformState.WORKING})
    if pstate in allowed:
        call(fw)
    else:
        with pytest.raises(SevError) as ei:
            call(fw)
        assert ei.value.status == SevStatus.INVALID_PLATFORM_STATE
        assert fw.platform_state == pstate


def test_pek_gen_refused_while_working(idents):
    fw, _h = guest_in(GuestState.RUNNING, idents)
    with pytest.raises(SevError) as ei:
        fw.pek_gen()
    assert ei.value.status == SevStatus.INVALID_PLATFORM_STATE


@pytest.mark.parametrize("command", OWNERSHIP_CMDS)
def test_ownership_command_in_working_platform(idents, command):
    """WORKING (a guest exists): PEK_CSR, PLATFORM_STATUS, GET_ID work; PEK_CERT_IMPORT and
    PLATFORM_RESET are refused with INVALID_PLATFORM_STATE and change nothing."""
    fw, h = guest_in(GuestState.RUNNING, idents)
    before = fw.identity
    call = _platform_cmds(idents)[command]
    if PlatformState.WORKING in ALLOWED[command]:
        call(fw)
    else:
        _expect(SevStatus.INVALID_PLATFORM_STATE, lambda: call(fw))
    assert fw.identity is before and fw.platform_state == PlatformState.WORKING
    assert fw.guest_status(h).state == GuestState.RUNNING


def test_platform_transitions(idents):
    fw = Firmware(idents[1], rng=seeded_rng(8))
    assert fw.platform_state == PlatformState.UNINIT
    fw.init()
    assert fw.platform_state == PlatformState.INIT
    h = fw.launch_start(policy=0)
    assert fw.platform_state == PlatformState.WORKING
    fw.decommission(h)
    assert fw.platform_state == PlatformState.INIT
    fw.launch_start(policy=0)
    fw.shutdown()
    assert fw.platform_state == PlatformState.UNINIT and fw.guest_count == 0


# --- order of checks ----------------------------------------------------------------------------------------------

def _expect(status, fn):
    with pytest.raises(SevError) as ei:
        fn()
    assert ei.value.status == status, ei.value


def test_send_start_check_order(idents):
    peer, _ = idents
    args = dict(pdh_cert=peer.pdh.encode(), plat_certs=peer.plat_certs(), amd_certs=peer.amd_certs())
    fw, h = guest_in(GuestState.LUPDATE, idents, policy=Policy.NOSEND)
    _expect(SevStatus.INVALID_GUEST, lambda: fw.send_start(99, session_len=0, **args))      # 1 handle
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.send_start(h, session_len=0, **args))      # 2 session_len
    _expect(SevStatus.INVALID_GUEST_STATE, lambda: fw.send_start(h, **args))                # 3 state
    fw.launch_measure(h)
    fw.launch_finish(h)
    _expect(SevStatus.POLICY_FAILURE, lambda: fw.send_start(h, **args))                     # 4 NOSEND
    fw2, h2 = guest_in(GuestState.RUNNING, idents, policy=Policy.SEV)
    _expect(SevStatus.INVALID_LENGTH, lambda: fw2.send_start(h2, pdh_cert=args["pdh_cert"],
                                                              plat_certs=args["plat_certs"][:-1],
                                                              amd_certs=args["amd_certs"]))  # 5 SEV lengths
    fw3, h3 = guest_in(GuestState.RUNNING, idents, policy=0)
    _expect(SevStatus.INVALID_LENGTH, lambda: fw3.send_start(h3, pdh_cert=args["pdh_cert"][:-1],
                                                              plat_certs=b"", amd_certs=b""))  # 7 pdh only
    fw3.send_start(h3, pdh_cert=args["pdh_cert"], plat_certs=b"", amd_certs=b"")   # no chain checked without bits


def test_send_update_data_check_order(idents):
    fw, h = guest_in(GuestState.RUNNING, idents)
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.send_update_data(99, 8, 24, hdr_len=0))     # 1 hdr_len first
    _expect(SevStatus.INVALID_GUEST, lambda: fw.send_update_data(99, 8, 24))                 # 2 handle
    _expect(SevStatus.INVALID_GUEST_STATE, lambda: fw.send_update_data(h, 8, 24))            # 3 state
    peer, _ = idents
    fw.send_start(h, pdh_cert=peer.pdh.encode(), plat_certs=b"", amd_certs=b"")
    _expect(SevStatus.UNSUPPORTED, lambda: Firmware.send_update_vmsa(
        *guest_in(GuestState.SUPDATE, idents, policy=0)))                                    # 4 ES (VMSA)
    fw.deactivate(h)
    _expect(SevStatus.INACTIVE, lambda: fw.send_update_data(h, 8, 24))                       # 5 active
    fw.activate(h, 3)
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.send_update_data(h, 8, 24))                 # 6 lengths
    _expect(SevStatus.INVALID_ADDRESS, lambda: fw.send_update_data(h, 8, 32))                # 7 address


def test_receive_update_data_check_order(idents):
    fw, h = guest_in(GuestState.RUNNING, idents)
    _expect(SevStatus.INVALID_GUEST, lambda: fw.receive_update_data(99, b"", 8, b"x"))
    _expect(SevStatus.INVALID_GUEST_STATE, lambda: fw.receive_update_data(h, b"", 8, b"x"))
    fw, h = guest_in(GuestState.RUPDATE, idents)
    fw.deactivate(h)
    _expect(SevStatus.INACTIVE, lambda: fw.receive_update_data(h, b"", 8, b"x"))
    fw.activate(h, 4)
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.receive_update_data(h, b"", 8, b"x"))
    _expect(SevStatus.INVALID_ADDRESS, lambda: fw.receive_update_data(h, HDR, 8, bytes(16)))
    compressed = b"\x01" + bytes(0x33)
    _expect(SevStatus.UNSUPPORTED, lambda: fw.receive_update_data(h, compressed, 0, bytes(16)))  # before MAC
    _expect(SevStatus.BAD_MEASUREMENT, lambda: fw.receive_update_data(h, HDR, 0, bytes(16)))


def test_launch_secret_check_order(idents):
    fw, h = guest_in(GuestState.LSECRET, idents)
    fw.deactivate(h)
    _expect(SevStatus.INACTIVE, lambda: fw.launch_secret(h, b"", 8, b"x"))
    fw.activate(h, 5)
    _expect(SevStatus.INVALID_ADDRESS, lambda: fw.launch_secret(h, b"", 8, b"x"))    # address before length
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.launch_secret(h, b"", 0, bytes(16)))
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.launch_secret(h, HDR, 0, bytes(0x5010)))
    compressed = b"\x01" + bytes(0x33)
    _expect(SevStatus.BAD_MEASUREMENT, lambda: fw.launch_secret(h, compressed, 0, bytes(16)))  # MAC first here


def test_launch_start_check_order(idents):
    peer, me = idents
    fw = Firmware(me, rng=seeded_rng(9))
    fw.init()
    session = _session_from(peer, me, 0x40)      # MAC covers a policy with a reserved bit
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.launch_start(policy=0x40, dh_cert=b"", session=session[:1]))
    _expect(SevStatus.BAD_MEASUREMENT, lambda: fw.launch_start(policy=0x80, dh_cert=peer.pdh.encode(),
                                                                 session=session))
    _expect(SevStatus.POLICY_FAILURE, lambda: fw.launch_start(policy=0x40, dh_cert=peer.pdh.encode(),
                                                                session=session))
    h = fw.launch_start(policy=Policy.NOKS)
    _expect(SevStatus.POLICY_FAILURE, lambda: fw.launch_start(policy=Policy.NOKS, handle=h))


def test_pek_cert_import_check_order(idents):
    """FW `sev_mcmd_pek_cert_import`: state, ALREADY_OWNED, lengths, OCA self-signature, PEK's OCA
    signature, PEK body; a refused import leaves the identity as it was."""
    me = idents[1]
    owner, other = FleetOwner.create(seeded_rng(105)), FleetOwner.create(seeded_rng(106))
    signed = owner.sign_pek(me.pek_csr()).encode()
    oca = owner.oca.encode()
    fw = Firmware(me, rng=seeded_rng(10))
    _expect(SevStatus.INVALID_PLATFORM_STATE, lambda: fw.pek_cert_import(signed, oca))          # 1 state
    fw.init()
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.pek_cert_import(signed[:-1], oca))              # 3 lengths
    _expect(SevStatus.INVALID_LENGTH, lambda: fw.pek_cert_import(signed, oca + b"\0"))
    tampered_oca = bytearray(oca)
    tampered_oca[0x420] ^= 1                                                                     # OCA's own sig
    _expect(SevStatus.BAD_SIGNATURE, lambda: fw.pek_cert_import(signed, bytes(tampered_oca)))   # 4 OCA
    _expect(SevStatus.BAD_SIGNATURE, lambda: fw.pek_cert_import(signed, other.oca.encode()))    # 5 PEK by OCA
    not_ours = owner.sign_pek(idents[0].pek_csr()).encode()
    _expect(SevStatus.INVALID_CERTIFICATE, lambda: fw.pek_cert_import(not_ours, oca))           # 6 PEK body
    assert fw.identity is me and not fw.platform_status().externally_owned
    fw.pek_cert_import(signed, oca)
    assert fw.platform_status().externally_owned
    _expect(SevStatus.ALREADY_OWNED, lambda: fw.pek_cert_import(signed[:-1], oca))               # 2 before lengths
    fw.shutdown()
    _expect(SevStatus.INVALID_PLATFORM_STATE, lambda: fw.pek_cert_import(signed, oca))          # state first


def test_length_queries_of_ownership_commands(idents):
    fw = Firmware(idents[1], rng=seeded_rng(11))
    err = pytest.raises(SevError, fw.get_id, id_len=63).value
    assert err.status == SevStatus.INVALID_LENGTH and err.written_back == {"id_len": 64}
    fw.init()
    err = pytest.raises(SevError, fw.pek_csr, csr_len=0).value
    assert err.status == SevStatus.INVALID_LENGTH and err.written_back == {"csr_len": 0x824}
