"""``pinwarden run`` on this host's real cgroup v1 cpuset hierarchy (marker ``kernel``).

The shared partition is the real ``machine`` (libvirt's, holding every CPU until pinwarden
narrows it) — an exclusive sibling is impossible otherwise — and the exclusive tree is a
``pwtest-…`` one.  ``machine``'s CPUs are put back afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_env import CPUSET, PINWARDEN, Pinwarden, machine_restored
from pinwarden.ledger import Ledger

pytestmark = pytest.mark.kernel

#: Inside the job: its cpuset cgroup, that group's cpu_exclusive and cpus, its affinity.
PROBE = ("p=$(sed -n 's/^[0-9]*:cpuset://p' /proc/self/cgroup); echo \"group=$p\"; "
         "echo \"exclusive=$(cat " + str(CPUSET) + "$p/cpuset.cpu_exclusive)\"; "
         "echo \"cpus=$(cat " + str(CPUSET) + "$p/cpuset.cpus)\"; "
         "grep Cpus_allowed_list /proc/self/status")


def run_cmd(pw: Pinwarden, *args: str) -> list[str]:
    """``pinwarden run`` with the test's state dir and config before the job's command."""
    return [PINWARDEN, "run", "--state-dir", str(pw.state), "--config", str(pw.config), *args]


def run(pw: Pinwarden, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(run_cmd(pw, *args), capture_output=True, text=True, timeout=120)


@pytest.fixture
def pw(tmp_path: Path) -> Iterator[Pinwarden]:
    if os.geteuid() != 0 or not (CPUSET / "cpuset.cpus").exists():
        pytest.fail(f"needs root and the cgroup v1 cpuset hierarchy at {CPUSET}")
    pw = Pinwarden.make(tmp_path, f"pwtest-run-{os.getpid()}.partition")
    with machine_restored():
        try:
            yield pw
        finally:
            pw.cleanup()


def test_job_runs_in_an_exclusive_cpuset_and_passes_its_status(pw: Pinwarden) -> None:
    done = run(pw, "--exclusive", "1", "--name", "pwtest-job", "--", "sh", "-c",
               PROBE + "; sleep 0.5; echo supervisor=$(sed -n 's/^Cpus_allowed_list:\t//p' "
               "/proc/$PPID/status); exit 7")
    assert done.returncode == 7, done.stderr
    out = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert out["group"] == f"/{pw.holder_group('pwtest-job', 'run')}"
    assert out["exclusive"] == "1"
    assert out["cpus"] == "1"  # CPU 0 is the host reserve, never leased
    assert "Cpus_allowed_list:\t1" in done.stdout
    # the supervisor (the job's parent, in the root cpuset) waits off the job's CPU
    assert "supervisor=0\n" in done.stdout, done.stdout
    # released and removed when the command ended
    assert not (CPUSET / pw.holder_group("pwtest-job", "run")).exists()
    assert "no holders" in pw.run("status", check=True).stdout


def test_second_exclusive_job_is_refused_naming_the_first(pw: Pinwarden) -> None:
    first = subprocess.Popen(run_cmd(pw, "--exclusive", "1", "--name", "pwtest-first", "--",
                                     "sleep", "30"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "pwtest-first" not in pw.run("status").stdout:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first job never got its lease"
            time.sleep(0.1)
        second = run(pw, "--exclusive", "1", "--name", "pwtest-second", "--", "true")
        assert second.returncode == 1
        assert second.stderr.startswith("pinwarden: error: ")
        assert "CPU 1 to job 'pwtest-first'" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    # SIGTERM was forwarded: sleep died of it, and the supervisor passed that on
    assert first.returncode == 128 + signal.SIGTERM
    assert "no holders" in pw.run("status", check=True).stdout


NOISE = ("for i in /proc/irq/*/smp_affinity_list; do printf '%s=%s ' \"$i\" \"$(cat $i)\"; "
         "done; echo; echo default=$(cat /proc/irq/default_smp_affinity); "
         "echo workqueue=$(cat /sys/devices/virtual/workqueue/cpumask)")


def _noise() -> str:
    return subprocess.run(["sh", "-c", NOISE], capture_output=True, text=True,
                          check=True).stdout


def test_host_noise_leaves_the_leased_cpu_and_comes_back(pw: Pinwarden) -> None:
    """Issue #11 on this host's real /proc/irq and workqueue mask: while the job holds CPU
    1, every IRQ the kernel lets move, the default IRQ affinity and the unbound-workqueue
    mask are off it; afterwards every file reads exactly as before."""
    before = _noise()
    done = run(pw, "--exclusive", "1", "--", "sh", "-c", NOISE)
    assert done.returncode == 0, done.stderr
    during = dict(line.split("=", 1) for line in done.stdout.splitlines()[1:] if "=" in line)
    assert int(during["default"], 16) & 0b10 == 0, during
    assert int(during["workqueue"], 16) & 0b10 == 0, during
    irqs = dict(item.split("=", 1) for item in done.stdout.splitlines()[0].split())
    moved = [irq for irq, cpus in irqs.items() if cpus == "0"]
    kept = {irq: cpus for irq, cpus in irqs.items() if cpus != "0"}
    assert moved, irqs  # most IRQs here can move
    with Ledger(pw.state) as ledger:  # the last lease went: nothing is left to put back
        assert ledger.changes() == {} and ledger.host_record() is None
    assert _noise() == before
    assert all("1" in cpus for cpus in kept.values())  # the kernel refused those (managed)


def test_dry_run_says_what_a_job_would_change_and_changes_nothing(pw: Pinwarden) -> None:
    machine = (CPUSET / "machine" / "cpuset.cpus").read_text()
    done = run(pw, "--dry-run", "--exclusive", "1", "--name", "pwtest-dry", "--",
               "touch", str(pw.state.parent / "ran"))
    assert done.returncode == 0, done.stderr
    group = pw.holder_group("pwtest-dry", "run")
    lines = done.stdout.splitlines()
    assert lines[0] == "dry run: pwtest-dry would lease CPU 1 exclusively", done.stdout
    assert f"  would create {group}" in lines and f"  would make {group} exclusive" in lines
    assert lines.index("  would set cpus of machine to 0") < lines.index(f"  would create {group}")
    assert f"in cgroup /{group}" in done.stdout and lines[-1] == "nothing was changed"
    assert not (pw.state.parent / "ran").exists() and not pw.state.exists()
    assert not (CPUSET / group).exists()
    assert (CPUSET / "machine" / "cpuset.cpus").read_text() == machine



def test_a_kernel_thread_moved_to_the_one_housekeeping_cpu_comes_back(pw: Pinwarden) -> None:
    """kthreadd (movable) may run on both CPUs; while CPU 1 is leased pinwarden moves it to
    CPU 0 alone — which makes it look per-CPU — and puts it back afterwards."""
    kthreadd = 2
    found = os.sched_getaffinity(kthreadd)
    online = os.sched_getaffinity(0) | found
    try:
        os.sched_setaffinity(kthreadd, online)
        done = run(pw, "--exclusive", "1", "--", "grep", "Cpus_allowed_list",
                   f"/proc/{kthreadd}/status")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == "0", done.stdout  # off the leased CPU
        assert os.sched_getaffinity(kthreadd) == online  # and back, exactly
    finally:
        os.sched_setaffinity(kthreadd, found)


def test_threads_outside_the_holders_leave_an_unguarded_leased_cpu_and_come_back(
        pw: Pinwarden) -> None:
    """The manager's step for CPUs the kernel cannot guard (Linux 6.12 refuses partitions
    over isolcpus CPUs, so holder groups there are plain cpusets): a thread of another
    cgroup that may run on the leased CPU is moved off it, its affinity recorded, and put
    back exactly when the CPU is free.  Real threads, /proc and sched_setaffinity; the
    story on 6.12 itself is the trixie lab's ``story_isolcpus``."""
    from pinwarden.config import load_config
    from pinwarden.cpuset import EMPTY, CpuSet
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    group = CPUSET / f"pwtest-keepoff-{os.getpid()}"
    group.mkdir()
    child = None
    try:
        (group / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
        (group / "cpuset.cpus").write_text("0-1")
        # a process that starts a thread when told to (as libvirtd starts workers)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys, threading, time\n"
             "sys.stdin.readline()\n"
             "t = threading.Thread(target=time.sleep, args=(120,), daemon=True)\n"
             "t.start()\nprint(t.native_id, flush=True)\ntime.sleep(120)\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        (group / "tasks").write_text(str(child.pid))
        assert os.sched_getaffinity(child.pid) == {0, 1}
        assert child.stdin is not None and child.stdout is not None
        with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
            # no owner process: the child must not count as the holder's
            reserved = manager.reserve_request(JobSpec(name="pwtest-keepoff", count=1),
                                               owner_pid=None, enforce=False)
            assert reserved.plan.cpus() == CpuSet.of([1])
            with manager.locked():
                ledger = manager.ledger()
                manager._keep_off(ledger, manager.host(), ledger.leases(), CpuSet.of([1]))
                keys = [k for k in ledger.changes() if k.startswith(f"task:{child.pid}:")]
            assert os.sched_getaffinity(child.pid) == {0}
            assert len(keys) == 1, keys
            # a thread started now inherits the narrowed affinity and is not recorded
            child.stdin.write("go\n")
            child.stdin.flush()
            worker = int(child.stdout.readline())
            assert os.sched_getaffinity(worker) == {0}
            with manager.locked():  # the CPU is free again
                manager._keep_off(ledger, manager.host(), (), EMPTY)
                assert not [k for k in ledger.changes() if k.startswith("task:")]
            assert os.sched_getaffinity(child.pid) == {0, 1}
            assert os.sched_getaffinity(worker) == {0, 1}  # back with its process
    finally:
        if child is not None:
            child.kill()
            child.wait()
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_processes_a_job_leaves_behind_keep_its_lease_until_they_exit(pw: Pinwarden) -> None:
    """The command exits, a process it started runs on in the job's group.  The lease was
    freed all the same while the kernel kept CPU 1 exclusive for that process: status and
    audit said free, and a shared VM planned there failed in libvirt (real-libvirt hunt).
    Now the lease stays, owned by that process, until it exits; the next change frees it
    and removes the group."""
    group = pw.holder_group("pwtest-heir", "run")
    done = run(pw, "--exclusive", "1", "--name", "pwtest-heir", "--", "sh", "-c",
               "sleep 60 </dev/null >/dev/null 2>&1 & echo heir=$!; exit 7")
    assert done.returncode == 7, done.stderr
    heir = int(done.stdout.split("heir=")[1].split()[0])
    try:
        assert f"its CPUs stay leased to them (process {heir} owns the lease now)" in \
            done.stderr, done.stderr
        with Ledger(pw.state) as ledger:
            (record,) = ledger.holders()
        assert record.ref.name == "pwtest-heir" and record.owner_pid == heir
        assert record.plan.leased().to_list() == "1"
        assert (CPUSET / group / "cpuset.cpu_exclusive").read_text().strip() == "1"
        pw.run("sync", check=True)  # the heir runs: nothing to free
        with Ledger(pw.state) as ledger:
            assert [h.owner_pid for h in ledger.holders()] == [heir]
    finally:
        os.kill(heir, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{heir}").exists():
        assert time.monotonic() < deadline, "the heir did not exit"
        time.sleep(0.1)
    pw.run("sync", check=True)
    assert "no holders" in pw.run("status", check=True).stdout
    assert not (CPUSET / group).exists()
