"""`pinwarden run`: job placement (pure), the command line, and the supervisor.

The supervisor runs here with real processes on the in-memory cpuset fake (affinity, exit
status, signal forwarding, lease release); the same behaviour on a real kernel with real
exclusive cpusets is ``tests/run_kernel_cases.py``, run in a fresh virtme-ng guest by
:func:`test_real_kernel_cases_in_a_fresh_guest`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from enforce_helpers import build, lease, make_host
from guest import guest_run
from pinwarden.cli import main
from pinwarden.config import Config
from pinwarden.cpuset import CpuSet
from pinwarden.enforce.fake import FakeCpusetV1
from pinwarden.errors import InputError, Refusal
from pinwarden.ledger import Ledger
from pinwarden.manager import Manager
from pinwarden.model import Lease, Plan, job_holder
from pinwarden.partition import Host
from pinwarden.policy import JobSpec, decide
from pinwarden.runner import check_name


def decide_job(job: JobSpec, host: Host, leases: list[Lease]) -> Plan:
    return decide(job, host, leases)

REPO = Path(__file__).resolve().parent.parent


def test_job_gets_free_vm_cpus_only() -> None:
    host = make_host("0-3", vm="1-3")
    plan = decide_job(JobSpec("J", count=2), host, [lease(1, "other")])
    assert plan.leased() == CpuSet.of([2, 3])
    assert set(plan.leases.values()) == {"task"}
    assert plan.emulator == CpuSet.of([2, 3])


def test_second_job_refused_naming_the_holder() -> None:
    host = make_host("0-1", vm="1")
    with pytest.raises(Refusal) as info:
        decide_job(JobSpec("B", count=1), host, [lease(1, "A")])
    message = info.value.message
    assert "CPU 1 to job 'A' — release one of them" in message
    assert "housekeeping CPU 0 is never leased" in message
    assert info.value.code == "insufficient-cpus"
    # one CPU is the least a job asks: not told to ask for fewer, nor about vCPUs
    assert "cannot place 1 CPU: only 0 free CPUs; leased now" in message
    assert "vCPU" not in message and "fewer" not in message
    with pytest.raises(Refusal) as info:  # a job has no vCPUs: asked to ask for fewer CPUs
        decide_job(JobSpec("B", count=2), host, [])
    assert "cannot place 2 CPUs: only 1 free CPU; ask for fewer CPUs" in info.value.message


def test_a_holder_a_forced_release_left_running_is_to_be_stopped_not_released() -> None:
    """A group kept after ``release --force`` (its processes run on) takes part as leases
    of role ``kept``: releasing it again frees nothing (the refusal said "release one of
    them", which the operator had just done); stopping it does."""
    from pinwarden.model import KEPT_ROLE, domain_holder

    host = make_host("0-3", vm="1-3")
    vm = domain_holder("qemu", "x", None)
    held = [Lease(1, vm, KEPT_ROLE, 0.0, 4321), lease(2, "A"),
            Lease(3, vm, KEPT_ROLE, 0.0, 4321)]
    with pytest.raises(Refusal) as info:
        decide_job(JobSpec("B", count=1), host, held)
    message = info.value.message
    assert "CPUs 1,3 to qemu domain 'x' (released with --force, it still runs there)" \
        in message, message
    assert "; CPU 2 to job 'A' — release one of them or stop qemu domain 'x' (pinwarden " \
        "stop x);" in message, message
    with pytest.raises(Refusal) as info:
        decide_job(JobSpec("B", count=1), host,
                   [Lease(c, vm, KEPT_ROLE, 0.0, 4321) for c in (1, 2, 3)])
    assert "release one of them" not in info.value.message, info.value.message
    assert "— stop qemu domain 'x' (pinwarden stop x);" in info.value.message


def test_a_job_is_told_to_share_cores_with_its_own_option(tmp_path: Path) -> None:
    """``--threads prefer`` (the option of ``pinwarden run``), not a domain's wording."""
    from hostroot import HostSpec, build_host
    from pinwarden.partition import load_host

    host = load_host(build_host(tmp_path, HostSpec(cpus=8, threads=2)), Config())
    with pytest.raises(Refusal) as info:  # cores {k, k+4}; CPU 5 taken: 2 whole cores
        decide_job(JobSpec("J", count=5), host, [lease(5, "A")])
    assert "only 4 CPUs on whole free cores (thread policy 'whole'); use --threads prefer " \
        "to share cores with other holders" in info.value.message


def test_explicit_cpus_rules() -> None:
    """The same checks, codes and wording as for domains (one policy)."""
    host = make_host("0-3", vm="1-3")
    with pytest.raises(Refusal, match=r"CPU 0 for --cpus 0 of exclusive job 'J' is a "
                                      r"housekeeping CPU") as info:
        decide_job(JobSpec("J", cpus=CpuSet.of([0])), host, [])
    assert info.value.code == "host-cpu"
    with pytest.raises(Refusal, match=r"CPU 2 for --cpus 2-3 of job 'J' is leased "
                                      r"exclusively to job 'X'") as info:
        decide_job(JobSpec("J", cpus=CpuSet.of([2, 3])), host, [lease(2, "X")])
    assert info.value.code == "conflict"
    with pytest.raises(Refusal, match=r"CPU 9 in --cpus 9 of job 'J' does not exist") as info:
        decide_job(JobSpec("J", cpus=CpuSet.of([9])), host, [])
    assert info.value.code == "unknown-cpu"
    plan = decide_job(JobSpec("J", cpus=CpuSet.of([3])), host, [lease(2, "X")])
    assert plan.leased() == CpuSet.of([3])


def test_offline_cpu_is_offline_cpu_for_jobs_as_for_domains() -> None:
    from pinwarden.record import replace

    host = make_host("0-3", vm="1-3")
    host = replace(host, topology=replace(host.topology, online=CpuSet.of([0, 1, 2])))
    with pytest.raises(Refusal) as info:
        decide_job(JobSpec("J", cpus=CpuSet.of([3])), host, [])
    assert info.value.code == "offline-cpu"


def test_job_name_must_be_unique_and_safe() -> None:
    host = make_host()
    with pytest.raises(Refusal, match="already holds CPU 2;") as info:
        decide_job(JobSpec("J", count=1), host, [lease(2, "J")])
    assert info.value.code == "job-exists"
    for bad in ("", "../x", "a b", "-x", "x" * 65):
        with pytest.raises(InputError):
            check_name(bad)


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run", "--exclusive", "1"], ["run", "--", ]):  # usage errors: exit 2
        with pytest.raises(SystemExit) as usage:
            main(argv)
        assert usage.value.code == 2
        err = capsys.readouterr().err
        assert "no command given" in err and err.startswith("usage: pinwarden run"), err
    for count in ("0", "-1"):  # a bad value is a usage error like "abc" (it exited 1)
        with pytest.raises(SystemExit) as usage:
            main(["run", "--exclusive", count, "--", "true"])
        assert usage.value.code == 2
        assert f"needs at least 1 CPU, not {int(count)}" in capsys.readouterr().err
    for name in ("../x", ""):  # an empty name is refused too, not replaced by the default
        assert main(["run", "--name", name, "--", "true"]) == 1
        assert f"invalid job name {name!r}" in capsys.readouterr().err
    for argv in (["run", "--exclusive", "x", "--", "true"],
                 ["run", "--exclusive", "\u0661", "--", "true"],  # an Arabic-Indic 1 (hunt)
                 ["run", "--exclusive", "1", "--cpus", "1", "--", "true"],
                 ["run", "--threads", "maybe", "--", "true"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


def test_run_on_a_dump_says_why_and_runs_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--root DUMP``: pinwarden enforces nothing there, so the job is refused before
    anything is leased, saying why and pointing at --dry-run."""
    from hostroot import HostSpec, build_host

    root = build_host(tmp_path / "dump", HostSpec(cpus=8, threads=2))
    state, ran = tmp_path / "state", tmp_path / "ran"
    # global options before 'run': after it they would be the command's arguments
    assert main(["--root", str(root), "--state-dir", str(state), "run", "--name", "vmA",
                 "--", "touch", str(ran)]) == 1
    err = capsys.readouterr().err
    assert err == (f"pinwarden: error: job 'vmA' not run: pinwarden enforces CPUs only on the "
                   f"host it runs on (--root /), and --root {root} is a host dump, so nothing "
                   "would keep other tasks off its CPUs; --dry-run shows the job's plan and "
                   "cgroup writes without running it\n")
    assert not ran.exists()
    with Ledger(state) as ledger:
        assert ledger.leases() == () and ledger.host_record() is None


SUPERVISOR = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from enforce_helpers import make_host
    from pinwarden.config import Config
    from pinwarden.cpuset import CpuSet
    from pinwarden.enforce.fake import FakeCpusetV1
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec
    from pinwarden.runner import run_job
    online = CpuSet.parse_kernel(Path("/sys/devices/system/cpu/online").read_text())
    last = CpuSet.of([max(online.cpus)])
    fake = FakeCpusetV1(online, real_pids=True)
    manager = Manager(Config(), Path("/"), Path(sys.argv[1]), backend=fake,
                      host=make_host(online.to_list(), vm=last.to_list()))
    status = run_job(manager, JobSpec(sys.argv[2], count=int(sys.argv[3])), sys.argv[4:])
    print("LAYOUT", sorted(fake.read_state([""]).groups), file=sys.stderr)
    sys.exit(status)
""")


def supervisor(state: Path, name: str, count: int, *command: str,
               ) -> subprocess.Popen[str]:
    code = SUPERVISOR.format(tests=str(REPO / "tests"))
    return subprocess.Popen([sys.executable, "-c", code, str(state), name, str(count),
                             *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_supervisor_places_runs_and_releases(tmp_path: Path) -> None:
    probe = ("import json, os; print(json.dumps([sorted(os.sched_getaffinity(0)), "
             "os.environ['PINWARDEN_CPUS'], os.environ['PINWARDEN_JOB']])); raise "
             "SystemExit(5)")
    proc = supervisor(tmp_path, "pwtest-fake", 1, sys.executable, "-c", probe)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    affinity, cpus, job = json.loads(out)
    last = max(CpuSet.parse_kernel(Path("/sys/devices/system/cpu/online").read_text()).cpus)
    assert affinity == [last] and cpus == str(last) and job == "pwtest-fake"
    with Ledger(tmp_path) as ledger:
        assert ledger.leases() == ()
    # the job group was created and is gone again; the shared pool got its CPUs back
    assert "pinwarden-run-pwtest-fake.partition" not in err.split("LAYOUT")[1]


def test_supervisor_reports_death_by_signal(tmp_path: Path) -> None:
    proc = supervisor(tmp_path, "pwtest-sig", 1, "sh", "-c", "kill -USR2 $$")
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2


def test_supervisor_forwards_signals(tmp_path: Path) -> None:
    log = tmp_path / "log"
    handler = textwrap.dedent(f"""
        import signal, sys, time
        out = open({str(log)!r}, "a", buffering=1)
        def seen(sig, frame):
            out.write(signal.Signals(sig).name + "\\n")
            if sig == signal.SIGTERM:
                sys.exit(42)
        for s in (signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM):
            signal.signal(s, seen)
        out.write("ready\\n")
        while True:
            time.sleep(0.05)
    """)
    proc = supervisor(tmp_path, "pwtest-fwd", 1, sys.executable, "-c", handler)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "ready" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.05)
        for n, sig in enumerate((signal.SIGUSR1, signal.SIGHUP), start=2):
            proc.send_signal(sig)
            while len(log.read_text().split()) < n:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().split() == ["ready", "SIGUSR1", "SIGHUP", "SIGTERM"]
    assert proc.returncode == 42


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_reservation_frees_it_and_runs_nothing(
        tmp_path: Path, sig: signal.Signals) -> None:
    """A Ctrl-C or SIGTERM that lands while the job's CPUs are being reserved (held until
    the reservation is made) ends the job before its command runs, as it would have ended
    pinwarden, and the CPUs are free again: the process used to end with the lease
    recorded and the host narrowed for a command that never ran (hunt)."""
    marker = tmp_path / "ran"
    code = SUPERVISOR.format(tests=str(REPO / "tests")).replace(
        "status = run_job(", textwrap.dedent(f"""\
            import os, signal
            sync = Manager._sync
            sent = []
            def _sync(self, **kw):
                if not sent:  # once: lands inside the reservation's lock (not the release's)
                    sent.append(os.kill(os.getpid(), {int(sig)}))
                return sync(self, **kw)
            Manager._sync = _sync
            status = run_job(""").replace("\n", "\n    ", 0))
    # (a SIGINT ignored since the test run started — a background job of a script — stays
    # ignored in pinwarden, rightly: the signal's default action is what is tested here)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "pwtest-sig", "1",
                           "touch", str(marker)], capture_output=True, text=True,
                          timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if sig == signal.SIGINT:
        assert proc.returncode == 1 or "KeyboardInterrupt" in proc.stderr, proc.stderr
        assert "before job 'pwtest-sig' ran (its CPUs are free again)" in proc.stderr
    else:
        assert proc.returncode == -sig, (proc.returncode, proc.stderr)
    assert not marker.exists()  # the command never ran
    with Ledger(tmp_path) as ledger:
        assert ledger.holders() == () and ledger.leases() == ()
        assert ledger.host_record() is None  # the host as found again


@pytest.mark.kernel
@pytest.mark.slow
def test_real_kernel_cases_in_a_fresh_guest() -> None:
    """tests/run_kernel_cases.py (real cgroup v1 cpusets, real `pinwarden run`) in a guest."""
    result = guest_run()
    assert result.ok, f"{result.why}\n{result.output[-3000:]}"
    assert result.runcases_rc == 0, result.output[-6000:]
    assert " passed" in result.output and "failed" not in result.output.split("RUNCASES")[0] \
        .splitlines()[-1]


def test_reap_removes_groups_of_dead_jobs_and_nothing_else(tmp_path: Path) -> None:
    fake = FakeCpusetV1(CpuSet.parse_kernel("0-3"), real_pids=True)
    build(fake, {"machine": ("0-3", False)})
    manager = Manager(Config(), Path("/"), tmp_path, backend=fake,
                      host=make_host("0-3", vm="1-3"))
    writes = fake.writes
    assert manager.reap() == ()  # nothing leased: nothing written
    assert fake.writes == writes
    for name in ("gone", "alive"):
        manager.reserve_request(JobSpec(name, count=1))
    writes = fake.writes
    assert manager.reap() == () and fake.writes == writes  # in order: no write
    command = subprocess.Popen(["sleep", "600"])
    manager.set_owner(job_holder("gone"), command.pid)
    command.kill()  # the command of a job whose supervisor was SIGKILLed ends
    command.wait()
    assert [r.ref.name for r in manager.reap()] == ["gone"]
    groups = set(fake.read_state([""]).groups)
    manager.close()
    assert "pinwarden-run-gone.partition" not in groups
    assert "pinwarden-run-alive.partition" in groups


def test_isolate_holds_the_sibling_and_the_job_group_excludes_it() -> None:
    from pinwarden.enforce.layout import desired_layout
    from pinwarden.record import replace

    host = make_host("0-3", vm="2-3")
    smt = {cpu: replace(c, core=cpu // 2, siblings=CpuSet.of([cpu // 2 * 2, cpu // 2 * 2 + 1]))
           for cpu, c in host.topology.cpus.items()}
    host = replace(host, topology=replace(host.topology, cpus=smt))
    plan = decide_job(JobSpec("J", count=1, threads="isolate"), host, [])
    assert sorted(plan.leases.items()) == [(2, "task"), (3, "sibling-hold")]
    explicit = decide_job(JobSpec("J", cpus=CpuSet.of([2]), threads="isolate"), host, [])
    assert explicit.leases == plan.leases  # --cpus holds the sibling too
    leases = [Lease(cpu, job_holder("J"), role, 0.0) for cpu, role in plan.leases.items()]
    desired = desired_layout(host, leases)
    assert desired.leased == CpuSet.of([2, 3])
    assert desired.shared.cpus.isdisjoint(desired.leased)
    assert desired.holders[0].cpus == CpuSet.of([2])
