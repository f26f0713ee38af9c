"""Self-scheduling rules: services bookable online with their own lengths, office and telehealth hours,
intake slots for new clients under a weekly cap; validated in the config, published to Zocdoc as set."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from syncbridge.config import AvailabilityRules, parse_config
from syncbridge.engine import Engine
from syncbridge.errors import ConfigError
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.policy.availability import Session, day_slots
from syncbridge.publisher import Publisher
from syncbridge.registry import build_connectors
from syncbridge.slot_writer import SlotWriter
from syncbridge.store import Store
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running

NY = ZoneInfo("America/New_York")
MONDAY = date(2026, 12, 7)
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)
SERVICES = {"90791": {"minutes": 60, "intake": True}, "90834": {"minutes": 45}}
#: 90837 has a Zocdoc visit reason, but is not bookable online
REASONS = {"pc_intake": {"minutes": 60, "service_code": "90791"}, "pc_45": {"minutes": 45, "service_code": "90834"},
           "pc_60": {"minutes": 60, "service_code": "90837"}}


def at(day: date, hh: int, mm: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, tzinfo=NY)


def rules(**over: Any) -> AvailabilityRules:
    return AvailabilityRules.model_validate({"working_hours": {"mon": ["09:00-11:00"], "wed": ["09:00-11:00"]}, "minimum_notice_hours": 0,
                                             "max_consecutive_intensive": None, "online_services": SERVICES} | over)


def test_each_service_is_offered_where_its_own_length_fits() -> None:
    """A 45-minute service is offered later in a span than a 60-minute intake; new and existing clients get their own slots."""
    slots = day_slots(MONDAY, NY, rules(), [], [], LONG_AGO)
    new = [s.start.strftime("%H:%M") for s in slots if s.clients == "new"]
    existing = [s.start.strftime("%H:%M") for s in slots if s.clients == "existing"]
    assert new == ["09:00", "09:15", "09:30", "09:45", "10:00"] and all(s.services == ("90791",) for s in slots if s.clients == "new")
    assert existing == new + ["10:15"] and all(s.services == ("90834",) for s in slots if s.clients == "existing")
    assert {s.modality for s in slots} == {None}


def test_office_and_telehealth_hours_give_their_modality() -> None:
    """Working hours are the office once telehealth hours are set; each span's slots carry its modality."""
    slots = day_slots(MONDAY, NY, rules(online_services={}, telehealth_hours={"mon": ["17:00-19:00"]}), [], [], LONG_AGO)
    office = {s.start.hour for s in slots if s.modality == "in_person"}
    video = {s.start.hour for s in slots if s.modality == "telehealth"}
    assert office == {9, 10} and video == {17, 18}


def test_weekly_cap_on_new_clients_stops_intake_slots() -> None:
    """With one intake already booked on Monday and a cap of one, Wednesday offers no intake; the next week does."""
    capped = rules(new_client_weekly_cap=1)
    intake = [Session(at(MONDAY, 9), at(MONDAY, 10), service_code="90791")]
    wednesday, next_wednesday = MONDAY + timedelta(days=2), MONDAY + timedelta(days=9)
    assert {s.clients for s in day_slots(wednesday, NY, capped, [], [], LONG_AGO)} == {"new", "existing"}
    assert {s.clients for s in day_slots(wednesday, NY, capped, intake, [], LONG_AGO)} == {"existing"}
    assert {s.clients for s in day_slots(next_wednesday, NY, capped, intake, [], LONG_AGO)} == {"new", "existing"}


def test_rules_that_cannot_work_are_refused_by_key(tmp_path: Path) -> None:
    """A cap with no intake service, a service Zocdoc has no visit reason for, telehealth without a virtual location: refused, naming the key."""
    with pytest.raises(ConfigError, match="mark at least one of online_services as intake"):
        parse_config(yaml.safe_dump({"availability": {"new_client_weekly_cap": 2, "online_services": {"90834": {"minutes": 45}}}}))
    base = _config(tmp_path, "http://127.0.0.1:9", reasons={"pc_45": REASONS["pc_45"]})
    with pytest.raises(ConfigError, match="connectors.zocdoc.visit_reasons: service 90791 is bookable online for dr_lee"):
        build_connectors(parse_config(yaml.safe_dump(base)))
    base = _config(tmp_path, "http://127.0.0.1:9", virtual=False)
    with pytest.raises(ConfigError, match="clinicians.dr_lee.accounts.zocdoc.virtual_location_id"):
        build_connectors(parse_config(yaml.safe_dump(base)))


