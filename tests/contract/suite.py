"""The contract every connector passes against its emulator or a real server.

A connector's test module subclasses :class:`ConnectorContract` and provides one fixture,
``harness``, yielding a :class:`Harness`: the connector's config section, the clinician's account
in it, and a :class:`Vendor` that acts on the external system the way a person would (moving an
event in their calendar, deleting it, retyping its title). Scenarios skip by capability, never by
connector name.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from syncbridge.config import parse_config
from syncbridge.connector import Connector, Host, Write
from syncbridge.engine import Engine
from syncbridge.errors import ConflictError, TransientError
from syncbridge.model import Role, empty_snapshot, iso, new_canonical_id
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.runtime import Daemon
from syncbridge.store import Store

CLINICIAN = "dr_rivera"
ZONE = "America/New_York"
#: seconds a throttled read is asked to wait (Retry-After) in the read-retry scenario
READ_RETRY_AFTER = 2.0


class Vendor(abc.ABC):
    """The external system as its users see it. External ids are the connector's own."""

    #: the system can be told to throttle (an emulator); real servers cannot
    can_throttle: bool = False

    @abc.abstractmethod
    async def live(self) -> list[dict[str, Any]]:
        """Appointment copies that look like live sessions: dicts with external_id, start, end (aware)."""

    @abc.abstractmethod
    async def move(self, external_id: str, start: datetime, end: datetime) -> None: ...

    @abc.abstractmethod
    async def delete(self, external_id: str) -> None: ...

    @abc.abstractmethod
    async def retitle(self, external_id: str, title: str) -> None: ...

    @abc.abstractmethod
    async def invalidate_cursor(self) -> None:
        """Make the connector's stored cursor unacceptable to the system (expired token)."""

    async def throttle(self, requests: int, retry_after: float | None = 0.1) -> None:
        """The next ``requests`` API calls answer 429 (or the vendor's own throttling), with
        Retry-After ``retry_after`` where the vendor sends one."""
        raise NotImplementedError

    async def add_private_event(self, start: datetime, end: datetime, title: str) -> None:
        raise NotImplementedError

    async def book(self, start: datetime, end: datetime, client_key: str) -> str:
        """For record and channel systems: a booking made there; returns its external id."""
        raise NotImplementedError


@dataclass
class Harness:
    connector_config: dict[str, Any]
    account: dict[str, Any]
    vendor: Vendor
    name: str = "under_test"


@dataclass
class World:
    """The store, engine and outbox around one connector under test."""

    store: Store
    engine: Engine
    outbox: Outbox
    connector: Connector
    vendor: Vendor
    created: list[str] = field(default_factory=list)

    async def sync(self, full: bool = False):
        return await self.engine.sync(self.connector.name, full=full)

    async def drain(self):
        return await self.outbox.drain()

    def book_here(self, start: datetime, minutes: int = 50, **extra: Any) -> str:
        """A session booked in the canonical record (as if from the EHR), to be mirrored."""
        snap = empty_snapshot() | {
            "clinician": CLINICIAN,
            "client_key": "client-" + new_canonical_id()[-6:],
            "start": iso(start),
            "end": iso(start + timedelta(minutes=minutes)),
            "timezone": ZONE,
            "service_code": "90837",
            "location": "Room 2",
        } | extra
        appt_id = new_canonical_id()
        self.engine.change(appt_id, snap, via="test-record")
        self.created.append(appt_id)
        return appt_id

    def cancel_here(self, appt_id: str) -> None:
        appt = self.store.appointment(appt_id)
        assert appt is not None
        snap = dict(appt.fields) | {
            "status": "cancelled",
            "cancellation": {"by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)), "via": "test-record"},
        }
        self.engine.change(appt_id, snap, via="test-record")

    def move_here(self, appt_id: str, start: datetime, minutes: int = 50) -> None:
        appt = self.store.appointment(appt_id)
        assert appt is not None
        self.engine.change(appt_id, dict(appt.fields) | {"start": iso(start), "end": iso(start + timedelta(minutes=minutes))}, via="test-record")

    def external_id(self, appt_id: str) -> str:
        link = self.store.link(self.connector.name, appt_id)
        assert link is not None and link.external_id, f"{appt_id} has no link in {self.connector.name}"
        return link.external_id


def practice_config(harness: Harness, tmp_path: Path, **connector: Any) -> dict[str, Any]:
    """The practice around the connector under test, as a config file holds it (``connector``
    keys override the harness's)."""
    return {
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "contract.db")},
        "clinicians": {CLINICIAN: {"accounts": {harness.name: harness.account}}},
        "connectors": {harness.name: harness.connector_config | connector},
        "outbox": {"backoff_base": 0.05, "backoff_max": 0.2, "max_attempts": 6},
        "http": {"enabled": False},
    }


