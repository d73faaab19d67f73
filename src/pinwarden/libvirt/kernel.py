"""The kernel's view of a running domain, to verify a start: thread affinity from ``/proc``
and libvirt's ``virDomainGetVcpus`` (which reads the vCPU threads' affinity), cgroup state
from the backend.  Each check returns one-line problems; an empty list means confirmed."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pinwarden.cpuset import CpuSet, CpuSetError
from pinwarden.enforce.backend import CgroupBackend, CgroupOpError
from pinwarden.libvirt.state import vcpus_by_number
from pinwarden.model import Plan

PROC = Path("/proc")


def thread_affinity(tid: int, *, proc: Path = PROC) -> CpuSet | None:
    try:
        text = (proc / str(tid) / "status").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            try:
                return CpuSet.parse_kernel(line.split(":", 1)[1])
            except CpuSetError:
                return None
    return None


def process_threads(pid: int, *, proc: Path = PROC) -> dict[int, CpuSet]:
    """Affinity of every thread of ``pid`` (threads that exit meanwhile are skipped)."""
    out: dict[int, CpuSet] = {}
    with contextlib.suppress(OSError):
        for entry in (proc / str(pid) / "task").iterdir():
            cpus = thread_affinity(int(entry.name), proc=proc)
            if cpus is not None:
                out[int(entry.name)] = cpus
    return out


def cpuset_cgroup(tid: int, *, proc: Path = PROC) -> str | None:
    """The v1 cpuset cgroup of a task (or its v2 cgroup), relative, no leading slash."""
    try:
        lines = (proc / str(tid) / "cgroup").read_text(errors="replace").splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpuset" in controllers.split(","):
            return path.strip("/")
        if controllers == "":
            unified = path.strip("/")
    return unified


def domain_cgroup(pid: int | None, *, proc: Path = PROC) -> str | None:
    """libvirt's group of the domain (the parent of its ``emulator`` group)."""
    if pid is None:
        return None
    path = cpuset_cgroup(pid, proc=proc)
    if path is not None and path.rsplit("/", 1)[-1] == "emulator":
        return path.rsplit("/", 1)[0]
    return path


def check_domain(dom: Any, pid: int | None, plan: Plan) -> list[str]:
    """Every QEMU thread within the plan's CPUs; every vCPU thread within its own pin."""
    if pid is None:
        return ["libvirt wrote no pid file for the domain"]
    problems: list[str] = []
    allowed = plan.cpus()
    for tid, cpus in sorted(process_threads(pid).items()):
        if not cpus <= allowed:
            problems.append(f"thread {tid} may run on {cpus.named()}, outside {allowed}")
    try:
        vcpus = vcpus_by_number(dom.vcpus())
    except Exception as exc:  # libvirtError; the binding is not imported here
        code = getattr(exc, "get_error_code", lambda: None)()
        if code in (3, 84):  # VIR_ERR_NO_SUPPORT, VIR_ERR_OPERATION_UNSUPPORTED (lxc)
            return problems
        return [*problems, f"cannot read vCPU affinity: {exc}"]
    for vcpu, cpus in sorted(vcpus.items()):
        want = plan.vcpus.get(vcpu)
        if want is not None and not cpus <= want:
            problems.append(f"vCPU {vcpu} may run on {cpus.named()}, not only {want}")
    return problems


def check_group(backend: CgroupBackend, path: str, cpus: CpuSet, *,
                exclusive: bool = True) -> list[str]:
    """The holder's group is exclusive (unless the layout made it a plain cpuset:
    ``exclusive=False``, Linux 6.12+ over isolcpus CPUs) and its effective CPUs are within
    ``cpus``."""
    try:
        group = backend.read_group(path)
    except CgroupOpError as exc:
        return [f"cannot read cgroup {path}: {exc}"]
    problems = []
    if exclusive and not group.exclusive:
        problems.append(f"cgroup {path} is not cpu_exclusive")
    if not group.effective_cpus or not group.effective_cpus <= cpus:
        problems.append(f"cgroup {path} has effective CPUs {group.effective_cpus or '(none)'}"
                        f", expected {cpus}")
    return problems
