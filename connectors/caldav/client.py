"""The CalDAV wire layer: every request the connector makes, and the one table from answers to errors.

Engine-free on purpose (the Home Assistant / gcal_sync split): this module knows WebDAV,
CalDAV (RFC 4791) and collection sync (RFC 6578) through the ``caldav`` library's async client
and XML elements, and nothing of appointments. Every failure leaves as a
:mod:`syncbridge.errors` exception, translated here and only here (``raise ... from err``).
Messages name the method and the collection, never event text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, NoReturn, TypeVar, cast
from urllib.parse import quote, unquote, urljoin, urlsplit

from caldav.async_davclient import AsyncDAVClient
from caldav.elements import cdav, dav
from caldav.elements.base import BaseElement, ValuedBaseElement
from caldav.lib import error as dav_error
from caldav.response import DAVResponse, SyncCollectionResult
from lxml import etree

from syncbridge.errors import (
    AuthError,
    ConflictError,
    CursorExpired,
    MalformedRecord,
    PermanentError,
    RateLimited,
    SyncbridgeError,
    TransientError,
    unreachable,
)

__all__ = ["APP_PASSWORD_HINT", "CalDAVClient", "Collection", "Resource", "raise_for_status", "translate"]

APP_PASSWORD_HINT = (
    "check username and password of this connector; iCloud and Fastmail refuse the account password "
    "over CalDAV: create an app-specific password (appleid.apple.com > Sign-In and Security; "
    "Fastmail > Settings > Privacy & Security > App passwords)"
)
VALID_SYNC_TOKEN = "{DAV:}valid-sync-token"
ICAL_HEADERS = {"Content-Type": 'text/calendar; charset="utf-8"'}
_HREF_SAFE = "/:@!$&'()*+,;=-._~"
_T = TypeVar("_T")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of whichever HTTP library caldav picked that mean "the network failed"."""
    found: list[type[BaseException]] = [OSError, asyncio.TimeoutError, etree.XMLSyntaxError]
    try:
        import niquests

        found.append(niquests.exceptions.RequestException)
    except ImportError:  # pragma: no cover - caldav falls back to httpx
        pass
    try:
        import httpx

        found.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


_TRANSPORT = _transport_errors()


class _GetCTag(ValuedBaseElement):
    """CalendarServer's collection tag, for servers without RFC 6578 (not in caldav's element set)."""

    tag: ClassVar[str] = "{http://calendarserver.org/ns/}getctag"


@dataclass(frozen=True, slots=True)
class Resource:
    """One calendar object resource as the server answered: path, ETag and iCalendar text."""

    href: str
    etag: str | None
    data: str | None


@dataclass(frozen=True, slots=True)
class Collection:
    """What a PROPFIND of a calendar says about change tracking (RFC 6578 section 4)."""

    url: str
    sync_token: str | None
    ctag: str | None
    name: str | None


def _retry_after(value: str | None) -> float | None:
    return dav_error.parse_retry_after(value) if value else None


def raise_for_status(status: int, what: str, *, retry_after: str | None = None, preconditions: Iterable[str] = ()) -> NoReturn:
    """The one table from an unsuccessful HTTP status to what the caller must do (DESIGN section 9)."""
    pre = set(preconditions)
    if VALID_SYNC_TOKEN in pre and status in (403, 409, 412):
        # RFC 6578 section 3.2: Radicale answers 403, Xandikos 412; both mean "full resync"
        raise CursorExpired(f"{what}: the server no longer accepts the sync token ({status})")
    if status == 401:
        raise AuthError(f"{what}: the server refused the credentials (401)", action=APP_PASSWORD_HINT)
    if status == 403:
        raise AuthError(
            f"{what}: the account may not access this calendar (403)",
            action="check that the calendar belongs to, or is shared with write access to, this account",
        )
    if status in (409, 412):
        raise ConflictError(f"{what}: the server's copy changed since it was read ({status})")
    if status in (429, 503):
        raise RateLimited(f"{what}: the server asks to slow down ({status})", retry_after=_retry_after(retry_after))
    if status in (404, 410):
        raise PermanentError(f"{what}: not found ({status}); check the calendar's URL or name")
    if status == 423:
        # RFC 4918 section 11.3: the resource is locked, by a client's LOCK or the server's own
        # write lock (Xandikos answers 423 to a PUT made while another PUT commits)
        raise TransientError(f"{what}: the calendar is locked for another write (423)", retry_after=_retry_after(retry_after))
    if status >= 500 or status in (408, 425):
        raise TransientError(f"{what}: server error ({status})", retry_after=_retry_after(retry_after))
    raise PermanentError(f"{what}: the server refused the request ({status})")


