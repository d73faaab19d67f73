"""The daemon's end of the hook client: answer libvirt hook calls with a warm pinwarden.

:mod:`pinwarden.libvirt.hookclient` (run by the drop-in script) sends each hook call to
``STATE_DIR/hook.sock``; this server runs it exactly as ``pinwarden hook run`` would
(:func:`pinwarden.libvirt.hook.main_run`, same exit status, same message) with a manager of
its own that stays open — topology, backend and ledger already read — so a hook call costs
a few milliseconds instead of a Python start of pinwarden.  One call at a time, in one
thread (the lease lock serialises changes with every other pinwarden anyway).  The same
socket takes ``pinwarden start`` handed over by the command line; those run in workers of
their own (:mod:`pinwarden.libvirt.startserver`), since the hook calls they cause come
back here.

Only root may call (``SO_PEERCRED``).  A call made with another configuration than the
daemon's (the hook installed with ``--config`` for another file) is answered with
``fallback``: the client then runs the full hook command itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinwarden.config import DEFAULT_CONFIG, Config, load_config
from pinwarden.errors import PinwardenError
from pinwarden.libvirt import hook, hookclient
from pinwarden.manager import Manager

if TYPE_CHECKING:
    from pinwarden.libvirt.startserver import StartWorkers

log = logging.getLogger("pinwarden.daemon")

#: The largest request read (a domain XML with thousands of devices is a few MB).
MAX_REQUEST = 64 << 20
#: How long a client may take to send its whole request: less than the hook client's
#: ``ACK_TIMEOUT``, so that one connection that sends nothing (a client stopped) does not
#: make every call behind it go to the full command (it was 10 s, for each read: hunt).
READ_TIMEOUT = 2.0
#: How long a stopping daemon waits for the starts it is running (libvirt's own start), and
#: then for the hook call it has taken.
STOP_TIMEOUT = 60.0
#: Settings that change a hook decision: a hook installed with a configuration that differs
#: in any of them must not be answered by this daemon.
#: (The state directory matches by construction: the socket lives in it.)
_RULES = ("mode", "host_reserve", "cgroup_v1", "cgroup_v2", "exclusive_cgroup",
          "isolate_noise")


def same_rules(a: Config, b: Config) -> bool:
    return all(getattr(a, name) == getattr(b, name) for name in _RULES)


class HookServer:
    """Serve hook calls on ``path`` until :meth:`close`."""

    def __init__(self, manager: Manager, path: Path) -> None:
        self.manager = manager
        self.path = path
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._configs: dict[str, Config | None] = {}
        self._starts: StartWorkers | None = None
        self._closing = False
        self._inode: int | None = None  # of the socket file this server made

    def start(self) -> bool:
        """Bind and serve in a thread; False (logged) when another daemon already serves
        this state directory or the socket cannot be made."""
        try:
            if _answers(self.path):
                log.warning("another pinwarden daemon already answers hook calls at %s",
                            self.path)
                return False
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()  # left by a daemon that died
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(16)
            sock.settimeout(1.0)
            self._inode = self.path.lstat().st_ino
        except OSError as exc:
            log.warning("cannot answer hook calls at %s (%s): every hook call starts "
                        "pinwarden itself", self.path, exc.strerror or exc)
            return False
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="hook-server", daemon=True)
        self._thread.start()
        log.info("answering libvirt hook calls at %s", self.path)
        return True

    def close(self) -> None:
        # starts in progress first, while this thread still answers the hook calls they
        # make; new ones are left to their commands meanwhile
        self._closing = True
        if self._starts is not None:
            self._starts.close(timeout=STOP_TIMEOUT)
        self._stop.set()
        if self._thread is not None:
            # a call it has taken is answered: its client no longer goes to the full command
            # (after 5 s here, an exclusive start waiting for the lease lock was refused as
            # if pinwarden were broken: daemon hunt)
            self._thread.join(timeout=STOP_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                # only its own: a daemon that took the path over meanwhile keeps its socket
                # (it was unlinked, and that daemon answered nobody any more: daemon hunt)
                if self.path.lstat().st_ino == self._inode:
                    self.path.unlink()
        self.manager.close()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("hook server: %s", exc)
                continue
            handed = False
            try:
                handed = self._answer(conn)
            except Exception as exc:  # never let one call stop the server
                log.error("hook server: %s: %s", type(exc).__name__, exc)
            finally:
                if not handed:
                    conn.close()

    def _answer(self, conn: socket.socket) -> bool:
        """Answer one connection; True when it was handed to a start worker (which answers
        and closes it)."""
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.geteuid():
            log.warning("hook server: refused a call from uid %s (pid %s)", uid, pid)
            return False
        # the whole request within READ_TIMEOUT, not each piece of it: a client sending a
        # byte now and then held the one hook thread — every other call waited for it,
        # then went to the full command (daemon hunt)
        deadline = time.monotonic() + READ_TIMEOUT
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole request within {READ_TIMEOUT:g} s")
            conn.settimeout(left)
            chunk = conn.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_REQUEST:
                raise ValueError(f"request larger than {MAX_REQUEST} bytes")
            chunks.append(chunk)
        conn.settimeout(None)
        if not chunks:  # a probe (another daemon starting: is one here?), not a call
            return False
        request = json.loads(b"".join(chunks))
        if isinstance(request, dict) and request.get("ack") is True:
            # taken, as soon as it is read (whatever the answer: a fallback too), unless
            # its client gave up waiting and went to the full command meanwhile
            if _gone(conn):
                log.info("call from pid %s not answered: its client had gone to the full "
                         "command", pid)
                return False
            conn.sendall(hookclient.ACK)
        elsewhere = _other_namespace(pid) if isinstance(request, dict) and \
            request.keys() & {"args", "start", "quick_start"} else None
        if elsewhere is not None:
            # a hook call names libvirtd by a pid of its namespace, which here is another
            # process or none; a start served here sees the processes of this one (a
            # daemon in a container refused, or failed, a start the host's command makes)
            log.debug("call from pid %s left to the full command: %s", pid, elsewhere)
            _send(conn, {"fallback": elsewhere})
            return False
        if isinstance(request, dict) and request.get("v") == hookclient.PROTOCOL and \
                "quick_start" in request:
            from pinwarden.libvirt import startserver

            resolved = startserver.resolve(request["quick_start"], self._config)
            if isinstance(resolved, str):
                log.debug("start from pid %s left to the command: %s", pid, resolved)
                _send(conn, {"fallback": resolved})
                return False
            request = resolved
        if isinstance(request, dict) and request.get("v") == hookclient.PROTOCOL and \
                "start" in request:
            return self._start(conn, request, pid)
        _send(conn, self.call(request))
        return False

    def _start(self, conn: socket.socket, request: dict[str, Any], pid: int) -> bool:
        """A ``pinwarden start`` handed over by the command (:mod:`.startserver`): run in a
        worker, never here, where the hook calls it makes are answered."""
        from pinwarden.libvirt import startserver

        reason = "the daemon is stopping" if self._closing else \
            startserver.why_not(request, self.manager)
        if reason is not None:
            log.debug("start from pid %s left to the command: %s", pid, reason)
            _send(conn, {"fallback": reason})
            return False
        if self._starts is None:
            self._starts = startserver.StartWorkers(self.manager.config, self.manager.root,
                                                    self.manager.state_dir)
        busy = self._starts.submit(request, startserver.reply_to(conn, _send))
        if busy is not None:
            log.info("start from pid %s left to the command: %s", pid, busy)
            _send(conn, {"fallback": busy})
            return False
        return True

    def call(self, request: Any) -> dict[str, Any]:
        """One hook call, as the hook client sends it; the answer it expects."""
        if not isinstance(request, dict) or request.get("v") != hookclient.PROTOCOL:
            return {"fallback": "unknown request"}
        if request.get("ping") is True:  # 'pinwarden hook check'
            return {"pong": True}
        driver, args, stdin = request.get("driver"), request.get("args"), request.get("stdin")
        caller, config = request.get("caller"), request.get("config")
        if not (isinstance(driver, str) and isinstance(args, list)
                and all(isinstance(a, str) for a in args) and isinstance(stdin, str)
                and (caller is None or isinstance(caller, int)) and isinstance(config, str)):
            return {"fallback": "malformed request"}
        theirs = self._config(config)
        if theirs is None or not same_rules(theirs, self.manager.config):
            return {"fallback": "the hook uses another configuration than the daemon"}
        err = io.StringIO()
        start = time.perf_counter()
        try:
            rc = hook.main_run(self.manager, driver, args, stdin, err=err,
                               caller=hook.UNKNOWN_CALLER if caller is None else caller)
        except PinwardenError as exc:  # a usage error of the hook call itself
            return {"rc": 1, "stderr": f"pinwarden: error: {exc.message}\n"}
        log.debug("hook %s of %s domain %s: exit %s after %.1f ms", " ".join(args[1:2]),
                  driver, args[0] if args else "?", rc, (time.perf_counter() - start) * 1e3)
        return {"rc": rc, "stderr": err.getvalue()}

    def _config(self, path: str) -> Config | None:
        """The configuration file ``path`` (``-``: the default one) as the command would
        read it now: cached until the file changes.  None: it cannot be used here — also
        anything but a regular file (or none at the default path): ``/dev/stdin``, a
        ``--config <(…)`` pipe mean another thing in the daemon's process, whose hook
        thread read its own stdin until it closed, or an empty configuration that passed
        for the defaults (daemon hunt); the command line reads those itself."""
        key = path
        try:
            found = os.stat(DEFAULT_CONFIG if path == "-" else path)
        except OSError:
            found = None
        if found is not None:
            if not stat.S_ISREG(found.st_mode):
                return None
            key = f"{path}\0{found.st_mtime_ns}"
        if key not in self._configs:
            try:
                self._configs[key] = load_config(None if path == "-" else Path(path))
            except PinwardenError:
                self._configs[key] = None
        return self._configs[key]


def _gone(conn: socket.socket) -> bool:
    """Whether the client closed its end of ``conn`` (it stopped waiting for us)."""
    import select

    poller = select.poll()
    poller.register(conn, select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def _other_namespace(pid: int) -> str | None:
    """Why the client ``pid`` (its ``SO_PEERCRED`` pid, as this process sees it) runs in
    another PID namespace than the daemon, or None: its call is left to the full command,
    run where the client runs (a libvirtd in a container of its own, the daemon on the
    host; or the daemon in one)."""
    from pinwarden import procs

    if pid <= 0:  # (the kernel's 0: the client is out of this namespace's sight)
        return "the caller runs in a PID namespace the daemon cannot see"
    try:
        theirs = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None  # (gone meanwhile: nothing waits for the answer)
    ours = procs.pid_namespace()
    if ours is not None and theirs != ours:
        return "the caller runs in another PID namespace than the daemon"
    return None


def _send(conn: socket.socket, answer: dict[str, Any]) -> None:
    conn.sendall(json.dumps(answer).encode())


def _answers(path: Path) -> bool:
    """Whether a daemon listens at ``path`` — also one whose queue of connections is full
    (stopped or busy: taken over, its socket was unlinked by it later: daemon hunt)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
        return True
    except (BlockingIOError, TimeoutError):
        return True
    except OSError:
        return False
    finally:
        probe.close()


def serve(manager: Manager) -> HookServer | None:
    """Answer hook calls for ``manager``'s state directory with a manager of its own."""
    try:
        manager.ledger()  # the state directory exists from here on
    except PinwardenError as exc:
        log.warning("cannot answer hook calls: %s", exc.message)
        return None
    # its own manager, used only in the server's thread (a ledger connection stays in the
    # thread that opened it)
    own = Manager(manager.config, manager.root, manager.state_dir, warn=log.warning)
    server = HookServer(own, manager.state_dir / hook.SOCKET_NAME)
    if not server.start():
        own.close()
        return None
    return server
