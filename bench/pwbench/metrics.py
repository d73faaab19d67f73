"""Metric computations, pure: room (exact), NUMA splits, cross-VM core sharing, latency
percentiles and the admit-all ceiling.  The offline bound is in :mod:`pwbench.bound`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence, Set

from pwbench.layout import Layout
from pwbench.workload import Event, footprint


def capacities(layout: Layout, free: Set[int], threads: str) -> dict[int, int]:
    """Node -> how many of a VM's CPUs its free CPUs can take under the VM's thread policy:
    ``prefer`` any free CPU; ``isolate`` one CPU per core whose every online thread is free;
    ``whole`` every thread of such cores; ``require`` the same on SMT cores only."""
    if threads == "prefer":
        return {n: len(cpus & free) for n, cpus in layout.node_cpus.items()}
    out = dict.fromkeys(layout.node_cpus, 0)
    for key, cpus in layout.core_online.items():
        if cpus <= free and (threads != "require" or len(cpus) > 1):
            out[layout.node[key]] += 1 if threads == "isolate" else len(cpus)
    return out


def has_room(layout: Layout, free: Set[int], cpus: int, threads: str) -> bool:
    """Room, exactly: is there a set of ``cpus`` free CPUs (vCPUs plus an isolated emulator)
    that satisfies the VM's thread policy, on any NUMA nodes (the VMs ask for none)?

    The policies' definitions make this a count: ``prefer`` needs ``cpus`` free CPUs,
    ``isolate`` ``cpus`` cores whose every thread is free (one CPU each, the siblings held),
    ``whole`` whole free cores with ``cpus`` threads in all (the last one's spare threads
    held), ``require`` the same on cores with two threads or more.  Any such cores can be
    combined, so the count is necessary and sufficient (tests/test_bench_harness.py checks
    it against a brute-force search over every set of CPUs on small hosts)."""
    return sum(capacities(layout, free, threads).values()) >= cpus


def one_node_fits(layout: Layout, free: Set[int], cpus: int, threads: str) -> bool:
    """Could a single NUMA node hold the VM right now (under its thread policy)?"""
    return max(capacities(layout, free, threads).values(), default=0) >= cpus


def enough_cpus(free: Set[int], cpus: int, threads: str, threads_per_core: int) -> bool:
    """Were enough CPUs free for the VM's footprint, wherever they are?  A refusal without
    room but with enough CPUs is a refusal caused by fragmentation (free CPUs on broken
    cores that a whole-core policy cannot use)."""
    return len(free) >= footprint(cpus, threads, threads_per_core)


def is_numa_split(layout: Layout, cpus: Iterable[int], one_node_would_fit: bool) -> bool:
    """Spread over several nodes although one node could have held it."""
    return one_node_would_fit and len(layout.nodes_of(tuple(cpus))) > 1


class CoreSharing:
    """Which VMs ever ran on a physical core where another VM ran (vCPUs or emulator)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._owner: dict[int, int] = {}  # cpu -> vm running there
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


def admit_all(events: Sequence[Event], pool: int, threads_per_core: int) -> tuple[int, int]:
    """(VMs, vCPUs) accepted by the *admit-all* rule: the pool as one bag of CPUs (no NUMA
    nodes, no cores), each VM accepted when its footprint fits in the CPUs not in use.

    A ceiling for "every VM placed while there is room", not a bound: refusing a large VM
    can leave room for several small ones later (Nova exceeds it on some workloads).  The
    bound is :func:`pwbench.bound.offline_bound`.
    """
    used = 0
    live: dict[int, int] = {}
    vms = vcpus = 0
    for event in events:
        vm = event.vm
        size = footprint(vm.cpus, vm.threads, threads_per_core)
        if event.kind == "arrive":
            if used + size <= pool:
                used += size
                live[vm.id] = size
                vms += 1
                vcpus += vm.vcpus
        elif vm.id in live:
            used -= live.pop(vm.id)
    return vms, vcpus
