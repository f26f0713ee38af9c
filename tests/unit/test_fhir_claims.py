"""Claim suppression and SMART auth of the FHIR connector, through Engine and Outbox (DESIGN section 6).

Billing resources are seeded the way an EHR's check-in and billing staff would create them:
an Encounter pointing at the Appointment, ChargeItems in that Encounter, Claims whose items name it.
"""

from __future__ import annotations

import contextlib

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.errors import AuthError
from syncbridge.model import iso
from syncbridge.outbox import Outbox
from syncbridge.policy.cancellation import FHIR_REASON_SYSTEM
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.fhir.claims import FEE_SYSTEM
from syncbridge_connectors.fhir.emulator import FHIREmulator, running
from tests.contract.suite import CLINICIAN, ZONE, World, next_weekday_at
from tests.contract.test_fhir import PRACTITIONER, TOKEN, fhir_harness, fhir_server  # noqa: F401

NAME = "ehr"


async def _world(config: dict[str, Any], account: dict[str, Any], tmp_path: Path, vendor: Any = None) -> World:
    cfg = parse_config(
        yaml.safe_dump(
            {
                "practice": {"timezone": ZONE},
                "store": {"path": str(tmp_path / "claims.db")},
                "clinicians": {CLINICIAN: {"accounts": {NAME: account}}},
                "connectors": {NAME: config},
                "outbox": {"backoff_base": 0.05, "backoff_max": 0.2, "max_attempts": 6},
            }
        )
    )
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    return World(store, engine, Outbox(engine), connectors[NAME], vendor)


@pytest.fixture
async def world(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[World]:  # noqa: F811
    harness = fhir_harness(fhir_server, monkeypatch)
    w = await _world(harness.connector_config, harness.account, tmp_path, harness.vendor)
    try:
        yield w
    finally:
        await w.connector.close()
        w.store.close()


def emu(world: World) -> FHIREmulator:
    return world.vendor.emulator


async def booked_with_billing(world: World, claim_status: str = "draft") -> tuple[str, str, dict[str, str]]:
    """A session in the EHR with the Encounter, ChargeItem and Claim billing staff would have made."""
    appt_id = world.book_here(next_weekday_at(10))
    await world.drain()
    ext = world.external_id(appt_id)
    patient = {"reference": f"Patient/{world.store.appointment(appt_id).fields['client_key']}"}
    e = emu(world)
    enc = e.put({"resourceType": "Encounter", "status": "planned", "subject": patient, "appointment": [{"reference": f"Appointment/{ext}"}]})
    enc_ref = {"reference": f"Encounter/{enc['id']}"}
    charge = e.put({"resourceType": "ChargeItem", "status": "billable", "subject": patient, "context": enc_ref, "code": {"text": "90837"}})
    claim = e.put(
        {"resourceType": "Claim", "status": claim_status, "use": "claim", "patient": patient, "item": [{"sequence": 1, "encounter": [enc_ref]}]}
    )
    return appt_id, ext, {"encounter": enc["id"], "charge": charge["id"], "claim": claim["id"]}


def counts(world: World) -> dict[str, int]:
    return {t: len(emu(world).all(t)) for t in ("Appointment", "Encounter", "ChargeItem", "Claim")}


async def test_cancelled_session_is_never_billed(world: World) -> None:
    """Cancelling a session cancels it in the EHR with the reason and stops its charge and draft claim."""
    appt_id, ext, ids = await booked_with_billing(world)
    world.cancel_here(appt_id)
    await world.drain()
    e = emu(world)
    appt = e.get("Appointment", ext)
    assert appt["status"] == "cancelled"
    assert appt["cancelationReason"]["coding"] == [{"system": FHIR_REASON_SYSTEM, "code": "pat"}]
    assert e.get("Encounter", ids["encounter"])["status"] == "cancelled"
    assert e.get("ChargeItem", ids["charge"])["status"] == "not-billable"
    assert e.get("Claim", ids["claim"])["status"] == "cancelled"
    assert counts(world) == {"Appointment": 1, "Encounter": 1, "ChargeItem": 1, "Claim": 1}
    await world.sync()
    assert world.store.appointment(appt_id).fields["billing"] == "suppressed"
    (applied,) = [a for a in world.store.audit_entries(appointment_id=appt_id, kind="applied") if a["detail"].get("steps")]
    assert applied["detail"]["steps"] == [
        f"Encounter/{ids['encounter']} cancelled", f"ChargeItem/{ids['charge']} not-billable", f"Claim/{ids['claim']} cancelled",
    ]


async def test_reapplying_a_cancel_changes_nothing(world: World) -> None:
    """Retrying the cancellation (a lost answer, a restart) creates and rewrites nothing in the EHR."""
    appt_id, _, _ = await booked_with_billing(world)
    world.cancel_here(appt_id)
    await world.drain()
    await world.sync()
    before = {t: emu(world).all(t) for t in ("Appointment", "Encounter", "ChargeItem", "Claim")}
    link = world.store.link(NAME, appt_id)
    desired = world.connector.capabilities.project(world.store.appointment(appt_id).fields)
    await world.connector.apply(appt_id, desired, link)
    await world.connector.apply(appt_id, desired, None)  # a create whose answer was lost
    assert {t: emu(world).all(t) for t in before} == before


def charge_fee(world: World, appt_id: str, kind: str, status: str) -> None:
    """The session ends as ``kind`` with the practice charging its fee."""
    record = {"by": "client", "kind": kind, "fee": "charge", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)), "via": "test"}
    world.engine.change(appt_id, dict(world.store.appointment(appt_id).fields) | {"status": status, "cancellation": record}, via="test")


