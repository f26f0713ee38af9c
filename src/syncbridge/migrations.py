"""Schema migrations, applied in order inside one transaction each; ``schema_version`` records them.

One history for both engines, with the same version numbers: each step is written once in the
SQL both share (SQLite's spelling of types, which the PostgreSQL connection translates, pg.py),
and where one cannot be said in both, ``_POSTGRESQL_WORDS`` gives PostgreSQL's words for it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .errors import StoreError

__all__ = ["MIGRATIONS", "migrate", "newest", "steps", "version_of"]

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE appointments (
            id TEXT PRIMARY KEY,
            clinician TEXT NOT NULL,
            start TEXT NOT NULL,
            status TEXT NOT NULL,
            snapshot TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            updated_via TEXT NOT NULL
        );
        CREATE INDEX appointments_clinician_start ON appointments (clinician, start);
        CREATE TABLE appointment_versions (
            appointment_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            snapshot TEXT NOT NULL,
            at TEXT NOT NULL,
            via TEXT NOT NULL,
            PRIMARY KEY (appointment_id, version)
        );
        CREATE TABLE series (
            id TEXT PRIMARY KEY,
            clinician TEXT NOT NULL,
            timezone TEXT NOT NULL,
            rule TEXT,
            created_at TEXT NOT NULL
        );
        CREATE TABLE links (
            connector TEXT NOT NULL,
            appointment_id TEXT NOT NULL,
            external_id TEXT,
            etag TEXT,
            base TEXT,
            applied_version INTEGER NOT NULL DEFAULT 0,
            applied_at TEXT,
            gone INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (connector, appointment_id)
        );
        CREATE UNIQUE INDEX links_external ON links (connector, external_id) WHERE external_id IS NOT NULL;
        CREATE INDEX links_appointment ON links (appointment_id);
        CREATE TABLE cursors (
            connector TEXT PRIMARY KEY,
            cursor TEXT,
            updated_at TEXT,
            last_good_pull TEXT,
            last_full_sweep TEXT,
            healthy INTEGER NOT NULL DEFAULT 1,
            note TEXT
        );
        CREATE TABLE outbox (
            connector TEXT NOT NULL,
            appointment_id TEXT NOT NULL,
            target_version INTEGER NOT NULL,
            due_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            dead INTEGER NOT NULL DEFAULT 0,
            enqueued_at REAL NOT NULL,
            PRIMARY KEY (connector, appointment_id)
        );
        CREATE INDEX outbox_due ON outbox (dead, due_at);
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            connector TEXT,
            appointment_id TEXT,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE INDEX audit_appointment ON audit (appointment_id);
        CREATE INDEX audit_kind ON audit (kind);
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE TABLE worklist (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL,
            connector TEXT,
            appointment_id TEXT,
            kind TEXT NOT NULL,
            instruction TEXT NOT NULL,
            opened_at TEXT NOT NULL,
            closed_at TEXT,
            closed_by TEXT
        );
        CREATE UNIQUE INDEX worklist_open_key ON worklist (key) WHERE closed_at IS NULL;
        CREATE TABLE webhook_inbox (
            id INTEGER PRIMARY KEY,
            connector TEXT NOT NULL,
            received_at TEXT NOT NULL,
            headers TEXT NOT NULL,
            body BLOB NOT NULL,
            processed_at TEXT
        );
        CREATE TABLE held_batches (
            connector TEXT PRIMARY KEY,
            held_at TEXT NOT NULL,
            would_cancel INTEGER NOT NULL,
            linked INTEGER NOT NULL,
            approved INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE busy (
            connector TEXT NOT NULL,
            clinician TEXT NOT NULL,
            start TEXT NOT NULL,
            "end" TEXT NOT NULL
        );
        CREATE INDEX busy_clinician ON busy (clinician, start);
        """,
    ),
    (
        2,
        """
        -- when our last write to the copy landed, to the microsecond: a full listing that began
        -- before it cannot have seen the copy, so its absence there proves nothing
        ALTER TABLE links ADD COLUMN applied_ts REAL;
        """,
    ),
    (
        3,
        """
        -- secrets a connector obtained at run time (refresh tokens), Fernet-encrypted
        CREATE TABLE secrets (
            connector TEXT NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (connector, key)
        );
        -- the slot set last published per directory, clinician and local date (a digest), so only
        -- dates whose slots changed are published again
        CREATE TABLE published_slots (
            connector TEXT NOT NULL,
            clinician TEXT NOT NULL,
            day TEXT NOT NULL,
            digest TEXT NOT NULL,
            slots INTEGER NOT NULL,
            published_at TEXT NOT NULL,
            PRIMARY KEY (connector, clinician, day)
        );
        CREATE INDEX webhook_inbox_pending ON webhook_inbox (connector) WHERE processed_at IS NULL;
        """,
    ),
    (
        4,
        """
        -- appointments get an integer key in creation order (the canonical id stays the uuid5 text,
        -- unique): the history and the audit's per-appointment index are keyed on it, so their
        -- entries are a few bytes instead of a 35-character id and a batch of changes to
        -- appointments made around the same time writes to neighbouring index pages (the old
        -- rowids are kept as keys, so the creation order is kept too)
        CREATE TABLE appointments_keyed (
            key INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            clinician TEXT NOT NULL,
            start TEXT NOT NULL,
            status TEXT NOT NULL,
            snapshot TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            updated_via TEXT NOT NULL
        );
        INSERT INTO appointments_keyed (key, id, clinician, start, status, snapshot, version, updated_at, updated_via)
            SELECT rowid, id, clinician, start, status, snapshot, version, updated_at, updated_via FROM appointments ORDER BY rowid;
        DROP TABLE appointments;
        ALTER TABLE appointments_keyed RENAME TO appointments;
        CREATE INDEX appointments_clinician_start ON appointments (clinician, start);
        -- a history row whose appointment is missing fails NOT NULL here and the step rolls back
        -- whole, rather than being dropped
        CREATE TABLE appointment_history (
            appt INTEGER NOT NULL,
            version INTEGER NOT NULL,
            snapshot TEXT NOT NULL,
            at TEXT NOT NULL,
            via TEXT NOT NULL,
            PRIMARY KEY (appt, version)
        );
        INSERT INTO appointment_history (appt, version, snapshot, at, via)
            SELECT a.key, v.version, v.snapshot, v.at, v.via FROM appointment_versions v LEFT JOIN appointments a ON a.id = v.appointment_id
            ORDER BY v.rowid;
        DROP TABLE appointment_versions;
        -- the audit entry's appointment key (NULL for entries about no stored appointment), not
        -- part of the hash, which covers appointment_id as before: old entries still verify
        ALTER TABLE audit ADD COLUMN appt INTEGER;
        UPDATE audit SET appt = (SELECT a.key FROM appointments a WHERE a.id = audit.appointment_id) WHERE appointment_id IS NOT NULL;
        DROP INDEX audit_appointment;
        CREATE INDEX audit_appt ON audit (appt) WHERE appt IS NOT NULL;
        CREATE INDEX audit_unkeyed ON audit (appointment_id) WHERE appt IS NULL AND appointment_id IS NOT NULL;
        """,
    ),
    (
        5,
        """
        -- the outbox keyed by (connector, appointment key) in a table without rowids: every change
        -- enqueues one row per other system, and keyed on the random text id each of those landed
        -- on a random page of a separate primary-key index. Now the row is its own index entry
        -- and changes to appointments made around the same time land on neighbouring pages. An
        -- item whose appointment is no longer stored is not carried over: the worker would
        -- discard it unsent anyway (there is nothing to render)
        CREATE TABLE outbox_keyed (
            connector TEXT NOT NULL,
            appt INTEGER NOT NULL,
            appointment_id TEXT NOT NULL,
            target_version INTEGER NOT NULL,
            due_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            dead INTEGER NOT NULL DEFAULT 0,
            enqueued_at REAL NOT NULL,
            PRIMARY KEY (connector, appt)
        ) WITHOUT ROWID;
        INSERT INTO outbox_keyed (connector, appt, appointment_id, target_version, due_at, attempts, last_error, dead, enqueued_at)
            SELECT o.connector, a.key, o.appointment_id, o.target_version, o.due_at, o.attempts, o.last_error, o.dead, o.enqueued_at
            FROM outbox o JOIN appointments a ON a.id = o.appointment_id;
        DROP TABLE outbox;
        ALTER TABLE outbox_keyed RENAME TO outbox;
        CREATE INDEX outbox_due ON outbox (dead, due_at);
        """,
    ),
    (
        6,
        """
        -- links keyed by (appointment key, connector) in a table without rowids: a batch reads
        -- every link of the appointments it touches, and an appointment's links now sit side by
        -- side, next to those of appointments made around the same time, instead of one lookup
        -- each in a separate index on the random text id. A link whose appointment is missing
        -- fails NOT NULL here and the step rolls back whole, rather than being dropped
        CREATE TABLE links_keyed (
            appt INTEGER NOT NULL,
            connector TEXT NOT NULL,
            appointment_id TEXT NOT NULL,
            external_id TEXT,
            etag TEXT,
            base TEXT,
            applied_version INTEGER NOT NULL DEFAULT 0,
            applied_at TEXT,
            gone INTEGER NOT NULL DEFAULT 0,
            applied_ts REAL,
            PRIMARY KEY (appt, connector)
        ) WITHOUT ROWID;
        INSERT INTO links_keyed (appt, connector, appointment_id, external_id, etag, base, applied_version, applied_at, gone, applied_ts)
            SELECT a.key, l.connector, l.appointment_id, l.external_id, l.etag, l.base, l.applied_version, l.applied_at, l.gone, l.applied_ts
            FROM links l LEFT JOIN appointments a ON a.id = l.appointment_id;
        DROP TABLE links;
        ALTER TABLE links_keyed RENAME TO links;
        CREATE UNIQUE INDEX links_external ON links (connector, external_id) WHERE external_id IS NOT NULL;
        """,
    ),
    (
        7,
        """
        -- the kind index leaves out the routine "observed" entries, most of the log: every merged
        -- change wrote one into it, yet a search by kind is for the rarer kinds (the conflicts on
        -- the status page). Observed entries are found by appointment, or read from the end of
        -- the log, where they are most of what there is
        DROP INDEX audit_kind;
        CREATE INDEX audit_kind ON audit (kind) WHERE kind != 'observed';
        """,
    ),
    (
        8,
        """
        -- a write to a system that is unreachable waits for it however long it takes: only the
        -- failures that are not transient (conflicts that keep coming back, errors not understood)
        -- count towards outbox.max_attempts, in strikes (attempts still sets the backoff)
        ALTER TABLE outbox ADD COLUMN strikes INTEGER NOT NULL DEFAULT 0;
        -- a connector whose writes keep failing transiently: since when, how many in a row, and
        -- why. The status shows it and a worklist item warns once it lasts. The next write that
        -- lands deletes the row (no semicolons in these comments: the steps are split on them)
        CREATE TABLE outages (
            connector TEXT PRIMARY KEY,
            since REAL NOT NULL,
            failures INTEGER NOT NULL,
            last_error TEXT
        )
        """,
    ),
    (
        9,
        """
        -- a connector working, but not as it should (its batch endpoint refused, so each call goes
        -- on its own): shown in the status beside its health, cleared when a batch succeeds again
        ALTER TABLE cursors ADD COLUMN degraded TEXT
        """,
    ),
    (
        10,
        """
        -- published slots become a desired state per directory, clinician and local date, written
        -- like every other write (backoff, Retry-After, dead letters) and compared with what the
        -- directory shows whenever that may differ (verify). It replaces the digest of what was
        -- last sent, which never noticed a directory removing a booked slot by itself
        DROP TABLE published_slots;
        CREATE TABLE slot_states (
            connector TEXT NOT NULL,
            clinician TEXT NOT NULL,
            day TEXT NOT NULL,
            -- the desired slots (JSON) and their digest, with the account settings they are sent with
            slots TEXT NOT NULL,
            digest TEXT NOT NULL,
            -- the digest the directory last accepted or was seen to show (NULL: not known)
            written TEXT,
            written_at TEXT,
            -- 1: the directory's own state may differ from ours, read it before deciding
            verify INTEGER NOT NULL DEFAULT 1,
            -- bumped by every change of the row's wants, so a write answered later settles only what it sent
            seq INTEGER NOT NULL DEFAULT 0,
            -- when work is due (NULL: settled), and since when it has been waiting
            due_at REAL,
            since REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            strikes INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            dead INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (connector, clinician, day)
        );
        CREATE INDEX slot_states_due ON slot_states (due_at) WHERE due_at IS NOT NULL AND dead = 0
        """,
    ),
    (
        11,
        """
        -- bookings a channel holds unconfirmed (Zocdoc pending_booking), until it shows them
        -- confirmed: syncbridge confirms each once the record system holds the session (or a
        -- worklist item asks the practice to), and the status page lists them meanwhile
        CREATE TABLE pending_bookings (
            connector TEXT NOT NULL,
            appointment_id TEXT NOT NULL,
            external_id TEXT NOT NULL,
            since TEXT NOT NULL,
            last_error TEXT,
            PRIMARY KEY (connector, appointment_id)
        )
        """,
    ),
    (
        12,
        """
        -- bulk operations (cancel a clinician's sessions for a week, mark many no-show): confirmed
        -- once after a preview, applied session by session, resumed after an interruption, and
        -- followed to the end in every system through each session's links
        CREATE TABLE operations (
            id TEXT PRIMARY KEY,
            action TEXT NOT NULL,
            -- the selection, reason, note and who cancelled (JSON), as previewed and confirmed
            params TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE TABLE operation_items (
            operation TEXT NOT NULL,
            appointment_id TEXT NOT NULL,
            -- the version the preview showed, and the version this operation wrote (NULL: not yet)
            seen_version INTEGER NOT NULL,
            version INTEGER,
            -- pending, changed, or skipped (the session changed after the preview)
            state TEXT NOT NULL DEFAULT 'pending',
            PRIMARY KEY (operation, appointment_id)
        ) WITHOUT ROWID
        """,
    ),
    (
        13,
        """
        -- several workers on one PostgreSQL database share the work by leases with an expiry
        -- (docs/postgresql.md, Workers): a claimed outbox row names its worker until lease_until,
        -- and the worker's record of the write holds only while the row is still its own
        ALTER TABLE outbox ADD COLUMN leased_by TEXT;
        ALTER TABLE outbox ADD COLUMN lease_until REAL;
        CREATE INDEX outbox_leased ON outbox (leased_by) WHERE leased_by IS NOT NULL;
        -- one row per connector (what is pulled, one cursor per connector) and per job run once
        -- for the practice (availability, audit anchors), held by one worker at a time, and one
        -- row per live worker (its heartbeat, named worker:NAME), renewed with its leases
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            leased_by TEXT,
            lease_until REAL NOT NULL DEFAULT 0
        ) WITHOUT ROWID
        """,
    ),
]


