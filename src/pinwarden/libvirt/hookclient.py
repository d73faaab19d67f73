"""The libvirt hook's thin client: hand one hook call to the running pinwarden daemon.

libvirtd waits for its hooks on every domain start.  Starting pinwarden in a fresh Python
(imports, reading the host, opening the ledger) costs far more than the decision, so the
drop-in script runs this file instead, with ``python3 -I -S`` and nothing but the standard
library: it sends the call to the daemon's socket (``STATE_DIR/hook.sock``), where a warm
pinwarden answers, and exits with the daemon's status and message.  Where no daemon
answers (not running, another state directory or configuration) it runs the full hook
command given to it, so the result is the same either way, only slower.

    python3 -I -S hookclient_main.py SOCKET CONFIG DRIVER N FALLBACK_1 … FALLBACK_N NAME OP …

(``hookclient_main.py`` imports this module, so that it loads from its cached bytecode;
``python3 -I -S hookclient.py …`` does the same, compiling this file first.)

``CONFIG`` is the configuration file the hook was installed with (``-``: the default);
the daemon answers only when it runs with the same configuration.  The protocol, one
request and one answer per connection, each a JSON object followed by end of stream:

    request  {"v": 2, "driver": D, "args": [NAME, OP, SUBOP, EXTRA], "stdin": XML,
              "caller": PID-of-libvirtd-or-null, "config": CONFIG, "ack": true}
    answer   ACK, then {"rc": STATUS, "stderr": TEXT}  or  {"fallback": REASON}

``v`` is :data:`PROTOCOL`: a daemon answers ``fallback`` to any other, so one of an older
pinwarden still running after an upgrade leaves the calls of this one to the full command
(it served them on a lease database it could not read: upgrade hunt).

The daemon sends the byte :data:`ACK` as soon as it has read a call that asks for it; a
call not taken within :data:`ACK_TIMEOUT` seconds (a daemon stopped, stuck or busy) goes
to the full command, and the daemon answers no call whose client has gone.

This module must import nothing from pinwarden (it runs without site-packages), and as
little as it can: it speaks through the C halves of ``socket`` and ``json`` (``_socket``,
``_json``), because the modules around them load ``enum`` and ``re``, which took two thirds
of this client's start (about 20 ms a hook call; issue #12); for the same reason it calls
the system through ``posix`` (built in) rather than ``os``, and has no ``__future__``
import.  The bytes on the wire are those ``json.dumps`` and ``json.loads`` give and take
(tests/test_hookserver.py checks).
"""

import posix
import sys

#: The protocol's version (the requests' ``"v"``): 2 since the lease database's schema 3,
#: which a daemon of an older pinwarden cannot read.
PROTOCOL = 2

try:
    import _json
    import _socket as _net
except ImportError:  # an interpreter without CPython's C modules: the whole ones
    import json as _json_module
    import socket as _net  # type: ignore[no-redef]

    _json = None  # type: ignore[assignment]

#: How long a daemon may take to answer (it may wait for the lease lock, as the in-process
#: hook would); then the call fails like a broken pinwarden (the drop-in's fail-safe: a
#: domain that asks for nothing exclusive starts, an exclusive one is refused).  A domain
#: without pinwarden's metadata waits less: a wedged daemon must not hold its start long.
TIMEOUT = 150.0
SHARED_TIMEOUT = 30.0
#: How long a daemon may take to take a call — to read it and say so (:data:`ACK`) —
#: before the call goes to the full command instead: a daemon stopped (SIGSTOP), stuck,
#: or busy with a call that waits for the lease lock held 5 minutes of exclusive starts
#: and one of shared ones (the whole timeouts above, then failure; hunt).  The daemon
#: answers no call whose client has gone meanwhile.
ACK_TIMEOUT = 3.0
#: The byte a daemon sends once it has read a call that asked for it (``"ack": true``).
ACK = b"\x06"
PW_NAMESPACE = b"urn:pinwarden:domain:1"
#: The daemon's socket, in its state directory, and the hook log beside it.
SOCKET_NAME = "hook.sock"
HOOK_LOG = "hook.log"
#: Exit status for "pinwarden did not work" (the drop-in lets shared domains through).
EX_SOFTWARE = 70
#: Exit status for "pinwarden did not work, and said why on stderr": the drop-in lets
#: shared domains through and refuses exclusive ones as for :data:`EX_SOFTWARE`, without
#: adding that the installation is broken (``pinwarden.libvirt.hook.EXPLAINED``).
EXPLAINED = 4
#: The libvirt daemons that run hooks (``pinwarden.libvirt.hook.HOOK_DAEMON_NAMES``).
DAEMON_NAMES = (b"libvirtd", b"virtqemud", b"virtlxcd")


