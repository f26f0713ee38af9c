"""Size limits on what the outside world may send us, checked before anything is parsed or stored."""

from __future__ import annotations

from .errors import MalformedRecord

__all__ = ["MAX_RECORD_BYTES", "MAX_WEBHOOK_BYTES", "check_record_size"]

#: one calendar event, FHIR resource or directory record; real ones are a few kilobytes
MAX_RECORD_BYTES = 1 << 20
#: one webhook request body
MAX_WEBHOOK_BYTES = 256 << 10


def check_record_size(size: int, what: str, limit: int = MAX_RECORD_BYTES) -> None:
    """Refuse an oversized record by name, without reading its content into an error message."""
    if size > limit:
        raise MalformedRecord(f"{what} is {size:,} bytes, over the {limit:,}-byte limit for one record; it was skipped")
