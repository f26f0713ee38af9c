"""The contract suite against the FHIR R4 emulator (connectors/fhir/emulator.py).

The Vendor is EHR front-desk staff: it edits Appointments over plain FHIR REST (GET, change,
PUT under the ETag it just read) and never goes through the connector under test. EHRs do not
delete appointments: "delete" is a cancel with a cancelationReason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from syncbridge.policy.cancellation import FHIR_REASON_SYSTEM
from syncbridge_connectors.fhir.emulator import FHIREmulator, running
from syncbridge_connectors.fhir.sandbox import practitioner_id
from tests.contract.suite import CLINICIAN, ConnectorContract, Harness, Vendor

SECRET_ENV = "SYNCBRIDGE_TEST_FHIR_TOKEN"
TOKEN = "staff-and-syncbridge-test-token"
PRACTITIONER = f"Practitioner/{practitioner_id(CLINICIAN)}"


class EHRStaff(Vendor):
    """Front-desk staff using the EHR: every edit is a read then a conditional PUT."""

    can_throttle = True

    def __init__(self, emulator: FHIREmulator, base_url: str) -> None:
        self.emulator = emulator
        self.base_url = base_url

    def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    async def _edit(self, external_id: str, change: Callable[[dict[str, Any]], None]) -> None:
        async with self._http() as http:
            got = await http.get(f"/Appointment/{external_id}")
            got.raise_for_status()
            appt = got.json()
            appt.pop("meta", None)
            change(appt)
            (await http.put(f"/Appointment/{external_id}", json=appt, headers={"If-Match": got.headers["ETag"]})).raise_for_status()

    async def live(self) -> list[dict[str, Any]]:
        out = [
            {"external_id": a["id"], "start": datetime.fromisoformat(a["start"]), "end": datetime.fromisoformat(a["end"])}
            for a in self.emulator.all("Appointment")
            if a.get("status") in ("booked", "arrived", "checked-in")
        ]
        return sorted(out, key=lambda e: e["start"])

    async def move(self, external_id: str, start: datetime, end: datetime) -> None:
        await self._edit(external_id, lambda a: a.update(start=start.isoformat(), end=end.isoformat()))

    async def delete(self, external_id: str) -> None:
        def cancel(appt: dict[str, Any]) -> None:
            appt["status"] = "cancelled"
            appt["cancelationReason"] = {"coding": [{"system": FHIR_REASON_SYSTEM, "code": "pat"}], "text": "called to cancel"}

        await self._edit(external_id, cancel)

    async def retitle(self, external_id: str, title: str) -> None:
        await self._edit(external_id, lambda a: a.update(comment=title))

    async def invalidate_cursor(self) -> None:
        """FHIR has no cursor expiry: a ``_lastUpdated`` watermark is always accepted, so nothing to do;
        the scenario still proves a repeated pull neither duplicates nor cancels."""

    async def throttle(self, requests: int, retry_after: float | None = 0.1) -> None:
        self.emulator.fail_next(429, requests, retry_after=retry_after)

    #: whose sessions staff book
    practitioner = PRACTITIONER

    async def _patient(self, client_key: str) -> str:
        """The client's Patient reference (the emulator checks no references)."""
        return f"Patient/{client_key}"

    async def book(self, start: datetime, end: datetime, client_key: str) -> str:
        appt = {
            "resourceType": "Appointment",
            "status": "booked",
            "start": start.isoformat(),
            "end": end.isoformat(),
            "participant": [
                {"actor": {"reference": self.practitioner}, "status": "accepted"},
                {"actor": {"reference": await self._patient(client_key)}, "status": "accepted"},
            ],
        }
        async with self._http() as http:
            r = await http.post("/Appointment", json=appt)
            r.raise_for_status()
            return str(r.json()["id"])


#: the least an R4 server offers (no _revinclude, no /metadata, no Subscription, a failed
#: transaction not rolled back) and the richest; every FHIR test runs over both
PROFILES = ("least", "full")


@pytest.fixture(params=PROFILES)
def fhir_server(request: pytest.FixtureRequest) -> Iterator[Any]:
    emulator = FHIREmulator(static_token=TOKEN)
    if request.param == "full":
        emulator.full()
    server = running(emulator)
    server.emulator.put({"resourceType": "Practitioner", "id": practitioner_id(CLINICIAN)})
    try:
        yield server
    finally:
        server.stop()


