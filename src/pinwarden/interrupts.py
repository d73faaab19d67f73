"""A signal that would end pinwarden in the middle of a host change waits until it is made.

Under the manager's lock pinwarden records leases and then writes cgroups, IRQ masks and
thread affinities.  The ledger's transactions are atomic and ``sync`` repairs a half-made
layout, but a Ctrl-C there could still leave the host half-changed until somebody runs it,
and one that lands after the commit made the command say it was interrupted when the change
was in fact made.  So, in the main thread, while the lock is held, SIGINT, SIGTERM and SIGHUP
— where their action is still Python's default — are held back:

* when the change is complete, a held SIGTERM or SIGHUP ends the process as it would have
  (the default action, re-sent), and a held SIGINT raises :class:`InterruptedAfterChange`,
  which the command line reports as an interruption *after* the change;
* when the change failed, its error goes on as it is (the interrupt adds nothing to it),
  and a held SIGTERM or SIGHUP still ends the process.

Handlers someone installed (the event daemon's, ``pinwarden run``'s forwarding) and ignored
signals are left alone, and so is every thread but the main one (Python runs signal
handlers there only).

A caller with more to undo than one held section (``pinwarden start``: a lease, then live
re-pins, then the domain) runs all of it within :func:`ending_unwinds`: there SIGTERM and
SIGHUP raise :class:`EndedAfterChange` wherever they land (after the change, in a held
section), so that the caller's ``except`` and ``finally`` clauses undo what it began, and
end the process as they would have once that is done.

A caller whose change must be undone before the process may end (``pinwarden run``: a
signal that lands while its CPUs are reserved must not leave them reserved for a command
that never ran) wraps it in :func:`ending_raises`: there a held SIGTERM or SIGHUP raises
:class:`EndedAfterChange` too, and the held signals stay blocked when the section ends, so
that the caller undoes its change and then unblocks them (they act then: the process ends
as it would have).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any] | int | None

#: Signals whose default action ends pinwarden.
HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class InterruptedAfterChange(KeyboardInterrupt):
    """SIGINT arrived while the host was being changed; the change was completed first."""

    def __str__(self) -> str:
        return ("after completing the change it had begun ('pinwarden status' shows the "
                "leases)")


class EndedAfterChange(InterruptedAfterChange):
    """SIGTERM or SIGHUP (``signum``) arrived while the host was being changed within
    :func:`ending_raises`; the change was completed first."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


_raising: list[bool] = []


@contextlib.contextmanager
def ending_raises() -> Iterator[None]:
    """Within the block, a held signal is raised after the change (SIGINT as
    :class:`InterruptedAfterChange`, SIGTERM and SIGHUP as :class:`EndedAfterChange`)
    instead of ending the process, and the held signals stay blocked from the end of a
    held section on: the caller unblocks them (``signal.pthread_sigmask``) once it has
    undone its change."""
    _raising.append(True)
    try:
        yield
    finally:
        _raising.pop()


def _unwind(number: int, _frame: FrameType | None) -> None:
    raise EndedAfterChange(number)


@contextlib.contextmanager
def ending_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP whose action is the default raise
    :class:`EndedAfterChange` (in a held section: once its change is made), and once the
    block has unwound — its ``except`` and ``finally`` clauses have undone what it began —
    end the process as they would have.  Only in the main thread (elsewhere, or with
    handlers of someone else's, nothing changes)."""
    previous: dict[signal.Signals, Handler] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if handler is signal.SIG_DFL:
            try:
                signal.signal(sig, _unwind)
            except ValueError:  # not the main thread
                break
            previous[sig] = handler
    try:
        yield
    except EndedAfterChange as exc:
        if exc.signum in previous:
            for number, handler in previous.items():
                signal.signal(number, handler)
            previous.clear()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [exc.signum])
            os.kill(os.getpid(), exc.signum)  # the default action: the process ends here
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _default(sig: int, handler: Handler) -> bool:
    return handler is signal.SIG_DFL or handler is _unwind or (
        sig == signal.SIGINT and handler is signal.default_int_handler)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold back the :data:`HELD` signals with their default action while the block runs."""
    pending: list[int] = []
    previous: dict[signal.Signals, Handler] = {}
    for sig in HELD:
        handler = signal.getsignal(sig)
        if _default(sig, handler):
            try:
                signal.signal(sig, lambda number, _frame: pending.append(number))
            except ValueError:  # not the main thread: signals are not delivered here
                break
            previous[sig] = handler
    failed = True
    raising = bool(_raising) and bool(previous)
    try:
        yield
        failed = False
    finally:
        if raising:  # from here the caller decides when they act (ending_raises)
            signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        for number, handler in previous.items():
            signal.signal(number, handler)
        ending = [sig for sig in pending if sig != signal.SIGINT]
        if ending and not raising:
            os.kill(os.getpid(), ending[0])  # the default action: the process ends here
        if ending and not failed:
            raise EndedAfterChange(ending[0])
        if pending and not failed:
            raise InterruptedAfterChange()
        if ending:  # the change failed: its error goes on; the signal waits, blocked
            os.kill(os.getpid(), ending[0])
