"""Reading Outlook calendars: each mailbox on its own (DESIGN section 9).

Incremental pulls are ``calendarView/delta`` rounds, one deltaLink per mailbox in the cursor; a
full listing is the window's ``calendarView`` after a fresh delta round. A mailbox that fails (a
revoked permission, a removed mailbox, throttling) keeps its deltaLink and is reported in
``failed_accounts`` while the others' changes are returned; one throttled with Retry-After is left
alone until then; one that failed during a full listing (its deltaLink null) is listed on its
own by the next pull (``listed_accounts``). A pull scoped to some mailboxes (a notification named
them) reads those alone and leaves every other deltaLink as it was.

What crosses the wire: ``calendarView/delta`` takes no ``$select`` (learn.microsoft.com/graph/api/event-delta),
so each changed event arrives whole, text included, the clinician's private events too; it is
reduced to id, etag and, for ours, tags as each page arrives (:func:`mapping.delta_hint`), but it
did reach the daemon. The listing's ``calendarView`` and every single read ask only for what a
session needs (``$select``). Where no private text may reach the daemon at all, ``changes:
calendar_view`` replaces these delta rounds with a listing of the window on every pull
(listing.py); a cursor of that mode met here raises CursorExpired (a fresh listing follows).
README section 5 says what each call transfers.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from syncbridge.connector import Observation, PullResult
from syncbridge.errors import CursorExpired, SyncbridgeError
from syncbridge.model import iso
from syncbridge.retry import unless_all_failed

from .mapping import EXT_FIELDS, EXT_ID, LISTING_FIELDS, canonical_id_of, delta_hint, is_ours

if TYPE_CHECKING:
    from .connector import Microsoft365Connector

__all__ = ["may_read", "pull", "unread"]

log = structlog.get_logger("syncbridge.microsoft365")


async def pull(connector: Microsoft365Connector, cursor: str | None, accounts: frozenset[str] | None = None) -> PullResult:
    """Delta rounds since ``cursor`` (JSON: clinician -> deltaLink and window); None lists the window.
    A mailbox whose deltaLink is null (it failed during the last listing) is listed now.
    ``accounts``: only these clinicians' mailboxes; the others' deltaLinks are kept as they were.
    A failed mailbox is reported in ``failed_accounts``; the pull fails as a whole only when
    every configured mailbox failed."""
    if connector.push.pending:
        await connector.push.maintain()
    if cursor is None:
        return await _full(connector)
    try:
        state = json.loads(cursor)
    except ValueError:
        state = None
    if isinstance(state, dict) and state.get("changes", "delta") != "delta":
        raise CursorExpired("the stored cursor is a listing's (changes was calendar_view); listing the window")
    if not isinstance(state, dict) or set(state.get("mailboxes", {})) != set(connector.mailboxes):
        raise CursorExpired("the stored cursor does not match the configured mailboxes")
    if datetime.fromisoformat(state.get("window", ["1970-01-01T00:00:00+00:00"])[0]) < connector._window()[0] - timedelta(days=1):
        raise CursorExpired("the delta window has rolled on; listing the new window")
    window = (datetime.fromisoformat(state["window"][0]), datetime.fromisoformat(state["window"][1]))
    observations: list[Observation] = []
    links: dict[str, str | None] = dict(state["mailboxes"])
    failed: dict[str, SyncbridgeError] = {}
    listed: set[str] = set()
    for clinician, mailbox in connector.mailboxes.items():
        if accounts is not None and clinician not in accounts:
            continue
        try:
            may_read(connector, clinician)
            if links[clinician] is None:
                found, links[clinician] = await _list(connector, clinician, mailbox, window)
                listed.add(clinician)
            else:
                items, links[clinician] = await connector.client.delta(clinician, mailbox, link=links[clinician], reduce=delta_hint)
                found = [obs for item in items if (obs := await _delta_item(connector, clinician, mailbox, item)) is not None]
        except CursorExpired:
            raise
        except SyncbridgeError as err:  # this mailbox's own outcome: its deltaLink stays as it was
            failed[clinician] = unread(connector, clinician, mailbox, err)
            continue
        observations += found
    log.debug("pulled", connector=connector.name, full=False, scoped=accounts is not None, observations=len(observations), failed=sorted(failed))
    return PullResult(
        observations, json.dumps(state | {"mailboxes": links}, sort_keys=True), failed_accounts=unless_all_failed(failed, len(connector.mailboxes)),
        listed_accounts=frozenset(listed), window=(iso(window[0]), iso(window[1])) if listed else None,
    )

def may_read(connector: Microsoft365Connector, clinician: str) -> None:
    """Raise the error a mailbox is resting from (Retry-After not yet over)."""
    resting = connector.resting.check(clinician)
    if resting is not None:
        raise resting

def unread(connector: Microsoft365Connector, clinician: str, mailbox: str, err: SyncbridgeError) -> SyncbridgeError:
    """One mailbox's failed read, naming the mailbox (the status shows it), rested if throttled."""
    err = connector.resting.note(clinician, err, f"mailbox {mailbox}")
    log.warning("mailbox_unread", connector=connector.name, clinician=clinician, problem=str(err))
    return err

