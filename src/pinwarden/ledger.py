"""The host-wide, durable record of exclusive leases (SQLite, WAL mode).

Check-and-reserve is one ``BEGIN IMMEDIATE`` transaction, so racing processes get exactly
one winner per CPU; the ``leases`` table's primary key is the CPU number, so the database
itself refuses a second holder.

The database lives at ``<state_dir>/leases.db``.  It is created atomically (built under a
temporary name, then linked into place), so an existing file that is empty, not SQLite,
corrupt, foreign or of a newer schema is never ours to fix: it is refused with a
:class:`~pinwarden.errors.LedgerError` and left byte-for-byte as it was.

Owner liveness: a holder may name an owner process ``(pid, start time)``; when that process
is gone (or its pid now belongs to another process) the holder and its leases are reaped,
inside the next reserving transaction or by :meth:`Ledger.reap`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pinwarden import procs
from pinwarden.errors import LedgerError, PinwardenError, Refusal
from pinwarden.model import HolderRef, Lease, Plan

#: Schema version (``PRAGMA user_version``).  A schema change bumps it and migrates older files
#: in one transaction on open; an older pinwarden then refuses the file as newer.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id``: "PWL1", marks the file as a pinwarden ledger.
APPLICATION_ID = 0x50574C31
DB_NAME = "leases.db"
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA_V1 = """
CREATE TABLE holders (
    driver      TEXT NOT NULL,
    key         TEXT NOT NULL,
    name        TEXT NOT NULL,
    created     REAL NOT NULL,
    owner_pid   INTEGER CHECK (owner_pid IS NULL OR owner_pid > 0),
    owner_start INTEGER,
    plan        TEXT NOT NULL,
    cgroup      TEXT,
    PRIMARY KEY (driver, key)
) STRICT;
CREATE TABLE leases (
    cpu     INTEGER PRIMARY KEY CHECK (cpu >= 0),
    driver  TEXT NOT NULL,
    key     TEXT NOT NULL,
    role    TEXT NOT NULL,
    created REAL NOT NULL,
    FOREIGN KEY (driver, key) REFERENCES holders (driver, key) ON DELETE CASCADE
) STRICT;
CREATE INDEX leases_by_holder ON leases (driver, key);
"""

#: Liveness check: ``alive(pid, start_time)``.  Replaceable in tests.
Liveness = Callable[[int, int | None], bool]


@dataclass(frozen=True, slots=True)
class HolderRecord:
    ref: HolderRef
    created: float
    owner_pid: int | None  # process whose death frees the holder's leases
    owner_start: int | None  # its start time (clock ticks, /proc/PID/stat field 22)
    plan: Plan  # the plan that was reserved
    cgroup: str | None = None  # enforced cgroup path, once enforcement has placed it


def plan_to_text(plan: Plan) -> str:
    data = plan.to_json()
    data["default_cpus"] = None if plan.default_cpus is None else str(plan.default_cpus)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def plan_from_text(text: str, where: str) -> Plan:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Plan.from_json(data)
    except (ValueError, TypeError, PinwardenError) as exc:  # CpuSetError is a PinwardenError
        raise LedgerError(f"corrupt plan recorded for {where}: {exc}") from None


def _kind(exc: sqlite3.Error) -> str:
    """``busy``, ``readonly``, ``corrupt`` or ``other``, from SQLite's primary result code."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return "busy"
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return "readonly"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text \
            or "not a database" in text:
        return "corrupt"
    return "other"


