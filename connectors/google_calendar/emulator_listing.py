"""Listing in the Google Calendar emulator: filters, sync tokens, recurring expansion. No HTTP.

Follows events.list in https://developers.google.com/workspace/calendar/api/v3/reference/events/list
and https://developers.google.com/workspace/calendar/api/guides/sync (see emulator.py).
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .emulator_events import ApiError, default_horizon, event_times, expand, minimal, parse_instant

__all__ = ["Calendar", "SYNC_FORBIDDEN", "instances", "overlaps", "public", "select", "since_seq", "sync_token"]

SYNC_FORBIDDEN = ("timeMin", "timeMax", "updatedMin", "q", "iCalUID", "orderBy", "privateExtendedProperty", "sharedExtendedProperty")


@dataclass
class Calendar:
    id: str
    owner: str
    time_zone: str
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    seq: int = 0
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))


def public(ev: dict[str, Any]) -> dict[str, Any]:
    """The stored event as the API shows it (internal bookkeeping keys dropped)."""
    return json.loads(json.dumps({k: v for k, v in ev.items() if not k.startswith("_")}))


def select(cal: Calendar, q: dict[str, list[str]], one: dict[str, str]) -> tuple[list[dict[str, Any]], str | None]:
    single = one.get("singleEvents") == "true"
    show_deleted = one.get("showDeleted") == "true"
    if one.get("orderBy") == "startTime" and not single:
        raise ApiError(400, "badRequest", "The requested ordering is not available for the particular query.")
    since: int | None = None
    if "syncToken" in one:
        bad = [p for p in SYNC_FORBIDDEN if p in one]
        if bad or one.get("showDeleted") == "false":
            raise ApiError(400, "invalid", f"Sync token cannot be combined with {(bad or ['showDeleted=false'])[0]}.", location="syncToken")
        since = since_seq(cal, one["syncToken"])
    lo = parse_instant(one["timeMin"], "timeMin") if "timeMin" in one else None
    hi = parse_instant(one["timeMax"], "timeMax") if "timeMax" in one else None
    if lo and hi and hi <= lo:
        raise ApiError(400, "timeRangeEmpty", "The specified time range is empty.", domain="calendar", location="timeMax")
    wanted = [tuple(p.split("=", 1)) for p in q.get("privateExtendedProperty", []) if "=" in p]
    out: list[dict[str, Any]] = []
    for ev in cal.events.values():
        if since is not None and ev["_seq"] <= since:
            continue
        if wanted and any((ev.get("extendedProperties") or {}).get("private", {}).get(k) != v for k, v in wanted):
            continue
        if ev["status"] == "cancelled":
            if since is not None or show_deleted:
                if not (single and ev.get("recurrence")):
                    out.append(minimal(ev))
            continue
        if ev.get("recurringEventId") and single and since is None:
            continue  # exceptions are merged into their series' expansion below
        if ev.get("recurrence") and single:
            dlo, dhi = default_horizon(ev, cal.time_zone)
            exceptions = {e["id"]: e for e in cal.events.values() if e.get("recurringEventId") == ev["id"]}
            for inst in expand(ev, lo or dlo, hi or dhi, cal.time_zone):
                actual = exceptions.get(inst["id"])
                if actual is None:
                    out.append(inst | {"etag": ev["etag"], "updated": ev["updated"]})
                elif actual["status"] != "cancelled" and overlaps(actual, lo, hi, cal):
                    out.append(public(actual))
                elif actual["status"] == "cancelled" and (show_deleted or since is not None):
                    out.append(minimal(actual))
            continue
        if ev.get("recurrence"):
            dlo, dhi = default_horizon(ev, cal.time_zone)
            if (lo or hi) and not expand(ev, lo or dlo, hi or dhi, cal.time_zone):
                continue
        elif not overlaps(ev, lo, hi, cal):
            continue
        out.append(public(ev))
    if one.get("orderBy") == "startTime":
        out.sort(key=lambda e: event_times(e, cal.time_zone)[0] if "start" in e else datetime.min.replace(tzinfo=UTC))
    elif one.get("orderBy") == "updated":
        out.sort(key=lambda e: e.get("updated", ""))
    return out, sync_token(cal)

def overlaps(ev: dict[str, Any], lo: datetime | None, hi: datetime | None, cal: Calendar) -> bool:
    start, end = event_times(ev, cal.time_zone)
    return (lo is None or end > lo) and (hi is None or start < hi)

def sync_token(cal: Calendar) -> str:
    raw = json.dumps([cal.id, cal.epoch, cal.seq]).encode()
    return base64.urlsafe_b64encode(raw).decode()

def since_seq(cal: Calendar, token: str) -> int:
    try:
        cal_id, epoch, seq = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError):
        cal_id, epoch, seq = None, None, 0
    if cal_id != cal.id or epoch != cal.epoch or not isinstance(seq, int):
        raise ApiError(410, "fullSyncRequired", "Sync token is no longer valid, a full sync is required.", domain="calendar")
    return seq

def instances(cal: Calendar, master: dict[str, Any], one: dict[str, str]) -> dict[str, Any]:
    if not master.get("recurrence") or master["status"] == "cancelled":
        raise ApiError(404, "notFound", "Not Found")
    dlo, dhi = default_horizon(master, cal.time_zone)
    lo = parse_instant(one["timeMin"], "timeMin") if "timeMin" in one else dlo
    hi = parse_instant(one["timeMax"], "timeMax") if "timeMax" in one else dhi
    items = []
    for inst in expand(master, lo, hi, cal.time_zone):
        actual = cal.events.get(inst["id"])
        if actual is None:
            items.append(inst | {"etag": master["etag"], "updated": master["updated"]})
        elif actual["status"] != "cancelled" or one.get("showDeleted") == "true":
            items.append(public(actual) if actual["status"] != "cancelled" else minimal(actual))
    return {"kind": "calendar#events", "summary": cal.id, "timeZone": cal.time_zone, "items": items}
