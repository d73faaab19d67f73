"""Audit: the pure core on constructed snapshots, the scanner on a /proc tree, and the whole
thing against real processes and a real cpuset cgroup."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinwarden import audit
from pinwarden.audit import CgroupInfo, HostSnapshot, IrqInfo, ThreadInfo
from pinwarden.cli.audit import render
from pinwarden.cpuset import CpuSet
from pinwarden.errors import HostError
from pinwarden.ledger import HolderRecord, Ledger
from pinwarden.model import HolderRef, Lease, Plan, domain_holder, job_holder
from pinwarden.record import replace

pytest.register_assert_rewrite("libvirt_env")

import libvirt_env as env  # noqa: E402

pytest_plugins = ["libvirt_env"]

A = domain_holder("qemu", "vm-a", "aaaaaaaa-0000-0000-0000-000000000001")
B = domain_holder("qemu", "web", "bbbbbbbb-0000-0000-0000-000000000002")
J = job_holder("job1")


def cs(text: str) -> CpuSet:
    return CpuSet.parse_kernel(text)


def leases(**cpus: HolderRef) -> list[Lease]:
    """leases(c3=A, c4=A) → CPU 3 and 4 leased to A."""
    return [Lease(int(k[1:]), h, "vcpu0", 0.0) for k, h in cpus.items()]


def record(ref: HolderRef, *, cgroup: str | None = None, owner: int | None = None,
           cpus: str = "") -> HolderRecord:
    lease_map = {c: "vcpu0" for c in cs(cpus)}
    plan = Plan(domain=ref.name, uuid=ref.key, exclusive=True, vcpus={0: cs(cpus or "0")},
                emulator=cs(cpus or "0"), leases=lease_map)
    return HolderRecord(ref=ref, created=0.0, owner_pid=owner, owner_start=None, plan=plan,
                        cgroup=cgroup)


def thread(pid: int, cpus: str, cgroup: str | None = "/", *, tid: int | None = None,
           ppid: int = 1, comm: str = "t", kernel: bool = False) -> ThreadInfo:
    return ThreadInfo(pid=pid, tid=tid or pid, comm=comm, ppid=ppid, cpus=cs(cpus),
                      cgroup=cgroup, kernel=kernel)


def kinds(report: audit.Report) -> list[tuple[str, int | None, str | None, str]]:
    return [(i.kind, i.tid, i.cgroup, str(i.cpus)) for i in report.intruders]


# -- the pure core -----------------------------------------------------------------------


def test_no_leases_is_clean() -> None:
    snap = HostSnapshot(threads=(thread(10, "0-7"),), cgroups=(CgroupInfo("/machine", cs("0-7"),
                        cs("0-7"), False),))
    report = audit.audit(snap, [], [])
    assert report.intruders == ()
    assert report.exit_status(strict=True) == 0
    assert report.verdict().startswith("clean: no CPU is leased")


def test_other_vm_thread_on_leased_cpu_is_an_error() -> None:
    vcpu = "/machine/qemu-2-web.libvirt-qemu/vcpu0"
    snap = HostSnapshot(threads=(
        thread(500, "2-3", vcpu, tid=501, comm="CPU 0/KVM"),
        thread(500, "0-1", "/machine/qemu-2-web.libvirt-qemu/emulator", comm="qemu-system-x86"),
    ))
    report = audit.audit(snap, leases(c3=A), [record(A, cgroup="pinwarden.partition/vm-a")])
    assert kinds(report) == [("other-vm-thread", 501, vcpu, "3")]
    bad = report.intruders[0]
    assert bad.pid == 500 and bad.name == "CPU 0/KVM" and bad.holders == (A,)
    assert bad.owner is None  # "web" holds no leases: not a holder
    assert report.exit_status() == 1
    assert report.verdict().startswith("INTRUDERS on the 1 leased CPU (3) of 1 holder")


def test_own_threads_are_not_intruders_but_another_holders_are() -> None:
    a_cg = "/pinwarden.partition/vm-a.partition/qemu-1-vm-a.libvirt-qemu/vcpu0"
    b_cg = "/pinwarden.partition/vm-web.partition/qemu-2-web.libvirt-qemu/vcpu1"
    snap = HostSnapshot(threads=(
        thread(100, "3", a_cg, tid=101),       # A on A's CPU: fine
        thread(100, "3-5", a_cg, tid=102),     # A allowed on B's CPU 5: intruder
        thread(200, "5", b_cg, tid=201),       # B on B's CPU: fine
    ))
    holders = [record(A, cgroup="pinwarden.partition/vm-a.partition", cpus="3-4"),
               record(B, cgroup="/pinwarden.partition/vm-web.partition/", cpus="5")]
    report = audit.audit(snap, leases(c3=A, c4=A, c5=B), holders)
    assert kinds(report) == [("other-vm-thread", 102, a_cg, "5")]
    assert report.intruders[0].owner == A
    assert report.intruders[0].holders == (B,)


def test_a_thread_written_alone_into_a_holders_cgroup_is_not_the_holders() -> None:
    """Another VM's vCPU thread written into the holder's ``tasks`` runs on the leased CPU;
    audit counted it the holder's for being in its cgroup (exit 0, hunt).  The holder's
    own threads, in the same cgroup or its siblings, stay its own."""
    a_cg = "/pinwarden.partition/vm-a.partition/qemu-1-vm-a.libvirt-qemu"
    web = "/machine/qemu-2-web.libvirt-qemu"
    snap = HostSnapshot(threads=(
        thread(100, "3", f"{a_cg}/emulator", comm="qemu-system-x86"),   # A's leader
        thread(100, "3", f"{a_cg}/vcpu0", tid=101, comm="CPU 0/KVM"),   # A's vCPU
        thread(500, "0-1", f"{web}/emulator", comm="qemu-system-x86"),  # web's leader
        thread(500, "3", f"{a_cg}/vcpu0", tid=502, comm="CPU 1/KVM"),   # web's, moved
    ))
    report = audit.audit(snap, leases(c3=A), [record(A, cgroup=a_cg, cpus="3")])
    assert kinds(report) == [("other-vm-thread", 502, f"{a_cg}/vcpu0", "3")]
    assert report.intruders[0].owner is None and report.intruders[0].holders == (A,)
    assert report.exit_status() == 1


def test_a_task_that_escaped_into_leased_cpus_is_an_error() -> None:
    """Issue #14: any task outside the holders allowed on a leased CPU is an error naming
    the task, its cgroup and the fix — except in the cgroup v1 root cpuset, where the kernel
    gives pinwarden no way to act (a warning: boot with isolcpus=)."""
    late = thread(700, "0-7", "/late", comm="sleep")
    root = thread(710, "0-7", "/", comm="sshd")
    kthread = thread(720, "0-7", "/", comm="kworker/u8:1", kernel=True)
    for version, expect in ((2, {"late": "escaped-task", "/": "escaped-task"}),
                            (1, {"late": "escaped-task", "/": "host-task"})):
        snap = HostSnapshot(threads=(late, root, kthread), cgroup_version=version)
        report = audit.audit(snap, leases(c3=A), [record(A, cpus="3")])
        got = {(i.cgroup or "").strip("/") or "/": (i.kind, i.severity)
               for i in report.intruders if not i.kernel}
        assert got == {"late": (expect["late"], "error"),
                       "/": (expect["/"], "error" if version == 2 else "warning")}
        assert [i.kind for i in report.intruders if i.kernel] == ["host-task"]
        assert report.exit_status() == 1
        text = render(report)
        assert "escaped-task" in text and "pinwarden sync" in text


def test_noise_pinwarden_moves_is_an_error_when_found_on_a_leased_cpu() -> None:
    from pinwarden.isolation import NoiseSnapshot

    noise = NoiseSnapshot(online=cs("0-7"), default_affinity=cs("0-7"), workqueue=cs("0-2"))
    snap = HostSnapshot(irqs=(IrqInfo(24, cs("0-7"), cs("3"), ("eth0",)),
                              IrqInfo(25, cs("3"), cs("3"), ("nvme0q3",))),
                        cgroup_version=2, noise=noise)
    isolating = audit.audit(snap, leases(c3=A), [record(A, cpus="3")], isolating=True,
                            refused={"irq:25"})
    by = {(i.kind, i.irq, i.name): i.severity for i in isolating.intruders}
    assert by == {("irq", 24, "eth0"): "error",  # pinwarden should have moved it
                  ("irq", 25, "nvme0q3"): "warning",  # the kernel refused: boot parameter
                  ("workqueue", None, "new IRQs (default affinity)"): "error"}
    findings = {f.kind: f.boot_param for f in isolating.unmovable}
    assert findings["irq"].startswith("isolcpus=managed_irq,domain,")
    assert findings["tick"] == "nohz_full=3" and findings["rcu"] == "rcu_nocbs=3"
    data = isolating.to_json()
    assert {u["boot_parameter"] for u in data["unmovable"]} >= {"nohz_full=3", "rcu_nocbs=3"}
    assert "boot with nohz_full=3" in render(isolating)
    hands_off = audit.audit(snap, leases(c3=A), [record(A, cpus="3")], isolating=False)
    assert {i.severity for i in hands_off.intruders} == {"warning"}


def test_load_balancing_is_not_named_where_an_isolated_partition_keeps_it_off() -> None:
    """The audit listed "scheduler load balancing reaches them unless the holder partition
    is 'isolated'" of CPUs whose holder partitions were (systemd-lab hunt)."""
    from pinwarden.isolation import NoiseSnapshot

    noise = NoiseSnapshot(online=cs("0-7"), default_affinity=cs("0-2"), workqueue=cs("0-2"))

    def scheduler(partition: str) -> bool:
        group = CgroupInfo("/pinwarden.partition/vm-A.partition", cs("3"), cs("3"), True,
                           partition=partition)
        snap = HostSnapshot(cgroups=(group,), cgroup_version=2, noise=noise)
        report = audit.audit(snap, leases(c3=A), [record(A, cpus="3")], isolating=True)
        return "scheduler" in {f.kind for f in report.unmovable}

    assert not scheduler("isolated")
    assert scheduler("root") and scheduler("isolated invalid (Cpu list not exclusive)")


