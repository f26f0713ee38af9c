"""The FHIR connector against a FHIR R4 server the project did not write: Medplum's fhir-router.

The server comes from the npm registry (``tests/fhir_server``, pinned, installed by ``make test``)
and is started by the tests (tests/fhir_third_party.py). The same contract scenarios as against
the emulator run here, skipping by capability; scenarios that need fault injection (throttling)
skip, since a real server cannot be told to fail. Everything the tests seed goes over plain FHIR
REST, as EHR staff and billing tools would write it. Each test works under a Practitioner of its
own, so tests sharing the module's server never see each other's appointments.

What this server does not honour (``_revinclude``, next links, transaction rollback, ...) is
measured in :func:`test_what_the_server_does_not_honour` and written in tests/fhir_server/README.md.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncbridge.model import parse_iso
from syncbridge.policy.cancellation import FHIR_REASON_SYSTEM
from tests.contract.suite import ConnectorContract, Harness, World, next_weekday_at, world_for
from tests.contract.test_fhir import EHRStaff as EmulatorStaff
from tests.fhir_third_party import TOKEN, FHIRServer, fhir_server_fixture, installed_version, locked_version  # noqa: F401

pytestmark = pytest.mark.slow

SECRET_ENV = "SYNCBRIDGE_TEST_THIRD_PARTY_FHIR_TOKEN"
LIVE = ("booked", "arrived", "checked-in")
#: the server pages only by ``_offset`` (no ``next`` links, README): a small page proves the
#: connector reads on past the first one
PAGE_SIZE = 3


class EHRStaff(EmulatorStaff):
    """Front-desk staff editing the EHR over FHIR REST: read, change, PUT under the ETag just read
    (the emulator suite's staff, pointed at this server and its own Practitioner)."""

    can_throttle = False  # a real server cannot be told to answer 429

    def __init__(self, server: FHIRServer, practitioner: str) -> None:
        self.server = server
        self.practitioner = practitioner

    def _http(self) -> httpx.AsyncClient:
        return self.server.http()

    async def live(self) -> list[dict[str, Any]]:
        async with self.server.http() as http:
            r = await http.get("/Appointment", params={"practitioner": self.practitioner})
            r.raise_for_status()
        found = [e["resource"] for e in r.json().get("entry", [])]
        out = [
            {"external_id": a["id"], "start": datetime.fromisoformat(a["start"]), "end": datetime.fromisoformat(a["end"])}
            for a in found
            if a.get("status") in LIVE
        ]
        return sorted(out, key=lambda e: e["start"])

    async def _patient(self, client_key: str) -> str:
        return await ensure_patient(self.server, client_key)


# --- seeding over plain FHIR REST ----------------------------------------------------------------


async def create(server: FHIRServer, resource: dict[str, Any]) -> dict[str, Any]:
    """POST [type]; the server's answer (201 with the stored resource)."""
    async with server.http() as http:
        r = await http.post(f"/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def read(server: FHIRServer, reference: str) -> dict[str, Any]:
    async with server.http() as http:
        r = await http.get(f"/{reference}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def ensure_patient(server: FHIRServer, client_key: str) -> str:
    """The client's Patient under the id syncbridge references (``Patient/<client_key>``): PUT makes it (update as create)."""
    patient = {"resourceType": "Patient", "id": client_key, "active": True}
    async with server.http() as http:
        r = await http.put(f"/Patient/{client_key}", json=patient)
    assert r.status_code in (200, 201), r.text
    return f"Patient/{client_key}"


async def new_practitioner(server: FHIRServer) -> str:
    made = await create(
        server, {"resourceType": "Practitioner", "active": True, "name": [{"family": "Rivera", "given": [uuid.uuid4().hex[:6]]}]}
    )
    return f"Practitioner/{made['id']}"


@pytest.fixture
async def practitioner(fhir_server: FHIRServer) -> str:
    """A Practitioner of this test's own: the clinician's account, and the filter of Vendor.live."""
    return await new_practitioner(fhir_server)


def third_party_harness(server: FHIRServer, practitioner: str, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Harness:
    monkeypatch.setenv(SECRET_ENV, TOKEN)
    config = {
        "type": "fhir",
        "base_url": server.base_url,
        "auth": "static",
        "token": {"env": SECRET_ENV},
        "page_size": PAGE_SIZE,
        **options,
    }
    return Harness(config, {"practitioner": practitioner}, EHRStaff(server, practitioner))


class TestFHIRThirdParty(ConnectorContract):
    @pytest.fixture
    def harness(self, fhir_server: FHIRServer, practitioner: str, monkeypatch: pytest.MonkeyPatch) -> Harness:
        return third_party_harness(fhir_server, practitioner, monkeypatch)


# --- the server is a real, third-party FHIR R4 implementation ------------------------------------


async def test_server_is_medplum_at_the_pinned_version(fhir_server: FHIRServer) -> None:
    """The answers come from Medplum's router at the version package-lock.json pins, not from our code."""
    assert installed_version() == locked_version()
    async with fhir_server.http() as http:
        r = await http.get("/Patient")
    assert r.headers["Server"] == f"medplum-fhir-router/{locked_version()}"
    assert r.json()["resourceType"] == "Bundle" and r.json()["type"] == "searchset"
    async with httpx.AsyncClient(base_url=fhir_server.base_url) as anon:
        assert (await anon.get("/Patient")).status_code == 401


async def test_crud_search_and_bundles_follow_fhir_rest(fhir_server: FHIRServer, practitioner: str) -> None:
    """What the connector relies on: conditional create, If-Match, reference and token searches,
    _lastUpdated, _sort, _count, batch and transaction Bundles, and DELETE then GET 404."""
    patient = await ensure_patient(fhir_server, "p-" + uuid.uuid4().hex[:8])
    ident = f"urn:syncbridge:appointment|{uuid.uuid4().hex}"
    system, value = ident.split("|")
    since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    appt = {
        "resourceType": "Appointment",
        "status": "booked",
        "identifier": [{"system": system, "value": value}],
        "start": "2030-03-04T15:00:00+00:00",
        "end": "2030-03-04T15:50:00+00:00",
        "participant": [
            {"actor": {"reference": practitioner}, "status": "accepted"},
            {"actor": {"reference": patient}, "status": "accepted"},
        ],
    }
    async with fhir_server.http() as http:
        made = await http.post("/Appointment", json=appt, headers={"If-None-Exist": f"identifier={ident}"})
        assert made.status_code == 201 and made.headers["ETag"] == f'W/"{made.json()["meta"]["versionId"]}"'
        assert made.headers["Location"].startswith(f"{fhir_server.base_url}/Appointment/{made.json()['id']}")
        again = await http.post("/Appointment", json=appt, headers={"If-None-Exist": f"identifier={ident}"})
        assert again.status_code == 200 and again.json()["id"] == made.json()["id"]
        aid, etag = made.json()["id"], made.headers["ETag"]

        stale = await http.put(f"/Appointment/{aid}", json=made.json() | {"comment": "x"}, headers={"If-Match": 'W/"not-the-version"'})
        assert stale.status_code == 412 and stale.json()["resourceType"] == "OperationOutcome"
        fresh = await http.put(f"/Appointment/{aid}", json=made.json() | {"comment": "x"}, headers={"If-Match": etag})
        assert fresh.status_code == 200 and fresh.headers["ETag"] != etag
        assert (await http.put(f"/Appointment/{aid}", json=made.json(), headers={"If-Match": etag})).status_code == 412
        history = (await http.get(f"/Appointment/{aid}/_history")).json()
        assert history["type"] == "history" and len(history["entry"]) == 2

        async def ids(url: str, **params: str) -> list[str]:
            r = await http.get(url, params=params)
            assert r.status_code == 200, r.text
            return [e["resource"]["id"] for e in r.json().get("entry", [])]

        assert await ids("/Appointment", identifier=ident) == [aid]
        assert await ids("/Appointment", practitioner=practitioner) == [aid]
        assert aid in await ids("/Appointment", _lastUpdated="ge" + since)
        assert await ids("/Appointment", _lastUpdated="ge2099-01-01T00:00:00+00:00") == []
        enc = await create(fhir_server, encounter(patient, aid))
        item = await create(fhir_server, charge_item(patient, enc["id"]))
        claim = await create(fhir_server, claim_for(patient, practitioner, enc["id"], "draft"))
        assert await ids("/Encounter", appointment=f"Appointment/{aid}") == [enc["id"]]
        assert await ids("/ChargeItem", context=f"Encounter/{enc['id']}") == [item["id"]]
        assert await ids("/Claim", encounter=f"Encounter/{enc['id']}") == [claim["id"]]

        for _ in range(3):
            await create(fhir_server, {"resourceType": "Practitioner", "active": False})
        page = (await http.get("/Practitioner", params={"_sort": "_lastUpdated", "_count": "2"})).json()
        assert len(page["entry"]) == 2 and page["total"] >= 4
        stamps = [
            e["resource"]["meta"]["lastUpdated"]
            for e in (await http.get("/Practitioner", params={"_sort": "_lastUpdated"})).json()["entry"]
        ]
        assert stamps == sorted(stamps)

        batch = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": appt, "request": {"method": "POST", "url": "Appointment", "ifNoneExist": f"identifier={ident}"}},
            {"resource": fresh.json(), "request": {"method": "PUT", "url": f"Appointment/{aid}", "ifMatch": etag}},
            {"request": {"method": "GET", "url": f"Encounter?appointment=Appointment/{aid}"}},
        ]}  # fmt: skip
        answer = (await http.post("", json=batch, headers={"Prefer": "return=representation"})).json()
        assert answer["type"] == "batch-response"
        assert [e["response"]["status"] for e in answer["entry"]] == ["200", "412", "200"]
        assert answer["entry"][0]["resource"]["id"] == aid and answer["entry"][2]["resource"]["type"] == "searchset"

        current = (await http.get(f"/Encounter/{enc['id']}")).json()
        transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": current | {"status": "cancelled"}, "request": {"method": "PUT", "url": f"Encounter/{enc['id']}", "ifMatch": f'W/"{current["meta"]["versionId"]}"'}},
        ]}  # fmt: skip
        done = await http.post("", json=transaction, headers={"Prefer": "return=representation"})
        assert done.status_code == 200 and done.json()["type"] == "transaction-response"
        assert done.json()["entry"][0]["response"]["status"] == "200" and done.json()["entry"][0]["resource"]["status"] == "cancelled"

        assert (await http.delete(f"/Claim/{claim['id']}")).status_code == 200
        assert (await http.get(f"/Claim/{claim['id']}")).status_code == 404