async def test_noshow_fee_is_self_pay_only(world: World) -> None:
    """A charged no-show yields exactly one self-pay fee for the client and no insurance claim."""
    appt_id = world.book_here(next_weekday_at(11))
    await world.drain()
    appt = world.store.appointment(appt_id)
    charge_fee(world, appt_id, "no_show", "noshow")
    await world.drain()
    await world.drain()
    fees = emu(world).all("ChargeItem")
    assert len(fees) == 1
    fee = fees[0]
    assert fee["identifier"] == [{"system": FEE_SYSTEM, "value": appt_id}]
    assert fee["status"] == "billable" and fee["subject"] == {"reference": f"Patient/{appt.fields['client_key']}"}
    assert fee["code"]["coding"][0]["code"] == "NO-SHOW-FEE"  # its own code, not the late-cancel fee's
    assert "account" not in fee and "context" not in fee and emu(world).all("Claim") == []
    assert emu(world).get("Appointment", world.external_id(appt_id))["status"] == "noshow"
    await world.sync()
    assert world.store.appointment(appt_id).fields["billing"] == "fee_self_pay"
    await world.drain()
    assert len(emu(world).all("ChargeItem")) == 1


async def test_claim_already_sent_is_flagged_not_touched(world: World) -> None:
    """A claim that already went to the payer is left alone; billing shows needs_void and a worklist item asks to void it."""
    appt_id, _, ids = await booked_with_billing(world, claim_status="active")
    claim_before = emu(world).get("Claim", ids["claim"])
    world.cancel_here(appt_id)
    await world.drain()
    assert emu(world).get("Claim", ids["claim"]) == claim_before
    await world.sync()
    assert world.store.appointment(appt_id).fields["billing"] == "needs_void"
    (item,) = [w for w in world.store.worklist() if w.kind == "void_claim"]
    assert item.appointment_id == appt_id and "Void or replace the claim with the payer" in item.instruction


async def test_ehr_staff_cancel_also_suppresses(world: World) -> None:
    """A session cancelled by front-desk staff in the EHR has its draft claim cancelled too."""
    appt_id, ext, ids = await booked_with_billing(world)
    await world.sync()
    await world.vendor.delete(ext)
    await world.sync()
    assert world.store.appointment(appt_id).fields["cancellation"]["by"] == "client"
    await world.drain()
    assert emu(world).get("Claim", ids["claim"])["status"] == "cancelled"
    await world.sync()
    assert world.store.appointment(appt_id).fields["billing"] == "suppressed"


# --- SMART Backend Services ------------------------------------------------------------------


