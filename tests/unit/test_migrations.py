"""Upgrading a store written by the previous schema (version 3) keeps everything it held.

Each runs on both engines (``stores``, tests/conftest.py): the old stores are built with the
schema steps as each engine runs them (``migrations.steps``), so PostgreSQL's translation of every
step, step 4's own words included, is exercised on rows, not only on empty tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from syncbridge.audit import GENESIS, entry_hash
from syncbridge.connector import Link
from syncbridge.errors import StoreError
from syncbridge.migrations import MIGRATIONS, steps
from syncbridge.model import empty_snapshot
from syncbridge.store import Store, dumps


def _snap(start: str, status: str = "booked") -> dict[str, object]:
    snap = empty_snapshot()
    snap.update(clinician="dr_a", client_key="c1", start=start, end=start.replace(":00:00Z", ":50:00Z"), timezone="America/New_York")
    snap["status"] = status
    return snap


def _apply(stores: Any, conn: Any, version: int) -> None:
    """Apply one schema step as the release that shipped it did."""
    for statement in dict(steps(stores.engine))[version]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (?, '2026-01-01 00:00:00')", (version,))


def _step(stores: Any, path: Path, version: int, *rows: str) -> None:
    """Take a store one schema step up, then add ``rows`` as that release wrote them."""
    conn = stores.raw(path)
    _apply(stores, conn, version)
    for sql in rows:
        conn.execute(sql)
    conn.close()


def _version3_store(stores: Any, path: Path) -> None:
    """A store as schema version 3 wrote it: text-keyed history and audit, rows in that order."""
    conn = stores.raw(path)
    if stores.engine == "sqlite":
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL)")
    for version in (1, 2, 3):
        _apply(stores, conn, version)
    # three appointments, created in this order; the second moved once (two versions)
    appts = [("sb-c", "2027-01-04T14:00:00Z"), ("sb-a", "2027-01-04T15:00:00Z"), ("sb-b", "2027-01-04T16:00:00Z")]
    for appt_id, start in appts:
        snap = _snap(start)
        conn.execute("INSERT INTO appointments VALUES (?,?,?,?,?,?,?,?)", (appt_id, "dr_a", start, "booked", dumps(snap), 1, start, "ehr"))
        conn.execute("INSERT INTO appointment_versions VALUES (?,?,?,?,?)", (appt_id, 1, dumps(snap), start, "ehr"))
    moved = _snap("2027-01-05T15:00:00Z")
    conn.execute("UPDATE appointments SET start = ?, snapshot = ?, version = 2 WHERE id = 'sb-a'", (moved["start"], dumps(moved)))
    conn.execute("INSERT INTO appointment_versions VALUES (?,?,?,?,?)", ("sb-a", 2, dumps(moved), "2027-01-02T00:00:00Z", "cal"))
    conn.execute("INSERT INTO links (connector, appointment_id, external_id, etag, base, applied_version) VALUES ('cal','sb-a','e1','x','{}',2)")
    conn.execute("INSERT INTO outbox VALUES ('ehr','sb-a',2,0,0,NULL,0,0)")
    prev = GENESIS
    entries = [("observed", "ehr", "sb-c"), ("observed", "cal", "sb-a"), ("rejected", "cal", None), ("write", "ehr", "sb-gone")]
    for seq, (kind, connector, appt_id) in enumerate(entries, start=1):
        at, detail = f"2027-01-01T00:00:0{seq}Z", json.dumps({"n": seq}, separators=(",", ":"))
        digest = entry_hash(prev, seq, at, kind, connector, appt_id, detail)
        conn.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?)", (seq, at, kind, connector, appt_id, detail, prev, digest))
        prev = digest
    conn.execute("INSERT INTO audit_head VALUES (1, ?, ?)", (len(entries), prev))
    conn.close()


@pytest.fixture
def upgraded(stores: Any, tmp_path: Path) -> Store:
    _version3_store(stores, tmp_path / "old.db")
    return stores(tmp_path / "old.db")  # type: ignore[no-any-return]


def test_upgrade_keeps_appointments_history_links_and_outbox(upgraded: Store) -> None:
    """Every appointment, every version of its history, its links and outbox rows survive the upgrade."""
    assert upgraded.schema_version == MIGRATIONS[-1][0]
    assert {a.id: a.version for a in upgraded.appointments()} == {"sb-c": 1, "sb-a": 2, "sb-b": 1}
    history = upgraded.history("sb-a")
    assert [(v, s["start"], via) for v, s, _, via in history] == [(1, "2027-01-04T15:00:00Z", "ehr"), (2, "2027-01-05T15:00:00Z", "cal")]
    assert [v for v, *_ in upgraded.history("sb-b")] == [1]
    link = upgraded.link("cal", "sb-a")
    assert link is not None and link.external_id == "e1" and link.applied_version == 2
    assert [(o.connector, o.appointment_id, o.target_version) for o in upgraded.outbox_due(1.0, 10)] == [("ehr", "sb-a", 2)]


def test_upgrade_keys_appointments_in_creation_order(upgraded: Store) -> None:
    """Old appointments keep their creation order; a new one is keyed after them."""
    keys = upgraded.conn.execute("SELECT id FROM appointments ORDER BY key").fetchall()
    assert [k for (k,) in keys] == ["sb-c", "sb-a", "sb-b"]
    with upgraded.tx() as tx:
        tx.put_appointment("sb-new", _snap("2027-01-06T14:00:00Z"), 1, "2027-01-03T00:00:00Z", "ehr")
        tx.audit.add("2027-01-03T00:00:00Z", "observed", "ehr", "sb-new", {})
    assert upgraded.conn.execute("SELECT key FROM appointments WHERE id = 'sb-new'").fetchone()[0] == 4
    assert [e["kind"] for e in upgraded.audit_entries(appointment_id="sb-new")] == ["observed"]


def test_upgraded_audit_still_verifies_and_is_found_by_appointment(upgraded: Store) -> None:
    """The old hash chain verifies after the upgrade, and entries are still found per appointment, stored or not."""
    assert upgraded.verify_audit().ok
    assert [e["seq"] for e in upgraded.audit_entries(appointment_id="sb-a")] == [2]
    assert [e["seq"] for e in upgraded.audit_entries(appointment_id="sb-gone")] == [4]
    with upgraded.tx() as tx:
        tx.audit.add("2027-01-03T00:00:00Z", "observed", "cal", "sb-a", {"n": 5})
        tx.put_link(Link("cal", "sb-a", "e1", "y", {}, 2))
    assert upgraded.verify_audit().ok
    assert [e["seq"] for e in upgraded.audit_entries(appointment_id="sb-a")] == [5, 2]
    upgraded.conn.execute("""UPDATE audit SET detail = '{"n":9}' WHERE seq = 2""")
    assert "entry 2 was altered" in upgraded.verify_audit().problem


def _version4_store(stores: Any, path: Path) -> None:
    """A store as schema version 4 wrote it: outbox rows keyed on the text id, one dead, one retrying."""
    _version3_store(stores, path)
    _step(
        stores, path, 4,
        "INSERT INTO outbox VALUES ('cal','sb-c',1,5.0,3,'HTTP 503',0,1.0)",
        "INSERT INTO outbox VALUES ('cal','sb-b',1,2.0,8,'HTTP 400: bad event',1,1.5)",
    )


def test_upgrade_from_version_4_keeps_every_outbox_item(stores: Any, tmp_path: Path) -> None:
    """Pending, retrying and dead outbox items survive the upgrade with their attempts and errors."""
    _version4_store(stores, tmp_path / "old.db")
    store = stores(tmp_path / "old.db")
    assert store.schema_version == MIGRATIONS[-1][0]
    items = {(o.connector, o.appointment_id): o for o in store.outbox_due(10.0, 10) + store.dead_letters()}
    assert {k: (o.target_version, o.due_at, o.attempts, o.last_error, o.dead) for k, o in items.items()} == {
        ("ehr", "sb-a"): (2, 0.0, 0, None, False),
        ("cal", "sb-c"): (1, 5.0, 3, "HTTP 503", False),
        ("cal", "sb-b"): (1, 2.0, 8, "HTTP 400: bad event", True),
    }
    assert store.history("sb-a")[-1][0] == 2 and store.verify_audit().ok


def test_upgraded_outbox_coalesces_and_completes_items(stores: Any, tmp_path: Path) -> None:
    """After the upgrade a newer version still replaces an item's target, and done/retry/dead reach the right row."""
    _version4_store(stores, tmp_path / "old.db")
    store = stores(tmp_path / "old.db")
    with store.tx() as tx:
        tx.enqueue("ehr", "sb-a", 3, 0.0)
        tx.enqueue("ehr", "sb-c", 1, 0.0)
        tx.outbox_retry("cal", "sb-c", 7.0, "HTTP 429")
        tx.outbox_dead("ehr", "sb-c", "HTTP 403")
        tx.outbox_done("cal", "sb-b", 1)
    rows = store.conn.execute("SELECT connector, appointment_id, target_version, attempts, last_error, dead FROM outbox ORDER BY 1, 2").fetchall()
    assert rows == [
        ("cal", "sb-c", 1, 4, "HTTP 429", 0),
        ("ehr", "sb-a", 3, 0, None, 0),
        ("ehr", "sb-c", 1, 1, "HTTP 403", 1),
    ]


