"""Structured JSON logs that never carry patient data or secrets.

A redaction processor runs last before rendering: values under sensitive keys are replaced,
and any string that looks like a token, an e-mail address or a phone number is masked. Log
calls pass ids and counts, never record content; the processor is the safety net that a test
proves.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["REDACTED", "SENSITIVE_KEYS", "configure", "redact"]

REDACTED = "[redacted]"

#: keys whose values are never logged, whatever they hold
SENSITIVE_KEYS = frozenset(
    {
        "summary", "title", "description", "location", "notes", "note_text", "reason", "name", "client_name",
        "patient", "email", "phone", "address", "body", "payload", "text", "token", "access_token",
        "refresh_token", "password", "secret", "authorization", "client_secret", "assertion", "headers",
        "client_key", "attendees", "organizer",
    }
)
_PATTERNS = [
    re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),  # e-mail
    re.compile(r"\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"),  # North American phone number
    re.compile(r"\+\d{1,3}[ .-]?\d[\d .-]{6,}\d"),  # international phone number
    re.compile(r"(?i)bearer\s+[\w.~+/-]+=*"),
    re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+"),  # JWT
]


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for pattern in _PATTERNS:
            value = pattern.sub(REDACTED, value)
        return value
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in SENSITIVE_KEYS else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = REDACTED
        elif key != "timestamp":
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure(level: str = "info", json_logs: bool = True, stream: TextIO | None = None) -> None:
    """Route structlog and the stdlib's loggers (httpx, uvicorn, apscheduler) through one redacting pipeline."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer])
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # request lines of HTTP clients carry URLs with calendar names: keep them at warning
    for noisy in ("httpx", "httpcore", "caldav", "urllib3"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    # a poll still running when the next one is due is skipped by design (max_instances=1)
    logging.getLogger("apscheduler").setLevel(max(lvl, logging.ERROR))
