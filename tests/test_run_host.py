"""``pinwarden run`` on this host's real cgroup v1 cpuset hierarchy (marker ``kernel``).

The shared partition is the real ``machine`` (libvirt's, holding every CPU until pinwarden
narrows it) — an exclusive sibling is impossible otherwise — and the exclusive tree is a
``pwtest-…`` one.  ``machine``'s CPUs are put back afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_env import CPUSET, PINWARDEN, Daemon, Pinwarden, dead_job, machine_restored
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


def test_a_job_whose_json_reader_went_away_keeps_its_commands_status(pw: Pinwarden) -> None:
    """``pinwarden run --json … -- CMD | true``: the reader of the JSON was gone when the
    command finished, and pinwarden exited 0 — not the command's status (CLI hunt)."""
    read, write = os.pipe()
    os.close(read)  # the reader went away
    try:
        done = subprocess.run(run_cmd(pw, "--json", "--exclusive", "1", "--name",
                                      "pwtest-pipe", "--", "sh", "-c", "exit 3"),
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 3 and done.stderr == "", (done.returncode, done.stderr)
    assert "no holders" in pw.run("status", check=True).stdout


def test_run_json_keeps_standard_output_to_the_json_document(pw: Pinwarden) -> None:
    """``run --json``: the command's own standard output came first on standard output,
    and the JSON document after it could not be read as one (hunt).  The command's output
    goes to standard error now; standard output is the document."""
    done = subprocess.run(run_cmd(pw, "--json", "--exclusive", "1", "--name", "pwtest-json",
                                  "--", "sh", "-c", "echo from-the-job; exit 4"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr
    assert json.loads(done.stdout) == {"schema": 1, "job": "pwtest-json", "exit_status": 4}
    assert done.stderr == "from-the-job\n", done.stderr


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


def _in_pid_namespace(cmd: list[str]) -> list[str]:
    """``cmd`` in a PID namespace of its own with its own /proc (a container's view: none
    of the host's processes, kernel threads included)."""
    return ["unshare", "--pid", "--fork", "--mount-proc", *cmd]


@contextlib.contextmanager
def _ended(job: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``job`` (a short ``pinwarden run``), over before the test goes on, even when it
    fails: one that outlived its test held its CPU, and a group nobody removed, for the
    next test."""
    try:
        yield job
    finally:
        if job.poll() is None:
            job.communicate(timeout=60)


def _listed(pw: Pinwarden, name: str, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 30
    while name not in (out := pw.run("status").stdout):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{name} never got its lease"
        time.sleep(0.1)
    return out


def test_a_pid_namespace_of_its_own_frees_no_running_job_and_loses_no_kernel_thread(
        pw: Pinwarden) -> None:
    """A pid names a process only in its PID namespace.  A 'pinwarden sync' in one of its
    own (a container's /proc) took the host job's owner for dead: it freed the lease while
    the job ran (its group then refused to go, EBUSY) and forgot the kernel threads moved
    off the job's CPU, which stayed on CPU 0 for good (hunt M).  Now an owner recorded in
    another namespace is never judged, and threads out of view are kept for the host."""
    kthreadd = 2
    found = os.sched_getaffinity(kthreadd)
    online = os.sched_getaffinity(0) | found
    group = CPUSET / pw.holder_group("pwtest-nsjob", "run")
    sync = [PINWARDEN, "sync", "--state-dir", str(pw.state), "--config", str(pw.config)]
    with _host_noise_restored():
        os.sched_setaffinity(kthreadd, online)
        # a host job, a sync in a namespace of its own while it runs
        with _ended(subprocess.Popen(run_cmd(pw, "--cpus", "1", "--name", "pwtest-nsjob",
                                             "--", "sleep", "6"), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) as job:
            _host_job_beside_a_pid_namespace(pw, job, group, sync)
        assert job.returncode == 0, job.communicate()
        assert os.sched_getaffinity(kthreadd) == online and not group.exists()
        with Ledger(pw.state) as ledger:
            assert ledger.changes() == {} and ledger.holders() == ()

        # a job in a namespace of its own, a sync on the host while it runs
        with _ended(subprocess.Popen(_in_pid_namespace(run_cmd(
                pw, "--cpus", "1", "--name", "pwtest-nsjob", "--", "sleep", "6")),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) as job:
            _listed(pw, "pwtest-nsjob", job)
            assert pw.run("sync", check=True).returncode == 0
            assert "job 'pwtest-nsjob': 1" in pw.run("status", check=True).stdout
            assert os.sched_getaffinity(kthreadd) == {0}  # (moved by the host's sync)
        assert job.returncode == 0, job.communicate()
        # its release could not see them: kept, said, and put back by the host's sync
        status = pw.run("status", check=True).stdout
        assert "no holders" in status and "not back yet" in status, status
        assert os.sched_getaffinity(kthreadd) == {0}
        assert pw.run("sync", check=True).returncode == 0
        assert os.sched_getaffinity(kthreadd) == online
        with Ledger(pw.state) as ledger:
            assert ledger.changes() == {} and ledger.holders() == ()
        assert "not back yet" not in pw.run("status", check=True).stdout
    os.sched_setaffinity(kthreadd, found)


def _host_job_beside_a_pid_namespace(pw: Pinwarden, job: subprocess.Popen[str],
                                     group: Path, sync: list[str]) -> None:
    """While host job ``job`` runs: a sync in a PID namespace of its own keeps its lease,
    status there says its owner is of another namespace, and audit there is incomplete."""
    _listed(pw, "pwtest-nsjob", job)
    inside = subprocess.run(_in_pid_namespace(sync), capture_output=True, text=True,
                            timeout=120)
    assert inside.returncode == 0, inside.stderr
    status = pw.run("status", check=True).stdout
    assert "job 'pwtest-nsjob': 1" in status and "kept without a lease" not in status
    assert group.is_dir() and os.sched_getaffinity(2) == {0}  # (kthreadd, moved off)
    seen_inside = subprocess.run(_in_pid_namespace([*sync[:1], "status", *sync[2:]]),
                                 capture_output=True, text=True, timeout=120).stdout
    # audit there sees none of the host's threads: not "clean" (hunt O), incomplete
    audit = subprocess.run(_in_pid_namespace([*sync[:1], "audit", *sync[2:]]),
                           capture_output=True, text=True, timeout=120)
    assert audit.returncode == 2, audit
    assert "INCOMPLETE" in audit.stdout and "not checked: the threads of the host's " \
        "other processes: this PID namespace shows only its own" in audit.stdout, audit
    assert "(a pid of another PID namespace, not of this one)" in \
        seen_inside, seen_inside


def test_status_from_a_cgroup_namespace_does_not_call_a_group_out_of_view_missing(
        pw: Pinwarden) -> None:
    """From a cgroup namespace below the job's group (its cpuset hierarchy mounted
    afresh: a container's view), status said "GROUP MISSING … removed by hand; 'pinwarden
    sync' makes it again" of a job that ran in it (hunt N).  On the host it is checked."""
    view = CPUSET / f"pwtest-cgns-{os.getpid()}"
    job = subprocess.Popen(run_cmd(pw, "--cpus", "1", "--name", "pwtest-cgns", "--",
                                   "sleep", "30"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _listed(pw, "pwtest-cgns", job)
        view.mkdir()
        (view / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
        (view / "cpuset.cpus").write_text("0")
        def quoted(*args: str) -> str:
            return " ".join(shlex.quote(a) for a in pw.cmd(*args))

        before = pw.run("status", check=True).stdout
        # status, and the commands that would change groups (refused there: a sync made
        # the holder group again inside its view, and failed saying to widen the parent)
        script = (f"{quoted('status')}; {quoted('sync')}; echo sync=$?; "
                  f"{quoted('run', '--cpus', '1', '--', 'true')}; echo run=$?")
        inside = subprocess.run(
            ["sh", "-c", f"echo $$ > {view}/tasks && exec unshare --cgroup --mount sh -c "
             f"'umount {CPUSET} && mount -t cgroup -o cpuset cpuset {CPUSET} && "
             f"{script}'"], capture_output=True, text=True, timeout=120)
        assert inside.returncode == 0, inside.stderr
        line = next(ln for ln in inside.stdout.splitlines() if "job 'pwtest-cgns'" in ln)
        group = pw.holder_group("pwtest-cgns", "run")
        assert "GROUP MISSING" not in line and \
            f"group /{group} not checked (out of view: this cgroup namespace" in line, line
        assert "sync=1" in inside.stdout and "run=1" in inside.stdout, inside.stdout
        refusal = ("this cgroup namespace shows only part of the cpuset hierarchy (the groups "
                   "of processes above its root read /..): 'pinwarden {}' would change groups "
                   "out of its view as if they were not there; run it on the host; nothing "
                   "was changed")
        assert refusal.format("sync") in inside.stderr, inside.stderr
        assert refusal.format("run") in inside.stderr, inside.stderr
        assert (CPUSET / group).is_dir() and not (view / group).exists()
        after = pw.run("status", check=True).stdout  # on the host: checked, as before
        assert "not checked" not in after and "GROUP MISSING" not in after, after
        assert [ln for ln in after.splitlines() if ln.startswith("leased ")] == \
            [ln for ln in before.splitlines() if ln.startswith("leased ")]
    finally:
        job.send_signal(signal.SIGTERM)  # (forwarded to its sleep)
        job.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while view.exists():
            with contextlib.suppress(OSError):
                view.rmdir()
            assert time.monotonic() < deadline, f"{view} stayed"
            time.sleep(0.1)


@pytest.mark.parametrize("vm", [False, True], ids=["host-cgroup", "vm-cgroup"])
def test_threads_outside_the_holders_leave_an_unguarded_leased_cpu_and_come_back(
        pw: Pinwarden, vm: bool) -> None:
    """The manager's step for CPUs the kernel cannot guard (Linux 6.12 refuses partitions
    over isolcpus CPUs, so holder groups there are plain cpusets): a thread of another
    cgroup that may run on the leased CPU is moved off it, its affinity recorded, and put
    back exactly when the CPU is free.  Real threads, /proc and sched_setaffinity; the
    story on 6.12 itself is the trixie lab's ``story_isolcpus``.  Also the threads of a VM
    outside the VM partition (a shared domain in a ``<resource><partition>`` of its own,
    pinned live onto the leased CPU: they ran there, the systemd lab's hunt on 6.12)."""
    from pinwarden.config import load_config
    from pinwarden.cpuset import EMPTY, CpuSet
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    top = CPUSET / f"pwtest-keepoff-{os.getpid()}"
    group = top / "qemu-9-pwtest-cust.libvirt-qemu" if vm else top
    child = None
    try:
        for made in dict.fromkeys((top, group)):
            made.mkdir()
            (made / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
            (made / "cpuset.cpus").write_text("0-1")
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
        for made in dict.fromkeys((group, top)):
            for _ in range(50):
                try:
                    made.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def _gone_and_synced(pw: Pinwarden, heir: int, group: str) -> None:
    """Once the process a job left has exited, the next change frees the lease and removes
    the job's group."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{heir}").exists():
        assert time.monotonic() < deadline, "the heir did not exit"
        time.sleep(0.1)
    pw.run("sync", check=True)
    assert "no holders" in pw.run("status", check=True).stdout
    assert not (CPUSET / group).exists()


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
    _gone_and_synced(pw, heir, group)


def test_a_job_whose_command_exited_is_held_by_what_it_left_until_that_exits(
        pw: Pinwarden) -> None:
    """The process that took the lease at the job's end exits too, while another the
    command started runs on.  ``status``, ``audit`` and ``metrics`` said the CPU free
    ("OWNER GONE"), and a plain ``release`` freed it while the kernel kept it exclusive for
    that process (hunt).  Now the read-only commands count the job as running, and the
    release is refused naming the process that runs, which owns the lease from then on."""
    import json

    group = pw.holder_group("pwtest-left", "run")
    done = run(pw, "--exclusive", "1", "--name", "pwtest-left", "--", "sh", "-c",
               "sleep 1 </dev/null >/dev/null 2>&1 & sleep 60 </dev/null >/dev/null 2>&1 & "
               "echo heir=$!; exit 0")
    assert done.returncode == 0, done.stderr
    heir = int(done.stdout.split("heir=")[1].split()[0])
    try:
        with Ledger(pw.state) as ledger:
            (record,) = ledger.holders()
        first = record.owner_pid
        assert first is not None and first != heir  # the lowest pid: 'sleep 1'
        deadline = time.monotonic() + 30
        while Path(f"/proc/{first}").exists():
            assert time.monotonic() < deadline, "'sleep 1' did not exit"
            time.sleep(0.1)
        status = json.loads(pw.run("status", "--json", check=True).stdout)
        (lease,) = status["leases"]
        assert lease["owner_gone"] is False and heir in lease["left_running"], lease
        assert status["leased"] == "1"
        text = pw.run("status", check=True).stdout
        assert "OWNER GONE" not in text and f"pid {heir}" in text, text
        metrics = pw.run("metrics", "--no-audit", check=True).stdout
        assert 'pinwarden_vm_cpus{node="0",state="leased"} 1.0' in metrics, metrics
        audit = pw.run("audit", "--json")
        assert [le["cpu"] for le in json.loads(audit.stdout)["leases"]] == [1], audit.stdout
        refused = pw.run("release", "pwtest-left", "--driver", "run")
        assert refused.returncode == 1, refused
        assert f"still runs (pid {heir}) on CPU 1" in refused.stderr, refused.stderr
        with Ledger(pw.state) as ledger:
            assert [h.owner_pid for h in ledger.holders()] == [heir]
        assert (CPUSET / group / "cpuset.cpu_exclusive").read_text().strip() == "1"
    finally:
        os.kill(heir, signal.SIGTERM)
    _gone_and_synced(pw, heir, group)


def test_a_job_released_by_force_while_it_ran_puts_the_host_back_when_it_ends(
        pw: Pinwarden) -> None:
    """``release --force`` of a running job: its group stays while the command runs in
    it (the kernel keeps its tasks there).  At the command's end the group went only at
    the next change pinwarden made, ``machine`` stayed narrowed meanwhile, and the job
    warned of processes that did not exist (hunt)."""
    machine = CPUSET / "machine" / "cpuset.cpus"
    before = machine.read_text().strip()
    group = pw.holder_group("pwtest-forced", "run")
    job = subprocess.Popen(run_cmd(pw, "--exclusive", "1", "--name", "pwtest-forced", "--",
                                   "sleep", "5"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (CPUSET / group / "tasks").exists() or \
                not (CPUSET / group / "tasks").read_text().strip():
            assert time.monotonic() < deadline and job.poll() is None, job.stderr
            time.sleep(0.05)
        default = Path("/proc/irq/default_smp_affinity")
        assert int(default.read_text(), 16) & 0b10 == 0  # (noise off the leased CPU)
        pw.run("release", "pwtest-forced", "--driver", "run", "--force", check=True)
        # its group kept while the command runs there: so is the noise off its CPU (it
        # came back at once: hunt O), and kernel threads are put back once it ends
        assert job.poll() is None, "the job ended before its forced release was checked"
        assert int(default.read_text(), 16) & 0b10 == 0, default.read_text()
        _out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, err
    assert "still run" not in err, err
    assert not (CPUSET / group).exists()
    assert machine.read_text().strip() == before
    assert "no holders" in pw.run("status", check=True).stdout


def test_a_holder_group_an_interrupted_release_left_is_reported_and_synced_away(
        pw: Pinwarden) -> None:
    """A release killed between the ledger's commit and the layout's shrink (the hook at
    'release', hunt) leaves the holder's group on CPU 1 and ``machine`` narrowed: status
    said 'no holders' and 'audit --strict' passed.  Now audit warns, naming the group and
    what to do, and ``sync`` removes it."""
    import json

    from pinwarden.config import load_config
    from pinwarden.manager import Manager
    from pinwarden.model import job_holder
    from pinwarden.policy import JobSpec

    machine = CPUSET / "machine" / "cpuset.cpus"
    before = machine.read_text().strip()
    group = pw.holder_group("pwtest-stale", "run")
    with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
        manager.reserve_request(JobSpec("pwtest-stale", count=1), owner_pid=os.getpid())
    assert (CPUSET / group / "cpuset.cpu_exclusive").read_text().strip() == "1"
    with Ledger(pw.state) as ledger:  # the release's commit, and no shrink after it
        assert ledger.drop(job_holder("pwtest-stale")) is not None
    assert "no holders" in pw.run("status", check=True).stdout
    strict = pw.run("audit", "--strict", "--json")
    assert strict.returncode == 1, strict
    found = [i for i in json.loads(strict.stdout)["intruders"]
             if i["kind"] == "stale-holder-group"]
    assert [(i["cgroup"], i["cpus"], i["severity"]) for i in found] == [
        (f"/{group}", "1", "warning")], found
    assert "'pinwarden sync' removes it" in pw.run("audit").stdout
    pw.run("sync", check=True)
    assert not (CPUSET / group).exists()
    assert machine.read_text().strip() == before
    assert pw.run("audit", "--strict").returncode == 0


def test_a_holder_group_made_not_exclusive_and_widened_is_reported_and_synced_back(
        pw: Pinwarden) -> None:
    """Somebody turns the holder group's ``cpu_exclusive`` off and widens it onto the host's
    CPU: nothing runs on the leased CPU yet, so audit exited 0 and status said nothing,
    while the kernel no longer kept ``machine`` off it (lifecycle hunt F8).  Now audit
    fails naming the group, status says so, and ``sync`` puts both back."""
    from pinwarden.config import load_config
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    group = CPUSET / pw.holder_group("pwtest-noexcl", "run")
    with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
        manager.reserve_request(JobSpec("pwtest-noexcl", count=1), owner_pid=os.getpid())
    try:
        assert (group / "cpuset.cpu_exclusive").read_text().strip() == "1"
        assert (group / "cpuset.cpus").read_text().strip() == "1"
        assert pw.run("audit").returncode == 0
        (group / "cpuset.cpu_exclusive").write_text("0")
        (group / "cpuset.cpus").write_text("0-1")
        audit = pw.run("audit", "--json")
        assert audit.returncode == 1, audit
        found = [(i["kind"], i["cgroup"], i["cpus"], i["severity"])
                 for i in json.loads(audit.stdout)["intruders"] if i["severity"] == "error"]
        assert found == [("not-exclusive", f"/{group.relative_to(CPUSET)}", "1", "error")]
        status = pw.run("status", check=True).stdout
        assert "NOT EXCLUSIVE" in status and "'pinwarden sync' turns it on again" in status, \
            status
        leases = json.loads(pw.run("status", "--json", check=True).stdout)["leases"]
        assert [x["partition_invalid"] for x in leases] == ["cpu_exclusive 0"], leases
        pw.run("sync", check=True)
        assert (group / "cpuset.cpu_exclusive").read_text().strip() == "1"
        assert (group / "cpuset.cpus").read_text().strip() == "1"
        assert pw.run("audit").returncode == 0
        assert "NOT EXCLUSIVE" not in pw.run("status", check=True).stdout
    finally:
        with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
            manager.release("pwtest-noexcl")
    assert not group.exists()


def test_a_holder_group_moved_off_its_lease_or_removed_is_a_status_warning_until_synced(
        pw: Pinwarden) -> None:
    """Somebody writes the housekeeping CPU into a holder group's ``cpuset.cpus`` in place
    of its leased one: audit said ``off-lease`` (for a running holder), status nothing (it
    read the ledger only; hunt F).  Now status says so, naming the CPU and the fix, and
    ``--json`` gives ``off_lease``; ``sync`` puts the group back."""
    from pinwarden.config import load_config
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    group = CPUSET / pw.holder_group("pwtest-offlease", "run")
    with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
        manager.reserve_request(JobSpec("pwtest-offlease", count=1), owner_pid=os.getpid())
    try:
        assert (group / "cpuset.cpus").read_text().strip() == "1"
        assert "OFF ITS LEASE" not in pw.run("status", check=True).stdout
        # (an exclusive group may not overlap a sibling: moved with cpu_exclusive off)
        (group / "cpuset.cpu_exclusive").write_text("0")
        (group / "cpuset.cpus").write_text("0")
        status = pw.run("status", check=True).stdout
        line = next(x for x in status.splitlines() if "pwtest-offlease" in x and "since" in x)
        assert f"; OFF ITS LEASE (its group /{group.relative_to(CPUSET)} lacks CPU 1" in line \
            and "'pinwarden sync' puts it back on its lease" in line \
            and "; NOT EXCLUSIVE (" in line, status
        leases = json.loads(pw.run("status", "--json", check=True).stdout)["leases"]
        assert [(x["off_lease"], x["partition_invalid"]) for x in leases] == [
            ("1", "cpu_exclusive 0")]
        pw.run("sync", check=True)
        assert (group / "cpuset.cpus").read_text().strip() == "1"
        assert (group / "cpuset.cpu_exclusive").read_text().strip() == "1"
        assert "OFF ITS LEASE" not in pw.run("status", check=True).stdout
        leases = json.loads(pw.run("status", "--json", check=True).stdout)["leases"]
        assert [(x["off_lease"], x["partition_invalid"], x["group_missing"])
                for x in leases] == [(None, None, False)]
        # the group removed by hand (empty: rmdir works): status and audit said nothing
        # while the kernel kept nothing off CPU 1 (hunt D)
        group.rmdir()
        status = pw.run("status", check=True).stdout
        assert f"; GROUP MISSING (its cgroup /{group.relative_to(CPUSET)} was removed by " \
            "hand" in status and "'pinwarden sync' makes it again" in status, status
        leases = json.loads(pw.run("status", "--json", check=True).stdout)["leases"]
        assert [x["group_missing"] for x in leases] == [True]
        audit = pw.run("audit", "--json")
        assert audit.returncode == 1, audit
        assert [(i["kind"], i["cgroup"], i["cpus"])
                for i in json.loads(audit.stdout)["intruders"] if i["severity"] == "error"] \
            == [("missing-group", f"/{group.relative_to(CPUSET)}", "1")], audit.stdout
        pw.run("sync", check=True)
        assert (group / "cpuset.cpus").read_text().strip() == "1"
        assert "GROUP MISSING" not in pw.run("status", check=True).stdout
        assert pw.run("audit").returncode == 0
        # renamed by hand instead: it still holds the CPU, and sync refuses, naming it
        renamed = group.rename(group.with_name(f"pwtest-renamed-{os.getpid()}"))
        try:
            status = pw.run("status", check=True).stdout
            assert "; GROUP MISSING (" in status and "(renamed by hand instead, it still " \
                "holds them, and sync names it: give it its name back)" in status, status
            refused = pw.run("sync")
            assert refused.returncode == 1, refused
            assert f"cgroup /{renamed.name} (not managed by pinwarden) holds CPU 1 " \
                "exclusively; free it there first" in refused.stderr, refused.stderr
        finally:
            renamed.rename(group)
        pw.run("sync", check=True)
        assert "GROUP MISSING" not in pw.run("status", check=True).stdout
    finally:
        with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
            manager.release("pwtest-offlease")
    assert not group.exists()


@contextlib.contextmanager
def _job_running_in_its_group(pw: Pinwarden,
                              name: str) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A job ``name`` leased CPU 1, a ``sleep`` of this test's its owner, in its group;
    once the block is done and the sleep ended, CPU 1 is free again, the group gone, and
    nothing is remembered of it."""
    from pinwarden.config import load_config
    from pinwarden.cpuset import CpuSet
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    group = CPUSET / pw.holder_group(name, "run")
    child = subprocess.Popen(["sleep", "600"])
    try:
        with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
            manager.reserve_request(JobSpec(name, cpus=CpuSet.of([1])), owner_pid=child.pid)
        (group / "cgroup.procs").write_text(f"{child.pid}\n")
        yield group, child
    finally:
        child.kill()
        child.wait()
    with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
        plan = manager.reserve_request(JobSpec("pwtest-next", count=1)).plan
        assert plan.leased() == CpuSet.of([1])
        assert not group.exists()
        assert not [k for k in manager.ledger().changes() if k.startswith("kept:")]
        manager.release("pwtest-next")


@contextlib.contextmanager
def _host_noise_restored() -> Iterator[None]:
    """Put the host's noise settings back as they were: a lease whose database is lost
    takes the record of them with it (README), and this host kept the default IRQ
    affinity, the workqueue mask, the IRQs and the movable kernel threads on CPU 0 after
    the lost-database test (found after a clean-clone run)."""
    files = [Path("/proc/irq/default_smp_affinity"),
             Path("/sys/devices/virtual/workqueue/cpumask"),
             *Path("/proc/irq").glob("*/smp_affinity_list")]
    saved = {f: f.read_text() for f in files if f.exists()}
    kthreads = {}
    for pid in ["2", *subprocess.run(["pgrep", "-P", "2"], capture_output=True,  # kthreadd's
                                     text=True).stdout.split()]:
        with contextlib.suppress(OSError):
            kthreads[int(pid)] = os.sched_getaffinity(int(pid))
    try:
        yield
    finally:
        for f, text in saved.items():
            with contextlib.suppress(OSError):
                f.write_text(text)
        for pid, cpus in kthreads.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, cpus)


def test_a_holder_group_the_lost_lease_database_does_not_record_is_planned_around(
        pw: Pinwarden) -> None:
    """The lease database lost while a holder runs (a wiped /var/lib, another state_dir):
    the next exclusive reservation was planned onto its CPU — on the systemd lab the
    running domain lost its CPU and partition, and the shared VMs were put there (hunt).
    Processes in a holder group no record names keep its CPUs: a plan is refused naming
    them, the group is left as it is, status and audit say what runs there and why, and
    once they end the next reservation gets the CPU."""
    import shutil

    from pinwarden.config import load_config
    from pinwarden.cpuset import CpuSet
    from pinwarden.errors import Refusal
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    with _host_noise_restored(), _job_running_in_its_group(pw, "pwtest-lost") as (group,
                                                                              child):
        shutil.rmtree(pw.state)  # lost while it runs
        with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
            with pytest.raises(Refusal) as info:
                manager.reserve_request(JobSpec("pwtest-next", count=1))
            assert info.value.code == "insufficient-cpus", info.value.message
            assert "CPU 1 to job 'pwtest-lost' (it runs in its holder group, which the " \
                "lease database does not record)" in info.value.message, info.value.message
            with pytest.raises(Refusal) as info:
                manager.reserve_request(JobSpec("pwtest-next", cpus=CpuSet.of([1])))
            assert info.value.code == "conflict"
            assert "while the lease database records no lease for it" in \
                info.value.message and f"kill {child.pid}" in info.value.message, \
                info.value.message
        assert (group / "cpuset.cpus").read_text().strip() == "1"
        assert (group / "cpuset.cpu_exclusive").read_text().strip() == "1"
        assert (group / "cgroup.procs").read_text().split() == [str(child.pid)]
        text = pw.run("status", check=True).stdout
        assert f"CPU 1 held by job 'pwtest-lost' in its holder group " \
            f"{group.name}, pid {child.pid}, which the lease database does not record" \
            in text, text
        audited = json.loads(pw.run("audit", "--json").stdout)
        assert not [i for i in audited["intruders"] if i["severity"] == "error"
                    or i["kind"] == "stale-holder-group"], audited
        assert any("which the lease database does not record" in n
                   for n in audited["notes"]), audited


def test_sync_counts_the_changes_freeing_a_dead_job_made(pw: Pinwarden) -> None:
    """A job killed with SIGKILL (no release): 'pinwarden sync' freed it and shrank the
    layout, then said "cgroup layout in place (0 changes)" — it counted only a second sync
    after the one that did the work (hunt).  Now one sync frees it and counts what it
    changed, and status no longer calls the dead job's CPUs free before that."""
    import json

    group = dead_job(pw, "pwtest-killed")
    assert (group / "cpuset.cpu_exclusive").read_text().strip() == "1"
    status = pw.run("status", check=True).stdout
    assert "OWNER GONE: its CPUs are freed at the next start or change ('pinwarden sync' " \
        "frees them now)" in status, status
    synced = pw.run("sync", "--json", check=True)
    data = json.loads(synced.stdout)
    assert [r["domain"] for r in data["reaped"]] == ["pwtest-killed"], data
    assert data["operations"] > 0, data
    assert not group.exists()
    assert "(0 changes)" in pw.run("sync", check=True).stdout


def test_the_daemon_frees_a_dead_job_while_libvirt_is_down(pw: Pinwarden,
                                                          tmp_path: Path) -> None:
    """While libvirtd is down (stopped for an upgrade, crashed) the daemon retries its
    connection: it used to do nothing else meanwhile, so a job (or domain) that died kept
    its CPUs and its exclusive group until libvirtd came back (systemd lab hunt, F6).
    Jobs need no libvirt: each retry also frees the dead and puts the layout right."""
    group = dead_job(pw, "pwtest-downjob")
    assert group.is_dir()
    nowhere = f"qemu+unix:///system?socket={tmp_path / 'no-libvirtd.sock'}"
    daemon = Daemon(pw, tmp_path / "daemon.log", "--connect", nowhere)
    try:
        deadline = time.monotonic() + 60
        while "freed the leases of job 'pwtest-downjob'" not in daemon.text():
            assert daemon.proc.poll() is None, daemon.text()
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.2)
        assert "retrying in" in daemon.text(), daemon.text()  # libvirt was down throughout
        assert "connected to" not in daemon.text(), daemon.text()
        with Ledger(pw.state) as ledger:
            assert ledger.holders() == ()
        while group.exists():
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.2)
    finally:
        status = daemon.stop()
    assert status == 0, daemon.text()
    assert "Traceback" not in daemon.text()


def test_groups_of_their_own_below_machine_get_their_cpus_back_after_the_last_lease(
        pw: Pinwarden) -> None:
    """An operator's sub-partitions of ``machine`` (``<partition>/machine/sub``) with CPUs
    of their own: a lease of CPU 1 narrows ``machine`` to 0, so the one on CPU 1 must go to
    0 meanwhile; after the release it went to 0-1 (taken for a follower of its parent), and
    so did the one on CPU 0 that the lease never touched (real-libvirt hunt).  Now each
    gets exactly its CPUs back; one that had ``machine``'s CPUs follows it as before."""
    from pinwarden.config import load_config
    from pinwarden.cpuset import CpuSet
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    machine = CPUSET / "machine"
    found = (machine / "cpuset.cpus").read_text().strip()
    if found != "0-1":
        pytest.fail(f"needs machine on CPUs 0-1 (this host's), not {found}")
    subs = {name: machine / f"pwtest-sub-{name}-{os.getpid()}.partition"
            for name in ("on1", "on0", "all")}
    # a VM's own group (libvirt's name): libvirt and pinwarden's re-pins change it while
    # the VM runs, so no record holds it to what it had (it follows machine as before)
    vm = machine / f"qemu-99-pwtest-sub-{os.getpid()}.libvirt-qemu"
    try:
        for name, cpus in (("on1", "1"), ("on0", "0"), ("all", "0-1")):
            subs[name].mkdir()
            (subs[name] / "cpuset.mems").write_text("0\n")
            (subs[name] / "cpuset.cpus").write_text(f"{cpus}\n")
        vm.mkdir()
        (vm / "cpuset.mems").write_text("0\n")
        (vm / "cpuset.cpus").write_text("1\n")

        def cpus() -> dict[str, str]:
            return {n: (d / "cpuset.cpus").read_text().strip() for n, d in subs.items()}

        with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
            manager.reserve_request(JobSpec("pwtest-subs", cpus=CpuSet.of([1])),
                                    owner_pid=os.getpid())
            assert (machine / "cpuset.cpus").read_text().strip() == "0"
            assert cpus() == {"on1": "0", "on0": "0", "all": "0"}
            recorded = sorted(k for k in manager.ledger().changes() if k.startswith("follower:"))
            assert recorded == sorted(f"follower:machine/{d.name}"
                                      for n, d in subs.items() if n != "all"), recorded
            manager.release("pwtest-subs")
        assert (machine / "cpuset.cpus").read_text().strip() == "0-1"
        assert cpus() == {"on1": "1", "on0": "0", "all": "0-1"}
        with Ledger(pw.state) as ledger:  # nothing of this lease is remembered
            assert not [k for k in ledger.changes() if k.startswith("follower:")]
    finally:
        for d in (*subs.values(), vm):
            if d.exists():
                d.rmdir()


def test_a_group_kept_after_a_forced_release_keeps_new_plans_off_its_cpus(
        pw: Pinwarden) -> None:
    """``release --force`` of a holder whose processes run on: its group is kept, its CPUs
    stay out of the shared pool — but the next exclusive start was offered them, and its
    failed layout moved the running VM and a shared one (systemd-lab hunt).  Now a plan
    keeps off them, a request for them is refused naming the holder and how to stop it,
    and once its processes are gone the CPUs are free again and nothing is remembered."""
    from pinwarden.config import load_config
    from pinwarden.cpuset import CpuSet
    from pinwarden.errors import Refusal
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    with _job_running_in_its_group(pw, "pwtest-forced") as (group, child), \
            Manager(load_config(pw.config), Path("/"), pw.state) as manager:
        manager.release("pwtest-forced", force=True)
        assert (group / "cpuset.cpus").read_text().strip() == "1"  # kept: it runs
        with pytest.raises(Refusal) as info:
            manager.reserve_request(JobSpec("pwtest-next", count=1))
        assert info.value.code == "insufficient-cpus", info.value.message
        # releasing it again frees nothing: the refusal says to stop it (it said
        # "release one of them"), status shows the CPU taken and by whom (it showed
        # it free), audit finds no stale group (it advised a sync, which keeps it)
        assert "CPU 1 to job 'pwtest-forced' (released with --force, it still runs " \
            f"there) — stop job 'pwtest-forced' (kill {child.pid});" in \
            info.value.message, info.value.message
        doc = json.loads(pw.run("status", "--json", check=True).stdout)
        assert doc["kept"] == [{"domain": "pwtest-forced", "driver": "run", "uuid": None,
                                "cpus": "1", "pid": child.pid}], doc
        assert doc["leases"] == [] and "1" not in doc["shared"], doc
        text = pw.run("status", check=True).stdout
        assert f"  CPU 1 kept by job 'pwtest-forced' after 'release --force': pid " \
            f"{child.pid} still runs there ('kill {child.pid}' frees it)" in text, text
        assert "kept by job 'pwtest-forced', released with --force, it still runs " \
            "there (1)" in text, text
        audited = json.loads(pw.run("audit", "--json").stdout)
        assert not [i for i in audited["intruders"]
                    if i["kind"] == "stale-holder-group"], audited
        assert f"CPU 1 kept by job 'pwtest-forced' after 'release --force': pid " \
            f"{child.pid} still runs there ('kill {child.pid}' frees it)" in \
            audited["notes"], audited
        with pytest.raises(Refusal) as info:
            manager.reserve_request(JobSpec("pwtest-next", cpus=CpuSet.of([1])))
        assert info.value.code == "conflict"
        assert "CPU 1 for --cpus 1 of job 'pwtest-next' is kept by job " \
            "'pwtest-forced', whose leases were released with --force while it runs " \
            f"there: choose other CPUs or stop it first (kill {child.pid})" in \
            info.value.message, info.value.message
        assert manager.holders() == ()
