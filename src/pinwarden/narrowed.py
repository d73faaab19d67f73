"""The live pins pinwarden narrowed, as ``status`` shows them.  Pure.

:mod:`pinwarden.libvirt.repin` writes the records (``repin:UUID:LABEL`` change records,
JSON ``{"domain", "before", "after"}``) and gives the pins back; this reads them without
loading any libvirt adapter, so ``status`` stays as light as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

from pinwarden.cpuset import CpuSet, CpuSetError

NARROWED_PREFIX = "repin:"


def narrowed_key(uuid: str, label: str) -> str:
    """The change record of a live pin pinwarden narrowed: ``repin:UUID:LABEL`` (label
    ``vcpu0``, ``emulator``, ``iothread1``)."""
    return f"{NARROWED_PREFIX}{uuid}:{label}"


def key_parts(key: str) -> tuple[str, str]:
    """(uuid, label) of a :func:`narrowed_key` (a UUID holds no ``:``)."""
    uuid, _, label = key.removeprefix(NARROWED_PREFIX).rpartition(":")
    return uuid, label


class Narrowed:
    """One live pin pinwarden narrowed, as its record says (``status``): the domain and
    thread group, the pin pinwarden set, the one it had before, and the CPUs of that one
    free again (not leased now) that it has not got back yet — the daemon's next pass,
    ``pinwarden stop`` or the hook's give-back returns them; a give-back libvirt refused
    leaves them waiting.  (A plain class: a record costs a compile at import, on every
    ``status``.)"""

    __slots__ = ("domain", "had", "label", "pin", "uuid", "waiting")

    def __init__(self, domain: str, uuid: str, label: str, pin: CpuSet, had: CpuSet,
                 waiting: CpuSet) -> None:
        self.domain, self.uuid, self.label = domain, uuid, label
        self.pin, self.had, self.waiting = pin, had, waiting


def record_parts(value: str) -> tuple[str, CpuSet, CpuSet] | None:
    """``(domain, before, after)`` of a narrowed pin's record; None: unreadable."""
    import json  # only when there are records

    try:
        data = json.loads(value)
        return (str(data["domain"]), CpuSet.parse_kernel(str(data["before"])),
                CpuSet.parse_kernel(str(data["after"])))
    except (ValueError, KeyError, TypeError, CpuSetError):
        return None


def narrowed(recorded: Mapping[str, str], leased: CpuSet) -> tuple[Narrowed, ...]:
    """The narrowed pins ``recorded`` (``repin:`` change records) with ``leased`` the CPUs
    leased now; unreadable records are left out (the next give-back forgets them), and so
    are placements recorded as they were made, on the whole shared pool, for a kernel that
    loses them (before Linux 6.2): nothing of those is narrowed."""
    out: list[Narrowed] = []
    for key, value in sorted(recorded.items()):
        uuid, label = key_parts(key)
        parts = record_parts(value)
        if parts is None:
            continue
        domain, had, pin = parts
        if pin == had:
            continue
        out.append(Narrowed(domain, uuid, label, pin, had, had - leased - pin))
    return tuple(sorted(out, key=lambda n: (n.domain, n.uuid, n.label)))
