"""The systemd backend against a real dbus-daemon and a stand-in systemd (no systemd here).

Every test starts its own ``dbus-daemon`` (config in a temporary directory) and the stand-in
``tests/dbus_standin/systemd1.py`` as processes it ends by pid.  The stand-in answers as
systemd's sources do (see its docstring); the tests assert the calls that crossed the bus
(member, signature, body bytes) and how the backend translates systemd's errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jeepney import DBusAddress, MessageType, new_method_call, new_signal
from jeepney.bus_messages import MatchRule, Monitoring, message_bus
from jeepney.io.blocking import DBusConnection, Proxy, open_dbus_connection
from jeepney.low_level import HeaderFields

from enforce_helpers import lease, make_host, sync_leases
from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import CgroupBackend, CgroupOpError, GroupState, PartitionKind
from pinwarden.enforce.layout import LayoutNames, holder_group_path, libvirt_partition
from pinwarden.enforce.systemd import (
    MANAGER_IFACE,
    MANAGER_PATH,
    DBusCallError,
    SystemdBackend,
    SystemdBus,
    SystemdOpError,
    child_name,
    escape_unit_name,
    open_backend,
    slice_cgroup_path,
    systemd_booted,
    unescape_unit_name,
    unit_for_path,
)
from pinwarden.enforce.v2 import CgroupV2Backend
from pinwarden.errors import EnforceError
from pinwarden.model import Lease, domain_holder
from pinwarden.mounts import read_mounts
from pinwarden.record import replace

STANDIN = Path(__file__).parent / "dbus_standin" / "systemd1.py"
SYSTEMD_ESCAPE = shutil.which("systemd-escape")
HOLDER = "pinwarden.slice/pinwarden-vm\\x2dA.slice"
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


def _read_line(proc: subprocess.Popen[str], what: str, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"{what} printed nothing within {timeout:g} s")
    line = proc.stdout.readline().strip()
    if not line:
        raise AssertionError(f"{what} exited (status {proc.poll()}) before it was ready")
    return line


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()  # the process this fixture started, by its pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_bus(tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    """A private dbus-daemon of our own, listening in tmp_path: (process, address)."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.fail("dbus-daemon is missing: install the Debian package dbus (make test does)")
    conf = tmp_path / "bus.conf"
    conf.write_text(BUS_CONF.format(socket=tmp_path / "bus"))
    proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        return proc, _read_line(proc, "dbus-daemon")
    except BaseException:
        _end(proc)
        raise


@pytest.fixture
def bus_address(tmp_path: Path) -> Iterator[str]:
    proc, address = _start_bus(tmp_path)
    try:
        yield address
    finally:
        _end(proc)


@dataclass
class Standin:
    address: str
    proc: subprocess.Popen[str]
    #: the host root a backend beside it uses (its ``--root``, else a directory of the
    #: test's): where pinwarden's own drop-ins go, never the build host's /run
    root: Path
    conn: DBusConnection = field(init=False)

    def __post_init__(self) -> None:
        self.conn = open_dbus_connection(bus=self.address)

    def _call(self, member: str, signature: str = "", *args: Any) -> tuple[Any, ...]:
        addr = DBusAddress("/org/pinwarden/test", bus_name="org.freedesktop.systemd1",
                           interface="org.pinwarden.test.Standin")
        reply = self.conn.send_and_get_reply(new_method_call(addr, member, signature or None,
                                                             args), timeout=10)
        assert reply.header.message_type == MessageType.method_return, reply.body
        return tuple(reply.body)

    def calls(self, member: str | None = None) -> list[dict[str, Any]]:
        """Calls systemd received, as it decoded them off the wire."""
        out: list[dict[str, Any]] = json.loads(self._call("Calls")[0])
        return [c for c in out if member is None or c["member"] == member]

    def add_unit(self, name: str, state: str, fragment: bool) -> None:
        self._call("AddUnit", "ssb", name, state, fragment)

    def fail_next_job(self, unit: str, result: str) -> None:
        self._call("FailNextJob", "ss", unit, result)


@contextlib.contextmanager
def _running_standin(address: str, log: Path, *extra: str) -> Iterator[Standin]:
    """Start the stand-in (its stderr in ``log``, shown if it died), end it by pid."""
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(STANDIN), address, "--online", "0-7",
                                 *extra], stdout=subprocess.PIPE, stderr=err, text=True)
    handle: Standin | None = None
    try:
        line = _read_line(proc, "the systemd stand-in")
        if line != "READY":
            raise AssertionError(f"systemd stand-in: {line}")
        given = [extra[i + 1] for i, arg in enumerate(extra[:-1]) if arg == "--root"]
        handle = Standin(address, proc, Path(given[0]) if given else log.parent / "host")
        yield handle
    finally:
        if handle is not None:
            handle.conn.close()
        died = proc.poll()
        _end(proc)
        if died is not None and log.read_text():
            print(f"systemd stand-in exited with {died}:\n{log.read_text()}")


@pytest.fixture(params=["systemd-252", "systemd-cpusetpartition"])
def standin(request: pytest.FixtureRequest, bus_address: str,
            tmp_path: Path) -> Iterator[Standin]:
    """The stand-in, as a systemd without and with the CPUSetPartition property."""
    extra = ("--partition",) if request.param == "systemd-cpusetpartition" else ()
    with _running_standin(bus_address, tmp_path / "standin.log", *extra) as handle:
        yield handle


@pytest.fixture
def old_standin(bus_address: str, tmp_path: Path) -> Iterator[Standin]:
    """A stand-in systemd without CPUSetPartition (systemd 252 .. before PR #42013)."""
    with _running_standin(bus_address, tmp_path / "standin.log") as handle:
        yield handle


@pytest.fixture
def new_standin(bus_address: str, tmp_path: Path) -> Iterator[Standin]:
    """A stand-in systemd with CPUSetPartition (systemd PR #42013)."""
    with _running_standin(bus_address, tmp_path / "standin.log", "--partition") as handle:
        yield handle


def _backend(s: Standin, kernel: CgroupBackend | None = None) -> tuple[SystemdBus,
                                                                      SystemdBackend]:
    bus = SystemdBus.connect(s.address, timeout=10)
    return bus, SystemdBackend(bus, kernel=kernel, root=s.root)


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A process of our own to attach (ended by pid)."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# -- unit names -------------------------------------------------------------------------

def test_escape_unit_name_follows_the_man_page_examples() -> None:
    # systemd-escape(1), EXAMPLES; systemd.unit(5), "String Escaping for Inclusion in Unit
    # Names": "/" → "-", a leading "." and every byte outside [A-Za-z0-9:_.] → "\xNN".
    assert escape_unit_name("Hallöchen, Meister") == "Hall\\xc3\\xb6chen\\x2c\\x20Meister"
    assert escape_unit_name("vm-A") == "vm\\x2dA"
    assert escape_unit_name("/foo/bar") == "-foo-bar"
    assert escape_unit_name(".hidden.x") == "\\x2ehidden.x"
    assert escape_unit_name("a\\b") == "a\\x5cb"
    assert escape_unit_name("") == ""


def test_escape_unit_name_matches_the_systemd_escape_binary() -> None:
    if SYSTEMD_ESCAPE is None:
        pytest.fail("systemd-escape is missing: install the Debian package systemd")
    rng = random.Random(4)
    alphabet = "aZ09:_.-/\\ ,@%äö€\t\x01~"
    samples = ["vm-A", "run-J", "qemu-3-B", ".", "..", "/", "x/", ".a/.b", "a..b", "ä", "€"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
                for _ in range(300)]
    out = subprocess.run([SYSTEMD_ESCAPE, "--", *samples], capture_output=True, text=True,
                         check=True).stdout.split()
    assert len(out) == len(samples)  # escaped names never contain whitespace
    mismatches = [(s, e, escape_unit_name(s)) for s, e in zip(samples, out, strict=True)
                  if escape_unit_name(s) != e]
    assert mismatches == []
    for sample, escaped in list(zip(samples, out, strict=True))[:60]:
        back = subprocess.run([SYSTEMD_ESCAPE, "--unescape", "--", escaped],
                              capture_output=True, text=True, check=True).stdout[:-1]
        assert unescape_unit_name(escaped) == back
        assert back == sample


