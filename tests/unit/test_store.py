"""The store: private file, migrations recorded, audit chain that detects tampering.

Tests taking ``stores`` run on both engines (SQLite and PostgreSQL, tests/conftest.py)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from syncbridge.errors import StoreError
from syncbridge.migrations import MIGRATIONS
from syncbridge.store import Store, store_error


def _store_with_entries(stores, path: Path, n: int = 5) -> Store:  # type: ignore[no-untyped-def]
    store = stores(path)
    with store.tx() as tx:
        for i in range(n):
            tx.audit.add(f"2026-11-23T10:0{i}:00Z", "observed", "cal", f"sb-{i}", {"version": i})
    return store


def test_store_file_is_private(tmp_path: Path) -> None:
    """The database and its WAL files are readable by the service user only."""
    old = os.umask(0o022)
    try:
        store = _store_with_entries(Store, tmp_path / "s.db")
    finally:
        os.umask(old)
    for name in ("s.db", "s.db-wal"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    store.close()


def test_migrations_are_recorded_once(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Opening a store twice applies each migration once and records its version."""
    stores(tmp_path / "s.db").close()
    store = stores(tmp_path / "s.db")
    rows = store.conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [v for v, _ in MIGRATIONS]
    assert store.schema_version == MIGRATIONS[-1][0]