def _config(tmp: Path, base_url: str, *, reasons: dict[str, Any] = REASONS, virtual: bool = True) -> dict[str, Any]:
    account = {"provider_id": "pr_lee", "location_id": "lo_office"} | ({"virtual_location_id": "lo_video"} if virtual else {})
    return {
        "practice": {"timezone": "America/New_York"},
        "store": {"path": str(tmp / "store.db")},
        "clinicians": {"dr_lee": {"accounts": {"zocdoc": account}, "availability": {
            "working_hours": {"mon": ["09:00-11:00"]}, "telehealth_hours": {"mon": ["17:00-18:30"]},
            "online_services": SERVICES, "new_client_weekly_cap": 1}}},
        "connectors": {"zocdoc": {"type": "zocdoc", "environment": "sandbox", "base_url": base_url, "token_url": base_url + "/oauth/token",
                                  "client_id": "ss", "client_secret": {"env": "ZD_SS_SECRET"}, "visit_reasons": reasons}},
        "availability": {"horizon_days": 14, "minimum_notice_hours": 0, "max_consecutive_intensive": None},
    }


@pytest.fixture
def zocdoc(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("ZD_SS_SECRET", "ss-secret")
    server = running(ZocdocEmulator(client_id="ss", client_secret="ss-secret", consistency_delay=0.0))
    server.emulator.add_provider("pr_lee", "lo_office", "America/New_York")
    server.emulator.add_location("pr_lee", "lo_video")
    try:
        yield server
    finally:
        server.stop()


async def test_published_to_the_right_locations_for_the_right_clients(zocdoc: Any, tmp_path: Path) -> None:
    """Office hours go to the office location, telehealth hours to the virtual one; intake slots are for new patients
    with the intake visit reason; a service not bookable online never appears; the intake cap withdraws intake slots."""
    cfg = parse_config(yaml.safe_dump(_config(tmp_path, zocdoc.base_url)))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    now = datetime(2026, 12, 4, 12, tzinfo=UTC)  # a Friday: the next two Mondays are in the horizon
    publisher, writer = Publisher(store, connectors, cfg, clock=lambda: now), SlotWriter(store, connectors, cfg)
    publisher.plan()
    while store.slot_due(float("inf"), 1):
        await writer.drain()
    shown = zocdoc.emulator.published_slots("pr_lee", MONDAY)
    by_place = {(s["location_id"], s["start_time"][11:16], s.get("patient_type")): s["allowed_visit_reason_ids"] for s in shown}
    assert by_place[("lo_office", "09:00", "new")] == ["pc_intake"] and by_place[("lo_office", "10:15", "existing")] == ["pc_45"]
    assert by_place[("lo_video", "17:00", "new")] == ["pc_intake"] and ("lo_video", "17:45", "existing") in by_place
    assert not [s for s in shown if s["location_id"] == "lo_video" and s["start_time"][11:13] < "17"]
    assert not [s for s in shown if "pc_60" in s["allowed_visit_reason_ids"]]  # 90837 is not bookable online

    engine = Engine(store, connectors, cfg, clock=lambda: now)
    appt = new_canonical_id()  # the week's one new client books an intake in the EHR
    engine.change(appt, empty_snapshot() | {"clinician": "dr_lee", "client_key": "k", "start": iso(at(MONDAY, 9)),
                                            "end": iso(at(MONDAY, 10)), "timezone": "America/New_York", "service_code": "90791"}, via="ehr")
    publisher.note_everything()
    publisher.plan()
    while store.slot_due(float("inf"), 1):
        await writer.drain()
    assert {s.get("patient_type") for s in zocdoc.emulator.published_slots("pr_lee", MONDAY)} == {"existing"}
    assert "new" in {s.get("patient_type") for s in zocdoc.emulator.published_slots("pr_lee", MONDAY + timedelta(days=7))}

    puts = sum(1 for m, p in zocdoc.emulator.log if m == "PUT")
    publisher.note_everything(look=True)  # a look finds Zocdoc showing exactly what is wanted: nothing rewritten
    publisher.plan()
    while store.slot_due(float("inf"), 1):
        await writer.drain()
    assert sum(1 for m, p in zocdoc.emulator.log if m == "PUT") == puts
    for c in connectors.values():
        await c.close()
    store.close()
