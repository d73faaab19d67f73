"""The benchmark harness's own correctness: the Kubernetes baseline and the metrics, against
small cases computed by hand (no Nova needed; speed is the benchmark's business)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pinwarden.cpuset import CpuSet

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from pwbench import k8s  # noqa: E402
from pwbench.allocators import Kubernetes, Pinwarden  # noqa: E402
from pwbench.bound import instants, offline_bound  # noqa: E402
from pwbench.hosts import Host, housekeeping_pool, synthetic  # noqa: E402
from pwbench.layout import Layout  # noqa: E402
from pwbench.metrics import (  # noqa: E402
    CoreSharing,
    admit_all,
    enough_cpus,
    has_room,
    is_numa_split,
    one_node_fits,
    percentile,
)
from pwbench.report import verdict, vs_nova  # noqa: E402
from pwbench.sim import simulate  # noqa: E402
from pwbench.workload import Event, Vm, arrivals, generate, sizes_for  # noqa: E402

# Two sockets, one node each, two cores of two threads, Linux numbering:
# node 0: cores (0,4) (1,5); node 1: cores (2,6) (3,7).
TOPO = synthetic(2, 1, 2, 2)
LAYOUT = Layout.of(TOPO, TOPO.online)
ALL = frozenset(range(8))


def test_layout_of_the_tiny_host() -> None:
    assert LAYOUT.core_cpus == {0: frozenset({0, 4}), 1: frozenset({1, 5}),
                                2: frozenset({2, 6}), 3: frozenset({3, 7})}
    assert LAYOUT.node_cpus == {0: frozenset({0, 1, 4, 5}), 1: frozenset({2, 3, 6, 7})}
    assert LAYOUT.threads_per_core == 2


def test_k8s_takes_a_whole_node_first() -> None:
    assert k8s.take_by_topology(LAYOUT, ALL, 4) == [0, 1, 4, 5]


def test_k8s_a_node_with_a_reserved_cpu_is_never_whole() -> None:
    # CPU 0 is kept for the host: node 0 is not free, so 4 CPUs come from node 1 whole.
    reserved = Layout.of(TOPO, TOPO.online - CpuSet.of([0]))
    assert reserved.cpus_per_node == 4
    assert k8s.take_by_topology(reserved, reserved.cpus, 4) == [2, 3, 6, 7]


def test_k8s_whole_core_on_the_fullest_node() -> None:
    # Node 0 has 3 free CPUs, node 1 has 4: best fit takes node 0's whole core (1,5).
    assert k8s.take_by_topology(LAYOUT, ALL - {0}, 2) == [1, 5]


def test_k8s_single_thread_fills_a_partly_used_core() -> None:
    assert k8s.take_by_topology(LAYOUT, ALL - {0}, 1) == [4]


def test_k8s_threads_stay_near_the_cores_taken() -> None:
    # Node 0 keeps 4 and 5 (no whole core); node 1 is whole: core (2,6), then 3 on node 1.
    assert k8s.take_by_topology(LAYOUT, ALL - {0, 1}, 3) == [2, 6, 3]


def test_k8s_splits_a_vm_that_one_node_could_hold() -> None:
    # Node 0 has only its whole core (0,4) free; node 1 is entirely free.  Best fit takes
    # (0,4) first, then one thread on node 1, although node 1 alone holds 3 CPUs.
    free = frozenset({0, 4, 2, 3, 6, 7})
    got = k8s.take_by_topology(LAYOUT, free, 3)
    assert got == [0, 4, 2]
    assert is_numa_split(LAYOUT, got, one_node_fits(LAYOUT, free, 3, "prefer"))


def test_k8s_refuses_when_too_few() -> None:
    assert k8s.take_by_topology(LAYOUT, frozenset({1, 2}), 3) is None


def test_k8s_isolate_is_full_pcpus_only() -> None:
    # Two vCPUs → four CPUs in whole cores; vCPUs on the first thread, siblings held.
    assert k8s.place(LAYOUT, ALL - {0}, 2, "isolate") == ((2, 3), frozenset({6, 7}))
    # Only one whole core left: refused although 3 CPUs are free.
    assert k8s.place(LAYOUT, frozenset({0, 4, 1}), 2, "isolate") is None


def test_k8s_whole_rounds_up_to_whole_cores() -> None:
    # Three vCPUs → four CPUs in whole cores (node 1, whole); the spare thread held.
    assert k8s.place(LAYOUT, ALL - {0}, 3, "whole") == ((2, 6, 3), frozenset({7}))
    assert k8s.place(LAYOUT, frozenset({0, 4, 1}), 2, "whole") == ((0, 4), frozenset())
    assert k8s.place(LAYOUT, frozenset({0, 4, 1}), 3, "whole") is None


def test_one_node_fits_counts_whole_cores_under_isolate() -> None:
    free = frozenset({0, 4, 1, 2, 3})  # node 0: one whole core; node 1: none
    assert one_node_fits(LAYOUT, free, 1, "isolate")
    assert not one_node_fits(LAYOUT, free, 2, "isolate")
    assert one_node_fits(LAYOUT, free, 3, "prefer")
    assert not one_node_fits(LAYOUT, free, 4, "prefer")


def test_has_room_needs_whole_cores_where_the_policy_does() -> None:
    # Cores (0,4) (1,5) (2,6) (3,7); free: one whole core (0,4) and the halves 1, 2, 3.
    free = frozenset({0, 4, 1, 2, 3})
    assert has_room(LAYOUT, free, 5, "prefer")
    assert has_room(LAYOUT, free, 1, "isolate") and not has_room(LAYOUT, free, 2, "isolate")
    assert has_room(LAYOUT, free, 2, "whole") and not has_room(LAYOUT, free, 3, "whole")
    assert has_room(LAYOUT, free, 2, "require")
    # Four CPUs free but no room for an isolate VM of 2: that refusal is fragmentation.
    assert enough_cpus(free, 2, "isolate", 2)


def brute_force_room(layout: Layout, free: frozenset[int], cpus: int, threads: str) -> bool:
    """Some set of ``cpus`` free CPUs satisfies the policy (every subset tried)."""
    for chosen in itertools.combinations(sorted(free), cpus):
        cores = [layout.core_online[layout.core[c]] for c in chosen]
        if threads == "prefer":
            return True
        if any(not core <= free for core in cores):
            continue
        if threads == "isolate" and len(set(cores)) < len(cores):
            continue
        if threads == "require" and any(len(core) < 2 for core in cores):
            continue
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.data())
def test_has_room_is_exact(nodes: int, cores: int, threads: int, data: st.DataObject) -> None:
    topo = synthetic(1, nodes, cores, threads)
    layout = Layout.of(topo, topo.online)
    free = frozenset(data.draw(st.sets(st.sampled_from(sorted(layout.cpus)))))
    cpus = data.draw(st.integers(1, len(layout.cpus)))
    policy = data.draw(st.sampled_from(["prefer", "isolate", "whole", "require"]))
    assert has_room(layout, free, cpus, policy) == brute_force_room(layout, free, cpus, policy)


def test_core_sharing() -> None:
    sharing = CoreSharing(LAYOUT)
    sharing.place(1, (0,))
    sharing.place(2, (1, 5))
    assert sharing.shared == set()
    sharing.place(3, (4,))  # sibling of VM 1's CPU 0
    assert sharing.shared == {1, 3}
    sharing.release((4,))
    sharing.place(4, (4,))  # VM 3 left, but VM 1 is still on CPU 0
    assert sharing.shared == {1, 3, 4}


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def events(*vms: Vm) -> list[Event]:
    out = [Event(v.arrive, "arrive", v) for v in vms]
    out += [Event(v.depart, "depart", v) for v in vms]
    return sorted(out, key=lambda e: (e.time, e.kind != "depart", e.vm.id))


def test_admit_all_ignores_fragmentation_only() -> None:
    # Pool of 4 CPUs, 2 threads per core: A (3) fits; B (isolate 1 → 2 CPUs) does not
    # while A lives; C (4) fits once A is gone.
    evs = events(Vm(0, 3, "prefer", 0.0, 2.0), Vm(1, 1, "isolate", 1.0, 5.0),
                 Vm(2, 4, "prefer", 3.0, 4.0))
    assert admit_all(evs, 4, 2) == (2, 7)


def test_offline_bound_refuses_the_big_vm_that_admit_all_takes() -> None:
    # Pool of 4: A (4 CPUs) arrives first; B, C, D (1 CPU each) arrive while A would live.
    # Admit-all takes A and nothing else (1 VM); the best choice is B, C, D (3 VMs), while
    # the most vCPUs is 4 either way.
    evs = events(Vm(0, 4, "prefer", 0.0, 9.0), Vm(1, 1, "prefer", 1.0, 9.0),
                 Vm(2, 1, "prefer", 2.0, 9.0), Vm(3, 1, "prefer", 3.0, 9.0))
    assert admit_all(evs, 4, 2) == (1, 4)
    bound = offline_bound(evs, 4, 2)
    assert (bound.vms, bound.vcpus, bound.exact) == (3, 4, True)
    assert instants(evs) == [[0, 1, 2, 3]]


def test_offline_bound_counts_whole_cores() -> None:
    # Two cores of two threads; three 'whole' VMs of 1 vCPU each hold a core each: only 2 fit.
    evs = events(*(Vm(i, 1, "whole", float(i), 9.0) for i in range(3)))
    assert offline_bound(evs, 4, 2).vms == 2


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["prefer", "isolate", "whole", "mixed+emu"]),
       st.sampled_from([0.8, 1.5]))
def test_no_allocator_beats_the_offline_bound(seed: int, mix: str, load: float) -> None:
    host = Host("small", synthetic(2, 1, 4, 2), synthetic(2, 1, 4, 2).online)
    evs = generate(seed=seed, pool=16, threads_per_core=2, mix=mix,  # type: ignore[arg-type]
                   load=load, min_arrivals=40)
    bound = offline_bound(evs, 16, 2)
    for allocator in (Pinwarden(host), Kubernetes(host)):
        got = simulate(host, evs, allocator)
        assert got.accepted <= bound.vms and got.accepted_vcpus <= bound.vcpus


def test_simulate_counts_splits_and_sharing() -> None:
    host = Host("tiny", TOPO, TOPO.online)
    evs = events(Vm(0, 2, "prefer", 1.0, 9.0), Vm(1, 3, "prefer", 2.0, 9.0),
                 Vm(2, 1, "prefer", 3.0, 9.0))
    # k8s: VM0 → (0,4); VM1 → (1,5) + 2, split though node 1 had 4 free; VM2 → 6, beside
    # VM1's 2.
    base = simulate(host, evs, Kubernetes(host))
    assert (base.offered, base.accepted, base.numa_split_vms, base.smt_shared_vms) == \
        (3, 3, 1, 2)
    # pinwarden: VM0 → (0,4); VM1 → node 1, (2,6) + 3; VM2 → 7 (node 1 is the fuller):
    # no split, and VM2 shares VM1's core (3,7), which "prefer" allows.
    ours = simulate(host, evs, Pinwarden(host))
    assert (ours.offered, ours.accepted, ours.numa_split_vms, ours.smt_shared_vms) == \
        (3, 3, 0, 2)
    # Under 'whole' (pinwarden's default) the same VMs never share a core: VM0 → (0,4);
    # VM1 → node 1, (2,6) + 3 holding 7; VM2 → (1,5)... node 0 (best fit), holding 5.
    whole = [Vm(v.id, v.vcpus, "whole", v.arrive, v.depart) for v in arrivals(evs)]
    got = simulate(host, events(*whole), Pinwarden(host))
    assert (got.accepted, got.smt_shared_vms, got.whole_shared_vms) == (3, 0, 0)
    assert ours.isolate_shared_vms == 0 and ours.refused_with_room == 0


def test_simulate_isolate_never_shares_and_counts_refusals_with_room() -> None:
    host = Host("tiny", TOPO, TOPO.online)
    evs = events(Vm(0, 1, "prefer", 1.0, 9.0), Vm(1, 1, "prefer", 1.5, 9.0),
                 Vm(2, 2, "isolate", 2.0, 9.0), Vm(3, 1, "isolate", 3.0, 9.0))
    # pinwarden: VM0 → 0, VM1 → 4 (best fit fills core (0,4)); VM2 (isolate 2) fits in one
    # node only on node 1, two whole cores → 2 and 3, holding 6 and 7; VM3 → core (1,5),
    # holding 5.  Everything accepted, nobody runs beside VM2 or VM3.
    got = simulate(host, evs, Pinwarden(host))
    assert (got.accepted, got.isolate_shared_vms, got.numa_split_vms) == (4, 0, 0)
    assert got.smt_shared_vms == 2  # VM0 and VM1 (both "prefer") share core (0,4)


def test_generate_is_seeded_and_respects_the_pool() -> None:
    a = generate(seed=7, pool=14, threads_per_core=2, mix="mixed", load=1.0)
    b = generate(seed=7, pool=14, threads_per_core=2, mix="mixed", load=1.0)
    assert a == b
    vms = arrivals(a)
    assert len(vms) >= 200
    assert {v.vcpus for v in vms} <= set(sizes_for(14)) == {1, 2, 4}
    assert {v.threads for v in vms} == {"prefer", "isolate"}
    assert all(v.depart > v.arrive for v in vms)
    times = [e.time for e in a]
    assert times == sorted(times)


def test_housekeeping_pool_keeps_the_first_core() -> None:
    assert housekeeping_pool(TOPO) == TOPO.online - TOPO.siblings(0)


def row(accepted: int = 10, vcpus: int = 40, splits: int = 0, p99: float = 10.0,
        room: int = 0, nodes: int = 2, cpus: int = 64, **more: object) -> dict[str, object]:
    return {"accepted": accepted, "accepted_vcpus": vcpus, "numa_split_vms": splits,
            "p99_us": p99, "refused_with_room": room, "isolate_shared_vms": 0,
            "whole_shared_vms": 0, "nodes": nodes, "cpus": cpus, "mix": "mixed", **more}


def test_verdict_judges_the_targets_not_the_vm_count() -> None:
    assert verdict(row(), {"nova": row(p99=40.0), "k8s": row(vcpus=39)}) == "ok"
    # More VMs on Nova's side is shown, not judged.
    assert verdict(row(9), {"nova": row(12, p99=40.0)}) == "ok"
    assert verdict(row(room=1), {"nova": row(p99=40.0)}) == \
        "MISSES: refused 1 VMs with room"
    assert verdict(row(splits=2), {"nova": row(splits=1, p99=40.0)}) == \
        "MISSES: splits 2 > nova 1"
    assert verdict(row(vcpus=30), {"k8s": row(vcpus=31)}) == "MISSES: vCPUs 30 < k8s 31"
    # The shortfall is still a miss; what goes with it is said beside it.
    assert verdict(row(vcpus=30, admit_all_vcpus=30),
                   {"k8s": row(vcpus=31, refused_fragmented=1)}) == \
        "MISSES: vCPUs 30 < k8s 31 (admit-all 30, k8s refused 1 fragmented)"
    # Speed: 3x the faster Nova configuration, 10x on hosts with 8 nodes or more.
    assert verdict(row(p99=10.0), {"nova": row(p99=25.0), "nova-pack": row(p99=90.0)}) == \
        "MISSES: p99 only 2.5x faster than Nova (goal 3x)"
    assert verdict(row(p99=10.0, nodes=8), {"nova": row(p99=50.0)}) == \
        "MISSES: p99 only 5.0x faster than Nova (goal 10x)"
    assert verdict(row(p99=1200.0, cpus=1022), {"nova": row(p99=99000.0)}) == \
        "MISSES: p99 1200.0us >= 1 ms"


def test_vs_nova_says_what_goes_with_a_difference() -> None:
    ours = row(10, vcpus=50)
    nova = row(12, vcpus=40, room=3, no_decision=1)
    assert vs_nova(ours, {"nova": nova, "nova-pack": row(10)}) == \
        "nova +2 VMs (it refused 3 with room, 1 undecided, pinwarden +10 vCPUs); nova-pack ="


def test_the_benchmark_finds_its_hwloc_hosts_in_the_repository(tmp_path: Path) -> None:
    """`make bench*` reads the repository's own copy of the dumps, through a fresh cache
    (it once looked beside the repository and ran only from a stale cache)."""
    from pwbench.__main__ import HWLOC, HWLOC_FULL
    from pwbench.hosts import hwloc_host

    repo = Path(__file__).resolve().parent / "data" / "hwloc"
    assert HWLOC.resolve() == repo.resolve()
    for spec in HWLOC_FULL:
        assert (HWLOC / f"{spec.removeprefix('hwloc:')}.tar.bz2").is_file(), spec
    host = hwloc_host(HWLOC / "16em64t-4s2c2t.tar.bz2", tmp_path)
    assert len(host.topology.online) == 16
    assert host.pool == host.topology.online - host.topology.siblings(0)


def test_k8s_sweep_counts_what_simulate_gives() -> None:
    """The pinwarden-against-k8s sweep of `make bench-quick` (context for the vCPU target):
    its counts are those of simulating each workload with both allocators, the 1,024-CPU
    host is left out, and its paragraph says them."""
    from pwbench.__main__ import BIG, Config, k8s_sweep, load_host
    from pwbench.report import k8s_sweep_text

    config = Config(hosts=("syn-2s4n8c2t", BIG), mixes=("mixed+emu", "isolate"), limited={},
                    loads=(), sweep_hosts=(), sweep_loads=(), seeds=(), lifetimes=6.0,
                    min_arrivals=150, k8s_seeds=(1, 2), k8s_loads=(1.2,))
    got = k8s_sweep(config, lambda line: None)
    host = load_host("syn-2s4n8c2t")
    want = {"above": 0, "below": 0, "at_admit_all": 0, "pw": 0, "k8s": 0, "frag": 0}
    for mix in config.mixes:
        for seed in config.k8s_seeds:
            events = generate(seed=seed, pool=len(host.pool), threads_per_core=2, mix=mix,
                              load=1.2, lifetimes=6.0, min_arrivals=150)
            ours = simulate(host, events, Pinwarden(host)).accepted_vcpus
            base = simulate(host, events, Kubernetes(host))
            want["pw"] += ours
            want["k8s"] += base.accepted_vcpus
            want["frag"] += base.refused_fragmented
            want["above"] += ours > base.accepted_vcpus
            want["below"] += ours < base.accepted_vcpus
            want["at_admit_all"] += ours < base.accepted_vcpus and \
                ours >= admit_all(events, len(host.pool), 2)[1]
    assert got["workloads"] == 4  # the 1,024-CPU host is not swept
    assert (got["above_k8s"], got["below_k8s"], got["below_k8s_at_admit_all"]) == \
        (want["above"], want["below"], want["at_admit_all"])
    assert got["vcpus"] == {"pinwarden": want["pw"], "k8s": want["k8s"]}
    assert got["refused_fragmented"]["k8s"] == want["frag"]
    assert got["refused_with_room"]["pinwarden"] == 0
    text = k8s_sweep_text(got)[0]
    assert f"In total pinwarden placed {want['pw']} vCPUs and k8s {want['k8s']}" in text
    assert f"fewer on {want['below']} (" in text
