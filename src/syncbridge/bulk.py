"""Multi-row statements: many rows written, or looked up, per SQLite statement."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

__all__ = ["ROWS_PER_INSERT", "appointment_keys", "insert_rows"]

#: the most rows in one statement: far below SQLite's limit of 32,766 bound values
ROWS_PER_INSERT = 64


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = "") -> int:
    """``head VALUES (?,..),(?,..)... tail`` for every row, many rows per statement; returns rows changed.

    ``executemany`` steps its statement once per row, and every step releases and retakes the
    GIL and SQLite's mutex: for the thousands of small rows a transaction writes, that is much
    of what a row costs. ``tail`` (an ``ON CONFLICT`` clause) applies to each row as usual.
    Rows go in statements of 64, the rest in statements of 32, 16, ... 1 rows, so only seven
    statement texts per table are ever prepared and cached.
    """
    if not rows:
        return 0
    one = "(" + ",".join("?" * len(rows[0])) + ")"
    changed, lo, size = 0, 0, ROWS_PER_INSERT
    while lo < len(rows):
        count = (len(rows) - lo) // size
        if count:
            sql = f"{head} VALUES {','.join([one] * size)} {tail}"
            hi = lo + count * size
            changed += conn.executemany(sql, [list(chain.from_iterable(rows[i : i + size])) for i in range(lo, hi, size)]).rowcount
            lo = hi
        size //= 2
    return changed


def appointment_keys(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, int]:
    """Canonical id -> integer key for the stored ones among ``ids``, 500 ids per query."""
    found: dict[str, int] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        found.update(conn.execute(f"SELECT id, key FROM appointments WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall())
    return found