def test_intact_chain_verifies(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An untouched audit log verifies."""
    result = _store_with_entries(stores, tmp_path / "s.db").verify_audit()
    assert result.ok and result.entries == 5


def test_edited_entry_is_detected(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Changing what an entry says breaks the chain at that entry."""
    store = _store_with_entries(stores, tmp_path / "s.db")
    store.conn.execute("""UPDATE audit SET detail = '{"version":99}' WHERE seq = 3""")
    result = store.verify_audit()
    assert not result.ok and "entry 3 was altered" in result.problem


def test_deleted_entry_is_detected(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Removing an entry from the middle is detected."""
    store = _store_with_entries(stores, tmp_path / "s.db")
    store.conn.execute("DELETE FROM audit WHERE seq = 2")
    result = store.verify_audit()
    assert not result.ok and "entry 2 is missing" in result.problem


def test_truncated_tail_is_detected(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Removing the newest entries is detected through the recorded head."""
    store = _store_with_entries(stores, tmp_path / "s.db")
    store.conn.execute("DELETE FROM audit WHERE seq >= 4")
    result = store.verify_audit()
    assert not result.ok and "removed from the end" in result.problem


def test_rewritten_chain_is_detected(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Re-hashing an edited entry still breaks the link to the next one."""
    from syncbridge.audit import entry_hash

    store = _store_with_entries(stores, tmp_path / "s.db")
    seq, at, kind, conn_, appt, detail, prev, _ = store.conn.execute(
        "SELECT seq, at, kind, connector, appointment_id, detail, prev_hash, hash FROM audit WHERE seq = 2"
    ).fetchone()
    forged = entry_hash(prev, seq, at, kind, conn_, appt, '{"version":42}')
    store.conn.execute("UPDATE audit SET detail = ?, hash = ? WHERE seq = 2", ('{"version":42}', forged))
    result = store.verify_audit()
    assert not result.ok and "entry 3 does not follow entry 2" in result.problem


def test_search_by_kind_reads_the_index_and_finds_every_kind(tmp_path: Path) -> None:
    """Conflicts (the status page) come from the kind index, newest first; the routine kind is still found."""
    store = Store(tmp_path / "s.db")
    with store.tx() as tx:
        for i in range(300):
            tx.audit.add(f"2026-11-23T10:00:{i % 60:02d}Z", "observed", "cal", f"sb-{i}", {"version": 1})
            if i % 100 == 7:
                tx.audit.add(f"2026-11-23T10:00:{i % 60:02d}Z", "conflict", "cal", f"sb-{i}", {"field": "time"})
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    conflicts = store.audit_entries(kind="conflict", limit=20)
    store.conn.set_trace_callback(None)
    assert [e["appointment_id"] for e in conflicts] == ["sb-207", "sb-107", "sb-7"]
    plan = " ".join(r[3] for r in store.conn.execute(f"EXPLAIN QUERY PLAN {statements[-1]}"))
    assert "INDEX audit_kind" in plan, plan
    assert [e["kind"] for e in store.audit_entries(kind="observed", limit=2)] == ["observed", "observed"]
    assert store.audit_kinds() == ["conflict", "observed"]
    store.close()


def test_page_cache_follows_the_setting(tmp_path: Path) -> None:
    """`store.cache_mb` bounds SQLite's page cache, the daemon's largest memory holder after Python."""
    assert Store(tmp_path / "a.db").conn.execute("PRAGMA cache_size").fetchone()[0] == -16 * 1024
    assert Store(tmp_path / "b.db", cache_mb=64).conn.execute("PRAGMA cache_size").fetchone()[0] == -64 * 1024


@pytest.mark.parametrize(
    ("sqlite_says", "advice"),
    [
        ("database is locked", "held its write lock too long; try again"),
        ("database or disk is full", "the disk is full: free space"),
        ("attempt to write a readonly database", "read-only for this user"),
        ("file is not a database", "the file is damaged: restore the last backup"),
        ("unable to open database file", "check that its directory exists"),
    ],
)
def test_store_errors_say_what_to_do(sqlite_says: str, advice: str) -> None:
    """Each way SQLite can refuse the store comes with what an admin can do about it."""
    err = store_error(sqlite3.OperationalError(sqlite_says), "/var/lib/syncbridge/syncbridge.db")
    assert isinstance(err, StoreError)
    assert str(err).startswith(f"the store /var/lib/syncbridge/syncbridge.db cannot be used ({sqlite_says}): ")
    assert advice in str(err)


def test_integrity_check_refuses_a_damaged_file(tmp_path: Path) -> None:
    """The daemon's start-up check finds damage that no query has touched yet."""
    path = tmp_path / "s.db"
    store = Store(path)
    with store.tx() as tx:
        for i in range(300):
            tx.audit.add("2027-01-01T00:00:00Z", "observed", "cal", f"sb-{i}", {"n": "x" * 200})
    store.check_integrity()  # intact: no complaint
    store.close()
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\x00\x01" * 2048  # the last page, a leaf of the audit table
    path.write_bytes(bytes(data))
    damaged = Store(path)
    with pytest.raises(StoreError, match="the file is damaged"):
        damaged.check_integrity()


def test_both_engines_hold_the_same_rows(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What the store is given comes back the same on either engine: text, numbers, bytes, JSON, NULLs."""
    from syncbridge.connector import Link
    from syncbridge.model import empty_snapshot

    store = stores(tmp_path / "s.db")
    snap = empty_snapshot()
    snap.update(clinician="dr_a", client_key="c1", start="2027-01-04T14:00:00Z", end="2027-01-04T14:50:00Z", timezone="UTC", status="booked")
    with store.tx() as tx:
        tx.put_appointment("sb-1", snap, 1, "2027-01-01T00:00:00Z", "ehr")
        tx.put_link(Link("cal", "sb-1", "e1", "x", {"start": "é"}, 1))
        tx.enqueue("cal", "sb-1", 1, 1234567890.123456)
        inbox = tx.inbox_put("cal", "2027-01-01T00:00:00Z", {"x-sig": "1"}, b"\x00\xffbody")
        tx.put_secret("cal", "token", b"\x00secret", "2027-01-01T00:00:00Z")
        assert tx.unlinked_at("ehr", "dr_a", "2027-01-04T14:00:00Z") == [("sb-1", "c1")]
    assert store.appointment("sb-1").fields == snap  # type: ignore[union-attr]
    assert store.link("cal", "sb-1") == Link("cal", "sb-1", "e1", "x", {"start": "é"}, 1)
    (item,) = store.outbox_due(float("inf"), 10)
    assert item.due_at == 1234567890.123456 and item.dead is False
    assert store.inbox_pending() == [(inbox, "cal", {"x-sig": "1"}, b"\x00\xffbody")]
    assert store.secret("cal", "token") == b"\x00secret" and store.secret("cal", "nope") is None
    assert store.outbox_counts() == {"cal": (1, 0)}


def test_a_link_rewritten_twice_in_one_transaction_keeps_the_last(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two observations of one copy in a batch: the link ends as the second left it (PostgreSQL's
    upsert may not touch a row twice in one statement, so the store sends the last only)."""
    from syncbridge.connector import Link
    from syncbridge.model import empty_snapshot

    store = stores(tmp_path / "s.db")
    snap = empty_snapshot()
    snap.update(clinician="dr_a", start="2027-01-04T14:00:00Z", end="2027-01-04T14:50:00Z", timezone="UTC", status="booked")
    with store.tx() as tx:
        tx.put_appointment("sb-1", snap, 1, "2027-01-01T00:00:00Z", "ehr")
        tx.put_link(Link("cal", "sb-1", "e1", "x", {}, 1))
    with store.tx() as tx:
        link = tx.link("cal", "sb-1")
        tx.put_link(link._replace(etag="y"))  # type: ignore[union-attr]
        tx.put_link(link._replace(etag="z", applied_version=2))  # type: ignore[union-attr]
    after = store.link("cal", "sb-1")
    assert after is not None and (after.etag, after.applied_version) == ("z", 2)


def test_one_writer_at_a_time(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A second store's transaction waits for the first to commit, so the audit chain never forks."""
    import threading

    first, second = stores(tmp_path / "s.db"), stores(tmp_path / "s.db")
    entered, order = threading.Event(), []

    def other() -> None:
        entered.wait()
        with second.tx() as tx:
            order.append("second")
            tx.audit.add("2027-01-01T00:00:02Z", "observed", "cal", "sb-2", {})

    thread = threading.Thread(target=other)
    thread.start()
    with first.tx() as tx:
        entered.set()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the write lock
        order.append("first")
        tx.audit.add("2027-01-01T00:00:01Z", "observed", "cal", "sb-1", {})
    thread.join(10)
    assert order == ["first", "second"]
    result = first.verify_audit()
    assert result.ok and result.entries == 2


def test_an_unreachable_postgresql_says_what_to_do(tmp_path: Path) -> None:
    """A PostgreSQL store nobody answers for is refused with the server's words and what to check."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed: `pip install '.[postgresql]'`")
    with pytest.raises(StoreError) as err:
        Store(f"postgresql://syncbridge@/syncbridge?host={tmp_path}&connect_timeout=2", password="not-shown")
    said = str(err.value)
    assert said.startswith("the store postgresql://syncbridge@/syncbridge") and "check that PostgreSQL runs" in said
    assert "not-shown" not in said
