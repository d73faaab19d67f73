"""Watch the cgroup2 tree for cgroups that could escape the holder partitions, and close them.

The adapter half of :mod:`pinwarden.escape` (which decides).  Three pieces:

* :class:`CgroupWatcher` — inotify on the cgroup2 mount: reports new and removed child
  directories of the watched parents (the root, the exclusive tree), writes to
  ``cpuset.cpus`` / ``cpuset.cpus.exclusive`` of those children, and changes of their
  ``cpuset.cpus.partition`` (the kernel notifies those itself, also when a partition turns
  invalid because of someone else's write).  kernfs delivers ``IN_CREATE`` for ``mkdir`` of
  a cgroup and ``IN_MODIFY`` for every ``write(2)`` to a cgroup file (VFS ``fsnotify_mkdir``
  / ``fsnotify_modify``), and ``IN_MODIFY`` from ``kernfs_notify()`` for
  ``cgroup_file_notify()`` files such as ``cpuset.cpus.partition`` — proved on 6.1 and 6.12
  by the lab (``late_cgroup_inotify``).
* :func:`read_views` — the :class:`~pinwarden.escape.CgroupView` snapshot the planner takes.
* :func:`apply_narrowing` — performs a plan's writes; every failure is an outcome.

:func:`close_escapes` is the one call for a daemon: read, plan, apply.  Typical loop::

    with CgroupWatcher(mount, parents=("", "pinwarden.partition")) as watcher:
        close_escapes(mount, parents, leased, holders, pool)       # whatever happened before
        while True:
            if watcher.poll(timeout=30.0):                         # or every 30 s anyway
                close_escapes(mount, parents, leased, holders, pool)

inotify through ctypes, not a PyPI wrapper: the three calls (``inotify_init1``,
``inotify_add_watch``, ``inotify_rm_watch``) and the event layout are stable ABI, the
event parsing is a dozen lines, and a root daemon that enforces isolation is better off
without one more dependency (``inotify_simple`` would save ~40 lines and add no typing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import time
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import TracebackType
from typing import Literal

from pinwarden.cpuset import CpuSet, CpuSetError
from pinwarden.enforce.backend import PartitionKind, join
from pinwarden.enforce.v2 import EXCLUSIVE_FILE, PARTITION_FILE, parse_partition
from pinwarden.escape import (
    CgroupView,
    Narrowing,
    NarrowOp,
    PartitionWord,
    Revalidate,
    SetCpus,
    SetPartition,
    plan_narrowing,
)
from pinwarden.record import record

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len
_PARENT_MASK = IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_MODIFY | IN_ONLYDIR
_CHILD_MASK = IN_MODIFY | IN_DELETE_SELF | IN_ONLYDIR
CPUS_FILES = frozenset({"cpuset.cpus", EXCLUSIVE_FILE})

_WORD: dict[PartitionKind, PartitionWord] = {
    "member": "member", "exclusive": "root", "isolated": "isolated"}

EventKind = Literal["created", "removed", "cpus", "partition", "overflow"]


@record
class CgroupEvent:
    """``created``/``removed``: a child directory ``path`` of a watched parent; ``cpus``:
    a write to ``path``/``name`` (``cpuset.cpus`` or ``cpuset.cpus.exclusive``);
    ``partition``: ``path``/cpuset.cpus.partition changed (written, or re-evaluated by the
    kernel); ``overflow``: events were lost — read everything again."""

    kind: EventKind
    path: str
    name: str = ""
    at: float = 0.0  # time.monotonic() when read


class _Inotify:
    """The three inotify calls through libc."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._init1 = libc.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self._rm.restype = ctypes.c_int

    def init(self) -> int:
        fd = int(self._init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        return fd

    def add(self, fd: int, path: Path, mask: int) -> int:
        wd = int(self._add(fd, os.fsencode(path), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        return wd

    def rm(self, fd: int, wd: int) -> None:
        self._rm(fd, wd)  # EINVAL when the kernel already dropped it (IN_IGNORED)


def parse_events(buf: bytes) -> list[tuple[int, int, str]]:
    """``(wd, mask, name)`` for every ``struct inotify_event`` in ``buf``."""
    out: list[tuple[int, int, str]] = []
    pos = 0
    while pos + _EVENT.size <= len(buf):
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
        pos += _EVENT.size
        raw = buf[pos:pos + length].split(b"\0", 1)[0]
        pos += length
        out.append((wd, mask, os.fsdecode(raw)))
    return out


class CgroupWatcher:
    """inotify watches on ``mount``/PARENT for each of ``parents`` and on each of their
    child directories (existing ones and every one created later).

    Events on other files than ``cpuset.cpus``, ``cpuset.cpus.exclusive`` and
    ``cpuset.cpus.partition`` are dropped.  A child directory created between two
    :meth:`poll` calls is reported even if it was written to before its own watch was
    added: callers re-read the whole snapshot on any event, so nothing is lost.
    """

    def __init__(self, mount: Path, parents: Iterable[str] = ("",)) -> None:
        self.mount = mount
        self.parents = tuple(dict.fromkeys(parents))
        self._lib = _Inotify()
        self._fd = self._lib.init()
        self._paths: dict[int, str] = {}  # wd → relative path
        self._parent_wds: set[int] = set()
        try:
            for parent in self.parents:
                self._watch_parent(parent)
        except BaseException:
            self.close()
            raise

    # -- watches -----------------------------------------------------------------

    def _dir(self, path: str) -> Path:
        return self.mount / path if path else self.mount

    def _watch_parent(self, parent: str) -> None:
        wd = self._lib.add(self._fd, self._dir(parent), _PARENT_MASK | IN_MASK_ADD)
        self._paths[wd] = parent
        self._parent_wds.add(wd)
        for child in sorted(self._dir(parent).iterdir()):
            if child.is_dir():
                self._watch_child(join(parent, child.name))

    def _watch_child(self, path: str) -> None:
        try:
            wd = self._lib.add(self._fd, self._dir(path), _CHILD_MASK | IN_MASK_ADD)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # gone again already
                return
            raise
        self._paths.setdefault(wd, path)

    def watched(self) -> list[str]:
        """Paths with a watch (parents and children), sorted."""
        return sorted(set(self._paths.values()))

    # -- events ------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def poll(self, timeout: float | None = None) -> list[CgroupEvent]:
        """Wait up to ``timeout`` seconds (``None``: forever) for events; return every
        event available then (maybe none)."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        return self.read_pending()

    def read_pending(self) -> list[CgroupEvent]:
        """The events queued now, without waiting."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        now = time.monotonic()
        out: list[CgroupEvent] = []
        for wd, mask, name in parse_events(b"".join(chunks)):
            out.extend(self._translate(wd, mask, name, now))
        return out

    def _translate(self, wd: int, mask: int, name: str, now: float) -> list[CgroupEvent]:
        if mask & IN_Q_OVERFLOW:
            return [CgroupEvent("overflow", "", "", now)]
        if mask & IN_IGNORED:
            self._paths.pop(wd, None)
            self._parent_wds.discard(wd)
            return []
        base = self._paths.get(wd)
        if base is None:
            return []
        if wd in self._parent_wds and mask & IN_ISDIR and name:
            path = join(base, name)
            if mask & (IN_CREATE | IN_MOVED_TO):
                self._watch_child(path)
                return [CgroupEvent("created", path, "", now)]
            if mask & (IN_DELETE | IN_MOVED_FROM):
                return [CgroupEvent("removed", path, "", now)]
            return []
        if mask & IN_MODIFY and name in CPUS_FILES:
            return [CgroupEvent("cpus", base, name, now)]
        if mask & IN_MODIFY and name == PARTITION_FILE:
            return [CgroupEvent("partition", base, name, now)]
        return []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CgroupWatcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- snapshot and writes ----------------------------------------------------------------

def _read(d: Path, name: str) -> str | None:
    try:
        return (d / name).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None


def read_view(mount: Path, path: str) -> CgroupView | None:
    """One cgroup's cpuset files; ``None`` when it is gone or has no cpuset controller."""
    d = mount / path if path else mount
    try:
        effective = _read(d, "cpuset.cpus.effective")
        if effective is None:
            return None
        cpus = _read(d, "cpuset.cpus") or ""
        part_text = _read(d, PARTITION_FILE)
        exclusive = _read(d, EXCLUSIVE_FILE)
    except OSError:  # removed while reading
        return None
    word: PartitionWord = "member"
    valid = True
    if part_text is not None and path != "":
        kind, reason = parse_partition(part_text)
        word = _WORD[kind]
        valid = reason is None
    try:
        return CgroupView(path, CpuSet.parse_kernel(cpus), CpuSet.parse_kernel(effective),
                          word, valid,
                          None if exclusive is None else CpuSet.parse_kernel(exclusive))
    except CpuSetError:
        return None


def read_views(mount: Path, parents: Iterable[str] = ("",),
               extra: Iterable[str] = ()) -> tuple[CgroupView, ...]:
    """Each parent, its child directories, and the ``extra`` paths (holder groups deeper
    down), each once; cgroups without cpuset files are left out."""
    paths: list[str] = []
    for parent in parents:
        paths.append(parent)
        d = mount / parent if parent else mount
        try:
            children = sorted(c.name for c in d.iterdir() if c.is_dir())
        except OSError:
            continue
        paths.extend(join(parent, c) for c in children)
    paths.extend(extra)
    out: list[CgroupView] = []
    for path in dict.fromkeys(paths):
        view = read_view(mount, path)
        if view is not None:
            out.append(view)
    return tuple(out)


@record
class OpOutcome:
    """What happened to one op: ``ok``; ``errno``/``error`` when the kernel refused;
    ``after`` is the partition file (``Revalidate``/``SetPartition``) or ``cpuset.cpus``
    read back; ``skipped`` when nothing needed doing."""

    op: NarrowOp
    ok: bool
    after: str | None = None
    errno: int | None = None
    error: str | None = None
    skipped: bool = False


def _write(d: Path, name: str, value: str) -> None:
    with open(d / name, "w") as fh:
        fh.write(value + "\n")


def _perform(mount: Path, op: NarrowOp) -> OpOutcome:
    d = mount / op.path if op.path else mount
    if isinstance(op, SetPartition):
        _write(d, PARTITION_FILE, op.word)
        return OpOutcome(op, True, _read(d, PARTITION_FILE))
    if isinstance(op, SetCpus):
        _write(d, "cpuset.cpus", op.cpus.to_list())
        return OpOutcome(op, True, _read(d, "cpuset.cpus"))
    assert isinstance(op, Revalidate)
    text = _read(d, PARTITION_FILE)
    if text is None:
        return OpOutcome(op, False, None, errno.ENOENT, "no partition file")
    _kind, reason = parse_partition(text)
    if reason is None:
        return OpOutcome(op, True, text, skipped=True)
    _write(d, PARTITION_FILE, "member")
    _write(d, PARTITION_FILE, op.word)
    after = _read(d, PARTITION_FILE) or ""
    _kind, reason = parse_partition(after)
    return OpOutcome(op, reason is None, after, None if reason is None else errno.EINVAL,
                     reason)


def apply_narrowing(mount: Path, ops: Sequence[NarrowOp]) -> tuple[OpOutcome, ...]:
    """Perform ``ops`` in order; a refused write is an outcome (with its errno) and the
    rest still run — each op closes one escape on its own."""
    out: list[OpOutcome] = []
    for op in ops:
        try:
            out.append(_perform(mount, op))
        except OSError as exc:
            out.append(OpOutcome(op, False, None, exc.errno, exc.strerror))
    return tuple(out)


@record
class Closed:
    """One :func:`close_escapes` round."""

    narrowing: Narrowing
    outcomes: tuple[OpOutcome, ...]
    views: tuple[CgroupView, ...]


def close_escapes(mount: Path, parents: Sequence[str], leased: CpuSet,
                  holders: AbstractSet[str], shared_pool: CpuSet, *,
                  holder_words: dict[str, PartitionWord] | None = None) -> Closed:
    """Read the children of ``parents`` (and the ``holders``), plan with
    :func:`~pinwarden.escape.plan_narrowing`, perform the writes."""
    views = read_views(mount, parents, sorted(holders))
    narrowing = plan_narrowing(views, leased, holders, shared_pool,
                               holder_words=holder_words)
    return Closed(narrowing, apply_narrowing(mount, narrowing.ops), views)
