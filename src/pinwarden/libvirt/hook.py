"""The libvirt hook: ``/etc/libvirt/hooks/{qemu,lxc}.d/pinwarden`` → ``pinwarden hook run``.

libvirtd (≥ 6.5) runs every executable in ``/etc/libvirt/hooks/qemu.d/`` (and ``lxc.d/``)
for each lifecycle step of each domain, with the domain XML on stdin and ``NAME OP SUBOP
EXTRA`` as arguments (https://libvirt.org/hooks.html).  pinwarden installs one drop-in
there and never touches another tool's hook (``/etc/libvirt/hooks/qemu`` is often a VFIO
script).  A non-zero exit at ``prepare`` aborts the start and libvirt shows our stderr to
the user — this is how a plain ``virsh start`` is held to the leases:

* ``prepare``: shared domain → admitted only if its pins avoid every CPU leased to someone
  else (else a refusal naming the holder); exclusive domain → its CPUs are leased (the
  same transaction as ``pinwarden start``, idempotent for a start pinwarden already
  planned) and the cgroup layout enforced *before* libvirt creates the domain's cgroup;
* ``started``: the QEMU process becomes the owner of the domain's leases;
* ``release``: the domain's leases are freed and the layout shrunk back; running shared
  domains that an exclusive start re-pinned off those CPUs get them back from a process
  the hook leaves behind (``pinwarden hook give-back``: it calls libvirt, which the hook
  may not), unless the event daemon answered the hook (its own pass gives them back);
* every other operation is let through untouched; nothing is ever written on stdout
  (libvirt would read it as replacement XML for ``migrate``/``restore``).

**Fail safe.**  A broken pinwarden must never block a domain that asks for nothing
exclusive.  The drop-in script tells three outcomes apart by exit status: 0 (admitted),
:data:`REFUSED` (a placement rule refused the domain: libvirt shows why) and anything else
— the interpreter or pinwarden is gone (127), cannot be imported, crashed.  In that last
case it lets a shared domain through (logging why to syslog and the state directory) and
refuses an exclusive one with how to repair the installation.  The Python side does the
same for its own failures: only a :class:`~pinwarden.errors.Refusal` blocks a shared
domain (invalid pinwarden metadata that does not say ``exclusive='no'`` is one: the domain
may have asked for exclusive CPUs); a broken ledger, host or cgroup tree lets it through
with a warning, and so does another pinwarden that holds the lock longer than
:data:`SHARED_LOCK_WAIT` (an exclusive domain waits the manager's whole lock timeout).

The hook never calls back into libvirt (libvirtd holds the domain lock while it runs) and
imports only what the operation needs.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from pinwarden.config import DEFAULT_STATE_DIR
from pinwarden.errors import InputError, PinwardenError, Refusal
from pinwarden.libvirt import hookclient
from pinwarden.record import record

if TYPE_CHECKING:
    from pinwarden.domain import DomainSpec
    from pinwarden.manager import Manager
    from pinwarden.model import HolderRef, Lease, Plan
    from pinwarden.partition import Host

DRIVERS = ("qemu", "lxc")
MARKER = "# pinwarden libvirt hook"
#: The drop-in's own version (its line ``# script version N``): raised whenever what the
#: script does changes, so that ``hook check`` tells a drop-in an older pinwarden wrote.
SCRIPT_VERSION = 6
_VERSION_LINE = "# script version "
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
DROP_IN = "pinwarden"
HOOK_LOG = hookclient.HOOK_LOG
#: The daemon's socket for hook calls, in its state directory (see hookclient).
SOCKET_NAME = hookclient.SOCKET_NAME
#: What the drop-in runs (imports the client, which then loads from its bytecode) ...
CLIENT_MAIN = "hookclient_main.py"
#: ... and what it ran before (the client itself, compiled on every call): still read.
CLIENT_FILES = (CLIENT_MAIN, "hookclient.py")
#: Exit status of ``hook run`` when a placement rule refuses the domain at ``prepare``.
REFUSED = 3
#: Exit status of a hook call that failed and said why on stderr (a daemon that took the
#: call and never answered, a configuration file that cannot be read): the drop-in's
#: fail-safe as for any failure, without its "broken or missing" words.
EXPLAINED = hookclient.EXPLAINED
#: How long a hook call of a domain that asks for nothing exclusive waits for another
#: pinwarden's lock (a wedged one must not hold the start for the manager's two minutes;
#: then it is let through, as on any failure of pinwarden's) — less than the client's wait
#: for the daemon (hookclient.SHARED_TIMEOUT), so that the daemon's answer comes first.
SHARED_LOCK_WAIT = 20.0
#: pinwarden's metadata namespace (pinwarden.domain.PW_NS, not imported: the hook is lean).
PW_NAMESPACE = "urn:pinwarden:domain:1"

Action = Literal["admit", "own", "free", "rewrite", "ignore"]

_ACTIONS: dict[str, Action] = {"prepare": "admit", "started": "own", "release": "free",
                               "restore": "rewrite"}


def action_for(op: str) -> Action:
    """What the hook does at libvirt operation ``op`` (pure)."""
    return _ACTIONS.get(op, "ignore")


def asks_exclusive(xml: str) -> bool:
    """Whether domain XML asks for exclusive CPUs, judged without parsing it (what the
    fail-safe path uses when pinwarden itself cannot): pinwarden's metadata namespace and
    ``exclusive='yes'``.  libvirt keeps no other ``exclusive`` attribute."""
    return PW_NAMESPACE in xml and ("exclusive='yes'" in xml or 'exclusive="yes"' in xml)


# -- install ------------------------------------------------------------------------------

@record
class Installed:
    paths: tuple[Path, ...]
    command: str  # what the scripts exec (before "hook run")
    removed: tuple[Path, ...] = ()  # pinwarden's own legacy hooks (hooks/qemu) replaced
    created_dirs: bool = False  # a qemu.d/lxc.d was created: libvirtd must reload to look


def hook_options(config: Path | None, state_dir: Path | None) -> list[str]:
    """The options the drop-in passes to ``hook run`` (and ``hook ping`` checks)."""
    return [*(["--config", str(config)] if config is not None else []),
            *(["--state-dir", str(state_dir)] if state_dir is not None else [])]


def hook_script(driver: str, exe: str | Sequence[str], *, state_dir: Path | None,
                config: Path | None, client: Sequence[str] | None = None,
                socket: Path | None = None) -> str:
    """The drop-in script for ``driver`` (see the module docstring for the exit codes).

    ``client``: the hook client to run (:mod:`pinwarden.libvirt.hookclient`, handing the
    call to the running daemon at ``socket``, default ``STATE_DIR/hook.sock``), with the
    full command as its fallback; None: the full command itself."""
    args = [*([exe] if isinstance(exe, str) else exe), "hook", "run",
            *hook_options(config, state_dir), driver]
    state = state_dir or DEFAULT_STATE_DIR
    full = " ".join(shlex.quote(a) for a in args)
    if client is not None:
        where = socket or state / SOCKET_NAME
        args = [*client, str(where), str(config) if config else "-", driver,
                str(len(args)), *args]
    command = " ".join(shlex.quote(a) for a in args)
    log = shlex.quote(str(state / HOOK_LOG))
    state_q = shlex.quote(str(state))
    # at 'started' the threads of a QEMU domain without <vcpu cpuset> that have no pin of
    # their own get the VM CPUs (pinwarden.libvirt.place), and so does every process of
    # such an LXC container; any other shared domain ends here.
    # libvirt's form of the XML (what the hook gets) writes the attribute right after
    # placement='static' (tests check that against libvirt).
    unpinned = "*\"<vcpu placement='static' cpuset='\"*) exit 0 ;; *) ;;"
    return f"""#!/bin/sh
{MARKER} ({driver}); written by 'pinwarden hook install'.
{_VERSION_LINE}{SCRIPT_VERSION}
# libvirtd runs it at every domain lifecycle step (domain XML on stdin).  pinwarden admits
# or refuses the domain against the exclusive CPU leases at 'prepare' (exit {REFUSED}: refused,
# libvirt shows why), takes the QEMU process as the leases' owner at 'started' (and gives
# a shared domain's threads that have no pin the VM CPUs) and frees them at 'release'.
# Later steps never fail (libvirt would kill the domain), and steps pinwarden ignores end
# here: no Python start-up for them.
# Fail safe: if pinwarden itself is broken or gone, a domain that asks for nothing
# exclusive is let through (logged to syslog and the state directory's {HOOK_LOG}); an
# exclusive one is refused.
case "$2" in
  prepare) ;;
  started|release|restore) ;;
  *) cat >/dev/null; exit 0 ;;
