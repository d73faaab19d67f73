"""The shipped daemon unit on a host whose operator turned libvirtd off (as for the modular
daemons, which conflict with it): starting pinwarden.service leaves libvirtd off.  Its
``Wants=libvirtd.service`` started it again (trixie lab hunt)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from guestlab import Data, check, run, systemctl, unit_show, wait_libvirt

UNIT = Path("/etc/systemd/system/pinwarden.service")
LIBVIRTD = ("libvirtd.service", "libvirtd.socket", "libvirtd-ro.socket",
            "libvirtd-admin.socket")
# what tells "left off" from "started again": a new start gets a new invocation id and
# start time, whether libvirtd ended its last run cleanly ("inactive") or not ("failed")
PROPS = ("ActiveState", "Result", "InvocationID", "ExecMainStartTimestampMonotonic",
         "ExecMainCode", "ExecMainStatus")


@check("unit_pulls_in_no_libvirtd", needs=["install", "boot"])
def unit_pulls_in_no_libvirtd() -> Data:
    out: Data = {"stop": systemctl("stop", *LIBVIRTD)}
    out["stopped"] = unit_show("libvirtd.service", *PROPS)
    if out["stopped"].get("ActiveState") != "inactive":  # how it ended, for the test's message
        out["stop_journal"] = run(["journalctl", "--no-pager", "-b", "-u", "libvirtd.service",
                                   "-n", "30", "-o", "short-monotonic"])["stdout"]
    try:
        shutil.copy(Path("/srv/syslab/contrib/pinwarden.service"), UNIT)
        out["reload"] = systemctl("daemon-reload")
        out["start"] = systemctl("start", "pinwarden.service")
        time.sleep(3.0)
        out["libvirtd"] = unit_show("libvirtd.service", *PROPS)
        out["pinwarden"] = unit_show("pinwarden.service", "ActiveState")
    finally:
        systemctl("stop", "pinwarden.service")
        UNIT.unlink(missing_ok=True)
        systemctl("daemon-reload")
        out["restart"] = systemctl("start", *LIBVIRTD)
        out["libvirt_back"] = wait_libvirt()
    return out
