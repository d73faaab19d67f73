"""A PID namespace of a test's own (``unshare(1)``, root): a ``sleep`` as its PID 1."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pinwarden import procs


@contextlib.contextmanager
def pid_namespace() -> Iterator[int]:
    """A live PID namespace of its own (its inode) for the block; gone after it, once no
    process is left in it (``procs.pid_namespace_gone``)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and unshare(1) (util-linux), as on CI")
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "300"],
                             stderr=subprocess.DEVNULL)
    inner: list[str] = []
    try:
        deadline = time.monotonic() + 10
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        while not (inner := children.read_text().split()):
            assert time.monotonic() < deadline, "unshare never started its child"
            time.sleep(0.01)
        ns = os.stat(f"/proc/{inner[0]}/ns/pid").st_ino
        assert ns != procs.pid_namespace()
        yield ns
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
