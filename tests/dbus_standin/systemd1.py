"""A stand-in for systemd's D-Bus service, for tests on hosts where systemd cannot run.

Run as a separate process on a real ``dbus-daemon``::

    python tests/dbus_standin/systemd1.py ADDRESS --online 0-7 [--mems 0] [--partition]

It owns ``org.freedesktop.systemd1``, prints ``READY`` once it does, and serves the subset
of org.freedesktop.systemd1(5) pinwarden uses, answering the way systemd's sources do
(file names below are systemd's ``src/core`` and ``src/libsystemd/sd-bus``):

* ``Manager.GetUnit(s) → o``: units in memory only, else ``org.freedesktop.systemd1.NoSuchUnit``
  "Unit %s not loaded." (dbus-manager.c ``bus_get_unit_by_name``).
* ``Manager.LoadUnit(s) → o``: loads the unit; a slice loads without a unit file
  (slice.c ``unit_load_fragment_and_dropin(u, false)``); any other unit without a file or a
  transient definition loads as ``not-found`` — still a path, no error.
* ``Manager.SetUnitProperties(sba(sv))``: loads the unit, requires ``LoadState=loaded``
  (``bus_unit_validate_load_state``: NoSuchUnit "Unit %s not found."), then checks every
  property before applying any (dbus-unit.c ``bus_unit_set_properties``: two passes).  An
  unknown property is ``org.freedesktop.DBus.Error.PropertyReadOnly`` "Cannot set property
  %s, or unknown property."; a value of the wrong D-Bus type fails reading (``-ENXIO``),
  sent by sd-bus as ``System.Error.ENXIO`` "Failed to set unit properties: Unexpected
  message contents".  ``AllowedCPUs``/``AllowedMemoryNodes`` must be ``ay``
  (dbus-cgroup.c ``sd_bus_message_read_array(message, 'y', …)``).  Each property set lands
  in a drop-in, ``/run/systemd/system.control/UNIT.d/50-NAME.conf`` for ``runtime=true``
  (unit.c ``unit_write_setting``), listed in the unit's ``DropInPaths`` from then on; with
  ``--root DIR`` the file is written under ``DIR``, as systemd writes it.
* ``Manager.StartTransientUnit(ssa(sv)a(sa(sv))) → o``: bad job mode → InvalidArgs "Job mode
  %s invalid."; a unit that is not pristine → ``org.freedesktop.systemd1.UnitExists``
  (``transient_unit_from_message``); properties as above; then a job whose ``JobRemoved``
  signal follows the reply.
* ``Manager.Reload()`` (``daemon-reload``), with ``--root`` only: the settings of units
  that are not transient are read again from their drop-ins, as systemd orders them
  (:meth:`Systemd.reload`).
* ``Manager.StopUnit(ss) → o``, ``Manager.Subscribe()``: signals are only emitted while some
  client has subscribed ("Signals are only sent out if at least one client invoked this
  method", org.freedesktop.systemd1(5)).
* A call whose signature differs from the method's is refused by sd-bus's dispatcher
  (bus-objects.c): InvalidArgs "Invalid arguments '%s' to call %s.%s(), expecting '%s'.".
* ``org.freedesktop.DBus.Properties.Get(ss) → v`` on unit objects for the ``Unit`` and the
  ``Slice``/``Scope``/``Service`` interfaces; anything else is ``UnknownProperty`` "Unknown
  property or interface.".  Unit object paths use sd-bus's ``bus_label_escape``.
* ``EffectiveCPUs`` models cgroup v2: empty ``AllowedCPUs`` inherits the parent's effective
  set; a set disjoint from it falls back to the parent's; inactive units have no cgroup and
  report an empty array.  With ``--partition`` the unit also has ``CPUSetPartition`` (``s``:
  member/root/isolated, systemd PR #42013) and a valid partition root takes its CPUs out of
  its parent's and siblings' effective sets, as the kernel does (a task-less parent may be
  left with none: kernel commit "cgroup/cpuset: Allow no-task partition to have empty
  cpuset.cpus.effective").  Not modelled: exclusivity conflicts with siblings whose own
  ``cpuset.cpus`` overlap (the kernel makes such a root invalid), cgroup v1, polkit.

The test-only interface ``org.pinwarden.test.Standin`` at ``/org/pinwarden/test`` has
``Calls() → s`` (every call to systemd's objects as JSON: member, interface, path, header
signature, body with byte arrays as lists of ints), ``AddUnit(ssb)`` (name, ActiveState,
has a unit file) and ``FailNextJob(ss)`` (unit, job result).
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from dataclasses import dataclass, field
from typing import Any

from jeepney import DBusAddress, MessageType, new_error, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, Proxy, open_dbus_connection
from jeepney.low_level import HeaderFields, Message

MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
PROPS = "org.freedesktop.DBus.Properties"
TEST_PATH = "/org/pinwarden/test"
TEST = "org.pinwarden.test.Standin"
TYPE_IFACE = {"slice": "org.freedesktop.systemd1.Slice",
              "scope": "org.freedesktop.systemd1.Scope",
              "service": "org.freedesktop.systemd1.Service"}

INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
UNIT_EXISTS = "org.freedesktop.systemd1.UnitExists"
READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"

METHODS = {  # member -> input signature, from org.freedesktop.systemd1(5)
    "GetUnit": "s", "LoadUnit": "s", "SetUnitProperties": "sba(sv)",
    "StartTransientUnit": "ssa(sv)a(sa(sv))", "StopUnit": "ss", "Subscribe": "",
    "Reload": "",
}
#: Where ``daemon-reload`` finds a unit's drop-ins (``UNIT.d/*.conf``), highest priority
#: first (systemd.unit(5), "Unit File Load Path"; path-lookup.c ``lookup_paths_init``): of
#: files with one name the first wins, and all are applied in the order of their names.
DROPIN_DIRS = ("/etc/systemd/system.control", "/run/systemd/system.control",
               "/run/systemd/transient", "/etc/systemd/system", "/run/systemd/system",
               "/usr/lib/systemd/system")
JOB_MODES = {"replace", "fail", "isolate", "ignore-dependencies", "ignore-requirements",
             "flush", "replace-irreversibly", "triggering", "restart-dependencies"}
ACTIVE = {"active", "activating", "reloading", "deactivating"}
UNIT_CHARS = set(string.ascii_letters + string.digits + ":-_.\\@")


class BusError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name
        self.text = text


def bus_label_escape(text: str) -> str:
    """sd-bus ``bus_label_escape``: keep letters (and digits after the first char)."""
    if not text:
        return "_"
    out = []
    for i, ch in enumerate(text):
        if ch in string.ascii_letters or (i > 0 and ch in string.digits):
            out.append(ch)
        else:
            out.append(f"_{ord(ch):02x}")
    return "".join(out)


def valid_unit_name(name: str) -> bool:
    prefix, dot, suffix = name.rpartition(".")
    if not dot or not prefix or len(name) > 255 or suffix not in (
            "slice", "scope", "service", "target", "socket", "mount", "timer"):
        return False
    if any(c not in UNIT_CHARS for c in prefix):
        return False
    if suffix == "slice" and name != "-.slice":
        return not (prefix.startswith("-") or prefix.endswith("-") or "--" in prefix)
    return True


def parent_slice(name: str) -> str:
    head, dash, _ = name.removesuffix(".slice").rpartition("-")
    return f"{head}.slice" if dash else "-.slice"


def cpus_of(data: bytes) -> frozenset[int]:
    return frozenset(i * 8 + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1)


def to_bytes(cpus: frozenset[int]) -> bytes:
    if not cpus:
        return b""
    out = bytearray(max(cpus) // 8 + 1)
    for c in cpus:
        out[c // 8] |= 1 << (c % 8)
    return bytes(out)


def cpu_list(data: bytes | list[int]) -> str:
    """A byte array as systemd prints a CPU list (``0-1,4``)."""
    cpus = sorted(cpus_of(bytes(data)))
    runs: list[str] = []
    for c in cpus:
        if runs and int(runs[-1].rpartition("-")[2]) == c - 1:
            runs[-1] = f"{runs[-1].partition('-')[0]}-{c}"
        else:
            runs.append(str(c))
    return ",".join(runs)


def parse_list(text: str) -> frozenset[int]:
    """A CPU list as unit files give it: ranges separated by commas or whitespace."""
    out: set[int] = set()
    for part in filter(None, text.replace(",", " ").split()):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return frozenset(out)


@dataclass
class Unit:
    name: str
    load_state: str = "loaded"
    active_state: str = "inactive"
    transient: bool = False
    fragment: bool = False  # has a unit file
    allowed_cpus: bytes = b""
    allowed_mems: bytes = b""
    partition: str = "member"
    description: str = ""
    slice: str = ""  # scopes and services: their slice
    pids: list[int] = field(default_factory=list)
    dropins: list[str] = field(default_factory=list)  # DropInPaths

    @property
    def type(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def parent(self) -> str | None:
        if self.name == "-.slice":
            return None
        return parent_slice(self.name) if self.type == "slice" else (self.slice or
                                                                      "system.slice")


class Systemd:
    def __init__(self, conn: DBusConnection, online: frozenset[int], mems: frozenset[int],
                 partition: bool, root: str | None = None) -> None:
        self.conn = conn
        self.root = root
        self.online = online
        self.mems = mems
        self.partition_supported = partition
        self.units: dict[str, Unit] = {}
        self.calls: list[dict[str, Any]] = []
        self.subscribers: set[str] = set()
        self.job_ids = iter(range(1, 1 << 30))
        self.fail_next: dict[str, str] = {}
        for name in ("-.slice", "system.slice", "machine.slice", "user.slice"):
            self.units[name] = Unit(name, active_state="active", fragment=name != "-.slice")
        self.units["init.scope"] = Unit("init.scope", active_state="active",
                                        slice="-.slice")

    # -- model

    def load(self, name: str) -> Unit:
        """manager_load_unit: invalid names are InvalidArgs; slices load without a file."""
        if not valid_unit_name(name):
            raise BusError(INVALID_ARGS, f"Unit name {name} is not valid.")
        unit = self.units.get(name)
        if unit is None:
            unit = Unit(name, load_state="loaded" if name.endswith(".slice") else "not-found")
            self.units[name] = unit
        return unit

    def get(self, name: str) -> Unit:
        unit = self.units.get(name)
        if unit is None:
            raise BusError(NO_SUCH_UNIT, f"Unit {name} not loaded.")
        return unit

    def by_path(self, path: str) -> Unit | None:
        for unit in self.units.values():
            if self.path_of(unit) == path:
                return unit
        return None

    @staticmethod
    def path_of(unit: Unit) -> str:
        return f"{MANAGER_PATH}/unit/{bus_label_escape(unit.name)}"

    def children(self, unit: Unit) -> list[Unit]:
        return [u for u in self.units.values() if u.parent == unit.name]

    def valid_root(self, unit: Unit) -> bool:
        """A partition root is valid when active, non-empty, inside its parent's pool, and
        its parent is the root cgroup or itself a valid partition root (cgroup-v2.rst)."""
        if not self.partition_supported or unit.partition == "member" or unit.parent is None:
            return False
        parent = self.units[unit.parent]
        allowed = cpus_of(unit.allowed_cpus)
        if unit.active_state not in ACTIVE or not allowed:
            return False
        if parent.parent is None:
            return allowed <= self.online
        return self.valid_root(parent) and allowed <= cpus_of(parent.allowed_cpus)

    def effective(self, unit: Unit) -> frozenset[int]:
        if unit.active_state not in ACTIVE:
            return frozenset()
        if unit.parent is None:
            own = self.online
        elif self.valid_root(unit):
            own = cpus_of(unit.allowed_cpus)
        else:
            base = self.effective(self.units[unit.parent])
            own = (cpus_of(unit.allowed_cpus) & base) or base
        taken = [cpus_of(c.allowed_cpus) for c in self.children(unit) if self.valid_root(c)]
        return own.difference(*taken)

    def effective_mems(self, unit: Unit) -> frozenset[int]:
        if unit.active_state not in ACTIVE:
            return frozenset()
        base = self.mems if unit.parent is None else self.effective_mems(self.units[unit.parent])
        return (cpus_of(unit.allowed_mems) & base) or base

    def set_properties(self, unit: Unit, props: list[Any], *, transient: bool) -> None:
        """bus_unit_set_properties: check everything, then apply (two passes)."""
        for apply in (False, True):
            for name, (sig, value) in props:
                self.set_property(unit, name, sig, value, apply=apply, transient=transient)

    def set_property(self, unit: Unit, name: str, sig: str, value: Any, *, apply: bool,
                     transient: bool) -> None:
        expected = {"AllowedCPUs": "ay", "AllowedMemoryNodes": "ay", "StartupAllowedCPUs": "ay",
                    "StartupAllowedMemoryNodes": "ay", "Description": "s", "CPUWeight": "t"}
        if self.partition_supported:
            expected["CPUSetPartition"] = "s"
        if transient and unit.type in ("scope", "service"):
            expected["Slice"] = "s"
        if transient and unit.type == "scope":
            expected["PIDs"] = "au"
        if name not in expected:
            raise BusError(READ_ONLY, f"Cannot set property {name}, or unknown property.")
        if sig != expected[name]:
            raise BusError("System.Error.ENXIO",
                           "Failed to set unit properties: Unexpected message contents")
        if name == "CPUSetPartition" and value not in ("member", "root", "isolated"):
            raise BusError(INVALID_ARGS, f"Invalid CPUSetPartition= value: {value}")
        if name == "Slice" and (not valid_unit_name(value) or not value.endswith(".slice")):
            raise BusError(INVALID_ARGS, f"Unit name '{value}' is not a valid slice name.")
        if name == "PIDs":
            for pid in value:
                if not os.path.exists(f"/proc/{pid}"):
                    raise BusError("org.freedesktop.DBus.Error.UnixProcessIdUnknown",
                                   f"Process {pid} does not exist.")
        if not apply:
            return
        match name:
            case "AllowedCPUs":
                unit.allowed_cpus = bytes(value)
            case "AllowedMemoryNodes":
                unit.allowed_mems = bytes(value)
            case "CPUSetPartition":
                unit.partition = value
            case "Description":
                unit.description = value
            case "Slice":
                unit.slice = value
            case "PIDs":
                unit.pids = list(value)

    def write_dropins(self, unit: Unit, props: list[Any], *, runtime: bool) -> None:
        """unit_write_setting: each property set on a unit that exists lands in
        ``50-<Name>.conf`` of the unit's drop-in directory, ``/run/systemd/system.control``
        (runtime) or ``/etc/systemd/system.control`` (``/run/systemd/transient`` for a
        transient unit), and joins ``DropInPaths``.  Files are
        written only with ``--root`` (under it); the paths are listed either way."""
        # unit.c unit_drop_in_dir: a transient unit's settings go with its definition
        base = "/run/systemd/transient" if unit.transient else \
            "/run/systemd/system.control" if runtime else "/etc/systemd/system.control"
        for name, (_sig, value) in props:
            path = f"{base}/{unit.name}.d/50-{name}.conf"
            if self.root is not None:
                shown = cpu_list(value) if isinstance(value, (bytes, list)) else value
                target = os.path.join(self.root, path.lstrip("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "w") as out:
                    out.write("# This is a drop-in unit file extension, created via "
                              "\"systemctl set-property\"\n# or an equivalent operation. "
                              f"Do not edit.\n[{unit.type.capitalize()}]\n{name}=\n"
                              f"{name}={shown}\n")
            # systemd 257 (the trixie lab, FACTS.md 11) does not list a runtime drop-in
            # that one of the same name in /etc/systemd/system.control masks
            masked = runtime and self.root is not None and os.path.exists(os.path.join(
                self.root, "etc/systemd/system.control", f"{unit.name}.d", f"50-{name}.conf"))
            if path not in unit.dropins and not masked:
                unit.dropins.append(path)

    def reload(self) -> None:
        """``Manager.Reload`` (``systemctl daemon-reload``), for the drop-ins of units that
        are not transient (the stand-in's units have no settings in a unit file): each
        unit's ``AllowedCPUs``/``AllowedMemoryNodes`` are read again from its drop-ins under
        ``--root`` (see :data:`DROPIN_DIRS`), an empty assignment resetting the list, and
        ``DropInPaths`` lists the files read."""
        if self.root is None:
            raise BusError("org.freedesktop.DBus.Error.NotSupported",
                           "the stand-in reloads drop-ins only with --root")
        for unit in self.units.values():
            if unit.transient:
                continue
            found: dict[str, str] = {}
            for base in DROPIN_DIRS:
                folder = os.path.join(self.root, base.lstrip("/"), f"{unit.name}.d")
                names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
                for name in names:
                    if name.endswith(".conf"):
                        found.setdefault(name, f"{base}/{unit.name}.d/{name}")
            cpus, mems = b"", b""
            for name in sorted(found):
                section = ""
                with open(os.path.join(self.root, found[name].lstrip("/"))) as text:
                    for line in text.read().splitlines():
                        line = line.strip()
                        if line.startswith("[") and line.endswith("]"):
                            section = line[1:-1]
                        elif section == unit.type.capitalize() and "=" in line:
                            key, _, value = line.partition("=")
                            if key.strip() == "AllowedCPUs":
                                cpus = to_bytes(parse_list(value))
                            elif key.strip() == "AllowedMemoryNodes":
                                mems = to_bytes(parse_list(value))
            unit.allowed_cpus, unit.allowed_mems = cpus, mems
            unit.dropins = [found[name] for name in sorted(found)]

    def run_job(self, unit: Unit, kind: str) -> tuple[str, str]:
        job_id = next(self.job_ids)
        result = self.fail_next.pop(unit.name, "done")
        if result == "done":
            if kind == "start":
                chain = [unit]
                while chain[-1].parent is not None:
                    chain.append(self.load(chain[-1].parent))
                for u in chain:
                    u.active_state = "active"
            else:
                self.stop(unit)
        return f"{MANAGER_PATH}/job/{job_id}", result

    def stop(self, unit: Unit) -> None:
        for child in self.children(unit):
            self.stop(child)
        unit.active_state = "inactive"
        if unit.transient:  # garbage-collected once stopped
            del self.units[unit.name]

    # -- dispatch

    def properties(self, unit: Unit, iface: str) -> dict[str, tuple[str, Any]]:
        if iface == UNIT:
            return {
                "Id": ("s", unit.name), "LoadState": ("s", unit.load_state),
                "ActiveState": ("s", unit.active_state), "Description": ("s", unit.description),
                "ConsistsOf": ("as", []),  # as on systemd 252/257: a slice's units are SliceOf
                "SliceOf": ("as", sorted(c.name for c in self.children(unit))
                               if unit.type == "slice" else []),
                "Transient": ("b", unit.transient),
                "DropInPaths": ("as", list(unit.dropins)),
            }
        if iface == TYPE_IFACE.get(unit.type):
            props: dict[str, tuple[str, Any]] = {
                "AllowedCPUs": ("ay", unit.allowed_cpus),
                "EffectiveCPUs": ("ay", to_bytes(self.effective(unit))),
                "AllowedMemoryNodes": ("ay", unit.allowed_mems),
                "EffectiveMemoryNodes": ("ay", to_bytes(self.effective_mems(unit))),
                "ControlGroup": ("s", self.control_group(unit)
                                 if unit.active_state in ACTIVE else ""),
                "Slice": ("s", unit.parent or ""),
            }
            if self.partition_supported:
                props["CPUSetPartition"] = ("s", unit.partition)
            return props
        raise BusError(UNKNOWN_PROPERTY, "Unknown property or interface.")

    def control_group(self, unit: Unit) -> str:
        parts = [unit.name]
        while (parent := self.units[parts[-1]].parent) not in (None, "-.slice"):
            assert parent is not None
            parts.append(parent)
        return "/" + "/".join(reversed(parts)) if unit.name != "-.slice" else "/"

    def handle(self, msg: Message) -> tuple[str, tuple[Any, ...]]:
        fields = msg.header.fields
        path = fields.get(HeaderFields.path, "")
        iface = fields.get(HeaderFields.interface, "")
        member = fields.get(HeaderFields.member, "")
        sig = fields.get(HeaderFields.signature, "")
        sender = fields.get(HeaderFields.sender, "")
        if path == TEST_PATH and iface == TEST:
            return self.handle_test(member, msg.body)
        self.calls.append({"path": path, "interface": iface, "member": member,
                           "signature": sig, "body": jsonable(msg.body)})
        if path == MANAGER_PATH and iface in (MANAGER, "") and member in METHODS:
            if sig != METHODS[member]:
                raise BusError(INVALID_ARGS, f"Invalid arguments '{sig}' to call "
                               f"{MANAGER}.{member}(), expecting '{METHODS[member]}'.")
            return self.manager(member, msg.body, sender)
        unit = self.by_path(path)
        if unit is None:
            raise BusError(UNKNOWN_OBJECT, f"Unknown object '{path}'.")
        if iface == PROPS and member == "Get":
            if sig != "ss":
                raise BusError(INVALID_ARGS, f"Invalid arguments '{sig}' to call "
                               f"{PROPS}.Get(), expecting 'ss'.")
            props = self.properties(unit, msg.body[0])
            if msg.body[1] not in props:
                raise BusError(UNKNOWN_PROPERTY, "Unknown property or interface.")
            return "v", (props[msg.body[1]],)
        raise BusError(UNKNOWN_METHOD, f"Unknown method {member} or interface {iface}.")

    def manager(self, member: str, body: tuple[Any, ...],
                sender: str) -> tuple[str, tuple[Any, ...]]:
        if member == "GetUnit":
            return "o", (self.path_of(self.get(body[0])),)
        if member == "LoadUnit":
            return "o", (self.path_of(self.load(body[0])),)
        if member == "Subscribe":
            self.subscribers.add(sender)
            return "", ()
        if member == "Reload":
            self.reload()
            return "", ()
        if member == "SetUnitProperties":
            name, _runtime, props = body
            unit = self.load(name)
            if unit.load_state != "loaded":
                raise BusError(NO_SUCH_UNIT, f"Unit {name} not found.")
            self.set_properties(unit, props, transient=False)
            self.write_dropins(unit, props, runtime=bool(_runtime))
            return "", ()
        if member == "StartTransientUnit":
            name, mode, props, _aux = body
            if mode not in JOB_MODES:
                raise BusError(INVALID_ARGS, f"Job mode {mode} invalid.")
            unit_type = name.rpartition(".")[2]
            if unit_type not in TYPE_IFACE:
                raise BusError(INVALID_ARGS, f"Invalid unit name or type: {name}")
            existing = self.units.get(name)
            unit = self.load(name)
            if existing is not None and (unit.fragment or unit.transient or
                                         unit.active_state in ACTIVE):
                raise BusError(UNIT_EXISTS, f"Unit {name} was already loaded or has a "
                                            f"fragment file.")
            candidate = Unit(name, transient=True)
            self.set_properties(candidate, props, transient=True)
            if unit_type == "scope" and not candidate.pids:
                raise BusError("org.freedesktop.DBus.Error.FileNotFound",
                               f"Unit {name} failed to load properly, please adjust/correct "
                               f"and reload service manager: No such file or directory")
            self.units[name] = candidate
            if candidate.slice:
                self.load(candidate.slice)
            job, result = self.run_job(candidate, "start")
            self.after_reply = (job, name, result)
            return "o", (job,)
        if member == "StopUnit":
            name, mode = body
            if mode not in JOB_MODES:
                raise BusError(INVALID_ARGS, f"Job mode {mode} invalid.")
            unit = self.load(name)
            if unit.load_state != "loaded" and unit.active_state not in ACTIVE:
                raise BusError(NO_SUCH_UNIT, f"Unit {name} not loaded.")
            job, result = self.run_job(unit, "stop")
            self.after_reply = (job, name, result)
            return "o", (job,)
        raise AssertionError(member)

    def handle_test(self, member: str, body: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        if member == "Calls":
            return "s", (json.dumps(self.calls),)
        if member == "AddUnit":
            name, state, fragment = body
            unit = self.load(name)
            unit.active_state, unit.fragment = state, fragment
            return "", ()
        if member == "FailNextJob":
            self.fail_next[body[0]] = body[1]
            return "", ()
        raise BusError(UNKNOWN_METHOD, f"Unknown method {member}")

    after_reply: tuple[str, str, str] | None = None

    def serve(self) -> None:
        while True:
            msg = self.conn.receive()
            if msg.header.message_type != MessageType.method_call:
                continue
            self.after_reply = None
            try:
                sig, body = self.handle(msg)
                self.conn.send(new_method_return(msg, sig or None, body))
            except BusError as exc:
                self.conn.send(new_error(msg, exc.name, "s", (exc.text,)))
            if self.after_reply is not None and self.subscribers:
                job, unit, result = self.after_reply
                job_id = int(job.rsplit("/", 1)[1])
                self.conn.send(new_signal(DBusAddress(MANAGER_PATH, interface=MANAGER),
                                          "JobRemoved", "uoss", (job_id, job, unit, result)))


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return list(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--online", default="0-7")
    parser.add_argument("--mems", default="0")
    parser.add_argument("--partition", action="store_true",
                        help="know CPUSetPartition (systemd with PR #42013)")
    parser.add_argument("--root", help="write the drop-ins of SetUnitProperties under "
                                       "this directory (run/systemd/system.control/...)")
    args = parser.parse_args(argv)
    conn = open_dbus_connection(bus=args.address)
    reply = Proxy(message_bus, conn).RequestName("org.freedesktop.systemd1", 4)  # DO_NOT_QUEUE
    if reply[0] != 1:  # PRIMARY_OWNER
        print(f"could not own org.freedesktop.systemd1: {reply[0]}", flush=True)
        return 1
    print("READY", flush=True)
    Systemd(conn, parse_list(args.online), parse_list(args.mems), args.partition,
            args.root).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
