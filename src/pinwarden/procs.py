"""Process identity and liveness from ``/proc``.

A pid alone does not identify a process: pids are reused.  A process is identified by
``(pid, start time)``, the start time being field 22 of ``/proc/PID/stat`` (clock ticks
since boot), which never changes for the life of the process and differs for a new process
that happens to get the same pid.

:func:`parse_stat` is pure (text → :class:`ProcStat`); the readers below are thin.
"""

from __future__ import annotations

import os
from pathlib import Path

from pinwarden.record import record

#: ``task_struct.flags`` bit of kernel threads (include/linux/sched.h).
PF_KTHREAD = 0x00200000

#: ``/proc/PID/stat`` states of a process that no longer runs: zombie, dead.
_DEAD_STATES = frozenset("ZXx")


@record
class ProcStat:
    """The fields of ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``) pinwarden uses."""

    pid: int  # field 1 (the TID when read from task/TID/stat)
    comm: str  # field 2, without the parentheses; may contain spaces and ')'
    state: str  # field 3: R, S, D, Z, X, T, t, I, ...
    ppid: int  # field 4
    flags: int  # field 9 (PF_* bits)
    start_time: int  # field 22, clock ticks after boot
    processor: int  # field 39, CPU the task last ran on

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def dead(self) -> bool:
        return self.state in _DEAD_STATES


def parse_stat(text: str) -> ProcStat:
    """Parse one ``stat`` line.  ``comm`` is whatever lies between the first ``(`` and the
    LAST ``)``, since a command name may itself contain spaces and parentheses.

    Raises ``ValueError`` on text that is not a stat line.
    """
    open_ = text.find("(")
    close = text.rfind(")")
    if open_ < 0 or close < open_:
        raise ValueError(f"not a /proc stat line: {text[:80]!r}")
    pid = int(text[:open_].strip())
    comm = text[open_ + 1:close]
    rest = text[close + 1:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    if len(rest) < 37:
        raise ValueError(f"short /proc stat line for pid {pid}: {len(rest) + 2} fields")
    return ProcStat(pid=pid, comm=comm, state=rest[0], ppid=int(rest[1]),
                    flags=int(rest[6]), start_time=int(rest[19]), processor=int(rest[36]))


def read_stat(pid: int, *, root: Path = Path("/")) -> ProcStat | None:
    """``/proc/PID/stat`` parsed, or ``None`` when there is no such process."""
    return read_stat_file(root / "proc" / str(pid) / "stat")


def read_stat_file(path: str | Path) -> ProcStat | None:
    """A ``stat`` file of ``/proc`` (``/proc/PID/stat``, ``/proc/PID/task/TID/stat``)
    parsed, or ``None`` when its task is gone."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:  # ESRCH while the task exits, EACCES in odd namespaces
        return None
    try:
        return parse_stat(text)
    except ValueError:
        return None


def process_of(tid: int, *, root: Path = Path("/")) -> int | None:
    """The process (thread group) thread ``tid`` belongs to, ``None`` when it is gone."""
    try:
        text = (root / "proc" / str(tid) / "status").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Tgid:"):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def start_time(pid: int, *, root: Path = Path("/")) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), ``None`` if it is gone
    or is a zombie."""
    stat = read_stat(pid, root=root)
    if stat is None or stat.dead:
        return None
    return stat.start_time


def alive(pid: int, start: int | None, *, root: Path = Path("/")) -> bool:
    """Whether the process ``(pid, start)`` still runs.

    False when the pid is gone, a zombie, or now belongs to another process (its start time
    differs).  With ``start=None`` only the pid is checked (weaker: pid reuse undetected).
    """
    if pid <= 0:
        return False
    stat = read_stat(pid, root=root)
    if stat is None or stat.dead:
        return False
    return start is None or stat.start_time == start


def pid_namespace() -> int | None:
    """This process's PID namespace: the inode ``/proc/self/ns/pid`` names (None when it
    cannot be read).  A pid means a process only within one PID namespace: in another,
    the same number is another process, or none (a container's ``/proc`` shows only its
    own), so an owner recorded in one cannot be judged from the other."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def foreign_proc() -> str | None:
    """Why ``/proc`` is not this process's PID namespace's (it shows another's, where this
    process has another pid: ``unshare --pid --fork`` without ``--mount-proc``), or None.
    Pids read there are not pids here: an owner recorded so named unrelated processes
    (namespace hunt)."""
    try:
        seen = int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return None
    mine = os.getpid()
    if seen == mine:
        return None
    return (f"/proc shows another PID namespace than this process's (it is pid {mine} "
            f"here and {seen} there): mount a /proc of its own (unshare --mount-proc), or "
            f"run pinwarden where /proc is its namespace's")


#: The initial PID namespace's inode (the kernel's ``PROC_PID_INIT_INO``): the host's.
INIT_PID_NS = 0xEFFFFFFC


def pid_namespace_gone(ns: int) -> bool:
    """Whether no process is left in PID namespace ``ns`` (its inode): told only from the
    initial namespace, which sees every process, and only by a whole scan of ``/proc``.
    False where it cannot be told (in any other namespace), and while any process is
    there (an inode reused by a new namespace reads as one still there)."""
    if pid_namespace() != INIT_PID_NS:
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for name in entries:
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/pid").st_ino == ns:
                    return False
            except PermissionError:
                # (not root, or a process ptrace may not look at): its status still says
                # whether it is in a namespace below this one at all
                if _nested(name):
                    return False
            except OSError:  # (exited, or a zombie: no namespace of its own any more)
                continue
    return True


def _nested(pid: str) -> bool:
    """Whether process ``pid`` is in a PID namespace below this process's (its ``NSpid``
    names more than one pid); a process whose status cannot be read counts as nested."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"NSpid:"):
                    return len(line.split()) > 2
    except FileNotFoundError:
        return False  # (exited)
    except OSError:
        return True
    return True