class OversizedAnswer(MalformedRecord):
    """An answer holding a value too large to parse (lxml stops at 10 MB text nodes): some
    resource in it is far over the record size limit. Callers fall back to one resource at a time."""


def translate(err: BaseException, what: str) -> SyncbridgeError:
    """A foreign exception as one of ours; the caller raises it ``from err``."""
    if isinstance(err, SyncbridgeError):
        return err
    if isinstance(err, etree.XMLSyntaxError) and "limit" in str(err).lower():
        return OversizedAnswer(f"{what}: the answer holds a resource over the parser's size limit")
    if isinstance(err, dav_error.RateLimitError):
        return RateLimited(f"{what}: the server asks to slow down ({err.status})", retry_after=err.retry_after_seconds)
    if isinstance(err, dav_error.AuthorizationError):
        try:
            raise_for_status(err.status or 401, what, preconditions=err.preconditions)
        except SyncbridgeError as mapped:
            return mapped
    if isinstance(err, _TRANSPORT):
        return unreachable(what, err)
    if isinstance(err, dav_error.DAVError):
        return TransientError(f"{what}: unexpected answer ({type(err).__name__})")
    return TransientError(f"{what}: unexpected failure ({type(err).__name__})")


def _body(element: Any) -> str:
    return str(etree.tostring(element.xmlelement(), encoding="utf-8", xml_declaration=True).decode("utf-8"))


def _parsed(what: str, parse: Callable[[], _T]) -> _T:
    """Parse a multistatus answer; a malformed one is translated like any other failure."""
    try:
        return parse()
    except Exception as err:
        raise translate(err, what) from err


class _CountingDAVClient(AsyncDAVClient):
    """caldav's async client, counting the HTTP requests it sends (tests and metrics read it)."""

    sent = 0

    async def request(self, *args: Any, **kwargs: Any) -> DAVResponse:
        self.sent += 1
        return await super().request(*args, **kwargs)