#: where a step cannot be said in both engines, PostgreSQL's words for SQLite's (the store's SQL is
#: otherwise translated statement by statement, pg.py): step 4 numbered appointments by SQLite's
#: rowid, their order of creation. PostgreSQL has no such number (a row's ctid moves when it is
#: updated); the history table is only ever appended to, so the place of an appointment's first
#: version there is its order of creation
_POSTGRESQL_WORDS: dict[int, tuple[tuple[str, str], ...]] = {
    4: (
        ("SELECT rowid, id,", "SELECT row_number() OVER (ORDER BY (SELECT min(v.ctid) FROM appointment_versions v "
                              "WHERE v.appointment_id = appointments.id), ctid), id,"),
        ("FROM appointments ORDER BY rowid", "FROM appointments"),
        ("ORDER BY v.rowid", "ORDER BY v.ctid"),
    ),
}


def newest() -> int:
    """The schema this release writes."""
    return max(v for v, _ in MIGRATIONS)


def steps(engine: str = "sqlite") -> list[tuple[int, list[str]]]:
    """Each schema step as the statements ``engine`` runs (the same versions on both engines)."""
    out = []
    for version, sql in MIGRATIONS:
        if engine == "postgresql":
            for sqlite_says, postgresql_says in _POSTGRESQL_WORDS.get(version, ()):
                sql = sql.replace(sqlite_says, postgresql_says)
        out.append((version, [s for s in sql.split(";") if s.strip()]))
    return out


