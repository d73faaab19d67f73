#!/usr/bin/env python3
"""Wake-up latency under load: a shared CPU, an exclusive one, an exclusive one without host noise.

``make bench-noise`` (bench/README.md, section bench-noise).  cyclictest (Debian's
``rt-tests``) measures wake-up latency on one CPU while ``stress-ng`` loads every CPU a
shared tenant may use, in three configurations, interleaved round by round in one run:

* ``shared``               cyclictest on the CPU, in the tenants' cgroup (no lease): the
                           hogs run there too;
* ``exclusive``            ``pinwarden run --exclusive 1 -- cyclictest …`` with
                           ``[isolation] noise = false``: the kernel keeps the tenants'
                           cgroup off the leased CPU (cgroup v1 ``cpu_exclusive``, v2
                           partition), IRQs, unbound work and kernel threads stay;
* ``exclusive+isolation``  the same with ``noise = true``: pinwarden also moves IRQs, the
                           default IRQ affinity, the unbound-workqueue mask and movable
                           kernel threads off the CPU while it is leased.

The tenants' cgroup: on cgroup v1 ``machine/STEM-tenants`` (a libvirt-style shared VM:
pinwarden narrows ``machine`` while a CPU is leased, and the group follows it); on v2 a
top-level ``STEM-tenants`` without ``cpuset.cpus`` (the kernel takes partition CPUs out of
its effective set).  The hogs (``stress-ng``, see :func:`hog_commands`) are stopped with
SIGSTOP between measurements — pinwarden's start and release are not slowed by them
(minutes under TCG) — and continued once cyclictest measures.  The device IRQs the load
raises are found by counting (with and without the hogs) and pointed at the measured CPU,
as irqbalance places an IRQ on one CPU (``--no-steer``: left alone); managed IRQs refuse.
pinwarden runs through its own CLI with a private ``--state-dir`` and ``--config`` (mode
``none``, host reserve CPU 0, holder stem ``pwtest-noise-PID``); afterwards the ledger, the
cgroups and every noise source must read as found (checked, reported under ``checks``).
This process keeps to CPU 0 (the host reserve) while it polls.

    .venv/bin/python bench/noise.py host --rounds 5 --duration 12   # this machine
    .venv/bin/python bench/noise.py host-fifo                       # the same, SCHED_FIFO 95
    .venv/bin/python bench/noise.py lab --lab-rounds 2              # the kernel lab (TCG)
    .venv/bin/python bench/noise.py all                             # all three: make bench-noise
    .venv/bin/python bench/noise.py render                          # noise.md from noise.json

Needs root, ``cyclictest`` and ``stress-ng`` (``apt-get install rt-tests stress-ng``); the
lab needs virtme-ng and takes ``flock /tmp/pw-vm.lock`` around its boot.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from pwbench import latency  # noqa: E402

from pinwarden.cpuset import CpuSet  # noqa: E402
from pinwarden.isolation import PF_KTHREAD, PF_NO_SETAFFINITY, Write  # noqa: E402
from pinwarden.ledger import Ledger  # noqa: E402
from pinwarden.mounts import read_mounts  # noqa: E402
from pinwarden.noise import apply as apply_noise  # noqa: E402
from pinwarden.noise import read_noise  # noqa: E402

PINWARDEN = str(Path(sys.executable).parent / "pinwarden")
RESULTS = HERE / "results"
SECTIONS = (("host", "This host, cyclictest SCHED_OTHER (as a vCPU thread runs)"),
            ("host_fifo", "This host, cyclictest SCHED_FIFO 95 (a real-time task)"),
            ("lab", "Kernel lab (virtme-ng, TCG), cyclictest SCHED_OTHER"))
VM_LOCK = Path("/tmp/pw-vm.lock")
#: Histogram range: 250 ms in 1 µs buckets (2 MB per measuring thread, locked); samples
#: beyond it still count (overflow: a percentile among them reads "unknown") and the
#: maximum stays exact.
HIST_US = 250_000
Data = dict[str, Any]


def log(message: str) -> None:
    print(f"bench-noise: {message}", file=sys.stderr, flush=True)


# -- cgroups ------------------------------------------------------------------------------

@dataclass
class Cgroups:
    """The cpuset hierarchy: its mount, v1 or v2, and the tenants' group below it."""

    mount: Path
    version: str
    tenants: str = ""  # relative to mount

    @classmethod
    def detect(cls) -> Cgroups:
        mounts = read_mounts(Path("/"))
        v1 = mounts.v1("cpuset")
        if v1 is not None:
            return cls(v1, "v1")
        if mounts.v2 is not None and mounts.v2_has("cpuset"):
            return cls(mounts.v2, "v2")
        raise SystemExit("bench-noise: no cpuset cgroup hierarchy (v1 cpuset or cgroup2)")

    def path(self, rel: str) -> Path:
        return self.mount / rel if rel else self.mount

    def read(self, rel: str, name: str) -> str | None:
        try:
            return (self.path(rel) / name).read_text().strip()
        except OSError:
            return None

    @property
    def effective_file(self) -> str:
        return "cpuset.effective_cpus" if self.version == "v1" else "cpuset.cpus.effective"

    def make_tenants(self, stem: str) -> None:
        """The shared tenants' group (see the module docstring).  Empty tenants' groups a
        killed earlier run left behind go first: below ``machine`` they block libvirt's
        and pinwarden's own writes there (EBUSY), and the tests refuse to run."""
        for old in (*self.mount.glob("pwtest-noise-*-tenants"),
                    *self.mount.glob("machine/pwtest-noise-*-tenants")):
            with contextlib.suppress(OSError):  # still populated: a run in progress
                old.rmdir()
        if self.version == "v1":
            machine = self.path("machine")
            if not machine.is_dir():
                raise SystemExit(f"bench-noise: no {machine} (libvirt's shared partition): "
                                 "on cgroup v1 an exclusive group exists only beside it")
            self.tenants = f"machine/{stem}-tenants"
            group = self.path(self.tenants)
            group.mkdir()
            for name in ("cpuset.mems", "cpuset.cpus"):
                (group / name).write_text((machine / name).read_text())
        else:
            control = self.mount / "cgroup.subtree_control"
            if "cpuset" not in control.read_text().split():
                control.write_text("+cpuset\n")
            self.tenants = f"{stem}-tenants"
            self.path(self.tenants).mkdir()

    @property
    def tids_file(self) -> Path:
        """The tenants' threads: v1 ``tasks``, v2 ``cgroup.threads``."""
        return self.path(self.tenants) / ("tasks" if self.version == "v1" else
                                          "cgroup.threads")

    def join_tenants_sh(self) -> list[str]:
        """``sh -c`` prefix that moves the shell into the tenants' group, then execs."""
        procs = self.path(self.tenants) / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {shlex.quote(str(procs))} && exec "$@"', "sh"]

    def remove_tenants(self) -> bool:
        if not self.tenants:
            return True
        group = self.path(self.tenants)
        for _ in range(50):
            try:
                group.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                time.sleep(0.1)  # the killed hogs are still leaving
        return False

    def stem_groups(self, stem: str) -> list[str]:
        """Every group named after ``stem``, at the top and below ``machine``."""
        found = [p for p in self.mount.glob(f"{stem}*") if p.is_dir()]
        found += [p for p in self.mount.glob(f"machine/{stem}*") if p.is_dir()]
        return sorted(str(p.relative_to(self.mount)) for p in found)

    def top_state(self) -> Data:
        """What should read the same before and after: the root's effective CPUs and the
        CPUs of every top-level group (``machine`` included)."""
        out: Data = {"root_effective": self.read("", self.effective_file)}
        for child in sorted(p.name for p in self.mount.iterdir() if p.is_dir()):
            out[child] = self.read(child, "cpuset.cpus")
        return out


