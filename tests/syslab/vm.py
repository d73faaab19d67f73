"""Host side of the systemd host lab: boot a suite's root once, read its results.

``lab_run(suite)`` (cached per process, a failure too) does, for one suite:

1. :func:`syslab.rootfs.ensure_root` — the cached root image (built on first use);
2. a wheelhouse: pinwarden's wheel built from this checkout plus its dependencies'
   wheels (``pip wheel``), built once per session — the guest is offline and installs
   with ``pip install --no-index --find-links``;
3. an output directory ``/tmp/pwtest-syslab-<suite>-*`` holding ``console.log``, a qcow2
   overlay over the cached image (deleted after the boot) and ``share/`` — shared with the
   guest read-write at ``/srv/syslab`` (``--rwdir``): the guest scripts, the wheelhouse,
   ``config.json`` and the ``results.json`` the guest rewrites after every check;
4. ``vng --systemd --rw --disable-kvm --root-disk OVERLAY --run KERNEL --cpus 4
   --memory 3G --numa 1536M,cpus=0-1 --numa 1536M,cpus=2-3 --append isolcpus=3
   --exec 'python3 /srv/syslab/guest/run.py /srv/syslab'``:
   systemd is PID 1; virtme-ng runs the script from serial-getty@ttyS0.service once the
   console is up and powers the guest off when it returns.  The whole boot is bounded by
   ``PINWARDEN_SYSLAB_TIMEOUT`` seconds (then the process group is killed).

A guest that leaves no results raises :class:`LabError` with the console tail; the tests
turn that into failures, never skips.

One emulator race is survived: under TCG a guest kernel that patches its own code (a
static key flips whenever the first cpuset cgroup comes or the last one goes) can trap on a
breakpoint it has already removed, "Oops: int3" in an unrelated function, and panic; MTTCG
does not always make every vCPU see the patched code in time.  Such a guest is booted once
more and runs only the checks without a result (the set-up checks ``boot``, ``env`` and
``install`` again); ``results["resumed"]`` says so, with the first console kept in the
output directory.  Any other stop, or a second one, fails as above.  Trixie's Linux 6.12
met the race in two of the last full runs (once in CI), both times with the other guests
busy beside it; bookworm's 6.1, under MTTCG, once stopped silently instead (no console
output, no check finished for 40 minutes, right after ``install``).  Both boot with
single-threaded TCG by default (:data:`QEMU_OPTS`: one host thread runs every vCPU, so each
sees the patch at once), which costs a guest about a third more time alone and removes the
race.  A guest that finishes no check for :data:`STALL` seconds
(``PINWARDEN_SYSLAB_STALL``) is stopped and, when it has results, resumed once in the same
way: a stall that comes back is a failure.  A guest whose checks have not begun after
:data:`BOOT_LIMIT` seconds (its kernel hung in its own boot, :mod:`guestwatch`) is booted
once more from the start; ``results["rebooted"]`` says so.

Boots run in background threads: :func:`start` (the test session calls it once it has
collected, for the suites its selected tests use) boots every suite side by side while the
rest of the suite runs; ``lab_run`` waits for its own.  A TCG guest keeps one or two host
CPUs busy, so the boots overlap the host's other work instead of queueing behind it;
``PINWARDEN_SYSLAB_TIMEOUT`` allows for that.  :func:`stop` kills what still runs when the
session ends (the tests that wanted it were deselected or the run was cut short).

Environment: ``PINWARDEN_SYSLAB_SUITES`` (default ``bookworm,trixie``),
``PINWARDEN_SYSLAB_CHECKS`` (comma list of check names or ``prefix*``: run only those),
``PINWARDEN_SYSLAB_EVERY_SUITE=1`` (the checks of one suite, :data:`ONE_SUITE`, in all),
``PINWARDEN_SYSLAB_REUSE_<SUITE>=DIR`` (assert on an earlier boot's output directory),
``PINWARDEN_SYSLAB_KERNEL_<SUITE>`` (another kernel), ``PINWARDEN_SYSLAB_QEMU_OPTS_<SUITE>``,
``PINWARDEN_SYSLAB_CACHE`` (see rootfs), ``PINWARDEN_LAB_KEEP=1`` (keep the output
directories and the wheelhouse of a session that passed too: the session removes them
otherwise, and keeps them, saying where, when it failed).
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
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import guestwatch
from syslab.rootfs import RECIPES, BuildError, BuiltRoot, ensure_root

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest"
GUEST_SHARE = "/srv/syslab"
RESULT_FILE = "results.json"
#: Alone a suite's boot takes 15-20 minutes here; beside the other suite and the rest of
#: the tests (other TCG guests among them) up to about twice that.
TIMEOUT = float(os.environ.get("PINWARDEN_SYSLAB_TIMEOUT", "3000"))
CPUS = 4
MEMORY = "3G"
#: One isolated CPU: the default affinity of unpinned domains is visible (FACTS 5) while
#: CPUs 1-2 stay usable for partitions (6.12 refuses partitions over isolcpus CPUs).
APPEND = "isolcpus=3"
#: Two NUMA nodes (CPUs 0-1 and 2-3, half the memory each): guest cells and their memory
#: (<numatune><memnode>) meet real nodes (checks_60_numa).
NUMA = ("1536M,cpus=0-1", "1536M,cpus=2-3")
#: Extra QEMU options per suite (``PINWARDEN_SYSLAB_QEMU_OPTS_<SUITE>`` replaces them).
QEMU_OPTS = {"trixie": "-accel tcg,thread=single", "bookworm": "-accel tcg,thread=single"}
#: A guest that finishes no check for this long has stalled (the longest check takes about
#: six minutes beside the other guest): it is stopped, and resumed once like the race.
STALL = float(os.environ.get("PINWARDEN_SYSLAB_STALL", "1200"))
#: The guest's checks must have begun by then (the ``boot`` check's result written): 110
#: and 181 s in a CI run with both guests and the rest of the suite side by side.  A guest
#: that has not (its kernel hung in its boot: :mod:`guestwatch`) is booted once more.
BOOT_LIMIT = float(os.environ.get("PINWARDEN_SYSLAB_BOOT_LIMIT", "720"))
SUITES = tuple(s for s in os.environ.get("PINWARDEN_SYSLAB_SUITES",
                                         ",".join(RECIPES)).split(",") if s)
#: Checks whose facts do not depend on the suite (none of their tests looks at the suite,
#: the kernel or a version), each run in one suite's guest: with every check in both, a
#: guest took about 35 minutes beside the rest of ``make test``, and a CI run 45.6 minutes
#: in all.  Split so that each guest saves about seven minutes: the LXC, lease-database
#: and operator stories on trixie (libvirt 11, Debian's current release), the hook facts,
#: hot-plug and the 6.1-era stories on bookworm.  ``PINWARDEN_SYSLAB_EVERY_SUITE=1`` runs
#: them in every suite again (and their tests with them).
ONE_SUITE: Mapping[str, str] = {
    "story_lxc": "trixie", "story_two_leases": "trixie", "story_lost_database": "trixie",
    "story_unhooked": "trixie", "story_operator_edit": "trixie", "numa_cells": "trixie",
    "hooks": "bookworm", "partition_domain": "bookworm",
    "pinwarden_hook_shared_start": "bookworm", "story_host_affinity": "bookworm",
    "story_hotplug": "bookworm", "story_edit_mid_sync": "bookworm",
    "unit_pulls_in_no_libvirtd": "bookworm",
}


def suites_of(check: str | None) -> tuple[str, ...]:
    """The selected suites whose guests run ``check`` (every one for None, a check of
    every suite, or with ``PINWARDEN_SYSLAB_EVERY_SUITE=1``; a check of a suite that is not
    selected runs in the first selected one)."""
    if check is None or check not in ONE_SUITE or \
            os.environ.get("PINWARDEN_SYSLAB_EVERY_SUITE") == "1":
        return SUITES
    home = ONE_SUITE[check]
    return (home,) if home in SUITES else SUITES[:1]


class LabError(Exception):
    """No results from the guest (or no guest at all); the message says why."""


class BootHang(LabError):
    """The guest's checks had not begun after :data:`BOOT_LIMIT` seconds."""


