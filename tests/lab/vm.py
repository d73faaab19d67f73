"""Host side of the kernel lab: boot one virtme-ng VM, run :mod:`lab.in_vm`, read its JSON.

The VM (TCG, 8 CPUs, NUMA nodes 0-3 and 4-7, ``isolcpus=6-7``) shares this filesystem read
only; the in-VM script writes its results into a host directory passed with ``--rwdir``.
Every check's result is written as soon as it is known, so a VM that dies half-way still
reports what it saw.  :func:`lab_run` boots each kernel (:func:`kernel_ids`) at most once per
process (pytest session).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import guestwatch

REPO = Path(__file__).resolve().parents[2]
IN_VM = Path(__file__).resolve().parent / "in_vm.py"
RESULT_FILE = "results.json"
#: Boot plus all checks; TCG boots take 40–100 s, the checks about a minute — alone; twice
#: that and more beside the systemd lab's guests, which boot in the background meanwhile.
TIMEOUT = float(os.environ.get("PINWARDEN_LAB_TIMEOUT", "1200"))
#: The checks must have begun by then (the first result written): a boot takes 40–100 s,
#: 51 s in a CI run beside the systemd lab's two guests.
BOOT_LIMIT = float(os.environ.get("PINWARDEN_LAB_BOOT_LIMIT", "360"))
CPUS = 8
NUMA = ("1G,cpus=0-3", "1G,cpus=4-7")
APPEND = "isolcpus=6-7"
#: Extra QEMU options (``$PINWARDEN_LAB_QEMU_OPTS``), by default :data:`SINGLE_TCG`.
QEMU_OPTS = os.environ.get("PINWARDEN_LAB_QEMU_OPTS")
#: Single-threaded TCG: one host thread runs every vCPU.  Debian's 6.12 and 7.3 panic now
#: and then during boot under multi-threaded TCG (int3 in ``sched_clock_cpu`` while
#: patching code); and beside other guests on a host with fewer CPUs than vCPUs (the suite
#: on two CPUs), multi-threaded TCG spends most of its time waiting for descheduled vCPU
#: threads: the same guest work took 2.7 times as long side by side with a second guest,
#: and 1.2 times alone (Python start-ups and forks in a 4-CPU 6.1 guest, this host).
SINGLE_TCG = "-accel tcg,thread=single"


def qemu_opts() -> str:
    """The extra QEMU options for every lab boot (see :data:`QEMU_OPTS`)."""
    return SINGLE_TCG if QEMU_OPTS is None else QEMU_OPTS


class LabError(Exception):
    """The VM did not boot or did not produce results; carries the console tail."""


class BootHang(LabError):
    """The VM's checks had not begun after :data:`BOOT_LIMIT` seconds."""


@dataclass
class LabRun:
    kernel: Path
    results: dict[str, Any]
    console: str
    seconds: float
    outdir: Path
    command: list[str] = field(default_factory=list)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def check(self, name: str) -> dict[str, Any]:
        """The data of one in-VM check; a check that raised or never ran fails here with
        its traceback (or the console tail)."""
        entry = self.results.get("checks", {}).get(name)
        if entry is None:
            done = self.results.get("done", False)
            raise AssertionError(
                f"in-VM check {name!r} has no result "
                f"({'the script finished without it' if done else 'the VM stopped first'})"
                f"; console tail:\n{self.tail()}")
        if not entry.get("ok"):
            raise AssertionError(f"in-VM check {name!r} raised:\n{entry.get('error')}")
        data = entry.get("data")
        assert isinstance(data, dict), entry
        return data


def _version_key(path: Path) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", path.name)]


def lab_kernel() -> Path:
    """``$PINWARDEN_LAB_KERNEL``, else the newest ``/boot/vmlinuz-*``."""
    env = os.environ.get("PINWARDEN_LAB_KERNEL")
    if env:
        return Path(env)
    found = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    if not found:
        raise LabError("no kernel in /boot/vmlinuz-* (apt-get install linux-image-amd64)")
    return found[-1]


def vng_binary() -> Path:
    bindir = Path(sys.executable).parent
    vng = bindir / "vng"
    if vng.exists():
        return vng
    which = shutil.which("vng")
    if which is None:
        raise LabError(f"virtme-ng is not installed ({bindir}/pip install virtme-ng)")
    return Path(which)


def vng_command(kernel: Path, outdir: Path) -> list[str]:
    python = Path(sys.executable)
    inner = " ".join(shlex.quote(str(a)) for a in (python, IN_VM, outdir))
    cmd = [str(vng_binary()), "--disable-kvm", "--verbose", "--run", str(kernel),
           "--cpus", str(CPUS), "--memory", "2G"]
    for node in NUMA:
        cmd += ["--numa", node]
    cmd += ["--append", APPEND, "--rwdir", str(outdir), "--cwd", str(REPO)]
    opts = qemu_opts()
    if opts:
        cmd += [f"--qemu-opts={opts}"]
    cmd += ["--exec", inner]
    return cmd


