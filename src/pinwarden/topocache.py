"""A snapshot cache of the host topology (adapter; issue #12).

Reading the topology opens about six files per CPU (0.4 s on a 1,024-CPU host), and every
command reads it.  Yet it changes only when CPUs go on- or offline, or at a reboot.  So
:func:`cached_topology` keeps the :class:`~pinwarden.topology.Topology` as JSON
(:func:`~pinwarden.topology.encode_topology`) with a *fingerprint* of the files that say
so — the CPU lists ``online``, ``present``, ``possible``, ``isolated``, ``nohz_full``, the
node list ``node/online``, the hybrid CPU lists, ``proc/cmdline``, the kernel release,
the boot id and the reader's own module file (a pinwarden upgraded reads afresh) — and
uses it only while the fingerprint reads the same and the snapshot was
made for the same root (its real path).  Otherwise it reads the topology
(:func:`~pinwarden.topology.read_topology`, which stays the uncached reader) and stores
the new snapshot, atomically (a temporary file renamed over the old one).

Where: ``/run/pinwarden/topology.json`` for the live host (``/``; a tmpfs, gone at
reboot), ``STATE_DIR/cache/topology-<hash of the root>.json`` for a root given with
``--root`` — only when the state directory exists: reading a host never creates it.
Within one process the last snapshot of each root is kept too (checked against the
fingerprint like the file), so a command that looks at the host twice gets the same
object.  A
cache that cannot be read is ignored, one that cannot be written (not root, a read-only
directory) is skipped, silently: the result is the same, only slower.  A root without an
``online`` list (where each CPU's own ``online`` file decides) is never cached.

Below a root other than ``/`` the fingerprint also has the identity (inode, modification
time, size) of those files and of the ``cpu`` and ``node`` directories, so a dump replaced
by another is noticed; a dump whose per-CPU files are edited in place, leaving those alone,
is not (edit ``cpu/online`` too, or remove the state directory's ``cache``).
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from pinwarden import topology
from pinwarden.topology import decode_topology, encode_topology, read_topology

if TYPE_CHECKING:
    from pinwarden.topology import Topology

#: The cache of the live host (a tmpfs: gone at reboot, like the topology it describes).
LIVE_DIR = Path("/run/pinwarden")
LIVE_NAME = "topology.json"
#: Below the state directory, for roots given with ``--root``.
STATE_SUBDIR = "cache"

#: Files whose text is the fingerprint (relative to the root); a missing one counts too.
FINGERPRINT = (
    "sys/devices/system/cpu/online",
    "sys/devices/system/cpu/present",
    "sys/devices/system/cpu/possible",
    "sys/devices/system/cpu/isolated",
    "sys/devices/system/cpu/nohz_full",
    "sys/devices/system/node/online",
    "sys/devices/cpu_core/cpus",
    "sys/devices/cpu_atom/cpus",
    "proc/cmdline",
    "proc/sys/kernel/osrelease",
    "proc/sys/kernel/random/boot_id",
)
#: Directories whose identity is part of the fingerprint of a root other than ``/``.
DIRECTORIES = ("sys/devices/system/cpu", "sys/devices/system/node")

#: The last snapshots of this process, by root (the same object again: the allocator keeps
#: its layout of the host per ``Topology`` object).
_MEMO: dict[str, tuple[dict[str, str | None], Topology]] = {}
_MEMO_SIZE = 8


def fingerprint(root: Path, *, live: bool = False) -> dict[str, str | None]:
    """The text of every :data:`FINGERPRINT` file below ``root`` (None: unreadable).

    Below a root other than the live host's (a dump, a test root: plain files that can be
    replaced), also each file's and the CPU and node directories' inode, modification time
    and size, so that a dump replaced by another at the same path is not taken for it.
    (sysfs has no use for that: a file there never changes its inode.)"""
    out: dict[str, str | None] = {"reader": _READER}
    for rel in FINGERPRINT:
        try:
            with open(os.path.join(root, rel), "rb") as handle:
                out[rel] = handle.read(65536).decode("ascii", "replace")
                if not live:
                    out[f"stat:{rel}"] = _stat_key(os.fstat(handle.fileno()))
        except OSError:
            out[rel] = None
    if not live:
        for rel in DIRECTORIES:
            try:
                out[f"stat:{rel}"] = _stat_key(os.stat(os.path.join(root, rel)))
            except OSError:
                out[f"stat:{rel}"] = None
    return out


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


#: The reader's own identity (its module file's): a snapshot taken by another pinwarden
#: (upgraded, or edited: one that may read some host differently) is not used.
try:
    _READER: str | None = _stat_key(os.stat(topology.__file__))
except (OSError, TypeError):
    _READER = None


def cache_path(real_root: str, state_dir: Path | None, *, live_dir: Path = LIVE_DIR,
               ) -> Path | None:
    """Where the snapshot of the root whose real path is ``real_root`` lives (None: it is
    not cached: a dump root without an existing state directory)."""
    if real_root == "/":
        return live_dir / LIVE_NAME
    if state_dir is None or not state_dir.is_dir():
        return None
    key = f"{zlib.crc32(real_root.encode('utf-8', 'surrogateescape')):08x}"
    return state_dir / STATE_SUBDIR / f"topology-{key}.json"


def _load(path: Path, real_root: str, prints: dict[str, str | None]) -> Topology | None:
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read())
        if data["root"] != real_root or data["fingerprint"] != prints:
            return None
        return decode_topology(data["topology"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # read afresh
        return None


def _store(path: Path, real_root: str, prints: dict[str, str | None],
           topology: Topology) -> None:
    """Write atomically; any failure leaves no file behind and is not an error."""
    text = json.dumps({"root": real_root, "fingerprint": prints,
                       "topology": encode_topology(topology)}, separators=(",", ":"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(topology):x}.tmp")  # per writer
    try:
        path.parent.mkdir(mode=0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def cached_topology(root: Path, state_dir: Path | None, *, live_dir: Path = LIVE_DIR,
                    ) -> Topology:
    """``read_topology(root)``, from the snapshot cache when its fingerprint still holds."""
    real_root = os.path.realpath(root)
    live = real_root == "/"
    prints = fingerprint(root, live=live)
    path = cache_path(real_root, state_dir, live_dir=live_dir)
    if path is None or prints[FINGERPRINT[0]] is None:
        return read_topology(root)
    memo = _MEMO.get(real_root)
    if memo is not None and memo[0] == prints:
        return memo[1]
    topology = _load(path, real_root, prints)
    if topology is None:
        topology = read_topology(root)
        if fingerprint(root, live=live) != prints:
            return topology  # changed while it was read: keep nothing
        _store(path, real_root, prints, topology)
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.clear()
    _MEMO[real_root] = (prints, topology)
    return topology
