"""The pure layout model and planner, executed on the errno-faithful fake cpuset tree."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforce_helpers import build, lease, make_host, whole
from pinwarden.cpuset import CpuSet
from pinwarden.enforce.apply import apply_layout
from pinwarden.enforce.backend import (
    CgroupOpError,
    GroupState,
    Mkdir,
    Op,
    Rmdir,
    SetCpus,
    SetMems,
    SetPartition,
    Snapshot,
    perform,
)
from pinwarden.enforce.fake import FakeCpusetV1
from pinwarden.enforce.layout import (
    LayoutNames,
    desired_layout,
    holder_group_name,
    is_holder_component,
    libvirt_partition,
    order,
    plan,
    targets,
)
from pinwarden.model import Lease, domain_holder, job_holder

VM = "machine/qemu-1-B.libvirt-qemu"


def test_holder_group_names_are_libvirt_safe() -> None:
    assert holder_group_name(domain_holder("qemu", "web01", None)) == \
        "pinwarden-vm-web01.partition"
    assert holder_group_name(job_holder("J"), "pw") == "pw-run-J.partition"
    assert holder_group_name(domain_holder("lxc", "c1", None)) == "pinwarden-lxc-c1.partition"
    uuid = "c7a5fdbd-cdaf-9455-926a-d65c16db1809"
    # a dot would stop libvirt from adding ".partition": the UUID is used instead
    assert holder_group_name(domain_holder("qemu", "a.b", uuid)) == \
        f"pinwarden-vm-{uuid}.partition"
    # a domain named like that UUID (its own is another) gets its own UUID's group: both
    # domains' partitions were one group, each QEMU in it with one holder's CPUs (hunt)
    other = "0d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6"
    names = LayoutNames()
    for shaped in (uuid, uuid.upper(), uuid.replace("-", "")):
        twin = domain_holder("qemu", shaped, other)
        assert holder_group_name(twin) == f"pinwarden-vm-{other}.partition", shaped
        assert libvirt_partition(names, twin) != \
            libvirt_partition(names, domain_holder("qemu", "a.b", uuid))
    assert holder_group_name(domain_holder("qemu", uuid, uuid)) == \
        f"pinwarden-vm-{uuid}.partition"  # its own UUID: the same group either way
    assert holder_group_name(job_holder(uuid)) == f"pinwarden-run-{uuid}.partition"
    hostile = holder_group_name(job_holder("../../x y"))
    assert hostile.startswith("pinwarden-run-") and hostile.endswith(".partition")
    assert "/" not in hostile and " " not in hostile and ".." not in hostile
    names = LayoutNames()
    assert libvirt_partition(names, domain_holder("qemu", "A", None)) == "/pinwarden-vm-A"
    nested = LayoutNames(shared="pwtest.partition/machine", exclusive="pw.partition")
    assert libvirt_partition(nested, domain_holder("qemu", "A", None)) == "/pwtest/pw-vm-A"
    with pytest.raises(ValueError):  # libvirt cannot name a group below "pwtest"
        libvirt_partition(LayoutNames(shared="pwtest/machine"),
                          domain_holder("qemu", "A", None))


def test_holder_group_names_make_slices_systemd_takes() -> None:
    """systemd escapes each '-' of a slice name to '\\x2d' and takes names up to 255
    characters: a 64-character name of dashes passed define and plan, then every start
    (hook, 'pinwarden start', 'pinwarden run') failed with an internal ValueError
    (systemd-lab hunt).  Such a name falls back to the UUID, else a digest."""
    from pinwarden.enforce.systemd import unit_for_path

    uuid = "c7a5fdbd-cdaf-9455-926a-d65c16db1809"
    dashes = "pwtest" + "-" * 57 + "x"
    assert holder_group_name(domain_holder("qemu", dashes, uuid)) == \
        f"pinwarden-vm-{uuid}.partition"
    job = holder_group_name(job_holder("a" + "-" * 62 + "b"))
    assert job.startswith("pinwarden-run-") and "--" not in job
    for name in (dashes, "a" + "-" * 62 + "b", "x" * 64, "-" * 64):
        for holder in (domain_holder("qemu", name, uuid), domain_holder("lxc", name, None),
                       job_holder(name)):
            group = holder_group_name(holder, "a-long-stem-of-dashes")
            assert len(unit_for_path(group)) <= 255, group
    assert holder_group_name(job_holder("x" * 64)) == f"pinwarden-run-{'x' * 64}.partition"


def test_holder_groups_are_recognised_by_name() -> None:
    names = LayoutNames(shared="machine.slice")
    assert names.parent == "" and names.stem == "pinwarden"
    assert names.is_holder("pinwarden-vm-A.partition")
    assert names.is_holder("pinwarden-run-x_1.partition")
    assert not names.is_holder("pinwarden.partition")  # the old tree: legacy, not a holder
    assert not names.is_holder("pinwarden-other-A.partition")
    assert not names.is_holder("machine.slice")
    assert not names.is_holder("sub/pinwarden-vm-A.partition")  # not beside the shared group
    assert is_holder_component("pinwarden-vm-A.partition")
    assert is_holder_component("pinwarden\\x2dvm\\x2dA\\x2db.slice")  # its systemd slice
    assert not is_holder_component("pinwarden-vm\\x2dA.slice")  # below a pinwarden.slice
    assert not is_holder_component("machine-qemu\\x2d1\\x2dA.scope")


def test_layout_names_are_checked() -> None:
    with pytest.raises(ValueError, match="one name"):
        LayoutNames(shared="a", exclusive="a/b")
    with pytest.raises(ValueError):
        LayoutNames(shared="/machine")
    with pytest.raises(ValueError):
        LayoutNames(shared="pinwarden-vm-x.partition")
    with pytest.raises(ValueError):
        LayoutNames(exclusive="")


def test_desired_layout_pools_and_holders() -> None:
    host = make_host("0-3", vm="1-3")
    leases = [lease(2, "J"), lease(3, "V", driver="qemu", role="vcpu0")]
    desired = desired_layout(host, leases)
    assert desired.shared.cpus == CpuSet.of([1])
    assert desired.leased == CpuSet.of([2, 3])
    assert {(s.path, str(s.cpus)) for s in desired.holders} == {
        ("pinwarden-run-J.partition", "2"),
        ("pinwarden-vm-V.partition", "3")}
    nested = desired_layout(host, leases, LayoutNames(shared="pwtest/machine",
                                                      exclusive="pw"))
    assert {s.path for s in nested.holders} == {"pwtest/pw-run-J.partition",
                                                "pwtest/pw-vm-V.partition"}
    # everything leased: the shared pool falls back to the housekeeping CPUs
    full = desired_layout(host, [lease(1, "A"), lease(2, "A"), lease(3, "A")])
    assert full.shared.cpus == CpuSet.of([0]) and full.notes


def test_sibling_holds_are_leased_but_outside_the_holder_group() -> None:
    host = make_host("0-3", vm="1-3")
    desired = desired_layout(host, [lease(2, "V", "qemu", "vcpu0"),
                                    lease(3, "V", "qemu", "sibling-hold")])
    assert desired.holders[0].cpus == CpuSet.of([2])
    assert desired.shared.cpus == CpuSet.of([1])  # the held sibling is nobody's


def vm_fake() -> FakeCpusetV1:
    """machine (0-3) with a running VM: vcpu0 pinned to CPU 3, vcpu1 and emulator unpinned."""
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False), VM: ("0-3", False),
                 f"{VM}/emulator": ("0-3", False), f"{VM}/vcpu0": ("3", False),
                 f"{VM}/vcpu1": ("0-3", False)},
          tasks={f"{VM}/emulator": [100], f"{VM}/vcpu0": [101], f"{VM}/vcpu1": [102]})
    return fake


def test_plan_narrows_vm_cgroups_bottom_up_before_machine_shrinks() -> None:
    fake = vm_fake()
    desired = desired_layout(make_host(), [lease(2, "J"), lease(3, "J")])
    ops = plan(whole(fake), desired)
    index = {op: i for i, op in enumerate(ops)}
    # the pool is CPU 1, plus CPU 0 which the running VM uses (never leased, so it stays)
    rest = CpuSet.of([0, 1])
    narrow_machine = index[SetCpus("machine", rest)]
    # every VM group is narrowed before machine, the deepest first
    for path in (f"{VM}/vcpu0", f"{VM}/vcpu1", f"{VM}/emulator"):
        assert index[SetCpus(path, rest)] < index[SetCpus(VM, rest)]
    assert index[SetCpus(VM, rest)] < narrow_machine
    # the holder group is created beside machine after machine shrank
    group = "pinwarden-run-J.partition"
    assert narrow_machine < index[Mkdir(group)] < index[SetPartition(group, "exclusive")]
    # and the kernel (fake) accepts the sequence as is
    for op in ops:
        perform(fake, op)
    state = whole(fake)
    assert state[f"{VM}/vcpu0"].cpus == rest  # its pinned CPU 3 was leased away
    assert state["pinwarden-run-J.partition"].exclusive
    assert state["pinwarden-run-J.partition"].mems == CpuSet.of([0])


def test_nothing_is_touched_before_pinwarden_leases_anything() -> None:
    fake = vm_fake()
    assert plan(whole(fake), desired_layout(make_host(), [])) == []


def test_release_widens_parents_first_and_removes_empty_groups() -> None:
    fake = vm_fake()
    host = make_host()
    apply_layout(fake, desired_layout(host, [lease(2, "J"), lease(3, "J")]))
    ops = plan(whole(fake), desired_layout(host, []))
    everything = CpuSet.parse_kernel("0-3")
    assert ops.index(Rmdir("pinwarden-run-J.partition")) \
        < ops.index(SetCpus("machine", everything))
    assert ops.index(SetCpus("machine", everything)) < ops.index(SetCpus(VM, everything))
    for op in ops:
        perform(fake, op)
    state = whole(fake)
    # groups that followed machine follow it back, the moved vCPU with them
    assert state[VM].cpus == everything
    assert state[f"{VM}/vcpu1"].cpus == everything
    assert "pinwarden-run-J.partition" not in state
    # and with nothing leased, nothing more to do
    assert plan(state, desired_layout(host, [])) == []


def test_a_group_with_cpus_of_its_own_gets_them_back_from_its_record() -> None:
    """vcpu0 pinned to CPU 3 and an operator's sub-partition on CPU 0: a lease of 2-3
    moves vcpu0 onto what ``machine`` keeps, and at the release both were taken for
    followers of ``machine`` (each had its narrowed CPUs) and given 0-3 (real-libvirt
    hunt).  With the CPUs they had before the first lease (the manager's records) each
    follows ``machine`` from those: vcpu0 gets 3 back, the sub-partition keeps 0; the
    groups that had ``machine``'s CPUs follow it back as before."""
    fake = vm_fake()
    build(fake, {"machine/sub.partition": ("0", False)})
    host = make_host()
    originals = {f"{VM}/vcpu0": CpuSet.of([3]), "machine/sub.partition": CpuSet.of([0])}
    apply_layout(fake, desired_layout(host, [lease(2, "J"), lease(3, "J")],
                                      originals=originals))
    during = whole(fake)
    assert during[f"{VM}/vcpu0"].cpus == CpuSet.of([0, 1])  # 3 leased: machine's CPUs
    assert during["machine/sub.partition"].cpus == CpuSet.of([0])
    apply_layout(fake, desired_layout(host, [], originals=originals))
    after = whole(fake)
    assert after[f"{VM}/vcpu0"].cpus == CpuSet.of([3])
    assert after["machine/sub.partition"].cpus == CpuSet.of([0])
    assert after[f"{VM}/vcpu1"].cpus == after[VM].cpus == CpuSet.parse_kernel("0-3")
    # without a record, one that has what the lease left machine is taken for a follower
    # (the hunt's: a lease of 1-3 narrowed machine to 0, the sub-partition's own CPU)
    leases = [lease(1, "J"), lease(2, "J"), lease(3, "J")]
    for kept in ({}, {"machine/sub.partition": CpuSet.of([0])}):
        fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
        build(fake, {"machine": ("0-3", False), "machine/sub.partition": ("0", False)})
        apply_layout(fake, desired_layout(host, leases, originals=kept))
        apply_layout(fake, desired_layout(host, [], originals=kept))
        assert whole(fake)["machine/sub.partition"].cpus == \
            (CpuSet.of([0]) if kept else CpuSet.parse_kernel("0-3"))


def _partition_emptied(ops: list[Op], before: Snapshot) -> list[Op]:
    """Operations that set no CPU on a group that is a partition at that moment."""
    kind = {p: before[p].partition for p in before}
    bad: list[Op] = []
    for op in ops:
        if isinstance(op, Mkdir):
            kind[op.path] = "member"
        elif isinstance(op, SetPartition):
            kind[op.path] = op.kind
        elif isinstance(op, SetCpus) and not op.cpus and kind.get(op.path, "member") != "member":
            bad.append(op)
    return bad


@pytest.mark.parametrize("last", [[], [lease(2, "K", "qemu", "vcpu0")]])
def test_a_partition_is_never_emptied(last: list[Lease]) -> None:
    """Emptying a partition root loses its CPUs until reboot (v2, 6.1: the v2 backend
    refuses it, EBUSY) or is refused by the kernel (6.12+): a holder whose last lease goes
    is removed, and the shared partition gets its CPUs back."""
    fake = vm_fake()
    host = make_host()
    apply_layout(fake, desired_layout(host, [lease(2, "J"), lease(3, "J")]))
    before = whole(fake)
    ops = plan(before, desired_layout(host, last))
    assert _partition_emptied(ops, before) == []
    apply_layout(fake, desired_layout(host, last))
    state = whole(fake)
    assert "pinwarden-run-J.partition" not in state
    if last:
        assert state["pinwarden-vm-K.partition"].cpus == CpuSet.of([2])
        assert state["machine"].cpus == CpuSet.of([0, 1, 3])
    else:
        assert state["machine"].cpus == CpuSet.parse_kernel("0-3")


def test_last_release_of_a_load_balanced_exclusive_tree_on_6_12() -> None:
    """v1, Linux 6.12+: an exclusive, load-balanced cpuset (made by an older pinwarden, or
    by hand) cannot be emptied (EBUSY).  The planner removes it instead, so the release
    needs no flag juggling by its callers — the one exclusive tree older pinwardens made
    (``pinwarden.partition/vm-A.partition``) too."""
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"), deadline_servers=True)
    build(fake, {"machine": ("0-1", False), "pinwarden.partition": ("2-3", False),
                 "pinwarden.partition/vm-A.partition": ("2-3", False)})
    for path in ("pinwarden.partition", "pinwarden.partition/vm-A.partition"):
        fake.set_flag(path, "cpu_exclusive", True)  # load balancing stays on
    with pytest.raises(CgroupOpError) as info:  # the quirk itself
        fake.set_cpus("pinwarden.partition/vm-A.partition", CpuSet())
    assert info.value.errno == errno.EBUSY
    apply_layout(fake, desired_layout(make_host(), []))
    state = whole(fake)
    assert "pinwarden.partition" not in state
    assert state["machine"].cpus == CpuSet.parse_kernel("1-3")  # the VM CPUs, all back


def test_an_old_tree_with_foreign_tasks_in_itself_is_kept() -> None:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))  # as an older pinwarden left it:
    build(fake, {"machine": ("0-2", False), "pinwarden.partition": ("3", True)},
          tasks={"pinwarden.partition": [77]})
    result = apply_layout(fake, desired_layout(make_host(), [lease(2, "J")]))
    state = result.after
    assert state["pinwarden.partition"].cpus == CpuSet.of([3])  # kept, as it is
    assert state["pinwarden.partition"].exclusive
    assert state["machine"].cpus == CpuSet.of([1])  # the VM CPUs neither leased nor kept
    fake.exit(77)
    apply_layout(fake, desired_layout(make_host(), []))
    assert "pinwarden.partition" not in whole(fake)
    assert whole(fake)["machine"].cpus == CpuSet.parse_kernel("1-3")


