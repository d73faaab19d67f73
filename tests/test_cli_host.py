"""``pinwarden host`` (human and --json, error convention), the CPU map, and this machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hostroot import HostSpec, build_host, make_cgroup, mount_cgroups, write
from pinwarden.cli import main
from pinwarden.config import Config
from pinwarden.cpuset import CpuSet
from pinwarden.model import SIBLING_HOLD, Lease, domain_holder
from pinwarden.partition import load_host
from pinwarden.view import render_cpu_map


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from pinwarden.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """An empty configuration: every default, whatever /etc/pinwarden holds."""
    path = tmp_path / "pinwarden.toml"
    path.write_text("")
    return path


def lease(cpu: int, name: str, role: str = "vcpu0") -> Lease:
    return Lease(cpu, domain_holder("qemu", name, None), role, 0.0)


# -- --json ---------------------------------------------------------------------------------


def test_json_shape(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=16, threads=2, packages=2, nodes=2,
                                                  isolated="4-7,12-15", nohz_full="4-7"))
    assert main(["host", "--root", str(root), "--json", "--config", str(config_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    cpus = data["cpus"]
    assert [c["cpu"] for c in cpus] == list(range(16))
    first = cpus[0]
    assert {"cpu", "online", "package", "die", "core", "siblings", "node", "isolated",
            "kind", "nohz_full", "reason"} - set(first) == {"reason"}
    assert first == {**first, "cpu": 0, "online": True, "package": 0, "die": 0, "core": 0,
                     "siblings": "0,8", "node": 0, "isolated": False, "nohz_full": False}
    assert cpus[13]["siblings"] == "5,13" and cpus[13]["package"] == 1
    assert cpus[13]["node"] == 1 and cpus[13]["isolated"] is True
    assert cpus[5]["nohz_full"] is True and cpus[13]["nohz_full"] is False
    assert all(isinstance(c["siblings"], str) for c in cpus)  # CPU lists: kernel list text
    assert data["schema"] == 1 and next(iter(data)) == "schema"
    assert data["partition"] == {"mode": "isolcpus", "vm_cpus": "4-7,12-15",
                                 "host_cpus": "0-3,8-11", "cgroup": None,
                                 "reason": "isolcpus=4-7,12-15 on the kernel command line"}
    assert data["nodes"] == {"0": "0-3,8-11", "1": "4-7,12-15"}


def test_json_cgroup_mode(tmp_path: Path, config_file: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=8))
    mount_cgroups(root, cpus="0-7")
    make_cgroup(root, "sys/fs/cgroup/cpuset", "machine", "2-7")
    assert main(["host", "--root", str(root), "--json", "--config", str(config_file)]) == 0
    part = json.loads(capsys.readouterr().out)["partition"]
    assert (part["mode"], part["vm_cpus"], part["host_cpus"], part["cgroup"]) == \
        ("cgroup", "2-7", "0-1", "machine")


def test_a_vm_partition_of_every_cpu_is_said_by_host(
        tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Mode cgroup with ``machine`` as libvirt makes it, every CPU: nothing can be leased,
    and only 'plan' and 'reserve' said so and what to change — 'host', the first step,
    showed "housekeeping CPUs -" alone (CLI hunt)."""
    root = build_host(tmp_path / "root", HostSpec(cpus=8))
    mount_cgroups(root, cpus="0-7")
    make_cgroup(root, "sys/fs/cgroup/cpuset", "machine", "0-7")
    config_file.write_text('[partition]\nmode = "cgroup"\n')
    common = ["host", "--root", str(root), "--config", str(config_file)]
    assert main(common) == 0
    text = capsys.readouterr().out
    assert ("  nothing can be leased: the partition cgroup machine (cpus 0-7) covers every "
            "online CPU, which leaves the host no housekeeping CPU; give cgroup machine the "
            "VM CPUs only (cpuset.cpus = 1-7 in its cgroup directory, keeping CPU 0 for the "
            "host)") in text, text
    assert main([*common, "--json"]) == 0
    assert "cpuset.cpus = 1-7" in json.loads(capsys.readouterr().out)["lease_problem"]
    # 'status', the host at a glance, says it too (it showed "housekeeping CPUs -" alone)
    status = ["status", "--root", str(root), "--config", str(config_file), "--state-dir",
              str(tmp_path / "state")]
    assert main(status) == 0
    text = capsys.readouterr().out
    assert "\nnote: nothing can be leased: the partition cgroup machine (cpus 0-7) covers " \
        "every online CPU" in text and "keeping CPU 0 for the host)" in text, text
    assert main([*status, "--json"]) == 0
    assert [n for n in json.loads(capsys.readouterr().out)["notes"]
            if n.startswith("nothing can be leased: ")], text
    make_cgroup(root, "sys/fs/cgroup/cpuset", "machine", "1-7")
    assert main([*common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lease_problem"] is None
    assert main(status) == 0
    assert "nothing can be leased" not in capsys.readouterr().out


def test_the_suggested_boot_line_keeps_an_offline_isolated_cpu_a_vm_cpu(
        tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """isolcpus=4-7 with CPU 7 offline: the line 'host' suggests (nohz_full= and the rest
    are missing) named 4-6 only — followed, CPU 7 would be the host's at the next boot
    (v2-lab hunt).  It names every isolated CPU."""
    root = build_host(tmp_path / "root", HostSpec(cpus=8, isolated="4-7"))
    write(root, "sys/devices/system/cpu/online", "0-6\n")
    assert main(["host", "--root", str(root), "--json", "--config", str(config_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["partition"]["vm_cpus"] == "4-6"
    assert data["suggested_cmdline"] == ("isolcpus=managed_irq,domain,4-7 nohz_full=4-7 "
                                         "rcu_nocbs=4-7 irqaffinity=0-3")


def test_config_file_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=8, isolated="6-7"))
    config = write(tmp_path, "pw.toml", '[partition]\nmode = "none"\nhost_reserve = "0-1"\n')
    assert main(["host", "--root", str(root), "--json", "--config", str(config)]) == 0
    part = json.loads(capsys.readouterr().out)["partition"]
    assert (part["mode"], part["vm_cpus"], part["host_cpus"]) == ("none", "2-7", "0-1")


def test_json_of_an_hwloc_dump_matches_topology(tmp_path: Path, config_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A real machine's dump: the JSON carries read_topology's answer, CPU by CPU."""
    import tarfile

    from conftest import HWLOC
    with tarfile.open(HWLOC / "16em64t-4s2c2t.tar.bz2") as tar:
        members = [m for m in tar.getmembers() if "/sys/devices/system/" in m.name]
        tar.extractall(tmp_path, members=members, filter="tar")
    root = tmp_path / "16em64t-4s2c2t"
    assert main(["host", "--root", str(root), "--json", "--config", str(config_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    host = load_host(root, Config())
    for c in data["cpus"]:
        assert c["siblings"] == str(host.topology.siblings(c["cpu"]))
        assert c["package"] == host.topology.cpu(c["cpu"]).package
    assert data["cpus"][0]["siblings"] == "0,8"  # lstopo: Core L#0 holds PU P#0 and P#8


# -- human output ------------------------------------------------------------------------------


def test_human_output(tmp_path: Path, config_file: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=8, threads=2))
    assert main(["host", "--root", str(root), "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "8 CPUs online: 1 package, 1 NUMA node, 4 cores, 2-way SMT" in out
    assert "partition none: VM CPUs 1-3,5-7, housekeeping CPUs 0,4" in out
    assert "because no isolcpus and no restricting VM cgroup; host reserve is core 0 " \
           "(CPUs 0,4)" in out
    assert re.search(r"core 0\s+0 h\s+4 h", out)
    assert re.search(r"core 3\s+3 v\s+7 v", out)
    assert "legend: h housekeeping (0,4)" in out


def test_leases_from_the_ledger(tmp_path: Path, config_file: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """With --state-dir, the map shows the leases a real ledger database records."""
    from pinwarden.ledger import Ledger
    from pinwarden.model import Plan

    root = build_host(tmp_path / "root", HostSpec(cpus=8))
    state = tmp_path / "state"
    plan = Plan("web", None, True, {0: CpuSet.of([4]), 1: CpuSet.of([5])}, CpuSet.of([4]),
                leases={4: "vcpu0", 5: "vcpu1"})
    with Ledger(state) as ledger:
        ledger.reserve(domain_holder("qemu", "web", None), lambda leases: plan)
    argv = ["host", "--root", str(root), "--state-dir", str(state), "--config", str(config_file)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"core 4\s+4 A", out) and re.search(r"core 5\s+5 A", out)
    assert "A leased to qemu domain 'web' (4-5)" in out
    assert main([*argv, "--json"]) == 0
    leases = json.loads(capsys.readouterr().out)["leases"]
    assert [(item["cpu"], item["role"]) for item in leases] == [(4, "vcpu0"), (5, "vcpu1")]


def test_dump_root_shows_no_leases(tmp_path: Path, config_file: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--root without --state-dir: this machine's ledger says nothing about a dump."""
    root = build_host(tmp_path / "root", HostSpec(cpus=4))
    assert main(["host", "--root", str(root), "--json", "--config", str(config_file)]) == 0
    assert json.loads(capsys.readouterr().out)["leases"] == []


# -- errors -----------------------------------------------------------------------------------


def test_bad_root_exits_1(tmp_path: Path) -> None:
    proc = run_cli("host", "--root", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("pinwarden: error: ")
    assert "not a Linux host root" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_bad_root_json_error_object(tmp_path: Path) -> None:
    proc = run_cli("host", "--root", str(tmp_path), "--json")
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "host" and "not a Linux host root" in error["message"]
    assert proc.stderr.startswith("pinwarden: error: ")


def test_impossible_mode_exits_1(tmp_path: Path) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=4))
    config = write(tmp_path, "pw.toml", '[partition]\nmode = "isolcpus"\n')
    proc = run_cli("host", "--root", str(root), "--config", str(config), "--json")
    assert proc.returncode == 1
    assert "no online CPU is isolated" in json.loads(proc.stdout)["error"]["message"]


def test_missing_config_exits_1(tmp_path: Path) -> None:
    proc = run_cli("host", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_error_exits_2() -> None:
    proc = run_cli("host", "--frobnicate")
    assert proc.returncode == 2 and "usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the CPU map -------------------------------------------------------------------------------


def test_map_two_cpus(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=2))
    text = render_cpu_map(load_host(tmp_path, Config()))
    lines = text.splitlines()
    assert lines[0] == "package 0 · node 0 · CPUs 0-1"
    assert re.fullmatch(r"\s+core 0\s+0 h", lines[1])
    assert re.fullmatch(r"\s+core 1\s+1 v", lines[2])
    assert lines[3] == "legend: h housekeeping (0)"


def test_map_shows_hybrid_kinds(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=4))
    write(tmp_path, "sys/devices/cpu_core/cpus", "0-1\n")
    write(tmp_path, "sys/devices/cpu_atom/cpus", "2-3\n")
    text = render_cpu_map(load_host(tmp_path, Config()))
    assert re.search(r"core 1\s+1 v  \(intel_core\)", text)
    assert re.search(r"core 2\s+2 v  \(intel_atom\)", text)


def test_map_leases_offline_and_isolated(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=8, isolated="4-7"))
    write(tmp_path, "sys/devices/system/cpu/online", "0-6\n")
    host = load_host(tmp_path, Config())
    text = render_cpu_map(host, [lease(4, "web"), lease(5, "web", "emulator"),
                                 lease(99, "ghost")])
    assert re.search(r"core 4\s+4 A", text) and re.search(r"core 6\s+6 i", text)
    assert re.search(r"core 7\s+7 \.", text)
    assert "A leased to qemu domain 'web' (4-5)" in text
    assert "B leased to qemu domain 'ghost' (-)" not in text
    assert "leases name CPUs this host does not have: 99" in text
    assert "i VM, isolated (6)" in text and ". offline (7)" in text


def test_map_many_holders(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=40))
    host = load_host(tmp_path, Config())
    text = render_cpu_map(host, [lease(c, f"vm{c}") for c in range(1, 31)])
    assert "G leased to qemu domain 'vm7' (7)" in text
    assert "J leased to qemu domain 'vm8' (8)" in text  # (H: h is housekeeping's)
    assert "Z leased to qemu domain 'vm23' (23)" in text
    assert "# leased to 7 more holders (24-30)" in text


def test_map_held_siblings_never_read_as_housekeeping_isolated_or_shared(
        tmp_path: Path) -> None:
    """Held siblings are marked with their holder's letter in lower case: the 8th, 9th and
    22nd holders' (h, i, v) read as housekeeping, isolated and shared CPUs, and the legend
    called every such CPU held empty for them (CLI hunt)."""
    build_host(tmp_path, HostSpec(cpus=64, threads=2, isolated="32-63"))
    host = load_host(tmp_path, Config())
    topo = host.topology
    cores = sorted({min(topo.siblings(c) | CpuSet.of([c])) for c in topo.cpus} - {0})[:24]
    leases = [x for n, cpu in enumerate(cores)
              for x in (lease(cpu, f"vm{n}"),
                        lease((topo.siblings(cpu) - CpuSet.of([cpu])).first(), f"vm{n}",
                              SIBLING_HOLD))]
    held = CpuSet.of(x.cpu for x in leases if x.role == SIBLING_HOLD)
    text = render_cpu_map(host, leases)
    legend = {line.removeprefix("legend:").split()[0]: line for line in text.splitlines()
              if line.startswith(("legend:", "        "))}
    assert {"h", "i"} <= legend.keys(), text
    for mark in {"h", "i", "v"} & legend.keys():  # (v: the shared pool, none in isolcpus)
        listed = legend[mark].rsplit("(", 1)[1].rstrip(")")
        assert listed == "-" or not CpuSet.parse(listed) & held, legend[mark]
        assert "held empty" not in legend[mark], legend[mark]
    assert text.count("held empty for") == 23, text  # (the 24th holder is one of '#')


def test_map_1024_cpus_is_compact(tmp_path: Path) -> None:
    build_host(tmp_path, HostSpec(cpus=1024, threads=2, packages=4, nodes=8,
                                  isolated="512-1023"))
    host = load_host(tmp_path, Config())
    leases = [lease(c, "big") for c in (512, 513, 1023)]
    text = render_cpu_map(host, leases)
    lines = text.splitlines()
    assert len(lines) < 80
    assert max(len(line) for line in lines if not line.startswith(("legend", "   "))) <= 100
    marks = "".join(line.split(None, 1)[1].replace(" ", "") for line in lines
                    if re.match(r"  \d", line))
    assert len(marks) == 1024
    assert marks.count("A") == 3 and marks.count("i") == 512 - 3
    assert "package 3 · node 7 · CPUs 448-511,960-1023" in text


def test_map_of_every_hwloc_dump_covers_every_cpu(tmp_path: Path) -> None:
    """Each present CPU appears exactly once in the map of an odd real machine."""
    import tarfile

    from conftest import HWLOC
    with tarfile.open(HWLOC / "offline-cpu0-node0.tar.bz2") as tar:
        members = [m for m in tar.getmembers() if "/sys/devices/system/" in m.name]
        tar.extractall(tmp_path, members=members, filter="tar")
    host = load_host(tmp_path / "offline-cpu0-node0", Config())
    text = render_cpu_map(host)
    assert "offline, place unknown · CPUs 0-3,21-23" in text
    assert "package 0 · node ? · CPUs 4,6,8,10,12,14,16,18,20" in text  # node 0 is offline
    assert "package 1 · node 1 · CPUs 5,7,9,11,13,15,17,19" in text
    # a lease on an offline CPU of unknown place: its holder's mark, as the legend says (it
    # was drawn '.', and the legend named a holder the map did not show: v2-lab hunt)
    text = render_cpu_map(host, [lease(21, "gone")])
    lines = text.splitlines()
    row = lines[lines.index("offline, place unknown · CPUs 0-3,21-23") + 1]
    assert row.strip() == "....A..", row
    assert "A leased to qemu domain 'gone' (21)" in text


# -- this machine ----------------------------------------------------------------------------------

SYS_CPU = Path("/sys/devices/system/cpu")
CPUSET = Path("/sys/fs/cgroup/cpuset")


def _cpus(path: Path) -> CpuSet | None:
    try:
        return CpuSet.parse_kernel(path.read_text())
    except OSError:
        return None


def expected_partition() -> dict[str, Any]:
    """The partition of / computed straight from the kernel files (default config)."""
    online = CpuSet.parse_kernel((SYS_CPU / "online").read_text())
    isolated = (_cpus(SYS_CPU / "isolated") or CpuSet()) & online
    if isolated:
        return {"mode": "isolcpus", "vm_cpus": str(isolated), "host_cpus": str(online - isolated)}
    first = online.first()
    reserve = (_cpus(SYS_CPU / f"cpu{first}/topology/thread_siblings_list")
               or CpuSet.of([first])) & online
    none = {"mode": "none", "vm_cpus": str(online - reserve), "host_cpus": str(reserve)}
    machine = _cpus(CPUSET / "machine/cpuset.effective_cpus")
    if machine is None:
        return none
    # what the kernel says, nothing more: pinwarden reads its own narrowing of machine
    # from its ledger (the host record), never by guessing from the cgroups
    vm = machine & online
    if not vm or vm == online:
        return none
    return {"mode": "cgroup", "vm_cpus": str(vm), "host_cpus": str(online - vm)}


@pytest.mark.kernel
def test_this_machine(config_file: Path) -> None:
    """`pinwarden host --json` on / shows this machine's CPUs and the partition its kernel
    files describe (other helpers may change machine meanwhile: retry until stable)."""
    online = CpuSet.parse_kernel((SYS_CPU / "online").read_text())
    for _attempt in range(10):
        before = expected_partition()
        proc = run_cli("host", "--json", "--config", str(config_file))
        after = expected_partition()
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        if before == after:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the cpuset of /sys/fs/cgroup/cpuset/machine kept changing")
    assert [c["cpu"] for c in data["cpus"] if c["online"]] == online.as_list()
    assert len(online) == os.cpu_count()  # 2 on the development machine
    got = data["partition"]
    assert {k: got[k] for k in ("mode", "vm_cpus", "host_cpus")} == before, got["reason"]
    human = run_cli("host", "--config", str(config_file))
    assert human.returncode == 0 and "legend:" in human.stdout
    for cpu in online:
        assert re.search(rf"core \S+\s+{cpu} [hvi]", human.stdout)


def test_status_reads_each_holders_partition_from_the_kernel(tmp_path: Path) -> None:
    """A holder group the kernel marks an invalid partition (cgroup v2) is not exclusive,
    which the ledger cannot tell: status reads ``cpuset.cpus.partition`` of each recorded
    group.  A group gone (removed by hand) is said too; a valid one and a holder without
    a group say nothing; on a v2 mount without cpuset the v1 cpuset hierarchy is read.
    (The real kernel: test_lab_v2's invalid-partition test; a group gone: test_run_host.)"""
    from pinwarden.cli.placement import invalid_partitions
    from pinwarden.holdergroup import Invalid
    from pinwarden.ledger import HolderRecord
    from pinwarden.model import Plan

    a, b, c = (domain_holder("qemu", n, None) for n in "abc")

    def held(ref: Any, cgroup: str | None) -> HolderRecord:
        return HolderRecord(ref, 0.0, None, None, Plan(ref.name, None, True, {}, CpuSet()),
                            cgroup=cgroup)

    records = [held(a, "/pw-a.partition"), held(b, "/pw-b.partition"),
               held(c, "/gone.partition"), held(domain_holder("qemu", "d", None), None)]
    reason = "isolated invalid (Cpu list in cpuset.cpus not exclusive)"
    mount_cgroups(tmp_path, v1=False, v2_controllers="cpuset cpu", v2_at="sys/fs/cgroup",
                  cpus="0-3")
    write(tmp_path, "sys/fs/cgroup/pw-a.partition/cpuset.cpus.partition", reason + "\n")
    write(tmp_path, "sys/fs/cgroup/pw-b.partition/cpuset.cpus.partition", "isolated\n")
    assert invalid_partitions(tmp_path, records) == {
        ("qemu", a.key): Invalid(reason, None), ("qemu", c.key): Invalid(None, None, True)}
    v2_without_cpuset = tmp_path / "nocpuset"
    mount_cgroups(v2_without_cpuset, v1=True, v2_controllers="cpu memory")
    write(v2_without_cpuset, "sys/fs/cgroup/unified/pw-a.partition/cpuset.cpus.partition",
          reason + "\n")
    # (pinwarden's groups there are in the v1 cpuset hierarchy, where none is)
    assert invalid_partitions(v2_without_cpuset, records) == {
        ("qemu", r.key): Invalid(None, None, True) for r in (a, b, c)}
