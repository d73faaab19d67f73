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
from typing import Any

from pinwarden import policy
from pinwarden.cli import print_json
from pinwarden.cli.common import config_of, root_of, state_dir_of
from pinwarden.cpuset import CpuSet
from pinwarden.domain import MAX_XML_BYTES, DomainSpec, parse_domain, render_plan
from pinwarden.enforce.layout import LayoutNames, libvirt_partition
from pinwarden.errors import InputError
from pinwarden.jsonout import timestamp
from pinwarden.ledger import DB_NAME, HolderRecord, Ledger
from pinwarden.model import HolderRef, Lease, Plan
from pinwarden.partition import Host, Partition, load_host, shared_pool
from pinwarden.view import render_cpu_map


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
    parser.set_defaults(handler=run_release)

    parser = subparsers.add_parser(
        "status", parents=[common], help="show leases, the partition and a CPU map",
        description="List every holder's leases (dead owners reaped), the host partition "
                    "and which CPU is used how.")
    parser.set_defaults(handler=run_status)


# -- input --------------------------------------------------------------------------------


def read_xml(source: str) -> bytes:
    """The XML document at ``source`` (``-``: stdin), at most one byte over the limit."""
    try:
        if source == "-":
            return sys.stdin.buffer.read(MAX_XML_BYTES + 1)
        with Path(source).open("rb") as handle:
            return handle.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read domain XML {source}: "
                         f"{exc.strerror or exc}") from None


def holder_of(spec: DomainSpec) -> HolderRef:
    driver = "lxc" if spec.domain_type == "lxc" else "qemu"
    return HolderRef(driver=driver, key=spec.key, name=spec.name)


def _ledger_leases(state: Path) -> tuple[Lease, ...]:
    """Current leases (dead owners reaped); no database yet means none."""
    if not (state / DB_NAME).exists():
        return ()
    with Ledger(state) as ledger:
        return ledger.leases()


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


def _roles(leases: dict[int, str]) -> str:
    return ", ".join(f"{cpu} {role}" for cpu, role in sorted(leases.items()))


def render_plan_text(plan: Plan, host: Host, *, recorded: bool) -> str:
    kind = "exclusive" if plan.exclusive else "shared"
    part = host.partition
    lines = [f"domain {plan.domain} ({kind}); partition {part.mode}: VM CPUs {part.vm_cpus}, "
             f"housekeeping {part.host_cpus}"]
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


def _emit_partition(args: argparse.Namespace, plan: Plan, holder: HolderRef) -> str | None:
    """The libvirt ``<partition>`` of an exclusive domain's cgroup, per the config."""
    if not plan.exclusive:
        return None
    config = config_of(args)
    try:
        return libvirt_partition(LayoutNames(shared=config.cgroup_v1,
                                             exclusive=config.exclusive_cgroup), holder)
    except ValueError:
        return None


def _report(args: argparse.Namespace, xml: bytes, spec: DomainSpec, plan: Plan, host: Host,
            holder: HolderRef, *, recorded: bool) -> int:
    rendered = None
    if args.emit_xml:
        rendered = render_plan(xml, plan, partition=_emit_partition(args, plan, holder))
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
    xml = read_xml(args.xml)
    spec = parse_domain(xml)
    holder = holder_of(spec)
    host = load_host(root_of(args), config_of(args))
    leases = _ledger_leases(state_dir_of(args))
    plan = policy.decide(spec, host, leases, driver=holder.driver)
    return _report(args, xml, spec, plan, host, holder, recorded=False)


def run_reserve(args: argparse.Namespace) -> int:
    xml = read_xml(args.xml)
    spec = parse_domain(xml)
    holder = holder_of(spec)
    host = load_host(root_of(args), config_of(args))
    with Ledger(state_dir_of(args)) as ledger:
        plan = ledger.reserve(
            holder, lambda leases: policy.decide(spec, host, leases, driver=holder.driver))
    return _report(args, xml, spec, plan, host, holder, recorded=True)


def holder_json(record: HolderRecord) -> dict[str, Any]:
    plan = record.plan
    return {
        "domain": record.ref.name,
        "uuid": plan.uuid,
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
    with Ledger(state_dir_of(args)) as ledger:
        record = ledger.release(args.selector, driver=args.driver)
    if args.json:
        print_json({"released": holder_json(record)})
    else:
        cpus = record.plan.leased()
        what = f"CPUs {cpus} freed" if cpus else "it held no CPUs"
        print(f"released {record.ref}: {what}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    host = load_host(root_of(args), config_of(args))
    state = state_dir_of(args)
    records: tuple[HolderRecord, ...] = ()
    leases: tuple[Lease, ...] = ()
    if (state / DB_NAME).exists():
        with Ledger(state) as ledger:
            records = ledger.holders()
            leases = ledger.leases(reap=False)
    part = host.partition
    leased = CpuSet.of(lease.cpu for lease in leases)
    shared, fallback = shared_pool(host, leased)
    online = host.topology.online

    def offline(record: HolderRecord) -> CpuSet:
        return record.plan.leased() - online

    if args.json:
        print_json({
            "leases": [{**holder_json(r), "offline": str(offline(r))} for r in records],
            "partition": _partition_json(part),
            "online": str(host.topology.online),
            "leased": str(leased),
            "shared": str(shared),
            "notes": list(fallback),
            "database": str(state / DB_NAME),
            "time": timestamp(time.time()),
        })
        return 0
    lines = [f"partition {part.mode}: VM CPUs {part.vm_cpus}, housekeeping {part.host_cpus}"
             f" ({part.reason})", f"leased {leased or '-'}; shared VM pool {shared or '-'}",
             *(f"note: {note}" for note in fallback)]
    if not records:
        lines.append("no holders")
    for record in records:
        cpus = record.plan.leased()
        owner = f", owner pid {record.owner_pid}" if record.owner_pid is not None else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        desc = f"{cpus} ({_roles(dict(record.plan.leases))})" if cpus else "no leases (shared)"
        gone = offline(record)
        warn = (f"; CPU {gone} OFFLINE (lease kept; bring it online with "
                f"'echo 1 > /sys/devices/system/cpu/cpu{gone.first()}/online')") if gone else ""
        lines.append(f"  {record.ref}: {desc}; since {since}{owner}{warn}")
    lines.append(render_cpu_map(host, leases))
    print("\n".join(lines))
    return 0


