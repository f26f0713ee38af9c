"""What the Graph connector asks Microsoft for, and what it gets back (issue 23).

A notification pulls only its own mailbox, so push costs the same at 3 clinicians as at 30; every
call that Graph lets narrow with ``$select`` leaves the clinicians' own events' text at Microsoft;
one mailbox never has more than Outlook's four requests in flight. Read from the emulator's logs
of requests and of the response bodies the connector received.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import ApplyResult, Host, Write
from syncbridge.engine import Engine
from syncbridge.host import DaemonHost
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.microsoft365.connector import Microsoft365Connector
from syncbridge_connectors.microsoft365.emulator import RunningGraph
from tests.contract import test_microsoft365 as graph_contract
from tests.contract.suite import ZONE, Harness, next_weekday_at
from tests.contract.test_microsoft365 import CLIENT_ID, SECRET, SECRET_ENV, m365_config, m365_harness, serve_routes, until
from tests.support.emulators import microsoft365

MAILBOXES = {"dr_a": "dr.avery@lakeside.example", "dr_b": "dr.brooks@lakeside.example", "dr_c": "dr.chen@lakeside.example"}
PRIVATE = "Dinner with John Smith"
#: what no listing may ask for: the text of every event in the window
TEXT = {"subject", "body", "bodyPreview", "location", "attendees"}


@dataclass
class Practice:
    graph: RunningGraph
    store: Store
    engine: Engine
    outbox: Outbox
    connector: Microsoft365Connector
    host: Host
    #: the private event ``practice(private_in=...)`` made
    private: dict[str, Any] | None = None

    def book(self, clinician: str, start: datetime) -> str:
        appt = new_canonical_id()
        self.engine.change(appt, empty_snapshot() | {
            "clinician": clinician, "client_key": "client-1", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
            "timezone": ZONE, "service_code": "90837", "location": "Room 2"}, via="ehr")
        return appt

    def event_id(self, appt: str) -> str:
        link = self.store.link("outlook", appt)
        assert link is not None and link.external_id
        return link.external_id.partition("/")[2]

    def add_private(self, clinician: str, start: datetime) -> dict[str, Any]:
        return self.graph.emulator.user_create(MAILBOXES[clinician], {
            "subject": PRIVATE, "body": {"contentType": "text", "content": "Table for two at Lucia's"},
            "location": {"displayName": "Lucia's"}, "start": _utc(start), "end": _utc(start + timedelta(hours=2))})

    async def handle_notifications(self) -> None:
        """What the daemon's inbox does with the notifications received (runtime.process_inbox)."""
        assert self.graph.emulator.notifier.idle()
        pending, self.host.accepted = self.host.accepted, []
        targets: list[str] = []
        accounts: set[str] = set()
        everything = False
        for headers, body in pending:
            named = self.connector.webhook_targets(headers, body)
            if named is not None:
                targets += named
                continue
            changed = self.connector.webhook_accounts(headers, body)
            if changed is None:
                everything = True
            else:
                accounts |= changed
        if targets:
            await self.engine.refresh("outlook", targets)
        if everything:
            await self.engine.sync("outlook")
        elif accounts:
            await self.engine.sync("outlook", accounts=frozenset(accounts))


