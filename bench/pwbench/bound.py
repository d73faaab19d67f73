"""The offline bound: the most VMs (or vCPUs) of a workload that *any* allocator could
accept, even one that knows every future arrival and departure.

What it bounds.  Every allocator here places a VM for its whole lifetime on CPUs nobody
else holds meanwhile, and takes at least the VM's footprint off the pool (its vCPUs, plus
one CPU for an isolated emulator; whole cores under isolate, rounded up to whole cores
under whole/require — the footprint rule of :func:`pwbench.workload.footprint`, exact on
the benchmark's hosts, whose pool cores all have the same number of threads).  So for any
accepted set A of VMs, at every instant t the footprints of the VMs of A alive at t fit in
the pool.  The bound is the optimum of that integer program:

    maximise   Σ_v w_v·x_v          (w_v = 1: VMs; w_v = vCPUs of v: vCPUs)
    subject to Σ_{v alive at t} f_v·x_v ≤ |pool|   for every instant t,   x_v ∈ {0, 1}

It relaxes NUMA nodes and the exact cores (a VM may use any CPUs, even CPUs that no fixed
placement could give it without moving another VM), so it is an upper bound for every
allocator, online or offline, on this workload; not always attainable.  Only the instants
just before a departure matter (the live set is maximal there).  Solved with SciPy's HiGHS
(``scipy.optimize.milp``); when the time limit stops it first, the proven dual bound is
used (still a valid upper bound; ``bound_exact`` says which).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from pwbench.workload import Event, Vm, footprint

TIME_LIMIT_S = 20.0


@dataclass(frozen=True)
class Bound:
    vms: int
    vcpus: int
    exact: bool  # both optima proven (else the solver's dual bound, still an upper bound)


def instants(events: Sequence[Event]) -> list[list[int]]:
    """The maximal live sets: the VMs alive just before each departure that follows an
    arrival (indexes into the arrival order)."""
    index: dict[int, int] = {}
    live: set[int] = set()
    out: list[list[int]] = []
    grew = False
    for event in events:
        if event.kind == "arrive":
            index[event.vm.id] = len(index)
            live.add(index[event.vm.id])
            grew = True
        else:
            if grew:
                out.append(sorted(live))
                grew = False
            live.discard(index[event.vm.id])
    if grew:
        out.append(sorted(live))
    return out


def offline_bound(events: Sequence[Event], pool: int, threads_per_core: int,
                  time_limit: float = TIME_LIMIT_S) -> Bound:
    vms: list[Vm] = [e.vm for e in events if e.kind == "arrive"]
    if not vms:
        return Bound(0, 0, True)
    sizes = np.array([footprint(v.cpus, v.threads, threads_per_core) for v in vms], float)
    rows, cols, vals = [], [], []
    for r, members in enumerate(instants(events)):
        rows += [r] * len(members)
        cols += members
        vals += [sizes[m] for m in members]
    matrix = csr_array((vals, (rows, cols)), shape=(max(rows, default=0) + 1, len(vms)))
    constraint = LinearConstraint(matrix, -np.inf, pool)
    results = []
    for weights in (np.ones(len(vms)), np.array([float(v.vcpus) for v in vms])):
        res = milp(-weights, constraints=constraint, integrality=np.ones(len(vms)),
                   bounds=Bounds(0, 1), options={"time_limit": time_limit})
        if res.status == 0 and res.fun is not None:
            results.append((round(-res.fun), True))
        else:  # stopped by the time limit: the dual bound still bounds the optimum
            dual = getattr(res, "mip_dual_bound", None)
            value = -dual if dual is not None else float(weights.sum())
            results.append((math.floor(value + 1e-6), False))
    (n_vms, exact_vms), (n_vcpus, exact_vcpus) = results
    return Bound(n_vms, n_vcpus, exact_vms and exact_vcpus)
