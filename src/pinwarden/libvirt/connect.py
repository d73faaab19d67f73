"""Talking to libvirt: connections, domain snapshots, live re-pinning.  Thin I/O only.

The ``libvirt`` binding is imported on first use, so modules importing this one stay cheap
(the hook never calls libvirt at all).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from pinwarden.cpuset import CpuSet
from pinwarden.domain import DomainSpec, parse_domain
from pinwarden.errors import LibvirtError, PinwardenError
from pinwarden.libvirt.state import (
    Affinity,
    DomainInfo,
    Repin,
    vcpus_by_number,
    with_offline_vcpus,
)
from pinwarden.libvirt.uri import check_uri
from pinwarden.libvirt.uri import driver_of as driver_of  # re-exported: lv.driver_of

RUN_DIRS = {"qemu": Path("/run/libvirt/qemu"), "lxc": Path("/run/libvirt/lxc")}

_module: ModuleType | None = None


def binding() -> ModuleType:
    """The ``libvirt`` Python module, or a one-line error saying how to get it."""
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("libvirt")
        except ImportError:
            raise LibvirtError(
                "the libvirt Python binding is not installed here: install the "
                "distribution's (apt install python3-libvirt; dnf install python3-libvirt) "
                "and give pinwarden's venv --system-site-packages, or pip install "
                "libvirt-python into it (builds against libvirt's development files)",
                code="no-libvirt-binding") from None
        # libvirt prints every error to stderr by default; we report them ourselves.
        _module.registerErrorHandler(lambda _ctx, _err: None, None)
    return _module


def message_of(exc: BaseException) -> str:
    """libvirt's own one-line message for a ``libvirtError``."""
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return " ".join(str(text or exc).split())


def error(what: str, exc: BaseException, *, code: str = "libvirt") -> LibvirtError:
    return LibvirtError(f"{what}: {message_of(exc)}", code=code)


def open_connection(uri: str) -> Any:
    """An open connection to the local system daemon ``uri`` names; a one-line error for a
    URI pinwarden cannot work through (:mod:`pinwarden.libvirt.uri`), checked before
    connecting and again on the URI libvirt resolved (an alias, the default)."""
    root = os.geteuid() == 0
    check_uri(uri, root=root)
    lv = binding()
    try:
        conn = lv.open(uri)
    except lv.libvirtError as exc:
        raise error(f"cannot connect to {uri} (is libvirtd running?)", exc,
                    code="libvirt-connect") from None
    try:
        check_uri(str(conn.getURI()), root=root)
    except PinwardenError:
        with contextlib.suppress(Exception):
            conn.close()
        raise
    except lv.libvirtError as exc:
        with contextlib.suppress(Exception):
            conn.close()
        raise error(f"cannot connect to {uri}", exc, code="libvirt-connect") from None
    return conn


def lookup(conn: Any, name: str) -> Any:
    lv = binding()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as exc:
        if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
            raise LibvirtError(f"no domain named {name!r} on {conn.getURI()}; "
                               f"'virsh list --all' lists them", code="no-domain") from None
        raise error(f"cannot look up domain {name!r}", exc) from None


