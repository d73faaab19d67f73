"""read_topology against hwloc's own answers (every dump in tests/data/hwloc) and
against synthetic roots with the quirks real kernels and dumps show."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HWLOC, HWLOC_DUMPS
from hostroot import HostSpec, build_host, layout, write
from pinwarden.cpuset import CpuSet
from pinwarden.errors import HostError
from pinwarden.topology import Topology, parse_cpus, read_topology

DUMPS = HWLOC_DUMPS


# -- hwloc's `lstopo -v` output ---------------------------------------------------------


@dataclass
class Obj:
    """One object line of a .console tree."""

    type: str  # "Package", "Core", "PU", "NUMANode", "MemCache", "Group0(Book)", ...
    pnum: int | None  # P#, None when hwloc prints none (unknown os index)
    parent: Obj | None
    children: list[Obj] = field(default_factory=list)

    def walk(self) -> Iterator[Obj]:
        yield self
        for child in self.children:
            yield from child.walk()

    def pus(self) -> CpuSet:
        return CpuSet.of(o.pnum for o in self.walk() if o.type == "PU" and o.pnum is not None)

    def ancestors(self) -> Iterator[Obj]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent


_LINE = re.compile(r"(?P<indent> *)(?P<type>\S+)(?: L#\d+)?(?: \(P#(?P<pnum>\d+))?")


def parse_console(text: str) -> Obj:
    """The object tree of a ``lstopo -v`` output: from ``Machine`` to the first line that
    is not indented (the ``depth N:`` summary).  Every line is an object (I/O objects too,
    so nothing is re-parented); nesting is by indentation."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Machine"))
    root: Obj | None = None
    stack: list[tuple[int, Obj]] = []
    for line in lines[start:]:
        if root is not None and not line.startswith(" "):
            break
        m = _LINE.match(line)
        assert m is not None, line
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else None
        pnum = m.group("pnum")
        obj = Obj(m.group("type"), int(pnum) if pnum else None, parent)
        if parent is not None:
            parent.children.append(obj)
        else:
            root = obj
        stack.append((indent, obj))
    assert root is not None and root.type == "Machine"
    return root


def test_parse_console() -> None:
    tree = parse_console("""Machine (P#0 total=2GiB)
  Package L#0 (P#3 CPUModel="X (R)")
    NUMANode L#0 (P#0 local=1GiB)
    Core L#0 (P#0)
      PU L#0 (P#0)
      PU L#1 (P#2)
  Package L#1
    MemCache L#0 (size=1GiB)
      NUMANode L#1 (P#1)
    Core L#1 (P#0)
      PU L#2 (P#1)
  HostBridge L#0 (buses=0000:[00-01])
    PCI 00:02.0 (VGA)
depth 0:           1 Machine (type #0)
""")
    expected, nodes = expected_from(tree)
    assert nodes == {0: CpuSet.parse("0,2"), 1: CpuSet.of([1])}
    assert expected[2] == Expected(3, CpuSet.parse("0,2"), CpuSet.parse("0,2"), frozenset({0}))
    assert expected[1] == Expected(None, CpuSet.of([1]), CpuSet.of([1]), frozenset({1}))


@dataclass(frozen=True)
class Expected:
    """What hwloc shows for one PU."""

    package: int | None  # P# of the Package ancestor (None: no P# printed)
    package_cpus: CpuSet | None  # PUs of that Package (None: no Package ancestor)
    core: CpuSet  # PUs of the Core ancestor, or the PU alone when hwloc shows no Core
    nodes: frozenset[int]  # NUMA nodes attached to the PU's ancestors (its local nodes)


def expected_from(tree: Obj) -> tuple[dict[int, Expected], dict[int, CpuSet]]:
    """Per-PU expectations, and node P# -> PUs of the object the node is attached to."""
    node_cpus: dict[int, CpuSet] = {}
    for obj in tree.walk():
        if obj.type.startswith("NUMANode") and obj.pnum is not None:  # also NUMANode(NVM)
            holder = next(a for a in obj.ancestors() if a.type != "MemCache")
            node_cpus[obj.pnum] = holder.pus()
    out: dict[int, Expected] = {}
    for pu in tree.walk():
        if pu.type != "PU" or pu.pnum is None:
            continue
        ancestors = list(pu.ancestors())
        package = next((a for a in ancestors if a.type == "Package"), None)
        core = next((a for a in ancestors if a.type == "Core"), None)
        nodes = frozenset(n for n, cpus in node_cpus.items() if pu.pnum in cpus)
        out[pu.pnum] = Expected(
            package=package.pnum if package else None,
            package_cpus=package.pus() if package else None,
            core=core.pus() if core else CpuSet.of([pu.pnum]),
            nodes=nodes,
        )
    return out, node_cpus


