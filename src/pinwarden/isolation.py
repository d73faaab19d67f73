"""Host noise off leased CPUs while they are leased, and back as it was afterwards (pure).

Noise sources pinwarden can move at run time, each under a stable *key*:

==========================  ==========================================================
``irq:N``                   ``/proc/irq/N/smp_affinity_list``
``irq-default``             ``/proc/irq/default_smp_affinity`` (IRQs set up later)
``workqueue``               ``/sys/devices/virtual/workqueue/cpumask`` (unbound work)
``kthread:PID:STARTTIME``   ``sched_setaffinity`` of an unbound kernel thread
``task:TID:STARTTIME``      ``sched_setaffinity`` of a user thread outside every holder
==========================  ==========================================================

Task keys are not host noise: the manager moves a user thread only off leased CPUs the
kernel cannot guard (a holder group that may not be a partition: ``isolcpus=`` CPUs on
Linux 6.12+), whatever ``[isolation] noise`` says, and puts it back the same way.

A kernel thread is *movable* when it has ``PF_KTHREAD`` and not ``PF_NO_SETAFFINITY``
(``/proc/PID/stat`` field 9; per-CPU threads — ``ksoftirqd/N``, ``migration/N``,
``cpuhp/N``, every ``kworker`` including the unbound ``kworker/u*`` ones, which follow the
workqueue mask — are bound with ``kthread_bind_mask()``, which sets it), it is not an IRQ
thread (``irq/N-name`` follows its IRQ's affinity) and it may run on more than one CPU.

The functions here only decide.  :mod:`pinwarden.noise` reads the snapshot and performs
the writes.  The manager's side:

* on a lease: ``plan = plan_isolation(snap, leased_by_all, housekeeping, recorded)``;
  store ``plan.records`` in the ledger *before* performing ``plan.writes`` (a crash in
  between then restores values that were never changed, which is harmless); then store
  ``plan.settled(noise.refused(outcomes))`` instead: keys whose write failed (EIO:
  managed/per-CPU IRQ) lose their record and are reported with
  ``unmovable(with_refusals(snapshot, refused), leased)``;
* on a release, and at start-up after a crash: ``r = plan_restore(snap, recorded,
  still_leased, housekeeping)``; perform ``r.writes``, then drop ``r.forget`` from the
  ledger and store ``r.keep`` (records still needed because some original CPUs are still
  leased).

Values are :class:`~pinwarden.cpuset.CpuSet`; records keep the ORIGINAL value of a key,
written once, the first time pinwarden touches it, and the value pinwarden last wrote
(``applied``), so a value someone else changed in between is not clobbered on restore.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Literal

from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.model import KTHREAD_PREFIX, TASK_PREFIX
from pinwarden.record import field, record, replace

PF_KTHREAD = 0x00200000
PF_NO_SETAFFINITY = 0x04000000

IRQ_DEFAULT = "irq-default"
WORKQUEUE = "workqueue"


def irq_key(irq: int) -> str:
    return f"irq:{irq}"


def task_key(tid: int, start_time: int) -> str:
    return f"{TASK_PREFIX}{tid}:{start_time}"


def kthread_key(pid: int, start_time: int) -> str:
    return f"{KTHREAD_PREFIX}{pid}:{start_time}"


# -- snapshot ---------------------------------------------------------------------------

@record
class IrqInfo:
    """One ``/proc/irq/N``: its affinity, the effective affinity where the kernel shows it,
    the names of its handlers (the subdirectories), and whether user space may set its
    affinity (``None``: not known yet; ``False`` once a write came back ``EIO``)."""

    irq: int
    affinity: CpuSet
    effective: CpuSet | None = None
    actions: tuple[str, ...] = ()
    writable: bool | None = None

    @property
    def key(self) -> str:
        return irq_key(self.irq)


@record
class KthreadInfo:
    """A kernel thread: pid, start time (``/proc/PID/stat`` field 22), name, ``PF_*``
    flags (field 9) and its CPU affinity (``Cpus_allowed_list``)."""

    pid: int
    start_time: int
    comm: str
    flags: int
    affinity: CpuSet

    @property
    def key(self) -> str:
        return kthread_key(self.pid, self.start_time)

    @property
    def per_cpu(self) -> bool:
        """Bound by the kernel (``PF_NO_SETAFFINITY``) or to one CPU: never moved."""
        return bool(self.flags & PF_NO_SETAFFINITY) or len(self.affinity) <= 1

    @property
    def irq_thread(self) -> bool:
        return self.comm.startswith("irq/")

    @property
    def movable(self) -> bool:
        return self.settable and len(self.affinity) > 1

    @property
    def settable(self) -> bool:
        """A kernel thread the kernel lets pinwarden move (not bound, not an IRQ's)."""
        return bool(self.flags & PF_KTHREAD) and not self.flags & PF_NO_SETAFFINITY \
            and not self.irq_thread


@record
class TaskInfo:
    """A user thread: its id, start time (``/proc/TID/stat`` field 22), name, CPU affinity
    and process (``Tgid``; 0 when unknown)."""

    tid: int
    start_time: int
    comm: str
    affinity: CpuSet
    tgid: int = 0

    @property
    def key(self) -> str:
        return task_key(self.tid, self.start_time)


@record
class NoiseSnapshot:
    """Every noise source at one moment.  ``default_affinity``/``workqueue`` are ``None``
    where the file is absent.  ``nohz_full`` (``/sys/devices/system/cpu/nohz_full``),
    ``rcu_nocbs`` (CPUs with an ``rcuo[ps]/N`` offload thread), ``isolated``
    (``/sys/devices/system/cpu/isolated``) are what the boot command line set up."""

    online: CpuSet
    irqs: tuple[IrqInfo, ...] = ()
    default_affinity: CpuSet | None = None
    workqueue: CpuSet | None = None
    kthreads: tuple[KthreadInfo, ...] = ()
    nohz_full: CpuSet = field(default_factory=CpuSet)
    rcu_nocbs: CpuSet = field(default_factory=CpuSet)
    isolated: CpuSet = field(default_factory=CpuSet)
    #: user threads (only those the caller chose: see :class:`TaskInfo`)
    tasks: tuple[TaskInfo, ...] = ()
    #: whether the host's threads were in view where it was read: not in a PID namespace
    #: of its own (a container's /proc), which shows no kernel thread at all
    threads_in_view: bool = True

    def values(self, recorded: Collection[str] = ()) -> dict[str, CpuSet]:
        """Current value of every key pinwarden may move (unwritable IRQs and unmovable
        threads left out).  A kernel thread in ``recorded`` counts whatever its affinity:
        pinwarden itself may have narrowed it to one CPU (one housekeeping CPU left), which
        makes it look per-CPU, and it must still go back."""
        out: dict[str, CpuSet] = {}
        for irq in self.irqs:
            if irq.writable is not False:
                out[irq.key] = irq.affinity
        if self.default_affinity is not None:
            out[IRQ_DEFAULT] = self.default_affinity
        if self.workqueue is not None:
            out[WORKQUEUE] = self.workqueue
        for kt in self.kthreads:
            if kt.movable or (kt.key in recorded and kt.settable):
                out[kt.key] = kt.affinity
        for task in self.tasks:
            out[task.key] = task.affinity
        return out


# -- plans ------------------------------------------------------------------------------

@record
class Record:
    """What the ledger keeps per key: the value before pinwarden first touched it, and the
    value pinwarden last wrote."""

    key: str
    original: CpuSet
    applied: CpuSet

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "original": self.original.to_list(),
                "applied": self.applied.to_list()}

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Record:
        return cls(data["key"], CpuSet.parse_kernel(data["original"]),
                   CpuSet.parse_kernel(data["applied"]))


