"""Zocdoc appointment records <-> canonical field space, and published slots -> timeslot bodies.

Pure functions, no I/O. Field names follow the Zocdoc OpenAPI bundle (``openapi.yml``, v1.176):
``AppointmentStatusResponseData`` for what is read, ``CancellationReasonType`` for why a session
was cancelled, ``TimeslotBaseRequest`` for what is published. Zocdoc holds no end time (a visit
reason fixes the duration), so the end is derived from the configured session length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from syncbridge.connector import Slot
from syncbridge.errors import MalformedRecord, PermanentError
from syncbridge.model import CancelKind, CancelledBy, Modality, Snapshot, Status, iso, parse_iso

__all__ = [
    "LIVE_STATUSES",
    "REASON_BY",
    "STATUS_IN",
    "ZocdocRecord",
    "etag_of",
    "local_start",
    "read_record",
    "timeslot_bodies",
]

#: Zocdoc ``AppointmentStatus`` -> canonical status; ``booking_failed`` means it never came to be
STATUS_IN: Mapping[str, Status] = {
    "pending_booking": Status.BOOKED,
    "confirmed": Status.BOOKED,
    "pending_reschedule": Status.BOOKED,
    "rescheduled": Status.BOOKED,
    "reschedule_failed": Status.BOOKED,  # the old time still stands
    "cancelled": Status.CANCELLED,
    "no_show": Status.NOSHOW,
    "booking_failed": Status.CANCELLED,
}
#: statuses from which ``POST /v1/appointments/cancel`` and ``/reschedule`` are accepted
LIVE_STATUSES = frozenset({"pending_booking", "confirmed", "pending_reschedule", "rescheduled", "reschedule_failed"})

#: ``CancellationReasonType`` -> who cancelled; the inverse of ``policy.cancellation.zocdoc_reason``
REASON_BY: Mapping[str, CancelledBy] = {
    "patient_no_longer_needs_appointment": CancelledBy.CLIENT,
    "patient_no_longer_available": CancelledBy.CLIENT,
    "other_patient_reason": CancelledBy.CLIENT,
    "rescheduling_patient": CancelledBy.CLIENT,
    "provider_not_available": CancelledBy.CLINICIAN,
    "other_provider_reason": CancelledBy.PRACTICE,
    "missing_needed_patient_information": CancelledBy.PRACTICE,
    "payment_or_insurance_issue": CancelledBy.PRACTICE,
    "patient_or_visit_type_not_accepted": CancelledBy.PRACTICE,
}

_VIDEO = frozenset({"zocdoc_video_service", "third_party_video_service"})


@dataclass(frozen=True, slots=True)
class ZocdocRecord:
    """One appointment as the engine sees it."""

    fields: Snapshot
    cancellation: dict[str, Any] | None
    tags: frozenset[str]
    #: ``booking_failed``: the booking never existed, so it is reported as gone
    failed: bool


def etag_of(data: Mapping[str, Any]) -> str:
    """A version tag that changes with anything syncbridge reads (Zocdoc sends no ETag header)."""
    parts = [str(data.get(k)) for k in ("last_modified_time_utc", "appointment_status", "start_time", "provider_location_id")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def provider_of(provider_location_id: str) -> str:
    """``pr_x|lo_y`` -> ``pr_x`` (the provider-location id pairs a provider with a location)."""
    return provider_location_id.split("|", 1)[0]


def read_record(
    data: Mapping[str, Any],
    *,
    clinician: str,
    zone: str,
    minutes: int,
    service_code: str | None = None,
) -> ZocdocRecord:
    """Map one ``AppointmentStatusResponseData``; raises MalformedRecord naming what is wrong."""
    status_text = str(data.get("appointment_status"))
    if status_text not in STATUS_IN:
        raise MalformedRecord(f"unknown Zocdoc appointment_status {status_text!r}")
    raw_start = data.get("start_time")
    if not isinstance(raw_start, str):
        raise MalformedRecord("Zocdoc appointment has no start_time")
    try:
        start = parse_iso(raw_start)
    except ValueError as err:
        raise MalformedRecord(f"Zocdoc start_time {raw_start!r} is not an ISO-8601 time with offset") from err
    status = STATUS_IN[status_text]
    fields: Snapshot = {
        "clinician": clinician,
        "start": iso(start),
        "end": iso(start + timedelta(minutes=minutes)),
        "timezone": zone,
        "status": status.value,
        "cancellation": None,  # the full record is made by the policy from ``cancellation`` below
        "modality": (Modality.TELEHEALTH if data.get("visit_type") in _VIDEO else Modality.IN_PERSON).value,
        # an opaque key; the patient's identity stays in Zocdoc and the EHR
        "client_key": f"zocdoc:{data.get('developer_patient_id') or data.get('appointment_id')}",
    }
    if service_code:
        fields["service_code"] = service_code
    cancellation: dict[str, Any] | None = None
    tags: frozenset[str] = frozenset()
    if status_text == "no_show":
        cancellation = {"by": CancelledBy.CLIENT.value, "kind": CancelKind.NO_SHOW.value}
        tags = frozenset({"noshow"})
    elif status_text == "cancelled":
        reason_type = data.get("cancellation_reason_type")
        by = REASON_BY.get(reason_type) if isinstance(reason_type, str) else None
        reason = data.get("cancellation_reason")
        cancellation = {"by": by.value if by else None, "reason": reason if isinstance(reason, str) else None}
        tags = frozenset({"clinician"}) if by == CancelledBy.CLINICIAN else frozenset()
    elif status_text == "booking_failed":
        cancellation = {"by": CancelledBy.PRACTICE.value, "reason": "booking failed in Zocdoc"}
    return ZocdocRecord(fields, cancellation, tags, failed=status_text == "booking_failed")


def local_start(start: datetime, zone: str) -> str:
    """An aware instant as the offset time Zocdoc's reschedule endpoint expects, in the provider's zone."""
    return start.astimezone(ZoneInfo(zone)).isoformat(timespec="seconds")


def _ambiguous(local: datetime) -> bool:
    return local.replace(fold=0).utcoffset() != local.replace(fold=1).utcoffset()


def timeslot_bodies(
    slots: Sequence[Slot],
    day: date,
    *,
    zone: str,
    provider_id: str,
    place: Callable[[Slot], dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[Slot]]:
    """``TimeslotBaseRequest`` objects for one local day, and the slots that cannot be expressed.
    ``place`` gives each slot's ``location_id`` and, where set, ``allowed_visit_reason_ids`` and
    ``patient_type``.

    A timeslot is a local wall time plus an IANA zone, with no offset. On the autumn change a
    wall time between 1 and 2 a.m. happens twice; Zocdoc (like java.time) reads it as the first
    occurrence, so a slot in the repeated hour cannot be offered and is returned as skipped.
    """
    tz = ZoneInfo(zone)
    bodies: list[dict[str, Any]] = []
    skipped: list[Slot] = []
    seen: set[tuple[str, str, str]] = set()
    for slot in sorted(slots, key=lambda s: s.start):
        if slot.start.tzinfo is None:
            raise PermanentError("a slot to publish has a naive start time")
        local = slot.start.astimezone(tz)
        if local.date() != day:
            raise PermanentError(f"slot at {iso(slot.start)} is on {local.date()} in {zone}, not on {day}")
        if _ambiguous(local) and local.fold == 1:
            skipped.append(slot)
            continue
        wall = local.replace(tzinfo=None).isoformat(timespec="seconds")
        where = place(slot)
        key = (wall, str(where["location_id"]), str(where.get("patient_type")))
        if key in seen:
            continue
        seen.add(key)
        bodies.append({"provider_id": provider_id, "start_time": wall, "time_zone": zone} | where)
    return bodies, skipped
