"""Google Calendar as a mirror: one event per appointment in each clinician's calendar (DESIGN section 3).

Moving, deleting or tagging the event flows back; every other event is the clinician's private
life and only ever becomes busy time. Pulls use sync tokens per calendar
(developers.google.com/workspace/calendar/api/guides/sync); writes use ids derived from the
canonical id (a retried insert answers 409, never a duplicate) and ``If-Match`` on the etag (a
person's edit is never overwritten blindly); push channels (push.py) make a change in Google
reach the record within seconds, with polling as the safety net.

Auth, both ways a Workspace admin meets: a service account with domain-wide delegation that
impersonates each clinician (never used without a subject), or per-clinician OAuth sign-in
(``syncbridge auth``) whose refresh token the daemon keeps encrypted.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from syncbridge.connector import (
    ApplyResult, BusyInterval, CalendarConnector, Link, Observation, PullResult, WebhookRoute, Write, calendar_capabilities,
)
from syncbridge.errors import AuthError, ConfigError, MalformedRecord, PermanentError
from syncbridge.limits import check_record_size
from syncbridge.model import Snapshot, iso
from syncbridge.policy.privacy import event_text
from syncbridge.retry import Resting
from syncbridge.secrets import SecretRef

from . import reads
from .client import CalendarClient
from .credentials import SCOPE, oauth_credentials, service_account_credentials, vault_key
from .echoes import KnownEtags
from .mapping import BUSY_FIELDS, EVENT_FIELDS, canonical_id_of, event_id_for, read_event, render, without_nulls
from .push import ROUTE, ChannelKeeper

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from syncbridge.config import ConnectorConfig, PracticeConfig
    from syncbridge.connector import Sandbox

__all__ = ["GoogleCalendarConnector", "GoogleOptions"]

log = structlog.get_logger("syncbridge.google")


class GoogleOptions(BaseModel):
    """The connector's own config keys (validated by ``syncbridge check``)."""

    model_config = ConfigDict(extra="forbid")

    #: "service_account" (Workspace, domain-wide delegation) or "oauth" (each clinician signs in)
    auth: Literal["service_account", "oauth"] = "service_account"
    #: the service account's JSON key (a SecretRef: file, env or systemd credential)
    service_account_key: SecretRef | None = None
    #: OAuth client of type "Desktop app" (auth: oauth)
    client_id: str | None = None
    client_secret: SecretRef | None = None
    #: token endpoint; None uses the key's token_uri (service account) or Google's
    token_uri: str | None = None
    auth_uri: str = "https://accounts.google.com/o/oauth2/auth"
    #: Calendar API root, ending in calendar/v3/
    api_root: str = "https://www.googleapis.com/calendar/v3/"
    disclosure: Literal["standard", "busy"] = "standard"
    #: a full sync lists events ending after now minus this many days
    history_days: int = Field(30, ge=1, le=3660)
    #: longest busy-time window one query covers
    horizon_days: int = Field(180, ge=1, le=3660)
    page_size: int = Field(250, ge=1, le=2500)
    #: writes per batch request (an initial sync); Google takes up to 1000 but advises modest
    #: batches; 1 sends each write on its own
    write_batch: int = Field(50, ge=1, le=1000)
    #: open watch channels when the daemon has an http.public_url
    push: bool = True
    channel_ttl: int = Field(604800, ge=3600, le=2592000)
    #: renew a channel when less than this many seconds remain
    channel_renew_before: int = Field(86400, ge=300)
    #: seconds a write of ours is expected to come back as a push for its calendar (then nothing is
    #: pulled); 0 pulls on every push
    echo_window: float = Field(60, ge=0, le=3600)

    @field_validator("api_root")
    @classmethod
    def _root(cls, value: str) -> str:
        value = value if value.endswith("/") else value + "/"
        if urlsplit(value).scheme not in ("http", "https") or not value.endswith("calendar/v3/"):
            raise ValueError("must be an http(s) URL ending in calendar/v3/, such as https://www.googleapis.com/calendar/v3/")
        return value

    @model_validator(mode="after")
    def _auth_complete(self) -> GoogleOptions:
        if self.auth == "service_account" and self.service_account_key is None:
            raise ValueError("auth service_account needs service_account_key (the JSON key, as {file: ...})")
        if self.auth == "oauth" and (not self.client_id or self.client_secret is None):
            raise ValueError("auth oauth needs client_id and client_secret (a Desktop app OAuth client)")
        return self


