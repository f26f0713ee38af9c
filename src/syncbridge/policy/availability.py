"""Free slots a directory may offer (DESIGN section 7): pure, so every rule is testable alone.

Works in the clinician's local time for working hours (a 09:00 start stays 09:00 across a
daylight-saving change) and in aware instants for everything that can overlap. A slot is offered
when, counting it as one more session, the day still respects every rule: working hours, busy
time, other sessions with their buffers, the daily cap, the run of intensive sessions, and the
minimum notice.

Self-scheduling (``online_services``, ``telehealth_hours``, ``new_client_weekly_cap``): a start is
offered for each online service whose own length fits there, as one slot for new clients (intake
services) and one for existing clients (the others); office and telehealth hours give slots of
their modality, which a directory publishes to its physical or virtual location.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from ..config import AvailabilityRules
from ..connector import Slot
from ..model import Modality

__all__ = ["Session", "day_slots", "slots_digest"]

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Session:
    """A booked (not cancelled) session of the clinician."""

    start: datetime
    end: datetime
    intensive: bool = False
    service_code: str | None = None


def _local(day: date, hhmm: str, zone: ZoneInfo) -> datetime | None:
    """The aware instant of a local wall time; None when the time does not exist that day (spring gap)."""
    h, m = (int(x) for x in hhmm.split(":"))
    if h == 24:
        naive = datetime.combine(day + timedelta(days=1), time(0, 0))
    else:
        naive = datetime.combine(day, time(h, m))
    aware = naive.replace(tzinfo=zone)
    return aware if _exists(aware) else None


def working_spans(day: date, rules: AvailabilityRules, zone: ZoneInfo, hours: dict[str, list[str]] | None = None) -> list[tuple[datetime, datetime]]:
    out = []
    for span in (rules.working_hours if hours is None else hours).get(_WEEKDAYS[day.weekday()], []):
        a, b = span.split("-")
        start, end = _local(day, a, zone), _local(day, b, zone)
        if start is not None and end is not None and start < end:
            out.append((start, end))
    return out


def _spans_by_modality(day: date, rules: AvailabilityRules, zone: ZoneInfo) -> list[tuple[datetime, datetime, str | None]]:
    """Working spans with the modality they are offered as: None (the directory's one location)
    unless telehealth hours are set, then the office hours are in person."""
    if not rules.telehealth_hours:
        return [(a, b, None) for a, b in working_spans(day, rules, zone)]
    return [(a, b, Modality.IN_PERSON.value) for a, b in working_spans(day, rules, zone)] + [
        (a, b, Modality.TELEHEALTH.value) for a, b in working_spans(day, rules, zone, rules.telehealth_hours)]


def _week_intakes(day: date, zone: ZoneInfo, sessions: Iterable[Session], intake: set[str]) -> int:
    """Sessions of an intake service in ``day``'s week (Monday to Sunday, local)."""
    monday = _local(day - timedelta(days=day.weekday()), "00:00", zone)
    sunday = _local(day + timedelta(days=7 - day.weekday()), "00:00", zone)
    assert monday is not None and sunday is not None
    return sum(1 for s in sessions if s.service_code in intake and monday <= s.start < sunday)


def _exists(local: datetime) -> bool:
    """False for a wall time skipped by a spring-forward change (02:30 on that night)."""
    return local.astimezone(UTC).astimezone(local.tzinfo).replace(tzinfo=None) == local.replace(tzinfo=None)


def _overlaps(a0: datetime, a1: datetime, b0: datetime, b1: datetime) -> bool:
    return a0 < b1 and b0 < a1


def _intensive_run(candidate: Session, sessions: Sequence[Session], gap: timedelta) -> int:
    """Length of the run of intensive sessions that ``candidate`` would belong to."""
    ordered = sorted([*sessions, candidate], key=lambda s: s.start)
    i = ordered.index(candidate)
    run = 1
    j = i
    while j > 0 and ordered[j - 1].intensive and ordered[j].start - ordered[j - 1].end <= gap:
        run, j = run + 1, j - 1
    j = i
    while j + 1 < len(ordered) and ordered[j + 1].intensive and ordered[j + 1].start - ordered[j].end <= gap:
        run, j = run + 1, j + 1
    return run


def day_slots(
    day: date,
    zone: ZoneInfo,
    rules: AvailabilityRules,
    sessions: Iterable[Session],
    busy: Iterable[tuple[datetime, datetime]],
    now: datetime,
) -> list[Slot]:
    """Bookable slots on the clinician's local ``day``, in start order. ``sessions`` may cover more
    than the day: the weekly intake cap counts the whole week's."""
    sessions = list(sessions)
    step = timedelta(minutes=rules.granularity_minutes)
    before = timedelta(minutes=rules.buffer_before_minutes)
    after = timedelta(minutes=rules.buffer_after_minutes)
    gap = timedelta(minutes=rules.consecutive_gap_minutes)
    earliest = now + timedelta(hours=rules.minimum_notice_hours)
    day_start, day_end = _local(day, "00:00", zone), _local(day + timedelta(days=1), "00:00", zone)
    assert day_start is not None and day_end is not None
    booked = sorted((s for s in sessions if _overlaps(s.start, s.end, day_start, day_end)), key=lambda s: s.start)
    blocked = [(b0, b1) for b0, b1 in busy if _overlaps(b0, b1, day_start - after, day_end + before)]
    if rules.max_sessions_per_day is not None and len(booked) >= rules.max_sessions_per_day:
        return []
    # (code, minutes, intake): the online services, or the one service of session_minutes
    services = [(c, s.minutes, s.intake) for c, s in rules.online_services.items()] or [(None, rules.session_minutes, False)]
    intake_codes = {c for c, _, intake in services if intake}
    if rules.new_client_weekly_cap is not None and _week_intakes(day, zone, sessions, intake_codes) >= rules.new_client_weekly_cap:
        services = [s for s in services if not s[2]]  # the week's new clients are booked
    intensive_codes = set(rules.intensive_service_codes)
    out: list[Slot] = []
    for span_start, span_end, modality in _spans_by_modality(day, rules, zone):
        start = span_start
        while start < span_end:
            if _exists(start) and start >= earliest:
                fits: dict[bool, list[tuple[str | None, timedelta]]] = {True: [], False: []}
                for code, minutes, intake in services:
                    end = start + timedelta(minutes=minutes)
                    if end > span_end or not _free(start, end, before, after, booked, blocked):
                        continue
                    candidate = Session(start, end, intensive=rules.new_booking_intensive or code in intensive_codes)
                    if (rules.max_consecutive_intensive is None or not candidate.intensive
                            or _intensive_run(candidate, booked, gap) <= rules.max_consecutive_intensive):
                        fits[intake].append((code, end - start))
                for intake, fitting in fits.items():
                    if not fitting:
                        continue
                    codes = tuple(sorted(c for c, _ in fitting if c is not None))
                    clients = (("new" if intake else "existing") if rules.online_services else None)
                    out.append(Slot(start, start + max(length for _, length in fitting), modality, codes, clients))
            # step on the wall clock so slots keep their local times through a DST change
            start = (start.replace(tzinfo=None) + step).replace(tzinfo=zone)
    return sorted(out, key=lambda s: (s.start, s.modality or "", s.clients or ""))


def _free(
    start: datetime, end: datetime, before: timedelta, after: timedelta,
    booked: Sequence[Session], blocked: Sequence[tuple[datetime, datetime]],
) -> bool:
    for s in booked:
        # the new session's buffers must not reach into a session, nor a session's buffers into it
        if _overlaps(start - before, end + after, s.start, s.end) or _overlaps(start, end, s.start - before, s.end + after):
            return False
    return not any(_overlaps(start - before, end + after, b0, b1) for b0, b1 in blocked)


def slots_digest(slots: Sequence[Slot]) -> str:
    """Identifies a day's slot set, so only days whose slots changed are published again."""
    text = ";".join(f"{s.start.astimezone(UTC).isoformat()}/{s.end.astimezone(UTC).isoformat()}" for s in slots)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