@asynccontextmanager
async def world_for(harness: Harness, tmp_path: Path, host: Host | None = None) -> AsyncIterator[World]:
    """Store, engine and outbox around the connector under test, as ``syncbridge run`` builds them."""
    import yaml

    cfg = parse_config(yaml.safe_dump(practice_config(harness, tmp_path)))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    if host is not None:
        connectors[harness.name].host = host
    engine = Engine(store, connectors, cfg)
    try:
        yield World(store, engine, Outbox(engine), connectors[harness.name], harness.vendor)
    finally:
        for c in connectors.values():
            await c.close()
        store.close()


@asynccontextmanager
async def daemon_for(harness: Harness, tmp_path: Path, **connector: Any) -> AsyncIterator[Daemon]:
    """The daemon on the world's store (not started: the test drives its polls), closed after."""
    import yaml

    daemon = Daemon(None, parse_config(yaml.safe_dump(practice_config(harness, tmp_path, **connector))))
    try:
        yield daemon
    finally:
        await daemon.close()


def next_weekday_at(hour: int, days_ahead: int = 7) -> datetime:
    from zoneinfo import ZoneInfo

    day = datetime.now(ZoneInfo(ZONE)).date() + timedelta(days=days_ahead)
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return datetime(day.year, day.month, day.day, hour, tzinfo=ZoneInfo(ZONE))


