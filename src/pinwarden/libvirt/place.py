"""Where a domain's threads run when its XML names no CPUs (the I/O adapter).

libvirt lets a QEMU thread without a pin of its own run on every online CPU (every CPU but
the isolated ones since libvirt 10.4), housekeeping CPUs included, and an LXC container's
controller gives itself every online CPU.  Once such a domain runs, its threads (an LXC
container's processes) get the CPUs ``pinwarden start`` would have written into ``<vcpu
cpuset>``: the VM CPUs less the leased ones.  The libvirt hook places them at
``started`` and the event daemon places threads libvirt adds later (a vCPU hot-plugged,
an I/O thread added live); a placement narrowed by leases is recorded for the give-back
(:mod:`pinwarden.libvirt.pins`).  The decisions are :func:`pinwarden.policy.decide`'s and
:mod:`pinwarden.libvirt.repin`'s; this module reads the process and applies them.

An exclusive domain started by plain ``virsh start`` gets, at ``started``, each thread on
the CPUs of its plan (:func:`pin_exclusive`), as ``pinwarden start`` writes them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pinwarden.errors import EnforceError
from pinwarden.model import domain_holder
from pinwarden.record import record

if TYPE_CHECKING:
    from pinwarden.cpuset import CpuSet
    from pinwarden.domain import DomainSpec
    from pinwarden.libvirt.state import DomainInfo
    from pinwarden.manager import Manager
    from pinwarden.model import Plan
    from pinwarden.partition import Host


def running_pid(driver: str, name: str) -> int | None:
    """The running domain's process (QEMU; an LXC container's controller), from libvirt's
    pid file; None: not running."""
    from pinwarden.libvirt.connect import read_pid

    return read_pid(driver, name)


def unpinned_thread(spec: DomainSpec, comm: str | None) -> bool:
    """Whether the QEMU thread named ``comm`` has no pin of its own in ``spec`` (pure; its
    group by :func:`pinwarden.libvirt.state.qemu_thread`).  A name cut short by the kernel,
    or a thread gone, is left alone."""
    from pinwarden.libvirt.state import qemu_thread

    group = qemu_thread(comm)
    if group is None:
        return False
    thread, ident = group
    if thread == "vcpu":
        return not spec.vcpupins if ident is None else ident not in spec.vcpupins
    if thread == "iothread":
        return ident not in spec.iothreadpins
    return spec.emulatorpin is None


@record
class Default:
    """Where a running shared domain's threads without a pin go."""

    pid: int  # its process (QEMU; an LXC container's controller)
    cpus: CpuSet  # its plan's default placement
    plan: Plan
    #: the host the plan was decided on, when the placement is to be recorded (None: not)
    record_host: Host | None
    #: every placement is recorded: the kernel resets the threads' affinity at each change
    #: of their cgroup, which loses it (before Linux 6.2)
    every: bool


def default_cpus(manager: Manager, driver: str, name: str,
                 spec: DomainSpec) -> Default | None:
    """Where the running shared domain ``name``'s threads without a pin go.  A placement
    is recorded while something is leased, or on a kernel that resets affinity; None: not
    running, or every thread pinned."""
    from pinwarden.enforce.affinity import cgroup_resets_affinity
    from pinwarden.policy import decide

    pid = running_pid(driver, name)
    if pid is None:
        return None
    host, leases = manager.host(), manager.leases(kept=True)
    plan = decide(spec, host, leases, holder=domain_holder(driver, name, spec.uuid))
    if not plan.default_cpus:
        return None
    every = cgroup_resets_affinity()
    return Default(pid, plan.default_cpus, plan, host if leases or every else None, every)