def _pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def _public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@contextlib.asynccontextmanager
async def smart_world(tmp_path: Path, signing_key: rsa.RSAPrivateKey | None = None) -> AsyncIterator[tuple[World, Any]]:
    """An EHR emulator with a registered backend app, and a connector signing with ``signing_key``
    (the registered key when None)."""
    registered = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = running(FHIREmulator())
    server.emulator.register_client("syncbridge-test", _public(registered))
    (tmp_path / "key.pem").write_text(_pem(signing_key or registered))
    config = {"type": "fhir", "base_url": server.base_url, "auth": "smart-backend", "client_id": "syncbridge-test",
              "private_key": {"file": str(tmp_path / "key.pem")}}
    world = await _world(config, {"practitioner": PRACTITIONER}, tmp_path)
    try:
        yield world, server
    finally:
        await world.connector.close()
        world.store.close()
        server.stop()


async def test_smart_backend_services_token(tmp_path: Path) -> None:
    """With the registered key the connector gets an access token and reads the EHR."""
    async with smart_world(tmp_path) as (world, server):
        result = await world.connector.pull(None)
        assert result.complete and result.observations == []
        assert ("POST", "/auth/token") in server.emulator.log


async def test_smart_token_revoked_early_is_renewed(tmp_path: Path) -> None:
    """An access token the EHR revokes before it expires is replaced once, without an outage."""
    async with smart_world(tmp_path) as (world, server):
        await world.connector.pull(None)
        server.emulator.revoke_tokens()
        await world.connector.pull(None)
        assert server.emulator.log.count(("POST", "/auth/token")) == 2


