"""The cpuset fake, shared between processes: its tree lives in a file, every primitive
loads it, acts and saves it under an ``flock`` (one kernel call at a time, as cgroupfs
serialises writes).  For tests of racing pinwarden processes without a real cgroup tree."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import GroupState, PartitionKind, Snapshot
from pinwarden.enforce.fake import FakeCpusetV1

T = TypeVar("T")


class DiskCpuset(FakeCpusetV1):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._depth = 0
        self._load()

    @classmethod
    def create(cls, path: Path, online: CpuSet, groups: Mapping[str, CpuSet]) -> DiskCpuset:
        fake = FakeCpusetV1(online)
        for name, cpus in groups.items():
            fake.mkdir(name)
            fake.set_mems(name, fake.read_group("").mems)
            fake.set_cpus(name, cpus)
        path.write_bytes(pickle.dumps(fake.__dict__))
        return cls(path)

    def _load(self) -> None:
        state = pickle.loads(self.path.read_bytes())
        mine = {k: self.__dict__[k] for k in ("path", "_depth") if k in self.__dict__}
        self.__dict__.update(state)
        self.__dict__.update(mine)

    def _save(self) -> None:
        state = {k: v for k, v in self.__dict__.items() if k not in ("path", "_depth")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(state))
        tmp.replace(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._depth:  # read_state calls read_group: already ours
            yield
            return
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._load()
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
            self._save()
        finally:
            os.close(fd)

    def _do(self, fn: Callable[..., T], *args: Any) -> T:
        with self._locked():
            return fn(*args)

    def read_group(self, path: str) -> GroupState:
        return self._do(super().read_group, path)

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        return self._do(super().read_state, list(paths))

    def mkdir(self, path: str) -> None:
        self._do(super().mkdir, path)

    def rmdir(self, path: str) -> None:
        self._do(super().rmdir, path)

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        self._do(super().set_cpus, path, cpus)

    def set_mems(self, path: str, mems: CpuSet) -> None:
        self._do(super().set_mems, path, mems)

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        self._do(super().set_partition, path, kind)
