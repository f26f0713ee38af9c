"""Publishing availability: a wanted slot set per date, written by the rules of every other write.

Only dates whose slots changed are written; a failure is retried with backoff (never sooner than
Retry-After) however long the directory stays unreachable, never dead-lettered; a permanent
refusal dead-letters that date alone with a worklist item; a write whose answer was lost is
looked at before the date is trusted again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from syncbridge.config import parse_config
from syncbridge.connector import ApplyResult, BusyInterval, Capabilities, Connector, Link, Observation, PullResult, Slot
from syncbridge.engine import Engine
from syncbridge.errors import PermanentError, RateLimited, TransientError
from syncbridge.model import Role, Snapshot, empty_snapshot, iso, new_canonical_id
from syncbridge.publisher import Publisher
from syncbridge.slot_writer import SlotWriter
from syncbridge.store import Store

NOW = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)  # a Monday


class Directory(Connector):
    """A directory holding slot sets per (clinician, date); fails on demand, can lose answers."""

    capabilities = Capabilities(role=Role.CHANNEL, fields=frozenset(), accepts_new=False, publishes_availability=True,
                                reads_availability=True)
    shown: dict[tuple[str, date], list[datetime]] = {}
    calls: list[tuple[str, str, date, int]] = []
    #: errors the next requests raise, in order; an error with ``landed`` set takes effect first
    script: list[BaseException] = []

    async def pull(self, cursor: str | None) -> PullResult:
        return PullResult([], None, complete=True)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        raise AssertionError("a directory holds only its own bookings")

    def _fail(self, landed: Any = None) -> None:
        if Directory.script:
            err = Directory.script.pop(0)
            if getattr(err, "landed", False) and landed is not None:
                landed()
            raise err

    async def publish(self, clinician: str, day: date, slots: Sequence[Slot]) -> None:
        Directory.calls.append(("put", clinician, day, len(slots)))
        self._fail(lambda: Directory.shown.__setitem__((clinician, day), [s.start for s in slots]))
        Directory.shown[(clinician, day)] = [s.start for s in slots]

    async def published(self, clinician: str, day: date) -> list[Slot]:
        Directory.calls.append(("get", clinician, day, 0))
        self._fail()
        return [Slot(s, s + timedelta(minutes=50)) for s in Directory.shown.get((clinician, day), [])]


class Calendar(Directory):
    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset(), busy_time=True)
    busy_spans: list[BusyInterval] = []

    async def busy(self, start: datetime, end: datetime) -> list[BusyInterval]:
        return list(Calendar.busy_spans)


CLINICIANS = 30


class World:
    def __init__(self, engine: Engine, publisher: Publisher, writer: SlotWriter) -> None:
        self.engine, self.publisher, self.writer, self.store = engine, publisher, writer, engine.store

    async def converge(self) -> None:
        """What the daemon's availability loop does after a change: plan, then write what is due now."""
        self.publisher.plan()
        while self.store.slot_due(time.time(), 1) and self.writer.backoff.wait("directory") == 0:
            await self.writer.drain()

    def puts(self) -> list[tuple[str, date]]:
        return [(c, d) for kind, c, d, _ in Directory.calls if kind == "put"]


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    Directory.calls, Directory.script, Directory.shown, Calendar.busy_spans = [], [], {}, []
    clinicians = "".join(
        f"  c{i}:\n    accounts:\n      directory: {{provider_id: p{i}, location_id: l1}}\n      calendar: {{calendar: c{i}}}\n"
        for i in range(CLINICIANS)
    )
    cfg = parse_config(
        f"store: {{path: {tmp_path / 's.db'}}}\nclinicians:\n{clinicians}"
        "connectors:\n"
        f"  directory: {{type: '{__name__}:Directory'}}\n"
        f"  calendar: {{type: '{__name__}:Calendar'}}\n"
        "availability:\n  horizon_days: 21\n  minimum_notice_hours: 0\n"
        "outbox: {backoff_base: 0.05, backoff_max: 0.4, max_attempts: 3}\n"
    )
    store = Store(cfg.store.path)
    from syncbridge.registry import build_connectors

    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg, clock=lambda: NOW)
    writer = SlotWriter(store, connectors, cfg)
    yield World(engine, Publisher(store, connectors, cfg, clock=lambda: NOW), writer)
    store.close()


