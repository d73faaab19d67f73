"""``pinwarden run``: run a command on exclusive CPUs.

    pinwarden run --exclusive N [--name J] [--threads prefer|isolate|require] -- COMMAND...
    pinwarden run --cpus LIST [--name J] -- COMMAND...

The exit status is the command's (``128 + N`` when it died of signal N); pinwarden's own
refusals exit 1 with ``pinwarden: error: …`` before the command starts.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pinwarden.cli import print_json
from pinwarden.cli.common import manager_of
from pinwarden.errors import InputError

if TYPE_CHECKING:  # the handler imports what it uses: the parser of every command is cheap
    from pinwarden.policy import JobSpec

#: The default thread policy (``pinwarden.domain.DEFAULT_THREADS``, checked by a test).
DEFAULT_THREADS = "whole"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "run", parents=[common],
        help="run a command on exclusive CPUs",
        description="Lease exclusive CPUs, run COMMAND in a cpuset cgroup that owns them, "
                    "and give them back when it exits.  The exit status is COMMAND's.  With "
                    "--json, standard output is one JSON document (the job and its exit "
                    "status) and COMMAND's standard output goes to standard error.",
        usage="pinwarden run (--exclusive N | --cpus LIST) [--name J] "
              "[--threads whole|prefer|isolate|require] [--isolated] [--dry-run] "
              "-- COMMAND [ARG...]")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--exclusive", metavar="N", type=_count,
                      help="lease N CPUs chosen by topology (default 1)")
    what.add_argument("--cpus", metavar="LIST", help="lease exactly these CPUs (0-3,8)")
    parser.add_argument("--name", metavar="J",
                        help="job name (default: COMMAND-PID); unique among running jobs")
    parser.add_argument("--threads", choices=("whole", "prefer", "isolate", "require"),
                        default=DEFAULT_THREADS,
                        help="SMT siblings: whole cores, the spare sibling held empty "
                             "(default); prefer (may share a core with another holder); "
                             "isolate (one thread per core, siblings held empty); require "
                             "(SMT siblings only)")
    parser.add_argument("--isolated", action="store_true",
                        help="an isolated cpuset partition (cgroup v2): no scheduler load "
                             "balancing across the job's CPUs (the job places its own "
                             "threads)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the cgroup writes the job would make, in "
                             "order, and change nothing (the command does not run)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="the command and its arguments (after --)")

    def handler(args: argparse.Namespace) -> int:
        if not [word for word in args.command if word != "--"][:1]:
            # a usage error: exit 2 with the usage, as README's table says (it was exit 1
            # without it: README hunt)
            parser.error("no command given: pinwarden run --exclusive N -- COMMAND [ARG...]")
        return handle(args)

    parser.set_defaults(handler=handler)


def _count(text: str) -> int:
    """A number of CPUs in ASCII digits (``int`` took ``١`` for 1, where CPU lists refuse
    it; hunt)."""
    if not (text.isascii() and text.strip().lstrip("+-").isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs")
    if int(text) < 1:  # a usage error like any other bad value (it exited 1: hunt)
        raise argparse.ArgumentTypeError(f"needs at least 1 CPU, not {int(text)}")
    return int(text)


def request_of(args: argparse.Namespace, command: list[str]) -> JobSpec:
    from pinwarden.cpuset import CpuSet
    from pinwarden.policy import JobSpec
    from pinwarden.runner import check_name

    if args.name is not None:  # as given: an empty one is refused, not replaced
        name = args.name
    else:  # COMMAND-PID, made a valid job name
        base = re.sub(r"[^A-Za-z0-9_.@:+-]", "_", Path(command[0]).name)[:48].lstrip("._@:+-")
        name = f"{base or 'job'}-{os.getpid()}"
    cpus = CpuSet.parse(args.cpus) if args.cpus is not None else None
    return JobSpec(name=check_name(name), count=args.exclusive, cpus=cpus,
                   threads=args.threads, isolated=args.isolated)


def handle(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InputError("no command given: pinwarden run --exclusive N -- COMMAND [ARG...]")
    from pinwarden.runner import run_job

    request = request_of(args, command)
    if args.dry_run:
        return _dry_run(args, request, command)
    with manager_of(args) as manager:
        from pinwarden.cli.placement import refuse_in_part_view

        refuse_in_part_view(manager.root, "pinwarden run")
        # the JSON document alone on standard output: the command's goes to standard error
        # (it came first, and the document after it could not be read as one: hunt)
        status = run_job(manager, request, command, stdout_to_stderr=bool(args.json))
    args.finished_status = status  # (kept if the reader of the JSON went away: CLI hunt)
    if args.json:
        print_json({"job": request.name, "exit_status": status})
    return status


def _dry_run(args: argparse.Namespace, request: JobSpec, command: list[str]) -> int:
    import shlex

    from pinwarden.cli.vm import print_preview
    from pinwarden.enforce.layout import holder_group_path
    from pinwarden.model import job_holder
    from pinwarden.policy import decide

    holder = job_holder(request.name)
    with manager_of(args) as manager:
        seen = manager.preview(holder, lambda host, leases: decide(request, host, leases,
                                                                    holder=holder))
        group = holder_group_path(manager.names(), holder) if manager.enforcing else None
    call = f"run {shlex.join(command)} in cgroup /{group}" if group else \
        f"run {shlex.join(command)}"
    if args.json:
        print_json({"job": request.name, "dry_run": True, "plan": seen.plan.to_json(),
                    "cgroup_writes": list(seen.writes), "command": command,
                    "cgroup": group, "notes": [*seen.plan.notes, *seen.notes]})
        return 0
    print_preview(seen.plan, seen.writes, [call], (*seen.plan.notes, *seen.notes))
    return 0
