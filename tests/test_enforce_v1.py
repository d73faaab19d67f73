"""The cgroup v1 backend on this host's real hierarchies (``pwtest-v1-PID…`` groups)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import CgroupOpError
from pinwarden.enforce.v1 import CpusetV1

pytestmark = pytest.mark.kernel

BASE = f"pwtest-v1-{os.getpid()}.partition"


@pytest.fixture
def backend() -> Iterator[CpusetV1]:
    b = CpusetV1.from_mounts()
    try:
        yield b
    finally:
        for top in (b.root, *b.mirrors):
            for sub in (f"{BASE}/vm-x.partition", BASE):
                with contextlib.suppress(OSError):
                    os.rmdir(top / sub)


def test_partitions_exist_in_every_mounted_hierarchy_and_leave_with_it(
        backend: CpusetV1) -> None:
    assert backend.mirrors, "expected other cgroup hierarchies to be mounted here"
    child = f"{BASE}/vm-x.partition"
    backend.mkdir(BASE)
    backend.mkdir(child)
    for top in (backend.root, *backend.mirrors):
        assert (top / child).is_dir(), top
    state = backend.read_group(child)
    assert state.cpus == CpuSet() and state.partition == "member" and not state.populated
    backend.rmdir(child)
    backend.rmdir(BASE)
    for top in (backend.root, *backend.mirrors):
        assert not (top / BASE).exists(), top


def test_twins_of_a_holder_gone_from_the_cpuset_hierarchy_are_swept(
        backend: CpusetV1) -> None:
    """A holder group removed by hand from the cpuset hierarchy alone: its copies in the
    other hierarchies stayed for good, as stale holders are found in the cpuset one
    (broken-pinwarden hunt).  The sweep removes them, leaf first; the copies of a group
    whose cpuset group lives, and names that are no holder's, stay."""
    child = f"{BASE}/vm-x.partition"
    backend.mkdir(BASE)
    backend.mkdir(child)
    os.rmdir(backend.root / child)  # by hand, the cpuset hierarchy only
    os.rmdir(backend.root / BASE)
    assert all((top / child).is_dir() for top in backend.mirrors)
    assert backend.sweep_twins("", lambda path: False) == []
    assert all((top / child).is_dir() for top in backend.mirrors)
    removed = backend.sweep_twins("", lambda path: path == BASE)
    assert sorted(removed) == sorted(f"{top}/{BASE}" for top in backend.mirrors)
    assert not any((top / BASE).exists() for top in backend.mirrors)
    backend.mkdir(BASE)
    assert backend.sweep_twins("", lambda path: path == BASE) == []
    assert all((top / BASE).is_dir() for top in (backend.root, *backend.mirrors))


def test_failed_twin_undoes_the_whole_mkdir(backend: CpusetV1) -> None:
    broken = CpusetV1(backend.root, [*backend.mirrors[:1], Path("/proc")])
    with pytest.raises(CgroupOpError) as info:
        broken.mkdir(BASE)
    assert info.value.action == "mkdir"
    assert not (backend.root / BASE).exists()
    assert not (backend.mirrors[0] / BASE).exists()


def test_errors_carry_the_kernel_errno(backend: CpusetV1) -> None:
    with pytest.raises(CgroupOpError) as missing:
        backend.read_group(f"{BASE}/nothing")
    assert missing.value.errno == errno.ENOENT
    backend.mkdir(BASE)
    online = backend.read_group("").cpus
    with pytest.raises(CgroupOpError) as busy:
        backend.attach_process(BASE, os.getpid())  # no cpus, no mems yet
    assert busy.value.errno == errno.ENOSPC
    with pytest.raises(CgroupOpError) as too_far:
        backend.set_cpus(BASE, CpuSet.of([max(online.cpus) + 1]))
    assert too_far.value.errno == errno.ERANGE
    with pytest.raises(CgroupOpError) as root:
        backend.set_cpus("", online)
    assert root.value.errno == errno.EACCES
    with pytest.raises(CgroupOpError) as exists:
        backend.mkdir(BASE)
    assert exists.value.errno == errno.EEXIST
