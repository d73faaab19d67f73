"""Which running shared domains must move before CPUs are leased (pure).

On cgroup v1 the kernel refuses an exclusive cpuset that overlaps a sibling, and a parent
cannot shrink below a child; on any cgroup version a vCPU thread left on a leased CPU would
share it.  So before ``pinwarden start`` leases CPUs, every running shared domain whose
live affinity covers them is re-pinned live (what oVirt does): each thread group keeps
``affinity − leased``.  A thread group left with nothing:

* *floating* — its definition does not pin it (libvirt's default placement, or pinwarden's
  default placement rendered at start) — moves to the shared pool;
* *pinned* by its definition — the lease is refused, naming the domain and the pin.
"""

from __future__ import annotations

from collections.abc import Sequence

from pinwarden.cpuset import CpuSet
from pinwarden.domain import DomainSpec
from pinwarden.errors import Refusal
from pinwarden.libvirt.state import DomainInfo, Repin
from pinwarden.model import HolderRef


def _floating(spec: DomainSpec | None, thread: str, ident: int | None) -> bool:
    """The definition leaves this thread group to default placement."""
    if spec is None:
        return False
    if spec.cpuset is not None:
        return False
    if thread == "vcpu":
        return ident not in spec.vcpupins
    if thread == "emulator":
        return spec.emulatorpin is None
    return ident not in spec.iothreadpins


def repins(domains: Sequence[DomainInfo], holder: HolderRef, leased: CpuSet,
           pool: CpuSet, holders: Sequence[HolderRef] = ()) -> tuple[Repin, ...]:
    """Live re-pins that clear ``leased`` (the CPUs about to be leased to ``holder``).

    ``pool``: the shared pool once the lease is in place (floating threads go there).
    ``holders``: exclusive holders already recorded — their domains are left alone (policy
    has already made sure their CPUs are not in ``leased``).
    Raises :class:`Refusal` when a domain's own definition pins a thread group entirely
    onto leased CPUs.
    """
    skip = {(h.driver, h.key) for h in (*holders, holder)}
    out: list[Repin] = []
    for dom in domains:
        if not dom.active or dom.affinity is None or \
                (dom.holder.driver, dom.holder.key) in skip:
            continue
        for thread, ident, cpus in dom.affinity.threads():
            clash = cpus & leased
            if not clash:
                continue
            after = cpus - leased
            label = thread if ident is None else f"{thread}{ident}"
            if not after:
                if not _floating(dom.request, thread, ident):
                    raise Refusal(
                        f"cannot lease {clash.named()} to {holder}: running domain "
                        f"{dom.name!r} pins {label} to {cpus.named()} only; re-pin it "
                        f"('virsh vcpupin/emulatorpin {dom.name} … --live') or stop it first",
                        code="pinned-elsewhere")
                after = pool - leased
                if not after:
                    raise Refusal(f"cannot lease {clash.named()} to {holder}: no CPU "
                                  f"would be left for {label} of running domain "
                                  f"{dom.name!r}", code="insufficient-cpus")
            out.append(Repin(dom.name, dom.uuid, thread, ident, cpus, after))
    return tuple(out)
