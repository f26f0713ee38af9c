"""Logs never carry patient data: a full sync of records full of names and titles, at debug level."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.store import Store
from tests.support.replica import ReplicaVendor, open_db, touch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NAMES = ["Jane Doe", "Rosalind Okafor", "jane.doe@example.org", "(555) 867-5309", "Panic attacks"]


def test_full_sync_logs_no_client_data(tmp_path: Path) -> None:
    """A daemon syncing sessions titled with client names, e-mails and diagnoses never logs them."""
    conf = {
        "store": {"path": str(tmp_path / "store.db")},
        "http": {"enabled": False},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {
            "ehr": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "ehr.db"), "role": "record", "poll_interval": 0.2},
            "cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "cal.db"), "poll_interval": 0.2},
        },
        "logging": {"level": "debug"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(conf))
    ehr = ReplicaVendor(str(tmp_path / "ehr.db"))
    start = datetime(2027, 3, 1, 15, tzinfo=UTC)
    for i, name in enumerate(NAMES):
        ext = asyncio.run(ehr.book(start + timedelta(hours=i), start + timedelta(hours=i, minutes=50), name, clinician="dr_a"))
        with closing(open_db(str(tmp_path / "ehr.db"))) as conn:
            touch(conn, ext, title=f"Session with {name} #late", location=f"{name}'s home")
    # and one broken record whose text names a client
    bad = asyncio.run(ehr.book(start, start - timedelta(hours=1), "Jane Doe", clinician="dr_a"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncbridge.cli", "run", "--config", str(config)],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.5)
            store = Store(tmp_path / "store.db")
            done = len(store.appointments()) == len(NAMES) and not store.outbox_due(float("inf"), 1)
            store.close()
            if done:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    text = out.decode()
    assert '"event": "applied"' in text and "record_rejected" in text, "the sync did not run"
    assert bad in text  # ids are fine to log
    for secret in NAMES + ["Session with"]:
        assert secret not in text, f"{secret!r} reached the log"
