"""A Zocdoc API subset on loopback, for tests and ``syncbridge demo``.

Follows the Zocdoc OpenAPI bundle v1.176 (https://api-docs.zocdoc.com/apis, kept beside the
project's specs as ``specs/zocdoc/openapi.yml``) for the operations the connector uses:

- ``POST /oauth/token``: client credentials as in https://api-docs.zocdoc.com/guides/authentication
  (JSON body with ``grant_type``, ``client_id``, ``client_secret``, ``audience``).
- ``GET /v1/appointments`` (getAppointments): ``page`` 0..10, ``page_size`` 1..100, the
  ``*_utc_min/max`` filters, ``provider_ids``/``location_ids``/``statuses``, ``sort_by`` and
  ``sort_direction`` (default: start time, descending), and "a maximum of 1,000 total appointments
  will be returned via pagination": pages beyond the first 1,000 results come back empty.
- ``GET /v1/appointments/{appointment_id}`` (getAppointment; 404 with an ``ErrorResult``).
- ``POST /v1/appointments/cancel`` (cancelAppointment): only from a non-cancelled status
  (pending_booking, booking_failed, confirmed, pending_reschedule, reschedule_failed,
  rescheduled), else 409; ``cancellation_reason_type`` must be a ``CancellationReasonType``.
- ``PUT /v1/appointments/update-status``: ``arrived`` or ``no_show``; a no-show needs a start in
  the past "but no older than 2 days" (400 otherwise). ``AppointmentStatus`` has no ``arrived``
  value, so an arrival is recorded without changing the status.
- ``POST /v1/appointments/reschedule``: from pending_booking, confirmed, pending_reschedule or
  rescheduled (else 409); the appointment becomes ``rescheduled``.
- ``POST /v1/appointments/confirm`` (confirmAppointment): "confirm an appointment in pending
  booking status", else 409. A provider added with ``confirmation="manual"``
  (``AppointmentConfirmationType``) gets its bookings as ``pending_booking``; "auto" ones (the
  default) as ``confirmed``.
- ``PUT``/``GET /v1/providers/{provider_id}/calendar/timeslots``: the whole slot set of one date
  is replaced; slots are local wall times plus an IANA zone whose date must equal ``date``; unknown
  locations come back in ``errors.not_found_location_ids``; 403 for a provider the credential
  cannot access. "The timeslots are stored in an eventually consistent data store": a GET shows a
  PUT only after ``consistency_delay`` seconds. A repeated wall time (autumn clock change) is read
  as its first occurrence, as java.time does. A booked slot is withdrawn by the directory; a
  cancellation does not offer it again (emulator_slots.py says why).
- ``POST /v1/webhook/mock-request``: signs and sends a mock ``appointment_updated`` event.

Webhooks follow https://api-docs.zocdoc.com/guides/webhooks (``specs/zocdoc/webhooks.md``):
``webhook-timestamp`` plus ``webhook-signature: v1:<b64>;v2:<b64>`` over ``<timestamp>.<body>``;
delivery is retried with exponential backoff for up to 48 hours, but only on a transport failure
or no answer within 5 seconds; an HTTP error answer is not retried. Changes made through the API
by the integration itself notify nobody by default (Zocdoc notifies partners of changes they did
not make); patient-side changes (:meth:`ZocdocEmulator.book` and friends) always do.

One deliberate extra: the published response schema lists only the free-text
``cancellation_reason``; the emulator also returns the ``cancellation_reason_type`` a cancel set
(``expose_reason_type``), which the connector uses when present. Set it to False to emulate the
bare schema.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from syncbridge.emulation import Injector, free_port, serve_in_thread

from .delivery import WebhookSender
from .emulator_slots import TimeslotStore, slot_problem

__all__ = ["REASON_TYPES", "Running", "ZocdocEmulator", "running"]

REASON_TYPES = frozenset({
    "patient_no_longer_needs_appointment", "patient_no_longer_available", "other_patient_reason",
    "missing_needed_patient_information", "payment_or_insurance_issue", "patient_or_visit_type_not_accepted",
    "provider_not_available", "rescheduling_patient", "other_provider_reason",
})
CANCELLABLE = frozenset({"pending_booking", "booking_failed", "confirmed", "pending_reschedule", "reschedule_failed", "rescheduled"})
RESCHEDULABLE = frozenset({"pending_booking", "confirmed", "pending_reschedule", "rescheduled"})
CAP = 1000
SORT_KEYS = {"start_time_utc": "start", "created_time_utc": "created", "last_modified_time_utc": "modified"}
FILTERS = {
    "start_time_utc_min": ("start", 1), "start_time_utc_max": ("start", -1),
    "created_time_utc_min": ("created", 1), "created_time_utc_max": ("created", -1),
    "last_modified_time_utc_min": ("modified", 1), "last_modified_time_utc_max": ("modified", -1),
}


def _z(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error(status: int, message: str, field_name: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An ``ErrorResult`` body."""
    err: dict[str, Any] = {"message": message} | ({"field": field_name} if field_name else {})
    body = {"request_id": uuid.uuid4().hex, "error_type": "invalid_request" if status < 500 else "api_error", "errors": [err]}
    return JSONResponse(body, status, headers=headers)


