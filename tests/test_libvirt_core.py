"""Pure parts of the libvirt adapters: re-pin planning, daemon reconcile, hook install and
dispatch, the stored metadata of ``pinwarden define``.  (The real thing: test_libvirt_e2e.)"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enforce_helpers import lease, make_host
from pinwarden import procs
from pinwarden.config import Config
from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.domain import parse_domain
from pinwarden.errors import InputError, LedgerError, LibvirtError, Refusal
from pinwarden.ledger import HolderRecord, Ledger
from pinwarden.libvirt import hook, hookclient, place
from pinwarden.libvirt.reconcile import Adopt, Drift, Free, Place, Report, reconcile
from pinwarden.libvirt.repin import give_back, repins
from pinwarden.libvirt.start import libvirt_failure, with_pinwarden_metadata
from pinwarden.libvirt.state import Affinity, DomainInfo, group_affinity, threads_as_planned
from pinwarden.manager import Manager
from pinwarden.model import HolderRef, Plan, domain_holder, job_holder

UUID_A = "aaaaaaaa-0000-0000-0000-000000000001"
A = domain_holder("qemu", "a", UUID_A)


def cs(text: str) -> CpuSet:
    return CpuSet.parse(text)


def xml(name: str, body: str = "") -> str:
    return (f"<domain type='kvm'><name>{name}</name><memory>32768</memory>"
            f"<vcpu>2</vcpu>{body}<os><type>hvm</type></os></domain>")


def running(name: str, body: str = "", *, vcpus: str = "0-3", emulator: str = "0-3",
            uuid: str | None = None) -> DomainInfo:
    spec = parse_domain(xml(name, body))
    uuid = uuid or f"{abs(hash(name)) % 10**12:08d}-0000-0000-0000-000000000000"[-36:]
    return DomainInfo("qemu", name, uuid, True, live=spec, persistent=spec,
                      affinity=Affinity({0: cs(vcpus), 1: cs(vcpus)}, cs(emulator)), pid=1)


# -- repin --------------------------------------------------------------------------------

def test_in_cgroup_mode_an_exclusive_start_never_moves_a_shared_domain_to_the_host() -> None:
    """Mode cgroup, VM CPUs 1-2 (machine as the operator set it): an exclusive start taking
    both re-pinned a running shared domain onto the housekeeping CPU 0, the one place
    that mode keeps VMs off, while a new shared domain was refused "nowhere to run"
    (real-libvirt hunt).  Now the start is refused, naming the running domain; in modes
    none and isolcpus the housekeeping fallback stands."""
    from pinwarden.libvirt.repin import ExclusivePlanner
    from pinwarden.partition import Host, Partition

    base = make_host("0-2", "1-2")
    spec = parse_domain(xml("x", EXCLUSIVE_META))
    shared = running("s", vcpus="1-2", emulator="1-2")
    holder = domain_holder("qemu", "x", None)
    cgroup = Host(base.topology, Partition(mode="cgroup", vm_cpus=cs("1-2"), host_cpus=cs("0"),
                                           reason="test", cgroup="machine"))
    with pytest.raises(Refusal, match="no CPU would be left for vcpu0 of running domain "
                                      "'s'") as info:
        ExclusivePlanner(spec, holder, [shared])(cgroup, ())
    assert info.value.code == "insufficient-cpus"
    planner = ExclusivePlanner(spec, holder, [shared])
    assert planner(base, ()).leased() == cs("1-2")  # mode none: on the housekeeping CPU
    assert {m.after for m in planner.moves} == {cs("0")}


def test_floating_threads_move_to_the_pool_and_pinned_ones_keep_the_rest() -> None:
    floating = running("float", vcpus="2", emulator="0-3")
    pinned = running("pinned", "<cputune><vcpupin vcpu='0' cpuset='1-2'/>"
                               "<vcpupin vcpu='1' cpuset='1-2'/></cputune>", vcpus="1-2")
    moves = repins([floating, pinned], A, cs("2"), pool=cs("0-1"))
    got = {(m.domain, m.label): m.after for m in moves}
    assert got == {("float", "vcpu0"): cs("0-1"), ("float", "vcpu1"): cs("0-1"),
                   ("float", "emulator"): cs("0-1,3"),
                   ("pinned", "vcpu0"): cs("1"), ("pinned", "vcpu1"): cs("1"),
                   ("pinned", "emulator"): cs("0-1,3")}
    assert all(m.before != m.after for m in moves)



def test_a_pin_for_the_next_boot_only_does_not_hold_a_running_domain() -> None:
    """'virsh vcpupin --config' pinned a running shared domain's vCPU 0 to CPU 2 in its
    stored definition only: the running one leaves it floating (the hook placed it on 2).
    The exclusive start leasing CPU 2 refused ("pins vcpu0 to CPU 2 only") where the hook
    let the same start through (real-libvirt hunt): it is re-pinned now.  Pinned in both
    definitions, it is still refused."""
    pin = "<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>"
    stored, live = parse_domain(xml("next", pin)), parse_domain(xml("next"))
    nextboot = DomainInfo("qemu", "next", "cccccccc-0000-0000-0000-000000000003", True,
                          live=live, persistent=stored,
                          affinity=Affinity({0: cs("2"), 1: cs("2")}, cs("2")), pid=1)
    moves = repins([nextboot], A, cs("2"), pool=cs("0-1"))
    assert {(m.label, str(m.after)) for m in moves} == {
        ("vcpu0", "0-1"), ("vcpu1", "0-1"), ("emulator", "0-1")}
    both = DomainInfo("qemu", "next", nextboot.uuid, True, live=stored, persistent=stored,
                      affinity=nextboot.affinity, pid=1)
    with pytest.raises(Refusal, match="pins vcpu0 to CPU 2 only"):
        repins([both], A, cs("2"), pool=cs("0-1"))


def test_a_domain_pinned_only_onto_the_lease_is_refused_by_name() -> None:
    pinned = running("pinned", "<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>",
                     vcpus="2")
    with pytest.raises(Refusal) as err:
        repins([pinned], A, cs("2"), pool=cs("0-1"))
    assert "'pinned'" in err.value.message and "CPU 2" in err.value.message
    assert err.value.code == "pinned-elsewhere"


def test_holders_and_the_domain_itself_are_left_alone() -> None:
    me = running("a", vcpus="2", uuid=UUID_A)
    other = running("x", vcpus="2")
    held = other.holder
    assert repins([me, other], A, cs("2"), pool=cs("0"), holders=[held]) == ()


def live_pinned(name: str, uuid: str, vcpus: str, emulator: str) -> DomainInfo:
    """A running domain after live re-pins: its running definition pins every thread."""
    return running(name, f"<cputune><vcpupin vcpu='0' cpuset='{vcpus}'/><vcpupin vcpu='1' "
                         f"cpuset='{vcpus}'/><emulatorpin cpuset='{emulator}'/></cputune>",
                   vcpus=vcpus, emulator=emulator, uuid=uuid)


def test_narrowed_pins_are_given_back_as_the_leases_go() -> None:
    """A shared domain's pins narrowed by two leases (first CPU 2, then 3) get CPU 2 back
    once its lease goes (3 is still leased), then everything; the record keeps the pin as
    it was before the *first* narrowing."""
    from pinwarden.libvirt.repin import give_back, record_moves

    s = running("s", vcpus="0-3", emulator="0-3")
    first = repins([s], A, cs("2"), pool=cs("0-1,3"))
    records = record_moves(first, {})
    assert json.loads(records[f"repin:{s.uuid}:vcpu0"]) == {
        "domain": "s", "before": "0-3", "after": "0-1,3"}
    s = live_pinned("s", s.uuid, "0-1,3", "0-1,3")
    second = repins([s], domain_holder("qemu", "b", "b" * 8), cs("3"), pool=cs("0-1"))
    records = {**records, **record_moves(second, records)}
    assert json.loads(records[f"repin:{s.uuid}:vcpu1"]) == {
        "domain": "s", "before": "0-3", "after": "0-1"}

    s = live_pinned("s", s.uuid, "0-1", "0-1")
    nothing = give_back([s], records, leased=cs("2-3"))  # both still leased
    assert nothing.moves == () and nothing.forget == () and nothing.records == {}
    partly = give_back([s], records, leased=cs("3"))
    assert {(m.label, str(m.before), str(m.after)) for m in partly.moves} == {
        ("vcpu0", "0-1", "0-2"), ("vcpu1", "0-1", "0-2"), ("emulator", "0-1", "0-2")}
    assert partly.forget == ()
    assert {json.loads(v)["after"] for v in partly.records.values()} == {"0-2"}
    s = live_pinned("s", s.uuid, "0-2", "0-2")
    whole = give_back([s], {**records, **partly.records}, leased=CpuSet())
    assert {str(m.after) for m in whole.moves} == {"0-3"}
    assert sorted(whole.forget) == sorted(records) and whole.records == {}


def test_a_running_domain_replanned_moves_each_thread_group_placed_elsewhere() -> None:
    """A shared start overtaken by an exclusive reservation follows the plan of now: each
    thread group the new plan places elsewhere is moved from where the old one had it;
    one placed the same, or left empty by the new plan, keeps its pin."""
    from pinwarden.libvirt.repin import replanned

    old = Plan("s", "u", False, {0: cs("1-3"), 1: cs("1")}, cs("1-3"), {7: cs("1-3")})
    new = Plan("s", "u", False, {0: cs("1,3"), 1: cs("1"), 2: cs("3")}, cs("1,3"),
               {7: CpuSet()})
    assert [(m.label, str(m.before), str(m.after)) for m in replanned("s", "u", old, new)] == [
        ("vcpu0", "1-3", "1,3"), ("vcpu2", "", "3"), ("emulator", "1-3", "1,3")]
    assert replanned("s", "u", old, old) == ()


def test_a_shared_start_records_the_threads_placed_off_leased_cpus() -> None:
    """``pinwarden start`` of a shared domain while CPUs are leased: the thread groups its
    definition leaves to default placement are recorded as narrowed from the pool with
    nothing leased; a thread its definition pins is its own."""
    from pinwarden.libvirt.repin import placed_narrower

    spec = parse_domain(xml("s", "<cputune><vcpupin vcpu='1' cpuset='1'/></cputune>"))
    plan = Plan("s", "u", False, {0: cs("1,3"), 1: cs("1")}, cs("1,3"), default_cpus=cs("1,3"))
    moves = placed_narrower(spec, plan, "s", "u", base=cs("1-3"))
    assert [(m.label, str(m.before), str(m.after)) for m in moves] == [
        ("vcpu0", "1-3", "1,3"), ("emulator", "1-3", "1,3")]
    assert placed_narrower(spec, plan, "s", "u", base=cs("1,3")) == ()
    fallback = Plan("s", "u", False, {0: cs("0"), 1: cs("1")}, cs("0"))
    assert [m.label for m in placed_narrower(spec, fallback, "s", "u", cs("2-3"))] == [
        "vcpu0", "emulator"]


def test_a_pin_changed_since_or_a_domain_gone_is_forgotten_not_given_back() -> None:
    """``virsh vcpupin --live`` by somebody after pinwarden narrowed the pin makes it
    theirs; a domain that no longer runs has nothing to get back."""
    from pinwarden.libvirt.repin import give_back, record_moves

    s = running("s", vcpus="0-3", emulator="0-3")
    records = record_moves(repins([s], A, cs("2"), pool=cs("0-1,3")), {})
    # vCPUs re-pinned by somebody; the kernel's affinity is no guide (it follows cgroups)
    changed = live_pinned("s", s.uuid, "1", "0-1,3")
    out = give_back([changed], records, leased=CpuSet())
    assert [m.label for m in out.moves] == ["emulator"]
    assert sorted(out.forget) == sorted(records)
    gone = give_back([], records, leased=CpuSet())
    assert gone.moves == () and sorted(gone.forget) == sorted(records)
    moved_by_the_kernel = running("s", "<cputune><vcpupin vcpu='0' cpuset='0-1,3'/>"
                                       "</cputune>", vcpus="1", uuid=s.uuid)
    kernel = give_back([moved_by_the_kernel], records, leased=CpuSet())
    assert [(m.label, str(m.after)) for m in kernel.moves] == [("vcpu0", "0-3")]
    # a later lease of CPU 0 that nothing re-pinned the domain for (a plain 'virsh start'
    # through the hook: its cgroup alone keeps it off): CPU 2 comes back all the same,
    # and the pin goes off CPU 0 — it waited for a start's re-pin that never came, for
    # as long as that lease ran (systemd-lab hunt)
    s2 = live_pinned("s", s.uuid, "0-1,3", "0-1,3")
    taking = give_back([s2], records, leased=cs("0"))
    assert {(m.label, str(m.before), str(m.after)) for m in taking.moves} == {
        ("vcpu0", "0-1,3", "1-3"), ("vcpu1", "0-1,3", "1-3"), ("emulator", "0-1,3", "1-3")},\
        taking.moves
    assert taking.forget == ()
    assert {json.loads(v)["after"] for v in taking.records.values()} == {"1-3"}
    # a pin moved to the housekeeping CPUs (every CPU it had was leased) comes back to
    # the first of its CPUs that is free again
    fallback = {f"repin:{s.uuid}:vcpu0": json.dumps({"domain": "s", "before": "2-3",
                                                      "after": "0"})}
    home = give_back([live_pinned("s", s.uuid, "0", "0")], fallback, leased=cs("3"))
    assert [(m.label, str(m.after)) for m in home.moves] == [("vcpu0", "2")]
    broken = give_back([s], {f"repin:{s.uuid}:vcpu0": "{"}, leased=CpuSet())
    assert broken.moves == () and broken.forget == (f"repin:{s.uuid}:vcpu0",)


def test_threads_the_hook_placed_get_the_cpus_back_by_their_affinity() -> None:
    """A shared domain started by plain ``virsh start`` while CPUs were leased: its
    definition pins nothing, and the hook gave its threads the pool with ``sched_setaffinity``
    (recorded from the pool with nothing leased).  Linux keeps such an affinity across cpuset
    changes since 6.2, so when the lease ends the threads are still on the pool: their
    kernel affinity is the pin to compare, and they get the CPUs back.  A kernel that
    widened them itself (before 6.2: affinity = the cgroup's CPUs again) leaves nothing to
    give back."""
    from pinwarden.libvirt.repin import give_back, placed_narrower, record_moves

    spec = parse_domain(xml("s"))
    plan = Plan("s", "u", False, {0: cs("0"), 1: cs("0")}, cs("0"), default_cpus=cs("0"))
    s = running("s", vcpus="0", emulator="0")
    records = record_moves(placed_narrower(spec, plan, "s", s.uuid, base=cs("1-3")), {})
    assert sorted(records) == [f"repin:{s.uuid}:{label}"
                               for label in ("emulator", "vcpu0", "vcpu1")]
    out = give_back([s], records, leased=cs("3"))
    assert {(m.label, str(m.before), str(m.after)) for m in out.moves} == {
        ("vcpu0", "0", "1-2"), ("vcpu1", "0", "1-2"), ("emulator", "0", "1-2")}
    assert out.forget == () and {json.loads(v)["after"] for v in out.records.values()} \
        == {"1-2"}
    widened = running("s", vcpus="1-3", emulator="1-3", uuid=s.uuid)
    assert give_back([widened], records, leased=CpuSet()).moves == ()
    assert sorted(give_back([widened], records, leased=CpuSet()).forget) == sorted(records)
    # a later lease of CPU 0 (a plain 'virsh start' of an exclusive domain, whose hook
    # narrows the cgroup): the kernel takes it from the affinity; still the hook's
    # placement, which gets what is free again at once — it was kept until both leases
    # ended, and no start ever re-pinned it meanwhile (systemd-lab hunt)
    narrowed = running("s", vcpus="0-1", emulator="0-1", uuid=s.uuid)
    later = give_back([narrowed], {k: json.dumps({**json.loads(v), "after": "0-1"})
                                   for k, v in records.items()}, leased=cs("0"))
    taken = running("s", vcpus="1", emulator="1", uuid=s.uuid)
    kept = give_back([taken], {k: json.dumps({**json.loads(v), "after": "0-1"})
                               for k, v in records.items()}, leased=cs("0,3"))
    assert {str(m.after) for m in later.moves} == {"1-3"} and len(later.moves) == 3
    assert sorted(later.forget) == sorted(records)  # whole again: nothing left to give
    assert {str(m.after) for m in kept.moves} == {"1-2"} and kept.forget == ()


def test_on_a_kernel_that_resets_affinity_the_hooks_placement_is_put_back() -> None:
    """Before Linux 6.2 the kernel gives every thread of a cpuset cgroup all of the
    cgroup's CPUs whenever those change (Debian 12's 6.1): a shared domain the hook placed
    on the VM CPUs 1-3 got every CPU, housekeeping CPU 0 included, when the last lease
    ended (the shared group is every CPU again in mode none), and a record whose threads
    the kernel had moved was forgotten (the trixie-vs-bookworm story: B kept 2-3).  There
    the hook records its placement even on the whole pool, and the give-back takes what the
    kernel reads as still pinwarden's placement, put back to what it had less the leased
    CPUs whenever it differs."""
    from pinwarden.libvirt.repin import give_back, placed_narrower, record_moves
    from pinwarden.narrowed import narrowed

    spec = parse_domain(xml("s"))
    base = cs("1-3")
    plan = Plan("s", "u", False, {0: base, 1: base}, base, default_cpus=base)
    s = running("s", vcpus="1-3", emulator="1-3")
    assert placed_narrower(spec, plan, "s", s.uuid, base=base) == ()
    records = record_moves(placed_narrower(spec, plan, "s", s.uuid, base=base, every=True),
                           {})
    assert len(records) == 3 and narrowed(records, CpuSet()) == ()  # nothing narrowed

    def back(vcpus: str, leased: str, recorded: dict[str, str] = records,
             resets: bool = True) -> Any:
        dom = running("s", vcpus=vcpus, emulator=vcpus, uuid=s.uuid)
        return give_back([dom], recorded, cs(leased) if leased else CpuSet(),
                         kernel_resets=resets)

    # as placed; then a lease of CPU 3, whose cgroup write gave the threads the shared
    # group's 1-2 (the VM CPUs less the leased): what they are to have, nothing to do
    for vcpus, leased in (("1-3", ""), ("1-2", "3")):
        out = back(vcpus, leased)
        assert (out.moves, out.forget) == ((), ()), (vcpus, out)
        # (where the kernel moved them, the record says so: status shows them there)
        assert {json.loads(v)["after"] for v in out.records.values()} <= {vcpus}, out
    # the last lease ended: the kernel gave them every CPU; they get the VM CPUs back
    out = back("0-3", "")
    assert {(m.label, str(m.before), str(m.after)) for m in out.moves} == {
        ("vcpu0", "0-3", "1-3"), ("vcpu1", "0-3", "1-3"), ("emulator", "0-3", "1-3")}
    assert sorted(out.forget) == sorted(records)
    # a kernel that keeps affinity never reads that from the hook's placement: somebody's
    assert back("0-3", "", resets=False).moves == ()
    assert sorted(back("0-3", "", resets=False).forget) == sorted(records)
    # placed on CPU 3 while 1-2 were leased; CPU 1 freed, and the kernel's reset already
    # gave the threads 2-3: nothing to do, and the record is kept for CPU 1 (it was lost)
    narrow = {k: json.dumps({**json.loads(v), "after": "3"}) for k, v in records.items()}
    kept = back("2-3", "1", narrow)
    assert (kept.moves, kept.forget) == ((), ())
    # (the record follows the kernel, so that status shows where the threads are)
    assert {json.loads(v)["after"] for v in kept.records.values()} == {"2-3"}
    assert sorted(kept.records) == sorted(records)
    assert sorted(back("2-3", "1", narrow, resets=False).forget) == sorted(records)
    # a CPU leased since that the threads still have: off it, what is free back (a hook
    # start never re-pins: systemd-lab hunt)
    assert {str(m.after) for m in back("1-3", "3", narrow).moves} == {"1-2"}
    # a group with a live pin of its own (virsh vcpupin --live) is judged by that pin
    pinned = DomainInfo("qemu", "s", s.uuid, True,
                        live=parse_domain(xml("s", "<cputune><vcpupin vcpu='0' cpuset='0'/>"
                                                   "</cputune>")),
                        persistent=spec, affinity=Affinity({0: cs("0"), 1: cs("0-3")},
                                                           cs("0-3")), pid=1)
    out = give_back([pinned], records, CpuSet(), kernel_resets=True)
    assert f"repin:{s.uuid}:vcpu0" in out.forget
    assert {m.label for m in out.moves} == {"vcpu1", "emulator"}


def test_cgroup_resets_affinity_before_linux_6_2(tmp_path: Path) -> None:
    from pinwarden.enforce.affinity import cgroup_resets_affinity

    release = tmp_path / "proc/sys/kernel/osrelease"
    assert cgroup_resets_affinity(tmp_path)  # unreadable: records rather than lose
    release.parent.mkdir(parents=True)
    for text, resets in (("6.1.0-57-amd64\n", True), ("5.15.0-91-generic", True),
                         ("6.2.0", False), ("6.12.48+deb13-amd64", False),
                         ("7.3.0", False), ("garbage", True)):
        release.write_text(text)
        assert cgroup_resets_affinity(tmp_path) is resets, text


# -- reconcile ----------------------------------------------------------------------------

def record(ref: HolderRef, vcpus: dict[int, str], leases: dict[int, str], *,
           created: float = 0.0, owner: int | None = None) -> HolderRecord:
    plan = Plan(ref.name, ref.uuid, True, {v: cs(c) for v, c in vcpus.items()}, cs("3"),
                leases=leases)
    return HolderRecord(ref, created, owner, None, plan)


def test_reconcile_frees_adopts_and_reports_drift() -> None:
    exclusive = "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>" \
                "</metadata>"
    gone = domain_holder("qemu", "gone", "99999999-0000-0000-0000-000000000000")
    job = job_holder("job")
    held = running("held", vcpus="2", emulator="3")
    held_ref = held.holder
    drifted = DomainInfo("qemu", "held", held.uuid, True, held.live, held.persistent,
                         Affinity({0: cs("2"), 1: cs("1-2")}, cs("3")), 1)
    stray = running("stray", exclusive + "<resource><partition>/pw/vm-stray</partition>"
                    "</resource>", vcpus="1")
    outside = running("outside", exclusive, vcpus="0")
    intruder = running("intruder", vcpus="0-2", emulator="0")
    actions = reconcile([drifted, stray, outside, intruder],
                        [record(gone, {0: "1"}, {1: "vcpu0"}, owner=4242),
                         record(job, {}, {0: "task"}),
                         record(held_ref, {0: "2", 1: "2"}, {2: "vcpu0", 3: "emulator"})],
                        lambda h: f"/pw/vm-{h.name}", now=1000.0)
    frees = [a.holder for a in actions if isinstance(a, Free)]
    adopts = [a.domain.name for a in actions if isinstance(a, Adopt)]
    drifts = {(a.repin.domain, a.repin.label): a.repin.after for a in actions
              if isinstance(a, Drift)}
    assert frees == [gone]  # the run job is not libvirt's to free
    assert adopts == ["stray"]
    reports = [a.message for a in actions if isinstance(a, Report)]
    assert len(reports) == 1 and "outside runs in partition /machine" in reports[0]
    assert drifts == {("held", "vcpu1"): cs("2"), ("intruder", "vcpu0"): cs("0-1"),
                      ("intruder", "vcpu1"): cs("0-1")}
    why = {a.repin.label: a.reason for a in actions if isinstance(a, Drift)
           and a.repin.domain == "intruder"}
    assert why["vcpu1"] == "shared domain intruder vcpu1 may run on CPU 2 leased to " \
        f"{held_ref}", why

    # an offline vCPU (no thread): said as where a hot-plug would put it
    plugged = DomainInfo("qemu", "intruder", intruder.uuid, True, intruder.live,
                         intruder.persistent, Affinity({0: cs("0"), 1: cs("0-2")}, cs("0"),
                                                       offline=frozenset({1})), 1)
    held_alone = DomainInfo("qemu", "held", held.uuid, True, held.live, held.persistent,
                            Affinity({0: cs("2")}, cs("2")), 1)
    (drift,) = [a for a in reconcile([held_alone, plugged],
                                     [record(held_ref, {0: "2"}, {2: "vcpu0"})],
                                     lambda h: f"/pw/vm-{h.name}", now=1000.0)
                if isinstance(a, Drift) and a.repin.domain == "intruder"]
    assert drift.repin.after == cs("0-1") and drift.narrows
    assert drift.reason == "shared domain intruder vcpu1 (offline) would be hot-plugged " \
        f"onto CPU 2 leased to {held_ref}"



def test_an_exclusive_domains_unpinned_threads_go_back_to_its_plan_by_every_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exclusive domain started by plain 'virsh start': its running definition pins
    nothing (the hook placed its threads by affinity), and a vCPU hot-plugged later got
    libvirt's default, vcpu0's CPU, its own leased CPU 3 idle; the daemon only reported
    the drift (put back with --restore-drift alone: systemd-lab hunt).  A thread the
    definition leaves unpinned is pinwarden's to place: every pass puts it back; one
    somebody pinned ('virsh vcpupin --live') stays a report."""
    from pinwarden.libvirt import connect as lv
    from pinwarden.libvirt import daemon

    plain = running("held", vcpus="2", emulator="2")
    pinned = running("held", "<cputune><vcpupin vcpu='1' cpuset='2'/></cputune>",
                     vcpus="2", emulator="2", uuid=plain.uuid)
    plugged = DomainInfo("qemu", "held", plain.uuid, True, plain.live, plain.persistent,
                         Affinity({0: cs("2"), 1: cs("2")}, cs("2-3"),
                                  offline=frozenset({1})), 1)
    lease_of = record(plain.holder, {0: "2", 1: "3"}, {2: "vcpu0", 3: "vcpu1"})
    for dom, unpinned in ((plugged, True), (pinned, False)):
        (drift,) = [a for a in reconcile([dom], [lease_of], lambda h: "/machine",
                                         now=1000.0) if isinstance(a, Drift)
                    and a.repin.label == "vcpu1"]
        assert drift.repin.after == cs("3") and drift.unpinned is unpinned, drift

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    manager.reserve(plain.holder, lambda _host, _leases: lease_of.plan, owner_pid=os.getpid())
    applied: list[str] = []

    class Conn:
        def getURI(self) -> str:
            return "qemu:///system"

    monkeypatch.setattr(daemon, "_sync", lambda _manager: None)
    monkeypatch.setattr(daemon.pins, "give_back", lambda *_a, **_k: ())
    monkeypatch.setattr(lv, "apply_repin", lambda _conn, repin: applied.append(
        f"{repin.label} {repin.after}"))
    for dom, want in ((plugged, ["vcpu1 3", "emulator 3"]), (pinned, ["emulator 3"])):
        applied.clear()
        monkeypatch.setattr(lv, "list_domains", lambda _conn, active_only, dom=dom: [dom])
        daemon.reconcile_once(manager, Conn(), restore=False)
        assert sorted(applied) == sorted(want), applied


