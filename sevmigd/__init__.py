"""sevmigd: live migration of emulated AMD SEV guests, with a software PSP faithful to the SEV API.

Layers (see ARCHITECTURE.md): psp, guest, wire and migrate are pure (no trio, no I/O, randomness
injected); daemon holds every await; cli is the `sevmigd` command.
"""

__version__ = "0.1.0"
