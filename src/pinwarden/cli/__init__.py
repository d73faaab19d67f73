"""Command line: ``pinwarden COMMAND [--root DIR] [--state-dir DIR] [--json] ...``.

Conventions every command follows:

* ``--json`` prints machine output on stdout;
* refusals and bad input exit 1 with ``pinwarden: error: …`` on stderr (and, with ``--json``,
  ``{"error": {"code": …, "message": …}}`` on stdout);
* usage errors exit 2; a user error never produces a traceback.

Each command lives in its own module exposing ``register(subparsers, common)``; the module
list below is the only place that knows them all.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from pinwarden.errors import PinwardenError

#: Command modules, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "pinwarden.cli.host",
    "pinwarden.cli.placement",
    "pinwarden.cli.run",
    "pinwarden.cli.vm",
    "pinwarden.cli.audit",
    "pinwarden.cli.demo",
)


def common_parser() -> argparse.ArgumentParser:
    """Options every command accepts (also after the command name)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", metavar="DIR", default="/",
                        help="read the host below DIR (a sysfs dump), default /")
    common.add_argument("--state-dir", metavar="DIR", default=None,
                        help="lease database directory (default $PINWARDEN_STATE_DIR or "
                             "/var/lib/pinwarden)")
    common.add_argument("--config", metavar="FILE", default=None,
                        help="configuration file (default /etc/pinwarden/pinwarden.toml)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="pinwarden",
        description="Exclusive physical CPUs for virtual machines and processes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet
                continue
            raise
        module.register(sub, common)
    return parser


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def fail(args: argparse.Namespace | None, exc: PinwardenError) -> int:
    message = exc.message.replace("\n", " ")
    if args is not None and getattr(args, "json", False):
        print_json({"error": {"code": exc.code, "message": message}})
    print(f"pinwarden: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
    except PinwardenError as exc:
        return fail(args, exc)
    except KeyboardInterrupt:
        print("pinwarden: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    return int(status or 0)


def entry() -> None:
    sys.exit(main())