# -- what hwloc was allowed to see (its process cpuset), read like hwloc does ----------


def _cpuset_mount(root: Path) -> tuple[str, Path] | None:
    if (root / "sys/fs/cgroup/cpuset.cpus.effective").exists():
        return "v2", root / "sys/fs/cgroup"
    if (root / "sys/fs/cgroup/cpuset/cpuset.cpus").exists():
        return "v1", root / "sys/fs/cgroup/cpuset"
    if (root / "dev/cpuset/cpus").exists():
        return "cpuset", root / "dev/cpuset"
    mounts = root / "proc/mounts"
    if not mounts.exists():
        return None
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, opts = root / fields[1].lstrip("/"), fields[2], fields[3].split(",")
        if fstype == "cpuset" or (fstype == "cgroup" and "cpuset" in opts
                                  and "noprefix" in opts):
            return "cpuset", where
        if fstype == "cgroup" and "cpuset" in opts:
            return "v1", where
        controllers = where / "cgroup.controllers"
        if fstype == "cgroup2" and controllers.exists() \
                and "cpuset" in controllers.read_text().split():
            return "v2", where
    return None


def _cpuset_name(root: Path) -> str | None:
    own = root / "proc/self/cpuset"
    if own.exists():
        return own.read_text().strip()
    cgroup = root / "proc/self/cgroup"
    if cgroup.exists():
        for line in cgroup.read_text().splitlines():
            _, _, rest = line.partition(":")
            if rest.startswith("cpuset:"):
                return rest[len("cpuset:"):]
            if rest.startswith(":"):
                return rest[1:]
    return None


def allowed(root: Path, what: str) -> CpuSet | None:
    """The dump process's allowed ``cpus`` or ``mems``; None means unrestricted."""
    mount, name = _cpuset_mount(root), _cpuset_name(root)
    if mount is None or name is None:
        return None
    kind, where = mount
    file = {"v2": f"cpuset.{what}.effective", "v1": f"cpuset.{what}", "cpuset": what}[kind]
    path = where / name.lstrip("/") / file
    return CpuSet.parse_kernel(path.read_text()) if path.exists() else None


# -- fixtures ---------------------------------------------------------------------------


def test_dumps_are_there() -> None:
    assert len(DUMPS) >= 10, f"hwloc dumps missing in {HWLOC}"


