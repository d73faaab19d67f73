"""Per-thread affinity on real threads of processes this test starts."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.affinity import get_affinity, pin, pin_each, threads_of
from pinwarden.errors import EnforceError


@pytest.fixture
def sleepers() -> Iterator[list[int]]:
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_pin_sets_every_thread(sleepers: list[int]) -> None:
    last = CpuSet.of([max(get_affinity(sleepers[0]).cpus)])
    old = pin({tid: last for tid in sleepers})
    assert all(get_affinity(tid) == last for tid in sleepers)
    pin(old)
    assert all(get_affinity(tid) == old[tid] for tid in sleepers)
    assert threads_of(sleepers[0]) == (sleepers[0],)


def test_failed_pin_restores_the_threads_already_changed(sleepers: list[int]) -> None:
    before = {tid: get_affinity(tid) for tid in sleepers}
    first = CpuSet.of([min(before[sleepers[0]].cpus)])
    with pytest.raises(EnforceError) as info:
        pin({sleepers[0]: first, sleepers[1]: CpuSet.of([4000])})  # no such CPU
    assert f"thread {sleepers[1]}" in info.value.message
    assert {tid: get_affinity(tid) for tid in sleepers} == before


def test_gone_thread_is_named(sleepers: list[int]) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(EnforceError, match="has exited"):
        pin({proc.pid: get_affinity(sleepers[0])})


def test_pin_each_places_what_it_can_and_says_what_it_could_not(sleepers: list[int]) -> None:
    """Not transactional: a thread that cannot take the CPUs (none such online: EINVAL, as
    when its cgroup forbids them) or is gone (ESRCH) is reported; the others are set."""
    import errno

    proc = subprocess.Popen(["true"])
    proc.wait()
    last = CpuSet.of([max(get_affinity(sleepers[0]).cpus)])
    before = get_affinity(sleepers[1])
    failed = pin_each({sleepers[0]: last, sleepers[1]: CpuSet.of([4000]), proc.pid: last})
    assert failed == {sleepers[1]: errno.EINVAL, proc.pid: errno.ESRCH}
    assert get_affinity(sleepers[0]) == last and get_affinity(sleepers[1]) == before
