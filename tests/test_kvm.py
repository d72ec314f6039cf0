"""The KVM layer command by command: struct layouts against the kernel's, the length queries, the one-page
rule, errno and firmware status, the RFC's bitmap windows, the hypercall exit, ASIDs flushed before reuse,
and the batch extension byte-identical to the single-page commands.

Expected layouts are written down here from the kernel headers (include/uapi/linux/kvm.h, 5.13-5.16;
arch/x86/include/uapi/asm/kvm.h since 6.9 spells the same padding out as padN members), and checked a
second way with ctypes structures declared field by field as the C source declares them: a C client
lays the structs out, and packs them, exactly as sevmigd.kvm.uapi does.
"""

from __future__ import annotations

import ctypes
import random
import struct

import numpy as np
import pytest

from sevmigd.guest.vm import GuestConfig, SevVm
from sevmigd.kvm import AsidExhausted, AsidSpace, KvmError, KvmVm, SevGuest, firmware_flush
from sevmigd.kvm import uapi as u
from sevmigd.kvm.usermem import UserMemory
from sevmigd.psp.firmware import Firmware
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.psp.status import SevStatus

MiB = 1 << 20
PAGE = 4096

# offsetof() / sizeof() from include/uapi/linux/kvm.h (x86-64, natural alignment)
KERNEL_LAYOUTS = {
    u.KvmSevCmd: (24, {"id": 0, "data": 8, "error": 16, "sev_fd": 20}),
    u.KvmSevSendStart: (72, {"policy": 0, "pdh_cert_uaddr": 8, "pdh_cert_len": 16, "plat_certs_uaddr": 24,
                             "plat_certs_len": 32, "amd_certs_uaddr": 40, "amd_certs_len": 48,
                             "session_uaddr": 56, "session_len": 64}),
    u.KvmSevSendUpdateData: (48, {"hdr_uaddr": 0, "hdr_len": 8, "guest_uaddr": 16, "guest_len": 24,
                                  "trans_uaddr": 32, "trans_len": 40}),
    u.KvmSevReceiveStart: (40, {"handle": 0, "policy": 4, "pdh_uaddr": 8, "pdh_len": 16, "session_uaddr": 24,
                                "session_len": 32}),
    u.KvmSevReceiveUpdateData: (48, {"hdr_uaddr": 0, "hdr_len": 8, "guest_uaddr": 16, "guest_len": 24,
                                     "trans_uaddr": 32, "trans_len": 40}),
    # the RFC's struct kvm_page_enc_bitmap
    u.KvmPageEncBitmap: (24, {"start_gfn": 0, "num_pages": 8, "enc_bitmap": 16}),
}

U32, U64 = ctypes.c_uint32, ctypes.c_uint64


class CSevCmd(ctypes.Structure):
    _fields_ = [("id", U32), ("data", U64), ("error", U32), ("sev_fd", U32)]


class CSendStart(ctypes.Structure):
    _fields_ = [("policy", U32), ("pdh_cert_uaddr", U64), ("pdh_cert_len", U32), ("plat_certs_uaddr", U64),
                ("plat_certs_len", U32), ("amd_certs_uaddr", U64), ("amd_certs_len", U32),
                ("session_uaddr", U64), ("session_len", U32)]


class CUpdateData(ctypes.Structure):
    _fields_ = [("hdr_uaddr", U64), ("hdr_len", U32), ("guest_uaddr", U64), ("guest_len", U32),
                ("trans_uaddr", U64), ("trans_len", U32)]


class CReceiveStart(ctypes.Structure):
    _fields_ = [("handle", U32), ("policy", U32), ("pdh_uaddr", U64), ("pdh_len", U32), ("session_uaddr", U64),
                ("session_len", U32)]


class CPageEncBitmap(ctypes.Structure):
    _fields_ = [("start_gfn", U64), ("num_pages", U64), ("enc_bitmap", U64)]


C_TWINS = {u.KvmSevCmd: CSevCmd, u.KvmSevSendStart: CSendStart, u.KvmSevSendUpdateData: CUpdateData,
           u.KvmSevReceiveStart: CReceiveStart, u.KvmSevReceiveUpdateData: CUpdateData,
           u.KvmPageEncBitmap: CPageEncBitmap}


