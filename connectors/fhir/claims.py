"""Claim suppression (DESIGN section 6): a session that did not happen must never reach a payer.

Level-triggered: the desired state is "no billable resource of this session is live", the
observed state is what the EHR shows. The connector finds the session's billing resources
(:func:`first_reads`, :func:`second_reads`), :func:`plan` lists the changes, one ``transaction``
Bundle writes them with the Appointment *last*, and :func:`unverified` reads the answers: an
outcome is recorded only when every answer shows it (https://hl7.org/fhir/R4/http.html#transaction).

Links followed (the usual R4 shape, each a search parameter every R4 server defines):
Encounter.appointment -> Appointment (``Encounter?appointment=``), ChargeItem.context ->
Encounter (``ChargeItem?context=``), Claim.item.encounter -> Encounter (``Claim?encounter=``).
Where the server is seen to honour ``_revinclude`` (search.html#revinclude), the Encounter search
brings the ChargeItems and Claims with it; otherwise (the default, and whenever an answer's
``self`` link does not list the parameter) they are read by a second ``batch`` of plain searches,
several Encounters at once (comma-separated values, search.html#combining).

The late-cancel or no-show fee is a self-pay ChargeItem identified by ``FEE_SYSTEM|<canonical
id>`` (conditional create: ``ifNoneExist``). It names the client as subject and the Appointment
as supporting information, and has no ``context`` (Encounter), ``account`` or Coverage: a claim
builder gathers charges by Encounter or Account, so it never lands on an insurance claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncbridge.model import Billing, CancelKind, Fee

from .client import entry_resource, entry_status, search_url

__all__ = [
    "FEE_CODE_SYSTEM",
    "FEE_SYSTEM",
    "OPEN_ENCOUNTER",
    "REVINCLUDES",
    "Found",
    "Plan",
    "fee_search",
    "first_reads",
    "found_from",
    "plan",
    "revinclude_honoured",
    "searchset",
    "second_reads",
    "unverified",
    "withdraw_fees",
]

FEE_SYSTEM = "urn:syncbridge:fee"
FEE_CODE_SYSTEM = "urn:syncbridge:fee-code"
#: Encounter states that are not final yet (R4 encounter-status); finished ones are left alone
OPEN_ENCOUNTER = frozenset({"planned", "arrived", "triaged", "in-progress"})
_CHARGEABLE = frozenset({"planned", "billable"})
#: what the Encounter search asks the server to bring along, where it honours ``_revinclude``
REVINCLUDES = ("ChargeItem:context", "Claim:encounter")


def _etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def _key(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _is_fee(item: dict[str, Any]) -> bool:
    return any(i.get("system") == FEE_SYSTEM for i in item.get("identifier", []))


def fee_search(appointment_id: str) -> str:
    return search_url("ChargeItem", {"identifier": f"{FEE_SYSTEM}|{appointment_id}"})


def first_reads(external_id: str, appointment_id: str, *, revinclude: bool) -> list[dict[str, Any]]:
    """Batch entries: the Appointment, its Encounters (with their charges and claims where the server
    honours ``_revinclude``) and the session's self-pay fee."""
    encounters = search_url("Encounter", {"appointment": f"Appointment/{external_id}"})
    if revinclude:
        encounters += "".join(f"&_revinclude={r}" for r in REVINCLUDES)
    return [
        {"request": {"method": "GET", "url": f"Appointment/{external_id}"}},
        {"request": {"method": "GET", "url": encounters}},
        {"request": {"method": "GET", "url": fee_search(appointment_id)}},
    ]


def revinclude_honoured(searchset: dict[str, Any]) -> bool:
    """The server used ``_revinclude``: R4 servers report the parameters they used in the ``self`` link."""
    own = next((str(link.get("url", "")) for link in searchset.get("link", []) if link.get("relation") == "self"), "")
    return all(f"_revinclude={r}" in own or f"_revinclude={r.replace(':', '%3A')}" in own for r in REVINCLUDES)


def second_reads(encounter_ids: list[str]) -> list[dict[str, Any]]:
    """Batch entries for the charges and claims of these Encounters, for servers without ``_revinclude``."""
    refs = ",".join(f"Encounter/{e}" for e in encounter_ids)
    return [
        {"request": {"method": "GET", "url": search_url("ChargeItem", {"context": refs})}},
        {"request": {"method": "GET", "url": search_url("Claim", {"encounter": refs})}},
    ]


@dataclass
class Found:
    """The billing resources of one session as the EHR showed them."""

    encounters: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)
    fees: list[dict[str, Any]] = field(default_factory=list)


def found_from(appointment_ref: str, resources: list[dict[str, Any]], fees: list[dict[str, Any]]) -> Found:
    """Sort what the searches returned; an Encounter counts only if it names this Appointment."""
    out = Found(fees=[f for f in fees if f.get("resourceType") == "ChargeItem"])
    seen: set[str] = set()
    for r in resources:
        if not isinstance(r, dict) or not r.get("id") or _key(r) in seen:
            continue
        seen.add(_key(r))
        kind = r.get("resourceType")
        if kind == "Encounter" and appointment_ref in (a.get("reference") for a in r.get("appointment", [])):
            out.encounters.append(r)
        elif kind == "ChargeItem" and not _is_fee(r):
            out.items.append(r)
        elif kind == "Claim":
            out.claims.append(r)
    return out


