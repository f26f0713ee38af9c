"""The contract suite against the Google Calendar emulator, with the real client libraries.

The connector runs google-api-python-client and google-auth unchanged: a service-account key whose
``token_uri`` points at the emulator, ``api_root`` at its Calendar API. The Vendor is the clinician
using Google Calendar's own interface (the emulator's user_* knobs: no etag, ids picked by
Google), never the connector under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from starlette.applications import Starlette
from starlette.routing import Mount, Route

from syncbridge.config import parse_config
from syncbridge.connector import ApplyResult, Host, Link, Write
from syncbridge.emulation import RunningServer, serve_in_thread
from syncbridge.engine import Engine
from syncbridge.errors import AuthError, ConflictError, CursorExpired, PermanentError, RateLimited, TransientError
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.limits import MAX_WEBHOOK_BYTES
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.google_calendar.client import raise_for_status
from syncbridge_connectors.google_calendar.connector import GoogleCalendarConnector
from syncbridge_connectors.google_calendar.emulator import GoogleCalendarEmulator, Running
from syncbridge_connectors.google_calendar.emulator_auth import new_service_account_key
from syncbridge_connectors.google_calendar.mapping import BUSY_FIELDS, ID_KEY, canonical_id_of, event_id_for
from tests.contract.suite import CLINICIAN, ZONE, ConnectorContract, Harness, Vendor, World, next_weekday_at
from tests.support.emulators import google_calendar

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

    async def throttle(self, requests: int, retry_after: float | None = None) -> None:
        if retry_after is None:  # Google's usual way: 403 rateLimitExceeded, no Retry-After
            self.emulator.fail_next(403, requests, reason="rateLimitExceeded")
        else:
            self.emulator.fail_next(429, requests, retry_after=retry_after)

    async def add_private_event(self, start: datetime, end: datetime, title: str) -> None:
        self.emulator.user_insert(self.calendar, {
            "summary": title, "description": "Bring the insurance card",
            "start": {"dateTime": start.isoformat(), "timeZone": ZONE}, "end": {"dateTime": end.isoformat(), "timeZone": ZONE},
        })  # fmt: skip


@pytest.fixture
def google() -> Iterator[Running]:
    with google_calendar(EMAIL, zone=ZONE) as server:
        yield server


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
        assert http.get(base).json()["items"] == []
        shown = http.get(base, params={"showDeleted": "true"}).json()["items"]
        assert [(e["id"], e["status"]) for e in shown] == [(body["id"], "cancelled")]
        assert http.get(f"{base}/{body['id']}").json()["status"] == "cancelled"
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


# --- push: a change in Google reaches the record through a watch channel ---------------------------


class RecordingHost(Host):
    """The daemon's side of a push, as the connector sees it: notifications accepted, pulls asked for."""

    def __init__(self, public_url: str | None) -> None:
        super().__init__(public_url)
        self._loop = asyncio.get_running_loop()
        self.woken = asyncio.Event()

    def pull_soon(self) -> None:
        super().pull_soon()  # called on the web server's thread
        self._loop.call_soon_threadsafe(self.woken.set)


@dataclass
class PushWorld:
    world: World
    host: RecordingHost
    receiver: RunningServer
    emulator: GoogleCalendarEmulator


