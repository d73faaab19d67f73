"""What a libvirt-side command needs: settings, and factories for the host snapshot, the
ledger and the cgroup backend.  Shared by ``pinwarden start/stop/define``, the hook and the
daemon so they agree on every path."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pinwarden.config import Config
from pinwarden.errors import HostError
from pinwarden.ledger import Ledger

if TYPE_CHECKING:  # the enforcement modules load only when cgroups are touched: the hook's
    # admission of a shared domain (most starts) never does, and libvirtd waits for it
    from pinwarden.cpuset import CpuSet
    from pinwarden.enforce.apply import Result
    from pinwarden.enforce.backend import CgroupBackend
    from pinwarden.enforce.layout import LayoutNames
    from pinwarden.model import HolderRef, Lease
    from pinwarden.partition import Host

LOCK_NAME = "enforce.lock"


@dataclass(frozen=True)
class Context:
    config: Config
    root: Path
    state_dir: Path
    uri: str

    @functools.cached_property
    def names(self) -> LayoutNames:
        """``machine`` (v1) or ``machine.slice`` (v2) and the exclusive tree, as the
        cgroup version of the host decides (the same rule as ``pinwarden run``)."""
        from pinwarden.enforce.select import layout_names

        return layout_names(self.config, self.backend())

    @property
    def lock_file(self) -> Path:
        return self.state_dir / LOCK_NAME

    def partition_of(self, holder: HolderRef) -> str:
        """The libvirt ``<resource><partition>`` of an exclusive holder's cgroup."""
        try:
            from pinwarden.enforce.layout import libvirt_partition

            return libvirt_partition(self.names, holder)
        except ValueError as exc:
            raise HostError(f"[partition] exclusive = {self.config.exclusive_cgroup!r}: "
                            f"{exc}") from None

    def host(self) -> Host:
        from pinwarden.partition import load_host

        return load_host(self.root, self.config)

    def ledger(self) -> Ledger:
        return Ledger(self.state_dir)

    def backend(self) -> CgroupBackend:
        """The host's cpuset backend (:mod:`pinwarden.enforce.select`)."""
        from pinwarden.enforce.select import open_backend

        return open_backend(self.root)

    def sync(self, host: Host, leases: Sequence[Lease]) -> Result:
        """Make the cgroups match ``leases`` (E1's transactional layout sync; the last
        release removes the exclusive tree, so no kernel refuses to empty it)."""
        from pinwarden.enforce.apply import sync

        return sync(self.backend(), host, leases, self.names, lock_file=self.lock_file)

    def restore(self, result: Result) -> None:
        """Undo a :meth:`sync`: every group it touched goes back to the state read before
        it (groups it created are removed).  Used when a start fails after enforcing."""
        from pinwarden.enforce.apply import execute, locked
        from pinwarden.enforce.layout import order, restore_targets

        touched = {op.path for op in result.ops}
        if not touched:
            return
        backend = self.backend()
        with locked(self.lock_file):
            now = backend.read_state(self.names.paths())
            goal = restore_targets(result.before, now, touched)
            execute(backend, now, order(now, goal))

    def pool(self, host: Host, leased: CpuSet) -> CpuSet:
        from pinwarden.partition import shared_pool

        return shared_pool(host, leased)[0]
