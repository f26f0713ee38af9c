"""The store: appointments with history, links, cursors, outbox, audit, worklist and webhook inbox,
in a SQLite file (the default: WAL, through sqlite-utils, created 0600) or a PostgreSQL database
(pg.py), through the same methods and the same SQL.

Reads are plain methods; every change happens inside ``with store.tx() as tx:`` so a crash never
half-applies a batch. Hot paths use prepared statements on the connection directly.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import sqlite_utils

from .audit import ROUTINE_KIND, VerifyResult, verify
from .checkpoint import Checkpointer
from .connector import Link
from .errors import StoreError
from .migrations import migrate, newest, version_of
from .pg import is_url, pg_error
from .model import CANCELLED_STATES, Appointment, Snapshot, iso, new_tuple

if TYPE_CHECKING:
    from .tx import Tx

__all__ = ["OUTAGE_FAILURES", "Outage", "OutboxItem", "PendingBooking", "SlotState", "Store", "WorkItem", "database_errors", "for_how_long", "dumps", "loads", "row_link", "store_error", "LINK_COLS"]

_SORTED = orjson.OPT_SORT_KEYS
#: WAL pages (40 MB) at which a commit checkpoints by itself: the checkpoint thread normally leaves
#: it little to copy, and it lets the WAL start over when that thread never catches up completely
_BACKSTOP_PAGES = 10_000


def dumps(obj: Any) -> str:
    """Compact, key-sorted JSON: the one text form of snapshots and bases in the store.

    orjson rather than the standard library: snapshots are encoded two or three times per
    merged change, and orjson does it several times faster (bench/RESULTS.md).
    """
    return orjson.dumps(obj, option=_SORTED).decode()


def for_how_long(seconds: float) -> str:
    """A duration as a person reads it in a status line: "40 s", "12 min", "2 h 5 min"."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def loads(text: str | bytes) -> Any:
    """Decode stored JSON; invalid text raises ``json.JSONDecodeError`` (orjson's is a subclass)."""
    return orjson.loads(text)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    connector: str
    appointment_id: str
    target_version: int
    due_at: float
    attempts: int
    last_error: str | None
    dead: bool
    #: failures that were not transient (recurring conflicts, errors not understood): only these
    #: count towards ``outbox.max_attempts``; an unreachable system is waited for however long
    strikes: int = 0
    #: the account (clinician) the write goes to, where the query asked for it
    account: str | None = None


@dataclass(frozen=True, slots=True)
class OperationRow:
    """A bulk operation as confirmed: what, on which selection, by whom, and when it ended."""

    id: str
    action: str
    params: dict[str, Any]
    created_at: str
    created_by: str
    finished_at: str | None


@dataclass(frozen=True, slots=True)
class OperationItem:
    appointment_id: str
    #: the version the preview showed, and the one the operation wrote (None: not yet)
    seen_version: int
    version: int | None
    #: pending, changed, or skipped
    state: str


@dataclass(frozen=True, slots=True)
class SlotState:
    """One directory date's published slots: what we want shown, and how its write stands."""

    connector: str
    clinician: str
    day: str
    slots: str  # JSON, as :func:`syncbridge.publisher.encode_slots` wrote it
    digest: str
    written: str | None
    verify: bool
    seq: int
    due_at: float | None
    since: float | None
    attempts: int
    dead: bool
    last_error: str | None


def _slot_state(r: tuple[Any, ...]) -> SlotState:
    """A ``published_slots`` row (``_SLOT_COLS`` order) as a SlotState, its flags as booleans."""
    return SlotState(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8], r[9], r[10], bool(r[11]), r[12])


@dataclass(frozen=True, slots=True)
class PendingBooking:
    """A booking a channel holds unconfirmed (Zocdoc ``pending_booking``)."""

    connector: str
    appointment_id: str
    external_id: str
    since: str
    last_error: str | None


_SLOT_COLS = "connector, clinician, day, slots, digest, written, verify, seq, due_at, since, attempts, dead, last_error"


@dataclass(frozen=True, slots=True)
class Outage:
    """A connector whose writes keep failing transiently (refused, timed out, 5xx, 429)."""

    connector: str
    since: float
    failures: int
    last_error: str | None


#: transient write failures in a row before a connector shows unhealthy: one 429 is the weather
OUTAGE_FAILURES = 3


@dataclass(frozen=True, slots=True)
class WorkItem:
    id: int
    key: str
    connector: str | None
    appointment_id: str | None
    kind: str
    instruction: str
    opened_at: str
    closed_at: str | None


