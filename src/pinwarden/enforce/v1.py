"""cgroup v1 cpuset backend: reads and writes ``/sys/fs/cgroup/cpuset`` (or wherever it is).

Thin adapter, no decisions.  Each write is a single ``write(2)`` of the kernel's own text
format, and its errno is reported as :class:`~pinwarden.enforce.backend.CgroupOpError`.

libvirt (``virCgroupNewPartition`` with ``create=false``) requires a non-default partition
such as ``/pinwarden-vm-A`` to exist as ``pinwarden-vm-A.partition`` in *every*
hierarchy it uses, so :meth:`CpusetV1.mkdir` creates the same directory (and missing parents)
in every other mounted cgroup hierarchy (``mirrors``) and :meth:`CpusetV1.rmdir` removes
those twins again when they are empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pinwarden.cpuset import CpuSet, CpuSetError
from pinwarden.enforce.backend import (
    CgroupOpError,
    GroupState,
    PartitionKind,
    Snapshot,
    ancestors,
    collect_snapshot,
)
from pinwarden.errors import HostError
from pinwarden.mounts import read_mounts

DEFAULT_ROOT = Path("/sys/fs/cgroup/cpuset")


class CpusetV1:
    """Implements :class:`~pinwarden.enforce.backend.CgroupBackend` on a v1 cpuset mount."""

    def __init__(self, root: Path = DEFAULT_ROOT, mirrors: Sequence[Path] = ()) -> None:
        self.root = root
        self.mirrors = tuple(m for m in mirrors if m != root)
        self.prefix = "cpuset." if (root / "cpuset.cpus").exists() else ""

    @classmethod
    def from_mounts(cls, root: Path = Path("/")) -> CpusetV1:
        """The cpuset hierarchy of the host at ``root``; every other mounted hierarchy (v1
        and the hybrid cgroup2 mount) becomes a mirror."""
        mounts = read_mounts(root)
        cpuset = mounts.v1("cpuset")
        others: list[Path] = []
        for point in [*mounts.v1_mounts.values(), mounts.unified]:
            if point is not None and point != cpuset and point not in others:
                others.append(point)
        if cpuset is None:
            raise HostError("no cgroup v1 cpuset hierarchy is mounted "
                            "(mount -t cgroup -o cpuset cpuset /sys/fs/cgroup/cpuset)")
        return cls(cpuset, others)

    @property
    def kind(self) -> str:
        return "v1"

    # -- low level ----------------------------------------------------------------------

    def _dir(self, path: str, base: Path | None = None) -> Path:
        return (base or self.root) / path if path else (base or self.root)

    def _file(self, path: str, name: str) -> Path:
        return self._dir(path) / name

    def _read(self, path: str, name: str) -> str:
        try:
            return self._file(path, name).read_text(errors="replace")
        except OSError as exc:
            raise CgroupOpError("read", path, exc.errno or errno.EIO,
                                detail=name) from None

    def _write(self, action: str, path: str, name: str, value: str) -> None:
        target = self._file(path, name)
        try:
            fd = os.open(target, os.O_WRONLY)
        except OSError as exc:
            raise CgroupOpError(action, path, exc.errno or errno.EIO, value=value) from None
        try:
            os.write(fd, value.encode() if value else b"\n")
        except OSError as exc:
            raise CgroupOpError(action, path, exc.errno or errno.EIO, value=value) from None
        finally:
            os.close(fd)

    def _list(self, path: str, name: str) -> CpuSet:
        text = self._read(path, self.prefix + name)
        try:
            return CpuSet.parse_kernel(text)
        except CpuSetError as exc:
            raise CgroupOpError("read", path, errno.EIO, detail=exc.message) from None

    def _flag(self, path: str, name: str) -> bool:
        return self._read(path, self.prefix + name).strip() == "1"

    # -- reads --------------------------------------------------------------------------

    def read_group(self, path: str) -> GroupState:
        directory = self._dir(path)
        if not directory.is_dir():
            raise CgroupOpError("read", path, errno.ENOENT)
        exclusive = self._flag(path, "cpu_exclusive")
        kind: PartitionKind = "exclusive" if exclusive else "member"
        try:
            children = tuple(sorted(e.name for e in os.scandir(directory) if e.is_dir()))
        except OSError as exc:
            raise CgroupOpError("read", path, exc.errno or errno.EIO) from None
        return GroupState(
            path=path,
            cpus=self._list(path, "cpus"),
            mems=self._list(path, "mems"),
            partition=kind,
            effective_cpus=self._list(path, "effective_cpus"),
            effective_mems=self._list(path, "effective_mems"),
            populated=bool(self._read(path, "tasks").strip()),
            children=children,
        )

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        return collect_snapshot(self.read_group, paths)

    def flags(self, path: str) -> dict[str, bool]:
        """``cpu_exclusive`` and ``sched_load_balance`` as they are (optional capability,
        see :func:`~pinwarden.enforce.backend.partition_flags`)."""
        return {name: self._flag(path, name)
                for name in ("cpu_exclusive", "sched_load_balance")}

    def tasks(self, path: str) -> tuple[int, ...]:
        text = self._read(path, "tasks")
        return tuple(int(t) for t in text.split())

    # -- writes -------------------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        try:
            os.mkdir(self._dir(path))
        except OSError as exc:
            raise CgroupOpError("mkdir", path, exc.errno or errno.EIO) from None
        made: list[Path] = []
        try:
            for base in self.mirrors:
                for part in [*ancestors(path)[1:], path]:
                    twin = self._dir(part, base)
                    try:
                        os.mkdir(twin)
                        made.append(twin)
                    except FileExistsError:
                        pass
        except OSError as exc:
            for twin in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(twin)
            with contextlib.suppress(OSError):
                os.rmdir(self._dir(path))
            raise CgroupOpError("mkdir", path, exc.errno or errno.EIO,
                                detail=f"in {exc.filename}") from None

    def rmdir(self, path: str) -> None:
        try:
            os.rmdir(self._dir(path))
        except OSError as exc:
            raise CgroupOpError("rmdir", path, exc.errno or errno.EIO) from None
        for base in self.mirrors:
            # absent, or someone else's tasks or children live there: leave it
            with contextlib.suppress(OSError):
                os.rmdir(self._dir(path, base))

    def sweep_twins(self, parent: str, is_holder: Callable[[str], bool]) -> list[str]:
        """:func:`~pinwarden.enforce.backend.sweep_twins`: each mirror's directories below
        ``parent`` that ``is_holder`` names and the cpuset hierarchy lacks, removed leaf
        first where empty (a directory with tasks or with children of someone else's stays,
        as :meth:`rmdir` leaves it)."""
        removed: list[str] = []
        prefix = parent.strip("/")
        for base in self.mirrors:
            try:
                names = [e.name for e in os.scandir(self._dir(parent, base)) if e.is_dir()]
            except OSError:
                continue
            for name in names:
                path = f"{prefix}/{name}" if prefix else name
                if not is_holder(path) or self._dir(path).exists():
                    continue
                for top, _dirs, _files in sorted(os.walk(self._dir(path, base)),
                                                 key=lambda w: -w[0].count("/")):
                    with contextlib.suppress(OSError):
                        os.rmdir(top)
                if not self._dir(path, base).exists():
                    removed.append(f"{base}/{path}")
        return removed

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        self._write("cpus", path, self.prefix + "cpus", cpus.to_list())

    def set_mems(self, path: str, mems: CpuSet) -> None:
        self._write("mems", path, self.prefix + "mems", mems.to_list())

    def set_flag(self, path: str, flag: str, on: bool) -> None:
        self._write(flag, path, self.prefix + flag, "1" if on else "0")

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        """``member``: ``cpu_exclusive=0`` then ``sched_load_balance=1``.  ``exclusive`` and
        ``isolated``: ``sched_load_balance=0`` then ``cpu_exclusive=1``.

        Why load balancing off: since Linux 6.12 every CPU carries a deadline server, and
        ``validate_change`` refuses (``EBUSY``) to shrink — or even to flag — an exclusive,
        load-balanced cpuset whose CPUs could not hold the root domain's whole deadline
        bandwidth (an exclusive tree can then never be emptied; on a 40-CPU host a 1-CPU
        exclusive group is frozen).  That check only applies to load-balanced cpusets, and
        on a v1 hierarchy whose root balances (the default) a child's
        ``sched_load_balance`` changes nothing else: there is one scheduling domain.  So
        v1 cannot tell ``exclusive`` from ``isolated``; both read back as ``exclusive``.
        """
        if kind == "member":
            self.set_flag(path, "cpu_exclusive", False)
            if not self._flag(path, "sched_load_balance"):
                self.set_flag(path, "sched_load_balance", True)
            return
        balanced = self._flag(path, "sched_load_balance")
        if balanced:
            self.set_flag(path, "sched_load_balance", False)
        try:
            self.set_flag(path, "cpu_exclusive", True)
        except CgroupOpError:
            if balanced:
                self.set_flag(path, "sched_load_balance", True)
            raise

    def attach_process(self, path: str, pid: int) -> None:
        self._write("attach", path, "cgroup.procs", str(pid))

    def attach_thread(self, path: str, tid: int) -> None:
        self._write("attach", path, "tasks", str(tid))