def test_stale_group_with_tasks_is_kept() -> None:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    host = make_host()
    apply_layout(fake, desired_layout(host, [lease(3, "old")]))
    fake.attach_thread("pinwarden-run-old.partition", 55)
    result = apply_layout(fake, desired_layout(host, [lease(2, "new")]))
    state = result.after
    assert state["pinwarden-run-old.partition"].cpus == CpuSet.of([3])
    assert state["pinwarden-run-new.partition"].cpus == CpuSet.of([2])
    assert state["machine"].cpus == CpuSet.of([1])
    fake.exit(55)
    apply_layout(fake, desired_layout(host, [lease(2, "new")]))
    assert "pinwarden-run-old.partition" not in whole(fake)
    # groups that only look alike are not pinwarden's: never touched
    build(fake, {"pinwarden-run-x": ("1", False), "other-vm-A.partition": ("1", False)})
    apply_layout(fake, desired_layout(host, []))
    assert {"pinwarden-run-x", "other-vm-A.partition"} <= set(whole(fake))


holders = st.sampled_from(["a", "b", "c"])
lease_sets = st.dictionaries(st.sampled_from([1, 2, 3]), holders, max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(lease_sets, min_size=1, max_size=6),
       pins=st.lists(st.sampled_from(["0-3", "1", "2", "3", "2-3", "0,3"]), min_size=3,
                     max_size=3))
