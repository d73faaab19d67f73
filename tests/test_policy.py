"""Placement policy: the RFC's rule table, exclusivity and refusals, case by case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from conftest import HWLOC_DUMPS
from pinwarden.cpuset import CpuSet
from pinwarden.domain import PW_NS, DomainSpec, GuestCell, parse_domain
from pinwarden.errors import Refusal
from pinwarden.model import SIBLING_HOLD, HolderRef, Lease, Plan, domain_holder, job_holder
from pinwarden.partition import Host, Partition, PartitionMode
from pinwarden.policy import JobSpec, decide, holder_of
from pinwarden.record import replace
from pinwarden.topology import Cpu, Topology

C = CpuSet.parse


def topology(cpus: int = 16, *, threads: int = 1, nodes: int = 2, offline: str = "",
             isolated: str = "") -> Topology:
    """x86 numbering: thread t of core k is CPU t * cores + k; cores split evenly on nodes."""
    cores = cpus // threads
    off = C(offline) if offline else CpuSet()
    table: dict[int, Cpu] = {}
    for cpu in range(cpus):
        core = cpu % cores
        node = core * nodes // cores
        siblings = CpuSet.of(t * cores + core for t in range(threads))
        table[cpu] = Cpu(id=cpu, online=cpu not in off, package=node, die=0, cluster=None,
                         core=core, siblings=siblings, node=node)
    every = CpuSet.range(0, cpus - 1)
    node_map = {n: CpuSet.of(c for c in table if table[c].node == n) for n in range(nodes)}
    return Topology(cpus=table, present=every, online=every - off,
                    isolated=C(isolated) if isolated else CpuSet(), nohz_full=CpuSet(),
                    nodes=node_map)


def host(mode: PartitionMode = "isolcpus", vm: str = "4-15", *, cpus: int = 16,
         threads: int = 1, nodes: int = 2, offline: str = "") -> Host:
    topo = topology(cpus, threads=threads, nodes=nodes, offline=offline,
                    isolated=vm if mode == "isolcpus" else "")
    vm_cpus = C(vm) & topo.online
    return Host(topo, Partition(mode=mode, vm_cpus=vm_cpus, host_cpus=topo.online - vm_cpus,
                                reason="test", cgroup="/machine" if mode == "cgroup" else None))


def spec(name: str = "vm1", vcpus: int = 2, **kw: object) -> DomainSpec:
    return DomainSpec(name=name, uuid=None, vcpus=vcpus, **kw)  # type: ignore[arg-type]


def lease(cpus: str, name: str = "other", role: str = "vcpu0") -> list[Lease]:
    holder = domain_holder("qemu", name, None)
    return [Lease(cpu, holder, role, 0.0) for cpu in C(cpus)]


def refused(code: str, *needles: str, **kw: object) -> Refusal:
    """Run decide(spec, host, leases) expecting a refusal with ``code`` mentioning every
    needle."""
    with pytest.raises(Refusal) as info:
        decide(kw.pop("spec"), **kw)  # type: ignore[arg-type]
    assert info.value.code == code, info.value.message
    for needle in needles:
        assert needle in info.value.message, info.value.message
    assert "\n" not in info.value.message
    return info.value


SEED = """<domain type='kvm'><name>vm1</name>
  <vcpu placement='static' cpuset='4-6'>2</vcpu>
  <cputune exclusive='yes'>
    <vcpupin vcpu='0' cpuset='5'/>
    <vcpupin vcpu='1' cpuset='6'/>
    <emulatorpin cpuset='4'/>
  </cputune></domain>"""


# -- the seed's own example --------------------------------------------------------------


def test_seed_example_on_isolcpus_host() -> None:
    plan = decide(parse_domain(SEED), host("isolcpus", "4-15"), [])
    assert plan.to_json()["vcpus"] == {"0": "5", "1": "6"}
    assert plan.to_json()["emulator"] == "4" and plan.to_json()["iothreads"] == {}
    assert plan.leases == {4: "emulator", 5: "vcpu0", 6: "vcpu1"}
    assert plan.leased() == C("4-6") and plan.default_cpus == C("4-6")
    assert plan.exclusive and plan.domain == "vm1" and not plan.notes


def test_seed_example_twice_conflicts_naming_cpu_and_holder() -> None:
    first = decide(parse_domain(SEED), host(), [])
    held = [Lease(cpu, domain_holder("qemu", "vm1", None), role, 1.0)
            for cpu, role in first.leases.items()]
    twin = parse_domain(SEED.replace("<name>vm1</name>", "<name>vm2</name>"))
    refused("conflict", "CPU 5", "qemu domain 'vm1'", "vcpu0", "pinwarden release vm1",
            spec=twin, host=host(), leases=held)
    # the holder itself may re-plan: its own leases are ignored
    assert decide(parse_domain(SEED), host(), held) == first


# -- shared domains: the rule table ----------------------------------------------------


@pytest.mark.parametrize(("mode", "vm", "expected"), [
    ("isolcpus", "4-15", "4,7-15"),
    ("cgroup", "2-13", "2-4,7-13"),
    ("none", "1-15", "1-4,7-15"),
])
def test_nothing_in_xml_gets_vm_cpus_minus_leased(mode: PartitionMode, vm: str,
                                                  expected: str) -> None:
    plan = decide(spec(iothreads=1), host(mode, vm), lease("5-6"))
    assert plan.default_cpus == C(expected)
    assert set(plan.vcpus.values()) == {C(expected)}
    assert plan.emulator == C(expected) and plan.iothreads == {1: C(expected)}
    assert not plan.leases and not plan.exclusive and not plan.notes


def test_never_all_cpus_even_without_leases() -> None:
    plan = decide(spec(), host("isolcpus", "4-15"), [])
    assert plan.default_cpus == C("4-15")  # not 0-15


@pytest.mark.parametrize("mode", ["isolcpus", "none"])
def test_affinity_is_honoured_outside_the_vm_cpus(mode: PartitionMode) -> None:
    s = spec(vcpupins={0: C("1"), 1: C("2-3")}, emulatorpin=C("0"))
    plan = decide(s, host(mode, "4-15"), [])
    assert plan.vcpus == {0: C("1"), 1: C("2-3")} and plan.emulator == C("0")
    assert plan.default_cpus is None and not plan.leases
    assert any("housekeeping CPUs 0-3" in n for n in plan.notes)
    one = decide(spec(vcpupins={0: C("1"), 1: C("1")}), host(mode, "4-15"), [])
    assert any("pinned onto housekeeping CPU 1 outside" in n for n in one.notes), one.notes


def test_vcpu_cpuset_applies_to_unpinned_threads() -> None:
    s = spec(vcpus=3, cpuset=C("8-11"), vcpupins={1: C("12")})
    plan = decide(s, host(), [])
    assert plan.vcpus == {0: C("8-11"), 1: C("12"), 2: C("8-11")}
    assert plan.emulator == C("8-11") and plan.default_cpus == C("8-11")


def test_partial_pins_get_default_placement_not_all_cpus() -> None:
    plan = decide(spec(vcpus=2, emulatorpin=C("7")), host(), lease("4-5"))
    assert plan.vcpus == {0: C("6-15"), 1: C("6-15")}
    assert plan.emulator == C("7") and plan.default_cpus == C("6-15")


def test_cgroup_mode_affinity_inside_is_fine() -> None:
    plan = decide(spec(cpuset=C("3-5")), host("cgroup", "2-13"), [])
    assert plan.default_cpus == C("3-5")


@pytest.mark.parametrize("field", ["cpuset", "vcpupins", "emulatorpin", "iothreadpins"])
def test_cgroup_mode_affinity_outside_is_refused(field: str) -> None:
    changes: dict[str, Any] = {field: C("0-3")}
    if field in ("vcpupins", "iothreadpins"):
        changes = {field: {1: C("0-3")}}
    s = replace(spec(iothreads=1), **changes)
    refused("outside-partition", "CPUs 0-1", "/machine", "2-13",
            spec=s, host=host("cgroup", "2-13"), leases=[])


@pytest.mark.parametrize("mode", ["isolcpus", "none"])
def test_all_vm_cpus_leased_shared_falls_back_to_housekeeping(mode: PartitionMode) -> None:
    plan = decide(spec(), host(mode, "4-15"), lease("4-15"))
    assert plan.default_cpus == C("0-3")
    assert any("housekeeping CPUs 0-3" in n and "leased" in n for n in plan.notes)


def test_all_vm_cpus_leased_is_refused_in_cgroup_mode() -> None:
    refused("insufficient-cpus", "/machine", "leased",
            spec=spec(), host=host("cgroup", "4-15"), leases=lease("4-15"))


def test_nothing_is_leased_where_the_vm_partition_leaves_the_host_no_cpu() -> None:
    """Mode cgroup with libvirt's ``machine`` as found (every CPU): the housekeeping CPUs,
    never leased, were none — the first lease took CPU 0 and host noise moved onto the
    other CPUs (real-libvirt hunt).  An exclusive domain or a job is refused naming the
    cgroup and the CPUs to give it; a shared domain runs on the VM CPUs as ever."""
    every = host("cgroup", "0-15", threads=2)
    for request in (spec(exclusive=True), JobSpec("j", count=1)):
        refused("no-housekeeping", "partition cgroup /machine (cpus 0-15) covers every "
                "online CPU", "cpuset.cpus = 1-7,9-15", "CPUs 0,8 for the host",
                "mode = \"auto\"", spec=request, host=every, leases=[])
    assert decide(spec(), every, []).default_cpus == C("0-15")
    assert decide(spec(exclusive=True), host("cgroup", "1-7,9-15", threads=2), []).leases
    # systemd's slice: its property (a write to its cgroup file is undone; the advice
    # said "cpuset.cpus =" where 'host' said "systemctl set-property": topology hunt)
    slice_host = replace(every, partition=replace(every.partition, cgroup="machine.slice"))
    refused("no-housekeeping", "give cgroup machine.slice the VM CPUs only ('systemctl "
            "set-property machine.slice AllowedCPUs=1-7,9-15', keeping CPUs 0,8",
            spec=spec(exclusive=True), host=slice_host, leases=[])


def test_an_isolcpus_list_of_every_online_cpu_is_refused_with_the_boot_fix() -> None:
    """``isolcpus=`` naming every online CPU: the refusal told to give a cgroup the VM CPUs
    or to set mode "auto" (the mode already in use), and said "the isolated CPUs … covers"
    (input hunt).  It names the kernel's list and the command line that fixes it."""
    every = host("isolcpus", "0-15", threads=2)
    refused("no-housekeeping", "the isolated CPUs 0-15 (isolcpus=) cover every online CPU",
            "boot with isolcpus= naming the VM CPUs only (isolcpus=1-7,9-15, keeping CPUs "
            "0,8 for the host)", spec=spec(exclusive=True), host=every, leases=[])


