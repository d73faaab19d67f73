"""The hook as a thin client of the daemon (issue #12): the real drop-in script, the real
client (``python3 -I -S``) and the daemon's server over a real unix socket give the same
answers as the in-process hook, and fall back to it when no daemon answers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforce_helpers import lease, make_host
from pinwarden.config import Config
from pinwarden.cpuset import CpuSet
from pinwarden.libvirt import hook, hookclient
from pinwarden.libvirt.hookserver import HookServer
from pinwarden.manager import Manager
from pinwarden.model import Plan, domain_holder


def xml(name: str, body: str = "") -> str:
    return f"<domain type='kvm'><name>{name}</name><vcpu>1</vcpu>{body}</domain>"


EXCLUSIVE = ("<metadata><pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>"
             "</metadata>")


def run(drop_in: Path, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(drop_in), *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path, Manager, HookServer]]:
    """A drop-in whose fallback only records that it ran; a server with a manager of its
    own (no kernel writes) on the state directory's socket."""
    state = tmp_path / "state"
    state.mkdir()
    marker = tmp_path / "fallback-ran"
    fallback = tmp_path / "fallback"
    fallback.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\ncat >> {marker}\nexit 0\n")
    fallback.chmod(0o755)
    done = hook.install(tmp_path / "hooks", exe=str(fallback), state_dir=state, config=None,
                        check=False, client=hook.default_client())
    def make() -> Manager:
        return Manager(Config(), Path("/"), state, enforce=False, host=make_host("0-3", "1-3"))

    # the server's manager is its own (one per thread, as in the daemon); the test's too
    server = HookServer(make(), state / hook.SOCKET_NAME)
    assert server.start()
    try:
        with make() as manager:
            yield done.paths[0], marker, manager, server
    finally:
        server.close()


def test_the_daemon_answers_refusals_and_admissions(
        setup: tuple[Path, Path, Manager, HookServer]) -> None:
    drop_in, marker, manager, _server = setup
    manager.reserve(lease(2, "db", "qemu").holder, lambda host, leases: Plan(
        "db", None, True, {0: CpuSet.of([2])}, CpuSet.of([2]), leases={2: "vcpu0"}))
    pinned = xml("web", "<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>")
    refused = run(drop_in, "web", "prepare", "begin", "-", stdin=pinned)
    assert refused.returncode == 1, refused.stderr
    assert "CPU 2" in refused.stderr and "'db'" in refused.stderr, refused.stderr
    admitted = run(drop_in, "web2", "prepare", "begin", "-", stdin=xml("web2"))
    assert admitted.returncode == 0 and admitted.stderr == "", admitted.stderr
    assert not marker.exists()  # answered by the server, never by the full command
    assert "refused: CPU 2" in (manager.state_dir / hook.HOOK_LOG).read_text()


def test_a_reservation_is_owned_by_the_libvirtd_that_runs_the_hook(
        setup: tuple[Path, Path, Manager, HookServer]) -> None:
    """The client tells the daemon who ran the hook (here: this test process, the drop-in's
    shell's parent), so a start the hook reserved is libvirtd's until QEMU runs."""
    drop_in, marker, manager, _server = setup
    name = "pwtest-x"
    holder = domain_holder("qemu", name, None)
    partition = manager.libvirt_partition(holder)
    body = f"{EXCLUSIVE}<resource><partition>{partition}</partition></resource>"
    done = run(drop_in, name, "prepare", "begin", "-", stdin=xml(name, body))
    assert done.returncode == 0, done.stderr
    record = manager.ledger().get(holder)
    assert record is not None and record.owner_pid == os.getpid()
    # release after a failed start: still libvirtd's, so freed
    assert run(drop_in, name, "release", "end", "-", stdin=xml(name, body)).returncode == 0
    assert manager.ledger().get(holder) is None
    assert not marker.exists()


