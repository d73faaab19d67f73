"""Check framework and helpers of the systemd host lab; runs INSIDE the guest.

The guest is a real Debian system (systemd as PID 1, libvirtd.service, systemd-machined)
with the distribution's Python (3.11 on bookworm, 3.13 on trixie): this module uses the
standard library only.  pinwarden is installed the way an administrator would (a venv over
the system site packages, see ``checks_10_base.install``) and always run as a command.

Each ``@check("name")`` function records *observations* (command output, cgroup files,
D-Bus answers) as a dict; the host-side tests make the assertions.  A check that raises is
recorded with its traceback and the run goes on; ``needs=`` names checks whose failure
makes this one fail at once (never a skip).  ``OUT/results.json`` is rewritten after every
check, so a guest that dies half-way still reports.  Checks clean up what they create
(domains and units named ``pwtest*``) so later checks start from the same state.

To add checks: a ``checks_NN_topic.py`` module beside this one (modules run in file-name
order, checks in the order they are defined); ``tests/test_syslab.py`` asserts on
``lab.check(suite, "name")``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Data = dict[str, Any]

OUT = Path("/srv/syslab")
RESULTS: Data = {"checks": {}, "done": False, "notes": []}
CHECKS: list[tuple[str, Callable[[], Data]]] = []

CG = Path("/sys/fs/cgroup")
QEMU_URI = "qemu:///system"
LXC_URI = "lxc:///system"
QEMU = "/usr/bin/qemu-system-x86_64"
VENV = Path("/opt/pinwarden")
PINWARDEN = VENV / "bin" / "pinwarden"
LIBVIRT_DEBUG_LOG = Path("/run/libvirt/libvirtd-debug.log")
PREFIX = "pwtest"
CPUSET_FILES = ("cpuset.cpus", "cpuset.cpus.effective", "cpuset.cpus.partition",
                "cpuset.cpus.exclusive", "cpuset.mems", "cpuset.mems.effective",
                "cgroup.controllers", "cgroup.subtree_control")


# -- the framework ------------------------------------------------------------------------

def save() -> None:
    tmp = OUT / "results.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=1, sort_keys=True, default=str))
    tmp.replace(OUT / "results.json")


def log(msg: str) -> None:
    print(f"syslab: {msg}", flush=True)


def check(name: str, *, needs: Sequence[str] = ()) -> Callable[[Callable[[], Data]],
                                                             Callable[[], Data]]:
    def wrap(fn: Callable[[], Data]) -> Callable[[], Data]:
        def run() -> Data:
            start = time.monotonic()
            log(f"{name} ...")
            failed = [n for n in needs if not RESULTS["checks"].get(n, {}).get("ok")]
            entry: Data
            data: Data = {}
            if failed:
                entry = {"ok": False, "error": f"not run: needs {', '.join(failed)}, "
                                               f"which failed or did not run"}
            else:
                try:
                    data = fn()
                    entry = {"ok": True, "data": data}
                except BaseException:  # recorded for the host-side test
                    entry = {"ok": False, "error": traceback.format_exc()}
            entry["seconds"] = round(time.monotonic() - start, 2)
            RESULTS["checks"][name] = entry
            save()
            log(f"{name} {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)")
            if not entry["ok"]:
                print(entry["error"], flush=True)
            return data
        CHECKS.append((name, run))
        return fn
    return wrap


def selected(name: str, patterns: Sequence[str]) -> bool:
    """``patterns`` empty: everything; else exact names or ``prefix*``."""
    if not patterns:
        return True
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def main(argv: Sequence[str]) -> int:
    global OUT
    OUT = Path(argv[0]) if argv else OUT
    config: Data = {}
    with contextlib.suppress(FileNotFoundError):
        config = json.loads((OUT / "config.json").read_text())
    RESULTS.update(started=time.time(), suite=config.get("suite"), config=config,
                   uptime_at_start=_uptime())
    save()
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import importlib

    for module in sorted(here.glob("checks_*.py")):
        try:
            importlib.import_module(module.stem)
        except Exception:
            RESULTS["notes"].append(f"{module.name} did not import:\n{traceback.format_exc()}")
    patterns = [p for p in config.get("checks", "").split(",") if p]
    skip = set(config.get("skip", []))  # a resumed boot: these have results already
    for name, run in CHECKS:
        if selected(name, patterns) and name not in skip:
            run()
    RESULTS["done"] = True
    RESULTS["uptime_at_end"] = _uptime()
    save()
    log("done")
    return 0


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


# -- commands -----------------------------------------------------------------------------

class CommandFailed(Exception):
    def __init__(self, result: Data) -> None:
        super().__init__(f"{shlex.join(result['cmd'])} exited {result['rc']}: "
                         f"{(result['stderr'] or result['stdout']).strip()[-2000:]}")
        self.result = result


def run(cmd: Sequence[str] | str, *, input: str | None = None, timeout: float = 120.0,
        env: dict[str, str] | None = None) -> Data:
    """Run a command (a string goes through ``sh -c``); its rc, stdout, stderr, seconds.
    A timeout is recorded (``rc`` None), never raised."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, env=None if env is None else {**os.environ,
                                                                             **env},
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return {"cmd": argv, "rc": None, "timeout": True,
                "stdout": _text(exc.stdout), "stderr": _text(exc.stderr),
                "seconds": round(time.monotonic() - start, 2)}
    except FileNotFoundError as exc:
        return {"cmd": argv, "rc": 127, "stdout": "", "stderr": str(exc), "seconds": 0.0}
    return {"cmd": argv, "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "seconds": round(time.monotonic() - start, 2)}


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def ok(result: Data) -> Data:
    """``result`` if the command exited 0, else :class:`CommandFailed`."""
    if result["rc"] != 0:
        raise CommandFailed(result)
    return result


def wait_for(pred: Callable[[], Any], timeout: float = 120.0, step: float = 0.5) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() >= end:
            return got
        time.sleep(step)


def read(path: str | Path) -> str | None:
    """A file's text, stripped; None when it does not exist (or cannot be read)."""
    try:
        return Path(path).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"<{exc.strerror}>"


# -- systemd ------------------------------------------------------------------------------

def systemctl(*args: str, timeout: float = 180.0) -> Data:
    return run(["systemctl", "--no-pager", *args], timeout=timeout)


def unit_show(unit: str, *props: str) -> dict[str, str]:
    """``systemctl show -p P… UNIT`` as a dict (absent properties are simply missing)."""
    res = systemctl("show", *(f"--property={p}" for p in props), unit)
    out: dict[str, str] = {}
    for line in res["stdout"].splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def busctl(*args: str, timeout: float = 60.0) -> Data:
    return run(["busctl", "--no-pager", *args], timeout=timeout)


SD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
MANAGER = "org.freedesktop.systemd1.Manager"


def manager_call(method: str, signature: str, *args: str) -> Data:
    """``busctl call`` of a method of systemd's Manager: D-Bus answer or error verbatim."""
    return busctl("call", *SD, MANAGER, method, signature, *args)


def cpus_ay(cpus: str) -> list[str]:
    """A CPU list (``1-2,5``) as busctl's ``ay`` arguments: count, then the bytes of systemd's
    bitmask (CPU *i* is bit ``i % 8`` of byte ``i // 8``)."""
    bits: set[int] = set()
    for part in filter(None, cpus.split(",")):
        lo, _, hi = part.partition("-")
        bits.update(range(int(lo), int(hi or lo) + 1))
    if not bits:
        return ["0"]
    data = [0] * (max(bits) // 8 + 1)
    for b in bits:
        data[b // 8] |= 1 << (b % 8)
    return [str(len(data)), *map(str, data)]


def set_unit_cpus(unit: str, cpus: str, *, prop: str = "AllowedCPUs",
                  runtime: bool = True) -> Data:
    """``SetUnitProperties(unit, runtime, [(prop, ay)])`` as systemctl set-property does."""
    return manager_call("SetUnitProperties", "sba(sv)", unit, str(runtime).lower(), "1",
                        prop, "ay", *cpus_ay(cpus))


def set_unit_property(unit: str, prop: str, sig: str, *value: str,
                      runtime: bool = True) -> Data:
    return manager_call("SetUnitProperties", "sba(sv)", unit, str(runtime).lower(), "1",
                        prop, sig, *value)


def start_transient_slice(name: str, cpus: str | None = None, *,
                          timeout: float = 60.0) -> Data:
    """``StartTransientUnit(name, "fail", [Description, AllowedCPUs?], [])``; waits for the
    slice to be active.  The D-Bus answer, the state reached and the unit's cgroup."""
    props = ["Description", "s", f"pwtest slice {name}"]
    count = 1
    if cpus is not None:
        props += ["AllowedCPUs", "ay", *cpus_ay(cpus)]
        count += 1
    res = manager_call("StartTransientUnit", "ssa(sv)a(sa(sv))", name, "fail", str(count),
                       *props, "0")
    state = wait_for(lambda: unit_show(name, "ActiveState").get("ActiveState") == "active",
                     timeout)
    return {"call": res, "active": bool(state),
            "show": unit_show(name, "ActiveState", "ControlGroup", "AllowedCPUs",
                              "EffectiveCPUs", "Transient", "FragmentPath")}


def stop_unit(name: str) -> Data:
    return systemctl("stop", name)


def unit_path(unit: str) -> str:
    """The D-Bus object path of a loaded unit (``GetUnit``), or ``""``."""
    res = manager_call("GetUnit", "s", unit)
    m = re.match(r'o "(.*)"', res["stdout"].strip())
    return m.group(1) if m else ""


def get_property(unit: str, iface: str, prop: str) -> Data:
    """``busctl get-property`` of a unit: the answer, or the D-Bus error verbatim."""
    path = unit_path(unit) or f"/org/freedesktop/systemd1/unit/{bus_escape(unit)}"
    return busctl("get-property", SD[0], path, iface, prop)


def bus_escape(unit: str) -> str:
    """sd-bus object path escaping of a unit name (``machine.slice`` → ``machine_2eslice``)."""
    return "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in unit)


def daemon_reload() -> Data:
    return systemctl("daemon-reload")


# -- cgroups ------------------------------------------------------------------------------

def cg(rel: str, name: str) -> str | None:
    return read(CG / rel / name)


def cg_write(rel: str, name: str, value: str) -> Data:
    """Write one cgroup file; what happened (never raises)."""
    try:
        (CG / rel / name).write_text(value + "\n")
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": exc.strerror}
    return {"ok": True}


def cg_files(rel: str, names: Sequence[str] = CPUSET_FILES) -> Data:
    d: Data = {"exists": (CG / rel).is_dir()}
    if d["exists"]:
        for name in names:
            d[name] = cg(rel, name)
    return d


def cg_tree(rel: str, names: Sequence[str] = CPUSET_FILES) -> dict[str, Data]:
    """``cg_files`` of ``rel`` and every cgroup below it, by path."""
    top = CG / rel
    out = {rel: cg_files(rel, names)}
    if top.is_dir():
        for sub in sorted(p for p in top.rglob("*") if p.is_dir()):
            r = str(sub.relative_to(CG))
            out[r] = cg_files(r, names)
    return out


def proc_cgroup(pid: int, tid: int | None = None) -> str | None:
    path = f"/proc/{pid}/task/{tid}/cgroup" if tid else f"/proc/{pid}/cgroup"
    text = read(path)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return text


def status_field(path: str, field: str) -> str | None:
    text = read(path)
    for line in (text or "").splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


def affinity(pid: int, tid: int | None = None) -> str | None:
    """``Cpus_allowed_list`` of a process (or one of its threads)."""
    base = f"/proc/{pid}/task/{tid}" if tid else f"/proc/{pid}"
    return status_field(f"{base}/status", "Cpus_allowed_list")


def security_label(pid: int) -> str | None:
    """The LSM label of a process: AppArmor's ``PROFILE (MODE)`` or ``unconfined``
    (``/proc/PID/attr/apparmor/current``, the generic ``attr/current`` on older kernels);
    None when it is gone or no LSM labels processes."""
    for name in ("attr/apparmor/current", "attr/current"):
        text = read(f"/proc/{pid}/{name}")
        if text is not None and not text.startswith("<"):  # "<Invalid argument>": no LSM
            return text.strip("\0\n ")
    return None


def threads(pid: int) -> list[Data]:
    """Every thread of ``pid``: tid, comm, cgroup, Cpus_allowed_list."""
    out: list[Data] = []
    with contextlib.suppress(FileNotFoundError):
        for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
            tid = int(task.name)
            out.append({"tid": tid, "comm": read(task / "comm"),
                        "cgroup": proc_cgroup(pid, tid), "cpus_allowed": affinity(pid, tid)})
    return out


def pids_named(comm: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and read(p / "comm") == comm:
            out.append(int(p.name))
    return sorted(out)


class WriteWatch:
    """Which cgroup files get written, by anyone (``inotifywait -m -e modify``: every
    successful write(2) to a file notifies, even of the value it already had).

    ``take()`` returns the events since the last call, as ``"DIR FILE"`` strings."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.log = Path(f"/run/pwtest-watch-{os.getpid()}-{id(self)}.log")
        self.files = [str(f) for f in files]
        self._pos = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WriteWatch:
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            ["inotifywait", "-m", "-q", "-e", "modify", "--format", "%w", *self.files],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        out.close()
        time.sleep(1.0)  # inotifywait sets its watches up
        return self

    def take(self, settle: float = 1.0) -> list[str]:
        time.sleep(settle)
        data = self.log.read_bytes()
        new, self._pos = data[self._pos:], len(data)
        return [line for line in new.decode(errors="replace").splitlines() if line]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.log.unlink(missing_ok=True)


# -- libvirt ------------------------------------------------------------------------------

def virsh(*args: str, uri: str = QEMU_URI, timeout: float = 240.0,
          input: str | None = None) -> Data:
    return run(["virsh", "-c", uri, *args], timeout=timeout, input=input)


def tiny_domain_xml(name: str, *, vcpus: int = 1, partition: str | None = None,
                    cputune: str = "", metadata: str = "", memory_mib: int = 32) -> str:
    """A diskless TCG domain (``type='qemu'``: nested KVM hangs) that boots to firmware:
    real vCPU and emulator threads for a few MiB."""
    if not name.startswith(PREFIX):
        raise ValueError(f"lab domains are named {PREFIX}*, not {name!r}")
    resource = f"<resource><partition>{partition}</partition></resource>" if partition else ""
    return (f"<domain type='qemu'><name>{name}</name>"
            f"{f'<metadata>{metadata}</metadata>' if metadata else ''}"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu>"
            f"{f'<cputune>{cputune}</cputune>' if cputune else ''}{resource}"
            f"<os><type arch='x86_64'>hvm</type></os>"
            f"<on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>"
            f"<devices><emulator>{QEMU}</emulator><memballoon model='none'/></devices>"
            f"</domain>")


def define(xml: str, uri: str = QEMU_URI) -> Data:
    path = Path(f"/run/pwtest-{os.getpid()}-{time.monotonic_ns()}.xml")
    path.write_text(xml)
    try:
        return virsh("define", str(path), uri=uri)
    finally:
        path.unlink(missing_ok=True)


def qemu_pid(name: str) -> int | None:
    text = read(f"/run/libvirt/qemu/{name}.pid")
    return int(text) if text and text.isdigit() else None


def remove_domain(name: str, uri: str = QEMU_URI) -> Data:
    """Destroy (if running) and undefine; what each said."""
    return {"destroy": virsh("destroy", name, uri=uri),
            "undefine": virsh("undefine", name, uri=uri)}


class Domain:
    """A lab domain for the span of a ``with``: defined (and started unless
    ``start=False``) on entry, destroyed and undefined on exit.  ``data`` holds what
    libvirt answered."""

    def __init__(self, name: str, xml: str | None = None, *, start: bool = True,
                 uri: str = QEMU_URI, **xml_args: Any) -> None:
        self.name = name
        self.uri = uri
        self.xml = xml if xml is not None else tiny_domain_xml(name, **xml_args)
        self.start = start
        self.data: Data = {}

    @property
    def running(self) -> bool:
        return bool(self.data.get("start", {}).get("rc") == 0)

    @property
    def pid(self) -> int | None:
        return qemu_pid(self.name) if self.uri == QEMU_URI else None

    def __enter__(self) -> Domain:
        remove_domain(self.name, self.uri)  # a leftover of an earlier, failed check
        self.data["define"] = define(self.xml, self.uri)
        if self.start and self.data["define"]["rc"] == 0:
            self.data["start"] = virsh("start", self.name, uri=self.uri)
        return self

    def __exit__(self, *exc: object) -> None:
        self.data["removed"] = remove_domain(self.name, self.uri)


def observe_domain(name: str) -> Data:
    """Where a running QEMU domain's process and threads live, and their affinity."""
    pid = qemu_pid(name)
    if pid is None:
        return {"pid": None}
    cgroup = proc_cgroup(pid) or ""
    scope = cgroup.strip("/").split("/libvirt")[0]
    return {"pid": pid, "cgroup": cgroup, "threads": threads(pid),
            "label": security_label(pid),
            "tree": cg_tree(scope) if scope else {},
            "vcpupin": virsh("vcpupin", name)["stdout"],
            "emulatorpin": virsh("emulatorpin", name)["stdout"]}


def libvirtd_active() -> bool:
    """libvirtd answers and its unit is active.  The call comes first: Debian runs
    libvirtd.service with --timeout 120 and socket activation, so one idle that long (a
    slow boot, a busy host) has exited, and only a connection starts it again."""
    return bool(virsh("version", timeout=30)["rc"] == 0
                and systemctl("is-active", "libvirtd.service")["stdout"].strip() == "active")


def wait_libvirt(timeout: float = 300.0) -> Data:
    start = time.monotonic()
    up = wait_for(libvirtd_active, timeout, step=1.0)
    return {"up": bool(up), "seconds": round(time.monotonic() - start, 1)}


def reload_libvirtd() -> Data:
    """``systemctl reload libvirtd`` (SIGHUP: libvirtd re-reads its hooks, among others)."""
    res = systemctl("reload", "libvirtd.service")
    return {"reload": res, **wait_libvirt()}


def restart_libvirtd() -> Data:
    res = systemctl("restart", "libvirtd.service")
    return {"restart": res, **wait_libvirt()}


class LibvirtLog:
    """New lines of libvirtd's debug log (see rootfs.LIBVIRTD_CONF_APPEND) since creation
    or the last ``take()``."""

    def __init__(self) -> None:
        self._pos = LIBVIRT_DEBUG_LOG.stat().st_size if LIBVIRT_DEBUG_LOG.exists() else 0

    def take(self, pattern: str = "") -> list[str]:
        try:
            with LIBVIRT_DEBUG_LOG.open("rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        lines = data.decode(errors="replace").splitlines()
        rx = re.compile(pattern) if pattern else None
        # drop the timestamp and thread id: "2026-…: 1234: debug : virCgroup…"
        return [line.split(": ", 2)[-1] for line in lines if rx is None or rx.search(line)]


# -- pinwarden ----------------------------------------------------------------------------

def pinwarden(*args: str, timeout: float = 300.0, input: str | None = None) -> Data:
    """The installed ``pinwarden`` command (from the venv); ``json`` parsed when it printed
    JSON."""
    res = run([str(PINWARDEN), *args], timeout=timeout, input=input)
    with contextlib.suppress(ValueError):
        res["json"] = json.loads(res["stdout"])
    return res


def pw_python(code: str, timeout: float = 300.0) -> Data:
    """Run Python code with the venv's interpreter (pinwarden importable)."""
    res = run([str(VENV / "bin" / "python"), "-c", code], timeout=timeout)
    with contextlib.suppress(ValueError):
        res["json"] = json.loads(res["stdout"])
    return res


def install_hook(*extra: str) -> Data:
    """``pinwarden hook install`` (writes /etc/libvirt/hooks/{qemu,lxc}); libvirtd reads
    hooks only when it starts, so it is restarted."""
    res = pinwarden("hook", "install", *extra)
    return {"install": res, "hooks": sorted(p.name for p in Path("/etc/libvirt/hooks").iterdir())
            if Path("/etc/libvirt/hooks").is_dir() else [], **restart_libvirtd()}


def uninstall_hook() -> Data:
    res = pinwarden("hook", "uninstall")
    return {"uninstall": res, **restart_libvirtd()}
