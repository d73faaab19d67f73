"""cgroup v2 backend: the pure parts (no kernel needed).

The backend's behaviour on a real kernel (partitions, invalid states, hotplug, rollback) is
checked in the virtme-ng lab, tests/test_lab_v2.py; a directory tree imitating cgroupfs
would only test our imitation.  Here: parsing and wording only.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pinwarden.enforce.backend import CgroupBackend, CgroupOpError
from pinwarden.enforce.v2 import (
    CgroupV2Backend,
    PartitionInvalidError,
    errno_for_reason,
    invalid_text,
    parse_partition,
)
from pinwarden.errors import HostError


@pytest.mark.parametrize(("text", "expected"), [
    ("member\n", ("member", None)),
    ("root\n", ("exclusive", None)),
    ("isolated\n", ("isolated", None)),
    ("root invalid (Cpu list in cpuset.cpus not exclusive)\n",
     ("exclusive", "Cpu list in cpuset.cpus not exclusive")),
    ("isolated invalid (Parent is not a partition root)\n",
     ("isolated", "Parent is not a partition root")),
    ("root invalid\n", ("exclusive", "invalid")),  # kernels before 6.1 give no reason
])
def test_parse_partition(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize("text", ["", "bogus", "root valid", "rootinvalid", "root invalidx",
                                  "root invalid (unclosed", "root invalid reason"])
def test_parse_partition_refuses_unknown_values(text: str) -> None:
    with pytest.raises(ValueError, match=r"cpuset\.cpus\.partition"):
        parse_partition(text)


@pytest.mark.parametrize("text", [
    "root invalid (Cpu list in cpuset.cpus not exclusive)",
    "isolated invalid (No cpu available due to hotplug)",
    "root invalid",
])
def test_invalid_text_round_trips(text: str) -> None:
    kind, reason = parse_partition(text)
    assert reason is not None
    assert invalid_text(kind, reason) == text


@pytest.mark.parametrize(("reason", "err"), [
    ("Cpu list in cpuset.cpus not exclusive", errno.EINVAL),
    ("Parent is not a partition root", errno.EACCES),
    ("Parent is an invalid partition root", errno.EACCES),
    ("Parent unable to distribute cpu downstream", errno.ENOSPC),
    ("No cpu available due to hotplug", errno.EINVAL),
    ("something a future kernel says", errno.EINVAL),
])
def test_errno_for_reason_matches_cgroup_v1(reason: str, err: int) -> None:
    assert errno_for_reason(reason) == err


def test_partition_invalid_error_names_group_and_kernel_words() -> None:
    exc = PartitionInvalidError("partition", "pinwarden.partition/run-J.partition",
                                value="root", group="pinwarden.partition/run-J.partition",
                                kind="exclusive", reason="Parent is not a partition root")
    assert isinstance(exc, CgroupOpError)
    assert exc.errno == errno.EACCES
    text = str(exc)
    assert "\n" not in text
    assert text.startswith("partition pinwarden.partition/run-J.partition = 'root': EACCES")
    assert "'root invalid (Parent is not a partition root)'" in text
    other = PartitionInvalidError("cpus", "machine", value="0-3", group="pinwarden.partition",
                                  kind="exclusive", reason="Cpu list in cpuset.cpus not "
                                  "exclusive")
    assert "made pinwarden.partition invalid" in str(other)


def test_backend_satisfies_the_protocol(tmp_path: Path) -> None:
    assert isinstance(CgroupV2Backend(tmp_path), CgroupBackend)
    assert CgroupV2Backend(tmp_path).kind == "v2"


@pytest.mark.parametrize("path", ["/abs", "a/", "a//b", "a/../b", "..", "./a"])
def test_paths_outside_the_tree_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(CgroupOpError) as info:
        CgroupV2Backend(tmp_path).read_group(path)
    assert info.value.errno == errno.EINVAL


def _mountinfo(root: Path, line: str, controllers: str | None) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(line + "\n")
    if controllers is not None:
        (root / "sys/fs/cgroup").mkdir(parents=True)
        (root / "sys/fs/cgroup/cgroup.controllers").write_text(controllers + "\n")


CGROUP2 = "30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw"


def test_from_mounts_finds_the_cgroup2_mount(tmp_path: Path) -> None:
    _mountinfo(tmp_path, CGROUP2, "cpuset cpu io memory pids")
    assert CgroupV2Backend.from_mounts(tmp_path).mount == tmp_path / "sys/fs/cgroup"


def test_from_mounts_without_cpuset_controller_says_why(tmp_path: Path) -> None:
    _mountinfo(tmp_path, CGROUP2, "cpu io memory pids")
    with pytest.raises(HostError, match="no cpuset controller"):
        CgroupV2Backend.from_mounts(tmp_path)


def test_from_mounts_without_cgroup2(tmp_path: Path) -> None:
    _mountinfo(tmp_path, "25 22 0:22 / /proc rw - proc proc rw", None)
    with pytest.raises(HostError, match="no cgroup2 hierarchy"):
        CgroupV2Backend.from_mounts(tmp_path)


def test_turning_the_cpuset_controller_off_loses_no_setting() -> None:
    """The root's ``-cpuset`` takes every child's ``cpuset.*`` files with it: only where
    each child just inherits, as a member, and none enables it further down (the kernel
    would refuse with EBUSY, and libvirt's groups below rely on it)."""
    from pinwarden.enforce.v2 import cpuset_setting_lost

    plain = {"cgroup.subtree_control": "memory pids\n", "cpuset.cpus": "\n",
             "cpuset.mems": "\n", "cpuset.cpus.exclusive": "\n",
             "cpuset.cpus.partition": "member\n"}
    assert cpuset_setting_lost({}) is None
    assert cpuset_setting_lost({"machine": plain, "old": {**plain, "cpuset.cpus.exclusive":
                                                           None}}) is None
    assert cpuset_setting_lost({"machine": {**plain, "cgroup.subtree_control": "cpuset"}}) \
        == "/machine enables it for its own children"
    assert cpuset_setting_lost({"a": plain, "b": {**plain, "cpuset.cpus": "0-1\n"}}) == \
        "/b has cpuset.cpus 0-1"
    assert cpuset_setting_lost({"b": {**plain, "cpuset.mems": "0\n"}}) == \
        "/b has cpuset.mems 0"
    assert cpuset_setting_lost({"b": {**plain, "cpuset.cpus.partition": "isolated invalid"}}) \
        == "/b is a partition (isolated)"
