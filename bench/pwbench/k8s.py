"""Baseline: the Kubernetes static CPU manager's documented topology-aware best fit.

Written from the kubelet documentation ("static policy": whole NUMA nodes or sockets
first, then whole physical cores, then single threads, each level best-fit by fewest free
CPUs, filling partly used cores on the sockets already used), without the Topology
Manager (its default policy is ``none``).  ``isolate`` VMs are modelled as the
``full-pcpus-only`` policy option: the request is rounded to whole cores (vCPUs × threads
per core), refused unless that many CPUs are free in whole free cores; each vCPU runs on
the first thread of one core and the other threads are held empty.  ``whole`` and
``require`` VMs use the same option with the request rounded up to whole cores (kubelet
refuses a count that is not a multiple of the threads per core; rounding up is what a
user does): the vCPUs take the first threads in core order, the spare threads are held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pwbench.layout import Layout


def take_by_topology(layout: Layout, available: Iterable[int], count: int) -> list[int] | None:
    """``count`` CPUs out of ``available``, or None when there are not enough."""
    avail = set(available) & layout.cpus
    if count <= 0:
        return []
    if count > len(avail):
        return None
    result: list[int] = []
    need = count

    def take(cpus: Iterable[int]) -> None:
        nonlocal need
        chosen = sorted(cpus)
        result.extend(chosen)
        avail.difference_update(chosen)
        need -= len(chosen)

    # NUMA nodes first when a node holds whole sockets, else sockets first.
    nodes_hold_sockets = all(
        any(cpus <= node for node in layout.node_cpus.values())
        for cpus in layout.socket_cpus.values())
    levels = [layout.node_cpus, layout.socket_cpus]
    of_cpu = [layout.node, layout.socket]
    sizes = [layout.cpus_per_node, layout.cpus_per_socket]
    if not nodes_hold_sockets:
        levels.reverse()
        of_cpu.reverse()
        sizes.reverse()

    # 1. Whole first-level, then whole second-level units, while a unit is not too much.
    #    A unit is free when all its CPUs are available (one with reserved CPUs never is).
    for units, size in zip(levels, sizes, strict=True):
        for uid in sorted(units):
            cpus = units[uid]
            if need >= size and len(cpus) == size and cpus <= avail:
                take(cpus)
                if need == 0:
                    return result

    def free_in(level: int) -> Callable[[int], int]:
        units, cpu_unit = levels[level], of_cpu[level]
        counts = {uid: len(cpus & avail) for uid, cpus in units.items()}
        return lambda cpu: counts[cpu_unit[cpu]]

    # 2. Whole free cores, best fit: cores of the unit with the fewest free CPUs first.
    per_core = max(1, layout.cpus_per_core)
    first_free, second_free = free_in(0), free_in(1)
    free_cores = [k for k, cpus in layout.core_cpus.items() if cpus <= avail]
    free_cores.sort(key=lambda k: (first_free(k), second_free(k), of_cpu[0][k], of_cpu[1][k], k))
    for key in free_cores:
        cpus = layout.core_cpus[key]
        if need >= per_core and need >= len(cpus) and cpus <= avail:
            take(cpus)
            if need == 0:
                return result

    # 3. Single threads: near what was taken, fullest unit first, fullest core first.
    taken_units = {of_cpu[0][c] for c in result}
    first_free, second_free = free_in(0), free_in(1)
    cores = [k for k, cpus in layout.core_cpus.items() if cpus & avail]
    cores.sort(key=lambda k: (of_cpu[0][k] not in taken_units, first_free(k), second_free(k),
                              len(layout.core_cpus[k] & avail), of_cpu[0][k], k))
    for key in cores:
        for cpu in sorted(layout.core_cpus[key] & avail):
            take((cpu,))
            if need == 0:
                return result
    return None  # pragma: no cover - unreachable: count <= len(avail)


def place(layout: Layout, available: Iterable[int], vcpus: int,
          threads: str) -> tuple[tuple[int, ...], frozenset[int]] | None:
    """A VM's placement: (CPUs in vCPU order, held CPUs), or None when refused."""
    avail = frozenset(available)
    if threads == "isolate":
        per_core = layout.threads_per_core
        whole = [k for k, cpus in layout.core_cpus.items() if cpus <= avail]
        if vcpus * per_core > sum(len(layout.core_cpus[k]) for k in whole):
            return None
        got = take_by_topology(layout, avail, vcpus * per_core)
        if got is None:
            return None
        keys = sorted({layout.core[c] for c in got})
        if any(not layout.core_cpus[k] <= set(got) for k in keys) or len(keys) < vcpus:
            return None  # not whole cores (possible only on hosts with mixed core sizes)
        keys = keys[:vcpus]
        cpus = tuple(min(layout.core_cpus[k]) for k in keys)
        return cpus, frozenset(got) - frozenset(cpus)
    if threads in ("whole", "require"):
        per_core = layout.threads_per_core
        if threads == "require" and per_core < 2:
            return None
        want = -(-vcpus // per_core) * per_core
        whole = [k for k, cpus in layout.core_cpus.items() if cpus <= avail]
        if want > sum(len(layout.core_cpus[k]) for k in whole):
            return None
        got = take_by_topology(layout, avail, want)
        if got is None:
            return None
        used = {layout.core[c] for c in got}
        if any(not layout.core_cpus[k] <= set(got) for k in used):
            return None  # not whole cores (possible only on hosts with mixed core sizes)
        ordered = sorted(got, key=lambda c: (layout.node[c], layout.core[c], c))
        return tuple(ordered[:vcpus]), frozenset(ordered[vcpus:])
    got = take_by_topology(layout, avail, vcpus)
    if got is None:
        return None
    ordered = sorted(got, key=lambda c: (layout.node[c], layout.core[c], c))
    return tuple(ordered), frozenset()
