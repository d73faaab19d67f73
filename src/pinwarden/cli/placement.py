"""``pinwarden plan | reserve | release | status``: placement of libvirt domains.

* ``plan DOMAIN.xml`` — dry run: where every thread would run, what would be leased;
* ``reserve DOMAIN.xml`` — the same decision, recorded in the lease database in one
  transaction (a racing reservation of the same CPU loses);
* ``release NAME|UUID`` — free a holder's leases;
* ``status`` — leases per holder, the partition and a CPU map.

``--emit-xml`` prints the domain XML with the plan applied (pins, ``<vcpu cpuset>`` and,
for exclusive domains, the libvirt partition of the domain's own cgroup), ready for
``virsh define``.  ``-`` reads the XML from stdin.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinwarden.cli import print_json, printable
from pinwarden.cli.common import manager_of, state_dir_of
from pinwarden.errors import HostError, InputError

# Everything else is imported by the handler that needs it: building the parser (every
# command, on every run) must stay cheap, and ``plan`` loads neither the CPU map nor
# the XML renderer it does not use.
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from pinwarden.cpuset import CpuSet
    from pinwarden.domain import DomainSpec
    from pinwarden.holdergroup import Invalid
    from pinwarden.ledger import HolderRecord
    from pinwarden.manager import Manager
    from pinwarden.model import HolderRef, Plan
    from pinwarden.partition import Host, Partition


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    for name, verb in (("plan", "show where DOMAIN.xml would run (dry run, nothing recorded)"),
                       ("reserve", "plan DOMAIN.xml and record its exclusive leases")):
        parser = subparsers.add_parser(name, parents=[common], help=verb, description=(
            f"{verb[0].upper()}{verb[1:]}. DOMAIN.xml is libvirt domain XML; '-' reads "
            "stdin. Exit 1 when the placement is refused."))
        parser.add_argument("xml", metavar="DOMAIN.xml", help="domain XML file, or '-'")
        parser.add_argument("--emit-xml", action="store_true",
                            help="print the domain XML with the plan applied")
        parser.set_defaults(handler=run_plan if name == "plan" else run_reserve)

    parser = subparsers.add_parser(
        "release", parents=[common], help="free the leases of a domain or job",
        description="Free every CPU leased to the holder named NAME (or with UUID).")
    parser.add_argument("selector", metavar="NAME|UUID", help="domain name or UUID, job name")
    parser.add_argument("--driver", choices=("qemu", "lxc", "run"), default=None,
                        help="only holders of this kind (when a name is ambiguous)")
    parser.add_argument("--force", action="store_true",
                        help="free the leases also while the holder runs (its domain or "
                             "job keeps running on CPUs that look free, its cgroup in place "
                             "until it stops; a running daemon leases a domain's again)")
    parser.set_defaults(handler=run_release)

    parser = subparsers.add_parser(
        "status", parents=[common], help="show leases, the partition and a CPU map",
        description="List every holder's leases, the host partition and which CPU is used "
                    "how. Read only: holders whose owner process died are shown as such "
                    "(their CPUs are free; the next change removes them).")
    parser.set_defaults(handler=run_status)

    parser = subparsers.add_parser(
        "sync", parents=[common], help="free dead holders and re-apply the cgroup layout",
        description="Free the leases of holders whose owner process is gone and make the "
                    "kernel's cgroups match the leases again (or put the host back as "
                    "found when nothing is leased).")
    parser.set_defaults(handler=run_sync)


# -- input --------------------------------------------------------------------------------


def read_xml(source: str) -> bytes:
    """The XML document at ``source`` (``-``: stdin), at most one byte over the limit."""
    from pinwarden.domain import MAX_XML_BYTES

    try:
        if source == "-":
            stdin = sys.stdin
            if stdin is None or getattr(stdin, "buffer", None) is None:
                raise InputError("cannot read domain XML from stdin: it is closed")
            return stdin.buffer.read(MAX_XML_BYTES + 1)
        with Path(source).open("rb") as handle:
            return handle.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read domain XML {source}: "
                         f"{exc.strerror or exc}") from None
    except ValueError as exc:  # I/O on a closed file
        raise InputError(f"cannot read domain XML {source}: {exc}") from None


# -- output -------------------------------------------------------------------------------


def _partition_json(part: Partition) -> dict[str, Any]:
    return {"mode": part.mode, "vm_cpus": str(part.vm_cpus), "host_cpus": str(part.host_cpus),
            "cgroup": part.cgroup, "reason": part.reason}


def plan_json(plan: Plan, spec: DomainSpec, holder: HolderRef) -> dict[str, Any]:
    data = plan.to_json()
    data["driver"] = holder.driver
    data["default_cpus"] = None if plan.default_cpus is None else str(plan.default_cpus)
    data["leased"] = str(plan.leased())
    data["threads"] = spec.threads
    data["emulator_policy"] = spec.emulator
    return data


def _online_hint(cpus: CpuSet) -> str:
    """The command (one line) that brings ``cpus`` online."""
    if len(cpus) == 1:
        return f"echo 1 > /sys/devices/system/cpu/cpu{cpus.first()}/online"
    return (f"for c in {' '.join(map(str, cpus))}; do echo 1 > "
            "/sys/devices/system/cpu/cpu$c/online; done")


#: Leases of one holder up to which each CPU's role is named; beyond, roles are counted.
ROLES_NAMED = 8


def _roles(leases: dict[int, str]) -> str:
    """``4 emulator, 5 vcpu0, 12 sibling-hold``; for more than :data:`ROLES_NAMED` CPUs,
    counted by kind — ``120 vcpu 5-124, emulator 4, 8 sibling-hold 130-137``: a 120-vCPU
    domain's line in 'status' ran to 1,449 characters (CLI hunt)."""
    from pinwarden.cpuset import CpuSet

    if len(leases) <= ROLES_NAMED:
        return ", ".join(f"{cpu} {role}" for cpu, role in sorted(leases.items()))
    kinds: dict[str, list[int]] = {}
    for cpu, role in sorted(leases.items()):
        kinds.setdefault(role.rstrip("0123456789") or role, []).append(cpu)
    return ", ".join(f"{kind} {CpuSet.of(cpus)}" if len(cpus) == 1 else
                     f"{len(cpus)} {kind} {CpuSet.of(cpus)}" for kind, cpus in kinds.items())


