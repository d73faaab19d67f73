"""Replay one workload on one allocator and measure it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pwbench.allocators import Allocator, Placement
from pwbench.hosts import Host
from pwbench.layout import Layout
from pwbench.metrics import CoreSharing, capacities, enough_cpus, is_numa_split, percentile
from pwbench.workload import Event


class HarnessError(AssertionError):
    """An allocator returned an impossible placement (a bug in it or its adapter)."""


@dataclass(frozen=True)
class Result:
    offered: int
    accepted: int
    offered_vcpus: int
    accepted_vcpus: int
    refused_with_room: int  # decided refusals although a placement existed (metrics.has_room)
    refused_fragmented: int  # refusals without room but with enough free CPUs in number
    no_decision: int  # refusals without a decision (the allocator's time budget ran out)
    no_decision_s: float  # time spent on those before giving up
    claim_failed: int  # decided, but recording the placement failed (Nova's claim)
    numa_split_vms: int
    smt_shared_vms: int
    isolate_shared_vms: int
    whole_shared_vms: int
    p50_us: float
    p99_us: float
    max_us: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def check(layout: Layout, cpus: int, free: set[int], got: Placement) -> None:
    chosen = set(got.cpus)
    if len(got.cpus) != cpus or len(chosen) != cpus:
        raise HarnessError(f"asked {cpus} CPUs, got {got.cpus}")
    if not chosen <= free or not got.holds <= free or chosen & got.holds:
        raise HarnessError(f"placement {got} is not within the free CPUs")


def simulate(host: Host, events: list[Event], allocator: Allocator) -> Result:
    layout = Layout.of(host.topology, host.pool)
    free = set(layout.cpus)
    live: dict[int, Placement] = {}
    sharing = CoreSharing(layout)
    policy_vms: dict[str, set[int]] = {"isolate": set(), "whole": set()}
    times: list[float] = []
    offered = accepted = offered_vcpus = accepted_vcpus = splits = with_room = 0
    fragmented = undecided = claim_failed = 0
    undecided_ns = 0
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
        caps = capacities(layout, free, vm.threads)
        decision = allocator.place(vm, frozenset(free))
        placement = decision.placement
        if not decision.decided:
            undecided += 1
            undecided_ns += decision.ns
            continue
        times.append(decision.ns / 1000)
        claim_failed += decision.claim_failed
        if placement is None:
            if sum(caps.values()) >= vm.cpus:
                with_room += 1
            elif enough_cpus(free, vm.cpus, vm.threads, tpc):
                fragmented += 1
            continue
        check(layout, vm.cpus, free, placement)
        accepted += 1
        accepted_vcpus += vm.vcpus
        live[vm.id] = placement
        free -= set(placement.cpus) | placement.holds
        sharing.place(vm.id, placement.cpus)
        if vm.threads in policy_vms:
            policy_vms[vm.threads].add(vm.id)
        if is_numa_split(layout, placement.cpus, max(caps.values(), default=0) >= vm.cpus):
            splits += 1
    return Result(offered, accepted, offered_vcpus, accepted_vcpus, with_room, fragmented,
                  undecided, round(undecided_ns / 1e9, 2), claim_failed, splits,
                  len(sharing.shared), len(sharing.shared & policy_vms["isolate"]),
                  len(sharing.shared & policy_vms["whole"]),
                  round(percentile(times, 50), 1), round(percentile(times, 99), 1),
                  round(max(times, default=0.0), 1))
