"""``pinwarden start|stop|define|hook|daemon``: libvirt domains with exclusive CPUs.

Imports of the libvirt adapters are deferred to the handlers: ``pinwarden hook run`` runs
inside libvirtd's start path and must be quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinwarden.cli import Parser, fail, print_json, printable, seconds
from pinwarden.cli.common import config_of, manager_of, root_of, state_dir_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pinwarden.libvirt.start import Started
    from pinwarden.manager import Manager
    from pinwarden.model import HolderRef


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    virt = Parser(add_help=False)
    virt.add_argument("--connect", "-c", metavar="URI", default=None,
                      help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, [libvirt] uri, "
                           "qemu:///system)")

    p = subparsers.add_parser(
        "start", parents=[common, virt], help="start a libvirt domain with its planned CPUs",
        description="Plan the domain's CPUs, lease them if it is exclusive (re-pinning "
                    "running shared domains away), enforce the cgroups and start it with "
                    "the plan as its live definition. The stored definition is untouched.")
    p.add_argument("name", metavar="NAME", help="defined (persistent) domain")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, the cgroup writes and the libvirt calls the start "
                        "would make, in order, and change nothing")
    p.add_argument("--no-daemon", action="store_true",
                   help="start the domain from this process even when a pinwarden daemon "
                        "runs (default: the daemon, warm, does the same start)")
    p.set_defaults(handler=cmd_start)

    p = subparsers.add_parser(
        "stop", parents=[common, virt], help="stop a domain and free its leased CPUs",
        description="Destroy (or shut down) the domain, free its leases and shrink the "
                    "exclusive cgroups.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--graceful", action="store_true",
                   help="ACPI shutdown and wait, instead of destroying")
    p.add_argument("--timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="how long --graceful waits (default 60)")
    p.set_defaults(handler=cmd_stop)

    p = subparsers.add_parser(
        "define", parents=[common, virt], help="validate and define a domain from XML",
        description="Parse the XML, plan it against the current leases (dry run, nothing "
                    "leased) and define it with pinwarden's <metadata> (and, for exclusive "
                    "domains, the partition of their cgroup). Invalid XML, and XML this host "
                    "could not run even with nothing leased, is refused and nothing is "
                    "defined; XML that only the current leases keep from starting is "
                    "defined, saying why it cannot start now.")
    p.add_argument("file", metavar="FILE.xml", help="the domain XML ('-': standard input)")
    p.set_defaults(handler=cmd_define)

    hook = subparsers.add_parser(
        "hook", help="the libvirt hook (install it; libvirtd runs it)",
        description="Hold plain 'virsh start' to the leases through libvirt's hook scripts.")
    hook_sub = hook.add_subparsers(dest="hook_command", metavar="ACTION", required=True)
    p = hook_sub.add_parser(
        "install", parents=[common],
        help="write the drop-ins /etc/libvirt/hooks/qemu.d/pinwarden and lxc.d/pinwarden",
        description="Check that this pinwarden runs, then write small drop-in hook scripts "
                    "that exec it (libvirt >= 6.5 runs every script in "
                    "/etc/libvirt/hooks/qemu.d/). Another tool's hook is never touched. "
                    "libvirt notices a hook directory that did not exist only when its "
                    "daemon starts or reloads: 'systemctl reload libvirtd' afterwards "
                    "(modular daemons: virtqemud virtlxcd; install names those running).")
    p.add_argument("--hooks-dir", type=Path, default=None, metavar="DIR",
                   help="default /etc/libvirt/hooks (or PREFIX/etc/libvirt/hooks)")
    p.add_argument("--prefix", type=Path, default=None, metavar="DIR",
                   help="install below DIR (packaging, tests)")
    p.add_argument("--exe", default=None, metavar="PATH",
                   help="pinwarden executable the hooks run (default: this Python with "
                        "-m pinwarden.cli.vm, which loads only what the hook needs)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be written, write nothing")
    p.set_defaults(handler=cmd_hook_install)
    p = hook_sub.add_parser("uninstall", parents=[common], help="remove pinwarden's hooks")
    p.add_argument("--hooks-dir", type=Path, default=None, metavar="DIR")
    p.add_argument("--prefix", type=Path, default=None, metavar="DIR")
    p.set_defaults(handler=cmd_hook_uninstall)
    p = hook_sub.add_parser(
        "check", parents=[common], help="report the state of the installed hooks",
        description="For each driver: is pinwarden's hook installed, and does the command "
                    "it runs work. Exit 0 when every hook works, 1 otherwise.")
    p.add_argument("--hooks-dir", type=Path, default=None, metavar="DIR")
    p.add_argument("--prefix", type=Path, default=None, metavar="DIR")
    p.set_defaults(handler=cmd_hook_check)
    p = hook_sub.add_parser("ping", parents=[common],
                            help="answer that this pinwarden runs and loads its "
                                 "configuration and state directory (used by install "
                                 "and check)")
    p.set_defaults(handler=cmd_hook_ping)
    p = hook_sub.add_parser(
        "run", parents=[common], help="called by libvirtd (domain XML on stdin)",
        description="Entry point for libvirtd: DRIVER NAME OPERATION SUBOPERATION EXTRA.")
    p.add_argument("driver", choices=("qemu", "lxc"))
    p.add_argument("hook_args", nargs=argparse.REMAINDER, metavar="ARGS")
    p.set_defaults(handler=cmd_hook_run)
    p = hook_sub.add_parser(
        "give-back", parents=[common],
        help="give running shared domains back the CPUs a released lease took (the hook "
             "starts it)",
        description="Started by the hook when a domain's lease ended at 'release' while "
                    "running shared domains were re-pinned off its CPUs: waits for a "
                    "'pinwarden start' or 'stop' of that domain to finish, then re-pins them "
                    "to what they had, over the QEMU connection (logged to hook.log).")
    p.add_argument("driver", choices=("qemu", "lxc"), help="the released domain's driver")
    p.add_argument("name", help="the released domain's name")
    p.add_argument("uuid", help="the released domain's UUID ('' if it had none)")
    p.set_defaults(handler=cmd_hook_give_back)

    p = subparsers.add_parser(
        "daemon", parents=[common, virt],
        help="follow libvirt events: free leases of dead domains, adopt, report drift",
        description="Subscribe to libvirt lifecycle events and reconcile the leases with "
                    "the running domains; reconnects when libvirtd restarts. Logs to stderr.")
    p.add_argument("--interval", type=seconds, default=30.0, metavar="SECONDS",
                   help="full reconcile period besides events (default 30)")
    p.add_argument("--restore-drift", action="store_true",
                   help="re-pin domains whose live affinity drifted off their plan "
                        "(default: report only)")
    p.add_argument("--once", action="store_true", help="reconcile once and exit")
    p.add_argument("--metrics", metavar="HOST:PORT", default=None,
                   help="also serve the Prometheus metrics of 'pinwarden metrics' over HTTP "
                        "at HOST:PORT/metrics (e.g. 127.0.0.1:9848), fresh at every scrape")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(handler=cmd_daemon)


def uri_of(args: argparse.Namespace) -> str:
    """--connect, else LIBVIRT_DEFAULT_URI, else [libvirt] uri, else qemu:///system."""
    from pinwarden.config import libvirt_uri

    return libvirt_uri(getattr(args, "connect", None), config_of(args))


