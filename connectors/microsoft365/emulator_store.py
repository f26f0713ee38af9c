"""The emulator's mailbox storage: events as Graph stores and renders them (resources/event).

Times are kept as aware UTC datetimes and rendered as ``dateTimeTimeZone`` in UTC or in the zone
a ``Prefer: outlook.timezone`` header asks for; extended properties are kept by their id
(case-insensitive, as MAPI property names in a GUID namespace are matched by Exchange).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .emulator_notify import parse_when

__all__ = [
    "EVENT_PROPERTIES", "MAX_CONCURRENT_PER_MAILBOX", "Mailbox", "apply_body", "changes_since", "copy_for_update", "in_window", "new_event", "overlaps",
    "render", "stamp",
]

WINDOWS_ZONES = {
    "Eastern Standard Time": "America/New_York", "Central Standard Time": "America/Chicago",
    "Mountain Standard Time": "America/Denver", "Pacific Standard Time": "America/Los_Angeles",
    "GMT Standard Time": "Europe/London", "W. Europe Standard Time": "Europe/Berlin",
}
WRITABLE = {
    "subject", "body", "start", "end", "location", "showAs", "categories", "isReminderOn", "reminderMinutesBeforeStart",
    "attendees", "sensitivity", "importance", "singleValueExtendedProperties", "transactionId", "isAllDay",
}
MAX_CONCURRENT_PER_MAILBOX = 4
#: the properties of an event (learn.microsoft.com/graph/api/resources/event, v1.0): what ``$select`` may name
EVENT_PROPERTIES = frozenset({
    "allowNewTimeProposals", "attendees", "body", "bodyPreview", "categories", "changeKey", "createdDateTime", "end",
    "hasAttachments", "hideAttendees", "iCalUId", "id", "importance", "isAllDay", "isCancelled", "isDraft", "isOnlineMeeting",
    "isOrganizer", "isReminderOn", "lastModifiedDateTime", "location", "locations", "onlineMeeting", "onlineMeetingProvider",
    "onlineMeetingUrl", "organizer", "originalEndTimeZone", "originalStart", "originalStartTimeZone", "recurrence",
    "reminderMinutesBeforeStart", "responseRequested", "responseStatus", "sensitivity", "seriesMasterId", "showAs", "start",
    "subject", "transactionId", "type", "webLink",
})


def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(WINDOWS_ZONES.get(name, name))


def stamp(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _graph_time(dt: datetime, zone: str) -> dict[str, str]:
    return {"dateTime": dt.astimezone(_zone(zone)).strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": zone}


@dataclass
class Mailbox:
    """One user's primary calendar: events, tombstones and the change sequence delta rounds use."""

    upn: str
    object_id: str
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: event id -> sequence number of its last change (creates, updates and deletes)
    changed: dict[str, int] = field(default_factory=dict)
    #: transactionId -> event id, so a repeated create finds its event without a scan
    transactions: dict[str, str] = field(default_factory=dict)
    seq: int = 0


def apply_body(event: dict[str, Any], body: dict[str, Any]) -> str | None:
    """Copy writable properties into the stored event; a problem message, or None."""
    unknown = set(body) - WRITABLE - {"@odata.type"}
    if unknown:
        return f"The property '{sorted(unknown)[0]}' does not exist on type 'microsoft.graph.event'."
    for key in ("start", "end"):
        if key in body:
            value = body[key] or {}
            try:
                zone = str(value.get("timeZone") or "UTC")
                _zone(zone)
            except (ZoneInfoNotFoundError, ValueError, AttributeError):
                return f"TimeZoneNotSupportedException: A valid TimeZone value must be specified. The following TimeZone value is not supported: '{value}'."
            when = parse_when(value.get("dateTime"), WINDOWS_ZONES.get(zone, zone))
            if when is None:
                return f"Cannot convert the literal '{value.get('dateTime')}' to the expected type 'Edm.DateTimeOffset'."
            event[f"_{key}"] = when.astimezone(UTC)
            event[f"original{key.capitalize()}TimeZone"] = zone
    for key in WRITABLE - {"start", "end", "singleValueExtendedProperties", "transactionId"}:
        if key in body:
            event[key] = body[key]
    for prop in body.get("singleValueExtendedProperties") or []:
        event["_ext"][str(prop.get("id", "")).lower()] = (prop.get("id"), prop.get("value"))
    if event["_end"] < event["_start"]:
        return "The end of the event must not be before its start."
    return None


