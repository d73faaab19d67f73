"""The seed's story on the real systemd host (issue #9), every step observed in the kernel's
own files: pinwarden as installed (venv + wheel), its hook as a qemu.d drop-in, the event
daemon as the shipped systemd unit.

Partition for the story: mode ``none`` with host reserve CPU 0 (VM CPUs 1-3; CPU 3 is also
``isolcpus=``).  Exclusive domain A by ``pinwarden start``, exclusive E by ``pinwarden
define`` + plain ``virsh start`` (through the hook), unpinned B by plain ``virsh start``
and C by ``pinwarden start``, D pinned onto A's CPU refused; audit; ``daemon-reload`` and
an unrelated restart; a libvirtd restart with domains running, E dying meanwhile; the
daemon unit putting back a layout changed behind its back; then everything destroyed and
the host back as found.  Afterwards the libvirt-11-and-isolcpus observation (mode auto =
isolcpus, VM CPUs 3) and LXC against QEMU on one CPU (across drivers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from guestlab import (
    CG,
    LXC_URI,
    VENV,
    Data,
    affinity,
    cg_files,
    check,
    observe_domain,
    pinwarden,
    qemu_pid,
    read,
    remove_domain,
    restart_libvirtd,
    run,
    systemctl,
    tiny_domain_xml,
    unit_show,
    virsh,
    wait_for,
)

CONFIG = Path("/etc/pinwarden/pinwarden.toml")
STATE = Path("/var/lib/pinwarden")
EXCLUSIVE_META = "<pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>"
UNIT = Path("/etc/systemd/system/pinwarden.service")


def write_xml(name: str, **kw: object) -> str:
    path = Path(f"/run/{name}.xml")
    path.write_text(tiny_domain_xml(name, **kw))  # type: ignore[arg-type]
    return str(path)


def effective_everywhere() -> dict[str, str]:
    """``cpuset.cpus.effective`` of every cgroup that has one (threaded vcpu groups too)."""
    out: dict[str, str] = {}
    for directory, _dirs, files in os.walk(CG):
        if "cpuset.cpus.effective" in files:
            rel = directory[len(str(CG)):].strip("/") or "/"
            out[rel] = read(Path(directory) / "cpuset.cpus.effective") or ""
    return out


def partitions() -> dict[str, Data]:
    """pinwarden's holder groups: every ``pinwarden\\x2d….slice`` beside machine.slice (the
    slices libvirt makes of ``/pinwarden-vm-NAME``) with its cpuset files."""
    return {d.name: cg_files(d.name) for d in sorted(CG.iterdir())
            if d.is_dir() and d.name.startswith("pinwarden\\x2d") and d.name.endswith(".slice")}


def _slice_of(name: str) -> str:
    return "pinwarden\\x2dvm\\x2d" + name.replace("-", "\\x2d") + ".slice"


def layout() -> Data:
    return {"partitions": partitions(), "machine": cg_files("machine.slice"),
            "machine_unit": unit_show("machine.slice", "AllowedCPUs", "EffectiveCPUs"),
            "effective": effective_everywhere()}


def domain(name: str) -> Data:
    data = observe_domain(name)
    data["allowed"] = sorted({t["cpus_allowed"] for t in data.get("threads", [])
                              if t.get("cpus_allowed")})
    return data


def noise() -> Data:
    irqs = {p.parent.name: read(p) for p in Path("/proc/irq").glob("*/smp_affinity_list")}
    return {"irqs": irqs, "default": read("/proc/irq/default_smp_affinity"),
            "workqueue": read("/sys/devices/virtual/workqueue/cpumask")}


def dropins() -> Data:
    """The runtime drop-ins of machine.slice (``SetUnitProperties(runtime=true)``'s), each
    file's last line, and whether systemd says the unit needs a ``daemon-reload``."""
    folder = Path("/run/systemd/system.control/machine.slice.d")
    files = {p.name: (read(p) or "").splitlines()[-1:] for p in sorted(folder.glob("*"))} \
        if folder.is_dir() else {}
    return {"files": files, **unit_show("machine.slice", "NeedDaemonReload", "DropInPaths")}


def pin_records() -> Data:
    """The narrowed live pins pinwarden keeps to give back (``repin:`` change records), and
    the running definitions' ``<cputune>`` of B and C."""
    code = ("import json; from pinwarden.ledger import Ledger; "
            "print(json.dumps({k: v for k, v in Ledger('/var/lib/pinwarden').changes()"
            ".items() if k.startswith('repin:')}))")
    records = run(["/opt/pinwarden/bin/python", "-c", code])
    tunes = {n: [line.strip() for line in virsh("dumpxml", n)["stdout"].splitlines()
                 if "pin " in line or "<vcpu " in line] for n in ("pwtest-b", "pwtest-c")}
    return {"records": records, "cputune": tunes}


def holders() -> list[Data]:
    status = pinwarden("status", "--json").get("json") or {}
    return [{"name": h["domain"], "cpus": h["cpus"], "owner": h.get("owner_pid"),
             "cgroup": h.get("cgroup")} for h in status.get("leases", [])]


@check("story", needs=["install", "boot"])
def story() -> Data:
    out: Data = {"as_found": {"layout": layout(), "noise": noise(),
                              "machine_unit": unit_show("machine.slice", "AllowedCPUs"),
                              "dropins": dropins()}}
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    out["host"] = pinwarden("host", "--json")
    out["hook_install"] = pinwarden("hook", "install")
    out["reload"] = systemctl("reload", "libvirtd.service")
    names = ("pwtest-a", "pwtest-e", "pwtest-b", "pwtest-c", "pwtest-d", "pwtest-f")
    try:
        # (1) A, exclusive, by pinwarden start
        out["define_a"] = pinwarden("define", write_xml("pwtest-a", metadata=EXCLUSIVE_META))
        out["start_a"] = pinwarden("start", "pwtest-a", "--json")
        out["a"] = domain("pwtest-a")
        out["after_a"] = layout()
        # (2) E, exclusive, defined by pinwarden, started by plain virsh through the hook
        out["define_e"] = pinwarden("define", write_xml("pwtest-e", metadata=EXCLUSIVE_META))
        out["start_e"] = virsh("start", "pwtest-e")
        out["e"] = domain("pwtest-e")
        out["holders_ae"] = holders()
        out["after_ae"] = layout()
        out["noise_leased"] = noise()
        # (3) unpinned B by plain virsh start, C by pinwarden start
        out["define_b"] = virsh("define", write_xml("pwtest-b"))
        out["start_b"] = virsh("start", "pwtest-b")
        out["b"] = domain("pwtest-b")
        out["define_c"] = virsh("define", write_xml("pwtest-c"))
        out["start_c"] = pinwarden("start", "pwtest-c", "--json")
        out["c"] = domain("pwtest-c")
        # (4) D pinned onto A's CPU: refused before QEMU runs
        leased_a = (out["start_a"].get("json") or {}).get("plan", {}).get("leases", {})
        cpu_a = next(iter(leased_a), "1")
        out["cpu_a"] = cpu_a
        out["define_d"] = virsh("define", write_xml(
            "pwtest-d", cputune=f"<vcpupin vcpu='0' cpuset='{cpu_a}'/>"))
        out["start_d"] = virsh("start", "pwtest-d")
        out["d_pid"] = qemu_pid("pwtest-d")
        # (5) audit
        out["audit"] = pinwarden("audit", "--json")
        # systemd doing its own thing leaves the layout alone
        out["daemon_reload"] = systemctl("daemon-reload")
        out["restart_unrelated"] = systemctl("restart", "systemd-journald.service")
        out["after_systemd"] = layout()
        # (7) libvirtd restarts with A, E, B, C running; E dies meanwhile
        out["stop_libvirtd"] = systemctl("stop", "libvirtd.service", "libvirtd.socket",
                                         "libvirtd-ro.socket", "libvirtd-admin.socket")
        pid_e = qemu_pid("pwtest-e")
        out["kill_e"] = run(["kill", "-KILL", str(pid_e)]) if pid_e else {"rc": None}
        with contextlib.suppress(Exception):
            wait_for(lambda: not Path(f"/proc/{pid_e}").exists(), 30)
        out["start_libvirtd"] = restart_libvirtd()
        out["after_restart"] = {"holders": holders(), "a": domain("pwtest-a"),
                                "layout": layout(),
                                "running": virsh("list", "--name")["stdout"].split()}
        # (8) the event daemon as the shipped unit: reaps E, puts back a changed layout
        unit = Path("/srv/syslab/contrib/pinwarden.service")
        shutil.copy(unit, UNIT)
        # --man=no: the minbase root has no man-db, so every man: link would fail to
        # resolve (systemd's own units' too); the page itself is tested on the build host
        out["unit"] = {"verify": run(["systemd-analyze", "verify", "--man=no", str(UNIT)]),
                       "reload": systemctl("daemon-reload"),
                       "enable": systemctl("enable", "--now", "pinwarden.service")}
        wait_for(lambda: "connected to" in run(["journalctl", "-u", "pinwarden.service",
                                                "-o", "cat"])["stdout"], 120)
        wait_for(lambda: [h["name"] for h in holders()] == ["pwtest-a"], 120)
        out["daemon_reaped"] = holders()
        # the edit below is the operator's while the daemon is idle: E's record goes
        # before its layout is written and B and C get E's CPU back, and an edit landing
        # in the middle of that is another story (an edit that breaks a sync is taken
        # from the record of the cut-short write: test_manager's fake covers it)
        wait_for(lambda: "gave back pwtest-b" in run(["journalctl", "-u",
                                                      "pinwarden.service", "-o",
                                                      "cat"])["stdout"], 120)
        time.sleep(1.0)
        out["behind_its_back"] = systemctl("set-property", "--runtime", "machine.slice",
                                           "AllowedCPUs=0-3")
        time.sleep(1.0)
        out["just_after_change"] = layout()
        wait_for(lambda: unit_show("machine.slice", "AllowedCPUs")["AllowedCPUs"]
                 != "0-3", 120)
        time.sleep(2.0)
        out["put_back"] = layout()
        # (8b) with the daemon running, 'pinwarden start' is the daemon's (issue #12): an
        # exclusive domain, leased through systemd's D-Bus API from a worker thread of the
        # unit, B and C re-pinned off its CPU; then stopped, A alone again
        out["define_f"] = pinwarden("define", write_xml("pwtest-f", metadata=EXCLUSIVE_META))
        out["bc_before_f"] = {n: domain(n)["allowed"] for n in ("pwtest-b", "pwtest-c")}
        out["start_f"] = pinwarden("start", "pwtest-f", "--json")
        out["bc_with_f"] = {n: domain(n)["allowed"] for n in ("pwtest-b", "pwtest-c")}
        out["pins_with_f"] = pin_records()
        out["f"] = domain("pwtest-f")
        out["holders_af"] = holders()
        out["f_layout"] = layout()
        out["served"] = [line for line in run(["journalctl", "-u", "pinwarden.service", "-o",
                                               "cat"])["stdout"].splitlines()
                         if "served 'pinwarden start" in line]
        out["stop_f"] = pinwarden("stop", "pwtest-f")
        out["bc_after_f"] = {n: domain(n)["allowed"] for n in ("pwtest-b", "pwtest-c")}
        out["pins_after_f"] = pin_records()
        with contextlib.suppress(Exception):
            wait_for(lambda: [h["name"] for h in holders()] == ["pwtest-a"], 60)
        # (9) issue #14: a cgroup made at the root after the lease (systemd makes slices
        # there, container runtimes their groups) writes every CPU and runs a task: the
        # kernel lets it onto the leased CPU; the daemon narrows it within seconds
        late = CG / "pwtest-late"
        out["late_write"] = run(["sh", "-c", f"mkdir {late} && echo 0-3 > {late}/cpuset.cpus"])
        sleeper = subprocess.Popen(["sh", "-c", f"echo $$ > {late}/cgroup.procs; "
                                                "exec sleep 600"])
        try:
            written = time.monotonic()
            with contextlib.suppress(Exception):
                wait_for(lambda: str(read(late / "cpuset.cpus")) != "0-3", 30)
            out["late_seconds"] = round(time.monotonic() - written, 3)
            time.sleep(1.0)
            out["late"] = {"files": cg_files("pwtest-late"),
                           "task_allowed": affinity(sleeper.pid),
                           "holder": cg_files(_slice_of("pwtest-a")),
                           "audit": pinwarden("audit", "--json")}
            out["journal"] = run(["journalctl", "-u", "pinwarden.service", "-o",
                                  "cat"])["stdout"]
            # (6) A destroyed: its lease freed, the layout shrinks, the late cgroup gets
            # its CPUs back
            out["destroy_a"] = virsh("destroy", "pwtest-a")
            wait_for(lambda: holders() == [], 60)
            time.sleep(1.0)
            # the daemon's pass gives the shared domains the CPUs no longer leased
            with contextlib.suppress(Exception):
                wait_for(lambda: domain("pwtest-b")["allowed"] == ["1-3"], 60)
            out["after_destroy"] = {"holders": holders(), "layout": layout(),
                                    "late": cg_files("pwtest-late"),
                                    "late_task_allowed": affinity(sleeper.pid),
                                    "bc": {n: domain(n)["allowed"]
                                           for n in ("pwtest-b", "pwtest-c")}}
        finally:
            sleeper.kill()
            sleeper.wait()
            with contextlib.suppress(OSError):
                late.rmdir()
        for name in names:
            remove_domain(name)
        time.sleep(2.0)
        out["as_left"] = {"layout": layout(), "noise": noise(),
                          "machine_unit": unit_show("machine.slice", "AllowedCPUs"),
                          "dropins": dropins(), "control": control_files(),
                          "record": pinwarden("host", "--json").get("json", {})
                          .get("recorded_partition")}
        # what the next daemon-reload makes of it: the unit's own configuration
        out["reload_after"] = systemctl("daemon-reload")
        out["after_reload"] = {"machine_unit": unit_show("machine.slice", "AllowedCPUs"),
                               "dropins": dropins()}
        out["hook_log"] = read(STATE / "hook.log")
    finally:
        for name in names:
            remove_domain(name)
        systemctl("disable", "--now", "pinwarden.service")
        UNIT.unlink(missing_ok=True)
        systemctl("daemon-reload")
        pinwarden("hook", "uninstall")
        CONFIG.unlink(missing_ok=True)
        pinwarden("sync")
    return out


@check("story_isolcpus", needs=["install", "boot"])
def story_isolcpus() -> Data:
    """Mode auto on the isolcpus=3 guest: VM CPUs 3.  Where unpinned domains run when
    started by pinwarden and by plain virsh (libvirt >= 10.4 defaults to online minus
    isolated), with nothing leased and beside an exclusive domain."""
    out: Data = {"host": pinwarden("host", "--json")}
    out["hook_install"] = pinwarden("hook", "install")
    out["reload"] = systemctl("reload", "libvirtd.service")
    names = ("pwtest-ip", "pwtest-iv", "pwtest-ix", "pwtest-iv2")
    libvirtd = 0
    try:
        out["define_p"] = virsh("define", write_xml("pwtest-ip"))
        out["start_p"] = pinwarden("start", "pwtest-ip", "--json")
        out["p"] = domain("pwtest-ip")
        out["define_v"] = virsh("define", write_xml("pwtest-iv"))
        out["start_v"] = virsh("start", "pwtest-iv")
        out["v"] = domain("pwtest-iv")
        remove_domain("pwtest-ip")
        remove_domain("pwtest-iv")
        # libvirtd with every CPU in its affinity, isolated ones included, and nothing in
        # any cgroup's cpuset.cpus naming them: what a service gets when it is (re)started
        # by a PID 1 whose affinity a cpuset change reset to every CPU (the kernel does that
        # to init.scope whenever a partition comes or goes), as CI's full lab run found
        libvirtd = int(unit_show("libvirtd.service", "MainPID").get("MainPID", "0"))
        out["libvirtd_found"] = affinity(libvirtd) if libvirtd else None
        out["reset_libvirtd"] = run(["taskset", "-a", "-p", "-c", "0-3", str(libvirtd)])
        out["libvirtd_before"] = affinity(libvirtd) if libvirtd else None
        # beside an exclusive domain on CPU 3 (every VM CPU leased: shared ones fall back
        # to the housekeeping CPUs, with a note)
        out["define_x"] = pinwarden("define", write_xml("pwtest-ix",
                                                        metadata=EXCLUSIVE_META))
        out["start_x"] = pinwarden("start", "pwtest-ix", "--json")
        out["x"] = domain("pwtest-ix")
        out["define_v2"] = virsh("define", write_xml("pwtest-iv2"))
        out["start_v2"] = virsh("start", "pwtest-iv2")
        out["v2"] = domain("pwtest-iv2")
        out["layout"] = layout()
        out["audit"] = pinwarden("audit", "--json")
        out["libvirtd_leased"] = affinity(libvirtd) if libvirtd else None
    finally:
        for name in names:
            remove_domain(name)
        pinwarden("hook", "uninstall")
        pinwarden("sync")
    out["as_left"] = {"layout": layout(), "holders": holders()}
    out["libvirtd_after"] = affinity(libvirtd) if libvirtd else None
    if libvirtd and out["libvirtd_found"]:  # as it was before the check
        run(["taskset", "-a", "-p", "-c", out["libvirtd_found"], str(libvirtd)])
    return out


LXC_XML = """<domain type='lxc'>
  <name>{name}</name>
  <metadata>{meta}</metadata>
  <memory unit='MiB'>64</memory>
  <vcpu placement='static' cpuset='{cpus}'>1</vcpu>
  <os><type>exe</type><init>/bin/sh</init></os>
  <devices>
    <filesystem type='mount'><source dir='/'/><target dir='/'/></filesystem>
    <console type='pty'/>
  </devices>
</domain>"""


def container_affinity(name: str) -> list[Data]:
    """The affinity of every thread of a running container: its controller (the pid file)
    and every process below it."""
    try:
        top = int(Path(f"/run/libvirt/lxc/{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return []
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(AttributeError, ValueError, IndexError):
                parent[int(entry.name)] = int(
                    str(read(entry / "stat")).rsplit(")", 1)[1].split()[1])
    members, grew = {top}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in members} - members
        grew = bool(more)
        members |= more
    out: list[Data] = []
    for pid in sorted(members):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                out.append({"pid": pid, "tid": int(task.name), "comm": read(task / "comm"),
                            "cpus_allowed": affinity(pid, int(task.name))})
    return out


@check("story_lxc", needs=["install", "boot"])
def story_lxc() -> Data:
    """A shared LXC container naming no CPUs gets the VM CPUs; across drivers: an exclusive
    LXC container holds CPU 2; a QEMU domain pinned to CPU 2 is refused naming the
    container, and a QEMU exclusive one gets another CPU."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    out: Data = {"hook_install": pinwarden("hook", "install"),
                 "reload": systemctl("reload", "libvirtd.service")}
    xml = Path("/run/pwtest-lx.xml")
    xml.write_text(LXC_XML.format(name="pwtest-lx", meta=EXCLUSIVE_META, cpus="2"))
    try:
        # first, with nothing leased (machine.slice as found: every CPU), a shared container
        # that names no CPUs, by plain virsh start: the hook's 'started' step gives its
        # controller and every process below it the VM CPUs, not libvirt_lxc's every CPU
        plain = Path("/run/pwtest-lxs.xml")
        plain.write_text(LXC_XML.format(name="pwtest-lxs", meta="", cpus="0-3").replace(
            "<vcpu placement='static' cpuset='0-3'>", "<vcpu>"))
        out["define_lxs"] = virsh("define", str(plain), uri=LXC_URI)
        out["start_lxs"] = virsh("start", "pwtest-lxs", uri=LXC_URI)
        out["lxs_allowed"] = container_affinity("pwtest-lxs")
        out["destroy_lxs"] = virsh("destroy", "pwtest-lxs", uri=LXC_URI)
        out["define_lx"] = pinwarden("define", "-c", LXC_URI, str(xml))
        out["start_lx"] = virsh("start", "pwtest-lx", uri=LXC_URI)
        out["holders"] = holders()
        out["define_q"] = virsh("define", write_xml(
            "pwtest-lq", cputune="<vcpupin vcpu='0' cpuset='2'/>"))
        out["start_q"] = virsh("start", "pwtest-lq")
        # a running shared VM: the exclusive VM's start below re-pins it off its CPU
        out["define_qs"] = virsh("define", write_xml("pwtest-lqs"))
        out["start_qs"] = virsh("start", "pwtest-lqs")
        out["qs_before"] = virsh("vcpupin", "pwtest-lqs")["stdout"]
        out["define_qx"] = pinwarden("define", write_xml("pwtest-lqx",
                                                         metadata=EXCLUSIVE_META))
        out["start_qx"] = pinwarden("start", "pwtest-lqx", "--json")
        out["qs_narrowed"] = virsh("vcpupin", "pwtest-lqs")["stdout"]
        out["holders_both"] = holders()
        pid = next((int(p) for p in run(["pgrep", "-x", "libvirt_lxc"])["stdout"].split()),
                   None)
        out["lxc_allowed"] = affinity(pid) if pid else None
        out["layout"] = layout()
        # the shared container again, now that CPU 2 and the VM's are leased: the hook gives
        # it the one VM CPU left, and records that
        out["start_lxs_leased"] = virsh("start", "pwtest-lxs", uri=LXC_URI)
        out["lxs_leased"] = container_affinity("pwtest-lxs")
        # the container stops first, over its own (lxc) connection; then the VM, by a plain
        # 'virsh destroy' with no daemon running: the process the hook's 'release' leaves
        # behind gives the shared VM back what the VM's start took
        out["stop_lx"] = pinwarden("stop", "-c", LXC_URI, "pwtest-lx")
        out["lxs_one_left"] = container_affinity("pwtest-lxs")
        out["destroy_qx"] = virsh("destroy", "pwtest-lqx")

        # the process gives the VM its CPU back a moment later.  (Waiting for its "gave
        # back pwtest-lqs" line was not enough: the container's release leaves a process
        # too, which can log its give-back of CPU 2 after the container's stop returned —
        # CI read the pin in between, 2-3)
        wait_for(lambda: virsh("vcpupin", "pwtest-lqs")["stdout"].split()[-1:] == ["1-3"],
                 timeout=60)
        out["qs_after"] = virsh("vcpupin", "pwtest-lqs")["stdout"]
        # it logs once every move is made
        out["hook_log"] = wait_for(lambda: "gave back pwtest-lqs vcpu0" in (
            read(STATE / "hook.log") or "") and read(STATE / "hook.log"), timeout=60) or \
            read(STATE / "hook.log")
        # the container's give-back may come from the other release's give-back process,
        # which can run later (6.1: after the widening reset it to every CPU); then a
        # moment for anything that would undo it
        with contextlib.suppress(Exception):
            wait_for(lambda: {t["cpus_allowed"] for t in container_affinity("pwtest-lxs")}
                     == {"1-3"}, 60)
        time.sleep(2.0)
        out["lxs_after"] = container_affinity("pwtest-lxs")
        out["layout_after"] = layout()
        # the exclusive container by 'pinwarden start' too: the XML it hands libvirt must be
        # one the hook's 'prepare' admits (pins, which libvirt's LXC driver ignores and
        # pinwarden refuses for containers, made it fail: hunt)
        out["pwstart_lx"] = pinwarden("start", "-c", LXC_URI, "pwtest-lx")
        out["holders_pwstart_lx"] = holders()
        out["pwstop_lx"] = pinwarden("stop", "-c", LXC_URI, "pwtest-lx")
    finally:
        for name in ("pwtest-lq", "pwtest-lqx", "pwtest-lqs"):
            remove_domain(name)
        remove_domain("pwtest-lx", uri=LXC_URI)
        remove_domain("pwtest-lxs", uri=LXC_URI)
        pinwarden("hook", "uninstall")
        CONFIG.unlink(missing_ok=True)
        pinwarden("sync")
    out["as_left"] = {"holders": holders(), "layout": layout()}
    return out


#: pinwarden's own drop-in of machine.slice
OWN_DROPIN = Path("/run/systemd/system.control/machine.slice.d/zz-pinwarden-AllowedCPUs.conf")



@check("story_two_leases", needs=["install", "boot"])
def story_two_leases() -> Data:
    """An unpinned domain runs while an exclusive one is started and stopped twice (mode
    none, host reserve CPU 0).  The first release gives machine.slice its empty
    AllowedCPUs back, but its cgroup file keeps every CPU (the kernel refuses to empty it
    while the domain runs below: pinwarden writes what it inherits).  The second lease
    found that file naming the CPU it leases, and its escape check recorded the file's
    0-3 as what machine.slice had: the second release left AllowedCPUs=0-3, and the root
    enabling cpuset (systemd-lab hunt)."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    unit = ("machine.slice", "AllowedCPUs")
    out: Data = {"as_found": unit_show(*unit)}
    names = ("pwtest-ts", "pwtest-tx")
    try:
        out["define_s"] = virsh("define", write_xml("pwtest-ts"))
        out["start_s"] = pinwarden("start", "pwtest-ts")
        out["define_x"] = pinwarden("define", write_xml("pwtest-tx", metadata=EXCLUSIVE_META))
        for n in (1, 2):
            out[f"start_{n}"] = pinwarden("start", "pwtest-tx")
            out[f"leased_{n}"] = {"unit": unit_show(*unit), "holders": holders()}
            out[f"stop_{n}"] = pinwarden("stop", "pwtest-tx")
            out[f"released_{n}"] = {"unit": unit_show(*unit), "holders": holders(),
                                    "dropins": dropins()["files"]}
        out["stop_s"] = pinwarden("stop", "pwtest-ts")
        out["as_left"] = {"unit": unit_show(*unit), "dropins": dropins()["files"]}
    finally:
        for name in names:
            remove_domain(name)
        CONFIG.unlink(missing_ok=True)
        pinwarden("sync")
    return out


@check("story_unhooked", needs=["install", "boot"])
def story_unhooked() -> Data:
    """An exclusive domain stored by 'pinwarden define' and started by plain 'virsh
    start' with no hook installed: it runs in its holder slice (machined makes it) with no
    lease.  A 'pinwarden sync' then took that slice for a stale one of pinwarden's and set
    machine.slice to the pool beside it, AllowedCPUs=1-3, with no record to put it back:
    it outlived the domain, the next sync and a daemon-reload (systemd-lab hunt)."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    unit = ("machine.slice", "AllowedCPUs")
    hooks = Path("/etc/libvirt/hooks")
    out: Data = {"as_found": unit_show(*unit), "dropins_found": dropins()["files"],
                 "hooks": sorted(p.name for p in hooks.rglob("*") if p.is_file())
                 if hooks.is_dir() else []}
    try:
        out["define"] = pinwarden("define", write_xml("pwtest-uh", metadata=EXCLUSIVE_META))
        out["start"] = virsh("start", "pwtest-uh")
        out["sync"] = pinwarden("sync")
        out["running"] = {"unit": unit_show(*unit), "dropins": dropins()["files"]}
        out["destroy"] = virsh("destroy", "pwtest-uh")
        out["sync_after"] = pinwarden("sync")
        out["reload"] = systemctl("daemon-reload")
        out["as_left"] = {"unit": unit_show(*unit), "dropins": dropins()["files"]}
    finally:
        remove_domain("pwtest-uh")
        CONFIG.unlink(missing_ok=True)
        pinwarden("sync")
    return out


def host_threads() -> dict[str, str]:
    """``Cpus_allowed_list`` of every user thread of the host's own processes (not below
    machine.slice or a pinwarden slice: the VMs' threads are placed by libvirt and
    pinwarden), keyed ``PID/TID COMM``."""
    out: dict[str, str] = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        cgroup = read(f"/proc/{pid}/cgroup") or ""
        status = read(f"/proc/{pid}/status") or ""
        if not cgroup or "machine.slice" in cgroup or "pinwarden\\x2d" in cgroup \
                or "\nPPid:\t2\n" in status or pid == "2":  # kernel threads
            continue
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                text = read(f"/proc/{pid}/task/{tid}/comm")
                cpus = affinity(int(pid), int(tid))
                if text is not None and cpus is not None:
                    out[f"{pid}/{tid} {text.strip()}"] = cpus
    return out


def kernel_threads() -> dict[str, str]:
    """``Cpus_allowed_list`` of every kernel thread (children of kthreadd), keyed
    ``PID COMM``."""
    out: dict[str, str] = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        status = read(f"/proc/{pid}/status") or ""
        comm = read(f"/proc/{pid}/comm")
        cpus = affinity(int(pid))
        if "\nPPid:\t2\n" in status and comm is not None and cpus is not None:
            out[f"{pid} {comm.strip()}"] = cpus
    return out


@check("story_host_affinity", needs=["install", "boot"])
def story_host_affinity() -> Data:
    """The host's own processes where they were, on 0-2 (isolcpus=3: Linux 6.12 puts PID 1
    there at boot; 6.1 leaves it on every CPU, so the check puts them there as systemd's
    CPUAffinity=0-2 would), while an exclusive domain holds CPU 1 or 2 as a partition,
    and after (mode none, host reserve CPU 0).  The kernel gives every task of a cpuset
    whose CPUs change all of that cpuset's CPUs: a partition coming or going gave PID 1,
    journald and every service the isolated CPU 3, for good (trixie-lab hunt); on 6.1
    enabling the cpuset controller did so first."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    # on 0-2 first: the raw experiments of a whole lab run (partition_write, dbus_set)
    # wrote partitions without pinwarden, and the kernel gave every host thread what
    # their cgroups had then (CPU 3, or CPU 0 alone)
    out: Data = {"put_back_first": {}}
    for name, cpus in host_threads().items():
        tid = int(name.split()[0].split("/")[1])
        if cpus != "0-2":
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, set(range(3)))
                out["put_back_first"][name] = cpus
    # and the NUMA-local kernel threads on their node, as booted (those experiments gave
    # them every CPU too)
    for name in kernel_threads():
        pid, _, comm = name.partition(" ")
        node = comm.removeprefix("kswapd").removeprefix("kcompactd")
        cpus_text = read(f"/sys/devices/system/node/node{node}/cpulist") \
            if node != comm and node.isdigit() else None
        if cpus_text:
            wanted = {c for part in cpus_text.strip().split(",")
                      for c in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(pid), wanted)
    out["as_found"] = host_threads()
    out["kthreads_found"] = kernel_threads()
    try:
        out["define"] = pinwarden("define", write_xml("pwtest-hx", metadata=EXCLUSIVE_META))
        out["start"] = pinwarden("start", "pwtest-hx")
        out["holders"] = holders()
        out["leased"] = host_threads()
        out["kthreads_leased"] = kernel_threads()
        out["audit"] = pinwarden("audit", "--json")
        out["stop"] = pinwarden("stop", "pwtest-hx")
        out["released"] = host_threads()
        out["holders_released"] = holders()
    finally:
        remove_domain("pwtest-hx")
        CONFIG.unlink(missing_ok=True)
        pinwarden("sync")
    out["as_left"] = host_threads()
    out["kthreads_left"] = kernel_threads()
    # what a cpuset change on 6.1 does to a host process, played by sched_setaffinity: the
    # audit warns of it, with nothing leased
    reset = subprocess.Popen(["sleep", "300"])
    try:
        os.sched_setaffinity(reset.pid, set(range(4)))
        out["reset_pid"] = reset.pid
        out["reset_audit"] = pinwarden("audit", "--json")
        out["reset_affinities"] = {
            str(i["tid"]): affinity(i["pid"], i["tid"])
            for i in (out["reset_audit"].get("json") or {}).get("intruders", [])
            if i["kind"] == "isolcpus-host-task"}
    finally:
        reset.kill()
        reset.wait()
    return out


