"""Canonical appointment <-> iCalendar VEVENT (RFC 5545), as pure functions without I/O.

An event we write carries only what :func:`syncbridge.policy.privacy.event_text` allows in its
visible text, plus hidden ``X-SYNCBRIDGE-*`` properties with the canonical id and the values a
calendar user cannot change (modality, location), so reading an untouched event back yields
exactly the projection that was written. Events that are not ours are the clinician's private
life: they are only ever reduced to busy intervals here, and their text goes nowhere.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import recurring_ical_events
from icalendar.parser.property import unescape_backslash

from syncbridge.connector import SessionEvent
from syncbridge.errors import MalformedRecord
from syncbridge.model import Modality, Snapshot, check_timezone, iso, parse_iso
from syncbridge.policy.cancellation import find_tags
from syncbridge.policy.privacy import EventText

__all__ = [
    "PRODID",
    "X_ID",
    "X_LOCATION",
    "X_MODALITY",
        "busy_intervals",
    "canonical_id_of",
    "parse_calendar",
    "read_event",
    "render",
    "resource_name",
    "uid_for",
]

PRODID = "-//syncbridge//CalDAV connector//EN"
UID_SUFFIX = "@syncbridge"
X_ID = "X-SYNCBRIDGE-ID"
X_MODALITY = "X-SYNCBRIDGE-MODALITY"
X_LOCATION = "X-SYNCBRIDGE-LOCATION"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
_NAMESPACE = uuid.UUID("1c9b6a3e-3f5e-4c1e-9f7a-2b8f7d0c6a51")
#: SEQUENCE grows with wall-clock seconds so each of our rewrites outranks the last (RFC 5545 3.8.7.4)
_SEQUENCE_EPOCH = 1_700_000_000


def uid_for(appointment_id: str) -> str:
    """The event UID: derived from the canonical id, so a retried create finds its first attempt."""
    return appointment_id + UID_SUFFIX


def resource_name(appointment_id: str) -> str:
    """The resource name (last path segment) of an appointment's event, stable and URL-safe."""
    if _SAFE_NAME.match(appointment_id):
        return f"syncbridge-{appointment_id}.ics"
    return f"syncbridge-{uuid.uuid5(_NAMESPACE, appointment_id).hex}.ics"


def _text(component: icalendar.cal.Component, name: str) -> str | None:
    """A TEXT value; X- properties arrive raw, so their RFC 5545 escapes are undone here."""
    value = component.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, icalendar.vText):
        return str(value)
    return str(unescape_backslash(str(value)))


def render(appointment_id: str, desired: Snapshot, text: EventText, *, now: datetime, include_location: bool = True) -> bytes:
    """The iCalendar object for ``desired``: one VEVENT, DTSTART/DTEND with the appointment's
    IANA TZID and a matching VTIMEZONE (RFC 5545 section 3.6.5), nothing about the client."""
    zone = ZoneInfo(desired["timezone"])
    start = parse_iso(desired["start"]).astimezone(zone)
    end = parse_iso(desired["end"]).astimezone(zone)
    cancelled = desired.get("status") == "cancelled"
    stamp = now.astimezone(UTC).replace(microsecond=0)

    event = icalendar.Event()
    event.add("uid", uid_for(appointment_id))
    event.add("dtstamp", stamp)
    event.add("last-modified", stamp)
    event.add("sequence", max(0, int(stamp.timestamp()) - _SEQUENCE_EPOCH))
    event.add("dtstart", start)
    event.add("dtend", end)
    event.add("summary", text.title)
    if text.location:
        event.add("location", text.location)
    event.add("status", "CANCELLED" if cancelled else "CONFIRMED")
    event.add("transp", "TRANSPARENT" if cancelled else "OPAQUE")
    event.add(X_ID, icalendar.vText(appointment_id))
    if desired.get("modality"):
        event.add(X_MODALITY, icalendar.vText(desired["modality"]))
    if include_location and desired.get("location"):
        event.add(X_LOCATION, icalendar.vText(desired["location"]))

    cal = icalendar.Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add_component(event)
    cal.add_missing_timezones(first_date=date(start.year - 1, 1, 1), last_date=date(end.year + 2, 1, 1))
    return bytes(cal.to_ical())


def parse_calendar(data: str) -> icalendar.Calendar:
    """Parse an iCalendar object; a syntax error is a MalformedRecord (never echoing the text)."""
    try:
        cal = icalendar.Calendar.from_ical(data)
    except (ValueError, KeyError, IndexError) as err:
        raise MalformedRecord(f"the calendar data cannot be parsed ({type(err).__name__})") from err
    if not isinstance(cal, icalendar.Calendar):
        raise MalformedRecord("the calendar data holds no VCALENDAR")
    return cal


def _masters(cal: icalendar.Calendar) -> list[icalendar.cal.Component]:
    """The VEVENTs that are not overrides of one occurrence (RFC 5545 section 3.8.4.4)."""
    return [c for c in cal.walk("VEVENT") if "RECURRENCE-ID" not in c]


