"""Multi-row statements: many rows written, or looked up, per statement (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, Protocol

__all__ = ["ROWS_PER_INSERT", "Connection", "appointment_keys", "columns", "insert_flat", "insert_rows", "last_of_each"]

class Connection(Protocol):
    """What the store asks of a connection: ``sqlite3.Connection``, or pg.py's PgConnection."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Any: ...


#: the most rows in one statement: far below SQLite's limit of 32,766 bound values
ROWS_PER_INSERT = 64


def insert_rows(conn: Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = "") -> int:
    """``head VALUES (?,..),(?,..)... tail`` for every row, many rows per statement; returns rows changed.

    ``executemany`` steps its statement once per row, and every step releases and retakes the
    GIL and SQLite's mutex: for the thousands of small rows a transaction writes, that is much
    of what a row costs. ``tail`` (an ``ON CONFLICT`` clause) applies to each row as usual.
    """
    if not rows:
        return 0
    return insert_flat(conn, head, list(chain.from_iterable(rows)), tail)


def insert_flat(conn: Connection, head: str, values: list[Any], tail: str = "") -> int:
    """:func:`insert_rows` for rows laid end to end in ``values``, one value per column ``head`` names.

    A buffer that is only ever written as a whole can be kept this way from the start, and then
    no row is built as a tuple only to be taken apart again. Rows go in statements of 64, the
    rest in statements of 32, 16, ... 1 rows, so only seven statement texts per table are ever
    prepared and cached.
    """
    width = columns(head)
    count_rows = len(values) // width
    one = "(" + ",".join("?" * width) + ")"
    changed, lo, size = 0, 0, ROWS_PER_INSERT
    while lo < count_rows:
        count = (count_rows - lo) // size
        if count:
            sql = f"{head} VALUES {','.join([one] * size)} {tail}"
            hi, step = lo + count * size, size * width
            changed += conn.executemany(sql, [values[i : i + step] for i in range(lo * width, hi * width, step)]).rowcount
            lo = hi
        size //= 2
    return changed


def last_of_each(values: list[Any], width: int, key_width: int) -> list[Any]:
    """Rows laid end to end in ``values``, only the last of those sharing their first ``key_width``
    values, in the order of their first appearance: what one multi-row upsert may take on
    PostgreSQL, which refuses to update one row twice in a statement."""
    rows: dict[tuple[Any, ...], list[Any]] = {}
    for i in range(0, len(values), width):
        rows[tuple(values[i : i + key_width])] = values[i : i + width]
    if len(rows) * width == len(values):
        return values
    return list(chain.from_iterable(rows.values()))


def columns(head: str) -> int:
    """How many columns ``INSERT INTO table (a, b, ...)`` names: the width of each of its rows."""
    return head[head.index("(") : head.rindex(")")].count(",") + 1


def appointment_keys(conn: Connection, ids: Sequence[str]) -> dict[str, int]:
    """Canonical id -> integer key for the stored ones among ``ids``, 500 ids per query."""
    found: dict[str, int] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        found.update(conn.execute(f"SELECT id, key FROM appointments WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall())
    return found
