"""Engine behaviours a practice would notice: the mass-cancel guard, conflicts in the audit, echoes.

Each runs on both store engines (``stores``, tests/conftest.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import Observation
from syncbridge.engine import Engine
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from tests.support.practice import replica_practice
from tests.support.replica import ReplicaVendor

START = datetime(2027, 4, 5, 14, tzinfo=UTC)


@pytest.fixture
def practice(tmp_path: Path, stores):  # type: ignore[no-untyped-def]
    cfg = parse_config(yaml.safe_dump(replica_practice(tmp_path, ("cal",), policy={"mass_cancel_guard": {"max_share": 0.3, "min_count": 5}})))
    engine = Engine(stores(cfg.store.path), build_connectors(cfg), cfg)
    ehr, cal = ReplicaVendor(str(tmp_path / "ehr.db")), ReplicaVendor(str(tmp_path / "cal.db"))
    for i in range(20):
        asyncio.run(ehr.book(START + timedelta(hours=i), START + timedelta(hours=i, minutes=50), f"c{i}", clinician="dr_a"))
    asyncio.run(engine.sync("ehr"))
    asyncio.run(Outbox(engine).drain())
    asyncio.run(engine.sync("cal"))
    return engine, ehr, cal


def test_calendar_emptied_at_once_is_held(practice) -> None:  # type: ignore[no-untyped-def]
    """A calendar that suddenly shows none of its sessions cancels nothing and asks a person."""
    engine, _, cal = practice
    for item in cal.all_items():
        asyncio.run(cal.delete(item["ext_id"]))
    report = asyncio.run(engine.sync("cal"))
    assert report.held
    assert not any(a.cancelled for a in engine.store.appointments())
    state = engine.store.connector_state("cal")
    assert not state["healthy"] and "20 of 20" in state["note"]
    (item,) = engine.store.worklist()
    assert item.kind == "mass_cancel_guard"
    # the cursor did not move: once a person confirms, the same changes are applied
    engine.store.conn.execute("UPDATE held_batches SET approved = 1")
    report = asyncio.run(engine.sync("cal"))
    assert not report.held and sum(a.cancelled for a in engine.store.appointments()) == 20


def test_a_few_cancellations_pass_the_guard(practice) -> None:  # type: ignore[no-untyped-def]
    """Ordinary cancellations (below the threshold) go straight through."""
    engine, _, cal = practice
    for item in cal.all_items()[:3]:
        asyncio.run(cal.delete(item["ext_id"]))
    report = asyncio.run(engine.sync("cal"))
    assert not report.held and sum(a.cancelled for a in engine.store.appointments()) == 3


def test_concurrent_moves_leave_a_conflict_entry(practice) -> None:  # type: ignore[no-untyped-def]
    """Moved in the EHR and in the calendar before either was synced: one wins, the audit says so."""
    engine, ehr, cal = practice
    appt = engine.store.appointments()[0]
    cal_ext = engine.store.link("cal", appt.id).external_id
    ehr_ext = engine.store.link("ehr", appt.id).external_id
    asyncio.run(ehr.move(ehr_ext, START + timedelta(days=1), START + timedelta(days=1, minutes=50)))
    asyncio.run(engine.sync("ehr"))
    time.sleep(1.1)  # modification times have one-second resolution
    asyncio.run(cal.move(cal_ext, START + timedelta(days=2), START + timedelta(days=2, minutes=50)))
    asyncio.run(engine.sync("cal"))
    conflicts = engine.store.audit_entries(appointment_id=appt.id, kind="conflict")
    assert len(conflicts) == 1 and conflicts[0]["detail"]["field"] == "time"
    # the calendar's move was later, so it wins
    assert engine.store.appointment(appt.id).start == START + timedelta(days=2)


def test_own_writes_come_back_as_echoes(practice) -> None:  # type: ignore[no-untyped-def]
    """Pulling what we just wrote is recognised by its etag and changes nothing."""
    engine, _, _ = practice
    versions = {a.id: a.version for a in engine.store.appointments()}
    report = asyncio.run(engine.sync("cal", full=True))
    assert report.echoes == 20 and report.updated == 0
    assert {a.id: a.version for a in engine.store.appointments()} == versions


def test_full_listing_does_not_cancel_copies_written_meanwhile(tmp_path: Path, stores) -> None:  # type: ignore[no-untyped-def]
    """A full listing taken while sessions are being written cancels none of the new ones."""
    from syncbridge.model import utcnow

    cfg = parse_config(yaml.safe_dump(replica_practice(tmp_path, ("cal",), policy={"mass_cancel_guard": {"min_count": 1000}})))
    engine = Engine(stores(cfg.store.path), build_connectors(cfg), cfg)
    ehr = ReplicaVendor(str(tmp_path / "ehr.db"))
    for i in range(3):
        asyncio.run(ehr.book(START + timedelta(hours=i), START + timedelta(hours=i, minutes=50), f"c{i}", clinician="dr_a"))
    asyncio.run(engine.sync("ehr"))
    pulled_at = utcnow()
    listing = asyncio.run(engine.connectors["cal"].pull(None))  # empty: nothing written yet
    asyncio.run(Outbox(engine).drain())  # the writes land after the listing was taken
    report = engine.observe("cal", listing, pulled_at=pulled_at)
    assert report.updated == 0
    assert not any(a.cancelled for a in engine.store.appointments())


def test_copy_naming_another_appointment_is_matched_by_its_link(practice) -> None:  # type: ignore[no-untyped-def]
    """A linked copy that carries another appointment's id (an event duplicated in the calendar app)
    moves the appointment it is linked to, and leaves the one it names alone."""
    from syncbridge.connector import Observation, PullResult
    from syncbridge.model import iso

    engine, _, _ = practice
    linked, named = engine.store.appointments()[:2]
    link = engine.store.link("cal", linked.id)
    fields = engine.connectors["cal"].capabilities.project(linked.fields)
    fields |= {"start": iso(START + timedelta(days=3)), "end": iso(START + timedelta(days=3, minutes=50))}
    copy = Observation(external_id=link.external_id, etag="moved", canonical_id=named.id, fields=fields)
    report = engine.observe("cal", PullResult([copy], cursor=None), advance=False)
    assert report.updated == 1
    assert engine.store.appointment(linked.id).start == START + timedelta(days=3)
    assert engine.store.appointment(named.id).fields == named.fields
    assert [v for v, *_ in engine.store.history(linked.id)] == list(range(1, linked.version + 2))


class _Crashing(Observation):
    """An observation whose canonical id cannot be read: the engine stops there, as if killed."""

    @property  # type: ignore[override]
    def canonical_id(self) -> str | None:
        raise RuntimeError("killed")

    @canonical_id.setter
    def canonical_id(self, value: str | None) -> None:
        pass


def test_a_large_pull_commits_in_slices_and_moves_the_cursor_last(practice, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A pull bigger than one transaction's share is committed slice by slice; a crash between
    slices keeps what was committed, leaves the cursor where it was, and the next pull finishes
    the job without a duplicate or a lost move."""
    engine, _, cal = practice
    engine.commit_batch = 6
    cursor = engine.store.cursor("cal")
    for i, item in enumerate(cal.all_items()):
        asyncio.run(cal.move(item["ext_id"], START + timedelta(days=3, hours=i), START + timedelta(days=3, hours=i, minutes=50)))
    connector = engine.connectors["cal"]
    pull = connector.pull

    async def crash_in_third_slice(cursor):  # type: ignore[no-untyped-def]
        # the 13th observation (the third slice's first) fails as a crash would, while its slice is committed
        result = await pull(cursor)
        result.observations[12] = _Crashing(**{f.name: getattr(result.observations[12], f.name) for f in fields(Observation)})
        return result

    monkeypatch.setattr(connector, "pull", crash_in_third_slice)
    with pytest.raises(RuntimeError, match="killed"):
        asyncio.run(engine.sync("cal"))
    moved = [a for a in engine.store.appointments() if a.start >= START + timedelta(days=3)]
    assert len(moved) == 12  # the two slices committed before the crash
    assert engine.store.cursor("cal") == cursor
    monkeypatch.setattr(connector, "pull", pull)
    report = asyncio.run(engine.sync("cal"))
    assert report.updated == 8 and report.echoes == 12
    appts = engine.store.appointments()
    assert len(appts) == 20 and all(a.start >= START + timedelta(days=3) for a in appts)
    assert engine.store.cursor("cal") != cursor


def test_the_guard_weighs_the_whole_pull_not_one_slice(practice) -> None:  # type: ignore[no-untyped-def]
    """Slicing a pull for the store does not let a mass deletion through piece by piece."""
    engine, _, cal = practice
    engine.commit_batch = 4
    for item in cal.all_items()[:10]:
        asyncio.run(cal.delete(item["ext_id"]))
    report = asyncio.run(engine.sync("cal"))
    assert report.held
    assert not any(a.cancelled for a in engine.store.appointments())
