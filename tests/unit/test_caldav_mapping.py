"""Appointment <-> VEVENT mapping of the CalDAV connector: privacy, identity, round trip, bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import icalendar
import pytest

from syncbridge.config import PrivacyPolicy
from syncbridge.errors import MalformedRecord
from syncbridge.model import empty_snapshot, iso
from syncbridge.policy.privacy import Disclosure, event_text
from syncbridge_connectors.caldav.mapping import (
    X_ID,
    canonical_id_of,
    parse_calendar,
    read_event,
    render,
    resource_name,
    uid_for,
)

ZONE = "America/New_York"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
START = datetime(2026, 3, 9, 14, 0, tzinfo=UTC)  # 10:00 in New York, the day after DST starts
FIELDS = ("clinician", "start", "end", "timezone", "status", "modality", "location")
APPT = "sb-0123456789abcdef0123456789abcdef"


def desired(**over: object) -> dict:
    snap = empty_snapshot() | {
        "clinician": "dr_rivera", "client_key": "client-jane-doe", "service_code": "90837",
        "start": iso(START), "end": iso(START + timedelta(minutes=50)), "timezone": ZONE, "location": "Room 2",
    }  # fmt: skip
    return {k: v for k, v in (snap | over).items() if k in FIELDS}


def ics(snap: dict, level: Disclosure = "standard", **kw: bool) -> str:
    return render(APPT, snap, event_text(snap, PrivacyPolicy(), level), now=NOW, **kw).decode()


def observe(text: str, zone: str = ZONE):
    return read_event(parse_calendar(text), clinician="dr_rivera", clinician_zone=zone)


def foreign(vevent_lines: str) -> str:
    return f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//x//x//EN\r\nBEGIN:VEVENT\r\n{vevent_lines}END:VEVENT\r\nEND:VCALENDAR\r\n"


def edited(text: str, **props: object) -> str:
    cal = icalendar.Calendar.from_ical(text)
    event = cal.walk("VEVENT")[0]
    for name, value in props.items():
        event.pop(name.replace("_", "-"), None)
        if value is not None:
            event.add(name.replace("_", "-"), value)
    return cal.to_ical().decode()


def test_untouched_event_reads_back_as_written() -> None:
    """An event nobody touched is recognised as unchanged, so syncbridge never rewrites it."""
    for snap in (desired(), desired(modality="telehealth", location=None), desired(location="Room 2, Floor 3; East \\ wing")):
        obs = observe(ics(snap))
        assert obs is not None and obs.canonical_id == APPT
        assert obs.fields == snap
        assert obs.tags == frozenset() and obs.modified_at == iso(NOW)


def test_event_text_carries_no_phi() -> None:
    """The clinician's calendar shows "Client session" and the room; no client, code or notes."""
    text = ics(desired())
    event = parse_calendar(text).walk("VEVENT")[0]
    assert str(event["SUMMARY"]) == "Client session" and str(event["LOCATION"]) == "Room 2"
    assert "DESCRIPTION" not in event and "ATTENDEE" not in event
    assert "client-jane-doe" not in text and "90837" not in text
    assert str(event[X_ID]) == APPT


def test_busy_level_shows_only_busy() -> None:
    """On a personal calendar ("busy") the event says Busy and holds no location, visible or hidden."""
    text = ics(desired(), "busy", include_location=False)
    event = parse_calendar(text).walk("VEVENT")[0]
    assert str(event["SUMMARY"]) == "Busy" and "LOCATION" not in event and "Room 2" not in text


def test_telehealth_shows_telehealth() -> None:
    """A telehealth session's event says "Telehealth" where a room would be."""
    event = parse_calendar(ics(desired(modality="telehealth", location=None))).walk("VEVENT")[0]
    assert str(event["LOCATION"]) == "Telehealth"


def test_uid_and_resource_name_are_deterministic() -> None:
    """A create sent twice targets the same resource with the same UID, so it cannot duplicate."""
    first, second = ics(desired()), render(APPT, desired(), event_text(desired(), PrivacyPolicy()), now=NOW + timedelta(hours=1)).decode()
    uid = lambda t: str(parse_calendar(t).walk("VEVENT")[0]["UID"])  # noqa: E731
    assert uid(first) == uid(second) == uid_for(APPT) == APPT + "@syncbridge"
    assert resource_name(APPT) == resource_name(APPT) == f"syncbridge-{APPT}.ics"
    assert resource_name("odd id/with?chars").startswith("syncbridge-") and "/" not in resource_name("odd id/with?chars")


