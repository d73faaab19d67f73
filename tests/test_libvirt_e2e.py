"""The seed's story, end to end, on the real libvirtd + QEMU + cgroup v1 of this host.

Partition here: ``none`` mode, host reserve CPU 0, VM CPUs {1}; while CPU 1 is leased the
shared VMs fall back to CPU 0.  Holder groups are ``pwtest-e2e-vm-NAME.partition`` beside
``machine`` (libvirt partition ``/pwtest-e2e-vm-NAME``) so the test never touches a real
pinwarden's groups.

1. VM A, exclusive on CPU 1, started by ``pinwarden start``;
2. VM B, unpinned, started by ``pinwarden start``;
3. VM C, unpinned, started by plain ``virsh start`` (through the hook);
   B and C both run, both off CPU 1 (thread affinity and cgroup cpus, from the kernel);
4. VM D, pinned to CPU 1, is refused by the hook at ``virsh start``, naming A;
5. ``pinwarden audit`` is clean;
6. ``virsh destroy A`` frees the lease (hook ``release``) and D then starts on CPU 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pinwarden.ledger import Ledger

pytest.register_assert_rewrite("libvirt_env")

import libvirt_env as env  # noqa: E402

pytest_plugins = ["libvirt_env"]
pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

EXCLUSIVE = "pwtest-e2e.partition"
virsh = env.virsh


@pytest.fixture(scope="module")
def hooked(libvirt_daemons: env.Daemons, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[env.Pinwarden]:
    """Hook installed in the real /etc/libvirt/hooks, libvirtd restarted to see it; at the
    end the hook is removed, libvirtd restarted again and the cgroups put back."""
    pw = env.Pinwarden.make(tmp_path_factory.mktemp("pinwarden-e2e"), EXCLUSIVE)
    with env.machine_restored():
        try:
            exe = ["--exe", env.PINWARDEN] if os.environ.get("PINWARDEN_EXE") else []
            pw.run("hook", "install", "--hooks-dir", str(env.HOOKS_DIR), *exe, check=True)
            libvirt_daemons.restart_libvirtd()
            yield pw
        finally:
            env.remove_hooks()
            if libvirt_daemons.owns("libvirtd"):
                libvirt_daemons.restart_libvirtd()
            pw.cleanup()


def assert_no_hook_warnings(pw: env.Pinwarden) -> None:
    """The hook log keeps refusals (libvirt showed them to the user too) and warnings
    (which libvirt would not show anywhere): there must be no warning."""
    log = pw.state / "hook.log"
    lines = log.read_text().splitlines() if log.exists() else []
    assert not [line for line in lines if "warning" in line], lines


def off_cpu1(name: str) -> None:
    affinity = env.vm_affinity(name)
    group = env.domain_cgroup(name)
    assert group.startswith("machine/"), group
    assert 1 not in affinity, f"{name} threads may run on {sorted(affinity)}"
    assert 1 not in env.read_cpus(group, "effective_cpus"), group
    assert affinity, name


def test_seed_story(hooked: env.Pinwarden, domains: env.Domains) -> None:
    if len(os.sched_getaffinity(0)) < 2 or not shutil.which("virsh"):
        pytest.fail("the story needs 2 CPUs and virsh")
    a, b, c, d = "pwtest-e2e-a", "pwtest-e2e-b", "pwtest-e2e-c", "pwtest-e2e-d"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(b)
    domains.define(c)
    domains.define(d, vcpupins={0: "1"}, emulatorpin="1")

    # (1) A exclusive on CPU 1
    hooked.run("start", a, check=True)
    group_a = env.domain_cgroup(a)
    holder_group = hooked.holder_group(a)
    assert group_a.startswith(f"{holder_group}/"), group_a
    assert env.cpu_exclusive(holder_group)
    assert env.read_cpus(holder_group, "effective_cpus") == {1}
    assert env.vm_affinity(a) == {1}
    assert 1 not in env.read_cpus("machine", "effective_cpus")

    # (2) B unpinned via pinwarden; (3) C unpinned via plain virsh
    hooked.run("start", b, check=True)
    started = virsh("start", c)
    assert started.returncode == 0, started.stderr
    for name in (b, c):
        assert domains.conn.lookupByName(name).isActive()
        off_cpu1(name)

    # (4) D pinned to CPU 1: the hook refuses it, naming A
    refused = virsh("start", d)
    assert refused.returncode != 0
    assert a in refused.stderr and "1" in refused.stderr, refused.stderr
    assert not domains.conn.lookupByName(d).isActive()
    assert env.vm_affinity(a) == {1}

    # (5) audit is clean
    audit = hooked.run("audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr

    # (6) destroying A frees the lease; D then starts on CPU 1
    gone = virsh("destroy", a)
    assert gone.returncode == 0, gone.stderr
    with Ledger(hooked.state) as ledger:  # no reaping: the hook itself must have freed A
        assert ledger.holders() == ()
    assert_no_hook_warnings(hooked)
    assert not (env.CPUSET / holder_group).exists()
    started = virsh("start", d)
    assert started.returncode == 0, started.stderr
    assert env.vm_affinity(d) == {1}


@pytest.mark.parametrize("e", ["pwtest-e2e-e", "pwtest-e2e-o'q&x"], ids=["plain", "quote"])
def test_plain_virsh_start_of_an_exclusive_domain(hooked: env.Pinwarden,
                                                  domains: env.Domains,
                                                  tmp_path: Path, e: str) -> None:
    """Defined by ``pinwarden define`` (which stores the partition), an exclusive domain
    started by plain ``virsh start`` is leased at ``prepare``, owned by QEMU at ``started``
    (also when libvirt escapes the name of its pid file: ``o&apos;q&amp;x.pid``) and runs
    exclusive; one defined behind pinwarden's back (no partition) is refused."""
    f = "pwtest-e2e-f"
    source = tmp_path / "e.xml"
    source.write_text(env.tiny_domain_xml(e, exclusive=True, vcpupins={0: "1"}))
    domains.track(e)
    hooked.run("define", str(source), check=True)

    started = virsh("start", e)
    assert started.returncode == 0, started.stderr
    group = env.domain_cgroup(e).split("/")[0]  # named by uuid when not by name
    assert group in (hooked.holder_group(e), hooked.holder_group(domains.uuid(e)))
    assert env.cpu_exclusive(group) and env.read_cpus(group, "effective_cpus") == {1}
    assert env.vm_affinity(e) == {1}
    with Ledger(hooked.state) as ledger:
        (record,) = ledger.holders()
    assert record.ref.name == e and record.owner_pid == env.qemu_pid(e)
    assert record.plan.leased().as_list() == [1]
    hooked.run("sync", check=True)  # its owner runs: the lease stays
    with Ledger(hooked.state) as ledger:
        assert [h.ref.name for h in ledger.holders()] == [e]

    domains.define(f, exclusive=True)  # (one no start could place is told why instead)
    refused = virsh("start", f)
    assert refused.returncode != 0
    assert "/machine" in refused.stderr and f"pinwarden start {f}" in refused.stderr and \
        f"store partition /{hooked.stem}-vm-{f} with 'pinwarden define'" in \
        refused.stderr and "transient" not in refused.stderr, refused.stderr
    # transient ('virsh create'): 'pinwarden start' starts defined domains only
    source.write_text(env.tiny_domain_xml(f"{f}-t", exclusive=True))
    domains.track(f"{f}-t")  # (its log, which libvirt keeps)
    created = virsh("create", str(source))
    assert created.returncode != 0
    assert f"it is transient: put <resource><partition>/{hooked.stem}-vm-{f}-t</partition>" \
        f"</resource> in its XML" in created.stderr and "pinwarden start" not in \
        created.stderr, created.stderr

    gone = virsh("destroy", e)
    assert gone.returncode == 0, gone.stderr
    with Ledger(hooked.state) as ledger:
        assert ledger.holders() == ()
    assert not (env.CPUSET / group).exists()
    assert_no_hook_warnings(hooked)


