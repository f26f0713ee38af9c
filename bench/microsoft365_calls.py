"""Benchmark: Graph API calls per propagated change for the Microsoft 365 connector.

    .venv/bin/python bench/microsoft365_calls.py --sessions 20 [--latency 0.05] [--clinicians 10] [--copy-only]
    .venv/bin/python bench/microsoft365_calls.py --push-scale --clinicians 30 [--sessions 10]

Everything runs against the Graph emulator (connectors/microsoft365/emulator.py) over TLS on
loopback, with msal fetching tokens from the emulator's identity endpoints, and the connector's
webhook routes served on a loopback listener registered as ``http.public_url`` (the emulator's
subscriptions validate it and POST real notifications to it). Calls are counted from the
emulator's request log: Graph calls (``/v1.0/...``) and identity calls (discovery and token)
apart. Each phase acts on ``--sessions`` appointments of one clinician and reports the Graph
calls per change:

- out: create / move / cancel: the canonical record changes, the outbox converges Outlook;
- echo poll: the incremental pull after our own writes (they must cost no re-read);
- in, by notification: the clinician deletes or moves events in Outlook; each notification is
  handled as the daemon does (``webhook_targets`` -> ``read`` -> ``engine.observe``), then the
  next poll runs (the safety net: its delta round must not fetch those events again);
- in, by polling only: the same changes with notifications off, found by the next delta round.

Also printed: notification latency (Outlook change -> canonical record updated), median; and the
initial copy of ``--sessions`` sessions spread over ``--clinicians`` mailboxes, writes handed to
``apply_many`` the way a batching outbox would (8 calls in flight, as ``outbox.concurrency``):
one write per call (``write_batch: 1``, what the outbox does today), then JSON batches of
``write_batch``. ``--latency`` adds that many seconds to every HTTP request (the emulator's
Injector; a batch is one request). ``--copy-only`` runs the initial copy alone.

``--push-scale`` measures instead what a push costs as the practice grows: ``--clinicians``
mailboxes, each with sessions mirrored and subscribed, notifications handled as the daemon's
inbox does (``webhook_targets`` -> read; else ``webhook_accounts`` -> a pull of those mailboxes
alone; else a pull of all). Rows: a session deleted in Outlook (``--sessions`` of them, spread
over the mailboxes), a session cancelled elsewhere (the outbox's write and the echo of its
notification), and a ``missed`` lifecycle notification for one mailbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.routing import Route

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batching import copy_by_apply_many
from syncbridge.config import parse_config  # noqa: E402
from syncbridge.connector import Host, PullResult, Write  # noqa: E402
from syncbridge.emulation import serve_in_thread  # noqa: E402
from syncbridge.model import empty_snapshot, iso, new_canonical_id  # noqa: E402
from syncbridge.engine import Engine  # noqa: E402
from syncbridge.outbox import Outbox  # noqa: E402
from syncbridge.registry import build_connectors  # noqa: E402
from syncbridge.store import Store  # noqa: E402
from syncbridge_connectors.microsoft365.emulator import running  # noqa: E402
from tests.contract.suite import CLINICIAN, ZONE, World, next_weekday_at  # noqa: E402

MAILBOX = "dr.rivera@lakeside.example"
CLIENT_ID = "bench-app"
SECRET = "bench-secret"


class Counter:
    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.log = log
        self.mark = len(log)

    def take(self) -> tuple[int, int, dict[str, int]]:
        """(graph calls, identity calls, graph calls by method and kind) since the last take."""
        new = self.log[self.mark :]
        self.mark = len(self.log)
        graph = [(m, p) for m, p in new if p.startswith("/v1.0/") and p != "/v1.0/$batch"]
        kinds: dict[str, int] = {}
        for m, p in graph:
            parts = p.split("/")[2:]
            rest = parts[2:] if parts[0] == "users" else parts  # after /v1.0/users/{mailbox}
            kind = "/".join("{id}" if i == 1 and rest[0] in ("events", "subscriptions") else x for i, x in enumerate(rest))
            key = f"{m} {kind}"
            kinds[key] = kinds.get(key, 0) + 1
        return len(graph), sum(1 for _, p in new if not p.startswith("/v1.0/")), kinds


async def initial_copy(graph: Any, tmp: Path, clinicians: int, sessions: int, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """The initial copy into ``clinicians`` mailboxes through apply_many, once per write_batch in ``sizes``."""
    emu = graph.emulator
    boxes = {f"dr_{i:02d}": f"dr{i:02d}@lakeside.example" for i in range(clinicians)}
    for box in boxes.values():
        emu.add_user(box)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE}, "store": {"path": str(tmp / "copy.db")},
        "clinicians": {k: {"accounts": {"outlook": {"mailbox": m}}} for k, m in boxes.items()},
        "connectors": {"outlook": {
            "type": "microsoft365", "tenant": emu.tenant, "client_id": CLIENT_ID, "client_secret": {"file": str(tmp / "secret")},
            "authority_host": graph.authority_host, "graph_url": graph.graph_url, "ca_bundle": str(graph.ca_file),
        }},
    }))  # fmt: skip
    connector = build_connectors(cfg)["outlook"]
    batch_size = connector.write_batch
    rows = []
    try:
        for k, size in enumerate(sizes):
            writes = []
            for n in range(sessions):
                start = next_weekday_at(9 + n % 8, days_ahead=60 + 400 * k + n // (8 * clinicians))
                snap = empty_snapshot() | {"clinician": list(boxes)[n % clinicians], "client_key": "client-" + new_canonical_id()[-6:],
                                           "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": ZONE,
                                           "service_code": "90837", "location": "Room 2"}
                writes.append(Write(new_canonical_id(), connector.capabilities.project(snap), None))
            connector.write_batch = size
            count = Counter(emu.log)
            http_before = graph.injector.requests
            took = await copy_by_apply_many(connector, writes)
            calls, identity, _ = count.take()
            rows.append({"write_batch": size, "sessions": sessions, "mailboxes": clinicians, "graph_calls": calls,
                         "http_requests": graph.injector.requests - http_before - identity, "seconds": round(took, 2),
                         "events_per_s": round(sessions / took)})
        connector.write_batch = batch_size
    finally:
        await connector.close()
    return rows


async def main(sessions: int, latency: float = 0.0, clinicians: int = 10, copy_only: bool = False,
               sizes: tuple[int, ...] = (1, 20)) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="m365-bench-"))
    graph = running(tmp / "tls")
    graph.injector.configure(latency=latency)
    emu = graph.emulator
    emu.notifier.allow_http = True
    emu.register_app(CLIENT_ID, SECRET)
    emu.add_user(MAILBOX)
    (tmp / "secret").write_text(SECRET)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp / "bench.db")},
        "clinicians": {CLINICIAN: {"accounts": {"outlook": {"mailbox": MAILBOX}}}},
        "connectors": {"outlook": {
            "type": "microsoft365", "tenant": emu.tenant, "client_id": CLIENT_ID, "client_secret": {"file": str(tmp / "secret")},
            "authority_host": graph.authority_host, "graph_url": graph.graph_url, "ca_bundle": str(graph.ca_file),
        }},
    }))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    connector = connectors["outlook"]
    host = Host()
    connector.host = host
    engine = Engine(store, connectors, cfg)
    world = World(store, engine, Outbox(engine), connector, None)  # type: ignore[arg-type]
    routes = [Route(f"/webhooks/outlook{r.path}", r.handler, methods=list(r.methods)) for r in connector.webhook_routes()]
    listener = serve_in_thread(Starlette(routes=routes))
    host.public_url = f"{listener.url}/webhooks/outlook"
    count = Counter(emu.log)
    results: dict[str, Any] = {"sessions": sessions, "latency_ms": round(latency * 1000)}
    async def handle_notifications(expected: int) -> list[float]:
        """Process accepted notifications as the daemon does; returns when each change was committed."""
        deadline = time.monotonic() + 30
        done: list[float] = []
        handled = 0
        while handled < expected and time.monotonic() < deadline:
            while host.accepted:
                headers, body = host.accepted.pop(0)
                targets = connector.webhook_targets(headers, body)
                if targets is None:
                    await engine.sync("outlook")
                elif targets:
                    engine.observe("outlook", PullResult([await connector.read(t) for t in targets], cursor=None), advance=False)
                handled += len(targets or [])
                done.append(time.monotonic())
            await asyncio.sleep(0.005)
        return done

    def phase(name: str, changes: int) -> None:
        graph_calls, identity_calls, kinds = count.take()
        results[name] = {"graph_calls": graph_calls, "per_change": round(graph_calls / changes, 2), "identity_calls": identity_calls, "by_call": kinds}

    try:
        if copy_only:
            results["initial_copy"] = await initial_copy(graph, tmp, clinicians, sessions, sizes)
            return results
        await connector.maintain()
        phase("subscribe", 1)
        ids = [world.book_here(next_weekday_at(9 + i % 8, days_ahead=7 + i // 8)) for i in range(sessions)]
        await world.drain()
        phase("out_create", sessions)
        await world.sync(full=True)
        phase("full_listing", sessions)
        emu.notifier.idle()
        own = [connector.webhook_targets(h, b) for h, b in host.accepted]
        results["own_write_notifications"] = {"received": len(own), "events_to_reread": sum(len(t or []) for t in own)}
        host.accepted.clear()
        count.take()
        for appt_id in ids:
            world.move_here(appt_id, store.appointment(appt_id).start + timedelta(minutes=30))
        await world.drain()
        phase("out_move", sessions)
        await world.sync()
        phase("echo_poll_after_moves", sessions)
        emu.notifier.idle()
        host.accepted.clear()
        count.take()

        # in, by notification: the clinician deletes half, moves the other half
        half = sessions // 2
        started: list[float] = []
        for i, appt_id in enumerate(ids):
            event_id = world.external_id(appt_id).partition("/")[2]
            started.append(time.monotonic())
            if i < half:
                emu.user_delete(MAILBOX, event_id)
            else:
                shifted = store.appointment(appt_id).start + timedelta(hours=1)
                emu.user_update(MAILBOX, event_id, {"start": {"dateTime": shifted.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
                                                    "end": {"dateTime": (shifted + timedelta(minutes=50)).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"}})
            committed = await handle_notifications(1)
            results.setdefault("_latencies", []).append(committed[0] - started[-1] if committed else float("nan"))
        phase("in_by_notification", sessions)
        cancelled = sum(1 for a in ids[:half] if store.appointment(a).cancelled)
        await world.sync()
        phase("safety_net_poll_after_notifications", sessions)
        results["in_by_notification"]["cancelled_in_record"] = cancelled
        await world.drain()  # the moves fan out nowhere else; the cancellations need no write here
        count.take()

        # in, by polling only: notifications off, one change per poll (a batch of deletions
        # would be held by the mass-cancellation guard, as it should)
        for sub_id in list(emu.notifier.subscriptions):
            del emu.notifier.subscriptions[sub_id]
        live = ids[half:]
        for i, appt_id in enumerate(live):
            event_id = world.external_id(appt_id).partition("/")[2]
            if i % 2 == 0:
                emu.user_delete(MAILBOX, event_id)
            else:
                emu.user_update(MAILBOX, event_id, {"subject": "Client session #late"})
            await world.sync()
        phase("in_by_poll_only", len(live))
        results["in_by_poll_only"]["cancelled_in_record"] = sum(1 for a in live if store.appointment(a).cancelled)
        await world.drain()
        count.take()

        # out: cancel (new sessions, so there is something live to cancel)
        more = [world.book_here(next_weekday_at(9 + i % 8, days_ahead=30 + i // 8)) for i in range(sessions)]
        await world.drain()
        count.take()
        for appt_id in more:
            world.cancel_here(appt_id)
        await world.drain()
        phase("out_cancel", sessions)
        latencies = results.pop("_latencies")
        results["notification_latency_ms_median"] = round(1000 * statistics.median(latencies), 1)
        results["initial_copy"] = await initial_copy(graph, tmp, clinicians, sessions, sizes)
        return results
    finally:
        await connector.close()
        store.close()
        listener.stop()
        graph.stop()


async def push_scale(clinicians: int, changes: int, latency: float = 0.0) -> dict[str, Any]:
    """Graph calls per cancellation with push, ``clinicians`` mailboxes subscribed (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="m365-push-"))
    graph = running(tmp / "tls")
    graph.injector.configure(latency=latency)
    emu = graph.emulator
    emu.notifier.allow_http = True
    emu.register_app(CLIENT_ID, SECRET)
    (tmp / "secret").write_text(SECRET)
    boxes = {f"dr_{i:02d}": f"dr{i:02d}@lakeside.example" for i in range(clinicians)}
    for box in boxes.values():
        emu.add_user(box)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE}, "store": {"path": str(tmp / "push.db")},
        "clinicians": {k: {"accounts": {"outlook": {"mailbox": m}}} for k, m in boxes.items()},
        "connectors": {"outlook": {
            "type": "microsoft365", "tenant": emu.tenant, "client_id": CLIENT_ID, "client_secret": {"file": str(tmp / "secret")},
            "authority_host": graph.authority_host, "graph_url": graph.graph_url, "ca_bundle": str(graph.ca_file),
        }},
    }))  # fmt: skip
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    connector = connectors["outlook"]
    host = connector.host = Host()
    engine = Engine(store, connectors, cfg)
    outbox = Outbox(engine)
    routes = [Route(f"/webhooks/outlook{r.path}", r.handler, methods=list(r.methods)) for r in connector.webhook_routes()]
    listener = serve_in_thread(Starlette(routes=routes))
    host.public_url = f"{listener.url}/webhooks/outlook"
    count = Counter(emu.log)
    names = list(boxes)

    async def inbox() -> None:
        """runtime.process_inbox: named events re-read, else the named mailboxes pulled, else all."""
        emu.notifier.idle()
        pending, host.accepted[:] = list(host.accepted), []
        targets: list[str] = []
        accounts: set[str] = set()
        everything = False
        for headers, body in pending:
            named = connector.webhook_targets(headers, body)
            changed = connector.webhook_accounts(headers, body) if named is None else frozenset()
            targets += named or []
            everything |= changed is None
            accounts |= changed or set()
        if targets:
            await engine.refresh("outlook", targets)
        if everything:
            await engine.sync("outlook")
        elif accounts:
            await engine.sync("outlook", accounts=frozenset(accounts))

    def book(i: int) -> str:
        appt = new_canonical_id()
        start = next_weekday_at(9 + i % 8, days_ahead=7 + i // 8)
        engine.change(appt, empty_snapshot() | {
            "clinician": names[i % clinicians], "client_key": f"client-{i}", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
            "timezone": ZONE, "service_code": "90837", "location": "Room 2"}, via="ehr")
        return appt

    rows: dict[str, Any] = {"mailboxes": clinicians, "changes": changes, "latency_ms": round(latency * 1000)}
    try:
        await connector.maintain()
        ids = [book(i) for i in range(2 * changes)]
        await outbox.drain()
        await engine.sync("outlook", full=True)
        await inbox()  # the echoes of our creates
        count.take()

        for appt_id in ids[:changes]:  # in: deleted in Outlook, one at a time, each by its notification
            ext = store.link("outlook", appt_id).external_id  # type: ignore[union-attr]
            clinician, _, event_id = ext.partition("/")
            emu.user_delete(boxes[clinician], event_id)
            await inbox()
        calls, _, kinds = count.take()
        cancelled = sum(1 for a in ids[:changes] if store.appointment(a).cancelled)  # type: ignore[union-attr]
        rows["cancelled_in_outlook"] = {"per_change": round(calls / changes, 2), "by_call": kinds, "cancelled_in_record": cancelled}

        for appt_id in ids[changes:]:  # out: cancelled in the record, the outbox deletes, the echo is handled
            record = store.appointment(appt_id)
            engine.change(appt_id, dict(record.fields) | {"status": "cancelled", "cancellation": {  # type: ignore[union-attr]
                "by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(engine.clock()), "via": "ehr"}},
                via="ehr")
            await outbox.drain()
            await inbox()
        calls, _, kinds = count.take()
        rows["cancelled_elsewhere_with_echo"] = {"per_change": round(calls / changes, 2), "by_call": kinds}

        sub = next(iter(emu.notifier.subscriptions))
        emu.notifier.lifecycle(sub, "missed")
        deadline = time.monotonic() + 10
        while not host.accepted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await inbox()
        calls, _, kinds = count.take()
        rows["missed_lifecycle_notification"] = {"calls": calls, "by_call": kinds}
        return rows
    finally:
        await connector.close()
        store.close()
        listener.stop()
        graph.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every HTTP request")
    parser.add_argument("--clinicians", type=int, default=10, help="mailboxes for the initial copy, or for --push-scale")
    parser.add_argument("--copy-only", action="store_true", help="only the initial copy through apply_many")
    parser.add_argument("--sizes", default="1,20", help="write_batch values for the initial copy, comma-separated")
    parser.add_argument("--push-scale", action="store_true", help="Graph calls per cancellation with push at --clinicians mailboxes")
    args = parser.parse_args()
    from syncbridge.logging import configure

    configure(level="error", json_logs=True)
    if args.push_scale:
        print(json.dumps(asyncio.run(push_scale(args.clinicians, args.sessions, args.latency)), indent=2))
        sys.exit(0)
    print(json.dumps(asyncio.run(main(args.sessions, args.latency, args.clinicians, args.copy_only, tuple(int(x) for x in args.sizes.split(",")))), indent=2))
