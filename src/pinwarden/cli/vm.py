"""``pinwarden start|stop|define|hook|daemon``: libvirt domains with exclusive CPUs.

Imports of the libvirt adapters are deferred to the handlers: ``pinwarden hook run`` runs
inside libvirtd's start path and must be quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinwarden.cli import print_json
from pinwarden.cli.common import config_of, root_of, state_dir_of

if TYPE_CHECKING:
    from pinwarden.libvirt.context import Context


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    virt = argparse.ArgumentParser(add_help=False)
    virt.add_argument("--connect", "-c", metavar="URI", default=None,
                      help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, [libvirt] uri, "
                           "qemu:///system)")

    p = subparsers.add_parser(
        "start", parents=[common, virt], help="start a libvirt domain with its planned CPUs",
        description="Plan the domain's CPUs, lease them if it is exclusive (re-pinning "
                    "running shared domains away), enforce the cgroups and start it with "
                    "the plan as its live definition. The stored definition is untouched.")
    p.add_argument("name", metavar="NAME", help="defined (persistent) domain")
    p.set_defaults(handler=cmd_start)

    p = subparsers.add_parser(
        "stop", parents=[common, virt], help="stop a domain and free its leased CPUs",
        description="Destroy (or shut down) the domain, free its leases and shrink the "
                    "exclusive cgroups.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--graceful", action="store_true",
                   help="ACPI shutdown and wait, instead of destroying")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long --graceful waits (default 60)")
    p.set_defaults(handler=cmd_stop)

    p = subparsers.add_parser(
        "define", parents=[common, virt], help="validate and define a domain from XML",
        description="Parse the XML, plan it against the current leases (dry run, nothing "
                    "leased) and define it with pinwarden's <metadata> (and, for exclusive "
                    "domains, the partition of their cgroup). Invalid or impossible XML is "
                    "refused and nothing is defined.")
    p.add_argument("file", metavar="FILE.xml", type=Path)
    p.set_defaults(handler=cmd_define)

    hook = subparsers.add_parser(
        "hook", help="the libvirt hook (install it; libvirtd runs it)",
        description="Hold plain 'virsh start' to the leases through libvirt's hook scripts.")
    hook_sub = hook.add_subparsers(dest="hook_command", metavar="ACTION", required=True)
    p = hook_sub.add_parser(
        "install", parents=[common],
        help="write /etc/libvirt/hooks/qemu and lxc",
        description="Write small hook scripts that exec this pinwarden. libvirtd looks for "
                    "hook scripts only when it starts: restart it afterwards.")
    p.add_argument("--hooks-dir", type=Path, default=None, metavar="DIR",
                   help="default /etc/libvirt/hooks (or PREFIX/etc/libvirt/hooks)")
    p.add_argument("--prefix", type=Path, default=None, metavar="DIR",
                   help="install below DIR (packaging, tests)")
    p.add_argument("--exe", default=None, metavar="PATH",
                   help="pinwarden executable the hooks run (default: this Python with "
                        "-m pinwarden.cli.vm, which loads only what the hook needs)")
    p.add_argument("--force", action="store_true", help="replace hooks that are not ours")
    p.set_defaults(handler=cmd_hook_install)
    p = hook_sub.add_parser("uninstall", parents=[common], help="remove pinwarden's hooks")
    p.add_argument("--hooks-dir", type=Path, default=None, metavar="DIR")
    p.add_argument("--prefix", type=Path, default=None, metavar="DIR")
    p.set_defaults(handler=cmd_hook_uninstall)
    p = hook_sub.add_parser(
        "run", parents=[common], help="called by libvirtd (domain XML on stdin)",
        description="Entry point for libvirtd: DRIVER NAME OPERATION SUBOPERATION EXTRA.")
    p.add_argument("driver", choices=("qemu", "lxc"))
    p.add_argument("hook_args", nargs=argparse.REMAINDER, metavar="ARGS")
    p.set_defaults(handler=cmd_hook_run)

    p = subparsers.add_parser(
        "daemon", parents=[common, virt],
        help="follow libvirt events: free leases of dead domains, adopt, report drift",
        description="Subscribe to libvirt lifecycle events and reconcile the leases with "
                    "the running domains; reconnects when libvirtd restarts. Logs to stderr.")
    p.add_argument("--interval", type=float, default=30.0, metavar="SECONDS",
                   help="full reconcile period besides events (default 30)")
    p.add_argument("--restore-drift", action="store_true",
                   help="re-pin domains whose live affinity drifted off their plan "
                        "(default: report only)")
    p.add_argument("--once", action="store_true", help="reconcile once and exit")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(handler=cmd_daemon)


def context(args: argparse.Namespace) -> Context:
    from pinwarden.config import libvirt_uri
    from pinwarden.libvirt.context import Context

    config = config_of(args)
    uri = libvirt_uri(getattr(args, "connect", None), config)
    return Context(config=config, root=root_of(args), state_dir=state_dir_of(args), uri=uri)


def cmd_start(args: argparse.Namespace) -> int:
    from pinwarden.libvirt.start import start

    result = start(context(args), args.name)
    if args.json:
        print_json(result.to_json())
        return 0
    plan = result.plan
    kind = f"exclusive on CPUs {plan.leased()}" if plan.exclusive else \
        f"shared on CPUs {plan.cpus()}"
    print(f"started {result.name} ({kind}), pid {result.pid}, cgroup /{result.cgroup}")
    for move in result.repins:
        print(f"  re-pinned {move}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from pinwarden.libvirt.start import stop

    result = stop(context(args), args.name, graceful=args.graceful, timeout=args.timeout)
    if args.json:
        print_json(result.to_json())
        return 0
    what = "stopped" if result.was_running else "was not running"
    freed = f"; freed CPUs {result.released}" if result.released else ""
    print(f"{result.name} {what}{freed}")
    return 0


def cmd_define(args: argparse.Namespace) -> int:
    from pinwarden.libvirt.start import define

    result = define(context(args), args.file)
    if args.json:
        print_json(result.to_json())
        return 0
    plan = result.plan
    where = f"would lease CPUs {plan.leased()}" if result.exclusive else \
        f"would run on CPUs {plan.cpus()}"
    print(f"defined {result.name} ({'exclusive' if result.exclusive else 'shared'}; "
          f"{where} now)")
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
    from pinwarden.libvirt import hook

    state = Path(args.state_dir) if args.state_dir else None
    if state is None:
        import os

        env = os.environ.get("PINWARDEN_STATE_DIR")
        state = Path(env) if env else None
    config = Path(args.config) if args.config else None
    done = hook.install(_hooks_dir(args), exe=args.exe or hook.default_executable(),
                       state_dir=state.resolve() if state else None,
                       config=config.resolve() if config else None, force=args.force)
    if args.json:
        print_json({"installed": [str(p) for p in done.paths], "exec": done.command,
                    "restart_needed": True})
    else:
        for path in done.paths:
            print(f"installed {path} (runs {done.command} hook run)")
        print("libvirtd reads its hook directory only at start-up: restart libvirtd "
              "(e.g. 'systemctl restart libvirtd') for the hooks to take effect")
    return 0


def cmd_hook_uninstall(args: argparse.Namespace) -> int:
    from pinwarden.libvirt import hook

    removed = hook.uninstall(_hooks_dir(args))
    if args.json:
        print_json({"removed": [str(p) for p in removed]})
    else:
        for path in removed:
            print(f"removed {path}")
        if removed:
            print("restart libvirtd: it still expects the hook scripts until then")
    return 0


def cmd_hook_run(args: argparse.Namespace) -> int:
    from pinwarden.libvirt import hook

    return hook.main_run(context(args), args.driver, list(args.hook_args), sys.stdin.read())


def cmd_daemon(args: argparse.Namespace) -> int:
    from pinwarden.libvirt.daemon import main

    return main(context(args), interval=args.interval, restore=args.restore_drift,
                       once=args.once, verbose=args.verbose)


def hook_main(argv: list[str] | None = None) -> int:
    """``python -m pinwarden.cli.vm hook run …``: what the installed hook scripts run.

    The same commands as ``pinwarden``, but only this module's: libvirtd waits for the hook
    on every start, and loading every other command would be most of its run time.
    """
    from pinwarden.cli import common_parser, fail
    from pinwarden.errors import PinwardenError

    parser = argparse.ArgumentParser(prog="pinwarden")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True),
             common_parser())
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PinwardenError as exc:
        return fail(args, exc)


if __name__ == "__main__":
    sys.exit(hook_main())
