"""The contract suite against the Microsoft Graph emulator (connectors/microsoft365/emulator.py).

The connector talks to the emulator exactly as to a tenant: msal acquires tokens from the
emulator's identity endpoints over TLS (its own CA, given as ``ca_bundle``) and httpx calls
Graph. The Vendor is the clinician in Outlook: edits happen inside the mailbox (bumping the
change key, feeding delta and notifications), never through the connector under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from syncbridge.connector import ApplyResult, Connector, Host, PullResult, Write
from syncbridge.emulation import RunningServer, serve_in_thread
from syncbridge.errors import AuthError, ConflictError, CursorExpired, RateLimited
from syncbridge.model import iso
from syncbridge_connectors.microsoft365.emulator import RunningGraph
from syncbridge_connectors.microsoft365.mapping import EXT_ID
from tests.support.emulators import microsoft365
from tests.contract.suite import CLINICIAN, ConnectorContract, Harness, Vendor, World, next_weekday_at, world_for

SECRET_ENV = "SYNCBRIDGE_TEST_M365_SECRET"
SECRET = "test-client-secret-value"
CLIENT_ID = "5f0c7d1e-0000-4000-8000-00000000c11e"
MAILBOX = "dr.rivera@lakeside.example"


class OutlookUser(Vendor):
    """The clinician using Outlook on their own mailbox."""

    can_throttle = True

    def __init__(self, server: RunningGraph, mailbox: str = MAILBOX) -> None:
        self.emulator = server.emulator
        self.mailbox = mailbox

    @staticmethod
    def _event_id(external_id: str) -> str:
        return external_id.partition("/")[2]

    async def live(self) -> list[dict[str, Any]]:
        out = []
        for e in self.emulator.events_of(self.mailbox):
            ours = any(p["id"] == EXT_ID for p in e.get("singleValueExtendedProperties", []))
            if ours and not e["isCancelled"]:
                start = datetime.fromisoformat(e["start"]["dateTime"][:19] + "+00:00")
                end = datetime.fromisoformat(e["end"]["dateTime"][:19] + "+00:00")
                out.append({"external_id": f"{CLINICIAN}/{e['id']}", "start": start, "end": end})
        return sorted(out, key=lambda e: e["start"])

    async def move(self, external_id: str, start: datetime, end: datetime) -> None:
        # Outlook clients send Windows zone names
        zone = "Eastern Standard Time"
        from zoneinfo import ZoneInfo

        local = ZoneInfo("America/New_York")
        self.emulator.user_update(self.mailbox, self._event_id(external_id), {
            "start": {"dateTime": start.astimezone(local).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": zone},
            "end": {"dateTime": end.astimezone(local).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": zone},
        })

    async def delete(self, external_id: str) -> None:
        self.emulator.user_delete(self.mailbox, self._event_id(external_id))

    async def retitle(self, external_id: str, title: str) -> None:
        self.emulator.user_update(self.mailbox, self._event_id(external_id), {"subject": title})

    async def invalidate_cursor(self) -> None:
        self.emulator.expire_sync_state()

    async def throttle(self, requests: int, retry_after: float | None = 0.1) -> None:
        self.emulator.fail_next(429, requests, retry_after=retry_after)

    async def add_private_event(self, start: datetime, end: datetime, title: str) -> None:
        self.emulator.user_create(self.mailbox, {
            "subject": title,
            "body": {"contentType": "text", "content": "Bring the insurance card"},
            "start": {"dateTime": start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
            "end": {"dateTime": end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        })


@pytest.fixture
def graph(tmp_path: Path) -> Iterator[RunningGraph]:
    with microsoft365(tmp_path / "graph-tls", CLIENT_ID, SECRET, MAILBOX) as server:
        yield server


def m365_config(server: RunningGraph, **options: Any) -> dict[str, Any]:
    return {
        "type": "microsoft365",
        "tenant": server.emulator.tenant,
        "client_id": CLIENT_ID,
        "client_secret": {"env": SECRET_ENV},
        "authority_host": server.authority_host,
        "graph_url": server.graph_url,
        "ca_bundle": str(server.ca_file),
        **options,
    }


def m365_harness(server: RunningGraph, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Harness:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return Harness(m365_config(server, **options), {"mailbox": MAILBOX}, OutlookUser(server))


class TestMicrosoft365(ConnectorContract):
    @pytest.fixture
    def harness(self, graph: RunningGraph, monkeypatch: pytest.MonkeyPatch) -> Harness:
        return m365_harness(graph, monkeypatch)
# --- Microsoft 365 specifics beyond the shared suite -------------------------------------------


def serve_routes(connector: Connector) -> RunningServer:
    """The daemon's part of a webhook: the connector's routes mounted under /webhooks/<name>/ on loopback."""
    routes = [Route(f"/webhooks/{connector.name}{r.path}", r.handler, methods=list(r.methods)) for r in connector.webhook_routes()]
    return serve_in_thread(Starlette(routes=routes))


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def pushed_world(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **options: Any) -> AsyncIterator[tuple[World, Host, str]]:
    """A world whose connector has a public URL served on loopback, subscriptions made."""
    graph.emulator.notifier.allow_http = True  # the loopback listener is plain http
    harness = m365_harness(graph, monkeypatch, **options)
    host = Host(public_url="http://placeholder")
    async with world_for(harness, tmp_path, host) as world:
        server = serve_routes(world.connector)
        host.public_url = f"{server.url}/webhooks/{world.connector.name}"
        try:
            await world.connector.maintain()
            yield world, host, host.public_url
        finally:
            server.stop()


async def test_cancel_in_outlook_arrives_by_notification(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Deleting the event in Outlook cancels the session through a change notification, without a poll."""
    async with pushed_world(graph, monkeypatch, tmp_path) as (world, host, _):
        subs = list(graph.emulator.notifier.subscriptions.values())
        assert [s.resource for s in subs] == [f"users/{MAILBOX}/events"]
        assert subs[0].client_state == host.vault_get("graph_client_state")
        appt_id = world.book_here(next_weekday_at(10))
        await world.drain()
        ext = world.external_id(appt_id)
        assert graph.emulator.notifier.idle()
        echoes = [world.connector.webhook_targets(h, b) for h, b in host.accepted]
        assert echoes == [[]], "the notification of our own create names nothing to re-read"
        host.accepted.clear()
        before = len(graph.emulator.log)

        await world.vendor.delete(ext)
        await until(lambda: host.accepted)
        headers, body = host.accepted[0]
        targets = world.connector.webhook_targets(headers, body)
        assert targets == [ext]
        observed = [await world.connector.read(t) for t in targets]
        world.engine.observe(world.connector.name, PullResult(observed, cursor=None), advance=False)

        appt = world.store.appointment(appt_id)
        assert appt.cancelled and appt.fields["cancellation"]["via"] == world.connector.name
        assert [p for _, p in graph.emulator.log[before:]] == [f"/v1.0/users/{MAILBOX}/events/{ext.partition('/')[2]}"]


