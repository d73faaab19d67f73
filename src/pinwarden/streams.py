"""Standard output and error as the command line uses them: printing never fails for the
terminal's encoding, and a reader of stdout that went away is no error.

Only modules Python's start loaded (``select`` once a write failed): the quick path of
``pinwarden start`` (:mod:`pinwarden.quickstart`) prints through this module without
loading the command line.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # (typing is one import more on the quick start's path)
if TYPE_CHECKING:
    from typing import Any, TextIO


def safe_streams() -> None:
    """Printing never fails for the terminal's encoding: a character the locale cannot show
    (a domain named in Unicode under ``LANG=en_US.ISO-8859-1`` or ``PYTHONIOENCODING=ascii``;
    the ``·`` of the CPU map) is written as an escape (``\\u2603``).  Else the error came
    after the change was made, and a committed reserve or release read as a bug (exit 70).

    A standard stream closed when the command started (``>&-``: Python then has None for
    it) gets /dev/null: printing to it failed every command with an internal error, after
    a reserve or release had been committed (hunt); and a file opened later, the lease
    database, would have taken its descriptor, which ``pinwarden run``'s command and the
    hook's helpers inherit as their standard output."""
    if sys.stdin is None:  # (left None: reading it says it is closed)
        _devnull_on(0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            _devnull_on(fd)
            try:  # noqa: SIM105 (contextlib is one import more on every command)
                setattr(sys, name, open(fd, "w", closefd=False,  # noqa: SIM115
                                        errors="backslashreplace"))
            except OSError:
                pass
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:  # noqa: SIM105 (contextlib is one import more on every command)
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a detached or closed stream: nothing to print
                pass


class _Guarded:
    """stdout whose write errors other than a reader gone (``ENOSPC`` of ``> /dev/full``
    or a full disk, ``EIO``) are noted, not raised: the command runs to its end and says
    once that its output was lost (:func:`output_error`).  Raised, such an error ended a
    reserve or release that was already committed as "internal error … a bug", exit 70
    (CLI hunt)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                raise  # (the reader went away: the command line's own handling)
            except OSError as exc:
                self.error = exc
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._stream.flush()
            except BrokenPipeError:
                raise
            except OSError as exc:
                self.error = exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_stdout() -> None:
    """From here on, a failed write to stdout is noted (:func:`output_error`), not raised
    — for the command line, which says so at its end."""
    if sys.stdout is not None and not isinstance(sys.stdout, _Guarded):
        sys.stdout = _Guarded(sys.stdout)


def output_error() -> OSError | None:
    """The error that made stdout lose output since :func:`guard_stdout`, if any — once:
    the stream is usable again after (the next command of a process, in tests)."""
    stream = sys.stdout
    if not isinstance(stream, _Guarded) or stream.error is None:
        return None
    error, stream.error = stream.error, None
    return error


def _devnull_on(fd: int) -> None:
    """/dev/null on descriptor ``fd`` if it is closed."""
    try:
        os.fstat(fd)
        return  # open (something took it): left as it is
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_RDWR)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


def stdout_fd() -> int | None:
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a non-file (tests, capture)
        return None


def stdout_closed() -> bool:
    """Whether our stdout is a pipe (or socket) whose reader went away."""
    import select  # only once a write failed: the quick start path loads no more modules

    fd = stdout_fd()
    if fd is None:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _fd, events in poller.poll(0))


def drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush cannot fail too."""
    fd = stdout_fd()
    if fd is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def flush_or_drop() -> None:
    """Flush stdout; a reader that went away is no error (stdout is dropped), a broken
    pipe that is not our stdout's is raised."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_closed():
            raise  # some other pipe or socket: not the reader of our output
        drop_stdout()
