"""The Calendar API wire layer on google-api-python-client: every call, and the one error table.

The client library is synchronous (httplib2), so each call runs in a worker thread of the
connector's own pool (``in_thread``: the event loop's default pool has cpu count + 4 threads,
fewer than the calls the outbox keeps in flight across a practice's calendars). An
``httplib2.Http`` must not be shared between threads, so each call takes an idle connection of its
account (or opens one) for as long as it runs: calls of one calendar go side by side, as many as
the outbox lets in flight for it (``account_concurrency``). Knows events,
channels and credentials, nothing of appointments. Every failure leaves as a
:mod:`syncbridge.errors` exception, translated here and only here; messages name the call and
the status, never event content.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import google.auth.exceptions
import google_auth_httplib2
import httplib2
from google.auth.credentials import Credentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest, HttpRequest

from syncbridge.errors import (
    BATCH_REFUSED, AuthError, BatchRefused, ConflictError, CursorExpired, PermanentError, RateLimited, SyncbridgeError, TransientError,
    retry_after_seconds, unreachable,
)

__all__ = ["BATCH_LIMIT", "CalendarClient", "Part", "WriteNotes", "batch_get", "batch_list", "batch_write", "raise_for_status", "translate"]

#: threads for the blocking client library: calls wait on the network, not the CPU, so the pool is
#: sized for the calls in flight (every calendar's turn at once), not for the cores
_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="google-calendar")


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in one of the connector's worker threads."""
    return await asyncio.get_running_loop().run_in_executor(_THREADS, functools.partial(fn, *args))


#: "You're limited to 1000 calls in a single batch request" (developers.google.com/calendar/api/guides/batch)
BATCH_LIMIT = 1000
RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded", "dailyLimitExceeded"})
ACCESS_REASONS = frozenset({"insufficientPermissions", "accessNotConfigured", "forbidden", "domainPolicy", "authError"})
DELEGATION_HINT = (
    "in the Google Admin console (Security > Access and data control > API controls > Domain-wide delegation) "
    "add the service account's client id with scope https://www.googleapis.com/auth/calendar.events, "
    "and check that the clinician's email in the config is a user of that Workspace domain"
)


def _reason(content: bytes) -> str:
    try:
        errors = json.loads(content)["error"]["errors"]
        return str(errors[0].get("reason", ""))
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def raise_for_status(status: int, reason: str, what: str, *, retry_after: str | None = None) -> NoReturn:
    """The one table from a Calendar API error (status, reason) to what the caller must do."""
    wait = retry_after_seconds(retry_after)
    if status == 401:
        raise AuthError(f"{what}: Google refused the access token (401)", action=DELEGATION_HINT)
    if status == 429 or (status == 403 and reason in RATE_REASONS):
        raise RateLimited(f"{what}: Google asks to slow down ({status} {reason or 'rateLimitExceeded'})", retry_after=wait)
    if status == 403 and reason in ACCESS_REASONS:
        raise AuthError(f"{what}: access denied ({status} {reason})", action=DELEGATION_HINT)
    if status == 410 and reason == "fullSyncRequired":
        raise CursorExpired(f"{what}: the sync token is no longer valid (410 fullSyncRequired)")
    if status in (409, 412):
        raise ConflictError(f"{what}: the event changed or exists already ({status} {reason})")
    if status >= 500 or status in (408, 425):
        raise TransientError(f"{what}: server error ({status})", retry_after=wait)
    raise PermanentError(f"{what}: refused ({status} {reason})".rstrip())


_T = TypeVar("_T")


def _retry_dropped(call: Callable[[], _T]) -> _T:
    """A kept-alive connection the server has since closed fails at once with a reset: one
    immediate retry on a fresh connection is safe (reads, inserts with derived ids and If-Match
    writes are idempotent) and spares a whole backoff round."""
    try:
        return call()
    except ConnectionError:
        return call()