def boot(kernel: Path, outdir: Path, timeout: float = TIMEOUT) -> LabRun:
    """Boot the VM and return its results; :class:`LabError` with the console tail when it
    produced none.  A guest whose checks have not begun after :data:`BOOT_LIMIT` seconds
    (a kernel hung in its boot: :mod:`guestwatch`) is stopped and booted once more, its
    console kept as ``console-hung.log``; ``results["rebooted"]`` says so."""
    try:
        return _boot_once(kernel, outdir, timeout)
    except BootHang as exc:
        why = str(exc).splitlines()[0]
        kept = (outdir / "console.log").rename(outdir / "console-hung.log")
        print(f"lab: {why}; booting it once more (console kept in {kept})", file=sys.stderr)
        run = _boot_once(kernel, outdir, timeout)
        run.results["rebooted"] = {"why": why, "first_console": str(kept)}
        run.results.setdefault("notes", []).append(f"booted again: {why}")
        return run


def _boot_once(kernel: Path, outdir: Path, timeout: float) -> LabRun:
    cmd = vng_command(kernel, outdir)
    env = dict(os.environ)
    # vng starts virtme-run and qemu by name
    env["PATH"] = f"{Path(cmd[0]).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("PINWARDEN_REQUIRE_ALL", None)
    # The VM sees the tree read-only: without fresh .pyc files every Python start in it
    # recompiles pinwarden, which costs tens of seconds under TCG.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src"),
                    str(IN_VM.parent)], check=False, stdout=subprocess.DEVNULL)
    console_file = outdir / "console.log"
    result = outdir / RESULT_FILE
    start = time.monotonic()
    with console_file.open("wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        waited = guestwatch.wait(proc, guestwatch.mtime(result), began=start,
                                 timeout=timeout, boot_limit=BOOT_LIMIT)
    seconds = time.monotonic() - start
    text = console_file.read_text(errors="replace")
    run = LabRun(kernel, {}, text, seconds, outdir, cmd)
    if waited.stopped == "boot":
        raise BootHang(f"the lab VM ({kernel.name}) had not begun its checks after "
                       f"{BOOT_LIMIT:.0f} s\nconsole tail:\n{run.tail()}")
    if not result.exists():
        why = f"timed out after {timeout:.0f} s" if waited.rc is None \
            else f"exited {waited.rc}"
        raise LabError(f"the lab VM ({kernel.name}) {why} without results; "
                       f"command: {shlex.join(cmd)}\nconsole tail:\n{run.tail()}")
    try:
        run.results = json.loads(result.read_text())
    except json.JSONDecodeError as exc:
        raise LabError(f"unreadable {result}: {exc}\nconsole tail:\n{run.tail()}") from None
    if waited.rc is None:
        run.results.setdefault("notes", []).append(f"timed out after {timeout:.0f} s")
    return run


def load(outdir: Path) -> LabRun:
    """A previous boot's results (``PINWARDEN_LAB_REUSE=DIR``: re-run the assertions while
    working on them, without booting)."""
    try:
        results = json.loads((outdir / RESULT_FILE).read_text())
        console = (outdir / "console.log").read_text(errors="replace")
    except (OSError, json.JSONDecodeError) as exc:
        raise LabError(f"cannot reuse lab results in {outdir}: {exc}") from None
    return LabRun(lab_kernel(), results, console, 0.0, outdir)


def kernel_ids() -> list[str]:
    """The kernels a session boots, by id: ``debian`` (the newest ``/boot/vmlinuz-*``, the
    host's Debian 12 kernel) and ``backports`` (the newest Debian kernel, 7.3 when this was
    written: :mod:`lab.kernels`) — or the one ``$PINWARDEN_LAB_KERNEL`` names, or the one
    boot ``$PINWARDEN_LAB_REUSE`` kept."""
    if os.environ.get("PINWARDEN_LAB_REUSE"):
        return ["reuse"]
    if os.environ.get("PINWARDEN_LAB_KERNEL"):
        return ["given"]
    return ["debian", "backports"]


def _kernel(kernel_id: str) -> Path:
    if kernel_id != "backports":
        return lab_kernel()
    from lab.kernels import KernelFetchError, backports_kernel

    try:
        return backports_kernel()
    except KernelFetchError as exc:
        raise LabError(f"cannot fetch the backports kernel: {exc}") from None


_RUN: dict[str, LabRun | LabError] = {}
#: The output directories this session made (conftest removes them when the session passed).
MADE: list[Path] = []


def lab_run(kernel_id: str = "debian") -> LabRun:
    """The session's VM boot with kernel ``kernel_id`` (:func:`kernel_ids`; cached, a failed
    boot is re-raised to every caller)."""
    if kernel_id not in _RUN:
        try:
            reuse = os.environ.get("PINWARDEN_LAB_REUSE")
            if reuse:
                _RUN[kernel_id] = load(Path(reuse))
            else:
                kernel = _kernel(kernel_id)
                outdir = Path(tempfile.mkdtemp(prefix="pwtest-lab-"))
                MADE.append(outdir)
                _RUN[kernel_id] = boot(kernel, outdir)
        except LabError as exc:
            _RUN[kernel_id] = exc
    got = _RUN[kernel_id]
    if isinstance(got, LabError):
        raise got
    return got


if __name__ == "__main__":  # by hand, in tests/: python -m lab.vm → results and console path
    r = lab_run()
    print(json.dumps(r.results, indent=2))
    print(f"# {r.seconds:.0f} s, console: {r.outdir / 'console.log'}", file=sys.stderr)
