"""One account's trouble stays its own (DESIGN section 9): with one of three clinicians' mailboxes
or calendars failing, the other two clinicians' changes still arrive in the same pull, and the
status names the account that could not be read. Microsoft 365 and Google Calendar run against
their emulators; CalDAV against real Radicale and Xandikos servers, behind a proxy that makes one
calendar answer as the test asks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.emulation import reverse_proxy, serve_in_thread
from syncbridge.engine import Engine
from syncbridge.model import empty_snapshot, iso
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.runtime import Daemon
from syncbridge.store import Store
from tests.contract.suite import ZONE, next_weekday_at
from tests.contract.test_caldav import SECRET_ENV as CALDAV_SECRET_ENV
from tests.contract.test_google_calendar import sa_key_file
from tests.contract.test_microsoft365 import CLIENT_ID, SECRET, SECRET_ENV, m365_config
from tests.servers import PASSWORD, DavServer, radicale_server, xandikos_server  # noqa: F401 - fixtures
from tests.support.emulators import google_calendar, microsoft365

#: clinician -> the address of their mailbox or calendar
ACCOUNTS = {"dr_a": "dr.avery@lakeside.example", "dr_b": "dr.brooks@lakeside.example", "dr_c": "dr.chen@lakeside.example"}


@dataclass
class System:
    """One calendar system with three clinicians' accounts, and what a test does to it."""

    connector: dict[str, Any]
    #: clinician -> their account settings in the connector ({"mailbox": ...}, {"calendar": ...})
    accounts: dict[str, dict[str, Any]]
    #: clinician -> how the status names their account (an address, a calendar URL)
    shown: dict[str, str]
    #: delete the event with this external id, as the clinician would in the system's own app
    delete: Callable[[str], None]
    #: make one clinician's account answer ``status`` (None: answer normally again)
    fail: Callable[[str, int | None, float | None], None]
    #: make every batch request answer ``status`` as a whole (None: take them again); None for a
    #: system without batch requests
    refuse_batches: Callable[[int | None], None] | None = None
    #: remove one clinician's calendar from the server itself (None: the system cannot be told to)
    remove: Callable[[str], None] | None = None


def _by_address(key: str) -> dict[str, dict[str, Any]]:
    return {c: {key: a} for c, a in ACCOUNTS.items()}