# -- noise sources ------------------------------------------------------------------------

def noise_state() -> dict[str, str]:
    """Every noise source pinwarden may move, as text: ``irq:N``, ``irq-default``,
    ``workqueue`` and every kernel thread that user space may move (``kthread:PID:START``,
    whatever its affinity — pinwarden itself only moves those on more than one CPU)."""
    snap = read_noise(Path("/"))
    out: dict[str, str] = {irq.key: str(irq.affinity) for irq in snap.irqs}
    if snap.default_affinity is not None:
        out["irq-default"] = str(snap.default_affinity)
    if snap.workqueue is not None:
        out["workqueue"] = str(snap.workqueue)
    for kt in snap.kthreads:
        if kt.flags & PF_KTHREAD and not kt.flags & PF_NO_SETAFFINITY \
                and not kt.irq_thread:
            out[kt.key] = str(kt.affinity)
    return out


def noise_on(state: dict[str, str], cpu: int) -> Data:
    """How many of the noise sources include ``cpu`` (and which of the few global ones)."""
    def has(value: str) -> bool:
        return value != "" and cpu in CpuSet.parse(value)

    return {"irqs": sum(1 for k, v in state.items() if k.startswith("irq:") and has(v)),
            "kthreads": sum(1 for k, v in state.items()
                            if k.startswith("kthread:") and has(v)),
            "irq_default": has(state.get("irq-default", "")),
            "workqueue": has(state.get("workqueue", ""))}


