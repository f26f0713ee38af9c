"""Double bookings a directory let through: raised for a person, never silently kept or dropped.

Slots overlapping a session are withdrawn within seconds of the booking, but a client may book a
slot in the directory in the moment before (a race no directory API closes). Both sessions are
then real bookings of real clients: syncbridge keeps both and opens one worklist item naming both,
which closes by itself once one of them is cancelled or moved apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from zoneinfo import ZoneInfo

from .config import PracticeConfig
from .model import Appointment, iso
from .tx import Tx

__all__ = ["OVERLAP_PREFIX", "check_overlaps"]

#: worklist key: ``overlap:<appointment>:<appointment>`` (ids in sorted order)
OVERLAP_PREFIX = "overlap:"
#: sessions starting this long before one may still overlap it (no therapy session is longer)
_LONGEST = timedelta(hours=12)


def _overlap(a: Appointment, b: Appointment) -> bool:
    return a.id != b.id and a.start < b.end and b.start < a.end


def _via(tx: Tx, appt_id: str) -> str:
    """The system the session was first booked through."""
    return tx.first_via(appt_id) or "?"


def _describe(tx: Tx, config: PracticeConfig, a: Appointment) -> str:
    local = a.start.astimezone(ZoneInfo(a.fields["timezone"]))
    end = a.end.astimezone(local.tzinfo)
    return f"{local:%a %-d %b %Y %-I:%M}-{end:%-I:%M %p} (appointment {a.id}, booked through {_via(tx, a.id)})"


def check_overlaps(tx: Tx, config: PracticeConfig, appointment_ids: Iterable[str], *, directories: set[str], at: str) -> int:
    """Open an item for each live pair that overlaps where one came through a directory; close the
    items of pairs that no longer do. Returns the items opened."""
    tx.flush()
    opened = 0
    open_pairs = {key: key[len(OVERLAP_PREFIX):].split(":") for key in tx.open_work_keys(OVERLAP_PREFIX)}
    for appt_id in appointment_ids:
        appt = tx.appointment(appt_id)
        for key, ids in open_pairs.items():
            if appt_id not in ids:
                continue
            pair = [tx.appointment(i) for i in ids]
            gone = any(p is None or p.cancelled for p in pair) or not _overlap(pair[0], pair[1])  # type: ignore[arg-type]
            if gone and tx.close_work(key, at, "observed"):
                tx.audit.add(at, "worklist_closed", None, appt_id, {"key": key})
        if appt is None or appt.cancelled:
            continue
        others = tx.store.live_sessions(appt.fields["clinician"], iso(appt.start - _LONGEST), appt.fields["end"])
        for other in others:
            if not _overlap(appt, other):
                continue
            via = [a for a in (appt, other) if directories & set(tx.stored_links(a.id))]
            if not via:
                continue  # two sessions the practice itself put side by side (a group, a co-therapy)
            first, second = sorted((appt, other), key=lambda a: a.id)
            key = f"{OVERLAP_PREFIX}{first.id}:{second.id}"
            clinician = config.clinicians.get(appt.fields["clinician"])
            who = clinician.display_name if clinician and clinician.display_name else appt.fields["clinician"]
            directory = sorted(directories & set(tx.stored_links(via[0].id)))[0]
            text = (f"Double booking: two sessions of {who} overlap: {_describe(tx, config, first)} and {_describe(tx, config, second)}. "
                    f"Both are kept. Agree a new time with one client and move or cancel that session; this item closes by itself.")
            if tx.open_work(key, "double_booking", text, at, directory, via[0].id):
                opened += 1
                tx.audit.add(at, "double_booking", directory, via[0].id, {"with": other.id if via[0] is appt else appt.id})
    return opened