def render_plan_text(plan: Plan, host: Host, *, recorded: bool) -> str:
    kind = "exclusive" if plan.exclusive else "shared"
    part = host.partition
    lines = [f"domain {printable(plan.domain)} ({kind}); partition {part.mode}: "
             f"VM {part.vm_cpus.named(empty='CPUs -')}, "
             f"housekeeping {part.host_cpus.named(empty='CPUs -')}"]
    width = max(len(f"iothread{i}") for i in [*plan.iothreads, 0]) + 2
    width = max(width, len("emulator") + 2)
    for vcpu, cpus in sorted(plan.vcpus.items()):
        lines.append(f"  {f'vcpu{vcpu}':<{width}}{cpus}")
    lines.append(f"  {'emulator':<{width}}{plan.emulator}")
    for ident, cpus in sorted(plan.iothreads.items()):
        lines.append(f"  {f'iothread{ident}':<{width}}{cpus}")
    if plan.leases:
        verb = "leased" if recorded else "would lease"
        lines.append(f"  {verb} {plan.leased()} ({_roles(dict(plan.leases))})")
    elif recorded:
        lines.append("  nothing leased (shared domain)")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _emit_partition(manager: Manager, plan: Plan, holder: HolderRef) -> str | None:
    """The libvirt ``<partition>`` of an exclusive domain's cgroup, per the config."""
    if not plan.exclusive:
        return None
    try:
        return manager.libvirt_partition(holder)
    except HostError:
        return None


