"""The guest owner (tenant) side of the SEV API: what virtee's sevctl and AMD's sev-tool do for the
person who owns a guest's secrets, never for the host. Pure (no I/O); `sevmigd owner ...` (cli/owner.py)
is its command line."""