def differences(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """Keys present in both whose value changed (threads come and go; IRQs don't), with
    the kernel thread's name after a thread's values."""
    out: dict[str, list[str]] = {}
    for k in sorted(before.keys() & after.keys()):
        if before[k] != after[k]:
            out[k] = [before[k], after[k]]
            if k.startswith("kthread:"):
                out[k].append(comm(int(k.split(":")[1])) or "?")
    return out


def spread_noise(found: dict[str, str], online: CpuSet) -> dict[str, str]:
    """Put every noise source on every online CPU, as a fresh boot has it; the keys whose
    write the kernel took, with their found values (for :func:`put_back`)."""
    writes = [Write(k, online) for k, v in found.items() if CpuSet.parse(v) != online]
    done = {o.key: found[o.key] for o in apply_noise(Path("/"), writes) if o.ok}
    return done


def steer(irqs: Sequence[int], cpu: int) -> dict[str, Data]:
    """Point each IRQ at ``cpu`` alone, as irqbalance places IRQs (one CPU each); per IRQ
    what it was and what the kernel said (``EIO``/``EPERM``: managed, it cannot move)."""
    writes = [Write(f"irq:{n}", CpuSet.of([cpu])) for n in irqs]
    found = noise_state()
    out: dict[str, Data] = {}
    for o in apply_noise(Path("/"), writes):
        out[o.key] = {"was": found.get(o.key), "ok": o.ok,
                      "error": None if o.ok else o.error}
    return out


def read_noise_irq(irq: int) -> Data:
    base = Path(f"/proc/irq/{irq}")
    out: Data = {}
    for name in ("smp_affinity_list", "effective_affinity_list"):
        with contextlib.suppress(OSError):
            out[name.removesuffix("_list")] = (base / name).read_text().strip()
    return out


def put_back(values: dict[str, str]) -> list[str]:
    """Write ``values`` back; the keys that failed (a thread that exited is not a failure)."""
    outcomes = apply_noise(Path("/"), [Write(k, CpuSet.parse(v)) for k, v in values.items()])
    return [o.key for o in outcomes if not o.ok and not o.key.startswith("kthread:")]


# -- processes ----------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


def thread_view(pid: int, tid: int) -> Data:
    """A thread's scheduling policy (``/proc/…/stat`` field 41), allowed CPUs, cgroup."""
    out: Data = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        policy = int(stat[stat.rindex(")") + 2:].split()[38])
        out["policy"] = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle"}.get(
            policy, str(policy))
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out["allowed"] = line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError):
        lines = [ln.split(":", 2) for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
        v1 = [path for _, controllers, path in lines if "cpuset" in controllers.split(",")]
        v2 = [path for hid, _, path in lines if hid == "0"]
        out["cgroup"] = next(iter(v1 + v2), None)
    return out


def runtime_ns(pid: int) -> int | None:
    """CPU time of every thread of ``pid`` so far (``/proc/PID/task/TID/schedstat``)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


#: /proc/stat columns of a CPU line, in USER_HZ ticks.
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times(cpu: int) -> dict[str, int]:
    for line in Path("/proc/stat").read_text().splitlines():
        words = line.split()
        if words and words[0] == f"cpu{cpu}":
            return dict(zip(STAT_FIELDS, map(int, words[1:9]), strict=False))
    raise ValueError(f"cpu{cpu} not in /proc/stat")


def cpu_use(before: dict[str, int], after: dict[str, int], own_ns: int | None) -> Data:
    """Where the CPU's time went between two reads of /proc/stat, in percent: ``busy``
    (anything but idle and iowait, steal excluded), ``irq`` (hard and soft interrupts,
    where the kernel accounts them), ``steal`` (the hypervisor ran something else), and
    ``others``: busy minus the measuring thread's own CPU time — tasks and kernel threads
    that are not cyclictest."""
    delta = {k: after[k] - before[k] for k in STAT_FIELDS}
    total = sum(delta.values())
    if total <= 0:
        return {}
    busy = sum(delta[k] for k in ("user", "nice", "system", "irq", "softirq"))
    tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
    out: Data = {"busy_pct": round(100 * busy / total, 1),
                 "irq_pct": round(100 * (delta["irq"] + delta["softirq"]) / total, 1),
                 "steal_pct": round(100 * delta["steal"] / total, 1)}
    if own_ns is not None:
        out["others_pct"] = round(max(0.0, 100 * (busy - own_ns / tick_ns) / total), 1)
    return out


def runnable_on(cpu: int, skip: int) -> list[str]:
    """Names of the threads runnable on ``cpu`` right now (state R, last CPU ``cpu``),
    except process ``skip`` (cyclictest)."""
    out: list[str] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == skip:
            continue
        with contextlib.suppress(OSError):
            for task in (proc / "task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (task / "stat").read_text()
                    rest = stat[stat.rindex(")") + 2:].split()
                    if rest[0] == "R" and int(rest[36]) == cpu:
                        out.append(stat[stat.index("(") + 1:stat.rindex(")")])
    return out


def threads_by_cpu(tids_file: Path) -> dict[str, int]:
    """How many threads of a cgroup last ran on each CPU (``/proc/TID/stat`` field 39)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for tid in tids_file.read_text().split():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{tid}/stat").read_text()
                cpu = stat[stat.rindex(")") + 2:].split()[36]
                out[cpu] = out.get(cpu, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def top(names: Sequence[str], n: int = 6) -> list[list[Any]]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [[k, v] for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


def unpinned() -> None:
    """In a child before exec: every online CPU again (this process keeps to CPU 0, and
    since Linux 6.2 a cpuset change keeps a task within the affinity it asked for)."""
    os.sched_setaffinity(0, CpuSet.parse(
        Path("/sys/devices/system/cpu/online").read_text().strip()).as_list())


class Hogs:
    """The tenants' load: stress-ng (and, in the lab, a reader of the 9p root), each in a
    session of its own inside the tenants' group, stopped and continued as a whole."""

    def __init__(self, cgroups: Cgroups, commands: list[list[str]]) -> None:
        self.cgroups = cgroups
        self.commands = commands
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, work: Path) -> None:
        for i, cmd in enumerate(self.commands):
            with (work / f"hog-{i}.log").open("wb") as log_file:
                self.procs.append(subprocess.Popen(
                    [*self.cgroups.join_tenants_sh(), *cmd], stdin=subprocess.DEVNULL,
                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=unpinned, cwd=work))
        time.sleep(1.0)
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                said = (work / f"hog-{i}.log").read_text(errors="replace").strip()
                raise SystemExit(f"bench-noise: hog {proc.args!r} exited {proc.returncode}: "
                                 f"{said[-2000:]}")

    def signal(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # our own session: stress-ng and its workers

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.signal(signal.SIGKILL)  # workers left behind by a parent that went first
        for proc in self.procs:
            proc.wait()
        procs = self.cgroups.path(self.cgroups.tenants) / "cgroup.procs"
        deadline = time.monotonic() + 10
        while procs.exists() and procs.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)


# -- one measurement ----------------------------------------------------------------------

@dataclass
class Bench:
    """Everything one environment's run needs (host or guest)."""

    name: str  # "host" or "lab"
    rounds: int
    duration: int
    interval_us: int
    policy: str
    work: Path
    cgroups: Cgroups
    stem: str
    hog_commands: list[list[str]]
    load_summary: str
    poll_s: float
    sample_s: float
    start_timeout_s: float
    spread: bool = False
    steer_io: bool = True
    baseline: dict[str, str] = field(default_factory=dict)
    cpu: int = -1
    results: Data = field(default_factory=dict)
    histograms: dict[str, list[latency.Histogram]] = field(default_factory=dict)
    on_progress: Any = None

    # pinwarden -------------------------------------------------------------------------
    @property
    def state(self) -> Path:
        return self.work / "state"

    def config(self, noise: bool) -> Path:
        path = self.work / f"noise-{'on' if noise else 'off'}.toml"
        path.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n'
                        f'exclusive = "{self.stem}.partition"\n'
                        f'[isolation]\nnoise = {"true" if noise else "false"}\n')
        return path

    def pinwarden_run(self, noise: bool, name: str, command: Sequence[str]) -> list[str]:
        return [PINWARDEN, "run", "--state-dir", str(self.state), "--config",
                str(self.config(noise)), "--exclusive", "1", "--name", f"{self.stem}-{name}",
                "--", *command]

    def holder_group(self, name: str) -> str:
        return f"{self.stem}-run-{self.stem}-{name}.partition"

    # cyclictest ------------------------------------------------------------------------
    def cyclictest(self, out: Path) -> list[str]:
        cmd = ["cyclictest", "-q", "-m", "-t", "1", "-a", str(self.cpu),
               "-i", str(self.interval_us), "-D", f"{self.duration}s",
               "-h", str(HIST_US), "--histfile=/dev/null", f"--json={out}"]
        # `-p` after `--policy=other` would switch back to SCHED_FIFO (rt-tests 2.4)
        return [*cmd, "--policy=other"] if self.policy == "other" else \
            [*cmd, f"--policy={self.policy}", "-p", "95"]

    def probe(self) -> Data:
        """One ``pinwarden run --exclusive 1`` without noise isolation: which CPU it
        leases (the CPU every configuration measures) and how long a start takes here."""
        t0 = time.monotonic()
        done = subprocess.run(
            self.pinwarden_run(False, "probe", ["grep", "Cpus_allowed_list", "/proc/self/status"]),
            capture_output=True, text=True, timeout=self.start_timeout_s)
        seconds = time.monotonic() - t0
        if done.returncode != 0:
            raise SystemExit(f"bench-noise: pinwarden run failed ({done.returncode}): "
                             f"{done.stderr.strip()}")
        allowed = CpuSet.parse(done.stdout.split(":", 1)[1].strip())
        if len(allowed) != 1:
            raise SystemExit(f"bench-noise: the job got CPUs {allowed}, not one")
        self.cpu = allowed.as_list()[0]
        return {"cpu": self.cpu, "pinwarden_run_s": round(seconds, 2),
                "stderr": done.stderr.strip()}

    def measure(self, config: str, index: int, hogs: Hogs) -> Data:
        """One cyclictest run in ``config``; its histogram and what was seen around it."""
        out = self.work / f"{config}-{index}.json"
        ct = self.cyclictest(out)
        # every run starts from the same noise placement: what an earlier run left
        # different (see not_restored) is set back first
        drift = differences(self.baseline, noise_state())
        if drift:
            put_back({k: self.baseline[k] for k in drift})
        noise_before = noise_state()
        if config == "shared":
            cmd = [*self.cgroups.join_tenants_sh(), *ct]
        else:
            cmd = self.pinwarden_run(config == "exclusive+isolation", f"r{index}", ct)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=unpinned if config == "shared" else None)
        try:
            pid = self.wait_measuring(proc)
            started = time.monotonic() - t0
            seen: Data = {"start_s": round(started, 2), "baseline_reapplied": sorted(drift)}
            tids = threads(pid)
            seen["thread"] = thread_view(pid, tids[-1])
            seen["tenants_effective"] = self.cgroups.read(self.cgroups.tenants,
                                                          self.cgroups.effective_file)
            during = noise_state()
            seen["noise_on_cpu"] = noise_on(during, self.cpu)
            irq0 = Path("/proc/interrupts").read_text()
            soft0 = Path("/proc/softirqs").read_text()
            own0 = runtime_ns(pid)
            stat0 = cpu_times(self.cpu)
            m0 = time.monotonic()
            hogs.resume()
            own1 = own0
            seen_running: list[str] = []
            samples = 0
            next_sample = time.monotonic() + 0.25
            tenants_by_cpu: dict[str, int] = {}
            # the measuring thread's end is the window's end: cyclictest then writes its
            # histogram (a million lines), which takes long under TCG
            while alive(pid) and proc.poll() is None and len(threads(pid)) >= 2:
                own1 = runtime_ns(pid) or own1
                if time.monotonic() >= next_sample:  # who else is on the CPU
                    seen_running += runnable_on(self.cpu, pid)
                    samples += 1
                    next_sample += self.sample_s
                    for k, v in threads_by_cpu(self.cgroups.tids_file).items():
                        tenants_by_cpu[k] = tenants_by_cpu.get(k, 0) + v
                time.sleep(self.poll_s)
            irq1 = Path("/proc/interrupts").read_text()
            soft1 = Path("/proc/softirqs").read_text()
            stat1 = cpu_times(self.cpu)
            window = time.monotonic() - m0
            hogs.pause()
            _, err = proc.communicate(timeout=self.start_timeout_s)
        except BaseException:
            hogs.pause()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # pinwarden forwards it
                proc.wait()
            raise
        if proc.returncode != 0:
            raise SystemExit(f"bench-noise: {config} run {index} exited {proc.returncode}: "
                             f"{err.strip()}")
        (run,) = latency.parse_cyclictest_json(out.read_text())
        if run.cpu != self.cpu:
            raise SystemExit(f"bench-noise: cyclictest measured CPU {run.cpu}, not {self.cpu}")
        noise_after = noise_state()
        seen.update({
            "window_s": round(window, 2),
            "interrupts": latency.on_cpu(irq0, irq1, self.cpu),
            "softirqs": latency.on_cpu(soft0, soft1, self.cpu),
            "cpu_use": cpu_use(stat0, stat1, None if own0 is None or own1 is None
                               else own1 - own0),
            "not_restored": differences(noise_before, noise_after),
            "runnable_samples": samples,
            "runnable_on_cpu": top(seen_running),
            "tenant_threads_by_cpu": tenants_by_cpu,
            "stderr": err.strip(),
            "summary": run.histogram.summary(),
        })
        self.histograms.setdefault(config, []).append(run.histogram)
        return seen

    def io_irqs(self, hogs: Hogs) -> dict[str, Data]:
        """The device IRQs the load raises: numbered rows of /proc/interrupts that count
        at least 20/s more with the hogs running than without them (2 s each on the host,
        6 s in the lab)."""
        seconds = 2.0 if self.name == "host" else 6.0
        t0 = Path("/proc/interrupts").read_text()
        time.sleep(seconds)
        t1 = Path("/proc/interrupts").read_text()
        hogs.resume()
        time.sleep(seconds)
        t2 = Path("/proc/interrupts").read_text()
        hogs.pause()
        quiet, loaded = latency.irq_totals(t0, t1), latency.irq_totals(t1, t2)
        names = latency.irq_names(t2)
        out: dict[str, Data] = {}
        for irq, count in sorted(loaded.items(), key=lambda kv: -kv[1]):
            rate = (count - quiet.get(irq, 0)) / seconds
            if irq.isdigit() and rate >= 20:
                info = read_noise_irq(int(irq))
                out[irq] = {"name": names.get(irq, "?"), "per_s": round(rate),
                            **info}
        return out

    def wait_measuring(self, proc: subprocess.Popen[str]) -> int:
        """The pid of cyclictest once its measurement thread exists."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"bench-noise: {proc.args!r} exited {proc.returncode} "
                                 f"before measuring: {proc.communicate()[1].strip()}")
            for pid in [proc.pid, *children_of(proc.pid)]:
                if comm(pid) == "cyclictest" and len(threads(pid)) >= 2:
                    return pid
            time.sleep(self.poll_s / 2)
        raise SystemExit(f"bench-noise: cyclictest did not start within "
                         f"{self.start_timeout_s:.0f} s")

    # the whole run ---------------------------------------------------------------------
    def run(self) -> Data:
        res = self.results
        res.update({"about": about(self.cgroups), "rounds": self.rounds,
                    "duration_s": self.duration, "interval_us": self.interval_us,
                    "policy": {"other": "SCHED_OTHER", "fifo": "SCHED_FIFO 95"}.get(
                        self.policy, self.policy),
                    "load": {"summary": self.load_summary,
                             "commands": [shlex.join(c) for c in self.hog_commands]},
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                    "runs": [], "checks": {}, "notes": []})
        cg_before = self.cgroups.top_state()
        found = noise_state()
        res["noise_found"] = {"irq_default": found.get("irq-default"),
                              "workqueue": found.get("workqueue")}
        put_back_later: dict[str, str] = {}
        hogs = Hogs(self.cgroups, self.hog_commands)
        try:
            res["probe"] = self.probe()
            res["cpu"] = self.cpu
            res["noise_found"]["on_cpu"] = noise_on(found, self.cpu)
            res["checks"]["noise_after_probe"] = differences(found, noise_state())
            if self.spread:
                put_back_later = spread_noise(found, read_noise(Path("/")).online)
                res["noise_spread"] = {"keys": len(put_back_later),
                                       "on_cpu": noise_on(noise_state(), self.cpu)}
            self.cgroups.make_tenants(self.stem)
            res["tenants"] = self.cgroups.tenants
            hogs.start(self.work)
            hogs.pause()
            io = self.io_irqs(hogs)
            res["io_irqs"] = io
            if self.steer_io:
                before_steer = noise_state()
                res["io_irqs_steered"] = steered = steer([int(n) for n in io], self.cpu)
                put_back_later.update({k: before_steer[k] for k, v in steered.items()
                               if v["ok"] and k in before_steer and k not in put_back_later})
            res["noise_baseline_on_cpu"] = noise_on(noise_state(), self.cpu)
            self.baseline = noise_state()
            for index in range(self.rounds):
                order = latency.CONFIGS[index % 3:] + latency.CONFIGS[:index % 3]
                for config in order:
                    log(f"{self.name}: round {index + 1}/{self.rounds}, {config}")
                    seen = self.measure(config, index, hogs)
                    res["runs"].append({"round": index, "config": config, **seen})
                    self.summarise()
                    if self.on_progress is not None:
                        self.on_progress(res)
            res["checks"]["noise_between_runs_as_before"] = all(
                not r["not_restored"] for r in res["runs"])
        finally:
            hogs.stop()
            res["checks"]["tenants_removed"] = self.cgroups.remove_tenants()
            if put_back_later:
                res["checks"]["put_back_failed"] = put_back(put_back_later)
            res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        after = noise_state()
        res["checks"]["noise_as_found"] = differences(found, after) or True
        res["checks"]["cgroups_as_found"] = (self.cgroups.top_state() == cg_before) or {
            "before": cg_before, "after": self.cgroups.top_state()}
        res["checks"]["no_stem_groups_left"] = self.cgroups.stem_groups(self.stem) or True
        with Ledger(self.state) as ledger:
            res["checks"]["ledger_empty"] = (not ledger.leases() and not ledger.changes()
                                             and ledger.host_record() is None)
        self.summarise()
        probe = res["checks"].get("noise_after_probe") or {}
        if probe:
            res["notes"].append(
                "after the probe lease (noise = false: pinwarden moves no noise source) "
                + ", ".join(f"{v[2] if len(v) > 2 else k} {v[0]} → {v[1]}"
                            for k, v in sorted(probe.items()))
                + (": the kernel's doing — a v2 partition that comes or goes makes "
                   "cpuset update_tasks_cpumask() reset every unbound task of the root "
                   "cgroup, kernel threads included, to the root's effective CPUs"
                   if self.cgroups.version == "v2" else ""))
        left: dict[str, str] = {}
        for r in res["runs"]:
            for key, values in r["not_restored"].items():
                left[key] = values[2] if len(values) > 2 else key
        if left:
            kinds = sorted({k.split(":")[0] for k in left})
            res["notes"].append(
                f"pinwarden did not put back {len(left)} noise source(s) when its lease ended "
                f"({', '.join(kinds)}: {', '.join(sorted(set(left.values()))[:8])}"
                f"{'…' if len(set(left.values())) > 8 else ''}; see runs[].not_restored); "
                "each run starts from the same placement again (runs[].baseline_reapplied)")
        return res

    def summarise(self) -> None:
        res = self.results
        configs: Data = {}
        for name in latency.CONFIGS:
            hists = self.histograms.get(name, [])
            if not hists:
                continue
            runs = [r for r in res["runs"] if r["config"] == name]
            seconds = sum(r["window_s"] for r in runs)
            configs[name] = {
                **latency.merged(hists).summary(),
                "p99_per_round_us": [h.percentile(0.99) for h in hists],
                "max_per_round_us": [h.max_us for h in hists],
                "interrupts_per_s": latency.per_second(
                    latency.summed(r["interrupts"] for r in runs), seconds),
                "softirqs_per_s": latency.per_second(
                    latency.summed(r["softirqs"] for r in runs), seconds),
                "cpu_use_pct": mean_of([r["cpu_use"] for r in runs]),
                "runnable_on_cpu": top([n for r in runs for n, c in r["runnable_on_cpu"]
                                        for _ in range(c)]),
                "runnable_samples": sum(r["runnable_samples"] for r in runs),
            }
        res["configs"] = configs
        res["ratios"] = latency.ratios(configs)


def mean_of(dicts: Sequence[Data]) -> Data:
    """Key by key mean of the runs' percentages."""
    keys = sorted({k for d in dicts for k in d})
    return {k: round(sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d), 1)
            for k in keys}