def test_plain_virsh_start_is_refused_over_a_running_domain_pinned_there(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """A running shared domain whose own XML pins vcpu0 to CPU 1 only: 'pinwarden start' of
    an exclusive domain wanting CPU 1 is refused naming it; plain 'virsh start' leased the
    CPU anyway and the layout moved the pinned VM to CPU 0, silently (hunt).  The hook now
    refuses the same, from libvirt's status files, and the pinned VM stays on CPU 1.
    Re-pinned live off CPU 1 (its user's choice), it no longer stands in the way."""
    x, p = "pwtest-e2e-px", "pwtest-e2e-pp"
    source = tmp_path / "px.xml"
    source.write_text(env.tiny_domain_xml(x, exclusive=True, vcpupins={0: "1"}))
    domains.track(x)
    hooked.run("define", str(source), check=True)
    pinned = domains.define(p, vcpupins={0: "1"})
    assert virsh("start", p).returncode == 0
    for how in (lambda: virsh("start", x), lambda: hooked.run("start", x, "--no-daemon")):
        refused = how()
        assert refused.returncode != 0, refused
        assert f"running domain '{p}' pins vcpu0 to CPU 1 only" in refused.stderr, \
            refused.stderr
        with Ledger(hooked.state) as ledger:
            assert ledger.holders() == ()
        bits = pinned.vcpuPinInfo(env.libvirt.VIR_DOMAIN_AFFECT_LIVE)[0]
        assert {i for i, on in enumerate(bits) if on} == {1}
    assert virsh("vcpupin", p, "0", "0", "--live").returncode == 0
    started = virsh("start", x)
    assert started.returncode == 0, started.stderr
    assert env.vm_affinity(x) == {1}
    for name in (x, p):
        assert virsh("destroy", name).returncode == 0
    with Ledger(hooked.state) as ledger:
        assert ledger.holders() == ()
    assert_no_hook_warnings(hooked)


def test_a_broken_pinwarden_never_blocks_a_shared_domain(hooked: env.Pinwarden,
                                                         domains: env.Domains,
                                                         tmp_path: Path) -> None:
    """The pinwarden the hook runs is gone (its venv removed): plain ``virsh start`` of a
    shared domain still works (the reason is logged), an exclusive one is refused with how
    to repair, and ``pinwarden hook check`` says what is wrong."""
    from pinwarden.libvirt import hook

    drop_in = env.HOOKS_DIR / "qemu.d" / "pinwarden"
    good = drop_in.read_text()
    gone = tmp_path / "venv-removed" / "bin" / "python3"
    try:
        drop_in.write_text(hook.hook_script("qemu", [str(gone), "-m", "pinwarden.cli.vm"],
                                            state_dir=hooked.state, config=hooked.config))
        s, x = "pwtest-e2e-s", "pwtest-e2e-x"
        domains.define(s)
        source = tmp_path / "x.xml"
        source.write_text(env.tiny_domain_xml(x, exclusive=True, vcpupins={0: "1"}))
        domains.track(x)
        hooked.run("define", str(source), check=True)

        started = virsh("start", s)
        assert started.returncode == 0, started.stderr
        assert "was let through unchecked" in (hooked.state / "hook.log").read_text()
        refused = virsh("start", x)
        assert refused.returncode != 0
        assert "cannot get its CPUs" in refused.stderr and "hook check" in refused.stderr
        check = hooked.run("hook", "check", "--hooks-dir", str(env.HOOKS_DIR))
        assert check.returncode == 1 and "cannot run" in check.stdout, check.stdout
    finally:
        drop_in.write_text(good)


def test_invalid_pinwarden_metadata_is_refused_not_run_shared(hooked: env.Pinwarden,
                                                              domains: env.Domains) -> None:
    """libvirt keeps pinwarden's element as written; ``exclusive='YES'`` may have asked for
    exclusive CPUs, so plain ``virsh start`` is refused, saying what to fix, and nothing is
    leased; with ``exclusive='no'`` beside the same typo elsewhere it starts shared."""
    name = "pwtest-e2e-m"
    meta = "<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' %s/></metadata><memory"
    domains.track(name)
    env.cleanup_domain(domains.conn, name)
    domains.conn.defineXML(env.tiny_domain_xml(name).replace(
        "<memory", meta % "exclusive='YES'", 1))
    assert "exclusive='YES'" in virsh("dumpxml", name).stdout.replace('"', "'")
    refused = virsh("start", name)
    assert refused.returncode != 0
    assert "has invalid pinwarden metadata" in refused.stderr, refused.stderr
    assert "exclusive>='YES'" in refused.stderr and f"virsh edit {name}" in refused.stderr
    assert virsh("domstate", name).stdout.strip() == "shut off"
    with Ledger(hooked.state) as ledger:
        assert ledger.holders() == ()
    # the release libvirt calls after the refused start says nothing more (hook.log had a
    # warning of the same metadata there)
    log = hooked.state / "hook.log"
    logged = log.read_text() if log.exists() else ""
    assert [line for line in logged.splitlines() if "refused" in line and name in line], \
        (logged, sorted(p.name for p in hooked.state.iterdir()))
    assert not [line for line in logged.splitlines() if "warning" in line and name in line], \
        logged
    env.cleanup_domain(domains.conn, name)
    domains.conn.defineXML(env.tiny_domain_xml(name).replace(
        "<memory", meta % "exclusive='no' threads='all'", 1))
    started = virsh("start", name)
    assert started.returncode == 0, started.stderr
    assert "let through unchecked" in (hooked.state / "hook.log").read_text()
    assert virsh("destroy", name).returncode == 0


def test_in_cgroup_mode_plain_virsh_start_leaves_a_hook_placed_domain_a_vm_cpu(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """Cgroup mode, ``machine`` restricted to CPU 1: a shared domain without pins started
    by plain ``virsh start`` runs there (the hook placed it at ``started``, which libvirt's
    files do not say).  An exclusive start wanting CPU 1 would leave it no VM CPU:
    ``pinwarden start`` refused, but plain ``virsh start`` leased it and moved the running
    VM onto the host's CPU 0 (real-libvirt hunt).  Both refuse now, naming the domain, and
    nothing changes."""
    s, x = "pwtest-e2e-cgs", "pwtest-e2e-cgx"
    log = hooked.state / "hook.log"
    logged = len(log.read_text().splitlines()) if log.exists() else 0
    config = hooked.config.read_text()
    machine = env.CPUSET / "machine" / "cpuset.cpus"
    before = machine.read_text().strip()
    try:
        machine.write_text("1")
        hooked.config.write_text(config.replace('mode = "none"', 'mode = "cgroup"'))
        source = tmp_path / "cgx.xml"
        source.write_text(env.tiny_domain_xml(x, exclusive=True))
        domains.track(x)
        hooked.run("define", str(source), check=True)
        domains.define(s)
        started = virsh("start", s)
        assert started.returncode == 0, started.stderr
        assert env.vm_affinity(s) == {1}
        for how in (lambda: virsh("start", x), lambda: hooked.run("start", x, "--no-daemon")):
            refused = how()
            assert refused.returncode != 0, refused
            assert f"no CPU would be left for vcpu0 of running domain '{s}'" in \
                refused.stderr, refused.stderr
            assert not domains.conn.lookupByName(x).isActive()
            with Ledger(hooked.state) as ledger:
                assert ledger.holders() == ()
            assert env.vm_affinity(s) == {1}
            assert env.read_cpus("machine") == {1}
            assert not (env.CPUSET / hooked.holder_group(x)).exists()
        assert virsh("destroy", s).returncode == 0
    finally:
        for name in (s, x):
            with contextlib.suppress(env.libvirt.libvirtError):
                domains.conn.lookupByName(name).destroy()
        hooked.config.write_text(config)
        machine.write_text(before)
    new = log.read_text().splitlines()[logged:] if log.exists() else []
    assert not [line for line in new if "warning" in line], new


def test_plain_virsh_start_of_an_unpinned_domain_runs_on_the_vm_cpus(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """Nothing in the XML means the VM CPUs, never every CPU: libvirt itself would let an
    unpinned domain run on the housekeeping CPU 0 too; the hook's ``started`` step gives its
    threads the VM CPUs less the leased ones ({1} here, nothing leased), the same CPUs
    ``pinwarden start`` writes into ``<vcpu cpuset>``."""
    u = "pwtest-e2e-u"
    domains.define(u)
    with Ledger(hooked.state) as ledger:
        assert ledger.leases() == ()
    log = hooked.state / "hook.log"
    before = log.read_text().splitlines() if log.exists() else []
    started = virsh("start", u)
    assert started.returncode == 0, started.stderr
    assert env.vm_affinity(u) == {1}
    assert env.domain_cgroup(u).startswith("machine/")
    vcpuinfo = virsh("vcpuinfo", u)  # libvirt reads the affinity back from the kernel
    assert "CPU Affinity:   -y" in vcpuinfo.stdout, vcpuinfo.stdout
    new = log.read_text().splitlines()[len(before):] if log.exists() else []
    assert not [line for line in new if "warning" in line], new


def test_plain_virsh_start_keeps_pins_and_places_the_unpinned_threads(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """A shared domain pinning only vCPU 0 (to the housekeeping CPU 0: honoured outside
    cgroup mode): libvirt would leave vCPU 1 and the emulator's threads on every CPU; the
    hook's ``started`` step gives those the VM CPUs ({1}) and leaves vCPU 0 on its pin —
    what ``pinwarden plan`` says, thread by thread (QEMU's thread names)."""
    p = "pwtest-e2e-pp"
    domains.define(p, vcpus=2, vcpupins={0: "0"})
    started = virsh("start", p)
    assert started.returncode == 0, started.stderr
    pid = env.qemu_pid(p)
    seen: dict[str, frozenset[int]] = {}
    for tid in env.threads_of(pid):
        with contextlib.suppress(FileNotFoundError):
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            role = comm.split("/")[0] if comm.startswith("CPU ") else comm  # /KVM, /TCG
            seen[role] = seen.get(role, frozenset()) | env.thread_affinity(tid)
    assert seen.pop("CPU 0") == {0}, seen
    assert seen.pop("CPU 1") == {1}, seen
    # KVM's NX huge page recovery worker (a kernel worker in the QEMU process), when it has
    # started, is in the emulator's cgroup (and moves with it) or in that of vCPU 0, whose
    # pin it then keeps (the kernel refuses it other CPUs: the hook leaves it be)
    assert seen.pop("kvm-nx-lpage-re", frozenset({1})) in ({0}, {1}), seen
    assert seen and all(cpus == {1} for cpus in seen.values()), seen  # the emulator's
    vcpuinfo = virsh("vcpuinfo", p)  # libvirt reads the affinity back from the kernel
    assert vcpuinfo.stdout.count("CPU Affinity:   y-") == 1, vcpuinfo.stdout
    assert vcpuinfo.stdout.count("CPU Affinity:   -y") == 1, vcpuinfo.stdout


def define_exclusive_and_shared(hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path,
                                exclusive: str, shared: str) -> None:
    """``exclusive`` (vcpu0 pinned to CPU 1) stored by ``pinwarden define``, ``shared``
    (no pins) by libvirt."""
    source = tmp_path / f"{exclusive}.xml"
    source.write_text(env.tiny_domain_xml(exclusive, exclusive=True, vcpupins={0: "1"}))
    domains.track(exclusive)
    hooked.run("define", str(source), check=True)
    domains.define(shared)


def test_with_the_daemon_running_it_answers_the_hook(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """With ``pinwarden daemon`` running, the hook's calls go to it over its socket (the
    fast path, issue #12) and get the same answers: a lease for the exclusive domain, a
    refusal naming it for one pinned onto its CPU, the remaining CPU for an unpinned one,
    and the release when it goes."""
    e, u, p = "pwtest-e2e-he", "pwtest-e2e-hu", "pwtest-e2e-hp"
    define_exclusive_and_shared(hooked, domains, tmp_path, e, u)
    domains.define(p, vcpupins={0: "1"})
    daemon = env.Daemon(hooked, tmp_path / "daemon.log")
    try:
        daemon.wait_answering()
        assert (hooked.state / "hook.sock").is_socket()

        started = virsh("start", e)
        assert started.returncode == 0, started.stderr
        assert env.vm_affinity(e) == {1}
        refused = virsh("start", p)
        assert refused.returncode != 0 and e in refused.stderr, refused.stderr
        started = virsh("start", u)
        assert started.returncode == 0, started.stderr
        assert env.vm_affinity(u) == {0}  # the VM CPU is leased: the housekeeping CPU
        gone = virsh("destroy", e)
        assert gone.returncode == 0, gone.stderr
        with Ledger(hooked.state) as ledger:
            assert ledger.holders() == ()
        text = daemon.text()
        for op, name in (("prepare", e), ("started", e), ("prepare", p), ("prepare", u),
                         ("started", u), ("release", e)):
            assert f"hook {op} of qemu domain {name}: exit" in text, (op, name, text)
    finally:
        status = daemon.stop()
    assert status == 0 and "Traceback" not in daemon.text(), daemon.text()
    assert not (hooked.state / "hook.sock").exists()


def stop_outside_the_lock(proc: subprocess.Popen[bytes], state: Path) -> None:
    """SIGSTOP ``proc`` (a daemon) while it does not hold the manager lock: stopped in the
    middle of one of its passes it keeps the lock, and an exclusive start then waits the
    lock's timeout (120 s) as it must — which the full suite's run once hit, the virsh
    start timing out.  Stopped, continued and stopped again until the lock is free."""
    import fcntl
    import signal

    from pinwarden.manager import LOCK_NAME

    deadline = time.monotonic() + 60
    fd = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            proc.send_signal(signal.SIGSTOP)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() < deadline, "the daemon held the lock for 60 s"
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.2)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


def test_a_stopped_daemon_is_passed_over_by_the_hook(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """A real ``pinwarden daemon`` stopped (SIGSTOP: a debugger, a frozen cgroup) keeps its
    socket, and the kernel queues the hook's call where nobody reads it.  ``virsh start``
    of an exclusive and of a shared domain still goes through: the hook has the full
    command answer once the daemon has not taken the call within ACK_TIMEOUT, and the
    daemon, continued, neither answers those calls again nor keeps a stale lease."""
    import signal
    import time

    from pinwarden.libvirt.hookclient import ACK_TIMEOUT

    e, u = "pwtest-e2e-fe", "pwtest-e2e-fu"
    define_exclusive_and_shared(hooked, domains, tmp_path, e, u)
    daemon = env.Daemon(hooked, tmp_path / "daemon.log")
    try:
        daemon.wait_answering()
        stop_outside_the_lock(daemon.proc, hooked.state)
        try:
            for name in (e, u):
                began = time.monotonic()
                started = virsh("start", name)
                took = time.monotonic() - began
                assert started.returncode == 0, started.stderr
                # each hook call passed over after ACK_TIMEOUT: seconds, not the minutes
                # an exclusive start waited before (5) nor the shared one's (1)
                assert ACK_TIMEOUT <= took < 50, (name, took)
            assert env.vm_affinity(e) == {1}
            assert env.vm_affinity(u) == {0}  # CPU 1 is leased: the housekeeping CPU
            with Ledger(hooked.state) as ledger:
                (record,) = ledger.holders()
            assert record.ref.name == e and record.owner_pid == env.qemu_pid(e)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        time.sleep(2)  # the queued calls, now read: their clients are gone
        with Ledger(hooked.state) as ledger:
            (record,) = ledger.holders()
        assert record.ref.name == e and record.owner_pid == env.qemu_pid(e)
        for name in (u, e):
            assert virsh("destroy", name).returncode == 0
        with Ledger(hooked.state) as ledger:
            assert ledger.holders() == ()
    finally:
        status = daemon.stop()
    assert status == 0 and "Traceback" not in daemon.text(), daemon.text()


def test_with_the_daemon_running_pinwarden_start_is_served_by_it(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """With ``pinwarden daemon`` running, ``pinwarden start`` hands the start to it (issue
    #12): the same lease, owner, pins, output and refusals as the command's own start
    (``--no-daemon``), and the hook calls that start causes are answered meanwhile."""
    import json

    e, s = "pwtest-e2e-se", "pwtest-e2e-ss"
    define_exclusive_and_shared(hooked, domains, tmp_path, e, s)
    daemon = env.Daemon(hooked, tmp_path / "daemon.log")
    try:
        daemon.wait_answering()
        started = hooked.run("start", e)
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith(f"started {e} (exclusive on CPU 1), pid "), \
            started.stdout
        assert f"pid {env.qemu_pid(e)}, cgroup /" in started.stdout, started.stdout
        with Ledger(hooked.state) as ledger:
            (record,) = ledger.holders()
        assert record.ref.name == e and record.owner_pid == env.qemu_pid(e)
        assert env.vm_affinity(e) == {1}
        # a refusal reads the same from the daemon as from the command itself
        again, alone = hooked.run("start", e), hooked.run("start", e, "--no-daemon")
        assert again.returncode == alone.returncode == 1, (again, alone)
        assert again.stderr == alone.stderr and "already running" in again.stderr, \
            (again.stderr, alone.stderr)
        shared = hooked.run("start", s, "--json")
        assert shared.returncode == 0, shared.stderr
        doc = json.loads(shared.stdout)
        assert doc["domain"] == s and doc["pid"] == env.qemu_pid(s), doc
        assert env.vm_affinity(s) == {0}  # CPU 1 is leased: the housekeeping CPU
        for name in (s, e):
            hooked.run("stop", name, check=True)
        with Ledger(hooked.state) as ledger:
            assert ledger.holders() == ()
        text = daemon.text()
        for name, rc, times in ((e, 0, 1), (e, 1, 1), (s, 0, 1)):
            line = f"served 'pinwarden start {name}': exit {rc} after"
            assert text.count(line) == times, (line, text)
        # the hook calls of those starts were answered by the same daemon meanwhile
        assert f"hook prepare of qemu domain {e}: exit 0" in text, text
    finally:
        status = daemon.stop()
    assert status == 0 and "Traceback" not in daemon.text(), daemon.text()


def test_a_connection_to_another_host_is_refused_before_dialling(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """A URI naming another host or another driver is refused in one line before libvirt
    is asked: nothing dialled or spawned, nothing recorded, the domain not started.  The
    system daemon is taken in every form root may name it: another transport, and
    ``qemu:///session``, which libvirt gives root as the system daemon (its client dials the
    system socket; libvirtd's QEMU driver takes both paths when privileged)."""
    import subprocess

    name = "pwtest-e2e-uri"
    dom = domains.define(name, exclusive=True, vcpupins={0: "1"})

    def daemons() -> set[str]:
        ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True,
                            check=True).stdout
        return {line.strip() for line in ps.splitlines()
                if "libvirtd" in line or "virtqemud" in line or " ssh " in line}

    before = daemons()
    for uri, says in (("qemu+ssh://pwtest.invalid/system", "names host 'pwtest.invalid'"),
                      ("test:///default", "uses the 'test' driver")):
        for argv in (("start", name), ("start", name, "--no-daemon"),
                     ("start", name, "--dry-run"), ("stop", name)):
            got = hooked.run(*argv, "-c", uri)
            assert got.returncode == 1 and got.stderr.count("\n") == 1, (argv, got)
            assert says in got.stderr and "use qemu:///system or lxc:///" in got.stderr, \
                got.stderr
    assert daemons() == before and not dom.isActive()
    with Ledger(hooked.state) as ledger:
        assert ledger.holders() == ()
    for uri in ("qemu+unix:///system", "qemu:///session"):
        plan = hooked.run("start", name, "--dry-run", "-c", uri)
        assert plan.returncode == 0, (uri, plan.stderr)
        assert f"dry run: {name} would lease CPU 1 exclusively" in plan.stdout, plan.stdout
    assert daemons() == before


def _give_backs_of(pw: env.Pinwarden) -> list[int]:
    """Pids of the 'hook give-back' processes the hook left behind for ``pw``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"give-back" in argv and str(pw.state).encode() in argv:
                found.append(int(proc.name))
    return found


def _wait(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def test_a_vcpu_hot_plugged_without_the_daemon_gets_the_vm_cpus_when_the_lease_ends(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """A shared domain the hook placed on the housekeeping CPU (every VM CPU leased), then
    a vCPU hot-plugged (``virsh setvcpus --live``): libvirt gives the new thread its
    default, every CPU, which the narrowed cgroup kept on CPU 0.  Without the daemon, the
    lease's end widened the cgroup and the thread ran on CPUs 0-1 — the housekeeping CPU
    too — for good: the give-back forgot its placement's record as somebody else's pin
    (real-libvirt hunt).  Now the give-back first places such threads, as the daemon does,
    and every thread runs on the VM CPU again."""
    x, s = "pwtest-e2e-hpx", "pwtest-e2e-hps"
    define_exclusive_and_shared(hooked, domains, tmp_path, x, "pwtest-e2e-hpu")
    domains.track(s)
    domains.conn.defineXML(env.tiny_domain_xml(s, vcpus=2).replace(
        "<vcpu>2</vcpu>", "<vcpu current='1'>2</vcpu>"))
    hooked.run("start", x, check=True)
    assert virsh("start", s).returncode == 0
    assert env.vm_affinity(s) == {0}  # every VM CPU leased: the housekeeping CPU
    plugged = virsh("setvcpus", s, "2", "--live")
    assert plugged.returncode == 0, plugged.stderr
    assert "CPU 1/KVM" in env.thread_affinities(s)
    hooked.run("stop", x, check=True)
    assert env.thread_affinities(s)["CPU 1/KVM"] == {1}, env.thread_affinities(s)
    assert env.vm_affinity(s) == {1}, env.thread_affinities(s)
    assert virsh("destroy", s).returncode == 0


def test_a_lease_that_ends_through_the_hook_gives_the_cpu_back_without_the_daemon(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """An exclusive domain started by 'pinwarden start' re-pins a running shared domain
    off its CPU.  When it ends another way than 'pinwarden stop' (a plain 'virsh destroy',
    a guest powering off) and no daemon runs, the process the hook's 'release' leaves
    behind gives the CPU back.  Before, the shared domain kept one CPU fewer until the next
    'pinwarden stop' of some domain.  A 'pinwarden stop' still gives back itself and says
    so: that process waits for the stop, and finds nothing left."""
    a, s = "pwtest-e2e-ga", "pwtest-e2e-gs"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(s)
    started = virsh("start", s)
    assert started.returncode == 0, started.stderr
    as_found = env.vm_affinity(s)
    assert 1 in as_found, as_found  # the hook's 'started' gives it the VM CPUs
    threads = env.thread_affinities(s)
    assert set(threads.values()) == {as_found}, threads
    log = hooked.state / "hook.log"
    start = len(log.read_text()) if log.exists() else 0

    def said() -> str:  # what the hook logged during this test (the module shares the log)
        return log.read_text()[start:]

    out = hooked.run("start", a, "--no-daemon", check=True).stdout
    assert f"re-pinned {s} vcpu0" in out and env.vm_affinity(s) == {0}, out
    gone = virsh("destroy", a)
    assert gone.returncode == 0, gone.stderr
    _wait(f"{s} to get CPU 1 back", lambda: env.vm_affinity(s) == as_found)
    _wait("the give-back to end", lambda: not _give_backs_of(hooked))
    assert f"pinwarden: gave back {s} vcpu0: 0 -> " in said(), said()
    # every thread: QEMU's other emulator threads (call_rcu, the monitor's I/O thread)
    # keep their own affinity when libvirt re-pins the emulator
    after = env.thread_affinities(s)
    assert set(after.values()) == {as_found}, (threads, after)
    with Ledger(hooked.state) as ledger:
        assert ledger.holders() == ()
        assert [k for k in ledger.changes() if k.startswith("repin:")] == []
    assert "warning" not in said(), said()
    given = said().count("gave back")

    out = hooked.run("start", a, "--no-daemon", check=True).stdout
    assert f"re-pinned {s} vcpu0" in out and env.vm_affinity(s) == {0}, out
    stopped = hooked.run("stop", a, check=True).stdout
    assert f"gave back {s} vcpu0: 0 -> " in stopped, stopped
    assert env.vm_affinity(s) == as_found
    _wait("the give-back to end", lambda: not _give_backs_of(hooked))
    assert said().count("gave back") == given and "warning" not in said(), said()


def _define_pair(hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path, a: str,
                 s: str) -> None:
    """Exclusive ``a``, defined by 'pinwarden define' (which stores its partition, for
    plain 'virsh start'), and shared ``s``."""
    source = tmp_path / f"{a}.xml"
    source.write_text(env.tiny_domain_xml(a, exclusive=True))
    domains.track(a)
    hooked.run("define", str(source), check=True)
    domains.define(s)


def _virsh_ok(*steps: tuple[str, ...]) -> None:
    """Each ``virsh VERB DOMAIN`` in turn, every one succeeding."""
    for step in steps:
        done = virsh(*step)
        assert done.returncode == 0, (step, done.stderr)


def test_every_thread_of_a_shared_domain_gets_the_cpu_back_lease_after_lease(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """Plain 'virsh start' of an exclusive domain, then of a shared one (the hook places
    its threads on the housekeeping CPU 0); 'virsh destroy' of the exclusive one, twice.
    At the first lease's end libvirt's emulator pin gives the emulator's cgroup CPU 1,
    where the kernel shows QEMU's other emulator threads though their own affinity is
    still CPU 0: they were skipped by the give-back, and came back to CPU 0 at the second
    lease's end (its cgroup narrowed and widened again) — call_rcu and the monitor's I/O
    thread stayed on the housekeeping CPU for good (found by a real-libvirt hunt)."""
    a, s = "pwtest-e2e-ca", "pwtest-e2e-cs"
    _define_pair(hooked, domains, tmp_path, a, s)
    _virsh_ok(("start", a), ("start", s))
    for cycle in (1, 2):
        threads = env.thread_affinities(s)
        assert set(threads.values()) == {frozenset({0})}, (cycle, threads)
        gone = virsh("destroy", a)
        assert gone.returncode == 0, gone.stderr
        _wait(f"{s} to get CPU 1 back", lambda: 1 in env.vm_affinity(s))
        _wait("the give-back to end", lambda: not _give_backs_of(hooked))
        threads = env.thread_affinities(s)
        assert set(threads.values()) == {frozenset({1})}, (cycle, threads)
        if cycle == 1:
            _virsh_ok(("start", a))  # the kernel narrows s through its cgroups


def test_a_shared_domain_saved_with_pinwardens_pins_restores_beside_a_lease(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """A lease's end gives a shared domain its CPU back through libvirt's live pins
    (vcpupin/emulatorpin 1), which a save image keeps.  Saved while CPU 1 is leased
    again ('virsh managedsave'), it restores ('virsh start') off the lease: the hook's
    'restore' moves those pins to CPU 0 in the XML libvirt restores, and the lease's end
    gives CPU 1 back.  Before, 'prepare' refused the pins as the user's ('CPU 1 for
    <vcpupin vcpu='0' cpuset='1'> … is leased exclusively') and the domain could not be
    restored while the lease lasted (found by a real-libvirt hunt)."""
    a, s = "pwtest-e2e-ra", "pwtest-e2e-rs"
    _define_pair(hooked, domains, tmp_path, a, s)
    _virsh_ok(("start", a), ("start", s), ("destroy", a))
    _wait(f"{s} to get CPU 1 back", lambda: env.vm_affinity(s) == {1})
    _wait("the give-back to end", lambda: not _give_backs_of(hooked))
    assert "1" in virsh("vcpupin", s, "0", "--live").stdout  # libvirt's live pin now
    _virsh_ok(("start", a), ("managedsave", s), ("start", s))
    _restored_off_then_given_back(hooked, a, s)


def _restored_off_then_given_back(hooked: env.Pinwarden, a: str, s: str) -> None:
    """Shared ``s``, just restored beside exclusive ``a`` (CPU 1), runs on CPU 0 alone;
    once ``a`` is destroyed, the give-back puts every thread of ``s`` on CPU 1."""
    assert set(env.thread_affinities(s).values()) == {frozenset({0})}
    _virsh_ok(("destroy", a))
    _wait(f"{s} to get CPU 1 back", lambda: env.vm_affinity(s) == {1})
    _wait("the give-back to end", lambda: not _give_backs_of(hooked))
    assert set(env.thread_affinities(s).values()) == {frozenset({1})}, \
        env.thread_affinities(s)


def test_a_shared_domain_pinwarden_started_restores_beside_a_lease_and_gets_its_cpu_back(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """'pinwarden start' of a shared domain writes its placement as ``<vcpu cpuset='1'>``
    into the live definition, which a save image keeps.  Restored ('virsh restore') while
    CPU 1 is leased, the hook's 'restore' moves that cpuset to CPU 0 — and recorded
    nothing, so after the lease's end the domain stayed on the housekeeping CPU for good,
    'sync' and the daemon leaving it there (real-libvirt hunt).  Now each thread group the
    cpuset pins is recorded, and the lease's end pins each back to CPU 1 live."""
    a, s = "pwtest-e2e-ca", "pwtest-e2e-cs"
    _define_pair(hooked, domains, tmp_path, a, s)
    image = tmp_path / f"{s}.save"
    hooked.run("start", s, "--no-daemon", check=True)
    assert "cpuset='1'" in virsh("dumpxml", s).stdout
    _virsh_ok(("save", s, str(image)), ("start", a), ("restore", str(image)))
    _restored_off_then_given_back(hooked, a, s)


def test_a_shared_domain_the_hook_placed_off_a_lease_gets_the_cpu_back(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """A shared domain that pins nothing, started by plain 'virsh start' while the VM CPU
    1 is leased: the hook's 'started' gives its threads the housekeeping CPU 0.  That is
    their own affinity (sched_setaffinity), which the kernel keeps when the cgroup widens
    (Linux 6.2 and later, cgroup v1 too): before, the domain stayed on CPU 0 after the
    lease ended — the trixie lab's shared domain B kept one CPU the same way.  Now the
    hook records the placement, and the lease's end gives CPU 1 back: from 'pinwarden
    stop', and from the process the hook's 'release' leaves behind."""
    a, s = "pwtest-e2e-pa", "pwtest-e2e-ps"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(s)
    log = hooked.state / "hook.log"
    start = len(log.read_text()) if log.exists() else 0

    def said() -> str:  # what the hook logged during this test (the module shares the log)
        return log.read_text()[start:] if log.exists() else ""

    hooked.run("start", a, "--no-daemon", check=True)
    started = virsh("start", s)
    assert started.returncode == 0, started.stderr
    assert env.vm_affinity(s) == {0}
    stopped = hooked.run("stop", a, check=True).stdout
    assert env.vm_affinity(s) == {1}
    assert f"gave back {s} vcpu0: 0 -> 1" in stopped, stopped
    with Ledger(hooked.state) as ledger:
        assert [k for k in ledger.changes() if k.startswith("repin:")] == []

    # again, the lease ending by a plain 'virsh destroy' with no daemon running
    virsh("destroy", s)
    hooked.run("start", a, "--no-daemon", check=True)
    started = virsh("start", s)
    assert started.returncode == 0, started.stderr
    assert env.vm_affinity(s) == {0}
    gone = virsh("destroy", a)
    assert gone.returncode == 0, gone.stderr
    _wait(f"{s} to get CPU 1 back", lambda: env.vm_affinity(s) == {1})
    _wait("the give-back to end", lambda: not _give_backs_of(hooked))
    assert f"pinwarden: gave back {s} vcpu0: 0 -> 1" in said(), said()
    assert "warning" not in said(), said()


def test_threads_added_live_to_a_domain_the_hook_placed_get_the_vm_cpus(
        hooked: env.Pinwarden, domains: env.Domains, tmp_path: Path) -> None:
    """A shared domain that pins nothing, started by plain 'virsh start': the hook's
    'started' gives its threads the VM CPUs ({1}).  A vCPU hot-plugged later ('virsh
    setvcpus --live') and an I/O thread added live ('virsh iothreadadd --live') get
    libvirt's default instead — every CPU, the housekeeping CPU 0 too (libvirt 10.4 and
    later: every CPU but the isolated ones, the VM CPUs) — and kept it: the hook cannot
    see them, and the daemon looked only at leased CPUs (found by a real-libvirt hunt).
    The event daemon's pass now gives them the VM CPUs, as the hook gave the others; a
    thread the user pins ('virsh vcpupin --live') is theirs and stays."""
    h = "pwtest-e2e-hot"
    domains.track(h)
    domains.conn.defineXML(env.tiny_domain_xml(h, vcpus=2).replace(
        "<vcpu>2</vcpu>", "<vcpu current='1'>2</vcpu>"))
    _virsh_ok(("start", h))
    assert set(env.thread_affinities(h).values()) == {frozenset({1})}
    daemon = env.Daemon(hooked, tmp_path / "daemon.log")
    try:
        daemon.wait_answering()
        for step in (("setvcpus", h, "2", "--live"), ("iothreadadd", h, "1", "--live")):
            done = virsh(*step)
            assert done.returncode == 0, (step, done.stderr)
        _wait("the added threads on the VM CPUs",
              lambda: set(env.thread_affinities(h).values()) == {frozenset({1})}, 30)
        assert {"CPU 1/KVM", "IO iothread1"} <= set(env.thread_affinities(h))
        _virsh_ok(("vcpupin", h, "1", "0", "--live"))  # the user's pin: left alone
        time.sleep(7)  # two of the daemon's passes (--interval 3)
        assert env.thread_affinities(h)["CPU 1/KVM"] == {0}
    finally:
        status = daemon.stop()
    text = daemon.text()
    assert status == 0 and "Traceback" not in text, text
    placed = " ".join(line.partition(f"placed {h} ")[2].partition(" on CPU 1:")[0]
                      for line in text.splitlines() if f"placed {h} " in line)
    assert set(placed.replace(",", " ").split()) == {"vcpu1", "iothread1"}, text


def test_a_shared_domain_saved_while_narrowed_restores_with_its_cpus_back(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """An exclusive start re-pins a running shared domain off CPU 1 (libvirt live pins,
    recorded).  Saved meanwhile ('virsh managedsave'), the domain no longer ran when the
    lease ended, and the give-back forgot its records: restored ('virsh start') after the
    lease, it kept the narrowed pins, on the housekeeping CPU 0, for good (found by a
    real-libvirt hunt).  The records of a domain with a managed save image are kept now,
    and the hook's 'restore' gives the pins back in the XML libvirt restores."""
    a, s = "pwtest-e2e-na", "pwtest-e2e-ns"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(s)
    _virsh_ok(("start", s))
    assert set(env.thread_affinities(s).values()) == {frozenset({1})}
    out = hooked.run("start", a, "--no-daemon", check=True).stdout
    assert f"re-pinned {s} vcpu0: 1 -> 0" in out, out
    _virsh_ok(("managedsave", s), ("destroy", a))
    _wait("the give-back to end", lambda: not _give_backs_of(hooked))
    _virsh_ok(("start", s))
    assert set(env.thread_affinities(s).values()) == {frozenset({1})}, \
        env.thread_affinities(s)
    with Ledger(hooked.state) as ledger:
        assert [k for k in ledger.changes() if k.startswith("repin:")] == []
    log = (hooked.state / "hook.log").read_text()
    assert f"pinwarden: restoring {s} with the CPUs no longer leased: vcpu0 0 -> 1" in log, log


def test_a_forced_release_of_a_running_domain_puts_the_layout_back_when_it_stops(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """'pinwarden release --force' of a running exclusive domain frees the lease, but its
    holder group (cpu_exclusive) stays while its QEMU is in it, and machine stays narrowed
    with it.  When the domain then stopped, the hook's 'release' found no lease and left
    both in place — CPU 1 fenced off from every VM, 'status' and 'audit' saying it was
    free — until somebody's sync (real-libvirt hunt).  Now that 'release' puts the layout
    back; the forced release says what stays meanwhile."""
    a = "pwtest-e2e-fr"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    machine = env.read_cpus("machine")
    hooked.run("start", a, "--no-daemon", check=True)
    group = hooked.holder_group(a)
    assert env.cpu_exclusive(group) and 1 not in env.read_cpus("machine")
    out = hooked.run("release", a, "--force", check=True).stdout
    assert out.startswith(f"released qemu domain '{a}'") and \
        f"note: it still runs (pid {env.qemu_pid(a)}): its cgroup keeps CPU 1 until it " \
        "stops" in out, out
    # meanwhile status and audit show CPU 1 kept by it (they showed it free, and audit a
    # stale group that a sync would remove: it does not, the domain runs there)
    status = json.loads(hooked.run("status", "--json", check=True).stdout)
    assert [(k["domain"], k["cpus"]) for k in status["kept"]] == [(a, "1")], status
    audited = json.loads(hooked.run("audit", "--json").stdout)
    assert not [i for i in audited["intruders"] if i["kind"] == "stale-holder-group"], \
        audited
    # the forced release put the host's noise back on CPU 1: no failure of pinwarden's
    # (an IRQ there was an error, exit 1)
    assert not [i for i in audited["intruders"] if i["severity"] == "error"], audited
    assert [n for n in audited["notes"] if n.startswith(f"CPU 1 kept by qemu domain '{a}'")
            and f"('pinwarden stop {a}' frees it)" in n], audited["notes"]
    _virsh_ok(("destroy", a))
    assert env.read_cpus("machine") == machine
    assert not (env.CPUSET / group).exists()
    with Ledger(hooked.state) as ledger:
        assert ledger.holders() == () and ledger.host_record() is None


def test_a_cpu_a_forced_release_left_running_is_taken_for_every_plan(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """After 'pinwarden release --force' of running exclusive A, CPU 1 stays A's (its group
    keeps it).  Status and refusals of exclusive starts said so, but the shared side did
    not (lifecycle hunt): an unpinned shared start was planned onto CPU 1 and failed in
    libvirt ('Permission denied'), a shared domain pinned onto it was let through to the
    same failure, every sync tried to give it to the shared domains, and when A stopped
    they did not get it back.  Now every plan keeps off it; A's stop gives it back."""
    a, s, n, p = "pwtest-e2e-fk", "pwtest-e2e-fks", "pwtest-e2e-fkn", "pwtest-e2e-fkp"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(s)
    domains.define(n)
    domains.define(p, vcpupins={0: "1"})

    def cpus_of(name: str) -> set[int]:
        return set().union(*env.thread_affinities(name).values())

    hooked.run("start", a, "--no-daemon", check=True)
    _virsh_ok(("start", s))
    assert cpus_of(s) == {0}, cpus_of(s)  # off A's CPU
    hooked.run("release", a, "--force", check=True)
    started = hooked.run("start", n, "--no-daemon")
    assert started.returncode == 0, started.stderr
    assert cpus_of(n) == {0}, cpus_of(n)
    refused = virsh("start", p)
    assert refused.returncode != 0 and virsh("domstate", p).stdout.strip() == "shut off"
    assert f"CPU 1 for <vcpupin vcpu='0' cpuset='1'> of domain '{p}' is kept by qemu " \
        f"domain '{a}'" in refused.stderr and f"(pinwarden stop {a})" in refused.stderr, \
        refused.stderr
    synced = hooked.run("sync")
    assert synced.returncode == 0 and "re-pin" not in synced.stderr, synced.stderr
    assert cpus_of(s) == {0} and cpus_of(n) == {0}
    _virsh_ok(("destroy", a))
    _wait(f"{s} and {n} to get CPU 1 back", lambda: cpus_of(s) == {1} and cpus_of(n) == {1})
    _wait("the give-back to end", lambda: not _give_backs_of(hooked))
    with Ledger(hooked.state) as ledger:
        assert ledger.holders() == () and ledger.host_record() is None
        assert not [k for k in ledger.changes() if k.startswith(("kept:", "repin:"))]


def test_a_cpu_the_lease_database_lost_is_taken_for_shared_plans_too(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """The lease database lost (moved aside) while exclusive A runs on CPU 1, in its
    holder group: status and exclusive refusals named A, but a shared start was planned
    onto CPU 1 and failed in libvirt ('Permission denied'), and a shared domain pinned
    onto it got that raw error too, no holder named (durability hunt).  Every plan keeps
    off a holder group processes run in, whether the ledger records it or not."""
    a, n, p = "pwtest-e2e-lost", "pwtest-e2e-lostn", "pwtest-e2e-lostp"
    domains.define(a, exclusive=True, vcpupins={0: "1"})
    domains.define(n)
    domains.define(p, vcpupins={0: "1"})
    hooked.run("start", a, "--no-daemon", check=True)
    aside = hooked.state.with_name("state-aside")
    hooked.state.rename(aside)
    try:
        started = hooked.run("start", n, "--no-daemon")
        assert started.returncode == 0, started.stderr
        assert set().union(*env.thread_affinities(n).values()) == {0}
        refused = virsh("start", p)
        assert refused.returncode != 0 and virsh("domstate", p).stdout.strip() == "shut off"
        assert f"of domain '{p}' is kept by qemu domain '{a}'" in refused.stderr, \
            refused.stderr
        _virsh_ok(("destroy", n))
    finally:
        _virsh_ok(("destroy", a))
        shutil.rmtree(hooked.state, ignore_errors=True)
        aside.rename(hooked.state)
        hooked.run("sync", check=True)


def test_a_shared_domain_left_in_its_exclusive_partition_is_refused_saying_why(
        hooked: env.Pinwarden, domains: env.Domains) -> None:
    """An exclusive domain made shared by removing only pinwarden's metadata keeps the
    <resource><partition> 'pinwarden define' gave it, whose cgroup exists only while it is
    exclusive: libvirt failed the start with "Failed to create v2 cgroup …" (real-libvirt
    hunt).  The hook and 'pinwarden start' say what to remove instead."""
    s = "pwtest-e2e-left"
    domains.define(s, partition=f"/pwtest-e2e-vm-{s}")
    for refused in (virsh("start", s), hooked.run("start", s)):
        assert refused.returncode != 0, refused.stdout
        assert f"shared domain '{s}' keeps <resource><partition>/pwtest-e2e-vm-{s}" \
               "</partition>" in refused.stderr and "remove <resource>" in refused.stderr, \
            refused.stderr
    assert not domains.conn.lookupByName(s).isActive()


@pytest.mark.parametrize("libvirt_reachable", [True, False], ids=["job", "sync"])
def test_a_shared_domain_placed_off_a_jobs_cpu_gets_it_back_when_the_job_ends(
        hooked: env.Pinwarden, domains: env.Domains, libvirt_reachable: bool) -> None:
    """A shared domain started by plain 'virsh start' while a 'pinwarden run' job holds
    the VM CPU: the hook places it on the housekeeping CPU 0.  No libvirt hook sees the
    job end, and without the daemon the domain stayed on CPU 0 — 'pinwarden sync' did not
    help either (real-libvirt hunt).  The job's end gives the CPU back now; when it cannot
    reach libvirt it says so, and 'pinwarden sync' gives it back."""
    s = "pwtest-e2e-js"
    domains.define(s)
    job_env = dict(os.environ) if libvirt_reachable else \
        dict(os.environ, LIBVIRT_DEFAULT_URI="qemu:///system?socket=/nonexistent/sock")
    job = subprocess.Popen(
        [env.PINWARDEN, "run", "--state-dir", str(hooked.state), "--config",
         str(hooked.config), "--exclusive", "1", "--name", "pwtest-e2e-job", "--",
         "sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=job_env)
    try:
        _wait("the job's lease", lambda: "pwtest-e2e-job" in hooked.run("status").stdout)
        _virsh_ok(("start", s))
        assert set(env.thread_affinities(s).values()) == {frozenset({0})}
    finally:
        job.terminate()
        _, err = job.communicate(timeout=60)
    if libvirt_reachable:
        assert f"pinwarden: gave back {s} " in err, err
    else:
        assert "shared VMs kept off job 'pwtest-e2e-job''s CPUs do not have them back" in err, err
        assert set(env.thread_affinities(s).values()) == {frozenset({0})}
        synced = hooked.run("sync", check=True).stdout
        assert f"gave back {s} " in synced, synced
    assert set(env.thread_affinities(s).values()) == {frozenset({1})}, \
        env.thread_affinities(s)
