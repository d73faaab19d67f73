"""The contract between the enforcement core and the cgroup backends (v1, v2, systemd, fake).

A backend is a thin adapter over one cpuset tree.  It knows how to *read* groups into frozen
:class:`GroupState` values and how to perform five primitive writes; it never decides
anything.  Deciding (which groups, which CPUs, in which order) is done by the pure planner in
:mod:`pinwarden.enforce.layout`; executing a plan transactionally (rollback on the first
kernel error, read-back verification) is :mod:`pinwarden.enforce.apply`.

Paths
    Every path is relative to the backend's cpuset root, ``/``-separated, without leading or
    trailing slash; ``""`` is the root itself.  Examples: ``"machine"``,
    ``"pinwarden-run-J.partition"``.  A systemd backend maps them to units
    (``machine.slice`` …) itself; the core never builds filesystem paths.

Partition kinds
    ``member``    an ordinary cpuset (v1 ``cpu_exclusive=0``; v2 ``cpuset.cpus.partition``
                  ``member``);
    ``exclusive`` CPUs owned by this group alone (v1 ``cpu_exclusive=1``, written with
                  ``sched_load_balance=0``, see :meth:`~pinwarden.enforce.v1.CpusetV1.
                  set_partition`; v2 ``root``);
    ``isolated``  exclusive and without scheduler load balancing (v2 ``isolated``; on v1
                  the same as ``exclusive``, and read back as such).

Errors
    Every primitive raises :class:`CgroupOpError` carrying the kernel's errno (``EINVAL``,
    ``EBUSY``, ``ENOSPC``, ``EACCES``, ``ENOENT``, ``EEXIST`` …) and what was attempted.  It is
    *not* a user-facing error: :mod:`~pinwarden.enforce.apply` rolls back and translates it
    into :class:`~pinwarden.errors.EnforceError`.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.names import join as join
from pinwarden.record import field, record

PartitionKind = Literal["member", "exclusive", "isolated"]
PARTITION_KINDS: tuple[PartitionKind, ...] = ("member", "exclusive", "isolated")


# -- paths ------------------------------------------------------------------------------

def parent_of(path: str) -> str | None:
    """Parent path; ``None`` for the root ``""``."""
    if path == "":
        return None
    head, _, _ = path.rpartition("/")
    return head


def ancestors(path: str) -> list[str]:
    """Strict ancestors of ``path``, root first (``"a/b/c"`` → ``["", "a", "a/b"]``)."""
    out: list[str] = []
    cur = parent_of(path)
    while cur is not None:
        out.append(cur)
        cur = parent_of(cur)
    return out[::-1]


def depth(path: str) -> int:
    return 0 if path == "" else path.count("/") + 1


def is_within(path: str, top: str) -> bool:
    """``path`` is ``top`` or one of its descendants."""
    return top == "" or path == top or path.startswith(top + "/")


# -- state ------------------------------------------------------------------------------

@record
class GroupState:
    """One cpuset group as read from the kernel."""

    path: str
    cpus: CpuSet  # configured (v1 cpuset.cpus, v2 cpuset.cpus — empty means inherit on v2)
    mems: CpuSet  # configured memory nodes
    partition: PartitionKind
    effective_cpus: CpuSet
    effective_mems: CpuSet
    populated: bool  # the group itself has tasks (not counting descendants)
    children: tuple[str, ...] = ()  # names (not paths) of direct child groups, sorted
    partition_error: str | None = None  # v2: "root invalid (…)" reason; else None

    @property
    def exclusive(self) -> bool:
        return self.partition != "member"


@record
class Snapshot:
    """Groups read at one moment, by path.  Absent path = the group did not exist."""

    groups: Mapping[str, GroupState] = field(default_factory=dict)

    def get(self, path: str) -> GroupState | None:
        return self.groups.get(path)

    def __getitem__(self, path: str) -> GroupState:
        return self.groups[path]

    def __contains__(self, path: object) -> bool:
        return path in self.groups

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def children(self, path: str) -> list[str]:
        """Paths of the direct children of ``path`` present in the snapshot, sorted."""
        group = self.groups.get(path)
        if group is not None:
            return [join(path, n) for n in group.children if join(path, n) in self.groups]
        return sorted(p for p in self.groups if p != path and parent_of(p) == path)

    def subtree(self, path: str) -> list[str]:
        """``path`` and its descendants present in the snapshot, parents before children."""
        return sorted((p for p in self.groups if is_within(p, path)),
                      key=lambda p: (depth(p), p))


def collect_snapshot(read_group: Callable[[str], GroupState],
                     paths: Iterable[str]) -> Snapshot:
    """:meth:`CgroupBackend.read_state` over a backend's ``read_group``: for every path, the
    group and its whole subtree, every ancestor and each ancestor's direct children.
    A group that does not exist (``ENOENT``: absent, or removed meanwhile by libvirt or
    another tool) is simply absent; any other error propagates."""
    groups: dict[str, GroupState] = {}

    def add(path: str) -> GroupState | None:
        if path not in groups:
            try:
                groups[path] = read_group(path)
            except CgroupOpError as exc:
                if exc.errno != errno_mod.ENOENT:
                    raise
                return None
        return groups[path]

    def add_subtree(path: str) -> None:
        group = add(path)
        for name in group.children if group is not None else ():
            add_subtree(join(path, name))

    for path in paths:
        for anc in ancestors(path):
            group = add(anc)
            for name in group.children if group is not None else ():
                add(join(anc, name))
        add_subtree(path)
    return Snapshot(groups)


# -- operations -------------------------------------------------------------------------

@record
class Mkdir:
    path: str


@record
class Rmdir:
    path: str


@record
class SetCpus:
    path: str
    cpus: CpuSet


@record
class SetMems:
    path: str
    mems: CpuSet


@record
class SetPartition:
    path: str
    kind: PartitionKind


Op = Mkdir | Rmdir | SetCpus | SetMems | SetPartition


def describe(op: Op) -> str:
    """Short human text: ``set cpus of machine to 0``."""
    match op:
        case Mkdir(path):
            return f"create {path or '/'}"
        case Rmdir(path):
            return f"remove {path or '/'}"
        case SetCpus(path, cpus):
            return f"set cpus of {path or '/'} to {cpus.to_list() or '(none)'}"
        case SetMems(path, mems):
            return f"set mems of {path or '/'} to {mems.to_list() or '(none)'}"
        case SetPartition(path, kind):
            return f"make {path or '/'} {kind}"


class CgroupOpError(Exception):
    """A primitive cgroup write or read failed; ``errno`` is the kernel's answer."""

    def __init__(self, action: str, path: str, err: int, *, value: str | None = None,
                 detail: str | None = None) -> None:
        self.action = action  # "mkdir", "rmdir", "cpus", "mems", "partition", "attach", "read"
        self.path = path
        self.errno = err
        self.value = value
        self.detail = detail
        name = errno_mod.errorcode.get(err, str(err))
        text = f"{action} {path or '/'}"
        if value is not None:
            text += f" = {value!r}"
        text += f": {name} ({os.strerror(err)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


