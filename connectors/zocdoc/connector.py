"""Zocdoc as a ``channel`` (DESIGN sections 3 and 7): clients book here, free slots are published here.

Zocdoc holds only what was booked through it, so ``apply`` never creates: it cancels
(``POST /v1/appointments/cancel`` with the mapped ``cancellation_reason_type``), marks no-shows
(``PUT /v1/appointments/update-status``) and moves (``POST /v1/appointments/reschedule``). Pulls
read ``GET /v1/appointments`` by ``last_modified_time_utc``; because the API returns at most
1,000 results through paging, each pull walks the modification time forward in windows (sorted
ascending, each window starting at the newest time the previous one returned) until a window
comes back below the cap. Webhooks are verified, persisted and answered at once (webhooks.py).
Free slots are published and read back per date (timeslots.py); bookings that arrive
``pending_booking`` are confirmed once the record system holds them (``confirm``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from syncbridge.connector import ApplyResult, Capabilities, Connector, Link, Observation, PullResult, WebhookRoute
from syncbridge.errors import ConfigError, ConflictError, CursorExpired, MalformedRecord, PermanentError, TransientError
from syncbridge.model import CANCELLED_STATES, Role, Snapshot, Status, iso, parse_iso, utcnow
from syncbridge.policy.cancellation import zocdoc_reason
from syncbridge.secrets import SecretRef

from .client import API_CAP, MAX_PAGE, ZocdocClient, instant_param
from .mapping import LIVE_STATUSES, etag_of, local_start, provider_of, read_record
from .timeslots import TimeslotPublishing
from .webhooks import WEBHOOK_PATH, SeenDeliveries, appointment_ids, decode_key, webhook_route

if TYPE_CHECKING:
    from pathlib import Path

    from syncbridge.connector import Sandbox

__all__ = ["ENVIRONMENTS", "ZocdocConnector", "ZocdocOptions"]

log = structlog.get_logger("syncbridge.zocdoc")

#: environment -> (API base URL, token URL), from the OpenAPI ``servers`` and ``securitySchemes``
ENVIRONMENTS: Mapping[str, tuple[str, str]] = {
    "sandbox": ("https://api-developer-sandbox.zocdoc.com", "https://auth-api-developer-sandbox.zocdoc.com/oauth/token"),
    "production": ("https://api-developer.zocdoc.com", "https://auth.zocdoc.com/oauth/token"),
}
#: "no older than 2 days to be marked as no_show" (PUT /v1/appointments/update-status)
NO_SHOW_WINDOW = timedelta(days=2)


def _modified(data: Mapping[str, Any]) -> datetime | None:
    """``last_modified_time_utc`` as an instant, None when absent or unreadable."""
    text = data.get("last_modified_time_utc")
    try:
        return parse_iso(text) if isinstance(text, str) else None
    except ValueError:
        return None


class VisitReason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    minutes: int = Field(gt=0, le=600)
    service_code: str | None = None


class ZocdocOptions(BaseModel):
    """The connector's own config keys (validated by ``syncbridge check``)."""

    model_config = ConfigDict(extra="forbid")

    environment: Literal["sandbox", "production"]
    client_id: str = Field(min_length=1)
    client_secret: SecretRef
    #: overrides of the documented URLs (a proxy, the emulator)
    base_url: str | None = None
    token_url: str | None = None
    #: the OAuth audience; defaults to the API base URL with a trailing slash
    audience: str | None = None
    #: the base64 key Zocdoc signs webhooks with; without it no webhook route is offered
    webhook_secret: SecretRef | None = None
    webhook_tolerance_seconds: float = Field(300.0, gt=0, le=3600)
    #: length of a session booked in Zocdoc (Zocdoc holds no end time; the visit reason sets it)
    session_minutes: int = Field(50, gt=0, le=600)
    visit_reasons: dict[str, VisitReason] = Field(default_factory=dict)
    #: bookings of providers with manual confirmation arrive ``pending_booking``: true confirms each
    #: through the API once the record system holds the session; false leaves it to the practice
    #: (a worklist item asks for it)
    confirm_bookings: bool = True
    #: a full listing covers appointments starting at most this many days ago
    past_days: int = Field(14, ge=0, le=365)
    overlap_seconds: float = Field(120.0, ge=0)
    page_size: int = Field(100, ge=1, le=100)
    timeout: float = Field(30.0, gt=0)

    def urls(self) -> tuple[str, str, str]:
        base, token = ENVIRONMENTS[self.environment]
        base = (self.base_url or base).rstrip("/")
        return base, self.token_url or token, self.audience or (self.base_url or ENVIRONMENTS[self.environment][0]).rstrip("/") + "/"