def test_any_sequence_of_layouts_is_reached_without_kernel_refusal(
        steps: list[dict[int, str]], pins: list[str]) -> None:
    """Random lease changes beside a running VM with random pins: every plan is accepted
    by the (kernel-faithful) fake, in order, and reaches the desired state."""
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"), deadline_servers=True)
    build(fake, {"machine": ("0-3", False), VM: ("0-3", False),
                 f"{VM}/emulator": (pins[0], False), f"{VM}/vcpu0": (pins[1], False),
                 f"{VM}/vcpu1": (pins[2], False)},
          tasks={f"{VM}/emulator": [1], f"{VM}/vcpu0": [2], f"{VM}/vcpu1": [3]})
    host = make_host()
    for step in steps:
        leases = [lease(cpu, name) for cpu, name in step.items()]
        desired = desired_layout(host, leases)
        apply_layout(fake, desired)  # raises EnforceError on any refusal or mismatch
        state = whole(fake)
        leased = CpuSet.of(step)
        assert desired.shared.cpus <= state["machine"].cpus
        assert state["machine"].cpus.isdisjoint(leased)
        for spec in desired.holders:
            assert state[spec.path].cpus == spec.cpus and state[spec.path].exclusive
        for path in state.subtree("machine"):
            assert state[path].cpus.isdisjoint(leased)
            assert state[path].cpus  # populated VM groups never end up empty


