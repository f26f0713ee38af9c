"""The redaction processor: sensitive keys and look-alike values never reach a log line."""

from __future__ import annotations

import io
import json

import structlog

from syncbridge.logging import configure


def test_sensitive_values_are_redacted() -> None:
    """Titles, tokens, e-mails and phone numbers are replaced, ids and counts are kept."""
    buf = io.StringIO()
    configure("debug", json_logs=True, stream=buf)
    log = structlog.get_logger("t")
    log.info("pulled", summary="Session with Jane Doe", token="ya29.secret", appointment="sb-123", count=3,
             detail="call jane@example.org or 555-867-5309", auth="Bearer abc.def")
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert line["summary"] == "[redacted]" and line["token"] == "[redacted]"
    assert line["appointment"] == "sb-123" and line["count"] == 3
    assert "jane@example.org" not in line["detail"] and "867-5309" not in line["detail"]
    assert "abc.def" not in line["auth"]


def test_dates_and_ids_survive() -> None:
    """Timestamps and ids are not mistaken for phone numbers."""
    buf = io.StringIO()
    configure("debug", json_logs=True, stream=buf)
    structlog.get_logger("t").info("applied", at="2026-11-23T15:00:00Z", version=12, appointment="sb-6f1c1a528a594d53")
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert line["at"] == "2026-11-23T15:00:00Z" and line["appointment"] == "sb-6f1c1a528a594d53"