def translate(err: BaseException, what: str, url: str | None = None) -> Exception:
    """A foreign exception from the client stack as a syncbridge error (returned, for ``raise ... from``)."""
    if isinstance(err, HttpError) and err.resp is None:  # BatchError: the multipart answer could not be read
        return TransientError(f"{what}: unreadable batch answer")
    if isinstance(err, HttpError):
        try:
            raise_for_status(err.resp.status, _reason(err.content), what, retry_after=err.resp.get("retry-after"))
        except Exception as mapped:  # noqa: BLE001 - raise_for_status always raises one of ours
            return mapped
    if isinstance(err, google.auth.exceptions.RefreshError) and getattr(err, "retryable", False):
        return TransientError(f"{what}: the token endpoint failed for now")
    if isinstance(err, google.auth.exceptions.RefreshError):
        detail = str(err.args[0]) if err.args else ""
        hint = DELEGATION_HINT if "unauthorized_client" in str(err) else "run `syncbridge auth` again for this clinician, or check the key"
        return AuthError(f"{what}: Google refused to issue an access token ({detail[:120]})", action=hint)
    if isinstance(err, google.auth.exceptions.TransportError | httplib2.HttpLib2Error | socket.timeout | OSError):
        return unreachable(what, err, url)
    return err if isinstance(err, Exception) else RuntimeError(str(err))


def batch_failed(err: BaseException, what: str) -> Exception:
    """A batch request that failed as a whole: refused by the endpoint (each call is then made on
    its own), or any other failure, translated as a single call's would be."""
    if isinstance(err, HttpError) and err.resp is not None and err.resp.status in BATCH_REFUSED:
        return BatchRefused(f"{what}: the batch endpoint refused the request ({err.resp.status}); each call is sent on its own")
    return translate(err, what)


class WriteNotes(Protocol):
    """Told of every event write per calendar: before it is sent, and when Google refused it
    (the connector's expected-echo credits, echoes.py)."""

    def expect(self, calendar: str) -> None: ...

    def withdraw(self, calendar: str) -> None: ...


