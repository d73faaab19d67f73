"""Suite-wide fixtures and the rule that, under `make test`, nothing may be skipped."""

from __future__ import annotations

import glob
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Shared test helpers whose asserts should read like the tests' own.
pytest.register_assert_rewrite("libvirt_env", "hostroot", "enforce_helpers")

REPO = Path(__file__).resolve().parent.parent
#: hwloc topology dumps (BSD-3-Clause, tests/data/hwloc/COPYING.hwloc), kept in the repository
#: so that a clone with nothing beside it passes.
HWLOC = REPO / "tests" / "data" / "hwloc"
REQUIRE_ALL = os.environ.get("PINWARDEN_REQUIRE_ALL") == "1"
#: The RFC's own example (libvir-list, "exclusive vcpu-cpu pinning", 2014).
SEED_XML = """<domain type='kvm'>
  <name>vm1</name>
  <!-- the RFC's example -->
  <vcpu placement='static' cpuset='4-6'>2</vcpu>
  <cputune exclusive='yes'>
    <vcpupin vcpu='0' cpuset='5'/>
    <vcpupin vcpu='1' cpuset='6'/>
    <emulatorpin cpuset='4'/>
  </cputune>
</domain>
"""
HWLOC_DUMPS = sorted(p.name.removesuffix(".tar.bz2") for p in HWLOC.glob("*.tar.bz2"))

#: The parts of a dump topology reading needs; the rest (PCI, DMI, caches, hugepages) is most
#: of the files and would only slow extraction down.
_NEEDED = re.compile(r"[^/]+/(sys/devices/system/(cpu|node)/|proc/|dev/cpuset|sys/fs/cgroup"
                     r"|sys/devices/cpu_)")
_UNNEEDED = re.compile(r"/(cache|cpuidle|cpufreq|hugepages|power)/")


@pytest.fixture(scope="session")
def hwloc_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every hwloc dump extracted once per session, by tarball name → its top folder
    (tarballs hold one top folder, not always named like the tarball)."""
    if not HWLOC_DUMPS:
        pytest.fail(f"hwloc test data missing at {HWLOC}")
    out: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("hwloc")
    for name in HWLOC_DUMPS:
        dest = base / name
        with tarfile.open(HWLOC / f"{name}.tar.bz2") as tar:
            members = [m for m in tar.getmembers()
                       if _NEEDED.match(m.name) and not _UNNEEDED.search(m.name)]
            tar.extractall(dest, members=members, filter="tar")
        (top,) = [p for p in dest.iterdir() if p.is_dir()]
        out[name] = top
    return out


#: The host's noise settings pinwarden narrows while CPUs are leased ([isolation] noise).
_NOISE_FILES = ("/proc/irq/default_smp_affinity", "/sys/devices/virtual/workqueue/cpumask")
_PF_KTHREAD, _PF_NO_SETAFFINITY = 0x00200000, 0x04000000  # <linux/sched.h>


def _host_noise() -> dict[str, str]:
    """The host's noise settings: the default IRQ affinity, the unbound-workqueue mask,
    every IRQ's affinity and every movable kernel thread's (what pinwarden moves)."""
    seen: dict[str, str] = {}
    for path in (*_NOISE_FILES, *glob.glob("/proc/irq/*/smp_affinity_list")):
        try:
            seen[path] = Path(path).read_text().strip()
        except OSError:
            continue
    for task in glob.glob("/proc/[0-9]*"):
        try:
            flags = int(Path(f"{task}/stat").read_text().rsplit(")", 1)[1].split()[6])
            if flags & _PF_KTHREAD and not flags & _PF_NO_SETAFFINITY:  # movable
                seen[task] = ",".join(map(str, sorted(os.sched_getaffinity(int(task[6:])))))
        except (OSError, ValueError, IndexError):
            continue
    return seen


def _put_back(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Write back what changed (best effort: some IRQs and per-CPU kernel threads refuse);
    what was put back, as ``path: now -> before`` lines."""
    lines = []
    for key, was in before.items():
        now = after.get(key)
        if now is None or now == was:
            continue
        lines.append(f"{key}: {now} -> {was}")
        try:
            if key.startswith("/proc/") and key[6:].isdigit():
                os.sched_setaffinity(int(key[6:]), {int(c) for c in was.split(",")})
            else:
                Path(key).write_text(was + "\n")
        except (OSError, ValueError):
            lines[-1] += " (could not)"
    return lines


@pytest.fixture(autouse=True)
def _host_noise_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test on the real host (``libvirt``/``kernel`` marks) leaves the host's noise
    settings as it found them: a test whose teardown dropped a lease without pinwarden
    releasing it left IRQs, unbound work and kernel threads on CPU 0 for every later test
    and for the machine (CI's host).  Checked after the test's own fixtures are torn down;
    a change is put back and fails the test, naming what changed."""
    if os.geteuid() != 0 or not (request.node.get_closest_marker("libvirt")
                                 or request.node.get_closest_marker("kernel")):
        yield
        return
    before = _host_noise()
    yield
    after = _host_noise()
    # (kernel threads come and go: only the ones alive before and after are compared)
    changed = _put_back({k: v for k, v in before.items()
                         if not k[6:].isdigit() or k in after}, after)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; … {len(changed) - 6} more"
                                         if len(changed) > 6 else "")
        pytest.fail(f"the test left the host's noise settings changed (put back now): "
                    f"{shown}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under PINWARDEN_REQUIRE_ALL=1 (make test): {reason}"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Boot the systemd lab suites the selected tests use (tests/test_syslab.py) in the
    background now: each takes 15-20 minutes of TCG, which then overlaps the other tests
    instead of following them."""
    suites = sorted({item.callspec.params["lab"] for item in session.items
                     if item.path.name == "test_syslab.py" and hasattr(item, "callspec")
                     and "lab" in item.callspec.params})
    if suites and not session.config.option.collectonly:
        from syslab import vm

        vm.start(suites)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the lab guests still running; remove the directories the labs made when the
    session passed (a failed one, or ``PINWARDEN_LAB_KEEP=1``, keeps them and says where:
    for ``PINWARDEN_LAB_REUSE`` / ``PINWARDEN_SYSLAB_REUSE_<SUITE>``)."""
    import shutil

    syslab = sys.modules.get("syslab.vm")
    if syslab is not None:
        syslab.stop()
    made = [path for name in ("syslab.vm", "lab.vm")
            if (module := sys.modules.get(name)) is not None for path in module.MADE]
    if exitstatus != 0 or os.environ.get("PINWARDEN_LAB_KEEP"):
        if made:
            print(f"\nlab output kept: {' '.join(map(str, made))}", file=sys.stderr)
        return
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