def cmd_start(args: argparse.Namespace) -> int:
    if not (args.dry_run or args.no_daemon):
        served = _served_start(args)
        if served is not None:
            return served
    from pinwarden.libvirt.start import preview_start, start

    if args.dry_run:
        with manager_of(args) as manager:
            seen = preview_start(manager, uri_of(args), args.name)
        if args.json:
            print_json(seen.to_json())
            return 0
        print_preview(seen.plan, seen.cgroup_writes, seen.libvirt_calls, seen.notes)
        return 0
    with manager_of(args) as manager:
        result = start(manager, uri_of(args), args.name)
    sys.stdout.write(start_report(result, args.json))
    return 0


def start_report(result: Started, as_json: bool) -> str:
    """What ``pinwarden start`` prints on success (also when the daemon did the start)."""
    if as_json:
        from pinwarden import jsonout

        return jsonout.dumps(result.to_json()) + "\n"
    plan = result.plan
    kind = f"exclusive on {plan.leased().named()}" if plan.exclusive else \
        f"shared on {plan.cpus().named()}"
    lines = [f"started {result.name} ({kind}), pid {result.pid}, cgroup /{result.cgroup}",
             *(f"  re-pinned {move}" for move in result.repins),
             *(f"note: {note}" for note in result.notes)]
    return "".join(f"{line}\n" for line in lines)


