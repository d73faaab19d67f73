"""``pinwarden start/stop/define``: the libvirt orchestration, with rollback.

Start of an exclusive domain, in order (each step undone if a later one fails):

1. the lease manager plans and leases in one transaction (``policy.decide``), which also
   computes the live re-pins of running shared domains (:mod:`.repin`) and refuses when a
   domain's own pins would be left without a CPU, then enforces the cgroup layout
   (``<exclusive>/vm-NAME.partition`` exclusive with the lease, ``machine`` and the shared
   domains' groups moved to the shared pool);
3. re-pin those domains live (``virDomainPinVcpuFlags``/``PinEmulator``/``PinIOThread``)
   so libvirt's view and the threads' affinity match the cgroups;
4. start the domain with ``virDomainCreateXML(render_plan(persistent XML, plan,
   partition=/…/vm-NAME))``: the live definition is the plan, the stored one is untouched;
5. record the QEMU process as the lease's owner and the cgroup, then verify the kernel's
   view (exclusive flag, effective CPUs, affinity of every QEMU thread and vCPU).

Shared domains are planned (default placement = VM CPUs − leased) and started with the
plan's pins in their usual partition; nothing is leased.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid as uuidlib
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree as ET

import defusedxml.ElementTree as SafeET

from pinwarden import procs
from pinwarden.cpuset import CpuSet
from pinwarden.domain import PW_NS, DomainSpec, parse_domain, render_plan
from pinwarden.errors import InputError, LedgerError, LibvirtError, PinwardenError, Refusal
from pinwarden.interrupts import EndedAfterChange, InterruptedAfterChange, ending_unwinds
from pinwarden.libvirt import connect as lv
from pinwarden.libvirt import kernel, pins
from pinwarden.libvirt.hook import admit_shared
from pinwarden.libvirt.repin import ExclusivePlanner, placed_narrower, replanned
from pinwarden.libvirt.state import Repin
from pinwarden.manager import Manager, domain_lock
from pinwarden.model import (
    HolderRef,
    Plan,
    command_line,
    domain_holder,
    driver_of_type,
)
from pinwarden.narrowed import narrowed_key
from pinwarden.partition import shared_pool
from pinwarden.record import field, record, replace

_HOOK_FAILURE = re.compile(r"unexpected exit status \d+: (.*)$")


@record
class Started:
    name: str
    uuid: str
    plan: Plan
    pid: int | None
    cgroup: str | None
    repins: tuple[Repin, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.name, "uuid": self.uuid, "pid": self.pid,
                "cgroup": self.cgroup, "plan": self.plan.to_json(),
                "repinned": [{"domain": r.domain, "thread": r.label, "from": str(r.before),
                              "to": str(r.after)} for r in self.repins],
                "notes": list(self.notes)}


def libvirt_failure(what: str, exc: BaseException) -> LibvirtError:
    """A libvirt error in one line; a refusing hook's own message is shown as it is."""
    text = lv.message_of(exc)
    hook = _HOOK_FAILURE.search(text)
    if "Hook script execution failed" in text and hook:
        return LibvirtError(f"{what}: the libvirt hook refused: "
                            f"{hook.group(1).removeprefix('pinwarden: error: ')}",
                            code="hook-refused")
    return LibvirtError(f"{what}: {text}")


def _holder(conn: Any, dom: Any) -> HolderRef:
    """The holder of ``dom``, by the driver of the URI libvirt resolved for ``conn``."""
    return domain_holder(lv.driver_of(str(conn.getURI())), str(dom.name()),
                         str(dom.UUIDString()).lower())


# -- start --------------------------------------------------------------------------------

