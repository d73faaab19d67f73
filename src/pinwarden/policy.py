"""Placement policy: a pure function of (request, host, current leases) → plan or refusal.

No I/O here.  Two kinds of request share every rule:

* :class:`~pinwarden.domain.DomainSpec` — a libvirt domain (shared or exclusive);
* :class:`JobSpec` — a ``pinwarden run`` job, always exclusive.

See DEVELOPERS.md for the rule table; in short:

* the partition decides what a domain without affinity gets (``isolcpus``: the isolated
  CPUs; ``cgroup``: the partition cgroup's effective cpuset; ``none``: online − reserve),
  always minus every CPU leased exclusively to someone else ("never all CPUs");
* affinity in the XML is honoured, except that in ``cgroup`` mode it must lie inside the
  partition, and nobody but the holder may use a leased CPU;
* an exclusive holder leases every CPU its threads may run on (vCPUs, emulator, iothreads;
  a job's task CPUs), never a housekeeping CPU; under the thread policies ``whole`` (the
  default), ``isolate`` and ``require`` it also holds the other threads of every core it
  uses (role ``sibling-hold``), so no physical core is ever split between two holders;
  ``prefer`` opts in to sharing cores.  Holds are computed from the leased CPUs the same
  way whether the allocator chose them or the XML pinned them, so a plan rendered as XML
  (explicit pins) plans again to the same leases.

Refusal codes: ``no-vcpus``, ``bad-pin``, ``unknown-cpu``, ``unknown-node``,
``offline-cpu``, ``outside-partition``, ``host-cpu``, ``conflict``, ``job-exists``,
``insufficient-cpus`` (and the allocator's ``no-smt``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from pinwarden.cpuset import EMPTY, CpuSet, plural, union
from pinwarden.domain import DEFAULT_THREADS, DomainSpec, ThreadPolicy
from pinwarden.errors import InputError, Refusal
from pinwarden.model import (
    KEPT_ROLE,
    SIBLING_HOLD,
    HolderRef,
    Lease,
    Plan,
    domain_holder,
    driver_of_type,
    is_unrecorded,
    job_holder,
    kept_why,
    release_command,
    stop_command,
)
from pinwarden.partition import Host, Partition, no_housekeeping, shared_pool, where_of
from pinwarden.record import record, replace

if TYPE_CHECKING:
    from pinwarden import allocator

#: Lease role of a job's CPUs.
TASK_ROLE = "task"


@record
class JobSpec:
    """``pinwarden run``: ``count`` CPUs chosen by topology, or exactly ``cpus``."""

    name: str
    count: int | None = None  # --exclusive N (default 1)
    cpus: CpuSet | None = None  # --cpus LIST
    threads: ThreadPolicy = DEFAULT_THREADS
    isolated: bool = False  # --isolated: no scheduler load balancing on its CPUs


Request = DomainSpec | JobSpec


def holder_of(request: Request) -> HolderRef:
    """The holder a request leases for (:mod:`pinwarden.model`'s identity rule)."""
    if isinstance(request, JobSpec):
        return job_holder(request.name)
    return domain_holder(driver_of_type(request.domain_type), request.name, request.uuid)


class _Ctx:
    """Everything one decision looks at, computed once.  (A plain class: a record costs a
    compile at import, and every command pays it.)"""

    __slots__ = ("host", "leased", "mine", "name", "others", "vm_cpus", "who")

    def __init__(self, name: str, who: str, host: Host, others: Mapping[int, Lease],
                 mine: CpuSet, leased: CpuSet = EMPTY, vm_cpus: CpuSet = EMPTY) -> None:
        self.name = name
        self.who = who  # "domain 'x'" / "job 'x'"
        self.host = host
        self.others = others  # cpu -> lease of another holder
        self.mine = mine  # CPUs the holder itself already leases (replaced by this plan)
        self.leased = leased  # every CPU of ``others``
        self.vm_cpus = vm_cpus  # online VM CPUs

    @property
    def part(self) -> Partition:
        return self.host.partition

    def where(self) -> str:
        """The partition, for messages."""
        return where_of(self.part)


def decide(request: Request, host: Host, leases: Sequence[Lease], *,
           holder: HolderRef | None = None) -> Plan:
    """Plan ``request`` on ``host`` beside ``leases``, or raise
    :class:`~pinwarden.errors.Refusal`.

    Leases already held by ``holder`` (default :func:`holder_of`) are ignored, so
    re-planning a holder replaces its own leases — except for jobs, whose names are unique
    among running jobs (``job-exists``).
    """
    holder = holder if holder is not None else holder_of(request)
    others, mine = _split(leases, holder)
    who = f"job {request.name!r}" if isinstance(request, JobSpec) else \
        f"domain {request.name!r}"
    ctx = _Ctx(request.name, who, host, others, CpuSet(frozenset(mine)),
               CpuSet(frozenset(others)), _online_vm_cpus(host))
    if isinstance(request, JobSpec) or request.exclusive:
        _housekeeping_left(ctx)
    if isinstance(request, JobSpec):
        return _job(ctx, request)
    return _domain(ctx, request)


def _housekeeping_left(ctx: _Ctx) -> None:
    """Nothing is leased on a host whose VM CPUs are every online CPU (mode ``cgroup`` with
    a partition cgroup that has them all, as libvirt's ``machine`` does by default): the
    housekeeping CPUs, never leased, would be none — the first lease took CPU 0 and moved
    the host's IRQs and unbound work onto the other CPUs (real-libvirt hunt)."""
    problem = no_housekeeping(ctx.host)
    if problem is not None:
        raise Refusal(f"cannot lease CPUs to {ctx.who}: {problem}", code="no-housekeeping")
    # Every housekeeping CPU leased: only after the configuration moved the host reserve
    # onto CPUs leased under the partition of before (host_reserve changed while a job
    # ran): a new lease took the last CPU the host had (status hunt).
    kept = ctx.part.host_cpus & ctx.host.topology.online
    if kept and kept <= ctx.leased:
        holder = ctx.others[kept.first()].holder
        raise Refusal(
            f"cannot lease CPUs to {ctx.who}: the housekeeping {kept.named()} "
            f"{'is' if len(kept) == 1 else 'are'} leased to {holder} (leased before the "
            f"configuration made {'it' if len(kept) == 1 else 'them'} the host's), so no CPU "
            f"would be left for the host; release {holder} first, or give the "
            f"configuration its host reserve of before", code="no-housekeeping")


def _split(leases: Sequence[Lease], holder: HolderRef) -> tuple[dict[int, Lease], list[int]]:
    """(CPU → lease of another holder, CPUs leased to ``holder``).  A lease is the
    holder's when driver and key agree (whatever the name); consecutive leases of one
    holder usually share one ``HolderRef``, compared once."""
    driver, key = holder.driver, holder.key
    others: dict[int, Lease] = {}
    mine: list[int] = []
    last: HolderRef | None = None
    ours = False
    for lease in leases:
        ref = lease.holder
        if ref is not last:
            last, ours = ref, ref.key == key and ref.driver == driver
        if ours:
            mine.append(lease.cpu)
        else:
            others[lease.cpu] = lease
    return others, mine


#: The last (VM CPUs, online CPUs, their intersection), by the identity of the two
#: (immutable) sets: a process deciding again on the same host computes it once.
_VM_ONLINE: list[tuple[frozenset[int], frozenset[int], CpuSet]] = []


def _online_vm_cpus(host: Host) -> CpuSet:
    """The partition's VM CPUs that are online."""
    vm, online = host.partition.vm_cpus.cpus, host.topology.online.cpus
    for seen_vm, seen_online, result in _VM_ONLINE:
        if seen_vm is vm and seen_online is online:
            return result
    result = CpuSet(vm & online)
    _VM_ONLINE[:] = [(vm, online, result)]
    return result


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
    beyond = [vcpu for vcpu in spec.vcpupins if vcpu >= spec.vcpus]
    if beyond:
        vcpu = min(beyond)
        raise Refusal(f"<vcpupin vcpu='{vcpu}'> pins a vCPU domain {spec.name!r} does not "
                      f"have (vCPUs 0-{spec.vcpus - 1}): remove the pin or raise <vcpu>",
                      code="bad-pin")
    ids = frozenset(spec.iothread_id_set)
    unknown = [ident for ident in spec.iothreadpins if ident not in ids]
    if unknown:
        ident = min(unknown)
        have = f"iothreads {CpuSet.of(ids)}" if ids else "no iothreads"
        raise Refusal(f"<iothreadpin iothread='{ident}'> pins an iothread domain "
                      f"{spec.name!r} does not have ({have}): remove the pin or add the "
                      "iothread", code="bad-pin")


def _check_exists(ctx: _Ctx, label: str, cpus: CpuSet) -> None:
    topo = ctx.host.topology
    unknown = cpus - topo.present
    if unknown:
        raise Refusal(f"CPU {unknown.first()} in {label} of {ctx.who} does not exist on this "
                      f"host ({topo.present.named()}): pin to existing CPUs", code="unknown-cpu")
    offline = cpus - topo.online
    if offline:
        raise Refusal(f"CPU {offline.first()} in {label} of {ctx.who} is offline (online: "
                      f"{topo.online}): bring it online or pin elsewhere", code="offline-cpu")


def _check_nodes(ctx: _Ctx, spec: DomainSpec) -> tuple[DomainSpec, str | None]:
    """The ``<numatune>`` nodeset names nodes this host has — memory-only ones too (GPU
    memory, CXL: libvirt puts the memory there; they were refused as nodes the host lacks,
    hunt).  The CPUs are placed on the nodeset's nodes that have CPUs; when it names none,
    anywhere, with a note."""
    every = ctx.host.topology.nodes
    for cell, nodeset in sorted(spec.memnodes.items()):
        missing = nodeset - CpuSet.of(every)
        if missing:  # (libvirt fails the start writing it into the cell's cpuset.mems)
            raise Refusal(f"<numatune><memnode cellid='{cell}'> of {ctx.who} names NUMA "
                          f"node {missing.first()}, which this host does not have (nodes: "
                          f"{CpuSet.of(every) or 'none'}): fix the nodeset",
                          code="unknown-node")
    if spec.numa_nodeset is None:
        return spec, None
    unknown = spec.numa_nodeset - CpuSet.of(every)
    if unknown:
        raise Refusal(f"<numatune> of {ctx.who} names NUMA node {unknown.first()}, which "
                      f"this host does not have (nodes: {CpuSet.of(every) or 'none'}): fix "
                      f"the nodeset", code="unknown-node")
    with_cpus = CpuSet.of(n for n in spec.numa_nodeset if every.get(n))
    if with_cpus == spec.numa_nodeset:
        return spec, None
    memory_only = spec.numa_nodeset - with_cpus
    if with_cpus:
        return replace(spec, numa_nodeset=with_cpus), (
            f"the <numatune> of {ctx.who} names memory-only NUMA {memory_only.named('node')}: "
            f"its CPUs are placed on {with_cpus.named('node')}")
    return replace(spec, numa_nodeset=None), (
        f"the <numatune> of {ctx.who} names only memory-only NUMA "
        f"{memory_only.named('node')}: "
        f"its CPUs are placed as if it named none")


def _conflict(ctx: _Ctx, label: str, cpus: CpuSet, *, advice: str = "") -> None:
    """Refuse when ``cpus`` touches a CPU leased to another holder."""
    taken = cpus & ctx.leased
    if not taken:
        return
    cpu = taken.first()
    lease = ctx.others[cpu]
    more = f" (and {plural(len(taken) - 1, 'more leased CPU')})" if len(taken) > 1 else ""
    if lease.role == KEPT_ROLE:  # no lease to release: it runs on there
        raise Refusal(
            f"CPU {cpu}{more} for {label} of {ctx.who} is kept by {lease.holder}, "
            + ("which runs in its holder group there while the lease database records no "
               "lease for it (lost or replaced): choose other " if is_unrecorded(lease.holder)
               else "whose leases were released with --force while it runs there: choose "
               "other ")
            + f"CPUs{advice} or stop it first ({stop_command(lease.holder, lease.owner_pid)})",
            code="conflict")
    free = (f"stop it first ({stop_command(lease.holder, lease.owner_pid)}: its leases go "
            "with it)" if lease.owner_pid is not None
            else f"release it first ({release_command(lease.holder)})")
    raise Refusal(
        f"CPU {cpu}{more} for {label} of {ctx.who} is leased exclusively to {lease.holder} "
        f"({lease.role}): choose other CPUs{advice} or {free}", code="conflict")


def _holders_of(ctx: _Ctx, cpus: CpuSet) -> str:
    """``CPUs 1-2 to job 'A'; CPU 3 to qemu domain 'x'`` (holders in the order of their
    lowest CPU)."""
    others = ctx.others
    by_object: dict[int, tuple[HolderRef, list[int]]] = {}  # grouped first by identity:
    for cpu in cpus:  # leases of one holder share its HolderRef, so few hashes below
        lease = others.get(cpu)
        if lease is not None:
            entry = by_object.get(id(lease.holder))
            if entry is None:
                entry = by_object[id(lease.holder)] = (lease.holder, [])
            entry[1].append(cpu)
    by: dict[HolderRef, list[int]] = {}
    for holder, held in by_object.values():
        by.setdefault(holder, []).extend(held)
    return "; ".join(f"{CpuSet.of(c).named()} to {h}"
                     f"{f' ({kept_why(h)})' if _kept(ctx, c) else ''}"
                     for h, c in by.items())


def _kept(ctx: _Ctx, cpus: Iterable[int]) -> bool:
    """``cpus`` are those of a holder freed by a forced release that runs on (no lease:
    releasing it again frees nothing, stopping it does)."""
    return all(ctx.others[c].role == KEPT_ROLE for c in cpus if c in ctx.others)


def _free_advice(ctx: _Ctx, cpus: CpuSet) -> str:
    """What frees one of ``cpus`` (leased to others): releasing a holder, or stopping one
    a forced release left running there."""
    kept: dict[HolderRef, Lease] = {}
    for cpu in cpus:
        lease = ctx.others.get(cpu)
        if lease is not None and lease.role == KEPT_ROLE:
            kept.setdefault(lease.holder, lease)
    ways = ["release one of them"] if any(
        c in ctx.others and ctx.others[c].role != KEPT_ROLE for c in cpus) else []
    ways += [f"stop {h} ({stop_command(h, lease.owner_pid)})" for h, lease in kept.items()]
    return " or ".join(ways)


# -- shared domains ------------------------------------------------------------------------


def _shared_pool(ctx: _Ctx, exclude: CpuSet, notes: list[str]) -> CpuSet:
    """Default placement (:func:`~pinwarden.partition.shared_pool`) minus ``exclude``;
    the housekeeping fallback is refused in ``cgroup`` mode (outside the partition)."""
    pool, fallback = shared_pool(ctx.host, ctx.leased | exclude)
    if fallback and ctx.part.mode == "cgroup":
        raise Refusal(
            f"every CPU of the {ctx.where()} is leased exclusively "
            f"({_holders_of(ctx, ctx.vm_cpus)}); {ctx.who} has nowhere to run: release a "
            "lease or widen the partition",
            code="insufficient-cpus")
    if not pool:
        raise Refusal(f"no CPU is free for {ctx.who}: every online CPU is leased; release a "
                      "lease first", code="insufficient-cpus")
    notes.extend(fallback)
    return pool


def _domain(ctx: _Ctx, spec: DomainSpec) -> Plan:
    _check_shape(spec)
    lxc_note = None
    if driver_of_type(spec.domain_type) == "lxc" and (
            spec.vcpupins or spec.emulatorpin is not None or spec.iothreadpins):
        spec, lxc_note = _lxc_pins(ctx, spec)
    spec, nodes_note = _check_nodes(ctx, spec)
    for label, cpus in _affinity(spec):
        _check_exists(ctx, label, cpus)
        if ctx.part.mode == "cgroup":
            outside = cpus - ctx.part.vm_cpus
            if outside:
                raise Refusal(
                    f"{label} of {ctx.who} uses {outside.named()} outside the {ctx.where()}: "
                    f"pin it inside {ctx.part.vm_cpus} or widen the partition",
                    code="outside-partition")
    plan = _exclusive(ctx, spec) if spec.exclusive else _shared(ctx, spec)
    for note in (nodes_note, lxc_note, _other_hypervisor(ctx, spec)):
        if note is not None:
            plan = replace(plan, notes=(note, *plan.notes))
    if spec.placement == "auto":  # (every thread pinned too: libvirt asks numad still)
        topo = ctx.host.topology
        nodes = CpuSet.of(topo.node_of(c) for c in plan.cpus() if c in topo.cpus)
        if spec.numa_nodeset is not None:  # the user's <numatune> nodeset: kept as it is
            nodes = EMPTY
            memory = (f" (its memory stays on NUMA {spec.numa_nodeset.named('node')}, as "
                      f"its <numatune> says)")
        else:
            memory = f" and its memory on NUMA {nodes.named('node')}, where those CPUs are" \
                if nodes else ""
        plan = replace(plan, memory_nodes=nodes or None, notes=(*plan.notes, (
            f"{ctx.who} asks for <vcpu placement='auto'> (numad); pinwarden places it "
            f"statically on {plan.default_cpus or plan.cpus()}{memory} instead, so that no "
            "leased CPU is used")))
    return plan


#: ``<domain type>`` values of the drivers pinwarden places (QEMU's, and LXC).
PLACED_TYPES = frozenset({"kvm", "qemu", "lxc"})


def _other_hypervisor(ctx: _Ctx, spec: DomainSpec) -> str | None:
    """A domain of another hypervisor (xen, vmware, bhyve, …) is planned as a QEMU one,
    saying so: nothing of pinwarden's — its hook, its start — runs for that driver."""
    if spec.domain_type is None or spec.domain_type in PLACED_TYPES:
        return None
    return (f"{ctx.who} is a {spec.domain_type!r} domain: pinwarden places QEMU/KVM and LXC "
            "domains, so this is what a QEMU domain of that XML would get; nothing of "
            "pinwarden's runs when libvirt's other drivers start it")


def _lxc_pins(ctx: _Ctx, spec: DomainSpec) -> tuple[DomainSpec, str]:
    """libvirt's LXC driver ignores ``<vcpupin>``, ``<emulatorpin>`` and ``<iothreadpin>``:
    a container runs on ``<vcpu cpuset>``, or on every CPU its cgroup allows
    (``virLXCControllerSetupCpuAffinity``).  An exclusive container pinned that way would
    not run where its leases say: refused.  A shared one is planned without them (as
    libvirt runs it), with a note."""
    if spec.exclusive:
        raise Refusal(f"exclusive {ctx.who} is an LXC container with <vcpupin>, "
                      "<emulatorpin> or <iothreadpin>, which libvirt's LXC driver ignores "
                      "(it runs the container on <vcpu cpuset>): remove the pins and let "
                      "pinwarden choose, or name the CPUs in <vcpu cpuset>", code="bad-pin")
    return (replace(spec, vcpupins={}, emulatorpin=None, iothreadpins={}),
            f"{ctx.who} is an LXC container: libvirt ignores its <vcpupin>, <emulatorpin> "
            "and <iothreadpin> and runs it on <vcpu cpuset> (planned so)")


def _shared(ctx: _Ctx, spec: DomainSpec) -> Plan:
    notes: list[str] = []
    for label, cpus in _affinity(spec):
        _conflict(ctx, label, cpus)
    pool: CpuSet | None = None

    def default() -> CpuSet:
        nonlocal pool
        if pool is None:
            pool = spec.cpuset if spec.cpuset is not None else _shared_pool(ctx, EMPTY, notes)
        return pool

    vcpus = {v: spec.vcpupins.get(v) or default() for v in range(spec.vcpus)}
    emulator = spec.emulatorpin or default()
    iothreads = {i: spec.iothreadpins.get(i) or default() for i in spec.iothread_id_set}
    if ctx.part.mode != "cgroup" and spec.has_affinity:
        used = union([*vcpus.values(), emulator, *iothreads.values()])
        outside = used & ctx.part.host_cpus
        if outside:
            notes.append(f"{ctx.who} is pinned onto housekeeping {outside.named()} outside the "
                         f"{ctx.where()} (affinity in the XML is honoured)")
    return Plan(domain=spec.name, uuid=spec.uuid, exclusive=False, vcpus=vcpus,
                emulator=emulator, iothreads=iothreads, leases={}, default_cpus=pool,
                notes=tuple(notes))


# -- exclusive holders ---------------------------------------------------------------------


def _no_housekeeping(ctx: _Ctx, label: str, cpus: CpuSet) -> None:
    housekeeping = cpus - ctx.part.vm_cpus
    if housekeeping:
        raise Refusal(
            f"CPU {housekeeping.first()} for {label} of exclusive {ctx.who} is a "
            f"housekeeping CPU, outside the {ctx.where()}; housekeeping CPUs are never "
            f"leased: pick from {ctx.part.vm_cpus.named(empty='CPUs (none)')}", code="host-cpu")


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

    def add_all(self, items: Sequence[tuple[str, CpuSet, str]]) -> None:
        """:meth:`add` of every ``(label, cpus, role)`` in order.  The checks are made once
        on all the CPUs; only when they fail is each item checked (and refused) in turn."""
        every = union(cpus for _label, cpus, _role in items).cpus
        ctx = self.ctx
        if every <= ctx.part.vm_cpus.cpus and every.isdisjoint(ctx.leased.cpus):
            roles = self.roles
            for _label, cpus, role in items:
                for cpu in sorted(cpus.cpus):
                    roles.setdefault(cpu, role)
            return
        for label, cpus, role in items:
            self.add(label, cpus, role)

    @property
    def cpus(self) -> CpuSet:
        return CpuSet(frozenset(self.roles))


def _allocate(ctx: _Ctx, within: CpuSet, request: allocator.Request, *,
              limit: str | None = None,
              kept: tuple[str, CpuSet] | None = None) -> allocator.Allocation:
    """``limit``: what in the XML narrowed ``within`` below the VM CPUs (named in a
    refusal for want of CPUs: that is what the user can widen).  ``kept``: the domain's
    own pins (what, CPUs) taken out of ``within`` for its other threads (named too)."""
    from pinwarden import allocator

    try:
        return allocator.allocate(ctx.host.topology, ctx.vm_cpus, within - ctx.leased, request)
    except Refusal as exc:
        taken = ctx.vm_cpus & ctx.leased
        if exc.code != "insufficient-cpus":
            raise Refusal(f"exclusive {ctx.who}: {exc.message}", code=exc.code) from None
        narrowed = (f"; {limit} limits it to {within.named(empty='CPUs (none)')}: widen it (whole "
                    "cores under thread policies other than 'prefer') or remove it"
                    if limit is not None else "")
        mine = EMPTY if kept is None else kept[1] & ctx.vm_cpus - ctx.leased
        if kept is not None and mine:
            one = len(mine) == 1
            narrowed += (f"; {mine.named()} {'is' if one else 'are'} kept for its own "
                         f"{kept[0]}, off its vCPUs: pin the vCPUs too (<vcpupin> may share "
                         f"{'it' if one else 'them'}), or pin those threads elsewhere")
        # Only a holder of a CPU the request may use (``within``, on its nodes) frees
        # room for it when released.
        reachable = taken & within
        if request.nodes is not None:
            topo, nodes = ctx.host.topology, request.nodes
            reachable = CpuSet.of(c for c in reachable
                                  if c in topo.cpus and topo.node_of(c) in nodes)
        if reachable:
            held = f"; leased now: {_holders_of(ctx, reachable)} — {_free_advice(ctx, reachable)}"
        elif taken:
            held = "; no CPU it may use is leased to another holder"
        else:
            held = "; nothing else is leased"
        host = ctx.part.host_cpus
        never = (f"housekeeping {host.named()} {'is' if len(host) == 1 else 'are'}" if host
                 else "housekeeping CPUs (none) are")
        raise Refusal(f"exclusive {ctx.who}: {exc.message}{narrowed}{held}; {never} never "
                      f"leased{_split_cores(ctx, within, request.threads)}",
                      code=exc.code) from None


def _split_cores(ctx: _Ctx, within: CpuSet, threads: ThreadPolicy) -> str:
    """What a refusal under a whole-core policy adds where free VM CPUs share a core with
    housekeeping CPUs (a host reserve or a partition that splits cores): no whole-core
    policy uses them — the advice to share cores "with other holders" was all it said,
    with no other holder there (CLI hunt)."""
    if threads == "prefer":
        return ""
    topo, host = ctx.host.topology, ctx.part.host_cpus
    split = CpuSet.of(c for c in (within & ctx.vm_cpus) - ctx.leased
                      if c in topo.cpus and topo.siblings(c) & host)
    if not split:
        return ""
    one = len(split) == 1
    sharing = union(topo.siblings(c) for c in split) & host
    return (f"; {split.named()} {'shares a core' if one else 'share cores'} with "
            f"housekeeping {sharing.named()} (the host's CPUs split "
            f"{'its core' if one else 'their cores'}): give the host whole cores, or use "
            f"thread policy 'prefer', which shares {'it' if one else 'them'} with the host")


def _allocate_or_none(ctx: _Ctx, within: CpuSet,
                      request: allocator.Request) -> allocator.Allocation | None:
    """:func:`_allocate`, or None where it is refused for want of CPUs."""
    try:
        return _allocate(ctx, within, request)
    except Refusal as exc:
        if exc.code != "insufficient-cpus":
            raise
        return None


def _allocate_on_nodes(ctx: _Ctx, spec: DomainSpec, within: CpuSet,
                       request: allocator.Request, notes: list[str], *,
                       limit: str | None = None,
                       kept: tuple[str, CpuSet] | None = None) -> allocator.Allocation:
    """:func:`_allocate` on the request's nodes (the ``<numatune>`` nodeset).  That is a
    hard limit but for ``mode='preferred'``, whose memory may come from other nodes too:
    with no room on the preferred nodes the CPUs come from any node (noted), as its
    memory would."""
    if spec.numa_mode != "preferred" or request.nodes is None:
        return _allocate(ctx, within, request, limit=limit, kept=kept)
    got = _allocate_or_none(ctx, within, request)
    if got is not None:
        return got
    got = _allocate(ctx, within, replace(request, nodes=None), limit=limit, kept=kept)
    topo = ctx.host.topology
    notes.append(f"NUMA {request.nodes.named('node')} (preferred by <numatune>) had no room for "
                 f"{ctx.who}: {CpuSet.of(got.cpus).named()} on "
                 f"{CpuSet.of(topo.node_of(c) for c in got.cpus).named('node')}")
    return got


def _sibling_holds(ctx: _Ctx, own: _Leases, threads: ThreadPolicy, *,
                   prefer: str) -> tuple[CpuSet, list[str]]:
    """The other threads of every core ``own`` uses, held empty under ``whole``, ``isolate``
    and ``require`` (none under ``prefer``): the same rule for allocated and pinned CPUs.
    A sibling that is a housekeeping CPU cannot be held (noted); one leased to another
    holder is a conflict: that core would be split between two holders.  ``prefer``: how
    this kind of holder asks for thread policy ``prefer`` (advised in that conflict)."""
    topo = ctx.host.topology
    cpus = own.cpus
    if threads == "prefer":
        # (sharing a core with the host, not with another holder, is worth saying: a host
        # reserve that splits a core made 'prefer' take it first, silently: CLI hunt)
        host = union(topo.siblings(c) for c in cpus if c in topo.cpus) & ctx.part.host_cpus
        if not host:
            return EMPTY, []
        one = len(host) == 1
        return EMPTY, [f"housekeeping {host.named()} {'shares a core' if one else 'share cores'}"
                       f" with the CPUs of {ctx.who}: thread policy 'prefer' shares cores "
                       f"with the host too"]
    if threads == "require" and not topo.smt:
        raise Refusal(f"thread policy 'require' needs SMT, but no core of this host has two "
                      f"online threads; use thread policy 'whole' or 'isolate' for "
                      f"{ctx.who}", code="no-smt")
    if threads == "isolate":
        members = cpus.cpus
        for cpu in cpus:
            info = topo.cpus.get(cpu)
            pair = (info.siblings.cpus & members) - {cpu} if info is not None else None
            if pair:
                raise Refusal(f"thread policy 'isolate' gives {ctx.who} one thread per core, "
                              f"but CPUs {cpu} and {min(pair)} are siblings of one core: "
                              f"pin them to different cores, or use thread policy 'whole'",
                              code="bad-pin")
    siblings = union(topo.siblings(c) for c in cpus if c in topo.cpus)
    holds = (siblings & topo.online) - cpus
    notes: list[str] = []
    housekeeping = holds - ctx.part.vm_cpus
    if housekeeping and threads != "whole":
        raise Refusal(
            f"CPU {housekeeping.first()} is a sibling thread of the CPUs of {ctx.who}, which "
            f"thread policy {threads!r} must hold empty, but it is a housekeeping CPU, "
            f"outside the {ctx.where()}; housekeeping CPUs are never leased: use cores whose "
            f"every thread is a VM CPU", code="host-cpu")
    if housekeeping:
        one = len(housekeeping) == 1
        notes.append(f"housekeeping {housekeeping.named()} "
                     f"{'shares a core' if one else 'share cores'} with the CPUs of "
                     f"{ctx.who}; {'it stays' if one else 'they stay'} the host's "
                     "(housekeeping CPUs are never leased)")
        holds = holds - housekeeping
    _conflict(ctx, f"the sibling threads held empty (thread policy {threads!r})", holds,
              advice=f" on whole free cores, opt in to sharing cores with {prefer},")
    return holds, notes


def _exclusive(ctx: _Ctx, spec: DomainSpec) -> Plan:
    # Imported here: shared domains (most of the libvirt hook's admissions) never need it.
    from pinwarden import allocator

    topo = ctx.host.topology
    notes: list[str] = []
    if spec.emulator == "shared":
        # A domain's threads live in its cgroup, the partition of its leased CPUs: the
        # kernel refuses its emulator's group any other CPU (cgroup v1: libvirt's start
        # failed, "Permission denied"; through the hook the emulator ran on the lease,
        # not where the plan said).  Planned as what the kernel does: floating.
        notes.append(f"emulator='shared' of exclusive {ctx.who} cannot be honoured: its "
                     "emulator and I/O threads live in its cgroup, the partition of its "
                     "leased CPUs, and run there (as emulator='float')")
        spec = replace(spec, emulator="float")
    own = _Leases(ctx)
    isolate_emulator = spec.emulatorpin is None and spec.emulator == "isolate"
    emulator: CpuSet | None = spec.emulatorpin

    if spec.vcpupins:
        missing = [v for v in range(spec.vcpus) if v not in spec.vcpupins]
        if missing:
            raise Refusal(f"exclusive {ctx.who} pins some vCPUs but not vCPU {missing[0]}: pin "
                          "every vCPU, or none and let pinwarden choose", code="bad-pin")
        vcpus = dict(sorted(spec.vcpupins.items()))
        own.add_all([(f"<vcpupin vcpu='{vcpu}'>", cpus, f"vcpu{vcpu}")
                     for vcpu, cpus in vcpus.items()])
        fallback = _pinned_fallback(ctx, spec, vcpus)
    else:
        fallback = None
        within = ctx.vm_cpus if spec.cpuset is None else spec.cpuset & ctx.vm_cpus
        if spec.cpuset is not None:
            _no_housekeeping(ctx, f"<vcpu cpuset='{spec.cpuset}'>", spec.cpuset)
        count = spec.vcpus + (1 if isolate_emulator else 0)
        pinned = union([spec.emulatorpin or EMPTY, *spec.iothreadpins.values()])
        pins = " and ".join(
            (["<emulatorpin>"] if spec.emulatorpin is not None else [])
            + (["<iothreadpin>"] if spec.iothreadpins else []))
        by_cell = _place_cells(ctx, spec, within - pinned, isolate_emulator, notes)
        if by_cell is not None:
            vcpus, placed_emulator = by_cell
            emulator = placed_emulator or emulator
        else:
            got = _allocate_on_nodes(
                ctx, spec, within - pinned,
                allocator.Request(count=count, threads=spec.threads, nodes=spec.numa_nodeset,
                                  purpose="vcpus+emulator" if isolate_emulator else "vcpus"),
                notes,
                limit=None if spec.cpuset is None else f"<vcpu cpuset='{spec.cpuset}'>",
                kept=(pins, pinned & within) if pinned else None)
            chosen = list(got.cpus)  # CPU numbers the allocator took from ``within``
            if isolate_emulator:
                emulator = CpuSet(frozenset((chosen.pop(),)))
            vcpus = {v: CpuSet(frozenset((cpu,))) for v, cpu in enumerate(chosen)}
            spread = CpuSet.of(topo.node_of(c) for c in chosen if c in topo.cpus)
            if len(spread) > 1:  # one node when one has room: none had
                notes.append(f"the vCPUs of {ctx.who} span NUMA {spread.named('node')}: no one "
                             f"node had room for its {spec.vcpus} vCPUs (thread policy "
                             f"{spec.threads!r}); guest NUMA cells (<cpu><numa><cell>) let "
                             "the guest see the split")
        own.add_all([(f"vCPU {vcpu}", cpus, f"vcpu{vcpu}") for vcpu, cpus in vcpus.items()])

    if emulator is None:
        if isolate_emulator:  # explicit vCPU pins: one more CPU, near the vCPUs
            near = CpuSet.of(topo.node_of(c) for c in own.cpus if c in topo.cpus)
            free = ctx.vm_cpus - own.cpus - _held_now(ctx, own, spec.threads)
            request = allocator.Request(
                count=1, threads="whole" if spec.threads == "require" else spec.threads,
                nodes=spec.numa_nodeset or near or None, purpose="emulator")
            if spec.numa_nodeset is None and near:  # near the vCPUs if it can, else anywhere
                near_got = _allocate_or_none(ctx, free, request)
                got = near_got or _allocate(ctx, free, replace(request, nodes=None))
                if near_got is None:
                    notes.append(f"no CPU of NUMA {near.named('node')} (where the vCPUs of "
                                 f"{ctx.who} run) was free for its isolated emulator: it runs "
                                 f"on {CpuSet.of(topo.node_of(c) for c in got.cpus).named('node')}")
            else:
                got = _allocate_on_nodes(ctx, spec, free, request, notes)
            emulator = CpuSet.of(got.cpus)
        elif fallback is not None:  # libvirt runs an unpinned emulator on <vcpu cpuset>
            emulator = fallback
        else:  # float over the domain's own vCPU CPUs
            emulator = union(vcpus.values())
    if spec.emulatorpin is not None or isolate_emulator:
        own.add("<emulatorpin>", emulator, "emulator")

    iothreads: dict[int, CpuSet] = {}
    for ident in spec.iothread_id_set:
        pin = spec.iothreadpins.get(ident)
        if pin is None:  # on <vcpu cpuset> (libvirt), else float like the emulator
            iothreads[ident] = emulator if fallback is None else fallback
        else:
            iothreads[ident] = pin
            own.add(f"<iothreadpin iothread='{ident}'>", pin, f"iothread{ident}")

    holds, more = _sibling_holds(ctx, own, spec.threads, prefer="<pw:cpu threads='prefer'>")
    notes.extend(more)
    leases = dict(own.roles)
    leases.update(dict.fromkeys(holds, SIBLING_HOLD))
    every = union([*vcpus.values(), emulator, *iothreads.values()])
    # vCPUs pinned one to one need no load balancing between them: an isolated partition
    one_to_one = all(len(c) == 1 for c in vcpus.values()) and \
        len(union(vcpus.values())) == len(vcpus)
    return Plan(domain=spec.name, uuid=spec.uuid, exclusive=True, vcpus=vcpus,
                emulator=emulator, iothreads=iothreads, leases=dict(sorted(leases.items())),
                default_cpus=every, notes=tuple(notes), isolated=one_to_one)


def _guest_cells(spec: DomainSpec, who: str,
                 notes: list[str]) -> list[tuple[int, list[int]]] | None:
    """(cell id, its vCPUs) of a domain whose guest NUMA cells are worth placing one by
    one — two cells or more, or a cell with a ``<memnode>`` — and divide its vCPUs between
    them (each vCPU in exactly one cell, each cell id once); else None (placed as one: noted
    in ``notes`` when the cells do not divide the vCPUs)."""
    cells = [(cell.id, sorted(cell.cpus)) for cell in spec.guest_cells if cell.cpus]
    if not cells or (len(cells) < 2 and not spec.memnodes):
        return None
    where: dict[int, list[int]] = {}
    for ident, members in cells:
        for v in members:
            where.setdefault(v, []).append(ident)
    ids = [ident for ident, _ in cells]
    problems = [f"cell id {i} is given twice" for i in sorted({i for i in ids
                                                                 if ids.count(i) > 1})]
    problems += [f"vCPU {v} is in cells {', '.join(map(str, c))}"
                 for v, c in sorted(where.items()) if len(c) > 1]
    problems += [f"vCPU {v} is in no cell" if v < spec.vcpus else
                 f"cell {where[v][0]} names vCPU {v} of {spec.vcpus}"
                 for v in sorted(set(range(spec.vcpus)) ^ set(where))]
    if problems:
        notes.append(f"the guest NUMA cells of {who} do not divide its {spec.vcpus} vCPUs "
                     f"between them ({'; '.join(problems[:3])}"
                     f"{'; …' if len(problems) > 3 else ''}): its vCPUs were placed together")
        return None
    return cells


def _place_cells(ctx: _Ctx, spec: DomainSpec, within: CpuSet, isolate_emulator: bool,
                 notes: list[str]) -> tuple[dict[int, CpuSet], CpuSet | None] | None:
    """The vCPUs of an exclusive domain with guest NUMA cells, placed cell by cell (what a
    guest cell means: its vCPUs share a host node when one can hold them), each on the
    host nodes of its memory (``<memnode>``) when they have room, else where the domain's
    ``<numatune>`` allows (noted); an isolated emulator goes with cell 0 (as Nova's
    reserved CPU does).  None: no such cells, or they cannot be placed one by one (the
    domain is then placed as one, noted) — never a refusal of its own."""
    from pinwarden import allocator

    cells = _guest_cells(spec, ctx.who, notes)
    if cells is None:
        return None
    topo = ctx.host.topology
    free = within
    vcpus: dict[int, CpuSet] = {}
    emulator: CpuSet | None = None
    cell_notes: list[str] = []
    for n, (ident, members) in enumerate(cells):
        extra = 1 if isolate_emulator and n == 0 else 0
        request = allocator.Request(count=len(members) + extra, threads=spec.threads)
        memnode = spec.memnodes.get(ident)
        tries: list[CpuSet | None] = []
        if memnode is not None:
            tries.append(memnode if spec.numa_nodeset is None or spec.numa_mode == "preferred"
                         else memnode & spec.numa_nodeset)
        tries.append(spec.numa_nodeset)
        if spec.numa_mode == "preferred" and spec.numa_nodeset is not None:
            tries.append(None)
        got = None
        for nodes in dict.fromkeys(tries):
            got = _allocate_or_none(ctx, free, replace(request, nodes=nodes))
            if got is not None:
                if memnode is not None and nodes != tries[0]:
                    cell_notes.append(
                        f"guest NUMA cell {ident} of {ctx.who} has its memory on "
                        f"{memnode.named('node')} (<memnode>), which had no room for its vCPUs: "
                        f"they run on {CpuSet.of(topo.node_of(c) for c in got.cpus).named('node')}")
                break
        if got is None:
            notes.append(f"the guest NUMA cells of {ctx.who} could not be placed one by one "
                         f"(cell {ident} found no room): its vCPUs were placed together")
            return None
        chosen = list(got.cpus)
        if extra:
            emulator = CpuSet(frozenset((chosen.pop(),)))
        vcpus.update((v, CpuSet(frozenset((cpu,)))) for v, cpu in zip(members, chosen,
                                                                      strict=True))
        free = free - CpuSet.of(got.cpus) - got.holds
    notes.extend(cell_notes)
    return dict(sorted(vcpus.items())), emulator


def _pinned_fallback(ctx: _Ctx, spec: DomainSpec,
                     vcpus: Mapping[int, CpuSet]) -> CpuSet | None:
    """Where libvirt runs the threads of an exclusive domain with pinned vCPUs that have no
    pin of their own (the emulator without ``<emulatorpin>``, I/O threads without
    ``<iothreadpin>``): its ``<vcpu cpuset>``, which must then lie within the domain's
    pinned CPUs (None: no cpuset, or no such thread)."""
    if spec.cpuset is None:
        return None
    unpinned_io = any(i not in spec.iothreadpins for i in spec.iothread_id_set)
    emulator_falls_back = spec.emulatorpin is None and spec.emulator == "float"
    if not (emulator_falls_back or unpinned_io):
        return None
    beyond = spec.cpuset - union(vcpus.values()) - union(spec.iothreadpins.values()) - (
        spec.emulatorpin or EMPTY)
    if beyond:
        raise Refusal(f"<vcpu cpuset='{spec.cpuset}'> of exclusive {ctx.who} reaches "
                      f"{beyond.named()} beyond its pinned CPUs, and libvirt runs its emulator and "
                      "unpinned I/O threads there: remove the cpuset, narrow it to the pinned "
                      "CPUs, or pin those threads (<emulatorpin>, <iothreadpin>)",
                      code="bad-pin")
    return spec.cpuset


def _held_now(ctx: _Ctx, own: _Leases, threads: ThreadPolicy) -> CpuSet:
    """Siblings the CPUs chosen so far will hold (kept out of further choices)."""
    if threads == "prefer":
        return EMPTY
    topo = ctx.host.topology
    return union(topo.siblings(c) for c in own.cpus if c in topo.cpus) - own.cpus


def _job(ctx: _Ctx, job: JobSpec) -> Plan:
    from pinwarden import allocator

    if ctx.mine:
        raise Refusal(f"a job named {job.name!r} already holds {ctx.mine.named()}; choose "
                      f"another --name or release it with "
                      f"`{release_command(job_holder(job.name))}`", code="job-exists")
    own = _Leases(ctx)
    if job.cpus is not None:
        label = f"--cpus {job.cpus}"
        _check_exists(ctx, label, job.cpus)
        own.add(label, job.cpus, TASK_ROLE)
    else:
        count = job.count if job.count is not None else 1
        if count < 1:
            raise InputError(f"--exclusive needs at least 1 CPU, not {count}")
        got = _allocate(ctx, ctx.vm_cpus, allocator.Request(count, job.threads,
                                                            purpose="job"))
        own.add(plural(count, "CPU"), CpuSet.of(got.cpus), TASK_ROLE)
    holds, notes = _sibling_holds(ctx, own, job.threads, prefer="--threads prefer")
    if holds:
        notes.append(f"sibling {'thread' if len(holds) == 1 else 'threads'} {holds} "
                     f"{'is' if len(holds) == 1 else 'are'} held empty")
    leases = dict(own.roles)
    leases.update(dict.fromkeys(holds, SIBLING_HOLD))
    return Plan(domain=job.name, uuid=None, exclusive=True, vcpus={}, emulator=own.cpus,
                leases=dict(sorted(leases.items())), notes=tuple(notes),
                isolated=job.isolated)
