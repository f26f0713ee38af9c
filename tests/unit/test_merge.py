"""The three-way merge rules of DESIGN section 5, one behaviour per test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from syncbridge.config import CancellationPolicy
from syncbridge.connector import MIRROR_STATUS_MAP, Capabilities, Observation
from syncbridge.errors import MalformedRecord
from syncbridge.merge import merge
from syncbridge.model import FIELDS, Role, empty_snapshot, iso

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
START = NOW + timedelta(days=3)
MIRROR = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status", "location"}), status_map=MIRROR_STATUS_MAP)
RECORD = Capabilities(role=Role.RECORD, fields=frozenset(FIELDS) - {"cancellation", "billing"})


def canonical(**over: object) -> dict:
    snap = empty_snapshot() | {
        "clinician": "dr_a", "client_key": "c1", "start": iso(START), "end": iso(START + timedelta(minutes=50)),
        "timezone": "America/New_York", "service_code": "90837", "location": "Room 1",
    }
    return snap | over


def run(caps: Capabilities, canon: dict | None, observed: dict | None = None, *, base: dict | None = None, deleted: bool = False,
        tags: frozenset[str] = frozenset(), modified_at: str | None = None, updated_at: str | None = None,
        cancellation: dict | None = None, policy: CancellationPolicy | None = None, now: datetime = NOW):
    if base is None and canon is not None:
        base = caps.project(canon)
    obs = Observation(external_id="x", fields=observed or {}, deleted=deleted, tags=tags, modified_at=modified_at, cancellation=cancellation)
    return merge(role=caps.role, project=caps.project, base=base, canonical=canon, canonical_updated_at=updated_at,
                 obs=obs, policy=policy or CancellationPolicy(), now=now, via="cal")


def moved(snap: dict, hours: int) -> dict:
    return snap | {"start": iso(START + timedelta(hours=hours)), "end": iso(START + timedelta(hours=hours, minutes=50))}


def test_move_in_calendar_is_taken() -> None:
    """A session moved only in the calendar moves the canonical record."""
    c = canonical()
    out = run(MIRROR, c, MIRROR.project(moved(c, 2)))
    assert out.action == "update" and out.new["start"] == iso(START + timedelta(hours=2))
    assert set(out.changed) == {"start", "end"}


def test_unchanged_copy_is_a_noop() -> None:
    """A copy equal to what we last agreed changes nothing, even if canonical moved since."""
    c = canonical()
    base = MIRROR.project(c)
    out = run(MIRROR, moved(c, 1), base, base=base)
    assert out.action == "noop"


def test_both_moved_later_modification_wins() -> None:
    """When the calendar and the record both moved the session, the later change wins, with a conflict entry."""
    c = canonical()
    base = MIRROR.project(c)
    canon = moved(c, 1)
    later = iso(NOW + timedelta(minutes=5))
    out = run(MIRROR, canon, MIRROR.project(moved(c, 2)), base=base, modified_at=later, updated_at=iso(NOW))
    assert out.new["start"] == iso(START + timedelta(hours=2))
    assert [x.winner for x in out.conflicts] == ["observed"]
    out = run(MIRROR, canon, MIRROR.project(moved(c, 2)), base=base, modified_at=iso(NOW), updated_at=later)
    assert out.action == "noop" and out.conflicts[0].winner == "canonical"


def test_time_tie_goes_to_record() -> None:
    """Simultaneous moves: the EHR's time wins over the canonical one, a calendar's does not."""
    c = canonical()
    base = RECORD.project(c)
    out = run(RECORD, moved(c, 1), RECORD.project(moved(c, 2)), base=base, modified_at=iso(NOW), updated_at=iso(NOW))
    assert out.new["start"] == iso(START + timedelta(hours=2))
    base_m = MIRROR.project(c)
    out = run(MIRROR, moved(c, 1), MIRROR.project(moved(c, 2)), base=base_m, modified_at=iso(NOW), updated_at=iso(NOW))
    assert out.action == "noop"


def test_calendar_cannot_change_client_or_service() -> None:
    """Client, service code and modality belong to the record; a calendar's edits to them are ignored."""
    c = canonical()
    caps = Capabilities(role=Role.MIRROR, fields=frozenset({"start", "end", "timezone", "status", "client_key", "service_code"}))
    out = run(caps, c, caps.project(c) | {"client_key": "other", "service_code": "90791"})
    assert out.action == "noop"


def test_record_changes_service_code() -> None:
    """The EHR may correct the service code."""
    c = canonical()
    out = run(RECORD, c, RECORD.project(c) | {"service_code": "90834"})
    assert out.new["service_code"] == "90834"


def test_deleted_event_cancels_with_practice_default() -> None:
    """A plain delete well ahead of time is a client cancel without fee."""
    c = canonical()
    out = run(MIRROR, c, deleted=True)
    assert out.new["status"] == "cancelled"
    assert out.new["cancellation"] | {"at": None} == {"by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": None, "via": "cal"}


