"""A read-only EHR seen through its calendar export (one iCal feed URL per clinician).

Role ``record``, ``read_only``: syncbridge reads sessions, cancellations and no-shows from the
feed, and for anything the EHR must change (a session cancelled in a calendar, a booking made
through a directory) it opens a worklist item with a precise instruction for the front desk.
The item closes by itself once the feed shows the change. Feed URLs carry a secret token, so
they are secret references, never plain config.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from pydantic import BaseModel, Field

from syncbridge.connector import ApplyResult, Capabilities, Connector, Link, Observation, PullResult
from syncbridge.errors import AuthError, ConfigError, MalformedRecord, PermanentError, RateLimited, TransientError, retry_after_seconds, unreachable
from syncbridge.model import CANCELLED_STATES, Role, Snapshot, Status, iso, parse_iso, utcnow
from syncbridge.secrets import SecretRef

from .mapping import feed_observations

__all__ = ["ICalFeedConnector"]

_KIND_WORDS = {"late_cancel": "Late Cancel", "cancel": "Cancelled", "no_show": "No Show"}


class ICalFeedOptions(BaseModel):
    past_days: int = Field(14, ge=0, description="how far back the feed is read")
    horizon_days: int = Field(120, ge=1, description="how far ahead the feed is read")
    timeout: float = Field(30.0, gt=0)
    verify_tls: bool = True


class ICalFeedConnector(Connector):
    Options = ICalFeedOptions
    capabilities = Capabilities(
        role=Role.RECORD,
        fields=frozenset({"clinician", "start", "end", "timezone", "status"}),
        read_only=True,
        status_map={Status.ARRIVED: Status.BOOKED, Status.FULFILLED: Status.BOOKED, Status.ENTERED_IN_ERROR: Status.CANCELLED},
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.feeds: dict[str, SecretRef] = {}
        for clinician, account in self.clinicians.items():
            try:
                self.feeds[clinician] = SecretRef.model_validate(account.get("feed"))
            except ValueError as err:
                raise ConfigError(f"clinicians.{clinician}.accounts.{self.name}.feed", f"the feed URL is a secret reference ({err})") from None
        self._http = httpx.AsyncClient(timeout=self.options.timeout, verify=self.options.verify_tls, follow_redirects=True)

    async def _fetch(self, clinician: str, etag: str | None) -> tuple[bytes | None, str | None]:
        """The feed body, or None when unchanged (304 to If-None-Match)."""
        url = self.feeds[clinician].reveal()
        headers = {"If-None-Match": etag} if etag else {}
        try:
            resp = await self._http.get(url, headers=headers)
        except httpx.HTTPError as err:
            raise unreachable(f"feed of {clinician}", err) from err
        if resp.status_code == 304:
            return None, etag
        if resp.status_code in (401, 403, 404):
            raise AuthError(f"feed of {clinician} answered {resp.status_code}", action="copy the clinician's current calendar feed URL from the EHR into the secret")
        if resp.status_code == 429 or resp.status_code >= 500:
            retry = resp.headers.get("Retry-After")
            cls = RateLimited if resp.status_code in (429, 503) else TransientError
            raise cls(f"feed of {clinician} answered {resp.status_code}", retry_after=retry_after_seconds(retry))
        if resp.status_code != 200:
            raise PermanentError(f"feed of {clinician} answered {resp.status_code}")
        return resp.content, resp.headers.get("ETag")

    def _window(self) -> tuple[Any, Any]:
        now = utcnow()
        return now - timedelta(days=self.options.past_days), now + timedelta(days=self.options.horizon_days)

    async def pull(self, cursor: str | None) -> PullResult:
        """Each feed is a full snapshot. When any feed changed, every feed is read, so the listing
        is complete for the window it covers (sessions outside it are out of view, not gone)."""
        etags: dict[str, str | None] = json.loads(cursor) if cursor else {}
        bodies: dict[str, bytes | None] = {}
        for clinician in self.feeds:
            bodies[clinician], etags[clinician] = await self._fetch(clinician, etags.get(clinician))
        if cursor is not None and all(b is None for b in bodies.values()):
            return PullResult([], cursor)  # conditional GETs answered 304: nothing changed
        start, end = self._window()
        observations: list[Observation] = []
        for clinician, body in bodies.items():
            if body is None:
                body, etags[clinician] = await self._fetch(clinician, None)
            assert body is not None
            try:
                observations += feed_observations(body, clinician, self.practice.clinician_zone(clinician), start, end)
            except MalformedRecord as err:
                raise PermanentError(f"feed of {clinician}: {err}") from err
        return PullResult(observations, json.dumps(etags), complete=True, window=(iso(start), iso(end)))

    async def read(self, external_id: str) -> Observation:
        result = await self.pull(None)
        return next((o for o in result.observations if o.external_id == external_id), Observation(external_id=external_id, deleted=True))

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        raise PermanentError("the EHR feed is read-only; a worklist item says what to change in the EHR")

    def instruction(self, appointment: Snapshot, desired: Snapshot) -> str:
        """What the front desk does in the EHR, in its words: who, which session, what to set."""
        clinician = self.practice.clinicians.get(appointment["clinician"])
        who = clinician.display_name if clinician and clinician.display_name else appointment["clinician"]
        local = parse_iso(appointment["start"]).astimezone(ZoneInfo(appointment["timezone"]))
        when = f"the {local:%-I:%M %p} session of {who} on {local:%a %-d %b %Y}"
        if appointment["status"] in CANCELLED_STATES:
            rec = appointment.get("cancellation") or {}
            label = _KIND_WORDS.get(rec.get("kind", ""), "Cancelled")
            fee = {"charge": " and post the late-cancel fee as self-pay", "waived": " with the fee waived"}.get(rec.get("fee", ""), "")
            return f"In the EHR, mark {when} as {label}{fee} before claims are submitted."
        return f"In the EHR, book {when} ({local:%-I:%M %p}-{parse_iso(appointment['end']).astimezone(ZoneInfo(appointment['timezone'])):%-I:%M %p})."

    async def check(self) -> str:
        result = await self.pull(None)
        return f"{len(self.feeds)} feed(s) read, {len(result.observations)} sessions in the window"

    async def close(self) -> None:
        await self._http.aclose()
