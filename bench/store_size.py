"""Benchmark: how big a practice's store grows, per appointment and per change, and what a day writes.

    .venv/bin/python bench/store_size.py --clinicians 30 --weeks 52
    .venv/bin/python bench/store_size.py --clinicians 30 --weeks 52 --postgresql postgresql://ROLE@/DB?host=/run/postgresql

A practice's year goes through the real engine, outbox and store (SQLite): the EHR (the record)
reports every session of ``--clinicians`` clinicians, 26 a week for ``--weeks`` weeks, each
written to the clinician's calendar (a mirror) by the outbox; then ``--cancel`` of the sessions
are cancelled in the EHR and ``--move`` moved in the calendar, each change merged, versioned,
audited and written to the other system. The connectors only declare capabilities and answer
every write at once (no network): what is measured is what the store keeps. Reported per table:
rows and bytes (SQLite's ``dbstat``: pages in use, indexes included), per appointment and per
change, and, with ``--postgresql URL`` (an empty database), the same store copied there with
``syncbridge migrate-store`` and measured with ``pg_total_relation_size`` (heap, indexes, TOAST).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

from syncbridge.config import parse_config  # noqa: E402
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Observation, PullResult  # noqa: E402
from syncbridge.engine import Engine  # noqa: E402
from syncbridge.logging import configure  # noqa: E402
from syncbridge.model import FIELDS, Role, iso  # noqa: E402
from syncbridge.outbox import Outbox  # noqa: E402
from syncbridge.registry import build_connectors  # noqa: E402
from syncbridge.store import Store  # noqa: E402

MIRROR_FIELDS = frozenset({"clinician", "start", "end", "timezone", "status", "modality", "location"})
SLOTS = [(d, h) for d in range(5) for h in (9, 10, 11, 13, 14, 15)][:26]  # 26 sessions a week, as bench/initial_sync.py


class Declared(Connector):
    """Capabilities only; every write lands at once with a new etag, as a calendar answers it."""

    capabilities = Capabilities(role=Role.MIRROR, fields=MIRROR_FIELDS, status_map=MIRROR_STATUS_MAP)
    write_batch = 50

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.capabilities.role == Role.RECORD:
            self.capabilities = Capabilities(role=Role.RECORD, fields=frozenset(FIELDS) - {"cancellation", "billing"})
        self.n = 0

    async def pull(self, cursor):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def read(self, external_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def apply(self, appointment_id, desired, link):  # type: ignore[no-untyped-def]
        self.n += 1
        # a Google event id (26 characters) and etag ("3391658240000000" in quotes), as the vendor gives them
        ext = link.external_id if link and link.external_id else f"{appointment_id[3:29]}"
        return ApplyResult(ext, f'"{3391658240000000 + self.n}"', disclosed=("start", "end", "status"))


def sizes(path: Path) -> dict[str, tuple[int, int]]:
    """table -> (rows, bytes of its pages and its indexes' pages), from SQLite's dbstat."""
    import sqlite3

    conn = sqlite3.connect(path)
    owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
    out: dict[str, list[int]] = {}
    for name, used in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
        table = owner.get(name) or name.split("_autoindex_")[0].removeprefix("sqlite_autoindex_")
        out.setdefault(table, [0, 0])[1] += used
    for t in list(out):
        try:
            out[t][0] = conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
        except sqlite3.Error:
            pass
    conn.close()
    return {t: (r, b) for t, (r, b) in out.items()}


def pg_sizes(url: str) -> dict[str, tuple[int, int]]:
    import psycopg

    with psycopg.connect(url) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")]
        return {t: (conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0],
                    conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]) for t in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clinicians", type=int, default=30)
    ap.add_argument("--weeks", type=int, default=52)
    ap.add_argument("--cancel", type=float, default=0.12, help="share of sessions cancelled in the EHR (default 0.12)")
    ap.add_argument("--move", type=float, default=0.08, help="share of sessions moved in the calendar (default 0.08)")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--postgresql", help="an empty PostgreSQL database to copy the store into and measure there")
    ap.add_argument("--keep", action="store_true", help="keep the store (its path is printed)")
    args = ap.parse_args()
    configure("warning", json_logs=True)
    tmp = Path(tempfile.mkdtemp(prefix="sb-size-"))
    clinicians = [f"dr_{i:02d}" for i in range(args.clinicians)]
    conf = {
        "store": {"path": str(tmp / "store.db")},
        "clinicians": {c: {"accounts": {"ehr": {}, "cal": {}}} for c in clinicians},
        "connectors": {"ehr": {"type": "store_size:Declared", "role": "record"}, "cal": {"type": "store_size:Declared"}},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(conf))
    cfg = parse_config(yaml.safe_dump(conf))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    monday = datetime(2027, 1, 4, tzinfo=UTC)
    sessions = [(c, monday + timedelta(days=7 * w + d, hours=h + 5)) for w in range(args.weeks) for d, h in SLOTS for c in clinicians]

    def booking(i: int) -> Observation:
        c, start = sessions[i]
        return Observation(external_id=f"{1_000_000 + i}", etag=f"W/\"{i}\"", fields={
            "clinician": c, "client_key": f"Patient/{70_000 + i % 400}", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
            "timezone": "America/New_York", "status": "booked", "modality": "in_person", "location": "Room 2",
            "service_code": "90834", "series_id": f"series-{c}-{i % 26}"})

    def observe(name: str, observations: list[Observation]) -> None:
        for lo in range(0, len(observations), args.batch):
            engine.observe(name, PullResult(observations[lo : lo + args.batch], cursor=str(lo)))

    steps: list[tuple[str, int, dict[str, tuple[int, int]], int]] = []

    def measure(step: str, changes: int) -> None:
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # rows inserted, updated or deleted through the store's connection so far (SQLite's count)
        steps.append((step, changes, sizes(tmp / "store.db"), store.conn.total_changes))

    started = time.monotonic()
    n = len(sessions)
    observe("ehr", [booking(i) for i in range(n)])
    asyncio.run(Outbox(engine).drain())
    measure("booked in the EHR, written to the calendar", n)
    cancelled = list(range(0, n, round(1 / args.cancel)))
    observe("ehr", [Observation(external_id=o.external_id, etag=o.etag + "c", fields=o.fields | {"status": "cancelled"})
                    for o in (booking(i) for i in cancelled)])
    asyncio.run(Outbox(engine).drain())
    measure("cancelled in the EHR, removed from the calendar", len(cancelled))
    ids = dict(store.conn.execute("SELECT external_id, appointment_id FROM links WHERE connector = 'ehr'").fetchall())
    cal = {a: e for e, a in store.conn.execute("SELECT external_id, appointment_id FROM links WHERE connector = 'cal'").fetchall()}
    moved = [i for i in range(1, n, round(1 / args.move)) if i not in set(cancelled)]

    def move(i: int) -> Observation:
        appt = ids[f"{1_000_000 + i}"]
        f = booking(i).fields
        start = datetime.fromisoformat(f["start"].replace("Z", "+00:00")) + timedelta(hours=1)
        return Observation(external_id=cal[appt], etag='"m"', canonical_id=appt, fields=Declared.capabilities.project(
            f | {"start": iso(start), "end": iso(start + timedelta(minutes=50))}))

    observe("cal", [move(i) for i in moved])
    asyncio.run(Outbox(engine).drain())
    measure("moved in the calendar, written to the EHR", len(moved))
    took = time.monotonic() - started
    audit = store.verify_audit()
    store.close()

    last = steps[-1][2]
    total_rows = sum(r for r, _ in last.values())
    total_bytes = sum(b for _, b in last.values())
    out: dict[str, Any] = {
        "appointments": n, "cancelled": len(cancelled), "moved": len(moved), "seconds": round(took, 1), "audit_ok": audit.ok,
        "file_bytes": (tmp / "store.db").stat().st_size, "pages_bytes": total_bytes, "rows": total_rows,
        "bytes_per_appointment": round(total_bytes / n), "tables": {t: {"rows": r, "bytes": b} for t, (r, b) in sorted(last.items())},
        "steps": [],
    }
    before: dict[str, tuple[int, int]] = {}
    written = 0
    for step, changes, now, total_changes in steps:
        rows = sum(now[t][0] - before.get(t, (0, 0))[0] for t in now)
        grown = sum(now[t][1] - before.get(t, (0, 0))[1] for t in now)
        per = {t: now[t][0] - before.get(t, (0, 0))[0] for t in now if now[t][0] != before.get(t, (0, 0))[0]}
        out["steps"].append({"step": step, "changes": changes, "rows_added": rows, "bytes_added": grown,
                             "rows_written_per_change": round((total_changes - written) / changes, 2),
                             "bytes_per_change": round(grown / changes),
                             "rows_per_change": {t: round(v / changes, 2) for t, v in per.items()}})
        before, written = now, total_changes
    if args.postgresql:
        command = [sys.executable, "-m", "syncbridge.cli", "migrate-store", "--config", str(tmp / "config.yaml"), "--to", args.postgresql]
        done = subprocess.run(command, capture_output=True, text=True, env={"PYTHONPATH": f"{ROOT / 'bench'}:{':'.join(sys.path)}"})
        if done.returncode:
            print(done.stdout, done.stderr, file=sys.stderr)
        else:
            copied = next(line for line in done.stdout.splitlines() if line.startswith("copied "))
            pg = pg_sizes(args.postgresql)
            out["postgresql"] = {"migrate_store": copied, "bytes": sum(b for _, b in pg.values()),
                                 "bytes_per_appointment": round(sum(b for _, b in pg.values()) / n),
                                 "tables": {t: {"rows": r, "bytes": b} for t, (r, b) in sorted(pg.items())}}
    print(json.dumps(out, indent=1))
    if args.keep:
        print(f"store kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
