"""The lease manager: the one path for reserve/enforce/release/sync (issue #10).

Logic on a synthetic host root read through the real readers, with the in-memory cpuset
fake (checked against real kernels by the differential test) as the cgroup backend; the
same promises on this host's real cgroup v1 hierarchy at the end (marker ``kernel``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from enforce_helpers import FailingBackend, build
from hostroot import HostSpec, build_host, make_cgroup, mount_cgroups
from libvirt_env import CPUSET, PINWARDEN, machine_restored, remove_tree
from pidns import pid_namespace
from pinwarden.config import Config
from pinwarden.cpuset import CpuSet
from pinwarden.domain import parse_domain
from pinwarden.enforce.fake import FakeCpusetV1
from pinwarden.errors import EnforceError, Refusal
from pinwarden.ledger import Ledger
from pinwarden.manager import Manager
from pinwarden.model import HolderRef, Plan, domain_holder, job_holder
from pinwarden.policy import JobSpec

V1 = "sys/fs/cgroup/cpuset"
C = CpuSet.parse


#: A task of the fake's groups that no real process has: above the kernel's largest pid
#: (PID_MAX_LIMIT).  The manager asks /proc whether a group's tasks live (a kept group's
#: record), and a small tid (777) was a live thread once pids wrapped on a busy host: the
#: clean-clone run wrote a "kept:" record the test did not expect.
GONE_TID = 4_194_305


def _host4(tmp_path: Path, machine: str) -> Path:
    root = tmp_path / "root"
    build_host(root, HostSpec(cpus=4))
    mount_cgroups(root, cpus="0-3")
    make_cgroup(root, V1, "machine", machine)
    return root


@pytest.fixture
def host4(tmp_path: Path) -> Path:
    """A 4-CPU host (no SMT) with libvirt's ``machine`` holding every CPU: mode none."""
    return _host4(tmp_path, "0-3")


def fake4() -> FakeCpusetV1:
    fake = FakeCpusetV1(C("0-3"))
    build(fake, {"machine": ("0-3", False)})
    return fake


def manager(root: Path, state: Path, backend: object) -> Manager:
    return Manager(Config(), root, state, backend=backend)  # type: ignore[arg-type]


def narrow_in_root(root: Path, fake: FakeCpusetV1) -> None:
    """Show the fake's ``machine`` in the host root's files, as the kernel would."""
    cpus = str(fake.read_group("machine").cpus)
    make_cgroup(root, V1, "machine", cpus)


def test_a_mode_changed_while_leased_plans_against_the_recorded_partition(
        host4: Path, tmp_path: Path) -> None:
    """A lease taken in mode ``none``; then the configuration says ``cgroup`` (and
    ``machine`` was narrowed for it): every command failed, "partition mode cgroup is
    configured but no VM partition cgroup exists", though it does — the partition was
    decided again from what the first lease found under the new mode (systemd-lab hunt).
    The partition recorded at the first lease stays what is planned against, as the
    README says, until the last lease goes; then the new mode applies."""
    fake = fake4()
    state = tmp_path / "state"
    with Manager(Config(mode="none"), host4, state, backend=fake) as m:
        m.reserve_request(JobSpec("J", cpus=C("1")))
        recorded = m.host().partition
    assert (recorded.mode, recorded.vm_cpus) == ("none", C("1-3"))
    fake.set_cpus("machine", C("2-3"))  # what the operator gave the VMs meanwhile
    narrow_in_root(host4, fake)
    with Manager(Config(mode="cgroup"), host4, state, backend=fake) as m:
        assert m.host().partition == recorded
        assert [lease.cpu for lease in m.leases()] == [1]
        m.sync()
        shared = m.plan(parse_domain("<domain type='kvm'><name>s</name><vcpu>1</vcpu>"
                                     "</domain>"))
        assert shared.default_cpus == C("2-3")
        m.drop(job_holder("J"))
        assert (m.host().partition.mode, m.host().partition.vm_cpus) == ("cgroup", C("2-3"))


def test_first_lease_records_the_host_and_the_last_puts_it_back(host4: Path,
                                                                tmp_path: Path) -> None:
    fake = fake4()
    with manager(host4, tmp_path / "state", fake) as m:
        assert m.host().partition.mode == "none"
        reserved = m.reserve_request(JobSpec("J", count=1))
        assert reserved.group == "pinwarden-run-J.partition"
        assert m.ledger().get(job_holder("J")).cgroup == "pinwarden-run-J.partition"
        leased = reserved.plan.leased()
        assert fake.read_group("machine").cpus == C("1-3") - leased  # narrowed
        narrow_in_root(host4, fake)
        # the placement rules do not change because pinwarden narrowed machine
        assert (m.host().partition.mode, m.host().partition.vm_cpus) == ("none", C("1-3"))
        assert m.live_host().partition.mode == "cgroup"  # what a naive reading says
        record = m.record()
        assert record is not None and record.found.cpus == C("0-3")
        # what machine was, and what pinwarden left it with (to tell somebody's edit)
        assert m.ledger().changes() == {"cgroup:machine": json.dumps(
            {"cpus": "0-3", "set": (C("1-3") - leased).to_list()})}
        m.drop(job_holder("J"))
        # the host as found: machine's CPUs back, no holder group, nothing recorded
        assert fake.read_group("machine").cpus == C("0-3")
        assert set(fake.read_state([""]).groups) == {"", "machine"}
        assert m.record() is None and m.ledger().changes() == {}


def test_a_group_kept_for_its_tasks_keeps_the_record_until_it_is_gone(
        host4: Path, tmp_path: Path) -> None:
    """The last lease goes while its group still has a task (a job's child outliving its
    owner, a release of a running domain): the group is kept, and so is machine's narrowing
    — and so must be what machine was, and the host as found, until a sync finds the group
    gone and puts machine back.  Forgotten, machine stayed narrowed for good and the next
    reading took the narrowed cgroup for the placement rules (mode none → cgroup)."""
    fake = fake4()
    state = tmp_path / "state"
    with manager(host4, state, fake) as m:
        reserved = m.reserve_request(JobSpec("J", cpus=C("3")))
        fake.attach_thread(reserved.group, GONE_TID)  # the job's child lives on in its group
        narrow_in_root(host4, fake)
        m.drop(job_holder("J"))
        narrow_in_root(host4, fake)
        assert reserved.group in fake.read_state([""]).groups  # kept for its task
        assert fake.read_group("machine").cpus == C("1-2")
        assert m.ledger().changes() == {"cgroup:machine": json.dumps({"cpus": "0-3",
                                                                      "set": "1-2"})}
        record = m.record()
        assert record is not None and record.found.cpus == C("0-3")
        assert (m.host().partition.mode, m.host().partition.vm_cpus) == ("none", C("1-3"))
    fake.exit(GONE_TID)  # the last task exits
    with manager(host4, state, fake) as m:
        m.sync()
        assert set(fake.read_state([""]).groups) == {"", "machine"}
        assert fake.read_group("machine").cpus == C("0-3")  # back as found
        assert m.record() is None and m.ledger().changes() == {}


def test_a_domain_pinned_to_cpu_0_plans_the_same_before_during_and_after(
        host4: Path, tmp_path: Path) -> None:
    fake = fake4()
    pinned = "<domain><name>p</name><vcpu>1</vcpu><cputune><vcpupin vcpu='0' " \
             "cpuset='0'/></cputune></domain>"
    from pinwarden.domain import parse_domain

    spec = parse_domain(pinned)
    with manager(host4, tmp_path / "state", fake) as m:
        before = m.plan(spec)
        assert before.vcpus == {0: C("0")}
        m.reserve_request(JobSpec("J", count=1))
        narrow_in_root(host4, fake)
        during = m.plan(spec)  # not refused as "outside the partition" (cgroup mode)
        assert during.vcpus == before.vcpus and m.host().partition.mode == "none"
        m.drop(job_holder("J"))
        narrow_in_root(host4, fake)
        assert m.plan(spec) == before