@pytest.mark.parametrize(("path", "unit"), [
    ("", "-.slice"),
    ("machine", "machine.slice"),
    ("machine.slice", "machine.slice"),
    ("pinwarden.partition", "pinwarden.slice"),
    ("pinwarden.partition/vm-A.partition", "pinwarden-vm\\x2dA.slice"),
    ("pinwarden/run-my job", "pinwarden-run\\x2dmy\\x20job.slice"),
    (HOLDER, "pinwarden-vm\\x2dA.slice"),
    ("machine.slice/machine-qemu\\x2d3\\x2dB.scope", "machine-qemu\\x2d3\\x2dB.scope"),
    ("system.slice/libvirtd.service", "libvirtd.service"),
])
def test_paths_map_to_units_like_libvirt_partitions(path: str, unit: str) -> None:
    assert unit_for_path(path) == unit


@pytest.mark.parametrize(("parent", "unit", "name"), [
    ("", "machine.slice", "machine"),
    ("", "pinwarden.slice", "pinwarden.partition"),
    ("", "init.scope", "init.scope"),
    ("pinwarden.partition", "pinwarden-vm\\x2dA.slice", "vm-A.partition"),
    ("pinwarden.slice", "pinwarden-vm\\x2dA.slice", "pinwarden-vm\\x2dA.slice"),
    ("machine", "machine-qemu\\x2d3\\x2dB.scope", "machine-qemu\\x2d3\\x2dB.scope"),
])
def test_child_names_follow_the_parent_path_style(parent: str, unit: str, name: str) -> None:
    assert child_name(parent, unit) == name
    assert unit_for_path(f"{parent}/{name}".lstrip("/")) == unit


@pytest.mark.parametrize("path", [
    "pinwarden.slice/other.slice",  # other.slice lives under -.slice
    "pinwarden-vm\\x2dA.slice",  # its parent is pinwarden.slice
    "a//b", "x.scope/y.slice", "init.scope/vm.partition", "/machine", "machine/",
])
def test_impossible_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        unit_for_path(path)


@pytest.mark.parametrize("name", ["A", "web-01", "my_vm", "Hallöchen Meister", "a.b",
                                  "x" * 80])
def test_holder_groups_are_the_slices_libvirt_uses(name: str) -> None:
    """libvirt on systemd hosts turns <partition>/pinwarden/vm-A</partition> into the slice
    pinwarden-vm\\x2dA.slice (each component escaped, joined by "-"): the same unit as the
    layout's holder group path."""
    names = LayoutNames()
    holder = domain_holder("qemu", name, "9a2b6b40-1b7a-4c1e-8f67-1d2c3b4a5e6f")
    partition = libvirt_partition(names, holder)
    libvirt_slice = "-".join(escape_unit_name(p) for p in partition.strip("/").split("/"))
    assert unit_for_path(holder_group_path(names, holder)) == f"{libvirt_slice}.slice"


def test_slice_cgroup_path() -> None:
    assert slice_cgroup_path("pinwarden-vm\\x2dA.slice") == \
        "pinwarden.slice/pinwarden-vm\\x2dA.slice"
    assert slice_cgroup_path("-.slice") == ""


# -- wire traffic -----------------------------------------------------------------------

def test_backend_is_a_cgroup_backend(standin: Standin) -> None:
    bus, backend = _backend(standin)
    try:
        assert isinstance(backend, CgroupBackend)
        assert backend.kind == "systemd"
    finally:
        bus.close()


def test_set_cpus_sends_allowedcpus_as_a_byte_array(standin: Standin) -> None:
    bus, backend = _backend(standin)
    try:
        backend.set_cpus("machine.slice", CpuSet.parse("0,4-5,7"))
        backend.set_mems("machine", CpuSet.parse("0"))
        state = backend.read_group("machine.slice")
    finally:
        bus.close()
    calls = standin.calls("SetUnitProperties")
    assert calls == [
        {"path": MANAGER_PATH, "interface": MANAGER_IFACE, "member": "SetUnitProperties",
         "signature": "sba(sv)",
         "body": ["machine.slice", True, [["AllowedCPUs", ["ay", [0b10110001]]]]]},
        {"path": MANAGER_PATH, "interface": MANAGER_IFACE, "member": "SetUnitProperties",
         "signature": "sba(sv)",
         "body": ["machine.slice", True, [["AllowedMemoryNodes", ["ay", [0b1]]]]]},
    ]
    assert state.cpus == CpuSet.parse("0,4-5,7")
    assert state.effective_cpus == CpuSet.parse("0,4-5,7")
    assert state.mems == CpuSet.parse("0")
    assert not state.populated  # slices never hold processes


def test_high_cpus_and_the_empty_set_on_the_wire(old_standin: Standin) -> None:
    bus, backend = _backend(old_standin)
    try:
        backend.set_cpus("user.slice", CpuSet.of([1, 9, 63]))
        narrowed = backend.read_group("user.slice")
        backend.set_cpus("user.slice", CpuSet())  # systemd: empty = no restriction
        widened = backend.read_group("user.slice")
    finally:
        bus.close()
    bodies = [c["body"][2][0][1] for c in old_standin.calls("SetUnitProperties")]
    assert bodies == [["ay", [0b10, 0b10, 0, 0, 0, 0, 0, 0b10000000]], ["ay", []]]
    assert narrowed.effective_cpus == CpuSet.of([1])  # 9 and 63 are not online
    assert widened.cpus == CpuSet() and widened.effective_cpus == CpuSet.parse("0-7")


def test_the_bus_carries_exactly_what_the_backend_sent(old_standin: Standin) -> None:
    """Independent of the stand-in's own record: a bus monitor sees the raw message."""
    monitor = open_dbus_connection(bus=old_standin.address)
    try:
        Proxy(Monitoring(), monitor, timeout=10).BecomeMonitor(
            [MatchRule(type="method_call", member="SetUnitProperties").serialise()])
        bus, backend = _backend(old_standin)
        try:
            backend.set_cpus(HOLDER, CpuSet.parse("2-3,8"))
        finally:
            bus.close()
        msg = monitor.receive(timeout=10)
        while msg.header.message_type != MessageType.method_call:
            msg = monitor.receive(timeout=10)
    finally:
        monitor.close()
    fields = msg.header.fields
    assert fields[HeaderFields.destination] == "org.freedesktop.systemd1"
    assert fields[HeaderFields.path] == "/org/freedesktop/systemd1"
    assert fields[HeaderFields.interface] == "org.freedesktop.systemd1.Manager"
    assert fields[HeaderFields.signature] == "sba(sv)"
    assert msg.body == ("pinwarden-vm\\x2dA.slice", True,
                        [("AllowedCPUs", ("ay", bytes([0b1100, 0b1])))])


def test_mkdir_starts_a_transient_slice_and_waits_for_its_job(standin: Standin) -> None:
    bus, backend = _backend(standin)
    try:
        backend.mkdir("pinwarden.slice")
        backend.mkdir(HOLDER)
        backend.set_cpus(HOLDER, CpuSet.parse("2-3"))
        holder = backend.read_group(HOLDER)
        parent = backend.read_group("pinwarden.slice")
    finally:
        bus.close()
    members = [c["member"] for c in standin.calls() if c["interface"] == MANAGER_IFACE]
    assert members[0] == "Subscribe"  # JobRemoved is only sent to subscribers
    starts = standin.calls("StartTransientUnit")
    assert [c["signature"] for c in starts] == ["ssa(sv)a(sa(sv))"] * 2
    assert [c["body"] for c in starts] == [
        ["pinwarden.slice", "fail",
         [["Description", ["s", "pinwarden cpuset group pinwarden.slice"]]], []],
        ["pinwarden-vm\\x2dA.slice", "fail",
         [["Description", ["s", f"pinwarden cpuset group {HOLDER}"]]], []],
    ]
    assert holder.effective_cpus == CpuSet.parse("2-3")
    assert parent.children == ("pinwarden-vm\\x2dA.slice",)


def test_read_state_returns_subtree_ancestors_and_their_children(old_standin: Standin) -> None:
    bus, backend = _backend(old_standin)
    try:
        backend.mkdir("pinwarden.slice")
        backend.mkdir(HOLDER)
        snap = backend.read_state([HOLDER, "machine.slice"])
    finally:
        bus.close()
    assert set(snap) == {"", "init.scope", "machine.slice", "pinwarden.slice", "system.slice",
                         "user.slice", HOLDER}
    assert snap.children("pinwarden.slice") == [HOLDER]
    assert snap[""].effective_cpus == CpuSet.parse("0-7")


