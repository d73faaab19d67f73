"""Which running shared domains must move before CPUs are leased (pure).

On cgroup v1 the kernel refuses an exclusive cpuset that overlaps a sibling, and a parent
cannot shrink below a child; on any cgroup version a vCPU thread left on a leased CPU would
share it.  So before ``pinwarden start`` leases CPUs, every running shared domain whose
live affinity covers them is re-pinned live (what oVirt does): each thread group keeps
``affinity − leased``.  A thread group left with nothing:

* *floating* — its definition does not pin it (libvirt's default placement, or pinwarden's
  default placement rendered at start) — moves to the shared pool;
* *pinned* by its definition — the lease is refused, naming the domain and the pin.

Each narrowing is recorded (:func:`record_moves`, in the ledger's change records); once the
leases that caused it are gone, :func:`give_back` returns the CPUs to the pin.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence

from pinwarden.cpuset import EMPTY, CpuSet, CpuSetError
from pinwarden.domain import DomainSpec
from pinwarden.errors import Refusal
from pinwarden.libvirt.state import DomainInfo, Repin, group_label
from pinwarden.model import HolderRef, Lease, Plan
from pinwarden.narrowed import key_parts, narrowed_key, record_parts
from pinwarden.partition import Host, shared_pool
from pinwarden.policy import decide
from pinwarden.record import record


def floating(spec: DomainSpec | None, thread: str, ident: int | None) -> bool:
    """The definition leaves this thread group to default placement (libvirt gives such a
    thread every CPU; pinwarden places it)."""
    if spec is None:
        return False
    if spec.cpuset is not None:
        return False
    if thread == "vcpu":
        return ident not in spec.vcpupins
    if thread == "emulator":
        return spec.emulatorpin is None
    return ident not in spec.iothreadpins


def repins(domains: Sequence[DomainInfo], holder: HolderRef, leased: CpuSet,
           pool: CpuSet, holders: Sequence[HolderRef] = ()) -> tuple[Repin, ...]:
    """Live re-pins that clear ``leased`` (the CPUs about to be leased to ``holder``).

    ``pool``: the shared pool once the lease is in place (floating threads go there).
    ``holders``: exclusive holders already recorded — their domains are left alone (policy
    has already made sure their CPUs are not in ``leased``).
    Raises :class:`Refusal` when a domain's own definition pins a thread group entirely
    onto leased CPUs.
    """
    skip = {(h.driver, h.key) for h in (*holders, holder)}
    out: list[Repin] = []
    for dom in domains:
        if not dom.active or dom.affinity is None or \
                (dom.holder.driver, dom.holder.key) in skip:
            continue
        for thread, ident, cpus in dom.affinity.threads():
            clash = cpus & leased
            if not clash:
                continue
            after = cpus - leased
            label = thread if ident is None else f"{thread}{ident}"
            if not after:
                # pinned only if both definitions pin it: the running one may hold
                # pinwarden's own placement (the <vcpu cpuset> 'pinwarden start' wrote),
                # the stored one a pin for the next boot ('virsh vcpupin --config')
                if not (floating(dom.request, thread, ident)
                        or floating(dom.live, thread, ident)):
                    raise Refusal(
                        f"cannot lease {clash.named()} to {holder}: running domain "
                        f"{dom.name!r} pins {label} to {cpus.named()} only; re-pin it "
                        f"('virsh vcpupin/emulatorpin {dom.name} … --live') or stop it first",
                        code="pinned-elsewhere")
                after = pool - leased
                if not after:
                    raise Refusal(f"cannot lease {clash.named()} to {holder}: no CPU "
                                  f"would be left for {label} of running domain "
                                  f"{dom.name!r}; stop it first, or give the VMs more "
                                  f"CPUs", code="insufficient-cpus")
            out.append(Repin(dom.name, dom.uuid, thread, ident, cpus, after))
    return tuple(out)


@record
class Restored:
    """What a shared domain restored from a save image gets instead of its saved pins."""

    off: tuple[Repin, ...]  # pins on CPUs leased now, moved off them (narrowings)
    given: tuple[Repin, ...]  # pins pinwarden narrowed, given back the CPUs freed since
    cpuset: CpuSet | None  # the <vcpu cpuset> to write (None: none)
    records: Mapping[str, str]  # narrowed-pin records to write ...
    forget: tuple[str, ...]  # ... and to forget


def restored(spec: DomainSpec, name: str, uuid: str, leased: CpuSet, pool: CpuSet,
             recorded: Mapping[str, str]) -> Restored:
    """A shared domain restored from a save image (``virsh restore``, ``managedsave``):
    its saved pins are live pins, which a save image keeps — mostly pinwarden's own.

    * A pin that is the one pinwarden set last (its narrowed-pin record in ``recorded``
      says so) gets what it had before the first narrowing, less what is leased now: the
      give-back the domain missed while it did not run (saved while narrowed, restored
      after the lease ended, it kept the narrowed pins for good).
    * Any other pin touching CPUs leased now keeps what is not leased, or gets the shared
      pool (``pool``) when nothing is left, as :func:`repins` narrows a running domain —
      and its ``<vcpu cpuset>`` alike.  Refused at ``prepare``, such pins blocked the
      domain for as long as the lease lasted.  Those moves are recorded, to be given back
      when the leases end; for ``<vcpu cpuset>`` (a running domain's cannot change) each
      thread group it pins — every one without a pin of its own — is recorded as narrowed
      from the old CPUs to the new, and the give-back pins each live: unrecorded, a shared
      domain ``pinwarden start`` had written ``<vcpu cpuset>`` for stayed on the CPUs it
      was restored onto for good (the housekeeping CPU here; real-libvirt hunt)."""
    def off(cpus: CpuSet) -> CpuSet:
        return (cpus - leased) or pool

    groups: list[tuple[str, int | None, CpuSet]] = [
        ("vcpu", v, c) for v, c in sorted(spec.vcpupins.items())]
    if spec.emulatorpin is not None:
        groups.append(("emulator", None, spec.emulatorpin))
    groups.extend(("iothread", i, c) for i, c in sorted(spec.iothreadpins.items()))
    moved: list[Repin] = []
    given: list[Repin] = []
    records: dict[str, str] = {}
    forget: list[str] = []
    for thread, ident, cpus in groups:
        key = narrowed_key(uuid, group_label(thread, ident))
        parts = record_parts(recorded[key]) if key in recorded else None
        if parts is not None and parts[2] == cpus and (want := parts[1] - leased):
            if want != cpus:
                given.append(Repin(name, uuid, thread, ident, cpus, want))
            if want == parts[1]:
                forget.append(key)
            else:
                records[key] = json.dumps({"domain": name, "before": parts[1].to_list(),
                                           "after": want.to_list()})
        elif cpus & leased:
            moved.append(Repin(name, uuid, thread, ident, cpus, off(cpus)))
    cpuset = saved = spec.cpuset
    narrowed: list[Repin] = []
    if saved is not None and saved & leased:
        cpuset = off(saved)
        narrowed = [Repin(name, uuid, thread, ident, saved, cpuset)
                    for thread, ident in _unpinned(spec)]
    records.update(record_moves([*moved, *narrowed], recorded))
    return Restored(tuple(moved), tuple(given), cpuset, records, tuple(forget))


def _unpinned(spec: DomainSpec) -> list[tuple[str, int | None]]:
    """The thread groups of ``spec`` without a pin of their own (``<vcpu cpuset>`` pins
    those): vCPUs, the emulator, I/O threads."""
    out: list[tuple[str, int | None]] = [
        ("vcpu", v) for v in range(spec.vcpus) if v not in spec.vcpupins]
    if spec.emulatorpin is None:
        out.append(("emulator", None))
    out.extend(("iothread", i) for i in spec.iothread_id_set if i not in spec.iothreadpins)
    return out


# -- giving narrowed pins back ---------------------------------------------------------------

def narrowed_json(move: Repin, earlier: str | None) -> str:
    """The record of ``move``: the pin it had before pinwarden's *first* narrowing
    (``earlier``'s, when one is recorded) and the one pinwarden set last."""
    before = move.before
    if earlier is not None:
        with contextlib.suppress(ValueError, KeyError, TypeError, CpuSetError):
            before = CpuSet.parse_kernel(str(json.loads(earlier)["before"]))
    return json.dumps({"domain": move.domain, "before": before.to_list(),
                       "after": move.after.to_list()})


def record_moves(moves: Sequence[Repin], recorded: Mapping[str, str]) -> dict[str, str]:
    """The change records to write once ``moves`` are applied (``recorded``: those kept
    now).  A pin narrowed again keeps its first ``before``."""
    out: dict[str, str] = {}
    for move in moves:
        key = narrowed_key(move.uuid, move.label)
        out[key] = narrowed_json(move, out.get(key, recorded.get(key)))
    return out


def placed_narrower(spec: DomainSpec, plan: Plan, name: str, uuid: str,
                    base: CpuSet, *, every: bool = False) -> tuple[Repin, ...]:
    """A shared domain just started by ``pinwarden start``, or by plain ``virsh start``
    (the hook's ``started`` step placed its threads): the thread groups its own definition
    leaves to default placement, which pinwarden placed elsewhere than ``base`` (the shared
    pool with nothing leased) because of the leases held now — on fewer CPUs, or on the
    housekeeping CPUs when every VM CPU is leased — as narrowings from ``base``, to give
    back when those leases end.  (The kernel keeps the affinity the hook gives a thread
    across cgroup changes since Linux 6.2: nothing widens it but a give-back.)

    ``every``: those placed on ``base`` itself too — on a kernel that gives a thread its
    cgroup's CPUs whenever those change (before Linux 6.2), the hook's placement is lost
    at the first change, and the record is what puts it back (:func:`give_back`)."""
    return tuple(Repin(name, uuid, thread, ident, base, cpus)
                 for thread, ident, cpus in thread_groups(plan)
                 if cpus and (every or cpus != base) and floating(spec, thread, ident))


def thread_groups(plan: Plan) -> list[tuple[str, int | None, CpuSet]]:
    """Each thread group of ``plan`` as a pin names it — ``(thread, id, CPUs)``: the vCPUs,
    the emulator, the I/O threads."""
    out: list[tuple[str, int | None, CpuSet]] = [
        ("vcpu", v, c) for v, c in sorted(plan.vcpus.items())]
    out.append(("emulator", None, plan.emulator))
    out.extend(("iothread", i, c) for i, c in sorted(plan.iothreads.items()))
    return out


def replanned(name: str, uuid: str, old: Plan, new: Plan) -> tuple[Repin, ...]:
    """The live pins that take a running domain from ``old`` to ``new`` (each thread group
    ``new`` places elsewhere; one it leaves empty keeps its pin)."""
    was = {(thread, ident): cpus for thread, ident, cpus in thread_groups(old)}
    return tuple(Repin(name, uuid, thread, ident, was.get((thread, ident), CpuSet()), cpus)
                 for thread, ident, cpus in thread_groups(new)
                 if cpus and cpus != was.get((thread, ident)))


@record
class GiveBack:
    """What to do with the recorded narrowed pins: the re-pins that give CPUs back, the
    records to write (still narrowed, by less) and the records to forget."""

    moves: tuple[Repin, ...]
    records: Mapping[str, str]
    forget: tuple[str, ...]


def give_back(domains: Sequence[DomainInfo], recorded: Mapping[str, str],
              leased: CpuSet, *, kernel_resets: bool = False,
              saved: frozenset[str] = frozenset()) -> GiveBack:
    """Live pins pinwarden narrowed off CPUs that are no longer leased (``leased``: every
    CPU leased now) get them back: each thread group returns to what it had before the
    first narrowing, minus what is still leased.

    A record is forgotten once its pin is whole again, when its domain no longer runs and
    has no managed save image either (``saved``: the UUIDs of those that have one — saved
    while narrowed, it keeps its records, which the hook's ``restore`` gives back from:
    :func:`restored`), or when the domain's live pin (its running definition's
    ``<vcpupin>``/``<emulatorpin>``/``<iothreadpin>``) is no longer the one pinwarden set
    (``virsh vcpupin --live`` by somebody since: theirs to keep).  A thread group without
    a pin of its own is read as the kernel has it, which a later lease narrows through the
    cgroup: that is still pinwarden's placement.  Containers' records (label
    :data:`CONTAINER`) are left to :func:`give_back_container`.

    ``kernel_resets``: the kernel gives every thread of a cpuset cgroup all of the
    cgroup's CPUs whenever those change (Linux before 6.2: :func:`pinwarden.enforce.
    affinity.cgroup_resets_affinity`), so such a group reads whatever pinwarden's last
    change of the shared group made of it — still pinwarden's placement, moved back to
    what it had less what is leased whenever it differs from that (when the last lease
    ends, the shared group is every CPU again, housekeeping ones included).
    """
    by_uuid = {d.uuid: d for d in domains if d.active}
    moves: list[Repin] = []
    records: dict[str, str] = {}
    forget: list[str] = []
    for key, value in sorted(recorded.items()):
        uuid, label = key_parts(key)
        if label == CONTAINER:
            continue
        dom = by_uuid.get(uuid)
        if dom is not None and dom.settling:
            continue  # starting or stopping: its record waits until it settles
        if dom is None and uuid in saved:
            continue  # saved with the pin: kept for its restore
        parts = record_parts(value)
        if parts is None:
            forget.append(key)  # unreadable: nothing can be given back from it
            continue
        _, before, after = parts
        live, kernel = _live_pin(dom, label)
        if dom is None or live is None or \
                not _still_placed(live, after, leased, kernel, kernel_resets):
            forget.append(key)
            continue
        now = live if kernel and kernel_resets else after
        want = _wanted(before, now, leased)
        if want is None:
            if now != after:  # where the kernel moved it: the record says so (status)
                records[key] = json.dumps({"domain": dom.name, "before": before.to_list(),
                                           "after": now.to_list()})
            continue
        thread, ident = _split_label(label)
        moves.append(Repin(dom.name, uuid, thread, ident, now, want))
        if want == before:
            forget.append(key)
        else:
            records[key] = json.dumps({"domain": dom.name, "before": before.to_list(),
                                       "after": want.to_list()})
    return GiveBack(tuple(moves), records, tuple(forget))


def _split_label(label: str) -> tuple[str, int | None]:
    for thread in ("vcpu", "iothread"):
        if label.startswith(thread) and label[len(thread):].isdigit():
            return thread, int(label[len(thread):])
    return label, None


def _wanted(before: CpuSet, after: CpuSet, leased: CpuSet) -> CpuSet | None:
    """What a placement pinwarden narrowed from ``before`` to ``after`` gets now: ``before``
    less what is leased (None: nothing to change).  Also while a later lease holds CPUs of
    ``after``: it was left alone then, as the start that leased them would re-pin it — a
    plain ``virsh start`` through the hook never does, and a shared domain narrowed for
    one lease kept that pin, less the CPUs of the next, for as long as the next ran, its
    offline vCPU pinned where its cgroup had no CPU ('virsh setvcpus' failed: systemd-lab
    hunt).  ``want`` never holds a leased CPU, and a start re-pins under the pins lock."""
    want = before - leased
    return None if not want or want == after else want


def _still_placed(live: CpuSet, after: CpuSet, leased: CpuSet, kernel: bool,
                  resets: bool = False) -> bool:
    """Whether a thread group whose record says pinwarden set ``after`` still has that
    placement: ``live`` is it — or, read from the kernel (``kernel``), it less CPUs leased
    since, which the cgroup took away (a later exclusive start); or anything the kernel
    reads, where it gives a thread its cgroup's CPUs at every change (``resets``)."""
    if kernel and resets:
        return bool(live)
    return live == after or (kernel and live == after - leased and bool(live))


def _live_pin(dom: DomainInfo | None, label: str) -> tuple[CpuSet | None, bool]:
    """The thread group's pin in the running definition: what the last ``virsh vcpupin
    --live`` (pinwarden's or somebody's) set.  A group the definition does not pin at all
    (a domain started by plain ``virsh start``, whose threads the hook placed with
    ``sched_setaffinity``): its affinity, as the kernel has it (``dom.affinity``) — the
    hook's placement while nobody changed it; widened by the kernel on Linux before 6.2,
    which gave a thread its cgroup's CPUs again when those changed.  (CPUs, whether read
    from the kernel)"""
    spec = dom.live if dom is not None else None
    if dom is None or spec is None:
        return None, False
    thread, ident = _split_label(label)
    key = ident if ident is not None else -1
    if thread == "vcpu":
        own = spec.vcpupins.get(key)
    elif thread == "emulator":
        own = spec.emulatorpin
    else:
        own = spec.iothreadpins.get(key)
    if own is not None or spec.cpuset is not None:
        # (<vcpu cpuset> for the unpinned)
        return (own if own is not None else spec.cpuset), False
    affinity = dom.affinity
    if affinity is None:
        return None, True
    if thread == "vcpu":
        return affinity.vcpus.get(key), True
    if thread == "emulator":
        return affinity.emulator or None, True
    return affinity.iothreads.get(key), True


# -- containers -------------------------------------------------------------------------------

#: The label of a shared LXC container's record: the CPUs the hook gave its controller
#: (``libvirt_lxc``) and every process below it, which a container has no libvirt pin for.
CONTAINER = "container"


def container_json(name: str, base: CpuSet, placed: CpuSet, pid: int, start: int,
                   earlier: str | None) -> str:
    """The record of a shared container the hook placed on ``placed`` rather than ``base``
    (the shared pool with nothing leased) because of leases held now: its controller
    ``(pid, start)`` — a container has no libvirt pin to read, so the give-back finds it
    by its process — and ``before`` kept from ``earlier``'s record, if any."""
    before = base
    if earlier is not None:
        with contextlib.suppress(ValueError, KeyError, TypeError, CpuSetError):
            before = CpuSet.parse_kernel(str(json.loads(earlier)["before"]))
    return json.dumps({"domain": name, "before": before.to_list(), "after": placed.to_list(),
                       "pid": pid, "start": start})


def container_owner(value: str) -> tuple[int, int] | None:
    """``(pid, start)`` of the controller a container record names (None: unreadable)."""
    try:
        data = json.loads(value)
        pid, start = data["pid"], data["start"]
    except (ValueError, KeyError, TypeError):
        return None
    if type(pid) is not int or type(start) is not int or pid <= 0:
        return None
    return pid, start


def give_back_container(recorded: Mapping[str, str], live: Mapping[str, CpuSet | None],
                        leased: CpuSet, *, kernel_resets: bool = False) -> GiveBack:
    """Containers' records (label :data:`CONTAINER`) give their CPUs back as
    :func:`give_back` does for QEMU thread groups (``kernel_resets`` likewise): ``live``
    maps each record to its controller's affinity now (None: that process has exited; the
    container stopped).  Each move is ``Repin(domain, uuid, CONTAINER, None, placed,
    want)``: every thread of the container that still has ``placed`` (what the hook gave,
    or on a resetting kernel what the controller has now) gets ``want``."""
    moves: list[Repin] = []
    records: dict[str, str] = {}
    forget: list[str] = []
    for key, value in sorted(recorded.items()):
        uuid, label = key_parts(key)
        if label != CONTAINER:
            continue
        owner, parts, now = container_owner(value), record_parts(value), live.get(key)
        if owner is None or parts is None or now is None or \
                not _still_placed(now, parts[2], leased, True, kernel_resets):
            forget.append(key)
            continue
        name, before, after = parts
        placed = now if kernel_resets else after
        want = _wanted(before, placed, leased)
        if want is None:
            if placed != after:  # where the kernel moved it: the record says so (status)
                records[key] = container_json(name, before, placed, *owner, value)
            continue
        moves.append(Repin(name, uuid, CONTAINER, None, placed, want))
        if want == before:
            forget.append(key)
        else:
            records[key] = container_json(name, before, want, *owner, value)
    return GiveBack(tuple(moves), records, tuple(forget))


class ExclusivePlanner:
    """What an exclusive start decides under the manager's lock — ``pinwarden start``, its
    preview, and the hook's ``prepare`` (which takes only its refusals: the layout moves
    the running domains there): the domain's plan (:func:`decide`), and the live re-pins
    that take the running shared domains off its CPUs, kept in ``moves`` for the caller to
    apply after the lease."""

    def __init__(self, spec: DomainSpec, holder: HolderRef,
                 running: Sequence[DomainInfo]) -> None:
        self.spec = spec
        self.holder = holder
        self.running = running
        self.moves: tuple[Repin, ...] = ()

    def __call__(self, host: Host, leases: tuple[Lease, ...]) -> Plan:
        holder = self.holder
        plan = decide(self.spec, host, leases, holder=holder)
        others = [le for le in leases if (le.holder.driver, le.holder.key)
                  != (holder.driver, holder.key)]
        taken = CpuSet.of(le.cpu for le in others) | plan.leased()
        pool, fallback = shared_pool(host, taken)
        if fallback and host.partition.mode == "cgroup":
            # no housekeeping fallback there: a running shared domain left without a VM
            # CPU refuses the start (it was moved onto the host's CPU: real-libvirt hunt)
            pool = EMPTY
        self.moves = repins(self.running, holder, plan.cpus(), pool,
                            holders=[le.holder for le in others])
        return plan
