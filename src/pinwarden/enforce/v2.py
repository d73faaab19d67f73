"""cgroup v2 cpuset backend: one cgroup2 tree, partitions via ``cpuset.cpus.partition``.

A thin adapter implementing :class:`~pinwarden.enforce.backend.CgroupBackend`; it decides
nothing.  What it adds over plain file writes is what the v2 interface makes necessary:

* **the cpuset controller must be enabled top-down**: :meth:`CgroupV2Backend.mkdir` writes
  ``+cpuset`` into ``cgroup.subtree_control`` of every ancestor that lacks it, so a new
  group has ``cpuset.*`` files at all;
* **partition writes succeed even when the kernel rejects the partition**: writing ``root``
  to ``cpuset.cpus.partition`` returns 0 and the file then reads
  ``root invalid (Cpu list in cpuset.cpus not exclusive)``.  Every write that can change a
  partition's validity is therefore read back; a partition this write made invalid is
  restored to its previous value and reported as :class:`CgroupOpError` (``EINVAL``) whose
  ``detail`` is the kernel's reason, so the primitive is all-or-nothing like any other
  failed write;
* **cpuset.cpus.exclusive** (Linux ≥ 6.7): where a group has that file, a partition root's
  exclusive CPUs are kept equal to its ``cpuset.cpus`` (set before the partition is
  switched on, cleared after it is switched off).  Older kernels (6.1) have no such file
  and derive exclusivity from ``cpuset.cpus`` alone: a root partition is valid only when no
  sibling's *configured* ``cpuset.cpus`` overlaps it.

Kernel facts this module relies on (checked by the virtme-ng lab, tests/test_lab_v2.py):
the root group has no ``cpuset.cpus``/``cpuset.cpus.partition`` and is always a partition
root; an empty ``cpuset.cpus`` means "inherit the parent's effective CPUs"; CPUs given to a
valid child partition vanish from the effective set of the parent and of every sibling.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pinwarden.cpuset import CpuSet, CpuSetError
from pinwarden.enforce.backend import (
    CgroupOpError,
    GroupState,
    HeldBy,
    PartitionKind,
    Snapshot,
    ancestors,
    collect_snapshot,
    join,
    parent_of,
)
from pinwarden.errors import HostError
from pinwarden.mounts import read_mounts
from pinwarden.procs import kernel_version

#: ``cpuset.cpus.partition`` words for each partition kind.
PARTITION_WORD: dict[PartitionKind, str] = {
    "member": "member", "exclusive": "root", "isolated": "isolated"}
_KIND_OF_WORD: dict[str, PartitionKind] = {w: k for k, w in PARTITION_WORD.items()}
_PARTITION_RE = re.compile(r"(?P<word>member|root|isolated)"
                           r"(?P<invalid> invalid(?: \((?P<reason>.*)\))?)?")

PARTITION_FILE = "cpuset.cpus.partition"
EXCLUSIVE_FILE = "cpuset.cpus.exclusive"


def parse_partition(text: str) -> tuple[PartitionKind, str | None]:
    """Parse ``cpuset.cpus.partition``: ``(kind, None)`` when valid, ``(kind, reason)``
    when the kernel marks the partition invalid.

    ``"root"`` → ``("exclusive", None)``; ``"isolated invalid (Parent is not a partition
    root)"`` → ``("isolated", "Parent is not a partition root")``.  Kernels before 6.1 print
    ``"root invalid"`` without a reason; the reason is then ``"invalid"``.
    """
    line = text.strip()
    match = _PARTITION_RE.fullmatch(line)
    if match is None:
        raise ValueError(f"unknown cpuset.cpus.partition value {line!r}")
    kind = _KIND_OF_WORD[match["word"]]
    if match["invalid"] is None:
        return kind, None
    return kind, (match["reason"] or "").strip() or "invalid"


def invalid_text(kind: PartitionKind, reason: str) -> str:
    """The kernel's own wording back: ``root invalid (reason)``."""
    word = PARTITION_WORD[kind]
    return f"{word} invalid" if reason == "invalid" else f"{word} invalid ({reason})"


