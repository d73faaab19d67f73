"""Host CPU topology, read from a root directory (``/`` or a sysfs dump).

Value types are frozen dataclasses; :func:`read_topology` is the only function doing I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pinwarden.cpuset import CpuSet


@dataclass(frozen=True, slots=True)
class Cpu:
    """One logical CPU (hwloc's PU)."""

    id: int
    online: bool
    package: int | None  # physical_package_id; None when the kernel hides it (offline)
    die: int | None
    cluster: int | None
    core: int | None  # core_id as the kernel reports it (not unique across packages)
    siblings: CpuSet  # every CPU on the same physical core, itself included
    node: int  # NUMA node; 0 on hosts without sys/devices/system/node
    kind: str | None = None  # hybrid CPU kind ("intel_core", "intel_atom") where reported


@dataclass(frozen=True)
class Topology:
    cpus: Mapping[int, Cpu]  # every present CPU by id
    present: CpuSet
    online: CpuSet
    isolated: CpuSet  # /sys/devices/system/cpu/isolated (isolcpus=)
    nohz_full: CpuSet
    nodes: Mapping[int, CpuSet] = field(default_factory=dict)  # node -> CPUs (online+offline)

    def cpu(self, cpu: int) -> Cpu:
        return self.cpus[cpu]

    def siblings(self, cpu: int) -> CpuSet:
        return self.cpus[cpu].siblings

    def node_of(self, cpu: int) -> int:
        return self.cpus[cpu].node

    def cores(self) -> list[CpuSet]:
        """Distinct physical cores (sibling sets) of online CPUs, ordered by first CPU."""
        seen: dict[int, CpuSet] = {}
        for c in self.cpus.values():
            if c.online:
                sib = c.siblings & self.online
                seen.setdefault(sib.first(), sib)
        return [seen[k] for k in sorted(seen)]

    @property
    def smt(self) -> bool:
        """True when some online physical core has more than one online thread."""
        return any(len(core) > 1 for core in self.cores())


def read_topology(root: Path) -> Topology:
    """Read the topology of the host whose filesystem is at ``root``."""
    raise NotImplementedError