def _report(args: argparse.Namespace, manager: Manager, xml: bytes, spec: DomainSpec,
            plan: Plan, host: Host, holder: HolderRef, *, recorded: bool) -> int:
    rendered = None
    if args.emit_xml:
        from pinwarden.domain import render_plan

        rendered = render_plan(xml, plan, partition=_emit_partition(manager, plan, holder))
    if args.json:
        data = plan_json(plan, spec, holder)
        data["recorded"] = recorded
        if rendered is not None:
            data["xml"] = rendered
        print_json(data)
    elif rendered is not None:  # XML on stdout (pipe it to virsh define), the rest on stderr
        sys.stdout.write(rendered if rendered.endswith("\n") else rendered + "\n")
        print(render_plan_text(plan, host, recorded=recorded), file=sys.stderr)
    else:
        print(render_plan_text(plan, host, recorded=recorded))
    return 0


# -- commands -----------------------------------------------------------------------------


def run_plan(args: argparse.Namespace) -> int:
    from pinwarden.domain import parse_domain
    from pinwarden.policy import holder_of

    xml = read_xml(args.xml)
    spec = parse_domain(xml)
    holder = holder_of(spec)
    with manager_of(args) as manager:
        host = manager.host()
        plan = manager.plan(spec, holder=holder)
        return _report(args, manager, xml, spec, plan, host, holder, recorded=False)


def run_reserve(args: argparse.Namespace) -> int:
    from pinwarden.domain import parse_domain
    from pinwarden.policy import holder_of

    xml = read_xml(args.xml)
    spec = parse_domain(xml)
    holder = holder_of(spec)
    _own_state_for_a_dump(args, "reserve")
    with manager_of(args) as manager:
        reserved = manager.reserve_request(spec, holder=holder)
        return _report(args, manager, xml, spec, reserved.plan, manager.host(), holder,
                       recorded=True)


def _own_state_for_a_dump(args: argparse.Namespace, command: str) -> None:
    """A lease on a host dump (``--root``) goes to a lease database of its own, named on
    the command line or by ``PINWARDEN_STATE_DIR``: the configured one is this host's, and
    a dump's CPUs leased there were refused to this host's VMs, and its host record read
    as this host's (CLI hunt)."""
    import os

    if os.path.realpath(args.root) == "/" or args.state_dir or \
            os.environ.get("PINWARDEN_STATE_DIR"):
        return
    raise InputError(f"{command} on the host dump {args.root} would record into this "
                     f"host's lease database ({state_dir_of(args)}); give the dump one of "
                     f"its own with --state-dir DIR")


def cpuset_view_partial(root: Path, pids: Iterable[int], v1: bool) -> bool:
    """Whether this process sees only part of the cpuset hierarchy: from a cgroup
    namespace, the group of a process above its root reads ``/..`` (``/proc/PID/cgroup``).
    ``pids``: whom to look at (PID 1, the holders' owners); ``v1``: the hierarchy is v1's
    ``cpuset`` (else v2's)."""
    for pid in pids:
        try:
            text = (root / "proc" / str(pid) / "cgroup").read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            number, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            ours = "cpuset" in controllers.split(",") if v1 else number == "0"
            if ours and (path == "/.." or path.startswith("/../")):
                return True
    return False


def refuse_in_part_view(root: Path, command: str) -> None:
    """A :class:`HostError` when this process sees only part of the cpuset hierarchy (a
    cgroup namespace below the holder groups: :func:`cpuset_view_partial` of PID 1):
    ``command`` would change groups out of its view as if they were not there (a sync
    there made the holder groups again inside its view, and failed saying to widen the
    parent /: namespace hunt)."""
    from pinwarden.mounts import read_mounts

    mounts = read_mounts(root)
    v1 = mounts.v1("cpuset")
    if v1 is None and not mounts.v2_has("cpuset"):
        return
    if cpuset_view_partial(root, [1], v1 is not None):
        raise HostError(f"this cgroup namespace shows only part of the cpuset hierarchy (the "
                        f"groups of processes above its root read /..): '{command}' would "
                        f"change groups out of its view as if they were not there; run it "
                        f"on the host; nothing was changed")


