"""Canonical appointment <-> Calendar API Event resource, as pure functions without I/O.

An event we write carries only what :func:`syncbridge.policy.privacy.event_text` allows in its
visible text, plus ``extendedProperties.private`` (invisible to attendees and other apps) with the
canonical id and the values a calendar user cannot change (modality, location). Its id is derived
from the canonical id (base32hex, the alphabet events.insert accepts), so a retried insert meets
its first attempt (409) instead of duplicating, and even a deleted event, which Google returns
with little more than its id, is recognised as ours. Every other event is the clinician's
private life: it is only ever reduced to a busy interval here, and its text goes nowhere.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from syncbridge.connector import SessionEvent
from syncbridge.errors import MalformedRecord, PermanentError
from syncbridge.model import Modality, Snapshot, check_timezone, iso, parse_iso
from syncbridge.policy.cancellation import find_tags
from syncbridge.policy.privacy import EventText

__all__ = [
    "BUSY_FIELDS",
    "EVENT_FIELDS",
    "ID_KEY",
    "LIST_FIELDS",
    "LOCATION_KEY",
    "MODALITY_KEY",
    "ObservedEvent",
    "busy_interval",
    "canonical_id_of",
    "event_id_for",
    "read_event",
    "without_nulls",
    "render",
    "TEXT_FIELDS",
]

ID_KEY = "syncbridgeId"
MODALITY_KEY = "syncbridgeModality"
LOCATION_KEY = "syncbridgeLocation"
_PREFIX = b"syncbridge:"
#: what a busy-time listing asks Google for: no summary, description, attendees' names or location
BUSY_FIELDS = "items(id,recurringEventId,status,transparency,start,end,attendees(self,responseStatus)),nextPageToken"
#: what :func:`read_event` needs of an event (a partial response: no summary, description,
#: location or attendees, so a clinician's private events reach us as times and ids only)
EVENT_FIELDS = "id,etag,status,updated,start,end,recurringEventId,extendedProperties/private"
#: what a sync listing asks Google for
LIST_FIELDS = f"items({EVENT_FIELDS}),nextPageToken,nextSyncToken"
#: the text of one of OUR session events, read alone when someone else changed it: its tags
TEXT_FIELDS = "etag,summary,description"


def event_id_for(appointment_id: str) -> str:
    """The event id of an appointment: base32hex of a marked canonical id (a-v, 0-9; 5-1024 chars)."""
    raw = _PREFIX + appointment_id.encode()
    out = base64.b32hexencode(raw).decode().rstrip("=").lower()
    if len(out) > 1024:
        raise PermanentError("the appointment id is too long for a Google event id (1024 characters at most)")
    return out


def canonical_id_of(event_id: str) -> str | None:
    """The canonical id an event id was derived from, or None for anybody else's event."""
    text = event_id.upper()
    try:
        raw = base64.b32hexdecode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(_PREFIX):
        return None
    try:
        cid = raw[len(_PREFIX) :].decode()
    except UnicodeDecodeError:
        return None
    return cid if cid and event_id_for(cid) == event_id else None


def render(appointment_id: str, desired: Snapshot, text: EventText, *, include_location: bool = True) -> dict[str, Any]:
    """The event body for ``desired``: local times with the appointment's IANA zone, nothing about the client.

    Keys we manage are always present (``None`` clears them under patch semantics), so a patch
    converges the event without touching what a person added (a description, reminders, guests).
    """
    zone = ZoneInfo(desired["timezone"])
    start = parse_iso(desired["start"]).astimezone(zone)
    end = parse_iso(desired["end"]).astimezone(zone)
    private = {
        ID_KEY: appointment_id,
        MODALITY_KEY: desired.get("modality") or None,
        LOCATION_KEY: (desired.get("location") or None) if include_location else None,
    }
    return {
        "id": event_id_for(appointment_id),
        "status": "confirmed",
        "summary": text.title,
        "location": text.location,
        "start": {"dateTime": start.isoformat(), "timeZone": desired["timezone"]},
        "end": {"dateTime": end.isoformat(), "timeZone": desired["timezone"]},
        "transparency": "opaque",
        "extendedProperties": {"private": private},
    }


