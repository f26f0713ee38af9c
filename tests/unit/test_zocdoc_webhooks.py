"""Zocdoc webhooks: only authentic, fresh, well-formed notifications are persisted, then the named appointment is re-read."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from syncbridge.config import parse_config
from syncbridge.connector import Host
from syncbridge.emulation import free_port, serve_in_thread
from syncbridge.registry import build_connectors
from syncbridge_connectors.zocdoc.delivery import WebhookSender
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running
from syncbridge_connectors.zocdoc.webhooks import WEBHOOK_PATH
from tests.contract.suite import CLINICIAN, ZONE, next_weekday_at

PROVIDER, LOCATION = "pr_hook-1", "lo_hook-1"
KEY = base64.b64encode(secrets.token_bytes(32)).decode()


class RecordingHost(Host):
    """The daemon's host as far as a webhook goes: what was persisted, in order."""


@pytest.fixture
def zocdoc() -> Iterator[Any]:
    server = running(ZocdocEmulator(client_id="hooks", client_secret="hook-secret"))
    server.emulator.add_provider(PROVIDER, LOCATION, ZONE)
    server.emulator.sender.retry_base = 0.05
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def connector(zocdoc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("ZD_CLIENT_SECRET", "hook-secret")
    monkeypatch.setenv("ZD_WEBHOOK_KEY", KEY)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "hooks.db")},
        "clinicians": {CLINICIAN: {"accounts": {"zocdoc": {"provider_id": PROVIDER, "location_id": LOCATION}}}},
        "connectors": {"zocdoc": {
            "type": "zocdoc", "environment": "sandbox", "base_url": zocdoc.base_url, "token_url": zocdoc.token_url,
            "client_id": "hooks", "client_secret": {"env": "ZD_CLIENT_SECRET"}, "webhook_secret": {"env": "ZD_WEBHOOK_KEY"},
        }},
    }))
    conn = build_connectors(cfg)["zocdoc"]
    conn.host = RecordingHost(public_url="https://sync.practice.example/webhooks/zocdoc")
    yield conn


@pytest.fixture
def receiver(connector: Any) -> Iterator[str]:
    """The connector's webhook route served on loopback, as the daemon mounts it."""
    [route] = connector.webhook_routes()
    server = serve_in_thread(Starlette(routes=[Route(route.path, route.handler, methods=list(route.methods))]))
    try:
        yield server.url + WEBHOOK_PATH
    finally:
        server.stop()


def _signed(body: bytes, *, key: str = KEY, at: int | None = None, version: str = "v1") -> dict[str, str]:
    return WebhookSender.headers({version: base64.b64decode(key)}, body, int(time.time()) if at is None else at)


EVENT = json.dumps({
    "event_type": "appointment_updated", "webhook_timestamp": "2026-11-02T15:00:00.000Z",
    "data": {"data_type": "appointment_data", "appointment_data": {
        "appointment_id": "a-1", "appointment_updated_timestamp": "2026-11-02T15:00:00.000Z",
        "appointment_update_type": "cancelled", "changed_attributes": [{"attribute_path": "appointment.status"}]}},
}).encode()
HUGE = EVENT[:-1] + b', "pad": "' + b"x" * (300 << 10) + b'"}'
#: small, correctly signed, and nested deeper than the JSON parser recurses
NESTED = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


async def test_zocdoc_cancellation_arrives_by_webhook(zocdoc: Any, connector: Any, receiver: str) -> None:
    """A client's cancel in Zocdoc is delivered signed, persisted through the host, and the re-read shows it cancelled by the client."""
    emulator = zocdoc.emulator
    ext = emulator.book(PROVIDER, LOCATION, next_weekday_at(10))
    emulator.sender.register(receiver, KEY)
    emulator.patient_cancel(ext, "patient_no_longer_available")
    assert emulator.sender.wait_idle()
    assert [d.status for d in emulator.sender.deliveries] == [200]
    [(headers, body)] = connector.host.accepted
    assert set(headers) >= {"webhook-signature", "webhook-timestamp"}
    assert connector.webhook_targets(headers, body) == [ext]
    obs = await connector.read(ext)
    assert obs.fields["status"] == "cancelled"
    assert obs.cancellation["by"] == "client"
    await connector.close()


async def test_provider_reason_maps_back_to_clinician(zocdoc: Any, connector: Any) -> None:
    """A cancellation Zocdoc records as provider_not_available is read as cancelled by the clinician."""
    ext = zocdoc.emulator.book(PROVIDER, LOCATION, next_weekday_at(10))
    zocdoc.emulator.patient_cancel(ext, "provider_not_available")
    obs = await connector.read(ext)
    assert obs.cancellation["by"] == "clinician" and "clinician" in obs.tags
    zocdoc.emulator.expose_reason_type = False  # the bare response schema: the practice's default applies
    obs = await connector.read(ext)
    assert obs.fields["status"] == "cancelled" and obs.cancellation["by"] is None
    await connector.close()