def test_missing_unit_reads_as_absent_and_errors_as_enoent(standin: Standin) -> None:
    bus, backend = _backend(standin)
    try:
        assert "pinwarden.slice" not in backend.read_state(["pinwarden.slice"])
        with pytest.raises(SystemdOpError) as info:
            backend.read_group("pinwarden.slice")
    finally:
        bus.close()
    assert info.value.errno == errno.ENOENT
    assert info.value.dbus_name == "org.freedesktop.systemd1.NoSuchUnit"


def test_rmdir_stops_an_empty_slice(old_standin: Standin) -> None:
    bus, backend = _backend(old_standin)
    try:
        backend.mkdir("pinwarden.slice")
        backend.mkdir(HOLDER)
        backend.rmdir(HOLDER)
        with pytest.raises(CgroupOpError) as info:
            backend.read_group(HOLDER)
    finally:
        bus.close()
    stops = old_standin.calls("StopUnit")
    assert [(c["signature"], c["body"]) for c in stops] == \
        [("ss", ["pinwarden-vm\\x2dA.slice", "fail"])]
    assert info.value.errno == errno.ENOENT


def test_rmdir_refuses_a_slice_with_running_units(old_standin: Standin, sleeper: int) -> None:
    bus, backend = _backend(old_standin)
    try:
        backend.mkdir("pinwarden.slice")
        backend.attach_process("pinwarden.slice", sleeper)
        with pytest.raises(CgroupOpError) as info:
            backend.rmdir("pinwarden.slice")
        still = backend.read_group("pinwarden.slice")
    finally:
        bus.close()
    assert info.value.errno == errno.EBUSY
    assert "pinwarden-pid" in str(info.value)
    assert old_standin.calls("StopUnit") == []  # stopping would have stopped the process
    assert still.children and still.children[0].startswith(f"pinwarden-pid{sleeper}-")


@pytest.mark.parametrize(("ns", "pid1"), [(12345, "sh"), (12345, "pinwarden")])
def test_attach_process_from_a_pid_namespace_systemd_is_not_pid_1_of_is_refused(
        old_standin: Standin, sleeper: int, monkeypatch: pytest.MonkeyPatch, ns: int,
        pid1: str) -> None:
    """systemd reads the pid in its own PID namespace: a ``pinwarden run`` in a container
    (``unshare --pid``, ``PrivatePIDs=yes``) moved an unrelated host service into the
    job's scope, onto the leased CPU (hunt O).  Refused before systemd is asked."""
    from pinwarden import procs

    real = procs.read_stat
    monkeypatch.setattr(procs, "pid_namespace", lambda: ns)
    monkeypatch.setattr(procs, "read_stat", lambda pid, **kw: replace(
        real(os.getpid()), comm=pid1) if pid == 1 else real(pid, **kw))
    bus, backend = _backend(old_standin)
    try:
        backend.mkdir("pinwarden.slice")
        made = len(old_standin.calls("StartTransientUnit"))  # (the slice's)
        with pytest.raises(CgroupOpError) as info:
            backend.attach_process("pinwarden.slice", sleeper)
    finally:
        bus.close()
    assert info.value.errno == errno.ESRCH
    assert f"this process runs in another PID namespace than systemd (PID 1 here is " \
           f"'{pid1}', not systemd): systemd would take pid {sleeper} for another process " \
           f"of its own; run pinwarden where systemd is PID 1 (the host)" in str(info.value)
    assert len(old_standin.calls("StartTransientUnit")) == made
    monkeypatch.setattr(procs, "read_stat", lambda pid, **kw: replace(
        real(os.getpid()), comm="systemd") if pid == 1 else real(pid, **kw))
    bus, backend = _backend(old_standin)  # a container whose PID 1 is systemd: its own
    try:
        backend.attach_process("pinwarden.slice", sleeper)
    finally:
        bus.close()
    assert len(old_standin.calls("StartTransientUnit")) == made + 1


def test_attach_process_starts_a_scope_in_the_slice(old_standin: Standin, sleeper: int) -> None:
    bus, backend = _backend(old_standin)
    try:
        backend.mkdir("pinwarden.slice")
        backend.attach_process("pinwarden.slice", sleeper)
        slice_state = backend.read_group("pinwarden.slice")
        scope_path = f"pinwarden.slice/{slice_state.children[0]}"
        scope_state = backend.read_group(scope_path)
        assert backend.tasks("pinwarden.slice") == ()
    finally:
        bus.close()
    start = old_standin.calls("StartTransientUnit")[-1]
    name, mode, props, aux = start["body"]
    assert mode == "fail" and aux == []
    assert ["Slice", ["s", "pinwarden.slice"]] in props
    assert ["PIDs", ["au", [sleeper]]] in props
    assert name == slice_state.children[0] and name.endswith(".scope")
    assert scope_state.populated


# -- partitions -------------------------------------------------------------------------

def test_partition_through_cpusetpartition(new_standin: Standin) -> None:
    """A systemd that knows CPUSetPartition= does the exclusive part itself."""
    bus, backend = _backend(new_standin)
    try:
        backend.set_cpus("machine.slice", CpuSet.parse("0-1,4-7"))
        backend.mkdir("pinwarden.slice")
        backend.set_cpus("pinwarden.slice", CpuSet.parse("2-3"))
        backend.set_partition("pinwarden.slice", "exclusive")
        backend.mkdir(HOLDER)
        backend.set_cpus(HOLDER, CpuSet.parse("2-3"))
        backend.set_partition(HOLDER, "isolated")
        snap = backend.read_state([HOLDER])
    finally:
        bus.close()
    sets = [c["body"][2] for c in new_standin.calls("SetUnitProperties")]
    assert [["CPUSetPartition", ["s", "root"]]] in sets
    assert [["CPUSetPartition", ["s", "isolated"]]] in sets
    assert snap["pinwarden.slice"].partition == "exclusive"
    assert snap[HOLDER].partition == "isolated"
    assert snap[HOLDER].effective_cpus == CpuSet.parse("2-3")
    # the kernel takes partition CPUs out of everyone else's effective set ...
    assert snap["system.slice"].effective_cpus == CpuSet.parse("0-1,4-7")
    # ... and out of the parent's (systemd reports it empty); like the v2 backend, this
    # backend reports a partition's subtree CPUs, as cgroup v1 would
    assert snap["pinwarden.slice"].effective_cpus == CpuSet.parse("2-3")
    assert snap[""].effective_cpus == CpuSet.parse("0-7")
    assert snap[""].partition == "exclusive"


