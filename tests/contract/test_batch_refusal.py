"""A vendor batch endpoint that refuses every batch request (an egress proxy allowing only the
single-call paths) costs speed, never a write: each write and read goes on its own, nothing is
dead-lettered, and the connector shows degraded until a batch succeeds again."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from syncbridge.model import iso
from syncbridge.policy.cancellation import decide
from tests.contract.suite import next_weekday_at
from tests.contract.test_account_isolation import ACCOUNTS, System, practice, system  # noqa: F401 - the fixture


@pytest.mark.parametrize("system", ["microsoft365", "google_calendar"], indirect=True)  # the systems with batch requests
async def test_a_refused_batch_endpoint_still_syncs_everything_one_by_one(system: System, tmp_path: Path) -> None:  # noqa: F811
    """Batches answered 404 (Google) or 400 (Graph) as a whole: the first sync still creates every
    event, a cancellation in the record and one in a calendar both arrive, no write is
    dead-lettered, and the status says degraded; once batches pass again the mark clears."""
    assert system.refuse_batches is not None
    system.refuse_batches(404 if "email" in system.accounts["dr_a"] else 400)
    async with practice(system, tmp_path, more=1) as p:  # two sessions per clinician, written (a batch each) and listed
        assert all(p.store.link("cal", appt) is not None for appt in p.sessions.values())
        assert p.store.dead_letters() == []
        state = p.store.connector_state("cal")
        assert state["healthy"] and state["degraded"] and "refused" in state["degraded"]

        record = p.store.appointment(p.sessions["dr_a"])
        assert record is not None
        status, cancellation = decide(p.engine.config.policy.cancellation, start=record.start, now=record.start - timedelta(days=3),
                                      via="ehr", by="client")
        p.engine.change(record.id, record.fields | {"status": status, "cancellation": cancellation}, via="ehr")
        moved = next_weekday_at(14)
        second = p.store.appointment(p.sessions["dr_b"])
        assert second is not None
        p.engine.change(second.id, second.fields | {"start": iso(moved), "end": iso(moved + timedelta(minutes=50))}, via="ehr")
        await p.outbox.drain()
        link = p.store.link("cal", record.id)
        assert link is not None and link.applied_version == 2
        assert p.store.dead_letters() == []

        p.delete_in_calendar(p.sessions["dr_c"])
        await p.engine.sync("cal")
        assert p.cancelled(p.sessions["dr_c"])

        system.refuse_batches(None)
        await asyncio.sleep(0.6)  # past the pause after a refusal (outbox.backoff_max): a batch is tried again
        for i, clinician in enumerate(ACCOUNTS):
            for hour in (15, 16):  # two for one calendar: they travel in one batch
                p.book(clinician, next_weekday_at(hour, days_ahead=8 + i))
        await p.outbox.drain()
        assert p.store.connector_state("cal")["degraded"] is None
        assert p.store.dead_letters() == []