def start(manager: Manager, uri: str, name: str, *, conn: Any = None) -> Started:
    """Start domain ``name``; ``conn``: an open connection to ``uri`` to use (kept open),
    else one is opened and closed."""
    if conn is not None:
        return _start(manager, uri, conn, name)
    conn = lv.open_connection(uri)
    try:
        return _start(manager, uri, conn, name)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _start(manager: Manager, uri: str, conn: Any, name: str) -> Started:
    dom = lv.lookup(conn, name)
    if dom.isActive():
        raise Refusal(f"domain {name!r} is already running; stop it first "
                      f"({command_line('pinwarden stop', name)})", code="running")
    holder = _holder(conn, dom)
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(domain_lock(manager.state_dir, holder))
    except LedgerError as exc:  # (a read-only or full state directory, say)
        if parse_domain(lv.xml_of(dom, inactive=True, secure=True)).exclusive:
            raise
        _no_managed_save(dom, name, exclusive=False)
        return _start_unchecked(conn, dom, holder, exc)
    with lock:
        if dom.isActive():  # started by a racing 'pinwarden start' while we waited
            raise Refusal(f"domain {name!r} is already running", code="running")
        xml = lv.xml_of(dom, inactive=True, secure=True)  # booted from: passwords too
        spec = parse_domain(xml)
        _no_managed_save(dom, name, exclusive=spec.exclusive)
        if spec.exclusive:
            # SIGTERM and SIGHUP undo the start as an error does, then end the process
            with ending_unwinds():
                return _start_exclusive(manager, conn, holder, spec, xml)
        try:
            return _start_shared(manager, conn, holder, spec, xml)
        except _LedgerDown as down:
            return _start_unchecked(conn, dom, holder, down.error)


class _LedgerDown(Exception):
    """The lease database (or state directory) failed a shared start before libvirt was
    asked: the domain starts as the hook's fail-safe lets it (:func:`_start_unchecked`)."""

    def __init__(self, error: LedgerError) -> None:
        super().__init__(error.message)
        self.error = error


def _start_unchecked(conn: Any, dom: Any, holder: HolderRef, error: LedgerError) -> Started:
    """A shared domain started while pinwarden cannot use its lease database (a full or
    read-only file system, a damaged file): as libvirt places it — as the hook lets such a
    domain through when pinwarden fails — with a warning, rather than not at all: it asks
    for nothing exclusive, and pinwarden being broken must not keep it off (durability
    hunt).  The kernel keeps it off leased CPUs still (their holder groups, the narrowed
    VM partition)."""
    b = lv.binding()
    try:
        dom.create()
    except b.libvirtError as exc:
        raise libvirt_failure(f"libvirt could not start domain {holder.name!r}", exc) \
            from None
    pid = lv.read_pid(holder.driver, holder.name)
    spec = parse_domain(lv.xml_of(dom, inactive=False, secure=False))
    runs = CpuSet()
    if pid is not None:
        with contextlib.suppress(OSError):
            runs = CpuSet.of(os.sched_getaffinity(pid))
    plan = Plan(holder.name, spec.uuid, False,
                vcpus={v: spec.vcpupins.get(v, runs) for v in range(spec.vcpus)},
                emulator=spec.emulatorpin or runs)
    return Started(holder.name, holder.uuid or "", plan, pid, kernel.domain_cgroup(pid),
                   notes=(f"pinwarden cannot use its lease database ({error.message}); "
                          f"started shared domain {holder.name!r} unchecked, where libvirt "
                          f"places it (as the hook lets shared domains through then); "
                          f"'pinwarden sync' places it once the database works again",))


def _no_managed_save(dom: Any, name: str, *, exclusive: bool) -> None:
    """``pinwarden start`` boots a domain from its definition (``createXML``): one with a
    managed save image was cold-booted, its saved guest state thrown away and the image
    kept, for a later ``virsh start`` to restore over disks that changed meanwhile (hunt).
    Refused instead, before anything is reserved, saying how to restore or discard it."""
    b = lv.binding()
    try:
        saved = bool(dom.hasManagedSaveImage(0))
    except b.libvirtError as exc:
        raise libvirt_failure(f"cannot tell whether domain {name!r} has a managed save "
                              f"image", exc) from None
    if saved:
        hook = " (with pinwarden's hook installed: it leases its CPUs again)" \
            if exclusive else ""
        raise Refusal(
            f"domain {name!r} has a managed save image (its saved running state): "
            f"{command_line('virsh start', name)} restores it{hook}, or "
            f"{command_line('virsh managedsave-remove', name)} discards it and "
            f"{command_line('pinwarden start', name)} then boots it afresh",
            code="managed-save")


