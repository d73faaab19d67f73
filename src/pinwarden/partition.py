"""Host partition: which CPUs belong to the OS (housekeeping) and which to VMs, and why.

Split in two: :func:`read_vm_cgroup` (adapter) reads the VM partition cgroup into a
:class:`VmCgroup` snapshot; :func:`decide_partition` (pure) turns topology, configuration
and that snapshot into a :class:`Partition`.  :func:`read_partition` and :func:`load_host`
chain them.

Modes (``config.mode``; ``auto`` takes the first that applies):

``isolcpus``
    VM CPUs = ``sys/devices/system/cpu/isolated`` (the ``isolcpus=`` list).
``cgroup``
    VM CPUs = effective cpuset of the VM partition cgroup (v1: ``<cpuset>/machine``; v2:
    ``<unified>/machine.slice``, else ``<unified>/machine``, when cgroup2 has the cpuset
    controller).  In ``auto`` a cgroup that covers every online CPU (or none) restricts
    nothing and is skipped.

    pinwarden itself narrows that cgroup while it leases CPUs.  So the partition is always
    decided from the cgroup *as pinwarden found it*: the lease manager records it with the
    first lease (:class:`~pinwarden.ledger.HostRecord`) and passes it as ``found`` until the
    last lease is gone and the host is put back — the placement rules never change behind
    the user's back.
``none``
    VM CPUs = online CPUs minus the host reserve (``host_reserve``, default the first
    physical core: the siblings of the lowest online CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pinwarden.config import Config
from pinwarden.cpuset import EMPTY, CpuSet, CpuSetError
from pinwarden.errors import HostError
from pinwarden.mounts import CgroupMounts, read_mounts
from pinwarden.record import record, replace
from pinwarden.topology import Topology, read_topology

PartitionMode = Literal["isolcpus", "cgroup", "none"]



@record
class Partition:
    """Which online CPUs are for VMs and which for the host, and why."""

    mode: PartitionMode
    vm_cpus: CpuSet  # CPUs for VMs (isolated set, partition cgroup's cpuset, or online - reserve)
    host_cpus: CpuSet  # housekeeping CPUs: online - vm_cpus
    reason: str  # one line: why this mode and these sets
    cgroup: str | None = None  # partition cgroup path (relative to the cpuset mount), if any


@record
class Host:
    """Everything placement needs to know about the host: a snapshot, no I/O."""

    topology: Topology
    partition: Partition


@record
class VmCgroup:
    """What the VM partition cgroup says, or where it was looked for in vain."""

    name: str | None  # path relative to the cpuset mount ("machine"); None: not found
    version: int | None  # 1 or 2
    cpus: CpuSet  # its effective CPUs
    looked_for: tuple[str, ...] = ()  # directories tried, for messages

    @property
    def found(self) -> bool:
        return self.name is not None


# -- adapter ----------------------------------------------------------------------------


def _read_cpus(path: Path) -> CpuSet | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    try:
        return CpuSet.parse_kernel(text)
    except CpuSetError as exc:
        raise HostError(f"{path}: {exc.message}") from None


def _first_cpus(directory: Path, *names: str) -> CpuSet | None:
    for name in names:
        value = _read_cpus(directory / name)
        if value is not None:
            return value
    return None


def read_vm_cgroup(root: Path, config: Config, mounts: CgroupMounts | None = None) -> VmCgroup:
    """Find and read the VM partition cgroup below ``root`` (v1 cpuset first, then v2)."""
    mounts = read_mounts(root) if mounts is None else mounts
    looked: list[str] = []
    v1 = mounts.v1("cpuset")
    if v1 is not None:
        effective, cpus = mounts.cpuset_file("effective_cpus"), mounts.cpuset_file("cpus")
        directory = v1 / config.cgroup_v1
        looked.append(str(directory))
        if directory.is_dir():
            return VmCgroup(config.cgroup_v1, 1,
                            _first_cpus(directory, effective, cpus) or EMPTY, tuple(looked))
    v2 = mounts.v2
    if v2 is not None and mounts.v2_has("cpuset"):
        for name in dict.fromkeys((config.cgroup_v2, "machine")):
            directory = v2 / name
            looked.append(str(directory))
            if directory.is_dir():
                return VmCgroup(name, 2,
                                _first_cpus(directory, "cpuset.cpus.effective", "cpuset.cpus")
                                or EMPTY, tuple(looked))
    return VmCgroup(None, None, EMPTY, tuple(looked))


def read_partition(root: Path, topology: Topology, config: Config,
                   found: VmCgroup | None = None) -> Partition:
    """The VM partition of the host at ``root`` (see the module docstring); ``found``: the
    VM partition cgroup as recorded at the first lease, instead of reading it now."""
    if found is not None and found.name is None and not found.looked_for and \
            config.mode in ("auto", "cgroup"):
        # recorded under mode none or isolcpus, which look for no cgroup: it says nothing
        # of one (read as "no cpuset cgroup controller is mounted" after a switch to
        # cgroup: hunt N), so it is read as it is now
        found = None
    if found is None:
        found = read_vm_cgroup(root, config) if config.mode in ("auto", "cgroup") \
            else VmCgroup(None, None, EMPTY)
    return decide_partition(topology, config, found)


def load_host(root: Path, config: Config, found: VmCgroup | None = None, *,
              topology: Topology | None = None) -> Host:
    """Topology and partition of the host at ``root``: the snapshot every command uses.
    ``topology``: the host's topology when the caller has it already (a cached snapshot,
    :mod:`pinwarden.topocache`), else it is read."""
    if topology is None:
        topology = read_topology(root)
    return Host(topology, read_partition(root, topology, config, found))


# -- pure core ----------------------------------------------------------------------------


def default_reserve(topology: Topology) -> CpuSet:
    """The first physical core: every online sibling of the lowest online CPU."""
    if not topology.online:
        return EMPTY
    return topology.siblings(topology.online.first()) & topology.online


def _isolcpus(topology: Topology) -> Partition:
    vm = topology.isolated & topology.online
    offline = topology.isolated - topology.online
    note = f" ({offline} offline)" if offline else ""
    return Partition("isolcpus", vm, topology.online - vm,
                     f"isolcpus={topology.isolated} on the kernel command line{note}")


def _cgroup(topology: Topology, cg: VmCgroup) -> Partition:
    vm = cg.cpus & topology.online
    version = "v1" if cg.version == 1 else "v2"
    return Partition("cgroup", vm, topology.online - vm,
                     f"cpuset of cgroup {cg.name} ({version}) is {cg.cpus or 'empty'}", cg.name)


def host_reserve_problem(reserve: CpuSet, topology: Topology) -> str | None:
    """What is wrong with a configured ``host_reserve`` on this host, or None."""
    unknown = reserve - topology.present
    if unknown:
        return (f"host_reserve {reserve} names {unknown.named()} which this host does not "
                f"have (present: {topology.present}); fix [partition] host_reserve in the "
                "configuration")
    if topology.online and not topology.online - reserve:
        return (f"host_reserve {reserve} keeps every online CPU ({topology.online}) for the "
                "host, which leaves none for VMs; fix [partition] host_reserve in the "
                "configuration")
    return None


def _none(topology: Topology, config: Config, why: str) -> Partition:
    if config.host_reserve is not None:
        problem = host_reserve_problem(config.host_reserve, topology)
        if problem is not None:
            raise HostError(problem)
        reserve = config.host_reserve & topology.online
        what = f"host reserve is {reserve or 'empty'} (host_reserve in the configuration)"
    else:
        reserve = default_reserve(topology)
        core = topology.cpu(reserve.first()).core if reserve else None
        label = f"core {core}" if core is not None else "the first core"
        what = f"host reserve is {label} ({reserve.named()})"
    vm = topology.online - reserve
    return Partition("none", vm, topology.online - vm, f"{why}; {what}")


def restrict_howto(cgroup: str | None, cpus: str) -> str:
    """How to give the VM partition cgroup ``cgroup`` the CPUs ``cpus``: systemd's
    property for a slice (systemd undoes a write to its cgroup file: systemd-lab hunt),
    else the cgroup file."""
    if cgroup and cgroup.endswith(".slice"):
        return f"'systemctl set-property {cgroup} AllowedCPUs={cpus}'"
    return f"cpuset.cpus = {cpus} in its cgroup directory"


def decide_partition(topology: Topology, config: Config, cgroup: VmCgroup) -> Partition:
    """Choose the partition mode and compute VM and housekeeping CPUs (no I/O).  A
    ``host_reserve`` set where another mode than ``none`` is chosen is said to be unused
    (it was ignored without a word: the housekeeping CPUs are the partition's)."""
    part = _decide(topology, config, cgroup)
    if config.host_reserve is not None and part.mode != "none":
        part = replace(part, reason=f"{part.reason}; host_reserve {config.host_reserve} is "
                                    f"not used: it applies in partition mode none")
    return part


def _decide(topology: Topology, config: Config, cgroup: VmCgroup) -> Partition:
    mode = config.mode
    if mode == "isolcpus":
        if not topology.isolated & topology.online:
            raise HostError("partition mode isolcpus is configured but no online CPU is "
                            "isolated (sys/devices/system/cpu/isolated is empty); boot with "
                            "isolcpus=LIST or set [partition] mode to auto, cgroup or none")
        return _isolcpus(topology)
    if mode == "cgroup":
        if not cgroup.found:
            where = ", ".join(cgroup.looked_for) or "no cpuset cgroup controller is mounted"
            raise HostError(f"partition mode cgroup is configured but no VM partition cgroup "
                            f"exists (looked for: {where}); create it with a cpuset or set "
                            "[partition] mode to auto, isolcpus or none")
        part = _cgroup(topology, cgroup)
        if not part.vm_cpus:
            # (the example keeps the first core for the host, as mode none would: all
            # online CPUs left the host none; and on systemd, where an empty AllowedCPUs
            # means unrestricted, a write to the cgroup file is undone: systemd-lab hunt)
            example = (topology.online - default_reserve(topology)) or topology.online
            name = cgroup.name or ""
            how = restrict_howto(name, example.to_list())
            why = " (none of its own: it is not restricted)" if cgroup.version == 2 else ""
            raise HostError(f"partition mode cgroup is configured but cgroup {name} has no "
                            f"online CPU in its cpuset{why}; give it the VM CPUs, e.g. {how}")
        return part
    if mode == "none":
        return _none(topology, config, "partition mode none is configured")
    # auto
    if topology.isolated & topology.online:
        return _isolcpus(topology)
    if cgroup.found:
        vm = cgroup.cpus & topology.online
        if vm and vm != topology.online:
            return _cgroup(topology, cgroup)
        why = (f"no isolcpus and cgroup {cgroup.name} covers every online CPU" if vm else
               f"no isolcpus and cgroup {cgroup.name} has an empty cpuset")
        return _none(topology, config, why)
    return _none(topology, config, "no isolcpus and no restricting VM cgroup")


@record
class SharedEdit:
    """Someone else's write to the shared group (``machine``) while pinwarden keeps it
    narrowed: the CPUs it added and removed, against what pinwarden last wrote there."""

    added: CpuSet
    removed: CpuSet

    def apply(self, cpus: CpuSet) -> CpuSet:
        """``cpus`` (the group's own value under pinwarden's narrowing, or the partition
        cgroup as found) with the edit made to it."""
        return (cpus | self.added) - self.removed


def shared_edit(written: CpuSet, now: CpuSet, leased: CpuSet) -> SharedEdit | None:
    """The edit that turned ``written`` (pinwarden's last write) into ``now``, or None.
    Leased CPUs are no edit of the VM CPUs either way: they are VM CPUs already, and the
    group stays off them (someone wrote them into it: cgroup v2 lets them)."""
    added, removed = now - written - leased, written - now - leased
    return SharedEdit(added, removed) if added or removed else None


def edited_partition(partition: Partition, found: VmCgroup, own: CpuSet | None,
                     edit: SharedEdit, *, decides: bool) -> tuple[VmCgroup, CpuSet | None]:
    """What an edit of the shared group makes of the VM partition cgroup as recorded
    (``found``) and of the group's own value put back at the last release (``own``; None:
    pinwarden made the group, and removes it).  ``decides``: that group is the cgroup the
    partition is read from (mode ``auto`` or ``cgroup`` and the group found there).

    * mode ``cgroup``: its CPUs are the VM CPUs, and the edit is made to both;
    * mode ``none`` read from a group that had every CPU: what the administrator saw there
      were the VM CPUs, the host reserve left out by pinwarden.  An edit that changes them
      makes the group a restricting one of exactly the edited VM CPUs (mode ``cgroup`` from
      then on); one that does not (the reserve written back in) changes nothing;
    * otherwise (``isolcpus``, or a partition the configuration fixes) the partition does
      not come from the group: only its own value takes the edit."""
    if decides and partition.mode == "cgroup":
        return replace(found, cpus=edit.apply(found.cpus)), \
            edit.apply(own) if own is not None else None
    if decides and partition.mode == "none":
        vm = edit.apply(partition.vm_cpus)
        if vm == partition.vm_cpus:
            return found, own
        return replace(found, cpus=vm), vm if own is not None else None
    return found, edit.apply(own) if own is not None else None


def shared_pool(host: Host, taken: CpuSet) -> tuple[CpuSet, tuple[str, ...]]:
    """Where VMs without affinity run beside ``taken`` (CPUs leased to others): the online
    VM CPUs left over; when none is, the housekeeping CPUs, with a note saying so (empty
    only when every online CPU is taken).  Policy, layout and status all use this rule."""
    online = host.topology.online
    pool = (host.partition.vm_cpus & online) - taken
    if pool:
        return pool, ()
    fallback = (host.partition.host_cpus & online) - taken
    if not fallback:
        return fallback, ()
    if host.partition.mode == "cgroup":  # the policy refuses new shared VMs there
        return fallback, (f"every VM CPU ({host.partition.vm_cpus}) is leased exclusively; "
                          f"no shared VM may start until a lease is released (mode cgroup), "
                          f"and any running are kept on the housekeeping {fallback.named()}",)
    return fallback, (f"every VM CPU ({host.partition.vm_cpus}) is leased exclusively; "
                      f"shared VMs run on the housekeeping {fallback.named()} until a lease is "
                      "released",)


def where_of(part: Partition) -> str:
    """The VM partition, for messages."""
    if part.mode == "cgroup":
        return f"partition cgroup {part.cgroup or '?'} (cpus {part.vm_cpus})"
    if part.mode == "isolcpus":
        return f"isolated {part.vm_cpus.named(empty='CPUs (none)')}"
    return f"VM {part.vm_cpus.named(empty='CPUs (none)')} (online minus host reserve)"


def no_housekeeping(host: Host) -> str | None:
    """Why nothing can be leased on ``host`` when its VM CPUs are every online CPU (no
    housekeeping CPU would be left), with what to change; None when some are the host's.
    (``pinwarden host`` and ``status`` say it too: only a plan said it, and ``host`` is the
    first step.)"""
    part = host.partition
    if part.host_cpus:
        return None
    online = host.topology.online
    first = host.topology.siblings(online.first()) & online if online else EMPTY
    rest, keep = (online - first).to_list() or "…", f"keeping {first.named()} for the host"
    where = where_of(part)
    if part.mode == "isolcpus":  # the kernel's list: only the command line changes it
        what = f"the isolated {part.vm_cpus.named()} (isolcpus=) cover"
        fix = (f"boot with isolcpus= naming the VM CPUs only (isolcpus={rest}, {keep}), or "
               f"set [partition] mode = \"none\" with a host_reserve")
    elif part.mode == "cgroup":
        what = f"the {where} covers"
        fix = (f"give {'cgroup ' + part.cgroup if part.cgroup else 'the VM partition'} the "
               f"VM CPUs only ({restrict_howto(part.cgroup, rest)}, {keep}) or set "
               f"[partition] mode = \"auto\"")
    else:
        what = f"the {where} cover"
        fix = f"set [partition] host_reserve = \"{first.to_list() or '0'}\""
    return f"{what} every online CPU, which leaves the host no housekeeping CPU; {fix}"
