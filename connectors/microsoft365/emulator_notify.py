"""Graph change notifications over webhooks, for the emulator: subscriptions, validation, delivery.

Follows:
- learn.microsoft.com/graph/api/subscription-post-subscriptions: ``POST /subscriptions`` answers
  ``201 Created`` with the subscription; ``clientState`` (at most 255 characters) is echoed in
  every notification; Outlook event subscriptions live at most 10080 minutes.
- learn.microsoft.com/graph/change-notifications-delivery-webhooks: before creating, Graph POSTs
  ``<notificationUrl>?validationToken=<token>`` (``Content-Type: text/plain``) and expects
  ``200 OK`` with the token as ``text/plain`` within 10 seconds, for the ``lifecycleNotificationUrl``
  too; otherwise the subscription is refused with 400. Renewal is ``PATCH /subscriptions/{id}``
  with ``expirationDateTime`` (200), removal ``DELETE`` (204). Notifications are POSTed as
  ``{"value": [changeNotification...]}`` with a 3-second timeout; anything but 2xx is retried
  (Graph retries for up to four hours; the emulator three times, quickly).
- learn.microsoft.com/graph/change-notifications-lifecycle-events: lifecycle notifications
  (``reauthorizationRequired``, ``subscriptionRemoved``, ``missed``) go to the lifecycle URL;
  ``POST /subscriptions/{id}/reauthorize`` answers 204.
Subscriptions past their ``expirationDateTime`` are gone (404 on renewal, no notifications).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from .emulator import GraphEmulator

__all__ = ["MAX_EVENT_SUBSCRIPTION_MINUTES", "Notifier", "Subscription", "parse_when"]

MAX_EVENT_SUBSCRIPTION_MINUTES = 10080
CHANGE_TYPES = {"created", "updated", "deleted"}


@dataclass
class Subscription:
    id: str
    resource: str
    user: str  # upn
    change_types: frozenset[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expires: datetime
    app_only: bool

    def json(self, tenant: str) -> dict[str, Any]:
        return {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
            "id": self.id,
            "resource": self.resource,
            "applicationId": str(uuid.UUID(int=0)),
            "changeType": ",".join(sorted(self.change_types)),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": _stamp(self.expires),
            "creatorId": tenant,
            "latestSupportedTlsVersion": "v1_2",
            "notificationContentType": None,
            "includeResourceData": False,
        }


def _stamp(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_when(text: Any, zone: str = "UTC") -> datetime | None:
    """A Graph date-time (``2026-03-08T15:00:00.0000000``, ``...Z`` or with an offset) as an aware datetime;
    values without an offset are read in ``zone``. None when unreadable."""
    from zoneinfo import ZoneInfo

    s = str(text or "").strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d)?)(\.\d+)?(.*)$", s)
    if m is None:
        return None
    try:
        dt = datetime.fromisoformat(m.group(1) + (m.group(2) or "")[:7] + m.group(3))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=ZoneInfo(zone))


@dataclass
class Notifier:
    emulator: GraphEmulator
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    #: (kind, url, status or 0 for no answer) of every delivery attempt, for tests and the bench
    deliveries: list[tuple[str, str, int]] = field(default_factory=list)
    #: accept http:// notification URLs (real Graph requires HTTPS; loopback tests have none)
    allow_http: bool = False
    _queue: queue.Queue[tuple[str, str, dict[str, Any]] | None] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    # --- delivery ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver_forever, name="graph-notifications", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def idle(self, timeout: float = 10) -> bool:
        """Wait until every queued notification was delivered (or given up); for tests."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def _deliver_forever(self) -> None:
        with httpx.Client(timeout=3.0, trust_env=False) as http:
            while True:
                item = self._queue.get()
                if item is None:
                    self._queue.task_done()
                    return
                kind, url, payload = item
                self.emulator.sent("NOTIFY", url, json.dumps(payload).encode())
                for delay in (0.0, 0.2, 0.5, 1.0):
                    time.sleep(delay)
                    try:
                        status = http.post(url, content=json.dumps(payload), headers={"Content-Type": "application/json"}).status_code
                    except httpx.HTTPError:
                        status = 0
                    self.deliveries.append((kind, url, status))
                    if 200 <= status < 300 or 400 <= status < 500:
                        break  # a 4xx refusal is final; Graph retries only what looks transient
                self._queue.task_done()

    def _live(self) -> list[Subscription]:
        now = datetime.now(UTC)
        for sid in [s.id for s in self.subscriptions.values() if s.expires <= now]:
            del self.subscriptions[sid]
        return list(self.subscriptions.values())

    def changed(self, upn: str, event_id: str, change_type: str, etag: str | None) -> None:
        """Queue a change notification for every live subscription on ``upn``'s events."""
        user = self.emulator.users[upn]
        for sub in self._live():
            if sub.user != upn or change_type not in sub.change_types:
                continue
            resource = f"Users/{user.object_id}/Events/{event_id}"
            note: dict[str, Any] = {
                "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": _stamp(sub.expires),
                "changeType": change_type,
                "resource": resource,
                "resourceData": {"@odata.type": "#Microsoft.Graph.Event", "@odata.id": resource, "id": event_id}
                | ({"@odata.etag": etag} if etag else {}),
                "clientState": sub.client_state,
                "tenantId": self.emulator.tenant,
            }
            self._queue.put(("change", sub.notification_url, {"value": [note]}))

    def lifecycle(self, subscription_id: str, event: str) -> None:
        """Send a lifecycle notification; ``subscriptionRemoved`` removes the subscription first."""
        sub = self.subscriptions[subscription_id]
        if event == "subscriptionRemoved":
            del self.subscriptions[subscription_id]
        if sub.lifecycle_url:
            note = {
                "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": _stamp(sub.expires),
                "tenantId": self.emulator.tenant,
                "clientState": sub.client_state,
                "lifecycleEvent": event,
            }
            self._queue.put(("lifecycle", sub.lifecycle_url, {"value": [note]}))

    def forge(self, url: str, payload: dict[str, Any]) -> None:
        """POST an arbitrary body to ``url`` through the delivery queue (a rogue sender, for tests)."""
        self._queue.put(("forged", url, payload))

    # --- HTTP ---------------------------------------------------------------------------------

    async def _validate(self, url: str) -> str | None:
        """The notificationUrl handshake; None when it succeeded, else what went wrong."""
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        target = f"{url}{'&' if '?' in url else '?'}validationToken={quote(token)}"
        try:
            async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
                r = await http.post(target, content=b"", headers={"Content-Type": "text/plain; charset=utf-8"})
        except httpx.HTTPError as err:
            return f"Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request. ({type(err).__name__})"
        self.deliveries.append(("validation", url, r.status_code))
        if r.status_code != 200:
            return f"Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request. ({r.status_code})"
        if not r.headers.get("content-type", "").startswith("text/plain") or r.text != token:
            return "Subscription validation request failed. Response must exactly match validationToken query parameter."
        return None

    async def create(self, request: Request, body: dict[str, Any], app_only: bool, user: str | None) -> Response:
        error = self.emulator.error
        change_types = frozenset(str(body.get("changeType", "")).split(","))
        if not change_types or not change_types <= CHANGE_TYPES:
            return error(400, "ValidationError", "changeType must be a comma-separated list of created, updated, deleted.")
        resource = str(body.get("resource", ""))
        parts = resource.strip("/").split("/")
        if len(parts) != 3 or parts[0].lower() != "users" or parts[2].lower() != "events":
            return error(400, "ExtensionError", f"Resource '{resource}' is not supported by the emulator (users/{{id}}/events).")
        upn = self.emulator.find_user(parts[1])
        if upn is None:
            return error(404, "ResourceNotFound", f"The requested user '{parts[1]}' is invalid.")
        if not app_only and user != upn:
            return error(403, "ExtensionError", "Operation: Create; Exception: [Status Code: Forbidden; Reason: Access is denied.]")
        for key in ("notificationUrl", "lifecycleNotificationUrl"):
            url = body.get(key)
            if url is not None and not (str(url).startswith("https://") or (self.allow_http and str(url).startswith("http://"))):
                return error(400, "ValidationError", f"The {key} must be an HTTPS URL.")
        if not body.get("notificationUrl"):
            return error(400, "ValidationError", "notificationUrl is required.")
        client_state = body.get("clientState")
        if client_state is not None and len(str(client_state)) > 255:
            return error(400, "ValidationError", "clientState must be at most 255 characters.")
        expires = parse_when(body.get("expirationDateTime"))
        now = datetime.now(UTC)
        if expires is None or expires <= now:
            return error(400, "ValidationError", "expirationDateTime must be a date and time in the future.")
        if expires > now + timedelta(minutes=MAX_EVENT_SUBSCRIPTION_MINUTES):
            return error(400, "ValidationError", f"Subscription expiration can only be {MAX_EVENT_SUBSCRIPTION_MINUTES} minutes in the future.")
        for url in filter(None, (body.get("notificationUrl"), body.get("lifecycleNotificationUrl"))):
            problem = await self._validate(str(url))
            if problem is not None:
                return error(400, "ValidationError", problem)
        sub = Subscription(str(uuid.uuid4()), resource, upn, change_types, str(body["notificationUrl"]),
                           body.get("lifecycleNotificationUrl"), client_state, expires, app_only)
        self.subscriptions[sub.id] = sub
        return JSONResponse(sub.json(self.emulator.tenant), 201)

    async def instance(self, request: Request, body: dict[str, Any] | None) -> Response:
        error = self.emulator.error
        self._live()
        sid = request.path_params["sid"]
        sub = self.subscriptions.get(sid)
        if sub is None:
            return error(404, "ResourceNotFound", f"The object was not found. Subscription '{sid}' does not exist or has expired.")
        if request.method == "GET":
            return JSONResponse(sub.json(self.emulator.tenant))
        if request.method == "DELETE":
            del self.subscriptions[sid]
            return Response(status_code=204)
        if request.url.path.endswith("/reauthorize"):
            return Response(status_code=204)
        expires = parse_when((body or {}).get("expirationDateTime"))
        now = datetime.now(UTC)
        if expires is None or expires <= now or expires > now + timedelta(minutes=MAX_EVENT_SUBSCRIPTION_MINUTES):
            return error(400, "ValidationError", f"expirationDateTime must be in the future and at most {MAX_EVENT_SUBSCRIPTION_MINUTES} minutes away.")
        sub.expires = expires
        return JSONResponse(sub.json(self.emulator.tenant))
