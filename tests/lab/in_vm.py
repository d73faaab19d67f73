"""Runs INSIDE the virtme-ng lab VM (8 CPUs, nodes 0-3/4-7, isolcpus=6-7, cgroup v2).

Usage: ``python in_vm.py OUTDIR`` (OUTDIR is a host directory shared read-write).

Each check performs kernel operations and records *observations* (raw kernel file contents,
exceptions with their attributes, command output) under its name in
``OUTDIR/results.json``; the host-side tests in ``tests/test_lab_*.py`` make the
assertions, so each failure names what the kernel or pinwarden did.  A check that raises is
recorded with its traceback and the script goes on.  The JSON is rewritten after every
check, so a VM that dies half-way still reports the checks done so far.

The VM is disposable, but the script still cleans up what it creates (groups named
``pwtest-*``, processes it started, by process group) so later checks start clean.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/pwlab-out")
STATE = Path("/tmp/pwlab-state")  # the VM's /tmp is a private overlay
CONFIG_DIR = Path("/tmp/pwlab-config")
BIN = Path(sys.executable).parent
PINWARDEN = str(BIN / "pinwarden")
CLI_TIMEOUT = 180.0

RESULTS: dict[str, Any] = {"checks": {}, "done": False, "started": time.time()}
Data = dict[str, Any]


def save() -> None:
    tmp = OUT / "results.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=1, sort_keys=True, default=str))
    tmp.replace(OUT / "results.json")


def check(name: str) -> Callable[[Callable[[], Data]], Callable[[], Data]]:
    def wrap(fn: Callable[[], Data]) -> Callable[[], Data]:
        def run() -> Data:
            start = time.monotonic()
            print(f"lab: {name} ...", flush=True)
            try:
                data = fn()
                entry: Data = {"ok": True, "data": data}
            except BaseException:  # recorded for the host-side test
                data = {}
                entry = {"ok": False, "error": traceback.format_exc()}
            entry["seconds"] = round(time.monotonic() - start, 2)
            RESULTS["checks"][name] = entry
            save()
            print(f"lab: {name} {'ok' if entry['ok'] else 'FAILED'} "
                  f"({entry['seconds']} s)", flush=True)
            if not entry["ok"]:
                print(entry["error"], flush=True)
            return data
        CHECKS.append(run)
        return run
    return wrap


CHECKS: list[Callable[[], Data]] = []


# -- helpers ------------------------------------------------------------------------------

def cgroup_root() -> Path:
    from pinwarden.mounts import read_mounts

    mount = read_mounts(Path("/")).v2
    if mount is None:
        raise RuntimeError("no cgroup2 mount in the VM")
    return mount


def raw(path: str, name: str) -> str | None:
    """A cgroup file's text (stripped); None when absent."""
    try:
        return (cgroup_root() / path / name).read_text().strip()
    except FileNotFoundError:
        return None


def write_raw(path: str, name: str, value: str) -> None:
    (cgroup_root() / path / name).write_text(value + "\n")


def exc_data(exc: BaseException) -> Data:
    out: Data = {"type": type(exc).__name__, "message": str(exc)}
    for attr in ("errno", "action", "path", "value", "detail", "group", "kind", "reason",
                 "code"):
        value = getattr(exc, attr, None)
        if attr == "errno" and isinstance(value, int):
            out["errno_name"] = errno.errorcode.get(value, str(value))
        if value is not None:
            out[attr] = value
    return out


def expect_error(fn: Callable[[], object]) -> Data:
    """Run ``fn``; the recorded exception (or ``{"raised": False}``)."""
    try:
        fn()
    except Exception as exc:
        return {"raised": True, **exc_data(exc)}
    return {"raised": False}


def group_data(path: str) -> Data:
    d: Data = {"exists": (cgroup_root() / path).is_dir()}
    if d["exists"]:
        for name in ("cpuset.cpus", "cpuset.cpus.effective", "cpuset.cpus.partition",
                     "cpuset.cpus.exclusive", "cpuset.mems", "cgroup.procs"):
            d[name] = raw(path, name)
    return d


def backend() -> Any:
    from pinwarden.enforce.v2 import CgroupV2Backend

    return CgroupV2Backend.from_mounts(Path("/"))


def teardown(prefix: str) -> Data:
    """Remove every top-level group starting with ``prefix`` (and its subtree), bottom-up:
    partitions switched off, then rmdir."""
    root = cgroup_root()
    errors: list[str] = []
    tops = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    for top in tops:
        paths = sorted((str(p.relative_to(root)) for p in (root / top).rglob("*")
                        if p.is_dir()), key=lambda s: -s.count("/"))
        for rel in [*paths, top]:
            with contextlib.suppress(OSError):
                if raw(rel, "cpuset.cpus.partition") not in (None, "member"):
                    write_raw(rel, "cpuset.cpus.partition", "member")
            try:
                os.rmdir(root / rel)
            except OSError as exc:
                errors.append(f"{rel}: {exc}")
    left = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    return {"removed": tops, "errors": errors, "left": left}


def cli(*args: str, config: Path | None = None, timeout: float = CLI_TIMEOUT) -> Data:
    """Run ``pinwarden ARGS`` (state in :data:`STATE`); its rc, stdout and stderr."""
    cmd = [PINWARDEN, *args]
    env = dict(os.environ, PINWARDEN_STATE_DIR=str(STATE))
    if config is not None:
        env["PINWARDEN_CONFIG"] = str(config)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return {"cmd": cmd, "rc": None, "stdout": str(exc.stdout), "stderr": str(exc.stderr),
                "timeout": True}
    out: Data = {"cmd": cmd, "rc": proc.returncode, "stdout": proc.stdout,
                 "stderr": proc.stderr, "seconds": round(time.monotonic() - start, 2)}
    with contextlib.suppress(ValueError):
        out["json"] = json.loads(proc.stdout)
    return out


def cli_here(*args: str) -> Data:
    """``pinwarden ARGS`` in this process (same code path as the entry point, without the
    20-30 s a Python start costs under TCG); for commands that only read and print."""
    from pinwarden.cli import main

    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc: object = main(list(args))
        except SystemExit as exc:
            rc = exc.code
    got: Data = {"cmd": ["pinwarden", *args], "rc": rc, "stdout": out.getvalue(),
                 "stderr": err.getvalue(), "seconds": round(time.monotonic() - start, 2)}
    with contextlib.suppress(ValueError):
        got["json"] = json.loads(got["stdout"])
    return got


def command_exists(name: str) -> bool:
    """``name`` is a registered command.  A CLI that does not even build (a command module
    failing to import) raises, and the check records why."""
    from pinwarden.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse offers no public accessor
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and name in choices:
            return True
    return False


def ledger_leases() -> list[Data]:
    from pinwarden.ledger import Ledger

    if not (STATE / "leases.db").exists():
        return []
    with Ledger(STATE) as ledger:
        return [{"cpu": lease.cpu, "holder": str(lease.holder), "role": lease.role,
                 "owner_pid": lease.owner_pid} for lease in ledger.leases()]


def load_host() -> Any:
    """The live host snapshot (helper A's loader, whatever its name is today)."""
    import pinwarden.partition as part
    from pinwarden.config import Config

    loader = getattr(part, "load_host", None)
    if loader is not None:
        return loader(Path("/"), Config())
    reader = getattr(part, "read_partition", None)
    if reader is None:
        raise RuntimeError("pinwarden.partition has neither load_host nor read_partition")
    from pinwarden.topology import read_topology

    topo = read_topology(Path("/"))
    return part.Host(topo, reader(Path("/"), topo, Config()))


