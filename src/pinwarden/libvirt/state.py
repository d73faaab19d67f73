"""Snapshot values of libvirt domains, as the pure cores (repin, reconcile, hook) see them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pinwarden.cpuset import EMPTY, CpuSet, union
from pinwarden.domain import DomainSpec
from pinwarden.model import HolderRef, Plan, domain_holder
from pinwarden.record import field, record


@record
class Affinity:
    """Where each thread of a running domain may run (libvirt's live pin info)."""

    vcpus: Mapping[int, CpuSet] = field(default_factory=dict)
    emulator: CpuSet = EMPTY
    iothreads: Mapping[int, CpuSet] = field(default_factory=dict)
    #: vCPUs not online (no thread): their CPUs are where a hot-plug would put them
    offline: frozenset[int] = frozenset()

    def threads(self) -> list[tuple[str, int | None, CpuSet]]:
        """``(kind, ident, cpus)`` for every thread group: vcpu N, emulator, iothread N."""
        out: list[tuple[str, int | None, CpuSet]] = [
            ("vcpu", v, c) for v, c in sorted(self.vcpus.items())]
        if self.emulator:
            out.append(("emulator", None, self.emulator))
        out.extend(("iothread", i, c) for i, c in sorted(self.iothreads.items()))
        return out


def vcpus_by_number(answer: tuple[Any, Any]) -> dict[int, CpuSet]:
    """libvirt's ``virDomainGetVcpus`` answer (``dom.vcpus()``: each online vCPU's info,
    its number first, and its CPU map, in the same order) as vCPU number -> CPUs.  By
    number, not position: with vCPU 1 offline and 2 online, the second map is vCPU 2's."""
    infos, maps = answer
    return {int(info[0]): CpuSet.of(i for i, on in enumerate(bits) if on)
            for info, bits in zip(infos, maps, strict=False)}


def with_offline_vcpus(affinity: Affinity, live: DomainSpec, online: CpuSet) -> Affinity:
    """``affinity`` (of the online vCPUs' threads) with the domain's offline vCPUs — up to
    its ``<vcpu>`` count — on the CPUs libvirt pins them to when they are hot-plugged
    (``virsh setvcpus --live`` gives the new thread and its cgroup that pin): the live
    ``<vcpupin>``, else a static ``<vcpu cpuset>``, else every CPU of the host (``online``).
    An exclusive start clears those of its lease too — on cgroup v1 a hot-plug onto the
    lease fails — and gives them back the same way."""
    default = live.cpuset if live.cpuset is not None and live.placement != "auto" else online
    offline = {v: live.vcpupins.get(v, default) for v in range(live.vcpus)
               if v not in affinity.vcpus}
    return Affinity({**affinity.vcpus, **offline}, affinity.emulator, affinity.iothreads,
                    affinity.offline | frozenset(offline))


@record
class DomainInfo:
    """One libvirt domain at one moment."""

    driver: str  # "qemu" or "lxc"
    name: str
    uuid: str
    active: bool
    live: DomainSpec | None = None  # the running definition (active domains)
    persistent: DomainSpec | None = None  # the stored definition (persistent domains)
    affinity: Affinity | None = None  # live affinity (active domains)
    pid: int | None = None  # QEMU / libvirt_lxc process (active domains)
    problem: str | None = None  # why a spec is missing (XML pinwarden cannot parse)
    #: Active but between states (starting, or stopping): libvirt cannot say where its
    #: threads run yet.  Nobody adopts, re-pins or gives back to it until it settles.
    settling: bool = False

    @property
    def holder(self) -> HolderRef:
        return domain_holder(self.driver, self.name, self.uuid.lower())

    @property
    def request(self) -> DomainSpec | None:
        """What the user asked for: the stored definition, else (transient) the live one."""
        return self.persistent or self.live

    @property
    def exclusive(self) -> bool:
        spec = self.live or self.persistent
        return bool(spec and spec.exclusive)


@record
class Repin:
    """Move one thread group of a running domain from ``before`` to ``after`` CPUs."""

    domain: str
    uuid: str
    thread: str  # "vcpu", "emulator", "iothread"
    ident: int | None  # vCPU number or iothread id
    before: CpuSet
    after: CpuSet

    @property
    def label(self) -> str:
        return group_label(self.thread, self.ident)

    def reversed(self) -> Repin:
        """The move back, from ``after`` to ``before``."""
        return Repin(self.domain, self.uuid, self.thread, self.ident, self.after, self.before)

    def __str__(self) -> str:
        return f"{self.domain} {self.label}: {self.before} -> {self.after}"


def group_label(thread: str, ident: int | None) -> str:
    """A thread group's name in records and messages: ``vcpu2``, ``emulator``,
    ``iothread1``."""
    return thread if ident is None else f"{thread}{ident}"


#: The kernel keeps a thread's name (``comm``) to 15 bytes.
COMM_MAX = 15


def qemu_thread(comm: str | None) -> tuple[str, int | None] | None:
    """The thread group of the QEMU thread named ``comm`` (libvirt passes
    ``debug-threads=on``): ``("vcpu", N)`` for ``CPU N/KVM`` (or ``/TCG`` …), ``("vcpu",
    None)`` for ``ALL CPUs/TCG`` (every vCPU: single-threaded TCG), ``("iothread", N)``
    for ``IO iothreadN``, and ``("emulator", None)`` for every other thread — the main
    loop, workers, the monitor's I/O thread.  None: a thread gone, or an I/O thread's
    name the kernel may have cut short."""
    if comm is None:
        return None
    if comm.startswith("ALL CPUs/"):
        return "vcpu", None
    if comm.startswith("CPU ") and "/" in comm:
        number = comm[4:].partition("/")[0]
        if number.isdigit():
            return "vcpu", int(number)
    if comm.startswith("IO iothread") and comm[11:].isdigit():
        return None if len(comm) >= COMM_MAX else ("iothread", int(comm[11:]))
    return "emulator", None


def group_affinity(comms: Mapping[int, str | None], masks: Mapping[int, CpuSet],
                   ) -> dict[tuple[str, int | None], CpuSet]:
    """Where each thread group of a QEMU process may run, as the kernel says (pure): the
    union of the masks (thread id → CPUs) of the threads :func:`qemu_thread` puts in it,
    by thread name (thread id → name).  Threads without a mask or a group are left out."""
    out: dict[tuple[str, int | None], CpuSet] = {}
    for tid, comm in comms.items():
        group = qemu_thread(comm)
        cpus = masks.get(tid)
        if group is not None and cpus is not None:
            out[group] = out[group] | cpus if group in out else cpus
    return out


def threads_as_planned(plan: Plan, comms: dict[int, str | None]) -> dict[int, CpuSet]:
    """The CPUs each QEMU thread (id → name) gets under ``plan`` — a vCPU its own,
    single-threaded TCG's one thread every vCPU's, an I/O thread its own (else the
    emulator's), every other thread the emulator's.  Threads the kernel cut the name of,
    or that the plan gives nothing, are left out."""
    out: dict[int, CpuSet] = {}
    for tid, comm in comms.items():
        group = qemu_thread(comm)
        if group is None:
            continue
        thread, ident = group
        if thread == "vcpu":
            cpus = union(plan.vcpus.values()) if ident is None else plan.vcpus.get(ident)
        elif thread == "iothread":
            cpus = plan.iothreads.get(ident) if ident is not None else None
            cpus = cpus or plan.emulator
        else:
            cpus = plan.emulator
        if cpus:
            out[tid] = cpus
    return out
