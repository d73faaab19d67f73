"""Whether a holder's cgroup keeps its leases (:mod:`pinwarden.holdergroup`): the one
judgement ``status`` and ``audit`` both make (each from its own reading: test_cli_host,
test_audit; on real kernels test_run_host and test_lab_v2)."""

from __future__ import annotations

from pinwarden.audit import CgroupInfo
from pinwarden.cpuset import CpuSet
from pinwarden.holdergroup import NOT_EXCLUSIVE, GroupSeen, Invalid, judge, not_kept, off_lease

C = CpuSet.parse


def test_a_group_that_keeps_its_leases_is_fine() -> None:
    assert judge(C("2-3"), GroupSeen(C("2-3"), "root", None), C("0-3")) is None
    assert judge(C("2-3"), GroupSeen(C("2-3"), None, True), C("0-3")) is None


def test_what_the_kernel_does_not_keep_is_said_in_its_words() -> None:
    reason = "root invalid (Cpu list in cpuset.cpus not exclusive)\n"
    assert judge(C("2"), GroupSeen(C("2"), reason), None) == Invalid(reason.strip(), None)
    assert judge(C("2"), GroupSeen(C("2"), None, False), None) == Invalid(NOT_EXCLUSIVE, None)


def test_cpus_moved_off_the_lease_count_only_online_and_readable() -> None:
    moved = GroupSeen(C("0"), "member")
    assert judge(C("2-3"), moved, C("0-3")) == Invalid(None, C("2-3"))
    assert judge(C("2-3"), moved, C("0-2")) == Invalid(None, C("2"))  # CPU 3 offline
    assert judge(C("2-3"), moved, None) is None  # not asked
    assert judge(C("2-3"), GroupSeen(None), C("0-3")) is None  # unreadable: nothing said


def test_a_group_gone_is_said() -> None:
    assert judge(C("2"), None, C("0-3")) == Invalid(None, None, gone=True)
    assert Invalid(None, None, gone=True).to_json() == {
        "partition_invalid": None, "off_lease": None, "group_missing": True,
        "group_unseen": False}
    assert Invalid(None, None, unseen=True).to_json()["group_unseen"] is True


def test_audits_reading_is_judged_the_same_way() -> None:
    """audit hands its own snapshot values to the same helpers."""
    group = CgroupInfo(path="/h.partition", cpus=C("0"), effective=C("0"), populated=True,
                       partition="isolated invalid (Parent is not a partition root)")
    assert not_kept(group) == "isolated invalid (Parent is not a partition root)"
    assert off_lease(C("2-3"), group, C("0-3")) == C("2-3")
    v1 = CgroupInfo(path="/h", cpus=C("2"), effective=C("2"), populated=True, exclusive=False)
    assert not_kept(v1) == NOT_EXCLUSIVE
