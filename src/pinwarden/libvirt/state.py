"""Snapshot values of libvirt domains, as the pure cores (repin, reconcile, hook) see them."""

from __future__ import annotations

from collections.abc import Mapping

from pinwarden.cpuset import EMPTY, CpuSet
from pinwarden.domain import DomainSpec
from pinwarden.model import HolderRef, domain_holder
from pinwarden.record import field, record


@record
class Affinity:
    """Where each thread of a running domain may run (libvirt's live pin info)."""

    vcpus: Mapping[int, CpuSet] = field(default_factory=dict)
    emulator: CpuSet = EMPTY
    iothreads: Mapping[int, CpuSet] = field(default_factory=dict)

    def threads(self) -> list[tuple[str, int | None, CpuSet]]:
        """``(kind, ident, cpus)`` for every thread group: vcpu N, emulator, iothread N."""
        out: list[tuple[str, int | None, CpuSet]] = [
            ("vcpu", v, c) for v, c in sorted(self.vcpus.items())]
        if self.emulator:
            out.append(("emulator", None, self.emulator))
        out.extend(("iothread", i, c) for i, c in sorted(self.iothreads.items()))
        return out


@record
class DomainInfo:
    """One libvirt domain at one moment."""

    driver: str  # "qemu" or "lxc"
    name: str
    uuid: str
    active: bool
    live: DomainSpec | None = None  # the running definition (active domains)
    persistent: DomainSpec | None = None  # the stored definition (persistent domains)
    affinity: Affinity | None = None  # live affinity (active domains)
    pid: int | None = None  # QEMU / libvirt_lxc process (active domains)
    problem: str | None = None  # why a spec is missing (XML pinwarden cannot parse)
    #: Active but between states (starting, or stopping): libvirt cannot say where its
    #: threads run yet.  Nobody adopts, re-pins or gives back to it until it settles.
    settling: bool = False

    @property
    def holder(self) -> HolderRef:
        return domain_holder(self.driver, self.name, self.uuid.lower())

    @property
    def request(self) -> DomainSpec | None:
        """What the user asked for: the stored definition, else (transient) the live one."""
        return self.persistent or self.live

    @property
    def exclusive(self) -> bool:
        spec = self.live or self.persistent
        return bool(spec and spec.exclusive)


@record
class Repin:
    """Move one thread group of a running domain from ``before`` to ``after`` CPUs."""

    domain: str
    uuid: str
    thread: str  # "vcpu", "emulator", "iothread"
    ident: int | None  # vCPU number or iothread id
    before: CpuSet
    after: CpuSet

    @property
    def label(self) -> str:
        return self.thread if self.ident is None else f"{self.thread}{self.ident}"

    def __str__(self) -> str:
        return f"{self.domain} {self.label}: {self.before} -> {self.after}"
