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
    core_online: dict[int, frozenset[int]]  # core key -> every online thread (pool or not)
    node_cpus: dict[int, frozenset[int]]  # node -> its CPUs in the pool
    socket_cpus: dict[int, frozenset[int]]  # package -> its CPUs in the pool
    # Host-wide averages over every online CPU (not only the pool), as kubelet computes
    # CPUsPerNUMANode / CPUsPerSocket / CPUsPerCore.
    cpus_per_node: int
    cpus_per_socket: int
    cpus_per_core: int

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
            socket[cpu] = _socket(topology, cpu)
            core[cpu] = key
            core_cpus.setdefault(key, set()).add(cpu)
            node_cpus.setdefault(info.node, set()).add(cpu)
            socket_cpus.setdefault(socket[cpu], set()).add(cpu)
        online = topology.online.cpus & topology.cpus.keys()
        all_nodes = {topology.cpus[c].node for c in online}
        all_sockets = {_socket(topology, c) for c in online}
        all_cores = {min((topology.cpus[c].siblings.cpus & online) | {c}) for c in online}
        core_online = {k: frozenset((topology.cpu(k).siblings.cpus & online) | {k})
                       for k in core_cpus}
        return cls(cpus, node, socket, core,
                   {k: frozenset(v) for k, v in core_cpus.items()}, core_online,
                   {k: frozenset(v) for k, v in node_cpus.items()},
                   {k: frozenset(v) for k, v in socket_cpus.items()},
                   len(online) // max(1, len(all_nodes)),
                   len(online) // max(1, len(all_sockets)),
                   len(online) // max(1, len(all_cores)))

    @property
    def threads_per_core(self) -> int:
        return max((len(c) for c in self.core_cpus.values()), default=1)

    def nodes_of(self, cpus: tuple[int, ...] | frozenset[int]) -> set[int]:
        return {self.node[c] for c in cpus}


def _socket(topology: Topology, cpu: int) -> int:
    """The package, keyed by its first CPU (package ids repeat on some machines)."""
    info = topology.cpu(cpu)
    if info.package_cpus:
        return info.package_cpus.first()
    return -1 - info.package if info.package is not None else -1
