"""The daemon's ``pinwarden start``: a start handed over by the command line, run warm.

``pinwarden start NAME`` costs a Python start of pinwarden, its imports, a libvirt
connection and a fresh read of the host before the libvirt call that is the start itself.
When a daemon runs for the same state directory, with the same configuration and host
root, the command sends the start to the daemon's socket (``STATE_DIR/hook.sock``, the one
the hook client uses) and prints what the daemon answers: the same
:func:`pinwarden.libvirt.start.start`, run by a warm manager on a kept connection, with the
same output, warnings and exit status the command would have given.

A start runs in a worker thread of its own, never in the hook server's thread: libvirtd
runs pinwarden's hook inside the start, and that call reaches the same daemon.  Starts do
not wait for each other (the lease lock and the per-domain start lock serialise what must
be serialised, as between separate processes); each worker keeps its own manager (a ledger
connection belongs to the thread that opened it) and libvirt connections.

The request (its ``"v"`` the hook client's
:data:`~pinwarden.libvirt.hookclient.PROTOCOL`)::

    {"v": 2, "start": {"name": NAME, "uri": URI, "json": BOOL},
     "rules": repr(Config), "root": ROOT, "state_dir": STATE_DIR}

and the answer ``{"rc": STATUS, "stdout": TEXT, "stderr": TEXT}``, or ``{"fallback":
REASON}`` when this daemon cannot stand in for the command (it then runs the start itself).
At most :data:`MAX_STARTS` run at once; the daemon leaves one more to its command.
Once the daemon has the request the start is the daemon's: interrupting the command does
not stop it (the domain starts, and ``virsh domstate`` says so), and a daemon told to stop
finishes the starts it runs first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pinwarden.config import Config
from pinwarden.errors import PinwardenError
from pinwarden.libvirt import hookclient
from pinwarden.manager import Manager

log = logging.getLogger("pinwarden.daemon")

#: Idle workers kept warm for the next starts.
WORKERS = 4
#: Starts served at once; a start beyond them is left to its command (``fallback``), so
#: that a burst of starts cannot grow the daemon by a thread and a manager each.
MAX_STARTS = 16

Reply = Callable[[dict[str, Any]], None]


def resolve(quick: Any, load: Callable[[str], Config | None]) -> dict[str, Any] | str:
    """The start request the command line would send for the plain form the console script
    sent as given (:mod:`pinwarden.quickstart`), resolved as the command line resolves it;
    or why it cannot be (the command line then runs, and says so itself).  ``load``: the
    daemon's cached reading of a configuration file (``-``: the default one; None: it
    cannot be read)."""
    from pinwarden.config import libvirt_uri_from, state_dir_from
    from pinwarden.libvirt.uri import check_uri

    if not isinstance(quick, dict):
        return "malformed start request"
    name, as_json = quick.get("name"), quick.get("json")
    fields = [quick.get(k) for k in ("config", "state_dir", "env_state_dir", "env_uri")]
    if not (isinstance(name, str) and isinstance(as_json, bool)
            and all(f is None or (isinstance(f, str) and f) for f in fields)):
        return "malformed start request"
    config_path, given_state, env_state, env_uri = fields
    config = load(config_path if isinstance(config_path, str) else "-")
    if config is None:
        return "the command's configuration file cannot be used"
    state = state_dir_from(Path(given_state) if given_state else None, env_state, config)
    uri = libvirt_uri_from(None, env_uri, config)
    try:
        check_uri(uri, root=True)  # (only root's calls are answered)
    except PinwardenError as exc:
        return exc.message
    return {"v": hookclient.PROTOCOL, "start": {"name": name, "uri": uri, "json": as_json},
            "rules": repr(config), "root": "/", "state_dir": str(state)}


def why_not(request: dict[str, Any], manager: Manager) -> str | None:
    """Why this daemon (running ``manager``) cannot serve the start ``request``, or None."""
    start = request.get("start")
    if not (isinstance(start, dict) and isinstance(start.get("name"), str)
            and isinstance(start.get("uri"), str) and isinstance(start.get("json"), bool)):
        return "malformed start request"
    if request.get("rules") != repr(manager.config):
        return "the command uses another configuration than the daemon"
    if request.get("root") != os.path.abspath(manager.root):
        return "the command uses another host root than the daemon"
    state = request.get("state_dir")
    if not isinstance(state, str) or not _same_dir(Path(state), manager.state_dir):
        return "the command uses another state directory than the daemon"
    return None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class StartWorkers:
    """Run served starts in threads of their own, each with its own manager: a start
    never waits for another (as separate commands would not); up to :data:`WORKERS` idle
    workers are kept, warm, for the next ones."""

    def __init__(self, config: Config, root: Path, state_dir: Path) -> None:
        self.config, self.root, self.state_dir = config, root, state_dir
        self._jobs: queue.Queue[tuple[dict[str, Any], Reply] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a job
        self._queued = 0  # jobs no worker has taken yet
        self._running = 0  # starts submitted and not yet answered
        self._lock = threading.Lock()

    def submit(self, request: dict[str, Any], reply: Reply) -> str | None:
        """Queue one start; ``reply(answer)`` is called from the worker when it is done.
        Returns why the start was not taken (:data:`MAX_STARTS` run already), else None."""
        with self._lock:
            if self._running >= MAX_STARTS:
                return f"the daemon runs {self._running} starts already"
            self._running += 1
            self._queued += 1
            if self._queued > self._idle:
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"start-{len(self._threads) + 1}")
                self._threads.append(thread)
                self._idle += 1
                thread.start()
        self._jobs.put((request, reply))
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Let the starts in progress finish (at most ``timeout`` seconds in all), then end
        the workers."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        said: list[str] = []
        manager: Manager | None = None
        conns: dict[str, Any] = {}
        try:
            while (job := self._jobs.get()) is not None:
                with self._lock:
                    self._idle -= 1
                    self._queued -= 1
                request, reply = job
                said.clear()
                try:
                    if manager is None:
                        manager = Manager(self.config, self.root, self.state_dir,
                                          warn=said.append)
                    answer = _serve(manager, conns, request["start"], said)
                except Exception as exc:  # a bug: the command's own last resort, in one line
                    text = " ".join(str(exc).split())
                    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
                    log.error("served start: internal error: %s", what)
                    log.debug("the traceback:", exc_info=True)
                    answer = {"rc": os.EX_SOFTWARE, "stdout": "",
                              "stderr": f"pinwarden: internal error: {what} (a bug: please "
                                        f"report it; 'pinwarden daemon -v' logs the "
                                        f"traceback)\n"}
                with self._lock:
                    self._running -= 1  # before the answer: its command may start another
                with contextlib.suppress(OSError):
                    reply(answer)
                with self._lock:
                    if self._idle >= WORKERS:  # enough warm workers wait already
                        return
                    self._idle += 1
        finally:
            for conn in conns.values():
                with contextlib.suppress(Exception):
                    conn.close()
            if manager is not None:
                manager.close()


def _serve(manager: Manager, conns: dict[str, Any], start: dict[str, Any],
           said: list[str]) -> dict[str, Any]:
    from pinwarden import jsonout
    from pinwarden.cli.vm import start_report
    from pinwarden.libvirt import connect as lv
    from pinwarden.libvirt.start import start as start_domain

    name, uri, as_json = start["name"], start["uri"], start["json"]
    began = time.perf_counter()
    stdout = ""
    try:
        conn = conns.get(uri)
        if conn is None or not _alive(conn):
            conns.pop(uri, None)
            conn = conns[uri] = lv.open_connection(uri)
        result = start_domain(manager, uri, name, conn=conn)
        stdout, rc = start_report(result, as_json), 0
        error = ""
    except PinwardenError as exc:
        message = exc.message.replace("\n", " ")
        error, rc = f"pinwarden: error: {message}\n", 1
        if as_json:
            stdout = jsonout.dumps({"error": {"code": exc.code, "message": message}}) + "\n"
    log.info("served 'pinwarden start %s': exit %s after %.0f ms", name, rc,
             (time.perf_counter() - began) * 1e3)
    warnings = "".join(f"pinwarden: warning: {m}\n" for m in said)
    return {"rc": rc, "stdout": stdout, "stderr": warnings + error}


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # the binding's own error: a connection that cannot say is dead
        return False


def reply_to(conn: socket.socket, send: Callable[[socket.socket, dict[str, Any]], None],
             ) -> Reply:
    """A :data:`Reply` that answers on ``conn`` and closes it."""
    def reply(answer: dict[str, Any]) -> None:
        try:
            send(conn, answer)
        finally:
            conn.close()
    return reply