@record
class StartPreview:
    """What ``pinwarden start NAME`` would do (``--dry-run``)."""

    name: str
    plan: Plan
    cgroup_writes: tuple[str, ...]
    libvirt_calls: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.name, "dry_run": True, "plan": self.plan.to_json(),
                "cgroup_writes": list(self.cgroup_writes),
                "libvirt_calls": list(self.libvirt_calls), "notes": list(self.notes)}


def preview_start(manager: Manager, uri: str, name: str) -> StartPreview:
    """The plan, the cgroup writes and the libvirt calls of ``pinwarden start NAME``, in
    order; nothing is recorded, written or started."""
    conn = lv.open_connection(uri)
    try:
        dom = lv.lookup(conn, name)
        if dom.isActive():
            raise Refusal(f"domain {name!r} is already running; stop it first "
                          f"({command_line('pinwarden stop', name)})", code="running")
        holder = _holder(conn, dom)
        spec = parse_domain(lv.xml_of(dom, inactive=True))
        _no_managed_save(dom, name, exclusive=spec.exclusive)
        if not spec.exclusive:
            plan = manager.plan(spec, holder=holder)
            return StartPreview(name, plan, (), (
                f"create domain {name} from its definition with every thread on "
                f"{plan.cpus().named()} (<vcpu cpuset>)",), plan.notes)
        partition = manager.libvirt_partition(holder)
        planner = ExclusivePlanner(spec, holder, lv.list_domains(conn, active_only=True))
        seen = manager.preview(holder, planner)
        calls = [f"re-pin running domain {move} (live)" for move in planner.moves]
        calls.append(f"create domain {name} from its definition with its plan "
                     f"({seen.plan.cpus().named()}) in partition {partition}")
        return StartPreview(name, seen.plan, seen.writes, tuple(calls),
                            (*seen.plan.notes, *seen.notes))
    finally:
        with contextlib.suppress(Exception):
            conn.close()


#: Times a shared start is planned again when an exclusive reservation took CPUs of its
#: plan while libvirt created it.
SHARED_ATTEMPTS = 3


