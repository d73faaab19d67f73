"""``pinwarden run``: lease CPUs, run a command in an exclusive cpuset, give them back.

This is the adapter: it reads the host, talks to the ledger, the cgroup backend and the
process.  Deciding which CPUs is :func:`pinwarden.jobs.decide_job` (pure); the cgroup
layout is :mod:`pinwarden.enforce`.

Lifecycle of a job J:

1. ``reserve`` in the ledger with the supervisor (this process) as owner, so a crash before
   the command starts frees the CPUs;
2. layout sync: ``<exclusive>/run-J.partition`` is created with J's CPUs (the shared
   partition shrinks first);
3. fork; the child waits on a pipe; the parent moves it into the cgroup, pins its affinity
   and makes it the lease *owner* (``ledger.set_owner``) before letting it ``exec`` —
   if the supervisor is killed, even by SIGKILL, the lease lives exactly as long as the
   command and is reaped by the next ledger user;
4. the supervisor forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to
   it (signals the terminal sends to the whole foreground group reach the command
   directly and are not sent twice);
5. when the command exits: release the lease, sync the layout (removes the group), and exit
   with the command's status (``128 + N`` when killed by signal N).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pinwarden.config import Config
from pinwarden.enforce.affinity import pin
from pinwarden.enforce.apply import Result, locked, sync
from pinwarden.enforce.backend import CgroupBackend, CgroupOpError
from pinwarden.enforce.layout import LayoutNames, holder_group_path
from pinwarden.enforce.select import layout_names, open_backend
from pinwarden.errors import EnforceError, LedgerError, PinwardenError
from pinwarden.jobs import JobRequest, decide_job, job_holder
from pinwarden.ledger import Ledger
from pinwarden.model import Plan
from pinwarden.partition import Host, load_host

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
SI_KERNEL = 0x80  # siginfo si_code of signals the kernel (e.g. the terminal) generated
LOCK_NAME = "enforce.lock"


@dataclass(frozen=True)
class Context:
    """Everything a job needs, read once."""

    host: Host
    backend: CgroupBackend
    names: LayoutNames
    state_dir: Path

    @classmethod
    def load(cls, config: Config, root: Path, state_dir: Path,
             backend: CgroupBackend | None = None) -> Context:
        backend = backend if backend is not None else open_backend(root)
        return cls(load_host(root, config), backend, layout_names(config, backend),
                   state_dir)


def sync_layout(ctx: Context, ledger: Ledger) -> Result:
    """Make the cgroups match the ledger (reaping dead owners first); serialised."""
    with locked(ctx.state_dir / LOCK_NAME):
        leases = ledger.leases()
        return sync(ctx.backend, ctx.host, leases, ctx.names)


def sweep(ctx: Context, ledger: Ledger) -> Result | None:
    """Reap holders whose owner died and, if that freed anything or a holder group has no
    lease any more (a job whose supervisor was killed), sync the layout.  For ``status``
    and other read-mostly commands: no cgroup write when everything is in order."""
    reaped = ledger.reap()
    tree = ctx.names.exclusive
    state = ctx.backend.read_state([tree])
    if tree not in state and not reaped:
        return None
    wanted = {holder_group_path(ctx.names, r.ref) for r in ledger.holders(reap=False)}
    stale = [p for p in state.children(tree) if p not in wanted]
    if not reaped and not stale:
        return None
    return sync_layout(ctx, ledger)


def _warn(message: str) -> None:
    print(f"pinwarden: warning: {message}", file=sys.stderr)


def _release(ctx: Context, ledger: Ledger, name: str) -> None:
    """Give the job's CPUs back and remove its cgroup; problems become warnings."""
    try:
        ledger.release(name, driver="run")
    except LedgerError as exc:
        if exc.code != "unknown-holder":  # already reaped: fine
            _warn(exc.message)
    try:
        result = sync_layout(ctx, ledger)
    except PinwardenError as exc:
        _warn(f"the CPUs of job {name!r} are released but its cgroup could not be "
              f"removed: {exc.message}")
        return
    group = holder_group_path(ctx.names, job_holder(name))
    left = [p for p in result.after.groups if p == group]
    if left:
        _warn(f"processes started by job {name!r} still run in cgroup /{left[0]}; it is "
              f"removed once they exit (next pinwarden run or status)")


def _child(read_fd: int, command: Sequence[str], env: dict[str, str]) -> None:
    """In the forked child: wait for the go, restore signals, exec.  Never returns."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED):
            signal.signal(sig, signal.SIG_DFL)
        go = os.read(read_fd, 1)
        if go != b"1":  # the supervisor died before the command was placed
            os._exit(125)
        os.close(read_fd)
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        os.write(2, f"pinwarden: cannot run {command[0]}: {exc.strerror}\n".encode())
        os._exit(127 if exc.errno == 2 else 126)
    finally:
        os._exit(127)


def supervise(ctx: Context, ledger: Ledger, name: str, group: str, plan: Plan,
              command: Sequence[str]) -> int:
    """Fork, place and run ``command``; forward signals; return its exit status."""
    holder = job_holder(name)
    cpus = plan.emulator
    env = dict(os.environ, PINWARDEN_JOB=name, PINWARDEN_CPUS=cpus.to_list())
    watched = {*FORWARDED, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs
            os.close(write_fd)
            _child(read_fd, command, env)
        os.close(read_fd)
        try:
            ctx.backend.attach_process(group, pid)
            pin({pid: cpus})
            ledger.set_owner(holder, pid)
        except (CgroupOpError, PinwardenError) as exc:
            os.close(write_fd)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if isinstance(exc, CgroupOpError):
                raise EnforceError(f"cannot move the command into cgroup /{group}: "
                                   f"{exc}") from None
            raise
        os.write(write_fd, b"1")
        os.close(write_fd)
        return _wait(pid, watched)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _wait(pid: int, watched: set[signal.Signals]) -> int:
    own_group = os.getpgrp()
    while True:
        info = signal.sigwaitinfo(watched)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code
            continue
        # the terminal signals the whole foreground process group: the command got it too
        if info.si_code == SI_KERNEL and os.getpgid(pid) == own_group:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, info.si_signo)


def run_job(ctx: Context, request: JobRequest, command: Sequence[str]) -> int:
    """Run ``command`` as job ``request.name`` on exclusive CPUs; return its exit status."""
    if not command:
        raise PinwardenError("no command given: pinwarden run [OPTIONS] -- COMMAND [ARG...]",
                             code="bad-input")
    holder = job_holder(request.name)
    with Ledger(ctx.state_dir) as ledger:
        plan = ledger.reserve(holder, lambda leases: decide_job(request, ctx.host, leases),
                              owner_pid=os.getpid())
        try:
            result = sync_layout(ctx, ledger)
            spec = result.desired.group_of(holder) if result.desired else None
            if spec is None:
                raise EnforceError(f"no cgroup was planned for job {request.name!r}")
            ledger.set_cgroup(holder, spec.path)
            return supervise(ctx, ledger, request.name, spec.path, plan, command)
        finally:
            _release(ctx, ledger, request.name)
