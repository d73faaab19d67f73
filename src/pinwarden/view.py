"""A terminal picture of the host: packages → NUMA nodes → cores → threads.  Pure.

Each CPU is one character::

    h  housekeeping (the OS's CPUs)       v  VM CPU, shared pool
    i  VM CPU isolated by isolcpus=      .  offline
    A…Z  leased to the holder named in the legend (not H, I or V; # when there are more
         than 23 holders)
    a…z  held empty for that holder: the sibling thread of a core it uses (whole cores)

Small hosts (≤ 64 present CPUs) get one line per physical core naming every thread; larger
ones get compact rows of up to 16 cores (one character per thread, cores separated by a
space), each row labelled with the first CPU of its cores, so 1,024 CPUs fit a screen.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from pinwarden.cpuset import CpuSet
from pinwarden.model import KEPT_ROLE, SIBLING_HOLD, HolderRef, Lease, kept_why
from pinwarden.partition import Host

HOUSEKEEPING, SHARED, ISOLATED, OFFLINE, MORE = "h", "v", "i", ".", "#"
#: A holder's mark, and in lower case its held siblings' — never a letter whose lower case
#: is one of the marks above: the 8th, 9th and 22nd holders' held CPUs read as housekeeping,
#: isolated and shared CPUs, and the legend listed those as held for them (CLI hunt).
HOLDER_MARKS = "".join(c for c in string.ascii_uppercase
                       if c.lower() not in (HOUSEKEEPING, SHARED, ISOLATED))
DETAILED_LIMIT = 64  # present CPUs up to which every core gets a line of its own
ROW_WIDTH = 64  # characters of thread marks per compact row


class _Group:
    """(A plain class: a record costs a compile at import.)"""

    __slots__ = ("cores", "node", "offline", "package")

    def __init__(self, package: int | None, node: int | None,
                 cores: tuple[tuple[int, ...], ...], offline: bool = False) -> None:
        self.package = package
        self.node = node
        self.cores = cores  # threads of each core, cores ordered by first CPU
        self.offline = offline  # offline CPUs of unknown place


def _groups(host: Host) -> list[_Group]:
    """CPUs grouped by (package, NUMA node), packages and cores in CPU order."""
    topo = host.topology
    done: set[int] = set()
    cores: list[tuple[int, ...]] = []
    for cpu in sorted(topo.cpus):
        if cpu in done:
            continue
        threads = tuple(t for t in sorted(topo.siblings(cpu) | CpuSet.of([cpu]))
                        if t in topo.cpus and t not in done)
        done.update(threads)
        cores.append(threads)
    by_key: dict[tuple[int, int | None], list[tuple[int, ...]]] = {}
    labels: dict[tuple[int, int | None], tuple[int | None, int | None]] = {}
    unknown: list[tuple[int, ...]] = []  # offline CPUs whose topology the kernel hides
    for threads in cores:
        info = topo.cpu(threads[0])
        if not info.online and info.package is None and len(threads) == 1:
            unknown.append(threads)
            continue
        package_key = (info.package_cpus or CpuSet.of([info.id])).first()
        node = info.node if topo.node_known(info.id) else None
        key = (package_key, node)
        by_key.setdefault(key, []).append(threads)
        labels[key] = (info.package, node)
    out = []
    for key in sorted(by_key, key=lambda k: (k[0], min(by_key[k][0]))):
        package, node = labels[key]
        out.append(_Group(package, node, tuple(by_key[key])))
    if unknown:
        out.append(_Group(None, None, tuple(unknown), offline=True))
    return out


def _marks(host: Host, leases: Sequence[Lease]) -> tuple[dict[int, str], dict[str, HolderRef]]:
    topo, part = host.topology, host.partition
    holders: dict[HolderRef, str] = {}
    leased: dict[int, str] = {}
    for lease in sorted(leases, key=lambda item: item.cpu):
        if lease.holder not in holders:
            n = len(holders)
            holders[lease.holder] = HOLDER_MARKS[n] if n < len(HOLDER_MARKS) else MORE
        mark = holders[lease.holder]
        leased[lease.cpu] = mark.lower() if lease.role == SIBLING_HOLD else mark
    marks: dict[int, str] = {}
    for cpu in topo.cpus:
        if cpu in leased:
            marks[cpu] = leased[cpu]
        elif cpu not in topo.online:
            marks[cpu] = OFFLINE
        elif cpu in part.vm_cpus:
            marks[cpu] = ISOLATED if cpu in topo.isolated else SHARED
        else:
            marks[cpu] = HOUSEKEEPING
    legend = {mark: holder for holder, mark in holders.items() if mark != MORE}
    return marks, legend


def _title(group: _Group, cpus: CpuSet) -> str:
    if group.offline:
        return f"offline, place unknown · CPUs {cpus}"
    package = "?" if group.package is None else str(group.package)
    node = "?" if group.node is None else str(group.node)
    return f"package {package} · node {node} · CPUs {cpus}"


def render_cpu_map(host: Host, leases: Sequence[Lease] = ()) -> str:
    """The CPU map with its legend, as lines joined by newlines (no trailing newline)."""
    topo = host.topology
    marks, holders = _marks(host, leases)
    detailed = len(topo.cpus) <= DETAILED_LIMIT
    lines: list[str] = []
    for group in _groups(host):
        cpus = CpuSet.of(t for core in group.cores for t in core)
        lines.append(_title(group, cpus))
        if group.offline:  # (a leased one keeps its holder's mark, as the legend has it:
            # drawn '.', the legend named a holder the map did not show; v2-lab hunt)
            lines.append("  " + "".join(marks[t] for t in cpus))
            continue
        if detailed:
            width = len(str(max(topo.cpus)))
            for threads in group.cores:
                core_id = topo.cpu(threads[0]).core
                label = f"core {'?' if core_id is None else core_id}"
                cells = "  ".join(f"{t:>{width}} {marks[t]}" for t in threads)
                kind = topo.cpu(threads[0]).kind
                lines.append(f"  {label:<9} {cells}" + (f"  ({kind})" if kind else ""))
            continue
        threads_per_core = max(len(core) for core in group.cores)
        fit = max(1, ROW_WIDTH // (threads_per_core + 1))
        per_row = 1 << (fit.bit_length() - 1)  # a power of two: rows start at round CPUs
        width = len(str(max(topo.cpus))) * 2 + 1
        for start in range(0, len(group.cores), per_row):
            row = group.cores[start:start + per_row]
            label = str(CpuSet.of(core[0] for core in row))
            if len(label) > width:
                label = f"{row[0][0]}…"
            cells = " ".join("".join(marks[t] for t in core) for core in row)
            lines.append(f"  {label:<{width}} {cells}")
    lines.extend(_legend(host, marks, holders, leases))
    if not detailed:
        lines.append("        rows: one character per thread, one group per core, labelled "
                     "by the first CPU of each core")
    return "\n".join(lines)


def _legend(host: Host, marks: dict[int, str], holders: dict[str, HolderRef],
            leases: Sequence[Lease]) -> list[str]:
    def cpus_with(mark: str) -> CpuSet:
        return CpuSet.of(c for c, m in marks.items() if m == mark)

    names = ((HOUSEKEEPING, "housekeeping"), (SHARED, "VM, shared"),
             (ISOLATED, "VM, isolated"), (OFFLINE, "offline"))
    always = (HOUSEKEEPING,) if host.partition.mode == "isolcpus" else (HOUSEKEEPING, SHARED)
    parts = [f"{mark} {name} ({cpus_with(mark) or '-'})" for mark, name in names
             if mark in always or cpus_with(mark)]
    lines = [("legend: " if i == 0 else "        ") + part for i, part in enumerate(parts)]
    kept = {lease.holder for lease in leases if lease.role == KEPT_ROLE}
    for mark, holder in sorted(holders.items()):
        lines.append(f"        {mark} kept by {holder}, {kept_why(holder)} "
                     f"({cpus_with(mark)})" if holder in kept else
                     f"        {mark} leased to {holder} ({cpus_with(mark)})")
        held = cpus_with(mark.lower())
        if held:
            lines.append(f"        {mark.lower()} held empty for {holder}: sibling threads "
                         f"of its cores ({held})")
    more = cpus_with(MORE)
    if more:
        count = len({lease.holder for lease in leases if lease.cpu in more})
        lines.append(f"        {MORE} leased to {count} more holders ({more})")
    absent = CpuSet.of(lease.cpu for lease in leases if lease.cpu not in host.topology.cpus)
    if absent:
        lines.append(f"        leases name CPUs this host does not have: {absent}")
    return lines
