"""Claim suppression (DESIGN section 6): a session that did not happen must never reach a payer.

Run by the connector after it wrote a cancelled or no-show Appointment. Every step reads the
resource, changes it only if it is not already where it should be, and writes under
``If-Match`` of the version it read, so re-applying changes nothing and never overwrites a
biller's concurrent edit (a 412 becomes ConflictError and the outbox retries after re-reading).

Links followed (the usual R4 shape): Encounter.appointment -> Appointment, ChargeItem.context ->
Encounter, Claim.item.encounter -> Encounter. The late-cancel or no-show fee is a self-pay
ChargeItem identified by ``FEE_SYSTEM|<canonical id>`` (conditional create), with no Account,
Coverage or Claim: it is billed to the client, never to insurance.
"""

from __future__ import annotations

from typing import Any

from syncbridge.model import Billing, CancelKind, Fee

from .client import FHIRClient

__all__ = ["FEE_CODE_SYSTEM", "FEE_SYSTEM", "OPEN_ENCOUNTER", "suppress"]

FEE_SYSTEM = "urn:syncbridge:fee"
FEE_CODE_SYSTEM = "urn:syncbridge:fee-code"
#: Encounter states that are not final yet (R4 encounter-status); finished ones are left alone
OPEN_ENCOUNTER = frozenset({"planned", "arrived", "triaged", "in-progress"})
_CHARGEABLE = frozenset({"planned", "billable"})


def _etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def _is_fee(item: dict[str, Any]) -> bool:
    return any(i.get("system") == FEE_SYSTEM for i in item.get("identifier", []))


async def _set_status(client: FHIRClient, resource: dict[str, Any], status: str, steps: list[str]) -> dict[str, Any]:
    if resource.get("status") == status:
        return resource
    changed = {k: v for k, v in resource.items() if k != "meta"} | {"status": status}
    steps.append(f"{resource['resourceType']}/{resource['id']} {status}")
    return await client.update(changed, _etag(resource))


async def suppress(
    client: FHIRClient,
    *,
    appointment: dict[str, Any],
    appointment_id: str,
    cancellation: dict[str, Any] | None,
    client_key: str | None,
    fee_code: str,
    fee_amount: float = 0.0,
    steps: list[str] | None = None,
) -> str:
    """Converge the billing resources of a cancelled Appointment; returns the canonical billing state.

    Every change made is appended to ``steps`` (for the audit); re-running makes none.
    """
    steps = [] if steps is None else steps
    ref = f"Appointment/{appointment['id']}"
    encounters = [e async for e in client.search("Encounter", {"appointment": ref})]
    for i, enc in enumerate(encounters):
        if enc.get("status") in OPEN_ENCOUNTER:
            encounters[i] = await _set_status(client, enc, "cancelled", steps)

    needs_void = False
    for enc in encounters:
        enc_ref = f"Encounter/{enc['id']}"
        async for item in client.search("ChargeItem", {"context": enc_ref}):
            if _is_fee(item):
                continue
            if item.get("status") in _CHARGEABLE:
                await _set_status(client, item, "not-billable", steps)
            elif item.get("status") == "billed":
                needs_void = True  # already on a claim that went out
        async for claim in client.search("Claim", {"encounter": enc_ref}):
            if claim.get("status") == "draft":
                await _set_status(client, claim, "cancelled", steps)
            elif claim.get("status") == "active":
                needs_void = True  # sent to the payer: only a person can void or replace it
                steps.append(f"Claim/{claim['id']} active: left for a person to void")

    record = cancellation or {}
    wants_fee = record.get("fee") == Fee.CHARGE and record.get("kind") in (CancelKind.LATE_CANCEL, CancelKind.NO_SHOW)
    existing = [f async for f in client.search("ChargeItem", {"identifier": f"{FEE_SYSTEM}|{appointment_id}"})]
    if wants_fee and not existing:
        fee = _fee_item(appointment, appointment_id, client_key, encounters, fee_code, fee_amount, record)
        existing = [await client.create(fee, if_none_exist=f"identifier={FEE_SYSTEM}|{appointment_id}")]
        steps.append(f"ChargeItem/{existing[0]['id']} self-pay fee created")
    elif not wants_fee:
        for item in existing:  # the fee was waived after it was charged
            if item.get("status") in _CHARGEABLE:
                await _set_status(client, item, "not-billable", steps)
    if needs_void:
        return Billing.NEEDS_VOID.value
    if wants_fee:
        return Billing.FEE_SELF_PAY.value
    return Billing.SUPPRESSED.value


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
