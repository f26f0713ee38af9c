"""Health is never "ok" while a write is dead-lettered: `syncbridge status`, the status page and
/readyz say so, naming how many and what to do, until the write is retried and lands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from syncbridge.cli import main
from syncbridge.config import parse_config
from syncbridge.errors import PermanentError
from syncbridge.http import build_app
from syncbridge.runtime import Daemon
from syncbridge.statuspage import render_status
from tests.unit.test_outage import Flaky, _book


async def test_a_dead_letter_keeps_the_connector_unhealthy_until_retried(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A write the calendar refuses as such (422) is dead-lettered; although every pull goes well,
    the connector is shown unhealthy everywhere until `syncbridge retry` sends it and it lands."""
    config = {
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_outage:Flaky"}},
        "http": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    Flaky.down, Flaky.attempts, Flaky.applied = False, 0, []
    Flaky.script = [PermanentError("create event: refused (422)")]
    daemon = Daemon(path, parse_config(yaml.safe_dump(config)))
    try:
        appt = _book(daemon.engine)
        await daemon.outbox.drain()
        await daemon.poll("cal")  # reads go well
        assert [d.appointment_id for d in daemon.store.dead_letters()] == [appt]

        state = daemon.store.connector_state("cal")
        assert not state["healthy"] and "1 write dead-lettered" in state["note"] and "syncbridge retry" in state["note"]
        daemon.ready.set()
        ready = TestClient(build_app(daemon), client=("127.0.0.1", 50000)).get("/readyz")
        assert ready.status_code == 503 and "1 write dead-lettered" in ready.json()["unhealthy"]["cal"]
        page = render_status(daemon)
        assert "unhealthy" in page and "1 write dead-lettered" in page
        assert main(["status", "--config", str(path)]) == 0
        assert "UNHEALTHY: 1 write dead-lettered" in capsys.readouterr().out

        assert main(["retry", "cal", appt, "--config", str(path)]) == 0
        await daemon.outbox.drain()
        assert len(Flaky.applied) == 1 and daemon.store.dead_letters() == []
        assert daemon.store.connector_state("cal")["healthy"]
        assert TestClient(build_app(daemon), client=("127.0.0.1", 50000)).get("/readyz").status_code == 200
    finally:
        await daemon.close()