def test_delete_inside_window_is_late_cancel_with_fee() -> None:
    """A delete inside the late-cancel window becomes a late cancel and charges the fee."""
    c = canonical()
    out = run(MIRROR, c, deleted=True, now=START - timedelta(hours=3))
    assert out.new["cancellation"]["kind"] == "late_cancel" and out.new["cancellation"]["fee"] == "charge"


@pytest.mark.parametrize(
    ("tags", "kind", "fee", "by", "status"),
    [
        ({"late"}, "late_cancel", "charge", "client", "cancelled"),
        ({"late", "waive"}, "late_cancel", "waived", "client", "cancelled"),
        ({"late", "crisis"}, "late_cancel", "waived", "client", "cancelled"),
        ({"noshow"}, "no_show", "charge", "client", "noshow"),
        ({"cancel", "clinician"}, "cancel", "none", "clinician", "cancelled"),
    ],
)
def test_tags_in_event_text(tags: set[str], kind: str, fee: str, by: str, status: str) -> None:
    """Tags typed in the event title say what the calendar UI cannot: late, no-show, waive, crisis, clinician."""
    c = canonical()
    out = run(MIRROR, c, MIRROR.project(c), tags=frozenset(tags))
    rec = out.new["cancellation"]
    assert (rec["kind"], rec["fee"], rec["by"], out.new["status"]) == (kind, fee, by, status)


def test_stale_calendar_never_uncancels() -> None:
    """A calendar still showing a cancelled session does not bring it back."""
    c = canonical()
    base = MIRROR.project(c)
    cancelled = run(MIRROR, c, deleted=True).new
    out = run(MIRROR, cancelled, base, base=base)
    assert out.action == "noop"
    out = run(MIRROR, cancelled, base | {"status": "booked"}, base=base | {"status": "cancelled"})
    assert out.action == "noop"


def test_record_rebooks_explicitly() -> None:
    """Only the record can re-book a cancelled session, and only as a new change there."""
    c = canonical()
    cancelled = run(RECORD, c, RECORD.project(c) | {"status": "cancelled"}).new
    base = RECORD.project(cancelled)
    out = run(RECORD, cancelled, base | {"status": "booked"}, base=base)
    assert out.new["status"] == "booked" and out.new["cancellation"] is None


def test_record_copy_never_agreed_on_does_not_uncancel() -> None:
    """A copy in the record we created but never heard back from (the answer was lost, the daemon
    killed) still shows the booking we sent; seen after the session was cancelled elsewhere, it
    is not a re-booking: there is no base to say the record changed it."""
    c = canonical()
    cancelled = run(RECORD, c, RECORD.project(c) | {"status": "cancelled"}).new
    obs = Observation(external_id="x", fields=RECORD.project(c), modified_at=iso(NOW))
    out = merge(role=Role.RECORD, project=RECORD.project, base=None, canonical=cancelled, canonical_updated_at=iso(NOW - timedelta(minutes=1)),
                obs=obs, policy=CancellationPolicy(), now=NOW, via="ehr")
    assert out.action == "noop"


def test_record_reports_cancellation_details() -> None:
    """The EHR's own cancellation record (who, kind, reason) is kept."""
    c = canonical()
    out = run(RECORD, c, RECORD.project(c) | {"status": "cancelled"}, cancellation={"by": "clinician", "reason": "sick"})
    assert out.new["cancellation"]["by"] == "clinician" and out.new["cancellation"]["reason"] == "sick"


def test_fulfilled_session_is_booked_in_calendar() -> None:
    """A fulfilled session still looks booked in a calendar; that difference is not a change."""
    c = canonical(status="fulfilled")
    out = run(MIRROR, c, MIRROR.project(c))
    assert MIRROR.project(c)["status"] == "booked" and out.action == "noop"


def test_calendar_cannot_create() -> None:
    """An event with an unknown id in a calendar does not book a session."""
    assert run(MIRROR, None, {"start": iso(START)}).action == "ignore"


def test_record_creates() -> None:
    """A booking seen first in the record becomes a canonical appointment."""
    out = run(RECORD, None, RECORD.project(canonical()))
    assert out.action == "create" and out.new["client_key"] == "c1"


def test_end_before_start_is_refused() -> None:
    """A copy that ends before it starts is rejected with a clear message."""
    c = canonical()
    with pytest.raises(MalformedRecord, match="ends .* before it starts"):
        run(MIRROR, c, MIRROR.project(c) | {"end": iso(START - timedelta(hours=1))})


def test_unknown_zone_is_refused() -> None:
    """An unknown time zone is rejected, naming the zone."""
    c = canonical()
    with pytest.raises(MalformedRecord, match="Mars/Base"):
        run(RECORD, None, RECORD.project(c) | {"timezone": "Mars/Base"})
