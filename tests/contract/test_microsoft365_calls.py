"""What the Graph connector asks Microsoft for, and what it gets back (issue 23).

A notification pulls only its own mailbox, so push costs the same at 3 clinicians as at 30; every
call that Graph lets narrow with ``$select`` leaves the clinicians' own events' text at Microsoft;
one mailbox never has more than Outlook's four requests in flight. Read from the emulator's logs
of requests and of the response bodies the connector received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import ApplyResult, Host, Write
from syncbridge.engine import Engine
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.microsoft365.connector import Microsoft365Connector
from syncbridge_connectors.microsoft365.emulator import RunningGraph
from tests.contract.suite import ZONE, next_weekday_at
from tests.contract.test_microsoft365 import CLIENT_ID, SECRET, SECRET_ENV, m365_config, serve_routes, until
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
async def practice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, push: bool = True) -> AsyncIterator[Practice]:
    """Three clinicians' mailboxes in one tenant, each with a session mirrored and listed; with
    ``push``, subscribed, the webhook routes served on loopback."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with microsoft365(tmp_path / "tls", CLIENT_ID, SECRET, *MAILBOXES.values(), allow_http=True) as graph:
        graph.emulator.keep_bodies(5000)
        cfg = parse_config(yaml.safe_dump({
            "practice": {"timezone": ZONE}, "store": {"path": str(tmp_path / "s.db")},
            "clinicians": {c: {"accounts": {"outlook": {"mailbox": m}}} for c, m in MAILBOXES.items()},
            "connectors": {"outlook": m365_config(graph)}, "http": {"enabled": False},
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