def _version5_store(stores: Any, path: Path) -> None:
    """A store as schema version 5 wrote it: links keyed on the text id, one gone, one not yet written."""
    _version4_store(stores, path)
    _step(
        stores, path, 5,
        "INSERT INTO links (connector, appointment_id, external_id, etag, base, applied_version, applied_at, gone, applied_ts) "
        "VALUES ('ehr','sb-a','E-7','3','{\"status\":\"booked\"}',2,'2027-01-02T00:00:00Z',0,1.5)",
        "INSERT INTO links (connector, appointment_id, external_id, etag, base, applied_version, gone) VALUES ('cal','sb-c','e2','q',NULL,1,1)",
        "INSERT INTO links (connector, appointment_id, external_id, etag, base, applied_version) VALUES ('cal2','sb-b',NULL,NULL,NULL,0)",
    )


def test_upgrade_from_version_5_keeps_every_link(stores: Any, tmp_path: Path) -> None:
    """Every link keeps its external id, etag, base, applied version and time, and gone flag; lookups both ways still work."""
    _version5_store(stores, tmp_path / "old.db")
    store = stores(tmp_path / "old.db")
    assert store.schema_version == MIGRATIONS[-1][0]
    by_appt = {a: [(link.connector, link.external_id, link.etag, link.base, link.applied_version, link.gone, at) for link, at in store.links_for(a)]
               for a in ("sb-a", "sb-b", "sb-c")}
    assert by_appt == {
        "sb-a": [("cal", "e1", "x", {}, 2, False, None), ("ehr", "E-7", "3", {"status": "booked"}, 2, False, "2027-01-02T00:00:00Z")],
        "sb-b": [("cal2", None, None, None, 0, False, None)],
        "sb-c": [("cal", "e2", "q", None, 1, True, None)],
    }
    found = store.link_by_external("ehr", "E-7")
    assert found is not None and found.appointment_id == "sb-a"
    assert set(store.applied_stamps("sb-a")) == {"cal", "ehr"}
    # a transaction reads the upgraded links and rewrites the right row
    with store.tx() as tx:
        tx.prefetch("cal", ["e1"], [])
        link = tx.link_by_external("cal", "e1")
        assert link is not None and link.appointment_id == "sb-a"
        tx.put_link(link._replace(etag="y", base={"start": "x"}, applied_version=3))
    after = store.link("cal", "sb-a")
    assert after is not None and (after.etag, after.base, after.applied_version) == ("y", {"start": "x"}, 3)
    assert store.link("cal", "sb-c") is not None and store.link("cal", "sb-c").gone  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("old_store", "orphan", "schema", "table", "rows"),
    [
        (_version3_store, "INSERT INTO appointment_versions VALUES ('sb-orphan', 1, '{}', 'x', 'ehr')", 4, "appointment_versions", 5),
        (_version5_store, "INSERT INTO links (connector, appointment_id, external_id) VALUES ('cal','sb-orphan','e9')", 6, "links", 5),
    ],
    ids=["history", "link"],
)
def test_upgrade_refuses_to_drop_rows_of_a_missing_appointment(stores, tmp_path: Path, old_store, orphan, schema, table, rows) -> None:  # type: ignore[no-untyped-def]
    """A history row or link whose appointment is missing stops the upgrade instead of being dropped."""
    old_store(stores, tmp_path / "old.db")
    conn = stores.raw(tmp_path / "old.db")
    conn.execute(orphan)
    conn.close()
    refused = rf"upgrade of the store to schema {schema} was refused and rolled back \((NOT NULL|null value).*at schema {schema - 1}"
    with pytest.raises(StoreError, match=refused):
        stores(tmp_path / "old.db")
    conn = stores.raw(tmp_path / "old.db")
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == schema - 1
    assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == rows