@pytest.mark.parametrize("cls", list(KERNEL_LAYOUTS), ids=lambda c: c.__name__)
def test_struct_size_and_offsets_are_the_kernels(cls):
    size, offsets = KERNEL_LAYOUTS[cls]
    assert cls.size() == size
    assert cls.offsets() == offsets
    twin = C_TWINS[cls]
    assert ctypes.sizeof(twin) == size
    assert {name: getattr(twin, name).offset for name, _ in twin._fields_} == offsets


@pytest.mark.parametrize("cls", list(KERNEL_LAYOUTS), ids=lambda c: c.__name__)
def test_packed_bytes_equal_a_c_clients(cls):
    rnd = random.Random(cls.__name__)
    twin = C_TWINS[cls]
    values = {name: rnd.getrandbits(ctypes.sizeof(ctype) * 8) for name, ctype in twin._fields_}
    c = twin(**values)
    ours = cls(**values).pack()
    assert ours == bytes(c)                          # padding included: zero in both
    assert cls.unpack(bytes(c)) == cls(**values)
    assert cls.unpack(memoryview(bytearray(c))) == cls(**values)   # what UserMemory.view hands out
    with pytest.raises(struct.error):
        cls.unpack(bytes(c)[:-1])                    # exactly size() bytes, as copy_from_user of the struct


def test_ioctl_numbers_and_command_ids():
    assert u.KVM_MEMORY_ENCRYPT_OP == 0xC008AEBA      # _IOWR(KVMIO, 0xba, unsigned long)
    assert u.KVM_GET_PAGE_ENC_BITMAP == 0x4018AEC5 and u.KVM_SET_PAGE_ENC_BITMAP == 0x4018AEC6
    assert u.KVM_PAGE_ENC_BITMAP_RESET == 0xAEC7 and u.KVM_ENABLE_CAP == 0x4068AEA3
    ids = u.SevCmdId
    assert (ids.KVM_SEV_INIT, ids.KVM_SEV_LAUNCH_START, ids.KVM_SEV_SEND_START, ids.KVM_SEV_SEND_UPDATE_DATA,
            ids.KVM_SEV_SEND_FINISH, ids.KVM_SEV_RECEIVE_START, ids.KVM_SEV_RECEIVE_UPDATE_DATA,
            ids.KVM_SEV_RECEIVE_FINISH, ids.KVM_SEV_SEND_CANCEL) == (0, 2, 8, 9, 11, 12, 13, 15, 21)
    assert [m.value for m in ids] == list(range(22))  # the enum has no gaps
    assert u.KVM_HC_MAP_GPA_RANGE == 12 and u.KVM_CAP_EXIT_HYPERCALL == 201 and u.KVM_EXIT_HYPERCALL == 3


# --------------------------------------------------------------------------------------------------------
# a source guest and a destination VM on two platforms of one fleet
# --------------------------------------------------------------------------------------------------------
class Rng:
    """A seeded RNG that can be rewound, so two command sequences draw the same IVs."""

    def __init__(self, seed):
        self.seed(seed)

    def seed(self, seed):
        self._r = random.Random(seed)

    def __call__(self, n):
        return self._r.randbytes(n)


@pytest.fixture(scope="module")
def fleet():
    rng = random.Random(5).randbytes
    ca = FleetCA.create(rng, rsa_bits=2048)
    return ca, PlatformIdentity.create(ca, rng), PlatformIdentity.create(ca, rng)


@pytest.fixture
def src(fleet):
    _, ia, ib = fleet
    rng = Rng(1)
    fw = Firmware(ia, rng=rng)
    fw.init()
    vm = SevVm.launch(fw, GuestConfig("k", 1 * MiB, shared_fraction=0.25, seed=3), asid=1,
                      rng=random.Random(2).randbytes)
    yield fw, vm, rng, ib
    vm.release()


def sev_cmd(vm: KvmVm, cmd_id, param=None, *, sev_fd=3):
    """Issue one KVM_MEMORY_ENCRYPT_OP the raw way: -> (ret, error, param as written back)."""
    user = vm.user
    p = user.alloc(128)
    c = user.alloc(24)
    if param is not None:
        user.write(p, param.pack())
    user.write(c, u.KvmSevCmd(id=int(cmd_id), data=p, sev_fd=sev_fd).pack())
    ret = vm.ioctl(u.KVM_MEMORY_ENCRYPT_OP, c)
    error = u.KvmSevCmd.unpack(user.read(c, 24)).error
    back = type(param).unpack(user.read(p, param.size())) if param is not None else None
    return ret, error, back


