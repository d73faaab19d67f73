"""Which cgroup backend drives the host's cpusets: the one place that decides it.

* systemd owns the hierarchy (``run/systemd/system`` exists, ``sd_booted(3)``) and cgroup v2
  has the cpuset controller → :class:`~pinwarden.enforce.systemd.SystemdBackend` over D-Bus
  (systemd has no cpuset support on cgroup v1, so there the v1 files are written directly);
* a cgroup v1 ``cpuset`` hierarchy is mounted → :class:`~pinwarden.enforce.v1.CpusetV1`;
* cgroup v2 with the cpuset controller → :class:`~pinwarden.enforce.v2.CgroupV2Backend`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pinwarden.config import Config
from pinwarden.enforce.backend import CgroupBackend
from pinwarden.enforce.layout import LayoutNames
from pinwarden.errors import HostError
from pinwarden.mounts import read_mounts

BackendKind = Literal["systemd", "v1", "v2"]


def choose_backend(root: Path) -> BackendKind:
    """The backend kind for the host at ``root`` (pure reading of mounts and sd_booted)."""
    from pinwarden.enforce.systemd import systemd_booted

    mounts = read_mounts(root)
    if systemd_booted(root) and mounts.v2_has("cpuset"):
        return "systemd"
    if mounts.v1("cpuset") is not None:
        return "v1"
    if mounts.v2_has("cpuset"):
        return "v2"
    raise HostError("no cpuset cgroup controller is mounted (cgroup v1 cpuset, or cgroup v2 "
                    "with cpuset in cgroup.controllers): pinwarden cannot enforce exclusivity "
                    "on this host")


def open_backend(root: Path, *, systemd_address: str = "SYSTEM") -> CgroupBackend:
    """The cpuset backend of the host at ``root``, chosen by :func:`choose_backend`."""
    kind = choose_backend(root)
    if kind == "systemd":
        from pinwarden.enforce import systemd

        return systemd.open_backend(systemd_address, root=root)
    if kind == "v1":
        from pinwarden.enforce.v1 import CpusetV1

        return CpusetV1.from_mounts(root)
    from pinwarden.enforce.v2 import CgroupV2Backend

    return CgroupV2Backend.from_mounts(root)


def layout_names(config: Config, backend: CgroupBackend) -> LayoutNames:
    """The shared partition (``machine`` on v1, ``machine.slice`` on v2 and systemd) and the
    exclusive tree, from the config."""
    # the fake models a cgroup v1 hierarchy
    shared = config.cgroup_v1 if backend.kind in ("v1", "fake") else config.cgroup_v2
    return LayoutNames(shared=shared, exclusive=config.exclusive_cgroup)
