"""Batch requests in the Google Calendar emulator (https://developers.google.com/workspace/calendar/api/guides/batch).

``POST /batch/calendar/v3`` with a ``multipart/mixed`` body of ``application/http`` parts, at most
50; each part is answered as its own request (its own Authorization, or the batch's), and the
answer is ``multipart/mixed`` with ``Content-ID: <response-...>`` echoing each part's id.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

from .emulator_events import Answer, ApiError

__all__ = ["run_batch"]

Handler = Callable[[str, str, str, dict[str, str], bytes], Answer]

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            409: "Conflict", 410: "Gone", 412: "Precondition Failed", 429: "Too Many Requests"}


def run_batch(handle: Handler, headers: dict[str, str], body: bytes) -> Answer:
    ctype = headers.get("content-type", "")
    if not ctype.startswith("multipart/mixed"):
        raise ApiError(400, "badContent", "Batch requests must be multipart/mixed")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    parts = [p for p in message.iter_parts()]
    if len(parts) > 50:
        raise ApiError(400, "badRequest", "A batch holds at most 50 requests")
    boundary = "batch_" + secrets.token_hex(12)
    out: list[bytes] = []
    for part in parts:
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            raise ApiError(400, "badContent", "Each batch part must be an application/http request")
        head, _, inner_body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        lines = head.decode().split("\n")
        method, target = lines[0].split(" ")[:2]
        inner_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}
        inner_headers.setdefault("authorization", headers.get("authorization", ""))
        split = urlsplit(target)
        answer = handle(method, split.path, split.query, inner_headers, inner_body.strip())
        payload = b"" if answer.body is None else json.dumps(answer.body).encode()
        cid = part.get("Content-ID", "")
        response_id = f"Content-ID: <response-{cid.strip('<>')}>\r\n" if cid else ""
        extra = "".join(f"{k}: {v}\r\n" for k, v in answer.headers.items())
        out.append(
            f"--{boundary}\r\nContent-Type: application/http\r\n{response_id}\r\n"
            f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Status')}\r\nContent-Type: application/json; charset=UTF-8\r\n"
            f"{extra}Content-Length: {len(payload)}\r\n\r\n".encode() + payload + b"\r\n"
        )
    return Answer(200, b"".join(out) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/mixed; boundary={boundary}"})
