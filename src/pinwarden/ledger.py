"""The host-wide, durable record of exclusive leases (SQLite, WAL mode).

Check-and-reserve is one ``BEGIN IMMEDIATE`` transaction, so racing processes get exactly
one winner per CPU; the ``leases`` table's primary key is the CPU number, so the database
itself refuses a second holder.

Besides the leases the ledger keeps what pinwarden needs to leave the host as it found it:

* the **host record** — the partition (mode, VM CPUs, housekeeping CPUs) and the VM
  partition cgroup as they were when the first lease was taken, so that pinwarden's own
  changes (a narrowed ``machine``) never change the placement rules;
* the **changes** — every host setting pinwarden changed (``KEY`` → original value, kept
  from the first change on), so that it can be put back when the last lease goes, also
  after a crash.

The database lives at ``<state_dir>/leases.db``.  It is created all or nothing: built
under a temporary name in rollback-journal mode, checked, then linked into place, so an
existing file that is empty, not SQLite, corrupt, foreign or of a newer schema is never
ours to fix: it is refused with a :class:`~pinwarden.errors.LedgerError` and left
byte-for-byte as it was.

Reads never write.  Owner liveness: a holder may name an owner process ``(pid, start
time)``; when that process is gone (or its pid now belongs to another process) the holder
is *dead*: :meth:`Ledger.reap` (an explicit step of the lease manager) removes it, and so
does the reserving transaction before it decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pinwarden.cpuset import MAX_CPU, CpuSet
from pinwarden.errors import LedgerError, PinwardenError, Refusal, shorten, state_dir_advice
from pinwarden.model import (
    JOB_DRIVER,
    KEY_JOB,
    KEY_NAME,
    KEY_UUID,
    HolderRef,
    Lease,
    Plan,
    command_line,
)
from pinwarden.partition import Partition, VmCgroup
from pinwarden.record import record

#: Schema version (``PRAGMA user_version``).  Older files are migrated in one transaction
#: on open; an older pinwarden refuses a newer file.
SCHEMA_VERSION = 3
#: ``PRAGMA application_id``: "PWL1", marks the file as a pinwarden ledger.
APPLICATION_ID = 0x50574C31
DB_NAME = "leases.db"
_TMP = re.compile(re.escape(f".{DB_NAME}.") + r"(?P<pid>[0-9]+)\.[0-9]+\.tmp")

_SCHEMA = f"""
CREATE TABLE holders (
    driver      TEXT NOT NULL,
    key         TEXT NOT NULL,
    name        TEXT NOT NULL,
    created     REAL NOT NULL,
    owner_pid   INTEGER CHECK (owner_pid IS NULL OR owner_pid > 0),
    owner_start INTEGER,
    plan        TEXT NOT NULL,
    cgroup      TEXT,
    owner_ns    INTEGER,
    PRIMARY KEY (driver, key)
) STRICT;
CREATE TABLE leases (
    cpu     INTEGER PRIMARY KEY CHECK (cpu BETWEEN 0 AND {MAX_CPU}),
    driver  TEXT NOT NULL,
    key     TEXT NOT NULL,
    role    TEXT NOT NULL,
    created REAL NOT NULL,
    FOREIGN KEY (driver, key) REFERENCES holders (driver, key) ON DELETE CASCADE
) STRICT;
CREATE INDEX leases_by_holder ON leases (driver, key);
CREATE TABLE host (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    created REAL NOT NULL,
    record  TEXT NOT NULL
) STRICT;
CREATE TABLE changes (
    key      TEXT PRIMARY KEY,
    original TEXT NOT NULL,
    created  REAL NOT NULL
) STRICT;
"""

#: Liveness check: ``alive(pid, start_time)``.  Replaceable in tests.
Liveness = Callable[[int, int | None], bool]


@record
class HolderRecord:
    """One holder as recorded: its plan, owner process and cgroup."""

    ref: HolderRef
    created: float
    owner_pid: int | None  # process whose death frees the holder's leases
    owner_start: int | None  # its start time (clock ticks, /proc/PID/stat field 22)
    plan: Plan  # the plan that was reserved
    cgroup: str | None = None  # enforced cgroup path, once enforcement has placed it
    owner_ns: int | None = None  # the PID namespace owner_pid is a pid of (None: unknown,
    # taken for the host's: recorded_ns)

    @property
    def owner_elsewhere(self) -> bool:
        """Whether the owner was recorded in another PID namespace than this process's
        (a ``pinwarden`` run in a container, or the host's beside a container's): its pid
        names another process here, or none, so whether it runs cannot be told here."""
        if self.owner_pid is None:
            return False
        from pinwarden import procs

        here = procs.pid_namespace()
        return here is not None and here != self.recorded_ns

    @property
    def recorded_ns(self) -> int:
        """The PID namespace the owner was recorded in: an unknown one (recorded before
        schema 3, or by an older pinwarden still running after the upgrade) is the host's,
        where pinwarden runs — judged from any, a host job's owner looked dead from a
        container, and its lease was freed (upgrade hunt)."""
        from pinwarden import procs

        return procs.INIT_PID_NS if self.owner_ns is None else self.owner_ns

    def owner_runs(self) -> bool:
        """Whether the owner process runs.  One recorded in another PID namespace counts
        as running — its lease is never freed from where it cannot be seen (a sync in a
        container freed a running job's lease on the host, and put back the kernel
        threads it had moved: hunt) — unless, seen from the host's namespace, no process
        is left in its namespace at all (a container that ended)."""
        if self.owner_pid is None:
            return False
        return _owner_runs(self.owner_pid, self.owner_start, self.owner_ns, _alive)


def _owner_runs(pid: int, start: int | None, ns: int | None, alive: Liveness) -> bool:
    """:meth:`HolderRecord.owner_runs` of an owner ``(pid, start)`` recorded in PID
    namespace ``ns`` (None: the host's), judged by ``alive`` where it is this one."""
    from pinwarden import procs

    here = procs.pid_namespace()
    recorded = procs.INIT_PID_NS if ns is None else ns
    if here is None or recorded == here:
        return alive(pid, start)
    return not procs.pid_namespace_gone(recorded)


@record
class HostRecord:
    """The host as pinwarden found it when the first lease was taken."""

    created: float
    partition: Partition  # the partition decided then
    found: VmCgroup  # the VM partition cgroup as it was then (name None: there was none)

    def to_text(self) -> str:
        p, f = self.partition, self.found
        return json.dumps({
            "partition": {"mode": p.mode, "vm_cpus": str(p.vm_cpus),
                          "host_cpus": str(p.host_cpus), "reason": p.reason,
                          "cgroup": p.cgroup},
            "found": {"name": f.name, "version": f.version, "cpus": str(f.cpus),
                      "looked_for": list(f.looked_for)},
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, created: float, text: str) -> HostRecord:
        """Inverse of :meth:`to_text`; ``ValueError`` (or a ``CpuSetError``) on text of
        the wrong shape."""
        data = json.loads(text)
        p, f = data["partition"], data["found"]
        if p["mode"] not in ("isolcpus", "cgroup", "none"):
            raise ValueError(f"unknown partition mode {shorten(p['mode'])}")
        for value in (p["reason"], *(v for v in (p["cgroup"], f["name"]) if v is not None)):
            if not isinstance(value, str):
                raise ValueError("partition names and reasons must be strings")
        if f["version"] not in (None, 1, 2):
            raise ValueError(f"unknown cgroup version {shorten(f['version'])}")
        partition = Partition(p["mode"], CpuSet.parse_kernel(p["vm_cpus"]),
                              CpuSet.parse_kernel(p["host_cpus"]), p["reason"], p["cgroup"])
        found = VmCgroup(f["name"], f["version"], CpuSet.parse_kernel(f["cpus"]),
                         tuple(str(x) for x in f.get("looked_for", [])))
        return cls(created, partition, found)


def plan_to_text(plan: Plan) -> str:
    data = plan.to_json()
    data["default_cpus"] = None if plan.default_cpus is None else str(plan.default_cpus)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def plan_from_text(text: str, where: str | HolderRef) -> Plan:
    """A recorded plan; a :class:`LedgerError` naming ``where`` (a holder: and how to free
    it) when it cannot be read."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Plan.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError, PinwardenError) as exc:
        why = shorten(str(exc))
    except RecursionError:
        why = "nested too deeply"
    advice = f"; '{command_line('pinwarden release', where.name, '--force')}' frees it " \
        f"(and nothing else)" if isinstance(where, HolderRef) else ""
    raise LedgerError(f"corrupt plan recorded for {where}: {why}{advice}")


def _lease_text(leases: Mapping[int, str]) -> str:
    """``CPUs 2,10 as 'vcpu0', 'sibling-hold'``, or ``no CPU``."""
    if not leases:
        return "no CPU"
    roles = ", ".join(shorten(str(role), 40) for _cpu, role in sorted(leases.items()))
    return f"{CpuSet.of(leases).named()} as {roles}"


def _sane_time(value: object) -> bool:
    """A recorded creation time: seconds since the epoch that a clock can show (years 1970
    to 9999), so that formatting it never fails."""
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        0 <= value < 253402300800


def _kind(exc: sqlite3.Error) -> str:
    """``busy``, ``readonly``, ``full``, ``corrupt`` or ``other``, from SQLite's primary
    result code."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return "busy"
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return "readonly"
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return "full"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text \
            or "not a database" in text:
        return "corrupt"
    return "other"


def _key_v1_to_v2(driver: str, key: str, plan_text: str) -> str:
    """A version-1 holder key (a UUID, a name or a job name, untyped) as a typed key."""
    if driver == JOB_DRIVER:
        return f"{KEY_JOB}:{key}"
    try:
        uuid = json.loads(plan_text).get("uuid")
    except (ValueError, AttributeError):
        uuid = None
    return f"{KEY_UUID}:{key}" if uuid == key else f"{KEY_NAME}:{key}"


def location_problem(state_dir: Path) -> str | None:
    """Why the lease database below ``state_dir`` cannot be used at all (whoever asks), or
    None: the directory is a file, the database a dangling link or not a file, the
    directory on a read-only file system without a database yet."""
    db = state_dir / DB_NAME
    try:
        st = state_dir.stat()
    except FileNotFoundError:
        if state_dir.is_symlink():
            return (f"state directory {state_dir} is a dangling symbolic link: point it at a "
                    f"directory, remove it (pinwarden creates the directory), or choose "
                    f"another --state-dir")
        return None
    except OSError as exc:
        return (f"cannot use state directory {state_dir}: {exc.strerror} "
                f"({state_dir_advice(exc)})")
    if not stat.S_ISDIR(st.st_mode):
        return (f"state directory {state_dir} is not a directory: move that file away "
                f"(pinwarden creates the directory) or choose another --state-dir")
    try:
        db_st = db.stat()
    except FileNotFoundError:
        if db.is_symlink():
            return (f"lease database {db} is a dangling symbolic link: restore what it "
                    f"pointed at, or remove the link if nothing was ever leased there")
        stray = _stray_wal(state_dir)
        if stray is not None:
            return stray
        try:
            if os.statvfs(state_dir).f_flag & os.ST_RDONLY:
                return (f"state directory {state_dir} is on a read-only file system: no "
                        f"lease can ever be recorded there")
        except OSError:
            pass
        return None
    except PermissionError:
        return None  # reported by the open, with the advice to run as root
    except OSError as exc:
        return (f"cannot access lease database {db}: {exc.strerror} "
                f"({state_dir_advice(exc)})")
    if not stat.S_ISREG(db_st.st_mode):
        return (f"lease database {db} is not a regular file: move it away if nothing was "
                f"ever leased there, or choose another --state-dir")
    return None


def _stray_wal(state_dir: Path) -> str | None:
    """Why a new database must not be made in ``state_dir``: a write-ahead log is there
    without its database (moved or removed after a crash left the log behind), and SQLite
    would replay that log into the new file — leases and holders of the old one, or a
    lease row whose holder is not in it, which no command could clear."""
    wal = state_dir / f"{DB_NAME}-wal"
    try:
        if wal.stat().st_size == 0:  # an empty log replays nothing
            return None
    except OSError:
        return None
    if os.path.lexists(state_dir / DB_NAME):  # looked at after the log: a database made
        return None  # meanwhile by another pinwarden had no log before it was in place
    return (f"state directory {state_dir} holds {wal.name} but no {DB_NAME}: the log of a "
            f"lease database that was moved or removed (it holds that database's last "
            f"commits), which a new database would take in; move {wal.name} and "
            f"{DB_NAME}-shm beside that database, or remove them to start afresh")


def _alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still runs.  (procs is
    loaded here, when some holder has an owner process: most reads need none of it.)"""
    from pinwarden import procs

    return procs.alive(pid, start)


class Ledger:
    """The lease database of one state directory.  One instance per process (the SQLite
    connection is not shared across ``fork``); use it as a context manager or call
    :meth:`close`."""

    def __init__(self, state_dir: Path, *, busy_timeout: float = 60.0,
                 liveness: Liveness | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.busy_timeout = busy_timeout
        self._alive: Liveness = liveness or _alive
        #: Holders reaped by the last :meth:`reserve` or :meth:`reap`: their cgroups may
        #: need removing.
        self.last_reaped: tuple[HolderRecord, ...] = ()
        #: The holder's record before the last :meth:`reserve` replaced it (None: new).
        self.last_replaced: HolderRecord | None = None
        self._snapshots = 0  # depth of :meth:`snapshot` blocks
        problem = location_problem(self.state_dir)
        if problem is not None:
            raise LedgerError(problem)
        self._ensure_dir()
        try:
            os.stat(self.path)
        except FileNotFoundError:
            self._create()
        except OSError as exc:
            raise LedgerError(f"cannot access lease database {self.path}: {exc.strerror} "
                              f"({state_dir_advice(exc)})") from None
        self._db = self._open()

    @classmethod
    def existing(cls, state_dir: Path, **kw: Any) -> Ledger | None:
        """The ledger if its database exists, None if nothing was ever leased here; a
        location that cannot hold one is a :class:`LedgerError` (for read-only commands,
        which must not create the database)."""
        problem = location_problem(state_dir)
        if problem is not None:
            raise LedgerError(problem)
        try:
            os.stat(state_dir / DB_NAME)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerError(f"cannot access lease database {state_dir / DB_NAME}: "
                              f"{exc.strerror} ({state_dir_advice(exc)})") from None
        return cls(state_dir, **kw)

    # -- opening ------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(
                f"cannot use state directory {self.state_dir}: {exc.strerror} "
                f"({state_dir_advice(exc)})") from None
        if not self.state_dir.is_dir():
            raise LedgerError(f"state directory {self.state_dir} is not a directory")

    def _sweep_temporaries(self) -> None:
        """Remove what creations killed mid-way (SIGKILL, power loss) left behind."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.state_dir):
                base = entry.name.split("-")[0] if "-" in entry.name else entry.name
                m = _TMP.fullmatch(base)
                if m and not _alive(int(m["pid"]), None):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _create(self) -> None:
        """Build a fresh database under a temporary name and link it into place, so
        ``leases.db`` never exists half-initialised.  The temporary database uses a
        rollback journal (no WAL that a failed checkpoint could leave behind) and is read
        back before it is linked.  Losing a creation race is fine."""
        self._sweep_temporaries()
        tmp = self.state_dir / f".{DB_NAME}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode = DELETE")
                db.execute("PRAGMA synchronous = FULL")
                db.executescript(
                    "BEGIN IMMEDIATE;" + _SCHEMA +
                    f"PRAGMA application_id = {APPLICATION_ID};"
                    f"PRAGMA user_version = {SCHEMA_VERSION};"
                    "COMMIT;")
            finally:
                db.close()
            self._check_created(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            stray = _stray_wal(self.state_dir)
            if stray is not None:
                raise LedgerError(stray)
            with contextlib.suppress(FileExistsError):  # lost a creation race: use theirs
                os.link(tmp, self.path)
            dir_fd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except (OSError, sqlite3.Error) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if (isinstance(exc, sqlite3.Error) and _kind(exc) == "full") or self._nearly_full():
                why = f"the file system is full ({why}); free some space and retry"
            raise LedgerError(f"cannot create lease database {self.path}: {why}") from None
        finally:
            for leftover in (tmp, *(Path(f"{tmp}-{s}") for s in ("journal", "wal", "shm"))):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    @staticmethod
    def _check_created(tmp: Path) -> None:
        """The temporary database holds the whole schema (raises sqlite3.Error if not)."""
        db = sqlite3.connect(f"file:{tmp}?mode=ro", uri=True, isolation_level=None)
        try:
            check = db.execute("PRAGMA quick_check").fetchall()
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        finally:
            db.close()
        if check != [("ok",)] or version != SCHEMA_VERSION or \
                not {"holders", "leases", "host", "changes"} <= tables:
            raise sqlite3.DatabaseError("the new database did not read back whole")

    def _refuse(self, why: str) -> LedgerError:
        return LedgerError(
            f"lease database {self.path} {why}; it was left untouched — restore it from a "
            f"backup or move it aside together with its -wal and -shm files (every lease it "
            f"records is then forgotten)")

    def _open(self) -> sqlite3.Connection:
        # Judge the file before SQLite writes anything: SQLite happily treats an empty file
        # as a new database, and we never create one.  Never open() and close() the file
        # ourselves: closing any descriptor of it drops every POSIX lock this *process*
        # holds on it, those of its other SQLite connections included (the daemon runs
        # several: a hook server's, a metrics scrape's), and another process would then
        # delete the WAL they still write to — their commits lost (sqlite.org/howtocorrupt
        # 2.2).  stat() takes no lock; SQLite reads the header itself.
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise LedgerError(f"cannot read lease database {self.path}: {exc.strerror} "
                              f"({state_dir_advice(exc)})") from None
        if size == 0:
            raise self._refuse("is empty")
        if size < 100:
            raise self._refuse("is not an SQLite database")
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None,
                                 timeout=self.busy_timeout)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open lease database {self.path}: {exc}") from None
        try:
            try:
                app_id = db.execute("PRAGMA application_id").fetchone()[0]
            except sqlite3.DatabaseError as exc:
                if "not a database" in str(exc):
                    raise self._refuse("is not an SQLite database") from None
                raise
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if app_id != APPLICATION_ID:
                raise self._refuse(f"is not a pinwarden ledger (application_id {app_id:#x})")
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    f"lease database {self.path} has schema version {version}, newer than "
                    f"this pinwarden understands ({SCHEMA_VERSION}); upgrade pinwarden — the "
                    f"database was left untouched")
            if version < 1:
                raise self._refuse(f"has no pinwarden schema (user_version {version})")
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                first = str(check[0][0]).strip().splitlines()[0]
                more = f" and {len(check) - 1} more problems" if len(check) > 1 else ""
                raise self._refuse(f"is corrupt ({first}{more})")
            db.execute("PRAGMA synchronous = FULL")
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            if version < SCHEMA_VERSION:
                self._migrate(db, version)
            db.execute("PRAGMA foreign_keys = ON")
        except UnicodeDecodeError:  # a damaged schema text (sqlite3 decodes it as UTF-8)
            db.close()
            raise self._refuse("is corrupt (its schema is not text)") from None
        except sqlite3.DatabaseError as exc:
            db.close()
            kind = _kind(exc)
            if kind == "busy":
                raise self._locked() from None
            if kind == "corrupt":
                raise self._refuse(f"is corrupt ({str(exc).splitlines()[0]})") from None
            raise self._error(exc) from None
        except LedgerError:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        """Bring an older database to the current schema in one transaction.  From
        version 1: typed holder keys (``uuid:``, ``name:``, ``job:``), the host record and
        change tables, lease CPUs bounded by the largest CPU number.  From version 2: the
        owner's PID namespace (``owner_ns``; unknown for the owners already recorded)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            again = db.execute("PRAGMA user_version").fetchone()[0]
            if again == version == 2:  # (another process may have migrated meanwhile)
                db.execute("ALTER TABLE holders ADD COLUMN owner_ns INTEGER")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if again == version == 1:
                holders = db.execute("SELECT driver, key, name, created, owner_pid, "
                                     "owner_start, plan, cgroup FROM holders").fetchall()
                leases = db.execute("SELECT cpu, driver, key, role, created FROM leases "
                                    "WHERE cpu BETWEEN 0 AND ?", (MAX_CPU,)).fetchall()
                keys = {(h[0], h[1]): _key_v1_to_v2(h[0], h[1], h[6]) for h in holders}
                db.execute("DROP TABLE leases")
                db.execute("DROP TABLE holders")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.executemany("INSERT INTO holders (driver, key, name, created, owner_pid, "
                               "owner_start, plan, cgroup) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               [(h[0], keys[h[0], h[1]], *h[2:]) for h in holders])
                db.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?)",
                               [(le[0], le[1], keys[le[1], le[2]], *le[3:]) for le in leases
                                if (le[1], le[2]) in keys])
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _locked(self) -> LedgerError:
        return LedgerError(
            f"lease database {self.path} stayed locked for {self.busy_timeout:g} s (by "
            f"another pinwarden, or whatever else opened it); retry, or find the stuck "
            f"process with 'fuser {self.path}'", code="ledger-busy")

    def set_busy_timeout(self, seconds: float) -> None:
        """Wait at most ``seconds`` for another connection's lock from now on."""
        self.busy_timeout = seconds
        self._db.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads within the block see one state of the database: a read transaction
        (WAL: a snapshot; writers are not blocked and their commits stay unseen until the
        block ends).  Without it every statement sees the latest commit, so two reads
        can straddle another process's reserve — a holder without its leases, which
        would read as corruption.  Re-entrant; no write may happen inside."""
        if self._snapshots or self._db.in_transaction:  # (inside a write: that one)
            self._snapshots += 1
            try:
                yield
            finally:
                self._snapshots -= 1
            return
        try:
            self._db.execute("BEGIN DEFERRED")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        self._snapshots = 1
        try:
            yield
        finally:
            self._snapshots = 0
            with contextlib.suppress(sqlite3.Error):  # nothing written: nothing to lose
                self._db.execute("ROLLBACK")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any
        exception (which is re-raised, SQLite errors as LedgerError)."""
        if self._snapshots:
            raise RuntimeError("a ledger write inside a read snapshot")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            yield self._db
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise self._error(exc) from None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise self._error(exc) from None

    def _error(self, exc: sqlite3.Error) -> LedgerError:
        kind = _kind(exc)
        if kind == "other" and "disk I/O error" in str(exc) and self._nearly_full():
            kind = "full"  # SQLite reports a failed WAL or shm allocation as an I/O error
        if kind == "busy":
            return self._locked()
        if (kind == "readonly" or "unable to open" in str(exc)) and \
                (why := self._unwritable()) is not None:
            return LedgerError(f"lease database {self.path} cannot be opened: {why} (SQLite "
                               "writes its -wal and -shm files beside it, even to read); "
                               "make it writable or choose another --state-dir")
        if kind == "readonly":
            return LedgerError(f"lease database {self.path} is read-only for this user "
                               f"(run as root or choose another --state-dir)")
        if kind == "full":
            return LedgerError(f"lease database {self.path}: the file system is full "
                               f"(SQLite needs room beside the database even to read it); "
                               f"nothing was changed: free some space and retry")
        if kind == "corrupt":
            return self._refuse(f"is corrupt ({str(exc).splitlines()[0]})")
        return LedgerError(f"lease database {self.path}: {str(exc).splitlines()[0]}")

    def _unwritable(self) -> str | None:
        """Why this process cannot write the state directory, or None."""
        try:
            if os.statvfs(self.state_dir).f_flag & os.ST_RDONLY:
                return f"its directory {self.state_dir} is on a read-only file system"
        except OSError:
            return None
        if not os.access(self.state_dir, os.W_OK):
            return f"its directory {self.state_dir} is not writable for this user"
        return None

    def _nearly_full(self) -> bool:
        try:
            st = os.statvfs(self.state_dir)
        except OSError:
            return False
        # (a pseudo file system — /proc, sysfs — has no blocks at all: not full)
        return st.f_blocks > 0 and st.f_bavail * st.f_frsize < 1 << 20

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    # -- rows ---------------------------------------------------------------------------

    _HOLDER_COLS = "driver, key, name, created, owner_pid, owner_start, plan, cgroup, owner_ns"
    _LEASE_SQL = ("SELECT l.cpu, l.driver, l.key, h.name, l.role, l.created, h.owner_pid "
                  "FROM leases l LEFT JOIN holders h USING (driver, key) ORDER BY l.cpu")

    def _holder(self, row: Any) -> HolderRecord:
        driver, key, name, created, owner_pid, owner_start, plan, cgroup, owner_ns = row
        ref = HolderRef(driver, key, name)
        if not _sane_time(created):
            raise self._refuse(f"is corrupt (holder {shorten(str(ref))} was created at "
                               f"{shorten(str(created))}, not a time)")
        return HolderRecord(ref=ref, created=created, owner_pid=owner_pid,
                            owner_start=owner_start, plan=plan_from_text(plan, ref),
                            cgroup=cgroup, owner_ns=owner_ns)

    def _holder_anyway(self, db: sqlite3.Connection, row: Any) -> HolderRecord:
        """:meth:`_holder`, or — its plan unreadable — a record whose plan is just the
        leases its lease rows name (for a forced release: ``kept`` then knows its CPUs)."""
        try:
            return self._holder(row)
        except LedgerError:
            driver, key, name, created, owner_pid, owner_start, _plan, cgroup, owner_ns = row
            leases = {cpu: str(role) for cpu, role in db.execute(
                "SELECT cpu, role FROM leases WHERE driver = ? AND key = ?", (driver, key))
                if isinstance(cpu, int) and 0 <= cpu <= MAX_CPU}
            return HolderRecord(
                ref=HolderRef(driver, key, name),
                created=created if _sane_time(created) else 0.0,
                owner_pid=owner_pid, owner_start=owner_start,
                plan=Plan(str(name), None, True, {}, CpuSet(), leases=leases),
                cgroup=cgroup, owner_ns=owner_ns)

    def _lease(self, row: Any) -> Lease:
        cpu, driver, key, name, role, created, owner_pid = row
        if not isinstance(cpu, int) or not 0 <= cpu <= MAX_CPU:
            raise self._refuse(f"is corrupt (a lease names CPU {shorten(str(cpu))}, beyond "
                               f"the largest possible CPU {MAX_CPU})")
        if not _sane_time(created):
            raise self._refuse(f"is corrupt (the lease of CPU {cpu} was created at "
                               f"{shorten(str(created))}, not a time)")
        return Lease(cpu=cpu, holder=HolderRef(driver, key, name), role=role,
                     created=created, owner_pid=owner_pid)

    def _leases_in(self, db: sqlite3.Connection) -> tuple[Lease, ...]:
        """Every lease, checked against the plans of their holders: a lease row is written
        only with its holder's plan, so rows that disagree with it (a hand edit moving a
        lease to another CPU, an orphan row) are corruption — taken as they are, the CPU
        the holder's cgroup uses would be handed out twice."""
        rows = db.execute(self._LEASE_SQL).fetchall()
        for row in rows:
            if row[3] is None:  # no holder row: LEFT JOIN
                raise self._refuse(f"is corrupt (the lease of CPU {shorten(str(row[0]))} "
                                   f"names holder {shorten(str(row[2]))}, which is not "
                                   f"recorded)")
        leases = tuple(self._lease(r) for r in rows)
        by_holder: dict[tuple[str, str], dict[int, str]] = {}
        for lease in leases:
            by_holder.setdefault((lease.holder.driver, lease.holder.key), {})[lease.cpu] = \
                lease.role
        for driver, key, name, plan_text in db.execute(
                "SELECT driver, key, name, plan FROM holders"):
            ref = HolderRef(driver, key, name)
            planned = dict(plan_from_text(plan_text, ref).leases)
            got = by_holder.get((driver, key), {})
            if got != planned:
                raise self._refuse(
                    f"is corrupt (holder {shorten(str(ref))} leases {_lease_text(got)}, its "
                    f"recorded plan {_lease_text(planned)})")
        return leases

    def _holders_in(self, db: sqlite3.Connection) -> tuple[HolderRecord, ...]:
        rows = db.execute(f"SELECT {self._HOLDER_COLS} FROM holders "
                          f"ORDER BY driver, name, key").fetchall()
        return tuple(self._holder(r) for r in rows)

    def _dead_in(self, db: sqlite3.Connection) -> list[Any]:
        rows = db.execute(f"SELECT {self._HOLDER_COLS} FROM holders "
                          f"WHERE owner_pid IS NOT NULL").fetchall()
        # (an owner recorded in another PID namespace is not judged by its pid, which
        # means another process here: HolderRecord.owner_runs)
        return [r for r in rows if not _owner_runs(r[4], r[5], r[8], self._alive)]

    def _reap_in(self, db: sqlite3.Connection) -> tuple[HolderRecord, ...]:
        dead = self._dead_in(db)
        for r in dead:
            db.execute("DELETE FROM holders WHERE driver = ? AND key = ?", (r[0], r[1]))
        return tuple(self._holder(r) for r in dead)

    # -- queries (never write) ----------------------------------------------------------

    def leases(self) -> tuple[Lease, ...]:
        """Every lease, by CPU (dead owners' included: see :meth:`dead`)."""
        try:
            with self.snapshot():  # (the lease rows and the plans they are checked against)
                return self._leases_in(self._db)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def holders(self) -> tuple[HolderRecord, ...]:
        """Every holder, by driver and name."""
        try:
            return self._holders_in(self._db)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def dead(self) -> tuple[HolderRecord, ...]:
        """Holders whose owner process is gone (what :meth:`reap` would remove)."""
        try:
            return tuple(self._holder(r) for r in self._dead_in(self._db))
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def find(self, selector: str, *, driver: str | None = None) -> HolderRecord | None:
        """The holder with key, UUID or else name ``selector``; ``None`` if none.
        A name shared by holders of several drivers → LedgerError listing them."""
        try:
            with self.snapshot():
                return self._find_in(self._db, selector, driver)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def get(self, holder: HolderRef) -> HolderRecord | None:
        """The record of exactly ``holder`` (driver and key)."""
        rows = self._read(f"SELECT {self._HOLDER_COLS} FROM holders WHERE driver = ? AND "
                          f"key = ?", (holder.driver, holder.key))
        return self._holder(rows[0]) if rows else None

    def _find_in(self, db: sqlite3.Connection, selector: str, driver: str | None, *,
                 corrupt_plan: bool = False) -> HolderRecord | None:
        where = "" if driver is None else " AND driver = ?"
        extra: tuple[str, ...] = () if driver is None else (driver,)
        keys = [selector]
        uuid = _canonical_uuid(selector)
        if uuid is not None:
            keys.append(f"{KEY_UUID}:{uuid}")
        for column, values in (("key", keys), ("name", [selector])):
            rows = db.execute(
                f"SELECT {self._HOLDER_COLS} FROM holders WHERE {column} IN "
                f"({', '.join('?' * len(values))}){where} ORDER BY driver, key",
                (*values, *extra)).fetchall()
            if len(rows) == 1:
                return self._holder_anyway(db, rows[0]) if corrupt_plan else \
                    self._holder(rows[0])
            if len(rows) > 1:
                found = ", ".join(f"{r[0]}:{r[2]} ({r[1]})" for r in rows)
                raise LedgerError(
                    f"{shorten(selector)} names several holders: {found}; give --driver or "
                    f"a UUID", code="ambiguous")
        return None

    def host_record(self) -> HostRecord | None:
        """The host as found at the first lease (None when nothing is leased and nothing
        is left to put back)."""
        rows = self._read("SELECT created, record FROM host WHERE id = 1")
        if not rows:
            return None
        if not _sane_time(rows[0][0]):
            raise self._refuse(f"is corrupt (the host record was created at "
                               f"{shorten(str(rows[0][0]))}, not a time)")
        try:
            return HostRecord.from_text(rows[0][0], rows[0][1])
        except (ValueError, TypeError, KeyError, AttributeError, PinwardenError) as exc:
            raise self._refuse(f"is corrupt (host record: {shorten(str(exc))})") from None
        except RecursionError:
            raise self._refuse("is corrupt (host record: nested too deeply)") from None

    def changes(self) -> dict[str, str]:
        """Host settings pinwarden changed: key → original value."""
        return {k: v for k, v in self._read("SELECT key, original FROM changes ORDER BY key")}

    # -- changes ------------------------------------------------------------------------

    def reap(self) -> tuple[HolderRecord, ...]:
        """Free every holder whose owner process is gone; return them (also kept in
        :attr:`last_reaped`)."""
        if not self.dead():
            self.last_reaped = ()  # nothing to do: no write transaction
        else:
            with self._write() as db:
                self.last_reaped = self._reap_in(db)
        return self.last_reaped

    def reserve(self, holder: HolderRef, decide: Callable[[tuple[Lease, ...]], Plan], *,
                owner_pid: int | None = None, host: HostRecord | None = None) -> Plan:
        """In one transaction: reap dead owners, call ``decide(current leases)`` and record
        the plan's leases for ``holder`` (replacing any it already had).

        ``decide`` sees every lease, the holder's own included (policy ignores those).  If
        it raises, nothing but the reaping is recorded and the exception propagates.  A
        plan that leases a CPU someone else holds is refused (:class:`Refusal`) by the
        database itself, and so is a second holder of the same driver and name.
        ``owner_pid`` (if given) becomes the holder's owner; otherwise a previous owner
        is kept.  ``host``: recorded as the host as found when no host record exists yet
        and the plan leases something (the first lease).  The holder's previous record is
        left in :attr:`last_replaced` (for :meth:`put_back`).
        """
        owner_start: int | None = None
        owner_ns: int | None = None
        if owner_pid is not None:
            from pinwarden import procs

            if (why := procs.foreign_proc()) is not None:
                raise LedgerError(f"cannot reserve CPUs for {holder}: {why}")
            owner_ns = procs.pid_namespace()
            owner_start = procs.start_time(owner_pid)
            if owner_start is None:
                raise LedgerError(f"cannot reserve CPUs for {holder}: owner process "
                                  f"{owner_pid} has exited")
        self.last_reaped = ()
        self.last_replaced = None
        failure: Exception | None = None
        with self._write() as db:
            self.last_reaped = self._reap_in(db)
            db.execute("SAVEPOINT plan")
            try:
                rows = db.execute(f"SELECT {self._HOLDER_COLS} FROM holders WHERE driver = ? "
                                  f"AND key = ?", (holder.driver, holder.key)).fetchall()
                previous = self._holder(rows[0]) if rows else None
                # first: the twin's leases refused it as "only 0 free CPUs; leased now: CPU
                # 1 to qemu domain 'x'", the domain itself (a reserve of its file without
                # <uuid>, then its start: XML hunt)
                self._no_twin(db, holder)
                leases = self._leases_in(db)
                plan = decide(leases)
                self._record(db, holder, plan, owner_pid, owner_start, owner_ns)
                if host is not None and plan.leases:
                    db.execute("INSERT OR IGNORE INTO host (id, created, record) "
                               "VALUES (1, ?, ?)", (host.created, host.to_text()))
                self.last_replaced = previous
            except Exception as exc:
                # Drop the plan, keep the reaping: the transaction still commits.
                db.execute("ROLLBACK TO plan")
                failure = exc
            db.execute("RELEASE plan")
        if failure is not None:
            if isinstance(failure, sqlite3.Error):
                raise self._error(failure) from None
            raise failure
        return plan

    @staticmethod
    def _no_twin(db: sqlite3.Connection, holder: HolderRef) -> None:
        """Refuse ``holder`` when another holder of its driver has its name."""
        twin = db.execute("SELECT key FROM holders WHERE driver = ? AND name = ? AND key != ?",
                          (holder.driver, holder.name, holder.key)).fetchone()
        if twin is not None:
            other = HolderRef(holder.driver, twin[0], holder.name)
            by_name = " (a reservation of a file without <uuid> is the name's, not the " \
                "defined domain's: reserve the domain's own XML, 'virsh dumpxml')" \
                if other.uuid is None and holder.uuid is not None else ""
            raise Refusal(
                f"{holder.describe()} and the recorded {other.describe()} share a name: "
                f"pinwarden would not tell them apart; release the recorded one first "
                f"({command_line('pinwarden release', twin[0], '--driver', holder.driver)}) "
                f"or rename the domain{by_name}", code="conflict")

    def _record(self, db: sqlite3.Connection, holder: HolderRef, plan: Plan,
                owner_pid: int | None, owner_start: int | None, owner_ns: int | None) -> None:
        now = time.time()
        db.execute("DELETE FROM leases WHERE driver = ? AND key = ?", (holder.driver, holder.key))
        db.execute(
            "INSERT INTO holders (driver, key, name, created, owner_pid, owner_start, plan, "
            "owner_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (driver, key) DO UPDATE "
            "SET name = excluded.name, plan = excluded.plan, "
            "owner_pid = coalesce(excluded.owner_pid, owner_pid), "
            "owner_start = CASE WHEN excluded.owner_pid IS NULL THEN owner_start "
            "ELSE excluded.owner_start END, "
            "owner_ns = CASE WHEN excluded.owner_pid IS NULL THEN owner_ns "
            "ELSE excluded.owner_ns END",
            (holder.driver, holder.key, holder.name, now, owner_pid, owner_start,
             plan_to_text(plan), owner_ns))
        for cpu, role in sorted(plan.leases.items()):
            try:
                db.execute("INSERT INTO leases (cpu, driver, key, role, created) "
                           "VALUES (?, ?, ?, ?, ?)", (cpu, holder.driver, holder.key, role, now))
            except sqlite3.IntegrityError as exc:
                row = db.execute("SELECT h.driver, h.key, h.name FROM leases l JOIN holders h "
                                 "USING (driver, key) WHERE l.cpu = ?", (cpu,)).fetchone()
                if row is None:  # not a second holder: a CHECK failed (CPU out of range)
                    raise LedgerError(f"invalid lease of CPU {cpu} ({shorten(role)}) for "
                                      f"{holder}: {exc}") from None
                other = HolderRef(*row)
                raise Refusal(
                    f"CPU {cpu} is already leased to {other}; choose other CPUs or release "
                    f"that holder first",
                    code="conflict") from None

    def put_back(self, holder: HolderRef, previous: HolderRecord | None) -> None:
        """Undo a :meth:`reserve` of ``holder``: its record and leases become
        ``previous`` again (None: the holder did not exist, it is removed)."""
        with self._write() as db:
            db.execute("DELETE FROM holders WHERE driver = ? AND key = ?",
                       (holder.driver, holder.key))
            if previous is None:
                return
            plan = previous.plan
            db.execute(f"INSERT INTO holders ({self._HOLDER_COLS}) VALUES (?, ?, ?, ?, ?, ?, "
                       f"?, ?, ?)", (holder.driver, holder.key, previous.ref.name,
                                     previous.created, previous.owner_pid,
                                     previous.owner_start, plan_to_text(plan), previous.cgroup,
                                     previous.owner_ns))
            for cpu, role in sorted(plan.leases.items()):
                db.execute("INSERT INTO leases (cpu, driver, key, role, created) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (cpu, holder.driver, holder.key, role, previous.created))

    def release(self, selector: str, *, driver: str | None = None,
                corrupt_plan: bool = False) -> HolderRecord:
        """Free the holder named ``selector`` (key, UUID or name); unknown → LedgerError.
        ``corrupt_plan``: a holder whose recorded plan cannot be read (edited by hand) is
        freed too, its record then planning nothing but the CPUs its lease rows name —
        every command refused to work while it was there, this one included, and the
        only way out was to move the whole database aside (CLI hunt)."""
        with self._write() as db:
            record = self._find_in(db, selector, driver, corrupt_plan=corrupt_plan)
            if record is None:
                scope = "" if driver is None else f" of driver {driver}"
                raise LedgerError(f"no holder{scope} named {shorten(selector)} in "
                                  f"{self.path}; 'pinwarden status' lists them",
                                  code="unknown-holder")
            db.execute("DELETE FROM holders WHERE driver = ? AND key = ?",
                       (record.ref.driver, record.ref.key))
        return record

    def drop(self, holder: HolderRef) -> HolderRecord | None:
        """Free exactly ``holder`` if it is recorded; its record, or None."""
        with self._write() as db:
            rows = db.execute(f"SELECT {self._HOLDER_COLS} FROM holders WHERE driver = ? "
                              f"AND key = ?", (holder.driver, holder.key)).fetchall()
            if not rows:
                return None
            db.execute("DELETE FROM holders WHERE driver = ? AND key = ?",
                       (holder.driver, holder.key))
        return self._holder(rows[0])

    def _update(self, holder: HolderRef, sql: str, params: tuple[Any, ...]) -> None:
        with self._write() as db:
            cur = db.execute(sql, (*params, holder.driver, holder.key))
            if cur.rowcount != 1:
                raise LedgerError(f"{holder} holds no leases in {self.path}",
                                  code="unknown-holder")

    def set_owner(self, holder: HolderRef, pid: int | None) -> None:
        """Make process ``pid`` (identified with its start time) the holder's owner; its
        death frees the holder.  ``None`` clears the owner."""
        start: int | None = None
        ns: int | None = None
        if pid is not None:
            from pinwarden import procs

            if (why := procs.foreign_proc()) is not None:
                raise LedgerError(f"cannot make process {pid} the owner of {holder}: {why}")
            ns = procs.pid_namespace()
            start = procs.start_time(pid)
            if start is None:
                raise LedgerError(f"cannot make process {pid} the owner of {holder}: "
                                  f"it has exited")
        self._update(holder, "UPDATE holders SET owner_pid = ?, owner_start = ?, "
                             "owner_ns = ? WHERE driver = ? AND key = ?", (pid, start, ns))

    def set_cgroup(self, holder: HolderRef, path: str | None) -> None:
        """Record where enforcement placed the holder (cpuset cgroup path)."""
        self._update(holder, "UPDATE holders SET cgroup = ? WHERE driver = ? AND key = ?",
                     (path,))

    def record_changes(self, originals: Mapping[str, str]) -> None:
        """Remember the original value of each host setting about to change — only the
        first time: a value already recorded is the original, never overwritten."""
        if not originals:
            return
        now = time.time()
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO changes (key, original, created) "
                           "VALUES (?, ?, ?)", [(k, v, now) for k, v in originals.items()])

    def put_changes(self, values: Mapping[str, str]) -> None:
        """Set change records outright (a record whose bookkeeping moves on: the value
        pinwarden last wrote; its original is the caller's to keep)."""
        if values:
            self.amend_host(None, values)

    def amend_host(self, host: HostRecord | None, values: Mapping[str, str]) -> None:
        """In one transaction: replace the host record (if one exists and ``host`` is
        given) and set the change records ``values`` outright (an edit somebody else made
        while things are leased, taken into what is put back)."""
        now = time.time()
        with self._write() as db:
            if host is not None:
                db.execute("UPDATE host SET record = ? WHERE id = 1", (host.to_text(),))
            db.executemany("INSERT INTO changes (key, original, created) VALUES (?, ?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET original = excluded.original",
                           [(k, v, now) for k, v in values.items()])

    def forget_changes(self, keys: Iterable[str]) -> None:
        """The settings ``keys`` are back as found: forget their originals."""
        wanted = list(keys)
        if not wanted:
            return
        with self._write() as db:
            db.executemany("DELETE FROM changes WHERE key = ?", [(k,) for k in wanted])

    def clear_host_record(self) -> bool:
        """Forget the host record once nothing is leased and nothing is left to put back;
        False (and nothing done) while a lease or a change remains.  Narrowed live pins of
        running domains (``repin:`` records) do not count: the libvirt adapters give them
        back, and the cgroup layout as found no longer depends on them."""
        with self._write() as db:
            busy = db.execute("SELECT (SELECT count(*) FROM leases) + (SELECT count(*) "
                              "FROM changes WHERE key NOT LIKE 'repin:%')").fetchone()[0]
            if busy:
                return False
            db.execute("DELETE FROM host")
        return True


_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                   r"[0-9a-fA-F]{12}")


def _canonical_uuid(text: str) -> str | None:
    if not _UUID.fullmatch(text):
        return None
    digits = text.replace("-", "").lower()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
