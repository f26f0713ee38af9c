"""Canonical snapshot <-> FHIR R4 ``Appointment`` (hl7.org/fhir/R4/appointment.html).

Pure functions, no I/O. What FHIR R4 has a slot for goes there (start, end, status,
participants, ``serviceType`` for the CPT code, ``cancelationReason``, ``identifier`` for the
canonical id); what it has none for (the session's time zone, modality, series, the full
cancellation record and the billing state) goes in extensions under ``EXT``, which EHRs keep
and show to no patient. An EHR user's own edits (comment, other participants) are preserved
because updates start from the resource as read.
"""

from __future__ import annotations

import json
import re
from typing import Any

from syncbridge.errors import MalformedRecord
from syncbridge.model import Billing, Snapshot, Status, check_timezone, iso, parse_iso
from syncbridge.policy.cancellation import FHIR_REASON_SYSTEM, fhir_reason, find_tags

__all__ = [
    "CLIENT_SYSTEM",
    "EXT",
    "EXT_BILLING",
    "CPT_SYSTEM",
    "SETTLED",
    "by_of_reason",
    "client_reference",
    "extension",
    "read_appointment",
    "render_appointment",
    "set_extension",
]

EXT = "http://syncbridge.example/fhir/"
EXT_TIMEZONE = EXT + "timezone"
EXT_MODALITY = EXT + "modality"
EXT_SERIES = EXT + "series"
EXT_CANCELLATION = EXT + "cancellation"
EXT_BILLING = EXT + "billing-state"
CPT_SYSTEM = "http://www.ama-assn.org/go/cpt"
#: the identifier system of a client key that is not a FHIR id (a directory's patient key)
CLIENT_SYSTEM = "urn:syncbridge:client"
#: billing states of a session that did not happen; a live Appointment still carrying one was
#: re-booked and has not been settled again (its fee must be withdrawn)
SETTLED = frozenset({Billing.SUPPRESSED, Billing.FEE_SELF_PAY, Billing.NEEDS_VOID, Billing.NEEDS_ATTENTION})
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def client_reference(client_key: str) -> dict[str, Any]:
    """The client as an R4 Reference: ``Patient/<key>`` when the key is a FHIR id (the EHR's own
    Patient), else a logical reference by identifier (references.html#logical) to be matched at
    intake, since syncbridge never creates a chart from a directory's booking."""
    if _FHIR_ID.fullmatch(client_key):
        return {"reference": f"Patient/{client_key}"}
    return {"type": "Patient", "identifier": {"system": CLIENT_SYSTEM, "value": client_key}}


def _client_key(participant: dict[str, Any]) -> str | None:
    actor = participant.get("actor", {})
    ref = str(actor.get("reference", ""))
    if ref.startswith("Patient/"):
        return ref.removeprefix("Patient/")
    ident = actor.get("identifier") or {}
    if actor.get("type") == "Patient" and ident.get("system") == CLIENT_SYSTEM and ident.get("value"):
        return str(ident["value"])
    return None


def _is_client(participant: dict[str, Any]) -> bool:
    return _client_key(participant) is not None

_TO_CANONICAL = {
    "booked": Status.BOOKED,
    "arrived": Status.ARRIVED,
    "checked-in": Status.ARRIVED,
    "fulfilled": Status.FULFILLED,
    "cancelled": Status.CANCELLED,
    "noshow": Status.NOSHOW,
    "entered-in-error": Status.ENTERED_IN_ERROR,
    # not yet confirmed in the EHR: still a held slot, so booked
    "proposed": Status.BOOKED,
    "pending": Status.BOOKED,
    "waitlist": Status.BOOKED,
}
_TO_FHIR = {
    Status.BOOKED: "booked",
    Status.ARRIVED: "arrived",
    Status.FULFILLED: "fulfilled",
    Status.CANCELLED: "cancelled",
    Status.NOSHOW: "noshow",
    Status.ENTERED_IN_ERROR: "entered-in-error",
}


def extension(resource: dict[str, Any], url: str) -> Any:
    for ext in resource.get("extension", []):
        if ext.get("url") == url:
            for key, value in ext.items():
                if key.startswith("value"):
                    return value
    return None


def set_extension(resource: dict[str, Any], url: str, kind: str, value: Any) -> None:
    """Set (or, for None, remove) one extension, leaving every other extension as it was."""
    kept = [e for e in resource.get("extension", []) if e.get("url") != url]
    if value is not None:
        kept.append({"url": url, kind: value})
    if kept:
        resource["extension"] = kept
    else:
        resource.pop("extension", None)


