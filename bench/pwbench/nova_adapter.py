"""OpenStack Nova's own NUMA fitting code (``nova.virt.hardware``), driven directly.

The host is what Nova's libvirt driver reports: one ``NUMACell`` per node with the pool's
CPUs as dedicated CPUs and the physical cores as ``siblings``.  ``cpuset`` is set equal to
``pcpuset`` (the legacy ``vcpu_pin_set`` configuration): it is the only configuration in
which Nova implements ``isolate`` on SMT hosts as "pin one thread, reserve its siblings";
with ``cpu_dedicated_set`` Nova refuses ``isolate`` on SMT hosts outright (bug #1889633).

Flavors.  A VM is a single guest NUMA cell (Nova's implicit topology for
``hw:cpu_policy=dedicated``) unless that cell could never fit a host node; then its flavor
says ``hw:numa_nodes=N`` with the fewest cells N that could fit (vCPUs split as evenly as
possible, ``hw:numa_cpus.*``), up to as many cells as the host has nodes.  Thread
policies: ``hw:cpu_thread_policy`` = the VM's, except ``whole`` (pinwarden's default,
which Nova does not have): ``require`` on SMT hosts (whole cores, siblings together; Nova
does not hold the spare thread of an odd VM), ``prefer`` on hosts without SMT (where
``whole`` is one CPU per core).  ``emulator='isolate'`` is ``hw:emulator_threads_policy=
isolate``: Nova reserves one more CPU (``cpuset_reserved``) on the host cell of guest cell
0; under ``isolate`` its siblings are pinned with it.

Nova tries every ordered choice of host cells (``itertools.permutations``); for many guest
cells on a 16-node host that search does not end when nothing fits.  Each decision gets a
time budget (``BUDGET_S``); one that runs out is a refusal *without a decision*, counted
and timed apart from the decided ones.

Host usage is recorded as ``numa_usage_from_instance_numa`` does (vCPU pins plus
``cpuset_reserved``, with siblings under ``isolate``), in place.  When that claim fails
(Nova chose a reserved CPU whose sibling is pinned: ``CPUPinningInvalid``), the VM is
refused, as Nova's resource tracker would fail its claim; the same when the fitted cell's
pins are not CPUs of its host cell (``CPUPinningUnknown``: on a cached pair Nova reuses a
guest cell object that a later attempt re-pinned on another host cell).
"""

from __future__ import annotations

import importlib
import logging
import signal
import time
import warnings
from types import FrameType
from typing import Any

from pwbench.allocators import REPEATS, Decision, Placement, timed
from pwbench.hosts import Host
from pwbench.layout import Layout
from pwbench.workload import Vm

warnings.filterwarnings("ignore")
logging.getLogger("nova").setLevel(logging.ERROR)
# oslo.versionedobjects logs (and re-raises) an exception raised while it sets a field: the
# time budget's alarm can land there.
logging.getLogger("oslo_versionedobjects").setLevel(logging.CRITICAL)

# Nova is imported by name (it has no type information); bench/.venv has it.
objects: Any = importlib.import_module("nova.objects")
objects.register_all()
fields: Any = importlib.import_module("nova.objects.fields")
hardware: Any = importlib.import_module("nova.virt.hardware")
CONF: Any = importlib.import_module("nova.conf").CONF

MEMORY_MB = 1 << 30
#: Time budget of one decision, in seconds (Nova's 4-cell decisions on 16 nodes take up to
#: about 0.6 s here).
BUDGET_S = 1.0
#: A decision slower than this is timed once, not three times.
SLOW_NS = 100_000_000


