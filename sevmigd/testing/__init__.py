"""Test support shipped with the package, used by tests/, `make faults` and the benchmarks.

`daemons` (the one launcher of real `sevmigd serve` processes, fleets, the config writer, the async
control client), `faultproxy` (a frame-aware TCP proxy that injects faults), `cells` and `invariants`
(the fault matrix and what each cell must hold), `netns` (kernel-level faults in network namespaces),
`frames` (split a captured byte stream into frames).
"""
