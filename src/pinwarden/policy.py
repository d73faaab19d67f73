"""Placement policy: a pure function of (domain spec, host, current leases) → plan or refusal.

No I/O here.  See DEVELOPERS.md for the rule table; in short:

* the partition decides what a domain without affinity gets (``isolcpus``: the isolated
  CPUs; ``cgroup``: the partition cgroup's effective cpuset; ``none``: online − reserve),
  always minus every CPU leased exclusively to someone else ("never all CPUs");
* affinity in the XML is honoured, except that in ``cgroup`` mode it must lie inside the
  partition, and nobody but the holder may use a leased CPU;
* an exclusive domain leases every CPU its threads may run on (vCPUs, emulator, iothreads,
  plus sibling threads held empty under ``threads="isolate"``), never a housekeeping CPU.

Refusal codes: ``no-vcpus``, ``bad-pin``, ``unknown-cpu``, ``offline-cpu``,
``outside-partition``, ``host-cpu``, ``conflict``, ``insufficient-cpus`` (and the
allocator's ``no-smt``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pinwarden.cpuset import CpuSet, union
from pinwarden.domain import DomainSpec
from pinwarden.errors import Refusal
from pinwarden.model import SIBLING_HOLD, Lease, Plan
from pinwarden.partition import Host, Partition, shared_pool

if TYPE_CHECKING:
    from pinwarden import allocator


@dataclass(frozen=True, slots=True)
class _Ctx:
    """Everything one decision looks at, computed once."""

    spec: DomainSpec
    host: Host
    others: Mapping[int, Lease]  # cpu -> lease of another holder

    @property
    def part(self) -> Partition:
        return self.host.partition

    @property
    def who(self) -> str:
        return f"domain {self.spec.name!r}"

    @property
    def leased(self) -> CpuSet:
        return CpuSet(frozenset(self.others))

    @property
    def vm_cpus(self) -> CpuSet:
        return self.part.vm_cpus & self.host.topology.online

    def where(self) -> str:
        """The partition, for messages."""
        if self.part.mode == "cgroup":
            return f"partition cgroup {self.part.cgroup or '?'} (cpus {self.part.vm_cpus})"
        if self.part.mode == "isolcpus":
            return f"isolated CPUs {self.part.vm_cpus}"
        return f"VM CPUs {self.part.vm_cpus} (online minus host reserve)"


def decide(spec: DomainSpec, host: Host, leases: Sequence[Lease], *,
           driver: str = "qemu") -> Plan:
    """Plan ``spec`` on ``host`` beside ``leases``, or raise :class:`~pinwarden.errors.Refusal`.

    Leases already held by the same holder (``driver``, ``spec.key``) are ignored, so
    re-planning a holder replaces its own leases.
    """
    others = {lease.cpu: lease for lease in sorted(leases, key=lambda le: le.cpu)
              if (lease.holder.driver, lease.holder.key) != (driver, spec.key)}
    ctx = _Ctx(spec, host, others)
    _check_shape(spec)
    for label, cpus in _affinity(spec):
        _check_exists(ctx, label, cpus)
        if ctx.part.mode == "cgroup":
            outside = cpus - ctx.part.vm_cpus
            if outside:
                raise Refusal(
                    f"{label} of {ctx.who} uses CPUs {outside} outside the {ctx.where()}: "
                    f"pin it inside {ctx.part.vm_cpus} or widen the partition",
                    code="outside-partition")
    plan = _exclusive(ctx) if spec.exclusive else _shared(ctx)
    if spec.placement == "auto" and plan.default_cpus is not None:
        plan = replace(plan, notes=(*plan.notes, (
            f"{ctx.who} asks for <vcpu placement='auto'> (numad); pinwarden places it "
            f"statically on {plan.default_cpus} instead, so that no leased CPU is used")))
    return plan


# -- validation ----------------------------------------------------------------------------


def _affinity(spec: DomainSpec) -> Iterator[tuple[str, CpuSet]]:
    """Every CPU set the XML names, with the element it came from."""
    if spec.cpuset is not None:
        yield f"<vcpu cpuset='{spec.cpuset}'>", spec.cpuset
    for vcpu, cpus in sorted(spec.vcpupins.items()):
        yield f"<vcpupin vcpu='{vcpu}' cpuset='{cpus}'>", cpus
    if spec.emulatorpin is not None:
        yield f"<emulatorpin cpuset='{spec.emulatorpin}'>", spec.emulatorpin
    for ident, cpus in sorted(spec.iothreadpins.items()):
        yield f"<iothreadpin iothread='{ident}' cpuset='{cpus}'>", cpus


def _check_shape(spec: DomainSpec) -> None:
    if spec.vcpus < 1:
        raise Refusal(f"domain {spec.name!r} has no vCPUs (<vcpu>{spec.vcpus}</vcpu>): give "
                      "it at least one", code="no-vcpus")
    for vcpu in sorted(spec.vcpupins):
        if vcpu >= spec.vcpus:
            raise Refusal(f"<vcpupin vcpu='{vcpu}'> pins a vCPU domain {spec.name!r} does not "
                          f"have (vCPUs 0-{spec.vcpus - 1}): remove the pin or raise <vcpu>",
                          code="bad-pin")
    ids = spec.iothread_id_set
    for ident in sorted(spec.iothreadpins):
        if ident not in ids:
            have = f"iothreads {CpuSet.of(ids)}" if ids else "no iothreads"
            raise Refusal(f"<iothreadpin iothread='{ident}'> pins an iothread domain "
                          f"{spec.name!r} does not have ({have}): remove the pin or add the "
                          "iothread", code="bad-pin")


def _check_exists(ctx: _Ctx, label: str, cpus: CpuSet) -> None:
    topo = ctx.host.topology
    unknown = cpus - topo.present
    if unknown:
        raise Refusal(f"CPU {unknown.first()} in {label} of {ctx.who} does not exist on this "
                      f"host (CPUs {topo.present}): pin to existing CPUs", code="unknown-cpu")
    offline = cpus - topo.online
    if offline:
        raise Refusal(f"CPU {offline.first()} in {label} of {ctx.who} is offline (online: "
                      f"{topo.online}): bring it online or pin elsewhere", code="offline-cpu")


def _conflict(ctx: _Ctx, label: str, cpus: CpuSet) -> None:
    """Refuse when ``cpus`` touches a CPU leased to another holder."""
    taken = cpus & ctx.leased
    if not taken:
        return
    cpu = taken.first()
    lease = ctx.others[cpu]
    more = f" (and {len(taken) - 1} more leased CPUs)" if len(taken) > 1 else ""
    raise Refusal(
        f"CPU {cpu}{more} for {label} of {ctx.who} is leased exclusively to {lease.holder} "
        f"({lease.role}): choose other CPUs or release it first "
        f"(pinwarden release {lease.holder.name})", code="conflict")


# -- shared domains ------------------------------------------------------------------------


def _shared_pool(ctx: _Ctx, exclude: CpuSet, notes: list[str]) -> CpuSet:
    """Default placement (:func:`~pinwarden.partition.shared_pool`) minus ``exclude``;
    the housekeeping fallback is refused in ``cgroup`` mode (outside the partition)."""
    pool, fallback = shared_pool(ctx.host, ctx.leased | exclude)
    if fallback and ctx.part.mode == "cgroup":
        raise Refusal(
            f"every CPU of the {ctx.where()} is leased exclusively; {ctx.who} has nowhere to "
            "run: release a lease or widen the partition", code="insufficient-cpus")
    if not pool:
        raise Refusal(f"no CPU is free for {ctx.who}: every online CPU is leased; release a "
                      "lease first", code="insufficient-cpus")
    notes.extend(fallback)
    return pool


def _shared(ctx: _Ctx) -> Plan:
    spec = ctx.spec
    notes: list[str] = []
    for label, cpus in _affinity(spec):
        _conflict(ctx, label, cpus)
    pool: CpuSet | None = None

    def default() -> CpuSet:
        nonlocal pool
        if pool is None:
            pool = spec.cpuset if spec.cpuset is not None else _shared_pool(ctx, CpuSet(),
                                                                             notes)
        return pool

    vcpus = {v: spec.vcpupins.get(v) or default() for v in range(spec.vcpus)}
    emulator = spec.emulatorpin or default()
    iothreads = {i: spec.iothreadpins.get(i) or default() for i in spec.iothread_id_set}
    if ctx.part.mode != "cgroup" and spec.has_affinity:
        used = union([*vcpus.values(), emulator, *iothreads.values()])
        outside = used & ctx.part.host_cpus
        if outside:
            notes.append(f"{ctx.who} is pinned onto housekeeping CPUs {outside} outside the "
                         f"{ctx.where()} (affinity in the XML is honoured)")
    return Plan(domain=spec.name, uuid=spec.uuid, exclusive=False, vcpus=vcpus,
                emulator=emulator, iothreads=iothreads, leases={}, default_cpus=pool,
                notes=tuple(notes))


# -- exclusive domains ---------------------------------------------------------------------


def _no_housekeeping(ctx: _Ctx, label: str, cpus: CpuSet) -> None:
    housekeeping = cpus - ctx.part.vm_cpus
    if housekeeping:
        raise Refusal(
            f"CPU {housekeeping.first()} for {label} of exclusive {ctx.who} is a "
            f"housekeeping CPU, outside the {ctx.where()}; housekeeping CPUs are never "
            f"leased: use CPUs from {ctx.part.vm_cpus}", code="host-cpu")


class _Leases:
    """The roles of one exclusive plan, checked as they are added."""

    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx
        self.roles: dict[int, str] = {}

    def add(self, label: str, cpus: CpuSet, role: str) -> None:
        _no_housekeeping(self.ctx, label, cpus)
        _conflict(self.ctx, label, cpus)
        for cpu in cpus:
            self.roles.setdefault(cpu, role)

    @property
    def cpus(self) -> CpuSet:
        return CpuSet(frozenset(self.roles))


def _nodes_of(ctx: _Ctx, cpus: CpuSet) -> CpuSet | None:
    if ctx.spec.numa_nodeset is not None:
        return ctx.spec.numa_nodeset
    topo = ctx.host.topology
    return CpuSet.of(topo.node_of(c) for c in cpus if c in topo.cpus) or None


def _allocate(ctx: _Ctx, free: CpuSet, request: allocator.Request) -> allocator.Allocation:
    from pinwarden import allocator

    try:
        return allocator.allocate(ctx.host.topology, ctx.part.vm_cpus & ctx.vm_cpus, free,
                                  request)
    except Refusal as exc:
        raise Refusal(f"exclusive {ctx.who}: {exc.message}",
                      code=exc.code) from None


def _exclusive(ctx: _Ctx) -> Plan:
    # Imported here: shared domains (most of the libvirt hook's admissions) never need it.
    from pinwarden import allocator

    spec = ctx.spec
    topo = ctx.host.topology
    notes: list[str] = []
    own = _Leases(ctx)
    isolate_emulator = spec.emulatorpin is None and spec.emulator == "isolate"
    emulator: CpuSet | None = spec.emulatorpin
    holds = CpuSet()

    if spec.vcpupins:
        missing = [v for v in range(spec.vcpus) if v not in spec.vcpupins]
        if missing:
            raise Refusal(f"exclusive {ctx.who} pins some vCPUs but not vCPU {missing[0]}: pin "
                          "every vCPU, or none and let pinwarden choose", code="bad-pin")
        vcpus = dict(sorted(spec.vcpupins.items()))
        for vcpu, cpus in vcpus.items():
            own.add(f"<vcpupin vcpu='{vcpu}'>", cpus, f"vcpu{vcpu}")
        if spec.threads == "isolate":
            siblings = union(topo.siblings(c) for c in own.cpus if c in topo.cpus)
            holds = (siblings & topo.online) - own.cpus
    else:
        within = ctx.vm_cpus if spec.cpuset is None else spec.cpuset & ctx.vm_cpus
        if spec.cpuset is not None:
            _no_housekeeping(ctx, f"<vcpu cpuset='{spec.cpuset}'>", spec.cpuset)
        count = spec.vcpus + (1 if isolate_emulator else 0)
        pinned = union([spec.emulatorpin or CpuSet(), *spec.iothreadpins.values()])
        got = _allocate(ctx, within - ctx.leased - pinned, allocator.Request(
            count=count, threads=spec.threads, nodes=spec.numa_nodeset))
        chosen = list(got.cpus)
        if isolate_emulator:
            emulator = CpuSet.of([chosen.pop()])
        vcpus = {v: CpuSet.of([cpu]) for v, cpu in enumerate(chosen)}
        for vcpu, cpus in vcpus.items():
            own.add(f"vCPU {vcpu}", cpus, f"vcpu{vcpu}")
        holds = got.holds

    if emulator is None:
        if isolate_emulator:  # explicit vCPU pins: one more CPU, near the vCPUs
            got = _allocate(ctx, ctx.vm_cpus - ctx.leased - own.cpus - holds,
                            allocator.Request(count=1, threads="prefer",
                                              nodes=_nodes_of(ctx, own.cpus)))
            emulator = CpuSet.of(got.cpus)
        elif spec.emulator == "shared":
            emulator = _shared_pool(ctx, own.cpus | holds, notes)
            notes.append(f"the emulator threads of exclusive {ctx.who} share CPUs {emulator} "
                         "with other domains (emulator='shared'): the kernel cannot enforce "
                         "the domain's exclusivity for them")
        else:  # float over the domain's own vCPU CPUs
            emulator = union(vcpus.values())
    if spec.emulatorpin is not None or isolate_emulator:
        own.add("<emulatorpin>", emulator, "emulator")

    iothreads: dict[int, CpuSet] = {}
    for ident in spec.iothread_id_set:
        pin = spec.iothreadpins.get(ident)
        if pin is None:
            iothreads[ident] = emulator  # float like the emulator
        else:
            iothreads[ident] = pin
            own.add(f"<iothreadpin iothread='{ident}'>", pin, f"iothread{ident}")

    if holds:
        holds = holds - own.cpus
        own.add("sibling threads held empty (threads='isolate')", holds, SIBLING_HOLD)

    every = union([*vcpus.values(), emulator, *iothreads.values()])
    return Plan(domain=spec.name, uuid=spec.uuid, exclusive=True, vcpus=vcpus,
                emulator=emulator, iothreads=iothreads, leases=dict(sorted(own.roles.items())),
                default_cpus=every, notes=tuple(notes))