def _utc(dt: datetime) -> dict[str, str]:
    return {"dateTime": dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"}


@contextlib.asynccontextmanager
async def practice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, push: bool = True, private_in: str | None = None,
                   **options: Any) -> AsyncIterator[Practice]:
    """Three clinicians' mailboxes in one tenant, each with a session mirrored and listed; with
    ``push``, subscribed, the webhook routes served on loopback. ``private_in``: that clinician's
    private event is in the mailbox before anything is read. ``options``: the connector's."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with microsoft365(tmp_path / "tls", CLIENT_ID, SECRET, *MAILBOXES.values(), allow_http=True) as graph:
        graph.emulator.keep_bodies(5000)
        cfg = parse_config(yaml.safe_dump({
            "practice": {"timezone": ZONE}, "store": {"path": str(tmp_path / "s.db")},
            "clinicians": {c: {"accounts": {"outlook": {"mailbox": m}}} for c, m in MAILBOXES.items()},
            "connectors": {"outlook": m365_config(graph, **options)}, "http": {"enabled": False},
            "outbox": {"backoff_base": 0.05, "backoff_max": 0.2},
        }))
        store = Store(cfg.store.path)
        connectors = build_connectors(cfg)
        connector = connectors["outlook"]
        assert isinstance(connector, Microsoft365Connector)
        host = connector.host = Host(public_url="http://placeholder")
        engine = Engine(store, connectors, cfg)
        server = serve_routes(connector)
        p = Practice(graph, store, engine, Outbox(engine), connector, host)
        if private_in is not None:
            p.private = p.add_private(private_in, next_weekday_at(18))
        try:
            if push:
                host.public_url = f"{server.url}/webhooks/outlook"
                await connector.maintain()
            else:
                host.public_url = None
            for i, clinician in enumerate(MAILBOXES):
                p.book(clinician, next_weekday_at(9 + i))
            await p.outbox.drain()
            await engine.sync("outlook", full=True)
            assert graph.emulator.notifier.idle()
            host.accepted.clear()
            yield p
        finally:
            server.stop()
            await connector.close()
            store.close()


def _calls_since(graph: RunningGraph, mark: int) -> list[tuple[str, str, dict[str, str]]]:
    emu = graph.emulator
    return [(m, p, q) for (m, p), q in zip(emu.log[mark:], emu.queries[mark:], strict=True)]


# --- push: one mailbox's notification reads that mailbox ---------------------------------------


async def test_a_notification_for_one_mailbox_reads_that_mailbox_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notification the connector cannot place on one event (a missed batch for Dr Brooks) pulls
    Dr Brooks's mailbox alone; the other deltaLinks stay as they were."""
    async with practice(tmp_path, monkeypatch) as p:
        before = json.loads(p.store.cursor("outlook") or "{}")["mailboxes"]
        sub = next(s for s in p.graph.emulator.notifier.subscriptions.values() if s.user == MAILBOXES["dr_b"])
        mark = len(p.graph.emulator.log)
        p.graph.emulator.notifier.lifecycle(sub.id, "missed")
        await until(lambda: p.host.accepted)
        await p.handle_notifications()
        calls = _calls_since(p.graph, mark)
        assert [(m, path) for m, path, _ in calls] == [("GET", f"/v1.0/users/{MAILBOXES['dr_b']}/calendarView/delta")]
        after = json.loads(p.store.cursor("outlook") or "{}")["mailboxes"]
        assert after["dr_a"] == before["dr_a"] and after["dr_c"] == before["dr_c"] and after["dr_b"] != before["dr_b"]


async def test_a_change_in_one_mailbox_arrives_with_that_mailbox_read_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notification whose items name no event (resourceData left out) still reads only the
    subscription's mailbox, and the change in it arrives; one for an unknown subscription reads all."""
    async with practice(tmp_path, monkeypatch) as p:
        appt = p.book("dr_c", next_weekday_at(14))
        await p.outbox.drain()
        assert p.graph.emulator.notifier.idle()  # our own create's notification: an echo
        assert [p.connector.webhook_accounts(h, b) for h, b in p.host.accepted] == [frozenset()]
        p.host.accepted.clear()
        p.graph.emulator.user_delete(MAILBOXES["dr_c"], p.event_id(appt))
        await until(lambda: p.host.accepted)
        headers, body = p.host.accepted[0]
        stripped = json.loads(body)
        for item in stripped["value"]:
            item.pop("resourceData")
        p.host.accepted = [(headers, json.dumps(stripped).encode())]
        mark = len(p.graph.emulator.log)
        await p.handle_notifications()
        assert {path.split("/")[3] for _, path, _ in _calls_since(p.graph, mark)} == {MAILBOXES["dr_c"]}
        record = p.store.appointment(appt)
        assert record is not None and record.cancelled

        unknown = {"value": [stripped["value"][0] | {"subscriptionId": "not-ours"}]}
        assert p.connector.webhook_accounts({}, json.dumps(unknown).encode()) is None


