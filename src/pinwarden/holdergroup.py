"""Does a holder's cgroup keep its leases?  What the kernel shows of the group, judged (pure).

The ledger records which cgroup each holder's leases live in; only the kernel can tell
whether that group still keeps them: on cgroup v2 a partition a sibling's CPUs made
invalid, on cgroup v1 a group whose ``cpu_exclusive`` somebody turned off, a group moved
off its leased CPUs by hand, or one removed.  :func:`judge` decides from what was read;
the reading is the callers': ``status`` reads each group the ledger records
(:func:`pinwarden.cli.placement.invalid_partitions`), ``audit`` every cgroup of the host
(:func:`pinwarden.audit.scan`) and judges those named as holder groups are, so both say
the same of a holder group pinwarden made.
"""

from __future__ import annotations

from typing import Protocol

from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.record import record

#: What is said of a cgroup v1 holder group that is not exclusive (``cpu_exclusive`` 0).
NOT_EXCLUSIVE = "cpu_exclusive 0"


class Seen(Protocol):
    """What was read of a group: its ``cpuset.cpus`` (None: unreadable), v2's
    ``cpuset.cpus.partition`` words and v1's ``cpu_exclusive`` (None where there is no such
    file, or it could not be read)."""

    @property
    def cpus(self) -> CpuSet | None: ...

    @property
    def partition(self) -> str | None: ...

    @property
    def exclusive(self) -> bool | None: ...


@record
class GroupSeen:
    """A :class:`Seen` as ``status`` reads it."""

    cpus: CpuSet | None
    partition: str | None = None
    exclusive: bool | None = None


@record
class Invalid:
    """What is wrong with a holder's group: its partition (``cpuset.cpus.partition``'s
    words, or :data:`NOT_EXCLUSIVE`), the online CPUs leased to its threads that its
    ``cpuset.cpus`` lacks (moved off its lease by hand: ``audit``'s ``off-lease``), that
    the group is gone (``missing-group``), or that it is out of view (``unseen``: from a
    cgroup namespace, which shows part of the hierarchy)."""

    partition: str | None
    off_lease: CpuSet | None
    gone: bool = False  # the group itself is missing
    unseen: bool = False  # out of this cgroup namespace's view: not checked

    def to_json(self) -> dict[str, str | bool | None]:
        return {"partition_invalid": self.partition,
                "off_lease": str(self.off_lease) if self.off_lease is not None else None,
                "group_missing": self.gone, "group_unseen": self.unseen}


def not_kept(seen: Seen) -> str | None:
    """Why the kernel does not keep the group's CPUs to it, or None: an invalid v2
    partition (the kernel's words), or a v1 group that is not exclusive."""
    if seen.exclusive is False:
        return NOT_EXCLUSIVE
    if seen.partition is not None and " invalid" in seen.partition:
        return seen.partition.strip()
    return None


def off_lease(threads: CpuSet, seen: Seen, online: CpuSet) -> CpuSet:
    """The online CPUs leased to the group's threads (``threads``) that its own CPUs lack
    (empty when they are all there, or its CPUs could not be read)."""
    return EMPTY if seen.cpus is None else threads & online - seen.cpus


def judge(threads: CpuSet, seen: Seen | None, online: CpuSet | None = None) -> Invalid | None:
    """What is wrong with a holder's group, or None: ``seen`` None is a group that is gone;
    ``threads``: the CPUs leased to its threads (not the siblings held empty); ``online``
    None: whether it is off its lease is not asked."""
    if seen is None:
        return Invalid(None, None, gone=True)
    partition = not_kept(seen)
    off = off_lease(threads, seen, online) if online is not None else EMPTY
    if partition is None and not off:
        return None
    return Invalid(partition, off or None)
