"""The lease manager: the one path for reserve, enforce, release and sync.

In the role of kubelet's ``cpu_manager.go``: one object owns

* the **ledger** (opened once; read-only commands never create it),
* the **cgroup backend** (opened once — on systemd hosts one D-Bus connection — and closed
  with the manager),
* the **lock** (an ``flock`` on ``STATE_DIR/manager.lock``) that serialises every change.

Every change reads the leases *under the lock*: reserve + enforce, release + shrink, sync
and reap.  ``pinwarden run``, ``pinwarden start/stop``, the libvirt hook and the event
daemon only call the manager; none of them touches the ledger or the cgroups itself.

The manager also keeps the promise to leave the host as it found it: the first lease
records the host's partition and the VM partition cgroup as found
(:class:`~pinwarden.ledger.HostRecord`; placement keeps using them while anything is
leased, so pinwarden's own narrowing of ``machine`` never changes the rules), the first
change of a host setting records its original value, and when the last lease goes the
settings are put back and the records forgotten — also after a crash, by the next sync.

Reads (:meth:`Manager.host`, :meth:`Manager.leases`, :meth:`Manager.plan` …) never write:
leases of owners that died are left out of what they return, and removed by the explicit
:meth:`Manager.reap` (and by every reservation, before it decides).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from pinwarden.config import Config
from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.errors import (
    EnforceError,
    HostError,
    LedgerError,
    PinwardenError,
    Refusal,
    shorten,
    state_dir_advice,
)
from pinwarden.ledger import DB_NAME, HolderRecord, HostRecord, Ledger
from pinwarden.model import (
    JOB_DRIVER,
    KEPT_ROLE,
    VM_DRIVERS,
    HolderRef,
    Lease,
    Plan,
    release_command,
    stop_command,
)
from pinwarden.partition import Host, VmCgroup, load_host, read_vm_cgroup
from pinwarden.record import record, replace

if TYPE_CHECKING:
    from pinwarden import isolation, noise
    from pinwarden.enforce.apply import Result
    from pinwarden.enforce.backend import CgroupBackend, Snapshot
    from pinwarden.enforce.layout import LayoutNames, Targets
    from pinwarden.noise import Outcome
    from pinwarden.policy import Request
    from pinwarden.topology import Topology

LOCK_NAME = "manager.lock"
#: Change-record key of the shared VM partition cgroup's CPUs (``cgroup:machine``).
SHARED_KEY = "cgroup:{path}"
#: Change record: whether the root enabled the cpuset controller before the first lease
#: (cgroup v2 without systemd, where pinwarden's first group turns it on).
CONTROLLER_KEY = "controller:cpuset"
#: Change records of holder groups kept after their holder was freed while processes ran
#: there (``release --force`` of a running domain): ``kept:PATH`` with the holder, its CPUs
#: and a process that runs there.  New plans keep off those CPUs until the group is gone.
KEPT_PREFIX = "kept:"
#: When pinwarden first moved user threads off unguarded leased CPUs (``task:`` records):
#: clock ticks after boot, as ``/proc/PID/stat`` counts a thread's start.
TASKS_SINCE_KEY = "tasks-since"
#: Change records of groups below the shared one that pinwarden does not own and that had
#: CPUs of their own when it first changed their parent (``follower:PATH``: ``{"cpus"}``).
FOLLOWER_PREFIX = "follower:"
#: Change record written before a sync's first cgroup write and forgotten once the sync is
#: done: ``{PATH: {"from": CPUS, "to": CPUS}}`` for each group whose CPUs it changes.  Found
#: by the next sync, it says the last one was cut short (killed, or its rollback failed):
#: that sync plans from the CPUs the groups held before (who follows whom), and does not
#: take the shared group's half-written CPUs for somebody else's edit.
INTERRUPTED_KEY = "interrupted-write"

#: ``decide(host, leases) -> Plan`` — the placement decision of one reservation.
Decide = Callable[[Host, tuple[Lease, ...]], Plan]


#: Passes of a sync started again because the shared group was edited while one ran
#: (:meth:`Manager._sync_cgroups`) before the last goes ahead as planned.
EDIT_RETRIES = 2
#: How long a ledger waits for another connection's lock on the database (at most: never
#: more than the manager's ``lock_timeout``).
LEDGER_BUSY_TIMEOUT = 60.0


class _EditedMeanwhile(Exception):
    """Somebody else wrote the shared group's CPUs after this pass of a sync looked for
    an edit and before its layout's first write: the pass starts again."""


@record
class Reserved:
    """A reservation the kernel enforces: the plan, and the holder's cgroup as a backend
    path (None when the plan leases nothing or the manager does not enforce, e.g. on a
    ``--root`` dump).  The ledger records the same cgroup as the kernel names it (on
    systemd hosts its slice's directory), which is what ``audit`` and ``status`` show."""

    plan: Plan
    group: str | None
    result: Result | None


@record
class Preview:
    """What a reservation would do (:meth:`Manager.preview`): its plan and the cgroup
    writes, in order, as one-line descriptions."""

    plan: Plan
    writes: tuple[str, ...]
    notes: tuple[str, ...] = ()


@record
class OwnersGone:
    """Holders whose owner process is gone, from one reading of their groups: ``dead``,
    nothing runs in the group (freed by the next reap); ``heirs``, the processes that run
    on there, lowest pid first (the lease is theirs, handed on at the next change)."""

    dead: tuple[HolderRecord, ...]
    heirs: Mapping[HolderRef, tuple[int, ...]]

    def dead_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset((r.ref.driver, r.ref.key) for r in self.dead)


