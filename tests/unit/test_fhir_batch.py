"""Batched writes of the FHIR connector and the emulator's batch/transaction Bundles (http.html#transaction)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncbridge.connector import ApplyResult, Link, Write
from syncbridge.errors import ConflictError
from syncbridge.model import empty_snapshot, iso, new_canonical_id
from tests.contract.suite import CLINICIAN, ZONE, next_weekday_at
from tests.contract.test_fhir import PRACTITIONER, TOKEN, _connector, fhir_harness, fhir_server  # noqa: F401


def _session(hour: int, days_ahead: int = 7) -> dict[str, Any]:
    start = next_weekday_at(hour, days_ahead)
    return empty_snapshot() | {
        "clinician": CLINICIAN, "client_key": "client-" + new_canonical_id()[-6:], "start": iso(start),
        "end": iso(start + timedelta(minutes=50)), "timezone": ZONE, "service_code": "90837", "location": "Room 2",
    }


@pytest.fixture
async def ehr(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:  # noqa: F811
    harness = fhir_harness(fhir_server, monkeypatch)
    connector = _connector(harness, tmp_path)
    try:
        yield connector, harness
    finally:
        await connector.close()


def bundles(server: Any) -> int:
    return sum(1 for m, p in server.emulator.log if (m, p) == ("POST", "/"))


async def _created(connector: Any, n: int) -> list[tuple[Write, ApplyResult]]:
    writes = [Write(new_canonical_id(), connector.capabilities.project(_session(9 + i)), None) for i in range(n)]
    results = await connector.apply_many(writes)
    assert all(isinstance(r, ApplyResult) for r in results), results
    return list(zip(writes, results, strict=True))  # type: ignore[arg-type]


async def test_creates_go_out_in_one_request(ehr: tuple[Any, Any], fhir_server: Any) -> None:  # noqa: F811
    """Five new sessions reach the EHR in one request, and sending them again duplicates none."""
    connector, harness = ehr
    fhir_server.injector.reset_counts()
    created = await _created(connector, 5)
    assert fhir_server.injector.requests == 1
    again = await connector.apply_many([w for w, _ in created])
    assert [r.external_id for r in again] == [r.external_id for _, r in created]
    assert len(await harness.vendor.live()) == 5


async def test_one_stale_write_fails_alone(ehr: tuple[Any, Any], fhir_server: Any) -> None:  # noqa: F811
    """Among updates sent together, the one whose copy staff just changed is a conflict; the others land."""
    connector, harness = ehr
    created = await _created(connector, 3)
    links = [Link("ehr", w.appointment_id, r.external_id, r.etag, w.desired) for w, r in created]
    staff_start = next_weekday_at(16, 21)
    await harness.vendor.move(links[1].external_id, staff_start, staff_start + timedelta(minutes=50))
    updates = [Write(w.appointment_id, w.desired | {"location": "Room 9"}, link) for (w, _), link in zip(created, links, strict=True)]
    fhir_server.injector.reset_counts()
    results = await connector.apply_many(updates)
    assert fhir_server.injector.requests == 1  # copies as we wrote them need no read: one batch of conditional updates
    assert [type(r) for r in results] == [ApplyResult, ConflictError, ApplyResult]
    appts = {a["id"]: a for a in fhir_server.emulator.all("Appointment")}
    rooms = [next(p["actor"]["display"] for p in appts[link.external_id]["participant"] if p["actor"].get("type") == "Location") for link in links]
    assert rooms == ["Room 9", "Room 2", "Room 9"]
    assert appts[links[1].external_id]["start"] == staff_start.isoformat()
    assert results[0].etag == f'W/"{appts[links[0].external_id]["meta"]["versionId"]}"'


async def test_unseen_copies_are_read_in_one_request(ehr: tuple[Any, Any], fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: F811
    """After a restart (nothing remembered), updating several copies takes one batch of reads and one of updates."""
    connector, _ = ehr
    created = await _created(connector, 3)
    restarted = _connector(fhir_harness(fhir_server, monkeypatch), tmp_path)
    try:
        updates = [Write(w.appointment_id, w.desired | {"location": "Room 7"}, Link("ehr", w.appointment_id, r.external_id, r.etag, w.desired)) for w, r in created]
        fhir_server.injector.reset_counts()
        results = await restarted.apply_many(updates)
        assert fhir_server.injector.requests == 2
        assert all(isinstance(r, ApplyResult) for r in results)
    finally:
        await restarted.close()


async def test_bundle_too_large_is_split(ehr: tuple[Any, Any], fhir_server: Any) -> None:  # noqa: F811
    """An EHR that takes fewer entries per Bundle still gets every session, in smaller Bundles."""
    connector, harness = ehr
    fhir_server.emulator.max_bundle_entries = 2
    await _created(connector, 5)
    assert len(await harness.vendor.live()) == 5
    assert connector.write_batch <= 2


# --- the emulator, as a FHIR client sees it ------------------------------------------------


def _http(server: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)


def _patient(value: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": value}]}


async def test_batch_answers_every_entry_in_order(fhir_server: Any) -> None:  # noqa: F811
    """A batch answers 200 with one response per entry, in request order, a failed entry carrying its OperationOutcome."""
    old = fhir_server.emulator.put(_patient("old"))
    entries = [
        {"resource": old | {"active": True}, "request": {"method": "PUT", "url": f"Patient/{old['id']}", "ifMatch": 'W/"9"'}},
        {"resource": _patient("new"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:x|new"}},
        {"request": {"method": "GET", "url": f"Patient/{old['id']}"}},
        {"request": {"method": "GET", "url": "Patient?identifier=urn:x|new"}},
    ]
    async with _http(fhir_server) as http:
        r = await http.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert r.status_code == 200 and r.json()["type"] == "batch-response"
    out = r.json()["entry"]
    assert [e["response"]["status"].split()[0] for e in out] == ["412", "201", "200", "200"]
    assert out[0]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert out[1]["response"]["location"].startswith(f"{fhir_server.base_url}/Patient/") and out[1]["response"]["etag"] == 'W/"1"'
    assert "active" not in out[2]["resource"]  # the stale update changed nothing
    assert [e["resource"]["id"] for e in out[3]["resource"]["entry"]] == [out[1]["resource"]["id"]]


async def test_failed_transaction_keeps_or_rolls_back_by_profile(fhir_server: Any) -> None:  # noqa: F811
    """A transaction with one stale update says which entry failed; a server that rolls back applies
    none of it, one that does not keeps what ran before the failing entry."""
    atomic = fhir_server.emulator.atomic_transactions
    old = fhir_server.emulator.put(_patient("old"))
    create = {"resource": _patient("new"), "request": {"method": "POST", "url": "Patient"}}
    stale = {"resource": old | {"active": True}, "request": {"method": "PUT", "url": f"Patient/{old['id']}", "ifMatch": 'W/"9"'}}
    async with _http(fhir_server) as http:
        failed = await http.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [create, stale]})
        assert failed.status_code == 412 and failed.json()["resourceType"] == "OperationOutcome"
        assert "entry 1" in failed.json()["issue"][0]["diagnostics"]
        assert len(fhir_server.emulator.all("Patient")) == (1 if atomic else 2)
        stale["request"]["ifMatch"] = 'W/"1"'
        done = await http.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [create, stale]})
        assert done.status_code == 200 and done.json()["type"] == "transaction-response"
        assert [e["response"]["status"].split()[0] for e in done.json()["entry"]] == ["201", "200"]
        twice = await http.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [stale, stale]})
        assert twice.status_code == 400
    assert len(fhir_server.emulator.all("Patient")) == (2 if atomic else 3)


async def test_oversized_bundle_is_refused(fhir_server: Any) -> None:  # noqa: F811
    """A Bundle over the server's limit is refused whole with 413 and an OperationOutcome."""
    fhir_server.emulator.max_bundle_entries = 1
    entries = [{"request": {"method": "GET", "url": "Patient"}}] * 2
    async with _http(fhir_server) as http:
        r = await http.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert r.status_code == 413 and r.json()["issue"][0]["code"] == "too-long"