def started(src):
    fw, vm, rng, ib = src
    sev = vm.host.sev
    policy, session = sev.send_start(pdh_cert=ib.pdh.encode(), plat_certs=ib.plat_certs(), amd_certs=ib.amd_certs())
    return sev, policy, session


def test_send_start_session_length_query(src):
    fw, vm, rng, ib = src
    ret, error, p = sev_cmd(vm.kvm, u.SevCmdId.KVM_SEV_SEND_START, u.KvmSevSendStart())
    assert ret == -u.EIO and error == SevStatus.INVALID_LENGTH and p.session_len == 0x80
    assert vm.sev_state == "RUNNING"                   # a query changes nothing


def test_send_start_checks_and_blob_limit(src):
    fw, vm, rng, ib = src
    user = vm.kvm.user
    pdh = user.map(bytearray(ib.pdh.encode()))
    sess = user.alloc(0x80)
    too_big = user.alloc(u.SEV_FW_BLOB_MAX_SIZE + 1)
    cases = [
        u.KvmSevSendStart(session_uaddr=sess, session_len=0x80),                               # no PDH
        u.KvmSevSendStart(pdh_cert_uaddr=pdh, pdh_cert_len=0x824, session_len=0x80),           # no session
        u.KvmSevSendStart(pdh_cert_uaddr=pdh, pdh_cert_len=0x824, session_uaddr=sess, session_len=0x4001),
        u.KvmSevSendStart(pdh_cert_uaddr=too_big, pdh_cert_len=0x4001, session_uaddr=sess, session_len=0x80),
    ]
    for p in cases:
        assert sev_cmd(vm.kvm, u.SevCmdId.KVM_SEV_SEND_START, p)[:2] == (-u.EINVAL, 0)
    # a session buffer of the wrong length reaches the firmware: INVALID_LENGTH, length written back
    ret, error, back = sev_cmd(vm.kvm, u.SevCmdId.KVM_SEV_SEND_START, u.KvmSevSendStart(
        pdh_cert_uaddr=pdh, pdh_cert_len=0x824, plat_certs_uaddr=pdh, plat_certs_len=0x824,
        amd_certs_uaddr=pdh, amd_certs_len=0x824, session_uaddr=sess, session_len=0x40))
    assert (ret, error, back.session_len) == (-u.EIO, SevStatus.INVALID_LENGTH, 0x80)
    assert vm.sev_state == "RUNNING"


def test_send_update_data_header_length_query_and_one_page_rule(src):
    fw, vm, rng, ib = src
    sev, policy, _ = started(src)
    kvm, user = vm.kvm, vm.kvm.user
    ret, error, p = sev_cmd(kvm, u.SevCmdId.KVM_SEV_SEND_UPDATE_DATA, u.KvmSevSendUpdateData())
    assert (ret, error, p.hdr_len, p.trans_len) == (-u.EIO, SevStatus.INVALID_LENGTH, 0x34, 0)
    hdr, trans = user.alloc(0x34), user.alloc(0x5000)
    page = kvm.gpa_to_uaddr(20 * PAGE)

    def update(guest_uaddr, guest_len, trans_len=PAGE):
        return sev_cmd(kvm, u.SevCmdId.KVM_SEV_SEND_UPDATE_DATA, u.KvmSevSendUpdateData(
            hdr_uaddr=hdr, hdr_len=0x34, guest_uaddr=guest_uaddr, guest_len=guest_len, trans_uaddr=trans,
            trans_len=trans_len))[:2]

    assert update(page, PAGE) == (0, 0)
    assert update(page + 16, PAGE) == (-u.EINVAL, 0)               # crosses into the next page
    assert update(page, 0x4000, 0x4000) == (-u.EINVAL, 0)          # firmware takes 0x5000, KVM one page
    assert update(page + 0xFF0, 16) == (0, 0)                       # the last 16 bytes of a page
    assert update(page, 0) == (-u.EINVAL, 0)                        # guest_len 0
    assert update(page, PAGE, 16) == (-u.EIO, SevStatus.INVALID_LENGTH)   # firmware: trans_len < guest_len
    assert update(page + 8, 16) == (-u.EIO, SevStatus.INVALID_ADDRESS)    # firmware: 16-byte alignment
    assert update(kvm.gpa_to_uaddr(vm.npages * PAGE), PAGE) == (-u.ENOMEM, 0)   # outside the memory slot
    assert sev_cmd(kvm, u.SevCmdId.KVM_SEV_SEND_UPDATE_DATA, u.KvmSevSendUpdateData(
        hdr_uaddr=0x1000, hdr_len=0x34, guest_uaddr=page, guest_len=PAGE, trans_uaddr=trans,
        trans_len=PAGE))[0] == -u.EFAULT                            # header buffer not mapped
    sev.send_cancel()


