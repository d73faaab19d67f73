"""Issue #14: cgroups beside a holder partition that can run on leased CPUs (pure planner),
the inotify watcher (on a plain directory tree) and the narrowing adapter (fake tree)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.watch import (
    CgroupWatcher,
    apply_narrowing,
    parse_events,
    read_views,
)
from pinwarden.escape import (
    CgroupView,
    Revalidate,
    SetCpus,
    SetPartition,
    find_escapes,
    plan_narrowing,
)

L = CpuSet.parse_kernel
LEASED = L("1-2")
POOL = L("0,3-5")
HOLDERS = {"pinwarden.partition", "pinwarden.partition/run-J.partition"}


def holder(valid: bool = True) -> list[CgroupView]:
    return [CgroupView("pinwarden.partition", LEASED, L(""), "root", valid),
            CgroupView("pinwarden.partition/run-J.partition", LEASED,
                       LEASED if valid else L(""), "root", valid)]


def test_the_issue_late_cgroup_with_all_cpus_is_narrowed_and_holders_revalidated() -> None:
    # 6.1 after `echo 0-7 > late/cpuset.cpus`: the kernel accepted it and invalidated the
    # holder tree (lab: late_cgroup_explicit)
    groups = [CgroupView("", L(""), L("0-7")), *holder(valid=False),
              CgroupView("late", L("0-7"), L("0-7")),
              CgroupView("system.slice", L(""), L("0-7"))]
    plan = plan_narrowing(groups, LEASED, HOLDERS, POOL)
    assert [e.path for e in plan.escapes] == ["late", "system.slice"]
    assert plan.escapes[0].configured == LEASED
    assert plan.escapes[1].configured == L("")  # inherits: fixed by the revalidation
    assert plan.ops == (SetCpus("late", L("0,3-7")),
                        Revalidate("pinwarden.partition", "root"),
                        Revalidate("pinwarden.partition/run-J.partition", "root"))


def test_holders_and_their_descendants_are_never_escapes() -> None:
    groups = [*holder(), CgroupView("pinwarden.partition/run-J.partition/sub", LEASED, LEASED)]
    assert find_escapes(groups, LEASED, HOLDERS) == []
    assert plan_narrowing(groups, LEASED, HOLDERS, POOL).clean


def test_inheriting_cgroup_kept_off_by_a_valid_partition_is_clean() -> None:
    groups = [*holder(), CgroupView("late", L(""), L("0,3-7"))]
    assert plan_narrowing(groups, LEASED, HOLDERS, POOL).clean


def test_named_but_kept_off_by_the_kernel_is_narrowed_and_said_so() -> None:
    """Linux 7.3 keeps a cgroup that writes leased CPUs into its cpuset.cpus off them while
    the holder partitions stay valid (lab: late_cgroup_explicit); 6.1-6.12 hand them over.
    Still narrowed (a partition that becomes invalid later would hand them over), and the
    reason says which of the two it is."""
    kept = [*holder(), CgroupView("late", L("0-7"), L("0,3-7"))]
    plan = plan_narrowing(kept, LEASED, HOLDERS, POOL)
    assert plan.ops == (SetCpus("late", L("0,3-7")),)
    assert plan.escapes[0].why == ("its cpuset.cpus names leased CPUs 1-2: the kernel keeps "
                                   "it off them only while every holder partition stays "
                                   "valid")
    broken = [*holder(valid=False), CgroupView("late", L("0-7"), L("0-7"))]
    assert plan_narrowing(broken, LEASED, HOLDERS, POOL).escapes[0].why == (
        "its cpuset.cpus names leased CPUs 1-2: the kernel accepted the write and "
        "invalidated the sibling partition")


def test_only_leased_cpus_configured_gets_the_shared_pool() -> None:
    groups = [*holder(False), CgroupView("late", L("1-2"), L("1-2"))]
    plan = plan_narrowing(groups, LEASED, HOLDERS, POOL)
    assert plan.ops[0] == SetCpus("late", POOL)
    assert any("shared pool" in n for n in plan.notes)


def test_late_partition_is_switched_to_member_before_narrowing() -> None:
    groups = [*holder(False), CgroupView("late", L("2-3"), L("2-3"), "root", False)]
    plan = plan_narrowing(groups, LEASED, HOLDERS, POOL)
    assert plan.ops[:2] == (SetPartition("late", "member"), SetCpus("late", L("3")))


def test_exclusive_file_naming_leased_cpus_is_an_escape() -> None:
    groups = [*holder(), CgroupView("late", L("4"), L("4"), exclusive=L("2"))]
    (esc,) = find_escapes(groups, LEASED, HOLDERS)
    assert esc.configured == L("2")


def test_no_cpu_left_anywhere_leaves_it_with_a_note() -> None:
    groups = [CgroupView("late", L("1"), L("1"))]
    plan = plan_narrowing(groups, LEASED, HOLDERS, L("1-2"))
    assert plan.ops == () and plan.escapes and "left as it is" in plan.notes[0]


def test_revalidation_uses_the_requested_word_parents_first() -> None:
    groups = list(reversed(holder(False)))
    plan = plan_narrowing(groups, LEASED, HOLDERS, POOL, holder_words={
        "pinwarden.partition/run-J.partition": "isolated"})
    assert plan.ops == (Revalidate("pinwarden.partition", "root"),
                        Revalidate("pinwarden.partition/run-J.partition", "isolated"))


cpu_sets = st.frozensets(st.integers(0, 7)).map(CpuSet.of)


@given(st.lists(st.tuples(cpu_sets, cpu_sets), max_size=6), cpu_sets)
def test_no_write_ever_names_a_leased_cpu(groups: list[tuple[CpuSet, CpuSet]],
                                          leased: CpuSet) -> None:
    views = [CgroupView(f"g{i}", cpus, eff) for i, (cpus, eff) in enumerate(groups)]
    plan = plan_narrowing(views, leased, HOLDERS, L("0-7"))
    for op in plan.ops:
        if isinstance(op, SetCpus):
            assert op.cpus and op.cpus.isdisjoint(leased)
    # every group whose own cpuset.cpus names a leased CPU gets a write
    named = {v.path for v in views if v.cpus & leased}
    written = {op.path for op in plan.ops if isinstance(op, SetCpus)}
    assert named == written or not (L("0-7") - leased)


# -- the adapter on a fake tree -----------------------------------------------------------

def fake_group(root: Path, path: str, cpus: str, eff: str, part: str | None) -> None:
    d = root / path if path else root
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpuset.cpus.effective").write_text(eff + "\n")
    if path:
        (d / "cpuset.cpus").write_text(cpus + "\n")
    if part is not None:
        (d / "cpuset.cpus.partition").write_text(part + "\n")


def test_read_views_and_apply_on_a_fake_tree(tmp_path: Path) -> None:
    fake_group(tmp_path, "", "", "0-7", None)
    fake_group(tmp_path, "pinwarden.partition", "1-2", "", "root invalid (Cpu list in "
               "cpuset.cpus not exclusive)")
    fake_group(tmp_path, "pinwarden.partition/run-J.partition", "1-2", "1-2",
               "root invalid (Parent is an invalid partition root)")
    fake_group(tmp_path, "late", "0-7", "0-7", "member")
    (tmp_path / "no-cpuset").mkdir()  # a cgroup without the cpuset controller
    views = read_views(tmp_path, ("", "pinwarden.partition"))
    assert [v.path for v in views] == ["", "late", "pinwarden.partition",
                                       "pinwarden.partition/run-J.partition"]
    by = {v.path: v for v in views}
    assert not by["pinwarden.partition"].valid and by["late"].cpus == L("0-7")
    plan = plan_narrowing(views, LEASED, HOLDERS, POOL)
    outcomes = apply_narrowing(tmp_path, plan.ops)
    assert (tmp_path / "late/cpuset.cpus").read_text() == "0,3-7\n"
    # a plain file keeps the last write: member, then root
    assert (tmp_path / "pinwarden.partition/cpuset.cpus.partition").read_text() == "root\n"
    assert all(o.ok for o in outcomes), outcomes


def test_refused_write_is_an_outcome(tmp_path: Path) -> None:
    (out,) = apply_narrowing(tmp_path, [SetCpus("gone", L("3"))])
    assert not out.ok and out.errno is not None


# -- the watcher on a plain directory tree (inotify behaves the same; kernfs is proved in
# the lab: late_cgroup_inotify) -----------------------------------------------------------

def test_parse_events_reads_packed_structs() -> None:
    import struct

    name = b"late\0\0\0\0"
    buf = struct.pack("iIII", 3, 0x40000100, 0, len(name)) + name + \
        struct.pack("iIII", 4, 0x2, 0, 0)
    assert parse_events(buf) == [(3, 0x40000100, "late"), (4, 0x2, "")]


def test_watcher_reports_new_dirs_and_cpuset_writes(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "holder").mkdir()
    with CgroupWatcher(tmp_path, parents=("", "tree")) as w:
        assert w.watched() == ["", "old", "tree", "tree/holder"]
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "cpuset.cpus").write_text("0-7\n")  # before its own watch
        got = [(e.kind, e.path) for e in w.poll(2.0)]
        assert got[0] == ("created", "late")
        (tmp_path / "late" / "cpuset.cpus").write_text("0-7\n")
        (tmp_path / "late" / "cgroup.procs").write_text("1\n")  # not a cpuset file
        (tmp_path / "old" / "cpuset.cpus.exclusive").write_text("3\n")
        (tmp_path / "tree" / "holder" / "cpuset.cpus.partition").write_text("root\n")
        (tmp_path / "tree" / "new").mkdir()
        events = w.poll(2.0)
        kinds = [(e.kind, e.path, e.name) for e in events]
        assert ("cpus", "late", "cpuset.cpus") in kinds
        assert ("cpus", "old", "cpuset.cpus.exclusive") in kinds
        assert ("partition", "tree/holder", "cpuset.cpus.partition") in kinds
        assert ("created", "tree/new", "") in kinds
        assert not any(e.name == "cgroup.procs" for e in events)
        for f in (tmp_path / "late").iterdir():
            f.unlink()
        os.rmdir(tmp_path / "late")
        assert ("removed", "late") in [(e.kind, e.path) for e in w.poll(2.0)]
        assert w.poll(0.05) == []


def test_a_holder_invalid_for_want_of_online_cpus_is_not_revalidated() -> None:
    """A holder none of whose CPUs is online is invalid by hotplug: writing its word
    cannot make it valid (the kernel does once a CPU is back), and the sync said "made a
    valid root partition again" of it and then failed (v2-lab hunt)."""
    groups = [CgroupView("", L(""), L("0,3-7")), *holder(valid=False)]
    assert plan_narrowing(groups, LEASED, HOLDERS, POOL, online=L("0,3-7")).ops == ()
    assert plan_narrowing(groups, LEASED, HOLDERS, POOL, online=L("0-2")).ops == (
        Revalidate("pinwarden.partition", "root"),
        Revalidate("pinwarden.partition/run-J.partition", "root"))