def fhir_harness(server: Any, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Harness:
    monkeypatch.setenv(SECRET_ENV, TOKEN)
    config = {"type": "fhir", "base_url": server.base_url, "auth": "static", "token": {"env": SECRET_ENV}, **options}
    return Harness(config, {"practitioner": PRACTITIONER}, EHRStaff(server.emulator, server.base_url))


class TestFHIR(ConnectorContract):
    @pytest.fixture
    def harness(self, fhir_server: Any, monkeypatch: pytest.MonkeyPatch) -> Harness:
        return fhir_harness(fhir_server, monkeypatch)


# --- FHIR specifics beyond the shared suite ----------------------------------------------------


def _connector(harness: Harness, tmp_path: Any, **options: Any) -> Any:
    import yaml

    from syncbridge.config import parse_config
    from syncbridge.registry import build_connectors

    cfg = parse_config(
        yaml.safe_dump(
            {
                "store": {"path": str(tmp_path / "direct.db")},
                "clinicians": {CLINICIAN: {"accounts": {"ehr": harness.account}}},
                "connectors": {"ehr": harness.connector_config | options},
            }
        )
    )
    return build_connectors(cfg)["ehr"]


async def test_paged_listing_and_overlap_rereads(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Every appointment is read across pages, and re-reading the overlap window reports no change."""
    from tests.contract.suite import next_weekday_at

    harness = fhir_harness(fhir_server, monkeypatch)
    connector = _connector(harness, tmp_path, page_size=2)
    try:
        for hour in range(9, 14):
            start = next_weekday_at(hour)
            await harness.vendor.book(start, start.replace(minute=50), f"p{hour}")
        full = await connector.pull(None)
        assert full.complete and len(full.observations) == 5
        assert sum(1 for m, p in fhir_server.emulator.log if m == "GET" and p == "/Appointment") == 3
        again = await connector.pull(full.cursor)
        assert again.observations == [] and not again.complete
        await harness.vendor.retitle(full.observations[0].external_id, "running late")
        changed = await connector.pull(again.cursor)
        assert [o.external_id for o in changed.observations] == [full.observations[0].external_id]
    finally:
        await connector.close()


async def test_malformed_appointment_is_skipped_by_name(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """An EHR appointment ending before it starts is reported as a problem; the others still sync."""
    from tests.contract.suite import next_weekday_at

    harness = fhir_harness(fhir_server, monkeypatch)
    connector = _connector(harness, tmp_path)
    try:
        start = next_weekday_at(9)
        good = await harness.vendor.book(start, start.replace(minute=50), "p1")
        bad = await harness.vendor.book(start.replace(hour=11), start.replace(hour=10), "p2")
        obs = {o.external_id: o for o in (await connector.pull(None)).observations}
        assert obs[good].problem is None
        assert "ends before it starts" in (obs[bad].problem or "")
    finally:
        await connector.close()


async def test_errors_map_to_what_the_engine_must_do(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Throttling says when to retry, a stale version is a conflict, a gone record is deleted."""
    from syncbridge.connector import Link
    from syncbridge.errors import ConflictError, RateLimited
    from tests.contract.suite import next_weekday_at

    harness = fhir_harness(fhir_server, monkeypatch)
    connector = _connector(harness, tmp_path)
    try:
        start = next_weekday_at(9)
        ext = await harness.vendor.book(start, start.replace(minute=50), "p1")
        fhir_server.emulator.fail_next(503, 1, retry_after=2)
        with pytest.raises(RateLimited) as throttled:
            await connector.read(ext)
        assert throttled.value.retry_after == 2
        obs = await connector.read(ext)
        await harness.vendor.retitle(ext, "moved room")
        link = Link("ehr", "sb-x", ext, obs.etag, obs.fields)
        with pytest.raises(ConflictError):
            await connector.apply("sb-x", obs.fields | {"location": "Room 9"}, link)
        async with httpx.AsyncClient(base_url=fhir_server.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            assert (await http.delete(f"/Appointment/{ext}")).status_code == 204
            gone = await http.get(f"/Appointment/{ext}")
            assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
        assert (await connector.read(ext)).deleted
    finally:
        await connector.close()


async def test_emulator_follows_fhir_rest(fhir_server: Any) -> None:
    """The emulator answers as R4 servers do: 401 without a token, 201 + Location + ETag, conditional create."""
    base = fhir_server.base_url
    async with httpx.AsyncClient(base_url=base) as anon:
        assert (await anon.get("/Appointment")).status_code == 401
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "1"}]}
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        created = await http.post("/Patient", json=body, headers={"If-None-Exist": "identifier=urn:x|1"})
        assert created.status_code == 201 and created.headers["ETag"] == 'W/"1"'
        assert created.headers["Location"].startswith(f"{base}/Patient/")
        again = await http.post("/Patient", json=body, headers={"If-None-Exist": "identifier=urn:x|1"})
        assert again.status_code == 200 and again.json()["id"] == created.json()["id"]
        stale = await http.put(f"/Patient/{created.json()['id']}", json=created.json(), headers={"If-Match": 'W/"0"'})
        assert stale.status_code == 412


# --- the EHR's own data and identifiers ------------------------------------------------------------


RICH_EXTRA = {
    "comment": "parking validated at front desk",
    "description": "follow-up",
    "priority": 5,
    "appointmentType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "FOLLOWUP"}]},
    "serviceCategory": [{"text": "Behavioral health"}],
    "reasonCode": [{"text": "anxiety follow-up"}],
    "extension": [{"url": "http://ehr.example/fhir/room-booking", "valueString": "RB-1182"}],
}


