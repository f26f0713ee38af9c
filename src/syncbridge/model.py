"""The canonical appointment and the vocabulary around it (DESIGN sections 2, 3 and 6).

Appointments travel through the engine as *snapshots*: plain dicts of JSON values keyed by
``FIELDS``. Times are UTC strings (``2026-03-08T15:00:00Z``) so that equality is exact, storage
is cheap and the merge is a pure function over plain data.
"""

from __future__ import annotations

import difflib
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from .errors import MalformedRecord

__all__ = [
    "BILLING",
    "CANCELLED_STATES",
    "FIELDS",
    "Billing",
    "CancelKind",
    "CancelledBy",
    "Fee",
    "Modality",
    "Role",
    "Snapshot",
    "Status",
    "Appointment",
    "canonical_id_for",
    "check_timezone",
    "iso",
    "new_canonical_id",
    "new_tuple",
    "parse_iso",
    "utcnow",
    "validate_snapshot",
]

Snapshot = dict[str, Any]


class Role(StrEnum):
    RECORD = "record"
    CHANNEL = "channel"
    MIRROR = "mirror"


class Status(StrEnum):
    BOOKED = "booked"
    ARRIVED = "arrived"
    FULFILLED = "fulfilled"
    CANCELLED = "cancelled"
    NOSHOW = "noshow"
    ENTERED_IN_ERROR = "entered_in_error"


CANCELLED_STATES = frozenset({Status.CANCELLED, Status.NOSHOW, Status.ENTERED_IN_ERROR})


class CancelledBy(StrEnum):
    CLIENT = "client"
    CLINICIAN = "clinician"
    PRACTICE = "practice"


class CancelKind(StrEnum):
    CANCEL = "cancel"
    LATE_CANCEL = "late_cancel"
    NO_SHOW = "no_show"


class Fee(StrEnum):
    NONE = "none"
    CHARGE = "charge"
    WAIVED = "waived"


class Modality(StrEnum):
    IN_PERSON = "in_person"
    TELEHEALTH = "telehealth"


class Billing(StrEnum):
    """Where the session stands with the payer; the EHR connector moves it forward."""

    PENDING = "pending"  # live session, claim not yet made
    SUPPRESSED = "suppressed"  # cancelled: charges not billable, draft claims cancelled
    FEE_SELF_PAY = "fee_self_pay"  # suppressed, and a self-pay late-cancel/no-show fee exists
    NEEDS_VOID = "needs_void"  # a claim already went out; a person must void it
    NEEDS_ATTENTION = "needs_attention"  # suppression could not be seen complete; a worklist item names what is live
    BILLED = "billed"  # the session happened and was claimed


BILLING = frozenset(Billing)

# Order matters only for display; every snapshot has exactly these keys.
FIELDS: tuple[str, ...] = (
    "clinician",
    "client_key",
    "start",
    "end",
    "timezone",
    "status",
    "cancellation",
    "modality",
    "location",
    "service_code",
    "series_id",
    "billing",
)

_NAMESPACE = uuid.UUID("6f1c1a52-8a59-4d53-9d38-3c1b7c3f4a10")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    """The one textual form of an instant in snapshots: UTC, seconds, trailing Z."""
    if dt.tzinfo is None:
        raise MalformedRecord("a naive datetime has no time zone")
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    dt = datetime.fromisoformat(text)  # reads a trailing Z since Python 3.11
    if dt.tzinfo is None:
        raise MalformedRecord(f"time {text!r} has no offset")
    return dt


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        close = difflib.get_close_matches(str(name), sorted(available_timezones()), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]!r}?" if close else "expected an IANA name such as America/New_York"
        raise MalformedRecord(f"unknown time zone {name!r} ({hint})") from err


def new_canonical_id() -> str:
    return "sb-" + uuid.uuid4().hex


def canonical_id_for(connector: str, external_id: str) -> str:
    """Deterministic id for a record first seen in ``connector``: a lost store rebuilds the same ids."""
    return "sb-" + uuid.uuid5(_NAMESPACE, f"{connector}\x1f{external_id}").hex


_STATUSES = frozenset(s.value for s in Status)
#: zone names already found valid: every change is validated, and the lookup is the costly part
_KNOWN_ZONES: set[str] = set()


def validate_snapshot(snap: Snapshot) -> Snapshot:
    """Refuse a snapshot the rest of the system could not trust; returns it unchanged."""
    for key in ("clinician", "start", "end", "timezone", "status"):
        if not snap.get(key):
            raise MalformedRecord(f"appointment field {key!r} is missing")
    start, end = parse_iso(snap["start"]), parse_iso(snap["end"])
    if end <= start:
        raise MalformedRecord(f"appointment ends ({snap['end']}) before it starts ({snap['start']})")
    zone, status = snap["timezone"], snap["status"]
    if not isinstance(zone, str) or zone not in _KNOWN_ZONES:
        check_timezone(zone)
        _KNOWN_ZONES.add(zone)
    if not isinstance(status, str) or status not in _STATUSES:
        raise MalformedRecord(f"unknown appointment status {snap['status']!r}")
    if snap["status"] in CANCELLED_STATES and not snap.get("cancellation"):
        raise MalformedRecord("a cancelled appointment needs a cancellation record")
    return snap


#: ``tuple.__new__``: builds a named tuple such as ``Appointment`` or ``Link`` from all its values, in
#: field order, without the constructor named tuples get, which is interpreted Python; the engine
#: builds thousands per batch. Defaults do not apply: every value must be given.
new_tuple: Any = tuple.__new__


class Appointment(NamedTuple):
    """A stored canonical appointment: its snapshot plus the bookkeeping around it.

    Immutable; a named tuple rather than a frozen dataclass because every change builds one
    or two, and a named tuple costs a fraction as much to construct.
    """

    id: str
    fields: Snapshot
    version: int
    updated_at: str
    updated_via: str

    @property
    def status(self) -> Status:
        return Status(self.fields["status"])

    @property
    def cancelled(self) -> bool:
        return self.fields["status"] in CANCELLED_STATES

    @property
    def start(self) -> datetime:
        return parse_iso(self.fields["start"])

    @property
    def end(self) -> datetime:
        return parse_iso(self.fields["end"])

    @property
    def local_start(self) -> datetime:
        return self.start.astimezone(ZoneInfo(self.fields["timezone"]))


def empty_snapshot() -> Snapshot:
    snap: Snapshot = dict.fromkeys(FIELDS)
    snap["status"] = Status.BOOKED.value
    snap["modality"] = Modality.IN_PERSON.value
    snap["billing"] = Billing.PENDING.value
    return snap