def note_placed_narrower(manager: Manager, name: str, spec: DomainSpec, plan: Plan,
                          host: Host, *, every: bool = False) -> None:
    """The hook gave the unpinned threads fewer CPUs than the shared pool with nothing
    leased, because of the leases held now: recorded as narrowings, as ``pinwarden start``
    records its placement, so that they get those CPUs back when the leases end.  The
    kernel does not widen them itself: a thread's affinity set by ``sched_setaffinity``
    stays its own across cpuset changes since Linux 6.2 (the trixie lab's shared domain
    B kept CPU 3; this host's kernel keeps it on cgroup v1 too).  Written without the
    pins lock, which the hook must never wait for (libvirt calls are made under it); a
    give-back that read the records before sees none of these.  ``every``: a placement on
    the whole shared pool is recorded too — before Linux 6.2 the kernel gives the threads
    their cgroup's CPUs at each change of it, and the record is how the give-back knows
    the placement to put back (every CPU, when the last lease ends, in modes none and
    isolcpus)."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.libvirt.repin import placed_narrower, record_moves
    from pinwarden.narrowed import NARROWED_PREFIX
    from pinwarden.partition import shared_pool

    base = shared_pool(host, CpuSet())[0]
    uuid = domain_holder("qemu", name, spec.uuid).uuid or ""
    moves = placed_narrower(spec, plan, name, uuid, base, every=every)
    if moves:
        manager.put_change_records(record_moves(moves,
                                                manager.change_records(NARROWED_PREFIX)))


def place_default(manager: Manager, name: str, spec: DomainSpec) -> CpuSet | None:
    """A shared QEMU domain without ``<vcpu cpuset>``, started by plain ``virsh start``:
    libvirt lets each thread without a pin of its own (every thread, when the XML names no
    CPUs) run on every online CPU (libvirt < 10.4) or every CPU but the isolated ones
    (≥ 10.4), housekeeping CPUs included.  The hook cannot change the XML, so once QEMU
    runs those threads get the CPUs ``pinwarden start`` would have written into ``<vcpu
    cpuset>`` — the VM CPUs less the leased ones (threads QEMU starts later inherit them
    from the thread that starts them); the pinned ones keep their pins.  libvirt reads
    affinity back from the kernel (``virsh vcpuinfo``).  A placement narrowed by leases
    held now is recorded, to be given back when they end (:func:`note_placed_narrower`),
    and on a kernel before 6.2 any placement, to be put back after the kernel's resets.
    The event daemon places the same way a thread libvirt added later with its default
    (a vCPU hot-plugged, an I/O thread added live).  Returns the CPUs given (None: not
    running, or every thread pinned)."""
    import errno

    from pinwarden.enforce.affinity import pin_each, threads_of
    from pinwarden.procs import thread_comm

    found = default_cpus(manager, "qemu", name, spec)
    if found is None:
        return None
    pid, cpus = found.pid, found.cpus
    if found.record_host is not None:  # (nothing leased, nothing narrower: no import)
        # recorded before the threads move: a kill in between left them narrowed for good
        # (crash hunt); a record of a placement not made is forgotten by the give-back
        note_placed_narrower(manager, name, spec, found.plan, found.record_host,
                             every=found.every)
    failed = pin_each({tid: cpus for tid in threads_of(pid)
                       if unpinned_thread(spec, thread_comm(pid, tid))})
    # A thread that exited meanwhile, or one whose cpuset cgroup does not allow the CPUs —
    # KVM's NX huge page recovery worker (kvm-nx-lpage-re) may start in the cgroup of a
    # pinned vCPU, and keeps its pin — is left as it is; anything else is reported (the
    # domain keeps running either way).
    other = {tid: code for tid, code in failed.items()
             if code not in (errno.ESRCH, errno.EINVAL)}
    if other:
        tid, code = next(iter(other.items()))
        raise EnforceError(f"could not give thread {tid} of domain {name!r} {cpus.named()}: "
                           f"{os.strerror(code)}")
    return cpus


def place_container(manager: Manager, name: str, spec: DomainSpec) -> None:
    """A shared LXC container without ``<vcpu cpuset>`` (libvirt's LXC driver ignores
    pins): its controller (``libvirt_lxc``) gives itself every online CPU, and the
    container inherits them.  Once it runs, the controller and every process below it get
    the VM CPUs less the leased ones, as a QEMU domain's threads do (what they start later
    inherits them); a process forked meanwhile is caught by looking again.  A placement
    narrowed by leases held now is recorded, to be given back when they end, as for QEMU
    domains (:func:`note_placed_narrower`): by the controller's process, which a
    container's record names instead of libvirt pins."""
    from pinwarden.enforce.affinity import pin_each, threads_of
    from pinwarden.procs import descendants

    found = default_cpus(manager, "lxc", name, spec)
    if found is None:
        return
    pid, cpus = found.pid, found.cpus
    done: set[int] = set()
    for _ in range(3):
        todo = {tid for proc in descendants(pid) for tid in threads_of(proc)} - done
        if not todo:
            break
        pin_each({tid: cpus for tid in sorted(todo)})  # (gone or refused: left as it is)
        done |= todo
    if found.record_host is not None:
        note_container_placed(manager, name, spec, pid, cpus, found.record_host,
                              every=found.every)