@record
class Write:
    key: str
    value: CpuSet


@record
class Plan:
    """``writes`` to perform; ``records`` to store first (new keys, and existing records
    with their new ``applied`` value — the ``original`` of an existing record is never
    replaced); ``stuck``: keys that could not be given any CPU outside the leased ones."""

    writes: tuple[Write, ...]
    records: tuple[Record, ...]
    stuck: tuple[str, ...] = ()

    def settled(self, refused: Iterable[str]) -> tuple[Record, ...]:
        """The records to keep once the writes are done: those of keys whose write the
        kernel refused (``noise.refused``: EIO …) are dropped — nothing changed there."""
        bad = frozenset(refused)
        return tuple(r for r in self.records if r.key not in bad)


@record
class Restore:
    """``writes`` to perform; ``forget``: records to drop (back to the original, gone, or
    changed by someone else); ``keep``: records still needed, with their new ``applied``;
    ``conflicts``: keys left alone because their value is neither pinwarden's nor the
    original (someone else set it meanwhile)."""

    writes: tuple[Write, ...]
    forget: tuple[str, ...]
    keep: tuple[Record, ...]
    conflicts: tuple[str, ...] = ()


def _fallback(housekeeping: CpuSet, online: CpuSet, leased: CpuSet) -> CpuSet:
    hk = (housekeeping & online) - leased
    return hk if hk else online - leased


