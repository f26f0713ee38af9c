"""Reading a calendar for a pull: full listings and incremental changes, per collection.

Two ways to learn what changed:

- collection sync (RFC 6578): the cursor holds the server's sync token. Changed members come back
  with their data where the server inlines it (Radicale) or are fetched in one
  calendar-multiget (RFC 4791 section 7.9; Xandikos). A token names a *state*, not a moment
  (Xandikos hands out an earlier token again when a collection returns to that state), so
  nothing here assumes tokens are unique over time.
- ctag/ETag polling, for servers without RFC 6578: the cursor holds the collection's ctag, the
  ETags of our events and one-way digests of (href, ETag) of every other event, so unchanged
  private events are never downloaded again and nothing about them is kept.

Only our events become observations; the clinician's own events are parsed, found not ours and
dropped on the spot.

Each calendar is read on its own (DESIGN section 9): one that fails (deleted, no longer shared,
throttled) keeps its part of the cursor and is reported in ``failed_accounts`` while the others'
changes are returned; one throttled with Retry-After is left alone until then; one without a
token (it failed during the last full listing) is listed in full (``listed_accounts``).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import structlog

from syncbridge.connector import Observation, PullResult, account_cursor
from syncbridge.errors import CursorExpired, MalformedRecord, SyncbridgeError
from syncbridge.limits import MAX_RECORD_BYTES
from syncbridge.retry import unless_all_failed

from .client import OversizedAnswer, Resource
from .mapping import UID_SUFFIX, canonical_id_of, parse_calendar, resource_name

if TYPE_CHECKING:
    from .connector import CalDAVConnector

__all__ = ["Listing", "is_our_name", "pull"]

log = structlog.get_logger("syncbridge.caldav")
_OUR_PREFIX = resource_name("x")[: -len("x.ics")]


def is_our_name(href: str) -> bool:
    """Whether an href has the shape of a resource we create (``syncbridge-<id>.ics``)."""
    return unquote(href).rstrip("/").rsplit("/", 1)[-1].startswith(_OUR_PREFIX)


def _digest(href: str, etag: str | None) -> str:
    return hashlib.sha256(f"{href}\x1f{etag}".encode()).hexdigest()[:24]


async def pull(connector: CalDAVConnector, cursor: str | None) -> PullResult:
    """Changes since ``cursor`` (JSON: calendar URL -> sync token or ctag state, None for a calendar
    that could not be listed); None lists every calendar in full. Each calendar is read on its own."""
    calendars = await connector.calendars()
    state = account_cursor(cursor, calendars.values())
    listing = Listing(connector)
    failed: dict[str, SyncbridgeError] = {}
    listed: set[str] = set()
    before = listing.client.requests
    for clinician, url in calendars.items():
        kept, unreadable = len(listing.observations), listing.unreadable
        try:
            if (resting := connector.resting.check(clinician)) is not None:
                raise resting
            if state is None or state[url] is None:
                await listing.full(clinician, url, use_sync=connector.options.sync_method == "auto")
                listed.add(clinician)
            else:
                await listing.incremental(clinician, url, state[url])
        except CursorExpired:
            raise
        except SyncbridgeError as err:  # this calendar's own outcome: its part of the cursor stays as it was
            del listing.observations[kept:]
            listing.unreadable = unreadable
            listing.cursor[url] = None if state is None else state[url]
            failed[clinician] = connector.resting.note(clinician, err, f"calendar {url}")
            log.warning("calendar_unread", connector=connector.name, clinician=clinician, problem=str(failed[clinician]))
    full = state is None
    log.debug("pulled", connector=connector.name, full=full, observations=len(listing.observations),
              requests=listing.client.requests - before, failed=sorted(failed))
    return PullResult(
        listing.observations,
        json.dumps(listing.cursor, sort_keys=True),
        complete=full and not listing.unreadable,
        failed_accounts=unless_all_failed(failed, len(calendars)),
        listed_accounts=frozenset() if full or listing.unreadable else frozenset(listed),
    )


class Listing:
    """Accumulates one pull's observations and next cursor across the clinicians' calendars."""

    def __init__(self, connector: CalDAVConnector) -> None:
        self.connector = connector
        self.client = connector.client
        self.observations: list[Observation] = []
        self.cursor: dict[str, Any] = {}
        #: some of our events could not be read: the listing cannot claim to be complete
        self.unreadable = 0

    def _take(self, resource: Resource, clinician: str) -> bool:
        """Add our event as an observation; True if the resource is ours (readable or not)."""
        try:
            obs = self.connector.to_observation(resource, clinician)
        except MalformedRecord as err:
            try:
                ours = canonical_id_of(parse_calendar(resource.data or "")) is not None
            except MalformedRecord:
                ours = UID_SUFFIX in (resource.data or "")
            if ours:
                # reported to the engine, which skips it by name in the audit and the log
                self.unreadable += 1
                self.observations.append(Observation(external_id=resource.href, problem=str(err)))
            return ours
        if obs is None:
            return False
        self.observations.append(obs)
        return True

    async def full(self, clinician: str, url: str, *, use_sync: bool) -> None:
        """Every event of ours in the calendar, whatever its date (a linked event missing from a
        complete listing counts as deleted, so a time window would cancel old sessions)."""
        info = await self.client.collection(url)  # the token comes first: later changes replay
        if use_sync and info.sync_token:
            for resource in await self._ours(clinician, url):
                self._take(resource, clinician)
            self.cursor[url] = info.sync_token
            return
        ctag, etags = await self.client.members(url)
        ours: dict[str, str | None] = {}
        for resource in await self._ours(clinician, url, etags):
            if self._take(resource, clinician):
                ours[resource.href] = resource.etag or etags.get(resource.href)
        self.cursor[url] = {"ctag": ctag, "ours": ours, "seen": sorted(_digest(h, e) for h, e in etags.items() if h not in ours)}

    async def _ours(self, clinician: str, url: str, etags: dict[str, str] | None = None) -> list[Resource]:
        """Our events with their data in one calendar-query; one by one if the answer is too big to parse."""
        try:
            return await self.client.query(url, uid_contains=UID_SUFFIX)
        except OversizedAnswer:
            if etags is None:
                _, etags = await self.client.members(url)
            return await self._one_by_one(url, [h for h in etags if is_our_name(h)])

    async def _multiget(self, url: str, hrefs: list[str]) -> list[Resource]:
        try:
            return await self.client.multiget(url, hrefs)
        except OversizedAnswer:
            return await self._one_by_one(url, hrefs)

    async def _one_by_one(self, url: str, hrefs: list[str]) -> list[Resource]:
        """Fetch each resource alone, so one oversized event is skipped by name and the rest is read."""
        found: list[Resource] = []
        for href in hrefs:
            try:
                found += await self.client.multiget(url, [href])
            except OversizedAnswer:
                self.unreadable += 1
                problem = f"event {href} is over the {MAX_RECORD_BYTES:,}-byte limit for one record; it was skipped"
                self.observations.append(Observation(external_id=href, problem=problem))
        return found

    async def incremental(self, clinician: str, url: str, state: Any) -> None:
        if isinstance(state, str):
            await self._synced(clinician, url, state)
        elif isinstance(state, dict) and isinstance(state.get("ours"), dict):
            await self._polled(clinician, url, state)
        else:
            raise CursorExpired("the stored cursor has an unknown shape")

    async def _synced(self, clinician: str, url: str, token: str) -> None:
        """sync-collection from ``token`` (RFC 6578 section 3.2); deletions of our resources are
        reported, others (the clinician's own events) are not."""
        try:
            result = await self.client.sync(url, token)
        except OversizedAnswer as err:
            # the changes include an event too large to parse: the full listing reads one by one
            raise CursorExpired("a changed event is too large to read in one answer") from err
        missing: list[str] = []
        for item in result.changed:
            if item.calendar_data is not None:
                self._take(Resource(item.href, item.etag, item.calendar_data), clinician)
            else:
                missing.append(item.href)
        for resource in await self._multiget(url, missing):
            self._take(resource, clinician)
        for href in result.deleted:
            if is_our_name(href):
                self.observations.append(Observation(external_id=href, deleted=True))
        self.cursor[url] = result.sync_token or token

    async def _polled(self, clinician: str, url: str, state: dict[str, Any]) -> None:
        """ctag/ETag comparison: one PROPFIND when nothing changed, else a Depth 1 PROPFIND and
        one multiget of exactly the members whose ETag is new to us."""
        info = await self.client.collection(url)
        if info.ctag is not None and info.ctag == state.get("ctag"):
            self.cursor[url] = state
            return
        ctag, etags = await self.client.members(url)
        old: dict[str, str | None] = state["ours"]
        seen = set(state.get("seen", ()))
        fetch = [h for h, e in etags.items() if (old[h] != e if h in old else _digest(h, e) not in seen)]
        ours = {h: e for h, e in old.items() if h in etags and h not in fetch}
        for resource in await self._multiget(url, fetch):
            if self._take(resource, clinician):
                ours[resource.href] = resource.etag or etags.get(resource.href)
        for href in old:
            if href not in etags or (href in fetch and href not in ours):
                self.observations.append(Observation(external_id=href, deleted=True))
        self.cursor[url] = {"ctag": ctag, "ours": ours, "seen": sorted(_digest(h, e) for h, e in etags.items() if h not in ours)}