def test_errno_for_unknown_commands_non_sev_vms_and_bad_addresses(src):
    fw, vm, rng, ib = src
    assert sev_cmd(vm.kvm, 99)[:2] == (-u.EINVAL, 0)
    plain = KvmVm(fw, npages=16)
    assert sev_cmd(plain, u.SevCmdId.KVM_SEV_SEND_FINISH)[:2] == (-u.ENOTTY, 0)
    assert vm.kvm.ioctl(u.KVM_MEMORY_ENCRYPT_OP, 0xdead000) == -u.EFAULT
    assert vm.kvm.ioctl(0x1234) == -u.ENOTTY


def test_firmware_refusal_is_eio_with_the_status(src):
    fw, vm, rng, ib = src
    ret, error, _ = sev_cmd(vm.kvm, u.SevCmdId.KVM_SEV_SEND_FINISH)      # RUNNING, not SUPDATE
    assert (ret, error) == (-u.EIO, SevStatus.INVALID_GUEST_STATE)
    with pytest.raises(KvmError) as ei:
        vm.host.sev.send_finish()
    assert ei.value.errno == u.EIO and ei.value.status == SevStatus.INVALID_GUEST_STATE


def test_batch_extension_is_byte_identical_to_single_pages(src):
    fw, vm, rng, ib = src
    sev, _, _ = started(src)
    gfns = np.array([0, 1, 2, 40, 41, 255, 7], dtype=np.uint64)
    rng.seed(77)
    single = sev.send_update_data_pages(gfns)
    rng.seed(77)
    batch = sev.send_update_data_batch(gfns)
    assert bytes(single[0]) == bytes(batch[0]) and len(single[0]) == 0x34 * len(gfns)
    assert bytes(single[1]) == bytes(batch[1]) and len(single[1]) == PAGE * len(gfns)
    sev.send_cancel()


def receiving(src, fleet):
    """SEND_START on the source, an incoming VM (ASID 9) on a second platform: -> (sev, policy, session,
    the destination SevVm, its SevGuest, the source platform's identity)."""
    fw, vm, rng, ib = src
    _, ia, _ = fleet
    fw_b = Firmware(ib, rng=random.Random(9).randbytes)
    fw_b.init()
    sev, policy, session = started(src)
    dst = SevVm.incoming(fw_b, name="in", memory_bytes=vm.npages * PAGE, policy=policy, handle=None, asid=9)
    return sev, policy, session, dst, dst.host.sev, ia


@pytest.mark.parametrize("path", ["single", "batch"])
def test_a_guest_migrates_through_the_kvm_layer(src, fleet, path):
    """SEND_START .. RECEIVE_FINISH through ioctls (or the batch extension); the guest runs on."""
    vm = src[1]
    sev, policy, session, dst, dsev, ia = receiving(src, fleet)
    with pytest.raises(KvmError) as ei:                   # a /dev/sev fd that is not /dev/sev
        SevGuest(dst.kvm, sev_fd=42).receive_start(policy=policy, pdh_cert=ia.pdh.encode(), session=session)
    assert ei.value.errno == u.EBADF
    dst.received(dsev.receive_start(policy=policy, pdh_cert=ia.pdh.encode(), session=session))
    assert dst.sev_state == "RUPDATE" and dst.kvm.asid == 9 and dst.handle
    bits = vm.host.page_enc_bitmap()
    priv = np.flatnonzero(bits).astype(np.uint64)
    shr = np.flatnonzero(~bits).astype(np.uint64)
    if path == "single":
        hdrs, data = sev.send_update_data_pages(priv)
        dsev.receive_update_data_pages(priv, hdrs, data, 0x34)
    else:
        hdrs, data = sev.send_update_data_batch(priv)
        dsev.receive_update_data_batch(priv, hdrs, data)
    dst.host.write_raw_pages(shr, vm.host.read_raw_pages(shr))
    dst.host.set_page_enc_bitmap(bits)
    dst.host.set_vcpu_state(vm.host.get_vcpu_state())
    sev.send_finish()
    dsev.receive_finish()
    dst.start_incoming()
    try:
        assert dst.verify().ok and dst.shared_pages() == len(shr) > 0
    finally:
        dst.release()


