"""The Zocdoc wire layer: OAuth client credentials, the requests the connector makes, one error table.

Knows the REST surface of the Zocdoc OpenAPI bundle (``openapi.yml``, v1.176) and
https://api-docs.zocdoc.com/guides/authentication (a JSON ``client_credentials`` request with an
``audience``), nothing of the engine. Every failure leaves as a :mod:`syncbridge.errors`
exception, translated here and only here; messages name the request, never patient content.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any, NoReturn
from urllib.parse import quote

import httpx

from syncbridge.errors import AuthError, ConflictError, MalformedRecord, PermanentError, RateLimited, TransientError, retry_after_seconds, unreachable
from syncbridge.limits import json_object

__all__ = ["API_CAP", "ZocdocClient", "instant_param", "raise_for_status"]

#: "A maximum of 1,000 total appointments will be returned via pagination" (GET /v1/appointments)
API_CAP = 1000
#: ``page`` accepts 0..10 and ``page_size`` 1..100 (GET /v1/appointments)
MAX_PAGE = 10
CREDENTIALS_HINT = (
    "check client_id and client_secret (one pair per Zocdoc environment: sandbox credentials do not work in "
    "production) and that environment/token_url/audience match them; see connectors/zocdoc/README.md"
)


def instant_param(dt: datetime) -> str:
    """The ``format: instant`` query form of the spec's examples (``2024-01-01 00:00:00+00:00``), to the millisecond."""
    return dt.astimezone(UTC).isoformat(sep=" ", timespec="milliseconds")


def _detail(r: httpx.Response) -> str:
    """The messages of an ``ErrorResult`` body (they describe our request, not patients)."""
    try:
        body = r.json()
        return "; ".join(str(e.get("message", ""))[:120] for e in body.get("errors", []))[:300]
    except (ValueError, AttributeError):
        return ""


def raise_for_status(r: httpx.Response, what: str) -> NoReturn:
    """The one table from an unsuccessful answer to what the caller must do (DESIGN section 9)."""
    status = r.status_code
    retry_after = retry_after_seconds(r.headers.get("retry-after"))
    detail = _detail(r)
    suffix = f": {detail}" if detail else ""
    if status == 401:
        raise AuthError(f"{what}: Zocdoc refused the access token (401)", action=CREDENTIALS_HINT)
    if status == 403:
        raise AuthError(
            f"{what}: this credential may not do that (403){suffix}",
            action="ask Zocdoc to grant the scopes and provider access listed in connectors/zocdoc/README.md",
        )
    if status == 409:
        raise ConflictError(f"{what}: the appointment's state in Zocdoc does not allow this (409){suffix}")
    if status in (429, 503):
        raise RateLimited(f"{what}: Zocdoc asks to slow down ({status})", retry_after=retry_after)
    if status >= 500 or status in (408, 425):
        raise TransientError(f"{what}: Zocdoc server error ({status})", retry_after=retry_after)
    raise PermanentError(f"{what}: refused ({status}){suffix}")