@dataclass
class LabRun:
    suite: str
    results: dict[str, Any]
    console: str
    seconds: float
    outdir: Path
    command: list[str] = field(default_factory=list)
    kernel: str = ""

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def check(self, name: str) -> dict[str, Any]:
        """One check's data; fails (AssertionError) with the guest's traceback, or the
        console tail when the check never ran."""
        entry = self.results.get("checks", {}).get(name)
        if entry is None:
            done = self.results.get("done", False)
            notes = "\n".join(self.results.get("notes", []))
            raise AssertionError(
                f"[{self.suite}] check {name!r} has no result "
                f"({'the guest script finished without it' if done else 'the guest stopped first'}"
                f"); {notes}\nconsole tail ({self.outdir}/console.log):\n{self.tail()}")
        if not entry.get("ok"):
            raise AssertionError(f"[{self.suite}] check {name!r} failed in the guest:\n"
                                 f"{entry.get('error')}")
        data = entry.get("data")
        assert isinstance(data, dict), entry
        return data


def _env_key(suite: str) -> str:
    return re.sub(r"\W", "_", suite.upper())


def _version_key(path: Path) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.+-]", path.name)]


def suite_kernel(suite: str, root: BuiltRoot) -> Path:
    env = os.environ.get(f"PINWARDEN_SYSLAB_KERNEL_{_env_key(suite)}")
    if env:
        return Path(env)
    if root.recipe.kernel == "root":
        kernel = root.kernel()
        if kernel is None:
            raise LabError(f"{root.path} has no kernel/boot/vmlinuz-* (rebuild: remove it)")
        return kernel
    found = sorted(Path("/boot").glob("vmlinuz-6.1.*"), key=_version_key)
    if not found:
        raise LabError("the bookworm lab boots the host's Debian 6.1 kernel: no "
                       "/boot/vmlinuz-6.1.* (apt-get install linux-image-amd64 on bookworm)")
    return found[-1]