def test_receive_update_data_checks(src, fleet):
    sev, policy, session, dst, dsev, ia = receiving(src, fleet)
    dst.received(dsev.receive_start(policy=policy, pdh_cert=ia.pdh.encode(), session=session))
    hdr, data = sev.send_update_data(3)
    user, kvm = dst.kvm.user, dst.kvm
    h, t = user.map(bytearray(hdr)), user.map(bytearray(data) + bytearray(0x4000))

    def recv(guest_uaddr, guest_len, trans_len, hdr_len=0x34):
        return sev_cmd(kvm, u.SevCmdId.KVM_SEV_RECEIVE_UPDATE_DATA, u.KvmSevReceiveUpdateData(
            hdr_uaddr=h, hdr_len=hdr_len, guest_uaddr=guest_uaddr, guest_len=guest_len, trans_uaddr=t,
            trans_len=trans_len))[:2]

    page = kvm.gpa_to_uaddr(3 * PAGE)
    assert recv(page, PAGE, PAGE, hdr_len=0) == (-u.EINVAL, 0)
    assert recv(page + 16, PAGE, PAGE) == (-u.EINVAL, 0)                      # crosses a page
    assert recv(page, PAGE, 0x4001) == (-u.EINVAL, 0)                         # blob over 16 KiB
    assert recv(page, 16, PAGE) == (-u.EIO, SevStatus.INVALID_LENGTH)         # guest_len != trans_len
    assert recv(page, PAGE, PAGE) == (0, 0)
    assert recv(page, PAGE, PAGE) == (0, 0)                                   # a replay is accepted (§4)
    t2 = user.map(bytearray(PAGE))
    assert sev_cmd(kvm, u.SevCmdId.KVM_SEV_RECEIVE_UPDATE_DATA, u.KvmSevReceiveUpdateData(
        hdr_uaddr=h, hdr_len=0x34, guest_uaddr=page, guest_len=PAGE, trans_uaddr=t2,
        trans_len=PAGE))[:2] == (-u.EIO, SevStatus.BAD_MEASUREMENT)
    dst.release()
    sev.send_cancel()


# --------------------------------------------------------------------------------------------------------
# the RFC's bitmap windows and the two hypercall dialects
# --------------------------------------------------------------------------------------------------------
def bare_vm(npages=64):
    vm = KvmVm(None, npages=npages)
    vm.set_user_memory_region(bytearray(npages * PAGE))
    vm.attach_sev(handle=1, asid=1, es=False)
    return vm


