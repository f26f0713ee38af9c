"""`syncbridge run` as a process with Google push: a deletion in Google reaches the record by a watch channel.

The Calendar API emulator runs in the test; the daemon polls only every 600 s, so a cancellation
that arrives within seconds came through the channel: the emulator POSTs to the daemon's
``http.public_url`` + /webhooks/google/notify, the daemon stores the notification in its inbox and
pulls. Forged notifications are refused, and stopping the daemon stops the channel.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.emulation import free_port
from syncbridge.engine import Engine
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.google_calendar.emulator import Running
from tests.contract.suite import next_weekday_at
from tests.support.daemon import DaemonProcess
from tests.support.emulators import google_calendar

pytestmark = pytest.mark.slow

ZONE = "America/New_York"
EMAIL = "dr.lee@practice.example"


@pytest.fixture
def google() -> Iterator[Running]:
    with google_calendar(EMAIL, zone=ZONE) as server:
        yield server


def practice_config(tmp: Path, google: Running, port: int) -> dict[str, Any]:
    key = tmp / "sa.json"
    key.write_text(json.dumps(google.emulator.add_service_account("syncbridge@practice.iam.gserviceaccount.com")))
    key.chmod(0o600)
    vault_key = tmp / "store-key"
    vault_key.write_text(secrets.token_urlsafe(32))
    vault_key.chmod(0o600)
    return {
        "practice": {"name": "Lakeside Therapy", "timezone": ZONE},
        "store": {"path": str(tmp / "store.db"), "secret_key": {"file": str(vault_key)}},
        "clinicians": {"dr_lee": {"accounts": {"google": {"email": EMAIL}}}},
        "connectors": {
            "google": {
                "type": "google_calendar", "service_account_key": {"file": str(key)}, "api_root": google.api_root,
                "poll_interval": 600, "full_sweep_interval": 86400,
            },
        },
        "http": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
        "logging": {"level": "info", "json": True},
    }  # fmt: skip


def book(conf: dict[str, Any]) -> str:
    """A session booked in the record before the daemon starts (as the front desk would)."""
    cfg = parse_config(yaml.safe_dump(conf))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    start = next_weekday_at(11)
    appt = new_canonical_id()
    snap = empty_snapshot() | {
        "clinician": "dr_lee", "client_key": "client-2231", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
        "timezone": ZONE, "service_code": "90834", "location": "Room 1",
    }  # fmt: skip
    Engine(store, connectors, cfg).change(appt, snap, via="front-desk", kind="booked")
    store.close()
    for c in connectors.values():
        asyncio.run(c.close())
    return appt


def test_deletion_in_google_reaches_the_daemon_by_push(tmp_path: Path, google: Running) -> None:
    """Deleting the session's event in Google cancels it in the daemon's record within seconds, not at the 600 s poll."""
    port = free_port()
    conf = practice_config(tmp_path, google, port)
    appt = book(conf)
    daemon = DaemonProcess(tmp_path, conf)
    store = Store(tmp_path / "store.db")
    try:
        def mirrored() -> bool:
            link = store.link("google", appt)
            return link is not None and bool(link.external_id) and bool(google.emulator.channels)

        daemon.wait_for(mirrored, 60)
        (channel,) = google.emulator.channels.values()
        assert channel.address == f"http://127.0.0.1:{port}/webhooks/google/notify"

        url = channel.address
        google.emulator.settle()  # our own insert was notified too; that one is genuine
        time.sleep(0.5)
        inbox_before = store.conn.execute("SELECT COUNT(*) FROM webhook_inbox").fetchone()[0]
        forged = {"X-Goog-Channel-ID": channel.id, "X-Goog-Resource-State": "exists", "X-Goog-Resource-ID": channel.resource_id}
        assert httpx.post(url, headers=forged, timeout=5).status_code == 401
        assert httpx.post(url, headers=forged | {"X-Goog-Channel-Token": "guess"}, timeout=5).status_code == 403
        inbox = store.conn.execute("SELECT COUNT(*) FROM webhook_inbox").fetchone()[0]
        assert inbox == inbox_before, "a refused notification must leave nothing in the inbox"

        link = store.link("google", appt)
        assert link is not None and link.external_id
        calendar, _, event_id = link.external_id.rpartition("/")
        started = time.monotonic()
        google.emulator.user_delete(calendar, event_id)

        def cancelled() -> bool:
            record = store.appointment(appt)
            return record is not None and record.cancelled

        daemon.wait_for(cancelled, 30)
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"{elapsed:.1f}s"
        record = store.appointment(appt)
        assert record is not None and record.fields["cancellation"]["via"] == "google"
        after = store.conn.execute("SELECT COUNT(*) FROM webhook_inbox").fetchone()[0]
        assert after > inbox_before, "the cancellation came through the webhook inbox"
        assert [d.status for d in google.emulator.deliveries if d.headers["X-Goog-Resource-State"] == "exists"][:1] == [200]
    finally:
        store.close()
        assert daemon.stop() == 0
    assert google.emulator.channels == {}, "stopping the daemon stops its watch channel"
