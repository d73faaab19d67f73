"""Test helper: a /proc with a few threads and a cgroup-v1 cpuset hierarchy below a fake host
root (see hostroot.py for sysfs), and leases recorded in a real ledger.

The host: ``init`` (pid 1, a host task allowed everywhere), and a shared VM ``web``
(``qemu-7-web.libvirt-qemu`` below ``machine``) whose emulator thread (pid 700) and vCPU
thread (701) may run on ``intruder_on``.  IRQ 24 (``nvme0q1``) may run anywhere.
"""

from __future__ import annotations

from pathlib import Path

from pinwarden.cpuset import CpuSet
from pinwarden.ledger import Ledger
from pinwarden.model import HolderRef, Plan

WEB_CGROUP = "/machine/qemu-7-web.libvirt-qemu"


def _stat(pid: int, comm: str, ppid: int, flags: int) -> str:
    return (f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 "
            f"100 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")


def task(proc: Path, pid: int, tid: int, *, comm: str, ppid: int, cpus: str,
         cgroup: str) -> None:
    d = proc / str(pid) / "task" / str(tid)
    d.mkdir(parents=True)
    (d / "stat").write_text(_stat(tid, comm, ppid, 0x400000))
    (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{pid}\nCpus_allowed:\tff\n"
                              f"Cpus_allowed_list:\t{cpus}\nMems_allowed_list:\t0\n")
    (d / "cgroup").write_text(f"5:cpuset:{cgroup}\n")


def fake_proc(root: Path, *, intruder_on: str, all_cpus: str = "0-3") -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self/mountinfo").write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpuset rw,nosuid shared:9 - cgroup cgroup rw,cpuset\n")
    task(proc, 1, 1, comm="init", ppid=0, cpus=all_cpus, cgroup="/")
    task(proc, 700, 700, comm="qemu-system-x86", ppid=1, cpus=intruder_on,
         cgroup=f"{WEB_CGROUP}/emulator")
    task(proc, 700, 701, comm="CPU 0/KVM", ppid=1, cpus=intruder_on,
         cgroup=f"{WEB_CGROUP}/vcpu0")
    cpuset = root / "sys/fs/cgroup/cpuset"
    for path, cpus, tasks in (("", all_cpus, "1\n"), ("machine", all_cpus, ""),
                              (WEB_CGROUP, intruder_on, ""),
                              (f"{WEB_CGROUP}/emulator", intruder_on, "700\n"),
                              (f"{WEB_CGROUP}/vcpu0", intruder_on, "701\n")):
        d = cpuset / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpuset.cpus").write_text(cpus + "\n")
        (d / "cpuset.effective_cpus").write_text(cpus + "\n")
        (d / "tasks").write_text(tasks)
    irq = proc / "irq/24"
    (irq / "nvme0q1").mkdir(parents=True)
    (irq / "smp_affinity_list").write_text(all_cpus + "\n")
    return root


def reserve(state: Path, name: str, cpus: str, *, driver: str = "qemu") -> HolderRef:
    """Record an exclusive lease of ``cpus`` for a domain (or job) ``name``."""
    leased = CpuSet.parse(cpus)
    holder = HolderRef(driver, name, name)
    plan = Plan(name, None, True, {i: CpuSet.of([c]) for i, c in enumerate(leased)},
                leased, leases={c: f"vcpu{i}" for i, c in enumerate(leased)})
    with Ledger(state) as ledger:
        ledger.reserve(holder, lambda _leases: plan)
    return holder
