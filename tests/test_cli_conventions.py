"""CLI conventions every command shares: --version, global options on either side of the
command, the command's own usage on a bad option, exit codes, closed pipes, the last-resort
handler, LIBVIRT_DEFAULT_URI, and one JSON style."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import SEED_XML
from hostroot import HostSpec, build_host
from pinwarden import __version__
from pinwarden.cli import build_parser, main
from pinwarden.config import Config, libvirt_uri

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "src" / "pinwarden" / "data" / "example-host"


def cli(*argv: str, stdout: Any = subprocess.PIPE, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """``pinwarden ARGV`` as an admin runs it: the installed console script's code path."""
    code = "from pinwarden.cli import entry; entry()"
    return subprocess.run([sys.executable, "-c", code, *argv], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def empty_config(tmp_path: Path) -> str:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return str(path)


# -- --version ------------------------------------------------------------------------------


def test_version_is_the_package_metadata() -> None:
    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"pinwarden {importlib.metadata.version('pinwarden')}\n"
    assert importlib.metadata.version("pinwarden") == __version__


# -- global options before or after the command ---------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ("--json", "host"), ("host", "--json"), ("--json", "host", "--json")])
def test_json_on_either_side(argv: tuple[str, ...]) -> None:
    assert parse(*argv).json is True
    assert parse("host").json is False


def test_value_after_the_command_is_not_clobbered_by_the_default_before_it() -> None:
    """argparse's trap: a subparser default overwriting what the top level parsed."""
    args = parse("--root", "/a", "--state-dir", "/s", "--config", "/c.toml", "status")
    assert (args.root, args.state_dir, args.config) == ("/a", "/s", "/c.toml")
    args = parse("status", "--root", "/a", "--state-dir", "/s", "--config", "/c.toml")
    assert (args.root, args.state_dir, args.config) == ("/a", "/s", "/c.toml")
    args = parse("--root", "/a", "--json", "status", "--state-dir", "/s")  # mixed
    assert (args.root, args.state_dir, args.config, args.json) == ("/a", "/s", None, True)
    args = parse("--root", "/a", "status", "--root", "/b")  # given twice: the later wins
    assert args.root == "/b"
    args = parse("status")
    assert (args.root, args.state_dir, args.config, args.json) == ("/", None, None, False)


def test_nested_command_takes_global_options_too() -> None:
    args = parse("--state-dir", "/s", "hook", "install", "--prefix", "/p", "--json")
    assert (args.state_dir, args.json, str(args.prefix)) == ("/s", True, "/p")


def _leaf_commands(parser: argparse.ArgumentParser,
                   path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                               argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_commands(sub, (*path, name))


def test_every_command_takes_the_common_options_after_its_name() -> None:
    """Each command, down to ``hook ping``, takes ``--json`` (and the other common
    options) after its name as before it: it honours it or says why it does not apply;
    never 'unrecognized arguments' for one command only."""
    leaves = dict(_leaf_commands(build_parser()))
    assert ("hook", "ping") in leaves and len(leaves) > 20, sorted(leaves)
    for path, sub in leaves.items():
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"--json", "--root", "--state-dir", "--config"} <= options, path


def test_json_that_does_not_apply_is_refused_and_hook_ping_answers_in_json() -> None:
    done = cli("hook", "ping", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["schema"] == 1 and answer["ok"] is True and answer["version"]
    for argv in (("completion", "bash", "--json"), ("--json", "completion", "bash")):
        done = cli(*argv)
        assert done.returncode == 2 and done.stdout == "", done
        assert "--json does not apply: the completion script is shell code" in done.stderr
    done = cli("demo", "--offline", "--json")  # (it printed its text and exited 0: hunt)
    assert done.returncode == 2 and done.stdout == "", done
    assert "--json does not apply: the demo is a walk-through for people" in done.stderr


def test_json_before_the_command_end_to_end(empty_config: str) -> None:
    before = cli("--json", "--root", str(EXAMPLE), "host", "--config", empty_config)
    after = cli("host", "--json", "--root", str(EXAMPLE), "--config", empty_config)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert json.loads(before.stdout)["partition"]["mode"] == "isolcpus"


# -- usage errors -----------------------------------------------------------------------------


def test_bad_option_shows_the_commands_usage() -> None:
    proc = cli("status", "--frobnicate")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: pinwarden status ")
    assert "pinwarden status: error: unrecognized arguments: --frobnicate" in proc.stderr
    proc = cli("hook", "install", "--frobnicate")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: pinwarden hook install ")
    assert "Traceback" not in proc.stderr


def test_bad_value_and_unknown_command_exit_2() -> None:
    proc = cli("stop", "x", "--timeout", "soon")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: pinwarden stop ")
    proc = cli("frobnicate")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: pinwarden ")
    assert "invalid choice: 'frobnicate'" in proc.stderr
    proc = cli("--frobnicate", "host")  # before the command: the top level's usage
    assert proc.returncode == 2 and "pinwarden: error: unrecognized arguments" in proc.stderr



@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1e300", "1e-300", "0.001",
                                   "31536001"])
