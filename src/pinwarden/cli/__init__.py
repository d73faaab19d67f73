"""Command line: ``pinwarden [GLOBAL OPTIONS] COMMAND [OPTIONS]``.

Conventions every command follows:

* the global options (``--root``, ``--state-dir``, ``--config``, ``--json``) are accepted
  before *or* after the command name; given twice, the later one wins;
* ``--json`` prints machine output on stdout, one document in the style of
  :mod:`pinwarden.jsonout` (``"schema": 1`` first, CPU lists as ``"0-3,8"``, ISO 8601 times);
* exit status (:data:`EXIT_OK` …): 0 success; 1 refusal or error, with
  ``pinwarden: error: …`` on stderr (and, with ``--json``, ``{"schema": 1, "error":
  {"code": …, "message": …}}`` on stdout); 2 usage error, with the command's own usage;
  ``audit`` 0 clean, 1 intruders, 2 could not check; ``run`` passes its command's status
  through; 70 an internal error (a bug: one line on stderr, ``PINWARDEN_DEBUG=1`` shows the
  traceback) — a user error never produces a traceback; 130 interrupted (Ctrl-C);
* a reader that closes the pipe early (``pinwarden status | head -1``) is not an error: exit 0
  (or the command's status when it had finished), nothing on stderr.

Each command lives in its own module exposing ``register(subparsers, common)``; the module
list below is the only place that knows them all.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pinwarden import __version__
from pinwarden.errors import PinwardenError
from pinwarden.streams import (
    drop_stdout,
    guard_stdout,
    output_error,
    safe_streams,
    stdout_closed,
)

#: Command modules, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "pinwarden.cli.host",
    "pinwarden.cli.placement",
    "pinwarden.cli.run",
    "pinwarden.cli.vm",
    "pinwarden.cli.audit",
    "pinwarden.cli.config",
    "pinwarden.cli.metrics",
    "pinwarden.cli.completion",
    "pinwarden.cli.demo",
)

EXIT_OK = 0
EXIT_ERROR = 1  # a refusal, bad input, a host or ledger that cannot be used
EXIT_USAGE = 2  # argparse's own status for a usage error
EXIT_INTERNAL = os.EX_SOFTWARE  # 70: a bug
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it

#: Set (to anything but "" or "0") to see the traceback of an internal error.
DEBUG_ENV = "PINWARDEN_DEBUG"

EPILOG = """\
exit status: 0 success; 1 refusal or error; 2 usage error; audit: 0 clean,
1 intruders, 2 could not check; run: the command's own; 70 internal error (a bug);
130 interrupted (Ctrl-C).
Global options work before or after COMMAND; see "pinwarden COMMAND --help" for each
command and "pinwarden config" for the effective settings and their sources."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose unknown-argument errors name the (sub)command they are in.

    argparse leaves arguments a subcommand does not know for the top-level parser, which then
    complains with the top-level usage; here the parser that met them does.
    """

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every option added (to check its metavar), and the
        # default one loads shutil (with bz2, lzma, fnmatch) for the terminal width: the
        # same width, found the way shutil finds it.
        return self.formatter_class(prog=self.prog, width=help_width())  # type: ignore[call-arg]


def help_width() -> int:
    """argparse's default width, ``shutil.get_terminal_size().columns - 2``, without
    loading shutil: ``$COLUMNS`` when positive, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
        columns = columns or 80
    return columns - 2


def _path(text: str) -> str:
    """A path option's value: never empty (an empty variable in a script would otherwise
    fall back to the default: the host's own lease database or configuration)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give a path, or leave the option out "
                                         "for the default")
    return text


#: The shortest and longest durations an option takes (a year: ``--interval 1e300``
#: overflowed the clock and ended the daemon with an internal error; ``1e-300`` spun it).
MIN_SECONDS, MAX_SECONDS = 0.01, 365 * 86400


def seconds(text: str) -> float:
    """A duration option's value: a number of seconds from :data:`MIN_SECONDS` to
    :data:`MAX_SECONDS` (``--interval 0`` made the daemon spin, a negative one ended it
    with an internal error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not MIN_SECONDS <= value <= MAX_SECONDS:  # (NaN fails both)
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number of seconds from {MIN_SECONDS:g} to {MAX_SECONDS} "
            "(a year)")
    return value