async def test_smart_wrong_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A private key that does not match the registered one fails with a message saying what to register."""
    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with smart_world(tmp_path, wrong) as (world, _):
        with pytest.raises(AuthError) as err:
            await world.connector.pull(None)
        assert "signature" in str(err.value)
        assert "public key" in err.value.action and "client_id" in err.value.action


async def test_session_deleted_in_calendar_is_never_billed(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: F811
    """A therapist deletes the session in their calendar: the EHR cancels it and suppresses its charge and draft claim."""
    from tests.support.replica import ReplicaVendor

    harness = fhir_harness(fhir_server, monkeypatch)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "practice.db")},
        "clinicians": {CLINICIAN: {"accounts": {NAME: harness.account, "cal": {}}}},
        "connectors": {NAME: harness.connector_config, "cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "cal.db")}},
    }))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    world = World(store, engine, Outbox(engine), connectors[NAME], harness.vendor)
    try:
        appt_id, ext, ids = await booked_with_billing(world)
        assert store.link("cal", appt_id) is not None
        await engine.sync("cal")
        claims_before = len(emu(world).all("Claim"))
        await ReplicaVendor(str(tmp_path / "cal.db")).delete(store.link("cal", appt_id).external_id)
        await engine.sync("cal")
        await world.drain()
        e = emu(world)
        assert e.get("Appointment", ext)["status"] == "cancelled"
        assert e.get("Encounter", ids["encounter"])["status"] == "cancelled"
        assert e.get("ChargeItem", ids["charge"])["status"] == "not-billable"
        assert e.get("Claim", ids["claim"])["status"] == "cancelled"
        assert len(e.all("Claim")) == claims_before  # no claim was created
        await engine.sync(NAME)
        assert store.appointment(appt_id).fields["billing"] == "suppressed"
        assert store.appointment(appt_id).fields["cancellation"]["via"] == "cal"
    finally:
        for c in connectors.values():
            await c.close()
        store.close()


async def test_cancellation_with_billing_costs_at_most_three_requests(world: World, fhir_server: Any) -> None:  # noqa: F811
    """Cancelling a session with an Encounter, a charge and a draft claim, verification included:
    two requests where the EHR honours _revinclude, three where it does not."""
    appt_id, _, ids = await booked_with_billing(world)
    await world.connector.discovery.decide(world.connector.client())  # once per daemon, at start
    fhir_server.injector.reset_counts()
    world.cancel_here(appt_id)
    await world.drain()
    assert fhir_server.injector.requests == (2 if emu(world).revinclude else 3)
    assert emu(world).get("Claim", ids["claim"])["status"] == "cancelled"
    assert emu(world).get("ChargeItem", ids["charge"])["status"] == "not-billable"
    assert ("revinclude" in world.connector.discovery.describe) == emu(world).revinclude


async def test_biller_edit_during_cancel_leaves_nothing_half_done(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A biller touching the claim between our read and our write: nothing is written, the retry finishes the job."""
    appt_id, ext, ids = await booked_with_billing(world)
    client = world.connector.client()
    real = client.bundle
    raced: list[str] = []

    async def racing(kind: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if kind == "transaction" and not raced:
            raced.append(kind)  # the biller saves the claim just before our write: it is refused whole
            emu(world).put(emu(world).get("Claim", ids["claim"]) | {"priority": {"text": "normal"}})
        return await real(kind, entries)

    monkeypatch.setattr(client, "bundle", racing)
    world.cancel_here(appt_id)
    await world.drain()
    e = emu(world)
    assert raced and e.get("Claim", ids["claim"])["status"] == "cancelled"
    assert e.get("Claim", ids["claim"])["priority"] == {"text": "normal"}  # the biller's edit survived
    assert e.get("Encounter", ids["encounter"])["meta"]["versionId"] == "2"  # written once, by the retry
    assert e.get("Appointment", ext)["status"] == "cancelled"


# --- verified, never assumed -------------------------------------------------------------------


def attention_items(world: World, appt_id: str) -> list[Any]:
    return [w for w in world.store.worklist() if w.kind == "needs_attention" and w.appointment_id == appt_id]


async def test_charge_that_cannot_be_changed_is_never_reported_suppressed(world: World) -> None:
    """A charge the EHR refuses to change: the session is cancelled, the rest suppressed, billing says
    needs_attention (never suppressed) and a worklist item names the charge that is still live."""
    appt_id, ext, ids = await booked_with_billing(world)
    emu(world).locked[("ChargeItem", ids["charge"])] = 422
    world.cancel_here(appt_id)
    await world.drain()
    await world.sync()
    e = emu(world)
    assert e.get("Appointment", ext)["status"] == "cancelled"
    assert e.get("Encounter", ids["encounter"])["status"] == "cancelled"
    assert e.get("Claim", ids["claim"])["status"] == "cancelled"
    assert e.get("ChargeItem", ids["charge"])["status"] == "billable"
    assert world.store.appointment(appt_id).fields["billing"] == "needs_attention"
    (item,) = attention_items(world, appt_id)
    assert f"ChargeItem/{ids['charge']} is not not-billable" in item.instruction
    assert [a for a in world.store.audit_entries(appointment_id=appt_id, kind="needs_attention")]
    assert world.store.dead_letters() == []


async def test_change_accepted_but_not_made_is_not_suppressed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EHR that answers 200 to the charge's update but keeps it billable: what the answer shows
    counts, so billing is needs_attention and the charge is on the worklist."""
    appt_id, _, ids = await booked_with_billing(world)
    e = emu(world)
    real = e.update

    def stubborn(rtype: str, rid: str, body: dict[str, Any], if_match: str | None) -> Any:
        if rtype == "ChargeItem":
            body = body | {"status": "billable"}  # a billing rule of the EHR's keeps it billable
        return real(rtype, rid, body, if_match)

    monkeypatch.setattr(e, "update", stubborn)
    world.cancel_here(appt_id)
    await world.drain()
    await world.sync()
    assert world.store.appointment(appt_id).fields["billing"] == "needs_attention"
    (item,) = attention_items(world, appt_id)
    assert f"ChargeItem/{ids['charge']} is still billable" in item.instruction
    assert e.get("Appointment", world.external_id(appt_id))["status"] == "cancelled"


async def test_refused_search_is_needs_attention(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EHR that refuses the Claim search: the claims could not be checked, so billing is not
    reported suppressed and the worklist says which search was refused."""
    appt_id, _, _ = await booked_with_billing(world)
    e = emu(world)
    real = e.search

    def no_claim_search(rtype: str, params: list[tuple[str, str]], self_url: str) -> Any:
        if rtype == "Claim":
            from syncbridge_connectors.fhir.emulator_answers import issue

            return issue(400, "not-supported", "search parameter encounter is not supported")
        return real(rtype, params, self_url)

    monkeypatch.setattr(e, "search", no_claim_search)
    e.revinclude = False  # the claims come only from the plain search
    world.connector.discovery.revinclude = None
    world.cancel_here(appt_id)
    await world.drain()
    await world.sync()
    assert world.store.appointment(appt_id).fields["billing"] == "needs_attention"
    (item,) = attention_items(world, appt_id)
    assert "refused the search for this session's Claims" in item.instruction


async def test_rebooked_session_owes_no_fee(world: World) -> None:
    """A late-cancelled session with a self-pay fee that the EHR books again: the fee is withdrawn."""
    appt_id = world.book_here(next_weekday_at(11))
    await world.drain()
    charge_fee(world, appt_id, "late_cancel", "cancelled")
    await world.drain()
    await world.sync()
    (fee,) = emu(world).all("ChargeItem")
    assert fee["status"] == "billable" and world.store.appointment(appt_id).fields["billing"] == "fee_self_pay"
    ext = world.external_id(appt_id)
    await world.vendor._edit(ext, lambda a: (a.update(status="booked"), a.pop("cancelationReason", None)))  # staff re-book it
    await world.sync()
    assert world.store.appointment(appt_id).fields["status"] == "booked"
    await world.drain()
    await world.sync()
    assert emu(world).get("ChargeItem", fee["id"])["status"] == "not-billable"
    assert world.store.appointment(appt_id).fields["billing"] == "pending"
    assert emu(world).get("Appointment", ext)["status"] == "booked"
    (applied,) = [a for a in world.store.audit_entries(appointment_id=appt_id, kind="applied") if f"ChargeItem/{fee['id']} not-billable" in a["detail"].get("steps", [])]
    assert applied


async def test_write_to_deleted_appointment_closes_the_link(world: World) -> None:
    """EHR staff delete an Appointment; a later move of that session finds it gone: the link is
    closed and the session cancelled, never a dead letter."""
    appt_id = world.book_here(next_weekday_at(9))
    await world.drain()
    ext = world.external_id(appt_id)
    with emu(world)._lock:
        emu(world).delete("Appointment", ext)
    world.move_here(appt_id, next_weekday_at(13))
    await world.drain()
    assert world.store.dead_letters() == []
    assert world.store.link(NAME, appt_id).gone
    assert world.store.appointment(appt_id).fields["status"] == "cancelled"


async def test_ehr_side_delete_reaches_the_calendar(fhir_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: F811
    """Staff delete an Appointment in the EHR (no search ever shows it again): the next presence
    check finds it gone and the session leaves the clinician's calendar. With the defaults (a pull a
    minute, a check every 3 minutes) that is within 4 minutes."""
    from tests.support.replica import ReplicaVendor

    harness = fhir_harness(fhir_server, monkeypatch)
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "practice.db")},
        "clinicians": {CLINICIAN: {"accounts": {NAME: harness.account, "cal": {}}}},
        "connectors": {NAME: harness.connector_config, "cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "cal.db")}},
    }))
    assert cfg.connectors[NAME].poll_interval + build_connectors(cfg)[NAME].presence_interval <= 240
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    world = World(store, engine, Outbox(engine), connectors[NAME], harness.vendor)
    try:
        keep = world.book_here(next_weekday_at(9))
        gone = world.book_here(next_weekday_at(11))
        await world.drain()
        await engine.sync(NAME)  # a full listing: it sees for itself what is there
        await engine.sync(NAME)  # the first presence check: both there
        cal = ReplicaVendor(str(tmp_path / "cal.db"))
        assert len(await cal.live()) == 2
        async with httpx.AsyncClient(base_url=fhir_server.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            assert (await http.delete(f"/Appointment/{world.external_id(gone)}")).status_code == 204
        await engine.sync(NAME)
        assert store.appointment(gone).fields["status"] == "booked"  # not checked again yet
        engine._presence_at[NAME] -= connectors[NAME].presence_interval  # three minutes later
        fhir_server.injector.reset_counts()
        await engine.sync(NAME)
        assert fhir_server.injector.requests == 2  # the incremental pull and one presence batch
        assert store.appointment(gone).fields["status"] == "cancelled"
        assert store.appointment(keep).fields["status"] == "booked"
        await world.drain()
        assert [e["external_id"] for e in await cal.live()] == [store.link("cal", keep).external_id]
        assert store.dead_letters() == []
    finally:
        for c in connectors.values():
            await c.close()
        store.close()
