"""The VMM side of the KVM SEV uAPI: what QEMU's target/i386/sev.c does with /dev/kvm, command by command.

Owns `SevGuest(vm)`: one guest's migration commands built from `uapi` structs placed in the VMM's
address space and issued with `ioctl(KVM_MEMORY_ENCRYPT_OP)`, the way the AMD QEMU series ("target/i386:
sev: add support to encrypt the outgoing page" / "...load incoming page", v4 2021) does it:
* SEND_START: first a session-length query (zero session_len, expecting the firmware's INVALID_LENGTH
  and the length written back), then the command with the destination's PDH, PEK||OCA||CEK, ASK||ARK;
* SEND_UPDATE_DATA: the packet-header length is queried once (zero hdr_len), then one command per
  4 KiB page, guest_uaddr = the page's address in the VMM's mapping of guest RAM;
* RECEIVE_START / RECEIVE_UPDATE_DATA (guest_len = trans_len = 4096) / RECEIVE_FINISH,
  SEND_FINISH / SEND_CANCEL with no parameter struct;
* the RFC's page-encryption bitmap as windows: `KVM_GET_PAGE_ENC_BITMAP` / `KVM_SET_PAGE_ENC_BITMAP`
  (start_gfn, num_pages, packed bits) and `KVM_PAGE_ENC_BITMAP_RESET`. (With the final design the VMM
  keeps its own bitmap from KVM_EXIT_HYPERCALL: `guest.hypervisor.HostView` chooses between the two.)

Extensions beside the faithful path (see `vm.py`): `send_update_data_batch` /
`receive_update_data_batch` (N pages per call, byte-identical to N single commands; the engine's
default), SEND/RECEIVE_UPDATE_VMSA.

Errors: every failed command raises `KvmError(errno, fw_error)`; `.status` names the SEV status when the
firmware refused, so the engine reports "SEND_UPDATE_DATA failed: INVALID_LENGTH (0x04)".
Must never: see a private page's plaintext (the transport buffers hold ciphertext), or keep blobs mapped
after a command (certificates and sessions are mapped for the call and unmapped after it).
"""

from __future__ import annotations

import numpy as np

from . import uapi as u
from .vm import DEV_SEV_FD, SEV_RET_INVALID_LENGTH, KvmError, KvmVm

_CMD_SIZE = u.KvmSevCmd.size()
_PARAM_SIZE = max(u.KvmSevSendStart.size(), u.KvmSevSendUpdateData.size(), u.KvmSevReceiveStart.size(),
                  u.KvmSevReceiveUpdateData.size(), u.KvmPageEncBitmap.size())