def test_shared_domain_may_not_pin_onto_leased_cpus() -> None:
    s = spec(vcpupins={0: C("8"), 1: C("9-10")})
    refused("conflict", "CPU 9", "qemu domain 'db'", "<vcpupin vcpu='1'",
            spec=s, host=host(), leases=lease("9", name="db"))
    refused("conflict", "CPU 9", spec=spec(cpuset=C("8-12")), host=host(),
            leases=lease("9", name="db"))


# -- input that cannot be placed --------------------------------------------------------


@pytest.mark.parametrize("exclusive", [False, True])
def test_nonexistent_and_offline_cpus_are_refused(exclusive: bool) -> None:
    h = host(offline="7")
    refused("unknown-cpu", "CPU 16", "<vcpupin vcpu='0' cpuset='16'>", "0-15",
            spec=spec(vcpupins={0: C("16"), 1: C("5")}, exclusive=exclusive), host=h,
            leases=[])
    refused("offline-cpu", "CPU 7", "<emulatorpin", spec=spec(
        vcpupins={0: C("5"), 1: C("6")}, emulatorpin=C("7"), exclusive=exclusive),
        host=h, leases=[])


def test_bad_pins_and_zero_vcpus_are_refused() -> None:
    refused("bad-pin", "vcpu='2'", "0-1", spec=spec(vcpupins={2: C("5")}), host=host(),
            leases=[])
    refused("bad-pin", "iothread='3'", "iothreads 1-2",
            spec=spec(iothreads=2, iothreadpins={3: C("5")}), host=host(), leases=[])
    refused("bad-pin", "no iothreads", spec=spec(iothreadpins={1: C("5")}), host=host(),
            leases=[])
    refused("no-vcpus", "vm1", spec=spec(vcpus=0), host=host(), leases=[])


def test_iothreadids_are_the_valid_iothread_ids() -> None:
    s = spec(iothreads=2, iothread_ids=(4, 7), iothreadpins={7: C("9")})
    plan = decide(s, host(), [])
    assert plan.iothreads == {4: C("4-15"), 7: C("9")}


# -- exclusive domains ---------------------------------------------------------------------


def test_exclusive_pins_onto_housekeeping_are_refused() -> None:
    s = spec(exclusive=True, vcpupins={0: C("3"), 1: C("4")})
    refused("host-cpu", "CPU 3", "housekeeping", "4-15", spec=s, host=host(), leases=[])
    refused("host-cpu", "CPU 0", "<emulatorpin>", spec=spec(
        exclusive=True, vcpupins={0: C("5"), 1: C("6")}, emulatorpin=C("0")), host=host(),
        leases=[])
    # in cgroup mode the partition check names the cgroup
    refused("outside-partition", "/machine", spec=s, host=host("cgroup", "4-15"), leases=[])


def test_exclusive_requires_every_vcpu_pinned() -> None:
    refused("bad-pin", "vCPU 1", spec=spec(exclusive=True, vcpupins={0: C("5")}),
            host=host(), leases=[])


def test_exclusive_vcpus_sharing_a_cpu_lease_it_once() -> None:
    plan = decide(spec(vcpus=3, exclusive=True,
                       vcpupins={0: C("5"), 1: C("5"), 2: C("6-7")}), host(), [])
    assert plan.leases == {5: "vcpu0", 6: "vcpu2", 7: "vcpu2"}
    assert plan.emulator == C("5-7")  # float over its own vCPU CPUs
    assert plan.default_cpus == C("5-7")


def test_explicit_emulatorpin_overlapping_own_vcpus_keeps_vcpu_role() -> None:
    plan = decide(spec(exclusive=True, vcpupins={0: C("5"), 1: C("6")},
                       emulatorpin=C("6-7")), host(), [])
    assert plan.leases == {5: "vcpu0", 6: "vcpu1", 7: "emulator"}


