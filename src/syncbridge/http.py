"""The one HTTP listener: connectors' webhook routes, health, metrics, the status page and the console.

Binds to localhost unless configured. The status page and metrics need the configured token,
as ``Authorization: Bearer <token>`` or HTTP basic auth with any user name and the token as
password (what a browser prompts for). Health endpoints are open so systemd or a load balancer
can probe them. Webhook routes authenticate themselves (channel tokens, signatures). The
console (``/console``, when ``console.enabled``) has its own users and sessions (console/).
"""

from __future__ import annotations

import base64
import hmac
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from .console import console_routes
from .limits import MAX_WEBHOOK_BYTES
from .statuspage import render_status

if TYPE_CHECKING:
    from .runtime import Daemon

__all__ = ["build_app"]


def _authorised(request: Request, token: str | None) -> bool:
    if token is None:
        return request.client is not None and request.client.host in ("127.0.0.1", "::1")
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip(), token)
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password, token)
    return False


def build_app(daemon: Daemon) -> Starlette:
    def token() -> str | None:
        ref = daemon.config.http.token
        return ref.reveal() if ref else None

    def guard(request: Request) -> Response | None:
        if _authorised(request, token()):
            return None
        return PlainTextResponse("authentication required", 401, headers={"WWW-Authenticate": 'Basic realm="syncbridge"'})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        states = {n: daemon.store.connector_state(n) for n in daemon.connectors}
        unhealthy = {n: st["note"] for n, st in states.items() if not st["healthy"]}
        ready = daemon.ready.is_set()
        # degraded connectors still sync (more slowly): shown, but not a reason to be taken out of service
        degraded = {n: st["degraded"] for n, st in states.items() if st["degraded"]}
        body = {"ready": ready and not unhealthy, "started": ready, "unhealthy": unhealthy, "degraded": degraded}
        return JSONResponse(body, 200 if body["ready"] else 503)

    async def metrics(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        daemon.metrics.refresh(daemon.store, list(daemon.connectors))
        return Response(generate_latest(daemon.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def status(request: Request) -> Response:
        if daemon.config.console.enabled and token() is not None and "authorization" not in request.headers:
            return RedirectResponse("/console/", 303)  # a person with a browser: the console's login
        if (refused := guard(request)) is not None:
            return refused
        return HTMLResponse(render_status(daemon), headers={"Cache-Control": "no-store"})

    async def webhook(request: Request) -> Response:
        """Dispatch to the connector's own handler, looked up per request so a reload takes effect."""
        connector = daemon.connectors.get(request.path_params["connector"])
        path = "/" + request.path_params["path"]
        hook = next((h for h in (connector.webhook_routes() if connector else []) if h.path == path), None)
        if hook is None:
            return PlainTextResponse("not found", 404)
        if request.method not in hook.methods:
            return PlainTextResponse("method not allowed", 405)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_WEBHOOK_BYTES:
            return PlainTextResponse(f"body over {MAX_WEBHOOK_BYTES} bytes", 413)
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_WEBHOOK_BYTES:
                return PlainTextResponse(f"body over {MAX_WEBHOOK_BYTES} bytes", 413)
            chunks.append(chunk)
        request._body = b"".join(chunks)  # starlette reads the cached body from here
        return await hook.handler(request)

    routes: list[BaseRoute] = [
        Route("/", status),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/webhooks/{connector}/{path:path}", webhook, methods=["GET", "POST", "PUT"]),
        *console_routes(daemon),
    ]
    return Starlette(routes=routes)
