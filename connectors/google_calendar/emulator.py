"""A Google Calendar API v3 server on loopback, for tests and ``syncbridge demo``.

Faithful to the documented behaviour the connector relies on, cited by page:

- Events (https://developers.google.com/workspace/calendar/api/v3/reference/events): ``list``,
  ``get``, ``insert`` (client-chosen ids in base32hex, 5-1024 chars; an id in use, even by a
  deleted event, answers 409 ``duplicate``), ``update``, ``patch``, ``delete`` (204; 410
  ``deleted`` when already deleted), ``instances``; ``If-Match`` on writes answers 412
  ``conditionNotMet`` on a stale etag; recurring events expand with ``singleEvents=true``
  (``orderBy=startTime`` needs it); deleted events stay as ``status: cancelled`` tombstones,
  shown with ``showDeleted`` and always in incremental syncs, "only guaranteed to have the id
  field populated"; ``privateExtendedProperty`` filters.
- Partial responses (https://developers.google.com/workspace/calendar/api/guides/performance#partial-response):
  ``fields`` on events.list, get, insert, update, patch and instances, alone or as batch parts, with
  the documented syntax (``a,b``, ``a/b``, ``a(b,c)``, ``*``; emulator_events.parse_fields). A
  standard feature of every Google API, so always on.
- Sync (https://developers.google.com/workspace/calendar/api/guides/sync): ``nextSyncToken`` only
  on the last page; an invalid or expired token answers 410 ``fullSyncRequired``; a sync token with
  ``timeMin``/``timeMax``/``updatedMin``/``q``/``iCalUID``/``orderBy``/``privateExtendedProperty``
  or ``showDeleted=false`` is a 400.
- Push (https://developers.google.com/workspace/calendar/api/guides/push): see emulator_push.py.
- Errors (https://developers.google.com/workspace/calendar/api/guides/errors): every error in the
  ``{"error": {"errors": [...], "code", "message"}}`` form; injectable throttling as 403
  ``rateLimitExceeded`` / ``userRateLimitExceeded`` (domain ``usageLimits``) or 429, with
  ``Retry-After`` when asked.
- Batch (https://developers.google.com/workspace/calendar/api/guides/batch): ``POST
  /batch/calendar/v3`` with up to 1000 ``multipart/mixed`` parts of ``application/http``, run in
  any order; each part counts as a call of its own and gets its own status (emulator_batch.py),
  the batch is one HTTP request (the Injector's count).
- OAuth: see emulator_auth.py.

``log`` records ``(method, path)`` of every request (batch parts included) so tests and the
benchmark count calls; ``record_wire`` also keeps, bounded, each request's query and the body
answered (``wire``), so a test can tell what reached the client.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from syncbridge.emulation import Injector, free_port, serve_in_thread

from .emulator_auth import AuthServer, Grant, new_service_account_key
from .emulator_batch import run_batch
from .emulator_events import (
    EVENT_ID, READ_ONLY, Answer, ApiError, default_horizon, encode, expand, minimal, parse_fields, pick, rfc3339, validate_times,
)
from .emulator_listing import Calendar, instances, public, select
from .emulator_push import DEFAULT_TTL, MAX_TTL, Channel, Deliverer, address_problem

__all__ = ["API_PREFIX", "CALENDAR_SCOPES", "Exchange", "GoogleCalendarEmulator", "Running", "running"]

API_PREFIX = "/calendar/v3"
CALENDAR_SCOPES = frozenset({"https://www.googleapis.com/auth/calendar", "https://www.googleapis.com/auth/calendar.events"})


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request as answered (a batch part is one of its own; the batch's multipart answer too)."""

    method: str
    path: str
    query: str
    status: int
    body: bytes


