"""Execute a plan against a backend as one transaction.

Every operation is performed in order.  On the first kernel error every operation already
done is undone in reverse order (the inverse of each op is computed from the state read
before), and an :class:`~pinwarden.errors.EnforceError` explains the kernel's refusal in one
line: which CPU, which cgroup holds it, what to do.  After the last operation the owned
groups are read back; a mismatch (effective CPUs not what was asked) is rolled back too.

:func:`sync` is the entry point the rest of pinwarden uses: read, plan, apply, verify,
serialised between pinwarden processes by the lease manager's lock.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Callable, Mapping, Sequence

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import (
    CgroupBackend,
    CgroupOpError,
    HeldBy,
    Mkdir,
    Op,
    PartitionKind,
    Rmdir,
    SetCpus,
    SetMems,
    SetPartition,
    Snapshot,
    describe,
    is_within,
    isolated_forbidden_cpus,
    kernel_path,
    parent_of,
    partition_forbidden_cpus,
    partitions_holding,
    perform,
)
from pinwarden.enforce.layout import (
    DesiredLayout,
    PlanError,
    Targets,
    order,
    short_cpus,
    targets,
    verify,
    without_partitions_over,
)
from pinwarden.errors import EnforceError
from pinwarden.record import record


@record(frozen=False)
class _Tracked:
    cpus: CpuSet
    mems: CpuSet
    partition: PartitionKind


@record
class Result:
    ops: tuple[Op, ...]
    before: Snapshot
    after: Snapshot
    desired: DesiredLayout | None = None


def _inverse(op: Op, state: dict[str, _Tracked]) -> list[Op]:
    """Operations undoing ``op``, given the state just before it."""
    match op:
        case Mkdir(path):
            return [Rmdir(path)]
        case Rmdir(path):
            old = state.get(path)
            undo: list[Op] = [Mkdir(path)]
            if old is not None:
                if old.mems:
                    undo.append(SetMems(path, old.mems))
                if old.cpus:
                    undo.append(SetCpus(path, old.cpus))
                if old.partition != "member":
                    undo.append(SetPartition(path, old.partition))
            return undo
        case SetCpus(path, _):
            return [SetCpus(path, state[path].cpus)] if path in state else []
        case SetMems(path, _):
            return [SetMems(path, state[path].mems)] if path in state else []
        case SetPartition(path, _):
            return [SetPartition(path, state[path].partition)] if path in state else []
    return []


def _advance(op: Op, state: dict[str, _Tracked]) -> None:
    match op:
        case Mkdir(path):
            state[path] = _Tracked(CpuSet(), CpuSet(), "member")
        case Rmdir(path):
            state.pop(path, None)
        case SetCpus(path, cpus):
            state[path].cpus = cpus
        case SetMems(path, mems):
            state[path].mems = mems
        case SetPartition(path, kind):
            state[path].partition = kind


def _show(path: str) -> str:
    return "/" + path


def explain(exc: CgroupOpError, op: Op, state: Mapping[str, _Tracked],
            owners: Mapping[str, str]) -> str:
    """One line: what the kernel refused and why, from the state at the moment of failure,
    followed by the backend's own words when it has any (``CgroupOpError.detail``: a v2
    partition's invalid reason, systemd's D-Bus answer and hint)."""
    message = _explain(exc, op, state, owners)
    detail = " ".join((exc.detail or "").split())  # one line, whatever the backend said
    if detail and detail not in message:
        message += f" ({detail})"
    return message


def _explain(exc: CgroupOpError, op: Op, state: Mapping[str, _Tracked],
             owners: Mapping[str, str]) -> str:
    path = op.path
    who = owners.get(path, _show(path))
    parent = parent_of(path)
    err = exc.errno

    def owner(p: str) -> str:
        return owners.get(p, f"cgroup {_show(p)} (not managed by pinwarden)")

    def siblings() -> list[str]:
        return sorted(p for p in state if p != path and parent_of(p) == parent)

    wanted: CpuSet | None = None
    exclusive = False
    if isinstance(op, SetCpus):
        wanted = op.cpus
        exclusive = path in state and state[path].partition != "member"
    elif isinstance(op, SetPartition):
        wanted = state[path].cpus if path in state else None
        exclusive = op.kind != "member"
    if err == errno_mod.EINVAL and wanted is not None:
        for sib in siblings():
            other = state[sib]
            clash = wanted & other.cpus
            if clash and (exclusive or other.partition != "member"):
                return (f"cannot give {clash.named()} to {who}: {owner(sib)} holds "
                        f"{other.cpus.named()}"
                        f"{' exclusively' if other.partition != 'member' else ''}; "
                        f"free {'it' if len(clash) == 1 else 'them'} there first "
                        f"(kernel said EINVAL; nothing was changed)")
        if exc.detail:  # the backend knows why (appended by explain): no guessing
            return f"the kernel refused to {describe(op)} (EINVAL); nothing was changed"
        return (f"the kernel refused to {describe(op)} (EINVAL): {wanted.named()} "
                f"not online or not usable; nothing was changed")
    if err == errno_mod.ERANGE and wanted is not None:
        return f"cannot {describe(op)}: no such CPU on this host (ERANGE); nothing was changed"
    if err == errno_mod.EACCES and parent is not None and parent in state \
            and not isinstance(op, (Mkdir, Rmdir)):
        par = state[parent]
        if wanted is not None and not wanted <= par.cpus:
            return (f"cannot {describe(op)}: {(wanted - par.cpus).named()} not in parent "
                    f"{_show(parent)} ({par.cpus.named()}); widen the parent first "
                    f"(EACCES; nothing was changed)")
        if exclusive and par.partition == "member":
            return (f"cannot make {who} exclusive: its parent {_show(parent)} is not "
                    f"exclusive (EACCES; nothing was changed)")
    if err in (errno_mod.EACCES, errno_mod.EPERM):
        return (f"permission denied to {describe(op)} ({errno_mod.errorcode[err]}): "
                f"pinwarden must run as root; nothing was changed")
    if err == errno_mod.EBUSY:
        if isinstance(op, Rmdir):
            return (f"cannot remove {who}: tasks or child cgroups still live there "
                    f"(EBUSY); nothing was changed")
        for child in sorted(p for p in state if parent_of(p) == path):
            if wanted is not None and not state[child].cpus <= wanted:
                return (f"cannot {describe(op)}: child {owner(child)} still uses "
                        f"{(state[child].cpus - wanted).named()} (EBUSY; nothing was changed)")
        return (f"the kernel refused to {describe(op)}: busy (EBUSY) — a VM starting or "
                f"stopping meanwhile can cause it: try again; nothing was changed")
    if err == errno_mod.ENOSPC:
        return (f"cannot {describe(op)}: {who} has tasks, which would be left without "
                f"CPUs or memory nodes (ENOSPC); nothing was changed")
    if err == errno_mod.ENOENT:
        return (f"cannot {describe(op)}: the cgroup does not exist (it vanished, or its "
                f"parent is missing) (ENOENT); nothing was changed")
    name = errno_mod.errorcode.get(err, str(err))
    return f"the kernel refused to {describe(op)}: {os.strerror(err)} ({name}); " \
           f"nothing was changed"


def _rollback(backend: CgroupBackend, undo: list[list[Op]]) -> list[str]:
    failures: list[str] = []
    for ops in reversed(undo):
        for op in ops:
            try:
                perform(backend, op)
            except CgroupOpError as exc:
                code = errno_mod.errorcode.get(exc.errno, str(exc.errno))
                failures.append(f"{describe(op)}: {code}")
    return failures


def execute(backend: CgroupBackend, before: Snapshot, ops: Sequence[Op], *,
            goal: Targets | None = None, check: Sequence[str] = (),
            owners: Mapping[str, str] | None = None) -> Snapshot:
    """Perform ``ops`` (planned from ``before``); roll back and raise on any failure.

    ``check``: paths whose state is read back and compared with ``goal`` at the end.
    Returns the state read back (the paths in ``before``'s roots and ``check``).
    """
    owners = owners or {}
    state = {p: _Tracked(g.cpus, g.mems, g.partition) for p, g in before.groups.items()}
    undo: list[list[Op]] = []
    for op in ops:
        inverse = _inverse(op, state)
        try:
            perform(backend, op)
        except CgroupOpError as exc:
            message = explain(exc, op, state, owners)
            failures = _rollback(backend, undo)
            if failures:
                message = message.replace("nothing was changed",
                                          "ROLLBACK FAILED: " + "; ".join(failures))
            raise EnforceError(message, partial=bool(failures)) from exc
        undo.append(inverse)
        _advance(op, state)
    roots = [p for p in check if p in state]
    after = backend.read_state(roots) if roots else Snapshot({})
    if goal is not None and check:
        checked = [p for p in check if p in goal.want]
        problems = verify(after, goal, checked)
        if problems:
            # read before the rollback hands the CPUs back: who else holds them
            ours = [kernel_path(backend, p) for p in (*goal.want, *owners)]
            others = [held for held in partitions_holding(backend,
                                                          short_cpus(after, goal, checked))
                      if not any(is_within(held.path, own) for own in ours if own)]
            failures = _rollback(backend, undo)
            tail = "; rolled back" if not failures else \
                "; ROLLBACK FAILED: " + "; ".join(failures)
            raise EnforceError(f"the kernel did not apply the layout: {problems[0]}"
                               f"{held_elsewhere(others)}{tail}", partial=bool(failures))
    return after


def held_elsewhere(partitions: Sequence[HeldBy]) -> str:
    """What to say of cgroup partitions that are not pinwarden's and hold CPUs its layout
    needs (a ``root`` or ``isolated`` partition somebody made takes its CPUs from every
    other group; the error named only the shortfall: cgroup-v2 hunt): which, and what to
    do.  Empty when there are none."""
    if not partitions:
        return ""
    shown = "; ".join(f"{held.cpus.named()} {'is' if len(held.cpus) == 1 else 'are'} held "
                      f"by the cgroup partition {held.directory} ({held.kind}), which is "
                      f"not pinwarden's" for held in partitions[:3])
    first = partitions[0]
    return (f": {shown}{'; …' if len(partitions) > 3 else ''} (make it an ordinary "
            f"cgroup again, 'echo member > {first.directory}/cpuset.cpus.partition', or "
            f"leave {first.cpus.named()} out of the VM CPUs)")


def owner_names(desired: DesiredLayout) -> dict[str, str]:
    """Human names of the groups pinwarden owns, for error messages."""
    names = {desired.shared.path: f"the shared partition {_show(desired.shared.path)}"}
    for spec in desired.holders:
        if spec.holder is not None:
            names[spec.path] = f"{spec.holder} ({_show(spec.path)})"
    return names


#: What :func:`sync` calls before its first write: the snapshot read and the plan's targets.
BeforeWrite = Callable[[Snapshot, Targets], None]


def apply_layout(backend: CgroupBackend, desired: DesiredLayout, *,
                 before_write: BeforeWrite | None = None) -> Result:
    """Read the current state, plan towards ``desired``, execute and verify.

    On a kernel where no ``root`` partition may hold some CPUs (``isolcpus=`` CPUs on Linux
    6.12+, see :func:`~pinwarden.enforce.layout.without_partitions_over`) the holder groups
    over them are ``isolated`` partitions (7.3) or plain cpusets (6.12);
    ``Result.desired.notes`` says so.  A kernel that refuses such a partition without the
    backend expecting it (a backport, or a kernel between those) is re-planned the same
    way, at most twice.
    """
    adapted = adapt_to_kernel(backend, desired)
    while True:  # each refusal the backend remembers forbids more: root, then isolated
        try:
            return _apply_layout(backend, adapted, before_write)
        except EnforceError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, CgroupOpError) and cause.detail
                    and "housekeeping" in cause.detail.lower()):
                raise
            again = adapt_to_kernel(backend, desired)
            if again == adapted:  # nothing learnt: the same plan would fail the same way
                raise
            adapted = again


def adapt_to_kernel(backend: CgroupBackend, desired: DesiredLayout) -> DesiredLayout:
    """``desired`` with the holder groups the backend's kernel would refuse as partitions
    made what it takes (:func:`~pinwarden.enforce.layout.without_partitions_over`)."""
    return without_partitions_over(desired, partition_forbidden_cpus(backend),
                                   isolated_forbidden_cpus(backend))


def read_current(backend: CgroupBackend, desired: DesiredLayout) -> Snapshot:
    """What planning ``desired`` needs: the shared group, the holder groups and the stale
    holder groups beside them, each with its subtree."""
    paths = desired.read_paths()
    before = backend.read_state(paths)
    stale = desired.stale_paths(before)
    return backend.read_state((*paths, *stale)) if stale else before


def _apply_layout(backend: CgroupBackend, desired: DesiredLayout,
                  before_write: BeforeWrite | None = None) -> Result:
    before = read_current(backend, desired)
    try:
        goal = targets(before, desired)
    except PlanError as exc:
        raise EnforceError(str(exc)) from None
    if before_write is not None:
        before_write(before, goal)
    ops = order(before, goal)
    owned = [spec.path for spec in desired.groups() if spec.path in goal.want]
    after = execute(backend, before, ops, goal=goal, check=owned,
                    owners=owner_names(desired))
    return Result(tuple(ops), before, after, desired)


def sync(backend: CgroupBackend, desired: DesiredLayout, *,
         before_write: BeforeWrite | None = None) -> Result:
    """Make the cgroups match ``desired``, re-reading and re-planning when another tool
    (libvirt starting or stopping a VM) created or removed a group between our read and
    our write.  The caller (the lease manager) serialises it with every other change.
    ``before_write``: called with what was read and the plan, before the first write (to
    record what the plan changes)."""
    for attempt in range(RACE_RETRIES + 1):
        try:
            return apply_layout(backend, desired, before_write=before_write)
        except EnforceError as exc:
            cause = exc.__cause__
            raced = isinstance(cause, CgroupOpError) and cause.errno in RACE_ERRNOS
            if not raced or attempt == RACE_RETRIES:
                raise
    raise AssertionError("unreachable")


#: A group created or removed by someone else (libvirt starting or stopping a VM) between
#: our read and our write: read again and re-plan, a few times.  EBUSY: cgroup v1 refuses
#: to narrow a parent below the CPUs of a child made meanwhile (a starting VM's group,
#: which libvirt fills with its parent's CPUs): the new snapshot narrows it first (hunt).
RACE_ERRNOS = frozenset({errno_mod.ENOENT, errno_mod.EEXIST, errno_mod.EBUSY})
RACE_RETRIES = 2
