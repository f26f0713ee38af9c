"""Cancellation policy: tags, late-cancel window, fees, and the vendor reason codes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from syncbridge.config import CancellationPolicy
from syncbridge.policy.cancellation import decide, fhir_reason, find_tags, zocdoc_reason
from syncbridge.policy.privacy import event_text
from syncbridge.config import PrivacyPolicy

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def test_tags_are_found_in_any_case_and_form() -> None:
    """#NoShow, #no-show and #late are recognised; words that merely contain a tag are not."""
    assert find_tags("Client session #NoShow", "#late") == {"noshow", "late"}
    assert find_tags("#no-show #waive #crisis #clinician #cancelled") == {"noshow", "waive", "crisis", "clinician", "cancel"}
    assert find_tags("notes#late", "#lately", "email me at x#waive") == frozenset()


def test_window_and_fee_policy() -> None:
    """Inside 24 h a client's cancel is late and charged; the practice can turn the fee off."""
    start = NOW + timedelta(hours=5)
    status, rec = decide(CancellationPolicy(), start=start, now=NOW, via="cal")
    assert (status, rec["kind"], rec["fee"]) == ("cancelled", "late_cancel", "charge")
    _, rec = decide(CancellationPolicy(late_cancel_fee=False), start=start, now=NOW, via="cal")
    assert (rec["kind"], rec["fee"]) == ("late_cancel", "none")
    _, rec = decide(CancellationPolicy(late_cancel_window_hours=2), start=start, now=NOW, via="cal")
    assert (rec["kind"], rec["fee"]) == ("cancel", "none")
    _, rec = decide(CancellationPolicy(), start=start, now=NOW, via="cal", by="clinician")
    assert (rec["kind"], rec["fee"]) == ("cancel", "none")


def test_reason_codes_for_vendors() -> None:
    """Who cancelled maps to the HL7 cancellation-reason code and Zocdoc's reason type."""
    assert fhir_reason({"by": "client"}) == "pat"
    assert fhir_reason({"by": "clinician", "clinical": True}) == "prov-pers"
    assert fhir_reason({"by": "practice"}) == "oth"
    assert zocdoc_reason({"by": "client"}) == "patient_no_longer_available"
    assert zocdoc_reason({"by": "clinician"}) == "provider_not_available"


def test_calendar_text_has_no_patient_data() -> None:
    """A session's event shows the template and a room or Telehealth; busy mode shows only Busy."""
    snap = {"client_key": "Jane Doe", "service_code": "90837", "modality": "telehealth", "location": "Room 4"}
    text = event_text(snap, PrivacyPolicy())
    assert (text.title, text.location) == ("Client session", "Telehealth")
    text = event_text(snap | {"modality": "in_person"}, PrivacyPolicy())
    assert (text.title, text.location) == ("Client session", "Room 4")
    text = event_text(snap, PrivacyPolicy(), "busy")
    assert (text.title, text.location) == ("Busy", None)
