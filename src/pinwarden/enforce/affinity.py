"""Per-thread CPU affinity (``sched_setaffinity``), where a cgroup alone is not enough.

Used for threads that share a cgroup but need different CPUs (vCPU threads on v2 or under
systemd, a job's threads), and as a belt to a cgroup attach.  :func:`pin` is transactional:
if one thread cannot be pinned, the threads already changed get their old mask back.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from pathlib import Path

from pinwarden.cpuset import CpuSet
from pinwarden.errors import EnforceError

#: The first kernel that keeps the affinity a thread asked for (``sched_setaffinity``) when
#: its cpuset cgroup's CPUs change, giving it that less what the cgroup took ("sched:
#: Enforce user requested affinity", Linux 6.2).  Before, every change gave each thread of
#: the cgroup all of the cgroup's CPUs (Debian 12's 6.1 does; 6.12 keeps them).
AFFINITY_KEPT_SINCE = (6, 2)


def cgroup_resets_affinity(root: Path = Path("/")) -> bool:
    """Whether the running kernel gives a thread its cpuset cgroup's CPUs whenever those
    change, whatever affinity it was given (an unreadable version counts as such: the
    records this asks for cost a little, missing ones lose placements)."""
    from pinwarden.procs import kernel_version

    return kernel_version(root) < AFFINITY_KEPT_SINCE


def get_affinity(tid: int) -> CpuSet:
    try:
        return CpuSet.of(os.sched_getaffinity(tid))
    except OSError as exc:
        raise EnforceError(f"cannot read the CPU affinity of thread {tid}: "
                           f"{exc.strerror}") from None


def threads_of(pid: int, proc: Path = Path("/proc")) -> tuple[int, ...]:
    """Thread ids of process ``pid`` (empty when it is gone)."""
    try:
        return tuple(sorted(int(name) for name in os.listdir(proc / str(pid) / "task")))
    except OSError:
        return ()


def _explain(tid: int, cpus: CpuSet, exc: OSError) -> str:
    if exc.errno == errno.EINVAL:
        return (f"cannot pin thread {tid} to {cpus.named()}: outside its cpuset cgroup "
                f"(or offline); widen the cgroup first")
    if exc.errno == errno.ESRCH:
        return f"cannot pin thread {tid} to {cpus.named()}: the thread has exited"
    if exc.errno == errno.EPERM:
        return f"cannot pin thread {tid} to {cpus.named()}: permission denied (run as root)"
    return f"cannot pin thread {tid} to {cpus.named()}: {exc.strerror}"


def pin(plan: Mapping[int, CpuSet]) -> dict[int, CpuSet]:
    """Set every thread's affinity; on failure restore the others and raise EnforceError.
    Returns the previous masks (to undo later)."""
    done: dict[int, CpuSet] = {}
    for tid, cpus in plan.items():
        try:
            old = CpuSet.of(os.sched_getaffinity(tid))
            os.sched_setaffinity(tid, cpus.cpus)
        except OSError as exc:
            for undo_tid, mask in done.items():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(undo_tid, mask.cpus)
            raise EnforceError(_explain(tid, cpus, exc)) from None
        done[tid] = old
    return done


def pin_each(plan: Mapping[int, CpuSet]) -> dict[int, int]:
    """Set every thread's affinity, each on its own (not transactional: what can be placed
    is); returns the threads that could not be, with the errno (``ESRCH``: gone,
    ``EINVAL``: its cpuset cgroup does not allow those CPUs)."""
    failed: dict[int, int] = {}
    for tid, cpus in plan.items():
        try:
            os.sched_setaffinity(tid, cpus.cpus)
        except OSError as exc:
            failed[tid] = exc.errno or 0
    return failed
