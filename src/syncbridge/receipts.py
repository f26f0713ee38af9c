"""Whether each system holds an appointment's current version, and how long that took.

A copy holds the current version when the system acknowledged a write of that version or a later
one, when the copy is gone (a cancelled session removed), or when the copy already equals what
the current version asks of that system: a change of what the system does not keep (the EHR
reporting billing suppressed changes nothing a calendar or a directory holds) needs no write there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .connector import Connector, Link
from .model import Appointment, parse_iso
from .store import Store

__all__ = ["Receipt", "holds_current", "receipt"]


def holds_current(link: Link, appt: Appointment, connector: Connector | None) -> bool:
    if link.gone or link.applied_version >= appt.version:
        return True
    return connector is not None and link.base is not None and connector.capabilities.project(appt.fields) == link.base


@dataclass(frozen=True, slots=True)
class Receipt:
    #: systems holding the current version, systems holding a copy
    done: int
    total: int
    #: seconds from the change (a cancellation: when it was made) to the last system's write, once all hold it
    seconds: float | None


def receipt(store: Store, connectors: Mapping[str, Connector], appt: Appointment) -> Receipt:
    links = store.links_for(appt.id)
    stamps = store.applied_stamps(appt.id)
    current = [link for link, _ in links if holds_current(link, appt, connectors.get(link.connector))]
    made = (appt.fields.get("cancellation") or {}).get("at") if appt.cancelled else None
    since = parse_iso(made or appt.updated_at).timestamp()
    landed = [t for link in current if (t := stamps.get(link.connector)) is not None and t >= since - 1]
    seconds = max(landed) - since if landed and len(current) == len(links) else None
    return Receipt(len(current), len(links), seconds)
