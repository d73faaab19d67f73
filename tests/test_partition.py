"""Partition modes on synthetic roots (v1 and v2 cgroup layouts), the mount table reader,
and read_partition against the real cgroup v1 cpuset hierarchy of this machine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostroot import HostSpec, build_host, make_cgroup, mount_cgroups, write
from pinwarden.config import Config
from pinwarden.cpuset import CpuSet
from pinwarden.errors import HostError
from pinwarden.mounts import parse_mountinfo, read_mounts
from pinwarden.partition import (
    VmCgroup,
    decide_partition,
    default_reserve,
    load_host,
    read_partition,
    shared_pool,
)
from pinwarden.record import replace
from pinwarden.topology import Topology, read_topology

V1 = "sys/fs/cgroup/cpuset"
V2 = "sys/fs/cgroup"


@pytest.fixture
def host8(tmp_path: Path) -> Path:
    """8 CPUs, no SMT, cgroup v1 with the cpuset hierarchy, nothing isolated."""
    build_host(tmp_path, HostSpec(cpus=8))
    mount_cgroups(tmp_path, cpus="0-7")
    return tmp_path


def cs(text: str) -> CpuSet:
    return CpuSet.parse_kernel(text)


def check_invariants(root: Path, config: Config | None = None) -> None:
    host = load_host(root, config or Config())
    part, online = host.partition, host.topology.online
    assert part.vm_cpus | part.host_cpus == online
    assert part.vm_cpus.isdisjoint(part.host_cpus)
    assert part.reason and "\n" not in part.reason


# -- isolcpus -----------------------------------------------------------------------------


def test_isolcpus_auto(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, isolated="6-7"))
    mount_cgroups(tmp_path, cpus="0-7")
    make_cgroup(tmp_path, V1, "machine", "2-7")  # isolcpus wins over the cgroup
    part = load_host(tmp_path, Config()).partition
    assert (part.mode, part.vm_cpus, part.host_cpus) == ("isolcpus", cs("6-7"), cs("0-5"))
    assert part.reason == "isolcpus=6-7 on the kernel command line"
    assert part.cgroup is None
    check_invariants(tmp_path)


def test_a_host_reserve_another_mode_does_not_use_is_said_to_be_unused(
        tmp_path: Path) -> None:
    """``host_reserve`` keeps CPUs for the OS in mode ``none`` only; where isolcpus= (or a
    restricted cgroup) decides the housekeeping CPUs it was ignored without a word."""
    build_host(tmp_path, HostSpec(cpus=8, isolated="6-7"))
    part = load_host(tmp_path, Config(host_reserve=cs("0-1"))).partition
    assert (part.mode, part.vm_cpus, part.host_cpus) == ("isolcpus", cs("6-7"), cs("0-5"))
    assert part.reason == ("isolcpus=6-7 on the kernel command line; host_reserve 0-1 is "
                           "not used: it applies in partition mode none")
    assert load_host(tmp_path, Config()).partition.reason == \
        "isolcpus=6-7 on the kernel command line"


def test_isolcpus_from_cmdline_with_flags(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4, cmdline="ro isolcpus=domain,managed_irq,2-3"))
    (tmp_path / "sys/devices/system/cpu/isolated").unlink()
    part = load_host(tmp_path, Config()).partition
    assert (part.mode, part.vm_cpus, part.host_cpus) == ("isolcpus", cs("2-3"), cs("0-1"))


def test_isolcpus_offline_cpu_is_not_a_vm_cpu(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, isolated="6-7"))
    write(tmp_path, "sys/devices/system/cpu/online", "0-6\n")
    part = load_host(tmp_path, Config()).partition
    assert part.vm_cpus == cs("6") and part.host_cpus == cs("0-5")
    assert "7 offline" in part.reason


def test_isolcpus_mode_without_isolated_cpus_is_an_error(host8: Path) -> None:
    with pytest.raises(HostError, match="isolcpus is configured but no online CPU is isolated"):
        load_host(host8, Config(mode="isolcpus"))


# -- cgroup v1 ----------------------------------------------------------------------------


def test_cgroup_v1_auto(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "2-7")
    part = load_host(host8, Config()).partition
    assert (part.mode, part.vm_cpus, part.host_cpus) == ("cgroup", cs("2-7"), cs("0-1"))
    assert part.cgroup == "machine"
    assert part.reason == "cpuset of cgroup machine (v1) is 2-7"
    check_invariants(host8)


def test_cgroup_v1_effective_cpus_beat_cpus(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "0-7", effective="3-7")
    assert load_host(host8, Config()).partition.vm_cpus == cs("3-7")


def test_cgroup_v1_falls_back_to_cpuset_cpus(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "4-7")
    (host8 / V1 / "machine/cpuset.effective_cpus").unlink()
    assert load_host(host8, Config()).partition.vm_cpus == cs("4-7")


def test_cgroup_covering_every_cpu_restricts_nothing(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "0-7")
    part = load_host(host8, Config()).partition
    assert part.mode == "none" and part.vm_cpus == cs("1-7")
    assert "covers every online CPU" in part.reason


def test_cgroup_with_empty_cpuset_restricts_nothing(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "")
    part = load_host(host8, Config()).partition
    assert part.mode == "none" and "empty cpuset" in part.reason


def test_custom_cgroup_names(host8: Path) -> None:
    make_cgroup(host8, V1, "vms", "4-7")
    make_cgroup(host8, V1, "vms-leased", "3")  # another tree's CPUs are not the partition's
    config = Config(cgroup_v1="vms", exclusive_cgroup="vms-leased")
    part = load_host(host8, config).partition
    assert (part.mode, part.vm_cpus, part.cgroup) == ("cgroup", cs("4-7"), "vms")


def test_found_cgroup_decides_instead_of_the_live_one(host8: Path) -> None:
    """While leases are kept the lease manager passes the VM partition cgroup as it was
    found at the first lease: pinwarden's own narrowing never changes the rules."""
    make_cgroup(host8, V1, "machine", "2")  # narrowed by pinwarden, say
    found = VmCgroup("machine", 1, cs("0-7"))
    part = load_host(host8, Config(), found).partition
    assert (part.mode, part.vm_cpus, part.host_cpus) == ("none", cs("1-7"), cs("0"))
    assert load_host(host8, Config()).partition.mode == "cgroup"  # the live reading