def test_a_hook_run_in_another_pid_namespace_is_left_to_the_full_command(
        setup: tuple[Path, Path, Manager, HookServer]) -> None:
    """A libvirtd in a PID namespace of its own (a container) beside a daemon on the host:
    the client names libvirtd by a pid of its namespace, another process or none here, so
    the daemon leaves the call to the full command, which runs there (unshare(1), root)."""
    drop_in, marker, _manager, _server = setup
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and unshare(1) (util-linux), as on CI")
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", str(drop_in), "web",
                           "prepare", "begin", "-"], input=xml("web"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert marker.read_text().startswith("hook run --state-dir "), marker.read_text()
    marker.unlink()
    assert run(drop_in, "web", "prepare", "begin", "-", stdin=xml("web")).returncode == 0
    assert not marker.exists()  # this namespace's: answered by the daemon


def test_without_a_daemon_the_full_command_runs_with_the_same_arguments(
        setup: tuple[Path, Path, Manager, HookServer]) -> None:
    drop_in, marker, _manager, server = setup
    server.close()
    big = xml("web", "<description>" + "x" * 300_000 + "</description>")  # > a pipe
    done = run(drop_in, "web", "prepare", "begin", "-", stdin=big)
    assert done.returncode == 0, done.stderr
    text = marker.read_text()
    assert text.startswith("hook run --state-dir ") and " qemu web prepare begin -\n" in text
    assert text.endswith(big + "\n")


def test_a_state_directory_that_is_a_file_is_no_daemon_but_the_full_commands_to_say(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path) -> None:
    """The state directory replaced by a file: connecting to its socket fails ENOTDIR,
    which the client took for a broken daemon ("the pinwarden daemon did not answer the
    hook (NotADirectoryError …)", exit 70) — no daemon ran; the full command, which names
    the state directory's problem, did not run (systemd lab hunt)."""
    drop_in, marker, _manager, server = setup
    server.close()
    state = tmp_path / "state"
    state.rename(tmp_path / "state-away")
    state.write_text("not a directory\n")
    done = run(drop_in, "web", "prepare", "begin", "-", stdin=xml("web"))
    assert done.returncode == 0 and "daemon" not in done.stderr, done.stderr
    assert " qemu web prepare begin -\n" in marker.read_text()


def test_a_hook_with_another_configuration_is_not_answered_by_this_daemon(
        tmp_path: Path, setup: tuple[Path, Path, Manager, HookServer]) -> None:
    _drop_in, _marker, _manager, server = setup
    other = tmp_path / "other.toml"
    other.write_text('[partition]\nmode = "none"\nhost_reserve = "0-1"\n')
    request = {"v": hookclient.PROTOCOL, "driver": "qemu",
               "args": ["web", "prepare", "begin", "-"], "stdin": xml("web"), "caller": None,
               "config": str(other)}
    assert "fallback" in server.call(request)
    assert "fallback" in server.call({**request, "config": str(tmp_path / "missing.toml")})
    same = tmp_path / "same.toml"
    same.write_text("")  # every default, like the daemon's
    assert server.call({**request, "config": str(same)}) == {"rc": 0, "stderr": ""}
    for broken in ({}, {"v": hookclient.PROTOCOL}, {**request, "args": "web"},
                   {**request, "caller": "1"}, []):
        assert "fallback" in server.call(broken)
    # a call of another protocol: an older pinwarden's (or a newer one's, a daemon of an
    # older one still running after an upgrade: it served calls on a database it could not
    # read, upgrade hunt) goes to its full command
    for version in (1, hookclient.PROTOCOL + 1):
        assert server.call({**request, "config": str(same), "v": version}) == \
            {"fallback": "unknown request"}


def test_an_exclusive_start_whose_libvirt_daemon_is_unknown_is_refused(
        tmp_path: Path, setup: tuple[Path, Path, Manager, HookServer]) -> None:
    """The hook client could not tell which daemon runs the hook (libvirtd was killed
    during the start: the drop-in's shell was orphaned).  The daemon took its own
    parents' for libvirtd's, and the lease was recorded with no owner at all: nothing ever
    freed it once the start failed (hunt).  Now such an exclusive start is refused, and
    nothing is recorded; a shared one is admitted as before."""
    _drop_in, _marker, manager, server = setup
    same = tmp_path / "same.toml"
    same.write_text("")
    where = f"<resource><partition>{manager.libvirt_partition(domain_holder('qemu', 'db', None))}" \
        "</partition></resource>"
    request = {"v": hookclient.PROTOCOL, "driver": "qemu",
               "args": ["db", "prepare", "begin", "-"],
               "stdin": xml("db", EXCLUSIVE + where), "caller": None, "config": str(same)}
    answer = server.call(request)
    assert answer["rc"] == hook.REFUSED, answer
    assert "cannot tell which libvirt daemon runs the hook for exclusive domain 'db'" in \
        str(answer["stderr"]), answer
    assert manager.holders() == ()
    shared = {**request, "args": ["web", "prepare", "begin", "-"], "stdin": xml("web")}
    assert server.call(shared) == {"rc": 0, "stderr": ""}
    # a caller the client knew: the start's reservation is libvirtd's until QEMU runs
    known = {**request, "caller": os.getpid()}
    assert server.call(known) == {"rc": 0, "stderr": ""}
    (record,) = manager.holders()
    assert record.ref.name == "db" and record.owner_pid == os.getpid()


def test_the_client_and_the_manager_know_the_daemons_that_run_hooks() -> None:
    """The hook client (standard library only) and ``procs`` (below the libvirt layer,
    for the manager's release refusal) keep their own copies of the names."""
    from pinwarden import procs
    from pinwarden.libvirt import hookclient

    assert {n.decode() for n in hookclient.DAEMON_NAMES} == hook.HOOK_DAEMON_NAMES
    assert procs.LIBVIRT_DAEMONS == hook.HOOK_DAEMON_NAMES


def test_the_client_knows_pinwardens_namespace() -> None:
    """The client (standard library only) spells the metadata namespace itself."""
    from pinwarden.libvirt import hookclient

    assert hookclient.PW_NAMESPACE.decode() == hook.PW_NAMESPACE


def test_a_daemon_that_does_not_answer_fails_safe(tmp_path: Path) -> None:
    """A wedged daemon (it accepts, never answers): the client gives up and exits like a
    broken pinwarden, so the drop-in lets a shared domain start."""
    import socket
    import threading

    from pinwarden.libvirt import hookclient

    path = tmp_path / "hook.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    try:
        with pytest.raises(TimeoutError):
            hookclient.ask(str(path), {"v": hookclient.PROTOCOL}, timeout=0.5)
    finally:
        for conn in held:
            conn.close()
        server.close()


def test_a_daemon_that_took_the_call_and_died_is_said_in_one_line(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path) -> None:
    """The daemon took the call (its ACK) and then died or hung: the refusal was two
    lines, the client's "did not answer the hook (ValueError: …)" and the drop-in's
    "pinwarden is broken or missing … repair the installation", advice for another
    fault (broken-pinwarden hunt).  Now one line says the daemon took the call and what
    to do, and the hook log has it; a shared domain starts as before."""
    import socket
    import threading

    from pinwarden.libvirt import hookclient

    drop_in, marker, _manager, server = setup
    server.close()
    state = tmp_path / "state"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(state / hook.SOCKET_NAME))
    listener.listen(4)

    def take_and_die() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 << 20)
                conn.sendall(hookclient.ACK)

    threading.Thread(target=take_and_die, daemon=True).start()
    try:
        refused = run(drop_in, "db", "prepare", "begin", "-", stdin=xml("db", EXCLUSIVE))
        shared = run(drop_in, "web", "prepare", "begin", "-", stdin=xml("web"))
    finally:
        listener.close()
    assert refused.returncode == 1, refused
    (line,) = refused.stderr.splitlines()
    assert line.startswith("pinwarden: error: the pinwarden daemon took the hook's call for "
                           "domain 'db' and gave no answer"), line
    assert "restart it" in line and "broken or missing" not in line, line
    # (the unit the README installs: contrib/pinwarden.service)
    assert "'systemctl restart pinwarden'" in line, line
    assert (Path(__file__).parents[1] / "contrib" / "pinwarden.service").is_file()
    assert shared.returncode == 0, shared
    assert not marker.exists()  # taken: never run a second time
    logged = (state / hook.HOOK_LOG).read_text()
    assert "took the hook's call for domain 'db'" in logged, logged
    assert "exclusive domain 'db' was refused: pinwarden failed (why is above)" in logged
    assert "pinwarden failed (exit 4: why is above); domain 'web' asks for no exclusive " \
        "CPUs and was let through unchecked" in logged, logged


def test_hook_check_says_whether_the_daemon_answers(
        setup: tuple[Path, Path, Manager, HookServer]) -> None:
    drop_in, _marker, _manager, server = setup
    hooks_dir = drop_in.parent.parent
    ok = hooks_dir.parent / "fallback"  # the full command: now it answers "hook ping"
    ok.write_text('#!/bin/sh\necho "pinwarden hook ok 1"\n')
    states = {s.driver: s for s in hook.check_installed(hooks_dir)}
    assert states["qemu"].problem is None, states["qemu"]
    assert (states["qemu"].daemon or "").startswith("answered by the daemon at ")
    server.close()
    states = {s.driver: s for s in hook.check_installed(hooks_dir)}
    assert states["qemu"].problem is None
    assert "no daemon answers" in (states["qemu"].daemon or "")
    # a client file that went away (pinwarden reinstalled elsewhere) is a problem
    script = drop_in.read_text()
    assert f"/{hook.CLIENT_MAIN} " in script
    drop_in.write_text(script.replace(hook.CLIENT_MAIN, f"gone/{hook.CLIENT_MAIN}"))
    states = {s.driver: s for s in hook.check_installed(hooks_dir)}
    assert f"{hook.CLIENT_MAIN} exited 2" in (states["qemu"].problem or ""), states["qemu"]
    # a drop-in written before hookclient_main.py (it ran hookclient.py) is still read
    from pinwarden.libvirt import hookclient

    drop_in.write_text(script.replace(hook.default_client()[-1], hookclient.__file__))
    states = {s.driver: s for s in hook.check_installed(hooks_dir)}
    assert states["qemu"].problem is None, states["qemu"]
    assert "no daemon answers" in (states["qemu"].daemon or "")


