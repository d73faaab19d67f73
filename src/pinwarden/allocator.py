"""Topology-aware choice of CPUs for exclusive VMs without explicit pins.  Pure, deterministic.

The allocator sees the host as NUMA nodes made of physical cores made of threads, keeps only
the online CPUs of the pool, and decides in two steps:

1. **Nodes.**  Each allowed node (``Request.nodes``, the numatune nodeset) gets a capacity:
   how many CPUs it could give under the thread policy.  If one node can hold the whole
   request, the *best-fit* node is used: the one with the smallest capacity that still
   fits (ties: lowest number), so big holes stay open for big VMs.  Otherwise the request
   spans the fewest nodes: the largest nodes are taken whole until the rest fits in one
   node, which is again chosen by best fit; at equal capacity, nodes in a package already
   used come first.
2. **Cores within a node**, by thread policy, with Nova's meaning:

   ``prefer`` (default)
       whole free cores first (siblings together), lowest number first; what is left
       (fewer CPUs than a core) goes to the core with the fewest free threads that still
       holds it (best fit: partly used cores are filled before whole ones are broken).
   ``isolate``
       one thread per core, only on cores whose every thread is free; the other threads
       of those cores are returned in :attr:`Allocation.holds` (to be kept empty).  Cores
       with the fewest threads go first, so that as little as possible is held.
   ``require``
       only whole free cores with at least two threads, every thread used; when the count
       does not fill the last core, its leftover threads go to ``holds``.  Refused on a
       host without SMT.

``Allocation.cpus`` lists the CPUs node by node (ascending), core by core (ascending first
CPU), siblings adjacent: give them to vCPUs 0, 1, 2, … in this order and consecutive vCPUs
share cores, as a guest topology with ``threads=2`` expects.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.domain import ThreadPolicy
from pinwarden.errors import InputError, Refusal
from pinwarden.topology import Topology


@dataclass(frozen=True, slots=True)
class Request:
    count: int  # CPUs wanted (vCPUs, plus one for an isolated emulator)
    threads: ThreadPolicy = "prefer"
    nodes: CpuSet | None = None  # allowed host NUMA nodes (numatune nodeset); None: any


@dataclass(frozen=True, slots=True)
class Allocation:
    cpus: tuple[int, ...]  # chosen CPUs, in the order they should be given to vCPUs
    holds: CpuSet = EMPTY  # sibling threads held empty (threads="isolate")


@dataclass(frozen=True, slots=True)
class _Core:
    """A physical core as the allocator sees it: its online threads and the free ones."""

    first: int
    threads: tuple[int, ...]  # every online thread, ascending
    free: tuple[int, ...]  # the free ones (in the pool and not in use), ascending

    @property
    def whole(self) -> bool:
        return len(self.free) == len(self.threads)


def allocate(topology: Topology, pool: CpuSet, free: CpuSet, request: Request) -> Allocation:
    """Choose ``request.count`` CPUs from ``free`` (a subset of ``pool``, the VM CPUs).

    ``pool - free`` is what is already in use; best-fit fills the most-used node/core first.
    Raises :class:`~pinwarden.errors.Refusal` when the request cannot be met.
    """
    count = request.count
    if count < 0:
        raise InputError(f"cannot allocate a negative number of CPUs ({count})")
    if count == 0:
        return Allocation(cpus=())
    policy = request.threads
    host = _host_layout(topology)
    if policy == "require" and not host.smt:
        raise Refusal(
            f"thread policy 'require' needs SMT, but no core of this host has two online "
            f"threads; use thread policy 'prefer' or 'isolate' for these {count} CPUs",
            code="no-smt")

    usable = free.cpus & pool.cpus
    node_free = {node: layout.cpus & usable for node, layout in host.nodes.items()
                 if request.nodes is None or node in request.nodes}
    capacity: dict[int, int] = {}
    for node, cpus in node_free.items():
        cap = _capacity(host.nodes[node].cores, cpus, policy) if cpus else 0
        if cap > 0:
            capacity[node] = cap
    packages = {node: layout.package for node, layout in host.nodes.items()}
    plan = _choose_nodes(capacity, count, packages)
    if plan is None:
        raise Refusal(_refusal_message(request, sum(capacity.values())),
                      code="insufficient-cpus")

    chosen: list[int] = []
    holds: list[int] = []
    for node in sorted(plan):
        cores = _free_cores(host.nodes[node].cores, node_free[node])
        taken, held = _pick(cores, plan[node], policy)
        chosen.extend(taken)
        holds.extend(held)
    return Allocation(cpus=tuple(chosen), holds=CpuSet.of(holds))


# -- the host as nodes of cores ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _HostCore:
    threads: tuple[int, ...]  # every online thread of the core, ascending
    cpus: frozenset[int]  # the same, as a set


@dataclass(frozen=True, slots=True)
class _HostNode:
    cpus: frozenset[int]  # its online CPUs (a thread whose core starts on another node: not)
    package: int  # first CPU of the package of its first CPU (package ids can repeat)
    cores: tuple[_HostCore, ...]  # cores whose first thread is on this node, by first CPU


@dataclass(frozen=True, slots=True)
class _HostLayout:
    nodes: dict[int, _HostNode]
    smt: bool


def _host_layout(topology: Topology) -> _HostLayout:
    """The host as nodes of cores, computed once per :class:`Topology` object.

    Topologies are immutable, so the layout is cached (keyed by identity, with a weak
    reference proving the object is still the same one): a decision then costs set
    operations on the free CPUs only, well under a millisecond on a 1,024-CPU host.
    """
    key = id(topology)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is topology:
        return hit[1]
    online = topology.online.cpus & topology.cpus.keys()
    seen: set[int] = set()
    node_cpus: dict[int, set[int]] = {}
    node_cores: dict[int, list[_HostCore]] = {}
    for cpu in sorted(online):
        if cpu in seen:
            continue
        threads = tuple(sorted((topology.cpus[cpu].siblings.cpus & online) | {cpu}))
        seen.update(threads)
        node = topology.cpus[threads[0]].node
        node_cores.setdefault(node, []).append(_HostCore(threads, frozenset(threads)))
        node_cpus.setdefault(node, set()).update(
            t for t in threads if topology.cpus[t].node == node)
    layout = _HostLayout(
        nodes={n: _HostNode(frozenset(node_cpus[n]), _package(topology, min(node_cpus[n])),
                            tuple(node_cores[n]))
               for n in sorted(node_cores)},
        smt=any(len(c.threads) > 1 for cores in node_cores.values() for c in cores))
    try:
        ref = weakref.ref(topology)
    except TypeError:  # pragma: no cover - a Topology without weak references: no cache
        return layout
    if len(_LAYOUTS) >= _LAYOUT_CACHE_SIZE:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (ref, layout)
    return layout


def _package(topology: Topology, cpu: int) -> int:
    info = topology.cpus[cpu]
    if info.package_cpus:
        return info.package_cpus.first()
    return -1 - info.package if info.package is not None else -1  # never a CPU number


_LAYOUT_CACHE_SIZE = 16
_LAYOUTS: dict[int, tuple[weakref.ref[Topology], _HostLayout]] = {}


def _capacity(cores: Sequence[_HostCore], free: frozenset[int], policy: ThreadPolicy) -> int:
    """How many CPUs a node can give under ``policy``; ``free``: its free CPUs.

    A thread counts as used when it is not in ``free``, whoever uses it (another VM, the
    host's housekeeping CPUs outside the pool): such a core is never whole.
    """
    if policy == "prefer":
        return len(free)
    if policy == "isolate":
        return sum(1 for c in cores if c.cpus <= free)
    if policy == "whole":
        return sum(len(c.threads) for c in cores if c.cpus <= free)
    return sum(len(c.threads) for c in cores if len(c.threads) > 1 and c.cpus <= free)


def _free_cores(cores: Sequence[_HostCore], free: frozenset[int]) -> list[_Core]:
    """The node's cores with at least one free thread, by first CPU."""
    out: list[_Core] = []
    for core in cores:
        if core.cpus.isdisjoint(free):
            continue
        out.append(_Core(core.threads[0], core.threads,
                         tuple(t for t in core.threads if t in free)))
    return out


def _eligible(cores: Iterable[_Core], policy: ThreadPolicy) -> list[_Core]:
    if policy == "prefer":
        return list(cores)
    if policy in ("isolate", "whole"):
        return [c for c in cores if c.whole]
    return [c for c in cores if c.whole and len(c.threads) > 1]


def _choose_nodes(capacity: dict[int, int], count: int,
                  package: dict[int, int]) -> dict[int, int] | None:
    """Node → how many CPUs to take there: one best-fit node, else the fewest nodes.

    Spanning, the largest nodes are taken whole until the rest fits in one node, chosen by
    best fit; at equal capacity a node in a package already used comes first (a hop
    within a package is shorter than one across packages).
    """
    if sum(capacity.values()) < count:
        return None
    plan: dict[int, int] = {}
    need = count
    rest = set(capacity)
    while need > 0:
        used = {package[n] for n in plan}
        fits = [n for n in rest if capacity[n] >= need]
        if fits:
            best = min(fits, key=lambda n: (capacity[n], bool(plan) and package[n] not in used,
                                            n))
            plan[best] = need
            return plan
        biggest = min(rest, key=lambda n: (-capacity[n], bool(plan) and package[n] not in used,
                                           n))
        rest.remove(biggest)
        plan[biggest] = capacity[biggest]
        need -= capacity[biggest]
    return plan  # pragma: no cover - the loop returns once the rest fits


# -- cores within one node -----------------------------------------------------------------

def _pick(cores: Sequence[_Core], count: int,
          policy: ThreadPolicy) -> tuple[list[int], list[int]]:
    """Choose ``count`` CPUs among ``cores`` of one node: (CPUs in vCPU order, holds)."""
    taken: dict[int, tuple[_Core, tuple[int, ...]]] = {}
    holds: list[int] = []
    if policy == "prefer":
        _pick_prefer(cores, count, taken)
    else:
        need = count
        ordered = sorted(_eligible(cores, policy), key=lambda c: (len(c.threads), c.first))
        for core in ordered:
            if need == 0:
                break
            use = 1 if policy == "isolate" else min(need, len(core.threads))
            taken[core.first] = (core, core.threads[:use])
            holds.extend(core.threads[use:])
            need -= use
    cpus = [cpu for first in sorted(taken) for cpu in taken[first][1]]
    return cpus, holds


def _pick_prefer(cores: Sequence[_Core], count: int,
                 taken: dict[int, tuple[_Core, tuple[int, ...]]]) -> None:
    need = count
    # Whole free cores first, lowest first, while a whole core is not more than needed.
    for core in cores:
        if core.whole and len(core.free) <= need:
            taken[core.first] = (core, core.free)
            need -= len(core.free)
            if need == 0:
                return
    # The rest: best fit, the core with the fewest free threads that still holds what is
    # left (partly used cores before whole ones at equal size); when none holds it, the
    # core with the most free threads, to keep the VM's threads on as few cores as possible.
    buckets: dict[int, list[_Core]] = {}  # number of free threads -> cores, by first CPU
    for core in cores:
        if core.first not in taken:
            buckets.setdefault(len(core.free), []).append(core)
    sizes = sorted(buckets)
    used = dict.fromkeys(sizes, 0)  # how many of each bucket (its first ones) are taken
    while need > 0:
        fit = next((k for k in sizes if k >= need and used[k] < len(buckets[k])), None)
        if fit is not None:
            core = min(buckets[fit][used[fit]:], key=lambda c: (c.whole, c.first))
            taken[core.first] = (core, core.free[:need])
            return
        largest = max(k for k in sizes if used[k] < len(buckets[k]))
        core = buckets[largest][used[largest]]
        used[largest] += 1
        taken[core.first] = (core, core.free)
        need -= largest


def _refusal_message(request: Request, available: int) -> str:
    where = f" on NUMA nodes {request.nodes.to_list()}" if request.nodes is not None else ""
    if request.threads == "isolate":
        what = f"{available} whole free cores (one CPU each under thread policy 'isolate')"
        relax = "use thread policy 'prefer'"
    elif request.threads == "require":
        what = f"{available} CPUs on whole free SMT cores (thread policy 'require')"
        relax = "use thread policy 'prefer'"
    elif request.threads == "whole":
        what = f"{available} CPUs on whole free cores (thread policy 'whole')"
        relax = "share cores with thread policy 'prefer'"
    else:
        what = f"{available} free CPUs"
        relax = "lower the vCPU count"
    widen = "widen the numatune nodeset or " if request.nodes is not None else ""
    return f"cannot place {request.count} CPUs: only {what}{where}; {widen}{relax}"
