"""The hash-chained audit log: every observed change and every write, tamper-evident.

Each entry's hash covers its content and the previous entry's hash; ``audit_head`` holds the
last sequence number and hash. Editing an entry breaks its hash, deleting one breaks the chain
or the head. ``syncbridge audit --verify`` walks the chain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from .bulk import Connection, appointment_keys, insert_flat

__all__ = ["GENESIS", "ROUTINE_KIND", "AuditWriter", "VerifyResult", "entry_hash", "verify"]

GENESIS = "0" * 64
#: the kind of entry every merged change writes: most of the log, and left out of its kind index
ROUTINE_KIND = "observed"
#: an entry's columns, in the order ``AuditWriter`` lays them out (the appointment's key is not hashed)
_COLUMNS = ("seq", "at", "kind", "connector", "appointment_id", "detail", "prev_hash", "hash", "appt")
_ID, _KEY = _COLUMNS.index("appointment_id"), _COLUMNS.index("appt")


def _encode_detail(detail: dict[str, Any]) -> str:
    """Compact, key-sorted JSON for an entry's detail; values JSON lacks are written as text."""
    return orjson.dumps(detail, default=str, option=orjson.OPT_SORT_KEYS).decode()


def entry_hash(prev: str, seq: int, at: str, kind: str, connector: str | None, appointment_id: str | None, detail: str) -> str:
    """SHA-256 over the parts, each followed by a unit separator (0x1f), hashed in one call."""
    text = f"{prev}\x1f{seq}\x1f{at}\x1f{kind}\x1f{connector or ''}\x1f{appointment_id or ''}\x1f{detail}\x1f"
    return hashlib.sha256(text.encode()).hexdigest()


class AuditWriter:
    """Appends entries within the caller's transaction; reads the head once per transaction.

    Each entry also records its appointment's integer key (``audit.appt``, what the
    per-appointment index is built on), taken from ``keys`` (appointment id -> key, the
    transaction's own map) or, for appointments the transaction never loaded, looked up at flush.
    """

    def __init__(self, conn: Connection, keys: dict[str, int] | None = None) -> None:
        self.conn = conn
        self.keys = keys if keys is not None else {}
        row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        self.seq: int = row[0] if row else 0
        self.hash: str = row[1] if row else GENESIS
        #: entries to write, end to end, ``len(_COLUMNS)`` values each
        self.rows: list[Any] = []

    def add(self, at: str, kind: str, connector: str | None, appointment_id: str | None, detail: dict[str, Any]) -> None:
        seq = self.seq + 1
        text = _encode_detail(detail)
        digest = entry_hash(self.hash, seq, at, kind, connector, appointment_id, text)
        self.rows += (seq, at, kind, connector, appointment_id, text, self.hash, digest, self.keys.get(appointment_id) if appointment_id else None)
        self.seq, self.hash = seq, digest

    def flush(self) -> None:
        if not self.rows:
            return
        rows, width = self.rows, len(_COLUMNS)
        # entries about appointments the transaction never loaded get their keys here, in bulk
        unkeyed = [i for i in range(0, len(rows), width) if rows[i + _ID] and rows[i + _KEY] is None]
        if unkeyed:
            found = appointment_keys(self.conn, list({rows[i + _ID] for i in unkeyed}))
            for i in unkeyed:
                rows[i + _KEY] = found.get(rows[i + _ID])
        insert_flat(self.conn, f"INSERT INTO audit ({', '.join(_COLUMNS)})", rows)
        self.conn.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            (self.seq, self.hash),
        )
        self.rows = []


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    head: str
    problem: str = ""


def verify(conn: Connection) -> VerifyResult:
    prev, expected_seq, count = GENESIS, 1, 0
    for seq, at, kind, connector, appointment_id, detail, prev_hash, digest in conn.execute(
        "SELECT seq, at, kind, connector, appointment_id, detail, prev_hash, hash FROM audit ORDER BY seq"
    ):
        if seq != expected_seq:
            return VerifyResult(False, count, prev, f"entry {expected_seq} is missing (next is {seq})")
        if prev_hash != prev:
            return VerifyResult(False, count, prev, f"entry {seq} does not follow entry {seq - 1}")
        if entry_hash(prev, seq, at, kind, connector, appointment_id, detail) != digest:
            return VerifyResult(False, count, prev, f"entry {seq} was altered (its hash does not match its content)")
        prev, expected_seq, count = digest, seq + 1, count + 1
    head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    if count and (head is None or head[0] != count or head[1] != prev):
        return VerifyResult(False, count, prev, f"the log ends at entry {count} but the head records entry {head[0] if head else 0}: entries were removed from the end")
    if not count and head is not None:
        return VerifyResult(False, 0, prev, "the log is empty but the head records entries: the log was truncated")
    return VerifyResult(True, count, prev)
