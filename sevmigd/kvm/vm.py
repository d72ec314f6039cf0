"""One KVM virtual machine with SEV, as userspace reaches it through the VM file descriptor's ioctls.

Owns what arch/x86/kvm/svm/sev.c and x86.c keep per VM for SEV migration: the SEV context (active,
es_active, ASID, firmware handle, the /dev/sev fd), the memory slot that maps guest-physical addresses
to the VMM's userspace addresses, the RFC's in-kernel page-encryption bitmap, and which hypercalls
exit to userspace (KVM_CAP_EXIT_HYPERCALL). `ioctl(request, arg)` takes the request numbers and
userspace addresses of `uapi`, returns 0 or -errno like the syscall, and writes back what the kernel
writes back (`kvm_sev_cmd.error`, the length-query answers, the RFC bitmap windows).

The kernel's checks, in the kernel's order (Linux 5.13-5.16 sev.c; reference §7.1):
* every SEV command on a VM without SEV: -ENOTTY; an unknown command id: -EINVAL;
* a firmware failure: -EIO with the SEV status in `kvm_sev_cmd.error` (sev_issue_cmd);
* SEND_START with session_len 0: the firmware is asked with a zeroed buffer and the length it wants
  (0x80) is written back, error INVALID_LENGTH (__sev_send_start_query_session_length);
  session_len > SEV_FW_BLOB_MAX_SIZE, or no PDH / session buffer: -EINVAL;
* SEND_UPDATE_DATA with hdr_len 0 or trans_len 0: the same query for the header length (0x34;
  trans_len comes back 0: the firmware does not write it); a missing address or guest_len 0: -EINVAL;
  `guest_uaddr + guest_len` crossing a 4 KiB page: -EINVAL (one page per command, the kernel pins one);
* RECEIVE_START / RECEIVE_UPDATE_DATA: zero lengths or addresses: -EINVAL; a blob longer than
  SEV_FW_BLOB_MAX_SIZE (16 KiB): -EINVAL (psp_copy_user_blob); the same one-page rule;
  RECEIVE_START binds the VM's ASID (ACTIVATE) and DECOMMISSIONs the new context if that fails;
* an unmapped userspace address: -EFAULT; a guest address outside the memory slot: -ENOMEM (the pin
  fails); a /dev/sev fd other than the one opened: -EBADF.

The system physical address the kernel hands the firmware (`pfn << 12 | offset | C-bit`) is the
guest-physical address here: the emulated PSP addresses a guest's memory through its mapping
(`Firmware.map_guest_memory`), which is what the pinned page and the C-bit amount to.

Hypercalls (kvm_emulate_hypercall): `KVM_HC_PAGE_ENC_STATUS` (the RFC) is handled here, in the
kernel, on the in-kernel bitmap that KVM_GET/SET_PAGE_ENC_BITMAP and KVM_PAGE_ENC_BITMAP_RESET reach;
`KVM_HC_MAP_GPA_RANGE` (final, 5.14) exits to userspace as KVM_EXIT_HYPERCALL when the VMM enabled
KVM_CAP_EXIT_HYPERCALL for it (-KVM_ENOSYS otherwise); KVM checks only alignment, npages != 0 and
wrap-around, the VMM the rest, and the guest gets `run->hypercall.ret`.

Extensions beyond upstream KVM, named so and kept beside the faithful commands:
* `send_update_data_batch` / `receive_update_data_batch`: N whole pages per call, byte-identical to
  N single SEND/RECEIVE_UPDATE_DATA commands (tests/test_kvm.py). Precedent: Hygon's CSV (an SEV
  derivative) batches SEND/RECEIVE_UPDATE_DATA, up to 4094 pages per command, through a ring buffer
  (`csv_command_batch`, `struct kvm_csv_command_batch` in Hygon's arch/x86/kvm/svm/csv.c).
  The engine uses them by default: one crossing into the PSP per 1 MiB instead of per 4 KiB.
* `send_update_vmsa` / `receive_update_vmsa`: `KVM_SEV_SEND_UPDATE_VMSA` / `RECEIVE_UPDATE_VMSA` exist
  in enum sev_cmd_id but upstream KVM returns -EINVAL for them (it cannot migrate SEV-ES guests); the
  emulation implements them so SEV-ES guests migrate.

Must never: import guest/ (the VMM's exit handlers are injected; the firmware object too, this layer
only names psp's SevError), hand out a memory engine, or read guest memory except as the firmware
commands do.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..psp.status import SevError, SevStatus
from . import uapi as u
from .usermem import UserFault, UserMemory

#: The /dev/sev file descriptor a VMM opens (any number: the kernel only checks it names /dev/sev).
DEV_SEV_FD = 3
_U64 = (1 << 64) - 1
#: SEV firmware status codes the kernel itself passes on (psp-sev.h SEV_RET_*).
SEV_RET_INVALID_LENGTH = 0x04


class KvmError(Exception):
    """An ioctl that failed: `errno` (positive) and, for SEV commands, the firmware status `fw_error`."""

    def __init__(self, errno: int, fw_error: int = 0, message: str = ""):
        self.errno = errno
        self.fw_error = fw_error
        #: the SEV status (SevStatus) when the firmware failed, else None; `message` the detail
        self.status = SevStatus(fw_error) if fw_error in SevStatus._value2member_map_ else None
        self.message = message
        self.index: int | None = None
        text = f"KVM ioctl failed: errno {errno}"
        if fw_error:
            text += f", firmware status 0x{fw_error:02x}"
        super().__init__(text + (f": {message}" if message else ""))


class _Errno(Exception):
    def __init__(self, errno: int):
        self.errno = errno


def _blob(user: UserMemory, uaddr: int, length: int) -> bytes:
    """psp_copy_user_blob: a non-empty blob of at most 16 KiB, else -EINVAL."""
    if not uaddr or not length or length > u.SEV_FW_BLOB_MAX_SIZE:
        raise _Errno(u.EINVAL)
    return user.read(uaddr, length)


class KvmVm:
    """A VM fd. `fw` is the host's PSP (firmware object), `user` the VMM's address space."""

    def __init__(self, fw, user: UserMemory | None = None, *, npages: int, sev_fd: int = DEV_SEV_FD,
                 enc: np.ndarray | None = None):
        self._fw = fw
        self.user = user if user is not None else UserMemory()
        self.npages = npages
        self._dev_sev_fd = sev_fd
        # struct kvm_sev_info
        self.sev_active = False
        self.es_active = False
        self.asid = 0
        self.handle = 0
        self.fd = -1
        # the memory slot: guest physical 0 .. npages*4096 at userspace address slot_uaddr
        self.slot_uaddr = 0
        self._slot_buf = None
        self._vmsa = None
        # RFC: the in-kernel page-encryption bitmap (True = encrypted), all encrypted at creation; `enc`:
        # one kept elsewhere (a VMM process's state area shared with the daemon, guest/shared.py)
        if enc is not None and (enc.shape != (npages,) or enc.dtype != bool):
            raise ValueError(f"the page-encryption bitmap must be {npages} bools")
        self._enc = np.ones(npages, dtype=bool) if enc is None else enc
        self.hypercall_exit_enabled = 0
        #: KVM_EXIT_HYPERCALL is delivered here (the VMM's vCPU run loop); it sets `run.ret`.
        self.exit_handler: Callable[[u.KvmRunHypercall], None] | None = None
        #: The MSR filter's exit for MSR_KVM_MIGRATION_CONTROL (the VMM's).
        self.msr_handler: Callable[[int, int], None] | None = None
        self.hypercalls_in_kernel = 0
        self.hypercall_exits = 0

    def __repr__(self) -> str:
        return (f"<KvmVm sev={self.sev_active} es={self.es_active} asid={self.asid} handle={self.handle} "
                f"{self.npages} pages>")

    # ------------------------------------------------------------------------------------------------
    # set-up that has no struct here: the memory slot, the SEV context of a guest launched outside
    # ------------------------------------------------------------------------------------------------
    def set_user_memory_region(self, buf, vmsa=None) -> int:
        """KVM_SET_USER_MEMORY_REGION for slot 0 (GPA 0): the VMM mmaps the guest's RAM at a userspace
        address and registers it; returns that address. `vmsa`: the vCPUs' VMSA pages (SEV-ES)."""
        if len(buf) != self.npages * u.PAGE_SIZE:
            raise ValueError("the memory slot must cover the guest's memory")
        self._slot_buf = buf
        self._vmsa = vmsa
        self.slot_uaddr = self.user.map(buf)
        return self.slot_uaddr

    def release(self) -> None:
        """The VM is destroyed: its memory slot is unmapped (the guest's RAM may be freed now)."""
        if self._slot_buf is not None:
            self.user.unmap(self.slot_uaddr)
            self._slot_buf = None
            self._vmsa = None

    def gpa_to_uaddr(self, gpa: int) -> int:
        return self.slot_uaddr + gpa

    def attach_sev(self, *, handle: int, asid: int, es: bool, sev_fd: int | None = None) -> None:
        """The SEV context of a guest whose launch already ran (KVM_SEV_INIT + LAUNCH_*): its handle and
        bound ASID, as sev_guest_init and sev_launch_start leave them in struct kvm_sev_info."""
        self.sev_active, self.es_active = True, es
        self.handle, self.asid = handle, asid
        self.fd = self._dev_sev_fd if sev_fd is None else sev_fd

    def sev_init(self, *, asid: int, es: bool, sev_fd: int | None = None) -> None:
        """KVM_SEV_INIT / KVM_SEV_ES_INIT with the ASID the host's AsidSpace allocated for this VM."""
        if self.sev_active:
            raise KvmError(u.EBUSY, message="SEV is already initialised for this VM")
        self.sev_active, self.es_active, self.asid = True, es, asid
        self.fd = self._dev_sev_fd if sev_fd is None else sev_fd

    # ------------------------------------------------------------------------------------------------
    # the ioctl entry
    # ------------------------------------------------------------------------------------------------
    def ioctl(self, request: int, arg: int = 0) -> int:
        """0 or -errno, like ioctl(2) on the VM fd (arg: a userspace address, or 0)."""
        try:
            if request == u.KVM_MEMORY_ENCRYPT_OP:
                return self._memory_encrypt_op(arg)
            if request == u.KVM_GET_PAGE_ENC_BITMAP:
                return self._get_page_enc_bitmap(arg)
            if request == u.KVM_SET_PAGE_ENC_BITMAP:
                return self._set_page_enc_bitmap(arg)
            if request == u.KVM_PAGE_ENC_BITMAP_RESET:
                if not self.sev_active:
                    return -u.ENOTTY
                self._enc[:] = True
                return 0
            if request == u.KVM_ENABLE_CAP:
                return self._enable_cap(arg)
            return -u.ENOTTY
        except UserFault:
            return -u.EFAULT
        except _Errno as e:
            return -e.errno

    def _enable_cap(self, arg: int) -> int:
        cap = u.KvmEnableCap.unpack(self.user.read(arg, u.KvmEnableCap.size()))
        if cap.cap != u.KVM_CAP_EXIT_HYPERCALL or cap.flags:
            return -u.EINVAL
        if cap.arg0 & ~u.KVM_EXIT_HYPERCALL_VALID_MASK:
            return -u.EINVAL
        self.hypercall_exit_enabled = cap.arg0
        return 0

    # ------------------------------------------------------------------------------------------------
    # KVM_MEMORY_ENCRYPT_OP (svm_mem_enc_op)
    # ------------------------------------------------------------------------------------------------
    def _memory_encrypt_op(self, arg: int) -> int:
        cmd = u.KvmSevCmd.unpack(self.user.read(arg, u.KvmSevCmd.size()))
        handler = {
            u.SevCmdId.KVM_SEV_SEND_START: self._send_start,
            u.SevCmdId.KVM_SEV_SEND_UPDATE_DATA: self._send_update_data,
            u.SevCmdId.KVM_SEV_SEND_FINISH: self._send_finish,
            u.SevCmdId.KVM_SEV_SEND_CANCEL: self._send_cancel,
            u.SevCmdId.KVM_SEV_RECEIVE_START: self._receive_start,
            u.SevCmdId.KVM_SEV_RECEIVE_UPDATE_DATA: self._receive_update_data,
            u.SevCmdId.KVM_SEV_RECEIVE_FINISH: self._receive_finish,
        }.get(cmd.id)
        cmd.error = 0
        if handler is None:
            ret = -u.EINVAL
        elif not self.sev_active:
            ret = -u.ENOTTY
        else:
            try:
                ret = handler(cmd)
            except _Errno as e:
                ret = -e.errno
            except UserFault:
                ret = -u.EFAULT
        self.user.write(arg, cmd.pack())
        return ret

    def _issue(self, cmd: u.KvmSevCmd, fn, fd: int | None = None):
        """sev_issue_cmd: run a firmware command; on failure -EIO with its status in cmd.error. Returns
        (ret, result, written_back)."""
        if (self.fd if fd is None else fd) != self._dev_sev_fd:
            raise _Errno(u.EBADF)
        try:
            return 0, fn(), {}
        except SevError as exc:
            cmd.error = int(exc.status)
            return -u.EIO, None, dict(exc.written_back)

    def _pin(self, guest_uaddr: int, guest_len: int) -> int:
        """The one-page rule, then the guest page behind `guest_uaddr` (sev_pin_memory): its GPA."""
        offset = guest_uaddr & (u.PAGE_SIZE - 1)
        if guest_len + offset > u.PAGE_SIZE:
            raise _Errno(u.EINVAL)
        gpa = guest_uaddr - self.slot_uaddr
        if self._slot_buf is None or gpa < 0 or gpa + guest_len > self.npages * u.PAGE_SIZE:
            raise _Errno(u.ENOMEM)
        return gpa

    def _send_start(self, cmd: u.KvmSevCmd) -> int:
        size = u.KvmSevSendStart.size()
        p = u.KvmSevSendStart.unpack(self.user.read(cmd.data, size))
        fw = self._fw
        if not p.session_len:
            ret, _, wb = self._issue(cmd, lambda: fw.send_start(self.handle, pdh_cert=b"", plat_certs=b"",
                                                                amd_certs=b"", session_len=0))
            p.session_len = wb.get("session_len", 0)
            self.user.write(cmd.data, p.pack())
            return ret
        if not p.pdh_cert_uaddr or not p.pdh_cert_len or not p.session_uaddr \
                or p.session_len > u.SEV_FW_BLOB_MAX_SIZE:
            return -u.EINVAL
        self.user.view(p.session_uaddr, p.session_len)      # the session buffer must be there
        pdh = _blob(self.user, p.pdh_cert_uaddr, p.pdh_cert_len)
        plat = _blob(self.user, p.plat_certs_uaddr, p.plat_certs_len)
        amd = _blob(self.user, p.amd_certs_uaddr, p.amd_certs_len)
        ret, out, wb = self._issue(cmd, lambda: fw.send_start(self.handle, pdh_cert=pdh, plat_certs=plat,
                                                              amd_certs=amd, session_len=p.session_len))
        if ret == 0:
            policy, session = out
            self.user.write(p.session_uaddr, session)
            p.policy, p.session_len = policy, len(session)
        else:
            p.session_len = wb.get("session_len", p.session_len)
        self.user.write(cmd.data, p.pack())
        return ret

    def _send_update_data(self, cmd: u.KvmSevCmd) -> int:
        size = u.KvmSevSendUpdateData.size()
        p = u.KvmSevSendUpdateData.unpack(self.user.read(cmd.data, size))
        fw = self._fw
        if not p.trans_len or not p.hdr_len:
            # __sev_send_update_data_query_lengths: zeroed command; the firmware writes hdr_len only
            ret, _, wb = self._issue(cmd, lambda: fw.send_update_data(self.handle, 0, 0, hdr_len=0))
            p.hdr_len, p.trans_len = wb.get("hdr_len", 0), wb.get("trans_len", 0)
            self.user.write(cmd.data, p.pack())
            return ret
        if not p.trans_uaddr or not p.guest_uaddr or not p.guest_len or not p.hdr_uaddr:
            return -u.EINVAL
        gpa = self._pin(p.guest_uaddr, p.guest_len)
        ret, out, _ = self._issue(cmd, lambda: fw.send_update_data(self.handle, gpa, p.guest_len,
                                                                   hdr_len=p.hdr_len, trans_len=p.trans_len))
        if ret:
            return ret
        hdr, trans = out
        self.user.view(p.trans_uaddr, p.trans_len)[:len(trans)] = trans
        self.user.view(p.hdr_uaddr, p.hdr_len)[:len(hdr)] = hdr
        return 0

    def _send_finish(self, cmd: u.KvmSevCmd) -> int:
        return self._issue(cmd, lambda: self._fw.send_finish(self.handle))[0]

    def _send_cancel(self, cmd: u.KvmSevCmd) -> int:
        return self._issue(cmd, lambda: self._fw.send_cancel(self.handle))[0]

    def _receive_start(self, cmd: u.KvmSevCmd) -> int:
        size = u.KvmSevReceiveStart.size()
        p = u.KvmSevReceiveStart.unpack(self.user.read(cmd.data, size))
        if not p.pdh_uaddr or not p.pdh_len or not p.session_uaddr or not p.session_len:
            return -u.EINVAL
        pdh = _blob(self.user, p.pdh_uaddr, p.pdh_len)
        session = _blob(self.user, p.session_uaddr, p.session_len)
        fw = self._fw
        ret, handle, _ = self._issue(cmd, lambda: fw.receive_start(policy=p.policy, pdh_cert=pdh,
                                                                   session=session, handle=p.handle),
                                     fd=cmd.sev_fd)
        if ret:
            return ret
        # sev_bind_asid: WBINVD, ACTIVATE; on failure the new context is decommissioned
        ret, _, _ = self._issue(cmd, lambda: fw.activate(handle, self.asid), fd=cmd.sev_fd)
        if ret:
            try:
                fw.decommission(handle)
            except SevError:
                pass
            return ret
        if self._slot_buf is not None:
            fw.map_guest_memory(handle, self._slot_buf, vmsa=self._vmsa)
        p.handle = handle
        self.user.write(cmd.data, p.pack())
        self.handle, self.fd = handle, cmd.sev_fd
        return 0

    def _receive_update_data(self, cmd: u.KvmSevCmd) -> int:
        size = u.KvmSevReceiveUpdateData.size()
        p = u.KvmSevReceiveUpdateData.unpack(self.user.read(cmd.data, size))
        if not (p.hdr_uaddr and p.hdr_len and p.guest_uaddr and p.guest_len and p.trans_uaddr and p.trans_len):
            return -u.EINVAL
        gpa = self._pin(p.guest_uaddr, p.guest_len)
        hdr = _blob(self.user, p.hdr_uaddr, p.hdr_len)
        trans = _blob(self.user, p.trans_uaddr, p.trans_len)
        return self._issue(cmd, lambda: self._fw.receive_update_data(self.handle, hdr, gpa, trans,
                                                                     guest_len=p.guest_len))[0]

    def _receive_finish(self, cmd: u.KvmSevCmd) -> int:
        return self._issue(cmd, lambda: self._fw.receive_finish(self.handle))[0]

    # ------------------------------------------------------------------------------------------------
    # extensions (see the module docstring)
    # ------------------------------------------------------------------------------------------------
    def _need_sev(self) -> None:
        if not self.sev_active:
            raise KvmError(u.ENOTTY, message="SEV is not active on this VM")

    def _call(self, what: str, fn):
        self._need_sev()
        try:
            return fn()
        except SevError as exc:
            err = KvmError(u.EIO, int(exc.status), exc.message)
            err.index = exc.index
            raise err from None

    def send_update_data_batch(self, gfns):
        """Extension: SEND_UPDATE_DATA for N whole pages -> (N headers, N * 4096 ciphertext)."""
        return self._call("SEND_UPDATE_DATA", lambda: self._fw.send_update_data_batch(self.handle, gfns))

    def receive_update_data_batch(self, gfns, headers, ciphertext) -> None:
        """Extension: RECEIVE_UPDATE_DATA for N whole pages, in order (same as N single commands)."""
        self._call("RECEIVE_UPDATE_DATA",
                   lambda: self._fw.receive_update_data_batch(self.handle, gfns, headers, ciphertext))

    def send_update_vmsa(self, vcpu: int = 0):
        """Extension (-EINVAL upstream): SEND_UPDATE_VMSA of vCPU `vcpu`'s VMSA -> (header, ciphertext)."""
        return self._call("SEND_UPDATE_VMSA", lambda: self._fw.send_update_vmsa(self.handle, vcpu))

    def receive_update_vmsa(self, hdr, trans, vcpu: int = 0) -> None:
        """Extension (-EINVAL upstream): RECEIVE_UPDATE_VMSA into vCPU `vcpu`'s VMSA."""
        self._call("RECEIVE_UPDATE_VMSA", lambda: self._fw.receive_update_vmsa(self.handle, hdr, trans, vcpu))

    # ------------------------------------------------------------------------------------------------
    # the RFC's page-encryption bitmap
    # ------------------------------------------------------------------------------------------------
    def _window(self, arg: int) -> u.KvmPageEncBitmap:
        if not self.sev_active:
            raise _Errno(u.ENOTTY)
        p = u.KvmPageEncBitmap.unpack(self.user.read(arg, u.KvmPageEncBitmap.size()))
        if p.start_gfn > _U64 - p.num_pages:
            raise _Errno(u.EINVAL)
        return p

    def _get_page_enc_bitmap(self, arg: int) -> int:
        """Bits of [start_gfn, start_gfn + num_pages); gfns past the guest's memory read as encrypted
        (the RFC fills its buffer with ones before copying the known bits)."""
        p = self._window(arg)
        dst = self.user.view(p.enc_bitmap, u.bitmap_bytes(p.num_pages))
        lo, hi = min(p.start_gfn, self.npages), min(p.start_gfn + p.num_pages, self.npages)
        if hi - lo == p.num_pages:
            bits = self._enc[lo:hi]
        else:
            bits = np.ones(p.num_pages, dtype=bool)
            bits[:hi - lo] = self._enc[lo:hi]
        dst[:] = np.packbits(bits, bitorder="little").tobytes()
        return 0

    def _set_page_enc_bitmap(self, arg: int) -> int:
        """Write the window's bits; enc_bitmap = 0 resets every page to encrypted (RFC). A window past
        the guest's memory is -EINVAL (the RFC grew its bitmap; ours is sized to the memory slot)."""
        p = self._window(arg)
        if not p.enc_bitmap:
            self._enc[:] = True
            return 0
        if p.start_gfn + p.num_pages > self.npages:
            return -u.EINVAL
        raw = np.frombuffer(self.user.read(p.enc_bitmap, u.bitmap_bytes(p.num_pages)), dtype=np.uint8)
        self._enc[p.start_gfn:p.start_gfn + p.num_pages] = np.unpackbits(raw, count=p.num_pages,
                                                                         bitorder="little").astype(bool)
        return 0

    # ------------------------------------------------------------------------------------------------
    # guest exits: VMMCALL and the migration-control MSR
    # ------------------------------------------------------------------------------------------------
    def handle_hypercall(self, nr: int, a0: int, a1: int, a2: int) -> int:
        """The guest's VMMCALL (kvm_emulate_hypercall): the value the guest finds in rax."""
        if not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= _U64 for a in (nr, a0, a1, a2)):
            return -u.KVM_EINVAL
        if nr == u.KVM_HC_PAGE_ENC_STATUS:
            self.hypercalls_in_kernel += 1
            if a2 not in (0, 1) or a0 % u.PAGE_SIZE or a1 == 0 or a0 // u.PAGE_SIZE + a1 > self.npages:
                return -u.KVM_EINVAL
            first = a0 // u.PAGE_SIZE
            self._enc[first:first + a1] = bool(a2)
            return 0
        if nr == u.KVM_HC_MAP_GPA_RANGE:
            if not self.hypercall_exit_enabled & (1 << u.KVM_HC_MAP_GPA_RANGE) or self.exit_handler is None:
                return -u.KVM_ENOSYS
            gfn = a0 >> u.PAGE_SHIFT
            if a0 % u.PAGE_SIZE or a1 == 0 or gfn + a1 > _U64 >> u.PAGE_SHIFT:
                return -u.KVM_EINVAL
            run = u.KvmRunHypercall(nr=nr, arg0=a0, arg1=a1, arg2=a2, flags=u.KVM_EXIT_HYPERCALL_LONG_MODE)
            self.hypercall_exits += 1
            self.exit_handler(run)
            return run.ret
        return -u.KVM_ENOSYS

    def wrmsr(self, msr: int, value: int) -> None:
        """A guest WRMSR the VMM's MSR filter intercepts (KVM_EXIT_X86_WRMSR)."""
        if self.msr_handler is None:
            raise KvmError(u.EINVAL, message=f"WRMSR 0x{msr:x} has no handler")
        self.msr_handler(msr, value)

    def reset_page_enc_bitmap(self) -> None:
        """KVM_PAGE_ENC_BITMAP_RESET without the struct round trip (a guest reboot, the seed's TODO)."""
        self._enc[:] = True
