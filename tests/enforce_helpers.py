"""Shared builders for the enforcement tests (hosts, fakes, failure injection)."""

from __future__ import annotations

import errno
from collections.abc import Iterable

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.apply import Result, sync
from pinwarden.enforce.backend import (
    CgroupBackend,
    CgroupOpError,
    GroupState,
    PartitionKind,
    Snapshot,
)
from pinwarden.enforce.fake import FakeCpusetV1
from pinwarden.enforce.layout import LayoutNames, desired_layout
from pinwarden.model import HolderRef, Lease, domain_holder, job_holder
from pinwarden.partition import Host, Partition
from pinwarden.topology import Cpu, Topology


def make_host(online: str = "0-3", vm: str = "1-3") -> Host:
    cpus = CpuSet.parse_kernel(online)
    vm_cpus = CpuSet.parse_kernel(vm)
    topo = Topology(
        cpus={i: Cpu(id=i, online=True, package=0, die=0, cluster=None, core=i,
                     siblings=CpuSet.of([i]), node=0) for i in cpus},
        present=cpus, online=cpus, isolated=CpuSet(), nohz_full=CpuSet(),
        nodes={0: cpus})
    part = Partition(mode="none", vm_cpus=vm_cpus, host_cpus=cpus - vm_cpus,
                     reason="test host")
    return Host(topo, part)


def holder(name: str, driver: str = "run") -> HolderRef:
    """A job (driver ``run``) or a domain without UUID named ``name``."""
    return job_holder(name) if driver == "run" else domain_holder(driver, name, None)


def lease(cpu: int, name: str, driver: str = "run", role: str = "task") -> Lease:
    return Lease(cpu=cpu, holder=holder(name, driver), role=role, created=0.0)


def sync_leases(backend: CgroupBackend, host: Host, leases: Iterable[Lease],
                names: LayoutNames | None = None) -> Result:
    """The layout for ``leases`` applied (what the lease manager's sync does, without a
    ledger)."""
    return sync(backend, desired_layout(host, list(leases), names or LayoutNames()))


def build(fake: FakeCpusetV1, tree: dict[str, tuple[str, bool]],
          tasks: dict[str, Iterable[int]] | None = None) -> None:
    """Create groups (parents first): path -> (cpus, exclusive); mems copied from root."""
    for path in sorted(tree, key=lambda p: p.count("/")):
        cpus, exclusive = tree[path]
        fake.mkdir(path)
        fake.set_mems(path, fake.read_group("").mems)
        if cpus:
            fake.set_cpus(path, CpuSet.parse_kernel(cpus))
        if exclusive:
            fake.set_partition(path, "exclusive")
    for path, tids in (tasks or {}).items():
        for tid in tids:
            fake.attach_thread(path, tid)


def whole(backend: CgroupBackend) -> Snapshot:
    """Every group of the tree (the root's subtree)."""
    return backend.read_state([""])


class FailingBackend:
    """Delegates to a backend but fails the ``fail_at``-th mutating call (0-based)."""

    def __init__(self, inner: FakeCpusetV1, fail_at: int, err: int = errno.EIO) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.err = err
        self.calls = 0

    @property
    def kind(self) -> str:
        return self.inner.kind  # the same cgroup model (v1), failing on purpose

    def _tick(self, action: str, path: str) -> None:
        n = self.calls
        self.calls += 1
        if n == self.fail_at:
            raise CgroupOpError(action, path, self.err, detail="injected")

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        return self.inner.read_state(paths)

    def read_group(self, path: str) -> GroupState:
        return self.inner.read_group(path)

    def mkdir(self, path: str) -> None:
        self._tick("mkdir", path)
        self.inner.mkdir(path)

    def rmdir(self, path: str) -> None:
        self._tick("rmdir", path)
        self.inner.rmdir(path)

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        self._tick("cpus", path)
        self.inner.set_cpus(path, cpus)

    def set_mems(self, path: str, mems: CpuSet) -> None:
        self._tick("mems", path)
        self.inner.set_mems(path, mems)

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        self._tick("partition", path)
        self.inner.set_partition(path, kind)

    def attach_process(self, path: str, pid: int) -> None:
        self.inner.attach_process(path, pid)

    def attach_thread(self, path: str, tid: int) -> None:
        self.inner.attach_thread(path, tid)

    def tasks(self, path: str) -> tuple[int, ...]:
        return self.inner.tasks(path)
