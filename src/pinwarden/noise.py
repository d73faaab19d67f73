"""Read and write the host's noise sources (the adapter of :mod:`pinwarden.isolation`).

:func:`read_noise` reads everything below ``root`` (``/`` on a host, a fake tree in tests)
into a :class:`~pinwarden.isolation.NoiseSnapshot`; :func:`apply` performs
:class:`~pinwarden.isolation.Write` values and reports each one's outcome — the kernel
refusing a write (``EIO`` for a managed or per-CPU IRQ, ``EINVAL`` for a mask it does not
accept, ``ESRCH`` for a thread that exited) is an outcome, never an exception.

Files: ``proc/irq/N/{smp_affinity_list,effective_affinity_list}`` and the handler
subdirectories of ``proc/irq/N``; ``proc/irq/default_smp_affinity`` and
``sys/devices/virtual/workqueue/cpumask`` (hex masks); ``proc/PID/{stat,status}`` of kernel
threads (``Cpus_allowed_list``); ``sys/devices/system/cpu/{online,isolated,nohz_full}``.
Thread affinity (kernel threads, and the user threads :func:`read_tasks` reads) is set with
``sched_setaffinity`` (injectable for tests), after checking that the thread still has the
recorded start time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from pinwarden.cpuset import CpuSet, CpuSetError
from pinwarden.isolation import (
    IRQ_DEFAULT,
    WORKQUEUE,
    HostTask,
    IrqInfo,
    KthreadInfo,
    NoiseSnapshot,
    TaskInfo,
    Write,
)
from pinwarden.procs import read_stat, read_stat_file
from pinwarden.record import record

IRQ_DIR = "proc/irq"
DEFAULT_FILE = "proc/irq/default_smp_affinity"
WORKQUEUE_FILE = "sys/devices/virtual/workqueue/cpumask"
#: Linux 6.7+: the mask asked for (what a write to ``cpumask`` sets), of which ``cpumask``
#: shows the effective part: the CPUs of isolated cpuset partitions are taken out while
#: those exist.  Read as the value: recorded from ``cpumask`` while a holder was an isolated
#: partition, the mask put back was the narrowed one, for good (systemd-lab hunt).
WORKQUEUE_REQUESTED = "sys/devices/virtual/workqueue/cpumask_requested"
CPU_DIR = "sys/devices/system/cpu"
_RCU_OFFLOAD = re.compile(r"rcuo[ps]/(\d+)$")

SetAffinity = Callable[[int, Iterable[int]], None]


def _text(path: Path | str) -> str | None:
    """The file's text, or None when it cannot be read.  With ``os.open``/``os.read``, not
    ``Path.read_text``: a pass reads two files of every kernel thread and a few of every
    IRQ, thousands on a large host, and the io stack cost three times the read itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _list(path: Path | str) -> CpuSet | None:
    text = _text(path)
    if text is None:
        return None
    try:
        return CpuSet.parse_kernel(text)
    except CpuSetError:  # "(null)" in nohz_full without nohz_full=
        return None


def _mask(path: Path | str) -> CpuSet | None:
    text = _text(path)
    if text is None:
        return None
    try:
        return CpuSet.from_mask(text)
    except CpuSetError:
        return None


def read_irqs(root: Path) -> tuple[IrqInfo, ...]:
    base = os.fspath(root / IRQ_DIR)
    out: list[IrqInfo] = []
    try:
        irqs = sorted(int(name) for name in os.listdir(base) if name.isdigit())
    except OSError:
        return ()
    for irq in irqs:
        d = f"{base}/{irq}"
        affinity = _list(f"{d}/smp_affinity_list")
        if affinity is None:
            continue
        try:
            with os.scandir(d) as entries:
                actions = tuple(sorted(e.name for e in entries if e.is_dir()))
        except OSError:
            actions = ()
        out.append(IrqInfo(irq, affinity, _list(f"{d}/effective_affinity_list"), actions))
    return tuple(out)


def read_kthreads(root: Path) -> tuple[KthreadInfo, ...]:
    """Every kernel thread (``PF_KTHREAD``) with its affinity."""
    return read_host_threads(root, root / "sys/fs/cgroup", lambda _path: True, users=False,
                             kthreads=True).kthreads


def read_tasks(root: Path, tids: Iterable[int]) -> tuple[TaskInfo, ...]:
    """The user threads ``tids`` (``/proc/TID`` reaches any thread by its id), with their
    start time and affinity; threads gone meanwhile are left out."""
    out: list[TaskInfo] = []
    for tid in sorted(set(tids)):
        stat = read_stat(tid, root=root)
        if stat is None or stat.kernel_thread:
            continue
        status = _text(root / "proc" / str(tid) / "status")
        if status is None:  # gone meanwhile
            continue
        affinity = _affinity(root, tid, status)
        if affinity is not None:
            tgid = _field(status, "Tgid") or ""
            out.append(TaskInfo(tid, stat.start_time, stat.comm, affinity,
                                int(tgid) if tgid.isdigit() else 0))
    return tuple(out)