def test_durations_are_sane_numbers_of_seconds(value: str) -> None:
    """``daemon --interval -1`` ended in an internal error once connected, ``--interval 0``
    spun a CPU (real-libvirt hunt), ``1e300`` overflowed the clock (internal error) and
    ``1e-300`` spun it again (hunt): refused before anything starts, as is such a
    ``stop --timeout``; from 10 ms to a year."""
    for argv in (("daemon", "--once", "--interval", value), ("stop", "x", "--timeout", value)):
        proc = cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert f"'{value}': give a number of seconds from 0.01 to 31536000 (a year)" in \
            proc.stderr, proc.stderr
    from pinwarden.cli import seconds

    assert (seconds("0.01"), seconds("31536000"), seconds("2.5")) == (0.01, 31536000, 2.5)


def test_help_lists_exit_codes() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    assert "exit status: 0 success; 1 refusal or error; 2 usage error" in proc.stdout
    assert "70 internal error" in proc.stdout and "130 interrupted (Ctrl-C)" in proc.stdout


# -- audit: 0 clean, 1 intruders, 2 could not check ---------------------------------------


def test_audit_that_cannot_check_exits_2(tmp_path: Path, empty_config: str) -> None:
    root = build_host(tmp_path / "root", HostSpec(cpus=4))  # sysfs only: no /proc
    proc = cli("audit", "--root", str(root), "--state-dir", str(tmp_path / "s"),
               "--config", empty_config, "--json")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)
    assert error["schema"] == 1 and error["error"]["code"] == "host"
    assert proc.stderr.startswith("pinwarden: error: no processes under ")
    assert proc.stderr.count("\n") == 1