esac
xml=$(cat)
case "$2" in
  restore)
    # a shared domain's saved pins on CPUs leased now are moved off them: libvirt
    # restores the XML printed here (nothing printed: the saved one); never fails
    case "$xml" in *"<vcpupin "*|*"<emulatorpin "*|*"<iothreadpin "*|*" cpuset="*) ;;
      *) exit 0 ;; esac
    out=$(printf '%s\n' "$xml" | {full} "$@") && printf '%s\n' "$out"
    exit 0 ;;
  started)
    case "$xml" in *{PW_NAMESPACE}*) ;; {unpinned} esac ;;
  release)
    case "$xml" in *{PW_NAMESPACE}*) ;; *) exit 0 ;; esac ;;
esac
printf '%s\\n' "$xml" | {command} "$@"
rc=$?
[ "$rc" -eq 0 ] && exit 0
[ "$2" = prepare ] || exit 0
[ "$rc" -eq {REFUSED} ] && exit 1
say() {{
  command -v logger >/dev/null 2>&1 && logger -t pinwarden-hook -p daemon.warning -- "$1"
  [ -d {state_q} ] || mkdir -p -m 0700 {state_q} 2>/dev/null
  printf '%s pinwarden: warning: %s\\n' "$(date +%Y-%m-%dT%H:%M:%S)" "$1" 2>/dev/null >>{log}
  return 0
}}
case "$xml" in
  *{PW_NAMESPACE}*exclusive=\\"yes\\"*|*{PW_NAMESPACE}*exclusive=\\'yes\\'*|\\
  *exclusive=\\"yes\\"*{PW_NAMESPACE}*|*exclusive=\\'yes\\'*{PW_NAMESPACE}*)
    if [ "$rc" -eq {EXPLAINED} ]; then
      say "exclusive domain '$1' was refused: pinwarden failed (why is above)"
      exit 1
    fi
    msg="pinwarden is broken or missing (the hook's command exited $rc), so exclusive"
    msg="$msg domain '$1' cannot get its CPUs: repair the installation ('pinwarden hook"
    msg="$msg check' tells what is wrong) or remove it with 'pinwarden hook uninstall'"
    say "$msg"
    echo "pinwarden: error: $msg" >&2
    exit 1 ;;
esac
[ "$rc" -eq {EXPLAINED} ] && why="pinwarden failed (exit $rc: why is above)" ||\
  why="pinwarden is broken or missing (the hook's command exited $rc)"
say "$why; domain '$1' asks for no exclusive CPUs and was let through unchecked: run\
 'pinwarden hook check'"