@check("story_plain_exclusive", needs=["install", "boot"])
def story_plain_exclusive() -> Data:
    """A 2-vCPU exclusive domain stored by ``pinwarden define`` and started by plain
    ``virsh start`` through the hook, no daemon (mode none, host reserve CPU 0: it leases
    2-3, CPU 3 in isolcpus=).  libvirt >= 10.4 gives threads without a pin the CPUs not
    isolated: every thread ran on CPU 2 and CPU 3 stayed idle, and libvirtd's own threads,
    exempt as the lease's owner until QEMU ran, stayed allowed on the leased CPUs (audit
    exit 1) until the next change (systemd-lab hunt)."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    out: Data = {"daemon": systemctl("is-active", "pinwarden.service")["stdout"].strip()}
    out["hook_install"] = pinwarden("hook", "install")
    out["reload"] = systemctl("reload", "libvirtd.service")

    def journald() -> str | None:
        pid = int(unit_show("systemd-journald.service", "MainPID").get("MainPID", "0"))
        return affinity(pid) if pid else None

    out["journald_found"] = journald()
    try:
        out["define"] = pinwarden("define", write_xml("pwtest-px", vcpus=2,
                                                      metadata=EXCLUSIVE_META))
        out["start"] = virsh("start", "pwtest-px")
        out["x"] = domain("pwtest-px")
        out["holders"] = holders()
        out["audit"] = pinwarden("audit", "--json")
        libvirtd = int(unit_show("libvirtd.service", "MainPID").get("MainPID", "0"))
        out["libvirtd"] = affinity(libvirtd) if libvirtd else None
        # a service restarted during the lease: a process of its own, forked by PID 1 with
        # its narrowed affinity (it kept it after the lease: systemd-lab hunt)
        out["journald_restart"] = systemctl("restart", "systemd-journald.service")
        out["journald_leased"] = journald()
    finally:
        remove_domain("pwtest-px")
        pinwarden("hook", "uninstall")
        CONFIG.unlink(missing_ok=True)
        pinwarden("sync")
    out["as_left"] = {"holders": holders(), "layout": layout()}
    out["journald_left"] = journald()
    return out


@check("story_lost_database", needs=["install", "boot"])
def story_lost_database() -> Data:
    """The lease database goes while an exclusive domain runs (a wiped /var/lib, another
    state_dir), then a second exclusive domain starts through the hook (mode none, host
    reserve CPU 0, no daemon).  It was planned onto the first one's CPU: the running
    domain's partition was narrowed off it and made a member, machine.slice put on it,
    and the start refused with a wrong reason (systemd-lab hunt).  Now the second one
    goes beside it, and status and audit say what runs in the group no record names."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    away = Path("/run/pwtest-lost-state")
    unit = ("machine.slice", "AllowedCPUs")
    out: Data = {"as_found": unit_show(*unit)}
    out["hook_install"] = pinwarden("hook", "install")
    out["reload"] = systemctl("reload", "libvirtd.service")
    try:
        out["define_a"] = pinwarden("define", write_xml("pwtest-la", metadata=EXCLUSIVE_META))
        out["define_b"] = pinwarden("define", write_xml("pwtest-lb", metadata=EXCLUSIVE_META))
        out["start_a"] = virsh("start", "pwtest-la")
        out["holders_a"] = holders()
        out["a_before"] = domain("pwtest-la")
        out["layout_before"] = layout()
        shutil.move(str(STATE), str(away))  # lost while it runs
        out["start_b"] = virsh("start", "pwtest-lb")
        out["a_after"] = domain("pwtest-la")
        out["b"] = domain("pwtest-lb")
        out["layout_after"] = layout()
        out["status"] = pinwarden("status")
        out["audit"] = pinwarden("audit", "--json")
    finally:
        remove_domain("pwtest-lb")
        remove_domain("pwtest-la")
        if away.exists():  # the database back: its lease of the domain gone is freed
            shutil.rmtree(STATE, ignore_errors=True)
            shutil.move(str(away), str(STATE))
        pinwarden("hook", "uninstall")
        CONFIG.unlink(missing_ok=True)
        out["sync_left"] = pinwarden("sync")
    out["as_left"] = {"holders": holders(), "layout": layout(), "unit": unit_show(*unit)}
    return out