def about(cgroups: Cgroups) -> Data:
    def text(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    ct = subprocess.run(["cyclictest", "--help"], capture_output=True, text=True)
    sng = subprocess.run(["stress-ng", "--version"], capture_output=True, text=True)
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "online": text("/sys/devices/system/cpu/online"),
            "isolated": text("/sys/devices/system/cpu/isolated") or "",
            "cgroup": cgroups.version,
            "cyclictest": (ct.stdout + ct.stderr).splitlines()[0].strip(),
            "stress_ng": sng.stdout.strip(),
            "virtualisation": virt()}


def virt() -> str:
    done = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True) \
        if shutil.which("systemd-detect-virt") else None
    return done.stdout.strip() if done is not None else "unknown"


def hog_commands(cpus: int, work: Path, lab: bool) -> tuple[list[list[str]], str]:
    """The load, and a sentence saying what it is.

    * ``--cpu`` (matrix products: compute and cache) — two per CPU a tenant may use;
    * ``--timer`` — POSIX timers at 10 kHz each, one per CPU: local APIC timer interrupts
      (``LOC``) wherever these hogs run (hrtimers fire on the CPU that armed them), so
      they follow the tenants, and the kernel's exclusivity already takes them away;
    * device interrupts and kernel work: on a host with a disk, ``--hdd`` with ``dsync``
      4 KiB writes (every write one virtio-blk completion interrupt, plus the ext4
      journal thread and unbound writeback workers); the lab VM has no disk, so a loop
      reading a large file from the 9p root (cache=none: every read is a virtio request
      and a completion interrupt).

    Not used: a ping flood on loopback raises no hardware interrupt at all (``lo`` hands
    the packet to the NET_RX softirq of the sending CPU), so it is CPU load on the
    tenants' CPUs, like the hogs.
    """
    cmds = [["stress-ng", "--cpu", str(2 * cpus), "--cpu-method", "matrixprod",
             "--timer", str(cpus), "--timer-freq", "10000", "--temp-path", str(work)]]
    if lab:
        big = max((p for p in Path("/usr/lib/x86_64-linux-gnu").glob("*.so*")
                   if p.is_file()), key=lambda p: p.stat().st_size)
        cmds.append(["sh", "-c", f"while :; do dd if={shlex.quote(str(big))} of=/dev/null "
                                 "bs=512k 2>/dev/null; done"])
        io = f"a reader of {big.name} on the 9p root (virtio interrupts)"
    else:
        cmds[0] += ["--hdd", "1", "--hdd-opts", "dsync", "--hdd-write-size", "4k",
                    "--hdd-bytes", "16m"]
        io = "stress-ng --hdd 1 with dsync 4 KiB writes (virtio-blk interrupts, jbd2, writeback)"
    summary = (f"stress-ng --cpu {2 * cpus} (matrixprod) and --timer {cpus} at 10 kHz in the "
               f"tenants' cgroup; {io}")
    return cmds, summary