def _rich(ext_appt: dict[str, Any], client_key: str) -> dict[str, Any]:
    """What an EHR adds to an Appointment: display names, a co-therapist, its own codes and identifiers."""
    appt = {k: v for k, v in ext_appt.items() if k != "meta"} | RICH_EXTRA
    appt["identifier"] = [*appt.get("identifier", []), {"system": "http://ehr.example/visit", "value": "V-77"}]
    appt["participant"] = [
        {"actor": {"reference": PRACTITIONER, "display": "Dr. Rivera"}, "status": "accepted", "required": "required",
         "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PPRF"}]}]},
        {"actor": {"reference": f"Patient/{client_key}", "display": "J. Doe"}, "status": "accepted"},
        {"actor": {"reference": "Practitioner/co-therapist", "display": "Intern"}, "status": "tentative"},
        {"actor": {"reference": "Location/room-2", "type": "Location", "display": "Room 2"}, "status": "accepted"},
    ]
    appt["serviceType"] = [{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "90837"},
                                       {"system": "http://ehr.example/service", "code": "PSY60"}], "text": "Psychotherapy 60"}]
    return appt


def _kept(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in RICH_EXTRA.items():
        if key == "extension":
            assert value[0] in after["extension"]
        else:
            assert after[key] == value, key
    assert {"system": "http://ehr.example/visit", "value": "V-77"} in after["identifier"]
    by_actor = {p["actor"].get("reference"): p for p in after["participant"]}
    for p in before["participant"]:
        assert by_actor[p["actor"]["reference"]] == p  # display, type, required, status: all kept
    (service,) = after["serviceType"]
    assert service["text"] == "Psychotherapy 60" and {"system": "http://ehr.example/service", "code": "PSY60"} in service["coding"]


async def test_rich_appointment_keeps_the_ehrs_elements_through_move_and_cancel(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Everything the EHR put on an Appointment that syncbridge does not own survives a move and a cancel."""
    from tests.contract.suite import next_weekday_at, world_for

    harness = fhir_harness(fhir_server, monkeypatch)
    async with world_for(harness, tmp_path) as world:
        start = next_weekday_at(10)
        ext = await harness.vendor.book(start, start.replace(minute=50), "client-7")
        await world.sync()
        emulator = fhir_server.emulator
        rich = _rich(emulator.get("Appointment", ext), "client-7")
        emulator.put(rich)
        await world.sync()
        (appt_id,) = [a.id for a in world.store.appointments()]
        world.move_here(appt_id, next_weekday_at(14))
        await world.drain()
        moved = emulator.get("Appointment", ext)
        assert moved["start"] != rich["start"]
        _kept(rich, moved)
        await world.sync()
        world.cancel_here(appt_id)
        await world.drain()
        cancelled = emulator.get("Appointment", ext)
        assert cancelled["status"] == "cancelled"
        _kept(rich, cancelled)


async def test_adopted_appointment_gets_the_canonical_identifier(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """An Appointment booked in the EHR is stamped with syncbridge's identifier once adopted, so a
    lost store can be rebuilt from the EHR; its own data is untouched."""
    from tests.contract.suite import next_weekday_at, world_for

    harness = fhir_harness(fhir_server, monkeypatch)
    async with world_for(harness, tmp_path) as world:
        start = next_weekday_at(11)
        ext = await harness.vendor.book(start, start.replace(minute=50), "client-8")
        await world.sync()
        await world.drain()
        (appt,) = world.store.appointments()
        stamped = fhir_server.emulator.get("Appointment", ext)
        assert {"system": "urn:syncbridge:appointment", "value": appt.id} in stamped["identifier"]
        assert stamped["status"] == "booked" and [p["actor"] for p in stamped["participant"]][:2] == [
            {"reference": PRACTITIONER}, {"reference": "Patient/client-8"}]
        versions = stamped["meta"]["versionId"]
        await world.sync()
        await world.drain()
        assert fhir_server.emulator.get("Appointment", ext)["meta"]["versionId"] == versions  # stamped once


async def test_directory_client_is_a_valid_logical_reference(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A client known only by a directory's key (``zocdoc:123``) becomes a logical Patient reference
    by identifier, never an invalid ``Patient/zocdoc:123``; read back, it is the same client."""
    from tests.contract.suite import next_weekday_at, world_for

    harness = fhir_harness(fhir_server, monkeypatch)
    async with world_for(harness, tmp_path) as world:
        appt_id = world.book_here(next_weekday_at(12), client_key="zocdoc:P-123")
        await world.drain()
        ext = world.external_id(appt_id)
        participants = fhir_server.emulator.get("Appointment", ext)["participant"]
        refs = [p["actor"].get("reference", "") for p in participants]
        assert not any(":" in r.partition("/")[2] for r in refs)
        assert {"type": "Patient", "identifier": {"system": "urn:syncbridge:client", "value": "zocdoc:P-123"}} in [p["actor"] for p in participants]
        obs = await world.connector.read(ext)
        assert obs.fields["client_key"] == "zocdoc:P-123"
