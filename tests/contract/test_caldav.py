"""The contract suite against real CalDAV servers: Radicale and Xandikos, started by the tests.

The Vendor is a calendar app acting for the clinician: it lists with the ``caldav`` library and
edits with plain HTTP and ``icalendar`` (GET, change, PUT under the ETag it just read), the way
phone and desktop apps do. It never goes through the connector under test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import icalendar
import pytest
from caldav.davclient import DAVClient

from syncbridge.config import parse_config
from syncbridge.connector import Link
from syncbridge.emulation import RunningServer, reverse_proxy, serve_in_thread
from syncbridge.errors import AuthError, ConflictError, CursorExpired, PermanentError, RateLimited, TransientError
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.caldav.client import raise_for_status, translate
from syncbridge_connectors.caldav.connector import CalDAVConnector
from tests.contract.suite import CLINICIAN, ZONE, ConnectorContract, Harness, Vendor, World, next_weekday_at
from tests.servers import PASSWORD, DavServer, radicale_server, xandikos_server  # noqa: F401

SECRET_ENV = "SYNCBRIDGE_TEST_CALDAV_PASSWORD"
pytestmark = pytest.mark.slow


class CalDAVVendor(Vendor):
    """A clinician's calendar app, pointed at one calendar on a real server. With ``proxy`` (the
    server as the connector reaches it) the server can be made to throttle the connector."""

    def __init__(self, server: DavServer, calendar_url: str, expire: Callable[[], Awaitable[None]], proxy: RunningServer | None = None) -> None:
        self.server = server
        self.calendar_url = calendar_url
        self._expire = expire
        self.proxy = proxy
        self.can_throttle = proxy is not None

    async def throttle(self, requests: int, retry_after: float | None = 0.1) -> None:
        assert self.proxy is not None
        self.proxy.injector.fail_next(429, requests, retry_after=retry_after)

    def _url(self, external_id: str) -> str:
        return self.server.base_url + external_id

    def _events(self) -> list[tuple[str, Any]]:
        with DAVClient(url=self.calendar_url, username=self.server.username, password=self.server.password) as client:
            found = client.calendar(url=self.calendar_url).get_events()
            return [(unquote(urlsplit(str(e.url)).path), e.icalendar_component) for e in found]

    async def live(self) -> list[dict[str, Any]]:
        out = []
        for path, event in await asyncio.to_thread(self._events):
            if "X-SYNCBRIDGE-ID" in event and str(event.get("STATUS", "")).upper() != "CANCELLED":
                out.append({"external_id": path, "start": event.start, "end": event.end})
        return sorted(out, key=lambda e: e["start"])

    def _edit(self, external_id: str, change: Callable[[Any], None]) -> None:
        with self.server.http() as http:
            got = http.get(self._url(external_id))
            got.raise_for_status()
            cal = icalendar.Calendar.from_ical(got.text)
            event = cal.walk("VEVENT")[0]
            change(event)
            now = datetime.now(UTC).replace(microsecond=0)
            for name in ("LAST-MODIFIED", "DTSTAMP"):
                event.pop(name, None)
                event.add(name, now)
            sequence = int(event.pop("SEQUENCE", 0)) + 1
            event.add("SEQUENCE", sequence)
            headers = {"Content-Type": "text/calendar", "If-Match": got.headers["ETag"]}
            http.put(self._url(external_id), content=cal.to_ical(), headers=headers).raise_for_status()

    async def move(self, external_id: str, start: datetime, end: datetime) -> None:
        def change(event: Any) -> None:
            zone = event.start.tzinfo
            for name, value in (("DTSTART", start), ("DTEND", end)):
                event.pop(name)
                event.add(name, value.astimezone(zone))

        await asyncio.to_thread(self._edit, external_id, change)

    async def retitle(self, external_id: str, title: str) -> None:
        def change(event: Any) -> None:
            event.pop("SUMMARY", None)
            event.add("SUMMARY", title)

        await asyncio.to_thread(self._edit, external_id, change)

    async def delete(self, external_id: str) -> None:
        def run() -> None:
            with self.server.http() as http:
                http.delete(self._url(external_id)).raise_for_status()

        await asyncio.to_thread(run)

    async def add_private_event(self, start: datetime, end: datetime, title: str) -> None:
        cal = icalendar.Calendar()
        cal.add("prodid", "-//Example Corp.//Calendar App//EN")
        cal.add("version", "2.0")
        event = icalendar.Event()
        event.add("uid", str(uuid.uuid4()).upper())
        event.add("dtstamp", datetime.now(UTC))
        event.add("dtstart", start)
        event.add("dtend", end)
        event.add("summary", title)
        event.add("description", "Bring the insurance card")
        cal.add_component(event)
        cal.add_missing_timezones()

        def run() -> None:
            with self.server.http() as http:
                url = f"{self.calendar_url}{uuid.uuid4()}.ics"
                http.put(url, content=cal.to_ical(), headers={"Content-Type": "text/calendar"}).raise_for_status()

        await asyncio.to_thread(run)

    async def invalidate_cursor(self) -> None:
        await self._expire()


def _radicale_expiry(server: DavServer, calendar_url: str) -> Callable[[], Awaitable[None]]:
    """Radicale forgets a token when its state file is removed (what ``max_sync_token_age`` does).

    Its token is a hash of the collection's history, so a token naming the *current* state is
    always accepted: expiry only shows once something changed. The clinician makes and removes
    a scratch event (no appointment is touched), then the server's token state is aged out.
    """

    async def expire() -> None:
        def scratch() -> None:
            url = f"{calendar_url}{uuid.uuid4()}.ics"
            cal = icalendar.Calendar()
            cal.add("prodid", "-//Example Corp.//Calendar App//EN")
            cal.add("version", "2.0")
            event = icalendar.Event()
            event.add("uid", str(uuid.uuid4()))
            event.add("dtstamp", datetime.now(UTC))
            event.add("dtstart", datetime(2030, 1, 1, 12, tzinfo=UTC))
            event.add("dtend", datetime(2030, 1, 1, 13, tzinfo=UTC))
            cal.add_component(event)
            with server.http() as http:
                http.put(url, content=cal.to_ical(), headers={"Content-Type": "text/calendar"}).raise_for_status()
                http.delete(url).raise_for_status()

        await asyncio.to_thread(scratch)
        folder = server.root / "collection-root" / Path(urlsplit(calendar_url).path.strip("/"))
        removed = 0
        for path in folder.glob(".Radicale.cache/sync-token/*"):
            path.unlink()
            removed += 1
        assert removed, f"no sync-token state under {folder}"

    return expire


def _unknown_token_in_store(tmp_path: Path, connector: str) -> Callable[[], Awaitable[None]]:
    """Xandikos keeps every state's token while the state exists (a token names a git tree), so
    expiry is provoked the only way open to a test: the stored cursor is rewritten to a
    well-formed token of a state the server never had, which it rejects as after a repository
    rewrite (412 valid-sync-token)."""

    async def expire() -> None:
        found = list(tmp_path.glob("*.db"))
        assert len(found) == 1, f"expected the contract suite's store in {tmp_path}, found {found}"
        store = Store(found[0])
        try:
            cursor = json.loads(store.cursor(connector) or "{}")
            assert cursor and all(isinstance(v, str) for v in cursor.values()), "expected sync tokens"
            with store.tx() as tx:
                tx.set_cursor(connector, json.dumps({url: secrets.token_hex(20) for url in cursor}), iso(datetime.now(UTC)))
        finally:
            store.close()

    return expire


def _harness(
    server: DavServer, calendar_url: str, expire: Callable[[], Awaitable[None]], proxy: RunningServer | None = None, **options: Any
) -> Harness:
    """The connector reaches the server directly, or through ``proxy`` (which can throttle it)."""
    base = proxy.url if proxy is not None else server.base_url
    config: dict[str, Any] = {"type": "caldav", "url": base + "/", **options}
    if server.username:
        config |= {"username": server.username, "password": {"env": SECRET_ENV}}
    return Harness(config, {"calendar": base + urlsplit(calendar_url).path}, CalDAVVendor(server, calendar_url, expire, proxy))


def connector_for(harness: Harness, tmp_path: Path, **options: Any) -> CalDAVConnector:
    """A connector built from the harness config as ``syncbridge run`` would, with ``options`` changed."""
    import yaml

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
    assert isinstance(connector, CalDAVConnector)
    return connector


def session(hour: int = 10, **extra: Any) -> dict[str, Any]:
    start = next_weekday_at(hour)
    return empty_snapshot() | {
        "clinician": CLINICIAN, "client_key": "client-4711", "service_code": "90837", "location": "Room 2",
        "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": ZONE,
    } | extra  # fmt: skip


class CalDAVScenarios:
    """CalDAV behaviour beyond the shared suite: incremental pulls, costs, auth, privacy."""

    #: HTTP requests one incremental pull may cost when one event changed
    one_change_requests: int = 2

    async def test_incremental_pull_sees_move_and_delete(self, world: World, caplog: pytest.LogCaptureFixture) -> None:
        """After the first full sync, a move and a delete in the calendar arrive by incremental sync."""
        caplog.set_level(logging.DEBUG)
        a = world.book_here(next_weekday_at(9))
        b = world.book_here(next_weekday_at(11))
        await world.drain()
        await world.sync(full=True)
        new_start = next_weekday_at(15)
        await world.vendor.move(world.external_id(a), new_start, new_start + timedelta(minutes=50))
        await world.vendor.delete(world.external_id(b))
        await world.vendor.add_private_event(new_start, new_start + timedelta(hours=1), "Therapy of my own")
        report = await world.sync()
        assert report.updated == 2
        assert world.store.appointment(a).start == new_start
        assert world.store.appointment(b).cancelled
        assert len(world.store.appointments()) == 2
        assert b"Therapy of my own" not in Path(world.store.path).read_bytes()
        assert "Therapy of my own" not in caplog.text and "insurance card" not in caplog.text

    async def test_one_change_costs_few_requests(self, world: World) -> None:
        """Polling a calendar where one session moved costs one or two HTTP requests, not a listing."""
        appt = world.book_here(next_weekday_at(9))
        await world.drain()
        await world.sync(full=True)
        new_start = next_weekday_at(13)
        await world.vendor.move(world.external_id(appt), new_start, new_start + timedelta(minutes=50))
        connector = world.connector
        assert isinstance(connector, CalDAVConnector)
        before = connector.client.requests
        result = await connector.pull(world.store.cursor(connector.name))
        spent = connector.client.requests - before
        assert [o.canonical_id for o in result.observations] == [appt]
        assert spent <= self.one_change_requests, f"{spent} requests"

    async def test_stale_write_is_a_conflict(self, world: World) -> None:
        """Writing over an event a person just changed fails with a conflict instead of overwriting it."""
        appt = world.book_here(next_weekday_at(9))
        await world.drain()
        link = world.store.link(world.connector.name, appt)
        assert link is not None
        start = next_weekday_at(16)
        await world.vendor.move(link.external_id, start, start + timedelta(minutes=50))
        desired = world.connector.capabilities.project(world.store.appointment(appt).fields)
        with pytest.raises(ConflictError):
            await world.connector.apply(appt, desired, link)

    async def test_unreadable_session_event_does_not_cancel_it(self, world: World) -> None:
        """An event someone broke (ends before it starts) is skipped and reported, never read as deleted."""
        good = world.book_here(next_weekday_at(9))
        bad = world.book_here(next_weekday_at(11))
        await world.drain()
        ext = world.external_id(bad)
        start = next_weekday_at(11)
        await world.vendor.move(ext, start, start - timedelta(hours=1))
        result = await world.connector.pull(None)
        assert not result.complete, "a listing missing an unreadable event must not claim completeness"
        assert [o.canonical_id for o in result.observations if not o.problem] == [good]
        assert [o.external_id for o in result.observations if o.problem] == [ext]
        report = await world.sync(full=True)
        assert report.rejected == 1
        assert not world.store.appointment(bad).cancelled
        (entry,) = world.store.audit_entries(kind="rejected")
        assert entry["detail"]["external_id"] == ext and "before it starts" in entry["detail"]["problem"]

    async def test_check_reads_without_writing(self, harness: Harness, tmp_path: Path) -> None:
        """``syncbridge check`` reports the calendar as reachable and how it will be synced."""
        connector = connector_for(harness, tmp_path)
        try:
            assert "1 calendar(s) reachable" in await connector.check()
        finally:
            await connector.close()

    async def test_calendar_found_by_name(self, harness: Harness, tmp_path: Path) -> None:
        """An admin may name the calendar instead of pasting its URL; it is found under the principal."""
        name = harness.account["calendar"].rstrip("/").rsplit("/", 1)[-1]
        connector = connector_for(harness, tmp_path)
        connector.clinicians[CLINICIAN] = {"calendar": name}
        try:
            assert (await connector.calendars())[CLINICIAN] == harness.account["calendar"]
        finally:
            await connector.close()

    async def test_event_shows_nothing_about_the_client(self, harness: Harness, tmp_path: Path) -> None:
        """The calendar event carries the title template and room only: no client key, no service code."""
        connector = connector_for(harness, tmp_path)
        try:
            appt = new_canonical_id()
            result = await connector.apply(appt, connector.capabilities.project(session()), None)
            raw = await _raw(harness, result.external_id)
        finally:
            await connector.close()
        assert "SUMMARY:Client session" in raw and "LOCATION:Room 2" in raw
        assert f"X-SYNCBRIDGE-ID:{appt}" in raw and f"UID:{appt}@syncbridge" in raw
        assert "client-4711" not in raw and "90837" not in raw
        assert result.disclosed == ("title:template", "location")

    async def test_busy_disclosure_shows_only_busy(self, harness: Harness, tmp_path: Path) -> None:
        """With disclosure "busy" (a personal iCloud) the event says "Busy" and holds no location at all."""
        connector = connector_for(harness, tmp_path, disclosure="busy")
        try:
            result = await connector.apply(new_canonical_id(), connector.capabilities.project(session()), None)
            raw = await _raw(harness, result.external_id)
            obs = await connector.read(result.external_id)
        finally:
            await connector.close()
        assert "SUMMARY:Busy" in raw and "Room 2" not in raw and "LOCATION" not in raw
        assert "location" not in obs.fields and result.disclosed == ("title:busy",)

    async def test_mark_mode_keeps_a_cancelled_event(self, harness: Harness, tmp_path: Path) -> None:
        """With on_cancel "mark" a cancelled session stays visible as cancelled and free, not as a live session."""
        connector = connector_for(harness, tmp_path, on_cancel="mark")
        try:
            appt = new_canonical_id()
            created = await connector.apply(appt, connector.capabilities.project(session()), None)
            link = Link(harness.name, appt, created.external_id, created.etag, None)
            cancelled = connector.capabilities.project(session(status="noshow"))
            result = await connector.apply(appt, cancelled, link)
            obs = await connector.read(created.external_id)
        finally:
            await connector.close()
        assert not result.gone and obs.fields["status"] == "cancelled" and obs.etag == result.etag
        raw = await _raw(harness, created.external_id)
        assert "STATUS:CANCELLED" in raw and "TRANSP:TRANSPARENT" in raw
        assert await harness.vendor.live() == []


async def _raw(harness: Harness, external_id: str | None) -> str:
    vendor = harness.vendor
    assert isinstance(vendor, CalDAVVendor) and external_id

    def get() -> str:
        with vendor.server.http() as http:
            return http.get(vendor.server.base_url + external_id).text.replace("\r\n ", "")

    return await asyncio.to_thread(get)


@pytest.fixture
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, PASSWORD)


@pytest.fixture(scope="module")
def radicale_proxy(radicale_server: DavServer) -> Iterator[RunningServer]:  # noqa: F811
    """Radicale as the connector reaches it: through a proxy that can answer 429 instead."""
    proxy = serve_in_thread(reverse_proxy(radicale_server.base_url))
    yield proxy
    proxy.stop()


class TestRadicale(CalDAVScenarios, ConnectorContract):
    """Radicale 3: htpasswd auth, sync-collection with data inline, 403 for an expired token;
    reached through a proxy that can throttle it (429 with Retry-After)."""

    one_change_requests = 1

    @pytest.fixture
    def harness(self, radicale_server: DavServer, radicale_proxy: RunningServer, _secret: None) -> Iterator[Harness]:  # noqa: F811
        cal = radicale_server.make_calendar()
        yield _harness(radicale_server, cal, _radicale_expiry(radicale_server, cal), radicale_proxy)
        radicale_server.delete_calendar(cal)


class TestRadicaleEtagPolling(CalDAVScenarios, ConnectorContract):
    """Radicale driven as a server without RFC 6578: ctag and ETag comparison only."""

    one_change_requests = 3

    @pytest.fixture
    def harness(self, radicale_server: DavServer, _secret: None) -> Iterator[Harness]:  # noqa: F811
        cal = radicale_server.make_calendar()

        async def nothing_to_expire() -> None:
            return None  # a ctag/ETag cursor holds no server-side token that could expire

        yield _harness(radicale_server, cal, nothing_to_expire, sync_method="etag")
        radicale_server.delete_calendar(cal)


class TestXandikos(CalDAVScenarios, ConnectorContract):
    """Xandikos: no auth, sync-collection without inline data (multiget), 412 for a bad token."""

    @pytest.fixture
    def harness(self, xandikos_server: DavServer, tmp_path: Path) -> Iterator[Harness]:  # noqa: F811
        cal = xandikos_server.make_calendar()
        yield _harness(xandikos_server, cal, _unknown_token_in_store(tmp_path, "under_test"))
        xandikos_server.delete_calendar(cal)


def test_servers_answer(radicale_server: DavServer, xandikos_server: DavServer) -> None:  # noqa: F811
    """Both real servers start on loopback and accept a new calendar (the suite's precondition)."""
    for server in (radicale_server, xandikos_server):
        url = server.make_calendar()
        with server.http() as http:
            assert http.request("PROPFIND", url, headers={"Depth": "0"}).status_code == 207
        server.delete_calendar(url)
    assert httpx.URL(radicale_server.base_url).host == "127.0.0.1"


@pytest.mark.usefixtures("_secret")
async def test_wrong_password_asks_for_an_app_password(
    radicale_server: DavServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused login tells the admin what to do (app-specific password) and never shows the password."""
    monkeypatch.setenv(SECRET_ENV, "not-the-password")
    calendar = radicale_server.make_calendar()
    connector = connector_for(_harness(radicale_server, calendar, _radicale_expiry(radicale_server, calendar)), tmp_path)
    try:
        with pytest.raises(AuthError) as caught:
            await connector.check()
    finally:
        await connector.close()
        radicale_server.delete_calendar(calendar)
    assert "401" in str(caught.value) and "app-specific password" in caught.value.action
    assert "not-the-password" not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "preconditions", "retry_after", "expected"),
    [
        (401, [], None, AuthError),
        (403, [], None, AuthError),
        (403, ["{DAV:}valid-sync-token"], None, CursorExpired),
        (412, ["{DAV:}valid-sync-token"], None, CursorExpired),
        (412, [], None, ConflictError),
        (429, [], "7", RateLimited),
        (503, [], "120", RateLimited),
        (500, [], None, TransientError),
        (502, [], None, TransientError),
        (400, [], None, PermanentError),
        (404, [], None, PermanentError),
    ],
)
def test_http_answers_map_to_what_the_caller_must_do(
    status: int, preconditions: list[str], retry_after: str | None, expected: type
) -> None:
    """Every server answer becomes the right action: re-login, resync, re-merge, back off, retry or give up."""
    with pytest.raises(expected) as caught:
        raise_for_status(status, "PUT /cal/x.ics", retry_after=retry_after, preconditions=preconditions)
    if retry_after:
        assert caught.value.retry_after == float(retry_after)
    assert type(caught.value) is expected


def test_network_failures_are_transient() -> None:
    """A refused connection or a timeout is retried later, not treated as a broken record."""
    import niquests

    for err in (niquests.exceptions.ConnectionError("refused"), niquests.exceptions.Timeout("slow"), OSError("reset")):
        mapped = translate(err, "REPORT /cal/")
        assert isinstance(mapped, TransientError) and not isinstance(mapped, RateLimited)