class ConnectorContract:
    """Scenarios from DESIGN section 11, run against one connector. Subclasses give ``harness``."""

    @pytest.fixture
    async def world(self, harness: Harness, tmp_path: Path) -> AsyncIterator[World]:
        async with world_for(harness, tmp_path) as world:
            yield world

    @staticmethod
    def mirrors(world: World) -> bool:
        return world.connector.capabilities.accepts_new and not world.connector.capabilities.read_only

    async def _booked(self, world: World, hour: int = 10) -> tuple[str, str]:
        if not self.mirrors(world):
            pytest.skip("connector does not hold appointments made elsewhere")
        appt_id = world.book_here(next_weekday_at(hour))
        await world.drain()
        return appt_id, world.external_id(appt_id)

    # --- scenarios ------------------------------------------------------------------------

    async def test_booking_appears_once(self, world: World) -> None:
        """A session booked in the record shows up exactly once in the system."""
        appt_id, ext = await self._booked(world)
        live = await world.vendor.live()
        assert [e["external_id"] for e in live] == [ext]
        assert live[0]["start"] == world.store.appointment(appt_id).start

    async def test_retried_create_never_duplicates(self, world: World) -> None:
        """A create whose answer was lost and is sent again makes no second copy."""
        appt_id, _ = await self._booked(world)
        desired = world.connector.capabilities.project(world.store.appointment(appt_id).fields)
        await world.connector.apply(appt_id, desired, None)
        assert len(await world.vendor.live()) == 1

    async def test_own_writes_are_not_echoed(self, world: World) -> None:
        """Pulling our own write back changes nothing and writes nothing."""
        appt_id, _ = await self._booked(world)
        version = world.store.appointment(appt_id).version
        await world.sync(full=True)
        await world.sync()
        assert world.store.appointment(appt_id).version == version
        assert world.store.outbox_due(float("inf"), 10) == []

    async def test_every_projected_field_is_observed(self, world: World) -> None:
        """Observations report every field the connector declares, so comparisons are exact."""
        appt_id, ext = await self._booked(world)
        obs = await world.connector.read(ext)
        assert not obs.deleted
        assert set(world.connector.capabilities.fields) <= set(obs.fields)
        assert obs.canonical_id == appt_id

    async def test_move_in_system_moves_session(self, world: World) -> None:
        """A session moved in the calendar is moved in the canonical record."""
        appt_id, ext = await self._booked(world)
        await world.sync()  # a cursor exists, so the move arrives through an incremental pull
        new_start = next_weekday_at(14)
        await world.vendor.move(ext, new_start, new_start + timedelta(minutes=50))
        await world.sync()
        appt = world.store.appointment(appt_id)
        assert appt.start == new_start
        assert appt.end == new_start + timedelta(minutes=50)

    async def test_move_in_record_moves_copy(self, world: World) -> None:
        """A session moved in the record is moved in the system."""
        appt_id, _ = await self._booked(world)
        new_start = next_weekday_at(15)
        world.move_here(appt_id, new_start)
        await world.drain()
        live = await world.vendor.live()
        assert len(live) == 1 and live[0]["start"] == new_start

    async def test_delete_in_system_cancels(self, world: World) -> None:
        """Deleting the event cancels the session, attributed to this connector."""
        appt_id, ext = await self._booked(world)
        await world.sync()  # a cursor exists, so the delete arrives through an incremental pull
        await world.vendor.delete(ext)
        await world.sync()
        appt = world.store.appointment(appt_id)
        assert appt.cancelled
        assert appt.fields["cancellation"]["via"] == world.connector.name

    async def test_noshow_tag_marks_noshow(self, world: World) -> None:
        """Retitling the event with #noshow records a no-show and takes the event off the calendar."""
        appt_id, ext = await self._booked(world)
        await world.vendor.retitle(ext, "Client session #noshow")
        await world.sync()
        appt = world.store.appointment(appt_id)
        assert appt.fields["status"] == "noshow"
        assert appt.fields["cancellation"]["kind"] == "no_show"
        await world.drain()
        assert await world.vendor.live() == []

    async def test_cancel_in_record_removes_copy(self, world: World) -> None:
        """A cancellation made elsewhere leaves no live-looking event behind."""
        appt_id, _ = await self._booked(world)
        world.cancel_here(appt_id)
        await world.drain()
        assert await world.vendor.live() == []
        await world.sync()
        assert world.store.appointment(appt_id).cancelled

    async def test_cancel_one_occurrence(self, world: World) -> None:
        """Cancelling one session of a weekly series leaves the other sessions in place."""
        if not self.mirrors(world):
            pytest.skip("connector does not hold appointments made elsewhere")
        series = "series-" + new_canonical_id()[-8:]
        first = next_weekday_at(9)
        ids = [world.book_here(first + timedelta(weeks=i), series_id=series) for i in range(4)]
        await world.drain()
        world.cancel_here(ids[1])
        await world.drain()
        starts = sorted(e["start"] for e in await world.vendor.live())
        assert starts == [first + timedelta(weeks=i) for i in (0, 2, 3)]

    async def test_expired_cursor_resyncs_without_duplicates(self, world: World) -> None:
        """An expired sync token leads to a full resync: nothing duplicated, nothing cancelled."""
        ids = [(await self._booked(world, hour))[0] for hour in (9, 11)]
        await world.sync()
        versions = {i: world.store.appointment(i).version for i in ids}
        await world.vendor.invalidate_cursor()
        await world.sync()
        await world.drain()
        assert len(await world.vendor.live()) == 2
        assert {i: world.store.appointment(i).version for i in ids} == versions
        assert all(not world.store.appointment(i).cancelled for i in ids)

    async def test_precondition_failure_remerges(self, world: World) -> None:
        """A write against a copy a person just changed re-reads and merges, never overwrites blindly."""
        appt_id, ext = await self._booked(world)
        user_start = next_weekday_at(16)
        await world.vendor.move(ext, user_start, user_start + timedelta(minutes=50))
        # the record changes something else meanwhile; the write must not undo the user's move
        appt = world.store.appointment(appt_id)
        world.engine.change(appt_id, dict(appt.fields) | {"location": "Room 9"}, via="test-record")
        await world.drain()
        await world.sync()
        await world.drain()
        appt = world.store.appointment(appt_id)
        assert appt.start == user_start, "the calendar user's move was overwritten"
        live = await world.vendor.live()
        assert len(live) == 1 and live[0]["start"] == user_start

    async def test_throttling_backs_off_then_applies(self, world: World) -> None:
        """A throttled write is retried after the vendor's Retry-After and then lands."""
        if not world.vendor.can_throttle:
            pytest.skip("system cannot be told to throttle")
        if not self.mirrors(world):
            pytest.skip("connector does not hold appointments made elsewhere")
        await world.vendor.throttle(2)
        appt_id = world.book_here(next_weekday_at(10))
        await world.drain()
        for _ in range(20):
            if world.store.link(world.connector.name, appt_id):
                break
            import asyncio

            await asyncio.sleep(0.3)
            await world.drain()
        assert world.store.link(world.connector.name, appt_id) is not None
        assert len(await world.vendor.live()) == 1
        assert world.store.dead_letters() == []

    async def test_a_throttled_pull_is_read_again_after_retry_after(self, world: World, harness: Harness, tmp_path: Path) -> None:
        """A pull answered 429 with Retry-After 2: the daemon reads the system again 2 s later, not
        sooner (a poll asked for meanwhile waits too) and not at the next poll five minutes on, and
        the change made there meanwhile arrives then (DESIGN section 9)."""
        if not world.vendor.can_throttle:
            pytest.skip("system cannot be told to throttle")
        arrived = await self._change_waiting_there(world)
        async with daemon_for(harness, tmp_path, poll_interval=300) as daemon:
            await world.vendor.throttle(1, retry_after=READ_RETRY_AFTER)
            started = time.monotonic()
            await daemon.poll(harness.name)
            assert not arrived(), "the throttled pull was not refused"
            await asyncio.sleep(0.5)
            await daemon.poll(harness.name)  # a push hint or the timer meanwhile: it waits as well
            assert not arrived(), "read again before the Retry-After was over"
            while not arrived():
                assert time.monotonic() - started < READ_RETRY_AFTER + 5, "not read again after the Retry-After"
                await asyncio.sleep(0.05)
            assert time.monotonic() - started >= READ_RETRY_AFTER
        assert world.store.connector_state(harness.name)["healthy"]

    async def _change_waiting_there(self, world: World) -> Callable[[], bool]:
        """A change made in the system after its last read; returns whether it has arrived."""
        name = world.connector.name
        if self.mirrors(world):
            appt_id, ext = await self._booked(world)
            await world.sync(full=True)
            await world.vendor.delete(ext)
            return lambda: world.store.appointment(appt_id).cancelled
        if world.connector.capabilities.role == Role.MIRROR:
            pytest.skip("no change can be made in this system")
        await world.sync(full=True)
        start = next_weekday_at(13)
        ext = await world.vendor.book(start, start + timedelta(minutes=50), "client-xyz")
        return lambda: world.store.link_by_external(name, ext) is not None

    async def test_batched_writes_land_each_once_with_their_own_outcome(self, world: World) -> None:
        """Writes sent together (as an initial sync does) each land once; a stale one fails alone."""
        if not self.mirrors(world):
            pytest.skip("connector does not hold appointments made elsewhere")
        size = min(max(world.connector.write_batch, 2) * 2 + 1, 25)
        first = next_weekday_at(8, days_ahead=14)
        ids = [world.book_here(first + timedelta(days=7 * (i // 5) + i % 5)) for i in range(size)]
        await world.drain()
        live = await world.vendor.live()
        assert len(live) == size and len({e["external_id"] for e in live}) == size
        moved, cancelled, retried, stale = ids[:4]
        # a person moves one copy, so the record's write to it carries an outdated precondition
        user_start = next_weekday_at(16, days_ahead=21)
        await world.vendor.move(world.external_id(stale), user_start, user_start + timedelta(minutes=50))
        new_start = next_weekday_at(18, days_ahead=21)
        world.move_here(moved, new_start)
        world.cancel_here(cancelled)
        writes = []
        for appt_id in (moved, cancelled, retried, stale):
            desired = world.connector.capabilities.project(world.store.appointment(appt_id).fields)
            if appt_id == stale:
                desired = desired | {"location": "Room 9"}
            link = None if appt_id == retried else world.store.link(world.connector.name, appt_id)
            writes.append(Write(appt_id, desired, link))
        results = await world.connector.apply_many(writes)
        assert len(results) == 4
        for i, r in enumerate(results):
            if isinstance(r, TransientError):  # a busy server (a locked collection): retried alone, as the outbox does
                w = writes[i]
                results[i] = (await world.connector.apply_many([w]))[0]
        assert [isinstance(r, ConflictError) for r in results] == [False, False, False, True], results
        assert not any(isinstance(r, BaseException) for r in results[:3]), results
        starts = sorted(e["start"] for e in await world.vendor.live())
        assert len(starts) == size - 1, "the cancelled copy is still live, or a retried create duplicated"
        assert new_start in starts and user_start in starts

    async def test_private_events_count_as_busy_only(self, world: World) -> None:
        """Other events in the calendar are busy time; they never become sessions and their text is never stored."""
        if not world.connector.capabilities.busy_time:
            pytest.skip("connector reports no busy time")
        start = next_weekday_at(12)
        await world.vendor.add_private_event(start, start + timedelta(hours=1), "Dentist - Dr. Molar")
        await world.sync(full=True)
        assert world.store.appointments() == []
        busy = await world.connector.busy(start - timedelta(days=1), start + timedelta(days=1))
        assert [(b.start, b.end) for b in busy] == [(start, start + timedelta(hours=1))]
        raw = Path(world.store.path).read_bytes()
        assert b"Molar" not in raw

    async def test_record_booking_creates_appointment(self, world: World) -> None:
        """A booking made in a record or channel system becomes one canonical appointment."""
        if world.connector.capabilities.role == Role.MIRROR:
            pytest.skip("calendars do not book sessions")
        start = next_weekday_at(13)
        ext = await world.vendor.book(start, start + timedelta(minutes=50), "client-xyz")
        await world.sync()
        await world.sync(full=True)
        appts = world.store.appointments()
        assert len(appts) == 1 and appts[0].start == start
        assert world.store.link(world.connector.name, appts[0].id).external_id == ext

    async def _booked_there(self, world: World) -> tuple[str, str]:
        if world.connector.capabilities.role == Role.MIRROR:
            pytest.skip("calendars do not book sessions")
        start = next_weekday_at(15)
        ext = await world.vendor.book(start, start + timedelta(minutes=50), "client-abc")
        await world.sync()
        appt_id = world.store.link_by_external(world.connector.name, ext).appointment_id
        await world.sync()  # the next change arrives through an incremental pull
        return appt_id, ext

    async def test_move_in_record_system_flows_in(self, world: World) -> None:
        """A session moved in the EHR or the directory moves the canonical record."""
        appt_id, ext = await self._booked_there(world)
        new_start = next_weekday_at(17)
        await world.vendor.move(ext, new_start, new_start + timedelta(minutes=50))
        await world.sync()
        assert world.store.appointment(appt_id).start == new_start

    async def test_cancel_in_record_system_flows_in(self, world: World) -> None:
        """A session cancelled (or removed) in the EHR or the directory is cancelled in the canonical record."""
        appt_id, ext = await self._booked_there(world)
        await world.vendor.delete(ext)
        await world.sync()
        assert world.store.appointment(appt_id).cancelled

    async def test_read_only_system_gets_one_instruction(self, world: World) -> None:
        """A system syncbridge cannot write gets one worklist item per change, never a write attempt."""
        if not world.connector.capabilities.read_only:
            pytest.skip("connector can be written")
        appt_id, _ = await self._booked_there(world)
        world.cancel_here(appt_id)
        await world.drain()
        await world.sync()
        items = [w for w in world.store.worklist() if w.appointment_id == appt_id]
        assert len(items) == 1 and items[0].connector == world.connector.name
        assert world.store.outbox_due(float("inf"), 10) == [] and world.store.dead_letters() == []
