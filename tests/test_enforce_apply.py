"""Transactional apply on the fake: rollback after a failure at any step, clear errors."""

from __future__ import annotations

import errno
from collections.abc import Iterable

import pytest

from enforce_helpers import FailingBackend, build, lease, make_host, sync_leases, whole
from pinwarden.cpuset import CpuSet
from pinwarden.enforce.apply import apply_layout, execute
from pinwarden.enforce.backend import (
    CgroupOpError,
    GroupState,
    PartitionKind,
    SetCpus,
    SetPartition,
    Snapshot,
)
from pinwarden.enforce.fake import FakeCpusetV1
from pinwarden.enforce.layout import DesiredLayout, LayoutNames, desired_layout, plan, targets
from pinwarden.enforce.systemd import SystemdOpError
from pinwarden.enforce.v2 import PartitionInvalidError
from pinwarden.errors import EnforceError
from pinwarden.record import replace

VM = "machine/qemu-1-B.libvirt-qemu"


def busy_host() -> FakeCpusetV1:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False), VM: ("0-3", False),
                 f"{VM}/vcpu0": ("3", False), f"{VM}/emulator": ("0-3", False)},
          tasks={f"{VM}/vcpu0": [10], f"{VM}/emulator": [11]})
    # a job already holds CPU 1; the next step gives CPUs 2-3 to another one and moves
    # job "old" away, so the plan has removals, narrowing, bridging and creation
    sync_leases(fake, make_host(), [lease(1, "old")])
    return fake


def next_layout() -> DesiredLayout:
    return desired_layout(make_host(), [lease(2, "new"), lease(3, "new")])


def test_plan_for_rollback_scenario_is_not_trivial() -> None:
    ops = plan(whole(busy_host()), next_layout())
    kinds = {type(op).__name__ for op in ops}
    assert {"Rmdir", "Mkdir", "SetCpus", "SetMems", "SetPartition"} <= kinds
    assert len(ops) >= 10


STEPS = len(plan(whole(busy_host()), next_layout()))


@pytest.mark.parametrize("k", range(STEPS))
def test_failure_at_any_step_restores_the_state_read_before(k: int) -> None:
    fake = busy_host()
    before = whole(fake)
    failing = FailingBackend(fake, fail_at=k, err=errno.EBUSY)
    with pytest.raises(EnforceError) as info:
        apply_layout(failing, next_layout())
    assert whole(fake) == before
    assert "nothing was changed" in info.value.message
    assert "\n" not in info.value.message
    # and the same layout then applies cleanly
    apply_layout(fake, next_layout())
    assert whole(fake)["pinwarden-run-new.partition"].cpus == CpuSet.of([2, 3])


def test_foreign_sibling_holding_a_cpu_is_named_and_nothing_changes() -> None:
    fake = busy_host()
    build(fake, {"batch": ("3", False)})
    before = whole(fake)
    with pytest.raises(EnforceError) as info:
        apply_layout(fake, next_layout())
    message = info.value.message
    assert "CPU 3" in message and "/batch" in message and "not managed by pinwarden" in message
    assert "EINVAL" in message
    assert whole(fake) == before


def test_cpu_held_by_another_exclusive_group_names_it() -> None:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    build(fake, {"other": ("2", True)})
    with pytest.raises(EnforceError) as info:
        sync_leases(fake, make_host(), [lease(2, "J")])
    assert "CPU 2" in info.value.message and "/other" in info.value.message
    assert "exclusively" in info.value.message
    assert set(whole(fake)) == {"", "other"}


def test_populated_group_cannot_lose_all_cpus_enospc() -> None:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    build(fake, {"g": ("1", False)}, tasks={"g": [5]})
    before = whole(fake)
    with pytest.raises(EnforceError) as info:
        execute(fake, before, [SetCpus("g", CpuSet())])
    assert "ENOSPC" in info.value.message and "has tasks" in info.value.message
    assert whole(fake) == before


def test_missing_parent_is_a_clear_error() -> None:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    names = LayoutNames(shared="nowhere/machine")
    with pytest.raises(EnforceError) as info:
        sync_leases(fake, make_host(), [lease(2, "J")], names)
    assert "nowhere" in info.value.message and "does not exist" in info.value.message


class LyingBackend(FakeCpusetV1):
    """Reports effective CPUs the kernel did not grant (as after a concurrent hotplug)."""

    def read_group(self, path: str) -> GroupState:
        state = super().read_group(path)
        return replace(state, effective_cpus=state.effective_cpus - CpuSet.of([3]))

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        snap = super().read_state(paths)
        return Snapshot({p: replace(g, effective_cpus=g.effective_cpus - CpuSet.of([3]))
                         for p, g in snap.groups.items()})


def test_effective_cpus_mismatch_rolls_back() -> None:
    fake = LyingBackend(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False)})
    before = FakeCpusetV1.read_state(fake, [""])
    with pytest.raises(EnforceError) as info:
        sync_leases(fake, make_host(), [lease(3, "J")])
    assert "effective cpus" in info.value.message and "rolled back" in info.value.message
    assert not info.value.partial
    assert FakeCpusetV1.read_state(fake, [""]) == before