def test_cgroup_mode_is_honoured_even_when_covering_all(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "0-7")
    part = load_host(host8, Config(mode="cgroup")).partition
    assert (part.mode, part.vm_cpus, part.host_cpus) == ("cgroup", cs("0-7"), CpuSet())


def test_cgroup_mode_without_cgroup_is_an_error(host8: Path) -> None:
    with pytest.raises(HostError, match=r"no VM partition cgroup exists \(looked for: "
                                        r".*sys/fs/cgroup/cpuset/machine\)"):
        load_host(host8, Config(mode="cgroup"))


def test_cgroup_mode_without_cpuset_controller_is_an_error(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4))
    mount_cgroups(tmp_path, v1=False, v2_controllers="cpu io memory pids")
    with pytest.raises(HostError, match="no cpuset cgroup controller is mounted"):
        load_host(tmp_path, Config(mode="cgroup"))


def test_cgroup_mode_with_empty_cpuset_is_an_error(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "")
    with pytest.raises(HostError, match="cgroup machine has no online CPU"):
        load_host(host8, Config(mode="cgroup"))


def test_malformed_cpuset_file_names_the_file(host8: Path) -> None:
    make_cgroup(host8, V1, "machine", "2-x")
    with pytest.raises(HostError, match=r"machine/cpuset.effective_cpus: invalid CPU list"):
        load_host(host8, Config())


# -- cgroup v2 ----------------------------------------------------------------------------


@pytest.fixture
def host8v2(tmp_path: Path) -> Path:
    build_host(tmp_path, HostSpec(cpus=8))
    mount_cgroups(tmp_path, v1=False, v2_controllers="cpuset cpu io memory pids",
                  v2_at=V2, cpus="0-7")
    return tmp_path


