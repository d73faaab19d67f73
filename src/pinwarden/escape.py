"""Escapes from cgroup v2 partitions: which cgroups can run on leased CPUs, and the fix.

Pure: a snapshot of the cgroups that sit beside the holder partitions (the children of the
cgroup2 root, and of pinwarden's exclusive tree) plus the leased CPUs and the holder groups
→ a :class:`Narrowing`: each escaping cgroup, why it escapes, and the writes that put the
leased CPUs out of its reach again.  The I/O lives in :mod:`pinwarden.enforce.watch`.

Why this is needed (issue #14; the kernel side is in DEVELOPERS.md, "Escapes from
partitions"): on cgroup v2 a write of ``cpuset.cpus`` that overlaps a sibling *partition*
is accepted by the kernel, which then marks that partition — and every partition below it —
invalid, handing its CPUs back to everybody (6.1 ``update_cpumask()``, 6.12 the same path;
``cpuset.cpus.exclusive`` on the holder does not stop it).  A member cgroup that only ever
*inherits* (empty ``cpuset.cpus``) cannot escape on its own: it follows its parent's
effective CPUs, which a valid partition has left.  So the fix is, in this order:

1. a cgroup whose *configured* CPUs overlap the leased CPUs: if it made itself a partition,
   switch it to ``member`` first; then write its CPUs minus the leased ones (the shared pool
   when nothing is left);
2. every holder partition the kernel now reads as invalid: switch it back on, top-down (the
   kernel keeps a partition invalid after the conflict is gone — DEVELOPERS.md).

Paths are relative to the cgroup2 mount (``""`` is the root), as in
:mod:`pinwarden.enforce.backend`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import depth, is_within
from pinwarden.record import record

#: ``cpuset.cpus.partition`` without the validity suffix.
PartitionWord = Literal["member", "root", "isolated"]


@record
class CgroupView:
    """One cgroup as read from its cpuset files.

    ``cpus`` is ``cpuset.cpus`` (empty: the cgroup inherits its parent's effective CPUs),
    ``effective`` is ``cpuset.cpus.effective``, ``partition`` the word of
    ``cpuset.cpus.partition`` and ``valid`` whether the kernel accepts it (always true for
    ``member``); ``exclusive`` is ``cpuset.cpus.exclusive`` where the kernel has it (6.7+).
    """

    path: str
    cpus: CpuSet
    effective: CpuSet
    partition: PartitionWord = "member"
    valid: bool = True
    exclusive: CpuSet | None = None


@record
class Escape:
    """A cgroup that can run on (``reach``) leased CPUs, or will as soon as the kernel
    re-evaluates it (``configured``: its own ``cpuset.cpus`` names leased CPUs)."""

    path: str
    reach: CpuSet
    configured: CpuSet
    why: str


@record
class SetPartition:
    """Write ``word`` to ``path``/cpuset.cpus.partition."""

    path: str
    word: PartitionWord


@record
class SetCpus:
    """Write ``cpus`` to ``path``/cpuset.cpus."""

    path: str
    cpus: CpuSet


@record
class Revalidate:
    """Switch the holder partition ``path`` back on: when the kernel reads it as invalid,
    write ``member`` then ``word`` (and read it back).  Emitted top-down."""

    path: str
    word: PartitionWord


NarrowOp = SetPartition | SetCpus | Revalidate


@record
class Narrowing:
    """What :func:`plan_narrowing` found and the writes, in the order to perform them."""

    escapes: tuple[Escape, ...]
    ops: tuple[NarrowOp, ...]
    notes: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.escapes and not self.ops


def owned(path: str, holders: AbstractSet[str]) -> bool:
    """``path`` is a holder group or lies below one (its CPUs are legitimately leased)."""
    return any(is_within(path, h) for h in holders if h != "")


def find_escapes(groups: Iterable[CgroupView], leased: CpuSet,
                 holders: AbstractSet[str]) -> list[Escape]:
    """Every cgroup outside the holder groups that can run on a leased CPU now
    (``effective`` ∩ leased) or that names one in its own ``cpuset.cpus`` (and so breaks,
    or will break, the holder partition).  Sorted by path."""
    out: list[Escape] = []
    for g in groups:
        if g.path == "" or owned(g.path, holders):
            continue
        reach = g.effective & leased
        configured = g.cpus & leased
        if g.exclusive is not None:
            configured = configured | (g.exclusive & leased)
        if not reach and not configured:
            continue
        if configured and reach:
            why = (f"its cpuset.cpus names leased {configured.named()}: the kernel "
                   f"accepted the write and invalidated the sibling partition")
        elif configured:  # Linux 7.3 keeps it off a valid partition's CPUs (6.1-6.12 do not)
            why = (f"its cpuset.cpus names leased {configured.named()}: the kernel keeps "
                   f"it off them only while every holder partition stays valid")
        else:
            why = (f"inherits leased {reach.named()} from its parent: a holder "
                   f"partition is no longer valid")
        out.append(Escape(g.path, reach, configured, why))
    return sorted(out, key=lambda e: e.path)


def plan_narrowing(groups: Sequence[CgroupView], leased: CpuSet, holders: AbstractSet[str],
                   shared_pool: CpuSet, *,
                   holder_words: dict[str, PartitionWord] | None = None,
                   online: CpuSet | None = None) -> Narrowing:
    """The escapes among ``groups`` and the writes that close them.

    ``groups`` holds the cgroups to judge — at least the children of every partition that
    has a holder below it (the cgroup2 root's children, the exclusive tree's children) —
    and the holder groups themselves (their partition state decides the revalidation).
    ``holders`` are the paths of the groups that may hold leased CPUs (the exclusive tree
    and each holder partition), ``shared_pool`` the CPUs an escaping cgroup gets when
    nothing but leased CPUs was configured.  ``holder_words`` gives the partition word each
    holder should have (default: what it reads now, ``root`` for a member).

    Escaping cgroup ``G`` with configured CPUs ``C``: ``SetPartition(G, member)`` when
    ``G`` is a partition (valid or not), then ``SetCpus(G, C − leased)``, or
    ``SetCpus(G, shared_pool − leased)`` when that is empty.  Then one ``Revalidate`` per
    holder group that reads invalid, parents first (not one none of whose CPUs is
    ``online``).  A cgroup that only inherits leased CPUs gets no write: revalidating the
    holder takes them away.
    """
    escapes = find_escapes(groups, leased, holders)
    ops: list[NarrowOp] = []
    notes: list[str] = []
    pool = shared_pool - leased
    by_path = {g.path: g for g in groups}
    for esc in escapes:
        if not esc.configured:
            continue
        g = by_path[esc.path]
        if g.partition != "member":
            ops.append(SetPartition(g.path, "member"))
        target = g.cpus - leased
        if not target:
            if not pool:
                notes.append(f"{g.path}: no CPU outside the leased ones to give it; "
                             f"left as it is")
                continue
            target = pool
            notes.append(f"{g.path}: only leased CPUs configured; gets the shared pool "
                         f"{pool.to_list()}")
        ops.append(SetCpus(g.path, target))
        if g.exclusive is not None and g.exclusive & leased:
            notes.append(f"{g.path}: cpuset.cpus.exclusive names leased "
                         f"{(g.exclusive & leased).named()}")
    words = holder_words or {}
    # (a holder none of whose CPUs is online is invalid by hotplug: the kernel makes it
    # valid again when one comes back, and writing its word cannot: v2-lab hunt)
    invalid = [g for g in groups if g.path in holders and not g.valid
               and (online is None or g.cpus & online)]
    for g in sorted(invalid, key=lambda g: (depth(g.path), g.path)):
        word = words.get(g.path, g.partition if g.partition != "member" else "root")
        ops.append(Revalidate(g.path, word))
    return Narrowing(tuple(escapes), tuple(ops), tuple(notes))