def test_no_leases_and_no_tree_means_no_change() -> None:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    result = sync_leases(fake, make_host(), [])
    assert result.ops == () and set(whole(fake)) == {""}


def test_targets_keep_foreign_pins_inside_the_new_pool() -> None:
    fake = busy_host()
    goal = targets(whole(fake), next_layout())
    # the VM used CPUs 0-3: 0 and 1 stay (0 is not leased), its pinned CPU 3 moves there
    assert goal.want["machine"].cpus == CpuSet.of([0, 1])
    assert goal.want[f"{VM}/vcpu0"].cpus == CpuSet.of([0, 1])
    assert goal.want[VM].cpus == CpuSet.of([0, 1])


class RacingFake(FakeCpusetV1):
    """Someone else creates the group between our read and our mkdir (once)."""

    raced = False

    def mkdir(self, path: str) -> None:
        if not self.raced and path == "pinwarden-run-J.partition":
            self.raced = True
            super().mkdir(path)
            super().set_mems(path, CpuSet.of([0]))
            raise CgroupOpError("mkdir", path, errno.EEXIST)
        super().mkdir(path)


def test_a_concurrent_mkdir_is_re_planned() -> None:
    fake = RacingFake(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False)})
    sync_leases(fake, make_host(), [lease(3, "J")])
    assert fake.raced
    assert whole(fake)["pinwarden-run-J.partition"].cpus == CpuSet.of([3])


class StartingVmFake(FakeCpusetV1):
    """libvirt creates a starting VM's cgroup below machine (every CPU, as it copies
    machine's) between our read and our narrowing of machine (once): cgroup v1 refuses
    to narrow a parent below a child's CPUs (EBUSY)."""

    raced = False
    armed = False

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        if self.armed and not self.raced and path == "machine":
            self.raced = True
            super().mkdir("machine/qemu-9-new.libvirt-qemu")
            super().set_mems("machine/qemu-9-new.libvirt-qemu", CpuSet.of([0]))
            super().set_cpus("machine/qemu-9-new.libvirt-qemu",
                             self.read_group("machine").cpus)
        super().set_cpus(path, cpus)


def test_a_vm_cgroup_made_while_machine_narrows_is_re_planned() -> None:
    """An exclusive start while a shared VM starts: its new cgroup made narrowing machine
    fail with a bare "busy (EBUSY)" naming nobody, and the start was refused though the
    CPU was free (hunt).  Now the layout is read and planned again, the new group
    narrowed first."""
    fake = StartingVmFake(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False)})
    fake.armed = True
    sync_leases(fake, make_host(), [lease(3, "J")])
    assert fake.raced
    tree = whole(fake)
    assert tree["pinwarden-run-J.partition"].cpus == CpuSet.of([3])
    assert 3 not in tree["machine/qemu-9-new.libvirt-qemu"].cpus


def test_exclusive_groups_stay_changeable_under_deadline_servers() -> None:
    """6.12+: an exclusive load-balanced cpuset cannot be emptied (EBUSY); pinwarden's
    groups do not load-balance, so leasing and releasing keeps working."""
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"), deadline_servers=True)
    build(fake, {"machine": ("0-3", False)})
    host = make_host()
    sync_leases(fake, host, [lease(2, "A"), lease(3, "B")])
    sync_leases(fake, host, [lease(2, "A")])
    sync_leases(fake, host, [])
    assert set(whole(fake)) == {"", "machine"}
    # a group made exclusive the plain way (load balancing on) is frozen once emptied
    build(fake, {"legacy": ("0", True)})
    fake.set_flag("legacy", "sched_load_balance", True)
    with pytest.raises(CgroupOpError) as info:
        fake.set_cpus("legacy", CpuSet())
    assert info.value.errno == errno.EBUSY


class RefusingFake(FakeCpusetV1):
    """Refuses to make ``pinwarden-run-J.partition`` a partition with ``error`` (after the write
    was undone, as the v2 and systemd backends do)."""

    def __init__(self, error: CgroupOpError) -> None:
        super().__init__(CpuSet.parse_kernel("0-3"))
        self.error = error

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        if path == "pinwarden-run-J.partition" and kind != "member":
            raise self.error
        super().set_partition(path, kind)


