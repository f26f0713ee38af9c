"""The contract suite against the Zocdoc emulator (connectors/zocdoc/emulator.py), plus channel specifics.

The Vendor is a client using the Zocdoc marketplace: they book, reschedule and cancel there and
never go through the connector under test. Zocdoc holds only what was booked through it, so the
mirror scenarios skip by capability (``accepts_new=False``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import Link
from syncbridge.engine import Engine
from syncbridge.errors import AuthError, PermanentError, RateLimited, TransientError
from syncbridge.model import iso
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running
from syncbridge_connectors.zocdoc.mapping import LIVE_STATUSES
from tests.contract.suite import CLINICIAN, ZONE, ConnectorContract, Harness, Vendor, World, next_weekday_at
from tests.servers import PASSWORD, DavServer, radicale_server  # noqa: F401

SECRET_ENV = "SYNCBRIDGE_TEST_ZOCDOC_SECRET"
PROVIDER = "pr_rivera-1"
LOCATION = "lo_main-1"
ACCOUNT = {"provider_id": PROVIDER, "location_id": LOCATION}


class ZocdocPatients(Vendor):
    """Clients in the Zocdoc marketplace: every change is made on Zocdoc's side."""

    can_throttle = True

    def __init__(self, emulator: ZocdocEmulator) -> None:
        self.emulator = emulator

    async def live(self) -> list[dict[str, Any]]:
        out = []
        for appt_id in list(self.emulator.appointments):
            rec = self.emulator.record(appt_id)
            if rec["appointment_status"] in LIVE_STATUSES:
                start = datetime.fromisoformat(rec["start_time"])
                out.append({"external_id": appt_id, "start": start, "end": start + timedelta(minutes=50)})
        return sorted(out, key=lambda e: e["start"])

    async def move(self, external_id: str, start: datetime, end: datetime) -> None:
        self.emulator.patient_reschedule(external_id, start)

    async def delete(self, external_id: str) -> None:
        self.emulator.patient_cancel(external_id)

    async def retitle(self, external_id: str, title: str) -> None:
        raise NotImplementedError("Zocdoc appointments carry no title")

    async def invalidate_cursor(self) -> None:
        """A last-modified watermark never expires; nothing to invalidate."""

    async def throttle(self, requests: int, retry_after: float | None = 0.1) -> None:
        self.emulator.fail_next(429, requests, retry_after=retry_after)

    async def book(self, start: datetime, end: datetime, client_key: str) -> str:
        return self.emulator.book(PROVIDER, LOCATION, start, developer_patient_id=client_key)


@pytest.fixture
def zocdoc_server() -> Iterator[Any]:
    server = running(ZocdocEmulator(client_id="practice-app", client_secret="s3cret-test"))
    server.emulator.add_provider(PROVIDER, LOCATION, ZONE)
    try:
        yield server
    finally:
        server.stop()


def zocdoc_config(server: Any, monkeypatch: pytest.MonkeyPatch, **options: Any) -> dict[str, Any]:
    monkeypatch.setenv(SECRET_ENV, server.emulator.client_secret)
    return {
        "type": "zocdoc",
        "environment": "sandbox",
        "base_url": server.base_url,
        "token_url": server.token_url,
        "client_id": server.emulator.client_id,
        "client_secret": {"env": SECRET_ENV},
        **options,
    }