def _served_start(args: argparse.Namespace) -> int | None:
    """Hand the start to the daemon of this state directory, if one runs with this
    configuration and host root (:mod:`pinwarden.libvirt.startserver`): its exit status,
    after printing what it said; None when no daemon takes it (the command starts the
    domain itself).  Once the request is sent, the daemon owns the start: a lost answer is
    an error, never a second start."""
    from pinwarden import quickstart
    from pinwarden.errors import LibvirtError
    from pinwarden.libvirt import hookclient
    from pinwarden.libvirt.uri import check_uri

    config = config_of(args)
    state = state_dir_of(args)
    uri = uri_of(args)
    check_uri(uri, root=os.geteuid() == 0)  # as this user means it, not as the daemon would
    request = {"v": hookclient.PROTOCOL, "start": {"name": args.name, "uri": uri,
                                 "json": bool(args.json)},
               # paths absolute: the daemon has another working directory
               "rules": repr(config), "root": os.path.abspath(root_of(args)),
               "state_dir": os.path.abspath(state)}
    try:
        answer = hookclient.hand_over(str(state / hookclient.SOCKET_NAME), request)
    except (OSError, ValueError, RecursionError) as exc:
        raise LibvirtError.daemon_lost(args.name, exc) from None
    return quickstart.answered(answer)


def print_preview(plan: Any, writes: Sequence[str], calls: Sequence[str],
                  notes: Sequence[str]) -> None:
    """``--dry-run``: what would happen, in order (shared with ``run`` and ``demo``)."""
    where = f"lease {plan.leased().named()} exclusively" if plan.exclusive else \
        f"run on {plan.cpus().named()}, leasing nothing"
    print(f"dry run: {printable(plan.domain)} would {where}")
    for line in writes:
        print(f"  would {line}")
    for line in calls:
        print(f"  would {line}")
    for note in notes:
        print(f"note: {note}")
    print("nothing was changed")


def cmd_stop(args: argparse.Namespace) -> int:
    from pinwarden.libvirt.start import stop

    with manager_of(args) as manager:
        result = stop(manager, uri_of(args), args.name, graceful=args.graceful,
                      timeout=args.timeout)
    if args.json:
        print_json(result.to_json())
        return 0
    what = "stopped" if result.was_running else "was not running"
    freed = f"; freed {result.released.named()}" if result.released else ""
    print(f"{printable(result.name)} {what}{freed}")
    for move in result.given_back:
        print(f"  gave back {printable(str(move))}")
    for note in result.notes:
        print(f"note: {printable(note)}")
    return 0


def cmd_define(args: argparse.Namespace) -> int:
    from pinwarden.cli.placement import read_xml
    from pinwarden.libvirt.start import define

    xml = read_xml(args.file)  # ('-': stdin; the size refused over the limit, not read)
    with manager_of(args) as manager:
        result = define(manager, uri_of(args), xml)
    if args.json:
        print_json(result.to_json())
        return 0
    plan = result.plan
    where = f"would lease {plan.leased().named()}" if result.exclusive else \
        f"would run on {plan.cpus().named()}"
    print(f"defined {printable(result.name)} ({'exclusive' if result.exclusive else 'shared'}; "
          + (f"{where} now)" if result.not_now is None else
             f"{where} with nothing leased; it cannot start now: {result.not_now})"))
    for note in plan.notes:
        print(f"note: {note}")
    return 0


def _hooks_dir(args: argparse.Namespace) -> Path:
    from pinwarden.libvirt.hook import DEFAULT_HOOKS_DIR

    if args.hooks_dir is not None:
        return Path(args.hooks_dir)
    if args.prefix is not None:
        return Path(args.prefix) / DEFAULT_HOOKS_DIR.relative_to("/")
    return DEFAULT_HOOKS_DIR