@pytest.mark.parametrize("error, words", [
    (PartitionInvalidError("partition", "pinwarden-run-J.partition", value="root",
                           group="pinwarden-run-J.partition", kind="exclusive",
                           reason="Cpu list in cpuset.cpus not exclusive"),
     ["Cpu list in cpuset.cpus not exclusive", "EINVAL"]),
    (SystemdOpError("partition", "pinwarden-run-J.partition",
                    "pinwarden\\x2drun\\x2dJ.slice",
                    "org.freedesktop.DBus.Error.AccessDenied",
                    "Access denied\nby policy", value="root", prop="CPUSetPartition"),
     ["Access denied by policy", "org.freedesktop.DBus.Error.AccessDenied",
      "pinwarden\\x2drun\\x2dJ.slice"]),
])
def test_refusal_carries_the_backends_own_reason(error: CgroupOpError,
                                                 words: list[str]) -> None:
    """The kernel's invalid-partition reason and systemd's answer (with its hint) reach the
    user, on the one line that also says nothing was changed."""
    fake = RefusingFake(error)
    build(fake, {"machine": ("0-3", False)})
    before = whole(fake)
    with pytest.raises(EnforceError) as info:
        sync_leases(fake, make_host(), [lease(3, "J")])
    message = info.value.message
    assert "\n" not in message and "nothing was changed" in message
    for word in words:
        assert word in message, message
    assert whole(fake) == before


class InvalidatingFake(FakeCpusetV1):
    """Reads ``group`` back as an invalid partition once it is exclusive, the way a v2
    kernel reports ``root invalid (REASON)`` after accepting the write."""

    def __init__(self, group: str, reason: str) -> None:
        super().__init__(CpuSet.parse_kernel("0-3"))
        self.group, self.reason = group, reason

    def _mark(self, state: GroupState) -> GroupState:
        if state.path == self.group and state.exclusive:
            return replace(state, partition_error=self.reason)
        return state

    def read_group(self, path: str) -> GroupState:
        return self._mark(super().read_group(path))

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        snap = super().read_state(paths)
        return Snapshot({p: self._mark(g) for p, g in snap.groups.items()})


def test_an_invalid_partition_fails_verification_and_rolls_back() -> None:
    reason = "Cpu list in cpuset.cpus not exclusive"
    fake = InvalidatingFake("pinwarden-run-J.partition", reason)
    build(fake, {"machine": ("0-3", False)})
    before = whole(fake)
    with pytest.raises(EnforceError) as info:
        sync_leases(fake, make_host(), [lease(3, "J")])
    message = info.value.message
    assert "\n" not in message and "rolled back" in message
    assert "pinwarden-run-J.partition" in message and reason in message
    assert whole(fake) == before


class LeftInvalidFake(InvalidatingFake):
    """Linux 6.1: a partition a sibling's write made invalid stays invalid after the
    conflict is gone, until its own ``cpuset.cpus.partition`` is written off and on again
    (tests/lab ``cli.invalid``).  ``invalid`` holds such groups."""

    def __init__(self) -> None:
        super().__init__("", "Cpu list in cpuset.cpus not exclusive")
        self.invalid: set[str] = set()

    def _mark(self, state: GroupState) -> GroupState:
        if state.path in self.invalid and state.exclusive:
            return replace(state, partition_error=self.reason)
        return state

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        super().set_partition(path, kind)
        if kind == "member":
            self.invalid.discard(path)


def test_a_holder_partition_left_invalid_is_switched_off_and_on_by_the_layout() -> None:
    """The systemd story (bookworm, CI): machine.slice, set to every CPU behind pinwarden's
    back between a pass's escape check and its layout, made the holder partition invalid.
    The layout narrowed machine.slice again, but Linux 6.1 keeps a partition invalid after
    the conflict is gone: the verify failed, and the rollback gave machine.slice the leased
    CPU again.  Now the plan switches a partition the kernel reads as invalid off and on
    again."""
    fake = LeftInvalidFake()
    build(fake, {"machine": ("0-3", False)})
    group = "pinwarden-run-J.partition"
    sync_leases(fake, make_host(), [lease(3, "J")])
    fake.invalid.add(group)
    assert whole(fake)[group].partition_error == fake.reason
    result = sync_leases(fake, make_host(), [lease(3, "J")])
    assert [op for op in result.ops if op.path == group] == [
        SetPartition(group, "member"), SetPartition(group, "exclusive")], result.ops
    state = whole(fake)
    assert (state[group].partition, state[group].partition_error) == ("exclusive", None)
    assert state["machine"].cpus == CpuSet.parse_kernel("1-2")
    # a valid partition is left alone
    assert sync_leases(fake, make_host(), [lease(3, "J")]).ops == ()


def test_a_failed_rollback_is_said_and_marked_partial() -> None:
    """The write fails, and so does the rollback: the message says so, and the error is
    marked ``partial`` (the manager then no longer trusts what it last wrote to the shared
    group to tell somebody else's edit)."""

    class Stuck(FailingBackend):
        def _tick(self, action: str, path: str) -> None:
            n = self.calls
            self.calls += 1
            if n >= self.fail_at:  # this write and every one after it
                raise CgroupOpError(action, path, self.err, detail="injected")

    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False)})
    with pytest.raises(EnforceError) as info:
        sync_leases(Stuck(fake, 1), make_host(), [lease(3, "J")])
    assert "ROLLBACK FAILED" in info.value.message and info.value.partial
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False)})
    with pytest.raises(EnforceError) as info:
        sync_leases(FailingBackend(fake, 1), make_host(), [lease(3, "J")])
    assert "nothing was changed" in info.value.message and not info.value.partial