def xml_of(dom: Any, *, inactive: bool = False, secure: bool = False) -> str:
    """The domain's XML (``inactive``: its definition).  ``secure``: with what libvirt
    leaves out otherwise (``VIR_DOMAIN_XML_SECURE``: VNC and SPICE passwords): for a
    document the domain is booted from (``createXML``), which without them started with an
    open console (hunt)."""
    lv = binding()
    flags = (lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | \
        (lv.VIR_DOMAIN_XML_SECURE if secure else 0)
    try:
        return str(dom.XMLDesc(flags))
    except lv.libvirtError as exc:
        raise error(f"cannot read the XML of domain {dom.name()!r}", exc) from None


def host_cpu_count(conn: Any) -> int:
    """Number of host CPUs libvirt's cpumaps cover."""
    try:
        return int(conn.getCPUMap(0)[0])
    except binding().libvirtError as exc:
        # (libvirtd restarting: a raw error skipped a start's rollback and read as a bug)
        raise error("cannot read the host's CPU map", exc) from None


def _cpus(bits: Iterable[bool]) -> CpuSet:
    return CpuSet.of(i for i, on in enumerate(bits) if on)


def cpumap(cpus: CpuSet, size: int) -> tuple[bool, ...]:
    return tuple(i in cpus for i in range(max(size, max(cpus.cpus, default=-1) + 1)))


def read_affinity(dom: Any) -> Affinity | None:
    """Where every thread of a running domain may run, as the kernel says; ``None`` for
    drivers that have no such threads or API (lxc); :class:`Settling` for a domain between
    states.

    libvirt's *pin info* (``vcpuPinInfo``, ``emulatorPinInfo``) is its configuration —
    every CPU for a thread the XML does not pin — not what the kernel allows, so a shared
    domain confined by its cgroup, or pinned by the hook, would look as if it could run on
    leased CPUs.  The vCPUs' masks come from ``virDomainGetVcpus`` (the kernel's affinity
    of each vCPU thread), the emulator's from QEMU's main thread; I/O threads' from
    ``virDomainGetIOThreadInfo``, which asks the kernel too."""
    lv = binding()
    live = lv.VIR_DOMAIN_AFFECT_LIVE
    unsupported = (lv.VIR_ERR_NO_SUPPORT, lv.VIR_ERR_OPERATION_UNSUPPORTED)
    try:
        try:
            vcpus = vcpus_by_number(dom.vcpus())
        except lv.libvirtError as exc:
            if exc.get_error_code() not in unsupported:
                raise
            vcpus = {i: _cpus(bits) for i, bits in enumerate(dom.vcpuPinInfo(live))}
        emulator = _cpus(dom.emulatorPinInfo(live))
        pid = read_pid("qemu", str(dom.name()))
        if pid is not None:
            with contextlib.suppress(OSError):
                emulator = CpuSet.of(os.sched_getaffinity(pid))
        try:
            iothreads = {int(i): _cpus(bits) for i, bits in dom.ioThreadInfo(live)}
        except lv.libvirtError as exc:
            if exc.get_error_code() not in unsupported:
                raise
            iothreads = {}
    except lv.libvirtError as exc:
        if exc.get_error_code() in unsupported:
            return None
        if exc.get_error_code() == lv.VIR_ERR_OPERATION_INVALID:
            raise Settling() from None
        raise error(f"cannot read the CPU affinity of domain {dom.name()!r}", exc) from None
    return Affinity(vcpus=vcpus, emulator=emulator, iothreads=iothreads)


class Settling(Exception):
    """libvirt answered OPERATION_INVALID for a running domain's threads: it is between
    states — QEMU runs but libvirt does not know its vCPU threads yet ("cpu affinity is not
    supported" while it starts, libvirt 11), or it is stopping.  Before, one such domain
    failed every listing of domains, and with it the daemon's whole pass."""


#: What libvirt's virBufferEscapeString writes for the characters XML forbids in text.
_PID_FILE_ESCAPES = {ord("<"): "&lt;", ord(">"): "&gt;", ord("&"): "&amp;",
                     ord('"'): "&quot;", ord("'"): "&apos;",
                     **{c: "" for c in range(1, 0x20) if chr(c) not in "\t\n\r"}}


def pid_file_name(name: str) -> str:
    """The file name libvirt gives a domain's pid file: virPidFileBuildPath escapes the
    name for XML (``a'b`` -> ``a&apos;b.pid``) and drops control characters, while its
    status file (``NAME.xml``) keeps the name as it is."""
    return f"{name.translate(_PID_FILE_ESCAPES)}.pid"


def read_pid(driver: str, name: str) -> int | None:
    """The main process of a running domain (QEMU, or libvirt_lxc), from libvirt's pid file."""
    try:
        return int((RUN_DIRS[driver] / pid_file_name(name)).read_text().strip())
    except (OSError, ValueError, KeyError):
        return None


def out_of_view(driver: str, names: Iterable[str]) -> tuple[str, int] | None:
    """A running domain of ``names`` and the pid libvirt names for its process, when no
    such pid is in this process's view (a PID namespace of its own: a container's), or
    None (one is seen: a pid file left by a domain stopping meanwhile is not the sign)."""
    from pinwarden import procs

    named = [(name, pid) for name in names if (pid := read_pid(driver, name)) is not None]
    if named and all(procs.start_time(pid) is None for _name, pid in named):
        return named[0]
    return None


def _online_cpus(dom: Any) -> CpuSet:
    """The host CPUs libvirt gives a thread nothing pins (what it calls available)."""
    lv = binding()
    try:
        return _cpus(dom.connect().getCPUMap(0)[1])
    except lv.libvirtError as exc:
        raise error("cannot read the host's CPUs", exc) from None


def _spec(xml: str) -> tuple[DomainSpec | None, str | None]:
    try:
        return parse_domain(xml), None
    except PinwardenError as exc:
        return None, exc.message


def domain_info(dom: Any, driver: str) -> DomainInfo:
    """Snapshot one domain: its live and persistent specs, live affinity and process."""
    lv = binding()
    try:
        name = str(dom.name())
        uuid = str(dom.UUIDString())
        active = bool(dom.isActive())
        persistent = bool(dom.isPersistent())
    except lv.libvirtError as exc:
        raise error("cannot read a domain", exc) from None
    live_spec = persistent_spec = None
    problem = None
    if active:
        live_spec, problem = _spec(xml_of(dom))
    if persistent:
        persistent_spec, p2 = _spec(xml_of(dom, inactive=True))
        problem = problem or p2
    settling = False
    try:
        affinity = read_affinity(dom) if active else None
    except Settling:
        affinity, settling = None, True
    if affinity is not None and live_spec is not None and \
            len(affinity.vcpus) < live_spec.vcpus:
        affinity = with_offline_vcpus(affinity, live_spec, _online_cpus(dom))
    return DomainInfo(driver=driver, name=name, uuid=uuid, active=active,
                      live=live_spec, persistent=persistent_spec, affinity=affinity,
                      pid=read_pid(driver, name) if active else None, problem=problem,
                      settling=settling)


def list_domains(conn: Any, *, active_only: bool = False) -> tuple[DomainInfo, ...]:
    """Snapshot every domain (active ones only with ``active_only``).  A domain whose read
    fails is looked at again (:func:`_read_or_gone`): one that vanished, or stopped while
    only active ones are listed, is left out; one that stays running and unreadable fails
    the whole listing."""
    lv = binding()
    driver = driver_of(str(conn.getURI()))
    flags = lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
    try:
        doms = conn.listAllDomains(flags)
    except lv.libvirtError as exc:
        raise error("cannot list domains", exc) from None
    out: list[DomainInfo] = []
    for dom in doms:
        try:
            out.append(domain_info(dom, driver))
        except LibvirtError as exc:
            info = _read_or_gone(conn, dom, driver, active_only=active_only, failure=exc)
            if info is not None:
                out.append(info)
    return tuple(sorted(out, key=lambda d: d.name))


def saved_uuids(conn: Any) -> frozenset[str]:
    """The UUIDs (lowercase) of the connection's domains that do not run and have a managed
    save image (``virsh managedsave``: the next start restores it)."""
    lv = binding()
    try:
        doms = conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_INACTIVE
                                   | lv.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)
        return frozenset(str(dom.UUIDString()).lower() for dom in doms)
    except lv.libvirtError as exc:
        raise error("cannot list domains", exc) from None


