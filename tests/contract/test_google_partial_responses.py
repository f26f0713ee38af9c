"""A clinician's private events never leave Google with their text: every listing is a partial
response, and only one of OUR session events changed by someone else has its title read.

Read from the emulator's wire log (every request's query and every body it answered), across a
full sync, busy time, incremental polls, a push-scoped pull and a session retitled with #late.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from syncbridge_connectors.google_calendar.echoes import KnownEtags
from syncbridge_connectors.google_calendar.emulator import Exchange, Running
from syncbridge_connectors.google_calendar.emulator_events import ApiError, parse_fields, pick
from tests.contract.suite import next_weekday_at
from tests.contract.test_google_scoped_push import EMAILS, NAME, google, practice  # noqa: F401 - the fixture

PRIVATE = ("Dinner with John Smith", "Margaret Whitfield", "john.smith@example.com")


def listed(wire: list[Exchange]) -> list[Exchange]:
    return [x for x in wire if x.method == "GET" and x.path.endswith("/events")]


def fields_of(x: Exchange) -> str:
    return parse_qs(x.query).get("fields", [""])[-1]


async def test_private_event_text_never_reaches_syncbridge(google: Running, tmp_path: Path) -> None:
    """Full sync, busy time, polls, a push and a #late retitle: no answer carries a private event's
    text, every listing asks for fields without any text, and the tag is still found."""
    emu = google.emulator
    emu.record_wire()
    start = next_weekday_at(19)
    private = emu.user_insert(EMAILS["dr_a"], {
        "summary": "Dinner with John Smith", "description": "Ask Margaret Whitfield about the lease", "location": "Luigi's",
        "attendees": [{"email": "john.smith@example.com", "displayName": "John Smith", "responseStatus": "accepted"}],
        "start": {"dateTime": start.isoformat()}, "end": {"dateTime": (start + timedelta(hours=2)).isoformat()},
    })  # fmt: skip
    async with practice(google, tmp_path) as p:  # a full sync and the channels
        appt = p.book("dr_a", 10)
        await p.outbox.drain()
        assert await p.pushes() == 0
        await p.engine.sync(NAME)  # an incremental poll of every calendar
        busy = await p.connector.busy(start - timedelta(days=1), start + timedelta(days=1))
        assert [b.clinician for b in busy] == ["dr_a"]

        emu.user_patch(EMAILS["dr_a"], private["id"], {"description": "Margaret Whitfield: call back"})
        assert await p.pushes() == 1  # a pull of dr_a's calendar alone
        emu.user_patch(EMAILS["dr_a"], private["id"], {"summary": "Dinner with John Smith (moved)"})
        await p.engine.sync(NAME)  # a poll picks it up first; its push then pulls dr_a again
        assert await p.pushes() == 1

        assert p.store.appointment(appt) is not None and not p.store.appointment(appt).cancelled
        before = len(emu.wire or [])
        emu.user_patch(EMAILS["dr_a"], p.event_id(appt), {"summary": "Client session #late"})
        assert await p.pushes() == 1
        record = p.store.appointment(appt)
        assert record is not None and record.cancelled and record.fields["cancellation"]["kind"] == "late_cancel"
        gets = [x for x in list(emu.wire or [])[before:] if x.method == "GET" and not x.path.endswith("/events")]
        assert [(x.path.rsplit("/", 1)[1], fields_of(x)) for x in gets] == [(p.event_id(appt), "etag,summary,description")]
        assert json.loads(gets[0].body)["summary"] == "Client session #late"

    wire = list(emu.wire or [])
    assert len(listed(wire)) >= 6, "full sync, polls, busy time and pushes were all seen"
    for x in listed(wire):
        selection = fields_of(x)
        assert selection, f"events.list without fields: {x.query}"
        assert not {"summary", "description", "location"} & set(selection.replace("(", ",").replace(")", ",").replace("/", ",").split(","))
        assert "attendees(self,responseStatus)" in selection or "attendees" not in selection
    for x in wire:
        for text in PRIVATE:
            assert text.encode() not in x.body, f"{text!r} reached syncbridge in {x.method} {x.path}?{x.query}"


def test_emulator_answers_partial_responses_as_google_documents(google: Running) -> None:
    """fields takes a list, a/b, a(b,c) and *; a malformed selection is a 400."""
    emu = google.emulator
    emu.user_insert(EMAILS["dr_a"], {"summary": "Dentist", "description": "root canal", "start": {"dateTime": "2030-01-07T12:00:00Z"},
                                     "end": {"dateTime": "2030-01-07T13:00:00Z"}, "extendedProperties": {"private": {"k": "v"}}})  # fmt: skip
    base = google.api_root + f"calendars/{EMAILS['dr_a']}/events"
    with httpx.Client(headers={"Authorization": f"Bearer {_token_for(google)}"}) as http:
        page = http.get(base, params={"fields": "items(id,start/dateTime,extendedProperties/private),nextSyncToken"}).json()
        (item,) = page["items"]
        assert set(page) == {"items", "nextSyncToken"} and set(item) == {"id", "start", "extendedProperties"}
        assert set(item["start"]) == {"dateTime"} and item["extendedProperties"] == {"private": {"k": "v"}}
        whole = http.get(base, params={"fields": "items/*"}).json()
        assert whole["items"][0]["summary"] == "Dentist" and set(whole) == {"items"}
        one = http.get(f"{base}/{item['id']}", params={"fields": "etag,summary"}).json()
        assert set(one) == {"etag", "summary"}
        assert http.get(base, params={"fields": "items(id"}).status_code == 400
    assert pick({"a": {"b": 1, "c": 2}, "d": 3}, parse_fields("a(*)")) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ApiError):
        parse_fields("a,,b")


def _token_for(google: Running) -> str:
    """An access token for dr_a (the contract tests' helper signs in as their single clinician)."""
    from google.auth.transport.requests import Request
    from google.oauth2 import service_account

    info = google.emulator.add_service_account("probe@practice-project.iam.gserviceaccount.com")
    creds = service_account.Credentials.from_service_account_info(info, scopes=["https://www.googleapis.com/auth/calendar.events"])
    creds = creds.with_subject(EMAILS["dr_a"])
    creds.refresh(Request())
    return str(creds.token)


async def test_several_outside_edits_have_their_texts_read_in_one_batch(google: Running, tmp_path: Path) -> None:
    """Two sessions retitled in Google: each one's tag is found, with one events.get each sent in a
    single batch request; a restarted connector (no etags remembered) reads them again, also batched."""
    emu = google.emulator
    async with practice(google, tmp_path) as p:
        appts = [p.book("dr_a", 9), p.book("dr_a", 11)]
        await p.outbox.drain()
        assert await p.pushes() == 0
        cursor = p.store.cursor(NAME)
        assert cursor is not None
        emu.user_patch(EMAILS["dr_a"], p.event_id(appts[0]), {"summary": "Client session #noshow"})
        emu.user_patch(EMAILS["dr_a"], p.event_id(appts[1]), {"description": "running #late"})
        mark = len(emu.log)
        result = await p.connector.pull_accounts(cursor, frozenset({"dr_a"}))
        assert {o.canonical_id: o.tags for o in result.observations} == {appts[0]: frozenset({"noshow"}), appts[1]: frozenset({"late"})}
        assert [m for m, path in emu.log[mark:] if path != "/token"] == ["GET", "POST", "GET", "GET"]  # the listing, then one batch of two gets
        again = await p.connector.pull_accounts(cursor, frozenset({"dr_a"}))
        assert {o.canonical_id for o in again.observations} == set(appts)
        assert sum(1 for m, path in emu.log[mark:] if m == "GET" and not path.endswith("/events")) == 2, "known etags are not read twice"
        p.connector.etags = KnownEtags()  # what a restart forgets
        mark = len(emu.log)
        restarted = await p.connector.pull_accounts(cursor, frozenset({"dr_a"}))
        assert {o.canonical_id: o.tags for o in restarted.observations} == {appts[0]: frozenset({"noshow"}), appts[1]: frozenset({"late"})}
        assert [m for m, path in emu.log[mark:] if path != "/token"] == ["GET", "POST", "GET", "GET"]


async def test_a_restart_reads_no_text_of_events_the_store_already_knows(google: Running, tmp_path: Path) -> None:
    """The connector's memory of etags is gone after a restart; the store's is not (Host.known_etag):
    a full listing then reads no event's text unless someone edited it since."""
    emu = google.emulator
    async with practice(google, tmp_path) as p:
        appts = [p.book("dr_a", 9), p.book("dr_b", 11), p.book("dr_c", 15)]
        await p.outbox.drain()
        await p.engine.sync(NAME)  # the echoes merged: the store holds each copy's etag

        def from_store(external_id: str) -> str | None:
            link = p.store.link_by_external(NAME, external_id)
            return link.etag if link is not None else None

        p.connector.host.known_etag = from_store  # type: ignore[method-assign] # what the daemon's host answers
        p.connector.etags = KnownEtags()  # what a restart forgets
        emu.user_patch(EMAILS["dr_b"], p.event_id(appts[1]), {"summary": "Client session #late"})
        mark = len(emu.log)
        listing = await p.connector.pull(None)
        assert {o.canonical_id for o in listing.observations} >= set(appts)
        reads = [path for m, path in emu.log[mark:] if m == "GET" and not path.endswith("/events") and path != "/token"]
        assert reads == [f"/calendar/v3/calendars/{EMAILS['dr_b']}/events/{p.event_id(appts[1])}"], reads