def test_a_holder_recorded_in_the_root_cgroup_owns_nothing() -> None:
    snap = HostSnapshot(threads=(thread(330, "6", "/", comm="bash"),))
    report = audit.audit(snap, leases(c6=A), [record(A, cgroup="/", cpus="6")])
    assert kinds(report) == [("host-task", 330, "/", "6")]


def test_owner_pid_and_its_descendants_belong_to_the_holder() -> None:
    snap = HostSnapshot(threads=(
        thread(300, "6", comm="job"),                   # the owner
        thread(300, "6", tid=301, comm="job-worker"),   # its thread
        thread(310, "6-7", ppid=300, comm="child"),     # its child
        thread(320, "6", ppid=310, comm="grandchild"),  # grandchild
        thread(330, "6", ppid=1, comm="bash"),          # unrelated
    ))
    holders = [record(J, owner=300, cpus="6")]
    report = audit.audit(snap, leases(c6=J), holders)
    assert kinds(report) == [("host-task", 330, "/", "6")]
    assert report.exit_status() == 0
    assert report.exit_status(strict=True) == 1
    # Another holder's CPU 7 is reachable by the job's child: an error naming the job.
    report = audit.audit(snap, leases(c6=J, c7=A), [*holders, record(A, cpus="7")])
    assert kinds(report) == [("other-vm-thread", 310, "/", "7"), ("host-task", 330, "/", "6")]
    assert report.intruders[0].owner == J


def test_kernel_threads() -> None:
    snap = HostSnapshot(threads=(
        thread(20, "3", comm="ksoftirqd/3", kernel=True, ppid=2),
        thread(21, "3", comm="kworker/3:1", kernel=True, ppid=2),
        thread(22, "0-7", comm="kworker/u16:0", kernel=True, ppid=2),
        thread(23, "0-2", comm="rcu_preempt", kernel=True, ppid=2),
    ))
    report = audit.audit(snap, leases(c3=A), [record(A, cpus="3")])
    assert kinds(report) == [("host-task", 22, "/", "3")]
    assert report.intruders[0].kernel
    assert report.per_cpu_kthreads == 2


def test_sibling_hold_cpus_are_off_limits_even_to_their_holder() -> None:
    a_cg = "/pinwarden.partition/vm-a.partition"
    snap = HostSnapshot(
        threads=(thread(100, "2", f"{a_cg}/vcpu0", tid=101),     # A's vCPU on its CPU 2
                 thread(100, "2-3", f"{a_cg}/emulator", tid=102)),  # may use held CPU 3
        cgroups=(CgroupInfo(a_cg, cs("2-3"), cs("2-3"), False),))
    lease_list = [Lease(2, A, "vcpu0", 0.0), Lease(3, A, "sibling-hold", 0.0)]
    report = audit.audit(snap, lease_list, [record(A, cgroup=a_cg, cpus="2-3")])
    assert kinds(report) == [("other-vm-thread", 102, f"{a_cg}/emulator", "3"),
                             ("vm-cgroup", None, a_cg, "3")]
    assert all(i.owner == A and i.holders == (A,) for i in report.intruders)
    assert report.to_json()["leases"][1]["role"] == "sibling-hold"


def test_irqs() -> None:
    snap = HostSnapshot(irqs=(
        IrqInfo(24, cs("0-7"), cs("3"), ("nvme0q1",)),
        IrqInfo(25, cs("0-2"), cs("0"), ("eth0",)),
        IrqInfo(26, cs("0-7"), None, ()),  # no handler: never fires
    ))
    report = audit.audit(snap, leases(c3=A), [record(A, cpus="3")])
    assert [(i.kind, i.irq, i.name, str(i.cpus)) for i in report.intruders] == [
        ("irq", 24, "nvme0q1", "3")]
    assert report.exit_status() == 0


def test_noise_on_a_kept_cpu_is_a_warning_where_on_a_leased_one_it_is_an_error() -> None:
    """A CPU a forced release left to its still-running domain is no lease: pinwarden put
    the host's noise back there, so an IRQ or workqueue found there is no failure of
    pinwarden's (audit called it an error, exit 1 — lifecycle hunt); on a leased CPU of a
    host where pinwarden isolates noise it still is."""
    from pinwarden.isolation import NoiseSnapshot
    from pinwarden.model import KEPT_ROLE

    snap = HostSnapshot(irqs=(IrqInfo(24, cs("0,3"), cs("3"), ("nvme0q1",)),
                              IrqInfo(25, cs("0,4"), cs("4"), ("eth0",))),
                        noise=NoiseSnapshot(online=cs("0-7"), workqueue=cs("0,3"),
                                            default_affinity=cs("0,4")))
    lease_list = [Lease(3, A, "vcpu0", 0.0), Lease(4, B, KEPT_ROLE, 0.0, 77)]
    report = audit.audit(snap, lease_list, [record(A, cpus="3")], isolating=True)
    found = {(i.kind, i.name, str(i.cpus), i.severity) for i in report.intruders}
    assert found == {("irq", "nvme0q1", "3", "error"), ("irq", "eth0", "4", "warning"),
                     ("workqueue", "unbound workqueues", "3", "error"),
                     ("workqueue", "new IRQs (default affinity)", "4", "warning")}, found


def test_a_holder_group_moved_off_its_lease_is_an_error() -> None:
    """A running job's group set by hand to the housekeeping CPU (cpu_exclusive still on):
    the job ran there, its leased CPU idle, and neither audit nor status said so (status
    hunt).  Now ``off-lease``; a held sibling, a kept group and an offline leased CPU are
    not reported so."""
    from pinwarden.model import SIBLING_HOLD

    j_group = "/pinwarden-run-job1.partition"
    a_group = "/pinwarden-vm-vm-a.partition"

    def snap(j_cpus: str, root: str = "0-7") -> HostSnapshot:
        return HostSnapshot(cgroups=(
            CgroupInfo("/", cs(root), cs(root), True, exclusive=True),
            CgroupInfo("/machine", cs("0-1"), cs("0-1"), False),
            CgroupInfo(j_group, cs(j_cpus), cs(j_cpus), True, exclusive=True),
            CgroupInfo(a_group, cs("2"), cs("2"), True, exclusive=True),
        ), cgroup_version=1)

    holders = [record(J, cgroup=j_group.strip("/"), cpus="5"),
               record(A, cgroup=a_group.strip("/"), cpus="2")]
    leases = [Lease(5, J, "task", 0.0), Lease(2, A, "vcpu0", 0.0),
              Lease(3, A, SIBLING_HOLD, 0.0)]  # held empty: never in its group
    moved = audit.audit(snap("0"), leases, holders)
    assert [(i.kind, i.cgroup, str(i.cpus), i.holders, i.severity)
            for i in moved.intruders if i.kind == "off-lease"] == [
        ("off-lease", j_group, "5", (J,), "error")], moved.intruders
    assert moved.exit_status() == 1
    assert "puts it back on its lease" in render(moved)
    for quiet in (snap("5"), snap("", root="0-4,6-7")):  # as leased; CPU 5 offline
        assert not [i for i in audit.audit(quiet, leases, holders).intruders
                    if i.kind == "off-lease"], quiet


