"""Canonical appointment <-> Graph ``event`` (learn.microsoft.com/graph/api/resources/event), no I/O.

An event we write shows only what :func:`syncbridge.policy.privacy.event_text` allows (title,
room or "Telehealth"). The canonical id and the values a calendar user cannot change (time zone,
modality, location) travel in two single-value extended properties (MAPI named properties in a
GUID namespace of our own, invisible in Outlook), so an untouched event reads back exactly as
written. Every create carries a ``transactionId`` derived from the canonical id: Graph returns
it on every read, so a delta page tells our events from the clinician's own without fetching the
extended properties, and a retried create returns the first attempt's event. The clinician's own
events are only ever reduced to busy intervals; their text goes nowhere.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from syncbridge.connector import SessionEvent
from syncbridge.errors import MalformedRecord
from syncbridge.model import Modality, Snapshot, check_timezone, iso, parse_iso
from syncbridge.policy.cancellation import find_tags
from syncbridge.policy.privacy import EventText

__all__ = [
    "EXT_FIELDS",
    "as_written",
    "EXT_ID",
    "LISTING_FIELDS",
    "ObservedEvent",
    "SESSION_FIELDS",
    "TEXT_FIELDS",
    "busy_interval",
    "canonical_id_of",
    "delta_hint",
    "graph_instant",
    "is_ours",
    "read_event",
    "render",
    "transaction_id_for",
    "with_properties",
]

#: our MAPI property set; the names are case-sensitive, the GUID is not
PROPERTY_SET = "{9c2d8a5e-41b7-4f0e-b3a6-5d1e7c9f2a40}"
EXT_ID = f"String {PROPERTY_SET} Name syncbridgeId"
EXT_FIELDS = f"String {PROPERTY_SET} Name syncbridgeFields"
TRANSACTION_PREFIX = "syncbridge-"
_NAMESPACE = uuid.UUID("5b0f3c52-9d0e-4e8a-a1c4-6f2e8b7d3c19")

#: ``$select`` of one event read (GET event): what a session needs, no text. Every read of an
#: event carries ``id`` and ``@odata.etag`` whatever ``$select`` names (/graph/api/event-get).
SESSION_FIELDS = ("start", "end", "isCancelled", "transactionId", "lastModifiedDateTime")
#: ``$select`` of a calendarView listing: as above without ``lastModifiedDateTime``, which
#: calendarView does not return under ``$select`` (/graph/api/user-list-calendarview)
LISTING_FIELDS = ("start", "end", "isCancelled", "transactionId")
#: the text tags are read from (``#late``...), asked for only for our own events
TEXT_FIELDS = ("subject", "bodyPreview")
#: what a delta item keeps of any event: enough to tell ours and whether it changed
_DELTA_KEYS = ("id", "@odata.etag", "transactionId", "@removed")


def transaction_id_for(appointment_id: str) -> str:
    """The create's ``transactionId``: derived from the canonical id, so a retry repeats it."""
    return TRANSACTION_PREFIX + uuid.uuid5(_NAMESPACE, appointment_id).hex


def is_ours(event: dict[str, Any]) -> bool:
    """Whether a delta item is one of our events (``transactionId`` is in every read of it)."""
    return str(event.get("transactionId") or "").startswith(TRANSACTION_PREFIX)


def delta_hint(item: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a ``calendarView/delta`` item. Graph sends every event whole there (no
    ``$select``, /graph/api/event-delta); of the clinician's own events only the id and etag are
    kept, of ours also the tags found in their text, whether they have attendees and when they
    were modified, so the text itself is dropped here, at the wire."""
    kept = {k: item[k] for k in _DELTA_KEYS if k in item}
    if is_ours(item) and "@removed" not in item:
        kept["tags"] = sorted(_tags(item))
        kept["lastModifiedDateTime"] = item.get("lastModifiedDateTime")
        if "attendees" in item:
            kept["has_attendees"] = bool(item.get("attendees"))
    return kept


def _tags(event: dict[str, Any]) -> frozenset[str]:
    body = event.get("body") if isinstance(event.get("body"), dict) else {}
    return find_tags(event.get("subject"), event.get("bodyPreview") or (body or {}).get("content"))


def _properties(event: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for prop in event.get("singleValueExtendedProperties") or []:
        if isinstance(prop, dict) and isinstance(prop.get("id"), str):
            out[prop["id"].lower()] = str(prop.get("value") or "")
    return out


def canonical_id_of(event: dict[str, Any]) -> str | None:
    """The canonical id in the event's hidden property, or None (the clinician's own event)."""
    return _properties(event).get(EXT_ID.lower()) or None


def graph_instant(value: Any, what: str) -> datetime:
    """A ``dateTimeTimeZone`` as an aware datetime (IANA names, and ``UTC``); MalformedRecord otherwise."""
    if not isinstance(value, dict) or not value.get("dateTime"):
        raise MalformedRecord(f"the event has no {what}")
    zone_name = str(value.get("timeZone") or "UTC")
    text = str(value["dateTime"])
    head, _, frac = text.partition(".")
    try:
        zone = ZoneInfo("UTC" if zone_name.upper() in ("UTC", "ETC/UTC") else zone_name)
        dt = datetime.fromisoformat(head + ("." + frac[:6] if frac else ""))
    except (ValueError, KeyError) as err:
        raise MalformedRecord(f"the event's {what} cannot be read ({type(err).__name__})") from err
    return dt if dt.tzinfo else dt.replace(tzinfo=zone)


def _local(snapshot_time: str, zone: str) -> dict[str, str]:
    return {"dateTime": parse_iso(snapshot_time).astimezone(ZoneInfo(zone)).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": zone}


def render(appointment_id: str, desired: Snapshot, text: EventText) -> dict[str, Any]:
    """The writable part of the event for ``desired``, in the session's own time zone; nothing about the client."""
    zone = desired["timezone"]
    hidden = {"timezone": zone, "modality": desired.get("modality"), "location": desired.get("location")}
    return {
        "subject": text.title,
        "start": _local(desired["start"], zone),
        "end": _local(desired["end"], zone),
        "location": {"displayName": text.location or ""},
        "showAs": "busy",
        "sensitivity": "private",
        "singleValueExtendedProperties": [
            {"id": EXT_ID, "value": appointment_id},
            {"id": EXT_FIELDS, "value": json.dumps(hidden, sort_keys=True)},
        ],
    }