@dataclass
class GoogleCalendarEmulator:
    """The in-memory service; knobs are plain methods, ``app`` is the ASGI application."""

    base_url: str = ""
    page_size: int = 250
    auth: AuthServer = field(default_factory=AuthServer)
    calendars: dict[str, Calendar] = field(default_factory=dict)
    channels: dict[str, Channel] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    _failures: list[tuple[int, str, float | None]] = field(default_factory=list)
    _calendar_faults: dict[str, tuple[int, str, float | None]] = field(default_factory=dict)  # id -> (status, reason, Retry-After)
    #: the status every batch request answers as a whole (an egress proxy that does not pass the path)
    batch_refusal: int | None = None
    _pages: dict[str, tuple[list[dict[str, Any]], str | None]] = field(default_factory=dict)
    _etags: itertools.count = field(default_factory=lambda: itertools.count(int(time.time() * 1000) * 1000))
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _deliverer: Deliverer | None = None
    #: the server's Injector: its error rate also fails batch parts one by one
    injector: Injector | None = None
    _rng: random.Random = field(default_factory=random.Random)
    #: the last requests with their answers' bodies (``record_wire``); None while off
    wire: deque[Exchange] | None = None

    # --- knobs ---------------------------------------------------------------------------------

    def add_user(self, email: str, time_zone: str = "UTC") -> None:
        """A Workspace account with its primary calendar (whose id is the address)."""
        self.auth.users.add(email)
        self.calendars.setdefault(email, Calendar(email, email, time_zone))

    def add_service_account(self, client_email: str, scopes: set[str] | None = None) -> dict[str, Any]:
        """A service account with domain-wide delegation for ``scopes``; returns its JSON key."""
        info, public = new_service_account_key(client_email, f"{self.base_url}/token")
        self.auth.add_service_account(client_email, info["client_id"], public, scopes or {"https://www.googleapis.com/auth/calendar.events"})
        return info

    def add_oauth_client(self) -> tuple[str, str]:
        client_id = f"{secrets.randbelow(10**12)}-{secrets.token_hex(8)}.apps.googleusercontent.com"
        secret = "GOCSPX-" + secrets.token_urlsafe(20)
        self.auth.oauth_clients[client_id] = secret
        return client_id, secret

    def fail_next(self, status: int, n: int = 1, *, reason: str = "rateLimitExceeded", retry_after: float | None = None) -> None:
        """The next ``n`` API requests answer ``status`` (403 with ``reason``, or 429)."""
        self._failures.extend([(status, reason, retry_after)] * n)

    def fail_calendar(self, calendar: str, status: int | None, reason: str = "forbidden", retry_after: float | None = None) -> None:
        """Every request for one calendar answers ``status`` until called again with None: 403
        ``forbidden`` (its owner no longer shares it), 404 ``notFound`` (deleted), 403
        ``rateLimitExceeded`` or 429 (that user's quota, developers.google.com/calendar/api/guides/quota)."""
        if status is None:
            self._calendar_faults.pop(calendar, None)
        else:
            self._calendar_faults[calendar] = (status, reason, retry_after)

    def expire_sync_tokens(self, calendar: str | None = None) -> None:
        """Invalidate every sync token issued so far (Google does this on ACL changes or token age)."""
        for cal in self.calendars.values():
            if calendar is None or cal.id == calendar:
                cal.epoch = secrets.token_hex(4)

    def user_insert(self, calendar: str, body: dict[str, Any]) -> dict[str, Any]:
        """An event a person creates in Calendar (the web UI picks the id)."""
        with self._lock:
            return self._insert(self.calendars[calendar], dict(body) | {"id": secrets.token_hex(13)}, self.calendars[calendar].owner)

    def user_patch(self, calendar: str, event_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return self._write(self.calendars[calendar], event_id, changes, None, patch=True)

    def user_delete(self, calendar: str, event_id: str) -> None:
        with self._lock:
            self._delete(self.calendars[calendar], event_id, None)

    def event(self, calendar: str, event_id: str) -> dict[str, Any] | None:
        ev = self.calendars[calendar].events.get(event_id)
        return public(ev) if ev is not None else None

    def live_events(self, calendar: str) -> list[dict[str, Any]]:
        return [public(e) for e in self.calendars[calendar].events.values() if e["status"] != "cancelled"]

    def record_wire(self, limit: int = 5000) -> None:
        """Keep the last ``limit`` exchanges (query and body answered) in ``wire``, for tests."""
        self.wire = deque(maxlen=limit)

    def settle(self) -> None:
        """Wait for queued push notifications to be attempted."""
        if self._deliverer is not None:
            self._deliverer.settle()

    @property
    def deliveries(self) -> list[Any]:
        return list(self._deliverer.delivered) if self._deliverer else []

    def close(self) -> None:
        if self._deliverer is not None:
            self._deliverer.stop()

    # --- HTTP ------------------------------------------------------------------------------------

    @property
    def app(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return Starlette(routes=[Route("/{path:path}", self._asgi, methods=methods)])

    async def _asgi(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode().split("?")[0]
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = self.handle(request.method, path, request.url.query, headers, await request.body())
        if answer.status in (301, 302):
            return RedirectResponse(answer.body, answer.status)
        if isinstance(answer.body, bytes):
            return Response(answer.body, answer.status, headers=answer.headers)
        if answer.body is None:
            return Response(status_code=answer.status, headers=answer.headers)
        return Response(encode(answer.body), answer.status, headers=answer.headers, media_type="application/json; charset=UTF-8")

    def handle(self, method: str, raw_path: str, query: str, headers: dict[str, str], body: bytes) -> Answer:
        """One request (from HTTP or a batch part); ``raw_path`` still percent-encoded."""
        segments = [unquote(s) for s in raw_path.strip("/").split("/")]
        path = "/" + "/".join(segments)
        self.log.append((method, path))
        answer = self._answer(method, path, segments, query, headers, body)
        if self.wire is not None:
            self.wire.append(Exchange(method, path, query, answer.status, encode(answer.body)))
        return answer

    def _answer(self, method: str, path: str, segments: list[str], query: str, headers: dict[str, str], body: bytes) -> Answer:
        q = {k: v for k, v in parse_qs(query, keep_blank_values=True).items()}
        try:
            if path == "/token" and method == "POST":
                status, payload = self.auth.token(body, headers.get("authorization"))
                return Answer(status, payload, {"Cache-Control": "no-store"})
            if path == "/o/oauth2/auth" and method == "GET":
                status, target = self.auth.authorize({k: v[0] for k, v in q.items()})
                return Answer(status, target)
            if path == "/batch/calendar/v3" and method == "POST":
                if self.batch_refusal is not None:
                    raise ApiError(self.batch_refusal, "notFound", "Not Found")
                return run_batch(self.handle, headers, body, injector=self.injector, rng=self._rng, log=self.log)
            if segments[:2] != ["calendar", "v3"]:
                raise ApiError(404, "notFound", "Not Found")
            grant = self._gate(headers)
            with self._lock:
                return self._route(method, segments[2:], q, headers, body, grant)
        except ApiError as err:
            return Answer(err.status, err.body, err.headers)

    def _gate(self, headers: dict[str, str]) -> Grant:
        if self._failures:
            status, reason, retry_after = self._failures.pop(0)
            extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            message = "User Rate Limit Exceeded" if reason == "userRateLimitExceeded" else "Rate Limit Exceeded"
            raise ApiError(status, reason if status == 403 else "rateLimitExceeded", message, domain="usageLimits", headers=extra)
        grant = self.auth.grant_for(headers.get("authorization"))
        if grant is None:
            raise ApiError(401, "authError", "Invalid Credentials", location="Authorization", location_type="header",
                           headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})
        if not grant.scopes & CALENDAR_SCOPES:
            raise ApiError(403, "insufficientPermissions", "Request had insufficient authentication scopes.")
        return grant

    def _calendar(self, calendar_id: str, grant: Grant) -> Calendar:
        cal = self.calendars.get(grant.principal if calendar_id == "primary" else calendar_id)
        if cal is None or cal.owner != grant.principal:
            raise ApiError(404, "notFound", "Not Found")
        fault = self._calendar_faults.get(cal.id)
        if fault is not None:
            status, reason, retry_after = fault
            extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            message = {"forbidden": "Forbidden", "notFound": "Not Found"}.get(reason, "Rate Limit Exceeded")
            raise ApiError(status, reason, message, headers=extra)
        return cal

    def _route(self, method: str, rest: list[str], q: dict[str, list[str]], headers: dict[str, str], body: bytes, grant: Grant) -> Answer:
        one = {k: v[-1] for k, v in q.items()}
        fields = parse_fields(one["fields"]) if one.get("fields") else None
        if rest == ["channels", "stop"] and method == "POST":
            return self._stop(_json(body), grant)
        if len(rest) < 3 or rest[0] != "calendars" or rest[2] != "events":
            raise ApiError(404, "notFound", "Not Found")
        cal = self._calendar(rest[1], grant)
        tail = rest[3:]
        if not tail and method == "GET":
            return Answer(200, pick(self._list(cal, q, one), fields))
        if not tail and method == "POST":
            return Answer(200, pick(self._insert(cal, _json(body), grant.principal), fields))
        if tail == ["watch"] and method == "POST":
            return Answer(200, self._watch(cal, _json(body), grant, rest[1]))
        if len(tail) == 2 and tail[1] == "instances" and method == "GET":
            master = self._find(cal, tail[0])
            if not master.get("recurrence") or master["status"] == "cancelled":
                raise ApiError(404, "notFound", "Not Found")
            return Answer(200, pick(instances(cal, master, one), fields))
        if len(tail) != 1:
            raise ApiError(404, "notFound", "Not Found")
        event_id, match = tail[0], headers.get("if-match")
        if method == "GET":
            ev = self._find(cal, event_id, store=False)
            return Answer(200, pick(minimal(ev) if ev["status"] == "cancelled" else public(ev), fields))
        if method in ("PUT", "PATCH"):
            return Answer(200, pick(self._write(cal, event_id, _json(body), match, patch=method == "PATCH"), fields))
        if method == "DELETE":
            self._delete(cal, event_id, match)
            return Answer(204)
        raise ApiError(405, "httpMethodNotAllowed", "Method not allowed")

    # --- events ---------------------------------------------------------------------------------------

    def _find(self, cal: Calendar, event_id: str, *, store: bool = True) -> dict[str, Any]:
        ev = cal.events.get(event_id)
        if ev is None and "_" in event_id:
            ev = self._materialize(cal, event_id, store)
        if ev is None:
            raise ApiError(404, "notFound", "Not Found")
        return ev

    def _materialize(self, cal: Calendar, event_id: str, store: bool) -> dict[str, Any] | None:
        """An occurrence of a recurring event, stored as an exception so it can be changed alone."""
        master = cal.events.get(event_id.rsplit("_", 1)[0])
        if master is None or master["status"] == "cancelled" or not master.get("recurrence"):
            return None
        lo, hi = default_horizon(master, cal.time_zone)
        for inst in expand(master, lo, hi, cal.time_zone):
            if inst["id"] == event_id:
                inst |= {"_seq": master["_seq"], "etag": master["etag"], "updated": master["updated"]}
                if store:
                    cal.events[event_id] = inst
                return inst
        return None

    def _stamp(self, cal: Calendar, ev: dict[str, Any]) -> dict[str, Any]:
        cal.seq += 1
        ev["_seq"] = cal.seq
        ev["etag"] = f'"{next(self._etags)}"'
        ev["updated"] = rfc3339(datetime.now(UTC))
        self._notify(cal)
        return ev

    def _insert(self, cal: Calendar, body: dict[str, Any], principal: str) -> dict[str, Any]:
        event_id = body.get("id") or secrets.token_hex(13)
        if not isinstance(event_id, str) or not EVENT_ID.match(event_id):
            raise ApiError(400, "invalid", "Invalid resource id value.")
        if event_id in cal.events:
            raise ApiError(409, "duplicate", "The requested identifier already exists.")
        validate_times(body, cal.time_zone)
        now = rfc3339(datetime.now(UTC))
        ev = {k: v for k, v in body.items() if k not in READ_ONLY} | {
            "kind": "calendar#event",
            "id": event_id,
            "status": body.get("status") or "confirmed",
            "htmlLink": f"https://www.google.com/calendar/event?eid={base64.urlsafe_b64encode(event_id.encode()).decode().rstrip('=')}",
            "created": now,
            "creator": {"email": principal, "self": True},
            "organizer": {"email": cal.id, "self": True},
            "iCalUID": f"{event_id}@google.com",
            "sequence": int(body.get("sequence") or 0),
        }
        cal.events[event_id] = ev
        return public(self._stamp(cal, ev))

    def _write(self, cal: Calendar, event_id: str, body: dict[str, Any], match: str | None, *, patch: bool) -> dict[str, Any]:
        ev = self._find(cal, event_id)
        if match is not None and match != ev["etag"]:
            raise ApiError(412, "conditionNotMet", "Precondition Failed", location="If-Match", location_type="header")
        incoming = {k: v for k, v in body.items() if k not in READ_ONLY and k != "id"}
        keep = {k: ev[k] for k in READ_ONLY | {"id", "_seq", "originalStartTime"} if k in ev}
        merged = _merge(ev, incoming) if patch else keep | incoming
        merged.setdefault("status", "confirmed")
        if merged["status"] != "cancelled":
            validate_times(merged, cal.time_zone)
        if merged.get("start") != ev.get("start") or merged.get("end") != ev.get("end"):
            merged["sequence"] = int(ev.get("sequence") or 0) + 1
        cal.events[event_id] = merged
        return public(self._stamp(cal, merged))

    def _delete(self, cal: Calendar, event_id: str, match: str | None) -> None:
        ev = self._find(cal, event_id)
        if ev["status"] == "cancelled":
            raise ApiError(410, "deleted", "Resource has been deleted")
        if match is not None and match != ev["etag"]:
            raise ApiError(412, "conditionNotMet", "Precondition Failed", location="If-Match", location_type="header")
        ev["status"] = "cancelled"
        self._stamp(cal, ev)
        if ev.get("recurrence"):  # the whole series goes, exceptions included
            for other in cal.events.values():
                if other.get("recurringEventId") == event_id and other["status"] != "cancelled":
                    other["status"] = "cancelled"
                    self._stamp(cal, other)

    # --- listing ----------------------------------------------------------------------------------------

    def _list(self, cal: Calendar, q: dict[str, list[str]], one: dict[str, str]) -> dict[str, Any]:
        page_token = one.get("pageToken")
        if page_token:
            frozen = self._pages.get(page_token)
            if frozen is None:
                raise ApiError(400, "invalid", "Invalid page token value.", location="pageToken")
            items, sync = frozen
        else:
            items, sync = select(cal, q, one)
        offset = 0
        size = max(1, min(int(one.get("maxResults", self.page_size)), 2500))
        out: dict[str, Any] = {
            "kind": "calendar#events",
            "etag": f'"p{cal.seq}"',
            "summary": cal.id,
            "updated": rfc3339(datetime.now(UTC)),
            "timeZone": cal.time_zone,
            "accessRole": "owner",
            "defaultReminders": [],
            "items": items[offset : offset + size],
        }
        if offset + size < len(items):
            # the result is frozen at the first page, so paging never skips or repeats an event
            token = secrets.token_urlsafe(16)
            self._pages[token] = (items[offset + size :], sync)
            out["nextPageToken"] = token
        elif sync is not None:
            out["nextSyncToken"] = sync
        return out

    # --- push ----------------------------------------------------------------------------------------------

    def _watch(self, cal: Calendar, body: dict[str, Any], grant: Grant, calendar_ref: str) -> dict[str, Any]:
        if body.get("type") not in ("web_hook", "webhook"):
            raise ApiError(400, "invalid", "Invalid value for: type", location="type")
        if not body.get("id") or body["id"] in self.channels:
            raise ApiError(400, "channelIdNotUnique", f"Channel id {body.get('id')} not unique", domain="push")
        problem = address_problem(str(body.get("address", "")))
        if problem:
            raise ApiError(400, "push.webhookUrlNotHttps", problem, domain="push")
        try:
            ttl = min(int((body.get("params") or {}).get("ttl", DEFAULT_TTL)), MAX_TTL)
        except ValueError:
            raise ApiError(400, "invalid", "Invalid value for: params.ttl") from None
        channel = Channel(
            id=str(body["id"]),
            calendar=cal.id,
            address=str(body["address"]),
            token=body.get("token"),
            expiration_ms=int((time.time() + ttl) * 1000),
            owner=grant.principal,
            resource_uri=f"https://www.googleapis.com/calendar/v3/calendars/{calendar_ref}/events?alt=json",
        )
        self.channels[channel.id] = channel
        self._push(channel, "sync")
        return channel.body()

    def _stop(self, body: dict[str, Any], grant: Grant) -> Answer:
        channel = self.channels.get(str(body.get("id")))
        if channel is None or channel.resource_id != body.get("resourceId") or channel.owner != grant.principal:
            raise ApiError(404, "notFound", f"Channel '{body.get('id')}' not found for project 'syncbridge-test'", domain="global")
        del self.channels[channel.id]
        return Answer(204)

    def _push(self, channel: Channel, state: str) -> None:
        if self._deliverer is None:
            self._deliverer = Deliverer()
        self._deliverer.send(channel, state)

    def _notify(self, cal: Calendar) -> None:
        for channel in list(self.channels.values()):
            if channel.calendar == cal.id and not channel.expired:
                self._push(channel, "exists")


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Patch semantics: objects merge key by key, arrays and scalars are replaced."""
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "parseError", "Parse Error") from None
    if not isinstance(value, dict):
        raise ApiError(400, "parseError", "Parse Error")
    return value


@dataclass
class Running:
    emulator: GoogleCalendarEmulator
    base_url: str
    stop: Callable[[], None]
    injector: Injector | None = None

    @property
    def api_root(self) -> str:
        return f"{self.base_url}{API_PREFIX}/"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"


def running(emulator: GoogleCalendarEmulator | None = None) -> Running:
    """Serve ``emulator`` on a free loopback port in a background thread."""
    emu = emulator or GoogleCalendarEmulator()
    port = free_port()
    emu.base_url = f"http://127.0.0.1:{port}"
    server = serve_in_thread(emu.app, port=port)
    emu.injector = server.injector

    def stop() -> None:
        server.stop()
        emu.close()

    return Running(emu, emu.base_url, stop, server.injector)
