"""Benchmark: Zocdoc timeslot PUTs after one cancellation in a 30-clinician practice.

    .venv/bin/python bench/zocdoc_publish.py --clinicians 30 --horizon 21

A practice of N clinicians, each with a week pattern of booked sessions, publishes its slots for
the horizon to the Zocdoc emulator (the first run sends every date). Then one session is
cancelled in the canonical record and publishing runs again: the goal is exactly one PUT, for
the one affected date. PUTs are counted from the emulator's own request log.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.logging import configure
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.publisher import Publisher
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running

NY = ZoneInfo("America/New_York")


def puts(emulator: ZocdocEmulator) -> list[str]:
    return [path for method, path in emulator.log if method == "PUT" and path.endswith("/calendar/timeslots")]


async def main(clinicians: int, horizon: int) -> None:
    configure("warning", json_logs=False)
    workdir = Path(tempfile.mkdtemp(prefix="sb-publish-"))
    emulator = ZocdocEmulator(client_id="bench", client_secret="bench-secret", consistency_delay=0.0)
    server = running(emulator)
    os.environ["ZD_BENCH_SECRET"] = "bench-secret"
    keys = [f"dr_{i:02d}" for i in range(clinicians)]
    for k in keys:
        emulator.add_provider(f"pr_{k}", f"lo_{k}")
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": "America/New_York"},
        "store": {"path": str(workdir / "store.db")},
        "clinicians": {k: {"accounts": {"zocdoc": {"provider_id": f"pr_{k}", "location_id": f"lo_{k}"}}} for k in keys},
        "connectors": {"zocdoc": {"type": "zocdoc", "environment": "sandbox", "base_url": server.base_url,
                                  "token_url": server.token_url, "client_id": "bench", "client_secret": {"env": "ZD_BENCH_SECRET"}}},
        "availability": {"horizon_days": horizon, "minimum_notice_hours": 0},
    }))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    now = datetime.now(UTC)
    engine = Engine(store, connectors, cfg, clock=lambda: now)
    publisher = Publisher(store, connectors, cfg, clock=lambda: now)
    first_day = now.astimezone(NY).date() + timedelta(days=1)
    booked: list[str] = []
    for n, k in enumerate(keys):  # three sessions every weekday, staggered per clinician
        for d in range(horizon):
            day = first_day + timedelta(days=d)
            if day.weekday() >= 5:
                continue
            for hour in (9 + n % 3, 13, 15):
                start = datetime(day.year, day.month, day.day, hour, tzinfo=NY)
                appt = new_canonical_id()
                engine.change(appt, empty_snapshot() | {
                    "clinician": k, "client_key": f"c{n}-{d}-{hour}", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                    "timezone": "America/New_York", "service_code": "90834",
                }, via="ehr", kind="booked")
                booked.append(appt)

    t0 = time.perf_counter()
    first = await publisher.publish()
    t_first = time.perf_counter() - t0
    initial_puts = len(puts(emulator))
    emulator.log.clear()

    t0 = time.perf_counter()
    idle = await publisher.publish()
    t_idle = time.perf_counter() - t0
    idle_puts = len(puts(emulator))

    victim = booked[len(booked) // 2]
    record = store.appointment(victim)
    assert record is not None
    cancellation = {"by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(now), "via": "calendar"}
    engine.change(victim, record.fields | {"status": "cancelled", "cancellation": cancellation}, via="calendar", kind="cancelled")
    emulator.log.clear()
    t0 = time.perf_counter()
    after = await publisher.publish()
    t_after = time.perf_counter() - t0
    after_puts = puts(emulator)
    local = record.start.astimezone(NY)
    print(f"clinicians={clinicians} horizon={horizon} days sessions={len(booked)}")
    print(f"first publish : {first.published} dates, {initial_puts} PUTs, {t_first:.2f}s")
    print(f"no change     : {idle.published} dates, {idle_puts} PUTs, {t_idle:.2f}s ({idle.days_checked} dates checked)")
    print(f"one cancel    : {after.published} dates, {len(after_puts)} PUTs, {t_after:.2f}s -> {after_puts} "
          f"(cancelled session {record.fields['clinician']} {local:%a %Y-%m-%d %H:%M})")
    day = store.audit_entries(kind="availability_published", limit=1)[0]["detail"]["day"]
    met = len(after_puts) == 1 and day == local.date().isoformat()
    print(f"goal (exactly one PUT, for the affected date): {'met' if met else 'NOT met'} (published {day})")
    for c in connectors.values():
        await c.close()
    store.close()
    server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clinicians", type=int, default=30)
    ap.add_argument("--horizon", type=int, default=21)
    args = ap.parse_args()
    asyncio.run(main(args.clinicians, args.horizon))