async def test_a_scoped_pull_of_a_failing_mailbox_reports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull for Dr Brooks alone while her mailbox answers 403 names her mailbox as failed,
    instead of failing the whole connector; the others' deltaLinks are untouched."""
    async with practice(tmp_path, monkeypatch, push=False) as p:
        cursor = p.store.cursor("outlook")
        assert cursor is not None
        p.graph.emulator.fail_mailbox(MAILBOXES["dr_b"], 403)
        result = await p.connector.pull_accounts(cursor, frozenset({"dr_b"}))
        assert set(result.failed_accounts) == {"dr_b"}
        assert json.loads(result.cursor or "{}") == json.loads(cursor)


async def test_echoes_of_our_writes_read_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notifications of our own create, move and delete name no event and no mailbox, so
    they cost no call at all."""
    async with practice(tmp_path, monkeypatch) as p:
        appt = p.book("dr_a", next_weekday_at(15))
        await p.outbox.drain()
        record = p.store.appointment(appt)
        assert record is not None
        p.engine.change(appt, dict(record.fields) | {"start": iso(next_weekday_at(16)), "end": iso(next_weekday_at(16) + timedelta(minutes=50))},
                        via="ehr")
        await p.outbox.drain()
        record = p.store.appointment(appt)
        assert record is not None
        p.engine.change(appt, dict(record.fields) | {"status": "cancelled", "cancellation": {
            "by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)), "via": "ehr"}},
            via="ehr")
        await p.outbox.drain()
        assert p.graph.emulator.notifier.idle()
        kinds = [json.loads(b)["value"][0]["changeType"] for _, b in p.host.accepted]
        assert kinds == ["created", "updated", "deleted"]
        assert [p.connector.webhook_targets(h, b) for h, b in p.host.accepted] == [[], [], []]
        assert [p.connector.webhook_accounts(h, b) for h, b in p.host.accepted] == [frozenset()] * 3
        mark = len(p.graph.emulator.log)
        await p.handle_notifications()
        assert p.graph.emulator.log[mark:] == []


# --- $select: private text stays at Microsoft ---------------------------------------------------


async def test_no_listing_asks_for_the_text_of_every_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full listings, busy time and reads of events not known to be ours name only times and flags
    in ``$select``; delta, which takes no ``$select``, is sent without one."""
    async with practice(tmp_path, monkeypatch) as p:
        p.add_private("dr_a", next_weekday_at(18))
        mark = len(p.graph.emulator.log)
        await p.engine.sync("outlook", full=True)
        await p.engine.sync("outlook")
        now = datetime.now(UTC)
        await p.connector.busy(now, now + timedelta(days=14))
        calls = _calls_since(p.graph, mark)
        views = [q for _, path, q in calls if path.endswith("/calendarView")]
        deltas = [q for _, path, q in calls if path.endswith("/calendarView/delta")]
        assert len(views) == 6 and len(deltas) >= 6
        for query in views:
            assert "$select" in query and not TEXT & set(query["$select"].split(",")), query
        assert not any("$select" in q for q in deltas)
        reads = [q for _, path, q in calls if "/events/" in path]
        for query in reads:
            assert not TEXT & set(query.get("$select", "subject").split(",")), "a read of an unknown event asked for its text"