def test_reconcile_places_threads_the_xml_leaves_without_cpus_when_off_the_vm_cpus() -> None:
    """VM CPUs 1-3, CPU 3 leased to ``held``.  A shared domain that names no CPUs gets the
    VM CPUs from the hook at its start; threads libvirt adds later (a vCPU hot-plugged,
    an I/O thread added live) get every CPU.  Those off the VM CPUs are placed (not also
    narrowed off the lease: the placement is the VM CPUs less the leased ones); a thread
    the user pinned, a domain with ``<vcpu cpuset>``, an offline vCPU (no thread to
    place) and the threads already on VM CPUs are left to the other rules."""
    held = running("held", vcpus="3", emulator="3")
    lease_of_held = record(held.holder, {0: "3", 1: "3"}, {3: "vcpu0"})

    def with_affinity(dom: DomainInfo, affinity: Affinity) -> DomainInfo:
        return DomainInfo("qemu", dom.name, dom.uuid, True, dom.live, dom.persistent,
                          affinity, 1)

    hooked = with_affinity(running("hooked"), Affinity(
        {0: cs("1-2"), 1: cs("0-3"), 2: cs("0-3")}, cs("1-2"), {1: cs("0-2")},
        offline=frozenset({2})))
    pinned = with_affinity(running("pinned", "<cputune><vcpupin vcpu='1' cpuset='0'/>"
                                             "</cputune>"),
                           Affinity({0: cs("0-2"), 1: cs("0")}, cs("1-2")))
    spec = parse_domain(xml("withset").replace("<vcpu>2", "<vcpu cpuset='0-2'>2"))
    withset = DomainInfo("qemu", "withset", "bbbbbbbb-0000-0000-0000-000000000001", True,
                         spec, spec, Affinity({0: cs("0-2"), 1: cs("0-2")}, cs("0-2")), 1)

    def actions(vm_cpus: CpuSet | None) -> list[object]:
        return list(reconcile([held, hooked, pinned, withset], [lease_of_held],
                              lambda h: "/machine", now=1000.0, vm_cpus=vm_cpus))

    got = actions(cs("1-3"))
    placed = {a.domain.name: a.threads for a in got if isinstance(a, Place)}
    assert placed == {"hooked": ("vcpu1", "iothread1"), "pinned": ("vcpu0",)}, got
    (why,) = [a.reason for a in got if isinstance(a, Place) and a.domain.name == "pinned"]
    assert why == "shared domain pinned vcpu0 may run off the VM CPUs 1-3, though its XML " \
        "names no CPUs for them"
    drifts = {(a.repin.domain, a.repin.label): a.repin.after for a in got
              if isinstance(a, Drift)}
    # the offline vCPU keeps only the lease rule: a hot-plug would land off the lease
    assert drifts == {("hooked", "vcpu2"): cs("0-2")}, got
    # every VM CPU leased: shared domains run on the housekeeping CPUs, nothing to place
    assert not [a for a in actions(cs("3")) if isinstance(a, Place)]
    assert not [a for a in actions(None) if isinstance(a, Place)]


# -- hook ---------------------------------------------------------------------------------

def test_hook_namespace_is_the_domain_metadata_namespace() -> None:
    from pinwarden.domain import PW_NS

    assert hook.PW_NAMESPACE == PW_NS


def test_hook_acts_only_at_prepare_started_release_and_restore() -> None:
    assert [hook.action_for(op) for op in ("prepare", "start", "started", "stopped",
                                           "release", "migrate", "restore", "reconnect")] \
        == ["admit", "ignore", "own", "ignore", "free", "ignore", "rewrite", "ignore"]


EXCLUSIVE_META = "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>" \
                 "</metadata>"


def script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def call(hook_file: Path, *args: str, stdin: str = "<domain/>",
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(hook_file), *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_hook_install_writes_drop_ins_and_never_touches_another_hook(tmp_path: Path) -> None:
    foreign = tmp_path / "qemu"
    foreign.write_text("#!/bin/sh\necho vfio\n")  # another tool's hook (VFIO set-ups)
    legacy = tmp_path / "lxc"
    legacy.write_text(f"#!/bin/sh\n{hook.MARKER} (lxc)\n")  # pinwarden's old-style hook
    done = hook.install(tmp_path, exe="/bin/echo", state_dir=Path("/s d"), config=None,
                        check=False)
    assert done.paths == (tmp_path / "qemu.d" / "pinwarden", tmp_path / "lxc.d" / "pinwarden")
    assert done.removed == (legacy,) and not legacy.exists() and done.created_dirs
    assert foreign.read_text() == "#!/bin/sh\necho vfio\n"
    for path in done.paths:
        assert path.stat().st_mode & stat.S_IXUSR
    qemu = done.paths[0]
    # the script passes libvirt's arguments through, after our options
    out = call(qemu, "vm1", "prepare", "begin", "-").stdout
    assert out.split() == ["hook", "run", "--state-dir", "/s", "d", "qemu", "vm1",
                           "prepare", "begin", "-"]
    # restore: pinned domains go to the command, whose output libvirt restores; others
    # end in the script, printing nothing (libvirt restores the saved XML)
    out = call(qemu, "vm1", "restore", "begin", "-",
               stdin="<domain><cputune><vcpupin vcpu='0' cpuset='1'/></cputune></domain>")
    assert out.returncode == 0 and out.stdout.split() == [
        "hook", "run", "--state-dir", "/s", "d", "qemu", "vm1", "restore", "begin", "-"]
    out = call(qemu, "vm1", "restore", "begin", "-", stdin="<domain><vcpu>1</vcpu></domain>")
    assert out.returncode == 0 and out.stdout == ""
    other = tmp_path / "lxc.d" / "50-other"  # another tool's drop-in beside ours
    other.write_text("#!/bin/sh\n")
    assert hook.uninstall(tmp_path) == done.paths
    assert foreign.exists() and not qemu.exists()
    # the directories it leaves empty go (as before the install), another's stays
    assert not (tmp_path / "qemu.d").exists() and other.exists()


def test_reload_advice_names_the_daemons_that_run_the_hooks() -> None:
    # monolithic libvirtd, or the drivers' modular daemons (Fedora, the RHEL 9 family)
    assert hook.daemons_to_reload(frozenset({"libvirtd", "sshd"})) == ("libvirtd",)
    assert hook.daemons_to_reload(frozenset({"virtqemud", "virtlxcd", "virtnetworkd"})) \
        == ("virtlxcd", "virtqemud")
    assert hook.daemons_to_reload(frozenset({"virtlxcd"}), ("qemu",)) == ()
    advice = hook.reload_advice(frozenset({"virtqemud"}))
    assert "'systemctl reload virtqemud'" in advice and "libvirtd" not in advice
    idle = hook.reload_advice(frozenset())
    assert "none runs now (libvirtd, virtlxcd, virtqemud)" in idle and "systemctl" not in idle


def test_hook_install_quotes_every_path_it_writes(tmp_path: Path) -> None:
    """Paths with newlines, quotes and ``$(…)`` stay data in the drop-in: a state
    directory with a newline broke out of a comment line of the script, and the line
    after it ran as a command at every hook call (hunt)."""
    pwned = tmp_path / "PWNED"
    for state in (f"/s\ntouch {pwned}\n", f"/s'$(touch {pwned})'", f"/s\n`touch {pwned}`"):
        hooks = tmp_path / "hooks"
        done = hook.install(hooks, exe="/bin/echo", state_dir=Path(state), config=None,
                            check=False)
        for op in ("prepare", "started", "stopped", "release", "restore"):
            out = call(done.paths[0], "vm1", op, "begin", "-",
                       stdin="<domain><cputune><vcpupin vcpu='0' cpuset='1'/></cputune>"
                             "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1'/>"
                             "</metadata></domain>")
            assert out.returncode == 0, (state, op, out.stderr)
            if op == "prepare":
                assert state in out.stdout, (state, out.stdout)  # one argument, as given
        assert not pwned.exists(), state
        hook.uninstall(hooks)


def test_hook_install_names_a_running_modular_daemon(tmp_path: Path) -> None:
    """Against the real /proc: a process named virtlxcd (a copy of sleep, ours) is found,
    and ``hook install`` tells to reload it."""
    daemon = tmp_path / "virtlxcd"
    daemon.write_bytes(Path("/bin/sleep").read_bytes())
    daemon.chmod(0o755)

    def install() -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-c", "from pinwarden.cli import entry; entry()",
             "--state-dir", str(tmp_path / "state"), "hook", "install", "--hooks-dir",
             str(tmp_path / "hooks"), "--json"], capture_output=True, text=True,
            timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        done: dict[str, object] = json.loads(out.stdout)
        return done

    assert procs.running_named(frozenset({"pw-no-such-daemon"})) == frozenset()
    proc = subprocess.Popen([str(daemon), "60"])
    try:
        assert _wait_for_comm(proc.pid, "virtlxcd")
        assert "virtlxcd" in procs.running_named(frozenset({"virtlxcd", "virtqemud"}))
        first = install()
        reload = first["reload"]
        assert first["reload_needed"] is True and isinstance(reload, list), first
        assert "virtlxcd" in reload, first
        assert install()["reload"] == []  # the directories were there: nothing to reload
    finally:
        proc.kill()
        proc.wait()


