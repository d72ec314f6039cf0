"""An emulated SEV guest: launch through the PSP, run, self-check, reboot, release.

Owns: the life cycle of one guest (LAUNCH_* through the firmware, or the destination side of a
migration), its RAM and VMSA buffers, its vCPU register file, and the wiring between the guest side
(`kernel`, `ledger`, `workload`, `agent`) and the hypervisor's view (`hypervisor.HostView`).
Must never: give host-side callers anything but `host` (ciphertext, bitmaps, plain registers of
non-ES guests); keep guest state that a migration must carry outside guest RAM or vCPU registers.

Launch (reference §2.4): LAUNCH_START(policy) -> ACTIVATE(asid) -> map memory -> LAUNCH_UPDATE_DATA
over exactly the image's bytes at GPA 0 (so launch_digest == SHA-256(image) for SEV guests) ->
LAUNCH_UPDATE_VMSA for SEV-ES (the reset register state, so the digest then also covers the VMSA)
-> LAUNCH_MEASURE -> LAUNCH_FINISH; then the guest kernel boots.

SEV-ES: every vCPU has its own VMSA page (hardware save-area offsets, `vcpu.py`). While the guest runs
its registers are inside the "CPU" (this object); at every exit to the host (end of run/agent/boot)
they are written back to the vCPUs' VMSA pages encrypted under the VEK at the firmware's per-vCPU
VMSA addresses, exactly what SEND_UPDATE_VMSA exports (once per vCPU). An incoming ES guest loads
its registers from the VMSAs that RECEIVE_UPDATE_VMSA stored.

Big guests: RAM is an anonymous mmap and the ledger is created lazily, so launching an 8 GiB guest
touches only the image, a few metadata pages and the shared pages the workload asks for.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..psp.firmware import HDR_LEN, VMSA_RESERVED_OFFSET, vmsa_paddr
from ..psp.policy import Policy
from ..psp.status import SevError, SevStatus
from . import vcpu as vc
from .agent import GuestAgent, GuestNotRunning
from ..kvm.uapi import HYPERCALL_DIALECTS
from ..kvm.vm import KvmVm
from .hypervisor import HostView
from .kernel import GuestKernel, GuestPanic
from .ledger import Layout
from .memory import PAGE_SIZE, GuestRam
from .shared import StateArea

assert vc.VMSA_REGS_LIMIT == VMSA_RESERVED_OFFSET, "VMSA layout out of step with the firmware"

MIN_MEMORY = 1 << 20
#: Size of the generated default image (a stand-in for OVMF): 64 KiB, small enough to keep launch
#: measurement instant, big enough to span several pages.
DEFAULT_IMAGE_BYTES = 64 * 1024
MAX_VCPUS = 64
#: The page-state hypercall dialects a guest kernel can speak (GuestConfig.hypercall).
HYPERCALLS = tuple(HYPERCALL_DIALECTS)

__all__ = ["GuestConfig", "SevVm", "VerifyReport", "default_image", "GuestPanic", "GuestNotRunning"]


def default_image() -> bytes:
    """A deterministic stand-in firmware image (same bytes on every host, so digests compare)."""
    out = bytearray()
    ctr = 0
    while len(out) < DEFAULT_IMAGE_BYTES:
        out += hashlib.sha256(b"sevmigd default guest image v1" + ctr.to_bytes(4, "little")).digest()
        ctr += 1
    return bytes(out[:DEFAULT_IMAGE_BYTES])


@dataclass
class GuestConfig:
    name: str
    memory_bytes: int
    policy: int = 0
    image: bytes | None = None
    dirty_rate_mib_s: float = 0.0
    working_set_mib: float | None = None
    shared_fraction: float = 0.0
    flip_rate: float = 0.0
    seed: int = 0
    migration_control: bool = True
    vcpus: int = 1
    #: Write every workload page at boot with seeded random-looking content (ledger-checked), so that
    #: no page is zero: what "a guest with random contents" means for the migration benchmark.
    prefill: bool = False
    #: How the guest kernel reports page-state changes: "map-gpa-range" (KVM_HC_MAP_GPA_RANGE, Linux
    #: 5.14+, exits to the VMM) or "page-enc-status" (the seed RFC's KVM_HC_PAGE_ENC_STATUS, in KVM).
    hypercall: str = "map-gpa-range"
    #: The guest owner's launch blobs (`sevmigd owner session`): GODH certificate (0x824) and session
    #: (0x80). Both or neither; with them LAUNCH_START binds the owner's policy (reference §2.4).
    owner_godh: bytes | None = None
    owner_session: bytes | None = None

    def validate(self) -> None:
        """ConfigError naming the first bad field."""
        from sevmigd.limits import check_guest_name
        check_guest_name(self.name, "name")
        _check_memory(self.memory_bytes)
        _check_policy(self.policy)
        if self.image is not None:
            if not isinstance(self.image, (bytes, bytearray)) or not self.image or len(self.image) % 16:
                raise ConfigError("image", "must be non-empty bytes, a multiple of 16 long "
                                           "(LAUNCH_UPDATE_DATA measures 16-byte blocks)")
        from sevmigd.limits import MAX_DIRTY_RATE_MIB_S, MAX_FLIP_RATE
        for key, top in (("dirty_rate_mib_s", MAX_DIRTY_RATE_MIB_S), ("flip_rate", MAX_FLIP_RATE)):
            v = getattr(self, key)
            if not _real(v) or not 0 <= v <= top:
                raise ConfigError(key, f"must be a finite number from 0 to {top:g}")
        if self.working_set_mib is not None and (not _real(self.working_set_mib) or self.working_set_mib <= 0):
            raise ConfigError("working_set_mib", "must be a finite number > 0 or None (whole RAM)")
        if not _real(self.shared_fraction) or not 0 <= self.shared_fraction <= 1:
            raise ConfigError("shared_fraction", "must be between 0 and 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("seed", "must be an integer")
        if not isinstance(self.migration_control, bool):
            raise ConfigError("migration_control", "must be true or false")
        if not isinstance(self.prefill, bool):
            raise ConfigError("prefill", "must be true or false")
        if self.hypercall not in HYPERCALLS:
            raise ConfigError("hypercall", f"must be one of {', '.join(HYPERCALLS)}")
        _check_vcpus(self.vcpus, self.policy)
        if (self.owner_godh is None) != (self.owner_session is None):
            raise ConfigError("owner_session", "the owner's GODH certificate and session come together")
        if self.owner_godh is not None and (len(self.owner_godh) != 0x824 or len(self.owner_session) != 0x80):
            raise ConfigError("owner_session", "GODH certificate is 0x824 bytes, session 0x80")
        image_len = len(self.image) if self.image is not None else DEFAULT_IMAGE_BYTES
        try:
            Layout.compute(self.memory_bytes // PAGE_SIZE, secret_page_gpa(image_len) // PAGE_SIZE + 1)
        except ValueError as exc:
            raise ConfigError("memory_bytes", str(exc)) from None


def secret_area(page: bytes) -> bytes:
    """The secret page as the guest firmware leaves it: the injected table (its length per its header,
    rounded to 16), zeros after it; all zeros when no table was injected."""
    from .secret import TABLE_GUID

    keep = 0
    if page[:16] == TABLE_GUID.bytes_le:
        total = int.from_bytes(page[16:20], "little")
        keep = min(PAGE_SIZE, -(-total // 16) * 16)
    return bytes(page[:keep]) + bytes(PAGE_SIZE - keep)


def secret_page_gpa(image_len: int) -> int:
    """The launch secret page (see guest/secret.py): the first page after the image."""
    return -(-image_len // PAGE_SIZE) * PAGE_SIZE


def check_incoming(*, memory_bytes, policy, vcpus) -> None:
    """What `SevVm.incoming` would refuse (ConfigError naming the field), for the destination to check
    at Hello, before anything is reserved or allocated."""
    _check_memory(memory_bytes)
    _check_policy(policy)
    _check_vcpus(vcpus, policy)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_memory(memory_bytes) -> None:
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < MIN_MEMORY \
            or memory_bytes % PAGE_SIZE:
        raise ConfigError("memory_bytes", "must be a multiple of 4096 and at least 1 MiB")


def _check_policy(policy) -> None:
    if isinstance(policy, bool) or not isinstance(policy, int) or not 0 <= policy <= 0xFFFFFFFF:
        raise ConfigError("policy", "must be a u32")


def _check_vcpus(vcpus, policy: int) -> None:
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError("vcpus", f"must be 1..{MAX_VCPUS}")


@dataclass(frozen=True)
class VerifyReport:
    pages_checked: int
    mismatches: list[int] = field(default_factory=list)
    ok: bool = True


class SevVm:
    """One emulated SEV guest. Construct with `launch` (fresh guest) or `incoming` (migration target)."""

    def __init__(self, fw, *, name: str, memory_bytes: int, policy: int, handle: int | None, asid: int,
                 vcpus: int, ram: GuestRam, vmsa: list[bytearray] | None, launch_digest: bytes,
                 measurement: bytes | None, mnonce: bytes | None = None, state: StateArea | None = None):
        self._fw = fw
        self.name = name
        self.memory_bytes = memory_bytes
        self.npages = memory_bytes // PAGE_SIZE
        self.policy = policy
        self.handle = handle
        self.asid = asid
        self.vcpus = vcpus
        self.launch_digest = launch_digest
        self.measurement = measurement
        self.mnonce = mnonce
        self._ram = ram
        self._vmsa = vmsa
        self._vmsa_saved: list[bytes | None] = [None] * vcpus   # last plaintext written per VMSA page
        self._es = bool(policy & Policy.ES)
        self._regs = [vc.reset_state(i) for i in range(vcpus)]
        # `state`: the run state shared with the other side of a VMM process (guest/shared.py): bitmaps,
        # pause, MSR, the non-ES registers; None keeps it all in this process (inline guests).
        self._state = state
        # The VM fd: the guest's RAM is its memory slot; hypercalls and MSR writes exit through it.
        self.kvm = KvmVm(fw, npages=self.npages, enc=None if state is None else state.kvm_enc)
        self.kvm.set_user_memory_region(ram.buf, vmsa=vmsa)
        if handle is not None:
            self.kvm.attach_sev(handle=handle, asid=asid, es=self._es)
        else:
            self.kvm.sev_init(asid=asid, es=self._es)   # RECEIVE_START (through self.kvm) binds it
        self.host = HostView(ram, policy=policy, handle=handle or 0, vcpu_regs=self._regs, es=self._es,
                             kvm=self.kvm, state=state)
        self.agent = GuestAgent(self)
        self._kernel: GuestKernel | None = None
        self._released = False
        self._pending_boot: tuple | None = None   # (config, boot entropy) between LAUNCH_MEASURE and FINISH
        self.secret_gpa: int | None = None        # set by launch; an incoming guest's kernel knows its own

    # ------------------------------------------------------------------ construction
    @classmethod
    def launch(cls, fw, config: GuestConfig, *, asid: int, rng, finish: bool = True, ram: GuestRam | None = None,
               state: StateArea | None = None) -> "SevVm":
        """LAUNCH_START .. LAUNCH_MEASURE, then (with `finish`) LAUNCH_FINISH and the kernel boot.

        With the guest owner's GODH certificate and session in `config` (owner_godh / owner_session),
        LAUNCH_START opens the owner's channel and checks the owner's POLICY_MAC. `finish=False` stops
        in LSECRET with the measurement taken, for the owner to check it and answer with a secret
        (`launch_secret`) before `finish_launch`. `ram` / `state`: a VMM process's RAM and state area
        (guest/shared.py) instead of RAM of this process."""
        config.validate()
        image = bytes(config.image) if config.image is not None else default_image()
        es = bool(config.policy & Policy.ES)
        if ram is None:
            ram = GuestRam(config.memory_bytes)
        vmsa = _vmsa_pages(config.vcpus, es, state)
        if config.owner_session is not None:
            handle = fw.launch_start(policy=config.policy, dh_cert=bytes(config.owner_godh),
                                     session=bytes(config.owner_session))
        else:
            handle = fw.launch_start(policy=config.policy)
        try:
            fw.activate(handle, asid)
            fw.map_guest_memory(handle, ram.buf, vmsa=vmsa)
            ram.buf[0:len(image)] = image
            fw.launch_update_data(handle, 0, len(image))
            if es:
                for i, page in enumerate(vmsa):   # one LAUNCH_UPDATE_VMSA per vCPU, in vCPU order (KVM)
                    page[:] = vc.encode_vmsa(vc.reset_state(i), i)
                    fw.launch_update_vmsa(handle, vcpu=i)
            measure, mnonce = fw.launch_measure(handle)
            digest = fw.launch_digest(handle)
        except BaseException:
            _teardown(fw, handle)
            ram.release()
            raise
        vm = cls(fw, name=config.name, memory_bytes=config.memory_bytes, policy=config.policy,
                 handle=handle, asid=asid, vcpus=config.vcpus, ram=ram, vmsa=vmsa,
                 launch_digest=digest, measurement=measure, mnonce=mnonce, state=state)
        vm.secret_gpa = secret_page_gpa(len(image))
        vm._pending_boot = (config, bytes(rng(64)))
        if finish:
            try:
                vm.finish_launch()
            except BaseException:
                vm.release()
                raise
        return vm

    @property
    def awaiting_secret(self) -> bool:
        """Measured (PSP state LSECRET), waiting for the owner's secret or LAUNCH_FINISH."""
        return self._pending_boot is not None and not self._released

    def launch_secret(self, packet: bytes) -> None:
        """LAUNCH_SECRET of the owner's packet (header 0x34 ‖ ciphertext) into the secret page.
        ValueError for a packet of the wrong shape; SevError (BAD_MEASUREMENT, ...) from the PSP."""
        if not self.awaiting_secret:
            raise GuestPanic(f"guest {self.name}: not waiting for a launch secret")
        packet = bytes(packet)
        hdr, trans = packet[:HDR_LEN], packet[HDR_LEN:]
        if len(hdr) != HDR_LEN or not trans or len(trans) % 16 or len(trans) > PAGE_SIZE:
            raise ValueError("a launch secret packet is a 0x34-byte header and 16..4096 bytes of secret "
                             "(a multiple of 16)")
        self._fw.launch_secret(self.handle, hdr, self.secret_gpa, trans)

    def finish_launch(self) -> None:
        """LAUNCH_FINISH (the channel's TEK/TIK are erased), then the guest kernel boots."""
        if not self.awaiting_secret:
            raise GuestPanic(f"guest {self.name}: launch already finished")
        config, secret = self._pending_boot
        self._fw.launch_finish(self.handle)
        self._pending_boot = None
        self.boot_kernel(config, secret)

    def _engine(self):
        """The guest's memory engine (the CPU's memory controller): from the PSP here; a VMM process
        opens its key slot instead (sevmigd.vmm.runtime)."""
        return self._fw.memory_engine(self.handle)

    def boot_kernel(self, config: GuestConfig, secret: bytes) -> None:
        """After LAUNCH_FINISH: the guest firmware fixes up the secret page, the guest kernel boots."""
        engine = self._engine()
        # Guest firmware (OVMF's role): the secret page keeps the injected table and nothing else; never
        # written bytes would read as the VEK's decryption of zeroed DRAM.
        page = engine.read(self._ram.buf, self.secret_gpa, PAGE_SIZE)
        engine.write(self._ram.buf, self.secret_gpa, secret_area(page))
        self._kernel = GuestKernel(self._ram, engine, self._regs[0], self.kvm)
        # The kernel's image region ends after the secret page, so its ledger covers the secret too.
        self._kernel.boot(image_len=self.secret_gpa + PAGE_SIZE, config=config, secret=secret)
        self._vmexit()

    @classmethod
    def incoming(cls, fw, *, name: str, memory_bytes: int, policy: int, handle: int | None, asid: int,
                 vcpus: int = 1, populate: bool = False, ram: GuestRam | None = None,
                 state: StateArea | None = None) -> "SevVm":
        """Destination side: zero RAM, its memory slot, vCPUs paused. With `handle` (a RECEIVE_START
        already issued on the firmware): ACTIVATE and map memory here. With handle=None (the daemon's
        path, as QEMU does it): the VM has an SEV context with `asid` and RECEIVE_START goes through
        `vm.kvm` (SevGuest.receive_start), where KVM binds the ASID; then call `received(handle)`.
        `populate`: fault the whole RAM in now (GuestRam(populate=True)), cheaper than page by page while
        the migration writes it, but O(memory) here (~0.3 s per GiB on the dev VM). `ram`: a fresh
        GuestRam of `memory_bytes` made by the caller, e.g. `GuestRam(size, populate=True)` in a worker
        thread (CPython releases the GIL around mmap()) so the event loop is not blocked meanwhile."""
        _check_memory(memory_bytes)
        _check_policy(policy)
        _check_vcpus(vcpus, policy)
        if ram is None:
            ram = GuestRam(memory_bytes, populate=populate)
        elif ram.memory_bytes != memory_bytes:
            raise ConfigError("memory_bytes", f"the RAM given is {ram.memory_bytes} bytes, not {memory_bytes}")
        vmsa = _vmsa_pages(vcpus, bool(policy & Policy.ES), state)
        if handle is not None:
            fw.activate(handle, asid)
            try:
                fw.map_guest_memory(handle, ram.buf, vmsa=vmsa)
            except BaseException:
                fw.deactivate(handle)
                raise
        vm = cls(fw, name=name, memory_bytes=memory_bytes, policy=policy, handle=handle, asid=asid,
                 vcpus=vcpus, ram=ram, vmsa=vmsa, launch_digest=b"", measurement=None, state=state)
        vm.host.pause()
        return vm

    def received(self, handle: int) -> None:
        """RECEIVE_START went through `self.kvm` and returned `handle` (KVM bound the ASID)."""
        self.handle = handle
        self.host.handle = handle

    def start_incoming(self) -> None:
        """After RECEIVE_FINISH: the guest kernel resumes from its RAM and vCPU state, vCPUs run."""
        if self._kernel is not None:
            raise GuestPanic(f"guest {self.name}: already running")
        state = self.sev_state
        if state != "RUNNING":
            raise GuestPanic(f"guest {self.name}: PSP guest state is {state}, not RUNNING (RECEIVE_FINISH first)")
        self.resume_kernel()

    def resume_kernel(self) -> None:
        """The guest kernel resumes from the RAM and vCPU state a migration brought (RECEIVE_FINISH done)."""
        if self._kernel is not None:
            raise GuestPanic(f"guest {self.name}: already running")
        engine = self._engine()
        if self._es:
            try:
                regs = [vc.decode_vmsa(engine.decrypt(vmsa_paddr(i), bytes(page)), i)
                        for i, page in enumerate(self._vmsa)]
            except ValueError as exc:
                raise GuestPanic(f"guest {self.name}: VMSA does not decode: {exc}") from None
            for mine, theirs in zip(self._regs, regs):
                mine.clear()
                mine.update(theirs)
        elif self._state is not None:   # a VMM process: the host wrote the registers into the state area
            for i, (mine, page) in enumerate(zip(self._regs, self._state.vmsa)):
                mine.clear()
                mine.update(vc.decode_vmsa(bytes(page), i))
        kernel = GuestKernel(self._ram, engine, self._regs[0], self.kvm)
        kernel.resume()
        self._kernel = kernel
        self._vmexit()
        self.host.resume()

    # ------------------------------------------------------------------ running
    def run(self, dt: float) -> None:
        """Advance the guest by `dt` seconds of wall time (no-op while paused or not running)."""
        if not _real(dt) or dt < 0:
            raise ValueError("dt must be a finite number of seconds >= 0")
        if self._kernel is None or self.host.paused:
            return
        eff = dt * (100 - self.host.throttle_pct) / 100.0
        self._kernel.run_step(eff)
        self._regs[0]["rax"] = self._regs[0]["wl_seq"] & vc.U64
        self._vmexit()

    def _vmexit(self) -> None:
        """Registers leave the CPU: for SEV-ES they are saved, encrypted, into the VMSA page; a VMM
        process also leaves a plain SEV guest's registers (and the shared-page count) in the state area."""
        st = self._state
        if st is not None and self._kernel is not None:
            st.shared_pages = self.shared_pages()
            st.kernel_running = True
            if not self._es:
                for i, (page, regs) in enumerate(zip(st.vmsa, self._regs)):
                    plain = vc.encode_vmsa(regs, i)
                    if plain != self._vmsa_saved[i]:
                        page[:] = plain
                        self._vmsa_saved[i] = plain
        if self._es and self._kernel is not None:
            engine = self._engine()
            for i, (page, regs) in enumerate(zip(self._vmsa, self._regs)):
                plain = vc.encode_vmsa(regs, i)
                if plain != self._vmsa_saved[i]:     # a vCPU whose registers did not change keeps its page
                    page[:] = engine.encrypt(vmsa_paddr(i), plain)
                    self._vmsa_saved[i] = plain

    def verify(self) -> VerifyReport:
        if self._kernel is None:
            raise GuestNotRunning(f"guest {self.name}: kernel not running, nothing to verify")
        res = self._kernel.verify()
        return VerifyReport(res.pages_checked, res.mismatches, not res.mismatches)

    def reboot(self) -> None:
        """Kernel restart: every page private again, host bitmap and MSR reset, fresh ledger."""
        kernel = self._kernel
        if kernel is None:
            raise GuestNotRunning(f"guest {self.name}: kernel not running")
        secret = kernel.reboot_secret()
        cfg = kernel.boot_config()
        self.host._reset_for_reboot()
        boots = self._regs[0]["boots"]
        for i, r in enumerate(self._regs):
            r.clear()
            r.update(vc.reset_state(i))
        self._regs[0]["boots"] = boots
        kernel.boot(image_len=kernel.image_len, config=cfg, secret=secret)
        self._vmexit()

    def release(self) -> None:
        """DEACTIVATE + DECOMMISSION the handle if still live, and drop the RAM."""
        if self._released:
            return
        self._released = True
        self._kernel = None
        if self.handle is not None:
            _teardown(self._fw, self.handle)
        self.kvm.release()          # the memory slot's mapping first: it is a view of the RAM
        self._ram.release()

    # ------------------------------------------------------------------ state
    @property
    def released(self) -> bool:
        """True once release() gave the guest's firmware context and RAM back."""
        return self._released

    @property
    def sev_state(self) -> str:
        if self.handle is None:
            return "UNINIT"
        try:
            return self._fw.guest_status(self.handle).state.name
        except SevError:
            return "UNINIT"

    @property
    def running(self) -> bool:
        return self._kernel is not None and not self.host.paused

    def shared_pages(self) -> int:
        return int(self._regs[0].get("shared", 0))

    def private_pages(self) -> int:
        return self.npages - self.shared_pages()

    def info(self) -> dict:
        """What an operator sees (`sevmigd ctl` status): identity, PSP state, launch measurement,
        page-state counts and the migration-control opt-in. Contains nothing secret."""
        return {
            "name": self.name, "memory_bytes": self.memory_bytes, "vcpus": self.vcpus,
            "policy": self.policy, "handle": self.handle, "asid": self.asid, "es": self._es,
            "sev_state": self.sev_state, "running": self.running,
            "launch_digest": self.launch_digest.hex(),
            "measurement": self.measurement.hex() if self.measurement is not None else None,
            "mnonce": self.mnonce.hex() if self.mnonce is not None else None,
            "private_pages": self.private_pages(), "shared_pages": self.shared_pages(),
            "migration_control": self.host.migration_control,
            "migration_control_supported": self.host.migration_control_supported,
            "throttle_pct": self.host.throttle_pct,
        }

    def __repr__(self) -> str:
        return f"SevVm(name={self.name!r}, handle={self.handle}, asid={self.asid}, {self.memory_bytes >> 20} MiB)"


def _vmsa_pages(vcpus: int, es: bool, state: StateArea | None):
    """The vCPUs' VMSA pages for the PSP (SEV-ES only): the state area's, or buffers of this process."""
    if not es:
        return None
    return list(state.vmsa) if state is not None else [bytearray(vc.VMSA_SIZE) for _ in range(vcpus)]


def _teardown(fw, handle: int) -> None:
    """DEACTIVATE then DECOMMISSION (KVM's order), tolerating a handle that is already gone."""
    for step in (fw.deactivate, fw.decommission):
        try:
            step(handle)
        except SevError as exc:
            if exc.status not in (SevStatus.INVALID_GUEST, SevStatus.INVALID_PLATFORM_STATE):
                raise