async def test_a_private_event_text_never_reaches_the_connector_where_graph_lets_it_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Dinner with John Smith" is in no answer the connector received except delta's, which Graph
    sends whole: not through the listing, busy time, or the read its notification causes."""
    async with practice(tmp_path, monkeypatch) as p:
        event = p.add_private("dr_b", next_weekday_at(18))
        await until(lambda: p.host.accepted)
        await p.handle_notifications()  # the private event's notification: read it, find it is not ours
        p.graph.emulator.user_update(MAILBOXES["dr_b"], event["id"], {"start": _utc(next_weekday_at(19)), "end": _utc(next_weekday_at(21))})
        await until(lambda: p.host.accepted)
        await p.handle_notifications()
        await p.engine.sync("outlook", full=True)
        await p.engine.sync("outlook")
        now = datetime.now(UTC)
        busy = await p.connector.busy(now, now + timedelta(days=14))
        assert any(b.clinician == "dr_b" for b in busy)
        where = p.graph.emulator.received(PRIVATE)
        assert where, "the body log kept nothing: the test would prove nothing"
        assert {path for _, path in where} == {f"/v1.0/users/{MAILBOXES['dr_b']}/calendarView/delta"}, where
        # its location and body travel with it, in delta alone
        assert {path for _, path in p.graph.emulator.received("Lucia")} <= {f"/v1.0/users/{MAILBOXES['dr_b']}/calendarView/delta"}


async def test_delta_sends_private_events_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Graph forces: a delta round carries a changed private event with its subject, body
    and location (no ``$select`` on calendarView/delta); the connector keeps none of it."""
    async with practice(tmp_path, monkeypatch, push=False) as p:
        p.add_private("dr_a", next_weekday_at(18))
        await p.engine.sync("outlook")
        bodies = [json.loads(b) for m, path, b in p.graph.emulator.bodies or () if path.endswith("/calendarView/delta")]
        items = [i for b in bodies for i in b.get("value", []) if i.get("subject") == PRIVATE]
        assert items and items[-1]["body"]["content"] and items[-1]["location"]["displayName"] == "Lucia's"
        assert PRIVATE not in repr(p.connector._seen)


# --- tags on our own events ---------------------------------------------------------------------


async def test_late_typed_in_outlook_on_a_session_still_yields_the_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"#late" typed into a session's title in Outlook is read by a notification, by a poll, and by
    a daemon that restarted and no longer knows the event; each time the session is late-cancelled."""
    async with practice(tmp_path, monkeypatch) as p:
        by_notification, by_poll, after_restart = (p.book("dr_a", next_weekday_at(h, days_ahead=10)) for h in (10, 11, 12))
        await p.outbox.drain()
        assert p.graph.emulator.notifier.idle()
        p.host.accepted.clear()

        p.graph.emulator.user_update(MAILBOXES["dr_a"], p.event_id(by_notification), {"subject": "Client session #late"})
        await until(lambda: p.host.accepted)
        await p.handle_notifications()

        p.host.public_url = None
        for sub in list(p.graph.emulator.notifier.subscriptions):
            del p.graph.emulator.notifier.subscriptions[sub]
        p.graph.emulator.user_update(MAILBOXES["dr_a"], p.event_id(by_poll), {"subject": "Client session #late"})
        await p.engine.sync("outlook")

        p.connector._seen.clear()  # what a restart forgets
        p.graph.emulator.user_update(MAILBOXES["dr_a"], p.event_id(after_restart), {"body": {"contentType": "text", "content": "#late"}})
        observed = await p.connector.read(f"dr_a/{p.event_id(after_restart)}")
        assert "late" in observed.tags
        await p.engine.refresh("outlook", [f"dr_a/{p.event_id(after_restart)}"])
        for appt in (by_notification, by_poll, after_restart):
            record = p.store.appointment(appt)
            assert record is not None and record.cancelled and record.fields["cancellation"]["kind"] == "late_cancel", appt


async def test_reading_a_known_session_is_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session the connector knows is read in one GET that asks for its text too; an event it
    does not know is read without text, and read once more for text only when it is a session."""
    async with practice(tmp_path, monkeypatch, push=False) as p:
        appt = p.book("dr_c", next_weekday_at(13, days_ahead=9))
        await p.outbox.drain()
        ext = f"dr_c/{p.event_id(appt)}"
        mark = len(p.graph.emulator.log)
        await p.connector.read(ext)
        calls = _calls_since(p.graph, mark)
        assert len(calls) == 1 and "subject" in calls[0][2]["$select"]
        private = p.add_private("dr_c", next_weekday_at(18))
        mark = len(p.graph.emulator.log)
        assert (await p.connector.read(f"dr_c/{private['id']}")).deleted  # not ours: nothing to see
        calls = _calls_since(p.graph, mark)
        assert len(calls) == 1 and not TEXT & set(calls[0][2]["$select"].split(","))


# --- four requests per mailbox ------------------------------------------------------------------


