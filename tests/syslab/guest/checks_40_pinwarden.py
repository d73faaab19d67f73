"""pinwarden as installed (venv + wheel) on the real systemd host: what it sees, and a plain
``virsh start`` through its hook.  The full seed story goes in later ``checks_5x``."""

from __future__ import annotations

from pathlib import Path

from guestlab import (
    Data,
    Domain,
    check,
    install_hook,
    pinwarden,
    read,
    uninstall_hook,
)


@check("pinwarden_host", needs=["install", "boot"])
def pinwarden_host() -> Data:
    return {"host": pinwarden("host", "--json"), "status": pinwarden("status", "--json")}


@check("pinwarden_hook_shared_start", needs=["install", "boot"])
def pinwarden_hook_shared_start() -> Data:
    """``pinwarden hook install`` + restart, then an unpinned domain by plain virsh start."""
    out: Data = {"install": install_hook()}
    try:
        out["hook_script"] = read("/etc/libvirt/hooks/qemu.d/pinwarden")
        with Domain("pwtest-shared", vcpus=1) as dom:
            out["domain"] = dom.data
            out["status"] = pinwarden("status", "--json")
        out["hook_log"] = read(Path("/var/lib/pinwarden") / "hook.log")
    finally:
        out["uninstall"] = uninstall_hook()
    return out
