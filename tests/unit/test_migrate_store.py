"""`syncbridge migrate-store`: a store copied SQLite -> PostgreSQL -> SQLite arrives whole and
verified; what must not be copied is refused, naming why; the source is never changed.

The command runs as an admin runs it, as a process (the claim is about the CLI); the stores are
filled through the engine, the outbox and the store's transactions, as the daemon fills them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.config import load_config
from syncbridge.engine import Engine
from syncbridge.outbox import Outbox
from syncbridge.policy.cancellation import decide
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge.store_copy import checksum, columns, contents, tables
from tests.support.replica import ReplicaVendor

ROOT = Path(__file__).resolve().parents[2]


def sb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(ROOT))))
    return subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", *args], cwd=ROOT, env=os.environ | {"PYTHONPATH": path} | (env or {}),
        capture_output=True, text=True, timeout=300,
    )


def write_config(tmp_path: Path, name: str, store: dict[str, object], vendors: str = "") -> Path:
    conf = {
        "practice": {"timezone": "America/New_York"},
        "store": store,
        "http": {"enabled": False},
        "clinicians": {"dr_lee": {"accounts": {"cal": {}}}, "dr_kim": {"accounts": {"cal": {}}}},
        "connectors": {
            "ehr": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / f"{vendors}ehr.db"), "role": "record"},
            "cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / f"{vendors}cal.db")},
        },
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(conf))
    return path


def fill(config: Path, sessions: int = 12) -> None:
    """A practice's store as the daemon leaves it: sessions booked in the EHR, pulled, written to
    the calendar, one cancelled, one moved; worklist items, a webhook, a token, published slots,
    a bulk operation, busy time, an outage and a held batch."""
    cfg = load_config(config)
    ehr = ReplicaVendor(yaml.safe_load(config.read_text())["connectors"]["ehr"]["path"])
    start = datetime(2027, 3, 1, 14, tzinfo=UTC)
    for i in range(sessions):
        clinician = ("dr_lee", "dr_kim")[i % 2]
        asyncio.run(ehr.book(start + timedelta(days=i // 2), start + timedelta(days=i // 2, minutes=50), f"c{i}", clinician=clinician))
    store = Store(cfg.store.path)
    engine = Engine(store, build_connectors(cfg), cfg)
    asyncio.run(engine.sync("ehr"))
    asyncio.run(Outbox(engine).drain())
    asyncio.run(engine.sync("cal"))
    first, second = store.appointments()[:2]
    status, record = decide(cfg.policy.cancellation, start=first.start, now=first.start - timedelta(hours=3), via="cli",
                            tags=frozenset(), by="client", kind=None, reason="flu, said ü")
    engine.change(first.id, dict(first.fields) | {"status": status, "cancellation": record}, via="cli", kind="cancelled")
    def later(text: str) -> str:
        return (datetime.fromisoformat(text.replace("Z", "+00:00")) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")

    moved = {"start": later(second.fields["start"]), "end": later(second.fields["end"])}
    engine.change(second.id, dict(second.fields) | moved, via="cli", kind="moved")
    with store.tx() as tx:
        tx.open_work("claim:1", "claim_sent", "void claim 1 with the payer", "2027-03-01T09:00:00Z", "ehr", first.id)
        tx.open_work("claim:2", "claim_sent", "void claim 2", "2027-03-01T09:00:00Z", "ehr", second.id)
        tx.close_work("claim:2", "2027-03-01T10:00:00Z", "cli")
        inbox = tx.inbox_put("cal", "2027-03-01T09:00:01Z", {"x-goog-channel-token": "t"}, b"\x00\x01 binary \xff body")
        tx.inbox_put("cal", "2027-03-01T09:00:02Z", {"h": "v"}, b"{}")
        tx.inbox_done([inbox], "2027-03-01T09:00:03Z")
        tx.put_secret("cal", "refresh:dr_lee", b"gAAAA\x00encrypted\xfe", "2027-03-01T09:00:00Z")
        tx.plan_slots([("ehr", "dr_lee", "2027-03-02", '[["09:00","10:00"]]', "d1", 1)], 1.5e9)
        tx.add_operation("op-1", "cancel", {"clinician": "dr_kim"}, "2027-03-01T09:00:00Z", "admin", [(second.id, 2)])
        tx.hold("cal", "2027-03-01T09:00:00Z", 40, 50)
        hour = ("2027-03-02T12:00:00Z", "2027-03-02T13:00:00Z")
        tx.replace_busy("cal", "dr_lee", [hour, hour])  # the same interval twice: a table without a key keeps both
        tx.outage_failed("cal", 1.7e9 + 0.125, "503 from the vendor")
        tx.audit.add("2027-03-01T09:00:04Z", "note", None, None, {"text": "ünïcode ✓", "n": 1.25})
    store.close()


def dump(where: str) -> dict[str, tuple[int, int]]:
    """table -> (rows, checksum) of a store, read independently of the command."""
    store = Store(where, migrate=False)
    try:
        return {t: checksum(store.conn, t, columns(store.conn, t)) for t in tables(store.conn)}
    finally:
        store.close()


def sqlite_digest(path: Path, *, ordered: bool = False) -> str:
    """The file's SQL dump, hashed (``ordered``: its statements sorted, so the rows' physical order does not count)."""
    with closing(sqlite3.connect(path)) as conn:
        lines = list(conn.iterdump())
    return hashlib.sha256(repr(sorted(lines) if ordered else lines).encode()).hexdigest()


@pytest.fixture
def practice(tmp_path: Path) -> Path:
    config = write_config(tmp_path, "config.yaml", {"path": str(tmp_path / "store.db")})
    fill(config)
    return config


def test_a_store_goes_to_postgresql_and_back_unchanged(  # type: ignore[no-untyped-def]
    practice: Path, tmp_path: Path, postgres_cluster,
) -> None:
    """SQLite -> PostgreSQL -> SQLite: every table, every row, the audit chain with its head, the same
    on all three; the source is not changed; the copy on PostgreSQL works as a store afterwards."""
    source = tmp_path / "store.db"
    before = sqlite_digest(source)
    original = dump(str(source))
    filled = {"appointments", "appointment_history", "links", "audit", "audit_head", "worklist", "webhook_inbox", "outbox",
              "secrets", "slot_states", "operations", "operation_items", "busy", "outages", "held_batches", "cursors"}
    assert [t for t in sorted(filled) if not original.get(t, (0, 0))[0]] == []  # real content in every one of them

    url = postgres_cluster.database()
    (tmp_path / "pw").write_text("unused-by-trust\n")
    done = sb("migrate-store", "--config", str(practice), "--to", url, "--password-ref", f"file:{tmp_path / 'pw'}")
    assert done.returncode == 0, done.stderr + done.stdout
    out = done.stdout
    assert "copying audit" in out and "verified: row counts and content checksums of every table" in out
    assert f"copied {len(original)} tables, {sum(r for r, _ in original.values())} rows in" in out
    assert f"url: {url}" in out and f"password: {{file: {tmp_path / 'pw'}}}" in out and "systemctl start syncbridge" in out
    assert sqlite_digest(source) == before, "the source was changed"
    assert dump(url) == original

    src, pg = Store(source, migrate=False), Store(url, migrate=False)
    assert pg.verify_audit() == src.verify_audit() and pg.verify_audit().ok and pg.audit_head() == src.audit_head()
    assert [a.id for a in pg.appointments()] == [a.id for a in src.appointments()]
    assert pg.worklist(include_closed=True) == src.worklist(include_closed=True)
    assert pg.inbox_pending() == src.inbox_pending()
    with pg.tx() as tx:  # numbered columns carry on after the copied rows
        tx.open_work("claim:3", "claim_sent", "void claim 3", "2027-03-02T09:00:00Z")
        tx.inbox_put("cal", "2027-03-02T09:00:00Z", {}, b"{}")
        tx.audit.add("2027-03-02T09:00:00Z", "note", None, None, {})
    assert pg.verify_audit().ok and pg.verify_audit().entries == src.verify_audit().entries + 1
    src.close()
    pg.close()

    pg_config = write_config(tmp_path, "pg.yaml", {"url": url, "password": {"file": str(tmp_path / "pw")}})
    back = tmp_path / "back" / "store.db"
    done = sb("migrate-store", "--config", str(pg_config), "--to", str(back))
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"path: {back}" in done.stdout
    copied = dump(str(back))
    assert copied["audit"][0] == original["audit"][0] + 1  # the entry added on PostgreSQL came back too
    again = Store(back, migrate=False)
    assert again.verify_audit().ok
    again.close()


def test_sqlite_to_sqlite_is_identical(practice: Path, tmp_path: Path) -> None:
    """The copy between two files is the same store: the same tables, rows and checksums, and the same SQL
    dump, statement for statement (the history of schema steps is the source's too). Only the order rows
    sit in a file without an integer key may differ: nothing reads it (the store's SQL never uses rowid)."""
    target = tmp_path / "copy.db"
    done = sb("migrate-store", "--config", str(practice), "--to", str(target))
    assert done.returncode == 0, done.stderr
    assert dump(str(target)) == dump(str(tmp_path / "store.db"))
    assert sqlite_digest(target, ordered=True) == sqlite_digest(tmp_path / "store.db", ordered=True)
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_running_daemon_is_refused(practice: Path, tmp_path: Path) -> None:
    """While a daemon holds the source's lock, nothing is copied and the holder is named."""
    from syncbridge.instance_lock import hold_instance_lock, release

    lock = hold_instance_lock(tmp_path / "store.db")
    try:
        done = sb("migrate-store", "--config", str(practice), "--to", str(tmp_path / "copy.db"))
    finally:
        release(lock)
    assert done.returncode == 1
    assert f"another syncbridge daemon (pid {os.getpid()}) is already running" in done.stderr and "stop it first" in done.stderr
    assert not (tmp_path / "copy.db").exists()


def test_a_running_daemon_on_postgresql_is_refused(tmp_path: Path, postgres_cluster) -> None:  # type: ignore[no-untyped-def]
    """On PostgreSQL the daemon's advisory lock is what tells: refused, naming the daemon's session."""
    from syncbridge.config import StoreConfig
    from syncbridge.instance_lock import hold_store_lock, release

    url = postgres_cluster.database()
    Store(url).close()
    config = write_config(tmp_path, "pg.yaml", {"url": url})
    lock = hold_store_lock(StoreConfig(url=url))
    try:
        done = sb("migrate-store", "--config", str(config), "--to", str(tmp_path / "copy.db"))
    finally:
        release(lock)
    assert done.returncode == 1 and f"pid {os.getpid()} on" in done.stderr and "is running on the store" in done.stderr
    assert not (tmp_path / "copy.db").exists()


def test_a_running_worker_on_postgresql_is_refused(  # type: ignore[no-untyped-def]
    tmp_path: Path, postgres_cluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where several workers share a database, each holds a lock of its own name (pg.WORKER_LOCK):
    any of them running refuses the copy, named by its session."""
    import psycopg

    from syncbridge import pg, store_copy
    from syncbridge.errors import StoreError

    monkeypatch.setattr(pg, "WORKER_LOCK", getattr(pg, "WORKER_LOCK", 0x73796E64), raising=False)
    url = postgres_cluster.database()
    Store(url).close()
    config = write_config(tmp_path, "pg.yaml", {"url": url})
    with psycopg.connect(url, autocommit=True, application_name="syncbridge worker w1") as worker:
        worker.execute("SELECT pg_advisory_lock(%s, hashtext('w1'))", (pg.WORKER_LOCK,))
        with pytest.raises(StoreError) as err:
            store_copy.migrate_store(load_config(config).store, str(tmp_path / "copy.db"), report=lambda _: None)
    assert "a syncbridge daemon (syncbridge worker w1) is running on the store" in str(err.value)
    assert not (tmp_path / "copy.db").exists()


def test_a_target_with_rows_is_refused(practice: Path, tmp_path: Path) -> None:
    """A target that holds anything is refused, naming the tables with rows; it is not changed."""
    other = tmp_path / "other.db"
    fill(write_config(tmp_path, "other.yaml", {"path": str(other)}, vendors="other-"), sessions=2)
    before = sqlite_digest(other)
    done = sb("migrate-store", "--config", str(practice), "--to", str(other))
    assert done.returncode == 1
    assert "the target is not empty: appointment_history (" in done.stderr and "audit (" in done.stderr
    assert sqlite_digest(other) == before

    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    done = sb("migrate-store", "--config", str(practice), "--to", str(foreign))
    assert done.returncode == 1 and "tables that are not a syncbridge store's (invoices)" in done.stderr


def test_an_empty_store_of_this_release_is_a_good_target(practice: Path, tmp_path: Path) -> None:
    """A target the daemon created once (schema, no rows) is empty: the copy goes in."""
    target = tmp_path / "fresh.db"
    Store(target).close()
    done = sb("migrate-store", "--config", str(practice), "--to", str(target))
    assert done.returncode == 0, done.stderr
    assert dump(str(target)) == dump(str(tmp_path / "store.db"))


def test_a_target_at_another_schema_is_refused(practice: Path, tmp_path: Path) -> None:
    """An empty store written by another release is refused, naming both schema versions."""
    from syncbridge import migrations

    target = tmp_path / "old.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:-1])
        Store(target).close()
    before = sqlite_digest(target)
    done = sb("migrate-store", "--config", str(practice), "--to", str(target))
    assert done.returncode == 1
    newest = migrations.newest()
    assert f"the schema versions differ: the target is at schema {newest - 1}, the source at schema {newest}" in done.stderr
    assert sqlite_digest(target) == before


@pytest.mark.parametrize("url", [
    "postgresql://sb:hunter2@db.example.org/sb",
    "postgresql://sb@db.example.org/sb?password=hunter2",
])
def test_a_password_in_the_url_is_refused(practice: Path, url: str) -> None:
    """The target's password comes by reference, never in the URL; the message does not repeat it."""
    done = sb("migrate-store", "--config", str(practice), "--to", url)
    assert done.returncode == 2
    assert "--to: the URL holds a password" in done.stderr and "--password-ref" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_bad_password_references_are_refused(practice: Path, tmp_path: Path) -> None:
    done = sb("migrate-store", "--config", str(practice), "--to", "postgresql://sb@/sb", "--password-ref", "hunter2")
    assert done.returncode == 2 and "is not a secret reference: give env:NAME, file:PATH or credential:NAME" in done.stderr
    done = sb("migrate-store", "--config", str(practice), "--to", "postgresql://sb@/sb", "--password-ref", "env:SB_NOT_SET")
    assert done.returncode == 1 and "secret environment variable SB_NOT_SET is not set" in done.stderr


def test_the_store_itself_and_a_missing_store_are_refused(practice: Path, tmp_path: Path) -> None:
    done = sb("migrate-store", "--config", str(practice), "--to", str(tmp_path / "store.db"))
    assert done.returncode == 1 and "is the configured store itself" in done.stderr
    missing = write_config(tmp_path, "missing.yaml", {"path": str(tmp_path / "none.db")})
    done = sb("migrate-store", "--config", str(missing), "--to", str(tmp_path / "copy.db"))
    assert done.returncode == 1 and "there is no store at" in done.stderr
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "copy.db").exists()


def _tamper(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("""UPDATE audit SET detail = '{"edited":true}' WHERE seq = 3""")
        conn.commit()


def test_a_tampered_audit_chain_is_refused(practice: Path, tmp_path: Path) -> None:
    """An edited audit entry on the source stops the copy, naming the entry: a copy must not launder it."""
    _tamper(tmp_path / "store.db")
    done = sb("migrate-store", "--config", str(practice), "--to", str(tmp_path / "copy.db"))
    assert done.returncode == 1
    assert "the source's audit chain does not verify (entry 3 was altered" in done.stderr and "--copy-broken-audit" in done.stderr
    assert not (tmp_path / "copy.db").exists()


def test_a_copy_that_fails_half_way_leaves_an_empty_target(practice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target is written in one transaction: a copy that stops leaves only the empty schema, and runs again into it."""
    from syncbridge import store_copy

    real = store_copy._copy_table

    def failing(source, target, table, cols, report):  # type: ignore[no-untyped-def]
        if table == "outbox":
            raise OSError("disk gone")
        return real(source, target, table, cols, report)

    monkeypatch.setattr(store_copy, "_copy_table", failing)
    with pytest.raises(OSError):
        store_copy.migrate_store(load_config(practice).store, str(tmp_path / "copy.db"), report=lambda _: None)
    copy = Store(tmp_path / "copy.db", migrate=False)
    assert not any(n for t, n in contents(copy.conn).items() if t != "schema_version")
    copy.close()
    monkeypatch.undo()
    done = sb("migrate-store", "--config", str(practice), "--to", str(tmp_path / "copy.db"))
    assert done.returncode == 0, done.stderr


def test_a_tampered_audit_chain_is_copied_as_evidence_when_asked(  # type: ignore[no-untyped-def]
    practice: Path, tmp_path: Path, postgres_cluster,
) -> None:
    """With --copy-broken-audit the chain is copied as it is, and breaks on the target exactly where it does on the source."""
    _tamper(tmp_path / "store.db")
    url = postgres_cluster.database()
    done = sb("migrate-store", "--config", str(practice), "--to", url, "--copy-broken-audit")
    assert done.returncode == 0, done.stderr
    assert "the audit chain is broken as on the source (entry 3 was altered" in done.stdout
    pg = Store(url, migrate=False)
    result = pg.verify_audit()
    pg.close()
    assert not result.ok and result.entries == 2 and "entry 3 was altered" in result.problem


def test_a_copy_that_differs_is_reported(practice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verification reads the target back: a row lost on the way is named, and the exit code says so."""
    from syncbridge import store_copy
    from syncbridge.config import load_config as load

    real = store_copy._copy_table

    def lossy(source, target, table, cols, report):  # type: ignore[no-untyped-def]
        done = real(source, target, table, cols, report)
        if table == "links":
            target.execute("DELETE FROM links WHERE connector = 'cal'")
        return done

    monkeypatch.setattr(store_copy, "_copy_table", lossy)
    lines: list[str] = []
    code = store_copy.migrate_store(load(practice).store, str(tmp_path / "copy.db"), report=lines.append)
    assert code == 1
    text = "\n".join(lines)
    assert "VERIFICATION FAILED" in text and "table links: 24 rows on the source, 12 on the target" in text


def test_help_names_the_command() -> None:
    done = sb("migrate-store", "--help")
    assert done.returncode == 0 and "--to URL_OR_PATH" in done.stdout and "--password-ref" in done.stdout