async def test_many_writes_for_one_mailbox_keep_within_four_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve writes for one mailbox sent at once (single calls and a batch side by side) never
    have more than four requests in flight there, so none is refused for MailboxConcurrency."""
    async with practice(tmp_path, monkeypatch, push=False) as p:
        assert p.connector.account_concurrency == 4
        p.graph.emulator.latency = 0.05
        p.graph.emulator.peak_inflight.clear()
        appts = [p.book("dr_a", next_weekday_at(8 + i % 8, days_ahead=20 + i // 8)) for i in range(12)]
        writes = [Write(a, p.connector.capabilities.project((p.store.appointment(a) or _missing(a)).fields), None) for a in appts]
        singles = [p.connector.apply(w.appointment_id, w.desired, None) for w in writes[:8]]
        results = await asyncio.gather(*singles, p.connector.apply_many(writes[8:]), return_exceptions=True)
        flat = [r for res in results for r in (res if isinstance(res, list) else [res])]
        assert all(isinstance(r, ApplyResult) for r in flat), flat
        assert 2 <= p.graph.emulator.peak_inflight[MAILBOXES["dr_a"]] <= 4


def _missing(appt: str) -> Any:
    raise AssertionError(f"{appt} is not in the store")


# --- the emulator follows Graph on $select ------------------------------------------------------


async def test_emulator_honours_select_as_graph_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET event and calendarView return what ``$select`` names plus id and etag; calendarView
    leaves out lastModifiedDateTime under ``$select``; an unknown property is a 400; delta refuses
    ``$select``."""
    async with practice(tmp_path, monkeypatch, push=False) as p:
        private = p.add_private("dr_a", next_weekday_at(18))
        client = p.connector.client
        got = await client.get_event("dr_a", MAILBOXES["dr_a"], private["id"], select=["start", "lastModifiedDateTime"])
        assert got is not None and set(got) == {"id", "@odata.etag", "start", "lastModifiedDateTime"}
        window = (next_weekday_at(0), next_weekday_at(0) + timedelta(days=2))
        listed = await client.calendar_view("dr_a", MAILBOXES["dr_a"], window, select=["end", "lastModifiedDateTime"])
        assert listed and all(set(e) == {"id", "@odata.etag", "end"} for e in listed)
        from syncbridge.errors import PermanentError

        with pytest.raises(PermanentError):
            await client.get_event("dr_a", MAILBOXES["dr_a"], private["id"], select=["subjekt"])
        r = await client.request("GET", f"users/{MAILBOXES['dr_a']}/calendarView/delta", "delta", clinician="dr_a", mailbox=MAILBOXES["dr_a"],
                                 params={"startDateTime": "2030-01-01T00:00:00Z", "endDateTime": "2030-02-01T00:00:00Z", "$select": "start"})
        assert r.status_code == 400


# --- changes: calendar_view: every pull a narrowed listing, never delta --------------------------

LISTING: dict[str, Any] = {"changes": "calendar_view"}


def _deltas(graph: RunningGraph) -> list[str]:
    return [path for _, path in graph.emulator.log if path.endswith("/calendarView/delta")]


def _as_daemon_host(p: Practice) -> None:
    """Answer ``known_etag`` and ``linked_between`` as the daemon's host does: from the store."""
    shim = SimpleNamespace(store=p.store, name="outlook")
    p.connector.host.known_etag = functools.partial(DaemonHost.known_etag, shim)  # type: ignore[method-assign]
    p.connector.host.linked_between = functools.partial(DaemonHost.linked_between, shim)  # type: ignore[method-assign]


