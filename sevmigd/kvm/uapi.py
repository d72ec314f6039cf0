"""The KVM uAPI for SEV live migration, as the kernel headers define it: numbers and structs.

Owns: ioctl request numbers, the `sev_cmd_id` enum, the parameter structs of `KVM_MEMORY_ENCRYPT_OP`
with the kernel's exact layouts (natural alignment, so the implicit padding a C compiler inserts is
spelled out as `x` pad bytes in the `struct` formats: a C client and these codecs produce the same
bytes), the RFC's page-encryption-bitmap ioctls, the hypercall numbers and the `KVM_EXIT_HYPERCALL`
exit record, and the errno values KVM returns.
Must never: hold state or do anything but pack and unpack; import psp/ or guest/.

Sources (facts only, no code copied):
* Linux `include/uapi/linux/kvm.h` (5.13-5.16; since 6.9 the SEV part lives in
  `arch/x86/include/uapi/asm/kvm.h`, where the implicit padding is written out as ``padN`` members,
  same ABI): `enum sev_cmd_id`, `struct kvm_sev_cmd`, `struct kvm_sev_send_start`,
  `struct kvm_sev_send_update_data`, `struct kvm_sev_receive_start`,
  `struct kvm_sev_receive_update_data`, `KVM_MEMORY_ENCRYPT_OP = _IOWR(KVMIO, 0xba, unsigned long)`,
  `KVM_ENABLE_CAP`, `KVM_CAP_EXIT_HYPERCALL = 201`, `KVM_EXIT_HYPERCALL = 3`, the `hypercall` member of
  `struct kvm_run`.
* The seed RFC "Add AMD SEV guest live migration support" (Brijesh Singh, 2019; Ashish Kalra v6-v10,
  2020-2021): `struct kvm_page_enc_bitmap {__u64 start_gfn; __u64 num_pages; union {void __user
  *enc_bitmap; __u64 padding2;};}`, `KVM_GET_PAGE_ENC_BITMAP = _IOW(KVMIO, 0xc5, ...)`,
  `KVM_SET_PAGE_ENC_BITMAP = _IOW(KVMIO, 0xc6, ...)`, `KVM_PAGE_ENC_BITMAP_RESET = _IO(KVMIO, 0xc7)`
  (v8-v10 numbering; v6 used 0xc2-0xc4), and `KVM_HC_PAGE_ENC_STATUS` (numbered 12 in the RFC).
* `include/uapi/linux/kvm_para.h` (5.14): `KVM_HC_MAP_GPA_RANGE = 12`, its attribute bits.
* `include/linux/psp-sev.h`: `SEV_FW_BLOB_MAX_SIZE = 0x4000`.

One deliberate renumbering, documented where the guest defines it (`guest/kernel.py`): the RFC's
`KVM_HC_PAGE_ENC_STATUS` is 13 here, because mainline gave 12 to `KVM_HC_MAP_GPA_RANGE` and this
emulated KVM serves both dialects.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import ClassVar

from sevmigd.units import PAGE_SHIFT, PAGE_SIZE  # noqa: F401 (re-exported)
#: include/linux/psp-sev.h: the largest blob KVM copies from userspace into the kernel (psp_copy_user_blob).
SEV_FW_BLOB_MAX_SIZE = 0x4000

# --- ioctl numbers (include/uapi/asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr) ---------
KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


#: _IOWR(KVMIO, 0xba, unsigned long) = 0xc008aeba: the argument is a pointer to struct kvm_sev_cmd.
KVM_MEMORY_ENCRYPT_OP = _iowr(0xBA, 8)
#: _IOW(KVMIO, 0xa3, struct kvm_enable_cap) (104 bytes).
KVM_ENABLE_CAP = _iow(0xA3, 104)
#: RFC v8-v10 (never merged).
KVM_GET_PAGE_ENC_BITMAP = _iow(0xC5, 24)
KVM_SET_PAGE_ENC_BITMAP = _iow(0xC6, 24)
KVM_PAGE_ENC_BITMAP_RESET = _io(0xC7)

KVM_CAP_EXIT_HYPERCALL = 201
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0

# --- hypercalls (kvm_para.h) ---------------------------------------------------------------------------
KVM_HC_MAP_GPA_RANGE = 12
#: The RFC's number was 12; see the module docstring for why it is 13 here.
KVM_HC_PAGE_ENC_STATUS = 13
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 2
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0
#: Only this hypercall may be routed to userspace (KVM_EXIT_HYPERCALL_VALID_MASK, arch/x86/kvm/x86.h).
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE
#: Guest-visible hypercall return values (kvm_para.h).
KVM_ENOSYS = 1000
KVM_EINVAL = 22
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
KVM_MIGRATION_READY = 1 << 0
#: The two page-state hypercall dialects a guest kernel may speak, by their user-facing names
#: (`ctl launch --hypercall`, GuestConfig.hypercall).
HYPERCALL_DIALECTS = {"map-gpa-range": KVM_HC_MAP_GPA_RANGE, "page-enc-status": KVM_HC_PAGE_ENC_STATUS}

# --- errno values the ioctls return (negated), asm-generic/errno-base.h + errno.h -------------------------
EPERM, EIO, EBADF, ENOMEM, EFAULT, EBUSY, EINVAL, ENOTTY = 1, 5, 9, 12, 14, 16, 22, 25


class SevCmdId(enum.IntEnum):
    """`enum sev_cmd_id` (include/uapi/linux/kvm.h), in the kernel's order: the values are positions."""

    KVM_SEV_INIT = 0
    KVM_SEV_ES_INIT = 1
    KVM_SEV_LAUNCH_START = 2
    KVM_SEV_LAUNCH_UPDATE_DATA = 3
    KVM_SEV_LAUNCH_UPDATE_VMSA = 4
    KVM_SEV_LAUNCH_SECRET = 5
    KVM_SEV_LAUNCH_MEASURE = 6
    KVM_SEV_LAUNCH_FINISH = 7
    KVM_SEV_SEND_START = 8
    KVM_SEV_SEND_UPDATE_DATA = 9
    KVM_SEV_SEND_UPDATE_VMSA = 10
    KVM_SEV_SEND_FINISH = 11
    KVM_SEV_RECEIVE_START = 12
    KVM_SEV_RECEIVE_UPDATE_DATA = 13
    KVM_SEV_RECEIVE_UPDATE_VMSA = 14
    KVM_SEV_RECEIVE_FINISH = 15
    KVM_SEV_GUEST_STATUS = 16
    KVM_SEV_DBG_DECRYPT = 17
    KVM_SEV_DBG_ENCRYPT = 18
    KVM_SEV_CERT_EXPORT = 19
    KVM_SEV_GET_ATTESTATION_REPORT = 20
    KVM_SEV_SEND_CANCEL = 21


