"""Publishing free slots to Zocdoc: one PUT per changed day holding exactly that day's slots, right across clock changes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import Slot
from syncbridge.errors import PermanentError
from syncbridge.registry import build_connectors
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running

NY = ZoneInfo("America/New_York")
PROVIDER, LOCATION = "pr_slots-1", "lo_slots-1"


@pytest.fixture
def zocdoc() -> Iterator[Any]:
    server = running(ZocdocEmulator(client_id="slots", client_secret="slot-secret", consistency_delay=0.3))
    server.emulator.add_provider(PROVIDER, LOCATION, "America/New_York")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def connector(zocdoc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("ZD_SLOT_SECRET", "slot-secret")
    account = {"provider_id": PROVIDER, "location_id": LOCATION, "visit_reason_ids": ["pc_therapy-50"]}
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": "America/New_York"},
        "store": {"path": str(tmp_path / "slots.db")},
        "clinicians": {"dr_lee": {"accounts": {"zocdoc": account}}, "dr_noloc": {"accounts": {"zocdoc": {"provider_id": "pr_x"}}}},
        "connectors": {"zocdoc": {"type": "zocdoc", "environment": "sandbox", "base_url": zocdoc.base_url, "token_url": zocdoc.token_url,
                                  "client_id": "slots", "client_secret": {"env": "ZD_SLOT_SECRET"}}},
    }))
    yield build_connectors(cfg)["zocdoc"]


def _slots(*starts: datetime, minutes: int = 50) -> list[Slot]:
    return [Slot(s, s + timedelta(minutes=minutes)) for s in starts]


def _at(day: date, hour: int, minute: int = 0, fold: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=NY, fold=fold)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def test_publish_holds_exactly_the_days_slots(zocdoc: Any, connector: Any) -> None:
    """A publish replaces the day's slots; a smaller set removes the rest; an empty set clears the day."""
    day = date(2026, 12, 2)
    await connector.publish("dr_lee", day, _slots(_at(day, 9), _at(day, 10), _at(day, 14)))
    zocdoc.emulator.wait_consistent()
    assert zocdoc.emulator.published(PROVIDER, day) == [_at(day, 9), _at(day, 10), _at(day, 14)]
    await connector.publish("dr_lee", day, _slots(_at(day, 10)))
    zocdoc.emulator.wait_consistent()
    assert zocdoc.emulator.published(PROVIDER, day) == [_at(day, 10)]
    await connector.publish("dr_lee", day, [])
    zocdoc.emulator.wait_consistent()
    assert zocdoc.emulator.published(PROVIDER, day) == []
    assert zocdoc.emulator.log.count(("PUT", f"/v1/providers/{PROVIDER}/calendar/timeslots")) == 3
    assert await connector.client().timeslots(PROVIDER, date(2026, 12, 3)) == []  # another day is untouched
    await connector.close()


async def test_fall_back_day_keeps_offsets(zocdoc: Any, connector: Any) -> None:
    """On 2026-11-01 (EDT -> EST) each slot lands at its own instant; the repeated 1:30 a.m. is not offered twice."""
    day = date(2026, 11, 1)
    first_130 = _at(day, 1, 30, fold=0)  # 05:30Z, still EDT
    second_130 = _at(day, 1, 30, fold=1)  # 06:30Z, already EST: cannot be written as a wall time
    slots = _slots(_at(day, 0, 30), first_130, second_130, _at(day, 9), _at(day, 16))
    await connector.publish("dr_lee", day, slots)
    zocdoc.emulator.wait_consistent()
    published = zocdoc.emulator.published(PROVIDER, day)
    assert [p.astimezone(UTC) for p in published] == [_utc(t) for t in
                                                      ("2026-11-01T04:30", "2026-11-01T05:30", "2026-11-01T14:00", "2026-11-01T21:00")]
    assert [p.utcoffset() for p in published] == [timedelta(hours=h) for h in (-4, -4, -5, -5)]
    wire = await connector.client().timeslots(PROVIDER, day)
    assert [(s["start_time"], s["time_zone"]) for s in wire] == [
        ("2026-11-01T00:30:00", "America/New_York"), ("2026-11-01T01:30:00", "America/New_York"),
        ("2026-11-01T09:00:00", "America/New_York"), ("2026-11-01T16:00:00", "America/New_York")]
    assert all(s["allowed_visit_reason_ids"] == ["pc_therapy-50"] and s["location_id"] == LOCATION for s in wire)
    await connector.close()


async def test_spring_forward_day_keeps_offsets(zocdoc: Any, connector: Any) -> None:
    """On 2026-03-08 (EST -> EDT) slots either side of the missing hour keep their instants."""
    day = date(2026, 3, 8)
    starts = [_at(day, 1, 30), _at(day, 3, 0), _at(day, 9), _at(day, 17)]
    await connector.publish("dr_lee", day, _slots(*starts))
    zocdoc.emulator.wait_consistent()
    published = zocdoc.emulator.published(PROVIDER, day)
    assert [p.astimezone(UTC) for p in published] == [_utc(t) for t in
                                                      ("2026-03-08T06:30", "2026-03-08T07:00", "2026-03-08T13:00", "2026-03-08T21:00")]
    assert [p.utcoffset() for p in published] == [timedelta(hours=h) for h in (-5, -4, -4, -4)]
    await connector.close()


async def test_slots_are_eventually_consistent(zocdoc: Any, connector: Any) -> None:
    """Right after a PUT a GET may still show the old set, as Zocdoc documents; it converges shortly after."""
    day = date(2026, 12, 9)
    zocdoc.emulator.consistency_delay = 1.0
    await connector.publish("dr_lee", day, _slots(_at(day, 11)))
    assert await connector.client().timeslots(PROVIDER, day) == []
    zocdoc.emulator.wait_consistent()
    assert [s["start_time"] for s in await connector.client().timeslots(PROVIDER, day)] == ["2026-12-09T11:00:00"]
    await connector.close()


async def test_bad_publishes_are_refused_by_name(zocdoc: Any, connector: Any) -> None:
    """A missing location, an unknown location or a slot on another date is refused, naming the key or the slot."""
    day = date(2026, 12, 2)
    with pytest.raises(PermanentError, match="location_id"):
        await connector.publish("dr_noloc", day, _slots(_at(day, 9)))
    with pytest.raises(PermanentError, match="not on 2026-12-02"):
        await connector.publish("dr_lee", day, _slots(_at(day + timedelta(days=1), 9)))
    connector.clinicians["dr_lee"] = connector.clinicians["dr_lee"] | {"location_id": "lo_closed"}
    with pytest.raises(PermanentError, match="lo_closed"):
        await connector.publish("dr_lee", day, _slots(_at(day, 9)))
    await connector.close()