class ZocdocConnector(TimeslotPublishing, Connector):
    capabilities = Capabilities(
        role=Role.CHANNEL,
        fields=frozenset({"clinician", "start", "end", "timezone", "status", "cancellation"}),
        accepts_new=False,
        push=True,
        publishes_availability=True,
        reads_availability=True,
        confirms_bookings=True,
        status_map={Status.ARRIVED: Status.BOOKED, Status.FULFILLED: Status.BOOKED, Status.ENTERED_IN_ERROR: Status.CANCELLED},
    )
    Options = ZocdocOptions
    #: one partner API for the whole practice: at most this many calls at once
    max_concurrency = 8

    def __init__(self, name: str, config: Any, practice: Any) -> None:
        super().__init__(name, config, practice)
        self._client: ZocdocClient | None = None
        self._key: bytes | None = None
        self._told = False
        self.confirm_by_hand = not self.options.confirm_bookings
        #: deliveries accepted lately: a replay within the timestamp tolerance is acknowledged, not stored
        self._seen = SeenDeliveries(self.options.webhook_tolerance_seconds)
        #: provider id -> clinician key
        self.clinician_of: dict[str, str] = {}
        for key, account in self.clinicians.items():
            provider = account.get("provider_id")
            if not isinstance(provider, str) or not provider:
                raise ConfigError(f"clinicians.{key}.accounts.{name}.provider_id", "the clinician's Zocdoc provider id (pr_...) is required")
            self.clinician_of[provider] = key
        self._check_self_scheduling()

    def client(self) -> ZocdocClient:
        if self._client is None:
            o: ZocdocOptions = self.options
            base, token_url, audience = o.urls()
            self._client = ZocdocClient(
                base, token_url=token_url, audience=audience, client_id=o.client_id, client_secret=o.client_secret.reveal, timeout=o.timeout
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def check(self) -> str:
        result = await self.pull(None)
        return f"{len(result.observations)} Zocdoc appointments of {len(self.clinician_of)} providers visible"

    # --- reading ------------------------------------------------------------------------

    def _observe(self, data: dict[str, Any]) -> Observation | None:
        """The observation of one record, None when it belongs to a provider we do not serve."""
        ext = str(data.get("appointment_id") or "")
        clinician = self.clinician_of.get(provider_of(str(data.get("provider_location_id") or "")))
        if not ext or clinician is None:
            return None
        etag = etag_of(data)
        o: ZocdocOptions = self.options
        reason = o.visit_reasons.get(str(data.get("visit_reason_id")))
        zone = self.practice.clinician_zone(clinician)
        try:
            rec = read_record(data, clinician=clinician, zone=zone, minutes=reason.minutes if reason else o.session_minutes,
                              service_code=reason.service_code if reason else None)
        except MalformedRecord as err:
            return Observation(external_id=ext, etag=etag, problem=str(err))
        modified = _modified(data)
        modified_at = iso(modified) if modified else None
        return Observation(external_id=ext, etag=etag, fields=rec.fields, deleted=rec.failed, tags=rec.tags,
                           modified_at=modified_at, cancellation=rec.cancellation, pending=data.get("appointment_status") == "pending_booking")

    async def _window(self, params: dict[str, str]) -> tuple[list[dict[str, Any]], bool]:
        """One query paged to its end; True when it stopped at the API's 1,000-result cap."""
        size = self.options.page_size
        items: list[dict[str, Any]] = []
        total = 0
        for page in range(MAX_PAGE + 1):
            body = await self.client().appointments_page(params, page, size)
            data = [d for d in body.get("data") or [] if isinstance(d, dict)]
            items.extend(data)
            count = body.get("total_count")
            total = count if isinstance(count, int) else 0
            if not body.get("next_url") or not data or len(items) >= API_CAP:
                break
        return items, len(items) >= API_CAP or total > len(items)

    async def _listing(self, since: datetime | None, extra: dict[str, str]) -> list[dict[str, Any]]:
        """Every record modified at or after ``since``, walking windows past the 1,000 cap."""
        base = {
            "provider_ids": ",".join(sorted(self.clinician_of)),
            "sort_by": "last_modified_time_utc",
            "sort_direction": "ascending",
        } | extra
        found: dict[str, dict[str, Any]] = {}
        low = since
        while True:
            params = base | ({"last_modified_time_utc_min": instant_param(low)} if low else {})
            items, capped = await self._window(params)
            for d in items:
                found[str(d.get("appointment_id"))] = d
            if not capped:
                return list(found.values())
            newest = max((m for m in map(_modified, items) if m), default=None)
            if newest is None or (low is not None and newest <= low):
                raise TransientError("more than 1,000 Zocdoc appointments share one modification second; the API cannot page past them")
            low = newest  # the minimum is inclusive: the boundary second is read again, de-duplicated above

    async def pull(self, cursor: str | None) -> PullResult:
        try:
            state = json.loads(cursor) if cursor else {}
            previous = parse_iso(state["since"]) if state.get("since") else None
        except (ValueError, TypeError, AttributeError) as err:
            raise CursorExpired("the stored Zocdoc watermark cannot be read") from err
        started = utcnow()
        overlap = timedelta(seconds=self.options.overlap_seconds)
        if not self.clinician_of:
            return PullResult([], cursor, complete=cursor is None)
        window: tuple[str, str] | None = None
        if cursor is None:
            floor = started - timedelta(days=self.options.past_days)
            records = await self._listing(None, {"start_time_utc_min": instant_param(floor)})
            window = (iso(floor), "\uffff")
        else:
            since = previous - overlap if previous else None
            records = await self._listing(since, {})
        observations = [o for o in (self._observe(d) for d in records) if o is not None]
        newest = max((m for m in map(_modified, records) if m), default=None)
        # the watermark follows Zocdoc's own modification clock; ours only seeds an empty history
        known = [x for x in (newest, previous) if x is not None]
        since_next = max(known) if known else started - overlap
        return PullResult(observations, json.dumps({"since": iso(since_next)}), complete=cursor is None, window=window)

    async def read(self, external_id: str) -> Observation:
        data = await self.client().appointment(external_id)
        if data is None:
            return Observation(external_id=external_id, deleted=True)
        obs = self._observe(data)
        if obs is None:
            return Observation(external_id=external_id, problem="the appointment belongs to a Zocdoc provider no clinician is mapped to")
        return obs

    # --- writing ------------------------------------------------------------------------

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        """Converge an existing Zocdoc appointment; Zocdoc bookings are only ever made by clients."""
        if link is None or link.gone or not link.external_id:
            raise PermanentError("Zocdoc holds only appointments booked through it; syncbridge never creates one there")
        client = self.client()
        ext = link.external_id
        current = await client.appointment(ext)
        if current is None:
            return ApplyResult(ext, None, gone=True)
        if link.etag and etag_of(current) != link.etag:
            raise ConflictError(f"Zocdoc appointment {ext} changed since it was last read")
        status = str(current.get("appointment_status"))
        want = desired["status"]
        steps: list[str] = []
        if want in CANCELLED_STATES:
            await self._call_off(ext, current, desired, steps)
        elif status not in LIVE_STATUSES:
            # cancelled in Zocdoc and live again here: Zocdoc cannot un-cancel, and its copy is no longer this session
            return ApplyResult(ext, etag_of(current), gone=True, steps=(f"Zocdoc appointment is {status}; not re-booked there",))
        elif parse_iso(str(current["start_time"])) != parse_iso(desired["start"]):
            zone = self.practice.clinician_zone(desired["clinician"])
            await self._conflict_aware(client.reschedule(ext, local_start(parse_iso(desired["start"]), zone)), want_status=None, ext=ext)
            steps.append("rescheduled in Zocdoc")
        after = await client.appointment(ext) if steps else current
        if after is None:
            return ApplyResult(ext, None, gone=True)
        return ApplyResult(ext, etag_of(after), steps=tuple(steps))

    async def _call_off(self, ext: str, current: dict[str, Any], desired: Snapshot, steps: list[str]) -> None:
        status = str(current.get("appointment_status"))
        if status not in LIVE_STATUSES:
            return  # already cancelled, a no-show or a failed booking
        client = self.client()
        cancellation = desired.get("cancellation") or {}
        start = parse_iso(str(current["start_time"]))
        now = utcnow()
        if desired["status"] == Status.NOSHOW and start <= now:
            if now - start > NO_SHOW_WINDOW:
                steps.append("no-show not marked in Zocdoc: it accepts no-shows only within 2 days of the start")
                return
            await self._conflict_aware(client.update_status(ext, "no_show"), want_status="no_show", ext=ext)
            steps.append("marked no_show in Zocdoc")
            return
        reason = zocdoc_reason(cancellation)
        await self._conflict_aware(client.cancel(ext, reason), want_status="cancelled", ext=ext)
        steps.append(f"cancelled in Zocdoc ({reason})")

    async def _conflict_aware(self, call: Any, *, want_status: str | None, ext: str) -> None:
        """A 409 because the appointment is already where we want it is success; otherwise a conflict."""
        try:
            await call
        except ConflictError:
            now = await self.client().appointment(ext)
            if want_status is None or now is None or now.get("appointment_status") != want_status:
                raise

    def external_id_for(self, appointment_id: str) -> str | None:
        return None

    async def confirm(self, external_id: str) -> None:
        """``POST /v1/appointments/confirm``; a 409 because it is confirmed already is success."""
        await self._conflict_aware(self.client().confirm(external_id), want_status="confirmed", ext=external_id)
        log.info("booking_confirmed", connector=self.name, appointment=external_id)

    # --- push and availability --------------------------------------------------------------

    def _signing_key(self) -> bytes:
        if self._key is None:
            secret: SecretRef = self.options.webhook_secret
            self._key = decode_key(secret.reveal())
        return self._key

    def webhook_routes(self) -> list[WebhookRoute]:
        if self.options.webhook_secret is None:
            return []
        return [webhook_route(lambda: self.host, self._signing_key, tolerance=self.options.webhook_tolerance_seconds, connector=self.name,
                              seen=self._seen)]

    def webhook_targets(self, headers: Mapping[str, str], body: bytes) -> list[str] | None:
        return appointment_ids(body)

    async def maintain(self) -> None:
        """Zocdoc registers webhook URLs out of band; say once which URL to give them (or why push is off)."""
        if self._told:
            return
        self._told = True
        if self.options.webhook_secret is None:
            log.info("zocdoc_push_off", connector=self.name, why="no webhook_secret configured; polling only")
        elif self.host.public_url is None:
            log.info("zocdoc_push_off", connector=self.name, why="http.public_url is not set; Zocdoc cannot reach the webhook route")
        else:
            log.info("zocdoc_webhook_url", connector=self.name, url=self.host.public_url.rstrip("/") + WEBHOOK_PATH)

    @classmethod
    def sandbox(cls, workdir: Path, clinicians: list[str]) -> Sandbox | None:
        from .sandbox import start_sandbox

        return start_sandbox(workdir, clinicians)
