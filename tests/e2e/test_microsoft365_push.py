"""`syncbridge run` with a Microsoft 365 connector: a cancellation in Outlook arrives by change notification.

The daemon is a real process; the Graph emulator (TLS, msal token endpoint) runs in the test and
POSTs real change notifications to the daemon's loopback listener, which is the configured
``http.public_url``. Outlook's poll interval is 600 s, so a cancellation that reaches the
canonical record (and the EHR) within seconds came through the notification.
"""

from __future__ import annotations

import asyncio
import os
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from syncbridge.emulation import free_port
from syncbridge.store import Store
from syncbridge_connectors.microsoft365.emulator import RunningGraph
from tests.support.daemon import ROOT, DaemonProcess
from tests.support.emulators import microsoft365
from tests.support.replica import ReplicaVendor

pytestmark = pytest.mark.slow

MAILBOX = "dr.lee@lakeside.example"
CLIENT_ID = "e2e-app"
SECRET = "e2e-client-secret"


@pytest.fixture
def graph(tmp_path: Path) -> Iterator[RunningGraph]:
    # the daemon's loopback listener is plain http
    with microsoft365(tmp_path / "graph-tls", CLIENT_ID, SECRET, MAILBOX, allow_http=True) as server:
        yield server


def practice(tmp: Path, graph: RunningGraph, port: int) -> dict[str, Any]:
    (tmp / "m365-secret").write_text(SECRET)
    (tmp / "vault-key").write_text("a long random string for the e2e vault")
    return {
        "practice": {"name": "Lakeside Therapy"},
        "store": {"path": str(tmp / "store.db"), "secret_key": {"file": str(tmp / "vault-key")}},
        "clinicians": {"dr_lee": {"accounts": {"ehr": {}, "outlook": {"mailbox": MAILBOX}}}},
        "connectors": {
            "ehr": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp / "ehr.db"), "role": "record", "poll_interval": 0.5},
            "outlook": {
                "type": "microsoft365", "tenant": graph.emulator.tenant, "client_id": CLIENT_ID,
                "client_secret": {"file": str(tmp / "m365-secret")}, "authority_host": graph.authority_host,
                "graph_url": graph.graph_url, "ca_bundle": str(graph.ca_file), "poll_interval": 600,
            },
        },
        "http": {"port": port, "public_url": f"http://127.0.0.1:{port}", "channel_check_interval": 1},
    }


def _store(tmp: Path) -> Store:
    return Store(tmp / "store.db")


def _inbox_rows(tmp: Path) -> int:
    with sqlite3.connect(tmp / "store.db") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM webhook_inbox").fetchone()[0])


def test_outlook_cancellation_arrives_by_notification(tmp_path: Path, graph: RunningGraph) -> None:
    """Deleting the session's event in Outlook cancels it in the record within seconds; a forged notification changes nothing."""
    emu = graph.emulator
    ehr = ReplicaVendor(str(tmp_path / "ehr.db"))
    start = datetime.now(UTC).replace(microsecond=0, second=0, minute=0) + timedelta(days=3)
    asyncio.run(ehr.book(start, start + timedelta(minutes=50), "c1", clinician="dr_lee"))
    asyncio.run(ehr.book(start + timedelta(hours=2), start + timedelta(hours=2, minutes=50), "c2", clinician="dr_lee"))
    port = free_port()
    daemon = DaemonProcess(tmp_path, practice(tmp_path, graph, port))
    try:
        daemon.wait_for(lambda: len(emu.notifier.subscriptions) == 1 and len(emu.events_of(MAILBOX)) == 2, 60)
        sub = next(iter(emu.notifier.subscriptions.values()))
        assert sub.notification_url == f"http://127.0.0.1:{port}/webhooks/outlook/notifications"
        assert emu.notifier.idle()
        # the daemon settled: every event linked, nothing left to write
        store = _store(tmp_path)
        daemon.wait_for(lambda: len(store.links_of("outlook")) == 2 and not store.outbox_due(float("inf"), 1), 30)

        # a forged notification (wrong clientState) is refused before anything is stored
        inbox_before = _inbox_rows(tmp_path)
        victim = emu.events_of(MAILBOX)[0]["id"]
        forged = {"value": [{"subscriptionId": sub.id, "clientState": "guess", "changeType": "deleted",
                             "resource": f"Users/x/Events/{victim}", "resourceData": {"id": victim}}]}
        refused = httpx.post(f"{daemon.url}/webhooks/outlook/notifications", json=forged, timeout=5)
        assert refused.status_code == 403
        assert _inbox_rows(tmp_path) == inbox_before
        assert all(not a.cancelled for a in store.appointments())

        # the clinician deletes one session's event in Outlook
        link = next(lk for lk in store.links_of("outlook") if lk.external_id and lk.external_id.endswith(victim))
        deleted_at = time.monotonic()
        emu.user_delete(MAILBOX, victim)
        daemon.wait_for(lambda: store.appointment(link.appointment_id).cancelled, 30)
        took = time.monotonic() - deleted_at
        assert took < 30, "far below the 600 s poll interval: it came by notification"
        print(f"cancelled in the record {took:.2f} s after the delete in Outlook")
        assert store.appointment(link.appointment_id).fields["cancellation"]["via"] == "outlook"
        others = [a for a in store.appointments() if a.id != link.appointment_id]
        assert len(others) == 1 and not others[0].cancelled
        # the record hears of it too (the EHR replica shows the session cancelled)
        daemon.wait_for(lambda: sum(1 for item in ehr.all_items() if item["status"] == "cancelled" or item["deleted"]) == 1, 30)
        store.close()
    finally:
        assert daemon.stop() == 0
    assert emu.notifier.subscriptions == {}, "the subscription is deleted when the daemon stops"


def test_auth_device_code_as_a_process(tmp_path: Path, graph: RunningGraph) -> None:
    """`syncbridge auth` for a delegated connector: the code is printed, the clinician enters it, the cache is stored encrypted."""
    emu = graph.emulator
    emu.register_app("public-client", None)
    (tmp_path / "vault-key").write_text("a long random string for the e2e vault")
    conf = {
        "store": {"path": str(tmp_path / "store.db"), "secret_key": {"file": str(tmp_path / "vault-key")}},
        "clinicians": {"dr_lee": {"accounts": {"outlook": {"mailbox": MAILBOX}}}},
        "connectors": {"outlook": {
            "type": "microsoft365", "auth": "delegated", "tenant": emu.tenant, "client_id": "public-client",
            "authority_host": graph.authority_host, "graph_url": graph.graph_url, "ca_bundle": str(graph.ca_file),
        }},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncbridge.cli", "auth", "outlook", "dr_lee", "--config", str(path)],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    printed = ""
    deadline = time.monotonic() + 60
    while "enter the code" not in printed and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            printed += proc.stdout.readline()
    assert f"{graph.base_url}/devicelogin" in printed, printed
    emu.identity.device_user = MAILBOX  # the clinician enters the code in a browser and signs in
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, printed + out
    assert f"dr_lee signed in to outlook as {MAILBOX}" in out
    refresh_tokens = list(emu.identity.refresh_tokens)
    assert refresh_tokens
    store = Store(tmp_path / "store.db")
    try:
        [(key, _)] = store.conn.execute("SELECT key, value FROM secrets WHERE connector = 'outlook'").fetchall()
        assert key == "msal_token_cache:dr_lee"
    finally:
        store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert not any(t.encode() in raw for t in refresh_tokens), "the refresh token is stored encrypted"