@contextlib.asynccontextmanager
async def push_world(harness: Harness, tmp_path: Path, **options: Any) -> AsyncIterator[PushWorld]:
    """Store, engine and outbox around the connector, whose webhook routes are served on loopback
    under /webhooks/<name>/ as the daemon mounts them."""
    cfg = parse_config(
        yaml.safe_dump(
            {
                "practice": {"timezone": ZONE},
                "store": {"path": str(tmp_path / "push.db")},
                "clinicians": {CLINICIAN: {"accounts": {harness.name: harness.account}}},
                "connectors": {harness.name: harness.connector_config | options},
                "outbox": {"backoff_base": 0.05, "backoff_max": 0.2, "max_attempts": 6},
            }
        )
    )
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    connector = connectors[harness.name]
    engine = Engine(store, connectors, cfg)
    prefix = f"/webhooks/{harness.name}"
    app = Starlette(routes=[Mount(prefix, routes=[Route(r.path, r.handler, methods=list(r.methods)) for r in connector.webhook_routes()])])
    receiver = serve_in_thread(app)
    host = RecordingHost(receiver.url + prefix)
    connector.host = host
    vendor = harness.vendor
    assert isinstance(vendor, CalendarUser)
    try:
        yield PushWorld(World(store, engine, Outbox(engine), connector, vendor), host, receiver, vendor.emulator)
    finally:
        await connector.close()
        receiver.stop()
        store.close()


async def test_deletion_in_google_reaches_the_record_by_push(google: Running, tmp_path: Path) -> None:
    """A session deleted in Google Calendar is cancelled in the record as soon as Google notifies, with no poll."""
    async with push_world(google_harness(google, tmp_path), tmp_path) as pw:
        w = pw.world
        appt = w.book_here(next_weekday_at(10))
        await w.drain()
        await w.sync(full=True)
        await w.connector.maintain()
        google.emulator.settle()
        assert [d.headers["X-Goog-Resource-State"] for d in google.emulator.deliveries] == ["sync"]
        assert pw.host.accepted == [], "opening the channel is not a change"

        await w.vendor.delete(w.external_id(appt))
        await asyncio.wait_for(pw.host.woken.wait(), timeout=10)
        (headers, body), = pw.host.accepted
        assert headers["x-goog-resource-state"] == "exists" and body == b""
        assert not any("token" in k for k in headers), "the channel secret is never persisted"
        assert w.connector.webhook_targets(headers, body) is None  # the daemon pulls incrementally
        await w.sync()
        record = w.store.appointment(appt)
        assert record.cancelled and record.fields["cancellation"]["via"] == w.connector.name
        assert google.emulator.deliveries[-1].status == 200


async def test_forged_notifications_are_refused(google: Running, tmp_path: Path) -> None:
    """A notification without the channel's secret token is refused (401/403) and nothing is stored."""
    async with push_world(google_harness(google, tmp_path), tmp_path) as pw:
        await pw.world.connector.maintain()
        (channel,) = google.emulator.channels.values()
        url = pw.host.public_url + "/notify"
        base = {"X-Goog-Channel-ID": channel.id, "X-Goog-Resource-State": "exists", "X-Goog-Resource-ID": channel.resource_id}
        async with httpx.AsyncClient() as http:
            assert (await http.post(url, headers=base)).status_code == 401
            assert (await http.post(url, headers=base | {"X-Goog-Channel-Token": "guess"})).status_code == 403
            other = base | {"X-Goog-Channel-ID": "someone-elses", "X-Goog-Channel-Token": channel.token or ""}
            assert (await http.post(url, headers=other)).status_code == 403
            huge = await http.post(url, headers=base | {"X-Goog-Channel-Token": channel.token or ""}, content=b"x" * (MAX_WEBHOOK_BYTES + 1))
            assert huge.status_code == 413
        assert pw.host.accepted == [] and pw.host.pull_requests == 0


async def test_channels_are_renewed_and_stopped(google: Running, tmp_path: Path) -> None:
    """A channel close to expiry is replaced (the old one stopped); closing the connector stops them all."""
    async with push_world(google_harness(google, tmp_path), tmp_path) as pw:
        connector = pw.world.connector
        assert isinstance(connector, GoogleCalendarConnector)
        await connector.maintain()
        await connector.maintain()
        (first,) = google.emulator.channels.values()
        assert sum(1 for m, p in google.emulator.log if p.endswith("/events/watch")) == 1, "a live channel is kept"
        connector.push.channels[EMAIL].expiration_ms = int(time.time() * 1000) + 60_000
        await connector.maintain()
        (second,) = google.emulator.channels.values()
        assert second.id != first.id and second.expiration_ms > first.expiration_ms
        # a restarted daemon (same vault) recognises the open channel and keeps it
        again = connector_for(google_harness(google, tmp_path), tmp_path)
        again.host = pw.host
        await again.maintain()
        assert list(google.emulator.channels) == [second.id]
        await connector.close()
        assert google.emulator.channels == {}
        assert ("POST", "/calendar/v3/channels/stop") in google.emulator.log