# -- environments -------------------------------------------------------------------------

def run_here(name: str, args: argparse.Namespace, progress: Path | None = None) -> Data:
    if os.geteuid() != 0:
        raise SystemExit("bench-noise: needs root (cgroups, IRQ affinity, cyclictest -m)")
    for tool in ("cyclictest", "stress-ng"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench-noise: {tool} is missing (apt-get install rt-tests "
                             "stress-ng)")
    cgroups = Cgroups.detect()
    # This process polls and samples: keep it on the housekeeping CPU (the host reserve,
    # CPU 0).  The hogs get the tenants' CPUs when they join their cgroup, the jobs get
    # theirs from pinwarden, and cyclictest pins its measuring thread with -a.
    os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp(prefix="pwtest-noise-", dir=args.workdir))
    stem = f"pwtest-noise-{os.getpid()}"
    pool = len(CpuSet.parse(Path("/sys/devices/system/cpu/online").read_text().strip()))
    cmds, summary = hog_commands(pool, work, lab=name == "lab")
    bench = Bench(name=name, rounds=args.rounds, duration=args.duration,
                  interval_us=args.interval, policy=args.policy, work=work, cgroups=cgroups,
                  stem=stem, hog_commands=cmds, load_summary=summary,
                  poll_s=0.02 if name == "host" else 0.2,
                  sample_s=0.5 if name == "host" else 2.0,
                  start_timeout_s=60 if name == "host" else 300, spread=args.spread,
                  steer_io=not args.no_steer)
    if progress is not None:
        def save(res: Data) -> None:
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(progress)
        bench.on_progress = save
    try:
        res = bench.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.spread:
        res["notes"].append("noise spread over every online CPU first (as a fresh boot has "
                            "it); what was found is put back at the end")
    return res


