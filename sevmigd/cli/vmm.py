"""`sevmigd vmm`: the VMM process of one guest (started by the daemon with `vmm = "process"`; not a
command operators run by hand). See sevmigd/vmm/process.py."""

from __future__ import annotations

import argparse

from sevmigd.errors import ConfigError
from sevmigd.limits import check_guest_name


def _int(text: str) -> int:
    return int(text, 0)


def register(sub) -> None:
    p = sub.add_parser("vmm", help="(internal) the VMM process of one guest, started by the daemon",
                       description="Run one guest's vCPUs and own its RAM (QEMU's role). The daemon starts "
                                   "it; it outlives the daemon and is re-adopted by the next one.")
    p.add_argument("--runtime-dir", required=True, metavar="DIR")
    p.add_argument("--id", required=True, metavar="ID", help="socket name in RUNTIME/vmm/")
    p.add_argument("--name", required=True, metavar="GUEST")
    p.add_argument("--memory", required=True, type=_int, metavar="BYTES")
    p.add_argument("--vcpus", type=_int, default=1)
    p.add_argument("--policy", type=_int, default=0)
    p.add_argument("--ready-fd", type=int, default=None, metavar="FD",
                   help="write 'ready' to this descriptor once the socket listens")
    p.add_argument("--protocol", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=vmm_main)


def vmm_main(args) -> int:
    from sevmigd.guest.vm import check_incoming
    from sevmigd.vmm import process, protocol

    check_guest_name(args.name, "name")
    check_incoming(memory_bytes=args.memory, policy=args.policy, vcpus=args.vcpus)
    if not args.id.isalnum() or len(args.id) > 32:
        raise ConfigError("id", "must be at most 32 letters and digits")
    if args.protocol is None:   # test-only: announce another protocol version (the upgrade tests)
        args.protocol = protocol.VMM_PROTOCOL
    return process.main(args)
