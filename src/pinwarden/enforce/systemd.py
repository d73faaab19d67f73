"""systemd backend: the cpuset tree driven through systemd's D-Bus API, never through cgroupfs.

When systemd owns the cgroup hierarchy (a cgroup v2 host booted with systemd), writes to
``/sys/fs/cgroup`` behind its back are undone the next time systemd realises a unit's
cgroup, and groups it does not know about confuse it.  So this backend asks systemd
(``org.freedesktop.systemd1.Manager`` at ``/org/freedesktop/systemd1``, see
org.freedesktop.systemd1(5)) to do every write:

=====================  ==================================================================
primitive              D-Bus
=====================  ==================================================================
``mkdir``              ``StartTransientUnit(slice, "fail", [Description], [])``, then
                       wait for the job's ``JobRemoved`` signal (result ``done``)
``rmdir``              ``StopUnit(slice, "fail")`` — only when no unit inside is active
``set_cpus``           ``SetUnitProperties(unit, runtime=true, [AllowedCPUs ay])``
``set_mems``           ``SetUnitProperties(unit, runtime=true, [AllowedMemoryNodes ay])``
``set_partition``      ``SetUnitProperties(unit, true, [CPUSetPartition s])`` (see below)
``attach_process``     ``StartTransientUnit(scope, "fail", [Slice s, PIDs au], [])``
reads                  ``GetUnit`` → object path; ``org.freedesktop.DBus.Properties.Get``
                       of ``ActiveState``/``SliceOf`` (``…systemd1.Unit``) and
                       ``AllowedCPUs``/``EffectiveCPUs``/``AllowedMemoryNodes``/
                       ``EffectiveMemoryNodes``/``ControlGroup`` (``…systemd1.Slice``,
                       ``.Scope`` or ``.Service``)
=====================  ==================================================================

``runtime=true`` leaves a drop-in per setting, ``/run/systemd/system.control/UNIT.d/
50-AllowedCPUs.conf``, that outlives the restore of the original value and overrides the
operator's own drop-ins that sort before it, at every ``daemon-reload`` until the next boot.
So the runtime drop-ins of its settings that exist before pinwarden's first write are
recorded (:meth:`SystemdBackend.setting_files`), and the ones its writes added are removed
again once the original value is back (:meth:`SystemdBackend.remove_setting_files`).

That drop-in does not hold the setting across a ``daemon-reload`` either: a drop-in of the
same name in ``/etc/systemd/system.control`` (a persistent ``systemctl set-property
machine.slice AllowedCPUs=…``, the way the README sets the VM partition) masks it, and one
sorting after it (``override.conf`` of ``systemctl edit``) overrides it.  The reload gave
machine.slice the leased CPUs back, and the kernel invalidated the holder partitions
(tests/test_syslab.py, ``story_reload``).  So the CPUs pinwarden sets on a unit that is not
transient are also written to a drop-in of its own, :data:`OWN_DROPIN` (``zz-pinwarden-
AllowedCPUs.conf``), whose name sorts after every usual one; it goes with the others once
the original value is back.  systemd reports ``NeedDaemonReload=yes`` for the unit while
that file exists and it has not reloaded (the file is not in its list).

CPU sets travel as systemd's byte arrays (CPU *i* is bit ``i % 8`` of byte ``i // 8``,
:meth:`CpuSet.to_dbus`); an empty array means "no restriction" (inherit the parent), exactly
like an empty ``cpuset.cpus`` on cgroup v2.  ``runtime=true`` puts the settings in
``/run/systemd/system.control``: leases do not survive a reboot and neither do their
cpusets.

Paths.  Backend paths are the cgroup v2 paths systemd uses, ``"machine.slice"``,
``"pinwarden\\x2dvm\\x2dA.slice"``; the unit is the last component.  libvirt partition
paths are accepted too and mapped the way libvirt maps ``<partition>`` on systemd hosts:
``"pinwarden-vm-A.partition"`` (partition ``/pinwarden-vm-A``) is
``pinwarden\\x2dvm\\x2dA.slice``, and ``"a.partition/b.partition"`` (``/a/b``) is
``a-b.slice``: each component escaped with :func:`escape_unit_name` (what
``systemd-escape`` prints) and joined by ``-``.  ``""`` is ``-.slice``;
:meth:`SystemdBackend.kernel_path` gives the cgroup directory of any such path.

What exclusivity systemd can express — honestly:

* systemd has no ``cpu_exclusive``; it drives the cpuset controller on the unified (v2)
  hierarchy only (systemd.resource-control(5): ``AllowedCPUs=`` needs cgroup v2, systemd
  244 or newer).  On cgroup v1 hosts use the v1 backend.
* ``AllowedCPUs=`` on sibling slices is confinement, not exclusivity: narrowing
  ``machine.slice`` to the shared pool (VM CPUs − leased) keeps shared VMs off leased CPUs,
  and the per-holder slices ``pinwarden-vm\\x2dA.slice`` confine each holder to its lease.
  But ``system.slice``, ``user.slice``, ``init.scope`` and kernel threads in the root cgroup
  still run on leased CPUs unless the layout narrows them too (the planner decides; this
  backend performs ``set_cpus`` on whatever paths it is given).
* Real exclusivity on v2 is ``cpuset.cpus.partition`` (``root``/``isolated``): the kernel then
  removes the CPUs from every other cgroup's effective set.  **systemd 252 and 257 (Debian
  12 and 13) have no unit property for it** (tests/syslab/FACTS.md 3: reading
  ``CPUSetPartition`` answers ``UnknownProperty``, setting it ``PropertyReadOnly``, the
  string is in no systemd binary).  This backend still asks once
  (``Properties.Get(CPUSetPartition)``), so that a systemd that grows such a property is
  used; where it answers ``UnknownProperty``, **``cpuset.cpus.partition`` is written
  directly**: ``set_partition`` hands that single write to the ``kernel`` backend (the v2
  backend on the unified mount) at the unit's ``ControlGroup`` path.  This is the one
  cgroupfs write pinwarden does on a systemd host.  It is safe because systemd never writes
  or resets that file — the lab watched it through ``daemon-reload``, restarts of unrelated
  services, ``set-property`` of the same and other slices, a libvirtd restart and domains
  starting and stopping inside (FACTS.md 4) — but a partition lives only while systemd
  keeps the cpuset controller enabled on its path, that is while the slice and its parents
  have ``AllowedCPUs`` (the layout always gives them one), and the partition is lost when
  the slice is stopped.  systemd never reports a partition's validity, so the partition
  state (and the kernel's "invalid" reason) is always read from the kernel.
* Reads follow the v2 backend's convention: a valid partition's ``effective_cpus`` is what
  its subtree may use (systemd's ``EffectiveCPUs``, from which the kernel removed the CPUs
  given to child partitions, plus those), and ``-.slice`` is an exclusive group whose cpus
  are its effective set.
* Slices never hold processes themselves (systemd puts them in scopes and services below),
  so a slice is never ``populated`` and ``tasks()`` of a slice is empty.

Errors.  Primitives raise :class:`~pinwarden.enforce.backend.CgroupOpError`: a
:class:`SystemdOpError` when systemd answered with a D-Bus error or a failed job (errno as
sd-bus maps that error name, ``detail`` one line naming the unit, systemd's answer and what
to do; :meth:`SystemdOpError.as_enforce_error` is the user-facing :class:`EnforceError`),
a plain ``CgroupOpError`` for what is refused before asking (``EINVAL`` for a path that is
no unit, ``EBUSY`` for stopping a slice with running units, ``EOPNOTSUPP`` for threads).
Failing to reach systemd at all is an :class:`EnforceError` from :meth:`SystemdBus.connect`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import string
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Final

from jeepney import DBusAddress, DBusErrorResponse, MessageType, new_method_call
from jeepney.bus_messages import MatchRule, message_bus
from jeepney.io.blocking import DBusConnection, Proxy, open_dbus_connection
from jeepney.low_level import HeaderFields

from pinwarden.cpuset import CpuSet
from pinwarden.enforce.backend import (
    CgroupBackend,
    CgroupOpError,
    GroupState,
    HeldBy,
    PartitionKind,
    Snapshot,
    collect_snapshot,
    join,
)
from pinwarden.enforce.v2 import (
    CgroupV2Backend,
    forbidden_isolated_cpus,
    forbidden_partition_cpus,
)
from pinwarden.errors import EnforceError, HostError
from pinwarden.record import record

# -- names ------------------------------------------------------------------------------

SYSTEMD_BUS_NAME: Final = "org.freedesktop.systemd1"
MANAGER_PATH: Final = "/org/freedesktop/systemd1"
MANAGER_IFACE: Final = "org.freedesktop.systemd1.Manager"
UNIT_IFACE: Final = "org.freedesktop.systemd1.Unit"
PROPERTIES_IFACE: Final = "org.freedesktop.DBus.Properties"

#: Interface carrying the cgroup properties, by unit suffix (org.freedesktop.systemd1(5)).
TYPE_IFACES: Final = {
    "slice": "org.freedesktop.systemd1.Slice",
    "scope": "org.freedesktop.systemd1.Scope",
    "service": "org.freedesktop.systemd1.Service",
}

#: systemd's UNIT_NAME_MAX is 256 including the NUL.
UNIT_NAME_MAX: Final = 255
ROOT_SLICE: Final = "-.slice"

# unit-name.c VALID_CHARS without '-' and '\\', which unit_name_escape() always escapes.
_PLAIN = frozenset(string.ascii_letters + string.digits + ":_.")
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + ":_.-\\@")


def escape_unit_name(text: str) -> str:
    """Escape ``text`` for use in a unit name, byte for byte what ``systemd-escape TEXT`` prints.

    systemd.unit(5), "String Escaping for Inclusion in Unit Names": ``/`` becomes ``-``;
    every other byte that is not an ASCII letter, digit, ``:``, ``_`` or ``.`` becomes a
    C-style ``\\xNN`` escape (lowercase hex, UTF-8 bytes), and so does a leading ``.``.
    """
    out: list[str] = []
    for i, byte in enumerate(text.encode()):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif ch in _PLAIN and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unit_type(name: str) -> str:
    """``"slice"``, ``"scope"``, ``"service"`` …: the suffix after the last dot."""
    return name.rpartition(".")[2]


def is_valid_unit_name(name: str) -> bool:
    """systemd's ``unit_name_is_valid(PLAIN|INSTANCE)`` for the characters we ever produce,
    plus ``slice_name_is_valid`` for slices (no leading, trailing or doubled ``-``)."""
    prefix, dot, suffix = name.rpartition(".")
    if not dot or not prefix or not suffix or len(name) > UNIT_NAME_MAX:
        return False
    if any(c not in _NAME_CHARS for c in prefix):
        return False
    if suffix == "slice" and name != ROOT_SLICE:
        return not (prefix.startswith("-") or prefix.endswith("-") or "--" in prefix)
    return True


def parent_slice(name: str) -> str:
    """The slice a slice lives in: ``a-b-c.slice`` → ``a-b.slice``; ``a.slice`` → ``-.slice``."""
    prefix = name.removesuffix(".slice")
    head, dash, _ = prefix.rpartition("-")
    return f"{head}.slice" if dash else ROOT_SLICE


def slice_cgroup_path(name: str) -> str:
    """Cgroup path (relative to the v2 mount) of a slice: ``a-b.slice`` → ``a.slice/a-b.slice``."""
    if name == ROOT_SLICE:
        return ""
    parts: list[str] = []
    cur = name
    while cur != ROOT_SLICE:
        parts.append(cur)
        cur = parent_slice(cur)
    return "/".join(reversed(parts))


_UNIT_SUFFIXES = (".slice", ".scope", ".service")
#: libvirt adds no ``.partition`` suffix to these top-level partitions (vircgroup.c).
_LIBVIRT_TOP = frozenset({"machine", "system", "user"})


def unescape_unit_name(text: str) -> str:
    """Inverse of :func:`escape_unit_name` (``systemd-escape --unescape``); ``ValueError``
    on a malformed escape or bytes that are not UTF-8."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "-":
            out += b"/"
        elif ch == "\\":
            digits = text[i + 2:i + 4]
            if text[i + 1:i + 2] != "x" or len(digits) != 2 or \
                    any(c not in string.hexdigits for c in digits):
                raise ValueError(f"bad escape at position {i} of {text!r}")
            out.append(int(digits, 16))
            i += 3
        else:
            out += ch.encode()
        i += 1
    return out.decode()


