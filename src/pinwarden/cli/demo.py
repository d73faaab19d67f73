"""``pinwarden demo``: the main job, shown with the commands a user would type.

On a root host where libvirt answers, it defines two tiny diskless domains (one exclusive,
one shared), starts both through pinwarden, shows ``status`` and ``audit``, then stops and
undefines them (``--keep`` leaves them running).  Anywhere else it plans the same kind of
domains on a bundled example host (16 CPUs, 2 NUMA nodes, ``isolcpus``) with a throw-away
lease database, so nothing on the machine changes.

Every step runs through :func:`pinwarden.cli.main`, exactly as typed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEMO_EXCLUSIVE = "pwdemo-exclusive"
DEMO_SHARED = "pwdemo-shared"

_DOMAIN = """<domain type='{type}'>
  <name>{name}</name>
  <metadata>
    <pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='{exclusive}'{extra}/>
  </metadata>
  <memory unit='MiB'>64</memory>
  <vcpu placement='static'>{vcpus}</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"""


def domain_xml(name: str, *, exclusive: bool, vcpus: int, extra: str = "",
               virt_type: str = "kvm") -> str:
    """A tiny diskless domain (boots to firmware): no disks, no NICs, no display."""
    return _DOMAIN.format(type=virt_type, name=name, exclusive="yes" if exclusive else "no",
                          vcpus=vcpus, extra=extra)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "demo", parents=[common],
        help="start an exclusive and a shared tiny VM and show the host (or plan them on "
             "an example host when libvirt is not available)",
        description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--connect", "-c", metavar="URI", default=None,
                   help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, [libvirt] uri, "
                        "qemu:///system)")
    p.add_argument("--offline", action="store_true",
                   help="plan on the bundled example host even where libvirt is available")
    p.add_argument("--keep", action="store_true",
                   help="leave the demo domains defined and running")
    p.add_argument("--dry-run", action="store_true",
                   help="say what the demo would do and plan its domains, changing nothing")

    def handler(args: argparse.Namespace) -> int:
        if args.json:  # (it printed its text and exited 0: CLI hunt)
            p.error("--json does not apply: the demo is a walk-through for people; each "
                    "of its commands takes --json")
        return run(args)

    p.set_defaults(handler=handler)


@contextlib.contextmanager
def example_host() -> Iterator[Path]:
    """The bundled example root, as a real directory."""
    from importlib import resources

    with resources.as_file(resources.files("pinwarden") / "data" / "example-host") as path:
        yield path


def _step(*argv: str) -> int:
    import shlex

    from pinwarden.cli import main

    print(f"\n$ pinwarden {shlex.join(argv)}", flush=True)
    status = main(list(argv))
    sys.stdout.flush()
    return status


def _libvirt_unavailable(uri: str) -> str | None:
    """Why the live demo cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "not running as root"
    if importlib.util.find_spec("libvirt") is None:
        return ("the libvirt Python binding is not installed (the distribution's "
                "python3-libvirt in a venv with --system-site-packages, or pip install "
                "libvirt-python)")
    from pinwarden.errors import PinwardenError
    from pinwarden.libvirt import connect

    try:
        conn = connect.open_connection(uri)
    except PinwardenError as exc:
        return exc.message
    conn.close()
    return None


def _virt_type() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


def run(args: argparse.Namespace) -> int:
    from pinwarden.cli.common import config_of
    from pinwarden.config import libvirt_uri

    uri = libvirt_uri(args.connect, config_of(args))
    why = "--offline given" if args.offline else _libvirt_unavailable(uri)
    if why is None:
        return _live(args, uri)
    print(f"pinwarden demo: planning on the bundled example host ({why})")
    return _offline(args)


def _common(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if args.config:
        out += ["--config", args.config]
    if args.state_dir:
        out += ["--state-dir", args.state_dir]
    return out


def _offline(args: argparse.Namespace) -> int:
    import tempfile

    with contextlib.ExitStack() as stack:
        root = stack.enter_context(example_host())
        state = stack.enter_context(tempfile.TemporaryDirectory(prefix="pinwarden-demo-"))
        work = Path(state)
        exclusive = work / f"{DEMO_EXCLUSIVE}.xml"
        exclusive.write_text(domain_xml(DEMO_EXCLUSIVE, exclusive=True, vcpus=4,
                                        extra=" threads='isolate'"))
        shared = work / f"{DEMO_SHARED}.xml"
        shared.write_text(domain_xml(DEMO_SHARED, exclusive=False, vcpus=2))
        where = ["--root", str(root), "--state-dir", str(work / "state")]
        if args.config:
            where += ["--config", args.config]
        for argv in (["host", *where],
                     ["reserve", *where, str(exclusive)],
                     ["plan", *where, str(shared)],
                     ["status", *where]):
            if _step(*argv) != 0:
                return 1
    return 0


def _live(args: argparse.Namespace, uri: str) -> int:
    import tempfile

    import libvirt

    virt_type = _virt_type()
    common = [*_common(args), "--connect", uri]
    steps = ("define", "define", "start", "start", "status", "audit")
    verb = "would change" if args.dry_run else "changes"
    end = " (--keep: it leaves them running)" if args.keep else ""
    print(f"pinwarden demo: libvirt answers at {uri}, so the demo {verb} this host: it "
          f"defines two tiny diskless domains, {DEMO_EXCLUSIVE} (exclusive) and "
          f"{DEMO_SHARED} (shared), starts them through pinwarden (leasing a CPU: cpuset "
          f"cgroups and IRQ affinities change while it runs), shows status and audit, then "
          f"stops and undefines them{end}; 'pinwarden demo --offline' plans on an example "
          f"host instead", flush=True)
    with tempfile.TemporaryDirectory(prefix="pinwarden-demo-") as tmp:
        files = {}
        for name, exclusive in ((DEMO_EXCLUSIVE, True), (DEMO_SHARED, False)):
            path = Path(tmp) / f"{name}.xml"
            path.write_text(domain_xml(name, exclusive=exclusive, vcpus=1,
                                       virt_type=virt_type))
            files[name] = path
        if args.dry_run:  # read-only steps only; the others are listed
            status = 0
            for argv in (["host", *_common(args)],
                         ["plan", *_common(args), str(files[DEMO_EXCLUSIVE])],
                         ["plan", *_common(args), str(files[DEMO_SHARED])]):
                status = status or _step(*argv)
            print(f"\ndry run: would then run pinwarden {', '.join(steps)} and remove the "
                  f"domains; nothing was changed")
            return status
        conn = libvirt.open(uri)
        for name in files:  # a previous --keep run: start from scratch
            _remove(conn, name, common)
        try:
            status = 0
            for argv in (["host", *_common(args)],
                         ["define", *common, str(files[DEMO_EXCLUSIVE])],
                         ["define", *common, str(files[DEMO_SHARED])],
                         ["start", *common, DEMO_EXCLUSIVE],
                         ["start", *common, DEMO_SHARED],
                         ["status", *_common(args)],
                         ["audit", *_common(args)]):
                status = _step(*argv)
                if status != 0:
                    break
        finally:
            if not args.keep:
                print("\n(removing the demo domains; --keep leaves them running)")
                for name in (DEMO_SHARED, DEMO_EXCLUSIVE):
                    _remove(conn, name, common)
            conn.close()
    return status


def _remove(conn: Any, name: str, common: list[str]) -> None:
    """Stop (through pinwarden, freeing its leases) and undefine a demo domain."""
    import libvirt

    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        _step("stop", *common, name)
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()
