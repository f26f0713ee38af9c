"""The EHR tells the daemon when Appointments change: an R4 rest-hook Subscription.

Made (and renewed before its ``end``) by ``maintain()`` when the daemon has a public URL
(https://hl7.org/fhir/R4/subscription.html). The channel carries no payload, so a notification
holds no patient data; it carries a random token in a header, checked on every POST before
anything is stored, and then triggers an incremental pull. The subscription's id and token are
kept in the vault, so a restart keeps the same subscription; without a vault the subscription is
removed at shutdown. Polling keeps running underneath.
"""

from __future__ import annotations

import hmac
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from syncbridge.connector import WebhookRoute
from syncbridge.errors import ConfigError, PermanentError, SyncbridgeError, error_kind

if TYPE_CHECKING:
    from .connector import FHIRConnector

__all__ = ["NOTIFY_PATH", "TOKEN_HEADER", "AppointmentSubscription"]

NOTIFY_PATH = "/notify"
TOKEN_HEADER = "X-Syncbridge-Token"
VAULT_KEY = "subscription"
log = structlog.get_logger("syncbridge.fhir")


class AppointmentSubscription:
    def __init__(self, connector: FHIRConnector) -> None:
        self.connector = connector
        self._memory: dict[str, Any] | None = None
        self._persisted = True
        #: why the EHR cannot take a Subscription (it serves none): polling alone, not asked again
        self.unavailable: str | None = None

    # --- state: id, token, end --------------------------------------------------------------

    def _load(self) -> dict[str, Any] | None:
        if self._memory is not None:
            return self._memory
        try:
            raw = self.connector.host.vault_get(VAULT_KEY)
        except ConfigError:
            self._persisted = False
            return None
        self._memory = json.loads(raw) if raw else None
        return self._memory

    def _save(self, state: dict[str, Any] | None) -> None:
        self._memory = state
        try:
            if state is None:
                self.connector.host.vault_delete(VAULT_KEY)
            else:
                self.connector.host.vault_put(VAULT_KEY, json.dumps(state))
            self._persisted = True
        except ConfigError:
            self._persisted = False  # no store.secret_key: kept in memory, removed at shutdown

    # --- upkeep -------------------------------------------------------------------------------

    async def maintain(self) -> None:
        base = self.connector.host.public_url
        if base is None or not self.connector.options.subscription or self.unavailable:
            return
        endpoint = base.rstrip("/") + NOTIFY_PATH
        client = self.connector.client()
        now = datetime.now(UTC)
        state = self._load()
        if state is not None:
            current = await client.read("Subscription", state["id"])
            fresh = datetime.fromisoformat(state["end"]) - now > timedelta(days=1)
            usable = current is not None and current.get("status") == "active" and current.get("channel", {}).get("endpoint") == endpoint
            if usable and fresh:
                return
            if usable and current is not None:  # renew: move the end out
                end = now + timedelta(days=self.connector.options.subscription_days)
                body = {k: v for k, v in current.items() if k != "meta"} | {"end": end.isoformat()}
                await client.update(body, f'W/"{current["meta"]["versionId"]}"')
                self._save(state | {"end": end.isoformat()})
                return
        token = secrets.token_urlsafe(32)
        end = now + timedelta(days=self.connector.options.subscription_days)
        try:
            saved = await self._create(client, endpoint, token, end)
        except PermanentError as err:  # no Subscription here (404/400/422): R4 makes it optional
            self.unavailable = str(err)
            log.warning("fhir_subscription_unavailable", connector=self.connector.name, error=str(err)[:200])
            return
        if saved.get("status") not in ("requested", "active"):
            log.warning("fhir_subscription_refused", connector=self.connector.name, status=saved.get("status"))
        self._save({"id": saved["id"], "token": token, "end": end.isoformat()})
        log.info("fhir_subscription_made", connector=self.connector.name, subscription=saved["id"])

    async def _create(self, client: Any, endpoint: str, token: str, end: datetime) -> dict[str, Any]:
        return await client.create({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "syncbridge: keep the practice's calendars and directories in step with appointments",
            "criteria": "Appointment",
            "end": end.isoformat(),
            "channel": {"type": "rest-hook", "endpoint": endpoint, "header": [f"{TOKEN_HEADER}: {token}"]},
        })

    async def stop(self) -> None:
        """Remove a subscription whose token would be lost with this process."""
        state = self._memory
        if state is None or self._persisted:
            return
        try:
            await self.connector.client().delete("Subscription", state["id"])
        except SyncbridgeError as err:
            log.warning("fhir_subscription_not_removed", connector=self.connector.name, kind=error_kind(err))
        self._memory = None

    # --- notifications ------------------------------------------------------------------------

    def route(self) -> WebhookRoute:
        async def notified(request: Request) -> Response:
            state = self._load()
            given = request.headers.get(TOKEN_HEADER, "")
            if state is None or not given or not hmac.compare_digest(given, str(state["token"])):
                return PlainTextResponse(f"missing or wrong {TOKEN_HEADER}", 401)
            self.connector.host.accept_webhook({}, b"")  # no payload: the next pull finds the change
            return Response(status_code=200)

        return WebhookRoute(NOTIFY_PATH, ("POST",), notified)
