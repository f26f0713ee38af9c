"""The contract suite against the Google Calendar emulator, with the real client libraries.

The connector runs google-api-python-client and google-auth unchanged: a service-account key whose
``token_uri`` points at the emulator, ``api_root`` at its Calendar API. The Vendor is the clinician
using Google Calendar's own interface (the emulator's user_* knobs: no etag, ids picked by
Google), never the connector under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.registry import build_connectors
from syncbridge_connectors.google_calendar.connector import GoogleCalendarConnector
from syncbridge_connectors.google_calendar.emulator import GoogleCalendarEmulator, Running, running
from syncbridge_connectors.google_calendar.mapping import ID_KEY
from tests.contract.suite import CLINICIAN, ZONE, ConnectorContract, Harness, Vendor

EMAIL = "dr.rivera@practice.example"
SA_EMAIL = "syncbridge@practice-project.iam.gserviceaccount.com"


class CalendarUser(Vendor):
    """The clinician in Google Calendar's web interface."""

    can_throttle = True

    def __init__(self, emulator: GoogleCalendarEmulator, calendar: str = EMAIL) -> None:
        self.emulator = emulator
        self.calendar = calendar

    def _id(self, external_id: str) -> str:
        calendar, _, event_id = external_id.rpartition("/")
        assert calendar == self.calendar
        return event_id

    async def live(self) -> list[dict[str, Any]]:
        out = [
            {
                "external_id": f"{self.calendar}/{e['id']}",
                "start": datetime.fromisoformat(e["start"]["dateTime"]),
                "end": datetime.fromisoformat(e["end"]["dateTime"]),
            }
            for e in self.emulator.live_events(self.calendar)
            if ID_KEY in ((e.get("extendedProperties") or {}).get("private") or {})
        ]
        return sorted(out, key=lambda e: e["start"])

    async def move(self, external_id: str, start: datetime, end: datetime) -> None:
        event = self.emulator.event(self.calendar, self._id(external_id))
        assert event is not None
        zone = event["start"].get("timeZone")
        self.emulator.user_patch(self.calendar, self._id(external_id), {
            "start": {"dateTime": start.isoformat(), "timeZone": zone},
            "end": {"dateTime": end.isoformat(), "timeZone": zone},
        })  # fmt: skip

    async def delete(self, external_id: str) -> None:
        self.emulator.user_delete(self.calendar, self._id(external_id))

    async def retitle(self, external_id: str, title: str) -> None:
        self.emulator.user_patch(self.calendar, self._id(external_id), {"summary": title})

    async def invalidate_cursor(self) -> None:
        self.emulator.expire_sync_tokens(self.calendar)

    async def throttle(self, requests: int) -> None:
        self.emulator.fail_next(403, requests, reason="rateLimitExceeded")

    async def add_private_event(self, start: datetime, end: datetime, title: str) -> None:
        self.emulator.user_insert(self.calendar, {
            "summary": title, "description": "Bring the insurance card",
            "start": {"dateTime": start.isoformat(), "timeZone": ZONE}, "end": {"dateTime": end.isoformat(), "timeZone": ZONE},
        })  # fmt: skip


@pytest.fixture
def google() -> Iterator[Running]:
    server = running(GoogleCalendarEmulator())
    server.emulator.add_user(EMAIL, time_zone=ZONE)
    try:
        yield server
    finally:
        server.stop()


def sa_key_file(server: Running, tmp_path: Path, **grant: Any) -> Path:
    info = server.emulator.add_service_account(SA_EMAIL, **grant)
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


def google_harness(server: Running, tmp_path: Path, **options: Any) -> Harness:
    config = {
        "type": "google_calendar",
        "service_account_key": {"file": str(sa_key_file(server, tmp_path))},
        "api_root": server.api_root,
        **options,
    }
    return Harness(config, {"email": EMAIL}, CalendarUser(server.emulator))


def connector_for(harness: Harness, tmp_path: Path, **options: Any) -> GoogleCalendarConnector:
    """A connector built from the harness config as ``syncbridge run`` would, with ``options`` changed."""
    cfg = parse_config(
        yaml.safe_dump(
            {
                "practice": {"timezone": ZONE},
                "store": {"path": str(tmp_path / "direct.db")},
                "clinicians": {CLINICIAN: {"accounts": {harness.name: harness.account}}},
                "connectors": {harness.name: harness.connector_config | options},
            }
        )
    )
    connector = build_connectors(cfg)[harness.name]
    assert isinstance(connector, GoogleCalendarConnector)
    return connector


class TestGoogleCalendar(ConnectorContract):
    @pytest.fixture
    def harness(self, google: Running, tmp_path: Path) -> Harness:
        return google_harness(google, tmp_path)