def new_event(box: Mailbox, body: dict[str, Any]) -> dict[str, Any]:
    """A stored event made from a create's body (not yet in the mailbox); ValueError names a bad property."""
    now = stamp(datetime.now(UTC))
    eid = "AAMkA" + secrets.token_urlsafe(48)
    event: dict[str, Any] = {
        "id": eid, "createdDateTime": now, "lastModifiedDateTime": now, "changeKey": "", "categories": [],
        "originalStartTimeZone": "UTC", "originalEndTimeZone": "UTC", "iCalUId": "040000008200E00074C5B7101A82E008" + secrets.token_hex(24),
        "reminderMinutesBeforeStart": 15, "isReminderOn": True, "subject": "", "importance": "normal", "sensitivity": "normal",
        "isAllDay": False, "isCancelled": False, "showAs": "busy", "type": "singleInstance", "seriesMasterId": None,
        "body": {"contentType": "text", "content": ""}, "location": {"displayName": "", "locationType": "default"},
        "attendees": [], "organizer": {"emailAddress": {"name": box.upn.split("@")[0], "address": box.upn}},
        "_ext": {}, "_start": datetime.now(UTC), "_end": datetime.now(UTC),
    }
    if body.get("transactionId"):
        event["transactionId"] = str(body["transactionId"])
    problem = apply_body(event, body)
    if problem is not None:
        raise ValueError(problem)
    return event


def copy_for_update(event: dict[str, Any]) -> dict[str, Any]:
    """A deep copy to apply a PATCH to, so a refused update leaves the stored event untouched."""
    trial = json.loads(json.dumps({k: v for k, v in event.items() if not k.startswith("_")}))
    return trial | {"_ext": dict(event["_ext"]), "_start": event["_start"], "_end": event["_end"]}


def render(event: dict[str, Any], *, expand: list[str] | None, zone: str = "UTC",
            select: list[str] | None = None, all_ext: bool = False) -> dict[str, Any]:
    """The event as Graph sends it: every property, or with ``select`` those named plus ``id`` and
    ``@odata.etag`` (always sent, /graph/api/event-get); extended properties only as expanded."""
    out = {k: v for k, v in event.items() if not k.startswith("_")}
    out["@odata.etag"] = f'W/"{event["changeKey"]}"'
    out["start"] = _graph_time(event["_start"], zone)
    out["end"] = _graph_time(event["_end"], zone)
    content = str((event.get("body") or {}).get("content") or "")
    out["bodyPreview"] = content[:255]
    if select:
        out = {k: v for k, v in out.items() if k in set(select) | {"id", "@odata.etag"}}
    if expand is not None or all_ext:
        wanted = {e.lower() for e in expand or []}
        props = [{"id": pid, "value": value} for key, (pid, value) in event["_ext"].items() if all_ext or key in wanted]
        if props:
            out["singleValueExtendedProperties"] = props
    return out


def overlaps(event: dict[str, Any], start: datetime, end: datetime) -> bool:
    return bool(event["_start"] < end and event["_end"] > start)


def in_window(box: Mailbox, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Events overlapping [start, end), in start order (what calendarView lists)."""
    return sorted((e for e in box.events.values() if overlaps(e, start, end)), key=lambda e: (e["_start"], e["id"]))


def changes_since(box: Mailbox, start: datetime, end: datetime, since: int, zone: str) -> list[dict[str, Any]]:
    """A delta round's items after change ``since``: events changed inside the window in full, and
    deletions and changes outside it as ``@removed`` (reason ``deleted``), as event-delta documents."""
    items: list[dict[str, Any]] = []
    for eid, seq in sorted(box.changed.items(), key=lambda kv: kv[1]):
        if seq <= since:
            continue
        event = box.events.get(eid)
        if event is not None and overlaps(event, start, end):
            items.append(render(event, expand=None, zone=zone))
        else:
            items.append({"@odata.type": "#microsoft.graph.event", "id": eid, "@removed": {"reason": "deleted"}})
    return items