def test_cgroup_v2_machine_slice(host8v2: Path) -> None:
    make_cgroup(host8v2, V2, "machine.slice", "", effective="4-7", v2=True)
    make_cgroup(host8v2, V2, "machine", "1-7", v2=True)  # machine.slice comes first
    part = load_host(host8v2, Config()).partition
    assert (part.mode, part.vm_cpus, part.cgroup) == ("cgroup", cs("4-7"), "machine.slice")
    assert part.reason == "cpuset of cgroup machine.slice (v2) is 4-7"


def test_cgroup_v2_falls_back_to_machine(host8v2: Path) -> None:
    make_cgroup(host8v2, V2, "machine", "3-7", v2=True)
    part = load_host(host8v2, Config()).partition
    assert (part.mode, part.vm_cpus, part.cgroup) == ("cgroup", cs("3-7"), "machine")


def test_cgroup_v2_without_cpuset_controller_is_ignored(tmp_path: Path) -> None:
    """Like this machine: cgroup2 at sys/fs/cgroup/unified without the cpuset controller."""
    build_host(tmp_path, HostSpec(cpus=8))
    mount_cgroups(tmp_path, v1=False, v2_controllers="hugetlb")
    make_cgroup(tmp_path, "sys/fs/cgroup/unified", "machine.slice", "4-7", v2=True)
    part = load_host(tmp_path, Config()).partition
    assert part.mode == "none"


# -- none -------------------------------------------------------------------------------


def test_none_default_reserve_is_first_core(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=16, threads=2, packages=2, nodes=2))
    part = load_host(tmp_path, Config()).partition
    assert (part.mode, part.vm_cpus, part.host_cpus) == ("none", cs("1-7,9-15"), cs("0,8"))
    assert part.reason == ("no isolcpus and no restricting VM cgroup; host reserve is core 0 "
                           "(CPUs 0,8)")
    check_invariants(tmp_path)
    build_host(tmp_path / "nosmt", HostSpec(cpus=4))
    part = load_host(tmp_path / "nosmt", Config()).partition
    assert part.reason.endswith("host reserve is core 0 (CPU 0)")


def test_none_reserve_skips_offline_cpu0(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, threads=2))
    write(tmp_path, "sys/devices/system/cpu/online", "1-7\n")
    topo = read_topology(tmp_path)
    assert default_reserve(topo) == cs("1,5")


def test_none_configured_reserve(host8: Path) -> None:
    part = load_host(host8, Config(host_reserve=cs("0-1"))).partition
    assert (part.vm_cpus, part.host_cpus) == (cs("2-7"), cs("0-1"))
    assert "host_reserve in the configuration" in part.reason


def test_none_reserve_naming_unknown_cpu_is_an_error(host8: Path) -> None:
    with pytest.raises(HostError, match=r"host_reserve 0,9 names CPU 9 .*\(present: 0-7\)"):
        load_host(host8, Config(host_reserve=cs("0,9")))
    with pytest.raises(HostError) as info:  # several: "CPUs", the range as given
        load_host(host8, Config(host_reserve=cs("0,8-9")))
    assert info.value.message.startswith("host_reserve 0,8-9 names CPUs 8-9 which this host "
                                         "does not have (present: 0-7)")


def test_shared_fallback_names_one_housekeeping_cpu_as_one(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4))  # none: CPU 0 housekeeping, 1-3 VM CPUs
    host = load_host(tmp_path, Config())
    assert shared_pool(host, cs("1-3")) == (cs("0"), (
        "every VM CPU (1-3) is leased exclusively; shared VMs run on the housekeeping CPU 0 "
        "until a lease is released",))
    host = load_host(tmp_path, Config(host_reserve=cs("0-1")))
    assert "shared VMs run on the housekeeping CPUs 0-1 until" in shared_pool(host, cs("2-3"))[1][0]
    # mode cgroup refuses new shared VMs there: status said they would run there (hunt)
    cgroup = replace(host, partition=replace(host.partition, mode="cgroup"))
    assert shared_pool(cgroup, cs("2-3"))[1] == (
        "every VM CPU (2-3) is leased exclusively; no shared VM may start until a lease is "
        "released (mode cgroup), and any running are kept on the housekeeping CPUs 0-1",)