def book(engine: Engine, clinician: str, start: datetime) -> str:
    appt = new_canonical_id()
    snap = empty_snapshot() | {
        "clinician": clinician, "client_key": "k", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
        "timezone": "America/New_York", "service_code": "90834",
    }
    engine.change(appt, snap, via="ehr")
    return appt


def cancel(engine: Engine, appt: str) -> None:
    cancellation = {"by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(NOW), "via": "calendar"}
    snap = engine.store.appointment(appt).fields | {"status": "cancelled", "cancellation": cancellation}
    engine.change(appt, snap, via="calendar")


def changed(world: World, *appts: str) -> None:
    """What the runtime hands the planner after a merged batch."""
    from syncbridge.engine import ObserveReport

    world.publisher.note("calendar", ObserveReport(changed_ids=list(appts)))


async def settle(world: World, seconds: float = 5.0) -> None:
    """Drain until nothing is due (waiting out backoffs), as the daemon's loop does."""
    import asyncio

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await world.writer.drain()
        due = world.writer.next_due()
        if due is None:
            return
        await asyncio.sleep(max(0.0, min(due - time.time(), 0.5)))
    raise AssertionError("dates still due")


TUESDAY_10 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)  # 10:00 in New York


async def test_one_cancellation_republishes_one_date(world: World) -> None:
    """After the start-up look at every date, a cancellation costs one PUT, for its date; nothing changed, nothing sent."""
    appt = book(world.engine, "c7", TUESDAY_10)
    await world.converge()
    # the directory showed nothing: every working day written once, weekends (no slots) only read
    assert len(world.puts()) == CLINICIANS * 15 and {d.weekday() for _, d in world.puts()} == {0, 1, 2, 3, 4}
    Directory.calls.clear()
    await world.converge()
    assert Directory.calls == []

    cancel(world.engine, appt)
    changed(world, appt)
    await world.converge()
    assert Directory.calls == [("put", "c7", date(2026, 12, 1), 29)]  # the whole day is open again (09:00..16:00 every 15 min)


async def test_restart_looks_before_writing(world: World) -> None:
    """A restarted daemon reads every date back and writes only those that differ from what the directory shows."""
    await world.converge()
    wrong = ("c3", date(2026, 12, 2))
    Directory.shown[wrong] = Directory.shown[wrong][1:]  # someone edited the directory while we were down
    Directory.calls.clear()
    fresh = Publisher(world.store, world.publisher.connectors, world.publisher.config, clock=lambda: NOW)
    world.publisher = fresh
    await world.converge()
    assert sum(1 for k, *_ in Directory.calls if k == "get") == CLINICIANS * 21
    assert world.puts() == [wrong]


async def test_busy_time_from_a_calendar_closes_slots(world: World) -> None:
    await world.converge()
    Directory.calls.clear()
    Calendar.busy_spans = [BusyInterval("c3", datetime(2026, 12, 2, 14, 0, tzinfo=UTC), datetime(2026, 12, 2, 16, 0, tzinfo=UTC))]
    await world.publisher.refresh_busy()
    await world.converge()
    assert world.puts() == [("c3", date(2026, 12, 2))]
    assert Directory.calls[0][3] < 29


async def test_unreachable_directory_is_waited_for_never_dead_lettered(world: World) -> None:
    """Twenty transient failures in a row (more than max_attempts) end in the write landing, not in a dead letter."""
    world.publisher.plan()
    Directory.script = [TransientError("503") for _ in range(20)]
    started = time.monotonic()
    while Directory.script and time.monotonic() - started < 30:
        await settle(world, 30)
    await settle(world)
    assert world.store.slot_counts()["directory"][1:] == (0, 0)  # nothing waiting, nothing dead
    assert len(Directory.shown) == CLINICIANS * 15  # every working day landed
    assert not [w for w in world.store.worklist() if w.kind == "dead_letter"]


