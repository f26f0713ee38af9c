"""Batch requests in the Google Calendar emulator (https://developers.google.com/workspace/calendar/api/guides/batch).

``POST /batch/calendar/v3`` with a ``multipart/mixed`` body of ``application/http`` parts: "You're
limited to 1000 calls in a single batch request". Each part is answered as its own request (its
own Authorization, or the batch's) with its own status: If-Match (412), duplicate ids (409),
throttling (403 ``rateLimitExceeded`` / 429) and the failures the Injector injects, decided part by
part. "The server may perform your calls in any order": parts run shuffled; the answer is
``multipart/mixed`` in request order, ``Content-ID: <response-...>`` echoing each part's id.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import random
import secrets
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from syncbridge.emulation import Injector

from .emulator_events import Answer, ApiError, encode

__all__ = ["BATCH_LIMIT", "run_batch"]

Handler = Callable[[str, str, str, dict[str, str], bytes], Answer]
BATCH_LIMIT = 1000

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            409: "Conflict", 410: "Gone", 412: "Precondition Failed", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}



def _faulted(kind: str, run: Callable[[], Answer]) -> Answer:
    """A part answered as the injected failure (a lost answer: the call took effect first)."""
    if kind == "lost":
        run()
        return Answer(503, ApiError(503, "backendError", "Backend Error").body)
    if kind == "429":
        err = ApiError(429, "rateLimitExceeded", "Rate Limit Exceeded", domain="usageLimits")
        return Answer(429, err.body, {"Retry-After": "1"})
    status = int(kind)
    return Answer(status, ApiError(status, "backendError", "Backend Error").body, {"Retry-After": "1"} if status == 503 else {})


def run_batch(handle: Handler, headers: dict[str, str], body: bytes, *, injector: Injector | None = None,
              rng: random.Random | None = None, log: list[tuple[str, str]] | None = None) -> Answer:
    ctype = headers.get("content-type", "")
    if not ctype.startswith("multipart/mixed"):
        raise ApiError(400, "badContent", "Batch requests must be multipart/mixed")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    parts = [p for p in message.iter_parts()]
    if len(parts) > BATCH_LIMIT:
        raise ApiError(400, "badRequest", f"A batch request holds at most {BATCH_LIMIT} calls")
    rng = rng or random.Random()
    order = list(range(len(parts)))
    rng.shuffle(order)
    answers = {i: _answer(handle, headers, parts[i], injector.fault() if injector else None, log) for i in order}
    boundary = "batch_" + secrets.token_hex(12)
    out: list[bytes] = []
    for i, part in enumerate(parts):
        answer = answers[i]
        payload = encode(answer.body)
        cid = part.get("Content-ID", "")
        response_id = f"Content-ID: <response-{cid.strip('<>')}>\r\n" if cid else ""
        extra = "".join(f"{k}: {v}\r\n" for k, v in answer.headers.items())
        out.append(
            f"--{boundary}\r\nContent-Type: application/http\r\n{response_id}\r\n"
            f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Status')}\r\nContent-Type: application/json; charset=UTF-8\r\n"
            f"{extra}Content-Length: {len(payload)}\r\n\r\n".encode() + payload + b"\r\n"
        )
    return Answer(200, b"".join(out) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/mixed; boundary={boundary}"})


def _answer(handle: Handler, headers: dict[str, str], part: email.message.MIMEPart, fault: str | None,
            log: list[tuple[str, str]] | None) -> Answer:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        raise ApiError(400, "badContent", "Each batch part must be an application/http request")
    head, _, inner_body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    lines = head.decode().split("\n")
    method, target = lines[0].split(" ")[:2]
    inner_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}
    inner_headers.setdefault("authorization", headers.get("authorization", ""))
    split = urlsplit(target)

    def run() -> Answer:
        return handle(method, split.path, split.query, inner_headers, inner_body.strip())

    if fault is not None and fault != "lost" and log is not None:  # refused before it ran, but a call all the same
        log.append((method, unquote(split.path)))
    return run() if fault is None else _faulted(fault, run)