def by_of_reason(code: str | None) -> str:
    """Who cancelled, from an appointment-cancellation-reason code: pat -> client, prov* -> clinician."""
    if code == "pat" or (code or "").startswith("pat-"):
        return "client"
    if (code or "").startswith("prov"):
        return "clinician"
    return "practice"


def _actor_refs(appt: dict[str, Any], prefix: str) -> list[str]:
    return [
        ref[len(prefix) :]
        for p in appt.get("participant", [])
        if (ref := p.get("actor", {}).get("reference", "")).startswith(prefix)
    ]


def read_appointment(
    appt: dict[str, Any], *, clinician_of: dict[str, str], default_zone: str, identifier_system: str
) -> tuple[Snapshot, dict[str, Any] | None, str | None, frozenset[str]]:
    """(fields, cancellation as reported, canonical id, reason tags) of one Appointment.

    Raises MalformedRecord for what cannot be a session (no start, end not after start, an
    unknown status, no practitioner of ours).
    """
    if not appt.get("start") or not appt.get("end"):
        raise MalformedRecord(f"Appointment/{appt.get('id')} has no start or end")
    try:
        start, end = parse_iso(appt["start"]), parse_iso(appt["end"])
    except (ValueError, TypeError) as err:
        raise MalformedRecord(f"Appointment/{appt.get('id')} has an unreadable start or end") from err
    if end <= start:
        raise MalformedRecord(f"Appointment/{appt.get('id')} ends before it starts")
    status = _TO_CANONICAL.get(appt.get("status", ""))
    if status is None:
        raise MalformedRecord(f"Appointment/{appt.get('id')} has unknown status {appt.get('status')!r}")
    clinician = next((clinician_of[p] for p in _actor_refs(appt, "Practitioner/") if p in clinician_of), None)
    if clinician is None:
        raise MalformedRecord(f"Appointment/{appt.get('id')} has no practitioner configured for syncbridge")
    zone = extension(appt, EXT_TIMEZONE) or default_zone
    check_timezone(zone)
    patients = [k for p in appt.get("participant", []) if (k := _client_key(p))]
    location = next(
        (p["actor"].get("display") for p in appt.get("participant", []) if p.get("actor", {}).get("type") == "Location"), None
    )
    service = next((c.get("code") for st in appt.get("serviceType", []) for c in st.get("coding", []) if c.get("system") == CPT_SYSTEM), None)
    raw_cancel = extension(appt, EXT_CANCELLATION)
    record = json.loads(raw_cancel) if raw_cancel else None
    fields: Snapshot = {
        "clinician": clinician,
        "client_key": patients[0] if patients else None,
        "start": iso(start),
        "end": iso(end),
        "timezone": zone,
        "status": str(status),
        "cancellation": record if status in (Status.CANCELLED, Status.NOSHOW, Status.ENTERED_IN_ERROR) else None,
        "modality": extension(appt, EXT_MODALITY) or "in_person",
        "location": location,
        "service_code": service,
        "series_id": extension(appt, EXT_SERIES),
        "billing": extension(appt, EXT_BILLING) or Billing.PENDING.value,
    }
    cancelled = fields["status"] in (Status.CANCELLED, Status.NOSHOW, Status.ENTERED_IN_ERROR)
    if (cancelled and extension(appt, EXT_BILLING) is None) or (not cancelled and extension(appt, EXT_BILLING) in SETTLED):
        # cancelled in the EHR but not yet settled by us, or re-booked with a cancelled session's
        # billing state still on it: say nothing about billing, so the copy differs from the
        # canonical record and the write that settles it (suppression, or withdrawing a fee) runs
        del fields["billing"]
    reported: dict[str, Any] | None = None
    if fields["cancellation"]:
        reported = dict(fields["cancellation"])
    else:
        codes = [c.get("code") for c in appt.get("cancelationReason", {}).get("coding", []) if c.get("system") == FHIR_REASON_SYSTEM]
        if codes:
            reported = {"by": by_of_reason(codes[0]), "reason": appt["cancelationReason"].get("text")}
    canonical_id = next((i.get("value") for i in appt.get("identifier", []) if i.get("system") == identifier_system), None)
    tags = find_tags(appt.get("comment"), appt.get("description"))
    return fields, reported, canonical_id, tags


