"""Where libvirt + machined put domains, what systemd's D-Bus cpuset API does, and how a
cgroup v2 partition written behind systemd's back fares (FACTS.md 1-5, 8)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from guestlab import (
    CG,
    Data,
    Domain,
    LibvirtLog,
    WriteWatch,
    cg,
    cg_files,
    cg_write,
    check,
    daemon_reload,
    get_property,
    observe_domain,
    pw_python,
    read,
    restart_libvirtd,
    run,
    set_unit_cpus,
    start_transient_slice,
    stop_unit,
    systemctl,
    unit_show,
)

PW = "pinwarden.slice"
VM_A = "pinwarden-vm\\x2dA.slice"  # what libvirt makes of <partition>/pinwarden/vm-A
VM_A_PATH = f"{PW}/{VM_A}"
SLICE_IFACE = "org.freedesktop.systemd1.Slice"
SLICE_PROPS = ("LoadState", "ActiveState", "Transient", "FragmentPath", "ControlGroup",
               "AllowedCPUs", "EffectiveCPUs", "Slice")
LOG_RX = re.compile(r"Set value|[Ss]ystemd|[Mm]achine|slice|scope|[Pp]artition")


def _libvirt_lines(logger: LibvirtLog) -> list[str]:
    return [line for line in logger.take() if LOG_RX.search(line)][-300:]


def _scope_unit(cgroup: str) -> str:
    """The unit a QEMU process's cgroup belongs to (``…/machine-qemu…scope/libvirt/…``)."""
    for part in cgroup.strip("/").split("/"):
        if part.endswith(".scope"):
            return part
    return ""


def _start_observed(dom: Domain, logger: LibvirtLog) -> Data:
    data: Data = {**dom.data}
    if dom.running:
        time.sleep(1.0)
        obs = observe_domain(dom.name)
        data["observed"] = obs
        scope = _scope_unit(obs.get("cgroup") or "")
        data["scope"] = scope
        data["scope_unit"] = unit_show(scope, "Slice", "ControlGroup", "Delegate",
                                       "AllowedCPUs", "EffectiveCPUs", "Transient") \
            if scope else {}
        data["machinectl"] = run(["machinectl", "list", "--no-legend", "--no-pager"])
    data["libvirt_log"] = _libvirt_lines(logger)
    return data


@check("domain_layout", needs=["boot"])
def domain_layout() -> Data:
    """FACTS 1 and 5: a 2-vCPU domain with no pins — its cgroups, what libvirt wrote, and
    the affinity of its threads (the guest boots with isolcpus=3)."""
    logger = LibvirtLog()
    with Domain("pwtest-a", vcpus=2) as dom:
        data = _start_observed(dom, logger)
        data["machine_slice"] = cg_files("machine.slice")
        data["root"] = cg_files("")
        if not dom.running:
            raise RuntimeError(f"pwtest-a did not start: {dom.data}")
        data["dumpxml"] = run(["virsh", "dumpxml", "pwtest-a"])["stdout"]
    data["after_destroy"] = {
        "scope": unit_show(data.get("scope", ""), "LoadState", "ActiveState")
        if data.get("scope") else {},
        "machine_slice_children": sorted(p.name for p in (CG / "machine.slice").iterdir()
                                         if p.is_dir()),
        "libvirt_log": _libvirt_lines(logger),
    }
    return data


def _slices() -> Data:
    return {u: unit_show(u, *SLICE_PROPS) for u in (PW, VM_A)}


def _stop_pw_slices() -> Data:
    return {VM_A: stop_unit(VM_A), PW: stop_unit(PW)}