async def test_refused_batch_bundles_fall_back_to_single_requests(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: F811
    """An EHR (or a proxy in front of it) answering 404 to every ``batch`` Bundle: new sessions
    still reach it, one request each, nothing is dead-lettered, the status says degraded, and a
    cancellation still cancels the Encounter, the charge and the draft claim; once Bundles pass
    again, writes are batched again and the mark clears."""
    from tests.contract.suite import world_for
    from tests.unit.test_fhir_claims import booked_with_billing

    fhir_server.emulator.batch_refusal = 404
    harness = fhir_harness(fhir_server, monkeypatch)
    async with world_for(harness, tmp_path) as world:
        sessions = [world.book_here(next_weekday_at(9 + i)) for i in range(4)]
        await world.drain()
        assert len(await harness.vendor.live()) == 4 and all(world.store.link(world.connector.name, a) for a in sessions)
        appt_id, ext, ids = await booked_with_billing(world)
        world.cancel_here(appt_id)
        await world.drain()
        e = fhir_server.emulator
        assert e.get("Appointment", ext)["status"] == "cancelled"
        assert e.get("Encounter", ids["encounter"])["status"] == "cancelled"
        assert e.get("ChargeItem", ids["charge"])["status"] == "not-billable"
        assert e.get("Claim", ids["claim"])["status"] == "cancelled"
        await world.sync()
        assert world.store.appointment(appt_id).fields["billing"] == "suppressed"
        assert world.store.dead_letters() == []
        state = world.store.connector_state(world.connector.name)
        assert state["healthy"] and state["degraded"] and "refused" in state["degraded"]

        e.batch_refusal = None
        await asyncio.sleep(0.3)  # past the pause after a refusal (outbox.backoff_max): a batch is tried again
        more = [world.book_here(next_weekday_at(9 + i, days_ahead=8)) for i in range(3)]
        before = bundles(fhir_server)
        await world.drain()
        assert bundles(fhir_server) == before + 1 and all(world.store.link(world.connector.name, a) for a in more)
        assert world.store.connector_state(world.connector.name)["degraded"] is None
