"""`sevmigd serve`: run the daemon (one per host).

Works with no configuration at all: the defaults of sevmigd.daemon.config, a fresh self-contained
platform in the state dir on first start. Precedence: defaults < `--config FILE` (TOML) < flags. A bad setting is
one line naming the key and exit status 2; a daemon that cannot start (socket in use, unreadable
state) exits 1; SIGTERM/SIGINT shut down gracefully with exit 0.

This module must never start serving with a configuration it has not validated, or print a traceback
for a known error.
"""

from __future__ import annotations

import argparse

import trio

from sevmigd.errors import ConfigError, SevmigdError


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the sevmigd daemon",
        description="Run the sevmigd daemon: emulated PSP, guests, migration listener, control socket. "
                    "Logs go to stdout (JSON lines when stdout is not a terminal).")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (flags override it)")
    p.add_argument("--state-dir", metavar="DIR", help="platform identity and trusted roots")
    p.add_argument("--listen", metavar="HOST:PORT", help="migration listener (port 0: any free port)")
    p.add_argument("--control", metavar="PATH", help="control socket path")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="per-boot state: VMM sockets, PSP contexts (default: $RUNTIME_DIRECTORY, else "
                        "the control path with .run for .sock)")
    p.add_argument("--log-level", metavar="L", help="debug, info, warning, error, critical")
    p.add_argument("--log-format", metavar="F", help="auto (default), json or console")
    p.set_defaults(func=serve_main)


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {
        "state_dir": args.state_dir,
        "listen": args.listen,
        "control": args.control,
        "runtime_dir": args.runtime_dir,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }


def _unwrap(exc: BaseException) -> BaseException:
    """trio wraps task errors in ExceptionGroups; a single known error is shown as itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def serve_main(args: argparse.Namespace) -> int:
    from sevmigd.daemon.config import load_config
    from sevmigd.daemon.logging import configure_logging
    from sevmigd.daemon.malloc import tune_malloc
    from sevmigd.daemon.server import run

    tune_malloc()  # MiB-sized per-batch buffers reused from the heap, not page-faulted in per batch

    overrides = overrides_from_args(args)
    config = load_config(args.config, overrides)
    configure_logging(config.log_level, config.log_format)
    try:
        return trio.run(lambda: run(config, config_path=args.config, overrides=overrides))
    except BaseExceptionGroup as group:
        inner = _unwrap(group)
        if isinstance(inner, (ConfigError, SevmigdError, KeyboardInterrupt)):
            raise inner from None
        raise
