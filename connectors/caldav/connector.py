"""CalDAV as a mirror: one event per appointment in each clinician's calendar (DESIGN section 3).

Moving, deleting or tagging the event flows back; every other event in the calendar is the
clinician's private life and only ever becomes busy time. Incremental pulls use collection sync
(RFC 6578) where the server has it and ctag/ETag comparison where it does not; writes are
conditional PUT/DELETE (RFC 4791 section 5.3.2) so a person's edit is never overwritten blindly.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urljoin, urlsplit

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from syncbridge.connector import ApplyResult, BusyInterval, CalendarConnector, Link, Observation, PullResult, calendar_capabilities
from syncbridge.errors import ConfigError, ConflictError, MalformedRecord, PermanentError
from syncbridge.limits import check_record_size
from syncbridge.model import Snapshot, iso, utcnow
from syncbridge.retry import Resting
from syncbridge.policy.privacy import EventText, event_text
from syncbridge.secrets import SecretRef

from .client import CalDAVClient, Resource
from . import listing
from .mapping import busy_intervals, canonical_id_of, parse_calendar, read_event, render, resource_name

if TYPE_CHECKING:
    from pathlib import Path

    from syncbridge.config import ConnectorConfig, PracticeConfig
    from syncbridge.connector import Sandbox

__all__ = ["CalDAVConnector", "CalDAVOptions"]

log = structlog.get_logger("syncbridge.caldav")


class CalDAVOptions(BaseModel):
    """The connector's own config keys (validated by ``syncbridge check``)."""

    model_config = ConfigDict(extra="forbid")

    #: server base or principal URL; calendars given by name are discovered from here
    url: str
    username: str | None = None
    #: basic auth; iCloud and Fastmail need an app-specific password
    password: SecretRef | None = None
    #: bearer token, instead of username/password
    token: SecretRef | None = None
    #: a cancelled session's event: removed, or kept with STATUS:CANCELLED
    on_cancel: Literal["delete", "mark"] = "delete"
    #: what the event shows (policy.privacy): "standard" title and room, or only "busy"
    disclosure: Literal["standard", "busy"] = "standard"
    #: longest busy-time window one query covers (recurring series are expanded client-side)
    horizon_days: int = Field(180, ge=1, le=3660)
    verify_tls: bool = True
    #: "auto" uses sync-collection when the server offers it; "etag" forces ctag/ETag comparison
    sync_method: Literal["auto", "etag"] = "auto"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
            raise ValueError("must be an http(s) URL such as https://caldav.icloud.com")
        return value

    @model_validator(mode="after")
    def _one_auth(self) -> CalDAVOptions:
        if self.password is not None and self.token is not None:
            raise ValueError("give either password (with username) or token, not both")
        if self.password is not None and not self.username:
            raise ValueError("password needs a username")
        return self


