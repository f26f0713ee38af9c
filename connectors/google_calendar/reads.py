"""Reading Google calendars: each calendar on its own (DESIGN section 9).

Incremental pulls use one sync token per calendar; several calendars' first pages travel in one
batch request. A calendar that fails (no longer shared, deleted, throttled, its clinician not
signed in) keeps its sync token and is reported in ``failed_accounts`` while the others' changes
are returned; one throttled with Retry-After is left alone until then; one without a token (it
failed during the last full listing) is listed on its own (``listed_accounts``). A first-page
batch that fails as a whole falls back to each calendar's own requests. A push names one
calendar: only the calendars asked for are read, the others' tokens stay as they were.

Every listing is a partial response (``LIST_FIELDS``): times, ids and our private properties,
never a title, description, location or guest list, so a clinician's private events arrive as
busy time only. The text of one of OUR session events (its tags, ``#late``...) is read alone
(``TEXT_FIELDS``) when the listing shows it with an etag the connector neither wrote nor read.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from syncbridge.connector import Observation, PullResult, account_cursor
from syncbridge.errors import BatchRefused, CursorExpired, PermanentError, SyncbridgeError
from syncbridge.model import iso
from syncbridge.retry import unless_all_failed

from .client import CalendarClient, batch_get, batch_list
from .mapping import LIST_FIELDS, TEXT_FIELDS, canonical_id_of

if TYPE_CHECKING:
    from .connector import GoogleCalendarConnector

__all__ = ["pull", "read_texts"]

log = structlog.get_logger("syncbridge.google")
FAR_FUTURE = "9999-12-31T23:59:59Z"


async def pull(connector: GoogleCalendarConnector, cursor: str | None, accounts: frozenset[str] | None = None) -> PullResult:
    """Changes since ``cursor`` (JSON: calendar id -> sync token); None lists every event from
    ``history_days`` ago on (a complete listing over that window). With ``accounts`` (and a
    cursor), only those clinicians' calendars are read; every other token is returned unchanged.

    Each calendar is read on its own (DESIGN section 9): one that fails keeps its sync token
    and is reported in ``failed_accounts``; one without a token (it failed during the last
    listing) is listed in full."""
    calendars = await connector.calendars()
    state = account_cursor(cursor, calendars.values())
    if state is not None and not all(v is None or isinstance(v, str) for v in state.values()):
        raise CursorExpired("the stored cursor does not match the configured calendars")
    full = state is None
    chosen = calendars if full or accounts is None else {k: c for k, c in calendars.items() if k in accounts}
    since = datetime.now(UTC) - timedelta(days=connector.options.history_days)
    observations: list[Observation] = []
    tokens: dict[str, str | None] = {cal: None if state is None else state[cal] for cal in calendars.values()}
    failed: dict[str, SyncbridgeError] = {}
    plan = []
    for clinician, calendar in chosen.items():
        try:
            if (resting := connector.resting.check(clinician)) is not None:
                raise resting
            token = tokens[calendar]
            params: dict[str, Any] = {"timeMin": iso(since)} if token is None else {"syncToken": token}
            params |= {"maxResults": connector.options.page_size, "fields": LIST_FIELDS}
            plan.append((clinician, calendar, connector.client(clinician), params))
        except SyncbridgeError as err:
            failed[clinician] = _unread(connector, clinician, calendar, err)
    listed: set[str] = set()
    for (clinician, calendar, client, params), first in zip(plan, await _first_pages(connector, plan), strict=True):
        try:
            if isinstance(first, Exception):
                raise first
            found, token = await _read_calendar(connector, clinician, calendar, client, first, params)
        except CursorExpired:
            raise
        except SyncbridgeError as err:  # this calendar's own outcome: its sync token stays as it was
            failed[clinician] = _unread(connector, clinician, calendar, err)
            continue
        observations += found
        if "timeMin" in params:
            listed.add(clinician)
        tokens[calendar] = token
    problems = sum(1 for o in observations if o.problem)
    log.debug("pulled", connector=connector.name, full=full, calendars=len(chosen), observations=len(observations), problems=problems,
              failed=sorted(failed))  # fmt: skip
    return PullResult(
        observations,
        json.dumps(tokens, sort_keys=True),
        complete=full and not problems,
        window=(iso(since), FAR_FUTURE) if listed else None,
        # counted against every calendar: a push-scoped pull whose one calendar failed names it, as a poll would
        failed_accounts=unless_all_failed(failed, len(calendars)),
        listed_accounts=frozenset() if full or problems else frozenset(listed),
    )


async def _read_calendar(connector: GoogleCalendarConnector, clinician: str, calendar: str, client: CalendarClient,
                         first: dict[str, Any] | None, params: dict[str, Any]) -> tuple[list[Observation], str]:
    """One calendar's listing as observations and its next sync token; the session events someone
    else changed get their text read (their tags) before they are mapped."""
    found: list[Observation] = []
    changed: list[dict[str, Any]] = []  # held until their text is read: few, only outside edits
    token = None
    async for items, last in client.pages(calendar, first, **params):
        for event in items:
            if _needs_text(connector, calendar, event):
                changed.append(event)
            else:
                found += _observe(connector, event, clinician, calendar)
        token = last
    if token is None:
        raise PermanentError(f"events.list for {clinician} ended without a nextSyncToken")
    texts = await read_texts(client, calendar, [str(e["id"]) for e in changed])
    for event, text in zip(changed, texts, strict=True):
        found += _observe(connector, event | _text_of(text), clinician, calendar)
    return found, token


def _needs_text(connector: GoogleCalendarConnector, calendar: str, event: dict[str, Any]) -> bool:
    """A live session event of ours at an etag we neither wrote nor read: someone else changed it."""
    event_id = event.get("id")
    if not isinstance(event_id, str) or event.get("status") == "cancelled" or event.get("recurringEventId"):
        return False
    if canonical_id_of(event_id) is None:
        return False
    external_id, etag = f"{calendar}/{event_id}", event.get("etag")
    if connector.etags.knows(external_id, etag):
        return False
    # after a restart the memory is empty: the store still knows what we wrote or merged last
    return etag is None or connector.host.known_etag(external_id) != etag


def _text_of(text: dict[str, Any] | None) -> dict[str, Any]:
    return {k: text[k] for k in ("summary", "description") if text and k in text}


def _observe(connector: GoogleCalendarConnector, event: dict[str, Any], clinician: str, calendar: str) -> list[Observation]:
    """The event as an observation (none for a clinician's own event); its etag is remembered."""
    obs = connector.to_observation(event, clinician, calendar)
    if obs is None:
        return []
    if not obs.problem:
        connector.etags.note(obs.external_id, None if obs.deleted else obs.etag)
    return [obs]


async def read_texts(client: CalendarClient, calendar: str, event_ids: list[str]) -> list[dict[str, Any] | None]:
    """The title and description (``TEXT_FIELDS``) of each event, None for one gone meanwhile: one
    events.get each, in batch requests when there are several. Any error fails the calendar's read."""
    if len(event_ids) == 1:
        return [await client.get(calendar, event_ids[0], TEXT_FIELDS)]
    if not event_ids:
        return []
    try:
        answers = await batch_get([(client, calendar, event_id, TEXT_FIELDS) for event_id in event_ids])
    except BatchRefused:
        return [await client.get(calendar, event_id, TEXT_FIELDS) for event_id in event_ids]
    for answer in answers:
        if isinstance(answer, Exception):
            raise answer
    return [a for a in answers if not isinstance(a, Exception)]


async def _first_pages(connector: GoogleCalendarConnector, plan: list[tuple[str, str, CalendarClient, dict[str, Any]]]) -> list[Any]:
    """Several calendars' first pages in one batch request (most polls end there); None for a
    calendar whose first page it reads itself (one calendar, or a batch that failed as a whole)."""
    if len(plan) < 2:
        return [None] * len(plan)
    try:
        firsts = await batch_list([(client, cal, params) for _, cal, client, params in plan])
    except SyncbridgeError as err:  # each calendar is read on its own instead, with its own outcome
        log.warning("batch_list_failed", connector=connector.name, kind=err.kind, problem=str(err))
        if isinstance(err, BatchRefused):
            connector.host.degraded(f"its batch endpoint refused a request, so each calendar is read on its own ({err})")
        return [None] * len(plan)
    connector.host.degraded(None)
    return firsts

def _unread(connector: GoogleCalendarConnector, clinician: str, calendar: str, err: SyncbridgeError) -> SyncbridgeError:
    """One calendar's failed read, naming the calendar (the status shows it), rested if throttled."""
    err = connector.resting.note(clinician, err, f"calendar {calendar}")
    log.warning("calendar_unread", connector=connector.name, clinician=clinician, problem=str(err))
    return err
