"""Seeded arrivals and departures of dedicated VMs.

Arrivals are a Poisson process, lifetimes exponential with mean 1; the arrival rate is set
so that the *offered load* — the mean number of CPUs that the live VMs would take (an
isolate VM takes whole cores) divided by the pool — is the requested value.  The same seed
gives the same events on every allocator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

Policy = Literal["prefer", "isolate", "require", "whole"]
#: One thread policy for every VM, or ``mixed`` (prefer with MIXED_ISOLATE isolate), or
#: ``mixed+emu``: the same mix, every VM with ``emulator='isolate'`` (one more exclusive CPU
#: for QEMU's emulator threads; Nova's ``hw:emulator_threads_policy=isolate``).
Mix = Literal["prefer", "isolate", "require", "whole", "mixed", "mixed+emu"]

#: vCPU count → weight: mostly 1, 2, 4, 8; some 16 and 32.
SIZE_MIX: dict[int, float] = {1: 0.25, 2: 0.25, 4: 0.20, 8: 0.15, 16: 0.10, 32: 0.05}
#: Share of isolate VMs in the "mixed" workload.
MIXED_ISOLATE = 0.3


@dataclass(frozen=True, slots=True)
class Vm:
    id: int
    vcpus: int
    threads: Policy
    arrive: float
    depart: float
    emulator: bool = False  # emulator='isolate': one more exclusive CPU

    @property
    def cpus(self) -> int:
        """Exclusive CPUs the VM runs on: its vCPUs, plus one for an isolated emulator."""
        return self.vcpus + self.emulator


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    kind: Literal["arrive", "depart"]
    vm: Vm


def sizes_for(pool: int) -> dict[int, float]:
    """The size mix without sizes above half the pool (a 32-vCPU VM on a 16-CPU host)."""
    mix = {s: w for s, w in SIZE_MIX.items() if s <= max(1, pool // 2)}
    total = sum(mix.values())
    return {s: w / total for s, w in mix.items()}


def footprint(cpus: int, threads: str, threads_per_core: int) -> int:
    """CPUs a VM with ``cpus`` exclusive CPUs takes off a host whose cores all have
    ``threads_per_core`` threads: an isolate VM holds whole cores, a whole or require VM
    rounds up to whole cores (the spare threads are held), a prefer VM takes its CPUs."""
    if threads == "isolate":
        return cpus * threads_per_core
    if threads in ("whole", "require"):
        return -(-cpus // threads_per_core) * threads_per_core
    return cpus


def mean_footprint(sizes: dict[int, float], mix: Mix, threads_per_core: int) -> float:
    extra = 1 if mix == "mixed+emu" else 0
    if mix in ("mixed", "mixed+emu"):
        shares: dict[str, float] = {"prefer": 1 - MIXED_ISOLATE, "isolate": MIXED_ISOLATE}
    else:
        shares = {mix: 1.0}
    return sum(w * share * footprint(s + extra, policy, threads_per_core)
               for s, w in sizes.items() for policy, share in shares.items())


def generate(*, seed: int, pool: int, threads_per_core: int, mix: Mix, load: float,
             lifetimes: float = 8.0, min_arrivals: int = 200) -> list[Event]:
    """Events, time-ordered (a departure before an arrival at the same time).

    Enough VMs arrive to cover ``lifetimes`` mean lifetimes, at least ``min_arrivals``.
    """
    rng = random.Random(seed)
    sizes = sizes_for(pool)
    rate = load * pool / mean_footprint(sizes, mix, threads_per_core)
    count = max(min_arrivals, math.ceil(rate * lifetimes))
    values, weights = list(sizes), list(sizes.values())
    events: list[Event] = []
    now = 0.0
    for i in range(count):
        now += rng.expovariate(rate)
        vcpus = rng.choices(values, weights)[0]
        if mix in ("mixed", "mixed+emu"):
            threads: Policy = "isolate" if rng.random() < MIXED_ISOLATE else "prefer"
        else:
            threads = cast(Policy, mix)
        vm = Vm(i, vcpus, threads, now, now + rng.expovariate(1.0),
                emulator=mix == "mixed+emu")
        events.append(Event(vm.arrive, "arrive", vm))
        events.append(Event(vm.depart, "depart", vm))
    events.sort(key=lambda e: (e.time, e.kind != "depart", e.vm.id))
    return events


def arrivals(events: Sequence[Event]) -> list[Vm]:
    return [e.vm for e in events if e.kind == "arrive"]