@dataclass
class KernelRecorder:
    """Minimal local stand-in for the cgroup v2 backend (another helper's module): records
    the partition writes the systemd backend delegates and answers reads with them."""

    partitions: dict[str, PartitionKind] = field(default_factory=dict)
    writes: list[tuple[str, PartitionKind]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "v2"

    def read_group(self, path: str) -> GroupState:
        return GroupState(path=path, cpus=CpuSet(), mems=CpuSet(),
                          partition=self.partitions.get(path, "member"),
                          effective_cpus=CpuSet(), effective_mems=CpuSet(), populated=False)

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        self.writes.append((path, kind))
        self.partitions[path] = kind

    def tasks(self, path: str) -> tuple[int, ...]:
        return (4242,)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the systemd backend must not call kernel.{name}")


@dataclass
class StaleKernel(KernelRecorder):
    """The kernel files systemd left: ``cpuset.cpus``/``cpuset.mems`` per cgroup (absent:
    no cpuset files), and the writes made to them."""

    files: dict[str, tuple[str, str]] = field(default_factory=dict)
    cpuset_writes: list[tuple[str, str, str]] = field(default_factory=list)

    def read_group(self, path: str) -> GroupState:
        if path not in self.files:
            raise CgroupOpError("read", path, errno.ENOENT, detail="no cpuset.cpus")
        cpus, mems = (CpuSet.parse_kernel(v) for v in self.files[path])
        return GroupState(path=path, cpus=cpus, mems=mems, partition="member",
                          effective_cpus=cpus, effective_mems=mems, populated=False)

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        self.cpuset_writes.append((path, "cpuset.cpus", cpus.to_list()))
        self.files[path] = (cpus.to_list(), self.files[path][1])

    def set_mems(self, path: str, mems: CpuSet) -> None:
        self.cpuset_writes.append((path, "cpuset.mems", mems.to_list()))
        self.files[path] = (self.files[path][0], mems.to_list())


def test_an_emptied_setting_empties_the_kernel_file_systemd_leaves(
        old_standin: Standin) -> None:
    """``AllowedCPUs=`` (no restriction) set back on machine.slice after the last lease:
    the kernel file kept the narrowed value (252 and 257, story_lxc).  The backend empties
    it through the cgroup v2 backend (which writes what the slice inherits where the kernel
    refuses the empty value: test_lab_v2).  A file already empty, or none (the controller
    off), is left alone."""
    kernel = StaleKernel(files={"machine.slice": ("2-3", "0")})
    bus, backend = _backend(old_standin, kernel=kernel)
    try:
        backend.set_cpus("machine.slice", CpuSet.parse("2-3"))
        assert kernel.cpuset_writes == []
        backend.set_cpus("machine.slice", CpuSet())
        backend.set_mems("machine.slice", CpuSet())
        assert kernel.cpuset_writes == [("machine.slice", "cpuset.cpus", ""),
                                        ("machine.slice", "cpuset.mems", "")]
        backend.set_cpus("machine.slice", CpuSet())
        assert len(kernel.cpuset_writes) == 2
        del kernel.files["machine.slice"]
        backend.set_cpus("machine.slice", CpuSet())
        assert len(kernel.cpuset_writes) == 2
        assert backend.read_group("machine.slice").cpus == CpuSet()
    finally:
        bus.close()


def test_partition_without_cpusetpartition_is_written_to_the_slice_cgroup(
        old_standin: Standin) -> None:
    kernel = KernelRecorder()
    bus, backend = _backend(old_standin, kernel=kernel)
    try:
        backend.mkdir("pinwarden.slice")
        backend.mkdir(HOLDER)
        backend.set_partition(HOLDER, "exclusive")
        state = backend.read_group(HOLDER)
    finally:
        bus.close()
    assert kernel.writes == [("pinwarden.slice/pinwarden-vm\\x2dA.slice", "exclusive")]
    assert state.partition == "exclusive"
    assert all(c["body"][2][0][0] != "CPUSetPartition"
               for c in old_standin.calls("SetUnitProperties"))


def test_partition_without_cpusetpartition_or_kernel_backend_says_why(
        old_standin: Standin) -> None:
    bus, backend = _backend(old_standin)
    try:
        backend.mkdir("pinwarden.slice")
        with pytest.raises(CgroupOpError) as info:
            backend.set_partition("pinwarden.slice", "exclusive")
    finally:
        bus.close()
    assert info.value.errno == errno.EOPNOTSUPP
    assert "CPUSetPartition" in str(info.value) and "pinwarden.slice" in str(info.value)


# -- errors -----------------------------------------------------------------------------

def _one_line(exc: SystemdOpError) -> EnforceError:
    err = exc.as_enforce_error()
    assert isinstance(err, EnforceError) and err.code == "enforce"
    assert "\n" not in str(err)
    return err


def test_unknown_unit_is_enoent_naming_the_unit(standin: Standin) -> None:
    bus, backend = _backend(standin)
    try:
        with pytest.raises(SystemdOpError) as info:
            backend.set_cpus("machine.slice/machine-qemu\\x2d9\\x2dX.scope", CpuSet.of([1]))
    finally:
        bus.close()
    exc = info.value
    assert exc.errno == errno.ENOENT
    assert exc.dbus_name == "org.freedesktop.systemd1.NoSuchUnit"
    assert str(_one_line(exc)) == (
        "systemd refused to set AllowedCPUs of machine-qemu\\x2d9\\x2dX.scope = 1: "
        "Unit machine-qemu\\x2d9\\x2dX.scope not found "
        "[org.freedesktop.systemd1.NoSuchUnit]; machine-qemu\\x2d9\\x2dX.scope is not loaded "
        "(stopped or never created); check `systemctl status machine-qemu\\x2d9\\x2dX.scope` "
        "and re-run the command")


def test_existing_unit_is_eexist(standin: Standin) -> None:
    standin.add_unit("pinwarden.slice", "inactive", True)  # a unit file exists
    bus, backend = _backend(standin)
    try:
        with pytest.raises(SystemdOpError) as info:
            backend.mkdir("pinwarden.slice")
    finally:
        bus.close()
    assert info.value.errno == errno.EEXIST
    assert info.value.dbus_name == "org.freedesktop.systemd1.UnitExists"
    assert "pinwarden.slice" in str(_one_line(info.value))


def test_failed_job_is_an_error(standin: Standin) -> None:
    standin.fail_next_job("pinwarden.slice", "failed")
    bus, backend = _backend(standin)
    try:
        with pytest.raises(SystemdOpError) as info:
            backend.mkdir("pinwarden.slice")
    finally:
        bus.close()
    assert (info.value.errno, info.value.job_result, info.value.dbus_name) == \
        (errno.EIO, "failed", "")
    assert str(_one_line(info.value)) == (
        "systemd refused to create pinwarden.slice: the start job of pinwarden.slice ended "
        "with result 'failed'; check `systemctl status pinwarden.slice` and "
        "`journalctl -u pinwarden.slice` for systemd's reason")


def test_property_unknown_to_this_systemd_is_named(old_standin: Standin) -> None:
    bus, backend = _backend(old_standin)
    backend._partition_supported = True  # as if systemd was downgraded since we asked
    try:
        with pytest.raises(SystemdOpError) as info:
            backend.set_partition("machine.slice", "exclusive")
    finally:
        bus.close()
    exc = info.value
    assert exc.dbus_name == "org.freedesktop.DBus.Error.PropertyReadOnly"
    assert exc.errno == errno.EROFS
    assert "does not support CPUSetPartition=" in str(_one_line(exc))


def test_vanished_process_is_esrch(old_standin: Standin) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    bus, backend = _backend(old_standin)
    try:
        backend.mkdir("pinwarden.slice")
        with pytest.raises(SystemdOpError) as info:
            backend.attach_process("pinwarden.slice", gone.pid)
    finally:
        bus.close()
    assert info.value.errno == errno.ESRCH
    assert "exited" in str(_one_line(info.value))


def test_primitives_systemd_cannot_do_are_refused(old_standin: Standin) -> None:
    bus, backend = _backend(old_standin)
    try:
        with pytest.raises(CgroupOpError) as thread:
            backend.attach_thread("machine.slice", os.getpid())
        with pytest.raises(CgroupOpError) as scope:
            backend.mkdir("machine.slice/x.scope")
        with pytest.raises(CgroupOpError) as bad:
            backend.set_cpus("pinwarden.slice/other.slice", CpuSet.of([1]))
    finally:
        bus.close()
    assert thread.value.errno == errno.EOPNOTSUPP
    assert scope.value.errno == errno.EINVAL and bad.value.errno == errno.EINVAL
    assert old_standin.calls("SetUnitProperties") == []


def test_no_systemd_on_the_bus_is_a_clear_error(bus_address: str, tmp_path: Path) -> None:
    with pytest.raises(EnforceError, match=r"cannot reach systemd .*ServiceUnknown.*"
                                           r"use the cgroup v1/v2 backend"):
        SystemdBus.connect(bus_address, timeout=10)
    with pytest.raises(EnforceError, match="no D-Bus connection"):
        SystemdBus.connect(f"unix:path={tmp_path}/nothing", timeout=10)


# -- the stand-in against systemd's documented behaviour --------------------------------

def test_standin_checks_types_and_applies_nothing_on_error(old_standin: Standin) -> None:
    bus = SystemdBus.connect(old_standin.address, timeout=10)
    try:
        with pytest.raises(DBusCallError) as wrong_type:
            bus.set_unit_properties("machine.slice", True, [("AllowedCPUs", ("s", "0-3"))])
        with pytest.raises(DBusCallError) as unknown:
            bus.set_unit_properties("machine.slice", True, [
                ("AllowedCPUs", ("ay", b"\x0f")), ("CPUSetPartition", ("s", "root"))])
        with pytest.raises(DBusCallError) as signature:
            bus.call(MANAGER_PATH, MANAGER_IFACE, "SetUnitProperties", "sa(sv)",
                     ("machine.slice", []))
        with pytest.raises(DBusCallError) as bad_name:
            bus.load_unit("no-such-type.bogus")
        allowed = bus.get_property(bus.get_unit("machine.slice"),
                                   "org.freedesktop.systemd1.Slice", "AllowedCPUs")
    finally:
        bus.close()
    assert (wrong_type.value.name, wrong_type.value.message) == (
        "System.Error.ENXIO", "Failed to set unit properties: Unexpected message contents")
    assert (unknown.value.name, unknown.value.message) == (
        "org.freedesktop.DBus.Error.PropertyReadOnly",
        "Cannot set property CPUSetPartition, or unknown property.")
    assert allowed == ("ay", b"")  # the valid AllowedCPUs before it was not applied
    assert (signature.value.name, signature.value.message) == (
        "org.freedesktop.DBus.Error.InvalidArgs",
        "Invalid arguments 'sa(sv)' to call org.freedesktop.systemd1.Manager."
        "SetUnitProperties(), expecting 'sba(sv)'.")
    assert bad_name.value.name == "org.freedesktop.DBus.Error.InvalidArgs"


def test_standin_loads_slices_without_files_but_not_scopes(old_standin: Standin) -> None:
    bus = SystemdBus.connect(old_standin.address, timeout=10)
    try:
        with pytest.raises(DBusCallError) as not_loaded:
            bus.get_unit("pinwarden.slice")
        path = bus.load_unit("pinwarden.slice")
        state = bus.get_property(path, "org.freedesktop.systemd1.Unit", "LoadState")
        scope = bus.get_property(bus.load_unit("x.scope"), "org.freedesktop.systemd1.Unit",
                                 "LoadState")
        with pytest.raises(DBusCallError) as unknown_prop:
            bus.get_property(path, "org.freedesktop.systemd1.Slice", "CPUSetPartition")
    finally:
        bus.close()
    assert not_loaded.value.message == "Unit pinwarden.slice not loaded."
    assert path == "/org/freedesktop/systemd1/unit/pinwarden_2eslice"
    assert state == ("s", "loaded") and scope == ("s", "not-found")
    assert unknown_prop.value.name == "org.freedesktop.DBus.Error.UnknownProperty"


# -- the transactional core on top ------------------------------------------------------

def _leases_for_a() -> list[Lease]:
    return [lease(2, "A", "qemu", "vcpu0"), lease(3, "A", "qemu", "vcpu1")]


H = "pinwarden-vm-A.partition"  # the holder group of domain A: a slice beside machine.slice
H_UNIT = "pinwarden\\x2dvm\\x2dA.slice"


def test_sync_drives_systemd_and_releases(old_standin: Standin) -> None:
    """apply.sync (another helper's core) over this backend: lease, then release."""
    kernel = KernelRecorder()
    bus, backend = _backend(old_standin, kernel=kernel)
    host = make_host("0-7", "1-7")
    try:
        sync_leases(backend, host, _leases_for_a())
        leased = backend.read_state(["machine", H])
        assert backend.kernel_path(H) == H_UNIT
        sync_leases(backend, host, [])
        released = backend.read_state(["machine"])
    finally:
        bus.close()
    assert leased["machine"].cpus == CpuSet.parse("1,4-7")
    assert leased[H].cpus == CpuSet.parse("2-3")
    assert leased[H].partition == "exclusive"
    assert set(leased) >= {"", "machine", "system", "user", "init.scope", H}
    assert kernel.writes[:1] == [(H_UNIT, "exclusive")]
    starts = [c["body"][0] for c in old_standin.calls("StartTransientUnit")]
    stops = [c["body"][0] for c in old_standin.calls("StopUnit")]
    assert starts == [H_UNIT]
    assert H_UNIT in stops
    assert released["machine"].cpus in (CpuSet(), CpuSet.parse("1-7"))
    assert H not in released


def test_a_stale_holder_slice_is_found_by_its_unit_name(old_standin: Standin) -> None:
    """With the shared group named by its unit (``machine.slice``, as on real hosts), a
    backend lists the top-level groups it was not asked for by unit name too: the holder
    slice of a domain that died while no pinwarden ran (a new pinwarden process, a new
    backend) is still recognised as pinwarden's, and removed."""
    names = LayoutNames(shared="machine.slice")
    host = make_host("0-7", "1-7")
    e_unit = "pinwarden\\x2dvm\\x2dE.slice"
    bus, backend = _backend(old_standin, kernel=KernelRecorder())
    try:
        sync_leases(backend, host, [*_leases_for_a(), lease(4, "E", "qemu", "vcpu0")], names)
    finally:
        bus.close()
    bus, backend = _backend(old_standin, kernel=KernelRecorder())
    try:
        listed = backend.read_state(["machine.slice"])
        assert e_unit in listed.children("")  # by unit name: nobody asked for it by path
        sync_leases(backend, host, _leases_for_a(), names)
        after = backend.read_state(["machine.slice"])
    finally:
        bus.close()
    assert e_unit in [c["body"][0] for c in old_standin.calls("StopUnit")]
    assert e_unit not in after and after["machine.slice"].cpus == CpuSet.parse("1,4-7")


def test_sync_failure_is_rolled_back_through_systemd(old_standin: Standin) -> None:
    bus, backend = _backend(old_standin)  # no CPUSetPartition, no kernel backend
    try:
        with pytest.raises(EnforceError, match=r"pinwarden-vm-A\.partition exclusive"):
            sync_leases(backend, make_host("0-7", "1-7"), _leases_for_a())
        after = backend.read_state(["machine"])
    finally:
        bus.close()
    assert after["machine"].cpus == CpuSet()  # as before
    assert H not in after
    assert [c["body"][0] for c in old_standin.calls("StopUnit")] == [H_UNIT]


def test_sync_with_cpusetpartition(new_standin: Standin) -> None:
    """With CPUSetPartition= systemd does it all: no cgroupfs write by pinwarden."""
    bus, backend = _backend(new_standin)
    host = make_host("0-7", "1-7")
    try:
        sync_leases(backend, host, _leases_for_a())
        leased = backend.read_state(["machine", H])
        sync_leases(backend, host, [])
        released = backend.read_state(["machine"])
    finally:
        bus.close()
    holder = leased[H]
    assert (holder.partition, holder.effective_cpus) == ("exclusive", CpuSet.parse("2-3"))
    assert leased["machine"].effective_cpus == CpuSet.parse("1,4-7")
    assert leased["system"].effective_cpus == CpuSet.parse("0-1,4-7")  # partitions at work
    assert released["system"].effective_cpus == CpuSet.parse("0-7")
    assert H not in released


def _cgroup_dir(root: Path, path: str, cpus: str) -> None:
    """cgroupfs files of one v2 group, as plain files (the real kernel's are checked by the
    v2 backend's own tests)."""
    d = root / path
    d.mkdir(parents=True)
    for name, text in {"cpuset.cpus": cpus, "cpuset.cpus.effective": cpus,
                       "cpuset.mems": "0", "cpuset.mems.effective": "0",
                       "cpuset.cpus.partition": "member", "cgroup.procs": ""}.items():
        (d / name).write_text(text + "\n")


def test_partition_fallback_drives_the_real_v2_backend_at_the_unit_cgroup(
        old_standin: Standin, tmp_path: Path) -> None:
    """The slice's ControlGroup path, backslashes and all, is what CgroupV2Backend gets."""
    _cgroup_dir(tmp_path, "pinwarden.slice", "2-3")
    _cgroup_dir(tmp_path, "pinwarden.slice/pinwarden-vm\\x2dA.slice", "2-3")
    bus, backend = _backend(old_standin, kernel=CgroupV2Backend(tmp_path))
    try:
        backend.mkdir("pinwarden.partition")
        backend.mkdir("pinwarden.partition/vm-A.partition")
        backend.set_partition("pinwarden.partition", "exclusive")
        backend.set_partition("pinwarden.partition/vm-A.partition", "isolated")
        state = backend.read_group("pinwarden.partition/vm-A.partition")
    finally:
        bus.close()
    def written(path: Path) -> str:  # a plain file keeps the old tail after a shorter write
        return (path / "cpuset.cpus.partition").read_text().splitlines()[0]

    assert written(tmp_path / "pinwarden.slice" / "pinwarden-vm\\x2dA.slice") == "isolated"
    assert written(tmp_path / "pinwarden.slice") == "root"
    assert (state.partition, state.partition_error) == ("isolated", None)


# -- entry points -----------------------------------------------------------------------

def test_systemd_booted_is_sd_booted(tmp_path: Path) -> None:
    assert systemd_booted(Path("/")) == Path("/run/systemd/system").is_dir()
    assert not systemd_booted(tmp_path)
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    assert systemd_booted(tmp_path)


def test_open_backend_says_why_it_cannot_run_here(bus_address: str) -> None:
    """On the real host: without a cgroup2 cpuset controller (this machine: cpuset on v1)
    systemd cannot do cpusets at all; with one, a bus without systemd is the reason."""
    if read_mounts(Path("/")).v2_has("cpuset"):
        expected = r"cannot reach systemd .*ServiceUnknown"
    else:
        expected = (r"systemd cannot manage cpusets on this host: .*no cpuset controller.*"
                    r"use the cgroup v1 backend")
    with pytest.raises(EnforceError, match=expected):
        open_backend(bus_address, timeout=10)


def test_spoofed_job_signals_are_not_believed(old_standin: Standin) -> None:
    """Any client may emit a JobRemoved signal; the backend's match rule names systemd's
    bus name, so the bus only delivers systemd's own."""
    bus, backend = _backend(old_standin)
    rogue = open_dbus_connection(bus=old_standin.address)
    try:
        emitter = DBusAddress(MANAGER_PATH, interface=MANAGER_IFACE)
        rogue.send(new_signal(emitter, "JobRemoved", "uoss",
                              (1, f"{MANAGER_PATH}/job/1", "pinwarden.slice", "failed")))
        Proxy(message_bus, rogue, timeout=10).GetId()  # the bus has routed the signal
        backend.mkdir("pinwarden.slice")  # systemd's job 1 is "done"
        state = backend.read_group("pinwarden.slice")
    finally:
        rogue.close()
        bus.close()
    assert state.effective_cpus == CpuSet.parse("0-7")


def test_loaded_but_inactive_slice_has_no_cgroup(standin: Standin) -> None:
    standin.add_unit("pinwarden.slice", "inactive", False)
    bus, backend = _backend(standin)
    try:
        assert "pinwarden.partition" not in backend.read_state(["pinwarden.partition"])
        with pytest.raises(CgroupOpError) as info:
            backend.read_group("pinwarden.partition")
        backend.mkdir("pinwarden.partition")  # a loaded slice without a file is pristine
        assert backend.read_group("pinwarden.partition").effective_cpus
    finally:
        bus.close()
    assert info.value.errno == errno.ENOENT
    assert "pinwarden.slice is inactive" in str(info.value)


def test_lost_bus_is_a_clear_error(tmp_path: Path) -> None:
    daemon, address = _start_bus(tmp_path)
    try:
        with _running_standin(address, tmp_path / "standin.log") as standin:
            bus, backend = _backend(standin)
            _end(daemon)  # the bus goes away under the backend
            with pytest.raises(SystemdOpError) as info:
                backend.set_cpus("machine.slice", CpuSet.of([1]))
            bus.close()
    finally:
        _end(daemon)
    assert info.value.errno == errno.ECONNRESET
    assert str(_one_line(info.value)).startswith(
        "could not reach systemd to set AllowedCPUs of machine.slice = 1: D-Bus connection "
        "lost during LoadUnit")
    assert str(_one_line(info.value)).endswith(
        "[org.freedesktop.DBus.Error.Disconnected]; the system bus went away (dbus "
        "restarted?); run the command again")


# -- backend selection (pinwarden.enforce.select) ------------------------------------------


def _root(tmp_path: Path, *, systemd: bool, v1: bool, v2: str | None) -> Path:
    from hostroot import mount_cgroups

    root = tmp_path / "root"
    mount_cgroups(root, v1=v1, v2_controllers=v2, v2_at="sys/fs/cgroup" if not v1 else
                  "sys/fs/cgroup/unified", cpus="0-7")
    if systemd:
        (root / "run/systemd/system").mkdir(parents=True)
    return root


@pytest.mark.parametrize(("systemd", "v1", "v2", "kind"), [
    (True, False, "cpuset cpu io memory pids", "systemd"),   # systemd owns a v2 cpuset tree
    (True, True, "cpu io memory pids", "v1"),                # systemd, but cpuset on v1
    (False, False, "cpuset cpu memory", "v2"),               # v2 without systemd (lab VM)
    (False, True, "", "v1"),                                 # this test machine's layout
])
def test_backend_choice(tmp_path: Path, systemd: bool, v1: bool, v2: str | None,
                        kind: str) -> None:
    from pinwarden.enforce.select import choose_backend

    assert choose_backend(_root(tmp_path, systemd=systemd, v1=v1, v2=v2)) == kind


def test_no_cpuset_controller_is_a_one_line_host_error(tmp_path: Path) -> None:
    from pinwarden.enforce.select import choose_backend
    from pinwarden.errors import HostError

    with pytest.raises(HostError, match=r"no cpuset cgroup controller is mounted"):
        choose_backend(_root(tmp_path, systemd=True, v1=False, v2="cpu memory"))


def test_systemd_host_is_driven_over_dbus(tmp_path: Path, old_standin: Standin) -> None:
    """A systemd-booted cgroup-v2 root gets the systemd backend, talking to (here) the
    stand-in on the test bus, with the v2 backend on the unified mount for read-back."""
    from pinwarden.enforce.select import open_backend as select_backend

    backend = select_backend(_root(tmp_path, systemd=True, v1=False,
                                   v2="cpuset cpu io memory pids"),
                             systemd_address=old_standin.address)
    assert isinstance(backend, SystemdBackend) and backend.kind == "systemd"
    backend.set_cpus("machine.slice", CpuSet.parse("0-3"))
    (call,) = old_standin.calls("SetUnitProperties")
    assert call["body"] == ["machine.slice", True, [["AllowedCPUs", ["ay", [0b1111]]]]]


# -- the drop-ins SetUnitProperties(runtime=true) leaves --------------------------------

def _dropins(root: Path, unit: str) -> dict[str, str]:
    folder = root / "run/systemd/system.control" / f"{unit}.d"
    return {p.name: p.read_text().splitlines()[-1] for p in sorted(folder.glob("*"))}


@contextlib.contextmanager
def _standin_manager(address: str, root: Path, state: Path,
                     said: list[str]) -> Iterator[tuple[Any, SystemdBackend]]:
    """A manager over the systemd backend on the stand-in at ``address`` (a host of CPUs
    0-7, VM CPUs 1-7), its warnings to ``said``; and that backend."""
    from pinwarden.config import Config
    from pinwarden.manager import Manager

    bus = SystemdBus.connect(address, timeout=10)
    backend = SystemdBackend(bus, kernel=KernelRecorder(), root=root)
    try:
        with Manager(Config(), root, state, backend=backend, host=make_host("0-7", "1-7"),
                     warn=said.append) as m:
            yield m, backend
    finally:
        bus.close()


@pytest.mark.parametrize("before", ["none", "operator-cpus"])
def test_the_last_release_removes_the_drop_ins_pinwarden_made(
        bus_address: str, tmp_path: Path, before: str) -> None:
    """systemd keeps every ``SetUnitProperties(runtime=true)`` in a drop-in
    (``/run/systemd/system.control/machine.slice.d/50-AllowedCPUs.conf``, FACTS.md 3) that
    outlives the restore and, until the next boot, overrides an operator's drop-in sorting
    before it at every ``daemon-reload``.  The last release puts machine.slice's CPUs back
    and removes the drop-in the first lease made; the operator's drop-ins stay: another
    property's, and an ``AllowedCPUs`` one that was there before the first lease."""
    from pinwarden.model import job_holder
    from pinwarden.policy import JobSpec

    root = tmp_path / "root"
    with _running_standin(bus_address, tmp_path / "standin.log", "--root", str(root)) as s:
        operator = SystemdBus.connect(s.address, timeout=10)
        try:  # systemctl set-property --runtime machine.slice CPUWeight=200 [AllowedCPUs=1-7]
            operator.set_unit_properties("machine.slice", True, [("CPUWeight", ("t", 200))])
            if before == "operator-cpus":
                operator.set_unit_properties("machine.slice", True, [
                    ("AllowedCPUs", ("ay", CpuSet.parse("1-7").to_dbus()))])
        finally:
            operator.close()
        found = _dropins(root, "machine.slice")
        said: list[str] = []
        with _standin_manager(s.address, root, tmp_path / "state", said) as (m, backend):
            # twice: systemd still lists the drop-in the first release removed (until a
            # daemon-reload), which must not pass for the operator's the second time
            for _ in range(2):
                m.reserve_request(JobSpec("J", cpus=CpuSet.parse("3")))
                leased = _dropins(root, "machine.slice")
                recorded = json.loads(m.ledger().changes()["cgroup:machine.slice"])
                m.drop(job_holder("J"))
                assert _dropins(root, "machine.slice") == found
            machine = backend.read_group("machine.slice")
    assert leased["50-AllowedCPUs.conf"] == "AllowedCPUs=1-2,4-7"
    assert _dropins(root, "machine.slice") == found
    assert said == []
    if before == "none":
        assert recorded == {"cpus": "", "dropins": [], "set": "1-2,4-7"}
        assert machine.cpus == CpuSet()
    else:
        assert recorded == {"cpus": "1-7", "dropins": [
            "/run/systemd/system.control/machine.slice.d/50-AllowedCPUs.conf"],
            "set": "1-2,4-7"}
        assert machine.cpus == CpuSet.parse("1-7")
        assert found["50-AllowedCPUs.conf"] == "AllowedCPUs=1-7"


def test_a_stale_holder_slice_narrowed_meanwhile_is_not_set_again_once_gone(
        bus_address: str, tmp_path: Path) -> None:
    """A dead job's holder slice left behind (its supervisor and command killed together)
    still named the CPU the next job leases: the escape check narrowed it, as anybody's,
    recording what to put back, and the layout stopped it.  The last release then set its
    properties again, and systemd created its cgroup again, which nothing removed
    (systemd-lab hunt).  A holder group of pinwarden's own that is gone is not put back."""
    from pinwarden.model import job_holder
    from pinwarden.policy import JobSpec

    root = tmp_path / "root"
    stale = "pinwarden\\x2drun\\x2dgone.slice"
    with _running_standin(bus_address, tmp_path / "standin.log", "--root", str(root)) as s:
        said: list[str] = []
        with _standin_manager(s.address, root, tmp_path / "state", said) as (m, _backend):
            m.reserve_request(JobSpec("J", cpus=CpuSet.parse("3")))
            m.ledger().put_changes({f"cgroup:{stale}": json.dumps(
                {"cpus": "3", "partition": "root", "dropins": []})})
            m.drop(job_holder("J"))
            assert m.ledger().changes() == {}
        set_on = [c["body"][0] for c in s.calls("SetUnitProperties")]
    assert set_on and stale not in set_on, set_on
    assert not (root / "run/systemd/system.control" / f"{stale}.d").exists()


@pytest.mark.parametrize("how", ["set-property", "edit"])
def test_a_daemon_reload_keeps_the_leased_cpu_out_of_the_operators_partition(
        bus_address: str, tmp_path: Path, how: str) -> None:
    """The operator set machine.slice's CPUs in a file: a persistent ``systemctl
    set-property machine.slice AllowedCPUs=1-7`` (``/etc/systemd/system.control/…/
    50-AllowedCPUs.conf``, which masks the runtime drop-in of the same name), or ``systemctl
    edit`` (``override.conf``, which sorts after it).  While CPU 3 is leased, a
    ``daemon-reload`` reads the unit's drop-ins again: machine.slice must stay without CPU 3
    (the lab's ``story_reload`` shows the same on systemd 252 and 257).  After the last
    release the reload gives back the operator's value, and no file of pinwarden's is left."""
    from pinwarden.config import Config
    from pinwarden.enforce.systemd import MANAGER_IFACE, MANAGER_PATH
    from pinwarden.manager import Manager
    from pinwarden.model import job_holder
    from pinwarden.policy import JobSpec

    root = tmp_path / "root"
    with _running_standin(bus_address, tmp_path / "standin.log", "--root", str(root)) as s:
        operator = SystemdBus.connect(s.address, timeout=10)
        bus = SystemdBus.connect(s.address, timeout=10)
        backend = SystemdBackend(bus, kernel=KernelRecorder(), root=root)

        def reload() -> CpuSet:
            operator.call(MANAGER_PATH, MANAGER_IFACE, "Reload", "", ())
            return backend.read_group("machine.slice").cpus

        said: list[str] = []
        try:
            if how == "set-property":
                operator.set_unit_properties("machine.slice", False, [
                    ("AllowedCPUs", ("ay", CpuSet.parse("1-7").to_dbus()))])
            else:
                edit = root / "etc/systemd/system/machine.slice.d/override.conf"
                edit.parent.mkdir(parents=True)
                edit.write_text("[Slice]\nAllowedCPUs=1-7\n")
                assert reload() == CpuSet.parse("1-7")
            found = _dropins(root, "machine.slice")
            with Manager(Config(), root, tmp_path / "state", backend=backend,
                         host=make_host("0-7", "1-7"), warn=said.append) as m:
                m.reserve_request(JobSpec("J", cpus=CpuSet.parse("3")))
                assert backend.read_group("machine.slice").cpus == CpuSet.parse("1-2,4-7")
                reloaded = reload()
                m.drop(job_holder("J"))
                released = backend.read_group("machine.slice").cpus
            left = _dropins(root, "machine.slice")
            after = reload()
        finally:
            bus.close()
            operator.close()
    assert reloaded == CpuSet.parse("1-2,4-7")
    assert released == after == CpuSet.parse("1-7")
    assert left == found == {}
    # not even the folder systemd's runtime drop-in needed
    assert not (root / "run/systemd/system.control/machine.slice.d").exists()
    assert said == []


def test_a_setting_systemd_refuses_leaves_no_file_of_pinwardens(old_standin: Standin) -> None:
    """A unit that is gone (an escaped cgroup's, restored at the last release): systemd
    answers NoSuchUnit, and pinwarden's own drop-in, written first, goes again with the
    folder it made."""
    bus, backend = _backend(old_standin)
    try:
        with pytest.raises(SystemdOpError, match=r"gone\.service"):
            backend.set_cpus("gone.service", CpuSet.parse("1"))
    finally:
        bus.close()
    control = old_standin.root / "run/systemd/system.control"
    assert control.is_dir() and list(control.iterdir()) == []


def test_setting_files_lists_only_the_runtime_drop_ins_of_pinwardens_settings(
        bus_address: str, tmp_path: Path) -> None:
    """Persistent drop-ins (``/etc/systemd/system.control``) and other properties' are
    never pinwarden's: not listed, so never removed.  Nor is a drop-in systemd still lists
    after it was removed (until the next daemon-reload): the trixie lab's story found the
    one an earlier check's release had removed, took it for the operator's, and kept the
    one its own lease wrote."""
    root = tmp_path / "root"
    dropins = root / "run/systemd/system.control/machine.slice.d"
    with _running_standin(bus_address, tmp_path / "standin.log", "--root", str(root)) as s:
        bus = SystemdBus.connect(s.address, timeout=10)
        backend = SystemdBackend(bus, root=root)
        try:
            assert backend.setting_files("nothing.slice") == ()  # not loaded
            bus.set_unit_properties("machine.slice", False, [
                ("AllowedCPUs", ("ay", CpuSet.parse("1-7").to_dbus()))])
            bus.set_unit_properties("machine.slice", True, [("CPUWeight", ("t", 50))])
            assert backend.setting_files("machine.slice") == ()
            backend.set_mems("machine.slice", CpuSet.parse("0"))
            backend.set_cpus("machine.slice", CpuSet.parse("1-7"))
            assert backend.setting_files("machine.slice") == (
                "/run/systemd/system.control/machine.slice.d/50-AllowedCPUs.conf",
                "/run/systemd/system.control/machine.slice.d/50-AllowedMemoryNodes.conf")
            (dropins / "50-AllowedCPUs.conf").unlink()  # still in DropInPaths
            assert backend.setting_files("machine.slice") == (
                "/run/systemd/system.control/machine.slice.d/50-AllowedMemoryNodes.conf",)
        finally:
            bus.close()


def test_a_drop_in_of_its_own_left_with_nothing_leased_is_removed(
        bus_address: str, tmp_path: Path) -> None:
    """``zz-pinwarden-AllowedCPUs.conf`` of machine.slice with nothing leased and no record
    of it (an older pinwarden, which did not know the file, released the last lease):
    every ``daemon-reload`` until the next boot narrowed the slice again.  A sync removes
    it, says so once, and leaves the operator's drop-ins beside it; while a lease is held
    the file is pinwarden's and stays."""
    from pinwarden.model import job_holder
    from pinwarden.policy import JobSpec

    root = tmp_path / "root"
    folder = root / "run/systemd/system.control/machine.slice.d"
    folder.mkdir(parents=True)
    (folder / "zz-pinwarden-AllowedCPUs.conf").write_text(
        "[Slice]\nAllowedCPUs=\nAllowedCPUs=1-2,4-7\n")
    (folder / "50-CPUWeight.conf").write_text("[Slice]\nCPUWeight=50\n")
    said: list[str] = []
    with _running_standin(bus_address, tmp_path / "standin.log", "--root", str(root)) as s, \
            _standin_manager(s.address, root, tmp_path / "state", said) as (m, _backend):
        m.sync()
        assert _dropins(root, "machine.slice") == {"50-CPUWeight.conf": "CPUWeight=50"}
        assert len(said) == 1, said
        assert said[0].startswith("removed /run/systemd/system.control/machine.slice.d/"
                                  "zz-pinwarden-AllowedCPUs.conf: pinwarden's drop-in"), said
        assert "machine.slice gets its own setting back at the next 'systemctl " \
               "daemon-reload'" in said[0], said
        m.sync()  # said once
        m.reserve_request(JobSpec("J", cpus=CpuSet.parse("3")))
        m.sync()  # while leased the file is pinwarden's
        assert _dropins(root, "machine.slice")["zz-pinwarden-AllowedCPUs.conf"] == \
            "AllowedCPUs=1-2,4-7"
        m.drop(job_holder("J"))
    assert len(said) == 1, said
    assert _dropins(root, "machine.slice") == {"50-CPUWeight.conf": "CPUWeight=50"}


@pytest.mark.parametrize(("configured", "edit", "runtime", "change", "after", "dropins"), [
    # configured AllowedCPUs=0-7 (kept in /etc/systemd/system.control); CPU 2 taken away:
    # back as found with the edit made, and the runtime drop-in holding that is kept, as
    # the administrator's own set-property would have left it (removed as pinwarden's,
    # the next daemon-reload undid the edit)
    ("0-7", "1,4-7", True, "removed CPU 2", "0-1,3-7", {"50-AllowedCPUs.conf":
                                                        "AllowedCPUs=0-1,3-7"}),
    # the same edit made persistent (in /etc/systemd/system.control, as the README's
    # set-property is): the runtime drop-in is pinwarden's own write, and goes (it was kept
    # as the administrator's, and held their old value once they removed their own; hunt)
    ("0-7", "1,4-7", False, "removed CPU 2", "0-1,3-7", {}),
    # inheriting (no AllowedCPUs, as systemd ships it); CPU 0 and the leased CPU 3 written
    # in: nothing an inheriting slice lacked, so it goes on inheriting, without a drop-in
    # (the systemd story found it put back as AllowedCPUs=0: an empty "as found" taken
    # as no CPUs, plus the one added)
    (None, "0-7", True, "added CPU 0)", "", {}),
    # inheriting, and set back so ('systemctl revert machine.slice', AllowedCPUs empty):
    # the setting as found, not "removed CPUs 1-2,4-7" — the last release left the slice
    # on 0 for good (systemd-lab hunt)
    (None, "", True, "set back to inherit its parent's CPUs", "", {}),
    # configured, and set back to inherit ('systemctl revert'): what goes back is
    # "inherit", not the parent's CPUs of now — the last release set AllowedCPUs=0-7 and
    # kept it in a runtime drop-in, the housekeeping CPU 0 a VM CPU (systemd-lab hunt)
    ("0-7", "", True, "added CPU 0", "", {}),
], ids=["configured", "configured-persistent", "inheriting", "reverted",
        "configured-reverted"])
def test_an_edit_while_leased_is_put_back_with_its_drop_in(
        bus_address: str, tmp_path: Path, configured: str | None, edit: str, runtime: bool,
        change: str, after: str, dropins: dict[str, str]) -> None:
    """``systemctl set-property [--runtime] machine.slice AllowedCPUs=EDIT`` while CPU 3
    is leased.  (The partition is this test's, fixed: the slice is set back meanwhile.)"""
    from pinwarden.config import Config
    from pinwarden.manager import Manager
    from pinwarden.model import job_holder
    from pinwarden.policy import JobSpec

    root = tmp_path / "root"
    with _running_standin(bus_address, tmp_path / "standin.log", "--root", str(root)) as s:
        bus = SystemdBus.connect(s.address, timeout=10)
        backend = SystemdBackend(bus, kernel=KernelRecorder(), root=root)
        operator = SystemdBus.connect(s.address, timeout=10)
        said: list[str] = []
        try:
            if configured is not None:
                operator.set_unit_properties("machine.slice", False, [
                    ("AllowedCPUs", ("ay", CpuSet.parse(configured).to_dbus()))])
            with Manager(Config(), root, tmp_path / "state", backend=backend,
                         host=make_host("0-7", "1-7"), warn=said.append) as m:
                m.reserve_request(JobSpec("J", cpus=CpuSet.parse("3")))
                assert _dropins(root, "machine.slice") == {
                    "50-AllowedCPUs.conf": "AllowedCPUs=1-2,4-7",
                    "zz-pinwarden-AllowedCPUs.conf": "AllowedCPUs=1-2,4-7"}
                operator.set_unit_properties("machine.slice", runtime, [
                    ("AllowedCPUs", ("ay", CpuSet.parse_kernel(edit).to_dbus()))])
                m.sync()
                assert backend.read_group("machine.slice").cpus == CpuSet.parse("1-2,4-7")
                m.drop(job_holder("J"))
                machine = backend.read_group("machine.slice")
        finally:
            operator.close()
            bus.close()
    assert len(said) == 1 and change in said[0], said
    assert (f"gets {after} back" in said[0]) == bool(after), said
    assert machine.cpus == CpuSet.parse_kernel(after)
    assert _dropins(root, "machine.slice") == dropins


def test_a_holder_slice_pinwarden_did_not_make_loses_its_drop_ins_with_it(
        bus_address: str, tmp_path: Path) -> None:
    """The holder slice of a domain the daemon adopted is machined's, not a transient unit
    of pinwarden's: the CPUs set on it go to runtime drop-ins (systemd's 50-AllowedCPUs.conf
    and pinwarden's own), which stayed after the domain stopped and the slice went, until
    the next boot (systemd-lab hunt).  They go with it — from another process too."""
    root = tmp_path / "root"
    unit = "pinwarden\\x2dvm\\x2dA.slice"
    folder = root / "run/systemd/system.control" / f"{unit}.d"
    with _running_standin(bus_address, tmp_path / "standin.log", "--root", str(root)) as s:
        s.add_unit(unit, "active", False)  # made by machined: not transient
        bus = SystemdBus.connect(s.address, timeout=10)
        try:
            SystemdBackend(bus, kernel=KernelRecorder(), root=root).set_cpus(
                "pinwarden-vm-A.partition", CpuSet.parse("3"))
            assert set(_dropins(root, unit)) == {"50-AllowedCPUs.conf",
                                                  "zz-pinwarden-AllowedCPUs.conf"}
            (folder / "60-operator.conf").write_text("[Slice]\nCPUWeight=50\n")
            # a later command's backend (no memory of the write) removes the group
            SystemdBackend(bus, kernel=KernelRecorder(), root=root).rmdir(
                "pinwarden-vm-A.partition")
        finally:
            bus.close()
    assert set(_dropins(root, unit)) == {"60-operator.conf"}  # (not pinwarden's: kept)

