"""What the daemon should do, given the running domains and the recorded holders (pure).

* a holder of driver ``qemu``/``lxc`` whose domain no longer runs → :class:`Free`;
* a running exclusive domain nobody recorded (started while pinwarden was away, or with
  the hook missing) → :class:`Adopt` (the adapter leases its CPUs via policy, which may
  refuse — then it reports the conflict);
* a running domain whose live affinity left its plan (``virsh vcpupin --live`` by someone)
  or, for shared domains, reaches onto CPUs leased to others → :class:`Drift` (the adapter
  re-pins it when asked to restore, else reports it);
* a running shared domain whose XML gives a thread no CPUs (no ``<vcpu cpuset>``, no pin
  of its own), running off the VM CPUs — a vCPU hot-plugged or an I/O thread added live
  into a domain the hook placed gets libvirt's default, every CPU → :class:`Place` (the
  adapter gives it the VM CPUs less the leased ones, as the hook did at its start).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.ledger import HolderRecord
from pinwarden.libvirt.repin import floating
from pinwarden.libvirt.state import DomainInfo, Repin
from pinwarden.model import HolderRef, Plan
from pinwarden.record import record


@record
class Free:
    holder: HolderRef
    reason: str


@record
class Adopt:
    domain: DomainInfo


@record
class Report:
    """Something wrong that the daemon cannot fix by itself."""

    message: str


@record
class Drift:
    repin: Repin  # before = live affinity, after = what it should be
    reason: str
    #: A shared domain's pin taken off leased CPUs (given back when they are free), not an
    #: exclusive domain's put back to its plan.
    narrows: bool = False
    #: An exclusive domain's thread its running definition does not pin (the hook placed
    #: it by affinity at the start; libvirt gives a vCPU hot-plugged later a default of its
    #: own): pinwarden's placement, put back by every daemon pass — not only with
    #: ``--restore-drift``, which is for pins somebody set.
    unpinned: bool = False


@record
class Place:
    """Threads of a shared domain that its XML leaves without CPUs, running off the VM
    CPUs: they get its default placement (the VM CPUs less the leased ones)."""

    domain: DomainInfo
    threads: tuple[str, ...]  # labels: vcpu1, iothread2, emulator
    reason: str


Action = Free | Adopt | Drift | Report | Place

VIRT_DRIVERS = ("qemu", "lxc")
#: Seconds a holder without an owner process may wait for its domain to start.
START_GRACE = 120.0


def _planned(plan: Plan, thread: str, ident: int | None) -> CpuSet | None:
    if thread == "vcpu":
        return plan.vcpus.get(ident if ident is not None else -1)
    if thread == "emulator":
        return plan.emulator or None
    return plan.iothreads.get(ident if ident is not None else -1)


def reconcile(domains: Sequence[DomainInfo], holders: Sequence[HolderRecord],
              partition_of: Callable[[HolderRef], str], *, now: float,
              grace: float = START_GRACE, drivers: Sequence[str] = VIRT_DRIVERS,
              vm_cpus: CpuSet | None = None) -> list[Action]:
    """Actions bringing the ledger and the running domains back in line (see module doc).

    ``domains``: every running domain of the connection's driver(s); ``holders``: every
    recorded holder; ``partition_of``: the libvirt partition an exclusive holder's cgroup
    is; ``now``: the time (holders of starts in progress get ``grace`` seconds).  Holders
    of other drivers (``run`` jobs) are never touched.  A running exclusive
    domain outside its partition is reported, not adopted: leasing its CPUs would make the
    layout pull the shared pool — and the domain with it — off them.  ``vm_cpus``: the
    host's online VM CPUs, where a shared domain's threads without CPUs of their own
    belong (None: not checked); while every one is leased they may run anywhere else.
    """
    running = {(d.holder.driver, d.holder.key): d for d in domains if d.active}
    by_key = {(h.ref.driver, h.ref.key): h for h in holders}
    actions: list[Action] = []
    for gone in holders:
        ref = gone.ref
        if ref.driver not in drivers or (ref.driver, ref.key) in running:
            continue
        # A holder without an owner is an explicit reservation (``pinwarden reserve``):
        # not the daemon's to free.  One owned by a live process that is not the domain
        # (libvirtd or ``pinwarden start`` between the lease and QEMU) is a start in
        # progress: left alone for ``grace`` seconds.  (Dead owners were reaped already.)
        if gone.owner_pid is not None and now - gone.created > grace:
            actions.append(Free(ref, f"{ref} is not running"))
    leased_to: dict[int, HolderRef] = {}
    leased = CpuSet.of(c for held in holders for c in held.plan.leases)
    default = vm_cpus - leased if vm_cpus is not None else EMPTY
    for held in holders:
        if (held.ref.driver, held.ref.key) in running:
            for cpu in held.plan.leases:
                leased_to[cpu] = held.ref
    for key, dom in sorted(running.items(), key=lambda kv: kv[1].name):
        if dom.settling:  # starting or stopping: its own start/stop (and hook) decide
            continue
        record = by_key.get(key)
        if record is None and dom.exclusive:
            where = (dom.live.partition if dom.live else None) or "/machine"
            if where == partition_of(dom.holder):
                actions.append(Adopt(dom))
            else:
                actions.append(Report(
                    f"exclusive domain {dom.name} runs in partition {where}, not in "
                    f"{partition_of(dom.holder)}: its CPUs are not protected; restart it "
                    f"with 'pinwarden start {dom.name}' (or install the hook)"))
            continue
        if dom.affinity is None:
            continue
        off: list[str] = []
        for thread, ident, cpus in dom.affinity.threads():
            label = thread if ident is None else f"{thread}{ident}"
            hot_plug = "(offline) would be hot-plugged onto" \
                if thread == "vcpu" and ident in dom.affinity.offline else ""
            if record is not None:
                want = _planned(record.plan, thread, ident)
                if want is not None and cpus != want:
                    runs = hot_plug or "runs on"
                    # (a vCPU hot-plugged into a domain 'virsh start' started shared the
                    # CPU of vcpu0, its own leased CPU idle, and the daemon only said so:
                    # systemd-lab hunt)
                    actions.append(Drift(Repin(dom.name, dom.uuid, thread, ident, cpus, want),
                                         f"{dom.name} {label} {runs} {cpus.named()}, its plan "
                                         f"says {want}",
                                         unpinned=floating(dom.live, thread, ident)))
                continue
            if (default and dom.live is not None and ident not in dom.affinity.offline
                    and floating(dom.live, thread, ident) and cpus - default - leased):
                off.append(label)  # its placement takes it off leased CPUs too
                continue
            foreign = CpuSet.of(c for c in cpus if c in leased_to)
            if foreign:
                owner = leased_to[foreign.first()]
                runs = hot_plug or "may run on"
                actions.append(Drift(
                    Repin(dom.name, dom.uuid, thread, ident, cpus, cpus - foreign),
                    f"shared domain {dom.name} {label} {runs} {foreign.named()} leased to "
                    f"{owner}", narrows=True))
        if off:
            actions.append(Place(dom, tuple(off), f"shared domain {dom.name} {', '.join(off)} "
                                 f"may run off the VM CPUs {vm_cpus}, though its XML names "
                                 "no CPUs for them"))
    return actions
