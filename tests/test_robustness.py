"""No traceback, ever (issue #10): whatever the XML, the arguments or the host root, every
read-only command ends with exit 0, 1 or 2 and at most one line of error — never a Python
traceback, never the last-resort "internal error" (exit 70).

Generated inputs (hypothesis) go through the real command line in-process; the cases that
crashed the landed tool are kept as plain tests below.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostroot import HostSpec, build_host, make_cgroup, mount_cgroups, write
from pinwarden.cli import main
from pinwarden.ledger import Ledger

REPO = Path(__file__).resolve().parent.parent
READ_ONLY = ("host", "plan", "status", "config", "metrics", "audit")


def run(argv: list[str]) -> tuple[int, str, str]:
    """``pinwarden ARGV`` in-process: (status, stdout, stderr); usage errors exit 2."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 2
    return status, out.getvalue(), err.getvalue()


def assert_clean(argv: list[str], status: int, err: str) -> None:
    assert status in (0, 1, 2), (argv, status, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, (argv, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("pinwarden: error:")]
    assert len(lines) <= 1, err


# -- generated XML -------------------------------------------------------------------------

numbers = st.one_of(st.integers(0, 20).map(str), st.integers(0, 10**6).map(str),
                    st.just("9" * 5000), st.just("-1"), st.just("0x10"), st.just(" 3 "),
                    st.text("0123456789", min_size=1, max_size=6))
cpu_lists = st.one_of(st.just("0-3"), st.just("^1"), st.just("1-0"), st.just(""),
                      st.just("9" * 5000), st.just("0-8191"), st.just("8192"),
                      st.text("0123456789-,^ ", max_size=12))
namespaces = st.sampled_from(["", " xmlns='urn:other'", " xmlns:pw='urn:pinwarden:domain:1'",
                              " xmlns:pw='urn:pinwarden:domain'"])


@st.composite
def domain_xml(draw: st.DrawFn) -> bytes:
    parts = [f"<name>{draw(st.sampled_from(['vm', 'a b', 'x' * 300, '', 'é']))}</name>"]
    if draw(st.booleans()):
        parts.append(f"<uuid>{draw(st.sampled_from(['', 'u' * 100000, '1' * 32]))}</uuid>")
    parts.append(f"<vcpu cpuset='{draw(cpu_lists)}' current='{draw(numbers)}'>"
                 f"{draw(numbers)}</vcpu>" if draw(st.booleans()) else
                 f"<vcpu>{draw(numbers)}</vcpu>")
    pins = "".join(f"<vcpupin vcpu='{draw(numbers)}' cpuset='{draw(cpu_lists)}'/>"
                   for _ in range(draw(st.integers(0, 3))))
    if draw(st.booleans()):
        pins += f"<emulatorpin cpuset='{draw(cpu_lists)}'/>"
    if draw(st.booleans()):
        pins += f"<iothreadpin iothread='{draw(numbers)}' cpuset='{draw(cpu_lists)}'/>"
    exclusive = draw(st.sampled_from(["", " exclusive='yes'", " exclusive='x'"]))
    parts.append(f"<cputune{draw(namespaces)}{exclusive}>{pins}</cputune>")
    parts.append(f"<iothreads>{draw(numbers)}</iothreads>")
    parts.append(f"<numatune><memory mode='strict' nodeset='{draw(cpu_lists)}'/></numatune>")
    parts.append(f"<cpu><numa><cell id='{draw(numbers)}' cpus='{draw(cpu_lists)}' "
                 f"memory='{draw(numbers)}' unit='{draw(st.sampled_from(['KiB', 'XB', '']))}'"
                 f"/></numa></cpu>")
    meta = draw(st.sampled_from(["", "exclusive='yes'", "exclusive='yes' threads='whole'",
                                 "threads='maybe'", "emulator='isolate' exclusive='yes'"]))
    declared = draw(namespaces) or " xmlns:pw='urn:x'"
    parts.append(f"<metadata><pw:cpu{declared} {meta}/></metadata>")
    body = "".join(draw(st.permutations(parts)))
    text = f"<domain type='{draw(st.sampled_from(['kvm', 'lxc', 'x']))}'>{body}</domain>"
    data = text.encode()
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=8)) + data[cut:]
    return data