def caller_pid() -> int | None:
    """libvirtd (or virtqemud): the parent of the drop-in script, our parent (the script's
    shell forks us as the last command of its pipeline; its name is the script's)."""
    try:
        with open(f"/proc/{posix.getppid()}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    if ppid == 1:  # a libvirt daemon that is PID 1 (a container), or the shell orphaned
        try:
            with open("/proc/1/comm", "rb") as f:
                return 1 if f.read().strip() in DAEMON_NAMES else None
        except OSError:
            return None
    return ppid if ppid > 1 else None


def encode(value: object) -> str:
    """``json.dumps(value)`` for what a request holds (objects with string keys, lists,
    strings, integers, None, booleans)."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, str):
        if _json is None:
            return str(_json_module.dumps(value))
        return _json.encode_basestring_ascii(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(encode, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{encode(str(k))}: {encode(v)}" for k, v in value.items()) \
            + "}"
    raise TypeError(f"cannot encode {type(value).__name__}")


class _Rules:
    """What ``_json``'s scanner reads from its context (``json.JSONDecoder``'s defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


def decode(data: bytes) -> object:
    """``json.loads(data)`` for UTF-8 text."""
    text = data.decode("utf-8")
    if _json is None:
        return _json_module.loads(text)
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        found = _json.make_scanner(_Rules())(text, start)  # type: ignore[arg-type]
    except StopIteration as stop:
        raise ValueError(f"not JSON at character {stop.value}") from None
    value: object = found[0]
    end: int = found[1]
    if text[end:].strip(" \t\n\r"):
        raise ValueError(f"extra data at character {end}")
    return value


def hand_over(path: str, request: dict[str, object]) -> dict[str, object] | None:
    """A ``pinwarden start`` handed to the daemon at ``path``: its answer, or None when no
    daemon took it within :data:`ACK_TIMEOUT` (none listens, or it is stopped or busy:
    the command starts the domain itself — it waited for a stopped daemon for good, and
    the daemon started the domain once continued, long after the user gave up: daemon
    hunt).  Once taken, the answer is waited for as long as the start takes; an error
    then is raised (the start is the daemon's: never a second one)."""
    conn = connect(path, ACK_TIMEOUT)
    if conn is None:
        return None
    conn.settimeout(None)  # (the answer, once taken: as long as the start takes)
    try:
        return exchange(conn, request, ack_timeout=ACK_TIMEOUT)
    except NotTaken:
        return None


def ask(path: str, request: dict[str, object],
        timeout: float | None = TIMEOUT) -> dict[str, object] | None:
    """The daemon's answer, or None when no daemon listens at ``path`` (``timeout``:
    for the whole exchange; None: wait as long as the daemon takes)."""
    conn = connect(path, timeout)
    return None if conn is None else exchange(conn, request)


def connect(path: str, timeout: float | None = TIMEOUT) -> _net.socket | None:
    """A connection to the daemon at ``path``, or None when it cannot be had, for
    whatever reason: none listens there, or none can (the state directory a file, a loop,
    a path longer than a socket's — the full command says what is wrong with it; blamed on
    the daemon, it was not), or its queue of connections is full (``EAGAIN``: stopped or
    busy, with calls that gave up still queued).  The full hook runs instead; raised, the
    last two failed every hook call, shared domains let through unchecked (daemon
    hunt)."""
    conn = _net.socket(_net.AF_UNIX, _net.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(path)
        # the daemon is root's (or ours): a socket another user planted in a state
        # directory they may write does not answer for pinwarden (hunt)
        cred = conn.getsockopt(_net.SOL_SOCKET, _net.SO_PEERCRED, 12)  # pid, uid, gid
        if int.from_bytes(cred[4:8], sys.byteorder) not in (0, posix.geteuid()):
            conn.close()
            return None
    except OSError:
        conn.close()
        return None
    return conn


class NotTaken(Exception):
    """The daemon did not take the call within :data:`ACK_TIMEOUT`."""


def exchange(conn: _net.socket, request: dict[str, object], *,
             ack_timeout: float | None = None) -> dict[str, object]:
    """Send ``request`` on ``conn``, read the answer, close it.  ``ack_timeout``: the
    daemon is asked to say when it has taken the call (:data:`ACK`), and must within that
    many seconds (else :class:`NotTaken`); a daemon that does not know the request's
    ``ack`` answers instead, which counts as taken too.  Whatever fails before the call
    is taken — sending it (a daemon that reads nothing: a big domain XML filled the
    socket's buffer and waited the whole timeout), the connection reset or closed (the
    daemon stopped) — is :class:`NotTaken` too (daemon hunt)."""
    try:
        chunks = []
        if ack_timeout is not None:
            request = {**request, "ack": True}
            whole = conn.gettimeout()
            conn.settimeout(ack_timeout)
            try:
                conn.sendall(encode(request).encode())
                conn.shutdown(_net.SHUT_WR)
                first = conn.recv(65536)
            except OSError:  # (TimeoutError, ConnectionResetError, BrokenPipeError …)
                raise NotTaken() from None
            if not first:  # closed before it took the call
                raise NotTaken()
            conn.settimeout(whole)
            chunks.append(first[1:] if first.startswith(ACK) else first)
        else:
            conn.sendall(encode(request).encode())
            conn.shutdown(_net.SHUT_WR)
        while chunk := conn.recv(65536):  # (after an end of stream: another one)
            chunks.append(chunk)
    finally:
        conn.close()
    data = b"".join(chunks)
    if not data:  # (killed mid-call: said as the daemon's answer "not an object", hunt)
        raise ValueError("the daemon closed the connection without an answer: it stopped "
                         "or crashed")
    answer = decode(data)
    if not isinstance(answer, dict):
        raise ValueError("the daemon's answer is not an object")
    return answer


def run_instead(command: list[str], data: bytes) -> None:
    """Become ``command`` with ``data`` as its stdin: the same process, so it sees the
    drop-in's shell as its parent, exactly as when the shell runs it itself."""
    fd = posix.memfd_create("pinwarden-hook-stdin")
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view):]
    posix.lseek(fd, 0, 0)  # SEEK_SET (os.SEEK_SET; posix does not name it)
    posix.dup2(fd, 0)
    posix.close(fd)
    posix.execv(command[0], command)