def errno_for_reason(reason: str) -> int:
    """The errno cgroup v1 gives for the same refusal, so callers explaining errnos say
    the right thing: a parent that is no partition is ``EACCES`` (v1: an exclusive cpuset
    needs an exclusive parent), a parent left without CPUs for its tasks ``ENOSPC``,
    overlap with a sibling, offline or empty CPU lists ``EINVAL``."""
    text = reason.lower()
    if text.startswith("parent is not a partition root") \
            or text.startswith("parent is an invalid partition root"):
        return errno.EACCES
    if "unable to distribute" in text:
        return errno.ENOSPC
    return errno.EINVAL


class PartitionInvalidError(CgroupOpError):
    """A write left a partition invalid; it was undone.  ``group`` is the partition the
    kernel marked invalid (the written group or a sibling/child), ``reason`` the kernel's
    words (``Cpu list in cpuset.cpus not exclusive``, ``Parent is not a partition root`` …).
    """

    def __init__(self, action: str, path: str, *, value: str, group: str, kind: PartitionKind,
                 reason: str, err: int | None = None) -> None:
        self.group = group
        self.kind = kind
        self.reason = reason
        where = "" if group == path else f" made {group or '/'} invalid:"
        super().__init__(action, path, err if err is not None else errno_for_reason(reason),
                         value=value,
                         detail=f"the kernel{where} reports {invalid_text(kind, reason)!r}")


#: First kernel that refuses a ``root`` partition holding ``isolcpus=`` CPUs (lab,
#: DEVELOPERS.md).
HOUSEKEEPING_RULE_SINCE = (6, 12)
#: Kernels that refuse an ``isolated`` partition over them too, although the rule means to
#: let it through (6.12: ``prstate_housekeeping_conflict()`` is asked with the old, member
#: state); the lab's 7.3 accepts it.  Kernels in between are tried, and a refusal is
#: remembered (:attr:`CgroupV2Backend.isolated_refused`).
ISOLATED_REFUSED_IN = ((6, 12),)


def cpuset_setting_lost(children: dict[str, dict[str, str | None]]) -> str | None:
    """What turning the cpuset controller off above ``children`` (each child's
    ``cgroup.subtree_control``, ``cpuset.cpus``, ``cpuset.mems``, ``cpuset.cpus.exclusive``
    and ``cpuset.cpus.partition``, None where absent) would take from somebody, in words;
    None when nothing: no child enables it for its own children (the kernel would refuse,
    and libvirt's groups below need it) and every child only inherits, as a member."""
    for path, files in sorted(children.items()):
        if "cpuset" in (files.get("cgroup.subtree_control") or "").split():
            return f"/{path} enables it for its own children"
        for name in ("cpuset.cpus", "cpuset.mems", EXCLUSIVE_FILE):
            value = (files.get(name) or "").strip()
            if value:
                return f"/{path} has {name} {value}"
        word = (files.get(PARTITION_FILE) or "member").split()[0]
        if word != "member":
            return f"/{path} is a partition ({word})"
    return None


def _isolcpus(root: Path) -> CpuSet:
    try:
        text = (root / "sys/devices/system/cpu/isolated").read_text(errors="replace")
        return CpuSet.parse_kernel(text)
    except (OSError, CpuSetError):
        return CpuSet()


def forbidden_partition_cpus(root: Path = Path("/"), *, refused: bool = False) -> CpuSet:
    """The ``isolcpus=`` CPUs (``/sys/devices/system/cpu/isolated``) when the kernel at
    ``root`` refuses ``root`` partitions holding them (6.12+, or ``refused``: it was seen
    doing so); else none."""
    if not refused and kernel_version(root) < HOUSEKEEPING_RULE_SINCE:
        return CpuSet()
    return _isolcpus(root)


def forbidden_isolated_cpus(root: Path = Path("/"), *, refused: bool = False) -> CpuSet:
    """The ``isolcpus=`` CPUs when the kernel at ``root`` refuses ``isolated`` partitions
    holding them as well (:data:`ISOLATED_REFUSED_IN`, or ``refused``: it was seen doing
    so); else none — 6.1 takes any partition over them, 7.3 an ``isolated`` one."""
    if not refused and kernel_version(root) not in ISOLATED_REFUSED_IN:
        return CpuSet()
    return _isolcpus(root)