def vng_binary() -> Path:
    vng = Path(sys.executable).parent / "vng"
    if vng.exists():
        return vng
    which = shutil.which("vng")
    if which is None:
        raise LabError(f"virtme-ng is not installed ({Path(sys.executable).parent}/pip "
                       f"install virtme-ng)")
    return Path(which)


_WHEELHOUSE: list[Path | LabError] = []


_WHEELHOUSE_LOCK = threading.Lock()


def wheelhouse() -> Path:
    """pinwarden's wheel from this checkout and its dependencies' wheels, once a session.
    The checkout is copied first, so the build writes nothing into the work tree."""
    with _WHEELHOUSE_LOCK:
        return _wheelhouse()


def _wheelhouse() -> Path:
    if not _WHEELHOUSE:
        base = Path(tempfile.mkdtemp(prefix="pwtest-syslab-wheels-"))
        MADE.append(base)
        src = base / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (REPO / name).exists():
                shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "src", src / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        out = base / "wheelhouse"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir",
                               str(out), str(src)], capture_output=True, text=True,
                              check=False, stdin=subprocess.DEVNULL, timeout=900)
        if proc.returncode != 0:
            _WHEELHOUSE.append(LabError(f"pip wheel of the checkout failed (rc "
                                        f"{proc.returncode}):\n{proc.stderr[-3000:]}"))
        else:
            _WHEELHOUSE.append(out)
    got = _WHEELHOUSE[0]
    if isinstance(got, LabError):
        raise got
    return got


def vng_command(kernel: Path, overlay: Path, share: Path, qemu_opts: str) -> list[str]:
    inner = f"python3 {GUEST_SHARE}/guest/run.py {GUEST_SHARE}"
    cmd = [str(vng_binary()), "--systemd", "--rw", "--disable-kvm", "--verbose",
           "--root-disk", str(overlay), "--root-fstype", "ext4",
           "--run", str(kernel), "--cpus", str(CPUS), "--memory", MEMORY,
           "--append", APPEND, "--rwdir", f"{GUEST_SHARE}={share}"]
    for node in NUMA:
        cmd += ["--numa", node]
    if qemu_opts:
        cmd.append(f"--qemu-opts={qemu_opts}")
    return [*cmd, "--exec", inner]


#: The TCG cross-modifying-code race (see the module docstring), and the checks a resumed
#: guest runs again because the others need them.
TCG_RACE = re.compile(r"Oops: int3\b")
SETUP_CHECKS = ("boot", "env", "install")


def resumable(run: LabRun) -> list[str] | None:
    """The checks to skip in a second boot when ``run`` stopped on the TCG race or stalled
    (those with a result, set-up checks excepted); ``None`` when it did not."""
    if run.results.get("done") or not (TCG_RACE.search(run.console)
                                       or run.results.get("stalled")):
        return None
    return [n for n in run.results.get("checks", {}) if n not in SETUP_CHECKS]


def merged(first: LabRun, second: LabRun) -> LabRun:
    """``second`` (the resumed boot) with ``first``'s results for the checks it skipped."""
    checks = dict(first.results.get("checks", {}))
    checks.update(second.results.get("checks", {}))
    second.results["checks"] = checks
    why = "the guest kernel stopped on 'Oops: int3' (TCG cross-modifying code race)" \
        if TCG_RACE.search(first.console) else \
        f"the guest stalled (no check finished for {STALL:.0f} s)"
    second.results["resumed"] = {
        "why": why,
        "first_console": str(first.outdir / "console.log"),
        "first_seconds": round(first.seconds, 1),
        "kept": sorted(n for n in first.results.get("checks", {}) if n not in SETUP_CHECKS)}
    second.seconds += first.seconds
    return second


