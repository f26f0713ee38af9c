"""What a calendar event may say (DESIGN section 10): no PHI by default, chosen per destination.

``standard`` shows the title template and a room or "Telehealth"; ``busy`` (for personal
calendars such as iCloud) shows only the busy title. Nothing else about the session (client,
service code, diagnosis, notes) ever leaves for a calendar. Each write reports which fields it
disclosed so the audit can record them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import PrivacyPolicy
from ..model import Modality, Snapshot

__all__ = ["EventText", "Disclosure", "event_text"]

Disclosure = Literal["standard", "busy"]


@dataclass(frozen=True, slots=True)
class EventText:
    title: str
    location: str | None
    disclosed: tuple[str, ...]


def event_text(snap: Snapshot, policy: PrivacyPolicy, level: Disclosure = "standard") -> EventText:
    if level == "busy":
        return EventText(policy.busy_title, None, ("title:busy",))
    if snap.get("modality") == Modality.TELEHEALTH:
        location: str | None = policy.telehealth_location
    else:
        location = snap.get("location") or None
    disclosed = ("title:template",) + (("location",) if location else ())
    return EventText(policy.title_template, location, disclosed)
