"""``syncbridge migrate-store``: copy the store into another engine (SQLite <-> PostgreSQL), then verify.

A store-layer module (its SQL is the store's: written once, in SQLite's spelling, translated for
PostgreSQL by pg.py). The copy:

1. refuses before anything is written when the daemon runs on the source (its lock is taken for
   the whole copy, so none starts meanwhile), when the target is the source, holds any table that
   has rows or another schema's tables, or when the source's audit chain does not verify (unless
   ``copy_broken_audit``: then the chain is copied as it is and must fail on the target exactly as
   on the source);
2. creates the target's schema with this release's migrations, at the source's version, and checks
   that both engines then have the same tables and columns;
3. reads every table the source's catalogue lists (no list of tables here: a table a later schema
   step adds is copied too) inside one transaction holding the source's write lock, so nothing
   changes under the copy, and writes it into the target in one transaction: a copy that fails
   leaves the target with the empty schema only, and is simply run again;
4. verifies after the commit, reading the target afresh: per table the row count and a content
   checksum equal the source's, and the audit chain verifies on the target with the source's
   number of entries and head hash.

Nothing is ever written to the source: it is opened without a schema upgrade, read in a
transaction that is rolled back, and refused before it is opened when it has no schema (opening
one would create it).

The checksum of a table is the sum, modulo 2**256, of the SHA-256 of each row's canonical form
(its values by column name, text as text, blobs as bytes, numbers as Python prints them): the
same rows give the same sum whatever order each engine returns them in.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import VerifyResult, verify
from .bulk import insert_rows
from .errors import StoreError
from .migrations import version_of
from .pg import DAEMON_LOCK, is_url, redacted

__all__ = ["SKIPPED_TABLES", "CopyResult", "TableCopy", "copy_store", "target_problem"]

#: tables left out of a copy, with the reason (shown in the summary). None today: every table holds
#: state the daemon needs; a table of transient state only (a lease a worker renews every few
#: seconds) may be listed here, documented in docs/postgresql.md, "Moving a store"
SKIPPED_TABLES: dict[str, str] = {}
#: the table whose rows the target's own schema steps write: replaced by the source's history
_SCHEMA_TABLE = "schema_version"
_PAGE = 2000
_MOD = 2**256


@dataclass
class TableCopy:
    name: str
    rows: int = 0
    checksum: int = 0
    seconds: float = 0.0


@dataclass
class CopyResult:
    tables: list[TableCopy] = field(default_factory=list)
    audit: VerifyResult | None = None
    seconds: float = 0.0
    #: what the verification found wrong (empty: verified)
    problems: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


# --- the catalogue of either engine ---------------------------------------------------------------


def _engine(conn: Any) -> str:
    return "sqlite" if isinstance(conn, sqlite3.Connection) else "postgresql"


def tables(conn: Any) -> list[str]:
    """The store's tables, from the engine's catalogue, by name."""
    if _engine(conn) == "sqlite":
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
    else:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' "
            "ORDER BY table_name"
        )
    return [str(r[0]) for r in rows]


def columns(conn: Any, table: str) -> list[str]:
    """A table's columns, in the order they were created."""
    if _engine(conn) == "sqlite":
        return [str(r[1]) for r in conn.execute(f"PRAGMA table_info({_quote(table)})")]
    return [str(r[0]) for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ? "
        "ORDER BY ordinal_position", (table,),
    )]


def primary_key(conn: Any, table: str) -> list[str]:
    """A table's primary-key columns, in key order (empty: it has none)."""
    if _engine(conn) == "sqlite":
        found = [(int(r[5]), str(r[1])) for r in conn.execute(f"PRAGMA table_info({_quote(table)})") if r[5]]
        return [name for _, name in sorted(found)]
    return [str(r[0]) for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = to_regclass(?) AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
        (table,),
    )]


