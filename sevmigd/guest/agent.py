"""The in-guest agent: lets an operator (or a test) write and read guest memory from inside the guest.

Owns: input checking of agent requests and their hand-off to the guest kernel. Guest side: what it
returns is plaintext, so it must never be reachable from host-side code paths other than an explicit
request to the guest (on real systems: a guest agent over virtio-serial, answered by the guest itself).

Pages written through the agent leave the workload (it never overwrites them) and are covered by the
ledger with a content digest, so verify checks them. `shared=True` first converts the pages to shared
(set_memory_decrypted + hypercall, content kept), then writes them in the clear; `shared=False` makes
them private first if they were shared.
"""

from __future__ import annotations

from ..errors import ConfigError, SevmigdError

from sevmigd.units import PAGE_SIZE


class GuestNotRunning(SevmigdError):
    """The guest's vCPUs are paused or the guest kernel is not running (incoming, released)."""


class GuestAgent:
    def __init__(self, vm):
        self._vm = vm

    def _kernel(self):
        vm = self._vm
        if vm._kernel is None:
            raise GuestNotRunning(f"guest {vm.name}: kernel not running")
        if vm.host.paused:
            raise GuestNotRunning(f"guest {vm.name}: vCPUs paused")
        return vm._kernel

    def write(self, gpa: int, data: bytes, shared: bool = False) -> None:
        if isinstance(gpa, bool) or not isinstance(gpa, int):
            raise ConfigError("gpa", "must be an integer guest-physical address")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError("data", "must be bytes")
        kernel = self._kernel()
        try:
            kernel.agent_write(gpa, bytes(data), bool(shared))
        except ValueError as exc:
            raise ConfigError("gpa", str(exc)) from None
        finally:
            self._vm._vmexit()

    def read(self, gpa: int, length: int) -> bytes:
        if isinstance(gpa, bool) or not isinstance(gpa, int):
            raise ConfigError("gpa", "must be an integer guest-physical address")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ConfigError("length", "must be a non-negative integer")
        kernel = self._kernel()
        try:
            return kernel.agent_read(gpa, length)
        except ValueError as exc:
            raise ConfigError("gpa", str(exc)) from None

    def launch_secret(self) -> list[tuple] | None:
        """The guest reading its launch secret (Linux: /sys/kernel/security/secrets/coco): the entries
        (GUID, data) of the table the owner injected with LAUNCH_SECRET, or None when none was. The
        secret page is the last page of the kernel's image region (guest/secret.py)."""
        import numpy as np

        from .secret import SecretTableError, parse_table

        kernel = self._kernel()
        pfn = kernel.image_len // PAGE_SIZE - 1
        page = kernel.mem.read_private(np.array([pfn], dtype=np.int64))[0].tobytes()
        try:
            return parse_table(page)
        except SecretTableError as exc:
            raise ConfigError("launch secret", str(exc)) from None