@pytest.fixture(params=["microsoft365", "google_calendar", "radicale", "xandikos"])
def system(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[System]:
    if request.param == "microsoft365":
        monkeypatch.setenv(SECRET_ENV, SECRET)
        with microsoft365(tmp_path / "graph-tls", CLIENT_ID, SECRET, *ACCOUNTS.values()) as graph:
            def delete(ext: str) -> None:
                clinician, _, event_id = ext.partition("/")
                graph.emulator.user_delete(ACCOUNTS[clinician], event_id)

            yield System(m365_config(graph, poll_interval=300), _by_address("mailbox"), ACCOUNTS, delete,
                         lambda c, status, wait: graph.emulator.fail_mailbox(ACCOUNTS[c], status, retry_after=wait),
                         lambda status: setattr(graph.emulator, "batch_refusal", status))
    elif request.param == "google_calendar":
        with google_calendar(*ACCOUNTS.values(), zone=ZONE) as google:
            def delete(ext: str) -> None:
                calendar, _, event_id = ext.rpartition("/")
                google.emulator.user_delete(calendar, event_id)

            def fail(clinician: str, status: int | None, wait: float | None) -> None:
                reason = {403: "forbidden", 404: "notFound"}.get(status or 0, "rateLimitExceeded")
                google.emulator.fail_calendar(ACCOUNTS[clinician], status, reason, retry_after=wait)

            config = {"type": "google_calendar", "service_account_key": {"file": str(sa_key_file(google, tmp_path))},
                      "api_root": google.api_root, "poll_interval": 300}
            yield System(config, _by_address("email"), ACCOUNTS, delete, fail, lambda status: setattr(google.emulator, "batch_refusal", status))
    else:
        monkeypatch.setenv(CALDAV_SECRET_ENV, PASSWORD)
        yield from _caldav(request.getfixturevalue(f"{request.param}_server"))


def _caldav(server: DavServer) -> Iterator[System]:
    """Three calendars on a real CalDAV server, reached through a proxy that can fail one of them."""
    calendars = {c: server.make_calendar() for c in ACCOUNTS}
    proxy = serve_in_thread(reverse_proxy(server.base_url))
    config: dict[str, Any] = {"type": "caldav", "url": proxy.url + "/", "poll_interval": 300}
    if server.username:
        config |= {"username": server.username, "password": {"env": CALDAV_SECRET_ENV}}

    def delete(ext: str) -> None:
        with server.http() as http:
            http.delete(server.base_url + ext).raise_for_status()

    def fail(clinician: str, status: int | None, wait: float | None) -> None:
        proxy.injector.fail_path(urlsplit(calendars[clinician]).path, status, wait)

    try:
        yield System(config, {c: {"calendar": proxy.url + urlsplit(url).path} for c, url in calendars.items()},
                     {c: urlsplit(url).path for c, url in calendars.items()}, delete, fail,
                     remove=lambda clinician: server.delete_calendar(calendars[clinician]))
    finally:
        proxy.stop()
        for url in calendars.values():
            with contextlib.suppress(httpx.HTTPError):
                server.delete_calendar(url)


def _config(system: System, tmp_path: Path) -> dict[str, object]:
    return {
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {c: {"accounts": {"cal": a}} for c, a in system.accounts.items()},
        "connectors": {"cal": system.connector},
        "outbox": {"backoff_base": 0.05, "backoff_max": 0.5},
        "http": {"enabled": False},
    }


@dataclass
class Practice:
    store: Store
    engine: Engine
    outbox: Outbox
    system: System
    sessions: dict[str, str]  # clinician -> the appointment booked for them

    def book(self, clinician: str, start: datetime) -> str:
        appt = f"sb-{clinician}-{start:%H%M}"
        snap = empty_snapshot() | {"clinician": clinician, "client_key": "c1", "start": iso(start),
                                   "end": iso(start + timedelta(minutes=50)), "timezone": ZONE}
        self.engine.change(appt, snap, via="ehr")
        return appt

    def delete_in_calendar(self, appt: str) -> None:
        link = self.store.link("cal", appt)
        assert link is not None and link.external_id
        self.system.delete(link.external_id)

    def cancelled(self, appt: str) -> bool:
        record = self.store.appointment(appt)
        return record is not None and record.cancelled


@contextlib.asynccontextmanager
async def practice(system: System, tmp_path: Path, *, more: int = 0) -> AsyncIterator[Practice]:
    """A practice with a session per clinician written and listed; ``more`` sessions each besides
    (several writes to one calendar go in one vendor batch)."""
    cfg = parse_config(yaml.safe_dump(_config(system, tmp_path)))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    p = Practice(store, engine, Outbox(engine), system, {})
    try:
        p.sessions = {c: p.book(c, next_weekday_at(9 + i)) for i, c in enumerate(ACCOUNTS)}
        for k in range(more):
            for i, c in enumerate(ACCOUNTS):
                p.book(c, next_weekday_at(12, days_ahead=1 + k) + timedelta(minutes=k))
        await p.outbox.drain()
        await engine.sync("cal", full=True)
        yield p
    finally:
        for c in connectors.values():
            await c.close()
        store.close()


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_one_mailbox_refused_the_others_are_read(system: System, tmp_path: Path, status: int) -> None:
    """Dr Brooks's mailbox or calendar answers 401 (her sign-in revoked), 403 (access withdrawn) or
    404 (removed): the
    cancellations made in Dr Avery's and Dr Chen's calendars arrive in the same pull, the status
    names Dr Brooks's account, and hers arrives once it answers again."""
    async with practice(system, tmp_path) as p:
        system.fail("dr_b", status, None)
        for appt in p.sessions.values():
            p.delete_in_calendar(appt)
        await p.engine.sync("cal")
        assert p.cancelled(p.sessions["dr_a"]) and p.cancelled(p.sessions["dr_c"])
        assert not p.cancelled(p.sessions["dr_b"])
        state = p.store.connector_state("cal")
        assert not state["healthy"] and system.shown["dr_b"] in state["note"] and "dr_b" in state["note"]
        assert system.shown["dr_a"] not in state["note"]

        system.fail("dr_b", None, None)
        await p.engine.sync("cal")
        assert p.cancelled(p.sessions["dr_b"])
        assert p.store.connector_state("cal")["healthy"]


async def test_a_full_listing_missing_an_account_cancels_none_of_its_sessions(system: System, tmp_path: Path) -> None:
    """The daily sweep while one account answers 403: its sessions are unread, not gone; once it
    answers, it is listed and a session deleted there meanwhile is cancelled."""
    async with practice(system, tmp_path) as p:
        second = p.book("dr_b", next_weekday_at(15))
        await p.outbox.drain()
        system.fail("dr_b", 403, None)
        p.delete_in_calendar(p.sessions["dr_b"])
        await p.engine.sync("cal", full=True)
        assert not p.cancelled(p.sessions["dr_b"]) and not p.cancelled(second)
        assert not p.store.connector_state("cal")["healthy"]

        system.fail("dr_b", None, None)
        await p.engine.sync("cal")
        assert p.cancelled(p.sessions["dr_b"]) and not p.cancelled(second)
        assert p.store.connector_state("cal")["healthy"]


async def test_a_throttled_account_is_read_again_after_its_retry_after(system: System, tmp_path: Path) -> None:
    """Dr Brooks's account answers 429 with Retry-After 1: the daemon applies the other two
    cancellations at once and reads her account again after a second, not at the next poll."""
    async with practice(system, tmp_path) as p:
        system.fail("dr_b", 429, 1)
        for appt in p.sessions.values():
            p.delete_in_calendar(appt)
        daemon = Daemon(None, parse_config(yaml.safe_dump(_config(system, tmp_path))))  # the same store
        try:
            started = time.monotonic()
            await daemon.poll("cal")
            assert p.cancelled(p.sessions["dr_a"]) and p.cancelled(p.sessions["dr_c"])
            assert not p.cancelled(p.sessions["dr_b"])
            system.fail("dr_b", None, None)
            deadline = time.monotonic() + 10
            while not p.cancelled(p.sessions["dr_b"]):
                assert time.monotonic() < deadline, "the throttled account was not read again"
                await asyncio.sleep(0.05)
            assert 1.0 <= time.monotonic() - started < 5
        finally:
            await daemon.close()


async def test_a_calendar_removed_from_the_server_leaves_the_others_syncing(system: System, tmp_path: Path) -> None:
    """Dr Brooks's calendar is deleted on the server itself (its own 404, no proxy involved): the
    other two clinicians' cancellations arrive in the same pull and the status names her calendar;
    her session is not cancelled by it."""
    if system.remove is None:
        pytest.skip("the system cannot be told to remove an account")
    async with practice(system, tmp_path) as p:
        system.remove("dr_b")
        for clinician in ("dr_a", "dr_c"):
            p.delete_in_calendar(p.sessions[clinician])
        await p.engine.sync("cal")
        assert p.cancelled(p.sessions["dr_a"]) and p.cancelled(p.sessions["dr_c"])
        assert not p.cancelled(p.sessions["dr_b"])
        state = p.store.connector_state("cal")
        assert not state["healthy"] and system.shown["dr_b"] in state["note"] and "404" in state["note"]
        await p.engine.sync("cal", full=True)  # the daily sweep: her session is unread, not gone
        assert not p.cancelled(p.sessions["dr_b"])


@pytest.mark.parametrize("status", [403, 500])
async def test_an_account_whose_writes_keep_failing_holds_no_other_accounts_writes(system: System, tmp_path: Path, status: int) -> None:
    """Dr Brooks's mailbox or calendar refuses every request (403) or keeps failing (500): the
    sessions booked for Dr Avery and Dr Chen meanwhile reach their calendars in the same drain,
    again and again, while Dr Brooks's write waits out its own backoff (the others' writes landing
    do not send it again) and is never dead-lettered; a refusal is named in the status as hers;
    once her account answers, the next poll sends it."""
    async with practice(system, tmp_path) as p:
        p.outbox.cfg = p.outbox.cfg.model_copy(update={"backoff_base": 30.0, "backoff_max": 60.0})
        system.fail("dr_b", status, None)
        stuck = p.book("dr_b", next_weekday_at(14, days_ahead=9))

        def attempts() -> int:
            return sum(i.attempts for i in p.store.outbox_due(float("inf"), 10) if i.appointment_id == stuck)

        for round_ in range(3):
            others = [p.book(c, next_weekday_at(15 + round_, days_ahead=9)) for c in ("dr_a", "dr_c")]
            await p.outbox.drain()
            assert all(p.store.link("cal", appt) is not None for appt in others), f"round {round_}"
            assert p.store.link("cal", stuck) is None and attempts() == 1
        assert p.store.dead_letters() == []
        if status == 403:  # refused, not weather: the status names her account at once, and only hers
            note = p.store.connector_state("cal")["note"] or ""
            assert "writes for dr_b failing" in note and "dr_a" not in note and "dr_c" not in note

        system.fail("dr_b", None, None)
        daemon = Daemon(None, parse_config(yaml.safe_dump(_config(system, tmp_path))))  # the same store
        try:
            await daemon.poll("cal")  # a good pull sends one waiting write of each account it read
            await daemon.outbox.drain()
            assert p.store.link("cal", stuck) is not None and p.store.dead_letters() == []
            assert "writes for" not in (p.store.connector_state("cal")["note"] or "")
        finally:
            await daemon.close()
