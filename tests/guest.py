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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@functools.lru_cache(maxsize=1)
def guest_run() -> GuestResult:
    vng = VENV_BIN / "vng"
    kernel = kernel_image()
    if not vng.exists() or kernel is None or shutil.which("qemu-system-x86_64") is None:
        return GuestResult(False, f"virtme-ng ({vng}), a kernel in /boot and "
                           "qemu-system-x86_64 are needed (make test installs them)",
                           "", None, None)
    script = GUEST_SCRIPT.format(repo=REPO, python=VENV_BIN / "python")
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    try:
        done = subprocess.run(
            [str(vng), "--disable-kvm", "--run", kernel, "--cpus", "4", "--memory", "1G",
             f"--qemu-opts={SINGLE_TCG}", "--exec", script], capture_output=True, text=True,
            timeout=1500, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return GuestResult(False, "the virtme-ng guest timed out after 1500 s", out,
                           None, None)
    output = done.stdout + done.stderr
    if "MOUNT-FAILED" in output:
        return GuestResult(False, "could not mount a cgroup v1 cpuset hierarchy in the "
                           "guest", output, None, None)
    diff = re.search(r"^DIFFERENTIAL (.*)$", output, re.M)
    rc = re.search(r"^RUNCASES rc=(\d+)", output, re.M)
    if diff is None and rc is None:
        return GuestResult(False, f"the guest did not run the checks (vng exit "
                           f"{done.returncode})", output, None, None)
    return GuestResult(True, "", output, json.loads(diff.group(1)) if diff else None,
                       int(rc.group(1)) if rc else None)
