"""One virtme-ng guest boot (per test session) for the real-kernel enforcement checks.

The guest runs the distribution kernel (``/boot/vmlinuz-*``) under single-threaded TCG with
4 CPUs and a fresh cgroup v1 cpuset hierarchy mounted at ``/tmp/pwtest-cpuset``, where
nothing else lives: exclusive cpusets can be created at will.  Inside it run

* ``tests/differential.py`` (random cpuset operations, real kernel vs. the fake);
* ``pytest tests/run_kernel_cases.py`` (``pinwarden run`` end to end).

Each part prints a marker line the host-side tests parse.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import guestwatch
from lab.vm import SINGLE_TCG  # (single-threaded TCG: see there)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"

GUEST_SCRIPT = """
set -u
mkdir -p /tmp/pwtest-cpuset
mount -t cgroup -o cpuset pwtest-cpuset /tmp/pwtest-cpuset || echo "MOUNT-FAILED"
cd {repo}
export PYTHONDONTWRITEBYTECODE=1 PINWARDEN_GUEST=1
{python} tests/differential.py /tmp/pwtest-cpuset 1000 150 3
{python} -m pytest -p no:cacheprovider -o addopts= -q -rA tests/run_kernel_cases.py 2>&1
echo "RUNCASES rc=$?"
"""


@dataclass(frozen=True)
class GuestResult:
    ok: bool  # the guest booted and the script ran
    why: str  # when not ok
    output: str
    differential: list[dict[str, Any]] | None
    runcases_rc: int | None


def kernel_image() -> str | None:
    images = sorted(glob.glob("/boot/vmlinuz-*"))
    return images[-1] if images else None


#: The script must have begun by then (a 4-CPU 6.1 boot takes under two minutes beside the
#: other guests); a guest that has not (its kernel hung in its boot: :mod:`guestwatch`) is
#: booted once more.
BOOT_LIMIT = 360.0
TIMEOUT = 1500.0
BEGAN = "GUEST-BEGAN"


@functools.lru_cache(maxsize=1)
def guest_run() -> GuestResult:
    vng = VENV_BIN / "vng"
    kernel = kernel_image()
    if not vng.exists() or kernel is None or shutil.which("qemu-system-x86_64") is None:
        return GuestResult(False, f"virtme-ng ({vng}), a kernel in /boot and "
                           "qemu-system-x86_64 are needed (make test installs them)",
                           "", None, None)
    script = GUEST_SCRIPT.format(repo=REPO, python=VENV_BIN / "python")
    cmd = [str(vng), "--disable-kvm", "--run", kernel, "--cpus", "4", "--memory", "1G",
           f"--qemu-opts={SINGLE_TCG}", "--exec", f"echo {BEGAN}; {script}"]
    output, waited = _boot(cmd)
    if waited.stopped == "boot":
        output, waited = _boot(cmd)
        if waited.stopped == "boot":
            return GuestResult(False, f"the virtme-ng guest had not begun its script after "
                               f"{BOOT_LIMIT:.0f} s, twice", output, None, None)
    if waited.stopped is not None:
        return GuestResult(False, f"the virtme-ng guest timed out after {TIMEOUT:.0f} s",
                           output, None, None)
    if "MOUNT-FAILED" in output:
        return GuestResult(False, "could not mount a cgroup v1 cpuset hierarchy in the "
                           "guest", output, None, None)
    diff = re.search(r"^DIFFERENTIAL (.*)$", output, re.M)
    rc = re.search(r"^RUNCASES rc=(\d+)", output, re.M)
    if diff is None and rc is None:
        return GuestResult(False, f"the guest did not run the checks (vng exit "
                           f"{waited.rc})", output, None, None)
    return GuestResult(True, "", output, json.loads(diff.group(1)) if diff else None,
                       int(rc.group(1)) if rc else None)


def _boot(cmd: list[str]) -> tuple[str, guestwatch.Waited]:
    """One boot: its output (standard output, then standard error) and how it ended."""
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    with tempfile.TemporaryDirectory(prefix="pwtest-guest-") as tmp:
        stdout, stderr = Path(tmp, "stdout"), Path(tmp, "stderr")

        def began() -> bool | None:
            return True if BEGAN.encode() in stdout.read_bytes() else None

        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=env, start_new_session=True)
            waited = guestwatch.wait(proc, began, began=time.monotonic(), timeout=TIMEOUT,
                                     boot_limit=BOOT_LIMIT)
        output = stdout.read_bytes() + stderr.read_bytes()
        return output.decode(errors="replace"), waited