def test_exclusive_conflict_with_other_holder_names_what_to_do() -> None:
    s = spec(exclusive=True, vcpupins={0: C("5"), 1: C("6")}, emulatorpin=C("4"))
    err = refused("conflict", "CPU 4", "emulatorpin", "qemu domain 'web'", "(vcpu3)",
                  "pinwarden release web", spec=s, host=host(),
                  leases=lease("4", name="web", role="vcpu3"))
    assert "vm1" in err.message


def test_emulator_isolate_with_pins_leases_one_more_cpu_near_the_vcpus() -> None:
    s = spec(exclusive=True, emulator="isolate", vcpupins={0: C("12"), 1: C("13")})
    plan = decide(s, host(), lease("4-11"))
    (emu,) = plan.emulator
    assert plan.leases == {12: "vcpu0", 13: "vcpu1", emu: "emulator"}
    assert emu in C("14-15")  # node 1, like the vCPUs; not the leased CPUs


def test_an_isolated_emulator_goes_elsewhere_when_the_vcpus_node_is_full() -> None:
    """Near the pinned vCPUs when their node has a free CPU, else on another node (noted):
    not a refusal while a VM CPU is free."""
    s = spec(exclusive=True, emulator="isolate", vcpupins={0: C("12"), 1: C("13")})
    plan = decide(s, host(), lease("8-11,14-15"))  # node 1 (CPUs 8-15) is full
    (emu,) = plan.emulator
    assert emu in C("4-7")
    assert plan.leases == {12: "vcpu0", 13: "vcpu1", emu: "emulator"}
    assert any("no CPU of NUMA node 1" in n and "runs on node 0" in n for n in plan.notes)
    assert not decide(s, host(), lease("8-11")).notes  # room near: nothing to say
    refused("insufficient-cpus", spec=s, host=host(), leases=lease("4-11,14-15"))


def test_a_domain_no_one_node_can_hold_is_split_and_the_plan_says_so() -> None:
    """Four free CPUs on each node (4-7, 12-15): six vCPUs span both nodes, noted with
    why and what lets the guest see it; four fit on one node, and nothing is said."""
    big = decide(spec(vcpus=6, exclusive=True), host(), lease("8-11"))
    assert len(big.leased()) == 6 and big.leased() <= C("4-7,12-15")
    (note,) = big.notes
    assert note.startswith("the vCPUs of domain 'vm1' span NUMA nodes 0-1: no one node had "
                           "room for its 6 vCPUs (thread policy 'whole')"), note
    assert "<cpu><numa><cell>" in note
    small = decide(spec(vcpus=4, exclusive=True), host(), lease("8-11"))
    assert small.notes == () and len(small.leased()) == 4
    assert small.leased() <= C("4-7") or small.leased() <= C("12-15")


def test_a_refusal_counting_an_isolated_emulator_says_so() -> None:
    """'cannot place 3 CPUs' for a 2-vCPU domain: the third is its isolated emulator, and
    emulator='float' is what would fit."""
    s = spec(exclusive=True, emulator="isolate")
    message = refused("insufficient-cpus", spec=s, host=host(), leases=lease("4-13")).message
    assert "cannot place 3 CPUs (2 vCPUs and one for the isolated emulator)" in message
    assert "emulator='float'" in message
    assert decide(replace(s, emulator="float"), host(), lease("4-13")).leased() == C("14-15")


def test_a_refused_isolated_emulator_beside_pinned_vcpus_is_named_as_such() -> None:
    """Pinned vCPUs that fit, and no CPU left for the isolated emulator: the refusal says
    the emulator is what lacks a CPU and that emulator='float' starts the domain; it does
    not tell the user to lower the vCPU count."""
    s = spec(exclusive=True, emulator="isolate", vcpupins={0: C("4"), 1: C("5")})
    message = refused("insufficient-cpus", spec=s, host=host(), leases=lease("6-15")).message
    assert "cannot place a CPU for the isolated emulator: only 0 free CPUs" in message
    assert "use emulator='float'" in message and "vCPU count" not in message
    assert decide(replace(s, emulator="float"), host(), lease("6-15")).leased() == C("4-5")
    plain = refused("insufficient-cpus", spec=spec(exclusive=True, vcpus=3), host=host(),
                    leases=lease("4-13")).message
    assert "emulator" not in plain


def test_a_refusal_for_cpus_the_domains_own_pins_keep_names_those_pins() -> None:
    """An unpinned exclusive domain's vCPUs stay off the CPUs its own <emulatorpin> and
    <iothreadpin> lease: with no other CPU free the refusal names those pins and the way
    out (pin the vCPUs too, sharing them), not only 'only 0 free CPUs; lower the vCPU
    count' — which read as if the host had nothing free."""
    h = host(vm="4-5")  # VM CPUs 4-5; 5 leased below: only CPU 4 is free
    for pins, what in [({"emulatorpin": C("4")}, "<emulatorpin>"),
                       ({"iothreadpins": {1: C("4")}}, "<iothreadpin>"),
                       ({"emulatorpin": C("4"), "iothreadpins": {1: C("4")}},
                        "<emulatorpin> and <iothreadpin>")]:
        s = spec(vcpus=1, exclusive=True, iothreads=1, **pins)
        message = refused("insufficient-cpus", f"CPU 4 is kept for its own {what}, off its "
                          "vCPUs: pin the vCPUs too (<vcpupin> may share it)",
                          spec=s, host=h, leases=lease("5")).message
        assert "CPU 5" in message and "other" in message, message  # who holds the rest
        shared = decide(replace(s, vcpupins={0: C("4")}), h, lease("5"))
        assert shared.vcpus == {0: C("4")} and shared.leased() == C("4")
    plain = refused("insufficient-cpus", spec=spec(vcpus=2, exclusive=True), host=h,
                    leases=lease("5")).message
    assert "kept for" not in plain and "lower the vCPU count" in plain
    # a 1-vCPU domain has no vCPU count to lower (a real-libvirt hunt found it advised)
    one = refused("insufficient-cpus", spec=spec(vcpus=1, exclusive=True), host=h,
                  leases=lease("4-5")).message
    assert "cannot place 1 CPU: only 0 free CPUs; leased now" in one, one
    assert "lower" not in one, one


def test_a_preferred_nodeset_is_left_only_when_it_has_no_room() -> None:
    """<numatune> mode='preferred': the CPUs come from its nodes while they have room, else
    from any node (noted), as the memory would; 'strict' (the default) stays a limit."""
    h = host()
    preferred = spec(vcpus=2, exclusive=True, numa_mode="preferred", numa_nodeset=C("1"))
    assert decide(preferred, h, []).leased() <= C("8-15")
    plan = decide(preferred, h, lease("8-14"))
    assert plan.leased() <= C("4-7") | C("15") and len(plan.leased()) == 2
    assert any("NUMA node 1 (preferred by <numatune>) had no room" in n for n in plan.notes)
    strict = spec(vcpus=2, exclusive=True, numa_mode="strict", numa_nodeset=C("1"))
    refused("insufficient-cpus", spec=strict, host=h, leases=lease("8-14"))
    emulator = spec(vcpus=2, exclusive=True, emulator="isolate", numa_mode="preferred",
                    numa_nodeset=C("1"), vcpupins={0: C("14"), 1: C("15")})
    plan = decide(emulator, h, lease("8-13"))
    assert plan.emulator <= C("4-7")
    assert any("preferred by <numatune>" in n for n in plan.notes)


