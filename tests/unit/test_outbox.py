"""The outbox: coalescing, backoff that honours Retry-After, dead letters with a worklist item."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Link, Observation, PullResult, Write
from syncbridge.engine import Engine
from syncbridge.errors import AuthError, PermanentError, RateLimited
from syncbridge.model import Role, Snapshot, empty_snapshot, iso
from syncbridge.outbox import Outbox, backoff_delay


class Scripted(Connector):
    """Answers apply() from a script of exceptions, then succeeds; counts calls."""

    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status"}), status_map=MIRROR_STATUS_MAP)
    script: list[BaseException] = []
    calls: list[Snapshot] = []

    async def pull(self, cursor: str | None) -> PullResult:
        return PullResult([], cursor, complete=cursor is None)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id=external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        Scripted.calls.append(desired)
        if Scripted.script:
            raise Scripted.script.pop(0)
        return ApplyResult(f"ext-{appointment_id}", f"etag-{len(Scripted.calls)}")


@pytest.fixture
def world(tmp_path: Path) -> tuple[Engine, Outbox]:
    Scripted.script, Scripted.calls = [], []
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_outbox:Scripted"}},
        "outbox": {"backoff_base": 1.0, "backoff_max": 60.0, "max_attempts": 3},
    }))
    from syncbridge.registry import build_connectors
    from syncbridge.store import Store

    engine = Engine(Store(cfg.store.path), build_connectors(cfg), cfg)
    return engine, Outbox(engine)


def book(engine: Engine, hour: int = 10, **over: Any) -> str:
    start = datetime(2027, 1, 5, hour, tzinfo=UTC)
    snap = empty_snapshot() | {"clinician": "dr_a", "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": "America/New_York"} | over
    engine.change("sb-1", snap, via="test")
    return "sb-1"


async def test_ten_edits_make_one_write(world: tuple[Engine, Outbox]) -> None:
    """Edits made before the worker runs coalesce into one write of the latest state."""
    engine, outbox = world
    for hour in range(8, 18):
        book(engine, hour)
    report = await outbox.drain()
    assert report.applied == 1 and len(Scripted.calls) == 1
    assert Scripted.calls[0]["start"] == "2027-01-05T17:00:00Z"


async def test_retry_after_is_honoured(world: tuple[Engine, Outbox]) -> None:
    """A throttled write waits at least as long as the vendor asked."""
    engine, outbox = world
    Scripted.script = [RateLimited("429", retry_after=30)]
    book(engine)
    before = time.time()
    await outbox.drain()
    item = engine.store.conn.execute("SELECT due_at, attempts, last_error FROM outbox").fetchone()
    assert item[0] >= before + 30 and item[1] == 1 and item[2].startswith("throttled")


def test_backoff_grows_with_jitter_and_cap() -> None:
    """Backoff doubles per attempt, jittered into the upper half, never past the cap."""
    rng = random.Random(7)
    delays = [backoff_delay(a, 1.0, 60.0, rng=rng) for a in range(10)]
    for attempt, d in enumerate(delays):
        assert min(60.0, 2**attempt) / 2 <= d <= min(60.0, 2**attempt)
    assert backoff_delay(0, 1.0, 60.0, retry_after=120.0) == 120.0


async def test_permanent_error_dead_letters_with_worklist(world: tuple[Engine, Outbox]) -> None:
    """A write that can never succeed is dead-lettered and a person is told what to do."""
    engine, outbox = world
    Scripted.script = [PermanentError("400 invalid event")]
    appt = book(engine)
    report = await outbox.drain()
    assert report.dead == 1
    assert [d.appointment_id for d in engine.store.dead_letters()] == [appt]
    work = engine.store.worklist()
    assert len(work) == 1 and work[0].kind == "dead_letter" and f"syncbridge retry cal {appt}" in work[0].instruction


async def test_repeated_unexpected_errors_end_in_dead_letter(world: tuple[Engine, Outbox]) -> None:
    """A write failing max_attempts times with an error nobody understands stops retrying and is reported."""
    engine, outbox = world
    Scripted.script = [RuntimeError("a bug in the connector")] * 3
    book(engine)
    for _ in range(3):
        engine.store.conn.execute("UPDATE outbox SET due_at = 0")
        await outbox.drain()
    assert len(engine.store.dead_letters()) == 1


async def test_auth_failure_marks_connector_unhealthy(world: tuple[Engine, Outbox]) -> None:
    """Refused credentials mark the connector unhealthy with the action to take."""
    engine, outbox = world
    Scripted.script = [AuthError("401 from server", action="renew the app password")]
    book(engine)
    await outbox.drain()
    state = engine.store.connector_state("cal")
    assert not state["healthy"] and "renew the app password" in state["note"]


async def test_applied_write_records_receipt(world: tuple[Engine, Outbox]) -> None:
    """A successful write records the new etag and when the version was applied."""
    engine, outbox = world
    appt = book(engine)
    await outbox.drain()
    (link, applied_at), = engine.store.links_for(appt)
    assert link.etag == "etag-1" and link.applied_version == 1 and applied_at
    assert engine.store.outbox_due(float("inf"), 10) == []
    kinds = [e["kind"] for e in engine.store.audit_entries(appointment_id=appt)]
    assert kinds == ["applied", "changed"]


async def test_an_edit_seen_while_writing_is_not_overwritten_by_the_write_answer(world: tuple[Engine, Outbox]) -> None:
    """Our move lands, the therapist moves the event again at once, and a pull sees that before our
    answer is recorded: the pull's later view must win, or the edit would be lost for good."""
    engine, outbox = world
    appt = book(engine, hour=10)
    await outbox.drain()  # the event exists: ext-<appt>, etag-1
    record = engine.store.appointment(appt)
    assert record is not None
    engine.change(appt, record.fields | {"start": iso(datetime(2027, 1, 5, 11, tzinfo=UTC)), "end": iso(datetime(2027, 1, 5, 11, 50, tzinfo=UTC))}, via="ehr")
    later = datetime.now(UTC) + timedelta(minutes=1)
    therapist = {"clinician": "dr_a", "status": "booked", "timezone": "America/New_York",
                 "start": iso(datetime(2027, 1, 5, 12, tzinfo=UTC)), "end": iso(datetime(2027, 1, 5, 12, 50, tzinfo=UTC))}

    original = Scripted.apply

    async def apply_then_edited(self: Scripted, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        result = await original(self, appointment_id, desired, link)
        # while our answer travels, the therapist's edit (etag-x) is pulled and merged
        engine.observe("cal", PullResult([Observation(f"ext-{appt}", "etag-x", appt, therapist, modified_at=iso(later))], cursor="c"))
        return result

    Scripted.apply = apply_then_edited  # type: ignore[method-assign]
    try:
        await outbox.drain()
    finally:
        Scripted.apply = original  # type: ignore[method-assign]
    link = engine.store.link("cal", appt)
    record = engine.store.appointment(appt)
    assert record is not None and link is not None
    assert record.fields["start"] == therapist["start"]  # the later edit won the merge
    assert link.etag == "etag-x" and link.base is not None and link.base["start"] == therapist["start"]


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    from syncbridge.errors import retry_after_seconds

    now = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds("Mon, 23 Nov 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Mon, 23 Nov 2026 11:59:00 GMT", now) == 0.0  # already past: go now
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


class Batched(Scripted):
    """A connector whose vendor takes batch requests: records each call's size; one write throttled."""

    write_batch = 5
    sizes: list[int] = []
    throttled: str | None = None

    async def apply_many(self, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        Batched.sizes.append(len(writes))
        return [RateLimited("429", retry_after=30) if w.appointment_id == Batched.throttled
                else ApplyResult(f"ext-{w.appointment_id}", "etag-b") for w in writes]


class Gated(Scripted):
    """Holds the write of one appointment (or of every one) until the test opens the gate."""

    gate: asyncio.Event
    held: str | None = None
    started: list[str] = []

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        Gated.started.append(appointment_id)
        if Gated.held in (None, appointment_id):
            await Gated.gate.wait()
        return ApplyResult(f"ext-{appointment_id}", "etag-g")


def _world_with(tmp_path: Path, kind: str, **outbox: Any) -> tuple[Engine, Outbox]:
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": f"tests.unit.test_outbox:{kind}"}},
        "outbox": {"backoff_base": 1.0, "backoff_max": 60.0, "max_attempts": 3} | outbox,
    }))
    from syncbridge.registry import build_connectors
    from syncbridge.store import Store

    engine = Engine(Store(cfg.store.path), build_connectors(cfg), cfg)
    return engine, Outbox(engine)