# -- the backend protocol ---------------------------------------------------------------

@runtime_checkable
class CgroupBackend(Protocol):
    """One cpuset tree.  Implementations: v1, v2, systemd (D-Bus) and the in-memory fake."""

    @property
    def kind(self) -> str:
        """``"v1"``, ``"v2"``, ``"systemd"`` or ``"fake"`` (for messages and tests)."""
        ...

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        """Read, for every path given: the group and all its descendants, all its ancestors
        up to the root, and the direct children of every ancestor (its siblings and theirs,
        without their subtrees).  Paths that do not exist are simply absent."""
        ...

    def read_group(self, path: str) -> GroupState:
        """One group, freshly read (used to verify effective CPUs after writes).
        Missing group → ``CgroupOpError(ENOENT)``."""
        ...

    def mkdir(self, path: str) -> None:
        """Create one group (its parent exists).  A v1 backend creates the same directory
        in every other mounted hierarchy too (libvirt needs partitions everywhere)."""
        ...

    def rmdir(self, path: str) -> None:
        """Remove one empty group (and its v1 twins in other hierarchies)."""
        ...

    def set_cpus(self, path: str, cpus: CpuSet) -> None: ...

    def set_mems(self, path: str, mems: CpuSet) -> None: ...

    def set_partition(self, path: str, kind: PartitionKind) -> None: ...

    def attach_process(self, path: str, pid: int) -> None:
        """Move every thread of process ``pid`` into the group (v1/v2 ``cgroup.procs``)."""
        ...

    def attach_thread(self, path: str, tid: int) -> None:
        """Move one thread (v1 ``tasks``; v2 only inside threaded subtrees)."""
        ...

    def tasks(self, path: str) -> tuple[int, ...]:
        """Thread ids in the group itself (v1 ``tasks``, v2 ``cgroup.threads``)."""
        ...