def cells(*groups: str) -> tuple[GuestCell, ...]:
    return tuple(GuestCell(i, C(g), 1024) for i, g in enumerate(groups))


def nodes_of(h: Host, cpus: CpuSet) -> CpuSet:
    return CpuSet.of(h.topology.node_of(c) for c in cpus)


def test_guest_numa_cells_are_placed_cell_by_cell_on_their_memory_nodes() -> None:
    """Each guest cell's vCPUs on one host node, the node of its memory (<memnode>) when
    that has room; an isolated emulator goes with cell 0."""
    h = host()  # node 0: CPUs 0-7, node 1: 8-15; VM CPUs 4-15
    crossed = spec(vcpus=4, exclusive=True, guest_cells=cells("0-1", "2-3"),
                   memnodes={0: C("1"), 1: C("0")}, emulator="isolate")
    plan = decide(crossed, h, [])
    assert nodes_of(h, plan.vcpus[0] | plan.vcpus[1]) == C("1")
    assert nodes_of(h, plan.vcpus[2] | plan.vcpus[3]) == C("0")
    assert nodes_of(h, plan.emulator) == C("1") and plan.emulator not in plan.vcpus.values()
    assert len(plan.leased()) == 5 and not plan.notes
    # without <memnode>: no cell split over two nodes, where placing the domain as one
    # would (node 0 has 2 CPUs free, node 1 three)
    taken = lease("4-5,8-12")
    split = decide(spec(vcpus=4, exclusive=True), h, taken)
    assert len(nodes_of(h, split.vcpus[0] | split.vcpus[1])) == 2  # what it was
    plan = decide(spec(vcpus=4, exclusive=True, guest_cells=cells("0-1", "2-3")), h, taken)
    for pair in ((0, 1), (2, 3)):
        assert len(nodes_of(h, plan.vcpus[pair[0]] | plan.vcpus[pair[1]])) == 1, plan.vcpus
    # a memory node without room: the cell's vCPUs go elsewhere, noted
    full = decide(crossed, h, lease("4-7"))
    assert nodes_of(h, full.leased()) == C("1")
    assert any("guest NUMA cell 1" in n and "node 0 (<memnode>)" in n for n in full.notes)
    # cells that leave a vCPU out, overlap or repeat an id: the domain is placed as one, as
    # before, and says why (the README said "noted", and nothing was: input hunt)
    for cell_list, why in ((cells("0-1", "2"), "vCPU 3 is in no cell"),
                           (cells("0-2", "2-3"), "vCPU 2 is in cells 0, 1"),
                           (cells("0-1", "2-4"), "cell 1 names vCPU 4 of 4"),
                           ((GuestCell(0, C("0-1"), 1024), GuestCell(0, C("2-3"), 1024)),
                            "cell id 0 is given twice")):
        together = decide(spec(vcpus=4, exclusive=True, guest_cells=cell_list), h, taken)
        assert replace(together, notes=split.notes) == split
        assert [n for n in together.notes if n not in split.notes] == [
            f"the guest NUMA cells of domain 'vm1' do not divide its 4 vCPUs between them "
            f"({why}): its vCPUs were placed together"], together.notes


def test_guest_cells_that_cannot_be_placed_one_by_one_are_placed_together() -> None:
    """Cells of 3 vCPUs under 'whole' on two-thread cores take two cores each; where the
    four cores are not free but three are, the domain still gets its six CPUs, as one."""
    h = host("isolcpus", "4-15,20-31", cpus=32, threads=2)  # core k: CPUs k and k+16
    s = spec(vcpus=6, exclusive=True, guest_cells=cells("0-2", "3-5"))
    apart = decide(s, h, [])
    assert len(apart.leased()) == 8 and not apart.notes  # a spare thread held per cell
    together = decide(s, h, lease("4-12,20-28"))  # three whole cores left: 13-15
    assert len(together.vcpus) == 6 and together.leased() == C("13-15,29-31")
    assert any("could not be placed one by one" in n for n in together.notes)


def test_emulator_shared_is_planned_as_float_with_a_note() -> None:
    """The emulator of an exclusive domain lives in the domain's cgroup, the partition of
    its leased CPUs, which the kernel keeps it in: 'shared' planned the shared pool, and
    the start failed on cgroup v1 ("Permission denied") or, through the hook, ran the
    emulator on the lease unlike the plan (real-libvirt hunt).  It floats, and says why."""
    s = spec(exclusive=True, emulator="shared", vcpupins={0: C("5"), 1: C("6")})
    plan = decide(s, host(), lease("10-15"))
    floating = decide(replace(s, emulator="float"), host(), lease("10-15"))
    assert plan.emulator == floating.emulator == C("5-6")
    assert plan.leases == floating.leases == {5: "vcpu0", 6: "vcpu1"}
    assert plan.notes == ("emulator='shared' of exclusive domain 'vm1' cannot be honoured: "
                          "its emulator and I/O threads live in its cgroup, the partition of "
                          "its leased CPUs, and run there (as emulator='float')",
                          *floating.notes)


def test_iothreads_float_with_the_emulator_or_are_leased_when_pinned() -> None:
    s = spec(exclusive=True, iothreads=2, vcpupins={0: C("5"), 1: C("6")},
             emulatorpin=C("4"), iothreadpins={2: C("7")})
    plan = decide(s, host(), [])
    assert plan.iothreads == {1: C("4"), 2: C("7")}
    assert plan.leases == {4: "emulator", 5: "vcpu0", 6: "vcpu1", 7: "iothread2"}


def test_exclusive_isolate_with_pins_holds_sibling_threads() -> None:
    h = host("isolcpus", "2-7,10-15", cpus=16, threads=2)  # siblings: n and n+8
    s = spec(exclusive=True, threads="isolate", vcpupins={0: C("2"), 1: C("3")})
    plan = decide(s, h, [])
    assert plan.leases == {2: "vcpu0", 3: "vcpu1", 10: SIBLING_HOLD, 11: SIBLING_HOLD}
    refused("conflict", "CPU 10", "sibling", spec=s, host=h, leases=lease("10"))
    refused("host-cpu", "CPU 9", "sibling", spec=spec(
        exclusive=True, threads="isolate", vcpupins={0: C("1"), 1: C("2")}),
        host=host("isolcpus", "1-7,10-15", threads=2), leases=[])


def test_exclusive_without_pins_uses_the_allocator() -> None:
    h = host("isolcpus", "2-7,10-15", cpus=16, threads=2, nodes=1)
    plan = decide(spec(vcpus=2, exclusive=True), h, lease("2"))
    cpus = [next(iter(plan.vcpus[v])) for v in range(2)]
    assert all(len(plan.vcpus[v]) == 1 for v in range(2))
    assert len(set(cpus)) == 2 and not set(cpus) & {0, 1, 8, 9, 2}
    assert plan.leases == {cpus[0]: "vcpu0", cpus[1]: "vcpu1"}
    assert plan.emulator == CpuSet.of(cpus) and plan.default_cpus == CpuSet.of(cpus)


