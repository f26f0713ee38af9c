"""SIGHUP on the real daemon: new settings take effect, and those that need a restart are named."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from syncbridge.emulation import free_port
from tests.e2e.test_daemon import TOKEN, config, seed, synced
from tests.support.daemon import DaemonProcess
from tests.support.replica import ReplicaVendor

pytestmark = pytest.mark.slow


def test_sighup_applies_logging_token_and_policy_and_names_the_port(tmp_path: Path) -> None:
    """A quieter logging level, the status token and a policy apply at once; a new port is named in the log and
    on the status page as waiting for a restart, and the old port keeps answering."""
    seed(tmp_path, 2)
    port = free_port()
    conf = config(tmp_path, port)
    (tmp_path / "token2").write_text("second-token")
    d = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN})
    try:
        d.wait_for(lambda: synced(tmp_path, 2), 30)
        conf["logging"] = {"level": "warning", "json": True}
        conf["http"]["token"] = {"file": str(tmp_path / "token2")}
        conf["http"]["port"] = free_port()
        conf["policy"] = {"cancellation": {"late_cancel_window_hours": 48}}
        d.write(conf)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for(lambda: '"reloaded"' in d.log.read_text(), 10)
        reloaded = next(json.loads(line) for line in d.log.read_text().splitlines() if '"reloaded"' in line)
        assert {"logging", "http", "policy"} <= set(reloaded["applied"]) and reloaded["needs_restart"] == ["http.port"]
        assert "reload_needs_restart" in d.log.read_text()
        assert d.get("/", auth=("admin", TOKEN)).status_code == 401  # the new token is in effect
        page = d.get("/", auth=("admin", "second-token"))
        assert page.status_code == 200 and "applied only after a restart: http.port" in page.text
        before = d.log.read_text()
        seed_more = ReplicaVendor(str(tmp_path / "ehr.db"))
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=9)
        asyncio.run(seed_more.book(start, start + timedelta(minutes=50), "c9", clinician="dr_lee"))
        d.wait_for(lambda: synced(tmp_path, 3), 20)
        assert '"level": "info"' not in d.log.read_text()[len(before):]  # the new level is in effect
    finally:
        assert d.stop() == 0