def unit_for_path(path: str) -> str:
    """The unit a backend path stands for (see the module docstring); ``ValueError`` if none.

    A component that is a unit name (``*.slice``, ``*.scope``, ``*.service``) is that unit and
    must sit where systemd puts it; any other component is a libvirt partition name,
    ``NAME.partition`` or ``NAME``, the slice ``<parent prefix>-<escaped NAME>.slice``.

    >>> unit_for_path("pinwarden-vm-A.partition")
    'pinwarden\\\\x2dvm\\\\x2dA.slice'
    """
    if path == "":
        return ROOT_SLICE
    if any(not part for part in path.split("/")):
        raise ValueError(f"empty component in cgroup path {path!r}")
    parent, _, last = path.rpartition("/")
    parent_unit = unit_for_path(parent)
    if unit_type(parent_unit) != "slice":
        raise ValueError(f"{path!r}: only slices contain other units, {parent_unit} is not one")
    if last.endswith(_UNIT_SUFFIXES):
        unit = last
        if unit_type(unit) == "slice" and parent_slice(unit) != parent_unit:
            raise ValueError(f"{unit!r} cannot be at {path!r}: systemd puts it under "
                             f"{slice_cgroup_path(parent_slice(unit)) or '/'}")
    else:
        name = last.removesuffix(".partition")
        if not name:
            raise ValueError(f"empty partition name in cgroup path {path!r}")
        prefix = "" if parent_unit == ROOT_SLICE else parent_unit.removesuffix(".slice") + "-"
        unit = f"{prefix}{escape_unit_name(name)}.slice"
    if not is_valid_unit_name(unit):
        raise ValueError(f"{unit!r} (for cgroup path {path!r}) is not a valid unit name")
    return unit


