"""Feed events -> observations. The feed's text (client names, notes) never leaves this module.

Stable ids: the UID for a single event, ``UID|RECURRENCE-ID`` for an occurrence of a series
(RFC 5545 section 3.8.4.4), so moving one occurrence in the EHR keeps its identity.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import recurring_ical_events

from syncbridge.connector import Observation
from syncbridge.errors import MalformedRecord
from syncbridge.limits import check_record_size
from syncbridge.model import check_timezone, iso
from syncbridge.policy.cancellation import find_tags

__all__ = ["feed_observations"]

# words EHR feeds put in a title for a session that is off, mapped to our tags
_STATUS_WORDS = [
    (re.compile(r"\bno[- ]?show\b", re.I), "noshow"),
    (re.compile(r"\blate[- ]?cancel", re.I), "late"),
    (re.compile(r"\bcancel(?:l?ed)?\b", re.I), "cancel"),
]


def _instant(value: Any, zone: ZoneInfo) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=zone)
    if isinstance(value, date):
        return datetime.combine(value, time(), zone)
    raise MalformedRecord("the event's time is not a date or date-time")


def _observation(event: Any, ext_id: str, clinician: str, zone_name: str) -> Observation:
    zone = ZoneInfo(zone_name)
    if event.get("DTSTART") is None:
        raise MalformedRecord("the event has no DTSTART")
    start = _instant(event["DTSTART"].dt, zone)
    end = _instant(event["DTEND"].dt, zone) if event.get("DTEND") is not None else None
    if end is None:
        raise MalformedRecord("the event has no DTEND")
    if end <= start:
        raise MalformedRecord(f"the event ends ({iso(end)}) before it starts ({iso(start)})")
    tzid = event["DTSTART"].params.get("TZID")
    try:
        timezone = check_timezone(tzid).key if tzid else zone_name
    except MalformedRecord:
        timezone = zone_name
    text = " ".join(str(event.get(k, "")) for k in ("SUMMARY", "DESCRIPTION"))
    tags = set(find_tags(text))
    tags.update(tag for pattern, tag in _STATUS_WORDS if pattern.search(text))
    status = "booked"
    if str(event.get("STATUS", "")).upper() == "CANCELLED" or tags & {"cancel", "late", "noshow"}:
        status = "noshow" if "noshow" in tags else "cancelled"
    modified = event.get("LAST-MODIFIED")
    return Observation(
        external_id=ext_id,
        etag=None,
        fields={"clinician": clinician, "start": iso(start), "end": iso(end), "timezone": timezone, "status": status},
        tags=frozenset(tags),
        modified_at=iso(modified.dt) if modified is not None and isinstance(modified.dt, datetime) else None,
    )


def feed_observations(text: bytes, clinician: str, zone_name: str, start: datetime, end: datetime) -> list[Observation]:
    """Every session of the feed starting in [start, end); unreadable ones carry a ``problem``."""
    check_record_size(len(text), "the feed", limit=64 << 20)
    try:
        cal = icalendar.Calendar.from_ical(text)
    except ValueError as err:
        raise MalformedRecord(f"the feed is not iCalendar data ({type(err).__name__})") from err
    recurring = {str(c.get("UID")) for c in cal.walk("VEVENT") if c.get("RRULE") is not None or c.get("RDATE") is not None}
    out: list[Observation] = []
    for event in recurring_ical_events.of(cal).between(start, end):
        uid = str(event.get("UID", ""))
        if not uid:
            continue
        ext_id = uid
        if uid in recurring and event.get("RECURRENCE-ID") is not None:
            ext_id = f"{uid}|{iso(_instant(event['RECURRENCE-ID'].dt, ZoneInfo(zone_name)))}"
        try:
            check_record_size(len(event.to_ical()), f"feed event {ext_id}")
            out.append(_observation(event, ext_id, clinician, zone_name))
        except MalformedRecord as err:
            out.append(Observation(external_id=ext_id, problem=str(err)))
    return out