def test_a_domains_or_reservations_group_moved_off_its_lease_is_an_error_too() -> None:
    """A domain's threads live in libvirt's groups below its holder group, a reservation's
    group has none yet: audit looked only at groups with tasks of their own, and never
    reported ``off-lease`` for a domain, while status did (status/audit hunt)."""
    a_group = "/pinwarden-vm-vm-a.partition"
    b_group = "/pinwarden-vm-vm-b.partition"  # reserved, not started
    snap = HostSnapshot(cgroups=(
        CgroupInfo("/", cs("0-7"), cs("0-7"), True, exclusive=True),
        CgroupInfo(a_group, cs("0"), cs("0"), False, exclusive=True),
        CgroupInfo(f"{a_group}/qemu-1-vm-a.libvirt-qemu", cs("0"), cs("0"), False),
        CgroupInfo(f"{a_group}/qemu-1-vm-a.libvirt-qemu/vcpu0", cs("0"), cs("0"), True),
        CgroupInfo(b_group, cs("1"), cs("1"), False, exclusive=True),
    ), cgroup_version=1)
    holders = [record(A, cgroup=a_group.strip("/"), cpus="2"),
               record(B, cgroup=b_group.strip("/"), cpus="6")]
    leases = [Lease(2, A, "vcpu0", 0.0), Lease(6, B, "vcpu0", 0.0)]
    found = {(i.kind, i.cgroup, str(i.cpus)) for i in audit.audit(snap, leases, holders)
             .intruders if i.kind == "off-lease"}
    assert found == {("off-lease", a_group, "2"), ("off-lease", b_group, "6")}, found


def test_a_holder_group_removed_by_hand_is_an_error() -> None:
    """A holder's recorded group gone from the hierarchy (``rmdir`` of an empty one): the
    kernel kept nothing off its CPU, and audit exited 0 (hunt D).  Now ``missing-group``;
    a holder with no group recorded yet (its start in progress) is not reported, nor is
    anything when no cgroup could be read."""
    j_group = "/pinwarden-run-job1.partition"
    a_group = "/pinwarden-vm-vm-a.partition"
    groups = (CgroupInfo("/", cs("0-7"), cs("0-7"), True, exclusive=True),
              CgroupInfo("/machine", cs("0-1"), cs("0-1"), False),
              CgroupInfo(a_group, cs("2"), cs("2"), True, exclusive=True))
    holders = [record(J, cgroup=j_group.strip("/"), cpus="5"),
               record(A, cgroup=a_group.strip("/"), cpus="2"),
               record(B, cgroup=None, cpus="6")]
    leases = [Lease(5, J, "task", 0.0), Lease(2, A, "vcpu0", 0.0), Lease(6, B, "vcpu0", 0.0)]
    gone = audit.audit(HostSnapshot(cgroups=groups, cgroup_version=1), leases, holders)
    assert [(i.kind, i.cgroup, str(i.cpus), i.holders, i.severity)
            for i in gone.intruders if i.kind == "missing-group"] == [
        ("missing-group", j_group, "5", (J,), "error")], gone.intruders
    assert gone.exit_status() == 1 and "'pinwarden sync' makes it again" in render(gone)
    with_it = (*groups, CgroupInfo(j_group, cs("5"), cs("5"), False, exclusive=True))
    for quiet in (HostSnapshot(cgroups=with_it, cgroup_version=1),
                  HostSnapshot(cgroups=(), cgroup_version=1)):
        assert not [i for i in audit.audit(quiet, leases, holders).intruders
                    if i.kind == "missing-group"], quiet


def test_holder_groups_that_could_not_be_read_make_the_audit_incomplete() -> None:
    """No cpuset cgroup read at all (the hierarchy not mounted in this mount namespace, as
    in a container) while holders have groups: audit said "clean" and exited 0 (hunt L),
    though no holder group and no VM cgroup was looked at.  Now exit 2, "INCOMPLETE", with
    what was not checked; an intruder found all the same still exits 1, and holders with
    no group (or only kept CPUs) leave nothing unchecked."""
    holders = [record(A, cgroup="pinwarden-vm-vm-a.partition", cpus="2"),
               record(J, cgroup="pinwarden-run-job1.partition", cpus="5")]
    held = [Lease(2, A, "vcpu0", 0.0), Lease(5, J, "task", 0.0)]
    blind = HostSnapshot(threads=(thread(1, "0-1", None, comm="init"),),
                         notes=("no cpuset cgroup hierarchy is mounted: VM cgroups not "
                                "checked",))
    report = audit.audit(blind, held, holders)
    assert report.intruders == () and report.exit_status() == 2
    assert report.unchecked == (
        "the holder groups of qemu:vm-a, run:job1 and every VM cgroup: no cpuset cgroup "
        "could be read here (is the cpuset hierarchy mounted in this mount namespace? run "
        "'pinwarden audit' on the host itself)",)
    assert report.verdict().startswith("INCOMPLETE (1 not checked, below); clean: ")
    assert report.to_json()["status"] == "incomplete"
    assert render(report).splitlines()[1].startswith("not checked: the holder groups of ")
    vcpu = "/machine/qemu-2-web.libvirt-qemu/vcpu0"  # (from /proc/PID/cgroup)
    intruded = replace(blind, threads=(*blind.threads,
                                       thread(500, "2", vcpu, tid=501, comm="CPU 0/KVM")))
    worse = audit.audit(intruded, held, holders)
    assert worse.exit_status() == 1 and worse.verdict().startswith("INTRUDERS")
    assert worse.to_json()["status"] == "intruders" and worse.unchecked
    for quiet in ([record(A, cgroup=None, cpus="2")], []):  # nothing grouped to check
        assert audit.audit(blind, held, quiet).exit_status() == 0
    seen = HostSnapshot(cgroups=(CgroupInfo("/", cs("0-7"), cs("0-7"), True),),
                        cgroup_version=1)
    assert not audit.audit(seen, held, holders).unchecked


def test_a_holders_thread_moved_out_of_its_group_is_an_error() -> None:
    """A domain's QEMU moved out of its holder group (into ``machine``, by hand or by a
    rules daemon) runs on shared CPUs while its leased one idles, and nobody said so
    (hunt L).  Now ``strayed-thread``, for each thread allowed beyond the lease: of a QEMU
    moved out whole, or of any holder process with a thread still in the group.  Not for
    a libvirt daemon or pinwarden owning the lease while it starts the domain or job, a
    job's command moved out whole (it cannot be told from ``pinwarden run``), nor for a
    thread outside the group still confined to the lease."""
    group = "machine/pinwarden-vm-vm-a.partition"
    inside = f"/{group}/qemu-3-vm-a.libvirt-qemu/vcpu0"
    groups = (CgroupInfo("/", cs("0-3"), cs("0-3"), True, exclusive=True),
              CgroupInfo("/machine", cs("0-1,3"), cs("0-1,3"), True),
              CgroupInfo(f"/{group}", cs("2"), cs("2"), False, exclusive=True))
    held = [Lease(2, A, "vcpu0", 0.0)]

    def found(threads: tuple[ThreadInfo, ...], owner: int, ref: HolderRef = A,
              ) -> list[tuple[str, int | None, str | None, str]]:
        report = audit.audit(HostSnapshot(threads=threads, cgroups=groups, cgroup_version=1),
                             [replace(x, holder=ref) for x in held],
                             [record(ref, cgroup=group, owner=owner, cpus="2")])
        return [(i.kind, i.tid, i.cgroup, str(i.cpus)) for i in report.intruders
                if i.kind == "strayed-thread"]

    qemu = (thread(500, "0-1,3", "/machine", comm="qemu-system-x86"),
            thread(500, "0-1,3", "/machine", tid=501, comm="CPU 0/KVM"))
    assert found(qemu, 500) == [("strayed-thread", 500, "/machine", "2"),
                                ("strayed-thread", 501, "/machine", "2")]
    report = audit.audit(HostSnapshot(threads=qemu, cgroups=groups, cgroup_version=1), held,
                         [record(A, cgroup=group, owner=500, cpus="2")])
    assert report.exit_status() == 1 and "move it back (cgroup v1: echo TID" in render(report)
    one_out = (thread(600, "2", inside, comm="python3"),
               thread(600, "0-1,3", "/", tid=601, comm="worker"))
    assert found(one_out, 600) == [("strayed-thread", 601, "/", "2")]
    assert found(one_out, 600, J) == [("strayed-thread", 601, "/", "2")]
    assert found((thread(700, "0-1,3", "/", comm="python3"),), 700, J) == []  # whole job
    assert found((thread(800, "0-3", "/", comm="libvirtd"),
                  thread(801, "2", inside, ppid=800, comm="qemu-system-x86")), 800) == []
    # while libvirtd owns the lease (prepare to started) every QEMU descends from it, as
    # does a qemu-img it runs: libvirtd as PID 1 (in a container), a shared VM's QEMU
    # adopted by it, was reported whole (hunt M)
    shared_vm = "/machine/qemu-1-web.libvirt-qemu/vcpu0"
    assert found((thread(1, "0-3", "/", ppid=0, comm="libvirtd"),
                  thread(40, "0-1,3", shared_vm, ppid=1, comm="qemu-system-x86"),
                  thread(41, "0-1,3", "/", ppid=1, comm="qemu-img")), 1) == []
    assert found((thread(900, "0-1,3", "/machine", comm="pinwarden"),), 900) == []
    pinned = (thread(500, "2", "/machine", comm="qemu-system-x86"),)  # taskset to its lease
    assert found(pinned, 500) == []
    home = (thread(500, "2", inside, comm="qemu-system-x86"),)
    assert found(home, 500) == []