_DAMAGED = (
    "the file is damaged: restore the last backup (README, \"Back up\"), or move the file aside and start again: every "
    "system is then read in full and the links rebuilt from the canonical id each copy carries"
)
#: (what SQLite says, what that means for the admin), first match wins
_ADVICE = (
    ("database is locked", "another process held its write lock too long; try again (a long `sqlite3` session or backup may be holding it)"),
    ("unable to open", "the file cannot be opened: check that its directory exists and that this user may read and write both"),
    ("readonly", "the file or its directory is read-only for this user: check the owner and mode (the store is created 0600)"),
    ("disk is full", "the disk is full: free space and start again; what was committed is kept"),
    ("disk i/o error", "the disk reported an error: check the system log and the disk, then restore the last backup if the file is damaged"),
    ("malformed", _DAMAGED),
    ("not a database", _DAMAGED),
)


def schema_mismatch(path: Path | str, found: int, wanted: int) -> str:
    """Why a command refuses a store of another release's schema, and what the admin does about it."""
    if found < wanted:
        return (
            f"the store {path} is at schema {found}, written by an older syncbridge; this one uses schema {wanted}. Only the "
            f"daemon upgrades a store: restart it with this release (`systemctl restart syncbridge`), then run the command again"
        )
    return (
        f"the store {path} is at schema {found}, written by a newer syncbridge; this one understands schema {wanted}. Use "
        f"the syncbridge the daemon runs (the same install), or upgrade this one"
    )


def database_errors() -> tuple[type[Exception], ...]:
    """The errors either engine's driver raises (psycopg's only where it is installed)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.DatabaseError,)
    return (sqlite3.DatabaseError, psycopg.Error)


def store_error(err: Exception, path: str | os.PathLike[str] | None = None) -> StoreError:
    """The engine's error as what an admin needs: what failed and what to do."""
    if not isinstance(err, sqlite3.Error):
        return pg_error(err, str(path or "(PostgreSQL)"))
    said = str(err)
    advice = next((a for key, a in _ADVICE if key in said.lower()), "see the SQLite message")
    where = f" {path}" if path else ""
    return StoreError(f"the store{where} cannot be used ({said}): {advice}")


def _unhealthy(state: dict[str, Any], note: str) -> None:
    """Mark a connector's state unhealthy, adding ``note`` to what is already wrong."""
    state["note"] = "; ".join(filter(None, (None if state["healthy"] else state["note"], note)))
    state["healthy"] = 0


def row_link(r: tuple[Any, ...]) -> Link:
    link: Link = new_tuple(Link, (r[0], r[1], r[2], r[3], loads(r[4]) if r[4] else None, r[5], bool(r[6])))
    return link


LINK_COLS = "connector, appointment_id, external_id, etag, base, applied_version, gone"