def _key_order(key: str) -> tuple[int, int, str]:
    kind, _, rest = key.partition(":")
    rank = {"irq-default": 0, "workqueue": 1, "irq": 2, "kthread": 3, "task": 4}.get(kind, 5)
    num = rest.split(":", 1)[0]
    return (rank, int(num) if num.isdigit() else 0, key)


def plan_isolation(snapshot: NoiseSnapshot, leased: CpuSet, housekeeping: CpuSet,
                   already_recorded: Mapping[str, Record]) -> Plan:
    """Move every movable source off ``leased`` (all CPUs leased to anyone).

    New value = current − leased; when that is empty, the housekeeping CPUs (online, not
    leased), else every online CPU not leased.  A source already off the leased CPUs is
    not written.  The record of a key keeps the original from ``already_recorded`` when
    there is one, else the current value."""
    writes: list[Write] = []
    records: list[Record] = []
    stuck: list[str] = []
    fallback = _fallback(housekeeping, snapshot.online, leased)
    for key, current in sorted(snapshot.values().items(), key=lambda kv: _key_order(kv[0])):
        if current.isdisjoint(leased):
            continue
        new = current - leased
        if not new:
            new = fallback
        if not new:
            stuck.append(key)
            continue
        old = already_recorded.get(key)
        records.append(Record(key, old.original if old else current, new))
        writes.append(Write(key, new))
    return Plan(tuple(writes), tuple(records), tuple(stuck))


@record
class HostTask:
    """A user thread of the host's own (outside the VM partition and the holder groups)
    and the CPUs its cpuset cgroup gives (``cpuset.cpus.effective``)."""

    task: TaskInfo
    cgroup_cpus: CpuSet


def plan_keep_home(before: Iterable[HostTask], after: Iterable[HostTask],
                   isolated: CpuSet) -> tuple[Write, ...]:
    """Host threads back on their cgroup's CPUs less the ``isolated`` ones (``isolcpus=``)
    after a cpuset change, where that is what they had before it.

    The kernel gives every task of a cpuset cgroup whose CPUs change all of the cgroup's
    CPUs, less only a mask the task asked for itself (Linux 6.2+).  PID 1's affinity is
    the housekeeping CPUs, set by the kernel at boot rather than asked for, and every
    service inherits it: a partition coming or going gave them the isolated CPUs too, and
    nothing took those away again.  Once pinwarden has put such a thread back, its mask
    counts as asked for, and the kernel then keeps it narrowed when the partition's CPUs
    come back: so the target is always the cgroup's CPUs now, less the isolated ones.

    A thread that had exactly its cgroup's CPUs less the isolated ones (``before``: just
    before the change; CPUs outside its cgroup do not count, as a mask set at boot names
    offline CPUs too) gets that again (``after``: its cgroup's CPUs now).  A thread placed
    otherwise (narrower, or on isolated CPUs itself) is someone's choice, which the kernel
    keeps or not: left alone.  A thread already right, or that would be left without a
    CPU, is not written."""
    was = {t.task.key: t for t in before}
    writes: list[Write] = []
    for now in after:
        old = was.get(now.task.key)
        if old is None or old.task.affinity & old.cgroup_cpus != old.cgroup_cpus - isolated:
            continue
        target = now.cgroup_cpus - isolated
        if target and now.task.affinity & now.cgroup_cpus != target:
            writes.append(Write(now.task.key, target))
    return tuple(writes)


