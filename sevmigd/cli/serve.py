"""`sevmigd serve`: not yet implemented (placeholder so the CLI dispatcher is complete)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="(not yet implemented)")
    p.set_defaults(func=_not_yet)


def _not_yet(args) -> int:
    print("sevmigd serve: not yet implemented", file=sys.stderr)
    return 1
