"""Benchmark: Zocdoc timeslot requests per booking and per cancellation, and republish latency with webhooks.

    .venv/bin/python bench/zocdoc_publish.py --clinicians 30 --horizon 21 --rounds 20

A practice of N clinicians, each with three booked sessions every weekday, runs `syncbridge run`
as a process (the installed package: reinstall it first) against the Zocdoc emulator, which sends
signed webhooks to the daemon. After the start-up look at every date, ``--rounds`` times a client
books an offered slot in Zocdoc, and later cancels it. Timed, from the emulator's side: from the
booking until no offered slot overlaps the session (withdrawn), and from the cancellation until
the slot is offered again (the emulator withdrew it at the booking and never restores it).
Counted from the emulator's request log: timeslot PUTs and GETs from one change until its date
shows exactly the wanted slots. Goal: at most one PUT per affected date plus at most one GET when
reconciling; republish latency p95 under 2 s. Then the daemon is restarted: every date is read
back, and written only where it differs. With ``--put-failures 0.3`` that share of timeslot PUTs
fails during the rounds (half before taking effect, half with the answer lost), and the time for
every date to show its wanted slots once the failures stop is measured.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import secrets
import sys
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syncbridge.config import parse_config  # noqa: E402
from syncbridge.emulation import free_port  # noqa: E402
from syncbridge.engine import Engine  # noqa: E402
from syncbridge.logging import configure  # noqa: E402
from syncbridge.model import empty_snapshot, iso, new_canonical_id  # noqa: E402
from syncbridge.publisher import decode_slots  # noqa: E402
from syncbridge.registry import build_connectors  # noqa: E402
from syncbridge.store import Store  # noqa: E402
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running  # noqa: E402
from syncbridge_connectors.zocdoc.webhooks import WEBHOOK_PATH  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402

ZONE = "America/New_York"
NY = ZoneInfo(ZONE)
OVERLAP = timedelta(minutes=60)  # a 50-minute session plus the 10-minute buffer after it


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def until(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    raise SystemExit(f"not within {timeout} s: {what}")


class Bench:
    def __init__(self, workdir: Path, emulator: ZocdocEmulator) -> None:
        self.workdir, self.emulator = workdir, emulator

    def timeslot_calls(self, since: int) -> tuple[int, int]:
        calls = [m for m, p in self.emulator.log[since:] if p.endswith("/calendar/timeslots")]
        return calls.count("PUT"), calls.count("GET")

    def settled(self, clinician: str | None = None, day: date | None = None) -> bool:
        """Every date (or one) shows exactly the wanted slots, and nothing waits for a write or a look."""
        store = Store(self.workdir / "store.db")
        try:
            states = [s for s in store.slot_states("zocdoc")
                      if clinician is None or (s.clinician == clinician and day is not None and s.day == day.isoformat())]
            return bool(states) and all(
                s.due_at is None and sorted(x.start for x in decode_slots(s.slots, NY))
                == self.emulator.published(f"pr_{s.clinician}", date.fromisoformat(s.day)) for s in states)
        finally:
            store.close()


def main(clinicians: int, horizon: int, rounds: int, seed: int, put_failures: float) -> None:
    configure("warning", json_logs=False)
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="sb-zocdoc-slots-"))
    emulator = ZocdocEmulator(client_id="bench", client_secret="bench-secret", seed=seed)
    server = running(emulator)
    keys = [f"dr_{i:02d}" for i in range(clinicians)]
    for k in keys:
        emulator.add_provider(f"pr_{k}", f"lo_{k}", ZONE)
    (workdir / "secret").write_text("bench-secret")
    hook = base64.b64encode(secrets.token_bytes(32)).decode()
    (workdir / "hook").write_text(hook)
    port = free_port()
    conf = {
        "practice": {"timezone": ZONE},
        "store": {"path": str(workdir / "store.db")},
        "http": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
        "logging": {"level": "warning"},
        "clinicians": {k: {"accounts": {"zocdoc": {"provider_id": f"pr_{k}", "location_id": f"lo_{k}"}}} for k in keys},
        "connectors": {"zocdoc": {"type": "zocdoc", "environment": "sandbox", "base_url": server.base_url, "token_url": server.token_url,
                                  "client_id": "bench", "client_secret": {"file": str(workdir / "secret")},
                                  "webhook_secret": {"file": str(workdir / "hook")}, "poll_interval": 600}},
        "availability": {"horizon_days": horizon, "minimum_notice_hours": 0},
    }
    # three sessions every weekday per clinician, booked in the record before the daemon starts
    cfg = parse_config(__import__("yaml").safe_dump(conf))
    store = Store(cfg.store.path)
    engine = Engine(store, build_connectors(cfg), cfg)
    first = datetime.now(NY).date() + timedelta(days=1)
    for n, k in enumerate(keys):
        for d in range(horizon - 1):
            day = first + timedelta(days=d)
            if day.weekday() >= 5:
                continue
            for hour in (9 + n % 3, 13, 15):
                start = datetime(day.year, day.month, day.day, hour, tzinfo=NY)
                engine.change(new_canonical_id(), empty_snapshot() | {
                    "clinician": k, "client_key": f"c{n}-{d}-{hour}", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                    "timezone": ZONE, "service_code": "90834"}, via="ehr", kind="booked")
    store.close()

    bench = Bench(workdir, emulator)
    started = time.monotonic()
    daemon = DaemonProcess(workdir, conf)
    emulator.sender.register(f"{daemon.url}/webhooks/zocdoc{WEBHOOK_PATH}", hook)
    try:
        until(bench.settled, 300, "the start-up publish")
        start_puts, start_gets = bench.timeslot_calls(0)
        print(f"clinicians={clinicians} horizon={horizon} days: start-up look and publish {time.monotonic() - started:.1f} s, "
              f"{start_gets} GETs, {start_puts} PUTs")
        withdraw, restore, per_booking, per_cancel = [], [], [], []
        emulator.timeslot_put_failures = put_failures
        for _ in range(rounds):
            clinician = rng.choice(keys)
            day = first + timedelta(days=rng.randrange(horizon - 1))
            offered = emulator.published(f"pr_{clinician}", day)
            if not offered:
                continue
            start = rng.choice(offered)
            mark = len(emulator.log)
            appt = emulator.book(f"pr_{clinician}", f"lo_{clinician}", start)
            withdraw.append(until(lambda c=clinician, d=day, s=start: not [
                x for x in emulator.published(f"pr_{c}", d) if abs(x - s) < OVERLAP], 30, "withdrawn"))
            until(lambda c=clinician, d=day: bench.settled(c, d), 30, "the booked date settled")
            time.sleep(0.5)  # anything later would have been counted
            per_booking.append(bench.timeslot_calls(mark))
            mark = len(emulator.log)
            emulator.patient_cancel(appt)
            restore.append(until(lambda c=clinician, d=day, s=start: s in emulator.published(f"pr_{c}", d), 30, "offered again"))
            until(lambda c=clinician, d=day: bench.settled(c, d), 30, "the cancelled date settled")
            time.sleep(0.5)
            per_cancel.append(bench.timeslot_calls(mark))
        for label, times, calls in (("booking", withdraw, per_booking), ("cancellation", restore, per_cancel)):
            puts, gets = [p for p, _ in calls], [g for _, g in calls]
            print(f"per {label:12s}: PUTs max {max(puts)} mean {sum(puts) / len(puts):.2f}, "
                  f"GETs max {max(gets)} mean {sum(gets) / len(gets):.2f}; "
                  f"republished p50 {pct(times, 0.5):.2f} s, p95 {pct(times, 0.95):.2f} s, max {max(times):.2f} s ({len(times)} rounds)")
        met = all(p <= 1 and g <= 1 for p, g in per_booking + per_cancel) and pct(withdraw + restore, 0.95) < 2
        print(f"goal (<= 1 PUT per affected date plus <= 1 GET; p95 < 2 s): {'met' if met else 'NOT met'}")
        if put_failures:
            emulator.timeslot_put_failures = 0.0
            print(f"PUTs failed: {emulator.put_failures}; every date as wanted {until(bench.settled, 120, 'converged'):.2f} s "
                  "after the failures stopped")
        daemon.stop()
        mark = len(emulator.log)
        restarted = time.monotonic()
        daemon = DaemonProcess(workdir, conf)
        emulator.sender.register(f"{daemon.url}/webhooks/zocdoc{WEBHOOK_PATH}", hook)
        until(lambda: bench.timeslot_calls(mark)[1] >= clinicians * horizon and bench.settled(), 300, "the restart look")
        puts, gets = bench.timeslot_calls(mark)
        print(f"restart: every date looked at in {time.monotonic() - restarted:.1f} s (daemon start included), {gets} GETs, {puts} PUTs")
    finally:
        daemon.stop()
        server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clinicians", type=int, default=30)
    ap.add_argument("--horizon", type=int, default=21)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--put-failures", type=float, default=0.0, help="share of timeslot PUTs failing during the rounds")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main(args.clinicians, args.horizon, args.rounds, args.seed, args.put_failures)
