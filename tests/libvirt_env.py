"""A real libvirtd + QEMU for the ``libvirt`` tests, and tiny diskless domains.

Import the fixtures into a test module with ``from libvirt_env import *`` (or by name).

* ``libvirt_daemons`` (session): makes sure virtlogd, virtlockd and libvirtd run.  Only the
  daemons that are not already running are started — in the foreground, as our children,
  so we know their pids — and only those are stopped at the end, by pid.
* ``virt`` (session): an open ``qemu:///system`` connection.
* ``domains`` (function): creates ``pwtest-…`` domains and destroys/undefines every one of
  them at teardown, also when the test fails.
* :func:`tiny_domain_xml`: ``<domain type='kvm'>`` (TCG ``qemu`` when ``/dev/kvm`` is not
  usable), 32 MiB, no devices but the emulator: boots to firmware and gives real vCPU threads.

No systemd runs here, so libvirt uses its own cgroup layout: ``machine/qemu-N-NAME.libvirt-qemu/
{emulator,vcpuN}`` in every mounted hierarchy (cgroup2 ``unified`` included).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest

try:
    import libvirt as libvirt
except ImportError:  # pragma: no cover - reported by the fixtures
    libvirt = None

URI = "qemu:///system"
QEMU = "/usr/bin/qemu-system-x86_64"
CPUSET = Path("/sys/fs/cgroup/cpuset")
HOOKS_DIR = Path("/etc/libvirt/hooks")
QEMU_LOGS = Path("/var/log/libvirt/qemu")
PW_NS = "urn:pinwarden:domain:1"
RUN = Path("/run")
DAEMONS = ("virtlogd", "virtlockd", "libvirtd")
PREFIX = "pwtest-"
KVM_GET_API_VERSION = 0xAE00


def kvm_usable() -> bool:
    """``/dev/kvm`` opens and answers ``KVM_GET_API_VERSION`` with 12."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


DOMAIN_TYPE = "kvm" if kvm_usable() else "qemu"


def tiny_domain_xml(name: str, *, vcpus: int = 1, uuid: str | None = None,
                    cpuset: str | None = None, vcpupins: dict[int, str] | None = None,
                    emulatorpin: str | None = None, exclusive: bool = False,
                    partition: str | None = None, memory_mib: int = 32) -> str:
    """A diskless domain that boots to firmware."""
    if not name.startswith(PREFIX):
        raise ValueError(f"test domains are named {PREFIX}*, not {name!r}")
    vcpu_attr = f" placement='static' cpuset={quoteattr(cpuset)}" if cpuset else ""
    pins = "".join(f"<vcpupin vcpu='{v}' cpuset={quoteattr(c)}/>"
                   for v, c in sorted((vcpupins or {}).items()))
    if emulatorpin:
        pins += f"<emulatorpin cpuset={quoteattr(emulatorpin)}/>"
    cputune = f"<cputune>{pins}</cputune>" if pins else ""
    meta = (f"<metadata><pw:cpu xmlns:pw='{PW_NS}' exclusive='yes'/></metadata>"
            if exclusive else "")
    resource = (f"<resource><partition>{partition}</partition></resource>"
                if partition else "")
    return (f"<domain type='{DOMAIN_TYPE}'><name>{escape(name)}</name>"
            f"<uuid>{uuid or uuid_mod.uuid4()}</uuid>{meta}"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu{vcpu_attr}>{vcpus}</vcpu>"
            f"{cputune}{resource}<os><type arch='x86_64'>hvm</type></os>"
            f"<on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>"
            f"<devices><emulator>{QEMU}</emulator></devices></domain>")


# -- daemons ------------------------------------------------------------------------------

