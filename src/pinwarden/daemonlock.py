"""One ``pinwarden daemon`` per state directory: the lock it holds while it runs
(``flock`` on :data:`DAEMON_LOCK`, its pid inside), and who holds it (``status``).

A second daemon for the same state directory (by hand, beside the service) ran on beside
the first, reconciling every event twice while only the first answered hook calls; it is
refused now.  ``daemon --once`` takes no lock and runs beside a daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pinwarden.errors import Refusal

log = logging.getLogger("pinwarden.daemon")

#: Held (``flock``) by the running daemon of a state directory, with its pid inside.
DAEMON_LOCK = "daemon.pid"


@contextlib.contextmanager
def one_daemon(state_dir: Path) -> Iterator[None]:
    """Hold the state directory's daemon lock while the block runs; a :class:`Refusal`
    naming the daemon that holds it.  Without a state directory to lock in (it cannot be
    made), the daemon runs as before and fails where it needs the ledger."""
    fd: int | None = None
    path = state_dir / DAEMON_LOCK
    writable = True
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        try:  # (a read-only state directory: the lock holds all the same, without a pid)
            fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        except OSError:
            log.warning("cannot lock %s (%s): another daemon would not be noticed",
                        path, exc.strerror or exc)
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + 1.0  # ('status' looks with a shared lock, briefly)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
            holder = _pid_in(fd)
            raise Refusal(
                f"another pinwarden daemon{f' (pid {holder})' if holder else ''} already "
                f"runs for {state_dir}: stop it first, or run 'pinwarden daemon --once' for "
                f"one pass beside it") from None
        if writable:
            os.ftruncate(fd, 0)
            # with its PID namespace: a pid of another is not one here (status said
            # "daemon: pid 1" of a daemon in a container: namespace hunt)
            os.pwrite(fd, f"{os.getpid()} {_namespace() or ''}".strip().encode() + b"\n", 0)
        try:
            yield
        finally:
            if writable:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def running(state_dir: Path) -> int | None:
    """The pid of the daemon running for ``state_dir`` (0: one runs, its pid unknown yet),
    None when none does.  Read only."""
    try:
        fd = os.open(state_dir / DAEMON_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or 0
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int | None:
    """The daemon's pid the file names, 0 when it is a pid of another PID namespace than
    this process's (not one here), None when it names none."""
    words = os.pread(fd, 64, 0).decode(errors="replace").split()
    if not words or not words[0].isdigit() or int(words[0]) <= 0:
        return None
    if len(words) > 1 and words[1].isdigit() and int(words[1]) != _namespace():
        return 0
    return int(words[0])


def _namespace() -> int | None:
    """This process's PID namespace (:func:`pinwarden.procs.pid_namespace`, not imported:
    status reads the lock without loading more than it needs)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