def test_a_cgroup_v1_holder_group_whose_cpu_exclusive_was_turned_off_is_an_error() -> None:
    """cgroup v1: with ``cpu_exclusive`` 0 the kernel no longer keeps the holder's siblings
    off its CPUs (the next write of the VM partition's cpuset.cpus may take them) and the
    group may be widened onto shared CPUs; nothing ran there yet, so audit exited 0
    (lifecycle hunt F8).  An exclusive holder group, a group kept by a forced release, a
    stale group and a group that is not a holder's are not reported so."""
    from pinwarden.model import KEPT_ROLE

    a_group = "/pinwarden-vm-vm-a.partition"
    snap = HostSnapshot(cgroups=(
        CgroupInfo("/", cs("0-7"), cs("0-7"), True, exclusive=True),
        CgroupInfo("/machine", cs("0-2,6-7"), cs("0-2,6-7"), False, exclusive=False),
        CgroupInfo(a_group, cs("2-3"), cs("2-3"), True, exclusive=False),  # widened, too
        CgroupInfo("/pinwarden-vm-web.partition", cs("4"), cs("4"), True, exclusive=False),
        CgroupInfo("/pinwarden-vm-gone.partition", cs("6"), cs("6"), False, exclusive=False),
        CgroupInfo("/pinwarden-job-j.partition", cs("5"), cs("5"), True, exclusive=True),
    ), cgroup_version=1)
    holders = [record(A, cgroup=a_group.strip("/"), cpus="3"),
               record(J, cgroup="pinwarden-job-j.partition", cpus="5")]
    lease_list = [Lease(3, A, "vcpu0", 0.0), Lease(5, J, "vcpu0", 0.0),
                  Lease(4, B, KEPT_ROLE, 0.0, 77)]
    report = audit.audit(snap, lease_list, holders)
    assert [(i.kind, i.cgroup, str(i.cpus), i.holders, i.owner, i.severity)
            for i in report.intruders] == [
        ("not-exclusive", a_group, "3", (A,), A, "error"),
        ("stale-holder-group", "/pinwarden-vm-gone.partition", "6", (), None, "warning")]
    assert report.exit_status() == 1
    text = render(report)
    assert "not-exclusive" in text and "'pinwarden sync' turns it on again" in text, text
    fixed = replace(snap, cgroups=tuple(replace(g, exclusive=True, cpus=cs("3"))
                                        if g.path == a_group else g for g in snap.cgroups))
    assert [i.kind for i in audit.audit(fixed, lease_list, holders).intruders] == [
        "stale-holder-group"]


def test_vm_cgroups() -> None:
    snap = HostSnapshot(cgroups=(
        CgroupInfo("/", cs("0-7"), cs("0-7"), True),                       # host root: no
        CgroupInfo("/machine", cs("0-7"), cs("0-7"), False),               # shared pool: yes
        CgroupInfo("/machine/qemu-2-web.libvirt-qemu", cs("0-7"), cs("0-2"), True),  # eff: no
        CgroupInfo("/machine/qemu-3-db.libvirt-qemu", cs("0-7"), cs("0-7"), False),  # empty
        CgroupInfo("/machine/qemu-3-db.libvirt-qemu/vcpu0", cs("0-2"), cs("0-2"), True),  # no
        CgroupInfo("/pinwarden.partition", cs("3-4"), cs("3-4"), False),  # exclusive root: no
        CgroupInfo("/pinwarden.partition/vm-a.partition", cs("3"), cs("3"), False),   # A's own
        CgroupInfo("/pinwarden.partition/vm-gone.partition", cs("4"), None, False),   # stale
        CgroupInfo("/system.slice/foo.service", cs("0-7"), cs("0-7"), True),  # host: no
        CgroupInfo("/other/machine-qemu\\x2d5\\x2dx.scope", cs("3"), cs("3"), True),  # a VM
    ))
    holders = [record(A, cgroup="pinwarden.partition/vm-a.partition", cpus="3"),
               record(B, cpus="4")]
    report = audit.audit(snap, leases(c3=A, c4=B), holders)
    assert [(i.kind, i.cgroup, str(i.cpus)) for i in report.intruders] == [
        ("vm-cgroup", "/machine", "3-4"),
        ("vm-cgroup", "/other/machine-qemu\\x2d5\\x2dx.scope", "3"),
        ("vm-cgroup", "/pinwarden.partition/vm-gone.partition", "4"),
    ]
    assert report.exit_status() == 1


def test_a_vm_thread_cgroup_pinned_onto_a_leased_cpu_is_a_warning() -> None:
    """cgroup v2: 'virsh vcpupin B 0 1 --live' onto leased CPU 1 fails in libvirt after it
    wrote "1" into B's vcpu0 cgroup; the kernel keeps the thread off CPU 1 (effective 2-3)
    until the lease ends, then it runs on CPU 1 alone while libvirt says 0-3.  Audit said
    nothing (systemd-lab hunt); now a warning names the cgroup, the CPU and its holder.
    A shared VM's cgroup naming the leased CPU among others (its placement before the
    lease, given back when it ends) is nothing to report."""
    scope = "/machine.slice/machine-qemu\\x2d2\\x2dB.scope/libvirt"
    snap = HostSnapshot(cgroups=(
        CgroupInfo("/machine.slice", cs("2-3"), cs("2-3"), False),
        CgroupInfo(f"{scope}/vcpu0", cs("1"), cs("2-3"), True),
        CgroupInfo(f"{scope}/vcpu1", cs("1-3"), cs("2-3"), True),
        CgroupInfo(f"{scope}/emulator", CpuSet(), cs("2-3"), True),
    ), cgroup_version=2)
    report = audit.audit(snap, leases(c1=A), [record(A, cpus="1")],
                         vm_partitions=("machine.slice",))
    assert [(i.kind, i.cgroup, str(i.cpus), i.severity, [h.name for h in i.holders])
            for i in report.intruders] == [
        ("vm-cgroup-pin", f"{scope}/vcpu0", "1", "warning", [A.name])]
    assert report.exit_status() == 0 and report.exit_status(strict=True) == 1


def test_host_threads_given_the_isolated_cpus_back_are_a_warning_leases_or_not() -> None:
    """isolcpus=2-3 keeps the host on 0-1 only through PID 1's boot affinity; a cpuset
    change (Linux 6.1: the controller enabled or disabled) gives every task of a cgroup all
    its CPUs, and they stay there.  Audit said nothing of it with nothing leased, and
    nothing of the unleased isolated CPUs with a lease (bookworm-lab hunt).  Now each such
    host thread is a warning naming the isolated CPUs no one leases; a thread on isolated
    CPUs alone (put there on purpose), a VM's or a holder's thread, a kernel thread and a
    host without isolcpus= are nothing to report; one on a leased CPU is an escaped-task
    error besides."""
    from pinwarden.isolation import NoiseSnapshot

    vm = "/machine.slice/machine-qemu\\x2d2\\x2dB.scope/libvirt/vcpu0"
    threads = (thread(1, "0-3", "/init.scope", comm="systemd"),
               thread(300, "0-3", "/system.slice/libvirtd.service", comm="libvirtd"),
               thread(300, "0-1", "/system.slice/libvirtd.service", tid=301, comm="pool"),
               thread(400, "3", "/system.slice/dpdk.service", comm="placed"),
               thread(500, "0-3", vm, comm="CPU 0/KVM"),
               thread(600, "0-3", "/user.slice", comm="job", ppid=1),
               thread(44, "0-3", "/", comm="kswapd0", kernel=True))
    cgroups = (CgroupInfo("/machine.slice", cs("0-3"), cs("0-3"), False),)
    noise = NoiseSnapshot(online=cs("0-3"), isolated=cs("2-3"))
    snap = HostSnapshot(threads=threads, cgroups=cgroups, cgroup_version=2, noise=noise)

    def found(report: audit.Report) -> list[tuple[str, int | None, str, str]]:
        return [(i.kind, i.tid, i.name, str(i.cpus)) for i in report.intruders]

    nothing = audit.audit(snap, [], [record(J, owner=600)], vm_partitions=("machine.slice",))
    assert found(nothing) == [("isolcpus-host-task", 1, "systemd", "2-3"),
                              ("isolcpus-host-task", 300, "libvirtd", "2-3")]
    assert all(i.severity == "warning" and i.holders == () for i in nothing.intruders)
    assert nothing.exit_status() == 0 and nothing.exit_status(strict=True) == 1
    assert nothing.verdict().startswith(
        "warnings (no CPU is leased exclusively): 2 isolcpus-host-tasks")
    text = render(nothing)
    assert "isolcpus-host-task" in text and "'taskset -a -p -c HOUSEKEEPING PID'" in text
    assert nothing.to_json()["intruders"][0]["cpus"] == "2-3"
    leased = audit.audit(snap, leases(c3=A), [record(A, cpus="3"), record(J, owner=600)],
                         vm_partitions=("machine.slice",))
    assert sorted(found(leased)) == sorted([
        ("escaped-task", 1, "systemd", "3"), ("escaped-task", 300, "libvirtd", "3"),
        ("escaped-task", 400, "placed", "3"), ("other-vm-thread", 500, "CPU 0/KVM", "3"),
        ("other-vm-thread", 600, "job", "3"), ("host-task", 44, "kswapd0", "3"),
        ("vm-cgroup", None, "machine.slice", "3"),
        ("isolcpus-host-task", 1, "systemd", "2"),
        ("isolcpus-host-task", 300, "libvirtd", "2")])
    every = audit.audit(snap, leases(c2=A, c3=A), [record(A, cpus="2-3")],
                        vm_partitions=("machine.slice",))
    assert "isolcpus-host-task" not in {i.kind for i in every.intruders}
    plain = audit.audit(replace(snap, noise=replace(noise, isolated=CpuSet())), [], [],
                        vm_partitions=("machine.slice",))
    assert plain.intruders == ()


