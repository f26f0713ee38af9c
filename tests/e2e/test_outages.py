"""A system that stops answering loses no write (DESIGN section 9): the daemon, as a real process,
with the shipped attempt rules (``outbox.max_attempts`` 8) and a backoff cap shortened to 2 s,
while one whole system is stopped (connections refused, its data kept) for far longer than eight
attempts take, as in an EHR's maintenance window.

Clients book sessions in the directory; each reaches the EHR (where billing staff add an Encounter,
a charge and a draft claim) and the clinician's calendar. The EHR, the calendar or the directory is
then stopped; sessions are cancelled elsewhere meanwhile. The connector shows unhealthy with the
outage's length, a person is warned once the outage has lasted ``outbox.outage_warning``, nothing
is dead-lettered, and within about one backoff cap of the system's return every cancellation is
applied there (looked up in the system itself), the EHR's billing suppressed, and the warning closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from syncbridge.connector import Sandbox
from syncbridge.demo import sandbox_config
from syncbridge.emulation import free_port
from syncbridge.registry import connector_class
from syncbridge.store import Store
from tests.support.billing import SUPPRESSED, bill, billing_of, ehr_client
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.slow

CLINICIANS = {"dr_rivera": "Dr. Rivera", "dr_chen": "Dr. Chen"}
NY = ZoneInfo("America/New_York")
EHR, CALENDAR, DIRECTORY = "fhir_sandbox", "google_calendar_sandbox", "zocdoc_sandbox"
#: the shortened backoff cap, and what may pass beyond it before a write is seen in the system
#: (the apply itself: a cancellation in the EHR is a few requests, then the look)
BACKOFF_MAX = 2.0
SLACK = 3.0
OUTAGE_WARNING = 8.0
#: how long the system stays down: at a backoff of 1-2 s, well over ten failed attempts
OUTAGE = 25.0


@pytest.fixture
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sandbox]]:
    """The EHR, a calendar and the directory, fresh for each test."""
    workdir = tmp_path_factory.mktemp("systems")
    started: dict[str, Sandbox] = {}
    try:
        for name in (EHR, CALENDAR, DIRECTORY):
            sandbox = connector_class(name.removesuffix("_sandbox")).sandbox(workdir / name, list(CLINICIANS))
            if sandbox is None:
                pytest.skip(f"{name} cannot start here")
            started[name] = sandbox
        yield started
    finally:
        for s in started.values():
            s.close()


def _bill(sandbox: Sandbox, appointment: str) -> dict[str, str]:
    with ehr_client(sandbox) as http:
        return bill(http, appointment)


def _billing(sandbox: Sandbox, ids: dict[str, str]) -> dict[str, str]:
    with ehr_client(sandbox) as http:
        return billing_of(http, ids)


def _wait(daemon: DaemonProcess, what: str, check: Any, timeout: float, step: float = 0.2) -> float:
    """Seconds until ``check()`` held."""
    started = time.monotonic()
    while not check():
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited:\n{daemon.log.read_text()[-3000:]}")
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s\n{daemon.log.read_text()[-3000:]}")
        time.sleep(step)
    return time.monotonic() - started


@pytest.mark.parametrize(("down", "origin"), [(EHR, CALENDAR), (CALENDAR, EHR), (DIRECTORY, CALENDAR)], ids=["ehr", "calendar", "directory"])
def test_a_system_down_for_long_gets_every_cancellation_when_it_returns(
    sandboxes: dict[str, Sandbox], tmp_path: Path, down: str, origin: str
) -> None:
    """``down`` stopped for 25 s (over ten failed attempts each) while sessions are cancelled in
    ``origin``: no dead letter, the status and /readyz show the outage and a worklist item warns
    of it; within one backoff cap of the return every cancellation is in ``down`` (and every
    other system), billing suppressed in the EHR, the warning closed."""
    conf = sandbox_config(tmp_path, sandboxes, CLINICIANS, free_port(), poll_interval=1.0, push=False)
    conf["outbox"] = {"backoff_max": BACKOFF_MAX, "outage_warning": OUTAGE_WARNING}  # max_attempts stays 8
    conf["logging"] = {"level": "info", "json": True}
    daemon = DaemonProcess(tmp_path, conf)
    watch = Store(conf["store"]["path"])
    try:
        monday = datetime.now(NY).date() + timedelta(days=14 - datetime.now(NY).weekday())  # far from any late-cancel window
        booked: list[str] = []
        for n in range(6):  # clients book in the directory: each session lands in the EHR and the calendar
            clinician = list(CLINICIANS)[n % 2]
            start = datetime(monday.year, monday.month, monday.day, 9 + n, tzinfo=NY)
            assert sandboxes[DIRECTORY].book is not None
            booked.append(asyncio.run(sandboxes[DIRECTORY].book(clinician, start, start + timedelta(minutes=50))))

        def appointment_of(ext: str) -> str | None:
            link = watch.link_by_external(DIRECTORY, ext)
            return link.appointment_id if link is not None else None

        def copies(appt: str) -> dict[str, str]:
            return {name: link.external_id for name in sandboxes if (link := watch.link(name, appt)) is not None and link.external_id}

        _wait(daemon, "every booking in every system", lambda: all(
            (appt := appointment_of(ext)) and len(copies(appt)) == 3 for ext in booked
        ) and all(p == 0 for p, _ in watch.outbox_counts().values()), 60)
        sessions = [a for ext in booked if (a := appointment_of(ext))]
        billing = {appt: _bill(sandboxes[EHR], copies(appt)[EHR]) for appt in sessions}

        # --- the system stops; sessions are cancelled elsewhere meanwhile ----------------------
        victims = sessions[:3]
        injector = sandboxes[down].injector
        assert injector is not None and sandboxes[origin].delete_event is not None
        injector.outage(True)
        stopped = time.monotonic()
        try:
            for k, appt in enumerate(victims):
                time.sleep(1.0 if k == 0 else 4.0)
                asyncio.run(sandboxes[origin].delete_event(copies(appt)[origin]))
            _wait(daemon, "the cancellations merged", lambda: all(watch.appointment(a).cancelled for a in victims), 20)  # type: ignore[union-attr]
            _wait(daemon, "the outage warning", lambda: any(w.kind == "unreachable" and w.connector == down for w in watch.worklist()), OUTAGE)
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
            state = watch.connector_state(down)
            assert not state["healthy"] and "writes failing since" in state["note"], state
            ready = daemon.get("/readyz")
            assert ready.status_code == 503 and down in ready.json()["unhealthy"], ready.text
            attempts = dict(watch.conn.execute("SELECT appointment_id, attempts FROM outbox WHERE connector = ? AND dead = 0", (down,)).fetchall())
            expected = [a for a in victims if a in attempts]
            assert expected and max(attempts.values()) > 8, attempts  # far more than max_attempts already
            assert watch.dead_letters() == []
        finally:
            injector.outage(False)
        returned = time.monotonic()

        # --- back: every cancellation lands within one backoff cap -------------------------------
        def applied() -> bool:
            for appt in victims:
                for name, ext in copies(appt).items():
                    look = sandboxes[name].look
                    if look is not None and asyncio.run(look(ext)).state == "live":
                        return False
            return all(s == SUPPRESSED
                       for s in (_billing(sandboxes[EHR], billing[a]) for a in victims))

        took = _wait(daemon, f"every cancellation in {down} after its return", applied, 60, step=0.1)
        print(f"\n{down} down {returned - stopped:.0f}s; every cancellation applied {took:.1f}s after its return")
        assert took <= BACKOFF_MAX + SLACK, f"{took:.1f}s after the return"
        _wait(daemon, "billing reported", lambda: all(watch.appointment(a).fields["billing"] == "suppressed" for a in victims), 20)  # type: ignore[union-attr]
        _wait(daemon, "the warning closed", lambda: not any(w.kind == "unreachable" for w in watch.worklist()), 20)
        _wait(daemon, "healthy again", lambda: watch.connector_state(down)["healthy"], 20)
        assert watch.dead_letters() == []
        for appt in sessions[3:]:  # the others untouched
            assert not watch.appointment(appt).cancelled  # type: ignore[union-attr]
            assert all(asyncio.run(sandboxes[n].look(ext)).state == "live" for n, ext in copies(appt).items() if sandboxes[n].look)  # type: ignore[misc]
    finally:
        watch.close()
        assert daemon.stop() == 0
