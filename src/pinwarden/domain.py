"""libvirt domain XML ↔ the CPU-relevant request (:class:`DomainSpec`) and plan rendering.

Parsing is safe: no external entities, no DTDs, no entity expansion (defusedxml).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pinwarden.cpuset import CpuSet
from pinwarden.model import Plan

PW_NS = "urn:pinwarden:domain:1"

ThreadPolicy = Literal["prefer", "isolate", "require"]
EmulatorPolicy = Literal["float", "isolate", "shared"]


@dataclass(frozen=True, slots=True)
class GuestCell:
    """``<cpu><numa><cell id cpus memory/>``."""

    id: int
    cpus: CpuSet  # guest vCPU numbers
    memory_kib: int


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str | None
    vcpus: int  # <vcpu> maximum
    current: int | None = None  # <vcpu current=...>
    placement: str | None = None  # <vcpu placement=static|auto>
    cpuset: CpuSet | None = None  # <vcpu cpuset=...>
    vcpupins: Mapping[int, CpuSet] = field(default_factory=dict)
    emulatorpin: CpuSet | None = None
    iothreads: int = 0  # <iothreads>N</iothreads>
    iothreadpins: Mapping[int, CpuSet] = field(default_factory=dict)
    exclusive: bool = False  # <cputune exclusive='yes'> or <pw:cpu exclusive="yes"/>
    threads: ThreadPolicy = "prefer"
    emulator: EmulatorPolicy = "float"
    numa_mode: str | None = None  # <numatune><memory mode=...>
    numa_nodeset: CpuSet | None = None  # host NUMA nodes from <numatune><memory nodeset>
    guest_cells: tuple[GuestCell, ...] = ()
    partition: str | None = None  # <resource><partition>

    @property
    def key(self) -> str:
        return self.uuid or self.name

    @property
    def has_affinity(self) -> bool:
        """True when the XML says anything about where threads may run."""
        return bool(self.cpuset is not None or self.vcpupins or self.emulatorpin is not None
                    or self.iothreadpins)


def parse_domain(xml: str | bytes) -> DomainSpec:
    """Parse the CPU-relevant parts of a libvirt domain XML document."""
    raise NotImplementedError


def render_plan(xml: str | bytes, plan: Plan, *, partition: str | None = None) -> str:
    """Return ``xml`` with the plan applied (``<vcpu cpuset>``, vcpupin, emulatorpin,
    iothreadpin; ``<resource><partition>`` when given), everything else unchanged."""
    raise NotImplementedError