class CalDAVConnector(CalendarConnector):
    """Mirror appointments into RFC 4791 calendars (iCloud, Fastmail, Nextcloud, Radicale...)."""

    capabilities = calendar_capabilities(push=False)
    Options = CalDAVOptions
    #: the calendars usually share one server (a practice's Nextcloud or Radicale): at most this many calls at once
    max_concurrency = 8

    def __init__(self, name: str, config: ConnectorConfig, practice: PracticeConfig) -> None:
        super().__init__(name, config, practice)
        self.options: CalDAVOptions
        for key, account in self.clinicians.items():
            if not isinstance(account.get("calendar"), str) or not account["calendar"].strip():
                raise ConfigError(
                    f"clinicians.{key}.accounts.{name}.calendar",
                    "required: the calendar's full URL, or its name to be found under the account's principal",
                )
        self._client: CalDAVClient | None = None
        self._calendars: dict[str, str] | None = None  # clinician -> calendar URL (trailing slash)
        self._lock = asyncio.Lock()
        #: calendars the server asked to leave alone for a while (429 with Retry-After)
        self.resting = Resting()

    # --- plumbing --------------------------------------------------------------------------

    @property
    def client(self) -> CalDAVClient:
        if self._client is None:
            o = self.options
            self._client = CalDAVClient(
                o.url,
                username=o.username,
                password=o.password.reveal() if o.password else None,
                token=o.token.reveal() if o.token else None,
                verify_tls=o.verify_tls,
            )
        return self._client

    async def calendars(self) -> dict[str, str]:
        """Clinician key -> calendar URL, discovering calendars given by name once."""
        async with self._lock:
            if self._calendars is None:
                found: dict[str, str] = {}
                for key, account in self.clinicians.items():
                    ref = account["calendar"].strip()
                    if urlsplit(ref).scheme in ("http", "https"):
                        url = ref
                    elif ref.startswith("/"):
                        url = urljoin(self.options.url, ref)
                    else:
                        url = await self.client.discover(ref)
                    found[key] = url if url.endswith("/") else url + "/"
                shared = {u for u in found.values() if list(found.values()).count(u) > 1}
                if shared:
                    raise ConfigError(
                        f"clinicians.*.accounts.{self.name}.calendar",
                        "two clinicians point at the same calendar; give each clinician a calendar of their own",
                    )
                self._calendars = found
            return self._calendars

    def _clinician_of(self, external_id: str) -> str | None:
        for key, url in (self._calendars or {}).items():
            if external_id.startswith(urlsplit(url).path):
                return key
        return None

    def _url(self, external_id: str) -> str:
        """An href as a URL on its calendar's host (iCloud serves calendars from a per-user host)."""
        for url in (self._calendars or {}).values():
            if external_id.startswith(urlsplit(url).path):
                return self.client.absolute(external_id, url)
        return self.client.absolute(external_id, self.options.url)

    def to_observation(self, resource: Resource, clinician: str) -> Observation | None:
        """Our event as an Observation; None for the clinician's own events. Raises MalformedRecord."""
        if resource.data is None:
            return None
        check_record_size(len(resource.data), f"event {resource.href}")
        try:
            event = read_event(parse_calendar(resource.data), clinician=clinician, clinician_zone=self.practice.clinician_zone(clinician))
        except MalformedRecord:
            raise
        except Exception as err:  # icalendar meets odd values in odd ways; one event must not stop a pull
            raise MalformedRecord(f"the event cannot be read ({type(err).__name__})") from err
        if event is None:
            return None
        fields = {k: v for k, v in event.fields.items() if k in self.capabilities.fields}
        return Observation(resource.href, resource.etag, event.canonical_id, fields, tags=event.tags, modified_at=event.modified_at)

    # --- the contract ------------------------------------------------------------------------

    async def pull(self, cursor: str | None) -> PullResult:
        """Changes since ``cursor`` (JSON: calendar URL -> sync token or ctag state); None lists all.
        Each calendar is read on its own: one that fails is reported in ``failed_accounts`` (listing.py)."""
        return await listing.pull(self, cursor)

    async def read(self, external_id: str) -> Observation:
        """The event as it is now (RFC 4791 section 7.9 multiget of one href); deleted when gone."""
        await self.calendars()
        clinician = self._clinician_of(external_id)
        if clinician is None:
            raise PermanentError(f"{external_id} is not in any calendar configured for {self.name}")
        resource = await self.client.fetch(self._url(external_id))
        obs = self.to_observation(resource, clinician) if resource is not None else None
        return obs or Observation(external_id=external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        """Converge the event: create with If-None-Match, update/delete with If-Match."""
        calendars = await self.calendars()
        text = event_text(desired, self.practice.policy.privacy, self.options.disclosure)
        target = calendars.get(desired.get("clinician") or "")
        cancelled = desired.get("status") == "cancelled"
        if link is not None and not link.gone and link.external_id:
            href = link.external_id
            if target is None or self._clinician_of(href) != desired.get("clinician"):
                # the session left this calendar (another clinician): remove it, create it there
                await self.client.delete(self._url(href), etag=link.etag)
                if target is None or cancelled:
                    return ApplyResult(href, None, gone=True)
                return await self._create(appointment_id, desired, text, target)
            if cancelled and self.options.on_cancel == "delete":
                await self.client.delete(self._url(href), etag=link.etag)
                return ApplyResult(href, None, gone=True)
            return await self._put(appointment_id, desired, text, href, etag=link.etag)
        if target is None:
            raise PermanentError(f"clinician {desired.get('clinician')!r} has no calendar in {self.name}")
        if cancelled:
            return await self._cancel_unlinked(appointment_id, desired, text, target)
        return await self._create(appointment_id, desired, text, target)

    async def busy(self, start: datetime, end: datetime) -> list[BusyInterval]:
        """Busy time from the clinicians' own events: a time-range calendar-query (RFC 4791
        section 9.9) expanded client-side, so recurrences behave the same on every server."""
        end = min(end, start + timedelta(days=self.options.horizon_days))  # bounds client-side expansion
        out: list[BusyInterval] = []
        skipped = 0
        for clinician, url in (await self.calendars()).items():
            zone = self.practice.clinician_zone(clinician)
            for resource in await self.client.query(url, start=start, end=end):
                try:
                    intervals = busy_intervals(parse_calendar(resource.data or ""), start, end, zone)
                except Exception:  # one unreadable private event must not hide the others' busy time
                    skipped += 1
                    continue
                out += [BusyInterval(clinician, s.astimezone(UTC), e.astimezone(UTC)) for s, e in intervals]
        if skipped:
            log.warning("busy_events_skipped", connector=self.name, count=skipped)
        return sorted(out, key=lambda b: (b.clinician, b.start, b.end))

    async def check(self) -> str:
        """Authenticate and PROPFIND each calendar (Depth 0); nothing is written."""
        calendars = await self.calendars()
        infos = [await self.client.collection(url) for url in calendars.values()]
        mode = "sync-collection" if all(i.sync_token for i in infos) and self.options.sync_method == "auto" else "ctag/ETag polling"
        return f"{len(infos)} calendar(s) reachable, incremental sync by {mode}"

    @classmethod
    def sandbox(cls, workdir: Path, clinicians: list[str]) -> Sandbox | None:
        """A real Radicale on loopback for ``syncbridge demo`` (sandbox.py)."""
        from .sandbox import start_sandbox

        return start_sandbox(workdir, clinicians)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # --- writes --------------------------------------------------------------------------------

    async def _put(self, appointment_id: str, desired: Snapshot, text: EventText, href: str, *, etag: str | None) -> ApplyResult:
        now = utcnow()
        body = render(appointment_id, desired, text, now=now, include_location="location" in self.capabilities.fields)
        new_etag = await self.client.put(self._url(href), body, etag=etag)
        return ApplyResult(href, new_etag or await self._etag_of_our_write(href, now), text.disclosed)

    async def _create(self, appointment_id: str, desired: Snapshot, text: EventText, calendar: str) -> ApplyResult:
        """PUT with If-None-Match: * at the derived name; a 412 means a retried create: update it."""
        href = urlsplit(calendar).path + resource_name(appointment_id)
        now = utcnow()
        body = render(appointment_id, desired, text, now=now, include_location="location" in self.capabilities.fields)
        for _ in range(2):
            try:
                new_etag = await self.client.put(self._url(href), body, create=True)
                return ApplyResult(href, new_etag or await self._etag_of_our_write(href, now), text.disclosed)
            except ConflictError:
                existing = await self.client.fetch(self._url(href))
                if existing is None:
                    continue  # gone again meanwhile: create once more
                if canonical_id_of(parse_calendar(existing.data or "")) != appointment_id:
                    raise PermanentError(f"{href} already holds an event that is not this appointment's") from None
                return await self._put(appointment_id, desired, text, href, etag=existing.etag)
        raise PermanentError(f"{href}: the calendar refuses the new event's UID (another resource holds it)")

    async def _cancel_unlinked(self, appointment_id: str, desired: Snapshot, text: EventText, calendar: str) -> ApplyResult:
        """A cancelled session we hold no link for: make sure a lost create left nothing live."""
        href = urlsplit(calendar).path + resource_name(appointment_id)
        existing = await self.client.fetch(self._url(href))
        if existing is None or canonical_id_of(parse_calendar(existing.data or "")) != appointment_id:
            return ApplyResult(None, None, gone=True)
        if self.options.on_cancel == "delete":
            await self.client.delete(self._url(href), etag=existing.etag)
            return ApplyResult(href, None, gone=True)
        return await self._put(appointment_id, desired, text, href, etag=existing.etag)

    async def _etag_of_our_write(self, href: str, written_at: datetime) -> str | None:
        """The ETag after a PUT whose answer had none (RFC 4791 section 5.3.4): re-read, but only
        trust it if the stored event is still the one we wrote, never a person's later edit."""
        clinician = self._clinician_of(href)
        resource = await self.client.fetch(self._url(href))
        if resource is None or clinician is None:
            return None
        seen = self.to_observation(resource, clinician)
        return resource.etag if seen is not None and seen.modified_at == iso(written_at) else None
