"""Topology-aware choice of CPUs for exclusive VMs without explicit pins.  Pure, deterministic.

The allocator sees the host as NUMA nodes made of physical cores made of threads, keeps only
the online CPUs of the pool, and decides in two steps:

1. **Nodes.**  Each allowed node (``Request.nodes``, the numatune nodeset) gets a capacity:
   how many CPUs it could give under the thread policy.  If one node can hold the whole
   request, the *best-fit* node is used: the one with the smallest capacity that still
   fits (ties: lowest number), so big holes stay open for big VMs; under ``prefer`` a node
   where the request breaks no whole core comes before a better-fitting one where it
   would (whole cores are what ``whole``, ``isolate`` and ``require`` holders need).
   Otherwise the request spans the fewest nodes: the largest nodes are taken whole until
   the rest fits in one node, which is again chosen by best fit; at equal capacity, nodes
   in a package already used come first.  A request is refused only when the allowed
   nodes together cannot give it (the sum of their capacities is too small): whenever
   some set of free CPUs satisfies the thread policy, the allocator finds one.
2. **Cores within a node**, by thread policy:

   ``whole`` (the default, issue #11)
       whole free cores only, every thread used, so no core is ever split between two
       holders; when the count does not fill the last core, its spare threads go to
       ``holds`` (kept empty).  Larger cores first (siblings together), the remainder on
       the smallest core that holds it.  On a host without SMT: one CPU per core, nothing
       held.  Capacity of a node: the threads of its whole free cores.
   ``prefer`` (opt-in to sharing a core with another holder; Nova's meaning)
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

Speed: the host's layout (nodes of cores, each core a bitmask) is built once per
:class:`Topology` object (a node's table of core masks and index of cores only when a
decision first needs them: most decisions look at one node), and the mask of the pool
once per pool object; a decision turns the free CPUs into one integer bitmask (from the
taken ones when most are free) and works on masks of nodes and cores (about 0.1 ms on a
1,024-CPU host, see bench/README.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import Literal

from pinwarden.cpuset import EMPTY, CpuSet, plural
from pinwarden.domain import ThreadPolicy
from pinwarden.errors import InputError, Refusal
from pinwarden.record import record
from pinwarden.topology import Topology


@record
class Request:
    """What to allocate: how many CPUs, under which thread policy, on which nodes."""

    count: int  # CPUs wanted (vCPUs, plus one for an isolated emulator)
    threads: ThreadPolicy = "whole"
    nodes: CpuSet | None = None  # allowed host NUMA nodes (numatune nodeset); None: any
    #: what the CPUs are for, so that a refusal says what to change: a VM's vCPUs, its
    #: vCPUs and (the last CPU) its isolated emulator, the isolated emulator alone (the
    #: vCPUs are pinned), or a job's tasks (``pinwarden run --exclusive N``)
    purpose: Literal["vcpus", "vcpus+emulator", "emulator", "job"] = "vcpus"


@record
class Allocation:
    """The CPUs chosen, in vCPU order, and the threads held empty."""

    cpus: tuple[int, ...]  # chosen CPUs, in the order they should be given to vCPUs
    holds: CpuSet = EMPTY  # threads held empty (siblings under isolate; spares under whole/require)


#: Thread policies that take whole free cores only (every thread of a core used or held).
_WHOLE_CORES = ("whole", "require")


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
            f"threads; use thread policy 'prefer' or 'isolate' for "
            f"{'this CPU' if count == 1 else f'these {count} CPUs'}",
            code="no-smt")

    mask = _free_mask(host, pool, free)
    wanted = request.nodes
    states: dict[int, _NodeState] = {}
    capacity: dict[int, int] = {}
    for node_id, node in host.nodes.items():
        if wanted is not None and node_id not in wanted:
            continue
        nfree = mask & node.mask
        if not nfree:
            continue
        state = _node_state(node, nfree, policy)
        if state.capacity > 0:
            states[node_id] = state
            capacity[node_id] = state.capacity
    plan = _choose_nodes(host, states, count, policy)
    if plan is None:
        nodes = [n for i, n in host.nodes.items() if wanted is None or i in wanted]
        free_cpus = sum((mask & n.mask).bit_count() for n in nodes)
        raise Refusal(_refusal_message(request, sum(capacity.values()), free_cpus),
                      code="insufficient-cpus")

    chosen: list[int] = []
    holds: list[int] = []
    for node_id in sorted(plan):
        taken, held = _pick(host.nodes[node_id], states[node_id], plan[node_id], policy)
        chosen.extend(taken)
        holds.extend(held)
    return Allocation(cpus=tuple(chosen), holds=CpuSet(frozenset(holds)) if holds else EMPTY)


# -- the host as nodes of cores ------------------------------------------------------------
# Plain classes, not records, for these private ones: defining even a record (one compile)
# costs every command something at import (issue #12).

class _HostNode:
    __slots__ = ("_bit", "_cores", "_index", "firsts", "mask", "offsets", "package", "threads",
                 "uniform")

    def __init__(self, *, mask: int, firsts: int, package: int,
                 threads: tuple[tuple[int, ...], ...], offsets: tuple[int, ...] | None,
                 uniform: int, bit: tuple[int, ...], cores: tuple[int, ...] | None) -> None:
        self.mask = mask  # its online threads (every thread of the cores whose first is here)
        self.firsts = firsts  # the first thread of each of its cores
        self.package = package  # first CPU of the package of its first CPU (ids can repeat)
        self.threads = threads  # each core's online threads, ascending, cores by first CPU
        #: When every core of the node is ``first + offsets`` (the same offsets, e.g.
        #: (0, 64) on Linux's numbering or (0, 1) with adjacent siblings): whole cores are
        #: found with a few shifts of the free mask instead of a loop over cores.
        self.offsets = offsets
        self.uniform = uniform  # threads per core when every core has as many, else 0
        # Built when a decision first needs them (most need them on one node only): a
        # host's first decision does not pay for the tables of every node.
        self._bit = bit  # the layout's bit table (covers every thread here)
        self._cores = cores
        self._index: dict[int, int] | None = None

    @property
    def cores(self) -> tuple[int, ...]:
        """Core masks, by first CPU."""
        cores = self._cores
        if cores is None:
            bit = self._bit
            cores = self._cores = tuple([sum([bit[t] for t in threads])
                                         for threads in self.threads])
        return cores

    @property
    def index(self) -> dict[int, int]:
        """First thread -> core index."""
        index = self._index
        if index is None:
            index = self._index = {t[0]: i for i, t in enumerate(self.threads)}
        return index


class _HostLayout:
    __slots__ = ("bit", "mask", "nodes", "online", "package", "smt")

    def __init__(self, *, nodes: dict[int, _HostNode], package: dict[int, int],
                 online: frozenset[int], bit: tuple[int, ...], smt: bool) -> None:
        self.nodes = nodes  # by node number, ascending
        self.package = package  # node -> package key
        self.online = online  # every online CPU (each belongs to exactly one core here)
        self.mask = sum([node.mask for node in nodes.values()])  # of every online CPU
        self.bit = bit  # bit[cpu] == 1 << cpu, for every cpu up to at least the last online
        self.smt = smt


def _host_layout(topology: Topology) -> _HostLayout:
    """The host as nodes of cores, computed once per :class:`Topology` object.

    Topologies are immutable, so the layout is cached (keyed by identity, with a weak
    reference proving the object is still the same one).  A core belongs to the node of its
    first online thread.
    """
    key = id(topology)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is topology:
        return hit[1]
    layout = _build_layout(topology)
    try:
        # The entry goes with its topology; dropping the oldest one at a time keeps the
        # cost of freeing layouts out of any one decision (a whole cache of 1,024-CPU
        # layouts takes milliseconds to free).
        ref = weakref.ref(topology, lambda _dead: _LAYOUTS.pop(key, None))
    except TypeError:  # pragma: no cover - a Topology without weak references: no cache
        return layout
    # The daemon decides in more than one thread: a copy of the keys (taken whole, under
    # the GIL) and pop() with a default never see the dict change underneath them.
    for old in list(_LAYOUTS)[:max(0, len(_LAYOUTS) + 1 - _LAYOUT_CACHE_SIZE)]:
        _LAYOUTS.pop(old, None)
    _LAYOUTS[key] = (ref, layout)
    return layout


def _cores_of(topology: Topology,
              online: frozenset[int]) -> tuple[list[tuple[int, ...]], bool]:
    """The online threads of every core, ascending, cores by first thread; and whether
    every core has two online threads."""
    cpus = topology.cpus
    distinct = {cpus[cpu].siblings.cpus for cpu in online}
    if sum(map(len, distinct)) == len(online) and frozenset().union(*distinct) == online:
        # The common, consistent case: the sibling lists partition the online CPUs.
        if len(online) == 2 * len(distinct) and set(map(len, distinct)) == {2}:
            # Two threads a core (most hosts): ordered without sorting each pair.
            return sorted([(a, b) if a < b else (b, a) for a, b in distinct],
                          key=itemgetter(0)), True
        return sorted(map(tuple, map(sorted, distinct)), key=itemgetter(0)), False
    # Offline siblings, or inconsistent sibling lists (a CPU missing from its own list, or
    # in two lists): each online CPU goes to the first core that claims it.
    seen: set[int] = set()
    out: list[tuple[int, ...]] = []
    for cpu in sorted(online):
        if cpu not in seen:
            threads = tuple(sorted(((cpus[cpu].siblings.cpus & online) | {cpu}) - seen))
            seen.update(threads)
            out.append(threads)
    return out, False


def _build_layout(topology: Topology) -> _HostLayout:
    cpus = topology.cpus
    online = topology.online.cpus
    if not online.issubset(cpus):
        online = online & cpus.keys()
    bit = _bits(max(online, default=-1) + 1)
    node_cores: dict[int, list[tuple[int, ...]]] = {}
    every_core, pairs = _cores_of(topology, online)
    for threads in every_core:
        node_cores.setdefault(cpus[threads[0]].node, []).append(threads)
    nodes: dict[int, _HostNode] = {}
    smt = False
    for node_id in sorted(node_cores):
        cores = node_cores[node_id]
        sizes = {2} if pairs else set(map(len, cores))
        offsets: tuple[int, ...] | None = None
        masks: tuple[int, ...] | None = None
        if sizes == {1}:
            offsets = (0,)
        elif sizes == {2}:
            gaps = {b - a for a, b in cores}
            offsets = (0, gaps.pop()) if len(gaps) == 1 else None
        else:
            shapes = {tuple([t - threads[0] for t in threads]) for threads in cores}
            offsets = shapes.pop() if len(shapes) == 1 else None
        smt = smt or max(sizes) > 1
        firsts = sum([bit[t[0]] for t in cores])
        if offsets is None:
            masks = tuple([sum([bit[t] for t in threads]) for threads in cores])
            mask = sum(masks)
        else:  # cores of one shape: the node is its first threads shifted by the offsets
            mask = sum([firsts << o for o in offsets])
        nodes[node_id] = _HostNode(
            mask=mask, firsts=firsts, package=_package(topology, cores[0][0]),
            threads=tuple(cores), offsets=offsets,
            uniform=sizes.pop() if len(sizes) == 1 else 0, bit=bit, cores=masks)
    return _HostLayout(nodes=nodes, package={n: node.package for n, node in nodes.items()},
                       online=frozenset(online), bit=bit, smt=smt)


def _bits(count: int) -> tuple[int, ...]:
    """``(1 << 0, 1 << 1, …)``, at least ``count`` long: one table shared by every layout."""
    global _BITS
    table = _BITS  # read once: another thread may replace it meanwhile, with a shorter one
    if len(table) < count:
        table = _BITS = tuple([1 << c for c in range(count)])
    return table


_BITS: tuple[int, ...] = ()


def _package(topology: Topology, cpu: int) -> int:
    info = topology.cpus[cpu]
    if info.package_cpus:
        return info.package_cpus.first()
    return -1 - info.package if info.package is not None else -1  # never a CPU number


_LAYOUT_CACHE_SIZE = 16
_LAYOUTS: dict[int, tuple[weakref.ref[Topology], _HostLayout]] = {}

#: The last (layout, pool, mask of the pool's online CPUs), by identity (both immutable):
#: decisions on one host share one pool.
_POOL_MASKS: list[tuple[_HostLayout, frozenset[int], int]] = []


def _free_mask(host: _HostLayout, pool: CpuSet, free: CpuSet) -> int:
    """The mask of the usable CPUs: free, in the pool, online.  Masks are sums of distinct
    powers of two; the fewer CPUs summed the better, so a mostly free pool is the pool's
    mask without the taken CPUs."""
    bit = host.bit
    try:
        if 2 * len(free.cpus) > len(pool.cpus):
            return _pool_mask(host, pool) & ~sum(map(bit.__getitem__, pool.cpus - free.cpus))
        return _pool_mask(host, pool) & sum(map(bit.__getitem__, free.cpus))
    except IndexError:  # a CPU above the last online one
        return sum(map(bit.__getitem__, free.cpus & pool.cpus & host.online))


def _pool_mask(host: _HostLayout, pool: CpuSet) -> int:
    """The mask of the online CPUs of ``pool``."""
    cpus = pool.cpus
    for layout, seen, mask in _POOL_MASKS:
        if layout is host and seen is cpus:
            return mask
    online = host.online
    if 2 * len(cpus) > len(online):  # the pool names most online CPUs: the mask less the others
        mask = host.mask & ~sum(map(host.bit.__getitem__, online - cpus))
    else:
        mask = sum(map(host.bit.__getitem__, cpus & online))
    _POOL_MASKS[:] = [(host, cpus, mask)]
    return mask


# -- one node under one request --------------------------------------------------------------

class _NodeState:
    __slots__ = ("capacity", "free", "partial", "whole")

    def __init__(self, free: int, capacity: int, whole: int, partial: int) -> None:
        self.free = free  # mask of its free threads
        self.capacity = capacity  # CPUs it can give under the policy
        self.whole = whole  # first threads of its whole free cores eligible under the policy
        self.partial = partial  # first threads of the cores partly free (prefer)


def _node_state(node: _HostNode, free: int, policy: ThreadPolicy) -> _NodeState:
    """Capacity (how many CPUs the node can give under ``policy``) and its free cores.

    A thread counts as used when it is not free, whoever uses it (another holder, the
    host's housekeeping CPUs outside the pool): such a core is never whole.
    """
    offsets = node.offsets
    partial = 0
    if offsets is not None:
        whole = free & node.firsts
        for o in offsets[1:]:
            whole &= free >> o
        if policy == "prefer" and len(offsets) > 1:
            some = free
            for o in offsets[1:]:
                some |= free >> o
            partial = some & node.firsts & ~whole
    else:
        whole = 0
        for first, core in zip(node.index, node.cores, strict=True):
            f = free & core
            if f == core:
                whole |= 1 << first
            elif f and policy == "prefer":
                partial |= 1 << first
    if policy == "prefer":
        return _NodeState(free, free.bit_count(), whole, partial)
    if policy == "isolate":
        return _NodeState(free, whole.bit_count(), whole, 0)
    if node.uniform:
        if policy == "require" and node.uniform < 2:
            return _NodeState(free, 0, 0, 0)
        return _NodeState(free, whole.bit_count() * node.uniform, whole, 0)
    threads, index = node.threads, node.index
    capacity = 0
    for i in _indexes(whole, index):
        size = len(threads[i])
        if policy == "require" and size < 2:
            whole &= ~(1 << threads[i][0])
        else:
            capacity += size
    return _NodeState(free, capacity, whole, 0)


def _indexes(mask: int, index: dict[int, int]) -> Iterator[int]:
    """Core indexes of the first threads in ``mask``, ascending."""
    while mask:
        low = mask & -mask
        yield index[low.bit_length() - 1]
        mask ^= low


def _breaks_a_whole_core(node: _HostNode, state: _NodeState, count: int) -> bool:
    """Would ``prefer`` placing ``count`` CPUs on this node leave a whole core part-used?

    Counted from the node's state where all its cores have the same number of threads
    (every host the benchmark knows); elsewhere answered by a trial pick."""
    size = node.uniform
    if not size:
        return _pick_prefer(node, state, count)[1]
    whole = state.whole.bit_count()
    taken = min(whole, count // size)
    rest = count - taken * size
    if rest == 0 or rest >= size or taken == whole:
        return False  # no remainder, or no whole core left to break
    if size == 2:
        return not state.partial
    free, cores = state.free, node.cores
    return not any((free & cores[i]).bit_count() >= rest
                   for i in _indexes(state.partial, node.index))


def _choose_nodes(host: _HostLayout, states: dict[int, _NodeState], count: int,
                  policy: ThreadPolicy) -> dict[int, int] | None:
    """Node → how many CPUs to take there: one best-fit node, else the fewest nodes.

    Spanning, the largest nodes are taken whole until the rest fits in one node, chosen by
    best fit; at equal capacity a node in a package already used comes first (a hop
    within a package is shorter than one across packages).
    """
    capacity = {n: s.capacity for n, s in states.items()}
    if sum(capacity.values()) < count:
        return None
    package = host.package
    plan: dict[int, int] = {}
    need = count
    used: set[int] = set()  # packages of the nodes taken whole so far
    while need > 0:
        fits = [n for n, c in capacity.items() if c >= need]
        if fits:
            def fit_key(n: int) -> tuple[int, bool, int]:
                return capacity[n], bool(used) and package[n] not in used, n
            if policy == "prefer" and len(fits) > 1:
                fits.sort(key=fit_key)
                best = next((n for n in fits if not _breaks_a_whole_core(
                    host.nodes[n], states[n], need)), fits[0])
            else:
                best = min(fits, key=fit_key)
            plan[best] = need
            return plan
        biggest = min(capacity, key=lambda n: (-capacity[n],
                                               bool(used) and package[n] not in used, n))
        plan[biggest] = capacity.pop(biggest)
        need -= plan[biggest]
        used.add(package[biggest])
    return plan  # pragma: no cover - the loop returns once the rest fits


# -- cores within one node -----------------------------------------------------------------

def _pick(node: _HostNode, state: _NodeState, count: int,
          policy: ThreadPolicy) -> tuple[list[int], list[int]]:
    """Choose ``count`` CPUs on one node: (CPUs in vCPU order, holds)."""
    if policy == "prefer":
        return _pick_prefer(node, state, count)[0], []
    threads = node.threads
    chosen: dict[int, tuple[int, ...]] = {}  # core index -> threads used
    holds: list[int] = []
    if policy == "isolate":
        # Cores with the fewest threads first (as little held as possible), lowest first.
        order: Iterable[int] = _indexes(state.whole, node.index)
        if not node.uniform:
            order = sorted(order, key=lambda i: len(threads[i]))
        for i in order:
            if len(chosen) == count:
                break
            chosen[i] = threads[i][:1]
            holds.extend(threads[i][1:])
    elif node.uniform:  # whole, require: whole cores, lowest first; the last one's spare held
        # Cores come in ascending order, so the CPUs are already in vCPU order.
        cpus: list[int] = []
        full, part = divmod(count, node.uniform)
        for i in _indexes(state.whole, node.index):
            if full:
                cpus.extend(threads[i])
                full -= 1
            else:
                cpus.extend(threads[i][:part])
                holds.extend(threads[i][part:])
                part = 0
            if not full and not part:
                break
        return cpus, holds
    else:  # whole, require, mixed core sizes: larger cores first, the rest best fit
        need = count
        left = sorted(_indexes(state.whole, node.index), key=lambda i: -len(threads[i]))
        rest: list[int] = []
        for i in left:
            if need == 0 or len(threads[i]) > need:
                rest.append(i)
            else:
                chosen[i] = threads[i]
                need -= len(threads[i])
        while need > 0:
            fits = [i for i in rest if len(threads[i]) >= need]
            i = min(fits, key=lambda i: (len(threads[i]), i)) if fits else rest[0]
            rest.remove(i)
            use = threads[i][:need]
            chosen[i] = use
            holds.extend(threads[i][len(use):])
            need -= len(use)
    cpus = [cpu for i in sorted(chosen) for cpu in chosen[i]]
    return cpus, holds


def _pick_prefer(node: _HostNode, state: _NodeState, count: int) -> tuple[list[int], bool]:
    """``prefer`` on one node: (CPUs in vCPU order, whether a whole core was broken)."""
    threads, index = node.threads, node.index
    need = count
    chosen: dict[int, tuple[int, ...]] = {}
    # Whole free cores first, lowest first, while a whole core is not more than needed.
    for i in _indexes(state.whole, index):
        size = len(threads[i])
        if size <= need:
            chosen[i] = threads[i]
            need -= size
            if need == 0:
                return [c for k in sorted(chosen) for c in chosen[k]], False
    # The rest: best fit, the core with the fewest free threads that still holds what is
    # left (partly used cores before whole ones at equal size); when none holds it, the
    # core with the most free threads, to keep the VM's threads on as few cores as possible.
    free, cores = state.free, node.cores
    left = [((free & cores[i]).bit_count(), 1, i) for i in _indexes(state.partial, index)]
    left += [(len(threads[i]), 2, i) for i in _indexes(state.whole, index) if i not in chosen]
    broken = False
    while need > 0:
        fit = min((c for c in left if c[0] >= need), default=None)
        if fit is None:
            fit = min(left, key=lambda c: (-c[0], c[2]))
        left.remove(fit)
        n, kind, i = fit
        use = min(need, n)
        chosen[i] = tuple(t for t in threads[i] if free >> t & 1)[:use]
        broken = broken or (kind == 2 and use < n)
        need -= use
    return [c for k in sorted(chosen) for c in chosen[k]], broken


def _refusal_message(request: Request, available: int, free_cpus: int) -> str:
    """``available``: what the request's thread policy can use; ``free_cpus``: every free
    CPU there.  A thread policy is named, and relaxing it advised, only when the free CPUs
    would hold the request without it: on a host without SMT, or with too few free CPUs,
    the thread policy is not what refuses."""
    nodes = request.nodes
    where = "" if nodes is None else f" on NUMA {nodes.named('node')}"
    wanted = request.count
    # how the holder asks for it: a job's option, a domain's thread policy
    prefer = "--threads prefer" if request.purpose == "job" else "thread policy 'prefer'"
    if request.threads == "prefer" or free_cpus < wanted:
        what = plural(free_cpus, 'free CPU')
        relax = {"vcpus": "lower the vCPU count", "job": "ask for fewer CPUs",
                 "vcpus+emulator": "lower the vCPU count", "emulator": ""}[request.purpose]
        if request.purpose in ("vcpus", "job") and wanted <= 1:
            relax = ""  # there is nothing lower to ask for
    elif request.threads == "isolate":
        what = f"{plural(available, 'whole free core')} (one CPU each under thread policy " \
               "'isolate')"
        relax = f"use {prefer}"
    elif request.threads == "require":
        what = f"{plural(available, 'CPU')} on whole free SMT cores (thread policy 'require')"
        relax = f"use {prefer}"
    else:
        what = f"{plural(available, 'CPU')} on whole free cores (thread policy 'whole')"
        relax = f"use {prefer} to share cores with other holders"
    widen = "widen the numatune nodeset" if nodes is not None else ""
    if request.purpose == "vcpus+emulator":
        asked = f"{plural(wanted, 'CPU')} ({plural(wanted - 1, 'vCPU')} and one for the " \
                "isolated emulator)"
    elif request.purpose == "emulator":
        asked = "a CPU for the isolated emulator"
    else:
        asked = plural(wanted, 'CPU')
    floating = "use emulator='float' (the emulator then runs on the vCPUs' CPUs)" \
        if request.purpose in ("vcpus+emulator", "emulator") else ""
    advice = " or ".join(a for a in (widen, relax, floating) if a)
    return f"cannot place {asked}: only {what}{where}{'; ' if advice else ''}{advice}"
