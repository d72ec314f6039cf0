"""The `sevmigd` command.

Each verb group lives in its own module exposing ``register(subparsers)``; the module adds its
parsers and sets ``func`` (called with the parsed args, returns the exit status). Exit statuses:
0 success, 1 the operation failed (a clear message on stderr), 2 unusable input (argparse style).
No traceback reaches a user: known errors print one line; anything else is a bug and says so.
"""

from __future__ import annotations

import argparse
import sys

from sevmigd import __version__
from sevmigd.errors import ConfigError, SevmigdError

# Verb groups, in the order `sevmigd --help` lists them.
_GROUPS = ("serve", "ctl", "certs", "ownership", "owner", "demo", "bench", "vmm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sevmigd",
        description="Live migration of emulated AMD SEV guests between sevmigd daemons.",
    )
    parser.add_argument("--version", action="version", version=f"sevmigd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for name in _GROUPS:
        importlib.import_module(f"sevmigd.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"sevmigd: error: {exc}", file=sys.stderr)
        return 2
    except SevmigdError as exc:
        print(f"sevmigd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
