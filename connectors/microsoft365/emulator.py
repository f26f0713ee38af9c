"""A Microsoft Graph v1.0 calendar subset and its identity platform, over TLS on loopback.

For the tests, the bench and ``syncbridge demo``. Follows the documented behaviour of:
- learn.microsoft.com/graph/api/user-post-events: ``POST /users/{id}/events`` -> 201 with the
  event; a repeated create carrying the same ``transactionId`` returns the event already made
  instead of a second one (resources/event: "avoid redundant POST operations in case of client
  retries"); ``transactionId`` is returned only when an app set it.
- learn.microsoft.com/graph/api/event-get, /event-update, /event-delete: ``@odata.etag``
  (``W/"<changeKey>"``) on every event; ``If-Match`` with a stale etag -> 412
  ``ErrorIrresolvableConflict``; PATCH answers 200 with the event, DELETE 204; unknown ids 404
  ``ErrorItemNotFound``; ``$select`` ("Without a $select parameter, all of the event properties
  will be returned"; ``id`` and ``@odata.etag`` always come; a name that is not a property of
  the event is a 400), and ``$expand=singleValueExtendedProperties($filter=id eq '...')``
  (resources/singlevaluelegacyextendedproperty); ``$filter`` on an extended property's id and
  value (/graph/api/singlevaluelegacyextendedproperty-get).
- learn.microsoft.com/graph/api/event-cancel: only an organizer's meeting with attendees can be
  cancelled (else 400), 202, the event moves to Deleted Items.
- learn.microsoft.com/graph/api/event-delta and /graph/delta-query-events: rounds of
  ``calendarView/delta`` pages linked by ``@odata.nextLink`` ($skiptoken) and closed by
  ``@odata.deltaLink`` ($deltatoken), ``Prefer: odata.maxpagesize``, deletions and changes outside
  the window as ``@removed`` (reason ``deleted``). Each item is the whole event, "the same
  properties you'd normally get from a GET /calendarView request. You cannot use $select to get
  only a subset", nor ``$expand``, ``$filter``, ``$orderby``, ``$search`` (event-delta, "OData
  query parameters"): the page does not say how Graph answers them, the emulator refuses them
  (400) so a client relying on them fails here first. An unknown or expired state token -> 410
  ``SyncStateNotFound``.
- learn.microsoft.com/graph/api/user-list-calendarview: occurrences overlapping the window,
  ``@odata.nextLink`` paging (``$skip``) with the page size asked by ``$top`` (/graph/paging;
  ``Prefer: odata.maxpagesize`` is documented for delta rounds only, so a listing ignores it),
  else Outlook's default of 10 (``listing_page_size``; /graph/api/user-list-messages: "The default
  page size is 10 ... Use $top to customize the page size, within the range of 1 and 1000", a
  larger ``$top`` is served as 1000), ``$select`` and ``$expand`` as for one event, except that
  ``createdDateTime`` and ``lastModifiedDateTime`` "do not support $select" (they are left out of
  a narrowed listing). Responses are in UTC unless ``Prefer: outlook.timezone``.
- learn.microsoft.com/graph/throttling (and /throttling-limits#outlook-service-limits): 429 or
  503 with ``Retry-After``; more than four concurrent requests per app and mailbox -> 429
  ``ApplicationThrottled`` (MailboxConcurrency).
- learn.microsoft.com/graph/errors: ``{"error": {"code", "message", "innerError"}}``.
- learn.microsoft.com/graph/json-batching: ``POST /v1.0/$batch``, see emulator_batch.py.
Identity: emulator_identity.py; subscriptions and notifications: emulator_notify.py. Not
emulated: recurring series (every event is a ``singleInstance``), attachments, other calendars.

For tests: ``log`` holds every request (method, path, and the query string in ``queries``);
:meth:`GraphEmulator.keep_bodies` turns on a bounded log of every response body sent, and of
every notification posted, so a test can see exactly what a client received.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import secrets
import threading
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from syncbridge.emulation import Injector

from .emulator_identity import Identity, TokenGrant
from .emulator_notify import Notifier, parse_when
from .emulator_store import (
    EVENT_PROPERTIES, MAX_CONCURRENT_PER_MAILBOX, Mailbox, apply_body, changes_since, copy_for_update, in_window, new_event, render, stamp,
)
from .tls import TLSFiles, make_tls_files, serve_tls_in_thread

__all__ = ["GraphEmulator", "Mailbox", "RunningGraph", "running"]

#: the largest ``$top`` Outlook serves (/graph/api/user-list-messages)
MAX_TOP = 1000

Handler = Callable[[Request, Mailbox | None, TokenGrant], Awaitable[Response]]


@dataclass
class GraphEmulator:
    """The in-memory tenant. ``app`` is the starlette application; knobs are plain methods."""

    tenant: str = field(default_factory=lambda: str(uuid.uuid4()))
    base_url: str = ""
    users: dict[str, Mailbox] = field(default_factory=dict)
    #: every request as (method, path): the tests and the bench count calls from it
    log: list[tuple[str, str]] = field(default_factory=list)
    #: the query string of each request in ``log`` (same index), decoded
    queries: list[dict[str, str]] = field(default_factory=list)
    #: (method, path, body) of the latest responses and notifications sent, when :meth:`keep_bodies` asked
    bodies: collections.deque[tuple[str, str, bytes]] | None = None
    #: the most requests seen in flight at once for each mailbox
    peak_inflight: dict[str, int] = field(default_factory=dict)
    #: seconds each Graph request takes (makes concurrency visible)
    latency: float = 0.0
    default_page_size: int = 100
    #: a calendarView page without ``$top`` (see the module docstring)
    listing_page_size: int = 10
    _failures: list[tuple[int, float | None]] = field(default_factory=list)
    _mailbox_faults: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # upn -> (status, Retry-After)
    #: the status every ``$batch`` request answers as a whole (an egress proxy that does not pass it)
    batch_refusal: int | None = None
    _states: dict[str, tuple[str, str, str, int]] = field(default_factory=dict)  # deltatoken -> (upn, start, end, seq)
    _pages: dict[str, tuple[list[dict[str, Any]], str]] = field(default_factory=dict)  # skiptoken -> (rest, closing link)
    _inflight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _lock: threading.RLock = field(default_factory=threading.RLock)
    #: the server's Injector: its error rate also fails requests inside a batch one by one
    injector: Injector | None = None
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.identity = Identity(self, self.tenant)
        self.notifier = Notifier(self)
        #: the routes, for the requests inside a batch
        self.router = self.app

    @property
    def resource(self) -> str:
        """The Graph resource URI tokens are issued for (``https://graph.microsoft.com`` in the cloud)."""
        return self.base_url

    @staticmethod
    def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        inner = {"date": stamp(datetime.now(UTC)), "request-id": str(uuid.uuid4()), "client-request-id": str(uuid.uuid4())}
        return JSONResponse({"error": {"code": code, "message": message, "innerError": inner}}, status, headers=headers)

    def record(self, request: Request) -> None:
        self.log.append((request.method, request.url.path))
        self.queries.append(dict(request.query_params))

    def keep_bodies(self, limit: int = 2000) -> None:
        """Keep the last ``limit`` response bodies (and notification payloads) sent, to see what a client received."""
        self.bodies = collections.deque(maxlen=limit)

    def sent(self, method: str, path: str, body: bytes) -> None:
        if self.bodies is not None:
            self.bodies.append((method, path, bytes(body)))

    def received(self, text: str) -> list[tuple[str, str]]:
        """(method, path) of every kept body that contains ``text``."""
        return [(m, p) for m, p, b in list(self.bodies or ()) if text.encode() in b or json.dumps(text)[1:-1].encode() in b]

    # --- knobs ----------------------------------------------------------------------------------

    def add_user(self, upn: str) -> Mailbox:
        with self._lock:
            return self.users.setdefault(upn.lower(), Mailbox(upn.lower(), str(uuid.uuid4())))

    def register_app(self, client_id: str, credential: str | bytes | None) -> None:
        """A secret (str), a certificate (PEM bytes) or None for a public client (device code)."""
        self.identity.clients[client_id] = credential

    def fail_next(self, status: int, n: int = 1, retry_after: float | None = None) -> None:
        """The next ``n`` Graph requests answer ``status`` (429 or 503) with ``Retry-After``."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * n)

    def fail_mailbox(self, upn: str, status: int | None, retry_after: float | None = None) -> None:
        """Every request for one mailbox answers ``status`` until called again with None: 403 is a
        mailbox an application access policy leaves out ("Access to OData is disabled",
        learn.microsoft.com/graph/auth-limit-mailbox-access), 404 one that was removed, 429 one
        throttled on its own (MailboxConcurrency, learn.microsoft.com/graph/throttling-limits)."""
        with self._lock:
            if status is None:
                self._mailbox_faults.pop(upn.lower(), None)
            else:
                self._mailbox_faults[upn.lower()] = (status, retry_after)

    def expire_sync_state(self) -> None:
        """Forget every delta state token, as Exchange does after a while (next use: 410)."""
        with self._lock:
            self._states.clear()
            self._pages.clear()

    def find_user(self, ref: str) -> str | None:
        ref = ref.lower()
        if ref in self.users:
            return ref
        return next((u.upn for u in self.users.values() if u.object_id == ref), None)

    def events_of(self, upn: str) -> list[dict[str, Any]]:
        """Every event in the mailbox as Graph renders it (with its extended properties)."""
        with self._lock:
            return [render(e, expand=None, all_ext=True) for e in self.users[upn.lower()].events.values()]

    # --- what a person does in Outlook --------------------------------------------------------

    def user_create(self, upn: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return render(self._create(self.users[upn.lower()], body), expand=None)

    def user_update(self, upn: str, event_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            box = self.users[upn.lower()]
            return render(self._update(box, box.events[event_id], changes), expand=None)

    def user_delete(self, upn: str, event_id: str) -> None:
        with self._lock:
            self._delete(self.users[upn.lower()], event_id)

    # --- storage ------------------------------------------------------------------------------

    def _touch(self, box: Mailbox, event: dict[str, Any], change: str) -> None:
        box.seq += 1
        box.changed[event["id"]] = box.seq
        if change != "deleted":
            event["changeKey"] = secrets.token_urlsafe(12)
            event["lastModifiedDateTime"] = stamp(datetime.now(UTC))
        self.notifier.changed(box.upn, event["id"], change, None if change == "deleted" else f'W/"{event["changeKey"]}"')

    def _create(self, box: Mailbox, body: dict[str, Any]) -> dict[str, Any]:
        event = new_event(box, body)
        box.events[event["id"]] = event
        if event.get("transactionId"):
            box.transactions[event["transactionId"]] = event["id"]
        self._touch(box, event, "created")
        return event
    def _update(self, box: Mailbox, event: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        if "transactionId" in body and body["transactionId"] != event.get("transactionId"):
            raise ValueError("transactionId cannot be changed after the event was created.")
        trial = copy_for_update(event)
        problem = apply_body(trial, body)
        if problem is not None:
            raise ValueError(problem)
        event.update(trial)
        self._touch(box, event, "updated")
        return event

    def _delete(self, box: Mailbox, event_id: str) -> None:
        event = box.events.pop(event_id)
        self._touch(box, event, "deleted")

    # --- HTTP ---------------------------------------------------------------------------------

    @property
    def app(self) -> Starlette:
        g = self._graph
        return Starlette(routes=[
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self.identity.discovery, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self.identity.token, methods=["POST"]),
            Route("/{tenant}/oauth2/v2.0/devicecode", self.identity.devicecode, methods=["POST"]),
            Route("/v1.0/users/{user}/calendarView/delta", g(self._delta), methods=["GET"]),
            Route("/v1.0/users/{user}/calendarView", g(self._calendar_view), methods=["GET"]),
            Route("/v1.0/users/{user}/events", g(self._events), methods=["GET", "POST"]),
            Route("/v1.0/users/{user}/events/{eid}", g(self._event), methods=["GET", "PATCH", "DELETE"]),
            Route("/v1.0/users/{user}/events/{eid}/cancel", g(self._cancel), methods=["POST"]),
            Route("/v1.0/$batch", self._batch, methods=["POST"]),
            Route("/v1.0/subscriptions", g(self._subscriptions), methods=["POST"]),
            Route("/v1.0/subscriptions/{sid}", g(self._subscription), methods=["GET", "PATCH", "DELETE"]),
            Route("/v1.0/subscriptions/{sid}/reauthorize", g(self._subscription), methods=["POST"]),
        ])

    def _graph(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Log, throttle, authenticate, find the mailbox and bound per-mailbox concurrency."""

        async def endpoint(request: Request) -> Response:
            self.record(request)
            with self._lock:
                failure = self._failures.pop(0) if self._failures else None
            if failure is not None:
                status, retry_after = failure
                headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
                if status == 429:
                    return self.error(429, "TooManyRequests", "Too many requests. Please retry after the time in Retry-After.", headers)
                return self.error(status, "ServiceNotAvailable", "The service is temporarily unavailable. Please retry later.", headers)
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            grant = self.identity.grant_for(token) if scheme.lower() == "bearer" else None
            if grant is None:
                return self.error(401, "InvalidAuthenticationToken", "Access token is empty, malformed or expired.",
                                  {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})
            box: Mailbox | None = None
            if "user" in request.path_params:
                upn = self.find_user(request.path_params["user"])
                if upn is None:
                    return self.error(404, "ErrorInvalidUser", f"The requested user '{request.path_params['user']}' is invalid.")
                if not grant.app_only and grant.user != upn:
                    return self.error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
                fault = self._mailbox_faults.get(upn)
                if fault is not None:
                    return self._mailbox_fault(*fault)
                box = self.users[upn]
            key = box.upn if box else ""
            with self._lock:
                self._inflight[key] += 1
                self.peak_inflight[key] = max(self.peak_inflight.get(key, 0), self._inflight[key])
                busy = box is not None and self._inflight[key] > MAX_CONCURRENT_PER_MAILBOX
            try:
                if busy:
                    return self.error(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.", {"Retry-After": "1"})
                if self.latency:
                    await asyncio.sleep(self.latency)
                response = await handler(request, box, grant)
                self.sent(request.method, request.url.path, response.body)
                return response
            finally:
                with self._lock:
                    self._inflight[key] -= 1

        return endpoint

    def _mailbox_fault(self, status: int, retry_after: float | None) -> Response:
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        if status == 403:
            return self.error(403, "ErrorAccessDenied", "Access to OData is disabled.")
        if status == 404:
            return self.error(404, "ErrorInvalidUser", "The requested user is invalid.")
        if status == 429:
            return self.error(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.", headers)
        return self.error(status, "ServiceNotAvailable", "The service is temporarily unavailable. Please retry later.", headers)

    async def _json(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return self.error(400, "BadRequest", "Unable to read JSON request payload.")
        except ClientDisconnect:  # the client went away mid-request (a killed daemon): nothing to answer
            return Response(status_code=499)
        if not isinstance(body, dict):
            return self.error(400, "BadRequest", "The request body must be a JSON object.")
        return body

    @staticmethod
    def _out_zone(request: Request) -> str:
        for part in request.headers.get("prefer", "").split(","):
            name, _, value = part.strip().partition("=")
            if name.strip().lower() == "outlook.timezone":
                return value.strip().strip('"')
        return "UTC"

    @staticmethod
    def _page_size(request: Request, default: int) -> int:
        for part in request.headers.get("prefer", "").split(","):
            name, _, value = part.strip().partition("=")
            if name.strip().lower() == "odata.maxpagesize" and value.strip().isdigit():
                return max(1, int(value))
        return default

    def _select(self, request: Request, *, listing: bool = False) -> list[str] | None | Response:
        """The properties ``$select`` names (None: all); a 400 for a name that is not an event
        property. A listing (calendarView) leaves out ``createdDateTime`` and ``lastModifiedDateTime``,
        which it does not return under ``$select`` (learn.microsoft.com/graph/api/user-list-calendarview)."""
        text = request.query_params.get("$select")
        if not text:
            return None
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [n for n in names if n not in EVENT_PROPERTIES]
        if unknown:
            return self.error(400, "RequestBroker--ParseUri", f"Could not find a property named '{unknown[0]}' on type 'microsoft.graph.event'.")
        if listing:
            names = [n for n in names if n not in ("createdDateTime", "lastModifiedDateTime")]
        return names or ["id"]

    @staticmethod
    def _expand(request: Request) -> list[str] | None:
        """Extended property ids named in ``$expand=singleValueExtendedProperties($filter=id eq '...' or ...)``."""
        text = request.query_params.get("$expand")
        if not text:
            return None
        return [part.split("'")[1] for part in text.split(" eq ")[1:] if "'" in part]

    async def _events(self, request: Request, box: Mailbox | None, grant: TokenGrant) -> Response:
        assert box is not None
        if request.method == "GET":
            wanted = request.query_params.get("$filter", "")
            with self._lock:
                found = list(box.events.values())
                if wanted:
                    quoted = wanted.split("'")
                    if "singleValueExtendedProperties/Any" not in wanted or len(quoted) < 4:
                        return self.error(400, "ErrorInvalidUrlQueryFilter", "The filter expression is not supported by the emulator.")
                    pid, value = quoted[1].lower(), quoted[3]
                    found = [e for e in found if e["_ext"].get(pid, (None, None))[1] == value]
                select = self._select(request)
                if isinstance(select, Response):
                    return select
                value_list = [render(e, expand=self._expand(request), zone=self._out_zone(request), select=select) for e in found]
            return JSONResponse({"value": value_list})
        body = await self._json(request)
        if isinstance(body, Response):
            return body
        with self._lock:
            tid = body.get("transactionId")
            existing = box.events.get(box.transactions.get(tid, "")) if tid else None
            try:
                event = existing or self._create(box, body)
            except ValueError as err:
                return self.error(400, "ErrorInvalidRequest", str(err))
            out = render(event, expand=None, zone=self._out_zone(request))
        return JSONResponse(out, 201, headers={"Location": f"{self.base_url}/v1.0/users/{box.object_id}/events/{event['id']}"})

    async def _event(self, request: Request, box: Mailbox | None, grant: TokenGrant) -> Response:
        assert box is not None
        body = await self._json(request) if request.method == "PATCH" else {}
        if isinstance(body, Response):
            return body
        with self._lock:
            event = box.events.get(request.path_params["eid"])
            if event is None:
                return self.error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            match = request.headers.get("if-match")
            if request.method != "GET" and match and match not in ("*", f'W/"{event["changeKey"]}"'):
                return self.error(412, "ErrorIrresolvableConflict", "The send or update operation could not be performed because the "
                                  "change key passed in the request does not match the current change key for the item.")
            if request.method == "DELETE":
                self._delete(box, event["id"])
                return Response(status_code=204)
            if request.method == "PATCH":
                try:
                    self._update(box, event, body)
                except ValueError as err:
                    return self.error(400, "ErrorInvalidRequest", str(err))
            select = self._select(request) if request.method == "GET" else None
            if isinstance(select, Response):
                return select
            return JSONResponse(render(event, expand=self._expand(request), zone=self._out_zone(request), select=select))

    async def _cancel(self, request: Request, box: Mailbox | None, grant: TokenGrant) -> Response:
        assert box is not None
        with self._lock:
            event = box.events.get(request.path_params["eid"])
            if event is None:
                return self.error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            if not event.get("attendees"):
                return self.error(400, "ErrorInvalidRequest", "Your request can't be completed. You need to be an organizer to cancel a meeting.")
            self._delete(box, event["id"])
        return Response(status_code=202)

    def _window(self, request: Request) -> tuple[datetime, datetime] | Response:
        q = request.query_params
        start, end = parse_when(q.get("startDateTime") or q.get("startdatetime")), parse_when(q.get("endDateTime") or q.get("enddatetime"))
        if start is None or end is None:
            return self.error(400, "ErrorInvalidParameter", "This request requires a time window specified by the query string "
                              "parameters StartDateTime and EndDateTime.")
        return start, end

    async def _calendar_view(self, request: Request, box: Mailbox | None, grant: TokenGrant) -> Response:
        assert box is not None
        window = self._window(request)
        if isinstance(window, Response):
            return window
        top, skip_text = request.query_params.get("$top", str(self.listing_page_size)), request.query_params.get("$skip", "0")
        if not top.isdigit() or int(top) < 1 or not skip_text.isdigit():
            return self.error(400, "BadRequest", "Invalid $top or $skip value.")
        size, skip = min(int(top), MAX_TOP), int(skip_text)
        select = self._select(request, listing=True)
        if isinstance(select, Response):
            return select
        with self._lock:
            found = in_window(box, *window)
            page = [render(e, expand=self._expand(request), zone=self._out_zone(request), select=select) for e in found[skip : skip + size]]
        out: dict[str, Any] = {"value": page}
        if skip + size < len(found):
            params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("$skip", "$top")] + [("$top", str(size)), ("$skip", str(skip + size))]
            out["@odata.nextLink"] = f"{self.base_url}{request.url.path}?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params)
        return JSONResponse(out)

    async def _delta(self, request: Request, box: Mailbox | None, grant: TokenGrant) -> Response:
        """One page of a delta round (see the module docstring)."""
        assert box is not None
        q = request.query_params
        if any(k in q for k in ("$select", "$expand", "$filter", "$orderby", "$search")):
            return self.error(400, "ErrorInvalidUrlQuery", "The following parameters are not supported with change tracking over "
                              "the 'CalendarView' resource: '$orderby, $filter, $select, $expand, $search'.")
        size = self._page_size(request, self.default_page_size)
        zone = self._out_zone(request)
        path = f"{self.base_url}/v1.0/users/{box.upn}/calendarView/delta"
        with self._lock:
            if "$skiptoken" in q:
                held = self._pages.pop(q["$skiptoken"], None)
                if held is None:
                    return self.error(410, "SyncStateNotFound", "The sync state generation is not found or has expired.")
                items, closing = held
            else:
                if "$deltatoken" in q:
                    state = self._states.get(q["$deltatoken"])
                    if state is None or state[0] != box.upn:
                        return self.error(410, "SyncStateNotFound", "The sync state generation is not found or has expired.")
                    _, start_text, end_text, since = state
                    start, end = datetime.fromisoformat(start_text), datetime.fromisoformat(end_text)
                    items = changes_since(box, start, end, since, zone)
                else:
                    window = self._window(request)
                    if isinstance(window, Response):
                        return window
                    start, end = window
                    items = [render(e, expand=None, zone=zone) for e in in_window(box, start, end)]
                token = secrets.token_urlsafe(24)
                self._states[token] = (box.upn, start.isoformat(), end.isoformat(), box.seq)
                closing = f"{path}?$deltatoken={token}"
            page, rest = items[:size], items[size:]
            out: dict[str, Any] = {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(event)", "value": page}
            if rest:
                skip = secrets.token_urlsafe(24)
                self._pages[skip] = (rest, closing)
                out["@odata.nextLink"] = f"{path}?$skiptoken={skip}"
            else:
                out["@odata.deltaLink"] = closing
        return JSONResponse(out, headers={"Preference-Applied": f"odata.maxpagesize={size}"})

    async def _batch(self, request: Request) -> Response:
        from .emulator_batch import run_batch

        if self.batch_refusal is not None:
            self.record(request)
            return self.error(self.batch_refusal, "BadRequest", "Invalid request.")

        return await run_batch(self, request)

    async def _subscriptions(self, request: Request, box: Mailbox | None, grant: TokenGrant) -> Response:
        body = await self._json(request)
        if isinstance(body, Response):
            return body
        return await self.notifier.create(request, body, grant.app_only, grant.user)

    async def _subscription(self, request: Request, box: Mailbox | None, grant: TokenGrant) -> Response:
        body = await self._json(request) if request.method == "PATCH" else None
        if isinstance(body, Response):
            return body
        return await self.notifier.instance(request, body)


@dataclass
class RunningGraph:
    emulator: GraphEmulator
    base_url: str
    tls: TLSFiles
    stop: Callable[[], None]
    #: counts requests and injects latency and failures, like every emulator's (syncbridge.emulation)
    injector: Injector

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_file

    @property
    def authority_host(self) -> str:
        return self.base_url

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"


def running(workdir: Path, emulator: GraphEmulator | None = None) -> RunningGraph:
    """Serve ``emulator`` over HTTPS on a free loopback port with a fresh CA (its file: ``.ca_file``)."""
    from syncbridge.emulation import free_port

    emu = emulator or GraphEmulator()
    tls = make_tls_files(workdir)
    port = free_port()
    emu.base_url = f"https://127.0.0.1:{port}"
    server = serve_tls_in_thread(emu.app, tls, port=port)
    emu.injector = server.injector
    emu.notifier.start()

    def stop() -> None:
        emu.notifier.stop()
        server.stop()

    return RunningGraph(emu, emu.base_url, tls, stop, server.injector)