def _book_many(engine: Engine, n: int) -> list[str]:
    ids = []
    for i in range(n):
        start = datetime(2027, 1, 5, 8, tzinfo=UTC) + timedelta(days=i)
        ids.append(f"sb-{i:03d}")
        engine.change(ids[-1], empty_snapshot() | {"clinician": "dr_a", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                                                   "timezone": "America/New_York"}, via="test")
    return ids


async def _until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_slow_write_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """One write that hangs (a slow server answer) must not stop the rest of the queue from landing."""
    engine, outbox = _world_with(tmp_path, "Gated", batch=4, concurrency=2)
    Gated.gate, Gated.started = asyncio.Event(), []
    ids = _book_many(engine, 12)
    Gated.held = ids[0]
    drain = asyncio.create_task(outbox.drain())
    linked = lambda: sum(engine.store.link("cal", i) is not None for i in ids)  # noqa: E731
    await _until(lambda: linked() == 11)
    assert engine.store.link("cal", ids[0]) is None and not drain.done()
    Gated.gate.set()
    report = await drain
    assert report.applied == 12 and linked() == 12


async def test_batching_connector_gets_chunks_and_each_write_its_own_outcome(tmp_path: Path) -> None:
    """Writes go out in the connector's batch size; a throttled write in a batch waits alone."""
    engine, outbox = _world_with(tmp_path, "Batched", concurrency=2)
    Batched.sizes = []
    ids = _book_many(engine, 12)
    Batched.throttled = ids[3]
    before = time.time()
    report = await outbox.drain()
    assert sorted(Batched.sizes) == [2, 5, 5]
    assert report.applied == 11 and report.retried == 1
    assert all(engine.store.link("cal", i) is not None for i in ids if i != ids[3])
    assert engine.store.link("cal", ids[3]) is None
    (item,) = engine.store.outbox_due(float("inf"), 20)
    assert item.appointment_id == ids[3] and item.due_at >= before + 30 and item.attempts == 1