def test_none_mode_is_honoured(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, isolated="6-7"))
    part = load_host(tmp_path, Config(mode="none")).partition
    assert part.mode == "none" and part.vm_cpus == cs("1-7")
    assert part.reason.startswith("partition mode none is configured")


def test_decide_partition_is_pure(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4))
    topo = read_topology(tmp_path)
    cg = VmCgroup("machine", 1, cs("2-3"))
    part = decide_partition(topo, Config(), cg)
    assert (part.mode, part.vm_cpus) == ("cgroup", cs("2-3"))


@pytest.mark.parametrize(("cg", "said"), [
    (VmCgroup("machine.slice", 2, cs("")),
     "cgroup machine.slice has no online CPU in its cpuset (none of its own: it is not "
     "restricted); give it the VM CPUs, e.g. 'systemctl set-property machine.slice "
     "AllowedCPUs=1-3'"),
    (VmCgroup("machine", 1, cs("")),
     "cgroup machine has no online CPU in its cpuset; give it the VM CPUs, e.g. "
     "cpuset.cpus = 1-3 in its cgroup directory"),
], ids=["systemd", "v1"])
def test_cgroup_mode_without_vm_cpus_says_how_to_give_them(tmp_path: Path, cg: VmCgroup,
                                                          said: str) -> None:
    """The advice was 'cpuset.cpus = ALL ONLINE CPUS' — none left for the host, and on
    systemd a write to the cgroup file is undone (systemctl set-property is the way), and
    an empty AllowedCPUs is no restriction at all (systemd-lab hunt)."""
    build_host(tmp_path, HostSpec(cpus=4))
    with pytest.raises(HostError) as err:
        decide_partition(read_topology(tmp_path), Config(mode="cgroup"), cg)
    assert err.value.message == f"partition mode cgroup is configured but {said}"


# -- mounts -------------------------------------------------------------------------------


def test_mountinfo_v1_and_v2(tmp_path: Path) -> None:
    mount_cgroups(tmp_path, v2_controllers="hugetlb")
    mounts = read_mounts(tmp_path)
    assert mounts.v1("cpuset") == tmp_path / "sys/fs/cgroup/cpuset"
    assert mounts.v1("cpu") == mounts.v1("cpuacct") == tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    assert mounts.v1("name=systemd") == tmp_path / "sys/fs/cgroup/systemd"
    assert mounts.v1("net_cls") is None
    assert mounts.v2 == tmp_path / "sys/fs/cgroup/unified"
    assert mounts.v2_has("hugetlb") and not mounts.v2_has("cpuset")
    assert mounts.cpuset_file("cpus") == "cpuset.cpus"


def test_mountinfo_escapes_and_optional_fields() -> None:
    text = ("36 35 98:0 / /mnt/with\\040space rw,noatime master:1 shared:2 - cgroup cg "
            "rw,cpuset\n"
            "garbage line\n")
    (mount,) = parse_mountinfo(text)
    assert mount.point == "/mnt/with space" and mount.fstype == "cgroup"
    assert "cpuset" in mount.options


def test_proc_mounts_fallback_and_legacy_cpuset(tmp_path: Path) -> None:
    write(tmp_path, "proc/mounts", "none /dev/cpuset cpuset rw 0 0\n")
    mounts = read_mounts(tmp_path)
    assert mounts.v1("cpuset") == tmp_path / "dev/cpuset"
    assert mounts.cpuset_file("cpus") == "cpus"
    assert mounts.v2 is None and not mounts.v2_has("cpuset")


def test_legacy_cpuset_partition(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4))
    write(tmp_path, "proc/mounts", "none /dev/cpuset cpuset rw 0 0\n")
    write(tmp_path, "dev/cpuset/machine/cpus", "2-3\n")
    part = load_host(tmp_path, Config()).partition
    assert (part.mode, part.vm_cpus) == ("cgroup", cs("2-3"))


