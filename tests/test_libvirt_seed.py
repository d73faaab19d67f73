"""The seed failure, reproduced against the real libvirtd + kernel, WITHOUT pinwarden.

VM A is made exclusive on CPU 1 the way the RFC describes (``cpu_exclusive`` on its whole
libvirt cgroup chain: ``machine`` and A's group).  Starting an unpinned VM B then fails,
because libvirt copies ``machine``'s ``cpuset.cpus`` (all CPUs) into B's new group, and the
kernel refuses CPUs a sibling holds exclusively.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest

pytest.register_assert_rewrite("libvirt_env")

import libvirt_env as env  # noqa: E402

pytest_plugins = ["libvirt_env"]
pytestmark = pytest.mark.libvirt

MACHINE = "machine"


def fmt(cpus: frozenset[int]) -> str:
    items = sorted(cpus)
    if items == list(range(items[0], items[-1] + 1)) and len(items) > 1:
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))


def test_exclusive_vm_breaks_unpinned_start_without_pinwarden(domains: env.Domains) -> None:
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        pytest.fail("the seed scenario needs at least 2 CPUs")
    with env.machine_restored():
        _seed_failure(domains)


def _seed_failure(domains: env.Domains) -> None:
    # A host without pinwarden: libvirt's `machine` holds every CPU of the cpuset root.
    # (Earlier tests may have left pinwarden's shared pool there; machine_restored puts
    # that back afterwards.)
    root_cpus = (env.CPUSET / "cpuset.cpus").read_text().strip()
    (env.CPUSET / MACHINE).mkdir(exist_ok=True)
    (env.CPUSET / MACHINE / "cpuset.cpus").write_text(root_cpus)
    domains.create("pwtest-seed-a", vcpupins={0: "1"}, emulatorpin="1", cpuset="1")
    group_a = env.domain_cgroup("pwtest-seed-a")
    assert group_a.startswith(MACHINE + "/"), group_a
    machine_cpus = env.read_cpus(MACHINE)
    assert 1 in machine_cpus and len(machine_cpus) >= 2, fmt(machine_cpus)
    changed: list[str] = []
    try:
        # A's own group: narrow it to CPU 1 (its emulator and vcpu0 groups already are).
        (env.CPUSET / group_a / "cpuset.cpus").write_text("1")
        for path in (MACHINE, group_a):  # exclusive flags on, top-down
            try:
                env.set_cpu_exclusive(path, True)
            except OSError as exc:
                pytest.fail(f"cannot make {path} cpu_exclusive ({exc.strerror}): another "
                            f"exclusive cgroup under the cpuset root overlaps it")
            changed.append(path)
        assert env.cpu_exclusive(MACHINE) and env.cpu_exclusive(group_a)

        with pytest.raises(env.libvirt.libvirtError) as err:
            domains.create("pwtest-seed-b")
        message = str(err.value)
        assert f"Invalid value '{fmt(machine_cpus)}' for 'cpuset.cpus'" in message, message
        assert "Invalid value '0-1' for 'cpuset.cpus'" in message or len(machine_cpus) != 2
    finally:
        for path in reversed(changed):  # exclusive flags off, bottom-up
            with contextlib.suppress(OSError):
                env.set_cpu_exclusive(path, False)
    assert not env.cpu_exclusive(MACHINE)
    conn: Any = domains.conn
    with pytest.raises(env.libvirt.libvirtError):
        conn.lookupByName("pwtest-seed-b")
