"""``batch`` and ``transaction`` Bundles for the FHIR emulator (https://hl7.org/fhir/R4/http.html#transaction).

What the emulator does, following that page: a Bundle POSTed to [base] carries one
``entry.request`` (method, url, ``ifMatch``, ``ifNoneExist``) per interaction, each processed as
the same interaction sent on its own would be. Entries run in the order the page sets for
transactions (DELETE, POST, PUT, GET: "Transaction Processing Rules"; batches are considered to
run in that order too) and the response Bundle (``batch-response`` / ``transaction-response``)
holds one entry per request entry, *in request order*, each with ``response.status`` ("201
Created"), ``location``, ``etag``, ``lastModified`` and, for a failed entry, ``outcome`` (an
OperationOutcome). A batch answers 200 whatever its entries did ("Batch Processing Rules"). A
failed transaction answers that entry's 4xx/5xx status with a single OperationOutcome instead of
a Bundle; with ``atomic_transactions`` on it is all or nothing (every change rolled back), and
off (the default, as on servers that do not roll back) the entries processed before it stay;
the same resource may not be written twice in it (400). ``Prefer: return=minimal`` leaves the
resources out of write entries (http.html#ops). Subscriptions are notified only once a
transaction has committed. A Bundle with more entries than ``max_bundle_entries`` is refused with
413 and an OperationOutcome of code ``too-long`` (the spec leaves the limit to the server).
"""

from __future__ import annotations

import copy
import json
import uuid
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from .emulator_answers import Answer, issue

if TYPE_CHECKING:
    from .emulator import FHIREmulator

__all__ = ["process_bundle"]

#: http.html#transaction, "Transaction Processing Rules"
_RANK = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}


def _request(entry: Any) -> tuple[str, str, dict[str, Any]]:
    req = entry.get("request") if isinstance(entry, dict) else None
    req = req if isinstance(req, dict) else {}
    return str(req.get("method", "")).upper(), str(req.get("url", "")), req


def _one(server: FHIREmulator, entry: Any) -> Answer:
    """One entry, exactly as the interaction would be processed on its own."""
    method, url, req = _request(entry)
    path, _, query = url.partition("?")
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or not server.supports(parts[0]):
        return issue(404 if parts else 400, "not-supported", f"entry.request.url {url!r} names no supported resource type")
    rtype = parts[0]
    if method == "GET" and len(parts) == 2:
        return server.read(rtype, parts[1])
    if method == "GET" and len(parts) == 1:
        return server.search(rtype, parse_qsl(query, keep_blank_values=True), f"{server.base_url}/{url}")
    if method == "DELETE" and len(parts) == 2:
        return server.delete(rtype, parts[1])
    if method in ("POST", "PUT"):
        body = server.checked(entry.get("resource"), rtype)
        if isinstance(body, Answer):
            return body
        body = copy.deepcopy(body)
        if method == "POST" and len(parts) == 1:
            return server.create(rtype, body, req.get("ifNoneExist"))
        if method == "PUT" and len(parts) == 2:
            return server.update(rtype, parts[1], body, req.get("ifMatch"))
    return issue(400, "not-supported", f"{method} {url} is not supported in a Bundle")


def _response_entry(answer: Answer, method: str, minimal: bool) -> dict[str, Any]:
    response: dict[str, Any] = {"status": f"{answer.status} {HTTPStatus(answer.status).phrase}"}
    for header, key in (("Location", "location"), ("ETag", "etag"), ("Last-Modified", "lastModified")):
        if header in answer.headers:
            response[key] = answer.headers[header]
    out: dict[str, Any] = {}
    if answer.status >= 300:
        response["outcome"] = answer.body
    elif answer.body is not None and not (minimal and method != "GET"):
        out["resource"] = answer.body
    out["response"] = response
    return out


def process_bundle(server: FHIREmulator, body: Any, *, minimal: bool = False) -> Answer:
    """Process a batch or transaction Bundle; the caller holds the server's lock."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return issue(400, "invalid", "POST [base] takes a Bundle of type batch or transaction")
    kind = body.get("type")
    entries = body.get("entry", [])
    if kind not in ("batch", "transaction"):
        return issue(400, "invalid", f"Bundle.type must be batch or transaction, not {kind!r}")
    if not isinstance(entries, list):
        return issue(400, "structure", "Bundle.entry must be a list")
    if len(entries) > server.max_bundle_entries:
        return issue(413, "too-long", f"the Bundle has {len(entries)} entries; this server takes at most {server.max_bundle_entries}")
    methods = [_request(e)[0] for e in entries]
    order = sorted(range(len(entries)), key=lambda i: _RANK.get(methods[i], len(_RANK)))
    answers: list[Answer | None] = [None] * len(entries)
    if kind == "batch":
        for i in order:
            answers[i] = _one(server, entries[i])
    else:
        written = [_request(e)[1].split("?")[0].strip("/") for e, m in zip(entries, methods, strict=True) if m in ("PUT", "DELETE")]
        if len(set(written)) != len(written):
            return issue(400, "invalid", "a resource may appear only once in a transaction (http.html#transaction)")
        server.begin()
        try:
            for i in order:
                answer = _one(server, entries[i])
                if answer.status >= 300:
                    first = ((answer.body or {}).get("issue") or [{}])[0]
                    if server.atomic_transactions:
                        server.rollback()  # all or nothing
                        kept = "nothing was applied"
                    else:
                        server.commit()  # what ran before the failing entry stays
                        kept = "entries processed before it were applied"
                    text = f"entry {i} ({methods[i]} {_request(entries[i])[1]}) failed: {first.get('diagnostics', '')}; {kept}"
                    return issue(answer.status, str(first.get("code", "processing")), text)
                answers[i] = answer
        except Exception:
            server.rollback()
            raise
        server.commit()
    out = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "type": f"{kind}-response",
        "entry": [_response_entry(a, m, minimal) for a, m in zip(answers, methods, strict=True) if a is not None],
    }
    return Answer(200, json.loads(json.dumps(out)), {})