class TestZocdoc(ConnectorContract):
    @pytest.fixture
    def harness(self, zocdoc_server: Any, monkeypatch: pytest.MonkeyPatch) -> Harness:
        return Harness(zocdoc_config(zocdoc_server, monkeypatch), dict(ACCOUNT), ZocdocPatients(zocdoc_server.emulator))

    # --- channel scenarios beyond the shared suite --------------------------------------------

    async def _from_zocdoc(self, world: World, hours_from_now: float | None = None) -> tuple[str, str]:
        start = next_weekday_at(11) if hours_from_now is None else datetime.now(UTC).replace(microsecond=0) + timedelta(hours=hours_from_now)
        ext = await world.vendor.book(start, start + timedelta(minutes=50), "client-q")
        await world.sync()
        link = world.store.link_by_external(world.connector.name, ext)
        assert link is not None
        return link.appointment_id, ext

    async def test_cancel_in_record_cancels_in_zocdoc_with_reason(self, world: World) -> None:
        """A session cancelled in the canonical record is cancelled in Zocdoc with the mapped reason type."""
        appt_id, ext = await self._from_zocdoc(world)
        emulator = world.vendor.emulator  # type: ignore[attr-defined]
        world.cancel_here(appt_id)  # cancelled by the client
        await world.drain()
        assert ("POST", "/v1/appointments/cancel") in emulator.log
        rec = emulator.appointments[ext]
        assert rec["status"] == "cancelled" and rec["cancellation_reason_type"] == "patient_no_longer_available"
        assert rec["cancellation_reason"] is None, "free-text reasons stay in the store and the EHR"
        version = world.store.appointment(appt_id).version
        await world.sync()
        await world.drain()
        assert world.store.appointment(appt_id).version == version
        assert emulator.log.count(("POST", "/v1/appointments/cancel")) == 1

    async def test_clinician_cancel_maps_to_provider_reason(self, world: World) -> None:
        """A clinician's cancellation reaches Zocdoc as provider_not_available."""
        appt_id, ext = await self._from_zocdoc(world)
        appt = world.store.appointment(appt_id)
        record = {"by": "clinician", "kind": "cancel", "fee": "none", "clinical": False, "reason": "unwell", "at": iso(datetime.now(UTC)),
                  "via": "test-record"}
        world.engine.change(appt_id, dict(appt.fields) | {"status": "cancelled", "cancellation": record}, via="test-record")
        await world.drain()
        assert world.vendor.emulator.appointments[ext]["cancellation_reason_type"] == "provider_not_available"  # type: ignore[attr-defined]

    async def test_noshow_in_record_marks_noshow(self, world: World) -> None:
        """A no-show recorded an hour after the start is marked no_show in Zocdoc through update-status."""
        appt_id, ext = await self._from_zocdoc(world, hours_from_now=-1)
        appt = world.store.appointment(appt_id)
        record = {"by": "client", "kind": "no_show", "fee": "charge", "clinical": False, "reason": None, "at": iso(datetime.now(UTC)),
                  "via": "test-record"}
        world.engine.change(appt_id, dict(appt.fields) | {"status": "noshow", "cancellation": record}, via="test-record")
        await world.drain()
        emulator = world.vendor.emulator  # type: ignore[attr-defined]
        assert ("PUT", "/v1/appointments/update-status") in emulator.log
        assert emulator.appointments[ext]["status"] == "no_show"
        assert world.store.dead_letters() == []

    async def test_move_in_record_reschedules_in_zocdoc(self, world: World) -> None:
        """A session moved in the record is rescheduled in Zocdoc, at the same instant."""
        appt_id, ext = await self._from_zocdoc(world)
        new_start = next_weekday_at(16)
        world.move_here(appt_id, new_start)
        await world.drain()
        assert ("POST", "/v1/appointments/reschedule") in world.vendor.emulator.log  # type: ignore[attr-defined]
        live = await world.vendor.live()
        assert [e["start"] for e in live] == [new_start]

    async def test_zocdoc_cancel_flows_in_with_reason(self, world: World) -> None:
        """A client's cancellation in Zocdoc cancels the session, attributed to the client and to Zocdoc."""
        appt_id, ext = await self._from_zocdoc(world)
        world.vendor.emulator.patient_cancel(ext, "patient_no_longer_needs_appointment")  # type: ignore[attr-defined]
        await world.sync()
        cancellation = world.store.appointment(appt_id).fields["cancellation"]
        assert cancellation["by"] == "client" and cancellation["via"] == world.connector.name

    async def test_throttled_cancel_backs_off_then_lands(self, world: World) -> None:
        """A write throttled with 429 is retried after Retry-After and then lands, nothing dead-lettered."""
        appt_id, ext = await self._from_zocdoc(world)
        await world.vendor.throttle(2)
        world.cancel_here(appt_id)
        for _ in range(20):
            await world.drain()
            if world.vendor.emulator.appointments[ext]["status"] == "cancelled":  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.2)
        assert world.vendor.emulator.appointments[ext]["status"] == "cancelled"  # type: ignore[attr-defined]
        assert world.store.dead_letters() == []

    async def test_channel_never_creates(self, world: World) -> None:
        """Nothing booked elsewhere is ever pushed to Zocdoc, and a create is refused outright."""
        appt_id = world.book_here(next_weekday_at(10))
        await world.drain()
        assert world.store.link(world.connector.name, appt_id) is None
        assert not [p for m, p in world.vendor.emulator.log if m == "POST"]  # type: ignore[attr-defined]
        with pytest.raises(PermanentError):
            await world.connector.apply(appt_id, world.connector.capabilities.project(world.store.appointment(appt_id).fields), None)