def lab_command(args: argparse.Namespace, outdir: Path) -> tuple[list[str], Path]:
    sys.path.insert(0, str(REPO / "tests"))
    vm: Any = importlib.import_module("lab.vm")  # the kernel lab's boot (tests/lab/vm.py)

    kernel = vm.lab_kernel()
    inner = [sys.executable, str(Path(__file__).resolve()), "guest", "--out",
             str(outdir / "guest.json"), "--rounds", str(args.lab_rounds), "--duration",
             str(args.lab_duration), "--interval", str(args.lab_interval), "--policy",
             args.policy, "--workdir", "/tmp"] + (["--no-steer"] if args.no_steer else [])
    cmd = [str(vm.vng_binary()), "--disable-kvm", "--verbose", "--run", str(kernel),
           "--cpus", str(vm.CPUS), "--memory", "2G"]
    for node in vm.NUMA:
        cmd += ["--numa", node]
    cmd += ["--append", vm.APPEND, "--rwdir", str(outdir), "--cwd", str(REPO)]
    if vm.QEMU_OPTS:
        cmd += [f"--qemu-opts={vm.QEMU_OPTS}"]
    cmd += ["--exec", shlex.join(inner)]
    return cmd, kernel


def guests_running() -> list[int]:
    """Pids of virtme-ng QEMUs running on this machine (only read, never touched)."""
    out: list[int] = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv[0].startswith(b"/usr/bin/qemu-system") and b"virtme-ng" in argv:
                    out.append(int(proc.name))
    return out


