"""The fast paths of a decision (issue #12) decide exactly what the straightforward code
does: the lease split, the memos keyed by object identity, the free-CPU mask and the
batched lease checks, each against a plain version, on random hosts, leases and requests."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from pinwarden import allocator, policy
from pinwarden.cpuset import CpuSet, union
from pinwarden.domain import DomainSpec
from pinwarden.errors import PinwardenError
from pinwarden.model import HolderRef, Lease, Plan, domain_holder, job_holder
from pinwarden.partition import Host, Partition, PartitionMode
from pinwarden.record import replace
from pinwarden.topology import Topology
from test_allocator import POLICIES, build, small_hosts

# -- plain versions ------------------------------------------------------------------------


def plain_split(leases: Sequence[Lease], holder: HolderRef) -> tuple[dict[int, Lease],
                                                                      list[int]]:
    others: dict[int, Lease] = {}
    mine: list[int] = []
    for lease in leases:
        if lease.holder.driver == holder.driver and lease.holder.key == holder.key:
            mine.append(lease.cpu)
        else:
            others[lease.cpu] = lease
    return others, mine


def plain_online_vm_cpus(host: Host) -> CpuSet:
    return host.partition.vm_cpus & host.topology.online


def plain_free_mask(host: allocator._HostLayout, pool: CpuSet, free: CpuSet) -> int:
    return sum(1 << cpu for cpu in free.cpus & pool.cpus & host.online)


def plain_layout(topology: Topology) -> dict[int, tuple[int, list[int], list[tuple[int, ...]]]]:
    """Node -> (mask of its online CPUs, its cores' masks, its cores' threads): every
    online CPU on the core of its online siblings, a core on the node of its first thread."""
    online = topology.online & CpuSet.of(topology.cpus)
    cores = sorted({tuple(sorted((topology.siblings(cpu) & online) | CpuSet.of([cpu])))
                    for cpu in online})
    out: dict[int, tuple[int, list[int], list[tuple[int, ...]]]] = {}
    for threads in cores:
        mask = sum(1 << cpu for cpu in threads)
        all_of, masks, listed = out.get(topology.node_of(threads[0]), (0, [], []))
        out[topology.node_of(threads[0])] = (all_of | mask, [*masks, mask], [*listed, threads])
    return out


def plain_add_all(self: policy._Leases, items: Sequence[tuple[str, CpuSet, str]]) -> None:
    for label, cpus, role in items:
        self.add(label, cpus, role)


def plain_holders_of(ctx: policy._Ctx, cpus: CpuSet) -> str:
    by: dict[HolderRef, list[int]] = {}
    for cpu in cpus:
        lease = ctx.others.get(cpu)
        if lease is not None:
            by.setdefault(lease.holder, []).append(cpu)
    return "; ".join(f"{'CPU' if len(c) == 1 else 'CPUs'} {CpuSet.of(c)} to {h}"
                     for h, c in by.items())


def plain_ranges(cpus: CpuSet) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for cpu in sorted(cpus.cpus):
        if out and out[-1][1] == cpu - 1:
            out[-1] = (out[-1][0], cpu)
        else:
            out.append((cpu, cpu))
    return out


@contextlib.contextmanager
def plain_code() -> Iterator[None]:
    """The plain versions in place of the fast ones (put back afterwards)."""
    swaps = [(policy, "_split", plain_split), (policy, "_online_vm_cpus", plain_online_vm_cpus),
             (allocator, "_free_mask", plain_free_mask),
             (policy._Leases, "add_all", plain_add_all),
             (policy, "_holders_of", plain_holders_of), (CpuSet, "ranges", plain_ranges)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, value in swaps:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def outcome(call: Callable[[], Plan]) -> tuple[object, ...]:
    try:
        return ("plan", call())
    except PinwardenError as exc:
        return ("refused", type(exc).__name__, exc.code, exc.message)


def fresh(topology: Topology) -> Topology:
    """An equal topology made of new objects (no memo or layout cache knows it)."""
    return replace(topology, cpus=dict(topology.cpus),
                               online=CpuSet(frozenset(topology.online.cpus)))


# -- scenarios -----------------------------------------------------------------------------

HOLDERS = [domain_holder("qemu", "a", None), domain_holder("qemu", "b", "ab" * 16),
           domain_holder("lxc", "a", None), job_holder("j")]


@st.composite
def hosts(draw: st.DrawFn) -> Host:
    offline = draw(st.sets(st.integers(0, 40), max_size=3))
    topo = build(sockets=draw(st.integers(1, 2)), nodes=draw(st.integers(1, 3)),
                 cores=draw(st.integers(1, 5)), threads=draw(st.integers(1, 3)),
                 adjacent=draw(st.booleans()), offline=CpuSet.of(offline))
    online = sorted(topo.online)
    if not online:
        topo = replace(topo, online=topo.present)
        online = sorted(topo.present)
    vm = CpuSet.of(draw(st.sets(st.sampled_from(online), min_size=1)))
    modes: list[PartitionMode] = ["none", "isolcpus", "cgroup"]
    mode = draw(st.sampled_from(modes))
    return Host(topo, Partition(mode, vm, topo.online - vm, "test",
                                "machine" if mode == "cgroup" else None))


@st.composite
def lease_lists(draw: st.DrawFn, host: Host) -> list[Lease]:
    cpus = draw(st.sets(st.sampled_from(sorted(host.topology.present))))
    out = []
    for cpu in sorted(cpus):
        holder = draw(st.sampled_from(HOLDERS))
        if draw(st.booleans()):  # an equal holder in its own object, or renamed (same key)
            holder = HolderRef(holder.driver, holder.key,
                               draw(st.sampled_from([holder.name, "renamed"])))
        out.append(Lease(cpu, holder, draw(st.sampled_from(["vcpu0", "emulator"])), 0.0))
    return out


@st.composite
def requests(draw: st.DrawFn, host: Host) -> DomainSpec | policy.JobSpec:
    present = sorted(host.topology.present)
    some = st.sets(st.sampled_from(present), min_size=1, max_size=3).map(CpuSet.of)
    threads = draw(st.sampled_from(POLICIES))
    if draw(st.integers(0, 4)) == 0:
        return policy.JobSpec(name="a", count=draw(st.integers(1, 4)),
                              cpus=draw(st.none() | some), threads=threads)
    vcpus = draw(st.integers(1, 4))
    pins = draw(st.none() | st.fixed_dictionaries({v: some for v in range(vcpus)}))
    nodes = draw(st.none() | st.sets(st.sampled_from(sorted(host.topology.nodes)),
                                     min_size=1).map(CpuSet.of))
    iothreads = draw(st.integers(0, 2))
    iopins = draw(st.fixed_dictionaries({}, optional={i: some for i in range(1, iothreads + 1)}))
    return DomainSpec(name=draw(st.sampled_from(["a", "c"])), uuid=None, vcpus=vcpus,
                      iothreads=iothreads, iothreadpins=iopins,
                      exclusive=draw(st.booleans()), threads=threads,
                      emulator=draw(st.sampled_from(["float", "isolate", "shared"])),
                      vcpupins=pins or {}, cpuset=draw(st.none() | some),
                      emulatorpin=draw(st.none() | some), numa_nodeset=nodes)


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decide_equals_the_plain_decision(data: st.DataObject) -> None:
    host = data.draw(hosts())
    leases = data.draw(lease_lists(host))
    request = data.draw(requests(host))
    order = list(leases)
    random.Random(data.draw(st.integers(0, 9))).shuffle(order)
    fast = [outcome(lambda: policy.decide(request, host, leases)),
            outcome(lambda: policy.decide(request, host, leases)),  # memos warm
            outcome(lambda: policy.decide(request, Host(fresh(host.topology),
                                                        host.partition), order))]
    with plain_code():
        expected = outcome(lambda: policy.decide(request, Host(fresh(host.topology),
                                                               host.partition), leases))
    assert fast == [expected] * 3


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_free_mask_equals_the_plain_mask(data: st.DataObject) -> None:
    host = data.draw(hosts())
    layout = allocator._host_layout(host.topology)
    beyond = st.integers(0, max(host.topology.present) + 70)  # above the last online CPU too
    pool = CpuSet.of(data.draw(st.sets(beyond)))
    free = CpuSet.of(data.draw(st.sets(beyond)))
    for _ in range(2):  # the pool's mask computed, then remembered
        assert allocator._free_mask(layout, pool, free) == plain_free_mask(layout, pool, free)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_split_equals_the_plain_split(data: st.DataObject) -> None:
    host = data.draw(hosts())
    leases = data.draw(lease_lists(host))
    holder = data.draw(st.sampled_from(HOLDERS))
    assert policy._split(leases, holder) == plain_split(leases, holder)


@given(st.lists(st.sets(st.integers(0, 80), max_size=40), max_size=6))
def test_ranges_and_union_equal_the_plain_ones(sets: list[set[int]]) -> None:
    cpusets = [CpuSet.of(s) for s in sets]
    for cpus in cpusets:
        assert cpus.ranges() == plain_ranges(cpus)
    plain: frozenset[int] = frozenset()
    for cpus in cpusets:
        plain = plain | cpus.cpus
    assert union(cpusets) == CpuSet(plain)
    assert union(iter(cpusets)) == CpuSet(plain)


def test_a_layout_lives_as_long_as_its_topology_and_the_cache_stays_bounded() -> None:
    """The layout cache by identity: a hit is the same layout, an entry goes with its
    topology, and past the cache's size only the oldest entries are dropped, one at a time
    (a whole cache of big layouts freed at once took milliseconds of one decision)."""
    base = build(sockets=2, nodes=2, cores=8)
    first = fresh(base)
    layout = allocator._host_layout(first)
    assert allocator._host_layout(first) is layout
    assert id(first) in allocator._LAYOUTS
    key = id(first)
    del first
    assert key not in allocator._LAYOUTS
    size = allocator._LAYOUT_CACHE_SIZE
    alive = [fresh(base) for _ in range(size + 5)]
    for topology in alive:
        allocator._host_layout(topology)
    assert len(allocator._LAYOUTS) == size
    assert [id(t) in allocator._LAYOUTS for t in alive] == [False] * 5 + [True] * size
    # An evicted topology still gets a correct (rebuilt) layout.
    again = allocator._host_layout(alive[0])
    assert again.nodes.keys() == layout.nodes.keys()
    assert [n.cores for n in again.nodes.values()] == [n.cores for n in layout.nodes.values()]
    assert allocator._host_layout(alive[0]) is again


@settings(max_examples=300, deadline=None)
@given(st.one_of(hosts().map(lambda host: host.topology), small_hosts()))
def test_layout_equals_the_plain_layout(topology: Topology) -> None:
    """Nodes of cores as masks (fast: pairs ordered without sorting, a node of one core
    shape from its first threads) against a plain build, on regular hosts and on small ones
    with cores of mixed sizes, arbitrary numbering and offline siblings."""
    layout = allocator._host_layout(fresh(topology))
    got = {n: (node.mask, list(node.cores), list(node.threads))
           for n, node in layout.nodes.items()}
    assert got == plain_layout(topology)
    for node in layout.nodes.values():  # the tables a decision builds when it needs them
        assert node.index == {threads[0]: i for i, threads in enumerate(node.threads)}
    assert layout.mask == sum(1 << cpu for cpu in topology.online & CpuSet.of(topology.cpus))


def test_the_layout_cache_takes_decisions_from_several_threads() -> None:
    """The daemon decides in its hook server's and its start server's threads: fresh
    topologies built, cached, evicted and freed in parallel never break a decision.  (The
    eviction copies the keys because a key iterator could see another thread's change;
    that window is a few bytecodes wide and this test has not hit it with the iterator.)"""
    import sys
    import threading

    base = build(sockets=1, nodes=2, cores=4)
    request = allocator.Request(2, "prefer")
    errors: list[BaseException] = []
    results: list[tuple[int, ...]] = []

    def work() -> None:
        try:
            for _ in range(300):
                got = allocator.allocate(fresh(base), base.online, base.online, request)
                results.append(got.cpus)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=work) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(results) == 6 * 300 and len(set(results)) == 1
    assert len(allocator._LAYOUTS) <= allocator._LAYOUT_CACHE_SIZE
