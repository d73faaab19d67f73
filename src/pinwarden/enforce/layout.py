"""The desired cgroup layout and the planner that reaches it.  Pure: no I/O here.

Layout (see DEVELOPERS.md, "cgroup layout"), every group a child of one parent (the
cpuset root on real hosts)::

    <shared>                         member, cpus = shared pool (VM CPUs − leased; fallback
                                     host CPUs) plus unleased CPUs its VMs use now
    <stem>-vm-NAME.partition         exclusive, cpus = the domain's leased CPUs (sibling
                                     holds excluded)
    <stem>-lxc-NAME.partition        the same for an LXC domain
    <stem>-run-NAME.partition        exclusive, cpus = the job's leased CPUs

``<shared>`` defaults to ``machine`` and ``<stem>`` to ``pinwarden`` (the configured
``exclusive = "pinwarden.partition"`` without its suffix).  The holder groups are *siblings*
of the shared group, not children of one exclusive tree: the kernel then enforces their
exclusivity against the shared group directly (v1 ``cpu_exclusive`` is checked between
siblings; a v2 partition root takes its CPUs from the parent every sibling draws on), and
no partition ever sits below a partition whose CPUs change while VMs run — Linux 6.1 and
6.12 cannot keep such a child valid (``partition_is_populated()`` skips the child but not
its descendants, so the VM's own tasks count as the parent's; DEVELOPERS.md, "cgroup
layout").  Tests nest the whole
layout under a ``pwtest-…`` parent.

The planner, :func:`plan`, turns (current snapshot, desired layout) into an ordered list of
primitive operations (:mod:`~pinwarden.enforce.backend`) that never passes through a state
the kernel refuses:

1. *bottom-up* (deepest first): remove stale unpopulated groups; switch exclusive flags off
   (also those of partitions the kernel reads as invalid, switched on again in step 4);
   narrow cpus (and mems) to ``current ∩ target`` — this includes groups we do not own, such
   as libvirt's ``machine/qemu-N-B.libvirt-qemu/{emulator,vcpuN}``, so a parent can shrink;
2. groups that had to be *bridged* (see :func:`order`): widened top-down, then narrowed to
   their target bottom-up;
3. *top-down* (shallowest first): create missing groups (mems copied from the parent), widen
   cpus (and mems) to the target;
4. *top-down*: switch exclusive flags on.

Groups we do not own (descendants of the managed groups) get a target too: a group whose
cpus equal its parent's keeps tracking its parent; any other keeps ``cpus ∩ parent target``
or, when that is empty, moves to the whole parent target.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence

from pinwarden.cpuset import CpuSet, union
from pinwarden.enforce.backend import (
    GroupState,
    Mkdir,
    Op,
    PartitionKind,
    Rmdir,
    SetCpus,
    SetMems,
    SetPartition,
    Snapshot,
    ancestors,
    depth,
    join,
    parent_of,
)
from pinwarden.enforce.names import DEFAULT_EXCLUSIVE as DEFAULT_EXCLUSIVE
from pinwarden.enforce.names import DEFAULT_SHARED as DEFAULT_SHARED
from pinwarden.enforce.names import PARTITION_SUFFIX as PARTITION_SUFFIX
from pinwarden.enforce.names import LayoutNames as LayoutNames
from pinwarden.enforce.names import holder_component as holder_component
from pinwarden.enforce.names import is_holder_component as is_holder_component
from pinwarden.model import SIBLING_HOLD, HolderRef, Lease
from pinwarden.partition import Host, shared_pool
from pinwarden.record import field, record, replace

_NONE = CpuSet()
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SAFE_KEY = re.compile(r"[A-Za-z0-9-]{1,64}")
#: A name shaped like a UUID: the group name another domain of that UUID gets when its own
#: name is not usable (hunt), so it is used only when it is the domain's own UUID.
_UUID_SHAPED = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}",
                          re.IGNORECASE)


@record
class GroupSpec:
    """One group pinwarden owns: its path, CPUs and partition kind."""

    path: str
    cpus: CpuSet
    partition: PartitionKind
    holder: HolderRef | None = None
    #: The group becomes a partition only once something runs in it (until then a member
    #: with the same explicit CPUs): libvirt's LXC controller pins itself to the domain's
    #: CPUs *before* it joins its cgroup, which a v2 partition would already have taken
    #: from the cgroup it starts in (EINVAL).
    when_populated: bool = False


@record
class DesiredLayout:
    names: LayoutNames
    shared: GroupSpec
    holders: tuple[GroupSpec, ...] = ()
    #: Every leased CPU: the holders' CPUs and the siblings they hold empty (in no group
    #: but kept out of the shared one).
    leased: CpuSet = _NONE
    notes: tuple[str, ...] = ()
    #: Nothing is leased and the shared group goes back to exactly these CPUs (what
    #: pinwarden found there; empty on cgroup v2: "inherit").
    restore_shared: CpuSet | None = None
    #: Nothing is leased and pinwarden created the shared group: remove it when nothing
    #: lives there (else it keeps ``restore_shared``, its parent's CPUs).
    drop_shared: bool = False
    #: Nothing is leased and pinwarden has nothing of the shared group's to put back (it
    #: never changed it, or its record is gone): only stale holder groups are touched.
    keep_shared: bool = False
    #: The host's online CPUs (None: not known, every CPU counts): a group's CPUs that are
    #: offline are not in its effective set, nor is a partition valid with none online.
    online: CpuSet | None = None
    #: Groups below the owned ones (an operator's partition inside the shared one, a pinned
    #: VM's thread groups) whose CPUs differed from their parent's when pinwarden first
    #: changed that parent: those CPUs (the manager's records).  Each follows its parent
    #: from them, so it has them again once the parent has (:func:`_follow`).
    originals: Mapping[str, CpuSet] = field(default_factory=dict)
    #: Groups a sync that was cut short (killed, or its rollback failed) had begun to
    #: write: the CPUs each held before it did (the manager's record).  Whether a group
    #: follows its parent is judged from them, not from the half-written state: a shared
    #: VM's group still on the narrowed CPUs below a ``machine`` already widened again
    #: looked like one with CPUs of its own, and stayed narrowed (crash hunt).
    interrupted: Mapping[str, CpuSet] = field(default_factory=dict)

    def groups(self) -> tuple[GroupSpec, ...]:
        return (self.shared, *self.holders)

    def group_of(self, holder: HolderRef) -> GroupSpec | None:
        for spec in self.holders:
            if spec.holder == holder:
                return spec
        return None

    def read_paths(self) -> tuple[str, ...]:
        """The groups a backend reads to plan this layout (each with its subtree; the
        parent's other children come along shallowly, which is how stale holders are
        found)."""
        return (self.names.shared, *(spec.path for spec in self.holders))

    def stale_paths(self, current: Snapshot) -> list[str]:
        """Holder groups (and the old exclusive tree) in ``current`` that no lease wants."""
        wanted = {spec.path for spec in self.holders}
        legacy = {self.names.legacy, join(self.names.parent, f"{self.names.stem}.slice")}
        return [p for p in current.children(self.names.parent)
                if p not in wanted and (self.names.is_holder(p) or p in legacy)]


# -- names ------------------------------------------------------------------------------

def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def holder_group_name(holder: HolderRef, stem: str = "pinwarden") -> str:
    """``STEM-vm-NAME.partition`` (qemu), ``STEM-lxc-NAME.partition``,
    ``STEM-run-NAME.partition`` (jobs).

    NAME is kept when it is made of ``[A-Za-z0-9_-]`` (at most 64 characters; no dot, so
    libvirt maps ``/STEM-vm-NAME`` to exactly this directory) and, for a domain, is not
    shaped like a UUID other than its own (the group of the domain of that UUID, were its
    name not usable: two domains' partitions were one group); otherwise the domain's
    UUID, otherwise a digest of the holder's identity.  Names are unique per driver (the
    ledger refuses a second holder of one name), and the prefix tells drivers apart.
    """
    prefix = {"run": "run", "lxc": "lxc"}.get(holder.driver, "vm")
    uuid = holder.uuid
    name = holder.name
    usable = _SAFE_NAME.fullmatch(name) is not None and (
        holder.driver == "run" or not _UUID_SHAPED.fullmatch(name) or name == uuid)
    for tail in (name if usable else None,
                 uuid if uuid is not None and _SAFE_KEY.fullmatch(uuid) else None):
        if tail is not None and _fits_a_unit_name(f"{stem}-{prefix}-{tail}"):
            return f"{stem}-{prefix}-{tail}{PARTITION_SUFFIX}"
    return f"{stem}-{prefix}-{_digest(f'{holder.driver}:{holder.key}')}{PARTITION_SUFFIX}"


#: systemd's longest unit name (UNIT_NAME_MAX).
_UNIT_NAME_MAX = 255


def _fits_a_unit_name(group: str) -> bool:
    """Whether the slice systemd makes of ``group`` keeps to its longest unit name: each
    ``-`` is escaped to ``\\x2d`` there, so a 64-character name of dashes passed define and
    plan and then failed every start with an internal error (systemd-lab hunt)."""
    return len(group) + 3 * group.count("-") + len(".slice") <= _UNIT_NAME_MAX


def holder_group_path(names: LayoutNames, holder: HolderRef) -> str:
    return join(names.parent, holder_group_name(holder, names.stem))


def libvirt_partition(names: LayoutNames, holder: HolderRef) -> str:
    """The ``<resource><partition>`` value libvirt maps to the holder's group.

    libvirt appends ``.partition`` to every path component without a dot, so every
    component of the holder's path must be ``NAME.partition`` with no other dot (the
    default layout at the root is: ``/pinwarden-vm-NAME``); otherwise :class:`ValueError`.
    """
    parts = holder_group_path(names, holder).split("/")
    out = []
    for part in parts:
        if not part.endswith(PARTITION_SUFFIX) or "." in part[:-len(PARTITION_SUFFIX)]:
            raise ValueError(f"cgroup component {part!r} cannot be named by a libvirt "
                             "partition (it must be NAME.partition with no other dot)")
        out.append(part[:-len(PARTITION_SUFFIX)])
    return "/" + "/".join(out)


# -- desired layout ---------------------------------------------------------------------

def desired_layout(host: Host, leases: Sequence[Lease], names: LayoutNames = LayoutNames(),
                   *, shared_extra: CpuSet = _NONE,
                   restore_shared: CpuSet | None = None,
                   drop_shared: bool = False,
                   keep_shared: bool = False,
                   isolated: frozenset[HolderRef] = frozenset(),
                   deferred: frozenset[HolderRef] = frozenset(),
                   originals: Mapping[str, CpuSet] | None = None,
                   interrupted: Mapping[str, CpuSet] | None = None) -> DesiredLayout:
    """The layout for ``leases``.  ``shared_extra``: CPUs outside the pool that shared VMs are
    pinned to by their XML (honoured in ``none``/``isolcpus`` modes) — never leased ones.
    ``restore_shared`` (only without leases): the shared group's CPUs as pinwarden found
    them, put back exactly.  ``keep_shared`` (only without leases): the shared group is
    left as it is (:attr:`DesiredLayout.keep_shared`).  ``isolated``: holders whose group
    is an ``isolated`` partition (no scheduler load balancing; the same as exclusive on
    cgroup v1).  ``deferred``:
    holders whose group is a partition only once something runs in it
    (:attr:`GroupSpec.when_populated`).  ``originals``: :attr:`DesiredLayout.originals`;
    ``interrupted``: :attr:`DesiredLayout.interrupted`."""
    if (restore_shared is not None or drop_shared or keep_shared) and leases:
        raise ValueError("the shared group is restored only once nothing is leased")
    by_holder: dict[HolderRef, set[int]] = defaultdict(set)
    held: dict[HolderRef, set[int]] = defaultdict(set)
    for lease in leases:
        (held if lease.role == SIBLING_HOLD else by_holder)[lease.holder].add(lease.cpu)
        by_holder.setdefault(lease.holder, set())
    leased = CpuSet.of(lease.cpu for lease in leases)
    pool, notes = shared_pool(host, leased)
    pool = pool | (shared_extra - leased)
    taken: dict[str, HolderRef] = {}
    specs: list[GroupSpec] = []
    for holder in sorted(by_holder, key=lambda h: (h.driver, h.name, h.key)):
        path = holder_group_path(names, holder)
        if path in taken:  # two holders sanitise to one name: fall back to digests
            kind = holder_group_name(holder, names.stem).removeprefix(names.stem + "-")
            path = join(names.parent, f"{names.stem}-{kind.split('-')[0]}-"
                        f"{_digest(holder.driver + ':' + holder.key)}{PARTITION_SUFFIX}")
        taken[path] = holder
        cpus = CpuSet.of(by_holder[holder]) or CpuSet.of(held[holder])
        specs.append(GroupSpec(path, cpus, "isolated" if holder in isolated else "exclusive",
                               holder, when_populated=holder in deferred))
    return DesiredLayout(
        names=names,
        shared=GroupSpec(names.shared, pool, "member"),
        holders=tuple(specs),
        leased=leased,
        notes=notes,
        restore_shared=restore_shared,
        drop_shared=drop_shared,
        keep_shared=keep_shared,
        online=host.topology.online,
        originals=dict(originals or {}),
        interrupted=dict(interrupted or {}),
    )


def without_partitions_over(desired: DesiredLayout, forbidden: CpuSet,
                            isolated_forbidden: CpuSet | None = None) -> DesiredLayout:
    """``desired`` for a kernel on which no ``root`` partition may hold the ``forbidden``
    CPUs (Linux 6.12+: ``isolcpus=`` CPUs, "partition config conflicts with housekeeping
    setup") and no ``isolated`` one the ``isolated_forbidden`` CPUs (default: the same).

    A holder group holding any forbidden CPU becomes an ``isolated`` partition where the
    kernel takes one (7.3: no scheduler load balancing, which isolcpus CPUs have not
    either, and the kernel still keeps every other cgroup off them), else a plain
    ``member`` cpuset with explicit, disjoint CPUs (6.12): isolcpus keeps the scheduler's
    load balancing (the OS's new tasks) off those CPUs and the layout keeps VMs and jobs
    off each other's, but the kernel does not enforce it (the manager moves the threads
    whose affinity still reaches them).  Each change comes with a note; the other
    holders stay as they were."""
    isolated_forbidden = forbidden if isolated_forbidden is None else isolated_forbidden
    changed = [h for h in desired.holders if h.partition != "member" and h.cpus & forbidden]
    if not changed:
        return desired
    plain = [h for h in changed if h.cpus & isolated_forbidden]
    isolated = [h for h in changed if h not in plain and h.partition != "isolated"]
    def note(groups: list[GroupSpec], refused: CpuSet, what: str, one: str, many: str,
             then: str) -> str:
        cpus = union(h.cpus for h in groups) & refused
        return (f"this kernel refuses {what} holding isolcpus CPUs ({cpus.to_list()}), so "
                f"{', '.join(h.path for h in groups)} {one if len(groups) == 1 else many}"
                f"{then}")

    notes = list(desired.notes)
    if isolated:
        notes.append(note(isolated, forbidden, "root partitions", "is an isolated partition",
                          "are isolated partitions", ": no scheduler load balancing there, as "
                          "isolcpus already has it, and the kernel keeps every other cgroup "
                          "off them"))
    if plain:
        notes.append(note(plain, isolated_forbidden, "cgroup partitions", "is a plain cpuset",
                          "are plain cpusets", ": the kernel cannot enforce exclusivity with "
                          "partitions for them; isolcpus keeps new tasks off them, and "
                          "pinwarden moves threads whose affinity still reaches them until "
                          "the lease ends"))
    kinds: dict[str, PartitionKind] = {h.path: "member" for h in plain}
    kinds.update((h.path, "isolated") for h in isolated)
    return replace(desired,
                   holders=tuple(replace(h, partition=kinds[h.path]) if h.path in kinds else h
                                 for h in desired.holders),
                   notes=tuple(notes))


# -- planning ---------------------------------------------------------------------------

@record
class Target:
    cpus: CpuSet
    mems: CpuSet
    partition: PartitionKind


@record
class Targets:
    """Every group the plan touches: wanted state, and groups to remove."""

    want: Mapping[str, Target]
    remove: frozenset[str] = frozenset()
    kept: tuple[str, ...] = field(default=())  # stale groups kept because they have tasks
    online: CpuSet | None = None  # :attr:`DesiredLayout.online`, for :func:`verify`


class PlanError(Exception):
    """The desired layout cannot be planned (missing parent, populated stale group...)."""


def _populated(snapshot: Snapshot, path: str) -> bool:
    return any(snapshot[p].populated for p in snapshot.subtree(path))


def _follow(child: GroupState, parent_before: GroupState | None, parent_target: Target,
            original: CpuSet | None = None) -> Target:
    """Target of a group we do not own, given its parent's target.  Empty CPUs or memory
    nodes mean "inherit" (cgroup v2): such a group is left so, and a parent going back to
    "inherit" leaves its children's own lists as they are (they only gain room).

    A group with the CPUs of its parent tracks it (libvirt copies a new VM group's CPUs
    from its parent); one with CPUs of its own keeps those the parent still has, else takes
    the parent's.  ``original``: the CPUs it had before pinwarden first changed its parent
    (recorded): kept from those, so the last release gives them back.  Without a record an
    operator's sub-partition on CPU 1 went to 0 during a lease and to 0-1 after it, and one
    on CPU 0 to 0-1 (it had the narrowed parent's CPUs at the release: real-libvirt hunt)."""
    partition = child.partition if parent_target.partition != "member" else "member"
    if not parent_target.cpus:
        return Target(child.cpus, child.mems, partition)
    if not child.cpus:
        cpus = child.cpus
    elif original is not None:
        cpus = original & parent_target.cpus or parent_target.cpus
    elif parent_before is not None and child.cpus == parent_before.cpus:
        cpus = parent_target.cpus
    else:
        cpus = child.cpus & parent_target.cpus or parent_target.cpus
    if not child.mems or not parent_target.mems:
        mems = child.mems
    elif parent_before is not None and child.mems == parent_before.mems:
        mems = parent_target.mems
    else:
        mems = child.mems & parent_target.mems or parent_target.mems
    return Target(cpus, mems, partition)


def targets(current: Snapshot, desired: DesiredLayout) -> Targets:
    """Compute the wanted state of every affected group (pure).  ``current`` must hold
    :meth:`DesiredLayout.read_paths` with their subtrees and the stale holders' subtrees."""
    names = desired.names
    want: dict[str, Target] = {}
    remove: set[str] = set()
    kept: list[str] = []
    restore = desired.restore_shared
    stale = desired.stale_paths(current)
    needed = bool(desired.holders) or bool(stale) or \
        ((restore is not None or desired.drop_shared) and names.shared in current)
    if not needed:  # pinwarden never leased anything here: touch nothing
        return Targets({})
    if names.parent not in current:
        raise PlanError(f"parent cgroup {names.parent or '/'} of {names.shared} does not "
                        f"exist")
    # stale holder groups (and the old exclusive tree): remove when empty, keep (as they
    # are) while someone else's tasks live there.  Removal hands a partition's CPUs back
    # to the parent on every kernel; an emptied partition root would keep them until
    # reboot (v2, 6.1) or be refused (6.12+).
    exclusive_cpus = desired.leased
    for path in stale:
        if _populated(current, path):
            kept.append(path)
            exclusive_cpus = exclusive_cpus | current[path].cpus
        else:
            remove.update(current.subtree(path))

    def mems_for(path: str) -> CpuSet:
        parent = parent_of(path)
        assert parent is not None
        if parent in want:
            return want[parent].mems
        return current[parent].mems

    def own(spec_path: str, cpus: CpuSet, partition: PartitionKind, *,
            inherit: bool = False) -> None:
        """``inherit``: an existing group whose memory nodes are empty keeps them so (the
        shared group on cgroup v2, where empty means the parent's: libvirt's and systemd's
        ``machine``/``machine.slice`` — written, it stayed so after the last lease)."""
        existing = current.get(spec_path)
        parent_mems = mems_for(spec_path)
        keep = existing is not None and (existing.mems <= parent_mems if existing.mems
                                         else inherit)
        mems = existing.mems if keep and existing is not None else parent_mems
        want[spec_path] = Target(cpus, mems, partition)

    # CPUs still used by a kept stale group stay out of the shared pool
    kept_cpus = union(current[p].cpus for p in kept)
    # CPUs that VMs below the shared partition use now stay, unless leased: pins that
    # the placement rules honour (outside the pool) keep working
    in_use = union(current[p].cpus for p in current.subtree(names.shared)
                   if p != names.shared) if names.shared in current else CpuSet()
    shared_cpus = (desired.shared.cpus | in_use) - kept_cpus - exclusive_cpus
    shared_now = current.get(names.shared)
    if desired.drop_shared and not kept_cpus and not exclusive_cpus and \
            shared_now is not None and not shared_now.children and not shared_now.populated:
        remove.add(names.shared)  # pinwarden made it, nothing lives there: gone again
    if restore is not None and not kept_cpus and not exclusive_cpus:
        shared_cpus = restore  # back as found, exactly (empty: inherit, on cgroup v2)
    elif not shared_cpus:  # everything else is leased or kept: whatever the parent has left
        parent = parent_of(names.shared)
        assert parent is not None
        shared_cpus = current[parent].cpus - exclusive_cpus or desired.shared.cpus
    # (keep_shared: an exclusive domain started without the hook runs in its holder group
    # unleased; the shared group written as the pool beside it, machine.slice kept
    # AllowedCPUs=1-3 for good, with no record to put it back: systemd-lab hunt)
    if names.shared not in remove and not desired.keep_shared:
        own(names.shared, shared_cpus, "member", inherit=True)
    for spec in desired.holders:
        waiting = spec.when_populated and not (spec.path in current
                                               and _populated(current, spec.path))
        own(spec.path, spec.cpus, "member" if waiting else spec.partition)
    for path in kept:
        state = current[path]
        want[path] = Target(state.cpus, state.mems, state.partition)

    def judged(path: str) -> GroupState | None:
        """The group as it was before a cut-short sync wrote it (as it is, if it did
        not): who follows whom is judged from that."""
        state = current.get(path)
        was = desired.interrupted.get(path)
        return state if state is None or was is None else replace(state, cpus=was)

    # everything below the owned groups follows its parent
    owned = sorted(want, key=lambda p: (depth(p), p))
    for top in owned:
        if top not in current:
            continue
        for path in current.subtree(top):
            if path == top or path in want or path in remove:
                continue
            parent = parent_of(path)
            assert parent is not None
            child = judged(path)
            assert child is not None
            want[path] = _follow(child, judged(parent), want[parent],
                                 desired.originals.get(path))
    return Targets(want, frozenset(remove), tuple(kept), online=desired.online)


def order(current: Snapshot, goal: Targets) -> list[Op]:
    """Ordered primitive operations from ``current`` to ``goal`` (see the module doc).

    A populated group whose CPUs must move to a disjoint set (its cpus ∩ target is empty)
    cannot be narrowed first — the kernel refuses to leave tasks without CPUs — so it and
    its ancestors are *bridged*: widened to current ∪ target top-down, then narrowed to the
    target bottom-up once the new CPUs are in place — before any other group widens, so
    the CPUs a bridge gives up are free when a sibling takes them.
    """
    ops: list[Op] = []
    cpus_now: dict[str, CpuSet] = {p: current[p].cpus for p in current}
    mems_now: dict[str, CpuSet] = {p: current[p].mems for p in current}
    bottom_up = sorted((p for p in current if p in goal.want or p in goal.remove),
                       key=lambda p: (-depth(p), p))
    top_down = sorted(goal.want, key=lambda p: (depth(p), p))

    def children_now(path: str) -> CpuSet:
        return union(cpus_now[c] for c in current.children(path)
                     if c in cpus_now and c not in goal.remove)

    # phase 1, bottom-up: remove stale groups, exclusive off, narrow to current ∩ target
    for path in bottom_up:
        state = current[path]
        if path in goal.remove:
            ops.append(Rmdir(path))
            del cpus_now[path]
            continue
        target = goal.want[path]
        if state.exclusive and (target.partition == "member"
                                or _left_invalid(state, goal.online)):
            ops.append(SetPartition(path, "member"))
        if not target.cpus and state.cpus:  # back to "inherit" (v2): the widest; phase 3
            continue
        mid = (state.cpus & target.cpus) | children_now(path)
        if not mid and _populated(current, path):
            mid = state.cpus  # stuck: bridged below
        if mid != state.cpus:
            ops.append(SetCpus(path, mid))
            cpus_now[path] = mid
        mems_mid = state.mems & target.mems
        if mems_mid != state.mems and mems_mid:
            ops.append(SetMems(path, mems_mid))
            mems_now[path] = mems_mid
    # phase 2: bridge stuck groups (and their ancestors) top-down, then narrow them
    stuck = [p for p in top_down if p in current and goal.want[p].cpus
             and not cpus_now[p] <= goal.want[p].cpus]
    bridge = {a for p in stuck for a in [*ancestors(p), p] if a in goal.want and a in current}
    for path in sorted(bridge, key=lambda p: (depth(p), p)):
        now, target_cpus = cpus_now[path], goal.want[path].cpus
        wanted = target_cpus if now <= target_cpus else now | target_cpus
        if wanted != now:
            ops.append(SetCpus(path, wanted))
            cpus_now[path] = wanted
    for path in sorted(bridge, key=lambda p: (-depth(p), p)):
        if cpus_now[path] != goal.want[path].cpus:
            ops.append(SetCpus(path, goal.want[path].cpus))
            cpus_now[path] = goal.want[path].cpus
    # phase 3, top-down: create missing groups, widen the others
    for path in top_down:
        target = goal.want[path]
        if path not in current:
            ops.append(Mkdir(path))
            if target.mems:
                ops.append(SetMems(path, target.mems))
            if target.cpus:
                ops.append(SetCpus(path, target.cpus))
            cpus_now[path] = target.cpus
            continue
        if mems_now[path] != target.mems:
            ops.append(SetMems(path, target.mems))
        if cpus_now[path] != target.cpus:
            ops.append(SetCpus(path, target.cpus))
            cpus_now[path] = target.cpus
    # phase 4, top-down: exclusive flags on
    for path in top_down:
        target = goal.want[path]
        before = current.get(path)
        was = before.partition if before is not None \
            and not _left_invalid(before, goal.online) else "member"
        if target.partition != "member" and was != target.partition:
            ops.append(SetPartition(path, target.partition))
    return ops


def plan(current: Snapshot, desired: DesiredLayout) -> list[Op]:
    """Ordered operations turning ``current`` into ``desired``.  Raises :class:`PlanError`."""
    return order(current, targets(current, desired))


def restore_targets(before: Snapshot, now: Snapshot, touched: Iterable[str]) -> Targets:
    """Targets that bring every ``touched`` group back to how ``before`` had it."""
    want: dict[str, Target] = {}
    remove: set[str] = set()
    for path in touched:
        old = before.get(path)
        if old is None:
            if path in now:
                remove.update(now.subtree(path))
        else:
            want[path] = Target(old.cpus, old.mems, old.partition)
    return Targets(want, frozenset(remove - set(want)))


def _left_invalid(state: GroupState, online: CpuSet | None = None) -> bool:
    """A partition the kernel reads as invalid (cgroup v2: a sibling's CPUs overlapped
    it).  Linux 6.1 keeps it invalid after the conflict is gone, until its own partition
    file is written off and on again: the plan does that (``member`` in phase 1, its word in
    phase 4), which also re-checks it on kernels that would have by themselves.  Not one
    none of whose CPUs is ``online``: invalid by hotplug, which the kernel undoes itself."""
    return state.exclusive and state.partition_error is not None and \
        (online is None or bool(state.cpus & online))


def verify(after: Snapshot, goal: Targets, paths: Collection[str] | None = None) -> list[str]:
    """Groups whose read-back state differs from the goal, as one-line descriptions."""
    problems: list[str] = []
    check = goal.want if paths is None else {p: goal.want[p] for p in paths if p in goal.want}
    for path, target in check.items():
        state = after.get(path)
        if state is None:
            problems.append(f"{path} is missing")
            continue
        # CPUs offline are in no effective set, and a partition none of whose CPUs is online
        # is invalid until one comes back, which the kernel sees to itself: neither is a
        # layout the kernel refused (a leased CPU offline failed every change: v2-lab hunt)
        live = target.cpus if goal.online is None else target.cpus & goal.online
        unplugged = bool(target.cpus) and not live
        if state.cpus != target.cpus and not _inherits(state, target):
            problems.append(f"{path} has cpus {state.cpus.to_list() or '(none)'}, "
                            f"expected {target.cpus.to_list() or '(none)'}")
        elif state.effective_cpus != live and live:
            problems.append(f"{path} has effective cpus "
                            f"{state.effective_cpus.to_list() or '(none)'}, "
                            f"expected {live.to_list()}")
        if (state.partition == "member") != (target.partition == "member"):
            problems.append(f"{path} is {state.partition}, expected {target.partition}")
        elif state.partition_error is not None and not unplugged:  # v2: kept, but invalid
            problems.append(f"{path} is an invalid {state.partition} partition (the kernel "
                            f"reports {state.partition_error!r})")
    for path in goal.remove:
        if path in after:
            problems.append(f"{path} still exists")
    return problems


def short_cpus(after: Snapshot, goal: Targets, paths: Collection[str]) -> CpuSet:
    """The CPUs groups of ``paths`` were to have and the kernel does not give them (not in
    their effective set), or the CPUs of a partition it reports invalid: where to look for
    whoever holds them."""
    short = CpuSet()
    for path in paths:
        state, target = after.get(path), goal.want.get(path)
        if state is None or target is None:
            continue
        live = target.cpus if goal.online is None else target.cpus & goal.online
        short = short | (live - state.effective_cpus)
        if state.partition_error is not None:
            short = short | live
    return short


def _inherits(state: GroupState, target: Target) -> bool:
    """A group set to inherit (no CPUs of its own, cgroup v2) that holds what it inherits
    instead: the kernel does not let a group with tasks below it go back to no CPUs, and
    the v2 backend writes its parent's then (``CgroupV2Backend._inherit``)."""
    return not target.cpus and bool(state.cpus) and state.cpus == state.effective_cpus


def union_cpus(specs: Iterable[GroupSpec]) -> CpuSet:
    return union(spec.cpus for spec in specs)