@contextlib.contextmanager
def vm_lock() -> Iterator[None]:
    """``flock /tmp/pw-vm.lock``: one virtme-ng guest at a time on this machine."""
    with VM_LOCK.open("a") as fh:
        log(f"waiting for {VM_LOCK}")
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            while others := guests_running():  # a guest started without the lock
                log(f"waiting for the virtme-ng guest(s) {others} to end")
                time.sleep(15)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_lab(args: argparse.Namespace) -> Data:
    outdir = Path(tempfile.mkdtemp(prefix="pwtest-noise-lab-"))
    cmd, kernel = lab_command(args, outdir)
    env = dict(os.environ)
    env["PATH"] = f"{Path(cmd[0]).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    # the VM sees this tree read-only: compile now, or every Python start recompiles
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src"), str(HERE)],
                   check=False, stdout=subprocess.DEVNULL)
    console = outdir / "console.log"
    with vm_lock():
        log(f"booting the lab ({kernel.name}); console: {console}")
        t0 = time.monotonic()
        with console.open("wb") as fh:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=args.lab_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: vng and its qemu
                proc.wait()
                rc = None
        seconds = time.monotonic() - t0
    result = outdir / "guest.json"
    if not result.exists():
        tail = "\n".join(console.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"bench-noise: the lab VM ({'timed out' if rc is None else rc}) "
                         f"wrote no results; console tail:\n{tail}")
    res: Data = json.loads(result.read_text())
    res["boot_and_run_s"] = round(seconds, 1)
    res["vm"] = {"kernel_image": kernel.name, "cpus": 8, "append": "isolcpus=6-7",
                 "accel": "TCG (--disable-kvm)", "console": str(console)}
    if rc is None or not res.get("complete"):
        res.setdefault("notes", []).append(
            "the VM stopped before the run completed: partial results")
    res.setdefault("notes", []).append(
        "TCG: the 8 virtual CPUs are threads of one QEMU on this 2-CPU machine, so every "
        "latency includes the host's scheduling of those threads; only the ratios, measured "
        "side by side, mean something")
    return res


