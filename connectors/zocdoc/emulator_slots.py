"""The emulator's calendar-timeslot store (putProviderCalendarTimeslots, getProviderCalendarTimeslots).

"The timeslots are stored in an eventually consistent data store. This means there is a small
possibility that a fetch might not include recently created slots if you fetch timeslots
immediately after inserting them" (Zocdoc OpenAPI v1.176, ``PUT
/v1/providers/{provider_id}/calendar/timeslots``). Here a replacement becomes visible
``delay`` seconds after it was accepted; until then reads show the previous set.

A timeslot is "a bookable appointment start time for a particular provider"
(``CalendarIntegrationTimeslotWeb``): once a patient books it, it is bookable no more, so the
directory withdraws it (:meth:`TimeslotStore.withdraw`, from the sets shown and any still
settling). Nothing in the API or the webhook guide says a cancellation offers a slot again, so
the emulator does not: only the integration's next PUT does (the least a vendor may do).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["TimeslotStore", "slot_problem"]

Key = tuple[str, str]


@dataclass
class TimeslotStore:
    """Slot sets per (provider, local date), replaced whole, visible after a delay."""

    _visible: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)
    _pending: list[tuple[float, Key, list[dict[str, Any]]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def replace(self, provider_id: str, day: date, slots: list[dict[str, Any]], delay: float) -> None:
        with self._lock:
            self._pending.append((time.monotonic() + delay, (provider_id, day.isoformat()), slots))

    def visible(self, provider_id: str, day: date) -> list[dict[str, Any]]:
        """What a GET shows now."""
        with self._lock:
            self._settle()
            return list(self._visible.get((provider_id, day.isoformat()), []))

    def withdraw(self, provider_id: str, start: datetime) -> int:
        """A patient booked at ``start`` (aware): that slot is no longer offered; returns how many went."""
        gone = 0
        with self._lock:
            self._settle()
            for key, slots in [*self._visible.items(), *((p[1], p[2]) for p in self._pending)]:
                if key[0] != provider_id:
                    continue
                keep = [s for s in slots if datetime.fromisoformat(s["start_time"]).replace(tzinfo=ZoneInfo(s["time_zone"])) != start]
                gone += len(slots) - len(keep)
                slots[:] = keep
        return gone

    def settled(self) -> bool:
        with self._lock:
            self._settle()
            return not self._pending

    def _settle(self) -> None:
        now = time.monotonic()
        due = sorted((p for p in self._pending if p[0] <= now), key=lambda p: p[0])
        self._pending = [p for p in self._pending if p[0] > now]
        for _, key, slots in due:
            self._visible[key] = slots

    @staticmethod
    def instants(slots: list[dict[str, Any]]) -> list[datetime]:
        """Local wall time + zone -> aware instants; a repeated wall time reads as its first occurrence."""
        return sorted(datetime.fromisoformat(s["start_time"]).replace(tzinfo=ZoneInfo(s["time_zone"])) for s in slots)


def slot_problem(slot: Any, provider_id: str, day: date) -> str | None:
    """The first validation of ``TimeslotBaseRequest`` that ``slot`` fails (putProviderCalendarTimeslots)."""
    if not isinstance(slot, dict):
        return "each timeslot must be an object"
    for key in ("provider_id", "location_id", "start_time", "time_zone"):
        if not isinstance(slot.get(key), str):
            return f"{key} is required"
    if slot["provider_id"] != provider_id:
        return "slot.provider_id must match the provider_id of the path"
    try:
        local = datetime.fromisoformat(slot["start_time"])
    except ValueError:
        return "slot.start_time must be a local date-time such as 2024-09-15T12:13:00"
    if local.tzinfo is not None:
        return "slot.start_time must be a local date-time without offset"
    if local.date() != day:
        return "the date of slot.start_time must match the date parameter"
    try:
        ZoneInfo(slot["time_zone"])
    except (ZoneInfoNotFoundError, ValueError):
        return "slot.time_zone must be a valid IANA time zone id"
    return None