async def test_what_the_server_does_not_honour(fhir_server: FHIRServer, practitioner: str) -> None:
    """The gaps tests/fhir_server/README.md lists, measured so an upgrade that closes one is noticed."""
    patient = await ensure_patient(fhir_server, "p-" + uuid.uuid4().hex[:8])
    appt = await create(
        fhir_server,
        {"resourceType": "Appointment", "status": "booked", "participant": [{"actor": {"reference": practitioner}, "status": "accepted"}]},
    )
    enc = await create(fhir_server, encounter(patient, appt["id"]))
    await create(fhir_server, charge_item(patient, enc["id"]))
    async with fhir_server.http() as http:
        # /metadata is routed as a search of a resource type "metadata": no CapabilityStatement
        meta = (await http.get("/metadata")).json()
        assert meta["resourceType"] == "Bundle" and meta.get("total") == 0
        # _revinclude and _include are accepted and ignored
        rev = await http.get("/Encounter", params={"appointment": f"Appointment/{appt['id']}", "_revinclude": "ChargeItem:context"})
        assert [e["resource"]["resourceType"] for e in rev.json()["entry"]] == ["Encounter"]
        inc = await http.get("/Encounter", params={"appointment": f"Appointment/{appt['id']}", "_include": "Encounter:appointment"})
        assert [e["resource"]["resourceType"] for e in inc.json()["entry"]] == ["Encounter"]
        # _count cuts the page, but no next link leads to the rest
        page = (await http.get("/Practitioner", params={"_count": "1"})).json()
        assert len(page["entry"]) == 1 and page["total"] > 1 and not page.get("link")
        # an unknown search parameter matches nothing instead of being refused or ignored
        unknown = (await http.get("/Appointment", params={"no-such-param": "x"})).json()
        assert unknown.get("entry") is None
        # a failed transaction is not rolled back: the entry written before the 412 stays
        current = (await http.get(f"/Encounter/{enc['id']}")).json()
        failing = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": current | {"status": "cancelled"}, "request": {"method": "PUT", "url": f"Encounter/{enc['id']}", "ifMatch": f'W/"{current["meta"]["versionId"]}"'}},
            {"resource": appt | {"status": "cancelled"}, "request": {"method": "PUT", "url": f"Appointment/{appt['id']}", "ifMatch": 'W/"stale"'}},
        ]}  # fmt: skip
        assert (await http.post("", json=failing)).status_code == 412
        assert (await http.get(f"/Encounter/{enc['id']}")).json()["status"] == "cancelled"
        assert (await http.get(f"/Appointment/{appt['id']}")).json()["status"] == "booked"
        # a Subscription is stored as a plain resource: never activated, so it never notifies
        sub = await create(fhir_server, {"resourceType": "Subscription", "status": "requested", "reason": "test", "criteria": "Appointment",
                                         "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/notify"}})  # fmt: skip
        assert (await http.get(f"/Subscription/{sub['id']}")).json()["status"] == "requested"
        # resources are not validated against R4 (an unknown element is stored as sent)
        assert (await create(fhir_server, {"resourceType": "Patient", "notAnR4Element": 1}))["notAnR4Element"] == 1


