"""Reading Google calendars: each calendar on its own (DESIGN section 9).

Incremental pulls use one sync token per calendar; several calendars' first pages travel in one
batch request. A calendar that fails (no longer shared, deleted, throttled, its clinician not
signed in) keeps its sync token and is reported in ``failed_accounts`` while the others' changes
are returned; one throttled with Retry-After is left alone until then; one without a token (it
failed during the last full listing) is listed on its own (``listed_accounts``). A first-page
batch that fails as a whole falls back to each calendar's own requests.
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

from .client import CalendarClient, batch_list

if TYPE_CHECKING:
    from .connector import GoogleCalendarConnector

__all__ = ["pull"]

log = structlog.get_logger("syncbridge.google")
FAR_FUTURE = "9999-12-31T23:59:59Z"


async def pull(connector: GoogleCalendarConnector, cursor: str | None) -> PullResult:
    """Changes since ``cursor`` (JSON: calendar id -> sync token); None lists every event from
    ``history_days`` ago on (a complete listing over that window).

    Each calendar is read on its own (DESIGN section 9): one that fails keeps its sync token
    and is reported in ``failed_accounts``; one without a token (it failed during the last
    listing) is listed in full."""
    calendars = await connector.calendars()
    state = account_cursor(cursor, calendars.values())
    if state is not None and not all(v is None or isinstance(v, str) for v in state.values()):
        raise CursorExpired("the stored cursor does not match the configured calendars")
    full = state is None
    since = datetime.now(UTC) - timedelta(days=connector.options.history_days)
    observations: list[Observation] = []
    tokens: dict[str, str | None] = {cal: None if state is None else state[cal] for cal in calendars.values()}
    failed: dict[str, SyncbridgeError] = {}
    plan = []
    for clinician, calendar in calendars.items():
        try:
            if (resting := connector.resting.check(clinician)) is not None:
                raise resting
            token = tokens[calendar]
            params: dict[str, Any] = {"timeMin": iso(since)} if token is None else {"syncToken": token}
            plan.append((clinician, calendar, connector.client(clinician), params | {"maxResults": connector.options.page_size}))
        except SyncbridgeError as err:
            failed[clinician] = _unread(connector, clinician, calendar, err)
    listed: set[str] = set()
    for (clinician, calendar, client, params), first in zip(plan, await _first_pages(connector, plan), strict=True):
        try:
            if isinstance(first, Exception):
                raise first
            found, token = [], None
            async for items, last in client.pages(calendar, first, **params):
                found += [o for o in (connector.to_observation(e, clinician, calendar) for e in items) if o is not None]
                token = last
            if token is None:
                raise PermanentError(f"events.list for {clinician} ended without a nextSyncToken")
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
    log.debug("pulled", connector=connector.name, full=full, observations=len(observations), problems=problems, failed=sorted(failed))
    return PullResult(
        observations,
        json.dumps(tokens, sort_keys=True),
        complete=full and not problems,
        window=(iso(since), FAR_FUTURE) if listed else None,
        failed_accounts=unless_all_failed(failed, len(calendars)),
        listed_accounts=frozenset() if full or problems else frozenset(listed),
    )

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