def test_no_mount_table(tmp_path: Path) -> None:
    mounts = read_mounts(tmp_path)
    assert mounts.v1("cpuset") is None and mounts.v2 is None


def test_real_mounts() -> None:
    """This machine: the cpuset v1 hierarchy and cgroup2 (no cpuset) at their usual place."""
    mounts = read_mounts(Path("/"))
    expected: dict[str, str] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, opts, *_ = line.split()
        if fstype == "cgroup":
            for opt in opts.split(","):
                expected.setdefault(opt, where)
        elif fstype == "cgroup2":
            expected.setdefault("<v2>", where)
    assert str(mounts.v1("cpuset")) == expected["cpuset"]
    assert str(mounts.v2) == expected["<v2>"]
    controllers = Path(expected["<v2>"], "cgroup.controllers").read_text().split()
    assert mounts.v2_has("cpuset") == ("cpuset" in controllers)


# -- the real cgroup v1 cpuset hierarchy ----------------------------------------------------

REAL_V1 = Path("/sys/fs/cgroup/cpuset")


@pytest.fixture
def real_tree() -> Iterator[Path]:
    """A pwtest tree in the real cpuset hierarchy, removed afterwards."""
    if not (REAL_V1 / "cpuset.cpus").exists() or os.geteuid() != 0:
        pytest.skip("needs root and the cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset")
    top = REAL_V1 / f"pwtest-foundation-{os.getpid()}"
    top.mkdir()
    try:
        for name in ("cpus", "mems"):
            (top / f"cpuset.{name}").write_text((REAL_V1 / f"cpuset.{name}").read_text())
        yield top
    finally:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        top.rmdir()


@pytest.mark.kernel
def test_real_cgroup_v1_partition(real_tree: Path) -> None:
    online = cs(Path("/sys/devices/system/cpu/online").read_text())
    if len(online) < 2:
        pytest.fail("the real-cgroup partition test needs at least 2 online CPUs")
    last = max(online)
    machine = real_tree / "machine"
    machine.mkdir()
    (machine / "cpuset.mems").write_text((real_tree / "cpuset.mems").read_text())
    (machine / "cpuset.cpus").write_text(str(last))
    rel = real_tree.name
    config = Config(cgroup_v1=f"{rel}/machine", exclusive_cgroup=f"{rel}/pinwarden.partition")
    topo = read_topology(Path("/"))
    part = read_partition(Path("/"), topo, Config(mode="cgroup", cgroup_v1=config.cgroup_v1,
                                                  exclusive_cgroup=config.exclusive_cgroup))
    assert part.mode == "cgroup" and part.vm_cpus == CpuSet.of([last])
    assert part.host_cpus == online - CpuSet.of([last])
    # the kernel's effective_cpus, not the configured cpus, counts
    assert cs((machine / "cpuset.effective_cpus").read_text()) == CpuSet.of([last])
    # once the whole set is in machine, auto mode sees nothing restricted
    (machine / "cpuset.cpus").write_text(str(online))
    assert read_partition(Path("/"), topo, config).mode in ("none", "isolcpus")


# -- properties of the pure core -------------------------------------------------------------

_BASE: list[Topology] = []


def base_topology(tmp_path_factory: pytest.TempPathFactory) -> Topology:
    if not _BASE:
        root = tmp_path_factory.mktemp("prop-host")
        build_host(root, HostSpec(cpus=16, threads=2, packages=2, nodes=2))
        _BASE.append(read_topology(root))
    return _BASE[0]


sets16 = st.frozensets(st.integers(0, 15)).map(CpuSet)


@settings(deadline=None, max_examples=300)
@given(online=sets16.filter(bool), isolated=sets16, cg_cpus=sets16,
       found=st.booleans(), reserve=st.none() | sets16,
       mode=st.sampled_from(["auto", "isolcpus", "cgroup", "none"]))