def _identity_columns(conn: Any, table: str) -> list[str]:
    """PostgreSQL's identity columns of a table (what SQLite's ``INTEGER PRIMARY KEY`` became)."""
    return [str(r[0]) for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ? "
        "AND is_identity = 'YES'", (table,),
    )]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def count(conn: Any, table: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {_quote(table)}").fetchone()[0])


def _pages(conn: Any, table: str, cols: list[str]) -> Iterator[list[tuple[Any, ...]]]:
    """A table's rows, a page at a time: by primary key where it has one (a page per query on
    either engine, so PostgreSQL's client never holds a whole table), else in one read."""
    select = f"SELECT {', '.join(map(_quote, cols))} FROM {_quote(table)}"
    key = primary_key(conn, table)
    if not key:
        cur = conn.execute(select)
        while page := cur.fetchmany(_PAGE):
            yield [tuple(r) for r in page]
        return
    at = [cols.index(k) for k in key]
    order = ", ".join(map(_quote, key))
    first = conn.execute(f"{select} ORDER BY {order} LIMIT ?", (_PAGE,)).fetchall()
    after = f"{select} WHERE ({order}) > ({', '.join('?' * len(key))}) ORDER BY {order} LIMIT ?"
    page = first
    while page:
        yield [tuple(r) for r in page]
        if len(page) < _PAGE:
            return
        last = page[-1]
        page = conn.execute(after, (*(last[i] for i in at), _PAGE)).fetchall()


def _canonical(value: Any) -> Any:
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


def row_digest(cols: list[str], row: tuple[Any, ...]) -> int:
    """One row's SHA-256 as an integer: its values by column name, so column order does not count."""
    text = repr(sorted(zip(cols, map(_canonical, row), strict=True)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def checksum(conn: Any, table: str, cols: list[str]) -> tuple[int, int]:
    """(rows, checksum) of a table as stored."""
    rows, total = 0, 0
    for page in _pages(conn, table, cols):
        for r in page:
            total = (total + row_digest(cols, r)) % _MOD
        rows += len(page)
    return rows, total


# --- what is there before the copy ------------------------------------------------------------------


def contents(conn: Any) -> dict[str, int]:
    """Table -> rows, for every table of a database (SQLite file or PostgreSQL schema)."""
    return {t: count(conn, t) for t in tables(conn)}


def _peek_sqlite(path: Path) -> tuple[dict[str, int], int]:
    """(table -> rows, schema version) of a SQLite file, read without changing it ({}, 0: none or empty)."""
    if not path.exists() or path.stat().st_size == 0:
        return {}, 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise StoreError(f"{path} cannot be read as a SQLite store ({err})") from err
    try:
        return contents(conn), version_of(conn)
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path} is not an empty SQLite store ({err}): give a new file, or an empty database") from err
    finally:
        conn.close()


def _peek_postgresql(url: str, password: str | None) -> tuple[dict[str, int], int]:
    from .pg import PgConnection

    conn = PgConnection(url, password=password, pool_size=1, application_name="syncbridge migrate-store")
    try:
        return contents(conn), version_of(conn, "postgresql")
    finally:
        conn.close()


def peek(where: str, password: str | None = None) -> tuple[dict[str, int], int]:
    """(table -> rows, schema version) of a store, without creating or changing anything."""
    return _peek_postgresql(where, password) if is_url(where) else _peek_sqlite(Path(where))


def target_problem(found: dict[str, int], found_version: int, source_version: int) -> str | None:
    """Why a target cannot be copied into (None: it is empty). A target with this release's schema
    at the source's version and no rows (a daemon started on it once, a copy that failed) is empty."""
    full = {t: n for t, n in found.items() if n and t != _SCHEMA_TABLE}
    if full:
        listed = ", ".join(f"{t} ({n} rows)" for t, n in sorted(full.items()))
        return f"the target is not empty: {listed}. Copy into a new, empty database or file; nothing was written"
    if found and not found_version:
        return (f"the target is not empty: it has tables that are not a syncbridge store's ({', '.join(sorted(found)[:5])}). "
                "Copy into a new, empty database or file; nothing was written")
    if found_version and found_version != source_version:
        return (f"the schema versions differ: the target is at schema {found_version}, the source at schema {source_version}. "
                "Copy into a new, empty database or file (its schema is created at the source's version); nothing was written")
    return None


# --- the daemon's lock, on either engine --------------------------------------------------------


def hold_lock(where: str, password: str | None) -> Any:
    """The daemon's lock of a store (so no daemon runs on it during the copy, nor starts): the flock
    on ``<file>.lock`` or the database's advisory lock. Refuses, naming the holder, when a daemon has it."""
    if not is_url(where):
        from .instance_lock import hold_instance_lock

        return hold_instance_lock(Path(where))
    from .pg import PgConnection

    name = f"syncbridge migrate-store pid {os.getpid()} on {socket.gethostname()}"
    conn = PgConnection.connect_once(where, password=password, application_name=name)
    taken = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", DAEMON_LOCK).fetchone()[0]
    holder = _daemon_session(conn)
    if not taken or holder is not None:
        conn.close()
        raise StoreError(
            f"a syncbridge daemon ({holder or 'another session'}) is running on the store {redacted(where)}: stop it first "
            "(`systemctl stop syncbridge`, on every machine that runs it), then copy"
        )
    return conn


def _daemon_session(conn: Any) -> str | None:
    """The application name of another session of this database holding a daemon's lock for its
    life: the daemon's (``pg.DAEMON_LOCK``) or, where several workers share a database by leases,
    any worker's (first key ``pg.WORKER_LOCK``). None: no daemon runs on it."""
    from . import pg

    worker = getattr(pg, "WORKER_LOCK", None)
    either = " OR l.classid = %s" if worker is not None else ""
    row = conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid() "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        f"AND ((l.classid = %s AND l.objid = %s){either}) ORDER BY a.backend_start LIMIT 1",
        (*DAEMON_LOCK, *((worker,) if worker is not None else ())),
    ).fetchone()
    return str(row[0]) if row else None


def release_lock(lock: Any) -> None:
    if isinstance(lock, int):
        os.close(lock)
    else:
        lock.close()


# --- the copy -------------------------------------------------------------------------------------


def _same_shape(source: Any, target: Any, names: list[str]) -> list[str]:
    """What differs between the tables and columns of the two schemas (empty: nothing)."""
    problems = []
    on_target = set(tables(target))
    for t in names:
        if t not in on_target:
            problems.append(f"table {t} is missing on the target")
        elif set(columns(source, t)) != set(columns(target, t)):
            problems.append(f"table {t} has columns {sorted(columns(source, t))} on the source, {sorted(columns(target, t))} on the target")
    return problems


def _copy_table(source: Any, target: Any, table: str, cols: list[str], report: Callable[[str], None]) -> TableCopy:
    done = TableCopy(table)
    started = time.monotonic()
    head = f"INSERT INTO {_quote(table)} ({', '.join(map(_quote, cols))})"
    if table == _SCHEMA_TABLE:
        target.execute(f"DELETE FROM {_quote(table)}")  # the source's history of schema steps, not the copy's
    for page in _pages(source, table, cols):
        insert_rows(target, head, page)
        for r in page:
            done.checksum = (done.checksum + row_digest(cols, r)) % _MOD
        done.rows += len(page)
        if done.rows % 50_000 < _PAGE:
            report(f"  {table}: {done.rows} rows")
    if _engine(target) == "postgresql":
        for col in _identity_columns(target, table):  # the next row numbered by the database follows the copied ones
            target.execute(
                f"SELECT setval(pg_get_serial_sequence(?, ?), (SELECT COALESCE(MAX({_quote(col)}), 0) + 1 FROM {_quote(table)}), false)",
                (table, col),
            )
    done.seconds = time.monotonic() - started
    return done


def _audit_refusal(audit: VerifyResult) -> None:
    """Refuse to copy an audit chain that does not verify: a copy must not launder an edited log."""
    if not audit.ok:
        raise StoreError(
            f"the source's audit chain does not verify ({audit.problem}, after {audit.entries} good entries): nothing was "
            "copied. Find out what changed it (`syncbridge audit --verify`, the anchors); to move the store as it is, with the "
            "evidence kept, run again with --copy-broken-audit"
        )


def copy_store(source: Any, target: Any, *, copy_broken_audit: bool = False, report: Callable[[str], None] = print) -> CopyResult:
    """Copy every table of ``source`` (a Store) into ``target`` (a Store with the same, empty schema),
    then verify the target; see the module's docstring. ``report`` receives the progress lines."""
    started = time.monotonic()
    result = CopyResult()
    names = [t for t in tables(source.conn) if t not in SKIPPED_TABLES]
    shape = _same_shape(source.conn, target.conn, names)
    if shape:
        raise StoreError("the target's schema differs from the source's: " + "; ".join(shape) + "; nothing was copied")
    source.conn.execute("BEGIN IMMEDIATE")  # the source's write lock: nothing changes under the copy
    try:
        audit = verify(source.conn)
        if not copy_broken_audit:
            _audit_refusal(audit)
        result.audit = audit
        target.conn.execute("BEGIN IMMEDIATE")
        try:
            for table in names:
                cols = columns(source.conn, table)
                report(f"copying {table} ({count(source.conn, table)} rows)")
                result.tables.append(_copy_table(source.conn, target.conn, table, cols, report))
            target.conn.execute("COMMIT")
        except BaseException:
            target.conn.execute("ROLLBACK")
            raise
    finally:
        source.conn.execute("ROLLBACK")  # only read
    report("verifying the target")
    result.problems = verify_copy(target.conn, result)
    result.seconds = time.monotonic() - started
    return result


def verify_copy(target: Any, copied: CopyResult) -> list[str]:
    """What differs between the copy as read back from the target and the source as it was read
    (empty: verified): row counts and checksums per table, and the audit chain."""
    problems = []
    for t in copied.tables:
        cols = columns(target, t.name)
        stored = count(target, t.name)
        rows, total = checksum(target, t.name, cols)
        if stored != t.rows or rows != t.rows:
            problems.append(f"table {t.name}: {t.rows} rows on the source, {stored} on the target")
        elif total != t.checksum:
            problems.append(f"table {t.name}: the content differs from the source's (checksum)")
    audit, was = verify(target), copied.audit
    if was is not None and (audit.ok, audit.entries, audit.head, audit.problem) != (was.ok, was.entries, was.head, was.problem):
        said = "verifies" if audit.ok else f"does not verify ({audit.problem})"
        problems.append(
            f"the audit chain on the target {said} with {audit.entries} entries, head {audit.head}; on the source: "
            f"{was.entries} entries, head {was.head}{'' if was.ok else ', ' + was.problem}"
        )
    return problems


# --- the command ----------------------------------------------------------------------------------


def _same_store(source: str, target: str) -> bool:
    if is_url(source) or is_url(target):
        return source == target
    return Path(source).resolve() == Path(target).resolve()


def _next_step(target: str, password_ref: str | None) -> str:
    if is_url(target):
        password = f"\n    password: {password_ref}" if password_ref else ""
        store = f"store:\n    url: {target}{password}\n    # path: (not used with url)"
    else:
        store = f"store:\n    path: {Path(target).resolve()}\n    # url, password: (remove them: the store is this SQLite file)"
    return (
        "next: point the config at the new store, keeping store.secret_key as it is (it decrypts the tokens copied with it):\n"
        f"  {store}\n"
        "then `syncbridge check --no-connect` and start the daemon (`systemctl start syncbridge`). The old store is unchanged: "
        "keep it until the daemon runs well on the new one, and do not start a daemon on it again (it would miss what changes "
        "on the new one)"
    )


def migrate_store(
    cfg: Any, target: str, *, password: str | None = None, password_ref: str | None = None, copy_broken_audit: bool = False,
    report: Callable[[str], None] = print,
) -> int:
    """Copy the configured store (``cfg``: the config's StoreConfig) into ``target`` (a SQLite path
    or a ``postgresql://`` URL without a password; ``password``: its password, revealed from its
    reference), verify, and report. Returns the exit code: 0 copied and verified, 1 verification failed."""
    from .store import Store

    source = cfg.where
    if _same_store(source, target):
        raise StoreError(f"the target {redacted(target)} is the configured store itself: give another database or file")
    if not cfg.url and not Path(source).exists():
        raise StoreError(f"there is no store at {Path(source).resolve()}: nothing to copy; check store.path")
    source_password = cfg.password.reveal() if cfg.url and cfg.password else None
    lock = hold_lock(source, source_password)
    try:
        _, version = peek(source, source_password)
        if not version:
            raise StoreError(f"there is no store at {redacted(source)} (no schema): nothing to copy; check the config's store section")
        target_lock = hold_lock(target, password)
        try:
            there, there_version = peek(target, password)
            problem = target_problem(there, there_version, version)
            if problem:
                raise StoreError(problem)
            src = cfg.open(migrate=False)  # refuses a source at another release's schema, and changes nothing
            try:
                if not copy_broken_audit:  # refused before the target is created (checked again inside the copy's snapshot)
                    _audit_refusal(verify(src.conn))
                dst = Store(target, migrate=True, password=password, pool_size=2)  # its schema, at this release's version
                try:
                    if dst.schema_version != src.schema_version:
                        raise StoreError(
                            f"the schema versions differ: the target was created at schema {dst.schema_version}, the source is at "
                            f"schema {src.schema_version}: use the syncbridge release that wrote the source"
                        )
                    report(f"copying {redacted(source)} ({src.engine}, schema {src.schema_version}) into {redacted(target)} ({dst.engine})")
                    result = copy_store(src, dst, copy_broken_audit=copy_broken_audit, report=report)
                finally:
                    dst.close()
            finally:
                src.close()
        finally:
            release_lock(target_lock)
    finally:
        release_lock(lock)
    skipped = f"; left out: {', '.join(f'{t} ({why})' for t, why in SKIPPED_TABLES.items())}" if SKIPPED_TABLES else ""
    report(f"copied {len(result.tables)} tables, {result.rows} rows in {result.seconds:.1f} s{skipped}")
    if result.problems:
        report("VERIFICATION FAILED: do not use the target; remove it (drop the database, delete the file) and copy again")
        for p in result.problems:
            report(f"  {p}")
        return 1
    audit = result.audit
    chain = "verifies" if audit is None or audit.ok else f"is broken as on the source ({audit.problem})"
    report(
        f"verified: row counts and content checksums of every table equal the source's; the audit chain {chain} "
        f"({audit.entries if audit else 0} entries, head {audit.head if audit else '-'})"
    )
    report(_next_step(target, password_ref))
    return 0