class _OutOfTime(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _OutOfTime


class Nova:
    """``pack=False``: Nova's default (``packing_host_numa_cells_allocation_strategy`` off,
    least-used host cell first); ``pack=True``: that option on (most-used cell first)."""

    def __init__(self, host: Host, *, pack: bool = False, budget: float = BUDGET_S) -> None:
        self.name = "nova-pack" if pack else "nova"
        self._pack = pack
        self._budget = budget
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
        self._cells = {c.id: c for c in self._topology.cells}
        self._live: dict[int, list[tuple[Any, set[int]]]] = {}
        self._smt = layout.threads_per_core > 1
        self._cap = {
            "cpus": max(len(c) for c in layout.node_cpus.values()),
            "cores": max(sum(1 for k in layout.core_cpus if layout.node[k] == n)
                         for n in layout.node_cpus),
        }

    def thread_policy(self, vm: Vm) -> str:
        if vm.threads == "whole":
            return "require" if self._smt else "prefer"
        return vm.threads

    def cells_for(self, vm: Vm) -> list[int] | None:
        """vCPUs per guest cell: the fewest cells that could fit the host's nodes (cell 0,
        which also gets the reserved emulator CPU, the smallest); None when none could."""
        policy = self.thread_policy(vm)
        cap = self._cap["cores" if policy == "isolate" else "cpus"]
        for cells in range(1, min(vm.vcpus, len(self._cells)) + 1):
            base, extra = divmod(vm.vcpus, cells)
            sizes = [base] * (cells - extra) + [base + 1] * extra
            if sizes[-1] <= cap and sizes[0] + vm.emulator <= cap:
                return sizes
        return None

    def _instance(self, vm: Vm, sizes: list[int]) -> Any:
        policy = self.thread_policy(vm)
        out, first = [], 0
        for i, n in enumerate(sizes):
            out.append(objects.InstanceNUMACell(
                id=i, cpuset=set(), pcpuset=set(range(first, first + n)), memory=1,
                cpu_policy=fields.CPUAllocationPolicy.DEDICATED, cpu_thread_policy=policy))
            first += n
        if vm.emulator:
            return objects.InstanceNUMATopology(
                cells=out, emulator_threads_policy=fields.CPUEmulatorThreadsPolicy.ISOLATE)
        return objects.InstanceNUMATopology(cells=out)

    def _fit(self, instance: Any) -> Any:
        """``numa_fit_instance_to_host`` within the time budget (raises _OutOfTime)."""
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self._budget)
        try:
            return hardware.numa_fit_instance_to_host(self._topology, instance,
                                                      provider_mapping=None)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def place(self, vm: Vm, free: frozenset[int]) -> Decision:
        CONF.set_override("packing_host_numa_cells_allocation_strategy", self._pack,
                          group="compute")
        sizes = self.cells_for(vm)
        if sizes is None:  # no flavor can express it: refused before any decision
            return Decision(None, 0, decided=False)
        # One fresh request per run: Nova mutates the guest cells it fits (their ids become
        # host cell ids, which its pair caches then key on).
        instances = [self._instance(vm, sizes) for _ in range(REPEATS)]
        start = time.perf_counter_ns()
        try:
            fitted, elapsed = timed(lambda: self._fit(instances.pop()), once_above_ns=SLOW_NS)
        except _OutOfTime:
            return Decision(None, time.perf_counter_ns() - start, decided=False)
        if fitted is None:
            return Decision(None, elapsed)
        claim = self._claim(fitted)
        if claim is None:
            return Decision(None, elapsed, claim_failed=True)
        pinning: dict[int, int] = {}
        reserved: set[int] = set()
        for cell in fitted.cells:
            pinning.update(cell.cpu_pinning)
            reserved |= set(cell.cpuset_reserved or ())
        cpus = tuple(pinning[v] for v in sorted(pinning)) + tuple(sorted(reserved))
        self._live[vm.id] = claim
        taken = set().union(*(pins for _, pins in claim))
        return Decision(Placement(cpus, frozenset(taken - set(cpus))), elapsed)

    def release(self, vm: Vm) -> None:
        for cell, pins in self._live.pop(vm.id, []):
            cell.unpin_cpus(pins)

    def _claim(self, fitted: Any) -> list[tuple[Any, set[int]]] | None:
        """Record the instance's CPUs in the host cells as
        ``hardware.numa_usage_from_instance_numa`` does — the vCPU pins plus
        ``cpuset_reserved``, with their siblings under ``isolate`` — in place: that function
        rebuilds every cell (45 ms a call on 1,024 CPUs, not part of the decision).  Memory
        is never a constraint here (1 MiB guest cells on 1 TiB host cells) and is not
        tracked.  None (nothing recorded) when a CPU to pin is already pinned: Nova's
        ``CPUPinningInvalid``, a failed claim."""
        claim: list[tuple[Any, set[int]]] = []
        for inst in fitted.cells:
            cell = self._cells[inst.id]
            pins = set(inst.cpu_pinning.values()) | set(inst.cpuset_reserved or ())
            if inst.cpu_thread_policy == fields.CPUThreadAllocationPolicy.ISOLATE:
                pins = pins.union(*(sib for sib in cell.siblings if sib & pins))
            if pins & cell.pinned_cpus or not pins <= cell.pcpuset:
                return None  # CPUPinningInvalid / CPUPinningUnknown in Nova's claim
            claim.append((cell, pins))
        for cell, pins in claim:
            cell.pin_cpus(pins)
        return claim