def partition_forbidden_cpus(backend: CgroupBackend) -> CpuSet:
    """CPUs no partition may hold on the backend's kernel (optional capability
    ``partition_forbidden_cpus()``; the v2 backend: ``isolcpus=`` CPUs on Linux 6.12+).
    Backends without it (v1, whose exclusive cpusets have no such rule) forbid nothing."""
    probe = getattr(backend, "partition_forbidden_cpus", None)
    if probe is None:
        return CpuSet()
    cpus = probe()
    return cpus if isinstance(cpus, CpuSet) else CpuSet()


def isolated_forbidden_cpus(backend: CgroupBackend) -> CpuSet:
    """CPUs no ``isolated`` partition may hold on the backend's kernel (optional capability
    ``isolated_forbidden_cpus()``; the v2 backend: ``isolcpus=`` CPUs on Linux 6.12, none
    on 7.3, which takes an isolated partition where it refuses a ``root`` one).  Backends
    without it forbid what :func:`partition_forbidden_cpus` forbids."""
    probe = getattr(backend, "isolated_forbidden_cpus", None)
    if probe is None:
        return partition_forbidden_cpus(backend)
    cpus = probe()
    return cpus if isinstance(cpus, CpuSet) else partition_forbidden_cpus(backend)


def setting_files(backend: CgroupBackend, path: str) -> tuple[str, ...] | None:
    """The files outside the cgroup tree in which the backend's writes keep settings of
    ``path`` (optional capability ``setting_files()``: systemd's runtime drop-ins).  None
    for backends whose settings live in the cgroup alone (v1, v2, fake)."""
    probe = getattr(backend, "setting_files", None)
    return None if probe is None else tuple(str(f) for f in probe(path))


def setting_file_cpus(backend: CgroupBackend, path: str) -> tuple[str, CpuSet] | None:
    """The backend's setting file of ``path``'s CPUs and the CPUs it holds (optional
    capability ``setting_file_cpus()``: systemd's runtime ``50-AllowedCPUs.conf``); None
    where there is none."""
    probe = getattr(backend, "setting_file_cpus", None)
    found = None if probe is None else probe(path)
    return None if found is None else (str(found[0]), found[1])


def remove_setting_files(backend: CgroupBackend, path: str,
                         keep: Iterable[str] | None) -> tuple[str, ...]:
    """Remove the setting files of ``path`` that ``keep`` (:func:`setting_files` before the
    first write) does not name: the backend's writes made them (``keep`` None, not known:
    only the files the backend writes under names of its own).  The files removed."""
    probe = getattr(backend, "remove_setting_files", None)
    return () if probe is None else tuple(str(f) for f in probe(path, keep))


def sweep_twins(backend: CgroupBackend, parent: str,
                is_holder: Callable[[str], bool]) -> tuple[str, ...]:
    """Remove the empty copies, in the other cgroup hierarchies, of holder groups below
    ``parent`` (names ``is_holder`` accepts) whose group is gone from the backend's own
    hierarchy (optional capability ``sweep_twins()``: cgroup v1, where libvirt needs a
    partition in every hierarchy; a holder group removed there by hand left its copies
    in the nine others for good, as a stale holder is found in the cpuset hierarchy
    alone).  The paths removed."""
    probe = getattr(backend, "sweep_twins", None)
    return () if probe is None else tuple(str(p) for p in probe(parent, is_holder))


#: The cgroup v1 flag files behind a partition kind, in the order they are put back when
#: ``sched_load_balance`` goes back on (the reverse when it goes back off).
PARTITION_FLAGS = ("cpu_exclusive", "sched_load_balance")


