"""Graph change notifications for the connector: one subscription per mailbox, and the webhook routes.

- ``/notifications`` answers Graph's validation handshake (``?validationToken=``: the token back
  as ``text/plain``, learn.microsoft.com/graph/change-notifications-delivery-webhooks) and takes
  change notifications: every item must carry our ``clientState`` (a random secret kept in the
  vault), else the whole request is refused with 403 and nothing is stored. Accepted ones go to
  ``host.accept_webhook`` and are answered 202 at once; ``targets`` later names the events to re-read
  (none for the echo of our own write: its etag is the one we wrote, or it deletes what we deleted),
  and when an item cannot be placed, ``accounts`` names the mailboxes to pull: those whose
  subscription the items belong to.
- ``/lifecycle`` takes lifecycle notifications (learn.microsoft.com/graph/change-notifications-lifecycle-events):
  ``reauthorizationRequired`` -> renew, ``subscriptionRemoved`` -> create anew, ``missed`` -> pull.
  The handler records what to do and stores the notification like a change notification, so the
  daemon pulls the mailbox of that subscription alone (``accounts``); the work happens in the
  connector's own calls (``maintain`` and that pull), on its own event loop and HTTP client.
Polling stays the safety net: a notification is a hint, never the only path.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from syncbridge.connector import WebhookRoute
from syncbridge.errors import SyncbridgeError
from syncbridge.limits import loads

if TYPE_CHECKING:
    from .connector import Microsoft365Connector

__all__ = ["Push"]

log = structlog.get_logger("syncbridge.microsoft365")

STATE_KEY = "graph_client_state"
SUBS_KEY = "graph_subscriptions"
#: seconds before a pull retries a subscription that could not be made (the listener was not up yet)
RETRY_FAILED_AFTER = 30.0


def _when(text: Any) -> datetime:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00").split(".")[0]).replace(tzinfo=UTC)
    except ValueError:
        return datetime.now(UTC)


class Push:
    def __init__(self, connector: Microsoft365Connector) -> None:
        self.c = connector
        self._renew: set[str] = set()  # subscription ids
        self._recreate: set[str] = set()  # clinicians
        self._failed_at: float | None = None  # a subscription could not be made: a later pull tries again
        #: what this connector keeps in the vault, as last read or written: every notification
        #: needs the client state and the subscriptions, and only this object changes them
        self._kept: dict[str, Any] = {}

    # --- stored state -----------------------------------------------------------------------

    def _get(self, key: str) -> str | None:
        if self._kept.get("") is not self.c.host:  # a new host (the daemon attaches its own): read afresh
            self._kept = {"": self.c.host}
        if key not in self._kept:
            self._kept[key] = self.c.host.vault_get(key)
        value = self._kept[key]
        return value if isinstance(value, str) else None

    def _put(self, key: str, value: str) -> None:
        self.c.host.vault_put(key, value)
        self._get(key)
        self._kept[key] = value

    def client_state(self) -> str:
        state = self._get(STATE_KEY)
        if not state:
            state = secrets.token_urlsafe(48)
            self._put(STATE_KEY, state)
        return state

    def subscriptions(self) -> dict[str, dict[str, str]]:
        """clinician -> {"id", "expires"} as stored."""
        try:
            stored = json.loads(self._get(SUBS_KEY) or "{}")
        except ValueError:
            return {}
        return stored if isinstance(stored, dict) else {}

    def _save(self, subs: dict[str, dict[str, str]]) -> None:
        self._put(SUBS_KEY, json.dumps(subs, sort_keys=True))

    def clinician_of(self, subscription_id: str) -> str | None:
        return next((k for k, s in self.subscriptions().items() if s.get("id") == subscription_id), None)

    # --- HTTP ---------------------------------------------------------------------------------

    def routes(self) -> list[WebhookRoute]:
        return [WebhookRoute("/notifications", ["POST"], self.notifications), WebhookRoute("/lifecycle", ["POST"], self.lifecycle)]

    def _authentic(self, body: bytes) -> list[dict[str, Any]] | None:
        """The notification items when every one carries our clientState; None otherwise."""
        expected = self._get(STATE_KEY)
        try:
            payload = loads(body)
        except ValueError:
            return None
        items = payload.get("value") if isinstance(payload, dict) else None
        if not expected or not isinstance(items, list) or not items:
            return None
        for item in items:
            given = item.get("clientState") if isinstance(item, dict) else None
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
                return None
        return items

    async def notifications(self, request: Request) -> Response:
        token = request.query_params.get("validationToken")
        if token is not None:
            return PlainTextResponse(token)
        body = await request.body()
        if self._authentic(body) is None:
            log.warning("webhook_refused", connector=self.c.name, check="clientState", size=len(body))
            return PlainTextResponse("refused: clientState does not match", 403)
        self.c.host.accept_webhook(dict(request.headers), body)
        return Response(status_code=202)

    async def lifecycle(self, request: Request) -> Response:
        token = request.query_params.get("validationToken")
        if token is not None:
            return PlainTextResponse(token)
        items = self._authentic(await request.body())
        if items is None:
            log.warning("webhook_refused", connector=self.c.name, check="clientState", route="lifecycle")
            return PlainTextResponse("refused: clientState does not match", 403)
        for item in items:
            event, sid = str(item.get("lifecycleEvent")), str(item.get("subscriptionId"))
            clinician = self.clinician_of(sid)
            log.info("graph_lifecycle", connector=self.c.name, lifecycle_event=event, known=clinician is not None)
            if event == "reauthorizationRequired":
                self._renew.add(sid)
            elif event == "subscriptionRemoved" and clinician is not None:
                self._recreate.add(clinician)
        # stored like a change notification: the pull it asks for reads that subscription's mailbox
        # (changes "missed" are read through delta; a renewal or a new subscription is made first)
        self.c.host.accept_webhook(dict(request.headers), await request.body())
        return Response(status_code=202)

    def targets(self, headers: Mapping[str, str], body: bytes) -> list[str] | None:
        """``clinician/event-id`` of every change named, minus echoes of our own writes; None (pull)
        when one cannot be placed."""
        try:
            items = loads(body).get("value", [])
        except (ValueError, AttributeError):
            return None
        subs = {s.get("id"): k for k, s in self.subscriptions().items()}
        out: list[str] = []
        for item in items if isinstance(items, list) else []:
            data = item.get("resourceData") if isinstance(item, dict) else None
            clinician = subs.get(item.get("subscriptionId")) if isinstance(item, dict) else None
            if not isinstance(data, dict) or not isinstance(data.get("id"), str) or clinician is None:
                return None
            ext = f"{clinician}/{data['id']}"
            if self.c.known(ext, data.get("@odata.etag"), deleted=item.get("changeType") == "deleted"):
                continue  # the echo of our own write (or delete): nothing to re-read
            out.append(ext)
        return out

    def accounts(self, headers: Mapping[str, str], body: bytes) -> frozenset[str] | None:
        """The clinicians whose mailboxes a notification (change or lifecycle) that ``targets`` could
        not place is about: those of its items' subscriptions, minus items that are echoes of our
        own writes. None (pull every mailbox) when an item's subscription is not ours on record."""
        try:
            items = loads(body).get("value", [])
        except (ValueError, AttributeError):
            return None
        if not isinstance(items, list):
            return None
        subs = {s.get("id"): k for k, s in self.subscriptions().items()}
        out: set[str] = set()
        for item in items:
            clinician = subs.get(item.get("subscriptionId")) if isinstance(item, dict) else None
            if clinician is None:
                return None
            data = item.get("resourceData")
            if "lifecycleEvent" not in item and isinstance(data, dict) and isinstance(data.get("id"), str):
                if self.c.known(f"{clinician}/{data['id']}", data.get("@odata.etag"), deleted=item.get("changeType") == "deleted"):
                    continue
            out.add(clinician)
        return frozenset(out)

    # --- keeping subscriptions alive ------------------------------------------------------------

    @property
    def pending(self) -> bool:
        retry = self._failed_at is not None and time.monotonic() - self._failed_at > RETRY_FAILED_AFTER
        return bool(self._renew or self._recreate or retry)

    async def maintain(self) -> None:
        """Create missing subscriptions, renew those near expiry or asked to reauthorize; never raises."""
        base = self.c.host.public_url
        if base is None:
            return
        try:
            await self._maintain(base)
        except SyncbridgeError as err:  # the vault itself (store.secret_key unset): polling carries on
            self._failed_at = time.monotonic()
            log.warning("graph_subscriptions_unavailable", connector=self.c.name, kind=err.kind, error=str(err))

    async def _maintain(self, base: str) -> None:
        o = self.c.options
        self._failed_at = None
        subs = self.subscriptions()
        now = datetime.now(UTC)
        lifetime = timedelta(minutes=o.subscription_minutes)
        for clinician, mailbox in self.c.mailboxes.items():
            held = subs.get(clinician)
            try:
                if held is not None and clinician in self._recreate:
                    held = None
                if held is not None and (held.get("id") in self._renew or _when(held.get("expires")) - now < timedelta(minutes=o.renew_before_minutes)):
                    renewed = await self.c.client.renew_subscription(clinician, held["id"], now + lifetime)
                    held = {"id": held["id"], "expires": str(renewed["expirationDateTime"])} if renewed else None
                    log.info("graph_subscription_renewed" if renewed else "graph_subscription_gone", connector=self.c.name, clinician=clinician)
                if held is None:
                    made = await self.c.client.create_subscription(clinician, {
                        "changeType": "created,updated,deleted",
                        "notificationUrl": base.rstrip("/") + "/notifications",
                        "lifecycleNotificationUrl": base.rstrip("/") + "/lifecycle",
                        "resource": f"users/{mailbox}/events",
                        "expirationDateTime": (now + lifetime).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "clientState": self.client_state(),
                    })
                    held = {"id": str(made["id"]), "expires": str(made["expirationDateTime"])}
                    log.info("graph_subscription_created", connector=self.c.name, clinician=clinician)
                subs[clinician] = held
                self._recreate.discard(clinician)
                self._renew.discard(held["id"])
            except SyncbridgeError as err:
                log.warning("graph_subscription_failed", connector=self.c.name, clinician=clinician, kind=err.kind, error=str(err))
                if held is None:
                    subs.pop(clinician, None)
                    self._failed_at = time.monotonic()
            self._save(subs)

    async def close(self) -> None:
        """Delete our subscriptions (a stopped daemon must not be sent notifications)."""
        subs = self.subscriptions()
        for clinician, held in list(subs.items()):
            try:
                await self.c.client.delete_subscription(clinician, held["id"])
                del subs[clinician]
            except SyncbridgeError as err:
                log.warning("graph_subscription_not_deleted", connector=self.c.name, clinician=clinician, kind=err.kind)
        self._save(subs)