class ZocdocClient:
    """Thin async client over one base URL; the access token is fetched and renewed here."""

    def __init__(
        self,
        base_url: str,
        *,
        token_url: str,
        audience: str,
        client_id: str,
        client_secret: Callable[[], str],
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_url = token_url
        self.audience = audience
        self.client_id = client_id
        self._secret = client_secret
        self._access: tuple[str, float] | None = None
        self._http = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def _token(self) -> str:
        if self._access and self._access[1] > time.time() + 60:
            return self._access[0]
        body = {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self._secret(), "audience": self.audience}
        try:
            r = await self._http.post(self.token_url, json=body)
        except httpx.HTTPError as err:
            raise unreachable("POST token", err) from err
        if r.status_code in (400, 401, 403):
            try:
                detail = str(r.json().get("error_description") or r.json().get("error"))[:200]
            except (ValueError, AttributeError):
                detail = ""
            raise AuthError(f"Zocdoc's token endpoint refused this client ({r.status_code}: {detail})", action=CREDENTIALS_HINT)
        if r.status_code >= 300:
            raise_for_status(r, "POST token")
        try:
            token = r.json()
            self._access = (str(token["access_token"]), time.time() + float(token.get("expires_in", 3600)))
        except (ValueError, KeyError, TypeError) as err:
            raise TransientError("POST token: the answer carries no access_token") from err
        return self._access[0]

    async def request(
        self, method: str, path: str, what: str, *, params: dict[str, str] | None = None, json_body: Any = None, renewed: bool = False
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {await self._token()}", "Accept": "application/json"}
        try:
            r = await self._http.request(method, f"{self.base_url}{path}", params=params, json=json_body, headers=headers)
        except httpx.HTTPError as err:
            raise unreachable(what, err) from err
        if r.status_code == 401 and not renewed:
            self._access = None  # revoked or expired early: fetch a new token, once
            return await self.request(method, path, what, params=params, json_body=json_body, renewed=True)
        return r

    @staticmethod
    def _json(r: httpx.Response, what: str) -> dict[str, Any]:
        return json_object(r.content, what, limit=16 << 20, not_json=TransientError)

    # --- appointments ---------------------------------------------------------------------

    async def appointments_page(self, params: dict[str, str], page: int, page_size: int) -> dict[str, Any]:
        """One ``AppointmentStatusListResponse`` page."""
        what = "GET /v1/appointments"
        r = await self.request("GET", "/v1/appointments", what, params=params | {"page": str(page), "page_size": str(page_size)})
        if r.status_code >= 300:
            raise_for_status(r, what)
        return self._json(r, what)

    async def appointment(self, appointment_id: str) -> dict[str, Any] | None:
        """``AppointmentStatusResponseData``, or None when Zocdoc does not know it (404)."""
        what = "GET /v1/appointments/{id}"
        r = await self.request("GET", f"/v1/appointments/{quote(appointment_id, safe='')}", what)
        if r.status_code == 404:
            return None
        if r.status_code >= 300:
            raise_for_status(r, what)
        data = self._json(r, what).get("data")
        if not isinstance(data, dict):
            raise MalformedRecord(f"{what}: the answer has no data object")
        return data

    async def _post(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        what = f"{method} {path}"
        r = await self.request(method, path, what, json_body=body)
        if r.status_code >= 300:
            raise_for_status(r, what)
        return self._json(r, what)

    async def cancel(self, appointment_id: str, reason_type: str) -> dict[str, Any]:
        """``POST /v1/appointments/cancel`` (CancelAppointmentRequestBody). The free-text reason stays home."""
        return await self._post("POST", "/v1/appointments/cancel", {"appointment_id": appointment_id, "cancellation_reason_type": reason_type})

    async def confirm(self, appointment_id: str) -> dict[str, Any]:
        """``POST /v1/appointments/confirm`` (ConfirmAppointmentRequestBody): a ``pending_booking`` becomes ``confirmed``."""
        return await self._post("POST", "/v1/appointments/confirm", {"appointment_id": appointment_id})

    async def update_status(self, appointment_id: str, status: str) -> dict[str, Any]:
        """``PUT /v1/appointments/update-status`` with ``arrived`` or ``no_show``."""
        return await self._post("PUT", "/v1/appointments/update-status", {"appointment_id": appointment_id, "appointment_status": status})

    async def reschedule(self, appointment_id: str, start_time: str) -> dict[str, Any]:
        """``POST /v1/appointments/reschedule``: only the time changes."""
        return await self._post("POST", "/v1/appointments/reschedule", {"appointment_id": appointment_id, "start_time": start_time})

    # --- calendar integration timeslots ------------------------------------------------------

    async def put_timeslots(self, provider_id: str, day: date, timeslots: list[dict[str, Any]]) -> dict[str, Any]:
        """Replace the provider's whole slot set for ``day`` (``TimeslotPutRequest``)."""
        what = "PUT /v1/providers/{id}/calendar/timeslots"
        path = f"/v1/providers/{quote(provider_id, safe='')}/calendar/timeslots"
        r = await self.request("PUT", path, what, params={"date": day.isoformat()}, json_body={"timeslots": timeslots})
        if r.status_code >= 300:
            raise_for_status(r, what)
        return self._json(r, what) if r.content else {}

    async def timeslots(self, provider_id: str, day: date, limit: int = 500) -> list[dict[str, Any]]:
        """Every ``CalendarIntegrationTimeslotWeb`` of ``day``, following ``next_page_token``."""
        what = "GET /v1/providers/{id}/calendar/timeslots"
        path = f"/v1/providers/{quote(provider_id, safe='')}/calendar/timeslots"
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params = {"date": day.isoformat(), "limit": str(limit)} | ({"next_page_token": token} if token else {})
            r = await self.request("GET", path, what, params=params)
            if r.status_code >= 300:
                raise_for_status(r, what)
            body = self._json(r, what)
            out.extend(s for s in body.get("data", []) if isinstance(s, dict))
            token = body.get("next_page_token")
            if not token:
                return out