def plan_kthreads_home(before: Iterable[KthreadInfo], after: Iterable[KthreadInfo],
                       recorded: Mapping[str, Record]) -> Plan:
    """Kernel threads back where they were before a cpuset change, less the CPUs it took.

    The kernel gives every task of the root cpuset the CPUs no partition holds whenever a
    partition comes or goes (unbound kernel threads among them): NUMA-local ``kswapd1``
    on ``2-3`` went to ``0-2`` when CPU 3 became a partition and to ``0-3`` when it went
    (bookworm-lab hunt).  Each settable thread the change moved gets what it had less what
    the kernel no longer lets it have (``before ∩ after``; left alone where that is
    empty).  Where that is narrower than what it had, a record keeps the original (an
    existing record keeps its own), so that the noise restore gives the CPUs back when
    the lease ends (:func:`plan_restore`; a thread already narrowed by pinwarden first
    gets its narrowed value back, which the restore then recognises)."""
    was = {k.key: k for k in before}
    writes: list[Write] = []
    records: list[Record] = []
    for now in after:
        old = was.get(now.key)
        if old is None or not now.settable or now.affinity == old.affinity:
            continue
        target = old.affinity & now.affinity
        if not target:
            # the change took every CPU it had (a lease of kswapd1's whole node): the
            # kernel's CPUs stand while it lasts, and a record keeps the original for the
            # restore — without it kswapd1 was left on node 0 for good (bookworm-lab hunt)
            rec = recorded.get(now.key)
            if rec is None or rec.applied != now.affinity:
                records.append(Record(now.key, rec.original if rec is not None
                                      else old.affinity, now.affinity))
            continue
        if target != now.affinity:
            writes.append(Write(now.key, target))
        rec = recorded.get(now.key)
        if target != (rec.applied if rec is not None else old.affinity):
            records.append(Record(now.key, rec.original if rec is not None else old.affinity,
                                  target))
    return Plan(tuple(writes), tuple(records))


def inherited(tasks: Iterable[TaskInfo], records: Mapping[str, Record]) -> dict[str, Record]:
    """Records for the threads a moved thread's process started while it was moved: they
    inherited the narrowed affinity (a new thread gets its creator's), so they go back with
    their process.  A thread of such a process, not recorded itself, whose affinity is
    exactly what pinwarden wrote to a recorded sibling gets that sibling's record; where
    siblings were given different values the thread is left alone (nothing says which).
    Processes are known by their recorded threads still alive in ``tasks``."""
    tasks = tuple(tasks)
    by_process: dict[int, set[tuple[CpuSet, CpuSet]]] = {}
    for task in tasks:
        rec = records.get(task.key)
        if rec is not None and task.tgid:
            by_process.setdefault(task.tgid, set()).add((rec.original, rec.applied))
    out: dict[str, Record] = {}
    for task in tasks:
        if task.key in records or not task.tgid:
            continue
        matches = {(o, a) for o, a in by_process.get(task.tgid, ()) if a == task.affinity}
        if len({o for o, _ in matches}) == 1:
            original, applied = next(iter(matches))
            out[task.key] = Record(task.key, original, applied)
    return out


def forked(tasks: Iterable[TaskInfo], records: Mapping[str, Record], since: int
           ) -> dict[str, Record]:
    """Records for threads started while recorded threads were narrowed (``start_time``,
    clock ticks after boot, not before ``since``) by processes other than theirs: a
    service PID 1 (re)started then, a worker a daemon forked — each inherited its
    creator's narrowed affinity, and kept it after the lease ended (systemd-lab hunt:
    journald and libvirtd restarted during a lease stayed off the freed CPUs for good).
    A thread whose affinity is exactly a value pinwarden wrote, where every record with
    that value has one original, gets that original; anything else is left alone."""
    by_applied: dict[CpuSet, set[CpuSet]] = {}
    for rec in records.values():
        by_applied.setdefault(rec.applied, set()).add(rec.original)
    out: dict[str, Record] = {}
    for task in tasks:
        if task.key in records or task.start_time < since:
            continue
        originals = by_applied.get(task.affinity, set())
        if len(originals) == 1:
            out[task.key] = Record(task.key, next(iter(originals)), task.affinity)
    return out


