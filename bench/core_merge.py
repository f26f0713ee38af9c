"""Benchmark: merged changes per second through observe -> match -> merge -> commit, and peak RSS
with 100k appointments stored.

    taskset -c 0 .venv/bin/python bench/core_merge.py --appointments 100000 --batch 1000

Three phases on a fresh store: the EHR reports N new bookings (creates), a calendar reports
each of them (links adopted by embedded id), then the calendar reports N moves (the hot path:
link lookup, three-way merge, new version, audit entry, outbox fan-out to the other systems).
The moves come in creation order by default; ``--order random`` moves them in a random order,
so each batch touches appointments from all over the store.
No network: connectors here only declare capabilities; the engine is what is measured.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, Capabilities, Connector, Observation, PullResult
from syncbridge.engine import Engine
from syncbridge.model import FIELDS, Role, iso
from syncbridge.store import Store

MIRROR_FIELDS = frozenset({"clinician", "start", "end", "timezone", "status", "modality", "location"})


class Declared(Connector):
    """Capabilities only; the benchmark feeds observations straight to the engine."""

    capabilities = Capabilities(role=Role.MIRROR, fields=MIRROR_FIELDS, status_map=MIRROR_STATUS_MAP)

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.capabilities.role == Role.RECORD:
            self.capabilities = Capabilities(role=Role.RECORD, fields=frozenset(FIELDS) - {"cancellation", "billing"})

    async def pull(self, cursor):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def read(self, external_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def apply(self, appointment_id, desired, link):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--appointments", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--clinicians", type=int, default=30)
    ap.add_argument("--cache-mb", type=int, default=None, help="store.cache_mb (default: the daemon's default)")
    ap.add_argument(
        "--order", choices=("created", "random"), default="created",
        help="which appointments each batch of moves touches: in creation order, or a random permutation",
    )
    args = ap.parse_args()
    n, batch = args.appointments, args.batch
    tmp = Path(tempfile.mkdtemp(prefix="sb-bench-"))
    clinicians = [f"dr_{i:02d}" for i in range(args.clinicians)]
    conf = {
        "store": {"path": str(tmp / "bench.db")} | ({"cache_mb": args.cache_mb} if args.cache_mb else {}),
        "clinicians": {c: {"accounts": {"cal": {}, "cal2": {}}} for c in clinicians},
        "connectors": {
            "ehr": {"type": "core_merge:Declared", "role": "record"},
            "cal": {"type": "core_merge:Declared"},
            "cal2": {"type": "core_merge:Declared"},
        },
    }
    cfg = parse_config(yaml.safe_dump(conf))
    store = Store(cfg.store.path, cache_mb=cfg.store.cache_mb)
    from syncbridge.registry import build_connectors

    engine = Engine(store, build_connectors(cfg), cfg)
    t0 = datetime(2027, 1, 4, 14, tzinfo=UTC)

    def booking(i: int) -> Observation:
        start = t0 + timedelta(hours=i % 2000, days=i // 2000)
        return Observation(
            external_id=f"ehr-{i}", etag="1",
            fields={"clinician": clinicians[i % len(clinicians)], "client_key": f"c{i % 500}", "start": iso(start),
                    "end": iso(start + timedelta(minutes=50)), "timezone": "America/New_York", "status": "booked",
                    "modality": "in_person", "location": "Room 1", "service_code": "90837", "series_id": None},
        )

    cpu: dict[str, float] = {}  # phase -> CPU seconds

    def run(phase: str, name: str, make, order: list[int] | None = None) -> float:  # type: ignore[no-untyped-def]
        """Seconds spent in the engine only; observations are built before the clock starts.

        The CPU seconds of the same stretch are kept too: on a shared machine they move less
        with other people's load than the wall clock does (they leave out waiting on I/O).
        """
        spent = used = 0.0
        order = order or list(range(n))
        for lo in range(0, n, batch):
            result = PullResult([make(i) for i in order[lo : lo + batch]], cursor=str(lo))
            started, cpu_started = time.perf_counter(), time.process_time()
            engine.observe(name, result)
            spent += time.perf_counter() - started
            used += time.process_time() - cpu_started
        cpu[phase] = used
        return spent

    created = run("create", "ehr", booking)
    ids = [r[0] for r in store.conn.execute("SELECT appointment_id FROM links WHERE connector = 'ehr' ORDER BY CAST(substr(external_id, 5) AS INTEGER)")]
    cal = Declared.capabilities

    def copy(i: int) -> Observation:
        snap = booking(i).fields
        return Observation(external_id=f"cal-{i}", etag="a", canonical_id=ids[i], fields=cal.project(snap))

    linked = run("link", "cal", copy)

    def moved(i: int) -> Observation:
        o = copy(i)
        start = t0 + timedelta(hours=i % 2000 + 1, days=i // 2000)
        o.fields = o.fields | {"start": iso(start), "end": iso(start + timedelta(minutes=50))}
        o.etag = "b"
        return o

    order = list(range(n))
    if args.order == "random":
        random.Random(7).shuffle(order)
    merged = run("merge", "cal", moved, order)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    audit_ok = store.verify_audit().ok
    outbox_rows = store.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    store.close()  # the last connection to close checkpoints: the file then holds everything
    out = {
        "appointments": n,
        "batch": batch,
        "order": args.order,
        "create_per_s": round(n / created),
        "link_per_s": round(n / linked),
        "merge_per_s": round(n / merged),
        "merge_cpu_us": round(cpu["merge"] / n * 1e6, 1),
        "peak_rss_mb": round(rss_mb, 1),
        "store_mb": round((tmp / "bench.db").stat().st_size / 2**20, 1),
        "audit_ok": audit_ok,
        "outbox_rows": outbox_rows,
    }
    shutil.rmtree(tmp)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
