"""Host partition: which CPUs belong to the OS (housekeeping) and which to VMs, and why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pinwarden.cpuset import CpuSet
from pinwarden.topology import Topology

PartitionMode = Literal["isolcpus", "cgroup", "none"]


@dataclass(frozen=True, slots=True)
class Partition:
    mode: PartitionMode
    vm_cpus: CpuSet  # CPUs for VMs (isolated set, partition cgroup's cpuset, or online - reserve)
    host_cpus: CpuSet  # housekeeping CPUs: online - vm_cpus
    reason: str  # one line: why this mode and these sets
    cgroup: str | None = None  # partition cgroup path (relative to the cpuset mount), if any


@dataclass(frozen=True)
class Host:
    """Everything placement needs to know about the host: a snapshot, no I/O."""

    topology: Topology
    partition: Partition
