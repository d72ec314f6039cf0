"""The VMM process of one guest (`sevmigd vmm`, QEMU's role; issue 17).

`protocol.py` (pure, imported by both sides): the versioned request/reply codec of the VMM socket.
`runtime.py` (guest side): the guest's vCPUs with the memory engine opened from the PSP's key slot.
`process.py` (I/O, the VMM's own trio loop): memfds, the socket, the manifest, the vCPU ticks.
The daemon imports only `protocol` (tests/test_layering.py).
"""
