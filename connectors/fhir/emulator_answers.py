"""How the FHIR emulator answers one interaction: a status, a body and headers (http.html#Status).

Shared by the REST routes (emulator.py) and the entries of batch/transaction Bundles
(emulator_bundles.py), so an interaction answers the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

__all__ = ["FHIR_JSON", "Answer", "issue", "outcome", "respond"]

FHIR_JSON = "application/fhir+json"


@dataclass
class Answer:
    """One interaction's outcome, before it becomes an HTTP response or a Bundle entry's ``response``."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def issue(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> Answer:
    """An OperationOutcome error (http.html#Status)."""
    body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
    return Answer(status, body, headers or {})


def respond(answer: Answer) -> Response:
    if answer.body is None:
        return Response(status_code=answer.status, headers=answer.headers)
    return JSONResponse(answer.body, answer.status, headers=answer.headers, media_type=FHIR_JSON)


def outcome(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> Response:
    """An OperationOutcome error body as an HTTP response."""
    return respond(issue(status, code, text, headers))