class CalDAVClient:
    """Async CalDAV calls for one account. ``requests`` counts HTTP requests (for tests and metrics)."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        verify_tls: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        if token is not None:
            auth: dict[str, Any] = {"password": token, "auth_type": "bearer"}
        elif password is not None:
            auth = {"username": username, "password": password, "auth_type": "basic"}
        else:
            auth = {}
        self._dav = _CountingDAVClient(
            url=url,
            ssl_verify_cert=verify_tls,
            timeout=int(timeout),
            enable_rfc6764=False,
            rate_limit_handle=False,  # the outbox owns retries and honours Retry-After
            headers={"User-Agent": "syncbridge-caldav"},
            **auth,
        )

    @property
    def requests(self) -> int:
        """HTTP requests sent so far."""
        return self._dav.sent

    async def close(self) -> None:
        await self._dav.close()

    def absolute(self, href: str, base: str | None = None) -> str:
        """An href from a multistatus (a path, already unquoted by caldav) as a full URL."""
        return urljoin(base or self.url, quote(href, safe=_HREF_SAFE))

    async def _call(self, what: str, send: Callable[[], Awaitable[DAVResponse]]) -> DAVResponse:
        try:
            return await send()
        except Exception as err:
            raise translate(err, what) from err

    @staticmethod
    def _check(resp: DAVResponse, what: str, ok: Iterable[int] = (200, 207)) -> None:
        if resp.status not in set(ok):
            raw = getattr(resp, "_raw", None)
            pre = dav_error.parse_preconditions(raw) if resp.status in (403, 409, 412) else []
            raise_for_status(resp.status, what, retry_after=resp.headers.get("Retry-After"), preconditions=pre)

    # --- collections --------------------------------------------------------------------

    async def collection(self, url: str) -> Collection:
        """PROPFIND Depth 0: sync-token (RFC 6578 section 4), ctag and display name."""
        what = f"PROPFIND {urlsplit(url).path}"
        body = _body(dav.Propfind() + (dav.Prop() + [dav.SyncToken(), _GetCTag(), dav.DisplayName()]))
        resp = await self._call(what, lambda: self._dav.propfind(url, body=body, depth=0))
        self._check(resp, what)
        props: dict[str, Any] = {}
        for result in _parsed(what, resp.parse_propfind):
            props.update(result.properties)
        return Collection(url, props.get(dav.SyncToken.tag), props.get(_GetCTag.tag), props.get(dav.DisplayName.tag))

    async def members(self, url: str) -> tuple[str | None, dict[str, str]]:
        """PROPFIND Depth 1: the collection's ctag and every member's ETag (for servers without RFC 6578)."""
        what = f"PROPFIND {urlsplit(url).path}"
        body = _body(dav.Propfind() + (dav.Prop() + [dav.GetEtag(), _GetCTag()]))
        resp = await self._call(what, lambda: self._dav.propfind(url, body=body, depth=1))
        self._check(resp, what)
        own = urlsplit(url).path.rstrip("/")
        ctag, etags = None, {}
        for result in _parsed(what, resp.parse_propfind):
            if result.href.rstrip("/") == own:
                ctag = result.properties.get(_GetCTag.tag)
            elif result.properties.get(dav.GetEtag.tag) and not result.href.endswith("/"):
                etags[result.href] = result.properties[dav.GetEtag.tag]
        return ctag, etags

    async def sync(self, url: str, token: str | None) -> SyncCollectionResult:
        """sync-collection REPORT (RFC 6578 section 3.2) asking for ETag and, where served, the data.

        An invalid token raises CursorExpired (Radicale 403, Xandikos 412, both with
        ``DAV:valid-sync-token``). A truncated answer (section 3.6) is continued here.
        """
        what = f"sync-collection {urlsplit(url).path}"
        own = urlsplit(url).path.rstrip("/")
        total = SyncCollectionResult(sync_token=token)
        for _ in range(100):
            resp = await self._call(what, lambda: self._dav.sync_collection(url, sync_token=total.sync_token))
            self._check(resp, what)
            page = _parsed(what, resp.parse_sync_collection)
            total.changed.extend(r for r in page.changed if r.href.rstrip("/") != own)
            total.deleted.extend(page.deleted)
            moved_on = bool(page.sync_token) and page.sync_token != total.sync_token
            total.sync_token = page.sync_token or total.sync_token
            if not (page.truncated and moved_on):
                break
        return total

    async def multiget(self, url: str, hrefs: list[str]) -> list[Resource]:
        """calendar-multiget REPORT (RFC 4791 section 7.9): many resources in one request, no Depth."""
        if not hrefs:
            return []
        what = f"calendar-multiget {urlsplit(url).path}"
        # built here: caldav 3.6's own multiget body puts each href in a name attribute and asks no ETag
        props = dav.Prop() + [dav.GetEtag(), cdav.CalendarData()]
        body = _body(cdav.CalendarMultiGet() + [props, *(dav.Href(value=quote(h, safe=_HREF_SAFE)) for h in hrefs)])
        resp = await self._call(what, lambda: self._dav.report(url, body, depth=None))
        self._check(resp, what)
        return [Resource(r.href, r.etag, r.calendar_data) for r in _parsed(what, resp.parse_calendar_query) if r.status == 200]

    async def query(
        self, url: str, *, start: datetime | None = None, end: datetime | None = None, uid_contains: str | None = None
    ) -> list[Resource]:
        """calendar-query REPORT for VEVENTs (RFC 4791 section 7.8) with ETag and data.

        ``start``/``end`` add a time-range filter (section 9.9, recurrences count); ``uid_contains``
        a text-match on UID (section 9.7.5). Filters only save transfer: callers re-check.
        """
        what = f"calendar-query {urlsplit(url).path}"
        vevent: BaseElement = cdav.CompFilter("VEVENT")
        if start is not None or end is not None:
            vevent += cdav.TimeRange(start, end)
        if uid_contains:
            vevent += cdav.PropFilter("UID") + cdav.TextMatch(uid_contains)
        props = dav.Prop() + [dav.GetEtag(), cdav.CalendarData()]
        body = _body(cdav.CalendarQuery() + [props, cdav.Filter() + (cdav.CompFilter("VCALENDAR") + vevent)])
        try:
            resp = await self._call(what, lambda: self._dav.report(url, body, depth=1))
            self._check(resp, what)
        except (AuthError, PermanentError):
            if not uid_contains:
                raise
            # a server may refuse a filter it does not support (section 7.7): filter here instead
            return await self.query(url, start=start, end=end)
        found = _parsed(what, resp.parse_calendar_query)
        return [Resource(r.href, r.etag, r.calendar_data) for r in found if r.status == 200 and r.calendar_data]

    # --- single resources -------------------------------------------------------------------

    async def fetch(self, url: str) -> Resource | None:
        """One calendar object with its ETag; None when it is gone.

        A calendar-multiget of one href rather than a GET: the answer is XML, so the caldav
        library never falls back to logging an unparsable body (which would be event text).
        """
        path = unquote(urlsplit(url).path)
        collection = url[: url.rstrip("/").rfind("/") + 1]
        found = await self.multiget(collection, [path])
        return next((r for r in found if r.href == path and r.data is not None), None)

    async def put(self, url: str, body: bytes, *, etag: str | None = None, create: bool = False) -> str | None:
        """PUT under a precondition (RFC 4791 section 5.3.2, RFC 7232): ``If-None-Match: *`` to
        create, ``If-Match`` to update. The precondition is sent explicitly so Xandikos checks the
        ETag, not the Schedule-Tag. Returns the new ETag when the server gives one (section 5.3.4
        allows it not to).
        """
        what = f"PUT {urlsplit(url).path}"
        headers = dict(ICAL_HEADERS)
        if create:
            headers["If-None-Match"] = "*"
        elif etag:
            headers["If-Match"] = etag
        resp = await self._call(what, lambda: self._dav.put(url, body.decode("utf-8"), headers))
        self._check(resp, what, ok=(200, 201, 204))
        etag = resp.headers.get("ETag")
        return str(etag) if etag else None

    async def delete(self, url: str, *, etag: str | None) -> bool:
        """DELETE under If-Match; False when it was already gone (404 counts as done)."""
        what = f"DELETE {urlsplit(url).path}"
        headers = {"If-Match": etag} if etag else {}
        resp = await self._call(what, lambda: self._dav.delete(url, headers))
        if resp.status in (404, 410):
            return False
        self._check(resp, what, ok=(200, 204))
        return True

    # --- discovery ----------------------------------------------------------------------

    async def discover(self, name: str) -> str:
        """The URL of the calendar called ``name`` (display name or last path segment), found
        through current-user-principal and calendar-home-set (RFC 4791 section 6.2.1)."""
        what = "calendar discovery"
        try:
            calendars = await self._dav.get_calendars()
        except Exception as err:
            raise translate(err, what) from err
        wanted = name.strip("/").lower()
        for cal in calendars:
            if urlsplit(str(cal.url)).path.rstrip("/").rsplit("/", 1)[-1].lower() == wanted:
                return str(cal.url)
        for cal in calendars:
            try:
                display = await cast(Awaitable[str | None], cal.get_display_name())  # cached from the listing
            except Exception as err:
                raise translate(err, what) from err
            if str(display or "").strip().lower() == wanted:
                return str(cal.url)
        raise PermanentError(f"{what}: no calendar named {name!r} among the {len(calendars)} calendars of this account")
