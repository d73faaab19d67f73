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
                   "from": "PINWARDEN_STATE_DIR", …}, …],
     "problems": []}

``problems``: values every other command would refuse: a libvirt URI pinwarden cannot work
through (another host, another driver, a user's ``qemu:///session``), CPUs the host
(``--root``) does not have (exit 1 then, each also on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
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
                    "default. A configuration file with errors is refused (exit 1), and so "
                    "is a value every other command would refuse: a libvirt URI pinwarden cannot "
                    "work through, host_reserve CPUs this host does not have.")
    parser.add_argument("--connect", "-c", metavar="URI", default=None,
                        help="a libvirt URI, as the libvirt commands take it (shows what "
                             "they would use)")
    parser.set_defaults(handler=run)


def effective(args: argparse.Namespace) -> provenance.Effective:
    from pinwarden import provenance

    options = {"--state-dir": args.state_dir, "--connect": args.connect}
    return provenance.resolve(Path(args.config) if args.config else None, options, os.environ)


def host_problems(args: argparse.Namespace, result: provenance.Effective) -> list[str]:
    """Values that every other command would refuse: a libvirt URI pinwarden cannot work
    through, CPUs this host (``--root``) does not have.  No CPU check when the host cannot
    be read (config is about the file)."""
    from pinwarden.errors import HostError
    from pinwarden.libvirt.uri import uri_problem
    from pinwarden.partition import host_reserve_problem
    from pinwarden.topology import read_topology

    bad_uri = uri_problem(str(result.get("libvirt_uri")), root=os.geteuid() == 0)
    problems = [bad_uri] if bad_uri is not None else []
    reserve = result.get("host_reserve")
    if reserve is None:
        return problems
    try:
        topology = read_topology(Path(args.root))
    except HostError:
        return problems
    problem = host_reserve_problem(reserve, topology)
    return problems + ([problem] if problem is not None else [])


def run(args: argparse.Namespace) -> int:
    from pinwarden import provenance

    result = effective(args)
    problems = host_problems(args, result)
    if args.json:
        print_json({**provenance.to_json(result), "problems": problems})
    else:
        print(provenance.render(result))
    for problem in problems:
        print(f"pinwarden: error: {problem}", file=sys.stderr)
    return 1 if problems else 0
