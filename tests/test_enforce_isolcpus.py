"""Linux 6.12+: no ``root`` cgroup partition may hold ``isolcpus=`` CPUs.  In isolcpus mode
the holder groups over them are then ``isolated`` partitions where the kernel takes them
(7.3), else plain cpusets with explicit CPUs (6.12), with a note — checked here on the fake,
and in the lab on 6.1 and 7.3 (DEVELOPERS.md, "Kernel test lab", has the facts)."""

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
    forbidden_isolated_cpus,
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


def _check_member_tree(fake: FakeCpusetV1, notes: tuple[str, ...]) -> None:
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


class Kernel73(FakeCpusetV1):
    """Refuses ``root`` partitions over ISOLATED, takes ``isolated`` ones, as the lab's
    7.3 does.  ``known_root`` / ``known_isolated``: the backend says so in advance (the v2
    backend knows 6.12 and 7.3); ``refuses_isolated``: a kernel between them that refuses
    both, which the backend does not expect."""

    def __init__(self, *, known_root: bool = True, known_isolated: bool = True,
                 refuses_isolated: bool = False) -> None:
        super().__init__(CpuSet.parse_kernel("0-3"))
        self.known_root, self.known_isolated = known_root, known_isolated
        self.refuses_isolated = refuses_isolated
        self.refused: list[PartitionKind] = []
        self.kinds: dict[str, PartitionKind] = {}  # the v1 fake reads isolated as exclusive

    def partition_forbidden_cpus(self) -> CpuSet:
        return ISOLATED if self.known_root or self.refused else CpuSet()

    def isolated_forbidden_cpus(self) -> CpuSet:
        if "isolated" in self.refused or (self.known_isolated and self.refuses_isolated):
            return ISOLATED
        return CpuSet()

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        over = not self.read_group(path).cpus.isdisjoint(ISOLATED)
        if over and (kind == "exclusive" or (kind == "isolated" and self.refuses_isolated)):
            self.refused.append(kind)
            raise PartitionInvalidError("partition", path, value=kind, group=path,
                                        kind=kind, reason=HOUSEKEEPING)
        super().set_partition(path, kind)
        self.kinds[path] = kind


def test_layout_makes_holders_over_isolcpus_isolated_where_the_kernel_takes_them() -> None:
    desired = desired_layout(make_host(), [lease(3, "A", "qemu", "vcpu0"), lease(1, "J")])
    adapted = without_partitions_over(desired, ISOLATED, CpuSet())
    assert {(h.path, h.partition) for h in adapted.holders} == {
        ("pinwarden-vm-A.partition", "isolated"), ("pinwarden-run-J.partition", "exclusive")}
    assert any("root partitions holding isolcpus CPUs (3)" in n
               and "pinwarden-vm-A.partition is an isolated partition" in n
               for n in adapted.notes), adapted.notes
    assert not any("plain cpuset" in n for n in adapted.notes)
    # applied again (apply re-plans from the same desired layout): nothing changes
    assert without_partitions_over(adapted, ISOLATED, CpuSet()) == adapted
    # a holder that asked for an isolated partition keeps it, with no note
    iso = desired_layout(make_host(), [lease(3, "A", "qemu", "vcpu0")],
                         isolated=frozenset({lease(3, "A", "qemu", "vcpu0").holder}))
    assert without_partitions_over(iso, ISOLATED, CpuSet()) == iso
    # where isolated partitions are refused too: a plain cpuset, as before
    assert {h.partition for h in without_partitions_over(desired, ISOLATED).holders
            if h.cpus & ISOLATED} == {"member"}


def test_kernel_taking_isolated_partitions_over_isolcpus_gets_them() -> None:
    fake = Kernel73()
    build(fake, {"machine": ("1-3", False)})
    result = sync_leases(fake, make_host(), [lease(3, "A", "qemu", "vcpu0")])
    group = whole(fake)["pinwarden-vm-A.partition"]
    assert group.cpus == CpuSet.of([3]) and fake.kinds[group.path] == "isolated"
    assert fake.refused == []  # known in advance: a root partition was never tried
    assert result.desired is not None and any(
        "is an isolated partition" in n for n in result.desired.notes)
    sync_leases(fake, make_host(), [])
    assert "pinwarden-vm-A.partition" not in whole(fake)


def test_unexpected_refusals_step_down_to_isolated_then_to_a_plain_cpuset() -> None:
    # nothing known: root refused, re-planned as isolated, which this kernel takes
    fake = Kernel73(known_root=False, known_isolated=False)
    build(fake, {"machine": ("1-3", False)})
    sync_leases(fake, make_host(), [lease(3, "A", "qemu", "vcpu0")])
    assert fake.refused == ["exclusive"]
    assert fake.kinds["pinwarden-vm-A.partition"] == "isolated"
    # a kernel between 6.12 and 7.3 that refuses isolated as well: then a plain cpuset
    fake = Kernel73(known_root=False, known_isolated=False, refuses_isolated=True)
    build(fake, {"machine": ("1-3", False)})
    result = sync_leases(fake, make_host(), [lease(3, "A", "qemu", "vcpu0")])
    assert fake.refused == ["exclusive", "isolated"]
    assert result.desired is not None
    _check_member_tree(fake, result.desired.notes)


def test_v2_backend_knows_which_kernels_take_isolated_partitions(tmp_path: Path) -> None:
    for release, root_rule, isolated_rule in (("6.1.0-28-amd64", False, False),
                                              ("6.12.57+deb12-amd64", True, True),
                                              ("7.3.4+deb13-amd64", True, False)):
        host = tmp_path / release
        _host_files(host, release, "6-7")
        assert forbidden_partition_cpus(host) == (CpuSet.of([6, 7]) if root_rule
                                                  else CpuSet()), release
        assert forbidden_isolated_cpus(host) == (CpuSet.of([6, 7]) if isolated_rule
                                                 else CpuSet()), release
        backend = CgroupV2Backend(tmp_path, root=host)
        assert backend.isolated_forbidden_cpus() == forbidden_isolated_cpus(host)
        backend.isolated_refused = True  # set by set_partition on an isolated refusal
        assert backend.isolated_forbidden_cpus() == CpuSet.of([6, 7]), release
