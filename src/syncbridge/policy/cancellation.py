"""Turning "this session is off" into the canonical cancellation record (DESIGN section 6).

Calendar users express what a calendar UI cannot with tags in the event title or description
(``#late #waive``); a plain delete is a cancel with the practice default. The record and the
channel report who and why themselves; the policy fills in the fee.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from ..config import CancellationPolicy
from ..model import CancelKind, CancelledBy, Fee, Status, iso

__all__ = [
    "CANCELLING_TAGS",
    "FHIR_REASON_SYSTEM",
    "TAGS",
    "decide",
    "fhir_reason",
    "find_tags",
    "zocdoc_reason",
]

TAGS = frozenset({"cancel", "late", "noshow", "waive", "crisis", "clinician"})
#: tags that, found in a live event, mean the session is off
CANCELLING_TAGS = frozenset({"cancel", "late", "noshow"})
_TAG_RE = re.compile(r"(?<![\w#])#(cancel(?:led)?|late|no-?show|waive|crisis|clinician)\b", re.IGNORECASE)
_ALIASES = {"cancelled": "cancel", "no-show": "noshow"}


def find_tags(*texts: str | None) -> frozenset[str]:
    """Reason tags in event text; the text itself is dropped right after this call."""
    found: set[str] = set()
    for text in texts:
        if text:
            for m in _TAG_RE.finditer(text):
                tag = m.group(1).lower()
                found.add(_ALIASES.get(tag, tag))
    return frozenset(found)


def decide(
    policy: CancellationPolicy,
    *,
    start: datetime,
    now: datetime,
    via: str,
    tags: frozenset[str] = frozenset(),
    by: str | None = None,
    kind: str | None = None,
    reason: str | None = None,
    clinical: bool | None = None,
    fee: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The (status, cancellation record) for a session that is off.

    Explicit values (from an EHR, a directory or the CLI) win over tags; tags win over policy.
    A client's cancel inside the late-cancel window becomes ``late_cancel``.
    """
    who = by or (CancelledBy.CLINICIAN if "clinician" in tags else policy.default_cancelled_by)
    if kind is None:
        if "noshow" in tags:
            kind = CancelKind.NO_SHOW
        elif "late" in tags:
            kind = CancelKind.LATE_CANCEL
        else:
            kind = CancelKind.CANCEL
    late_window = timedelta(hours=policy.late_cancel_window_hours)
    if kind == CancelKind.CANCEL and who == CancelledBy.CLIENT and start - now < late_window:
        kind = CancelKind.LATE_CANCEL
    is_clinical = bool(clinical) or "crisis" in tags
    if fee is None:
        chargeable = who == CancelledBy.CLIENT and (
            (kind == CancelKind.LATE_CANCEL and policy.late_cancel_fee)
            or (kind == CancelKind.NO_SHOW and policy.no_show_fee)
        )
        if not chargeable:
            fee = Fee.NONE
        elif "waive" in tags or (is_clinical and policy.clinical_waives_fee):
            fee = Fee.WAIVED
        else:
            fee = Fee.CHARGE
    status = Status.NOSHOW if kind == CancelKind.NO_SHOW else Status.CANCELLED
    record = {
        "by": str(who),
        "kind": str(kind),
        "fee": str(fee),
        "clinical": is_clinical,
        "reason": reason,
        "at": iso(now),
        "via": via,
    }
    return str(status), record


FHIR_REASON_SYSTEM = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"

# (cancelled by, clinical) -> code of the HL7 appointment-cancellation-reason code system
_FHIR_REASONS = {
    ("client", False): "pat",
    ("client", True): "pat",
    ("clinician", False): "prov",
    ("clinician", True): "prov-pers",
    ("practice", False): "oth",
    ("practice", True): "oth",
}


def fhir_reason(cancellation: dict[str, Any]) -> str:
    """The FHIR ``Appointment.cancelationReason`` code for a cancellation record."""
    return _FHIR_REASONS.get((cancellation.get("by", "practice"), bool(cancellation.get("clinical"))), "oth")


def zocdoc_reason(cancellation: dict[str, Any]) -> str:
    """Zocdoc's ``cancellation_reason_type`` (openapi CancellationReasonType) for a record."""
    by = cancellation.get("by")
    if by == CancelledBy.CLIENT:
        return "patient_no_longer_available"
    if by == CancelledBy.CLINICIAN:
        return "provider_not_available"
    return "other_provider_reason"
