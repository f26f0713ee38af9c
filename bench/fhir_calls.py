"""FHIR requests per cancellation (claim suppression, verification included) and the hourly cost of
finding Appointments deleted in the EHR, counted from the FHIR emulator's request counter.

Runs the real connector with the engine, store and outbox of syncbridge against the emulator in
two profiles: the least an R4 server offers (no ``_revinclude``, no ``/metadata``) and the full one.
Every session is billed the way billing staff do it (an Encounter, a ChargeItem, a draft Claim),
or has no Encounter yet. Prints Markdown tables; nothing is asserted.

    .venv/bin/python bench/fhir_calls.py [--cancels 40] [--clinicians 30] [--weekly 25] [--weeks 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.logging import configure
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.fhir.emulator import FHIREmulator, running

ZONE = "America/New_York"
NAME = "ehr"
TOKEN = "bench-token"


class Practice:
    def __init__(self, tmp: Path, server: Any, clinicians: int) -> None:
        os.environ["SB_BENCH_FHIR"] = TOKEN
        self.keys = [f"dr_{n:02d}" for n in range(clinicians)]
        for key in self.keys:
            server.emulator.put({"resourceType": "Practitioner", "id": f"pr-{key.replace('_', '-')}"})
        cfg = parse_config(yaml.safe_dump({
            "practice": {"timezone": ZONE},
            "store": {"path": str(tmp / "bench.db")},
            "clinicians": {k: {"accounts": {NAME: {"practitioner": f"Practitioner/pr-{k.replace('_', '-')}"}}} for k in self.keys},
            "connectors": {NAME: {"type": "fhir", "base_url": server.base_url, "auth": "static", "token": {"env": "SB_BENCH_FHIR"}}},
        }))
        self.server = server
        self.store = Store(cfg.store.path)
        self.connectors = build_connectors(cfg)
        self.engine = Engine(self.store, self.connectors, cfg)
        self.outbox = Outbox(self.engine)
        self.connector = self.connectors[NAME]

    def book(self, clinician: str, start: datetime) -> str:
        appt = new_canonical_id()
        self.engine.change(appt, empty_snapshot() | {
            "clinician": clinician, "client_key": "c" + appt[-8:], "start": iso(start), "end": iso(start + timedelta(minutes=50)),
            "timezone": ZONE, "service_code": "90837", "location": "Room 1",
        }, via="front-desk")
        return appt

    def bill(self, appt: str) -> None:
        ext = self.store.link(NAME, appt).external_id
        e = self.server.emulator
        enc = e.put({"resourceType": "Encounter", "status": "planned", "appointment": [{"reference": f"Appointment/{ext}"}]})
        ref = {"reference": f"Encounter/{enc['id']}"}
        e.put({"resourceType": "ChargeItem", "status": "billable", "context": ref})
        e.put({"resourceType": "Claim", "status": "draft", "use": "claim", "item": [{"sequence": 1, "encounter": [ref]}]})

    def cancel(self, appt: str) -> None:
        snap = dict(self.store.appointment(appt).fields)
        record = {"by": "clinician", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)), "via": "bench"}
        self.engine.change(appt, snap | {"status": "cancelled", "cancellation": record}, via="bench")

    async def close(self) -> None:
        for c in self.connectors.values():
            await c.close()
        self.store.close()


async def cancellations(profile: str, count: int, billed: bool) -> tuple[float, float, str]:
    """(requests per cancellation, ms per cancellation, billing states) for ``count`` sessions cancelled one by one."""
    emulator = FHIREmulator(static_token=TOKEN)
    if profile == "full":
        emulator.full()
    server = running(emulator)
    with tempfile.TemporaryDirectory() as tmp:
        practice = Practice(Path(tmp), server, 3)
        try:
            start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)
            appts = [practice.book(practice.keys[n % 3], start + timedelta(hours=n)) for n in range(count)]
            await practice.outbox.drain()
            if billed:
                for a in appts:
                    practice.bill(a)
            await practice.connector.maintain()  # the daemon works out billing discovery at start
            server.injector.reset_counts()
            began = time.perf_counter()
            for a in appts:
                practice.cancel(a)
                await practice.outbox.drain()
            took = time.perf_counter() - began
            requests = server.injector.requests
            await practice.engine.sync(NAME)
            states = sorted({practice.store.appointment(a).fields["billing"] for a in appts})
            live = sum(1 for c in emulator.all("ChargeItem") if c["status"] == "billable") + sum(1 for c in emulator.all("Claim") if c["status"] == "draft")
            return requests / count, took * 1000 / count, f"{', '.join(states)}; {live} live in the EHR"
        finally:
            await practice.close()
            server.stop()


async def presence(clinicians: int, weekly: int, weeks: int) -> tuple[int, int, float, int]:
    """(linked live sessions, requests per check, ms per check, requests per hour at the default interval)."""
    server = running(FHIREmulator(static_token=TOKEN))
    with tempfile.TemporaryDirectory() as tmp:
        practice = Practice(Path(tmp), server, clinicians)
        try:
            monday = datetime.now(UTC).replace(hour=13, minute=0, second=0, microsecond=0) + timedelta(days=1)
            for w in range(weeks):
                for c in practice.keys:
                    for n in range(weekly):
                        practice.book(c, monday + timedelta(days=7 * w + n // 5, hours=n % 5))
            await practice.outbox.drain()
            linked = practice.store.linked_live(NAME, iso(datetime.now(UTC) - timedelta(days=1)))
            server.injector.reset_counts()
            began = time.perf_counter()
            gone = await practice.connector.missing(linked)
            took = time.perf_counter() - began
            assert not gone
            per_check = server.injector.requests
            per_hour = per_check * int(3600 / practice.connector.presence_interval)
            return len(linked), per_check, took * 1000, per_hour
        finally:
            await practice.close()
            server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cancels", type=int, default=40)
    parser.add_argument("--clinicians", type=int, default=30)
    parser.add_argument("--weekly", type=int, default=25)
    parser.add_argument("--weeks", type=int, default=8)
    args = parser.parse_args()
    configure("warning", json_logs=True)
    print("| EHR profile | session | FHIR requests per cancellation | ms per cancellation | billing afterwards |")
    print("| --- | --- | --- | --- | --- |")
    for profile in ("least", "full"):
        for billed in (True, False):
            per, ms, states = await cancellations(profile, args.cancels, billed)
            what = "Encounter + ChargeItem + draft Claim" if billed else "no Encounter yet"
            print(f"| {profile} | {what} | {per:.2f} | {ms:.1f} | {states} |")
    sessions, per_check, ms, per_hour = await presence(args.clinicians, args.weekly, args.weeks)
    print()
    print("| clinicians | live linked sessions | requests per check | ms per check | requests per hour (every 180 s) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {args.clinicians} | {sessions} | {per_check} | {ms:.0f} | {per_hour} |")


if __name__ == "__main__":
    asyncio.run(main())
