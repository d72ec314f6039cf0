"""sevmigd.kvm: the KVM uAPI for SEV live migration, pure (no I/O, no trio), as the kernel defines it.

The migration engine reaches the emulated PSP and the guest's SEV context only through this package,
as QEMU's target/i386/sev.c reaches them through /dev/kvm (tests/test_layering.py enforces it):

* `uapi`     ioctl numbers, `enum sev_cmd_id`, the command structs with the kernel's layouts, the RFC's
             page-encryption-bitmap struct and ioctls, hypercall numbers, the KVM_EXIT_HYPERCALL record;
* `usermem`  the VMM's address space, where those structs and their buffers live (copy_{from,to}_user);
* `vm`       `KvmVm`: one VM fd, KVM's side of every command (checks, errno, length queries, the
             one-page rule, the RFC's in-kernel bitmap, hypercall exits) plus the documented extensions;
* `sev`      `SevGuest`: the VMM's side, command by command as QEMU issues them;
* `asid`     `AsidSpace`: SEV-ES / SEV ASID ranges, reclaim only after WBINVD + DF_FLUSH.
"""

from .asid import AsidExhausted, AsidSpace, firmware_flush
from .sev import SevGuest
from .usermem import UserFault, UserMemory
from .vm import DEV_SEV_FD, KvmError, KvmVm

__all__ = ["AsidExhausted", "AsidSpace", "firmware_flush", "SevGuest", "UserFault", "UserMemory", "DEV_SEV_FD",
           "KvmError", "KvmVm"]