def test_vm_cgroups_of_the_flat_layout_on_systemd_and_cgroupfs_hosts() -> None:
    """Holder groups sit beside the VM partition: recognised by their recorded cgroup, by
    name (``pinwarden-vm-NAME.partition``, its slice ``pinwarden\\x2dvm\\x2dNAME.slice``)
    while none is recorded, and a stale one holding a leased CPU is an error."""
    a_slice = "/pinwarden\\x2dvm\\x2da.slice"
    snap = HostSnapshot(
        threads=(thread(300, "3", f"{a_slice}/machine-qemu\\x2d1\\x2da.scope/libvirt/vcpu0"),
                 thread(301, "4", "/pinwarden-vm-web.partition/qemu-2-web.libvirt-qemu"),
                 thread(302, "3", "/pinwarden-vmx.partition", comm="intruder")),
        cgroups=(
            CgroupInfo("/machine.slice", cs("0-2,5-7"), cs("0-2,5-7"), False),
            CgroupInfo(a_slice, cs("3"), cs("3"), False),                       # A's own
            CgroupInfo("/pinwarden-vm-web.partition", cs("4"), cs("4"), False),   # B's, by name
            CgroupInfo("/pinwarden\\x2dvm\\x2dgone.slice", cs("3"), None, False),  # stale
        ))
    holders = [record(A, cgroup=a_slice, cpus="3"), record(B, cpus="4")]
    report = audit.audit(snap, leases(c3=A, c4=B), holders)
    assert [(i.kind, i.pid, i.cgroup, str(i.cpus)) for i in report.intruders] == [
        ("vm-cgroup", None, "/pinwarden\\x2dvm\\x2dgone.slice", "3"),
        ("host-task", 302, "/pinwarden-vmx.partition", "3"),
    ]


def test_holder_without_cgroup_recognised_by_libvirt_machine_name() -> None:
    scope = "/machine.slice/machine-qemu\\x2d3\\x2dweb.scope/libvirt/vcpu0"
    legacy = "/machine/qemu-4-web.libvirt-qemu/vcpu1"
    snap = HostSnapshot(threads=(thread(400, "5", scope), thread(401, "5", legacy),
                                 thread(402, "5", "/machine/qemu-5-webx.libvirt-qemu/vcpu0")))
    report = audit.audit(snap, leases(c5=B), [record(B, cpus="5")])
    assert kinds(report) == [("other-vm-thread", 402,
                              "/machine/qemu-5-webx.libvirt-qemu/vcpu0", "5")]


def test_machine_name_parsing() -> None:
    assert audit.machine_name("qemu-12-my.vm.libvirt-qemu") == ("qemu", "my.vm")
    assert audit.machine_name("lxc-3-c1.libvirt-lxc") == ("lxc", "c1")
    assert audit.machine_name("machine-qemu\\x2d7\\x2dweb\\x2dprod.scope") == ("qemu", "web-prod")
    assert audit.machine_name("vcpu0") is None
    assert audit.machine_name("machine.slice") is None


def test_report_json_and_render() -> None:
    snap = HostSnapshot(
        threads=(thread(500, "3", "/machine/qemu-2-web.libvirt-qemu/vcpu0", comm="CPU 0/KVM"),
                 *(thread(1000 + n, "0-7", comm=f"host{n}") for n in range(30))),
        irqs=(IrqInfo(24, cs("0-7"), cs("3"), ("nvme0q1",)),),
        notes=("2 threads exited while being read",))
    report = audit.audit(snap, leases(c3=A), [record(A, cpus="3")])
    data = report.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["status"] == "intruders"
    assert data["leases"] == [{"cpu": 3, "holder": {"driver": "qemu", "key": A.key,
                                                     "name": "vm-a"}, "role": "vcpu0"}]
    first = data["intruders"][0]
    assert (first["kind"], first["severity"], first["pid"], first["cpus"]) == \
        ("other-vm-thread", "error", 500, "3")
    assert data["checked"]["threads"] == 31
    text = render(report)
    lines = text.splitlines()
    assert lines[0].startswith("audit: INTRUDERS on the 1 leased CPU (3)")
    assert lines[1] == "note: 2 threads exited while being read"
    assert lines[2].split()[:2] == ["SEVERITY", "KIND"]
    assert "CPU 0/KVM" in lines[3] and "qemu:vm-a" in lines[3]
    hints = [line for line in lines if line.startswith("hint: ")]
    assert [h.split(":")[1].split()[0] for h in hints] == ["another", "tasks", "IRQs"]
    assert lines[-1 - len(hints)] == "… 11 more warnings (--all or --json lists them)"
    assert len(render(report, show_all=True).splitlines()) == 3 + 1 + 31 + len(hints)
    # unbound kernel threads alone (a cgroup v2 host): the kernel hint, not the v1 one
    kernel = audit.audit(HostSnapshot(threads=(thread(7, "0-7", comm="kworker/R-kblockd",
                                                      kernel=True),), cgroup_version=2),
                         leases(c3=A), [record(A, cpus="3")])
    assert [i.kind for i in kernel.intruders] == ["host-task"]
    kernel_hints = [ln for ln in render(kernel).splitlines() if ln.startswith("hint: ")]
    assert [h.split()[1] for h in kernel_hints] == ["unbound"], kernel_hints
    clean = audit.audit(HostSnapshot(threads=(thread(9, "0"),)), leases(c3=A), [])
    assert render(clean) == ("audit: clean: nothing else can run on the 1 leased CPU (3) of 1 "
                             "holder (1 threads, 0 cpuset cgroups, 0 IRQs checked)")


_cpus = st.frozensets(st.integers(0, 7), min_size=1).map(CpuSet)
_threads = st.lists(st.builds(
    ThreadInfo, pid=st.integers(10, 30), tid=st.integers(10, 60), comm=st.just("t"),
    ppid=st.integers(0, 30), cpus=_cpus,
    cgroup=st.sampled_from(["/", "/machine/qemu-1-web.libvirt-qemu/vcpu0", "/pw/a", None]),
    kernel=st.booleans()), max_size=20, unique_by=lambda t: t.tid)
_leases = st.dictionaries(st.integers(0, 7), st.sampled_from([A, B, J]), max_size=8)


@given(threads=_threads, lease_map=_leases, owner=st.integers(10, 30))
@settings(max_examples=150, deadline=None)
def test_properties(threads: list[ThreadInfo], lease_map: dict[int, HolderRef],
                    owner: int) -> None:
    holders = [record(A, cgroup="pw/a"), record(J, owner=owner), record(B)]
    snap = HostSnapshot(threads=tuple(threads))
    full = [Lease(c, h, "vcpu0", 0.0) for c, h in lease_map.items()]
    report = audit.audit(snap, full, holders)
    for i in report.intruders:
        assert i.cpus and i.cpus <= report.leased
        assert all(lease_map[c] != i.owner for c in i.cpus)  # never its own CPUs
        assert set(i.holders) == {lease_map[c] for c in i.cpus}
    # Fewer leases never mean more intruders.
    for cpu in lease_map:
        fewer = audit.audit(snap, [x for x in full if x.cpu != cpu], holders)
        assert len(fewer.intruders) <= len(report.intruders)
    # A thread that cannot reach a leased CPU is never reported.
    reported = {i.tid for i in report.intruders}
    for t in threads:
        if not t.cpus & report.leased:
            assert t.tid not in reported


# -- the scanner on a constructed /proc tree ------------------------------------------------


def _stat(pid: int, comm: str, ppid: int, flags: int, state: str = "S") -> str:
    return (f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 "
            f"100 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")


