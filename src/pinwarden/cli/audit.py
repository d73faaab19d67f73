"""``pinwarden audit``: can anything else run on an exclusively leased CPU?

Exit status: 0 clean (or warnings only), 1 when another VM's thread or VM cgroup can run on a
CPU leased to someone else (with ``--strict`` also on host tasks and IRQs), 2 when the audit
could not be made (no /proc, an unreadable lease database, a bad configuration: the error
on stderr, and as a JSON error object with ``--json``), when part of it could not be (no
cpuset cgroup readable, or only part of the hierarchy from a cgroup namespace, while
holders have groups: the report says what, status ``incomplete``) or the command line is
wrong.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pinwarden.cli import fail, print_json
from pinwarden.cli.common import config_of, manager_of, root_of
from pinwarden.errors import PinwardenError

if TYPE_CHECKING:  # the handler imports what it uses: the parser of every command is cheap
    from pinwarden import audit
    from pinwarden.ledger import HolderRecord
    from pinwarden.model import HolderRef, Lease

#: Warning rows shown without --all.
WARNING_ROWS = 20
#: Exit status when the audit could not be made (1 means intruders).
EXIT_NOT_CHECKED = 2


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "audit", parents=[common],
        help="find threads, VM cgroups and IRQs that can run on leased CPUs",
        description="Check every thread, cpuset cgroup and IRQ on the host against the "
                    "exclusive leases. Exit 0 clean, 1 when another VM can run on a leased "
                    "CPU, 2 when the audit (or part of it) could not be made.")
    parser.add_argument("--strict", action="store_true",
                        help="also exit 1 on host tasks and IRQs allowed on leased CPUs")
    parser.add_argument("--all", action="store_true",
                        help=f"list every warning (default: the first {WARNING_ROWS})")
    parser.set_defaults(handler=run, output_lost_status=EXIT_NOT_CHECKED)


def load_ledger(args: argparse.Namespace) -> tuple[tuple[Lease, ...], tuple[HolderRecord, ...],
                                                    tuple[str, ...], frozenset[str],
                                                    tuple[str, ...]]:
    """Leases and holders of live owners, the noise the kernel refused to move, and the
    groups kept by forced releases (whether their holders still run is read from the
    groups); no database yet means no leases (read only)."""
    from pinwarden.cpuset import CpuSet
    from pinwarden.ledger import DB_NAME
    from pinwarden.manager import KEPT_PREFIX
    from pinwarden.model import by_holder, kept_text

    with manager_of(args) as manager, manager.snapshot():
        kept_groups = tuple(sorted(k.removeprefix(KEPT_PREFIX)
                                   for k in manager.change_records(KEPT_PREFIX)))
        # a holder freed by 'release --force' that runs on keeps its CPUs, and so does a
        # domain in a holder group the database does not record: checked as its (its
        # group is no stale one, and whatever else runs there intrudes)
        kept = manager.kept_leases()
        notes = tuple(kept_text(ref, CpuSet.of(x.cpu for x in held), held[0].owner_pid)
                      for ref, held in by_holder(kept).items())
        if manager.reader() is None:
            return kept, (), (f"no lease database at {manager.state_dir / DB_NAME}: nothing "
                              f"is leased", *notes), frozenset(), ()
        owners = manager.owners_gone()
        return (*manager.leases(owners=owners), *kept), manager.live_holders(owners), \
            notes, manager.refused_noise(), kept_groups


def run(args: argparse.Namespace) -> int:
    try:
        return _audit(args)
    except PinwardenError as exc:  # could not check: not the same as "intruders found"
        fail(args, exc)
        return EXIT_NOT_CHECKED


def _audit(args: argparse.Namespace) -> int:
    from pinwarden import audit
    from pinwarden.record import replace

    config = config_of(args)
    leases, holders, notes, refused, kept_groups = load_ledger(args)
    snapshot = audit.scan(root_of(args))
    partitions = tuple(dict.fromkeys((config.cgroup_v1, config.cgroup_v2,
                                      *audit.DEFAULT_VM_PARTITIONS)))
    exclusive = tuple(dict.fromkeys((config.exclusive_cgroup,
                                     *audit.DEFAULT_HOLDER_STEMS)))
    report = audit.audit(snapshot, leases, holders, vm_partitions=partitions,
                         holder_stems=exclusive, isolating=config.isolate_noise,
                         refused=refused)
    if notes:
        report = replace(report, notes=(*report.notes, *notes))
    unseen = snapshot.groups_unseen
    if kept_groups and unseen is not None:  # (their CPUs vanished from the leases: hunt N)
        report = replace(report, unchecked=(*report.unchecked, (
            f"the CPUs kept by a forced release in {', '.join(f'/{g}' for g in kept_groups)}"
            f": whether anything still runs there is read from the group, and {unseen}")))
    if args.json:
        print_json(report.to_json())
    else:
        print(render(report, show_all=args.all))
    return report.exit_status(strict=args.strict)


def _holder(ref: HolderRef | None) -> str:
    return "-" if ref is None else f"{ref.driver}:{ref.name}"


def render(report: audit.Report, *, show_all: bool = False) -> str:
    """The verdict line, then a table of intruders (errors first)."""
    lines = [f"audit: {report.verdict()}"]
    lines += [f"not checked: {n}" for n in report.unchecked]
    lines += [f"note: {n}" for n in report.notes]
    if not report.intruders:
        return "\n".join(lines)
    rows = list(report.errors)
    warnings = report.warnings
    shown = warnings if show_all else warnings[:WARNING_ROWS]
    rows += shown
    table = [("SEVERITY", "KIND", "PID", "TID", "NAME", "CGROUP/IRQ", "LEASED CPUS", "LEASED TO",
              "BELONGS TO")]
    for i in rows:
        where = f"irq {i.irq}" if i.irq is not None else (i.cgroup or "-")
        name = f"[{i.name}]" if i.kernel else i.name
        table.append((i.severity, i.kind, str(i.pid or "-"), str(i.tid or "-"), name, where,
                      str(i.cpus), ",".join(_holder(h) for h in i.holders), _holder(i.owner)))
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for r in table:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    if len(shown) < len(warnings):
        lines.append(f"… {len(warnings) - len(shown)} more warnings (--all or --json lists "
                     f"them)")
    # (a host-task that is a kernel thread gets the "kernel" hint, not the cgroup v1 one:
    # that advice was printed on cgroup v2 hosts booted with isolcpus= already — hunt)
    present = {i.kind for i in report.intruders if not (i.kind == "host-task" and i.kernel)}
    kernel = any(i.kernel for i in report.intruders)
    lines += [f"hint: {text}" for kind, text in HINTS if kind in present
              or (kind == "kernel" and kernel)]
    return "\n".join([*lines, *render_unmovable(report)])


def render_unmovable(report: audit.Report) -> list[str]:
    """Noise nothing can move at run time, and the boot parameter that would."""
    if not report.unmovable:
        return []
    lines = ["noise on leased CPUs that cannot move at run time (fixed at boot):"]
    for f in report.unmovable:
        lines.append(f"  {f.cpus.named()}: {f.what} — boot with {f.boot_param}")
    return lines


#: What to do about each kind of intruder (shown once per kind present).
HINTS = (
    ("invalid-partition", "the kernel no longer keeps a holder's CPUs exclusive (a sibling "
                          "cgroup took its CPUs, maybe given back since): 'pinwarden sync' "
                          "makes the partition valid again, and 'pinwarden daemon' does so "
                          "as soon as it happens"),
    ("not-exclusive", "a holder's cgroup v1 group has cpu_exclusive 0 (somebody turned it "
                      "off): the kernel no longer keeps other cgroups off its CPUs, and the "
                      "next change of a sibling's cpuset.cpus may take them; 'pinwarden "
                      "sync' turns it on again (and narrows the group if it was widened) "
                      "once no other cgroup names them"),
    ("off-lease", "a holder's group lacks CPUs leased to it (its cpuset.cpus was changed "
                  "by hand): it runs elsewhere and its leased CPUs idle; 'pinwarden sync' "
                  "puts it back on its lease"),
    ("strayed-thread", "a holder's thread runs outside its group (moved out by hand or "
                       "by a rules daemon), on CPUs not leased to it, while its leased "
                       "CPUs idle: move it back (cgroup v1: echo TID > "
                       "/sys/fs/cgroup/cpuset/GROUP/tasks, for a domain its vcpuN or "
                       "emulator group below the holder group; cgroup v2: echo PID > "
                       "GROUP/cgroup.procs) or restart it"),
    ("missing-group", "a holder's group is gone (removed by hand): nothing keeps other "
                      "cgroups off its CPUs; 'pinwarden sync' makes it again (renamed by "
                      "hand instead, it still holds them, and sync names it: give it its "
                      "name back)"),
    ("vm-cgroup-pin", "a shared VM's thread cgroup names a leased CPU the kernel keeps it "
                      "off for now (a 'virsh vcpupin/emulatorpin --live' onto it that "
                      "libvirt refused after writing the cgroup): once the lease ends that "
                      "thread runs there alone; re-pin it where it may run ('virsh "
                      "vcpupin DOMAIN VCPU CPUS --live')"),
    ("stale-holder-group", "a holder group no holder has (a release was interrupted) keeps "
                           "its CPUs from the VMs: 'pinwarden sync' removes it"),
    ("other-vm-thread", "another VM can run on a leased CPU: start VMs through "
                        "'pinwarden start' or the libvirt hook ('pinwarden hook install'), or "
                        "re-apply the layout with 'pinwarden daemon --once'"),
    ("vm-cgroup", "a VM cgroup includes leased CPUs: the shared VM partition must be "
                  "'VM CPUs − leased' (see DEVELOPERS.md, cgroup layout)"),
    ("escaped-task", "tasks outside the holders can run on leased CPUs: their cgroup names "
                     "leased CPUs in its cpuset.cpus (on cgroup v2 that also invalidates the "
                     "holder's partition); 'pinwarden sync' narrows it, and 'pinwarden "
                     "daemon' does so as soon as it happens (on cgroup v1, where only a "
                     "holder group with cpu_exclusive turned off lets it, write the leased "
                     "CPUs out of that cgroup's cpuset.cpus first: sync refuses to take "
                     "them back from it)"),
    ("host-task", "tasks in the cgroup v1 root cpuset may use leased CPUs: boot with "
                  "isolcpus= (partition mode isolcpus) to keep the OS on its housekeeping "
                  "CPUs"),
    ("isolcpus-host-task", "host threads may run on isolcpus= CPUs besides the "
                           "housekeeping ones (a cpuset change gave them their cgroup's "
                           "CPUs, as Linux 6.1 does when the cpuset controller is enabled "
                           "or disabled): 'taskset -a -p -c HOUSEKEEPING PID' (the CPUs not in "
                           "/sys/devices/system/cpu/isolated) puts each "
                           "process back; the shared VMs share those CPUs with them until "
                           "then"),
    ("workqueue", "unbound kernel work or new IRQs may use leased CPUs: 'pinwarden sync' "
                  "moves them ([isolation] noise = true), or write the housekeeping CPUs' "
                  "mask to /sys/devices/virtual/workqueue/cpumask and "
                  "/proc/irq/default_smp_affinity"),
    ("kernel", "unbound kernel workers: write the housekeeping CPUs' mask to "
               "/sys/devices/virtual/workqueue/cpumask"),
    ("irq", "IRQs: write the housekeeping CPUs to /proc/irq/*/smp_affinity_list and "
            "/proc/irq/default_smp_affinity (or boot with irqaffinity=)"),
)