def partition_flags(backend: CgroupBackend, path: str) -> dict[str, bool] | None:
    """The raw flags behind ``path``'s partition kind (optional capability ``flags()``:
    cgroup v1, where ``exclusive`` reads the same with and without ``sched_load_balance``,
    so only the flags themselves can be put back exactly).  None on other backends."""
    probe = getattr(backend, "flags", None)
    if probe is None:
        return None
    flags = probe(path)
    return {name: bool(flags[name]) for name in PARTITION_FLAGS}


def put_flags(backend: CgroupBackend, path: str, flags: Mapping[str, bool]) -> None:
    """Write back the :func:`partition_flags` that differ now (``set_flag()``, cgroup v1):
    ``sched_load_balance`` off before ``cpu_exclusive`` goes on — the order the kernel's
    deadline check lets through (see :meth:`~pinwarden.enforce.v1.CpusetV1.
    set_partition`).  :class:`CgroupOpError` on the first refusal."""
    now = partition_flags(backend, path)
    setter = getattr(backend, "set_flag", None)
    if now is None or setter is None:
        return
    names = PARTITION_FLAGS if flags.get("sched_load_balance", True) \
        else PARTITION_FLAGS[::-1]
    for name in names:
        if name in flags and bool(flags[name]) != now[name]:
            setter(path, name, bool(flags[name]))


def cpuset_enabled(backend: CgroupBackend, path: str) -> bool | None:
    """Whether ``path`` enables the cpuset controller for its children (optional
    capability ``cpuset_enabled()``: cgroup v2 without systemd, where pinwarden's first
    group turns it on).  None where the backend never switches controllers (v1; systemd,
    which switches them itself)."""
    probe = getattr(backend, "cpuset_enabled", None)
    return None if probe is None else bool(probe(path))


def disable_cpuset(backend: CgroupBackend, path: str) -> str | None:
    """Turn the cpuset controller off again below ``path`` where that loses no setting
    (optional capability ``disable_cpuset()``); None once off, else what keeps it on."""
    probe = getattr(backend, "disable_cpuset", None)
    kept = None if probe is None else probe(path)
    return None if kept is None else str(kept)


@record
class HeldBy:
    """A cgroup partition that holds CPUs (:func:`partitions_holding`)."""

    path: str  # the directory, relative to the backend's mount
    directory: str  # the same, absolute (for what to type)
    kind: str  # "root" or "isolated"
    cpus: CpuSet  # the CPUs asked about that it holds


def partitions_holding(backend: CgroupBackend, cpus: CpuSet) -> tuple[HeldBy, ...]:
    """The cgroup partitions, anywhere in the backend's tree, that hold any of ``cpus``
    (optional capability ``partitions_holding()``: cgroup v2, where a partition takes its
    CPUs from every group outside it).  Backends without it (v1, fake) report none."""
    probe = getattr(backend, "partitions_holding", None)
    if probe is None or not cpus:
        return ()
    return tuple(held for held in probe(cpus) if isinstance(held, HeldBy))


def kernel_path(backend: CgroupBackend, path: str) -> str:
    """The cgroup directory, relative to the backend's mount, that the backend path ``path``
    stands for (optional capability ``kernel_path()``: the systemd backend maps
    ``pinwarden-vm-A.partition`` to ``pinwarden\\x2dvm\\x2dA.slice``).  Backends without
    it (v1, v2, fake) use the path itself."""
    probe = getattr(backend, "kernel_path", None)
    if probe is None:
        return path
    return str(probe(path))


def perform(backend: CgroupBackend, op: Op) -> None:
    """Execute one operation on ``backend``."""
    match op:
        case Mkdir(path):
            backend.mkdir(path)
        case Rmdir(path):
            backend.rmdir(path)
        case SetCpus(path, cpus):
            backend.set_cpus(path, cpus)
        case SetMems(path, mems):
            backend.set_mems(path, mems)
        case SetPartition(path, kind):
            backend.set_partition(path, kind)


def sort_paths(paths: Sequence[str], *, bottom_up: bool = False) -> list[str]:
    """Parents before children (or children before parents with ``bottom_up``)."""
    return sorted(paths, key=lambda p: (-depth(p) if bottom_up else depth(p), p))
