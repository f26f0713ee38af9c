"""One store transaction: reads through a per-transaction cache, writes buffered and flushed in bulk.

A batch of observations touches the same rows again and again (the appointment, its links, the
outbox); keeping them in memory for the length of the transaction and writing each table once
with ``executemany`` is what makes a batch cheap. Raw SQL inside a transaction must call
:meth:`Tx.flush` first so it sees the buffered writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .audit import AuditWriter
from .bulk import appointment_keys, columns, insert_flat, insert_rows, last_of_each
from .connector import Link
from .model import Appointment, Snapshot, new_tuple
from .store import LINK_COLS, Outage, dumps, loads, row_link

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Tx"]

#: a new appointment gets the next key in creation order (the transaction holds the write lock);
#: one already stored is rewritten through its key, so the id index is left alone
_PUT_APPOINTMENT = "INSERT INTO appointments (key, id, clinician, start, status, snapshot, version, updated_at, updated_via)"
_PUT_APPOINTMENT_CONFLICT = (
    "ON CONFLICT (key) DO UPDATE SET clinician = excluded.clinician, start = excluded.start, status = excluded.status, "
    "snapshot = excluded.snapshot, version = excluded.version, updated_at = excluded.updated_at, updated_via = excluded.updated_via"
)
_INSERT_LINK = "INSERT INTO links (appt, connector, appointment_id, external_id, etag, base, applied_version, applied_at, gone, applied_ts)"
_UPSERT_LINK = (
    "ON CONFLICT (appt, connector) DO UPDATE SET external_id = excluded.external_id, "
    "etag = excluded.etag, base = excluded.base, applied_version = excluded.applied_version, "
    "applied_at = COALESCE(excluded.applied_at, links.applied_at), gone = excluded.gone, "
    "applied_ts = COALESCE(excluded.applied_ts, links.applied_ts)"
)
#: a stored link keeping its external id: only what an observation changes is rewritten (written as
#: an upsert of the row as it now is, which takes many rows per statement; the row exists)
_REWRITE_LINK = "INSERT INTO links (appt, connector, appointment_id, external_id, etag, base, applied_version, gone)"
_REWRITE_LINK_CONFLICT = (
    "ON CONFLICT (appt, connector) DO UPDATE SET etag = excluded.etag, base = excluded.base, "
    "applied_version = excluded.applied_version, gone = excluded.gone"
)
_INSERT_OUTBOX = "INSERT INTO outbox (connector, appt, appointment_id, target_version, due_at, enqueued_at)"
#: the common case of _ENQUEUE, an item already pending and due: only the target moves, so the
#: (dead, due_at) index is left alone; rows it does not cover are left unchanged (and not counted)
_ENQUEUE_PENDING = (
    "ON CONFLICT (connector, appt) DO UPDATE SET "
    "target_version = MAX(outbox.target_version, excluded.target_version) "
    "WHERE outbox.dead = 0 AND outbox.due_at <= excluded.due_at"
)
#: the full rule: a pending item keeps its due time and its count of attempts, so a newer version
#: of a write waiting out a backoff or a Retry-After waits with it (the system asked us to slow
#: down, not to send something else sooner); a dead letter comes back to life, due now
_ENQUEUE = (
    "ON CONFLICT (connector, appt) DO UPDATE SET "
    "target_version = MAX(outbox.target_version, excluded.target_version), "
    "due_at = CASE WHEN outbox.dead = 1 THEN excluded.due_at ELSE outbox.due_at END, "
    "attempts = CASE WHEN outbox.dead = 1 THEN 0 ELSE outbox.attempts END, "
    "strikes = CASE WHEN outbox.dead = 1 THEN 0 ELSE outbox.strikes END, "
    "last_error = CASE WHEN outbox.dead = 1 THEN NULL ELSE outbox.last_error END, dead = 0"
)
#: a person asked for the write now (``syncbridge retry``): due at once, counts cleared
_ENQUEUE_NOW = (
    "ON CONFLICT (connector, appt) DO UPDATE SET "
    "target_version = MAX(outbox.target_version, excluded.target_version), due_at = excluded.due_at, "
    "attempts = 0, strikes = 0, dead = 0, last_error = NULL"
)

#: writes of a connector waiting out the backoff of an unreachable system or a refused account
#: (``Outbox._retry`` writes the error's kind first: "transient", "auth"; "throttled" ones keep
#: their Retry-After), with the account (clinician) each belongs to; (connector, now) to fill in
_WAITING = (
    "SELECT o.appt AS appt, a.clinician AS clinician, o.due_at AS due_at FROM outbox o JOIN appointments a ON a.key = o.appt "
    "WHERE o.connector = ? AND o.dead = 0 AND o.due_at > ? AND (o.last_error LIKE 'transient:%' OR o.last_error LIKE 'auth:%')"
)

#: desired slots of a date (see Tx.plan_slots): changed slots or a look asked for make it due; a
#: row waiting out a backoff keeps its due time and a dead one is revived
_PLAN_SLOTS = (
    "INSERT INTO slot_states (connector, clinician, day, slots, digest, verify, seq, due_at, since) VALUES (?,?,?,?,?,?,1,?,?) "
    "ON CONFLICT (connector, clinician, day) DO UPDATE SET slots = excluded.slots, digest = excluded.digest, "
    "verify = MAX(slot_states.verify, excluded.verify), seq = slot_states.seq + 1, "
    "due_at = CASE WHEN slot_states.dead = 1 OR slot_states.due_at IS NULL THEN excluded.due_at ELSE slot_states.due_at END, "
    "since = COALESCE(slot_states.since, excluded.since), attempts = CASE WHEN slot_states.dead = 1 THEN 0 ELSE slot_states.attempts END, "
    "strikes = CASE WHEN slot_states.dead = 1 THEN 0 ELSE slot_states.strikes END, dead = 0 "
    "WHERE slot_states.digest != excluded.digest OR excluded.verify > slot_states.verify OR (slot_states.dead = 1 AND excluded.verify = 1)"
)
_VERIFY_SLOTS = (
    "UPDATE slot_states SET verify = 1, seq = seq + 1, dead = 0, due_at = CASE WHEN dead = 1 OR due_at IS NULL THEN ? ELSE due_at END, "
    "since = COALESCE(since, ?) WHERE connector = ? AND clinician = ? AND day = ? AND (verify = 0 OR dead = 1)"
)


class Tx:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn
        #: PostgreSQL's upsert may not touch one row twice in a statement (SQLite applies each in turn)
        self._once_per_statement = store.engine != "sqlite"
        self._appts: dict[str, Appointment | None] = {}
        self._keys: dict[str, int] = {}  # appointment -> its integer key (creation order)
        self._next_key: int | None = None
        self.audit = AuditWriter(store.conn, self._keys)
        # appointment -> connector -> the link as stored: (connector, appointment, external id, etag,
        # base as JSON text, applied version, gone, the appointment's key while the row is stored
        # as read, else None), decoded into a Link on first use: links a batch never reads are
        # never decoded.
        self._links: dict[str, dict[str, tuple[Any, ...]]] = {}
        self._decoded: dict[tuple[str, str], Link] = {}
        self._ext: dict[tuple[str, str], str] = {}  # (connector, external id) -> appointment
        self._appt_rows: dict[str, tuple[Any, ...]] = {}
        self._versions: list[Any] = []  # history rows, end to end
        self._link_rows: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._link_updates: list[Any] = []  # link rewrites, end to end
        self._ext_moves: list[tuple[str, str, str]] = []
        self._outbox: dict[tuple[str, str], tuple[int, float]] = {}
        self._series: dict[str, tuple[str, str, str, str]] = {}

    # --- cached reads ----------------------------------------------------------------------

    def prefetch(self, connector: str, external_ids: Iterable[str], canonical_ids: Iterable[str]) -> None:
        """Load, in a few queries, everything a batch from ``connector`` will read.

        Copies already linked are found by external id first: that index has short keys and
        yields the appointments' integer keys, by which appointments and links are read in key
        order. Only canonical ids still unknown after that (copies not linked yet) are looked up
        by id.
        """
        ext = [e for e in external_ids if (connector, e) not in self._ext]
        keys: set[int] = set()
        for i in range(0, len(ext), 500):
            chunk = ext[i : i + 500]
            rows = self.conn.execute(
                f"SELECT appt FROM links WHERE connector = ? AND external_id IN ({','.join('?' * len(chunk))})", (connector, *chunk)
            ).fetchall()
            keys.update(r[0] for r in rows)
        if self._keys:  # appointments this transaction already knows are not read again
            keys.difference_update(self._keys.values())
        self._read("key", sorted(keys))
        self._load(sorted({c for c in canonical_ids if c not in self._links}))

    def knows_external(self, connector: str, external_id: str) -> bool:
        """Whether a link of ``connector`` with this external id was loaded in this transaction."""
        return (connector, external_id) in self._ext

    def _load(self, appt_ids: list[str]) -> None:
        """Appointments by canonical id with their links; an id not stored is remembered as such."""
        for appt_id in appt_ids:
            self._appts.setdefault(appt_id, None)
            self._links.setdefault(appt_id, {})
        self._read("id", appt_ids)

    def _read(self, column: str, values: list[Any]) -> None:
        """Appointments whose ``column`` (id or key) is among ``values``, with all their links."""
        for i in range(0, len(values), 500):
            chunk = values[i : i + 500]
            keys = []
            for r in self.conn.execute(
                f"SELECT id, snapshot, version, updated_at, updated_via, key FROM appointments WHERE {column} IN ({','.join('?' * len(chunk))})",
                chunk,
            ):
                self._appts[r[0]] = new_tuple(Appointment, (r[0], loads(r[1]), r[2], r[3], r[4]))
                self._keys[r[0]] = r[5]
                self._links.setdefault(r[0], {})
                keys.append(r[5])
            if not keys:
                continue
            for r in self.conn.execute(f"SELECT {LINK_COLS}, appt FROM links WHERE appt IN ({','.join('?' * len(keys))})", keys):
                self._links[r[1]][r[0]] = r
                if r[2]:
                    self._ext[(r[0], r[2])] = r[1]

    def appointment(self, appointment_id: str) -> Appointment | None:
        if appointment_id not in self._appts:
            self._load([appointment_id])
        return self._appts[appointment_id]

    def _link_of(self, connector: str, row: tuple[Any, ...]) -> Link:
        key = (connector, row[1])
        link = self._decoded.get(key)
        if link is None:
            link = self._decoded[key] = row_link(row)
        return link

    def links_of(self, appointment_id: str) -> dict[str, Link]:
        return {c: self._link_of(c, r) for c, r in self.stored_links(appointment_id).items()}

    def stored_links(self, appointment_id: str) -> dict[str, tuple[Any, ...]]:
        """connector -> the link as stored, base still JSON text (index 4) and gone at index 6."""
        if appointment_id not in self._links:
            self._load([appointment_id])
        return self._links[appointment_id]

    def link(self, connector: str, appointment_id: str) -> Link | None:
        row = self.stored_links(appointment_id).get(connector)
        return self._link_of(connector, row) if row is not None else None

    def link_by_external(self, connector: str, external_id: str) -> Link | None:
        appt_id = self._ext.get((connector, external_id))
        if appt_id is None:
            r = self.conn.execute("SELECT appointment_id FROM links WHERE connector = ? AND external_id = ?", (connector, external_id)).fetchone()
            if r is None:
                return None
            appt_id = r[0]
            if appt_id not in self._links:  # what this transaction holds is newer than the file
                self._load([appt_id])
        row = self.stored_links(appt_id).get(connector)
        return self._link_of(connector, row) if row is not None and row[2] == external_id else None

    def set_cursor(
        self, connector: str, cursor: str | None, at: str, *, full: bool = False, only_from: tuple[str | None] | None = None,
        keep_health: bool = False,
    ) -> bool:
        """Advance the cursor after a good pull; with ``only_from``, only while the store still holds
        ``only_from[0]``, the cursor the pull started from, so a reset made meanwhile (``syncbridge
        resync`` beside the daemon) wins over a pull that was in flight. True if it was written.
        ``keep_health``: the pull read some accounts only, so another's failure stays shown."""
        health = "" if keep_health else "healthy = 1, note = NULL, "
        sql = (
            "INSERT INTO cursors (connector, cursor, updated_at, last_good_pull, last_full_sweep, healthy) VALUES (?,?,?,?,?,1) "
            "ON CONFLICT (connector) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at, "
            f"last_good_pull = excluded.last_good_pull, {health}"
            "last_full_sweep = COALESCE(excluded.last_full_sweep, cursors.last_full_sweep)"
        )
        args: tuple[Any, ...] = (connector, cursor, at, at, at if full else None)
        if only_from is not None:
            sql, args = sql + " WHERE cursors.cursor IS ?", (*args, only_from[0])
        return int(self.conn.execute(sql, args).rowcount) > 0

    def forget_cursor(self, connector: str) -> None:
        self.conn.execute("UPDATE cursors SET cursor = NULL WHERE connector = ?", (connector,))

    def set_health(self, connector: str, healthy: bool, note: str | None) -> None:
        self.conn.execute(
            "INSERT INTO cursors (connector, healthy, note) VALUES (?,?,?) "
            "ON CONFLICT (connector) DO UPDATE SET healthy = excluded.healthy, note = excluded.note",
            (connector, int(healthy), note),
        )

    def set_degraded(self, connector: str, note: str | None) -> bool:
        """Mark the connector degraded (None: no longer); True if that changed anything."""
        cur = self.conn.execute(
            "INSERT INTO cursors (connector, degraded) VALUES (?,?) "
            "ON CONFLICT (connector) DO UPDATE SET degraded = excluded.degraded WHERE cursors.degraded IS NOT excluded.degraded",
            (connector, note),
        )
        return cur.rowcount > 0

    def _held(self) -> tuple[str, tuple[str, ...]]:
        """The condition a worker's record of a write adds when several workers share the store: the
        row is still leased to it (a worker whose lease was taken over records nothing; the new
        holder decides again from the copy as it is). None with one worker (SQLite, the CLI)."""
        worker = self.store.worker
        return (" AND leased_by = ?", (worker,)) if worker is not None else ("", ())

    def outbox_done(self, connector: str, appointment_id: str, version: int) -> None:
        """Remove the item unless a newer version was enqueued meanwhile."""
        self.flush()
        key = self._key_of(appointment_id)
        held, holder = self._held()
        done = f"DELETE FROM outbox WHERE connector = ? AND appt = ? AND target_version <= ?{held}"
        if self.conn.execute(done, (connector, key, version, *holder)).rowcount:
            return
        if held:  # a newer version stays queued: free for the next claim at once
            free = f"UPDATE outbox SET leased_by = NULL, lease_until = NULL WHERE connector = ? AND appt = ?{held}"
            self.conn.execute(free, (connector, key, *holder))
        # a newer version stays queued: this write landed, so the failures before it no longer count
        self.conn.execute(
            "UPDATE outbox SET attempts = 0, strikes = 0, last_error = NULL WHERE connector = ? AND appt = ? AND attempts > 0", (connector, key)
        )

    def outbox_retry(self, connector: str, appointment_id: str, due_at: float, error: str, *, strike: bool = False) -> None:
        """Try again at ``due_at``; a ``strike`` (a failure that is not transient) counts towards dead-lettering."""
        self.flush()
        held, holder = self._held()
        lease = ", leased_by = NULL, lease_until = NULL" if held else ""
        self.conn.execute(
            f"UPDATE outbox SET attempts = attempts + 1, strikes = strikes + ?, due_at = ?, last_error = ?{lease} "
            f"WHERE connector = ? AND appt = ?{held}",
            (int(strike), due_at, error, connector, self._key_of(appointment_id), *holder),
        )

    def outbox_now(self, connector: str, appointment_id: str, version: int, now: float) -> None:
        """Queue a write due at once, whatever backoff or dead letter it was in (a person asked for it)."""
        self.flush()
        key = self._key_of(appointment_id)
        if key is not None:
            insert_rows(self.conn, _INSERT_OUTBOX, [(connector, key, appointment_id, version, now, now)], _ENQUEUE_NOW)

    def outbox_release(self, connector: str, clinicians: Iterable[str], now: float) -> int:
        """These accounts (clinicians) of ``connector`` answer again: their writes waiting out the
        backoff of an outage or a refusal are due at once rather than up to ``outbox.backoff_max``
        later; another account's writes, and a write a Retry-After holds, keep their time. Returns
        how many were made due."""
        accounts = sorted(set(clinicians))
        if not accounts:
            return 0
        self.flush()
        sql = (f"UPDATE outbox SET due_at = ? WHERE connector = ? AND appt IN (SELECT appt FROM ({_WAITING}) AS waiting "
               f"WHERE clinician IN ({','.join('?' * len(accounts))}))")
        return int(self.conn.execute(sql, (now, connector, connector, now, *accounts)).rowcount)

    def outbox_probe(self, connector: str, now: float, skip: Iterable[str] = ()) -> int:
        """A pull of ``connector`` went well: of each account's writes waiting out the backoff of an
        outage or a refusal (but those of ``skip``, accounts the pull could not read), the earliest is
        due at once, as a probe; once it lands the account's others follow (:meth:`outbox_release`)."""
        skipped = sorted(set(skip))
        self.flush()
        sql = (f"UPDATE outbox SET due_at = ? WHERE connector = ? AND appt IN (SELECT appt FROM (SELECT appt, clinician, "
               f"ROW_NUMBER() OVER (PARTITION BY clinician ORDER BY due_at) AS n FROM ({_WAITING}) AS waiting) AS turns "
               f"WHERE n = 1 AND clinician NOT IN ({','.join('?' * len(skipped))}))")
        return int(self.conn.execute(sql, (now, connector, connector, now, *skipped)).rowcount)

    def outbox_waiting(self, connector: str) -> int:
        """Writes queued for ``connector`` and not dead-lettered."""
        self.flush()
        return int(self.conn.execute("SELECT COUNT(*) FROM outbox WHERE connector = ? AND dead = 0", (connector,)).fetchone()[0])

    def outage_failed(self, connector: str, at: float, error: str) -> Outage:
        """One more transient write failure in a row for ``connector``; the outage as it now stands."""
        row = self.conn.execute(
            "INSERT INTO outages (connector, since, failures, last_error) VALUES (?,?,1,?) ON CONFLICT (connector) DO UPDATE "
            "SET failures = outages.failures + 1, last_error = excluded.last_error RETURNING connector, since, failures, last_error",
            (connector, at, error),
        ).fetchall()[0]  # read to the end: the statement is finished before the commit
        return Outage(*row)

    def outage_over(self, connector: str) -> Outage | None:
        """A write to ``connector`` landed: the outage it was in, if any, is over."""
        rows = self.conn.execute("DELETE FROM outages WHERE connector = ? RETURNING connector, since, failures, last_error", (connector,)).fetchall()
        return Outage(*rows[0]) if rows else None

    def outbox_dead(self, connector: str, appointment_id: str, error: str) -> None:
        self.flush()
        held, holder = self._held()
        lease = ", leased_by = NULL, lease_until = NULL" if held else ""
        self.conn.execute(
            f"UPDATE outbox SET dead = 1, attempts = attempts + 1, last_error = ?{lease} WHERE connector = ? AND appt = ?{held}",
            (error, connector, self._key_of(appointment_id), *holder),
        )

    def open_work(self, key: str, kind: str, instruction: str, at: str, connector: str | None = None, appointment_id: str | None = None) -> bool:
        """Open a worklist item, or bring an open one's instruction up to date; True if anything changed."""
        cur = self.conn.execute(
            "INSERT INTO worklist (key, connector, appointment_id, kind, instruction, opened_at) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT (key) WHERE closed_at IS NULL DO UPDATE SET instruction = excluded.instruction "
            "WHERE worklist.instruction != excluded.instruction",
            (key, connector, appointment_id, kind, instruction, at),
        )
        return cur.rowcount > 0

    def open_work_keys(self, prefix: str) -> list[str]:
        """Keys of the open worklist items whose key starts with ``prefix``."""
        rows = self.conn.execute("SELECT key FROM worklist WHERE closed_at IS NULL AND substr(key, 1, ?) = ?", (len(prefix), prefix))
        return [r[0] for r in rows]

    def close_work(self, key: str, at: str, by: str) -> bool:
        cur = self.conn.execute("UPDATE worklist SET closed_at = ?, closed_by = ? WHERE key = ? AND closed_at IS NULL", (at, by, key))
        return cur.rowcount > 0

    def linked_statuses(self, connector: str) -> list[tuple[str, str]]:
        """(external id, status) of every live copy in ``connector``: what a mass cancellation is measured against."""
        self.flush()
        return self.conn.execute(
            "SELECT l.external_id, a.status FROM links l JOIN appointments a ON a.key = l.appt "
            "WHERE l.connector = ? AND l.gone = 0 AND l.external_id IS NOT NULL",
            (connector,),
        ).fetchall()

    def unlinked_at(self, connector: str, clinician: str, start: str) -> list[tuple[str, str | None]]:
        """(id, client key) of the clinician's sessions starting at ``start`` with no copy in
        ``connector`` yet: a record system's new record may be one of them."""
        self.flush()
        return self.conn.execute(
            "SELECT a.id, json_extract(a.snapshot, '$.client_key') FROM appointments a WHERE a.clinician = ? "
            "AND a.start = ? AND NOT EXISTS (SELECT 1 FROM links l WHERE l.appt = a.key AND l.connector = ?)",
            (clinician, start, connector),
        ).fetchall()

    def take_approved_hold(self, connector: str) -> bool:
        """True, once, when a person approved the held pull of ``connector``: it may be merged now."""
        row = self.conn.execute("SELECT approved FROM held_batches WHERE connector = ?", (connector,)).fetchone()
        if not (row and row[0]):
            return False
        self.conn.execute("DELETE FROM held_batches WHERE connector = ?", (connector,))
        return True

    def first_via(self, appointment_id: str) -> str | None:
        """The system an appointment was first recorded from."""
        self.flush()
        row = self.conn.execute(
            "SELECT via FROM appointment_history WHERE appt = (SELECT key FROM appointments WHERE id = ?) ORDER BY version LIMIT 1",
            (appointment_id,),
        ).fetchone()
        return str(row[0]) if row else None

    def approve_held(self, connector: str) -> None:
        """A person confirmed the held pull of ``connector``: the next pull merges it."""
        self.conn.execute("UPDATE held_batches SET approved = 1 WHERE connector = ?", (connector,))

    def add_operation(self, operation_id: str, action: str, params: dict[str, Any], at: str, by: str, items: Iterable[tuple[str, int]]) -> None:
        """Record a confirmed bulk operation and the sessions (id, version seen in the preview) it changes."""
        self.conn.execute(
            "INSERT INTO operations (id, action, params, created_at, created_by) VALUES (?,?,?,?,?)",
            (operation_id, action, dumps(params), at, by),
        )
        insert_rows(self.conn, "INSERT INTO operation_items (operation, appointment_id, seen_version)",
                    [(operation_id, appt, version) for appt, version in items])

    def operation_item_done(self, operation_id: str, appointment_id: str, state: str, version: int | None) -> None:
        self.conn.execute(
            "UPDATE operation_items SET state = ?, version = ? WHERE operation = ? AND appointment_id = ?",
            (state, version, operation_id, appointment_id),
        )

    def finish_operation(self, operation_id: str, at: str) -> None:
        self.conn.execute("UPDATE operations SET finished_at = ? WHERE id = ? AND finished_at IS NULL", (at, operation_id))

    def hold(self, connector: str, at: str, would_cancel: int, linked: int) -> None:
        self.conn.execute(
            "INSERT INTO held_batches VALUES (?,?,?,?,0) ON CONFLICT (connector) DO UPDATE SET held_at = excluded.held_at, "
            "would_cancel = excluded.would_cancel, linked = excluded.linked",
            (connector, at, would_cancel, linked),
        )

    def replace_busy(self, connector: str, clinician: str, intervals: Iterable[tuple[str, str]]) -> None:
        self.conn.execute("DELETE FROM busy WHERE connector = ? AND clinician = ?", (connector, clinician))
        self.conn.executemany("INSERT INTO busy VALUES (?,?,?,?)", [(connector, clinician, s, e) for s, e in intervals])

    def put_secret(self, connector: str, key: str, value: bytes, at: str) -> None:
        """Keep a secret a connector obtained at run time (already encrypted: host.Vault)."""
        self.conn.execute(
            "INSERT INTO secrets (connector, key, value, updated_at) VALUES (?,?,?,?) "
            "ON CONFLICT (connector, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (connector, key, value, at),
        )

    def delete_secret(self, connector: str, key: str) -> None:
        self.conn.execute("DELETE FROM secrets WHERE connector = ? AND key = ?", (connector, key))

    def inbox_put(self, connector: str, at: str, headers: dict[str, str], body: bytes) -> int:
        row = self.conn.execute(
            "INSERT INTO webhook_inbox (connector, received_at, headers, body) VALUES (?,?,?,?) RETURNING id", (connector, at, dumps(headers), body)
        ).fetchall()[0]  # read to the end: the statement is finished before the commit
        return int(row[0])

    def inbox_done(self, ids: Iterable[int], at: str) -> None:
        self.conn.executemany("UPDATE webhook_inbox SET processed_at = ? WHERE id = ?", [(at, i) for i in ids])

    def inbox_prune(self, before: str) -> int:
        """Delete notifications processed before ``before``; unprocessed ones always stay."""
        return self.conn.execute("DELETE FROM webhook_inbox WHERE processed_at IS NOT NULL AND processed_at < ?", (before,)).rowcount

    def set_pending(self, connector: str, appointment_id: str, external_id: str, pending: bool, at: str) -> None:
        """Whether the channel holds this booking unconfirmed; ``since`` is kept from the first sight."""
        if pending:
            self.conn.execute(
                "INSERT INTO pending_bookings (connector, appointment_id, external_id, since) VALUES (?,?,?,?) "
                "ON CONFLICT (connector, appointment_id) DO UPDATE SET external_id = excluded.external_id",
                (connector, appointment_id, external_id, at),
            )
        else:
            self.conn.execute("DELETE FROM pending_bookings WHERE connector = ? AND appointment_id = ?", (connector, appointment_id))

    def pending_failed(self, connector: str, appointment_id: str, error: str | None) -> None:
        self.conn.execute("UPDATE pending_bookings SET last_error = ? WHERE connector = ? AND appointment_id = ?", (error, connector, appointment_id))

    # --- published slots (slot_states) --------------------------------------------------------

    def plan_slots(self, rows: Iterable[tuple[str, str, str, str, str, int]], now: float) -> int:
        """Desired slots per (connector, clinician, day, slots, digest, verify); returns the dates that
        became due. A date is due when its slots changed or its directory must be looked at; one
        waiting out a backoff keeps its due time, a dead one comes back, due now."""
        return int(self.conn.executemany(_PLAN_SLOTS, [(*r, now, now) for r in rows]).rowcount)

    def slot_verify(self, keys: Iterable[tuple[str, str, str]], now: float) -> None:
        """The directory's own state of these dates may differ from ours (a booking there, a restart):
        look before deciding. Dates not planned yet are looked at when they are."""
        self.conn.executemany(_VERIFY_SLOTS, [(now, now, *k) for k in keys])

    def slot_settled(self, connector: str, clinician: str, day: str, seq: int, digest: str, at: str) -> None:
        """The directory shows ``digest`` (written or seen); done unless the wants changed meanwhile."""
        self.conn.execute(
            "UPDATE slot_states SET written = ?, written_at = ?, attempts = 0, strikes = 0, last_error = NULL, "
            "verify = CASE WHEN seq = ? THEN 0 ELSE verify END, due_at = CASE WHEN seq = ? THEN NULL ELSE due_at END, "
            "since = CASE WHEN seq = ? THEN NULL ELSE since END WHERE connector = ? AND clinician = ? AND day = ?",
            (digest, at, seq, seq, seq, connector, clinician, day),
        )

    def slot_retry(self, connector: str, clinician: str, day: str, due_at: float, error: str, *, strike: bool = False) -> int:
        """Try again at ``due_at``, looking first (a write that failed may have landed); the strikes so far."""
        row = self.conn.execute(
            "UPDATE slot_states SET attempts = attempts + 1, strikes = strikes + ?, verify = 1, due_at = ?, last_error = ? "
            "WHERE connector = ? AND clinician = ? AND day = ? RETURNING strikes",
            (int(strike), due_at, error, connector, clinician, day),
        ).fetchall()
        return int(row[0][0]) if row else 0

    def slot_probe_now(self, connector: str, now: float) -> None:
        """The connector's earliest waiting date is due now (a probe after its backoff was lifted)."""
        self.conn.execute(
            "UPDATE slot_states SET due_at = ? WHERE (connector, clinician, day) IN (SELECT connector, clinician, day FROM slot_states "
            "WHERE connector = ? AND due_at IS NOT NULL AND dead = 0 ORDER BY written IS NOT NULL AND written = digest, due_at LIMIT 1) "
            "AND due_at > ?",
            (now, connector, now),
        )

    def slot_all_due(self, connector: str, now: float) -> None:
        """The connector answers again: every date waiting out a transient backoff is due now (those
        retried for errors not understood keep their time)."""
        self.conn.execute(
            "UPDATE slot_states SET due_at = ? WHERE connector = ? AND due_at > ? AND dead = 0 AND strikes = 0", (now, connector, now)
        )

    def slot_dead(self, connector: str, clinician: str, day: str, error: str) -> None:
        self.conn.execute(
            "UPDATE slot_states SET dead = 1, attempts = attempts + 1, last_error = ? WHERE connector = ? AND clinician = ? AND day = ?",
            (error, connector, clinician, day),
        )

    def slot_forget(self, connector: str, clinician: str | None = None, *, before: str | None = None, keep: Iterable[str] = ()) -> None:
        """Drop dates no longer planned: past days, days beyond the horizon (all but ``keep``), a clinician gone."""
        if clinician is None:
            self.conn.execute("DELETE FROM slot_states WHERE connector = ?", (connector,))
            return
        kept = list(keep)
        self.conn.execute(
            f"DELETE FROM slot_states WHERE connector = ? AND clinician = ? AND (day < ? OR day NOT IN ({','.join('?' * len(kept))}))",
            (connector, clinician, before or "", *kept),
        )

    # --- buffered writes ---------------------------------------------------------------------

    def put_appointment(self, appointment_id: str, snap: Snapshot, version: int, at: str, via: str) -> None:
        text = dumps(snap)
        if appointment_id not in self._appts:
            self._load([appointment_id])
        key = self._keys.get(appointment_id)
        if key is None:
            key = self._keys[appointment_id] = self._new_key()
        self._appt_rows[appointment_id] = (key, appointment_id, snap["clinician"], snap["start"], snap["status"], text, version, at, via)
        self._versions += (key, version, text, at, via)
        if snap.get("series_id"):
            self._series[snap["series_id"]] = (snap["series_id"], snap["clinician"], snap["timezone"], at)
        self._appts[appointment_id] = new_tuple(Appointment, (appointment_id, snap, version, at, via))
        self._links.setdefault(appointment_id, {})

    def put_link(self, link: Link, applied_at: str | None = None, base_text: str | None = None) -> None:
        """Buffer the link; ``base_text`` is ``link.base`` already encoded, when the caller has it."""
        links = self.stored_links(link.appointment_id)
        connector, appt_id, ext = link.connector, link.appointment_id, link.external_id
        old = links.get(connector)
        if old is not None and old[2] and old[2] != ext:
            self._ext.pop((connector, old[2]), None)
        if ext:
            self._ext[(connector, ext)] = appt_id
        if base_text is None and link.base is not None:
            base_text = dumps(link.base)
        gone = int(link.gone)
        stored = old[7] if old is not None else None
        key = (connector, appt_id)
        if stored is not None and applied_at is None and old is not None and old[2] == ext and key not in self._link_rows:
            # the row exists and keeps its external id: rewrite only what an observation changes
            self._link_updates += (stored, connector, appt_id, ext, link.etag, base_text, link.applied_version, gone)
        else:
            if ext and (old is None or old[2] != ext):
                # an external id may move between appointments within a batch: cleared first
                self._ext_moves.append((connector, ext, appt_id))
            self._link_rows[key] = (
                connector, appt_id, ext, link.etag, base_text, link.applied_version, applied_at, gone,
                time.time() if applied_at else None,
            )
            stored = None
        links[connector] = (connector, appt_id, ext, link.etag, base_text, link.applied_version, gone, stored)
        self._decoded[key] = link

    def _key_of(self, appointment_id: str) -> int | None:
        """The appointment's integer key (what the outbox is keyed on); None if it is not stored."""
        key = self._keys.get(appointment_id)
        if key is None:
            row = self.conn.execute("SELECT key FROM appointments WHERE id = ?", (appointment_id,)).fetchone()
            if row is not None:
                key = self._keys[appointment_id] = row[0]
        return key

    def _keys_for(self, appointment_ids: Iterable[str]) -> dict[str, int]:
        """The transaction's id -> key map, with the stored ones among ``appointment_ids`` looked up in bulk."""
        keys = self._keys
        keys.update(appointment_keys(self.conn, [a for a in appointment_ids if a not in keys]))
        return keys

    def _new_key(self) -> int:
        if self._next_key is None:
            self._next_key = self.conn.execute("SELECT COALESCE(MAX(key), 0) FROM appointments").fetchone()[0]
        self._next_key += 1
        return self._next_key

    def enqueue(self, connector: str, appointment_id: str, version: int, now: float) -> None:
        """State-based: one row per (connector, appointment); a newer version replaces the target."""
        key = (connector, appointment_id)
        old = self._outbox.get(key)
        self._outbox[key] = (max(version, old[0]), min(now, old[1])) if old else (version, now)

    def flush(self) -> None:
        if self._appt_rows:
            insert_rows(self.conn, _PUT_APPOINTMENT, list(self._appt_rows.values()), _PUT_APPOINTMENT_CONFLICT)
        if self._versions:
            insert_flat(self.conn, "INSERT INTO appointment_history (appt, version, snapshot, at, via)", self._versions)
        if self._series:
            insert_rows(self.conn, "INSERT INTO series (id, clinician, timezone, created_at)", list(self._series.values()), "ON CONFLICT (id) DO NOTHING")
        if self._link_updates:
            updates = self._link_updates
            if self._once_per_statement:  # a link rewritten twice in this transaction: its last state
                updates = last_of_each(updates, columns(_REWRITE_LINK), 2)
            insert_flat(self.conn, _REWRITE_LINK, updates, _REWRITE_LINK_CONFLICT)
        if self._ext_moves:
            self.conn.executemany(
                "UPDATE links SET external_id = NULL WHERE connector = ? AND external_id = ? AND appointment_id != ?", self._ext_moves
            )
        if self._link_rows:
            keys = self._keys_for(a for (_, a) in self._link_rows)
            # a link to an appointment that is not stored fails NOT NULL: a caller's mistake, not data
            rows = [(keys.get(row[1]), *row) for row in self._link_rows.values()]
            insert_rows(self.conn, _INSERT_LINK, rows, _UPSERT_LINK)
        if self._outbox:
            keys = self._keys_for(a for (_, a) in self._outbox)
            # an item for an appointment that is not stored has nothing to converge to: not kept
            values: list[Any] = []
            for (c, a), (v, due) in self._outbox.items():
                if a in keys:
                    values += (c, keys[a], a, v, due, due)
            if insert_flat(self.conn, _INSERT_OUTBOX, values, _ENQUEUE_PENDING) != len(values) // columns(_INSERT_OUTBOX):
                # some item was dead or retrying: the full rule again (it is idempotent) fixes those
                insert_flat(self.conn, _INSERT_OUTBOX, values, _ENQUEUE)
        self._appt_rows, self._versions, self._link_rows, self._outbox, self._series = {}, [], {}, {}, {}
        self._link_updates, self._ext_moves = [], []
        self.audit.flush()