def test_both_engines_have_the_same_tables_and_columns(stores: Any, tmp_path: Path) -> None:
    """One schema history: the newest schema has the same tables, columns and NOT NULL rules on either engine."""
    store = stores(tmp_path / "s.db")
    if stores.engine == "sqlite":
        tables = [r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found = {(t, r[1], bool(r[3] or r[5])) for t in tables for r in store.conn.execute(f"PRAGMA table_info({t})")}
    else:
        found = {
            (r[0], r[1], r[2] == "NO")
            for r in store.conn.execute(
                "SELECT table_name, column_name, is_nullable FROM information_schema.columns WHERE table_schema = current_schema()"
            )
        }
    assert {t for t, _, _ in found} >= {"appointments", "appointment_history", "links", "outbox", "audit", "audit_head", "worklist",
                                         "webhook_inbox", "slot_states", "operations", "operation_items", "schema_version"}
    columns = {(t, c) for t, c, _ in found}
    assert ("links", "applied_ts") in columns and ("outbox", "strikes") in columns and ("audit", "appt") in columns
    expected = {
        ("appointments", "key", True), ("appointments", "id", True), ("links", "external_id", False), ("outbox", "appt", True),
        ("audit", "appt", False), ("webhook_inbox", "id", True), ("worklist", "closed_at", False),
    }
    assert expected <= found, expected - found
