"""Cancel once, anywhere: the daemon as a process against every installed system's sandbox.

Every connector type that offers a sandbox (its emulator or a real test server) is started, the
daemon runs as `syncbridge run`, and each system in turn is the origin of a change made the way
its users make it. The checks look at the systems themselves (``Sandbox.look``), not only at the
store: the session is cancelled or gone everywhere, no claim goes out, the slot is offered again.
Scenarios use only what a sandbox declares it can do, never a connector's name.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from syncbridge.config import load_config
from syncbridge.connector import Sandbox
from syncbridge.demo import sandbox_config, start_sandboxes
from syncbridge.emulation import free_port
from syncbridge.engine import Engine
from syncbridge.model import Billing, Role, empty_snapshot, iso, new_canonical_id
from syncbridge.registry import build_connectors, known_types
from syncbridge.store import Store
from tests.support.daemon import ROOT, DaemonProcess

pytestmark = pytest.mark.slow

NY = ZoneInfo("America/New_York")
NAMES = {"dr_rivera": "Dr. Rivera", "dr_chen": "Dr. Chen", "dr_okafor": "Dr. Okafor"}
PROPAGATION = 45.0  # seconds: a liveness bound for a slow CI machine, not a speed goal (see bench/)
SANDBOX_TYPES = known_types()


def _monday(weeks_ahead: int) -> datetime:
    today = datetime.now(NY).date()
    d = today + timedelta(days=7 * weeks_ahead - today.weekday())
    return datetime(d.year, d.month, d.day, tzinfo=NY)


@dataclass
class Practice:
    workdir: Path
    sandboxes: dict[str, Sandbox]
    daemon: DaemonProcess
    store: Store
    roles: dict[str, Role]
    #: appointments booked for each scenario, by label
    booked: dict[str, str] = field(default_factory=dict)
    config_path: Path = Path()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run(coro)

    def external_id(self, name: str, appointment_id: str) -> str | None:
        link = self.store.link(name, appointment_id)
        return link.external_id if link is not None and not link.gone else None

    def copies(self, appointment_id: str) -> dict[str, str]:
        """Sandbox name -> external id of every copy this appointment has."""
        return {n: ext for n in self.sandboxes if (ext := self.external_id(n, appointment_id))}

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float = PROPAGATION) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.daemon.proc.poll() is not None:
                raise AssertionError(f"daemon exited:\n{self.daemon.log.read_text()[-3000:]}")
            if predicate():
                return time.monotonic() - started
            time.sleep(0.3)
        raise AssertionError(f"not within {timeout}s: {what}\n{self.daemon.log.read_text()[-3000:]}")

    def seen(self, name: str, external_id: str):  # type: ignore[no-untyped-def]
        look = self.sandboxes[name].look
        assert look is not None
        return self.run(look(external_id))

    def settled(self) -> bool:
        counts = self.store.outbox_counts()
        return all(pending == 0 for pending, _ in counts.values())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "syncbridge.cli", *args, "--config", str(self.config_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )


def _session(clinician: str, start: datetime, **extra: object) -> dict[str, object]:
    return empty_snapshot() | {
        "clinician": clinician, "client_key": "client-" + new_canonical_id()[-8:], "start": iso(start),
        "end": iso(start + timedelta(minutes=50)), "timezone": "America/New_York", "service_code": "90834",
        "location": "Room 1",
    } | extra


@pytest.fixture(scope="module")
def practice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Practice]:
    workdir = tmp_path_factory.mktemp("everywhere")
    sandboxes = start_sandboxes(workdir, list(NAMES), say=lambda _text: None)
    try:
        port = free_port()
        conf = sandbox_config(workdir, sandboxes, NAMES, port, poll_interval=2.0)
        conf["logging"] = {"level": "info", "json": True}
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        connectors = build_connectors(load_config(path))
        # systems that push are not polled during the test: what comes from them comes by push
        for name, c in connectors.items():
            if c.capabilities.push:
                conf["connectors"][name] |= {"poll_interval": 3600, "full_sweep_interval": 86400}
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        cfg = load_config(path)
        roles = {n: c.capabilities.role for n, c in connectors.items()}
        store = Store(cfg.store.path)
        engine = Engine(store, connectors, cfg)
        booked: dict[str, str] = {}

        def book(label: str, snap: dict[str, object]) -> None:
            appt = new_canonical_id()
            engine.change(appt, snap, via="front-desk", kind="booked")
            booked[label] = appt

        week = _monday(1)
        # one dedicated session per possible origin, two hours apart so a freed slot is bookable again
        for i, type_name in enumerate(SANDBOX_TYPES):
            book(f"cancel:{type_name}_sandbox", _session("dr_rivera", week + timedelta(days=i % 5, hours=9 + 2 * (i // 5))))
        book("reschedule", _session("dr_rivera", week + timedelta(days=1, hours=15)))
        yesterday = datetime.now(NY).replace(hour=10, minute=0, second=0, microsecond=0) - timedelta(days=1)
        book("noshow", _session("dr_chen", yesterday))
        series = new_canonical_id()
        for n in range(4):
            book(f"series:{n}", _session("dr_chen", week + timedelta(days=7 * n + 2, hours=14), series_id=series))
        # weekly 10:00 sessions across the next spring-forward change (second Sunday of March)
        march = datetime(datetime.now(NY).year + 1, 3, 1, tzinfo=NY)
        change = march + timedelta(days=(6 - march.weekday()) % 7 + 7)
        for n, day in enumerate((change - timedelta(days=6), change + timedelta(days=1))):
            book(f"dst:{n}", _session("dr_okafor", day.replace(hour=10)))
        store.close()
        for c in connectors.values():
            asyncio.run(c.close())
        daemon = DaemonProcess(workdir, conf)
        p = Practice(workdir, sandboxes, daemon, Store(cfg.store.path), roles, booked, path)
        try:
            p.wait("every session mirrored everywhere", lambda: p.settled() and all(p.copies(a) for a in booked.values()), 180)
            yield p
        finally:
            assert daemon.stop() == 0
            p.store.close()
    finally:
        for s in sandboxes.values():
            s.close()


def _gone_or_cancelled(p: Practice, appointment_id: str, origin: str | None) -> Callable[[], bool]:
    def check() -> bool:
        appt = p.store.appointment(appointment_id)
        if appt is None or not appt.cancelled or not p.settled():
            return False
        for name, ext in p.copies(appointment_id).items():
            if name != origin and p.sandboxes[name].look and p.seen(name, ext).state == "live":
                return False
        return all(
            (lk.gone or p.seen(lk.connector, lk.external_id).state != "live")
            for lk, _ in p.store.links_for(appointment_id)
            if lk.connector in p.sandboxes and lk.external_id and p.sandboxes[lk.connector].look and lk.connector != origin
        )

    return check


def _claims_suppressed(p: Practice, appointment_id: str) -> None:
    if any(r == Role.RECORD for r in p.roles.values()):
        p.wait("billing suppressed in the EHR", lambda: (a := p.store.appointment(appointment_id)) is not None
               and a.fields.get("billing") in (Billing.SUPPRESSED, Billing.FEE_SELF_PAY))


def _slot_offered_again(p: Practice, appointment_id: str) -> None:
    appt = p.store.appointment(appointment_id)
    assert appt is not None
    start = appt.start.astimezone(NY)
    for name, sandbox in p.sandboxes.items():
        offered = sandbox.offered
        if offered is None or appt.fields["clinician"] not in sandbox.accounts:
            continue
        p.wait(f"{name} offers the freed {start:%a %H:%M} slot",
               lambda offered=offered: start in p.run(offered(appt.fields["clinician"], start.date())))


@pytest.mark.parametrize("origin_type", SANDBOX_TYPES)
def test_cancel_once_anywhere(practice: Practice, origin_type: str) -> None:
    p, origin = practice, f"{origin_type}_sandbox"
    sandbox = p.sandboxes.get(origin)
    if sandbox is None or sandbox.delete_event is None:
        pytest.skip(f"{origin_type} offers no way to cancel as its users do")
    appt = p.booked[f"cancel:{origin}"]
    ext = p.external_id(origin, appt)
    if ext is None and sandbox.book is not None:
        # a directory holds only what clients booked through it: a client books, then cancels
        appt, ext = _booked_in(p, origin, "dr_rivera", _monday(2) + timedelta(days=2, hours=13))
    if ext is None:
        pytest.skip(f"{origin_type} holds no copy of a session booked elsewhere")
    p.run(sandbox.delete_event(ext))
    p.wait(f"cancelled in {origin} -> cancelled everywhere", _gone_or_cancelled(p, appt, origin))
    record = p.store.appointment(appt)
    assert record is not None and record.fields["cancellation"]["via"] == origin
    _claims_suppressed(p, appt)
    _slot_offered_again(p, appt)


def test_reschedule_reaches_every_system(practice: Practice) -> None:
    p = practice
    appt = p.booked["reschedule"]
    origin = next((n for n in p.copies(appt) if p.sandboxes[n].move and p.roles[n] == Role.RECORD), None) or next(
        (n for n in p.copies(appt) if p.sandboxes[n].move), None
    )
    if origin is None:
        pytest.skip("no sandbox can move a session")
    record = p.store.appointment(appt)
    assert record is not None
    new_start = record.start + timedelta(days=1, hours=-1)
    move = p.sandboxes[origin].move
    assert move is not None
    p.run(move(p.copies(appt)[origin], new_start, new_start + timedelta(minutes=50)))

    def moved_everywhere() -> bool:
        return p.settled() and all(
            p.seen(n, ext).start == new_start for n, ext in p.copies(appt).items() if p.sandboxes[n].look
        )

    p.wait(f"moved in {origin} -> moved everywhere", moved_everywhere)
    now = p.store.appointment(appt)
    assert now is not None and now.start == new_start and not now.cancelled


def test_no_show_with_fee(practice: Practice) -> None:
    p = practice
    appt = p.booked["noshow"]
    done = p.cli("cancel", appt, "--kind", "no_show", "--by", "client")
    assert done.returncode == 0, done.stderr
    assert "no_show" in done.stdout and "fee charge" in done.stdout
    p.wait("no-show applied everywhere", _gone_or_cancelled(p, appt, None))
    record = p.store.appointment(appt)
    assert record is not None and record.fields["status"] == "noshow"
    if any(r == Role.RECORD for r in p.roles.values()):
        p.wait("self-pay fee instead of a claim",
               lambda: (a := p.store.appointment(appt)) is not None and a.fields.get("billing") == Billing.FEE_SELF_PAY)


def test_cancel_one_occurrence_of_a_weekly_series(practice: Practice) -> None:
    p = practice
    target = p.booked["series:1"]
    origin = next((n for n in p.copies(target) if p.sandboxes[n].delete_event and p.roles[n] == Role.MIRROR), None)
    if origin is None:
        pytest.skip("no calendar sandbox")
    delete = p.sandboxes[origin].delete_event
    assert delete is not None
    p.run(delete(p.copies(target)[origin]))
    p.wait("one occurrence cancelled everywhere", _gone_or_cancelled(p, target, origin))
    for n in (0, 2, 3):
        other = p.booked[f"series:{n}"]
        record = p.store.appointment(other)
        assert record is not None and not record.cancelled, f"occurrence {n} must stay booked"
        for name, ext in p.copies(other).items():
            if p.sandboxes[name].look:
                assert p.seen(name, ext).state == "live", f"occurrence {n} in {name}"


def test_week_across_daylight_saving_keeps_local_time(practice: Practice) -> None:
    p = practice
    for label in ("dst:0", "dst:1"):
        appt = p.booked[label]
        offsets = set()
        for name, ext in p.copies(appt).items():
            if not p.sandboxes[name].look:
                continue
            copy = p.seen(name, ext)
            assert copy.start is not None
            local = copy.start.astimezone(NY)
            assert (local.hour, local.minute) == (10, 0), f"{label} in {name} shows {local}"
            offsets.add(copy.start.astimezone(UTC).hour)
        assert len(offsets) == 1
    before = p.store.appointment(p.booked["dst:0"])
    after = p.store.appointment(p.booked["dst:1"])
    assert before is not None and after is not None
    assert before.start.astimezone(UTC).hour == 15 and after.start.astimezone(UTC).hour == 14


def _booked_in(p: Practice, origin: str, clinician: str, start: datetime) -> tuple[str, str]:
    """A client books in ``origin``; returns (appointment, external id) once every system has it."""
    book = p.sandboxes[origin].book
    assert book is not None
    ext = p.run(book(clinician, start, start + timedelta(minutes=50)))
    found: dict[str, str] = {}

    def everywhere() -> bool:
        link = p.store.link_by_external(origin, ext)
        if link is None:
            return False
        found["appointment"] = link.appointment_id
        wanted = {n for n, s in p.sandboxes.items() if clinician in s.accounts and n != origin and p.roles[n] != Role.CHANNEL}
        return p.settled() and wanted <= set(p.copies(link.appointment_id))

    p.wait(f"booked in {origin} -> in the EHR and the calendars", everywhere)
    return found["appointment"], ext


def test_booking_in_a_directory_reaches_the_ehr_and_the_calendar(practice: Practice) -> None:
    p = practice
    origin = next((n for n, s in p.sandboxes.items() if s.book), None)
    if origin is None:
        pytest.skip("no directory sandbox")
    start = _monday(2) + timedelta(days=3, hours=11)
    appt, _ = _booked_in(p, origin, "dr_okafor", start)
    record = p.store.appointment(appt)
    assert record is not None and record.start == start and record.fields["clinician"] == "dr_okafor"
    for name, ext in p.copies(appt).items():
        if p.sandboxes[name].look:
            copy = p.seen(name, ext)
            assert copy.state == "live" and copy.start == start, name


def test_directory_booking_cancelled_in_a_calendar(practice: Practice) -> None:
    """A client booked through the directory; the therapist deletes the event in their calendar."""
    p = practice
    directory = next((n for n, s in p.sandboxes.items() if s.book and s.look), None)
    if directory is None:
        pytest.skip("no directory sandbox")
    appt, ext = _booked_in(p, directory, "dr_chen", _monday(2) + timedelta(days=1, hours=10))
    calendar = next((n for n in p.copies(appt) if p.roles[n] == Role.MIRROR and p.sandboxes[n].delete_event), None)
    if calendar is None:
        pytest.skip("no calendar sandbox")
    delete = p.sandboxes[calendar].delete_event
    assert delete is not None
    p.run(delete(p.copies(appt)[calendar]))
    p.wait(f"deleted in {calendar} -> cancelled in {directory} and the EHR", _gone_or_cancelled(p, appt, calendar))
    assert p.seen(directory, ext).state == "cancelled"
    _claims_suppressed(p, appt)
    _slot_offered_again(p, appt)


def test_audit_chain_verifies_after_everything(practice: Practice) -> None:
    done = practice.cli("audit", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
