"""Microsoft 365 / Outlook calendars as a mirror (DESIGN section 3), over Microsoft Graph v1.0.

One connector serves every clinician's mailbox of a tenant with an app-only token (or, for a
single clinician, a delegated device-code sign-in). Incremental pulls are ``calendarView/delta``
rounds over a rolling window, one deltaLink per mailbox in the cursor; a full listing is the
window's ``calendarView`` with our hidden properties, started after a fresh delta round so no
change falls between the two. Writes are conditional (``If-Match`` on the event's etag) and
creates carry a ``transactionId`` derived from the canonical id, so a retry never duplicates.
Change notifications (push.py) name the events to re-read, or else the mailboxes to pull
(``pull_accounts``: those alone); polling stays the safety net. Reads ask Graph only for what a
session needs (``$select``) wherever Graph takes it, so the clinicians' own events' text stays at
Microsoft except in delta answers, which Graph sends whole (README section 5); with
``changes: calendar_view`` pulls never call delta, each one lists the window instead (listing.py).

Each mailbox is read on its own (DESIGN section 9): one that fails (a revoked permission, a
removed mailbox, throttling) keeps its deltaLink and is reported in ``failed_accounts`` while the
others' changes are returned; a mailbox throttled with Retry-After is left alone until then.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from syncbridge.connector import ApplyResult, BusyInterval, CalendarConnector, Link, Observation, PullResult, Write, calendar_capabilities
from syncbridge.errors import ConfigError, ConflictError, MalformedRecord, PermanentError
from syncbridge.limits import check_record_size
from syncbridge.model import Snapshot
from syncbridge.policy.privacy import EventText, event_text
from syncbridge.retry import Resting
from syncbridge.secrets import SecretRef

from . import listing, reads
from .auth import AppTokens, DelegatedTokens
from .client import MAILBOX_CONCURRENCY, GraphClient
from .mapping import (
    EXT_FIELDS, EXT_ID, SESSION_FIELDS, TEXT_FIELDS, as_written, busy_interval, canonical_id_of, read_event, render, transaction_id_for,
    with_properties,
)
from .push import Push

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from syncbridge.config import ConnectorConfig, PracticeConfig
    from syncbridge.connector import Sandbox, WebhookRoute

__all__ = ["Microsoft365Connector", "Microsoft365Options"]

log = structlog.get_logger("syncbridge.microsoft365")

#: remembered (etag, observation) pairs, so a delta round does not re-fetch what we already know
SEEN_LIMIT = 20_000


class Microsoft365Options(BaseModel):
    """The connector's own config keys (validated by ``syncbridge check``)."""

    model_config = ConfigDict(extra="forbid")

    #: directory (tenant) id or a verified domain
    tenant: str
    #: application (client) id of the app registration
    client_id: str
    #: "app": client credentials for every mailbox; "delegated": each clinician signs in (device code)
    auth: Literal["app", "delegated"] = "app"
    client_secret: SecretRef | None = None
    #: certificate credential: the PEM private key and the PEM certificate uploaded to the app registration
    certificate_key: SecretRef | None = None
    certificate: SecretRef | None = None
    #: national clouds: https://login.microsoftonline.us, https://login.chinacloudapi.cn ...
    authority_host: str = "https://login.microsoftonline.com"
    #: national clouds: https://graph.microsoft.us/v1.0, https://microsoftgraph.chinacloudapi.cn/v1.0 ...
    graph_url: str = "https://graph.microsoft.com/v1.0"
    #: PEM file of the CA(s) to trust instead of the system's (a TLS-inspecting proxy, the sandbox)
    ca_bundle: Path | None = None
    window_days_back: int = Field(30, ge=1, le=3650)
    window_days_ahead: int = Field(365, ge=1, le=3650)
    #: events per page: ``Prefer: odata.maxpagesize`` on delta rounds, ``$top`` on calendarView listings
    page_size: int = Field(100, ge=1, le=1000)
    #: how pulls find changes. "delta": ``calendarView/delta`` rounds, which Graph sends whole (no
    #: ``$select``), so a changed private event's text crosses the wire and is dropped on arrival.
    #: "calendar_view": every pull lists the window with a ``$select``ed calendarView instead (times,
    #: flags and our hidden properties only) and reads only sessions whose etag changed, so no
    #: private event's text is ever sent; it costs a page of the window per mailbox on every poll
    #: (listing.py, README section 5)
    changes: Literal["delta", "calendar_view"] = "delta"
    #: what the event shows (policy.privacy): "standard" title and room, or only "busy"
    disclosure: Literal["standard", "busy"] = "standard"
    #: lifetime asked for each subscription (Outlook events allow at most 10080 minutes)
    subscription_minutes: int = Field(4230, ge=45, le=10080)
    renew_before_minutes: int = Field(1440, ge=5)
    #: writes per JSON batch (an initial sync); Graph takes at most 20; 1 sends each write on its own
    write_batch: int = Field(20, ge=1, le=20)

    @field_validator("authority_host", "graph_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if urlsplit(value).scheme != "https" or not urlsplit(value).netloc:
            raise ValueError("must be an https:// URL (msal and Graph accept nothing else)")
        return value.rstrip("/")

    @field_validator("ca_bundle")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file (a PEM bundle of CA certificates)")
        return value

    @model_validator(mode="after")
    def _credential(self) -> Microsoft365Options:
        cert = self.certificate_key is not None or self.certificate is not None
        if self.auth == "app":
            if (self.client_secret is None) == (not cert):
                raise ValueError("auth app needs client_secret, or certificate_key with certificate (not both)")
            if cert and (self.certificate_key is None or self.certificate is None):
                raise ValueError("a certificate credential needs both certificate_key and certificate")
        elif self.client_secret is not None or cert:
            raise ValueError("auth delegated signs in as each clinician: remove client_secret and certificate_*")
        return self


@dataclass(slots=True)
class _Seen:
    etag: str | None
    observation: Observation
    #: None: not asked (a removal reads the attendees first)
    has_attendees: bool | None
    #: earlier versions we wrote or read (a late notification may name one of them)
    before: tuple[str, ...] = ()


class Microsoft365Connector(CalendarConnector):
    """Mirror appointments into Outlook calendars of a Microsoft 365 tenant."""

    capabilities = calendar_capabilities(push=True)
    Options = Microsoft365Options
    #: writes one mailbox may have in flight at once: Outlook's limit per app and mailbox
    #: (learn.microsoft.com/graph/throttling-limits#outlook-service-limits); the client holds it too
    account_concurrency: int | None = MAILBOX_CONCURRENCY

    def __init__(self, name: str, config: ConnectorConfig, practice: PracticeConfig) -> None:
        super().__init__(name, config, practice)
        self.options: Microsoft365Options
        self.mailboxes: dict[str, str] = {}
        for key, account in self.clinicians.items():
            mailbox = account.get("mailbox")
            if not isinstance(mailbox, str) or "@" not in mailbox:
                raise ConfigError(f"clinicians.{key}.accounts.{name}.mailbox", "required: the clinician's mailbox (user principal name)")
            self.mailboxes[key] = mailbox.strip()
        if self.options.auth == "delegated" and len(self.mailboxes) > 1:
            raise ConfigError(f"connectors.{name}.auth", "delegated sign-in serves one clinician; use auth: app for several mailboxes")
        self._client: GraphClient | None = None
        self._tokens: AppTokens | DelegatedTokens | None = None
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        #: mailboxes throttled with Retry-After, skipped until then
        self.resting = Resting()
        self.push = Push(self)
        self.write_batch = self.options.write_batch

    # --- plumbing --------------------------------------------------------------------------

    @property
    def tokens(self) -> AppTokens | DelegatedTokens:
        if self._tokens is None:
            o = self.options
            authority = f"{o.authority_host}/{o.tenant}"
            split = urlsplit(o.graph_url)
            resource = f"{split.scheme}://{split.netloc}"
            if o.auth == "delegated":
                self._tokens = DelegatedTokens(o.client_id, authority, resource, o.ca_bundle, lambda: self.host, self.name)
            else:
                credential: str | dict[str, str]
                if o.client_secret is not None:
                    credential = o.client_secret.reveal()
                else:
                    assert o.certificate_key is not None and o.certificate is not None
                    credential = {"private_key": o.certificate_key.reveal(), "public_certificate": o.certificate.reveal()}
                self._tokens = AppTokens(o.client_id, authority, credential, resource, o.ca_bundle)
        return self._tokens

    @property
    def client(self) -> GraphClient:
        if self._client is None:
            self._client = GraphClient(self.options.graph_url, self.tokens, ca_bundle=self.options.ca_bundle, page_size=self.options.page_size)
        return self._client

    def _split(self, external_id: str) -> tuple[str, str, str]:
        clinician, _, event_id = external_id.partition("/")
        if clinician not in self.mailboxes or not event_id:
            raise PermanentError(f"{external_id} is not an event of a mailbox configured for {self.name}")
        return clinician, self.mailboxes[clinician], event_id

    def _window(self) -> tuple[datetime, datetime]:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return today - timedelta(days=self.options.window_days_back), today + timedelta(days=self.options.window_days_ahead + 1)

    def _remember(self, external_id: str, etag: str | None, obs: Observation, has_attendees: bool | None = False) -> None:
        prev = self._seen.get(external_id)
        before: tuple[str, ...] = ()
        if prev is not None:
            before = prev.before + ((prev.etag,) if prev.etag and prev.etag != etag else ())
        self._seen[external_id] = _Seen(etag, obs, has_attendees, before[-4:])
        self._seen.move_to_end(external_id)
        while len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)

    def known(self, external_id: str, etag: Any, *, deleted: bool) -> bool:
        """Whether a notification names the state we last wrote or read: this etag, or a deletion
        we made or saw (a notification's echo)."""
        seen = self._seen.get(external_id)
        if seen is None:
            return False
        if deleted:
            return seen.observation.deleted
        return bool(etag) and (seen.etag == etag or etag in seen.before)

    def _observe(self, clinician: str, event: dict[str, Any], hint: Mapping[str, Any] | None = None) -> Observation | None:
        """Our event as an Observation (remembered by etag); None for the clinician's own events.
        ``hint``: a delta item of this very version (its tags, attendees and modification time)."""
        ext = f"{clinician}/{event.get('id')}"
        etag = event.get("@odata.etag")
        tags: frozenset[str] | None = None
        has_attendees: bool | None = None
        if hint is not None:
            tags, has_attendees = frozenset(hint.get("tags") or ()), hint.get("has_attendees")
            event = {"lastModifiedDateTime": hint.get("lastModifiedDateTime")} | event
        try:
            check_record_size(len(json.dumps(event)), f"event {ext}")
            seen = read_event(event, clinician=clinician, clinician_zone=self.practice.clinician_zone(clinician), tags=tags,
                              has_attendees=has_attendees)
        except MalformedRecord as err:
            return Observation(external_id=ext, etag=etag, problem=str(err))
        if seen is None:
            return None
        fields = {k: v for k, v in seen.fields.items() if k in self.capabilities.fields}
        obs = Observation(ext, etag, seen.canonical_id, fields, tags=seen.tags, modified_at=seen.modified_at)
        self._remember(ext, etag, obs, seen.has_attendees)
        return obs

    async def _fetch(self, clinician: str, mailbox: str, event_id: str, hint: Mapping[str, Any] | None = None, *,
                     session: bool = False) -> Observation:
        """GET one event with our hidden properties; deleted when gone or not ours.

        Only what a session needs is asked for (``$select``, learn.microsoft.com/graph/api/event-get):
        a clinician's own event never sends its text. The text tags are read from (subject,
        preview) is asked for with it when the event is known to be ours (remembered, or
        ``session``: a listing just showed our hidden id on it); one not known yet, found to be
        ours, is read once more for its text alone. ``hint``: the delta item that named the
        event, whose tags serve when the event read is that same version."""
        ext = f"{clinician}/{event_id}"
        seen = self._seen.get(ext)
        with_text = hint is None and (session or seen is not None and not seen.observation.deleted)
        select = list(SESSION_FIELDS + (TEXT_FIELDS if with_text else ()))
        event = await self.client.get_event(clinician, mailbox, event_id, expand=[EXT_ID, EXT_FIELDS], select=select)
        usable = hint if hint is not None and "tags" in hint and event is not None and hint.get("@odata.etag") == event.get("@odata.etag") else None
        if event is not None and not with_text and usable is None and canonical_id_of(event) is not None:
            text = await self.client.get_event(clinician, mailbox, event_id, select=list(TEXT_FIELDS))
            event = event | {k: text.get(k) for k in TEXT_FIELDS} if text is not None else None
        obs = self._observe(clinician, event, usable) if event is not None else None
        if obs is None:
            obs = Observation(external_id=ext, deleted=True)
            self._remember(ext, None, obs)
        return obs

    # --- the contract ------------------------------------------------------------------------

    async def pull(self, cursor: str | None) -> PullResult:
        """Delta rounds since ``cursor`` (JSON: clinician -> deltaLink and window), or with
        ``changes: calendar_view`` a listing of the window; None lists the window. Each mailbox is
        read on its own (reads.py, listing.py)."""
        if self.options.changes == "calendar_view":
            return await listing.pull(self, cursor)
        return await reads.pull(self, cursor)

    async def pull_accounts(self, cursor: str, accounts: frozenset[str]) -> PullResult:
        """Delta rounds (or listings) of these clinicians' mailboxes only (a notification named
        them); every other mailbox's deltaLink stays in the cursor as it was."""
        if self.options.changes == "calendar_view":
            return await listing.pull(self, cursor, accounts)
        return await reads.pull(self, cursor, accounts)

    async def read(self, external_id: str) -> Observation:
        clinician, mailbox, event_id = self._split(external_id)
        return await self._fetch(clinician, mailbox, event_id)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        """Converge the event: create with transactionId, update/delete under If-Match."""
        text = event_text(desired, self.practice.policy.privacy, self.options.disclosure)
        clinician = desired.get("clinician") or ""
        cancelled = desired.get("status") == "cancelled"
        if link is not None and not link.gone and link.external_id:
            held_by, mailbox, event_id = self._split(link.external_id)
            if held_by != clinician or cancelled:
                await self._remove(held_by, mailbox, event_id, link.etag)
                if cancelled or clinician not in self.mailboxes:
                    return ApplyResult(link.external_id, None, gone=True)
                return await self._create(appointment_id, desired, text, clinician)
            body = render(appointment_id, desired, text)
            event = await self.client.update_event(clinician, mailbox, event_id, body, link.etag)
            if event is None:
                raise ConflictError(f"{link.external_id} was deleted in the calendar meanwhile")
            self._observe(clinician, with_properties(event, body))
            return ApplyResult(link.external_id, event.get("@odata.etag"), text.disclosed)
        if clinician not in self.mailboxes:
            raise PermanentError(f"clinician {clinician!r} has no mailbox in {self.name}")
        if cancelled:
            await self._remove_unlinked(appointment_id, clinician)
            return ApplyResult(None, None, gone=True)
        return await self._create(appointment_id, desired, text, clinician)

    async def apply_many(self, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        """Writes in JSON batches of ``write_batch`` per mailbox (batch.py), each with apply()'s semantics."""
        if self.write_batch <= 1 or len(writes) <= 1:
            return await super().apply_many(writes)
        from .batch import apply_batched

        return await apply_batched(self, writes)

    async def _create(self, appointment_id: str, desired: Snapshot, text: EventText, clinician: str) -> ApplyResult:
        mailbox = self.mailboxes[clinician]
        body = render(appointment_id, desired, text)
        asked = datetime.now(UTC)
        event = await self.client.create_event(clinician, mailbox, body | {"transactionId": transaction_id_for(appointment_id)})
        if not as_written(event, body, asked):
            # a retried create answered with the first attempt's event, perhaps edited since: converge it
            event = await self.client.update_event(clinician, mailbox, str(event["id"]), body, event.get("@odata.etag")) or event
        ext = f"{clinician}/{event['id']}"
        self._observe(clinician, with_properties(event, body))
        return ApplyResult(ext, event.get("@odata.etag"), text.disclosed)

    async def _remove(self, clinician: str, mailbox: str, event_id: str, etag: str | None) -> None:
        """Take the event off the calendar: a meeting with attendees is cancelled (they are told), else deleted."""
        seen = self._seen.get(f"{clinician}/{event_id}")
        if seen is None or seen.etag != etag or seen.has_attendees is None:
            current = await self.client.get_event(clinician, mailbox, event_id, select=["attendees"])
            if current is None:
                return
            if etag and current.get("@odata.etag") != etag:
                raise ConflictError(f"{clinician}/{event_id} changed in the calendar since it was read")
            has_attendees = bool(current.get("attendees"))
        else:
            has_attendees = seen.has_attendees
        if has_attendees:
            await self.client.cancel_event(clinician, mailbox, event_id, "This session has been cancelled.")
        else:
            await self.client.delete_event(clinician, mailbox, event_id, etag)
        self._remember(f"{clinician}/{event_id}", None, Observation(external_id=f"{clinician}/{event_id}", deleted=True))

    async def _remove_unlinked(self, appointment_id: str, clinician: str) -> None:
        """A cancelled session we hold no link for: make sure a lost create left nothing live."""
        mailbox = self.mailboxes[clinician]
        for event in await self.client.find_by_property(clinician, mailbox, EXT_ID, appointment_id):
            await self._remove(clinician, mailbox, str(event["id"]), event.get("@odata.etag"))

    async def busy(self, start: datetime, end: datetime) -> list[BusyInterval]:
        """Busy time from the clinicians' own events (calendarView expands their series server-side)."""
        out: list[BusyInterval] = []
        select = ["start", "end", "showAs", "isCancelled", "transactionId"]
        for clinician, mailbox in self.mailboxes.items():
            for event in await self.client.calendar_view(clinician, mailbox, (start, end), select=select, expand=[EXT_ID]):
                interval = busy_interval(event)
                if interval is not None:
                    out.append(BusyInterval(clinician, *interval))
        return sorted(out, key=lambda b: (b.clinician, b.start, b.end))

    async def check(self) -> str:
        """Authenticate and read one day of each mailbox; nothing is written."""
        now = datetime.now(UTC)
        for clinician, mailbox in self.mailboxes.items():
            await self.client.calendar_view(clinician, mailbox, (now, now + timedelta(days=1)), select=["start"])
        push = "on" if self.host.public_url else "off (no http.public_url)"
        return f"{len(self.mailboxes)} mailbox(es) readable with {self.options.auth} auth; change notifications {push}"

    async def authorize(self, clinician: str) -> str:
        """Device-code sign-in for the clinician's mailbox (``syncbridge auth``)."""
        if self.options.auth != "delegated":
            raise ConfigError(f"connectors.{self.name}.auth", "app-only auth needs no sign-in; set auth: delegated to sign in as a clinician")
        if clinician not in self.mailboxes:
            raise ConfigError(f"clinicians.{clinician}.accounts.{self.name}.mailbox", "this clinician has no mailbox in this connector")
        tokens = self.tokens
        assert isinstance(tokens, DelegatedTokens)
        user = await tokens.sign_in(clinician, self.mailboxes[clinician], lambda line: print(line, flush=True))
        return f"{clinician} signed in to {self.name} as {user}; the token is stored encrypted"

    def webhook_routes(self) -> list[WebhookRoute]:
        return self.push.routes()

    def webhook_targets(self, headers: Mapping[str, str], body: bytes) -> list[str] | None:
        return self.push.targets(headers, body)

    def webhook_accounts(self, headers: Mapping[str, str], body: bytes) -> frozenset[str] | None:
        return self.push.accounts(headers, body)

    async def maintain(self) -> None:
        await self.push.maintain()

    @classmethod
    def sandbox(cls, workdir: Path, clinicians: list[str]) -> Sandbox | None:
        from .sandbox import start_sandbox

        return start_sandbox(workdir, clinicians)

    async def close(self) -> None:
        if self.host.public_url is not None:
            await self.push.close()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._tokens is not None:
            self._tokens.close()

