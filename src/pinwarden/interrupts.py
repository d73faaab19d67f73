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


def _default(sig: int, handler: Handler) -> bool:
    return handler is signal.SIG_DFL or (sig == signal.SIGINT
                                          and handler is signal.default_int_handler)


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
    try:
        yield
        failed = False
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        ending = [sig for sig in pending if sig != signal.SIGINT]
        if ending:
            os.kill(os.getpid(), ending[0])  # the default action: the process ends here
        if pending and not failed:
            raise InterruptedAfterChange()
