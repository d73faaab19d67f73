"""The topology-aware allocator: NUMA fit, best fit, thread policies, order, refusals."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HWLOC_DUMPS
from pinwarden.allocator import Allocation, Request, allocate
from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.domain import ThreadPolicy
from pinwarden.errors import InputError, Refusal
from pinwarden.topology import Cpu, Topology, read_topology


def build(sockets: int = 1, nodes: int = 1, cores: int = 4, threads: int = 2, *,
          adjacent: bool = False, offline: CpuSet = EMPTY) -> Topology:
    """``sockets`` × ``nodes`` per socket × ``cores`` per node × ``threads`` per core.

    Numbering as Linux does on most Intel servers (``adjacent=False``): the first thread of
    every core first, then the second threads (CPU i and i + #cores are siblings); or
    siblings adjacent (``adjacent=True``: 0-1, 2-3, …).
    """
    ncores = sockets * nodes * cores
    cpus: dict[int, Cpu] = {}
    node_cpus: dict[int, set[int]] = {}
    for c in range(ncores):
        ids = [c * threads + t for t in range(threads)] if adjacent else \
            [c + t * ncores for t in range(threads)]
        node = c // cores
        socket = node // nodes
        for cpu in ids:
            cpus[cpu] = Cpu(id=cpu, online=cpu not in offline, package=socket, die=0,
                            cluster=None, core=c % cores, siblings=CpuSet.of(ids), node=node)
            node_cpus.setdefault(node, set()).add(cpu)
    present = CpuSet.of(cpus)
    return Topology(cpus=cpus, present=present, online=present - offline,
                    isolated=CpuSet(), nohz_full=CpuSet(),
                    nodes={n: CpuSet.of(s) for n, s in node_cpus.items()})


def cores_of(topo: Topology, cpus: tuple[int, ...] | CpuSet) -> list[CpuSet]:
    return [topo.siblings(c) for c in cpus]


def nodes_of(topo: Topology, cpus: tuple[int, ...]) -> set[int]:
    return {topo.node_of(c) for c in cpus}


S = CpuSet.parse


# -- NUMA ---------------------------------------------------------------------------------

def test_fits_in_one_node_when_possible() -> None:
    topo = build(nodes=2, cores=4, threads=1)  # node 0: 0-3, node 1: 4-7
    pool = S("0-7")
    got = allocate(topo, pool, S("2-7"), Request(4))
    assert got.cpus == (4, 5, 6, 7)  # node 0 has only 2 free: the whole of node 1


def test_best_fit_node_is_the_fullest_that_still_fits() -> None:
    topo = build(nodes=3, cores=4, threads=1)  # 0-3, 4-7, 8-11
    free = S("1-3,6-7,8-11")  # node 0: 3 free, node 1: 2 free, node 2: 4 free
    assert nodes_of(topo, allocate(topo, S("0-11"), free, Request(2)).cpus) == {1}
    assert nodes_of(topo, allocate(topo, S("0-11"), free, Request(3)).cpus) == {0}
    assert nodes_of(topo, allocate(topo, S("0-11"), free, Request(4)).cpus) == {2}


def test_ties_between_nodes_go_to_the_lowest_number() -> None:
    topo = build(nodes=2, cores=2, threads=1)
    assert allocate(topo, S("0-3"), S("0-3"), Request(1)).cpus == (0,)


def test_spans_the_fewest_nodes() -> None:
    topo = build(nodes=4, cores=4, threads=1)  # 0-3, 4-7, 8-11, 12-15
    free = S("0,4-5,8-11,12-14")  # capacities 1, 2, 4, 3
    got = allocate(topo, S("0-15"), free, Request(6))
    # 6 CPUs: the 4 of node 2 plus 2 more; node 1 (2 free) is the best fit for the rest.
    assert nodes_of(topo, got.cpus) == {1, 2}
    assert got.cpus == (4, 5, 8, 9, 10, 11)


def test_spanning_stays_in_the_package_already_used() -> None:
    # Two sockets of two nodes of two 1-thread cores: nodes 0,1 on socket 0; 2,3 on 1.
    topo = build(sockets=2, nodes=2, cores=2, threads=1)
    free = S("2,4-6")  # node 1: 1 free, node 2: 2 free, node 3: 1 free
    got = allocate(topo, S("0-7"), free, Request(3))
    # Node 2 whole, then one more: node 1 and node 3 fit equally; node 3 shares the socket.
    assert got.cpus == (4, 5, 6)


def test_respects_the_numatune_nodeset() -> None:
    topo = build(nodes=2, cores=4, threads=1)
    got = allocate(topo, S("0-7"), S("0-7"), Request(2, nodes=S("1")))
    assert got.cpus == (4, 5)
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-7"), S("0-5"), Request(3, nodes=S("1")))
    assert err.value.code == "insufficient-cpus"
    assert "only 2 free CPUs on NUMA node 1;" in err.value.message
    assert "3 CPUs" in err.value.message
    with pytest.raises(Refusal) as err:  # several nodes: "nodes"
        allocate(build(nodes=3, cores=2, threads=1), S("0-5"), S("0-2"),
                 Request(3, nodes=S("1-2")))
    assert "only 1 free CPU on NUMA nodes 1-2;" in err.value.message


def test_a_job_is_told_its_option_for_sharing_cores() -> None:
    """A job asks for thread policy 'prefer' with ``--threads prefer``; a domain with its
    thread policy (``<pw:cpu threads>``)."""
    topo = build(cores=2, threads=2)  # cores (0,2) (1,3); CPU 2 taken: one whole core left
    for purpose, advice in (("job", "use --threads prefer to share cores"),
                            ("vcpus", "use thread policy 'prefer' to share cores")):
        with pytest.raises(Refusal) as err:
            allocate(topo, S("0-3"), S("0-1,3"), Request(3, purpose=purpose))
        assert err.value.message == ("cannot place 3 CPUs: only 2 CPUs on whole free cores "
                                     f"(thread policy 'whole'); {advice} with other holders")


# -- prefer ------------------------------------------------------------------------------

def test_prefer_takes_whole_cores_with_siblings_adjacent() -> None:
    topo = build(cores=4, threads=2)  # cores (0,4) (1,5) (2,6) (3,7)
    got = allocate(topo, S("0-7"), S("0-7"), Request(4, "prefer"))
    assert got.cpus == (0, 4, 1, 5)
    assert got.holds == CpuSet()


def test_prefer_fills_a_partly_used_core_before_breaking_a_whole_one() -> None:
    topo = build(cores=4, threads=2)
    free = S("0-7") - S("1")  # core (1,5) is half used
    assert allocate(topo, S("0-7"), free, Request(1, "prefer")).cpus == (5,)
    # Three CPUs: one whole core, then the lone thread of the half-used core.
    assert allocate(topo, S("0-7"), free, Request(3, "prefer")).cpus == (0, 4, 5)


def test_prefer_without_whole_cores_uses_partial_ones() -> None:
    topo = build(cores=4, threads=2)
    free = S("4-7")  # every core half used
    assert allocate(topo, S("0-7"), free, Request(3, "prefer")).cpus == (4, 5, 6)


def test_prefer_on_adjacent_numbering() -> None:
    topo = build(cores=4, threads=2, adjacent=True)  # cores (0,1) (2,3) ...
    got = allocate(topo, S("0-7"), S("1-7"), Request(3, "prefer"))
    assert got.cpus == (1, 2, 3)  # whole core 2-3 plus the lone 1


def test_offline_cpus_are_never_given() -> None:
    topo = build(cores=2, threads=2, offline=S("2"))  # cores (0,2) (1,3); 2 offline
    got = allocate(topo, S("0-3"), S("0-3"), Request(3))
    assert sorted(got.cpus) == [0, 1, 3]


# -- isolate -----------------------------------------------------------------------------

def test_isolate_one_thread_per_core_and_holds_the_siblings() -> None:
    topo = build(cores=4, threads=2)
    got = allocate(topo, S("0-7"), S("0-7"), Request(2, threads="isolate"))
    assert got.cpus == (0, 1)
    assert got.holds == S("4-5")


def test_isolate_skips_cores_with_a_busy_sibling() -> None:
    topo = build(cores=4, threads=2)
    free = S("0-7") - S("5")  # core (1,5) is shared with someone
    got = allocate(topo, S("0-7"), free, Request(3, threads="isolate"))
    assert got.cpus == (0, 2, 3)
    assert got.holds == S("4,6-7")
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-7"), free, Request(4, threads="isolate"))
    assert "3 whole free cores" in err.value.message


def test_isolate_treats_a_sibling_outside_the_pool_as_busy() -> None:
    topo = build(cores=2, threads=2)  # (0,2) (1,3); CPU 0 is housekeeping
    got = allocate(topo, S("1-3"), S("1-3"), Request(1, threads="isolate"))
    assert got.cpus == (1,) and got.holds == S("3")


# -- require -----------------------------------------------------------------------------

def test_require_uses_whole_cores_and_holds_the_leftover() -> None:
    topo = build(cores=4, threads=2)
    got = allocate(topo, S("0-7"), S("0-7") - S("4"), Request(3, threads="require"))
    assert got.cpus == (1, 5, 2)
    assert got.holds == S("6")


def test_require_refused_without_smt() -> None:
    topo = build(cores=4, threads=1)
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-3"), S("0-3"), Request(1, threads="require"))
    assert err.value.code == "no-smt"


# -- whole (the default) -------------------------------------------------------------------

def test_whole_is_the_default() -> None:
    assert Request(2).threads == "whole"


def test_whole_takes_whole_cores_and_holds_the_spare_sibling() -> None:
    topo = build(cores=4, threads=2)  # cores (0,4) (1,5) (2,6) (3,7)
    got = allocate(topo, S("0-7"), S("0-7"), Request(3))
    assert got.cpus == (0, 4, 1)
    assert got.holds == S("5")  # the odd vCPU holds its core's other thread
    got = allocate(topo, S("0-7"), S("0-7"), Request(4))
    assert got.cpus == (0, 4, 1, 5) and got.holds == EMPTY


def test_whole_never_uses_a_part_used_core() -> None:
    topo = build(cores=4, threads=2)
    free = S("0-7") - S("4,5,6")  # only core (3,7) is whole
    assert allocate(topo, S("0-7"), free, Request(2)).cpus == (3, 7)
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-7"), free, Request(3))
    assert "only 2 CPUs on whole free cores" in err.value.message
    assert "'prefer'" in err.value.message


@pytest.mark.parametrize("threads", ["whole", "isolate", "require"])
def test_a_thread_policy_is_advised_away_only_when_prefer_would_place_it(
        threads: str) -> None:
    """Too few free CPUs: the thread policy is not what refuses, so relaxing it is not the
    advice (it was: 'use thread policy prefer', which then refused too)."""
    topo = build(cores=2, threads=2)  # (0,2) (1,3)
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-3"), S("0-1,3"), Request(4, threads))
    msg = err.value.message
    assert msg == "cannot place 4 CPUs: only 3 free CPUs; lower the vCPU count"
    with pytest.raises(Refusal):
        allocate(topo, S("0-3"), S("0-1,3"), Request(4, "prefer"))
    # Enough free CPUs, too few whole cores: relaxing the policy is the advice, and works.
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-3"), S("0-1,3"), Request(3, threads))
    assert "'prefer'" in err.value.message and "lower" not in err.value.message
    assert len(allocate(topo, S("0-3"), S("0-1,3"), Request(3, "prefer")).cpus) == 3


def test_a_host_without_smt_is_refused_for_want_of_cpus_not_for_whole_cores() -> None:
    topo = build(cores=2, threads=1)
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-1"), S("1"), Request(2))
    assert err.value.message == "cannot place 2 CPUs: only 1 free CPU; lower the vCPU count"


def test_whole_without_smt_is_one_cpu_per_core() -> None:
    topo = build(cores=4, threads=1)
    got = allocate(topo, S("0-3"), S("1-3"), Request(3))
    assert got.cpus == (1, 2, 3) and got.holds == EMPTY


def test_whole_stays_on_one_node_and_spans_when_it_must() -> None:
    topo = build(nodes=2, cores=2, threads=2)  # node 0: (0,4) (1,5); node 1: (2,6) (3,7)
    free = S("0-7") - S("5")
    assert allocate(topo, S("0-7"), free, Request(3)).cpus == (2, 6, 3)  # node 1: 4 free
    got = allocate(topo, S("0-7"), free, Request(5))  # 2 + 4 whole-core threads: spans
    assert got.cpus == (0, 2, 6, 3, 7) and got.holds == S("4")  # node 1 whole, 1 more


def hybrid() -> Topology:
    """One node: P-cores (0,1) (2,3), E-cores 4 and 5 (one thread each)."""
    shapes = [(0, 1), (2, 3), (4,), (5,)]
    cpus = {c: Cpu(id=c, online=True, package=0, die=0, cluster=None, core=i,
                   siblings=CpuSet.of(core), node=0)
            for i, core in enumerate(shapes) for c in core}
    every = CpuSet.of(cpus)
    return Topology(cpus=cpus, present=every, online=every, isolated=CpuSet(),
                    nohz_full=CpuSet(), nodes={0: every})


def test_mixed_core_sizes() -> None:
    topo = hybrid()
    every = S("0-5")
    # whole: larger cores first, the odd remainder on a one-thread core: nothing held.
    assert allocate(topo, every, every, Request(3)) == Allocation((0, 1, 4))
    assert allocate(topo, every, every, Request(5)) == Allocation((0, 1, 2, 3, 4))
    # isolate: the cores with the fewest threads first (least held).
    assert allocate(topo, every, every, Request(3, "isolate")) == \
        Allocation((0, 4, 5), holds=S("1"))
    # require: SMT cores only.
    assert allocate(topo, every, every, Request(3, "require")) == \
        Allocation((0, 1, 2), holds=S("3"))
    with pytest.raises(Refusal):
        allocate(topo, every, every - S("0"), Request(3, "require"))


# -- prefer keeps whole cores for those who need them --------------------------------------

def test_prefer_odd_remainder_goes_to_a_half_used_core_on_another_node() -> None:
    topo = build(nodes=2, cores=3, threads=2)  # node 0: (0,6) (1,7) (2,8); 1: (3,9) (4,10) (5,11)
    free = S("0,6,3-5,9-10")  # node 0: one whole core; node 1: two whole, (5,11) half used
    # Best fit alone would take node 0 (2 free) and break its last whole core.
    assert allocate(topo, S("0-11"), free, Request(1, "prefer")).cpus == (5,)
    # An even request breaks nothing: best fit stays.
    assert allocate(topo, S("0-11"), free, Request(2, "prefer")).cpus == (0, 6)


# -- edges -------------------------------------------------------------------------------

def test_zero_and_negative_counts() -> None:
    topo = build()
    assert allocate(topo, S("0-7"), S("0-7"), Request(0)) == Allocation(cpus=())
    with pytest.raises(InputError):
        allocate(topo, S("0-7"), S("0-7"), Request(-1))


def test_refusal_is_one_line_and_names_the_numbers() -> None:
    topo = build(cores=2, threads=2)
    with pytest.raises(Refusal) as err:
        allocate(topo, S("0-3"), S("0-2"), Request(4, "prefer"))
    msg = err.value.message
    assert "\n" not in msg
    assert "4 CPUs" in msg and "only 3 free CPUs" in msg


def test_free_outside_the_pool_is_ignored() -> None:
    topo = build(cores=2, threads=1)
    assert allocate(topo, S("1"), S("0-1"), Request(1)).cpus == (1,)


# -- properties --------------------------------------------------------------------------

POLICIES: list[ThreadPolicy] = ["prefer", "isolate", "require", "whole"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Topology, CpuSet, CpuSet, Request]:
    topo = build(sockets=draw(st.integers(1, 2)), nodes=draw(st.integers(1, 3)),
                 cores=draw(st.integers(1, 5)), threads=draw(st.integers(1, 3)),
                 adjacent=draw(st.booleans()))
    everything = sorted(topo.present)
    pool = CpuSet.of(draw(st.sets(st.sampled_from(everything), min_size=1)))
    free = CpuSet.of(draw(st.sets(st.sampled_from(sorted(pool)))))
    nodes = draw(st.none() | st.sets(st.sampled_from(sorted(topo.nodes)), min_size=1))
    request = Request(count=draw(st.integers(1, len(everything))),
                      threads=draw(st.sampled_from(POLICIES)),
                      nodes=None if nodes is None else CpuSet.of(nodes))
    return topo, pool, free, request


def whole_free_cores(topo: Topology, free: CpuSet) -> dict[int, int]:
    """Node -> number of cores whose every online thread is in ``free``."""
    out: dict[int, int] = {}
    for core in topo.cores():
        if core <= free:
            n = topo.node_of(core.first())
            out[n] = out.get(n, 0) + 1
    return out


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_allocation_properties(case: tuple[Topology, CpuSet, CpuSet, Request]) -> None:
    topo, pool, free, request = case
    try:
        got = allocate(topo, pool, free, request)
    except Refusal:
        # Refused: then there really is no room under this policy and nodeset.
        allowed = free & pool
        if request.nodes is not None:
            allowed = CpuSet.of(c for c in allowed if topo.node_of(c) in request.nodes)
        if request.threads == "prefer":
            assert len(allowed) < request.count
        if request.threads == "isolate":
            assert sum(whole_free_cores(topo, allowed).values()) < request.count
        return
    chosen = CpuSet.of(got.cpus)
    assert len(got.cpus) == request.count == len(chosen)  # no duplicates
    assert chosen <= free & pool
    assert got.holds <= free & pool
    assert got.holds.isdisjoint(chosen)
    if request.nodes is not None:
        assert nodes_of(topo, got.cpus) <= set(request.nodes)
    if request.threads == "isolate":
        cores = [topo.siblings(c) for c in got.cpus]
        assert len(set(cores)) == len(cores)  # no two CPUs on one core
        for core in cores:
            assert core <= free | CpuSet.of(c for c in core if c not in topo.online)
    if request.threads == "require":
        for core in {topo.siblings(c) for c in got.cpus}:
            assert core & topo.online <= chosen | got.holds
    # Single node whenever one allowed node could hold the request on its own.
    if request.threads == "prefer":
        per_node: dict[int, int] = {}
        for c in free & pool:
            n = topo.node_of(c)
            if request.nodes is None or n in request.nodes:
                per_node[n] = per_node.get(n, 0) + 1
        if any(v >= request.count for v in per_node.values()):
            assert len(nodes_of(topo, got.cpus)) == 1
    if request.threads == "isolate":
        allowed = CpuSet.of(c for c in free & pool
                            if request.nodes is None or topo.node_of(c) in request.nodes)
        if any(v >= request.count for v in whole_free_cores(topo, allowed).values()):
            assert len(nodes_of(topo, got.cpus)) == 1
    # Order: node by node, siblings adjacent.
    node_seq = [topo.node_of(c) for c in got.cpus]
    assert node_seq == sorted(node_seq)
    seen_cores: list[CpuSet] = []
    for c in got.cpus:
        core = topo.siblings(c)
        if seen_cores and seen_cores[-1] == core:
            continue
        assert core not in seen_cores
        seen_cores.append(core)
    # Deterministic: the same input gives the same answer.
    assert allocate(topo, pool, free, request) == got


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_isolate_never_shares_a_core_across_allocations(
        case: tuple[Topology, CpuSet, CpuSet, Request]) -> None:
    """Allocating VMs one after another under isolate: no core ever holds two VMs."""
    topo, pool, _, request = case
    free = pool
    owner: dict[CpuSet, int] = {}
    for vm in range(6):
        try:
            got = allocate(topo, pool, free, Request(max(1, request.count // 3), "isolate"))
        except Refusal:
            break
        for c in got.cpus:
            core = topo.siblings(c)
            assert owner.setdefault(core, vm) == vm
        free = free - CpuSet.of(got.cpus) - got.holds


# -- real topologies (hwloc sysfs dumps) -------------------------------------------------



@pytest.fixture(scope="module")
def hwloc_topologies(hwloc_roots: dict[str, Path]) -> dict[str, Topology]:
    return {name: read_topology(root) for name, root in hwloc_roots.items()}


def test_every_hwloc_dump_is_read(hwloc_topologies: dict[str, Topology]) -> None:
    assert sorted(hwloc_topologies) == HWLOC_DUMPS and len(HWLOC_DUMPS) >= 10


@pytest.mark.parametrize("dump", HWLOC_DUMPS)
@pytest.mark.parametrize("threads", POLICIES)
def test_filling_a_real_host(hwloc_topologies: dict[str, Topology], dump: str,
                             threads: ThreadPolicy) -> None:
    """Place 1-, 2- and 3-CPU VMs until the host is full: every placement is valid, stays
    on one node whenever one node can hold it, isolate VMs never share a core, and the
    host is refused only when it is really full for that policy."""
    topo = hwloc_topologies[dump]
    pool = topo.online - topo.cores()[0] if len(topo.cores()) > 1 else topo.online
    if threads == "require" and not topo.smt:
        with pytest.raises(Refusal) as err:
            allocate(topo, pool, pool, Request(1, "require"))
        assert err.value.code == "no-smt"
        return
    free = pool
    owners: dict[CpuSet, int] = {}
    placed = 0
    for vm in range(10_000):
        count = 1 + vm % 3
        request = Request(count, threads)
        try:
            got = allocate(topo, pool, free, request)
        except Refusal as refusal:
            assert refusal.code == "insufficient-cpus"
            if threads == "prefer":
                assert len(free) < count
            elif threads == "isolate":
                assert sum(whole_free_cores(topo, free).values()) < count
            break
        chosen = CpuSet.of(got.cpus)
        assert len(chosen) == count and chosen <= free and got.holds <= free
        assert chosen.isdisjoint(got.holds)
        if threads == "prefer":
            per_node: dict[int, int] = {}
            for c in free:
                per_node[topo.node_of(c)] = per_node.get(topo.node_of(c), 0) + 1
            if max(per_node.values()) >= count:
                assert len(nodes_of(topo, got.cpus)) == 1, (dump, vm, got)
        if threads == "isolate":
            for c in got.cpus:
                core = topo.siblings(c) & topo.online
                assert core not in owners, f"{dump}: core {core} used twice"
                owners[core] = vm
                assert core <= chosen | got.holds
        free = free - chosen - got.holds
        placed += 1
    assert placed > 0


# -- admission: refused only when no placement exists (exact brute force) ------------------

@st.composite
def small_hosts(draw: st.DrawFn) -> Topology:
    """Up to 12 CPUs: cores of 1-3 threads with arbitrary CPU numbers (so sibling offsets
    differ from core to core), spread over 1-3 nodes, some CPUs offline."""
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=6))
    total = sum(sizes)
    if total > 12:
        sizes, total = sizes[:2], sum(sizes[:2])
    ids = draw(st.permutations(range(total)))
    nodes = draw(st.integers(1, 3))
    offline = set(draw(st.sets(st.sampled_from(ids), max_size=2)))
    cpus: dict[int, Cpu] = {}
    node_cpus: dict[int, set[int]] = {}
    start = 0
    for i, size in enumerate(sizes):
        core = ids[start:start + size]
        start += size
        node = i * nodes // len(sizes)
        for cpu in core:
            cpus[cpu] = Cpu(id=cpu, online=cpu not in offline, package=node // 2, die=0,
                            cluster=None, core=i, siblings=CpuSet.of(core), node=node)
            node_cpus.setdefault(node, set()).add(cpu)
    present = CpuSet.of(cpus)
    online = present - CpuSet.of(offline)
    if not online:
        online = present
    return Topology(cpus=cpus, present=present, online=online, isolated=CpuSet(),
                    nohz_full=CpuSet(), nodes={n: CpuSet.of(c) for n, c in node_cpus.items()})


def placement_ok(topo: Topology, usable: CpuSet, chosen: frozenset[int],
                 policy: ThreadPolicy) -> bool:
    """Does this set of CPUs satisfy the thread policy, given the usable (free, in the pool,
    online) CPUs?  Written from the policies' definitions, not from the allocator."""
    cores = [topo.siblings(c) & topo.online for c in chosen]
    if policy == "prefer":
        return True
    if any(not core <= usable for core in cores):
        return False  # every other policy takes whole free cores only
    if policy == "isolate":
        return len(set(cores)) == len(cores)  # one CPU per core
    if policy == "require":
        return all(len(core) > 1 for core in cores)
    return True  # whole


def feasible(topo: Topology, pool: CpuSet, free: CpuSet, request: Request) -> bool:
    """Is there any set of ``request.count`` CPUs that the policy allows?  Brute force."""
    usable = free & pool & topo.online
    allowed = sorted(c for c in usable
                     if request.nodes is None or topo.node_of(c) in request.nodes)
    return any(placement_ok(topo, usable, frozenset(chosen), request.threads)
               for chosen in itertools.combinations(allowed, request.count))


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_refused_only_when_no_placement_exists(data: st.DataObject) -> None:
    topo = data.draw(small_hosts())
    cpus = sorted(topo.present)
    pool = CpuSet.of(data.draw(st.sets(st.sampled_from(cpus), min_size=1)))
    free = CpuSet.of(data.draw(st.sets(st.sampled_from(sorted(pool)))))
    nodes = data.draw(st.none() | st.sets(st.sampled_from(sorted(topo.nodes)), min_size=1))
    request = Request(data.draw(st.integers(1, len(cpus))), data.draw(st.sampled_from(POLICIES)),
                      None if nodes is None else CpuSet.of(nodes))
    exists = feasible(topo, pool, free, request)
    try:
        got = allocate(topo, pool, free, request)
    except Refusal:
        assert not exists, "refused although a placement exists"
        return
    assert exists
    usable = free & pool & topo.online
    chosen = frozenset(got.cpus)
    assert len(chosen) == len(got.cpus) == request.count
    assert placement_ok(topo, usable, chosen, request.threads)
    if request.nodes is not None:
        assert {topo.node_of(c) for c in chosen} <= set(request.nodes)
    # Holds: exactly the rest of the cores used, under every policy but prefer.
    touched = CpuSet.of(t for c in chosen for t in topo.siblings(c) & topo.online)
    assert got.holds == (EMPTY if request.threads == "prefer" else touched - CpuSet.of(chosen))
    assert got.holds <= usable
