"""The hook under libvirtd's AppArmor profile (trixie enforces it; bookworm loads none).

libvirtd runs its hooks inside its own profile, which lets them execute ``/usr/bin/*``
and a few other paths only.  The venv's Python (a link to ``/usr/bin/python3``) passes; a
command elsewhere — ``/usr/local/bin/pinwarden``, a link to the venv's console script —
does not.  ``pinwarden hook install --exe /usr/local/bin/pinwarden`` must refuse that
where the profile is enforced (the ping runs again under the profile), and the same hook
written without the check shows why: a plain ``virsh start`` of an exclusive domain is
refused by the hook's fail-safe path, and ``pinwarden hook check`` names the profile."""

from __future__ import annotations

import re
from pathlib import Path

from guestlab import (
    Data,
    check,
    define,
    pinwarden,
    pw_python,
    read,
    reload_libvirtd,
    remove_domain,
    run,
    systemctl,
    tiny_domain_xml,
    virsh,
)

CONFIG = Path("/etc/pinwarden/pinwarden.toml")
NAME = "pwtest-aa"
SHARED = "pwtest-aa-shared"
META = "<pw:cpu xmlns:pw='urn:pinwarden:domain:1' exclusive='yes'/>"
EXE = "/usr/local/bin/pinwarden"  # the install check's link to the venv's console script
HOOK_LOG = Path("/var/lib/pinwarden/hook.log")


def with_rule(rule: str, local: str, profile: str) -> Data:
    """``rule`` added to ``local`` and ``profile`` reloaded; the hook installed again, the
    exclusive domain started through it; the local file and the profile put back."""
    path = Path(local)
    before = path.read_text() if path.exists() else None
    out: Data = {}
    try:
        path.write_text((before or "") + rule + "\n")
        out["reload_profile"] = run(["apparmor_parser", "-r", profile])
        out["install"] = pinwarden("hook", "install", "--exe", EXE)
        out["start_exclusive"] = virsh("start", NAME)
        out["status"] = pinwarden("status", "--json")
    finally:
        virsh("destroy", NAME)
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before)
        out["restore_profile"] = run(["apparmor_parser", "-r", profile])
    return out


@check("hook_apparmor", needs=["install", "boot"])
def hook_apparmor() -> Data:
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text('[partition]\nmode = "none"\nhost_reserve = "0"\n')
    out: Data = {"exe_target": str(Path(EXE).resolve())}
    # journald opened /var/log/journal before virtme-ng's tmpfs hid it: a restart makes
    # what it logs from now on readable (the story's journal reads rely on the same)
    out["journald"] = systemctl("restart", "systemd-journald.service")
    source = Path(f"/run/{NAME}.xml")
    log_before = read(HOOK_LOG)  # put back at the end: the fail-safe warnings are this check's
    try:
        # libvirtd idle and gone (Debian's exits after 2 minutes; its socket starts it on
        # the next connection): the loaded profile still tells
        out["stop_libvirtd"] = systemctl("stop", "libvirtd.service")
        out["install_idle"] = pinwarden("hook", "install", "--exe", EXE)
        out["start_libvirtd"] = systemctl("start", "libvirtd.service")
        out["install"] = pinwarden("hook", "install", "--exe", EXE)
        out["hooks_after_refusal"] = sorted(
            str(p) for p in Path("/etc/libvirt/hooks").glob("*.d/pinwarden"))
        # the same hook written without the check, as an older pinwarden would have
        out["forced"] = pw_python(
            "from pathlib import Path; from pinwarden.libvirt import hook; "
            f"print(hook.install(Path('/etc/libvirt/hooks'), exe={EXE!r}, state_dir=None, "
            "config=None, check=False).command)")
        out["reload"] = reload_libvirtd()
        out["check"] = pinwarden("hook", "check", "--json")
        source.write_text(tiny_domain_xml(NAME, metadata=META))
        out["define"] = pinwarden("define", str(source))  # stores its holder partition
        out["start_exclusive"] = virsh("start", NAME)
        out["define_shared"] = define(tiny_domain_xml(SHARED))
        out["start_shared"] = virsh("start", SHARED)
        out["status"] = pinwarden("status", "--json")
        # the fail-safe path logs to syslog and to hook.log (the drop-in makes the state
        # directory when nothing has yet, as when this check runs first)
        out["syslog"] = run(["journalctl", "-b", "-t", "pinwarden-hook", "-o", "cat",
                             "--no-pager"])["stdout"][-2000:]
        out["hook_log"] = (read(HOOK_LOG) or "")[-2000:]
        advice = re.search(r"add the line '([^']+)' to (\S+) and reload the profile "
                           r"\(apparmor_parser -r ([^\s)]+)\)", out["install"]["stderr"])
        if advice:  # the rule the refusal advises, added as it says: the hook then works
            out["advice"] = list(advice.groups())
            remove_domain(SHARED)
            virsh("destroy", NAME)
            out["ruled"] = with_rule(*advice.groups())
    finally:
        remove_domain(NAME)
        remove_domain(SHARED)
        out["uninstall"] = pinwarden("hook", "uninstall")
        reload_libvirtd()
        out["sync"] = pinwarden("sync")
        CONFIG.unlink(missing_ok=True)
        source.unlink(missing_ok=True)
        if log_before is None:
            HOOK_LOG.unlink(missing_ok=True)
        else:
            HOOK_LOG.write_text(log_before)
    return out