async def test_stopping_finishes_sent_writes_and_sends_no_more(tmp_path: Path) -> None:
    """On SIGTERM the daemon halts the outbox: writes already sent are recorded, the rest stay queued."""
    engine, outbox = _world_with(tmp_path, "Gated", concurrency=2)
    Gated.gate, Gated.started, Gated.held = asyncio.Event(), [], None
    ids = _book_many(engine, 10)
    drain = asyncio.create_task(outbox.drain())
    await _until(lambda: len(Gated.started) == 2)
    outbox.halt.set()
    Gated.gate.set()
    report = await drain
    assert report.applied == 2 and len(Gated.started) == 2
    assert {i for i in ids if engine.store.link("cal", i) is not None} == set(Gated.started)
    assert len(engine.store.outbox_due(float("inf"), 20)) == 8


async def test_an_edit_merged_while_writing_reaches_the_copy_even_if_it_matched_the_old_copy(world: tuple[Engine, Outbox]) -> None:
    """The record moves 10:00 -> 11:00 and, while that write travels, back to 10:00: the fan-out of
    the second edit sees the copy still at 10:00 and enqueues nothing. Once the 11:00 write lands,
    the copy must still be brought back to 10:00."""
    engine, outbox = world
    appt = book(engine, hour=10)
    await outbox.drain()
    record = engine.store.appointment(appt)
    assert record is not None
    at_ten = dict(record.fields)
    engine.change(appt, at_ten | {"start": iso(datetime(2027, 1, 5, 11, tzinfo=UTC)), "end": iso(datetime(2027, 1, 5, 11, 50, tzinfo=UTC))}, via="ehr")

    original = Scripted.apply

    async def apply_while_moved_back(self: Scripted, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        if desired["start"].startswith("2027-01-05T11"):
            engine.change(appt, at_ten, via="ehr")
        return await original(self, appointment_id, desired, link)

    Scripted.apply = apply_while_moved_back  # type: ignore[method-assign]
    try:
        await outbox.drain()
    finally:
        Scripted.apply = original  # type: ignore[method-assign]
    assert Scripted.calls[-1]["start"] == at_ten["start"], "the copy was left at 11:00 while the record says 10:00"
    assert engine.store.outbox_due(float("inf"), 10) == []