def _instant(slot: Any, zone: ZoneInfo, what: str) -> datetime:
    if not isinstance(slot, dict):
        raise MalformedRecord(f"the event has no {what}")
    if slot.get("dateTime"):
        try:
            value = datetime.fromisoformat(str(slot["dateTime"]).replace("Z", "+00:00"))
        except ValueError as err:
            raise MalformedRecord(f"the event's {what} is not a date-time") from err
        if value.tzinfo is None:
            value = value.replace(tzinfo=_zone(slot.get("timeZone")) or zone)
        return value
    if slot.get("date"):
        try:
            return datetime.combine(date.fromisoformat(str(slot["date"])), time(), zone)
        except ValueError as err:
            raise MalformedRecord(f"the event's {what} is not a date") from err
    raise MalformedRecord(f"the event has no {what}")


def _zone(name: Any) -> ZoneInfo | None:
    if not isinstance(name, str) or not name:
        return None
    try:
        return check_timezone(name)
    except MalformedRecord:
        return None


@dataclass(frozen=True, slots=True)
class ObservedEvent(SessionEvent):
    """A session event as Google tells it, including whether it was deleted (status "cancelled")."""

    deleted: bool


def read_event(event: dict[str, Any], *, clinician: str, clinician_zone: str) -> ObservedEvent | None:
    """Our event as canonical fields, or None when the event is not ours.

    Ours means the id derives from a canonical id and ``syncbridgeId``, when present, agrees (a
    copy a person made gets a new id and stays theirs). A cancelled event is a deletion. Raises
    MalformedRecord for an event without a start, or ending before it starts.
    """
    if not isinstance(event.get("id"), str):
        raise MalformedRecord("the event has no id")
    cid = canonical_id_of(event["id"])
    if cid is None or event.get("recurringEventId"):
        return None
    private = (event.get("extendedProperties") or {}).get("private") or {}
    if private.get(ID_KEY) not in (None, cid):
        return None
    modified = event.get("updated")
    modified_at = iso(parse_iso(modified)) if isinstance(modified, str) and modified else None
    if event.get("status") == "cancelled":
        return ObservedEvent(cid, {}, frozenset(), modified_at, deleted=True)
    zone = ZoneInfo(clinician_zone)
    start = _instant(event.get("start"), zone, "start")
    end = _instant(event.get("end"), zone, "end")
    if end <= start:
        raise MalformedRecord(f"the event ends ({iso(end)}) before it starts ({iso(start)})")
    start_zone = _zone((event.get("start") or {}).get("timeZone"))
    modality = private.get(MODALITY_KEY)
    fields: Snapshot = {
        "clinician": clinician,
        "start": iso(start),
        "end": iso(end),
        "timezone": start_zone.key if start_zone else clinician_zone,
        "status": "booked",
        "modality": modality if modality in {m.value for m in Modality} else None,
        "location": private.get(LOCATION_KEY) or None,
    }
    tags = find_tags(event.get("summary"), event.get("description"))
    return ObservedEvent(cid, fields, tags, modified_at, deleted=False)


def busy_interval(event: dict[str, Any], clinician_zone: str) -> tuple[datetime, datetime] | None:
    """Busy time of one of the clinician's own events (an expanded instance), or None when it is free.

    Our sessions, cancelled occurrences, events shown as "free" (transparent) and invitations the
    clinician declined are not busy time.
    """
    owner = event.get("recurringEventId") or event.get("id") or ""
    if canonical_id_of(str(owner)) is not None or event.get("status") == "cancelled":
        return None
    if event.get("transparency") == "transparent":
        return None
    if any(a.get("self") and a.get("responseStatus") == "declined" for a in event.get("attendees") or []):
        return None
    zone = ZoneInfo(clinician_zone)
    start = _instant(event.get("start"), zone, "start")
    end = _instant(event.get("end"), zone, "end")
    if "date" in (event.get("end") or {}) and end == start:
        end = start + timedelta(days=1)
    return (start, end) if end > start else None


def without_nulls(body: dict[str, Any]) -> dict[str, Any]:
    """An insert or full update carries no null members (a patch uses them to clear a field)."""
    out: dict[str, Any] = {}
    for k, v in body.items():
        if isinstance(v, dict):
            v = without_nulls(v)
        if v is not None:
            out[k] = v
    return out