def test_decide_partition_properties(tmp_path_factory: pytest.TempPathFactory,
                                     online: CpuSet, isolated: CpuSet, cg_cpus: CpuSet,
                                     found: bool, reserve: CpuSet | None, mode: str) -> None:
    """Whatever the host says: VM and housekeeping CPUs split the online CPUs, the mode
    follows the documented order, and impossible explicit modes are a one-line HostError."""
    topo = replace(base_topology(tmp_path_factory), online=online, isolated=isolated)
    cg = VmCgroup("machine" if found else None, 1 if found else None,
                  cg_cpus if found else CpuSet(), ("/sys/fs/cgroup/cpuset/machine",))
    config = Config(mode=mode, host_reserve=reserve)  # type: ignore[arg-type]
    try:
        part = decide_partition(topo, config, cg)
    except HostError as exc:
        assert "\n" not in exc.message
        assert (mode != "auto" and mode != "none") or reserve is not None
        return
    assert part.vm_cpus | part.host_cpus == online
    assert part.vm_cpus.isdisjoint(part.host_cpus)
    assert part.reason and "\n" not in part.reason
    if mode != "auto":
        assert part.mode == mode
    elif isolated & online:
        assert part.mode == "isolcpus" and part.vm_cpus == isolated & online
    if part.mode == "cgroup":
        assert part.cgroup == "machine" and part.vm_cpus == cg_cpus & online
    if part.mode == "none":
        kept = reserve & online if reserve is not None else default_reserve(topo)
        assert part.host_cpus == kept


def test_shared_edit_is_what_somebody_else_changed_against_pinwardens_write() -> None:
    from pinwarden.partition import SharedEdit, shared_edit

    P = CpuSet.parse_kernel
    assert shared_edit(P("1-2"), P("1-2"), P("3")) is None
    assert shared_edit(P("1-2"), P("1-2,4"), P("3")) == SharedEdit(P("4"), P(""))
    assert shared_edit(P("1-2"), P("1"), P("3")) == SharedEdit(P(""), P("2"))
    # leased CPUs are VM CPUs already: written into the group (cgroup v2) is no edit
    assert shared_edit(P("1-2"), P("1-3"), P("3")) is None
    edit = shared_edit(P("1-2"), P("2,5"), P("3"))
    assert edit == SharedEdit(P("5"), P("1"))
    assert edit.apply(P("1-3")) == P("2-3,5")


@pytest.mark.parametrize(("mode", "decides", "edit", "found", "own"), [
    # mode cgroup, the group decides: both take the edit
    ("cgroup", True, ("4", ""), "1-4", "1-4"),
    ("cgroup", True, ("", "2"), "1,3", "1,3"),
    # mode none (every CPU, reserve 0): the VM CPUs the administrator saw take it
    ("none", True, ("", "2"), "1,3", "1,3"),
    ("none", True, ("0", ""), "0-3", "0-3"),  # the reserve written back: no change
    # the partition comes from elsewhere: only the group's own value takes it
    ("isolcpus", True, ("", "2"), "0-3", "0-1,3"),
    ("none", False, ("", "2"), "0-3", "0-1,3"),
])
def test_an_edit_is_made_where_the_administrator_meant_it(
        mode: str, decides: bool, edit: tuple[str, str], found: str, own: str) -> None:
    from pinwarden.partition import Partition, SharedEdit, VmCgroup, edited_partition

    P = CpuSet.parse_kernel
    cpus = "1-3" if mode == "cgroup" else "0-3"
    partition = Partition(mode, P("1-3"), P("0"), "test", "machine")  # type: ignore[arg-type]
    cgroup = VmCgroup("machine", 1, P(cpus))
    got_found, got_own = edited_partition(partition, cgroup, P(cpus),
                                          SharedEdit(P(edit[0]), P(edit[1])),
                                          decides=decides)
    assert (got_found.cpus, got_own) == (P(found), P(own))
    assert got_found.name == "machine"
    # a group pinwarden made has no own value to put back, edited or not
    assert edited_partition(partition, cgroup, None, SharedEdit(P(edit[0]), P(edit[1])),
                            decides=decides)[1] is None
