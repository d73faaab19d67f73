"""The libvirt hook: ``/etc/libvirt/hooks/{qemu,lxc}`` → ``pinwarden hook run DRIVER …``.

libvirtd runs the hook for each lifecycle step of each domain, with the domain XML on stdin
and ``NAME OP SUBOP EXTRA`` as arguments (https://libvirt.org/hooks.html).  A non-zero exit
at ``prepare`` aborts the start and libvirt shows our stderr to the user — this is how a
plain ``virsh start`` is held to the leases:

* ``prepare``: shared domain → admitted only if its pins avoid every CPU leased to someone
  else (else exit 1 naming the holder); exclusive domain → its CPUs are leased (the same
  transaction as ``pinwarden start``, idempotent for a start pinwarden already planned) and
  the cgroup layout enforced *before* libvirt creates the domain's cgroup;
* ``started``: the QEMU process becomes the owner of the domain's leases;
* ``release``: the domain's leases are freed and the layout shrunk back.
* every other operation (``start``, ``stopped``, ``migrate``, ``restore``, ``reconnect``…)
  is let through untouched; nothing is ever written on stdout (libvirt would read it as
  replacement XML for ``migrate``/``restore``).

The hook never calls back into libvirt (libvirtd holds the domain lock while it runs) and
imports only what the operation needs.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pinwarden.errors import InputError, PinwardenError, Refusal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pinwarden.domain import DomainSpec
    from pinwarden.libvirt.context import Context
    from pinwarden.model import HolderRef, Lease, Plan
    from pinwarden.partition import Host

DRIVERS = ("qemu", "lxc")
MARKER = "# pinwarden libvirt hook"
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK_LOG = "hook.log"
#: pinwarden's metadata namespace (pinwarden.domain.PW_NS, not imported: the hook is lean).
PW_NAMESPACE = "urn:pinwarden:domain:1"  # warnings of hook runs libvirtd would not show anywhere

Action = Literal["admit", "own", "free", "ignore"]


_ACTIONS: dict[str, Action] = {"prepare": "admit", "started": "own", "release": "free"}


def action_for(op: str) -> Action:
    """What the hook does at libvirt operation ``op`` (pure)."""
    return _ACTIONS.get(op, "ignore")


# -- install ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Installed:
    paths: tuple[Path, ...]
    command: str  # what the scripts exec (before "hook run")


def hook_script(driver: str, exe: str | Sequence[str], *, state_dir: Path | None,
                config: Path | None) -> str:
    args = [*([exe] if isinstance(exe, str) else exe), "hook", "run"]
    if config is not None:
        args += ["--config", str(config)]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    args.append(driver)
    command = " ".join(shlex.quote(a) for a in args)
    after = "|".join(op for op, action in sorted(_ACTIONS.items()) if action != "admit")
    return (f"#!/bin/sh\n{MARKER} ({driver}); written by 'pinwarden hook install'.\n"
            f"# libvirtd runs it at every domain lifecycle step (domain XML on stdin);\n"
            f"# pinwarden admits or refuses the domain against the exclusive CPU leases.\n"
            f"# Only 'prepare' may fail (it refuses the start); a failure at a later step\n"
            f"# would make libvirt kill the domain, so those always exit 0.  Later steps\n"
            f"# concern exclusive domains only (they carry pinwarden's metadata), and\n"
            f"# steps pinwarden ignores end here: no Python start-up for them.\n"
            f"case \"$2\" in\n"
            f"  prepare) exec {command} \"$@\" ;;\n"
            f"  {after})\n"
            f"    xml=$(cat)\n"
            f"    case \"$xml\" in\n"
            f"      *{PW_NAMESPACE}*) printf '%s\\n' \"$xml\" | {command} \"$@\" || true ;;\n"
            f"    esac\n"
            f"    exit 0 ;;\n"
            f"  *) cat >/dev/null; exit 0 ;;\n"
            f"esac\n")


def default_executable() -> tuple[str, ...]:
    """This interpreter running the vm commands alone (``-m pinwarden.cli.vm``): the
    installed pinwarden, without loading every other command on each hook call."""
    return (sys.executable, "-m", "pinwarden.cli.vm")


def install(hooks_dir: Path, *, exe: str | Sequence[str], state_dir: Path | None,
            config: Path | None,
            drivers: tuple[str, ...] = DRIVERS, force: bool = False) -> Installed:
    """Write the hook scripts atomically; refuse to replace a hook that is not ours."""
    try:
        hooks_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {hooks_dir}: {exc.strerror}") from None
    written: list[Path] = []
    for driver in drivers:
        path = hooks_dir / driver
        if path.exists() and not force:
            try:
                current = path.read_text(errors="replace")
            except OSError as exc:
                raise InputError(f"cannot read {path}: {exc.strerror}") from None
            if MARKER not in current:
                raise Refusal(f"{path} exists and is not pinwarden's hook; merge it by hand "
                              f"or pass --force to replace it", code="foreign-hook")
        tmp = path.with_name(f".{driver}.pinwarden-tmp")
        try:
            tmp.write_text(hook_script(driver, exe, state_dir=state_dir, config=config))
            tmp.chmod(0o755)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        written.append(path)
    return Installed(tuple(written),
                     exe if isinstance(exe, str) else " ".join(shlex.quote(a) for a in exe))


def uninstall(hooks_dir: Path, drivers: tuple[str, ...] = DRIVERS) -> tuple[Path, ...]:
    removed = []
    for driver in drivers:
        path = hooks_dir / driver
        try:
            if MARKER in path.read_text(errors="replace"):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise InputError(f"cannot remove {path}: {exc.strerror}") from None
    return tuple(removed)


# -- run ----------------------------------------------------------------------------------

def _pid_file(driver: str, name: str) -> int | None:
    from pinwarden.libvirt.connect import read_pid

    return read_pid(driver, name)


def run(ctx: Context, driver: str, name: str, op: str, xml: str) -> None:
    """Handle one hook call; raise a :class:`PinwardenError` to refuse (``prepare`` only)."""
    action = action_for(op)
    if action == "ignore":
        return
    if action == "admit":
        _prepare(ctx, driver, name, xml)
    elif action == "own":
        _started(ctx, driver, name, xml)
    elif action == "free":
        _release(ctx, driver, name, xml)


def _spec(xml: str, name: str) -> DomainSpec:
    from pinwarden.domain import parse_domain

    try:
        return parse_domain(xml)
    except PinwardenError as exc:
        raise InputError(f"pinwarden cannot read the XML of domain {name!r}: "
                         f"{exc.message}") from None


def _holder(driver: str, name: str, spec: DomainSpec) -> HolderRef:
    from pinwarden.model import HolderRef

    return HolderRef(driver, spec.uuid or name, name)


def _prepare(ctx: Context, driver: str, name: str, xml: str) -> None:
    from pinwarden.policy import decide

    spec = _spec(xml, name)
    holder = _holder(driver, name, spec)
    host = ctx.host()
    with ctx.ledger() as ledger:
        if not spec.exclusive:
            leases = ledger.leases()
            plan = decide(spec, host, leases, driver=driver)
            _widen_for_pins(ctx, host, leases, plan)
            return
        expected = ctx.partition_of(holder)
        if spec.partition != expected:
            raise Refusal(
                f"exclusive domain {name!r} would start in partition "
                f"{spec.partition or '/machine'}, where its CPUs cannot be exclusive; "
                f"start it with 'pinwarden start {name}', or store partition {expected} "
                f"with 'pinwarden define'", code="bad-partition")
        ledger.reserve(holder, lambda leases: decide(spec, host, leases, driver=driver))
        try:
            ctx.sync(host, ledger.leases())
        except PinwardenError:
            ledger.release(holder.key, driver=driver)
            raise


def _widen_for_pins(ctx: Context, host: Host, leases: Sequence[Lease], plan: Plan) -> None:
    """A shared domain pinned (by its XML) outside the shared pool — honoured in ``none`` /
    ``isolcpus`` modes — needs those CPUs in ``machine`` before libvirt writes its pins."""
    from pinwarden.cpuset import CpuSet

    leased = CpuSet.of(lease.cpu for lease in leases)
    extra = plan.cpus() - ctx.pool(host, leased)
    if not extra:
        return
    from pinwarden.enforce.apply import apply_layout, locked
    from pinwarden.enforce.layout import desired_layout

    with locked(ctx.lock_file):
        apply_layout(ctx.backend(), desired_layout(host, leases, ctx.names,
                                                   shared_extra=extra))


def _started(ctx: Context, driver: str, name: str, xml: str) -> None:
    spec = _spec(xml, name)
    if not spec.exclusive:
        return
    holder = _holder(driver, name, spec)
    pid = _pid_file(driver, name)
    with ctx.ledger() as ledger:
        if pid is not None and ledger.find(holder.key, driver=driver) is not None:
            ledger.set_owner(holder, pid)


def _release(ctx: Context, driver: str, name: str, xml: str) -> None:
    spec = _spec(xml, name)
    holder = _holder(driver, name, spec)
    with ctx.ledger() as ledger:
        if ledger.find(holder.key, driver=driver) is None:
            return
        ledger.release(holder.key, driver=driver)
        ctx.sync(ctx.host(), ledger.leases())


def main_run(ctx: Context, driver: str, argv: Sequence[str], stdin: str) -> int:
    """``pinwarden hook run DRIVER NAME OP SUBOP EXTRA``: the exit status for libvirt.

    Only ``prepare`` may refuse (exit 1, reason on stderr).  A failure at any other step
    would not undo it — at ``started`` libvirt would kill the domain, at ``reconnect`` too —
    so it is reported on stderr as a warning and the hook exits 0.
    """
    if driver not in DRIVERS:
        raise InputError(f"unknown hook driver {driver!r} (qemu or lxc)")
    if len(argv) < 2:
        raise InputError("the hook needs at least NAME and OPERATION (libvirt passes "
                         "NAME OP SUBOP EXTRA)")
    name, op = argv[0], argv[1]
    try:
        run(ctx, driver, name, op, stdin)
    except PinwardenError as exc:
        if action_for(op) == "admit":
            raise
        _warn(ctx, f"hook {op} of {driver} domain {name!r}: {exc.message}")
    except Exception as exc:  # a bug: never let it kill a running domain
        what = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        if action_for(op) == "admit":
            _warn(ctx, f"hook {op} of {driver} domain {name!r} failed: {what}")
            raise PinwardenError(
                f"pinwarden's hook failed on domain {name!r} ({what}); this is a bug — "
                f"'pinwarden hook uninstall' and a libvirtd restart bypass the hook",
                code="hook-bug") from None
        _warn(ctx, f"hook {op} of {driver} domain {name!r} failed: {what}")
    return 0


def _warn(ctx: Context, text: str) -> None:
    line = f"pinwarden: warning: {text}"
    print(line, file=sys.stderr)
    _log(ctx, line)


def _log(ctx: Context, line: str) -> None:
    """libvirtd drops the stderr of a hook that exits 0: keep warnings in the state dir."""
    import contextlib
    import time

    with contextlib.suppress(OSError), (ctx.state_dir / HOOK_LOG).open("a") as log:
        log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