async def test_retry_after_is_honoured_and_one_date_probes(world: World) -> None:
    """A 429 with Retry-After holds every date back that long; then one date probes before the rest go."""
    world.publisher.plan()
    Directory.script = [RateLimited("slow down", retry_after=1.0)]
    await world.writer.drain()
    sent = len(Directory.calls)
    assert sent <= 8  # the calls already in flight when the 429 came; no new ones
    await world.writer.drain()
    assert len(Directory.calls) == sent  # still inside Retry-After
    assert world.writer.next_due() >= time.time() + 0.8
    time.sleep(1.0)
    Directory.script = [RateLimited("still slow", retry_after=0.2)]
    await world.writer.drain()
    assert len(Directory.calls) == sent + 1  # the probe alone, refused again
    await settle(world)
    assert world.store.slot_counts()["directory"][1] == 0


async def test_refused_date_is_dead_lettered_alone_with_a_worklist_item(world: World) -> None:
    """A permanent refusal dead-letters that date alone (a worklist item names clinician and date); a reload retries it."""
    world.publisher.plan()
    Directory.script = [PermanentError("unknown location l1")]
    await settle(world)
    [dead] = [s for s in world.store.slot_states() if s.dead]
    [item] = [w for w in world.store.worklist() if w.kind == "dead_letter"]
    assert dead.clinician in item.instruction and dead.day in item.instruction and "unknown location" in item.instruction
    assert len(Directory.shown) == CLINICIANS * 15 - 1
    world.publisher.note_everything(look=True)  # what a reload does
    await world.converge()
    await settle(world)
    assert len(Directory.shown) == CLINICIANS * 15
    assert [w for w in world.store.worklist() if w.kind == "dead_letter"] == []


async def test_lost_answer_is_looked_at_when_the_slots_return(world: World) -> None:
    """A PUT that landed but whose answer was lost, followed by the slots returning to what was written
    before: the date is read back and rewritten, not assumed unchanged."""
    await world.converge()
    appt = book(world.engine, "c1", TUESDAY_10)
    changed(world, appt)
    err = TransientError("504 upstream answer lost")
    err.landed = True  # type: ignore[attr-defined]
    Directory.script = [err]
    await world.converge()  # the booking's PUT took effect, its answer was lost
    assert TUESDAY_10 not in Directory.shown[("c1", date(2026, 12, 1))]
    cancel(world.engine, appt)  # the wanted slots are those last known written again
    changed(world, appt)
    world.publisher.plan()
    await settle(world)
    assert TUESDAY_10 in Directory.shown[("c1", date(2026, 12, 1))]


async def test_directory_booking_overlapping_a_session_is_raised_with_both(world: World) -> None:
    """A directory booking that overlaps a session is kept and raised naming both sessions; moving one apart closes the item."""
    from syncbridge.connector import Link

    session = book(world.engine, "c2", TUESDAY_10)
    raced = book(world.engine, "c2", TUESDAY_10 + timedelta(minutes=30))
    with world.store.tx() as tx:  # the second came through the directory
        tx.put_link(Link("directory", raced, "zd-1", "e1", None, 1))
    changed(world, session, raced)
    world.publisher.plan()
    [item] = world.store.worklist()
    assert item.kind == "double_booking" and session in item.instruction and raced in item.instruction
    assert [world.store.appointment(a).fields["status"] for a in (session, raced)] == ["booked", "booked"]
    moved = world.store.appointment(raced).fields | {"start": iso(TUESDAY_10 + timedelta(hours=2)),
                                                      "end": iso(TUESDAY_10 + timedelta(hours=2, minutes=50))}
    world.engine.change(raced, moved, via="directory")
    changed(world, raced)
    world.publisher.plan()
    assert world.store.worklist() == []