def test_hook_install_json_needs_no_reload_where_no_libvirt_daemon_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """New hook directories with no libvirt daemon running: the next one to start reads
    them.  ``--json`` said ``reload_needed: true`` with no daemon to reload."""
    from pinwarden.cli import main

    monkeypatch.setattr(procs, "running_named", lambda _names: frozenset())
    assert main(["--state-dir", str(tmp_path / "state"), "hook", "install", "--hooks-dir",
                 str(tmp_path / "hooks"), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["reload_needed"] is False and done["reload"] == [], done
    assert done["installed"], done


def _wait_for_comm(pid: int, name: str) -> bool:
    """The copy's name shows in /proc/PID/comm once it has exec'd."""
    for _ in range(250):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return True
        time.sleep(0.02)
    return False


def test_hook_later_steps_only_for_pinwarden_domains(tmp_path: Path) -> None:
    meta = "<domain><metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1'/></metadata></domain>"
    exe = script(tmp_path / "cat-args", 'echo "$@"; cat')
    (qemu, lxc) = hook.install(tmp_path, exe=exe, state_dir=None, config=None,
                               check=False).paths
    pinned = "<domain><vcpu placement='static' cpuset='1'>1</vcpu></domain>"  # libvirt's form
    for op in ("started", "release"):
        seen = call(qemu, "vm1", op, "-", "-", stdin=meta)
        assert seen.returncode == 0 and seen.stdout == f"hook run qemu vm1 {op} - -\n{meta}\n"
        assert call(qemu, "vm1", op, "-", "-", stdin=pinned).stdout == ""
        assert call(lxc, "ct1", op, "-", "-", stdin=pinned).stdout == ""
    # a domain without <vcpu cpuset> reaches pinwarden at 'started' (its threads without a
    # pin get the VM CPUs; a container's processes all) — naming no CPUs, pinning some
    # threads, or mentioning a cpuset in its text — not at 'release'
    unpinned = "<domain><vcpu placement='static'>1</vcpu></domain>"
    partly = ("<domain><vcpu placement='static'>2</vcpu><cputune><vcpupin vcpu='0' "
              "cpuset='1'/></cputune></domain>")
    told = ("<domain><description>pin with cpuset=&apos;1&apos; or cpuset=&quot;1&quot;"
            "</description><vcpu placement='static'>1</vcpu></domain>")
    for placed in (unpinned, partly, told):
        assert call(qemu, "vm1", "started", "-", "-", stdin=placed).stdout == \
            f"hook run qemu vm1 started - -\n{placed}\n"
        assert call(qemu, "vm1", "release", "-", "-", stdin=placed).stdout == ""
        assert call(lxc, "ct1", "started", "-", "-", stdin=placed).stdout == \
            f"hook run lxc ct1 started - -\n{placed}\n"
    # steps pinwarden ignores never reach it (no Python start-up inside libvirtd's start)
    skipped = call(qemu, "vm1", "start", "begin", "-")
    assert skipped.returncode == 0 and skipped.stdout == ""


def test_libvirt_writes_the_vcpu_cpuset_right_after_placement() -> None:
    """What the drop-in's 'started' shortcut relies on: in libvirt's form of a domain XML
    (its test driver, no daemon) a <vcpu cpuset> is written ``<vcpu placement='static'
    cpuset='…'``, whatever order it was given in, and text that mentions one is escaped."""
    from libvirt_form import libvirt_form

    for given in ("<vcpu cpuset='1'>1</vcpu>", "<vcpu current='1' cpuset='1-2'>2</vcpu>",
                  "<vcpu cpuset='0-1' placement='static'>2</vcpu>"):
        form = libvirt_form(given, "pw-quote-oracle")
        assert form is not None and "<vcpu placement='static' cpuset='" in form, form
    form = libvirt_form("<title>cpuset='3'</title><description>&lt;vcpu placement='static' "
                        "cpuset='1'&gt;</description><vcpu>1</vcpu>", "pw-quote-oracle")
    assert form is not None and "cpuset=" in form
    assert "<vcpu placement='static' cpuset='" not in form, form


def test_unpinned_threads_are_known_by_their_names() -> None:
    """Which threads of a running QEMU the 'started' step moves to the VM CPUs: those whose
    role (QEMU's thread name) has no pin in the XML."""
    from pinwarden.libvirt.place import unpinned_thread

    partly = parse_domain(xml("p", "<iothreads>2</iothreads><cputune><vcpupin vcpu='0' "
                                   "cpuset='1'/><iothreadpin iothread='2' cpuset='1'/>"
                                   "</cputune>"))
    assert [unpinned_thread(partly, comm) for comm in (
        "CPU 0/KVM", "CPU 1/KVM", "CPU 1/TCG", "IO iothread2", "IO iothread1",
        "qemu-system-x86", "IO mon_iothread", "worker", "ALL CPUs/TCG",
        "IO iothread1234", None)] == [  # (a name the kernel may have cut short)
        False, True, True, False, True, True, True, True, False, False, False]
    emulator = parse_domain(xml("e", "<cputune><emulatorpin cpuset='1'/></cputune>"))
    assert [unpinned_thread(emulator, comm) for comm in (
        "qemu-system-x86", "CPU 0/KVM", "ALL CPUs/TCG", "IO iothread1")] == [
        False, True, True, True]


@contextlib.contextmanager
def process_tree() -> Iterator[list[int]]:
    """A real process tree of this test's own (a shell, its children and theirs; ended by
    pid): its processes, the top one first."""
    top = subprocess.Popen(["sh", "-c", "sleep 60 & (sleep 60 & wait) & wait"])
    found: list[int] = []
    try:
        deadline = time.monotonic() + 10
        while len(found := procs.descendants(top.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found[:1] == [top.pid], found
        yield found
    finally:
        top.kill()
        top.wait()
        for pid in found[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_containers_processes_are_found_below_its_controller() -> None:
    """What the 'started' step of a shared LXC container places: the controller's process
    and every process below it (a real process tree: a shell, its children and theirs)."""
    with process_tree() as found:
        assert len(found) == 4, found  # sh, sleep, (sh, sleep)
        assert os.getpid() not in found


def test_a_container_the_hook_placed_off_a_lease_gets_the_cpus_back_by_its_process() -> None:
    """A shared LXC container started while CPUs were leased: the hook gave its processes
    the pool with ``sched_setaffinity``, which Linux keeps across cpuset changes since 6.2.
    Its record names the controller process (a container has no libvirt pin); when the
    leases end its threads that still have the hook's CPUs get the pool back.  A
    controller that exited, or an unreadable record, is forgotten."""
    from pinwarden.libvirt.repin import CONTAINER, container_json, give_back_container

    key = f"repin:{UUID_A}:{CONTAINER}"
    records = {key: container_json("ct", cs("1-3"), cs("1"), 4242, 17, None)}
    assert json.loads(records[key]) == {"domain": "ct", "before": "1-3", "after": "1",
                                        "pid": 4242, "start": 17}
    # placed again (a second start meanwhile): the first "before" is kept
    again = container_json("ct", cs("1,3"), cs("1"), 4343, 18, records[key])
    assert json.loads(again)["before"] == "1-3"
    waiting = give_back_container(records, {key: cs("1")}, leased=cs("2-3"))
    assert waiting.moves == () and waiting.forget == () and waiting.records == {}
    partly = give_back_container(records, {key: cs("1")}, leased=cs("3"))
    assert [(m.domain, m.label, str(m.before), str(m.after)) for m in partly.moves] == [
        ("ct", CONTAINER, "1", "1-2")]
    assert json.loads(partly.records[key]) == {"domain": "ct", "before": "1-3",
                                               "after": "1-2", "pid": 4242, "start": 17}
    whole = give_back_container(partly.records, {key: cs("1-2")}, leased=CpuSet())
    assert [str(m.after) for m in whole.moves] == ["1-3"] and whole.forget == (key,)
    # a later lease took CPU 2 through the cgroup: still the hook's placement, which gets
    # CPU 3 back at once (it waited for a re-pin no hook start makes: systemd-lab hunt)
    later = give_back_container(partly.records, {key: cs("1")}, leased=cs("2"))
    assert [str(m.after) for m in later.moves] == ["1,3"] and later.forget == ()
    assert give_back_container(records, {key: None}, leased=CpuSet()).forget == (key,)
    assert give_back_container(records, {key: cs("2")}, leased=CpuSet()).forget == (key,)
    assert give_back_container({key: "{"}, {key: cs("1")}, leased=CpuSet()).forget == (key,)
    # QEMU's give-back leaves containers' records alone, and the other way round
    from pinwarden.libvirt.repin import give_back
    assert give_back([], records, leased=CpuSet()) == give_back([], {}, leased=CpuSet())


QEMU_LIKE = r"""
import os, sys, threading
names = sys.argv[1:]
ready, done = threading.Barrier(len(names) + 1), threading.Event()
def run(name):
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(name)
    ready.wait()
    done.wait()
for name in names:
    threading.Thread(target=run, args=(name,), daemon=True).start()
with open("/proc/self/comm", "w") as f:
    f.write("qemu-system-x86")
ready.wait()
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_give_back_settles_qemus_other_emulator_threads() -> None:
    """libvirt's live emulator pin moves QEMU's main thread (and the emulator cgroup), not
    its other emulator threads; since Linux 6.2 they keep their own affinity as the cgroup
    widens, so a give-back left them on the narrower CPUs (trixie's story: B kept a thread
    on CPU 3).  The real thing on a process named as QEMU names its threads: the emulator's
    threads still on the old CPUs get the new ones; vCPU and I/O threads (libvirt pins them
    itself) and a thread given other CPUs since are left alone."""
    from pinwarden.libvirt.pins import settle_emulator
    from pinwarden.libvirt.state import Repin, qemu_thread

    assert [qemu_thread(c) for c in ("qemu-system-x86", "IO mon_iothread", "worker",
                                     "CPU 0/KVM", "ALL CPUs/TCG", "IO iothread1",
                                     "IO iothread12345", None)] == [
        ("emulator", None), ("emulator", None), ("emulator", None), ("vcpu", 0),
        ("vcpu", None), ("iothread", 1), None, None]
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.fail("this test needs CPUs 0 and 1 (every machine pinwarden is tested on "
                    "has them)")
    names = ["call_rcu", "IO mon_iothread", "CPU 0/KVM", "IO iothread1", "worker"]
    proc = subprocess.Popen([sys.executable, "-c", QEMU_LIKE, *names],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        tids = {procs.thread_comm(proc.pid, tid): tid
                for tid in map(int, os.listdir(f"/proc/{proc.pid}/task"))}
        assert set(tids) == {"qemu-system-x86", *names}, tids
        for tid in tids.values():
            os.sched_setaffinity(tid, {0})
        os.sched_setaffinity(tids["worker"], {1})  # somebody's choice since
        settle_emulator(proc.pid, Repin("s", "u", "emulator", None, cs("0"), cs("0-1")))
        assert {name: os.sched_getaffinity(tid) for name, tid in tids.items()} == {
            "qemu-system-x86": {0, 1}, "call_rcu": {0, 1}, "IO mon_iothread": {0, 1},
            "CPU 0/KVM": {0},
            "IO iothread1": {0}, "worker": {1}}
    finally:
        proc.kill()
        proc.wait()


def test_a_failed_starts_undo_settles_qemus_other_emulator_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed exclusive start undoes its re-pins, the last first, each attempted though
    libvirt refuses one; an undone emulator pin settles QEMU's other emulator threads as the
    give-back does: one started while the pin was narrower (so on the narrower CPUs) gets
    the CPUs back with it.  libvirt stood in for by what it would be asked; the threads are
    a real process's, named as QEMU names them."""
    from pinwarden.libvirt import connect as lv
    from pinwarden.libvirt import pins
    from pinwarden.libvirt.state import Repin

    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.fail("this test needs CPUs 0 and 1 (every machine pinwarden is tested on "
                    "has them)")
    names = ["call_rcu", "worker", "CPU 0/KVM"]
    proc = subprocess.Popen([sys.executable, "-c", QEMU_LIKE, *names],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    asked: list[tuple[str, str]] = []

    def apply_repin(_conn: Any, move: Repin) -> bool:
        asked.append((move.label, str(move.after)))
        if move.thread == "vcpu":
            raise LibvirtError("cannot re-pin vcpu0 (stand-in)")
        return True

    monkeypatch.setattr(lv, "apply_repin", apply_repin)
    monkeypatch.setattr(lv, "read_pid", lambda driver, name: (
        proc.pid if (driver, name) == ("qemu", "s") else None))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        tids = {procs.thread_comm(proc.pid, tid): tid
                for tid in map(int, os.listdir(f"/proc/{proc.pid}/task"))}
        for tid in tids.values():
            os.sched_setaffinity(tid, {0})
        pins.undo(object(), "qemu", [
            Repin("s", "u", "emulator", None, cs("0-1"), cs("0")),
            Repin("s", "u", "vcpu", 0, cs("0-1"), cs("0"))])
        assert asked == [("vcpu0", "0-1"), ("emulator", "0-1")]
        assert {name: os.sched_getaffinity(tid) for name, tid in tids.items()} == {
            "qemu-system-x86": {0, 1}, "call_rcu": {0, 1}, "worker": {0, 1},
            "CPU 0/KVM": {0}}
    finally:
        proc.kill()
        proc.wait()


def test_a_container_record_on_a_kernel_that_resets_affinity() -> None:
    """Containers, as QEMU thread groups: on a kernel that resets affinity the
    controller's affinity now is the hook's placement as the kernel left it."""
    from pinwarden.libvirt.repin import CONTAINER, container_json, give_back_container

    key = f"repin:{UUID_A}:{CONTAINER}"
    placed = {key: container_json("ct", cs("1-3"), cs("1-3"), 4242, 17, None)}
    every = give_back_container(placed, {key: cs("0-3")}, CpuSet(), kernel_resets=True)
    assert [(str(m.before), str(m.after)) for m in every.moves] == [("0-3", "1-3")]
    assert every.forget == (key,)
    assert give_back_container(placed, {key: cs("1-2")}, cs("3"),
                               kernel_resets=True).moves == ()
    narrow = {key: container_json("ct", cs("1-3"), cs("3"), 4242, 17, None)}
    kept = give_back_container(narrow, {key: cs("2-3")}, cs("1"), kernel_resets=True)
    assert (kept.moves, kept.forget) == ((), ())
    assert json.loads(kept.records[key])["after"] == "2-3"
    assert give_back_container(narrow, {key: cs("2-3")}, cs("1")).forget == (key,)


def test_on_a_kernel_that_resets_affinity_the_hook_records_and_puts_back_a_container(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing with a kernel that resets affinity stood in for (this host's keeps
    it): nothing leased, VM CPU 1, housekeeping CPU 0.  The hook gives every thread of the
    container CPU 1 and, on such a kernel, records that; when a lease's end gave the
    threads every CPU (what 6.1 does as the shared group widens back), the give-back puts
    them back on CPU 1 and forgets the record.  On this host's own kernel nothing is
    recorded."""
    from pinwarden.enforce import affinity
    from pinwarden.libvirt import pins
    from pinwarden.narrowed import NARROWED_PREFIX

    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.fail("this test needs CPUs 0 and 1 (every machine pinwarden is tested on "
                    "has them)")
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-1", "1"))
    doc = (f"<domain type='lxc'><name>ct</name><uuid>{UUID_A}</uuid><memory>32768"
           f"</memory><vcpu>1</vcpu><os><type>exe</type><init>/bin/sh</init></os>"
           f"</domain>")
    with process_tree() as found:
        monkeypatch.setattr(place, "running_pid", lambda driver, name: found[0])
        if not affinity.cgroup_resets_affinity():
            assert hook.main_run(manager, "lxc", ["ct", "started", "begin", "-"], doc) == 0
            assert manager.change_records(NARROWED_PREFIX) == {}
        monkeypatch.setattr(affinity, "cgroup_resets_affinity", lambda root=None: True)
        monkeypatch.setattr(pins, "cgroup_resets_affinity", lambda root=None: True)
        assert hook.main_run(manager, "lxc", ["ct", "started", "begin", "-"], doc) == 0
        assert {pid: os.sched_getaffinity(pid) for pid in found} == \
            {pid: {1} for pid in found}
        [value] = manager.change_records(NARROWED_PREFIX).values()
        assert json.loads(value)["before"] == json.loads(value)["after"] == "1"
        assert pins.give_back_containers(manager) == ()  # as placed: nothing to do
        # a lease whose owner is gone, not yet released: its CPU is still out of the
        # shared group, whose widening at the release will reset the threads again — a
        # give-back before it would be undone (story_lxc: another release's give-back ran
        # in that window, and the container ended on every CPU)
        owner = subprocess.Popen(["sleep", "60"])
        job = job_holder("pwtest-gone")
        try:
            manager.reserve(job, lambda host, leases: Plan(
                "pwtest-gone", None, True, {0: cs("1")}, cs("1"), leases={1: "task"}),
                owner_pid=owner.pid)
        finally:
            owner.kill()
            owner.wait()
        for pid in found:  # the kernel's reset as the group narrowed
            os.sched_setaffinity(pid, {0})
        assert manager.leases() == () and pins.give_back_containers(manager) == ()
        manager.drop(job)
        for pid in found:  # the kernel's reset as the group widened back
            os.sched_setaffinity(pid, {0, 1})
        given = pins.give_back_containers(manager)
        assert [str(m) for m in given] == ["ct container: 0-1 -> 1"]
        assert {pid: os.sched_getaffinity(pid) for pid in found} == \
            {pid: {1} for pid in found}
        assert manager.change_records(NARROWED_PREFIX) == {}


def test_the_hook_records_a_container_it_placed_off_a_lease_and_it_gets_the_cpu_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing, on this host's kernel, with a process tree standing in for
    ``libvirt_lxc`` and its container: CPU 0 leased, the hook's ``started`` step gives
    every thread CPU 1 and records it; a process that set its own affinity since keeps
    it; once the lease ends every other thread gets CPUs 0-1 back and the record goes."""
    from pinwarden.libvirt import pins
    from pinwarden.narrowed import NARROWED_PREFIX

    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.fail("this test needs CPUs 0 and 1 (every machine pinwarden is tested on "
                    "has them)")
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-1", "0-1"))
    job = job_holder("pwtest-lease")
    manager.reserve(job, lambda host, leases: Plan(
        "pwtest-lease", None, True, {0: cs("0")}, cs("0"), leases={0: "task"}),
        owner_pid=os.getpid())
    with process_tree() as found:
        assert len(found) == 4, found
        monkeypatch.setattr(place, "running_pid", lambda driver, name: found[0])
        doc = (f"<domain type='lxc'><name>ct</name><uuid>{UUID_A}</uuid><memory>32768"
               f"</memory><vcpu>1</vcpu><os><type>exe</type><init>/bin/sh</init></os>"
               f"</domain>")
        assert hook.main_run(manager, "lxc", ["ct", "started", "begin", "-"], doc) == 0
        assert {pid: os.sched_getaffinity(pid) for pid in found} == \
            {pid: {1} for pid in found}
        [(key, value)] = manager.change_records(NARROWED_PREFIX).items()
        assert key.endswith(":container") and json.loads(value)["after"] == "1"
        assert pins.give_back_containers(manager) == ()  # CPU 0 is still leased
        os.sched_setaffinity(found[-1], {0})  # its own choice since: kept
        manager.drop(job)
        given = pins.give_back_containers(manager)
        assert [str(m) for m in given] == ["ct container: 1 -> 0-1"]
        assert {pid: os.sched_getaffinity(pid) for pid in found} == \
            {**{pid: {0, 1} for pid in found[:-1]}, found[-1]: {0}}
        assert manager.change_records(NARROWED_PREFIX) == {}


@pytest.mark.parametrize("broken", ["missing", "import-error", "crash"])
def test_a_broken_pinwarden_never_blocks_a_shared_domain(tmp_path: Path, broken: str) -> None:
    """The venv was removed (127), pinwarden cannot be imported, or it crashed: shared
    domains start (the reason is logged), exclusive ones are refused with how to repair."""
    state = tmp_path / "state"
    state.mkdir()
    exe = {"missing": str(tmp_path / "gone" / "python3"),
           "import-error": script(tmp_path / "py", "echo 'ModuleNotFoundError: pinwarden' >&2;"
                                                   " exit 1"),
           "crash": script(tmp_path / "py", "exit 70")}[broken]
    (qemu, _) = hook.install(tmp_path / "hooks", exe=exe, state_dir=state, config=None,
                             check=False).paths
    shared = call(qemu, "web", "prepare", "begin", "-", stdin=xml("web"))
    assert shared.returncode == 0, shared.stderr
    logged = (state / hook.HOOK_LOG).read_text()
    assert "domain 'web' asks for no exclusive CPUs and was let through" in logged
    refused = call(qemu, "db", "prepare", "begin", "-", stdin=xml("db", EXCLUSIVE_META))
    assert refused.returncode == 1
    assert "exclusive domain 'db' cannot get its CPUs" in refused.stderr
    assert "pinwarden hook check" in refused.stderr
    # later steps never fail, whatever state pinwarden is in
    for op in ("started", "release"):
        assert call(qemu, "db", op, "-", "-", stdin=xml("db", EXCLUSIVE_META)).returncode == 0


def test_a_broken_configuration_is_said_in_the_hook_log(tmp_path: Path) -> None:
    """pinwarden itself runs, but its configuration does not load: a shared domain starts
    and an exclusive one is refused, as for any broken pinwarden, and the hook log says
    why (it said only 'exited 1'), at the steps after prepare too (a release that could
    not run was not logged at all).  The refusal is that one line: the drop-in added a
    second, "pinwarden is broken or missing … repair the installation", which it is not
    (broken-pinwarden hunt)."""
    state = tmp_path / "state"
    config = tmp_path / "pinwarden.toml"
    config.write_text("[partition]\nmode = 'sometimes'\n")
    (qemu, _) = hook.install(tmp_path / "hooks", exe=hook.default_executable(),
                             state_dir=state, config=config, check=False).paths
    shared = call(qemu, "web", "prepare", "begin", "-", stdin=xml("web"))
    assert shared.returncode == 0, shared.stderr
    refused = call(qemu, "db", "prepare", "begin", "-", stdin=xml("db", EXCLUSIVE_META))
    assert refused.returncode == 1 and "exclusive domain 'db' cannot get its CPUs" in \
        refused.stderr, refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and "sometimes" in refused.stderr, \
        refused.stderr
    released = call(qemu, "db", "release", "end", "-", stdin=xml("db", EXCLUSIVE_META))
    assert released.returncode == 0, released.stderr
    lines = (state / hook.HOOK_LOG).read_text().splitlines()
    errors = [line.split(" ", 1)[1] for line in lines if "pinwarden: error:" in line]
    assert [e.split(":", 3)[2].strip() for e in errors] == [
        "hook qemu web prepare", "hook qemu db prepare", "hook qemu db release"], lines
    assert all("sometimes" in e and str(config) in e for e in errors), errors
    assert len(errors[0].splitlines()) == 1
    assert not [line for line in lines if "broken or missing" in line], lines
    assert [line for line in lines if "pinwarden failed (exit 4: why is above)" in line and
            "'web'" in line and "let through unchecked" in line], lines
    assert [line for line in lines if "exclusive domain 'db' was refused" in line], lines


def test_the_fail_safe_path_logs_where_nothing_made_the_state_directory(
        tmp_path: Path) -> None:
    """A host where nothing has made the state directory yet (pinwarden broken from its
    first call): the refusal shows pinwarden's words only, not the shell's complaint that
    it cannot create hook.log, and the warnings are in hook.log all the same — the drop-in
    makes the directory, as pinwarden's own log does (they went to syslog alone, and
    'let through unchecked' was found nowhere pinwarden looks: systemd lab hunt)."""
    exe = str(tmp_path / "gone" / "python3")
    (qemu, _) = hook.install(tmp_path / "hooks", exe=exe, state_dir=tmp_path / "no-state",
                             config=None, check=False).paths
    shared = call(qemu, "web", "prepare", "begin", "-", stdin=xml("web"))
    assert shared.returncode == 0 and "hook.log" not in shared.stderr, shared.stderr
    refused = call(qemu, "db", "prepare", "begin", "-", stdin=xml("db", EXCLUSIVE_META))
    assert refused.returncode == 1, refused.stderr
    assert "hook.log" not in refused.stderr and "cannot create" not in refused.stderr, \
        refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(
        "pinwarden: error: pinwarden is broken or missing"), refused.stderr
    state = tmp_path / "no-state"
    assert state.stat().st_mode & 0o777 == 0o700
    logged = (state / hook.HOOK_LOG).read_text().splitlines()
    assert [("'web'" in line and "let through unchecked" in line,
             "'db'" in line and "cannot get its CPUs" in line) for line in logged] == [
        (True, False), (False, True)], logged


def test_a_refusal_blocks_and_shows_pinwardens_words(tmp_path: Path) -> None:
    exe = script(tmp_path / "refuse", f"echo 'pinwarden: error: CPU 1 is leased' >&2; "
                                      f"exit {hook.REFUSED}")
    (qemu, _) = hook.install(tmp_path, exe=exe, state_dir=None, config=None,
                             check=False).paths
    refused = call(qemu, "web", "prepare", "begin", "-", stdin=xml("web"))
    assert refused.returncode == 1 and refused.stderr == "pinwarden: error: CPU 1 is leased\n"


def test_install_never_overwrites_another_file_at_its_own_path(tmp_path: Path) -> None:
    """A file at lxc.d/pinwarden that pinwarden did not write (an operator's wrapper):
    install refuses, naming it, and writes nothing at all (qemu.d included)."""
    wrapper = tmp_path / "lxc.d" / "pinwarden"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\nexec /opt/site/pinwarden-wrapper "$@"\n')
    with pytest.raises(Refusal, match=r"lxc\.d/pinwarden exists and pinwarden did not "
                                      r"write it") as err:
        hook.install(tmp_path, exe="/bin/echo", state_dir=None, config=None, check=False)
    assert err.value.code == "hook-foreign"
    assert wrapper.read_text().startswith("#!/bin/sh\nexec /opt/site/")
    assert not (tmp_path / "qemu.d").exists()
    assert hook.uninstall(tmp_path) == () and wrapper.exists()  # nor removes it
    wrapper.unlink()  # moved away: installs
    assert len(hook.install(tmp_path, exe="/bin/echo", state_dir=None, config=None,
                            check=False).paths) == 2


@pytest.mark.parametrize("dry_run", [False, True], ids=["install", "dry-run"])
def test_install_into_a_file_says_so_and_writes_nothing(tmp_path: Path, dry_run: bool) -> None:
    """``--hooks-dir`` naming a file, or a ``lxc.d`` that is a file: one line naming it,
    and nothing written — not the qemu.d hook either (it was installed before the lxc.d
    write failed), and no "would install" from a dry run."""
    afile = tmp_path / "hooks-file"
    afile.write_text("")
    with pytest.raises(InputError, match=re.escape(
            f"cannot install into {afile}/qemu.d: {afile} is not a directory; nothing "
            f"installed")):
        hook.install(afile, exe="/bin/echo", state_dir=None, config=None, check=False,
                     dry_run=dry_run)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "lxc.d").write_text("")
    with pytest.raises(InputError, match=r"lxc\.d is not a directory; nothing installed"):
        hook.install(hooks, exe="/bin/echo", state_dir=None, config=None, check=False,
                     dry_run=dry_run)
    assert sorted(p.name for p in hooks.iterdir()) == ["lxc.d"]


def test_install_refuses_a_pinwarden_that_does_not_run(tmp_path: Path) -> None:
    with pytest.raises(Refusal, match="does not work") as err:
        hook.install(tmp_path, exe="/bin/false", state_dir=None, config=None)
    assert err.value.code == "hook-broken"
    assert not (tmp_path / "qemu.d").exists()
    other = script(tmp_path / "other", "echo hello")  # runs, but is not pinwarden
    with pytest.raises(Refusal, match="hook ping exited 0 without 'pinwarden hook ok' in "
                       "its output: 'hello'"):
        hook.install(tmp_path, exe=other, state_dir=None, config=None)
    assert not (tmp_path / "qemu.d").exists()


def test_enforcing_profile_of_a_libvirt_daemon_running_or_idle(tmp_path: Path) -> None:
    """The AppArmor label of a running libvirtd/virtqemud/virtlxcd (the per-LSM file
    first, the shared ``attr/current`` on older kernels); with none running, the loaded
    profiles of those daemons (named, or by path).  Only enforce mode counts."""
    def proc(pid: int, comm: str, **attrs: str) -> None:
        base = tmp_path / "proc" / str(pid)
        (base / "attr" / "apparmor").mkdir(parents=True)
        (base / "comm").write_text(comm + "\n")
        for name, text in attrs.items():
            (base / "attr" / name.replace("_", "/")).write_text(text)

    proc(1, "systemd", apparmor_current="unconfined\n")
    # no daemon runs (Debian's libvirtd exits when idle): the loaded profiles tell
    profiles = tmp_path / "sys/kernel/security/apparmor/profiles"
    profiles.parent.mkdir(parents=True)
    profiles.write_text("virt-aa-helper (enforce)\nlibvirtd//qemu_bridge_helper (enforce)\n"
                        "/usr/sbin/virtlxcd (complain)\n")
    assert hook.enforcing_profile(tmp_path) is None
    profiles.write_text("virt-aa-helper (enforce)\n/usr/sbin/virtqemud (enforce)\n"
                        "libvirtd (enforce)\n")
    assert hook.enforcing_profile(tmp_path) == ("libvirtd", "libvirtd")
    profiles.write_text("/usr/sbin/virtqemud (enforce)\n")
    assert hook.enforcing_profile(tmp_path) == ("virtqemud", "/usr/sbin/virtqemud")
    profiles.write_text("libvirtd (complain)\n")
    assert hook.enforcing_profile(tmp_path) is None
    # a running daemon's own label decides
    proc(40, "virtqemud", current="virtqemud (complain)\n")
    profiles.write_text("libvirtd (enforce)\n")
    assert hook.enforcing_profile(tmp_path) is None  # complain mode denies nothing
    proc(41, "libvirtd", apparmor_current="libvirtd (enforce)\n")
    assert hook.enforcing_profile(tmp_path) == ("libvirtd", "libvirtd")
    assert procs.named(frozenset({"libvirtd", "virtqemud"}), root=tmp_path) == [
        (40, "virtqemud"), (41, "libvirtd")]
    assert procs.security_label(40, root=tmp_path) == "virtqemud (complain)"
    assert procs.security_label(99, root=tmp_path) is None


def test_decide_enforcing_profile_from_labels_and_loaded_profiles() -> None:
    """The pure half of enforcing_profile: a running daemon's enforce label decides (the
    first such), a running daemon in complain mode or unconfined means no confinement
    whatever is loaded, and with none running the loaded profiles decide, libvirtd's
    before the modular daemons' (sorted); nested profiles and other programs never
    count, nor a profile text that could not be read."""
    decide = hook.decide_enforcing_profile
    loaded = ("virt-aa-helper (enforce)\nlibvirtd//qemu_bridge_helper (enforce)\n"
              "/usr/sbin/virtqemud (enforce)\nvirtlxcd (enforce)\nlibvirtd (enforce)\n")
    assert decide([], loaded) == ("libvirtd", "libvirtd")
    assert decide([], loaded.replace("libvirtd (enforce)\n", "")) == (
        "virtlxcd", "virtlxcd")  # virtlxcd sorts before virtqemud
    assert decide([], "libvirtd//qemu_bridge_helper (enforce)\n") is None
    assert decide([], "libvirtd (complain)\n/usr/sbin/virtqemud (kill)\n") is None
    assert decide([], None) is None
    assert decide([], "") is None
    assert decide([("virtqemud", "virtqemud (enforce)"), ("libvirtd", "libvirtd (enforce)")],
                  None) == ("virtqemud", "virtqemud")
    assert decide([("libvirtd", "unconfined"), ("virtqemud", "/usr/sbin/virtqemud (enforce)")],
                  None) == ("virtqemud", "/usr/sbin/virtqemud")
    for label in (None, "unconfined", "libvirtd (complain)"):
        assert decide([("libvirtd", label)], loaded) is None


def test_ping_tells_status_last_line_and_failure(tmp_path: Path) -> None:
    """_ping's record: the exit status and the last line of stderr; a command that cannot
    run, or exits 0 without pinwarden's answer, is a failure named as such."""
    ok = script(tmp_path / "ok", 'echo "pinwarden hook ok 1"')
    assert hook._ping([ok]) == hook.Ping(0, "no output")
    bad = script(tmp_path / "bad", 'echo one >&2; echo "two: broken" >&2; exit 3')
    assert hook._ping([bad]) == hook.Ping(3, "two: broken")
    quiet = script(tmp_path / "quiet", "echo something else")
    got = hook._ping([quiet])
    assert got.status == 0 and (got.failed or "").startswith(
        "hook ping exited 0 without 'pinwarden hook ok' in its output: 'something else'")
    got = hook._ping([str(tmp_path / "absent")])
    assert got.status is None and (got.failed or "").startswith("cannot run: ")
    assert hook._runs([str(tmp_path / "absent")]) == (
        f"{tmp_path / 'absent'} {got.failed}")
    assert hook._runs([bad]) == f"{bad} hook ping exited 3: two: broken"


def test_install_under_an_apparmor_confined_libvirtd(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libvirtd runs confined, the ping runs again from a shell under its profile,
    as libvirt runs the hook.  A host that cannot confine the check (no AppArmor, or no
    such profile: this one) installs; a profile that forbids the exec refuses the
    install, naming the profile and both ways out.  The real profile is the trixie lab's
    (test_syslab)."""
    ok = script(tmp_path / "ok", 'echo "pinwarden hook ok 1"')
    confined = ("libvirtd", "libvirtd")
    assert hook._runs([ok], confined=confined) is None
    # what dash says when the profile forbids the exec
    monkeypatch.setattr(hook, "_CONFINED", 'shift; echo "sh: 1: exec: $1: Permission '
                        'denied" >&2; exit 126')
    problem = hook._runs([ok], confined=confined) or ""
    assert problem.startswith("libvirtd runs under the AppArmor profile 'libvirtd' "
                              "(enforce)"), problem
    assert "exited 126 (sh: 1: exec: " in problem and "Permission denied" in problem
    assert f"'{os.path.realpath(ok)} PUx,' to /etc/apparmor.d/local/usr.sbin.libvirtd" \
        in problem and "apparmor_parser -r /etc/apparmor.d/usr.sbin.libvirtd" in problem
    monkeypatch.setattr(hook, "enforcing_profile", lambda root=None: confined)
    with pytest.raises(Refusal, match="AppArmor profile 'libvirtd'") as err:
        hook.install(tmp_path / "hooks", exe=ok, state_dir=None, config=None)
    assert err.value.code == "hook-broken"
    assert not (tmp_path / "hooks").exists()


def test_hook_check_reports_each_hook(tmp_path: Path) -> None:
    states = {s.driver: s for s in hook.check_installed(tmp_path)}
    assert not states["qemu"].installed and "not installed" in (states["qemu"].problem or "")
    ok = script(tmp_path / "ok", 'echo "pinwarden hook ok 1"')
    hook.install(tmp_path, exe=ok, state_dir=None, config=None)
    assert all(s.problem is None for s in hook.check_installed(tmp_path))
    # a drop-in an older pinwarden wrote (no version line, or another number)
    drop_in = tmp_path / "qemu.d" / hook.DROP_IN
    current = drop_in.read_text()
    assert f"\n# script version {hook.SCRIPT_VERSION}\n" in current
    for old, said in (("", "script version 1"), ("# script version 1\n", "script version 1"),
                      ("# script version x\n", "script version -1")):
        drop_in.write_text(current.replace(f"# script version {hook.SCRIPT_VERSION}\n", old))
        states = {s.driver: s for s in hook.check_installed(tmp_path)}
        assert states["qemu"].problem == (
            f"{drop_in} was written by another pinwarden ({said}, this one writes "
            f"{hook.SCRIPT_VERSION}): run 'pinwarden hook install' again")
        assert states["lxc"].problem is None
    drop_in.write_text(current)
    (tmp_path / "ok").unlink()  # the venv went away
    states = {s.driver: s for s in hook.check_installed(tmp_path)}
    assert "cannot run" in (states["qemu"].problem or "")


def test_hook_install_and_check_load_the_configuration_the_hook_will(tmp_path: Path) -> None:
    """A configuration ``hook run`` cannot load (missing, invalid, a state directory that is
    a file) fails every hook call: shared domains let through unchecked, exclusive ones
    refused.  ``hook install`` wrote such a drop-in and ``hook check`` said "ok" (hunt):
    now install refuses it, naming the problem, and check reports it once it appears."""
    exe = hook.default_executable()
    config, state = tmp_path / "pinwarden.toml", tmp_path / "state"
    hooks = tmp_path / "hooks"
    missing = tmp_path / "missing.toml"
    with pytest.raises(Refusal, match=f"hook ping --config {missing} --state-dir {state} "
                                      f"exited 1: pinwarden: error: config file {missing} "
                                      f"does not exist\\); nothing installed"):
        hook.install(hooks, exe=exe, state_dir=state, config=missing)
    assert not hooks.exists()
    config.write_text('[partition]\nmode = "none"\n')
    hook.install(hooks, exe=exe, state_dir=state, config=config)
    assert [s.problem for s in hook.check_installed(hooks)] == [None, None]
    config.write_text('[partition]\nmode = "bogus"\n')  # edited later
    problems = [s.problem or "" for s in hook.check_installed(hooks)]
    assert all("partition.mode must be auto, isolcpus, cgroup or none, not 'bogus'" in p
               for p in problems), problems
    config.write_text('[partition]\nmode = "none"\n')
    assert not state.exists()  # (nothing was leased: none was made)
    state.write_text("")  # a file where the state directory should be
    problems = [s.problem or "" for s in hook.check_installed(hooks)]
    assert all(f"state directory {state} is not a directory" in p for p in problems), problems


def test_hook_refusal_is_shown_as_the_hooks_own_line() -> None:
    class Err(Exception):
        def get_error_message(self) -> str:
            return ("Hook script execution failed: internal error: Child process (LC_ALL=C "
                    "/etc/libvirt/hooks/qemu d prepare begin -) unexpected exit status 1: "
                    "pinwarden: error: CPU 1 is leased to qemu domain 'a'")

    err = libvirt_failure("libvirt could not start domain 'd'", Err())
    assert err.message == ("libvirt could not start domain 'd': the libvirt hook refused: "
                           "CPU 1 is leased to qemu domain 'a'")
    assert err.code == "hook-refused"


# -- define -------------------------------------------------------------------------------

def test_define_stores_metadata_and_the_partition() -> None:
    source = xml("v", "<cputune exclusive='yes'><vcpupin vcpu='0' cpuset='1'/></cputune>")
    spec = parse_domain(source)
    stored = with_pinwarden_metadata(source, spec, "11111111-2222-3333-4444-555555555555",
                                     "/pinwarden-vm-v")
    again = parse_domain(stored)
    assert again.exclusive and again.uuid == "11111111-2222-3333-4444-555555555555"
    assert again.partition == "/pinwarden-vm-v"
    assert again.vcpupins == spec.vcpupins
    assert "exclusive='yes'><vcpupin" not in stored  # libvirt would drop it anyway


def test_a_start_in_progress_is_not_freed_and_a_reservation_never() -> None:
    starting = domain_holder("qemu", "new", "11111111-0000-0000-0000-000000000000")
    ran = domain_holder("qemu", "ran", "22222222-0000-0000-0000-000000000000")
    reserved = domain_holder("qemu", "kept", "33333333-0000-0000-0000-000000000000")
    holders = [record(starting, {0: "1"}, {1: "vcpu0"}, created=990.0, owner=4242),
               record(ran, {0: "2"}, {2: "vcpu0"}, created=900.0, owner=4343),
               record(reserved, {0: "3"}, {3: "vcpu0"}, created=0.0)]
    actions = reconcile([], holders, lambda h: "/pw", now=1000.0, grace=60.0)
    assert actions == [Free(ran, f"{ran} is not running")]
    later = reconcile([], holders, lambda h: "/pw", now=1100.0, grace=60.0)
    assert [a.holder for a in later if isinstance(a, Free)] == [starting, ran]
    # an explicit reservation (no owner: 'pinwarden reserve') is never the daemon's to free


class _BrokenManager(Manager):
    def reader(self) -> Ledger | None:
        raise LedgerError("lease database is corrupt")

    def ledger(self) -> Ledger:
        raise RuntimeError("boom")


def test_hook_failures_fail_safe_in_python_too(tmp_path: Path) -> None:
    manager = _BrokenManager(Config(), Path("/"), tmp_path, enforce=False,
                             host=make_host("0-3", "1-3"))
    exclusive = xml("v", EXCLUSIVE_META)
    # started / release: reported (stderr and state_dir/hook.log), exit 0
    assert hook.main_run(manager, "qemu", ["v", "started", "begin", "-"], exclusive) == 0
    assert hook.main_run(manager, "qemu", ["v", "release", "end", "-"], exclusive) == 0
    logged = (tmp_path / hook.HOOK_LOG).read_text().splitlines()
    assert len(logged) == 2 and all("lease database is corrupt" in line for line in logged)
    # prepare of an exclusive domain: refused (fail closed), in one line
    assert hook.main_run(manager, "qemu", ["v", "prepare", "begin", "-"], exclusive) \
        == hook.REFUSED
    # prepare of a shared domain: let through (fail safe), the reason logged
    assert hook.main_run(manager, "qemu", ["w", "prepare", "begin", "-"], xml("w")) == 0
    assert "was let through unchecked" in (tmp_path / hook.HOOK_LOG).read_text()
    # XML pinwarden cannot read: a shared domain still starts
    assert hook.main_run(manager, "qemu", ["x", "prepare", "begin", "-"], "<dom") == 0
    # steps the hook ignores do nothing at all
    assert hook.main_run(manager, "qemu", ["v", "reconnect", "begin", "-"], "not xml") == 0


def test_release_leaves_a_give_back_only_when_narrowed_pins_wait(tmp_path: Path) -> None:
    """The hook may not call libvirt, so a lease it frees while running shared domains
    wait for its CPUs (pins 'pinwarden start' narrowed) is handed to the process it leaves
    behind; with no such pin, or no lease freed, nothing is started.  (The real thing:
    test_libvirt_e2e, a plain 'virsh destroy' without the daemon.)"""
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    doc = xml("a", f"<uuid>{UUID_A}</uuid>{EXCLUSIVE_META}")
    holder = domain_holder("qemu", "a", UUID_A)
    started: list[HolderRef] = []

    def leased(owner: int) -> None:
        manager.reserve(holder, lambda host, leases: Plan(
            "a", UUID_A, True, {0: cs("2")}, cs("2"), leases={2: "vcpu0"}), owner_pid=owner)

    def release(*, caller: int) -> None:
        assert hook.main_run(manager, "qemu", ["a", "release", "end", "-"], doc,
                             caller=caller, after_release=started.append) == 0

    leased(os.getpid())
    release(caller=os.getpid())  # freed, but no pin waits
    assert manager.leases() == () and started == []
    manager.put_change_records({"repin:" + "b" * 8 + ":vcpu0": "0-3"})
    leased(os.getpid())
    release(caller=1)  # its owner (this process) lives and is not libvirtd: not freed
    assert manager.leases() != () and started == []
    release(caller=os.getpid())
    assert manager.leases() == () and started == [holder]


def pauses_of_this_thread(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.sleep`` of this (the test's) thread recorded instead of slept; any other
    thread still sleeps.  (``time.sleep`` is one function for the whole process: the lab
    VMs booting in the background wait for their QEMU with it — 0.05 s at a time, in
    subprocess — and a plain patch both listed those pauses here and made them spin.)"""
    pauses: list[float] = []
    sleep, me = time.sleep, threading.get_ident()

    def pause(seconds: float) -> None:
        if threading.get_ident() == me:
            pauses.append(seconds)
        else:
            sleep(seconds)

    monkeypatch.setattr(time, "sleep", pause)
    return pauses


def test_the_give_back_after_a_release_waits_for_the_domain_and_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It waits for a 'pinwarden stop' or start of the released domain (which gives back
    itself and says so), tries again while libvirt fails, and logs what it did."""
    import threading

    from pinwarden.libvirt import pins
    from pinwarden.manager import domain_lock

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    released = domain_holder("qemu", "a", UUID_A)

    class Conn:
        closed = 0

        def close(self) -> None:
            Conn.closed += 1

    outcomes: list[Any] = []

    def give_back(_manager: Manager, _conn: Any) -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(pins.lv, "open_connection", lambda _uri: Conn())
    monkeypatch.setattr(pins, "give_back", give_back)
    logged: list[str] = []
    # no pin waits (run by hand, say): nothing is locked, opened or created
    assert pins.give_back_after_release(manager, "qemu:///system", released,
                                        logged.append) == ()
    assert not (tmp_path / "locks").exists() and Conn.closed == 0
    manager.put_change_records({"repin:" + "b" * 8 + ":vcpu0": "0-3"})
    outcomes[:] = [("b vcpu0: 0 -> 0-1",)]
    with domain_lock(tmp_path, released):
        def in_thread() -> None:  # a manager of its own: SQLite stays in its thread
            with Manager(Config(), Path("/"), tmp_path, enforce=False,
                         host=make_host("0-3", "1-3")) as own:
                pins.give_back_after_release(own, "qemu:///system", released, logged.append)

        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and outcomes  # waits for the stop that holds the lock
    worker.join(10)
    assert logged == ["gave back b vcpu0: 0 -> 0-1"] and Conn.closed == 1

    pauses = pauses_of_this_thread(monkeypatch)
    logged.clear()
    outcomes[:] = [LibvirtError("cannot re-pin b"), ()]
    assert pins.give_back_after_release(manager, "qemu:///system", released,
                                        logged.append) == ()
    assert logged == [] and pauses == list(pins.RELEASE_RETRIES[:2])
    outcomes[:] = [LibvirtError("cannot re-pin b")] * len(pins.RELEASE_RETRIES)
    pins.give_back_after_release(manager, "qemu:///system", released, logged.append)
    assert logged == ["warning: cannot give back the CPUs of narrowed pins: cannot re-pin "
                      "b; 'pinwarden stop' or the daemon tries again"]


def test_the_give_back_after_a_release_gives_up_on_a_hung_start_or_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'pinwarden start' or 'stop' of the released domain that never ends (hung) holds
    the domain's lock: the process the hook left behind gives up after its wait, says so
    in one line, and neither calls libvirt nor stays in libvirtd's cgroup for ever."""
    from pinwarden.libvirt import pins
    from pinwarden.manager import domain_lock

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    released = domain_holder("qemu", "a", UUID_A)
    manager.put_change_records({"repin:" + "b" * 8 + ":vcpu0": "0-3"})
    opened: list[str] = []
    monkeypatch.setattr(pins.lv, "open_connection", opened.append)
    monkeypatch.setattr(pins, "RELEASE_LOCK_WAIT", 0.3)
    logged: list[str] = []
    with domain_lock(tmp_path, released):
        began = time.monotonic()
        assert pins.give_back_after_release(manager, "qemu:///system", released,
                                            logged.append) == ()
        waited = time.monotonic() - began
    assert 0.3 <= waited < 5.0, waited
    assert opened == []
    assert logged == [f"warning: a 'pinwarden start' or 'stop' of {released.describe()} "
                      f"still runs after 0.3 s: the CPUs of narrowed pins are not given "
                      f"back now; 'pinwarden stop' or the daemon gives them back"]
    assert manager.change_records("repin:")  # kept for whoever gives back later


def test_the_hook_command_leaves_the_give_back_detached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own session, no stdio of libvirtd's (which waits for the hook's output to end;
    stderr goes to hook.log), the hook's state directory, configuration and root, this
    pinwarden first on its path; a failure to start it is logged."""
    import argparse

    from pinwarden.cli import vm

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    spawned: list[tuple[list[str], dict[str, Any]]] = []
    monkeypatch.setattr(subprocess, "Popen",
                        lambda argv, **kw: spawned.append((argv, kw)))
    args = argparse.Namespace(root="/r", config="pw.toml")
    vm._leave_give_back(args, manager, domain_holder("qemu", "a", UUID_A))
    ((argv, kw),) = spawned
    assert argv[:5] == [sys.executable, "-m", "pinwarden.cli.vm", "hook", "give-back"]
    assert argv[5:] == ["--root", "/r", "--state-dir", str(tmp_path), "--config",
                        os.path.abspath("pw.toml"), "qemu", "a", UUID_A]
    assert kw["start_new_session"] and kw["cwd"] == "/"
    assert kw["stdin"] == kw["stdout"] == subprocess.DEVNULL
    assert kw["stderr"].name == str(tmp_path / hook.HOOK_LOG)
    import pinwarden

    top = kw["env"]["PYTHONPATH"].split(os.pathsep)[0]
    assert Path(top, "pinwarden", "__init__.py") == Path(pinwarden.__file__).resolve()

    def broken(_argv: list[str], **_kw: Any) -> None:
        raise OSError(7, "Argument list too long")

    monkeypatch.setattr(subprocess, "Popen", broken)
    vm._leave_give_back(args, manager, domain_holder("qemu", "a", UUID_A))
    assert "warning: cannot start the give-back of the CPUs 'a' held (Argument list too " \
           "long)" in (tmp_path / hook.HOOK_LOG).read_text()


def test_define_names_the_driver_from_the_xml_not_the_uri(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exclusive container defined through a libvirt.conf alias of ``lxc:///`` (``-c
    box``): its partition is the LXC holder's, the one the hook and 'pinwarden start' use.
    The driver was taken from the URI string, where an alias reads as qemu: the stored
    partition was the VM holder's."""
    from pinwarden.libvirt import start as start_mod

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    stored: list[str] = []

    class Dom:
        def name(self) -> str:
            return "box"

        def UUIDString(self) -> str:
            return UUID_A

    class Conn:
        def defineXML(self, text: str) -> Dom:
            stored.append(text)
            return Dom()

        def close(self) -> None:
            pass

    monkeypatch.setattr(start_mod.lv, "open_connection", lambda _uri: Conn())
    path = tmp_path / "box.xml"
    path.write_text(f"<domain type='lxc'><name>box</name><uuid>{UUID_A}</uuid><memory>65536"
                    f"</memory><vcpu>1</vcpu>{EXCLUSIVE_META}<os><type>exe</type><init>"
                    "/bin/sh</init></os></domain>")
    start_mod.define(manager, "box", path.read_bytes())
    (text,) = stored
    assert "<partition>/pinwarden-lxc-box</partition>" in text, text


def test_a_wedged_pinwarden_holds_a_shared_start_for_seconds_not_minutes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (flock(1), not pinwarden) holds the manager lock and never lets go.
    A shared domain whose pins need the lock (its housekeeping CPU must join the shared
    group while something is leased) waits SHARED_LOCK_WAIT, then is let through; an
    exclusive one still waits the manager's whole lock timeout, then is refused."""
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"), lock_timeout=2.0)
    manager.reserve(lease(2, "db", "qemu").holder, lambda host, leases: Plan(
        "db", None, True, {0: cs("2")}, cs("2"), leases={2: "vcpu0"}))
    # the daemon's answer (let through) reaches the hook client before it stops waiting
    assert hook.SHARED_LOCK_WAIT < hookclient.SHARED_TIMEOUT
    monkeypatch.setattr(hook, "SHARED_LOCK_WAIT", 0.2)
    lock = tmp_path / "manager.lock"
    holder = subprocess.Popen(["flock", str(lock), "sleep", "60"])
    try:
        fd = os.open(lock, os.O_RDWR)
        try:
            for _ in range(250):  # until flock(1) has it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    time.sleep(0.02)
                except BlockingIOError:
                    break
            else:
                pytest.fail("flock(1) never took the lock")
        finally:
            os.close(fd)
        on_host = xml("web", "<cputune><vcpupin vcpu='0' cpuset='0'/></cputune>")
        began = time.monotonic()
        assert hook.main_run(manager, "qemu", ["web", "prepare", "begin", "-"], on_host) == 0
        assert time.monotonic() - began < 1.5
        logged = (tmp_path / hook.HOOK_LOG).read_text()
        assert "held" in logged and "was let through unchecked" in logged, logged
        assert manager.lock_timeout == 2.0  # the shared call's wait was its own
        began = time.monotonic()
        defined = xml("v", EXCLUSIVE_META + "<resource><partition>/pinwarden-vm-v"
                                           "</partition></resource>")
        # (the caller given: by default it is this process's grandparent, which a test run
        # started in the background by a shell that has exited no longer has)
        assert hook.main_run(manager, "qemu", ["v", "prepare", "begin", "-"], defined,
                             caller=os.getpid()) == hook.REFUSED
        waited = time.monotonic() - began
        last = (tmp_path / hook.HOOK_LOG).read_text().splitlines()[-1]
        assert waited >= 2.0 and "held" in last, (waited, last, holder.poll())
    finally:
        holder.kill()
        holder.wait()


def test_hook_refuses_a_domain_whose_pinwarden_metadata_may_ask_for_exclusive_cpus(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """exclusive='YES' (or a misspelt attribute): the domain may have asked for exclusive
    CPUs, so it is refused at prepare with how to fix it, not run shared with a warning;
    an element that says exclusive='no' or asks nothing exclusive is still let through."""
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    meta = "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' %s/></metadata>"
    for attrs in ("exclusive='YES'", "exclsive='yes'", "exclusive='yes' threads='all'"):
        assert hook.main_run(manager, "qemu", ["v", "prepare", "begin", "-"],
                             xml("v", meta % attrs)) == hook.REFUSED, attrs
        err = capsys.readouterr().err
        assert err.startswith("pinwarden: error: domain 'v' has invalid pinwarden metadata")
        assert "virsh edit v" in err and err.count("\n") == 1, err
    with Ledger(tmp_path) as ledger:
        assert ledger.holders() == ()
    for attrs in ("exclusive='no' threads='all'", "threads='all'"):
        assert hook.main_run(manager, "qemu", ["w", "prepare", "begin", "-"],
                             xml("w", meta % attrs)) == 0, attrs
        assert "let through unchecked" in capsys.readouterr().err
    # at later steps it is neither refused (libvirt would kill a running domain) nor said
    # again: hook.log had a warning of it at the release that follows every refused start
    for op in ("started", "stopped", "release"):
        assert hook.main_run(manager, "qemu", ["v", op, "end", "-"],
                             xml("v", meta % "exclusive='YES'")) == 0, op
        assert capsys.readouterr().err == "", op
    logged = (tmp_path / hook.HOOK_LOG).read_text().splitlines()
    assert not [line for line in logged if "warning" in line and "'v'" in line], logged
    # and a domain whose metadata went bad while it ran still has its leases freed
    assert hook.main_run(manager, "qemu", ["x", "prepare", "begin", "-"],
                         xml("x", meta % "exclusive='yes'" + "<resource><partition>"
                             "/pinwarden-vm-x</partition></resource>"),
                         caller=os.getpid()) == 0, capsys.readouterr().err
    with Ledger(tmp_path) as ledger:
        assert [h.ref.name for h in ledger.holders()] == ["x"]
    assert hook.main_run(manager, "qemu", ["x", "release", "end", "-"],
                         xml("x", meta % "exclusive='maybe'"), caller=os.getpid()) == 0
    assert capsys.readouterr().err == ""
    with Ledger(tmp_path) as ledger:
        assert ledger.holders() == ()


def test_the_hook_records_the_threads_it_placed_off_leased_cpus(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``started`` of a shared domain that pins nothing: the hook gives its threads the
    VM CPUs less the leased ones.  With nothing leased that is the whole pool, and nothing
    is recorded; while CPU 2 is leased every thread group is recorded as narrowed from the
    pool (as ``pinwarden start`` records its placement), to get CPU 2 back later."""
    from pinwarden.enforce import affinity

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    placed: list[dict[int, CpuSet]] = []
    monkeypatch.setattr(place, "running_pid", lambda _driver, _name: os.getpid())
    monkeypatch.setattr(affinity, "pin_each",
                        lambda wanted: placed.append(dict(wanted)) or {})
    uuid = "3c0ffee0-0000-4000-8000-000000000001"
    web = xml("web", f"<uuid>{uuid}</uuid>")
    assert hook.main_run(manager, "qemu", ["web", "started", "begin", "-"], web) == 0
    assert placed and set(placed[-1].values()) == {cs("1-3")}
    assert manager.change_records("repin:") == {}
    manager.reserve(lease(2, "db", "qemu").holder, lambda host, leases: Plan(
        "db", None, True, {0: cs("2")}, cs("2"), leases={2: "vcpu0"}))
    assert hook.main_run(manager, "qemu", ["web", "started", "begin", "-"], web) == 0
    assert set(placed[-1].values()) == {cs("1,3")}
    assert {k: json.loads(v) for k, v in manager.change_records("repin:").items()} == {
        f"repin:{uuid}:{label}": {"domain": "web", "before": "1-3", "after": "1,3"}
        for label in ("vcpu0", "vcpu1", "emulator")}


NAMED_THREADS = """
import os, sys, threading, time
def name(text):
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(text)
def vcpu(n):
    name(f"CPU {n}/TCG")
    time.sleep(600)
name("qemu-system-x86")
for n in (0, 1):
    threading.Thread(target=vcpu, args=(n,), daemon=True).start()
threading.Thread(target=lambda: (name("IO iothread1"), time.sleep(600)), daemon=True).start()
time.sleep(0.5)
print("ready", flush=True)
time.sleep(600)
"""


def test_plain_virsh_start_of_an_exclusive_domain_pins_each_thread_as_planned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``started`` of an exclusive domain libvirt started without pins (plain ``virsh
    start`` of a domain 'pinwarden define' stored): each thread gets the CPUs of its plan,
    as ``pinwarden start`` writes them.  libvirt >= 10.4 leaves them on the holder's CPUs
    that are not isolated: with one leased CPU in isolcpus=, every thread of a 2-vCPU
    domain ran on the other (trixie lab hunt).  Real threads, real affinity."""
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.fail("this test needs CPUs 0 and 1 (every machine pinwarden is tested on "
                    "has them)")
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-1", "0-1"))
    holder = lease(0, "db", "qemu").holder
    manager.reserve(holder, lambda host, leases: Plan(
        "db", None, True, {0: cs("0"), 1: cs("1")}, cs("0-1"), iothreads={1: cs("1")},
        leases={0: "vcpu0", 1: "vcpu1"}), owner_pid=os.getpid())
    child = subprocess.Popen([sys.executable, "-c", NAMED_THREADS], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        monkeypatch.setattr(place, "running_pid", lambda _driver, _name: child.pid)
        meta = ("<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>"
                "</metadata>")
        assert hook.main_run(manager, "qemu", ["db", "started", "begin", "-"],
                             xml("db", meta)) == 0
        by_name = {procs.thread_comm(child.pid, tid): os.sched_getaffinity(tid)
                   for tid in map(int, os.listdir(f"/proc/{child.pid}/task"))}
        assert by_name == {"qemu-system-x86": {0, 1}, "CPU 0/TCG": {0}, "CPU 1/TCG": {1},
                           "IO iothread1": {1}}, by_name
        (record,) = manager.holders()
        assert record.owner_pid == child.pid  # and QEMU owns the lease, as before
    finally:
        child.kill()
        child.wait()


def test_the_hook_reads_running_pins_from_libvirts_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook may not call libvirt: the running domains whose own XML pins a thread onto
    the CPUs an exclusive domain would lease come from libvirt's status files (the live
    XML) and configuration files (the stored one).  Refused when both pin it there, and
    for a transient domain (no stored XML) when its live XML does — unless pinwarden
    narrowed that thread (its ``repin:`` record): it was left out whole, moved off its
    user's pin silently where 'pinwarden start' refused (hunt).  One pinned elsewhere is
    not refused; unreadable files are skipped."""
    from pinwarden.libvirt import connect, place
    from pinwarden.libvirt.hook import _decide_beside_running

    run, etc = tmp_path / "run", tmp_path / "etc"
    run.mkdir()
    etc.mkdir()
    monkeypatch.setitem(connect.RUN_DIRS, "qemu", run)
    monkeypatch.setitem(place.CONFIG_DIRS, "qemu", str(etc))

    def status_file(name: str, uuid: str, pin: str, *, stored: bool) -> None:
        body = (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><vcpu>1</vcpu>"
                f"<cputune><vcpupin vcpu='0' cpuset='{pin}'/></cputune></domain>")
        (run / f"{name}.xml").write_text(f"<domstatus state='running' pid='1'>{body}"
                                         f"</domstatus>")
        if stored:
            (etc / f"{name}.xml").write_text(body)

    status_file("t", UUID_A, "3", stored=False)  # transient, pinned there by pinwarden
    status_file("q", "aaaaaaaa-0000-0000-0000-000000000002", "2", stored=True)  # elsewhere
    (run / "broken.xml").write_text("<domstatus><domain>")  # skipped
    spec = parse_domain(f"<domain type='kvm'><name>x</name><vcpu>1</vcpu>{EXCLUSIVE_META}"
                        f"<cputune><vcpupin vcpu='0' cpuset='3'/></cputune></domain>")
    holder = domain_holder("qemu", "x", None)
    host = make_host("0-3", "1-3")
    ours = frozenset({(UUID_A, "vcpu0")})
    assert _decide_beside_running(spec, holder, "qemu", host, (), ours).leased().as_list() \
        == [3]
    with pytest.raises(Refusal, match="running domain 't' pins vcpu0 to CPU 3 only"):
        _decide_beside_running(spec, holder, "qemu", host, ())  # its user's pin
    (run / "t.xml").unlink()
    status_file("p", "aaaaaaaa-0000-0000-0000-000000000003", "3", stored=True)
    with pytest.raises(Refusal, match="running domain 'p' pins vcpu0 to CPU 3 only") as info:
        _decide_beside_running(spec, holder, "qemu", host, ())
    assert info.value.code == "pinned-elsewhere"


def test_the_hook_reads_a_running_domains_vcpu_cpuset_as_its_pins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running domain whose XML names CPU 3 only in ``<vcpu cpuset>`` (libvirt runs its
    vCPUs and emulator there): the hook read only its <vcpupin>/<emulatorpin>, leased CPU
    3 to an exclusive 'virsh start' and the layout moved that domain off it silently,
    where 'pinwarden start' refused (hunt).  Now both refuse; a running domain whose live
    <vcpu cpuset> is pinwarden's own placement (its stored XML names none: 'pinwarden
    start' of a shared domain writes it) is re-pinned, as 'pinwarden start' does."""
    from pinwarden.libvirt import connect, place
    from pinwarden.libvirt.hook import _decide_beside_running

    run, etc = tmp_path / "run", tmp_path / "etc"
    run.mkdir()
    etc.mkdir()
    monkeypatch.setitem(connect.RUN_DIRS, "qemu", run)
    monkeypatch.setitem(place.CONFIG_DIRS, "qemu", str(etc))

    def status_file(name: str, uuid: str, live: str, stored: str) -> None:
        def body(vcpu: str) -> str:
            return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>{vcpu}"
                    f"</domain>")
        (run / f"{name}.xml").write_text(f"<domstatus state='running' pid='1'>{body(live)}"
                                         f"</domstatus>")
        (etc / f"{name}.xml").write_text(body(stored))

    spec = parse_domain(f"<domain type='kvm'><name>x</name><vcpu>1</vcpu>{EXCLUSIVE_META}"
                        f"<cputune><vcpupin vcpu='0' cpuset='3'/></cputune></domain>")
    holder = domain_holder("qemu", "x", None)
    host = make_host("0-3", "1-3")
    status_file("placed", "aaaaaaaa-0000-0000-0000-000000000004",
                "<vcpu placement='static' cpuset='3'>2</vcpu>", "<vcpu>2</vcpu>")
    plan = _decide_beside_running(spec, holder, "qemu", host, ())
    assert plan.leased().as_list() == [3]
    status_file("own", "aaaaaaaa-0000-0000-0000-000000000005",
                "<vcpu placement='static' cpuset='3'>2</vcpu>",
                "<vcpu placement='static' cpuset='3'>2</vcpu>")
    with pytest.raises(Refusal, match="running domain 'own' pins vcpu0 to CPU 3 only") \
            as info:
        _decide_beside_running(spec, holder, "qemu", host, ())
    assert info.value.code == "pinned-elsewhere"


def test_threads_as_planned_follow_libvirts_thread_names() -> None:
    plan = Plan("db", None, True, {0: cs("2"), 1: cs("3")}, cs("2-3"),
                iothreads={1: cs("3")})
    comms: dict[int, str | None] = {
        10: "qemu-system-x86", 11: "CPU 0/KVM", 12: "CPU 1/KVM", 13: "IO iothread1",
        14: "IO iothread2", 15: "ALL CPUs/TCG", 16: None, 17: "CPU 7/KVM"}
    assert threads_as_planned(plan, comms) == {
        10: cs("2-3"), 11: cs("2"), 12: cs("3"), 13: cs("3"), 14: cs("2-3"),
        15: cs("2-3")}


def test_group_affinity_joins_each_thread_groups_masks_by_thread_name() -> None:
    comms: dict[int, str | None] = {
        10: "qemu-system-x86", 11: "CPU 0/KVM", 12: "CPU 1/KVM", 13: "IO iothread1",
        14: "worker", 15: None, 16: "CPU 2/KVM", 17: "ALL CPUs/TCG"}
    masks = {10: cs("1"), 11: cs("2"), 12: cs("3"), 13: cs("1-2"), 14: cs("4"), 15: cs("5"),
             17: cs("6")}
    assert group_affinity(comms, masks) == {
        ("emulator", None): cs("1,4"), ("vcpu", 0): cs("2"), ("vcpu", 1): cs("3"),
        ("iothread", 1): cs("1-2"), ("vcpu", None): cs("6")}


def test_hook_refuses_a_shared_domain_pinned_onto_a_lease(tmp_path: Path) -> None:
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    holder = lease(2, "db", "qemu").holder
    manager.reserve(holder, lambda host, leases: Plan(
        "db", None, True, {0: cs("2")}, cs("2"), leases={2: "vcpu0"}))
    pinned = xml("web", "<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>")
    assert hook.main_run(manager, "qemu", ["web", "prepare", "begin", "-"], pinned) \
        == hook.REFUSED
    assert hook.main_run(manager, "qemu", ["web2", "prepare", "begin", "-"], xml("web2")) == 0



def test_hook_refuses_an_unplaceable_exclusive_domain_for_that_reason_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An exclusive domain defined behind pinwarden's back (no partition) is refused with
    the way in: 'pinwarden define' or 'pinwarden start'.  One that no start could place
    (more vCPUs than VM CPUs) was told the same, and both then refused it for the reason
    the hook never gave (real-libvirt hunt): that reason comes first now."""
    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    big = xml("big", EXCLUSIVE_META).replace("<vcpu>2</vcpu>", "<vcpu>4</vcpu>")
    assert hook.main_run(manager, "qemu", ["big", "prepare", "begin", "-"], big) \
        == hook.REFUSED
    err = capsys.readouterr().err
    assert "cannot place 4 CPUs" in err and "partition" not in err, err
    assert hook.main_run(manager, "qemu", ["fits", "prepare", "begin", "-"],
                         xml("fits", EXCLUSIVE_META)) == hook.REFUSED
    assert "would start in partition /machine" in capsys.readouterr().err


def test_a_bug_in_a_hook_command_is_one_line_and_exit_70(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The hook scripts run ``python -m pinwarden.cli.vm``: a bug there is pinwarden's
    one-line internal error (exit 70: the script lets shared domains through, as for any
    broken pinwarden), not a traceback in libvirt's error."""
    from pinwarden.cli import vm as vm_cli

    def broken(args: object) -> int:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(vm_cli, "cmd_hook_ping", broken)
    assert vm_cli.hook_main(["hook", "ping"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: boom second line" in err


def libvirt_error(code: int, text: str) -> Exception:
    """A ``libvirtError`` as libvirt raises it, with error code ``code``."""
    from pinwarden.libvirt import connect

    class FakeError(connect.binding().libvirtError):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            Exception.__init__(self, text)

        def get_error_code(self) -> int:
            return code

        def get_error_message(self) -> str:
            return str(self)

    return FakeError()


def test_a_domain_between_states_has_no_affinity_yet() -> None:
    """libvirt answers OPERATION_INVALID ("cpu affinity is not supported") for a domain
    whose QEMU runs before libvirt knows its vCPU threads (seen on libvirt 11 while a
    domain starts): no affinity yet, not an error.  Before, it failed every listing of
    domains, and with it the daemon's whole pass, at every start."""
    from pinwarden.libvirt import connect

    lv = connect.binding()

    class Starting:
        def vcpus(self) -> Any:
            raise libvirt_error(lv.VIR_ERR_OPERATION_INVALID, "cpu affinity is not supported")

        def name(self) -> str:
            return "f"

    class Broken(Starting):
        def vcpus(self) -> Any:
            raise libvirt_error(lv.VIR_ERR_INTERNAL_ERROR, "something else")

    with pytest.raises(connect.Settling):
        connect.read_affinity(Starting())
    with pytest.raises(LibvirtError, match="cannot read the CPU affinity of domain 'f'"):
        connect.read_affinity(Broken())


def test_a_settling_domain_is_neither_adopted_nor_given_back_to() -> None:
    """A domain between states (being destroyed: its lease already released by the hook)
    is no running exclusive domain nobody recorded.  Adopted, it got a lease without an
    owner that outlived it for good (seen in the end-to-end test once listings stopped
    failing on such domains)."""
    from pinwarden.libvirt.repin import give_back, record_moves
    from pinwarden.record import replace

    dom = running("x", "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' "
                       "exclusive='yes'/></metadata><cputune><vcpupin vcpu='0' cpuset='2'/>"
                       "<vcpupin vcpu='1' cpuset='3'/></cputune>")
    assert dom.exclusive
    assert [type(a) for a in reconcile([dom], [], lambda _h: "/machine", now=0.0)] == [Adopt]
    dying = replace(dom, affinity=None, settling=True)
    assert reconcile([dying], [], lambda _h: "/machine", now=0.0) == []
    s = running("s", vcpus="0-3", emulator="0-3")
    records = record_moves(repins([s], A, cs("2"), pool=cs("0-1,3")), {})
    assert give_back([replace(s, settling=True)], records, leased=CpuSet()) == \
        give_back([], {}, leased=CpuSet())


def test_a_domain_that_stops_before_its_adoption_is_no_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon adopts from a listing: a domain that stops between the listing and its
    adoption is not adopted (the ledger refuses an owner that has exited) and is no error;
    one that runs is adopted."""
    from pinwarden.libvirt import daemon
    from pinwarden.record import replace

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    dom = running("x", "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' "
                       "exclusive='yes'/></metadata><cputune><vcpupin vcpu='0' cpuset='2'/>"
                       "<vcpupin vcpu='1' cpuset='3'/></cputune>")
    gone = subprocess.Popen(["true"])
    gone.wait()
    with caplog.at_level("INFO", logger="pinwarden.daemon"):
        daemon._adopt(manager, Adopt(replace(dom, pid=gone.pid)))
    assert manager.holders() == ()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == \
        [("INFO", "did not adopt x: it stopped meanwhile")]
    caplog.clear()
    with caplog.at_level("INFO", logger="pinwarden.daemon"):
        daemon._adopt(manager, Adopt(replace(dom, pid=os.getpid())))
    assert [h.ref.name for h in manager.holders()] == ["x"]
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "adopted running exclusive domain x" in caplog.records[0].getMessage()


class Listing:
    """A ``qemu:///system`` connection listing ``domains``; looking one up again gives
    ``lookup``: a domain, or a libvirt error code to raise."""

    def __init__(self, domains: list[Any], lookup: Any) -> None:
        self.domains, self.lookup = domains, lookup

    def getURI(self) -> str:
        return "qemu:///system"

    def listAllDomains(self, _flags: int) -> list[Any]:
        return list(self.domains)

    def lookupByUUIDString(self, _uuid: str) -> Any:
        if isinstance(self.lookup, int):
            raise libvirt_error(self.lookup, "lookup failed")
        return self.lookup


def test_a_listing_cut_short_by_libvirtd_going_away_fails_rather_than_drop_domains() -> None:
    """libvirtd stopping (a restart, a package upgrade) while the daemon lists domains:
    each domain's calls fail, and so does looking the domain up again.  The listing used
    to skip such a domain as one that vanished meanwhile, and a pass then took running
    domains for gone: it forgot the records of the pins it was to give back (seen in the
    daemon's real-libvirt test on a loaded machine) and would free the lease of a running
    exclusive domain.  Only libvirt's "no such domain" means gone."""
    from pinwarden.libvirt import connect

    lv = connect.binding()

    class Unreadable:
        def __init__(self, uuid: str) -> None:
            self.uuid = uuid

        def name(self) -> str:
            raise libvirt_error(lv.VIR_ERR_SYSTEM_ERROR, "Cannot recv data: Connection reset")

        def UUIDString(self) -> str:
            return self.uuid

    # the domain is really gone: skipped
    gone = Listing([Unreadable(UUID_A)], lv.VIR_ERR_NO_DOMAIN)
    assert connect.list_domains(gone, active_only=True) == ()
    # libvirt cannot say (its connection is going away): the listing fails as a whole
    for code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC, lv.VIR_ERR_INTERNAL_ERROR):
        with pytest.raises(LibvirtError, match="cannot read a domain"):
            connect.list_domains(Listing([Unreadable(UUID_A)], code), active_only=True)


def test_a_domain_stopping_during_a_listing_is_left_out_not_a_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A running domain being destroyed fails its reads ("Unable to read from monitor",
    "No such process") until libvirt marks it shut off.  It failed the whole listing, and
    with it 'pinwarden start' of an exclusive domain and the daemon's pass, whenever any
    domain was stopping (test_libvirt_daemon shows it on libvirtd).  Now the domain is
    looked at again: stopped → left out; read → kept; running and unreadable through every
    pause → the listing fails, as a running domain must never be left out."""
    from pinwarden.libvirt import connect

    lv = connect.binding()
    pauses = pauses_of_this_thread(monkeypatch)
    monkeypatch.setattr(connect, "read_pid", lambda _driver, _name: None)
    xml = "<domain type='kvm'><name>p</name><uuid>" + UUID_A + "</uuid><vcpu>1</vcpu></domain>"

    class Dom:
        """Running until ``reads`` failed reads are spent; then shut off (``stops``) or
        readable again."""

        def __init__(self, reads: int, *, stops: bool) -> None:
            self.failing, self.stops = reads, stops

        def name(self) -> str:
            return "p"

        def UUIDString(self) -> str:
            return UUID_A

        def isActive(self) -> bool:
            return not (self.stops and self.failing <= 0)

        def isPersistent(self) -> bool:
            return True

        def XMLDesc(self, _flags: int = 0) -> str:
            return xml

        def vcpus(self) -> Any:
            if self.failing > 0:
                self.failing -= 1
                raise libvirt_error(lv.VIR_ERR_OPERATION_FAILED,
                                    "Unable to read from monitor: Connection reset by peer")
            return ([(0, 1, 0, 0)], [(True,)])

        def emulatorPinInfo(self, _flags: int) -> Any:
            return (True,)

        def ioThreadInfo(self, _flags: int) -> Any:
            return []

    def conn(dom: Dom) -> Listing:
        return Listing([dom], dom)

    assert connect.list_domains(conn(Dom(2, stops=True)), active_only=True) == ()
    (shut_off,) = connect.list_domains(conn(Dom(2, stops=True)))
    assert not shut_off.active and shut_off.affinity is None
    (read,) = connect.list_domains(conn(Dom(3, stops=False)), active_only=True)
    assert read.active and read.affinity is not None
    pauses.clear()
    with pytest.raises(LibvirtError, match="Unable to read from monitor"):
        connect.list_domains(conn(Dom(99, stops=False)), active_only=True)
    assert pauses == list(connect.STOPPING_WAITS) and sum(pauses) < 2


def test_the_daemon_frees_only_holders_of_the_driver_it_watches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon connected to qemu:///system sees no container: an LXC domain's lease (its
    libvirt_lxc process alive) is not its to free.  It freed every one once its start
    grace was over."""
    from pinwarden.libvirt import daemon

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    container = domain_holder("lxc", "ct", "cccccccc-0000-0000-0000-000000000001")
    gone = domain_holder("qemu", "gone", "99999999-0000-0000-0000-000000000000")
    for cpu, ref in ((2, container), (3, gone)):
        manager.reserve(ref, lambda _host, _leases, ref=ref, cpu=cpu: Plan(
            ref.name, ref.uuid, True, {0: cs(str(cpu))}, cs(str(cpu)),
            leases={cpu: "vcpu0"}), owner_pid=os.getpid())

    class Conn:  # a qemu:///system with no domain running
        def getURI(self) -> str:
            return "qemu:///system"

        def listAllDomains(self, _flags: int) -> list[Any]:
            return []

    later = time.time() + 10 * 3600  # long past every start's grace
    monkeypatch.setattr(daemon.time, "time", lambda: later)
    daemon.reconcile_once(manager, Conn(), restore=False)
    assert [h.ref for h in manager.holders()] == [container]


def test_a_give_back_over_a_container_connection_keeps_the_vms_pins(tmp_path: Path) -> None:
    """Only QEMU domains have threads pinwarden re-pins.  ``pinwarden stop`` of an LXC
    container (or a daemon on lxc:///) gives back over the lxc connection, whose listing
    has no VM in it: it forgot every narrowed pin of the running VMs, which then never got
    their CPUs back."""
    from pinwarden.libvirt import pins
    from pinwarden.libvirt.repin import record_moves
    from pinwarden.narrowed import NARROWED_PREFIX

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    s = running("s", vcpus="0-3", emulator="0-3")
    records = record_moves(repins([s], A, cs("2"), pool=cs("0-1,3")), {})
    assert records
    manager.put_change_records(records)

    class Conn:  # lxc:/// with no container running
        def getURI(self) -> str:
            return "lxc:///"

        def listAllDomains(self, _flags: int) -> list[Any]:
            return []

    assert pins.give_back(manager, Conn()) == ()
    assert manager.change_records(NARROWED_PREFIX) == records


def test_offline_vcpus_are_where_a_hot_plug_puts_them() -> None:
    """libvirt gives a hot-plugged vCPU its live <vcpupin>, else a static <vcpu cpuset>,
    else every host CPU; the online ones keep what the kernel says (checked against real
    libvirt's hot-plug in test_libvirt_start)."""
    from pinwarden.libvirt.state import with_offline_vcpus

    def spec(vcpu: str, pins: str = "") -> Any:
        return parse_domain(f"<domain type='kvm'><name>h</name>{vcpu}"
                            f"<cputune>{pins}</cputune></domain>")

    online = Affinity(vcpus={0: CpuSet.parse("0")}, emulator=CpuSet.parse("0"))
    host = CpuSet.parse("0-7")
    assert with_offline_vcpus(online, spec("<vcpu current='1'>3</vcpu>"), host).vcpus == {
        0: CpuSet.parse("0"), 1: host, 2: host}
    pinned = spec("<vcpu placement='static' cpuset='4-5' current='1'>3</vcpu>",
                  "<vcpupin vcpu='2' cpuset='6'/>")
    got = with_offline_vcpus(online, pinned, host)
    assert got.vcpus == {0: CpuSet.parse("0"), 1: CpuSet.parse("4-5"), 2: CpuSet.parse("6")}
    assert got.emulator == online.emulator and got.offline == frozenset({1, 2})
    numad = spec("<vcpu placement='auto' current='1'>2</vcpu>")
    assert with_offline_vcpus(online, numad, host).vcpus[1] == host


def restored(manager: Manager, name: str, doc: str) -> str:
    """What the hook's ``restore`` step of domain ``name`` prints: the XML libvirt is to
    restore instead of ``doc`` ("": as saved)."""
    import io

    out = io.StringIO()
    assert hook.main_run(manager, "qemu", [name, "restore", "begin", "-"], doc,
                         rewrite=out) == 0
    return out.getvalue()


def test_a_shared_domain_restored_onto_a_lease_gets_its_pins_off_it(tmp_path: Path) -> None:
    """'restore': a shared domain's saved pins (here: written live by a give-back, which
    the save image keeps) on a CPU leased now are moved off it in the XML libvirt restores
    — each keeps what is not leased, or gets the shared pool — and recorded, so the
    lease's end gives them back.  Before, 'prepare' refused them as the user's pins and
    the domain could not be restored while the lease lasted (found by a real-libvirt
    hunt; the real thing: test_libvirt_e2e).  Exclusive domains, a host with nothing
    leased and pins off the leases are restored as saved (nothing printed)."""

    from pinwarden.narrowed import NARROWED_PREFIX

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    uuid_s = "55555555-0000-0000-0000-000000000005"
    saved = xml("s", f"<uuid>{uuid_s}</uuid><cputune><vcpupin vcpu='0' cpuset='1'/>"
                     "<vcpupin vcpu='1' cpuset='3'/><emulatorpin cpuset='1-2'/></cputune>")

    def restore(doc: str) -> str:
        return restored(manager, "s", doc)

    assert restore(saved) == ""  # nothing leased
    manager.reserve(domain_holder("qemu", "a", UUID_A), lambda host, leases: Plan(
        "a", UUID_A, True, {0: cs("1")}, cs("1"), leases={1: "vcpu0"}), owner_pid=os.getpid())
    got = parse_domain(restore(saved))
    assert got.vcpupins == {0: cs("2-3"), 1: cs("3")} and got.emulatorpin == cs("2")
    assert {k.removeprefix(NARROWED_PREFIX): json.loads(v) for k, v in
            manager.change_records(NARROWED_PREFIX).items()} == {
        f"{uuid_s}:vcpu0": {"domain": "s", "before": "1", "after": "2-3"},
        f"{uuid_s}:emulator": {"domain": "s", "before": "1-2", "after": "2"}}
    assert "restoring s off leased CPU 1: vcpu0 1 -> 2-3, emulator 1-2 -> 2" in \
        (tmp_path / hook.HOOK_LOG).read_text()
    assert restore(xml("s", "<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>")) == ""
    assert restore(xml("x", f"{EXCLUSIVE_META}<cputune><vcpupin vcpu='0' cpuset='1'/>"
                            "</cputune>")) == ""
    cpuset = parse_domain(restore(xml("c", "").replace("<vcpu>2</vcpu>",
                                                         "<vcpu cpuset='1-2'>2</vcpu>")))
    assert cpuset.cpuset == cs("2") and cpuset.vcpupins == {}
    # <vcpu cpuset> ('pinwarden start' writes it for a shared domain): every thread group
    # it pins is recorded as narrowed, and the lease's end pins each back live — before,
    # nothing was recorded and the domain stayed on CPU 2 for good (real-libvirt hunt)
    uuid_c = "66666666-0000-0000-0000-000000000006"
    cpuset = parse_domain(restored(manager, "c", xml("c", f"<uuid>{uuid_c}</uuid>"
                                                    "<iothreads>1</iothreads>"
                                           "<cputune><vcpupin vcpu='1' cpuset='3'/>"
                                           "</cputune>").replace(
        "<vcpu>2</vcpu>", "<vcpu cpuset='1-2'>2</vcpu>")))
    assert cpuset.cpuset == cs("2") and cpuset.vcpupins == {1: cs("3")}
    records = {k.removeprefix(NARROWED_PREFIX): json.loads(v) for k, v in
               manager.change_records(NARROWED_PREFIX).items() if uuid_c in k}
    assert records == {f"{uuid_c}:{label}": {"domain": "c", "before": "1-2", "after": "2"}
                       for label in ("vcpu0", "emulator", "iothread1")}, records
    live = parse_domain(xml("c", f"<uuid>{uuid_c}</uuid><iothreads>1</iothreads><cputune>"
                                 "<vcpupin vcpu='1' cpuset='3'/></cputune>").replace(
        "<vcpu>2</vcpu>", "<vcpu cpuset='2'>2</vcpu>"))
    back = give_back([DomainInfo("qemu", "c", uuid_c, True, live=live, persistent=live,
                                 pid=1)],
                     {k: v for k, v in manager.change_records(NARROWED_PREFIX).items()
                      if uuid_c in k}, EMPTY)
    assert sorted((m.label, str(m.before), str(m.after)) for m in back.moves) == [
        ("emulator", "2", "1-2"), ("iothread1", "2", "1-2"), ("vcpu0", "2", "1-2")]
    # the daemon's hook server (no rewrite stream): left as saved, nothing recorded
    before = manager.change_records(NARROWED_PREFIX)
    assert hook.main_run(manager, "qemu", ["t", "restore", "begin", "-"],
                         saved.replace("<name>s</name>", "<name>t</name>")) == 0
    assert manager.change_records(NARROWED_PREFIX) == before


def test_an_exclusive_domain_restored_while_its_saved_cpus_are_leased_gets_the_plan_of_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'restore' of an exclusive domain 'pinwarden start' ran (its live definition, and so
    its save image, pins the plan of then; its stored one pins nothing): another holder
    leases CPU 1 now, so it gets a plan of now, which 'prepare' leases.  It was refused
    "choose other CPUs or stop it first" with CPUs 2-3 free, and 'pinwarden start' sent the
    user back to that restore (systemd-lab hunt).  Pins its stored definition names are its
    user's, and with its CPUs free it is restored as saved (nothing printed)."""

    from pinwarden.libvirt import place
    from pinwarden.policy import decide

    configs = tmp_path / "etc"
    configs.mkdir()
    monkeypatch.setitem(place.CONFIG_DIRS, "qemu", str(configs))
    manager = Manager(Config(), Path("/"), tmp_path / "state", enforce=False,
                      host=make_host("0-3", "1-3"))
    uuid_x = "77777777-0000-0000-0000-000000000007"
    stored = xml("x", f"<uuid>{uuid_x}</uuid>{EXCLUSIVE_META}")
    (configs / "x.xml").write_text(stored)
    saved = stored.replace("<vcpu>2</vcpu>", "<vcpu placement='static' cpuset='1-2'>2</vcpu>")
    saved = saved.replace("<os>", "<cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' "
                                  "cpuset='2'/><emulatorpin cpuset='1-2'/></cputune><os>")

    def restore(doc: str) -> str:
        return restored(manager, "x", doc)

    assert restore(saved) == ""  # its CPUs are free: as saved
    manager.reserve(A, lambda host, leases: Plan("a", UUID_A, True, {0: cs("1")}, cs("1"),
                                                 leases={1: "vcpu0"}), owner_pid=os.getpid())
    got = parse_domain(restore(saved))
    assert got.exclusive and len(got.vcpupins) == 2, got
    placed = CpuSet.of(c for cpus in got.vcpupins.values() for c in cpus)
    assert placed == cs("2-3") and not (got.emulatorpin or CpuSet()) & cs("0-1"), got
    assert "restoring exclusive x on CPUs 2-3: its saved CPU 1 is leased to others now" in \
        (tmp_path / "state" / hook.HOOK_LOG).read_text()
    # what 'prepare' then decides on it: the restored pins, beside the other holder
    again = decide(parse_domain(restore(saved)), manager.host(), manager.leases())
    assert again.leased() == cs("2-3"), again
    # the user's own pins (in the stored definition): as saved, refused at 'prepare'
    (configs / "x.xml").write_text(saved)
    assert restore(saved) == ""


def test_a_shared_domain_saved_while_narrowed_restores_with_the_cpus_freed_since(
        tmp_path: Path) -> None:
    """A shared domain saved while pinwarden had its pins narrowed, restored after the
    lease ended: the pins that are still the ones pinwarden set get what they had before,
    less what is leased now, and their records go once whole; a pin changed since is the
    user's and restored as saved.  Before, the records of a domain that did not run were
    forgotten by the lease's give-back, and the domain kept the narrowed pins for good
    (the real thing: test_libvirt_e2e).  Kept for a domain with a managed save image; one
    merely shut off has its records forgotten, as before."""
    import io

    from pinwarden.libvirt.repin import give_back, record_moves
    from pinwarden.narrowed import NARROWED_PREFIX

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    uuid_s = "66666666-0000-0000-0000-000000000006"
    before = running("s", f"<uuid>{uuid_s}</uuid>", vcpus="1-3", emulator="1-3",
                     uuid=uuid_s)
    records = record_moves(repins([before], A, cs("1"), pool=cs("2-3")), {})
    # the lease of CPU 1 ends while the domain is saved: kept, for its restore
    gone = give_back([], records, leased=CpuSet(), saved=frozenset({uuid_s}))
    assert gone == give_back([], {}, leased=CpuSet())
    assert sorted(give_back([], records, leased=CpuSet()).forget) == sorted(records)
    manager.put_change_records(records)
    manager.reserve(domain_holder("qemu", "b", "b" * 8), lambda host, leases: Plan(
        "b", "b" * 8, True, {0: cs("3")}, cs("3"), leases={3: "vcpu0"}),
        owner_pid=os.getpid())
    saved = xml("s", f"<uuid>{uuid_s}</uuid><cputune><vcpupin vcpu='0' cpuset='2-3'/>"
                     "<vcpupin vcpu='1' cpuset='2'/><emulatorpin cpuset='2-3'/></cputune>")
    out = io.StringIO()
    assert hook.main_run(manager, "qemu", ["s", "restore", "begin", "-"], saved,
                         rewrite=out) == 0
    got = parse_domain(out.getvalue())
    # vcpu1 (2, set by the user since) stays; the others get CPU 1 back, not the leased 3
    assert got.vcpupins == {0: cs("1-2"), 1: cs("2")} and got.emulatorpin == cs("1-2")
    assert {k.removeprefix(NARROWED_PREFIX): json.loads(v) for k, v in
            manager.change_records(NARROWED_PREFIX).items()} == {
        f"{uuid_s}:vcpu0": {"domain": "s", "before": "1-3", "after": "1-2"},
        f"{uuid_s}:vcpu1": {"domain": "s", "before": "1-3", "after": "2-3"},
        f"{uuid_s}:emulator": {"domain": "s", "before": "1-3", "after": "1-2"}}
    assert "restoring s with the CPUs no longer leased: vcpu0 2-3 -> 1-2, emulator " \
        "2-3 -> 1-2" in (tmp_path / hook.HOOK_LOG).read_text()


def test_a_give_back_libvirt_refuses_is_tried_again_after_a_sync_before_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A lease the daemon's hook server frees in another thread (QEMU killed: libvirt's
    'release') is out of the ledger before its cgroups are widened: a give-back of that
    CPU read at that moment is refused by libvirt ("failed to set cpuset.cpus"), and the
    daemon logged an ERROR for a state it put right 30 ms later (real-libvirt hunt).  It
    tries once more after a sync; a refusal that stays is still an error."""
    import logging

    from pinwarden.libvirt import daemon, pins

    manager = Manager(Config(), Path("/"), tmp_path, enforce=False,
                      host=make_host("0-3", "1-3"))
    answers: list[Exception | None] = [LibvirtError("failed to set cpuset.cpus"), None]
    calls: list[str] = []

    def give_back(_manager: Manager, _conn: Any, *, place: bool = True) -> tuple[Any, ...]:
        assert place is False  # (the daemon's pass placed the domains itself)
        calls.append("give_back")
        answer = answers.pop(0) if answers else LibvirtError("still refused")
        if answer is not None:
            raise answer
        return ()

    class Conn:
        def getURI(self) -> str:
            return "qemu:///system"

        def listAllDomains(self, _flags: int) -> list[Any]:
            return []

    monkeypatch.setattr(pins, "give_back", give_back)
    monkeypatch.setattr(daemon, "_sync", lambda _m: calls.append("sync"))
    with caplog.at_level(logging.INFO, logger="pinwarden.daemon"):
        daemon.reconcile_once(manager, Conn(), restore=False)
    assert calls == ["sync", "give_back", "sync", "give_back"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    calls.clear()
    with caplog.at_level(logging.INFO, logger="pinwarden.daemon"):
        daemon.reconcile_once(manager, Conn(), restore=False)
    assert calls == ["sync", "give_back", "sync", "give_back"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "still refused"]


def test_a_failing_sync_is_said_once_and_cgroup_events_wake_it_less_and_less_often(
        caplog: pytest.LogCaptureFixture) -> None:
    """A layout the kernel cannot take (a leased CPU offline): the daemon's sync wrote,
    rolled back and logged an ERROR, and its own writes woke the cgroup watch for the next
    try — 15 times in 70 s (systemd-lab hunt).  Then cgroup events woke no pass at all
    while it failed, and a cgroup given every CPU while a pass ran (which made that pass
    fail) was left on the leased CPU for the whole interval (the bookworm story).  Now the
    failure is said once (then at debug level) and its recovery once; while it fails, a
    cgroup event wakes the next pass after a pause that doubles with each failed pass, up
    to the interval."""
    import logging
    import queue
    import threading

    from pinwarden.errors import EnforceError
    from pinwarden.libvirt import daemon

    class Failing:
        def __init__(self) -> None:
            self.left = 3

        def reap(self) -> tuple[()]:
            return ()

        def sync(self) -> None:
            if self.left:
                self.left -= 1
                raise EnforceError("CPU 1 is offline")

    manager = Failing()
    pauses = []
    with caplog.at_level(logging.DEBUG, logger="pinwarden.daemon"):
        for _ in range(4):
            daemon._sync(manager)  # type: ignore[arg-type]
            pauses.append(daemon._FAILING.pause(30.0) if daemon._FAILING.message else None)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("ERROR", "cannot enforce the cgroup layout: CPU 1 is offline (said once; tried "
                  "again at each libvirt event, at cgroup changes less and less often, and "
                  "every interval)"),
        ("DEBUG", "cannot enforce the cgroup layout: CPU 1 is offline"),
        ("DEBUG", "cannot enforce the cgroup layout: CPU 1 is offline"),
        ("INFO", "the cgroup layout is enforced again")], said
    assert pauses == [daemon.FAILING_PAUSE, 2 * daemon.FAILING_PAUSE,
                      4 * daemon.FAILING_PAUSE, None]
    assert (daemon._FAILING.message, daemon._FAILING.passes) == (None, 0)
    assert daemon._Failing(message="x", passes=60).pause(30.0) == 30.0  # up to the interval
    wake: queue.Queue[str] = queue.Queue()
    for what in (daemon._CGROUP, daemon._CGROUP, daemon._EVENT):
        wake.put(what)
    stop = threading.Event()
    assert daemon._past_cgroup_events(wake, stop, 5.0) == daemon._EVENT
    wake.put(daemon._CGROUP)
    began = time.monotonic()
    assert daemon._past_cgroup_events(wake, stop, 0.3) == daemon._CGROUP
    assert 0.25 < time.monotonic() - began < 3


def test_a_cgroup_event_while_the_sync_fails_wakes_the_next_pass_after_a_pause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's loop itself: a pass fails (a cgroup given every CPU while it ran broke
    the holder partition), and the cgroup event that came meanwhile wakes the next pass
    about FAILING_PAUSE later — not at the interval (30 s), when the escape had been open
    all along (the bookworm story)."""
    import queue
    import threading
    from types import SimpleNamespace

    from pinwarden.errors import EnforceError
    from pinwarden.libvirt import daemon

    monkeypatch.setattr(daemon, "_FAILING", daemon._Failing())
    wake: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    passes: list[float] = []

    class Manager:
        left = 1

        def reap(self) -> tuple[()]:
            return ()

        def sync(self) -> None:
            if self.left:
                self.left -= 1
                raise EnforceError("a holder partition is invalid")

    def reconcile_once(manager: Manager, conn: object, *, restore: bool,
                       seen: set[str]) -> int:
        passes.append(time.monotonic())
        daemon._sync(manager)  # type: ignore[arg-type]
        if len(passes) == 1:
            wake.put(daemon._CGROUP)  # the late cgroup's write, during the pass
        else:
            stop.set()
            wake.put(daemon._EVENT)
        return 0

    class Conn:
        def registerCloseCallback(self, *args: object) -> None: ...
        def setKeepAlive(self, *args: object) -> None: ...
        def domainEventRegisterAny(self, *args: object) -> int: return 1
        def domainEventDeregisterAny(self, *args: object) -> None: ...
        def isAlive(self) -> bool: return True

    monkeypatch.setattr(daemon, "reconcile_once", reconcile_once)
    b = SimpleNamespace(VIR_DOMAIN_EVENT_ID_LIFECYCLE=0, VIR_DOMAIN_EVENT_ID_TUNABLE=1)
    loop = threading.Thread(target=daemon._serve, args=(Manager(), "qemu:///system", Conn(),
                                                        b, wake, stop),
                            kwargs={"interval": 30.0, "restore": False}, daemon=True)
    loop.start()
    loop.join(15.0)
    stop.set()
    wake.put(daemon._EVENT)
    assert len(passes) == 2, passes
    assert daemon.FAILING_PAUSE * 0.9 <= passes[1] - passes[0] < 5.0, passes
    assert daemon._FAILING.message is None


def test_without_libvirt_a_failing_sync_is_tried_again_after_the_pause_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While libvirt is away the daemon still answers cgroup events; a failing sync is tried
    again there after the same pause, not at once for each event its own writes made."""
    import queue
    import threading

    from pinwarden.libvirt import daemon

    monkeypatch.setattr(daemon, "_FAILING", daemon._Failing(message="broken", passes=1))
    syncs: list[float] = []
    monkeypatch.setattr(daemon, "_sync", lambda manager: syncs.append(time.monotonic()))
    wake: queue.Queue[str] = queue.Queue()
    for _ in range(3):  # one pass's own writes: a burst of events
        wake.put(daemon._CGROUP)
    began = time.monotonic()
    daemon._wait_without_libvirt(object(), wake, threading.Event(),  # type: ignore[arg-type]
                                 daemon.FAILING_PAUSE + 1.0)
    assert len(syncs) == 1, syncs
    assert syncs[0] - began >= daemon.FAILING_PAUSE * 0.9, (syncs, began)


def test_without_libvirt_each_wait_without_events_ends_in_a_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While libvirt is away nothing else wakes the daemon on a cgroup v1 host: each wait
    between two connection attempts ends in a pass, which frees the holders that died
    meanwhile (the real thing: test_run_host's daemon test); one that a cgroup event's
    pass already ran does not run another, and a stop runs none."""
    import queue
    import threading

    from pinwarden.libvirt import daemon

    syncs: list[float] = []
    monkeypatch.setattr(daemon, "_sync", lambda manager: syncs.append(time.monotonic()))
    wake: queue.Queue[str] = queue.Queue()
    began = time.monotonic()
    daemon._wait_without_libvirt(object(), wake, threading.Event(), 0.3)  # type: ignore[arg-type]
    assert len(syncs) == 1 and syncs[0] - began >= 0.3, (syncs, began)
    wake.put(daemon._CGROUP)
    daemon._wait_without_libvirt(object(), wake, threading.Event(), 0.3)  # type: ignore[arg-type]
    assert len(syncs) == 2, syncs
    stop = threading.Event()
    stop.set()
    daemon._wait_without_libvirt(object(), wake, stop, 0.3)  # type: ignore[arg-type]
    assert len(syncs) == 2, syncs


def test_libvirt_failing_between_two_calls_is_an_error_not_a_bug(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """libvirtd gone between the lookup and the next call of 'pinwarden start' raised a
    libvirtError no call site put words to: 'internal error … (a bug)', exit 70 (seen for
    real when libvirtd was killed mid-start, lifecycle hunt).  It is libvirt's failure: one
    line, exit 1, nothing recorded."""
    import libvirt

    from pinwarden.cli import EXIT_ERROR, main
    from pinwarden.libvirt import start as start_mod

    class Gone:
        def isActive(self) -> bool:
            raise libvirt.libvirtError("Cannot write data: Broken pipe")

    class Conn:
        def close(self) -> None:
            pass

        def getURI(self) -> str:
            return "qemu:///system"

    monkeypatch.setattr(start_mod.lv, "open_connection", lambda uri: Conn())
    monkeypatch.setattr(start_mod.lv, "lookup", lambda conn, name: Gone())
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nmode = "none"\n')
    rc = main(["start", "--no-daemon", "pwtest-gone", "--state-dir", str(tmp_path / "state"),
               "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR, err
    assert err == "pinwarden: error: libvirt failed: Cannot write data: Broken pipe (is " \
        "libvirtd running? try again once it is)\n", err
    assert not (tmp_path / "state" / "leases.db").exists()


def test_one_daemon_per_state_directory(tmp_path: Path) -> None:
    """A second ``pinwarden daemon`` for the same state directory (by hand, beside the
    service) ran on beside the first, reconciling every event twice: refused now, naming
    the first's pid, while it runs — and taken at once after it ended, even killed.
    ``status`` says which daemon runs."""
    from pinwarden import daemonlock

    example = Path(__file__).resolve().parents[1] / "src/pinwarden/data/example-host"
    state = tmp_path / "state"
    assert daemonlock.running(state) is None
    with daemonlock.one_daemon(state):
        ns = os.stat("/proc/self/ns/pid").st_ino
        assert (state / daemonlock.DAEMON_LOCK).read_text() == f"{os.getpid()} {ns}\n"
        assert daemonlock.running(state) == os.getpid()
        refused = (rf"another pinwarden daemon \(pid {os.getpid()}\) already runs for "
                   rf"{state}: stop it first, or run 'pinwarden daemon --once' for one pass "
                   r"beside it")
        with pytest.raises(Refusal, match=refused), daemonlock.one_daemon(state):
            pytest.fail("a second daemon ran")
    assert (state / daemonlock.DAEMON_LOCK).read_text() == ""
    assert daemonlock.running(state) is None
    code = ("import sys, time\nfrom pathlib import Path\nfrom pinwarden import daemonlock\n"
            "with daemonlock.one_daemon(Path(sys.argv[1])):\n"
            "    print('in', flush=True); time.sleep(300)\n")
    held = subprocess.Popen([sys.executable, "-c", code, str(state)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert held.stdout is not None and held.stdout.readline() == "in\n"
        with pytest.raises(Refusal, match=rf"\(pid {held.pid}\)"), \
                daemonlock.one_daemon(state):
            pass
        # a read-only state directory: the lock is taken all the same (hunt N)
        real_open = os.open

        def read_only(path: Any, flags: int, *rest: Any) -> int:
            if flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system")
            return real_open(path, flags, *rest)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(daemonlock.os, "open", read_only)
            with pytest.raises(Refusal, match=rf"\(pid {held.pid}\)"), \
                    daemonlock.one_daemon(state):
                pass
        status = subprocess.run(
            [sys.executable, "-c", "from pinwarden.cli import entry; entry()", "status",
             "--root", str(example), "--state-dir", str(state)],
            capture_output=True, text=True, timeout=120)
        assert f"\ndaemon: pid {held.pid}\n" in status.stdout, status
        # seen from a PID namespace of its own (a container's /proc), its pid is another
        # process's, or none: status said "daemon: pid 1" of one in a container (hunt)
        inside = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
             "from pinwarden.cli import entry; entry()", "status", "--root", str(example),
             "--state-dir", str(state)], capture_output=True, text=True, timeout=120)
        assert "\ndaemon: running\n" in inside.stdout, inside
    finally:
        held.kill()
        held.wait()
    with daemonlock.one_daemon(state):  # a killed daemon's lock went with it
        pass