@dataclass
class Plan:
    """What suppression writes: transaction entries, what each must show, audit lines, the outcome."""

    billing: str
    writes: list[dict[str, Any]] = field(default_factory=list)
    #: per write: (resource key, the status its answer must show)
    targets: list[tuple[str, str]] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    #: index in ``writes`` of the fee's conditional create (its id is known once it is written)
    fee_create: int | None = None

    def set_status(self, resource: dict[str, Any], status: str) -> dict[str, Any]:
        key = _key(resource)
        if resource.get("status") == status or any(k == key for k, _ in self.targets):
            return resource
        changed = {k: v for k, v in resource.items() if k != "meta"} | {"status": status}
        self.steps.append(f"{key} {status}")
        self.writes.append({"resource": changed, "request": {"method": "PUT", "url": key, "ifMatch": _etag(resource)}})
        self.targets.append((key, status))
        return changed


def plan(
    *,
    appointment: dict[str, Any],
    appointment_id: str,
    found: Found,
    cancellation: dict[str, Any] | None,
    client_ref: dict[str, Any] | None,
    fee_code: str,
    fee_amount: float = 0.0,
) -> Plan:
    """The billing changes a cancelled Appointment needs, from what the searches found.

    Pure: re-planning from what the writes left behind plans nothing.
    """
    out = Plan(billing=Billing.SUPPRESSED.value)
    for enc in found.encounters:
        if enc.get("status") in OPEN_ENCOUNTER:
            out.set_status(enc, "cancelled")
    needs_void = False
    seen_claims: set[str] = set()
    for enc in found.encounters:
        enc_ref = f"Encounter/{enc['id']}"
        for item in found.items:
            if item.get("context", {}).get("reference") != enc_ref:
                continue
            if item.get("status") in _CHARGEABLE:
                out.set_status(item, "not-billable")
            elif item.get("status") == "billed":
                needs_void = True  # already on a claim that went out
                out.steps.append(f"ChargeItem/{item['id']} billed: left for a person to void")
        for claim in found.claims:
            named = {e.get("reference") for it in claim.get("item", []) for e in it.get("encounter", [])}
            if enc_ref not in named or claim["id"] in seen_claims:
                continue
            seen_claims.add(claim["id"])
            if claim.get("status") == "draft":
                out.set_status(claim, "cancelled")
            elif claim.get("status") == "active":
                needs_void = True  # sent to the payer: only a person can void or replace it
                out.steps.append(f"Claim/{claim['id']} active: left for a person to void")

    record = cancellation or {}
    wants_fee = record.get("fee") == Fee.CHARGE and record.get("kind") in (CancelKind.LATE_CANCEL, CancelKind.NO_SHOW)
    if wants_fee and not found.fees:
        fee = _fee_item(appointment, appointment_id, client_ref, fee_code, fee_amount, record)
        out.fee_create = len(out.writes)
        out.writes.append({"resource": fee, "request": {"method": "POST", "url": "ChargeItem", "ifNoneExist": f"identifier={FEE_SYSTEM}|{appointment_id}"}})
        out.targets.append(("ChargeItem (self-pay fee)", "billable"))
    elif not wants_fee:
        withdraw_fees(out, found.fees)  # the fee was waived after it was charged
    if needs_void:
        out.billing = Billing.NEEDS_VOID.value
    elif wants_fee:
        out.billing = Billing.FEE_SELF_PAY.value
    return out


def withdraw_fees(out: Plan, fees: list[dict[str, Any]]) -> None:
    """A fee the client no longer owes (waived, or the session is back on the books) is made not-billable."""
    for item in fees:
        if item.get("status") in _CHARGEABLE:
            out.set_status(item, "not-billable")


def unverified(out: Plan, answers: list[dict[str, Any]]) -> list[str]:
    """What the write answers do not show done, one line each naming the resource (empty: all seen).

    An answer without a resource (``return=minimal``) counts by its status alone; one with a
    resource must show the status asked for.
    """
    problems: list[str] = []
    for (key, status), answer in zip(out.targets, answers, strict=False):
        code = entry_status(answer)
        if not 200 <= code < 300:
            problems.append(f"{key} is not {status}: the EHR answered {code or 'nothing'}")
            continue
        resource = answer.get("resource")
        if isinstance(resource, dict) and resource.get("status") != status:
            problems.append(f"{key} is still {resource.get('status')}: the EHR accepted the change but did not make it {status}")
    if len(answers) < len(out.targets):
        problems.extend(f"{key} is not {status}: no answer" for key, status in out.targets[len(answers):])
    return problems


def searchset(answer: dict[str, Any], what: str) -> dict[str, Any]:
    return entry_resource(answer, what, searchset=True)


def _fee_item(
    appointment: dict[str, Any],
    appointment_id: str,
    client_ref: dict[str, Any] | None,
    fee_code: str,
    amount: float,
    record: dict[str, Any],
) -> dict[str, Any]:
    """A self-pay ChargeItem: subject the client, no Encounter, Account or Coverage, so it never joins a claim."""
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
    if client_ref:
        item["subject"] = client_ref
    if amount:
        item["priceOverride"] = {"value": amount, "currency": "USD"}
    return item
