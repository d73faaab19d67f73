"""Linux 6.12+: no cgroup partition may hold ``isolcpus=`` CPUs.  In isolcpus mode the
holder groups over them are then plain cpusets with explicit CPUs, with a note — checked here
on the fake (the lab boots 6.1 only; DEVELOPERS.md, "Kernel test lab", has the 6.12 facts)."""

from __future__ import annotations

from pathlib import Path

from enforce_helpers import build, lease, make_host, sync_leases, whole
from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import PartitionKind
from pinwarden.enforce.fake import FakeCpusetV1
from pinwarden.enforce.layout import desired_layout, without_partitions_over
from pinwarden.enforce.v2 import (
    CgroupV2Backend,
    PartitionInvalidError,
    forbidden_partition_cpus,
    kernel_version,
)

ISOLATED = CpuSet.of([2, 3])
HOUSEKEEPING = "partition config conflicts with housekeeping setup"


class Kernel612(FakeCpusetV1):
    """Refuses partitions over ISOLATED as 6.12 does (after undoing the write, like the v2
    backend) — and, with ``known``, says so in advance like the v2 backend on 6.12."""

    def __init__(self, *, known: bool) -> None:
        super().__init__(CpuSet.parse_kernel("0-3"))
        self.known = known
        self.refused = False

    def partition_forbidden_cpus(self) -> CpuSet:
        return ISOLATED if self.known or self.refused else CpuSet()

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        if kind != "member" and not self.read_group(path).cpus.isdisjoint(ISOLATED):
            self.refused = True
            raise PartitionInvalidError("partition", path, value="root", group=path,
                                        kind="exclusive", reason=HOUSEKEEPING)
        super().set_partition(path, kind)


def test_layout_without_partitions_over_isolcpus_cpus() -> None:
    desired = desired_layout(make_host(), [lease(3, "A", "qemu", "vcpu0"), lease(1, "J")])
    member = without_partitions_over(desired, ISOLATED)
    # only the holder over an isolcpus CPU becomes a plain cpuset; the job keeps its partition
    assert {(h.path, h.partition) for h in member.holders} == {
        ("pinwarden-vm-A.partition", "member"), ("pinwarden-run-J.partition", "exclusive")}
    assert [h.cpus for h in member.holders] == [h.cpus for h in desired.holders]
    assert any("isolcpus CPUs (3)" in n and "pinwarden-vm-A.partition is a plain" in n
               for n in member.notes), member.notes
    # holders without isolcpus CPUs keep their partitions
    assert without_partitions_over(desired, CpuSet.of([0])) == desired


def _check_member_tree(fake: Kernel612, notes: tuple[str, ...]) -> None:
    state = whole(fake)
    group = state["pinwarden-vm-A.partition"]
    assert (group.partition, group.cpus) == ("member", CpuSet.of([3]))
    assert state["machine"].cpus == CpuSet.of([1, 2])  # disjoint: explicit cpuset.cpus
    assert any("cannot enforce exclusivity" in n for n in notes), notes


def test_known_rule_builds_a_member_tree_with_a_note() -> None:
    fake = Kernel612(known=True)
    build(fake, {"machine": ("1-3", False)})
    result = sync_leases(fake, make_host(), [lease(3, "A", "qemu", "vcpu0")])
    assert result.desired is not None
    _check_member_tree(fake, result.desired.notes)
    assert not fake.refused  # never tried a partition
    sync_leases(fake, make_host(), [])
    assert "pinwarden-vm-A.partition" not in whole(fake)


def test_unexpected_refusal_is_rolled_back_and_re_planned_once() -> None:
    fake = Kernel612(known=False)
    build(fake, {"machine": ("1-3", False)})
    result = sync_leases(fake, make_host(), [lease(3, "A", "qemu", "vcpu0")])
    assert fake.refused and result.desired is not None
    _check_member_tree(fake, result.desired.notes)


def test_partitions_outside_isolcpus_stay_partitions() -> None:
    fake = Kernel612(known=True)
    build(fake, {"machine": ("1-3", False)})
    sync_leases(fake, make_host(), [lease(1, "J")])
    assert whole(fake)["pinwarden-run-J.partition"].partition == "exclusive"


def _host_files(root: Path, release: str, isolated: str) -> None:
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/osrelease").write_text(release + "\n")
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/isolated").write_text(isolated + "\n")


def test_v2_backend_knows_the_rule_from_the_kernel_version(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _host_files(old, "6.1.0-28-amd64", "6-7")
    _host_files(new, "6.12.57+deb12-amd64", "6-7")
    assert kernel_version(old) == (6, 1) and kernel_version(new) == (6, 12)
    assert forbidden_partition_cpus(old) == CpuSet()
    assert forbidden_partition_cpus(new) == CpuSet.of([6, 7])
    assert forbidden_partition_cpus(old, refused=True) == CpuSet.of([6, 7])
    backend = CgroupV2Backend(tmp_path, root=old)
    assert backend.partition_forbidden_cpus() == CpuSet()
    backend.housekeeping_refused = True  # set by set_partition/set_cpus on that refusal
    assert backend.partition_forbidden_cpus() == CpuSet.of([6, 7])
    assert CgroupV2Backend(tmp_path, root=new).partition_forbidden_cpus() == CpuSet.of([6, 7])