async def _delta_item(connector: Microsoft365Connector, clinician: str, mailbox: str, item: dict[str, Any]) -> Observation | None:
    event_id = str(item.get("id"))
    ext = f"{clinician}/{event_id}"
    seen = connector._seen.get(ext)
    if "@removed" in item:
        # deleted, or changed outside the window (event-delta): only a read tells which
        if seen is not None and seen.observation.deleted:
            return seen.observation
        return await connector._fetch(clinician, mailbox, event_id)
    if not is_ours(item):
        return None  # the clinician's own event: busy time only
    if seen is not None and seen.etag == item.get("@odata.etag") and not seen.observation.deleted:
        return seen.observation
    return await connector._fetch(clinician, mailbox, event_id, hint=item)  # its hidden properties; the tags come with the item

async def _list(connector: Microsoft365Connector, clinician: str, mailbox: str, window: tuple[datetime, datetime]) -> tuple[list[Observation], str]:
    """Every session in one mailbox's window, and the deltaLink to go on from.

    The delta round (whole events: Graph allows no ``$select`` there) gives the tags of our
    events; the ``calendarView`` listing, narrowed with ``$select``, their times and hidden
    properties. A session changed between the two calls is read on its own."""
    # the delta round first: whatever changes while the listing runs is reported again after it
    items, link = await connector.client.delta(clinician, mailbox, window=window, reduce=delta_hint)
    hints = {str(i.get("id")): i for i in items if "tags" in i}
    del items
    events = await connector.client.calendar_view(clinician, mailbox, window, select=list(LISTING_FIELDS), expand=[EXT_ID, EXT_FIELDS])
    found: list[Observation] = []
    for event in events:
        if canonical_id_of(event) is None:
            continue  # the clinician's own event
        hint = hints.get(str(event.get("id")))
        if hint is not None and hint.get("@odata.etag") == event.get("@odata.etag"):
            obs = connector._observe(clinician, event, hint)
        else:
            obs = await connector._fetch(clinician, mailbox, str(event.get("id")))
        if obs is not None:
            found.append(obs)
    return found, link

async def _full(connector: Microsoft365Connector) -> PullResult:
    """The window listed in every mailbox; one that fails is left out of the listing's scope."""
    window = connector._window()
    observations: list[Observation] = []
    links: dict[str, str | None] = {}
    failed: dict[str, SyncbridgeError] = {}
    for clinician, mailbox in connector.mailboxes.items():
        try:
            may_read(connector, clinician)
            found, links[clinician] = await _list(connector, clinician, mailbox, window)
        except SyncbridgeError as err:
            links[clinician] = None  # listed by the next pull
            failed[clinician] = unread(connector, clinician, mailbox, err)
            continue
        observations += found
    cursor = json.dumps({"mailboxes": links, "window": [w.isoformat() for w in window]}, sort_keys=True)
    log.debug("pulled", connector=connector.name, full=True, observations=len(observations), failed=sorted(failed))
    return PullResult(observations, cursor, complete=True, window=(iso(window[0]), iso(window[1])),
                      failed_accounts=unless_all_failed(failed, len(connector.mailboxes)))
