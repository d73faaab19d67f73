"""The benchmark harness's own correctness: the Kubernetes baseline and the metrics, against
small cases computed by hand (no Nova needed; speed is the benchmark's business)."""

from __future__ import annotations

import sys
from pathlib import Path

from pinwarden.cpuset import CpuSet

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from pwbench import k8s  # noqa: E402
from pwbench.allocators import Kubernetes, Pinwarden  # noqa: E402
from pwbench.hosts import Host, housekeeping_pool, synthetic  # noqa: E402
from pwbench.layout import Layout  # noqa: E402
from pwbench.metrics import (  # noqa: E402
    CoreSharing,
    has_room,
    is_numa_split,
    one_node_fits,
    percentile,
    upper_bound,
)
from pwbench.report import verdict  # noqa: E402
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


def test_one_node_fits_counts_whole_cores_under_isolate() -> None:
    free = frozenset({0, 4, 1, 2, 3})  # node 0: one whole core; node 1: none
    assert one_node_fits(LAYOUT, free, 1, "isolate")
    assert not one_node_fits(LAYOUT, free, 2, "isolate")
    assert one_node_fits(LAYOUT, free, 3, "prefer")
    assert not one_node_fits(LAYOUT, free, 4, "prefer")


def test_has_room_uses_the_footprint() -> None:
    assert has_room(frozenset({1, 2, 3, 4}), 2, "isolate", 2)
    assert not has_room(frozenset({1, 2, 3}), 2, "isolate", 2)
    assert has_room(frozenset({1, 2}), 2, "prefer", 2)


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


def test_upper_bound_ignores_fragmentation_only() -> None:
    # Pool of 4 CPUs, 2 threads per core: A (3) fits; B (isolate 1 → 2 CPUs) does not
    # while A lives; C (4) fits once A is gone.
    evs = events(Vm(0, 3, "prefer", 0.0, 2.0), Vm(1, 1, "isolate", 1.0, 5.0),
                 Vm(2, 4, "prefer", 3.0, 4.0))
    assert upper_bound(evs, 4, 2) == (2, 7)


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


def test_verdict_names_what_pinwarden_loses() -> None:
    def row(accepted: int, splits: int = 0, p99: float = 10.0, shared: int = 0) -> dict[
            str, object]:
        return {"accepted": accepted, "numa_split_vms": splits, "p99_us": p99,
                "isolate_shared_vms": shared}

    assert verdict(row(10), {"nova": row(10, p99=20.0), "k8s": row(9)}) == "ok"
    assert verdict(row(9), {"nova": row(10, p99=20.0)}) == \
        "LOSES: accepted 9 < nova 10"
    assert verdict(row(10, p99=30.0), {"nova": row(10, p99=20.0)}) == \
        "LOSES: p99 30.0us >= nova 20.0us"
    assert verdict(row(10), {"nova": row(10, p99=20.0), "k8s": row(11)}) == \
        "ok (k8s accepts 11)"