def test_exclusive_without_pins_isolate_threads_and_emulator() -> None:
    h = host("isolcpus", "2-7,10-15", cpus=16, threads=2, nodes=1)
    plan = decide(spec(vcpus=2, exclusive=True, threads="isolate", emulator="isolate"), h, [])
    roles = sorted(plan.leases.values())
    assert roles == ["emulator", *[SIBLING_HOLD] * 3, "vcpu0", "vcpu1"]
    for cpu, role in plan.leases.items():
        if role != SIBLING_HOLD:  # each thread alone on its core
            sibling = h.topology.siblings(cpu) - CpuSet.of([cpu])
            assert all(plan.leases[s] == SIBLING_HOLD for s in sibling)


def test_exclusive_without_pins_honours_numatune_and_cpuset() -> None:
    plan = decide(spec(vcpus=2, exclusive=True, numa_nodeset=C("1")), host(), [])
    assert plan.leased() <= C("8-15")
    plan = decide(spec(vcpus=2, exclusive=True, cpuset=C("5-7")), host(), lease("6"))
    assert plan.leased() == C("5,7")


def test_a_cpuset_without_room_is_named_in_the_refusal() -> None:
    """When the VM CPUs have room but ``<vcpu cpuset>`` does not (here: one thread of each
    of two cores, under whole cores), the refusal names the cpuset and what to do; without a
    cpuset the refusal does not mention one."""
    h = host(vm="2-7,10-15", threads=2)
    refused("insufficient-cpus", "<vcpu cpuset='2,11'> limits it to CPUs 2,11", "widen it",
            "nothing else is leased",
            spec=spec(vcpus=2, exclusive=True, cpuset=C("2,11")), host=h, leases=[])
    assert decide(spec(vcpus=2, exclusive=True, cpuset=C("2,10")), h, []).leased() == C("2,10")
    message = refused("insufficient-cpus", spec=spec(vcpus=13, exclusive=True), host=h,
                      leases=[]).message
    assert "cpuset" not in message


def test_exclusive_without_room_is_refused() -> None:
    refused("insufficient-cpus", "vm1", spec=spec(vcpus=4, exclusive=True), host=host(),
            leases=lease("4-13"))


def test_decide_is_deterministic_and_ignores_lease_order() -> None:
    s = spec(vcpus=3, exclusive=True, emulator="isolate")
    others = lease("4-5", "a") + lease("9", "b")
    plans = [decide(s, host(), order) for order in (others, others[::-1], others * 2)]
    assert plans[0] == plans[1] == plans[2]


def test_metadata_form_from_xml() -> None:
    xml = f"""<domain><name>m</name><vcpu>2</vcpu><metadata>
      <pw:cpu xmlns:pw="{PW_NS}" exclusive="yes" emulator="isolate"/></metadata></domain>"""
    plan = decide(parse_domain(xml), host(), [])
    assert sorted(plan.leases.values()) == ["emulator", "vcpu0", "vcpu1"]


# -- wording of refusals and notes ----------------------------------------------------------


@pytest.mark.parametrize(("holder", "command"), [
    (domain_holder("qemu", "my vm", None), "(pinwarden release 'my vm' --driver qemu)"),
    (domain_holder("lxc", "web", None), "(pinwarden release web --driver lxc)"),
    (job_holder("web"), "(pinwarden release web --driver run)"),
    (domain_holder("qemu", "-x", None), "(pinwarden release --driver qemu -- -x)"),
    (domain_holder("qemu", "a\x1bb", "6f" * 16), f"(pinwarden release {'6f' * 16})"),
])
def test_conflict_suggests_a_release_command_that_works_as_typed(holder: HolderRef,
                                                                 command: str) -> None:
    """The name quoted for the shell, the driver given (a job and a domain may share a
    name: a bare name is then ambiguous), a name starting with '-' after '--', and a name
    the terminal would mangle replaced by the UUID."""
    held = [Lease(cpu, holder, "vcpu0", 0.0) for cpu in C("5-6")]
    err = refused("conflict", spec=spec(vcpupins={0: C("5-6")}), host=host(), leases=held)
    assert err.message.endswith(f"or release it first {command}"), err.message
    assert "(and 1 more leased CPU)" in err.message



@pytest.mark.parametrize(("holder", "command"), [
    (domain_holder("qemu", "my vm", None), "(pinwarden stop 'my vm': its leases go with it)"),
    (domain_holder("lxc", "web", None), "(virsh -c lxc:/// destroy web: its leases go"),
    (job_holder("web"), "(kill 4242: its leases go with it)"),
    (domain_holder("qemu", "a\x1bb", "6f" * 16), f"(virsh destroy {'6f' * 16}: its leases"),
])
def test_conflict_with_a_running_holder_says_to_stop_it(holder: HolderRef,
                                                         command: str) -> None:
    """A holder with an owner process runs (its QEMU, container, job): 'pinwarden release'
    refuses it ("still runs"), so the refusal says how to stop it, which frees its leases.
    Before, it said "release it first", whose own refusal then said to stop it."""
    held = [Lease(5, holder, "vcpu0", 0.0, owner_pid=4242)]
    err = refused("conflict", spec=spec(vcpupins={0: C("5")}), host=host(), leases=held)
    assert f"choose other CPUs or stop it first {command}" in err.message, err.message


def test_one_vm_cpu_is_named_as_one() -> None:
    err = refused("host-cpu", spec=spec(vcpus=1, exclusive=True, vcpupins={0: C("2")}),
                  host=host("none", "1", cpus=4), leases=[])
    assert "outside the VM CPU 1 (online minus host reserve)" in err.message
    assert err.message.endswith("housekeeping CPUs are never leased: pick from CPU 1")
    err = refused("host-cpu", spec=spec(vcpus=1, exclusive=True, vcpupins={0: C("2")}),
                  host=host("isolcpus", "1", cpus=4), leases=[])
    assert "outside the isolated CPU 1;" in err.message


def test_a_cpuset_of_one_cpu_is_named_as_one() -> None:
    refused("insufficient-cpus", "<vcpu cpuset='3'> limits it to CPU 3: widen it",
            spec=spec(vcpus=2, exclusive=True, cpuset=C("3")), host=host("none", "1-15"),
            leases=[])


def test_housekeeping_siblings_are_worded_for_one_or_several() -> None:
    h = host("none", "1-15", threads=2)  # cores {k, k + 8}: CPU 0 is housekeeping
    err = refused("host-cpu", spec=spec("p4", 1, exclusive=True, vcpupins={0: C("8")},
                                        threads="isolate"), host=h, leases=[])
    assert err.message.startswith(
        "CPU 0 is a sibling thread of the CPUs of domain 'p4', which thread policy "
        "'isolate' must hold empty, but it is a housekeeping CPU"), err.message
    plan = decide(spec("p4", 1, exclusive=True, vcpupins={0: C("8")}), h, [])
    assert plan.notes == ("housekeeping CPU 0 shares a core with the CPUs of domain 'p4'; it "
                          "stays the host's (housekeeping CPUs are never leased)",)
    plan = decide(spec("p4", 2, exclusive=True, vcpupins={0: C("8"), 1: C("9")}),
                  host("none", "2-15", threads=2), [])
    assert plan.notes[0].startswith("housekeeping CPUs 0-1 share cores with the CPUs of "
                                    "domain 'p4'; they stay the host's")


