"""``pinwarden run``: lease CPUs, run a command in an exclusive cpuset, give them back.

This is the process adapter: it forks, places and supervises the command.  Deciding which
CPUs is :func:`pinwarden.policy.decide` (a :class:`~pinwarden.policy.JobSpec`); recording
and enforcing them is the :class:`~pinwarden.manager.Manager`'s.

Lifecycle of a job J:

1. the manager reserves and enforces J's CPUs with the supervisor (this process) as owner,
   so a crash before the command starts frees them;
   ``<exclusive>/run-J.partition`` is created with J's CPUs (the shared partition
   shrinks first);
2. fork; the child waits on a pipe; the parent moves it into the cgroup, pins its affinity
   and makes it the lease *owner* before letting it ``exec`` — if the supervisor is
   killed, even by SIGKILL, the lease lives exactly as long as the command and is reaped
   by the next reservation (or the daemon); the supervisor then leaves the job's CPUs;
3. the supervisor forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to
   it (signals the terminal sends to the whole foreground group reach the command
   directly and are not sent twice);
4. when the command exits: the manager releases the lease and shrinks the layout (removes
   the group), and the supervisor exits with the command's status (``128 + N`` when killed
   by signal N).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.affinity import pin
from pinwarden.enforce.backend import CgroupBackend, CgroupOpError
from pinwarden.errors import EnforceError, InputError, PinwardenError
from pinwarden.manager import Manager
from pinwarden.model import job_holder
from pinwarden.policy import JobSpec

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
SI_KERNEL = 0x80  # siginfo si_code of signals the kernel (e.g. the terminal) generated
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,63}")


def check_name(name: str) -> str:
    """A job name: 1-64 letters, digits and ``_.@:+-``, starting with a letter or digit."""
    if not _NAME.fullmatch(name):
        from pinwarden.errors import shorten

        raise InputError(f"invalid job name {shorten(name)}: use 1-64 letters, digits and "
                         "_.@:+- (starting with a letter or digit)")
    return name


def _warn(message: str) -> None:
    print(f"pinwarden: warning: {message}", file=sys.stderr)


def _release(manager: Manager, name: str) -> None:
    """Give the job's CPUs back and remove its cgroup; problems become warnings.  Processes
    the command started that still run in the job's group keep the lease (one of them
    owns it now): the kernel keeps the CPUs theirs anyway."""
    holder = job_holder(name)
    try:
        heir = manager.hand_on(holder)
        if heir is not None:
            _warn(f"processes started by job {name!r} still run in its cgroup: its CPUs "
                  f"stay leased to them (process {heir} owns the lease now) until they "
                  f"exit; 'pinwarden release {name} --driver run --force' frees them now")
            return
        if manager.drop(holder) is None:
            # released already ('release --force' while it ran): the group the kernel
            # kept for its tasks goes now, and the shared group gets its CPUs back
            manager.sync()
    except PinwardenError as exc:
        _warn(exc.message)
        return
    _give_back(manager, name)
    left = manager.left_running(holder)
    if left:
        _warn(f"processes started by job {name!r} still run in cgroup "
              f"/{manager.holder_group(holder)} (pid {', '.join(map(str, left))}); it is "
              f"removed once they exit (at the next change pinwarden makes)")


def _give_back(manager: Manager, name: str) -> None:
    """Shared VMs placed or re-pinned off the job's CPUs get them back (no libvirt hook
    sees a job end: they stayed on fewer CPUs until a daemon's pass or a domain's lease
    ended); said on stderr, which the job's output does not use."""
    from pinwarden.narrowed import NARROWED_PREFIX

    try:
        if not manager.change_records(NARROWED_PREFIX):
            return
        from pinwarden.config import libvirt_uri
        from pinwarden.libvirt import pins

        given, failure = pins.give_back_now(manager, libvirt_uri(None, manager.config))
    except (PinwardenError, ImportError) as exc:
        given, failure = (), str(getattr(exc, "message", exc))
    for move in given:
        print(f"pinwarden: gave back {move}", file=sys.stderr)
    if failure is not None:
        _warn(f"shared VMs kept off job {name!r}'s CPUs do not have them back ({failure}): "
              "'pinwarden sync' or the daemon's next pass gives them back")


