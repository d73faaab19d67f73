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
from typing import Literal

Policy = Literal["prefer", "isolate"]
Mix = Literal["prefer", "isolate", "mixed"]

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


def footprint(vcpus: int, threads: str, threads_per_core: int) -> int:
    """CPUs a VM takes off the host: an isolate VM holds whole cores."""
    return vcpus * threads_per_core if threads == "isolate" else vcpus


def mean_footprint(sizes: dict[int, float], mix: Mix, threads_per_core: int) -> float:
    iso = {"prefer": 0.0, "isolate": 1.0, "mixed": MIXED_ISOLATE}[mix]
    mean_size = sum(s * w for s, w in sizes.items())
    return mean_size * ((1 - iso) + iso * threads_per_core)


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
        if mix == "mixed":
            threads: Policy = "isolate" if rng.random() < MIXED_ISOLATE else "prefer"
        else:
            threads = mix
        vm = Vm(i, vcpus, threads, now, now + rng.expovariate(1.0))
        events.append(Event(vm.arrive, "arrive", vm))
        events.append(Event(vm.depart, "depart", vm))
    events.sort(key=lambda e: (e.time, e.kind != "depart", e.vm.id))
    return events


def arrivals(events: Sequence[Event]) -> list[Vm]:
    return [e.vm for e in events if e.kind == "arrive"]