def test_cores_the_host_reserve_splits_are_said_under_every_thread_policy() -> None:
    """A host reserve (or partition) that splits a core: 'prefer' took that core first and
    said nothing of sharing it with the host, and a whole-core policy's refusal advised
    sharing cores "with other holders", with no other holder there (CLI hunt)."""
    h = host("none", "0", threads=2)  # cores {k, k + 8}: CPU 0 a VM CPU, its sibling 8 not
    plan = decide(spec("p", 1, exclusive=True, threads="prefer"), h, [])
    assert plan.leased() == C("0")
    assert plan.notes == ("housekeeping CPU 8 shares a core with the CPUs of domain 'p': "
                          "thread policy 'prefer' shares cores with the host too",)
    for threads in ("whole", "isolate"):
        err = refused("insufficient-cpus", spec=spec("w", 1, exclusive=True, threads=threads),
                      host=h, leases=[])
        assert err.message.endswith(
            "; CPU 0 shares a core with housekeeping CPU 8 (the host's CPUs split its core): "
            "give the host whole cores, or use thread policy 'prefer', which shares it with "
            "the host"), err.message
    whole = host("none", "1-7,9-15", threads=2)  # whole cores: nothing to say
    assert decide(spec("p", 1, exclusive=True, threads="prefer"), whole, []).notes == ()


def test_sharing_cores_is_advised_as_each_holder_asks_for_it() -> None:
    """A job opts in with ``--threads prefer``, a domain in its ``<pw:cpu>`` metadata."""
    h = host("none", "1-15", threads=2)
    held = lease("9", "p4")  # the sibling of CPU 1
    job = refused("conflict", "CPU 9 for the sibling threads held empty (thread policy "
                  "'whole') of job 'J'", spec=JobSpec("J", cpus=C("1")), host=h, leases=held)
    assert "choose other CPUs on whole free cores, opt in to sharing cores with --threads " \
        "prefer, or release it first (pinwarden release p4 --driver qemu)" in job.message
    assert "threads='prefer'" not in job.message
    dom = refused("conflict", spec=spec("d", 1, exclusive=True, vcpupins={0: C("1")}),
                  host=h, leases=held)
    assert "opt in to sharing cores with <pw:cpu threads='prefer'>, or release" in dom.message


def test_held_siblings_of_a_job_are_worded_for_one_or_several() -> None:
    h = host("none", "1-15", threads=2)
    assert decide(JobSpec("J", count=1), h, []).notes == ("sibling thread 9 is held empty",)
    assert decide(JobSpec("J", cpus=C("1-2")), h, []).notes == \
        ("sibling threads 9-10 are held empty",)


def test_a_running_job_is_told_how_to_release_it() -> None:
    held = [Lease(5, job_holder("J"), "task", 0.0)]
    refused("job-exists", "release it with `pinwarden release J --driver run`",
            spec=JobSpec("J", count=1), host=host(), leases=held)


def test_only_holders_of_cpus_the_request_may_use_are_advised_to_release() -> None:
    """Releasing a holder whose CPUs lie outside the ``<numatune>`` nodes or the ``<vcpu
    cpuset>`` frees nothing the request could use: it is not advised."""
    h = host("none", "1-15")  # node 0: CPUs 0-7, node 1: 8-15
    on_node_1 = spec(vcpus=8, exclusive=True, numa_nodeset=C("1"))
    err = refused("insufficient-cpus", "only 6 free CPUs on NUMA node 1;",
                  "leased now: CPUs 8-9 to qemu domain 'near' — release one of them",
                  spec=on_node_1, host=h, leases=lease("1-3", "far") + lease("8-9", "near"))
    assert "'far'" not in err.message
    err = refused("insufficient-cpus", "no CPU it may use is leased to another holder",
                  spec=replace(on_node_1, vcpus=9), host=h, leases=lease("1-3", "far"))
    assert "'far'" not in err.message and "release one of them" not in err.message
    in_cpuset = spec(vcpus=3, exclusive=True, cpuset=C("8-9"))
    err = refused("insufficient-cpus", "leased now: CPU 9 to qemu domain 'near' —",
                  spec=in_cpuset, host=h, leases=lease("1-3", "far") + lease("9", "near"))
    assert "'far'" not in err.message
    err = refused("insufficient-cpus", "no CPU it may use is leased to another holder",
                  spec=in_cpuset, host=h, leases=lease("1-3", "far"))
    assert "'far'" not in err.message
    # nothing narrows a request without nodeset or cpuset: every holder is named
    refused("insufficient-cpus", "leased now: CPUs 1-3 to qemu domain 'far'",
            spec=spec(vcpus=13, exclusive=True), host=h, leases=lease("1-3", "far"))


def test_preferred_nodes_are_named_as_one_or_several() -> None:
    h = host("none", "1-15", nodes=4)  # nodes of 4 CPUs: 0-3, 4-7, 8-11, 12-15
    plan = decide(spec(vcpus=4, exclusive=True, numa_nodeset=C("1"), numa_mode="preferred"),
                  h, lease("5"))
    assert any(n.startswith("NUMA node 1 (preferred by <numatune>) had no room for domain "
                            "'vm1': CPUs ") and n.endswith(" on node 2") for n in plan.notes), \
        plan.notes
    plan = decide(spec(vcpus=7, exclusive=True, numa_nodeset=C("1-2"), numa_mode="preferred"),
                  h, lease("5,9"))
    assert any(n.startswith("NUMA nodes 1-2 (preferred by <numatune>)") and
               n.endswith(" on nodes 0,3") for n in plan.notes), plan.notes


# -- real topologies (hwloc sysfs dumps) -------------------------------------------------


def _real_host(root: Path) -> Host:
    from pinwarden.topology import read_topology
    topo = read_topology(root)
    reserve = topo.cores()[0]
    vm = topo.online - reserve
    return Host(topo, Partition("none", vm, reserve, "test: first core reserved"))


@pytest.mark.parametrize("dump", HWLOC_DUMPS)
def test_rules_on_real_topologies(hwloc_roots: dict[str, Path], dump: str) -> None:
    h = _real_host(hwloc_roots[dump])
    vm = h.partition.vm_cpus
    assert vm, f"{dump}: no VM CPUs"
    shared = decide(spec("web"), h, [])
    assert shared.default_cpus == vm and not shared.leases
    vcpus = 2 if len(vm) >= 3 else 1
    emulator = "isolate" if len(vm) > vcpus else "float"
    exclusive = decide(spec("db", vcpus=vcpus, exclusive=True, emulator=emulator), h, [])
    assert exclusive.leased() <= vm
    assert len(exclusive.leases) >= vcpus + (emulator == "isolate")
    held = [Lease(c, HolderRef("qemu", "db", "db"), r, 0.0)
            for c, r in exclusive.leases.items()]
    after = decide(spec("web"), h, held)
    rest = vm - exclusive.leased()
    if rest:
        assert after.default_cpus == rest and not after.notes
    else:  # every VM CPU leased: housekeeping fallback, with a note
        assert after.default_cpus == h.partition.host_cpus and after.notes
    first = exclusive.vcpus[0].first()
    refused("conflict", f"CPU {first}", "qemu domain 'db'",
            spec=spec("x", vcpus=1, exclusive=True, vcpupins={0: CpuSet.of([first])}),
            host=h, leases=held)
    hk = h.partition.host_cpus.first()
    refused("host-cpu", f"CPU {hk}", spec=spec("y", vcpus=1, exclusive=True,
                                               vcpupins={0: CpuSet.of([hk])}),
            host=h, leases=held)


