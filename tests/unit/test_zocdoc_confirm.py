"""Zocdoc bookings that arrive pending (providers with manual confirmation): confirmed once the EHR holds them.

The EHR is the file-backed record system of tests/support/replica.py; Zocdoc is its emulator,
with the provider set to manual confirmation, so every booking arrives ``pending_booking``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.confirmations import Confirmer
from syncbridge.engine import Engine
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.statuspage import render_status
from syncbridge.store import Store
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running
from tests.contract.suite import CLINICIAN, ZONE, next_weekday_at
from tests.contract.test_zocdoc import ACCOUNT, LOCATION, PROVIDER, zocdoc_config
from tests.support.practice import REPLICA


@pytest.fixture
def zocdoc() -> Iterator[Any]:
    server = running(ZocdocEmulator(client_id="practice-app", client_secret="s3cret-test"))
    server.emulator.add_provider(PROVIDER, LOCATION, ZONE, confirmation="manual")
    try:
        yield server
    finally:
        server.stop()


def practice(zocdoc: Any, tmp: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> tuple[Engine, Outbox, Confirmer]:
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp / "store.db")},
        "clinicians": {CLINICIAN: {"display_name": "Dr. Rivera", "accounts": {"zocdoc": dict(ACCOUNT), "ehr": {}}}},
        "connectors": {"zocdoc": zocdoc_config(zocdoc, monkeypatch, **options),
                       "ehr": {"type": REPLICA, "path": str(tmp / "ehr.db"), "role": "record"}},
    }))
    engine = Engine(Store(cfg.store.path), build_connectors(cfg), cfg)
    return engine, Outbox(engine), Confirmer(engine)


async def test_pending_booking_is_confirmed_once_the_ehr_holds_it(zocdoc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pending Zocdoc booking is not confirmed before the EHR holds the session, and is confirmed right after; the status page lists it meanwhile."""
    engine, outbox, confirmer = practice(zocdoc, tmp_path, monkeypatch)
    ext = zocdoc.emulator.book(PROVIDER, LOCATION, next_weekday_at(11))
    assert zocdoc.emulator.record(ext)["appointment_status"] == "pending_booking"
    await engine.sync("zocdoc")
    [pending] = engine.store.pending_bookings()
    assert pending.external_id == ext
    page = render_status(SimpleNamespace(store=engine.store, config=engine.config, connectors=engine.connectors))  # type: ignore[arg-type]
    assert "Bookings awaiting confirmation" in page and "syncbridge, once recorded" in page

    assert await confirmer.run() == 0  # the EHR does not hold it yet
    assert zocdoc.emulator.record(ext)["appointment_status"] == "pending_booking"
    await outbox.drain()  # the booking is created in the EHR
    assert await confirmer.run() == 1
    assert zocdoc.emulator.record(ext)["appointment_status"] == "confirmed"
    assert engine.store.pending_bookings() == []
    assert [e["kind"] for e in engine.store.audit_entries(kind="booking_confirmed")] == ["booking_confirmed"]
    for c in engine.connectors.values():
        await c.close()


async def test_a_failed_confirm_is_retried(zocdoc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zocdoc failing the confirm (503) leaves the booking pending with the error shown; it is confirmed after the backoff."""
    engine, outbox, confirmer = practice(zocdoc, tmp_path, monkeypatch)
    ext = zocdoc.emulator.book(PROVIDER, LOCATION, next_weekday_at(11))
    await engine.sync("zocdoc")
    await outbox.drain()
    zocdoc.emulator.fail_next(503, retry_after=0.2)
    assert await confirmer.run() == 0
    [pending] = engine.store.pending_bookings()
    assert "throttled" in (pending.last_error or "")
    confirmer.backoff.not_before.clear()  # the backoff has passed
    assert await confirmer.run() == 1
    assert zocdoc.emulator.record(ext)["appointment_status"] == "confirmed"
    for c in engine.connectors.values():
        await c.close()


async def test_practice_that_confirms_by_hand_gets_a_worklist_item(zocdoc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With confirm_bookings: false, a recorded pending booking raises a worklist item, closed once the practice confirms in Zocdoc."""
    engine, outbox, confirmer = practice(zocdoc, tmp_path, monkeypatch, confirm_bookings=False)
    ext = zocdoc.emulator.book(PROVIDER, LOCATION, next_weekday_at(11))
    await engine.sync("zocdoc")
    await confirmer.run()
    assert engine.store.worklist() == []  # not recorded yet: nothing to confirm
    await outbox.drain()
    await confirmer.run()
    [item] = engine.store.worklist()
    assert item.kind == "confirm_booking" and ext in item.instruction and "Dr. Rivera" in item.instruction and "ehr" in item.instruction
    assert zocdoc.emulator.record(ext)["appointment_status"] == "pending_booking"  # syncbridge did not confirm it
    zocdoc.emulator.practice_confirm(ext)
    await engine.sync("zocdoc")
    await confirmer.run()
    assert engine.store.worklist() == [] and engine.store.pending_bookings() == []
    for c in engine.connectors.values():
        await c.close()