class TestGoogleCalendarPaged(ConnectorContract):
    """The same scenarios with two events per page: every listing follows pageTokens."""

    @pytest.fixture
    def harness(self, google: Running, tmp_path: Path) -> Harness:
        return google_harness(google, tmp_path, page_size=2)


# --- the emulator answers as Google documents ------------------------------------------------------


def _token(server: Running) -> str:
    """An access token for the clinician, obtained the way google-auth does (signed SA assertion)."""
    from google.auth.transport.requests import Request
    from google.oauth2 import service_account

    info = server.emulator.add_service_account("probe@practice-project.iam.gserviceaccount.com")
    creds = service_account.Credentials.from_service_account_info(info, scopes=["https://www.googleapis.com/auth/calendar.events"])
    creds = creds.with_subject(EMAIL)
    creds.refresh(Request())
    return str(creds.token)


def test_emulator_speaks_the_documented_errors(google: Running) -> None:
    """401, 409 duplicate, 412 conditionNotMet, 410 fullSyncRequired, 400 syncToken+timeMin, 403 rateLimitExceeded."""
    base = google.api_root + f"calendars/{EMAIL}/events"
    with httpx.Client() as anon:
        denied = anon.get(base)
        assert denied.status_code == 401 and denied.json()["error"]["errors"][0]["reason"] == "authError"
    auth = {"Authorization": f"Bearer {_token(google)}"}
    body = {"id": "abcdefghijkl0123", "start": {"dateTime": "2030-01-07T10:00:00-05:00"}, "end": {"dateTime": "2030-01-07T10:50:00-05:00"}}
    with httpx.Client(headers=auth) as http:
        created = http.post(base, json=body)
        assert created.status_code == 200 and created.json()["etag"]
        dup = http.post(base, json=body)
        assert dup.status_code == 409 and dup.json()["error"]["errors"][0]["reason"] == "duplicate"
        bad_id = http.post(base, json=body | {"id": "not_base32hex!"})
        assert bad_id.status_code == 400
        stale = http.patch(f"{base}/{body['id']}", json={"summary": "x"}, headers={"If-Match": '"1"'})
        assert stale.status_code == 412 and stale.json()["error"]["errors"][0]["reason"] == "conditionNotMet"
        listing = http.get(base).json()
        token = listing["nextSyncToken"]
        assert http.get(base, params={"syncToken": token, "timeMin": "2030-01-01T00:00:00Z"}).status_code == 400
        assert http.get(base, params={"syncToken": token, "showDeleted": "false"}).status_code == 400
        assert http.delete(f"{base}/{body['id']}", headers={"If-Match": created.json()["etag"]}).status_code == 204
        assert http.delete(f"{base}/{body['id']}").status_code == 410
        changes = http.get(base, params={"syncToken": token}).json()["items"]
        assert [(e["id"], e["status"]) for e in changes] == [(body["id"], "cancelled")] and "start" not in changes[0]
        google.emulator.expire_sync_tokens()
        gone = http.get(base, params={"syncToken": token})
        assert gone.status_code == 410 and gone.json()["error"]["errors"][0]["reason"] == "fullSyncRequired"
        google.emulator.fail_next(403, reason="userRateLimitExceeded")
        limited = http.get(base)
        assert limited.status_code == 403 and limited.json()["error"]["errors"][0] == {
            "domain": "usageLimits", "reason": "userRateLimitExceeded", "message": "User Rate Limit Exceeded"}  # fmt: skip


def test_recurring_events_expand_into_instances(google: Running) -> None:
    """A weekly series lists as one event, or as its occurrences with singleEvents; a cancelled occurrence drops out."""
    series = google.emulator.user_insert(EMAIL, {
        "summary": "Supervision", "recurrence": ["RRULE:FREQ=WEEKLY;COUNT=4"],
        "start": {"dateTime": "2030-03-04T09:00:00", "timeZone": ZONE}, "end": {"dateTime": "2030-03-04T10:00:00", "timeZone": ZONE},
    })  # fmt: skip
    auth = {"Authorization": f"Bearer {_token(google)}"}
    base = google.api_root + f"calendars/{EMAIL}/events"
    with httpx.Client(headers=auth) as http:
        assert [e["id"] for e in http.get(base).json()["items"]] == [series["id"]]
        instances = http.get(base, params={"singleEvents": "true", "orderBy": "startTime"}).json()["items"]
        assert len(instances) == 4 and {e["recurringEventId"] for e in instances} == {series["id"]}
        # 2030-03-11 is after the DST change: still 09:00 local, now UTC-4
        assert instances[1]["start"]["dateTime"] == "2030-03-11T09:00:00-04:00"
        assert http.delete(f"{base}/{instances[2]['id']}").status_code == 204
        left = http.get(base, params={"singleEvents": "true"}).json()["items"]
        assert [e["id"] for e in left] == [instances[i]["id"] for i in (0, 1, 3)]
        assert http.get(base, params={"orderBy": "startTime"}).status_code == 400