def test_audit_exit_codes_clean_and_intruders(tmp_path: Path, empty_config: str) -> None:
    """The same fake host: 0 before a lease, 1 once another VM's thread can run on it."""
    from fakeproc import fake_proc, reserve

    root = build_host(tmp_path / "root", HostSpec(cpus=4))
    fake_proc(root, intruder_on="0-3")
    state = tmp_path / "state"
    argv = ("audit", "--root", str(root), "--state-dir", str(state), "--config", empty_config)
    proc = cli(*argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("audit: clean")
    reserve(state, "vm-a", "2-3")
    proc = cli(*argv)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("audit: INTRUDERS")


def test_audit_without_the_holders_groups_in_sight_exits_2(tmp_path: Path,
                                                            empty_config: str) -> None:
    """The cpuset hierarchy out of sight (not in this mount namespace) while a holder has a
    group: exit 2 and "INCOMPLETE", not "clean" and 0 (hunt L)."""
    from fakeproc import fake_proc, reserve
    from pinwarden.ledger import Ledger

    root = build_host(tmp_path / "root", HostSpec(cpus=4))
    fake_proc(root, intruder_on="0-1")
    (root / "proc/self/mountinfo").write_text("")  # as in a container
    (root / "proc/irq/24/smp_affinity_list").write_text("0-1\n")
    state = tmp_path / "state"
    holder = reserve(state, "vm-a", "2-3")
    argv = ("audit", "--root", str(root), "--state-dir", str(state), "--config", empty_config)
    first = cli(*argv)
    assert first.returncode == 0, first.stdout  # no group recorded yet: nothing out of sight
    with Ledger(state) as ledger:
        ledger.set_cgroup(holder, "machine/pinwarden-vm-vm-a.partition")
    proc = cli(*argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("audit: INCOMPLETE (1 not checked, below); warnings on ")
    assert "not checked: the holder groups of qemu:vm-a and every VM cgroup: no cpuset " \
        "cgroup could be read here" in proc.stdout
    assert json.loads(cli(*argv, "--json").stdout)["status"] == "incomplete"
    # a group kept by a forced release: whether anything still runs there is read from
    # the group, so its CPU vanished from the leases and audit said clean (hunt N)
    kept_state = tmp_path / "kept"
    with Ledger(kept_state) as ledger:
        ledger.put_changes({"kept:machine/pinwarden-vm-vm-k.partition": json.dumps(
            {"driver": "qemu", "key": "vm-k", "name": "vm-k", "cpus": "3", "pid": 1})})
    kept = cli("audit", "--root", str(root), "--state-dir", str(kept_state), "--config",
               empty_config)
    assert kept.returncode == 2, kept.stdout + kept.stderr
    assert "not checked: the CPUs kept by a forced release in " \
        "/machine/pinwarden-vm-vm-k.partition: whether anything still runs there is read " \
        "from the group, and no cpuset cgroup could be read here" in kept.stdout, kept.stdout
    # the same seen from a cgroup namespace (init's group reads "/.."): the kept group is
    # out of view there too
    (root / "proc/self/mountinfo").write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpuset rw,nosuid shared:9 - cgroup cgroup rw,cpuset\n")
    (root / "proc/1/task/1/cgroup").write_text("5:cpuset:/..\n")
    (root / "sys/fs/cgroup/cpuset/tasks").write_text("")
    kept = cli("audit", "--root", str(root), "--state-dir", str(kept_state), "--config",
               empty_config)
    assert kept.returncode == 2, kept.stdout + kept.stderr
    assert "read from the group, and this cgroup namespace sees only part of the cpuset " \
        "hierarchy (1 threads are in groups above its root)" in kept.stdout, kept.stdout


# -- a reader that closes the pipe ------------------------------------------------------------


def closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone (``| head -1`` having exited)."""
    read, write = os.pipe()
    os.close(read)
    return write


#: EPIPE shows at the first write (unbuffered) or at the final flush (buffered).
BUFFERING = pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])


@BUFFERING
@pytest.mark.parametrize("argv", [
    ("status", "--root", str(EXAMPLE)),       # small output
    ("completion", "bash"),                   # ~15 kB: more than a buffer
    ("--help",),                              # argparse prints, then exits
    ("--version",),
])
def test_closed_pipe_exits_0_quietly(tmp_path: Path, argv: tuple[str, ...],
                                     unbuffered: str) -> None:
    write = closed_pipe()
    try:
        proc = cli(*argv, stdout=write, env={"PINWARDEN_STATE_DIR": str(tmp_path / "s"),
                                             "PYTHONUNBUFFERED": unbuffered})
    finally:
        os.close(write)
    assert proc.returncode == 0
    assert proc.stderr == ""  # no traceback, no "Exception ignored", no error line


def test_a_stream_closed_from_the_start_is_no_error(tmp_path: Path, empty_config: str) -> None:
    """Started with stdout (or stderr, or stdin) closed (``>&-``), every command failed with
    an internal error — after a reserve or release had been committed (hunt).  Now the
    closed streams are /dev/null: the commands do what they do, and the lease database
    does not take a standard descriptor."""
    xml = tmp_path / "x.xml"
    xml.write_text("<domain type='kvm'><name>vm-closed</name><vcpu>1</vcpu><metadata>"
                   "<pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/></metadata>"
                   "</domain>")
    state = tmp_path / "state"
    common = ("--root", str(EXAMPLE), "--state-dir", str(state), "--config", empty_config)
    code = "from pinwarden.cli import entry; entry()"
    probe = ("import os, sys\nfrom pinwarden.streams import safe_streams\n"
             "from pinwarden.ledger import Ledger\nsafe_streams()\n"
             "Ledger(sys.argv[1]).holders()\n"
             "os.write(2, repr([os.readlink(f'/proc/self/fd/{fd}') for fd in (0, 1, 2)])"
             ".encode())")

    def run(closed: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """``pinwarden ARGV`` started with the descriptors ``closed`` closed (``1>&-``)."""
        redirect = " ".join(f"{fd}>&-" for fd in closed.split(","))
        return subprocess.run(["bash", "-c", f'exec "$@" {redirect}', "-", sys.executable,
                               "-c", code, *argv], capture_output=True, text=True,
                              timeout=120)

    for closed in ("1", "2", "0,1,2"):
        for argv in (("reserve", str(xml), *common), ("status", "--json", *common),
                     ("release", "vm-closed", *common), ("--version",), ("host", "--help")):
            done = run(closed, *argv)
            assert done.returncode == 0, (closed, argv, done.stderr)
            assert done.stderr == "", (closed, argv, done.stderr)
            if closed == "2":
                assert done.stdout, (closed, argv)
    assert cli("status", *common).stdout.startswith("partition ")
    refused = run("1", "release", "nobody", *common)
    assert refused.returncode == 1 and refused.stderr.startswith("pinwarden: error: "), \
        refused.stderr
    fds = subprocess.run(["bash", "-c", 'exec "$@" <&- >&-', "-", sys.executable, "-c",
                          probe, str(state)], capture_output=True, text=True, timeout=60)
    assert fds.stderr.startswith(f"['{os.devnull}', '{os.devnull}', 'pipe:["), fds.stderr


def _exclusive_on_the_example(tmp_path: Path, name: str,
                              config: str) -> tuple[Path, tuple[str, ...]]:
    """An exclusive one-vCPU domain's XML, and the options that plan it on the example host
    with a state directory of the test's own."""
    xml = tmp_path / "domain.xml"
    xml.write_text(f"<domain type='kvm'><name>{name}</name><vcpu>1</vcpu><metadata>"
                   "<pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/></metadata>"
                   "</domain>", encoding="utf-8")
    return xml, ("--root", str(EXAMPLE), "--state-dir", str(tmp_path / "state"),
                 "--config", config)


@BUFFERING
def test_output_that_cannot_be_written_is_one_line_and_the_change_stands(
        tmp_path: Path, empty_config: str, unbuffered: str) -> None:
    """stdout on a full disk (``> /dev/full``: ENOSPC): a reserve or release that was
    committed exited 70, "internal error … a bug", and ``--help`` exited 0 with its text
    lost (CLI hunt).  Now each says in one line that its output was lost and exits 1; what
    it did stands."""
    xml, common = _exclusive_on_the_example(tmp_path, "vm-full", empty_config)
    env = {"PYTHONUNBUFFERED": unbuffered}

    def full(*argv: str) -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as out:
            return cli(*argv, stdout=out, env=env)

    for argv, leased, status in ((("reserve", str(xml), *common), True, 1),
                                 (("status", "--json", *common), True, 1),
                                 (("release", "vm-full", *common), False, 1),
                                 (("--help",), False, 1)):
        done = full(*argv)
        assert done.returncode == status, (argv, done.stderr)
        assert done.stderr.startswith("pinwarden: error: cannot write to standard output: "
                                      "No space left on device"), (argv, done.stderr)
        assert done.stderr.count("\n") == 1, (argv, done.stderr)
        shown = json.loads(cli("status", "--json", *common).stdout)
        assert bool(shown["leases"]) is leased, (argv, shown)


def test_a_clean_audit_whose_report_is_lost_exits_as_not_checked(
        tmp_path: Path, empty_config: str) -> None:
    """``audit``'s 1 means "intruders found": a clean report that could not be written
    (``> /dev/full``) exited 1 too (hunt).  Now 2, "could not be made", as the help says;
    the same audit written out exits 0."""
    common = ("--state-dir", str(tmp_path / "state"), "--config", empty_config)
    with open("/dev/full", "w") as out:
        done = cli("audit", *common, stdout=out)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("pinwarden: error: cannot write to standard output"), \
        done.stderr
    done = cli("audit", *common)
    assert done.returncode == 0, done.stdout + done.stderr


@BUFFERING
def test_closed_pipe_keeps_a_finished_commands_status(tmp_path: Path, unbuffered: str) -> None:
    write = closed_pipe()
    try:
        proc = cli("host", "--root", str(tmp_path / "nope"), "--json", stdout=write,
                   env={"PYTHONUNBUFFERED": unbuffered})
    finally:
        os.close(write)
    assert proc.returncode == 1
    assert proc.stderr.startswith("pinwarden: error: ") and proc.stderr.count("\n") == 1


def test_status_piped_into_head(tmp_path: Path) -> None:
    """The admin's own pipeline, through a real shell."""
    exe = Path(sys.executable).parent / "pinwarden"
    proc = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$0" status --root "$1" --state-dir "$2" | head -1; '
                       'echo "status ${PIPESTATUS[0]}" >&2',
         str(exe), str(EXAMPLE), str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("partition isolcpus") and proc.stdout.count("\n") == 1
    assert proc.stderr == "status 0\n"


# -- the last resort ---------------------------------------------------------------------------

BOOM = ("import sys, pinwarden.cli.host as h\n"
        "def boom(args):\n"
        "    raise ZeroDivisionError('the\\nbug')\n"
        "h.run = boom\n"
        "from pinwarden.cli import entry\n"
        "sys.argv[0] = 'pinwarden'\n"
        "entry()\n")


def test_internal_error_is_one_line_and_exit_70() -> None:
    proc = subprocess.run([sys.executable, "-c", BOOM, "host"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PINWARDEN_DEBUG": ""})
    assert proc.returncode == 70
    assert proc.stderr == ("pinwarden: internal error: ZeroDivisionError: the bug (a bug: please "
                           "report it; PINWARDEN_DEBUG=1 shows the traceback)\n")
    proc = subprocess.run([sys.executable, "-c", BOOM, "host", "--json"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PINWARDEN_DEBUG": ""})
    assert proc.returncode == 70
    assert json.loads(proc.stdout) == {"schema": 1, "error": {
        "code": "internal", "message": "ZeroDivisionError: the bug"}}


def test_pinwarden_debug_shows_the_traceback() -> None:
    proc = subprocess.run([sys.executable, "-c", BOOM, "host"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PINWARDEN_DEBUG": "1"})
    assert proc.returncode == 1  # Python's own status for an uncaught exception
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ZeroDivisionError: the\nbug" in proc.stderr


def test_internal_error_in_process(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import pinwarden.cli.host as host

    def boom(args: argparse.Namespace) -> int:
        raise KeyError("cpu")

    monkeypatch.setattr(host, "run", boom)
    monkeypatch.delenv("PINWARDEN_DEBUG", raising=False)
    assert main(["host"]) == 70
    assert capsys.readouterr().err.startswith("pinwarden: internal error: KeyError: 'cpu' (")
    monkeypatch.setenv("PINWARDEN_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["host"])


# -- LIBVIRT_DEFAULT_URI ----------------------------------------------------------------------


def test_libvirt_uri_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """--connect > LIBVIRT_DEFAULT_URI > [libvirt] uri > qemu:///system (virsh's order)."""
    configured = Config(libvirt_uri="qemu+ssh://h/system")
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert libvirt_uri(None, Config()) == "qemu:///system"
    assert libvirt_uri(None, configured) == "qemu+ssh://h/system"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "")  # empty: unset, as in libvirt
    assert libvirt_uri(None, configured) == "qemu+ssh://h/system"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///session")
    assert libvirt_uri(None, configured) == "qemu:///session"
    assert libvirt_uri("test:///default", configured) == "test:///default"


def test_libvirt_commands_use_libvirt_default_uri(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    from pinwarden.cli.vm import uri_of

    config = tmp_path / "pw.toml"
    config.write_text('[libvirt]\nuri = "qemu+ssh://h/system"\n')
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///session")
    assert uri_of(parse("start", "vm", "--config", str(config))) == "qemu:///session"
    assert uri_of(parse("start", "vm", "-c", "test:///default")) == "test:///default"
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI")
    assert uri_of(parse("start", "vm", "--config", str(config))) == "qemu+ssh://h/system"


# -- one JSON style ---------------------------------------------------------------------------

#: Keys whose values are CPU lists wherever they appear.
CPU_LIST_KEYS = {"cpus", "siblings", "package_cpus", "vm_cpus", "host_cpus", "online",
                 "present", "isolated", "nohz_full", "leased", "shared", "default_cpus",
                 "emulator", "offline", "released"}
TIME_KEYS = {"created", "time"}


def check_style(value: Any, path: str = "$") -> int:
    """Assert the JSON style below ``value``; returns how many CPU lists and times it saw."""
    seen = 0
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}"
            table = isinstance(item, dict | bool) or (
                isinstance(item, list) and item and all(isinstance(v, dict) for v in item))
            if key in CPU_LIST_KEYS and not table:  # (host's "cpus" is a table of CPUs)
                assert isinstance(item, str), f"{where}: CPU list {item!r} is not a string"
                seen += 1
            if key in TIME_KEYS:
                assert isinstance(item, str), f"{where}: time {item!r} is not a string"
                moment = datetime.fromisoformat(item)
                assert moment.utcoffset() == timedelta(0), f"{where}: {item} has no UTC offset"
                seen += 1
            seen += check_style(item, where)
    elif isinstance(value, list):
        assert not (value and all(isinstance(v, int) and not isinstance(v, bool)
                                  for v in value)), f"{path}: a list of numbers {value}"
        for i, item in enumerate(value):
            seen += check_style(item, f"{path}[{i}]")
    return seen


def test_every_json_document_has_the_same_style(tmp_path: Path, empty_config: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    vm1 = tmp_path / "vm1.xml"
    vm1.write_text(SEED_XML)
    vm2 = tmp_path / "vm2.xml"
    vm2.write_text(SEED_XML.replace("<name>vm1</name>", "<name>vm2</name>"))
    where = ["--root", str(EXAMPLE), "--state-dir", str(tmp_path / "s"), "--config",
             empty_config]
    runs: list[tuple[list[str], list[str]]] = [  # (command, options after the common ones)
        (["host"], []), (["plan", str(vm1)], []), (["reserve", str(vm1)], []), (["status"], []),
        (["config"], []),
        (["reserve", str(vm2)], []),  # refused: an error object
        (["release", "vm1"], []), (["release", "vm1"], []),  # the second: unknown holder
        (["host"], ["--root", str(tmp_path)]),  # not a host root: an error object
    ]
    seen = 0
    for command, extra in runs:
        status = main(["--json", *command, *where, *extra])
        document = json.loads(capsys.readouterr().out)
        assert next(iter(document)) == "schema" and document["schema"] == 1, command
        assert ("error" in document) == (status != 0), (command, document)
        seen += check_style(document)
    assert seen > 50  # the walk did look at CPU lists and times


def test_output_the_terminal_cannot_encode_is_escaped_not_an_internal_error(
        tmp_path: Path, empty_config: str) -> None:
    """A domain named in Unicode under an ASCII (or Latin-1) terminal: the reserve is made
    and said, status shows it; the character comes out as an escape.  It was exit 70 after
    the lease was committed (and status always failed on the CPU map's '·')."""
    xml, common = _exclusive_on_the_example(tmp_path, "vm-\u00e9\u2603", empty_config)
    ascii_out = {"PYTHONIOENCODING": "ascii"}
    done = cli("reserve", str(xml), *common, env=ascii_out)
    assert done.returncode == 0, done.stderr
    assert "vm-\\xe9\\u2603" in done.stdout, done.stdout
    status = cli("status", *common, env=ascii_out)
    assert status.returncode == 0, status.stderr
    assert "vm-\\xe9\\u2603" in status.stdout and "\\xb7" in status.stdout, status.stdout
    bad = cli("release", "nobody", *common, env=ascii_out)
    assert bad.returncode == 1 and "internal error" not in bad.stderr, bad.stderr
    gone = cli("release", "vm-\u00e9\u2603", *common, env=ascii_out)
    assert gone.returncode == 0, gone.stderr


@pytest.mark.parametrize("exc, said", [
    (KeyboardInterrupt(), "pinwarden: interrupted\n"),
    (None, "pinwarden: interrupted after completing the change it had begun ('pinwarden "
           "status' shows the leases)\n")])
def test_an_interrupt_says_whether_the_change_was_made(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        exc: KeyboardInterrupt | None, said: str) -> None:
    """Ctrl-C: exit 130 and one line; one held back until a change under the lock was
    complete (:mod:`pinwarden.interrupts`) says the change was made."""
    import pinwarden.cli as cli
    from pinwarden.interrupts import InterruptedAfterChange

    def handler(_args: argparse.Namespace) -> int:
        raise exc if exc is not None else InterruptedAfterChange()

    monkeypatch.setattr(cli, "_parse_args",
                        lambda _argv: argparse.Namespace(handler=handler, json=False))
    assert main(["status"]) == 130
    assert capsys.readouterr().err == said


@pytest.mark.parametrize("argv", [["demo", "--offline"], ["completion", "bash"],
                                  ["metrics"]])
def test_the_commands_without_json_refuse_it_as_readme_says(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """README: every command takes ``--json`` but these three, which refuse it (exit 2);
    it said every command took it (README hunt)."""
    from pinwarden.cli import main

    with pytest.raises(SystemExit) as refused:
        main([*argv, "--json"])
    assert refused.value.code == 2
    assert "--json does not apply" in capsys.readouterr().err
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "`demo`, `completion` and `metrics` print what they are for and refuse `--json`" \
        in readme