exit 0
"""


def default_client() -> tuple[str, ...]:
    """This interpreter running the hook client alone, without site-packages, from its
    cached bytecode (``hookclient_main.py``): a start of a few milliseconds, where the full
    pinwarden takes a hundred."""
    return (sys.executable, "-I", "-S",
            str(Path(hookclient.__file__).resolve().with_name(CLIENT_MAIN)))


def default_executable() -> tuple[str, ...]:
    """This interpreter running the vm commands alone (``-m pinwarden.cli.vm``): the
    installed pinwarden, without loading every other command on each hook call."""
    return (sys.executable, "-m", "pinwarden.cli.vm")


#: Runs ``"$@"`` from a shell confined by AppArmor profile ``$1``, as libvirtd runs its
#: hooks (the drop-in inherits the daemon's profile: ``/etc/libvirt/hooks/** rmix``).
#: The outer shell asks for the profile at its next exec; exit 125: it could not.
_CONFINED = ('p=$1; shift; { printf "exec %s" "$p" >/proc/self/attr/apparmor/exec || '
             'printf "exec %s" "$p" >/proc/self/attr/exec; } 2>/dev/null || exit 125; '
             'exec /bin/sh -c \'exec "$@"\' sh "$@"')
_NOT_CONFINED = 125


def enforcing_profile(root: Path = Path("/")) -> tuple[str, str] | None:
    """(daemon, AppArmor profile) the hooks run under where AppArmor enforces one, or
    None: reads the running libvirt daemons' labels and the loaded profiles below
    ``root`` for :func:`decide_enforcing_profile`.  Such a profile may forbid exec'ing
    pinwarden."""
    from pinwarden import procs

    running = [(daemon, procs.security_label(pid, root=root))
               for pid, daemon in procs.named(HOOK_DAEMON_NAMES, root=root)]
    loaded: str | None = None
    if not running:  # only read where no daemon's own label decides
        try:
            loaded = (root / "sys/kernel/security/apparmor/profiles").read_text(
                errors="replace")
        except OSError:
            loaded = None
    return decide_enforcing_profile(running, loaded)


def decide_enforcing_profile(running: Sequence[tuple[str, str | None]],
                             loaded: str | None) -> tuple[str, str] | None:
    """The (daemon, profile) pair of :func:`enforcing_profile`, decided from ``running``
    (each running libvirt daemon and its security label, None where it has none) and
    ``loaded`` (the text of ``/sys/kernel/security/apparmor/profiles``, None where it
    cannot be read).  A running daemon's label decides; with none running (Debian's
    libvirtd exits when idle, to start again on the next connection) a loaded profile of
    a libvirt daemon does, libvirtd's first.  Only enforce mode counts: complain mode
    denies nothing."""
    for daemon, label in running:
        if label is not None and label.endswith(" (enforce)"):
            return daemon, label.removesuffix(" (enforce)")
    if running or loaded is None:  # what runs the hooks now is not confined
        return None
    found: dict[str, str] = {}
    for line in loaded.splitlines():
        profile, _, mode = line.rpartition(" (")
        daemon = profile.rpartition("/")[2]  # named 'libvirtd', or by path (older profiles)
        if mode == "enforce)" and daemon in HOOK_DAEMON_NAMES:
            found.setdefault(daemon, profile)
    for daemon in ("libvirtd", *sorted(HOOK_DAEMON_NAMES - {"libvirtd"})):
        if daemon in found:
            return daemon, found[daemon]
    return None


@record
class Ping:
    """What ``COMMAND hook ping`` did: its exit status and the last line of its stderr,
    or (``failed``) why it did not answer as pinwarden does."""

    status: int | None = None
    last_line: str = ""
    failed: str | None = None  # cannot run, or exit 0 without pinwarden's answer


def _ping(argv: Sequence[str], options: Sequence[str] = ()) -> Ping:
    """Run ``argv hook ping OPTIONS``: ``options`` are the drop-in's ``--config`` and
    ``--state-dir``, which the ping loads as ``hook run`` would."""
    try:
        done = subprocess.run([*argv, "hook", "ping", *options], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Ping(failed=f"cannot run: {exc}")
    if done.returncode == 0 and "pinwarden hook ok" not in done.stdout:
        return Ping(done.returncode, failed=f"hook ping exited 0 without 'pinwarden hook ok' "
                                            f"in its output: {done.stdout.strip()[:200]!r}")
    return Ping(done.returncode, (done.stderr.strip().splitlines() or ["no output"])[-1])


def _runs(exe: Sequence[str], options: Sequence[str] = (), *,
          confined: tuple[str, str] | None = None) -> str | None:
    """Why ``exe`` (what the hook will exec) does not run, or None.  ``options``: the
    drop-in's ``--config`` and ``--state-dir`` — a configuration ``hook run`` cannot load
    fails every call (shared domains let through unchecked, exclusive ones refused), and
    was installed and checked as "ok" (hunt).  ``confined``: the (daemon, AppArmor
    profile) the hooks run under (:func:`enforcing_profile`) — the command is then run
    again from a shell under that profile, as libvirt runs it."""
    got = _ping(exe, options)
    if got.failed is not None:
        return f"{shlex.join(exe)} {got.failed}"
    if got.status != 0:
        return f"{shlex.join([*exe, 'hook', 'ping', *options])} exited {got.status}: " \
               f"{got.last_line}"
    if confined is None:
        return None
    daemon, profile = confined
    got = _ping(["/bin/sh", "-c", _CONFINED, "sh", profile, *exe], options)
    if got.failed is not None or got.status in (0, _NOT_CONFINED):
        return None  # runs confined, or the check itself could not confine (not a verdict)
    real = os.path.realpath(shutil.which(exe[0]) or exe[0])  # what the profile matches
    local = f"/etc/apparmor.d/local/usr.sbin.{daemon}"
    return (f"{daemon} runs under the AppArmor profile {profile!r} (enforce), and so do its "
            f"hooks: from there {shlex.join(exe)} hook ping exited {got.status} "
            f"({got.last_line}), so every hook call would fail; make pinwarden's venv from "
            f"the distribution's /usr/bin/python3 (its profile lets hooks run /usr/bin/*), "
            f"or add the line "
            f"'{real} PUx,' to {local} and reload the profile "
            f"(apparmor_parser -r /etc/apparmor.d/usr.sbin.{daemon})")


def install(hooks_dir: Path, *, exe: str | Sequence[str], state_dir: Path | None,
            config: Path | None, drivers: tuple[str, ...] = DRIVERS,
            check: bool = True, dry_run: bool = False,
            client: Sequence[str] | None = None, socket: Path | None = None) -> Installed:
    """Write ``DRIVER.d/pinwarden`` atomically for each driver, after checking that what
    it execs runs.  Another tool's hook is never touched, even one at pinwarden's own
    path (an operator's wrapper, say: refused, nothing written); pinwarden's own legacy
    ``hooks/DRIVER`` script (earlier versions) is replaced by the drop-in."""
    argv = [exe] if isinstance(exe, str) else list(exe)
    for driver in drivers:
        path = hooks_dir / f"{driver}.d" / DROP_IN
        if (path.exists() or path.is_symlink()) and not _is_ours(path):
            raise Refusal(f"{path} exists and pinwarden did not write it (it has no "
                          f"'{MARKER}' line); nothing installed: move it away (if it wraps "
                          f"pinwarden's hook, give it another name and have it call the "
                          f"one pinwarden writes)", code="hook-foreign")
    for driver in drivers:  # before anything is written (a dry run says it too)
        blocked = _not_a_directory(hooks_dir / f"{driver}.d")
        if blocked is not None:
            raise InputError(f"cannot install into {hooks_dir / f'{driver}.d'}: {blocked} is "
                             f"not a directory; nothing installed")
    if check:
        problem = _runs(argv, hook_options(config, state_dir), confined=enforcing_profile())
        if problem is not None:
            raise Refusal(f"the hook would run a pinwarden that does not work ({problem}); "
                          f"nothing installed", code="hook-broken")
    written: list[Path] = []
    removed: list[Path] = []
    created = False
    for driver in drivers:
        directory = hooks_dir / f"{driver}.d"
        path = directory / DROP_IN
        legacy = hooks_dir / driver
        ours = _is_ours(legacy)
        if dry_run:
            written.append(path)
            if ours:
                removed.append(legacy)
            continue
        try:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                created = True
            tmp = directory / f".{DROP_IN}.tmp"
            tmp.write_text(hook_script(driver, exe, state_dir=state_dir, config=config,
                                       client=client, socket=socket))
            tmp.chmod(0o755)
            tmp.replace(path)
            if ours:
                legacy.unlink()
                removed.append(legacy)
        except OSError as exc:
            with contextlib.suppress(OSError):
                (directory / f".{DROP_IN}.tmp").unlink()
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        written.append(path)
    return Installed(tuple(written), shlex.join(argv), tuple(removed), created)


def _not_a_directory(directory: Path) -> Path | None:
    """``directory``, or the nearest of its parents that exists, when that is no directory
    (a file given as ``--hooks-dir``): nothing could be written there."""
    for path in (directory, *directory.parents):
        if path.exists():
            return None if path.is_dir() else path
        if path.is_symlink():  # dangling
            return path
    return None


def _is_ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(errors="replace")
    except OSError:
        return False


#: The libvirt daemons that run a driver's hooks: the monolithic libvirtd, or the driver's
#: own modular daemon (the default on Fedora and the RHEL 9 family).
HOOK_DAEMONS = {"qemu": ("libvirtd", "virtqemud"), "lxc": ("libvirtd", "virtlxcd")}
#: Every one of them (the process names to look for).
HOOK_DAEMON_NAMES = frozenset(d for names in HOOK_DAEMONS.values() for d in names)


def daemons_to_reload(running: frozenset[str],
                      drivers: tuple[str, ...] = DRIVERS) -> tuple[str, ...]:
    """Of the libvirt daemons ``running`` (process names), those that must reload to see
    a new hook directory of ``drivers`` (pure; libvirt looks for hook directories when its
    daemon starts or reloads)."""
    wanted = {d for driver in drivers for d in HOOK_DAEMONS.get(driver, ())}
    return tuple(sorted(wanted & running))


def reload_advice(running: frozenset[str], drivers: tuple[str, ...] = DRIVERS) -> str:
    """What to tell the operator after a hook directory was created (pure)."""
    daemons = daemons_to_reload(running, drivers)
    if not daemons:
        known = sorted({d for driver in drivers for d in HOOK_DAEMONS.get(driver, ())})
        return (f"libvirt looks for a new hook directory only when its daemon starts or "
                f"reloads; none runs now ({', '.join(known)}), so the next one to start "
                f"finds the hooks")
    return (f"libvirt looks for a new hook directory only when its daemon starts or "
            f"reloads: 'systemctl reload {' '.join(daemons)}' (without systemd: send "
            f"{' and '.join(daemons)} SIGHUP) for the hooks to take effect")


def uninstall(hooks_dir: Path, drivers: tuple[str, ...] = DRIVERS) -> tuple[Path, ...]:
    """Remove pinwarden's drop-ins (and legacy scripts), and a ``DRIVER.d`` directory
    left empty by that (``install`` creates it where there is none; an empty one runs no
    hook either way); nothing else."""
    removed = []
    for driver in drivers:
        for path in (hooks_dir / f"{driver}.d" / DROP_IN, hooks_dir / driver):
            if not _is_ours(path):
                continue
            try:
                path.unlink()
            except OSError as exc:
                raise InputError(f"cannot remove {path}: {exc.strerror}") from None
            removed.append(path)
            if path.name == DROP_IN:
                with contextlib.suppress(OSError):  # not empty: another tool's hooks
                    path.parent.rmdir()
    return tuple(removed)


@record
class HookState:
    driver: str
    path: Path
    installed: bool
    problem: str | None  # None: installed and working
    command: str | None = None
    daemon: str | None = None  # whether the daemon answers the hook's calls


def check_installed(hooks_dir: Path, drivers: tuple[str, ...] = DRIVERS) -> list[HookState]:
    """The state of pinwarden's hooks: present, does what they exec run, and does a daemon
    answer their calls (else each call starts pinwarden: slower, same result)."""
    states = []
    problem: str | None
    confined = enforcing_profile()
    for driver in drivers:
        path = hooks_dir / f"{driver}.d" / DROP_IN
        legacy = hooks_dir / driver
        if not _is_ours(path):
            problem = "not installed ('pinwarden hook install')"
            if _is_ours(legacy):
                problem = (f"installed the old way as {legacy}; 'pinwarden hook install' "
                           f"moves it to {path}")
            states.append(HookState(driver, path, False, problem))
            continue
        text = path.read_text(errors="replace")
        line = _exec_line(text)
        command, client, sock = _split(line) if line is not None else (None, None, None)
        options = _options(line) if line is not None else []
        daemon = None
        version = _script_version(text)
        if command is None:
            problem = f"{path} has no pinwarden command line: reinstall it"
        elif version != SCRIPT_VERSION:
            problem = (f"{path} was written by another pinwarden (script version "
                       f"{version if version is not None else 1}, this one writes "
                       f"{SCRIPT_VERSION}): run 'pinwarden hook install' again")
        elif not os.access(path, os.X_OK):
            problem = f"{path} is not executable: libvirt skips it"
        else:
            problem = _runs(command, options, confined=confined)
            if problem is None and client is not None:
                problem = _client_runs(client)
                if problem is None and sock is not None:
                    from pinwarden.libvirt.hookclient import PROTOCOL, ask

                    try:
                        answered = ask(sock, {"v": PROTOCOL, "ping": True},
                                       timeout=10.0) is not None
                    except (OSError, ValueError):
                        answered = False
                    daemon = f"answered by the daemon at {sock}" if answered else \
                        f"no daemon answers at {sock}: each call starts pinwarden"
        states.append(HookState(driver, path, True, problem,
                                None if command is None else shlex.join(command), daemon))
    return states


def _script_version(script: str) -> int | None:
    """The drop-in's ``# script version N`` (None: before there was one)."""
    for line in script.splitlines()[:3]:
        if line.startswith(_VERSION_LINE):
            number = line.removeprefix(_VERSION_LINE).strip()
            return int(number) if number.isdigit() and len(number) < 6 else -1
    return None


def _exec_line(script: str) -> list[str] | None:
    """The words of the drop-in's command line (client and fallback, or the command)."""
    for line in script.splitlines():
        text = line.strip()
        if text.startswith("printf '%s\\n' \"$xml\" | "):
            words = shlex.split(text.split("| ", 1)[1])
            if "hook" in words:
                return words
    return None


def _split(words: list[str]) -> tuple[list[str] | None, list[str] | None, str | None]:
    """(the pinwarden command before ``hook run``, the hook client's command or None, its
    socket or None) of a drop-in's command line."""
    client: list[str] | None = None
    sock: str | None = None
    if len(words) > 7 and words[3].endswith(CLIENT_FILES):
        client, sock = words[:4], words[4]
        words = words[8:]
    if "hook" not in words:
        return None, client, sock
    return words[:words.index("hook")], client, sock


def _options(words: list[str]) -> list[str]:
    """The ``--config`` and ``--state-dir`` a drop-in's command line passes to its
    ``hook run`` (the full command's, after the client's words)."""
    from itertools import pairwise

    out: list[str] = []
    rest = words[len(words) - words[::-1].index("run"):] if "run" in words else []
    for option, value in pairwise(rest):
        if option in ("--config", "--state-dir"):
            out += [option, value]
    return out


def _client_runs(client: Sequence[str]) -> str | None:
    """Why the hook client (``python3 -I -S hookclient_main.py``) does not run, or
    None."""
    try:
        done = subprocess.run([*client, "--ping"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{shlex.join(client)} cannot run: {exc}"
    if done.returncode != 0 or "pinwarden hook client ok" not in done.stdout:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{shlex.join(client)} exited {done.returncode}: {tail}"
    return None


# -- run ----------------------------------------------------------------------------------

#: Called with the holder whose lease a ``release`` freed while live pins pinwarden
#: narrowed are waiting for CPUs (:func:`pinwarden.libvirt.pins.give_back_after_release`).
AfterRelease = Callable[["HolderRef"], None]


def run(manager: Manager, driver: str, name: str, op: str, xml: str, *,
        caller: int | None = None, after_release: AfterRelease | None = None) -> str | None:
    """Handle one hook call; raise a :class:`PinwardenError` to refuse (``prepare`` only).
    ``caller``: the libvirtd (or virtqemud) that runs the hook, when the call comes from
    the hook client (default: found from this process's parents).  ``after_release``: see
    :data:`AfterRelease` (None: nothing is started; the daemon gives back itself).
    Returns the domain XML libvirt is to use instead of ``xml`` (``restore`` only), or
    None: ``xml`` as it is."""
    action = action_for(op)
    if action == "ignore":
        return None
    # the steps after prepare need only its identity: metadata prepare refused (or one
    # edited since it started) does not keep them from freeing its leases, nor is it said
    # a second time at each (hook.log had a warning of it at every release)
    spec = _spec(xml, name, unclear_as_exclusive=action in ("own", "free"))
    who = caller if caller is not None else _libvirtd_pid
    if action == "admit":
        _prepare(manager, driver, name, spec, who)
    elif action == "own":
        _started(manager, driver, name, spec)
    elif action == "free":
        _release(manager, driver, name, spec, who, after_release)
    elif action == "rewrite":
        return _restore(manager, driver, name, spec, xml)
    return None


def _restore(manager: Manager, driver: str, name: str, spec: DomainSpec,
             xml: str) -> str | None:
    """``restore``: a shared QEMU domain about to be restored from a save image gets, in the
    XML libvirt restores (:func:`pinwarden.libvirt.repin.restored`), the CPUs freed since
    on the pins pinwarden narrowed (records of a domain with a managed save image are
    kept for this), and its pins off the CPUs leased now, recorded as narrowings so that the
    lease's end gives them back; anything else is restored as saved."""
    from pinwarden.cpuset import EMPTY, CpuSet
    from pinwarden.domain import render_plan
    from pinwarden.libvirt.repin import restored
    from pinwarden.model import Plan
    from pinwarden.narrowed import NARROWED_PREFIX, narrowed_key
    from pinwarden.partition import shared_pool

    if driver != "qemu":
        return None
    if spec.exclusive:
        return _restore_exclusive(manager, name, spec, xml)
    uuid = spec.uuid or ""
    recorded = {k: v for k, v in manager.change_records(NARROWED_PREFIX).items()
                if uuid and k.startswith(narrowed_key(uuid, ""))}
    leased = CpuSet.of(lease.cpu for lease in manager.leases(kept=True))
    if not leased and not recorded:
        return None
    done = restored(spec, name, uuid, leased, shared_pool(manager.host(), leased)[0],
                    recorded)
    if not done.off and not done.given and done.cpuset == spec.cpuset:
        if done.forget:
            manager.put_change_records({}, forget=list(done.forget))
        return None
    moved = {(m.thread, m.ident): m.after for m in (*done.off, *done.given)}
    plan = Plan(name, spec.uuid, False,
                vcpus={v: moved.get(("vcpu", v), c) for v, c in spec.vcpupins.items()},
                emulator=moved.get(("emulator", None), spec.emulatorpin or EMPTY),
                iothreads={i: moved.get(("iothread", i), c)
                           for i, c in spec.iothreadpins.items()},
                default_cpus=done.cpuset)
    out = render_plan(xml, plan)
    if uuid:
        manager.put_change_records(dict(done.records), forget=list(done.forget))
    if done.off or done.cpuset != spec.cpuset:
        log_line(manager, f"pinwarden: restoring {name} off leased {leased.named()}: "
                          + ", ".join(f"{m.label} {m.before} -> {m.after}" for m in done.off)
                          + (f"{', ' if done.off else ''}<vcpu cpuset> {spec.cpuset} -> "
                             f"{done.cpuset}" if done.cpuset != spec.cpuset else ""))
    if done.given:
        log_line(manager, f"pinwarden: restoring {name} with the CPUs no longer leased: "
                          + ", ".join(f"{m.label} {m.before} -> {m.after}" for m in done.given))
    return out


def _restore_exclusive(manager: Manager, name: str, spec: DomainSpec,
                       xml: str) -> str | None:
    """``restore`` of an exclusive QEMU domain whose stored definition pins nothing: the
    pins of its save image are the plan ``pinwarden start`` wrote into its live definition.
    Where another holder leases one of those CPUs now, it gets the plan of now (``prepare``
    then leases it); before, it was refused "choose other CPUs" with other CPUs free, and
    could come back only once that holder stopped (systemd-lab hunt).  Pins its stored
    definition names are its user's, and with every CPU free it comes back as saved."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.domain import parse_domain, render_plan
    from pinwarden.libvirt.place import stored_path
    from pinwarden.policy import decide
    from pinwarden.record import replace

    try:
        stored = parse_domain(stored_path("qemu", name).read_bytes())
    except (OSError, ValueError, PinwardenError):
        return None  # (transient, or unreadable: its pins may be its user's)
    if stored.vcpupins or stored.emulatorpin is not None or stored.iothreadpins \
            or stored.cpuset is not None:
        return None
    holder = _holder("qemu", name, spec)
    leases = manager.leases(kept=True)
    others = CpuSet.of(le.cpu for le in leases
                       if (le.holder.driver, le.holder.key) != (holder.driver, holder.key))
    saved = CpuSet.of(c for pins in (spec.vcpupins.values(), spec.iothreadpins.values(),
                                     [spec.emulatorpin or CpuSet(), spec.cpuset or CpuSet()])
                      for cpus in pins for c in cpus)
    if not saved & others:
        return None
    unpinned = replace(spec, vcpupins={}, emulatorpin=None, iothreadpins={}, cpuset=None)
    try:
        plan = decide(unpinned, manager.host(), leases, holder=holder)
    except Refusal:
        return None  # no room now: 'prepare' refuses the saved pins, naming the holder
    log_line(manager, f"pinwarden: restoring exclusive {name} on {plan.leased().named()}: "
                      f"its saved {(saved & others).named()} "
                      f"{'is' if len(saved & others) == 1 else 'are'} leased to others now")
    return render_plan(xml, plan)


Caller = int | Callable[[], int | None]
#: ``caller`` of a hook call whose client could not tell which daemon runs the hook (its
#: shell's parent had gone): not to be looked for among this process's parents (the event
#: daemon's, when it answers the call).
UNKNOWN_CALLER = 0


def _caller(who: Caller) -> int | None:
    return (who or None) if isinstance(who, int) else who()


def _spec(xml: str, name: str, *, unclear_as_exclusive: bool = False) -> DomainSpec:
    from pinwarden.domain import BAD_METADATA, parse_domain

    try:
        return parse_domain(xml, unclear_as_exclusive=unclear_as_exclusive)
    except PinwardenError as exc:
        if exc.code == BAD_METADATA:  # it may ask for exclusive CPUs: never run it shared
            raise Refusal(f"domain {name!r} has invalid pinwarden metadata: {exc.message}; "
                          f"fix it with 'virsh edit {name}' (exclusive='no' asks for "
                          "shared CPUs)", code=BAD_METADATA) from None
        raise InputError(f"pinwarden cannot read the XML of domain {name!r}: "
                         f"{exc.message}") from None


def _holder(driver: str, name: str, spec: DomainSpec) -> HolderRef:
    from pinwarden.model import domain_holder

    return domain_holder(driver, name, spec.uuid)


def _prepare(manager: Manager, driver: str, name: str, spec: DomainSpec,
             who: Caller) -> None:
    from pinwarden.policy import decide

    holder = _holder(driver, name, spec)
    if not spec.exclusive:
        admit_shared(manager, spec, holder)
        return
    expected = manager.libvirt_partition(holder)
    if spec.partition != expected:
        # a domain no start could place (even with nothing leased) gets that reason
        # first: the advice below would lead to that refusal from 'pinwarden define' or
        # 'pinwarden start'
        decide(spec, manager.host(), (), holder=holder)
        from pinwarden.libvirt.place import stored_path
        from pinwarden.model import command_line

        stored = stored_path(driver, name)
        # (a transient domain was told 'pinwarden start', which starts only defined ones:
        # real-libvirt hunt)
        how = (f"start it with '{command_line('pinwarden start', name)}', or store "
               f"partition {expected} with 'pinwarden define'" if stored.exists() else
               f"it is transient: put <resource><partition>{expected}</partition>"
               f"</resource> in its XML")
        raise Refusal(
            f"exclusive domain {name!r} would start in partition "
            f"{spec.partition or '/machine'}, where its CPUs cannot be exclusive; {how}",
            code="bad-partition")
    # A reservation the hook makes itself is owned by libvirtd (our parent) until QEMU runs
    # (``started``): if libvirtd dies during the start it is reaped, and a ``release``
    # after a refused or failed start frees it.  One made before (``pinwarden start``, in
    # progress; ``pinwarden reserve``) keeps its owner.
    reader = manager.reader()
    existing = reader.get(holder) if reader is not None else None
    owner = None if existing is not None else _caller(who)
    if existing is None and owner is None:
        # no owner to reap it by: a start that fails now (libvirtd killed, as here its
        # parent is gone) would have kept the lease for good (hunt)
        raise Refusal(f"pinwarden cannot tell which libvirt daemon runs the hook for "
                      f"exclusive domain {name!r} (the hook's parent process is gone: is "
                      f"libvirtd stopping?), so the lease could not end with a failed start; "
                      f"start it again once libvirtd runs", code="no-caller")
    from pinwarden.narrowed import NARROWED_PREFIX, key_parts

    narrowed = frozenset(key_parts(k) for k in manager.change_records(NARROWED_PREFIX))
    manager.reserve(holder, lambda host, leases: _decide_beside_running(
        spec, holder, driver, host, leases, narrowed), owner_pid=owner)


def _decide_beside_running(spec: DomainSpec, holder: HolderRef, driver: str, host: Host,
                           leases: tuple[Lease, ...],
                           narrowed: frozenset[tuple[str, str]] = frozenset()) -> Plan:
    """The exclusive domain's plan, refused as 'pinwarden start' refuses it when a running
    domain's own definition pins a thread onto those CPUs only (:func:`repins`): the hook
    leased them anyway, and the layout moved that VM off the CPUs its user pinned, silently
    (hunt).  The running domains come from libvirt's files (the hook may not call it).

    A transient domain has only its live definition, whose pins may be pinwarden's own
    narrowing: those threads (``narrowed``: ``(uuid, label)`` of the ``repin:`` records)
    are left out, the others' pins are its user's (left out whole, a transient domain
    pinned onto the CPUs was moved off them silently where 'pinwarden start' refused:
    hunt)."""
    from pinwarden.cpuset import EMPTY
    from pinwarden.libvirt.place import running_from_files
    from pinwarden.libvirt.repin import ExclusivePlanner
    from pinwarden.libvirt.state import Affinity, group_label
    from pinwarden.policy import decide
    from pinwarden.record import replace

    if driver != "qemu":  # (an LXC container's pins are ignored)
        return decide(spec, host, leases, holder=holder)
    running = []
    for dom in running_from_files(driver):
        mine = {label for uuid, label in narrowed if uuid == dom.uuid}
        if dom.persistent is None and mine and dom.affinity is not None:
            pins = dom.affinity
            dom = replace(dom, affinity=Affinity(
                vcpus={v: c for v, c in pins.vcpus.items()
                       if group_label("vcpu", v) not in mine},
                emulator=EMPTY if "emulator" in mine else pins.emulator,
                iothreads={i: c for i, c in pins.iothreads.items()
                           if group_label("iothread", i) not in mine}))
        running.append(dom)
    return ExclusivePlanner(spec, holder, running)(host, leases)  # (its moves: the layout's)


def _libvirtd_pid() -> int | None:
    """The process that runs the hook (libvirtd or virtqemud): the parent of the drop-in
    script, whose shell is our parent (it forks us as the last command of its pipeline;
    its process is named after the script, not the shell)."""
    from pinwarden import procs

    stat = procs.read_stat(os.getppid())
    pid = stat.ppid if stat is not None else 0
    if pid == 1:  # a libvirt daemon that is PID 1 (a container), or the shell's orphaned
        init = procs.read_stat(1)
        return 1 if init is not None and init.comm in HOOK_DAEMON_NAMES else None
    return pid if pid > 1 and procs.start_time(pid) is not None else None


def admit_shared(manager: Manager, spec: DomainSpec, holder: HolderRef) -> None:
    """Admit a shared domain: its pins must avoid every leased CPU (else a Refusal).  A
    domain pinned (by its XML) outside the shared pool — honoured in ``none`` /
    ``isolcpus`` modes — needs those CPUs in the shared cgroup before libvirt writes its
    pins: the manager widens it (only while something is leased: otherwise pinwarden has
    changed nothing that could be in the way)."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.partition import shared_pool

    if spec.partition is not None and spec.partition.endswith(f"-{holder.name}") and \
            spec.partition == manager.libvirt_partition(holder):
        # what an exclusive domain gets from 'pinwarden define': made shared by removing
        # only the metadata, its start failed in libvirt ("Failed to create v2 cgroup …")
        raise Refusal(f"shared domain {spec.name!r} keeps <resource><partition>"
                      f"{spec.partition}</partition>, the partition pinwarden makes for it "
                      "only while it is exclusive: remove <resource> ('virsh edit "
                      f"{spec.name}'), or make it exclusive again", code="bad-partition")
    if manager.enforcing and manager.owners_gone().dead:
        # a holder whose owner died unreleased (a job's SIGKILL) is free in the ledger,
        # but its group keeps the CPUs exclusive until a sync: decided on as free, the
        # domain got them and libvirt failed "Permission denied" (hunt).  Freed first;
        # where that fails, its CPUs count as leased below.
        with contextlib.suppress(PinwardenError):
            manager.reap()
    host = manager.host()
    leases = manager.leases(dead=True, kept=True)
    from pinwarden.policy import decide

    plan = decide(spec, host, leases, holder=holder)
    if not leases:
        return
    extra = plan.cpus() - shared_pool(host, CpuSet.of(le.cpu for le in leases))[0]
    if extra:
        manager.sync(shared_extra=extra)


def _started(manager: Manager, driver: str, name: str, spec: DomainSpec) -> None:
    from pinwarden.libvirt import place

    if not spec.exclusive:
        if spec.cpuset is None:
            if driver == "qemu":
                place.place_default(manager, name, spec)
            else:
                place.place_container(manager, name, spec)
        return
    holder = _holder(driver, name, spec)
    pid = place.running_pid(driver, name)
    reader = manager.reader()
    record = reader.get(holder) if reader is not None else None
    if pid is not None and record is not None:
        manager.set_owner(holder, pid)
        if driver == "lxc":  # now that the container runs there: its group a partition
            manager.sync()
        else:  # each thread on the CPUs of its plan, not libvirt's default
            place.pin_exclusive(name, pid, record.plan)


def _release(manager: Manager, driver: str, name: str, spec: DomainSpec,
             who: Caller, after_release: AfterRelease | None = None) -> None:
    """Free the domain's leases when it is gone: its owner (QEMU) exited, or it is still
    libvirtd's (a start the hook reserved was refused or failed: libvirt calls ``release``
    then too).  A holder owned by another live process — ``pinwarden start`` rolling back
    its own start — or by nobody (``pinwarden reserve``) is not the hook's to free.  Once
    freed, ``after_release`` is called if narrowed pins wait for CPUs."""
    reader = manager.reader()
    if reader is None:
        return
    holder = _holder(driver, name, spec)
    record = reader.get(holder)
    if record is None and spec.exclusive and reader.host_record() is not None:
        # released while it ran ('pinwarden release --force'): its holder group was kept,
        # and the shared group narrowed with it, while its tasks were there; now they are
        # gone, so the layout goes back (before, it stayed until somebody's sync), and so
        # do the shared domains' CPUs (they stayed off them until the next release: hunt)
        manager.sync()
        _after_release(manager, holder, after_release)
        return
    if record is None or record.owner_pid is None:
        return
    # (an owner of another PID namespace counts as running, and is never the caller)
    if not record.owner_runs() or (record.owner_pid == _caller(who)
                                   and not record.owner_elsewhere):
        manager.drop(holder)
        _after_release(manager, holder, after_release)


def _after_release(manager: Manager, holder: HolderRef,
                   after_release: AfterRelease | None) -> None:
    """``after_release(holder)`` if narrowed pins wait for the CPUs ``holder`` had."""
    from pinwarden.narrowed import NARROWED_PREFIX

    if after_release is not None and manager.change_records(NARROWED_PREFIX):
        after_release(holder)


def main_run(manager: Manager, driver: str, argv: Sequence[str], stdin: str, *,
             caller: int | None = None, err: TextIO | None = None,
             after_release: AfterRelease | None = None,
             rewrite: TextIO | None = None) -> int:
    """``pinwarden hook run DRIVER NAME OP SUBOP EXTRA``: the exit status for libvirt.
    ``rewrite``: where the XML libvirt is to restore goes (``restore``), printed whole
    or not at all; None: a ``restore`` is left as it is (the daemon's hook server, whose
    client libvirt does not read for it).

    Only ``prepare`` may refuse: exit :data:`REFUSED` with the reason on stderr — for a
    placement refusal of any domain, and for any failure of an exclusive one (fail closed).
    A shared domain is never blocked by pinwarden's own failures (fail safe: a warning is
    logged).  A failure at any other step would not undo it — at ``started`` libvirt would
    kill the domain — so it is logged and the hook exits 0.
    """
    if driver not in DRIVERS:
        raise InputError(f"unknown hook driver {driver!r} (qemu or lxc)")
    if len(argv) < 2:
        raise InputError("the hook needs at least NAME and OPERATION (libvirt passes "
                         "NAME OP SUBOP EXTRA)")
    name, op = argv[0], argv[1]
    admit = action_for(op) == "admit"
    if action_for(op) == "rewrite" and rewrite is None:
        return 0
    out = err if err is not None else sys.stderr
    exclusive = asks_exclusive(stdin)
    try:
        with contextlib.nullcontext() if exclusive else \
                manager.waiting_at_most(SHARED_LOCK_WAIT):
            xml = run(manager, driver, name, op, stdin, caller=caller,
                      after_release=after_release)
        if xml is not None and rewrite is not None:
            rewrite.write(xml if xml.endswith("\n") else xml + "\n")
        return 0
    except Refusal as exc:
        if admit:
            _refuse(manager, exc.message, out)
            return REFUSED
        _warn(manager, f"hook {op} of {driver} domain {name!r}: {exc.message}", out)
    except Exception as exc:  # a broken pinwarden (PinwardenError) or a bug
        what = exc.message if isinstance(exc, PinwardenError) else \
            f"{type(exc).__name__}: {exc}".replace("\n", " ")
        if admit and exclusive:
            _refuse(manager, f"exclusive domain {name!r} cannot get its CPUs: {what}", out)
            return REFUSED
        tail = " and was let through unchecked" if admit else ""
        _warn(manager, f"hook {op} of {driver} domain {name!r} failed: {what}{tail}", out)
    return 0


def _refuse(manager: Manager, message: str, out: TextIO) -> None:
    print(f"pinwarden: error: {message}", file=out)
    log_line(manager, f"pinwarden: refused: {message}")


def _warn(manager: Manager, text: str, out: TextIO) -> None:
    line = f"pinwarden: warning: {text}"
    print(line, file=out)
    log_line(manager, line)


def log_line(manager: Manager, line: str) -> None:
    """libvirtd drops the stderr of a hook that exits 0: keep warnings in the state dir
    (made here if nothing has made it yet: a refusal or warning of a host's first start
    that leased nothing was not kept)."""
    log_to(manager.state_dir, line)


def log_to(state_dir: Path, line: str) -> None:
    """:func:`log_line` to the hook log of ``state_dir`` (no manager: it could not be
    made, its configuration is broken)."""
    with contextlib.suppress(OSError):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (state_dir / HOOK_LOG).open("a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
