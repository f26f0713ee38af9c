"""The contract suite against the Microsoft Graph emulator (connectors/microsoft365/emulator.py).

The connector talks to the emulator exactly as to a tenant: msal acquires tokens from the
emulator's identity endpoints over TLS (its own CA, given as ``ca_bundle``) and httpx calls
Graph. The Vendor is the clinician in Outlook: edits happen inside the mailbox (bumping the
change key, feeding delta and notifications), never through the connector under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from syncbridge_connectors.microsoft365.emulator import RunningGraph, running
from syncbridge_connectors.microsoft365.mapping import EXT_ID
from tests.contract.suite import CLINICIAN, ConnectorContract, Harness, Vendor

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

    async def throttle(self, requests: int) -> None:
        self.emulator.fail_next(429, requests, retry_after=0.1)

    async def add_private_event(self, start: datetime, end: datetime, title: str) -> None:
        self.emulator.user_create(self.mailbox, {
            "subject": title,
            "body": {"contentType": "text", "content": "Bring the insurance card"},
            "start": {"dateTime": start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
            "end": {"dateTime": end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "UTC"},
        })


@pytest.fixture
def graph(tmp_path: Path) -> Iterator[RunningGraph]:
    server = running(tmp_path / "graph-tls")
    server.emulator.register_app(CLIENT_ID, SECRET)
    server.emulator.add_user(MAILBOX)
    try:
        yield server
    finally:
        server.stop()


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
