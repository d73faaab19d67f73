"""The guest itself: pinwarden installed as an administrator would, the system up, and
what systemd's D-Bus API offers for cpusets (FACTS.md 3, 8)."""

from __future__ import annotations

import gzip
import os
import platform
import re
import sys
from pathlib import Path

import guestlab
from guestlab import (
    PINWARDEN,
    VENV,
    Data,
    affinity,
    busctl,
    cg_files,
    check,
    get_property,
    ok,
    pids_named,
    proc_cgroup,
    pw_python,
    read,
    run,
    security_label,
    set_unit_property,
    systemctl,
    unit_show,
    virsh,
    wait_for,
    wait_libvirt,
)

SLICE_IFACE = "org.freedesktop.systemd1.Slice"
CPU_PROPS = ("AllowedCPUs", "StartupAllowedCPUs", "EffectiveCPUs", "AllowedMemoryNodes",
             "StartupAllowedMemoryNodes", "EffectiveMemoryNodes", "CPUSetPartition")


@check("boot")
def boot() -> Data:
    """systemd finished booting, libvirtd.service answers."""
    running = run(["systemctl", "is-system-running", "--wait"], timeout=400)
    libvirt = wait_libvirt(300)
    failed = systemctl("list-units", "--failed", "--plain", "--no-legend")
    return {"is_system_running": running["stdout"].strip(), "libvirt": libvirt,
            "failed_units": failed["stdout"].strip(),
            "analyze": run(["systemd-analyze", "time"])["stdout"].strip(),
            "uptime": read("/proc/uptime")}


@check("install")
def install() -> Data:
    """pinwarden from the wheel, in a venv over the distribution's python3-libvirt, the
    way the README tells administrators; deps from the wheelhouse (the guest is offline)."""
    wheelhouse = guestlab.OUT / "wheelhouse"
    steps = [
        ok(run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)],
               timeout=300)),
        ok(run([str(VENV / "bin" / "pip"), "install", "--no-index", "--find-links",
                str(wheelhouse), "pinwarden"], timeout=600)),
        ok(run(["ln", "-sf", str(PINWARDEN), "/usr/local/bin/pinwarden"])),
    ]
    probe = ok(run([str(VENV / "bin" / "python"), "-c",
                    "import libvirt, pinwarden, sys; print(libvirt.__file__); "
                    "print(libvirt.getVersion()); print(pinwarden.__file__); "
                    "print(sys.version.split()[0])"]))
    return {"steps": steps, "wheels": sorted(p.name for p in wheelhouse.iterdir()),
            "probe": probe["stdout"].split("\n"),
            "help": run([str(PINWARDEN), "--help"])}


@check("env", needs=["boot"])
def env() -> Data:
    # Debian's libvirtd.service runs with --timeout 120: idle that long (a slow install
    # check before this one) it exits, and its sockets start it again on the next call
    version = virsh("version")["stdout"]
    libvirtd = pids_named("libvirtd")
    if not libvirtd:
        # it was on its way out as virsh connected (the bookworm lab found no libvirtd
        # once, in a full run): the next call starts it again
        version = virsh("version")["stdout"]
        libvirtd = wait_for(lambda: pids_named("libvirtd"), 30) or []
    machine = cg_files("machine.slice")
    return {
        "kernel": platform.release(),
        "cmdline": read("/proc/cmdline"),
        "online": read("/sys/devices/system/cpu/online"),
        "isolated": read("/sys/devices/system/cpu/isolated"),
        "python": platform.python_version(),
        "os_release": read("/etc/os-release"),
        "systemd_version": run(["systemctl", "--version"])["stdout"].split("\n")[0],
        "libvirt_version": version,
        "qemu_version": run(["/usr/bin/qemu-system-x86_64", "--version"])["stdout"],
        "pid1_cpus_allowed": affinity(1),
        "libvirtd": {"pids": libvirtd,
                     "cpus_allowed": affinity(libvirtd[0]) if libvirtd else None,
                     "cgroup": proc_cgroup(libvirtd[0]) if libvirtd else None,
                     "label": security_label(libvirtd[0]) if libvirtd else None},
        # the LSMs the kernel runs, the AppArmor profiles loaded (trixie installs apparmor,
        # bookworm does not) and the security driver libvirt's QEMU driver chose
        "lsm": read("/sys/kernel/security/lsm"),
        "apparmor_profiles": sorted(
            line for line in (read("/sys/kernel/security/apparmor/profiles") or "")
            .splitlines() if "libvirt" in line or "virt-aa-helper" in line),
        "secmodels": re.findall(r"<secmodel>\s*<model>([^<]*)</model>",
                                virsh("capabilities")["stdout"]),
        "root": cg_files(""),
        "machine_slice": machine,
        "system_slice": cg_files("system.slice"),
        "machined": systemctl("is-active", "systemd-machined.service")["stdout"].strip(),
        "libvirtd_unit": unit_show("libvirtd.service", "ActiveState", "ControlGroup",
                                   "FragmentPath", "TriggeredBy"),
        "cgroup_mounts": [line for line in (read("/proc/self/mountinfo") or "").splitlines()
                          if "cgroup" in line],
        "nested_kvm_device": os.path.exists("/dev/kvm"),
        "libvirt_log_dir": run(["ls", "-la", "/var/log/libvirt"])["stdout"],
        "libvirtd_journal": run(["journalctl", "--no-pager", "-b", "-u", "libvirtd.service",
                                 "-n", "40"])["stdout"],
    }


