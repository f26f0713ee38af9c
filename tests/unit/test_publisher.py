"""Publishing availability: only the dates whose slots changed are sent, and a failure is retried."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from syncbridge.config import parse_config
from syncbridge.connector import ApplyResult, BusyInterval, Capabilities, Connector, Link, Observation, PullResult, Slot
from syncbridge.engine import Engine
from syncbridge.errors import RateLimited
from syncbridge.model import Role, Snapshot, empty_snapshot, iso, new_canonical_id
from syncbridge.publisher import Publisher
from syncbridge.store import Store

NOW = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)  # a Monday


class Directory(Connector):
    """Records what a directory would be sent; fails on demand."""

    capabilities = Capabilities(role=Role.CHANNEL, fields=frozenset(), accepts_new=False, publishes_availability=True)
    calls: list[tuple[str, date, int]] = []
    fail_next = 0

    async def pull(self, cursor: str | None) -> PullResult:
        return PullResult([], None, complete=True)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        raise AssertionError("a directory holds only its own bookings")

    async def publish(self, clinician: str, day: date, slots: Sequence[Slot]) -> None:
        if Directory.fail_next:
            Directory.fail_next -= 1
            raise RateLimited("slow down", retry_after=1)
        Directory.calls.append((clinician, day, len(slots)))


class Calendar(Directory):
    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset(), busy_time=True)
    busy_spans: list[BusyInterval] = []

    async def busy(self, start: datetime, end: datetime) -> list[BusyInterval]:
        return list(Calendar.busy_spans)


CLINICIANS = 30


@pytest.fixture
def practice(tmp_path: Path):  # type: ignore[no-untyped-def]
    Directory.calls, Directory.fail_next, Calendar.busy_spans = [], 0, []
    clinicians = "".join(
        f"  c{i}:\n    accounts:\n      directory: {{provider_id: p{i}, location_id: l1}}\n      calendar: {{calendar: c{i}}}\n"
        for i in range(CLINICIANS)
    )
    cfg = parse_config(
        f"store: {{path: {tmp_path / 's.db'}}}\nclinicians:\n{clinicians}"
        "connectors:\n"
        f"  directory: {{type: '{__name__}:Directory'}}\n"
        f"  calendar: {{type: '{__name__}:Calendar'}}\n"
        "availability:\n  horizon_days: 21\n  minimum_notice_hours: 0\n"
    )
    store = Store(cfg.store.path)
    from syncbridge.registry import build_connectors

    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg, clock=lambda: NOW)
    yield engine, Publisher(store, connectors, cfg, clock=lambda: NOW)
    store.close()


def book(engine: Engine, clinician: str, start: datetime) -> str:
    appt = new_canonical_id()
    snap = empty_snapshot() | {
        "clinician": clinician, "client_key": "k", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
        "timezone": "America/New_York", "service_code": "90834",
    }
    engine.change(appt, snap, via="ehr")
    return appt


async def test_one_cancellation_republishes_one_date(practice) -> None:  # type: ignore[no-untyped-def]
    engine, publisher = practice
    tuesday_10 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)  # 10:00 in New York
    appt = book(engine, "c7", tuesday_10)
    first = await publisher.publish()
    assert first.published == CLINICIANS * 21 == len(Directory.calls)
    Directory.calls.clear()
    assert (await publisher.publish()).published == 0  # nothing changed, nothing sent

    cancellation = {"by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(NOW), "via": "calendar"}
    snap = engine.store.appointment(appt).fields | {"status": "cancelled", "cancellation": cancellation}
    engine.change(appt, snap, via="calendar")
    again = await publisher.publish()
    assert again.published == 1
    assert Directory.calls == [("c7", date(2026, 12, 1), 29)]  # the whole day is open again (09:00..16:00 every 15 min)


async def test_busy_time_from_a_calendar_closes_slots(practice) -> None:  # type: ignore[no-untyped-def]
    engine, publisher = practice
    await publisher.publish()
    Directory.calls.clear()
    Calendar.busy_spans = [BusyInterval("c3", datetime(2026, 12, 2, 14, 0, tzinfo=UTC), datetime(2026, 12, 2, 16, 0, tzinfo=UTC))]
    await publisher.refresh_busy()
    await publisher.publish()
    assert [(c, d) for c, d, _ in Directory.calls] == [("c3", date(2026, 12, 2))]
    assert Directory.calls[0][2] < 29


async def test_a_failed_publish_is_tried_again(practice) -> None:  # type: ignore[no-untyped-def]
    engine, publisher = practice
    Directory.fail_next = 5
    report = await publisher.publish()
    assert report.failed == 5 and report.published == CLINICIANS * 21 - 5
    Directory.calls.clear()
    retry = await publisher.publish()
    assert retry.published == 5 and retry.failed == 0
