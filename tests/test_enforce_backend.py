"""The backend contract's shared pieces: the snapshot walk every backend's read_state uses."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import CgroupOpError, GroupState, collect_snapshot

TREE = {"": ("a", "b"), "a": ("x",), "a/x": ("deep",), "a/x/deep": (), "b": ("y",),
        "b/y": ("z",), "b/y/z": ()}


def reader(tree: dict[str, tuple[str, ...]], *, gone: str | None = None,
           broken: str | None = None) -> tuple[list[str], Callable[[str], GroupState]]:
    reads: list[str] = []

    def read_group(path: str) -> GroupState:
        reads.append(path)
        if path == broken:
            raise CgroupOpError("read", path, errno.EIO)
        if path not in tree or path == gone:
            raise CgroupOpError("read", path, errno.ENOENT)
        return GroupState(path=path, cpus=CpuSet.of([0]), mems=CpuSet.of([0]),
                          partition="member", effective_cpus=CpuSet.of([0]),
                          effective_mems=CpuSet.of([0]), populated=False,
                          children=tree[path])

    return reads, read_group


def test_subtree_ancestors_and_their_children_each_read_once() -> None:
    reads, read_group = reader(TREE)
    snap = collect_snapshot(read_group, ["a", "b/y"])
    # a's subtree; b/y's subtree; the root and b (ancestors) with their direct children
    assert set(snap) == {"", "a", "a/x", "a/x/deep", "b", "b/y", "b/y/z"}
    assert sorted(reads) == sorted(set(reads))
    # only the ancestors' children, not their subtrees
    snap = collect_snapshot(reader(TREE)[1], ["b/y/z"])
    assert set(snap) == {"", "a", "b", "b/y", "b/y/z"}


def test_vanished_and_missing_groups_are_absent_other_errors_propagate() -> None:
    _, read_group = reader(TREE, gone="a/x")  # removed by someone between two reads
    snap = collect_snapshot(read_group, ["a", "nowhere/c"])
    assert set(snap) == {"", "a", "b"}
    _, read_group = reader(TREE, broken="a/x/deep")
    with pytest.raises(CgroupOpError) as info:
        collect_snapshot(read_group, ["a"])
    assert info.value.errno == errno.EIO