@check("partition_domain", needs=["boot"])
def partition_domain() -> Data:
    """FACTS 2: <resource><partition>/pinwarden/vm-A</partition>: which slice libvirt and
    machined use, whether it must exist first, and inside a pre-made transient slice
    with AllowedCPUs."""
    out: Data = {"before": _slices()}
    logger = LibvirtLog()
    # a) nothing exists yet
    with Domain("pwtest-pa", vcpus=1, partition="/pinwarden/vm-A") as dom:
        out["implicit"] = _start_observed(dom, logger)
        out["implicit"]["slices_while_running"] = _slices()
    out["implicit"]["slices_after_destroy"] = _slices()
    out["implicit"]["stop"] = _stop_pw_slices()
    # b) transient slices made first, through D-Bus, with AllowedCPUs
    out["transient"] = {"make": {PW: start_transient_slice(PW, "1-2"),
                                 VM_A: start_transient_slice(VM_A, "2")}}
    try:
        with Domain("pwtest-pb", vcpus=1, partition="/pinwarden/vm-A") as dom:
            out["transient"].update(_start_observed(dom, logger))
            out["transient"]["groups"] = {p: cg_files(p) for p in (PW, VM_A_PATH)}
    finally:
        out["transient"]["stop"] = _stop_pw_slices()
    # c) pinwarden's cgroup-v1 naming (.partition suffixes) on a systemd host
    with Domain("pwtest-pc", vcpus=1, partition="/pinwarden.partition/vm-A.partition") as dom:
        out["dotted"] = _start_observed(dom, logger)
    units = run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "pinwarden*"])
    out["dotted"]["units"] = units["stdout"]
    for unit in units["stdout"].split():
        if unit.endswith(".slice"):
            stop_unit(unit)
    out["after"] = _slices()
    return out


@check("dbus_set", needs=["boot"])
def dbus_set() -> Data:
    """FACTS 3: SetUnitProperties(runtime=true, AllowedCPUs=…) on machine.slice and on
    transient slices; what lands in cgroupfs and in /run/systemd/system.control."""
    out: Data = {"machine_before": cg_files("machine.slice"), "root_before": cg_files("")}
    try:
        out["set_machine"] = set_unit_cpus("machine.slice", "0-1")
        out["machine_after"] = cg_files("machine.slice")
        out["root_after"] = cg_files("")
        out["machine_show"] = unit_show("machine.slice", "AllowedCPUs", "EffectiveCPUs",
                                        "StartupAllowedCPUs", "AllowedMemoryNodes",
                                        "EffectiveMemoryNodes")
        out["machine_effective_dbus"] = get_property("machine.slice", SLICE_IFACE,
                                                     "EffectiveCPUs")
        dropins = Path("/run/systemd/system.control/machine.slice.d")
        out["dropins"] = {p.name: read(p) for p in sorted(dropins.glob("*"))} \
            if dropins.is_dir() else {}
        out["set_startup"] = set_unit_cpus("machine.slice", "0", prop="StartupAllowedCPUs")
        out["machine_after_startup"] = cg_files("machine.slice")
        out["reset_machine"] = set_unit_cpus("machine.slice", "")
        out["reset_startup"] = set_unit_cpus("machine.slice", "", prop="StartupAllowedCPUs")
        out["machine_after_reset"] = cg_files("machine.slice")
        out["machine_show_after_reset"] = unit_show("machine.slice", "AllowedCPUs",
                                                    "EffectiveCPUs")
        out["make_pw"] = start_transient_slice(PW, "1-2")
        out["make_vm_a"] = start_transient_slice(VM_A, "2")
        out["pw_groups"] = {p: cg_files(p) for p in (PW, VM_A_PATH)}
        out["root_with_pw"] = cg_files("")
        out["set_vm_a"] = set_unit_cpus(VM_A, "1")
        out["vm_a_after_set"] = cg_files(VM_A_PATH)
        out["set_vm_a_outside"] = set_unit_cpus(VM_A, "3")
        out["vm_a_outside"] = cg_files(VM_A_PATH)
        out["vm_a_outside_show"] = unit_show(VM_A, "AllowedCPUs", "EffectiveCPUs")
        out["set_mems"] = set_unit_cpus(PW, "0", prop="AllowedMemoryNodes")
        out["pw_mems"] = cg_files(PW)
        out["pw_show"] = unit_show(PW, "AllowedCPUs", "EffectiveCPUs", "AllowedMemoryNodes",
                                   "EffectiveMemoryNodes", "Transient")
        out["stop_parent_with_child"] = unit_show(VM_A, "ActiveState")
    finally:
        out["stop"] = _stop_pw_slices()
        out["revert"] = systemctl("revert", "machine.slice")
        out["machine_final"] = cg_files("machine.slice")
        out["machine_show_final"] = unit_show("machine.slice", "AllowedCPUs",
                                              "StartupAllowedCPUs")
    return out