async def test_no_public_url_means_no_channel(google: Running, tmp_path: Path) -> None:
    """Without http.public_url Google could not reach the daemon: no channel is opened, polling carries on."""
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    try:
        await connector.maintain()
        assert google.emulator.channels == {}
        assert (await connector.pull(None)).complete
    finally:
        await connector.close()


# --- auth ------------------------------------------------------------------------------------------


async def test_missing_delegation_tells_the_admin_what_to_grant(google: Running, tmp_path: Path) -> None:
    """A service account whose client id lacks the calendar scope in domain-wide delegation gets an actionable error."""
    key = tmp_path / "sa-readonly.json"
    key.write_text(json.dumps(google.emulator.add_service_account(SA_EMAIL, scopes={"https://www.googleapis.com/auth/calendar.readonly"})))
    harness = Harness({"type": "google_calendar", "service_account_key": {"file": str(key)}, "api_root": google.api_root},
                      {"email": EMAIL}, CalendarUser(google.emulator))  # fmt: skip
    connector = connector_for(harness, tmp_path)
    try:
        with pytest.raises(AuthError) as caught:
            await connector.check()
    finally:
        await connector.close()
    assert "Domain-wide delegation" in caught.value.action and "calendar.events" in caught.value.action
    assert "PRIVATE KEY" not in str(caught.value)


