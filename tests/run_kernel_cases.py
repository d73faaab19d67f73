"""`pinwarden run` against a real kernel's cgroup v1 cpuset hierarchy (marker ``kernel``).

These cases need an *exclusive* cpuset of their own directly below the cpuset root, which a
shared host cannot always give (any sibling cgroup holding the same CPUs — libvirt's
``machine`` — forbids it).  ``tests/test_run.py`` therefore runs this file inside a fresh
virtme-ng guest (see ``tests/guest.py``); it can also be run directly on a host whose cpuset
root has room: ``pytest tests/run_kernel_cases.py``.

Every case uses its own cgroup names (``pwtest-run-PID/…``) through a configuration file, a
temporary state directory, and the real ``pinwarden`` command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pinwarden.config import load_config
from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import CgroupOpError
from pinwarden.enforce.v1 import CpusetV1
from pinwarden.manager import Manager

pytestmark = pytest.mark.kernel

PINWARDEN = [sys.executable, "-c", "from pinwarden.cli import entry; entry()"]

PROBE = r"""
import json, os, sys
mount = sys.argv[1]
path = next(l.split(":", 2)[2].strip() for l in open("/proc/self/cgroup")
            if l.split(":")[1] == "cpuset")
group = os.path.join(mount, path.lstrip("/"))
read = lambda n: open(os.path.join(group, n)).read().strip()
print(json.dumps({"cgroup": path, "cpu_exclusive": read("cpuset.cpu_exclusive"),
                  "cpus": read("cpuset.cpus"), "affinity": sorted(os.sched_getaffinity(0)),
                  "env": os.environ.get("PINWARDEN_CPUS")}))
