"""Benchmark hosts: synthetic topologies and the hwloc sysfs dumps in shared/testdata."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from pinwarden.cpuset import CpuSet
from pinwarden.topology import Cpu, Topology, read_topology


@dataclass(frozen=True)
class Host:
    name: str
    topology: Topology
    pool: CpuSet  # the CPUs VMs may get (online minus the housekeeping core)

    @property
    def threads_per_core(self) -> int:
        return max((len(core) for core in self.topology.cores()), default=1)


def synthetic(sockets: int, nodes_per_socket: int, cores_per_node: int,
              threads: int) -> Topology:
    """A symmetric host numbered as Linux numbers most x86 servers: the first thread of
    every core (socket by socket, node by node), then every second thread, and so on."""
    ncores = sockets * nodes_per_socket * cores_per_node
    cpus: dict[int, Cpu] = {}
    nodes: dict[int, set[int]] = {}
    for core in range(ncores):
        ids = [core + t * ncores for t in range(threads)]
        node = core // cores_per_node
        for cpu in ids:
            cpus[cpu] = Cpu(id=cpu, online=True, package=node // nodes_per_socket, die=0,
                            cluster=None, core=core % cores_per_node,
                            siblings=CpuSet.of(ids), node=node)
            nodes.setdefault(node, set()).add(cpu)
    everything = CpuSet.of(cpus)
    return Topology(cpus=cpus, present=everything, online=everything, isolated=CpuSet(),
                    nohz_full=CpuSet(), nodes={n: CpuSet.of(c) for n, c in nodes.items()})


def housekeeping_pool(topology: Topology) -> CpuSet:
    """Online CPUs minus the first core (all its threads), kept for the host, on hosts with
    eight CPUs or more; every online CPU on smaller ones."""
    online = topology.online
    if len(online) < 8:
        return online
    return online - (topology.siblings(online.first()) & online)


def make_host(name: str, topology: Topology) -> Host:
    return Host(name, topology, housekeeping_pool(topology))


def hwloc_host(dump: Path, cache: Path) -> Host:
    """Extract the CPU part of ``dump`` (``NAME.tar.bz2``, read-only) under ``cache`` once
    and read it."""
    name = dump.name.removesuffix(".tar.bz2")
    target = cache / name
    marker = target / ".top"
    if not marker.is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dump) as tar:
            top = tar.getnames()[0].split("/")[0]  # not always the archive's name
            wanted = [m for m in tar.getmembers()
                      if "/sys/devices/system/" in m.name or "/proc/" in m.name
                      or "/sys/devices/cpu_" in m.name]
            tar.extractall(target, members=wanted, filter="data")
        marker.write_text(top)
    return make_host(name, read_topology(target / marker.read_text()))


SYNTHETIC: dict[str, tuple[int, int, int, int]] = {
    # name: (sockets, NUMA nodes per socket, cores per node, threads per core)
    "syn-2s64c2t": (2, 1, 64, 2),  # 256 CPUs, 2 nodes
    "syn-2s4n8c2t": (2, 4, 8, 2),  # 128 CPUs, 8 nodes (sub-NUMA clustering)
    "syn-4s2n64c2t": (4, 2, 64, 2),  # 1,024 CPUs, 8 nodes
}


def synthetic_host(name: str) -> Host:
    return make_host(name, synthetic(*SYNTHETIC[name]))


def write_root(topology: Topology, root: Path, *, cmdline: str = "ro quiet") -> Path:
    """A sysfs root (``sys/devices/system/{cpu,node}``, ``proc/cmdline``) that
    :func:`~pinwarden.topology.read_topology` reads as ``topology``'s CPUs, cores, packages
    (by ``package`` id) and nodes: what the command-line benchmark runs ``pinwarden`` on."""
    def put(rel: str, text: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    base = "sys/devices/system/cpu"
    for name, cpus in (("online", topology.online), ("present", topology.present),
                       ("possible", topology.present), ("isolated", topology.isolated),
                       ("nohz_full", topology.nohz_full)):
        put(f"{base}/{name}", str(cpus))
    packages: dict[int | None, set[int]] = {}
    for cpu in topology.cpus.values():
        packages.setdefault(cpu.package, set()).add(cpu.id)
    for cpu in topology.cpus.values():
        package = CpuSet.of(packages[cpu.package])
        files = {"physical_package_id": cpu.package, "die_id": cpu.die, "core_id": cpu.core,
                 "core_cpus_list": cpu.siblings, "thread_siblings_list": cpu.siblings,
                 "package_cpus_list": package, "core_siblings_list": package}
        for name, value in files.items():
            if value is not None:
                put(f"{base}/cpu{cpu.id}/topology/{name}", str(value))
        if cpu.id:
            put(f"{base}/cpu{cpu.id}/online", "1" if cpu.online else "0")
    nodes = CpuSet.of(topology.nodes)
    put("sys/devices/system/node/online", str(nodes))
    put("sys/devices/system/node/possible", str(nodes))
    for node, cpus in topology.nodes.items():
        put(f"sys/devices/system/node/node{node}/cpulist", str(cpus))
    put("proc/cmdline", cmdline)
    return root
