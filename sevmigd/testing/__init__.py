"""Test support shipped with the package: the fault proxy used by tests and `make faults`."""
