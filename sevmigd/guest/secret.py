"""The launch secret area: the guest page LAUNCH_SECRET writes into, and the table format in it.

Owns the layout of the secret the guest owner injects (reference §2.4 LAUNCH_SECRET) as the guest
reads it. Real SEV guests use OVMF's SEV secret area and the EFI secret table that Linux's
`efi_secret` driver exposes as /sys/kernel/security/secrets/coco; sevctl's `secret build` writes that
table. We use the same format:

    header: GUID 1e74f542-71dd-4d66-963e-ef4287ff173b (16 bytes, EFI byte order) · u32 LE total length
    entry:  GUID (16, EFI byte order) · u32 LE entry length (20-byte entry header included) · data

zero-padded to a multiple of 16 bytes (LAUNCH_SECRET lengths are 16-byte multiples).

Where the page lives: the page right after the launch image (GPA = image length rounded up to 4 KiB),
the emulation's stand-in for OVMF's reserved secret page. It is not measured (LAUNCH_SECRET comes after
LAUNCH_MEASURE); the guest kernel counts it as part of the image region, so its ledger covers it from
boot on and `verify` proves it intact after every migration.

Must never: be used by host-side code to read the secret (only the guest side holds the page's key).
"""

from __future__ import annotations

import struct
import uuid

from sevmigd.units import PAGE_SIZE
#: EFI_SECRET_TABLE_HEADER_GUID (Linux drivers/virt/coco/efi_secret, OVMF SevLaunchSecret).
TABLE_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
#: The secret area is one page.
MAX_TABLE = PAGE_SIZE
_HDR = struct.Struct("<16sI")


class SecretTableError(ValueError):
    """A secret table that does not parse (or would not fit the secret page)."""


def build_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """The table sevctl's `secret build --secret GUID:FILE ...` makes, padded to 16 bytes."""
    body = b"".join(_HDR.pack(g.bytes_le, _HDR.size + len(d)) + bytes(d) for g, d in entries)
    total = _HDR.size + len(body)
    table = _HDR.pack(TABLE_GUID.bytes_le, total) + body
    table += bytes(-len(table) % 16)
    if len(table) > MAX_TABLE:
        raise SecretTableError(f"secret table is {len(table)} bytes; the secret page holds {MAX_TABLE}")
    return table


def parse_table(page: bytes) -> list[tuple[uuid.UUID, bytes]] | None:
    """Entries of the table at the start of `page`; None when no table was injected (no header GUID)."""
    page = bytes(page)
    if len(page) < _HDR.size:
        return None
    guid, total = _HDR.unpack_from(page, 0)
    if guid != TABLE_GUID.bytes_le:
        return None
    if not _HDR.size <= total <= len(page):
        raise SecretTableError(f"secret table length {total} is out of range")
    out, off = [], _HDR.size
    while off < total:
        if off + _HDR.size > total:
            raise SecretTableError("truncated secret table entry header")
        g, n = _HDR.unpack_from(page, off)
        if n < _HDR.size or off + n > total:
            raise SecretTableError(f"secret table entry length {n} is out of range")
        out.append((uuid.UUID(bytes_le=g), page[off + _HDR.size:off + n]))
        off += n
    return out