@contextlib.contextmanager
def started(cmd: list[str]) -> Iterator[subprocess.Popen[str]]:
    """A background process in its own session; killed (its group only) on exit."""
    env = dict(os.environ, PINWARDEN_STATE_DIR=str(STATE))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)


def cgroup_of(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip("/")
    return None


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        cur = todo.pop()
        try:
            kids = Path(f"/proc/{cur}/task/{cur}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def wait_for(pred: Callable[[], Any], timeout: float = 120.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    return None


def set_online(cpu: int, on: bool) -> str | None:
    try:
        Path(f"/sys/devices/system/cpu/cpu{cpu}/online").write_text("1" if on else "0")
    except OSError as exc:
        return str(exc)
    return None


# -- checks -------------------------------------------------------------------------------

@check("env")
def env() -> Data:
    root = cgroup_root()
    return {
        "kernel": platform.release(),
        "cgroup2": str(root),
        "controllers": raw("", "cgroup.controllers"),
        "subtree_control": raw("", "cgroup.subtree_control"),
        "isolated": Path("/sys/devices/system/cpu/isolated").read_text().strip(),
        "online": Path("/sys/devices/system/cpu/online").read_text().strip(),
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "python": sys.version.split()[0],
    }


@check("topology")
def topology() -> Data:
    from pinwarden.topology import read_topology

    topo = read_topology(Path("/"))
    return {"present": topo.present.to_list(), "online": topo.online.to_list(),
            "isolated": topo.isolated.to_list(),
            "nodes": {str(n): c.to_list() for n, c in sorted(topo.nodes.items())},
            "node_of": {str(c): topo.node_of(c) for c in sorted(topo.cpus)}}


@check("partition")
def partition() -> Data:
    host = load_host()
    p = host.partition
    return {"mode": p.mode, "vm_cpus": p.vm_cpus.to_list(), "host_cpus": p.host_cpus.to_list(),
            "reason": p.reason, "cgroup": p.cgroup}


@check("v2.partition_root")
def v2_partition_root() -> Data:
    from pinwarden.cpuset import CpuSet

    b = backend()
    before = raw("", "cgroup.subtree_control")
    b.mkdir("pwtest-bystander")  # empty cpuset.cpus: inherits the root's effective CPUs
    b.mkdir("pwtest-v2")
    mems = b.read_group("").mems
    b.set_mems("pwtest-v2", mems)
    b.set_cpus("pwtest-v2", CpuSet.parse_kernel("2-3"))
    b.set_partition("pwtest-v2", "exclusive")
    state = b.read_group("pwtest-v2")
    return {
        "subtree_control_before": before,
        "subtree_control_after": raw("", "cgroup.subtree_control"),
        "group": group_data("pwtest-v2"),
        "has_exclusive_file": b.has_exclusive("pwtest-v2"),
        "state": {"partition": state.partition, "partition_error": state.partition_error,
                  "cpus": state.cpus.to_list(), "effective": state.effective_cpus.to_list()},
        "root_effective": raw("", "cpuset.cpus.effective"),
        "bystander": group_data("pwtest-bystander"),
    }


@check("v2.children")
def v2_children() -> Data:
    from pinwarden.cpuset import CpuSet

    b = backend()
    for name in ("a", "c"):
        b.mkdir(f"pwtest-v2/{name}")
        b.set_mems(f"pwtest-v2/{name}", b.read_group("pwtest-v2").mems)
    b.set_cpus("pwtest-v2/a", CpuSet.of([2]))
    b.set_partition("pwtest-v2/a", "exclusive")
    b.set_cpus("pwtest-v2/c", CpuSet.of([3]))
    b.set_partition("pwtest-v2/c", "isolated")
    parent = b.read_group("pwtest-v2")
    snap = b.read_state(["pwtest-v2"])
    return {
        "parent_subtree_control": raw("pwtest-v2", "cgroup.subtree_control"),
        "a": group_data("pwtest-v2/a"), "c": group_data("pwtest-v2/c"),
        "parent": group_data("pwtest-v2"),
        "parent_state_effective": parent.effective_cpus.to_list(),
        "snapshot": {p: {"partition": g.partition, "error": g.partition_error,
                         "effective": g.effective_cpus.to_list()}
                     for p, g in snap.groups.items()},
        "bystander_effective": raw("pwtest-bystander", "cpuset.cpus.effective"),
    }


@check("v2.invalid_overlap")
def v2_invalid_overlap() -> Data:
    from pinwarden.cpuset import CpuSet

    b = backend()
    mems = b.read_group("").mems
    b.mkdir("pwtest-v2/b")
    b.set_mems("pwtest-v2/b", mems)
    # on 6.1 a *member* naming CPU 2, which partition a holds, makes a invalid
    member = expect_error(lambda: b.set_cpus("pwtest-v2/b", CpuSet.of([2])))
    out: Data = {"member_write": member, "b": group_data("pwtest-v2/b"),
                 "a": group_data("pwtest-v2/a")}
    b.rmdir("pwtest-v2/b")
    # a partition whose CPUs a member sibling names (what a `machine` that still lists
    # leased CPUs would do)
    for name in ("pwtest-ov1", "pwtest-ov2"):
        b.mkdir(name)
        b.set_mems(name, mems)
        b.set_cpus(name, CpuSet.of([4]))
    out["partition_write"] = expect_error(lambda: b.set_partition("pwtest-ov2", "exclusive"))
    out["ov1"] = group_data("pwtest-ov1")
    out["ov2"] = group_data("pwtest-ov2")
    b.rmdir("pwtest-ov2")
    b.rmdir("pwtest-ov1")
    return out


@check("v2.invalid_cpus_write")
def v2_invalid_cpus_write() -> Data:
    from pinwarden.cpuset import CpuSet

    b = backend()
    # widening partition a onto CPU 3, which partition c holds
    err = expect_error(lambda: b.set_cpus("pwtest-v2/a", CpuSet.parse_kernel("2-3")))
    return {"error": err, "a": group_data("pwtest-v2/a"), "c": group_data("pwtest-v2/c")}


@check("v2.invalid_parent_not_root")
def v2_invalid_parent_not_root() -> Data:
    from pinwarden.cpuset import CpuSet

    b = backend()
    b.mkdir("pwtest-member")
    b.set_mems("pwtest-member", b.read_group("").mems)
    b.set_cpus("pwtest-member", CpuSet.parse_kernel("0-1"))
    b.mkdir("pwtest-member/x")
    b.set_mems("pwtest-member/x", b.read_group("").mems)
    b.set_cpus("pwtest-member/x", CpuSet.of([1]))
    err = expect_error(lambda: b.set_partition("pwtest-member/x", "exclusive"))
    after = group_data("pwtest-member/x")
    b.rmdir("pwtest-member/x")
    b.rmdir("pwtest-member")
    return {"error": err, "x": after}


@check("v2.invalid_all_of_root")
def v2_invalid_all_of_root() -> Data:
    from pinwarden.cpuset import CpuSet

    b = backend()
    b.mkdir("pwtest-all")
    b.set_mems("pwtest-all", b.read_group("").mems)
    rest = CpuSet.parse_kernel(raw("", "cpuset.cpus.effective") or "")
    b.set_cpus("pwtest-all", rest)  # every CPU the root (which has tasks) still has
    err = expect_error(lambda: b.set_partition("pwtest-all", "exclusive"))
    after = group_data("pwtest-all")
    b.rmdir("pwtest-all")
    return {"error": err, "cpus": rest.to_list(), "all": after,
            "root_effective_after": raw("", "cpuset.cpus.effective")}


@check("v2.apply_errors")
def v2_apply_errors() -> Data:
    """The same refusals through the enforcement core: one-line EnforceError, rolled back."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.enforce.apply import execute
    from pinwarden.enforce.backend import Mkdir, Op, SetCpus, SetMems, SetPartition

    b = backend()
    mems = b.read_group("").mems
    out: Data = {}
    before = b.read_state(["pwtest-v2"])
    ops: list[Op] = [Mkdir("pwtest-v2/e"), SetMems("pwtest-v2/e", mems),
           SetCpus("pwtest-v2/e", CpuSet.of([2])), SetPartition("pwtest-v2/e", "exclusive")]
    out["overlap"] = expect_error(lambda: execute(b, before, ops))
    out["overlap_left"] = (cgroup_root() / "pwtest-v2/e").exists()
    b.mkdir("pwtest-member2")
    b.set_mems("pwtest-member2", mems)
    b.set_cpus("pwtest-member2", CpuSet.parse_kernel("0-1"))
    before = b.read_state(["pwtest-member2"])
    ops = [Mkdir("pwtest-member2/y"), SetMems("pwtest-member2/y", mems),
           SetCpus("pwtest-member2/y", CpuSet.of([1])),
           SetPartition("pwtest-member2/y", "exclusive")]
    out["parent"] = expect_error(lambda: execute(b, before, ops))
    out["parent_left"] = (cgroup_root() / "pwtest-member2/y").exists()
    with contextlib.suppress(Exception):
        b.rmdir("pwtest-member2/y")
    b.rmdir("pwtest-member2")
    return out


@check("v2.inherit_populated")
def v2_inherit_populated() -> Data:
    """A group that inherits its CPUs (empty ``cpuset.cpus``, as libvirt's ``machine`` and
    systemd's ``machine.slice`` are found), narrowed, then set back to inherit while a task
    lives below it — the shared group after the last lease while VMs run."""
    b = backend()
    b.mkdir("pwtest-inh")
    b.mkdir("pwtest-inh/c")
    out: Data = {"found": group_data("pwtest-inh")}
    try:
        _inherit_populated(b, out)
    finally:
        out["teardown"] = teardown("pwtest-inh")
    return out


def _inherit_populated(b: Any, out: Data) -> None:
    from pinwarden.cpuset import CpuSet

    b.set_cpus("pwtest-inh", CpuSet.parse_kernel("0-1"))  # (pwtest-v2 holds 2-3)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        (cgroup_root() / "pwtest-inh/c/cgroup.procs").write_text(f"{sleeper.pid}\n")

        def empty() -> None:
            with open(cgroup_root() / "pwtest-inh/cpuset.cpus", "w") as f:
                f.write("\n")

        out["kernel"] = expect_error(empty)
        out["set_inherit"] = expect_error(lambda: b.set_cpus("pwtest-inh", CpuSet()))
        out["populated"] = group_data("pwtest-inh")
        out["sleeper_allowed"] = (Path(f"/proc/{sleeper.pid}/status").read_text()
                                  .split("Cpus_allowed_list:")[1].split()[0])
    finally:
        sleeper.kill()
        sleeper.wait()
    deadline = time.monotonic() + 5
    while raw("pwtest-inh/c", "cgroup.procs") and time.monotonic() < deadline:
        time.sleep(0.05)
    b.set_cpus("pwtest-inh", CpuSet.parse_kernel("0-1"))
    out["set_inherit_empty"] = expect_error(lambda: b.set_cpus("pwtest-inh", CpuSet()))
    out["unpopulated"] = group_data("pwtest-inh")
    out["root_effective"] = raw("", "cpuset.cpus.effective")


@check("v2.cleanup")
def v2_cleanup() -> Data:
    got = teardown("pwtest-v2")
    got["v2_root_effective_after"] = raw("", "cpuset.cpus.effective")
    return got


@check("layout.sync")
def layout_sync() -> Data:
    """E1's sync() on the v2 backend: the documented tree, partitions valid, and the kernel
    itself removes leased CPUs from every other group (pwtest-bystander has no cpus set)."""
    from pinwarden.enforce.apply import sync
    from pinwarden.enforce.layout import LayoutNames, desired_layout
    from pinwarden.model import Lease, domain_holder, job_holder

    b = backend()
    host = load_host()
    names = LayoutNames(shared="pwtest-machine", exclusive="pwtest-pinwarden.partition")
    job = job_holder("J")
    vm = domain_holder("qemu", "A", "0b3a8a2e-0000-4000-8000-00000000000a")
    out: Data = {"vm_cpus": host.partition.vm_cpus.to_list()}
    steps = {"one": [Lease(6, job, "task", 0.0)],
             "two": [Lease(6, job, "task", 0.0), Lease(7, vm, "vcpu0", 0.0)],
             "none": []}
    for step, leases in steps.items():
        entry: Data = {}
        try:
            result = sync(b, desired_layout(host, leases, names))
            entry["ops"] = len(result.ops)
        except Exception as exc:
            entry["error"] = exc_data(exc)
        # the holder groups: beside the shared group, named after the stem
        entry["holders"] = {p.name: group_data(p.name)
                            for p in sorted(cgroup_root().glob(f"{names.stem}-*.partition"))
                            if p.is_dir()}
        entry["shared"] = group_data(names.shared)
        entry["bystander_effective"] = raw("pwtest-bystander", "cpuset.cpus.effective")
        entry["root_effective"] = raw("", "cpuset.cpus.effective")
        out[step] = entry
        if step == "two":
            out["left_invalid"] = _left_invalid(b, desired_layout(host, leases, names),
                                                f"{names.stem}-run-J.partition")
    out["teardown"] = [teardown("pwtest-pinwarden"), teardown("pwtest-machine")]
    return out


@check("layout.foreign_partition")
def layout_foreign_partition() -> Data:
    """A ``root`` partition somebody else made on CPU 5, which the shared pool of a host
    with VM CPUs 1-5 includes: the kernel keeps the shared group off it, and the sync's
    error names that partition and what to do (it named only the shortfall: hunt)."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.enforce.apply import sync
    from pinwarden.enforce.layout import LayoutNames, desired_layout
    from pinwarden.model import Lease, job_holder
    from pinwarden.record import replace

    b = backend()
    host = load_host()
    vm = CpuSet.parse("1-5")
    host = replace(host, partition=replace(host.partition, mode="none", vm_cpus=vm,
                                           host_cpus=host.topology.online - vm))
    names = LayoutNames(shared="pwtest-machine", exclusive="pwtest-pinwarden.partition")
    out: Data = {}
    try:
        out["foreign"] = make_group("pwtest-foreign", "5", partition="root")
        out["foreign_state"] = group_data("pwtest-foreign")
        try:
            out["ops"] = len(sync(b, desired_layout(
                host, [Lease(1, job_holder("J"), "task", 0.0)], names)).ops)
        except Exception as exc:
            out["error"] = exc_data(exc)
        out["left"] = sorted(p.name for p in cgroup_root().iterdir() if p.is_dir() and
                             p.name.startswith(("pwtest-machine", "pwtest-pinwarden",
                                                "pwtest-foreign")))
    finally:
        out["teardown"] = [teardown("pwtest-pinwarden"), teardown("pwtest-machine"),
                           teardown("pwtest-foreign")]
    return out


def _left_invalid(b: Any, desired: Any, holder: str) -> Data:
    """A cgroup beside the holder names its CPU and gives it up again: the kernel leaves
    the holder's partition invalid (6.1), and the next sync of the same layout — with
    nothing else to change — makes it valid."""
    from pinwarden.enforce.apply import sync
    from pinwarden.enforce.backend import describe

    cpus = raw(holder, "cpuset.cpus") or ""
    out: Data = {"valid_before": group_data(holder)}
    try:
        out["intruder"] = make_group("pwtest-intruder", cpus)
        out["broken"] = group_data(holder)
        out["intruder_back"] = try_write("pwtest-intruder", "cpuset.cpus", "0")
        out["left"] = group_data(holder)
        try:
            out["ops"] = [describe(op) for op in sync(b, desired).ops]
        except Exception as exc:
            out["error"] = exc_data(exc)
        out["synced"] = group_data(holder)
    finally:
        out["teardown"] = teardown("pwtest-intruder")
    return out


SHOW = ("cat /proc/self/cgroup; g=$(sed -n 's/^0:://p' /proc/self/cgroup); "
        "echo partition=$(cat /sys/fs/cgroup$g/cpuset.cpus.partition); "
        "echo effective=$(cat /sys/fs/cgroup$g/cpuset.cpus.effective); "
        "grep Cpus_allowed_list /proc/self/status")


@check("cli.run")
def cli_run() -> Data:
    out: Data = {"has_run": command_exists("run")}
    if not out["has_run"]:
        return out
    # the root as a host without systemd boots: the cpuset controller off (the checks
    # before turned it on; what they left only inherits, so nothing is lost)
    out["root_off"] = try_write("", "cgroup.subtree_control", "-cpuset")
    out["root_before"] = raw("", "cgroup.subtree_control")
    # one invocation (each costs 20-30 s under TCG): cat /proc/self/cgroup and more
    out["show"] = cli("run", "--exclusive", "1", "--", "sh", "-c", SHOW + "; exit 7")
    out["root_after"] = raw("", "cgroup.subtree_control")
    out["leases_after"] = ledger_leases()
    out["machine"] = {n: group_data(n) for n in ("machine", "machine.slice")
                      if (cgroup_root() / n).is_dir()}
    return out


@check("cli.offline")
def cli_offline() -> Data:
    """A leased CPU goes offline and comes back while its job runs."""
    out: Data = {"has_run": command_exists("run"), "has_status": command_exists("status")}
    if not out["has_run"]:
        return out
    cmd = [PINWARDEN, "run", "--exclusive", "1", "--", "sleep", "600"]
    with started(cmd) as proc:
        def job_cgroup() -> str | None:
            for pid in descendants(proc.pid):
                cg = cgroup_of(pid)
                if cg and ".partition" in cg:
                    return cg
            return None

        group = wait_for(job_cgroup)
        out["group"] = group
        leases = wait_for(ledger_leases, 30)
        out["leases"] = leases
        if not group or not leases:
            out["stderr"] = proc.stderr.read() if proc.poll() is not None and proc.stderr \
                else None
            return out
        cpu = int(leases[0]["cpu"])
        out["cpu"] = cpu
        out["before"] = group_data(group)
        out["offline_error"] = set_online(cpu, False)
        time.sleep(1)
        out["offline"] = group_data(group)
        out["offline_leases"] = ledger_leases()
        out["offline_online_list"] = Path("/sys/devices/system/cpu/online").read_text().strip()
        if out["has_status"]:
            out["status_offline"] = cli_here("status", "--json", "--state-dir", str(STATE))
        # a change of the layout while the leased CPU is offline: a second job comes and
        # goes, then a sync (each failed "the kernel did not apply the layout": v2-lab hunt)
        out["second_offline"] = cli("run", "--exclusive", "1", "--name", "pwtest-off2", "--",
                                    "sh", "-c", "echo $PINWARDEN_CPUS")
        out["sync_offline"] = cli("sync")
        out["online_error"] = set_online(cpu, True)
        time.sleep(1)
        out["online"] = group_data(group)
        out["online_leases"] = ledger_leases()
        if out["has_status"]:
            out["status_online"] = cli_here("status", "--json", "--state-dir", str(STATE))
        out["job_alive"] = proc.poll() is None
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out["rc"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            out["rc"] = None
        out["leases_after_exit"] = ledger_leases()
        out["group_after_exit"] = group_data(group)
        out["tree_after_exit"] = {n: group_data(n) for n in (group.lstrip("/"),
                                                             "machine.slice")}
    return out


@contextlib.contextmanager
def job_beside_a_late_cgroup(name: str, out: Data) -> Iterator[
        tuple[subprocess.Popen[str], Path, str]]:
    """A job holding one CPU (``pinwarden run --exclusive 1 --name NAME``) once its
    partition is set up, with the path of a late cgroup ``NAME`` at the root (for the
    caller to make; removed after) and the holder group's name.  ``out`` gets the leases,
    the holder group before, and what the cleanup left."""
    late = cgroup_root() / name
    holder = f"pinwarden-run-{name}.partition"
    cmd = [PINWARDEN, "run", "--exclusive", "1", "--name", name, "--", "sleep", "600"]
    try:
        with started(cmd) as job:
            out["leases"] = wait_for(ledger_leases, 90)
            # the job runs once its command is in the holder: the partition is set up
            # before the command is moved in (``runner.supervise``)
            out["holder_before"] = wait_for(
                lambda: (g := group_data(holder))["exists"] and g["cgroup.procs"] and g, 60)
            yield job, late, holder
    finally:
        with contextlib.suppress(OSError):
            late.rmdir()
        out["cleanup"] = {"late_left": late.exists(),
                          "holder_left": (cgroup_root() / holder).exists()}


def end_job(job: subprocess.Popen[str]) -> None:
    os.killpg(job.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        job.wait(timeout=120)


@check("cli.escape")
def cli_escape() -> Data:
    """Issue #14 through the command line: a job holds a CPU in a partition; a cgroup made
    at the root afterwards writes every CPU into its cpuset.cpus and runs a task.  The
    kernel lets it onto the leased CPU and invalidates the partition; ``pinwarden audit``
    says error; ``pinwarden sync`` (what the daemon runs on every cgroup event) narrows it
    and revalidates the partition; the job's end gives the cgroup its CPUs back."""
    out: Data = {}
    state = ["--state-dir", str(STATE)]
    with job_beside_a_late_cgroup("pwtest-esc", out) as (job, late, holder):

        def look(task: subprocess.Popen[bytes]) -> Data:
            return {"late": group_data("pwtest-esc"), "task_allowed": allowed_of(task.pid),
                    "holder": group_data(holder)}

        out["late_write"] = subprocess.run(
            ["sh", "-c", f"mkdir {late} && echo 0-7 > {late}/cpuset.cpus"],
            capture_output=True, text=True).returncode
        task = subprocess.Popen(["sh", "-c", f"echo $$ > {late}/cgroup.procs; "
                                             "exec sleep 600"], start_new_session=True)
        try:
            time.sleep(1.0)
            out["escaped"] = look(task)
            out["audit_before"] = cli_here("audit", "--json", *state)
            out["sync"] = cli_here("sync", *state)
            out["fixed"] = look(task)
            out["audit_after"] = cli_here("audit", "--json", *state)
            end_job(job)
            out["after_job"] = {**look(task), "leases": ledger_leases()}
        finally:
            task.kill()
            task.wait()
    return out


@check("cli.stale_holder")
def cli_stale_holder() -> Data:
    """A holder group of pinwarden's own left behind — a dead job's, its supervisor killed
    with its command — naming every CPU, the one a job leases now included: ``pinwarden
    sync`` narrows it as it narrows anybody's, but says nothing of it (it is pinwarden's
    own: on systemd, where the hunt found it, it was reported as somebody else's cgroup;
    here, on plain cgroup v2, that held before the fix too), and the job's end does not
    make it again."""
    out: Data = {}
    state = ["--state-dir", str(STATE)]
    stale = cgroup_root() / "pinwarden-run-pwtest-gone.partition"
    try:
        with job_beside_a_late_cgroup("pwtest-stl", out) as (job, _late, _holder):
            out["stale_write"] = subprocess.run(
                ["sh", "-c", f"mkdir {stale} && echo 0-7 > {stale}/cpuset.cpus"],
                capture_output=True, text=True).returncode
            out["sync"] = cli_here("sync", *state)
            out["stale_synced"] = group_data(stale.name)
            end_job(job)
            out["leases_after"] = ledger_leases()
            out["stale_after"] = group_data(stale.name)
    finally:
        with contextlib.suppress(OSError):
            stale.rmdir()
    return out


@check("cli.invalid")
def cli_invalid() -> Data:
    """A holder partition the kernel invalidated stays invalid after the cgroup that took
    its CPU lets go of it (the kernel does not check it again): the audit says so — it
    exited 0 then, the root's CPUs including the leased one again (found on a real
    systemd host: an operator's AllowedCPUs, undone by a daemon-reload); ``pinwarden
    sync`` makes it valid."""
    out: Data = {}
    state = ["--state-dir", str(STATE)]
    with job_beside_a_late_cgroup("pwtest-inv", out) as (job, late, holder):
        out["late_write"] = subprocess.run(
            ["sh", "-c", f"mkdir {late} && echo 0-7 > {late}/cpuset.cpus && "
                         f"echo 0 > {late}/cpuset.cpus"],
            capture_output=True, text=True).returncode
        out["holder_let_go"] = group_data(holder)
        out["audit"] = cli_here("audit", "--json", *state)
        out["status"] = cli_here("status", "--json", *state)
        out["sync"] = cli_here("sync", *state)
        out["holder_synced"] = group_data(holder)
        out["status_synced"] = cli_here("status", "--json", *state)
        out["audit_after"] = cli_here("audit", "--json", *state)
        end_job(job)
    return out


@check("cli.second")
def cli_second() -> Data:
    """A second exclusive job while a first one runs: the shared group still names the
    CPU the second one leases (it was in the shared pool until then) and is narrowed for
    it.  That group is pinwarden's own, so nothing is said about it (an escape warning was
    printed on every later lease on cgroup v2 until the daemon's served starts showed it)."""
    out: Data = {}
    holder = "pinwarden-run-pwtest-2a.partition"
    cmd = [PINWARDEN, "run", "--exclusive", "1", "--name", "pwtest-2a", "--", "sleep", "600"]
    with started(cmd) as job:
        out["first"] = wait_for(
            lambda: (g := group_data(holder))["exists"] and g["cgroup.procs"] and g, 90)
        out["second"] = cli("run", "--exclusive", "1", "--name", "pwtest-2b", "--",
                            "sh", "-c", "echo $PINWARDEN_CPUS")
        os.killpg(job.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.wait(timeout=120)
    out["leases_after"] = ledger_leases()
    return out


@check("cli.plan_numa")
def cli_plan_numa() -> Data:
    """``pinwarden plan`` in ``none`` mode: a 2-vCPU exclusive domain stays on one node."""
    out: Data = {"has_plan": command_exists("plan")}
    if not out["has_plan"]:
        return out
    CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    config = CONFIG_DIR / "none.toml"
    config.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    for vcpus in (2, 4):
        xml = CONFIG_DIR / f"dom{vcpus}.xml"
        xml.write_text(
            f"<domain type='kvm'><name>pwtest-numa{vcpus}</name>"
            f"<uuid>6d1b4c8e-0000-4000-8000-00000000000{vcpus}</uuid>"
            f"<memory unit='MiB'>256</memory><vcpu placement='static'>{vcpus}</vcpu>"
            f"<cputune exclusive='yes'/>"
            f"<os><type arch='x86_64'>hvm</type></os></domain>")
        out[f"plan{vcpus}"] = cli_here("plan", "--config", str(config), "--state-dir",
                                       str(STATE), "--json", str(xml))
    # Guest NUMA cells: cell 0's memory on host node 1, cell 1's on node 0 (<memnode>);
    # then two cells of three vCPUs and no <memnode> (node 0 has three free CPUs).
    cells = {
        "memnode": ("<numatune><memnode cellid='0' mode='strict' nodeset='1'/>"
                    "<memnode cellid='1' mode='strict' nodeset='0'/></numatune>",
                    ((0, "0-1"), (1, "2-3")), 4),
        "cells3": ("", ((0, "0-2"), (1, "3-5")), 6),
    }
    for name, (numatune, layout, vcpus) in cells.items():
        numa = "".join(f"<cell id='{i}' cpus='{c}' memory='128' unit='MiB'/>"
                       for i, c in layout)
        xml = CONFIG_DIR / f"{name}.xml"
        xml.write_text(
            f"<domain type='kvm'><name>pwtest-{name}</name>"
            f"<memory unit='MiB'>256</memory><vcpu placement='static'>{vcpus}</vcpu>"
            f"<cputune exclusive='yes'/>{numatune}<cpu><numa>{numa}</numa></cpu>"
            f"<os><type arch='x86_64'>hvm</type></os></domain>")
        out[name] = cli_here("plan", "--config", str(config), "--state-dir", str(STATE),
                             "--json", str(xml))
    return out


# -- issue #14: cgroups created beside a holder partition (late_cgroup_*) -----------------

LEASED = "1-2"  # the example: `pinwarden run --exclusive 2` holding CPUs 1-2
HOLD = "pwtest-hold"
JOB = "pwtest-hold/run-L.partition"
_TASKS: list[subprocess.Popen[bytes]] = []


def task_in(path: str) -> Data:
    """A ``sleep`` in its own session, moved into cgroup ``path``; its pid, cgroup and
    ``Cpus_allowed_list`` (or the error of the move)."""
    proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _TASKS.append(proc)
    out: Data = {"pid": proc.pid}
    try:
        write_raw(path, "cgroup.procs", str(proc.pid))
    except OSError as exc:
        out["move_error"] = errno.errorcode.get(exc.errno or 0, str(exc))
    out["cgroup"] = cgroup_of(proc.pid)
    out["allowed"] = allowed_of(proc.pid)
    return out


def allowed_of(pid: int) -> str | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in status.splitlines()
                 if ln.startswith("Cpus_allowed_list:")), None)


def kill_tasks() -> None:
    while _TASKS:
        proc = _TASKS.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def try_write(path: str, name: str, value: str) -> str | None:
    """Write; ``None`` or the errno name."""
    try:
        write_raw(path, name, value)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return None


def make_group(path: str, cpus: str | None = None, *, exclusive: str | None = None,
               partition: str | None = None) -> Data:
    """mkdir (the backend enables +cpuset above it), then raw writes; each write's error."""
    backend().mkdir(path)
    out: Data = {}
    if cpus is not None:
        out["cpus"] = try_write(path, "cpuset.cpus", cpus)
    if exclusive is not None:
        out["exclusive"] = try_write(path, "cpuset.cpus.exclusive", exclusive)
    if partition is not None:
        out["partition"] = try_write(path, "cpuset.cpus.partition", partition)
    return out


def setup_holder(*, exclusive: bool = False) -> Data:
    """The issue's lease by hand: HOLD (root partition, CPUs 1-2) / run-L.partition (root
    partition, CPUs 1-2) with a task; ``exclusive``: also write cpuset.cpus.exclusive on
    both (6.7+)."""
    xcpus = LEASED if exclusive else None
    out: Data = {"hold_writes": make_group(HOLD, LEASED, exclusive=xcpus, partition="root"),
                 "job_writes": make_group(JOB, LEASED, exclusive=xcpus, partition="root")}
    out["job_task"] = task_in(JOB)
    out["state"] = holder_state()
    return out


def holder_state() -> Data:
    job_pid = next((t.pid for t in _TASKS if cgroup_of(t.pid) == JOB), None)
    return {"hold": group_data(HOLD), "job": group_data(JOB),
            "root_effective": raw("", "cpuset.cpus.effective"),
            "job_allowed": allowed_of(job_pid) if job_pid else None}


def clean_late() -> Data:
    kill_tasks()
    return {"teardown": [teardown("pwtest-late"), teardown("pwtest-old"), teardown(HOLD)],
            "root_effective": raw("", "cpuset.cpus.effective")}


def late_case(action: Callable[[], Data], *, exclusive: bool = False,
              old: bool = False) -> Data:
    """Set up the holder (and ``pwtest-old``, made before the lease, when ``old``), run
    ``action``, record the holder after it, clean up."""
    out: Data = {"has_exclusive_file": False}
    try:
        if old:
            out["old_writes"] = make_group("pwtest-old")
        out["setup"] = setup_holder(exclusive=exclusive)
        out["has_exclusive_file"] = (cgroup_root() / HOLD / "cpuset.cpus.exclusive").exists()
        out.update(action())
        out["holder_after"] = holder_state()
    finally:
        out["cleanup"] = clean_late()
    return out


@check("late_cgroup_explicit")
def late_cgroup_explicit() -> Data:
    """The issue: a top-level cgroup made after the lease writes 0-7."""
    def act() -> Data:
        writes = make_group("pwtest-late", "0-7")
        return {"writes": writes, "late": group_data("pwtest-late"),
                "task": task_in("pwtest-late")}
    return late_case(act)


@check("late_cgroup_no_cpus")
def late_cgroup_no_cpus() -> Data:
    """A top-level cgroup made after the lease that never writes cpuset.cpus."""
    def act() -> Data:
        make_group("pwtest-late")
        return {"late": group_data("pwtest-late"), "task": task_in("pwtest-late")}
    return late_case(act)


@check("late_cgroup_partition")
def late_cgroup_partition() -> Data:
    """A late cgroup naming CPUs 2-3 (one leased) that then makes itself a partition."""
    def act() -> Data:
        writes = make_group("pwtest-late", "2-3")
        after_cpus = {"late": group_data("pwtest-late"), "holder": holder_state()}
        writes["partition"] = try_write("pwtest-late", "cpuset.cpus.partition", "root")
        return {"writes": writes, "after_cpus": after_cpus,
                "late": group_data("pwtest-late"), "task": task_in("pwtest-late")}
    return late_case(act)


@check("late_cgroup_old_explicit")
def late_cgroup_old_explicit() -> Data:
    """Is 'late' what matters?  A top-level cgroup made BEFORE the lease writes 0-7 after."""
    def act() -> Data:
        err = try_write("pwtest-old", "cpuset.cpus", "0-7")
        return {"write": err, "old": group_data("pwtest-old"), "task": task_in("pwtest-old")}
    return late_case(act, old=True)


@check("late_cgroup_nested")
def late_cgroup_nested() -> Data:
    """A cgroup made after the lease inside one made before it, writing 0-7."""
    def act() -> Data:
        writes = make_group("pwtest-old/late", "0-7")
        return {"writes": writes, "nested": group_data("pwtest-old/late"),
                "old": group_data("pwtest-old"), "task": task_in("pwtest-old/late")}
    return late_case(act, old=True)


@check("late_cgroup_exclusive")
def late_cgroup_exclusive() -> Data:
    """6.7+: the holder sets cpuset.cpus.exclusive; does a late 0-7 write still get in?
    And may the late cgroup claim leased CPUs in its own cpuset.cpus.exclusive?"""
    def act() -> Data:
        writes = make_group("pwtest-late", "0-7")
        out: Data = {"writes": writes, "late": group_data("pwtest-late"),
                     "task": task_in("pwtest-late"), "holder_mid": holder_state()}
        make_group("pwtest-late2")
        out["late2_exclusive_write"] = try_write("pwtest-late2", "cpuset.cpus.exclusive",
                                                 LEASED)
        out["late2"] = group_data("pwtest-late2")
        return out
    if not (cgroup_root() / "pwtest-bystander" / "cpuset.cpus.exclusive").exists():
        return {"has_exclusive_file": False, "kernel": platform.release()}
    return late_case(act, exclusive=True)


@check("late_cgroup_inotify")
def late_cgroup_inotify() -> Data:
    """Which inotify events kernfs delivers: mkdir of a cgroup (IN_CREATE), a write to its
    cpuset.cpus (IN_MODIFY), the kernel invalidating a partition (IN_MODIFY on
    cpuset.cpus.partition, from kernfs_notify)."""
    from pinwarden.enforce.watch import CgroupWatcher

    out: Data = {}
    try:
        out["setup"] = setup_holder()
        with CgroupWatcher(cgroup_root(), parents=("", HOLD)) as w:
            out["watched_hold"] = HOLD in w.watched() and JOB in w.watched()
            w.read_pending()
            steps: dict[str, list[Data]] = {}
            subprocess.run(["mkdir", str(cgroup_root() / "pwtest-late")], check=True)
            steps["mkdir"] = [vars_of(e) for e in w.poll(5.0)]
            subprocess.run(["sh", "-c", f"echo 4-5 > {cgroup_root()}/pwtest-late/cpuset.cpus"],
                           check=True)
            steps["write_disjoint"] = [vars_of(e) for e in w.poll(5.0)]
            subprocess.run(["sh", "-c", f"echo 0-7 > {cgroup_root()}/pwtest-late/cpuset.cpus"],
                           check=True)
            time.sleep(0.5)  # kernfs_notify runs from a work item
            steps["write_overlap"] = [vars_of(e) for e in w.poll(5.0)]
            subprocess.run(["rmdir", str(cgroup_root() / "pwtest-late")], check=True)
            steps["rmdir"] = [vars_of(e) for e in w.poll(5.0)]
            out["steps"] = steps
        out["holder_after"] = holder_state()
    finally:
        out["cleanup"] = clean_late()
    return out


def vars_of(event: Any) -> Data:
    return {"kind": event.kind, "path": event.path, "name": event.name}


@check("late_cgroup_watch")
def late_cgroup_watch() -> Data:
    """The fix on the real kernel: the watcher sees another process make a top-level
    cgroup and write leased CPUs into it; close_escapes narrows it and re-validates the
    holder.  Round 1 writes 0-7, round 2 only leased CPUs (→ the shared pool), round 3
    makes a partition over 2-3."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.enforce.watch import CgroupWatcher, close_escapes

    leased = CpuSet.parse_kernel(LEASED)
    pool = CpuSet.parse_kernel("0,3-5")  # online − leased − isolcpus
    holders = {HOLD, JOB}
    mount = cgroup_root()
    late = mount / "pwtest-late"
    rounds = {
        "wide": f"mkdir {late} && echo 0-7 > {late}/cpuset.cpus",
        "only_leased": f"echo {LEASED} > {late}/cpuset.cpus",
        "partition": f"echo 2-3 > {late}/cpuset.cpus && echo root > "
                     f"{late}/cpuset.cpus.partition",
    }
    out: Data = {"rounds": {}}
    try:
        out["setup"] = setup_holder()
        with CgroupWatcher(mount, parents=("", HOLD)) as w:
            first = close_escapes(mount, ("", HOLD), leased, holders, pool)
            out["initial_clean"] = first.narrowing.clean
            for name, script in rounds.items():
                w.read_pending()
                start = time.monotonic()
                actor = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
                written = time.monotonic()
                rnd: Data = {"actor_rc": actor.returncode, "actor_err": actor.stderr,
                             "events": [], "fixes": []}
                fixed_at = None
                deadline = written + 20.0
                while time.monotonic() < deadline:
                    events = w.poll(0.5)
                    rnd["events"] += [vars_of(e) for e in events]
                    if not events and fixed_at is not None:
                        break
                    res = close_escapes(mount, ("", HOLD), leased, holders, pool)
                    if res.narrowing.ops and all(o.ok for o in res.outcomes):
                        rnd.setdefault("seconds_to_fix", round(time.monotonic() - written, 3))
                    if res.narrowing.ops:
                        rnd["fixes"].append({
                            "escapes": [{"path": e.path, "reach": e.reach.to_list(),
                                         "configured": e.configured.to_list()}
                                        for e in res.narrowing.escapes],
                            "ops": [repr(op) for op in res.narrowing.ops],
                            "outcomes": [{"op": repr(o.op), "ok": o.ok, "after": o.after,
                                          "errno": o.errno, "error": o.error,
                                          "skipped": o.skipped} for o in res.outcomes],
                            "notes": list(res.narrowing.notes)})
                    elif res.narrowing.clean and rnd["fixes"]:
                        fixed_at = fixed_at or time.monotonic()
                rnd["seconds_to_fixed"] = None if fixed_at is None else \
                    round(fixed_at - written, 3)
                rnd["actor_seconds"] = round(written - start, 3)
                rnd["late"] = group_data("pwtest-late")
                rnd["holder"] = holder_state()
                rnd["task"] = task_in("pwtest-late")
                out["rounds"][name] = rnd
    finally:
        out["cleanup"] = clean_late()
    return out


# -- issue #11 part 2: host noise off leased CPUs (noise_*) -------------------------------

def noise_files() -> dict[str, str]:
    """Raw contents of every file pinwarden may write, keyed like isolation's keys."""
    out: dict[str, str] = {}
    for d in sorted(Path("/proc/irq").iterdir(), key=lambda p: p.name):
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                out[f"irq:{d.name}"] = (d / "smp_affinity_list").read_text().strip()
    out["irq-default"] = Path("/proc/irq/default_smp_affinity").read_text().strip()
    out["workqueue"] = Path("/sys/devices/virtual/workqueue/cpumask").read_text().strip()
    return out


def kthread_affinities(keys: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key in keys:
        _, pid, _start = key.split(":")
        stat = Path(f"/proc/{pid}/stat")
        out[key] = allowed_of(int(pid)) if stat.exists() else None
    return out


def snapshot_data(snap: Any) -> Data:
    return {
        "online": snap.online.to_list(),
        "irqs": [{"irq": i.irq, "affinity": i.affinity.to_list(),
                  "effective": None if i.effective is None else i.effective.to_list(),
                  "actions": list(i.actions)} for i in snap.irqs],
        "default": None if snap.default_affinity is None else snap.default_affinity.to_list(),
        "workqueue": None if snap.workqueue is None else snap.workqueue.to_list(),
        "kthreads": len(snap.kthreads),
        "movable": [{"comm": k.comm, "pid": k.pid, "affinity": k.affinity.to_list(),
                     "flags": hex(k.flags)} for k in snap.kthreads if k.movable],
        "nohz_full": snap.nohz_full.to_list(), "rcu_nocbs": snap.rcu_nocbs.to_list(),
        "isolated": snap.isolated.to_list(),
    }


def on_leased(snap: Any, leased: Any) -> list[str]:
    return sorted(k for k, v in snap.values().items() if not v.isdisjoint(leased))


def outcome_data(outcomes: Any) -> list[Data]:
    return [{"key": o.key, "value": o.value.to_list(), "ok": o.ok,
             "errno": None if o.errno is None else errno.errorcode.get(o.errno, o.errno),
             "after": o.after} for o in outcomes]


@check("noise_isolate_restore")
def noise_isolate_restore() -> Data:
    """Lease CPUs 2-3: IRQs, the default IRQ affinity, the unbound workqueue mask and
    movable kernel threads leave them; release 2 (3 still leased); release 3 after a
    simulated crash (records through JSON, fresh snapshot): everything is back."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.isolation import (
        Record,
        plan_isolation,
        plan_restore,
        unmovable,
        with_refusals,
    )
    from pinwarden.noise import apply, read_noise, refused

    leased = CpuSet.of([2, 3])
    hk = CpuSet.of([0, 1])
    out: Data = {}
    before = read_noise(Path("/"))
    out["snapshot"] = snapshot_data(before)
    movable_keys = [k.key for k in before.kthreads if k.movable]
    out["files_before"] = noise_files()
    out["kthreads_before"] = kthread_affinities(movable_keys)
    plan = plan_isolation(before, leased, hk, {})
    out["plan"] = {"writes": len(plan.writes), "records": len(plan.records),
                   "stuck": list(plan.stuck)}
    outcomes = apply(Path("/"), plan.writes)
    out["isolate_outcomes"] = outcome_data(outcomes)
    records = {r.key: r for r in plan.settled(refused(outcomes))}
    out["dropped_records"] = sorted(refused(outcomes))
    isolated = with_refusals(read_noise(Path("/")), refused(outcomes))
    out["files_isolated"] = noise_files()
    out["kthreads_isolated"] = kthread_affinities(movable_keys)
    out["still_on_leased"] = on_leased(isolated, leased)
    out["replan_writes"] = len(plan_isolation(isolated, leased, hk, records).writes)
    out["unmovable"] = [{"kind": f.kind, "key": f.key, "cpus": f.cpus.to_list(),
                         "what": f.what, "boot_param": f.boot_param}
                        for f in unmovable(isolated, leased)]
    # CPU 2 released, CPU 3 still leased
    part = plan_restore(read_noise(Path("/")), records, CpuSet.of([3]), hk)
    out["partial_outcomes"] = outcome_data(apply(Path("/"), part.writes))
    out["files_partial"] = noise_files()
    out["partial_on_3"] = on_leased(read_noise(Path("/")), CpuSet.of([3]))
    kept = {r.key: r for r in part.keep}
    out["partial_keep"] = len(kept)
    # "crash": the ledger's JSON is all that survives; a fresh snapshot
    stored = json.loads(json.dumps([r.to_json() for r in kept.values()]))
    final = plan_restore(read_noise(Path("/")), [Record.from_json(d) for d in stored],
                         CpuSet(), hk)
    out["restore_outcomes"] = outcome_data(apply(Path("/"), final.writes))
    out["restore"] = {"forget": len(final.forget), "keep": len(final.keep),
                      "conflicts": list(final.conflicts)}
    out["files_after"] = noise_files()
    out["kthreads_after"] = kthread_affinities(movable_keys)
    out["touched"] = sorted(records)
    return out


def schedstat_domains() -> dict[str, list[str]]:
    """CPU → the CPU lists of its scheduling domains, innermost first (/proc/schedstat)."""
    from pinwarden.cpuset import CpuSet

    out: dict[str, list[str]] = {}
    cpu = None
    for line in Path("/proc/schedstat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0].startswith("cpu") and parts[0][3:].isdigit():
            cpu = parts[0][3:]
            out[cpu] = []
        elif parts and parts[0].startswith("domain") and cpu is not None:
            # schedstat version 17 (7.3 has it) names the domain level first: "domain0 MC 0f …"
            mask = parts[1] if all(c in "0123456789abcdefABCDEF," for c in parts[1]) \
                else parts[2]
            out[cpu].append(CpuSet.from_mask(mask).to_list())
    return out


@check("partition_isolated_vs_root")
def partition_isolated_vs_root() -> Data:
    """What an `isolated` partition changes over `root`: sched domains (/proc/schedstat),
    the workqueue mask, cpuset.cpus.isolated (6.7+); and which CPUs each may hold (4 is not
    an isolcpus CPU, 6 is)."""
    from pinwarden.cpuset import CpuSet

    out: Data = {"baseline": {"domains": schedstat_domains(),
                              "workqueue": Path("/sys/devices/virtual/workqueue/cpumask")
                              .read_text().strip()}}
    cases = [("root_2_3", "2-3", "root"), ("isolated_2_3", "2-3", "isolated"),
             ("isolated_4", "4", "isolated"), ("root_6", "6", "root"),
             ("isolated_6", "6", "isolated")]
    # a member sibling naming CPU 6 (pinwarden's machine.slice = 6-7 after cli.run) would
    # invalidate any partition over it: empty it (it has no task) for the check
    lent: dict[str, str] = {}
    for child in sorted(cgroup_root().iterdir()):
        text = raw(child.name, "cpuset.cpus") if child.is_dir() else None
        if text and "pwtest" not in child.name and 6 in CpuSet.parse_kernel(text):
            lent[child.name] = text
            out.setdefault("lent_errors", {})[child.name] = try_write(
                child.name, "cpuset.cpus", "")
    out["lent"] = lent
    try:
        for name, cpus, word in cases:
            path = "pwtest-sd"
            try:
                writes = make_group(path, cpus, partition=word)
                out[name] = {
                    "writes": writes, "group": group_data(path),
                    "domains": schedstat_domains(),
                    "root_isolated": raw("", "cpuset.cpus.isolated"),
                    "workqueue": Path("/sys/devices/virtual/workqueue/cpumask")
                    .read_text().strip(),
                }
            finally:
                out.setdefault("teardown", []).append(teardown(path))
    finally:
        for name, text in lent.items():
            out.setdefault("given_back", {})[name] = try_write(name, "cpuset.cpus", text)
    out["after"] = {"domains": schedstat_domains()}
    return out


@check("kernel.partition_cpus")
def kernel_partition_cpus() -> Data:
    """Kernel facts for the layout: do CPUs come back to the parent when a root partition is
    narrowed (by the backend), switched to member, or emptied (raw write, which the backend
    refuses)?  Runs last: on 6.1 emptying loses the CPUs until reboot."""
    from pinwarden.cpuset import CpuSet

    b = backend()
    out: Data = {}
    mems = b.read_group("").mems
    # CPUs no top-level group names (pinwarden's own groups may still hold some)
    claimed = CpuSet()
    for child in cgroup_root().iterdir():
        if child.is_dir():
            claimed = claimed | CpuSet.parse_kernel(raw(child.name, "cpuset.cpus") or "")
    free = CpuSet.parse_kernel(raw("", "cpuset.cpus.effective") or "") - claimed
    out["free"] = free.to_list()
    name = "pwtest-narrow"
    b.mkdir(name)
    b.set_mems(name, mems)
    b.set_cpus(name, CpuSet.parse_kernel("4-5"))
    b.set_partition(name, "exclusive")
    out["narrow"] = {"root_before": raw("", "cpuset.cpus.effective")}
    b.set_cpus(name, CpuSet.of([4]))  # 6.12: cpuset.cpus.exclusive narrows first
    out["narrow"]["narrowed"] = group_data(name)
    out["narrow"]["root_narrowed"] = raw("", "cpuset.cpus.effective")
    write_raw(name, "cpuset.cpus.partition", "member")
    out["narrow"]["root_member"] = raw("", "cpuset.cpus.effective")
    b.rmdir(name)
    out["narrow"]["root_removed"] = raw("", "cpuset.cpus.effective")
    out["backend_refuses_empty"] = {}
    isolated = [c for c in (6, 7) if c in free][:1]  # unless pinwarden holds both
    out["tried"] = [5, *isolated]
    for cpu in out["tried"]:  # an ordinary CPU and an isolcpus one
        name = f"pwtest-empty{cpu}"
        b.mkdir(name)
        b.set_mems(name, mems)
        b.set_cpus(name, CpuSet.of([cpu]))
        step: Data = {"partition": expect_error(
            functools.partial(b.set_partition, name, "exclusive"))}
        if step["partition"]["raised"]:  # 6.12 keeps isolcpus CPUs out of partitions
            b.rmdir(name)
            out[str(cpu)] = step
            continue
        step["root_before"] = raw("", "cpuset.cpus.effective")
        out["backend_refuses_empty"][str(cpu)] = expect_error(
            functools.partial(b.set_cpus, name, CpuSet()))
        step["after_refusal"] = group_data(name)
        try:
            write_raw(name, "cpuset.cpus", "")
        except OSError as exc:  # newer kernels refuse it themselves
            step["empty_write_error"] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        step["emptied"] = group_data(name)
        step["root_emptied"] = raw("", "cpuset.cpus.effective")
        write_raw(name, "cpuset.cpus.partition", "member")
        step["root_member"] = raw("", "cpuset.cpus.effective")
        b.rmdir(name)
        step["root_removed"] = raw("", "cpuset.cpus.effective")
        out[str(cpu)] = step
    return out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    save()
    for run in CHECKS:
        run()
    RESULTS["done"] = True
    RESULTS["finished"] = time.time()
    save()
    print("lab: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