def canonical_id_of(cal: icalendar.Calendar) -> str | None:
    """The canonical id if the object is one of our events, else None (the clinician's own).

    Ours means the UID is ``<id>@syncbridge`` and ``X-SYNCBRIDGE-ID``, when present, agrees: an
    event a user duplicated keeps the X- property but gets a new UID, and stays theirs; an app
    that drops unknown X- properties on edit does not make us lose the session.
    """
    for event in _masters(cal):
        uid = str(event.get("UID") or "")
        if not uid.endswith(UID_SUFFIX) or len(uid) == len(UID_SUFFIX):
            continue
        cid = uid[: -len(UID_SUFFIX)]
        marked = _text(event, X_ID)
        if marked is None or marked == cid:
            return cid
    return None


def _instant(prop: Any, zone: ZoneInfo, what: str) -> datetime:
    """An aware datetime for DTSTART/DTEND; dates and floating times are read in ``zone``."""
    value = prop.dt
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value
        tzid = prop.params.get("TZID")
        if tzid:
            raise MalformedRecord(f"{what} uses time zone {tzid!r}, which is neither an IANA name nor defined in the event")
        return value.replace(tzinfo=zone)
    if isinstance(value, date):
        return datetime.combine(value, time(), zone)
    raise MalformedRecord(f"{what} is not a date or date-time")


def _zone_name(prop: Any) -> str | None:
    tzid = prop.params.get("TZID")
    if not tzid:
        return None
    try:
        check_timezone(str(tzid))
    except MalformedRecord:
        return None
    return str(tzid)


def read_event(cal: icalendar.Calendar, *, clinician: str, clinician_zone: str) -> SessionEvent | None:
    """Our event as canonical fields, or None when the object is not ours.

    ``timezone`` is the DTSTART TZID when it is an IANA name, else the clinician's zone; times
    without a zone (floating, all-day) are read in the clinician's zone. Raises MalformedRecord
    for an event without DTSTART, with an unresolvable TZID, or ending before it starts.
    """
    cid = canonical_id_of(cal)
    if cid is None:
        return None
    event = next(e for e in _masters(cal) if str(e.get("UID")) == uid_for(cid))
    zone = ZoneInfo(clinician_zone)
    if event.get("DTSTART") is None:
        raise MalformedRecord("the event has no DTSTART")
    dtstart: Any = event["DTSTART"]
    duration: Any = event.get("DURATION")
    start = _instant(dtstart, zone, "DTSTART")
    if event.get("DTEND") is not None:
        end = _instant(event["DTEND"], zone, "DTEND")
    elif duration is not None:
        end = start + duration.dt
    elif not isinstance(dtstart.dt, datetime):
        end = start + timedelta(days=1)
    else:
        raise MalformedRecord("the event has neither DTEND nor DURATION")
    if end <= start:
        raise MalformedRecord(f"the event ends ({iso(end)}) before it starts ({iso(start)})")
    modality = _text(event, X_MODALITY)
    fields: Snapshot = {
        "clinician": clinician,
        "start": iso(start),
        "end": iso(end),
        "timezone": _zone_name(event["DTSTART"]) or clinician_zone,
        "status": "cancelled" if str(event.get("STATUS", "")).upper() == "CANCELLED" else "booked",
        "modality": modality if modality in {m.value for m in Modality} else None,
        "location": _text(event, X_LOCATION),
    }
    modified = event.get("LAST-MODIFIED")
    modified_at = iso(modified.dt) if modified is not None and isinstance(modified.dt, datetime) and modified.dt.tzinfo else None
    tags = find_tags(_text(event, "SUMMARY"), _text(event, "DESCRIPTION"))
    return SessionEvent(cid, fields, tags, modified_at)


def busy_intervals(cal: icalendar.Calendar, start: datetime, end: datetime, clinician_zone: str) -> list[tuple[datetime, datetime]]:
    """Busy time of one of the clinician's own calendar objects over [start, end).

    Recurrences are expanded client-side (RRULE, RDATE, EXDATE, RECURRENCE-ID overrides) by
    recurring_ical_events; all-day and floating events are placed in the clinician's zone;
    TRANSP:TRANSPARENT and STATUS:CANCELLED occurrences are free (RFC 5545 sections 3.8.2.7 and
    3.8.1.11). Our own events yield nothing: they are appointments, not busy time.
    """
    if canonical_id_of(cal) is not None:
        return []
    zone = ZoneInfo(clinician_zone)
    out: list[tuple[datetime, datetime]] = []
    try:
        occurrences = recurring_ical_events.of(cal, skip_bad_series=True).between(start, end)
    except Exception as err:  # the library raises assorted errors on broken series
        raise MalformedRecord(f"a recurring event cannot be expanded ({type(err).__name__})") from err
    for occ in occurrences:
        if str(occ.get("TRANSP", "OPAQUE")).upper() == "TRANSPARENT":
            continue
        if str(occ.get("STATUS", "")).upper() == "CANCELLED":
            continue
        if occ.get("DTSTART") is None:
            continue
        s = _instant(occ["DTSTART"], zone, "DTSTART")
        e = _instant(occ["DTEND"], zone, "DTEND") if occ.get("DTEND") is not None else s
        if e > s and e > start and s < end:
            out.append((s, e))
    return out
