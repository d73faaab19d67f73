"""``pinwarden run`` jobs: the request and its placement decision.  Pure, no I/O.

A job leases CPUs exactly like an exclusive VM does, under the holder
``HolderRef(driver="run", key=NAME, name=NAME)`` with the role ``task`` (and
``sibling-hold`` for sibling threads kept empty under ``--threads isolate``/``require``).
Only VM CPUs are ever leased: the host reserve / housekeeping CPUs never are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pinwarden.allocator import Request, allocate
from pinwarden.cpuset import CpuSet
from pinwarden.domain import ThreadPolicy
from pinwarden.errors import InputError, Refusal
from pinwarden.model import SIBLING_HOLD, HolderRef, Lease, Plan
from pinwarden.partition import Host

TASK_ROLE = "task"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,63}")


@dataclass(frozen=True, slots=True)
class JobRequest:
    name: str
    count: int | None = None  # --exclusive N
    cpus: CpuSet | None = None  # --cpus LIST
    threads: ThreadPolicy = "prefer"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InputError(f"invalid job name {name!r}: use 1-64 letters, digits and _.@:+- "
                         "(starting with a letter or digit)")
    return name


def job_holder(name: str) -> HolderRef:
    return HolderRef("run", name, name)


def _cpus(cpus: CpuSet) -> str:
    return f"CPU {cpus}" if len(cpus) == 1 else f"CPUs {cpus}"


def _holders_of(cpus: CpuSet, taken: dict[int, HolderRef]) -> str:
    by: dict[HolderRef, list[int]] = {}
    for cpu in cpus:
        by.setdefault(taken[cpu], []).append(cpu)
    return "; ".join(f"{_cpus(CpuSet.of(c))} {'is' if len(c) == 1 else 'are'} leased to {h}"
                     for h, c in by.items())


def decide_job(request: JobRequest, host: Host, leases: Sequence[Lease]) -> Plan:
    """The job's plan beside ``leases``, or :class:`Refusal` saying which CPU and holder."""
    holder = job_holder(request.name)
    mine = CpuSet.of(lease.cpu for lease in leases if lease.holder == holder)
    if mine:
        raise Refusal(f"a job named {request.name!r} already holds {_cpus(mine)}; "
                      f"choose another --name or release it with "
                      f"`pinwarden release {request.name}`", code="job-exists")
    taken = {lease.cpu: lease.holder for lease in leases}
    part = host.partition
    pool = part.vm_cpus & host.topology.online
    reserve = host.topology.online - pool
    free = pool - CpuSet.of(taken)
    holds = CpuSet()
    if request.cpus is not None:
        wanted = request.cpus
        unknown = wanted - host.topology.online
        if unknown:
            raise Refusal(f"{_cpus(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                          f"online on this host (online: {host.topology.online})",
                          code="unknown-cpu")
        housekeeping = wanted - pool
        if housekeeping:
            one = len(housekeeping) == 1
            raise Refusal(f"{_cpus(housekeeping)} {'belongs' if one else 'belong'} to the "
                          f"host and {'is' if one else 'are'} never leased (housekeeping "
                          f"CPUs {reserve}: {part.reason}); choose among the VM CPUs {pool}",
                          code="host-cpu")
        busy = wanted - free
        if busy:
            raise Refusal(f"cannot lease {_cpus(wanted)} to job {request.name!r}: "
                          f"{_holders_of(busy, taken)}; choose other CPUs or release "
                          f"that holder first", code="conflict")
        chosen = tuple(wanted)
    else:
        count = request.count if request.count is not None else 1
        if count < 1:
            raise InputError(f"--exclusive needs at least 1 CPU, not {count}")
        if count > len(free):
            busy = pool - free
            why = _holders_of(busy, taken) if busy else "none is leased"
            raise Refusal(
                f"cannot lease {count} exclusive CPU{'s' if count > 1 else ''} to job "
                f"{request.name!r}: only {len(free)} of the VM CPUs {pool or '(none)'} "
                f"{'is' if len(free) == 1 else 'are'} free ({why}); the host CPUs "
                f"{reserve or '(none)'} are never leased", code="insufficient-cpus")
        allocation = allocate(host.topology, pool, free, Request(count, request.threads))
        chosen, holds = allocation.cpus, allocation.holds
    leased = {cpu: TASK_ROLE for cpu in chosen}
    leased.update({cpu: SIBLING_HOLD for cpu in holds})
    return Plan(domain=request.name, uuid=None, exclusive=True, vcpus={},
                emulator=CpuSet.of(chosen), leases=leased,
                notes=(f"sibling threads {holds} are held empty",) if holds else ())