class Ledger:
    """The lease database of one state directory.  One instance per process (the SQLite
    connection is not shared across ``fork``); use it as a context manager or call
    :meth:`close`."""

    def __init__(self, state_dir: Path, *, busy_timeout: float = 60.0,
                 liveness: Liveness | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.busy_timeout = busy_timeout
        self._alive: Liveness = liveness or (lambda pid, start: procs.alive(pid, start))
        #: Holders reaped by the last :meth:`reserve` or :meth:`reap` (also run by
        #: :meth:`leases` and :meth:`holders`): their cgroups may need removing.
        self.last_reaped: tuple[HolderRecord, ...] = ()
        self._ensure_dir()
        try:
            os.stat(self.path)
        except FileNotFoundError:
            self._create()
        except OSError as exc:
            raise LedgerError(f"cannot access lease database {self.path}: {exc.strerror} "
                              f"(run as root or choose another --state-dir)") from None
        self._db = self._open()

    # -- opening ------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(
                f"cannot use state directory {self.state_dir}: {exc.strerror} "
                f"(run as root or choose another --state-dir)") from None
        if not self.state_dir.is_dir():
            raise LedgerError(f"state directory {self.state_dir} is not a directory")

    def _create(self) -> None:
        """Build a fresh database under a temporary name and link it into place, so
        ``leases.db`` never exists half-initialised.  Losing a creation race is fine."""
        tmp = self.state_dir / f".{DB_NAME}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(
                    "BEGIN IMMEDIATE;" + _SCHEMA_V1 +
                    f"PRAGMA application_id = {APPLICATION_ID};"
                    f"PRAGMA user_version = {SCHEMA_VERSION};"
                    "COMMIT;")
            finally:
                db.close()  # last connection: checkpoints and removes the -wal file
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # lost a creation race: use theirs
                os.link(tmp, self.path)
            dir_fd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except (OSError, sqlite3.Error) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LedgerError(f"cannot create lease database {self.path}: {why}") from None
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _refuse(self, why: str) -> LedgerError:
        return LedgerError(
            f"lease database {self.path} {why}; it was left untouched — restore it from a "
            f"backup or move it aside (every lease it records is then forgotten)")

    def _open(self) -> sqlite3.Connection:
        # Check the file header before SQLite sees it: SQLite happily treats an empty file
        # as a new database, and we never create one.
        try:
            with open(self.path, "rb") as f:
                header = f.read(100)
        except OSError as exc:
            raise LedgerError(f"cannot read lease database {self.path}: {exc.strerror} "
                              f"(run as root or choose another --state-dir)") from None
        if not header:
            raise self._refuse("is empty")
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise self._refuse("is not an SQLite database")
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None,
                                 timeout=self.busy_timeout)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open lease database {self.path}: {exc}") from None
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
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
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = FULL")
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                db.execute("PRAGMA journal_mode = WAL")
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

    def _locked(self) -> LedgerError:
        return LedgerError(
            f"lease database {self.path} stayed locked by another pinwarden for "
            f"{self.busy_timeout:g} s; retry, or find the stuck process with "
            f"'fuser {self.path}'", code="ledger-busy")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any
        exception (which is re-raised, SQLite errors as LedgerError)."""
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
        if kind == "busy":
            return self._locked()
        if kind == "readonly":
            return LedgerError(f"lease database {self.path} is read-only for this user "
                               f"(run as root or choose another --state-dir)")
        if kind == "corrupt":
            return self._refuse(f"is corrupt ({str(exc).splitlines()[0]})")
        return LedgerError(f"lease database {self.path}: {str(exc).splitlines()[0]}")

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    # -- rows ---------------------------------------------------------------------------

    _HOLDER_COLS = "driver, key, name, created, owner_pid, owner_start, plan, cgroup"
    _LEASE_SQL = ("SELECT l.cpu, l.driver, l.key, h.name, l.role, l.created, h.owner_pid "
                  "FROM leases l JOIN holders h USING (driver, key) ORDER BY l.cpu")

    @staticmethod
    def _holder(row: Any) -> HolderRecord:
        driver, key, name, created, owner_pid, owner_start, plan, cgroup = row
        ref = HolderRef(driver, key, name)
        return HolderRecord(ref=ref, created=created, owner_pid=owner_pid,
                            owner_start=owner_start, plan=plan_from_text(plan, str(ref)),
                            cgroup=cgroup)

    @staticmethod
    def _lease(row: Any) -> Lease:
        cpu, driver, key, name, role, created, owner_pid = row
        return Lease(cpu=cpu, holder=HolderRef(driver, key, name), role=role,
                     created=created, owner_pid=owner_pid)

    def _holders_in(self, db: sqlite3.Connection) -> tuple[HolderRecord, ...]:
        rows = db.execute(f"SELECT {self._HOLDER_COLS} FROM holders "
                          f"ORDER BY driver, name, key").fetchall()
        return tuple(self._holder(r) for r in rows)

    def _reap_in(self, db: sqlite3.Connection) -> tuple[HolderRecord, ...]:
        rows = db.execute(f"SELECT {self._HOLDER_COLS} FROM holders "
                          f"WHERE owner_pid IS NOT NULL").fetchall()
        dead = [r for r in rows if not self._alive(r[4], r[5])]
        for r in dead:
            db.execute("DELETE FROM holders WHERE driver = ? AND key = ?", (r[0], r[1]))
        return tuple(self._holder(r) for r in dead)

    # -- queries ------------------------------------------------------------------------

    def leases(self, *, reap: bool = True) -> tuple[Lease, ...]:
        """Every lease, by CPU.  With ``reap`` (default) dead owners are reaped first."""
        if reap:
            self.reap()
        return tuple(self._lease(r) for r in self._read(self._LEASE_SQL))

    def holders(self, *, reap: bool = True) -> tuple[HolderRecord, ...]:
        """Every holder, by driver and name.  With ``reap`` dead owners are reaped first."""
        if reap:
            self.reap()
        try:
            return self._holders_in(self._db)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def find(self, selector: str, *, driver: str | None = None) -> HolderRecord | None:
        """The holder whose key (UUID) or else name is ``selector``; ``None`` if none.
        A name shared by holders of several drivers → LedgerError listing them."""
        try:
            return self._find_in(self._db, selector, driver)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def _find_in(self, db: sqlite3.Connection, selector: str,
                 driver: str | None) -> HolderRecord | None:
        where = "" if driver is None else " AND driver = ?"
        extra: tuple[str, ...] = () if driver is None else (driver,)
        for column in ("key", "name"):
            rows = db.execute(f"SELECT {self._HOLDER_COLS} FROM holders "
                              f"WHERE {column} = ?{where} ORDER BY driver, key",
                              (selector, *extra)).fetchall()
            if len(rows) == 1:
                return self._holder(rows[0])
            if len(rows) > 1:
                found = ", ".join(f"{r[0]}:{r[2]} ({r[1]})" for r in rows)
                raise LedgerError(
                    f"{selector!r} names several holders: {found}; give --driver or a UUID",
                    code="ambiguous")
        return None

    # -- changes ------------------------------------------------------------------------

    def reap(self) -> tuple[HolderRecord, ...]:
        """Free every holder whose owner process is gone; return them (also kept in
        :attr:`last_reaped`, so callers listing holders can clean up after them)."""
        try:
            owners = self._db.execute("SELECT owner_pid, owner_start FROM holders "
                                      "WHERE owner_pid IS NOT NULL").fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        if all(self._alive(pid, start) for pid, start in owners):
            self.last_reaped = ()  # nothing to do: no write transaction
        else:
            with self._write() as db:
                self.last_reaped = self._reap_in(db)
        return self.last_reaped

    def reserve(self, holder: HolderRef, decide: Callable[[tuple[Lease, ...]], Plan], *,
                owner_pid: int | None = None) -> Plan:
        """In one transaction: reap dead owners, call ``decide(current leases)`` and record
        the plan's leases for ``holder`` (replacing any it already had).

        ``decide`` sees every lease, the holder's own included (policy ignores those).  If
        it raises, nothing but the reaping is recorded and the exception propagates.  A
        plan that leases a CPU someone else holds is refused (:class:`Refusal`) by the
        database itself.  ``owner_pid`` (if given) becomes the holder's owner; otherwise a
        previous owner is kept.
        """
        owner_start: int | None = None
        if owner_pid is not None:
            owner_start = procs.start_time(owner_pid)
            if owner_start is None:
                raise LedgerError(f"cannot reserve CPUs for {holder}: owner process "
                                  f"{owner_pid} has exited")
        self.last_reaped = ()
        failure: Exception | None = None
        with self._write() as db:
            self.last_reaped = self._reap_in(db)
            db.execute("SAVEPOINT plan")
            try:
                leases = tuple(self._lease(r) for r in db.execute(self._LEASE_SQL))
                plan = decide(leases)
                self._record(db, holder, plan, owner_pid, owner_start)
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

    def _record(self, db: sqlite3.Connection, holder: HolderRef, plan: Plan,
                owner_pid: int | None, owner_start: int | None) -> None:
        now = time.time()
        db.execute("DELETE FROM leases WHERE driver = ? AND key = ?", (holder.driver, holder.key))
        db.execute(
            "INSERT INTO holders (driver, key, name, created, owner_pid, owner_start, plan) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (driver, key) DO UPDATE SET "
            "name = excluded.name, plan = excluded.plan, "
            "owner_pid = coalesce(excluded.owner_pid, owner_pid), "
            "owner_start = CASE WHEN excluded.owner_pid IS NULL THEN owner_start "
            "ELSE excluded.owner_start END",
            (holder.driver, holder.key, holder.name, now, owner_pid, owner_start,
             plan_to_text(plan)))
        for cpu, role in sorted(plan.leases.items()):
            try:
                db.execute("INSERT INTO leases (cpu, driver, key, role, created) "
                           "VALUES (?, ?, ?, ?, ?)", (cpu, holder.driver, holder.key, role, now))
            except sqlite3.IntegrityError as exc:
                row = db.execute("SELECT h.driver, h.key, h.name FROM leases l JOIN holders h "
                                 "USING (driver, key) WHERE l.cpu = ?", (cpu,)).fetchone()
                if row is None:  # not a second holder: a CHECK failed (negative CPU)
                    raise LedgerError(f"invalid lease of CPU {cpu} ({role!r}) for {holder}: "
                                      f"{exc}") from None
                other = HolderRef(*row)
                raise Refusal(
                    f"CPU {cpu} is already leased to {other}; choose other CPUs or release "
                    f"that holder first",
                    code="conflict") from None

    def release(self, selector: str, *, driver: str | None = None) -> HolderRecord:
        """Free the holder named ``selector`` (name or UUID); unknown → LedgerError."""
        with self._write() as db:
            record = self._find_in(db, selector, driver)
            if record is None:
                scope = "" if driver is None else f" of driver {driver}"
                raise LedgerError(f"no holder{scope} named {selector!r} in {self.path}; "
                                  f"'pinwarden status' lists them", code="unknown-holder")
            db.execute("DELETE FROM holders WHERE driver = ? AND key = ?",
                       (record.ref.driver, record.ref.key))
        return record

    def _update(self, holder: HolderRef, column: str, value: Any, extra: Any = None) -> None:
        with self._write() as db:
            if column == "owner":
                cur = db.execute("UPDATE holders SET owner_pid = ?, owner_start = ? "
                                 "WHERE driver = ? AND key = ?",
                                 (value, extra, holder.driver, holder.key))
            else:
                cur = db.execute("UPDATE holders SET cgroup = ? WHERE driver = ? AND key = ?",
                                 (value, holder.driver, holder.key))
            if cur.rowcount != 1:
                raise LedgerError(f"{holder} holds no leases in {self.path}",
                                  code="unknown-holder")

    def set_owner(self, holder: HolderRef, pid: int | None) -> None:
        """Make process ``pid`` (identified with its start time) the holder's owner; its
        death frees the holder.  ``None`` clears the owner."""
        start: int | None = None
        if pid is not None:
            start = procs.start_time(pid)
            if start is None:
                raise LedgerError(f"cannot make process {pid} the owner of {holder}: "
                                  f"it has exited")
        self._update(holder, "owner", pid, start)

    def set_cgroup(self, holder: HolderRef, path: str | None) -> None:
        """Record where enforcement placed the holder (cpuset cgroup path)."""
        self._update(holder, "cgroup", path)