def common_parser(*, defaults: bool = True) -> argparse.ArgumentParser:
    """Options every command accepts, before or after the command name.

    The top-level parser gets them with their defaults; the commands get them with
    ``defaults=False`` (``argparse.SUPPRESS``): a command's parser then sets only what was
    given after the command name, and never overwrites a value given before it with its
    default.
    """
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument("--root", metavar="DIR", default=default("/"), type=_path,
                       help="read the host below DIR (a sysfs dump), default /")
    group.add_argument("--state-dir", metavar="DIR", default=default(None), type=_path,
                       help="lease database directory (default $PINWARDEN_STATE_DIR, "
                            "[ledger] state_dir, /var/lib/pinwarden)")
    group.add_argument("--config", metavar="FILE", default=default(None), type=_path,
                       help="configuration file (default /etc/pinwarden/pinwarden.toml)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="machine-readable output (one JSON document, \"schema\": 1)")
    return common


class _Unbuilt(Exception):
    """The command line names a command whose parser :func:`build_parser` left out."""


class _StandIn:
    """Takes the place of a command's parser that was not built: whatever ``register()``
    does to it is ignored, and parsing with it asks for the whole parser instead."""

    def __getattr__(self, name: str) -> Any:
        def ignored(*args: Any, **kwargs: Any) -> _StandIn:
            return self
        return ignored

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        raise _Unbuilt


class _OneCommand(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands of which only ``only``'s parser is built; every other command is listed
    (``--help``, the choices of a usage error) exactly as usual, with a :class:`_StandIn`
    for its parser.  Building the parsers of every command (about 25 parsers and 80
    options) is most of what the command line costs before a command runs."""

    def __init__(self, *args: Any, only: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._only = only

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if name == self._only:
            return super().add_parser(name, **kwargs)
        aliases = kwargs.pop("aliases", ())
        if "help" in kwargs:
            self._choices_actions.append(
                self._ChoicesPseudoAction(name, aliases, kwargs.pop("help")))
        stand_in = _StandIn()
        for key in (name, *aliases):
            self._name_parser_map[key] = stand_in
        return stand_in


def build_parser(*, whole: bool = True, only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: with every command's parser (``whole``), or with only the
    parser of the command ``only`` (None: none), the others listed but not built — enough
    for that command, and for ``pinwarden --help``."""
    parser = Parser(
        prog="pinwarden", parents=[common_parser()], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Exclusive physical CPUs for virtual machines and processes.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    lazy: dict[str, Any] = {} if whole else {"action": _OneCommand, "only": only}
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, **lazy)
    common = common_parser(defaults=False)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet
                continue
            raise
        module.register(sub, common)
    return parser


def print_json(data: Mapping[str, Any]) -> None:
    """Print one ``--json`` document (``"schema"`` added, see :mod:`pinwarden.jsonout`)."""
    from pinwarden import jsonout

    sys.stdout.write(jsonout.dumps(data))
    sys.stdout.write("\n")


def printable(text: str) -> str:
    """``text`` as it is when it prints as plain text, else quoted with its control
    characters escaped (as ``status`` shows names): a domain name may hold a carriage
    return or an escape sequence that would rewrite the terminal."""
    return text if text.isprintable() else repr(text)


def fail(args: argparse.Namespace | None, exc: PinwardenError) -> int:
    message = exc.message.replace("\n", " ")
    print(f"pinwarden: error: {message}", file=sys.stderr)  # first: stdout may be closed
    if args is not None and getattr(args, "json", False):
        print_json({"error": {"code": exc.code, "message": message}})
    return EXIT_ERROR


def internal_error(args: argparse.Namespace | None, exc: BaseException) -> int:
    """The last resort: one line naming the exception, exit 70.  A libvirt error no call
    site put words to (libvirtd gone between two calls: "Cannot write data: Broken
    pipe") is libvirt's failure, not pinwarden's: said as an error, exit 1 (hunt)."""
    if type(exc).__name__ == "libvirtError" and type(exc).__module__ == "libvirt":
        from pinwarden.errors import LibvirtError
        from pinwarden.libvirt.connect import message_of

        return fail(args, LibvirtError(f"libvirt failed: {message_of(exc)} (is libvirtd "
                                       f"running? try again once it is)"))
    text = " ".join(str(exc).split())
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    print(f"pinwarden: internal error: {what} (a bug: please report it; {DEBUG_ENV}=1 shows "
          f"the traceback)", file=sys.stderr)
    if args is not None and getattr(args, "json", False):
        try:
            print_json({"error": {"code": "internal", "message": what}})
            sys.stdout.flush()
        except OSError:  # stdout itself may be what broke
            drop_stdout()
    return EXIT_INTERNAL


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as done:  # --help, --version and usage errors print, then exit
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            if not stdout_closed():
                raise
            drop_stdout()
        lost = output_error()
        if lost is not None and not done.code:
            print(f"pinwarden: error: cannot write to standard output: "
                  f"{lost.strerror or lost}", file=sys.stderr)
            raise SystemExit(EXIT_ERROR) from None
        raise


def _run(args: argparse.Namespace) -> int:
    status: int | None = None
    try:
        try:
            status = int(args.handler(args) or 0)
        except PinwardenError as exc:
            status = EXIT_ERROR
            fail(args, exc)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
    except BrokenPipeError:
        if not stdout_closed():
            raise  # some other pipe or socket: not the reader of our output
        drop_stdout()
        if status is None:  # (a command that finished before its output failed says so)
            status = int(getattr(args, "finished_status", EXIT_OK))
        return status
    lost = output_error()
    if lost is not None:
        # what the command did stands (a reserve or release committed): only its output
        # was lost, which a script must not take for success either
        print(f"pinwarden: error: cannot write to standard output: {lost.strerror or lost} "
              f"(the command itself ran to its end; its output was lost)", file=sys.stderr)
        # (a command whose 1 means something else has a status of its own for it: audit's
        # 1 is "intruders found", which a lost clean report was taken for)
        return status or int(getattr(args, "output_lost_status", EXIT_ERROR))
    return status


#: Global options that take a value (``--root DIR``): the word after them is no command.
_VALUE_OPTIONS = ("--root", "--state-dir", "--config")


def _command_word(argv: Sequence[str]) -> str | None:
    """The command the arguments name, as far as a quick look tells (a wrong guess only
    costs building the whole parser: :func:`_parse_args`)."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return None
        if word in _VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with the parser of the command named alone, else with the whole parser."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        return _parse(build_parser(whole=False, only=_command_word(words)), words)
    except _Unbuilt:
        return _parse(build_parser(), words)


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    safe_streams()
    guard_stdout()
    try:
        args = _parse_args(argv)
        return _run(args)
    except KeyboardInterrupt as exc:
        print(f"pinwarden: interrupted {exc}".rstrip(), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _interrupted(exc):  # Ctrl-C inside a class body Python wraps (__set_name__)
            print("pinwarden: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if _debug():
            raise
        return internal_error(args, exc)


def _interrupted(exc: BaseException) -> bool:
    """Whether a ``KeyboardInterrupt`` is what ``exc`` wraps (its causes and contexts):
    Python turns one raised while it creates a class (``__set_name__``, as a lazily
    imported command module is loaded) into a ``RuntimeError``."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def entry() -> None:
    try:
        status = main()
    finally:
        # The process ends here (also after --help: argparse exits).  The interpreter's
        # last garbage collection would walk every object the imports made (several
        # milliseconds, most of a short command's exit); whatever pinwarden opened is
        # closed by now, so it is skipped.
        gc.freeze()
    sys.exit(status)
