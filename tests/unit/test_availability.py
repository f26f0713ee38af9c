"""Availability rules as a therapist reads them: each rule changes the offered slots as expected."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from syncbridge.config import AvailabilityRules, parse_config
from syncbridge.policy.availability import Session, day_slots, slots_digest

NY = ZoneInfo("America/New_York")
MONDAY = date(2026, 12, 7)
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


def rules(**kw: object) -> AvailabilityRules:
    base: dict[str, object] = {
        "working_hours": {"mon": ["09:00-13:00"], "sun": ["09:00-13:00"]},
        "session_minutes": 50,
        "granularity_minutes": 60,
        "buffer_before_minutes": 0,
        "buffer_after_minutes": 0,
        "max_sessions_per_day": None,
        "max_consecutive_intensive": None,
        "minimum_notice_hours": 0,
    }
    return AvailabilityRules.model_validate(base | kw)


def at(day: date, hh: int, mm: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, tzinfo=NY)


def starts(slots, zone=NY) -> list[str]:  # type: ignore[no-untyped-def]
    return [s.start.astimezone(zone).strftime("%H:%M") for s in slots]


def session(day: date, hh: int, mm: int = 0, minutes: int = 50, intensive: bool = False) -> Session:
    return Session(at(day, hh, mm), at(day, hh, mm) + timedelta(minutes=minutes), intensive)


def test_working_hours_and_grid() -> None:
    slots = day_slots(MONDAY, NY, rules(), [], [], LONG_AGO)
    assert starts(slots) == ["09:00", "10:00", "11:00", "12:00"]
    assert all(s.end - s.start == timedelta(minutes=50) for s in slots)
    assert day_slots(MONDAY + timedelta(days=1), NY, rules(), [], [], LONG_AGO) == []  # Tuesday: not working


def test_a_booked_session_takes_its_slot_and_a_cancellation_frees_it() -> None:
    booked = [session(MONDAY, 10)]
    assert starts(day_slots(MONDAY, NY, rules(), booked, [], LONG_AGO)) == ["09:00", "11:00", "12:00"]
    assert starts(day_slots(MONDAY, NY, rules(), [], [], LONG_AGO)) == ["09:00", "10:00", "11:00", "12:00"]


def test_buffer_after_keeps_time_for_notes() -> None:
    grid = {"granularity_minutes": 15}
    booked = [session(MONDAY, 10)]  # 10:00-10:50
    without = starts(day_slots(MONDAY, NY, rules(**grid), booked, [], LONG_AGO))
    assert "10:00" not in without and "11:00" in without and "09:00" in without
    with_buffer = starts(day_slots(MONDAY, NY, rules(**grid, buffer_after_minutes=15), booked, [], LONG_AGO))
    # a session may not start until 15 min after 10:50, and a new one must end 15 min before 10:00
    assert "11:00" not in with_buffer and "11:15" in with_buffer
    assert "09:00" not in with_buffer and "08:55" not in with_buffer
    assert "09:15" not in with_buffer and with_buffer[0] == "11:15"


def test_buffer_before_protects_preparation_time() -> None:
    grid = {"granularity_minutes": 10}
    booked = [session(MONDAY, 11)]
    plain = starts(day_slots(MONDAY, NY, rules(**grid), booked, [], LONG_AGO))
    assert "10:10" in plain  # 10:10-11:00 touches 11:00 exactly
    buffered = starts(day_slots(MONDAY, NY, rules(**grid, buffer_before_minutes=20), booked, [], LONG_AGO))
    assert "10:10" not in buffered and "09:50" in buffered


def test_daily_cap_closes_the_day() -> None:
    booked = [session(MONDAY, 9), session(MONDAY, 11)]
    assert starts(day_slots(MONDAY, NY, rules(max_sessions_per_day=3), booked, [], LONG_AGO)) == ["10:00", "12:00"]
    assert day_slots(MONDAY, NY, rules(max_sessions_per_day=2), booked, [], LONG_AGO) == []


def test_consecutive_intensive_sessions_are_capped() -> None:
    booked = [session(MONDAY, 9, intensive=True), session(MONDAY, 10, intensive=True)]
    # two intensive sessions back to back; a third right after would make three in a row
    assert starts(day_slots(MONDAY, NY, rules(max_consecutive_intensive=2), booked, [], LONG_AGO)) == ["12:00"]
    assert starts(day_slots(MONDAY, NY, rules(max_consecutive_intensive=3), booked, [], LONG_AGO)) == ["11:00", "12:00"]
    # the same sessions, not intensive (e.g. a medication check): no cap applies
    calm = [session(MONDAY, 9), session(MONDAY, 10)]
    assert starts(day_slots(MONDAY, NY, rules(max_consecutive_intensive=2), calm, [], LONG_AGO)) == ["11:00", "12:00"]
    # when only breaks under 5 minutes count as "in a row", the 10-minute breaks here reset the run
    assert starts(
        day_slots(MONDAY, NY, rules(max_consecutive_intensive=2, consecutive_gap_minutes=5), booked, [], LONG_AGO)
    ) == ["11:00", "12:00"]
    apart = [session(MONDAY, 9, intensive=True), session(MONDAY, 12, intensive=True)]
    assert starts(day_slots(MONDAY, NY, rules(max_consecutive_intensive=2, consecutive_gap_minutes=5), apart, [], LONG_AGO)) == [
        "10:00", "11:00",
    ]


def test_busy_time_and_minimum_notice() -> None:
    busy = [(at(MONDAY, 11, 30), at(MONDAY, 12, 0))]
    assert starts(day_slots(MONDAY, NY, rules(), [], busy, LONG_AGO)) == ["09:00", "10:00", "12:00"]
    now = at(MONDAY, 7, 30)
    assert starts(day_slots(MONDAY, NY, rules(minimum_notice_hours=3), [], [], now)) == ["11:00", "12:00"]


@pytest.mark.parametrize(
    ("day", "offset_before", "offset_after"),
    [(date(2026, 11, 1), -4, -5), (date(2026, 3, 8), -5, -4)],
    ids=["fall-back", "spring-forward"],
)
def test_daylight_saving_day_keeps_local_times(day: date, offset_before: int, offset_after: int) -> None:
    """On the change day (a Sunday here) slots stay at 09:00.. local, with that day's UTC offset."""
    r = rules(working_hours={"sun": ["00:00-04:00", "09:00-11:00"]}, granularity_minutes=60)
    slots = day_slots(day, NY, r, [], [], LONG_AGO)
    local = starts(slots)
    # the night span runs across the change: 01:00 happens twice in autumn (first one offered), 02:00 not at all in spring
    if offset_before == -4:
        assert local == ["00:00", "01:00", "02:00", "03:00", "09:00", "10:00"]
    else:
        assert local == ["00:00", "01:00", "03:00", "09:00", "10:00"]
    nine = slots[local.index("09:00")]
    assert nine.start.utcoffset() == timedelta(hours=offset_after)
    assert nine.start.astimezone(UTC).hour == 9 - offset_after
    assert len({s.start.astimezone(UTC) for s in slots}) == len(slots)  # no slot twice
    assert all(s.end - s.start == timedelta(minutes=50) for s in slots)


def test_digest_changes_only_with_the_slot_set() -> None:
    a = day_slots(MONDAY, NY, rules(), [], [], LONG_AGO)
    b = day_slots(MONDAY, NY, rules(), [], [], LONG_AGO)
    c = day_slots(MONDAY, NY, rules(), [session(MONDAY, 10)], [], LONG_AGO)
    assert slots_digest(a) == slots_digest(b) != slots_digest(c)


def test_rules_are_checked_with_a_clear_message() -> None:
    from syncbridge.errors import ConfigError

    with pytest.raises(ConfigError, match="working_hours.*'9-5' is not a span"):
        parse_config("availability:\n  working_hours:\n    mon: ['9-5']\n")
    with pytest.raises(ConfigError, match="unknown weekday 'funday'"):
        parse_config("availability:\n  working_hours:\n    funday: ['09:00-10:00']\n")
    cfg = parse_config("clinicians:\n  a:\n    availability: {session_minutes: 45}\n")
    assert cfg.availability_of("a").session_minutes == 45
    assert cfg.availability_of("b").session_minutes == 50
