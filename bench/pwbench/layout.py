"""A flat, precomputed view of a topology that the harness and the baseline share."""

from __future__ import annotations

from dataclasses import dataclass

from pinwarden.cpuset import CpuSet
from pinwarden.topology import Topology


@dataclass(frozen=True)
class Layout:
    cpus: frozenset[int]  # the pool's online CPUs
    node: dict[int, int]  # cpu -> NUMA node
    socket: dict[int, int]  # cpu -> package
    core: dict[int, int]  # cpu -> core key (its first online thread)
    core_cpus: dict[int, frozenset[int]]  # core key -> online threads in the pool
    node_cpus: dict[int, frozenset[int]]  # node -> its CPUs in the pool
    socket_cpus: dict[int, frozenset[int]]  # package -> its CPUs in the pool

    @classmethod
    def of(cls, topology: Topology, pool: CpuSet) -> Layout:
        cpus = frozenset(c for c in pool if c in topology.online)
        node: dict[int, int] = {}
        socket: dict[int, int] = {}
        core: dict[int, int] = {}
        core_cpus: dict[int, set[int]] = {}
        node_cpus: dict[int, set[int]] = {}
        socket_cpus: dict[int, set[int]] = {}
        for cpu in sorted(cpus):
            info = topology.cpu(cpu)
            threads = (info.siblings & topology.online).cpus | {cpu}
            key = min(threads)
            node[cpu] = info.node
            # package ids repeat across packages on some machines: key by the first CPU
            socket[cpu] = (info.package_cpus.first() if info.package_cpus
                           else info.package if info.package is not None else 0)
            core[cpu] = key
            core_cpus.setdefault(key, set()).add(cpu)
            node_cpus.setdefault(info.node, set()).add(cpu)
            socket_cpus.setdefault(socket[cpu], set()).add(cpu)
        return cls(cpus, node, socket, core,
                   {k: frozenset(v) for k, v in core_cpus.items()},
                   {k: frozenset(v) for k, v in node_cpus.items()},
                   {k: frozenset(v) for k, v in socket_cpus.items()})

    @property
    def threads_per_core(self) -> int:
        return max((len(c) for c in self.core_cpus.values()), default=1)

    def nodes_of(self, cpus: tuple[int, ...] | frozenset[int]) -> set[int]:
        return {self.node[c] for c in cpus}