def prepare(suite: str, root: BuiltRoot, outdir: Path,
            skip: Sequence[str] = ()) -> Path:
    """The guest's share: scripts, wheelhouse, config."""
    share = outdir / "share"
    share.mkdir()
    shutil.copytree(GUEST, share / "guest",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(wheelhouse(), share / "wheelhouse")
    shutil.copytree(REPO / "contrib", share / "contrib")  # the unit the story enables
    (share / "config.json").write_text(json.dumps({
        "suite": suite, "recipe": root.recipe.name,
        "checks": os.environ.get("PINWARDEN_SYSLAB_CHECKS", ""),
        "skip": [*skip, *(c for c in ONE_SUITE if suite not in suites_of(c))],
    }))
    return share


def boot(suite: str, root: BuiltRoot, outdir: Path, timeout: float = TIMEOUT, *,
         skip: Sequence[str] = (), resume: bool = True) -> LabRun:
    try:
        run = _boot_once(suite, root, outdir, timeout, skip)
    except BootHang as exc:
        if not resume:
            raise
        why = str(exc).splitlines()[0]
        print(f"syslab: {why}; booting it once more", file=sys.stderr)
        second = outdir / "rebooted"
        second.mkdir()
        run = boot(suite, root, second, timeout, skip=skip, resume=False)
        run.results["rebooted"] = {"why": why,
                                   "first_console": str(outdir / "console.log")}
        run.results["notes"].append(f"booted again: {why}")
        return run
    again = resumable(run) if resume else None
    if again is None:
        return run
    what = "stalled" if run.results.get("stalled") else "stopped on the TCG int3 race"
    print(f"syslab: the {suite} guest {what}; booting it again for the checks after "
          f"{', '.join(again) or 'the set-up'}", file=sys.stderr)
    second = outdir / "resumed"
    second.mkdir()
    return merged(run, boot(suite, root, second, timeout, skip=again, resume=False))


def _boot_once(suite: str, root: BuiltRoot, outdir: Path, timeout: float,
               skip: Sequence[str]) -> LabRun:
    kernel = suite_kernel(suite, root)
    share = prepare(suite, root, outdir, skip)
    overlay = outdir / "overlay.qcow2"
    made = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                           str(root.image), str(overlay)], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        raise LabError(f"qemu-img create failed: {made.stderr}")
    qemu_opts = os.environ.get(f"PINWARDEN_SYSLAB_QEMU_OPTS_{_env_key(suite)}",
                               QEMU_OPTS.get(suite, ""))
    cmd = vng_command(kernel, overlay, share, qemu_opts)
    env = dict(os.environ)
    env["PATH"] = f"{Path(cmd[0]).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("PINWARDEN_REQUIRE_ALL", None)
    console_file = outdir / "console.log"
    start = time.monotonic()
    try:
        with console_file.open("wb") as console:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                    stderr=subprocess.STDOUT, env=env, cwd=outdir,
                                    start_new_session=True)
            _LIVE.add(proc.pid)
            try:
                rc, stopped = _wait(proc, share / RESULT_FILE, start + timeout, began=start)
            finally:
                _LIVE.discard(proc.pid)
    finally:
        overlay.unlink(missing_ok=True)
    seconds = time.monotonic() - start
    text = console_file.read_text(errors="replace")
    run = LabRun(suite, {}, text, seconds, outdir, cmd, kernel.name)
    result = share / RESULT_FILE
    if stopped == "boot":
        raise BootHang(f"the {suite} lab guest ({kernel.name}) had not begun its checks "
                       f"after {BOOT_LIMIT:.0f} s\nconsole tail ({console_file}):\n"
                       f"{run.tail()}")
    if not result.exists():
        why = (f"stalled for {STALL:.0f} s" if stopped == "stall"
               else f"timed out after {timeout:.0f} s") if rc is None else f"exited {rc}"
        raise LabError(f"the {suite} lab guest ({kernel.name}) {why} without results; "
                       f"command: {shlex.join(cmd)}\nconsole tail ({console_file}):\n"
                       f"{run.tail()}")
    try:
        run.results = json.loads(result.read_text())
    except json.JSONDecodeError as exc:
        raise LabError(f"unreadable {result}: {exc}\nconsole tail:\n{run.tail()}") from None
    run.results.setdefault("notes", [])
    if stopped == "stall":
        run.results["stalled"] = True
        run.results["notes"].append(f"stalled: no check finished for {STALL:.0f} s")
    elif rc is None:
        run.results["notes"].append(f"timed out after {timeout:.0f} s")
    run.results["host"] = {"seconds": round(seconds, 1), "rc": rc, "kernel": kernel.name,
                           "root": str(root.path)}
    (outdir / "host.json").write_text(json.dumps(run.results["host"], indent=1))
    return run


