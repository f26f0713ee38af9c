"""Calendar API calls per propagated change, counted from the Google emulator's request log.

Runs the real connector (google-api-python-client, google-auth) against the emulator with the
engine, store and outbox of syncbridge, and a loopback receiver for push notifications mounted as
the daemon mounts it. Prints a Markdown table; nothing is asserted. ``--latency`` adds that many
seconds to every HTTP request (the emulator's Injector; a batch is one request).

Watch channels are open from the start, and every notification the connector accepts is handled
as the daemon's inbox does (``webhook_accounts``: the accounts it names are pulled alone, one
naming none pulls everything); a notification recognised as the echo of our own write is not
accepted at all. The "calls per cancellation" rows count every call the change causes, its
pushes and their pulls included.

The last two rows copy ``--sessions`` more sessions by handing writes to ``apply_many`` the way a
batching outbox would (8 calls in flight, as ``outbox.concurrency``): one write per call
(``write_batch: 1``, what the outbox does today), then batch requests of ``write_batch`` parts.

    .venv/bin/python bench/google_calls.py [--clinicians 10] [--sessions 50] [--latency 0.05] [--copy-only]

``--copy-only`` runs the two apply_many rows alone (a practice-sized run without the other rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from batching import copy_by_apply_many
from syncbridge.config import parse_config
from syncbridge.connector import Connector, Host, Write
from syncbridge.emulation import Injector
from syncbridge.emulation import serve_in_thread
from syncbridge.engine import Engine
from syncbridge.logging import configure
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.google_calendar.emulator import GoogleCalendarEmulator, running

ZONE = "America/New_York"
NAME = "google"


class WakingHost(Host):
    def __init__(self, public_url: str) -> None:
        super().__init__(public_url)
        self.loop = asyncio.get_running_loop()
        self.woken = asyncio.Event()
        #: notifications already handled
        self.handled = 0

    def pull_soon(self) -> None:
        super().pull_soon()
        self.loop.call_soon_threadsafe(self.woken.set)


def settle(emu: GoogleCalendarEmulator) -> None:
    """Wait until every notification Google queued was delivered (and answered)."""
    for _ in range(100):
        before = len(emu.deliveries)
        emu.settle()
        if len(emu.deliveries) == before:
            return


async def handle_pushes(emu: GoogleCalendarEmulator, host: WakingHost, connector: Connector, engine: Engine, outbox: Outbox) -> int:
    """Deliver Google's notifications and handle those accepted as the daemon's inbox does, until
    nothing more comes (the writes a pull causes notify too); answers how many were accepted."""
    accepted = 0
    while True:
        settle(emu)
        new = host.accepted[host.handled :]
        if not new:
            return accepted
        host.handled += len(new)
        accepted += len(new)
        named: set[str] = set()
        everything = False
        for headers, body in new:
            accounts = connector.webhook_accounts(headers, body)
            everything |= accounts is None
            named |= accounts or set()
        if everything:
            await engine.sync(NAME)
        elif named:
            await engine.sync(NAME, accounts=frozenset(named))
        while store_due(engine):
            await outbox.drain()


def store_due(engine: Engine) -> bool:
    return bool(engine.store.outbox_due(time.time(), 1))


def call_name(method: str, path: str) -> str:
    """The API method a logged request is (events.list, events.patch...)."""
    if path == "/calendar/v3/channels/stop":
        return "channels.stop"
    if path.endswith("/events"):
        return {"GET": "events.list", "POST": "events.insert"}[method]
    if path.endswith("/events/watch"):
        return "events.watch"
    return {"GET": "events.get", "PUT": "events.update", "PATCH": "events.patch", "DELETE": "events.delete"}[method]


class Mark:
    """Where the emulator's request log and its Injector's request count stood."""

    def __init__(self, log: list[tuple[str, str]], injector: Injector) -> None:
        self.log, self.injector = log, injector
        self.entries, self.http = len(log), injector.requests


def api_calls(mark: Mark) -> tuple[int, int, list[str]]:
    """(API calls, HTTP requests, call names) since ``mark``. A batch is one HTTP request whose
    parts each count as a call (as Google's quota counts them); token requests are left out (one
    per clinician per hour)."""
    new = mark.log[mark.entries :]
    calls = [call_name(m, p) for m, p in new if p not in ("/token", "/batch/calendar/v3")]
    tokens = sum(1 for _, p in new if p == "/token")
    return len(calls), mark.injector.requests - mark.http - tokens, calls


def summary(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items())


def session_at(clinician: str, start: datetime) -> dict[str, Any]:
    return empty_snapshot() | {
        "clinician": clinician, "client_key": "client-" + new_canonical_id()[-6:], "start": iso(start),
        "end": iso(start + timedelta(minutes=50)), "timezone": ZONE, "service_code": "90837", "location": "Room 2",
    }  # fmt: skip


async def main(clinicians: int, sessions: int, latency: float, copy_only: bool = False) -> None:
    configure(level="warning", json_logs=True)
    server = running(GoogleCalendarEmulator())
    emu = server.emulator
    assert server.injector is not None
    injector = server.injector
    injector.configure(latency=latency)
    work = Path(tempfile.mkdtemp(prefix="gcal-bench-"))
    keys = {f"dr_{i:02d}": f"dr{i:02d}@practice.example" for i in range(clinicians)}
    for email in keys.values():
        emu.add_user(email, time_zone=ZONE)
    key_file = work / "sa.json"
    key_file.write_text(json.dumps(emu.add_service_account("syncbridge@bench.iam.gserviceaccount.com")))
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE}, "store": {"path": str(work / "bench.db")},
        "clinicians": {k: {"accounts": {NAME: {"email": e}}} for k, e in keys.items()},
        "connectors": {NAME: {"type": "google_calendar", "service_account_key": {"file": str(key_file)}, "api_root": server.api_root}},
    }))  # fmt: skip
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    connector = connectors[NAME]
    engine = Engine(store, connectors, cfg)
    outbox = Outbox(engine)
    app = Starlette(routes=[Mount(f"/webhooks/{NAME}", routes=[Route(r.path, r.handler, methods=list(r.methods)) for r in connector.webhook_routes()])])
    receiver = serve_in_thread(app)
    host = WakingHost(f"{receiver.url}/webhooks/{NAME}")
    connector.host = host
    rows: list[tuple[str, int, int, str]] = []
    day = datetime.now(ZoneInfo(ZONE)).replace(hour=8, minute=0, second=0, microsecond=0) + timedelta(days=7)
    try:
        if copy_only:
            await copy_rows(connector, emu.log, injector, keys, sessions, day, rows, sizes=(1, connector.write_batch))
            return
        await connector.maintain()  # watch channels open before anything is written, as in a running daemon
        settle(emu)
        # initial copy: sessions spread over the clinicians
        mark = Mark(emu.log, injector)
        notified = len(emu.deliveries)
        ids = []
        for n in range(sessions):
            appt = new_canonical_id()
            engine.change(appt, session_at(list(keys)[n % clinicians], day + timedelta(days=n // clinicians, hours=n % 8)), via="bench-record")
            ids.append(appt)
        t0 = time.perf_counter()
        while store.outbox_due(time.time(), 1):  # one drain() stops after 20 rounds of outbox.batch
            await outbox.drain()
        copy_s = time.perf_counter() - t0
        calls, http, _ = api_calls(mark)
        rows.append((f"initial copy of {sessions} sessions to Google", calls, http, f"{copy_s:.2f} s, {sessions / copy_s:.0f} events/s"))
        mark = Mark(emu.log, injector)
        accepted = await handle_pushes(emu, host, connector, engine, outbox)
        calls, http, names = api_calls(mark)
        rows.append((f"the pushes of those {sessions} inserts", calls, http,
                     f"{len(emu.deliveries) - notified} notifications, {accepted} pulled; {summary(names) or 'no call'}"))

        mark = Mark(emu.log, injector)
        await engine.sync(NAME, full=True)
        calls, http, names = api_calls(mark)
        rows.append((f"full sync of {clinicians} calendars (our own {sessions} events come back as echoes)", calls, http, summary(names)))

        mark = Mark(emu.log, injector)
        await engine.sync(NAME)
        calls, http, _ = api_calls(mark)
        rows.append((f"quiet incremental poll, {clinicians} calendars", calls, http, "batched first pages" if clinicians > 1 else ""))

        # one cancellation in the canonical record -> Google, and the push of our own delete
        appt = ids[0]
        record = store.appointment(appt)
        assert record is not None
        cancelled = dict(record.fields) | {"status": "cancelled", "cancellation": {
            "by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)), "via": "bench-record"}}
        mark = Mark(emu.log, injector)
        engine.change(appt, cancelled, via="bench-record")
        await outbox.drain()
        accepted = await handle_pushes(emu, host, connector, engine, outbox)
        calls, http, names = api_calls(mark)
        rows.append(("**calls per cancellation made elsewhere** (record -> Google, its push included)", calls, http,
                     f"{summary(names)}; {accepted} notification pulled"))

        # one move in the record -> Google
        appt = ids[1]
        record = store.appointment(appt)
        assert record is not None
        mark = Mark(emu.log, injector)
        engine.change(appt, dict(record.fields) | {"start": iso(record.start + timedelta(hours=1)), "end": iso(record.end + timedelta(hours=1))}, via="bench-record")
        await outbox.drain()
        accepted = await handle_pushes(emu, host, connector, engine, outbox)
        calls, http, names = api_calls(mark)
        rows.append(("one move in the record -> Google, its push included", calls, http, f"{summary(names)}; {accepted} notification pulled"))

        # one deletion in Google -> the record, by push
        appt = ids[2]
        calendar, _, event_id = external(store, appt).rpartition("/")
        host.woken.clear()
        mark = Mark(emu.log, injector)
        t0 = time.perf_counter()
        emu.user_delete(calendar, event_id)
        await asyncio.wait_for(host.woken.wait(), timeout=10)
        accepted = await handle_pushes(emu, host, connector, engine, outbox)
        took = time.perf_counter() - t0
        cancelled_now = store.appointment(appt)
        assert cancelled_now is not None and cancelled_now.cancelled
        calls, http, names = api_calls(mark)
        rows.append(("**calls per cancellation made in Google** (a deletion, with push)", calls, http,
                     f"{summary(names)}; {accepted} notification pulled; {took * 1000:.0f} ms from delete to cancelled record"))

        # one "#late" retitle in Google -> a late cancellation, by push: its text is read alone
        appt = ids[3]
        calendar, _, event_id = external(store, appt).rpartition("/")
        mark = Mark(emu.log, injector)
        emu.user_patch(calendar, event_id, {"summary": "Client session #late"})
        accepted = await handle_pushes(emu, host, connector, engine, outbox)
        tagged = store.appointment(appt)
        assert tagged is not None and tagged.cancelled
        calls, http, names = api_calls(mark)
        rows.append(("**calls per cancellation made in Google by a #late tag** (with push; the event is then deleted)", calls, http,
                     f"{summary(names)}; {accepted} notification pulled"))

        await copy_rows(connector, emu.log, injector, keys, sessions, day, rows, sizes=(1, connector.write_batch))
    finally:
        settle(emu)  # the copy rows' notifications reach open channels (echoes) before they are stopped
        await connector.close()
        receiver.stop()
        server.stop()
        store.close()
        print_rows(clinicians, sessions, latency, rows)


def external(store: Store, appt: str) -> str:
    link = store.link(NAME, appt)
    assert link is not None and link.external_id
    return link.external_id


async def copy_rows(connector: Connector, log: list[tuple[str, str]], injector: Injector, keys: dict[str, str], sessions: int,
                    day: datetime, rows: list[tuple[str, int, int, str]], sizes: tuple[int, ...]) -> None:
    """The initial copy through apply_many, once per write_batch in ``sizes``, each on fresh sessions."""
    batch_size = connector.write_batch
    clinicians = len(keys)
    for k, size in enumerate(sizes):
        writes = [
            Write(new_canonical_id(), connector.capabilities.project(
                session_at(list(keys)[n % clinicians], day + timedelta(days=400 * (k + 1) + n // clinicians, hours=n % 8))), None)
            for n in range(sessions)
        ]  # fmt: skip
        connector.write_batch = size
        mark = Mark(log, injector)
        copy_s = await copy_by_apply_many(connector, writes)
        calls, http, _ = api_calls(mark)
        how = "each write on its own" if size == 1 else f"batches of {size}"
        rows.append((f"initial copy of {sessions} sessions, apply_many, {how}", calls, http, f"{copy_s:.2f} s, {sessions / copy_s:.0f} events/s"))
    connector.write_batch = batch_size


def print_rows(clinicians: int, sessions: int, latency: float, rows: list[tuple[str, int, int, str]]) -> None:
    print(f"\n{clinicians} clinicians, {sessions} sessions, {latency * 1000:.0f} ms added to each HTTP request\n")
    print("| change | API calls | HTTP requests | notes |")
    print("| --- | --- | --- | --- |")
    for what, calls, http, note in rows:
        print(f"| {what} | {calls} | {http} | {note} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clinicians", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every HTTP request")
    parser.add_argument("--copy-only", action="store_true", help="only the initial copy through apply_many")
    args = parser.parse_args()
    asyncio.run(main(args.clinicians, args.sessions, args.latency, args.copy_only))