def running_pid(daemon: str) -> int | None:
    """pid of a live ``daemon`` per its pid file, or None."""
    try:
        pid = int((RUN / f"{daemon}.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return pid if comm == daemon and state != "Z" else None


@dataclass
class Daemons:
    """The daemons this session started (others were already running and are left alone)."""

    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None

    def owns(self, daemon: str) -> bool:
        return daemon in self.started

    def start(self, daemon: str) -> None:
        assert self.log_dir is not None
        log = open(self.log_dir / f"{daemon}.log", "ab")  # noqa: SIM115 - child's stderr
        proc = subprocess.Popen([daemon], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        self.started[daemon] = proc
        deadline = time.monotonic() + 30
        while running_pid(daemon) != proc.pid:
            if proc.poll() is not None:
                raise RuntimeError(f"{daemon} exited with {proc.returncode}; see "
                                   f"{self.log_dir / (daemon + '.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon} did not write /run/{daemon}.pid within 30 s")
            time.sleep(0.05)
        if daemon == "libvirtd":
            wait_for_libvirtd(proc)

    def stop(self, daemon: str) -> None:
        proc = self.started.pop(daemon, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart_libvirtd(self) -> None:
        """Restart libvirtd (so it notices hook scripts); only if this session started it."""
        if not self.owns("libvirtd"):
            pid = running_pid("libvirtd")
            pytest.fail(f"libvirtd (pid {pid}) was running before the tests and is not ours "
                        f"to restart; the hook tests need libvirtd to start after the hook "
                        f"is installed: stop it and rerun")
        self.stop("libvirtd")
        self.start("libvirtd")


def wait_for_libvirtd(proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = libvirt.open(URI)
            conn.close()
            return
        except libvirt.libvirtError as exc:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {proc.returncode}") from exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd does not answer on {URI}: {exc}") from exc
            time.sleep(0.1)


def require_libvirt() -> None:
    if libvirt is None:
        pytest.fail("libvirt-python is not installed: pip install -e '.[libvirt]' "
                    "(needs libvirt-dev and pkg-config)")
    missing = [p for p in ("libvirtd", "virtlogd", "virtlockd") if shutil.which(p) is None]
    if missing or not Path(QEMU).exists():
        pytest.fail(f"missing {', '.join(missing) or QEMU}: apt-get install "
                    f"libvirt-daemon-system qemu-system-x86")
    if os.geteuid() != 0:
        pytest.fail("the libvirt tests need root (they start libvirtd and write cgroups)")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; the tests look at exceptions."""


@pytest.fixture(scope="session")
def libvirt_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    require_libvirt()
    libvirt.registerErrorHandler(_quiet, None)
    (RUN / "libvirt").mkdir(parents=True, exist_ok=True)
    daemons = Daemons(log_dir=tmp_path_factory.mktemp("libvirt-logs"))
    try:
        for daemon in DAEMONS:
            if running_pid(daemon) is None:
                daemons.start(daemon)
        if not daemons.owns("libvirtd"):
            wait_for_libvirtd()
        yield daemons
    finally:
        for daemon in reversed(DAEMONS):
            daemons.stop(daemon)


@pytest.fixture(scope="session")
def virt(libvirt_daemons: Daemons) -> Iterator[Any]:
    conn = libvirt.open(URI)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# -- domains ------------------------------------------------------------------------------

def cleanup_domain(conn: Any, name: str) -> None:
    """Destroy and undefine ``name`` if it exists, and remove its log (libvirt keeps it
    past the undefine); never raises for a missing domain."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        dom = None
    if dom is not None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():  # with its managed save image, if a test left one
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    with contextlib.suppress(OSError):
        (QEMU_LOGS / f"{name}.log").unlink()


class Domains:
    """Creates test domains and remembers them for teardown."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.names: list[str] = []

    def track(self, name: str) -> str:
        if name not in self.names:
            self.names.append(name)
        return name

    def define(self, name: str, **kw: Any) -> Any:
        self.track(name)
        cleanup_domain(self.conn, name)
        return self.conn.defineXML(tiny_domain_xml(name, **kw))

    def uuid(self, name: str) -> str:
        return str(self.conn.lookupByName(name).UUIDString())

    def create(self, name: str, **kw: Any) -> Any:
        """A transient, running domain."""
        self.track(name)
        cleanup_domain(self.conn, name)
        return self.conn.createXML(tiny_domain_xml(name, **kw), 0)

    def cleanup(self) -> None:
        """Destroy/undefine every tracked domain, over a fresh connection when libvirtd
        was restarted meanwhile (the old one is dead then)."""
        conn = self.conn
        try:
            conn.getLibVersion()  # a round trip: fails on a connection libvirtd dropped
        except libvirt.libvirtError:
            conn = libvirt.open(URI)
        for name in reversed(self.names):
            cleanup_domain(conn, name)
        if conn is not self.conn:
            conn.close()


@pytest.fixture
def domains(libvirt_daemons: Daemons) -> Iterator[Domains]:
    """Its own connection, opened now: a module fixture may have restarted libvirtd."""
    conn = libvirt.open(URI)
    doms = Domains(conn)
    try:
        yield doms
    finally:
        doms.cleanup()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# -- kernel views -------------------------------------------------------------------------

def qemu_pid(name: str) -> int:
    """QEMU's pid as libvirt's status file (``NAME.xml``, the name as it is) records it:
    not from the pid file, whose name libvirt escapes and pinwarden reads."""
    status = ET.parse(RUN / "libvirt" / "qemu" / f"{name}.xml").getroot()
    assert status.tag == "domstatus", status.tag
    return int(status.attrib["pid"])


def cpuset_cgroup_of(tid: int) -> str:
    """The cpuset cgroup of a thread, relative to the cpuset mount (no leading slash)."""
    for line in Path(f"/proc/{tid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuset" in controllers.split(","):
            return path.strip("/")
    raise AssertionError(f"thread {tid} has no cpuset cgroup")


def domain_cgroup(name: str) -> str:
    """``machine/qemu-N-NAME.libvirt-qemu`` (the parent of the emulator/vcpu groups)."""
    path = cpuset_cgroup_of(qemu_pid(name))
    return path.rsplit("/", 1)[0] if path.endswith("/emulator") else path


def thread_affinity(tid: int) -> frozenset[int]:
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_list(line.split(":", 1)[1])
    raise AssertionError(f"no Cpus_allowed_list for {tid}")


def threads_of(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def vm_affinity(name: str) -> frozenset[int]:
    """Union of the CPUs every thread of the domain's QEMU may run on (kernel view)."""
    out: set[int] = set()
    for tid in threads_of(qemu_pid(name)):
        with contextlib.suppress(FileNotFoundError):
            out |= thread_affinity(tid)
    return frozenset(out)


def thread_affinities(name: str) -> dict[str, frozenset[int]]:
    """The CPUs each thread of the domain's QEMU may run on, by thread name (``CPU 0/KVM``,
    ``call_rcu``, ``IO mon_iothread``...; threads of one name — QEMU's workers — merged)."""
    pid = qemu_pid(name)
    out: dict[str, set[int]] = {}
    for tid in threads_of(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out.setdefault(comm, set()).update(thread_affinity(tid))
    return {comm: frozenset(cpus) for comm, cpus in out.items()}


def parse_list(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return frozenset(out)


def read_cpus(path: str, what: str = "cpus") -> frozenset[int]:
    return parse_list((CPUSET / path / f"cpuset.{what}").read_text())


def cpu_exclusive(path: str) -> bool:
    return (CPUSET / path / "cpuset.cpu_exclusive").read_text().strip() == "1"


def set_cpu_exclusive(path: str, on: bool) -> None:
    (CPUSET / path / "cpuset.cpu_exclusive").write_text("1" if on else "0")


# -- pinwarden under test -----------------------------------------------------------------

#: The pinwarden under test (hook scripts exec it too); PINWARDEN_EXE overrides.
PINWARDEN = os.environ.get("PINWARDEN_EXE") or str(Path(sys.executable).with_name("pinwarden"))


@dataclass
class Pinwarden:
    """The CLI with a private state dir and config (``none`` mode, host reserve CPU 0, holder
    groups named after ``exclusive`` — ``pwtest-….partition`` gives
    ``pwtest-…-vm-NAME.partition`` — so tests never touch a real pinwarden's groups)."""

    state: Path
    config: Path
    exclusive: str

    @classmethod
    def make(cls, base: Path, exclusive: str) -> Pinwarden:
        if not exclusive.startswith("pwtest") or not exclusive.endswith(".partition"):
            raise ValueError(f"test holder stems are pwtest….partition, not {exclusive!r}")
        config = base / "pinwarden.toml"
        config.write_text(f'[partition]\nmode = "none"\nhost_reserve = "0"\n'
                          f'exclusive = "{exclusive}"\n')
        return cls(base / "state", config, exclusive)

    def cmd(self, *args: str) -> list[str]:
        return [PINWARDEN, *args, "--state-dir", str(self.state), "--config", str(self.config)]

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            pytest.fail(f"pinwarden {' '.join(args)} failed ({proc.returncode}): "
                        f"{proc.stderr.strip()}")
        return proc

    @property
    def stem(self) -> str:
        return self.exclusive.removesuffix(".partition")

    def holder_group(self, name: str, kind: str = "vm") -> str:
        """The holder group of domain (``vm``, ``lxc``) or job (``run``) ``name``: beside
        ``machine``, ``STEM-vm-NAME.partition``."""
        return f"{self.stem}-{kind}-{name}.partition"

    def cleanup(self) -> None:
        """Once its VMs are gone: free, through pinwarden, every lease the test left (a
        lease dropped without it kept the host's noise settings narrowed: IRQs, unbound
        work and kernel threads stayed on CPU 0 after the test), then remove this test's
        holder groups (every hierarchy, bottom-up)."""
        from pinwarden.errors import PinwardenError
        from pinwarden.ledger import DB_NAME, Ledger

        held: list[tuple[str, str]] = []
        if (self.state / DB_NAME).exists():
            with contextlib.suppress(PinwardenError), Ledger(self.state) as ledger:
                held = [(h.ref.driver, h.ref.key) for h in ledger.holders()]
        for driver, key in held:  # (a test that broke its ledger has its own cleanup)
            with contextlib.suppress(subprocess.SubprocessError):
                self.run("release", "--force", "--driver", driver, key)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            with contextlib.suppress(OSError):
                for d in hierarchy.glob(f"{self.stem}-*.partition"):
                    remove_tree(str(d.relative_to(hierarchy)))


class Daemon:
    """`pinwarden daemon -v` of ``pw`` (its stderr in ``log``), stopped with SIGTERM."""

    def __init__(self, pw: Pinwarden, log: Path, *extra: str) -> None:
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [PINWARDEN, "daemon", "--interval", "3", "-v", "--state-dir", str(pw.state),
             "--config", str(pw.config), *extra], stdout=subprocess.DEVNULL,
            stderr=self._file)

    def text(self) -> str:
        return self.log.read_text()

    def wait_answering(self, timeout: float = 60.0) -> None:
        """Until the daemon answers hook calls (its log says so); fails if it exits."""
        deadline = time.monotonic() + timeout
        while "answering libvirt hook calls" not in self.text():
            assert time.monotonic() < deadline and self.proc.poll() is None, self.text()
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._file.close()
        return self.proc.returncode


def remove_tree(top: str) -> None:
    """rmdir ``top`` and its (empty) subgroups in every mounted hierarchy, bottom-up."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        base = hierarchy / top
        if not base.is_dir():
            continue
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, base]:
            flag = d / "cpuset.cpu_exclusive"
            with contextlib.suppress(OSError):
                if flag.exists():
                    flag.write_text("0")
                d.rmdir()


def dead_job(pw: Pinwarden, name: str, cpu: int = 1) -> Path:
    """A job of ``pw`` holding ``cpu`` whose owner was killed without a release (SIGKILL,
    the OOM killer): the ledger calls it dead, its group stays exclusive until a sync.
    Returns that group."""
    from pinwarden.config import load_config
    from pinwarden.cpuset import CpuSet
    from pinwarden.manager import Manager
    from pinwarden.policy import JobSpec

    victim = subprocess.Popen(["sleep", "600"])
    try:
        with Manager(load_config(pw.config), Path("/"), pw.state) as manager:
            manager.reserve_request(JobSpec(name, cpus=CpuSet.of([cpu])),
                                    owner_pid=victim.pid)
    finally:
        victim.kill()
        victim.wait()
    return CPUSET / pw.holder_group(name, "run")


@contextlib.contextmanager
def machine_restored() -> Iterator[None]:
    """Put ``machine``'s cpuset back as it was (pinwarden narrows it while CPUs are leased).

    Fails at once, naming them, when ``machine`` holds groups no libvirt domain owns (a
    killed benchmark's ``pwtest-noise-…-tenants`` did): the tests rewrite ``machine``'s
    CPUs and flags, which such a child blocks (EBUSY, or EINVAL for cpu_exclusive)."""
    foreign = sorted(c.name for c in (CPUSET / "machine").glob("*")
                     if c.is_dir() and not c.name.endswith((".libvirt-qemu", ".libvirt-lxc")))
    if foreign:
        pytest.fail(f"{CPUSET / 'machine'} holds groups that are not libvirt domains' "
                    f"({', '.join(foreign)}): something left them behind; remove them "
                    f"(rmdir, once empty) and rerun")
    path = CPUSET / "machine" / "cpuset.cpus"
    before = path.read_text().strip() if path.exists() else None
    try:
        yield
    finally:
        if before is not None:
            with contextlib.suppress(OSError):
                path.write_text(before)


def remove_hooks() -> None:
    """Remove pinwarden's hook drop-ins (and directories it left empty)."""
    for driver in ("qemu", "lxc"):
        with contextlib.suppress(OSError):
            (HOOKS_DIR / f"{driver}.d" / "pinwarden").unlink()
        with contextlib.suppress(OSError):
            (HOOKS_DIR / f"{driver}.d").rmdir()


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                          timeout=120)


@contextlib.contextmanager
def pinwarden_without_hook(tmp_path: Path, exclusive: str) -> Iterator[Pinwarden]:
    """The CLI with a private state dir and exclusive tree on a libvirt without
    pinwarden's hook; ``machine`` and the tree are put back afterwards."""
    hooks = [HOOKS_DIR / f"{d}.d" / "pinwarden" for d in ("qemu", "lxc")]
    if any(h.exists() for h in hooks):
        pytest.fail(f"a libvirt hook is installed ({', '.join(map(str, hooks))}); this "
                    f"test exercises pinwarden without it")
    tool = Pinwarden.make(tmp_path, exclusive)
    with machine_restored():
        try:
            yield tool
        finally:
            tool.cleanup()


def holder_names(pw: Pinwarden) -> tuple[str, ...]:
    """Names of the holders in ``pw``'s ledger (none before it exists); reaps nothing."""
    from pinwarden.ledger import DB_NAME, Ledger

    if not (pw.state / DB_NAME).exists():
        return ()
    with Ledger(pw.state) as ledger:
        return tuple(h.ref.name for h in ledger.holders())