def plan_restore(snapshot: NoiseSnapshot, recorded: Mapping[str, Record] | Iterable[Record],
                 still_leased: CpuSet, housekeeping: CpuSet | None = None) -> Restore:
    """Put recorded sources back: target = original − ``still_leased`` (CPUs leased to
    someone still); an original entirely still leased gets the housekeeping CPUs
    (``housekeeping``, online and not leased; default: every online CPU not leased).

    A key no longer in the snapshot (IRQ freed, thread exited) is forgotten — a thread's
    is kept where the host's threads are not in view (``threads_in_view``); a key
    whose current value is neither what pinwarden wrote, nor the original, nor the target
    was changed by someone else: left alone and forgotten (``conflicts``)."""
    records = dict(recorded) if isinstance(recorded, Mapping) else \
        {r.key: r for r in recorded}
    values = snapshot.values(records)
    fallback = _fallback(housekeeping if housekeeping is not None else snapshot.online,
                         snapshot.online, still_leased)
    writes: list[Write] = []
    forget: list[str] = []
    keep: list[Record] = []
    conflicts: list[str] = []
    # Threads out of view: a PID namespace of its own (a container's /proc), which shows
    # none of the host's threads.  Theirs are not gone: kept for a pinwarden that sees
    # them (forgotten, the kernel threads stayed on the housekeeping CPUs: hunt).
    threads_unseen = not snapshot.threads_in_view
    for key in sorted(records, key=_key_order):
        rec = records[key]
        current = values.get(key)
        if current is None:
            if threads_unseen and key.startswith((KTHREAD_PREFIX, TASK_PREFIX)):
                keep.append(rec)
                continue
            forget.append(key)
            continue
        target = rec.original - still_leased
        if not target:
            target = fallback
        if not target:  # every online CPU still leased: nothing to give back yet
            keep.append(rec)
            continue
        if current not in (rec.applied, rec.original, target):
            conflicts.append(key)
            forget.append(key)
            continue
        live = target & snapshot.online
        if live != target:
            # CPUs of it offline now: the kernel keeps a value with none of those (an IRQ
            # gets its default, a thread its cpuset's CPUs), and the record went with the
            # write — the CPU was not given back once online (v2-lab hunt).  The online
            # ones now; the record stays for a later sync to write the rest.
            if live and current != live:
                writes.append(Write(key, live))
            keep.append(Record(key, rec.original, live or rec.applied))
            continue
        if current != target:
            writes.append(Write(key, target))
        if target == rec.original:
            forget.append(key)
        else:
            keep.append(Record(key, rec.original, target))
    return Restore(tuple(writes), tuple(forget), tuple(keep), tuple(conflicts))


# -- what cannot move -------------------------------------------------------------------

FindingKind = Literal["irq", "tick", "rcu", "kthreads", "scheduler", "new-kthreads"]


@record
class Finding:
    """Noise on ``cpus`` (leased) that pinwarden cannot remove at run time, and the boot
    parameter that would."""

    kind: FindingKind
    key: str
    cpus: CpuSet
    what: str
    boot_param: str