def _task(proc: Path, pid: int, tid: int, *, comm: str, ppid: int, cpus: str, cgroup: str,
          flags: int = 0x400000) -> None:
    d = proc / str(pid) / "task" / str(tid)
    d.mkdir(parents=True)
    (d / "stat").write_text(_stat(tid, comm, ppid, flags))
    (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{pid}\nCpus_allowed:\tff\n"
                              f"Cpus_allowed_list:\t{cpus}\nMems_allowed_list:\t0\n")
    (d / "cgroup").write_text(cgroup)


def test_scanner_on_a_proc_tree(tmp_path: Path) -> None:
    root = tmp_path
    proc = root / "proc"
    cpuset = root / "sys/fs/cgroup/cpuset"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpuset rw,nosuid shared:9 - cgroup cgroup rw,cpuset\n"
        "31 25 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n")
    vm_cg = "/machine/qemu-1-web.libvirt-qemu/vcpu0"
    # 700 is not in any tasks file (born after the cgroup pass): its cgroup file is read.
    _task(proc, 700, 700, comm="qemu-system-x86", ppid=1, cpus="0-3",
          cgroup=f"12:cpuset:{vm_cg[:-6]}/emulator\n0::/machine.slice\n")
    # 701 is listed in vcpu0/tasks; its own cgroup file is never needed.
    _task(proc, 700, 701, comm="CPU 0/KVM", ppid=1, cpus="2", cgroup="")
    (proc / "700/task/701/cgroup").unlink()
    _task(proc, 2, 2, comm="kthreadd", ppid=0, cpus="0-3", cgroup="4:cpu,cpuset:/\n",
          flags=0x208040)
    _task(proc, 9, 9, comm="a) b (c", ppid=1, cpus="1-2", cgroup="12:cpuset:/\n")
    (proc / "800/task/800").mkdir(parents=True)  # exited between listdir and read
    for path, cpus, tasks in (("", "0-3", ""), ("machine", "0-3", ""),
                              ("machine/qemu-1-web.libvirt-qemu", "2", ""),
                              ("machine/qemu-1-web.libvirt-qemu/vcpu0", "2", "701\n")):
        d = cpuset / path
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpuset.cpus").write_text(cpus + "\n")
        (d / "cpuset.effective_cpus").write_text(cpus + "\n")
        (d / "tasks").write_text(tasks)
    irq = proc / "irq/24"
    (irq / "nvme0q1").mkdir(parents=True)
    (irq / "smp_affinity_list").write_text("0-3\n")
    (irq / "effective_affinity_list").write_text("2\n")
    (proc / "irq/0").mkdir()
    (proc / "irq/0/smp_affinity_list").write_text("0\n")

    snap = audit.scan(root)
    by_tid = {t.tid: t for t in snap.threads}
    assert set(by_tid) == {700, 701, 2, 9}
    assert by_tid[701] == ThreadInfo(700, 701, "CPU 0/KVM", 1, cs("2"), vm_cg, False)
    assert by_tid[700].cgroup == "/machine/qemu-1-web.libvirt-qemu/emulator"
    assert by_tid[2].kernel and by_tid[2].cgroup == "/"
    assert by_tid[9].comm == "a) b (c"
    assert snap.notes == ("1 threads exited while being read",)
    assert [(c.path, str(c.cpus), c.populated)
            for c in sorted(snap.cgroups, key=lambda c: c.path)] == [
        ("/", "0-3", False), ("/machine", "0-3", False),
        ("/machine/qemu-1-web.libvirt-qemu", "2", False), (vm_cg, "2", True)]
    assert snap.irqs == (IrqInfo(0, cs("0"), None, ()),
                         IrqInfo(24, cs("0-3"), cs("2"), ("nvme0q1",)))
    report = audit.audit(snap, leases(c2=A), [record(A, cpus="2")])
    assert [(i.kind, i.tid or i.irq or i.cgroup) for i in report.intruders] == [
        ("other-vm-thread", 700), ("other-vm-thread", 701),
        ("vm-cgroup", "/machine"), ("vm-cgroup", vm_cg),  # not the empty qemu-1-web group
        ("irq", 24), ("host-task", 2), ("host-task", 9)]  # v1 root cpuset: warnings


def test_a_cgroup_namespace_sees_part_of_the_hierarchy_and_audit_says_so(
        tmp_path: Path) -> None:
    """Inside a cgroup namespace the cpuset hierarchy is readable below its root only, and
    a thread in a group above that root reads ``/..``: audit reported every holder group
    missing and the host's threads as escaped tasks (hunt N).  Now such threads' groups
    are unknown, no recorded group is called missing, and the audit is INCOMPLETE."""
    root = tmp_path
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpuset rw,nosuid shared:9 - cgroup cgroup rw,cpuset\n")
    _task(proc, 1, 1, comm="systemd", ppid=0, cpus="0-3", cgroup="5:cpuset:/..\n")
    _task(proc, 40, 40, comm="cron", ppid=1, cpus="0-3", cgroup="5:cpuset:/../../x\n")
    _task(proc, 50, 50, comm="sh", ppid=1, cpus="0", cgroup="5:cpuset:/\n")
    cpuset = root / "sys/fs/cgroup/cpuset"
    cpuset.mkdir(parents=True)
    (cpuset / "cpuset.cpus").write_text("0\n")
    (cpuset / "cpuset.effective_cpus").write_text("0\n")
    (cpuset / "tasks").write_text("50\n")
    snap = audit.scan(root)
    assert {t.tid: t.cgroup for t in snap.threads} == {1: None, 40: None, 50: "/"}
    assert snap.partial == ("this cgroup namespace sees only part of the cpuset hierarchy "
                            "(2 threads are in groups above its root)")
    holders = [record(J, cgroup="pinwarden-run-job1.partition", cpus="3")]
    report = audit.audit(snap, [Lease(3, J, "task", 0.0)], holders)
    assert {i.kind for i in report.intruders} == {"host-task"}  # warnings: groups unknown
    assert report.exit_status() == 2 and report.unchecked == (
        f"the holder groups of run:job1: {snap.partial} (run 'pinwarden audit' on the host "
        f"itself)",)