def load_results(path: Path) -> Data:
    try:
        data: Data = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}


def write_results(path: Path, md: Path, update: Data) -> None:
    data = load_results(path)
    data.update(update)
    data["generated_by"] = "make bench-noise (bench/noise.py)"
    path.write_text(json.dumps(data, indent=1) + "\n")
    md.write_text(latency.markdown(data, SECTIONS))
    log(f"wrote {path} and {md}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("host", "host-fifo", "lab", "all", "render", "guest"))
    parser.add_argument("--out", type=Path, default=RESULTS / "noise.json")
    parser.add_argument("--md", type=Path, default=RESULTS / "noise.md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=12, help="seconds per measurement")
    parser.add_argument("--interval", type=int, default=500, help="cyclictest interval, µs")
    parser.add_argument("--fifo-rounds", type=int, default=3,
                        help="host-fifo (part of all): rounds of the SCHED_FIFO series")
    parser.add_argument("--fifo-duration", type=int, default=10)
    parser.add_argument("--lab-rounds", type=int, default=2)
    parser.add_argument("--lab-duration", type=int, default=15)
    parser.add_argument("--lab-interval", type=int, default=1000)
    parser.add_argument("--lab-timeout", type=float, default=900.0)
    parser.add_argument("--policy", choices=("other", "fifo"), default="other",
                        help="cyclictest's scheduling policy: other (SCHED_OTHER, as a "
                             "vCPU thread runs; default) or fifo (SCHED_FIFO 95)")
    parser.add_argument("--spread", action="store_true",
                        help="host: first spread every movable IRQ, the default IRQ "
                             "affinity, the workqueue mask and kernel threads over every "
                             "online CPU (as a fresh boot has them); put back at the end")
    parser.add_argument("--no-steer", action="store_true",
                        help="leave the IRQs the I/O load raises where they are (default: "
                             "point them at the measured CPU, as irqbalance may, and put "
                             "them back at the end)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.what == "render":
        args.md.write_text(latency.markdown(load_results(args.out), SECTIONS))
        return 0
    if args.what == "guest":  # inside the lab VM (run_lab)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        res = run_here("lab", args, progress=args.out)
        res["complete"] = True
        args.out.write_text(json.dumps(res, indent=1))
        return 0
    update: Data = {}
    if args.what in ("host", "all"):
        update["host"] = run_here("host", args)
        write_results(args.out, args.md, update)
    if args.what in ("host-fifo", "all") and args.fifo_rounds > 0:
        fifo = argparse.Namespace(**{**vars(args), "policy": "fifo",
                                     "rounds": args.fifo_rounds,
                                     "duration": args.fifo_duration})
        update["host_fifo"] = run_here("host", fifo)
        write_results(args.out, args.md, update)
    if args.what in ("lab", "all"):
        update["lab"] = run_lab(args)
        write_results(args.out, args.md, update)
    return 0


if __name__ == "__main__":
    sys.exit(main())