def unmovable(snapshot: NoiseSnapshot, leased: CpuSet,
              balanced_off: CpuSet = EMPTY) -> list[Finding]:
    """Noise left on ``leased`` CPUs after isolation: IRQs the kernel refuses to move
    (``writable is False``: managed or per-CPU — ``isolcpus=managed_irq,…``), the tick
    (``nohz_full=``), RCU callbacks (``rcu_nocbs=``), per-CPU kernel threads, kernel
    threads created later (they start on every ``HK_TYPE_KTHREAD`` CPU — kthread.c —
    which only ``nohz_full=`` narrows), and scheduler load balancing outside
    ``isolcpus=domain`` (a cgroup ``isolated`` partition does that at run time: the CPUs
    of valid ones, ``balanced_off``, are not named — the audit said "unless the holder
    partition is 'isolated'" of CPUs whose partitions were: systemd-lab hunt)."""
    out: list[Finding] = []
    cpus = leased & snapshot.online
    if not cpus:
        return out
    lst = cpus.to_list()
    for irq in snapshot.irqs:
        on = (irq.effective if irq.effective is not None else irq.affinity) & cpus
        if irq.writable is False and on:
            names = ",".join(irq.actions) or "no handler"
            out.append(Finding("irq", irq.key, on,
                               f"IRQ {irq.irq} ({names}) refuses affinity changes "
                               f"(managed or per-CPU)",
                               f"isolcpus=managed_irq,domain,{lst}"))
    tick = cpus - snapshot.nohz_full
    if tick:
        out.append(Finding("tick", "tick", tick, "the scheduler tick still runs there",
                           f"nohz_full={lst}"))
    rcu = cpus - snapshot.rcu_nocbs
    if rcu:
        out.append(Finding("rcu", "rcu", rcu, "RCU callbacks are invoked there",
                           f"rcu_nocbs={lst}"))
    bound: dict[int, list[str]] = {}
    for kt in snapshot.kthreads:
        if kt.per_cpu and not kt.irq_thread and kt.affinity <= cpus and len(kt.affinity) == 1:
            bound.setdefault(kt.affinity.first(), []).append(kt.comm)
    for cpu, comms in sorted(bound.items()):
        shown = ", ".join(sorted(comms)[:6]) + (" …" if len(comms) > 6 else "")
        out.append(Finding("kthreads", f"kthreads:{cpu}", CpuSet.of([cpu]),
                           f"{len(comms)} per-CPU kernel threads ({shown})",
                           f"nohz_full={lst} (quiets them; they cannot leave)"))
    new_kthreads = cpus - snapshot.nohz_full
    if new_kthreads:
        out.append(Finding("new-kthreads", "new-kthreads", new_kthreads,
                           "kernel threads created later start on these CPUs",
                           f"nohz_full={lst}"))
    sched = cpus - snapshot.isolated - balanced_off
    if sched:
        out.append(Finding("scheduler", "scheduler", sched,
                           "scheduler load balancing reaches them unless the holder "
                           "partition is 'isolated'",
                           f"isolcpus=domain,{lst}"))
    return out


def kernel_cmdline(vm_cpus: CpuSet, housekeeping: CpuSet) -> str:
    """Boot parameters that take ``vm_cpus`` away from the kernel's own noise:
    ``isolcpus=managed_irq,domain,VM nohz_full=VM rcu_nocbs=VM irqaffinity=HK``.

    ``housekeeping`` must be non-empty and disjoint from ``vm_cpus`` (the kernel keeps the
    boot CPU for housekeeping whatever nohz_full says: leave CPU 0 there)."""
    if not vm_cpus:
        raise ValueError("no VM CPUs to isolate")
    if not housekeeping:
        raise ValueError("at least one housekeeping CPU is needed")
    if not vm_cpus.isdisjoint(housekeeping):
        raise ValueError(f"CPUs {(vm_cpus & housekeeping).to_list()} are both VM and "
                         f"housekeeping CPUs")
    vm = vm_cpus.to_list()
    return (f"isolcpus=managed_irq,domain,{vm} nohz_full={vm} rcu_nocbs={vm} "
            f"irqaffinity={housekeeping.to_list()}")


def with_refusals(snapshot: NoiseSnapshot, keys: Iterable[str]) -> NoiseSnapshot:
    """``snapshot`` with the IRQs among ``keys`` marked unwritable (their write came back
    ``EIO``), so :func:`unmovable` lists them and the next plan leaves them out."""
    bad = frozenset(keys)
    irqs = tuple(replace(i, writable=False) if i.key in bad else i for i in snapshot.irqs)
    return replace(snapshot, irqs=irqs)