@pytest.mark.parametrize("name", DUMPS)
def test_agrees_with_hwloc(name: str, hwloc_roots: dict[str, Path]) -> None:
    root = hwloc_roots[name]
    topo = read_topology(root)
    expected, node_cpus = expected_from(parse_console((HWLOC / f"{name}.console").read_text()))
    shown = CpuSet.of(expected)
    allowed_cpus, allowed_mems = allowed(root, "cpus"), allowed(root, "mems")

    # hwloc shows the online CPUs with topology information that its cpuset allows.
    visible = topo.online
    if allowed_cpus is not None:
        visible = visible & allowed_cpus
    no_topology = CpuSet.of(c for c in visible
                            if not (root / f"sys/devices/system/cpu/cpu{c}/topology").is_dir())
    assert shown == visible - no_topology or shown == visible, (shown, visible)

    for cpu, exp in expected.items():
        info = topo.cpu(cpu)
        assert info.online, cpu
        # hwloc drops a package whose masks contradict each other (40intel64: cpu3's
        # core_siblings mask says 0-3, its list and every sibling say 3,7,...): there is
        # nothing to compare then; the kernel's lists are the better answer.
        if exp.package_cpus is not None:
            assert info.package == exp.package, f"CPU {cpu}: package {info.package}, " \
                                                f"hwloc {exp.package}"
            assert info.package_cpus & shown == exp.package_cpus, cpu
        assert info.siblings & shown == exp.core, \
            f"CPU {cpu}: siblings {info.siblings & shown}, hwloc core {exp.core}"
        # The CPU's own node is among the nodes hwloc shows local to it, unless hwloc hides
        # that node (its cpuset's mems exclude it; then other, memory-only nodes may be
        # shown there) or the kernel lists the CPU in no node (its node is offline).
        if topo.node_known(cpu) and (allowed_mems is None or info.node in allowed_mems):
            assert info.node in exp.nodes, f"CPU {cpu}: node {info.node}, hwloc {exp.nodes}"
        else:
            assert not topo.node_known(cpu) or info.node not in node_cpus, cpu
    # every node hwloc shows with CPUs holds exactly the CPUs it is attached to
    for node, cpus in node_cpus.items():
        ours = topo.nodes.get(node)
        assert ours is not None, f"node {node} missing"
        if ours & shown:
            assert ours & shown == cpus, f"node {node}: {ours & shown}, hwloc {cpus}"
    # siblings and packages are consistent relations over all present CPUs
    for cpu, info in topo.cpus.items():
        assert cpu in info.siblings and cpu in info.package_cpus
        for s in info.siblings & topo.online:
            assert topo.cpu(s).siblings & topo.online == info.siblings & topo.online
        # (16amd64-8n2c-cpusets: offline CPU 4's stale mask names CPU 5 only, and CPU 4
        # had package 4-5 but CPU 5 package 5: 'host' counted 9 packages of 8)
        for s in info.package_cpus:
            assert topo.cpu(s).package_cpus == info.package_cpus, (cpu, s)


def test_process_cpuset_hides_nothing(hwloc_roots: dict[str, Path]) -> None:
    """hwloc shows what its own process may use (the dump's /dummy cpuset: CPUs 0-6,12-15,
    mems 1-4); pinwarden partitions the whole host, so every online CPU and node is there."""
    root = hwloc_roots["16amd64-8n2c-cpusets"]
    assert allowed(root, "cpus") == CpuSet.parse("0-6,12-15")
    assert allowed(root, "mems") == CpuSet.parse("1-4")
    topo = read_topology(root)
    online = CpuSet.parse_kernel((root / "sys/devices/system/cpu/online").read_text())
    assert topo.online == online and len(online) == 15  # CPU 4 is offline in the dump
    assert sorted(topo.nodes) == list(range(8))
    assert topo.node_of(12) == 6 and topo.node_known(12)  # a node hwloc hides there


def test_hybrid_kinds(hwloc_roots: dict[str, Path], tmp_path: Path) -> None:
    """Hybrid kinds come from sys/devices/cpu_core|cpu_atom/cpus (absent in the dump)."""
    build_host(tmp_path, HostSpec(cpus=6, threads=1))
    write(tmp_path, "sys/devices/cpu_core/cpus", "0-3\n")
    write(tmp_path, "sys/devices/cpu_atom/cpus", "4-5\n")
    topo = read_topology(tmp_path)
    assert [topo.cpu(c).kind for c in range(6)] == ["intel_core"] * 4 + ["intel_atom"] * 2
    plain = read_topology(hwloc_roots["16em64t-4s2c2t"])
    assert all(c.kind is None for c in plain.cpus.values())


# -- synthetic roots ----------------------------------------------------------------------


def test_synthetic_smt_host(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=16, threads=2, packages=2, nodes=2))
    topo = read_topology(tmp_path)
    assert topo.present == CpuSet.range(0, 15) == topo.online
    assert topo.siblings(0) == CpuSet.parse("0,8")
    assert topo.siblings(13) == CpuSet.parse("5,13")
    assert topo.cpu(4).package == 1 and topo.cpu(4).package_cpus == CpuSet.parse("4-7,12-15")
    assert topo.nodes == {0: CpuSet.parse("0-3,8-11"), 1: CpuSet.parse("4-7,12-15")}
    assert topo.node_of(12) == 1 and topo.smt
    assert len(topo.cores()) == 8