async def test_listing_mode_never_receives_a_private_event_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``changes: calendar_view``, "Dinner with John Smith", there before the first pull and
    later edited in Outlook, is in no answer the connector received: not the initial listing, the
    polls, the read its notification causes, a full listing or busy time; delta is never called."""
    async with practice(tmp_path, monkeypatch, private_in="dr_b", **LISTING) as p:
        assert p.private is not None
        event_id = p.private["id"]
        await p.engine.sync("outlook")
        later = next_weekday_at(19, days_ahead=8)
        p.graph.emulator.user_update(MAILBOXES["dr_b"], event_id, {
            "subject": f"{PRIVATE} (moved)", "body": {"contentType": "text", "content": "Lucia's booked us for 8"},
            "start": _utc(later), "end": _utc(later + timedelta(hours=2))})
        await until(lambda: p.host.accepted)
        await p.handle_notifications()  # the private event's notification: read without text, not ours
        await p.engine.sync("outlook")
        await p.engine.sync("outlook", full=True)
        now = datetime.now(UTC)
        busy = await p.connector.busy(now, now + timedelta(days=14))
        assert any(b.clinician == "dr_b" and b.start == later for b in busy)

        assert _deltas(p.graph) == []
        listed = [path for _, path, body in p.graph.emulator.bodies or () if path.endswith("/calendarView") and event_id.encode() in body]
        assert len(listed) >= 4, "the listings never showed the private event: the test would prove nothing"
        assert p.graph.emulator.received(PRIVATE) == []
        assert p.graph.emulator.received("Lucia") == []
        assert PRIVATE not in repr(p.connector._seen)


async def test_listing_mode_finds_outlook_deletes_moves_and_edits_reading_only_those(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each poll lists the windows: a session deleted in Outlook is cancelled, one moved is moved
    (beyond the window too: missing from the listing, it is read, not taken for deleted), one
    retitled "#late" is late-cancelled; each of those costs one read, an unchanged one none."""
    async with practice(tmp_path, monkeypatch, push=False, **LISTING) as p:
        deleted, moved, edited, untouched, away = (p.book("dr_a", next_weekday_at(h, days_ahead=10)) for h in (9, 10, 11, 12, 13))
        await p.outbox.drain()
        mark = len(p.graph.emulator.log)
        await p.engine.sync("outlook")  # our own creates: echoes, known by their etags
        assert [path for _, path, _ in _calls_since(p.graph, mark)] == [f"/v1.0/users/{m}/calendarView" for m in MAILBOXES.values()]
        versions = {a: (p.store.appointment(a) or _missing(a)).version for a in (deleted, moved, edited, untouched, away)}
        box, emu = MAILBOXES["dr_a"], p.graph.emulator
        ids = {a: p.event_id(a) for a in versions}
        emu.user_delete(box, ids[deleted])
        new_start, far = next_weekday_at(16, days_ahead=11), next_weekday_at(10, days_ahead=p.connector.options.window_days_ahead + 20)
        emu.user_update(box, ids[moved], {"start": _utc(new_start), "end": _utc(new_start + timedelta(minutes=50))})
        emu.user_update(box, ids[away], {"start": _utc(far), "end": _utc(far + timedelta(minutes=50))})
        emu.user_update(box, ids[edited], {"subject": "Client session #late"})
        mark = len(emu.log)
        await p.engine.sync("outlook")
        calls = _calls_since(p.graph, mark)
        reads = sorted(path for _, path, _ in calls if "/events/" in path)
        assert reads == sorted(f"/v1.0/users/{box}/events/{ids[a]}" for a in (deleted, moved, edited, away)), reads
        assert _deltas(p.graph) == []

        records = {a: p.store.appointment(a) or _missing(a) for a in versions}
        assert records[deleted].cancelled
        assert not records[moved].cancelled and records[moved].fields["start"] == iso(new_start)
        assert not records[away].cancelled and records[away].fields["start"] == iso(far)
        assert records[edited].cancelled and records[edited].fields["cancellation"]["kind"] == "late_cancel"
        assert not records[untouched].cancelled and records[untouched].version == versions[untouched]