def test_a_deferred_holder_becomes_a_partition_once_something_runs_there() -> None:
    """libvirt's LXC controller pins itself to the domain's CPUs before it joins its
    cgroup: on cgroup v2 its group is a member with explicit CPUs until the container runs
    in it (the shared group excludes those CPUs all along)."""
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"))
    build(fake, {"machine": ("0-3", False)})
    ct = domain_holder("lxc", "ct", None)
    leases = [Lease(2, ct, "vcpu0", 0.0)]
    desired = desired_layout(make_host(), leases, deferred=frozenset({ct}))
    group = "pinwarden-lxc-ct.partition"
    assert desired.holders[0].when_populated
    apply_layout(fake, desired)
    state = whole(fake)
    assert (state[group].partition, state[group].cpus) == ("member", CpuSet.of([2]))
    assert state["machine"].cpus == CpuSet.of([1, 3])
    build(fake, {f"{group}/ct.libvirt-lxc": ("2", False)},
          tasks={f"{group}/ct.libvirt-lxc": [42]})
    apply_layout(fake, desired)
    assert whole(fake)[group].partition == "exclusive"
    # and an undeferred holder is a partition from the start
    apply_layout(fake, desired_layout(make_host(), [*leases, lease(3, "J")],
                                      deferred=frozenset({ct})))
    assert whole(fake)["pinwarden-run-J.partition"].partition == "exclusive"


