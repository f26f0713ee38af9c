"""`syncbridge resync` run beside the daemon is never lost to a pull in flight: the pull's cursor is
not written back over the reset, and the full listing the resync asks for is made."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from syncbridge.cli import main
from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Link, Observation, PullResult
from syncbridge.engine import Engine
from syncbridge.model import Role, Snapshot, empty_snapshot, iso
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store


class Calendar(Connector):
    """Incremental pulls never show a deletion here (only a full listing does); an incremental pull
    waits for ``gate`` so a test can act while it is in flight."""

    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status"}), status_map=MIRROR_STATUS_MAP)
    events: dict[str, Snapshot] = {}
    pulls: list[str | None] = []
    gate = asyncio.Event()

    async def pull(self, cursor: str | None) -> PullResult:
        Calendar.pulls.append(cursor)
        if cursor is not None:
            await Calendar.gate.wait()
            return PullResult([], f"token-{len(Calendar.pulls)}")
        listing = [Observation(ext, "e1", ext.removeprefix("ev-"), fields) for ext, fields in Calendar.events.items()]
        return PullResult(listing, "token-full", complete=True)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id=external_id, deleted=external_id not in Calendar.events)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        Calendar.events[f"ev-{appointment_id}"] = desired
        return ApplyResult(f"ev-{appointment_id}", "e1")


async def test_a_resync_beside_a_pull_in_flight_wins(tmp_path: Path) -> None:
    """A clinician deleted an event in a calendar whose incremental reads never show deletions; the
    admin runs `syncbridge resync` while the daemon's incremental pull is in flight. The pull's
    cursor is not written over the reset: the full listing follows at once, and the session is
    cancelled by it."""
    Calendar.events, Calendar.pulls, Calendar.gate = {}, [], asyncio.Event()
    config = {
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_resync:Calendar"}},
        "http": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = parse_config(yaml.safe_dump(config))
    store = Store(cfg.store.path)
    engine = Engine(store, build_connectors(cfg), cfg)
    try:
        start = datetime(2027, 1, 5, 10, tzinfo=UTC)
        engine.change("sb-1", empty_snapshot() | {"clinician": "dr_a", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                                                  "timezone": "America/New_York"}, via="ehr")
        await Outbox(engine).drain()
        await engine.sync("cal", full=True)
        assert store.cursor("cal") == "token-full"
        del Calendar.events["ev-sb-1"]  # the clinician deletes it; incremental pulls will not say so

        pull = asyncio.create_task(engine.sync("cal"))
        while not Calendar.pulls[1:]:
            await asyncio.sleep(0.01)
        assert main(["resync", "cal", "--config", str(path)]) == 0
        Calendar.gate.set()
        await pull

        assert Calendar.pulls == [None, "token-full", None]
        assert store.cursor("cal") == "token-full"
        record = store.appointment("sb-1")
        assert record is not None and record.cancelled
        assert [e["kind"] for e in store.audit_entries(kind="resync_requested")] == ["resync_requested"]
    finally:
        store.close()