#: Pauses (s) before each new look at a domain whose read failed: a stopping domain fails
#: its reads ("Unable to read from monitor", "No such process") until libvirt has marked
#: it shut off, a few hundred milliseconds after QEMU died.
STOPPING_WAITS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)


def _read_or_gone(conn: Any, dom: Any, driver: str, *, active_only: bool,
                  failure: LibvirtError) -> DomainInfo | None:
    """A domain whose read failed with ``failure``: None when libvirt says it is gone, or
    (``active_only``) no longer running — it was stopping; its snapshot when a new read
    succeeds; ``failure`` when it stays running and unreadable, or when libvirt cannot
    answer at all (libvirtd stopping, its connection reset): the listing fails rather than
    leave out a running domain, which a pass would take for gone, freeing its lease and
    forgetting the pins it is to give back."""
    lv = binding()
    for pause in STOPPING_WAITS:
        time.sleep(pause)
        try:
            fresh = conn.lookupByUUIDString(dom.UUIDString())
            active = bool(fresh.isActive())
        except lv.libvirtError as exc:
            if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                return None
            raise failure from None
        if active_only and not active:
            return None
        try:
            return domain_info(fresh, driver)
        except LibvirtError as exc:
            failure = exc
    raise failure


def apply_repin(conn: Any, repin: Repin) -> bool:
    """Pin one thread of a running domain live (``VIR_DOMAIN_AFFECT_LIVE``) to
    ``repin.after``.  False, and nothing done, when the domain stopped (or went) since it
    was listed: a stopped domain has no thread to move, and an exclusive start re-pinning
    it, or a daemon pass, must not fail for it (hunt)."""
    lv = binding()
    cpus = repin.after
    size = host_cpu_count(conn)
    live = lv.VIR_DOMAIN_AFFECT_LIVE
    dom = None
    try:
        dom = conn.lookupByUUIDString(repin.uuid)
        bits = cpumap(cpus, size)
        if repin.thread == "vcpu":
            dom.pinVcpuFlags(repin.ident, bits, live)
        elif repin.thread == "emulator":
            dom.pinEmulator(bits, live)
        else:
            dom.pinIOThread(repin.ident, bits, live)
    except lv.libvirtError as exc:
        if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN or not _still_active(dom):
            return False
        raise error(f"cannot re-pin {repin.label} of domain {repin.domain!r} to "
                    f"{cpus.named()}", exc) from None
    return True


def _still_active(dom: Any) -> bool:
    """Whether ``dom`` runs (True when that cannot be told: the original error stands)."""
    if dom is None:
        return True
    try:
        return bool(dom.isActive())
    except binding().libvirtError as exc:
        return bool(exc.get_error_code() != binding().VIR_ERR_NO_DOMAIN)


def pins_of(info: DomainInfo) -> Mapping[str, CpuSet]:
    """``{"vcpu0": …, "emulator": …, "iothread1": …}`` from the live affinity."""
    if info.affinity is None:
        return {}
    out: dict[str, CpuSet] = {f"vcpu{v}": c for v, c in sorted(info.affinity.vcpus.items())}
    if info.affinity.emulator:
        out["emulator"] = info.affinity.emulator
    out.update({f"iothread{i}": c for i, c in sorted(info.affinity.iothreads.items())})
    return out


def destroy(conn: Any, name: str) -> None:
    lv = binding()
    try:
        conn.lookupByName(name).destroy()
    except lv.libvirtError as exc:
        if exc.get_error_code() in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
            return
        raise error(f"cannot destroy domain {name!r}", exc) from None

