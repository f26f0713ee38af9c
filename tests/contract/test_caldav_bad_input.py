"""Bad calendar data on a real server (Xandikos) is refused by name; everything else keeps syncing."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from tests.contract.suite import ConnectorContract, World, next_weekday_at
from tests.contract import test_caldav
from tests.contract.test_caldav import _secret  # noqa: F401
from tests.servers import xandikos_server  # noqa: F401

EVENT = """BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//test//EN\r
BEGIN:VEVENT\r
UID:{uid}@syncbridge\r
X-SYNCBRIDGE-ID:{uid}\r
DTSTAMP:20261123T100000Z\r
DTSTART:{start}\r
DTEND:{end}\r
SUMMARY:Client session\r
DESCRIPTION:{description}\r
END:VEVENT\r
END:VCALENDAR\r
"""


@pytest.mark.slow
class TestBadCalendarData:
    # Xandikos stores what it is given; Radicale refuses a resource over its max_resource_size itself
    harness = test_caldav.TestXandikos.harness
    world = ConnectorContract.world

    async def test_huge_and_backwards_events_are_skipped(self, world: World) -> None:
        """A 10 MB event and one ending before it starts are refused by name; a good session still syncs."""
        appt_id = world.book_here(next_weekday_at(10))
        await world.drain()
        calendar = world.connector.clinicians["dr_rivera"]["calendar"]
        start = next_weekday_at(12)
        fmt = "%Y%m%dT%H%M%SZ"
        vendor = world.vendor
        auth = vendor.server.auth  # type: ignore[attr-defined]
        bad = {
            "sb-huge": EVENT.format(uid="sb-huge", start=start.strftime(fmt), end=(start + timedelta(hours=1)).strftime(fmt), description="x" * (10 << 20)),
            "sb-back": EVENT.format(uid="sb-back", start=start.strftime(fmt), end=(start - timedelta(hours=1)).strftime(fmt), description="x"),
        }
        with httpx.Client(auth=auth, timeout=60) as client:
            for name, body in bad.items():
                r = client.put(f"{calendar}syncbridge-{name}.ics", content=body.encode(), headers={"Content-Type": "text/calendar"})
                assert r.status_code in (201, 204), (name, r.status_code, r.text[:200])
        before = world.store.appointment(appt_id)
        report = await world.sync(full=True)
        assert report.rejected == 2
        problems = " ".join(e["detail"]["problem"] for e in world.store.audit_entries(kind="rejected"))
        assert "over the 1,048,576-byte limit" in problems and "before it starts" in problems
        assert world.store.appointment(appt_id) == before and not before.cancelled
        assert world.store.verify_audit().ok