def with_properties(event: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A write's answer plus the extended properties it carried (Graph returns them only on request)."""
    return event | {"singleValueExtendedProperties": body.get("singleValueExtendedProperties", [])}


@dataclass(frozen=True, slots=True)
class ObservedEvent(SessionEvent):
    """A session event as Graph tells it; one with attendees is a meeting, cancelled with a message.
    ``has_attendees`` is None when the read did not ask (the attendees are read before a removal)."""

    has_attendees: bool | None


def read_event(event: dict[str, Any], *, clinician: str, clinician_zone: str, tags: frozenset[str] | None = None,
               has_attendees: bool | None = None) -> ObservedEvent | None:
    """Our event as canonical fields, or None when it is not ours. ``tags`` when already known (a
    delta item's), else read from the event's text, which the caller must then have asked for.
    Raises MalformedRecord for an event without start or end, or ending before it starts."""
    cid = canonical_id_of(event)
    if cid is None:
        return None
    start, end = graph_instant(event.get("start"), "start"), graph_instant(event.get("end"), "end")
    if end <= start:
        raise MalformedRecord(f"the event ends ({iso(end)}) before it starts ({iso(start)})")
    try:
        hidden = json.loads(_properties(event).get(EXT_FIELDS.lower()) or "{}")
    except ValueError:
        hidden = {}
    hidden = hidden if isinstance(hidden, dict) else {}
    zone = hidden.get("timezone")
    try:
        zone = check_timezone(zone).key if isinstance(zone, str) else clinician_zone
    except MalformedRecord:
        zone = clinician_zone
    modality = hidden.get("modality")
    location = hidden.get("location")
    fields: Snapshot = {
        "clinician": clinician,
        "start": iso(start),
        "end": iso(end),
        "timezone": zone,
        "status": "cancelled" if event.get("isCancelled") else "booked",
        "modality": modality if modality in {m.value for m in Modality} else None,
        "location": location if isinstance(location, str) else None,
    }
    if tags is None:
        tags = _tags(event)
    if has_attendees is None and "attendees" in event:
        has_attendees = bool(event.get("attendees"))
    modified = event.get("lastModifiedDateTime")
    try:
        modified_at = iso(datetime.fromisoformat(str(modified).replace("Z", "+00:00").split(".")[0]).replace(tzinfo=UTC)) if modified else None
    except ValueError:
        modified_at = None
    return ObservedEvent(cid, fields, tags, modified_at, has_attendees)


def busy_interval(event: dict[str, Any]) -> tuple[datetime, datetime] | None:
    """Busy time of one of the clinician's own events; None for ours, free, tentative-free or cancelled ones."""
    if is_ours(event) or canonical_id_of(event) is not None:
        return None
    if event.get("isCancelled") or str(event.get("showAs", "busy")).lower() in ("free", "workingelsewhere", "unknown"):
        return None
    try:
        start, end = graph_instant(event.get("start"), "start"), graph_instant(event.get("end"), "end")
    except MalformedRecord:
        return None
    return (start.astimezone(UTC), end.astimezone(UTC)) if end > start else None


def as_written(event: dict[str, Any], body: dict[str, Any], asked: datetime) -> bool:
    """Whether a create's answer is the event just made from ``body`` (not an older one found by transactionId)."""
    try:
        same_times = all(graph_instant(event.get(k), k) == graph_instant(body[k], k) for k in ("start", "end"))
        created = datetime.fromisoformat(str(event.get("createdDateTime", "")).replace("Z", "+00:00").split(".")[0]).replace(tzinfo=UTC)
    except (MalformedRecord, ValueError):
        return False
    same_text = event.get("subject") == body["subject"] and (event.get("location") or {}).get("displayName", "") == body["location"]["displayName"]
    return same_times and same_text and created >= asked - timedelta(minutes=1)
