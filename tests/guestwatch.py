"""Waiting for a virtme-ng guest on the host side, and stopping one that hangs.

Every lab guest boots under TCG, and a guest kernel can hang in its own boot: Debian's
7.3 once stopped for good while bringing up its secondary CPUs (CI, the kernel lab's
8-CPU guest, console silent after ``calibrate_delay_direct() failed``), and the guest
then spun a host CPU until the lab's 20-minute timeout, slowing every other guest beside
it.  So each lab waits with :func:`wait`: a guest whose script has not begun within
``boot_limit`` seconds is stopped (``"boot"``) and booted once more by its lab; one whose
progress marker stops changing for ``stall`` seconds is stopped as stalled; and every guest
is stopped at its overall deadline.  "Stopped" means its whole process group (vng,
virtme-run and QEMU: each guest runs in a session of its own).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Why = Literal["boot", "stall", "timeout"]
#: Seconds between looks at a guest (and its progress marker).
POLL = 10.0


@dataclass(frozen=True)
class Waited:
    rc: int | None  # the exit status; None when stopped
    stopped: Why | None  # why it was stopped


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, 9)


def wait(proc: subprocess.Popen[bytes], progress: Callable[[], object], *, began: float,
         timeout: float, boot_limit: float, stall: float | None = None,
         poll: float | None = None) -> Waited:
    """Wait for ``proc`` (started at monotonic ``began`` with ``start_new_session``).

    ``progress()`` is ``None`` until the guest's script has begun, then a value that
    changes whenever it gets on (a results file's modification time, say)."""
    seen: object = None
    changed = began
    every = POLL if poll is None else poll
    while True:
        try:
            return Waited(proc.wait(timeout=every), None)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        mark = progress()
        if mark is not None and mark != seen:
            seen, changed = mark, now
        why: Why | None = None
        if seen is None and now - began >= boot_limit:
            why = "boot"
        elif stall is not None and now - changed >= stall:
            why = "stall"
        elif now - began >= timeout:
            why = "timeout"
        if why is not None:
            kill_group(proc.pid)
            proc.wait()
            return Waited(None, why)


def mtime(path: os.PathLike[str] | str) -> Callable[[], float | None]:
    """A :func:`wait` progress marker: ``path``'s modification time, None while absent."""
    def marker() -> float | None:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return None
    return marker
