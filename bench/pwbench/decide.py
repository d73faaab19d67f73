"""In-process decision time on one host: the allocator alone and ``pinwarden.policy.decide``
(what ``pinwarden start`` and the libvirt hook run), each with the host layout cached
(warm: the same ``Topology`` object as the decision before) and on a fresh ``Topology``
object (the first decision of a process), on states taken from a replayed workload."""

from __future__ import annotations

import contextlib
from typing import Any

from pinwarden.allocator import Request, allocate
from pinwarden.cpuset import CpuSet
from pinwarden.domain import DomainSpec
from pinwarden.errors import Refusal
from pinwarden.model import HolderRef, Lease
from pinwarden.partition import Host as PwHost
from pinwarden.partition import Partition
from pinwarden.policy import decide
from pinwarden.record import replace
from pinwarden.topology import Topology
from pwbench.allocators import timed
from pwbench.hosts import Host
from pwbench.metrics import percentile
from pwbench.workload import Event, Vm

OTHER = HolderRef("qemu", "bench-other", "bench-other")


def states(host: Host, events: list[Event], limit: int) -> list[tuple[Vm, CpuSet]]:
    """(VM, free CPUs) at up to ``limit`` arrivals of ``events`` replayed on pinwarden."""
    free = host.pool
    live: dict[int, CpuSet] = {}
    out: list[tuple[Vm, CpuSet]] = []
    for event in events:
        vm = event.vm
        if event.kind == "depart":
            free = free | live.pop(vm.id, CpuSet())
            continue
        out.append((vm, free))
        if len(out) >= limit:
            break
        try:
            got = allocate(host.topology, host.pool, free, Request(vm.cpus, vm.threads))
        except Refusal:
            continue
        taken = CpuSet.of(got.cpus) | got.holds
        live[vm.id] = taken
        free = free - taken
    return out


def _time_one(host: Host, partition: Partition, vm: Vm, free: CpuSet) -> dict[str, float]:
    """The four timings (µs) of one decision."""
    topology, pool = host.topology, host.pool
    request = Request(vm.cpus, vm.threads)
    spec = DomainSpec(name=f"vm{vm.id}", uuid=None, vcpus=vm.vcpus, exclusive=True,
                      threads=vm.threads, emulator="isolate" if vm.emulator else "float")
    leases = [Lease(cpu, OTHER, "vcpu0", 0.0) for cpu in pool - free]
    # Fresh Topology objects (equal, not identical): the layout is built again each run.
    fresh = [replace(topology) for _ in range(6)]

    def run_allocate(topo: Topology) -> None:
        with contextlib.suppress(Refusal):
            allocate(topo, pool, free, request)

    def run_decide(topo: Topology) -> None:
        with contextlib.suppress(Refusal):
            decide(spec, PwHost(topo, partition), leases)

    return {"allocate": timed(lambda: run_allocate(topology))[1] / 1000,
            "allocate_fresh": timed(lambda: run_allocate(fresh.pop()))[1] / 1000,
            "decide": timed(lambda: run_decide(topology))[1] / 1000,
            "decide_fresh": timed(lambda: run_decide(fresh.pop()))[1] / 1000}


def measure(host: Host, events: list[Event], limit: int = 300) -> dict[str, Any]:
    online = host.topology.online
    partition = Partition(mode="none", vm_cpus=host.pool, host_cpus=online - host.pool,
                          reason="benchmark: every online CPU but the first core")
    times: dict[str, list[float]] = {k: [] for k in
                                     ("allocate", "allocate_fresh", "decide", "decide_fresh")}
    for vm, free in states(host, events, limit):
        for key, value in _time_one(host, partition, vm, free).items():
            times[key].append(value)
    return {name: {"n": len(v), "p50_us": round(percentile(v, 50), 1),
                   "p99_us": round(percentile(v, 99), 1), "max_us": round(max(v), 1)}
            for name, v in times.items()}