# --- the connector's own reads and writes ---------------------------------------------------------


async def test_stale_write_is_a_conflict_and_a_gone_record_is_deleted(
    fhir_server: FHIRServer, practitioner: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A write over a copy staff just changed is a conflict, and an appointment deleted in the EHR reads as deleted."""
    from syncbridge.connector import Link
    from syncbridge.errors import ConflictError

    harness = third_party_harness(fhir_server, practitioner, monkeypatch)
    async with world_for(harness, tmp_path) as world:
        start = next_weekday_at(9)
        ext = await harness.vendor.book(start, start + timedelta(minutes=50), "client-" + uuid.uuid4().hex[:6])
        obs = await world.connector.read(ext)
        assert parse_iso(obs.fields["start"]) == start
        await harness.vendor.retitle(ext, "moved room")
        link = Link(harness.name, "sb-x", ext, obs.etag, obs.fields)
        with pytest.raises(ConflictError):
            await world.connector.apply("sb-x", obs.fields | {"location": "Room 9"}, link)
        async with fhir_server.http() as http:
            assert (await http.delete(f"/Appointment/{ext}")).status_code == 200
        assert (await world.connector.read(ext)).deleted


# --- claim suppression (DESIGN section 6) on a server that ignores _revinclude ---------------------

def encounter(patient: str, appointment_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "planned",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": patient},
        "appointment": [{"reference": f"Appointment/{appointment_id}"}],
    }


def charge_item(patient: str, encounter_id: str) -> dict[str, Any]:
    return {
        "resourceType": "ChargeItem",
        "status": "billable",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "90837"}]},
        "subject": {"reference": patient},
        "context": {"reference": f"Encounter/{encounter_id}"},
    }


def claim_for(patient: str, practitioner: str, encounter_id: str, status: str) -> dict[str, Any]:
    return {
        "resourceType": "Claim",
        "status": status,
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim",
        "patient": {"reference": patient},
        "created": datetime.now(UTC).date().isoformat(),
        "provider": {"reference": practitioner},
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Acme Health PPO"}}],
        "item": [
            {
                "sequence": 1,
                "productOrService": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "90837"}]},
                "encounter": [{"reference": f"Encounter/{encounter_id}"}],
            }
        ],
    }


@pytest.fixture
async def billing_world(
    fhir_server: FHIRServer, practitioner: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[World]:
    async with world_for(third_party_harness(fhir_server, practitioner, monkeypatch), tmp_path) as w:
        yield w


async def billed_session(world: World, server: FHIRServer, practitioner: str, hour: int = 10, claim_status: str = "draft") -> dict[str, Any]:
    """A session mirrored to the EHR and billed there as check-in and billing staff would."""
    appt_id = world.book_here(next_weekday_at(hour))
    await world.drain()
    ext = world.external_id(appt_id)
    patient = await ensure_patient(server, world.store.appointment(appt_id).fields["client_key"])
    enc = await create(server, encounter(patient, ext))
    item = await create(server, charge_item(patient, enc["id"]))
    claim = await create(server, claim_for(patient, practitioner, enc["id"], claim_status))
    return {"appointment_id": appt_id, "appointment": ext, "encounter": enc["id"], "charge": item["id"], "claim": claim}


async def cancelled_with_billing(world: World, server: FHIRServer, practitioner: str, claim_status: str = "draft") -> dict[str, Any]:
    """A billed session, then cancelled in the record."""
    ids = await billed_session(world, server, practitioner, claim_status=claim_status)
    world.cancel_here(ids["appointment_id"])
    await world.drain()
    await world.sync()
    return ids


async def test_cancel_cancels_the_appointment_and_its_open_encounter(
    billing_world: World, fhir_server: FHIRServer, practitioner: str
) -> None:
    """A session cancelled in the record is cancelled in the EHR with its reason, and its planned Encounter too."""
    world = billing_world
    ids = await cancelled_with_billing(world, fhir_server, practitioner)
    appt = await read(fhir_server, f"Appointment/{ids['appointment']}")
    assert appt["status"] == "cancelled"
    assert appt["cancelationReason"]["coding"] == [{"system": FHIR_REASON_SYSTEM, "code": "pat"}]
    assert (await read(fhir_server, f"Encounter/{ids['encounter']}"))["status"] == "cancelled"
    assert world.store.dead_letters() == []


async def test_cancel_makes_the_charge_not_billable(billing_world: World, fhir_server: FHIRServer, practitioner: str) -> None:
    """The cancelled session's billable ChargeItem becomes not-billable."""
    world = billing_world
    ids = await cancelled_with_billing(world, fhir_server, practitioner)
    assert (await read(fhir_server, f"ChargeItem/{ids['charge']}"))["status"] == "not-billable"


async def test_cancel_cancels_the_draft_claim(billing_world: World, fhir_server: FHIRServer, practitioner: str) -> None:
    """The cancelled session's draft Claim is cancelled, and billing reads suppressed."""
    world = billing_world
    ids = await cancelled_with_billing(world, fhir_server, practitioner)
    assert (await read(fhir_server, f"Claim/{ids['claim']['id']}"))["status"] == "cancelled"
    assert world.store.appointment(ids["appointment_id"]).fields["billing"] == "suppressed"


async def test_active_claim_is_left_alone_and_needs_void(billing_world: World, fhir_server: FHIRServer, practitioner: str) -> None:
    """A claim already sent to the payer is untouched; billing shows needs_void and a worklist item asks to void it."""
    world = billing_world
    ids = await cancelled_with_billing(world, fhir_server, practitioner, claim_status="active")
    after = await read(fhir_server, f"Claim/{ids['claim']['id']}")
    assert after["status"] == "active" and after["meta"]["versionId"] == ids["claim"]["meta"]["versionId"]
    assert world.store.appointment(ids["appointment_id"]).fields["billing"] == "needs_void"
    assert [w.appointment_id for w in world.store.worklist() if w.kind == "void_claim"] == [ids["appointment_id"]]


async def _cancel_with(world: World, appt_id: str, kind: str, status: str) -> None:
    from syncbridge.model import iso

    record = {"by": "client", "kind": kind, "fee": "charge", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)), "via": "test"}
    world.engine.change(appt_id, dict(world.store.appointment(appt_id).fields) | {"status": status, "cancellation": record}, via="test")
    await world.drain()
    await world.sync()