class GoogleCalendarConnector(CalendarConnector):
    """Mirror appointments into Google Calendar (Workspace or personal accounts)."""

    capabilities = calendar_capabilities(push=True)
    Options = GoogleOptions
    #: calls per calendar at once, each on a connection of its own (client.py); the accounts take
    #: turns first, so every calendar has a call in flight before any has a second
    account_concurrency = 4

    def __init__(self, name: str, config: ConnectorConfig, practice: PracticeConfig) -> None:
        super().__init__(name, config, practice)
        self.options: GoogleOptions
        for key, account in self.clinicians.items():
            if not isinstance(account.get("email"), str) or "@" not in account["email"]:
                raise ConfigError(f"clinicians.{key}.accounts.{name}.email", "required: the clinician's Google account address")
        found: dict[str, str] = {}
        for key, account in self.clinicians.items():
            cal = str(account.get("calendar") or "primary")
            found[key] = account["email"] if cal == "primary" else cal
        if len(set(found.values())) != len(found):
            raise ConfigError(f"clinicians.*.accounts.{name}.calendar", "two clinicians point at the same calendar; give each their own")
        self._calendars = found
        self._clients: dict[str, CalendarClient] = {}
        #: calendars throttled with Retry-After, skipped until then
        self.resting = Resting()
        #: the etag of each session event as we last wrote or read it (its text is read only past it)
        self.etags = KnownEtags()
        self.push = ChannelKeeper(self)
        self.write_batch = self.options.write_batch

    # --- plumbing ------------------------------------------------------------------------------

    async def calendars(self) -> dict[str, str]:
        """Clinician key -> calendar id (``primary`` is the account's address)."""
        return self._calendars

    def client(self, clinician: str) -> CalendarClient:
        """The clinician's API client: impersonated by the service account, or their own OAuth grant."""
        if clinician not in self._clients:
            email = self.clinicians[clinician]["email"]
            o = self.options
            if o.auth == "service_account":
                assert o.service_account_key is not None
                creds = service_account_credentials(o.service_account_key, email, o.token_uri)
            else:
                refresh = self.host.vault_get(vault_key(clinician))
                if refresh is None:
                    raise AuthError(f"{self.name}: {clinician} has not signed in to Google", action=f"run `syncbridge auth {self.name} {clinician}`")
                assert o.client_id and o.client_secret
                creds = oauth_credentials(o.client_id, o.client_secret.reveal(), refresh, o.token_uri)
            self._clients[clinician] = CalendarClient(creds, o.api_root, notes=self.push)
        return self._clients[clinician]

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self._clients.values())

    def _split(self, external_id: str) -> tuple[str | None, str | None, str]:
        """(clinician, calendar, event id) of an external id ``<calendar>/<event id>`` or a bare event id."""
        calendar, _, event_id = external_id.rpartition("/")
        if not calendar:
            return None, None, event_id
        owner = next((k for k, c in self._calendars.items() if c == calendar), None)
        return owner, calendar, event_id

    def to_observation(self, event: dict[str, Any], clinician: str, calendar: str) -> Observation | None:
        """Our event as an Observation; None for the clinician's own events."""
        external_id = f"{calendar}/{event.get('id')}"
        try:
            check_record_size(len(json.dumps(event)), f"event {external_id}")
            seen = read_event(event, clinician=clinician, clinician_zone=self.practice.clinician_zone(clinician))
        except MalformedRecord as err:
            cid = canonical_id_of(str(event.get("id", "")))
            return Observation(external_id, canonical_id=cid, problem=str(err)) if cid else None
        if seen is None:
            return None
        if seen.deleted:
            return Observation(external_id, canonical_id=seen.canonical_id, deleted=True, modified_at=seen.modified_at)
        fields = {k: v for k, v in seen.fields.items() if k in self.capabilities.fields}
        return Observation(external_id, event.get("etag"), seen.canonical_id, fields, tags=seen.tags, modified_at=seen.modified_at)

    # --- the contract ------------------------------------------------------------------------------

    async def pull(self, cursor: str | None) -> PullResult:
        """Changes since ``cursor`` (JSON: calendar id -> sync token); None lists every event from
        ``history_days`` ago on. Each calendar is read on its own (reads.py)."""
        return await reads.pull(self, cursor)

    async def pull_accounts(self, cursor: str, accounts: frozenset[str]) -> PullResult:
        """Changes since ``cursor`` in these clinicians' calendars only (a push named them); the
        other calendars' sync tokens are returned as they were."""
        return await reads.pull(self, cursor, accounts)

    async def read(self, external_id: str) -> Observation:
        """The event as it is now; deleted when gone. A bare event id is looked for in every calendar."""
        clinician, calendar, event_id = self._split(external_id)
        if calendar is not None and clinician is None:
            raise PermanentError(f"{external_id} is not in any calendar configured for {self.name}")
        places = [(clinician, calendar)] if clinician and calendar else list(self._calendars.items())
        for owner, cal in places:
            event = await self.client(owner).get(cal, event_id, f"{EVENT_FIELDS},summary,description")
            if event is None:
                continue
            obs = self.to_observation(event, owner, cal)
            if obs is None:
                raise PermanentError(f"{cal}/{event_id} holds an event that is not this appointment's")
            if not obs.problem:
                self.etags.note(obs.external_id, None if obs.deleted else obs.etag)
            return obs
        return Observation(external_id=external_id, canonical_id=canonical_id_of(event_id), deleted=True)

    def external_id_for(self, appointment_id: str) -> str | None:
        """The derived event id (read() finds it in whichever calendar holds it)."""
        return event_id_for(appointment_id)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        """Converge the event: insert with the derived id, patch/delete under If-Match."""
        return self.wrote(await self._apply(appointment_id, desired, link))

    def wrote(self, result: ApplyResult) -> ApplyResult:
        """Remember the etag a write produced: the listing that shows it needs no text read."""
        if result.external_id:
            self.etags.note(result.external_id, None if result.gone else result.etag)
        return result

    async def _apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        text = event_text(desired, self.practice.policy.privacy, self.options.disclosure)
        clinician = desired.get("clinician") or ""
        target = self._calendars.get(clinician)
        cancelled = desired.get("status") == "cancelled"
        body = render(appointment_id, desired, text, include_location="location" in self.capabilities.fields)
        if link is not None and not link.gone and link.external_id:
            owner, calendar, event_id = self._split(link.external_id)
            if owner is None or calendar is None:
                raise PermanentError(f"{link.external_id} is not in any calendar configured for {self.name}")
            if calendar != target:  # the session moved to another clinician: remove it here, create it there
                await self.client(owner).delete(calendar, event_id, link.etag)
                if target is None or cancelled:
                    return ApplyResult(link.external_id, None, gone=True)
                return await self._create(clinician, target, body, text.disclosed)
            if cancelled:
                await self.client(owner).delete(calendar, event_id, link.etag)
                return ApplyResult(link.external_id, None, gone=True)
            patch = {k: v for k, v in body.items() if k != "id"}
            event = await self.client(owner).patch(calendar, event_id, patch, link.etag)
            return ApplyResult(link.external_id, event.get("etag"), text.disclosed)
        if target is None:
            raise PermanentError(f"clinician {clinician!r} has no calendar in {self.name}")
        if cancelled:
            return await self._cancel_unlinked(clinician, target, body["id"])
        return await self._create(clinician, target, body, text.disclosed)

    async def apply_many(self, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        """Writes in batch requests of ``write_batch`` parts (batch.py), each with apply()'s semantics."""
        if self.write_batch <= 1 or len(writes) <= 1:
            return await super().apply_many(writes)
        from .batch import apply_batched

        return [self.wrote(r) if isinstance(r, ApplyResult) else r for r in await apply_batched(self, writes)]

    async def _create(self, clinician: str, calendar: str, body: dict[str, Any], disclosed: tuple[str, ...]) -> ApplyResult:
        """Insert; a 409 means our id exists (a lost answer, or a deleted copy): converge that event."""
        client = self.client(clinician)
        external_id = f"{calendar}/{body['id']}"
        event = await client.insert(calendar, without_nulls(body))
        if event is None:
            return await self.adopt(clinician, calendar, body, disclosed)
        return ApplyResult(external_id, event.get("etag"), disclosed)

    async def adopt(self, clinician: str, calendar: str, body: dict[str, Any], disclosed: tuple[str, ...]) -> ApplyResult:
        """The insert's id exists (a lost answer, or a deleted copy): converge that event."""
        client = self.client(clinician)
        external_id = f"{calendar}/{body['id']}"
        existing = await client.get(calendar, body["id"], EVENT_FIELDS)
        if existing is None:
            raise PermanentError(f"{external_id}: Google refuses the id but has no such event")
        private = (existing.get("extendedProperties") or {}).get("private") or {}
        if existing.get("status") != "cancelled" and private.get("syncbridgeId") not in (None, canonical_id_of(body["id"])):
            raise PermanentError(f"{external_id} already holds an event that is not this appointment's")
        if existing.get("status") == "cancelled":  # restore the deleted copy with a full update
            event = await client.update(calendar, body["id"], without_nulls(body), existing.get("etag"))
        else:
            event = await client.patch(calendar, body["id"], {k: v for k, v in body.items() if k != "id"}, existing.get("etag"))
        return ApplyResult(external_id, event.get("etag"), disclosed)

    async def _cancel_unlinked(self, clinician: str, calendar: str, event_id: str) -> ApplyResult:
        """A cancelled session we hold no link for: make sure a lost insert left nothing live."""
        client = self.client(clinician)
        existing = await client.get(calendar, event_id, "etag,status")
        if existing is not None and existing.get("status") != "cancelled":
            await client.delete(calendar, event_id, existing.get("etag"))
            return ApplyResult(f"{calendar}/{event_id}", None, gone=True)
        return ApplyResult(None, None, gone=True)

    async def busy(self, start: datetime, end: datetime) -> list[BusyInterval]:
        """Busy time from the clinicians' own events, expanded by Google (``singleEvents``); only times
        are requested (``fields``), so their text never even reaches us."""
        from .mapping import busy_interval

        end = min(end, start + timedelta(days=self.options.horizon_days))
        out: list[BusyInterval] = []
        skipped = 0
        for clinician, calendar in self._calendars.items():
            zone = self.practice.clinician_zone(clinician)
            async for items, _ in self.client(clinician).pages(
                calendar, timeMin=iso(start), timeMax=iso(end), singleEvents=True, orderBy="startTime",
                maxResults=self.options.page_size, fields=BUSY_FIELDS,
            ):  # fmt: skip
                for event in items:
                    try:
                        interval = busy_interval(event, zone)
                    except MalformedRecord:
                        skipped += 1
                        continue
                    if interval is not None:
                        out.append(BusyInterval(clinician, interval[0].astimezone(UTC), interval[1].astimezone(UTC)))
        if skipped:
            log.warning("busy_events_skipped", connector=self.name, count=skipped)
        return sorted(out, key=lambda b: (b.clinician, b.start, b.end))

    async def check(self) -> str:
        """Authenticate as each clinician and read one event id; nothing is written."""
        for clinician, calendar in self._calendars.items():
            await self.client(clinician).peek(calendar)
        push = "push by watch channels" if self.host.public_url and self.options.push else "polling only (no http.public_url)"
        return f"{len(self._calendars)} calendar(s) reachable as {self.options.auth}, {push}"

    # --- push and sign-in ------------------------------------------------------------------------------

    def webhook_routes(self) -> list[WebhookRoute]:
        return [WebhookRoute(ROUTE, ["POST"], self.push.handle)]

    def webhook_accounts(self, headers: Mapping[str, str], body: bytes) -> frozenset[str] | None:
        """The clinician whose calendar the notification's channel watches; None (pull every
        calendar) for a channel no longer known. Echoes of our own writes were dropped on receipt."""
        calendar = self.push.calendar_of(headers.get("x-goog-channel-id"))
        owner = next((k for k, c in self._calendars.items() if c == calendar), None)
        return frozenset({owner}) if owner is not None else None

    async def maintain(self) -> None:
        await self.push.maintain()

    async def authorize(self, clinician: str) -> str:
        """The installed-app loopback flow: prints a URL to open, waits for Google's redirect, keeps the refresh token."""
        from google_auth_oauthlib.flow import InstalledAppFlow

        o = self.options
        if o.auth != "oauth":
            raise NotImplementedError(f"{self.name} signs in with its service account (auth: service_account); no clinician sign-in is needed")
        if clinician not in self.clinicians:
            raise ConfigError(f"clinicians.{clinician}.accounts.{self.name}", "this clinician has no account in this connector")
        assert o.client_id and o.client_secret
        config = {"installed": {
            "client_id": o.client_id, "client_secret": o.client_secret.reveal(), "auth_uri": o.auth_uri,
            "token_uri": o.token_uri or "https://oauth2.googleapis.com/token", "redirect_uris": ["http://localhost"],
        }}  # fmt: skip
        flow = InstalledAppFlow.from_client_config(config, scopes=[SCOPE])
        creds = await asyncio.to_thread(
            flow.run_local_server, host="localhost", port=0, open_browser=False,
            access_type="offline", prompt="consent", login_hint=self.clinicians[clinician]["email"],
        )  # fmt: skip
        if not getattr(creds, "refresh_token", None):
            raise AuthError("Google returned no refresh token", action="revoke syncbridge's access in the Google account and sign in again")
        self.host.vault_put(vault_key(clinician), creds.refresh_token)
        self._clients.pop(clinician, None)
        return f"{clinician} signed in to Google as {self.clinicians[clinician]['email']}; the refresh token is stored encrypted"

    @classmethod
    def sandbox(cls, workdir: Path, clinicians: list[str]) -> Sandbox | None:
        """The Calendar emulator on loopback for ``syncbridge demo`` (sandbox.py)."""
        from .sandbox import start_sandbox

        return start_sandbox(workdir, clinicians)

    async def close(self) -> None:
        try:
            await self.push.stop_all()
        finally:
            self._clients.clear()