class Store:
    """The store on either engine: a SQLite file (``path``) or a PostgreSQL database (a
    ``postgresql://`` URL). Both run the same SQL through the same methods (pg.py translates the
    few spellings that differ); only opening, closing, backups, the integrity check and WAL
    checkpoints are the engine's own."""

    def __init__(
        self, path: str | os.PathLike[str], *, cache_mb: int = 16, migrate: bool = True, password: str | None = None,
        pool_size: int = 4,
    ) -> None:
        """Open (or create) the store. ``migrate``: bring its schema up to this release's, after a
        backup; only the daemon does (under its instance lock). Without it, a store at another
        schema is refused, so a command run beside a daemon of another release never changes the
        schema under it. ``password`` and ``pool_size``: PostgreSQL's (the password revealed from
        its secret reference)."""
        self._migrate = migrate
        self._checkpointer: Checkpointer | None = None
        #: the worker this store object works for when several share a PostgreSQL database (None: the
        #: only one, as on SQLite, or a CLI command): the outbox's records of a write then hold only
        #: for rows the worker still leases (Tx.outbox_done, outbox_retry, outbox_dead)
        self.worker: str | None = None
        if is_url(str(path)):
            self.engine = "postgresql"
            self.path = Path()
            self._open_postgresql(str(path), password, pool_size)
            return
        self.engine = "sqlite"
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        old = os.umask(0o077)  # the -wal and -shm files inherit it
        try:
            self._open(cache_mb)
        except sqlite3.DatabaseError as err:
            raise store_error(err, self.path) from err
        finally:
            os.umask(old)

    def _open(self, cache_mb: int) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db = sqlite_utils.Database(conn)
        self.conn: Any = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(f"PRAGMA cache_size=-{int(cache_mb) * 1024}")  # in KiB when negative
        # checkpoints run from their own thread after commits (checkpoint.py); the automatic one
        # is a backstop
        conn.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_PAGES}")
        self._checkpointer = Checkpointer(self.path)
        conn.execute("PRAGMA temp_store=MEMORY")
        found, wanted = version_of(conn), newest()
        if found != wanted and not (self._migrate or found == 0):
            conn.close()
            raise StoreError(schema_mismatch(self.path, found, wanted))
        if 0 < found < wanted:
            self.backup(self.path.with_name(f"{self.path.name}.schema-{found}.bak"))
        self.schema_version = migrate(conn)

    def _open_postgresql(self, url: str, password: str | None, pool_size: int) -> None:
        """Connect (a pool of ``pool_size``) and bring the schema up to date. No copy is taken before
        an upgrade: each step is one transaction, and backups of a database are its admin's
        (``pg_dump``, continuous archiving: docs/postgresql.md)."""
        from .pg import PgConnection

        conn = PgConnection(url, password=password, pool_size=pool_size)
        self.conn = conn
        self.where = conn.where
        try:
            found, wanted = version_of(conn, "postgresql"), newest()
            if found != wanted and not (self._migrate or found == 0):
                raise StoreError(schema_mismatch(self.where, found, wanted))
            self.schema_version = migrate(conn, "postgresql")
        except BaseException as err:
            conn.close()
            if isinstance(err, conn.DatabaseError):
                raise pg_error(err, self.where) from err
            raise

    def backup(self, target: Path) -> Path:
        """A consistent copy of the store, taken while it is in use (SQLite's online backup API).
        A PostgreSQL store is backed up by its database's own means (``pg_dump``)."""
        if self.engine != "sqlite":
            raise StoreError(f"the store {self.where} is a PostgreSQL database: back it up with pg_dump (docs/postgresql.md)")
        dest = sqlite3.connect(target)
        try:
            self.conn.backup(dest)
        finally:
            dest.close()
        os.chmod(target, 0o600)
        return target

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.conn.close()

    def check_integrity(self) -> None:
        """Refuse a damaged store before anything is synced from it (SQLite's ``quick_check``:
        seconds for 100k appointments, once per daemon start). PostgreSQL checks its pages as it
        reads them (and with data checksums, where the cluster has them): nothing to do here."""
        if self.engine != "sqlite":
            return
        try:
            found = [r[0] for r in self.conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as err:
            raise store_error(err, self.path) from err
        if found != ["ok"]:
            raise store_error(sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(found)}"), self.path)

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One transaction; writes are buffered in the Tx and flushed in bulk just before COMMIT.
        One writer at a time on either engine (SQLite's write lock; an advisory lock on PostgreSQL)."""
        from .tx import Tx

        self.conn.execute("BEGIN IMMEDIATE")
        tx = Tx(self)
        try:
            yield tx
            tx.flush()
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        if self._checkpointer is not None:
            self._checkpointer.committed()

    # --- reads ---------------------------------------------------------------------------

    def appointment(self, appointment_id: str) -> Appointment | None:
        r = self.conn.execute(
            "SELECT id, snapshot, version, updated_at, updated_via FROM appointments WHERE id = ?", (appointment_id,)
        ).fetchone()
        return Appointment(r[0], loads(r[1]), r[2], r[3], r[4]) if r else None

    def appointments(self, ids: Iterable[str] | None = None) -> list[Appointment]:
        sql = "SELECT id, snapshot, version, updated_at, updated_via FROM appointments"
        if ids is None:
            rows = self.conn.execute(sql + " ORDER BY start").fetchall()
        else:
            ids = list(ids)
            rows = []
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows += self.conn.execute(sql + f" WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return [Appointment(r[0], loads(r[1]), r[2], r[3], r[4]) for r in rows]

    def history(self, appointment_id: str) -> list[tuple[int, Snapshot, str, str]]:
        return [
            (r[0], loads(r[1]), r[2], r[3])
            for r in self.conn.execute(
                "SELECT version, snapshot, at, via FROM appointment_history "
                "WHERE appt = (SELECT key FROM appointments WHERE id = ?) ORDER BY version",
                (appointment_id,),
            )
        ]

    def link(self, connector: str, appointment_id: str) -> Link | None:
        r = self.conn.execute(
            f"SELECT {LINK_COLS} FROM links WHERE appt = (SELECT key FROM appointments WHERE id = ?) AND connector = ?", (appointment_id, connector)
        ).fetchone()
        return row_link(r) if r else None

    def link_by_external(self, connector: str, external_id: str) -> Link | None:
        r = self.conn.execute(
            f"SELECT {LINK_COLS} FROM links WHERE connector = ? AND external_id = ?", (connector, external_id)
        ).fetchone()
        return row_link(r) if r else None

    def links_of(self, connector: str) -> list[Link]:
        return [row_link(r) for r in self.conn.execute(f"SELECT {LINK_COLS} FROM links WHERE connector = ?", (connector,))]

    def links_for(self, appointment_id: str) -> list[tuple[Link, str | None]]:
        """Every link of an appointment with the time its current version was applied (the receipt)."""
        return [
            (row_link(r[:7]), r[7])
            for r in self.conn.execute(
                f"SELECT {LINK_COLS}, applied_at FROM links WHERE appt = (SELECT key FROM appointments WHERE id = ?) ORDER BY connector", (appointment_id,)
            )
        ]

    def applied_stamps(self, appointment_id: str) -> dict[str, float | None]:
        """connector -> when the system acknowledged its last write of the appointment (epoch seconds)."""
        rows = self.conn.execute(
            "SELECT connector, applied_ts FROM links WHERE appt = (SELECT key FROM appointments WHERE id = ?)", (appointment_id,)
        )
        return {r[0]: r[1] for r in rows}

    def secret(self, connector: str, key: str) -> bytes | None:
        """A secret a connector obtained at run time, as stored (encrypted: host.Vault)."""
        r = self.conn.execute("SELECT value FROM secrets WHERE connector = ? AND key = ?", (connector, key)).fetchone()
        return bytes(r[0]) if r else None

    def cursor(self, connector: str) -> str | None:
        r = self.conn.execute("SELECT cursor FROM cursors WHERE connector = ?", (connector,)).fetchone()
        return r[0] if r else None

    def connector_state(self, connector: str) -> dict[str, Any]:
        r = self.conn.execute(
            "SELECT cursor, updated_at, last_good_pull, last_full_sweep, healthy, note, degraded FROM cursors WHERE connector = ?",
            (connector,),
        ).fetchone()
        keys = ("cursor", "updated_at", "last_good_pull", "last_full_sweep", "healthy", "note", "degraded")
        state = dict(zip(keys, r, strict=True)) if r else dict.fromkeys(keys) | {"healthy": 1}
        outage = self.outage(connector)
        if outage is not None and outage.failures >= OUTAGE_FAILURES:
            # kept apart from the pull's health, which a good pull resets: a system that answers
            # reads but refuses writes stays unhealthy until a write lands
            since = datetime.fromtimestamp(outage.since, UTC)
            lasted = for_how_long(time.time() - outage.since)
            _unhealthy(state, f"writes failing since {iso(since)} (for {lasted}): {outage.last_error or 'unreachable'}")
        else:
            # one account's writes failing (a mailbox refusing them, a calendar down) while the
            # others' land, which ends the connector's outage each time: named per account
            accounts = self.conn.execute(
                "SELECT a.clinician, COUNT(*), MAX(o.last_error) FROM outbox o JOIN appointments a ON a.key = o.appt "
                "WHERE o.connector = ? AND o.dead = 0 "
                "AND (o.last_error LIKE 'auth:%' OR o.attempts >= ? AND o.last_error NOT LIKE 'throttled:%') "
                "GROUP BY a.clinician ORDER BY a.clinician",
                (connector, OUTAGE_FAILURES),
            ).fetchall()
            for clinician, waiting, error in accounts:
                _unhealthy(state, f"writes for {clinician} failing ({waiting} waiting): {error}")
        dead = self.conn.execute("SELECT COUNT(*) FROM outbox WHERE dead = 1 AND connector = ?", (connector,)).fetchone()[0]
        if dead:
            # a write given up on is never "ok", however well the pulls go: it stays so until retried
            writes = f"{dead} write{'' if dead == 1 else 's'}"
            _unhealthy(state, f"{writes} dead-lettered (see the worklist; fix the cause, then `syncbridge retry`)")
        return state

    def outage(self, connector: str) -> Outage | None:
        r = self.conn.execute("SELECT connector, since, failures, last_error FROM outages WHERE connector = ?", (connector,)).fetchone()
        return Outage(*r) if r else None

    def outbox_due(self, now: float, limit: int, connector: str | None = None) -> list[OutboxItem]:
        where, args = ("AND connector = ? ", (connector,)) if connector is not None else ("", ())
        rows = self.conn.execute(
            "SELECT connector, appointment_id, target_version, due_at, attempts, last_error, dead, strikes FROM outbox "
            f"WHERE dead = 0 AND due_at <= ? {where}ORDER BY due_at LIMIT ?",
            (now, *args, limit),
        ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows]

    def outbox_due_per_account(self, now: float, connector: str, depth: int) -> list[OutboxItem]:
        """A connector's due writes, the first ``depth`` of each account (clinician) by due time,
        with the account each goes to: every account's next writes in one query, however the queue
        is ordered (an initial sync queues one clinician's sessions, then the next one's)."""
        rows = self.conn.execute(
            "SELECT connector, appointment_id, target_version, due_at, attempts, last_error, dead, strikes, clinician FROM ("
            "SELECT o.connector, o.appointment_id, o.target_version, o.due_at, o.attempts, o.last_error, o.dead, o.strikes, "
            "coalesce(a.clinician, '') AS clinician, "
            "row_number() OVER (PARTITION BY coalesce(a.clinician, '') ORDER BY o.due_at) AS turn "
            "FROM outbox o LEFT JOIN appointments a ON a.key = o.appt WHERE o.dead = 0 AND o.due_at <= ? AND o.connector = ?"
            ") AS turns WHERE turn <= ? ORDER BY due_at",
            (now, connector, depth),
        ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in rows]

    # --- leases: several workers on one PostgreSQL database (docs/postgresql.md, Workers) ---------
    # Each is a statement of its own, outside the store's write transactions (which serialise every
    # writer): claims skip rows another worker's claim holds this instant (FOR UPDATE SKIP LOCKED).

    def claim_writes(self, worker: str | None, connector: str, limit: int, now: float, until: float) -> list[OutboxItem]:
        """Up to ``limit`` of ``connector``'s due writes, leased to ``worker`` until ``until``: rows
        free, expired or its own already (renewed). Without a worker (SQLite: one daemon) the due
        writes, as :meth:`outbox_due`."""
        if worker is None or self.engine != "postgresql":
            return self.outbox_due(now, limit, connector)
        rows = self.conn.execute(
            "UPDATE outbox SET leased_by = ?, lease_until = ? WHERE (connector, appt) IN (SELECT connector, appt FROM outbox "
            "WHERE connector = ? AND dead = 0 AND due_at <= ? AND (leased_by IS NULL OR lease_until < ? OR leased_by = ?) "
            "ORDER BY due_at LIMIT ? FOR UPDATE SKIP LOCKED) "
            "RETURNING connector, appointment_id, target_version, due_at, attempts, last_error, dead, strikes",
            (worker, until, connector, now, now, worker, limit),
        ).fetchall()
        return sorted((OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows), key=lambda i: i.due_at)

    def claim_writes_per_account(self, worker: str | None, connector: str, depth: int, now: float, until: float) -> list[OutboxItem]:
        """:meth:`outbox_due_per_account`, each row leased to ``worker`` until ``until`` (as :meth:`claim_writes`)."""
        if worker is None or self.engine != "postgresql":
            return self.outbox_due_per_account(now, connector, depth)
        rows = self.conn.execute(
            "UPDATE outbox SET leased_by = ?, lease_until = ? WHERE (connector, appt) IN (SELECT connector, appt FROM outbox "
            "WHERE (connector, appt) IN (SELECT connector, appt FROM ("
            "SELECT o.connector, o.appt, row_number() OVER (PARTITION BY coalesce(a.clinician, '') ORDER BY o.due_at) AS turn "
            "FROM outbox o LEFT JOIN appointments a ON a.key = o.appt WHERE o.dead = 0 AND o.due_at <= ? AND o.connector = ? "
            "AND (o.leased_by IS NULL OR o.lease_until < ? OR o.leased_by = ?)) AS turns WHERE turn <= ?) "
            "FOR UPDATE SKIP LOCKED) "
            "RETURNING connector, appointment_id, target_version, due_at, attempts, last_error, dead, strikes, "
            "coalesce((SELECT a.clinician FROM appointments a WHERE a.key = outbox.appt), '')",
            (worker, until, now, connector, now, worker, depth),
        ).fetchall()
        items = [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in rows]
        return sorted(items, key=lambda i: i.due_at)

    def leases(self) -> list[tuple[str, str | None, float]]:
        """Every lease: (name, worker holding it or None, until when). Connectors by their name, jobs
        as ``job:NAME``, each live worker's heartbeat as ``worker:NAME``."""
        return [(r[0], r[1], r[2]) for r in self.conn.execute("SELECT name, leased_by, lease_until FROM leases ORDER BY name")]

    def lease_beat(self, worker: str, until: float) -> None:
        """``worker`` is alive until ``until`` (its heartbeat row; renewed with its leases)."""
        self.conn.execute(
            "INSERT INTO leases (name, leased_by, lease_until) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET leased_by = excluded.leased_by, lease_until = excluded.lease_until",
            (f"worker:{worker}", worker, until),
        )

    def lease_claim(self, worker: str, names: Sequence[str], limit: int, now: float, until: float) -> list[str]:
        """Claim up to ``limit`` of ``names`` that are free or expired for ``worker``; the names it got."""
        if not names or limit <= 0:
            return []
        self.conn.executemany(
            "INSERT INTO leases (name, leased_by, lease_until) VALUES (?, NULL, 0) ON CONFLICT (name) DO NOTHING", [(n,) for n in names]
        )
        marks = ",".join("?" * len(names))
        rows = self.conn.execute(
            f"UPDATE leases SET leased_by = ?, lease_until = ? WHERE name IN (SELECT name FROM leases WHERE name IN ({marks}) "
            "AND (leased_by IS NULL OR lease_until < ?) ORDER BY lease_until, name LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING name",
            (worker, until, *names, now, limit),
        ).fetchall()
        return sorted(r[0] for r in rows)

    def lease_renew(self, worker: str, until: float, now: float) -> None:
        """Extend every lease ``worker`` holds and has not let expire, its claimed outbox rows too, in one statement."""
        self.conn.execute(
            "WITH writes AS (UPDATE outbox SET lease_until = ? WHERE leased_by = ? AND lease_until >= ? RETURNING appt) "
            "UPDATE leases SET lease_until = ? WHERE leased_by = ? AND lease_until >= ?",
            (until, worker, now, until, worker, now),
        )

    def lease_release(self, worker: str, names: Sequence[str] | None = None) -> None:
        """Give up ``names`` (None: everything ``worker`` holds, its outbox rows and heartbeat too:
        a worker stopping cleanly hands its work over at once rather than after the expiry)."""
        if names is None:
            self.conn.execute("UPDATE outbox SET leased_by = NULL, lease_until = NULL WHERE leased_by = ?", (worker,))
            self.conn.execute("UPDATE leases SET leased_by = NULL, lease_until = 0 WHERE leased_by = ?", (worker,))
            return
        self.conn.executemany(
            "UPDATE leases SET leased_by = NULL, lease_until = 0 WHERE name = ? AND leased_by = ?", [(n, worker) for n in names]
        )

    def inbox_connectors(self) -> list[str]:
        """Connectors with notifications waiting (stored by whichever worker received them)."""
        sql = "SELECT DISTINCT connector FROM webhook_inbox WHERE processed_at IS NULL ORDER BY connector"
        return [r[0] for r in self.conn.execute(sql)]

    def outbox_due_connectors(self, now: float) -> list[str]:
        """Connectors with at least one write due now."""
        return [r[0] for r in self.conn.execute("SELECT DISTINCT connector FROM outbox WHERE dead = 0 AND due_at <= ?", (now,))]

    def outbox_next_due(self) -> float | None:
        r = self.conn.execute("SELECT MIN(due_at) FROM outbox WHERE dead = 0").fetchone()
        return r[0]

    def outbox_counts(self) -> dict[str, tuple[int, int]]:
        """connector -> (pending, dead)."""
        return {
            r[0]: (r[1], r[2])
            for r in self.conn.execute("SELECT connector, COUNT(*) FILTER (WHERE dead = 0), COUNT(*) FILTER (WHERE dead = 1) FROM outbox GROUP BY connector")
        }

    def dead_letters(self) -> list[OutboxItem]:
        rows = self.conn.execute(
            "SELECT connector, appointment_id, target_version, due_at, attempts, last_error, dead, strikes FROM outbox WHERE dead = 1"
        ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], True, r[7]) for r in rows]

    def worklist(self, include_closed: bool = False) -> list[WorkItem]:
        where = "" if include_closed else " WHERE closed_at IS NULL"
        return [
            WorkItem(*r)
            for r in self.conn.execute(
                "SELECT id, key, connector, appointment_id, kind, instruction, opened_at, closed_at FROM worklist"
                + where
                + " ORDER BY id"
            )
        ]

    def linked_live(self, connector: str, since: str) -> list[str]:
        """External ids of ``connector``'s copies of live sessions starting at or after ``since``:
        what a presence check asks the system about (Connector.missing)."""
        rows = self.conn.execute(
            "SELECT l.external_id FROM links l JOIN appointments a ON a.key = l.appt WHERE l.connector = ? AND l.gone = 0 "
            "AND l.external_id IS NOT NULL AND a.start >= ? AND a.status NOT IN ('cancelled', 'noshow', 'entered_in_error')",
            (connector, since),
        )
        return [r[0] for r in rows]

    def audit_entries(self, *, appointment_id: str | None = None, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql, args = "SELECT seq, at, kind, connector, appointment_id, detail FROM audit", list[Any]()
        conds = []
        if appointment_id:
            # entries of a stored appointment carry its key, the rare others only the id
            conds.append("(appt = (SELECT key FROM appointments WHERE id = ?) OR (appt IS NULL AND appointment_id = ?))")
            args += [appointment_id, appointment_id]
        if kind:
            # the kind index leaves out "observed" entries; the second term lets SQLite use it
            conds.append("kind = ?" if kind == ROUTINE_KIND else f"kind = ? AND kind != '{ROUTINE_KIND}'")
            args.append(kind)
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        keys = ("seq", "at", "kind", "connector", "appointment_id", "detail")
        return [dict(zip(keys, (*r[:5], loads(r[5])), strict=True)) for r in self.conn.execute(sql, args)]

    def audit_kinds(self) -> list[str]:
        """The kinds of entry the log holds: the kind index has all but the routine one."""
        kinds = [r[0] for r in self.conn.execute(f"SELECT DISTINCT kind FROM audit WHERE kind != '{ROUTINE_KIND}'")]
        if self.conn.execute("SELECT 1 FROM audit WHERE kind = ? LIMIT 1", (ROUTINE_KIND,)).fetchone():
            kinds.append(ROUTINE_KIND)
        return sorted(kinds)

    def verify_audit(self) -> VerifyResult:
        return verify(self.conn)

    def audit_head(self) -> tuple[int, str] | None:
        """(last entry's number, its hash): what an anchor records."""
        row = self.conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def audit_hashes(self, seqs: Iterable[int]) -> dict[int, str]:
        """Entry number -> hash, for these entries (the ones anchors name)."""
        wanted = sorted(set(seqs))
        out: dict[int, str] = {}
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            out.update(self.conn.execute(f"SELECT seq, hash FROM audit WHERE seq IN ({','.join('?' * len(chunk))})", chunk).fetchall())
        return out

    def busy_of(self, clinician: str, start: str, end: str) -> list[tuple[str, str]]:
        return self.conn.execute(
            'SELECT start, "end" FROM busy WHERE clinician = ? AND "end" > ? AND start < ? ORDER BY start', (clinician, start, end)
        ).fetchall()

    def inbox_pending(self, connector: str | None = None) -> list[tuple[int, str, dict[str, str], bytes]]:
        sql = "SELECT id, connector, headers, body FROM webhook_inbox WHERE processed_at IS NULL"
        args: tuple[Any, ...] = ()
        if connector:
            sql += " AND connector = ?"
            args = (connector,)
        return [(r[0], r[1], loads(r[2]), r[3]) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def sessions_of(self, clinician: str, start: str, end: str) -> list[Snapshot]:
        """The clinician's live (not cancelled) sessions starting in [start, end), as snapshots."""
        return [
            loads(r[0])
            for r in self.conn.execute(
                "SELECT snapshot FROM appointments WHERE clinician = ? AND start >= ? AND start < ? "
                f"AND status NOT IN ({','.join('?' * len(CANCELLED_STATES))}) ORDER BY start",
                (clinician, start, end, *sorted(CANCELLED_STATES)),
            )
        ]

    def upcoming_of(self, appointment_ids: list[str], since: str) -> list[tuple[str, str]]:
        """(id, clinician) of these appointments starting at or after ``since``: what a change can
        still do to availability and double bookings (no snapshot is decoded)."""
        out: list[tuple[str, str]] = []
        for i in range(0, len(appointment_ids), 500):
            chunk = appointment_ids[i : i + 500]
            out += self.conn.execute(
                f"SELECT id, clinician FROM appointments WHERE id IN ({','.join('?' * len(chunk))}) AND start >= ?", (*chunk, since)
            ).fetchall()
        return out

    def live_sessions(self, clinician: str, start: str, end: str) -> list[Appointment]:
        """The clinician's live sessions starting in [start, end), with their ids (overlap checks)."""
        return [
            Appointment(r[0], loads(r[1]), r[2], r[3], r[4])
            for r in self.conn.execute(
                "SELECT id, snapshot, version, updated_at, updated_via FROM appointments WHERE clinician = ? AND start >= ? AND start < ? "
                f"AND status NOT IN ({','.join('?' * len(CANCELLED_STATES))}) ORDER BY start",
                (clinician, start, end, *sorted(CANCELLED_STATES)),
            )
        ]

    def linked_in_window(self, connector: str, before: float, lo: str, hi: str, accounts: Sequence[str], *, within: bool) -> list[str]:
        """External ids of ``connector``'s live copies of sessions starting in [lo, hi) that were not
        written from ``before`` (epoch seconds) on: what a complete listing of that window must
        show. ``accounts``: only these clinicians' sessions (``within``), or all but theirs."""
        scope = (f" AND a.clinician {'IN' if within else 'NOT IN'} ({','.join('?' * len(accounts))})") if accounts else ""
        rows = self.conn.execute(
            "SELECT l.external_id FROM links l JOIN appointments a ON a.key = l.appt "
            "WHERE l.connector = ? AND l.gone = 0 AND l.external_id IS NOT NULL "
            "AND (l.applied_ts IS NULL OR l.applied_ts < ?) AND a.start >= ? AND a.start < ?" + scope,
            (connector, before, lo, hi, *accounts),
        )
        return [r[0] for r in rows]

    def sessions_between(self, clinicians: Sequence[str], start: str, end: str) -> list[Appointment]:
        """These clinicians' sessions starting in [start, end), whatever their status, by start time."""
        return [
            Appointment(r[0], loads(r[1]), r[2], r[3], r[4])
            for r in self.conn.execute(
                "SELECT id, snapshot, version, updated_at, updated_via FROM appointments "
                f"WHERE clinician IN ({','.join('?' * len(clinicians))}) AND start >= ? AND start < ? ORDER BY start, clinician",
                (*clinicians, start, end),
            )
        ]

    # --- bulk operations --------------------------------------------------------------------

    def operation(self, operation_id: str) -> OperationRow | None:
        r = self.conn.execute(
            "SELECT id, action, params, created_at, created_by, finished_at FROM operations WHERE id = ?", (operation_id,)
        ).fetchone()
        return OperationRow(r[0], r[1], loads(r[2]), r[3], r[4], r[5]) if r else None

    def operations(self, limit: int = 20) -> list[OperationRow]:
        """The newest operations first."""
        rows = self.conn.execute(
            "SELECT id, action, params, created_at, created_by, finished_at FROM operations ORDER BY created_at DESC, id LIMIT ?", (limit,)
        )
        return [OperationRow(r[0], r[1], loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def operation_items(self, operation_id: str) -> list[OperationItem]:
        rows = self.conn.execute(
            "SELECT appointment_id, seen_version, version, state FROM operation_items WHERE operation = ? ORDER BY appointment_id", (operation_id,)
        )
        return [OperationItem(*r) for r in rows]

    def unfinished_operations(self) -> list[str]:
        """Operations with sessions not yet changed (interrupted): resumed at the next start."""
        rows = self.conn.execute(
            "SELECT DISTINCT operation FROM operation_items WHERE state = 'pending' ORDER BY operation"
        )
        return [r[0] for r in rows]

    # --- published slots (slot_states) ------------------------------------------------------

    def slot_due(self, now: float, limit: int = 200) -> list[SlotState]:
        """Dates whose directory needs a write or a look, due by ``now``: writes first (a slot to
        withdraw is a double booking waiting to happen), then looks, each oldest first."""
        rows = self.conn.execute(
            f"SELECT {_SLOT_COLS} FROM slot_states WHERE due_at IS NOT NULL AND dead = 0 AND due_at <= ? "
            "ORDER BY written IS NOT NULL AND written = digest, due_at LIMIT ?", (now, limit)
        ).fetchall()
        return [_slot_state(r) for r in rows]

    def slot_next_due(self) -> float | None:
        return self.conn.execute("SELECT MIN(due_at) FROM slot_states WHERE due_at IS NOT NULL AND dead = 0").fetchone()[0]

    def slot_states(self, connector: str | None = None) -> list[SlotState]:
        where, args = (" WHERE connector = ?", (connector,)) if connector else ("", ())
        rows = self.conn.execute(f"SELECT {_SLOT_COLS} FROM slot_states{where} ORDER BY connector, clinician, day", args).fetchall()
        return [_slot_state(r) for r in rows]

    def slot_due_by_connector(self) -> dict[str, float]:
        """connector -> the earliest due time of its dates waiting for a write or a look."""
        return dict(self.conn.execute(
            "SELECT connector, MIN(due_at) FROM slot_states WHERE due_at IS NOT NULL AND dead = 0 GROUP BY connector"
        ).fetchall())

    def slot_dead_days(self, connector: str, clinician: str) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT day FROM slot_states WHERE connector = ? AND clinician = ? AND dead = 1 ORDER BY day", (connector, clinician)
        )]

    def pending_bookings(self) -> list[PendingBooking]:
        """Bookings channels hold unconfirmed, oldest first."""
        rows = self.conn.execute("SELECT connector, appointment_id, external_id, since, last_error FROM pending_bookings ORDER BY since")
        return [PendingBooking(*r) for r in rows]

    def slot_counts(self) -> dict[str, tuple[int, int, int]]:
        """connector -> (dates planned, dates waiting for a write or a look, dates dead-lettered)."""
        return {
            r[0]: (r[1], r[2] or 0, r[3] or 0)
            for r in self.conn.execute(
                "SELECT connector, COUNT(*), COUNT(*) FILTER (WHERE due_at IS NOT NULL AND dead = 0), COUNT(*) FILTER (WHERE dead = 1) "
                "FROM slot_states GROUP BY connector"
            )
        }
