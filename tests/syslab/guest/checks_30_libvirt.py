"""libvirt itself on the systemd guests: LXC containers and hook scripts (FACTS.md 6, 7)."""

from __future__ import annotations

import time
from pathlib import Path

from guestlab import (
    LXC_URI,
    Data,
    Domain,
    cg_files,
    check,
    pids_named,
    proc_cgroup,
    read,
    reload_libvirtd,
    restart_libvirtd,
    run,
    virsh,
)

LXC_XML = """<domain type='lxc'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type>exe</type><init>/bin/sh</init></os>
  <devices>
    <filesystem type='mount'><source dir='/'/><target dir='/'/></filesystem>
    <console type='pty'/>
  </devices>
</domain>"""


@check("lxc", needs=["boot"])
def lxc() -> Data:
    """FACTS 6: can libvirt_lxc run a container here; if not, exactly why."""
    out: Data = {
        "version": virsh("version", uri=LXC_URI),
        "validate": run(["virt-host-validate", "lxc"], timeout=120),
        "namespaces": sorted(p.name for p in Path("/proc/self/ns").iterdir()),
        "driver": sorted(p.name for p in Path(
            "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver").glob("*lxc*")),
    }
    with Domain("pwtest-lxc", LXC_XML.format(name="pwtest-lxc"), uri=LXC_URI) as dom:
        out.update(dom.data)
        if dom.running:
            time.sleep(2.0)
            out["dominfo"] = virsh("dominfo", "pwtest-lxc", uri=LXC_URI)
            procs = pids_named("libvirt_lxc")
            out["libvirt_lxc"] = [{"pid": p, "cgroup": proc_cgroup(p)} for p in procs]
            scope = next((c for c in (proc_cgroup(p) for p in procs) if c), "")
            out["scope_files"] = cg_files(scope.strip("/")) if scope else {}
    out["log"] = read("/var/log/libvirt/lxc/pwtest-lxc.log")
    return out


HOOKS = Path("/etc/libvirt/hooks")
HOOK_LOG = Path("/run/pwtest-hooks.log")
#: ``/run/pwtest-hook-exit.<script name>``: the status that script exits with at prepare
EXIT_DIR = Path("/run")
DROPIN = """#!/bin/sh
# pwtest: log every call (script, args, size and start of stdin), exit as told
xml=$(cat)
printf '%s|%s|%s|%s\\n' "$0" "$*" "${#xml}" "$(printf '%s' "$xml" | head -c 40 | tr '\\n' ' ')" \\
  >> /run/pwtest-hooks.log
code=$(cat "/run/pwtest-hook-exit.$(basename "$0")" 2>/dev/null)
if [ "$2" = prepare ] && [ -n "$code" ]; then
  echo "pwtest hook $0 refuses $1 with exit $code" >&2
  exit "$code"
fi
exit 0
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _exit_with(script: str, code: str | None) -> None:
    path = EXIT_DIR / f"pwtest-hook-exit.{script}"
    if code is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(code)


def _calls() -> list[str]:
    """The hook calls logged since the last look."""
    text = read(HOOK_LOG) or ""
    HOOK_LOG.write_text("")
    return [line for line in text.splitlines() if line]


def _attempt(name: str) -> Data:
    """Define and start a domain, then remove it: the start's answer and the hook calls.
    A hook refusing at prepare makes this cheap (no QEMU); a hook libvirtd does not run
    lets the domain start."""
    with Domain(name, vcpus=1) as dom:
        data: Data = {"start": dom.data.get("start"),
                      "state": virsh("domstate", name)["stdout"].strip()}
    data["destroy_rc"] = dom.data["removed"]["destroy"]["rc"]
    data["calls"] = _calls()
    return data


@check("hooks", needs=["boot"])
def hooks() -> Data:
    """FACTS 7: qemu.d/lxc.d drop-ins and the main hook script: when libvirtd notices them,
    what each call gets, and what a failing prepare hook does.  Whether a script is run is
    seen cheaply: it refuses the start at prepare (exit 1) and logs its call."""
    out: Data = {"hooks_dir_before": sorted(str(p.relative_to(HOOKS))
                                            for p in HOOKS.rglob("*"))
                 if HOOKS.is_dir() else None}
    HOOK_LOG.write_text("")
    dropin = HOOKS / "qemu.d" / "pwtest-log"
    lxc_dropin = HOOKS / "lxc.d" / "pwtest-log"
    main = HOOKS / "qemu"
    bad = HOOKS / "qemu.d" / "pwtest-missing-interpreter"
    try:
        # pinwarden's case: a main script appears while libvirtd runs with no qemu hooks
        _write(main, DROPIN)
        _exit_with("qemu", "1")
        out["main_without_restart"] = _attempt("pwtest-h1")
        out["reload"] = reload_libvirtd()
        out["main_after_reload"] = _attempt("pwtest-h2")
        _exit_with("qemu", None)
        # a drop-in appears while libvirtd already knows qemu hooks
        _write(dropin, DROPIN)
        _write(lxc_dropin, DROPIN)
        _exit_with("pwtest-log", "1")
        out["dropin_without_restart"] = _attempt("pwtest-h3")
        _exit_with("pwtest-log", None)
        # one whole lifecycle: every operation, its arguments and stdin, in order
        out["lifecycle"] = _attempt("pwtest-h4")
        for code in ("127", "1"):
            _exit_with("pwtest-log", code)
            out[f"prepare_exit_{code}"] = _attempt("pwtest-hx")
        _exit_with("pwtest-log", None)
        _write(bad, "#!/nonexistent/python3\nprint('never')\n")
        out["missing_interpreter"] = _attempt("pwtest-hb")
        bad.unlink()
        _exit_with("pwtest-log", "1")
        # lxc.d appeared while libvirtd knew no lxc hooks: before and after a reload
        for when in ("lxc", "lxc_after_reload"):
            if when == "lxc_after_reload":
                out["reload_lxc"] = reload_libvirtd()
            with Domain("pwtest-hl", LXC_XML.format(name="pwtest-hl"), uri=LXC_URI) as dom:
                out[when] = {"start": dom.data.get("start"), "calls": _calls()}
            out[when]["calls_after_destroy"] = _calls()
    finally:
        for path in (dropin, lxc_dropin, main, bad):
            path.unlink(missing_ok=True)
        for script in ("pwtest-log", "qemu"):
            _exit_with(script, None)
        out["restart_clean"] = restart_libvirtd()
    return out