def _has_versions(conn: Any, engine: str) -> bool:
    if engine == "postgresql":
        return bool(conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0])
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone() is not None


def version_of(conn: Any, engine: str = "sqlite") -> int:
    """The schema a store is at (0: a new, empty file or database)."""
    if not _has_versions(conn, engine):
        return 0
    return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)


def migrate(conn: Any, engine: str = "sqlite") -> int:
    """Bring the schema to the newest version; returns it. Each step commits or rolls back whole
    (PostgreSQL's DDL is transactional too). ``conn``: a sqlite3 connection or a :class:`~syncbridge.pg.PgConnection`."""
    if not _has_versions(conn, engine):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    current = row[0] or 0
    for version, statements in steps(engine):
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # another process (the daemon and a CLI command starting at once) may have applied it
            # while we waited for the write lock
            if (conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0) >= version:
                conn.execute("COMMIT")
                current = version
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")))
            conn.execute("COMMIT")
        except conn.IntegrityError as err:
            # the data breaks a rule the new schema enforces: rolled back whole, nothing is lost
            conn.execute("ROLLBACK")
            raise StoreError(
                f"the upgrade of the store to schema {version} was refused and rolled back ({' '.join(str(err).split())}); the store is as it "
                f"was, at schema {current}, and the previous syncbridge release still runs on it"
            ) from err
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = version
    return current
