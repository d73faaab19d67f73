"""The names of pinwarden's cgroups: where the shared group and the holder groups live.

Apart from :mod:`~pinwarden.enforce.layout` so that reading the configuration (which checks
the configured names) loads nothing else.  Pure.
"""

from __future__ import annotations

import re

from pinwarden.record import record

DEFAULT_SHARED = "machine"
DEFAULT_EXCLUSIVE = "pinwarden.partition"
PARTITION_SUFFIX = ".partition"

_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
#: What follows ``STEM-`` in a holder group's name (see
#: :func:`pinwarden.enforce.layout.holder_group_name`).
_HOLDER = re.compile(r"(?:vm|lxc|run)-[A-Za-z0-9_-]{1,64}\.partition")


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@record
class LayoutNames:
    """Where the groups live, relative to the cpuset root: the shared group's path and the
    name every holder group's name starts with (``exclusive``: ``STEM.partition``; the
    holders are ``STEM-vm-NAME.partition`` … beside the shared group)."""

    shared: str = DEFAULT_SHARED
    exclusive: str = DEFAULT_EXCLUSIVE

    def __post_init__(self) -> None:
        value = self.shared
        if value != value.strip("/") or not value or "//" in value \
                or any(part in (".", "..") for part in value.split("/")):
            raise ValueError(f"invalid cgroup path {value!r}")
        if not value.isprintable():  # /proc/PID/cgroup lists paths one a line, unescaped
            raise ValueError(f"invalid cgroup path {value!r}: it holds a control or "
                             "separator character")
        if not _STEM.fullmatch(self.stem):
            raise ValueError(f"invalid exclusive name {self.exclusive!r}: holder groups are "
                             f"named after it beside the shared group, so it must be one "
                             f"name such as 'pinwarden.partition' (letters, digits, '_' "
                             f"and '-')")
        if self.is_holder(self.shared) or self.shared == self.legacy:
            raise ValueError(f"the shared group {self.shared!r} would be taken for a holder "
                             f"group of {self.exclusive!r}")

    @property
    def parent(self) -> str:
        """The group the shared and the holder groups live in (``""``: the root)."""
        return self.shared.rpartition("/")[0]

    @property
    def stem(self) -> str:
        return self.exclusive.removesuffix(PARTITION_SUFFIX)

    @property
    def legacy(self) -> str:
        """Where an earlier pinwarden kept every holder (one exclusive tree): removed when
        empty."""
        return join(self.parent, f"{self.stem}{PARTITION_SUFFIX}")

    def is_holder(self, path: str) -> bool:
        """``path`` is a holder group of this layout (by name, whoever the holder is),
        named as a partition or — as a systemd backend lists the groups it was not asked
        for — as its slice (``pinwarden\\x2dvm\\x2dNAME.slice``)."""
        parent, _, name = path.rpartition("/")
        return parent == self.parent and holder_component(name, self.exclusive) is not None


def holder_component(component: str, exclusive: str = DEFAULT_EXCLUSIVE) -> str | None:
    """The holder group name (``STEM-vm-NAME.partition``) that ``component`` (one cgroup
    directory name, as the kernel shows it) stands for in the layout named ``exclusive`` —
    the group itself on cgroupfs hosts, its slice ``STEM\\x2dvm\\x2dNAME.slice`` on
    systemd hosts — else ``None``."""
    stem = exclusive.removesuffix(PARTITION_SUFFIX)
    if component.endswith(".slice"):
        component = _unescape_dashes(component.removesuffix(".slice")) + PARTITION_SUFFIX
    if component.startswith(stem + "-") and \
            _HOLDER.fullmatch(component.removeprefix(stem + "-")) is not None:
        return component
    return None


def is_holder_component(component: str, exclusive: str = DEFAULT_EXCLUSIVE) -> bool:
    """``component`` is a holder group (see :func:`holder_component`)."""
    return holder_component(component, exclusive) is not None


def _unescape_dashes(text: str) -> str:
    """A top-level slice's name back to the partition name libvirt escaped (only the
    characters a holder name can hold: ``\\x2d`` is ``-``)."""
    return text.replace("\\x2d", "-") if "-" not in text else ""
