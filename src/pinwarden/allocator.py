"""Topology-aware choice of CPUs for exclusive VMs without explicit pins.  Pure, deterministic."""

from __future__ import annotations

from dataclasses import dataclass

from pinwarden.cpuset import CpuSet
from pinwarden.domain import ThreadPolicy
from pinwarden.topology import Topology


@dataclass(frozen=True, slots=True)
class Request:
    count: int  # CPUs wanted (vCPUs, plus one for an isolated emulator)
    threads: ThreadPolicy = "prefer"
    nodes: CpuSet | None = None  # allowed host NUMA nodes (numatune nodeset); None: any


@dataclass(frozen=True, slots=True)
class Allocation:
    cpus: tuple[int, ...]  # chosen CPUs, in the order they should be given to vCPUs
    holds: CpuSet = CpuSet()  # sibling threads held empty (threads="isolate")


def allocate(topology: Topology, pool: CpuSet, free: CpuSet, request: Request) -> Allocation:
    """Choose ``request.count`` CPUs from ``free`` (a subset of ``pool``, the VM CPUs).

    ``pool - free`` is what is already in use; best-fit fills the most-used node/core first.
    Raises :class:`~pinwarden.errors.Refusal` when the request cannot be met.
    """
    raise NotImplementedError
