"""Size limits on what the outside world may send us, checked before anything is parsed or stored."""

from __future__ import annotations

import json
from typing import Any

from .errors import MalformedRecord, SyncbridgeError

__all__ = ["MAX_RECORD_BYTES", "MAX_WEBHOOK_BYTES", "check_record_size", "json_object", "loads"]

#: one calendar event, FHIR resource or directory record; real ones are a few kilobytes
MAX_RECORD_BYTES = 1 << 20
#: one webhook request body
MAX_WEBHOOK_BYTES = 256 << 10


def check_record_size(size: int, what: str, limit: int = MAX_RECORD_BYTES) -> None:
    """Refuse an oversized record by name, without reading its content into an error message."""
    if size > limit:
        raise MalformedRecord(f"{what} is {size:,} bytes, over the {limit:,}-byte limit for one record; it was skipped")


def loads(content: bytes | str) -> Any:
    """``json.loads`` for what the outside world sends: any text it cannot take as a JSON document,
    nesting too deep for the parser included (``RecursionError``), is a ``ValueError``."""
    try:
        return json.loads(content)
    except RecursionError as err:
        raise ValueError("the JSON is nested too deeply") from err
    except UnicodeDecodeError as err:
        raise ValueError("the body is not UTF-8 text") from err


def json_object(
    content: bytes, what: str, *, limit: int = MAX_RECORD_BYTES, not_json: type[SyncbridgeError] = MalformedRecord, kind: str = "an object"
) -> dict[str, Any]:
    """A vendor's answer as a JSON object, size-checked before it is parsed. ``not_json`` says what
    unreadable text means for that vendor (a broken record, or a proxy page worth retrying)."""
    check_record_size(len(content), what, limit)
    try:
        body = loads(content)
    except ValueError as err:
        raise not_json(f"{what}: the answer is not JSON") from err
    if not isinstance(body, dict):
        raise MalformedRecord(f"{what}: the answer is not {kind}")
    return body