def _man_lines(pattern: str) -> list[str]:
    """Lines of systemd.resource-control(5) in the root matching ``pattern``."""
    for base in ("/usr/share/man/man5/systemd.resource-control.5.gz",):
        try:
            with gzip.open(base, "rt", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        rx = re.compile(pattern)
        return [line for line in text.splitlines() if rx.search(line)]
    return ["<no man page>"]


def _binaries_mentioning(word: bytes) -> list[str]:
    """Which of systemd's binaries and libraries contain ``word`` at all (a property that
    exists has its name compiled in)."""
    hits: list[str] = []
    cands = [Path("/usr/lib/systemd/systemd"), Path("/lib/systemd/systemd"),
             *Path("/usr/lib/x86_64-linux-gnu/systemd").glob("*.so"),
             *Path("/usr/lib/systemd").glob("libsystemd-shared-*.so"),
             *Path("/lib/systemd").glob("libsystemd-shared-*.so"),
             Path("/usr/bin/systemctl"), Path("/bin/systemctl")]
    seen: set[Path] = set()
    for path in cands:
        try:
            real = path.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            if word in real.read_bytes():
                hits.append(str(real))
        except OSError:
            continue
    return hits


#: The D-Bus error *names* systemd answers (busctl prints only the messages); jeepney is
#: pinwarden's own dependency, so the venv has it.
DBUS_ERROR_PROBE = """
import json
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import DBusErrorResponse
conn = open_dbus_connection(bus="SYSTEM")
mgr = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                  interface="org.freedesktop.systemd1.Manager")
unit = DBusAddress("/org/freedesktop/systemd1/unit/machine_2eslice",
                   bus_name="org.freedesktop.systemd1",
                   interface="org.freedesktop.DBus.Properties")
calls = {
    "Get(Slice.CPUSetPartition)": new_method_call(
        unit, "Get", "ss", ("org.freedesktop.systemd1.Slice", "CPUSetPartition")),
    "Get(Slice.EffectiveCPUs)": new_method_call(
        unit, "Get", "ss", ("org.freedesktop.systemd1.Slice", "EffectiveCPUs")),
    "SetUnitProperties(CPUSetPartition=root)": new_method_call(
        mgr, "SetUnitProperties", "sba(sv)",
        ("machine.slice", True, [("CPUSetPartition", ("s", "root"))])),
}
out = {}
for name, msg in calls.items():
    reply = conn.send_and_get_reply(msg, timeout=30)
    if reply.header.message_type.name == "error":
        out[name] = {"error": reply.header.fields.get(4), "message": list(reply.body)}
    else:
        out[name] = {"reply": repr(reply.body)}
print(json.dumps(out))
"""


@check("dbus_api", needs=["boot"])
def dbus_api() -> Data:
    """Which cpuset properties systemd's Slice interface has, what the CPUSetPartition
    question gets, and what the man page in the root documents."""
    introspect = busctl("introspect", "org.freedesktop.systemd1",
                        "/org/freedesktop/systemd1/unit/machine_2eslice", SLICE_IFACE)
    props: dict[str, str] = {}
    for line in introspect["stdout"].splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "property":
            props[fields[0].lstrip(".")] = " ".join(fields[2:])
    cpu_related = {k: v for k, v in props.items()
                   if re.search(r"CPU|Memory(Nodes)|Partition|Cpuset", k)}
    return {
        "introspect_rc": introspect["rc"],
        "introspect_error": introspect["stderr"],
        "slice_properties": sorted(props),
        "cpu_properties": cpu_related,
        "show_machine_slice": unit_show("machine.slice", *CPU_PROPS),
        "get_partition": get_property("machine.slice", SLICE_IFACE, "CPUSetPartition"),
        "set_partition": set_unit_property("machine.slice", "CPUSetPartition", "s", "root"),
        "set_property_cli": systemctl("set-property", "--runtime", "machine.slice",
                                      "CPUSetPartition=root"),
        "machine_slice_after": cg_files("machine.slice"),
        "man_cpuset_lines": _man_lines(r"AllowedCPUs|AllowedMemoryNodes|[Pp]artition="),
        "binaries_with_CPUSetPartition": _binaries_mentioning(b"CPUSetPartition"),
        "binaries_with_cpuset_cpus_partition": _binaries_mentioning(b"cpuset.cpus.partition"),
        "binaries_with_AllowedCPUs": _binaries_mentioning(b"AllowedCPUs"),
        "dbus_error_names": pw_python(DBUS_ERROR_PROBE) if PINWARDEN.exists() else None,
        "machined_up": wait_for(lambda: systemctl("is-active", "systemd-machined")[
            "stdout"].strip() == "active", 5),
    }