def _start_shared(manager: Manager, conn: Any, holder: HolderRef, spec: DomainSpec,
                  xml: str) -> Started:
    """A shared domain on the CPUs not leased now.  Nothing holds that plan until the domain
    runs: an exclusive reservation made meanwhile (another 'pinwarden start', a plain
    'virsh start' through the hook) narrows the VM partition, and libvirt's write of the
    plan into the new domain's cgroups fails (cgroup v1: EACCES), or the domain starts
    confined to fewer CPUs than planned.  The start failed, or pinwarden stopped the domain
    it had just started (hunt): a shared domain must start while there are CPUs for it.
    Now it is planned again from the leases of that moment: a failed create is retried,
    and a running domain's pins follow the new plan."""
    for attempt in range(1, SHARED_ATTEMPTS + 1):
        try:
            admit_shared(manager, spec, holder)
            plan = manager.plan(spec, holder=holder)
        except LedgerError as exc:
            if attempt > 1:
                raise
            raise _LedgerDown(exc) from None
        # the placement the leases narrow, recorded before the domain starts with it (a
        # kill between the start and the record left it narrowed for good: crash hunt);
        # recorded again below for the plan it ends with
        with contextlib.suppress(PinwardenError):
            _note_narrower(manager, spec, plan, holder)
        try:
            dom = _create(conn, holder, render_plan(xml, plan))
            break
        except LibvirtError as exc:
            runs = _runs_anyway(holder)
            if runs is not None:
                raise LibvirtError(
                    f"{exc.message}; but domain {holder.name!r} was running when it did "
                    f"(process {runs}: started by another call, or by libvirtd after it "
                    f"lost this one; {_still_runs(holder)})", code=exc.code) from None
            if attempt == SHARED_ATTEMPTS or manager.plan(spec, holder=holder) == plan:
                raise  # (the leases did not change: the failure is the domain's own)
    try:
        pid = lv.read_pid(holder.driver, holder.name)
        problems = kernel.check_domain(dom, pid, plan)
        if problems:
            plan, problems = _follow_the_leases(manager, conn, holder, spec, dom, pid, plan,
                                                problems)
        if problems:
            raise Refusal(f"domain {holder.name!r} started but the kernel does not confine "
                          f"it to its plan: {problems[0]}; stopped it", code="verify")
    except BaseException:
        with contextlib.suppress(PinwardenError):
            lv.destroy(conn, holder.name)
        raise
    with contextlib.suppress(PinwardenError):  # the CPUs leased now, given back later
        # recorded whatever the leases are now: one that ended since the plan was made
        # (its give-back already ran) left the domain narrowed for good (hunt)
        if _note_narrower(manager, spec, plan, holder) and not manager.leases(kept=True):
            pins.give_back(manager, conn)
    return Started(holder.name, holder.uuid or "", plan, pid, kernel.domain_cgroup(pid),
                   notes=plan.notes)


def _follow_the_leases(manager: Manager, conn: Any, holder: HolderRef, spec: DomainSpec,
                       dom: Any, pid: int | None, plan: Plan,
                       problems: list[str]) -> tuple[Plan, list[str]]:
    """A shared domain whose threads are not within its plan: when the leases changed
    since the plan was made (an exclusive reservation narrowed the VM partition under the
    starting domain), its live pins follow the plan of now, and it is checked against that;
    else the problems stand."""
    now = manager.plan(spec, holder=holder)
    if now == plan:
        return plan, problems
    with pins.locked(manager):
        for move in replanned(holder.name, holder.uuid or "", plan, now):
            lv.apply_repin(conn, move)
    return now, kernel.check_domain(dom, pid, now)


#: What to do when libvirt's processes are out of this PID namespace's view.
_ELSEWHERE_HINT = ("run 'pinwarden start' where libvirtd runs (the host's PID namespace), or "
                   "start it with 'virsh start': the libvirt hook places it")