@check("story_reload", needs=["install", "boot"])
def story_reload() -> Data:
    """The VM partition set the way the README says, by a persistent ``systemctl
    set-property machine.slice AllowedCPUs=1-2`` (a drop-in in /etc/systemd/system.control,
    which outranks the runtime ones in /run): an exclusive domain's CPU stays out of
    machine.slice through a ``daemon-reload`` with no pinwarden daemon running, and the last
    release leaves the operator's setting as it was, before and after the next reload."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "cgroup"\n')
    unit = ("machine.slice", "AllowedCPUs", "EffectiveCPUs", "NeedDaemonReload")
    out: Data = {"as_found": unit_show(*unit)}
    out["set_property"] = systemctl("set-property", "machine.slice", "AllowedCPUs=1-2")
    try:
        out["operator"] = {"unit": unit_show(*unit),
                           "etc": read("/etc/systemd/system.control/machine.slice.d/"
                                       "50-AllowedCPUs.conf")}
        out["define_x"] = pinwarden("define", write_xml("pwtest-rx", metadata=EXCLUSIVE_META))
        out["start_x"] = pinwarden("start", "pwtest-rx", "--json")
        out["holders"] = holders()
        out["leased"] = {"unit": unit_show(*unit), "layout": layout(), "dropins": dropins()}
        # systemd reads every unit's configuration again: 252 realises machine.slice at
        # once, 257 at the next unrelated unit change (FACTS.md 4)
        out["reload"] = systemctl("daemon-reload")
        out["restart_unrelated"] = systemctl("restart", "systemd-journald.service")
        time.sleep(1.5)
        out["after_reload"] = {"unit": unit_show(*unit), "layout": layout(),
                               "audit": pinwarden("audit", "--json")}
        out["stop_x"] = pinwarden("stop", "pwtest-rx")
        out["as_left"] = {"unit": unit_show(*unit), "dropins": dropins(),
                          "holders": holders()}
        out["reload_left"] = systemctl("daemon-reload")
        out["reloaded_left"] = {"unit": unit_show(*unit), "dropins": dropins()}
        # a downgrade while CPU 1 was leased: the older pinwarden, which does not know its
        # own drop-in, released the lease and left the file; a reload loads it again
        OWN_DROPIN.parent.mkdir(parents=True, exist_ok=True)
        OWN_DROPIN.write_text("[Slice]\nAllowedCPUs=\nAllowedCPUs=2\n")
        out["reload_leftover"] = systemctl("daemon-reload")
        out["leftover"] = {"unit": unit_show(*unit), "dropins": dropins()}
        out["sync_leftover"] = pinwarden("sync")
        out["leftover_synced"] = {"unit": unit_show(*unit), "dropins": dropins()}
        out["reload_synced"] = systemctl("daemon-reload")
        out["leftover_reloaded"] = {"unit": unit_show(*unit), "dropins": dropins()}
    finally:
        OWN_DROPIN.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            OWN_DROPIN.parent.rmdir()
        out.update(undo_slice_setting("pwtest-rx"))
    return out


@check("story_operator_edit", needs=["install", "boot"])
def story_operator_edit() -> Data:
    """The operator changes the VM partition persistently while a CPU is leased (``systemctl
    set-property machine.slice AllowedCPUs=1-2``, mode cgroup, found at 1-3).  pinwarden
    takes the edit; at the last release the runtime drop-in its own writes made went on as
    the operator's, so once they removed their setting (``systemctl revert``) systemd kept
    pinwarden's last value (systemd-lab hunt)."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "cgroup"\n')
    unit = ("machine.slice", "AllowedCPUs")
    out: Data = {"as_found": unit_show(*unit)}
    out["configure"] = systemctl("set-property", "machine.slice", "AllowedCPUs=1-3")
    try:
        out["define_x"] = pinwarden("define", write_xml("pwtest-ox", metadata=EXCLUSIVE_META))
        out["start_x"] = pinwarden("start", "pwtest-ox")
        out["holders"] = holders()
        out["edit"] = systemctl("set-property", "machine.slice", "AllowedCPUs=1-2")
        out["sync"] = pinwarden("sync")
        out["stop_x"] = pinwarden("stop", "pwtest-ox")
        out["released"] = {"unit": unit_show(*unit), "dropins": dropins()}
    finally:
        out.update(undo_slice_setting("pwtest-ox"))
    return out


