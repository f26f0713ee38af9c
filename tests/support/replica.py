"""A file-backed test system with the semantics the engine relies on: etags, preconditions,
sync tokens that can expire, idempotent creates, throttling and lost responses.

It lives in a SQLite file outside the engine's store, so a test process can edit it "as a user"
while a daemon process (killed and restarted at will) syncs with it. Loaded by the engine as
``type: tests.support.replica:ReplicaConnector``. A test double for engine tests; the product
connectors are tested against their own emulators and real servers.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from syncbridge.connector import (
    MIRROR_STATUS_MAP,
    ApplyResult,
    Capabilities,
    Connector,
    Link,
    Observation,
    PullResult,
)
from syncbridge.errors import ConflictError, CursorExpired, MalformedRecord, RateLimited, TransientError
from syncbridge.limits import check_record_size
from syncbridge.model import Role, Snapshot, iso
from syncbridge.policy.cancellation import find_tags

MIRROR_FIELDS = frozenset({"clinician", "start", "end", "timezone", "status", "modality", "location"})
RECORD_FIELDS = MIRROR_FIELDS | {"client_key", "service_code", "series_id"}
COLUMNS = ("clinician", "client_key", "start", "end", "timezone", "status", "modality", "location", "service_code", "series_id")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
  ext_id TEXT PRIMARY KEY, canonical_id TEXT, clinician TEXT, client_key TEXT, start TEXT, "end" TEXT,
  timezone TEXT, status TEXT, modality TEXT, location TEXT, service_code TEXT, series_id TEXT,
  title TEXT, etag TEXT, modified_at TEXT, deleted INTEGER DEFAULT 0, creates INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, ext_id TEXT);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT);
"""