@pytest.fixture(scope="module")
def host_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("robust-host")
    build_host(root, HostSpec(cpus=16, threads=2, nodes=2, isolated="2-7,10-15"))
    mount_cgroups(root, cpus="0-15")
    return root


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(xml=domain_xml(), options=st.lists(st.sampled_from(["--json", "--emit-xml"]),
                                          unique=True))
def test_plan_never_crashes_on_generated_xml(host_root: Path, tmp_path: Path, xml: bytes,
                                             options: list[str]) -> None:
    path = tmp_path / "d.xml"
    path.write_bytes(xml)
    argv = ["plan", str(path), "--root", str(host_root), "--state-dir",
            str(tmp_path / "state"), *options]
    status, _, err = run(argv)
    assert_clean(argv, status, err)


words = st.one_of(st.sampled_from(["host", "plan", "status", "config", "release", "--json",
                                   "--root", "--state-dir", "--config", "--version", "-",
                                   "--emit-xml", "--driver", "qemu", "x", "", "--", "-c",
                                   "hook", "check", "ping", "metrics", "--no-audit",
                                   "completion", "bash"]),
                  st.text(max_size=10))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(words, max_size=6))
def test_arbitrary_arguments_never_crash(host_root: Path, tmp_path: Path,
                                         argv: list[str]) -> None:
    # only read-only commands here, wherever the command word comes (global options such
    # as --json may precede it: '--json run host' once ran the program 'host')
    mutating = ("release", "reserve", "start", "stop", "run", "define", "daemon", "demo",
                "sync")
    argv = ["status" if word in mutating else word for word in argv]
    full = [*argv, "--root", str(host_root), "--state-dir", str(tmp_path / "state"),
            "--config", str(tmp_path / "none.toml")]
    status, _, err = run(full)
    assert_clean(full, status, err)


# -- generated host roots ---------------------------------------------------------------------

garbage = st.one_of(st.just(""), st.just("\xff\xfe"), st.just("0-3"), st.just("1-0"),
                    st.just("9" * 5000), st.just("ffffffff,ffffffff"), st.just("(null)"),
                    st.text(max_size=12), st.just("0-8192"))
FILES = ("sys/devices/system/cpu/online", "sys/devices/system/cpu/present",
         "sys/devices/system/cpu/isolated", "sys/devices/system/cpu/cpu1/topology/core_id",
         "sys/devices/system/cpu/cpu1/topology/thread_siblings_list",
         "sys/devices/system/cpu/cpu2/topology/core_cpus",
         "sys/devices/system/node/node1/cpulist", "sys/devices/system/node/online",
         "proc/cmdline", "sys/fs/cgroup/cpuset/machine/cpuset.effective_cpus",
         "sys/fs/cgroup/unified/cgroup.controllers", "proc/self/mountinfo")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(broken=st.dictionaries(st.sampled_from(FILES), garbage, min_size=1, max_size=4),
       binary=st.booleans(), command=st.sampled_from(["host", "status", "config", "metrics"]))
def test_hostile_host_roots_never_crash(tmp_path_factory: pytest.TempPathFactory,
                                        broken: dict[str, str], binary: bool,
                                        command: str) -> None:
    root = tmp_path_factory.mktemp("hostile")
    build_host(root, HostSpec(cpus=4, threads=2, nodes=2))
    mount_cgroups(root, v2_controllers="cpuset cpu", cpus="0-3")
    make_cgroup(root, "sys/fs/cgroup/cpuset", "machine", "0-3")
    for rel, text in broken.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8", "surrogateescape") + (b"\xff" if binary else b""))
    argv = [command, "--root", str(root), "--state-dir", str(root / "state")]
    status, _, err = run(argv)
    assert_clean(argv, status, err)