def test_page_enc_status_is_handled_in_kvm_and_read_in_windows():
    vm = bare_vm(64)
    sev = SevGuest(vm)
    assert vm.handle_hypercall(u.KVM_HC_PAGE_ENC_STATUS, 5 * PAGE, 3, 0) == 0
    assert vm.handle_hypercall(u.KVM_HC_PAGE_ENC_STATUS, 20 * PAGE, 1, 0) == 0
    assert vm.handle_hypercall(u.KVM_HC_PAGE_ENC_STATUS, 6 * PAGE, 1, 1) == 0
    assert np.flatnonzero(~sev.get_page_enc_bitmap(0, 64)).tolist() == [5, 7, 20]
    assert np.flatnonzero(~sev.get_page_enc_bitmap(4, 13)).tolist() == [1, 3]   # a 13-bit window
    assert sev.get_page_enc_bitmap(60, 10).all()         # past the guest's memory: encrypted
    # packed bits as the RFC copies them: bit i of byte i // 8, little-endian, set = encrypted
    buf = vm.user.alloc(8)
    arg = vm.user.map(bytearray(u.KvmPageEncBitmap(0, 24, buf).pack()))
    assert vm.ioctl(u.KVM_GET_PAGE_ENC_BITMAP, arg) == 0
    assert vm.user.read(buf, 3) == bytes([0b01011111, 0xFF, 0b11101111])
    # SET a window, RESET, and the errors
    sev.set_page_enc_bitmap(30, np.array([False, True, False]))
    assert np.flatnonzero(~sev.get_page_enc_bitmap(0, 64)).tolist() == [5, 7, 20, 30, 32]
    with pytest.raises(KvmError) as ei:
        sev.set_page_enc_bitmap(62, np.zeros(3, bool))
    assert ei.value.errno == u.EINVAL
    bad = vm.user.map(bytearray(u.KvmPageEncBitmap(0, 8, 0xbad000).pack()))
    assert vm.ioctl(u.KVM_GET_PAGE_ENC_BITMAP, bad) == -u.EFAULT
    reset_by_set = vm.user.map(bytearray(u.KvmPageEncBitmap(0, 64, 0).pack()))
    assert vm.ioctl(u.KVM_SET_PAGE_ENC_BITMAP, reset_by_set) == 0 and sev.get_page_enc_bitmap(0, 64).all()
    vm.handle_hypercall(u.KVM_HC_PAGE_ENC_STATUS, 0, 2, 0)
    sev.reset_page_enc_bitmap()
    assert sev.get_page_enc_bitmap(0, 64).all()
    assert KvmVm(None, npages=4).ioctl(u.KVM_PAGE_ENC_BITMAP_RESET) == -u.ENOTTY


def test_map_gpa_range_exits_to_userspace_only_when_enabled():
    vm = bare_vm(64)
    seen = []

    def vmm(run):
        seen.append(run)
        run.ret = 0

    vm.exit_handler = vmm
    assert vm.handle_hypercall(u.KVM_HC_MAP_GPA_RANGE, 0, 1, 0) == -u.KVM_ENOSYS   # not enabled
    cap = vm.user.map(bytearray(u.KvmEnableCap(cap=u.KVM_CAP_EXIT_HYPERCALL, arg0=1 << 11).pack()))
    assert vm.ioctl(u.KVM_ENABLE_CAP, cap) == -u.EINVAL                           # only bit 12 may be set
    vm.user.write(cap, u.KvmEnableCap(cap=u.KVM_CAP_EXIT_HYPERCALL, arg0=1 << 12).pack())
    assert vm.ioctl(u.KVM_ENABLE_CAP, cap) == 0
    assert vm.handle_hypercall(u.KVM_HC_MAP_GPA_RANGE, 3 * PAGE + 1, 1, 0) == -u.KVM_EINVAL   # KVM checks
    assert vm.handle_hypercall(u.KVM_HC_MAP_GPA_RANGE, PAGE, 0, 0) == -u.KVM_EINVAL
    assert not seen
    assert vm.handle_hypercall(u.KVM_HC_MAP_GPA_RANGE, 3 * PAGE, 2, u.KVM_MAP_GPA_RANGE_ENCRYPTED) == 0
    (run,) = seen
    assert (run.nr, run.arg0, run.arg1, run.arg2, run.flags) == (12, 3 * PAGE, 2, 16, u.KVM_EXIT_HYPERCALL_LONG_MODE)
    assert len(run.pack()) == 72
    assert SevGuest(vm).get_page_enc_bitmap(0, 64).all()   # an exit never touches KVM's bitmap