def _wait(proc: subprocess.Popen[bytes], result: Path, deadline: float,
          poll: float = 10.0, began: float | None = None) -> tuple[int | None, str | None]:
    """(exit status or None when stopped, why it was stopped: :mod:`guestwatch`'s
    ``"boot"``, ``"stall"`` or ``"timeout"``): wait for the guest until ``deadline``,
    stopping it when ``result`` (rewritten after every check) has not come within
    :data:`BOOT_LIMIT` seconds or has not changed for :data:`STALL` seconds."""
    start = time.monotonic() if began is None else began
    waited = guestwatch.wait(proc, guestwatch.mtime(result), began=start,
                             timeout=deadline - start, boot_limit=BOOT_LIMIT, stall=STALL,
                             poll=poll)
    return waited.rc, waited.stopped


def load(suite: str, outdir: Path) -> LabRun:
    try:
        results = json.loads((outdir / "share" / RESULT_FILE).read_text())
        console = (outdir / "console.log").read_text(errors="replace")
    except (OSError, json.JSONDecodeError) as exc:
        raise LabError(f"cannot reuse {suite} lab results in {outdir}: {exc}") from None
    host = results.get("host", {})
    return LabRun(suite, results, console, float(host.get("seconds", 0.0)), outdir,
                  kernel=str(host.get("kernel", "")))


#: Process groups of the guests running now (vng's own session: vng, virtme-run, qemu).
_LIVE: set[int] = set()
#: Directories this session made (conftest removes them when the session passed).
MADE: list[Path] = []
_RUNS: dict[str, LabRun | LabError] = {}
_BOOTS: dict[str, threading.Thread] = {}
_BOOTS_LOCK = threading.Lock()


def _run_suite(suite: str) -> LabRun:
    reuse = os.environ.get(f"PINWARDEN_SYSLAB_REUSE_{_env_key(suite)}")
    if reuse:
        return load(suite, Path(reuse))
    try:
        root = ensure_root(suite)
    except BuildError as exc:
        raise LabError(f"the {suite} lab root could not be built: {exc}") from None
    outdir = Path(tempfile.mkdtemp(prefix=f"pwtest-syslab-{suite}-"))
    MADE.append(outdir)
    return boot(suite, root, outdir)


def _fill(suite: str) -> None:
    try:
        _RUNS[suite] = _run_suite(suite)
    except LabError as exc:
        _RUNS[suite] = exc
    except Exception as exc:  # a bug here must reach the tests, not die with the thread
        _RUNS[suite] = LabError(f"the {suite} lab run failed on the host: {exc!r}")


def start(suites: Sequence[str]) -> None:
    """Boot each of ``suites`` in a background thread, once a session (no-op for one that
    is booting or done)."""
    with _BOOTS_LOCK:
        for suite in suites:
            if suite not in _BOOTS:
                thread = threading.Thread(target=_fill, args=(suite,), daemon=True,
                                          name=f"syslab-{suite}")
                _BOOTS[suite] = thread
                thread.start()


def stop() -> None:
    """Kill the guests still running (end of session) and let their threads finish, so
    that :data:`MADE` can be removed."""
    for pgid in list(_LIVE):
        guestwatch.kill_group(pgid)
    for thread in list(_BOOTS.values()):
        thread.join(timeout=60)  # (a killed guest's thread returns at once)


def lab_run(suite: str) -> LabRun:
    """The session's one boot of ``suite`` (cached; a failure is re-raised to every caller):
    started now unless :func:`start` did already, then waited for."""
    start([suite])
    while _BOOTS[suite].is_alive():  # a bounded join, so that Ctrl-C gets through
        _BOOTS[suite].join(1.0)
    got = _RUNS[suite]
    if isinstance(got, LabError):
        raise got
    return got


if __name__ == "__main__":  # by hand: cd tests && ../.venv/bin/python -m syslab.vm [SUITE…]
    try:
        start(sys.argv[1:] or SUITES)
        for name in sys.argv[1:] or SUITES:
            r = lab_run(name)
            ok = sum(1 for c in r.results["checks"].values() if c.get("ok"))
            print(f"{name}: {ok}/{len(r.results['checks'])} checks ok, {r.seconds:.0f} s, "
                  f"{r.outdir}")
    finally:  # the output directories printed are kept; the wheels are not
        stop()
        for made in MADE:
            if made.name.startswith("pwtest-syslab-wheels-"):
                shutil.rmtree(made, ignore_errors=True)
