"""Canonical snapshot <-> FHIR Appointment, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from syncbridge.errors import MalformedRecord
from syncbridge.model import empty_snapshot
from syncbridge.policy.cancellation import FHIR_REASON_SYSTEM
from syncbridge_connectors.fhir.mapping import by_of_reason, read_appointment, render_appointment

SYSTEM = "urn:syncbridge:appointment"
KW: dict[str, Any] = {"clinician_of": {"pr-1": "dr_rivera"}, "default_zone": "America/New_York", "identifier_system": SYSTEM}


def snapshot(**extra: Any) -> dict[str, Any]:
    return empty_snapshot() | {
        "clinician": "dr_rivera",
        "client_key": "pat-42",
        "start": "2026-03-09T14:00:00Z",
        "end": "2026-03-09T14:50:00Z",
        "timezone": "America/Chicago",
        "service_code": "90837",
        "location": "Room 2",
        "modality": "telehealth",
        "series_id": "series-1",
    } | extra


def roundtrip(snap: dict[str, Any], existing: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any, Any, Any]:
    appt = render_appointment(existing, "sb-1", snap, practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    appt["id"] = "a1"
    return read_appointment(json.loads(json.dumps(appt)), **KW)


def test_live_session_round_trips() -> None:
    """Every field syncbridge writes to the EHR reads back identically, so nothing is rewritten twice."""
    snap = snapshot()
    fields, reported, canonical_id, tags = roundtrip(snap)
    assert fields == snap
    assert canonical_id == "sb-1" and reported is None and tags == frozenset()


def test_cancelled_session_round_trips_with_reason() -> None:
    """A cancellation reaches the EHR as an HL7 cancelationReason and comes back as the same record."""
    record = {"by": "clinician", "kind": "cancel", "fee": "none", "clinical": True, "reason": "ill", "at": "2026-03-08T10:00:00Z", "via": "cli"}
    snap = snapshot(status="cancelled", cancellation=record)
    appt = render_appointment(None, "sb-1", snap, practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    assert appt["cancelationReason"] == {"coding": [{"system": FHIR_REASON_SYSTEM, "code": "prov-pers"}], "text": "ill"}
    fields, reported, _, _ = roundtrip(snap)
    # billing is not settled yet (no claim suppression has run on it): the copy says nothing about it,
    # so it differs from the canonical record and the connector is asked to settle it
    assert "billing" not in fields
    assert fields == {k: v for k, v in snap.items() if k != "billing"} and reported == record
    settled = snapshot(status="cancelled", cancellation=record, billing="suppressed")
    assert roundtrip(settled)[0] == settled


def test_update_keeps_what_ehr_users_added() -> None:
    """Staff notes and other participants on the Appointment survive syncbridge's updates."""
    existing = render_appointment(None, "sb-1", snapshot(), practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    existing["comment"] = "interpreter needed"
    existing["participant"].append({"actor": {"reference": "RelatedPerson/rp-1"}, "status": "accepted"})
    updated = render_appointment(existing, "sb-1", snapshot(location="Room 9"), practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    assert updated["comment"] == "interpreter needed"
    assert {"actor": {"reference": "RelatedPerson/rp-1"}, "status": "accepted"} in updated["participant"]


def test_ehr_cancel_reports_who() -> None:
    """A cancel made in the EHR is attributed to the client, clinician or practice by its reason code."""
    appt = render_appointment(None, "sb-1", snapshot(), practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    appt |= {"id": "a1", "status": "noshow", "cancelationReason": {"coding": [{"system": FHIR_REASON_SYSTEM, "code": "pat"}]}, "comment": "#waive"}
    fields, reported, _, tags = read_appointment(appt, **KW)
    assert fields["status"] == "noshow" and fields["cancellation"] is None
    assert reported == {"by": "client", "reason": None} and tags == {"waive"}
    assert [by_of_reason(c) for c in ("pat", "prov", "prov-pers", "maint", None)] == ["client", "clinician", "clinician", "practice", "practice"]


def test_foreign_appointment_defaults() -> None:
    """An appointment booked in the EHR without syncbridge's extensions gets the practice's zone and defaults."""
    appt = {
        "resourceType": "Appointment",
        "id": "e1",
        "status": "booked",
        "start": "2026-03-09T09:00:00-05:00",
        "end": "2026-03-09T09:50:00-05:00",
        "participant": [{"actor": {"reference": "Practitioner/pr-1"}}, {"actor": {"reference": "Patient/p9"}}],
    }
    fields, _, canonical_id, _ = read_appointment(appt, **KW)
    assert canonical_id is None
    assert fields["start"] == "2026-03-09T14:00:00Z" and fields["timezone"] == "America/New_York"
    assert fields["client_key"] == "p9" and fields["billing"] == "pending" and fields["modality"] == "in_person"


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"start": None}, "no start"),
        ({"end": "2026-03-09T13:00:00Z"}, "ends before"),
        ({"start": "tomorrow"}, "unreadable"),
        ({"status": "dancing"}, "unknown status"),
        ({"participant": [{"actor": {"reference": "Practitioner/someone-else"}}]}, "no practitioner"),
    ],
)
def test_malformed_appointment_is_refused(change: dict[str, Any], problem: str) -> None:
    """An Appointment that cannot be a session is named and skipped, never half-imported."""
    appt = render_appointment(None, "sb-1", snapshot(), practitioner="Practitioner/pr-1", identifier_system=SYSTEM) | {"id": "a1"} | change
    with pytest.raises(MalformedRecord, match=problem):
        read_appointment(appt, **KW)


def test_staff_reason_code_is_kept_when_it_says_the_same() -> None:
    """A finer reason code chosen by EHR staff (patient cancelled via reminder) is not flattened."""
    record = {"by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": "2026-03-08T10:00:00Z", "via": "ehr"}
    existing = render_appointment(None, "sb-1", snapshot(), practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    existing |= {"status": "cancelled", "cancelationReason": {"coding": [{"system": FHIR_REASON_SYSTEM, "code": "pat-crs"}]}}
    kept = render_appointment(existing, "sb-1", snapshot(status="cancelled", cancellation=record), practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    assert kept["cancelationReason"]["coding"][0]["code"] == "pat-crs"
    moved = render_appointment(existing, "sb-1", snapshot(status="cancelled", cancellation=record | {"by": "clinician"}), practitioner="Practitioner/pr-1", identifier_system=SYSTEM)
    assert moved["cancelationReason"]["coding"][0]["code"] == "prov"
