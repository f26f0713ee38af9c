"""Busy time from a clinician's own CalDAV events, against real servers started by the tests.

The expected intervals are computed here with zoneinfo, independently of the connector's
expansion, so a DST mistake on either side shows up as a difference of one hour.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.model import empty_snapshot, iso
from syncbridge.registry import build_connectors
from syncbridge_connectors.caldav.connector import CalDAVConnector
from tests.servers import PASSWORD, DavServer, radicale_server, xandikos_server  # noqa: F401

NY = ZoneInfo("America/New_York")
CHICAGO = ZoneInfo("America/Chicago")
SECRET_ENV = "SYNCBRIDGE_TEST_CALDAV_PASSWORD"
pytestmark = pytest.mark.slow


@pytest.fixture(params=["radicale", "xandikos"])
def server(request: pytest.FixtureRequest) -> DavServer:
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
async def calendar(
    server: DavServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[tuple[CalDAVConnector, DavServer, str]]:
    """A fresh calendar of a clinician working in Chicago, and a connector reading it."""
    monkeypatch.setenv(SECRET_ENV, PASSWORD)
    url = server.make_calendar()
    options: dict[str, Any] = {"type": "caldav", "url": server.base_url + "/", "horizon_days": 400}
    if server.username:
        options |= {"username": server.username, "password": {"env": SECRET_ENV}}
    cfg = parse_config(
        yaml.safe_dump(
            {
                "practice": {"timezone": "America/New_York"},
                "store": {"path": str(tmp_path / "busy.db")},
                "clinicians": {"dr_rivera": {"timezone": "America/Chicago", "accounts": {"cal": {"calendar": url}}}},
                "connectors": {"cal": options},
            }
        )
    )
    connector = build_connectors(cfg)["cal"]
    assert isinstance(connector, CalDAVConnector)
    try:
        yield connector, server, url
    finally:
        await connector.close()
        server.delete_calendar(url)


def put(server: DavServer, calendar_url: str, *events: icalendar.Event) -> None:
    """Store one calendar object (a series and its overrides travel together), as an app would."""
    cal = icalendar.Calendar()
    cal.add("prodid", "-//Example Corp.//Calendar App//EN")
    cal.add("version", "2.0")
    for event in events:
        cal.add_component(event)
    cal.add_missing_timezones(first_date=date(2025, 1, 1), last_date=date(2028, 1, 1))
    with server.http() as http:
        r = http.put(f"{calendar_url}{uuid.uuid4()}.ics", content=cal.to_ical(), headers={"Content-Type": "text/calendar"})
        r.raise_for_status()


def vevent(start: Any, end: Any, title: str = "Private", uid: str | None = None, **props: Any) -> icalendar.Event:
    event = icalendar.Event()
    event.add("uid", uid or str(uuid.uuid4()))
    event.add("dtstamp", datetime(2026, 1, 1, tzinfo=UTC))
    event.add("dtstart", start)
    event.add("dtend", end)
    event.add("summary", title)
    for name, value in props.items():
        event.add(name.replace("_", "-"), value)
    return event


def local(day: date, hour: int, zone: ZoneInfo = NY) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=zone)


async def test_weekly_series_across_both_dst_changes(calendar: tuple[CalDAVConnector, DavServer, str]) -> None:
    """A weekly 10:00 New York commitment blocks 10:00 local all year: moved and skipped weeks included."""
    connector, server, url = calendar
    first = date(2026, 2, 23)  # a Monday, two weeks before DST starts (March 8)
    skipped = date(2026, 3, 16)
    moved_from = date(2026, 11, 9)  # the week after DST ends (November 1)
    moved_to = (local(date(2026, 11, 10), 14), local(date(2026, 11, 10), 15))
    uid = str(uuid.uuid4())
    # UNTIL in UTC, as RFC 5545 3.3.10 requires when DTSTART has a TZID
    until = local(date(2026, 11, 30), 10).astimezone(UTC)
    master = vevent(local(first, 10), local(first, 11), "Supervision", uid=uid, rrule={"FREQ": "WEEKLY", "UNTIL": until})
    master.add("exdate", local(skipped, 10))
    override = vevent(*moved_to, "Supervision (moved)", uid=uid)
    override.add("recurrence-id", local(moved_from, 10))
    put(server, url, master, override)

    busy = await connector.busy(datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 12, 15, tzinfo=UTC))

    mondays = [first + timedelta(weeks=i) for i in range(41)]
    expected = [(local(d, 10), local(d, 11)) for d in mondays if d not in (skipped, moved_from)] + [moved_to]
    assert sorted((b.start, b.end) for b in busy) == sorted(expected)
    assert all(b.clinician == "dr_rivera" and b.start.tzinfo is not None for b in busy)
    utc_hours = {b.start.date(): b.start.astimezone(UTC).hour for b in busy}
    assert utc_hours[date(2026, 3, 2)] == 15 and utc_hours[date(2026, 3, 9)] == 14  # EST -> EDT
    assert utc_hours[date(2026, 10, 26)] == 14 and utc_hours[date(2026, 11, 2)] == 15  # EDT -> EST
    assert date(2026, 3, 16) not in utc_hours and utc_hours[date(2026, 11, 10)] == 19


async def test_what_counts_as_busy(calendar: tuple[CalDAVConnector, DavServer, str]) -> None:
    """All-day and UTC events block time; free, cancelled and syncbridge's own sessions do not."""
    connector, server, url = calendar
    day = date(2026, 4, 1)
    put(server, url, vevent(day, day + timedelta(days=1), "Conference"))  # all-day: the clinician's zone
    put(server, url, vevent(datetime(2026, 4, 2, 15, tzinfo=UTC), datetime(2026, 4, 2, 16, tzinfo=UTC), "Call"))
    put(server, url, vevent(local(day, 12), local(day, 13), "Lunch maybe", transp="TRANSPARENT"))
    put(server, url, vevent(local(day, 14), local(day, 15), "Called off", status="CANCELLED"))
    put(server, url, vevent(local(date(2026, 6, 1), 9), local(date(2026, 6, 1), 10), "Outside the window"))
    start = local(day, 16)
    session = empty_snapshot() | {
        "clinician": "dr_rivera", "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": "America/New_York",
    }  # fmt: skip
    await connector.apply("sb-" + uuid.uuid4().hex, connector.capabilities.project(session), None)

    busy = await connector.busy(datetime(2026, 3, 30, tzinfo=UTC), datetime(2026, 4, 5, tzinfo=UTC))

    assert [(b.start, b.end) for b in busy] == [
        (local(day, 0, CHICAGO), local(day + timedelta(days=1), 0, CHICAGO)),
        (datetime(2026, 4, 2, 15, tzinfo=UTC), datetime(2026, 4, 2, 16, tzinfo=UTC)),
    ]


async def test_unreadable_private_event_does_not_hide_the_rest(calendar: tuple[CalDAVConnector, DavServer, str]) -> None:
    """One broken event in a clinician's calendar is skipped; the other busy time is still reported."""
    connector, server, url = calendar
    put(server, url, vevent(datetime(2026, 4, 2, 15, tzinfo=UTC), datetime(2026, 4, 2, 16, tzinfo=UTC), "Call"))
    broken = (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//x//EN\r\nBEGIN:VEVENT\r\nUID:broken-1\r\n"
        "DTSTAMP:20260101T000000Z\r\nDTSTART;TZID=Mars/Olympus_Mons:20260402T100000\r\n"
        "DTEND;TZID=Mars/Olympus_Mons:20260402T110000\r\nSUMMARY:Secret\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    with server.http() as http:
        http.put(f"{url}broken.ics", content=broken, headers={"Content-Type": "text/calendar"})
    busy = await connector.busy(datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 4, 5, tzinfo=UTC))
    assert (datetime(2026, 4, 2, 15, tzinfo=UTC), datetime(2026, 4, 2, 16, tzinfo=UTC)) in [(b.start, b.end) for b in busy]