def _start_exclusive(manager: Manager, conn: Any, holder: HolderRef, spec: DomainSpec,
                     xml: str) -> Started:
    partition = manager.libvirt_partition(holder)
    running = lv.list_domains(conn, active_only=True)
    elsewhere = lv.out_of_view(holder.driver, [d.name for d in running
                                               if d.driver == holder.driver])
    if elsewhere is not None:
        # the shared domains' threads read as none: no re-pin was planned, and the layout
        # narrowed their vCPU groups to nothing (ENOSPC); QEMU could not own the lease
        # either (namespace hunt)
        raise Refusal(f"the processes of libvirt's domains are out of this PID namespace's "
                      f"view (domain {elsewhere[0]!r} runs as pid {elsewhere[1]} where "
                      f"libvirtd runs, not here): pinwarden could not see their threads nor "
                      f"own the lease of {holder.name!r}; {_ELSEWHERE_HINT}; nothing was "
                      f"changed", code="pid-namespace")
    planner = ExclusivePlanner(spec, holder, running)
    # The manager enforces the layout before returning: the kernel moves every shared
    # domain's cgroups off the lease (and may need to widen machine before, e.g. from the
    # pool to the fallback CPUs); then libvirt's live pins follow, so its view and the
    # threads' own affinity agree with the cgroups.
    # Owned by this process until QEMU runs: if pinwarden start dies half-way, the lease
    # is reaped; the hook's ``started`` (inside createXML) hands it to QEMU.
    try:
        reserved = manager.reserve(holder, planner, owner_pid=os.getpid())
    except InterruptedAfterChange as exc:
        # Ctrl-C, SIGTERM or SIGHUP while it leased: the lease and the layout were made, and
        # stayed — the host narrowed for a domain that never started — until the next
        # command reaped the dead reservation (real-libvirt hunt)
        _rollback(manager, conn, holder, False, (), {})
        if isinstance(exc, EndedAfterChange):
            raise
        raise KeyboardInterrupt(f"before domain {holder.name!r} started (its CPUs are free "
                                f"again)") from None
    plan = reserved.plan
    done: list[Repin] = []
    replaced: dict[str, str | None] = {}
    started = False
    try:
        with pins.locked(manager):
            # recorded before they are made (given back when the CPUs are free): a kill
            # between a re-pin and its record left the domain narrowed for good, where a
            # record of a re-pin not made is forgotten by the give-back (crash hunt)
            replaced = pins.note_moves(manager, planner.moves)
            for move in planner.moves:
                if lv.apply_repin(conn, move):  # (False: that domain stopped meanwhile)
                    done.append(move)
        dom = _create(conn, holder, render_plan(xml, plan, partition=partition))
        started = True
        pid = lv.read_pid(holder.driver, holder.name)
        if pid is not None and procs.start_time(pid) is None and dom.isActive():
            # its QEMU runs where libvirtd does, out of view: this process stayed the
            # owner, and the lease went when it ended, while the domain ran (namespace hunt)
            raise Refusal(f"domain {holder.name!r} started, but its process (pid {pid} "
                          f"where libvirtd runs) is out of this PID namespace's view: "
                          f"pinwarden could not own its lease; stopped it and freed the "
                          f"lease; {_ELSEWHERE_HINT}", code="pid-namespace")
        if pid is not None:
            with contextlib.suppress(LedgerError):  # the QEMU may already have died
                manager.set_owner(holder, pid)
        group = reserved.group or manager.holder_group(holder)
        problems = kernel.check_domain(dom, pid, plan)
        if manager.enforcing:
            planned = None if reserved.result is None or reserved.result.desired is None \
                else reserved.result.desired.group_of(holder)
            problems += kernel.check_group(  # a plain cpuset where partitions cannot be
                manager.backend(), group, plan.cpus(),
                exclusive=planned is None or planned.partition != "member")
        if problems:
            raise Refusal(f"domain {holder.name!r} started but the kernel does not give it "
                          f"its CPUs exclusively: {problems[0]}; stopped it and freed the "
                          f"lease", code="verify")
        layout_notes = () if reserved.result is None or reserved.result.desired is None \
            else reserved.result.desired.notes
        return Started(holder.name, holder.uuid or "", plan, pid, kernel.domain_cgroup(pid),
                       tuple(done), (*plan.notes, *layout_notes))
    except PinwardenError as exc:
        kept = _rollback(manager, conn, holder, started, done, replaced)
        if kept is None:
            raise
        raise LibvirtError(
            f"{exc.message}; but domain {holder.name!r} was running when it did (process "
            f"{kept}: started by another call, or by libvirtd after it lost this one), and "
            f"keeps its lease while it runs ({_still_runs(holder)}, and 'pinwarden status' "
            f"its lease)", code=exc.code) from None
    except BaseException as exc:
        kept = _rollback(manager, conn, holder, started, done, replaced)
        if kept is None or not isinstance(exc, KeyboardInterrupt):
            raise
        # interrupted while libvirt started it (Ctrl-C, SIGTERM): it runs, with its lease —
        # said only "interrupted", or nothing at all (durability hunt)
        said = (f"after domain {holder.name!r} started: it runs (process {kept}) and keeps "
                f"its lease while it runs ({_still_runs(holder)}; 'pinwarden stop' ends it)")
        if isinstance(exc, EndedAfterChange):
            import sys

            print(f"pinwarden: ended {said}", file=sys.stderr)
            raise
        raise KeyboardInterrupt(said) from None


