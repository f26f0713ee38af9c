"""Bulk operations: a preview that says what would change and what is left out, a confirmation that
applies exactly that as one audited operation, and an interruption that loses nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Link, Observation, PullResult
from syncbridge.engine import Engine
from syncbridge.model import Billing, Role, Snapshot, empty_snapshot, iso
from syncbridge.operations import BadSelection, BulkAction, Selection, StaleSelection, preview, progress, resume, start
from syncbridge.outbox import Outbox
from syncbridge.policy.cancellation import decide
from syncbridge.registry import build_connectors
from syncbridge.store import Store

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


class Calendar(Connector):
    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status"}), status_map=MIRROR_STATUS_MAP)

    async def pull(self, cursor: str | None) -> PullResult:
        return PullResult([], cursor, complete=cursor is None)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id=external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        return ApplyResult(f"ext-{appointment_id}", "e", gone=desired["status"] != "booked")


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "practice": {"timezone": "UTC"},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}, "dr_b": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_bulk_operations:Calendar"}},
    }))
    return Engine(Store(cfg.store.path), build_connectors(cfg), cfg, clock=lambda: NOW)


def book(engine: Engine, clinician: str, start: datetime, **over: object) -> str:
    appt_id = f"sb-{clinician}-{start:%d%H}"
    engine.change(appt_id, empty_snapshot() | {
        "clinician": clinician, "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": "UTC",
        "client_key": f"c-{start:%d%H}", "service_code": "90834", "billing": "pending",
    } | over, via="ehr", kind="booked")
    return appt_id


def three_days(engine: Engine) -> list[str]:
    ids = []
    for day in range(3):
        for hour in (9, 13, 15):
            ids.append(book(engine, "dr_a", datetime(2027, 3, 2 + day, hour, tzinfo=UTC)))
    return ids


async def test_the_preview_lists_what_changes_where_and_changes_nothing(engine: Engine) -> None:
    ids = three_days(engine)
    book(engine, "dr_b", datetime(2027, 3, 2, 9, tzinfo=UTC))  # another clinician: not selected
    await Outbox(engine).drain()  # every session has its calendar copy
    sel = Selection(("dr_a",), datetime(2027, 3, 2, tzinfo=UTC), datetime(2027, 3, 5, tzinfo=UTC))
    shown = preview(engine.store, engine.config, engine.connectors, sel, BulkAction.CANCEL, reason="illness", now=NOW)
    assert [p.appointment_id for p in shown.planned] == ids
    assert all(p.systems == ("cal",) and p.status_after == "cancelled" and p.billing == "suppress" for p in shown.planned)
    assert all(p.fee == "none" for p in shown.planned)  # a clinician's cancellation carries no fee
    assert all(engine.store.appointment(i).fields["status"] == "booked" for i in ids)


async def test_sessions_under_way_documented_or_billed_are_shown_as_such(engine: Engine) -> None:
    under_way = book(engine, "dr_a", NOW - timedelta(minutes=10))
    documented = book(engine, "dr_a", NOW + timedelta(hours=2), status="fulfilled")
    billed = book(engine, "dr_a", NOW + timedelta(hours=3), billing="billed")
    fine = book(engine, "dr_a", NOW + timedelta(hours=4))
    sel = Selection(("dr_a",), NOW - timedelta(hours=1), NOW + timedelta(days=1))
    shown = preview(engine.store, engine.config, engine.connectors, sel, BulkAction.CANCEL, now=NOW)
    assert {o.appointment_id: o.why for o in shown.left_out} == {under_way: "under way", documented: "documented in the record system (fulfilled)"}
    assert {p.appointment_id: p.billing for p in shown.planned} == {billed: "void", fine: "suppress"}


async def test_confirming_applies_exactly_the_preview_as_one_audited_operation(engine: Engine) -> None:
    ids = three_days(engine)
    await Outbox(engine).drain()
    sel = Selection(("dr_a",), datetime(2027, 3, 2, tzinfo=UTC), datetime(2027, 3, 5, tzinfo=UTC))
    shown = preview(engine.store, engine.config, engine.connectors, sel, BulkAction.CANCEL, reason="illness", note="covered by Dr B", now=NOW)
    op = start(engine, shown, user="maria", now=NOW)
    for i in ids:
        fields = engine.store.appointment(i).fields
        assert fields["status"] == "cancelled"
        assert fields["cancellation"]["by"] == "clinician" and fields["cancellation"]["note"] == "covered by Dr B"
        assert fields["cancellation"]["reason"] == "illness"
    entry = engine.store.audit_entries(kind="bulk_operation")[0]
    assert entry["detail"]["operation"] == op and entry["detail"]["by_user"] == "maria" and entry["detail"]["sessions"] == 9
    before = progress(engine.store, engine.connectors, op)
    assert before is not None and before.changed == 9 and not before.done and before.systems["cal"]["pending"] == 9
    await Outbox(engine).drain()
    after = progress(engine.store, engine.connectors, op)
    assert after is not None and after.done and after.systems["cal"]["applied"] == 9


async def test_a_session_changed_after_the_preview_stops_the_confirmation(engine: Engine) -> None:
    ids = three_days(engine)
    sel = Selection(("dr_a",), datetime(2027, 3, 2, tzinfo=UTC), datetime(2027, 3, 5, tzinfo=UTC))
    shown = preview(engine.store, engine.config, engine.connectors, sel, BulkAction.CANCEL, now=NOW)
    moved = dict(engine.store.appointment(ids[4]).fields) | {"service_code": "90837"}
    engine.change(ids[4], moved, via="ehr")
    with pytest.raises(StaleSelection):
        start(engine, shown, user="maria", now=NOW)
    assert all(engine.store.appointment(i).fields["status"] == "booked" for i in ids)
    assert engine.store.operations() == []


async def test_an_interrupted_operation_is_finished_once_and_nothing_twice(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after four sessions, and a fifth changed in the record just before the stop (but not
    yet noted as done): resuming changes the other four once each, and the fifth not again."""
    import syncbridge.operations as operations

    ids = three_days(engine)
    sel = Selection(("dr_a",), datetime(2027, 3, 2, tzinfo=UTC), datetime(2027, 3, 5, tzinfo=UTC))
    shown = preview(engine.store, engine.config, engine.connectors, sel, BulkAction.CANCEL, now=NOW)
    calls = 0
    real_kind = operations._kind

    def stops_at_the_fifth(action: BulkAction) -> str:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt  # the process stopped here
        return real_kind(action)

    monkeypatch.setattr(operations, "_kind", stops_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        start(engine, shown, user="maria", now=NOW)
    monkeypatch.setattr(operations, "_kind", real_kind)
    assert sum(engine.store.appointment(i).fields["status"] == "cancelled" for i in ids) == 4
    [op] = engine.store.unfinished_operations()
    fifth = next(i.appointment_id for i in engine.store.operation_items(op) if i.state == "pending")
    record = engine.store.appointment(fifth)
    assert record is not None
    status, cancellation = decide(engine.config.policy.cancellation, start=record.start, now=NOW, via="bulk", by="clinician")
    engine.change(fifth, dict(record.fields) | {"status": status, "cancellation": cancellation}, via="bulk", kind="cancelled")
    versions = {i: engine.store.appointment(i).version for i in ids}
    assert resume(engine, now=NOW) == [op]
    assert all(engine.store.appointment(i).fields["status"] == "cancelled" for i in ids)
    assert all(engine.store.appointment(i).version == versions[i] + (0 if versions[i] == 2 else 1) for i in ids)
    found = progress(engine.store, engine.connectors, op)
    assert found is not None and found.changed == 9 and found.skipped == 0
    assert resume(engine, now=NOW) == []


async def test_an_unknown_clinician_is_named(engine: Engine) -> None:
    with pytest.raises(BadSelection, match="dr_z"):
        preview(engine.store, engine.config, engine.connectors, Selection(("dr_z",), NOW, NOW + timedelta(days=1)), BulkAction.CANCEL)


async def test_no_show_and_waive(engine: Engine) -> None:
    past = book(engine, "dr_a", NOW - timedelta(hours=3))
    future = book(engine, "dr_a", NOW + timedelta(hours=3))
    sel = Selection(("dr_a",), NOW - timedelta(days=1), NOW + timedelta(days=1))
    shown = preview(engine.store, engine.config, engine.connectors, sel, BulkAction.NOSHOW, charge_fee=True, now=NOW)
    assert [p.appointment_id for p in shown.planned] == [past]
    assert [o.why for o in shown.left_out] == ["has not started yet"]
    start(engine, shown, user="maria", now=NOW)
    record = engine.store.appointment(past).fields["cancellation"]
    assert engine.store.appointment(past).fields["status"] == "noshow" and record["kind"] == "no_show"
    if record["fee"] == "charge":  # the practice's policy charges no-shows: waive it in bulk
        waive = preview(engine.store, engine.config, engine.connectors, sel, BulkAction.WAIVE, now=NOW)
        assert [p.appointment_id for p in waive.planned] == [past]
        start(engine, waive, user="maria", now=NOW)
        assert engine.store.appointment(past).fields["cancellation"]["fee"] == "waived"
    assert engine.store.appointment(future).fields["status"] == "booked"
    assert Billing.PENDING == engine.store.appointment(future).fields["billing"]