def test_a_memory_only_numa_node_is_one_the_host_has(hwloc_roots: dict[str, Path]) -> None:
    """A GPU's memory as NUMA nodes without CPUs (250-255 on this dump): a <numatune>
    naming one was refused as "a node this host does not have" (hunt), shared domains
    too.  Now the CPUs go to the nodeset's nodes that have CPUs, or anywhere when it names
    none, with a note; a node the host really lacks is still refused."""
    h = _real_host(hwloc_roots["nvidiagpunumanodes"])
    memory_only = CpuSet.of(n for n, cpus in h.topology.nodes.items() if not cpus)
    assert CpuSet.parse("250-255") <= memory_only, h.topology.nodes
    with_cpus = sorted(n for n, cpus in h.topology.nodes.items() if cpus)
    shared = decide(spec("gpu", numa_nodeset=C("250")), h, [])
    assert shared.default_cpus == h.partition.vm_cpus, shared
    assert any("memory-only NUMA node 250" in n for n in shared.notes), shared.notes
    # (it read "domain 'gpu''s <numatune>": topology hunt)
    assert any("the <numatune> of " in n for n in shared.notes), shared.notes
    last = with_cpus[-1]
    exclusive = decide(spec("gpux", vcpus=2, exclusive=True,
                            numa_nodeset=CpuSet.of([last, 251])), h, [])
    assert {h.topology.node_of(c) for c in exclusive.leased()} == {last}, exclusive
    assert any(f"its CPUs are placed on node {last}" in n for n in exclusive.notes), \
        exclusive.notes
    refused("unknown-node", "NUMA node 249", spec=spec("x", numa_nodeset=C("249")), host=h,
            leases=[])
    # a <memnode> naming a node the host lacks: refused as well (it got a plan with a
    # note that the node "had no room", and libvirt failed the start: corpus hunt); one
    # naming a memory-only node is fine
    refused("unknown-node", "<memnode cellid='0'>", "NUMA node 7",
            spec=spec("m", memnodes={0: C("7")}), host=h, leases=[])
    assert decide(spec("m", memnodes={0: C("250")}), h, []).default_cpus == \
        h.partition.vm_cpus


def test_a_domain_of_another_hypervisor_is_planned_saying_so(
        hwloc_roots: dict[str, Path]) -> None:
    """xen, vmware, bhyve … domains were planned and reserved as QEMU ones without a word
    (corpus hunt): the plan says that nothing of pinwarden's runs for their driver."""
    h = _real_host(hwloc_roots["nvidiagpunumanodes"])
    for kind in ("xen", "vmware", "bhyve"):
        plan = decide(replace(spec("other"), domain_type=kind), h, [])
        assert any(f"is a '{kind}' domain: pinwarden places QEMU/KVM and LXC" in n
                   for n in plan.notes), plan.notes
    for kind in ("kvm", "qemu", None):
        plan = decide(replace(spec("other"), domain_type=kind), h, [])
        assert not any("pinwarden places QEMU/KVM" in n for n in plan.notes), plan.notes


def test_offline_cpu_dump_refuses_the_offline_cpu(hwloc_roots: dict[str, Path]) -> None:
    h = _real_host(hwloc_roots["offline-cpu0-node0"])
    offline = h.topology.present - h.topology.online
    assert offline, "the dump has an offline CPU"
    cpu = offline.first()
    refused("offline-cpu", f"CPU {cpu}", spec=spec(vcpus=1, vcpupins={0: CpuSet.of([cpu])}),
            host=h, leases=[])


# -- property: leases never collide, housekeeping never leased -------------------------


NAMES = ["a", "b", "c", "d"]
#: Mostly CPUs every host below gives VMs (so plans meet), sometimes any (so rules bite).
cpu_numbers = st.one_of(st.integers(4, 13), st.integers(4, 13), st.integers(4, 13),
                        st.integers(0, 17))
cpu_sets = st.sets(cpu_numbers, min_size=1, max_size=2).map(CpuSet.of)


@st.composite
def domain_specs(draw: st.DrawFn) -> DomainSpec:
    vcpus = draw(st.integers(1, 3))
    exclusive = draw(st.booleans())
    pins = draw(st.one_of(st.just({}), st.fixed_dictionaries(
        {v: cpu_sets for v in range(vcpus)})))
    iothreads = draw(st.integers(0, 2))
    split = draw(st.integers(0, vcpus - 1))  # guest NUMA cells: none, or two (0-k, k+1-)
    guest = () if split == 0 else cells(f"0-{split - 1}", f"{split}-{vcpus - 1}")
    memnodes = draw(st.dictionaries(st.sampled_from([c.id for c in guest] or [0]),
                                    st.sampled_from([C("0"), C("1")]), max_size=2)) \
        if guest else {}
    return DomainSpec(
        guest_cells=guest, memnodes=memnodes,
        name=draw(st.sampled_from(NAMES)), uuid=None, vcpus=vcpus, vcpupins=pins,
        emulatorpin=draw(st.none() | cpu_sets), cpuset=draw(st.none() | cpu_sets),
        exclusive=exclusive, iothreads=iothreads,
        iothreadpins=draw(st.dictionaries(st.integers(1, iothreads + 1), cpu_sets,
                                          max_size=iothreads)),
        numa_nodeset=draw(st.none() | st.sampled_from([C("0"), C("1"), C("0-1")])),
        threads=draw(st.sampled_from(["whole", "prefer", "isolate", "require"])),
        emulator=draw(st.sampled_from(["float", "isolate", "shared"])))


HOSTS = [host("isolcpus", "4-15", threads=2, offline="14"), host("cgroup", "2-13"),
         host("none", "1-15", nodes=1)]


@settings(max_examples=300, deadline=None)
@given(h=st.sampled_from(HOSTS), ops=st.lists(
    st.one_of(domain_specs(), st.sampled_from(NAMES)), min_size=1, max_size=12))
def test_random_operations_keep_leases_exclusive(h: Host, ops: list[object]) -> None:
    table: dict[int, Lease] = {}  # the ledger: cpu -> lease
    for op in ops:
        if isinstance(op, str):  # release
            table = {c: le for c, le in table.items() if le.holder.name != op}
            continue
        assert isinstance(op, DomainSpec)
        holder = holder_of(op)
        try:
            plan: Plan = decide(op, h, list(table.values()))
        except Refusal as exc:
            event(f"refused: {exc.code}")
            continue
        event("planned exclusive" if plan.exclusive else "planned shared")
        others = {c: le for c, le in table.items() if le.holder != holder}
        # never a second holder, never a housekeeping CPU
        assert plan.leased().isdisjoint(CpuSet(frozenset(others)))
        assert plan.leased() <= h.partition.vm_cpus
        # nobody runs on someone else's CPUs
        assert plan.cpus().isdisjoint(CpuSet(frozenset(others)))
        assert plan.cpus() <= h.topology.online
        if plan.exclusive:
            owned = plan.cpus() if op.emulator != "shared" else union_of_vcpus(plan)
            assert owned <= plan.leased()
            # no physical core is split between two holders (prefer opts in to it)
            if op.threads != "prefer":
                cores = CpuSet.of(s for c in plan.leased() for s in h.topology.siblings(c))
                assert cores.isdisjoint(CpuSet(frozenset(others)))
        table = others | {c: Lease(c, holder, r, 0.0) for c, r in plan.leases.items()}