def _child(read_fd: int, command: Sequence[str], env: dict[str, str], *,
           stdout_to_stderr: bool = False) -> None:
    """In the forked child: wait for the go, restore signals, exec.  Never returns.
    ``stdout_to_stderr``: the command writes its standard output to standard error
    (``run --json``, whose standard output is the JSON document alone)."""
    try:
        if stdout_to_stderr:
            os.dup2(2, 1)
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


def supervise(backend: CgroupBackend, name: str, group: str, cpus: CpuSet,
              command: Sequence[str], set_owner: Callable[[int], None], *,
              stdout_to_stderr: bool = False) -> int:
    """Fork, place and run ``command``; forward signals; return its exit status.
    ``set_owner(pid)`` makes the command the lease's owner before it runs;
    ``stdout_to_stderr``: see :func:`_child`."""
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
            _child(read_fd, command, env, stdout_to_stderr=stdout_to_stderr)
        os.close(read_fd)
        try:
            backend.attach_process(group, pid)
            pin({pid: cpus})
            set_owner(pid)
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
        _leave(cpus)
        return _wait(pid, watched)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _leave(cpus: CpuSet) -> None:
    """The supervisor waits off its job's CPUs.  Where the job's group is a partition the
    kernel keeps it off already; a plain cpuset (cgroup v1's root cpuset, where it stays;
    a holder over ``isolcpus=`` CPUs on Linux 6.12) does not, and the audit rightly counted
    the supervisor among the tasks that may run on the lease (6.12 lab)."""
    with contextlib.suppress(OSError):
        mine = os.sched_getaffinity(0)
        rest = mine - set(cpus)
        if rest and rest != mine:
            os.sched_setaffinity(0, rest)


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


def _not_enforcing(manager: Manager, name: str) -> str:
    """Why job ``name`` cannot run under ``manager``, which does not enforce (a ``--root``
    dump: pinwarden changes the cgroups of the host it runs on only)."""
    import shlex

    from pinwarden.manager import is_live_root

    root = manager.root
    why = ("this manager does not enforce CPUs" if is_live_root(root) else
           f"pinwarden enforces CPUs only on the host it runs on (--root /), and --root "
           f"{shlex.quote(str(root))} is a host dump")
    return (f"job {name!r} not run: {why}, so nothing would keep other tasks off its CPUs; "
            "--dry-run shows the job's plan and cgroup writes without running it")


def run_job(manager: Manager, job: JobSpec, command: Sequence[str], *,
            stdout_to_stderr: bool = False) -> int:
    """Run ``command`` as ``job`` on exclusive CPUs; return its exit status
    (``stdout_to_stderr``: see :func:`_child`)."""
    if not command:
        raise InputError("no command given: pinwarden run [OPTIONS] -- COMMAND [ARG...]")
    holder = job_holder(job.name)
    if not manager.enforcing:  # refused before anything is leased
        raise EnforceError(_not_enforcing(manager, job.name))
    from pinwarden.interrupts import EndedAfterChange, InterruptedAfterChange, ending_raises

    # A SIGINT, SIGTERM or SIGHUP while the CPUs are reserved waits for the reservation, is
    # raised here, and stays blocked until the job is released: a command that never ran
    # must not keep them (it used to: the process ended with the lease recorded and the
    # host narrowed).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    try:
        try:
            with ending_raises():
                reserved = manager.reserve_request(job, owner_pid=os.getpid())
        except InterruptedAfterChange as exc:
            _release(manager, job.name)
            if isinstance(exc, EndedAfterChange):
                # ends here, released, by its signal (the held one was taken, not left
                # pending: it ended as a Ctrl-C, exit 130, CLI hunt)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                os.kill(os.getpid(), exc.signum)
            raise KeyboardInterrupt(f"before job {job.name!r} ran (its CPUs are free "
                                    "again)") from None
        try:
            if reserved.group is None:
                raise EnforceError(f"no cgroup was planned for job {job.name!r}")
            cpus = reserved.plan.emulator
            return supervise(manager.backend(), job.name, reserved.group, cpus, command,
                             lambda pid: manager.set_owner(holder, pid),
                             stdout_to_stderr=stdout_to_stderr)
        finally:
            _release(manager, job.name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what waited acts now
