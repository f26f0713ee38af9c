"""A calendar-feed server like an EHR's iCal export: one secret URL per clinician.

Follows RFC 5545 for the body and RFC 9110 conditional requests (section 13.1.2 If-None-Match,
304 Not Modified with the ETag). An unknown token answers 404, as EHRs do for a revoked feed.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from syncbridge.emulation import RunningServer, serve_in_thread

__all__ = ["FeedEmulator"]


@dataclass
class FeedEmulator:
    feeds: dict[str, bytes] = field(default_factory=dict)  # token -> body
    requests: list[tuple[str, int]] = field(default_factory=list)
    running: RunningServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def feed(request: Request) -> Response:
            token = request.path_params["token"]
            with self._lock:
                body = self.feeds.get(token)
            if body is None:
                self.requests.append((token, 404))
                return PlainTextResponse("not found", 404)
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            if request.headers.get("if-none-match") == etag:
                self.requests.append((token, 304))
                return Response(status_code=304, headers={"ETag": etag})
            self.requests.append((token, 200))
            return Response(body, media_type="text/calendar; charset=utf-8", headers={"ETag": etag})

        return Starlette(routes=[Route("/feeds/{token}.ics", feed)])

    def start(self) -> FeedEmulator:
        self.running = serve_in_thread(self.app())
        return self

    def stop(self) -> None:
        if self.running:
            self.running.stop()

    def new_feed(self, body: bytes = b"") -> str:
        """Register a feed; returns its secret URL."""
        assert self.running is not None
        token = secrets.token_urlsafe(12)
        self.feeds[token] = body
        return f"{self.running.url}/feeds/{token}.ics"

    def publish(self, url: str, body: bytes) -> None:
        """The EHR's export changes (a session booked, cancelled or moved there)."""
        token = url.rsplit("/", 1)[-1].removesuffix(".ics")
        with self._lock:
            self.feeds[token] = body
