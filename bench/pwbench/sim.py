"""Replay one workload on one allocator and measure it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pwbench.allocators import Allocator, Placement
from pwbench.hosts import Host
from pwbench.layout import Layout
from pwbench.metrics import CoreSharing, has_room, is_numa_split, one_node_fits, percentile
from pwbench.workload import Event


class HarnessError(AssertionError):
    """An allocator returned an impossible placement (a bug in it or its adapter)."""


@dataclass(frozen=True)
class Result:
    offered: int
    accepted: int
    offered_vcpus: int
    accepted_vcpus: int
    refused_with_room: int
    numa_split_vms: int
    smt_shared_vms: int
    isolate_shared_vms: int
    p50_us: float
    p99_us: float
    max_us: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def check(layout: Layout, vcpus: int, free: set[int], got: Placement) -> None:
    chosen = set(got.cpus)
    if len(got.cpus) != vcpus or len(chosen) != vcpus:
        raise HarnessError(f"asked {vcpus} CPUs, got {got.cpus}")
    if not chosen <= free or not got.holds <= free or chosen & got.holds:
        raise HarnessError(f"placement {got} is not within the free CPUs")


def simulate(host: Host, events: list[Event], allocator: Allocator) -> Result:
    layout = Layout.of(host.topology, host.pool)
    free = set(layout.cpus)
    live: dict[int, Placement] = {}
    sharing = CoreSharing(layout)
    isolate_vms: set[int] = set()
    times: list[float] = []
    offered = accepted = offered_vcpus = accepted_vcpus = splits = with_room = 0
    tpc = layout.threads_per_core
    for event in events:
        vm = event.vm
        if event.kind == "depart":
            got = live.pop(vm.id, None)
            if got is not None:
                allocator.release(vm)
                free |= set(got.cpus) | got.holds
                sharing.release(got.cpus)
            continue
        offered += 1
        offered_vcpus += vm.vcpus
        fits_one = one_node_fits(layout, free, vm.vcpus, vm.threads)
        placement, ns = allocator.place(vm, frozenset(free))
        if ns >= 0:
            times.append(ns / 1000)
        if placement is None:
            with_room += has_room(free, vm.vcpus, vm.threads, tpc)
            continue
        check(layout, vm.vcpus, free, placement)
        accepted += 1
        accepted_vcpus += vm.vcpus
        live[vm.id] = placement
        free -= set(placement.cpus) | placement.holds
        sharing.place(vm.id, placement.cpus)
        if vm.threads == "isolate":
            isolate_vms.add(vm.id)
        if is_numa_split(layout, placement.cpus, fits_one):
            splits += 1
    return Result(offered, accepted, offered_vcpus, accepted_vcpus, with_room, splits,
                  len(sharing.shared), len(sharing.shared & isolate_vms),
                  round(percentile(times, 50), 1), round(percentile(times, 99), 1),
                  round(max(times, default=0.0), 1))
