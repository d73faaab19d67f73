"""The host-wide, durable record of exclusive leases (SQLite, WAL mode).

Check-and-reserve is one ``BEGIN IMMEDIATE`` transaction, so racing processes get exactly
one winner per CPU; the ``leases`` table's primary key is the CPU number, so the database
itself refuses a second holder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pinwarden.model import HolderRef, Lease, Plan


@dataclass(frozen=True, slots=True)
class HolderRecord:
    ref: HolderRef
    created: float
    owner_pid: int | None  # process whose death frees the holder's leases
    owner_start: int | None  # its start time (clock ticks, /proc/PID/stat field 22)
    plan: Plan  # the plan that was reserved
    cgroup: str | None = None  # enforced cgroup path, once enforcement has placed it


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        raise NotImplementedError

    def leases(self) -> tuple[Lease, ...]:
        raise NotImplementedError

    def holders(self) -> tuple[HolderRecord, ...]:
        raise NotImplementedError

    def reserve(self, holder: HolderRef, decide: Callable[[tuple[Lease, ...]], Plan], *,
                owner_pid: int | None = None) -> Plan:
        """In one transaction: reap dead owners, call ``decide(current leases)`` and record
        the plan's leases for ``holder`` (replacing any it already had)."""
        raise NotImplementedError

    def release(self, selector: str, *, driver: str | None = None) -> HolderRecord:
        """Free the holder named ``selector`` (name or UUID); unknown → LedgerError."""
        raise NotImplementedError