def test_a_mode_change_is_the_users_and_host_says_so(host4: Path, tmp_path: Path) -> None:
    fake = fake4()
    with manager(host4, tmp_path / "state", fake) as m:
        m.reserve_request(JobSpec("J", count=1))
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nhost_reserve = "0-1"\n')  # the user changes the rules
    out = subprocess.run([sys.executable, "-c", "from pinwarden.cli import entry; entry()",
                          "host", "--root", str(host4), "--state-dir", str(tmp_path / "state"),
                          "--config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "the configuration now gives partition none (VM CPUs 2-3)" in out.stdout
    assert "recorded as none (VM CPUs 1-3)" in out.stdout
    data = json.loads(subprocess.run(
        [sys.executable, "-c", "from pinwarden.cli import entry; entry()", "host", "--json",
         "--root", str(host4), "--state-dir", str(tmp_path / "state"), "--config",
         str(config)], capture_output=True, text=True).stdout)
    assert data["partition"]["vm_cpus"] == "2-3"
    assert data["recorded_partition"]["vm_cpus"] == "1-3"


def test_enforcement_failure_puts_the_previous_leases_back(host4: Path,
                                                          tmp_path: Path) -> None:
    fake = fake4()
    with manager(host4, tmp_path / "state", fake) as m:
        m.reserve_request(JobSpec("A", cpus=C("3")))
    failing = FailingBackend(fake, fail_at=1, err=errno.EIO)
    with manager(host4, tmp_path / "state", failing) as m:
        holder = domain_holder("qemu", "web", None)
        with pytest.raises(EnforceError):
            m.reserve(holder, lambda host, leases: Plan(
                "web", None, True, {0: C("2")}, C("2"), leases={2: "vcpu0"}))
        assert [(le.cpu, le.holder.name) for le in m.leases()] == [(3, "A")]
    # and the kernel's layout is back to what the ledger says
    assert fake.read_group("pinwarden-run-A.partition").cpus == C("3")
    assert "pinwarden-vm-web.partition" not in fake.read_state([""]).groups


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reads_never_write(host4: Path, tmp_path: Path) -> None:
    """status, plan and host on a ledger with a dead owner leave the database as it was;
    the dead holder's CPUs are free for them; an explicit reap removes it."""
    fake = fake4()
    state = tmp_path / "state"
    sleeper = subprocess.Popen(["sleep", "60"])
    with manager(host4, state, fake) as m:
        m.reserve_request(JobSpec("dead", cpus=C("3")), owner_pid=sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    db = state / "leases.db"
    before = _digest(db)
    from pinwarden.cli import main

    xml = tmp_path / "d.xml"
    xml.write_text("<domain><name>d</name><vcpu>1</vcpu><cputune><vcpupin vcpu='0' "
                   "cpuset='3'/></cputune></domain>")
    for argv in (["status"], ["plan", str(xml)], ["host"], ["audit"], ["metrics"]):
        assert main([*argv, "--root", str(host4), "--state-dir", str(state)]) in (0, 1, 2)
    assert _digest(db) == before
    assert not (state / "leases.db-wal").exists() or \
        (state / "leases.db-wal").stat().st_size == 0
    with manager(host4, state, fake) as m:
        assert m.leases() == ()  # the dead owner's CPU is free for reads
        assert [r.ref.name for r in m.dead()] == ["dead"]
        assert [r.ref.name for r in m.reap()] == ["dead"]
        assert m.holders() == ()


def test_reads_look_at_a_dead_owners_group_once(host4: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """status, audit and metrics read the group of a holder whose owner is gone once per
    command (its tasks decide both 'owner gone' and who runs on: one reading, so the two
    cannot disagree), and show processes running on there as the lease's."""
    fake = fake4()
    state = tmp_path / "state"
    sleeper = subprocess.Popen(["sleep", "60"])
    with manager(host4, state, fake) as m:
        m.reserve_request(JobSpec("gone", cpus=C("2")), owner_pid=sleeper.pid)
        m.reserve_request(JobSpec("heir", cpus=C("3")), owner_pid=sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    looked: list[str] = []

    def left_running(self: Manager, holder: HolderRef) -> tuple[int, ...]:
        looked.append(holder.name)
        return (4242,) if holder.name == "heir" else ()

    monkeypatch.setattr(Manager, "left_running", left_running)
    from pinwarden.cli import main

    base = ["--root", str(host4), "--state-dir", str(state)]
    assert main(["status", "--json", *base]) == 0
    leases = {lease["domain"]: lease for lease in json.loads(capsys.readouterr().out)["leases"]}
    assert (leases["heir"]["owner_gone"], leases["heir"]["left_running"]) == (False, [4242])
    assert (leases["gone"]["owner_gone"], leases["gone"]["left_running"]) == (True, [])
    assert sorted(looked) == ["gone", "heir"], looked
    for argv in (["audit", "--json"], ["metrics"]):
        looked.clear()
        assert main([*argv, *base]) in (0, 1, 2)  # (audit: this dump has no /proc)
        capsys.readouterr()
        assert sorted(looked) == ["gone", "heir"], (argv, looked)


def test_a_new_owner_of_isolcpus_cpus_moves_the_previous_owners_threads_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease's owner is exempt from 'keep everything else off'; when it changes
    (libvirtd until QEMU's 'started') the previous one, still running, is not: where the
    kernel may not guard the CPUs (isolcpus=) and a thread of it may run there, the change
    syncs, which moves it off (Manager._keep_off).  Not where the CPUs are guarded, nor
    when the previous owner is gone, stays the owner, or may not run there anyway."""
    assert {0, 1} <= os.sched_getaffinity(0)  # (this machine's CPUs 0-1: real affinities)
    root = tmp_path / "root"
    build_host(root, HostSpec(cpus=4, isolated="1"))
    mount_cgroups(root, cpus="0-3")
    make_cgroup(root, V1, "machine", "0-3")
    synced: list[str] = []
    real_sync = Manager.sync

    def sync(self: Manager, **kwargs: CpuSet) -> object:
        synced.append("sync")
        return real_sync(self, **kwargs)

    monkeypatch.setattr(Manager, "sync", sync)
    first, second, third = (subprocess.Popen(["sleep", "60"]) for _ in range(3))
    elsewhere = subprocess.Popen(["taskset", "-c", "0", "sleep", "60"])
    try:
        with manager(root, tmp_path / "state", fake4()) as m:
            holder = job_holder("iso")
            m.reserve_request(JobSpec("iso", cpus=C("1")), owner_pid=first.pid, holder=holder)
            synced.clear()
            m.set_owner(holder, first.pid)
            assert synced == []  # the same owner
            m.set_owner(holder, second.pid)
            assert synced == ["sync"]  # the first owner runs on, no longer exempt
            second.kill()
            second.wait()
            m.set_owner(holder, elsewhere.pid)
            assert synced == ["sync"]  # the previous owner is gone: nothing of it to move
            m.set_owner(holder, third.pid)
            assert synced == ["sync"]  # the previous one may only run on CPU 0
            assert [(r.ref.name, r.owner_pid) for r in m.holders()] == [("iso", third.pid)]
        # a lease of CPUs 0-1, 1 isolated: its group may be no partition at all, so the
        # previous owner on CPU 0 alone is moved off too (libvirtd on 0-2 in the lab kept
        # CPU 2 of a lease 2-3 with 3 isolated)
        config = Config(mode="none", host_reserve=C("3"))
        with Manager(config, root, tmp_path / "state-none", backend=fake4()) as m:
            holder = job_holder("part")
            m.reserve_request(JobSpec("part", cpus=C("0-1")), owner_pid=elsewhere.pid,
                              holder=holder)
            synced.clear()
            m.set_owner(holder, first.pid)
            assert synced == ["sync"]  # on CPU 0 only, which is not isolated
        with manager(_host4(tmp_path / "plain", "0-3"), tmp_path / "plain" / "state",
                     fake4()) as m:  # no isolcpus=: the kernel guards every leased CPU
            holder = job_holder("plain")
            m.reserve_request(JobSpec("plain", cpus=C("1")), owner_pid=first.pid,
                              holder=holder)
            synced.clear()
            m.set_owner(holder, third.pid)
            assert synced == []
    finally:
        for proc in (first, second, third, elsewhere):
            proc.kill()
            proc.wait()


def test_the_backend_is_opened_once_and_closed(host4: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake4()
    opened: list[object] = []
    closed: list[object] = []

    class Counting(FailingBackend):
        def close(self) -> None:
            closed.append(self)

    def open_backend(root: Path) -> object:
        backend = Counting(fake, fail_at=10**9)
        opened.append(backend)
        return backend

    monkeypatch.setattr("pinwarden.enforce.select.open_backend", open_backend)
    with Manager(Config(), host4, tmp_path / "state", enforce=True) as m:
        for name in ("a", "b", "c"):
            m.reserve_request(JobSpec(name, count=1))
        m.sync()
        m.release("b")
        m.reap()
    assert len(opened) == 1 and closed == opened


def test_every_change_reads_the_leases_under_the_lock(host4: Path, tmp_path: Path) -> None:
    """A sync may never work from leases read before another holder's reservation: it
    would remove that holder's fresh, still empty group.  Racing processes each reserve
    and check their own group exists right after (a cgroup v1 hierarchy on disk below the
    test directory stands in for the kernel: every process sees the same groups)."""
    state = tmp_path / "state"
    checks = tmp_path / "checks"
    checks.mkdir()
    code = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from disk_cpuset import DiskCpuset
from pinwarden.config import Config
from pinwarden.manager import Manager
from pinwarden.model import job_holder
from pinwarden.policy import JobSpec
name = sys.argv[1]
backend = DiskCpuset(Path({str(tmp_path / 'cgroup')!r}))
with Manager(Config(), Path({str(host4)!r}), Path({str(state)!r}), backend=backend) as m:
    for i in range(15):
        got = m.reserve_request(JobSpec(name, count=1))
        assert got.group is not None
        assert backend.read_group(got.group).cpus == got.plan.leased(), (name, i)
        m.drop(job_holder(name))
print("ok", name)
"""
    from disk_cpuset import DiskCpuset

    DiskCpuset.create(tmp_path / "cgroup", C("0-3"), {"machine": C("0-3")})
    procs = [subprocess.Popen([sys.executable, "-c", code, f"r{n}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert out.startswith("ok")
    with Ledger(state) as ledger:
        assert ledger.leases() == () and ledger.host_record() is None


def test_a_refusal_changes_nothing(host4: Path, tmp_path: Path) -> None:
    fake = fake4()
    with manager(host4, tmp_path / "state", fake) as m:
        m.reserve_request(JobSpec("A", cpus=C("1-3")))
        writes = fake.writes
        rows = _rows(tmp_path / "state")
        with pytest.raises(Refusal):
            m.reserve_request(JobSpec("B", count=1))
        assert fake.writes == writes
        assert _rows(tmp_path / "state") == rows


def test_a_refusal_that_reaps_a_dead_holder_shrinks_its_group(host4: Path,
                                                            tmp_path: Path) -> None:
    """A refused reserve keeps the reaping it did (a dead owner's holder is gone for good)
    and the kernel follows: the dead holder's group goes and, with the last lease gone,
    the host is as found; the refused plan itself is not recorded."""
    fake = fake4()
    sleeper = subprocess.Popen(["sleep", "60"])
    with manager(host4, tmp_path / "state", fake) as m:
        m.reserve_request(JobSpec("dead", cpus=C("3")), owner_pid=sleeper.pid)
        assert "pinwarden-run-dead.partition" in fake.read_state([""]).groups
    sleeper.kill()
    sleeper.wait()
    with manager(host4, tmp_path / "state", fake) as m:
        with pytest.raises(Refusal):
            m.reserve_request(JobSpec("B", count=9))
        assert m.holders() == () and m.record() is None
    assert set(fake.read_state([""]).groups) == {"", "machine"}
    assert fake.read_group("machine").cpus == C("0-3")


def _rows(state: Path) -> list[object]:
    """Every row of every table of the ledger."""
    import sqlite3

    db = sqlite3.connect(state / "leases.db")
    try:
        return [(table, db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall())
                for table in ("holders", "leases", "host", "changes")]
    finally:
        db.close()


# -- the real host (cgroup v1) -------------------------------------------------------------


@pytest.fixture
def real_machine() -> Iterator[None]:
    if os.geteuid() != 0 or not (CPUSET / "cpuset.cpus").exists():
        pytest.fail(f"needs root and the cgroup v1 cpuset hierarchy at {CPUSET}")
    machine = CPUSET / "machine"
    created = not machine.exists()
    if created:
        machine.mkdir()
        (machine / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
    online = (CPUSET / "cpuset.cpus").read_text().strip()
    with machine_restored():
        (machine / "cpuset.cpus").write_text(online)  # a fresh host: machine has every CPU
        try:
            yield
        finally:
            if created:
                remove_tree("machine")


@pytest.mark.kernel
def test_a_fresh_host_is_left_as_found_by_a_job(real_machine: None, tmp_path: Path) -> None:
    """Issue #10's case: mode ``none`` on a fresh cgroup v1 host; one ``pinwarden run
    --exclusive 1 -- true`` must leave ``machine`` as it was and the mode unchanged."""
    exclusive = f"pwtest-asfound-{os.getpid()}.partition"
    config = tmp_path / "pw.toml"
    config.write_text(f'[partition]\nexclusive = "{exclusive}"\n')  # mode auto, as installed
    base = [PINWARDEN, "--state-dir", str(tmp_path / "state"), "--config", str(config)]
    machine = (CPUSET / "machine" / "cpuset.cpus").read_text()

    def host() -> dict[str, str]:
        out = subprocess.run([*base, "host", "--json"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout)["partition"])

    before = host()
    assert before["mode"] == "none"
    probe = ("import json, subprocess, sys; "
             f"out = subprocess.run({[*base, 'host', '--json']!r}, capture_output=True, "
             "text=True).stdout; print(json.dumps(json.loads(out)['partition']))")
    try:
        done = subprocess.run([*base, "run", "--exclusive", "1", "--", sys.executable, "-c",
                               probe], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == before  # the rules did not change meanwhile
        assert (CPUSET / "machine" / "cpuset.cpus").read_text() == machine
        assert host() == before
        assert not (CPUSET / exclusive).exists()
        with Ledger(tmp_path / "state") as ledger:
            assert ledger.host_record() is None and ledger.changes() == {}
    finally:
        remove_tree(exclusive)


def test_a_restore_the_kernel_refuses_for_the_moment_is_kept_and_tried_again(
        host4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """x86 refuses to move an IRQ while its previous move is pending (EBUSY): the write
    that puts it back at the last release fails.  Its record stays (it was forgotten, and
    the IRQ stayed off the formerly leased CPU for good), the release says so, and the
    next sync puts it back."""
    import errno

    from pinwarden import noise

    irq = host4 / "proc/irq/24"
    (irq / "nvme0q1").mkdir(parents=True)
    (irq / "smp_affinity_list").write_text("0-3\n")
    fake = fake4()
    state = tmp_path / "state"
    real = noise._apply_one
    said: list[str] = []
    with Manager(Config(), host4, state, backend=fake, noise=True, warn=said.append) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert (irq / "smp_affinity_list").read_text().strip() == "0-2"

        def busy(root: Path, write: noise.Write, set_affinity: object) -> noise.Outcome:
            if write.key == "irq:24":
                raise OSError(errno.EBUSY, "Device or resource busy")
            return real(root, write, set_affinity)  # type: ignore[arg-type]

        monkeypatch.setattr(noise, "_apply_one", busy)
        m.drop(job_holder("J"))
        monkeypatch.setattr(noise, "_apply_one", real)
        assert (irq / "smp_affinity_list").read_text().strip() == "0-2"
        assert "irq:24" in m.ledger().changes()
    assert any(w.startswith("could not put back irq:24 (") and "pinwarden sync" in w
               for w in said), said
    with Manager(Config(), host4, state, backend=fake, noise=True) as m:
        m.sync()
        assert (irq / "smp_affinity_list").read_text().strip() == "0-3"
        assert "irq:24" not in m.ledger().changes()


def test_an_irq_recorded_but_never_moved_that_the_kernel_refuses_is_marked_refused(
        host4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A managed IRQ refuses every affinity write (EIO).  Killed between its record and
    its write, a reserve left a record of a move never made; every later sync tried the
    write again, kept that record, and audit called the IRQ an error, exit 1, all lease
    long (kill hunt).  The IRQ holding its original value is marked refused like one
    seen for the first time; the lease's end forgets it and leaves the IRQ alone."""
    import errno

    from pinwarden import noise

    irq = host4 / "proc/irq/36"
    (irq / "virtio1-req.0").mkdir(parents=True)
    (irq / "smp_affinity_list").write_text("0-3\n")
    state = tmp_path / "state"
    real = noise._apply_one

    def managed(root: Path, write: noise.Write, set_affinity: object) -> noise.Outcome:
        if write.key == "irq:36":
            raise OSError(errno.EIO, "Input/output error")
        return real(root, write, set_affinity)  # type: ignore[arg-type]

    monkeypatch.setattr(noise, "_apply_one", managed)
    fake = fake4()
    with Manager(Config(), host4, state, backend=fake, noise=True) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert json.loads(m.ledger().changes()["irq:36"]) == {"refused": True}
        # what a kill between the record and the write left
        m.ledger().put_changes({"irq:36": json.dumps(
            {"key": "irq:36", "original": "0-3", "applied": "0-2"})})
        m.sync()
        assert json.loads(m.ledger().changes()["irq:36"]) == {"refused": True}
        m.drop(job_holder("J"))
        assert "irq:36" not in m.ledger().changes()
    assert (irq / "smp_affinity_list").read_text().strip() == "0-3"


def test_a_v2_shared_group_without_cpuset_files_is_recorded_as_inheriting(
        tmp_path: Path) -> None:
    """cgroup v2 without systemd: libvirt's ``machine`` exists, but the root does not enable
    the cpuset controller yet, so it has no cpuset files.  It is recorded as inheriting
    (no CPUs of its own), not as absent — absent, it was removed at the last release."""
    from pinwarden.enforce.v2 import CgroupV2Backend

    root = tmp_path / "root"
    build_host(root, HostSpec(cpus=4))
    mount_cgroups(root, v1=False, v2_controllers="cpuset cpu memory pids",
                  v2_at="sys/fs/cgroup", cpus="0-3")
    (root / "sys/fs/cgroup/machine").mkdir()
    backend = CgroupV2Backend(root / "sys/fs/cgroup", root=root)
    m = Manager(Config(), root, tmp_path / "state", backend=backend)
    assert json.loads(m._shared_original(backend, "machine")) == {"cpus": ""}
    assert json.loads(m._shared_original(backend, "elsewhere")) == {"absent": True}


INTERRUPTED = '''
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from enforce_helpers import build
from pinwarden.config import Config
from pinwarden.cpuset import CpuSet
from pinwarden.domain import parse_domain
from pinwarden.enforce.fake import FakeCpusetV1
from pinwarden.manager import Manager
from pinwarden.model import job_holder
from pinwarden.policy import JobSpec, decide

fake = FakeCpusetV1(CpuSet.parse("0-3"))
build(fake, {{"machine": ("0-3", False)}})
# as in a terminal: a test run started in the background inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

def interrupted(request, host, leases):
    os.kill(os.getpid(), signal.{signal})  # lands while the lock is held
    return decide(request, host, leases)

with Manager(Config(), Path({root!r}), Path({state!r}), backend=fake) as m:
    request = JobSpec("J", cpus=CpuSet.parse("3"))
    try:
        m.reserve(job_holder("J"), lambda host, leases: interrupted(request, host, leases))
    except KeyboardInterrupt as exc:
        print(type(exc).__name__, str(fake.read_group("machine").cpus), exc)
        sys.exit(130)
print("not interrupted")
'''


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_under_the_lock_waits_until_the_change_is_made(
        host4: Path, tmp_path: Path, sig: str) -> None:
    """Ctrl-C (or a SIGTERM) that lands while a reservation holds the lock does not cut it
    in half: the lease is recorded and the cgroups are written, then SIGINT is reported as
    an interruption after the change (before, it said "interrupted" although the lease was
    made) and SIGTERM ends the process as it would have."""
    state = tmp_path / "state"
    script = INTERRUPTED.format(tests=str(Path(__file__).parent), signal=sig,
                                root=str(host4), state=str(state))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    leases = Ledger(state).leases()
    assert [(le.cpu, le.holder) for le in leases] == [(3, job_holder("J"))]
    if sig == "SIGINT":
        assert proc.returncode == 130, proc.stderr
        assert proc.stdout.startswith("InterruptedAfterChange 1-2 after completing the "
                                      "change"), proc.stdout
    else:
        assert proc.returncode == -15, (proc.stdout, proc.stderr)
        assert proc.stdout == ""


class ControllerFake(FakeCpusetV1):
    """The fake with cgroup v2's switch of the cpuset controller in the root (a host
    without systemd boots with it off; the first group pinwarden makes turns it on)."""

    def __init__(self) -> None:
        super().__init__(C("0-3"))
        build(self, {"machine": ("0-3", False)})
        self.enabled = False
        self.calls: list[str] = []

    def mkdir(self, path: str) -> None:
        self.enabled = True
        super().mkdir(path)

    def cpuset_enabled(self, path: str) -> bool:
        assert path == ""
        self.calls.append(f"enabled? {self.enabled}")
        return self.enabled

    def disable_cpuset(self, path: str) -> str | None:
        self.calls.append("disable")
        self.enabled = False
        return None


@pytest.mark.parametrize("before", [False, True])
def test_the_cpuset_controller_goes_off_again_if_it_was(host4: Path, tmp_path: Path,
                                                        before: bool) -> None:
    """cgroup v2 without systemd: whether the root enabled the controller is recorded
    before the first lease's first write; the last release turns it off again only if it
    was off, and only once the holder group is gone (a group kept for its task keeps it)."""
    fake = ControllerFake()
    fake.enabled = before
    with manager(host4, tmp_path / "state", fake) as m:
        reserved = m.reserve_request(JobSpec("J", cpus=C("3")))
        assert json.loads(m.ledger().changes()["controller:cpuset"]) == {"enabled": before}
        assert fake.enabled
        fake.attach_thread(reserved.group, GONE_TID)  # outlives the lease
        narrow_in_root(host4, fake)
        m.drop(job_holder("J"))
        assert fake.enabled and "disable" not in fake.calls
        fake.exit(GONE_TID)
        m.sync()
        assert fake.enabled is before
        assert fake.calls == [f"enabled? {before}"] + ([] if before else ["disable"])
        assert m.ledger().changes() == {}


def test_a_narrowed_pin_kept_to_give_back_does_not_keep_the_host_record(
        host4: Path, tmp_path: Path) -> None:
    """A shared domain's live pin pinwarden narrowed (``repin:`` record) outlives the last
    lease until a libvirt adapter gives it back; the host record does not wait for it —
    kept, a later reading would take ``machine`` as found then for the placement rules."""
    fake = fake4()
    with manager(host4, tmp_path / "state", fake) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        m.put_change_records({"repin:u:vcpu0": '{"before": "1-3", "after": "1-2"}'})
        m.drop(job_holder("J"))
        assert m.record() is None
        assert m.change_records("repin:") == {"repin:u:vcpu0": '{"before": "1-3", "after": '
                                                               '"1-2"}'}
        m.put_change_records({}, forget=iter(["repin:u:vcpu0"]))
        assert m.ledger().changes() == {}


@pytest.mark.parametrize(("exclusive", "balanced"), [(True, True), (True, False),
                                                      (False, False)])
def test_an_exclusive_machine_gets_its_flags_back_exactly(
        host4: Path, tmp_path: Path, exclusive: bool, balanced: bool) -> None:
    """An administrator made cgroup v1's ``machine`` ``cpu_exclusive``, or turned its
    ``sched_load_balance`` off (libvirt does neither).  A lease makes it a plain member
    while it narrows it; the last release puts both flags back as found —
    ``sched_load_balance`` included, which ``exclusive`` alone does not tell (it stayed a
    plain member for good before)."""
    fake = fake4()
    fake.set_flag("machine", "cpu_exclusive", exclusive)
    if not balanced:
        fake.set_flag("machine", "sched_load_balance", False)
    found = fake.flags("machine")
    with manager(host4, tmp_path / "state", fake) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert fake.read_group("machine").cpus == C("1-2")  # mode none: 0 is the host's
        assert fake.flags("machine")["cpu_exclusive"] is False  # a member meanwhile
        record = json.loads(m.ledger().changes()["cgroup:machine"])
        assert record["flags"] == {"cpu_exclusive": exclusive, "sched_load_balance": balanced}
        m.drop(job_holder("J"))
        assert fake.read_group("machine").cpus == C("0-3")
        assert fake.flags("machine") == found
        assert m.ledger().changes() == {}


def test_flags_nobody_can_put_back_are_said_and_the_rest_is_as_found(
        host4: Path, tmp_path: Path) -> None:
    fake = fake4()
    fake.set_flag("machine", "cpu_exclusive", True)
    said: list[str] = []
    with Manager(Config(), host4, tmp_path / "state", backend=fake, warn=said.append) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        fake.fail_at[("cpu_exclusive", "machine")] = errno.EBUSY
        m.drop(job_holder("J"))
        assert fake.read_group("machine").cpus == C("0-3")
        assert m.record() is None and m.ledger().changes() == {}
    assert len(said) == 1 and "cpu_exclusive=1" in said[0] and "machine" in said[0], said


@pytest.mark.kernel
def test_an_exclusive_machine_is_left_as_found_by_a_job(real_machine: None,
                                                         tmp_path: Path) -> None:
    """The same on this host's cgroup v1 hierarchy: ``machine`` with ``cpu_exclusive=1``
    keeps both of its flags through a ``pinwarden run --exclusive 1``."""
    exclusive = f"pwtest-exclmachine-{os.getpid()}.partition"
    config = tmp_path / "pw.toml"
    config.write_text(f'[partition]\nexclusive = "{exclusive}"\n')
    base = [PINWARDEN, "--state-dir", str(tmp_path / "state"), "--config", str(config)]
    flags = [CPUSET / "machine" / f"cpuset.{f}" for f in ("cpu_exclusive",
                                                           "sched_load_balance")]
    flags[0].write_text("1")
    try:
        before = [f.read_text() for f in flags]
        assert before[0].strip() == "1"
        done = subprocess.run([*base, "run", "--exclusive", "1", "--", "true"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert [f.read_text() for f in flags] == before
        assert not (CPUSET / exclusive).exists()
        with Ledger(tmp_path / "state") as ledger:
            assert ledger.host_record() is None and ledger.changes() == {}
    finally:
        flags[0].write_text("0")
        remove_tree(exclusive)


@pytest.fixture
def host4_cgroup(tmp_path: Path) -> Path:
    """The 4-CPU host in mode cgroup: ``machine`` holds CPUs 1-2."""
    return _host4(tmp_path, "1-2")


def test_an_edit_of_machine_while_leased_is_kept_and_put_back(host4_cgroup: Path,
                                                              tmp_path: Path) -> None:
    """An administrator widens ``machine`` while pinwarden keeps it narrowed (CPU 2
    leased).  The next sync used to overwrite it, silently, and the last release put back
    what was found before the first lease: the edit was lost.  Now it is said, it stays,
    the partition planned against takes it, and the last release puts back the edited
    value."""
    fake = FakeCpusetV1(C("0-3"))
    build(fake, {"machine": ("1-2", False)})
    said: list[str] = []
    with Manager(Config(), host4_cgroup, tmp_path / "state", backend=fake,
                 warn=said.append) as m:
        assert (m.host().partition.mode, m.host().partition.vm_cpus) == ("cgroup", C("1-2"))
        m.reserve_request(JobSpec("J", cpus=C("2")))
        assert fake.read_group("machine").cpus == C("1")
        m.sync()
        assert said == []  # pinwarden's own narrowing is no edit
        fake.set_cpus("machine", C("1,3"))  # the administrator adds CPU 3
        narrow_in_root(host4_cgroup, fake)
        m.sync()
        assert fake.read_group("machine").cpus == C("1,3")  # not overwritten
        assert len(said) == 1 and "machine" in said[0] and "added CPU 3" in said[0], said
        assert m.host().partition.vm_cpus == C("1-3")
        record = m.record()
        assert record is not None and record.found.cpus == C("1-3")
        assert record.partition.vm_cpus == C("1-3")
        assert json.loads(m.ledger().changes()["cgroup:machine"])["cpus"] == "1-3"
        m.sync()
        assert len(said) == 1  # said once
        # a new lease may take the added CPU
        m.reserve_request(JobSpec("K", cpus=C("3")))
        assert fake.read_group("machine").cpus == C("1")
        m.drop(job_holder("J"))
        m.drop(job_holder("K"))
        assert fake.read_group("machine").cpus == C("1-3")  # as found, with the edit
        assert m.record() is None and m.ledger().changes() == {}
        narrow_in_root(host4_cgroup, fake)
        assert m.host().partition.vm_cpus == C("1-3")
    assert len(said) == 1, said


def test_a_narrowing_edit_is_kept_and_taken_from_the_partition(host4_cgroup: Path,
                                                               tmp_path: Path) -> None:
    fake = FakeCpusetV1(C("0-3"))
    build(fake, {"machine": ("1-3", False)})
    make_cgroup(host4_cgroup, V1, "machine", "1-3")
    said: list[str] = []
    with Manager(Config(), host4_cgroup, tmp_path / "state", backend=fake,
                 warn=said.append) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert fake.read_group("machine").cpus == C("1-2")
        fake.set_cpus("machine", C("1"))  # the administrator takes CPU 2 from the VMs
        m.sync()
        assert fake.read_group("machine").cpus == C("1")
        assert "removed CPU 2" in said[0], said
        assert m.host().partition.vm_cpus == C("1,3")
        with pytest.raises(Refusal):  # CPU 2 is no VM CPU any more
            m.reserve_request(JobSpec("K", cpus=C("2")))
        m.drop(job_holder("J"))
        assert fake.read_group("machine").cpus == C("1,3")
        assert m.record() is None and m.ledger().changes() == {}


@pytest.mark.parametrize("after", ["_take_edit", "_shared_original"],
                         ids=["while-leased", "during-the-first-lease"])
def test_an_edit_that_lands_while_a_sync_runs_is_taken_not_overwritten(
        host4_cgroup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        after: str) -> None:
    """The administrator's write lands after the sync looked for an edit of ``machine``
    (or, at the first lease, recorded what it had) and before the layout read the
    cgroups: the layout narrowed it back to pinwarden's value without a word, and the last
    release put back what it had before (the systemd story's ``set-property`` raced a pass
    of the event daemon's).  Now the pass starts again, and takes the edit."""
    fake = FakeCpusetV1(C("0-3"))
    build(fake, {"machine": ("1-2", False)})
    said: list[str] = []
    with Manager(Config(), host4_cgroup, tmp_path / "state", backend=fake,
                 warn=said.append) as m:
        if after == "_take_edit":
            m.reserve_request(JobSpec("J", cpus=C("2")))
            assert fake.read_group("machine").cpus == C("1")
        real = getattr(Manager, after)
        landed: list[bool] = []

        def then_the_edit(self: Manager, *args: object, **kwargs: object) -> object:
            out = real(self, *args, **kwargs)
            if not landed:
                landed.append(True)
                # the administrator adds CPU 3 (cgroup v1 refuses the leased CPU 2)
                fake.set_cpus("machine", C("1,3" if after == "_take_edit" else "1-3"))
            return out

        monkeypatch.setattr(Manager, after, then_the_edit)
        if after == "_take_edit":
            m.sync()
        else:
            m.reserve_request(JobSpec("J", cpus=C("2")))
        monkeypatch.undo()
        assert landed == [True]
        assert fake.read_group("machine").cpus == C("1,3")  # the edit stays, CPU 2 off it
        assert len(said) == 1 and "added CPU 3" in said[0], said
        assert m.host().partition.vm_cpus == C("1-3")
        m.drop(job_holder("J"))
        assert fake.read_group("machine").cpus == C("1-3")  # as found, with the edit
        assert m.record() is None and m.ledger().changes() == {}
    assert len(said) == 1, said


def test_a_controller_that_stays_on_is_said_with_the_mount_it_is_on(tmp_path: Path) -> None:
    """The hint names the cgroup2 mount of this host (here a hybrid host's
    ``/sys/fs/cgroup/unified``), not the usual place."""
    from pinwarden.enforce.backend import CgroupOpError

    root = tmp_path / "root"
    build_host(root, HostSpec(cpus=4))
    mount_cgroups(root, cpus="0-3", v2_controllers="cpuset cpu")
    make_cgroup(root, V1, "machine", "0-3")

    class Refusing(ControllerFake):
        def disable_cpuset(self, path: str) -> str | None:
            raise CgroupOpError("subtree_control", "", errno.EBUSY)

    said: list[str] = []
    with Manager(Config(), root, tmp_path / "state", backend=Refusing(),
                 warn=said.append) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        m.drop(job_holder("J"))
    hint = f"'echo -cpuset > {root}/sys/fs/cgroup/unified/cgroup.subtree_control'"
    assert len(said) == 1 and hint in said[0], said


def test_an_edit_in_mode_none_is_made_to_the_vm_cpus_the_administrator_saw(
        host4: Path, tmp_path: Path) -> None:
    """Mode none: ``machine`` had every CPU, and pinwarden keeps it off the host reserve
    (CPU 0) as well as the leased CPU.  Taking CPU 2 away leaves VM CPUs 1 and 3 — not CPU 0,
    which ``machine`` had as found but nobody saw there; writing CPU 0 back in changes no
    VM CPU, and is set back."""
    fake = fake4()
    said: list[str] = []
    with Manager(Config(), host4, tmp_path / "state", backend=fake, warn=said.append) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert fake.read_group("machine").cpus == C("1-2")
        fake.set_cpus("machine", C("0-2"))  # the reserve written back in: no VM CPU
        m.sync()
        assert fake.read_group("machine").cpus == C("1-2")
        assert "added CPU 0" in said[-1] and "stays none" in said[-1], said
        assert "back when" not in said[-1], said  # what it gets back did not change
        assert json.loads(m.ledger().changes()["cgroup:machine"])["cpus"] == "0-3"
        fake.set_cpus("machine", C("1"))  # CPU 2 taken from the VMs
        m.sync()
        assert "removed CPU 2" in said[-1] and "now cgroup (VM CPUs 1,3)" in said[-1], said
        assert fake.read_group("machine").cpus == C("1")
        assert (m.host().partition.mode, m.host().partition.vm_cpus) == ("cgroup", C("1,3"))
        m.drop(job_holder("J"))
        assert fake.read_group("machine").cpus == C("1,3")
        assert m.record() is None and m.ledger().changes() == {}
    assert len(said) == 2, said


@pytest.mark.parametrize("partial", [False, True], ids=["rolled-back", "rollback-failed"])
def test_a_failed_sync_keeps_its_yardstick_only_if_rolled_back(
        host4_cgroup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        partial: bool) -> None:
    """``machine`` reads CPU 1 after a failed sync.  Rolled back, the failure was the
    administrator's write landing while the sync ran (its read-back found the group not
    as planned; the systemd story saw it with the event daemon): what pinwarden had set
    stays the yardstick and the next sync takes the edit — forgotten, it was overwritten
    silently.  Not rolled back (``partial``), the value may be pinwarden's own, half-way:
    the next sync must not take it for an edit."""
    from pinwarden.enforce import apply

    fake = FakeCpusetV1(C("0-3"))
    build(fake, {"machine": ("1-3", False)})
    make_cgroup(host4_cgroup, V1, "machine", "1-3")
    said: list[str] = []
    real = apply.sync

    def failing(backend: object, desired: object, **_: object) -> object:
        fake.set_cpus("machine", C("1"))
        raise EnforceError("...", partial=partial)

    with Manager(Config(), host4_cgroup, tmp_path / "state", backend=fake,
                 warn=said.append) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert json.loads(m.ledger().changes()["cgroup:machine"])["set"] == "1-2"
        monkeypatch.setattr(apply, "sync", failing)
        with pytest.raises(EnforceError):
            m.sync()
        monkeypatch.setattr(apply, "sync", real)
        kept = json.loads(m.ledger().changes()["cgroup:machine"]).get("set")
        assert kept == (None if partial else "1-2")
        m.sync()
        if partial:
            assert said == [], said
            assert fake.read_group("machine").cpus == C("1-2")
            assert m.host().partition.vm_cpus == C("1-3")
        else:
            assert len(said) == 1 and "removed CPU 2" in said[0], said
            assert fake.read_group("machine").cpus == C("1")
            assert m.host().partition.vm_cpus == C("1,3")
        assert "set" in json.loads(m.ledger().changes()["cgroup:machine"])


def _running_refusal(m: Manager, selector: str) -> str:
    """The message of the refusal of an unforced release of ``selector``, as its owner
    runs (or may)."""
    with pytest.raises(Refusal) as err:
        m.release(selector, force=False)
    assert err.value.code == "holder-running", err.value
    return err.value.message


def _job_of_an_exited_owner(m: Manager, name: str, ns: int | None = None) -> int:
    """Job ``name`` on CPU 3, its owner (a ``sleep``) exited; ``ns``: recorded as of that
    PID namespace.  The owner's pid."""
    runs = subprocess.Popen(["sleep", "60"])
    m.reserve_request(JobSpec(name, cpus=C("3")), owner_pid=runs.pid)
    runs.kill()
    runs.wait()
    if ns is not None:
        raw = sqlite3.connect(m.state_dir / "leases.db")
        raw.execute("UPDATE holders SET owner_ns = ? WHERE name = ?", (ns, name))
        raw.commit()
        raw.close()
    return runs.pid


def test_a_holder_owned_in_another_pid_namespace_is_not_freed_unless_forced(
        host4: Path, tmp_path: Path) -> None:
    """Its pid names another process here, or none: a sync or release from here took a
    running container's (or host's) job for dead and freed it (hunt)."""
    fake = fake4()
    state = tmp_path / "state"
    with pid_namespace() as elsewhere, manager(host4, state, fake) as m:
        pid = _job_of_an_exited_owner(m, "J", elsewhere.ns)  # recorded there
        m.sync()
        assert [r.ref.name for r in m.holders()] == ["J"] and m.dead() == ()
        assert _running_refusal(m, "J") == (
            f"job 'J' is owned by pid {pid} of another PID namespace (a container's, or the "
            "host's beside one) on CPU 3: whether it runs cannot be told from here; release "
            "it where it was leased, or `pinwarden release J --driver run --force` frees it "
            "all the same")
        assert [r.ref.name for r in m.holders()] == ["J"]
        assert m.release("J", force=True).ref.name == "J" and m.holders() == ()
    # that namespace is gone (a container that ended): seen from the host's, so is its
    # owner, and a sync frees what it held
    with manager(host4, state, fake) as m:
        _job_of_an_exited_owner(m, "K", elsewhere.ns)
        assert [r.ref.name for r in m.dead()] == ["K"]
        m.sync()
        assert m.holders() == ()


def test_release_of_a_holder_that_runs_is_refused_unless_forced(host4: Path,
                                                                tmp_path: Path) -> None:
    """'pinwarden release' of a holder whose owner runs (here a job's process; a domain's
    QEMU alike) is refused, naming it, its CPUs and how to stop it; nothing changes.
    Before, it freed the leases silently: the CPUs looked free while the holder used them,
    its group stayed for its tasks, and the next lease of them failed, calling that group
    'not managed by pinwarden' (found by a real-libvirt hunt).  --force frees them."""
    fake = fake4()
    state = tmp_path / "state"
    runs = subprocess.Popen(["sleep", "60"])
    try:
        with manager(host4, state, fake) as m:
            m.reserve_request(JobSpec("J", cpus=C("3")), owner_pid=runs.pid)
            before = fake.read_state([""])
            assert _running_refusal(m, "J") == (
                f"job 'J' still runs (pid {runs.pid}) on CPU 3: stop it (kill {runs.pid}) "
                "and its leases go with it; `pinwarden release J --driver run --force` "
                "frees them while it runs")
            # a domain's name quoted for the shell, as typed (it was not: CLI hunt)
            odd = domain_holder("qemu", "my vm $(id);x", "6f" * 16)
            m.reserve(odd, lambda host, leases: Plan(odd.name, odd.uuid, True, {0: C("2")},
                                                    C("2"), leases={2: "vcpu0"}),
                      owner_pid=runs.pid)
            with pytest.raises(Refusal, match=re.escape(
                    "stop it (pinwarden stop 'my vm $(id);x') and its leases go with it; "
                    "`pinwarden release 'my vm $(id);x' --driver qemu --force` frees")):
                m.release("my vm $(id);x", force=False)
            m.release("my vm $(id);x")
            assert [h.ref.name for h in m.holders()] == ["J"]
            assert fake.read_state([""]) == before
            assert m.release("J").ref.name == "J"  # forced (every internal caller)
            assert m.holders() == ()
            m.reserve_request(JobSpec("K", cpus=C("3")), owner_pid=runs.pid)
        runs.kill()
        runs.wait()
        with manager(host4, state, fake) as m:  # an owner that is gone: released as ever
            assert m.release("K", force=False).ref.name == "K"
    finally:
        runs.kill()
        runs.wait()


def test_release_of_a_domain_held_by_libvirtd_says_so(host4: Path, tmp_path: Path) -> None:
    """A domain's lease whose owner is still the libvirt daemon (the hook's ``prepare``
    made it; its ``started`` and ``release`` calls were lost, killed): release said the
    domain "still runs (pid <libvirtd>)" and sent the user to stop it — it ran nowhere
    (crash hunt).  Now the refusal says libvirtd holds it and how to free it."""
    import shutil

    daemon = tmp_path / "libvirtd"  # a process named as libvirtd is
    shutil.copy("/bin/sleep", daemon)
    runs = subprocess.Popen([str(daemon), "60"])
    try:
        held = domain_holder("qemu", "x", "6f" * 16)
        with manager(host4, tmp_path / "state", fake4()) as m:
            m.reserve(held, lambda host, leases: Plan("x", held.uuid, True, {0: C("2")},
                                                      C("2"), leases={2: "vcpu0"}),
                      owner_pid=runs.pid)
            with pytest.raises(Refusal) as err:
                m.release("x", force=False)
            assert err.value.code == "holder-running"
            assert err.value.message == (
                f"qemu domain 'x' is held by libvirtd (pid {runs.pid}) on CPU 2: it is "
                f"starting or stopping the domain; if the domain does not run ('virsh "
                f"domstate {held.uuid}'), 'pinwarden daemon --once' frees its leases, as "
                f"does `pinwarden release x --driver qemu --force`"), err.value.message
            assert m.release("x").ref.name == "x"
    finally:
        runs.kill()
        runs.wait()


def test_keep_home_leaves_out_the_vm_partition_and_the_holder_groups() -> None:
    """The threads pinwarden keeps off the isolated CPUs across a partition change are the
    host's own: those of the VM partition (a shared domain placed there by libvirt) and of
    the holder groups (on systemd hosts their slices) are not read, so never written."""
    from pinwarden.enforce.layout import LayoutNames
    from pinwarden.manager import _vm_group

    names = LayoutNames(shared="machine.slice")
    vm = ("/machine.slice", "/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/vcpu0",
          "/pinwarden\\x2dvm\\x2dweb.slice/machine-qemu\\x2d2\\x2dweb.scope/libvirt",
          "/pinwarden-vm-web.partition/emulator")
    host = ("/init.scope", "/system.slice/libvirtd.service", "/", "/machine.slice.d",
            "/user.slice/user-0.slice/session-1.scope", "/pinwarden.slice/other")
    assert [p for p in vm if not _vm_group(names, p)] == []
    assert [p for p in host if _vm_group(names, p)] == []


def test_keep_home_never_fails_the_sync_it_runs_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """It runs around the sync's cgroup writes: a /proc it cannot read keeps nothing,
    and raises nothing that would stop the sync half-way."""
    from pinwarden import noise
    from pinwarden.enforce.layout import LayoutNames
    from pinwarden.manager import _KeepHome

    def unreadable(*_: object, **__: object) -> tuple[()]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(noise, "read_host_threads", unreadable)
    keep = _KeepHome(Path("/"), Path("/sys/fs/cgroup"), LayoutNames(), CpuSet.parse_kernel("3"),
                     kthreads=True)
    keep.take()
    keep.take()
    keep.put_back(None)  # type: ignore[arg-type]  # (nothing read: the ledger is not used)
    assert keep.before == noise.HostThreads()


def test_keep_home_spans_every_cgroup_write_of_a_sync_and_ends_before_keep_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On cgroup v2 with isolcpus=, the host's threads are read before the sync's first
    cgroup write (enabling the controller resets them on 6.1, before any partition write)
    and put back after its last, before the threads kept off unguarded leased CPUs are
    moved (which putting back must not undo); a sync with nothing leased and nothing to
    put back reads nothing."""
    log: list[str] = []

    class Recorder(FailingBackend):
        def _tick(self, action: str, path: str) -> None:
            log.append(f"{action} {path}")

    class Keep:
        def take(self) -> None:
            log.append("take")

        def put_back(self, ledger: Ledger) -> None:
            log.append("put_back")

    monkeypatch.setattr(Manager, "_keep_home", lambda self, backend: Keep())
    real_keep_off = Manager._keep_off

    def keep_off(self: Manager, *args: object) -> None:
        log.append("keep_off")
        real_keep_off(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Manager, "_keep_off", keep_off)
    root = _host4(tmp_path, "0-3")
    with manager(root, tmp_path / "state", Recorder(fake4(), fail_at=-1)) as m:
        m.sync()
        assert log == ["keep_off"]  # nothing leased, nothing recorded: nothing read
        log.clear()
        m.reserve_request(JobSpec("J", cpus=C("3")))
        writes = [i for i, line in enumerate(log) if line not in ("take", "put_back",
                                                                    "keep_off")]
        assert writes and log[0] == "take", log
        assert log.index("put_back") > max(writes) and \
            log.index("keep_off") > log.index("put_back"), log
        log.clear()
        m.release("J")
        assert log[0] == "take" and log[-2:] == ["put_back", "keep_off"], log


def test_noise_records_are_read_one_way_for_the_restore_and_the_kernel_threads_put_back(
        tmp_path: Path) -> None:
    """The ledger's noise records, as both the noise restore and the kernel threads put
    back after a cgroup change read them: a refused key is never a record (it has no
    original to give back), cgroup records are not noise, and a prefix keeps only its
    kind."""
    from pinwarden.manager import _noise_records

    kthread = {"key": "kthread:81:4", "original": "2-3", "applied": "2"}
    irq = {"key": "irq:24", "original": "0-3", "applied": "0-1"}
    with Ledger(tmp_path / "state") as ledger:
        ledger.put_changes({"kthread:81:4": json.dumps(kthread), "irq:24": json.dumps(irq),
                            "kthread:90:5": json.dumps({"refused": True}),
                            "irq:25": json.dumps({"refused": True}),
                            "cgroup:/machine.slice": json.dumps({"cpus": "0-3"})})
        records, refused = _noise_records(ledger)
        assert {k: r.to_json() for k, r in records.items()} == {
            "kthread:81:4": kthread, "irq:24": irq}
        assert refused == {"kthread:90:5", "irq:25"}
        records, refused = _noise_records(ledger, prefix="kthread:")
        assert list(records) == ["kthread:81:4"] and refused == {"kthread:90:5"}


def test_no_lease_on_a_systemd_host_that_runs_cgroup_v1(tmp_path: Path) -> None:
    """systemd on cgroup v1 (``systemd.unified_cgroup_hierarchy=0``): libvirt's VMs live
    in machine.slice and systemd has no cpuset there, so pinwarden's v1 layout keeps
    nothing off a leased CPU; its first write was refused "cgroup /machine.slice (not
    managed by pinwarden) holds CPUs 0-3; free it there first" (bookworm lab booted so).
    Now the lease is refused saying what the host lacks, with nothing recorded; the same
    host without systemd leases as ever."""
    from pinwarden.errors import HostError

    class V1(FakeCpusetV1):
        kind = "v1"  # what the host's cgroup v1 backend says

    root = _host4(tmp_path, "0-3")
    (root / "run/systemd/system").mkdir(parents=True)
    backend = V1(C("0-3"))
    build(backend, {"machine": ("0-3", False)})
    before = backend.read_state([""])
    with manager(root, tmp_path / "state", backend) as m:
        with pytest.raises(HostError, match=r"this host's systemd runs cgroup v1 .* boot "
                                            r"with systemd.unified_cgroup_hierarchy=1"):
            m.reserve_request(JobSpec("J", cpus=C("3")))
        assert m.holders() == ()
    assert backend.read_state([""]) == before
    (root / "run/systemd/system").rmdir()
    with manager(root, tmp_path / "state", backend) as m:
        assert m.reserve_request(JobSpec("J", cpus=C("3"))).plan.leased() == C("3")


def test_a_read_only_state_directory_is_not_told_to_run_as_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state directory on a read-only file system: 'run as root or choose another
    --state-dir' was beside the point (root it was: hunt).  Root helps only where
    permission was denied."""
    from pinwarden.errors import LedgerError, state_dir_advice
    from pinwarden.manager import state_lock

    def read_only(self: Path, *args: object, **kw: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(LedgerError) as info, state_lock(tmp_path / "state", "x"):
        pass
    assert info.value.message == (f"cannot create a lock in {tmp_path / 'state' / 'locks'}: "
                                  "Read-only file system (choose another --state-dir)")
    assert state_dir_advice(PermissionError(errno.EACCES, "no")) == \
        "run as root or choose another --state-dir"


def test_every_sync_sweeps_the_twins_of_holder_groups_gone(host4_cgroup: Path,
                                                           tmp_path: Path) -> None:
    """The v1 backend's copies of a holder group in the other hierarchies outlive one
    removed by hand from the cpuset hierarchy (test_enforce_v1: the sweep on real
    cgroups): each sync asks the backend to sweep them, below the holders' parent, by
    the names of holder groups."""
    fake = fake4()
    asked: list[tuple[str, bool, bool]] = []

    def sweep(parent: str, is_holder: object) -> list[str]:
        assert callable(is_holder)
        asked.append((parent, is_holder("pinwarden-run-J.partition"), is_holder("machine")))
        return []

    fake.sweep_twins = sweep  # type: ignore[attr-defined]
    with Manager(Config(), host4_cgroup, tmp_path / "state", backend=fake) as m:
        m.reserve_request(JobSpec("J", cpus=C("2")))
        m.release("J")
    assert asked and all(a == ("", True, False) for a in asked), asked


@pytest.mark.parametrize("opened_first", [True, False])
def test_waiting_at_most_bounds_the_databases_lock_too(host4_cgroup: Path, tmp_path: Path,
                                                       opened_first: bool) -> None:
    """``waiting_at_most`` bounded the manager's lock file alone: behind a process holding
    the database, a shared start's ``started`` waited SQLite's 60 s, not its 20 s
    (broken-pinwarden hunt).  The ledger's wait follows it, opened before the block or
    within, and is back afterwards."""
    import sqlite3
    import time

    from pinwarden.errors import LedgerError
    from pinwarden.ledger import DB_NAME

    state = tmp_path / "state"
    with Manager(Config(), host4_cgroup, state, backend=fake4()) as m:
        m.reserve_request(JobSpec("J", cpus=C("2")))
    with Manager(Config(), host4_cgroup, state, backend=fake4()) as m:
        if opened_first:
            m.ledger()
        other = sqlite3.connect(state / DB_NAME, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            began = time.monotonic()
            with m.waiting_at_most(0.5), pytest.raises(LedgerError, match=r"locked for 0\.5 s"):
                m.ledger().put_changes({"pwtest": "1"})
            assert time.monotonic() - began < 10
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert m.ledger().busy_timeout == 60
        m.ledger().put_changes({"pwtest": "1"})


@pytest.mark.parametrize(("mode", "gives"), [
    ("cgroup", "partition cgroup (VM CPUs 0-3)"),
    ("isolcpus", "no partition (partition mode isolcpus is configured but no online CPU is "
                 "isolated")])
def test_a_mode_changed_in_the_configuration_is_said_by_host(host4: Path, tmp_path: Path,
                                                             mode: str, gives: str) -> None:
    """The configuration's mode changed while a lease is kept: what is planned against
    stays the record (09b1dd1), and 'host' said nothing — it compared the record with
    itself (README hunt).  It says what the configuration gives now, or why it gives
    none (no isolated CPU for mode isolcpus here)."""
    with manager(host4, tmp_path / "state", fake4()) as m:
        m.reserve_request(JobSpec("J", count=1))
        recorded = m.host().partition
    config = tmp_path / "pw.toml"
    config.write_text(f'[partition]\nmode = "{mode}"\n')
    assert recorded.mode != mode, recorded
    command = [sys.executable, "-c", "from pinwarden.cli import entry; entry()", "host",
               "--root", str(host4), "--state-dir", str(tmp_path / "state"), "--config",
               str(config)]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"partition {recorded.mode}: VM " in out.stdout, out.stdout  # planned against
    assert f"note: the configuration now gives {gives}" in out.stdout, out.stdout
    assert f"recorded as {recorded.mode} (VM {recorded.vm_cpus.named()})" in out.stdout
    data = json.loads(subprocess.run([*command, "--json"], capture_output=True,
                                     text=True).stdout)
    assert data["recorded_partition"]["mode"] == recorded.mode, data


@pytest.mark.parametrize("command", ["host", "status"])
def test_a_switch_from_mode_none_to_cgroup_is_said_from_the_cgroup_as_it_is(
        host4: Path, tmp_path: Path, command: str) -> None:
    """Mode none looks for no cgroup, so what it records of one is nothing: read under a
    switch to mode cgroup, the record said "no cpuset cgroup controller is mounted" (hunt
    N).  And status showed the recorded partition's reason ("partition mode none is
    configured") without a word of the switch that 'host' already noted."""
    state = tmp_path / "state"
    with Manager(Config(mode="none"), host4, state, backend=fake4()) as m:  # type: ignore[arg-type]
        m.reserve_request(JobSpec("J", count=1))
        record = m.record()
        assert record is not None and record.found.name is None
        assert record.found.looked_for == ()
    config = tmp_path / "pw.toml"
    config.write_text('[partition]\nmode = "cgroup"\n')
    out = subprocess.run([sys.executable, "-c", "from pinwarden.cli import entry; entry()",
                          command, "--root", str(host4), "--state-dir", str(state),
                          "--config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "note: the configuration now gives partition cgroup (VM CPUs 0-3); at the " \
           "first lease the host was recorded as none (VM CPUs 1-3)" in out.stdout, out.stdout
    assert "no cpuset cgroup controller" not in out.stdout


class _Killed(BaseException):
    """The process died here (SIGKILL): no handler of pinwarden's runs."""


class _DiesAfter(FakeCpusetV1):
    """The in-memory cpuset whose process is killed right after writing ``path``'s CPUs
    (once, when ``armed``)."""

    def __init__(self, online: CpuSet, path: str) -> None:
        super().__init__(online)
        self.path = path
        self.armed = False

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        super().set_cpus(path, cpus)
        if self.armed and path == self.path:
            self.armed = False
            raise _Killed


@pytest.mark.parametrize("killed_after", ["machine", "machine/qemu-1-a.libvirt-qemu"])
def test_a_kill_while_the_last_release_widens_is_finished_by_the_next_sync(
        host4: Path, tmp_path: Path, killed_after: str) -> None:
    """The last release widens ``machine`` and then the groups of the shared VM below it,
    which followed it when the lease narrowed it.  Killed in between (crash hunt), the VM's
    groups were left on the housekeeping CPUs: the next ``sync`` read them as CPUs of
    their own, made 0 changes, and took pinwarden's own half-finished write for somebody
    else's edit.  Now the next sync plans from what the groups held before the cut-short
    write began: the VM's groups get every CPU back, and nothing is said."""
    vm = "machine/qemu-1-a.libvirt-qemu"
    fake = _DiesAfter(C("0-3"), killed_after)
    build(fake, {"machine": ("0-3", False), vm: ("0-3", False),
                 f"{vm}/vcpu0": ("0-3", False), f"{vm}/emulator": ("0-3", False)},
          tasks={f"{vm}/vcpu0": [GONE_TID], f"{vm}/emulator": [GONE_TID + 1]})
    said: list[str] = []
    with manager(host4, tmp_path / "state", fake) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert {fake.read_group(p).cpus for p in ("machine", vm, f"{vm}/vcpu0")} \
            == {C("0-2")}
        fake.armed = True
        with pytest.raises(_Killed):
            m.drop(job_holder("J"))
    assert fake.read_group(f"{vm}/vcpu0").cpus == C("0-2")  # cut short
    with Manager(Config(), host4, tmp_path / "state", backend=fake,  # type: ignore[arg-type]
                 warn=said.append) as m:
        m.sync()
        for path in ("machine", vm, f"{vm}/vcpu0", f"{vm}/emulator"):
            assert fake.read_group(path).cpus == C("0-3"), path
        assert said == [], said
        assert m.record() is None and m.ledger().changes() == {}


#: Run in a process of its own: ``pinwarden release`` whose process dies (``os._exit``: no
#: handler, no ``finally``, as under SIGKILL) right after it wrote ``machine``'s CPUs.
_RELEASE_KILLED_AFTER_MACHINE = """
import os, sys
from pinwarden.cli import main
from pinwarden.enforce import v1

write = v1.CpusetV1.set_cpus

def set_cpus(self, path, cpus):
    write(self, path, cpus)
    if path == "machine":
        os._exit(137)

v1.CpusetV1.set_cpus = set_cpus
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.kernel
def test_a_release_killed_after_widening_machine_is_finished_by_sync(
        real_machine: None, tmp_path: Path) -> None:
    """This host's cgroup v1: a shared VM's groups below ``machine`` (one with a task)
    follow it to CPU 0 while CPU 1 is leased.  The release is killed right after it wrote
    ``machine`` back to 0-1; ``pinwarden sync`` gives the VM's groups CPU 1 back, and does
    not call pinwarden's own write somebody else's edit."""
    from libvirt_env import tiny_domain_xml

    tag = f"pwtest-kill-{os.getpid()}"
    vm = CPUSET / "machine" / f"{tag}.libvirt-qemu"
    online = (CPUSET / "cpuset.cpus").read_text().strip()
    config = tmp_path / "pw.toml"
    config.write_text(f'[partition]\nexclusive = "{tag}.partition"\n')
    base = ["--state-dir", str(tmp_path / "state"), "--config", str(config)]
    xml = tmp_path / "d.xml"
    xml.write_text(tiny_domain_xml(f"{tag}-x", exclusive=True))
    sleeper = None
    try:
        for group in (vm, vm / "vcpu0"):
            group.mkdir()
            (group / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
            (group / "cpuset.cpus").write_text(online)
        sleeper = subprocess.Popen(["sleep", "600"])
        (vm / "vcpu0" / "tasks").write_text(str(sleeper.pid))
        done = subprocess.run([PINWARDEN, "reserve", str(xml), *base], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (vm / "vcpu0" / "cpuset.cpus").read_text().strip() == "0"
        killed = subprocess.run([sys.executable, "-c", _RELEASE_KILLED_AFTER_MACHINE,
                                 "release", f"{tag}-x", *base], capture_output=True,
                                text=True, timeout=120)
        assert killed.returncode == 137, killed.stderr
        assert (CPUSET / "machine" / "cpuset.cpus").read_text().strip() == online
        assert (vm / "vcpu0" / "cpuset.cpus").read_text().strip() == "0"  # cut short

        def notes() -> list[str]:
            shown = subprocess.run([PINWARDEN, "status", "--json", *base],
                                   capture_output=True, text=True, timeout=120)
            assert shown.returncode == 0, shown.stderr
            return [n for n in json.loads(shown.stdout)["notes"] if "cut short" in n]

        assert notes() == ["a cgroup change was cut short (pinwarden was killed, or its "
                           "rollback failed): the cgroups are half-way until the next "
                           "change; 'pinwarden sync' finishes it now"]
        done = subprocess.run([PINWARDEN, "sync", *base], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert "someone else" not in done.stderr, done.stderr
        assert notes() == []
        for group in (vm, vm / "vcpu0"):
            assert (group / "cpuset.cpus").read_text().strip() == online, group
        with Ledger(tmp_path / "state") as ledger:
            assert ledger.host_record() is None and ledger.changes() == {}
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        subprocess.run([PINWARDEN, "release", "--force", f"{tag}-x", *base],
                       capture_output=True, timeout=120)
        remove_tree(f"machine/{tag}.libvirt-qemu")
        for holder in CPUSET.glob(f"{tag}*"):
            remove_tree(holder.name)


def test_an_edit_that_breaks_a_sync_whose_rollback_fails_is_still_taken(
        tmp_path: Path) -> None:
    """The systemd story: an administrator's write of the VM partition landed in the middle
    of a sync (after pinwarden narrowed ``machine`` for a new lease), the kernel refused the
    rest, and the rollback failed too.  What pinwarden had last written was then unknown,
    and the next sync overwrote the edit without a word.  Now the record of the cut-short
    write says what ``machine`` held before it, and the edit is taken from that."""
    root = _host4(tmp_path, "1-3")  # mode cgroup: VM CPUs 1-3

    class EditedMidway(FakeCpusetV1):
        armed = False

        def set_cpus(self, path: str, cpus: CpuSet) -> None:
            super().set_cpus(path, cpus)
            if self.armed and path == "machine":  # pinwarden's narrowing, then theirs
                self.armed = False
                super().set_cpus("machine", C("0-1"))
                self.fail_at[("cpus", "machine")] = errno.EIO  # the rollback's write
                self.fail_at[("partition", "pinwarden-run-K.partition")] = errno.EINVAL

    fake = EditedMidway(C("0-3"))
    build(fake, {"machine": ("1-3", False)})
    said: list[str] = []
    with Manager(Config(), root, tmp_path / "state", backend=fake, warn=said.append) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        assert fake.read_group("machine").cpus == C("1-2")
        fake.armed = True
        with pytest.raises(EnforceError, match="ROLLBACK FAILED"):
            m.reserve_request(JobSpec("K", cpus=C("2")))
        m.sync()  # (the failed reservation's own sync of J's layout may take it first)
        assert fake.read_group("machine").cpus == C("0-1")  # theirs, not overwritten
        assert len(said) == 1 and "changed by someone else" in said[0] \
            and "added CPU 0" in said[0] and "removed CPU 2" in said[0], said
        assert m.host().partition.vm_cpus == C("0-1,3")
        m.drop(job_holder("J"))
        assert fake.read_group("machine").cpus == C("0-1,3")  # the edit, with CPU 3 back
        assert m.record() is None and m.ledger().changes() == {}


def test_a_kill_after_the_last_releases_writes_before_its_records_warns_of_nothing(
        host4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cgroup write of the last release done, the process killed before the shared
    group's record was forgotten: the record of the write had gone first, and the next
    sync called ``machine``'s CPUs back "changed by someone else" (kill hunt).  The record
    of the write now goes last."""
    fake = fake4()
    state = tmp_path / "state"
    real = Ledger.forget_changes

    def killed(self: Ledger, keys: object) -> None:
        wanted = list(keys)  # type: ignore[call-overload]
        if "cgroup:machine" in wanted:
            raise _Killed
        real(self, wanted)

    with manager(host4, state, fake) as m:
        m.reserve_request(JobSpec("J", cpus=C("3")))
        monkeypatch.setattr(Ledger, "forget_changes", killed)
        with pytest.raises(_Killed):
            m.drop(job_holder("J"))
        monkeypatch.setattr(Ledger, "forget_changes", real)
    assert fake.read_group("machine").cpus == C("0-3")
    said: list[str] = []
    with Manager(Config(), host4, state, backend=fake, warn=said.append) as m:
        m.sync()
        assert said == [], said
        assert m.record() is None and m.ledger().changes() == {}