@pytest.mark.parametrize("dialect", ["map-gpa-range", "page-enc-status"])
def test_host_view_answers_from_the_dialects_bitmap(fleet, dialect):
    _, ia, _ = fleet
    fw = Firmware(ia, rng=random.Random(3).randbytes)
    fw.init()
    vm = SevVm.launch(fw, GuestConfig("d", 2 * MiB, shared_fraction=0.3, flip_rate=300, seed=4, hypercall=dialect),
                      asid=2, rng=random.Random(4).randbytes)
    try:
        for _ in range(5):
            vm.run(0.01)
        host = vm.host
        assert host.page_enc_source == ("vmm" if dialect == "map-gpa-range" else "kvm")
        kernel_bits = host.sev.get_page_enc_bitmap(0, vm.npages)
        own_changed = not host._enc.all()
        if dialect == "page-enc-status":
            assert not kernel_bits.all() and not own_changed     # KVM kept it; the VMM saw no exit
        else:
            assert kernel_bits.all() and own_changed              # the VMM kept it; KVM's untouched
        assert host.page_enc_bitmap().sum() == vm.private_pages()
        assert np.array_equal(host.page_enc_window(100, 50), host.page_enc_bitmap()[100:150])
        vm.reboot()                                               # resets both and the answer's source
        assert host.page_enc_source == ("vmm" if dialect == "map-gpa-range" and vm.shared_pages() else "kvm")
        assert host.page_enc_bitmap().sum() == vm.private_pages()
        assert vm.verify().ok
    finally:
        vm.release()


# --------------------------------------------------------------------------------------------------------
# ASIDs
# --------------------------------------------------------------------------------------------------------
def test_asid_ranges_split_sev_es_below_min_sev_asid():
    space = AsidSpace(lambda: None, min_sev_asid=4, max_sev_asid=6)
    assert [space.new(es=True) for _ in range(3)] == [1, 2, 3]
    assert [space.new(es=False) for _ in range(3)] == [4, 5, 6]
    with pytest.raises(AsidExhausted):
        space.new(es=True)
    with pytest.raises(AsidExhausted) as ei:
        space.new(es=False)
    assert ei.value.errno == u.EBUSY


def test_freed_asids_are_reused_only_after_wbinvd_and_df_flush(fleet):
    _, ia, _ = fleet
    fw = Firmware(ia, rng=random.Random(6).randbytes)
    fw.init()
    space = AsidSpace(firmware_flush(fw), min_sev_asid=3, max_sev_asid=4)
    launch = lambda name, asid: SevVm.launch(fw, GuestConfig(name, 1 * MiB), asid=asid, rng=random.Random(1).randbytes)
    a = launch("a", space.new(es=False))
    b = launch("b", space.new(es=False))
    assert (a.asid, b.asid) == (3, 4) and fw.df_flush_count == 0
    a.release()
    space.free(a.asid)
    assert space.awaiting_flush == {3}
    # the firmware itself refuses the unflushed ASID
    h = fw.launch_start(policy=0)
    with pytest.raises(Exception) as ei:
        fw.activate(h, 3)
    assert ei.value.status == SevStatus.DF_FLUSH_REQUIRED
    fw.decommission(h)
    # the range is full: KVM recycles (WBINVD + DF_FLUSH once) and hands ASID 3 out again
    c = launch("c", space.new(es=False))
    assert c.asid == 3 and fw.df_flush_count == 1 and space.flushes == 1 and not space.awaiting_flush
    b.release()
    space.free(b.asid)
    c.release()
    space.free(c.asid)
    d = launch("d", space.new(es=False))            # two reclaimed, one flush frees both
    e = launch("e", space.new(es=False))
    assert (d.asid, e.asid) == (3, 4) and fw.df_flush_count == 2
    for vm in (d, e):
        vm.release()


def test_user_memory_faults():
    user = UserMemory()
    a = user.alloc(10)
    user.write(a, b"0123456789")
    assert user.read(a + 2, 3) == b"234"
    from sevmigd.kvm.usermem import UserFault
    for addr, n in ((a, 11), (a - 1, 1), (0, 1), (a + PAGE, 1)):
        with pytest.raises(UserFault):
            user.read(addr, n)
    user.unmap(a)
    with pytest.raises(UserFault):
        user.read(a, 1)


def test_releasing_a_vm_unmaps_its_memory_slot_so_the_ram_is_freed(fleet):
    _, ia, _ = fleet
    fw = Firmware(ia, rng=random.Random(8).randbytes)
    fw.init()
    vm = SevVm.launch(fw, GuestConfig("f", 1 * MiB), asid=1, rng=random.Random(1).randbytes)
    ram = vm._ram.buf
    vm.release()
    assert ram.closed                         # no view of the memory slot kept the mapping alive