def test_shared_group_that_inherits_its_memory_nodes_keeps_inheriting() -> None:
    """cgroup v2: libvirt's machine (and systemd's machine.slice) name no memory nodes —
    empty means the parent's.  Leasing and releasing leave that as found: pinwarden's own
    holder group gets explicit nodes, the shared group is never given any (it was written
    the root's nodes at the first lease and kept them after the last)."""
    def group(path: str, cpus: str, mems: str, children: tuple[str, ...] = ()) -> GroupState:
        return GroupState(path, CpuSet.parse_kernel(cpus), CpuSet.parse_kernel(mems),
                          "member", CpuSet.parse_kernel(cpus or "0-3"), CpuSet.of([0]),
                          False, children)
    current = Snapshot({"": group("", "0-3", "0", ("machine",)),
                        "machine": group("machine", "", "")})
    goal = targets(current, desired_layout(make_host(), [lease(3, "J")]))
    assert goal.want["machine"].mems == CpuSet()
    assert goal.want["pinwarden-run-J.partition"].mems == CpuSet.of([0])
    assert not any(isinstance(op, SetMems) for op in order(current, goal)
                   if getattr(op, "path", "") == "machine")


def test_an_inheriting_group_that_holds_what_it_inherits_verifies() -> None:
    """cgroup v2: the shared group set back to inherit (no CPUs of its own) while VMs run
    below it holds its parent's CPUs instead (the kernel refuses the empty value:
    test_lab_v2); that is what was asked.  A group left with CPUs it does not use all of,
    or with CPUs where CPUs were asked, is not."""
    from pinwarden.enforce.layout import Target, Targets, verify

    def state(cpus: str, effective: str) -> Snapshot:
        return Snapshot({"machine": GroupState(
            path="machine", cpus=CpuSet.parse_kernel(cpus), mems=CpuSet.parse("0"),
            partition="member", effective_cpus=CpuSet.parse_kernel(effective),
            effective_mems=CpuSet.parse("0"), populated=False)})

    inherit = Targets({"machine": Target(CpuSet(), CpuSet.parse("0"), "member")})
    assert verify(state("", "0-3"), inherit) == []
    assert verify(state("0-3", "0-3"), inherit) == []
    assert verify(state("1-5", "1-3"), inherit) == [
        "machine has cpus 1-5, expected (none)"]
    narrow = Targets({"machine": Target(CpuSet.parse("1-3"), CpuSet.parse("0"), "member")})
    assert verify(state("0-3", "0-3"), narrow) == ["machine has cpus 0-3, expected 1-3"]


