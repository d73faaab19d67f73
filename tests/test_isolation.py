"""Issue #11 part 2: host noise off leased CPUs and back (pinwarden.isolation, pure) and its
adapter pinwarden.noise on fake /proc and /sys trees.  The real kernel: the lab's
``noise_isolate_restore`` check (tests/test_lab_v2.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinwarden.cpuset import CpuSet
from pinwarden.isolation import (
    IRQ_DEFAULT,
    PF_KTHREAD,
    PF_NO_SETAFFINITY,
    WORKQUEUE,
    HostTask,
    IrqInfo,
    KthreadInfo,
    NoiseSnapshot,
    Plan,
    Record,
    TaskInfo,
    Write,
    forked,
    inherited,
    kernel_cmdline,
    plan_isolation,
    plan_keep_home,
    plan_kthreads_home,
    plan_restore,
    unmovable,
    with_refusals,
)
from pinwarden.noise import (
    apply,
    read_host_threads,
    read_isolated,
    read_kthreads,
    read_noise,
    read_tasks,
    refused,
    threads_of,
)
from pinwarden.record import replace

L = CpuSet.parse_kernel
ALL = L("0-7")


# -- fake trees ---------------------------------------------------------------------------

def stat_line(pid: int, comm: str, flags: int, start: int) -> str:
    # fields 3.. : state ppid pgrp session tty tpgid flags(9) ... starttime(22) ... cpu(39)
    rest = ["S", "2", "0", "0", "0", "-1", str(flags)] + ["0"] * 12 + [str(start)] + \
        ["0"] * 16 + ["3"] + ["0"] * 13
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


def make_tree(root: Path) -> Path:
    irq = root / "proc/irq"
    for n, aff, eff, actions in ((0, "0", "0", ["timer"]), (4, "0-7", "0", ["ttyS0"]),
                                 (24, "0-7", "5", ["virtio0-config"]),
                                 (25, "2-3", "2", ["virtio1-req.0"]), (9, "0-7", None, [])):
        d = irq / str(n)
        d.mkdir(parents=True)
        (d / "smp_affinity_list").write_text(aff + "\n")
        if eff is not None:
            (d / "effective_affinity_list").write_text(eff + "\n")
        for a in actions:
            (d / a).mkdir()
    (irq / "default_smp_affinity").write_text("ff\n")
    wq = root / "sys/devices/virtual/workqueue"
    wq.mkdir(parents=True)
    (wq / "cpumask").write_text("ff\n")
    cpu = root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text("0-7\n")
    (cpu / "isolated").write_text("6-7\n")
    (cpu / "nohz_full").write_text("(null)\n")
    for pid, comm, flags, aff in (
            (2, "kthreadd", PF_KTHREAD, "0-7"),
            (14, "rcu_preempt", PF_KTHREAD, "0-7"),
            (20, "ksoftirqd/3", PF_KTHREAD | PF_NO_SETAFFINITY, "3"),
            (30, "kworker/u16:1", PF_KTHREAD | PF_NO_SETAFFINITY, "0-7"),
            (40, "irq/25-virtio1", PF_KTHREAD, "2-3"),
            (41, "rcuop/2", PF_KTHREAD, "0-7"),
            (50, "pinned-by-driver", PF_KTHREAD, "2"),
            (100, "bash", 0x400000, "0-7")):
        d = root / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "stat").write_text(stat_line(pid, comm, flags, 1000 + pid))
        (d / "status").write_text(f"Name:\t{comm}\nCpus_allowed_list:\t{aff}\n")
    return root


def test_read_noise_reads_every_source(tmp_path: Path) -> None:
    snap = read_noise(make_tree(tmp_path))
    assert snap.online == ALL and snap.isolated == L("6-7")
    assert snap.nohz_full == L("")  # "(null)" when nohz_full= is not set
    assert [i.irq for i in snap.irqs] == [0, 4, 9, 24, 25]
    irq24 = next(i for i in snap.irqs if i.irq == 24)
    assert irq24.effective == L("5") and irq24.actions == ("virtio0-config",)
    assert snap.default_affinity == ALL and snap.workqueue == ALL
    assert snap.rcu_nocbs == L("2")
    movable = sorted(k.comm for k in snap.kthreads if k.movable)
    # per-CPU, unbound kworkers (follow the wq mask), IRQ threads, single-CPU: never moved
    assert movable == ["kthreadd", "rcu_preempt", "rcuop/2"]
    assert "bash" not in [k.comm for k in snap.kthreads]


def test_read_noise_reads_this_hosts_kernel_as_the_kernel_says() -> None:
    """The real /proc against what the kernel says by other means: the kernel threads are
    kthreadd and its children (``/proc/2/task/2/children``), each thread's CPUs those
    ``sched_getaffinity`` gives (every CPU being online here), the IRQs those with an
    affinity file.  Threads come and go (kworkers): a few reads to see one quiet moment."""
    children = Path("/proc/2/task/2/children")
    if not children.exists():
        pytest.fail("this test needs CONFIG_PROC_CHILDREN and the host's pid namespace "
                    "(every machine pinwarden is tested on has them)")
    online = CpuSet.parse_kernel(Path("/sys/devices/system/cpu/online").read_text())
    assert online == CpuSet.parse_kernel(
        Path("/sys/devices/system/cpu/possible").read_text()), "a CPU is offline"
    for _ in range(5):
        snap = read_noise(Path("/"))
        kthreads = {2, *map(int, children.read_text().split())}
        ours = {k.pid for k in snap.kthreads}
        theirs = {}
        for pid in sorted(ours):
            try:
                theirs[pid] = CpuSet.of(os.sched_getaffinity(pid))
            except OSError:
                break  # exited meanwhile: look again
        else:
            if ours == kthreads and {k.pid: k.affinity for k in snap.kthreads} == theirs:
                break
    else:
        pytest.fail(f"kernel threads differ: {sorted(ours ^ kthreads)}")
    assert [i.irq for i in snap.irqs] == sorted(
        int(n) for n in os.listdir("/proc/irq")
        if n.isdigit() and Path(f"/proc/irq/{n}/smp_affinity_list").exists())
    assert snap.online == online


def test_the_workqueue_mask_asked_for_is_the_one_recorded(tmp_path: Path) -> None:
    """Linux 6.7+ shows in ``cpumask`` the mask asked for less the CPUs of isolated
    partitions, and keeps the mask asked for in ``cpumask_requested``.  Recorded from
    ``cpumask`` while an exclusive VM was an isolated partition (CPU 1 out), a job's lease
    put back the narrowed mask, which the kernel then kept when the partition went (CPU 1
    out of the unbound workqueues for good: systemd-lab hunt).  The mask asked for is
    recorded and put back."""
    root = make_tree(tmp_path)
    wq = root / "sys/devices/virtual/workqueue"
    (wq / "cpumask_requested").write_text("000000ff\n")
    (wq / "cpumask").write_text("000000fd\n")  # CPU 1 in an isolated partition
    before = read_noise(root)
    assert before.workqueue == ALL
    plan = plan_isolation(before, L("2"), L("0"), {})
    (record,) = [r for r in plan.records if r.key == "workqueue"]
    assert record.original == ALL, record
    # without the file (Linux < 6.7), cpumask is the mask asked for
    (wq / "cpumask_requested").unlink()
    assert read_noise(root).workqueue == L("0,2-7")


def test_plan_apply_restore_on_a_fake_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    before = read_noise(root)
    plan = plan_isolation(before, L("2-3"), L("0-1"), {})
    by = {w.key: w.value for w in plan.writes}
    assert by["irq:4"] == L("0-1,4-7") and by[IRQ_DEFAULT] == L("0-1,4-7")
    assert by["irq:25"] == L("0-1")  # entirely leased → housekeeping
    assert "irq:0" not in by  # already off the leased CPUs
    moved: dict[int, list[int]] = {}
    outcomes = apply(root, plan.writes, set_affinity=lambda pid, cpus: moved.update(
        {pid: sorted(cpus)}))
    assert all(o.ok for o in outcomes), outcomes
    assert (root / "proc/irq/4/smp_affinity_list").read_text() == "0-1,4-7\n"
    assert (root / "proc/irq/default_smp_affinity").read_text() == "000000f3\n"
    assert (root / "sys/devices/virtual/workqueue/cpumask").read_text() == "000000f3\n"
    assert moved == {2: [0, 1, 4, 5, 6, 7], 14: [0, 1, 4, 5, 6, 7], 41: [0, 1, 4, 5, 6, 7]}
    # restore (the fake thread status does not follow sched_setaffinity: the snapshot
    # still shows the original, which restore leaves alone)
    back = plan_restore(read_noise(root), plan.records, L(""), L("0-1"))
    apply(root, back.writes, set_affinity=lambda pid, cpus: None)
    assert (root / "proc/irq/4/smp_affinity_list").read_text() == "0-7\n"
    assert (root / "proc/irq/25/smp_affinity_list").read_text() == "2-3\n"
    assert CpuSet.from_mask((root / "proc/irq/default_smp_affinity").read_text()) == ALL
    assert set(back.forget) == {r.key for r in plan.records} and back.keep == ()


def test_refused_irq_is_an_outcome_and_then_unmovable(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    snap = read_noise(root)
    target = root / "proc/irq/25/smp_affinity_list"
    target.unlink()
    target.mkdir()  # opening it for writing fails (EISDIR) like the kernel's EIO would
    outcomes = apply(root, [Write("irq:4", L("0-1")), Write("kthread:999:1", L("0")),
                            Write("bogus", L("0"))], set_affinity=lambda p, c: None)
    assert [o.ok for o in outcomes] == [True, False, False]
    assert outcomes[1].errno == errno.ESRCH
    eio = [o for o in apply(root, [Write("irq:25", L("0"))])]
    assert not eio[0].ok and eio[0].errno == errno.EISDIR
    marked = with_refusals(snap, {"irq:24"})
    assert next(i for i in marked.irqs if i.irq == 24).writable is False
    assert "irq:24" not in marked.values()
    assert refused([*outcomes]) == {"bogus"}  # EINVAL; ESRCH is not "for good"
    plan = plan_isolation(snap, L("2-3"), L("0-1"), {})
    failed = {o.key for o in apply(root, plan.writes, set_affinity=lambda p, c: None)
              if not o.ok}  # EISDIR here; the kernel says EIO (noise.refused)
    assert failed == {"irq:25"}
    assert "irq:25" in {r.key for r in plan.records}
    assert "irq:25" not in {r.key for r in plan.settled(failed)}


def test_unmovable_names_the_boot_parameters() -> None:
    snap = NoiseSnapshot(online=ALL, irqs=(IrqInfo(30, L("2"), L("2"), ("nvme0q1",), False),),
                         kthreads=(KthreadInfo(20, 1, "ksoftirqd/2",
                                               PF_KTHREAD | PF_NO_SETAFFINITY, L("2")),),
                         nohz_full=L("3"), rcu_nocbs=L("3"), isolated=L("6-7"))
    found = {f.kind: f for f in unmovable(snap, L("2-3"))}
    assert found["irq"].boot_param == "isolcpus=managed_irq,domain,2-3"
    assert found["irq"].cpus == L("2") and "nvme0q1" in found["irq"].what
    assert found["tick"].cpus == L("2") and found["tick"].boot_param == "nohz_full=2-3"
    assert found["rcu"].boot_param == "rcu_nocbs=2-3"
    assert found["kthreads"].cpus == L("2") and "ksoftirqd/2" in found["kthreads"].what
    assert found["new-kthreads"].boot_param == "nohz_full=2-3"
    assert found["scheduler"].boot_param == "isolcpus=domain,2-3"
    assert unmovable(snap, L("")) == []
    # CPUs an isolated partition keeps off load balancing are not named
    assert {f.kind: f.cpus for f in unmovable(snap, L("2-3"), L("3"))}["scheduler"] == L("2")
    assert "scheduler" not in {f.kind for f in unmovable(snap, L("2-3"), L("2-3"))}


def test_kernel_cmdline() -> None:
    assert kernel_cmdline(L("2-7"), L("0-1")) == (
        "isolcpus=managed_irq,domain,2-7 nohz_full=2-7 rcu_nocbs=2-7 irqaffinity=0-1")
    with pytest.raises(ValueError, match="both"):
        kernel_cmdline(L("1-7"), L("0-1"))
    with pytest.raises(ValueError):
        kernel_cmdline(L("1-7"), L(""))


def test_record_json_round_trip() -> None:
    rec = Record("kthread:14:1014", L("0-7"), L("0-1,4-7"))
    assert Record.from_json(rec.to_json()) == rec


# -- partial releases, crashes, someone else's changes --------------------------------------

def snap_with(values: dict[str, CpuSet]) -> NoiseSnapshot:
    irqs = tuple(IrqInfo(int(k[4:]), v) for k, v in values.items() if k.startswith("irq:"))
    return NoiseSnapshot(online=ALL, irqs=irqs, default_affinity=values.get(IRQ_DEFAULT),
                         workqueue=values.get(WORKQUEUE))


def applied(snap: dict[str, CpuSet], writes: tuple[Write, ...]) -> dict[str, CpuSet]:
    out = dict(snap)
    out.update({w.key: w.value for w in writes})
    return out


def test_second_lease_keeps_the_first_original_and_partial_release() -> None:
    vals = {"irq:4": ALL, WORKQUEUE: ALL}
    p1 = plan_isolation(snap_with(vals), L("2"), L("0"), {})
    vals = applied(vals, p1.writes)
    rec = {r.key: r for r in p1.records}
    p2 = plan_isolation(snap_with(vals), L("2-3"), L("0"), rec)
    assert {r.original for r in p2.records} == {ALL}  # never the already-changed value
    vals = applied(vals, p2.writes)
    rec.update({r.key: r for r in p2.records})
    # the first lease ends, CPU 3 still leased: 2 comes back, 3 does not
    r1 = plan_restore(snap_with(vals), rec, L("3"))
    vals = applied(vals, r1.writes)
    assert vals["irq:4"] == L("0-2,4-7") and r1.forget == ()
    rec = {r.key: r for r in r1.keep}
    r2 = plan_restore(snap_with(vals), rec, L(""))
    assert applied(vals, r2.writes) == {"irq:4": ALL, WORKQUEUE: ALL}
    assert set(r2.forget) == {"irq:4", WORKQUEUE} and r2.keep == ()


def test_a_cpu_offline_at_the_restore_is_given_back_once_it_is_online() -> None:
    """The last lease ends while a CPU of an original is offline: the kernel cannot keep
    that CPU in the value (an IRQ pinned to it gets its default, a thread its cpuset's
    CPUs), and the record went with the write — the CPU never came back (v2-lab hunt).
    The online CPUs are written, and the record stays until a sync finds it online."""
    rec = {"irq:3": Record("irq:3", L("5"), L("0-3")),  # an IRQ the admin pinned to 5
           "irq:4": Record("irq:4", ALL, L("0-3,6-7"))}
    now = {"irq:3": L("0-3"), "irq:4": L("0-3,6-7")}
    offline = replace(snap_with(now), online=L("0-4,6-7"))
    r1 = plan_restore(offline, rec, L(""))
    assert r1.writes == (Write("irq:4", L("0-4,6-7")),) and r1.forget == ()
    assert {r.key: r for r in r1.keep} == {"irq:3": Record("irq:3", L("5"), L("0-3")),
                                          "irq:4": Record("irq:4", ALL, L("0-4,6-7"))}
    now = applied(now, r1.writes)
    r2 = plan_restore(snap_with(now), {r.key: r for r in r1.keep}, L(""))  # 5 is back
    assert applied(now, r2.writes) == {"irq:3": L("5"), "irq:4": ALL}
    assert set(r2.forget) == {"irq:3", "irq:4"} and r2.keep == ()


def test_value_changed_by_someone_else_is_left_alone() -> None:
    rec = {"irq:4": Record("irq:4", ALL, L("0-1,4-7"))}
    r = plan_restore(snap_with({"irq:4": L("5")}), rec, L(""))
    assert r.writes == () and r.conflicts == ("irq:4",) and r.forget == ("irq:4",)


def test_crash_before_the_write_restores_nothing() -> None:
    # the record was stored, the write never happened: current == original
    rec = {"irq:4": Record("irq:4", ALL, L("0-1,4-7"))}
    r = plan_restore(snap_with({"irq:4": ALL}), rec, L(""))
    assert r.writes == () and r.forget == ("irq:4",)


def test_gone_sources_are_forgotten() -> None:
    rec = {"irq:99": Record("irq:99", ALL, L("0")),
           "kthread:5:7": Record("kthread:5:7", ALL, L("0")),
           "task:40:9": Record("task:40:9", ALL, L("0"))}
    kthreadd = KthreadInfo(2, 30, "kthreadd", PF_KTHREAD, ALL)  # (kernel threads in view)
    r = plan_restore(replace(snap_with({}), kthreads=(kthreadd,)), rec, L(""))
    assert r.writes == () and set(r.forget) == set(rec) and r.keep == ()


def test_threads_out_of_view_are_kept() -> None:
    # a PID namespace of its own (a container's /proc) shows no kernel thread at all: the
    # threads recorded from the host's are not gone, and a pinwarden there forgot them
    # (the host's kernel threads stayed on CPU 0 after the last release: hunt)
    rec = {"irq:99": Record("irq:99", ALL, L("0")),
           "kthread:5:7": Record("kthread:5:7", ALL, L("0")),
           "task:40:9": Record("task:40:9", ALL, L("0"))}
    r = plan_restore(replace(snap_with({}), threads_in_view=False), rec, L(""))
    assert r.writes == () and r.forget == ("irq:99",)
    assert {k.key for k in r.keep} == {"kthread:5:7", "task:40:9"}
    assert all(k == rec[k.key] for k in r.keep)  # kept as recorded
    # a snapshot of some user threads alone (those kept off an unguarded lease) has no
    # kernel thread either, and is in view: a record of one gone is forgotten (kept, it
    # held the host record of a mode-auto lease past its end: systemd lab, isolcpus)
    tasks = NoiseSnapshot(ALL, tasks=())
    r = plan_restore(tasks, {"task:40:9": rec["task:40:9"]}, L(""))
    assert r.forget == ("task:40:9",) and r.keep == ()


def test_original_entirely_still_leased_gets_housekeeping() -> None:
    rec = {"irq:25": Record("irq:25", L("2-3"), L("0-1"))}
    r = plan_restore(snap_with({"irq:25": L("0-1")}), rec, L("2-3"), L("0-1"))
    assert r.writes == ()  # already on housekeeping
    assert r.keep == (Record("irq:25", L("2-3"), L("0-1")),)
    r = plan_restore(snap_with({"irq:25": L("0-1")}), rec, L("3"), L("0-1"))
    assert r.writes == (Write("irq:25", L("2")),)


def test_nothing_outside_leased_is_stuck() -> None:
    p = plan_isolation(snap_with({"irq:4": L("0-1")}), L("0-7"), L(""), {})
    assert p.writes == () and p.stuck == ("irq:4",)


# -- properties ---------------------------------------------------------------------------

cpu_sets = st.frozensets(st.integers(0, 7), min_size=1).map(CpuSet.of)
keys = st.sampled_from(["irq:1", "irq:2", "irq:30", IRQ_DEFAULT, WORKQUEUE])


@settings(max_examples=300)
@given(st.dictionaries(keys, cpu_sets, min_size=1), cpu_sets, cpu_sets)
def test_plan_then_restore_is_the_original(values: dict[str, CpuSet], leased: CpuSet,
                                           hk: CpuSet) -> None:
    hk = hk - leased
    snap = snap_with(values)
    plan = plan_isolation(snap, leased, hk, {})
    after = applied(values, plan.writes)
    for w in plan.writes:  # never a leased CPU in a planned value, never empty
        assert w.value and w.value.isdisjoint(leased)
    if plan.stuck:  # only when nothing outside the leased CPUs is online
        assert leased == ALL
    # idempotent: planning again on the result writes nothing
    rec = {r.key: r for r in plan.records}
    assert plan_isolation(snap_with(after), leased, hk, rec).writes == ()
    restore = plan_restore(snap_with(after), rec, CpuSet(), hk)
    assert applied(after, restore.writes) == values
    assert set(restore.forget) == set(rec) and restore.keep == ()


@settings(max_examples=300)
@given(st.dictionaries(keys, cpu_sets, min_size=1), cpu_sets, cpu_sets, cpu_sets)
def test_two_leases_released_in_any_order_give_the_original_back(
        values: dict[str, CpuSet], a: CpuSet, b: CpuSet, hk: CpuSet) -> None:
    hk = hk - a - b
    cur = dict(values)
    rec: dict[str, Record] = {}
    for leased in (a, a | b):
        plan = plan_isolation(snap_with(cur), leased, hk, rec)
        cur = applied(cur, plan.writes)
        rec.update({r.key: r for r in plan.records})
        assert all(v.isdisjoint(leased) for k, v in cur.items() if k not in plan.stuck)
    r1 = plan_restore(snap_with(cur), rec, b, hk)  # a released first
    cur = applied(cur, r1.writes)
    for w in r1.writes:  # never hands back a CPU still leased
        assert w.value.isdisjoint(b)
    rec = {r.key: r for r in r1.keep}
    r2 = plan_restore(snap_with(cur), rec, CpuSet(), hk)
    assert applied(cur, r2.writes) == values


def test_a_thread_narrowed_to_the_one_housekeeping_cpu_goes_back() -> None:
    """On a host with one housekeeping CPU pinwarden moves a kernel thread to that CPU
    alone, which makes it look per-CPU; its recorded original still comes back (the
    2-CPU test host lost kthreadd's 0-1 this way)."""
    thread = KthreadInfo(2, 30, "kthreadd", PF_KTHREAD, L("0-1"))
    snap = NoiseSnapshot(online=L("0-1"), kthreads=(thread,))
    plan = plan_isolation(snap, L("1"), L("0"), {})
    assert plan.writes == (Write(thread.key, L("0")),)
    moved = NoiseSnapshot(online=L("0-1"),
                          kthreads=(KthreadInfo(2, 30, "kthreadd", PF_KTHREAD, L("0")),))
    assert not moved.kthreads[0].movable  # one CPU: would never be moved now
    restore = plan_restore(moved, {r.key: r for r in plan.records}, CpuSet(), L("0"))
    assert restore.writes == (Write(thread.key, L("0-1")),)
    assert restore.forget == (thread.key,)
    bound = NoiseSnapshot(online=L("0-1"), kthreads=(
        KthreadInfo(2, 30, "kthreadd", PF_KTHREAD | PF_NO_SETAFFINITY, L("0")),))
    assert plan_restore(bound, {r.key: r for r in plan.records}, CpuSet(), L("0")).writes \
        == ()  # bound meanwhile: not pinwarden's to write


def test_user_threads_are_moved_and_put_back_like_kernel_threads() -> None:
    """``task:TID:START`` keys (user threads the manager moves off CPUs the kernel cannot
    guard): narrowed to what they had minus the leased CPUs, back exactly afterwards, and
    left alone when someone else set them meanwhile."""
    libvirtd = TaskInfo(1974, 500, "vm-pwtest-ix", L("0-3"))
    pinned = TaskInfo(2384, 900, "bench", L("3"))  # only the leased CPU: the housekeeping
    snap = NoiseSnapshot(online=L("0-3"), tasks=(libvirtd, pinned))
    plan = plan_isolation(snap, L("3"), L("0"), {})
    assert plan.writes == (Write("task:1974:500", L("0-2")), Write("task:2384:900", L("0")))
    records = {r.key: r for r in plan.records}
    assert records["task:1974:500"].original == L("0-3")
    moved = NoiseSnapshot(online=L("0-3"), tasks=(
        TaskInfo(1974, 500, "vm-pwtest-ix", L("0-2")), TaskInfo(2384, 900, "bench", L("1"))))
    back = plan_restore(moved, records, CpuSet(), L("0"))
    assert back.writes == (Write("task:1974:500", L("0-3")),)  # 2384 was changed meanwhile
    assert back.conflicts == ("task:2384:900",)
    assert set(back.forget) == {"task:1974:500", "task:2384:900"} and back.keep == ()


def test_threads_a_moved_process_started_meanwhile_go_back_with_it() -> None:
    """A new thread gets its creator's affinity: libvirtd's workers started while its
    threads were narrowed are narrowed too, and go back with their process — only a
    thread of that process, holding exactly what pinwarden wrote, unrecorded itself."""
    records = {"task:1974:500": Record("task:1974:500", L("0-3"), L("0-2")),
               "task:1975:501": Record("task:1975:501", L("0-3"), L("0-2"))}
    tasks = (TaskInfo(1974, 500, "libvirtd", L("0-2"), 1974),
             TaskInfo(1975, 501, "rpc-worker", L("0-2"), 1974),
             TaskInfo(2001, 900, "rpc-worker", L("0-2"), 1974),  # started meanwhile
             TaskInfo(2002, 901, "prio-rpc", L("0"), 1974),  # set by libvirtd itself
             TaskInfo(3000, 950, "bash", L("0-2"), 3000))  # another process
    extra = inherited(tasks, records)
    assert extra == {"task:2001:900": Record("task:2001:900", L("0-3"), L("0-2"))}
    back = plan_restore(NoiseSnapshot(online=L("0-3"), tasks=tasks), {**records, **extra},
                        CpuSet(), L("0"))
    assert {w.key for w in back.writes} == {"task:1974:500", "task:1975:501",
                                           "task:2001:900"}
    assert all(w.value == L("0-3") for w in back.writes)
    # siblings moved from different originals to one value: nothing says which it had
    split = {**records, "task:1975:501": Record("task:1975:501", L("0-2,4"), L("0-2"))}
    assert inherited(tasks, split) == {}


def test_processes_started_while_threads_were_moved_go_back_with_them() -> None:
    """A service PID 1 restarts during the lease (journald, libvirtd) inherits PID 1's
    narrowed affinity in a process of its own: it stayed off the freed CPUs for good after
    the lease (systemd-lab hunt).  A thread started since the first move (``since``, clock
    ticks) holding exactly a value pinwarden wrote, one original behind it, gets that
    original back; older threads, other values and ambiguous ones are left alone."""
    records = {"task:1:5": Record("task:1:5", L("0-2"), L("0-1")),
               "task:700:90": Record("task:700:90", L("0-2"), L("0-1"))}
    tasks = (TaskInfo(1, 5, "systemd", L("0-1"), 1),
             TaskInfo(4100, 2000, "systemd-journal", L("0-1"), 4100),  # restarted
             TaskInfo(4200, 2100, "sleep", L("0"), 4200),  # asked for CPU 0 itself
             TaskInfo(800, 120, "cron", L("0-1"), 800))  # older than the first move
    extra = forked(tasks, records, since=1500)
    assert extra == {"task:4100:2000": Record("task:4100:2000", L("0-2"), L("0-1"))}
    back = plan_restore(NoiseSnapshot(online=L("0-3"), tasks=tasks), {**records, **extra},
                        CpuSet(), L("0"))
    assert {w.key: w.value for w in back.writes} == {
        "task:1:5": L("0-2"), "task:4100:2000": L("0-2")}
    # two originals behind one written value: nothing says which it had
    split = {**records, "task:700:90": Record("task:700:90", L("0-3"), L("0-1"))}
    assert forked(tasks, split, since=1500) == {}


def test_user_threads_are_read_and_set_on_this_host() -> None:
    """``noise.read_tasks`` and ``noise.apply`` on a real thread of our own: its affinity is
    read from ``/proc/TID``, set by sched_setaffinity, and a stale start time (a reused
    thread id) is never written."""
    online = os.sched_getaffinity(0)
    if len(online) < 2:
        pytest.fail("needs at least 2 CPUs")
    child = subprocess.Popen(["sleep", "60"])
    try:
        (task,) = read_tasks(Path("/"), [child.pid])
        assert task.affinity == CpuSet.of(online) and task.comm == "sleep"
        assert task.tgid == child.pid and threads_of(Path("/"), [child.pid]) == {child.pid}
        ours = threads_of(Path("/"), [os.getpid()])
        assert os.getpid() in ours and threading.get_native_id() in ours
        one = CpuSet.of([min(online)])
        (done,) = apply(Path("/"), [Write(task.key, one)])
        assert done.ok and done.after == one.to_list()
        assert os.sched_getaffinity(child.pid) == set(one)
        stale = f"task:{child.pid}:{task.start_time + 1}"
        (refused_write,) = apply(Path("/"), [Write(stale, CpuSet.of(online))])
        assert not refused_write.ok and refused_write.errno == errno.ESRCH
        assert os.sched_getaffinity(child.pid) == set(one)
        assert read_tasks(Path("/"), [os.getpid() + 10**7]) == ()  # no such thread
    finally:
        child.kill()
        child.wait()


# -- the host's own threads across a partition change (plan_keep_home) -------------------

def host_task(tid: int, cpus: str, cgroup: str, start: int = 100) -> HostTask:
    return HostTask(TaskInfo(tid, start, f"t{tid}", L(cpus), tid), L(cgroup))


def test_threads_the_kernel_gave_isolated_cpus_lose_them_again() -> None:
    """isolcpus=3 on 0-3: PID 1 and the services it started are on 0-2 (the kernel's
    placement at boot, inherited).  A partition taking CPU 1 makes the kernel give every
    task of init.scope its cgroup's CPUs, 0,2-3; the one that came back gives 0-3.  Each
    time the isolated CPU goes away again, and what the partition took or gave back
    stays as the kernel made it.  Once put back by pinwarden, a thread's mask counts as
    its own, and the kernel keeps it narrowed when the partition goes: it is widened to its
    cgroup's CPUs less the isolated ones."""
    iso = L("3")
    lease = plan_keep_home([host_task(1, "0-2", "0-3")], [host_task(1, "0,2-3", "0,2-3")], iso)
    assert lease == (Write("task:1:100", L("0,2")),)
    back = plan_keep_home([host_task(1, "0,2", "0,2-3")], [host_task(1, "0-3", "0-3")], iso)
    assert back == (Write("task:1:100", L("0-2")),)
    kept = plan_keep_home([host_task(1, "0,2", "0,2-3")], [host_task(1, "0,2", "0-3")], iso)
    assert kept == (Write("task:1:100", L("0-2")),)
    # a mask set at boot names offline CPUs too: compared within the cgroup's CPUs
    offline = plan_keep_home([host_task(1, "0-2,4-7", "0-3")],
                             [host_task(1, "0,2-3", "0,2-3")], iso)
    assert offline == (Write("task:1:100", L("0,2")),)
    assert plan_keep_home([host_task(1, "0-2,4-7", "0-3")], [host_task(1, "0-2,4-7", "0-3")],
                          iso) == ()  # right already


def test_threads_placed_by_someone_are_left_as_the_kernel_made_them() -> None:
    """Threads that were not simply their cgroup's CPUs less the isolated ones, threads
    not seen before, reused ids, threads already right and threads that would be left
    without a CPU are not written."""
    iso = L("3")
    before = [host_task(10, "2", "0-3"),        # pinned by its user
              host_task(11, "2-3", "0-3"),      # on the isolated CPU on purpose
              host_task(12, "0-2", "0-3"),      # a follower the kernel gave no CPU 3
              host_task(13, "0-2", "0-3", start=5),  # its id reused meanwhile
              host_task(14, "0-2", "0-3")]      # follower: written
    after = [host_task(10, "0-3", "0-3"), host_task(11, "0-3", "0-3"),
             host_task(12, "0,2", "0,2-3"), host_task(13, "0-3", "0-3"),
             host_task(14, "0,2-3", "0,2-3"), host_task(15, "0-3", "0-3")]
    assert plan_keep_home(before, after, iso) == (Write("task:14:100", L("0,2")),)
    # nothing isolated: every thread had its cgroup's CPUs or was placed; the kernel's
    # changes stand
    assert plan_keep_home([host_task(1, "0-3", "0-3")], [host_task(1, "0,2-3", "0,2-3")],
                          L("")) == ()
    assert plan_keep_home([host_task(16, "0", "0,3")], [host_task(16, "3", "3")],
                          L("3")) == ()  # only isolated CPUs left in its cgroup


def test_host_threads_are_read_with_their_cgroups_cpus_and_put_back_on_this_host(
        tmp_path: Path) -> None:
    """``noise.read_host_threads`` on this host's /proc: a process of our own with its
    cgroup2 path and the CPUs its cgroup gives (read from the nearest group with the file,
    in a stand-in of the cgroup2 tree: this host's has no cpuset controller), VM groups
    left out by the caller's choice.  Then the kernel's reset, played by
    sched_setaffinity, is undone by the plan and ``noise.apply``."""
    online = CpuSet.of(os.sched_getaffinity(0))
    if len(online) < 2:
        pytest.fail("needs at least 2 CPUs")
    first, rest = min(online), online - CpuSet.of([min(online)])
    child = subprocess.Popen(["sleep", "60"])
    try:
        os.sched_setaffinity(child.pid, {first})
        cgroup = (Path("/proc") / str(child.pid) / "cgroup").read_text()
        path = next(line[3:] for line in cgroup.splitlines() if line.startswith("0::"))
        (tmp_path / "cpuset.cpus.effective").write_text(online.to_list() + "\n")
        read = read_host_threads(Path("/"), tmp_path, lambda p: False)
        assert read.kthreads == ()  # not asked for
        found = {t.task.tid: t for t in read.users}
        mine = found[child.pid]
        assert mine.task.affinity == CpuSet.of([first]) and mine.cgroup_cpus == online
        assert mine.task.tgid == child.pid and mine.task.comm == "sleep"
        assert os.getpid() in found
        kernel = {k.pid for k in read_kthreads(Path("/"))}
        assert kernel and not kernel & found.keys()  # kernel threads are never user threads
        skipped = read_host_threads(Path("/"), tmp_path, lambda p: p == path).users
        assert child.pid not in {t.task.tid for t in skipped}
        os.sched_setaffinity(child.pid, online.cpus)  # the kernel's reset
        now = [t for t in read_host_threads(Path("/"), tmp_path, lambda p: False).users
               if t.task.tid == child.pid]
        (write,) = plan_keep_home([mine], now, rest)
        (done,) = apply(Path("/"), [write])
        assert done.ok and os.sched_getaffinity(child.pid) == {first}
    finally:
        child.kill()
        child.wait()
    assert read_isolated(tmp_path) == CpuSet()  # no such file: nothing isolated


def test_one_pass_reads_the_kernel_threads_as_read_kthreads_does(tmp_path: Path) -> None:
    """``read_host_threads(kthreads=True)`` reads this host's kernel threads in the same
    pass as the user threads, each as :func:`read_kthreads` has it (``Cpus_allowed_list``,
    what the noise records hold); with ``users=False`` no user thread is read."""
    (tmp_path / "cpuset.cpus.effective").write_text(
        CpuSet.of(os.sched_getaffinity(0)).to_list() + "\n")
    both = read_host_threads(Path("/"), tmp_path, lambda p: False, kthreads=True)
    alone = read_kthreads(Path("/"))
    assert both.users and both.kthreads
    kthreadd = next(k for k in both.kthreads if k.comm == "kthreadd")
    assert kthreadd.flags & PF_KTHREAD and kthreadd.affinity
    # kernel threads come and go (kworkers): those both passes saw agree in every field
    mine = {k.key: k for k in both.kthreads}
    common = [k for k in alone if k.key in mine]
    assert len(common) >= len(alone) // 2, (len(common), len(alone))
    assert all(mine[k.key] == k for k in common if k.comm == mine[k.key].comm)
    assert not {k.pid for k in both.kthreads} & {t.task.tid for t in both.users}
    only = read_host_threads(Path("/"), tmp_path, lambda p: False, users=False,
                             kthreads=True)
    assert only.users == () and only.kthreads


def kthread(pid: int, cpus: str, start: int = 7) -> KthreadInfo:
    return KthreadInfo(pid, start, f"kswapd{pid}", PF_KTHREAD, L(cpus))


def test_kernel_threads_a_partition_moved_go_back_less_its_cpus_and_are_given_them_later(
        ) -> None:
    """A partition over CPU 3 coming and going (bookworm-lab hunt): the kernel gave the
    root's unbound threads every CPU no partition held, NUMA-local kswapd1 on 2-3 went
    to 0-2, then 0-3; kswapd0 on 0-1 went to 0-2, then 0-3.  Each gets what it had less
    what the kernel took (kswapd1: 2, recorded with its original 2-3; kswapd0: 0-1, no
    record needed), when the partition goes the narrowed value again, and the noise
    restore then gives kswapd1 its 2-3 back."""
    before = [kthread(61, "2-3"), kthread(60, "0-1"), kthread(5, "0-3")]
    lease = plan_kthreads_home(before, [kthread(61, "0-2"), kthread(60, "0-2"),
                                        kthread(5, "0-2")], {})
    assert lease.writes == (Write("kthread:61:7", L("2")), Write("kthread:60:7", L("0-1")))
    assert lease.records == (Record("kthread:61:7", L("2-3"), L("2")),
                             Record("kthread:5:7", L("0-3"), L("0-2")))
    recorded = {r.key: r for r in lease.records}
    during = [kthread(61, "2"), kthread(60, "0-1"), kthread(5, "0-2")]
    end = plan_kthreads_home(during, [kthread(61, "0-3"), kthread(60, "0-3"),
                                      kthread(5, "0-3")], recorded)
    assert end.writes == (Write("kthread:61:7", L("2")), Write("kthread:60:7", L("0-1")),
                          Write("kthread:5:7", L("0-2")))
    assert end.records == ()  # as recorded: the restore recognises what pinwarden wrote
    back = plan_restore(NoiseSnapshot(ALL, kthreads=(kthread(61, "2"), kthread(60, "0-1"),
                                                     kthread(5, "0-2"))), recorded, L(""))
    assert back.writes == (Write("kthread:5:7", L("0-3")), Write("kthread:61:7", L("2-3")))
    assert sorted(back.forget) == sorted(recorded)


def test_kernel_threads_not_moved_or_not_settable_are_left_alone() -> None:
    """Threads the change did not move, threads new since, bound ones and threads left no
    CPU by what the kernel took are not written; the last are recorded (their original,
    and the kernel's value as the one to recognise), so the restore gives them back."""
    bound = KthreadInfo(9, 7, "ksoftirqd/1", PF_KTHREAD | PF_NO_SETAFFINITY, L("0-3"))
    before = [kthread(1, "0-1"), kthread(2, "3"), bound]
    after = [kthread(1, "0-1"), kthread(2, "0-2"), kthread(3, "0-3"),
             KthreadInfo(9, 7, "ksoftirqd/1", PF_KTHREAD | PF_NO_SETAFFINITY, L("1"))]
    assert plan_kthreads_home(before, after, {}) == Plan(
        (), (Record("kthread:2:7", L("3"), L("0-2")),))


def test_a_kernel_thread_whose_whole_node_is_leased_gets_it_back_after() -> None:
    """A lease of 2-3, kswapd1's whole node, as a partition: the kernel gave it 0-1, and
    when the partition went 0-3; keeping "what it had less what the kernel took" left
    nothing, so it was not recorded, and the release put it on 0-1 — node 0 — for good
    (bookworm-lab hunt).  Now its original is recorded with the kernel's value, the
    release keeps 0-1 while the noise restore, last, gives it 2-3 back."""
    lease = plan_kthreads_home([kthread(61, "2-3")], [kthread(61, "0-1")], {})
    assert lease == Plan((), (Record("kthread:61:7", L("2-3"), L("0-1")),))
    recorded = {r.key: r for r in lease.records}
    end = plan_kthreads_home([kthread(61, "0-1")], [kthread(61, "0-3")], recorded)
    assert end == Plan((Write("kthread:61:7", L("0-1")),), ())
    back = plan_restore(NoiseSnapshot(ALL, kthreads=(kthread(61, "0-1"),)), recorded, L(""))
    assert back.writes == (Write("kthread:61:7", L("2-3")),)
