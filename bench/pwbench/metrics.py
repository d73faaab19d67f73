"""Metric computations, pure: NUMA splits, cross-VM core sharing, latency percentiles and
the fragmentation-free reference ("upper_bound")."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pwbench.layout import Layout
from pwbench.workload import Event, footprint


def one_node_fits(layout: Layout, free: frozenset[int] | set[int], vcpus: int,
                  threads: str) -> bool:
    """Could a single NUMA node hold the VM right now (under its thread policy)?"""
    if threads == "isolate":
        whole: dict[int, int] = {}
        for key, cpus in layout.core_cpus.items():
            if cpus <= free:
                node = layout.node[key]
                whole[node] = whole.get(node, 0) + 1
        return any(n >= vcpus for n in whole.values())
    return any(len(cpus & free) >= vcpus for cpus in layout.node_cpus.values())


def has_room(free: frozenset[int] | set[int], vcpus: int, threads: str,
             threads_per_core: int) -> bool:
    """Were enough CPUs free for the VM's footprint (ignoring where they are)?  A refusal
    with room is a refusal caused by fragmentation or by the allocator's own limits."""
    return len(free) >= footprint(vcpus, threads, threads_per_core)


def is_numa_split(layout: Layout, cpus: Iterable[int], one_node_would_fit: bool) -> bool:
    """Spread over several nodes although one node could have held it."""
    return one_node_would_fit and len(layout.nodes_of(tuple(cpus))) > 1


class CoreSharing:
    """Which VMs ever ran a vCPU on a physical core where another VM ran one."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._owner: dict[int, int] = {}  # cpu -> vm running a vCPU there
        self.shared: set[int] = set()

    def place(self, vm: int, cpus: Iterable[int]) -> None:
        cpus = tuple(cpus)
        for cpu in cpus:
            for sibling in self._layout.core_cpus[self._layout.core[cpu]]:
                other = self._owner.get(sibling)
                if other is not None and other != vm:
                    self.shared.update((vm, other))
        for cpu in cpus:
            self._owner[cpu] = vm

    def release(self, cpus: Iterable[int]) -> None:
        for cpu in cpus:
            self._owner.pop(cpu, None)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def upper_bound(events: Sequence[Event], pool: int, threads_per_core: int) -> tuple[int, int]:
    """(VMs, vCPUs) accepted by a fragmentation-free allocator on the same events.

    It treats the pool as one bag of CPUs (no NUMA nodes, no cores): a VM fits when its
    footprint (vCPUs; whole cores for isolate) is at most the CPUs not in use.  A reference
    for what fragmentation costs, not a strict bound on every online policy.
    """
    used = 0
    live: dict[int, int] = {}
    vms = vcpus = 0
    for event in events:
        vm = event.vm
        size = footprint(vm.vcpus, vm.threads, threads_per_core)
        if event.kind == "arrive":
            if used + size <= pool:
                used += size
                live[vm.id] = size
                vms += 1
                vcpus += vm.vcpus
        elif vm.id in live:
            used -= live.pop(vm.id)
    return vms, vcpus