# --- fan-out, the 1,000 cap, errors --------------------------------------------------------------


@pytest.mark.slow
async def test_zocdoc_booking_fans_out_and_its_cancel_is_applied_everywhere(
    zocdoc_server: Any, radicale_server: DavServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path  # noqa: F811
) -> None:
    """A Zocdoc booking becomes one appointment in the EHR and the clinician's calendar; the client's cancel there removes both."""
    from syncbridge_connectors.fhir.emulator import FHIREmulator
    from syncbridge_connectors.fhir.emulator import running as fhir_running

    fhir = fhir_running(FHIREmulator(static_token="ehr-token"))
    fhir.emulator.put({"resourceType": "Practitioner", "id": "pr1"})
    calendar = radicale_server.make_calendar()
    monkeypatch.setenv("SYNCBRIDGE_TEST_EHR_TOKEN", "ehr-token")
    monkeypatch.setenv("SYNCBRIDGE_TEST_DAV_PASSWORD", PASSWORD)
    accounts = {"zocdoc": dict(ACCOUNT), "ehr": {"practitioner": "Practitioner/pr1"}, "calendar": {"calendar": calendar}}
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "fan.db")},
        "clinicians": {CLINICIAN: {"accounts": accounts}},
        "connectors": {
            "zocdoc": zocdoc_config(zocdoc_server, monkeypatch),
            "ehr": {"type": "fhir", "base_url": fhir.base_url, "auth": "static", "token": {"env": "SYNCBRIDGE_TEST_EHR_TOKEN"}},
            "calendar": {"type": "caldav", "url": radicale_server.base_url + "/", "username": radicale_server.username,
                         "password": {"env": "SYNCBRIDGE_TEST_DAV_PASSWORD"}},
        },
    }))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    outbox = Outbox(engine)
    try:
        start = next_weekday_at(13)
        ext = zocdoc_server.emulator.book(PROVIDER, LOCATION, start, visit_type="zocdoc_video_service")
        report = await engine.sync("zocdoc")
        assert report.created == 1
        await outbox.drain()
        [appt] = store.appointments()
        assert appt.start == start and appt.fields["modality"] == "telehealth"
        assert {c for c in ("zocdoc", "ehr", "calendar") if store.link(c, appt.id)} == {"zocdoc", "ehr", "calendar"}
        ehr = [a for a in fhir.emulator.all("Appointment") if a["status"] == "booked"]
        assert len(ehr) == 1 and datetime.fromisoformat(ehr[0]["start"]) == start
        with radicale_server.http() as dav:
            assert "BEGIN:VEVENT" in dav.request("REPORT", calendar, headers={"Depth": "1"}, content=CALENDAR_QUERY).text

        zocdoc_server.emulator.patient_cancel(ext)
        await engine.sync("zocdoc")
        await outbox.drain()
        assert store.appointment(appt.id).cancelled
        assert [a["status"] for a in fhir.emulator.all("Appointment")] == ["cancelled"]
        with radicale_server.http() as dav:
            assert "BEGIN:VEVENT" not in dav.request("REPORT", calendar, headers={"Depth": "1"}, content=CALENDAR_QUERY).text
        assert store.dead_letters() == []
    finally:
        for c in connectors.values():
            await c.close()
        store.close()
        fhir.stop()
        radicale_server.delete_calendar(calendar)