def log(sock: str, line: str) -> None:
    """Append ``line`` to the hook log beside the daemon's socket (the drop-in's log:
    libvirtd drops the stderr of a hook that lets the domain through)."""
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S ")
    try:
        fd = posix.open(sock.rpartition("/")[0] + "/" + HOOK_LOG,
                        posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT, 0o600)
    except OSError:
        return
    try:
        posix.write(fd, (stamp + line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
    finally:
        posix.close(fd)


def main(argv: list[str]) -> int:
    if argv == ["--ping"]:  # 'pinwarden hook check': this interpreter runs this file
        print("pinwarden hook client ok")
        return 0
    sock, config, driver, count = argv[0], argv[1], argv[2], int(argv[3])
    fallback, args = argv[4:4 + count], argv[4 + count:]
    data = sys.stdin.buffer.read()
    request = {"v": PROTOCOL, "driver": driver, "args": args,
               "stdin": data.decode("utf-8", "surrogateescape"),
               "caller": caller_pid(), "config": config}
    try:
        conn = connect(sock, TIMEOUT if PW_NAMESPACE in data else SHARED_TIMEOUT)
        answer = None if conn is None else exchange(conn, request, ack_timeout=ACK_TIMEOUT)
    except NotTaken:  # the full command answers as the daemon would have
        answer = None
    except (OSError, ValueError, RecursionError) as exc:
        # it took the call (or a connection failed midway): a second run could do it
        # twice; the installation is fine, the daemon is not (broken-pinwarden hunt)
        said = (f"pinwarden: error: the pinwarden daemon took the hook's call for "
                f"domain {args[0] if args else '?'!r} and gave no answer ({exc}): it "
                f"stopped, crashed or hangs; restart it ('systemctl restart pinwarden', "
                f"or end 'pinwarden daemon' and start it again), then start the domain "
                f"again")
        print(said, file=sys.stderr)
        log(sock, said)
        return EXPLAINED
    if answer is None or "fallback" in answer:
        try:
            run_instead([*fallback, *args], data)
        except OSError as exc:  # as the shell would say: the command cannot run
            print(f"pinwarden: error: {fallback[0]}: {exc.strerror}", file=sys.stderr)
            return 127
        return EX_SOFTWARE  # not reached: run_instead replaces this process
    message = answer.get("stderr")
    if isinstance(message, str) and message:
        sys.stderr.write(message)
    rc = answer.get("rc")
    return rc if isinstance(rc, int) else EX_SOFTWARE


def run() -> None:
    """The client as a program: exit with what :func:`main` returns."""
    try:
        sys.exit(main(sys.argv[1:]))
    except (IndexError, ValueError) as exc:  # called wrongly: say so, fail like a bug
        print(f"pinwarden: error: hook client: {exc}", file=sys.stderr)
        sys.exit(EX_SOFTWARE)


if __name__ == "__main__":
    run()