@dataclass
class Provider:
    provider_id: str
    location_ids: set[str]
    zone: str
    practice_id: str = "pt_practice"
    #: ``AppointmentConfirmationType``: "manual" providers' bookings arrive ``pending_booking``
    confirmation: str = "auto"


@dataclass
class ZocdocEmulator:
    """The in-memory API. ``app`` is the starlette application; knobs are plain methods."""

    client_id: str = "syncbridge-client"
    client_secret: str = "syncbridge-secret"
    base_url: str = ""
    token_ttl: int = 3600
    default_page_size: int = 10
    consistency_delay: float = 0.3
    expose_reason_type: bool = True
    notify_api_changes: bool = False
    #: share of timeslot PUTs that fail (chaos tests): half answer 500 before taking effect, half
    #: take effect and answer 504 (an answer lost on the way back)
    timeslot_put_failures: float = 0.0
    seed: int | None = None
    providers: dict[str, Provider] = field(default_factory=dict)
    appointments: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    sender: WebhookSender = field(default_factory=WebhookSender)
    _failures: list[tuple[int, float | None]] = field(default_factory=list)
    _tokens: dict[str, float] = field(default_factory=dict)
    slots: TimeslotStore = field(default_factory=TimeslotStore)
    _last_stamp: datetime = field(default_factory=lambda: datetime(2000, 1, 1, tzinfo=UTC))
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _rng: random.Random = field(default_factory=random.Random)
    #: timeslot PUTs failed by ``timeslot_put_failures``: "500" (not applied) and "lost" (applied)
    put_failures: dict[str, int] = field(default_factory=lambda: {"500": 0, "lost": 0})

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    @property
    def audience(self) -> str:
        return self.base_url.rstrip("/") + "/"

    # --- knobs: the practice's Zocdoc account and its patients -------------------------------

    def add_provider(self, provider_id: str, location_id: str, zone: str = "America/New_York", *, confirmation: str = "auto") -> None:
        self.providers[provider_id] = Provider(provider_id, {location_id}, zone, confirmation=confirmation)

    def add_location(self, provider_id: str, location_id: str) -> None:
        """Another location of the provider (a virtual one for video visits, another office)."""
        self.providers[provider_id].location_ids.add(location_id)

    def published_slots(self, provider_id: str, day: date) -> list[dict[str, Any]]:
        """The timeslots a GET would show now, as stored (location, visit reasons, patient type)."""
        return sorted(self.slots.visible(provider_id, day), key=lambda s: (s["start_time"], s["location_id"], str(s.get("patient_type"))))

    def practice_confirm(self, appt_id: str) -> None:
        """Someone at the practice confirms a pending booking in Zocdoc's provider tools."""
        with self._lock:
            self._set(appt_id, status="confirmed")
        self._notify(appt_id, "updated", [{"attribute_path": "appointment.status"}])

    def fail_next(self, status: int, n: int = 1, retry_after: float | None = None) -> None:
        """The next ``n`` API requests answer ``status`` (429 throttling, 5xx), with Retry-After."""
        self._failures.extend([(status, retry_after)] * n)

    def revoke_tokens(self) -> None:
        self._tokens.clear()

    def _stamp(self) -> datetime:
        """A modification time that never repeats (the API orders and filters by it)."""
        now = max(datetime.now(UTC), self._last_stamp + timedelta(milliseconds=1))
        self._last_stamp = now
        return now

    def book(
        self, provider_id: str, location_id: str, start: datetime, *, visit_reason_id: str = "pc_therapy-50",
        visit_type: str = "in_person", status: str | None = None, developer_patient_id: str | None = None,
    ) -> str:
        """A patient books in the Zocdoc marketplace; returns the appointment id. The slot at that
        time is withdrawn from the provider's published timeslots (emulator_slots.py)."""
        with self._lock:
            provider = self.providers[provider_id]
            self.slots.withdraw(provider_id, start)
            status = status or ("pending_booking" if provider.confirmation == "manual" else "confirmed")
            stamp = self._stamp()
            appt_id = str(uuid.uuid4())
            self.appointments[appt_id] = {
                "id": appt_id, "provider_id": provider_id, "location_id": location_id, "zone": provider.zone,
                "start": start.astimezone(UTC), "status": status, "visit_reason_id": visit_reason_id, "visit_type": visit_type,
                "created": stamp, "modified": stamp, "developer_patient_id": developer_patient_id,
                "cancellation_reason_type": None, "cancellation_reason": None, "arrived": False,
            }
        self._notify(appt_id, "created", [])
        return appt_id

    def patient_cancel(self, appt_id: str, reason_type: str = "patient_no_longer_available", reason: str | None = None) -> None:
        with self._lock:
            self._set(appt_id, status="cancelled", cancellation_reason_type=reason_type, cancellation_reason=reason)
        self._notify(appt_id, "cancelled", [{"attribute_path": "appointment.status"}])

    def patient_reschedule(self, appt_id: str, start: datetime) -> None:
        """The patient moves to ``start``: that slot is withdrawn; the old one is not offered again."""
        with self._lock:
            self.slots.withdraw(self.appointments[appt_id]["provider_id"], start)
            self._set(appt_id, start=start.astimezone(UTC), status="rescheduled")
        self._notify(appt_id, "updated", [{"attribute_path": "appointment.start_time"}])

    def _set(self, appt_id: str, **changes: Any) -> None:
        self.appointments[appt_id].update(changes, modified=self._stamp())

    def record(self, appt_id: str) -> dict[str, Any]:
        """An appointment as ``GET /v1/appointments/{id}`` shows it."""
        with self._lock:
            return self._render(self.appointments[appt_id])

    def published(self, provider_id: str, day: date) -> list[datetime]:
        """The instants of the slots a GET would show now, sorted."""
        return self.slots.instants(self.slots.visible(provider_id, day))

    def wait_consistent(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.slots.settled() and time.monotonic() < deadline:
            time.sleep(0.02)

    # --- webhooks ----------------------------------------------------------------------------

    def _notify(self, appt_id: str, update_type: str, changed: list[dict[str, str]]) -> None:
        if self.sender.url is None:
            return
        with self._lock:
            stamp = _z(self.appointments[appt_id]["modified"])
        self.sender.send(self.sender.url, self.sender.keys, _event(appt_id, stamp, update_type, changed))

    # --- HTTP --------------------------------------------------------------------------------

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/oauth/token", self._token, methods=["POST"]),
            Route("/v1/appointments", self._list, methods=["GET"]),
            Route("/v1/appointments/cancel", self._cancel, methods=["POST"]),
            Route("/v1/appointments/confirm", self._confirm, methods=["POST"]),
            Route("/v1/appointments/reschedule", self._reschedule, methods=["POST"]),
            Route("/v1/appointments/update-status", self._update_status, methods=["PUT"]),
            Route("/v1/appointments/{appointment_id}", self._get, methods=["GET"]),
            Route("/v1/providers/{provider_id}/calendar/timeslots", self._timeslots, methods=["GET", "PUT"]),
            Route("/v1/webhook/mock-request", self._mock_webhook, methods=["POST"]),
        ])

    def _gate(self, request: Request) -> Response | None:
        self.log.append((request.method, request.url.path))
        if self._failures:
            status, retry_after = self._failures.pop(0)
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
            return error(status, "Too many requests" if status == 429 else "try again later", headers=headers)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or self._tokens.get(token, 0) < time.time():
            return Response("Unauthorized", 401, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _json_body(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "The request body is not valid JSON")
        return body if isinstance(body, dict) else error(400, "The request body must be an object")

    async def _token(self, request: Request) -> Response:
        self.log.append((request.method, request.url.path))
        raw = await request.body()
        try:
            form = json.loads(raw) if request.headers.get("content-type", "").startswith("application/json") else {
                k: v[0] for k, v in parse_qs(raw.decode()).items()}
        except ValueError:
            return JSONResponse({"error": "invalid_request", "error_description": "unreadable body"}, 400)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type", "error_description": "only client_credentials"}, 400)
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return JSONResponse({"error": "access_denied", "error_description": "Unauthorized"}, 401)
        if form.get("audience") != self.audience:
            return JSONResponse({"error": "access_denied", "error_description": f"unknown audience {form.get('audience')!r}"}, 403)
        token = uuid.uuid4().hex
        self._tokens[token] = time.time() + self.token_ttl
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": self.token_ttl,
                             "scope": "external.appointment.read external.appointment.write"})

    def _render(self, a: dict[str, Any]) -> dict[str, Any]:
        """``AppointmentStatusResponseData``."""
        out: dict[str, Any] = {
            "appointment_id": a["id"], "appointment_status": a["status"], "developer_patient_id": a["developer_patient_id"],
            "is_provider_resource": False, "confirmation_type": self.providers[a["provider_id"]].confirmation,
            "start_time": a["start"].astimezone(ZoneInfo(a["zone"])).isoformat(timespec="seconds"),
            "created_time_utc": _z(a["created"]), "last_modified_time_utc": _z(a["modified"]),
            "provider_location_id": f"{a['provider_id']}|{a['location_id']}", "practice_id": self.providers[a["provider_id"]].practice_id,
            "visit_reason_id": a["visit_reason_id"], "visit_type": a["visit_type"], "patient_type": "new", "source": "Zocdoc Marketplace",
        }
        if a["cancellation_reason"]:
            out["cancellation_reason"] = a["cancellation_reason"]
        if self.expose_reason_type and a["cancellation_reason_type"]:
            out["cancellation_reason_type"] = a["cancellation_reason_type"]
        return out

    async def _list(self, request: Request) -> Response:
        if (denied := self._gate(request)) is not None:
            return denied
        q = request.query_params
        try:
            page = int(q.get("page", 0))
            size = int(q.get("page_size", self.default_page_size))
        except ValueError:
            return error(400, "page and page_size must be integers")
        if not 0 <= page <= 10:
            return error(400, "A mimimum value of 0 and a maximum of 10 will be accepted.", "page")
        if not 1 <= size <= 100:
            return error(400, "A mimimum value of 1 and a maximum of 100 will be accepted.", "page_size")
        with self._lock:
            found = list(self.appointments.values())
            for name, (key, sign) in FILTERS.items():
                if name in q:
                    try:
                        bound = datetime.fromisoformat(q[name].replace("Z", "+00:00"))
                    except ValueError:
                        return error(400, f"{name} is not an instant", name)
                    if bound.tzinfo is None:
                        return error(400, f"{name} needs a UTC offset", name)
                    found = [a for a in found if (a[key] >= bound if sign > 0 else a[key] <= bound)]
            for name, key in (("provider_ids", "provider_id"), ("location_ids", "location_id"), ("statuses", "status"),
                              ("developer_patient_id", "developer_patient_id")):
                if name in q:
                    wanted = set(q[name].split(","))
                    found = [a for a in found if a[key] in wanted]
            if "practice_ids" in q:
                found = [a for a in found if self.providers[a["provider_id"]].practice_id in q["practice_ids"].split(",")]
            sort = SORT_KEYS.get(q.get("sort_by", "start_time_utc"))
            direction = q.get("sort_direction", "descending")
            if sort is None or direction not in ("ascending", "descending"):
                return error(400, "unknown sort_by or sort_direction")
            found.sort(key=lambda a: (a[sort], a["id"]), reverse=direction == "descending")
            reachable = found[:CAP]
            chunk = reachable[page * size:(page + 1) * size]
            more = (page + 1) * size < len(reachable) and page < 10
            data = [self._render(a) for a in chunk]
        next_url = str(request.url.include_query_params(page=page + 1)) if more else None
        return JSONResponse({"request_id": uuid.uuid4().hex, "page": page, "page_size": size, "total_count": len(found),
                             "next_url": next_url, "data": data})

    async def _get(self, request: Request) -> Response:
        if (denied := self._gate(request)) is not None:
            return denied
        with self._lock:
            a = self.appointments.get(request.path_params["appointment_id"])
            if a is None:
                return error(404, "Appointment not found", "appointment_id")
            return JSONResponse({"request_id": uuid.uuid4().hex, "data": self._render(a)})

    async def _appointment_body(self, request: Request) -> tuple[dict[str, Any], dict[str, Any]] | Response:
        if (denied := self._gate(request)) is not None:
            return denied
        body = await self._json_body(request)
        if isinstance(body, Response):
            return body
        appt_id = body.get("appointment_id")
        if not isinstance(appt_id, str):
            return error(400, "appointment_id is required", "appointment_id")
        a = self.appointments.get(appt_id)
        if a is None:
            return error(404, "Appointment not found", "appointment_id")
        return body, a

    def _done(self, a: dict[str, Any], update_type: str, changed: list[dict[str, str]]) -> Response:
        data = {"appointment_id": a["id"], "appointment_status": a["status"], "developer_patient_id": a["developer_patient_id"]}
        if self.notify_api_changes:
            self._notify(a["id"], update_type, changed)
        return JSONResponse({"request_id": uuid.uuid4().hex, "data": data})

    async def _cancel(self, request: Request) -> Response:
        got = await self._appointment_body(request)
        if isinstance(got, Response):
            return got
        body, a = got
        reason_type = body.get("cancellation_reason_type")
        if reason_type is not None and reason_type not in REASON_TYPES:
            return error(400, f"{reason_type!r} is not a CancellationReasonType", "cancellation_reason_type")
        with self._lock:
            if a["status"] not in CANCELLABLE:
                return error(409, f"An appointment in status {a['status']} cannot be cancelled")
            self._set(a["id"], status="cancelled", cancellation_reason_type=reason_type, cancellation_reason=body.get("cancellation_reason"))
        return self._done(a, "cancelled", [{"attribute_path": "appointment.status"}])

    async def _confirm(self, request: Request) -> Response:
        got = await self._appointment_body(request)
        if isinstance(got, Response):
            return got
        _, a = got
        with self._lock:
            if a["status"] != "pending_booking":
                return error(409, f"An appointment in status {a['status']} cannot be confirmed")
            self._set(a["id"], status="confirmed")
        return self._done(a, "updated", [{"attribute_path": "appointment.status"}])

    async def _update_status(self, request: Request) -> Response:
        got = await self._appointment_body(request)
        if isinstance(got, Response):
            return got
        body, a = got
        wanted = body.get("appointment_status")
        if wanted not in ("arrived", "no_show"):
            return error(400, "appointment_status must be arrived or no_show", "appointment_status")
        with self._lock:
            if a["status"] in ("cancelled", "no_show", "booking_failed"):
                return error(409, f"An appointment in status {a['status']} cannot be updated")
            if wanted == "no_show":
                age = datetime.now(UTC) - a["start"]
                if not timedelta(0) <= age <= timedelta(days=2):
                    return error(400, "Appointment start time should be in the past but no older than 2 days", "appointment_status")
                self._set(a["id"], status="no_show")
            else:
                self._set(a["id"], arrived=True)
        return self._done(a, "updated", [{"attribute_path": "appointment.status"}])

    async def _reschedule(self, request: Request) -> Response:
        got = await self._appointment_body(request)
        if isinstance(got, Response):
            return got
        body, a = got
        try:
            start = datetime.fromisoformat(str(body.get("start_time")))
        except ValueError:
            return error(400, "start_time must be an ISO-8601 date-time with offset", "start_time")
        if start.tzinfo is None:
            return error(400, "start_time needs a timezone offset", "start_time")
        with self._lock:
            if a["status"] not in RESCHEDULABLE:
                return error(409, f"An appointment in status {a['status']} cannot be rescheduled")
            self._set(a["id"], start=start.astimezone(UTC), status="rescheduled")
            rendered = self._render(a)
        if self.notify_api_changes:
            self._notify(a["id"], "updated", [{"attribute_path": "appointment.start_time"}])
        return JSONResponse({"request_id": uuid.uuid4().hex, "data": {k: rendered[k] for k in (
            "appointment_id", "appointment_status", "developer_patient_id", "is_provider_resource", "confirmation_type", "visit_type")}})

    # --- calendar integration timeslots --------------------------------------------------------

    async def _timeslots(self, request: Request) -> Response:
        if (denied := self._gate(request)) is not None:
            return denied
        provider_id = request.path_params["provider_id"]
        if provider_id not in self.providers:
            return Response("Forbidden", 403)
        try:
            day = date.fromisoformat(request.query_params.get("date", ""))
        except ValueError:
            return error(400, "date is required in YYYY-MM-DD format", "date")
        if request.method == "GET":
            return self._get_slots(request, provider_id, day)
        body = await self._json_body(request)
        if isinstance(body, Response):
            return body
        fault = None
        if self.timeslot_put_failures and self._rng.random() < self.timeslot_put_failures:
            fault = self._rng.choice(("500", "lost"))
            self.put_failures[fault] += 1
            if fault == "500":
                return error(500, "try again later")
        slots = body.get("timeslots")
        if not isinstance(slots, list) or len(slots) > 1500:
            return error(400, "timeslots must be an array of at most 1500 items", "timeslots")
        provider = self.providers[provider_id]
        stored: list[dict[str, Any]] = []
        missing: list[str] = []
        for i, slot in enumerate(slots):
            problem = slot_problem(slot, provider_id, day)
            if problem:
                return error(400, problem, f"timeslots[{i}]")
            if slot["location_id"] not in provider.location_ids:
                missing.append(slot["location_id"])
                continue
            stored.append({k: slot.get(k) for k in ("provider_id", "location_id", "start_time", "time_zone", "allowed_visit_reason_ids",
                                                    "excluded_visit_reason_ids", "patient_type")}
                          | {"timeslot_id": f"slot:{next(self._ids)}", "created_utc": _z(datetime.now(UTC))})
        self.slots.replace(provider_id, day, stored, self.consistency_delay)
        if fault == "lost":
            return error(504, "upstream answer lost")
        return JSONResponse({"errors": {"not_found_location_ids": sorted(set(missing))}} if missing else {})

    def _get_slots(self, request: Request, provider_id: str, day: date) -> Response:
        try:
            limit = int(request.query_params.get("limit", 100))
            offset = int(request.query_params.get("next_page_token") or 0)
        except ValueError:
            return error(400, "limit and next_page_token must be integers")
        slots = self.slots.visible(provider_id, day)
        chunk = slots[offset:offset + limit]
        token = str(offset + limit) if offset + limit < len(slots) else None
        next_url = str(request.url.include_query_params(next_page_token=token)) if token else None
        return JSONResponse({"request_id": uuid.uuid4().hex, "limit": limit, "next_page_token": token, "next_url": next_url, "data": chunk})

    async def _mock_webhook(self, request: Request) -> Response:
        if (denied := self._gate(request)) is not None:
            return denied
        body = await self._json_body(request)
        if isinstance(body, Response):
            return body
        url, key = body.get("webhook_url"), body.get("webhook_key")
        if not isinstance(url, str) or not isinstance(key, str):
            return error(400, "webhook_url and webhook_key are required")
        try:
            raw_key = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            return error(400, "webhook_key must be base64", "webhook_key")
        update_type = body.get("appointment_update_type") or "updated"
        event = _event(str(uuid.uuid4()), _z(datetime.now(UTC)), update_type, [{"attribute_path": "appointment.start_time"}])
        self.sender.send(url, {"v1": raw_key}, event)
        return JSONResponse(event)


def _event(appt_id: str, updated: str, update_type: str, changed: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "event_type": "appointment_updated",
        "webhook_timestamp": _z(datetime.now(UTC)),
        "data": {"data_type": "appointment_data", "appointment_data": {
            "appointment_id": appt_id, "appointment_updated_timestamp": updated,
            "appointment_update_type": update_type, "changed_attributes": changed}},
    }


@dataclass
class Running:
    emulator: ZocdocEmulator
    base_url: str
    stop: Callable[[], None]
    injector: Injector

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/oauth/token"


def running(emulator: ZocdocEmulator | None = None) -> Running:
    """Serve ``emulator`` on a free loopback port in a background thread (the token audience needs its URL)."""
    emu = emulator or ZocdocEmulator()
    port = free_port()
    emu.base_url = f"http://127.0.0.1:{port}"
    server = serve_in_thread(emu.app, port=port)

    def stop() -> None:
        emu.sender.stop()
        server.stop()

    return Running(emu, emu.base_url, stop, server.injector)