CALENDAR_QUERY = (
    b'<?xml version="1.0"?><c:calendar-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav">'
    b'<d:prop><c:calendar-data/></d:prop><c:filter><c:comp-filter name="VCALENDAR"/></c:filter></c:calendar-query>'
)


def _connector(server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **options: Any) -> Any:
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "direct.db")},
        "clinicians": {CLINICIAN: {"accounts": {"zocdoc": dict(ACCOUNT)}}},
        "connectors": {"zocdoc": zocdoc_config(server, monkeypatch, **options)},
    }))
    return build_connectors(cfg)["zocdoc"]


async def test_more_than_the_api_cap_are_all_read(zocdoc_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With 1,250 changed appointments (over the API's 1,000-result cap) every one is observed, once."""
    emulator = zocdoc_server.emulator
    base = next_weekday_at(8)
    ids = {emulator.book(PROVIDER, LOCATION, base + timedelta(minutes=10 * i)) for i in range(1250)}
    connector = _connector(zocdoc_server, monkeypatch, tmp_path)
    try:
        full = await connector.pull(None)
        assert full.complete and {o.external_id for o in full.observations} == ids and len(full.observations) == 1250
        listed = sum(1 for m, p in emulator.log if (m, p) == ("GET", "/v1/appointments"))
        assert listed <= 14  # ten pages to the cap, then a second window from the newest change
        again = await connector.pull(full.cursor)
        changed = sorted(ids)[:3]
        for ext in changed:
            emulator.patient_cancel(ext)
        after = await connector.pull(again.cursor)
        cancelled = {o.external_id for o in after.observations if o.fields.get("status") == "cancelled"}
        assert cancelled == set(changed)
    finally:
        await connector.close()


async def test_errors_map_to_what_the_engine_must_do(zocdoc_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """429 says when to retry, 5xx is transient, a refused credential is an auth problem, a gone id is deleted."""
    emulator = zocdoc_server.emulator
    ext = emulator.book(PROVIDER, LOCATION, next_weekday_at(9))
    connector = _connector(zocdoc_server, monkeypatch, tmp_path)
    try:
        emulator.fail_next(429, 1, retry_after=3)
        with pytest.raises(RateLimited) as throttled:
            await connector.read(ext)
        assert throttled.value.retry_after == 3
        emulator.fail_next(502, 1)
        with pytest.raises(TransientError):
            await connector.read(ext)
        assert (await connector.read(ext)).fields["status"] == "booked"
        assert (await connector.read("no-such-appointment")).deleted
        emulator.revoke_tokens()  # an early revocation is survived by fetching a new token once
        assert not (await connector.read(ext)).deleted
        emulator.client_secret = "rotated"
        emulator.revoke_tokens()
        with pytest.raises(AuthError):
            await connector.read(ext)
    finally:
        await connector.close()


async def test_stale_copy_is_a_conflict_not_an_overwrite(zocdoc_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A client's reschedule after our last read makes a write re-read and re-merge instead of overwriting."""
    from syncbridge.errors import ConflictError

    emulator = zocdoc_server.emulator
    ext = emulator.book(PROVIDER, LOCATION, next_weekday_at(9))
    connector = _connector(zocdoc_server, monkeypatch, tmp_path)
    try:
        obs = await connector.read(ext)
        emulator.patient_reschedule(ext, next_weekday_at(15))
        link = Link("zocdoc", "sb-x", ext, obs.etag, obs.fields)
        moved = obs.fields | {"start": iso(next_weekday_at(10)), "end": iso(next_weekday_at(10) + timedelta(minutes=50))}
        with pytest.raises(ConflictError):
            await connector.apply("sb-x", moved, link)
        assert datetime.fromisoformat(emulator.record(ext)["start_time"]) == next_weekday_at(15)
    finally:
        await connector.close()


async def test_emulator_follows_the_published_api(zocdoc_server: Any) -> None:
    """401 without a token, the documented page bounds, the 1,000 cap, and 409 on a second cancel."""
    import httpx

    emulator = zocdoc_server.emulator
    base = next_weekday_at(8)
    for i in range(1005):
        emulator.book(PROVIDER, LOCATION, base + timedelta(minutes=i))
    async with httpx.AsyncClient(base_url=zocdoc_server.base_url) as anon:
        assert (await anon.get("/v1/appointments")).status_code == 401
        bad = await anon.post("/oauth/token", json={"grant_type": "client_credentials", "client_id": "x", "client_secret": "y",
                                                     "audience": emulator.audience})
        assert bad.status_code == 401
        token = (await anon.post("/oauth/token", json={"grant_type": "client_credentials", "client_id": emulator.client_id,
                                                        "client_secret": emulator.client_secret, "audience": emulator.audience})).json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    async with httpx.AsyncClient(base_url=zocdoc_server.base_url, headers=headers) as http:
        assert (await http.get("/v1/appointments", params={"page": 11})).status_code == 400
        assert (await http.get("/v1/appointments", params={"page_size": 101})).status_code == 400
        last = (await http.get("/v1/appointments", params={"page": 10, "page_size": 100})).json()
        assert last["data"] == [] and last["total_count"] == 1005 and last["next_url"] is None
        ninth = (await http.get("/v1/appointments", params={"page": 9, "page_size": 100})).json()
        assert len(ninth["data"]) == 100 and ninth["next_url"] is None
        some = next(iter(emulator.appointments))
        assert (await http.post("/v1/appointments/cancel", json={"appointment_id": some})).status_code == 200
        again = await http.post("/v1/appointments/cancel", json={"appointment_id": some})
        assert again.status_code == 409 and again.json()["error_type"] == "invalid_request"
        wrong = await http.post("/v1/appointments/cancel", json={"appointment_id": some, "cancellation_reason_type": "bored"})
        assert wrong.status_code == 400


async def test_malformed_record_is_skipped_by_name(zocdoc_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Zocdoc record with an unknown status or no start is reported as a problem; the others still sync."""
    emulator = zocdoc_server.emulator
    good = emulator.book(PROVIDER, LOCATION, next_weekday_at(9))
    odd = emulator.book(PROVIDER, LOCATION, next_weekday_at(10))
    emulator.appointments[odd]["status"] = "teleported"
    connector = _connector(zocdoc_server, monkeypatch, tmp_path)
    try:
        obs = {o.external_id: o for o in (await connector.pull(None)).observations}
        assert obs[good].problem is None
        assert "teleported" in (obs[odd].problem or "")
    finally:
        await connector.close()


async def test_maintain_names_the_url_to_register(zocdoc_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """At start the log says which webhook URL to give Zocdoc, or why push is off; never a secret."""
    from structlog.testing import capture_logs

    from syncbridge.connector import Host

    monkeypatch.setenv("ZD_KEY", "c2VjcmV0LWtleQ==")
    connector = _connector(zocdoc_server, monkeypatch, tmp_path, webhook_secret={"env": "ZD_KEY"})
    connector.host = Host(public_url="https://sync.practice.example/webhooks/zocdoc")
    with capture_logs() as logs:
        await connector.maintain()
        await connector.maintain()
    assert [e.get("url") for e in logs] == ["https://sync.practice.example/webhooks/zocdoc/appointments"]
    assert "c2VjcmV0" not in repr(logs)
    await connector.close()


async def test_unreadable_cursor_asks_for_a_full_resync(zocdoc_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A stored watermark that cannot be read makes the engine resync in full rather than fail forever."""
    from syncbridge.errors import CursorExpired

    connector = _connector(zocdoc_server, monkeypatch, tmp_path)
    try:
        with pytest.raises(CursorExpired):
            await connector.pull('{"since": "yesterday-ish"}')
    finally:
        await connector.close()
