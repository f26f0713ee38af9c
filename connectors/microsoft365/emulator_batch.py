"""JSON batching in the Graph emulator (learn.microsoft.com/graph/json-batching).

``POST /v1.0/$batch`` with ``{"requests": [{"id", "method", "url", "headers", "body"}]}``, at most
20 (more: 400 for the whole batch). Each request runs as a request of its own through the same
routes, with the batch's Authorization: the same answers (``transactionId``, ``If-Match`` -> 412,
``@odata.etag``), the same throttling (429 with ``Retry-After``) and the same per-mailbox
concurrency count (learn.microsoft.com/graph/throttling-limits#outlook-service-limits: Graph
hands Outlook "up to four individual requests from the batch at a time", and requests in a batch
"are evaluated individually against throttling limits"). Each request counts as a call in the log;
the batch is one HTTP request. Requests run and are answered in any order, matched by ``id``.
The Injector's error rate fails requests one by one, as it fails whole requests elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


if TYPE_CHECKING:
    from .emulator import GraphEmulator

__all__ = ["MAX_BATCH", "run_batch"]

MAX_BATCH = 20
#: requests of one batch Graph has in flight at once
BATCH_PARALLEL = 4



def _problem(items: Any) -> str | None:
    if not isinstance(items, list) or not items:
        return "Invalid batch payload format."
    if len(items) > MAX_BATCH:
        return f"Number of batch requests exceeds the maximum of {MAX_BATCH}."
    ids = [i.get("id") if isinstance(i, dict) else None for i in items]
    if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
        return "Each request in a batch needs a unique, non-empty id."
    for item in items:
        if not isinstance(item.get("method"), str) or not isinstance(item.get("url"), str):
            return "Each request in a batch needs a method and a url."
        headers = item.get("headers") or {}
        if "body" in item and not any(k.lower() == "content-type" for k in headers):
            return "A request with a body needs a Content-Type header."
    return None


async def _dispatch(app: Any, item: dict[str, Any], authorization: str) -> dict[str, Any]:
    """Run one request through the emulator's routes; its answer as a batch response."""
    split = urlsplit("/" + item["url"].lstrip("/"))
    if split.path.startswith("/$batch"):
        return {"id": item["id"], "status": 400, "body": _error("BadRequest", "A batch cannot hold a batch.")}
    path = "/v1.0" + split.path
    body = json.dumps(item["body"]).encode() if "body" in item else b""
    headers = [(k.lower().encode(), str(v).encode()) for k, v in (item.get("headers") or {}).items()]
    headers += [(b"authorization", authorization.encode()), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http", "http_version": "1.1", "method": item["method"].upper(), "scheme": "https", "root_path": "",
        "path": unquote(path), "raw_path": path.encode(), "query_string": split.query.encode(), "headers": headers,
        "server": ("127.0.0.1", 443), "client": ("127.0.0.1", 0),
    }  # fmt: skip
    sent = False
    answer: dict[str, Any] = {"id": item["id"], "status": 500, "headers": {}}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode(): v.decode() for k, v in message.get("headers", []) if k.lower() != b"content-length"}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    if raw:
        try:
            answer["body"] = json.loads(raw)
        except ValueError:
            answer["body"] = raw.decode(errors="replace")
    return answer


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _faulted(item: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind == "429":
        return {"id": item["id"], "status": 429, "headers": {"Retry-After": "1"},
                "body": _error("TooManyRequests", "Too many requests. Please retry after the time in Retry-After.")}
    if kind == "503":
        return {"id": item["id"], "status": 503, "headers": {"Retry-After": "1"},
                "body": _error("ServiceNotAvailable", "The service is temporarily unavailable. Please retry later.")}
    return {"id": item["id"], "status": 500, "body": _error("InternalServerError", "An internal server error occurred.")}


async def run_batch(emu: GraphEmulator, request: Request) -> Response:
    """The ``$batch`` endpoint: authenticate the batch, then run each request on its own."""
    emu.record(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or emu.identity.grant_for(token) is None:
        return emu.error(401, "InvalidAuthenticationToken", "Access token is empty, malformed or expired.",
                         {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})
    payload = await emu._json(request)
    if isinstance(payload, Response):
        return payload
    items = payload.get("requests")
    problem = _problem(items)
    if problem is not None or not isinstance(items, list):
        return emu.error(400, "BadRequest", problem or "Invalid batch payload format.")
    app = emu.router
    gate = asyncio.Semaphore(BATCH_PARALLEL)
    authorization = request.headers["authorization"]

    async def one(item: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            fault = emu.injector.fault() if emu.injector else None
            if fault is None:
                return await _dispatch(app, item, authorization)
            if fault == "lost":  # it took effect; its answer did not make it into the batch
                await _dispatch(app, item, authorization)
            else:  # refused before it ran, but a call all the same
                split = urlsplit(item["url"])
                emu.log.append((str(item["method"]).upper(), "/v1.0/" + split.path.lstrip("/")))
                emu.queries.append(dict(parse_qsl(split.query)))
            return _faulted(item, fault)

    order = list(items)
    emu.rng.shuffle(order)
    answers = list(await asyncio.gather(*(one(item) for item in order)))
    emu.rng.shuffle(answers)
    return JSONResponse({"responses": answers})