def child_name(parent_path: str, unit: str) -> str:
    """How a unit found inside ``parent_path`` is named in that path's style.

    Under a libvirt-partition path (or the root), a child slice is named back as a partition
    (``vm-A.partition``; ``machine`` at the top, like libvirt); otherwise, and whenever that
    would not map back to ``unit``, the child is its unit name.
    """
    last = parent_path.rpartition("/")[2]
    if unit_type(unit) == "slice" and not last.endswith(_UNIT_SUFFIXES):
        try:
            parent_unit = unit_for_path(parent_path)
            prefix = "" if parent_unit == ROOT_SLICE else \
                parent_unit.removesuffix(".slice") + "-"
            if unit.startswith(prefix):
                name = unescape_unit_name(unit[len(prefix):].removesuffix(".slice"))
                plain = parent_path == "" and name in _LIBVIRT_TOP
                candidate = name if plain or "." in name else f"{name}.partition"
                if unit_for_path(join(parent_path, candidate)) == unit:
                    return candidate
        except ValueError:
            pass
    return unit


# -- D-Bus errors -----------------------------------------------------------------------

#: D-Bus error name → errno, following sd-bus's bus_standard_errors/bus_common_errors maps.
_ERRNO_BY_NAME: Final = {
    "org.freedesktop.systemd1.NoSuchUnit": errno.ENOENT,
    "org.freedesktop.systemd1.UnitExists": errno.EEXIST,
    "org.freedesktop.systemd1.UnitMasked": errno.ERFKILL,
    "org.freedesktop.systemd1.NoSuchJob": errno.ENOENT,
    "org.freedesktop.systemd1.TransactionIsDestructive": errno.EDEADLK,
    "org.freedesktop.DBus.Error.InvalidArgs": errno.EINVAL,
    "org.freedesktop.DBus.Error.PropertyReadOnly": errno.EROFS,
    "org.freedesktop.DBus.Error.UnknownProperty": errno.EOPNOTSUPP,
    "org.freedesktop.DBus.Error.UnknownMethod": errno.EOPNOTSUPP,
    "org.freedesktop.DBus.Error.UnknownObject": errno.ENOENT,
    "org.freedesktop.DBus.Error.UnixProcessIdUnknown": errno.ESRCH,
    "org.freedesktop.DBus.Error.AccessDenied": errno.EACCES,
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": errno.EACCES,
    "org.freedesktop.DBus.Error.ServiceUnknown": errno.EHOSTDOWN,
    "org.freedesktop.DBus.Error.NameHasNoOwner": errno.EHOSTDOWN,
    "org.freedesktop.DBus.Error.NoReply": errno.ETIMEDOUT,
    "org.freedesktop.DBus.Error.Timeout": errno.ETIMEDOUT,
    "org.freedesktop.DBus.Error.FileNotFound": errno.ENOENT,
    "org.freedesktop.DBus.Error.NotSupported": errno.EOPNOTSUPP,
    "org.freedesktop.DBus.Error.Disconnected": errno.ECONNRESET,
}
_DISCONNECTED: Final = "org.freedesktop.DBus.Error.Disconnected"
#: Errors this client makes up itself (no answer, lost connection): systemd refused nothing.
_LOCAL_ERRORS: Final = frozenset({_DISCONNECTED, "org.freedesktop.DBus.Error.Timeout"})


def errno_for(dbus_name: str) -> int:
    """errno for a D-Bus error name; sd-bus sends unmapped errnos as ``System.Error.EXXX``."""
    if dbus_name.startswith("System.Error."):
        return int(getattr(errno, dbus_name.removeprefix("System.Error."), errno.EIO))
    return _ERRNO_BY_NAME.get(dbus_name, errno.EIO)


def _hint(dbus_name: str, err: int, unit: str, prop: str | None) -> str:
    if err == errno.EHOSTDOWN:
        return ("systemd is not on this bus: on hosts not booted with systemd use the cgroup "
                "v1/v2 backend")
    if err == errno.EACCES:
        return "run pinwarden as root (systemd's polkit check refused the change)"
    if err == errno.ENOENT:
        return (f"{unit} is not loaded (stopped or never created); check `systemctl status "
                f"{unit}` and re-run the command")
    if err == errno.ERFKILL:
        return f"{unit} is masked; `systemctl unmask {unit}` if pinwarden may use it"
    if err == errno.EEXIST:
        return (f"another {unit} already exists (a unit file or an earlier run); check "
                f"`systemctl status {unit}` and stop it if it is stale")
    if dbus_name.endswith("PropertyReadOnly") and prop:
        return f"this systemd does not support {prop}= (check `systemctl --version`)"
    if err == errno.ENXIO:
        return (f"systemd could not read the {prop or 'property'} value: a pinwarden bug, "
                f"please report it")
    if err == errno.ESRCH:
        return "the process exited before it could be moved; start it again"
    if err == errno.ECONNRESET:
        return "the system bus went away (dbus restarted?); run the command again"
    if err == errno.ETIMEDOUT:
        return "systemd did not answer in time; check `systemctl is-system-running`"
    return f"check `journalctl -u {unit}` for systemd's reason"


#: errno for a job that ended without result ``done`` (org.freedesktop.systemd1(5),
#: ``JobRemoved``: done, canceled, timeout, failed, dependency, skipped).
_JOB_ERRNO: Final = {"canceled": errno.ECANCELED, "timeout": errno.ETIMEDOUT}


class SystemdOpError(CgroupOpError):
    """systemd refused or failed a request; ``detail`` is the one-line explanation.

    ``dbus_name`` is the D-Bus error systemd answered with, or ``""`` when the call was
    accepted but its job ended with another result than ``done`` (``job_result``)."""

    def __init__(self, action: str, path: str, unit: str, dbus_name: str, message: str, *,
                 value: str | None = None, prop: str | None = None,
                 job_result: str | None = None) -> None:
        self.unit = unit
        self.dbus_name = dbus_name
        self.dbus_message = message
        self.job_result = job_result
        if job_result is not None:
            err = _JOB_ERRNO.get(job_result, errno.EIO)
            self.hint = (f"check `systemctl status {unit}` and `journalctl -u {unit}` for "
                         f"systemd's reason")
            tag = ""
        else:
            err = errno_for(dbus_name)
            self.hint = _hint(dbus_name, err, unit, prop)
            tag = f" [{dbus_name}]"
        lead = ("could not reach systemd to" if dbus_name in _LOCAL_ERRORS else
                "systemd refused to")
        self.one_line = (f"{lead} {_VERBS.get(action, action)} {unit}"
                         f"{f' = {value}' if value is not None else ''}: "
                         f"{message.rstrip('.') or dbus_name}{tag}; {self.hint}")
        super().__init__(action, path, err, value=value, detail=self.one_line)

    def as_enforce_error(self) -> EnforceError:
        return EnforceError(self.one_line)