class _Struct:
    """A fixed-layout little-endian C struct: FORMAT uses `x` for the compiler's implicit padding."""

    FORMAT: ClassVar[str]

    @classmethod
    def _codec(cls) -> tuple[struct.Struct, Callable]:
        """The compiled FORMAT and a getter of the field values in order, made once per class: every
        ioctl of the one-page path packs and unpacks several structs, and `dataclasses.astuple` (a deep
        copy of each field) cost about a third of such an ioctl."""
        codec = cls.__dict__.get("_CODEC")
        if codec is None:
            names = [f.name for f in fields(cls)]
            codec = (struct.Struct(cls.FORMAT), attrgetter(*names))   # (every struct has 2+ fields)
            setattr(cls, "_CODEC", codec)
        return codec

    @classmethod
    def size(cls) -> int:
        return cls._codec()[0].size

    def pack(self) -> bytes:
        codec, values = self._codec()
        return codec.pack(*values(self))

    @classmethod
    def unpack(cls, data) -> "_Struct":
        """From exactly size() bytes (any bytes-like object), else struct.error."""
        return cls(*cls._codec()[0].unpack(data))

    @classmethod
    def offsets(cls) -> dict[str, int]:
        """Byte offset of every named field (what `offsetof` says in C)."""
        out: dict[str, int] = {}
        names = iter(f.name for f in fields(cls))
        pos = 0
        for count, code in re.findall(r"(\d*)([a-zA-Z?])", cls.FORMAT[1:]):
            width = struct.calcsize("<" + count + code)
            if code != "x":
                out[next(names)] = pos
            pos += width
        return out