def render_appointment(
    existing: dict[str, Any] | None,
    appointment_id: str,
    desired: Snapshot,
    *,
    practitioner: str,
    identifier_system: str,
    practitioners: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The Appointment that expresses ``desired``, starting from the resource as read (or a new one).

    ``practitioners`` are the references of every configured clinician: a participant naming one
    of them other than ``practitioner`` is the session's former clinician and is replaced; any
    other Practitioner (a co-therapist the EHR added) stays. Empty: every Practitioner is ours.
    """
    appt: dict[str, Any] = json.loads(json.dumps(existing)) if existing else {"resourceType": "Appointment"}
    appt.pop("meta", None)
    idents = [i for i in appt.get("identifier", []) if i.get("system") != identifier_system]
    appt["identifier"] = [*idents, {"system": identifier_system, "value": appointment_id}]
    status = Status(desired["status"])
    appt["status"] = _TO_FHIR[status]
    appt["start"], appt["end"] = desired["start"], desired["end"]
    appt["participant"] = _participants(appt.get("participant", []), practitioner, desired, practitioners)
    kept_types = [
        {**st, "coding": [c for c in st.get("coding", []) if c.get("system") != CPT_SYSTEM]} for st in appt.get("serviceType", [])
    ]
    kept_types = [st for st in kept_types if st["coding"] or st.get("text") or st.get("extension")]
    if desired.get("service_code"):
        ours = {"system": CPT_SYSTEM, "code": desired["service_code"]}
        if kept_types:  # the EHR's own codes and text for the service stay beside the CPT code
            kept_types[0] = {**kept_types[0], "coding": [ours, *kept_types[0]["coding"]]}
        else:
            kept_types = [{"coding": [ours]}]
    if kept_types:
        appt["serviceType"] = kept_types
    else:
        appt.pop("serviceType", None)
    cancellation = desired.get("cancellation")
    if status in (Status.CANCELLED, Status.NOSHOW, Status.ENTERED_IN_ERROR) and cancellation:
        code = fhir_reason(cancellation)
        kept = [c.get("code") for c in appt.get("cancelationReason", {}).get("coding", []) if c.get("system") == FHIR_REASON_SYSTEM]
        if kept and by_of_reason(kept[0]) == by_of_reason(code):
            code = kept[0]  # staff chose a finer code (pat-crs, prov-dch...) saying the same who: keep it
        appt["cancelationReason"] = {
            "coding": [{"system": FHIR_REASON_SYSTEM, "code": code}],
            **({"text": cancellation["reason"]} if cancellation.get("reason") else {}),
        }
        set_extension(appt, EXT_CANCELLATION, "valueString", json.dumps(cancellation, sort_keys=True))
    else:
        appt.pop("cancelationReason", None)
        set_extension(appt, EXT_CANCELLATION, "valueString", None)
    set_extension(appt, EXT_TIMEZONE, "valueCode", desired.get("timezone"))
    set_extension(appt, EXT_MODALITY, "valueCode", desired.get("modality"))
    set_extension(appt, EXT_SERIES, "valueString", desired.get("series_id"))
    billing = desired.get("billing")
    set_extension(appt, EXT_BILLING, "valueCode", billing if billing and billing != Billing.PENDING else None)
    return appt


def _participants(existing: list[dict[str, Any]], practitioner: str, desired: Snapshot, practitioners: frozenset[str]) -> list[dict[str, Any]]:
    """The participants with ours set: an entry the EHR already had for the same actor keeps every
    element the EHR gave it (display, type, required, period, extensions); other entries stay."""

    def first(match: Any) -> dict[str, Any] | None:
        return next((p for p in existing if match(p)), None)

    def ours(p: dict[str, Any]) -> bool:
        actor = p.get("actor", {})
        ref = str(actor.get("reference", ""))
        clinician = ref in practitioners if practitioners else ref.startswith("Practitioner/")
        return clinician or _is_client(p) or actor.get("type") == "Location"

    out: list[dict[str, Any]] = []
    had = first(lambda p: p.get("actor", {}).get("reference") == practitioner)
    out.append(had or {"actor": {"reference": practitioner}, "status": "accepted"})
    key = desired.get("client_key")
    if key:
        had = first(lambda p: _client_key(p) == key)
        out.append(had or {"actor": client_reference(key), "status": "accepted"})
    where = desired.get("location")
    if where:
        had = first(lambda p: p.get("actor", {}).get("type") == "Location")
        if had is not None and had["actor"].get("display") == where:
            out.append(had)
        else:
            out.append({"actor": {"type": "Location", "display": where}, "status": "accepted"})
    return out + [p for p in existing if not ours(p)]