def test_times_carry_the_appointment_zone() -> None:
    """The event sits at 10:00 New York time with a TZID, so calendar apps show the right hour."""
    cal = parse_calendar(ics(desired()))
    start = cal.walk("VEVENT")[0]["DTSTART"]
    assert start.params["TZID"] == ZONE and start.dt == datetime(2026, 3, 9, 10, 0, tzinfo=start.dt.tzinfo)
    assert [tz["TZID"] for tz in cal.walk("VTIMEZONE")] == [ZONE]


def test_tags_are_found_in_title_and_description() -> None:
    """Typing #late or #crisis in the event's title or notes is understood; the words are not kept."""
    text = edited(ics(desired()), summary="Client session #late", description="called in sick #Crisis #waive")
    obs = observe(text)
    assert obs is not None and obs.tags == {"late", "crisis", "waive"}
    assert "called in sick" not in repr(obs)


def test_cancelled_status_reads_as_cancelled() -> None:
    """An event marked cancelled in the calendar reads as a cancelled session."""
    obs = observe(ics(desired(status="cancelled")))
    assert obs is not None and obs.fields["status"] == "cancelled"


def test_move_in_another_zone_keeps_the_instant() -> None:
    """An app that rewrites the event in UTC or a Windows zone name moves nothing by accident."""
    utc = edited(ics(desired()), dtstart=START, dtend=START + timedelta(minutes=50))
    obs = observe(utc, zone="America/Chicago")
    assert obs is not None and obs.fields["start"] == iso(START) and obs.fields["timezone"] == "America/Chicago"
    windows = ics(desired()).replace("TZID=America/New_York", "TZID=Eastern Standard Time").replace(
        "TZID:America/New_York", "TZID:Eastern Standard Time"
    )
    obs = observe(windows)
    assert obs is not None and obs.fields["start"] == iso(START) and obs.fields["timezone"] == ZONE


def test_private_and_copied_events_are_not_sessions() -> None:
    """The clinician's own events, and copies they made of a session, never count as sessions."""
    private = foreign(
        "UID:ABC-123\r\nDTSTAMP:20260101T000000Z\r\nDTSTART:20260309T140000Z\r\nDTEND:20260309T150000Z\r\nSUMMARY:Dentist\r\n"
    )
    assert observe(private) is None
    copied = edited(ics(desired()), uid="COPY-OF-SESSION")
    assert observe(copied) is None and canonical_id_of(parse_calendar(copied)) is None


def test_event_stripped_of_x_properties_is_still_ours() -> None:
    """An app that drops unknown properties on edit does not make syncbridge lose the session."""
    stripped = edited(ics(desired()), x_syncbridge_id=None, x_syncbridge_modality=None, x_syncbridge_location=None)
    obs = observe(stripped)
    assert obs is not None and obs.canonical_id == APPT and obs.fields["modality"] is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtstart": None}, "no DTSTART"),
        ({"dtend": START - timedelta(hours=1)}, "before it starts"),
        ({"dtend": None}, "neither DTEND nor DURATION"),
    ],
)
def test_malformed_event_is_rejected_clearly(change: dict, message: str) -> None:
    """A broken event is reported as unreadable with a reason, never crashing the sync."""
    with pytest.raises(MalformedRecord, match=message):
        observe(edited(ics(desired()), **change))


def test_unknown_time_zone_is_rejected_clearly() -> None:
    """An event in a zone nobody defined is reported as unreadable, naming the zone, not guessed."""
    text = ics(desired()).replace("TZID=America/New_York", "TZID=Mars/Olympus_Mons")
    with pytest.raises(MalformedRecord, match="Mars/Olympus_Mons"):
        observe(text)


def test_garbage_is_rejected_without_echoing_it() -> None:
    """Data that is not iCalendar is rejected, and the error does not repeat its content."""
    with pytest.raises(MalformedRecord) as caught:
        parse_calendar("BEGIN:VCALENDAR\r\nSUMMARY:secret diagnosis\r\n")
    assert "secret" not in str(caught.value)