_VERBS: Final = {
    "mkdir": "create", "rmdir": "stop", "cpus": "set AllowedCPUs of",
    "mems": "set AllowedMemoryNodes of", "partition": "set CPUSetPartition of",
    "attach": "attach a process to", "read": "read",
}


class DBusCallError(Exception):
    """A D-Bus error reply (internal; the backend turns it into :class:`SystemdOpError`)."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(f"{name}: {message}")


# -- the D-Bus adapter ------------------------------------------------------------------

Variant = tuple[str, Any]
Property = tuple[str, Variant]

_ACTIVE_STATES: Final = frozenset({"active", "activating", "reloading", "deactivating"})

#: Where ``SetUnitProperties(runtime=true)`` keeps the settings of a unit that is not
#: transient: ``UNIT.d/50-PROPERTY.conf`` (systemd's ``unit_write_setting``; FACTS.md 3).
RUNTIME_CONTROL: Final = PurePosixPath("/run/systemd/system.control")
#: The properties pinwarden sets on units.
_SETTINGS: Final = ("AllowedCPUs", "AllowedMemoryNodes")
#: The drop-ins pinwarden's own writes make there.
SETTING_DROPINS: Final = frozenset(f"50-{prop}.conf" for prop in _SETTINGS)
#: pinwarden's own drop-in there for each setting it makes on a unit that is not transient:
#: the same value, under a name that sorts after every usual drop-in name (systemd applies
#: drop-ins in the order of their file names, and one in /etc masks one of the same name
#: in /run), so that a ``daemon-reload`` keeps it.
OWN_DROPIN: Final = "zz-pinwarden-{prop}.conf"
_OWN_DROPIN_HEADER: Final = (
    "# Written by pinwarden while CPUs are leased ('pinwarden status'), and removed when the\n"
    "# last lease ends: it keeps the leased CPUs out of this unit across a daemon-reload,\n"
    "# which would otherwise load the unit's own setting again.  Do not edit.\n")


class SystemdBus:
    """The few systemd Manager calls pinwarden needs, over one jeepney connection.

    Every method raises :class:`DBusCallError` on an error reply.  Job-creating calls
    (``StartTransientUnit``, ``StopUnit``) wait for the job's ``JobRemoved`` signal: systemd
    answers the call as soon as the job is queued, and the cgroup exists only once it ran.
    """

    def __init__(self, conn: DBusConnection, *, timeout: float = 30.0) -> None:
        self._conn = conn
        self._timeout = timeout
        self._jobs: deque[Any] = deque()
        # The bus filters on the owner of org.freedesktop.systemd1 (no spoofed signals); the
        # local filter cannot, as signals carry the sender's unique name.
        local = MatchRule(type="signal", interface=MANAGER_IFACE, member="JobRemoved",
                          path=MANAGER_PATH)
        self._job_filter = conn.filter(local, queue=self._jobs)
        Proxy(message_bus, conn, timeout=timeout).AddMatch(
            MatchRule(type="signal", sender=SYSTEMD_BUS_NAME, interface=MANAGER_IFACE,
                      member="JobRemoved", path=MANAGER_PATH))
        # org.freedesktop.systemd1(5): "Signals are only sent out if at least one client
        # invoked [Subscribe]".
        self.call(MANAGER_PATH, MANAGER_IFACE, "Subscribe", "", ())

    @classmethod
    def connect(cls, address: str = "SYSTEM", *, timeout: float = 30.0) -> SystemdBus:
        """Connect to the bus at ``address`` (``"SYSTEM"``, ``"SESSION"`` or a D-Bus address)."""
        try:
            conn = open_dbus_connection(bus=address)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise EnforceError(f"cannot reach systemd: no D-Bus connection to {address} "
                               f"({exc}); on hosts not booted with systemd use the cgroup "
                               f"v1/v2 backend") from None
        try:
            return cls(conn, timeout=timeout)
        except (DBusCallError, DBusErrorResponse, TimeoutError) as exc:
            conn.close()
            raise EnforceError(f"cannot reach systemd on {address}: {exc}; on hosts not "
                               f"booted with systemd use the cgroup v1/v2 backend") from None

    def close(self) -> None:
        self._job_filter.close()
        self._conn.close()

    # -- raw calls

    def call(self, path: str, interface: str, member: str, signature: str,
             body: tuple[Any, ...]) -> tuple[Any, ...]:
        addr = DBusAddress(path, bus_name=SYSTEMD_BUS_NAME, interface=interface)
        msg = new_method_call(addr, member, signature or None, body)
        try:
            reply = self._conn.send_and_get_reply(msg, timeout=self._timeout)
        except TimeoutError:
            raise DBusCallError("org.freedesktop.DBus.Error.Timeout",
                                f"no answer to {member} within {self._timeout:g} s") from None
        except OSError as exc:
            raise DBusCallError(_DISCONNECTED, f"D-Bus connection lost during {member} "
                                               f"({exc.strerror or exc})") from None
        if reply.header.message_type == MessageType.error:
            name = str(reply.header.fields.get(HeaderFields.error_name, "unknown"))
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise DBusCallError(name, text)
        return tuple(reply.body)

    def _manager(self, member: str, signature: str, *args: Any) -> tuple[Any, ...]:
        return self.call(MANAGER_PATH, MANAGER_IFACE, member, signature, args)

    # -- Manager methods (org.freedesktop.systemd1(5))

    def get_unit(self, name: str) -> str:
        """``GetUnit(in s name, out o unit)``: only units already in memory."""
        return str(self._manager("GetUnit", "s", name)[0])

    def load_unit(self, name: str) -> str:
        """``LoadUnit(in s name, out o unit)``: loads the unit if needed."""
        return str(self._manager("LoadUnit", "s", name)[0])

    def set_unit_properties(self, name: str, runtime: bool, props: Sequence[Property]) -> None:
        """``SetUnitProperties(in s name, in b runtime, in a(sv) properties)``."""
        self._manager("SetUnitProperties", "sba(sv)", name, runtime, list(props))

    def start_transient_unit(self, name: str, mode: str, props: Sequence[Property],
                             aux: Sequence[tuple[str, list[Property]]] = ()) -> str:
        """``StartTransientUnit(in s name, in s mode, in a(sv) properties,
        in a(sa(sv)) aux, out o job)``, then wait for the job; returns its result."""
        job = str(self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))", name, mode,
                                list(props), list(aux))[0])
        return self._wait_job(job)

    def stop_unit(self, name: str, mode: str) -> str:
        """``StopUnit(in s name, in s mode, out o job)``, then wait for the job."""
        return self._wait_job(str(self._manager("StopUnit", "ss", name, mode)[0]))

    def get_property(self, path: str, interface: str, name: str) -> Variant:
        """``org.freedesktop.DBus.Properties.Get(in s interface, in s name, out v value)``."""
        value = self.call(path, PROPERTIES_IFACE, "Get", "ss", (interface, name))[0]
        return (str(value[0]), value[1])

    def _wait_job(self, job: str) -> str:
        """Wait for ``JobRemoved(u id, o job, s unit, s result)`` of ``job``; its result.

        Only the job just queued can still be pending, so other queued signals are stale
        (jobs of other clients) and dropped.
        """
        while self._jobs:
            msg = self._jobs.popleft()
            if len(msg.body) == 4 and msg.body[1] == job:
                return str(msg.body[3])
        while True:
            try:
                msg = self._conn.recv_until_filtered(self._jobs, timeout=self._timeout)
            except TimeoutError:
                raise DBusCallError("org.freedesktop.DBus.Error.Timeout",
                                    f"job {job} did not finish within "
                                    f"{self._timeout:g} s") from None
            except OSError as exc:
                raise DBusCallError(_DISCONNECTED, f"D-Bus connection lost waiting for job "
                                                   f"{job} ({exc.strerror or exc})") from None
            if len(msg.body) == 4 and msg.body[1] == job:
                return str(msg.body[3])


# -- the backend ------------------------------------------------------------------------

_PARTITION_VALUE: Final[dict[PartitionKind, str]] = {
    "member": "member", "exclusive": "root", "isolated": "isolated",
}
_PARTITION_KIND: Final[dict[str, PartitionKind]] = {v: k for k, v in _PARTITION_VALUE.items()}


@record
class UnitInfo:
    """One unit as systemd reports it (the backend's raw read, before :class:`GroupState`)."""

    name: str
    object_path: str
    active_state: str
    allowed_cpus: CpuSet
    effective_cpus: CpuSet
    allowed_mems: CpuSet
    effective_mems: CpuSet
    control_group: str
    consists_of: tuple[str, ...]
    cpuset_partition: str | None  # None: this systemd has no CPUSetPartition property


class SystemdBackend:
    """:class:`~pinwarden.enforce.backend.CgroupBackend` over systemd's D-Bus API.

    ``kernel`` (optional) is the cgroup v2 backend on the unified mount.  It is used read-only
    for the partition state the kernel actually accepted, and for the one write systemd may
    not be able to express: ``cpuset.cpus.partition`` (see the module docstring).
    """

    def __init__(self, bus: SystemdBus, *, kernel: CgroupBackend | None = None,
                 root: Path = Path("/")) -> None:
        self._bus = bus
        self._kernel = kernel
        self._root = root
        self._partition_supported: bool | None = None
        self._scope_serial = itertools.count(1)
        self._names: dict[tuple[str, str], str] = {}  # (parent path, unit) -> name used
        self._transient: dict[str, bool] = {}  # unit -> made by StartTransientUnit

    @property
    def kind(self) -> str:
        return "systemd"

    def close(self) -> None:
        """Close the D-Bus connection (the lease manager does, once, when it is done)."""
        self._bus.close()

    def partition_forbidden_cpus(self) -> CpuSet:
        """The kernel's rule for cgroup v2 partitions, whoever writes them (systemd's
        ``CPUSetPartition=`` or the kernel backend): ``isolcpus=`` CPUs on 6.12+."""
        if isinstance(self._kernel, CgroupV2Backend):
            return self._kernel.partition_forbidden_cpus()
        return forbidden_partition_cpus()

    def isolated_forbidden_cpus(self) -> CpuSet:
        """The same rule for ``isolated`` partitions (6.12 refuses them over ``isolcpus=``
        CPUs too, 7.3 does not)."""
        if isinstance(self._kernel, CgroupV2Backend):
            return self._kernel.isolated_forbidden_cpus()
        return forbidden_isolated_cpus()

    def partitions_holding(self, cpus: CpuSet) -> tuple[HeldBy, ...]:
        """The cgroup partitions that hold any of ``cpus`` (the kernel's tree, read as
        :meth:`CgroupV2Backend.partitions_holding` reads it)."""
        if isinstance(self._kernel, CgroupV2Backend):
            return self._kernel.partitions_holding(cpus)
        return ()

    # -- helpers

    def _unit(self, action: str, path: str) -> str:
        """The unit for ``path``; remembers how the caller names it (see :meth:`_children`)."""
        try:
            unit = unit_for_path(path)
        except ValueError as exc:
            raise CgroupOpError(action, path, errno.EINVAL, detail=str(exc)) from None
        while path:
            parent, _, last = path.rpartition("/")
            self._names[(parent, unit_for_path(path))] = last
            path = parent
        return unit

    def _children(self, path: str, units: Iterable[str]) -> tuple[str, ...]:
        """Child names as the caller spells them: the names it used for those units under
        this path, else :func:`child_name` — or, at the top, unit names when the caller
        names top-level groups by unit (``machine.slice``).  So one unit never appears
        under two paths in a snapshot."""
        units_style = path == "" and any(
            name.endswith(_UNIT_SUFFIXES) for (parent, _), name in self._names.items()
            if parent == "")
        return tuple(sorted(self._names.get((path, u)) or (u if units_style else
                                                           child_name(path, u))
                            for u in units))

    def _fail(self, exc: DBusCallError, action: str, path: str, unit: str, *,
              value: str | None = None, prop: str | None = None) -> SystemdOpError:
        return SystemdOpError(action, path, unit, exc.name, exc.message, value=value,
                              prop=prop)

    def _iface(self, unit: str) -> str:
        return TYPE_IFACES.get(unit_type(unit), UNIT_IFACE)

    def _supports_partition(self) -> bool:
        """Does this systemd know ``CPUSetPartition`` (asked once, on ``-.slice``)?

        :class:`DBusCallError` for any answer but sd-bus's ``UnknownProperty``.
        """
        if self._partition_supported is None:
            try:
                obj = self._bus.get_unit(ROOT_SLICE)
                self._bus.get_property(obj, TYPE_IFACES["slice"], "CPUSetPartition")
                self._partition_supported = True
            except DBusCallError as exc:
                if exc.name != "org.freedesktop.DBus.Error.UnknownProperty":
                    raise
                self._partition_supported = False
        return self._partition_supported

    def unit_info(self, unit: str, *, object_path: str | None = None) -> UnitInfo:
        """Read one loaded unit; :class:`DBusCallError` (``NoSuchUnit``) if not in memory."""
        obj = object_path if object_path is not None else self._bus.get_unit(unit)
        iface = self._iface(unit)
        get = self._bus.get_property

        def cpus(name: str) -> CpuSet:
            sig, value = get(obj, iface, name)
            if sig != "ay":
                raise DBusCallError("org.freedesktop.DBus.Error.InvalidSignature",
                                    f"{name} has type {sig!r}, expected 'ay'")
            try:
                return CpuSet.from_dbus(value)
            except ValueError as exc:  # more CPUs than Linux can have
                raise DBusCallError("org.freedesktop.DBus.Error.InvalidArgs",
                                    f"{name}: {exc}") from None

        consists: tuple[str, ...] = ()
        if unit_type(unit) == "slice":
            # the units a slice contains: ``SliceOf`` (a slice's ``ConsistsOf`` is empty on
            # systemd 252 and 257 — FACTS.md 4, the cause of a failed read-back)
            consists = tuple(str(n) for n in get(obj, UNIT_IFACE, "SliceOf")[1])
        partition = None
        if unit_type(unit) == "slice" and self._supports_partition():
            partition = str(get(obj, iface, "CPUSetPartition")[1])
        return UnitInfo(
            name=unit, object_path=obj,
            active_state=str(get(obj, UNIT_IFACE, "ActiveState")[1]),
            allowed_cpus=cpus("AllowedCPUs"), effective_cpus=cpus("EffectiveCPUs"),
            allowed_mems=cpus("AllowedMemoryNodes"),
            effective_mems=cpus("EffectiveMemoryNodes"),
            control_group=str(get(obj, iface, "ControlGroup")[1]),
            consists_of=tuple(sorted(consists)), cpuset_partition=partition)

    # -- reads

    def _partition(self, info: UnitInfo) -> tuple[PartitionKind, str | None]:
        """(kind, kernel's invalid reason): the kernel's verdict when a ``kernel`` backend is
        given, else what systemd was told (``CPUSetPartition``), else ``member``."""
        if info.name == ROOT_SLICE:
            return "exclusive", None  # the root cgroup is always a partition root
        if self._kernel is not None and info.control_group.strip("/"):
            try:
                state = self._kernel.read_group(info.control_group.strip("/"))
            except CgroupOpError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: no cpuset files, so a member
                    raise
                return "member", None
            return state.partition, state.partition_error
        return _PARTITION_KIND.get(info.cpuset_partition or "member", "member"), None

    def _granted(self, units: Iterable[str]) -> CpuSet:
        """CPUs of the valid partitions among ``units`` and below: cgroup v2 takes them out
        of the parent's ``EffectiveCPUs`` although they belong to its subtree."""
        out = CpuSet()
        for unit in units:
            if unit_type(unit) != "slice":
                continue
            info = self.unit_info(unit)
            kind, reason = self._partition(info)
            if kind != "member" and reason is None and info.active_state in _ACTIVE_STATES:
                out = out | info.effective_cpus | self._granted(info.consists_of)
        return out

    def read_group(self, path: str) -> GroupState:
        """One group, in the v2 backend's terms: ``effective_cpus`` of a valid partition is
        what its subtree may use (systemd's ``EffectiveCPUs`` plus the CPUs of valid child
        partitions), and the root is an exclusive group whose cpus are its effective set."""
        unit = self._unit("read", path)
        try:
            info = self.unit_info(unit)
        except DBusCallError as exc:
            raise self._fail(exc, "read", path, unit) from None
        if info.active_state not in _ACTIVE_STATES:
            raise CgroupOpError("read", path, errno.ENOENT,
                                detail=f"{unit} is {info.active_state}: it has no cgroup")
        try:
            partition, partition_error = self._partition(info)
            effective = info.effective_cpus
            if partition != "member" and partition_error is None:
                effective = effective | self._granted(info.consists_of)
        except DBusCallError as exc:
            raise self._fail(exc, "read", path, unit) from None
        populated = unit_type(unit) != "slice"  # slices never hold processes themselves
        return GroupState(
            path=path, cpus=effective if unit == ROOT_SLICE else info.allowed_cpus,
            mems=info.allowed_mems, partition=partition, effective_cpus=effective,
            effective_mems=info.effective_mems, populated=populated,
            children=self._children(path, info.consists_of), partition_error=partition_error)

    def read_state(self, paths: Iterable[str]) -> Snapshot:
        paths = list(paths)
        for path in paths:
            self._unit("read", path)  # learn the caller's names first
        return collect_snapshot(self.read_group, paths)

    def tasks(self, path: str) -> tuple[int, ...]:
        unit = self._unit("read", path)
        if unit_type(unit) == "slice":
            return ()
        if self._kernel is None:
            raise CgroupOpError("read", path, errno.EOPNOTSUPP,
                                detail=f"listing the threads of {unit} needs the cgroup v2 "
                                       f"backend (systemd only lists processes)")
        try:
            cgroup = self.unit_info(unit).control_group
        except DBusCallError as exc:
            raise self._fail(exc, "read", path, unit) from None
        return self._kernel.tasks(cgroup.strip("/"))

    # -- writes

    def mkdir(self, path: str) -> None:
        unit = self._unit("mkdir", path)
        if unit_type(unit) != "slice" or unit == ROOT_SLICE:
            raise CgroupOpError("mkdir", path, errno.EINVAL,
                                detail=f"{unit}: only slices can be created")
        props: list[Property] = [("Description", ("s", f"pinwarden cpuset group {path}"))]
        try:
            result = self._bus.start_transient_unit(unit, "fail", props)
        except DBusCallError as exc:
            raise self._fail(exc, "mkdir", path, unit) from None
        if result != "done":
            raise SystemdOpError("mkdir", path, unit, "",
                                 f"the start job of {unit} ended with result {result!r}",
                                 job_result=result)
        self._transient[unit] = True

    def rmdir(self, path: str) -> None:
        unit = self._unit("rmdir", path)
        try:
            info = self.unit_info(unit)
            busy = [u for u in info.consists_of
                    if str(self._bus.get_property(self._bus.load_unit(u), UNIT_IFACE,
                                                  "ActiveState")[1]) in _ACTIVE_STATES]
        except DBusCallError as exc:
            raise self._fail(exc, "rmdir", path, unit) from None
        transient = self._transient.get(unit)
        if transient is None:  # (another process of pinwarden's may have made or set it)
            with contextlib.suppress(DBusCallError):
                transient = bool(self._bus.get_property(self._bus.load_unit(unit),
                                                        UNIT_IFACE, "Transient")[1])
        if busy:
            # Stopping a slice stops everything in it: refuse, as rmdir of a busy cgroup would.
            raise CgroupOpError("rmdir", path, errno.EBUSY,
                                detail=f"{unit} still contains active units: "
                                       f"{', '.join(busy)}")
        try:
            result = self._bus.stop_unit(unit, "fail")
        except DBusCallError as exc:
            raise self._fail(exc, "rmdir", path, unit) from None
        if result != "done":
            raise SystemdOpError("rmdir", path, unit, "",
                                 f"the stop job of {unit} ended with result {result!r}",
                                 job_result=result)
        if transient is False:
            # A slice pinwarden did not create (machined's, for a domain the daemon
            # adopted) keeps the runtime drop-ins pinwarden's writes made it — systemd's
            # and pinwarden's own — until the next boot: they go with the group (its
            # settings are pinwarden's alone: systemd-lab hunt)
            folder = self._root / RUNTIME_CONTROL.relative_to("/") / f"{unit}.d"
            for prop in _SETTINGS:
                for name in (f"50-{prop}.conf", OWN_DROPIN.format(prop=prop)):
                    with contextlib.suppress(OSError):
                        (folder / name).unlink()
            with contextlib.suppress(OSError):  # (left if somebody else's files are there)
                folder.rmdir()

    def _set(self, action: str, path: str, prop: str, value: Variant, shown: str) -> None:
        unit = self._unit(action, path)
        try:
            self._bus.set_unit_properties(unit, True, [(prop, value)])
        except DBusCallError as exc:
            raise self._fail(exc, action, path, unit, value=shown, prop=prop) from None

    def _set_kept(self, action: str, path: str, prop: str, value: CpuSet) -> None:
        """``SetUnitProperties(runtime=true)`` of a CPU or node set; on a unit that is not
        transient the value goes to :data:`OWN_DROPIN` first (put back as it was if systemd
        refuses the setting), so that a ``daemon-reload`` keeps it."""
        unit = self._unit(action, path)
        shown = value.to_list()
        transient = self._transient.get(unit)
        if transient is None:
            try:
                transient = bool(self._bus.get_property(self._bus.load_unit(unit),
                                                        UNIT_IFACE, "Transient")[1])
            except DBusCallError as exc:
                raise self._fail(exc, action, path, unit, value=shown, prop=prop) from None
            self._transient[unit] = transient
        if transient:  # pinwarden's own slices: systemd keeps their settings itself
            self._set(action, path, prop, ("ay", value.to_dbus()), shown)
            return
        file = self._root / RUNTIME_CONTROL.relative_to("/") / f"{unit}.d" / \
            OWN_DROPIN.format(prop=prop)
        try:
            before: str | None = file.read_text()
        except FileNotFoundError:
            before = None
        except OSError as exc:
            raise CgroupOpError(action, path, exc.errno or errno.EIO, value=shown,
                                detail=f"cannot read {file}: {exc.strerror or exc}") from None
        section = unit_type(unit).capitalize()
        made = not file.parent.exists()
        self._write_own(action, path, file,
                        f"{_OWN_DROPIN_HEADER}[{section}]\n{prop}=\n{prop}={shown}\n", shown)
        try:
            self._set(action, path, prop, ("ay", value.to_dbus()), shown)
        except CgroupOpError:  # (a unit that is gone, say): the file and folder as they were
            with contextlib.suppress(OSError, CgroupOpError):
                if before is None:
                    file.unlink(missing_ok=True)
                    if made:
                        file.parent.rmdir()
                else:
                    self._write_own(action, path, file, before, shown)
            raise

    @staticmethod
    def _write_own(action: str, path: str, file: Path, text: str, shown: str) -> None:
        """Write pinwarden's drop-in whole or not at all (systemd reads only ``*.conf``)."""
        temporary = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
            os.replace(temporary, file)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise CgroupOpError(action, path, exc.errno or errno.EIO, value=shown,
                                detail=f"cannot write {file}: {exc.strerror or exc}") from None

    def set_cpus(self, path: str, cpus: CpuSet) -> None:
        self._set_kept("cpus", path, "AllowedCPUs", cpus)
        if not cpus:
            self._emptied("cpus", path)

    def set_mems(self, path: str, mems: CpuSet) -> None:
        self._set_kept("mems", path, "AllowedMemoryNodes", mems)
        if not mems:
            self._emptied("mems", path)

    def _emptied(self, action: str, path: str) -> None:
        """systemd took an empty ``AllowedCPUs``/``AllowedMemoryNodes`` (no restriction: the
        parent's), but the kernel file kept the last value systemd wrote, and the slice
        stayed narrowed: machine.slice after the last lease while VMs ran in it, on 252 and
        257 alike (story_lxc).  The kernel refuses to empty the ``cpuset.cpus`` of a group
        with tasks below it (``ENOSPC``), systemd's write included.  So the kernel file is
        emptied here through the cgroup v2 backend, which writes what the group inherits,
        its parent's CPUs, where the kernel refuses the empty value; systemd's setting
        stays empty, as found."""
        if self._kernel is None:
            return
        unit = self._unit(action, path)
        try:
            cgroup = self.unit_info(unit).control_group.strip("/")
        except DBusCallError as exc:
            raise self._fail(exc, action, path, unit) from None
        if not cgroup:
            return
        try:
            state = self._kernel.read_group(cgroup)
        except CgroupOpError as exc:
            if exc.errno == errno.ENOENT:  # no cpuset files (the controller is off): as found
                return
            raise
        if action == "cpus" and state.cpus:
            self._kernel.set_cpus(cgroup, CpuSet())
        elif action == "mems" and state.mems:
            self._kernel.set_mems(cgroup, CpuSet())

    def set_partition(self, path: str, kind: PartitionKind) -> None:
        value = _PARTITION_VALUE[kind]
        unit = self._unit("partition", path)
        try:
            supported = self._supports_partition()
        except DBusCallError as exc:
            raise self._fail(exc, "partition", path, unit, value=value) from None
        if supported:
            self._set("partition", path, "CPUSetPartition", ("s", value), value)
            return
        if self._kernel is None:
            raise CgroupOpError(
                "partition", path, errno.EOPNOTSUPP, value=value,
                detail=f"this systemd has no CPUSetPartition= and no cgroup v2 backend was "
                       f"given to write cpuset.cpus.partition of {unit} directly")
        try:
            cgroup = self.unit_info(unit).control_group
        except DBusCallError as exc:
            raise self._fail(exc, "partition", path, unit, value=value) from None
        self._kernel.set_partition(cgroup.strip("/"), kind)

    def setting_files(self, path: str) -> tuple[str, ...]:
        """The runtime drop-ins of ``path``'s unit that hold a setting pinwarden writes
        (``50-AllowedCPUs.conf``, ``50-AllowedMemoryNodes.conf`` in
        ``/run/systemd/system.control/UNIT.d``) that exist.

        Read from the directory, not from systemd's ``DropInPaths``: that list names a
        removed drop-in until the next ``daemon-reload`` (FACTS.md 10), and systemd 257
        leaves out a runtime drop-in that one of the same name in
        ``/etc/systemd/system.control`` masks (a persistent ``set-property``; FACTS.md 11),
        which pinwarden's write made all the same."""
        unit = self._unit("read", path)
        folder = RUNTIME_CONTROL / f"{unit}.d"
        found: list[str] = []
        for name in sorted(SETTING_DROPINS):
            try:
                if (self._root / folder.relative_to("/") / name).is_file():
                    found.append(str(folder / name))
            except OSError as exc:
                raise CgroupOpError("read", path, exc.errno or errno.EIO,
                                    detail=f"cannot read {folder / name}: "
                                           f"{exc.strerror or exc}") from None
        return tuple(found)

    def setting_file_cpus(self, path: str) -> tuple[str, CpuSet] | None:
        """The runtime ``50-AllowedCPUs.conf`` of ``path``'s unit and the CPUs its last
        ``AllowedCPUs=`` names (None: no such file, or none readable)."""
        unit = self._unit("read", path)
        name = RUNTIME_CONTROL / f"{unit}.d" / "50-AllowedCPUs.conf"
        try:
            lines = (self._root / name.relative_to("/")).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        values = [line.partition("=")[2].strip() for line in lines
                  if line.strip().startswith("AllowedCPUs=")]
        try:
            return (str(name), CpuSet.parse_kernel(",".join(values[-1].split()))) \
                if values else None
        except ValueError:
            return None

    def remove_setting_files(self, path: str,
                             keep: Iterable[str] | None) -> tuple[str, ...]:
        """Remove the drop-ins :meth:`setting_files` lists now that ``keep`` (what it listed
        before pinwarden's first write) does not name: pinwarden's writes made them; and
        pinwarden's own (:data:`OWN_DROPIN`), always.  ``keep`` None (not known): only
        pinwarden's own.

        Called once the original value is back.  The setting systemd has loaded stays as it
        is; the next ``daemon-reload`` reads the unit's own configuration, with no drop-in
        of pinwarden's overriding an operator's later one.  Until then systemd reports
        ``NeedDaemonReload=yes`` for the unit (its list of drop-ins names a file that is
        gone; FACTS.md 10).  Returns the files removed."""
        removed: list[str] = []
        unit = self._unit("cpus", path)
        folder = RUNTIME_CONTROL / f"{unit}.d"
        own = [str(folder / OWN_DROPIN.format(prop=prop)) for prop in _SETTINGS]
        keep = frozenset(keep) if keep is not None else None
        theirs = [] if keep is None else [n for n in self.setting_files(path)
                                          if n not in keep]
        for name in [*theirs, *own]:
            try:
                (self._root / name.lstrip("/")).unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CgroupOpError("cpus", path, exc.errno or errno.EIO,
                                    detail=f"cannot remove {name}: "
                                           f"{exc.strerror or exc}") from None
            removed.append(name)
        with contextlib.suppress(OSError):  # left empty (not empty: somebody else's files)
            (self._root / folder.relative_to("/")).rmdir()
        return tuple(removed)

    def kernel_path(self, path: str) -> str:
        """The cgroup directory (relative to the v2 mount) of the unit ``path`` names:
        ``pinwarden-vm-A.partition`` → ``pinwarden\\x2dvm\\x2dA.slice``."""
        unit = unit_for_path(path)
        if unit_type(unit) == "slice":
            return slice_cgroup_path(unit)
        return join(self.kernel_path(path.rpartition("/")[0]), unit)

    def attach_process(self, path: str, pid: int) -> None:
        unit = self._unit("attach", path)
        if unit_type(unit) != "slice":
            raise CgroupOpError("attach", path, errno.EINVAL, value=str(pid),
                                detail=f"{unit}: processes can only be attached to slices")
        elsewhere = _not_systemds_namespace()
        if elsewhere is not None:
            # systemd reads the pid in its own namespace: a job run in a container moved
            # an unrelated host service there, onto the leased CPU (hunt O)
            raise CgroupOpError("attach", path, errno.ESRCH, value=str(pid),
                                detail=f"this process runs in another PID namespace than "
                                       f"systemd ({elsewhere}): systemd would take pid "
                                       f"{pid} for another process of its own; run "
                                       f"pinwarden where systemd is PID 1 (the host)")
        scope = f"pinwarden-pid{pid}-{os.getpid()}-{next(self._scope_serial)}.scope"
        props: list[Property] = [
            ("Description", ("s", f"pinwarden: process {pid} in {unit}")),
            ("Slice", ("s", unit)),
            ("PIDs", ("au", [pid])),
        ]
        try:
            result = self._bus.start_transient_unit(scope, "fail", props)
        except DBusCallError as exc:
            raise self._fail(exc, "attach", path, unit, value=str(pid)) from None
        if result != "done":
            raise SystemdOpError("attach", path, unit, "",
                                 f"the start job of {scope} ended with result {result!r}",
                                 value=str(pid), job_result=result)

    def attach_thread(self, path: str, tid: int) -> None:
        raise CgroupOpError("attach", path, errno.EOPNOTSUPP, value=str(tid),
                            detail="systemd moves whole processes only (into scopes)")


def _not_systemds_namespace() -> str | None:
    """Why this process's pids are not systemd's, or None: a PID namespace other than the
    host's whose PID 1 is not systemd, or a /proc of another namespace."""
    from pinwarden import procs

    why = procs.foreign_proc()
    if why is not None:
        return why
    if procs.pid_namespace() in (procs.INIT_PID_NS, None):  # the host's: systemd's own
        return None
    stat = procs.read_stat(1)  # (a container whose PID 1 is systemd: its own, then)
    if stat is None or stat.comm not in ("systemd", "init"):
        return f"PID 1 here is {stat.comm!r}, not systemd" if stat else "no PID 1 in view"
    return None


# -- entry points -----------------------------------------------------------------------

def systemd_booted(root: Path = Path("/")) -> bool:
    """The host runs systemd as its service manager: ``sd_booted(3)`` checks exactly this
    directory, which systemd creates early at boot and nothing else creates."""
    return (root / "run/systemd/system").is_dir()


def open_backend(address: str = "SYSTEM", *, root: Path = Path("/"),
                 timeout: float = 30.0) -> SystemdBackend:
    """The systemd backend for the host at ``root``, with the cgroup v2 backend on its
    unified mount as ``kernel`` (partition read-back, and the partition write where systemd
    has no ``CPUSetPartition=``).  :class:`EnforceError` when systemd cannot drive cpusets
    here: no cgroup v2 cpuset controller (systemd has no cpuset support on cgroup v1), or
    systemd not reachable on ``address``."""
    try:
        kernel = CgroupV2Backend.from_mounts(root)
    except HostError as exc:
        raise EnforceError(f"systemd cannot manage cpusets on this host: {exc}; use the "
                           f"cgroup v1 backend") from None
    return SystemdBackend(SystemdBus.connect(address, timeout=timeout), kernel=kernel,
                          root=root)
