"""Claim suppression as a closed loop: find, write, and record only what the EHR's answers show.

The plan is claims.py's; this module does the I/O around it. A cancellation costs, whatever the
billing record holds: one ``batch`` read (the Appointment, its Encounters, the session's fee),
one more ``batch`` of plain searches for the Encounters' charges and claims where the server does
not honour ``_revinclude`` (and only when there are Encounters), and one ``transaction`` write
with the Appointment last. Its ``billing-state`` says what was *seen*: when an answer does not
show a change made, or the EHR refuses the transaction, the changes are sent again one by one
(a ``batch``: each keeps its own outcome) and the Appointment says ``needs_attention``, with one
line per resource still live for the worklist. Conflicts (a biller's edit: 412) and transient
failures are raised, so the outbox re-reads and tries again; a server that does not roll a
failed transaction back is read again before anything is decided.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from syncbridge.errors import AuthError, PermanentError
from syncbridge.model import Billing

from .claims import REVINCLUDES, Found, Plan, first_reads, found_from, revinclude_honoured, searchset, second_reads, unverified
from .client import FHIRClient, entry_etag, entry_id, entry_resource, entry_status

__all__ = ["Discovery", "Reading", "Settled", "TransactionRefused", "one_by_one", "read_billing", "settle"]

log = structlog.get_logger("syncbridge.fhir")

#: the EHR cannot answer this search or change this resource: a person must look (not retried)
_REFUSED = (PermanentError, AuthError)


def _etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


@dataclass
class Discovery:
    """How this EHR's billing resources are found; worked out once, and downgraded when an answer
    shows ``_revinclude`` was not used. ``syncbridge check`` prints :attr:`describe`."""

    revinclude: bool | None = None
    why: str = "not worked out yet"

    async def decide(self, client: FHIRClient) -> bool:
        if self.revinclude is None:
            statement = await client.capabilities()
            listed: set[str] = set()
            for rest in (statement or {}).get("rest", []):
                for resource in rest.get("resource", []):
                    if resource.get("type") == "Encounter":
                        listed.update(resource.get("searchRevInclude", []))
            self.revinclude = set(REVINCLUDES) <= listed
            if statement is None:
                self.why = "the EHR serves no CapabilityStatement (/metadata)"
            elif self.revinclude:
                self.why = "the CapabilityStatement lists _revinclude of ChargeItem:context and Claim:encounter on Encounter"
            else:
                self.why = "the CapabilityStatement does not list _revinclude of ChargeItem:context and Claim:encounter on Encounter"
        return self.revinclude

    def downgrade(self, connector: str) -> None:
        self.revinclude = False
        self.why = "an Encounter search answered without using _revinclude (its self link leaves it out)"
        log.warning("fhir_revinclude_ignored", connector=connector)

    @property
    def describe(self) -> str:
        if self.revinclude is None:
            return f"billing discovery: {self.why}"
        how = "one search with _revinclude" if self.revinclude else "plain searches (Encounter, then ChargeItem and Claim)"
        return f"billing discovery: {how}, because {self.why}"


@dataclass
class Reading:
    """The Appointment and its billing resources as read, and the searches the EHR refused."""

    current: dict[str, Any]
    found: Found
    refused: list[str] = field(default_factory=list)
    requests: int = 0


async def read_billing(client: FHIRClient, discovery: Discovery, connector: str, external_id: str, appointment_id: str) -> Reading | None:
    """Read the Appointment and what bills it; None when the Appointment is gone (404/410)."""
    revinclude = await discovery.decide(client)
    answers = await client.batch(first_reads(external_id, appointment_id, revinclude=revinclude))
    requests = 1
    if entry_status(answers[0]) in (404, 410):
        return None
    current = entry_resource(answers[0], "GET Appointment in a batch")
    refused: list[str] = []
    resources: list[dict[str, Any]] = []
    fees: list[dict[str, Any]] = []
    try:
        encounters = searchset(answers[1], "Encounter search in a batch")
        resources = await client.rest_of(encounters)
        if revinclude and not revinclude_honoured(encounters):
            discovery.downgrade(connector)
            revinclude = False
    except _REFUSED as err:
        refused.append(f"the EHR refused the search for this session's Encounters ({err}), so its charges and claims could not be checked")
    try:
        fees = await client.rest_of(searchset(answers[2], "fee search in a batch"))
    except _REFUSED as err:
        refused.append(f"the EHR refused the search for this session's self-pay fee ({err})")
    ids = [str(r["id"]) for r in resources if r.get("resourceType") == "Encounter" and r.get("id")]
    if ids and not revinclude:
        more = await client.batch(second_reads(ids))
        requests += 1
        for answer, what in zip(more, ("ChargeItem", "Claim"), strict=True):
            try:
                resources += await client.rest_of(searchset(answer, f"{what} search in a batch"))
            except _REFUSED as err:
                refused.append(f"the EHR refused the search for this session's {what}s ({err}), so they could not be checked")
    return Reading(current, found_from(f"Appointment/{current['id']}", resources, fees), refused, requests)


@dataclass
class Settled:
    """What the EHR shows after the writes: the Appointment as written, the billing state seen,
    audit lines and what a person must see to."""

    appointment: dict[str, Any] | None
    etag: str
    billing: str
    steps: list[str]
    attention: list[str]


async def settle(
    client: FHIRClient,
    current: dict[str, Any],
    planned: Plan,
    refused: list[str],
    render: Callable[[dict[str, Any], str], dict[str, Any]],
    if_match: str,
) -> Settled:
    """Write the plan and the Appointment (with the billing state the answers show) and verify.

    ``render(resource, billing)`` is the Appointment body for a billing state; ``if_match`` the
    version the outbox last agreed (a staff edit since then fails the write: ConflictError).
    """
    billing = Billing.NEEDS_ATTENTION.value if refused else planned.billing
    body = render(current, billing)
    own = body != {k: v for k, v in current.items() if k != "meta"} or if_match != _etag(current)
    writes = list(planned.writes)
    if own:
        writes.append({"resource": body | {"id": current["id"]}, "request": {"method": "PUT", "url": f"Appointment/{current['id']}", "ifMatch": if_match}})
    steps = list(planned.steps)
    if not writes:
        return Settled(None, _etag(current), billing, steps, list(refused))
    try:
        done = await client.bundle("transaction", writes)
    except _REFUSED as err:
        raise TransactionRefused(str(err)) from err
    attention = list(refused) + unverified(planned, done[: len(planned.writes)])
    steps += _fee_made(planned, done)
    written: dict[str, Any] | None = None
    etag = _etag(current)
    if own:
        etag = entry_etag(done[-1])
        written = done[-1].get("resource") if isinstance(done[-1].get("resource"), dict) else None
    if attention and billing != Billing.NEEDS_ATTENTION:
        # the Appointment went out saying what the plan meant to reach; say what was seen instead
        base = written or current
        saved = await client.update(render(base, Billing.NEEDS_ATTENTION.value) | {"id": current["id"]}, etag)
        if saved is not None:
            written, etag = saved, _etag(saved)
        billing = Billing.NEEDS_ATTENTION.value
    return Settled(written, etag, billing, steps, attention)


def _fee_made(planned: Plan, answers: list[dict[str, Any]]) -> list[str]:
    """The audit line for the fee the answers show created (its id is known only now)."""
    i = planned.fee_create
    if i is None or i >= len(answers) or not 200 <= entry_status(answers[i]) < 300:
        return []
    return [f"ChargeItem/{entry_id(answers[i])} self-pay fee created"]


class TransactionRefused(PermanentError):
    """The EHR refused the suppression transaction as a whole; part of it may have been applied."""


async def one_by_one(
    client: FHIRClient,
    current: dict[str, Any],
    planned: Plan,
    refused: list[str],
    render: Callable[[dict[str, Any], str], dict[str, Any]],
    if_match: str,
) -> Settled:
    """After a refused transaction: the changes still wanted (``planned`` from a fresh read, as the
    server may have kept part of it) go as a ``batch`` where each keeps its own outcome, then the
    Appointment is written with what the answers show."""
    steps = list(planned.steps)
    attention = list(refused)
    if planned.writes:
        answers = await client.batch(planned.writes)
        attention += unverified(planned, answers)
        steps += _fee_made(planned, answers)
    billing = Billing.NEEDS_ATTENTION.value if attention else planned.billing
    saved = await client.update(render(current, billing) | {"id": current["id"]}, if_match)
    if saved is None:
        raise PermanentError(f"Appointment/{current['id']} disappeared while its billing was settled")
    return Settled(saved, _etag(saved), billing, steps, attention)