def union_of_vcpus(plan: Plan) -> CpuSet:
    out = CpuSet()
    for cpus in plan.vcpus.values():
        out = out | cpus
    return out


def test_numad_placement_becomes_static_with_a_note() -> None:
    """numad's placement of CPUs and memory taken over: the memory goes to the nodes of
    the planned CPUs (rendered into <numatune><memory nodeset>), and the note says so."""
    plan = decide(spec(placement="auto"), host(), lease("4"))
    assert plan.default_cpus == C("5-15") and plan.memory_nodes == C("0-1")
    assert any("placement='auto'" in n and "5-15" in n and "memory on NUMA nodes 0-1" in n
               for n in plan.notes), plan.notes
    one = decide(spec(vcpus=2, placement="auto", exclusive=True), host(), lease("4-11"))
    assert one.cpus() == C("12-13") and one.memory_nodes == C("1")
    assert decide(spec(), host(), []).memory_nodes is None  # not numad's: left alone
    # a <numatune><memory nodeset> of the user's own stays (the XML keeps it), and the note
    # said the memory went to the CPUs' nodes all the same (input hunt)
    own = decide(spec(placement="auto", numa_mode="strict", numa_nodeset=C("1")), host(),
                 lease("4"))
    assert own.memory_nodes is None, own
    assert [n for n in own.notes if "placement='auto'" in n] == [
        "domain 'vm1' asks for <vcpu placement='auto'> (numad); pinwarden places it "
        "statically on 5-15 (its memory stays on NUMA node 1, as its <numatune> says) "
        "instead, so that no leased CPU is used"], own.notes


def test_exclusive_without_vcpu_pins_keeps_vcpus_off_the_pinned_emulator() -> None:
    s = spec(vcpus=2, exclusive=True, emulatorpin=C("4"), iothreads=1,
             iothreadpins={1: C("5")})
    plan = decide(s, host("isolcpus", "4-7", nodes=1), [])
    assert plan.leases == {4: "emulator", 5: "iothread1", 6: "vcpu0", 7: "vcpu1"}


# -- what libvirt does with threads that have no pin of their own ----------------------------


def test_pinned_exclusive_vcpu_cpuset_is_where_unpinned_threads_run() -> None:
    """libvirt runs the emulator without <emulatorpin> (and I/O threads without
    <iothreadpin>) on <vcpu cpuset>: for an exclusive domain with pinned vCPUs that cpuset
    must lie within its pinned CPUs (else those threads would run on housekeeping or other
    holders' CPUs), and is where the plan puts them."""
    wide = spec(exclusive=True, cpuset=C("0-15"), vcpupins={0: C("5"), 1: C("6")})
    refused("bad-pin", "<vcpu cpuset='0-15'>", "CPUs 0-4,7-15", "<emulatorpin>",
            spec=wide, host=host(), leases=[])
    narrow = decide(spec(exclusive=True, cpuset=C("5"), vcpupins={0: C("5"), 1: C("6")}),
                    host(), [])
    assert narrow.emulator == C("5") and narrow.leases == {5: "vcpu0", 6: "vcpu1"}
    # every thread pinned: libvirt uses the cpuset for nothing, any cpuset is fine
    pinned = decide(spec(exclusive=True, cpuset=C("0-15"), vcpupins={0: C("5"), 1: C("6")},
                         emulatorpin=C("7")), host(), [])
    assert pinned.emulator == C("7")
    # an unpinned I/O thread runs on the cpuset, which the emulatorpin may cover
    io = decide(spec(exclusive=True, cpuset=C("5-7"), iothreads=1, emulatorpin=C("7"),
                     vcpupins={0: C("5"), 1: C("6")}), host(), [])
    assert io.iothreads == {1: C("5-7")} and io.emulator == C("7")
    refused("bad-pin", "reaches CPU 8 beyond",
            spec=spec(exclusive=True, cpuset=C("5-8"), iothreads=1, emulatorpin=C("7"),
                      vcpupins={0: C("5"), 1: C("6")}),
            host=host(), leases=[])


def test_iothread_ids_are_filled_up_to_the_count_as_libvirt_does() -> None:
    s = spec(iothreads=4, iothread_ids=(1, 5), iothreadpins={2: C("9")})
    assert s.iothread_id_set == (1, 2, 3, 5)
    assert decide(s, host(), []).iothreads == {1: C("4-15"), 2: C("9"), 3: C("4-15"),
                                               5: C("4-15")}
    assert spec(iothreads=1, iothread_ids=(3, 7)).iothread_id_set == (3, 7)


def test_lxc_pins_are_ignored_like_libvirt_does() -> None:
    """libvirt's LXC driver runs a container on <vcpu cpuset> and ignores vcpupin,
    emulatorpin and iothreadpin: a shared container is planned without them (with a note),
    an exclusive one that relies on them is refused."""
    lxc = {"domain_type": "lxc", "vcpupins": {0: C("5")}, "emulatorpin": C("6")}
    plan = decide(spec(**lxc), host(), lease("4"))
    assert plan.vcpus == {0: C("5-15"), 1: C("5-15")} and plan.emulator == C("5-15")
    assert any("LXC" in note and "ignores" in note for note in plan.notes)
    refused("bad-pin", "LXC", "<vcpu cpuset>", spec=spec(exclusive=True, **lxc),
            host=host(), leases=[])
    # a QEMU domain keeps its pins
    assert decide(spec(domain_type="kvm", vcpupins={0: C("5")}), host(), []).vcpus[0] == C("5")


def test_placement_auto_with_every_thread_pinned_gets_its_memory_nodes() -> None:
    """numad's placement on a domain whose every thread is pinned: libvirt asks numad all
    the same, so the plan places its memory too (on its CPUs' nodes) and says so; it had
    no memory nodes and no note, and the start failed without numad (XML hunt)."""
    inner = ("<vcpu placement='auto'>2</vcpu><cputune><vcpupin vcpu='0' cpuset='2'/>"
             "<vcpupin vcpu='1' cpuset='3'/><emulatorpin cpuset='2-3'/></cputune>")
    planned = decide(parse_domain(f"<domain type='kvm'><name>p</name>{inner}</domain>"),
                     host("none", "1-15"), [])
    assert planned.default_cpus is None and planned.memory_nodes == C("0"), planned
    assert any("places it statically on 2-3 and its memory on NUMA node 0" in n
               for n in planned.notes), planned


def test_nothing_is_leased_while_every_housekeeping_cpu_is_leased() -> None:
    """host_reserve moved onto a CPU leased under the partition of before (a job on CPU 0;
    the configuration now keeps CPU 0 for the host): a new job was planned onto the
    other CPUs and took the last one the host had (status hunt).  Refused, naming the
    holder; a shared domain still runs."""
    h = host("none", "1-15")  # housekeeping CPU 0 ...
    held = lease("0", name="old-job")  # ... leased before the configuration changed
    for request in (spec(exclusive=True), JobSpec("j", count=1)):
        refused("no-housekeeping", "the housekeeping CPU 0 is leased to qemu domain "
                "'old-job'", "no CPU would be left for the host", "release qemu domain "
                "'old-job' first", spec=request, host=h, leases=held)
    assert decide(spec(), h, held).default_cpus == C("1-15")
    assert decide(spec(exclusive=True), h, lease("1")).leases  # one left: as ever
