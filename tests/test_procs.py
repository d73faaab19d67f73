"""Process identity (pid + start time) against real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pinwarden import procs


def _wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_parse_stat_comm_with_spaces_and_parentheses() -> None:
    line = ("4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 "
            "987654 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0")
    stat = procs.parse_stat(line)
    assert stat.pid == 4242
    assert stat.comm == "a) b (c)"
    assert stat.state == "S"
    assert stat.ppid == 1
    assert stat.start_time == 987654
    assert stat.processor == 3
    assert not stat.kernel_thread


def test_parse_stat_kernel_thread_flag_and_garbage() -> None:
    line = ("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 "
            "5 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 0 0 0 0")
    assert procs.parse_stat(line).kernel_thread
    with pytest.raises(ValueError):
        procs.parse_stat("not a stat line")
    with pytest.raises(ValueError):
        procs.parse_stat("12 (short) S 1 2")


def test_real_kernel_thread_and_own_process() -> None:
    kthreadd = procs.read_stat(2)
    assert kthreadd is not None and kthreadd.kernel_thread
    me = procs.read_stat(os.getpid())
    assert me is not None and not me.kernel_thread
    assert me.ppid == os.getppid()


def test_real_comm_with_spaces_and_parentheses() -> None:
    code = ("import sys, time; open('/proc/self/comm', 'w').write('x) y (z'); "
            "print('ready', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        stat = procs.read_stat(proc.pid)
        assert stat is not None
        assert stat.comm == "x) y (z"
        assert stat.ppid == os.getpid()
        assert stat.state in "RS"
        assert procs.start_time(proc.pid) == stat.start_time
    finally:
        proc.kill()
        proc.wait()


def test_alive_then_gone(child: subprocess.Popen[bytes]) -> None:
    start = procs.start_time(child.pid)
    assert start is not None
    assert procs.alive(child.pid, start)
    assert procs.alive(child.pid, None)
    assert not procs.alive(child.pid, start + 1)  # a different process with this pid
    child.kill()
    child.wait()
    assert not procs.alive(child.pid, start)
    assert procs.start_time(child.pid) is None
    assert not procs.alive(0, None)
    assert not procs.alive(-5, None)


def test_zombie_is_not_alive(child: subprocess.Popen[bytes]) -> None:
    start = procs.start_time(child.pid)
    assert start is not None
    os.kill(child.pid, signal.SIGKILL)  # not reaped: stays a zombie until wait()
    _wait_for(lambda: (s := procs.read_stat(child.pid)) is not None and s.state == "Z",
              "the child to become a zombie")
    assert not procs.alive(child.pid, start)
    assert procs.start_time(child.pid) is None


def spawn_with_pid(pid: int, attempts: int = 200) -> subprocess.Popen[bytes] | None:
    """Start ``sleep`` with exactly ``pid`` (root: /proc/sys/kernel/ns_last_pid), or None
    when other processes on the host keep taking it first."""
    knob = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(attempts):
        knob.write_text(str(pid - 1))
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_pid_reuse_is_detected_by_start_time(child: subprocess.Popen[bytes]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to choose a pid (/proc/sys/kernel/ns_last_pid)")
    pid = child.pid
    start = procs.start_time(pid)
    assert start is not None
    child.kill()
    child.wait()
    time.sleep(0.02)  # make sure the new process starts on a later clock tick
    reused = spawn_with_pid(pid)
    assert reused is not None, f"could not get pid {pid} back for the reuse test"
    try:
        assert procs.alive(pid, None)  # the pid alone says "alive"...
        assert not procs.alive(pid, start)  # ...the start time says "another process"
        assert procs.start_time(pid) != start
    finally:
        reused.kill()
        reused.wait()



@pytest.mark.parametrize(("nspid", "gone"), [("NSpid:\t42\n", True),
                                             ("NSpid:\t42\t7\n", False)])
def test_a_namespace_is_gone_only_when_every_process_is_known_out_of_it(
        monkeypatch: pytest.MonkeyPatch, nspid: str, gone: bool) -> None:
    """``pid_namespace_gone`` from the host's namespace: a process whose namespace may not
    be looked at (ptrace rules: this machine's PID 1) is out of it when its status names
    one pid only (it is in the host's), and may be in it otherwise."""
    import builtins
    import io
    import os

    from pinwarden import procs

    if procs.pid_namespace() != procs.INIT_PID_NS:
        pytest.fail("runs in the host's PID namespace, as on CI")
    me = str(os.getpid())
    real_stat, real_open = os.stat, builtins.open

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if path == f"/proc/{me}/ns/pid":
            raise PermissionError(13, "Permission denied")
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    def fake_open(path: object, *args: object, **kwargs: object) -> object:
        if path == f"/proc/{me}/status":
            return io.BytesIO(nspid.encode())
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(procs.os, "stat", stat)
    monkeypatch.setattr(builtins, "open", fake_open)
    found = procs.pid_namespace_gone(1)  # (no namespace has inode 1)
    monkeypatch.undo()
    assert found is gone, nspid
