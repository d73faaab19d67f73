"""``pinwarden config``: the effective configuration and where each value came from.

Sources, highest first: a command-line option (``--state-dir``, ``--connect``), an
environment variable (``PINWARDEN_STATE_DIR``, ``LIBVIRT_DEFAULT_URI``), the configuration
file (``--config FILE`` or ``/etc/pinwarden/pinwarden.toml``, ``[section] key``), the
default.  ``--json``::

    {"schema": 1,
     "config_file": {"path": "/etc/pinwarden/pinwarden.toml", "source": "default",
                     "exists": false},
     "settings": [{"section": "ledger", "key": "state_dir", "value": "/srv/pw",
                   "default": "/var/lib/pinwarden", "source": "env",
                   "from": "PINWARDEN_STATE_DIR", …}, …]}
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinwarden.cli import print_json

if TYPE_CHECKING:  # the handler imports what it uses: the parser of every command is cheap
    from pinwarden import provenance


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "config", parents=[common],
        help="show the effective configuration and where each value comes from",
        description="Show every setting's effective value and its source: command-line "
                    "option, environment variable, configuration file (with the key) or "
                    "default. A configuration file with errors is refused (exit 1).")
    parser.add_argument("--connect", "-c", metavar="URI", default=None,
                        help="a libvirt URI, as the libvirt commands take it (shows what "
                             "they would use)")
    parser.set_defaults(handler=run)


def effective(args: argparse.Namespace) -> provenance.Effective:
    from pinwarden import provenance

    options = {"--state-dir": args.state_dir, "--connect": args.connect}
    return provenance.resolve(Path(args.config) if args.config else None, options, os.environ)


def run(args: argparse.Namespace) -> int:
    from pinwarden import provenance

    result = effective(args)
    if args.json:
        print_json(provenance.to_json(result))
    else:
        print(provenance.render(result))
    return 0