# -- the client's JSON, against json itself ------------------------------------------------

#: with lone surrogates (the client decodes libvirt's XML with surrogateescape) and the
#: characters JSON escapes
_text = st.text(alphabet=st.characters(exclude_categories=()) | st.sampled_from(
    ["\udc80", "\udcff", "\ud800", "\x00", "\x1f", '"', "\\", "/", "é", "\u2028", "😀"]),
    max_size=40)
_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | _text
_requests = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(_text, inner, max_size=4), max_leaves=12)


@given(_requests)
def test_the_clients_encoding_is_json_dumps(value: object) -> None:
    """The client writes what ``json.dumps`` would (it speaks through ``_json``)."""
    from pinwarden.libvirt import hookclient

    assert hookclient.encode(value) == json.dumps(value)


@given(_requests)
def test_the_clients_decoding_is_json_loads(value: object) -> None:
    """... and reads what ``json.loads`` would (whitespace around, nothing after)."""
    from pinwarden.libvirt import hookclient

    text = json.dumps(value)  # ASCII: json.dumps escapes everything else
    for framed in (text, f" \n{text}\t "):
        assert hookclient.decode(framed.encode()) == value
    for bad in (b"", b"{", b'{"rc": 0} x', b"nul"):
        with pytest.raises(ValueError):
            hookclient.decode(bad)


def test_the_client_loads_no_enum_re_or_json_module() -> None:
    """What the client exists for: a start of a few milliseconds (no enum, re, socket, json
    or os module behind its C halves), checked in the interpreter the drop-in runs, as the
    drop-in runs it and as older drop-ins did (the client file itself)."""
    from pinwarden.libvirt import hookclient

    python, *flags, main = hook.default_client()
    assert python == sys.executable and flags == ["-I", "-S"]
    for script in (main, hookclient.__file__):
        done = subprocess.run([python, *flags, "-X", "importtime", script, "--ping"],
                              capture_output=True, text=True, check=True)
        assert "pinwarden hook client ok" in done.stdout
        loaded = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
                  if line.startswith("import time:")}
        assert loaded, done.stderr
        assert not loaded & {"enum", "re", "socket", "json", "typing", "os",
                             "__future__"}, loaded


def test_the_drop_in_loads_the_client_from_bytecode_and_never_a_stale_one(
        tmp_path: Path) -> None:
    """``hookclient_main.py`` imports the client, so it comes from ``__pycache__`` (the
    client file is not compiled on each hook call) and is recompiled when it changes."""
    from pinwarden.libvirt import hookclient

    python, *flags, main = hook.default_client()
    home = tmp_path / "libvirt"
    home.mkdir()
    shutil.copy(main, home)
    shutil.copy(hookclient.__file__, home)

    def ping() -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, *flags, "-v", str(home / hook.CLIENT_MAIN), "--ping"],
                              capture_output=True, text=True, check=True)

    first = ping()
    assert "pinwarden hook client ok" in first.stdout
    cached = home / "__pycache__" / f"hookclient.{sys.implementation.cache_tag}.pyc"
    assert cached.is_file()
    second = ping()
    assert f"code object from '{cached}'" in second.stderr, second.stderr[-2000:]
    assert "pinwarden hook client ok" in second.stdout
    # a changed client (pinwarden upgraded in place) is what runs, not its old bytecode
    client = home / "hookclient.py"
    client.write_text(client.read_text().replace("pinwarden hook client ok",
                                                 "pinwarden hook client ok, upgraded"))
    assert "pinwarden hook client ok, upgraded" in ping().stdout
    # imported rather than run (a tool walking the package), it does nothing
    import importlib

    importlib.import_module("pinwarden.libvirt.hookclient_main")


# -- 'pinwarden start' handed to the daemon (libvirt.startserver) -------------------------

def start_request(state: Path, *, config: Config | None = None, root: str = "/",
                  uri: str = "qemu+unix:///system?socket=/nonexistent/pwtest.sock",
                  ) -> dict[str, object]:
    return {"v": hookclient.PROTOCOL, "start": {"name": "pwtest-s", "uri": uri, "json": False},
            "rules": repr(config or Config()), "root": root, "state_dir": str(state)}


def test_a_start_is_served_only_for_the_daemons_rules_root_and_state(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path) -> None:
    """The daemon stands in for ``pinwarden start`` only where the command would do the
    same: same configuration, host root and state directory; anything else is left to the
    command (``fallback``), and nothing is started."""
    from pinwarden.libvirt import hookclient

    _drop_in, _marker, manager, _server = setup
    sock = str(manager.state_dir / hook.SOCKET_NAME)
    other = tmp_path / "other"
    other.mkdir()
    for request, why in (
            (start_request(manager.state_dir, config=Config(mode="none")),
             "another configuration"),
            (start_request(manager.state_dir, root=str(tmp_path)), "another host root"),
            (start_request(other), "another state directory"),
            ({**start_request(manager.state_dir), "start": {"name": 1}}, "malformed")):
        answer = hookclient.ask(sock, request, timeout=30)
        assert answer is not None and why in str(answer.get("fallback")), (why, answer)
    # the same rules: served (here the libvirt connection fails, as the command's would)
    answer = hookclient.ask(sock, start_request(manager.state_dir), timeout=60)
    assert answer is not None and answer["rc"] == 1, answer
    assert str(answer["stderr"]).startswith("pinwarden: error: cannot connect to qemu+unix"), \
        answer
    assert answer["stdout"] == ""


