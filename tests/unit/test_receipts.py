"""A receipt counts a system as done once it holds what the current version asks of it, also
when the newest change touched only what that system does not keep (billing, for a calendar)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.model import empty_snapshot, iso
from syncbridge.outbox import Outbox
from syncbridge.receipts import receipt
from syncbridge.registry import build_connectors
from syncbridge.store import Store


async def test_a_billing_change_leaves_the_calendar_copy_current(tmp_path: Path) -> None:
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_bulk_operations:Calendar"}},
    }))
    engine = Engine(Store(cfg.store.path), build_connectors(cfg), cfg)
    start = datetime(2027, 3, 2, 10, tzinfo=UTC)
    snap = empty_snapshot() | {"clinician": "dr_a", "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": "UTC"}
    engine.change("sb-1", snap, via="ehr")
    await Outbox(engine).drain()
    engine.change("sb-1", snap | {"service_code": "90837", "billing": "pending"}, via="ehr")  # nothing the calendar keeps
    appt = engine.store.appointment("sb-1")
    assert appt is not None and appt.version == 2
    assert (receipt(engine.store, engine.connectors, appt).done, receipt(engine.store, engine.connectors, appt).total) == (1, 1)
    engine.change("sb-1", snap | {"start": iso(start + timedelta(hours=1)), "end": iso(start + timedelta(hours=1, minutes=50))}, via="ehr")
    moved = engine.store.appointment("sb-1")
    assert moved is not None and receipt(engine.store, engine.connectors, moved).done == 0  # this one the calendar must be told
    engine.store.close()