def note_container_placed(manager: Manager, name: str, spec: DomainSpec, pid: int,
                           cpus: CpuSet, host: Host, *, every: bool = False) -> None:
    """The container's placement ``cpus``, narrower than the shared pool with nothing
    leased because of the leases held now (or any, ``every``: see
    :func:`note_placed_narrower`), recorded for the give-back
    (:func:`pinwarden.libvirt.pins.give_back_containers`)."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.libvirt.repin import CONTAINER, container_json
    from pinwarden.narrowed import narrowed_key
    from pinwarden.partition import shared_pool
    from pinwarden.procs import start_time

    base = shared_pool(host, CpuSet())[0]
    start = start_time(pid)
    if (cpus == base and not every) or start is None:
        return
    key = narrowed_key(domain_holder("lxc", name, spec.uuid).uuid or "", CONTAINER)
    earlier = manager.change_records(key).get(key)
    manager.put_change_records({key: container_json(name, base, cpus, pid, start, earlier)})


def pin_exclusive(name: str, pid: int, plan: Plan) -> None:
    """An exclusive QEMU domain started by plain ``virsh start`` (the hook's ``started``):
    each thread gets the CPUs its plan names, as ``pinwarden start`` writes them into the
    XML.  libvirt gives threads without a pin its default — every CPU of the holder's
    group (libvirt < 10.4), or those of them not isolated (≥ 10.4): with a leased CPU in
    ``isolcpus=``, every thread of a 2-vCPU domain ran on the other one while its second
    CPU stayed idle (trixie lab hunt).  A thread gone, or that its cgroup does not allow
    the CPUs, is left as it is; anything else is reported (the domain runs either way)."""
    import errno

    from pinwarden.enforce.affinity import pin_each, threads_of
    from pinwarden.libvirt.state import threads_as_planned
    from pinwarden.procs import thread_comm

    wanted = threads_as_planned(plan, {tid: thread_comm(pid, tid) for tid in threads_of(pid)})
    failed = {tid: code for tid, code in pin_each(wanted).items()
              if code not in (errno.ESRCH, errno.EINVAL)}
    if failed:
        tid, code = next(iter(failed.items()))
        raise EnforceError(f"could not give thread {tid} of exclusive domain {name!r} "
                           f"{wanted[tid].named()}: {os.strerror(code)}")


#: Where the system daemon stores persistent definitions (``virsh define``).
CONFIG_DIRS = {"qemu": "/etc/libvirt/qemu", "lxc": "/etc/libvirt/lxc"}


def stored_path(driver: str, name: str) -> Path:
    """Where libvirt (as system) keeps the stored definition of domain ``name`` of
    ``driver``: a path that never exists for a driver without one here."""
    return Path(CONFIG_DIRS.get(driver, "/nonexistent"), f"{name}.xml")


def running_from_files(driver: str) -> tuple[DomainInfo, ...]:
    """The running domains of ``driver`` as libvirt's own files tell — the hook may not
    call libvirt: the live definition from the status file (``/run/libvirt/qemu/NAME.xml``,
    ``<domstatus>``), the stored one from the configuration directory.  Affinity: the
    threads the live definition pins (libvirt writes live pins there), and where the
    kernel lets each thread group it pins nothing for run (QEMU's threads, by name: the
    hook's own placement at ``started`` is not in the files; left out, a shared domain the
    hook had placed on the last VM CPUs was moved onto the host's CPUs by a plain ``virsh
    start`` of an exclusive domain in cgroup mode, where ``pinwarden start``, which asks
    libvirt and so the kernel, refused: real-libvirt hunt).  Files that cannot be read or
    parsed are left out."""
    from xml.etree import ElementTree as ET

    import defusedxml.ElementTree as SafeET

    from pinwarden.cpuset import EMPTY
    from pinwarden.domain import parse_domain
    from pinwarden.errors import PinwardenError
    from pinwarden.libvirt.connect import RUN_DIRS, read_pid
    from pinwarden.libvirt.state import Affinity, DomainInfo

    out: list[DomainInfo] = []
    base = RUN_DIRS.get(driver)
    try:
        names = sorted(base.glob("*.xml")) if base is not None else []
    except OSError:
        return ()
    for path in names:
        try:
            root = SafeET.fromstring(path.read_bytes())
            inner = root.find("domain") if root.tag == "domstatus" else None
            if inner is None:
                continue
            live = parse_domain(ET.tostring(inner, encoding="unicode"))
        except (OSError, ValueError, ET.ParseError, PinwardenError):
            continue
        stored = None
        with contextlib.suppress(OSError, ValueError, ET.ParseError, PinwardenError):
            stored = parse_domain(stored_path(driver, live.name).read_bytes())
        # <vcpu cpuset> is where libvirt runs every thread without a pin of its own: left
        # out, a running domain's threads on a CPU it named only there were moved off it
        # silently by an exclusive 'virsh start' ('pinwarden start' refused: hunt)
        default = live.cpuset
        vcpus = dict(live.vcpupins)
        iothreads = dict(live.iothreadpins)
        if default is not None:
            for vcpu in range(live.current or live.vcpus):
                vcpus.setdefault(vcpu, default)
            for ident in live.iothread_id_set:
                iothreads.setdefault(ident, default)
        emulator = live.emulatorpin if live.emulatorpin is not None else default
        pid = read_pid(driver, live.name) if driver == "qemu" and default is None else None
        kernel = _kernel_affinity(pid) if pid is not None else {}
        if kernel:  # the floating groups, as the kernel has them
            every = kernel.get(("vcpu", None))  # (single-threaded TCG: one thread for all)
            for vcpu in range(live.current or live.vcpus):
                got = kernel.get(("vcpu", vcpu), every)
                if vcpu not in vcpus and got is not None:
                    vcpus[vcpu] = got
            for ident in live.iothread_id_set:
                if ident not in iothreads and ("iothread", ident) in kernel:
                    iothreads[ident] = kernel["iothread", ident]
            if emulator is None:
                emulator = kernel.get(("emulator", None))
        affinity = Affinity(vcpus=vcpus, emulator=emulator or EMPTY, iothreads=iothreads)
        out.append(DomainInfo(driver, live.name, (live.uuid or "").lower(), True, live=live,
                              persistent=stored, affinity=affinity))
    return tuple(out)


def _kernel_affinity(pid: int) -> dict[tuple[str, int | None], CpuSet]:
    """Where the kernel lets each thread group of QEMU process ``pid`` run (empty: gone)."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.enforce.affinity import threads_of
    from pinwarden.libvirt.state import group_affinity
    from pinwarden.procs import thread_comm

    comms: dict[int, str | None] = {}
    masks: dict[int, CpuSet] = {}
    for tid in threads_of(pid):
        with contextlib.suppress(OSError):  # (a thread that exited meanwhile)
            masks[tid] = CpuSet.of(os.sched_getaffinity(tid))
            comms[tid] = thread_comm(pid, tid)
    return group_affinity(comms, masks)