#: FACTS 3b: whether the kernel file holds a slice's AllowedCPUs as soon as systemd has
#: answered SetUnitProperties (pinwarden's next write may go to the kernel directly and
#: depend on it: a holder partition switched on beside the slice).
SET_SYNC_PROBE = r"""
import json, time
from pathlib import Path
from pinwarden.cpuset import CpuSet
from pinwarden.enforce.systemd import SystemdBus
bus = SystemdBus.connect()
file = Path("/sys/fs/cgroup/UNIT/cpuset.cpus")
def now():
    return CpuSet.parse_kernel(file.read_text().strip())
late, waits = 0, []
for i in range(ROUNDS):
    want = CpuSet.parse_kernel("0-2" if i % 2 else "0-3")
    bus.set_unit_properties("UNIT", True, [("AllowedCPUs", ("ay", want.to_dbus()))])
    began = time.monotonic()
    if now() != want:
        late += 1
        while now() != want and time.monotonic() - began < 5:
            time.sleep(0.0005)
        waits.append(round(time.monotonic() - began, 6))
print(json.dumps({"rounds": ROUNDS, "late": late, "waits": waits}))
"""
SYNC_SLICE = "pwtestsync.slice"


@check("dbus_set_sync", needs=["install"])
def dbus_set_sync() -> Data:
    """FACTS 3b: systemd writes a slice's cgroup before it answers SetUnitProperties."""
    out: Data = {}
    try:
        out["make"] = start_transient_slice(SYNC_SLICE, "0-3")
        out["probe"] = pw_python(SET_SYNC_PROBE.replace("ROUNDS", "100")
                                 .replace("UNIT", SYNC_SLICE))
    finally:
        out["stop"] = stop_unit(SYNC_SLICE)
        out["left"] = (CG / SYNC_SLICE).exists()
    return out


WATCHED = ("cpuset.cpus", "cpuset.cpus.partition", "cpuset.mems")
DUMMY = Path("/run/systemd/system/pwtest-dummy.service")


def _snapshot(watch: WriteWatch | None) -> Data:
    groups = {p: {n: cg(p, n) for n in ("cpuset.cpus", "cpuset.cpus.effective",
                                        "cpuset.cpus.partition")}
              for p in (PW, VM_A_PATH, "machine.slice", "system.slice", "user.slice",
                        "init.scope")}
    groups["/"] = {"cpuset.cpus.effective": cg("", "cpuset.cpus.effective"),
                   "cgroup.subtree_control": cg("", "cgroup.subtree_control")}
    snap: Data = {
        "groups": groups,
        "dbus": {u: unit_show(u, "AllowedCPUs", "EffectiveCPUs")
                 for u in (PW, VM_A, "machine.slice")},
    }
    if watch is not None:
        snap["writes"] = watch.take(settle=1.5)
    return snap


def _step(steps: list[Data], name: str, result: Data | None,
          watch: WriteWatch | None) -> None:
    steps.append({"step": name, "result": result, **_snapshot(watch)})


def _pw_backend_read() -> Data:
    """pinwarden's own systemd backend reading the slices (FACTS 4: the read-back that
    failed on 252/6.1)."""
    code = (
        "import json\n"
        "out = {}\n"
        "try:\n"
        "    from pinwarden.enforce.systemd import open_backend\n"
        "    b = open_backend()\n"
        "except Exception as e:\n"
        "    print(json.dumps({'open': repr(e)})); raise SystemExit(0)\n"
        f"for p in ({PW!r}, {VM_A_PATH!r}, 'machine.slice'):\n"
        "    try:\n"
        "        s = b.read_group(p)\n"
        "        out[p] = {'cpus': s.cpus.to_list(), 'effective': s.effective_cpus.to_list(),\n"
        "                  'partition': s.partition, 'error': s.partition_error,\n"
        "                  'children': list(s.children)}\n"
        "    except Exception as e:\n"
        "        out[p] = {'raised': repr(e)}\n"
        "print(json.dumps(out))\n")
    return pw_python(code)


