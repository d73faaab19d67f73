"""Host CPU topology, read from a root directory (``/`` or a sysfs dump).

Value types are frozen records (:mod:`pinwarden.record`); :func:`read_topology` is the only
function doing I/O.
:func:`encode_topology` / :func:`decode_topology` turn a ``Topology`` into JSON data and
back (pure; :mod:`pinwarden.topocache` stores it).

How the kernel files are read, and why (the result agrees with hwloc's ``lstopo``):

* CPUs are the ``cpuN`` directories of ``sys/devices/system/cpu`` (``present`` when there
  are none); a CPU is online per the ``online`` list, else per its own ``cpuN/online``
  file; a CPU without that file (``cpu0`` on most x86 kernels) is online.
* A physical core is the CPU's ``core_cpus`` / ``thread_siblings`` mask, split where the
  threads report different ``(physical_package_id, die_id, core_id)`` (AMD Bulldozer
  compute units list two cores as siblings; s390 repeats ``core_id`` for distinct cores, so
  ``core_id`` alone is no identity either).  A CPU without a mask is a core of its own.
* A package is the ``package_cpus`` / ``core_siblings`` mask (ids repeat across packages
  on ia64 and are ``-1`` on s390, so the mask, not the id, is the identity).
* NUMA nodes are ``sys/devices/system/node/nodeN`` (those in ``node/online`` when it
  exists) with ``cpulist`` or ``cpumap``; without ``sys/devices/system/node`` the host is
  one node 0.  A CPU no node lists (its node is offline) gets the node its ``cpuN/nodeM``
  link names, else the lowest node; :meth:`Topology.node_known` tells the difference.
* Every file may carry NUL bytes or a trailing newline; a list file may hold a mask and
  vice versa; missing files mean "unknown", never an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pinwarden.cpuset import EMPTY, MAX_CPU, CpuSet, CpuSetError
from pinwarden.errors import HostError
from pinwarden.record import field, record

CPU_DIR = Path("sys/devices/system/cpu")
NODE_DIR = Path("sys/devices/system/node")

#: Hybrid CPU PMU directories (``sys/devices/<name>/cpus``) and the kind they report.
HYBRID_KINDS = (("cpu_core", "intel_core"), ("cpu_atom", "intel_atom"))


@record
class Cpu:
    """One logical CPU (hwloc's PU)."""

    id: int
    online: bool
    package: int | None  # physical_package_id; None when the kernel hides it (offline)
    die: int | None
    cluster: int | None
    core: int | None  # core_id as the kernel reports it (not unique across packages)
    siblings: CpuSet  # every CPU on the same physical core, itself included
    node: int  # NUMA node; 0 on hosts without sys/devices/system/node
    kind: str | None = None  # hybrid CPU kind ("intel_core", "intel_atom") where reported
    #: every CPU in the same package, itself included (the identity of the package:
    #: ``package`` ids repeat across packages on some machines and are unknown on others)
    package_cpus: CpuSet = EMPTY


@record(weakref=True)
class Topology:
    """The host's CPUs, NUMA nodes and kernel CPU lists (a snapshot, no I/O)."""

    cpus: Mapping[int, Cpu]  # every present CPU by id
    present: CpuSet
    online: CpuSet
    isolated: CpuSet  # /sys/devices/system/cpu/isolated (isolcpus=)
    nohz_full: CpuSet
    nodes: Mapping[int, CpuSet] = field(default_factory=dict)  # node -> CPUs (online+offline)

    def cpu(self, cpu: int) -> Cpu:
        return self.cpus[cpu]

    def siblings(self, cpu: int) -> CpuSet:
        return self.cpus[cpu].siblings

    def node_of(self, cpu: int) -> int:
        return self.cpus[cpu].node

    def node_known(self, cpu: int) -> bool:
        """True when ``cpu`` is listed by its (online) node; False when that node is offline
        (then ``node`` comes from the ``cpuN/nodeM`` link, or is the lowest node)."""
        return cpu in self.nodes.get(self.cpus[cpu].node, EMPTY)

    def cores(self) -> list[CpuSet]:
        """Distinct physical cores (sibling sets) of online CPUs, ordered by first CPU."""
        seen: dict[int, CpuSet] = {}
        for c in self.cpus.values():
            if c.online:
                sib = c.siblings & self.online
                seen.setdefault(sib.first(), sib)
        return [seen[k] for k in sorted(seen)]

    def packages(self) -> list[CpuSet]:
        """Distinct packages (CPU sets) of present CPUs, ordered by first CPU."""
        seen: dict[int, CpuSet] = {}
        for c in self.cpus.values():
            cpus = c.package_cpus or CpuSet.of([c.id])
            seen.setdefault(cpus.first(), cpus)
        return [seen[k] for k in sorted(seen)]

    @property
    def smt(self) -> bool:
        """True when some online physical core has more than one online thread."""
        return any(len(core) > 1 for core in self.cores())


# -- reading helpers (the only I/O) -----------------------------------------------------

_MASK = re.compile(r"[0-9a-fA-F]{8}(,[0-9a-fA-F]{8})*")
_CPU_ENTRY = re.compile(r"cpu([0-9]+)")
_NODE_ENTRY = re.compile(r"node([0-9]+)")


def _read(path: Path) -> str | None:
    """File text without NUL bytes and surrounding whitespace; None when unreadable."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return None
    except OSError:  # e.g. EINVAL/ENODEV from a half-gone sysfs attribute
        return None
    return raw.replace(b"\x00", b"").decode("ascii", "replace").strip()


def parse_cpus(text: str, *, mask: bool = False) -> CpuSet:
    """A CPU set from a sysfs file that should hold a list (or, with ``mask``, a mask).

    Kernels and dumps mix the two forms, so an 8-hex-digit-word text is always a mask, a
    text with ``-`` is always a list, and the other form is tried when the first fails.
    Older kernels print ``(null)`` for an unset ``nohz_full``: that is the empty set.
    """
    clean = text.replace("\x00", "").strip()
    if clean in ("", "(null)"):
        return EMPTY
    if _MASK.fullmatch(clean) or (mask and "-" not in clean):
        first, second = CpuSet.from_mask, CpuSet.parse_kernel
    else:
        first, second = CpuSet.parse_kernel, CpuSet.from_mask
    try:
        return first(clean)
    except CpuSetError as exc:
        try:
            return second(clean)
        except CpuSetError:
            raise exc from None


def _cpus_file(path: Path, *, mask: bool = False) -> CpuSet | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return parse_cpus(text, mask=mask)
    except CpuSetError as exc:
        raise HostError(f"{path}: {exc.message}") from None


def _first_cpus(base: Path, *names: str) -> CpuSet | None:
    """The first readable of ``names`` (``*_list`` names are lists, others masks)."""
    for name in names:
        value = _cpus_file(base / name, mask=not name.endswith("list"))
        if value is not None:
            return value
    return None


def _int_file(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None  # -1: "no such id" (s390 packages, offline CPUs)


def _no_bad_id(value: int | None) -> int | None:
    """x86 reports an unknown cluster as BAD_APICID (65535)."""
    return None if value == 0xFFFF else value


def _numbered(directory: Path, pattern: re.Pattern[str]) -> list[int]:
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return []
    out = []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


#: The housekeeping types ``nohz_full=`` takes off its CPUs (the kernel's HK_FLAG_TICK
#: and the ones that go with it); ``isolcpus=`` takes ``tick`` with its ``nohz`` flag,
#: ``domain`` with its ``domain`` flag or with none, ``managed_irq`` with that flag.
_NOHZ_FULL_TYPES = frozenset({"tick", "wq", "timer", "rcu", "misc", "kthread"})
_ISOLCPUS_FLAGS = {"nohz": "tick", "domain": "domain", "managed_irq": "managed_irq"}


def _boot_cpu_list(text: str, last: int) -> CpuSet | None:
    """A CPU list as the kernel's ``cpulist_parse`` reads it on the command line:
    ``2-7``, ``N`` (the last CPU), strides ``0-15:2/4`` (the first 2 of every 4), empty
    regions between commas; None where the kernel would reject the list."""
    cpus: set[int] = set()
    for region in text.split(","):
        if not region:
            continue
        span, colon, stride = region.partition(":")
        first, dash, end = span.partition("-")
        try:
            start = last if first == "N" else int(first)
            stop = (last if end == "N" else int(end)) if dash else start
            used, slash, group = stride.partition("/")
            take, every = (int(used), int(group)) if colon else (1, 1)
        except ValueError:
            return None
        if min(start, stop, take) < 0 or start > stop or (colon and not slash) or \
                every == 0 or take > every or stop > MAX_CPU:
            return None
        cpus.update(c for c in range(start, stop + 1) if (c - start) % every < take)
    return CpuSet.of(cpus)


def cmdline_isolation(cmdline: str, last: int) -> tuple[CpuSet | None, CpuSet | None]:
    """(isolated, nohz_full): the CPUs the kernel takes off the scheduler domains and off
    the tick, as it derives them from ``isolcpus=`` and ``nohz_full=`` (None: no such
    parameter took effect).  For roots whose sysfs lacks the ``isolated`` and
    ``nohz_full`` lists (the kernel's own answer, always read first).

    As the kernel does: ``isolcpus=`` without flags means ``domain``; with flags
    (``nohz``, ``domain``, ``managed_irq``; unknown ones skipped) only those, so
    ``isolcpus=nohz,2-7`` isolates no domain; a list the kernel rejects is ignored; a
    later parameter naming a housekeeping type already set with another list is ignored
    whole (the first one stands), one adding types sets only those.  ``last``: the CPU
    ``N`` names."""
    isolated: dict[str, CpuSet] = {}
    for word in cmdline.split():
        key, eq, value = word.partition("=")
        if not eq or key not in ("isolcpus", "nohz_full"):
            continue
        value = value.strip('"')
        if key == "nohz_full":
            types: set[str] = set(_NOHZ_FULL_TYPES)
        else:
            types = set()
            while value[:1].isalpha():  # (so isolcpus=N… is a flag, as in the kernel)
                flag, _comma, value = value.partition(",")
                if flag in _ISOLCPUS_FLAGS:
                    types.add(_ISOLCPUS_FLAGS[flag])
            types = types or {"domain"}
        cpus = _boot_cpu_list(value, last)
        if cpus is None or any(isolated.get(t, cpus) != cpus for t in types):
            continue
        for t in types:
            isolated.setdefault(t, cpus)
    return isolated.get("domain"), isolated.get("tick")


# -- the reader -------------------------------------------------------------------------


class _Raw:
    """What sysfs says about one CPU, before cores are reconciled.  (A plain class: a
    record costs a compile at import, and every command pays it.)"""

    __slots__ = ("cluster", "core", "die", "has_topology", "package", "package_mask",
                 "thread_mask")

    def __init__(self, *, has_topology: bool, package: int | None, die: int | None,
                 cluster: int | None, core: int | None, thread_mask: CpuSet | None,
                 package_mask: CpuSet | None) -> None:
        self.has_topology = has_topology
        self.package = package
        self.die = die
        self.cluster = cluster
        self.core = core
        self.thread_mask = thread_mask
        self.package_mask = package_mask


def _read_raw(cpu_dir: Path) -> _Raw:
    topo = cpu_dir / "topology"
    return _Raw(
        has_topology=topo.is_dir(),
        package=_int_file(topo / "physical_package_id"),
        die=_int_file(topo / "die_id"),
        cluster=_no_bad_id(_int_file(topo / "cluster_id")),
        core=_int_file(topo / "core_id"),
        thread_mask=_first_cpus(topo, "core_cpus_list", "core_cpus",
                                "thread_siblings_list", "thread_siblings"),
        package_mask=_first_cpus(topo, "package_cpus_list", "package_cpus",
                                 "core_siblings_list", "core_siblings"),
    )


def read_topology(root: Path) -> Topology:
    """Read the topology of the host whose filesystem is at ``root``."""
    base = root / CPU_DIR
    if not base.is_dir():
        raise HostError(f"{root} is not a Linux host root: {base} is missing "
                        "(give --root a directory holding sys/ and proc/)")
    ids = _numbered(base, _CPU_ENTRY)
    if ids and ids[-1] > MAX_CPU:
        raise HostError(f"{base}/cpu{ids[-1]}: CPU number exceeds the supported maximum "
                        f"{MAX_CPU}")
    present = CpuSet.of(ids) if ids else _cpus_file(base / "present")
    if not present:
        raise HostError(f"{root} is not a Linux host root: {base} lists no CPU")

    online_list = _cpus_file(base / "online")
    if online_list is not None:
        online = online_list & present
    else:
        online = CpuSet.of(c for c in present if _read(base / f"cpu{c}" / "online") != "0")
    if not online:  # a running kernel always has one (it read: "every online CPU is
        # leased; release a lease first" with nothing leased: topology hunt)
        raise HostError(f"{base}/online lists none of the present CPUs {present}: not the "
                        "sysfs of a running host (give --root a complete dump)")

    raw = {c: _read_raw(base / f"cpu{c}") for c in present}
    # Masks count the online CPUs with a topology directory (what hwloc sees) and offline
    # CPUs, which older kernels keep in their siblings' masks.  An online CPU without
    # topology files is nobody's sibling: its place is unknown.
    known = CpuSet.of(c for c in online if raw[c].has_topology)
    eligible = known | (present - online)

    def same_core(a: int, b: int) -> bool:
        """Threads of one core agree on (package, die, core_id) where both report it."""
        ra, rb = raw[a], raw[b]
        return all(x is None or y is None or x == y for x, y in
                   ((ra.package, rb.package), (ra.die, rb.die), (ra.core, rb.core)))

    siblings: dict[int, CpuSet] = {}
    for c in present:
        mask = raw[c].thread_mask
        pool = (mask & eligible) | CpuSet.of([c]) if mask is not None else CpuSet.of([c])
        siblings[c] = CpuSet.of(s for s in pool if s == c or same_core(s, c))
    # Make the relation symmetric: an offline CPU without files of its own belongs to the
    # core whose mask names it, and a stale mask of an offline CPU joins it to its core.
    for c in present:
        for s in siblings[c]:
            if s != c and c not in siblings[s]:
                siblings[s] = siblings[s] | CpuSet.of([c])

    packages: dict[int, CpuSet] = {}
    seen: dict[CpuSet, CpuSet] = {}  # package masks repeat: intersect each one once
    joining: list[tuple[int, CpuSet]] = []
    for c in present:
        mask = raw[c].package_mask
        if mask is None:
            packages[c] = CpuSet.of([c])
            continue
        members = seen.get(mask)
        if members is None:
            members = seen[mask] = mask & known
        if c in members or not members:
            packages[c] = members or CpuSet.of([c])
        else:
            joining.append((c, members))
    # Like the siblings: a CPU its package's masks do not name (offline, its own mask
    # stale) joins that package, and every CPU of it counts it.  One package made of two
    # sets had two keys: 'host' counted 9 packages of 8 and drew one twice (topology hunt).
    for c, members in joining:
        whole = packages.get(members.first(), members) | CpuSet.of([c])
        for s in whole:
            packages[s] = whole

    nodes, node_of = _read_nodes(root, present)

    kinds: dict[int, str] = {}
    for dirname, kind in HYBRID_KINDS:
        for c in _cpus_file(root / "sys/devices" / dirname / "cpus") or EMPTY:
            kinds.setdefault(c, kind)

    cmdline = _read(root / "proc/cmdline")
    isolated = _cpus_file(base / "isolated")
    nohz_full = _cpus_file(base / "nohz_full")
    if (isolated is None or nohz_full is None) and cmdline is not None:
        booted = cmdline_isolation(cmdline, max(present))
        isolated = booted[0] if isolated is None else isolated
        nohz_full = booted[1] if nohz_full is None else nohz_full
    isolated = isolated or EMPTY
    nohz_full = nohz_full or EMPTY

    cpus = {
        c: Cpu(
            id=c,
            online=c in online,
            package=raw[c].package,
            die=raw[c].die,
            cluster=raw[c].cluster,
            core=raw[c].core,
            siblings=siblings[c],
            node=node_of[c],
            kind=kinds.get(c),
            package_cpus=packages[c],
        )
        for c in present
    }
    return Topology(cpus=cpus, present=present, online=online, isolated=isolated & present,
                    nohz_full=nohz_full & present, nodes=nodes)


def _read_nodes(root: Path, present: CpuSet) -> tuple[dict[int, CpuSet], dict[int, int]]:
    """Node -> CPUs, and CPU -> node for every present CPU."""
    base = root / NODE_DIR
    if not base.is_dir():
        return {0: present}, {c: 0 for c in present}
    listed = _cpus_file(base / "online")
    ids = sorted(set(_numbered(base, _NODE_ENTRY)) & (set(listed) if listed else set(
        _numbered(base, _NODE_ENTRY))))
    nodes: dict[int, CpuSet] = {}
    owner: dict[int, int] = {}
    for n in ids:
        cpus = _first_cpus(base / f"node{n}", "cpulist", "cpumap")
        if cpus is None:
            continue
        cpus = cpus & present
        # Overlapping nodes are a firmware bug; like hwloc, the first node keeps the CPU.
        cpus = CpuSet.of(c for c in cpus if c not in owner)
        nodes[n] = cpus
        for c in cpus:
            owner[c] = n
    if not nodes:
        return {0: present}, {c: 0 for c in present}
    fallback = min(nodes)
    node_of: dict[int, int] = {}
    for c in present:
        if c in owner:
            node_of[c] = owner[c]
        else:  # its node is offline: the kernel still links cpuN/nodeM to it
            linked = _numbered(root / CPU_DIR / f"cpu{c}", _NODE_ENTRY)
            node_of[c] = linked[0] if linked else fallback
    return nodes, node_of


# -- snapshots (pure) -----------------------------------------------------------------------

#: Layout of :func:`encode_topology`'s data; a snapshot of another version is not used.
SNAPSHOT_VERSION = 1


def encode_topology(topology: Topology) -> dict[str, Any]:
    """``topology`` as JSON data: every distinct CPU set once (``sets``, lists of CPUs),
    referred to by index; one row per CPU, in the order of ``topology.cpus``."""
    index: dict[frozenset[int], int] = {}

    def ref(cpus: CpuSet) -> int:
        found = index.get(cpus.cpus)
        if found is None:
            found = index[cpus.cpus] = len(index)
        return found

    rows = [[key, c.id, c.online, c.package, c.die, c.cluster, c.core, ref(c.siblings),
             c.node, c.kind, ref(c.package_cpus)] for key, c in topology.cpus.items()]
    return {
        "version": SNAPSHOT_VERSION,
        "present": ref(topology.present),
        "online": ref(topology.online),
        "isolated": ref(topology.isolated),
        "nohz_full": ref(topology.nohz_full),
        "nodes": [[node, ref(cpus)] for node, cpus in topology.nodes.items()],
        "cpus": rows,
        "sets": [sorted(cpus) for cpus in index],
    }


def decode_topology(data: Mapping[str, Any]) -> Topology:
    """The ``Topology`` :func:`encode_topology` gave ``data`` for; ``ValueError`` when
    ``data`` is not such a snapshot (another version, a wrong shape, a CPU out of range)."""
    try:
        if data["version"] != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {data['version']!r}")
        sets: list[CpuSet] = []
        for members in data["sets"]:
            cpus = frozenset(members)
            if cpus and not (all(type(c) is int for c in cpus)
                             and min(cpus) >= 0 and max(cpus) <= MAX_CPU):
                raise ValueError("a CPU set holds something else than CPU numbers")
            sets.append(CpuSet(cpus) if cpus else EMPTY)
        ints = (int, type(None))
        table: dict[int, Cpu] = {}
        referenced: set[int] = set()  # the sets CPU rows use (each checked once below)
        for key, ident, online, package, die, cluster, core, siblings, node, kind, \
                package_cpus in data["cpus"]:
            if not (type(key) is int and type(ident) is int and type(node) is int
                    and type(online) is bool and type(package) in ints
                    and type(die) in ints and type(cluster) in ints and type(core) in ints
                    and (kind is None or type(kind) is str)
                    and type(siblings) is int and type(package_cpus) is int
                    and siblings >= 0 and package_cpus >= 0):
                raise ValueError(f"bad CPU row for {key!r}")
            table[key] = Cpu(ident, online, package, die, cluster, core, sets[siblings], node,
                             kind, sets[package_cpus])
            if key != ident:
                raise ValueError(f"CPU row {key} says it is CPU {ident}")
            referenced.update((siblings, package_cpus))

        def cpuset(ref: Any) -> CpuSet:
            if type(ref) is not int or ref < 0:
                raise ValueError(f"bad CPU set reference {ref!r}")
            return sets[ref]

        nodes: dict[int, CpuSet] = {}
        for node, ref in data["nodes"]:
            if type(node) is not int:
                raise ValueError(f"bad node {node!r}")
            nodes[node] = cpuset(ref)
        topology = Topology(cpus=table, present=cpuset(data["present"]),
                            online=cpuset(data["online"]), isolated=cpuset(data["isolated"]),
                            nohz_full=cpuset(data["nohz_full"]), nodes=nodes)
        # what the rest looks up by CPU number must be there (read_topology: every present
        # CPU is a row, online ones among them, and so are their siblings)
        known = CpuSet.of(table)
        if not (topology.online <= topology.present <= known
                and all(sets[ref] <= known for ref in referenced)):
            raise ValueError("the CPU lists name CPUs the snapshot has no row for")
        return topology
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"not a topology snapshot: {exc!r}") from None