def test_offline_cpus_of_a_holder_are_no_layout_the_kernel_refused() -> None:
    """A leased CPU offline (cgroup v2): it is in no effective set, and a holder partition
    with none of its CPUs online is invalid ("No cpu available due to hotplug") until one
    comes back, which the kernel sees to itself.  Verified as refusals, they failed every
    layout change — a job's end, a new job, sync — while the CPU was offline (v2-lab
    hunt); and the plan does not toggle such a partition's word to revalidate it."""
    from pinwarden.enforce.layout import Target, Targets, order, verify

    def holder(cpus: str, effective: str, error: str | None) -> Snapshot:
        return Snapshot({"h.partition": GroupState(
            path="h.partition", cpus=CpuSet.parse(cpus), mems=CpuSet.parse("0"),
            partition="root", effective_cpus=CpuSet.parse_kernel(effective),
            effective_mems=CpuSet.parse("0"), populated=True, partition_error=error)})

    def goal(cpus: str, online: str | None) -> Targets:
        return Targets({"h.partition": Target(CpuSet.parse(cpus), CpuSet.parse("0"),
                                              "root")},
                       online=None if online is None else CpuSet.parse(online))

    hotplug = "root invalid (No cpu available due to hotplug)"
    one_off = holder("4-5", "4", None)  # CPU 5 of the two offline
    assert verify(one_off, goal("4-5", "0-4,6-7")) == []
    assert verify(one_off, goal("4-5", None)) == [
        "h.partition has effective cpus 4, expected 4-5"]  # (online unknown: as before)
    all_off = holder("4", "0-3,6-7", hotplug)  # its only CPU offline
    assert verify(all_off, goal("4", "0-3,5-7")) == []
    assert order(all_off, goal("4", "0-3,5-7")) == []
    assert verify(all_off, goal("4", "0-7")) != []  # online, and invalid: a refusal
    overlapped = holder("4", "0-3,6-7", "root invalid (Cpu list in cpuset.cpus not exclusive)")
    assert [type(op).__name__ for op in order(overlapped, goal("4", "0-7"))] == \
        ["SetPartition", "SetPartition"]  # (member, then root again: revalidated)