"""


@dataclass
class Sandbox:
    base: str
    mount: Path
    backend: CpusetV1
    config: Path
    state: Path
    last: int  # the only VM CPU: like a 2-CPU host, every other CPU is the host reserve

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PINWARDEN, "run", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*PINWARDEN, "run", "--config", str(self.config), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def leases(self) -> list[tuple[int, str]]:
        """Leases of live holders (a dead owner's lease is free, reaped or not)."""
        with Manager(load_config(self.config), Path("/"), self.state) as manager:
            return [(lease.cpu, lease.holder.name) for lease in manager.leases()]

    def exists(self, rel: str) -> bool:
        return (self.mount / self.base / rel).is_dir()


def _cleanup(backend: CpusetV1, base: str) -> None:
    try:
        snap = backend.read_state([base])
    except CgroupOpError:
        return
    for path in sorted(snap.subtree(base), key=lambda p: -p.count("/")):
        for tid in backend.tasks(path):
            with contextlib.suppress(CgroupOpError):
                backend.attach_thread("", tid)
        with contextlib.suppress(CgroupOpError):
            backend.rmdir(path)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    backend = CpusetV1.from_mounts()
    root = backend.read_group("")
    base = f"pwtest-run-{os.getpid()}"
    backend.mkdir(base)
    try:
        backend.set_mems(base, root.mems)
        backend.set_cpus(base, root.cpus)
        try:
            backend.set_partition(base, "exclusive")
        except CgroupOpError as exc:
            others = [f"/{n} ({backend.read_group(n).cpus})" for n in root.children
                      if n != base]
            pytest.fail(f"cannot make /{base} exclusive beside {', '.join(others)}: {exc}; "
                        "these cases need a cpuset root without other users "
                        "(tests/test_run.py runs them in a virtme-ng guest)")
        online = root.cpus
        last = max(online.cpus)
        state = tmp_path / "state"
        config = tmp_path / "pinwarden.toml"
        config.write_text(
            "[partition]\nmode = \"none\"\n"
            f"host_reserve = \"{(online - CpuSet.of([last])).to_list()}\"\n"
            f"cgroup = \"{base}/machine\"\nexclusive = \"pinwarden.partition\"\n"
            f"[ledger]\nstate_dir = \"{state}\"\n")
        yield Sandbox(base, backend.root, backend, config, state, last)
    finally:
        _cleanup(backend, base)


def _wait_for(predicate, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_command_runs_in_an_exclusive_cpuset_with_matching_affinity(sandbox: Sandbox) -> None:
    done = sandbox.run("--exclusive", "1", "--name", "pwtest-probe", "--",
                       sys.executable, "-c", PROBE, str(sandbox.mount))
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["cgroup"] == f"/{sandbox.base}/pinwarden-run-pwtest-probe.partition"
    assert seen["cpu_exclusive"] == "1"
    assert seen["cpus"] == str(sandbox.last) == seen["env"]
    assert seen["affinity"] == [sandbox.last]
    # afterwards: lease released, job cgroup gone, the host as found: the shared partition
    # pinwarden had to create is gone again, and so is the job's group
    assert sandbox.leases() == []
    assert not sandbox.exists("pinwarden-run-pwtest-probe.partition")
    assert not sandbox.exists("machine")


@pytest.mark.parametrize(("script", "status"), [
    ("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL)])
def test_exit_status_passes_through(sandbox: Sandbox, script: str, status: int) -> None:
    done = sandbox.run("--exclusive", "1", "--", "sh", "-c", script)
    assert done.returncode == status, done.stderr
    assert sandbox.leases() == []


def test_missing_command_exits_127_and_releases(sandbox: Sandbox) -> None:
    done = sandbox.run("--exclusive", "1", "--", "/nonexistent/pwtest-command")
    assert done.returncode == 127
    assert "cannot run /nonexistent/pwtest-command" in done.stderr
    assert sandbox.leases() == []


HANDLER = r"""
import signal, sys, time
out = open(sys.argv[1], "a", buffering=1)
def seen(sig, frame):
    out.write(signal.Signals(sig).name + "\n")
    if sig == signal.SIGTERM:
        sys.exit(42)
for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT,
          signal.SIGTERM):
    signal.signal(s, seen)
out.write("ready\n")
while True:
    time.sleep(0.05)
"""


def test_signals_are_forwarded_to_the_command(sandbox: Sandbox, tmp_path: Path) -> None:
    log = tmp_path / "signals.log"
    proc = sandbox.popen("--exclusive", "1", "--name", "pwtest-sig", "--",
                         sys.executable, "-c", HANDLER, str(log))
    try:
        _wait_for(lambda: log.exists() and "ready" in log.read_text(), "the command")
        sent = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT]
        for n, sig in enumerate(sent, start=2):
            proc.send_signal(sig)
            _wait_for(lambda n=n: len(log.read_text().split()) >= n, f"{sig.name} to arrive")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().split() == ["ready", *(s.name for s in sent), "SIGTERM"]
    assert proc.returncode == 42, err
    assert sandbox.leases() == []


def test_second_job_is_refused_naming_the_holder(sandbox: Sandbox, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    first = sandbox.popen("--exclusive", "1", "--name", "pwtest-first", "--",
                          "sh", "-c", f"touch {ready}; exec sleep 600")
    try:
        _wait_for(ready.exists, "the first job")
        second = sandbox.run("--exclusive", "1", "--name", "pwtest-second", "--", "true")
        assert second.returncode == 1
        assert second.stderr.startswith("pinwarden: error: ")
        assert f"CPU {sandbox.last} to job 'pwtest-first'" in second.stderr
        assert "never leased" in second.stderr
        explicit = sandbox.run("--cpus", str(sandbox.last), "--", "true")
        assert explicit.returncode == 1 and "pwtest-first" in explicit.stderr
        assert sandbox.leases() == [(sandbox.last, "pwtest-first")]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM
    assert sandbox.leases() == []


def test_killed_supervisor_frees_the_lease_when_the_command_ends(
        sandbox: Sandbox, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    sup = sandbox.popen("--exclusive", "1", "--name", "pwtest-orphan", "--",
                        "sh", "-c", f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; "
                                    "exec sleep 600")
    _wait_for(pidfile.exists, "the command")
    command = int(pidfile.read_text())
    sup.kill()  # SIGKILL: no cleanup at all
    sup.wait()
    try:
        # the command still runs: its lease holds
        assert sandbox.leases() == [(sandbox.last, "pwtest-orphan")]
        group = f"{sandbox.base}/pinwarden-run-pwtest-orphan.partition"
        assert command in sandbox.backend.tasks(group)
    finally:
        os.kill(command, signal.SIGKILL)
    _wait_for(lambda: command not in sandbox.backend.tasks(group), "the command to exit")
    assert sandbox.leases() == []  # reaped: the owner is gone
    # the next sync (any change, the daemon, or 'pinwarden sync') removes the stale cgroup
    with Manager(load_config(sandbox.config), Path("/"), sandbox.state) as manager:
        manager.sync()
    assert not sandbox.exists("pinwarden-run-pwtest-orphan.partition")


def test_running_vm_cgroup_under_the_shared_partition_is_narrowed(
        sandbox: Sandbox, tmp_path: Path) -> None:
    b, base, last = sandbox.backend, sandbox.base, sandbox.last
    online = b.read_group("").cpus
    vm = f"{base}/machine/qemu-1-pwtest.libvirt-qemu"
    for path in (f"{base}/machine", vm, f"{vm}/vcpu0", f"{vm}/emulator"):
        b.mkdir(path)
        b.set_mems(path, b.read_group("").mems)
        b.set_cpus(path, online)
    b.set_cpus(f"{vm}/vcpu0", CpuSet.of([last]))  # a vCPU pinned to the CPU to be leased
    vcpu = subprocess.Popen(["sleep", "600"])
    emulator = subprocess.Popen(["sleep", "600"])
    try:
        b.attach_process(f"{vm}/vcpu0", vcpu.pid)
        b.attach_process(f"{vm}/emulator", emulator.pid)
        done = sandbox.run("--exclusive", "1", "--", sys.executable, "-c",
                           "import json, os; print(json.dumps([sorted(os.sched_getaffinity(p))"
                           f" for p in ({vcpu.pid}, {emulator.pid}, 0)]))")
        assert done.returncode == 0, done.stderr
        vcpu_aff, emu_aff, job_aff = json.loads(done.stdout)
        rest = sorted(online.cpus - {last})
        assert job_aff == [last]
        assert vcpu_aff == rest and emu_aff == rest  # moved off the leased CPU
        # after the job the shared partition gets the CPU back and the VM tree follows it
        state = b.read_state([f"{base}/machine"])
        # (the VM's CPUs stay in the pool: running VMs are never squeezed onto fewer
        # CPUs than they use unless those are leased)
        assert state[f"{base}/machine"].cpus == online
        assert state[vm].cpus == online and state[f"{vm}/emulator"].cpus == online
    finally:
        for p in (vcpu, emulator):
            p.kill()
            p.wait()


def test_an_edit_of_the_vm_partition_while_leased_is_kept(sandbox: Sandbox,
                                                            tmp_path: Path) -> None:
    """An administrator takes a CPU from the VM partition cgroup while a job holds one of
    its CPUs.  The next sync said nothing and put pinwarden's value back, and the job's end
    put back what was found before it: the edit was lost.  Now it stays, is said, and is
    part of what the job's end puts back."""
    b, base, last = sandbox.backend, sandbox.base, sandbox.last
    online = b.read_group("").cpus
    machine = f"{base}/machine"
    b.mkdir(machine)
    b.set_mems(machine, b.read_group("").mems)
    vm = online - CpuSet.of([online.first()])  # mode cgroup: the VM CPUs are 1-3
    assert len(vm) >= 3, f"needs 4 CPUs, the guest has {online}"
    b.set_cpus(machine, vm)
    config = tmp_path / "edit.toml"
    config.write_text(f"[partition]\ncgroup = \"{machine}\"\nexclusive = "
                      f"\"pinwarden.partition\"\n[ledger]\nstate_dir = \"{sandbox.state}\"\n")
    taken = vm.first()  # the CPU the administrator takes from the VMs
    edit = (
        "import pathlib, subprocess, sys; "
        f"f = pathlib.Path({str(sandbox.mount / machine / 'cpuset.cpus')!r}); "
        "before = f.read_text().strip(); "
        f"f.write_text({(vm - CpuSet.of([last, taken])).to_list()!r}); "
        f"s = subprocess.run({[*PINWARDEN, 'sync', '--config', str(config)]!r}, "
        "capture_output=True, text=True); "
        "print(before, f.read_text().strip(), s.returncode, s.stderr.strip(), sep='|')")
    done = subprocess.run([*PINWARDEN, "run", "--config", str(config), "--cpus", str(last),
                           "--", sys.executable, "-c", edit],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, during, rc, said = done.stdout.strip().split("|", 3)
    assert CpuSet.parse_kernel(before) == vm - CpuSet.of([last])  # narrowed by the job
    assert CpuSet.parse_kernel(during) == vm - CpuSet.of([last, taken])  # the edit stays
    assert rc == "0" and f"removed CPU {taken}" in said and machine in said, said
    # the job's end: the partition as found, with the edit
    assert b.read_group(machine).cpus == vm - CpuSet.of([taken])
    with Manager(load_config(config), Path("/"), sandbox.state) as manager:
        assert manager.record() is None
        assert manager.host().partition.vm_cpus == vm - CpuSet.of([taken])
