"""The guest runtime of a VMM process: the guest's vCPUs (kernel, workload, agent, ledger) on the CPU this
process plays, over RAM and run state shared with the daemon.

Guest side of the trust boundary (like guest/kernel.py): it holds the guest's memory engine, opened from
the key slot the PSP sealed (`Firmware.key_slot`, `sevmigd.psp.keyslot.open_key_slot`) with the sealing
key of the runtime directory, which the emulated CPU may read as hardware reads its own key slots. The
daemon never imports this module (tests/test_layering.py).

Pure apart from what it is given: the RAM and state mappings, the key slot and the sealing key.
"""

from __future__ import annotations

from sevmigd.guest.memory import GuestRam
from sevmigd.guest.shared import SharedDirtyLog, StateArea
from sevmigd.guest.vm import GuestConfig, SevVm
from sevmigd.psp.keyslot import open_key_slot
from sevmigd.psp.policy import Policy


class VmmGuest(SevVm):
    """A SevVm whose memory engine comes from a key slot and which has no firmware object: the PSP is
    in the daemon. Built by `boot` (a launched guest) or `resume_incoming` (a migrated one)."""

    def __init__(self, *, name: str, memory_bytes: int, policy: int, handle: int, asid: int, vcpus: int,
                 ram: GuestRam, state: StateArea, key_slot: bytes, sealing_key: bytes):
        self._memory_engine = open_key_slot(bytes(key_slot), sealing_key, handle=handle, asid=asid)
        vmsa = list(state.vmsa) if policy & Policy.ES else None   # the encrypted VMSA pages
        super().__init__(None, name=name, memory_bytes=memory_bytes, policy=policy, handle=handle, asid=asid,
                         vcpus=vcpus, ram=ram, vmsa=vmsa, launch_digest=b"", measurement=None, state=state)

    def _engine(self):
        return self._memory_engine

    @property
    def sev_state(self) -> str:
        return "RUNNING" if self._kernel is not None else "UNKNOWN"

    def release(self) -> None:
        """Stop the guest here; the PSP context is the daemon's to decommission."""
        self._released = True
        self._kernel = None
        self.kvm.release()


def shared_ram(ram_fd: int, state_buf, *, memory_bytes: int, vcpus: int, init: bool) -> tuple[GuestRam, StateArea]:
    """The guest's RAM (the memfd, MAP_SHARED) and run state over the state mapping."""
    npages = memory_bytes // 4096
    state = StateArea(state_buf, npages=npages, vcpus=vcpus, init=init)
    ram = GuestRam(memory_bytes, fd=ram_fd, dirty=SharedDirtyLog(state))
    return ram, state


def guest_config(d: dict) -> GuestConfig:
    """The GuestConfig a `boot` request carries (known fields only; the launch-only image and owner blobs
    stay with the daemon)."""
    fields = GuestConfig.__dataclass_fields__
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"boot: unknown guest config keys {unknown}")
    return GuestConfig(**d)


__all__ = ["VmmGuest", "shared_ram", "guest_config"]