def _note_narrower(manager: Manager, spec: DomainSpec, plan: Plan,
                   holder: HolderRef) -> bool:
    """Record where ``plan`` places a shared domain's unpinned threads narrower than the
    shared pool with nothing leased (:func:`placed_narrower`); whether any is."""
    base = shared_pool(manager.host(), CpuSet())[0]
    narrower = placed_narrower(spec, plan, holder.name, holder.uuid or "", base)
    if narrower:
        with pins.locked(manager):
            pins.note_moves(manager, narrower)
    return bool(narrower)


def _rollback(manager: Manager, conn: Any, holder: HolderRef, started: bool,
              done: Sequence[Repin], replaced: dict[str, str | None]) -> int | None:
    """Best effort, every step attempted: the caller re-raises the original error.
    Order: domain, lease and cgroups (the manager shrinks the layout back — to the host
    as found when nothing else is leased), then the re-pins (which need the restored
    cgroups to allow their old CPUs again) and their records, together under the pins
    lock, as they were made: a daemon pass giving CPUs back in between would see the
    one undone and not the other.

    A domain this call did not start may run anyway — started by a racing ``virsh
    start``, or by libvirtd after a restart lost this call's connection: its lease, and
    the re-pins that keep the others off it, stay (:meth:`Manager.drop_failed`); the
    process it is kept for is returned."""
    if started:
        with contextlib.suppress(PinwardenError):
            lv.destroy(conn, holder.name)
        with contextlib.suppress(PinwardenError):
            manager.drop(holder)
    else:
        try:
            kept = manager.drop_failed(holder, os.getpid())
        except PinwardenError:
            kept = None
        if kept is not None:
            return kept
    if not done and not replaced:
        return None
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(PinwardenError):  # not to be had: undone without it
            stack.enter_context(pins.locked(manager))
        refused = pins.undo(conn, holder.driver, done)
        # a re-pin libvirt would not undo (libvirtd restarting) keeps its record: the next
        # give-back returns the CPUs (forgotten, the domain kept the narrow pin for good)
        keys = {narrowed_key(m.uuid, m.label) for m in refused}
        with contextlib.suppress(PinwardenError):
            pins.unnote(manager, {k: v for k, v in replaced.items() if k not in keys})
    return None


def _still_runs(holder: HolderRef) -> str:
    """How to tell whether a domain whose failed start left it running still runs: a
    libvirtd that restarted meanwhile may also end it (lifecycle hunt: pinwarden said it
    ran and kept its lease, and it had neither)."""
    return f"'{command_line('virsh domstate', holder.name)}' shows whether it still does"


def _runs_anyway(holder: HolderRef) -> int | None:
    """The process of a shared domain this call failed to start that runs all the same
    (libvirtd lost the call when it restarted and completed the start, or another call
    started it first: the user was told it failed, concurrency hunt); None when it does
    not run.  An exclusive one's lease tells (:meth:`Manager.drop_failed`)."""
    pid = lv.read_pid(holder.driver, holder.name)
    return pid if pid is not None and procs.alive(pid, None) else None


def _create(conn: Any, holder: HolderRef, xml: str) -> Any:
    b = lv.binding()
    try:
        return conn.createXML(xml, 0)
    except b.libvirtError as exc:
        raise libvirt_failure(f"libvirt could not start domain {holder.name!r}", exc) from None


# -- stop ---------------------------------------------------------------------------------

@record
class Stopped:
    name: str
    uuid: str
    was_running: bool
    released: CpuSet
    #: Running domains whose live pins got back CPUs leases had taken from them.
    given_back: tuple[Repin, ...] = ()
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.name, "uuid": self.uuid, "was_running": self.was_running,
                "released": str(self.released),
                "given_back": [{"domain": m.domain, "thread": m.label,
                                "cpus": m.after.to_list()} for m in self.given_back],
                "notes": list(self.notes)}


