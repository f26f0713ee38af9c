"""The EHR notifies changes through an R4 rest-hook Subscription the connector keeps alive."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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
from syncbridge.emulation import RunningServer, serve_in_thread
from syncbridge.errors import ConfigError
from syncbridge.registry import build_connectors
from syncbridge_connectors.fhir.emulator import FHIREmulator, Running, running
from syncbridge_connectors.fhir.subscription import TOKEN_HEADER

TOKEN = "ehr-static-token"


class Recording(Host):
    def __init__(self, public_url: str | None, vault: bool = True) -> None:
        super().__init__(public_url)
        self.has_vault = vault

    def vault_get(self, key: str) -> str | None:
        if not self.has_vault:
            raise ConfigError("store.secret_key", "not set")
        return super().vault_get(key)

    def vault_put(self, key: str, value: str) -> None:
        if not self.has_vault:
            raise ConfigError("store.secret_key", "not set")
        super().vault_put(key, value)


@pytest.fixture
def ehr() -> Iterator[Running]:
    server = running(FHIREmulator(static_token=TOKEN, subscriptions=True))
    server.emulator.put({"resourceType": "Practitioner", "id": "pr-1"})
    try:
        yield server
    finally:
        server.stop()


def connector_for(ehr: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SB_FHIR_TOKEN", TOKEN)
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"ehr": {"practitioner": "Practitioner/pr-1"}}}},
        "connectors": {"ehr": {"type": "fhir", "base_url": ehr.base_url, "auth": "static", "token": {"env": "SB_FHIR_TOKEN"}}},
    }))
    return build_connectors(cfg)["ehr"]


def listener(connector: Any) -> RunningServer:
    """The daemon's listener, reduced to this connector's routes under /webhooks/ehr."""
    async def dispatch(request: Request) -> Response:
        route = next(r for r in connector.webhook_routes() if r.path == "/" + request.path_params["path"])
        return await route.handler(request)  # type: ignore[no-any-return]

    return serve_in_thread(Starlette(routes=[Route("/webhooks/ehr/{path:path}", dispatch, methods=["POST"])]))


def wait(predicate: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def subscriptions(ehr: Running) -> list[dict[str, Any]]:
    return ehr.emulator.all("Subscription")


async def test_a_change_in_the_ehr_is_notified_and_forged_posts_are_refused(ehr: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    connector = connector_for(ehr, tmp_path, monkeypatch)
    server = listener(connector)
    connector.host = host = Recording(server.url + "/webhooks/ehr")
    try:
        await connector.maintain()
        [sub] = subscriptions(ehr)
        assert sub["status"] == "active" and sub["criteria"] == "Appointment"
        assert sub["channel"]["endpoint"] == server.url + "/webhooks/ehr/notify" and "payload" not in sub["channel"]
        await connector.maintain()
        assert len(subscriptions(ehr)) == 1, "a second upkeep must not make a second subscription"

        start = datetime(2027, 1, 5, 15, tzinfo=UTC)
        ehr.emulator.put({
            "resourceType": "Appointment", "status": "booked", "start": start.isoformat(), "end": (start + timedelta(minutes=50)).isoformat(),
            "participant": [{"actor": {"reference": "Practitioner/pr-1"}, "status": "accepted"}],
        })  # front-desk staff book in the EHR
        assert await asyncio.to_thread(wait, lambda: len(host.accepted) == 1)
        assert host.accepted[0] == ({}, b"")  # the notification carries nothing about the patient

        forged = httpx.post(server.url + "/webhooks/ehr/notify", headers={TOKEN_HEADER: "guess"})
        bare = httpx.post(server.url + "/webhooks/ehr/notify")
        assert forged.status_code == bare.status_code == 401
        assert len(host.accepted) == 1
    finally:
        await connector.close()
        server.stop()
    assert len(subscriptions(ehr)) == 1  # kept across restarts: its token is in the vault


async def test_renewed_before_its_end_and_removed_when_its_token_cannot_be_kept(
    ehr: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connector = connector_for(ehr, tmp_path, monkeypatch)
    connector.host = Recording("http://127.0.0.1:9/webhooks/ehr", vault=False)
    await connector.maintain()
    [sub] = subscriptions(ehr)
    first_end = datetime.fromisoformat(sub["end"])
    connector.subscription._memory["end"] = (datetime.now(UTC) + timedelta(hours=12)).isoformat()  # near its end
    await connector.maintain()
    [renewed] = subscriptions(ehr)
    assert renewed["id"] == sub["id"] and datetime.fromisoformat(renewed["end"]) >= first_end
    await connector.close()
    assert subscriptions(ehr) == [], "without a vault the token dies with the process: the subscription goes too"


async def test_no_subscription_without_a_public_url(ehr: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    connector = connector_for(ehr, tmp_path, monkeypatch)
    connector.host = Recording(None)
    await connector.maintain()
    await connector.close()
    assert subscriptions(ehr) == []



async def test_ehr_without_subscriptions_is_polled_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EHR that serves no Subscription resource (R4 makes it optional): the connector asks once,
    says so, and keeps polling; it does not ask again at every check."""
    server = running(FHIREmulator(static_token=TOKEN))
    server.emulator.put({"resourceType": "Practitioner", "id": "pr-1"})
    try:
        connector = connector_for(server, tmp_path, monkeypatch)
        connector.host = Recording("https://sb.example.org/webhooks/ehr")
        try:
            await connector.maintain()
            await connector.maintain()
            assert connector.subscription.unavailable and "404" in connector.subscription.unavailable
            assert server.emulator.log.count(("POST", "/Subscription")) == 1
            assert (await connector.pull(None)).complete
        finally:
            await connector.close()
    finally:
        server.stop()
