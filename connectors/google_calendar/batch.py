"""Many writes in Calendar API batch requests (developers.google.com/calendar/api/guides/batch).

An initial sync writes thousands of events: one HTTP request per event spends the time on round
trips. A batch carries up to ``write_batch`` writes as parts, each made as its clinician's own
account; Google may run them in any order and answers each part on its own, so each write keeps
the semantics of :meth:`GoogleCalendarConnector.apply`: the derived id (a 409 part converges the
existing event on the single-write path), ``If-Match`` on patch and delete, and its own error.
Writes that need more than one call (a session moved to another clinician, a cancelled session
never linked) take the single-write path beside the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from syncbridge.connector import ApplyResult, Write
from syncbridge.policy.privacy import event_text

from .client import Part, batch_write
from .mapping import render, without_nulls

if TYPE_CHECKING:
    from .connector import GoogleCalendarConnector

__all__ = ["apply_batched"]


@dataclass(frozen=True, slots=True)
class _Planned:
    part: Part
    clinician: str
    external_id: str
    disclosed: tuple[str, ...]
    #: the full event body (an insert's 409 converges the existing event to it)
    body: dict[str, Any]


def _plan(connector: GoogleCalendarConnector, write: Write) -> _Planned | None:
    """The write as one batch part, or None when it takes the single-write path."""
    desired, link = write.desired, write.link
    clinician = desired.get("clinician") or ""
    target = connector._calendars.get(clinician)
    if target is None:
        return None  # apply() says what is wrong
    text = event_text(desired, connector.practice.policy.privacy, connector.options.disclosure)
    body = render(write.appointment_id, desired, text, include_location="location" in connector.capabilities.fields)
    cancelled = desired.get("status") == "cancelled"
    client = connector.client(clinician)
    if link is not None and not link.gone and link.external_id:
        owner, calendar, event_id = connector._split(link.external_id)
        if owner != clinician or calendar != target:
            return None
        if cancelled:
            part = Part(client, "delete", calendar, event_id, etag=link.etag)
        else:
            part = Part(client, "patch", calendar, event_id, {k: v for k, v in body.items() if k != "id"}, link.etag)
        return _Planned(part, clinician, link.external_id, text.disclosed, body)
    if cancelled:
        return None
    return _Planned(Part(client, "insert", target, body=without_nulls(body)), clinician, f"{target}/{body['id']}", text.disclosed, body)


async def _finish(connector: GoogleCalendarConnector, plan: _Planned, answer: Any) -> ApplyResult:
    if isinstance(answer, Exception):
        raise answer
    if plan.part.method == "delete":
        return ApplyResult(plan.external_id, None, gone=True)
    if answer == 409:  # the id exists: a lost answer, or a deleted copy
        return await connector.adopt(plan.clinician, plan.part.calendar, plan.body, plan.disclosed)
    return ApplyResult(plan.external_id, answer.get("etag"), plan.disclosed)


async def apply_batched(connector: GoogleCalendarConnector, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
    """Each write's result or error, in order; batches of ``write_batch`` parts run side by side."""
    plans: list[_Planned | None] = []
    for w in writes:
        try:
            plans.append(_plan(connector, w))
        except Exception:  # noqa: BLE001 - an account without sign-in: apply() raises it for this write alone
            plans.append(None)
    batched = [i for i, p in enumerate(plans) if p is not None]
    size = connector.write_batch
    chunks = [batched[k : k + size] for k in range(0, len(batched), size)]

    async def one(i: int) -> ApplyResult:
        w = writes[i]
        return await connector.apply(w.appointment_id, w.desired, w.link)

    async def chunk(indices: list[int]) -> list[ApplyResult | BaseException]:
        answers = await batch_write([p.part for i in indices if (p := plans[i]) is not None])
        finished = []
        for i, answer in zip(indices, answers, strict=True):
            plan = plans[i]
            assert plan is not None
            finished.append(_finish(connector, plan, answer))
        return list(await asyncio.gather(*finished, return_exceptions=True))

    singles = [i for i, p in enumerate(plans) if p is None]
    outcomes = await asyncio.gather(
        asyncio.gather(*(chunk(c) for c in chunks)),
        asyncio.gather(*(one(i) for i in singles), return_exceptions=True),
    )
    results: list[ApplyResult | BaseException | None] = [None] * len(writes)
    for indices, answers in zip(chunks, outcomes[0], strict=True):
        for i, r in zip(indices, answers, strict=True):
            results[i] = r
    for i, r in zip(singles, outcomes[1], strict=True):
        results[i] = r
    return [r if r is not None else RuntimeError("no outcome") for r in results]
