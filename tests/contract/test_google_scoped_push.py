"""A Google push costs one listing of the calendar it names, whatever the size of the practice, and
the push of our own write costs none.

Three clinicians' calendars in the Calendar emulator, watch channels delivered over real HTTP to the
connector's webhook route on loopback; notifications accepted are then handled as the daemon's
inbox does (``webhook_accounts`` -> a pull of those accounts alone).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from syncbridge.config import parse_config
from syncbridge.emulation import RunningServer, serve_in_thread
from syncbridge.engine import Engine
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.google_calendar.connector import GoogleCalendarConnector
from syncbridge_connectors.google_calendar.emulator import GoogleCalendarEmulator, Running
from syncbridge_connectors.google_calendar.mapping import event_id_for
from tests.contract.suite import ZONE, next_weekday_at
from tests.contract.test_google_calendar import RecordingHost
from tests.support.emulators import google_calendar

NAME = "google"
EMAILS = {"dr_a": "dr.a@practice.example", "dr_b": "dr.b@practice.example", "dr_c": "dr.c@practice.example"}


@pytest.fixture
def google() -> Iterator[Running]:
    with google_calendar(*EMAILS.values(), zone=ZONE) as server:
        yield server


@dataclass
class Practice:
    emulator: GoogleCalendarEmulator
    store: Store
    engine: Engine
    outbox: Outbox
    connector: GoogleCalendarConnector
    host: RecordingHost
    receiver: RunningServer
    handled: int = 0

    def book(self, clinician: str, hour: int) -> str:
        start = next_weekday_at(hour)
        appt = new_canonical_id()
        self.engine.change(appt, empty_snapshot() | {
            "clinician": clinician, "client_key": "client-" + appt[-6:], "start": iso(start), "end": iso(start + timedelta(minutes=50)),
            "timezone": ZONE, "service_code": "90837", "location": "Room 2",
        }, via="front-desk")  # fmt: skip
        return appt

    def cancel(self, appt: str) -> None:
        record = self.store.appointment(appt)
        assert record is not None
        self.engine.change(appt, dict(record.fields) | {"status": "cancelled", "cancellation": {
            "by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)), "via": "front-desk"}},
            via="front-desk")  # fmt: skip

    def event_id(self, appt: str) -> str:
        return event_id_for(appt)

    async def pushes(self) -> int:
        """Wait for Google's notifications, then handle the new ones as the daemon's inbox does:
        the accounts they name are pulled alone; one naming none pulls everything. Answers how
        many were accepted (echoes of our own writes are not)."""
        self.emulator.settle()
        new = self.host.accepted[self.handled :]
        self.handled += len(new)
        named: set[str] = set()
        everything = False
        for headers, body in new:
            accounts = self.connector.webhook_accounts(headers, body)
            if accounts is None:
                everything = True
            else:
                named |= accounts
        if everything:
            await self.engine.sync(NAME)
        elif named:
            await self.engine.sync(NAME, accounts=frozenset(named))
        await self.outbox.drain()
        self.emulator.settle()
        return len(new)


@contextlib.asynccontextmanager
async def practice(server: Running, tmp_path: Path, **options: Any) -> AsyncIterator[Practice]:
    """Store, engine and outbox around a three-calendar connector whose webhook route is served on
    loopback as the daemon mounts it; the first full sync done and the channels open."""
    key = tmp_path / "sa.json"
    key.write_text(json.dumps(server.emulator.add_service_account("syncbridge@practice.iam.gserviceaccount.com")))
    key.chmod(0o600)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE}, "store": {"path": str(tmp_path / "push.db")},
        "clinicians": {k: {"accounts": {NAME: {"email": e}}} for k, e in EMAILS.items()},
        "connectors": {NAME: {"type": "google_calendar", "service_account_key": {"file": str(key)}, "api_root": server.api_root, **options}},
        "outbox": {"backoff_base": 0.05, "backoff_max": 0.2, "max_attempts": 6},
    }))  # fmt: skip
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    connector = connectors[NAME]
    assert isinstance(connector, GoogleCalendarConnector)
    engine = Engine(store, connectors, cfg)
    prefix = f"/webhooks/{NAME}"
    app = Starlette(routes=[Mount(prefix, routes=[Route(r.path, r.handler, methods=list(r.methods)) for r in connector.webhook_routes()])])
    receiver = serve_in_thread(app)
    host = RecordingHost(receiver.url + prefix)
    connector.host = host
    p = Practice(server.emulator, store, engine, Outbox(engine), connector, host, receiver)
    try:
        await engine.sync(NAME, full=True)
        await connector.maintain()
        assert len(server.emulator.channels) == len(EMAILS)
        assert await p.pushes() == 0, "opening a channel is not a change"
        yield p
    finally:
        await connector.close()
        receiver.stop()
        store.close()


def listings(emulator: GoogleCalendarEmulator, mark: int) -> list[str]:
    """The calendars events.list was called for since ``mark`` (batch parts included)."""
    return [p.split("/")[4] for m, p in emulator.log[mark:] if m == "GET" and p.endswith("/events")]


def calls(emulator: GoogleCalendarEmulator, mark: int) -> list[tuple[str, str]]:
    return [(m, p) for m, p in emulator.log[mark:] if p not in ("/token", "/batch/calendar/v3")]


async def test_our_own_writes_cost_no_listing(google: Running, tmp_path: Path) -> None:
    """Copying sessions into three calendars and cancelling one costs the writes alone: their pushes are recognised as echoes."""
    async with practice(google, tmp_path) as p:
        mark = len(google.emulator.log)
        appts = [p.book(clinician, 9 + i) for i, clinician in enumerate(EMAILS) for _ in range(2)]
        await p.outbox.drain()
        assert await p.pushes() == 0
        assert len(google.emulator.deliveries) >= len(EMAILS) + len(appts), "Google notified each insert"
        assert listings(google.emulator, mark) == []
        assert [m for m, _ in calls(google.emulator, mark)] == ["POST"] * len(appts)

        mark = len(google.emulator.log)
        p.cancel(appts[0])
        await p.outbox.drain()
        assert await p.pushes() == 0
        assert [m for m, _ in calls(google.emulator, mark)] == ["DELETE"], "a cancellation made elsewhere costs its delete alone"


async def test_a_change_in_one_calendar_lists_that_calendar_alone(google: Running, tmp_path: Path) -> None:
    """A session deleted in one clinician's calendar costs one events.list of that calendar, and the others' sync tokens stay put."""
    async with practice(google, tmp_path) as p:
        appts = {clinician: p.book(clinician, 10) for clinician in EMAILS}
        await p.outbox.drain()
        assert await p.pushes() == 0
        before = json.loads(p.store.cursor(NAME) or "{}")

        mark = len(google.emulator.log)
        google.emulator.user_delete(EMAILS["dr_b"], p.event_id(appts["dr_b"]))
        assert await p.pushes() == 1
        record = p.store.appointment(appts["dr_b"])
        assert record is not None and record.cancelled and record.fields["cancellation"]["via"] == NAME
        assert listings(google.emulator, mark) == [EMAILS["dr_b"]]
        assert len(calls(google.emulator, mark)) == 1, calls(google.emulator, mark)
        after = json.loads(p.store.cursor(NAME) or "{}")
        assert after[EMAILS["dr_b"]] != before[EMAILS["dr_b"]]
        assert {k: v for k, v in after.items() if k != EMAILS["dr_b"]} == {k: v for k, v in before.items() if k != EMAILS["dr_b"]}

        mark = len(google.emulator.log)  # a clinician's own event: still one listing, of that calendar
        google.emulator.user_insert(EMAILS["dr_c"], {"summary": "Dentist", "start": {"dateTime": "2030-01-07T12:00:00Z"},
                                                     "end": {"dateTime": "2030-01-07T13:00:00Z"}})  # fmt: skip
        assert await p.pushes() == 1
        assert listings(google.emulator, mark) == [EMAILS["dr_c"]] and len(calls(google.emulator, mark)) == 1


async def test_an_unknown_channel_pulls_every_calendar(google: Running, tmp_path: Path) -> None:
    """A stored notification from a channel the connector no longer knows pulls every calendar, as before."""
    async with practice(google, tmp_path) as p:
        assert p.connector.webhook_accounts({"x-goog-channel-id": "gone-channel", "x-goog-resource-state": "exists"}, b"") is None
        (channel_id,) = [c.id for c in google.emulator.channels.values() if c.calendar == EMAILS["dr_a"]]
        assert p.connector.webhook_accounts({"x-goog-channel-id": channel_id}, b"") == frozenset({"dr_a"})


async def test_without_echo_credits_every_push_pulls_its_calendar(google: Running, tmp_path: Path) -> None:
    """With echo_window 0 the push of our own insert is pulled like any other (one listing of that calendar)."""
    async with practice(google, tmp_path, echo_window=0) as p:
        mark = len(google.emulator.log)
        p.book("dr_a", 9)
        await p.outbox.drain()
        assert await p.pushes() == 1
        assert listings(google.emulator, mark) == [EMAILS["dr_a"]]


async def test_a_scoped_pull_whose_calendar_fails_names_it(google: Running, tmp_path: Path) -> None:
    """A push for a calendar Google refuses to read reports that calendar as failed, not the whole connector."""
    async with practice(google, tmp_path) as p:
        cursor = p.store.cursor(NAME)
        assert cursor is not None
        google.emulator.fail_calendar(EMAILS["dr_b"], 403, "forbidden")
        result = await p.connector.pull_accounts(cursor, frozenset({"dr_b"}))
        assert set(result.failed_accounts) == {"dr_b"} and result.cursor == json.dumps(json.loads(cursor), sort_keys=True)