class Manager:
    """Owns the ledger, the cgroup backend and the lock of one state directory.

    ``enforce``: whether changes are applied to the kernel (default: when ``root`` is this
    host's ``/`` or a ``backend`` is given; never for a dump read with ``--root``).
    ``host``: a fixed host snapshot instead of reading ``root`` (simulations and tests).
    ``noise``: move host noise (IRQs, unbound work, kernel threads) off leased CPUs
    (default: when enforcing on this host with the backend it opens itself, unless the
    configuration turns it off — tests that bring their own backend never touch this
    host's IRQs unless they ask).
    """

    def __init__(self, config: Config, root: Path, state_dir: Path, *,
                 backend: CgroupBackend | None = None, enforce: bool | None = None,
                 host: Host | None = None, noise: bool | None = None,
                 lock_timeout: float = 120.0,
                 warn: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.root = root
        self.state_dir = state_dir
        self.lock_timeout = lock_timeout
        self._fixed_host = host
        self._backend = backend
        self._own_backend = backend is None
        if enforce is None:
            enforce = backend is not None or is_live_root(root)
        self.enforcing = enforce
        if noise is None:
            noise = enforce and backend is None and config.isolate_noise
        self.isolating = noise
        self._ledger: Ledger | None = None
        self._reader: Ledger | None = None
        self._lock_fd: int | None = None
        self._depth = 0
        self._names: LayoutNames | None = None
        #: Where the manager reports what it did on its own (a cgroup narrowed off leased
        #: CPUs): the command line prints it, the daemon logs it.  Default: ignored.
        self.warn: Callable[[str], None] = warn or (lambda _message: None)

    # -- resources ----------------------------------------------------------------------

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ledger and, if the manager opened it, the backend (its D-Bus
        connection)."""
        for ledger in {id(x): x for x in (self._ledger, self._reader) if x}.values():
            with contextlib.suppress(Exception):
                ledger.close()
        self._ledger = self._reader = None
        if self._backend is not None and self._own_backend:
            closer = getattr(self._backend, "close", None)
            if callable(closer):
                with contextlib.suppress(Exception):
                    closer()
            self._backend = None

    def ledger(self) -> Ledger:
        """The ledger, created if needed (for changes)."""
        if self._ledger is None:
            self._ledger = self._reader if self._reader is not None else Ledger(
                self.state_dir, busy_timeout=self._busy_timeout())
            self._reader = self._ledger
        return self._ledger

    def _busy_timeout(self) -> float:
        """How long a ledger opened now waits for the database's lock."""
        return min(LEDGER_BUSY_TIMEOUT, self.lock_timeout)

    def reader(self) -> Ledger | None:
        """The ledger if it exists (None: nothing was ever leased here).  Never creates
        it; an unusable location is a :class:`LedgerError`."""
        if self._reader is None:
            self._reader = Ledger.existing(self.state_dir, busy_timeout=self._busy_timeout())
        return self._reader

    def backend(self) -> CgroupBackend:
        """The host's cpuset backend, opened once (:mod:`pinwarden.enforce.select`)."""
        if self._backend is None:
            from pinwarden.enforce.select import open_backend

            self._backend = open_backend(self.root)
            self._own_backend = True
        return self._backend

    def names(self) -> LayoutNames:
        """``machine`` (v1) or ``machine.slice`` (v2, systemd) and the holder groups' stem."""
        if self._names is None:
            from pinwarden.enforce.select import layout_names

            self._names = layout_names(self.config, self.backend())
        return self._names

    def libvirt_partition(self, holder: HolderRef) -> str:
        """The libvirt ``<resource><partition>`` of an exclusive holder's cgroup."""
        from pinwarden.enforce.layout import libvirt_partition

        try:
            return libvirt_partition(self.names(), holder)
        except ValueError as exc:
            raise HostError(f"[partition] exclusive = {self.config.exclusive_cgroup!r}: "
                            f"{exc}") from None

    def holder_group(self, holder: HolderRef) -> str:
        """The cgroup (backend path) of an exclusive holder."""
        from pinwarden.enforce.layout import holder_group_path

        return holder_group_path(self.names(), holder)

    @contextlib.contextmanager
    def waiting_at_most(self, seconds: float) -> Iterator[None]:
        """Within the block, wait at most ``seconds`` (never more than ``lock_timeout``)
        for another pinwarden's lock.  One thread uses a manager at a time (the daemon's
        hook server has its own)."""
        before = self.lock_timeout
        self.lock_timeout = min(before, seconds)
        # the database's own lock too: a shared start's 'started' waited SQLite's 60 s,
        # not the 20 s it may, behind a process holding the database (broken-pinwarden
        # hunt); a ledger opened within the block starts with it (:meth:`_busy_timeout`)
        if self._reader is not None:
            self._reader.set_busy_timeout(self._busy_timeout())
        try:
            yield
        finally:
            self.lock_timeout = before
            if self._reader is not None:  # (the ledger, when there is one, is the reader)
                self._reader.set_busy_timeout(self._busy_timeout())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the manager lock (re-entrant within this object).  Waits up to
        ``lock_timeout`` seconds for another pinwarden, then a :class:`LedgerError`.
        While it is held, SIGINT, SIGTERM and SIGHUP wait (:mod:`pinwarden.interrupts`)."""
        from pinwarden.interrupts import held

        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.ledger()  # the state directory exists from here on
        path = self.state_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot open the lock {path}: {exc.strerror} "
                              f"({state_dir_advice(exc)})") from None
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise LedgerError(f"cannot lock {path}: {exc.strerror}") from None
                    if time.monotonic() > deadline:
                        raise LedgerError(
                            f"another pinwarden held {path} for {self.lock_timeout:g} s; "
                            f"retry, or find it with 'fuser {path}'",
                            code="ledger-busy") from None
                    time.sleep(0.02)
            self._lock_fd, self._depth = fd, 1
            with held():  # a Ctrl-C waits until the change under the lock is made
                yield
        finally:
            self._lock_fd, self._depth = None, 0
            os.close(fd)

    # -- reads (never write) --------------------------------------------------------------

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """The ledger reads within the block see one state of the database
        (:meth:`Ledger.snapshot`): for commands that read several things without the lock
        (``status``, ``audit``, metrics, a dry run) while another pinwarden reserves or
        releases.  Nothing may be changed inside."""
        reader = self.reader()
        with reader.snapshot() if reader is not None else contextlib.nullcontext():
            yield

    def record(self) -> HostRecord | None:
        """The host as found at the first lease, while one is kept."""
        reader = self.reader()
        return reader.host_record() if reader is not None else None

    def host(self) -> Host:
        """Topology and partition — the partition decided from the VM partition cgroup
        as found at the first lease while a lease is kept, so pinwarden's own changes
        never change the placement rules."""
        return self._recorded_host(self.record())

    def _recorded_host(self, record: HostRecord | None) -> Host:
        """:meth:`host` for the host record ``record`` (None: the host as it reads now)."""
        if record is not None and self._fixed_host is None and \
                self.config.mode not in ("auto", record.partition.mode):
            # The configured mode changed while leases are kept (none to cgroup, say): the
            # partition recorded at the first lease stays what is planned against, as the
            # README says — decided again from the cgroup found then under the new mode,
            # every command failed, "no VM partition cgroup exists" (systemd-lab hunt).
            from pinwarden.record import replace

            topology = self._topology()
            part = record.partition
            return Host(topology, replace(part, vm_cpus=part.vm_cpus & topology.online,
                                          host_cpus=part.host_cpus & topology.online))
        return self.configured_host(record)

    def configured_host(self, record: HostRecord | None) -> Host:
        """The host as the configuration reads it now on the VM partition cgroup found at
        the first lease (``record``; None: as it is now) — what is planned against once the
        last lease goes, which :meth:`host` differs from while the configuration and the
        record disagree.  A configuration that gives no partition there is a
        :class:`HostError`."""
        return self._load_host(record.found if record else None)

    def live_host(self) -> Host:
        """Topology and partition as the host reads *now*, ignoring the record."""
        return self._load_host(None)

    def _load_host(self, found: VmCgroup | None) -> Host:
        if self._fixed_host is not None:
            return self._fixed_host
        return load_host(self.root, self.config, found, topology=self._topology())

    def _topology(self) -> Topology:
        """The topology, from its snapshot cache while sysfs says nothing changed (#12)."""
        from pinwarden.topocache import cached_topology

        return cached_topology(self.root, self.state_dir)

    def holders(self) -> tuple[HolderRecord, ...]:
        reader = self.reader()
        return reader.holders() if reader is not None else ()

    def owners_gone(self) -> OwnersGone:
        """Holders whose owner process is gone, from one reading of their groups."""
        reader = self.reader()
        if reader is None:
            return OwnersGone((), {})
        dead: list[HolderRecord] = []
        heirs: dict[HolderRef, tuple[int, ...]] = {}
        for gone in reader.dead():
            left = self.left_running(gone.ref)
            if left:
                heirs[gone.ref] = left
            else:
                dead.append(gone)
        return OwnersGone(tuple(dead), heirs)

    def dead(self) -> tuple[HolderRecord, ...]:
        """Holders whose owner process is gone (freed by the next :meth:`reap`).  One
        whose group still has processes is not: a job whose command exited while
        processes it started run on, a domain whose first owner (libvirtd, a ``pinwarden
        start``) ended before QEMU took the lease over — the next change hands the lease
        on to them (:meth:`hand_on`)."""
        return self.owners_gone().dead

    def left_running(self, holder: HolderRef) -> tuple[int, ...]:
        """The live processes with a task in ``holder``'s group, lowest first (none when
        nothing is enforced or the group cannot be read)."""
        from pinwarden import procs

        if not self.enforcing:
            return ()
        try:
            tasks = self._group_tasks(self.holder_group(holder))
        except PinwardenError:
            return ()
        found = {procs.process_of(t) for t in tasks}
        return tuple(sorted(p for p in found if p is not None
                            and procs.start_time(p) is not None))

    def leases(self, *, dead: bool = False, kept: bool = False,
               owners: OwnersGone | None = None) -> tuple[Lease, ...]:
        """Every lease whose holder lives (dead owners' leases are already free).
        ``dead``: those too — free to decide on, but their CPUs stay out of the shared
        group until a release or sync frees them.  ``kept``: and the CPUs a forced
        release left to processes that run on (:meth:`kept_leases`): what every plan
        keeps off — a shared domain planned onto one failed in libvirt ('Permission
        denied'), a pin onto one was let through, a give-back handed one out (hunt).
        ``owners``: the caller's reading of :meth:`owners_gone`, not read again.  ``kept``
        covers the holder groups processes run in that the ledger does not record too
        (:meth:`_unrecorded_leases`: its database lost or replaced while a domain ran, or a
        forced release killed between its drop and its ``kept:`` record): only exclusive
        plans kept off them, and a shared start failed in libvirt (durability hunt)."""
        reader = self.reader()
        extra = (*(self._kept_leases(reader) if reader is not None else ()),
                 *self._unrecorded_leases(reader)) if kept else ()
        if reader is None:
            return extra
        if dead:
            return (*reader.leases(), *extra)
        gone = (owners or self.owners_gone()).dead_keys()
        return (*(lease for lease in reader.leases()
                  if (lease.holder.driver, lease.holder.key) not in gone), *extra)

    def live_holders(self, owners: OwnersGone | None = None) -> tuple[HolderRecord, ...]:
        """The holders whose owner lives, or whose group's processes took the lease on."""
        gone = (owners or self.owners_gone()).dead_keys()
        return tuple(h for h in self.holders() if (h.ref.driver, h.ref.key) not in gone)

    def change_records(self, prefix: str) -> dict[str, str]:
        """The change records under ``prefix`` that an adapter keeps of what it changed
        on the host, to give back later (``repin:``: live pins of running domains)."""
        reader = self.reader()
        if reader is None:
            return {}
        return {k: v for k, v in reader.changes().items() if k.startswith(prefix)}

    def put_change_records(self, records: Mapping[str, str],
                           forget: Iterable[str] = ()) -> None:
        """Write (``records``) and forget (``forget``) such change records, under the
        lock."""
        forget = list(forget)
        if not records and not forget:
            return
        with self.locked():
            ledger = self.ledger()
            ledger.put_changes(records)
            ledger.forget_changes(forget)

    def refused_noise(self) -> frozenset[str]:
        """Noise sources the kernel refused to move (managed or per-CPU IRQs)."""
        reader = self.reader()
        if reader is None:
            return frozenset()
        return frozenset(key for key, value in reader.changes().items()
                         if _is_noise_key(key) and '"refused"' in value)

    def plan(self, request: Request, *, holder: HolderRef | None = None,
             unleased: bool = False) -> Plan:
        """Where ``request`` would run now (dry run, nothing recorded); ``unleased``: with
        nothing leased (whether this host could ever run it)."""
        from pinwarden.policy import decide

        return decide(request, self.host(), () if unleased else self.leases(kept=True),
                      holder=holder)

    def preview(self, holder: HolderRef, decide: Decide) -> Preview:
        """What :meth:`reserve` would do (``--dry-run``): the plan, and the cgroup writes
        in the order the manager would make them.  Nothing is recorded, written or
        created (not even the state directory)."""
        from pinwarden.enforce.apply import adapt_to_kernel, read_current
        from pinwarden.enforce.backend import describe
        from pinwarden.enforce.layout import PlanError, desired_layout, order, targets

        reader = self.reader()
        leases: tuple[Lease, ...] = ()
        kept: tuple[Lease, ...] = ()
        holders: tuple[HolderRecord, ...] = ()
        record: HostRecord | None = None
        if reader is not None:
            with self.snapshot():
                leases, record = reader.leases(), reader.host_record()
                holders, kept = reader.holders(), self._kept_leases(reader)
        host = self._recorded_host(record)
        # (as the reserve decides: off the CPUs a forced release left running)
        plan = decide(host, (*leases, *kept, *self._unrecorded_leases(reader)))
        mine = (holder.driver, holder.key)
        others = tuple(le for le in leases if (le.holder.driver, le.holder.key) != mine)
        new = (*others, *(Lease(cpu, holder, role, 0.0) for cpu, role in plan.leases.items()))
        if not self.enforcing or not plan.leases:
            return Preview(plan, ())
        backend, names = self.backend(), self.names()
        v2 = backend.kind in ("v2", "systemd")
        isolated = frozenset([h.ref for h in holders if h.plan.isolated]
                             + ([holder] if plan.isolated else [])) if v2 else frozenset()
        deferred = frozenset({le.holder for le in new if le.holder.driver == "lxc"}) \
            if v2 else frozenset()
        desired = adapt_to_kernel(
            backend, desired_layout(host, new, names, isolated=isolated, deferred=deferred))
        current = read_current(backend, desired)
        try:
            writes = [describe(op) for op in order(current, targets(current, desired))]
        except PlanError as exc:
            raise EnforceError(str(exc)) from None
        fresh = plan.leased() - CpuSet.of(le.cpu for le in others)
        if self.isolating and fresh:
            writes.append(f"move movable IRQs, the default IRQ affinity, unbound workqueues "
                          f"and movable kernel threads off {fresh.named()}")
        return Preview(plan, tuple(writes), desired.notes)

    # -- changes (under the lock) ---------------------------------------------------------

    def _refuse_systemd_v1(self, backend: CgroupBackend) -> None:
        """No lease on a host whose systemd runs cgroup v1 (``systemd.unified_cgroup_
        hierarchy=0``, the hybrid layout of older distributions): libvirt puts its VMs in
        ``machine.slice`` there and systemd has no cpuset on v1, so nothing pinwarden writes
        keeps them off a leased CPU — its first write was refused, saying to free
        machine.slice (bookworm lab booted so).  Shared VMs start as ever."""
        from pinwarden.enforce.systemd import systemd_booted

        if backend.kind == "v1" and systemd_booted(self.root):
            raise HostError(
                "this host's systemd runs cgroup v1 (the cpuset controller is not on the "
                "unified cgroup2 tree): pinwarden leases CPUs on systemd hosts only with "
                "cgroup v2 — boot with systemd.unified_cgroup_hierarchy=1 (systemd's "
                "default); unpinned VMs start as ever")

    def reserve_request(self, request: Request, *, holder: HolderRef | None = None,
                        owner_pid: int | None = None, enforce: bool = True) -> Reserved:
        """:meth:`reserve` with :func:`pinwarden.policy.decide` as the decision."""
        from pinwarden.policy import decide, holder_of

        who = holder if holder is not None else holder_of(request)
        if self.reader() is None:
            # nothing was ever leased here: a refusal needs no ledger, and leaves none
            # behind (a mistyped --state-dir got a real-looking empty one: input hunt);
            # with no leases and no holders, what this refuses the reserve would refuse
            decide(request, self._load_host(None), (), holder=who)
        return self.reserve(who, lambda host, leases: decide(request, host, leases,
                                                             holder=who),
                            owner_pid=owner_pid, enforce=enforce)

    def reserve(self, holder: HolderRef, decide: Decide, *, owner_pid: int | None = None,
                enforce: bool = True) -> Reserved:
        """Decide and record ``holder``'s leases in one transaction, then make the kernel
        enforce them.  If enforcement fails, the holder's previous leases are put back
        (a new holder is removed), the layout re-synced and the error raised."""
        if enforce and self.enforcing:
            self._refuse_systemd_v1(self.backend())
        with self.locked():
            ledger = self.ledger()
            self._hand_on_dead()  # before the reserve reaps dead owners
            record = ledger.host_record()
            host = self._recorded_host(record)
            first = None if record is not None else self._found(host)
            kept = (*self._kept_leases(ledger), *self._own_group_left_out(
                holder, self._unrecorded_leases(ledger)))
            try:
                plan = ledger.reserve(holder, lambda leases: decide(host, (*leases, *kept)),
                                      owner_pid=owner_pid, host=first)
            except BaseException:
                # A refused plan still reaps the dead holders it found (committed): the
                # kernel follows, so their groups do not outlive them (and the host is put
                # back as found if theirs were the last leases).
                if ledger.last_reaped and enforce and self.enforcing:
                    with contextlib.suppress(PinwardenError):
                        self._sync()
                raise
            previous = ledger.last_replaced
            if not (enforce and self.enforcing):
                return Reserved(plan, None, None)
            try:
                result = self._sync()
            except BaseException:
                with contextlib.suppress(PinwardenError):
                    ledger.put_back(holder, previous)
                with contextlib.suppress(PinwardenError):
                    self._sync()
                raise
            group = None
            if result is not None and result.desired is not None:
                spec = result.desired.group_of(holder)
                group = spec.path if spec is not None else None
            if group is not None:
                from pinwarden.enforce.backend import kernel_path

                try:
                    cgroup = kernel_path(self.backend(), group)
                except ValueError:  # no unit for it: the backend path is the best name
                    cgroup = group
                ledger.set_cgroup(holder, cgroup)
            return Reserved(plan, group, result)

    def release(self, selector: str, *, driver: str | None = None,
                force: bool = True) -> HolderRecord:
        """Free the holder named ``selector`` (name, UUID or key) and shrink the layout.
        The release is durable even when the kernel refuses the shrink: that is raised
        as an :class:`EnforceError` saying so.  ``force=False``: a holder whose owner
        process runs (a domain's QEMU, a job) is refused instead — its group cannot go
        while its tasks are in it, and its CPUs would look free while it uses them."""
        from pinwarden import procs

        if self.reader() is None:  # (refused without making the ledger it looked in)
            scope = "" if driver is None else f" of driver {driver}"
            raise LedgerError(f"no holder{scope} named {shorten(selector)}: no lease database "
                              f"at {self.state_dir / DB_NAME} (nothing was ever leased with "
                              f"this state directory: is it the one pinwarden uses?)",
                              code="unknown-holder")
        with self.locked():
            ledger = self.ledger()
            found = None if force else ledger.find(selector, driver=driver)
            if found is not None and not found.owner_runs() and self._hand_on(found.ref):
                # its owner is gone while processes run in its group (a job's command
                # exited, its children run on; a domain's first owner ended before QEMU
                # took over): the lease is theirs (it used to be freed while they ran)
                found = ledger.get(found.ref)
            if found is not None and found.owner_elsewhere and found.owner_runs():
                raise Refusal(
                    f"{found.ref} is owned by pid {found.owner_pid} of another PID namespace "
                    f"(a container's, or the host's beside one) on "
                    f"{found.plan.leased().named(empty='no CPUs')}: whether it runs cannot be "
                    f"told from here; release it where it was leased, or "
                    f"`{release_command(found.ref)} --force` frees it all the same",
                    code="holder-running")
            if found is not None and found.owner_runs():
                assert found.owner_pid is not None
                ref = found.ref
                if ref.driver != JOB_DRIVER and procs.libvirt_daemon(found.owner_pid):
                    # libvirtd between the hook's prepare and QEMU's start; also a start
                    # whose started and release hooks were both lost (killed): "still
                    # runs (pid of libvirtd)" sent the user to stop a domain that did not
                    # run (crash hunt)
                    raise Refusal(
                        f"{ref} is held by {procs.thread_comm(found.owner_pid, found.owner_pid)}"
                        f" (pid {found.owner_pid}) on "
                        f"{found.plan.leased().named(empty='no CPUs')}: it is starting or "
                        f"stopping the domain; if the domain does not run ('virsh domstate "
                        f"{ref.uuid or ref.name}'), 'pinwarden daemon --once' frees its "
                        f"leases, as does `{release_command(ref)} --force`",
                        code="holder-running")
                # (the name quoted for the shell, as every other refusal has it: hunt)
                stop = stop_command(ref, found.owner_pid)
                raise Refusal(f"{ref} still runs (pid {found.owner_pid}) on "
                              f"{found.plan.leased().named(empty='no CPUs')}: stop it "
                              f"({stop}) and its leases go with it; "
                              f"`{release_command(ref)} --force` frees them while it runs",
                              code="holder-running")
            record = ledger.release(selector, driver=driver, corrupt_plan=force)
            self._sync_after_release(record)
            return record

    def drop(self, holder: HolderRef) -> HolderRecord | None:
        """Free exactly ``holder`` if recorded (idempotent) and shrink the layout."""
        with self.locked():
            record = self.ledger().drop(holder)
            if record is not None:
                self._sync_after_release(record)
            return record

    def drop_failed(self, holder: HolderRef, owner: int) -> int | None:
        """Free ``holder``, reserved by process ``owner`` for a start that failed — unless
        the domain runs anyway: the lease was taken over by another live owner (a racing
        ``virsh start`` of the same domain: its hook's ``started`` hands it to QEMU), or
        processes run in its group (libvirtd restarted during the call and completed the
        start).  Then the lease is kept, handed on to those processes if still ``owner``'s,
        and the process it is kept for returned; None when it was freed."""
        with self.locked():
            record = self.ledger().get(holder)
            if record is None:
                return None
            if record.owner_pid is not None and (record.owner_pid != owner or
                                                 record.owner_elsewhere) \
                    and record.owner_runs():
                return record.owner_pid
            left = self.left_running(holder)
            if left:
                with contextlib.suppress(LedgerError):  # exited meanwhile: freed below
                    self.ledger().set_owner(holder, left[0])
                    return left[0]
            dropped = self.ledger().drop(holder)
            if dropped is not None:
                self._sync_after_release(dropped)
            return None

    def _sync_after_release(self, record: HolderRecord) -> None:
        """Shrink the layout after ``record`` was freed.  Where its group is kept because
        processes run there (a forced release of a running domain), a ``kept:`` record
        says whose CPUs those are: the next exclusive start was offered them, and its
        failed layout moved that running VM and a shared one (systemd-lab hunt)."""
        holder = record.ref
        try:
            self._sync()
        except PinwardenError as exc:
            raise EnforceError(f"released the leases of {holder}, but the cgroup layout could "
                               f"not shrink: {exc.message}; 'pinwarden sync' retries") from None
        left = self.left_running(holder)
        cpus = record.plan.leased()
        if left and cpus:
            self.ledger().put_changes({KEPT_PREFIX + self.holder_group(holder): json.dumps(
                {"driver": holder.driver, "key": holder.key, "name": holder.name,
                 "cpus": cpus.to_list(), "pid": left[0]})})

    def kept_leases(self) -> tuple[Lease, ...]:
        """The CPUs of holder groups kept after a forced release while their processes run
        on, as leases of role :data:`~pinwarden.model.KEPT_ROLE` (read only: ``status``
        and ``audit`` show them as taken, not free)."""
        reader = self.reader()
        kept = self._kept_leases(reader) if reader is not None else ()
        return (*kept, *self._unrecorded_leases(reader))

    def _kept_leases(self, ledger: Ledger) -> tuple[Lease, ...]:
        """The CPUs of holder groups kept after a forced release (``kept:`` records), as
        leases of the holders freed there: a new plan keeps off them, and a refusal names
        the domain that still runs there and how to stop it."""
        out: list[Lease] = []
        for key, value in ledger.changes().items():
            if not key.startswith(KEPT_PREFIX):
                continue
            try:
                data = json.loads(value)
                ref = HolderRef(str(data["driver"]), str(data["key"]), str(data["name"]))
                cpus = CpuSet.parse_kernel(str(data["cpus"]))
                pid = int(data["pid"])
            except (ValueError, KeyError, TypeError, PinwardenError):
                continue
            if self.left_running(ref):  # (gone since: the next sync removes the group)
                out += [Lease(cpu, ref, KEPT_ROLE, 0.0, pid) for cpu in cpus]
        return tuple(out)

    def _own_group_left_out(self, holder: HolderRef, unrecorded: tuple[Lease, ...]
                            ) -> tuple[Lease, ...]:
        """``unrecorded`` (:meth:`_unrecorded_leases`) less a domain's own holder group: the
        domain that runs there is the one reserving (the daemon adopting a domain whose
        lease a sync in a container had freed was refused as "kept by" itself: hunt)."""
        if not unrecorded or holder.driver not in VM_DRIVERS:
            return unrecorded
        from pinwarden.enforce.names import holder_component
        from pinwarden.model import unrecorded_holder

        names = self.names()
        group = holder_component(self.holder_group(holder).rpartition("/")[2],
                                 names.exclusive)
        own = unrecorded_holder(group, names.stem) if group is not None else None
        return tuple(lease for lease in unrecorded if lease.holder != own)

    def _unrecorded_leases(self, ledger: Ledger | None) -> tuple[Lease, ...]:
        """The CPUs of holder groups that processes run in while the ledger records no
        holder there (and no forced release): its database was lost or replaced while a
        domain ran (a wiped /var/lib, another ``state_dir``).  Planned over, a running
        exclusive domain lost its CPU and its partition to the next exclusive start, as
        "a cgroup that named leased CPUs", and the layout put the shared VMs on that CPU
        (systemd lab hunt).  As leases of role ``kept``: no plan takes them, and status,
        audit and every refusal name the domain that runs there.  Looked for on this host
        only, by the names in the cgroup directory first (no backend opened for that)."""
        if not (self.enforcing and self._own_backend and self._fixed_host is None
                and is_live_root(self.root)):
            return ()
        dirs = self._holder_dirs()
        if not dirs:  # (the common case, without reading the ledger: most shared starts)
            return ()
        holders = ledger.holders() if ledger is not None else ()
        kept = [k.removeprefix(KEPT_PREFIX) for k in (ledger.changes() if ledger else ())
                if k.startswith(KEPT_PREFIX)]
        candidates = dirs - {h.cgroup.strip("/").rpartition("/")[2]
                             for h in holders if h.cgroup}
        if not candidates:
            return ()
        from pinwarden import procs
        from pinwarden.enforce.backend import CgroupOpError, join
        from pinwarden.enforce.names import holder_component
        from pinwarden.model import unrecorded_holder

        try:
            backend, names = self.backend(), self.names()
        except PinwardenError:
            return ()
        known = {holder_component(self.holder_group(h.ref).rpartition("/")[2],
                                  names.exclusive) for h in holders}
        known |= {holder_component(path.rpartition("/")[2], names.exclusive) for path in kept}
        out: list[Lease] = []
        for child in sorted(candidates):
            group = holder_component(child, names.exclusive)
            if group is None or group in known:
                continue
            ref = unrecorded_holder(group, names.stem)
            if ref is None:
                continue
            path = join(names.parent, group)  # (the backend's name: systemd's is the slice)
            pids = sorted(p for p in {procs.process_of(t) for t in self._group_tasks(path)}
                          if p is not None and procs.start_time(p) is not None)
            if not pids:
                continue  # (an empty one is stale: the next sync removes it)
            try:
                cpus = backend.read_group(path).cpus
            except CgroupOpError:
                continue
            out += [Lease(cpu, ref, KEPT_ROLE, 0.0, pids[0]) for cpu in cpus]
        return tuple(out)

    def _cpuset_mount(self) -> tuple[Path | None, bool]:
        """This host's cpuset hierarchy: its mount (None: none) and whether it is v1."""
        from pinwarden.mounts import read_mounts

        mounts = read_mounts(self.root)
        v1 = mounts.v1("cpuset")
        if v1 is not None:
            return v1, True
        return (mounts.unified if mounts.v2_has("cpuset") else None), False

    def _holder_dirs(self) -> set[str]:
        """The cgroup directories beside the VM partition named like holder groups
        (``STEM-…``, or systemd's ``STEM\\x2d….slice``), read from the cpuset mount."""
        top, v1 = self._cpuset_mount()
        if top is None:
            return set()
        shared = self.config.cgroup_v1 if v1 else self.config.cgroup_v2
        prefixes = self._holder_prefixes()
        try:
            with os.scandir(top / shared.rpartition("/")[0]) as entries:
                return {e.name for e in entries if e.name.startswith(prefixes)}
        except OSError:
            return set()

    def _holder_prefixes(self) -> tuple[str, str]:
        """How the names of holder groups begin: ``STEM-``, or systemd's ``STEM\\x2d``."""
        stem = self.config.exclusive_cgroup.removesuffix(".partition")
        return f"{stem}-", stem.replace("-", "\\x2d") + "\\x2d"  # systemd's escape of "-"

    def reap(self) -> tuple[HolderRecord, ...]:
        """Free the holders whose owner process is gone, and shrink the layout."""
        with self.locked():
            self._hand_on_dead()
            reaped = self.ledger().reap()
            if reaped:
                self._sync()
            return reaped

    def sync(self, *, shared_extra: CpuSet = EMPTY) -> Result | None:
        """Free the holders whose owner is gone, then make the kernel match the ledger
        (and put the host back as found once nothing is leased).  ``shared_extra``: CPUs
        outside the shared pool that a shared domain about to start is pinned to
        (honoured in ``none``/``isolcpus`` modes)."""
        return self.reap_and_sync(shared_extra=shared_extra)[1]

    def reap_and_sync(self, *, shared_extra: CpuSet = EMPTY
                      ) -> tuple[tuple[HolderRecord, ...], Result | None]:
        """:meth:`sync`, saying which holders it freed (one sync: the changes it reports
        include those their end made)."""
        with self.locked():
            self._hand_on_dead()
            reaped = self.ledger().reap()
            return reaped, self._sync(shared_extra=shared_extra)

    def set_owner(self, holder: HolderRef, pid: int | None) -> None:
        """Make process ``pid`` the lease's owner (QEMU at ``started``, a job's command).

        The owner's threads are the lease's own; those of the owner before it (libvirtd
        until ``started``), still running, are not any more.  Where the kernel may not guard
        the leased CPUs (a lease holding ``isolcpus=`` CPUs: no partition on Linux 6.12+,
        for any of its CPUs) and a thread of the previous owner may run on one, a sync
        moves it off, as it moves any other thread there (:meth:`_keep_off`); before, they
        stayed until the next change, and audit failed after a plain ``virsh start`` (lab
        hunt; and once host services were no longer given the isolated CPU, libvirtd on
        0-2 stayed on the lease's other CPU, 2, of 2-3)."""
        with self.locked():
            ledger = self.ledger()
            before = ledger.get(holder)
            ledger.set_owner(holder, pid)
            if before is None or before.owner_pid in (None, pid) or before.owner_elsewhere \
                    or not before.owner_runs():
                return
            # a holder group holding an isolated CPU may be a plain cpuset as a whole
            # (its other CPUs too: no partition at all), so every leased CPU counts
            leased = before.plan.leased()
            if leased & self.host().topology.isolated \
                    and _may_run_on(before.owner_pid, leased):
                self.sync()

    def hand_on(self, holder: HolderRef) -> int | None:
        """A holder whose owner process is gone while processes still run in its group —
        a job's command exited, processes it started run on; a domain's first owner
        (libvirtd at ``prepare``, a ``pinwarden start``) ended before QEMU took the lease
        over at ``started`` — the lease goes to the lowest of them (returned), for as long
        as they run.  Freed instead, it left the kernel holding the CPUs exclusively for
        them while status and audit said free, and a running VM lost its lease (hunts).
        None: nothing runs there (or nothing is enforced)."""
        with self.locked():
            return self._hand_on(holder)

    def _hand_on(self, holder: HolderRef) -> int | None:
        left = self.left_running(holder)
        if not left:
            return None
        with contextlib.suppress(LedgerError):  # exited meanwhile: the next one, next time
            self.ledger().set_owner(holder, left[0])
            return left[0]
        return None

    def _hand_on_dead(self) -> None:
        """:meth:`hand_on` for every holder whose owner is gone, before dead owners are
        reaped (the caller holds the lock)."""
        for gone in self.ledger().dead():
            with contextlib.suppress(PinwardenError):  # (unreadable: reaped as before)
                self._hand_on(gone.ref)

    def _group_tasks(self, path: str) -> set[int]:
        """Thread ids in cgroup ``path`` and below (none when it is gone).  On this host,
        from the kernel's tree: the systemd backend lists units only, and a domain's
        threads live below its scope (``…scope/libvirt/vcpu0``), so a holder group with a
        running domain read as empty there (systemd lab)."""
        from pinwarden.enforce.backend import CgroupOpError, join

        backend = self.backend()
        if self._own_backend and is_live_root(self.root):
            found = self._kernel_tasks(backend, path)
            if found is not None:
                return found
        try:
            state = backend.read_group(path)
            out = set(backend.tasks(path))
        except CgroupOpError:
            return set()
        for child in state.children:
            out |= self._group_tasks(join(path, child))
        return out

    def _kernel_tasks(self, backend: CgroupBackend, path: str) -> set[int] | None:
        """:meth:`_group_tasks` from the cpuset hierarchy's files (None: no such mount)."""
        from pinwarden.enforce.backend import kernel_path

        top, v1 = self._cpuset_mount()
        if top is None:
            return None
        name = "tasks" if v1 else "cgroup.threads"
        out: set[int] = set()
        for directory, _dirs, files in os.walk(top / kernel_path(backend, path).strip("/")):
            if name in files:
                with contextlib.suppress(OSError, ValueError):
                    out.update(int(t) for t in Path(directory, name).read_text().split())
        return out

    # -- internals ------------------------------------------------------------------------

    def _found(self, host: Host) -> HostRecord:
        """The host as found now, before the first lease changes anything."""
        found = read_vm_cgroup(self.root, self.config) \
            if self.config.mode in ("auto", "cgroup") and self._fixed_host is None \
            else VmCgroup(None, None, EMPTY)
        return HostRecord(time.time(), host.partition, found)

    def _sync(self, *, shared_extra: CpuSet = EMPTY) -> Result | None:
        """The sync itself; the caller holds the lock.

        On cgroup v2 with ``isolcpus=`` the host's own threads are read before its first
        cgroup write and put back after its last (:class:`_KeepHome`): enabling the cpuset
        controller, a partition coming or going, narrowing an escaped cgroup and restoring
        the controller each make the kernel hand tasks all of their cgroup's CPUs.  Then
        come host noise and the threads kept off unguarded leased CPUs, which must not be
        undone by that."""
        if not self.enforcing:
            return None
        ledger = self.ledger()
        backend = self.backend()
        leases = ledger.leases()
        keep = self._keep_home(backend) if leases or ledger.changes() else None
        if keep is not None:
            keep.take()
        try:
            result, host, kept = self._sync_cgroups(ledger, backend, leases, shared_extra)
        finally:
            if keep is not None:
                keep.put_back(ledger)
        held = CpuSet.of(lease.cpu for lease in leases)
        if kept:  # a kept group's CPUs are still held: noise stays off them (it moved
            # back while the forced-off domain ran there, and on cgroup v2 the kernel
            # clamped what was put back, kernel threads left narrowed for good: hunt)
            held |= CpuSet.of(lease.cpu for lease in self.kept_leases())
        self._isolate(ledger, host, held)
        v2 = backend.kind in ("v2", "systemd")
        self._keep_off(ledger, host, leases, _unguarded(result) if v2 else EMPTY)
        if not leases and not kept:
            ledger.clear_host_record()
        return result

    def _sync_cgroups(self, ledger: Ledger, backend: CgroupBackend,
                      leases: tuple[Lease, ...], shared_extra: CpuSet
                      ) -> tuple[Result, Host, bool]:
        """The cgroup side of :meth:`_sync`: the layout of ``leases`` (the ledger's)
        enforced, and the shared group and the controller put back after the last lease.
        Returns the result, the host it was planned on and whether a holder group had to be
        kept.  An edit of the shared group that lands after this pass looked for one and
        before its layout read the cgroups is not overwritten: the pass starts again, and
        takes it (the systemd story's ``set-property`` raced a pass of the daemon's and was
        put back without a word); the last try goes ahead as planned."""
        for attempt in range(EDIT_RETRIES + 1):
            try:
                return self._sync_cgroups_once(ledger, backend, leases, shared_extra,
                                               watch_edits=attempt < EDIT_RETRIES)
            except _EditedMeanwhile:
                continue
        raise AssertionError("unreachable")

    def _sync_cgroups_once(self, ledger: Ledger, backend: CgroupBackend,
                           leases: tuple[Lease, ...], shared_extra: CpuSet, *,
                           watch_edits: bool) -> tuple[Result, Host, bool]:
        """One try of :meth:`_sync_cgroups`; ``watch_edits``: raise
        :class:`_EditedMeanwhile`, before the layout's first write, when the shared group's
        CPUs are no longer those read at the start (leaving out leased CPUs, which the
        escape check takes from it itself)."""
        from pinwarden.enforce.apply import sync
        from pinwarden.enforce.backend import parent_of, sweep_twins
        from pinwarden.enforce.layout import desired_layout
        from pinwarden.partition import shared_edit

        record = ledger.host_record()
        names = self.names()
        key = SHARED_KEY.format(path=names.shared)
        found_changes = ledger.changes()
        kept_record = found_changes.get(key)
        cut_short = found_changes.get(INTERRUPTED_KEY)
        interrupted = _interrupted_writes(cut_short)
        leased = CpuSet.of(lease.cpu for lease in leases)
        seen = self._read_cpus(backend, names.shared) \
            if watch_edits and (leases or kept_record is not None) else None
        if kept_record is not None:  # before anything is planned against the record
            record = self._take_edit(ledger, backend, names.shared, kept_record, record,
                                     leased, pending=interrupted.get(names.shared))
        host = self._recorded_host(record)
        if leases and kept_record is None:
            # the shared group as found, before anything of this sync writes to it: the
            # escape check next narrows it when its cgroup file names a CPU about to be
            # leased, and that file is not what it was configured with on systemd hosts
            # (an empty AllowedCPUs, after an earlier release, reads every CPU there while
            # VMs run below: recorded so, the second release left AllowedCPUs=0-3)
            ledger.record_changes({key: self._shared_original(backend, names.shared)})
        if leases:  # before the layout: an escaped cgroup invalidates holder partitions
            wrote = self._close_escapes(ledger, host, leases, backend, names)
            if wrote is not None and seen is not None:
                seen = wrote  # pinwarden's own write is no edit (v2 lab: it was taken)
        changes = ledger.changes()
        restore: CpuSet | None = None
        drop = False
        if leases and CONTROLLER_KEY not in changes:
            self._record_controller(ledger, backend)
        shared_record = changes.get(key)
        if not leases and key in changes:
            restore, drop = self._restore_value(backend, names.shared, changes[key])
        v2 = backend.kind in ("v2", "systemd")
        holders = ledger.holders()
        isolated = frozenset(h.ref for h in holders if h.plan.isolated) if v2 else frozenset()
        # libvirt_lxc pins itself before it joins its cgroup: on v2 its group becomes a
        # partition once the container runs there (the ``started`` hook syncs)
        deferred = frozenset(h.ref for h in holders if h.ref.driver == "lxc") if v2 \
            else frozenset()
        originals = _follower_records(changes)
        desired = desired_layout(host, leases, names, shared_extra=shared_extra,
                                 restore_shared=restore, drop_shared=drop,
                                 keep_shared=not leases and key not in changes,
                                 isolated=isolated, deferred=deferred, originals=originals,
                                 interrupted={p: was for p, (was, _) in interrupted.items()})

        recorded = False  # whether a record of the write was made (to forget)

        def record_followers(before: Snapshot, goal: Targets) -> None:
            """Before the first write: the CPUs of each group below the shared one that has
            CPUs of its own (not its parent's) and no record yet, so that it follows its
            parent from them and gets them back (:func:`~pinwarden.enforce.layout._follow`);
            records of groups gone are dropped.  Not a VM's own groups: libvirt and
            pinwarden's re-pins change those while it runs (a record put a shared VM back
            on what it had before a give-back: the systemd lab's LXC story), and they
            follow their parent as before."""
            from pinwarden.audit import machine_name

            nonlocal recorded
            state = before.get(names.shared)
            if seen is not None and state is not None \
                    and shared_edit(seen, state.cpus, leased) is not None:
                # what the group held at the start is the yardstick of the next try (a
                # first lease recorded no write of pinwarden's yet, a failed sync forgot it)
                value = ledger.changes().get(key)
                if value is not None:
                    self._note_written(ledger, key, value, seen)
                raise _EditedMeanwhile
            # what this sync is about to write, with what each group held before (an
            # earlier cut-short write's "from" stays: the groups held it before pinwarden)
            writing = {path: (interrupted[path][0] if path in interrupted
                              else before[path].cpus, target.cpus)
                       for path, target in goal.want.items()
                       if path in before and target.cpus != before[path].cpus}
            if writing or interrupted:
                recorded = True
                ledger.put_changes({INTERRUPTED_KEY: json.dumps(
                    {path: {"from": was.to_list(), "to": to.to_list()}
                     for path, (was, to) in {**interrupted, **writing}.items()})})
            below = names.shared + "/"
            found: dict[str, str] = {}
            for path in goal.want if leases else ():
                if not path.startswith(below) or path in originals or any(
                        machine_name(c) is not None or c.endswith((".libvirt-qemu",
                                                                   ".libvirt-lxc"))
                        for c in path.split("/")):
                    continue
                state, above = before.get(path), before.get(parent_of(path) or "")
                if state is not None and above is not None and state.cpus \
                        and state.cpus != above.cpus:
                    found[FOLLOWER_PREFIX + path] = json.dumps({"cpus": state.cpus.to_list()})
            ledger.record_changes(found)
            ledger.forget_changes([FOLLOWER_PREFIX + p for p in originals if p not in before])

        try:
            result = sync(backend, desired, before_write=record_followers)
        except EnforceError as exc:
            # Rolled back: the shared group holds what it held before, and what pinwarden
            # had set there stays the yardstick (a set-property that raced this sync made
            # it fail — the systemd story saw it).  Not quite rolled back: what it holds
            # now is pinwarden's, half-way, and the next sync must not take it for an edit.
            if exc.partial and shared_record is not None:
                self._note_written(ledger, key, shared_record, None)
            if not exc.partial and recorded:  # back as before: so is what was cut short
                if cut_short is None:
                    ledger.forget_changes([INTERRUPTED_KEY])
                else:
                    ledger.put_changes({INTERRUPTED_KEY: cut_short})
            raise
        sweep_twins(backend, names.parent, names.is_holder)
        # A holder group that still has tasks is kept (a job's children outliving their
        # owner, a release of a running domain), and with it the shared group stays as
        # narrowed: the record of both is kept until a sync finds the group gone.
        still = result.desired.stale_paths(result.after) if result.desired is not None else []
        kept = not leases and bool(still)
        ledger.forget_changes([k for k in changes if k.startswith(KEPT_PREFIX)
                               and k.removeprefix(KEPT_PREFIX) not in still])
        if (leases or kept) and shared_record is not None:
            after = result.after.get(names.shared)
            self._note_written(ledger, key, shared_record,
                               after.cpus if after is not None else None)
        if not leases and not kept:
            if key in changes:
                self._put_flags_back(backend, names.shared, changes[key])
                self._remove_setting_files(backend, names.shared, changes[key])
            else:
                self._remove_left_own_files(backend, names.shared)
            ledger.forget_changes([key] if key in changes else [])
            ledger.forget_changes([k for k in changes if k.startswith(FOLLOWER_PREFIX)])
            self._restore_cgroups(ledger, backend, {k: v for k, v in changes.items()
                                                    if k != key})
            if CONTROLLER_KEY in changes:  # last: the cgroups above no longer need it
                self._restore_controller(backend, changes[CONTROLLER_KEY])
                ledger.forget_changes([CONTROLLER_KEY])
        # last: until the shared group's record says what it holds now (or is gone), the
        # record of the write tells pinwarden's own CPUs there from an edit (a kill in
        # between warned of "changed by someone else": kill hunt)
        if recorded or cut_short is not None:
            ledger.forget_changes([INTERRUPTED_KEY])
        return result, host, kept

    def _keep_home(self, backend: CgroupBackend) -> _KeepHome | None:
        """cgroup v2: what keeps the host's own threads off the ``isolcpus=`` CPUs, and the
        kernel threads where they were (with host noise isolation on), across a sync's
        cgroup writes (:class:`_KeepHome`); ``None`` where there is nothing to keep
        (cgroup v1, neither, no cgroup2 tree, or not this host's backend)."""
        if backend.kind not in ("v2", "systemd") or not self._own_backend \
                or self._fixed_host is not None or not is_live_root(self.root):
            return None
        from pinwarden import noise
        from pinwarden.mounts import read_mounts

        isolated = noise.read_isolated(self.root)
        mount = read_mounts(self.root).v2 if isolated or self.isolating else None
        return _KeepHome(self.root, mount, self.names(), isolated, kthreads=self.isolating) \
            if mount is not None else None

    def _close_escapes(self, ledger: Ledger, host: Host, leases: tuple[Lease, ...],
                       backend: CgroupBackend, names: LayoutNames) -> CpuSet | None:
        """cgroup v2: a cgroup beside a holder partition that names leased CPUs in its
        ``cpuset.cpus`` takes them, and the kernel invalidates the partition (Linux 6.1 to
        6.12+, DEVELOPERS.md "Escapes from partitions").  Narrow every such cgroup to its
        CPUs minus the leased ones (recording what it had, to put back when the leases
        end) and switch the holder partitions back on.  Returns the CPUs written to the
        shared group, if it was one of them (None: not written)."""
        if backend.kind not in ("v2", "systemd"):
            return None  # cgroup v1 refuses such a write (cpu_exclusive): nothing escapes
        from pinwarden.enforce import watch
        from pinwarden.enforce.backend import kernel_path, parent_of
        from pinwarden.enforce.layout import holder_group_path
        from pinwarden.escape import Revalidate, SetCpus, SetPartition, plan_narrowing
        from pinwarden.mounts import read_mounts
        from pinwarden.partition import shared_pool

        mount = read_mounts(self.root).v2
        if mount is None:
            return None
        groups = {kernel_path(backend, holder_group_path(names, lease.holder))
                  for lease in leases}
        parents = sorted({"", *(parent_of(g) or "" for g in groups)})
        views = watch.read_views(mount, parents, sorted(groups))
        leased = CpuSet.of(lease.cpu for lease in leases)
        pool = shared_pool(host, leased)[0]
        plan = plan_narrowing(views, leased, groups, pool, online=host.topology.online)
        if not plan.ops:
            return None
        before = {view.path: view for view in views}
        units = backend.kind == "systemd"
        ledger.record_changes({
            SHARED_KEY.format(path=op.path): json.dumps(
                {"cpus": before[op.path].cpus.to_list(),
                 "partition": before[op.path].partition,
                 **(self._setting_files(backend, op.path) if units and _is_unit(op.path)
                    else {})})
            for op in plan.ops if isinstance(op, SetCpus | SetPartition)})
        # The shared group is pinwarden's own: a new lease always finds it still naming
        # the CPU (it was in the shared pool until now), and the layout narrows it next.
        # Only a foreign cgroup is worth a warning.
        shared = kernel_path(backend, names.shared)
        wrote: CpuSet | None = None
        for op in plan.ops:
            if units and isinstance(op, SetCpus) and _is_unit(op.path):
                with contextlib.suppress(Exception):  # reported by the verify that follows
                    backend.set_cpus(op.path, op.cpus)
                    if op.path == shared:
                        wrote = op.cpus
            else:
                done = watch.apply_narrowing(mount, [op])
                if isinstance(op, SetCpus) and op.path == shared and done and done[0].ok:
                    wrote = op.cpus
                if isinstance(op, Revalidate) and done and done[0].ok and not done[0].skipped:
                    self.warn(f"holder partition /{op.path} was invalid (a cgroup beside it "
                              f"had taken its CPUs; the kernel does not check it again by "
                              f"itself): made a valid {op.word} partition again")
            if isinstance(op, SetCpus) and op.path != shared and \
                    not op.path.startswith(self._holder_prefixes()):
                # (a stale holder group of pinwarden's own — a dead job's, its supervisor
                # killed — is narrowed too, and the layout removes it: nothing to say)
                was = before[op.path].cpus
                kernel = ("which the kernel lets it use" if before[op.path].effective & leased
                          else "which the kernel keeps it off only while every holder "
                               "partition stays valid")
                self.warn(f"cgroup /{op.path} named leased {(was & leased).named()} "
                          f"in its cpuset.cpus ({was.to_list()}), {kernel}: narrowed to "
                          f"{op.cpus.to_list() or '(none)'}; it gets {was.to_list()} back "
                          f"when the last lease goes")
        return wrote

    def _restore_cgroups(self, ledger: Ledger, backend: CgroupBackend,
                         changes: dict[str, str]) -> None:
        """Nothing is leased: cgroups pinwarden narrowed because they named leased CPUs
        get what they had back."""
        from pinwarden.enforce.backend import CgroupOpError
        from pinwarden.mounts import read_mounts

        done: list[str] = []
        mount = read_mounts(self.root).v2
        for key, value in changes.items():
            if not key.startswith("cgroup:"):
                continue
            path = key.removeprefix("cgroup:")
            try:
                data = json.loads(value)
                cpus = CpuSet.parse_kernel(str(data["cpus"]))
                if path.startswith(self._holder_prefixes()) and \
                        (mount is None or not (mount / path).is_dir()):
                    pass  # pinwarden's own stale holder group, removed since: a slice's
                    # properties set again made systemd create its cgroup again, which
                    # nothing removed (systemd-lab hunt)
                elif backend.kind == "systemd" and _is_unit(path):
                    backend.set_cpus(path, cpus)
                    self._remove_setting_files(backend, path, value)
                elif mount is not None and (mount / path).is_dir():
                    (mount / path / "cpuset.cpus").write_text(cpus.to_list() + "\n")
                    word = data.get("partition", "member")
                    if word in ("root", "isolated"):
                        (mount / path / "cpuset.cpus.partition").write_text(word + "\n")
            except (OSError, ValueError, KeyError, PinwardenError, CgroupOpError):
                pass  # gone meanwhile, or refused: nothing left of ours to put back
            done.append(key)
        ledger.forget_changes(done)

    def _isolate(self, ledger: Ledger, host: Host, leased: CpuSet) -> None:
        """Host noise off ``leased`` (every CPU leased to anyone), and back where it was
        for CPUs no longer leased.  Each original value is recorded in the ledger before
        the first write to it, so a crash never loses one: the next sync puts it back."""
        if not self.isolating:
            return
        from pinwarden import isolation, noise

        housekeeping = host.partition.host_cpus
        records, refused = _noise_records(ledger)
        seen: isolation.NoiseSnapshot | None = None  # read again only after writing
        if records or (refused and not leased):
            seen = noise.read_noise(self.root)
            back = isolation.plan_restore(seen, records, leased, housekeeping)
            if back.writes:
                seen = None
            later = self._retry_later(noise.apply(self.root, back.writes))
            ledger.forget_changes([key for key in (*back.forget,
                                                   *(refused if not leased else ()))
                                   if key not in later])
            ledger.put_changes({r.key: json.dumps(r.to_json()) for r in back.keep})
        if not leased:
            return
        records, refused = _noise_records(ledger)
        snapshot = isolation.with_refusals(
            noise.read_noise(self.root) if seen is None else seen, refused)
        plan = isolation.plan_isolation(snapshot, leased, housekeeping, records)
        ledger.put_changes({r.key: json.dumps(r.to_json()) for r in plan.records})
        bad = noise.refused(noise.apply(self.root, plan.writes))
        if bad:  # the kernel keeps these (managed or per-CPU IRQs): remember not to retry
            # (one recorded but never moved — a kill between its record and its write —
            # holds its original still: refused like a new one; kept as recorded, audit
            # took it for an IRQ pinwarden should have moved, an error all lease long)
            now = snapshot.values(records)
            never = {key for key in bad if key in records
                     and now.get(key) == records[key].original}
            ledger.put_changes({key: json.dumps({"refused": True}) for key in bad
                                if key not in records or key in never})
            ledger.put_changes({key: json.dumps(records[key].to_json()) for key in bad
                                if key in records and key not in never})

    def _keep_off(self, ledger: Ledger, host: Host, leases: tuple[Lease, ...],
                  unguarded: CpuSet) -> None:
        """User threads outside every holder off the leased CPUs the kernel does not guard
        (``unguarded``: CPUs of holder groups that may not be partitions — ``isolcpus=``
        CPUs on Linux 6.12+), and back as they were once those CPUs are free.

        isolcpus keeps new tasks off such a CPU, but the kernel resets a task's affinity to
        its cpuset's CPUs whenever that cpuset changes (``systemctl set-property`` of a
        slice, a cgroup made or moved), and nothing then keeps it off a leased CPU.  Each
        thread's original affinity is recorded in the ledger before the first write; a
        thread whose affinity someone else changed meanwhile is left alone.  Only for the
        backend the manager opened on this host: a test's stand-in never moves its
        threads."""
        if not self._own_backend or self._fixed_host is not None \
                or not is_live_root(self.root):
            return
        from pinwarden import audit, isolation, noise

        records = {key: isolation.Record.from_json(json.loads(value))
                   for key, value in ledger.changes().items() if _is_task_key(key)}
        housekeeping = host.partition.host_cpus
        online = host.topology.online
        if records:
            tids = {int(key.split(":")[1]) for key in records}
            tasks = noise.read_tasks(self.root, tids)
            # threads their processes started meanwhile inherited the narrowed affinity
            tasks += noise.read_tasks(self.root, noise.threads_of(
                self.root, {t.tgid for t in tasks if t.tgid}) - tids)
            records.update(isolation.inherited(tasks, records))
            if any(r.original - unguarded != r.applied for r in records.values()):
                tasks += self._forked(ledger, records)  # CPUs go back: to them too
            snapshot = isolation.NoiseSnapshot(online, tasks=tasks)
            back = isolation.plan_restore(snapshot, records, unguarded, housekeeping)
            later = self._retry_later(noise.apply(self.root, back.writes))
            ledger.forget_changes([key for key in back.forget if key not in later])
            ledger.put_changes({r.key: json.dumps(r.to_json()) for r in back.keep})
            if not any(_is_task_key(k) for k in ledger.changes()):
                ledger.forget_changes([TASKS_SINCE_KEY])
        if not unguarded:
            return
        config = self.config
        report = audit.audit(
            audit.scan(self.root), leases, ledger.holders(),
            vm_partitions=tuple(dict.fromkeys((config.cgroup_v1, config.cgroup_v2,
                                               *audit.DEFAULT_VM_PARTITIONS))),
            holder_stems=tuple(dict.fromkeys((config.exclusive_cgroup,
                                              *audit.DEFAULT_HOLDER_STEMS))))
        # (and the threads of VMs outside the VM partition and every holder: a shared
        # domain in a <resource><partition> of its own, pinned live onto a leased CPU, ran
        # there and stayed: systemd-lab hunt on 6.12 with isolcpus=)
        strays = {i.tid: i for i in report.intruders
                  if (i.kind == "escaped-task" or (i.kind == "other-vm-thread" and
                      i.owner is None)) and i.tid is not None and i.cpus & unguarded}
        if not strays:
            return
        records = {key: isolation.Record.from_json(json.loads(value))
                   for key, value in ledger.changes().items() if _is_task_key(key)}
        snapshot = isolation.NoiseSnapshot(online,
                                           tasks=noise.read_tasks(self.root, strays))
        plan = isolation.plan_isolation(snapshot, unguarded, housekeeping, records)
        with contextlib.suppress(OSError, ValueError):  # first: no thread can predate it
            uptime = float((self.root / "proc/uptime").read_text().split()[0])
            ledger.record_changes({TASKS_SINCE_KEY: str(int(
                uptime * os.sysconf("SC_CLK_TCK")))})
        ledger.put_changes({r.key: json.dumps(r.to_json()) for r in plan.records})
        outcomes = noise.apply(self.root, plan.writes)
        failed = [o.key for o in outcomes if not o.ok]
        ledger.forget_changes([key for key in failed if key not in records])
        moved = sorted({strays[int(o.key.split(":")[1])].name or "?" for o in outcomes
                        if o.ok and int(o.key.split(":")[1]) in strays})
        if moved:
            self.warn(f"moved {sum(o.ok for o in outcomes)} thread(s) outside the holders "
                      f"off leased {unguarded.named()} (this kernel cannot make them "
                      f"a partition): {', '.join(moved[:8])}"
                      f"{' …' if len(moved) > 8 else ''}; they go back when the lease ends")

    def _forked(self, ledger: Ledger, records: dict[str, isolation.Record]
                ) -> tuple[isolation.TaskInfo, ...]:
        """The host's threads started since pinwarden first moved threads off unguarded
        leased CPUs that inherited a narrowed affinity (:func:`isolation.forked`): their
        records are added to ``records``, their threads returned for the restore."""
        from pinwarden import isolation, noise
        from pinwarden.mounts import read_mounts

        try:
            since = int(ledger.changes()[TASKS_SINCE_KEY])
        except (KeyError, ValueError):
            return ()
        mount = read_mounts(self.root).v2
        if mount is None:
            return ()
        try:
            host = noise.read_host_threads(self.root, mount,
                                           functools.partial(_vm_group, self.names())).users
        except (OSError, ValueError):
            return ()
        found = isolation.forked((h.task for h in host), records, since)
        records.update(found)
        return tuple(h.task for h in host if h.task.key in found)

    def _retry_later(self, outcomes: Sequence[Outcome]) -> dict[str, str]:
        """Restores that failed for the moment (:func:`noise.retry_later`): their records
        stay, and the next sync tries again; said once here."""
        from pinwarden import noise

        later = noise.retry_later(outcomes)
        if later:
            shown = ", ".join(f"{key} ({why})" for key, why in list(later.items())[:4])
            self.warn(f"could not put back {shown}{' …' if len(later) > 4 else ''} yet: "
                      f"the record is kept and 'pinwarden sync' tries again")
        return later

    def _shared_original(self, backend: CgroupBackend, path: str) -> str:
        """The shared group's configured CPUs as found, as a change record: absent (the
        group does not exist: pinwarden makes it, and removes it again), or its CPUs —
        none (inherit) for a cgroup v2 directory that has no cpuset files yet because its
        parent does not enable the controller (libvirt's ``machine`` on a host without
        systemd): recorded as absent, it was removed at the last release."""
        from pinwarden.enforce.backend import CgroupOpError, kernel_path, partition_flags
        from pinwarden.mounts import read_mounts

        try:
            cpus = backend.read_group(path).cpus
        except CgroupOpError as exc:
            if exc.errno != errno.ENOENT:
                raise EnforceError(f"cannot read cgroup {path}: {exc}") from None
            mount = read_mounts(self.root).v2 if backend.kind == "v2" else None
            if mount is not None and (mount / kernel_path(backend, path)).is_dir():
                return json.dumps({"cpus": ""})
            return json.dumps({"absent": True})
        # cgroup v1 flags other than a plain member's, which a lease would change
        flags = partition_flags(backend, path)
        plain = {"cpu_exclusive": False, "sched_load_balance": True}
        return json.dumps({"cpus": cpus.to_list(), **self._setting_files(backend, path),
                           **({"flags": flags} if flags not in (None, plain) else {})})

    @staticmethod
    def _record_controller(ledger: Ledger, backend: CgroupBackend) -> None:
        """Before the first lease's writes: does the root enable the cpuset controller
        already (cgroup v2 without systemd)?  Nothing to record on other backends."""
        from pinwarden.enforce.backend import CgroupOpError, cpuset_enabled

        try:
            enabled = cpuset_enabled(backend, "")
        except CgroupOpError:
            return  # unreadable: the mkdir that needs it says why
        if enabled is not None:
            ledger.record_changes({CONTROLLER_KEY: json.dumps({"enabled": enabled})})

    def _restore_controller(self, backend: CgroupBackend, record: str) -> None:
        """The last lease is gone: the cpuset controller pinwarden's first group turned on
        in the root's ``cgroup.subtree_control`` goes off again, unless somebody relies on
        it by now (libvirt's groups, a cpuset somebody set): then it is theirs."""
        from pinwarden.enforce.backend import CgroupOpError, disable_cpuset

        try:
            if json.loads(record).get("enabled") is not False:
                return
        except (ValueError, AttributeError):
            return
        try:
            disable_cpuset(backend, "")
        except CgroupOpError as exc:
            from pinwarden.mounts import read_mounts

            mount = read_mounts(self.root).v2 or Path("/sys/fs/cgroup")
            self.warn(f"could not turn the cpuset controller off again in the root's "
                      f"cgroup.subtree_control ({exc}); 'echo -cpuset > "
                      f"{mount / 'cgroup.subtree_control'}' does it")

    def _take_edit(self, ledger: Ledger, backend: CgroupBackend, path: str, value: str,
                   record: HostRecord | None, leased: CpuSet, *,
                   pending: tuple[CpuSet, CpuSet] | None = None) -> HostRecord | None:
        """Somebody else wrote the shared group's CPUs while pinwarden kept it narrowed
        (an administrator's ``echo``, a ``systemctl set-property``): the edit is made to
        what pinwarden puts back at the last release, and to the partition it plans
        against where the group decides it (:func:`~pinwarden.partition.edited_partition`).
        Overwritten silently, it was lost, and the last release undid it.  ``pending``:
        the CPUs the group had and was being given by a sync cut short
        (:data:`INTERRUPTED_KEY`): found there, they are pinwarden's own; where that sync
        failed to roll back (and what pinwarden last wrote is not known), an edit is told
        from the first (an administrator's ``set-property`` that landed in the middle of
        the event daemon's write was overwritten by its next pass without a word: systemd
        lab).  The host record as it is now."""
        from pinwarden.enforce.backend import CgroupOpError, kernel_path, parent_of
        from pinwarden.partition import edited_partition, shared_edit

        inherit = False  # set back to inherit its parent's CPUs ('systemctl revert')
        try:
            data = json.loads(value)
            if "set" not in data and pending is not None:
                data["set"] = pending[0].to_list()
            written = CpuSet.parse_kernel(str(data["set"]))
            now = backend.read_group(path).cpus
            own = CpuSet.parse_kernel(str(data["cpus"])) if "cpus" in data else None
            if not now and written and backend.kind in ("v2", "systemd"):
                # an empty setting is "inherit" there ('systemctl revert', 'AllowedCPUs='),
                # not "no CPUs": read so, the revert was "removed" CPUs, and the last
                # release left the group on the rest for good (systemd-lab hunt)
                if own is not None and not own:  # inheriting, as found: no edit of CPUs
                    self.warn(f"cgroup {path} was set back to inherit its parent's CPUs "
                              f"while CPUs are leased: pinwarden keeps it on "
                              f"{written.named()} until the last lease goes, and then it "
                              f"inherits them again, as found")
                    return record
                parent = parent_of(path)
                now = backend.read_group(parent).cpus if parent is not None else now
                inherit = own is not None
            edit = shared_edit(written, now, leased)
            if edit is None or record is None or (  # (its target, or the bridge to it)
                    pending is not None and now in (pending[1], pending[0] | pending[1])):
                return record
            if own is not None and not own:  # "inherit" (cgroup v2): its parent's CPUs
                parent = parent_of(path)
                own = record.found.cpus if record.found.name == kernel_path(backend, path) \
                    else backend.read_group(parent).cpus if parent is not None else EMPTY
        except (ValueError, KeyError, TypeError, AttributeError, PinwardenError,
                CgroupOpError):
            return record  # nothing written yet, or the group is gone: nothing to take
        was = own
        decides = self.config.mode in ("auto", "cgroup") and self._fixed_host is None \
            and record.found.name == kernel_path(backend, path)
        found, own = edited_partition(record.partition, record.found, own, edit,
                                      decides=decides)
        data["set"] = now.to_list()
        if inherit:
            # what goes back is "inherit", as the administrator set it: not the parent's
            # CPUs of now, which the last release wrote and kept in a drop-in until the
            # next boot, the housekeeping CPUs made VM CPUs (systemd-lab hunt); and the
            # drop-ins that held their setting are gone ('systemctl revert' removed them)
            own = EMPTY
            data["cpus"] = ""
            if "dropins" in data:
                data["dropins"] = []
        # (a group pinwarden made stays its own, removed at the end; one that inherited
        # its CPUs goes on inheriting them unless the edit changed them)
        if own is not None and own != was and not inherit:
            data["cpus"] = own.to_list()
            if "dropins" in data:  # systemd: the setting is the administrator's now, and
                # so is the runtime drop-in of a 'set-property --runtime' (kept at the
                # release, as after their own); one that still holds pinwarden's last write
                # is pinwarden's (their edit is persistent, in /etc): it goes (hunt)
                from pinwarden.enforce.backend import setting_file_cpus

                kept = [str(f) for f in data.get("dropins") or ()]
                theirs = setting_file_cpus(backend, path)
                if theirs is not None and theirs[1] != written and theirs[0] not in kept:
                    kept.append(theirs[0])
                data["dropins"] = kept
        amended = record if found == record.found else \
            replace(record, partition=self._load_host(found).partition, found=found)
        ledger.amend_host(amended, {SHARED_KEY.format(path=path): json.dumps(data)})
        change = ", ".join(f"{word} {cpus.named()}" for word, cpus in
                           (("added", edit.added), ("removed", edit.removed)) if cpus)
        before, after = record.partition, amended.partition
        back = ("; it inherits its parent's CPUs again when the last lease goes" if inherit
                else f"; it gets {own.to_list() or '(none)'} back when the last lease goes"
                if own is not None and own != was else "")
        if (after.mode, after.vm_cpus) != (before.mode, before.vm_cpus):
            outcome = (f"taken as your change of the VM partition, now {after.mode} (VM "
                       f"{after.vm_cpus.named(empty='CPUs -')})")
        else:
            outcome = (f"the VM partition stays {before.mode} (VM "
                       f"{before.vm_cpus.named(empty='CPUs -')}), and the group is set "
                       f"back to its share of it while CPUs are leased")
        self.warn(f"cgroup {path} was changed by someone else while CPUs are leased "
                  f"(pinwarden had set {written.to_list() or '(none)'}, it is "
                  f"{now.to_list() or '(none)'}: {change}): {outcome}{back}")
        return amended

    @staticmethod
    def _read_cpus(backend: CgroupBackend, path: str) -> CpuSet | None:
        """The CPUs of group ``path`` (its cgroup file), or None: it cannot be read."""
        from pinwarden.enforce.backend import CgroupOpError

        try:
            return backend.read_group(path).cpus
        except (CgroupOpError, PinwardenError):
            return None

    @staticmethod
    def _note_written(ledger: Ledger, key: str, value: str, cpus: CpuSet | None) -> None:
        """Keep, in the shared group's change record (``key``, now ``value``), the CPUs
        pinwarden left the group with (``cpus``, as read back) — how the next sync tells
        somebody else's edit (:meth:`_take_edit`); ``cpus`` None: a sync failed, and they
        are not known."""
        try:
            data = json.loads(value)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        written = cpus.to_list() if cpus is not None else None
        if data.get("set") != written:
            if written is None:
                del data["set"]
            else:
                data["set"] = written
            ledger.put_changes({key: json.dumps(data)})

    def _put_flags_back(self, backend: CgroupBackend, path: str, record: str) -> None:
        """cgroup v1: the shared group's CPUs are back; its ``cpu_exclusive`` and
        ``sched_load_balance`` go back to what the change ``record`` says they were (a lease
        makes it a plain member, which an administrator's ``cpu_exclusive`` ``machine`` was
        not)."""
        from pinwarden.enforce.backend import CgroupOpError, put_flags

        try:
            flags = json.loads(record).get("flags")
        except (ValueError, AttributeError):
            return
        if not isinstance(flags, dict):
            return  # another backend, or recorded by an older pinwarden
        wanted = {str(k): bool(v) for k, v in flags.items()}
        try:
            put_flags(backend, path, wanted)
        except CgroupOpError as exc:
            said = " ".join(f"{k}={int(v)}" for k, v in wanted.items())
            self.warn(f"cgroup {path} has its CPUs back, but not its flags as found "
                      f"({said}): {exc}; write them by hand")

    def _setting_files(self, backend: CgroupBackend, path: str) -> dict[str, list[str]]:
        """The backend's setting files of ``path`` before pinwarden writes, for the change
        record (``{"dropins": [...]}`` on systemd hosts; nothing where the settings live in
        the cgroup alone, or where they cannot be read: then none is ever removed)."""
        from pinwarden.enforce.backend import CgroupOpError, setting_files

        try:
            files = setting_files(backend, path)
        except CgroupOpError as exc:
            self.warn(f"cannot list the drop-ins of {path} ({exc}): the ones pinwarden's "
                      f"settings add will stay after the last release")
            return {}
        return {} if files is None else {"dropins": list(files)}

    def _remove_setting_files(self, backend: CgroupBackend, path: str, record: str) -> None:
        """The original value of ``path`` is back: remove the setting files pinwarden's
        writes added (those not in the change ``record``)."""
        from pinwarden.enforce.backend import CgroupOpError, remove_setting_files

        try:
            keep = json.loads(record).get("dropins")
        except (ValueError, AttributeError):
            keep = None
        # not a list (recorded by an older pinwarden, or not listable): only the files
        # the backend names as its own go
        try:
            remove_setting_files(backend, path,
                                 [str(k) for k in keep] if isinstance(keep, list) else None)
        except CgroupOpError as exc:
            self.warn(f"{path} has its CPUs back, but pinwarden {exc.detail or exc}: "
                      f"remove it by hand, then 'systemctl daemon-reload'")

    def _remove_left_own_files(self, backend: CgroupBackend, path: str) -> None:
        """Nothing is leased and pinwarden has no record of changing ``path``: a drop-in of
        its own still there (``zz-pinwarden-AllowedCPUs.conf`` on systemd hosts) was left
        by a pinwarden that did not know the file — a downgrade while CPUs were leased —
        or whose records were lost, and would narrow the unit again at every
        ``daemon-reload`` until the next boot.  Removed, and said."""
        from pinwarden.enforce.backend import CgroupOpError, remove_setting_files

        try:
            removed = remove_setting_files(backend, path, None)
        except CgroupOpError as exc:
            self.warn(f"nothing is leased, but pinwarden {exc.detail or exc}: remove it by "
                      f"hand, then 'systemctl daemon-reload'")
            return
        if removed:
            unit = PurePosixPath(removed[0]).parent.name.removesuffix(".d")
            self.warn(f"removed {', '.join(removed)}: pinwarden's drop-in, left from "
                      f"CPUs leased earlier (nothing is leased now, and no record of it "
                      f"was kept); if systemd loaded it, {unit} gets its own setting back "
                      f"at the next 'systemctl daemon-reload'")

    @staticmethod
    def _restore_value(backend: CgroupBackend, path: str, original: str,
                       ) -> tuple[CpuSet, bool]:
        """What the shared group goes back to: its recorded CPUs; a group pinwarden
        created (it was absent) is removed when nothing lives there, else it gets its
        parent's CPUs, as libvirt would have made it.  (CPUs, remove if empty)"""
        from pinwarden.enforce.backend import CgroupOpError, parent_of

        try:
            data = json.loads(original)
            if data.get("absent"):
                parent = parent_of(path)
                cpus = backend.read_group(parent).cpus if parent is not None else EMPTY
                return cpus, True
            return CpuSet.parse_kernel(str(data["cpus"])), False
        except (ValueError, KeyError, AttributeError, PinwardenError, CgroupOpError) as exc:
            raise LedgerError(f"the recorded original CPUs of cgroup {path} are unreadable "
                              f"({exc}); set them by hand and 'pinwarden sync'") from None


def _vm_group(names: LayoutNames, path: str) -> bool:
    """``path`` (as ``/proc/PID/cgroup`` shows it) is the VM partition, a holder group or
    below one: their threads are placed by libvirt and pinwarden, not the host's own."""
    parts = path.strip("/").split("/")
    return any(p == names.shared or names.is_holder(p)
               for p in ("/".join(parts[:n]) for n in range(1, len(parts) + 1)))


class _KeepHome:
    """The host's own threads (outside the VM partition and the holder groups) where they
    were across one sync: :meth:`take` reads them before its first cgroup write,
    :meth:`put_back` reads them again after its last and gives those that had their
    cgroup's CPUs less the ``isolcpus=`` ones exactly that again
    (:func:`~pinwarden.isolation.plan_keep_home`: the kernel hands every task of a cgroup
    whose CPUs change all of them, and PID 1 with every service had been kept off the
    isolated CPUs only by the mask the kernel gave PID 1 at boot).  With ``kthreads`` the
    kernel threads too: the root's tasks get every CPU no partition holds whenever one
    comes or goes, NUMA-local ``kswapd1`` included
    (:func:`~pinwarden.isolation.plan_kthreads_home`)."""

    def __init__(self, root: Path, mount: Path, names: LayoutNames, isolated: CpuSet, *,
                 kthreads: bool = False) -> None:
        self.root = root
        self.mount = mount
        self.names = names
        self.isolated = isolated
        self.kthreads = kthreads
        self.before: noise.HostThreads | None = None

    def _read(self, *, users: bool, kthreads: bool) -> noise.HostThreads:
        from pinwarden import noise

        return noise.read_host_threads(self.root, self.mount,
                                       functools.partial(_vm_group, self.names),
                                       users=users, kthreads=kthreads)

    def take(self) -> None:
        from pinwarden import noise

        if self.before is None:
            try:  # never fails the sync
                self.before = self._read(users=bool(self.isolated), kthreads=self.kthreads)
            except (OSError, ValueError):
                self.before = noise.HostThreads()

    def put_back(self, ledger: Ledger) -> None:
        """The host's threads put back; with ``kthreads`` (host noise isolation on, whose
        restore gives narrowed kernel threads their CPUs back when the lease ends) the
        kernel threads too, each one narrowed recorded in ``ledger`` first."""
        from pinwarden import isolation, noise

        before = self.before
        if before is None or not (before.users or before.kthreads):
            return
        try:
            after = self._read(users=bool(before.users), kthreads=bool(before.kthreads))
        except (OSError, ValueError):
            return
        if before.users:
            noise.apply(self.root, isolation.plan_keep_home(before.users, after.users,
                                                            self.isolated))
        if after.kthreads:
            recorded, _refused = _noise_records(ledger, prefix="kthread:")
            plan = isolation.plan_kthreads_home(before.kthreads, after.kthreads, recorded)
            ledger.put_changes({r.key: json.dumps(r.to_json()) for r in plan.records})
            noise.apply(self.root, plan.writes)


def _interrupted_writes(value: str | None) -> dict[str, tuple[CpuSet, CpuSet]]:
    """The groups a cut-short sync was writing (:data:`INTERRUPTED_KEY`'s record ``value``):
    each path's CPUs before it and the CPUs it was writing.  Unreadable entries are left
    out (the half-written state is then judged as it is, as before the record existed)."""
    if value is None:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    found: dict[str, tuple[CpuSet, CpuSet]] = {}
    for path, entry in (data.items() if isinstance(data, dict) else ()):
        try:
            found[str(path)] = (CpuSet.parse_kernel(str(entry["from"])),
                                CpuSet.parse_kernel(str(entry["to"])))
        except (TypeError, KeyError, ValueError, PinwardenError):
            continue
    return found


def _follower_records(changes: Mapping[str, str]) -> dict[str, CpuSet]:
    """The originals of :data:`FOLLOWER_PREFIX` records, by path (an unreadable one is
    left out: that group follows its parent as one without a record does)."""
    out: dict[str, CpuSet] = {}
    for key, value in changes.items():
        if key.startswith(FOLLOWER_PREFIX):
            try:
                out[key.removeprefix(FOLLOWER_PREFIX)] = \
                    CpuSet.parse_kernel(str(json.loads(value)["cpus"]))
            except (ValueError, KeyError, TypeError, PinwardenError):
                continue
    return out


def _noise_records(ledger: Ledger, prefix: str = ""
                   ) -> tuple[dict[str, isolation.Record], frozenset[str]]:
    """The ledger's records of :mod:`pinwarden.isolation` (those whose key starts with
    ``prefix``), and the keys recorded as refused by the kernel (never retried)."""
    from pinwarden import isolation

    records: dict[str, isolation.Record] = {}
    refused: set[str] = set()
    for key, value in ledger.changes().items():
        if not _is_noise_key(key) or not key.startswith(prefix):
            continue
        data = json.loads(value)
        if data.get("refused"):
            refused.add(key)
        else:
            records[key] = isolation.Record.from_json(data)
    return records, frozenset(refused)


@contextlib.contextmanager
def state_lock(state_dir: Path, name: str, *, wait: float | None = None) -> Iterator[None]:
    """Hold the lock file ``locks/NAME.lock`` of the state directory (waiting for it): the
    locks beside the manager's that adapters take around libvirt calls, which must not
    hold the manager's own (libvirtd's hook, which takes it, may be what they wait for).
    ``wait``: at most that many seconds, then :class:`TimeoutError`."""
    locks = state_dir / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LedgerError(f"cannot create a lock in {locks}: {exc.strerror} "
                          f"({state_dir_advice(exc)})") from None
    try:
        if wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{name} is still locked after {wait:g} s") \
                            from None
                    time.sleep(min(0.2, left))
        yield
    finally:
        os.close(fd)


def domain_lock(state_dir: Path, holder: HolderRef, *, wait: float | None = None,
                ) -> contextlib.AbstractContextManager[None]:
    """Serialise pinwarden start/stop of one domain: two racing starts would otherwise
    share one lease and the loser's rollback would free the winner's CPUs; and the
    give-back a ``release`` of the domain leaves behind waits for the start or stop that
    caused it.  (Not the manager's lock: the hook, run by libvirtd inside the start, takes
    that one.)  ``wait``: as for :func:`state_lock`."""
    return state_lock(state_dir, f"{holder.driver}-{holder.key.replace(':', '-')}",
                      wait=wait)


def _is_unit(path: str) -> bool:
    """A cgroup systemd owns (its last component names a unit)."""
    return path.rpartition("/")[2].endswith((".slice", ".scope", ".service"))


def _is_noise_key(key: str) -> bool:
    """Change records of :mod:`pinwarden.isolation` (``irq:N``, ``irq-default``,
    ``workqueue``, ``kthread:PID:START``), not the cgroup ones."""
    return key in ("irq-default", "workqueue") or key.startswith(("irq:", "kthread:"))


def _may_run_on(pid: int, cpus: CpuSet) -> bool:
    """Whether a thread of process ``pid`` may run on one of ``cpus`` (its affinity)."""
    from pinwarden.enforce.affinity import threads_of

    for tid in threads_of(pid):
        try:
            if not cpus.cpus.isdisjoint(os.sched_getaffinity(tid)):
                return True
        except OSError:  # exited meanwhile
            continue
    return False


def _is_task_key(key: str) -> bool:
    """Change records of user threads pinwarden moved off unguarded leased CPUs."""
    return key.startswith("task:")


def _unguarded(result: Result | None) -> CpuSet:
    """CPUs of holder groups the layout had to make plain cpusets on cgroup v2 (no
    partition may hold them: ``isolcpus=`` CPUs on Linux 6.12+): nothing in the kernel
    keeps other tasks' affinity off them."""
    if result is None or result.desired is None:
        return EMPTY
    return CpuSet.of(cpu for spec in result.desired.holders
                     if spec.partition == "member" and not spec.when_populated
                     for cpu in spec.cpus)


def is_live_root(root: Path) -> bool:
    """``root`` is this host (``/``): the only host pinwarden changes."""
    try:
        return root.resolve() == Path("/")
    except OSError:
        return False
