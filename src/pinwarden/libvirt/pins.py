"""Live pins pinwarden narrowed, kept and given back (the I/O around
:mod:`pinwarden.libvirt.repin`).

An exclusive start (or the daemon, for a shared domain found on leased CPUs) re-pins
running shared domains off the CPUs it leases.  Each applied move is recorded through the
manager; when those CPUs are free again, :func:`give_back` re-pins the domains to what
they had (``pinwarden stop``, and every pass of the event daemon).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from pinwarden.cpuset import CpuSet
from pinwarden.libvirt import connect as lv
from pinwarden.libvirt.repin import NARROWED_PREFIX, narrowed_key, record_moves
from pinwarden.libvirt.repin import give_back as decide_give_back
from pinwarden.libvirt.state import DomainInfo, Repin
from pinwarden.manager import Manager, state_lock


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
              domains: Sequence[DomainInfo] | None = None) -> tuple[Repin, ...]:
    """Re-pin running domains to the CPUs pinwarden took from their pins and no longer
    leases; returns the moves made.  A move libvirt refuses keeps its record (the next
    call tries again) and is raised as the :class:`~pinwarden.errors.LibvirtError`."""
    if lv.driver_of(str(conn.getURI())) != "qemu":
        # only QEMU domains have threads pinwarden re-pins (a container has no affinity
        # to read): another driver's listing holds none of the domains the records name
        return ()
    if not manager.change_records(NARROWED_PREFIX):
        return ()  # the common case, without a lock
    with locked(manager):
        recorded = manager.change_records(NARROWED_PREFIX)
        if domains is None:
            domains = lv.list_domains(conn, active_only=True)
        leased = CpuSet.of(lease.cpu for lease in manager.leases())
        plan = decide_give_back(domains, recorded, leased)
        done: list[Repin] = []
        try:
            for move in plan.moves:
                lv.apply_repin(conn, move)
                done.append(move)
        finally:
            moved = {(m.uuid, m.label) for m in done}
            failed = {narrowed_key(m.uuid, m.label) for m in plan.moves
                      if (m.uuid, m.label) not in moved}
            manager.put_change_records(
                {k: v for k, v in plan.records.items() if k not in failed},
                forget=[k for k in plan.forget if k not in failed])
    return tuple(done)
