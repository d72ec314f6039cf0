"""The VMM process's address space as KVM sees it: what `copy_from_user` / `copy_to_user` reach.

Owns: a map from userspace addresses to the buffers the VMM placed there (its own heap buffers, and
the guest's RAM, which a VMM mmaps and registers as a memory slot). KVM's uAPI passes userspace
addresses (`kvm_sev_cmd.data`, `hdr_uaddr`, `guest_uaddr`, `enc_bitmap`, ...); this module resolves them,
so the structs in `uapi` carry real addresses, exactly as a C client's would.
Must never: read or interpret what it maps (it moves bytes; the guest's RAM holds ciphertext for
private pages), or let an unmapped address do anything but fail with EFAULT.
"""

from __future__ import annotations

import bisect

from .uapi import EFAULT, PAGE_SIZE

#: Where the first mapping goes: a typical x86-64 mmap base, so addresses look like a VMM's.
USER_BASE = 0x7F00_0000_0000


class UserFault(Exception):
    """An address (range) that is not mapped: the ioctl fails with -EFAULT."""

    errno = EFAULT


class UserMemory:
    """Mappings at page-aligned addresses, each followed by an unmapped guard page."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._views: list[memoryview] = []
        self._next = USER_BASE

    def map(self, buf) -> int:
        """Map a writable buffer (bytearray, mmap, numpy array) and return its userspace address."""
        view = memoryview(buf).cast("B")
        addr = self._next
        self._next += (-(-max(len(view), 1) // PAGE_SIZE) + 1) * PAGE_SIZE
        self._starts.append(addr)        # addresses only grow: the lists stay sorted
        self._views.append(view)
        return addr

    def alloc(self, size: int) -> int:
        """Map `size` fresh zero bytes (malloc)."""
        return self.map(bytearray(size))

    def unmap(self, addr: int) -> None:
        i = bisect.bisect_left(self._starts, addr)
        if i == len(self._starts) or self._starts[i] != addr:
            raise UserFault(f"no mapping starts at {addr:#x}")
        self._views[i].release()     # munmap: the buffer's owner may free it now
        del self._starts[i], self._views[i]

    def view(self, addr: int, length: int) -> memoryview:
        """The mapped bytes [addr, addr + length) (must lie inside one mapping), else UserFault."""
        if not isinstance(addr, int) or not isinstance(length, int) or addr <= 0 or length < 0:
            raise UserFault(f"bad user range {addr!r}+{length!r}")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            raise UserFault(f"address {addr:#x} is not mapped")
        off = addr - self._starts[i]
        v = self._views[i]
        if off + length > len(v):
            raise UserFault(f"range {addr:#x}+{length:#x} runs past its mapping")
        return v[off:off + length]

    def read(self, addr: int, length: int) -> bytes:
        """copy_from_user."""
        return bytes(self.view(addr, length))

    def write(self, addr: int, data) -> None:
        """copy_to_user."""
        data = memoryview(data).cast("B")
        self.view(addr, len(data))[:] = data