@record
class HostThreads:
    """One pass of :func:`read_host_threads` over ``/proc``: the host's own user threads
    with their cgroup's CPUs, and the kernel threads."""

    users: tuple[HostTask, ...] = ()
    kthreads: tuple[KthreadInfo, ...] = ()


def read_host_threads(root: Path, mount: Path, skip: Callable[[str], bool], *,
                      users: bool = True, kthreads: bool = False) -> HostThreads:
    """In one pass over ``/proc``: with ``users``, every user thread whose process's
    cgroup2 path (``/proc/PID/cgroup``'s ``0::`` line, relative to ``mount``, the cgroup2
    tree) ``skip`` does not exclude, with the CPUs that cgroup gives
    (``cpuset.cpus.effective`` of it, or of the nearest group above with the file); with
    ``kthreads``, every kernel thread with its ``Cpus_allowed_list`` (:func:`read_kthreads`:
    these alone).  Processes and threads gone meanwhile are left out.

    In the start path of every VM on a host with ``isolcpus=`` (or with host noise
    isolation on), twice a sync: one ``stat`` read per process and, for user threads, one
    ``cgroup`` read per process and per thread one more ``stat`` read and, on this host,
    one ``sched_getaffinity`` (no ``status`` file)."""
    live = root == Path("/")
    proc = str(root / "proc")
    cgroup_cpus: dict[str, CpuSet | None] = {}
    masks: dict[frozenset[int], CpuSet] = {}

    def cpus_of(path: str) -> CpuSet | None:
        if path not in cgroup_cpus:
            found: CpuSet | None = None
            parts = [p for p in path.split("/") if p]
            while found is None:
                found = _list(mount.joinpath(*parts) / "cpuset.cpus.effective")
                if not parts:
                    break
                parts.pop()
            cgroup_cpus[path] = found
        return cgroup_cpus[path]

    def affinity(tid: int) -> CpuSet | None:
        if not live:
            return _affinity(root, tid)
        try:
            key = frozenset(os.sched_getaffinity(tid))
        except OSError:
            return None
        found = masks.get(key)
        if found is None:
            found = masks[key] = CpuSet.of(key)
        return found

    found_users: list[HostTask] = []
    found_kthreads: list[KthreadInfo] = []
    try:
        pids = sorted(int(e.name) for e in os.scandir(proc) if e.name.isdigit())
    except OSError:
        return HostThreads()
    for pid in pids:
        leader = read_stat_file(f"{proc}/{pid}/stat")
        if leader is None:
            continue
        if leader.kernel_thread:  # a kernel thread has no other threads
            if kthreads:
                # Cpus_allowed_list, as read_kthreads and the noise records have it
                # (sched_getaffinity leaves out inactive CPUs)
                mask = _affinity(root, pid)
                if mask is not None:
                    found_kthreads.append(KthreadInfo(pid, leader.start_time, leader.comm,
                                                      leader.flags, mask))
            continue
        if not users:
            continue
        text = _text(f"{proc}/{pid}/cgroup")
        path = next((line[3:] for line in text.splitlines() if line.startswith("0::")),
                    None) if text is not None else None
        if path is None or skip(path):
            continue
        cpus = cpus_of(path)
        if cpus is None:
            continue
        try:
            tids = os.listdir(f"{proc}/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            stat = leader if tid == str(pid) else \
                read_stat_file(f"{proc}/{pid}/task/{tid}/stat")
            if stat is None:
                continue
            mask = affinity(stat.pid)
            if mask is not None:
                found_users.append(HostTask(TaskInfo(stat.pid, stat.start_time, stat.comm,
                                                     mask, pid), cpus))
    return HostThreads(tuple(found_users), tuple(found_kthreads))


def threads_of(root: Path, tgids: Iterable[int]) -> set[int]:
    """Every thread id of the processes ``tgids`` (those gone are left out)."""
    out: set[int] = set()
    for tgid in set(tgids):
        with contextlib.suppress(OSError):
            out.update(int(t.name) for t in (root / "proc" / str(tgid) / "task").iterdir()
                       if t.name.isdigit())
    return out


def _field(text: str, name: str) -> str | None:
    """The value of field ``name`` of a ``/proc/TID/status`` text (that line is looked for,
    not the whole file parsed: a kernel thread's other fields are not needed); never the
    first field (``Name``)."""
    key = f"\n{name}:"
    at = text.find(key)
    if at < 0:
        return None
    end = text.find("\n", at + len(key))
    return text[at + len(key):end if end >= 0 else len(text)].strip()


def _affinity(root: Path, tid: int, text: str | None = None) -> CpuSet | None:
    """``Cpus_allowed_list`` of ``/proc/TID/status`` (``text``: that file, read already);
    ``None`` if gone or unreadable."""
    if text is None:
        text = _text(root / "proc" / str(tid) / "status")
    allowed = _field(text, "Cpus_allowed_list") if text is not None else None
    try:
        return CpuSet.parse_kernel(allowed) if allowed is not None else None
    except CpuSetError:
        return None


def read_isolated(root: Path) -> CpuSet:
    """The ``isolcpus=`` CPUs (``/sys/devices/system/cpu/isolated``; none when absent)."""
    return _list(root / CPU_DIR / "isolated") or CpuSet()


def read_noise(root: Path = Path("/")) -> NoiseSnapshot:
    """Snapshot of every noise source below ``root``."""
    cpu = root / CPU_DIR
    kthreads = read_kthreads(root)
    nocbs = CpuSet.of(int(m[1]) for kt in kthreads
                      if (m := _RCU_OFFLOAD.match(kt.comm)) is not None)
    return NoiseSnapshot(
        online=_list(cpu / "online") or CpuSet(),
        irqs=read_irqs(root),
        default_affinity=_mask(root / DEFAULT_FILE),
        workqueue=_mask(root / WORKQUEUE_REQUESTED) or _mask(root / WORKQUEUE_FILE),
        kthreads=kthreads,
        nohz_full=_list(cpu / "nohz_full") or CpuSet(),
        rcu_nocbs=nocbs,
        isolated=_list(cpu / "isolated") or CpuSet(),
        # (a live host always has kernel threads: none seen is a PID namespace of its own)
        threads_in_view=bool(kthreads) or root.resolve() != Path("/"),
    )


@record
class Outcome:
    """One write: ``ok``; else ``errno``/``error`` (``EIO``: the kernel does not let this
    IRQ move).  ``after`` is the file read back (``Cpus_allowed_list`` for a thread)."""

    key: str
    value: CpuSet
    ok: bool
    errno: int | None = None
    error: str | None = None
    after: str | None = None


def _write_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # as `echo >` does
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def target_file(key: str) -> tuple[str, bool] | None:
    """``(path below root, hex mask?)`` of a key's file; ``None`` for a kernel thread."""
    if key == IRQ_DEFAULT:
        return DEFAULT_FILE, True
    if key == WORKQUEUE:
        return WORKQUEUE_FILE, True
    kind, _, rest = key.partition(":")
    if kind == "irq" and rest.isdigit():
        return f"{IRQ_DIR}/{rest}/smp_affinity_list", False
    return None


def _apply_one(root: Path, write: Write, set_affinity: SetAffinity) -> Outcome:
    key, value = write.key, write.value
    found = target_file(key)
    if found is not None:
        rel, mask = found
        path = root / rel
        _write_file(path, (value.to_mask() if mask else value.to_list()) + "\n")
        return Outcome(key, value, True, after=(_text(path) or "").strip())
    kind, _, rest = key.partition(":")
    pid_s, _, start_s = rest.partition(":")
    if kind not in ("kthread", "task") or not pid_s.isdigit() or not start_s.isdigit():
        return Outcome(key, value, False, errno.EINVAL, f"unknown key {key!r}")
    pid = int(pid_s)
    stat = read_stat(pid, root=root)
    if stat is None or stat.start_time != int(start_s):
        return Outcome(key, value, False, errno.ESRCH, "the thread is gone")
    set_affinity(pid, value.as_list())
    status = _text(root / "proc" / pid_s / "status") or ""
    after = next((ln.split(":", 1)[1].strip() for ln in status.splitlines()
                  if ln.startswith("Cpus_allowed_list:")), None)
    return Outcome(key, value, True, after=after)


def apply(root: Path, writes: Iterable[Write], *,
          set_affinity: SetAffinity = os.sched_setaffinity) -> tuple[Outcome, ...]:
    """Perform ``writes`` below ``root`` in order; each one's :class:`Outcome`."""
    out: list[Outcome] = []
    for write in writes:
        try:
            out.append(_apply_one(root, write, set_affinity))
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            out.append(Outcome(write.key, write.value, False, code,
                               exc.strerror or os.strerror(code)))
    return tuple(out)


def retry_later(outcomes: Iterable[Outcome]) -> dict[str, str]:
    """Keys whose write failed for the moment (``EBUSY``: x86 refuses to move an IRQ while
    its previous move is pending; ``EAGAIN``, ``EINTR``), with why: worth another try."""
    return {o.key: o.error or errno.errorcode.get(o.errno or 0, "failed") for o in outcomes
            if not o.ok and o.errno in (errno.EBUSY, errno.EAGAIN, errno.EINTR)}


def refused(outcomes: Iterable[Outcome]) -> frozenset[str]:
    """Keys whose write the kernel refused for good (``EIO``, ``EINVAL``, ``EPERM``)."""
    return frozenset(o.key for o in outcomes
                     if not o.ok and o.errno in (errno.EIO, errno.EINVAL, errno.EPERM))
