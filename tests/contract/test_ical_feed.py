"""The read-only EHR feed: the contract suite, and the worklist a cancellation elsewhere produces."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.model import iso
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.ical_feed.emulator import FeedEmulator
from tests.contract.suite import CLINICIAN, ConnectorContract, Harness, Vendor
from tests.support.replica import ReplicaVendor


def ics(events: dict[str, dict[str, Any]]) -> bytes:
    """An EHR-style export: client names in titles, which syncbridge must never keep."""
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//Example EHR//Feed//EN"]
    for uid, e in events.items():
        lines += [
            "BEGIN:VEVENT", f"UID:{uid}", "DTSTAMP:20261101T000000Z",
            f"DTSTART:{e['start'].astimezone(UTC):%Y%m%dT%H%M%SZ}", f"DTEND:{e['end'].astimezone(UTC):%Y%m%dT%H%M%SZ}",
            f"SUMMARY:{e.get('title', 'Appointment with Jane Doe')}",
        ]
        if e.get("status"):
            lines.append(f"STATUS:{e['status']}")
        if e.get("rrule"):
            lines.append(f"RRULE:{e['rrule']}")
        lines.append("END:VEVENT")
    lines.append("END:VCALENDAR")
    return ("\r\n".join(lines) + "\r\n").encode()


class FeedVendor(Vendor):
    """The EHR's front desk, seen through its export."""

    def __init__(self, emulator: FeedEmulator, url: str) -> None:
        self.emulator, self.url = emulator, url
        self.events: dict[str, dict[str, Any]] = {}

    def _publish(self) -> None:
        self.emulator.publish(self.url, ics(self.events))

    async def live(self) -> list[dict[str, Any]]:
        return [{"external_id": k, "start": e["start"], "end": e["end"]} for k, e in self.events.items() if not e.get("status")]

    async def move(self, external_id: str, start: datetime, end: datetime) -> None:
        self.events[external_id] |= {"start": start, "end": end}
        self._publish()

    async def delete(self, external_id: str) -> None:
        del self.events[external_id]
        self._publish()

    async def retitle(self, external_id: str, title: str) -> None:
        self.events[external_id]["title"] = title
        self._publish()

    async def invalidate_cursor(self) -> None:
        return None  # a feed has no cursor to expire: every read is a full snapshot

    async def book(self, start: datetime, end: datetime, client_key: str) -> str:
        uid = f"ehr-{len(self.events) + 1}@example-ehr"
        self.events[uid] = {"start": start, "end": end}
        self._publish()
        return uid


@pytest.fixture(scope="module")
def emulator() -> Iterator[FeedEmulator]:
    emu = FeedEmulator().start()
    yield emu
    emu.stop()


class TestICalFeed(ConnectorContract):
    @pytest.fixture
    def harness(self, emulator: FeedEmulator, monkeypatch: pytest.MonkeyPatch) -> Harness:
        url = emulator.new_feed(ics({}))
        monkeypatch.setenv("SB_FEED_URL", url)
        return Harness({"type": "ical_feed"}, {"feed": {"env": "SB_FEED_URL"}}, FeedVendor(emulator, url))


@pytest.fixture
def practice(tmp_path: Path, emulator: FeedEmulator, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    url = emulator.new_feed(ics({}))
    monkeypatch.setenv("SB_FEED_URL", url)
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {CLINICIAN: {"display_name": "Dr. Rivera", "accounts": {"ehr": {"feed": {"env": "SB_FEED_URL"}}, "cal": {}}}},
        "connectors": {
            "ehr": {"type": "ical_feed"},
            "cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "cal.db")},
        },
    }))
    engine = Engine(Store(cfg.store.path), build_connectors(cfg), cfg)
    return engine, FeedVendor(emulator, url), ReplicaVendor(str(tmp_path / "cal.db"))


async def test_cancel_in_calendar_gives_one_worklist_item_closed_by_the_feed(practice) -> None:  # type: ignore[no-untyped-def]
    """A session deleted in the calendar becomes exactly one front-desk instruction, closed when the EHR shows it."""
    engine, ehr, cal = practice
    start = (datetime.now(UTC) + timedelta(hours=5)).replace(minute=0, second=0, microsecond=0)
    uid = await ehr.book(start, start + timedelta(minutes=50), "ignored")
    await engine.sync("ehr")
    await Outbox(engine).drain()
    (appt,) = engine.store.appointments()
    await engine.sync("cal")
    await cal.delete(engine.store.link("cal", appt.id).external_id)
    await engine.sync("cal")
    assert engine.store.appointment(appt.id).fields["cancellation"]["kind"] == "late_cancel"
    for _ in range(3):  # repeated pulls and drains never add a second item
        await engine.sync("ehr")
        await Outbox(engine).drain()
    (item,) = engine.store.worklist()
    assert item.kind == "manual_update" and item.connector == "ehr"
    assert item.instruction.startswith("In the EHR, mark the ") and "session of Dr. Rivera on " in item.instruction
    assert "as Late Cancel and post the late-cancel fee as self-pay before claims are submitted." in item.instruction
    assert engine.store.dead_letters() == []
    # the front desk marks it in the EHR; its export now shows the session cancelled
    ehr.events[uid] |= {"status": "CANCELLED", "title": "Late Cancel: Jane Doe"}
    ehr._publish()
    await engine.sync("ehr")
    assert engine.store.worklist() == []
    closed = engine.store.worklist(include_closed=True)
    assert len(closed) == 1 and closed[0].closed_at
    assert b"Jane Doe" not in Path(engine.store.path).read_bytes()


async def test_weekly_series_has_stable_occurrence_ids(practice) -> None:  # type: ignore[no-untyped-def]
    """A weekly series in the feed becomes one session per week, each keeping its id when another moves."""
    engine, ehr, _ = practice
    start = (datetime.now(UTC) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
    ehr.events["series-1@ehr"] = {"start": start, "end": start + timedelta(minutes=50), "rrule": "FREQ=WEEKLY;COUNT=4"}
    ehr._publish()
    await engine.sync("ehr")
    links = sorted(lk.external_id for lk in engine.store.links_of("ehr"))
    assert links == sorted(f"series-1@ehr|{iso(start + timedelta(weeks=w))}" for w in range(4))
    assert engine.store.conn.execute("SELECT COUNT(*) FROM appointments").fetchone()[0] == 4
