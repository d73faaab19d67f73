"""``pinwarden host``: the host's CPU topology, its VM/housekeeping partition and why.

Human output: a summary, the partition with its reason, and the CPU map
(:func:`pinwarden.view.render_cpu_map`), with leases when a lease database exists.
``--json``::

    {"schema": 1,
     "cpus": [{"cpu": 0, "online": true, "package": 0, "die": 0, "cluster": null,
               "core": 0, "siblings": "0,8", "package_cpus": "0-7", "node": 0,
               "node_known": true, "isolated": false, "nohz_full": false,
               "kind": null}, …],
     "partition": {"mode": "none", "vm_cpus": "1-7,9-15", "host_cpus": "0,8",
                   "reason": "…", "cgroup": null},
     "online": "0-15", "present": "0-15", "isolated": "", "nohz_full": "",
     "nodes": {"0": "0-15"}, "leases": [{"cpu": 4, "holder": "…", "role": "vcpu0"}]}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinwarden.cli.common import manager_of, root_of
from pinwarden.errors import LedgerError, PinwardenError

if TYPE_CHECKING:  # the handler imports what it uses: the parser of every command is cheap
    from pinwarden.ledger import HostRecord
    from pinwarden.manager import Manager
    from pinwarden.model import Lease
    from pinwarden.partition import Host, Partition
    from pinwarden.topology import Topology


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "host", parents=[common],
        help="show CPU topology, the VM/housekeeping partition and why",
        description="Show the host's packages, NUMA nodes, cores and threads, which CPUs "
                    "belong to VMs and which to the host (and why), and current leases.")
    parser.set_defaults(handler=run)


def host_json(host: Host, leases: tuple[Lease, ...] = ()) -> dict[str, Any]:
    topo, part = host.topology, host.partition
    cpus = [{
        "cpu": c.id,
        "online": c.online,
        "package": c.package,
        "die": c.die,
        "cluster": c.cluster,
        "core": c.core,
        "siblings": str(c.siblings),
        "package_cpus": str(c.package_cpus),
        "node": c.node,
        "node_known": topo.node_known(c.id),
        "isolated": c.id in topo.isolated,
        "nohz_full": c.id in topo.nohz_full,
        "kind": c.kind,
    } for c in (topo.cpus[i] for i in sorted(topo.cpus))]
    return {
        "cpus": cpus,
        "partition": {"mode": part.mode, "vm_cpus": str(part.vm_cpus),
                      "host_cpus": str(part.host_cpus), "reason": part.reason,
                      "cgroup": part.cgroup},
        "online": str(topo.online),
        "present": str(topo.present),
        "isolated": str(topo.isolated),
        "nohz_full": str(topo.nohz_full),
        "nodes": {str(n): str(cpus) for n, cpus in sorted(topo.nodes.items())},
        "leases": [{"cpu": lease.cpu, "holder": str(lease.holder), "role": lease.role}
                   for lease in leases],
    }


def summary(topo: Topology) -> str:
    cores = topo.cores()
    packages = len({frozenset(p.cpus) for p in topo.packages() if p & topo.online})
    nodes = len([n for n, cpus in topo.nodes.items() if cpus & topo.online])
    threads = f"{max(len(core) for core in cores)}-way SMT" if topo.smt else "no SMT"
    offline = topo.present - topo.online
    extra = f", {len(offline)} offline ({offline})" if offline else ""
    return (f"{len(topo.online)} CPUs online{extra}: {packages} package"
            f"{'s' if packages != 1 else ''}, {nodes} NUMA node{'s' if nodes != 1 else ''}, "
            f"{len(cores)} cores, {threads}")


def _from_ledger(args: argparse.Namespace, root: Path, manager: Manager,
                 ) -> tuple[Host, tuple[Lease, ...], str | None, Partition | None, str | None]:
    """The host (what is planned against: its partition as recorded at the first lease,
    while leases are kept, unless the configuration changed it within its mode), the
    leases, a ledger problem (the host is then read as it is now), the recorded partition
    and a note when the configuration no longer gives the recorded one."""
    if root != Path("/") and not args.state_dir:
        # a dump has no lease database of ours
        return manager.live_host(), (), None, None, None
    try:
        with manager.snapshot():  # (another pinwarden may reserve meanwhile)
            record = manager.record()
            host = manager.host()
            # (CPUs kept after 'release --force' drawn as shared: status hunt)
            leases = (*manager.leases(), *manager.kept_leases())
    except LedgerError as exc:
        return manager.live_host(), (), f"leases unavailable: {exc.message}", None, None
    if record is None:
        return host, leases, None, None, None
    note = disagreement(manager, record)
    if note is None:
        return host, leases, None, None, None
    return host, leases, None, record.partition, f"note: {note}"


def disagreement(manager: Manager, record: HostRecord) -> str | None:
    """What the configuration gives now when it is not the partition recorded at the
    first lease (``record``), which stays what is planned against until the last lease
    goes (``host`` and ``status`` say it), or None."""
    recorded = record.partition
    try:  # (a mode changed in the configuration: host() is the record)
        now: Partition | str = manager.configured_host(record).partition
    except PinwardenError as exc:
        now = exc.message
    if not isinstance(now, str) and \
            (recorded.mode, recorded.vm_cpus) == (now.mode, now.vm_cpus):
        return None
    return _disagreement(now, recorded)


def _cmdline(host: Host) -> str | None:
    """Boot parameters that take the VM CPUs away from the kernel's own noise (IRQs,
    ticks, RCU callbacks, load balancing) — when some of it is not done yet."""
    from pinwarden.isolation import kernel_cmdline

    part, topo = host.partition, host.topology
    if not part.vm_cpus or not part.host_cpus:
        return None
    if part.vm_cpus <= topo.isolated and part.vm_cpus <= topo.nohz_full:
        return None
    # an isolated CPU that is offline now is a VM CPU still (the line named the online
    # ones only: followed, it made the offline CPU the host's at the next boot; v2-lab hunt)
    vm = part.vm_cpus | (topo.isolated - part.host_cpus) if part.mode == "isolcpus" \
        else part.vm_cpus
    return kernel_cmdline(vm, part.host_cpus)


def _disagreement(now: Partition | str, recorded: Partition) -> str:
    """``now``: the partition the configuration gives, or why it gives none."""
    gives = f"no partition ({now})" if isinstance(now, str) else \
        f"partition {now.mode} (VM {now.vm_cpus.named(empty='CPUs -')})"
    return (f"the configuration now gives {gives}; at the first lease the host was "
            f"recorded as {recorded.mode} (VM {recorded.vm_cpus.named(empty='CPUs -')}): "
            f"the leases made then stay, and the host is put back as found when the last "
            f"one goes")


def run(args: argparse.Namespace) -> int:
    from pinwarden.cli import print_json
    from pinwarden.partition import no_housekeeping
    from pinwarden.view import render_cpu_map

    root = root_of(args)
    with manager_of(args) as manager:
        host, leases, problem, recorded, disagreement = _from_ledger(args, root, manager)
    if args.json:
        data = host_json(host, leases)
        data["ledger_error"] = problem
        data["suggested_cmdline"] = _cmdline(host)
        data["lease_problem"] = no_housekeeping(host)
        data["recorded_partition"] = None if recorded is None else {
            "mode": recorded.mode, "vm_cpus": str(recorded.vm_cpus),
            "host_cpus": str(recorded.host_cpus), "reason": recorded.reason}
        print_json(data)
        return 0
    part = host.partition
    lines = [
        f"host {root}: {summary(host.topology)}",
        f"partition {part.mode}: VM {part.vm_cpus.named(empty='CPUs -')}, "
        f"housekeeping {part.host_cpus.named(empty='CPUs -')}",
        f"  because {part.reason}",
    ]
    problem_now = no_housekeeping(host)
    if problem_now is not None:
        lines.append(f"  nothing can be leased: {problem_now}")
    if host.topology.nohz_full:
        lines.append(f"  nohz_full={host.topology.nohz_full}")
    suggested = _cmdline(host)
    if suggested:
        lines.append(f"  to keep kernel noise off the VM CPUs too, boot with: {suggested}")
    if disagreement is not None:
        lines.append(disagreement)
    if problem:
        lines.append(problem)
    lines.append("")
    lines.append(render_cpu_map(host, leases))
    print("\n".join(lines))
    return 0