def test_nul_bytes_and_masks_where_lists_expected(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4, threads=2))
    write(tmp_path, "sys/devices/system/cpu/online", "0-3\n\x00")
    write(tmp_path, "sys/devices/system/cpu/isolated", "0000000c\n")  # a mask
    write(tmp_path, "sys/devices/system/cpu/nohz_full", "(null)\n\x00")
    write(tmp_path, "sys/devices/system/cpu/cpu1/topology/core_cpus_list", "0000000a\x00\n")
    write(tmp_path, "sys/devices/system/node/node0/cpulist", "0000000f\n")
    topo = read_topology(tmp_path)
    assert topo.online == CpuSet.range(0, 3)
    assert topo.isolated == CpuSet.parse("2-3")
    assert topo.nohz_full == CpuSet()
    assert topo.siblings(1) == CpuSet.parse("1,3")
    assert topo.nodes[0] == CpuSet.range(0, 3)


def test_missing_files(tmp_path: Path) -> None:
    """Only cpuN directories: every CPU online, its own core, one node 0."""
    for c in range(3):
        (tmp_path / f"sys/devices/system/cpu/cpu{c}").mkdir(parents=True)
    topo = read_topology(tmp_path)
    assert topo.online == CpuSet.range(0, 2)
    assert topo.siblings(2) == CpuSet.of([2])
    assert topo.cpu(1).package is None and topo.cpu(1).core is None
    assert topo.nodes == {0: CpuSet.range(0, 2)} and topo.node_of(2) == 0
    assert topo.isolated == CpuSet() and topo.nohz_full == CpuSet()


def test_offline_cpu_without_topology(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, threads=2))
    write(tmp_path, "sys/devices/system/cpu/online", "0-4,6-7\n")
    write(tmp_path, "sys/devices/system/cpu/offline", "5\n")
    write(tmp_path, "sys/devices/system/cpu/cpu5/online", "0\n")
    for f in (tmp_path / "sys/devices/system/cpu/cpu5/topology").iterdir():
        f.unlink()
    (tmp_path / "sys/devices/system/cpu/cpu5/topology").rmdir()
    # the kernel drops offline CPUs from their siblings' masks
    write(tmp_path, "sys/devices/system/cpu/cpu1/topology/thread_siblings_list", "1\n")
    write(tmp_path, "sys/devices/system/cpu/cpu1/topology/core_cpus_list", "1\n")
    topo = read_topology(tmp_path)
    assert 5 in topo.present and 5 not in topo.online
    info = topo.cpu(5)
    assert not info.online and info.package is None and info.siblings == CpuSet.of([5])
    assert topo.siblings(1) == CpuSet.of([1])
    assert CpuSet.of([1]) in topo.cores()


def test_offline_cpu_kept_in_sibling_mask(tmp_path: Path) -> None:
    """Older kernels keep an offline thread in its online sibling's mask: still its core."""
    build_host(tmp_path, HostSpec(cpus=8, threads=2))
    write(tmp_path, "sys/devices/system/cpu/online", "0-4,6-7\n")
    write(tmp_path, "sys/devices/system/cpu/cpu5/online", "0\n")
    for f in (tmp_path / "sys/devices/system/cpu/cpu5/topology").iterdir():
        f.unlink()
    topo = read_topology(tmp_path)
    assert topo.siblings(1) == CpuSet.parse("1,5") == topo.siblings(5)
    assert CpuSet.of([1]) in topo.cores() and CpuSet.parse("1,5") not in topo.cores()


def test_an_online_list_naming_no_cpu_is_a_host_error(tmp_path: Path) -> None:
    """A running kernel has an online CPU: an empty list read as a host whose every CPU
    was leased ("release a lease first", with nothing leased: topology hunt)."""
    build_host(tmp_path, HostSpec(cpus=4, threads=1))
    write(tmp_path, "sys/devices/system/cpu/online", "\n")
    with pytest.raises(HostError, match="online lists none of the present CPUs 0-3"):
        read_topology(tmp_path)


def test_per_cpu_online_files_without_online_list(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4, threads=1))
    (tmp_path / "sys/devices/system/cpu/online").unlink()
    write(tmp_path, "sys/devices/system/cpu/cpu2/online", "0\n")
    topo = read_topology(tmp_path)
    assert topo.online == CpuSet.parse("0-1,3")


