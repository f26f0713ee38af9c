"""Reconciling published slots with what Zocdoc shows: a booking made and cancelled there before syncbridge
wrote anything leaves the slot withdrawn in Zocdoc; seeing the booking (even only as cancelled) makes the
date be read back and rewritten, at the cost of one GET and one PUT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.publisher import Publisher
from syncbridge.registry import build_connectors
from syncbridge.slot_writer import SlotWriter
from syncbridge.store import Store
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running
from tests.contract.suite import next_weekday_at

NY = ZoneInfo("America/New_York")


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("ZD_RC_SECRET", "rc-secret")
    server = running(ZocdocEmulator(client_id="rc", client_secret="rc-secret", consistency_delay=0.0))
    server.emulator.add_provider("pr_lee", "lo_lee", "America/New_York")
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": "America/New_York"},
        "store": {"path": str(tmp_path / "store.db")},
        "clinicians": {"dr_lee": {"accounts": {"zocdoc": {"provider_id": "pr_lee", "location_id": "lo_lee"}}}},
        "connectors": {"zocdoc": {"type": "zocdoc", "environment": "sandbox", "base_url": server.base_url, "token_url": server.token_url,
                                  "client_id": "rc", "client_secret": {"env": "ZD_RC_SECRET"}}},
        "availability": {"horizon_days": 10, "minimum_notice_hours": 0},
    }))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    publisher, writer = Publisher(store, connectors, cfg), SlotWriter(store, connectors, cfg)

    async def converge() -> None:
        publisher.plan()
        while store.slot_due(float("inf"), 1):
            await writer.drain()

    try:
        yield server.emulator, engine, publisher, converge
    finally:
        for c in connectors.values():
            await c.close()
        store.close()
        server.stop()


def timeslot_calls(emulator: ZocdocEmulator, since: int) -> list[str]:
    return [m for m, p in emulator.log[since:] if p.endswith("/calendar/timeslots")]


async def test_booked_and_cancelled_before_any_write_is_offered_again(world: Any) -> None:
    emulator, engine, publisher, converge = world
    await converge()
    start = next_weekday_at(11).astimezone(NY)
    assert start in emulator.published("pr_lee", start.date())
    appt = emulator.book("pr_lee", "lo_lee", start)
    emulator.patient_cancel(appt)  # both before syncbridge looked: it only ever sees a cancelled booking
    assert start not in emulator.published("pr_lee", start.date())
    mark = len(emulator.log)
    publisher.note("zocdoc", await engine.sync("zocdoc"))
    await converge()
    assert start in emulator.published("pr_lee", start.date())
    assert timeslot_calls(emulator, mark) == ["GET", "PUT"]


async def test_reschedule_in_zocdoc_reads_back_both_dates(world: Any) -> None:
    """A booking moved in Zocdoc to another day: the new date is rewritten (its wanted slots changed); the old one,
    whose slot Zocdoc does not offer again, is rewritten once syncbridge's copy moves away from it."""
    emulator, engine, publisher, converge = world
    await converge()
    first = next_weekday_at(10).astimezone(NY)
    later = first + timedelta(days=7)
    appt = emulator.book("pr_lee", "lo_lee", first)
    publisher.note("zocdoc", await engine.sync("zocdoc"))
    await converge()
    emulator.patient_reschedule(appt, later)
    publisher.note("zocdoc", await engine.sync("zocdoc"))
    await converge()
    assert first in emulator.published("pr_lee", first.date())
    assert not [s for s in emulator.published("pr_lee", later.date()) if abs(s - later) < timedelta(minutes=60)]
    assert datetime.now(UTC) < later  # the test's dates stayed in the future