def cmd_hook_install(args: argparse.Namespace) -> int:
    import os

    from pinwarden import procs
    from pinwarden.libvirt import hook

    state = Path(args.state_dir) if args.state_dir else None
    if state is None:
        env = os.environ.get("PINWARDEN_STATE_DIR")
        state = Path(env) if env else None
    config = Path(args.config) if args.config else None
    exe = args.exe or hook.default_executable()
    # the hook hands its calls to the daemon of the state directory it will use
    daemon_state = state if state is not None else config_of(args).state_dir
    done = hook.install(_hooks_dir(args), exe=exe,
                        state_dir=state.resolve() if state else None,
                        config=config.resolve() if config else None, dry_run=args.dry_run,
                        client=hook.default_client(),
                        socket=daemon_state.resolve() / hook.SOCKET_NAME)
    running = procs.running_named(hook.HOOK_DAEMON_NAMES) if done.created_dirs \
        else frozenset()
    if args.json:
        # (a new hook directory is read when a daemon starts: with none running nothing
        # needs a reload — it said true and named none: systemd-lab hunt)
        reload = list(hook.daemons_to_reload(running)) if done.created_dirs else []
        print_json({"installed": [str(p) for p in done.paths], "exec": done.command,
                    "replaced": [str(p) for p in done.removed],
                    "reload_needed": bool(reload), "reload": reload,
                    "dry_run": args.dry_run})
        return 0
    verb = "would install" if args.dry_run else "installed"
    for path in done.paths:
        print(f"{verb} {path} (runs {done.command} hook run)")
    for path in done.removed:
        print(f"{'would replace' if args.dry_run else 'replaced'} pinwarden's old hook {path}")
    if done.created_dirs:
        print(hook.reload_advice(running))
    return 0


def cmd_hook_uninstall(args: argparse.Namespace) -> int:
    from pinwarden.libvirt import hook

    removed = hook.uninstall(_hooks_dir(args))
    if args.json:
        print_json({"removed": [str(p) for p in removed]})
    else:
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print("no pinwarden hook was installed")
    return 0


def cmd_hook_check(args: argparse.Namespace) -> int:
    from pinwarden.libvirt import hook

    states = hook.check_installed(_hooks_dir(args))
    if args.json:
        print_json({"hooks": [{"driver": s.driver, "path": str(s.path),
                               "installed": s.installed, "problem": s.problem,
                               "command": s.command, "daemon": s.daemon} for s in states]})
    else:
        for s in states:
            state = "ok" if s.problem is None else s.problem
            print(f"{s.driver}: {s.path}: {state}" + (f" ({s.daemon})" if s.daemon else ""))
    return 0 if all(s.problem is None for s in states) else 1


def cmd_hook_ping(args: argparse.Namespace) -> int:
    from pinwarden import __version__

    # what 'hook run' loads with the same options: the configuration and the lease
    # database's location (an error here is one every hook call would fail with)
    with manager_of(args) as manager:
        manager.reader()
    if args.json:
        from pinwarden.cli import print_json

        print_json({"ok": True, "version": __version__})
    else:
        print(f"pinwarden hook ok {__version__}")
    return 0


def cmd_hook_run(args: argparse.Namespace) -> int:
    from pinwarden.config import DEFAULT_STATE_DIR
    from pinwarden.errors import PinwardenError
    from pinwarden.libvirt import hook

    stdin = sys.stdin.read() if sys.stdin is not None else ""
    try:
        manager = manager_of(args)
    except PinwardenError as exc:
        # the drop-in logs only that this command failed (at 'prepare'): why goes beside
        # it, into the log the drop-in writes to (the configuration cannot say where); the
        # drop-in adds no "pinwarden is broken or missing" to it (broken-pinwarden hunt)
        step = " ".join(printable(a) for a in args.hook_args[:2])
        hook.log_to(Path(args.state_dir) if args.state_dir else DEFAULT_STATE_DIR,
                    f"pinwarden: error: hook {args.driver} {step}: {exc.message}")
        if args.hook_args[1:2] == ["prepare"] and hook.asks_exclusive(stdin):
            exc = PinwardenError(f"exclusive domain {args.hook_args[0]!r} cannot get its "
                                 f"CPUs: {exc.message}", code=exc.code)
        fail(args, exc)
        return hook.EXPLAINED
    with manager:
        return hook.main_run(manager, args.driver, list(args.hook_args), stdin,
                             after_release=lambda holder: _leave_give_back(args, manager,
                                                                           holder),
                             rewrite=sys.stdout)


