"""``pinwarden start NAME`` handed to the running daemon before the command line loads.

A served start (:mod:`pinwarden.libvirt.startserver`) still cost the command its own
imports (``argparse``, ``pathlib``, ``typing``, the configuration's TOML parser: about
20 ms of a 30 ms client here, issue #12) only to send one request and print the answer.
The console script therefore looks first: arguments of the plain form

    pinwarden start [--json] [--config FILE] [--state-dir DIR] NAME

(options in any order, ``--opt=value`` too) are sent as they are to the daemon's socket,
and the daemon resolves them as the command line would (:func:`resolve`): the
configuration file (default ``/etc/pinwarden/pinwarden.toml``), the state directory
(``--state-dir``, else ``PINWARDEN_STATE_DIR``, else the file's), the libvirt URI
(``LIBVIRT_DEFAULT_URI``, else the file's).  It serves the start only where the command
would do the same one (its own configuration, host root and state directory, as for a
start the command line sends); the answer is printed byte for byte as the command prints
it.  Anything else — another form, no daemon listening, a daemon that declines — goes to
the full command line, which reports usage errors, bad configuration files and URIs in
its own words, or starts the domain itself.

Finding the socket needs the state directory.  When only the configuration file could
name it, the file is read but not parsed: one that mentions ``state_dir`` (or has any
backslash, which a TOML key could hide it behind) goes to the full command line.

Like :mod:`pinwarden.console` this module imports nothing beyond what Python's start
loaded and the hook client (``_socket``, ``_json``).  Once the request is sent the start
is the daemon's: an answer lost on the way is an error, never a second start.
"""

import os
import sys
from stat import S_ISREG  # (loaded with os)

from pinwarden import streams
from pinwarden.libvirt import hookclient

#: ``pinwarden.config.DEFAULT_CONFIG`` and ``DEFAULT_STATE_DIR`` (tests check they agree;
#: importing that module would load ``pathlib`` and ``tomllib``).
DEFAULT_CONFIG = "/etc/pinwarden/pinwarden.toml"
DEFAULT_STATE_DIR = "/var/lib/pinwarden"
#: The options of the plain form that take a value.
_VALUED = ("--config", "--state-dir")
#: Exit statuses of :mod:`pinwarden.cli` (tests check they agree).
EXIT_ERROR = 1
EXIT_INTERNAL = 70


def parse(argv: list[str]) -> dict[str, object] | None:
    """The plain form's ``{"name", "json", "config", "state_dir"}`` from the arguments
    after ``pinwarden``; None for any other command line."""
    if not argv or argv[0] != "start":
        return None
    out: dict[str, object] = {"name": None, "json": False, "config": None,
                              "state_dir": None}
    words = iter(argv[1:])
    for word in words:
        if word == "--json" and out["json"] is False:
            out["json"] = True
            continue
        option, eq, value = word.partition("=")
        if option in _VALUED and out[option[2:].replace("-", "_")] is None:
            if not eq:
                value = next(words, "")
            if not value or value.startswith("-"):
                return None
            out[option[2:].replace("-", "_")] = value
            continue
        if word.startswith("-") or out["name"] is not None:
            return None
        out["name"] = word
    return out if out["name"] is not None else None


def state_dir(form: dict[str, object]) -> str | None:
    """The state directory the command line would use, as far as it can be told without
    parsing the configuration file (None: only parsing it would tell)."""
    given = form["state_dir"]
    if isinstance(given, str):
        return given
    env = os.environ.get("PINWARDEN_STATE_DIR")
    if env:
        return env
    path = form["config"] if isinstance(form["config"], str) else DEFAULT_CONFIG
    try:
        if not S_ISREG(os.stat(path).st_mode):
            # a pipe ('--config <(…)', /dev/stdin) is read once: read here, the command
            # line found it empty and started with the defaults (daemon hunt)
            return None
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except FileNotFoundError:
        return DEFAULT_STATE_DIR if form["config"] is None else None
    except OSError:
        return None
    return None if b"state_dir" in text or b"\\" in text else DEFAULT_STATE_DIR


def request(form: dict[str, object]) -> dict[str, object]:
    """The request for the daemon: the arguments as given, paths made absolute (the daemon
    has another working directory), and the environment variables the command line reads."""
    config, state = form["config"], form["state_dir"]
    return {"v": hookclient.PROTOCOL, "quick_start": {
        "name": form["name"], "json": form["json"],
        "config": os.path.abspath(config) if isinstance(config, str) else None,
        "state_dir": os.path.abspath(state) if isinstance(state, str) else None,
        "env_state_dir": os.path.abspath(env) if (env := os.environ.get(
            "PINWARDEN_STATE_DIR")) else None,
        "env_uri": os.environ.get("LIBVIRT_DEFAULT_URI") or None}}


def run(argv: list[str]) -> int | None:
    """Serve ``pinwarden ARGV`` through the daemon: the exit status, after printing what
    the daemon answered; None when the full command line is to run it."""
    form = parse(argv)
    if form is None:
        return None
    where = state_dir(form)
    if where is None:
        return None
    try:
        answer = hookclient.hand_over(os.path.join(where, hookclient.SOCKET_NAME),
                                      request(form))
    except (OSError, ValueError, RecursionError) as exc:
        from pinwarden.cli import fail
        from pinwarden.errors import LibvirtError

        as_json = bool(form["json"])

        class Args:
            json = as_json

        return fail(Args(), LibvirtError.daemon_lost(  # type: ignore[arg-type]
            str(form["name"]), exc))
    return answered(answer)


def answered(answer: dict[str, object] | None) -> int | None:
    """The daemon's answer to a start (a quick one or ``pinwarden start``'s): None when it
    did not take the start (the command line starts the domain itself), else its exit
    status, after printing what it said."""
    if answer is None or "fallback" in answer:
        return None
    out, err, rc = answer.get("stdout"), answer.get("stderr"), answer.get("rc")
    _print(out if isinstance(out, str) else "", err if isinstance(err, str) else "")
    return rc if isinstance(rc, int) else EXIT_INTERNAL


def _print(out: str, err: str) -> None:
    """Print as the command line prints a served start: stdout, then stderr."""
    streams.safe_streams()
    try:
        sys.stdout.write(out)
    except BrokenPipeError:
        if not streams.stdout_closed():
            raise
        streams.drop_stdout()
    else:
        streams.flush_or_drop()
    sys.stderr.write(err)