class SevGuest:
    """One SEV guest's migration commands through the VM fd (`vm`), with a /dev/sev fd."""

    def __init__(self, vm: KvmVm, *, sev_fd: int = DEV_SEV_FD):
        self.vm = vm
        self.user = vm.user
        self.sev_fd = sev_fd
        self._cmd = self.user.alloc(_CMD_SIZE)
        self._param = self.user.alloc(_PARAM_SIZE)
        self._hdr: int | None = None          # the packet-header buffer, sized by the first query
        self._hdr_len = 0
        self._trans = self.user.alloc(u.PAGE_SIZE)
        self._bitmap: int | None = None
        self._bitmap_len = 0
        self.commands = 0

    # ------------------------------------------------------------------------------------------------
    def _sev_ioctl(self, cmd_id: u.SevCmdId, param=None):
        """sev_ioctl(): fill struct kvm_sev_cmd, KVM_MEMORY_ENCRYPT_OP; -> (ret, fw_error, param back)."""
        if param is not None:
            self.user.write(self._param, param.pack())
        cmd = u.KvmSevCmd(id=int(cmd_id), data=self._param if param is not None else 0, sev_fd=self.sev_fd)
        self.user.write(self._cmd, cmd.pack())
        self.commands += 1
        ret = self.vm.ioctl(u.KVM_MEMORY_ENCRYPT_OP, self._cmd)
        error = u.KvmSevCmd.unpack(self.user.read(self._cmd, _CMD_SIZE)).error
        back = type(param).unpack(self.user.read(self._param, param.size())) if param is not None else None
        return ret, error, back

    @staticmethod
    def _check(ret: int, error: int, what: str) -> None:
        if ret:
            raise KvmError(-ret, error, what)

    def _map_blob(self, data) -> int:
        return self.user.map(bytearray(data))

    # ------------------------------------------------------------------------------------------------
    # outgoing
    # ------------------------------------------------------------------------------------------------
    def send_start(self, *, pdh_cert: bytes, plat_certs: bytes, amd_certs: bytes) -> tuple[int, bytes]:
        """SEND_START -> (policy, session blob). Queries the session length first, as QEMU does."""
        ret, error, p = self._sev_ioctl(u.SevCmdId.KVM_SEV_SEND_START, u.KvmSevSendStart())
        if error != SEV_RET_INVALID_LENGTH or not p.session_len:
            raise KvmError(-ret if ret else u.EIO, error, "SEND_START session-length query")
        blobs = [self._map_blob(b) for b in (pdh_cert, plat_certs, amd_certs)]
        session = self.user.alloc(p.session_len)
        try:
            ret, error, p = self._sev_ioctl(u.SevCmdId.KVM_SEV_SEND_START, u.KvmSevSendStart(
                pdh_cert_uaddr=blobs[0], pdh_cert_len=len(pdh_cert),
                plat_certs_uaddr=blobs[1], plat_certs_len=len(plat_certs),
                amd_certs_uaddr=blobs[2], amd_certs_len=len(amd_certs),
                session_uaddr=session, session_len=p.session_len))
            self._check(ret, error, "SEND_START")
            return p.policy, self.user.read(session, p.session_len)
        finally:
            for addr in (*blobs, session):
                self.user.unmap(addr)

    def packet_header_len(self) -> int:
        """The SEND_UPDATE_DATA header length query (zero hdr_len; expects INVALID_LENGTH + 0x34)."""
        ret, error, p = self._sev_ioctl(u.SevCmdId.KVM_SEV_SEND_UPDATE_DATA, u.KvmSevSendUpdateData())
        if error != SEV_RET_INVALID_LENGTH or not p.hdr_len:
            raise KvmError(-ret if ret else u.EIO, error, "SEND_UPDATE_DATA header-length query")
        return p.hdr_len

    def send_update_data(self, gfn: int) -> tuple[bytes, bytes]:
        """SEND_UPDATE_DATA of one 4 KiB page -> (packet header, ciphertext): the faithful path."""
        if self._hdr is None:
            self._hdr_len = self.packet_header_len()
            self._hdr = self.user.alloc(self._hdr_len)
        ret, error, _ = self._sev_ioctl(u.SevCmdId.KVM_SEV_SEND_UPDATE_DATA, u.KvmSevSendUpdateData(
            hdr_uaddr=self._hdr, hdr_len=self._hdr_len,
            guest_uaddr=self.vm.gpa_to_uaddr(int(gfn) << u.PAGE_SHIFT), guest_len=u.PAGE_SIZE,
            trans_uaddr=self._trans, trans_len=u.PAGE_SIZE))
        self._check(ret, error, "SEND_UPDATE_DATA")
        return self.user.read(self._hdr, self._hdr_len), self.user.read(self._trans, u.PAGE_SIZE)

    def send_update_data_pages(self, gfns) -> tuple[bytes, bytes]:
        """One SEND_UPDATE_DATA per page, columns joined like the batch's output (headers, data)."""
        hdrs, data = [], []
        for i, gfn in enumerate(gfns):
            try:
                h, d = self.send_update_data(int(gfn))
            except KvmError as exc:
                exc.index = i
                raise
            hdrs.append(h)
            data.append(d)
        return b"".join(hdrs), b"".join(data)

    def send_update_data_batch(self, gfns):
        """Extension: all of `gfns` in one crossing (the engine's default; same bytes as the loop)."""
        return self.vm.send_update_data_batch(gfns)

    def send_update_vmsa(self, vcpu: int = 0):
        """Extension: vCPU `vcpu`'s SEV-ES VMSA packet -> (header, ciphertext)."""
        return self.vm.send_update_vmsa(vcpu)

    def send_finish(self) -> None:
        ret, error, _ = self._sev_ioctl(u.SevCmdId.KVM_SEV_SEND_FINISH)
        self._check(ret, error, "SEND_FINISH")

    def send_cancel(self) -> None:
        ret, error, _ = self._sev_ioctl(u.SevCmdId.KVM_SEV_SEND_CANCEL)
        self._check(ret, error, "SEND_CANCEL")

    # ------------------------------------------------------------------------------------------------
    # incoming
    # ------------------------------------------------------------------------------------------------
    def receive_start(self, *, policy: int, pdh_cert: bytes, session: bytes, handle: int = 0) -> int:
        """RECEIVE_START (KVM then binds the VM's ASID) -> the new firmware handle."""
        pdh, sess = self._map_blob(pdh_cert), self._map_blob(session)
        try:
            ret, error, p = self._sev_ioctl(u.SevCmdId.KVM_SEV_RECEIVE_START, u.KvmSevReceiveStart(
                handle=handle, policy=policy, pdh_uaddr=pdh, pdh_len=len(pdh_cert),
                session_uaddr=sess, session_len=len(session)))
            self._check(ret, error, "RECEIVE_START")
            return p.handle
        finally:
            self.user.unmap(pdh)
            self.user.unmap(sess)

    def receive_update_data(self, gfn: int, hdr, trans) -> None:
        """RECEIVE_UPDATE_DATA of one page (guest_len = trans_len = len(trans)): the faithful path."""
        h, t = self._map_blob(hdr), self._map_blob(trans)
        try:
            ret, error, _ = self._sev_ioctl(u.SevCmdId.KVM_SEV_RECEIVE_UPDATE_DATA, u.KvmSevReceiveUpdateData(
                hdr_uaddr=h, hdr_len=len(hdr), guest_uaddr=self.vm.gpa_to_uaddr(int(gfn) << u.PAGE_SHIFT),
                guest_len=len(trans), trans_uaddr=t, trans_len=len(trans)))
            self._check(ret, error, "RECEIVE_UPDATE_DATA")
        finally:
            self.user.unmap(h)
            self.user.unmap(t)

    def receive_update_data_pages(self, gfns, headers, data, hdr_len: int) -> None:
        """One RECEIVE_UPDATE_DATA per page, in order; a failure raises with `.index` = that page."""
        headers, data = memoryview(headers).cast("B"), memoryview(data).cast("B")
        for i, gfn in enumerate(gfns):
            try:
                self.receive_update_data(int(gfn), headers[i * hdr_len:(i + 1) * hdr_len],
                                         data[i * u.PAGE_SIZE:(i + 1) * u.PAGE_SIZE])
            except KvmError as exc:
                exc.index = i
                raise

    def receive_update_data_batch(self, gfns, headers, data) -> None:
        """Extension: all of `gfns` in one crossing (same effect as the loop)."""
        self.vm.receive_update_data_batch(gfns, headers, data)

    def receive_update_vmsa(self, hdr, trans, vcpu: int = 0) -> None:
        self.vm.receive_update_vmsa(hdr, trans, vcpu)

    def receive_finish(self) -> None:
        ret, error, _ = self._sev_ioctl(u.SevCmdId.KVM_SEV_RECEIVE_FINISH)
        self._check(ret, error, "RECEIVE_FINISH")

    # ------------------------------------------------------------------------------------------------
    # the RFC's page-encryption bitmap, in windows
    # ------------------------------------------------------------------------------------------------
    def _bitmap_buf(self, num_pages: int) -> int:
        need = u.bitmap_bytes(num_pages)
        if self._bitmap is None or self._bitmap_len < need:
            if self._bitmap is not None:
                self.user.unmap(self._bitmap)
            self._bitmap_len = max(need, 4096)
            self._bitmap = self.user.alloc(self._bitmap_len)
        return self._bitmap

    def get_page_enc_bitmap(self, start_gfn: int, num_pages: int) -> np.ndarray:
        """KVM_GET_PAGE_ENC_BITMAP of one window -> bool per page (True = encrypted)."""
        buf = self._bitmap_buf(num_pages)
        self.user.write(self._param, u.KvmPageEncBitmap(start_gfn, num_pages, buf).pack())
        ret = self.vm.ioctl(u.KVM_GET_PAGE_ENC_BITMAP, self._param)
        self._check(ret, 0, "KVM_GET_PAGE_ENC_BITMAP")
        raw = np.frombuffer(self.user.read(buf, u.bitmap_bytes(num_pages)), dtype=np.uint8)
        return np.unpackbits(raw, count=num_pages, bitorder="little").astype(bool)

    def set_page_enc_bitmap(self, start_gfn: int, bits) -> None:
        """KVM_SET_PAGE_ENC_BITMAP of one window from bool per page (True = encrypted)."""
        bits = np.asarray(bits, dtype=bool)
        buf = self._bitmap_buf(len(bits))
        self.user.write(buf, np.packbits(bits, bitorder="little").tobytes())
        self.user.write(self._param, u.KvmPageEncBitmap(start_gfn, len(bits), buf).pack())
        self._check(self.vm.ioctl(u.KVM_SET_PAGE_ENC_BITMAP, self._param), 0, "KVM_SET_PAGE_ENC_BITMAP")

    def reset_page_enc_bitmap(self) -> None:
        """KVM_PAGE_ENC_BITMAP_RESET: every page encrypted again (a guest reboot)."""
        self._check(self.vm.ioctl(u.KVM_PAGE_ENC_BITMAP_RESET), 0, "KVM_PAGE_ENC_BITMAP_RESET")


class SevDevice:
    """The /dev/sev node (include/uapi/linux/psp-sev.h, SEV_ISSUE_CMD): the platform commands a VMM
    issues outside any VM. Migration needs one: PDH_CERT_EXPORT, for the source's own PDH certificate
    (QEMU's sev_get_pdh_info), and the platform's certificate chain as the host's tooling holds it
    (sevctl export: PEK, OCA, CEK from the firmware, ASK and ARK from AMD's key server)."""

    def __init__(self, fw):
        self._fw = fw

    @property
    def identity(self):
        """The platform's certificates (psp.identity.PlatformIdentity; public parts only are read)."""
        return self._fw.identity

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """SEV_PDH_CERT_EXPORT -> (PDH certificate, PEK || OCA || CEK)."""
        return self._fw.pdh_cert_export()