@dataclass
class KvmSevCmd(_Struct):
    """struct kvm_sev_cmd {__u32 id; [4 pad]; __u64 data; __u32 error; __u32 sev_fd;} = 24 bytes.
    `data` is the userspace address of the command's own struct; `error` gets the firmware status."""

    id: int
    data: int
    error: int = 0
    sev_fd: int = 0
    FORMAT: ClassVar[str] = "<I4xQII"


@dataclass
class KvmSevSendStart(_Struct):
    """struct kvm_sev_send_start = 72 bytes; policy and session_len are written back."""

    policy: int = 0
    pdh_cert_uaddr: int = 0
    pdh_cert_len: int = 0
    plat_certs_uaddr: int = 0
    plat_certs_len: int = 0
    amd_certs_uaddr: int = 0
    amd_certs_len: int = 0
    session_uaddr: int = 0
    session_len: int = 0
    FORMAT: ClassVar[str] = "<I4xQI4xQI4xQI4xQI4x"


@dataclass
class KvmSevSendUpdateData(_Struct):
    """struct kvm_sev_send_update_data = 48 bytes; hdr_len / trans_len are written back by the query."""

    hdr_uaddr: int = 0
    hdr_len: int = 0
    guest_uaddr: int = 0
    guest_len: int = 0
    trans_uaddr: int = 0
    trans_len: int = 0
    FORMAT: ClassVar[str] = "<QI4xQI4xQI4x"


@dataclass
class KvmSevReceiveStart(_Struct):
    """struct kvm_sev_receive_start = 40 bytes; handle is in/out (0 = new VEK)."""

    handle: int = 0
    policy: int = 0
    pdh_uaddr: int = 0
    pdh_len: int = 0
    session_uaddr: int = 0
    session_len: int = 0
    FORMAT: ClassVar[str] = "<IIQI4xQI4x"


@dataclass
class KvmSevReceiveUpdateData(KvmSevSendUpdateData):
    """struct kvm_sev_receive_update_data = 48 bytes: the kernel declares it with the same members and
    layout as kvm_sev_send_update_data (nothing is written back)."""


@dataclass
class KvmPageEncBitmap(_Struct):
    """The RFC's struct kvm_page_enc_bitmap = 24 bytes: a window of `num_pages` bits from `start_gfn`,
    one bit per page, set = encrypted (private), little-endian bit order (bit i of byte i // 8), as the
    kernel's `unsigned long` bitmaps are on x86. enc_bitmap = 0 on SET resets the whole bitmap (RFC)."""

    start_gfn: int = 0
    num_pages: int = 0
    enc_bitmap: int = 0
    FORMAT: ClassVar[str] = "<QQQ"


@dataclass
class KvmEnableCap(_Struct):
    """struct kvm_enable_cap {__u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64];} = 104 bytes."""

    cap: int = 0
    flags: int = 0
    arg0: int = 0
    arg1: int = 0
    arg2: int = 0
    arg3: int = 0
    FORMAT: ClassVar[str] = "<IIQQQQ64x"


@dataclass
class KvmRunHypercall(_Struct):
    """The `hypercall` member of struct kvm_run for KVM_EXIT_HYPERCALL: __u64 nr; __u64 args[6];
    __u64 ret; union {__u32 longmode; __u64 flags;} = 72 bytes. The VMM writes `ret` and re-enters."""

    nr: int = 0
    arg0: int = 0
    arg1: int = 0
    arg2: int = 0
    arg3: int = 0
    arg4: int = 0
    arg5: int = 0
    ret: int = 0
    flags: int = 0
    FORMAT: ClassVar[str] = "<QQQQQQQqQ"


def bitmap_bytes(num_pages: int) -> int:
    """Bytes a `num_pages`-bit window occupies in userspace (whole bytes, as the RFC copies them)."""
    return (num_pages + 7) // 8


__all__ = [name for name in dir() if name.isupper() or name.startswith("Kvm") or name == "SevCmdId"] + [
    "bitmap_bytes"]
