"""A PID namespace of a test's own (``unshare(1)``, root): a ``sleep`` as its PID 1, with
a ``/proc`` of its own."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pinwarden import procs
from pinwarden.record import record

#: Descriptors of the namespaces made, open until the test process ends: a namespace's
#: inode is free for the next one made on the host once nothing holds it, and the
#: syslab's and kernel lab's vng make theirs meanwhile, so "gone" read as "still there"
#: (a test saw its namespace "outlive its processes").  Held open, it keeps its inode,
#: with no process in it.
_HELD: list[int] = []
atexit.register(lambda: [os.close(fd) for fd in _HELD])


@record
class PidNamespace:
    ns: int  # its inode
    pid: int  # its PID 1 (a sleep), as the test's namespace numbers it

    def run(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``cmd`` inside it, with its /proc (``nsenter``)."""
        return subprocess.run(["nsenter", "--target", str(self.pid), "--pid", "--mount",
                               *cmd], capture_output=True, text=True, timeout=60, **kwargs)


@contextlib.contextmanager
def pid_namespace() -> Iterator[PidNamespace]:
    """A live PID namespace of its own for the block; after it no process is left there
    (``procs.pid_namespace_gone``), and its inode is no other namespace's."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.fail("needs root, unshare(1) and nsenter(1) (util-linux), as on CI")
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                              "sleep", "300"], stderr=subprocess.DEVNULL)
    inner: list[str] = []
    try:
        deadline = time.monotonic() + 10
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        while not (inner := children.read_text().split()):
            assert time.monotonic() < deadline, "unshare never started its child"
            time.sleep(0.01)
        _HELD.append(os.open(f"/proc/{inner[0]}/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
        ns = os.fstat(_HELD[-1]).st_ino
        assert ns != procs.pid_namespace()
        yield PidNamespace(ns, int(inner[0]))
    finally:
        for pid in inner:  # (unshare waits for it, and exits with it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            outer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            outer.kill()  # (--kill-child: its sleep goes with it)
            outer.wait()
    deadline = time.monotonic() + 10
    while not procs.pid_namespace_gone(ns):
        assert time.monotonic() < deadline, f"PID namespace {ns} outlived its processes"
        time.sleep(0.01)