def test_a_start_from_another_pid_namespace_is_left_to_the_command(
        setup: tuple[Path, Path, Manager, HookServer]) -> None:
    """A served start sees the daemon's processes: a daemon in a container refused (or
    failed) a start the host's command would make (namespace hunt).  The same request
    from this namespace is served."""
    _drop_in, _marker, manager, _server = setup
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and unshare(1) (util-linux), as on CI")
    sock = str(manager.state_dir / hook.SOCKET_NAME)
    code = ("import json, sys; from pinwarden.libvirt import hookclient; "
            "print(json.dumps(hookclient.ask(sys.argv[1], json.loads(sys.argv[2]), "
            "timeout=30)))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                           "-c", code, sock, json.dumps(start_request(manager.state_dir))],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "fallback": "the caller runs in another PID namespace than the daemon"}, done.stdout
    from pinwarden.libvirt import hookclient

    answer = hookclient.ask(sock, start_request(manager.state_dir), timeout=60)
    assert answer is not None and answer["rc"] == 1, answer  # (served: no such libvirt)


def test_pinwarden_start_prints_what_it_would_have_printed_itself(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The command line against the daemon's socket: the served start's exit status,
    stderr and ``--json`` document are those of the same start run in the command
    (``--no-daemon``), byte for byte."""
    _drop_in, _marker, manager, _server = setup
    config = tmp_path / "empty.toml"
    config.write_text("")
    exe = str(Path(sys.executable).with_name("pinwarden"))
    # the state directory relative to the command's working directory (not the daemon's)
    assert manager.state_dir.parent == tmp_path
    base = [exe, "start", "--state-dir", manager.state_dir.name, "--config", str(config),
            "-c", "qemu+unix:///system?socket=/nonexistent/pwtest.sock", "pwtest-s"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINWARDEN_")}
    caplog.set_level(logging.INFO, logger="pinwarden.daemon")
    for extra in ((), ("--json",)):
        served = subprocess.run([*base, *extra], capture_output=True, text=True, env=env,
                                timeout=120, cwd=tmp_path)
        alone = subprocess.run([*base, *extra, "--no-daemon"], capture_output=True,
                               text=True, env=env, timeout=120, cwd=tmp_path)
        assert served.returncode == alone.returncode == 1, (served, alone)
        assert served.stderr == alone.stderr and "cannot connect" in served.stderr, \
            (served.stderr, alone.stderr)
        assert served.stdout == alone.stdout, (served.stdout, alone.stdout)
        if extra:
            assert json.loads(served.stdout)["error"]["code"] == "libvirt-connect"
    # the daemon did serve both (the --no-daemon runs never reached it)
    served_lines = [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("served 'pinwarden start pwtest-s': exit 1")]
    assert len(served_lines) == 2, caplog.text


def test_a_stopping_daemon_finishes_its_starts_and_answers_their_hook_calls(
        setup: tuple[Path, Path, Manager, HookServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirtd runs the hook inside a served start, and that call comes back to the same
    daemon: told to stop, the daemon keeps answering hook calls until its starts are done
    (else the start would wait for the hook client's timeout), and leaves new starts to
    their commands."""
    import threading
    import time

    from pinwarden.libvirt import hookclient, startserver

    drop_in, marker, manager, server = setup
    sock = str(manager.state_dir / hook.SOCKET_NAME)
    seen: dict[str, object] = {}

    def libvirt_start(*_args: object) -> dict[str, object]:  # stands in for the real one
        deadline = time.monotonic() + 30
        while not server._closing and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["late"] = hookclient.ask(sock, start_request(manager.state_dir), timeout=30)
        done = run(drop_in, "web", "prepare", "begin", "-", stdin=xml("web"))
        return {"rc": done.returncode, "stdout": "started web\n", "stderr": done.stderr}

    monkeypatch.setattr(startserver, "_serve", libvirt_start)
    client = threading.Thread(target=lambda: seen.update(
        answer=hookclient.ask(sock, start_request(manager.state_dir), timeout=60)))
    client.start()
    deadline = time.monotonic() + 30
    while server._starts is None and time.monotonic() < deadline:
        time.sleep(0.01)
    server.close()
    client.join(timeout=60)
    assert seen["answer"] == {"rc": 0, "stdout": "started web\n", "stderr": ""}, seen
    assert seen["late"] == {"fallback": "the daemon is stopping"}, seen
    assert not marker.exists()  # the hook call was the daemon's, not the full command's


def test_a_served_start_loads_neither_libvirt_nor_the_manager(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path) -> None:
    """What makes the served start cheap (issue #12): the command that hands it over never
    loads the start itself, the libvirt binding, the ledger or the layout planner."""
    from test_cli_imports import PROBE

    _drop_in, _marker, manager, _server = setup
    config = tmp_path / "empty.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINWARDEN_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "start", "--state-dir", str(manager.state_dir),
         "--config", str(config), "-c", "qemu+unix:///system?socket=/nonexistent/pw.sock",
         "pwtest-s"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr, proc.stderr
    modules = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    assert "pinwarden.libvirt.hookclient" in modules  # it did talk to the daemon
    assert not {"libvirt", "libvirtmod", "pinwarden.libvirt.start", "pinwarden.manager",
                "pinwarden.ledger", "sqlite3", "pinwarden.enforce.layout",
                "pinwarden.domain"} & modules, sorted(modules)


def test_a_bug_in_a_served_start_is_one_line_and_the_worker_goes_on(
        setup: tuple[Path, Path, Manager, HookServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception in the daemon's start: the command gets the one-line
    internal error (exit 70) it would have printed itself, and the next start is served."""
    from pinwarden.libvirt import hookclient, startserver

    _drop_in, _marker, manager, _server = setup
    sock = str(manager.state_dir / hook.SOCKET_NAME)
    calls: list[str] = []

    def broken(_manager: Manager, _conns: object, start: dict[str, object],
               _said: list[str]) -> dict[str, object]:
        calls.append(str(start["name"]))
        if len(calls) == 1:
            raise RuntimeError("boom\nsecond line")
        return {"rc": 0, "stdout": "ok\n", "stderr": ""}

    monkeypatch.setattr(startserver, "_serve", broken)
    first = hookclient.ask(sock, start_request(manager.state_dir), timeout=60)
    assert first is not None and first["rc"] == 70, first
    assert first["stderr"] == ("pinwarden: internal error: RuntimeError: boom second line "
                               "(a bug: please report it; 'pinwarden daemon -v' logs the "
                               "traceback)\n"), first
    second = hookclient.ask(sock, start_request(manager.state_dir), timeout=60)
    assert second == {"rc": 0, "stdout": "ok\n", "stderr": ""}
    assert calls == ["pwtest-s", "pwtest-s"]


def test_starts_beyond_the_limit_are_left_to_their_commands(
        setup: tuple[Path, Path, Manager, HookServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon serves at most MAX_STARTS starts at once: one more gets ``fallback``
    (its command starts the domain itself) instead of another thread and manager, and once
    a start is answered the next one is served again."""
    import threading

    from pinwarden.libvirt import hookclient, startserver

    _drop_in, _marker, manager, _server = setup
    sock = str(manager.state_dir / hook.SOCKET_NAME)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow(_manager: Manager, _conns: object, start: dict[str, object],
             _said: list[str]) -> dict[str, object]:
        entered.release()
        assert release.wait(60)
        return {"rc": 0, "stdout": f"started {start['name']}\n", "stderr": ""}

    monkeypatch.setattr(startserver, "_serve", slow)
    monkeypatch.setattr(startserver, "MAX_STARTS", 2)
    answers: list[object] = []
    clients = [threading.Thread(target=lambda: answers.append(
        hookclient.ask(sock, start_request(manager.state_dir), timeout=60)))
        for _ in range(2)]
    for client in clients:
        client.start()
    for _ in clients:
        assert entered.acquire(timeout=60)
    busy = hookclient.ask(sock, start_request(manager.state_dir), timeout=30)
    assert busy == {"fallback": "the daemon runs 2 starts already"}, busy
    release.set()
    for client in clients:
        client.join(timeout=60)
    assert answers == [{"rc": 0, "stdout": "started pwtest-s\n", "stderr": ""}] * 2, answers
    again = hookclient.ask(sock, start_request(manager.state_dir), timeout=60)
    assert again == {"rc": 0, "stdout": "started pwtest-s\n", "stderr": ""}, again


# -- the console script's plain 'pinwarden start NAME' (pinwarden.quickstart) -------------

CONSOLE_PROBE = ("import json, sys\n"
                 "from pinwarden.console import entry\n"
                 "try:\n"
                 "    entry()\n"
                 "finally:\n"
                 "    sys.stdout.flush()\n"
                 "    print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")


def console(*argv: str, cwd: Path, env: dict[str, str]) -> tuple[
        subprocess.CompletedProcess[str], set[str]]:
    """The console script's entry with ``argv``: the result (stderr without the probe's
    last line) and the modules it loaded."""
    proc = subprocess.run([sys.executable, "-c", CONSOLE_PROBE, *argv], capture_output=True,
                          text=True, env=env, timeout=120, cwd=cwd)
    *lines, last = proc.stderr.splitlines(keepends=True)
    proc.stderr = "".join(lines)
    return proc, set(json.loads(last))


@pytest.mark.parametrize("argv, form", [
    (["start", "db"], {"name": "db", "json": False, "config": None, "state_dir": None}),
    (["start", "--json", "--config", "c.toml", "--state-dir=s", "db"],
     {"name": "db", "json": True, "config": "c.toml", "state_dir": "s"}),
    (["start", "db", "--config=/c", "--json"],
     {"name": "db", "json": True, "config": "/c", "state_dir": None}),
    (["start"], None), (["stop", "db"], None), (["start", "a", "b"], None),
    (["start", "--dry-run", "db"], None), (["start", "--no-daemon", "db"], None),
    (["start", "-c", "qemu:///system", "db"], None), (["start", "--js", "db"], None),
    (["start", "--json", "--json", "db"], None), (["start", "--config", "db"], None),
    (["start", "--config", "--json", "db"], None), (["start", "--config="], None),
    (["start", "--state-dir", "a", "--state-dir", "b", "db"], None),
    (["start", "--", "db"], None), (["start", "-h"], None), (["--json", "start", "db"], None),
])
def test_quick_start_takes_only_the_plain_form(argv: list[str],
                                               form: dict[str, object] | None) -> None:
    """Only what the command line would read as a plain start goes to the daemon first;
    anything else (another option, an abbreviation argparse would accept, a usage error) is
    the command line's to read and report."""
    from pinwarden import quickstart

    assert quickstart.parse(argv) == form


def test_quick_start_agrees_with_the_command_line() -> None:
    """Its copies of the defaults and exit statuses (it must not import their modules)."""
    from pinwarden import cli, config, quickstart

    assert str(config.DEFAULT_CONFIG) == quickstart.DEFAULT_CONFIG
    assert str(config.DEFAULT_STATE_DIR) == quickstart.DEFAULT_STATE_DIR
    assert (quickstart.EXIT_ERROR, quickstart.EXIT_INTERNAL) == (cli.EXIT_ERROR,
                                                                cli.EXIT_INTERNAL)


def test_quick_start_finds_the_socket_only_where_it_is_sure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state directory: ``--state-dir``, else ``PINWARDEN_STATE_DIR``, else the
    configuration file's — read, not parsed: a file that may name one (``state_dir``
    anywhere, or an escape that could spell it) leaves the start to the command line."""
    from pinwarden import quickstart
    from pinwarden.config import DEFAULT_STATE_DIR, load_config

    def form(config: Path | None = None, state: str | None = None) -> dict[str, object]:
        return {"name": "db", "json": False, "config": None if config is None else str(config),
                "state_dir": state}

    monkeypatch.delenv("PINWARDEN_STATE_DIR", raising=False)
    plain, named, escaped = (tmp_path / n for n in ("plain.toml", "named.toml", "esc.toml"))
    plain.write_text('[partition]\nmode = "none"\n')
    named.write_text('[ledger]\nstate_dir = "/srv/pw"\n')
    escaped.write_text('[ledger]\n"st\\u0061te_dir" = "/srv/pw"\n')
    assert load_config(escaped).state_dir == Path("/srv/pw")  # what the escape hides
    assert quickstart.state_dir(form(plain)) == str(DEFAULT_STATE_DIR) == \
        str(load_config(plain).state_dir)
    assert quickstart.state_dir(form(named)) is None
    assert quickstart.state_dir(form(escaped)) is None
    assert quickstart.state_dir(form(tmp_path / "missing.toml")) is None  # the CLI's error
    assert quickstart.state_dir(form(named, state="s")) == "s"
    monkeypatch.setenv("PINWARDEN_STATE_DIR", "/run/pw")
    assert quickstart.state_dir(form(named)) == "/run/pw"


def test_pinwarden_start_goes_to_the_daemon_before_the_command_line_loads(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The plain form reaches the daemon without argparse or the configuration's parser
    (issue #12), and prints byte for byte what the command prints starting the domain
    itself (``--no-daemon``): the state directory given relative to the command's working
    directory, the configuration file by option, the URI by ``LIBVIRT_DEFAULT_URI``."""
    _drop_in, _marker, manager, _server = setup
    config = tmp_path / "empty.toml"
    config.write_text("")
    assert manager.state_dir.parent == tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINWARDEN_")}
    env["LIBVIRT_DEFAULT_URI"] = "qemu+unix:///system?socket=/nonexistent/pwtest.sock"
    base = ["start", "--state-dir", manager.state_dir.name, "--config", str(config),
            "pwtest-s"]
    caplog.set_level(logging.INFO, logger="pinwarden.daemon")
    for extra in ((), ("--json",)):
        served, modules = console(*base, *extra, cwd=tmp_path, env=env)
        alone, _ = console(*base, *extra, "--no-daemon", cwd=tmp_path, env=env)
        assert served.returncode == alone.returncode == 1, (served, alone)
        assert served.stderr == alone.stderr and "cannot connect" in served.stderr, \
            (served.stderr, alone.stderr)
        assert served.stdout == alone.stdout, (served.stdout, alone.stdout)
        assert "pinwarden.quickstart" in modules
        assert not {"argparse", "pinwarden.cli", "pinwarden.config", "tomllib",
                    "pathlib"} & modules, sorted(modules)
    served_lines = [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("served 'pinwarden start pwtest-s': exit 1")]
    assert len(served_lines) == 2, caplog.text
    # by the environment alone (no option): the same
    env["PINWARDEN_STATE_DIR"] = str(manager.state_dir)
    served, modules = console("start", "--config", str(config), "pwtest-s", cwd=tmp_path,
                              env=env)
    assert served.returncode == 1 and "cannot connect" in served.stderr, served
    assert "argparse" not in modules


def test_a_start_that_takes_longer_than_the_ack_timeout_is_the_daemons_alone(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A start takes seconds (QEMU's own start; minutes under TCG): taken by the daemon, the
    command waits for its answer.  The daemon acknowledged hook calls only: a quick start
    it served but took longer than ``ACK_TIMEOUT`` over was started by the command too —
    "domain … is already running" (systemd lab, bookworm story)."""
    import time

    from pinwarden.libvirt import hookclient, startserver

    _drop_in, _marker, manager, _server = setup
    config = tmp_path / "empty.toml"
    config.write_text("")
    serve = startserver._serve

    def slow(*args: object, **kw: object) -> object:
        time.sleep(hookclient.ACK_TIMEOUT + 1)
        return serve(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(startserver, "_serve", slow)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINWARDEN_")}
    env["LIBVIRT_DEFAULT_URI"] = "qemu+unix:///system?socket=/nonexistent/pwtest.sock"
    caplog.set_level(logging.INFO, logger="pinwarden.daemon")
    served, modules = console("start", "--state-dir", str(manager.state_dir), "--config",
                              str(config), "pwtest-slow", cwd=tmp_path, env=env)
    assert served.returncode == 1 and "cannot connect" in served.stderr, served
    assert "argparse" not in modules  # the daemon's answer, not the command line's own
    assert "served 'pinwarden start pwtest-slow': exit 1" in caplog.text, caplog.text


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_quick_start_printed_into_a_closed_pipe_keeps_its_status(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path,
        unbuffered: str) -> None:
    """``pinwarden start --json db | head -0``: the served start's answer printed into a
    pipe whose reader is gone is no error of its own (the command line's rule: the start's
    status and its one error line, no traceback), the same as without the daemon."""
    _drop_in, _marker, manager, _server = setup
    config = tmp_path / "empty.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINWARDEN_")}
    env["LIBVIRT_DEFAULT_URI"] = "qemu+unix:///system?socket=/nonexistent/pwtest.sock"
    env["PYTHONUNBUFFERED"] = unbuffered
    argv = ["start", "--json", "--state-dir", str(manager.state_dir), "--config", str(config),
            "pwtest-s"]
    entry = "from pinwarden.console import entry\nentry()\n"
    results = []
    for extra in ((), ("--no-daemon",)):
        read, write = os.pipe()
        os.close(read)
        try:
            results.append(subprocess.run([sys.executable, "-c", entry, *argv, *extra],
                                          stdout=write, stderr=subprocess.PIPE, text=True,
                                          env=env, timeout=120, cwd=tmp_path))
        finally:
            os.close(write)
    served, alone = results
    assert served.returncode == alone.returncode == 1, (served, alone)
    assert served.stderr == alone.stderr, (served.stderr, alone.stderr)
    assert served.stderr.startswith("pinwarden: error: ") and served.stderr.count("\n") == 1, \
        served.stderr


def test_a_start_the_daemon_declines_is_the_command_lines(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A daemon with other rules than the command's configuration, a configuration file
    the command would refuse, a URI it would refuse: the command line runs (and says what
    it says without a daemon); nothing is served from another configuration."""
    _drop_in, _marker, manager, _server = setup
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINWARDEN_")}
    env["LIBVIRT_DEFAULT_URI"] = "qemu+unix:///system?socket=/nonexistent/pwtest.sock"
    other = tmp_path / "other.toml"
    other.write_text('[partition]\nmode = "none"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("[partition\n")
    state = str(manager.state_dir)
    caplog.set_level(logging.DEBUG, logger="pinwarden.daemon")
    for argv, said in ((["--config", str(other)], "cannot connect"),
                       (["--config", str(broken)], "broken.toml"),
                       (["--config", str(tmp_path / "missing.toml")], "does not exist")):
        proc, modules = console("start", "--state-dir", state, *argv, "pwtest-s",
                                cwd=tmp_path, env=env)
        alone, _ = console("start", "--state-dir", state, *argv, "pwtest-s", "--no-daemon",
                           cwd=tmp_path, env=env)
        assert (proc.returncode, proc.stdout, proc.stderr) == \
            (alone.returncode, alone.stdout, alone.stderr), (proc, alone)
        assert proc.returncode in (1, 2) and said in proc.stderr, proc.stderr
        assert "argparse" in modules  # the command line's own run
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    env["LIBVIRT_DEFAULT_URI"] = "nosuch:///system"
    proc, modules = console("start", "--state-dir", state, "--config", str(empty),
                            "pwtest-s", cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "nosuch:///system" in proc.stderr, proc.stderr
    assert "argparse" in modules
    declined = [r.getMessage() for r in caplog.records if "left to the command" in
                r.getMessage()]
    assert len(declined) == 5, declined  # the plain form asked first every time
    assert sum("another configuration" in line for line in declined) == 2, declined
    assert sum("cannot be used" in line for line in declined) == 2, declined


def test_a_quick_start_whose_answer_is_lost_is_not_started_again(tmp_path: Path) -> None:
    """Once the daemon has taken the start (:data:`hookclient.ACK`) it is the daemon's: no
    answer is an error naming what to check (as the command line's own served start says),
    never a second start.  One the daemon never took — stopped, or gone before it did — is
    the command's: it waited for a stopped daemon for good, and the daemon started the
    domain once continued, long after the user gave up (daemon hunt)."""
    import socket
    import threading

    from pinwarden.libvirt import hookclient

    state = tmp_path / "state"
    state.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(state / hook.SOCKET_NAME))
    listener.listen(4)
    got: list[bytes] = []
    takes = [True]

    def accept_and_drop() -> None:
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                got.append(chunk)
            if takes[0]:
                conn.sendall(hookclient.ACK)

    server = threading.Thread(target=accept_and_drop)
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINWARDEN_")}
    env["PINWARDEN_STATE_DIR"] = str(state)
    try:
        for extra in ((), ("--json",)):
            if extra:
                server = threading.Thread(target=accept_and_drop)
                server.start()
            proc, modules = console("start", "pwtest-s", *extra, cwd=tmp_path, env=env)
            server.join(timeout=60)
            assert proc.returncode == 1, proc
            assert proc.stderr.startswith("pinwarden: error: the pinwarden daemon did not "
                                          "finish starting 'pwtest-s'"), proc.stderr
            assert "virsh domstate pwtest-s" in proc.stderr
            if extra:
                assert json.loads(proc.stdout)["error"]["code"] == "daemon-lost"
            else:
                assert proc.stdout == ""
            assert "pinwarden.libvirt.start" not in modules  # no start of its own
        takes[0] = False  # read, never taken: the command starts it (here: no libvirt)
        server = threading.Thread(target=accept_and_drop)
        server.start()
        proc, modules = console("start", "pwtest-s", cwd=tmp_path, env={
            **env, "LIBVIRT_DEFAULT_URI": f"qemu+unix:///system?socket={tmp_path}/none"})
        server.join(timeout=60)
        assert proc.returncode == 1 and "did not finish" not in proc.stderr, proc.stderr
        assert "pinwarden.libvirt.start" in modules, proc.stderr
    finally:
        listener.close()
    assert b'"quick_start"' in b"".join(got)


def test_the_default_configuration_is_read_again_when_it_changes(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook call or start made with the default configuration file is judged against
    that file as it is now: an edit after the daemon read it is seen (the daemon used to
    keep its first reading of the default file for good, and answered for rules the
    command no longer had)."""
    from pinwarden import config as config_module
    from pinwarden.libvirt import hookserver

    _drop_in, _marker, _manager, server = setup
    default = tmp_path / "pinwarden.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG", default)
    monkeypatch.setattr(hookserver, "DEFAULT_CONFIG", default)
    assert server._config("-") == Config()  # no file: the defaults
    default.write_text('[partition]\nmode = "none"\n')
    assert server._config("-") == Config(mode="none")
    default.write_text('[partition]\nmode = "cgroup"\n')
    os.utime(default, ns=(1, 10**18))  # a new modification time, whatever the clock
    assert server._config("-") == Config(mode="cgroup")


def test_a_configuration_that_is_not_a_file_is_the_command_lines_to_read(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path) -> None:
    """``pinwarden start --config /dev/stdin`` (or ``<(…)``, or a named pipe): the daemon
    opened that path in its own process, on its one hook thread — reading its own stdin
    until it closed (every hook call meanwhile went to the full command, in seconds) or an
    empty configuration it took for the defaults — and the quick start read the pipe
    first, so that the command line found it empty and started with the defaults (daemon
    hunt).  Neither reads anything but a regular file now: the command line does."""
    import subprocess
    import sys
    import threading

    _drop_in, _marker, _manager, server = setup
    fifo = tmp_path / "pinwarden.toml"
    os.mkfifo(fifo)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(server._config(str(fifo))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert got == [None]  # not used, and not waited for
    env = {k: v for k, v in os.environ.items() if k != "PINWARDEN_STATE_DIR"}
    env["LIBVIRT_DEFAULT_URI"] = f"qemu+unix:///system?socket={tmp_path}/nowhere"
    exe = Path(sys.executable).with_name("pinwarden")
    done = subprocess.run(["bash", "-c", f"{exe} start --config <(printf 'not toml [[[\\n') "
                                         f"pwtest-none"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 1 and "Expected '='" in done.stderr, done.stderr


# -- a daemon that does not take the call (hookclient.ACK_TIMEOUT) --------------------------

def test_a_daemon_that_takes_no_call_is_passed_over_in_seconds(
        setup: tuple[Path, Path, Manager, HookServer]) -> None:
    """A stopped daemon (SIGSTOP) still has its socket: the kernel queues the call and
    nobody reads it.  Exclusive starts waited 5 minutes for it and shared ones a minute,
    then failed (hunt); now the full command answers once the daemon has not taken the
    call within ``ACK_TIMEOUT``."""
    import socket
    import time

    from pinwarden.libvirt import hookclient

    drop_in, marker, manager, server = setup
    server.close()
    frozen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never accepts
    frozen.bind(str(manager.state_dir / hook.SOCKET_NAME))
    frozen.listen(8)
    try:
        started = time.monotonic()
        done = run(drop_in, "web", "prepare", "begin", "-", stdin=xml("web", EXCLUSIVE))
        took = time.monotonic() - started
    finally:
        frozen.close()
    assert done.returncode == 0, done.stderr
    assert " qemu web prepare begin -\n" in marker.read_text()  # the full command ran
    assert hookclient.ACK_TIMEOUT <= took < hookclient.ACK_TIMEOUT + 20, took


@pytest.mark.parametrize("how", ["full-queue", "big-xml", "dies", "long-path"])
def test_whatever_keeps_the_daemon_from_taking_a_call_goes_to_the_full_command(
        setup: tuple[Path, Path, Manager, HookServer], tmp_path: Path, how: str) -> None:
    """Each of these failed the hook call (exit 70: a shared domain let through unchecked,
    even one pinned onto a leased CPU, an exclusive one refused) where the daemon had never
    taken it (daemon hunt): a stopped or busy daemon's queue of connections full (calls
    that gave up stay queued: EAGAIN); a domain XML bigger than the socket's buffer (its
    send waited the whole timeout, 30 s or 150 s); the daemon gone before it took the call
    (the connection reset); a state directory whose socket path is longer than a socket's
    (no errno at all).  Each goes to the full command within seconds now."""
    import socket
    import threading
    import time

    from pinwarden.libvirt import hookclient

    drop_in, marker, manager, server = setup
    server.close()
    path = manager.state_dir / hook.SOCKET_NAME
    stdin = xml("db", EXCLUSIVE)
    frozen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never accepts
    frozen.bind(str(path))
    frozen.listen(1 if how == "full-queue" else 8)
    try:
        if how == "full-queue":
            for _ in range(2):  # calls that gave up: still queued
                gave_up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                gave_up.connect(str(path))
                gave_up.close()
        elif how == "big-xml":
            stdin = xml("db", EXCLUSIVE + "<description>" + "x" * 400_000 + "</description>")
        elif how == "dies":
            threading.Timer(1.0, frozen.close).start()
        elif how == "long-path":
            state = tmp_path / ("d" * (110 - len(str(tmp_path)))) / "state"
            state.mkdir(parents=True)
            drop_in = hook.install(tmp_path / "long-hooks", exe=str(tmp_path / "fallback"),
                                   state_dir=state, config=None, check=False,
                                   client=hook.default_client()).paths[0]
        started = time.monotonic()
        done = run(drop_in, "db", "prepare", "begin", "-", stdin=stdin)
        took = time.monotonic() - started
    finally:
        frozen.close()
    assert done.returncode == 0, done.stderr
    assert " qemu db prepare begin -\n" in marker.read_text()  # the full command ran
    assert took < 2 * hookclient.ACK_TIMEOUT + 10, took


def test_a_socket_another_user_planted_does_not_answer_for_pinwarden() -> None:
    """The daemon checks who calls it; the client did not check who answers: a user who
    may write the state directory could plant ``hook.sock`` and answer every hook call
    with ``{"rc": 0}`` (daemon hunt).  A daemon that is neither root nor the caller is no
    daemon: the full command answers."""
    import subprocess
    import sys
    import tempfile

    from pinwarden.libvirt import hookclient

    if os.geteuid() != 0:
        pytest.fail("needs root, to run the other user's socket as nobody")
    top = Path(tempfile.mkdtemp(prefix="pwtest-planted-", dir="/tmp"))  # (nobody's way in)
    os.chmod(top, 0o755)
    state = top / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    path = state / hook.SOCKET_NAME
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable  # (nobody's)
    planted = subprocess.Popen(
        [python, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); "
         "s.bind(sys.argv[1]); s.listen(4); print('ready', flush=True); "
         "c, _ = s.accept(); c.recv(65536); c.sendall(b'\\x06{\"rc\": 0}')", str(path)],
        stdout=subprocess.PIPE, text=True, user=65534, group=65534)
    try:
        assert planted.stdout is not None and planted.stdout.readline() == "ready\n"
        assert hookclient.connect(str(path)) is None
        assert hookclient.hand_over(str(path), {"v": hookclient.PROTOCOL}) is None
    finally:
        planted.kill()
        planted.wait()
        shutil.rmtree(top)


def test_a_second_daemon_neither_takes_over_a_busy_one_nor_unlinks_a_successors_socket(
        tmp_path: Path) -> None:
    """A daemon whose queue of connections is full (stopped, or busy) looked absent to a
    second daemon's probe, which took the socket path over — and when the first exited it
    unlinked the second's socket, which then answered nobody (daemon hunt).  A full queue
    is a daemon there; a daemon removes only its own socket file."""
    import socket

    state = tmp_path / "state"
    state.mkdir()
    path = state / hook.SOCKET_NAME

    def manager() -> Manager:
        return Manager(Config(), Path("/"), state, enforce=False,
                       host=make_host("0-3", "1-3"))

    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never accepts
    busy.bind(str(path))
    busy.listen(1)
    queued = []
    for _ in range(2):
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            waiting.connect(str(path))
        queued.append(waiting)
    second = HookServer(manager(), path)
    try:
        assert not second.start()  # a daemon is there, busy
    finally:
        second.close()
        for waiting in queued:
            waiting.close()
        busy.close()
    assert path.exists()  # (not the second's to remove)
    path.unlink()
    first = HookServer(manager(), path)
    assert first.start()
    path.unlink()  # taken over (as when the first was found not answering)
    successor = HookServer(manager(), path)
    assert successor.start()
    try:
        first.close()
        assert path.exists()  # the successor's socket stays
    finally:
        successor.close()
    assert not path.exists()


def test_a_call_the_daemon_took_is_waited_for(
        setup: tuple[Path, Path, Manager, HookServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken (acknowledged), a call may take longer than ``ACK_TIMEOUT`` (it waits for the
    lease lock as the full command would): its answer is the daemon's."""
    import time

    from pinwarden.libvirt import hookclient

    drop_in, marker, _manager, _server = setup
    main_run = hook.main_run

    def slow(*args: object, **kw: object) -> int:
        time.sleep(hookclient.ACK_TIMEOUT + 1)
        return main_run(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hook, "main_run", slow)
    done = run(drop_in, "web", "prepare", "begin", "-", stdin=xml("web"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert not marker.exists()


def test_a_stopping_daemon_answers_the_call_it_has_taken(
        setup: tuple[Path, Path, Manager, HookServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon stopped (SIGTERM) while a call it had taken waited (for the lease lock, as
    the full command would) closed its socket after 5 s: the client had no answer and
    failed the call — an exclusive start refused as if pinwarden were broken (daemon
    hunt).  The call is answered first."""
    import threading
    import time

    drop_in, marker, _manager, server = setup
    main_run = hook.main_run

    def slow(*args: object, **kw: object) -> int:
        time.sleep(9)
        return main_run(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hook, "main_run", slow)
    answered: list[subprocess.CompletedProcess[str]] = []
    call = threading.Thread(target=lambda: answered.append(
        run(drop_in, "web", "prepare", "begin", "-", stdin=xml("web"))))
    call.start()
    time.sleep(1.5)  # taken, and waiting
    server.close()  # the daemon told to stop: when this returns, the process may end
    call.join(0.5)
    assert answered, "the daemon's stop did not wait for the call it had taken"
    assert answered[0].returncode == 0 and answered[0].stderr == "", answered[0].stderr
    assert not marker.exists()  # the daemon's answer


def test_a_call_whose_client_went_to_the_full_command_is_not_answered_again(
        setup: tuple[Path, Path, Manager, HookServer],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon, busy with one call, takes the next only after its client gave up and
    had the full command answer it: the daemon does not run that call a second time (a
    late 'release' could free the lease of the domain's next start)."""
    import threading

    drop_in, marker, _manager, _server = setup
    main_run = hook.main_run
    busy, seen = threading.Event(), []

    def first_waits(manager: Manager, driver: str, args: list[str], *rest: object,
                    **kw: object) -> int:
        seen.append(args[0])
        if args[0] == "first":
            busy.wait(timeout=120)
        return main_run(manager, driver, args, *rest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hook, "main_run", first_waits)
    caplog.set_level(logging.INFO, logger="pinwarden.daemon")
    first = threading.Thread(target=lambda: run(drop_in, "first", "prepare", "begin", "-",
                                                stdin=xml("first")))
    first.start()
    try:
        while not seen:
            threading.Event().wait(0.01)
        done = run(drop_in, "second", "release", "end", "-", stdin=xml("second", EXCLUSIVE))
        assert done.returncode == 0, done.stderr
        assert " qemu second release end -\n" in marker.read_text()  # the full command
    finally:
        busy.set()
        first.join(timeout=120)
    import time

    deadline = time.monotonic() + 60
    while "its client had gone to the full command" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text  # it takes the second one, drops it
        time.sleep(0.05)
    assert seen == ["first"], seen


def test_a_daemon_gone_mid_call_is_said_so() -> None:
    """The daemon killed while it served a call closes the connection without a word: the
    client said "the daemon's answer is not an object" (concurrency hunt)."""
    import socket
    import threading

    from pinwarden.libvirt import hookclient

    def daemon(conn: socket.socket, answer: bytes) -> None:
        while conn.recv(65536):  # the whole request, then (killed) nothing, or an answer
            pass
        conn.sendall(answer)
        conn.close()

    for ack, answer in ((None, b""), (5.0, hookclient.ACK)):
        client, server = socket.socketpair()
        threading.Thread(target=daemon, args=(server, answer)).start()
        with pytest.raises(ValueError) as info:
            hookclient.exchange(client, {"start": "vm"}, ack_timeout=ack)
        assert str(info.value) == ("the daemon closed the connection without an answer: "
                                   "it stopped or crashed"), info.value
    # gone before it took the call: not taken, the full command answers (daemon hunt)
    client, server = socket.socketpair()
    threading.Thread(target=daemon, args=(server, b"")).start()
    with pytest.raises(hookclient.NotTaken):
        hookclient.exchange(client, {"start": "vm"}, ack_timeout=5.0)
    client, server = socket.socketpair()
    threading.Thread(target=daemon, args=(server, b"[1]")).start()
    with pytest.raises(ValueError, match="not an object"):
        hookclient.exchange(client, {"start": "vm"})
