"""Claim suppression (DESIGN section 6): a session that did not happen must never reach a payer.

Planned by the connector when it writes a cancelled or no-show Appointment, in two requests
whatever the billing record holds (https://hl7.org/fhir/R4/http.html#transaction): one ``batch``
Bundle reads the Appointment and its billing resources (:func:`billing_reads`), then one
``transaction`` Bundle writes the Appointment with its billing outcome and every billing change
:func:`plan` lists, all or nothing. Each change is a PUT under ``ifMatch`` of the version read,
so re-applying changes nothing and a biller's concurrent edit is never overwritten (the whole
transaction fails with 412: ConflictError, and the outbox retries after re-reading).

Links followed (the usual R4 shape): Encounter.appointment -> Appointment, ChargeItem.context ->
Encounter, Claim.item.encounter -> Encounter, read in one search with ``_revinclude``
(search.html#revinclude). The late-cancel or no-show fee is a self-pay ChargeItem identified by
``FEE_SYSTEM|<canonical id>`` (conditional create: ``ifNoneExist``), with no Account, Coverage or
Claim: it is billed to the client, never to insurance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncbridge.model import Billing, CancelKind, Fee

from .client import search_url

__all__ = ["FEE_CODE_SYSTEM", "FEE_SYSTEM", "OPEN_ENCOUNTER", "Plan", "billing_reads", "plan"]

FEE_SYSTEM = "urn:syncbridge:fee"
FEE_CODE_SYSTEM = "urn:syncbridge:fee-code"
#: Encounter states that are not final yet (R4 encounter-status); finished ones are left alone
OPEN_ENCOUNTER = frozenset({"planned", "arrived", "triaged", "in-progress"})
_CHARGEABLE = frozenset({"planned", "billable"})


def _etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def _is_fee(item: dict[str, Any]) -> bool:
    return any(i.get("system") == FEE_SYSTEM for i in item.get("identifier", []))


def billing_reads(external_id: str, appointment_id: str) -> list[dict[str, Any]]:
    """Batch entries reading what suppression needs: the Encounters of the Appointment with their
    ChargeItems and Claims, and the self-pay fee of this appointment."""
    ref = f"Appointment/{external_id}"
    related = search_url("Encounter", {"appointment": ref}) + "&_revinclude=ChargeItem:context&_revinclude=Claim:encounter"
    fee = search_url("ChargeItem", {"identifier": f"{FEE_SYSTEM}|{appointment_id}"})
    return [{"request": {"method": "GET", "url": related}}, {"request": {"method": "GET", "url": fee}}]


@dataclass
class Plan:
    """What suppression writes: transaction entries, audit lines, and the canonical billing state."""

    billing: str
    writes: list[dict[str, Any]] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    #: index in ``writes`` of the fee's conditional create (its id is known once it is written)
    fee_create: int | None = None


def plan(
    *,
    appointment: dict[str, Any],
    appointment_id: str,
    related: list[dict[str, Any]],
    fees: list[dict[str, Any]],
    cancellation: dict[str, Any] | None,
    client_key: str | None,
    fee_code: str,
    fee_amount: float = 0.0,
) -> Plan:
    """The billing changes a cancelled Appointment needs, from what :func:`billing_reads` found.

    Pure: re-planning from what the writes left behind plans nothing.
    """
    out = Plan(billing=Billing.SUPPRESSED.value)
    written: set[str] = set()

    def set_status(resource: dict[str, Any], status: str) -> dict[str, Any]:
        key = f"{resource['resourceType']}/{resource['id']}"
        if resource.get("status") == status or key in written:
            return resource
        written.add(key)
        changed = {k: v for k, v in resource.items() if k != "meta"} | {"status": status}
        out.steps.append(f"{key} {status}")
        out.writes.append({"resource": changed, "request": {"method": "PUT", "url": key, "ifMatch": _etag(resource)}})
        return changed

    ref = f"Appointment/{appointment['id']}"
    encounters = [
        r for r in related if r.get("resourceType") == "Encounter" and ref in (a.get("reference") for a in r.get("appointment", []))
    ]
    items = [r for r in related if r.get("resourceType") == "ChargeItem" and not _is_fee(r)]
    claims = [r for r in related if r.get("resourceType") == "Claim"]
    for i, enc in enumerate(encounters):
        if enc.get("status") in OPEN_ENCOUNTER:
            encounters[i] = set_status(enc, "cancelled")

    needs_void = False
    seen_claims: set[str] = set()
    for enc in encounters:
        enc_ref = f"Encounter/{enc['id']}"
        for item in items:
            if item.get("context", {}).get("reference") != enc_ref:
                continue
            if item.get("status") in _CHARGEABLE:
                set_status(item, "not-billable")
            elif item.get("status") == "billed":
                needs_void = True  # already on a claim that went out
        for claim in claims:
            named = {e.get("reference") for it in claim.get("item", []) for e in it.get("encounter", [])}
            if enc_ref not in named or claim["id"] in seen_claims:
                continue
            seen_claims.add(claim["id"])
            if claim.get("status") == "draft":
                set_status(claim, "cancelled")
            elif claim.get("status") == "active":
                needs_void = True  # sent to the payer: only a person can void or replace it
                out.steps.append(f"Claim/{claim['id']} active: left for a person to void")

    record = cancellation or {}
    wants_fee = record.get("fee") == Fee.CHARGE and record.get("kind") in (CancelKind.LATE_CANCEL, CancelKind.NO_SHOW)
    if wants_fee and not fees:
        fee = _fee_item(appointment, appointment_id, client_key, encounters, fee_code, fee_amount, record)
        out.fee_create = len(out.writes)
        out.writes.append({"resource": fee, "request": {"method": "POST", "url": "ChargeItem", "ifNoneExist": f"identifier={FEE_SYSTEM}|{appointment_id}"}})
    elif not wants_fee:
        for item in fees:  # the fee was waived after it was charged
            if item.get("status") in _CHARGEABLE:
                set_status(item, "not-billable")
    if needs_void:
        out.billing = Billing.NEEDS_VOID.value
    elif wants_fee:
        out.billing = Billing.FEE_SELF_PAY.value
    return out


def _fee_item(
    appointment: dict[str, Any],
    appointment_id: str,
    client_key: str | None,
    encounters: list[dict[str, Any]],
    fee_code: str,
    amount: float,
    record: dict[str, Any],
) -> dict[str, Any]:
    """A self-pay ChargeItem: subject the client, no Account/Coverage, so it never joins a claim."""
    kind = "no-show" if record.get("kind") == CancelKind.NO_SHOW else "late cancellation"
    item: dict[str, Any] = {
        "resourceType": "ChargeItem",
        "identifier": [{"system": FEE_SYSTEM, "value": appointment_id}],
        "status": "billable",
        "code": {"coding": [{"system": FEE_CODE_SYSTEM, "code": fee_code}], "text": f"{kind} fee (self-pay)"},
        "occurrenceDateTime": appointment.get("start"),
        "supportingInformation": [{"reference": f"Appointment/{appointment['id']}"}],
        "note": [{"text": "self-pay fee set by syncbridge practice policy; bill the client, not insurance"}],
    }
    if client_key:
        item["subject"] = {"reference": f"Patient/{client_key}"}
    if encounters:
        item["context"] = {"reference": f"Encounter/{encounters[0]['id']}"}
    if amount:
        item["priceOverride"] = {"value": amount, "currency": "USD"}
    return item