async def test_sessions_the_practice_put_side_by_side_are_not_raised(world: World) -> None:
    """Two overlapping sessions booked in the record (a group, co-therapy) are the practice's own doing: no item."""
    a, b = book(world.engine, "c2", TUESDAY_10), book(world.engine, "c2", TUESDAY_10)
    changed(world, a, b)
    world.publisher.plan()
    assert world.store.worklist() == []


async def test_a_read_answering_lets_one_date_probe_unless_retry_after_says_wait(world: World) -> None:
    """While slot writes back off after a 500, the directory answering a read sends one date at once;
    after a 429 with Retry-After, a read answering changes nothing until the time has passed."""
    await world.converge()
    appt = book(world.engine, "c4", TUESDAY_10)
    changed(world, appt)
    world.publisher.plan()
    from syncbridge.retry import Backoff

    world.writer.backoff = Backoff(base=5.0, cap=60.0)  # the shipped scale: a failure holds the directory back for seconds
    Directory.script = [TransientError("500")]
    await world.writer.drain()
    assert world.writer.backoff.wait("directory") > 1 and world.store.slot_counts()["directory"][1] == 1
    Directory.script = []
    assert world.writer.answered("directory")  # a pull or a webhook re-read went through
    await world.writer.drain()
    assert world.store.slot_counts()["directory"][1] == 0 and TUESDAY_10 not in Directory.shown[("c4", date(2026, 12, 1))]

    cancel(world.engine, appt)
    changed(world, appt)
    world.publisher.plan()
    Directory.script = [RateLimited("slow down", retry_after=30)]
    await world.writer.drain()
    assert not world.writer.answered("directory")
    await world.writer.drain()
    assert world.store.slot_counts()["directory"][1] == 1  # still waiting out the 30 s


async def test_a_directory_failing_now_and_then_is_retried_within_seconds(world: World) -> None:
    """After slot requests succeeded within the last minute, failures in a row never hold the directory back
    more than 2 s; a directory that has not answered for longer backs off further, up to outbox.backoff_max."""
    from syncbridge.retry import Backoff

    await world.converge()
    world.writer.backoff = Backoff(base=1.0, cap=300.0)  # the shipped settings
    appt = book(world.engine, "c5", TUESDAY_10)
    changed(world, appt)
    world.publisher.plan()
    waits = []
    for _ in range(6):
        Directory.script = [TransientError("500")]
        world.writer.backoff.not_before.clear()  # the last wait is over
        world.store.conn.execute("UPDATE slot_states SET due_at = 0 WHERE due_at IS NOT NULL")
        await world.writer.drain()
        waits.append(world.writer.backoff.wait("directory"))
    assert 0 < max(waits) <= 2.0
    world.writer._answered_at.clear()  # a minute without an answer: down, not flaky
    for _ in range(4):
        Directory.script = [TransientError("500")]
        world.writer.backoff.not_before.clear()
        world.store.conn.execute("UPDATE slot_states SET due_at = 0 WHERE due_at IS NOT NULL")
        await world.writer.drain()
    assert world.writer.backoff.wait("directory") > 2.0


async def test_failing_slot_writes_show_the_directory_unhealthy_until_one_lands(world: World) -> None:
    """Slot writes failing in a row count towards the directory's outage (status, /readyz) like other writes; a landing one ends it."""
    await world.converge()
    appt = book(world.engine, "c6", TUESDAY_10)
    changed(world, appt)
    world.publisher.plan()
    for _ in range(3):
        Directory.script = [TransientError("503 from the directory")]
        world.writer.backoff.not_before.clear()
        world.store.conn.execute("UPDATE slot_states SET due_at = 0 WHERE due_at IS NOT NULL")
        await world.writer.drain()
    state = world.store.connector_state("directory")
    assert not state["healthy"] and "503 from the directory" in state["note"]
    await settle(world)
    assert world.store.connector_state("directory")["healthy"] and world.store.outage("directory") is None
