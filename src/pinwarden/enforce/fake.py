"""An in-memory cgroup v1 cpuset tree that refuses what the kernel refuses, errno for errno.

It follows ``kernel/cgroup/cpuset.c`` / ``cpuset-v1.c`` (Linux 6.x) for legacy hierarchies:

* writing ``cpuset.cpus``/``cpuset.mems`` of the root: ``EACCES``;
* CPUs beyond the possible CPUs: ``ERANGE`` (``cpulist_parse``); not online, or nodes not in
  the root's: ``EINVAL``; an unchanged value succeeds without further checks;
* every other change (and every flag write, even unchanged) runs ``validate_change``:

  1. each child must stay a subset (cpus, mems, ``cpu_exclusive``, ``mem_exclusive``) of
     the new value: ``EBUSY``;
  2. the new value must be a subset of the parent (same four fields): ``EACCES``;
  3. (not for the root) a populated cgroup — tasks in it or any descendant — cannot go
     from some to no cpus or mems: ``ENOSPC``; with ``deadline_servers`` (Linux 6.12+,
     modelled from the source, not checked by the differential test), an exclusive,
     load-balanced, non-empty cpuset cannot change to CPUs too few for every CPU's
     deadline server (``EBUSY``);
  4. (not for the root) if the group or a sibling is ``cpu_exclusive``, their cpus must
     not intersect (likewise mems with ``mem_exclusive``): ``EINVAL``;

* attaching a task to a cpuset with no cpus or no mems: ``ENOSPC``;
* ``rmdir`` of a populated group or one with children: ``EBUSY``; ``mkdir`` of an existing
  name: ``EEXIST``; anything under a missing group: ``ENOENT``.

A differential test (``tests/test_enforce_differential.py``) replays random operation
sequences on the real kernel and on this fake and checks they agree.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import (
    CgroupOpError,
    GroupState,
    PartitionKind,
    Snapshot,
    collect_snapshot,
    join,
    parent_of,
)
from pinwarden.record import field, record

_NONE = CpuSet()
# sched_rt_runtime_us / period = 950000 / 1000000 and the fair server's 50 ms / 1 s, both
# as the kernel's 20-bit fixed point ratios (to_ratio): dl_cpuset_cpumask_can_shrink()
_DL_LIMIT = (950000 << 20) // 1000000
_FAIR_SERVER_BW = (50_000_000 << 20) // 1_000_000_000
_NODE0 = CpuSet(frozenset({0}))


@record(frozen=False)
class _Node:
    cpus: CpuSet = _NONE
    mems: CpuSet = _NONE
    cpu_exclusive: bool = False
    mem_exclusive: bool = False
    sched_load_balance: bool = True
    tasks: set[int] = field(default_factory=set)
    children: dict[str, _Node] = field(default_factory=dict)


class FakeCpusetV1:
    """Implements :class:`~pinwarden.enforce.backend.CgroupBackend` in memory."""

    def __init__(self, online: CpuSet, mems: CpuSet = _NODE0, *,
                 possible: int | None = None, max_nodes: int = 1024,
                 real_pids: bool = False, deadline_servers: bool = False) -> None:
        self.possible = possible if possible is not None else max(online.cpus, default=0) + 1
        self.max_nodes = max_nodes
        self.root = _Node(cpus=online, mems=mems, cpu_exclusive=True, mem_exclusive=True)
        self.deadline_servers = deadline_servers  # Linux 6.12+: per-CPU deadline servers
        self.real_pids = real_pids  # tasks are real pids: forget them once they exit
        self.fail_at: dict[tuple[str, str], int] = {}  # (action, path) -> errno to inject
        self.writes = 0  # successful primitive writes, for tests

    @property
    def kind(self) -> str:
        return "fake"

    # -- tree helpers -------------------------------------------------------------------

    def _prune(self, node: _Node) -> None:
        node.tasks = {t for t in node.tasks if os.path.exists(f"/proc/{t}")}
        for child in node.children.values():
            self._prune(child)

    def _node(self, path: str, action: str = "read") -> _Node:
        if self.real_pids:
            self._prune(self.root)
        node = self.root
        if path == "":
            return node
        for part in path.split("/"):
            child = node.children.get(part)
            if child is None:
                raise CgroupOpError(action, path, errno.ENOENT)
            node = child
        return node

    def _parent(self, path: str) -> _Node | None:
        parent = parent_of(path)
        return None if parent is None else self._node(parent)

    @staticmethod
    def _populated(node: _Node) -> bool:
        return bool(node.tasks) or any(FakeCpusetV1._populated(c)
                                       for c in node.children.values())

    def _injected(self, action: str, path: str) -> None:
        err = self.fail_at.pop((action, path), None)
        if err is not None:
            raise CgroupOpError(action, path, err, detail="injected failure")

    @staticmethod
    def _subset(p: _Node, q: _Node) -> bool:
        return (p.cpus <= q.cpus and p.mems <= q.mems
                and p.cpu_exclusive <= q.cpu_exclusive
                and p.mem_exclusive <= q.mem_exclusive)

    def _validate(self, path: str, cur: _Node, trial: _Node, action: str,
                  value: str | None) -> None:
        def fail(err: int, why: str) -> CgroupOpError:
            return CgroupOpError(action, path, err, value=value, detail=why)

        for name, child in sorted(cur.children.items()):
            if not self._subset(child, trial):
                raise fail(errno.EBUSY, f"child {join(path, name)} would not be a subset")
        parent = self._parent(path)
        if parent is not None and not self._subset(trial, parent):
            raise fail(errno.EACCES, "not a subset of the parent")
        if parent is None:
            return
        if self._populated(cur) and ((cur.cpus and not trial.cpus)
                                     or (cur.mems and not trial.mems)):
            raise fail(errno.ENOSPC, "the cpuset has tasks")
        if (self.deadline_servers and cur.cpu_exclusive and cur.sched_load_balance
                and cur.cpus and _DL_LIMIT * len(trial.cpus)
                < _FAIR_SERVER_BW * len(self.root.cpus)):
            raise fail(errno.EBUSY, "the CPUs could not hold the deadline bandwidth")
        me = path.rsplit("/", 1)[-1]
        for name, sib in sorted(parent.children.items()):
            if name == me:
                continue
            if (trial.cpu_exclusive or sib.cpu_exclusive) and not trial.cpus.isdisjoint(sib.cpus):
                sib_path = join(parent_of(path) or "", name)
                raise fail(errno.EINVAL, f"overlaps exclusive sibling {sib_path}")
            if (trial.mem_exclusive or sib.mem_exclusive) and not trial.mems.isdisjoint(sib.mems):
                raise fail(errno.EINVAL, f"mems overlap sibling {name}")

    @staticmethod
    def _trial(node: _Node, **changes: object) -> _Node:
        values = {"cpus": node.cpus, "mems": node.mems, "cpu_exclusive": node.cpu_exclusive,
                  "mem_exclusive": node.mem_exclusive,
                  "sched_load_balance": node.sched_load_balance}
        values.update(changes)
        return _Node(tasks=node.tasks, children=node.children, **values)  # type: ignore[arg-type]

    # -- reads --------------------------------------------------------------------------

    def _state(self, path: str, node: _Node) -> GroupState:
        kind: PartitionKind = "exclusive" if node.cpu_exclusive else "member"
        return GroupState(path=path, cpus=node.cpus, mems=node.mems, partition=kind,
                          effective_cpus=node.cpus, effective_mems=node.mems,
                          populated=bool(node.tasks), children=tuple(sorted(node.children)))

    def read_group(self, path: str) -> GroupState:
        return self._state(path, self._node(path))

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        return collect_snapshot(self.read_group, paths)

    def tasks(self, path: str) -> tuple[int, ...]:
        return tuple(sorted(self._node(path).tasks))

    def flags(self, path: str) -> dict[str, bool]:
        node = self._node(path)
        return {"cpu_exclusive": node.cpu_exclusive, "mem_exclusive": node.mem_exclusive,
                "sched_load_balance": node.sched_load_balance}

    # -- writes -------------------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        self._injected("mkdir", path)
        parent_path = parent_of(path)
        if parent_path is None:
            raise CgroupOpError("mkdir", path, errno.EEXIST)
        try:
            parent = self._node(parent_path)
        except CgroupOpError:
            raise CgroupOpError("mkdir", path, errno.ENOENT) from None
        name = path.rsplit("/", 1)[-1]
        if name in parent.children:
            raise CgroupOpError("mkdir", path, errno.EEXIST)
        parent.children[name] = _Node()
        self.writes += 1

    def rmdir(self, path: str) -> None:
        self._injected("rmdir", path)
        node = self._node(path, "rmdir")
        parent = self._parent(path)
        if parent is None or node.children or self._populated(node):
            raise CgroupOpError("rmdir", path, errno.EBUSY)
        del parent.children[path.rsplit("/", 1)[-1]]
        self.writes += 1

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        self._injected("cpus", path)
        node = self._node(path, "cpus")
        value = cpus.to_list()
        if path == "":
            raise CgroupOpError("cpus", path, errno.EACCES, value=value)
        if any(cpu >= self.possible for cpu in cpus):
            raise CgroupOpError("cpus", path, errno.ERANGE, value=value)
        if not cpus <= self.root.cpus:
            raise CgroupOpError("cpus", path, errno.EINVAL, value=value,
                                detail="CPUs not online")
        if cpus == node.cpus:
            return
        self._validate(path, node, self._trial(node, cpus=cpus), "cpus", value)
        node.cpus = cpus
        self.writes += 1

    def set_mems(self, path: str, mems: CpuSet) -> None:
        self._injected("mems", path)
        node = self._node(path, "mems")
        value = mems.to_list()
        if path == "":
            raise CgroupOpError("mems", path, errno.EACCES, value=value)
        if any(m >= self.max_nodes for m in mems):
            raise CgroupOpError("mems", path, errno.ERANGE, value=value)
        if not mems <= self.root.mems:
            raise CgroupOpError("mems", path, errno.EINVAL, value=value,
                                detail="nodes without memory")
        if mems == node.mems:
            return
        self._validate(path, node, self._trial(node, mems=mems), "mems", value)
        node.mems = mems
        self.writes += 1

    def set_flag(self, path: str, flag: str, on: bool) -> None:
        """Write one v1 flag file (``cpu_exclusive``, ``mem_exclusive``,
        ``sched_load_balance``), validating like ``cpuset_update_flag``."""
        self._injected(flag, path)
        node = self._node(path, flag)
        self._validate(path, node, self._trial(node, **{flag: on}), flag, str(int(on)))
        setattr(node, flag, on)
        self.writes += 1

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        # the same writes, in the same order, as the v1 backend (see CpusetV1.set_partition)
        if kind == "member":
            self.set_flag(path, "cpu_exclusive", False)
            if not self._node(path).sched_load_balance:
                self.set_flag(path, "sched_load_balance", True)
            return
        balanced = self._node(path).sched_load_balance
        if balanced:
            self.set_flag(path, "sched_load_balance", False)
        try:
            self.set_flag(path, "cpu_exclusive", True)
        except CgroupOpError:
            if balanced:
                self._node(path).sched_load_balance = True
            raise

    def attach_process(self, path: str, pid: int) -> None:
        self.attach_thread(path, pid)

    def attach_thread(self, path: str, tid: int) -> None:
        self._injected("attach", path)
        node = self._node(path, "attach")
        if not node.cpus or not node.mems:
            raise CgroupOpError("attach", path, errno.ENOSPC, value=str(tid),
                                detail="the cpuset has no cpus or no mems")
        self._detach(self.root, tid)
        node.tasks.add(tid)

    def _detach(self, node: _Node, tid: int) -> None:
        node.tasks.discard(tid)
        for child in node.children.values():
            self._detach(child, tid)

    def exit(self, tid: int) -> None:
        """A task ends: it leaves its cpuset."""
        self._detach(self.root, tid)