def test_siblings_split_by_core_id(tmp_path: Path) -> None:
    """AMD compute units: thread_siblings lists two cores with their own core_id."""
    build_host(tmp_path, HostSpec(cpus=4, threads=1))
    for c in range(4):
        pair = "0-1" if c < 2 else "2-3"
        write(tmp_path, f"sys/devices/system/cpu/cpu{c}/topology/core_cpus_list", pair)
        write(tmp_path, f"sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list", pair)
    topo = read_topology(tmp_path)
    assert [topo.siblings(c) for c in range(4)] == [CpuSet.of([c]) for c in range(4)]


def test_isolated_from_cmdline_when_sysfs_lacks_it(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, threads=1))
    (tmp_path / "sys/devices/system/cpu/isolated").unlink()
    (tmp_path / "sys/devices/system/cpu/nohz_full").unlink()
    write(tmp_path, "proc/cmdline",
          "BOOT_IMAGE=/vmlinuz ro isolcpus=domain,managed_irq,2-3,6 nohz_full=2-3 quiet\n")
    topo = read_topology(tmp_path)
    assert topo.isolated == CpuSet.parse("2-3,6")
    assert topo.nohz_full == CpuSet.parse("2-3")


@pytest.mark.parametrize(("cmdline", "isolated", "nohz_full"), [
    # the kernel keeps the first list of a housekeeping type: a second is ignored whole
    ("isolcpus=domain,2-3 isolcpus=4-5", "2-3", ""),
    ("isolcpus=2-5 isolcpus=bogus", "2-5", ""),
    # flags without domain isolate no scheduler domain (the kernel's isolated is empty)
    ("isolcpus=nohz,managed_irq,2-7", "", "2-7"),
    ("isolcpus=nohz,2-3 isolcpus=4-5", "4-5", "2-3"),
    # the kernel's list syntax: strides, empty regions, quotes, N (nohz_full only)
    ("isolcpus=2-7:2/4", "2-3,6-7", ""),
    ("isolcpus=2-5,", "2-5", ""),
    ('isolcpus="2-5"', "2-5", ""),
    ("isolcpus=foo,2-3 nohz_full=3-N", "2-3", "3-7"),
    # lists the kernel rejects take no effect
    ("isolcpus=7-2 nohz_full=1-x", "", ""),
    ("isolcpus=2-7:4/2", "", ""),
])
def test_the_command_line_read_as_the_kernel_reads_it(cmdline: str, isolated: str,
                                                      nohz_full: str, tmp_path: Path) -> None:
    """Where sysfs lacks the kernel's own lists (dumps, test roots), the command line is
    read as the kernel reads it.  The last isolcpus= won, any word not starting with a
    digit was dropped as a flag, and a list with a stride or a trailing comma read as no
    isolcpus at all: other VM CPUs than the kernel's, silently (topology hunt)."""
    build_host(tmp_path, HostSpec(cpus=8, threads=1))
    (tmp_path / "sys/devices/system/cpu/isolated").unlink()
    (tmp_path / "sys/devices/system/cpu/nohz_full").unlink()
    write(tmp_path, "proc/cmdline", f"BOOT_IMAGE=/vmlinuz ro {cmdline} quiet\n")
    topo = read_topology(tmp_path)
    assert (topo.isolated, topo.nohz_full) == (CpuSet.parse_kernel(isolated),
                                               CpuSet.parse_kernel(nohz_full))


def test_sysfs_isolated_beats_cmdline(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, threads=1, isolated="4-7"))
    write(tmp_path, "proc/cmdline", "isolcpus=1\n")
    assert read_topology(tmp_path).isolated == CpuSet.parse("4-7")


def test_not_a_linux_root(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="not a Linux host root"):
        read_topology(tmp_path)
    with pytest.raises(HostError, match="not a Linux host root"):
        read_topology(tmp_path / "nonexistent")
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    with pytest.raises(HostError, match="lists no CPU"):
        read_topology(tmp_path)


def test_absurd_cpu_number_is_a_host_error(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=2))
    (tmp_path / "sys/devices/system/cpu/cpu99999").mkdir()
    with pytest.raises(HostError, match="cpu99999: CPU number exceeds"):
        read_topology(tmp_path)


