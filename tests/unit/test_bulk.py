"""Multi-row statements: every row written once, and the change count the outbox relies on."""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from syncbridge.bulk import ROWS_PER_INSERT, insert_rows


def _table() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER NOT NULL DEFAULT 0)")
    return conn


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=3 * ROWS_PER_INSERT + 7))
def test_every_row_lands_once_whatever_the_count(values: list[str]) -> None:
    """Counts below, at and across the 64-row statement size all write each row exactly once."""
    conn = _table()
    rows = [(i, v) for i, v in enumerate(values)]
    assert insert_rows(conn, "INSERT INTO t (k, v)", rows) == len(rows)
    assert conn.execute("SELECT k, v FROM t ORDER BY k").fetchall() == rows


def test_change_count_leaves_out_rows_the_conflict_rule_skips() -> None:
    """An upsert whose WHERE declines a row does not count it: the outbox reruns the full rule then."""
    conn = _table()
    insert_rows(conn, "INSERT INTO t (k, v, n)", [(i, "old", i % 2) for i in range(150)])
    changed = insert_rows(
        conn, "INSERT INTO t (k, v)", [(i, "new") for i in range(200)], "ON CONFLICT (k) DO UPDATE SET v = excluded.v WHERE t.n = 0"
    )
    assert changed == 75 + 50  # the 75 stored rows with n = 0 are updated, the 50 new ones inserted
    assert conn.execute("SELECT COUNT(*) FROM t WHERE v = 'old'").fetchone()[0] == 75


def test_a_bad_row_fails_the_statement() -> None:
    """A constraint broken by one row raises, as executemany would; the caller's transaction rolls back."""
    conn = _table()
    conn.execute("BEGIN")
    try:
        insert_rows(conn, "INSERT INTO t (k, v)", [(1, "a"), (2, None)])
    except sqlite3.IntegrityError as err:
        assert "NOT NULL" in str(err)
    else:
        raise AssertionError("a NULL in a NOT NULL column was accepted")
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
