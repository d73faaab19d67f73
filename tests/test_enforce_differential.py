"""The fake cpuset tree against the real kernel: same random operations, same answers.

Two places: this host's cgroup v1 cpuset hierarchy (in a ``pwtest-diff-PID-N`` subtree; its
base can be exclusive only when no sibling cgroup holds CPUs, so exclusivity is mostly
exercised in the guest), and a fresh virtme-ng guest with 4 CPUs where the base is always
exclusive.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from differential import run
from guest import guest_run
from pinwarden.mounts import read_mounts

pytestmark = pytest.mark.kernel


def _cpuset_mount() -> Path:
    mount = read_mounts(Path("/")).v1("cpuset")
    if mount is None:
        pytest.fail("no cgroup v1 cpuset hierarchy is mounted on this host")
    return mount


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_fake_matches_this_host_kernel(seed: int) -> None:
    report = run(_cpuset_mount(), seed, 300, f"pwtest-diff-{os.getpid()}-{seed}",
                 exclusive_base=True)
    assert report["mismatch"] is None, report
    assert report["steps"] == 300
    outcomes = Counter(report["outcomes"])
    # a meaningful run: many successes and the kernel's various refusals
    assert outcomes["ok"] >= 30
    assert {"EEXIST", "ENOSPC", "EBUSY", "EACCES", "ERANGE"} <= set(outcomes), outcomes


@pytest.mark.slow
def test_fake_matches_a_fresh_kernel_with_exclusive_cpusets() -> None:
    result = guest_run()
    assert result.ok, f"{result.why}\n{result.output[-3000:]}"
    assert result.differential, result.output[-3000:]
    total: Counter[str] = Counter()
    for report in result.differential:
        assert report["mismatch"] is None, report
        assert report["exclusive_base"] == ["ok", "ok"], report
        total.update(report["outcomes"])
    # the exclusivity rules were exercised: sibling overlaps refused with EINVAL
    assert total["EINVAL"] >= 3 and total["ok"] >= 100, total