async def test_forged_notification_is_refused(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A notification without our clientState is refused with 403 and nothing is stored or changed."""
    async with pushed_world(graph, monkeypatch, tmp_path) as (world, host, url):
        appt_id = world.book_here(next_weekday_at(11))
        await world.drain()
        ext = world.external_id(appt_id)
        assert graph.emulator.notifier.idle()
        host.accepted.clear()
        pulls = host.pull_requests
        sub = next(iter(graph.emulator.notifier.subscriptions.values()))
        forged = {"value": [{
            "subscriptionId": sub.id, "changeType": "deleted", "clientState": "guessed-state", "tenantId": graph.emulator.tenant,
            "resource": f"Users/x/Events/{ext.partition('/')[2]}", "resourceData": {"id": ext.partition("/")[2]},
        }]}
        async with httpx.AsyncClient() as http:
            wrong = await http.post(f"{url}/notifications", json=forged)
            missing = await http.post(f"{url}/notifications", json={"value": [forged["value"][0] | {"clientState": None}]})
            garbage = await http.post(f"{url}/notifications", content=b"{not json")
            lifecycle = await http.post(f"{url}/lifecycle", json={"value": [{"subscriptionId": sub.id, "clientState": "x", "lifecycleEvent": "missed"}]})
            handshake = await http.post(f"{url}/notifications", params={"validationToken": "abc 123"})
        assert [r.status_code for r in (wrong, missing, garbage, lifecycle)] == [403, 403, 403, 403]
        assert handshake.status_code == 200 and handshake.text == "abc 123" and handshake.headers["content-type"].startswith("text/plain")
        assert host.accepted == [] and host.pull_requests == pulls
        assert not world.store.appointment(appt_id).cancelled
        assert len(await world.vendor.live()) == 1


async def test_lifecycle_notifications_keep_push_alive(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A removed subscription is made again, a reauthorization request renews, a missed batch asks for a pull."""
    notifier = graph.emulator.notifier
    async with pushed_world(graph, monkeypatch, tmp_path) as (world, host, _):
        await world.sync()
        first = next(iter(notifier.subscriptions))
        pulls = host.pull_requests
        notifier.lifecycle(first, "missed")
        await until(lambda: host.pull_requests > pulls)

        notifier.lifecycle(first, "reauthorizationRequired")
        await until(lambda: world.connector.push.pending)
        await world.sync()
        assert ("PATCH", f"/v1.0/subscriptions/{first}") in graph.emulator.log

        notifier.lifecycle(first, "subscriptionRemoved")
        await until(lambda: world.connector.push.pending)
        await world.sync()
        assert list(notifier.subscriptions) != [first] and len(notifier.subscriptions) == 1
        appt_id = world.book_here(next_weekday_at(12))
        await world.drain()
        host.accepted.clear()
        await world.vendor.retitle(world.external_id(appt_id), "Client session #late")
        await until(lambda: host.accepted)  # notifications flow on the new subscription


async def test_subscriptions_renewed_before_expiry_and_deleted_on_close(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """maintain() renews a subscription close to expiry; close() deletes it."""
    notifier = graph.emulator.notifier
    async with pushed_world(graph, monkeypatch, tmp_path, subscription_minutes=60, renew_before_minutes=120) as (world, host, _):
        sub = next(iter(notifier.subscriptions.values()))
        first_expiry = sub.expires
        await asyncio.sleep(1.1)
        await world.connector.maintain()
        assert list(notifier.subscriptions) == [sub.id] and sub.expires > first_expiry
        await world.connector.close()
        assert notifier.subscriptions == {}


async def test_no_public_url_means_no_subscription(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without http.public_url nothing is subscribed; polling carries everything."""
    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        await world.connector.maintain()
        assert graph.emulator.notifier.subscriptions == {}
        assert not any(p.startswith("/v1.0/subscriptions") for _, p in graph.emulator.log)


async def test_certificate_credential(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An app registration with a certificate signs its assertion with msal; the emulator verifies it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncbridge")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "app.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "app.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    graph.emulator.register_app("cert-app", cert.public_bytes(serialization.Encoding.PEM))
    config = m365_config(graph, client_id="cert-app", certificate_key={"file": str(tmp_path / "app.key")}, certificate={"file": str(tmp_path / "app.crt")})
    del config["client_secret"]
    async with world_for(Harness(config, {"mailbox": MAILBOX}, OutlookUser(graph)), tmp_path) as world:
        assert "1 mailbox(es) readable" in await world.connector.check()


async def test_wrong_secret_is_an_auth_error(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A wrong client secret stops with an AuthError naming the identity platform's reason, not the secret."""
    harness = m365_harness(graph, monkeypatch)
    monkeypatch.setenv(SECRET_ENV, "not-the-secret")
    async with world_for(harness, tmp_path) as world:
        with pytest.raises(AuthError) as refused:
            await world.connector.pull(None)
    assert "AADSTS7000215" in str(refused.value) and "not-the-secret" not in str(refused.value)


async def test_device_code_sign_in(graph: RunningGraph, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`syncbridge auth` for a clinician: the code is shown, the token cache lands in the vault, pulls use it."""
    graph.emulator.register_app("public-app", None)
    graph.emulator.identity.device_user = MAILBOX
    config = m365_config(graph, client_id="public-app", auth="delegated")
    del config["client_secret"]
    async with world_for(Harness(config, {"mailbox": MAILBOX}, OutlookUser(graph)), tmp_path) as world:
        with pytest.raises(AuthError, match="has not signed in"):
            await world.connector.pull(None)
        line = await world.connector.authorize(CLINICIAN)
        assert MAILBOX in line
        shown = capsys.readouterr().out
        assert f"{graph.base_url}/devicelogin" in shown and "enter the code" in shown
        cache = world.connector.host.vault_get(f"msal_token_cache:{CLINICIAN}")
        assert cache and "RefreshToken" in cache
        assert (await world.connector.pull(None)).complete
        graph.emulator.identity.revoke_all()  # access tokens die early: the refresh token from the vault serves
        world.connector.tokens.invalidate(CLINICIAN)
        assert (await world.connector.pull(None)).complete


async def test_throttling_and_mailbox_concurrency(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """503 with Retry-After becomes RateLimited(retry_after); many parallel reads stay within four per mailbox."""
    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        appt_id = world.book_here(next_weekday_at(9))
        await world.drain()
        ext = world.external_id(appt_id)
        graph.emulator.fail_next(503, 1, retry_after=7)
        with pytest.raises(RateLimited) as throttled:
            await world.connector.read(ext)
        assert throttled.value.retry_after == 7
        graph.emulator.latency = 0.1
        results = await asyncio.gather(*(world.connector.read(ext) for _ in range(12)))
        assert all(not r.deleted and r.canonical_id == appt_id for r in results)


async def test_delta_pages_removals_and_moves_out_of_window(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Delta rounds follow nextLinks; an event moved beyond the window is a move, a deleted one a delete."""
    async with world_for(m365_harness(graph, monkeypatch, page_size=2, window_days_ahead=60), tmp_path) as world:
        ids = [world.book_here(next_weekday_at(h)) for h in (9, 10, 11, 12, 13)]
        await world.drain()
        full = await world.connector.pull(None)
        assert full.complete and sorted(o.canonical_id for o in full.observations) == sorted(ids)
        log = graph.emulator.log
        assert sum(1 for _, p in log if p.endswith("/calendarView/delta")) == 3
        assert sum(1 for _, p in log if p.endswith("/calendarView")) == 3
        gone, moved = world.external_id(ids[0]), world.external_id(ids[1])
        await world.vendor.delete(gone)
        far = next_weekday_at(10, days_ahead=200)
        await world.vendor.move(moved, far, far.replace(minute=50))
        await world.vendor.add_private_event(next_weekday_at(15), next_weekday_at(16), "Dentist")
        changed = await world.connector.pull(full.cursor)
        by_id = {o.external_id: o for o in changed.observations}
        assert set(by_id) == {gone, moved}
        assert by_id[gone].deleted and not by_id[moved].deleted
        assert by_id[moved].fields["start"] == iso(far)
        graph.emulator.expire_sync_state()
        with pytest.raises(CursorExpired):
            await world.connector.pull(changed.cursor)


async def test_meeting_with_attendees_is_cancelled_not_deleted(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A session the clinician turned into a meeting (an invited co-therapist) is cancelled, so attendees are told."""
    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        appt_id = world.book_here(next_weekday_at(14))
        await world.drain()
        event_id = world.external_id(appt_id).partition("/")[2]
        graph.emulator.user_update(MAILBOX, event_id, {"attendees": [
            {"emailAddress": {"address": "cotherapist@lakeside.example", "name": "Co-therapist"}, "type": "required"}]})
        await world.sync(full=True)
        world.cancel_here(appt_id)
        await world.drain()
        assert ("POST", f"/v1.0/users/{MAILBOX}/events/{event_id}/cancel") in graph.emulator.log
        assert not any(m == "DELETE" for m, _ in graph.emulator.log)
        assert await world.vendor.live() == []
        assert world.store.dead_letters() == []


async def test_unreadable_event_is_reported_by_name(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One of our events that ends before it starts becomes a problem observation; the others still sync."""
    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        good, bad = world.book_here(next_weekday_at(9)), world.book_here(next_weekday_at(11))
        await world.drain()
        stored = graph.emulator.users[MAILBOX].events[world.external_id(bad).partition("/")[2]]
        stored["_end"] = stored["_start"] - timedelta(hours=1)  # what a broken sync client could leave behind
        hidden = stored["_ext"]
        for key, (pid, _) in list(hidden.items()):
            if "syncbridgefields" in key:
                hidden[key] = (pid, "{not json")
        result = await world.connector.pull(None)
        by_id = {o.external_id: o for o in result.observations}
        assert "ends" in (by_id[world.external_id(bad)].problem or "")
        assert by_id[world.external_id(good)].problem is None
        report = world.engine.observe(world.connector.name, result)
        assert report.rejected == 1 and not world.store.appointment(good).cancelled


async def test_retried_create_converges_the_first_attempt(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A create retried after its answer was lost finds the first event by transactionId and converges it."""
    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        appt_id = world.book_here(next_weekday_at(10))
        await world.drain()
        ext = world.external_id(appt_id)
        elsewhere = next_weekday_at(16)
        await world.vendor.move(ext, elsewhere, elsewhere + timedelta(minutes=50))
        desired = world.connector.capabilities.project(world.store.appointment(appt_id).fields)
        result = await world.connector.apply(appt_id, desired, None)
        assert result.external_id == ext
        live = await world.vendor.live()
        assert [(e["external_id"], e["start"]) for e in live] == [(ext, world.store.appointment(appt_id).start)]


async def test_one_failing_request_of_a_batch_fails_alone(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In one $batch a stale write (412) and a throttled request (429) fail alone, with when to retry; the rest land once."""
    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        booked = [world.book_here(next_weekday_at(9 + i)) for i in range(4)]
        await world.drain()
        stale = booked[0]
        user_start = next_weekday_at(17)
        await world.vendor.move(world.external_id(stale), user_start, user_start + timedelta(minutes=50))
        fresh = [world.book_here(next_weekday_at(9 + i, days_ahead=8)) for i in range(2)]
        writes = []
        for appt_id in booked:
            world.move_here(appt_id, world.store.appointment(appt_id).start + timedelta(minutes=30))
            desired = world.connector.capabilities.project(world.store.appointment(appt_id).fields)
            writes.append(Write(appt_id, desired, world.store.link(world.connector.name, appt_id)))
        writes += [Write(a, world.connector.capabilities.project(world.store.appointment(a).fields), None) for a in fresh]
        graph.emulator.fail_next(429, retry_after=7)
        http_before, log_before = graph.injector.requests, len(graph.emulator.log)
        results = await world.connector.apply_many(writes)
        http = graph.injector.requests - http_before
        calls = [p for _, p in graph.emulator.log[log_before:] if p != "/v1.0/$batch"]
        assert http == 1 and len(calls) == 6, (http, calls)
        throttled = [i for i, r in enumerate(results) if isinstance(r, RateLimited)]
        assert len(throttled) == 1 and results[throttled[0]].retry_after == 7, results
        results[throttled[0]] = (await world.connector.apply_many([writes[throttled[0]]]))[0]  # retried alone later, as the outbox does
        assert isinstance(results[0], ConflictError), results
        landed = [(w, r) for w, r in zip(writes, results, strict=True) if isinstance(r, ApplyResult)]
        assert len(landed) == 5
        live = {e["external_id"]: e["start"] for e in await world.vendor.live()}
        assert live[world.external_id(stale)] == user_start, "the stale write overwrote the clinician's move"
        for w, r in landed:
            assert live[r.external_id] == datetime.fromisoformat(w.desired["start"])
        assert len(live) == 6, "a create landed twice, or not at all"


async def test_batches_beside_single_calls_stay_within_the_mailbox_limit(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Batched writes running beside single reads of the same mailbox are never refused for concurrency, and land once each."""
    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        appt_id = world.book_here(next_weekday_at(8))
        await world.drain()
        ext = world.external_id(appt_id)
        fresh = [world.book_here(next_weekday_at(9 + i % 8, days_ahead=8 + i // 8)) for i in range(40)]
        writes = [Write(a, world.connector.capabilities.project(world.store.appointment(a).fields), None) for a in fresh]
        graph.emulator.latency = 0.05
        results, reads = await asyncio.gather(world.connector.apply_many(writes), asyncio.gather(*(world.connector.read(ext) for _ in range(8))))
        refused = [r for r in results if not isinstance(r, ApplyResult)]
        assert not refused, refused[:3]
        assert all(not r.deleted for r in reads)
        assert len(await world.vendor.live()) == 41


async def test_emulator_refuses_a_batch_over_twenty(graph: RunningGraph, tmp_path: Path) -> None:
    """A $batch of 21 requests is refused as a whole (400), as Graph does; 20 are answered one by one, matched by id."""
    import ssl

    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(graph.ca_file)), trust_env=False) as http:
        token = (await http.post(f"{graph.base_url}/{graph.emulator.tenant}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": SECRET, "scope": f"{graph.base_url}/.default",
        })).json()["access_token"]  # fmt: skip
        auth = {"Authorization": f"Bearer {token}"}
        one = {"method": "GET", "url": f"/users/{MAILBOX}/events/nope"}
        too_many = await http.post(f"{graph.graph_url}/$batch", headers=auth, json={"requests": [one | {"id": str(i)} for i in range(21)]})
        assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "BadRequest"
        ok = await http.post(f"{graph.graph_url}/$batch", headers=auth, json={"requests": [one | {"id": str(i)} for i in range(20)]})
        answers = ok.json()["responses"]
        assert ok.status_code == 200 and sorted(int(a["id"]) for a in answers) == list(range(20))
        assert {a["status"] for a in answers} == {404} and answers[0]["body"]["error"]["code"] == "ErrorItemNotFound"


async def test_emulator_answers_as_graph_does(graph: RunningGraph, tmp_path: Path) -> None:
    """The emulator's refusals match Graph's documented ones: codes, statuses and the validation handshake."""
    import ssl

    emu = graph.emulator
    verify = ssl.create_default_context(cafile=str(graph.ca_file))
    token_url = f"{graph.base_url}/{emu.tenant}/oauth2/v2.0/token"
    async with httpx.AsyncClient(verify=verify, trust_env=False) as http:
        bad_scope = await http.post(token_url, data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": SECRET,
                                                     "scope": "Calendars.ReadWrite"})
        assert bad_scope.status_code == 400 and bad_scope.json()["error"] == "invalid_scope"
        anonymous = await http.get(f"{graph.graph_url}/users/{MAILBOX}/events")
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "InvalidAuthenticationToken"
        got = await http.post(token_url, data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": SECRET,
                                               "scope": f"{emu.resource}/.default"})
        http.headers["Authorization"] = f"Bearer {got.json()['access_token']}"
        base = f"{graph.graph_url}/users/{MAILBOX}"
        body = {"subject": "x", "transactionId": "t-1",
                "start": {"dateTime": "2030-01-07T10:00:00", "timeZone": "Pacific Standard Time"},
                "end": {"dateTime": "2030-01-07T10:50:00", "timeZone": "Pacific Standard Time"}}
        first, again = await http.post(f"{base}/events", json=body), await http.post(f"{base}/events", json=body)
        assert first.status_code == 201 and again.json()["id"] == first.json()["id"] and first.json()["transactionId"] == "t-1"
        assert first.json()["start"] == {"dateTime": "2030-01-07T18:00:00.0000000", "timeZone": "UTC"}
        event = first.json()
        moved = await http.patch(f"{base}/events/{event['id']}", json={"subject": "y"}, headers={"If-Match": event["@odata.etag"]})
        stale = await http.patch(f"{base}/events/{event['id']}", json={"subject": "z"}, headers={"If-Match": event["@odata.etag"]})
        assert moved.status_code == 200 and stale.status_code == 412 and stale.json()["error"]["code"] == "ErrorIrresolvableConflict"
        not_meeting = await http.post(f"{base}/events/{event['id']}/cancel", json={"comment": "off"})
        assert not_meeting.status_code == 400
        window = {"startDateTime": "2030-01-01T00:00:00Z", "endDateTime": "2030-02-01T00:00:00Z"}
        selected = await http.get(f"{base}/calendarView/delta", params=window | {"$select": "subject"})
        assert selected.status_code == 400
        expired = await http.get(f"{base}/calendarView/delta", params={"$deltatoken": "made-up"})
        assert expired.status_code == 410 and expired.json()["error"]["code"] == "SyncStateNotFound"
        subscription = {"changeType": "updated", "resource": f"users/{MAILBOX}/events", "clientState": "s",
                        "expirationDateTime": "2030-01-01T00:00:00Z"}
        plain = await http.post(f"{graph.graph_url}/subscriptions", json=subscription | {"notificationUrl": "http://127.0.0.1:9/hook"})
        assert plain.status_code == 400, "real Graph requires an HTTPS notificationUrl"
        emu.notifier.allow_http = True
        silent = serve_in_thread(Starlette(routes=[Route("/hook", _not_echoing, methods=["POST"])]))
        try:
            soon = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            refused = await http.post(f"{graph.graph_url}/subscriptions",
                                      json=subscription | {"notificationUrl": f"{silent.url}/hook", "expirationDateTime": soon})
        finally:
            silent.stop()
        assert refused.status_code == 400 and "validation" in refused.json()["error"]["message"].lower()


async def _not_echoing(request: Any) -> Any:
    """A webhook that answers 200 but does not echo the validation token."""
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("ok")


async def test_event_text_never_reaches_the_logs(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Titles typed in Outlook (a private appointment, a client's name next to a tag) appear in no log line."""
    from structlog.testing import capture_logs

    async with world_for(m365_harness(graph, monkeypatch), tmp_path) as world:
        appt_id = world.book_here(next_weekday_at(10))
        await world.drain()
        with capture_logs() as logs:
            await world.sync()
            await world.vendor.add_private_event(next_weekday_at(13), next_weekday_at(14), "Dentist - Dr. Molar")
            await world.vendor.retitle(world.external_id(appt_id), "Jane Doe #late")
            await world.sync()
            await world.sync(full=True)
            await world.drain()
        assert world.store.appointment(appt_id).cancelled
        assert logs and not any("Molar" in repr(entry) or "Jane" in repr(entry) for entry in logs)


async def test_notifications_of_our_own_writes_name_nothing(graph: RunningGraph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The notifications Graph sends for our own create, move and delete cost no re-read."""
    async with pushed_world(graph, monkeypatch, tmp_path) as (world, host, _):
        appt_id = world.book_here(next_weekday_at(10))
        await world.drain()
        world.move_here(appt_id, next_weekday_at(15))
        await world.drain()
        world.cancel_here(appt_id)
        await world.drain()
        assert graph.emulator.notifier.idle()
        kinds = [json.loads(b)["value"][0]["changeType"] for _, b in host.accepted]
        assert kinds == ["created", "updated", "deleted"]
        assert [world.connector.webhook_targets(h, b) for h, b in host.accepted] == [[], [], []]