def test_garbage_in_a_list_file_names_the_file(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=2, threads=1))
    write(tmp_path, "sys/devices/system/cpu/online", "0-1,zz\n")
    with pytest.raises(HostError, match=r"cpu/online: invalid CPU list") as err:
        read_topology(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "mask", "cpus"), [
    ("0-3,8", False, "0-3,8"), ("ff", True, "0-7"), ("00000000,00000101", False, "0,8"),
    ("3", True, "0-1"), ("3", False, "3"), ("", False, ""), ("(null)", False, ""),
    ("0-2\x00", True, "0-2"),
])
def test_parse_cpus_forms(text: str, mask: bool, cpus: str) -> None:
    assert parse_cpus(text, mask=mask).to_list() == cpus


def test_offline_node_from_cpu_link(hwloc_roots: dict[str, Path]) -> None:
    """offline-cpu0-node0: node 0 is offline (no node0 directory), cpu4 links to it."""
    topo = read_topology(hwloc_roots["offline-cpu0-node0"])
    assert sorted(topo.nodes) == [1]
    assert topo.node_of(4) == 0 and not topo.node_known(4)
    assert topo.node_of(5) == 1 and topo.node_known(5)


def test_real_machine() -> None:
    """This machine: the topology of / agrees with the kernel's own files, read here
    independently (per-CPU siblings lists, cpuN/nodeM links)."""
    topo: Topology = read_topology(Path("/"))
    base = Path("/sys/devices/system/cpu")
    online = CpuSet.parse_kernel((base / "online").read_text())
    assert topo.online == online
    for cpu in online:
        listed = CpuSet.parse_kernel((base / f"cpu{cpu}/topology/thread_siblings_list")
                                     .read_text())
        assert topo.siblings(cpu) & online == listed & online
        links = [int(p.name[4:]) for p in (base / f"cpu{cpu}").glob("node[0-9]*")]
        assert [topo.node_of(cpu)] == (links or [0])
    assert len(topo.online) == os.cpu_count()


@st.composite
def host_specs(draw: st.DrawFn) -> tuple[HostSpec, frozenset[int]]:
    threads = draw(st.sampled_from([1, 2, 4]))
    packages = draw(st.sampled_from([1, 2, 4]))
    cores_per_package = draw(st.integers(1, 4))
    ncores = packages * cores_per_package
    nodes = draw(st.sampled_from([n for n in (1, 2, 4) if ncores % n == 0]))
    cpus = ncores * threads
    offline = draw(st.frozensets(st.integers(1, cpus - 1), max_size=cpus - 1)) \
        if cpus > 1 else frozenset()
    return HostSpec(cpus=cpus, threads=threads, packages=packages, nodes=nodes), offline


@settings(deadline=None, max_examples=25,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=host_specs(), drop_files=st.booleans())
def test_random_layouts(tmp_path_factory: pytest.TempPathFactory,
                        case: tuple[HostSpec, frozenset[int]], drop_files: bool) -> None:
    """Random hosts with random offline CPUs (whose topology files a modern kernel removes
    and whose masks it drops from their siblings'): cores, packages and nodes come back."""
    spec, offline = case
    root = build_host(tmp_path_factory.mktemp("layout"), spec)
    cpus = layout(spec)
    online = CpuSet.of(c for c in cpus if c not in offline)
    base = root / "sys/devices/system/cpu"
    (base / "online").write_text(f"{online}\n")
    for c in offline:
        (base / f"cpu{c}/online").write_text("0\n")
        if drop_files:
            for f in (base / f"cpu{c}/topology").iterdir():
                f.unlink()
    for c in online:  # the kernel's masks name online CPUs only
        mates = CpuSet.of(t for t, v in cpus.items() if v[:2] == cpus[c][:2]) & online
        (base / f"cpu{c}/topology/core_cpus_list").write_text(f"{mates}\n")
        (base / f"cpu{c}/topology/thread_siblings_list").write_text(f"{mates}\n")
    topo = read_topology(root)
    assert topo.present == CpuSet.of(cpus) and topo.online == online
    for c in online:
        package, core, node = cpus[c]
        same_core = CpuSet.of(t for t, v in cpus.items() if v[:2] == (package, core))
        assert topo.siblings(c) & online == same_core & online
        assert topo.cpu(c).package_cpus & online == CpuSet.of(
            t for t, v in cpus.items() if v[0] == package) & online
        assert topo.node_of(c) == node
    cores = topo.cores()
    assert sorted(c for core in cores for c in core) == online.as_list()
    for c in offline:
        assert not topo.cpu(c).online and c in topo.siblings(c)