def open_db(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


def _meta(conn: sqlite3.Connection, key: str, default: str) -> str:
    r = conn.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
    return r[0] if r else default


def touch(conn: sqlite3.Connection, ext_id: str, **values: Any) -> str:
    """Change an item as its system would: new etag, new modification time, a change record."""
    etag = uuid.uuid4().hex[:12]
    values |= {"etag": etag, "modified_at": iso(datetime.now(UTC))}
    sets = ", ".join(f'"{k}" = ?' for k in values)
    conn.execute(f"UPDATE items SET {sets} WHERE ext_id = ?", (*values.values(), ext_id))
    conn.execute("INSERT INTO changes (ext_id) VALUES (?)", (ext_id,))
    return etag


class ReplicaConnector(Connector):
    class Options(BaseModel):
        path: str
        latency: float = 0.0
        fail_rate: float = 0.0
        page_size: int = 200
        seed: int | None = None

    capabilities = Capabilities(role=Role.MIRROR, fields=MIRROR_FIELDS, status_map=MIRROR_STATUS_MAP)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        role = self.capabilities.role  # the common `role:` key, applied by the base class
        if role == Role.MIRROR:
            self.capabilities = Capabilities(role=role, fields=MIRROR_FIELDS, status_map=MIRROR_STATUS_MAP)
        else:
            self.capabilities = Capabilities(role=role, fields=RECORD_FIELDS, accepts_new=role == Role.RECORD)
        self.rng = random.Random(self.options.seed)
        with closing(open_db(self.options.path)):
            pass

    async def _call(self, op: str) -> None:
        with closing(open_db(self.options.path)) as conn:
            conn.execute("INSERT INTO requests (op) VALUES (?)", (op,))
            throttle = int(_meta(conn, "throttle", "0"))
            if throttle > 0:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('throttle', ?)", (str(throttle - 1),))
                raise RateLimited("429 Too Many Requests", retry_after=float(_meta(conn, "throttle_after", "0.1")))
        if self.options.latency:
            await asyncio.sleep(self.options.latency)
        if self.options.fail_rate and self.rng.random() < self.options.fail_rate / 2:
            raise TransientError("503 injected")

    def _lost_response(self) -> bool:
        return bool(self.options.fail_rate) and self.rng.random() < self.options.fail_rate / 2

    def _observation(self, row: sqlite3.Row) -> Observation:
        try:
            check_record_size(sum(len(str(row[k] or "")) for k in row.keys()), f"record {row['ext_id']}")
        except MalformedRecord as err:
            return Observation(external_id=row["ext_id"], problem=str(err))
        if row["deleted"]:
            return Observation(external_id=row["ext_id"], deleted=True, canonical_id=row["canonical_id"])
        fields = {k: row[k] for k in COLUMNS if k in self.capabilities.fields}
        return Observation(
            external_id=row["ext_id"],
            etag=row["etag"],
            canonical_id=row["canonical_id"],
            fields=fields,
            tags=find_tags(row["title"]),
            modified_at=row["modified_at"],
        )

    def _clinician_ok(self, clinician: str | None) -> bool:
        return not self.clinicians or clinician in self.clinicians

    async def pull(self, cursor: str | None) -> PullResult:
        await self._call("pull")
        with closing(open_db(self.options.path)) as conn:
            conn.row_factory = sqlite3.Row
            epoch = _meta(conn, "epoch", "1")
            head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            if cursor is None:
                rows = conn.execute("SELECT * FROM items WHERE deleted = 0").fetchall()
                obs = [self._observation(r) for r in rows if self._clinician_ok(r["clinician"])]
                return PullResult(obs, f"{epoch}:{head}", complete=True)
            c_epoch, _, c_seq = cursor.partition(":")
            if c_epoch != epoch:
                raise CursorExpired("sync token no longer valid")
            changed = conn.execute(
                "SELECT seq, ext_id FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (int(c_seq), self.options.page_size)
            ).fetchall()
            if not changed:
                return PullResult([], cursor)
            last = changed[-1][0]
            ids = list(dict.fromkeys(r[1] for r in changed))
            rows = conn.execute(f"SELECT * FROM items WHERE ext_id IN ({','.join('?' * len(ids))})", ids).fetchall()
            obs = [self._observation(r) for r in rows if self._clinician_ok(r["clinician"])]
            return PullResult(obs, f"{epoch}:{last}", more=last < head)

    def external_id_for(self, appointment_id: str) -> str | None:
        return f"r-{appointment_id}"

    async def read(self, external_id: str) -> Observation:
        await self._call("read")
        with closing(open_db(self.options.path)) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM items WHERE ext_id = ?", (external_id,)).fetchone()
        if row is None:
            return Observation(external_id=external_id, deleted=True)
        return self._observation(row)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        await self._call("apply")
        ext_id = link.external_id if link and link.external_id else f"r-{appointment_id}"
        values = {k: desired.get(k) for k in COLUMNS if k in desired}
        with closing(open_db(self.options.path)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT etag, deleted FROM items WHERE ext_id = ?", (ext_id,)).fetchone()
            creating = link is None or link.gone or link.external_id is None
            if row is not None and row[1] and (not creating or link is None):
                # If-Match on a deleted copy fails; a create over a tombstone is refused (Google answers 409)
                conn.execute("ROLLBACK")
                raise ConflictError("412 Precondition Failed: the copy was deleted")
            if row is None:
                if desired.get("status") == "cancelled" and self.capabilities.role == Role.MIRROR:
                    conn.execute("COMMIT")
                    return ApplyResult(ext_id, None, gone=True)
                conn.execute(
                    "INSERT INTO items (ext_id, canonical_id, title, creates) VALUES (?, ?, 'Client session', 1)", (ext_id, appointment_id)
                )
            elif not creating and row[0] != link.etag:
                conn.execute("ROLLBACK")
                raise ConflictError("412 Precondition Failed")
            if self.capabilities.role == Role.MIRROR and desired.get("status") == "cancelled":
                touch(conn, ext_id, deleted=1)
                conn.execute("COMMIT")
                gone = True
                etag = None
            else:
                etag = touch(conn, ext_id, deleted=0, title="Client session", **values)
                conn.execute("COMMIT")
                gone = False
        if self._lost_response():
            raise TransientError("timeout after the write was made")
        return ApplyResult(ext_id, etag, disclosed=("title:template",), gone=gone)


class ReplicaVendor:
    """Acts on a replica file as a person using that system would."""

    can_throttle = True

    def __init__(self, path: str, connector_name: str = "under_test", store_path: str | None = None) -> None:
        self.path = path
        self.store_path = store_path
        self.connector_name = connector_name

    def _conn(self) -> sqlite3.Connection:
        return open_db(self.path)

    async def live(self) -> list[dict[str, Any]]:
        with closing(self._conn()) as conn:
            rows = conn.execute(
                "SELECT ext_id, start, \"end\" FROM items WHERE deleted = 0 AND status NOT IN ('cancelled', 'noshow', 'entered_in_error')"
            ).fetchall()
        return [{"external_id": r[0], "start": datetime.fromisoformat(r[1]), "end": datetime.fromisoformat(r[2])} for r in rows]

    async def move(self, external_id: str, start: datetime, end: datetime) -> None:
        with closing(self._conn()) as conn:
            touch(conn, external_id, start=iso(start), end=iso(end))

    async def delete(self, external_id: str) -> None:
        with closing(self._conn()) as conn:
            touch(conn, external_id, deleted=1)

    async def undelete(self, external_id: str) -> None:
        with closing(self._conn()) as conn:
            touch(conn, external_id, deleted=0)

    async def retitle(self, external_id: str, title: str) -> None:
        with closing(self._conn()) as conn:
            touch(conn, external_id, title=title)

    async def set_status(self, external_id: str, status: str) -> None:
        with closing(self._conn()) as conn:
            touch(conn, external_id, status=status)

    async def invalidate_cursor(self) -> None:
        with closing(self._conn()) as conn:
            epoch = int(_meta(conn, "epoch", "1"))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch + 1),))

    async def throttle(self, requests: int, retry_after: float | None = 0.1) -> None:
        with closing(self._conn()) as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('throttle', ?)", (str(requests),))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('throttle_after', ?)", (str(retry_after or 0.1),))

    async def book(self, start: datetime, end: datetime, client_key: str, clinician: str = "dr_rivera") -> str:
        with closing(self._conn()) as conn:
            ext_id = f"b-{conn.execute('SELECT COUNT(*) FROM items').fetchone()[0] + 1:05d}"
            conn.execute("INSERT INTO items (ext_id, title) VALUES (?, 'Session')", (ext_id,))
            touch(
                conn, ext_id, clinician=clinician, client_key=client_key, start=iso(start), end=iso(end),
                timezone="America/New_York", status="booked", modality="in_person", location=None,
            )
        return ext_id

    def all_items(self) -> list[dict[str, Any]]:
        with closing(self._conn()) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM items")]