def _leave_give_back(args: argparse.Namespace, manager: Manager, holder: HolderRef) -> None:
    """Start ``pinwarden hook give-back`` for the lease of ``holder`` that this ``release``
    freed, detached (its own session, no stdio of libvirtd's), and return at once: libvirtd
    waits for the hook, and the give-back calls libvirt, which waits for the domain the hook
    runs for.  It runs this interpreter with this pinwarden first on its path (whatever
    installed it: a venv, a zipapp), and whatever it cannot say in ``hook.log`` itself (an
    interpreter that fails) goes there as its stderr."""
    import subprocess

    import pinwarden
    from pinwarden.libvirt import hook

    argv = [sys.executable, "-m", "pinwarden.cli.vm", "hook", "give-back",
            "--root", os.path.abspath(root_of(args)),
            "--state-dir", os.path.abspath(manager.state_dir),
            *(["--config", os.path.abspath(args.config)] if args.config else []),
            holder.driver, holder.name, holder.uuid or ""]
    top = os.path.dirname(os.path.dirname(os.path.abspath(pinwarden.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [top, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    try:
        with open(manager.state_dir / hook.HOOK_LOG, "ab") as log:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=log, start_new_session=True, cwd="/", env=env)
    except OSError as exc:
        hook.log_line(manager, f"pinwarden: warning: cannot start the give-back of the CPUs "
                               f"{holder.name!r} held ({exc.strerror or exc}); 'pinwarden "
                               f"stop' or the daemon gives them back")


def cmd_hook_give_back(args: argparse.Namespace) -> int:
    from pinwarden.libvirt import hook, pins
    from pinwarden.libvirt.uri import driver_of, uri_problem
    from pinwarden.model import domain_holder

    uri = uri_of(args)
    if driver_of(uri) != "qemu" or uri_problem(uri, root=os.geteuid() == 0) is not None:
        uri = "qemu:///system"  # only QEMU domains have pins pinwarden narrowed
    with manager_of(args) as manager:
        released = domain_holder(args.driver, args.name, args.uuid or None)
        pins.give_back_after_release(manager, uri, released,
                                     lambda line: hook.log_line(manager, f"pinwarden: {line}"))
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    import contextlib

    from pinwarden.daemonlock import one_daemon
    from pinwarden.libvirt.daemon import main

    with manager_of(args) as manager, \
            contextlib.nullcontext() if args.once else one_daemon(manager.state_dir):
        # (the lock first: a second daemon's metrics server said it served, or that the
        # port was taken, before its refusal named the running daemon: hunt N)
        if args.metrics is not None:
            _serve_metrics(args)
        return main(manager, uri_of(args), interval=args.interval,
                    restore=args.restore_drift, once=args.once, verbose=args.verbose)


def _serve_metrics(args: argparse.Namespace) -> None:
    from pinwarden import metrics
    from pinwarden.cli.metrics import gather
    from pinwarden.errors import InputError

    try:
        host, port = metrics.serve(args.metrics, lambda: gather(args))
    except ValueError as exc:
        raise InputError(f"--metrics: {exc}") from None
    except OSError as exc:
        raise InputError(f"--metrics {args.metrics}: cannot listen there: "
                         f"{exc.strerror or exc}") from None
    print(f"pinwarden: serving metrics at http://{host}:{port}/metrics", file=sys.stderr,
          flush=True)


def hook_main(argv: list[str] | None = None) -> int:
    """``python -m pinwarden.cli.vm hook run …``: what the installed hook scripts run.

    The same commands as ``pinwarden``, but only this module's: libvirtd waits for the hook
    on every start, and loading every other command would be most of its run time.
    """
    from pinwarden.cli import common_parser, fail, internal_error
    from pinwarden.errors import PinwardenError
    from pinwarden.streams import safe_streams

    safe_streams()
    parser = argparse.ArgumentParser(prog="pinwarden")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True),
             common_parser())
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PinwardenError as exc:
        return fail(args, exc)
    except Exception as exc:  # a bug: one line, exit 70 (the hook script lets shared
        return internal_error(args, exc)  # domains through, as for any broken pinwarden)


if __name__ == "__main__":
    sys.exit(hook_main())