@check("partition_write", needs=["boot"])
def partition_write() -> Data:
    """FACTS 4: cpuset.cpus.partition=root written in cgroupfs on a slice whose AllowedCPUs
    systemd set, and what systemd does to it afterwards."""
    steps: list[Data] = []
    out: Data = {"steps": steps}
    DUMMY.write_text("[Service]\nExecStart=/bin/sleep infinity\n")
    try:
        daemon_reload()
        systemctl("start", DUMMY.name)
        out["setup"] = {"machine": set_unit_cpus("machine.slice", "0"),
                        PW: start_transient_slice(PW, "1-2"),
                        VM_A: start_transient_slice(VM_A, "2")}
        files = [CG / g / n for g in (PW, VM_A_PATH, "machine.slice") for n in WATCHED]
        with WriteWatch(files) as watch:
            _step(steps, "baseline", None, watch)
            out["selftest_write"] = cg_write(PW, "cpuset.mems", cg(PW, "cpuset.mems") or "0")
            out["selftest_events"] = watch.take()
            _step(steps, "write_root", cg_write(PW, "cpuset.cpus.partition", "root"), watch)
            _step(steps, "daemon_reload", daemon_reload(), watch)
            _step(steps, "restart_unrelated_service", systemctl("restart", DUMMY.name), watch)
            _step(steps, "set_property_user_slice_cpuweight",
                  systemctl("set-property", "--runtime", "user.slice", "CPUWeight=50"), watch)
            _step(steps, "set_property_system_slice_allowedcpus",
                  systemctl("set-property", "--runtime", "system.slice", "AllowedCPUs=0"),
                  watch)
            _step(steps, "set_property_same_slice_same_cpus",
                  systemctl("set-property", "--runtime", PW, "AllowedCPUs=1-2"), watch)
            _step(steps, "restart_libvirtd", restart_libvirtd(), watch)
            # a sibling told to overlap the partition, then told back
            _step(steps, "machine_slice_overlaps",
                  systemctl("set-property", "--runtime", "machine.slice", "AllowedCPUs=0-1"),
                  watch)
            _step(steps, "machine_slice_back",
                  systemctl("set-property", "--runtime", "machine.slice", "AllowedCPUs=0"),
                  watch)
            _step(steps, "rewrite_member_root",
                  {"member": cg_write(PW, "cpuset.cpus.partition", "member"),
                   "root": cg_write(PW, "cpuset.cpus.partition", "root")}, watch)
            # the child takes every CPU of the parent
            _step(steps, "child_allowedcpus_all", set_unit_cpus(VM_A, "1-2"), watch)
            _step(steps, "child_root",
                  cg_write(VM_A_PATH, "cpuset.cpus.partition", "root"), watch)
            out["effective_dbus_child_all"] = {
                u: get_property(u, SLICE_IFACE, "EffectiveCPUs") for u in (PW, VM_A)}
            # which D-Bus property lists a slice's child slices (pinwarden reads ConsistsOf)
            out["slice_relations"] = unit_show(PW, "ConsistsOf", "SliceOf", "Requires",
                                               "Wants", "RequiredBy", "WantedBy")
            out["pinwarden_read"] = _pw_backend_read()
            _step(steps, "daemon_reload_2", daemon_reload(), watch)
            logger = LibvirtLog()
            with Domain("pwtest-pw", vcpus=1, partition="/pinwarden/vm-A") as dom:
                out["domain_in_child"] = _start_observed(dom, logger)
                _step(steps, "domain_running", None, watch)
            _step(steps, "domain_gone", None, watch)
            _step(steps, "stop_child_slice", stop_unit(VM_A), watch)
    finally:
        out["cleanup"] = {
            "child_member": cg_write(VM_A_PATH, "cpuset.cpus.partition", "member"),
            "member": cg_write(PW, "cpuset.cpus.partition", "member"),
            "stop": _stop_pw_slices(),
            "dummy": systemctl("stop", DUMMY.name),
            "revert": systemctl("revert", "machine.slice", "system.slice", "user.slice"),
        }
        DUMMY.unlink(missing_ok=True)
        daemon_reload()
        out["final"] = _snapshot(None)
    out["summary"] = [{"step": s["step"],
                       "pw": s["groups"][PW]["cpuset.cpus.partition"],
                       "pw_cpus": s["groups"][PW]["cpuset.cpus"],
                       "pw_eff": s["groups"][PW]["cpuset.cpus.effective"],
                       "writes": s.get("writes")} for s in steps]
    print(json.dumps(out["summary"], indent=None), flush=True)
    return out