async def test_clinician_signs_in_with_the_installed_app_flow(
    google: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`syncbridge auth`: the clinician opens the printed URL, consents, and the connector then works as them."""
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # oauthlib's switch for a token endpoint on plain-http loopback
    client_id, secret = google.emulator.add_oauth_client()
    monkeypatch.setenv("SYNCBRIDGE_TEST_GOOGLE_SECRET", secret)
    google.emulator.auth.consenting_user = EMAIL
    config = {
        "type": "google_calendar", "auth": "oauth", "client_id": client_id, "client_secret": {"env": "SYNCBRIDGE_TEST_GOOGLE_SECRET"},
        "token_uri": google.token_uri, "auth_uri": f"{google.base_url}/o/oauth2/auth", "api_root": google.api_root,
    }  # fmt: skip
    connector = connector_for(Harness(config, {"email": EMAIL}, CalendarUser(google.emulator)), tmp_path)
    try:
        with pytest.raises(AuthError, match="syncbridge auth"):
            await connector.pull(None)
        signing_in = asyncio.create_task(connector.authorize(CLINICIAN))
        printed = ""
        for _ in range(200):
            printed += capsys.readouterr().out
            if "/o/oauth2/auth?" in printed:
                break
            await asyncio.sleep(0.05)
        url = next(w for w in printed.split() if w.startswith(google.base_url + "/o/oauth2/auth?"))
        async with httpx.AsyncClient(follow_redirects=True) as browser:  # the person's browser
            landed = await browser.get(url)
        assert landed.status_code == 200
        said = await asyncio.wait_for(signing_in, timeout=20)
        assert EMAIL in said
        stored = connector.host.vault_get("refresh_token:" + CLINICIAN)
        assert stored and stored.startswith("1//") and stored not in said
        google.emulator.user_insert(EMAIL, {"summary": "Lunch", "start": {"dateTime": "2030-01-07T12:00:00Z"}, "end": {"dateTime": "2030-01-07T13:00:00Z"}})
        assert (await connector.pull(None)).complete
        assert ("POST", "/token") in google.emulator.log
    finally:
        await connector.close()


# --- errors, busy time, idempotent creates -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "retry_after", "expected"),
    [
        (401, "authError", None, AuthError),
        (403, "rateLimitExceeded", None, RateLimited),
        (403, "userRateLimitExceeded", "3", RateLimited),
        (429, "rateLimitExceeded", "7", RateLimited),
        (403, "insufficientPermissions", None, AuthError),
        (403, "forbiddenForNonOrganizer", None, PermanentError),
        (409, "duplicate", None, ConflictError),
        (410, "fullSyncRequired", None, CursorExpired),
        (412, "conditionNotMet", None, ConflictError),
        (500, "backendError", None, TransientError),
        (503, "backendError", "2", TransientError),
        (400, "invalid", None, PermanentError),
        (404, "notFound", None, PermanentError),
    ],
)
def test_google_answers_map_to_what_the_caller_must_do(status: int, reason: str, retry_after: str | None, expected: type) -> None:
    """Every Calendar API error becomes the right action: re-consent, back off, resync, re-merge, retry or give up."""
    with pytest.raises(expected) as caught:
        raise_for_status(status, reason, "events.patch", retry_after=retry_after)
    assert type(caught.value) is expected
    if retry_after:
        assert caught.value.retry_after == float(retry_after)


async def test_throttled_read_says_when_to_retry(google: Running, tmp_path: Path) -> None:
    """A 429 with Retry-After reaches the caller as RateLimited carrying the wait."""
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    try:
        google.emulator.fail_next(429, retry_after=4)
        with pytest.raises(RateLimited) as caught:
            await connector.pull(None)
        assert caught.value.retry_after == 4
    finally:
        await connector.close()


async def test_busy_time_expands_series_and_skips_free_and_declined(google: Running, tmp_path: Path) -> None:
    """A weekly private series counts each occurrence; events marked free or declined do not count."""
    start = next_weekday_at(12)
    end = start + timedelta(hours=1)

    def slot(s: datetime, e: datetime) -> dict[str, Any]:
        return {"start": {"dateTime": s.isoformat(), "timeZone": ZONE}, "end": {"dateTime": e.isoformat(), "timeZone": ZONE}}

    emu = google.emulator
    emu.user_insert(EMAIL, {"summary": "Pilates", "recurrence": ["RRULE:FREQ=WEEKLY;COUNT=3"]} | slot(start, end))
    emu.user_insert(EMAIL, {"summary": "Focus", "transparency": "transparent"} | slot(start + timedelta(hours=2), end + timedelta(hours=2)))
    emu.user_insert(EMAIL, {"summary": "Staff lunch", "attendees": [{"email": EMAIL, "self": True, "responseStatus": "declined"}]}
                    | slot(start + timedelta(hours=3), end + timedelta(hours=3)))  # fmt: skip
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    try:
        busy = await connector.busy(start - timedelta(days=1), start + timedelta(days=30))
    finally:
        await connector.close()
    assert [(b.start, b.end) for b in busy] == [(start + timedelta(weeks=i), end + timedelta(weeks=i)) for i in range(3)]


async def test_recreating_a_deleted_session_restores_its_event(google: Running, tmp_path: Path) -> None:
    """A session re-booked after its event was deleted gets its event back (409 on the id, then update), not an error."""
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    appt = new_canonical_id()
    desired = connector.capabilities.project(session())
    try:
        created = await connector.apply(appt, desired, None)
        google.emulator.user_delete(EMAIL, created.external_id.rpartition("/")[2])
        again = await connector.apply(appt, desired, None)
        obs = await connector.read(again.external_id)
    finally:
        await connector.close()
    assert again.external_id == created.external_id and not obs.deleted and obs.etag == again.etag
    assert len(await CalendarUser(google.emulator).live()) == 1


async def test_event_shows_nothing_about_the_client(google: Running, tmp_path: Path) -> None:
    """The event carries the title template and room only; the canonical id sits in private extended properties."""
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    appt = new_canonical_id()
    try:
        result = await connector.apply(appt, connector.capabilities.project(session()), None)
    finally:
        await connector.close()
    event = google.emulator.event(EMAIL, result.external_id.rpartition("/")[2])
    assert event is not None
    raw = json.dumps(event)
    assert event["summary"] == "Client session" and event["location"] == "Room 2"
    assert event["extendedProperties"]["private"][ID_KEY] == appt
    assert "client-4711" not in raw and "90837" not in raw
    assert canonical_id_of(event["id"]) == appt and result.disclosed == ("title:template", "location")


def session(hour: int = 10, **extra: Any) -> dict[str, Any]:
    start = next_weekday_at(hour)
    return empty_snapshot() | {
        "clinician": CLINICIAN, "client_key": "client-4711", "service_code": "90837", "location": "Room 2",
        "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": ZONE,
    } | extra  # fmt: skip


async def test_polling_many_calendars_is_one_batch_request(google: Running, tmp_path: Path) -> None:
    """With three clinicians a quiet poll is one HTTP request (a batch of three listings), and changes still arrive."""
    emails = {"dr_rivera": EMAIL, "dr_chen": "dr.chen@practice.example", "dr_okafor": "dr.okafor@practice.example"}
    for email in emails.values():
        google.emulator.add_user(email, time_zone=ZONE)
    harness = google_harness(google, tmp_path)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE}, "store": {"path": str(tmp_path / "many.db")},
        "clinicians": {k: {"accounts": {"gcal": {"email": e}}} for k, e in emails.items()},
        "connectors": {"gcal": harness.connector_config},
    }))  # fmt: skip
    connector = build_connectors(cfg)["gcal"]
    try:
        appts = {k: new_canonical_id() for k in emails}
        for k, appt in appts.items():
            await connector.apply(appt, connector.capabilities.project(session() | {"clinician": k}), None)
        full = await connector.pull(None)
        assert {o.canonical_id for o in full.observations} == set(appts.values())
        before = len(google.emulator.log)
        quiet = await connector.pull(full.cursor)
        http_requests = [entry for entry in google.emulator.log[before:] if entry[1] in ("/batch/calendar/v3", "/token")]
        assert quiet.observations == [] and http_requests == [("POST", "/batch/calendar/v3")]
        google.emulator.user_delete("dr.chen@practice.example", event_id_for(appts["dr_chen"]))
        changed = await connector.pull(quiet.cursor)
        assert [(o.canonical_id, o.deleted) for o in changed.observations] == [(appts["dr_chen"], True)]
        google.emulator.expire_sync_tokens("dr.okafor@practice.example")
        with pytest.raises(CursorExpired):
            await connector.pull(changed.cursor)
    finally:
        await connector.close()


async def test_one_failing_part_of_a_batch_fails_alone(google: Running, tmp_path: Path) -> None:
    """In one batch request a stale write (412) and a throttled part (429) fail alone, with when to retry; the rest land."""
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    assert google.injector is not None
    appts = [new_canonical_id() for _ in range(6)]
    desired = {a: connector.capabilities.project(session(9 + i)) for i, a in enumerate(appts)}
    try:
        made = await connector.apply_many([Write(a, desired[a], None) for a in appts[:4]])
        assert all(isinstance(r, ApplyResult) for r in made), made
        links = {a: Link(connector.name, a, r.external_id, r.etag, desired[a]) for a, r in zip(appts, made, strict=False) if isinstance(r, ApplyResult)}
        stale = appts[0]
        google.emulator.user_patch(EMAIL, event_id_for(stale), {"summary": "Client session #late"})
        moved = {a: desired[a] | {"location": "Room 7"} for a in appts[:4]}
        writes = [Write(a, moved[a], links[a]) for a in appts[:4]] + [Write(a, desired[a], None) for a in appts[4:]]
        google.emulator.fail_next(429, retry_after=7)
        http_before, calls_before = google.injector.requests, len(google.emulator.log)
        results = await connector.apply_many(writes)
        http = google.injector.requests - http_before
        calls = sum(1 for _, path in google.emulator.log[calls_before:] if path != "/batch/calendar/v3")
    finally:
        await connector.close()
    assert http == 1 and calls == 6, (http, calls)
    throttled = [i for i, r in enumerate(results) if isinstance(r, RateLimited)]
    assert len(throttled) == 1 and results[throttled[0]].retry_after == 7, results
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    try:  # the throttled write is retried alone later, as the outbox does
        results[throttled[0]] = (await connector.apply_many([writes[throttled[0]]]))[0]
    finally:
        await connector.close()
    assert isinstance(results[0], ConflictError), results
    assert all(isinstance(r, ApplyResult) for r in results[1:]), results
    live = {e["id"]: e for e in google.emulator.live_events(EMAIL)}
    for a, r in zip(writes, results, strict=True):
        event = live.get(event_id_for(a.appointment_id))
        if isinstance(r, ApplyResult):
            assert event is not None and event["etag"] == r.etag and event.get("location") == a.desired["location"]
    assert live[event_id_for(stale)]["location"] == "Room 2", "the stale write overwrote the clinician's edit"
    assert len(live) == 6, "a create landed twice, or not at all"


async def test_a_failed_batch_request_is_retried_without_duplicates(google: Running, tmp_path: Path) -> None:
    """A batch request that fails as a whole (throttled, unavailable, or answered after it took effect) fails each write; the retry converges with no duplicate."""
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    assert google.injector is not None
    try:
        await connector.apply(new_canonical_id(), connector.capabilities.project(session(8)), None)  # signed in before the faults start
        for round_ in range(6):
            starts = [next_weekday_at(9 + i, days_ahead=7 * round_ + 7) for i in range(3)]
            writes = [Write(new_canonical_id(), connector.capabilities.project(session(start=iso(t), end=iso(t + timedelta(minutes=50)))), None)
                      for t in starts]  # fmt: skip
            google.injector.configure(error_rate=1.0)
            try:
                failed = await connector.apply_many(writes)
            finally:
                google.injector.configure()
            assert all(isinstance(r, TransientError) for r in failed), failed
            again = await connector.apply_many(writes)
            assert all(isinstance(r, ApplyResult) for r in again), again
    finally:
        await connector.close()
    assert len(await CalendarUser(google.emulator).live()) == 1 + 6 * 3


async def test_check_reads_one_event_without_writing(google: Running, tmp_path: Path) -> None:
    """`syncbridge check` proves access with one small read per clinician, however full the calendar."""
    for hour in range(8, 14):
        google.emulator.user_insert(EMAIL, {"summary": "x", "start": {"dateTime": f"2030-01-07T{hour:02d}:00:00Z"}, "end": {"dateTime": f"2030-01-07T{hour:02d}:30:00Z"}})
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    mark = len(google.emulator.log)
    try:
        said = await connector.check()
    finally:
        await connector.close()
    assert "1 calendar(s) reachable" in said and "polling only" in said
    assert [m for m, p in google.emulator.log[mark:] if p != "/token"] == ["GET"]


def test_busy_listing_never_carries_event_text(google: Running) -> None:
    """The partial response busy time asks for holds times only: no title, description or location."""
    google.emulator.user_insert(EMAIL, {"summary": "Dentist", "description": "root canal", "location": "Main St",
                                        "start": {"dateTime": "2030-01-07T12:00:00Z"}, "end": {"dateTime": "2030-01-07T13:00:00Z"}})  # fmt: skip
    with httpx.Client(headers={"Authorization": f"Bearer {_token(google)}"}) as http:
        page = http.get(google.api_root + f"calendars/{EMAIL}/events", params={"singleEvents": "true", "fields": BUSY_FIELDS}).json()
    assert set(page) <= {"items", "nextPageToken"}
    assert page["items"] and all(set(e) <= {"id", "recurringEventId", "status", "transparency", "start", "end", "attendees"} for e in page["items"])
    assert "Dentist" not in json.dumps(page) and "Main St" not in json.dumps(page)


def test_token_endpoint_checks_the_assertion(google: Running) -> None:
    """The emulator's token endpoint refuses a wrong audience, a foreign signature and a subject outside the domain."""
    from google.auth import crypt, jwt

    info = google.emulator.add_service_account("probe@practice-project.iam.gserviceaccount.com")
    other, _ = new_service_account_key("probe@practice-project.iam.gserviceaccount.com", google.token_uri)
    now = int(time.time())
    claims = {"iss": info["client_email"], "scope": "https://www.googleapis.com/auth/calendar.events", "iat": now, "exp": now + 3600,
              "aud": "https://oauth2.googleapis.com/token", "sub": EMAIL}  # fmt: skip

    def grant(key: dict[str, Any], **changes: Any) -> httpx.Response:
        assertion = jwt.encode(crypt.RSASigner.from_service_account_info(key), claims | changes).decode()
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
        return httpx.post(google.token_uri, data=form)

    assert grant(info).status_code == 200 and grant(info).json()["token_type"] == "Bearer"
    assert grant(info, aud=google.token_uri).json()["error"] == "invalid_grant"
    assert grant(other).json()["error"] == "invalid_grant"
    assert grant(info, sub="someone@elsewhere.example").json()["error"] == "unauthorized_client"
    assert grant(info, exp=now + 7200).json()["error"] == "invalid_grant"


def test_instances_of_a_series(google: Running) -> None:
    """events.instances lists a series' occurrences; one changed alone keeps its own time."""
    series = google.emulator.user_insert(EMAIL, {
        "summary": "Group", "recurrence": ["RRULE:FREQ=DAILY;COUNT=3"],
        "start": {"dateTime": "2030-05-06T17:00:00", "timeZone": ZONE}, "end": {"dateTime": "2030-05-06T18:00:00", "timeZone": ZONE},
    })  # fmt: skip
    base = google.api_root + f"calendars/{EMAIL}/events"
    with httpx.Client(headers={"Authorization": f"Bearer {_token(google)}"}) as http:
        first = http.get(f"{base}/{series['id']}/instances").json()["items"]
        assert [e["originalStartTime"]["dateTime"][:10] for e in first] == ["2030-05-06", "2030-05-07", "2030-05-08"]
        moved = http.patch(f"{base}/{first[1]['id']}", json={"start": {"dateTime": "2030-05-07T19:00:00-04:00"}, "end": {"dateTime": "2030-05-07T20:00:00-04:00"}})
        assert moved.status_code == 200 and moved.json()["recurringEventId"] == series["id"]
        again = http.get(f"{base}/{series['id']}/instances").json()["items"]
        assert again[1]["start"]["dateTime"] == "2030-05-07T19:00:00-04:00" and again[0]["start"] == first[0]["start"]


async def test_private_event_text_never_reaches_the_logs(google: Running, tmp_path: Path) -> None:
    """Full and incremental pulls over a clinician's private events log nothing of their text."""
    from structlog.testing import capture_logs

    emu = google.emulator
    mine = emu.user_insert(EMAIL, {"summary": "Couples therapy (mine)", "description": "call Sam", "start": {"dateTime": "2030-01-08T12:00:00Z"},
                                   "end": {"dateTime": "2030-01-08T13:00:00Z"}})  # fmt: skip
    connector = connector_for(google_harness(google, tmp_path), tmp_path)
    try:
        with capture_logs() as logs:
            full = await connector.pull(None)
            emu.user_patch(EMAIL, mine["id"], {"summary": "Couples therapy (mine) #late"})
            later = await connector.pull(full.cursor)
    finally:
        await connector.close()
    assert full.observations == [] and later.observations == []
    assert "Couples" not in repr(logs) and "Sam" not in repr(logs)