@pytest.mark.parametrize(
    ("headers", "body", "status", "problem"),
    [
        (lambda: _signed(EVENT, key=base64.b64encode(b"not the practice key").decode()), EVENT, 401, "signature does not match"),
        (lambda: _signed(EVENT, at=int(time.time()) - 3600), EVENT, 401, "stale"),
        (lambda: _signed(EVENT, at=int(time.time()) + 3600), EVENT, 401, "stale"),
        (lambda: _signed(b"{not json"), b"{not json", 400, "not JSON"),
        (lambda: _signed(b'{"data": {}}'), b'{"data": {}}', 400, "appointment_data"),
        (lambda: {"content-type": "application/json"}, EVENT, 401, "missing"),
        (lambda: _signed(EVENT) | {"webhook-signature": "garbage"}, EVENT, 401, "no version-prefixed"),
        (lambda: _signed(EVENT) | {"webhook-timestamp": "soon"}, EVENT, 400, "unix seconds"),
        (lambda: _signed(HUGE), HUGE, 413, "body over"),
        (lambda: _signed(NESTED), NESTED, 400, "not JSON"),
    ],
    ids=["forged", "stale", "future", "not-json", "no-appointment", "unsigned", "unparsable-signature", "bad-timestamp", "huge", "nested"],
)
async def test_bad_webhooks_are_refused_and_change_nothing(connector: Any, receiver: str, headers: Any, body: bytes, status: int,
                                                           problem: str) -> None:
    """A forged, stale or malformed webhook gets a 4xx naming the problem and nothing is persisted."""
    r = httpx.post(receiver, content=body, headers=headers())
    assert r.status_code == status
    assert problem in r.json()["error"]
    assert connector.host.accepted == [] and connector.host.pull_requests == 0


async def test_tampered_body_is_refused(connector: Any, receiver: str) -> None:
    """A signature computed for one body does not admit another."""
    headers = _signed(EVENT)
    r = httpx.post(receiver, content=EVENT.replace(b"a-1", b"a-2"), headers=headers)
    assert r.status_code == 401 and connector.host.accepted == []


async def test_any_listed_signature_version_may_match(connector: Any, receiver: str) -> None:
    """During a key rotation Zocdoc lists several signatures; one matching is enough."""
    stamp = int(time.time())
    old = WebhookSender.headers({"v1": b"retired key"}, EVENT, stamp)["webhook-signature"]
    new = _signed(EVENT, at=stamp, version="v2")["webhook-signature"]
    headers = _signed(EVENT, at=stamp) | {"webhook-signature": f"{old};{new}"}
    r = httpx.post(receiver, content=EVENT, headers=headers)
    assert r.status_code == 200 and len(connector.host.accepted) == 1


async def test_sandbox_mock_request_is_verified(zocdoc: Any, connector: Any, receiver: str) -> None:
    """Zocdoc's sandbox mock webhook (POST /v1/webhook/mock-request) passes verification end to end."""
    client = connector.client()
    r = await client.request("POST", "/v1/webhook/mock-request", "mock", json_body={"webhook_url": receiver, "webhook_key": KEY,
                                                                                     "appointment_update_type": "updated"})
    assert r.status_code == 200
    assert zocdoc.emulator.sender.wait_idle()
    [(_, body)] = connector.host.accepted
    assert connector.webhook_targets({}, body) == [r.json()["data"]["appointment_data"]["appointment_id"]]
    await connector.close()


def test_delivery_is_retried_only_on_transport_failure() -> None:
    """Zocdoc retries a webhook nobody answered, but not one answered with HTTP 500."""
    dead = f"http://127.0.0.1:{free_port()}/hook"
    sender = WebhookSender(retry_base=0.05, retry_window=0.5)
    sender.send(dead, {"v1": b"k"}, {"event_type": "appointment_updated"})
    assert sender.wait_idle(5)
    assert len(sender.deliveries) >= 3 and all(d.status is None for d in sender.deliveries)

    async def fail(request: Request) -> Response:
        return Response("boom", 500)

    server = serve_in_thread(Starlette(routes=[Route("/hook", fail, methods=["POST"])]))
    try:
        answered = WebhookSender(retry_base=0.05)
        answered.send(server.url + "/hook", {"v1": b"k"}, {"event_type": "appointment_updated"})
        assert answered.wait_idle(5)
        assert [d.status for d in answered.deliveries] == [500]
    finally:
        server.stop()
        sender.stop()


def test_no_secret_means_no_webhook_route(connector: Any) -> None:
    """Without a signing secret the connector offers no route at all (polling still runs)."""
    connector.options = connector.options.model_copy(update={"webhook_secret": None})
    assert connector.webhook_routes() == []


async def test_replayed_delivery_is_acknowledged_without_effect(connector: Any, receiver: str) -> None:
    """The same signed delivery sent again within the tolerance is answered 200 and stored once; a fresh attempt is stored."""
    headers = _signed(EVENT)
    first = httpx.post(receiver, content=EVENT, headers=headers)
    replay = httpx.post(receiver, content=EVENT, headers=headers)
    assert first.status_code == replay.status_code == 200 and replay.json()["duplicate"] is True
    assert len(connector.host.accepted) == 1 and connector.host.pull_requests == 1
    later = httpx.post(receiver, content=EVENT, headers=_signed(EVENT, at=int(time.time()) + 1))  # Zocdoc's retry: signed afresh
    assert later.status_code == 200 and "duplicate" not in later.json()
    assert len(connector.host.accepted) == 2


def test_replay_memory_is_bounded() -> None:
    """Deliveries are remembered only while their timestamp could still be accepted, and never more than the cap."""
    from syncbridge_connectors.zocdoc.webhooks import SeenDeliveries

    seen = SeenDeliveries(tolerance=300, cap=100)
    for i in range(500):
        assert seen.first_time(str(1_000_000 + i), b"{}", now=1_000_000.0 + i)
    assert len(seen) == 100
    assert not seen.first_time("1000499", b"{}", now=1_000_500.0)
    assert seen.first_time("1000499", b"{}", now=1_001_200.0)  # past twice the tolerance: forgotten, and refused by its timestamp anyway
    assert len(seen) == 1