#: ``pinwarden sync`` with the operator's ``set-property`` landing right after the sync
#: looked for an edit of machine.slice (and before its layout reads the cgroups): the
#: interleaving the story's event daemon met by chance, made certain
EDIT_MID_SYNC = """
import subprocess, sys
import pinwarden.manager as manager
real, landed = manager.Manager._take_edit, []
def then_the_edit(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    if not landed:
        landed.append(subprocess.run(["systemctl", "set-property", "--runtime",
                                      "machine.slice", "AllowedCPUs=1"]).returncode)
    return out
manager.Manager._take_edit = then_the_edit
from pinwarden.cli import entry
sys.argv = ["pinwarden", "sync"]
try:
    entry()
finally:
    print("landed:", landed, file=sys.stderr)
"""


@check("story_edit_mid_sync", needs=["install", "boot"])
def story_edit_mid_sync() -> Data:
    """Mode cgroup, machine.slice found at 1-3, CPU 2 leased (so narrowed to 1,3); the
    operator's ``set-property --runtime machine.slice AllowedCPUs=1`` lands while a sync
    runs, after it looked for an edit.  The sync put 1,3 back without a word (the story's
    daemon did so, CI of stop 40); now it starts again and takes the edit: VM CPUs 1-2
    from then on, and what the last release puts back."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "cgroup"\n')
    unit = ("machine.slice", "AllowedCPUs")
    out: Data = {"as_found": unit_show(*unit)}
    out["configure"] = systemctl("set-property", "--runtime", "machine.slice",
                                 "AllowedCPUs=1-3")
    try:
        out["define_x"] = pinwarden("define", write_xml(
            "pwtest-mx", metadata=EXCLUSIVE_META, cputune="<vcpupin vcpu='0' cpuset='2'/>"))
        out["start_x"] = pinwarden("start", "pwtest-mx")
        out["holders"] = holders()
        out["narrowed"] = unit_show(*unit)
        out["sync"] = run([str(VENV / "bin" / "python"), "-c", EDIT_MID_SYNC])
        out["after_sync"] = {"unit": unit_show(*unit), "machine": cg_files("machine.slice"),
                             "status": pinwarden("status", "--json").get("json")}
        out["stop_x"] = pinwarden("stop", "pwtest-mx")
        out["released"] = unit_show(*unit)
    finally:
        out.update(undo_slice_setting("pwtest-mx"))
    return out


def undo_slice_setting(domain: str) -> Data:
    """The end of a check that configured machine.slice's AllowedCPUs: its ``domain`` and
    the configuration gone, pinwarden's layout with them, and the setting undone as it
    came — systemctl's own ``revert``, then a reload (``revert_reload``).  What is left:
    ``reverted`` (the slice and its drop-ins) and ``control_left``."""
    remove_domain(domain)
    CONFIG.unlink(missing_ok=True)
    pinwarden("sync")
    return {"revert": systemctl("revert", "machine.slice"),
            "revert_reload": systemctl("daemon-reload"),
            "reverted": {"unit": unit_show("machine.slice", "AllowedCPUs"),
                         "dropins": dropins()},
            "control_left": control_files()}


def control_files() -> list[str]:
    """Every file and folder under /run/systemd/system.control (the runtime settings of
    units that are not transient), relative to it."""
    base = Path("/run/systemd/system.control")
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")) if base.is_dir() else []


def _vcpu_threads(name: str) -> dict[str, str]:
    """``CPU N/TCG`` thread → its affinity, of running domain ``name``."""
    return {t["comm"]: t["cpus_allowed"] for t in domain(name).get("threads", [])
            if str(t.get("comm", "")).startswith("CPU ")}


@check("story_hotplug", needs=["install", "boot"])
def story_hotplug() -> Data:
    """vCPU hot-plug beside leases started through the hook (mode none, host reserve CPU
    0: VM CPUs 1-3; no daemon running meanwhile).  Shared S (2 vCPUs, 1 online) by plain
    'virsh start'; exclusive Y by 'pinwarden start' (it re-pins S off its CPU); exclusive
    X (2 vCPUs, 1 online) by plain 'virsh start' through the hook, which re-pins nothing.
    When Y ended, S never got Y's CPU back while X ran — the give-back waited for a
    re-pin that a hook start never makes — and its offline vCPU stayed pinned where its
    cgroup had no CPU: 'virsh setvcpus S 2 --live' failed "cannot set CPU affinity".  And
    a vCPU hot-plugged into X got libvirt's default, vcpu0's CPU, its own leased CPU
    idle; the daemon only reported the drift (systemd-lab hunt)."""
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    out: Data = {"daemon": systemctl("is-active", "pinwarden.service")["stdout"].strip()}
    if out["daemon"] == "active":
        out["daemon_stop"] = systemctl("stop", "pinwarden.service")
    out["hook_install"] = pinwarden("hook", "install")
    out["reload"] = systemctl("reload", "libvirtd.service")
    two = ("<vcpu>2</vcpu>", "<vcpu current='1'>2</vcpu>")
    try:
        s_xml = Path(write_xml("pwtest-hs", vcpus=2))
        s_xml.write_text(s_xml.read_text().replace(*two))
        out["define_s"] = virsh("define", str(s_xml))
        out["define_y"] = pinwarden("define", write_xml("pwtest-hy", metadata=EXCLUSIVE_META))
        x_xml = Path(write_xml("pwtest-hx", vcpus=2, metadata=EXCLUSIVE_META))
        x_xml.write_text(x_xml.read_text().replace(*two))
        out["define_x"] = pinwarden("define", str(x_xml))
        out["start_s"] = virsh("start", "pwtest-hs")
        out["start_y"] = pinwarden("start", "pwtest-hy")
        out["start_x"] = virsh("start", "pwtest-hx")
        out["holders"] = holders()
        out["destroy_y"] = virsh("destroy", "pwtest-hy")  # the hook's give-back follows
        out["given_back"] = bool(wait_for(
            lambda: "free again" not in pinwarden("status")["stdout"], 60, step=1.0))
        out["status"] = pinwarden("status")["stdout"]
        out["s_pins"] = virsh("vcpupin", "pwtest-hs")["stdout"]
        out["setvcpus_s"] = virsh("setvcpus", "pwtest-hs", "2", "--live")
        out["s_threads"] = _vcpu_threads("pwtest-hs")
        out["setvcpus_x"] = virsh("setvcpus", "pwtest-hx", "2", "--live")
        out["x_plugged"] = _vcpu_threads("pwtest-hx")
        out["daemon_once"] = pinwarden("daemon", "--once")
        out["x_placed"] = _vcpu_threads("pwtest-hx")
        out["x_holder"] = holders()
    finally:
        for name in ("pwtest-hx", "pwtest-hy", "pwtest-hs"):
            remove_domain(name)
        pinwarden("hook", "uninstall")
        CONFIG.unlink(missing_ok=True)
        pinwarden("sync")
        if out["daemon"] == "active":
            out["daemon_start"] = systemctl("start", "pinwarden.service")
    out["as_left"] = {"holders": holders(), "machine_unit": unit_show("machine.slice",
                                                                      "AllowedCPUs")}
    return out
