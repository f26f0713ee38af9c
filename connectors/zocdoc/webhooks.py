"""Receiving Zocdoc's ``appointment_updated`` webhooks: authenticate, persist, answer at once.

Facts from Zocdoc's webhook guide (https://api-docs.zocdoc.com/guides/webhooks; summarised in
the project's ``specs/zocdoc/webhooks.md``): the signature is HMAC-SHA256 over the UTF-8 bytes of
``<webhook-timestamp>.<raw body>`` with a key issued base64-encoded; ``webhook-signature`` lists
version-prefixed signatures (``v1:<b64>;v2:<b64>``), any of which may match; the default
timestamp tolerance is five minutes and the receiver must verify. A webhook is only a hint: the
appointment it names is re-read with ``GET /v1/appointments/{appointment_id}``.

Zocdoc's events carry no id, and each delivery attempt is signed afresh (a new timestamp), so a
request repeating an accepted one's timestamp and body exactly is a replay: it is acknowledged
(200, so a sender that lost our first answer stops) and has no effect (:class:`SeenDeliveries`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from syncbridge.connector import Host, WebhookRoute
from syncbridge.errors import AuthError
from syncbridge.limits import MAX_WEBHOOK_BYTES, loads

__all__ = [
    "SIGNATURE_HEADER",
    "SeenDeliveries",
    "TIMESTAMP_HEADER",
    "WEBHOOK_PATH",
    "WebhookRefused",
    "appointment_ids",
    "decode_key",
    "parse_event",
    "sign",
    "signature_header",
    "verify",
    "webhook_route",
]

log = structlog.get_logger("syncbridge.zocdoc")

SIGNATURE_HEADER = "webhook-signature"
TIMESTAMP_HEADER = "webhook-timestamp"
#: mounted under ``<http.public_url>/webhooks/<connector name>``
WEBHOOK_PATH = "/appointments"
#: headers kept with a persisted notification (nothing else the sender's proxies add)
KEPT_HEADERS = (SIGNATURE_HEADER, TIMESTAMP_HEADER, "content-type")


class WebhookRefused(Exception):
    """A request that is not an authentic, well-formed Zocdoc webhook; ``status`` is the answer."""

    def __init__(self, status: int, problem: str) -> None:
        self.status = status
        self.problem = problem
        super().__init__(problem)


class SeenDeliveries:
    """Deliveries accepted within the timestamp tolerance, by a digest of what their signature covers.

    A delivery older than the tolerance is refused by its timestamp anyway, so entries are kept
    only that long, and at most ``cap`` of them (over ``cap`` deliveries within the tolerance the
    oldest are forgotten first: a replay of one of those costs one re-read of an appointment, the
    same as a restart forgetting them all).
    """

    def __init__(self, tolerance: float, cap: int = 10_000) -> None:
        self.tolerance = tolerance
        self.cap = cap
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, timestamp: str, body: bytes, now: float | None = None) -> bool:
        """Record the delivery; False when the same one was accepted before (a replay)."""
        now = time.time() if now is None else now
        while self._seen and next(iter(self._seen.values())) < now - 2 * self.tolerance:
            self._seen.popitem(last=False)
        key = hashlib.sha256(timestamp.encode() + b"." + body).digest()
        if key in self._seen:
            return False
        self._seen[key] = now
        while len(self._seen) > self.cap:
            self._seen.popitem(last=False)
        return True


def decode_key(secret: str) -> bytes:
    """The signing key Zocdoc issues base64-encoded."""
    try:
        return base64.b64decode(secret.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise AuthError("the Zocdoc webhook secret is not base64", action="paste the key exactly as Zocdoc issued it") from err


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """The base64 HMAC-SHA256 of ``<timestamp>.<body>``."""
    return base64.b64encode(hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).digest()).decode()


def signature_header(keys: Mapping[str, bytes], timestamp: str, body: bytes) -> str:
    """``v1:<b64>;v2:<b64>`` for one key per signature version (what the sender puts on the wire)."""
    return ";".join(f"{version}:{sign(key, timestamp, body)}" for version, key in keys.items())


def verify(headers: Mapping[str, str], body: bytes, key: bytes, *, tolerance: float, now: float | None = None) -> None:
    """Refuse unless a listed signature matches and the timestamp is within ``tolerance`` seconds."""
    stamp = headers.get(TIMESTAMP_HEADER)
    given = headers.get(SIGNATURE_HEADER)
    if not stamp or not given:
        raise WebhookRefused(401, f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    if not stamp.isdigit():
        raise WebhookRefused(400, f"{TIMESTAMP_HEADER} must be unix seconds")
    skew = abs((time.time() if now is None else now) - int(stamp))
    if skew > tolerance:
        raise WebhookRefused(401, f"{TIMESTAMP_HEADER} is {int(skew)} s away from now (tolerance {int(tolerance)} s): stale or replayed")
    expected = sign(key, stamp, body).encode()
    candidates = [part.partition(":")[2].strip() for part in given.split(";") if ":" in part]
    if not candidates:
        raise WebhookRefused(401, f"{SIGNATURE_HEADER} lists no version-prefixed signature")
    matched = False
    for candidate in candidates:  # compare every one, in constant time each
        matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise WebhookRefused(401, "signature does not match: the body or timestamp was altered, or the secret is wrong")


def parse_event(body: bytes) -> dict[str, Any]:
    """The event, checked for the fields the connector relies on."""
    try:
        event = loads(body)
    except ValueError as err:
        raise WebhookRefused(400, "body is not JSON") from err
    if not isinstance(event, dict):
        raise WebhookRefused(400, "body is not a JSON object")
    data = event.get("data")
    appointment = data.get("appointment_data") if isinstance(data, dict) else None
    if not isinstance(appointment, dict):
        raise WebhookRefused(400, "data.appointment_data is missing")
    appointment_id = appointment.get("appointment_id")
    if not isinstance(appointment_id, str) or not appointment_id or len(appointment_id) > 200:
        raise WebhookRefused(400, "data.appointment_data.appointment_id is missing or not a string")
    return event


def appointment_ids(body: bytes) -> list[str] | None:
    """The appointment a persisted event names, or None (then an incremental pull covers it)."""
    try:
        return [parse_event(body)["data"]["appointment_data"]["appointment_id"]]
    except WebhookRefused:
        return None


def webhook_route(
    host: Callable[[], Host], key: Callable[[], bytes], *, tolerance: float, connector: str, seen: SeenDeliveries | None = None,
) -> WebhookRoute:
    """The POST route: verify, persist through the host, answer 200 at once; a replay of an accepted
    delivery (``seen``) is answered 200 and changes nothing."""

    async def handler(request: Request) -> Response:
        body = await request.body()
        try:
            if len(body) > MAX_WEBHOOK_BYTES:
                raise WebhookRefused(413, f"body over {MAX_WEBHOOK_BYTES} bytes")
            try:
                secret = key()
            except AuthError as err:
                log.error("webhook_secret_unavailable", connector=connector, problem=str(err))
                return JSONResponse({"error": "webhook secret unavailable on this server"}, 503)
            verify(request.headers, body, secret, tolerance=tolerance)
            parse_event(body)
        except WebhookRefused as err:
            log.warning("webhook_refused", connector=connector, status=err.status, problem=err.problem)
            return JSONResponse({"error": err.problem}, err.status)
        if seen is not None and not seen.first_time(request.headers[TIMESTAMP_HEADER], body):
            log.info("webhook_replayed", connector=connector)
            return JSONResponse({"accepted": True, "duplicate": True}, 200)
        kept = {k: v for k, v in request.headers.items() if k.lower() in KEPT_HEADERS}
        host().accept_webhook(kept, body)
        return JSONResponse({"accepted": True}, 200)

    return WebhookRoute(WEBHOOK_PATH, ["POST"], handler)