def test_the_cpus_a_layout_falls_short_of_are_where_to_look_for_their_holder() -> None:
    """``short_cpus``: what a group was to have and does not (offline CPUs left out), and
    the CPUs of a partition the kernel reports invalid; what the error then asks the
    backend about (the partitions of somebody else's that hold them: test_lab_v2)."""
    from pinwarden.enforce.apply import held_elsewhere
    from pinwarden.enforce.backend import HeldBy
    from pinwarden.enforce.layout import Target, Targets, short_cpus

    def group(path: str, cpus: str, effective: str, error: str | None = None) -> GroupState:
        return GroupState(path=path, cpus=CpuSet.parse(cpus), mems=CpuSet.parse("0"),
                          partition="member" if error is None else "exclusive",
                          effective_cpus=CpuSet.parse_kernel(effective),
                          effective_mems=CpuSet.parse("0"), populated=False,
                          partition_error=error)

    after = Snapshot({"machine": group("machine", "2-5", "2-4"),
                      "h.partition": group("h.partition", "6", "6", "Cpu list not exclusive"),
                      "ok": group("ok", "1", "1")})
    want = {p: Target(s.cpus, s.mems, s.partition) for p, s in after.groups.items()}
    assert short_cpus(after, Targets(want), ["machine", "ok"]) == CpuSet.parse("5")
    assert short_cpus(after, Targets(want), after.groups) == CpuSet.parse("5-6")
    assert short_cpus(after, Targets(want, online=CpuSet.parse("0-4,6")),
                      ["machine"]) == CpuSet()  # CPU 5 offline: nobody holds it
    assert held_elsewhere([]) == ""
    said = held_elsewhere([HeldBy("rt", "/sys/fs/cgroup/rt", "isolated", CpuSet.parse("5"))])
    assert said == (": CPU 5 is held by the cgroup partition /sys/fs/cgroup/rt (isolated), "
                    "which is not pinwarden's (make it an ordinary cgroup again, 'echo member "
                    "> /sys/fs/cgroup/rt/cpuset.cpus.partition', or leave CPU 5 out of the "
                    "VM CPUs)")
