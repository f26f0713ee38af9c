"""Unreachable is not failed: writes to a system that is down wait for it, however long, and land
when it returns; the status and the worklist say so meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Link, Observation, PullResult
from syncbridge.engine import Engine
from syncbridge.errors import RateLimited, unreachable
from syncbridge.model import Role, Snapshot, empty_snapshot, iso, parse_iso
from syncbridge.outbox import Outbox
from syncbridge.policy.cancellation import decide


class Flaky(Connector):
    """A calendar whose server refuses connections while ``down``; applies are recorded."""

    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status"}), status_map=MIRROR_STATUS_MAP)
    down = False
    script: list[BaseException] = []
    attempts = 0
    applied: list[Snapshot] = []

    async def pull(self, cursor: str | None) -> PullResult:
        return PullResult([], "c1", complete=cursor is None)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id=external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        Flaky.attempts += 1
        if Flaky.down:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as err:
                raise unreachable("create event", err, "https://calendar.example:8443/") from err
        if Flaky.script:
            raise Flaky.script.pop(0)
        Flaky.applied.append(desired)
        return ApplyResult(f"ext-{appointment_id}", f"etag-{len(Flaky.applied)}")


def _world(tmp_path: Path, **outbox: Any) -> tuple[Engine, Outbox]:
    Flaky.down, Flaky.script, Flaky.attempts, Flaky.applied = False, [], 0, []
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_outage:Flaky"}},
        "outbox": {"backoff_base": 0.01, "backoff_max": 0.05, "max_attempts": 3} | outbox,
    }))
    from syncbridge.registry import build_connectors
    from syncbridge.store import Store

    engine = Engine(Store(cfg.store.path), build_connectors(cfg), cfg)
    return engine, Outbox(engine)


def _book(engine: Engine, **over: Any) -> str:
    start = datetime(2027, 1, 5, 10, tzinfo=UTC)
    snap = empty_snapshot() | {"clinician": "dr_a", "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": "America/New_York"}
    engine.change("sb-1", snap | over, via="ehr")
    return "sb-1"


async def _drain_until(outbox: Outbox, check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Run the worker as the daemon does (a drain, then a short wait) until ``check`` holds."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await outbox.drain()
        await asyncio.sleep(0.01)


async def test_an_outage_longer_than_max_attempts_loses_no_write(tmp_path: Path) -> None:
    """A calendar refusing connections for many more attempts than max_attempts: nothing is
    dead-lettered, the status shows the outage, a person is warned once it lasts, and the
    cancellation made meanwhile lands when the calendar returns, closing the warning."""
    engine, outbox = _world(tmp_path, outage_warning=0.5)
    store = engine.store
    Flaky.down = True
    appt = _book(engine)
    started = time.monotonic()
    await _drain_until(outbox, lambda: Flaky.attempts >= 3)
    assert time.monotonic() - started < 0.5
    assert store.worklist() == []  # a short outage is the weather: nobody is bothered
    state = store.connector_state("cal")
    assert not state["healthy"] and "writes failing since" in state["note"] and "refused the connection" in state["note"]

    record = engine.store.appointment(appt)
    assert record is not None
    status, cancellation = decide(engine.config.policy.cancellation, start=parse_iso(record.fields["start"]), now=datetime.now(UTC), via="ehr", by="client")
    engine.change(appt, record.fields | {"status": status, "cancellation": cancellation}, via="ehr")  # cancelled during the outage
    await engine.sync("cal")  # reads still answer: the failing writes keep the connector unhealthy
    assert not store.connector_state("cal")["healthy"]

    await _drain_until(outbox, lambda: bool(store.worklist()))
    assert Flaky.attempts > 3 * 3 and store.dead_letters() == []
    (warning,) = store.worklist()
    assert warning.kind == "unreachable" and warning.connector == "cal"
    assert "cal unreachable since" in warning.instruction
    assert "1 writes waiting; they will be applied when it returns" in warning.instruction

    Flaky.down = False
    await _drain_until(outbox, lambda: bool(Flaky.applied))
    assert Flaky.applied[-1]["status"] == "cancelled"
    assert store.dead_letters() == [] and store.outbox_due(float("inf"), 10) == []
    assert store.worklist() == []
    assert [w.closed_at is not None for w in store.worklist(include_closed=True)] == [True]
    assert store.connector_state("cal")["healthy"]


async def test_a_newer_version_never_jumps_the_retry_after(tmp_path: Path) -> None:
    """A write throttled with Retry-After 30 s, then the session moves: the move waits out the 30 s
    too, instead of going out at once to a server that asked us to slow down."""
    engine, outbox = _world(tmp_path)
    Flaky.script = [RateLimited("429 too many requests", retry_after=30)]
    appt = _book(engine)
    before = time.time()
    await outbox.drain()
    record = engine.store.appointment(appt)
    assert record is not None and Flaky.attempts == 1
    moved = datetime(2027, 1, 5, 11, tzinfo=UTC)
    engine.change(appt, record.fields | {"start": iso(moved), "end": iso(moved + timedelta(minutes=50))}, via="ehr")
    await outbox.drain()
    assert Flaky.attempts == 1 and Flaky.applied == []
    (item,) = engine.store.conn.execute("SELECT target_version, due_at, attempts FROM outbox").fetchall()
    assert item[0] == 2 and item[1] >= before + 30 and item[2] == 1


async def test_retry_by_a_person_goes_out_at_once(tmp_path: Path) -> None:
    """`syncbridge retry` on a write waiting out a long backoff sends it now."""
    engine, outbox = _world(tmp_path)
    Flaky.script = [RateLimited("429", retry_after=600)]
    appt = _book(engine)
    await outbox.drain()
    with engine.store.tx() as tx:
        tx.outbox_now("cal", appt, 1, time.time())
    await outbox.drain()
    assert len(Flaky.applied) == 1


@pytest.mark.parametrize("kind", ["transient", "unexpected"])
async def test_only_errors_not_understood_count_towards_max_attempts(tmp_path: Path, kind: str) -> None:
    """After a long outage, one error not understood does not dead-letter the write at once."""
    engine, outbox = _world(tmp_path)
    Flaky.down = True
    _book(engine)
    await _drain_until(outbox, lambda: Flaky.attempts >= 10)
    Flaky.down = False
    Flaky.script = [RuntimeError("a bug")] if kind == "unexpected" else [RateLimited("503")]
    await _drain_until(outbox, lambda: bool(Flaky.applied))
    assert engine.store.dead_letters() == []


async def test_writes_waiting_out_a_long_backoff_go_as_soon_as_the_system_answers(tmp_path: Path) -> None:
    """Three sessions written while the calendar is down wait out a long backoff (30 s and more,
    as after an hour-long outage). When it answers again, the next pull sends one of them as a
    probe and, once that lands, the other two right after: all within a poll of the return, not up
    to ``outbox.backoff_max`` later. A write a Retry-After holds keeps its time."""
    from syncbridge.runtime import Daemon

    Flaky.down, Flaky.script, Flaky.attempts, Flaky.applied = False, [RateLimited("429", retry_after=120)], 0, []
    daemon = Daemon(None, parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_outage:Flaky"}},
        "outbox": {"backoff_base": 60, "backoff_max": 300},
        "http": {"enabled": False},
    })))
    try:
        start = datetime(2027, 1, 5, 10, tzinfo=UTC)
        snap = empty_snapshot() | {"clinician": "dr_a", "end": iso(start + timedelta(hours=9)), "timezone": "America/New_York"}
        daemon.engine.change("sb-throttled", snap | {"start": iso(start)}, via="ehr")
        await daemon.outbox.drain()  # 429, Retry-After 120 s
        Flaky.down = True
        for hour in (11, 12, 13):
            daemon.engine.change(f"sb-{hour}", snap | {"start": iso(start.replace(hour=hour))}, via="ehr")
        await daemon.outbox.drain()
        assert Flaky.attempts == 4 and Flaky.applied == [] and daemon.store.outbox_next_due() > time.time() + 25

        Flaky.down = False
        await daemon.poll("cal")
        await daemon.outbox.drain()
        assert sorted(a["start"] for a in Flaky.applied) == [iso(start.replace(hour=h)) for h in (11, 12, 13)]
        assert not daemon.store.outage("cal") and daemon.store.connector_state("cal")["healthy"]
        (held,) = daemon.store.outbox_due(float("inf"), 10)
        assert held.appointment_id == "sb-throttled" and held.due_at > time.time() + 100
    finally:
        await daemon.close()
