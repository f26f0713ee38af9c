"""Push for the Google connector: events.watch channels per calendar and their webhook route.

https://developers.google.com/workspace/calendar/api/guides/push: a channel is created per calendar
with a random secret ``token``; Google echoes it in ``X-Goog-Channel-Token`` on every message, so a
message without it (401) or with another (403) is refused before anything is stored. ``sync``
opens a channel and says nothing changed; ``exists``/``not_exists`` mean "pull now": the route
hands the message to ``host.accept_webhook`` (persisted in the daemon's inbox, which then pulls
incrementally). Channels expire: they are renewed ahead of expiry and stopped on close. Their ids
and tokens live in the host's encrypted vault, so a restarted daemon still recognises messages
from the channels it opened before.

A message names no event, only the channel and so the calendar. One that finds an expected-echo
credit of that calendar (echoes.py: granted by each write of ours there) is the echo of our own
write: it is answered 200 and neither stored nor pulled. Any other is stored, and
``calendar_of`` lets the connector pull that calendar alone.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from syncbridge.errors import SyncbridgeError
from syncbridge.limits import MAX_WEBHOOK_BYTES

from .echoes import EchoCredits

if TYPE_CHECKING:
    from .connector import GoogleCalendarConnector

__all__ = ["ChannelKeeper", "WatchChannel"]

log = structlog.get_logger("syncbridge.google")
VAULT_KEY = "watch_channels"
ROUTE = "/notify"
#: headers kept with an accepted message (the channel token is a secret and is never stored)
KEPT_HEADERS = ("x-goog-channel-id", "x-goog-message-number", "x-goog-resource-id", "x-goog-resource-state", "x-goog-channel-expiration")


@dataclass
class WatchChannel:
    calendar: str
    id: str
    token: str
    address: str
    resource_id: str = ""
    expiration_ms: int = 0


class ChannelKeeper:
    """Creates, renews, authenticates and stops one connector's watch channels."""

    def __init__(self, connector: GoogleCalendarConnector) -> None:
        self.connector = connector
        self._channels: dict[str, WatchChannel] | None = None  # calendar id -> channel
        #: channels being replaced: still recognised until they are stopped
        self._retiring: dict[str, WatchChannel] = {}
        #: expected echoes of our own writes, per watched calendar
        self.echoes = EchoCredits(connector.options.echo_window)

    @property
    def channels(self) -> dict[str, WatchChannel]:
        if self._channels is None:
            self._channels = {}
            try:
                stored = self.connector.host.vault_get(VAULT_KEY)
            except SyncbridgeError as err:  # no store.secret_key: channels live in memory only
                log.warning("watch_channels_not_persisted", connector=self.connector.name, kind=err.kind)
                stored = None
            try:
                self._channels = {c["calendar"]: WatchChannel(**c) for c in json.loads(stored)} if stored else {}
            except (ValueError, TypeError, KeyError):
                self._channels = {}
        return self._channels

    def _save(self) -> None:
        """Keep open channels (ids and secret tokens) in the encrypted vault, so a restart still knows them."""
        live = [asdict(c) for c in self.channels.values() if c.resource_id]
        try:
            if live:
                self.connector.host.vault_put(VAULT_KEY, json.dumps(live))
            else:
                self.connector.host.vault_delete(VAULT_KEY)
        except SyncbridgeError as err:
            log.warning("watch_channels_not_persisted", connector=self.connector.name, kind=err.kind)

    def address(self) -> str | None:
        base = self.connector.host.public_url
        return base.rstrip("/") + ROUTE if base else None

    async def maintain(self) -> None:
        """Open a channel for each calendar without a live one; renew those close to expiry."""
        address = self.address()
        options = self.connector.options
        if address is None or not options.push:
            return
        margin_ms = min(options.channel_renew_before, options.channel_ttl // 2) * 1000
        calendars = await self.connector.calendars()
        for clinician, calendar in calendars.items():
            current = self.channels.get(calendar)
            if current and current.resource_id and current.address == address and current.expiration_ms - time.time() * 1000 > margin_ms:
                continue
            fresh = WatchChannel(calendar, str(uuid.uuid4()), secrets.token_urlsafe(32), address)
            self.channels[calendar] = fresh  # known before Google's first ("sync") message can arrive
            body = {"id": fresh.id, "type": "web_hook", "address": address, "token": fresh.token, "params": {"ttl": str(options.channel_ttl)}}
            try:
                answer = await self.connector.client(clinician).watch(calendar, body)
            except SyncbridgeError as err:
                log.warning("watch_failed", connector=self.connector.name, clinician=clinician, kind=err.kind, error=str(err))
                if current is not None:
                    self.channels[calendar] = current
                else:
                    del self.channels[calendar]
                continue
            fresh.resource_id = str(answer.get("resourceId", ""))
            fresh.expiration_ms = int(answer.get("expiration") or 0)
            self._save()
            log.info("watch_opened", connector=self.connector.name, clinician=clinician, expires_ms=fresh.expiration_ms)
            if current is not None and current.resource_id:
                self._retiring[current.id] = current
                try:
                    await self._stop(clinician, current)
                finally:
                    del self._retiring[current.id]

    async def _stop(self, clinician: str, channel: WatchChannel) -> None:
        try:
            await self.connector.client(clinician).stop(channel.id, channel.resource_id)
        except SyncbridgeError as err:
            log.warning("watch_stop_failed", connector=self.connector.name, clinician=clinician, kind=err.kind)

    async def stop_all(self) -> None:
        if not self.channels:
            return
        owners = {cal: clin for clin, cal in (await self.connector.calendars()).items()}
        for calendar, channel in list(self.channels.items()):
            if channel.resource_id and calendar in owners:
                await self._stop(owners[calendar], channel)
            del self.channels[calendar]
        self._save()

    def _known(self, channel_id: str | None) -> WatchChannel | None:
        return next((c for c in self.channels.values() if c.id == channel_id), None) or self._retiring.get(channel_id or "")

    def _watched(self, calendar: str) -> bool:
        channel = self.channels.get(calendar)
        return channel is not None and bool(channel.resource_id)

    def expect(self, calendar: str) -> None:
        """A write of ours to ``calendar`` is about to be sent: its notification is an echo. Only
        an open channel will carry one, so an unwatched calendar gets no credit."""
        if self._watched(calendar):
            self.echoes.expect(calendar)

    def withdraw(self, calendar: str) -> None:
        """Google refused that write, or it changed nothing: no notification will come."""
        if self._watched(calendar):
            self.echoes.withdraw(calendar)

    def calendar_of(self, channel_id: str | None) -> str | None:
        """The calendar a channel (open, or being replaced) watches; None for one no longer known."""
        channel = self._known(channel_id)
        return channel.calendar if channel is not None else None

    async def handle(self, request: Request) -> Response:
        """POST <public_url>/notify: authenticate by channel token, then persist and answer at once."""
        token = request.headers.get("x-goog-channel-token")
        if not token:
            return PlainTextResponse("missing channel token", 401)
        channel = self._known(request.headers.get("x-goog-channel-id"))
        if channel is None or not secrets.compare_digest(token.encode(), channel.token.encode()):
            log.warning("webhook_refused", connector=self.connector.name, reason="unknown channel or wrong token")
            return PlainTextResponse("unknown channel or wrong token", 403)
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_WEBHOOK_BYTES:
                return PlainTextResponse("notification body too large", 413)
        state = request.headers.get("x-goog-resource-state")
        if state == "sync":
            return Response(status_code=200)  # the channel opened; nothing changed
        if state not in ("exists", "not_exists"):
            return PlainTextResponse("unknown X-Goog-Resource-State", 400)
        if self.echoes.consume(channel.calendar):
            log.debug("webhook_echo", connector=self.connector.name)
            return Response(status_code=200)  # our own write: nothing to store, nothing to pull
        kept: dict[str, Any] = {k: request.headers[k] for k in KEPT_HEADERS if k in request.headers}
        self.connector.host.accept_webhook(kept, b"")
        return Response(status_code=200)
