"""The Graph wire layer: every request the connector makes, and the one table from answers to errors.

Knows Graph v1.0 calendar and subscription calls and nothing of appointments. At most four
requests per mailbox are in flight at once (Outlook's MailboxConcurrency limit,
learn.microsoft.com/graph/throttling-limits#outlook-service-limits). Every failure leaves as a
:mod:`syncbridge.errors` exception, translated here and only here; messages name the call and
Graph's error code, never event content.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json as jsonlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol
from urllib.parse import quote

import httpx

from syncbridge.errors import (
    BATCH_REFUSED, AuthError, BatchRefused, ConflictError, CursorExpired, PermanentError, RateLimited, TransientError, retry_after_seconds,
    unreachable,
)
from syncbridge.limits import json_object

__all__ = ["MAILBOX_CONCURRENCY", "MAX_BATCH", "BatchItem", "GraphClient", "TokenSource", "raise_for_status"]

#: "4 concurrent requests" per app and mailbox (learn.microsoft.com/graph/throttling-limits#outlook-service-limits)
MAILBOX_CONCURRENCY = 4
#: "JSON batch requests are currently limited to 20 individual requests" (learn.microsoft.com/graph/json-batching)
MAX_BATCH = 20
#: what a delta item keeps (see :meth:`GraphClient.delta`)
DELTA_KEYS = ("id", "@odata.etag", "transactionId", "@removed")
ACCESS_HINT = (
    "check the Calendars.ReadWrite permission and admin consent, and that the application access policy "
    "includes this mailbox (connectors/microsoft365/README.md)"
)


class TokenSource(Protocol):
    def token(self, clinician: str | None) -> Awaitable[str]: ...
    def invalidate(self, clinician: str | None) -> None: ...


def _code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])[:80]
    except (ValueError, KeyError, TypeError):
        return "unknown"


def raise_for_status(r: httpx.Response, what: str) -> NoReturn:
    """The one table from an unsuccessful Graph answer to what the caller must do (learn.microsoft.com/graph/errors)."""
    status, code = r.status_code, _code(r)
    if status == 401:
        raise AuthError(f"{what}: Graph refused the access token ({code})", action=ACCESS_HINT)
    if status == 403:
        raise AuthError(f"{what}: access denied ({code})", action=ACCESS_HINT)
    if status in (409, 412):
        raise ConflictError(f"{what}: the event changed since it was read ({status} {code})")
    if status == 410 or code in ("SyncStateNotFound", "SyncStateInvalid", "resyncRequired"):
        raise CursorExpired(f"{what}: the delta token is no longer accepted ({status} {code})")
    if status in (429, 503, 509):
        raise RateLimited(f"{what}: Graph asks to slow down ({status} {code})", retry_after=retry_after_seconds(r.headers.get("retry-after")))
    if status >= 500 or status in (408, 425):
        raise TransientError(f"{what}: server error ({status} {code})", retry_after=retry_after_seconds(r.headers.get("retry-after")))
    raise PermanentError(f"{what}: refused ({status} {code})")


def _body(r: httpx.Response, what: str) -> dict[str, Any]:
    # a page of events (one event is checked again by the connector); non-JSON is a proxy's page
    return json_object(r.content, what, limit=16 << 20, not_json=TransientError)


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request inside a ``$batch``: ``url`` relative to the Graph root, as the single call's."""

    method: str
    mailbox: str
    url: str
    what: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class GraphClient:
    """Thin async client for ``/users/{mailbox}/...`` calendar calls and ``/subscriptions``."""

    def __init__(self, graph_url: str, tokens: TokenSource, *, ca_bundle: Path | None = None, page_size: int = 100) -> None:
        self.graph_url = graph_url.rstrip("/")
        self.tokens = tokens
        self.page_size = page_size
        # one TLS context for every pool (loading the CA file once)
        self._verify = ssl.create_default_context(cafile=str(ca_bundle)) if ca_bundle else httpx.create_ssl_context()
        # calls that span mailboxes (batches, subscriptions): as many idle connections kept as calls
        # the outbox keeps in flight, so a burst of writes does not close and reopen them
        self._http = self._pool(64)
        # each mailbox's own calls on a pool of its own, as large as its concurrency: httpcore checks
        # every pooled connection before each request, which with one pool of 64 cost more CPU than
        # the rest of a write (bench/RESULTS.md, "single writes")
        self._mailbox_http: dict[str, httpx.AsyncClient] = {}
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._gathering: dict[str, asyncio.Lock] = {}
        self.requests = 0

    def _pool(self, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=30.0, verify=self._verify, limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def _http_for(self, slots: dict[str, int]) -> httpx.AsyncClient:
        """The mailbox's own pool for a call to one mailbox; the shared one for the rest."""
        if len(slots) != 1:
            return self._http
        mailbox = next(iter(slots))
        if not mailbox:
            return self._http
        pool = self._mailbox_http.get(mailbox)
        if pool is None:
            pool = self._mailbox_http[mailbox] = self._pool(MAILBOX_CONCURRENCY)
        return pool

    async def close(self) -> None:
        pools, self._mailbox_http = list(self._mailbox_http.values()), {}
        for pool in (self._http, *pools):
            await pool.aclose()

    def _sem(self, mailbox: str) -> asyncio.Semaphore:
        return self._sems.setdefault(mailbox.lower(), asyncio.Semaphore(MAILBOX_CONCURRENCY))

    @contextlib.asynccontextmanager
    async def _hold_one(self, mailbox: str, slots: int) -> AsyncIterator[None]:
        sem = self._sem(mailbox)
        if slots <= 1:
            async with sem:
                yield
            return
        held = 0
        try:
            async with self._gathering.setdefault(mailbox.lower(), asyncio.Lock()):
                for _ in range(slots):
                    await sem.acquire()
                    held += 1
            yield
        finally:
            for _ in range(held):
                sem.release()

    @contextlib.asynccontextmanager
    async def _hold(self, slots: dict[str, int]) -> AsyncIterator[None]:
        """Slots of each mailbox's concurrency (a batch runs up to four of its requests at once).
        Mailboxes are taken in one order, and several slots of one are gathered one holder at a
        time, so two holders never deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for mailbox in sorted(slots):
                await stack.enter_async_context(self._hold_one(mailbox, slots[mailbox]))
            yield

    async def request(
        self, method: str, url: str, what: str, *, clinician: str | None, mailbox: str = "", json: Any = None,
        headers: dict[str, str] | None = None, params: dict[str, str] | None = None, slots: dict[str, int] | None = None,
    ) -> httpx.Response:
        """One call under the mailbox's concurrency bound (a batch: ``slots`` of each mailbox's);
        a refused token is renewed once."""
        full = url if url.startswith("https://") or url.startswith("http://") else f"{self.graph_url}/{url.lstrip('/')}"
        for attempt in range(2):
            hdrs = {"Authorization": f"Bearer {await self.tokens.token(clinician)}", "Accept": "application/json", **(headers or {})}
            held = slots if slots is not None else {mailbox.lower(): 1}
            async with self._hold(held):
                self.requests += 1
                try:
                    r = await self._http_for(held).request(method, full, json=json, headers=hdrs, params=params)
                except httpx.HTTPError as err:
                    raise unreachable(what, err) from err
            if r.status_code == 401 and attempt == 0:
                self.tokens.invalidate(clinician)
                continue
            return r
        return r

    def _user(self, mailbox: str) -> str:
        return f"users/{quote(mailbox, safe='@')}"

    def events_url(self, mailbox: str, event_id: str | None = None) -> str:
        return f"{self._user(mailbox)}/events" + (f"/{quote(event_id, safe='')}" if event_id else "")

    async def batch(self, clinician: str | None, items: Sequence[BatchItem]) -> list[httpx.Response | Exception]:
        """Up to :data:`MAX_BATCH` requests in one ``POST /$batch`` with ``clinician``'s token (None:
        the app's); each answer, in order, as the response its single call would have had (or the
        translated error of the batch itself). Graph runs up to four of them at once, whatever their
        mailboxes, so the batch holds up to four slots of each mailbox it writes to."""
        if not 0 < len(items) <= MAX_BATCH:
            raise ValueError(f"a JSON batch holds 1 to {MAX_BATCH} requests")
        per_mailbox: dict[str, int] = {}
        for it in items:
            per_mailbox[it.mailbox.lower()] = min(MAILBOX_CONCURRENCY, per_mailbox.get(it.mailbox.lower(), 0) + 1)
        payload = {"requests": [
            {"id": str(i), "method": it.method, "url": "/" + it.url.lstrip("/"),
             "headers": ({"Content-Type": "application/json"} if it.body is not None else {}) | it.headers}
            | ({"body": it.body} if it.body is not None else {})
            for i, it in enumerate(items)
        ]}  # fmt: skip
        what = "POST $batch"
        try:
            r = await self.request("POST", "$batch", what, clinician=clinician, json=payload, slots=per_mailbox)
            if r.status_code in BATCH_REFUSED:  # the batch itself, not a request inside it
                raise BatchRefused(f"{what}: refused ({r.status_code} {_code(r)}); each request is sent on its own")
            if r.status_code >= 300:
                raise_for_status(r, what)
            answers = _body(r, what).get("responses")
        except Exception as err:  # noqa: BLE001 - the batch failed as a whole: every request gets its error
            return [copy.copy(err) for _ in items]
        by_id = {str(a.get("id")): a for a in answers if isinstance(a, dict)} if isinstance(answers, list) else {}
        self.requests += len(items) - 1
        out: list[httpx.Response | Exception] = []
        for i, it in enumerate(items):
            answer = by_id.get(str(i))
            if answer is None or not isinstance(answer.get("status"), int):
                out.append(TransientError(f"{it.what} (batch): no answer for this request"))
                continue
            body = answer.get("body")
            headers = {str(k): str(v) for k, v in (answer.get("headers") or {}).items()}
            content = b"" if body is None else jsonlib.dumps(body).encode()
            out.append(httpx.Response(answer["status"], headers=headers, content=content))
        return out

    # --- events ---------------------------------------------------------------------------------

    async def get_event(self, clinician: str, mailbox: str, event_id: str, *, expand: list[str] | None = None,
                        select: list[str] | None = None) -> dict[str, Any] | None:
        what = "GET event"
        params: dict[str, str] = {}
        if expand:
            params["$expand"] = "singleValueExtendedProperties($filter=" + " or ".join(f"id eq '{p}'" for p in expand) + ")"
        if select:
            params["$select"] = ",".join(select)
        r = await self.request("GET", f"{self._user(mailbox)}/events/{quote(event_id, safe='')}", what, clinician=clinician,
                               mailbox=mailbox, params=params, headers={"Prefer": 'outlook.timezone="UTC"'})
        if r.status_code == 404:
            return None
        if r.status_code >= 300:
            raise_for_status(r, what)
        return _body(r, what)

    async def create_event(self, clinician: str, mailbox: str, body: dict[str, Any]) -> dict[str, Any]:
        what = "POST events"
        r = await self.request("POST", f"{self._user(mailbox)}/events", what, clinician=clinician, mailbox=mailbox, json=body,
                               headers={"Prefer": 'outlook.timezone="UTC"'})
        if r.status_code >= 300:
            raise_for_status(r, what)
        return _body(r, what)

    async def update_event(self, clinician: str, mailbox: str, event_id: str, body: dict[str, Any], etag: str | None) -> dict[str, Any] | None:
        """PATCH under ``If-Match``; None when the event is gone."""
        what = "PATCH event"
        headers = {"Prefer": 'outlook.timezone="UTC"'} | ({"If-Match": etag} if etag else {})
        r = await self.request("PATCH", f"{self._user(mailbox)}/events/{quote(event_id, safe='')}", what, clinician=clinician,
                               mailbox=mailbox, json=body, headers=headers)
        if r.status_code == 404:
            return None
        if r.status_code >= 300:
            raise_for_status(r, what)
        return _body(r, what)

    async def delete_event(self, clinician: str, mailbox: str, event_id: str, etag: str | None) -> bool:
        """DELETE under ``If-Match``; False when it was already gone."""
        what = "DELETE event"
        r = await self.request("DELETE", f"{self._user(mailbox)}/events/{quote(event_id, safe='')}", what, clinician=clinician,
                               mailbox=mailbox, headers={"If-Match": etag} if etag else None)
        if r.status_code == 404:
            return False
        if r.status_code >= 300:
            raise_for_status(r, what)
        return True

    async def cancel_event(self, clinician: str, mailbox: str, event_id: str, comment: str) -> bool:
        """``POST /events/{id}/cancel`` (the organizer tells the attendees); False when already gone."""
        what = "POST event cancel"
        r = await self.request("POST", f"{self._user(mailbox)}/events/{quote(event_id, safe='')}/cancel", what, clinician=clinician,
                               mailbox=mailbox, json={"comment": comment})
        if r.status_code == 404:
            return False
        if r.status_code >= 300:
            raise_for_status(r, what)
        return True

    async def find_by_property(self, clinician: str, mailbox: str, property_id: str, value: str) -> list[dict[str, Any]]:
        """Events whose single-value extended property ``property_id`` equals ``value`` (id and etag only:
        a removal reads the attendees of the one it removes)."""
        what = "GET events?$filter"
        flt = f"singleValueExtendedProperties/Any(ep: ep/id eq '{property_id}' and ep/value eq '{value}')"
        r = await self.request("GET", f"{self._user(mailbox)}/events", what, clinician=clinician, mailbox=mailbox,
                               params={"$filter": flt, "$select": "id"})
        if r.status_code >= 300:
            raise_for_status(r, what)
        return [e for e in _body(r, what).get("value", []) if isinstance(e, dict)]

    async def _pages(self, clinician: str, mailbox: str, url: str, what: str, params: dict[str, str] | None,
                     on_page: Callable[[list[dict[str, Any]]], None]) -> dict[str, Any]:
        """Follow ``@odata.nextLink`` to the end; returns the last page (it holds a deltaLink if any)."""
        headers = {"Prefer": f'odata.maxpagesize={self.page_size}, outlook.timezone="UTC"'}
        while True:
            r = await self.request("GET", url, what, clinician=clinician, mailbox=mailbox, params=params, headers=headers)
            if r.status_code >= 300:
                raise_for_status(r, what)
            page = _body(r, what)
            on_page([e for e in page.get("value", []) if isinstance(e, dict)])
            if not page.get("@odata.nextLink"):
                return page
            url, params = str(page["@odata.nextLink"]), None

    async def delta(self, clinician: str, mailbox: str, *, link: str | None = None, window: tuple[datetime, datetime] | None = None,
                    reduce: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], str]:
        """A whole round of ``calendarView/delta``: every item and the new ``@odata.deltaLink``.

        Graph answers delta with whole events and takes no ``$select`` (learn.microsoft.com/graph/api/event-delta),
        so each page is reduced as it arrives: by ``reduce``, else to what decides whether an
        event must be read again (id, etag, ``transactionId``, ``@removed``). Nothing else of an
        event outlives its page, and a round listing thousands of events holds no event text."""
        what = "GET calendarView/delta"
        items: list[dict[str, Any]] = []

        def keep(page: list[dict[str, Any]]) -> None:
            items.extend(reduce(e) if reduce is not None else {k: e[k] for k in DELTA_KEYS if k in e} for e in page)

        params = None
        if link is None:
            assert window is not None
            link = f"{self._user(mailbox)}/calendarView/delta"
            params = {"startDateTime": _utc(window[0]), "endDateTime": _utc(window[1])}
        last = await self._pages(clinician, mailbox, link, what, params, keep)
        if not last.get("@odata.deltaLink"):
            raise TransientError(f"{what}: the round ended without a deltaLink")
        return items, str(last["@odata.deltaLink"])

    async def calendar_view(self, clinician: str, mailbox: str, window: tuple[datetime, datetime], *,
                            select: list[str] | None = None, expand: list[str] | None = None) -> list[dict[str, Any]]:
        """Every occurrence overlapping ``window`` (series expanded by Exchange), following nextLinks."""
        what = "GET calendarView"
        # the page size by $top: Graph documents Prefer: odata.maxpagesize for delta rounds only
        # (learn.microsoft.com/graph/delta-query-events), $top for listings (/graph/paging)
        params = {"startDateTime": _utc(window[0]), "endDateTime": _utc(window[1]), "$top": str(self.page_size)}
        if select:
            params["$select"] = ",".join(select)
        if expand:
            params["$expand"] = "singleValueExtendedProperties($filter=" + " or ".join(f"id eq '{p}'" for p in expand) + ")"
        items: list[dict[str, Any]] = []
        await self._pages(clinician, mailbox, f"{self._user(mailbox)}/calendarView", what, params, items.extend)
        return items

    # --- subscriptions ------------------------------------------------------------------------

    async def create_subscription(self, clinician: str | None, body: dict[str, Any]) -> dict[str, Any]:
        what = "POST subscriptions"
        r = await self.request("POST", "subscriptions", what, clinician=clinician, json=body)
        if r.status_code >= 300:
            raise_for_status(r, what)
        return _body(r, what)

    async def renew_subscription(self, clinician: str | None, sub_id: str, expires: datetime) -> dict[str, Any] | None:
        """PATCH ``expirationDateTime`` (renews and reauthorizes); None when the subscription is gone."""
        what = "PATCH subscription"
        r = await self.request("PATCH", f"subscriptions/{quote(sub_id, safe='')}", what, clinician=clinician,
                               json={"expirationDateTime": _utc(expires)})
        if r.status_code == 404:
            return None
        if r.status_code >= 300:
            raise_for_status(r, what)
        return _body(r, what)

    async def delete_subscription(self, clinician: str | None, sub_id: str) -> None:
        what = "DELETE subscription"
        r = await self.request("DELETE", f"subscriptions/{quote(sub_id, safe='')}", what, clinician=clinician)
        if r.status_code >= 300 and r.status_code != 404:
            raise_for_status(r, what)


def _utc(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