class _Unbound(httplib2.Http):
    """The shared service's own Http: every request must carry its account's Http instead."""

    def request(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("a Calendar request was sent without its account's Http")


@functools.cache
def _resources(api_root: str) -> tuple[Any, Any]:
    """The ``events`` and ``channels`` resources of one service per API root, shared by every account.

    Building a service, and each ``service.events()`` call, makes the library generate every
    method with its docstring (about 2 MB per service): made per account and per request, that
    was most of the daemon's memory growth in a practice's initial sync. The requests they make are
    bound to an account's Http by :meth:`CalendarClient.bind`.
    """
    service = build(
        "calendar", "v3", static_discovery=True, cache_discovery=False,
        client_options={"api_endpoint": api_root}, http=_Unbound(),
    )  # fmt: skip
    return service.events(), service.channels()


class CalendarClient:
    """One account's Calendar service (a clinician impersonated, or signed in with OAuth)."""

    def __init__(self, credentials: Credentials, api_root: str, *, timeout: float = 30.0, notes: WriteNotes | None = None) -> None:
        if not api_root.endswith("calendar/v3/"):
            raise ValueError("api_root must end with calendar/v3/")
        self.api_root = api_root
        self.notes = notes
        self._credentials = credentials
        self._timeout = timeout
        #: what a request is bound to for its credentials (a batch part's token); never sent over
        self._http = google_auth_httplib2.AuthorizedHttp(credentials, http=_Unbound())
        #: idle connections: each call or batch takes one while it runs, so calls run side by side
        #: without ever sharing an Http between threads
        self._spare: list[httplib2.Http] = []
        self._refreshing = threading.Lock()
        #: API requests made (batch parts counted one by one, as Google's quota does)
        self.requests = 0

    @property
    def events(self) -> Any:
        return _resources(self.api_root)[0]

    def bind(self, request: HttpRequest) -> HttpRequest:
        """The request as this account's: sent over its Http, and in a batch, with its token."""
        request.http = self._http
        return request

    @contextlib.contextmanager
    def connection(self) -> Iterator[google_auth_httplib2.AuthorizedHttp]:
        """An idle connection of this account, as its own, for one call in a worker thread."""
        self._fresh_credentials()
        http = self._spare.pop() if self._spare else httplib2.Http(timeout=self._timeout)
        try:
            yield google_auth_httplib2.AuthorizedHttp(self._credentials, http=http)
        finally:
            self._spare.append(http)

    async def _run(self, what: str, make: Callable[[Any], HttpRequest], *, etag: str | None = None, changes: str | None = None) -> Any:
        """One call as this account; ``changes``: the calendar a write changes (``notes`` hear of
        it once the call has its turn, just before it is sent: Google may notify before it answers)."""

        def run() -> Any:
            events, channels = _resources(self.api_root)
            request = make(events if what.startswith("events") else channels)
            if etag is not None:
                request.headers["If-Match"] = etag
            self.requests += 1
            with self.connection() as http:
                return _retry_dropped(lambda: request.execute(http=http, num_retries=0))

        try:
            if changes is not None and self.notes is not None:
                self.notes.expect(changes)
            return await in_thread(run)
        except Exception as err:
            raise translate(err, what, self.api_root) from err

    async def _status(self, what: str, make: Callable[[Any], HttpRequest], *, etag: str | None = None, allow: tuple[int, ...],
                      changes: str | None = None) -> Any:
        """Like ``_run`` but answers the HTTP status for the ``allow``-ed ones instead of raising."""
        try:
            return await self._run(what, make, etag=etag, changes=changes)
        except Exception as err:
            cause = err.__cause__
            if isinstance(cause, HttpError) and cause.resp.status in allow:
                return cause.resp.status
            raise

    # --- events ------------------------------------------------------------------------------

    async def pages(self, calendar: str, first: dict[str, Any] | None = None, **params: Any) -> AsyncIterator[tuple[list[dict[str, Any]], str | None]]:
        """Each page of events.list with the ``nextSyncToken``, which only the last page carries
        (from ``first``, a first page already fetched, if given). Taken page by page, a listing of
        thousands of events never has to be held whole."""
        page: str | None = None
        while True:
            if first is not None:
                answer, first = first, None
            else:

                def make(e: Any, p: str | None = page) -> HttpRequest:
                    return e.list(calendarId=calendar, pageToken=p, **params)

                answer = await self._run("events.list", make)
            page = answer.get("nextPageToken")
            yield answer.get("items", []), None if page else answer.get("nextSyncToken")
            if not page:
                return

    async def peek(self, calendar: str) -> None:
        """One harmless read (a single event id), to prove access."""
        await self._run("events.list", lambda e: e.list(calendarId=calendar, maxResults=1, fields="items(id)"))

    async def get(self, calendar: str, event_id: str, fields: str | None = None) -> dict[str, Any] | None:
        """The event (only ``fields``, a partial response, when given), a ``cancelled`` tombstone
        if it was deleted, or None if it never existed."""
        selection = {"fields": fields} if fields else {}
        answer = await self._status("events.get", lambda e: e.get(calendarId=calendar, eventId=event_id, **selection), allow=(404,))
        return None if answer == 404 else answer

    async def _write(self, what: str, calendar: str, make: Callable[[Any], HttpRequest], *, etag: str | None = None,
                     allow: tuple[int, ...] = ()) -> Any:
        """A write that changes ``calendar``: ``notes`` hear of it just before it is sent (Google may
        notify before it answers) and again when Google refused it or it changed nothing (an
        allowed status)."""
        try:
            answer = await self._status(what, make, etag=etag, allow=allow, changes=calendar)
        except SyncbridgeError:
            if self.notes is not None:
                self.notes.withdraw(calendar)
            raise
        if self.notes is not None and isinstance(answer, int) and answer in allow:
            self.notes.withdraw(calendar)
        return answer

    async def insert(self, calendar: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Insert with a client-chosen id; None when the id exists already (409 duplicate)."""
        answer = await self._write("events.insert", calendar, lambda e: e.insert(calendarId=calendar, body=body), allow=(409,))
        return None if answer == 409 else answer

    async def update(self, calendar: str, event_id: str, body: dict[str, Any], etag: str | None) -> dict[str, Any]:
        return await self._write("events.update", calendar, lambda e: e.update(calendarId=calendar, eventId=event_id, body=body), etag=etag)

    async def patch(self, calendar: str, event_id: str, body: dict[str, Any], etag: str | None) -> dict[str, Any]:
        return await self._write("events.patch", calendar, lambda e: e.patch(calendarId=calendar, eventId=event_id, body=body), etag=etag)

    async def delete(self, calendar: str, event_id: str, etag: str | None) -> bool:
        """Delete under ``etag``; False when it was gone already (404 or 410 ``deleted``)."""
        answer = await self._write("events.delete", calendar, lambda e: e.delete(calendarId=calendar, eventId=event_id), etag=etag, allow=(404, 410))
        return answer not in (404, 410)

    async def watch(self, calendar: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._run("events.watch", lambda e: e.watch(calendarId=calendar, body=body))

    async def stop(self, channel_id: str, resource_id: str) -> None:
        """channels.stop; a channel Google no longer knows (404) is stopped already."""
        await self._status("channels.stop", lambda c: c.stop(body={"id": channel_id, "resourceId": resource_id}), allow=(404,))

    def _fresh_credentials(self) -> None:
        """Obtain an access token now, once for the calls starting together (a batch part carries
        its own account's token)."""
        if self._credentials.valid:
            return
        with self._refreshing:
            if not self._credentials.valid:
                self._credentials.refresh(google_auth_httplib2.Request(httplib2.Http(timeout=self._timeout)))


async def _batch_read(parts: list[tuple[CalendarClient, Callable[[Any], HttpRequest]]], what: str, *, absent: int | None = None) -> list[Any]:
    """Several reads, each as its own account, in one HTTP request per 50
    (https://developers.google.com/workspace/calendar/api/guides/batch). Each part still counts
    against the quota; what is saved is a round trip and a connection per read. Answers, in order,
    each part's response, None for the ``absent`` status, or its translated error."""
    results: dict[int, Any] = {}

    def run(offset: int, chunk: list[tuple[CalendarClient, Callable[[Any], HttpRequest]]]) -> None:
        def done(request_id: str, response: Any, exception: Exception | None) -> None:
            if isinstance(exception, HttpError) and exception.resp is not None and exception.resp.status == absent:
                results[int(request_id)] = None
            else:
                results[int(request_id)] = translate(exception, what) if exception is not None else response

        owner = chunk[0][0]
        batch = _new_batch(owner, done)
        for i, (client, make) in enumerate(chunk):
            client._fresh_credentials()
            batch.add(client.bind(make(client.events)), request_id=str(offset + i))
            client.requests += 1
        with owner.connection() as http:
            _retry_dropped(lambda: batch.execute(http=http))

    for offset in range(0, len(parts), 50):
        chunk = parts[offset : offset + 50]
        try:
            await in_thread(run, offset, chunk)
        except Exception as err:
            raise batch_failed(err, what) from err
    return [results[i] for i in range(len(parts))]


async def batch_list(parts: list[tuple[CalendarClient, str, dict[str, Any]]]) -> list[dict[str, Any] | Exception]:
    """The first page of events.list for several calendars in one batch request: the page or the
    translated error of each part, in order."""
    return await _batch_read(
        [(client, lambda e, cal=cal, p=params: e.list(calendarId=cal, **p)) for client, cal, params in parts], "events.list (batch)")


async def batch_get(parts: list[tuple[CalendarClient, str, str, str]]) -> list[dict[str, Any] | None | Exception]:
    """events.get of several (client, calendar, event id, fields) in batch requests: each event's
    partial response, None for one that no longer exists, or its translated error, in order."""
    return await _batch_read(
        [(client, lambda e, cal=cal, ev=event_id, f=fields: e.get(calendarId=cal, eventId=ev, fields=f)) for client, cal, event_id, fields in parts],
        "events.get (batch)", absent=404,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Part:
    """One write in a batch request, made as ``client``'s account: events.insert, patch or delete."""

    client: CalendarClient
    method: str
    calendar: str
    event_id: str | None = None
    body: dict[str, Any] | None = None
    etag: str | None = None

    def request(self) -> HttpRequest:
        events = self.client.events
        if self.method == "insert":
            request = events.insert(calendarId=self.calendar, body=self.body)
        elif self.method == "patch":
            request = events.patch(calendarId=self.calendar, eventId=self.event_id, body=self.body)
        else:
            request = events.delete(calendarId=self.calendar, eventId=self.event_id)
        if self.etag is not None and self.method != "insert":
            request.headers["If-Match"] = self.etag
        return self.client.bind(request)

    #: statuses answered as values rather than raised: an insert whose id exists, a delete of a gone event
    @property
    def allowed(self) -> tuple[int, ...]:
        return (409,) if self.method == "insert" else (404, 410) if self.method == "delete" else ()


def _new_batch(owner: CalendarClient, callback: Callable[[str, Any, Exception | None], None]) -> BatchHttpRequest:
    """A batch request to the path beside ``api_root`` (``https://www.googleapis.com/batch/calendar/v3``
    for Google itself). The library's ``new_batch_http_request`` would take it from the discovery
    document's rootUrl, which is wrong for another ``api_root`` such as an emulator or a proxy
    (github.com/googleapis/google-api-python-client/issues/1107)."""
    return BatchHttpRequest(callback=callback, batch_uri=owner.api_root[: -len("calendar/v3/")] + "batch/calendar/v3")


async def batch_write(parts: Sequence[Part]) -> list[dict[str, Any] | int | None | Exception]:
    """Several writes in one batch request (at most :data:`BATCH_LIMIT`); each part its own account's.

    Answers, in order, per part: the event (insert, patch), None (delete done), the status for an
    allowed failure (409 on insert; 404 or 410 on delete), or the translated error of that part
    alone. Google may run the parts in any order; each counts as one call against the quota.
    A failure of the batch request itself is every part's error (the parts may have taken effect:
    retried inserts converge by id, retried patches and deletes meet If-Match).
    """
    if len(parts) > BATCH_LIMIT:
        raise ValueError(f"a batch request holds at most {BATCH_LIMIT} calls")
    if not parts:
        return []
    owner = parts[0].client
    results: dict[int, dict[str, Any] | int | None | Exception] = {}

    def run() -> None:
        def done(request_id: str, response: Any, exception: Exception | None) -> None:
            part = parts[int(request_id)]
            what = f"events.{part.method} (batch)"
            if isinstance(exception, HttpError) and exception.resp is not None and exception.resp.status in part.allowed:
                results[int(request_id)] = exception.resp.status
            elif exception is not None:
                results[int(request_id)] = translate(exception, what)
            else:
                results[int(request_id)] = response if part.method != "delete" else None

        batch = _new_batch(owner, done)
        for i, part in enumerate(parts):
            part.client._fresh_credentials()
            batch.add(part.request(), request_id=str(i))
            part.client.requests += 1
        with owner.connection() as http:
            _retry_dropped(lambda: batch.execute(http=http))

    for part in parts:  # before sending: Google may notify a change before the batch is answered
        if part.client.notes is not None:
            part.client.notes.expect(part.calendar)
    try:
        await in_thread(run)
    except Exception as err:
        answers: list[dict[str, Any] | int | None | Exception] = [batch_failed(err, "batch") for _ in parts]
    else:
        answers = [results.get(i, TransientError("batch: no answer for this part")) for i in range(len(parts))]
    for part, answer in zip(parts, answers, strict=True):  # refused, or nothing to change: no notification
        if part.client.notes is not None and (isinstance(answer, Exception) or (isinstance(answer, int) and answer in part.allowed)):
            part.client.notes.withdraw(part.calendar)
    return answers
