"""Test helper: synthetic host roots (sysfs, procfs and cgroupfs files) in a directory.

Numbering follows x86 Linux: with ``threads`` per core and ``n = cpus // threads`` cores,
thread ``t`` of core ``k`` is CPU ``t * n + k`` (so CPU 0 and CPU n are siblings).
Cores are spread evenly over packages, packages over NUMA nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pinwarden.cpuset import CpuSet


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass(frozen=True)
class HostSpec:
    cpus: int
    threads: int = 1
    packages: int = 1
    nodes: int = 1
    isolated: str = ""
    nohz_full: str = ""
    cmdline: str = "BOOT_IMAGE=/boot/vmlinuz root=/dev/vda ro quiet"


def layout(spec: HostSpec) -> dict[int, tuple[int, int, int]]:
    """CPU -> (package, core_id, node)."""
    ncores = spec.cpus // spec.threads
    per_package = ncores // spec.packages
    out = {}
    for t in range(spec.threads):
        for k in range(ncores):
            package = k // per_package
            node = k * spec.nodes // ncores
            out[t * ncores + k] = (package, k % per_package, node)
    return out


def build_host(root: Path, spec: HostSpec) -> Path:
    """Write sys/devices/system/{cpu,node} and proc/cmdline for ``spec`` below ``root``."""
    cpus = layout(spec)
    every = CpuSet.range(0, spec.cpus - 1)
    base = "sys/devices/system/cpu"
    for name in ("online", "present", "possible"):
        write(root, f"{base}/{name}", f"{every}\n")
    write(root, f"{base}/offline", "\n")
    write(root, f"{base}/isolated", f"{spec.isolated}\n")
    write(root, f"{base}/nohz_full", f"{spec.nohz_full}\n")
    for cpu, (package, core, _node) in cpus.items():
        siblings = CpuSet.of(c for c, v in cpus.items() if v[:2] == (package, core))
        pkg = CpuSet.of(c for c, v in cpus.items() if v[0] == package)
        words = (spec.cpus + 31) // 32
        files = {
            "physical_package_id": str(package), "die_id": "0", "core_id": str(core),
            "cluster_id": str(core),
            "thread_siblings_list": str(siblings), "core_cpus_list": str(siblings),
            "thread_siblings": siblings.to_mask(words), "core_cpus": siblings.to_mask(words),
            "core_siblings_list": str(pkg), "package_cpus_list": str(pkg),
            "core_siblings": pkg.to_mask(words), "package_cpus": pkg.to_mask(words),
            "die_cpus_list": str(pkg),
        }
        for name, text in files.items():
            write(root, f"{base}/cpu{cpu}/topology/{name}", text + "\n")
        if cpu:
            write(root, f"{base}/cpu{cpu}/online", "1\n")
    nodes = sorted({v[2] for v in cpus.values()})
    write(root, "sys/devices/system/node/online", f"{CpuSet.of(nodes)}\n")
    write(root, "sys/devices/system/node/possible", f"{CpuSet.of(nodes)}\n")
    for node in nodes:
        members = CpuSet.of(c for c, v in cpus.items() if v[2] == node)
        write(root, f"sys/devices/system/node/node{node}/cpulist", f"{members}\n")
        write(root, f"sys/devices/system/node/node{node}/cpumap", f"{members.to_mask()}\n")
    write(root, "proc/cmdline", spec.cmdline + "\n")
    return root


# -- cgroups ----------------------------------------------------------------------------

V1_HIERARCHIES = ("cpuset", "cpu,cpuacct", "memory", "devices", "freezer", "pids")


def mount_cgroups(root: Path, *, v1: bool = True, v2_controllers: str | None = None,
                  v2_at: str = "sys/fs/cgroup/unified", cpus: str = "",
                  mems: str = "0") -> None:
    """Write proc/self/mountinfo for a v1 (and/or v2) layout and the root cgroup files.

    With ``v1`` the hierarchies of :data:`V1_HIERARCHIES` plus ``name=systemd`` live under
    sys/fs/cgroup/; ``v2_controllers`` (a cgroup.controllers text) adds a cgroup2 mount at
    ``v2_at``.  ``cpus`` fills the root cpuset (v1 ``cpuset.cpus``/``effective_cpus``, v2
    ``cpuset.cpus.effective``).
    """
    lines = ["22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
             "25 1 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw",
             "30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs "
             "ro,mode=755"]
    mount_id = 40
    if v1:
        for name in (*V1_HIERARCHIES, "systemd"):
            opts = "xattr,name=systemd" if name == "systemd" else name
            lines.append(f"{mount_id} 30 0:{mount_id} / /sys/fs/cgroup/{name} "
                         f"rw,nosuid,nodev,noexec,relatime shared:{mount_id} - cgroup "
                         f"cgroup rw,{opts}")
            (root / "sys/fs/cgroup" / name).mkdir(parents=True, exist_ok=True)
            mount_id += 1
        cs = "sys/fs/cgroup/cpuset"
        for name, text in (("cpuset.cpus", cpus), ("cpuset.effective_cpus", cpus),
                           ("cpuset.mems", mems), ("cpuset.effective_mems", mems),
                           ("cpuset.cpu_exclusive", "1")):
            write(root, f"{cs}/{name}", text + "\n")
    if v2_controllers is not None:
        lines.append(f"{mount_id} 30 0:{mount_id} / /{v2_at} rw,nosuid,nodev,noexec,relatime "
                     f"shared:{mount_id} - cgroup2 cgroup2 rw,nsdelegate")
        write(root, f"{v2_at}/cgroup.controllers", v2_controllers + "\n")
        if "cpuset" in v2_controllers.split():
            write(root, f"{v2_at}/cpuset.cpus.effective", cpus + "\n")
            write(root, f"{v2_at}/cpuset.mems.effective", mems + "\n")
    write(root, "proc/self/mountinfo", "\n".join(lines) + "\n")


def make_cgroup(root: Path, mount: str, name: str, cpus: str, *, effective: str | None = None,
                v2: bool = False) -> Path:
    """A child cgroup ``name`` below the mount point ``mount`` (relative to ``root``)."""
    directory = root / mount / name
    directory.mkdir(parents=True, exist_ok=True)
    eff = cpus if effective is None else effective
    if v2:
        write(root, f"{mount}/{name}/cpuset.cpus", cpus + "\n")
        write(root, f"{mount}/{name}/cpuset.cpus.effective", eff + "\n")
    else:
        write(root, f"{mount}/{name}/cpuset.cpus", cpus + "\n")
        write(root, f"{mount}/{name}/cpuset.effective_cpus", eff + "\n")
    return directory