async def _fees(server: FHIRServer, appt_id: str) -> list[dict[str, Any]]:
    async with server.http() as http:
        r = await http.get("/ChargeItem", params={"identifier": f"urn:syncbridge:fee|{appt_id}"})
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", [])]


@pytest.mark.parametrize(("kind", "status", "code"), [("late_cancel", "cancelled", "LATE-CANCEL-FEE"), ("no_show", "noshow", "NO-SHOW-FEE")])
async def test_fee_is_one_self_pay_charge_off_the_claim(
    billing_world: World, fhir_server: FHIRServer, practitioner: str, kind: str, status: str, code: str
) -> None:
    """A charged late cancel or no-show: the insurance charge is not-billable, the draft claim cancelled,
    and one self-pay fee with its own code exists, attached to no Encounter a claim builder reads."""
    world = billing_world
    ids = await billed_session(world, fhir_server, practitioner, hour=15)
    appt_id = ids["appointment_id"]
    await _cancel_with(world, appt_id, kind, status)
    assert (await read(fhir_server, f"Appointment/{ids['appointment']}"))["status"] == status
    assert (await read(fhir_server, f"ChargeItem/{ids['charge']}"))["status"] == "not-billable"
    assert (await read(fhir_server, f"Claim/{ids['claim']['id']}"))["status"] == "cancelled"
    (fee,) = await _fees(fhir_server, appt_id)
    assert fee["status"] == "billable" and fee["code"]["coding"][0]["code"] == code
    assert "context" not in fee and "account" not in fee
    assert world.store.appointment(appt_id).fields["billing"] == "fee_self_pay"
    await world.drain()
    assert len(await _fees(fhir_server, appt_id)) == 1  # applied again, still one