def is_housekeeping_conflict(reason: str) -> bool:
    """The kernel's reason for refusing a partition over ``isolcpus=`` CPUs (6.12+)."""
    return "housekeeping" in reason.lower()


def _check_path(path: str) -> None:
    if path == "":
        return
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise CgroupOpError("path", path, errno.EINVAL, detail="not a relative group path")


#: Groups :meth:`CgroupV2Backend.partitions_holding` looks at, at most (an error path:
#: bounded on a host with very many cgroups).
PARTITION_SCAN_LIMIT = 20_000


class CgroupV2Backend:
    """The cpuset side of one cgroup2 tree rooted at ``mount`` (normally the cgroup2 mount
    point, e.g. ``/sys/fs/cgroup``)."""

    def __init__(self, mount: Path, *, root: Path = Path("/")) -> None:
        self.mount = mount
        self.root = root  # for /proc/sys/kernel/osrelease and /sys/devices/system/cpu
        self.housekeeping_refused = False  # the kernel refused a partition over isolcpus
        self.isolated_refused = False  # ... an isolated one among them

    def partition_forbidden_cpus(self) -> CpuSet:
        """CPUs no ``root`` partition may hold here: the ``isolcpus=`` CPUs
        (``/sys/devices/system/cpu/isolated``) on Linux 6.12+, or on any kernel once it
        refused a partition with "partition config conflicts with housekeeping setup";
        else none.  (6.1 accepts partitions over isolcpus CPUs; see DEVELOPERS.md.)"""
        return forbidden_partition_cpus(self.root, refused=self.housekeeping_refused)

    def isolated_forbidden_cpus(self) -> CpuSet:
        """CPUs no ``isolated`` partition may hold here: the ``isolcpus=`` CPUs on 6.12
        (:data:`ISOLATED_REFUSED_IN`), or once the kernel refused an isolated partition
        over them; else none."""
        return forbidden_isolated_cpus(self.root, refused=self.isolated_refused)

    def partitions_holding(self, cpus: CpuSet) -> tuple[HeldBy, ...]:
        """Valid ``root``/``isolated`` partitions anywhere in the tree whose effective CPUs
        meet ``cpus`` (:class:`~pinwarden.enforce.backend.HeldBy`), for messages — the
        kernel takes a partition's CPUs from every group outside it.  At most
        :data:`PARTITION_SCAN_LIMIT` groups are looked at."""
        found: list[HeldBy] = []
        seen = 0
        for top, dirs, _ in os.walk(self.mount):
            dirs.sort()
            rel = os.path.relpath(top, self.mount)
            seen += 1
            if seen > PARTITION_SCAN_LIMIT:
                break
            if rel == ".":
                continue
            try:
                kind, reason = parse_partition(
                    (Path(top) / PARTITION_FILE).read_text(errors="replace"))
                if kind == "member" or reason is not None:
                    continue
                held = CpuSet.parse_kernel(
                    (Path(top) / "cpuset.cpus.effective").read_text()) & cpus
            except (OSError, ValueError, CpuSetError):
                continue
            if held:
                found.append(HeldBy(rel, top, "isolated" if kind == "isolated" else "root",
                                    held))
        return tuple(found)

    @classmethod
    def from_mounts(cls, root: Path = Path("/")) -> CgroupV2Backend:
        """The cgroup2 tree of the host at ``root``; it must offer the cpuset controller."""
        mounts = read_mounts(root)
        if mounts.v2 is None:
            raise HostError("no cgroup2 hierarchy is mounted (mount -t cgroup2 none "
                            "/sys/fs/cgroup)")
        if not mounts.v2_has("cpuset"):
            raise HostError(f"the cgroup2 hierarchy at {mounts.v2} has no cpuset controller "
                            f"(it is bound to a cgroup v1 hierarchy, or disabled with "
                            f"cgroup_disable=cpuset)")
        return cls(mounts.v2, root=root)

    @property
    def kind(self) -> str:
        return "v2"

    # -- low-level file access -----------------------------------------------------

    def _dir(self, path: str) -> Path:
        _check_path(path)
        return self.mount / path if path else self.mount

    def _read(self, path: str, name: str) -> str:
        try:
            return (self._dir(path) / name).read_text(errors="replace")
        except OSError as exc:
            raise CgroupOpError("read", path, exc.errno or errno.EIO,
                                detail=name) from None

    def _read_opt(self, path: str, name: str) -> str | None:
        try:
            return (self._dir(path) / name).read_text(errors="replace")
        except FileNotFoundError:
            if not self._dir(path).is_dir():
                raise CgroupOpError("read", path, errno.ENOENT, detail=name) from None
            return None
        except OSError as exc:
            raise CgroupOpError("read", path, exc.errno or errno.EIO,
                                detail=name) from None

    def _write(self, action: str, path: str, name: str, value: str) -> None:
        # One write(2) of the whole value: the kernel parses each write on its own.
        try:
            fd = os.open(self._dir(path) / name, os.O_WRONLY)
        except OSError as exc:
            raise CgroupOpError(action, path, exc.errno or errno.EIO, value=value,
                                detail=None if exc.errno != errno.ENOENT else
                                f"no {name}") from None
        try:
            os.write(fd, (value + "\n").encode())
        except OSError as exc:
            raise CgroupOpError(action, path, exc.errno or errno.EIO, value=value) from None
        finally:
            os.close(fd)

    def _cpus_file(self, path: str, name: str) -> CpuSet:
        text = self._read(path, name)
        try:
            return CpuSet.parse_kernel(text)
        except CpuSetError:
            raise CgroupOpError("read", path, errno.EIO,
                                detail=f"{name}: unparsable {text.strip()!r}") from None

    def has_exclusive(self, path: str) -> bool:
        """The kernel offers ``cpuset.cpus.exclusive`` on this (non-root) group."""
        return path != "" and (self._dir(path) / EXCLUSIVE_FILE).exists()

    def _uses_exclusive(self, path: str) -> bool:
        """Keep ``cpuset.cpus.exclusive`` = ``cpuset.cpus`` on this group: where the file
        exists and the parent is a partition root.  Below a member the kernel would judge
        the exclusive list first and report it invalid instead of the real problem."""
        parent = parent_of(path)
        if parent is None or not self.has_exclusive(path):
            return False
        kind, reason = self.partition_of(parent)
        return kind != "member" and reason is None

    def partition_of(self, path: str) -> tuple[PartitionKind, str | None]:
        """``(kind, invalid reason or None)``; the root group is always a valid root."""
        if path == "":
            return "exclusive", None
        text = self._read(path, PARTITION_FILE)
        try:
            return parse_partition(text)
        except ValueError as exc:
            raise CgroupOpError("read", path, errno.EIO, detail=str(exc)) from None

    # -- reading -----------------------------------------------------------------------

    def _granted(self, path: str, children: Iterable[str]) -> CpuSet:
        """CPUs of the valid child partitions of ``path`` (and theirs): the kernel takes them
        out of ``path``'s ``cpuset.cpus.effective`` although they belong to its subtree."""
        out = CpuSet()
        for name in children:
            child = join(path, name)
            try:
                kind, reason = self.partition_of(child)
                if kind == "member" or reason is not None:
                    continue
                out = out | self._cpus_file(child, "cpuset.cpus.effective")
                grand = [e.name for e in os.scandir(self._dir(child)) if e.is_dir()]
            except (CgroupOpError, OSError):
                continue  # vanished meanwhile, or cpuset not enabled below
            out = out | self._granted(child, grand)
        return out

    def read_group(self, path: str) -> GroupState:
        """One group.  ``effective_cpus`` is the CPUs the group's *subtree* may use, as on
        cgroup v1: the kernel's ``cpuset.cpus.effective`` plus the CPUs it moved into valid
        child partitions (v2 removes those from the parent's file)."""
        d = self._dir(path)
        if not d.is_dir():
            raise CgroupOpError("read", path, errno.ENOENT)
        effective = self._cpus_file(path, "cpuset.cpus.effective")
        effective_mems = self._cpus_file(path, "cpuset.mems.effective")
        if path == "":
            cpus, mems = effective, effective_mems
        else:
            if not (d / "cpuset.cpus").exists():
                raise CgroupOpError("read", path, errno.ENOENT,
                                    detail="cpuset controller not enabled in its parent")
            cpus = self._cpus_file(path, "cpuset.cpus")
            mems = self._cpus_file(path, "cpuset.mems")
        kind, reason = self.partition_of(path)
        procs = self._read(path, "cgroup.procs")
        try:
            children = tuple(sorted(e.name for e in os.scandir(d) if e.is_dir()))
        except OSError as exc:
            raise CgroupOpError("read", path, exc.errno or errno.EIO) from None
        if kind != "member" and reason is None:
            effective = effective | self._granted(path, children)
        if path == "":
            cpus = effective
        return GroupState(path=path, cpus=cpus, mems=mems, partition=kind,
                          effective_cpus=effective, effective_mems=effective_mems,
                          populated=bool(procs.strip()), children=children,
                          partition_error=reason)

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        return collect_snapshot(self.read_group, paths)

    def tasks(self, path: str) -> tuple[int, ...]:
        text = self._read(path, "cgroup.threads")
        return tuple(int(t) for t in text.split())

    # -- writing -----------------------------------------------------------------------

    def cpuset_enabled(self, path: str) -> bool:
        """``path`` enables the cpuset controller for its children (its
        ``cgroup.subtree_control`` names ``cpuset``)."""
        return "cpuset" in self._read(path, "cgroup.subtree_control").split()

    def disable_cpuset(self, path: str) -> str | None:
        """Turn the cpuset controller off again for the children of ``path`` — only where
        that loses nobody's setting (:func:`cpuset_setting_lost`): it takes every child's
        ``cpuset.*`` files with it.  None once it is off; else what keeps it on, in words.
        :class:`CgroupOpError` when the kernel refuses the write."""
        if not self.cpuset_enabled(path):
            return None
        try:
            names = sorted(e.name for e in os.scandir(self._dir(path)) if e.is_dir())
        except OSError as exc:
            raise CgroupOpError("read", path, exc.errno or errno.EIO) from None
        files = {join(path, name): {f: self._read_opt(join(path, name), f) for f in
                                    ("cgroup.subtree_control", "cpuset.cpus", "cpuset.mems",
                                     EXCLUSIVE_FILE, PARTITION_FILE)}
                 for name in names}
        lost = cpuset_setting_lost(files)
        if lost is not None:
            return lost
        self._write("cpus", path, "cgroup.subtree_control", "-cpuset")
        return None

    def _enable_cpuset(self, path: str, for_child: str) -> None:
        controls = self._read(path, "cgroup.subtree_control").split()
        if "cpuset" in controls:
            return
        try:
            self._write("mkdir", path, "cgroup.subtree_control", "+cpuset")
        except CgroupOpError as exc:
            why = ("it has processes of its own (cgroup v2 'no internal processes' rule)"
                   if exc.errno == errno.EBUSY else f"{errno.errorcode.get(exc.errno)}")
            raise CgroupOpError("mkdir", for_child, exc.errno,
                                detail=f"cannot enable the cpuset controller in "
                                       f"{path or '/'}: {why}") from None

    def mkdir(self, path: str) -> None:
        parent = parent_of(path)
        if parent is None:
            raise CgroupOpError("mkdir", path, errno.EEXIST)
        for anc in ancestors(path):
            self._enable_cpuset(anc, path)
        try:
            os.mkdir(self._dir(path))
        except OSError as exc:
            raise CgroupOpError("mkdir", path, exc.errno or errno.EIO) from None

    def rmdir(self, path: str) -> None:
        if path == "":
            raise CgroupOpError("rmdir", path, errno.EBUSY)
        try:
            os.rmdir(self._dir(path))
        except OSError as exc:
            raise CgroupOpError("rmdir", path, exc.errno or errno.EIO) from None

    def _partition_states(self, paths: Iterable[str]) -> dict[str, tuple[PartitionKind,
                                                                           str | None]]:
        """``(kind, invalid reason or None)`` of each partition root among ``paths``."""
        out: dict[str, tuple[PartitionKind, str | None]] = {}
        for p in paths:
            try:
                kind, reason = self.partition_of(p)
            except CgroupOpError:
                continue
            if kind != "member":
                out[p] = (kind, reason)
        return out

    def _neighbours(self, path: str) -> list[str]:
        """``path``, its siblings and its children: the partitions whose validity a write
        to ``path`` can change."""
        out = [path]
        parent = parent_of(path)
        for base in ([parent] if parent is not None else []) + [path]:
            try:
                names = sorted(e.name for e in os.scandir(self._dir(base)) if e.is_dir())
            except OSError:
                continue
            out.extend(join(base, n) for n in names if join(base, n) != path)
        return out

    def _newly_invalid(self, before: dict[str, tuple[PartitionKind, str | None]]
                       ) -> tuple[str, PartitionKind, str] | None:
        """The first partition that was valid in ``before`` and is invalid now."""
        for p, (kind, reason) in self._partition_states(before).items():
            was = before.get(p)
            if reason is not None and (was is None or was[1] is None):
                return p, kind, reason
        return None

    def _revalidate(self, before: dict[str, tuple[PartitionKind, str | None]]) -> None:
        """After an undo: switch partitions that were valid before and are still marked
        invalid off and on again.  The kernel (6.1) does not re-validate a partition by
        itself when the conflict that broke it goes away."""
        for p, (_kind, reason) in self._partition_states(before).items():
            was = before.get(p)
            if reason is not None and was is not None and was[1] is None:
                with contextlib.suppress(CgroupOpError):
                    self._write("partition", p, PARTITION_FILE, "member")
                    self._write("partition", p, PARTITION_FILE, PARTITION_WORD[was[0]])

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        if path == "":
            raise CgroupOpError("cpus", path, errno.EACCES, value=cpus.to_list(),
                                detail="the root group's CPUs cannot be set")
        before = self._partition_states(self._neighbours(path))
        old = self._read(path, "cpuset.cpus").strip()
        value = cpus.to_list()
        kind, _ = self.partition_of(path)
        if not cpus and kind != "member":
            # Linux 6.1 accepts this, keeps the group "root" and never gives its CPUs back
            # to the parent: they are lost to every cgroup until reboot (lab: empty_partition)
            raise CgroupOpError("cpus", path, errno.EBUSY, value="",
                                detail=f"emptying a {PARTITION_WORD[kind]} partition would "
                                       f"lose its CPUs in the kernel; make it member first")
        if not cpus:  # (a member: inherit)
            self._inherit(path, "cpuset.cpus", "cpus")
            return
        exclusive = kind != "member" and self._uses_exclusive(path)
        old_excl = self._read(path, EXCLUSIVE_FILE).strip() if exclusive else None
        narrowing = exclusive and not CpuSet.parse_kernel(old) <= cpus
        try:
            if narrowing:  # cpuset.cpus.exclusive stays within cpuset.cpus at every step
                self._write("cpus", path, EXCLUSIVE_FILE, value)
            self._write("cpus", path, "cpuset.cpus", value)
            if exclusive and not narrowing:
                self._write("cpus", path, EXCLUSIVE_FILE, value)
        except CgroupOpError:
            self._restore_cpus(path, old, old_excl, before)
            raise
        broken = self._newly_invalid(before)
        if broken is not None:
            self._restore_cpus(path, old, old_excl, before)
            group, bad_kind, reason = broken
            if is_housekeeping_conflict(reason):
                self.housekeeping_refused = True
                self.isolated_refused = self.isolated_refused or bad_kind == "isolated"
            raise PartitionInvalidError("cpus", path, value=value, group=group,
                                        kind=bad_kind, reason=reason)

    def _restore_cpus(self, path: str, cpus: str, exclusive: str | None,
                      before: dict[str, tuple[PartitionKind, str | None]]) -> None:
        """Best effort: the caller's rollback re-reads the state and retries."""
        for name, value in ((EXCLUSIVE_FILE, exclusive), ("cpuset.cpus", cpus),
                            (EXCLUSIVE_FILE, exclusive)):
            if value is not None:
                with contextlib.suppress(CgroupOpError):
                    self._write("cpus", path, name, value)
        self._revalidate(before)

    def set_mems(self, path: str, mems: CpuSet) -> None:
        if path == "":
            raise CgroupOpError("mems", path, errno.EACCES, value=mems.to_list(),
                                detail="the root group's memory nodes cannot be set")
        if not mems:
            self._inherit(path, "cpuset.mems", "mems")
            return
        self._write("mems", path, "cpuset.mems", mems.to_list())

    def _inherit(self, path: str, name: str, action: str) -> None:
        """Empty ``name`` (``cpuset.cpus``/``cpuset.mems``): the group inherits its parent's.
        The kernel refuses that while tasks live in the group or below it and it has some
        (``ENOSPC``; ``validate_change``): the shared group set back as found after the
        last lease while VMs run there (lab: ``v2.inherit_populated``).  What it would
        inherit is written then, its parent's effective set, which the kernel takes, and
        which is what the tasks get either way."""
        try:
            self._write(action, path, name, "")
        except CgroupOpError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            parent = path.rpartition("/")[0]
            self._write(action, path, name,
                        self._cpus_file(parent, f"{name}.effective").to_list())

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        """``member``, ``exclusive`` (``root``) or ``isolated``.

        A partition the kernel marks invalid is undone and raised as
        :class:`PartitionInvalidError`; when the group's parent is no valid partition the
        errno is ``EACCES`` whatever the kernel's words (6.1: "Parent is not a partition
        root"; 6.12: "Invalid cpu list in cpuset.cpus.exclusive").  Linux 6.12 refuses any
        partition holding ``isolcpus=`` CPUs ("partition config conflicts with housekeeping
        setup"), 7.3 a ``root`` one only; 6.1 accepts them."""
        word = PARTITION_WORD[kind]
        if path == "":
            if kind == "exclusive":
                return
            raise CgroupOpError("partition", path, errno.EACCES, value=word,
                                detail="the root group is always a partition root")
        old_kind, _ = self.partition_of(path)
        before = self._partition_states(self._neighbours(path))
        if kind != "member":
            before.setdefault(path, (kind, None))  # the group itself must come out valid
        uses = kind != "member" and self._uses_exclusive(path)
        old_excl = self._read(path, EXCLUSIVE_FILE).strip() if self.has_exclusive(path) \
            else None
        try:
            if uses:
                self._write("partition", path, EXCLUSIVE_FILE,
                            self._read(path, "cpuset.cpus").strip())
            self._write("partition", path, PARTITION_FILE, word)
        except CgroupOpError:
            if uses and old_excl is not None:
                with contextlib.suppress(CgroupOpError):
                    self._write("partition", path, EXCLUSIVE_FILE, old_excl)
            raise
        if kind == "member" and old_excl:
            with contextlib.suppress(CgroupOpError):  # harmless if it stays set
                self._write("partition", path, EXCLUSIVE_FILE, "")
        broken = self._newly_invalid(before)
        if broken is None:
            return
        with contextlib.suppress(CgroupOpError):
            self._write("partition", path, PARTITION_FILE, PARTITION_WORD[old_kind])
            if old_excl is not None:
                self._write("partition", path, EXCLUSIVE_FILE, old_excl)
        if old_kind == "member":
            before.pop(path, None)
        self._revalidate(before)
        group, bad_kind, reason = broken
        if is_housekeeping_conflict(reason):
            self.housekeeping_refused = True
            self.isolated_refused = self.isolated_refused or bad_kind == "isolated"
        parent = parent_of(path)
        orphan = False
        if group == path and parent is not None:
            parent_kind, parent_reason = self.partition_of(parent)
            orphan = parent_kind == "member" or parent_reason is not None
        raise PartitionInvalidError("partition", path, value=word, group=group,
                                    kind=bad_kind, reason=reason,
                                    err=errno.EACCES if orphan else None)

    def attach_process(self, path: str, pid: int) -> None:
        self._write("attach", path, "cgroup.procs", str(pid))

    def attach_thread(self, path: str, tid: int) -> None:
        self._write("attach", path, "cgroup.threads", str(tid))
