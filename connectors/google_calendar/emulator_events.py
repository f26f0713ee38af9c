"""Event resources of the Google Calendar emulator: validation, recurrence, partial responses.

Pure helpers, no HTTP. Follows the Event resource of
https://developers.google.com/workspace/calendar/api/v3/reference/events (fields, the id
alphabet, ``status``, ``recurrence`` as RFC 5545 lines, instances with ``recurringEventId`` and
``originalStartTime``) and the ``fields`` syntax of partial responses
(https://developers.google.com/workspace/calendar/api/guides/performance#partial-response).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.rrule import rrulestr

__all__ = [
    "Answer",
    "ApiError",
    "EVENT_ID",
    "READ_ONLY",
    "encode",
    "event_times",
    "expand",
    "instance_id",
    "minimal",
    "parse_fields",
    "pick",
    "rfc3339",
    "validate_times",
]

#: events.insert: "characters allowed in the ID are those used in base32hex encoding, i.e. lowercase
#: letters a-v and digits 0-9"; "the length of the ID must be between 5 and 1024 characters"
EVENT_ID = re.compile(r"^[a-v0-9]{5,1024}$")
READ_ONLY = {"kind", "etag", "htmlLink", "created", "updated", "creator", "organizer", "iCalUID", "recurringEventId"}
MAX_INSTANCES = 2500


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """An error answer in Google's JSON format (https://developers.google.com/workspace/calendar/api/guides/errors)."""

    def __init__(self, status: int, reason: str, message: str, *, domain: str = "global", location: str | None = None,
                 location_type: str = "parameter", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        item: dict[str, Any] = {"domain": domain, "reason": reason, "message": message}
        if location:
            item |= {"locationType": location_type, "location": location}
        self.body = {"error": {"errors": [item], "code": status, "message": message}}


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_instant(text: str, what: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "invalid", f"Invalid value for: {what}", location=what) from None
    if dt.tzinfo is None:
        raise ApiError(400, "invalid", f"Invalid value for: {what} (an offset is required)", location=what)
    return dt


def _zone(name: str | None, fallback: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or fallback)
    except (ZoneInfoNotFoundError, ValueError):
        raise ApiError(400, "invalid", f"Invalid time zone definition: {name}") from None


def _when(slot: dict[str, Any] | None, what: str, cal_zone: str) -> datetime:
    if not isinstance(slot, dict) or not (slot.get("dateTime") or slot.get("date")):
        raise ApiError(400, "required", f"Missing {what} time.")
    if slot.get("dateTime"):
        text = str(slot["dateTime"])
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(400, "invalid", f"Invalid {what} time.") from None
        if dt.tzinfo is None:
            if not slot.get("timeZone"):
                raise ApiError(400, "required", f"Missing time zone definition for {what} time.")
            dt = dt.replace(tzinfo=_zone(slot["timeZone"], cal_zone))
        elif slot.get("timeZone"):
            _zone(slot["timeZone"], cal_zone)
        return dt
    try:
        day = date.fromisoformat(str(slot["date"]))
    except ValueError:
        raise ApiError(400, "invalid", f"Invalid {what} date.") from None
    return datetime.combine(day, time(), _zone(None, cal_zone))


def event_times(event: dict[str, Any], cal_zone: str) -> tuple[datetime, datetime]:
    return _when(event.get("start"), "start", cal_zone), _when(event.get("end"), "end", cal_zone)


def validate_times(event: dict[str, Any], cal_zone: str) -> None:
    start, end = event_times(event, cal_zone)
    if end < start or (end == start and "dateTime" in event["start"] and end <= start):
        raise ApiError(400, "timeRangeEmpty", "The specified time range is empty.", domain="calendar", location="end")
    if event.get("recurrence") is not None and not isinstance(event["recurrence"], list):
        raise ApiError(400, "invalid", "Invalid recurrence rule.")


def instance_id(master_id: str, original: datetime, all_day: bool) -> str:
    return f"{master_id}_{original.strftime('%Y%m%d') if all_day else original.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def expand(master: dict[str, Any], lo: datetime, hi: datetime, cal_zone: str) -> list[dict[str, Any]]:
    """The occurrences of a recurring event overlapping [lo, hi), as instance resources."""
    start, end = event_times(master, cal_zone)
    all_day = "date" in master["start"]
    zone = _zone(master["start"].get("timeZone"), cal_zone)
    local = start.astimezone(zone)
    try:
        rules = rrulestr("\n".join(master["recurrence"]), dtstart=local, forceset=True, tzids=lambda name: ZoneInfo(name))
    except (ValueError, TypeError, KeyError):
        raise ApiError(400, "invalid", "Invalid recurrence rule.") from None
    out = []
    duration = end - start
    for occ in rules.between(lo - duration, hi, inc=True):
        if occ + duration <= lo or occ >= hi:
            continue
        inst = {k: v for k, v in master.items() if k not in ("recurrence", "id", "iCalUID")}
        if all_day:
            first, last = occ.date(), (occ + duration).date()
            inst["start"], inst["end"] = {"date": first.isoformat()}, {"date": last.isoformat()}
            inst["originalStartTime"] = {"date": first.isoformat()}
        else:
            tz = master["start"].get("timeZone")
            inst["start"] = {"dateTime": occ.isoformat()} | ({"timeZone": tz} if tz else {})
            inst["end"] = {"dateTime": (occ + duration).isoformat()} | ({"timeZone": master["end"].get("timeZone")} if tz else {})
            inst["originalStartTime"] = dict(inst["start"])
        inst["id"] = instance_id(master["id"], occ, all_day)
        inst["recurringEventId"] = master["id"]
        inst["iCalUID"] = master.get("iCalUID")
        out.append(inst)
        if len(out) >= MAX_INSTANCES:
            break
    return out


def minimal(event: dict[str, Any]) -> dict[str, Any]:
    """A deleted event as lists return it: "Deleted events are only guaranteed to have the id field populated"."""
    keep = ("kind", "etag", "id", "status", "updated", "recurringEventId", "originalStartTime")
    return {k: event[k] for k in keep if k in event}


def encode(body: Any) -> bytes:
    """A JSON answer as the bytes sent (alone, or as a batch part); None and redirects send none."""
    if isinstance(body, bytes):
        return body
    if body is None or isinstance(body, str):
        return b""
    return json.dumps(body, separators=(",", ":")).encode()


def pick(value: Any, tree: dict[str, Any] | None) -> Any:
    """Apply a parsed ``fields`` selection to a response: each named member (with its own
    sub-selection), every member for ``*``; in an array, to each element."""
    if tree is None:
        return value
    if isinstance(value, list):
        return [pick(v, tree) for v in value]
    if isinstance(value, dict):
        return {k: pick(v, tree[k] if k in tree else tree["*"]) for k, v in value.items() if k in tree or "*" in tree}
    return value


def parse_fields(text: str) -> dict[str, Any]:
    """A ``fields`` parameter as a selection tree (None = the whole value), following the syntax of
    https://developers.google.com/workspace/calendar/api/guides/performance#partial-response:
    a comma-separated list (``items,nextSyncToken``), ``a/b`` for a field inside another,
    ``a(b,c)`` for a sub-selection of ``a`` (of each element of an array), ``*`` for every field
    at that level. Anything else answers 400 ``invalidParameter``."""
    pos = 0

    def selectors() -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while True:
            m = re.compile(r"[A-Za-z0-9_*]+(?:/[A-Za-z0-9_*]+)*").match(text, pos)
            if m is None:
                raise ApiError(400, "invalidParameter", "Invalid field selection", location="fields")
            pos = m.end()
            sub: dict[str, Any] | None = None
            if pos < len(text) and text[pos] == "(":
                pos += 1
                sub = selectors()
                if pos >= len(text) or text[pos] != ")":
                    raise ApiError(400, "invalidParameter", "Invalid field selection", location="fields")
                pos += 1
            node = out
            parts = m.group(0).split("/")
            for part in parts[:-1]:  # a/b: b inside a (a member already selected whole stays whole)
                node = {} if part in node and node[part] is None else node.setdefault(part, {})
            if parts[-1] not in node or sub is None:
                node[parts[-1]] = sub
            elif node[parts[-1]] is not None:
                node[parts[-1]] |= sub
            if pos < len(text) and text[pos] == ",":
                pos += 1
                continue
            return out

    tree = selectors()
    if pos != len(text):
        raise ApiError(400, "invalidParameter", "Invalid field selection", location="fields")
    return tree


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def default_horizon(master: dict[str, Any], cal_zone: str) -> tuple[datetime, datetime]:
    """Where an unbounded expansion of ``master`` stops: from its start to two years past today
    (or past its start, for a series that begins later); Google pages on, two years is plenty here."""
    start, _ = event_times(master, cal_zone)
    return start - timedelta(days=1), max(datetime.now(UTC), start) + timedelta(days=731)
