"""A clinician off sick: 30 sessions over three days cancelled in bulk, seen through in all five systems.

Clients book the sessions in the directory (so each is in the directory, the EHR and three
calendars); billing staff add an Encounter, a billable charge and a draft claim for each in the
EHR. Then the admin runs ``syncbridge bulk cancel`` as a person runs it, beside the daemon (a real
process). Done means observed in each system: no calendar, EHR or directory shows a session live,
every charge and claim is suppressed in the EHR itself, the record says ``billing: suppressed``,
and the directory offers the freed hours again. Shared by tests/e2e/test_bulk_cancel.py (asserts)
and bench/bulk_cancel.py (timing and calls at a vendor-like latency).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo


from syncbridge.connector import Sandbox
from syncbridge.demo import sandbox_config
from syncbridge.emulation import free_port
from syncbridge.registry import connector_class
from syncbridge.store import Store
from tests.support.billing import SUPPRESSED, bill, billing_of, ehr_client
from tests.support.daemon import ROOT, DaemonProcess

CLINICIANS = {"dr_rivera": "Dr. Rivera", "dr_chen": "Dr. Chen"}
SICK = "dr_rivera"
NY = ZoneInfo("America/New_York")
EHR, DIRECTORY = "fhir_sandbox", "zocdoc_sandbox"
SYSTEMS = ("fhir", "google_calendar", "microsoft365", "caldav", "zocdoc")
#: ten sessions a day, on the hour: more than a day's working hours hold, so none is offered before
HOURS = range(8, 18)


@dataclass
class Outcome:
    sessions: int
    #: seconds from the command to: the record changed, every copy gone, billing suppressed, slots offered
    seconds: dict[str, float] = field(default_factory=dict)
    #: HTTP requests per system during the operation, and API calls by kind where a sandbox counts them
    requests: dict[str, int] = field(default_factory=dict)
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    output: str = ""


def start_systems(workdir: Path) -> dict[str, Sandbox]:
    started: dict[str, Sandbox] = {}
    try:
        for t in SYSTEMS:
            sandbox = connector_class(t).sandbox(workdir / t, list(CLINICIANS))
            if sandbox is None:
                raise RuntimeError(f"the {t} sandbox cannot start here")
            started[f"{t}_sandbox"] = sandbox
    except BaseException:
        for s in started.values():
            s.close()
        raise
    return started


def _until(daemon: DaemonProcess, what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited:\n{daemon.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{daemon.log.read_text()[-3000:]}")
        time.sleep(0.1)


def weekdays_from(first: date, n: int) -> list[date]:
    days: list[date] = []
    day = first
    while len(days) < n:
        if day.weekday() < 5:
            days.append(day)
        day += timedelta(days=1)
    return days


def run(workdir: Path, *, latency: float = 0.0, timeout: float = 120.0) -> Outcome:
    systems = start_systems(workdir / "systems")
    try:
        conf = sandbox_config(workdir, systems, CLINICIANS, free_port(), poll_interval=30.0, push=True)
        conf["logging"] = {"level": "info", "json": True}
        daemon = DaemonProcess(workdir, conf)
        watch = Store(conf["store"]["path"], migrate=False)
        try:
            return _scenario(workdir, systems, daemon, watch, latency, timeout)
        finally:
            watch.close()
            daemon.stop()
    finally:
        for s in systems.values():
            s.close()


def _scenario(workdir: Path, systems: dict[str, Sandbox], daemon: DaemonProcess, watch: Store, latency: float, timeout: float) -> Outcome:
    days = weekdays_from(datetime.now(NY).date() + timedelta(days=2), 3)
    directory = systems[DIRECTORY]
    assert directory.book is not None and directory.offered is not None
    booked = [
        asyncio.run(directory.book(SICK, start, start + timedelta(minutes=50)))
        for day in days for h in HOURS for start in [datetime(day.year, day.month, day.day, h, tzinfo=NY)]
    ]

    def appointment_of(ext: str) -> str | None:
        link = watch.link_by_external(DIRECTORY, ext)
        return link.appointment_id if link is not None else None

    def copies(appt: str) -> dict[str, str]:
        return {name: link.external_id for name in systems if (link := watch.link(name, appt)) is not None and link.external_id}

    _until(daemon, "every booking in every system", lambda: all(
        (a := appointment_of(ext)) and len(copies(a)) == len(systems) for ext in booked
    ) and all(p == 0 for p, _ in watch.outbox_counts().values()), timeout)
    sessions = [a for ext in booked if (a := appointment_of(ext))]
    with ehr_client(systems[EHR]) as http:
        billing = {a: bill(http, copies(a)[EHR]) for a in sessions}
    _until(daemon, "nothing offered on the full days", lambda: all(not asyncio.run(directory.offered(SICK, d)) for d in days), timeout)

    for s in systems.values():
        if s.injector is not None:
            s.injector.configure(latency=latency)
            s.injector.reset_counts()
    before = {name: dict(s.calls()) for name, s in systems.items() if s.calls is not None}
    out = Outcome(len(sessions))
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", "bulk", "cancel", "--clinician", SICK, "--from", days[0].isoformat(),
         "--to", days[-1].isoformat(), "--reason", "illness", "--yes", "--user", "office-admin", "--config", str(daemon.path)],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    out.output = done.stdout + done.stderr
    assert done.returncode == 0, out.output
    out.seconds["record"] = time.monotonic() - t0

    def gone_everywhere() -> bool:
        for a in sessions:
            for name, ext in copies(a).items():
                look = systems[name].look
                if look is not None and asyncio.run(look(ext)).state == "live":
                    return False
        return True

    _until(daemon, "every copy cancelled", gone_everywhere, timeout)
    out.seconds["copies"] = time.monotonic() - t0

    def suppressed() -> bool:
        with ehr_client(systems[EHR]) as http:
            seen = [billing_of(http, ids) for ids in billing.values()]
        return all(s == SUPPRESSED for s in seen) and all(
            (a2 := watch.appointment(a)) is not None and a2.fields["billing"] == "suppressed" for a in sessions)

    _until(daemon, "every claim suppressed, seen in the EHR", suppressed, timeout)
    out.seconds["billing"] = time.monotonic() - t0
    nine = [datetime(d.year, d.month, d.day, 9, tzinfo=NY) for d in days]
    _until(daemon, "the freed hours offered again", lambda: all(
        n in asyncio.run(directory.offered(SICK, d)) for n, d in zip(nine, days, strict=True)), timeout)
    out.seconds["slots"] = time.monotonic() - t0
    _until(daemon, "nothing left to write", lambda: all(p == 0 for p, _ in watch.outbox_counts().values()), timeout)
    out.seconds["settled"] = time.monotonic() - t0
    out.requests = {name: s.injector.requests for name, s in systems.items() if s.injector is not None}
    out.calls = {name: {k: v - before[name].get(k, 0) for k, v in s.calls().items() if v - before[name].get(k, 0)}
                 for name, s in systems.items() if s.calls is not None}
    assert watch.dead_letters() == [], watch.dead_letters()
    return out