def test_scanner_without_cpuset_mount_says_so(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text("")
    _task(tmp_path / "proc", 1, 1, comm="init", ppid=0, cpus="0-3", cgroup="0::/\n")
    snap = audit.scan(tmp_path)
    assert "no cpuset cgroup hierarchy is mounted: VM cgroups not checked" in snap.notes
    assert snap.cgroups == ()
    assert [(t.pid, t.cgroup) for t in snap.threads] == [(1, None)]


def test_scanner_refuses_a_root_without_processes(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=f"no processes under {tmp_path}/proc"):
        audit.scan(tmp_path)
    (tmp_path / "proc/self").mkdir(parents=True)
    with pytest.raises(HostError):
        audit.scan(tmp_path)


def test_scanner_agrees_with_the_kernel_for_this_process() -> None:
    """The fast parser against the kernel's own answers for our own threads."""
    snap = audit.scan(Path("/"))
    mine = [t for t in snap.threads if t.pid == os.getpid()]
    assert [t.tid for t in mine if t.tid == os.getpid()] == [os.getpid()]
    main = next(t for t in mine if t.tid == os.getpid())
    assert main.cpus == CpuSet.of(os.sched_getaffinity(0))
    assert main.ppid == os.getppid()
    assert main.comm == Path("/proc/self/comm").read_text().rstrip("\n")
    assert not main.kernel
    own_cgroup = Path("/proc/self/cgroup").read_text()
    assert main.cgroup == next(line.split(":", 2)[2] for line in own_cgroup.splitlines()
                               if "cpuset" in line.split(":")[1].split(","))
    kthreadd = next(t for t in snap.threads if t.pid == 2)
    assert kthreadd.kernel


def test_a_zombie_is_no_thread_of_the_scan() -> None:
    """An exited child nobody reaped yet (a zombie) runs nowhere, and the kernel never
    narrows its affinity: the audit reported one an escaped task on the leased CPUs,
    exit 1 (v2-lab hunt).  The scan leaves it out, on both paths."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.05)
        for live in (False, True):
            threads, _ = audit.scan_threads(Path("/proc"), cgroup_of=None, live=live)
            assert os.getpid() in {t.pid for t in threads}, live
            assert child.pid not in {t.pid for t in threads}, live
    finally:
        child.wait()


def test_fast_paths_agree_with_the_slow_ones() -> None:
    """Live host: sched_getaffinity == status Cpus_allowed_list, and the tasks-file map ==
    each thread's own cgroup file, for every thread that stayed put across the scans (the
    slow scan runs before and after the fast one; kworkers rename themselves, so comm is
    left out)."""
    def key(t: ThreadInfo) -> tuple[object, ...]:
        return (t.pid, t.tid, t.ppid, t.cpus, t.cgroup, t.kernel)

    before, _ = audit.scan_threads(Path("/proc"), cgroup_of=None, live=False)
    cgroups, members = audit.scan_cgroups(CPUSET)
    fast, _ = audit.scan_threads(Path("/proc"), cgroup_of=members, live=True)
    after, _ = audit.scan_threads(Path("/proc"), cgroup_of=None, live=False)
    assert members, "no tasks listed in the cpuset hierarchy"
    assert "/" in {c.path for c in cgroups}
    unchanged = {key(t) for t in after}
    stable = {t.tid: key(t) for t in before if key(t) in unchanged}
    compared = [t for t in fast if t.tid in stable]
    assert len(compared) > 20
    assert os.getpid() in {t.tid for t in compared}
    for t in compared:
        assert key(t) == stable[t.tid], t


# -- real processes and a real cpuset cgroup -------------------------------------------------

CPUSET = Path("/sys/fs/cgroup/cpuset")


def _write(path: Path, value: str) -> None:
    """Write a cgroup file.  EINVAL on cpuset.cpus usually means another test's exclusive
    sibling holds one of the CPUs right now: retry for up to a minute."""
    deadline = time.monotonic() + 60
    while True:
        try:
            path.write_text(value)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL or time.monotonic() > deadline:
                siblings = [f"{p.name}={p.joinpath('cpuset.cpus').read_text().strip()}"
                            for p in path.parent.parent.iterdir()
                            if p.is_dir() and p.joinpath("cpuset.cpu_exclusive").exists()
                            and p.joinpath("cpuset.cpu_exclusive").read_text().strip() == "1"]
                raise AssertionError(f"cannot write {value!r} to {path}: {exc.strerror} "
                                     f"(exclusive groups beside it: {siblings})") from None
            time.sleep(0.1)


def _rmtree(base: Path) -> None:
    for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir(d)
    _rmdir(base)


def _rmdir(d: Path) -> None:
    for _ in range(100):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    d.rmdir()


@pytest.fixture
def cpuset_base() -> Iterator[Path]:
    if not (CPUSET / "cpuset.cpus").exists():
        pytest.fail("needs the cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset")
    online = CpuSet.parse_kernel(Path("/sys/devices/system/cpu/online").read_text())
    if not {0, 1} <= set(online):
        pytest.fail(f"needs CPUs 0 and 1 online, have {online}")
    base = CPUSET / f"pwtest-audit-{os.getpid()}"
    base.mkdir()
    try:
        _write(base / "cpuset.mems", (CPUSET / "cpuset.mems").read_text().strip())
        _write(base / "cpuset.cpus", "0-1")
        yield base
    finally:
        _rmtree(base)


@pytest.fixture
def spawn() -> Iterator[Callable[[Path | None, set[int]], int]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(cgroup: Path | None, cpus: set[int]) -> int:
        proc = subprocess.Popen(["sleep", "300"])
        started.append(proc)
        if cgroup is not None:
            (cgroup / "tasks").write_text(str(proc.pid))
        os.sched_setaffinity(proc.pid, cpus)
        return proc.pid

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def _two_threads() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A process of this test's with a second thread: (the process, that thread's TID)."""
    code = ("import threading, time, sys\n"
            "t = threading.Thread(target=time.sleep, args=(300,), daemon=True)\n"
            "t.start(); print(t.native_id, flush=True); time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def _group(base: Path, name: str, cpus: str) -> Path:
    d = base / name
    d.mkdir()
    _write(d / "cpuset.mems", (base / "cpuset.mems").read_text().strip())
    _write(d / "cpuset.cpus", cpus)
    return d


def run_audit_command(*argv: str) -> tuple[int, str]:
    """``pinwarden audit ARGV`` in a subprocess, through the audit command module alone (so
    this test does not depend on the other command modules)."""
    code = ("import argparse, sys\n"
            "from pinwarden.cli import common_parser\n"
            "from pinwarden.cli import audit\n"
            "parser = argparse.ArgumentParser(prog='pinwarden')\n"
            "audit.register(parser.add_subparsers(dest='command'), common_parser())\n"
            "args = parser.parse_args(sys.argv[1:])\n"
            "sys.exit(args.handler(args))\n")
    out = subprocess.run([sys.executable, "-c", code, "audit", *argv], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, out.stdout


@pytest.mark.kernel
def test_real_intruder_found_then_moved_off(
        tmp_path: Path, cpuset_base: Path, spawn: Callable[[Path | None, set[int]], int]) -> None:
    rel = cpuset_base.relative_to(CPUSET)
    own = _group(cpuset_base, "vm-a.partition", "1")
    other = _group(cpuset_base, "qemu-7-pwtestb.libvirt-qemu", "0-1")
    a_pid = spawn(own, {1})              # holder A's own thread on its CPU
    intruder = spawn(other, {1})          # another VM's thread on A's CPU
    host = spawn(None, {0, 1})            # an ordinary host task allowed on A's CPU
    state = tmp_path / "state"
    a = domain_holder("qemu", "pwtest-a", None)
    with Ledger(state) as ledger:
        ledger.reserve(a, lambda _: Plan("pwtest-a", None, True, {0: cs("1")}, cs("1"),
                                         leases={1: "vcpu0"}))
        ledger.set_cgroup(a, f"{rel}/vm-a.partition")
        holders, lease_list = ledger.holders(), ledger.leases()

    mine = {a_pid, intruder, host}
    other_cg = f"/{rel}/qemu-7-pwtestb.libvirt-qemu"

    def report_for_my_things() -> audit.Report:
        snap = audit.scan(Path("/"))
        assert {t.pid for t in snap.threads} >= mine
        # Only what this test created: other helpers may run VMs on this host right now.
        restricted = HostSnapshot(
            threads=tuple(t for t in snap.threads if t.pid in mine),
            cgroups=tuple(c for c in snap.cgroups if c.path.startswith(f"/{rel}")))
        return audit.audit(restricted, lease_list, holders)

    report = report_for_my_things()
    found = {(i.kind, i.pid, i.cgroup, str(i.cpus)) for i in report.intruders}
    assert found == {("other-vm-thread", intruder, other_cg, "1"),
                     ("vm-cgroup", None, other_cg, "1"),
                     ("host-task", host, "/", "1")}
    assert all(i.holders == (a,) for i in report.intruders)
    assert report.exit_status() == 1

    # The command over the real host reports the same intruder (and exits 1).
    status, out = run_audit_command("--json", "--state-dir", str(state))
    assert status == 1
    data = json.loads(out)
    assert {"kind": "other-vm-thread", "pid": intruder, "cgroup": other_cg, "cpus": "1"}.items() \
        <= next(i for i in data["intruders"] if i["pid"] == intruder).items()

    # Move the other VM off the leased CPU: the kernel narrows its thread's affinity too.
    _write(other / "cpuset.cpus", "0")
    os.sched_setaffinity(host, {0})
    report = report_for_my_things()
    assert report.intruders == ()
    assert report.exit_status(strict=True) == 0
    status, out = run_audit_command("--json", "--state-dir", str(state))
    assert not [i for i in json.loads(out)["intruders"] if i["pid"] in mine or
                (i["cgroup"] or "").startswith(f"/{rel}")]


@pytest.mark.kernel
def test_a_real_thread_written_alone_into_the_holders_group_is_found(
        tmp_path: Path, cpuset_base: Path) -> None:
    """The same on this host's cgroup v1 cpusets: one thread of a process of another
    group written into the holder's ``tasks`` (the kernel moves that thread alone, onto
    the leased CPU): an error naming it, where it was counted the holder's."""
    rel = cpuset_base.relative_to(CPUSET)
    own = _group(cpuset_base, "vm-a.partition", "1")
    other = _group(cpuset_base, "qemu-7-pwtestb.libvirt-qemu", "0")
    with _two_threads() as (proc, tid):
        _write(other / "tasks", str(proc.pid))  # the leader; the other thread follows it
        _write(other / "tasks", str(tid))
        _write(own / "tasks", str(tid))  # that thread alone, into the holder's group
        assert (own / "tasks").read_text().split() == [str(tid)]
        a = domain_holder("qemu", "pwtest-a", None)
        with Ledger(tmp_path / "state") as ledger:
            ledger.reserve(a, lambda _: Plan("pwtest-a", None, True, {0: cs("1")}, cs("1"),
                                             leases={1: "vcpu0"}))
            ledger.set_cgroup(a, f"{rel}/vm-a.partition")
            holders, lease_list = ledger.holders(), ledger.leases()
        snap = audit.scan(Path("/"))
        mine = HostSnapshot(threads=tuple(t for t in snap.threads if t.pid == proc.pid),
                            cgroups=tuple(c for c in snap.cgroups
                                          if c.path.startswith(f"/{rel}")))
        assert {t.tid for t in mine.threads} == {proc.pid, tid}
        report = audit.audit(mine, lease_list, holders)
        assert [(i.kind, i.pid, i.tid, str(i.cpus)) for i in report.intruders] == [
            ("other-vm-thread", proc.pid, tid, "1")], report.intruders
        assert report.exit_status() == 1


@pytest.mark.kernel
def test_a_real_thread_moved_out_of_its_holders_group_is_found(
        tmp_path: Path, cpuset_base: Path) -> None:
    """This host's cgroup v1 cpusets: one thread of a holder's process written from the
    holder's group into its parent (the kernel gives it the parent's CPUs): a
    ``strayed-thread`` error, from the scan and from the command."""
    rel = cpuset_base.relative_to(CPUSET)
    own = _group(cpuset_base, "vm-a.partition", "1")
    with _two_threads() as (proc, tid):
        _write(own / "tasks", str(proc.pid))
        _write(own / "tasks", str(tid))
        a = domain_holder("qemu", "pwtest-a", None)
        state = tmp_path / "state"
        with Ledger(state) as ledger:
            ledger.reserve(a, lambda _: Plan("pwtest-a", None, True, {0: cs("1")}, cs("1"),
                                             leases={1: "vcpu0"}), owner_pid=proc.pid)
            ledger.set_cgroup(a, f"{rel}/vm-a.partition")
            holders, lease_list = ledger.holders(), ledger.leases()

        def strays() -> list[tuple[str, int | None, int | None, str | None, str]]:
            snap = audit.scan(Path("/"))
            mine = HostSnapshot(threads=tuple(t for t in snap.threads if t.pid == proc.pid),
                                cgroups=tuple(c for c in snap.cgroups
                                              if c.path.startswith(f"/{rel}")))
            assert {t.tid for t in mine.threads} == {proc.pid, tid}
            return [(i.kind, i.pid, i.tid, i.cgroup, str(i.cpus))
                    for i in audit.audit(mine, lease_list, holders).intruders]

        assert strays() == []  # both at home
        _write(cpuset_base / "tasks", str(tid))  # that thread alone, out to the parent
        assert os.sched_getaffinity(tid) == {0, 1}
        assert strays() == [("strayed-thread", proc.pid, tid, f"/{rel}", "1")]
        status, out = run_audit_command("--json", "--state-dir", str(state))
        assert status == 1
        assert {"kind": "strayed-thread", "pid": proc.pid, "tid": tid,
                "cgroup": f"/{rel}", "cpus": "1"}.items() <= next(
            i for i in json.loads(out)["intruders"] if i["tid"] == tid).items()


@pytest.mark.libvirt
def test_real_libvirt_vm_on_a_leased_cpu(tmp_path: Path, domains: env.Domains) -> None:
    """A real QEMU started by libvirtd, unpinned, while CPU 1 is leased to another holder:
    its vCPU thread and its populated cgroups are intruders; pinned away, it is clean."""
    name = f"pwtest-audit-{os.getpid()}"
    dom = domains.create(name)
    pid = env.qemu_pid(name)
    vm_cg = "/" + env.domain_cgroup(name)
    if 1 not in env.vm_affinity(name):
        pytest.fail(f"{name} cannot run on CPU 1 (machine is {env.read_cpus('machine')}): "
                    f"another test left the VM partition narrowed")
    holder = domain_holder("qemu", "pwtest-audit-owner", "cccccccc-0000-0000-0000-00000000000c")
    with Ledger(tmp_path / "state") as ledger:
        ledger.reserve(holder, lambda _: Plan(holder.name, holder.key, True, {0: cs("1")},
                                              cs("1"), leases={1: "vcpu0"}))
        lease_list, holders = ledger.leases(), ledger.holders()

    def intruders_of_the_vm() -> list[audit.Intruder]:
        report = audit.audit(audit.scan(Path("/")), lease_list, holders)
        return [i for i in report.intruders
                if i.pid == pid or (i.cgroup or "").startswith(vm_cg + "/")]

    found = intruders_of_the_vm()
    vcpu = [i for i in found if i.kind == "other-vm-thread" and i.name.startswith("CPU 0/")]
    assert len(vcpu) == 1, found
    assert vcpu[0].pid == pid and vcpu[0].cgroup == vm_cg + "/vcpu0"
    assert vcpu[0].cpus == cs("1") and vcpu[0].holders == (holder,)
    assert {i.cgroup for i in found if i.kind == "vm-cgroup"} == {vm_cg + "/vcpu0",
                                                                  vm_cg + "/emulator"}
    assert all(i.severity == "error" for i in found)

    dom.pinVcpu(0, (True, False))
    dom.pinEmulator((True, False))
    assert env.vm_affinity(name) == frozenset({0})
    assert intruders_of_the_vm() == []


def test_a_holder_group_the_kernel_marks_an_invalid_partition_is_an_error() -> None:
    """cgroup v2: a sibling that wrote a leased CPU into its cpuset.cpus makes the holder's
    partition invalid, and it stays so after the sibling lets go (the kernel checks it
    again only when the holder's own cpuset changes): the root may run anything there
    again.  Nothing else may show it, so the audit says so (it exited 0 on a real systemd
    host); a valid partition, or a group that is not a holder's, is not reported."""
    a_slice = "/pinwarden\\x2dvm\\x2da.slice"
    reason = "isolated invalid (Cpu list in cpuset.cpus not exclusive)"
    snap = HostSnapshot(cgroups=(
        CgroupInfo("/", cs("0-7"), cs("0-7"), True),
        CgroupInfo("/machine.slice", cs("4-7"), cs("4-7"), False, "member"),
        CgroupInfo(a_slice, cs("3"), cs("3"), False, reason),
        CgroupInfo("/pinwarden-vm-web.partition", cs("2"), cs("2"), False, "isolated"),
        CgroupInfo("/other", cs("1"), cs("1"), False, "root invalid"),
    ), cgroup_version=2)
    holders = [record(A, cgroup=a_slice, cpus="3"), record(B, cpus="2")]
    report = audit.audit(snap, leases(c3=A, c2=B), holders)
    assert [(i.kind, i.cgroup, str(i.cpus), i.holders, i.severity)
            for i in report.intruders] == [("invalid-partition", a_slice, "3", (A,), "error")]
    assert report.exit_status() == 1
    text = render(report)
    assert "invalid-partition" in text and "'pinwarden sync' makes the partition valid" \
        in text, text
    valid = replace(snap, cgroups=tuple(replace(g, partition="isolated")
                                        if g.path == a_slice else g for g in snap.cgroups))
    assert audit.audit(valid, leases(c3=A, c2=B), holders).intruders == ()


def test_the_scanner_reads_each_v2_groups_partition(tmp_path: Path) -> None:
    """cpuset.cpus.partition as the kernel reads it; the root has none (None), nor has v1."""
    for path, cpus, partition in (("", "0-3", None), ("pw.partition", "3",
                                                      "root invalid (Parent is not a root)")):
        d = tmp_path / path
        d.mkdir(exist_ok=True)
        (d / "cpuset.cpus").write_text(cpus + "\n")
        (d / "cpuset.cpus.effective").write_text(cpus + "\n")
        (d / "cgroup.threads").write_text("")
        if partition is not None:
            (d / "cpuset.cpus.partition").write_text(partition + "\n")
    groups, _ = audit.scan_cgroups(tmp_path, v2=True)
    assert {g.path: g.partition for g in groups} == {
        "/": None, "/pw.partition": "root invalid (Parent is not a root)"}


def test_a_holder_group_no_holder_has_is_a_warning() -> None:
    """A release interrupted between the ledger's commit and the layout's shrink (the hook
    killed at 'release', hunt) leaves the holder's group, keeping its CPU from the VMs;
    status said 'no holders' and 'audit --strict' passed.  Now a warning, leases or not; a
    holder's own group, and a group that is not a holder's, are not."""
    snap = HostSnapshot(cgroups=(
        CgroupInfo("/", cs("0-7"), cs("0-7"), True),
        CgroupInfo("/machine", cs("0,3-7"), cs("0,3-7"), True),
        CgroupInfo("/pinwarden-vm-gone.partition", cs("1"), cs("1"), False),
        CgroupInfo("/pinwarden-vm-gone.partition/qemu-1-gone.libvirt-qemu", cs("1"), cs("1"),
                   False),
        CgroupInfo("/pinwarden-vm-web.partition", cs("2"), cs("2"), False),
        CgroupInfo("/other", cs("3"), cs("3"), False),
    ), cgroup_version=1)
    web = domain_holder("qemu", "web", None)
    report = audit.audit(snap, leases(c2=web), [record(web, cpus="2")])
    assert [(i.kind, i.cgroup, str(i.cpus), i.severity) for i in report.intruders] == [
        ("stale-holder-group", "/pinwarden-vm-gone.partition", "1", "warning")]
    assert report.exit_status() == 0 and report.exit_status(strict=True) == 1
    text = render(report)
    assert "'pinwarden sync' removes it" in text, text
    alone = audit.audit(snap, (), ())  # nothing leased at all: still said
    assert [i.kind for i in alone.intruders] == ["stale-holder-group"] * 2
    assert alone.verdict().startswith("warnings (no CPU is leased exclusively): "
                                      "2 stale-holder-groups"), alone.verdict()
    assert alone.exit_status(strict=True) == 1
