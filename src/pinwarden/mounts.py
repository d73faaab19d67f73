"""Where the cgroup hierarchies are mounted: ``proc/self/mountinfo`` → :class:`CgroupMounts`.

:func:`read_mounts` is the adapter (one file read); :func:`parse_mountinfo` and
:func:`parse_proc_mounts` are pure.  Every path in a :class:`CgroupMounts` is the mount
point joined below the root it was read from, so ``read_mounts(Path("/dump"))`` yields
``/dump/sys/fs/cgroup/cpuset`` and ``read_mounts(Path("/"))`` the live path.

cgroup v1 hierarchies are keyed by controller (``cpuset``, ``cpu``, ``cpuacct`` …) and by
named hierarchy (``name=systemd``); a hierarchy carrying several controllers
(``cpu,cpuacct``) is found under each.  The first mount of a hierarchy wins (later ones are
bind mounts of the same tree).  A legacy ``-t cpuset`` mount (or cgroup v1 with
``noprefix``) names its files without the ``cpuset.`` prefix: see :meth:`cpuset_file`.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from pinwarden.record import field, record

#: cgroup v1 controllers the kernel knows; other mount options are flags.
V1_CONTROLLERS = frozenset({
    "cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "net_cls",
    "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc", "debug",
})


@record
class CgroupMounts:
    """cgroup mount points of one host (paths joined below its root)."""

    v1_mounts: Mapping[str, Path] = field(default_factory=dict)  # controller -> mount
    unified: Path | None = None  # the cgroup2 mount
    unified_controllers: frozenset[str] = frozenset()  # its cgroup.controllers
    v1_noprefix: frozenset[str] = frozenset()  # v1 controllers mounted without file prefix

    def v1(self, controller: str) -> Path | None:
        """Mount point of the v1 hierarchy holding ``controller`` (or ``name=…``)."""
        return self.v1_mounts.get(controller)

    @property
    def v2(self) -> Path | None:
        """The cgroup2 mount point, if any."""
        return self.unified

    def v2_has(self, controller: str) -> bool:
        """True when the cgroup2 root offers ``controller``."""
        return self.unified is not None and controller in self.unified_controllers

    def cpuset_file(self, name: str) -> str:
        """File name of cpuset attribute ``name`` (``cpus``) in the v1 cpuset hierarchy."""
        return name if "cpuset" in self.v1_noprefix else f"cpuset.{name}"


@record
class Mount:
    """One mount entry: where, which filesystem, and its options (mount + super)."""

    point: str  # absolute, unescaped
    fstype: str
    options: frozenset[str]


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    """Mount tables escape space, tab, newline and backslash as ``\\ooo``."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """``proc/PID/mountinfo`` lines (see proc(5)); malformed lines are skipped."""
    out: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        options = set(fields[5].split(",")) | set(fields[sep + 3].split(",")) \
            if len(fields) > sep + 3 else set(fields[5].split(","))
        out.append(Mount(_unescape(fields[4]), fields[sep + 1], frozenset(options)))
    return out


def parse_proc_mounts(text: str) -> list[Mount]:
    """``proc/mounts`` (fstab format) lines; malformed lines are skipped."""
    out: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        out.append(Mount(_unescape(fields[1]), fields[2], frozenset(fields[3].split(","))))
    return out


def below(root: Path, point: str) -> Path | None:
    """``point`` (an absolute path of the host at ``root``) joined below ``root``, never
    outside it: ``..`` components are resolved as the kernel would at ``/`` (``/../x`` is
    ``/x``), and for a root other than this host's ``/`` a path whose symbolic links lead
    out of the root is refused (None)."""
    where = root / posixpath.normpath("/" + point).lstrip("/")
    if root == Path("/"):
        return where
    try:
        inside = os.path.realpath(where)
        top = os.path.realpath(root)
    except (OSError, ValueError):
        return None
    return where if inside == top or inside.startswith(top.rstrip("/") + "/") else None


def cgroup_mounts(mounts: Iterable[Mount], root: Path,
                  controllers_of: Mapping[Path, str] | None = None) -> CgroupMounts:
    """Pick the cgroup mounts out of a mount table.

    ``controllers_of`` maps a cgroup2 mount (joined below ``root``) to the text of its
    ``cgroup.controllers``; the adapter :func:`read_mounts` fills it.
    """
    v1: dict[str, Path] = {}
    noprefix: set[str] = set()
    unified: Path | None = None
    for m in mounts:
        where = below(root, m.point)
        if where is None:
            continue
        if m.fstype == "cgroup2":
            if unified is None:
                unified = where
        elif m.fstype in ("cgroup", "cpuset"):
            names = {o for o in m.options if o in V1_CONTROLLERS or o.startswith("name=")}
            if m.fstype == "cpuset":
                names.add("cpuset")
            for name in names:
                if name not in v1:
                    v1[name] = where
                    if m.fstype == "cpuset" or "noprefix" in m.options:
                        noprefix.add(name)
    controllers: frozenset[str] = frozenset()
    if unified is not None and controllers_of is not None:
        controllers = frozenset(controllers_of.get(unified, "").split())
    return CgroupMounts(v1, unified, controllers, frozenset(noprefix))


def read_mounts(root: Path) -> CgroupMounts:
    """Read ``root/proc/self/mountinfo`` (else ``root/proc/mounts``); none → no mounts."""
    table: list[Mount] = []
    for name, parse in (("proc/self/mountinfo", parse_mountinfo),
                        ("proc/mounts", parse_proc_mounts)):
        try:
            text = (root / name).read_text(errors="replace")
        except OSError:
            continue
        table = parse(text)
        break
    found = cgroup_mounts(table, root)
    if found.unified is None:
        return found
    try:
        text = (found.unified / "cgroup.controllers").read_text(errors="replace")
    except OSError:
        text = ""
    return cgroup_mounts(table, root, {found.unified: text})
