"""The ``pinwarden`` console script.

A Ctrl-C that lands while Python imports the command line (the first ~20 ms of every
command) ends it the way one anywhere else does, ``pinwarden: interrupted`` and exit 130,
not with an import traceback.  Nothing has been read or changed by then, so the process
simply ends.  This module imports only what Python's start-up already loaded (``os``; the
built-in ``_signal``, not ``signal``, which imports ``enum`` and more), so the window left
is Python's own start-up.

``pinwarden start NAME`` in its plain form goes to a running daemon from here, before the
command line loads (:mod:`pinwarden.quickstart`).
"""

import os

_signal = __import__("_signal")  # built in, loaded at start-up; typeshed has no stub

#: ``pinwarden.cli.EXIT_INTERRUPTED`` (this module must not import the command line).
EXIT_INTERRUPTED = 130


def _interrupted_early(_signum: int, _frame: object) -> None:
    os.write(2, b"pinwarden: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def entry() -> None:
    # Only where Python itself would raise KeyboardInterrupt: a SIGINT that was ignored when
    # the process started (a background job of a script, nohup) stays ignored.
    python_own = _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
    if python_own:
        _signal.signal(_signal.SIGINT, _interrupted_early)
    import sys

    if sys.argv[1:2] == ["start"]:  # handed to a running daemon, when it takes it
        from pinwarden.quickstart import run as quick

        status = quick(sys.argv[1:])
        if status is not None:
            sys.exit(status)
    from pinwarden.cli import entry as run

    if python_own:  # main() reports a Ctrl-C from here on (and undoes what it began)
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    run()