async def test_listing_mode_after_a_restart_sees_deletions_but_not_in_a_mailbox_it_could_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a restart (nothing remembered; the store knows each copy's etag) a poll reads no
    unchanged session and a retitled one in a single call; a session deleted in Outlook
    meanwhile, missing from its mailbox's listing, is read once and cancelled; one moved beyond
    the window, missing too, is read and moved, not cancelled; the sessions of a mailbox that
    answered 403 stay booked, in an incremental poll and in a full listing alike."""
    async with practice(tmp_path, monkeypatch, push=False, **LISTING) as p:
        gone, kept, edited, away = (p.book("dr_a", next_weekday_at(h, days_ahead=9)) for h in (13, 14, 15, 16))
        b_kept = p.book("dr_b", next_weekday_at(13, days_ahead=9))
        await p.outbox.drain()
        await p.engine.sync("outlook")
        _as_daemon_host(p)
        p.connector._seen.clear()  # what a restart forgets
        emu = p.graph.emulator
        emu.user_delete(MAILBOXES["dr_a"], p.event_id(gone))
        emu.user_update(MAILBOXES["dr_a"], p.event_id(edited), {"subject": "Client session #noshow"})
        far = next_weekday_at(10, days_ahead=p.connector.options.window_days_ahead + 20)
        emu.user_update(MAILBOXES["dr_a"], p.event_id(away), {"start": _utc(far), "end": _utc(far + timedelta(minutes=50))})
        emu.fail_mailbox(MAILBOXES["dr_b"], 403)
        mark = len(emu.log)
        report = await p.engine.sync("outlook")
        assert set(report.failed_accounts) == {"dr_b"}
        reads = {path.rsplit("/", 1)[1]: q for _, path, q in _calls_since(p.graph, mark) if "/events/" in path}
        assert sorted(reads) == sorted(p.event_id(a) for a in (gone, edited, away)), reads
        assert "subject" in reads[p.event_id(edited)]["$select"]
        assert (p.store.appointment(gone) or _missing(gone)).cancelled
        moved = p.store.appointment(away) or _missing(away)
        assert not moved.cancelled and moved.fields["start"] == iso(far)
        assert (p.store.appointment(edited) or _missing(edited)).fields["cancellation"]["kind"] == "no_show"
        b_sessions = [link.appointment_id for link in p.store.links_of("outlook") if link.external_id and link.external_id.startswith("dr_b/")]
        assert b_kept in b_sessions and len(b_sessions) == 2
        full = await p.engine.sync("outlook", full=True)
        assert set(full.failed_accounts) == {"dr_b"}
        for appt in (kept, *b_sessions):
            assert not (p.store.appointment(appt) or _missing(appt)).cancelled, appt
        assert _deltas(p.graph) == []


async def test_listing_mode_notifications_read_their_event_or_list_their_mailbox_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notification naming an event reads that event alone; a ``missed`` lifecycle notification
    for Dr Brooks lists her mailbox alone; neither calls delta."""
    async with practice(tmp_path, monkeypatch, **LISTING) as p:
        appt = p.book("dr_c", next_weekday_at(14))
        await p.outbox.drain()
        assert p.graph.emulator.notifier.idle()
        p.host.accepted.clear()
        event_id = p.event_id(appt)
        p.graph.emulator.user_delete(MAILBOXES["dr_c"], event_id)
        await until(lambda: p.host.accepted)
        mark = len(p.graph.emulator.log)
        await p.handle_notifications()
        assert [path for _, path, _ in _calls_since(p.graph, mark)] == [f"/v1.0/users/{MAILBOXES['dr_c']}/events/{event_id}"]
        assert (p.store.appointment(appt) or _missing(appt)).cancelled

        sub = next(s for s in p.graph.emulator.notifier.subscriptions.values() if s.user == MAILBOXES["dr_b"])
        mark = len(p.graph.emulator.log)
        p.graph.emulator.notifier.lifecycle(sub.id, "missed")
        await until(lambda: p.host.accepted)
        await p.handle_notifications()
        assert [(m, path) for m, path, _ in _calls_since(p.graph, mark)] == [("GET", f"/v1.0/users/{MAILBOXES['dr_b']}/calendarView")]
        assert _deltas(p.graph) == []


async def test_switching_changes_on_an_existing_store_relists_without_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store synced through delta, then ``changes: calendar_view`` (after a restart), then back:
    each time the stored cursor is not of the mode, the window is listed anew, and every session
    keeps its one appointment and link; nothing is cancelled, duplicated or changed."""
    async with practice(tmp_path, monkeypatch, push=False) as p:
        p.book("dr_a", next_weekday_at(15, days_ahead=9))
        await p.outbox.drain()
        await p.engine.sync("outlook")
        versions = {a.id: a.version for a in p.store.appointments()}
        links = {(link.appointment_id, link.external_id) for link in p.store.links_of("outlook")}
        assert len(versions) == len(links) == 4
        for mode in ("calendar_view", "delta"):
            p.connector.options.changes = mode
            p.connector._seen.clear()  # a restart with the new config
            mark = len(p.graph.emulator.log)
            await p.engine.sync("outlook")
            await p.engine.sync("outlook")
            paths = [path for _, path, _ in _calls_since(p.graph, mark)]
            assert any(path.endswith("/calendarView/delta") for path in paths) == (mode == "delta"), paths
            assert {a.id: a.version for a in p.store.appointments()} == versions, mode
            assert {(link.appointment_id, link.external_id) for link in p.store.links_of("outlook")} == links, mode
            assert not any(a.cancelled for a in p.store.appointments()), mode
            assert ("mailboxes" in json.loads(p.store.cursor("outlook") or "{}")) == (mode == "delta")
        assert len(p.store.audit_entries(kind="cursor_expired")) == 2


async def test_listing_mode_costs_the_pages_of_the_window_per_poll(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll with nothing changed costs one call per page of each mailbox's window: 200 events in
    Dr Avery's calendar at ``page_size: 100`` are 2 pages, the other two mailboxes 1 each; no read,
    and nothing for the merge (the unchanged sessions are not handed to it again)."""
    async with practice(tmp_path, monkeypatch, push=False, **LISTING) as p:
        assert p.connector.options.page_size == 100
        for i in range(199):  # beside her one session
            p.add_private("dr_a", next_weekday_at(7, days_ahead=1 + i))
        await p.engine.sync("outlook")
        mark = len(p.graph.emulator.log)
        report = await p.engine.sync("outlook")
        assert report.seen == 0
        calls = _calls_since(p.graph, mark)
        assert [path.split("/")[3] for _, path, _ in calls] == [MAILBOXES["dr_a"]] * 2 + [MAILBOXES["dr_b"], MAILBOXES["dr_c"]]
        assert all(path.endswith("/calendarView") and q["$top"] == "100" for _, path, q in calls), calls


async def test_emulator_pages_calendar_view_by_top_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """calendarView pages by ``$top`` (Outlook's default 10 without it, at most 1000) and ignores
    ``Prefer: odata.maxpagesize``, which Graph documents for delta rounds only."""
    async with practice(tmp_path, monkeypatch, push=False) as p:
        for i in range(24):
            p.add_private("dr_a", next_weekday_at(7, days_ahead=1 + i))
        client = p.connector.client
        window = {"startDateTime": iso(datetime.now(UTC)), "endDateTime": iso(datetime.now(UTC) + timedelta(days=60))}
        url = f"users/{MAILBOXES['dr_a']}/calendarView"

        async def page(params: dict[str, str], prefer: str | None = None) -> dict[str, Any]:
            r = await client.request("GET", url, "view", clinician="dr_a", mailbox=MAILBOXES["dr_a"], params=window | params,
                                     headers={"Prefer": prefer} if prefer else None)
            assert r.status_code == 200, r.text
            return r.json()

        assert len((await page({}, "odata.maxpagesize=50"))["value"]) == 10
        assert len((await page({"$top": "20"}))["value"]) == 20
        assert len((await page({"$top": "5000"}))["value"]) == 25
        first = await page({"$top": "20"})
        r = await client.request("GET", first["@odata.nextLink"], "view", clinician="dr_a", mailbox=MAILBOXES["dr_a"])
        assert len(r.json()["value"]) == 5 and "@odata.nextLink" not in r.json()


class TestMicrosoft365ByListing(graph_contract.TestMicrosoft365):
    """The shared contract suite with ``changes: calendar_view``: every pull a listing of the window."""

    @pytest.fixture
    def harness(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
        with microsoft365(tmp_path / "graph-tls", CLIENT_ID, SECRET, graph_contract.MAILBOX) as server:
            yield m365_harness(server, monkeypatch, changes="calendar_view")
