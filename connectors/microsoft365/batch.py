"""Many writes in Graph JSON batches (learn.microsoft.com/graph/json-batching).

An initial sync writes thousands of events: one HTTPS request per event spends the time on round
trips. A ``$batch`` carries up to 20 requests (with app-only auth to any of the tenant's
mailboxes; with delegated sign-in to one clinician's, whose token it carries), answered one by
one in any order and matched by id, so each write keeps the
semantics of :meth:`Microsoft365Connector.apply`: a create carries its ``transactionId`` (a
retry returns the first event), updates and deletes carry ``If-Match``, and each write gets its
own outcome (a 412 or a 429 with its ``Retry-After`` fails that write alone). Graph runs up to
four requests of a batch at once, so a batch holds up to four slots of each mailbox's
concurrency bound (learn.microsoft.com/graph/throttling-limits#outlook-service-limits). Writes that need a read
first (a session moved to another clinician, a cancelled one never linked, an event not seen
since its last write) take the single-write path beside the batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from syncbridge.connector import ApplyResult, Observation, Write
from syncbridge.errors import ConflictError
from syncbridge.policy.privacy import event_text

from .client import MAX_BATCH, BatchItem, _body, raise_for_status
from .mapping import as_written, render, transaction_id_for, with_properties

if TYPE_CHECKING:
    from .connector import Microsoft365Connector

__all__ = ["apply_batched"]

_UTC = {"Prefer": 'outlook.timezone="UTC"'}


@dataclass(frozen=True, slots=True)
class _Planned:
    item: BatchItem
    clinician: str
    event_id: str | None
    body: dict[str, Any]
    disclosed: tuple[str, ...]


def _plan(connector: Microsoft365Connector, write: Write) -> _Planned | None:
    """The write as one request of a batch, or None when it takes the single-write path."""
    desired, link = write.desired, write.link
    clinician = desired.get("clinician") or ""
    mailbox = connector.mailboxes.get(clinician)
    if mailbox is None:
        return None  # apply() says what is wrong
    client = connector.client
    text = event_text(desired, connector.practice.policy.privacy, connector.options.disclosure)
    body = render(write.appointment_id, desired, text)
    cancelled = desired.get("status") == "cancelled"
    if link is not None and not link.gone and link.external_id:
        held_by, _, event_id = link.external_id.partition("/")
        if held_by != clinician or not event_id:
            return None
        match = {"If-Match": link.etag} if link.etag else {}
        if not cancelled:
            item = BatchItem("PATCH", mailbox, client.events_url(mailbox, event_id), "PATCH event", body, _UTC | match)
            return _Planned(item, clinician, event_id, body, text.disclosed)
        seen = connector._seen.get(link.external_id)
        if seen is None or seen.etag != link.etag or seen.has_attendees is not False:
            return None  # a meeting is cancelled (attendees are told); attendees not known need a read first
        return _Planned(BatchItem("DELETE", mailbox, client.events_url(mailbox, event_id), "DELETE event", None, match), clinician, event_id, body, ())
    if cancelled:
        return None
    create = body | {"transactionId": transaction_id_for(write.appointment_id)}
    return _Planned(BatchItem("POST", mailbox, client.events_url(mailbox), "POST events", create, dict(_UTC)), clinician, None, body, text.disclosed)


async def _finish(connector: Microsoft365Connector, plan: _Planned, answer: httpx.Response | Exception, asked: datetime) -> ApplyResult:
    if isinstance(answer, Exception):
        raise answer
    clinician, what = plan.clinician, plan.item.what
    if plan.item.method == "DELETE":
        ext = f"{clinician}/{plan.event_id}"
        if answer.status_code >= 300 and answer.status_code != 404:
            raise_for_status(answer, what)
        connector._remember(ext, None, Observation(external_id=ext, deleted=True))
        return ApplyResult(ext, None, gone=True)
    if plan.item.method == "PATCH" and answer.status_code == 404:
        raise ConflictError(f"{clinician}/{plan.event_id} was deleted in the calendar meanwhile")
    if answer.status_code >= 300:
        raise_for_status(answer, what)
    event = _body(answer, what)
    if plan.item.method == "POST" and not as_written(event, plan.body, asked):
        # a retried create answered with the first attempt's event, perhaps edited since: converge it
        mailbox = connector.mailboxes[clinician]
        event = await connector.client.update_event(clinician, mailbox, str(event["id"]), plan.body, event.get("@odata.etag")) or event
    connector._observe(clinician, with_properties(event, plan.body))
    return ApplyResult(f"{clinician}/{event['id']}", event.get("@odata.etag"), plan.disclosed)


async def apply_batched(connector: Microsoft365Connector, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
    """Each write's result or error, in order; batches run side by side under the mailboxes' bounds."""
    plans: list[_Planned | None] = []
    for w in writes:
        try:
            plans.append(_plan(connector, w))
        except Exception:  # noqa: BLE001 - apply() raises it again, for this write alone
            plans.append(None)
    delegated = connector.options.auth == "delegated"
    groups: dict[str | None, list[int]] = {}
    # a mailbox's writes side by side: a batch then holds few mailboxes' slots, and batches to
    # different mailboxes run at once
    for i, p in sorted(((i, p) for i, p in enumerate(plans) if p is not None), key=lambda ip: ip[1].clinician):
        groups.setdefault(p.clinician if delegated else None, []).append(i)
    size = max(1, min(connector.write_batch, MAX_BATCH))
    chunks = [(c, idx[k : k + size]) for c, idx in groups.items() for k in range(0, len(idx), size)]
    results: list[ApplyResult | BaseException | None] = [None] * len(writes)

    async def chunk(clinician: str | None, indices: list[int]) -> None:
        asked = datetime.now(UTC)
        parts = [p for i in indices if (p := plans[i]) is not None]
        answers = await connector.client.batch(clinician, [p.item for p in parts])
        done = await asyncio.gather(*(_finish(connector, p, a, asked) for p, a in zip(parts, answers, strict=True)), return_exceptions=True)
        for i, r in zip(indices, done, strict=True):
            results[i] = r

    async def single(i: int) -> None:
        w = writes[i]
        try:
            results[i] = await connector.apply(w.appointment_id, w.desired, w.link)
        except Exception as err:  # noqa: BLE001 - one write's error is that write's outcome
            results[i] = err

    await asyncio.gather(*(chunk(c, idx) for c, idx in chunks), *(single(i) for i, p in enumerate(plans) if p is None))
    return [r if r is not None else RuntimeError("no outcome") for r in results]