def stop(manager: Manager, uri: str, name: str, *, graceful: bool = False,
         timeout: float = 60.0) -> Stopped:
    conn = lv.open_connection(uri)
    try:
        dom = lv.lookup(conn, name)
        holder = _holder(conn, dom)
        given: tuple[Repin, ...] = ()
        notes: tuple[str, ...] = ()
        # the give-back inside the domain lock: the one the hook's 'release' leaves behind
        # waits for it (pins.give_back_after_release), so this stop says what it gave back
        with domain_lock(manager.state_dir, holder):
            was_running = _stop_domain(dom, holder, graceful=graceful, timeout=timeout)
            try:
                record = manager.drop(holder)
            except LedgerError as exc:  # the domain is stopped: never "nothing was changed"
                why = exc.message.split("; nothing was changed")[0]
                raise LedgerError(
                    f"domain {name!r} {'is stopped' if was_running else 'was not running'}, "
                    f"but its lease could not be freed: {why}; 'pinwarden sync' frees it "
                    f"once the lease database can be written", code=exc.code) from None
            released = record.plan.leased() if record is not None else CpuSet()
            try:
                given = pins.give_back(manager, conn)
            except PinwardenError as exc:  # the stop is done; the next give-back tries again
                notes = (f"{exc.message}; 'pinwarden stop' or the daemon tries again",)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    return Stopped(name, holder.uuid or "", was_running, released, given, notes)


def _stop_domain(dom: Any, holder: HolderRef, *, graceful: bool, timeout: float) -> bool:
    """Destroy (or shut down and wait for) a domain; False if it was not running."""
    b = lv.binding()
    name = holder.name
    if not dom.isActive():
        return False
    try:
        if graceful:
            dom.shutdown()
            _wait_inactive(dom, name, timeout)
        else:
            dom.destroy()
    except b.libvirtError as exc:
        if _still_running(dom, holder):
            raise libvirt_failure(f"cannot stop domain {name!r}", exc) from None
    return True


def _still_running(dom: Any, holder: HolderRef) -> bool:
    """Whether a domain a call failed on still runs: as libvirt says, or — libvirtd went
    away during the call (restarted), and cannot say — as its process does (the domain
    was stopped, and 'pinwarden stop' said it failed: "client socket is closed", its
    lease left for the hook or a later sync: real-libvirt hunt)."""
    try:
        return bool(dom.isActive())
    except lv.binding().libvirtError:
        return _runs_anyway(holder) is not None


def _wait_inactive(dom: Any, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while dom.isActive():
        if time.monotonic() > deadline:
            raise LibvirtError(f"domain {name!r} did not shut down within {timeout:g} s; "
                               f"destroy it with {command_line('pinwarden stop', name)} "
                               f"(without --graceful)",
                               code="timeout")
        time.sleep(0.2)


# -- define -------------------------------------------------------------------------------

@record
class Defined:
    name: str
    uuid: str
    exclusive: bool
    plan: Plan  # the dry-run plan against the current leases (none: ``not_now``)
    #: Why it would not start now (the refusal a start would get from the current leases),
    #: though this host can run it; None: it would start
    not_now: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.name, "uuid": self.uuid, "exclusive": self.exclusive,
                "plan": self.plan.to_json(), "starts_now": self.not_now is None,
                "not_now": self.not_now}


