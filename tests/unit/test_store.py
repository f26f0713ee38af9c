"""The store: private file, migrations recorded, audit chain that detects tampering.

Tests taking ``stores`` run on both engines (SQLite and PostgreSQL, tests/conftest.py)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

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


def _one_session(stores, tmp_path: Path) -> tuple[Store, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """A store on the engine under test holding Dr A's booked session sb-1, and its snapshot."""
    from syncbridge.model import empty_snapshot

    store = stores(tmp_path / "s.db")
    snap = empty_snapshot()
    snap.update(clinician="dr_a", client_key="c1", start="2027-01-04T14:00:00Z", end="2027-01-04T14:50:00Z", timezone="UTC", status="booked")
    with store.tx() as tx:
        tx.put_appointment("sb-1", snap, 1, "2027-01-01T00:00:00Z", "ehr")
    return store, snap


def test_both_engines_hold_the_same_rows(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What the store is given comes back the same on either engine: text, numbers, bytes, JSON, NULLs."""
    from syncbridge.connector import Link

    store, snap = _one_session(stores, tmp_path)
    with store.tx() as tx:
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


def test_every_statement_runs_on_both_engines(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each read and write of the store, once, with what it answers: none is spelled for one engine only."""
    from syncbridge.connector import Link

    store, snap = _one_session(stores, tmp_path)
    with store.tx() as tx:
        tx.put_link(Link("cal", "sb-1", "e1", "x", {}, 1), applied_at="2027-01-01T00:00:00Z")
        tx.enqueue("ehr", "sb-1", 1, 10.0)
        assert tx.set_cursor("cal", "c1", "2027-01-01T00:00:00Z", full=True, only_from=(None,))
        assert not tx.set_cursor("cal", "c2", "2027-01-01T00:00:01Z", only_from=("other",))
        tx.set_health("cal", False, "down")
        tx.forget_cursor("ehr")
        assert tx.open_work("k:1", "mass_cancel_guard", "look", "2027-01-01T00:00:00Z", "cal", "sb-1")
        assert not tx.open_work("k:1", "mass_cancel_guard", "look", "2027-01-01T00:00:00Z", "cal", "sb-1")
        assert tx.open_work_keys("k:") == ["k:1"]
        tx.hold("cal", "2027-01-01T00:00:00Z", 5, 10)
        assert not tx.take_approved_hold("cal")
        tx.approve_held("cal")
        assert tx.take_approved_hold("cal")
        assert tx.first_via("sb-1") == "ehr"
        tx.add_operation("op1", "cancel", {"why": "x"}, "2027-01-01T00:00:00Z", "admin", [("sb-1", 1)])
        tx.operation_item_done("op1", "sb-1", "changed", 2)
        tx.finish_operation("op1", "2027-01-01T00:00:01Z")
        tx.replace_busy("cal", "dr_a", [("2027-01-04T09:00:00Z", "2027-01-04T10:00:00Z")])
        tx.set_pending("zd", "sb-1", "z1", True, "2027-01-01T00:00:00Z")
        tx.pending_failed("zd", "sb-1", "HTTP 500")
        inbox = tx.inbox_put("cal", "2027-01-01T00:00:00Z", {}, b"x")
        tx.inbox_done([inbox], "2027-01-01T00:00:01Z")
        assert tx.inbox_prune("2027-01-02T00:00:00Z") == 1
        assert tx.linked_statuses("cal") == [("e1", "booked")]
        assert tx.plan_slots([("zd", "dr_a", "2027-01-04", "[]", "d1", 1), ("zd", "dr_a", "2027-01-05", "[]", "d1", 0)], 1.0) == 2
        tx.slot_verify([("zd", "dr_a", "2027-01-05")], 1.0)
        tx.slot_settled("zd", "dr_a", "2027-01-05", 2, "d1", "2027-01-01T00:00:00Z")
        assert tx.slot_retry("zd", "dr_a", "2027-01-04", 50.0, "HTTP 503", strike=True) == 1
        tx.slot_probe_now("zd", 2.0)
        tx.slot_all_due("zd", 3.0)
        tx.slot_dead("zd", "dr_a", "2027-01-06", "gone")
        tx.slot_forget("zd", "dr_a", before="2027-01-01", keep=["2027-01-04", "2027-01-05"])
        assert tx.set_degraded("cal", "one by one") and tx.set_degraded("cal", None)
    with store.tx() as tx:
        tx.outbox_retry("ehr", "sb-1", 100.0, "transient: refused")
        assert tx.outbox_release("ehr", ["dr_a"], 20.0) == 1
        tx.outbox_retry("ehr", "sb-1", 100.0, "transient: refused")
        assert tx.outbox_probe("ehr", 30.0) == 1
        assert tx.outbox_waiting("ehr") == 1
        assert tx.outage_failed("ehr", 1.0, "refused").failures == 1
        assert tx.outage_failed("ehr", 2.0, "refused").failures == 2
        assert tx.outage_over("ehr") is not None
        tx.outbox_dead("ehr", "sb-1", "HTTP 400")
        assert tx.close_work("k:1", "2027-01-01T00:00:02Z", "admin")
    state = store.connector_state("cal")
    assert (state["cursor"], state["healthy"], state["note"], state["degraded"]) == ("c1", 0, "down", None)
    assert [i.appointment_id for i in store.dead_letters()] == ["sb-1"] and store.outbox_counts() == {"ehr": (0, 1)}
    assert "1 write dead-lettered" in store.connector_state("ehr")["note"]
    with store.tx() as tx:
        tx.outbox_now("ehr", "sb-1", 1, 5.0)
    assert [(i.appointment_id, i.account) for i in store.outbox_due_per_account(10.0, "ehr", 2)] == [("sb-1", "dr_a")]
    assert store.outbox_due_connectors(10.0) == ["ehr"] and store.outbox_next_due() == 5.0
    assert [w.key for w in store.worklist(include_closed=True)] == ["k:1"] and store.worklist() == []
    assert store.linked_live("cal", "2027-01-01") == ["e1"]
    assert store.linked_in_window("cal", 1e12, "2027-01-01", "2027-02-01", ["dr_a"], within=True) == ["e1"]
    assert store.linked_in_window("cal", 1e12, "2027-01-01", "2027-02-01", ["dr_a"], within=False) == []
    assert store.busy_of("dr_a", "2027-01-04T00:00:00Z", "2027-01-05T00:00:00Z") == [("2027-01-04T09:00:00Z", "2027-01-04T10:00:00Z")]
    assert [s["client_key"] for s in store.sessions_of("dr_a", "2027-01-01", "2027-02-01")] == ["c1"]
    assert store.upcoming_of(["sb-1", "sb-none"], "2027-01-01") == [("sb-1", "dr_a")]
    assert [a.id for a in store.live_sessions("dr_a", "2027-01-01", "2027-02-01")] == ["sb-1"]
    assert [a.id for a in store.sessions_between(["dr_a"], "2027-01-01", "2027-02-01")] == ["sb-1"]
    op = store.operation("op1")
    assert op is not None and op.params == {"why": "x"} and op.finished_at == "2027-01-01T00:00:01Z"
    assert [o.id for o in store.operations()] == ["op1"] and store.unfinished_operations() == []
    assert [(i.state, i.version) for i in store.operation_items("op1")] == [("changed", 2)]
    assert [s.day for s in store.slot_states("zd")] == ["2027-01-04", "2027-01-05"]
    assert [s.day for s in store.slot_due(10.0)] == ["2027-01-04"] and store.slot_next_due() == 2.0
    assert store.slot_due_by_connector() == {"zd": 2.0} and store.slot_dead_days("zd", "dr_a") == []
    assert store.slot_counts() == {"zd": (2, 1, 0)}
    assert [(p.external_id, p.last_error) for p in store.pending_bookings()] == [("z1", "HTTP 500")]
    assert [v for v, *_ in store.history("sb-1")] == [1] and [link.external_id for link in store.links_of("cal")] == ["e1"]
    assert set(store.applied_stamps("sb-1")) == {"cal"} and store.cursor("cal") == "c1"
    head = store.audit_head()
    assert head is None or store.audit_hashes([head[0]]) == {head[0]: head[1]}
