"""``pinwarden metrics``: Prometheus metrics (see :mod:`pinwarden.metrics` for the list).

    pinwarden metrics                       # the text exposition format on stdout
    pinwarden metrics --textfile /var/lib/prometheus/node-exporter/pinwarden.prom

``--textfile`` writes the file atomically (a temporary file in the same directory, renamed)
for node_exporter's textfile collector; ``contrib/pinwarden-metrics.timer`` runs it every
minute.  What could not be read is reported by ``pinwarden_read_error{source}`` (and one
line on stderr), not by failing: the other metrics are still worth having.  A bad
configuration file or command line still fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinwarden.cli.common import config_of, manager_of, root_of
from pinwarden.errors import InputError, PinwardenError

if TYPE_CHECKING:  # the handler imports what it uses (prometheus_client is slow to load)
    from pinwarden import metrics
    from pinwarden.ledger import HolderRecord
    from pinwarden.manager import Manager
    from pinwarden.model import Lease
    from pinwarden.partition import Host


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "metrics", parents=[common],
        help="print Prometheus metrics: leased and free CPUs, holders, audit, read errors",
        description="Print leased and free VM CPUs per NUMA node, each holder's leased CPUs "
                    "and age, the audit's intruders by kind and what could not be read, in "
                    "the Prometheus text format (or write them for node_exporter's textfile "
                    "collector).")
    parser.add_argument("--textfile", metavar="FILE.prom", type=Path, default=None,
                        help="write the metrics atomically to FILE.prom (node_exporter's "
                             "textfile collector directory) instead of stdout")
    parser.add_argument("--openmetrics", action="store_true",
                        help="the OpenMetrics text format instead of Prometheus' (stdout "
                             "only)")
    parser.add_argument("--no-audit", action="store_true",
                        help="skip the audit (which reads every thread in /proc)")

    def handler(args: argparse.Namespace) -> int:
        if args.json:
            parser.error("--json does not apply: metrics are in the Prometheus text format")
        if args.textfile is not None and args.openmetrics:
            parser.error("--textfile writes the Prometheus text format node_exporter reads; "
                         "drop --openmetrics")
        return run(args)

    parser.set_defaults(handler=handler)


def _ledger(manager: Manager) -> tuple[tuple[Lease, ...], tuple[HolderRecord, ...]]:
    """Leases and holders of live owners (read only: reads never reap), as one state; the
    CPUs kept by a holder freed with 'release --force' that runs on, or one in a holder
    group no record names, count as leased (as 'status' and 'audit' count them: they were
    free here, and the holder group a stale one: status hunt)."""
    with manager.snapshot():
        owners = manager.owners_gone()
        return (*manager.leases(owners=owners), *manager.kept_leases()), \
            manager.live_holders(owners)


def gather(args: argparse.Namespace, *, with_audit: bool = True) -> metrics.Snapshot:
    """Read the host, the ledger and (optionally) the audit into a snapshot; whatever cannot
    be read is named in ``errors`` instead."""
    from pinwarden import audit, metrics

    config = config_of(args)  # a bad configuration is the caller's error: it propagates
    root = root_of(args)
    taken = time.time()
    errors: dict[str, str] = {}
    host: Host | None = None
    leases: tuple[Lease, ...] = ()
    holders: tuple[HolderRecord, ...] = ()
    report = None
    with manager_of(args) as manager:
        try:
            leases, holders = _ledger(manager)
        except PinwardenError as exc:
            errors["ledger"] = exc.message
        try:  # the partition as recorded at the first lease while leases are kept
            host = manager.live_host() if "ledger" in errors else manager.host()
        except PinwardenError as exc:
            errors["host"] = exc.message
    if with_audit and "ledger" not in errors:  # without the leases an audit proves nothing
        try:
            scanned = audit.scan(root)
        except PinwardenError as exc:
            errors["proc"] = exc.message
        else:
            if not scanned.cgroups:
                errors["cgroups"] = next((n for n in scanned.notes if "cgroup" in n),
                                         "no cpuset cgroup found")
            elif scanned.partial is not None:  # (a cgroup namespace: holder groups unseen)
                errors["cgroups"] = scanned.partial
            partitions = tuple(dict.fromkeys((config.cgroup_v1, config.cgroup_v2,
                                              *audit.DEFAULT_VM_PARTITIONS)))
            exclusive = tuple(dict.fromkeys((config.exclusive_cgroup,
                                             *audit.DEFAULT_HOLDER_STEMS)))
            report = audit.audit(scanned, leases, holders, vm_partitions=partitions,
                                 holder_stems=exclusive)
    return metrics.Snapshot(taken=taken, host=host, leases=leases, holders=holders,
                            audit=report, errors=errors)


def write_textfile(path: Path, snapshot: metrics.Snapshot) -> None:
    from prometheus_client import write_to_textfile

    from pinwarden import metrics

    if path.suffix != ".prom":
        raise InputError(f"--textfile {path}: node_exporter's textfile collector reads only "
                         f"files named *.prom")
    try:
        write_to_textfile(str(path), metrics.registry(snapshot))
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    from pinwarden import metrics

    snapshot = gather(args, with_audit=not args.no_audit)
    for source, message in snapshot.errors.items():
        print(f"pinwarden: warning: could not read {source}: {message}", file=sys.stderr)
    if args.textfile is not None:
        write_textfile(args.textfile, snapshot)
    else:
        sys.stdout.write(metrics.render(snapshot,
                                        openmetrics_format=args.openmetrics).decode())
    return 0
