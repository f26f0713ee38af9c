"""`syncbridge run` as a process against the Zocdoc emulator: the directory always shows exactly the free slots.

Zocdoc withdraws a booked slot by itself and does not offer it again when the booking is
cancelled (connectors/zocdoc/emulator_slots.py), so the daemon must compare what the directory
shows with what it should show. Clients book and cancel in the emulator, which sends signed
webhooks to the daemon; the checks look at the slots the emulator offers.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from syncbridge.emulation import free_port
from syncbridge.publisher import decode_slots
from syncbridge.store import Store
from syncbridge_connectors.zocdoc.emulator import Running, ZocdocEmulator, running
from syncbridge_connectors.zocdoc.webhooks import WEBHOOK_PATH
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.slow

ZONE = "America/New_York"
NY = ZoneInfo(ZONE)
CLINICIANS = ("dr_lee", "dr_ortiz")
#: a slot whose session (50 min plus the 10-minute buffer after) would touch a booking's
OVERLAP = timedelta(minutes=60)


@dataclass
class Directory:
    tmp: Path
    server: Running
    conf: dict[str, Any]
    key: str

    @property
    def emulator(self) -> ZocdocEmulator:
        return self.server.emulator

    def start(self) -> DaemonProcess:
        daemon = DaemonProcess(self.tmp, self.conf)
        self.emulator.sender.register(f"{daemon.url}/webhooks/zocdoc{WEBHOOK_PATH}", self.key)
        return daemon

    def offered(self, clinician: str, day: date) -> list[datetime]:
        return self.emulator.published(f"pr_{clinician}", day)

    def mismatches(self) -> list[str]:
        """Dates whose offered slots differ from what the daemon wants shown, or that wait for a write."""
        store = Store(self.tmp / "store.db")
        try:
            out = []
            states = store.slot_states("zocdoc")
            for s in states:
                wanted = sorted(x.start for x in decode_slots(s.slots, NY))
                shown = self.offered(s.clinician, date.fromisoformat(s.day))
                if wanted != shown or s.due_at is not None or s.dead:
                    out.append(f"{s.clinician} {s.day}: wanted {len(wanted)}, shown {len(shown)}, due {s.due_at is not None}")
            return out if states else ["nothing planned yet"]
        finally:
            store.close()


def wait(daemon: DaemonProcess, what: str, predicate: Any, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited:\n{daemon.log.read_text()[-3000:]}")
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}\n{daemon.log.read_text()[-3000:]}")


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Directory]:
    server = running(ZocdocEmulator(client_id="slots-e2e", client_secret=secrets.token_urlsafe(16), seed=7))
    server.emulator.sender.retry_base = 0.2
    for k in CLINICIANS:
        server.emulator.add_provider(f"pr_{k}", f"lo_{k}", ZONE)
    secret = tmp_path / "zocdoc-secret"
    secret.write_text(server.emulator.client_secret)
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    (tmp_path / "zocdoc-hook").write_text(key)
    port = free_port()
    conf = {
        "practice": {"name": "Lakeside Therapy", "timezone": ZONE},
        "store": {"path": str(tmp_path / "store.db")},
        "http": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
        "logging": {"level": "info", "json": True},
        "clinicians": {k: {"accounts": {"zocdoc": {"provider_id": f"pr_{k}", "location_id": f"lo_{k}"}}} for k in CLINICIANS},
        "connectors": {"zocdoc": {
            "type": "zocdoc", "environment": "sandbox", "base_url": server.base_url, "token_url": server.token_url,
            "client_id": server.emulator.client_id, "client_secret": {"file": str(secret)},
            "webhook_secret": {"file": str(tmp_path / "zocdoc-hook")}, "poll_interval": 600,
        }},
        "availability": {"horizon_days": 7, "minimum_notice_hours": 0},
    }
    try:
        yield Directory(tmp_path, server, conf, key)
    finally:
        server.stop()


def working_day(days_ahead: int = 1) -> date:
    d = datetime.now(NY).date() + timedelta(days=days_ahead)
    while d.weekday() >= 5:
        d += timedelta(days=1)
    return d


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=NY)


def test_booked_and_cancelled_within_a_second_is_offered_again(directory: Directory) -> None:
    """A client books and cancels within half a second: Zocdoc withdrew the slot, the daemon offers it again within seconds."""
    daemon = directory.start()
    try:
        wait(daemon, "the first publish", lambda: not directory.mismatches(), 30)
        day = working_day()
        eleven = at(day, 11)
        assert eleven in directory.offered("dr_lee", day)
        appt = directory.emulator.book("pr_dr_lee", "lo_dr_lee", eleven)
        assert eleven not in directory.offered("dr_lee", day)  # the directory withdrew it
        time.sleep(0.4)
        directory.emulator.patient_cancel(appt)
        seconds = wait(daemon, "the slot offered again", lambda: eleven in directory.offered("dr_lee", day), 10)
        assert seconds < 5
        wait(daemon, "every date as wanted", lambda: not directory.mismatches(), 10)
    finally:
        assert daemon.stop() == 0


def test_booked_and_cancelled_while_down_is_offered_again(directory: Directory) -> None:
    """Booked and cancelled while the daemon was stopped: within seconds of its start the slot is offered again."""
    daemon = directory.start()
    day = working_day(2)
    ten = at(day, 10)
    try:
        wait(daemon, "the first publish", lambda: not directory.mismatches(), 30)
    finally:
        assert daemon.stop() == 0
    directory.emulator.sender.url = None  # nobody listens: no webhook tells of what follows
    appt = directory.emulator.book("pr_dr_ortiz", "lo_dr_ortiz", ten)
    directory.emulator.patient_cancel(appt)
    assert ten not in directory.offered("dr_ortiz", day)
    daemon = directory.start()
    try:
        seconds = wait(daemon, "the slot offered again", lambda: ten in directory.offered("dr_ortiz", day), 15)
        assert seconds < 8
        wait(daemon, "every date as wanted", lambda: not directory.mismatches(), 10)
    finally:
        assert daemon.stop() == 0


def test_booking_withdraws_overlapping_slots_and_a_race_is_raised(directory: Directory) -> None:
    """A booking withdraws every slot overlapping it within 5 s; a second booking that raced into one of
    them is kept, and a worklist item names both sessions."""
    daemon = directory.start()
    try:
        wait(daemon, "the first publish", lambda: not directory.mismatches(), 30)
        day = working_day()
        two = at(day, 14)
        first = directory.emulator.book("pr_dr_lee", "lo_dr_lee", two)
        racing = directory.emulator.book("pr_dr_lee", "lo_dr_lee", two + timedelta(minutes=30))  # still offered for an instant
        seconds = wait(daemon, "overlapping slots withdrawn",
                       lambda: not [s for s in directory.offered("dr_lee", day) if abs(s - two) < OVERLAP], 10)
        assert seconds < 5
        store = Store(directory.tmp / "store.db")
        try:
            wait(daemon, "the double booking raised", lambda: [w for w in store.worklist() if w.kind == "double_booking"], 10)
            [item] = [w for w in store.worklist() if w.kind == "double_booking"]
            ids = [link.appointment_id for link in (store.link_by_external("zocdoc", first), store.link_by_external("zocdoc", racing))]
            assert all(i in item.instruction for i in ids) and "Both are kept" in item.instruction
            assert [store.appointment(i).fields["status"] for i in ids] == ["booked", "booked"]  # nothing lost
            directory.emulator.patient_cancel(racing)  # the practice moves one client: the item closes by itself
            wait(daemon, "the item closed", lambda: not [w for w in store.worklist() if w.kind == "double_booking"], 10)
        finally:
            store.close()
    finally:
        assert daemon.stop() == 0


def test_every_date_converges_after_intermittent_failures(directory: Directory) -> None:
    """With 30% of timeslot PUTs failing (half of them landing with the answer lost), bookings still withdraw
    their overlapping slots within seconds, and every date shows exactly its free slots within 30 s of the
    failures stopping."""
    daemon = directory.start()
    try:
        wait(daemon, "the first publish", lambda: not directory.mismatches(), 30)
        directory.emulator.timeslot_put_failures = 0.3
        withdrawn: list[float] = []
        booked: list[tuple[str, datetime]] = []
        for n in range(12):
            clinician = CLINICIANS[n % 2]
            day = working_day(1 + n % 4)
            taken = [b for c, b in booked if c == clinician and b.date() == day]
            start = next(s for s in directory.offered(clinician, day) if all(abs(s - b) >= 2 * OVERLAP for b in taken))
            appt = directory.emulator.book(f"pr_{clinician}", f"lo_{clinician}", start)
            withdrawn.append(wait(daemon, f"slots around {start} withdrawn", lambda c=clinician, d=day, s=start: not [
                x for x in directory.offered(c, d) if abs(x - s) < OVERLAP], 10))
            if n % 3 == 2:
                directory.emulator.patient_cancel(appt)  # and offered again once the directory takes a write
            else:
                booked.append((clinician, start))
        assert sum(directory.emulator.put_failures.values()) > 0
        directory.emulator.timeslot_put_failures = 0.0
        stopped = time.monotonic()
        wait(daemon, "every date as wanted", lambda: not directory.mismatches(), 30)
        print(f"withdrawn after {sorted(round(w, 2) for w in withdrawn)} s; converged {time.monotonic() - stopped:.1f} s "
              f"after the failures stopped; failures {directory.emulator.put_failures}")
        assert max(withdrawn) < 10  # a bad streak (four failures in a row) costs about 6 s: the backoff stops at 2 s
    finally:
        assert daemon.stop() == 0