# -- the cases that crashed the landed tool ------------------------------------------------------


def test_integers_of_thousands_of_digits(host_root: Path, tmp_path: Path) -> None:
    for xml in (f"<domain><name>v</name><vcpu>{'9' * 5000}</vcpu></domain>",
                f"<domain><name>v</name><vcpu>2</vcpu><cputune><vcpupin vcpu='{'1' * 4400}' "
                f"cpuset='2'/></cputune></domain>",
                f"<domain><name>v</name><memory>{'7' * 9000}</memory><cpu><numa><cell id='0' "
                f"cpus='0' memory='{'7' * 9000}'/></numa></cpu></domain>"):
        path = tmp_path / "big.xml"
        path.write_text(xml)
        status, _, err = run(["plan", str(path), "--root", str(host_root)])
        assert status in (0, 1) and "Traceback" not in err, err
        assert len(err) < 1000, err  # the hostile value is quoted shortened


def test_a_hostile_uuid_gives_a_short_message(host_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "uuid.xml"
    path.write_text(f"<domain><name>v</name><uuid>{'x' * 100000}</uuid></domain>")
    status, _, err = run(["plan", str(path), "--root", str(host_root)])
    assert status == 1 and len(err) < 400, len(err)
    assert "100000 characters" in err


def test_invalid_utf8_in_cgroup_controllers_and_config(host_root: Path,
                                                       tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(host_root, root, symlinks=True)
    mount_cgroups(root, v2_controllers="cpuset", cpus="0-15")
    write(root, "sys/fs/cgroup/unified/cgroup.controllers", "")
    (root / "sys/fs/cgroup/unified/cgroup.controllers").write_bytes(b"cpu\xff\xfeset\n")
    assert_clean(["host"], *run(["host", "--root", str(root)])[::2])
    config = tmp_path / "bad.toml"
    config.write_bytes(b"[partition]\nmode = \"\xff\"\n")
    status, _, err = run(["host", "--root", str(root), "--config", str(config)])
    assert status == 1 and "is not UTF-8" in err and "Traceback" not in err


def test_plan_from_a_closed_stdin(host_root: Path) -> None:
    done = subprocess.run(
        f"exec {sys.executable} -c 'from pinwarden.cli import entry; entry()' plan - "
        f"--root {host_root} <&-", shell=True, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr == "pinwarden: error: cannot read domain XML from stdin: it is " \
                          "closed\n"


def test_mountinfo_cannot_lead_out_of_the_root(tmp_path: Path) -> None:
    """--root contains every path it reads: '/../x' in a dump's mountinfo is '/x' below
    the root, and a mount point whose symbolic link leads out of the root is ignored."""
    root = tmp_path / "root"
    build_host(root, HostSpec(cpus=4))
    outside = tmp_path / "outside"
    make_cgroup(tmp_path, "outside", "machine", "3")
    (outside / "cpuset.cpus").write_text("0-3\n")
    (root / "sys/fs/cgroup").mkdir(parents=True)
    (root / "sys/fs/cgroup/escape").symlink_to(outside)
    from pinwarden.mounts import read_mounts

    for line in ("40 30 0:40 / /../outside rw - cgroup cgroup rw,cpuset\n",
                 "41 30 0:41 / /sys/fs/cgroup/escape rw - cgroup cgroup rw,cpuset\n"):
        write(root, "proc/self/mountinfo", line)
        found = read_mounts(root).v1("cpuset")
        assert found is None or found.resolve().is_relative_to(root.resolve()), (line, found)
        status, out, err = run(["host", "--root", str(root), "--json"])
        assert status == 0, err
        assert '"mode": "none"' in out, line  # outside's machine (CPU 3) was never read


# -- a user without rights ------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pwtest-robust-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def test_a_user_without_rights_gets_one_line(open_dir: Path) -> None:
    """``status``, ``plan`` and ``host`` by an unprivileged user on root's 0700 state
    directory: one line each (host still shows the host, with the leases unavailable).  The
    system interpreter runs our sources (the venv is root's); Debian's python3-defusedxml,
    -jeepney and -prometheus-client give it pinwarden's dependencies."""
    if os.geteuid() != 0:
        pytest.fail("needs root to switch to user nobody")
    state = open_dir / "state"
    Ledger(state).close()  # 0700, root's
    xml = open_dir / "d.xml"
    xml.write_text("<domain><name>v</name><vcpu>1</vcpu></domain>")
    xml.chmod(0o644)
    for argv, expect in ((["status"], 1), (["plan", str(xml)], 1), (["host"], 0)):
        done = subprocess.run(["/usr/bin/python3", "-c",
                               "from pinwarden.cli import entry; entry()", *argv,
                               "--state-dir", str(state)], user=65534, group=65534,
                              extra_groups=[], env={"PYTHONPATH": str(REPO / "src")}, cwd="/",
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == expect, (argv, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        if expect:
            assert done.stderr.count("\n") == 1 and "run as root" in done.stderr, done.stderr
        else:
            assert "leases unavailable" in done.stdout


# -- Ctrl-C at any moment ----------------------------------------------------------------

_SIGINT_DURING = """
import importlib.abc, os, signal, sys
# as in a terminal, or as a script's background job (a test run started in the background
# inherits SIGINT ignored)
signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == "ignored" else
              signal.default_int_handler)
target = sys.argv[2]
class Interrupt(importlib.abc.MetaPathFinder):  # Ctrl-C as the command line is imported
    def find_spec(self, name, path, target=None):
        if name == globals()["target"]:
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
del sys.argv[1:3]
from pinwarden.console import entry
entry()
"""


@pytest.mark.parametrize("module", ["pinwarden.cli", "pinwarden.cli.host",
                                    "pinwarden.topology"])
def test_ctrl_c_while_the_command_line_is_imported_is_one_line(host_root: Path,
                                                                module: str) -> None:
    """A real SIGINT while the console script imports the command line (the first ~20 ms
    of every command), or a command module and what it uses: 'pinwarden: interrupted',
    exit 130.  Before, the first printed Python's import traceback, and one raised while a
    class was being created came back as RuntimeError('Error calling __set_name__'), an
    internal error (exit 70); both seen by interrupting 'pinwarden status' every 3 ms."""
    argv = [sys.executable, "-c", _SIGINT_DURING, "default", module, "host", "--root",
            str(host_root)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "pinwarden: interrupted\n"), done.stderr


def test_an_ignored_ctrl_c_stays_ignored(host_root: Path) -> None:
    """A process started with SIGINT ignored (a script's background job) is not made
    interruptible: the command runs to its end."""
    argv = [sys.executable, "-c", _SIGINT_DURING, "ignored", "pinwarden.cli", "host",
            "--root", str(host_root)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "CPU" in done.stdout


def test_ctrl_c_wrapped_by_python_is_an_interruption(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Python wraps a KeyboardInterrupt raised in ``__set_name__`` in a RuntimeError: it is
    still the user's Ctrl-C, not a bug."""
    from pinwarden import cli

    def wrapped(_name: str) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__ on '_Field' instance") from exc

    monkeypatch.setattr(cli.importlib, "import_module", wrapped)
    assert cli.main(["host"]) == 130
    assert capsys.readouterr().err == "pinwarden: interrupted\n"


def test_the_console_script_exits_as_the_command_line_does_on_ctrl_c() -> None:
    """``pinwarden.console`` may not import the command line for its exit status: its copy
    stays the command line's."""
    from pinwarden import cli, console

    assert console.EXIT_INTERRUPTED == cli.EXIT_INTERRUPTED == 130
