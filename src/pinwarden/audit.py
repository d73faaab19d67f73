"""Audit: who else could run on an exclusively leased CPU?

Two halves, kept apart:

* :func:`audit` — pure.  A :class:`HostSnapshot` (every thread, every cpuset cgroup, every
  IRQ, as frozen values) plus the ledger's leases and holders → a :class:`Report` listing
  each *intruder*: something that can run on a CPU leased exclusively to a holder it does
  not belong to.
* :func:`scan` — the adapter.  Reads ``/proc/*/task/*`` (``stat``, ``status``, ``cgroup``:
  each file once), the cpuset hierarchy and ``/proc/irq/*`` below ``root``.

Kinds of intruders:

``other-vm-thread`` (error)
    a thread of another VM — in a QEMU/libvirt VM cgroup or belonging to another holder — that
    may run on the CPU;
``vm-cgroup`` (error)
    a VM cgroup (the VM partition ``machine`` and everything in it, ``*.libvirt-qemu``,
    ``*.libvirt-lxc``, ``machine-qemu…scope``, a child of ``pinwarden.partition`` or a
    holder's cgroup) whose CPUs include a CPU leased to someone else, if it has tasks (every
    thread they start may land there) or is a partition new VMs are created in (libvirt
    copies its CPUs into them); empty intermediate groups are not reported;
``escaped-task`` (error)
    any other user-space thread allowed on the CPU from a cgroup pinwarden can narrow —
    on cgroup v2 every cgroup, the root included (a cgroup that writes leased CPUs into its
    ``cpuset.cpus`` takes them and invalidates the holder's partition, Linux 6.1–6.12+);
    on cgroup v1 every cgroup but the root cpuset (``cpu_exclusive`` keeps its siblings
    off);
``host-task`` (warning)
    a thread in the cgroup v1 root cpuset (the kernel gives pinwarden no way to keep it off
    without moving it: boot with ``isolcpus=``), or an unbound kernel thread;
``irq`` (error, or warning)
    an interrupt (with a handler) whose affinity includes the CPU: an error when pinwarden
    isolates host noise and the kernel lets the IRQ move (pinwarden should have moved it),
    a warning for IRQs the kernel refused to move (managed, per-CPU: fixed only at boot);
``workqueue`` (error, or warning)
    the unbound-workqueue mask or the default affinity of new IRQs includes the CPU;
``off-lease`` (error)
    a running holder's group whose ``cpuset.cpus`` lacks CPUs leased to it (changed by
    hand): its threads run elsewhere, maybe on the host's CPUs, and the leased ones idle.
    ``pinwarden sync`` puts the group back on its lease.
``strayed-thread`` (error)
    a thread of a holder's own process outside the holder's group (moved out by hand, or
    by a rules daemon such as cgred) and allowed on CPUs not leased to it: the holder's
    leased CPUs idle while it shares the others.  "Its own process" means one with a
    thread still in the group, or — for a domain — its QEMU (``qemu-*``, ``kvm``) as the
    recorded owner, which lives there whole; a libvirt daemon or pinwarden itself owning a
    lease while it starts the domain or job is never one, nor is another process below
    them.  (A job's command moved out whole cannot be told from the ``pinwarden run`` that
    starts it, and is not reported.)  Its ``cpus`` are the holder's lease;
``missing-group`` (error)
    a holder's group, as the ledger records it, that is gone from the cpuset hierarchy
    (removed by hand): nothing keeps other cgroups off the holder's CPUs.  ``pinwarden
    sync`` makes it again;
``stale-holder-group`` (warning)
    a holder's group (by its name) that no holder has: a release interrupted between the
    ledger's commit and the layout's shrink left it, keeping its CPUs out of the shared
    group (and, on cgroup v1, exclusive) until the next change; ``pinwarden sync``
    removes it.  Its ``cpus`` are the group's that no lease names (one on a leased CPU
    is a ``vm-cgroup`` error);
``vm-cgroup-pin`` (warning)
    on cgroup v2, a shared VM's cgroup whose own ``cpuset.cpus`` names only CPUs leased
    to others while the kernel keeps it off them (its effective CPUs do not): a ``virsh
    vcpupin``/``emulatorpin --live`` onto the leased CPU that libvirt failed after writing
    the cgroup.  Once the lease ends that thread runs on the named CPU alone, whatever
    libvirt says its pin is;
``isolcpus-host-task`` (warning)
    a user-space thread of the host's own (outside every VM cgroup and holder) allowed on
    ``isolcpus=`` CPUs no one leases *and* on CPUs that are not isolated: the kernel keeps
    the host off the isolated CPUs only through the affinity it gave PID 1 at boot, and a
    cpuset change (Linux 6.1: the cpuset controller enabled or disabled, a partition made
    by somebody else) gives every task of the cgroup all its CPUs again.  A thread on
    isolated CPUs alone was put there on purpose and is left out; one on a leased CPU is
    an ``escaped-task`` or ``host-task`` already.  Reported with or without leases: the
    shared VMs run there;
``invalid-partition`` (error)
    on cgroup v2, a holder's group that the kernel marks an *invalid* partition
    (``cpuset.cpus.partition`` reads ``isolated invalid (…)``): it no longer keeps the
    holder's CPUs to itself, and its parent may run anything there again.  A sibling that
    wrote leased CPUs into its ``cpuset.cpus`` makes it so, and the kernel does not make
    it valid again when the sibling lets go (``pinwarden sync`` does).
``not-exclusive`` (error)
    on cgroup v1, a holder's group whose ``cpuset.cpu_exclusive`` reads 0: the kernel no
    longer keeps its siblings off the holder's CPUs, so the next write of a sibling's
    ``cpuset.cpus`` (the VM partition's, a new cgroup's) may take them — nothing may run
    there yet, but nothing enforces the lease (and the group may have been widened onto
    shared CPUs).  ``pinwarden sync`` turns it on again.  A group kept by a forced release
    is not pinwarden's to check.

What cannot move at run time (refused IRQs, the tick, RCU callbacks, per-CPU kernel threads)
is listed apart with the boot parameter that would fix it
(:func:`pinwarden.isolation.unmovable`).

Per-CPU kernel threads (bound to a single CPU: ``ksoftirqd/N``, ``migration/N``,
``kworker/N:M`` …) are part of every CPU and never intruders.  A CPU held empty under the
``isolate`` thread policy (role ``sibling-hold``) may run no holder's threads at all, not even
its own holder's.

A thread belongs to a holder when its cpuset cgroup lies inside the holder's recorded cgroup,
when it is (a thread of) the holder's owner process or one of its descendants, or — for
holders whose cgroup is not recorded yet — when its libvirt machine cgroup carries the
holder's domain name (``qemu-3-NAME.libvirt-qemu``, ``machine-qemu\\x2d3\\x2dNAME.scope``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

from pinwarden.cpuset import EMPTY, CpuSet, CpuSetError
from pinwarden.enforce.layout import holder_component, holder_group_name, is_holder_component
from pinwarden.errors import HostError
from pinwarden.holdergroup import NOT_EXCLUSIVE, not_kept, off_lease
from pinwarden.isolation import Finding, IrqInfo, NoiseSnapshot
from pinwarden.ledger import HolderRecord
from pinwarden.model import JOB_DRIVER, KEPT_ROLE, SIBLING_HOLD, HolderRef, Lease
from pinwarden.mounts import read_mounts
from pinwarden.procs import LIBVIRT_DAEMONS, parse_stat
from pinwarden.record import field, record, replace

Kind = Literal["other-vm-thread", "vm-cgroup", "escaped-task", "host-task", "irq",
               "workqueue", "invalid-partition", "not-exclusive", "off-lease",
               "missing-group", "stale-holder-group", "vm-cgroup-pin", "isolcpus-host-task",
               "strayed-thread"]
Severity = Literal["error", "warning"]
SEVERITY: Mapping[Kind, Severity] = {
    "other-vm-thread": "error", "vm-cgroup": "error", "escaped-task": "error",
    "host-task": "warning", "irq": "warning", "workqueue": "warning",
    "invalid-partition": "error", "not-exclusive": "error", "off-lease": "error",
    "missing-group": "error", "strayed-thread": "error", "stale-holder-group": "warning",
    "vm-cgroup-pin": "warning", "isolcpus-host-task": "warning",
}
#: Order of kinds in reports: errors first.
KIND_ORDER: tuple[Kind, ...] = ("invalid-partition", "not-exclusive", "off-lease",
                                "missing-group", "strayed-thread",
                                "other-vm-thread",
                                "vm-cgroup", "escaped-task", "irq", "workqueue", "host-task",
                                "vm-cgroup-pin", "stale-holder-group", "isolcpus-host-task")

#: cgroups (relative to the cpuset root) whose descendants are VMs.
DEFAULT_VM_PARTITIONS = ("machine", "machine.slice")
#: The holder groups' stem (``[partition] exclusive``): ``pinwarden-vm-NAME.partition``,
#: ``pinwarden\x2dvm\x2dNAME.slice`` … each one holder's partition.
DEFAULT_HOLDER_STEMS = ("pinwarden.partition",)


# -- snapshot values ---------------------------------------------------------------------

@record
class ThreadInfo:
    pid: int  # thread group (process) id
    tid: int
    comm: str
    ppid: int  # parent of the thread group
    cpus: CpuSet  # Cpus_allowed_list: where it may run now (affinity ∩ cpuset)
    cgroup: str | None  # cpuset cgroup path as the kernel prints it ("/machine/…")
    kernel: bool  # PF_KTHREAD


@record
class CgroupInfo:
    path: str  # relative to the cpuset mount, with a leading "/" ("/" is the root)
    cpus: CpuSet  # cpuset.cpus
    effective: CpuSet | None  # cpuset.effective_cpus (v1) / cpuset.cpus.effective (v2)
    populated: bool  # has tasks of its own
    #: v2: ``cpuset.cpus.partition`` as the kernel reads it (``member``, ``isolated``,
    #: ``isolated invalid (…)``); None where there is none (v1, the root)
    partition: str | None = None
    #: v1: ``cpuset.cpu_exclusive`` reads 1; None where there is no such file (v2)
    exclusive: bool | None = None


@record
class HostSnapshot:
    threads: tuple[ThreadInfo, ...] = ()
    cgroups: tuple[CgroupInfo, ...] = ()
    irqs: tuple[IrqInfo, ...] = ()
    notes: tuple[str, ...] = ()  # what could not be read
    cgroup_version: int | None = None  # of the cpuset hierarchy (None: no cpuset mounted)
    #: why only part of the cpuset hierarchy is in view (a cgroup namespace), or None
    partial: str | None = None
    #: why only part of the host's threads are in view (a PID namespace of its own), or None
    threads_unseen: str | None = None
    #: the rest of the host's noise (workqueue mask, default IRQ affinity, kernel threads,
    #: nohz_full, rcu_nocbs, isolcpus), for what pinwarden moves or cannot move
    noise: NoiseSnapshot | None = None

    @property
    def groups_unseen(self) -> str | None:
        """Why the groups the ledger names cannot be looked at here (none readable, or a
        cgroup namespace's part view), or None."""
        if self.partial is not None:
            return self.partial
        return None if self.cgroups else "no cpuset cgroup could be read here"


# -- report values -----------------------------------------------------------------------

@record
class Intruder:
    kind: Kind
    cpus: CpuSet  # leased CPUs (of other holders) it can run on (isolcpus-host-task:
    #               the isolcpus= CPUs no one leases)
    holders: tuple[HolderRef, ...]  # who those CPUs are leased to
    name: str  # comm, cgroup name or IRQ handler names
    pid: int | None = None
    tid: int | None = None
    cgroup: str | None = None
    irq: int | None = None
    owner: HolderRef | None = None  # the holder the intruder itself belongs to, if any
    kernel: bool = False  # an (unbound) kernel thread
    #: pinwarden moves this noise source off leased CPUs: finding it there is an error
    moved_by_pinwarden: bool = False

    @property
    def severity(self) -> Severity:
        return "error" if self.moved_by_pinwarden else SEVERITY[self.kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "cpus": str(self.cpus),
            "holders": [_ref_json(h) for h in self.holders],
            "name": self.name,
            "pid": self.pid,
            "tid": self.tid,
            "cgroup": self.cgroup,
            "irq": self.irq,
            "owner": None if self.owner is None else _ref_json(self.owner),
            "kernel_thread": self.kernel,
        }


def _ref_json(ref: HolderRef) -> dict[str, str]:
    return {"driver": ref.driver, "key": ref.key, "name": ref.name}


@record
class Report:
    leases: Mapping[int, HolderRef]  # cpu -> holder
    intruders: tuple[Intruder, ...]
    threads: int  # threads checked
    cgroups: int
    irqs: int
    per_cpu_kthreads: int  # per-CPU kernel threads on leased CPUs (never intruders)
    notes: tuple[str, ...] = ()
    roles: Mapping[int, str] = field(default_factory=dict)  # cpu -> lease role
    #: noise on leased CPUs nothing can move at run time, each with the boot parameter
    #: that would (never a failure: the admin's choice of kernel command line)
    unmovable: tuple[Finding, ...] = ()
    #: what the audit could not check, each with why (exit 2 unless there are errors)
    unchecked: tuple[str, ...] = ()

    @property
    def errors(self) -> tuple[Intruder, ...]:
        return tuple(i for i in self.intruders if i.severity == "error")

    @property
    def warnings(self) -> tuple[Intruder, ...]:
        return tuple(i for i in self.intruders if i.severity == "warning")

    @property
    def leased(self) -> CpuSet:
        return CpuSet(frozenset(self.leases))

    def exit_status(self, *, strict: bool = False) -> int:
        """1 when something intrudes, else 2 when part of the host could not be checked,
        else 0."""
        return 1 if self.errors or (strict and self.warnings) else 2 if self.unchecked else 0

    def verdict(self) -> str:
        found = self._found()
        if self.unchecked and not self.errors:  # "clean" would claim what was not seen
            return f"INCOMPLETE ({len(self.unchecked)} not checked, below); {found}"
        return found

    def _found(self) -> str:
        holders = {h for h in self.leases.values()}
        checked = (f"{self.threads} threads, {self.cgroups} cpuset cgroups, "
                   f"{self.irqs} IRQs checked")
        if not self.leases and not self.intruders:
            return f"clean: no CPU is leased exclusively, nothing can intrude ({checked})"
        scope = (f"{len(self.leases)} leased CPU{'s' if len(self.leases) != 1 else ''} "
                 f"({self.leased}) of {len(holders)} holder{'s' if len(holders) != 1 else ''}")
        if not self.intruders:
            return f"clean: nothing else can run on the {scope} ({checked})"
        parts = []
        for kind in KIND_ORDER:
            n = sum(1 for i in self.intruders if i.kind == kind)
            if n:
                parts.append(f"{n} {kind}{'s' if n != 1 else ''}")
        level = "INTRUDERS" if self.errors else "warnings"
        if not self.leases:
            return f"{level} (no CPU is leased exclusively): {', '.join(parts)} ({checked})"
        return f"{level} on the {scope}: {', '.join(parts)} ({checked})"

    def to_json(self) -> dict[str, Any]:
        status = "intruders" if self.errors else "incomplete" if self.unchecked \
            else "warnings" if self.warnings else "clean"
        return {
            "status": status,
            "verdict": self.verdict(),
            "leases": [{"cpu": cpu, "holder": _ref_json(h), "role": self.roles.get(cpu)}
                       for cpu, h in sorted(self.leases.items())],
            "intruders": [i.to_json() for i in self.intruders],
            "checked": {"threads": self.threads, "cgroups": self.cgroups, "irqs": self.irqs,
                        "per_cpu_kernel_threads": self.per_cpu_kthreads},
            "notes": list(self.notes),
            "unchecked": list(self.unchecked),
            "unmovable": [{"kind": f.kind, "key": f.key, "cpus": str(f.cpus),
                           "what": f.what, "boot_parameter": f.boot_param}
                          for f in self.unmovable],
        }


# -- the pure core -----------------------------------------------------------------------

def _norm(path: str | None) -> str | None:
    return None if path is None else path.strip("/")


def _within(path: str, top: str) -> bool:
    return top == "" or path == top or path.startswith(top + "/")


_MACHINE_DIR = re.compile(r"^(?P<drv>qemu|lxc)-(?P<id>[0-9]+)-(?P<name>.+)\.libvirt-(?:qemu|lxc)$")
_MACHINE_SCOPE = re.compile(
    r"^machine-(?P<drv>qemu|lxc)(?:-|\\x2d)(?P<id>[0-9]+)(?:-|\\x2d)(?P<name>.+)\.scope$")
_NOT_MACHINE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
#: The name (comm) of a QEMU process: ``qemu-system-x86`` (15 characters of
#: ``qemu-system-x86_64``), ``qemu-kvm``, ``kvm``.
_QEMU_COMM = re.compile(r"^(?:qemu-|kvm$)")


def machine_name(component: str) -> tuple[str, str] | None:
    """``(driver, name)`` of a libvirt machine cgroup directory name, else ``None``."""
    m = _MACHINE_DIR.match(component) or _MACHINE_SCOPE.match(component)
    if m is None:
        return None
    name = m.group("name").replace("\\x2d", "-")
    name = re.sub(r"\\x([0-9a-f]{2})", lambda x: chr(int(x.group(1), 16)), name)
    return m.group("drv"), name


def _name_matches(machine: str, holder_name: str) -> bool:
    """libvirt drops characters outside ``[A-Za-z0-9_.-]`` and truncates long names."""
    clean = _NOT_MACHINE_CHAR.sub("", holder_name)
    return machine == clean or (len(machine) >= 40 and clean.startswith(machine))


@record
class _Context:
    """Lookups derived from the leases and holders, shared by every check."""

    lease_of: Mapping[int, HolderRef]
    held_empty: frozenset[int]  # sibling-hold CPUs: no thread at all may run there
    holder_cgroups: Sequence[tuple[str, HolderRef]]  # (normalised path, holder)
    owner_pids: Mapping[int, HolderRef]
    vm_partitions: tuple[str, ...]
    holder_stems: tuple[str, ...]
    holders: Sequence[HolderRef]

    def by_machine_name(self, path: str) -> set[HolderRef]:
        found: set[HolderRef] = set()
        for component in path.split("/"):
            parsed = machine_name(component)
            if parsed is None:
                continue
            driver, name = parsed
            found |= {h for h in self.holders if h.driver == driver and
                      _name_matches(name, h.name)}
        return found

    def by_holder_group(self, path: str) -> set[HolderRef]:
        """Holders whose group (``pinwarden-vm-NAME.partition``, or its systemd slice) is
        ``path`` or one of its ancestors."""
        found: set[HolderRef] = set()
        for component in path.split("/"):
            for stem in self.holder_stems:
                name = holder_component(component, stem)
                if name is not None:
                    found |= {h for h in self.holders
                              if holder_group_name(h, stem.removesuffix(".partition")) == name}
        return found

    def cgroup_owners(self, path: str) -> frozenset[HolderRef]:
        owners = frozenset(h for top, h in self.holder_cgroups if _within(path, top))
        if owners:
            return owners
        # A holder without a recorded cgroup: recognise its group or libvirt machine cgroup.
        recorded = {h for _, h in self.holder_cgroups}
        return frozenset(h for h in self.by_holder_group(path) | self.by_machine_name(path)
                         if h not in recorded)

    def is_partition(self, path: str) -> bool:
        """A cgroup new VMs are created in (``<partition>``): libvirt copies its CPUs into
        each new VM's group, so its CPUs matter even while it has no tasks."""
        return path in self.vm_partitions or self.is_holder_group(path)

    def is_holder_group(self, path: str) -> bool:
        """A holder group of pinwarden's layout (recognised by name, recorded or not); a
        child of the one tree an earlier pinwarden kept
        (``pinwarden.partition/vm-NAME.partition``) too."""
        head, _, last = path.rpartition("/")
        return any(is_holder_component(last, stem) or head == stem
                   for stem in self.holder_stems)

    def is_vm_cgroup(self, path: str) -> bool:
        if any(_within(path, top) for top in self.vm_partitions):
            return True  # the VM partition itself: every new VM starts with its CPUs
        parts = path.split("/")
        if any(self.is_holder_group("/".join(parts[:i + 1])) for i in range(len(parts))):
            return True
        if any(_within(path, top) for top, _ in self.holder_cgroups):
            return True
        return any(machine_name(c) is not None or c.endswith((".libvirt-qemu", ".libvirt-lxc"))
                   for c in path.split("/"))

    def foreign(self, cpus: CpuSet,
                owners: AbstractSet[HolderRef]) -> tuple[CpuSet, tuple[HolderRef, ...]]:
        """Leased CPUs among ``cpus`` whose holder is not one of ``owners``, and CPUs held
        empty (``sibling-hold``), which not even their holder may use."""
        hit = [c for c in cpus if c in self.lease_of and
               (self.lease_of[c] not in owners or c in self.held_empty)]
        holders = tuple(sorted({self.lease_of[c] for c in hit},
                               key=lambda h: (h.driver, h.name, h.key)))
        return CpuSet(frozenset(hit)), holders


def audit(snapshot: HostSnapshot, leases: Iterable[Lease], holders: Iterable[HolderRecord], *,
          vm_partitions: Sequence[str] = DEFAULT_VM_PARTITIONS,
          holder_stems: Sequence[str] = DEFAULT_HOLDER_STEMS,
          isolating: bool = False, refused: AbstractSet[str] = frozenset()) -> Report:
    """Every intruder on a leased CPU.  Pure.

    ``isolating``: pinwarden moves host noise off leased CPUs (``[isolation] noise``), so a
    movable IRQ, the workqueue mask or the default IRQ affinity found there is an error;
    ``refused``: noise keys the kernel refused to move (their IRQs stay warnings)."""
    lease_list = list(leases)
    lease_of = {lease.cpu: lease.holder for lease in lease_list}
    records = list(holders)
    refs = list({r.ref for r in records} | set(lease_of.values()))
    ctx = _Context(
        lease_of=lease_of,
        held_empty=frozenset(x.cpu for x in lease_list if x.role == SIBLING_HOLD),
        # A holder recorded in the root cgroup ("/") would own every thread: ignore that.
        holder_cgroups=[(c, r.ref) for r in records if (c := _norm(r.cgroup))],
        owner_pids={r.owner_pid: r.ref for r in records if r.owner_pid is not None},
        vm_partitions=tuple(p.strip("/") for p in vm_partitions),
        holder_stems=tuple(p.strip("/") for p in holder_stems),
        holders=refs,
    )
    leased = CpuSet(frozenset(lease_of))
    kept = CpuSet.of(x.cpu for x in lease_list if x.role == KEPT_ROLE)
    # the root's CPUs are the online ones (an offline CPU leaves every group's cpuset.cpus
    # on cgroup v1: no hand of anyone's)
    root = next((g for g in snapshot.cgroups if g.path == "/"), None)
    online = (root.effective or root.cpus) if root is not None else leased
    intruders: list[Intruder] = []
    per_cpu = 0

    # Process tree, for "the owner or a descendant of it".
    parent = {t.pid: t.ppid for t in snapshot.threads if t.tid == t.pid}
    owned_by: dict[int, HolderRef | None] = {}

    def owner_of_process(pid: int) -> HolderRef | None:
        chain: list[int] = []
        found: HolderRef | None = None
        cur = pid
        while cur > 0 and len(chain) < 4096:
            if cur in owned_by:
                found = owned_by[cur]
                break
            chain.append(cur)
            if cur in ctx.owner_pids:
                found = ctx.owner_pids[cur]
                break
            cur = parent.get(cur, 0)
        for p in chain:
            owned_by[p] = found
        return found

    # Thousands of threads share a few cgroups and CPU lists: decide each combination once.
    by_cgroup: dict[str | None, tuple[frozenset[HolderRef], bool]] = {}
    by_cpus: dict[tuple[CpuSet, frozenset[HolderRef]], tuple[CpuSet, tuple[HolderRef, ...]]] = {}

    def cgroup_facts(path: str | None) -> tuple[frozenset[HolderRef], bool]:
        found = by_cgroup.get(path)
        if found is None:
            found = by_cgroup[path] = (
                (frozenset(), False) if path is None
                else (ctx.cgroup_owners(path), ctx.is_vm_cgroup(path)))
        return found

    def foreign(cpus: CpuSet, owners: frozenset[HolderRef]) -> tuple[CpuSet,
                                                                      tuple[HolderRef, ...]]:
        found = by_cpus.get((cpus, owners))
        if found is None:
            found = by_cpus[(cpus, owners)] = ctx.foreign(cpus, owners)
        return found

    # Where each process's leader thread is: a thread alone in a holder's cgroup, its
    # process elsewhere (another VM's vCPU thread written into the holder's tasks file),
    # is not the holder's for being there (audit counted it so, and exited 0).
    leader_cgroup = {t.pid: _norm(t.cgroup) for t in snapshot.threads if t.tid == t.pid}

    if leased:
        for t in snapshot.threads:
            if not (t.cpus & leased):
                continue
            if t.kernel and len(t.cpus) == 1:
                per_cpu += 1  # a per-CPU kernel thread: part of the CPU itself
                continue
            path = _norm(t.cgroup)
            owners, in_vm_cgroup = cgroup_facts(path)
            lead = leader_cgroup.get(t.pid, path)
            if owners and lead != path:
                owners = owners & cgroup_facts(lead)[0]
            by_pid = owner_of_process(t.pid) if not t.kernel else None
            if by_pid is not None:
                owners = owners | {by_pid}
            cpus, victims = foreign(t.cpus, owners)
            if not cpus:
                continue
            vm = bool(owners) or in_vm_cgroup
            if vm and not t.kernel:
                kind: Kind = "other-vm-thread"
            elif t.kernel or snapshot.cgroup_version is None or \
                    (snapshot.cgroup_version == 1 and _norm(t.cgroup) in ("", None)):
                kind = "host-task"  # unbound kthreads; v1 root cpuset: no way to act
            else:
                kind = "escaped-task"
            intruders.append(Intruder(
                kind=kind,
                cpus=cpus, holders=victims, name=t.comm, pid=t.pid, tid=t.tid,
                cgroup=t.cgroup, owner=min(owners, key=_ref_key) if owners else None,
                kernel=t.kernel))

        for g in snapshot.cgroups:
            path = g.path.strip("/")
            owners, in_vm_cgroup = cgroup_facts(path)
            holder_group = ctx.is_holder_group(path)
            broken = not_kept(g) if holder_group else None
            if broken is not None and broken != NOT_EXCLUSIVE:
                mine = CpuSet.of(c for c, h in lease_of.items() if h in owners)
                intruders.append(Intruder(
                    kind="invalid-partition", cpus=mine & g.cpus or mine,
                    holders=tuple(sorted(owners, key=_ref_key)),
                    name=path.rsplit("/", 1)[-1], cgroup=g.path,
                    owner=min(owners, key=_ref_key) if owners else None))
                continue
            if broken == NOT_EXCLUSIVE and \
                    (mine := CpuSet.of(c for c, h in lease_of.items()
                                       if h in owners and c not in kept)):
                intruders.append(Intruder(
                    kind="not-exclusive", cpus=mine,
                    holders=tuple(sorted(owners, key=_ref_key)),
                    name=path.rsplit("/", 1)[-1], cgroup=g.path,
                    owner=min(owners, key=_ref_key)))
            # (populated or not: a domain's threads are in libvirt's groups below its
            # holder group, and a reservation's VM gets the group's CPUs when it starts;
            # only a group with tasks of its own was looked at, and no domain ever was:
            # status hunt)
            if holder_group and owners and \
                    (off := off_lease(CpuSet.of(c for c, h in lease_of.items() if h in owners
                                                and c not in kept and c not in ctx.held_empty),
                                      g, online)):
                # its CPUs moved off the lease by hand (the job ran on a housekeeping
                # CPU, its leased one idle, and neither audit nor status said so: hunt)
                intruders.append(Intruder(
                    kind="off-lease", cpus=off,
                    holders=tuple(sorted(owners, key=_ref_key)),
                    name=path.rsplit("/", 1)[-1], cgroup=g.path,
                    owner=min(owners, key=_ref_key)))
            if not in_vm_cgroup or not (g.populated or ctx.is_partition(path)):
                continue  # an empty intermediate group (qemu-N…/ above vcpuN/) runs nothing
            cpus, victims = foreign(g.effective if g.effective is not None else g.cpus, owners)
            if cpus:
                intruders.append(Intruder(
                    kind="vm-cgroup", cpus=cpus, holders=victims,
                    name=path.rsplit("/", 1)[-1], cgroup=g.path,
                    owner=min(owners, key=_ref_key) if owners else None))
            elif g.effective is not None and g.populated and not owners and g.cpus:
                named, victims = foreign(g.cpus, owners)  # asked for, kept off for now
                if named == g.cpus:  # nowhere else: there alone once the lease ends
                    intruders.append(Intruder(
                        kind="vm-cgroup-pin", cpus=named, holders=victims,
                        name=path.rsplit("/", 1)[-1], cgroup=g.path))

        # CPUs a forced release left to a domain that runs on: no lease, so pinwarden
        # put host noise back there — found there, it is a warning, not its own failure
        isolated = leased - kept
        for irq in snapshot.irqs:
            if not irq.actions:
                continue  # no handler: never fires
            cpus, victims = foreign(irq.affinity, frozenset())
            if cpus:
                movable = isolating and bool(cpus & isolated) and irq.key not in refused \
                    and irq.writable is not False
                intruders.append(Intruder(kind="irq", cpus=cpus, holders=victims,
                                          name=",".join(irq.actions), irq=irq.irq,
                                          moved_by_pinwarden=movable))
        noise = snapshot.noise
        for name, mask in (("unbound workqueues", noise.workqueue if noise else None),
                           ("new IRQs (default affinity)",
                            noise.default_affinity if noise else None)):
            if mask is None:
                continue
            cpus, victims = foreign(mask, frozenset())
            if cpus:
                intruders.append(Intruder(kind="workqueue", cpus=cpus, holders=victims,
                                          name=name,
                                          moved_by_pinwarden=isolating and bool(cpus & isolated)))

    isolcpus = snapshot.noise.isolated if snapshot.noise is not None else EMPTY
    if isolcpus - leased:  # host threads given isolcpus= CPUs back (by a cpuset change)
        spread: dict[CpuSet, CpuSet] = {}
        for t in snapshot.threads:
            if t.kernel:
                continue
            on = spread.get(t.cpus)
            if on is None:  # isolated CPUs no one leases, beside housekeeping ones
                on = spread[t.cpus] = t.cpus & (isolcpus - leased) if t.cpus - isolcpus \
                    else EMPTY
            if not on:
                continue
            owners, in_vm_cgroup = cgroup_facts(_norm(t.cgroup))
            if owners or in_vm_cgroup or owner_of_process(t.pid) is not None:
                continue
            intruders.append(Intruder(kind="isolcpus-host-task", cpus=on, holders=(),
                                      name=t.comm, pid=t.pid, tid=t.tid, cgroup=t.cgroup))

    for g in snapshot.cgroups:  # a holder's group left behind by an interrupted release
        path = g.path.strip("/")  # (one on a leased CPU is a vm-cgroup error already)
        if (kept := g.cpus - leased) and ctx.is_holder_group(path) \
                and not cgroup_facts(path)[0]:
            intruders.append(Intruder(kind="stale-holder-group", cpus=kept, holders=(),
                                      name=path.rsplit("/", 1)[-1], cgroup=g.path))

    if snapshot.cgroups and snapshot.partial is None:  # (recorded paths are the host's)
        intruders += _strayed(snapshot, records, owner_of_process,
                              kept | CpuSet(ctx.held_empty))

    unchecked: tuple[str, ...] = ()
    grouped = [r for r in records if _norm(r.cgroup) and r.plan.leased() - kept]
    names = ", ".join(sorted(f"{r.ref.driver}:{r.ref.name}" for r in grouped))
    if leased and snapshot.threads_unseen is not None:  # (intruders would not be seen)
        unchecked += (f"the threads of the host's other processes: "
                      f"{snapshot.threads_unseen} (run 'pinwarden audit' on the host itself)",)
    if snapshot.partial is not None:  # (a recorded group may lie outside the view)
        if grouped:
            unchecked += (f"the holder groups of {names}: {snapshot.partial} (run "
                          f"'pinwarden audit' on the host itself)",)
    elif snapshot.cgroups:  # (none read: nothing is known of any group)
        present = {g.path.strip("/") for g in snapshot.cgroups}
        for r in records:
            path = _norm(r.cgroup)
            if path and path not in present and (mine := r.plan.leased() - kept):
                intruders.append(Intruder(kind="missing-group", cpus=mine, holders=(r.ref,),
                                          name=path.rsplit("/", 1)[-1], cgroup=f"/{path}",
                                          owner=r.ref))
    elif grouped:
        unchecked += (f"the holder groups of {names} and every VM cgroup: no cpuset cgroup "
                     f"could be read here (is the cpuset hierarchy mounted in this mount "
                     f"namespace? run 'pinwarden audit' on the host itself)",)

    findings: tuple[Finding, ...] = ()
    if leased and snapshot.noise is not None:
        from pinwarden.isolation import unmovable, with_refusals

        noise_all = replace(snapshot.noise, irqs=snapshot.irqs)
        balanced_off = CpuSet.of(c for g in snapshot.cgroups if g.partition == "isolated"
                                 for c in (g.effective if g.effective is not None
                                           else g.cpus))
        findings = tuple(unmovable(with_refusals(noise_all, refused), leased, balanced_off))
    rank = {kind: n for n, kind in enumerate(KIND_ORDER)}
    intruders.sort(key=lambda i: (rank[i.kind], i.pid or 0, i.tid or 0, i.cgroup or "",
                                  i.irq or 0))
    return Report(leases=dict(sorted(lease_of.items())), intruders=tuple(intruders),
                  roles={x.cpu: x.role for x in lease_list},
                  threads=len(snapshot.threads), cgroups=len(snapshot.cgroups),
                  irqs=len(snapshot.irqs), per_cpu_kthreads=per_cpu, notes=snapshot.notes,
                  unmovable=findings, unchecked=unchecked)


def _strayed(snapshot: HostSnapshot, records: Sequence[HolderRecord],
             owner_of_process: Callable[[int], HolderRef | None],
             idle: CpuSet) -> list[Intruder]:
    """``strayed-thread``: each thread of a holder's own process outside the holder's
    group, allowed beyond the CPUs leased to it (``idle``: leased CPUs no thread of the
    holder runs on — kept by a forced release, held empty)."""
    groups = {r.ref: (path, lease, r.owner_pid) for r in records
              if (path := _norm(r.cgroup)) and (lease := r.plan.leased() - idle)}
    if not groups:
        return []
    leader = {t.pid: t for t in snapshot.threads if t.tid == t.pid}
    by_process: dict[int, list[ThreadInfo]] = {}
    for t in snapshot.threads:
        if not t.kernel and t.cgroup is not None:
            by_process.setdefault(t.pid, []).append(t)
    found: list[Intruder] = []
    for pid, threads in by_process.items():
        head = leader.get(pid)
        if head is None or head.comm in LIBVIRT_DAEMONS:
            continue  # (a libvirt daemon owns a domain's lease while it starts it)
        owner = owner_of_process(pid)
        if owner is None or owner not in groups:
            continue
        group, lease, owner_pid = groups[owner]
        inside = [_within(_norm(t.cgroup) or "", group) for t in threads]
        # a QEMU counts whole only as the recorded owner: while a libvirt daemon owns the
        # lease (prepare to started) every QEMU is its descendant (daemonized, adopted by
        # PID 1 — libvirtd itself in a container), and so is a qemu-img it runs (hunt M)
        if all(inside) or not (any(inside) or (pid == owner_pid and owner.driver != JOB_DRIVER
                                               and _QEMU_COMM.match(head.comm))):
            continue  # at home, or not a process that lives there
        for t, home in zip(threads, inside, strict=True):
            if not home and t.cpus - lease:
                found.append(Intruder(kind="strayed-thread", cpus=lease, holders=(owner,),
                                      name=t.comm, pid=t.pid, tid=t.tid, cgroup=t.cgroup,
                                      owner=owner))
    return found


def _ref_key(ref: HolderRef) -> tuple[str, str, str]:
    return (ref.driver, ref.name, ref.key)


# -- the scanner (I/O) ---------------------------------------------------------------------
#
# Cost per thread matters (tens of thousands of threads): each thread costs one read of its
# ``stat``.  Its cpuset cgroup comes from the hierarchy's ``tasks`` files (one read per
# cgroup, not per thread; per-thread ``cgroup`` files only for threads born after that
# pass) and, on the live host, its CPUs from sched_getaffinity(2) instead of generating
# ``status`` (under another --root, ``status`` is read).

class _CpuCache:
    """CPU list text → CpuSet, parsed once: thousands of threads share a handful of lists."""

    def __init__(self) -> None:
        self._text: dict[bytes, CpuSet] = {}
        self._sets: dict[frozenset[int], CpuSet] = {}

    def __call__(self, text: bytes) -> CpuSet:
        found = self._text.get(text)
        if found is None:
            found = CpuSet.parse_kernel(text.decode("ascii", "replace"))
            self._text[text] = found
        return found

    def of(self, cpus: set[int]) -> CpuSet:
        key = frozenset(cpus)
        found = self._sets.get(key)
        if found is None:
            found = self._sets[key] = CpuSet(key)
        return found


def _read(path: str, size: int = 65536) -> bytes | None:
    """One ``read`` of a small /proc or cgroup file; None when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:  # ESRCH: the task exited between open and read
        return None
    finally:
        os.close(fd)


def _read_all(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)


_ALLOWED = b"\nCpus_allowed_list:"


def _cpuset_path(cgroup_text: bytes, v2_cpuset: bool) -> str | None:
    """The cpuset hierarchy's path from ``/proc/PID/task/TID/cgroup``."""
    unified: str | None = None
    for line in cgroup_text.decode("utf-8", "replace").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "cpuset" in controllers.split(","):
            return path
        if hid == "0" and controllers == "":
            unified = path
    return unified if v2_cpuset else None


def scan_threads(proc: Path, *, cgroup_of: Mapping[int, str] | None = None,
                 v2_cpuset: bool = False, live: bool = False) -> tuple[list[ThreadInfo], int]:
    """Every thread under ``proc``; returns the threads and how many vanished mid-read.

    ``cgroup_of`` maps TIDs to cpuset cgroup paths (from :func:`scan_cgroups`); threads
    missing from it have their ``cgroup`` file read.  ``live``: ``proc`` is this host's
    /proc, so CPUs come from sched_getaffinity(2) rather than ``status``.
    """
    cpus_of = _CpuCache()
    known = cgroup_of or {}
    threads: list[ThreadInfo] = []
    vanished = 0
    base = str(proc)
    try:
        pids = [e.name for e in os.scandir(base) if e.name.isdigit()]
    except OSError:
        return threads, 0
    for pid in pids:
        task_dir = f"{base}/{pid}/task"
        try:
            tids = os.listdir(task_dir)
        except OSError:
            vanished += 1
            continue
        tgid = int(pid)
        for tid in tids:
            d = f"{task_dir}/{tid}"
            stat_text = _read(f"{d}/stat", 4096)
            if stat_text is None:
                vanished += 1
                continue
            try:
                stat = parse_stat(stat_text.decode("utf-8", "replace"))
                if stat.dead:  # a zombie runs nowhere (and the kernel never narrows its
                    continue   # affinity: it read as an escaped task; v2-lab hunt)
                if live:
                    cpus = cpus_of.of(os.sched_getaffinity(stat.pid))
                else:
                    status = _read(f"{d}/status")
                    if status is None:
                        raise ProcessLookupError
                    start = status.index(_ALLOWED) + len(_ALLOWED)
                    end = status.find(b"\n", start)
                    cpus = cpus_of(status[start:end if end >= 0 else None].strip())
            except (ValueError, CpuSetError, OSError):
                vanished += 1
                continue
            cgroup = known.get(stat.pid)
            if cgroup is None:
                text = _read(f"{d}/cgroup")
                if text is None:
                    vanished += 1
                    continue
                cgroup = _cpuset_path(text, v2_cpuset)
            threads.append(ThreadInfo(pid=tgid, tid=stat.pid, comm=stat.comm, ppid=stat.ppid,
                                      cpus=cpus, cgroup=cgroup, kernel=stat.kernel_thread))
    return threads, vanished


def scan_cgroups(mount: Path, *, v2: bool = False,
                 noprefix: bool = False) -> tuple[list[CgroupInfo], dict[int, str]]:
    """Every cgroup of the cpuset hierarchy mounted at ``mount``, and which cgroup each
    thread (TID) is in, from the ``tasks`` (v2: ``cgroup.threads``) files."""
    prefix = "" if noprefix else "cpuset."
    cpus_name = f"{prefix}cpus"
    effective_name = "cpuset.cpus.effective" if v2 else f"{prefix}effective_cpus"
    partition_name = "cpuset.cpus.partition" if v2 else None
    exclusive_name = None if v2 else f"{prefix}cpu_exclusive"
    tasks_name = "cgroup.threads" if v2 else "tasks"
    out: list[CgroupInfo] = []
    members: dict[int, str] = {}
    cpus_of = _CpuCache()
    base = str(mount)
    for dirpath, _dirs, files in os.walk(base):
        if cpus_name not in files:
            continue
        cpus_text = _read(f"{dirpath}/{cpus_name}")
        if cpus_text is None:
            continue
        effective_text = _read(f"{dirpath}/{effective_name}")
        partition_text = _read(f"{dirpath}/{partition_name}") \
            if partition_name is not None and partition_name in files else None
        exclusive_text = _read(f"{dirpath}/{exclusive_name}") \
            if exclusive_name is not None and exclusive_name in files else None
        path = "/" + dirpath[len(base):].strip("/")
        tasks = _read_all(f"{dirpath}/{tasks_name}") or b""
        tids = tasks.split()
        for tid in tids:
            members[int(tid)] = path
        try:
            out.append(CgroupInfo(
                path=path, cpus=cpus_of(cpus_text.strip()),
                effective=None if effective_text is None else cpus_of(effective_text.strip()),
                populated=bool(tids),
                partition=None if partition_text is None
                else partition_text.decode(errors="replace").strip(),
                exclusive=None if exclusive_text is None else exclusive_text.strip() == b"1"))
        except CpuSetError:
            continue
    return out, members


def _has_processes(proc: Path) -> bool:
    try:
        return any(e.name.isdigit() for e in os.scandir(proc))
    except OSError:
        return False


def scan(root: Path = Path("/")) -> HostSnapshot:
    """Read the host below ``root`` into a :class:`HostSnapshot`."""
    proc = root / "proc"
    if not _has_processes(proc):
        raise HostError(f"no processes under {proc}: the audit needs /proc (a live host, or "
                        f"a --root dump that includes proc/)")
    notes: list[str] = []
    mounts = read_mounts(root)
    v1 = mounts.v1("cpuset")
    v2 = mounts.v2 if v1 is None and mounts.v2_has("cpuset") else None
    cgroups: list[CgroupInfo] = []
    members: dict[int, str] = {}
    if v1 is not None:
        cgroups, members = scan_cgroups(v1, noprefix="cpuset" in mounts.v1_noprefix)
    elif v2 is not None:
        cgroups, members = scan_cgroups(v2, v2=True)
    else:
        notes.append("no cpuset cgroup hierarchy is mounted: VM cgroups not checked")
    live = root.resolve() == Path("/")
    threads, vanished = scan_threads(proc, cgroup_of=members, v2_cpuset=v2 is not None,
                                     live=live)
    # In a cgroup namespace a cgroup above its root reads "/..": such a thread's group is
    # out of view, and so may be every holder group (audit reported them all missing and
    # the threads escaped: hunt N)
    outside = sum(1 for t in threads if t.cgroup is not None and
                  (t.cgroup == "/.." or t.cgroup.startswith("/../")))
    partial = None
    if outside:
        threads = [replace(t, cgroup=None) if t.cgroup is not None and
                   (t.cgroup == "/.." or t.cgroup.startswith("/../")) else t for t in threads]
        partial = (f"this cgroup namespace sees only part of the cpuset hierarchy "
                   f"({outside} threads are in groups above its root)")
    # A PID namespace of its own (a container's /proc) shows none of the host's threads,
    # kernel threads included: an intruder there went unseen, and the audit said clean
    # (hunt O)
    unseen = (f"this PID namespace shows only its own {len(threads)} threads (no kernel "
              f"thread is in view)") if live and threads and \
        not any(t.kernel for t in threads) else None
    if vanished:
        notes.append(f"{vanished} threads exited while being read")
    if not threads:
        notes.append(f"no threads found under {proc}")
    from pinwarden.noise import read_noise

    noise = read_noise(root)
    if not noise.irqs:
        notes.append(f"no IRQs found under {proc}/irq")
    version = 1 if v1 is not None else 2 if v2 is not None else None
    return HostSnapshot(threads=tuple(threads), cgroups=tuple(cgroups), irqs=noise.irqs,
                        notes=tuple(notes), cgroup_version=version, noise=noise,
                        partial=partial, threads_unseen=unseen)


__all__ = [
    "CgroupInfo", "HostSnapshot", "Intruder", "IrqInfo", "Report", "ThreadInfo", "audit",
    "machine_name", "scan", "scan_cgroups", "scan_threads",
]