def invalid_partitions(root: Path, records: Sequence[HolderRecord],
                       online: CpuSet | None = None) -> dict[tuple[str, str], Invalid]:
    """Holders whose group the kernel does not keep as their leases say, by ``(driver,
    key)`` (:func:`pinwarden.holdergroup.judge`, as ``audit`` judges them): an invalid
    cgroup v2 partition, a cgroup v1 group with ``cpu_exclusive`` 0, with ``online`` (the
    online CPUs) a group moved off its leased CPUs by hand, and a recorded group that is
    gone.  The ledger cannot tell any of these: each recorded group is read here."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.holdergroup import GroupSeen, Invalid, judge
    from pinwarden.model import SIBLING_HOLD
    from pinwarden.mounts import read_mounts

    if not any(r.cgroup for r in records):
        return {}
    mounts = read_mounts(root)
    v1 = mounts.v1("cpuset")
    if v1 is None and (mounts.unified is None or not mounts.v2_has("cpuset")):
        return {}
    base = v1 if v1 is not None else mounts.unified
    assert base is not None
    # (a cgroup namespace's view: a group out of it is not gone; status said "GROUP
    # MISSING … sync makes it again" of every holder: hunt N)
    partial = cpuset_view_partial(root, {1, *(r.owner_pid for r in records
                                              if r.owner_pid is not None)}, v1 is not None)

    def read(name: str) -> str | None:
        try:
            return (group / name).read_text()
        except OSError:
            return None

    out: dict[tuple[str, str], Invalid] = {}
    for record in records:
        if not record.cgroup:
            continue
        group = base / record.cgroup.strip("/")
        seen: GroupSeen | None = None
        if not group.is_dir() and partial:
            out[(record.ref.driver, record.ref.key)] = Invalid(None, None, unseen=True)
            continue
        if group.is_dir():  # (else removed by hand: nothing keeps its CPUs)
            flag = read(mounts.cpuset_file("cpu_exclusive")) if v1 is not None else None
            cpus = read(mounts.cpuset_file("cpus"))
            try:
                parsed = CpuSet.parse(cpus) if cpus is not None else None
            except ValueError:
                parsed = None
            seen = GroupSeen(parsed, read("cpuset.cpus.partition") if v1 is None else None,
                             None if flag is None else flag.strip() == "1")
        threads = CpuSet.of(c for c, role in record.plan.leases.items()
                            if role != SIBLING_HOLD)
        found = judge(threads, seen, online)
        if found is not None:
            out[(record.ref.driver, record.ref.key)] = found
    return out


def holder_json(record: HolderRecord) -> dict[str, Any]:
    from pinwarden.jsonout import timestamp

    plan = record.plan
    return {
        "domain": record.ref.name,
        "uuid": record.ref.uuid,
        "driver": record.ref.driver,
        "key": record.ref.key,
        "exclusive": plan.exclusive,
        "cpus": str(plan.leased()),
        "roles": {str(cpu): role for cpu, role in sorted(plan.leases.items())},
        "owner_pid": record.owner_pid,
        "created": timestamp(record.created),
        "cgroup": record.cgroup,
        "plan": plan.to_json(),
    }


def run_release(args: argparse.Namespace) -> int:
    from pinwarden import procs

    with manager_of(args) as manager:
        record = manager.release(args.selector, driver=args.driver, force=args.force)
    if args.json:
        print_json({"released": holder_json(record)})
    else:
        cpus = record.plan.leased()
        what = f"{cpus.named()} freed" if cpus else "it held no CPUs"
        print(f"released {record.ref.describe()}: {what}")
        if cpus and record.owner_pid is not None and \
                record.owner_runs() and not record.owner_elsewhere and \
                not procs.libvirt_daemon(record.owner_pid):  # (no domain of its own)
            print(f"note: it still runs (pid {record.owner_pid}): its cgroup keeps "
                  f"{cpus.named()} until it stops, and a running 'pinwarden daemon' leases "
                  "them to it again")
    return 0


def run_sync(args: argparse.Namespace) -> int:
    from pinwarden.narrowed import NARROWED_PREFIX

    given: tuple[Any, ...] = ()
    failure = None
    with manager_of(args) as manager:
        refuse_in_part_view(manager.root, "pinwarden sync")
        reaped, result = manager.reap_and_sync()
        if result is not None and manager.change_records(NARROWED_PREFIX):
            # shared VMs kept off CPUs no longer leased (a job's end: no hook sees it)
            from pinwarden.config import libvirt_uri
            from pinwarden.libvirt import pins

            given, failure = pins.give_back_now(manager, libvirt_uri(None, manager.config))
    if args.json:
        print_json({"reaped": [holder_json(r) for r in reaped],
                    "operations": len(result.ops) if result is not None else 0,
                    "given_back": [str(m) for m in given]})
        return 0
    for record in reaped:
        print(f"freed {record.ref.describe()}: its owner process {record.owner_pid} is gone")
    for move in given:
        print(f"gave back {move}")
    if failure is not None:
        print(f"pinwarden: warning: shared VMs kept off CPUs no longer leased do not have "
              f"them back: {failure}", file=sys.stderr)
    if result is None:
        print("nothing enforced: pinwarden only changes the cgroups of the host it runs on")
    else:
        print(f"cgroup layout in place ({len(result.ops)} changes)")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from pinwarden.cli.host import disagreement
    from pinwarden.cpuset import CpuSet
    from pinwarden.daemonlock import running
    from pinwarden.holdergroup import NOT_EXCLUSIVE, Invalid
    from pinwarden.ledger import DB_NAME
    from pinwarden.manager import INTERRUPTED_KEY
    from pinwarden.model import (
        JOB_DRIVER,
        KTHREAD_PREFIX,
        TASK_PREFIX,
        by_holder,
        kept_text,
        release_command,
    )
    from pinwarden.narrowed import NARROWED_PREFIX, narrowed
    from pinwarden.partition import no_housekeeping, shared_pool
    from pinwarden.view import render_cpu_map

    with manager_of(args) as manager, manager.snapshot():
        host = manager.host()
        records = manager.holders()
        owners = manager.owners_gone()
        dead, heirs = owners.dead_keys(), owners.heirs
        leases = manager.leases(owners=owners)
        kept = manager.kept_leases()
        database = manager.state_dir / DB_NAME
        narrowed_records = manager.change_records(NARROWED_PREFIX)
        cut_short = bool(manager.change_records(INTERRUPTED_KEY))
        moved = len(manager.change_records(KTHREAD_PREFIX)) + \
            len(manager.change_records(TASK_PREFIX))
        invalid = invalid_partitions(manager.root, records, host.topology.online)
        daemon = running(manager.state_dir)
        first = manager.record()
        changed = disagreement(manager, first) if first is not None else None
    part = host.partition
    leased = CpuSet.of(lease.cpu for lease in leases)
    pins = narrowed(narrowed_records, leased)
    # a holder freed by a forced release that runs on keeps its CPUs from the shared pool
    shared, fallback = shared_pool(host, leased | CpuSet.of(lease.cpu for lease in kept))
    # no housekeeping CPU: every lease is refused, which only 'host' and a refusal said
    problem = no_housekeeping(host)
    if problem is not None:
        fallback = (*fallback, f"nothing can be leased: {problem}")
    if changed is not None:  # (the reason shown is the recorded partition's: hunt N)
        fallback = (*fallback, changed)
    if cut_short:  # the cgroups are half-way until a sync finishes the change
        fallback = (*fallback, "a cgroup change was cut short (pinwarden was killed, or "
                               "its rollback failed): the cgroups are half-way until the "
                               "next change; 'pinwarden sync' finishes it now")
    if moved and not leased and not kept:
        # the last lease went from a PID namespace of its own (a container's /proc), which
        # sees none of the threads, or a CPU of theirs is offline: kept (plan_restore)
        fallback = (*fallback, f"{moved} thread{'s' if moved > 1 else ''} pinwarden moved "
                               f"off leased CPUs {'are' if moved > 1 else 'is'} not back "
                               f"yet (the last lease went from a PID namespace of its own, "
                               f"where {'they are' if moved > 1 else 'it is'} out of view, "
                               f"or a CPU {'they' if moved > 1 else 'it'} had is offline); "
                               f"'pinwarden sync' on the host puts "
                               f"{'them' if moved > 1 else 'it'} back")
    kept_by = by_holder(kept)
    online = host.topology.online

    def offline(record: HolderRecord) -> CpuSet:
        return record.plan.leased() & host.topology.present - online

    def absent(record: HolderRecord) -> CpuSet:
        """Leased CPUs this host does not have at all (not offline: no such CPU)."""
        return record.plan.leased() - host.topology.present

    def gone(record: HolderRecord) -> bool:
        return (record.ref.driver, record.ref.key) in dead

    if args.json:
        from pinwarden.jsonout import timestamp

        print_json({
            "leases": [{**holder_json(r), "offline": str(offline(r)),
                        "absent": str(absent(r)),
                        "owner_gone": gone(r),
                        "owner_elsewhere": r.owner_elsewhere,
                        "left_running": list(heirs.get(r.ref, ())),
                        **invalid.get((r.ref.driver, r.ref.key), Invalid(None, None))
                        .to_json()}
                       for r in records],
            "partition": _partition_json(part),
            "online": str(host.topology.online),
            "leased": str(leased),
            "shared": str(shared),
            "kept": [{"domain": ref.name, "driver": ref.driver, "uuid": ref.uuid,
                      "cpus": str(CpuSet.of(x.cpu for x in held)),
                      "pid": held[0].owner_pid} for ref, held in kept_by.items()],
            "notes": list(fallback),
            "narrowed": [{"domain": n.domain, "uuid": n.uuid, "thread": n.label,
                          "pin": str(n.pin), "had": str(n.had), "waiting": str(n.waiting)}
                         for n in pins],
            "database": str(database),
            "daemon_pid": daemon,
            "time": timestamp(time.time()),
        })
        return 0
    lines = [f"partition {part.mode}: VM {part.vm_cpus.named(empty='CPUs -')}, housekeeping "
             f"{part.host_cpus.named(empty='CPUs -')} ({part.reason})",
             f"leased {leased or '-'}; shared VM pool {shared or '-'}",
             *([f"daemon: pid {daemon}" if daemon else "daemon: running"]
               if daemon is not None else
               ["daemon: none runs for this state directory (the lease of a VM that ends "
                "without the libvirt hook stays until 'pinwarden sync')"] if records else []),
             *(f"note: {note}" for note in fallback)]
    if not records:
        lines.append("no holders" if database.exists() else
                     f"no holders: no lease database at {database} (nothing was ever leased "
                     "with this state directory: is it the one pinwarden uses?)")
    for record in records:
        cpus = record.plan.leased()
        owner = (f", owner pid {record.owner_pid}" if record.owner_pid is not None else "") + \
            (" (a pid of another PID namespace, not of this one)"
             if record.owner_elsewhere else "")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        desc = f"{cpus} ({_roles(dict(record.plan.leases))})" if cpus else "no leases (shared)"
        off = offline(record)
        warn = (f"; {off.named()} OFFLINE (lease kept; bring "
                f"{'it' if len(off) == 1 else 'them'} online with '{_online_hint(off)}')"
                if off else "")
        missing = absent(record)
        if missing:
            # (not "OFFLINE … bring it online": there is no such CPU to bring online)
            warn += (f"; {missing.named()} NOT ON THIS HOST (the lease database names "
                     f"{'a CPU' if len(missing) == 1 else 'CPUs'} this host does not have: "
                     f"another host's database, or a CPU removed); "
                     f"`{release_command(record.ref)}` frees the lease")
        if gone(record):
            warn += ("; OWNER GONE: its CPUs are freed at the next start or change "
                     "('pinwarden sync' frees them now)")
        left = heirs.get(record.ref)
        if left:
            pids = ", ".join(map(str, left))
            warn += (f"; its command exited, processes it started still run there (pid "
                     f"{pids}): the lease is theirs until they exit"
                     if record.ref.driver == JOB_DRIVER else
                     f"; owner pid {record.owner_pid} is gone, but the domain still runs in "
                     f"its group (pid {pids}): the lease is its own again at the next change")
        found = invalid.get((record.ref.driver, record.ref.key), Invalid(None, None))
        if found.unseen:
            warn += (f"; group /{(record.cgroup or '').strip('/')} not checked (out of "
                     f"view: this cgroup namespace shows only part of the cpuset "
                     f"hierarchy; run 'pinwarden status' on the host)")
        if found.gone:
            warn += (f"; GROUP MISSING (its cgroup /{(record.cgroup or '').strip('/')} was "
                     f"removed by hand: the kernel no longer keeps others off its CPUs); "
                     f"'pinwarden sync' makes it again (renamed by hand instead, it still "
                     f"holds them, and sync names it: give it its name back)")
        if found.partition == NOT_EXCLUSIVE:
            warn += ("; NOT EXCLUSIVE (its cpuset.cpu_exclusive reads 0, somebody turned "
                     "it off): the kernel no longer keeps other cgroups off its CPUs; "
                     "'pinwarden sync' turns it on again once no other cgroup names them "
                     "('pinwarden audit' finds any that does)")
        elif found.partition is not None:
            # an offline leased CPU: the kernel makes it valid again itself once the CPU
            # is back (lab: cli.offline), and a sync cannot before
            fix = (f"the kernel makes it valid again once {off.named()} "
                   f"{'is' if len(off) == 1 else 'are'} online" if off else
                   "'pinwarden sync' makes it valid again")
            warn += (f"; PARTITION INVALID (the kernel reads {found.partition!r}): its CPUs "
                     f"are not kept exclusive; {fix}")
        if found.off_lease is not None:
            lacks = found.off_lease
            group = f"/{(record.cgroup or '').strip('/')}"
            warn += (f"; OFF ITS LEASE (its group {group} lacks {lacks.named()}, "
                     f"changed by hand: what runs there runs elsewhere, and "
                     f"{'that CPU idles' if len(lacks) == 1 else 'those CPUs idle'}); "
                     f"'pinwarden sync' puts it back on its lease")
        lines.append(f"  {record.ref}: {desc}; since {since}{owner}{warn}")
    if kept_by:
        lines.append("kept without a lease (after 'release --force', or in a holder group the "
                     "lease database does not record): their processes still run there, and "
                     "no plan may take the CPUs until they end:")
    for ref, held in kept_by.items():
        lines.append(f"  {kept_text(ref, CpuSet.of(x.cpu for x in held), held[0].owner_pid)}")
    if pins:
        lines.append("shared domains re-pinned off leased CPUs (each gets its CPUs back once "
                     "they are free; one saved meanwhile, when it is restored):")
    for n in pins:
        wait = (f"; {n.waiting.named()} free again, not given back yet (the daemon's next "
                f"pass, 'pinwarden sync' or 'pinwarden stop' gives "
                f"{'it' if len(n.waiting) == 1 else 'them'} "
                f"back)" if n.waiting else "")
        lines.append(f"  {printable(n.domain)} {n.label}: pinned to {n.pin} (had {n.had})"
                     f"{wait}")
    lines.append(render_cpu_map(host, (*leases, *kept)))
    print("\n".join(lines))
    return 0
