"""OpenStack Nova's own NUMA fitting code (``nova.virt.hardware``), driven directly.

The host is what Nova's libvirt driver reports: one ``NUMACell`` per node with the pool's
CPUs as dedicated CPUs and the physical cores as ``siblings``.  ``cpuset`` is set equal to
``pcpuset`` (the legacy ``vcpu_pin_set`` configuration): it is the only configuration in
which Nova implements ``isolate`` on SMT hosts as "pin one thread, reserve its siblings";
with ``cpu_dedicated_set`` Nova refuses ``isolate`` on SMT hosts outright (bug #1889633).

A VM is a single guest NUMA cell (Nova's implicit topology for ``hw:cpu_policy=dedicated``)
unless it is larger than any host node could ever hold, in which case the flavor is taken
to say ``hw:numa_nodes=2``, split as evenly as possible.  A VM that would need more than
two guest cells is refused without a decision (``MAX_CELLS``): Nova tries every ordered
choice of host cells (``itertools.permutations``), which for eight guest cells on a 16- or
64-node host does not finish, and no operator writes such flavors.
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from typing import Any

from pwbench.allocators import Placement, timed
from pwbench.hosts import Host
from pwbench.layout import Layout
from pwbench.workload import Vm

warnings.filterwarnings("ignore")
logging.getLogger("nova").setLevel(logging.ERROR)

# Nova is imported by name (it has no type information); bench/.venv has it.
objects: Any = importlib.import_module("nova.objects")
objects.register_all()
fields: Any = importlib.import_module("nova.objects.fields")
hardware: Any = importlib.import_module("nova.virt.hardware")
CONF: Any = importlib.import_module("nova.conf").CONF

MEMORY_MB = 1 << 30
MAX_CELLS = 2


class Nova:
    """``pack=False``: Nova's default (``packing_host_numa_cells_allocation_strategy`` off,
    least-used host cell first); ``pack=True``: that option on (most-used cell first)."""

    def __init__(self, host: Host, *, pack: bool = False) -> None:
        self.name = "nova-pack" if pack else "nova"
        self._pack = pack
        self._layout = layout = Layout.of(host.topology, host.pool)
        cells = []
        for node in sorted(layout.node_cpus):
            cpus = set(layout.node_cpus[node])
            siblings = sorted((set(c) for k, c in layout.core_cpus.items()
                               if layout.node[k] == node), key=min)
            cells.append(objects.NUMACell(
                id=node, cpuset=set(cpus), pcpuset=set(cpus), memory=MEMORY_MB,
                cpu_usage=0, memory_usage=0, pinned_cpus=set(), siblings=siblings,
                mempages=[objects.NUMAPagesTopology(size_kb=4, total=1 << 40, used=0,
                                                    reserved=0)],
                network_metadata=objects.NetworkMetadata(physnets=set(), tunneled=False),
                socket=layout.socket[min(cpus)]))
        self._topology: Any = objects.NUMATopology(cells=cells)
        self._live: dict[int, Any] = {}
        self._cap = {
            "prefer": max(len(c) for c in layout.node_cpus.values()),
            "isolate": max(sum(1 for k in layout.core_cpus if layout.node[k] == n)
                           for n in layout.node_cpus),
        }

    def _instance(self, vm: Vm) -> Any | None:
        cells = math.ceil(vm.vcpus / self._cap[vm.threads])
        if cells > min(MAX_CELLS, len(self._layout.node_cpus)):
            return None
        base, extra = divmod(vm.vcpus, cells)
        out, first = [], 0
        for i in range(cells):
            n = base + (1 if i < extra else 0)
            out.append(objects.InstanceNUMACell(
                id=i, cpuset=set(), pcpuset=set(range(first, first + n)), memory=1,
                cpu_policy=fields.CPUAllocationPolicy.DEDICATED,
                cpu_thread_policy=vm.threads))
            first += n
        return objects.InstanceNUMATopology(cells=out)

    def place(self, vm: Vm, free: frozenset[int]) -> tuple[Placement | None, int]:
        CONF.set_override("packing_host_numa_cells_allocation_strategy",
                                    self._pack, group="compute")
        instance = self._instance(vm)
        if instance is None:
            return None, -1  # no flavor can express it: refused before any decision
        fitted, elapsed = timed(lambda: hardware.numa_fit_instance_to_host(
            self._topology, instance, provider_mapping=None))
        if fitted is None:
            return None, elapsed
        taken = self._pin(fitted, free=False)
        pinning: dict[int, int] = {}
        for cell in fitted.cells:
            pinning.update(cell.cpu_pinning)
        cpus = tuple(pinning[v] for v in sorted(pinning))
        self._live[vm.id] = fitted
        return Placement(cpus, frozenset(taken - set(cpus))), elapsed

    def release(self, vm: Vm) -> None:
        fitted = self._live.pop(vm.id, None)
        if fitted is not None:
            self._pin(fitted, free=True)

    def _pin(self, fitted: Any, *, free: bool) -> set[int]:
        """Record (or forget) the instance's CPUs in the host cells, as
        ``hardware.numa_usage_from_instance_numa`` does with the cells' own
        ``(un)pin_cpus(_with_siblings)``, in place: that function rebuilds every cell
        (45 ms a call on 1,024 CPUs, not part of the decision).  Memory is never a
        constraint here (1 MiB guest cells on 1 TiB host cells) and is not tracked.
        Returns the CPUs newly pinned (vCPUs and reserved siblings)."""
        cells = {c.id: c for c in self._topology.cells}
        changed: set[int] = set()
        for inst in fitted.cells:
            cell = cells[inst.id]
            before = set(cell.pinned_cpus)
            pinned = set(inst.cpu_pinning.values())
            isolate = inst.cpu_thread_policy == fields.CPUThreadAllocationPolicy.ISOLATE
            if free:
                (cell.unpin_cpus_with_siblings if isolate else cell.unpin_cpus)(pinned)
            else:
                (cell.pin_cpus_with_siblings if isolate else cell.pin_cpus)(pinned)
            changed |= set(cell.pinned_cpus) ^ before
        return changed
