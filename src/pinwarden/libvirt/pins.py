"""Live pins pinwarden narrowed, kept and given back (the I/O around
:mod:`pinwarden.libvirt.repin`).

An exclusive start (or the daemon, for a shared domain found on leased CPUs) re-pins
running shared domains off the CPUs it leases.  Each applied move is recorded through the
manager; when those CPUs are free again, :func:`give_back` re-pins the domains to what
they had: ``pinwarden stop``, every pass of the event daemon, and — for a lease that ends
another way (a plain ``virsh destroy``, a guest powering off) — the process the hook's
``release`` leaves behind (:func:`give_back_after_release`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.affinity import cgroup_resets_affinity
from pinwarden.errors import PinwardenError
from pinwarden.libvirt import connect as lv
from pinwarden.libvirt.repin import CONTAINER, container_owner, record_moves
from pinwarden.libvirt.repin import give_back as decide_give_back
from pinwarden.libvirt.repin import give_back_container as decide_container_give_back
from pinwarden.libvirt.state import DomainInfo, Repin
from pinwarden.manager import Manager, domain_lock, state_lock
from pinwarden.model import HolderRef
from pinwarden.narrowed import NARROWED_PREFIX, key_parts, narrowed_key


def locked(manager: Manager) -> contextlib.AbstractContextManager[None]:
    """Serialise what reads or changes narrowed pins: an exclusive start applying and
    recording its re-pins, the daemon's pass giving CPUs back, ``pinwarden stop``.
    Without it a pass that read the records before a start re-pinned a domain, and its
    live pins after, took the start's pin for somebody else's and forgot the record.
    (Not the manager's lock: libvirt calls are made under this one, and libvirtd's hook,
    which takes the manager's lock, may be what such a call waits for.)"""
    return state_lock(manager.state_dir, "pins")


def note_moves(manager: Manager, moves: Sequence[Repin]) -> dict[str, str | None]:
    """Record applied ``moves``; returns the records they replaced (None: there was none),
    for :func:`unnote`."""
    if not moves:
        return {}
    recorded = manager.change_records(NARROWED_PREFIX)
    records = record_moves(moves, recorded)
    manager.put_change_records(records)
    return {key: recorded.get(key) for key in records}


def unnote(manager: Manager, replaced: dict[str, str | None]) -> None:
    """The moves :func:`note_moves` recorded were undone: their records back as they were."""
    manager.put_change_records({k: v for k, v in replaced.items() if v is not None},
                               forget=[k for k, v in replaced.items() if v is None])


def give_back(manager: Manager, conn: Any,
              domains: Sequence[DomainInfo] | None = None, *,
              place: bool = True) -> tuple[Repin, ...]:
    """Re-pin running domains to the CPUs pinwarden took from their pins and no longer
    leases, and give shared containers the hook placed narrower back theirs
    (:func:`give_back_containers`, whatever the connection's driver); returns the moves
    made.  A move libvirt refuses keeps its record (the next call tries again) and is
    raised as the :class:`~pinwarden.errors.LibvirtError`.

    ``place``: then give the threads of shared domains that still run off the VM CPUs
    without CPUs of their own their placement (:func:`place_strays`), as the daemon's
    passes do (which place themselves: False)."""
    if not manager.change_records(NARROWED_PREFIX):
        return ()  # the common case, without a lock
    given = give_back_containers(manager)
    if lv.driver_of(str(conn.getURI())) != "qemu":
        # only QEMU domains have threads pinwarden re-pins through libvirt: another
        # driver's listing holds none of the domains the records name
        return given
    with locked(manager):
        recorded = manager.change_records(NARROWED_PREFIX)
        if domains is None:
            domains = lv.list_domains(conn, active_only=True)
        running = {d.uuid for d in domains if d.active}
        stopped = any(key_parts(k)[0] not in running for k in recorded)
        resets = cgroup_resets_affinity()
        plan = decide_give_back(domains, recorded, _leased(manager, resets),
                                kernel_resets=resets,
                                saved=lv.saved_uuids(conn) if stopped else frozenset())
        done: list[Repin] = []
        pids = {d.uuid: d.pid for d in domains}
        try:
            for move in plan.moves:
                if not lv.apply_repin(conn, move):
                    continue  # stopped meanwhile: its record goes at the next pass
                done.append(move)
                if move.thread == "emulator":
                    settle_emulator(pids.get(move.uuid), move)
        finally:
            moved = {(m.uuid, m.label) for m in done}
            failed = {narrowed_key(m.uuid, m.label) for m in plan.moves
                      if (m.uuid, m.label) not in moved}
            manager.put_change_records(
                {k: v for k, v in plan.records.items() if k not in failed},
                forget=[k for k in plan.forget if k not in failed])
        if place:  # what the give-back left off the VM CPUs (its moves read first)
            with contextlib.suppress(PinwardenError):  # (the give-back itself was made)
                place_strays(manager, lv.list_domains(conn, active_only=True))
    return given + tuple(done)


def undo(conn: Any, driver: str, moves: Sequence[Repin]) -> tuple[Repin, ...]:
    """A failed exclusive start's re-pins undone through libvirt, the last first, every
    one attempted (a libvirt refusal is not raised: the caller re-raises the start's own
    error); returns those libvirt refused (libvirtd restarted during the start, say),
    whose records the caller keeps for a later give-back.  An undone emulator pin settles
    QEMU's other emulator threads as a give-back does (:func:`settle_emulator`): one
    started while the pin was narrower kept it."""
    failed: list[Repin] = []
    for move in reversed(moves):
        back = move.reversed()
        try:
            lv.apply_repin(conn, back)
        except PinwardenError:
            failed.append(move)
            continue
        if move.thread == "emulator":
            with contextlib.suppress(PinwardenError):
                settle_emulator(lv.read_pid(driver, move.domain), back)
    return tuple(failed)


def settle_emulator(pid: int | None, move: Repin) -> None:
    """libvirt's live emulator pin sets the emulator's cgroup and QEMU's main thread only;
    QEMU's other emulator threads (RCU, the monitor's I/O thread, workers) keep their own
    affinity, which the kernel keeps as the cgroup widens (since Linux 6.2): one placed by
    the hook, or started while the pin was narrower, stayed there after the give-back (the
    trixie story's B kept a thread on CPU 3).  Every such thread of process ``pid`` still
    on ``move.before`` gets ``move.after`` too — and one on ``move.after`` already: the
    kernel may show it there only because its cgroup (which libvirt's pin set to
    ``move.after``) shares no CPU with its own affinity, still ``move.before``, which
    comes back as soon as the cgroup widens (the next lease's end left a shared domain's
    call_rcu and monitor I/O thread on the housekeeping CPU).  A thread given other CPUs
    since keeps them, and one the cgroup does not allow them (or gone) is left as it is."""
    from pinwarden.enforce.affinity import pin_each, threads_of
    from pinwarden.libvirt.state import qemu_thread
    from pinwarden.procs import thread_comm

    if pid is None:
        return
    pin_each({tid: move.after for tid in threads_of(pid)
              if qemu_thread(thread_comm(pid, tid)) == ("emulator", None)
              and _affinity(tid) in (move.before, move.after)})


def give_back_containers(manager: Manager) -> tuple[Repin, ...]:
    """Shared LXC containers the hook placed on fewer CPUs because of leases held then
    (``container`` records, :func:`pinwarden.libvirt.repin.container_json`) get the CPUs
    no longer leased back: every thread of the controller and of the processes below it
    that still has the CPUs the hook gave gets the new ones with ``sched_setaffinity``
    (a thread given others since, by the container itself say, keeps them).  No libvirt
    call: the record names the controller process.  Returns the moves made."""
    from pinwarden import procs
    from pinwarden.enforce.affinity import pin_each, threads_of

    if not any(key_parts(k)[1] == CONTAINER for k in manager.change_records(NARROWED_PREFIX)):
        return ()
    with locked(manager):
        recorded = {k: v for k, v in manager.change_records(NARROWED_PREFIX).items()
                    if key_parts(k)[1] == CONTAINER}
        owners = {k: container_owner(v) for k, v in recorded.items()}
        live: dict[str, CpuSet | None] = {}
        for key, owner in owners.items():
            live[key] = None
            if owner is not None and procs.alive(*owner):
                with contextlib.suppress(OSError):
                    live[key] = CpuSet.of(os.sched_getaffinity(owner[0]))
        resets = cgroup_resets_affinity()
        plan = decide_container_give_back(recorded, live, _leased(manager, resets),
                                          kernel_resets=resets)
        for move in plan.moves:
            owner = owners[narrowed_key(move.uuid, CONTAINER)]
            assert owner is not None  # (a move names a live controller)
            done: set[int] = set()
            for _ in range(3):  # a process forked meanwhile is caught by looking again
                todo = {tid for proc in procs.descendants(owner[0])
                        for tid in threads_of(proc)} - done
                if not todo:
                    break
                pin_each({tid: move.after for tid in sorted(todo)
                          if _affinity(tid) == move.before})
                done |= todo
        manager.put_change_records(dict(plan.records), forget=list(plan.forget))
    return plan.moves


def _leased(manager: Manager, resets: bool) -> CpuSet:
    """The CPUs a give-back keeps out: every lease — and, where the kernel gives threads
    their cgroup's CPUs at each change (``resets``), the leases of holders whose owner is
    gone too: their CPUs stay out of the shared group until the release (or sync) that
    frees them writes it, and that write's reset would undo a give-back made before it.
    (The release's own give-back comes after its write: the hook's, the daemon's, or
    ``pinwarden stop``'s.)"""
    return CpuSet.of(lease.cpu for lease in manager.leases(dead=resets, kept=True))


def _affinity(tid: int) -> CpuSet | None:
    try:
        return CpuSet.of(os.sched_getaffinity(tid))
    except OSError:
        return None


#: Pauses (s) before each new try of :func:`give_back_after_release` when libvirt fails.
RELEASE_RETRIES = (0.0, 1.0, 2.0, 4.0)
#: How long (s) :func:`give_back_after_release` waits for a ``pinwarden start`` or ``stop``
#: of the released domain to end (a start waits for QEMU, which can take minutes for a
#: guest with much preallocated memory).  A command still running then is hung: the
#: process gives up rather than live on in libvirtd's cgroup.
RELEASE_LOCK_WAIT = 900.0


def place_strays(manager: Manager, domains: Sequence[DomainInfo]) -> bool:
    """Threads of running shared domains that have no CPUs of their own and run off the VM
    CPUs get the placement the hook gave the domain at its start (the VM CPUs less the
    leased ones), as each pass of the event daemon gives it: a vCPU hot-plugged or an I/O
    thread added live gets libvirt's default, every CPU, once a lease's end widens its
    cgroup — without the daemon it kept the housekeeping CPUs, and its placement's record
    was forgotten as somebody else's pin (real-libvirt hunt).  Whether any was placed."""
    from pinwarden.libvirt.place import place_default
    from pinwarden.libvirt.reconcile import Place, reconcile

    try:
        host = manager.host()
    except PinwardenError:
        return False
    placed = False
    for action in reconcile(domains, manager.holders(), manager.libvirt_partition,
                            now=time.time(), drivers=("qemu",),
                            vm_cpus=host.partition.vm_cpus & host.topology.online):
        if isinstance(action, Place) and action.domain.live is not None:
            with contextlib.suppress(PinwardenError):  # (the give-back goes on)
                placed |= place_default(manager, action.domain.name,
                                        action.domain.live) is not None
    return placed


def give_back_now(manager: Manager, uri: str) -> tuple[tuple[Repin, ...], str | None]:
    """Narrowed pins and placements get the CPUs no longer leased, once, over ``uri``:
    the moves made, and why libvirt could not be asked (None: it was, or nothing waits).
    For the ends of leases no hook sees — a ``pinwarden run`` job's — and ``pinwarden
    sync``."""
    if not manager.change_records(NARROWED_PREFIX):
        return (), None
    given = give_back_containers(manager)
    if lv.driver_of(uri) != "qemu":
        uri = "qemu:///system"  # only QEMU domains have pins pinwarden narrowed
    try:
        conn = lv.open_connection(uri)
    except PinwardenError as exc:
        return given, exc.message
    try:
        return given + give_back(manager, conn), None
    except PinwardenError as exc:
        return given, exc.message
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def give_back_after_release(manager: Manager, uri: str, released: HolderRef,
                            log: Callable[[str], None]) -> tuple[Repin, ...]:
    """What the hook leaves behind when the lease of ``released`` ended at ``release``
    while narrowed pins wait for CPUs (the hook itself may not call libvirt):
    :func:`give_back_containers` (no libvirt call), then :func:`give_back` over ``uri``,
    tried again while libvirt fails; each move and the last failure go to ``log``.  It
    first waits for the domain's lock: a ``pinwarden stop`` (or failed ``pinwarden
    start``) that caused the release gives back itself, and says so, and this finds
    nothing left then.  It gives up after :data:`RELEASE_LOCK_WAIT`."""
    if not manager.change_records(NARROWED_PREFIX):
        return ()  # nothing waits (or no ledger at all): nothing to lock or create
    try:
        with domain_lock(manager.state_dir, released, wait=RELEASE_LOCK_WAIT):
            pass
    except TimeoutError:
        log(f"warning: a 'pinwarden start' or 'stop' of {released.describe()} still runs "
            f"after {RELEASE_LOCK_WAIT:g} s: the CPUs of narrowed pins are not given back "
            f"now; 'pinwarden stop' or the daemon gives them back")
        return ()
    containers = give_back_containers(manager)  # (no libvirt call: whatever it answers)
    for move in containers:
        log(f"gave back {move}")
    failure = ""
    for pause in RELEASE_RETRIES:
        time.sleep(pause)
        try:
            conn = lv.open_connection(uri)
        except PinwardenError as exc:
            failure = exc.message
            continue
        try:
            given = give_back(manager, conn)
        except PinwardenError as exc:
            failure = exc.message
            continue
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        for move in given:
            log(f"gave back {move}")
        return containers + given
    log(f"warning: cannot give back the CPUs of narrowed pins: {failure}; 'pinwarden stop' "
        f"or the daemon tries again")
    return ()
