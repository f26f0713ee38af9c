"""Watch channels of the Google Calendar emulator, delivering real HTTP notifications.

Follows https://developers.google.com/workspace/calendar/api/guides/push: ``events.watch``
answers an ``api#channel`` with ``resourceId``, ``resourceUri`` and ``expiration`` (Unix ms, as a
string); a ``sync`` message is sent when the channel starts, then ``exists`` after each change of
the watched collection (``not_exists`` is for a watched resource that is gone). Each message is a
POST with an empty body and the headers ``X-Goog-Channel-ID``, ``X-Goog-Channel-Token`` (when one
was given), ``X-Goog-Channel-Expiration`` (RFC 1123 date), ``X-Goog-Message-Number``,
``X-Goog-Resource-ID``, ``X-Goog-Resource-URI`` and ``X-Goog-Resource-State``. Channels stop at
expiry or with ``channels.stop``. Delivery is asynchronous and at most once, as Google's is.

One deliberate difference: Google accepts only HTTPS addresses with a valid certificate; the
emulator also accepts ``http://`` on loopback, so tests and the demo need no certificate.
"""

from __future__ import annotations

import email.utils
import itertools
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

__all__ = ["Channel", "Deliverer", "address_problem"]

DEFAULT_TTL = 604800  # seconds, the documented default of params.ttl
MAX_TTL = 2592000  # Calendar caps event channels at 30 days


@dataclass
class Channel:
    id: str
    calendar: str
    address: str
    token: str | None
    expiration_ms: int
    owner: str
    resource_id: str = field(default_factory=lambda: secrets.token_urlsafe(20))
    resource_uri: str = ""
    messages: itertools.count = field(default_factory=lambda: itertools.count(1))

    def body(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": "api#channel",
            "id": self.id,
            "resourceId": self.resource_id,
            "resourceUri": self.resource_uri,
            "expiration": str(self.expiration_ms),
        }
        if self.token is not None:
            out["token"] = self.token
        return out

    @property
    def expired(self) -> bool:
        return self.expiration_ms <= time.time() * 1000

    def headers(self, state: str) -> dict[str, str]:
        out = {
            "X-Goog-Channel-ID": self.id,
            "X-Goog-Channel-Expiration": email.utils.formatdate(self.expiration_ms / 1000, usegmt=True),
            "X-Goog-Message-Number": str(next(self.messages)),
            "X-Goog-Resource-ID": self.resource_id,
            "X-Goog-Resource-URI": self.resource_uri,
            "X-Goog-Resource-State": state,
        }
        if self.token is not None:
            out["X-Goog-Channel-Token"] = self.token
        return out


def address_problem(address: str) -> str | None:
    """Why a watch address is refused, or None (HTTPS, or http on loopback: see module docstring)."""
    parts = urlsplit(address)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return None
    return f"WebHook callback must be HTTPS: {address}"


@dataclass
class Delivery:
    url: str
    headers: dict[str, str]
    status: int | None = None


class Deliverer:
    """A background thread POSTing notifications in order; ``delivered`` records what answered what."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self.delivered: list[Delivery] = []
        self._thread = threading.Thread(target=self._run, name="gcal-push", daemon=True)
        self._thread.start()

    def send(self, channel: Channel, state: str) -> None:
        if not channel.expired:
            self._queue.put(Delivery(channel.address, channel.headers(state)))

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as http:
            while (item := self._queue.get()) is not None:
                try:
                    item.status = http.post(item.url, headers=item.headers, content=b"").status_code
                except httpx.HTTPError:
                    item.status = None  # Google drops the message; polling is the safety net
                self.delivered.append(item)
                self._queue.task_done()

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every queued message was attempted (tests)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