def descendants(pid: int, *, root: Path = Path("/")) -> list[int]:
    """``pid`` and every process below it, ascending (one reading of ``/proc``)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e.name for e in (root / "proc").iterdir() if e.name.isdigit()]
    except OSError:
        entries = []
    for name in entries:
        stat = read_stat(int(name), root=root)
        if stat is not None:
            children.setdefault(stat.ppid, []).append(stat.pid)
    seen, queue = {pid}, [pid]
    while queue:
        for child in children.get(queue.pop(), ()):
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return sorted(seen)


def thread_comm(pid: int, tid: int, *, root: Path = Path("/")) -> str | None:
    """The name of thread ``tid`` of process ``pid`` (``None``: gone)."""
    try:
        return (root / "proc" / str(pid) / "task" / str(tid) / "comm").read_text(
            errors="replace").rstrip("\n")
    except OSError:
        return None


#: The libvirt daemons that run hooks, and so own a domain's lease between the hook's
#: ``prepare`` and QEMU's start (``pinwarden.libvirt.hook.HOOK_DAEMON_NAMES``).
LIBVIRT_DAEMONS = frozenset({"libvirtd", "virtqemud", "virtlxcd"})


def libvirt_daemon(pid: int, *, root: Path = Path("/")) -> bool:
    """Whether process ``pid`` is a libvirt daemon (:data:`LIBVIRT_DAEMONS`)."""
    return thread_comm(pid, pid, root=root) in LIBVIRT_DAEMONS


def named(names: frozenset[str], *, root: Path = Path("/")) -> list[tuple[int, str]]:
    """(pid, name) of every running process whose name (``/proc/PID/comm``) is in
    ``names``, by pid."""
    try:
        entries = [e for e in (root / "proc").iterdir() if e.name.isdigit()]
    except OSError:
        return []
    found: list[tuple[int, str]] = []
    for entry in entries:
        try:
            comm = (entry / "comm").read_text(errors="replace").rstrip("\n")
        except OSError:
            continue
        if comm in names:
            found.append((int(entry.name), comm))
    return sorted(found)


def running_named(names: frozenset[str], *, root: Path = Path("/")) -> frozenset[str]:
    """Which of ``names`` (process names, ``/proc/PID/comm``) some running process has."""
    return frozenset(comm for _, comm in named(names, root=root))


def security_label(pid: int, *, root: Path = Path("/")) -> str | None:
    """The AppArmor label of a process (``PROFILE (MODE)``, ``unconfined``): the
    ``apparmor`` attribute directory of Linux ≥ 5.8, else the shared ``attr/current``;
    None when it is gone or no LSM labels processes (the kernel answers EINVAL)."""
    for name in ("attr/apparmor/current", "attr/current"):
        try:
            return (root / "proc" / str(pid) / name).read_text(errors="replace") \
                .strip("\0\n ")
        except OSError:
            continue
    return None


def kernel_version(root: Path = Path("/")) -> tuple[int, int]:
    """``(major, minor)`` of the running kernel (``(0, 0)`` when unreadable)."""
    import re

    try:
        text = (root / "proc/sys/kernel/osrelease").read_text(errors="replace")
    except OSError:
        return (0, 0)
    match = re.match(r"(\d+)\.(\d+)", text.strip())
    return (int(match[1]), int(match[2])) if match else (0, 0)
