"""Pulls that never call ``calendarView/delta`` (``changes: calendar_view``): each lists the window.

Why: delta takes no ``$select`` (learn.microsoft.com/graph/api/event-delta), so every changed
event, a clinician's private one included, arrives whole with its subject and body. Here every
pull, incremental or full, lists each mailbox's window with the ``calendarView`` that names only
times, flags and our two hidden properties (``LISTING_FIELDS``), so a private event's text is
never in any answer the connector receives. Of the sessions (our hidden id on them), one at an
etag already known (remembered, or the store's ``Host.known_etag`` after a restart) is observed
without a further call; a changed or unknown one is read alone (``_fetch``: its own text, to find
tags). The clinician's own events are never read further.

Every session the store links (or the connector remembers) starting inside the window that a
listing lacks is read on its own, which tells a deletion from a move out of the window: one read
per session gone. So an incremental pull answers only what changed (unchanged sessions cost the
merge nothing), and a pull from scratch answers every session as a ``complete`` listing.
A mailbox that fails is reported in ``failed_accounts`` and is not in the listing's scope; the
next pull lists it again. The cursor holds no position, only the mode: a delta cursor met here (the
option changed) raises CursorExpired, and the engine lists the window from scratch, matching
every session to its link by id, so nothing is duplicated. Cost: the pages of the window, per
mailbox and per poll, plus one read per session changed in Outlook (README section 5).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from syncbridge.connector import Observation, PullResult
from syncbridge.errors import CursorExpired, SyncbridgeError
from syncbridge.model import iso
from syncbridge.retry import unless_all_failed

from .mapping import EXT_FIELDS, EXT_ID, LISTING_FIELDS, canonical_id_of
from .reads import may_read, unread

if TYPE_CHECKING:
    from .connector import Microsoft365Connector

__all__ = ["CURSOR", "is_listing_cursor", "pull"]

log = structlog.get_logger("syncbridge.microsoft365")

#: the whole cursor of this mode: a listing needs no position, the mode tells a delta cursor apart
CURSOR = json.dumps({"changes": "calendar_view"})


def is_listing_cursor(cursor: str) -> bool:
    """Whether ``cursor`` was written by this mode (a delta cursor holds deltaLinks instead)."""
    try:
        state = json.loads(cursor)
    except ValueError:
        return False
    return isinstance(state, dict) and state.get("changes") == "calendar_view"


async def pull(connector: Microsoft365Connector, cursor: str | None, accounts: frozenset[str] | None = None) -> PullResult:
    """Each mailbox's window listed (``accounts``: only these clinicians'); None lists every
    mailbox as a full sync (``complete``). The pull fails as a whole only when every configured
    mailbox failed."""
    if connector.push.pending:
        await connector.push.maintain()
    if cursor is not None and not is_listing_cursor(cursor):
        raise CursorExpired("the stored cursor holds delta positions (changes was delta); listing the window")
    window = connector._window()
    expected = _expected_in(connector, window, [c for c in connector.mailboxes if accounts is None or c in accounts])
    observations: list[Observation] = []
    failed: dict[str, SyncbridgeError] = {}
    for clinician, mailbox in connector.mailboxes.items():
        if accounts is not None and clinician not in accounts:
            continue
        try:
            may_read(connector, clinician)
            found = await list_mailbox(connector, clinician, mailbox, window, expected.get(clinician, set()), unchanged=cursor is None)
        except SyncbridgeError as err:  # this mailbox's own outcome: it is left out of the listing's scope
            failed[clinician] = unread(connector, clinician, mailbox, err)
            continue
        observations += found
    full = cursor is None
    log.debug("pulled", connector=connector.name, full=full, listing=True, scoped=accounts is not None, observations=len(observations),
              failed=sorted(failed))
    span = (iso(window[0]), iso(window[1]))
    failed = unless_all_failed(failed, len(connector.mailboxes))
    if full:
        return PullResult(observations, CURSOR, complete=True, window=span, failed_accounts=failed)
    # every session missing from a listing was read above: what changed is all there is to merge
    return PullResult(observations, CURSOR, failed_accounts=failed)


async def list_mailbox(connector: Microsoft365Connector, clinician: str, mailbox: str, window: tuple[datetime, datetime],
                       expected: set[str], *, unchanged: bool = True) -> list[Observation]:
    """The sessions in one mailbox's window (``unchanged``: those at a known etag too, else only
    those that changed). ``expected``: sessions linked or remembered in the window; one the
    listing lacks is read, so a move out of the window is not taken for a deletion."""
    events = await connector.client.calendar_view(clinician, mailbox, window, select=list(LISTING_FIELDS), expand=[EXT_ID, EXT_FIELDS])
    found: list[Observation] = []
    listed: set[str] = set()
    for event in events:
        if canonical_id_of(event) is None:
            continue  # the clinician's own event: only its times and flags crossed the wire
        event_id = str(event.get("id"))
        ext = f"{clinician}/{event_id}"
        listed.add(ext)
        obs = _unchanged(connector, clinician, ext, event)
        if obs is None:
            found.append(await connector._fetch(clinician, mailbox, event_id, session=True))
        elif unchanged:
            found.append(obs)
    for ext in sorted(expected - listed):
        found.append(await connector._fetch(clinician, mailbox, ext.partition("/")[2]))
    return found


def _unchanged(connector: Microsoft365Connector, clinician: str, ext: str, event: dict[str, Any]) -> Observation | None:
    """The observation of a session at a version already known, without a call: the one remembered
    at this etag, or, after a restart, the version the store last wrote or merged (an echo, whose
    tags the engine does not look at). None when the session must be read."""
    etag = event.get("@odata.etag")
    if not etag:
        return None
    seen = connector._seen.get(ext)
    if seen is not None and seen.etag == etag and not seen.observation.deleted:
        return seen.observation
    if connector.host.known_etag(ext) == etag:
        return connector._observe(clinician, event, {"tags": ()})
    return None


def _expected_in(connector: Microsoft365Connector, window: tuple[datetime, datetime], clinicians: list[str]) -> dict[str, set[str]]:
    """Sessions live and starting inside ``window``, by clinician: what each listing must show.
    Those the store holds (``Host.linked_between``, so after a restart too) and those remembered."""
    lo, hi = iso(window[0]), iso(window[1])
    out: dict[str, set[str]] = {}
    for ext in connector.host.linked_between(lo, hi, clinicians):
        out.setdefault(ext.partition("/")[0], set()).add(ext)
    for ext, seen in connector._seen.items():
        obs = seen.observation
        start = obs.fields.get("start")
        if not obs.deleted and not obs.problem and isinstance(start, str) and lo <= start < hi:
            out.setdefault(ext.partition("/")[0], set()).add(ext)
    return out