def with_pinwarden_metadata(xml: str, spec: DomainSpec, uuid: str,
                            partition: str | None) -> str:
    """The document libvirt should store: ``<uuid>`` present, pinwarden's request in
    ``<metadata><pw:cpu …/>`` (libvirt drops unknown attributes such as
    ``<cputune exclusive>``), and for exclusive domains the partition of their cgroup,
    so that a plain ``virsh start`` lands there too.  libvirt reformats the XML anyway,
    but keeps the prefixes of other tools' metadata (``<nova:instance>``): so does this
    (ElementTree wrote them ``ns0:``, and what read the stored XML by prefix missed it)."""
    for prefix, uri in _prefixes(xml):
        ET.register_namespace(prefix, uri)
    ET.register_namespace("pw", PW_NS)
    root = SafeET.fromstring(xml)
    if root.find("uuid") is None:
        el = ET.Element("uuid")
        el.text = uuid
        root.insert(1, el)
    tune = root.find("cputune")
    if tune is not None and "exclusive" in tune.attrib:
        del tune.attrib["exclusive"]
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        root.insert(2, meta)
    pw = meta.find(f"{{{PW_NS}}}cpu")
    if pw is None:
        pw = ET.SubElement(meta, f"{{{PW_NS}}}cpu")
    pw.set("exclusive", "yes" if spec.exclusive else "no")
    pw.set("threads", spec.threads)
    pw.set("emulator", spec.emulator)
    if partition is not None:
        resource = root.find("resource")
        if resource is None:
            resource = ET.SubElement(root, "resource")
        part = resource.find("partition")
        if part is None:
            part = ET.Element("partition")  # first: libvirt's schema puts it before
            resource.insert(0, part)            # <fibrechannel>
        part.text = partition
    try:
        return ET.tostring(root, encoding="unicode")
    except RecursionError:  # (it writes one level a call: exit 70 at 5,000: XML hunt)
        raise InputError(f"domain {spec.name!r}: its XML nests elements too deeply (libvirt "
                         f"reads at most 256 levels); flatten its <metadata>") from None


def _prefixes(xml: str) -> list[tuple[str, str]]:
    """The namespace prefixes ``xml`` declares, with their URIs (not the default namespace,
    and not the ``nsN`` form ElementTree keeps for its own)."""
    import io
    import re

    out: list[tuple[str, str]] = []
    try:
        for _event, (prefix, uri) in SafeET.iterparse(io.StringIO(xml), events=("start-ns",)):
            if prefix and not re.fullmatch(r"ns\d+", prefix) and prefix != "pw" \
                    and (prefix, uri) not in out:
                out.append((prefix, uri))
    except ET.ParseError:
        return []  # the parse that follows says why
    return out


def define(manager: Manager, uri: str, data: bytes) -> Defined:
    """Define the domain of XML document ``data`` (as read by the command line: at most
    one byte over :data:`~pinwarden.domain.MAX_XML_BYTES`, which is refused)."""
    spec = parse_domain(data)  # (too large or not UTF-8: refused here)
    xml = data.decode("utf-8-sig")
    uuid = spec.uuid or str(uuidlib.uuid4())
    spec = replace(spec, uuid=uuid)
    # the XML's <domain type> names the driver (a URI may be an alias libvirt resolves)
    holder = domain_holder(driver_of_type(spec.domain_type), spec.name, uuid)
    not_now = None
    try:
        plan = manager.plan(spec, holder=holder)
    except Refusal as exc:  # a definition is not a start: only what no lease explains is
        plan = manager.plan(spec, holder=holder, unleased=True)  # refused (raised here)
        not_now = exc.message
    partition = manager.libvirt_partition(holder) if spec.exclusive else None
    if spec.exclusive and spec.partition not in (None, "/machine", partition):
        raise Refusal(f"exclusive domain {spec.name!r} asks for partition "
                      f"{spec.partition}, but its leased CPUs live in {partition}; remove "
                      f"<resource><partition> from the XML", code="bad-partition")
    stored = with_pinwarden_metadata(xml, spec, uuid, partition)
    conn = lv.open_connection(uri)
    try:
        b = lv.binding()
        try:
            dom = conn.defineXML(stored)
        except b.libvirtError as exc:
            raise libvirt_failure(f"libvirt refused to define {spec.name!r}", exc) from None
        return Defined(str(dom.name()), str(dom.UUIDString()), spec.exclusive, plan, not_now)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