async def test_rebooked_session_has_its_fee_withdrawn(billing_world: World, fhir_server: FHIRServer) -> None:
    """Staff book a late-cancelled session again in the EHR: its self-pay fee is no longer billable."""
    world = billing_world
    appt_id = world.book_here(next_weekday_at(16))
    await world.drain()
    await _cancel_with(world, appt_id, "late_cancel", "cancelled")
    (fee,) = await _fees(fhir_server, appt_id)
    assert fee["status"] == "billable"
    ext = world.external_id(appt_id)
    await world.vendor._edit(ext, lambda a: (a.update(status="booked"), a.pop("cancelationReason", None)))
    await world.sync()
    await world.drain()
    await world.sync()
    assert (await read(fhir_server, f"ChargeItem/{fee['id']}"))["status"] == "not-billable"
    assert world.store.appointment(appt_id).fields["status"] == "booked"
    assert world.store.appointment(appt_id).fields["billing"] == "pending"


async def test_ehr_side_delete_is_found_and_closes_the_link(billing_world: World, fhir_server: FHIRServer) -> None:
    """Staff delete an Appointment: the presence check finds it gone and the session is cancelled;
    nothing is dead-lettered."""
    world = billing_world
    keep = world.book_here(next_weekday_at(8))
    gone = world.book_here(next_weekday_at(12))
    await world.drain()
    await world.sync()
    async with fhir_server.http() as http:
        assert (await http.delete(f"/Appointment/{world.external_id(gone)}")).status_code == 200
    world.engine._presence_at.clear()
    await world.sync()
    assert world.store.appointment(gone).fields["status"] == "cancelled"
    assert world.store.appointment(keep).fields["status"] == "booked"
    await world.drain()
    assert world.store.dead_letters() == []
