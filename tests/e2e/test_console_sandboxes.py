"""The front desk cancels one session in the console, and its receipt fills in across all five
sandbox systems (the FHIR EHR, Google, Outlook, CalDAV on Radicale, Zocdoc): a real headless
Chromium against `syncbridge run` as a process. Each system is then asked itself."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from syncbridge.demo import sandbox_config
from syncbridge.emulation import free_port
from syncbridge.store import Store
from tests.e2e.test_console_browser import _login, _shot, cancel_and_watch, chromium, console_section
from tests.e2e.test_daemon import TOKEN
from tests.support.bulk_scenario import CLINICIANS, DIRECTORY, NY, SICK, start_systems, weekdays_from
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.slow


def _config(tmp: Path, systems: dict[str, Any]) -> dict[str, Any]:
    conf = sandbox_config(tmp, systems, CLINICIANS, free_port(), poll_interval=30.0, push=True)
    conf["http"]["token"] = {"env": "SB_STATUS_TOKEN"}
    return conf | {"console": console_section(tmp)}


def test_front_desk_cancel_is_seen_in_all_five_systems(tmp_path: Path) -> None:
    systems = start_systems(tmp_path / "systems")
    try:
        conf = _config(tmp_path, systems)
        d = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN, "SB_CONSOLE_KEY": "console-key-for-the-browser-tests-0123"})
        watch = Store(conf["store"]["path"], migrate=False)
        try:
            day = weekdays_from(datetime.now(NY).date() + timedelta(days=3), 1)[0]
            start = datetime(day.year, day.month, day.day, 11, tzinfo=NY)
            booked = asyncio.run(systems[DIRECTORY].book(SICK, start, start + timedelta(minutes=50)))  # type: ignore[misc]

            def appointment() -> str | None:
                link = watch.link_by_external(DIRECTORY, booked)
                return link.appointment_id if link is not None else None

            def copies() -> dict[str, str]:
                appt = appointment()
                found = {n: link.external_id for n in systems if appt and (link := watch.link(n, appt)) is not None and link.external_id}
                return found

            d.wait_for(lambda: len(copies()) == 5, 60)
            appt = appointment()
            assert appt is not None
            with chromium() as browser:
                page = _login(browser, d, "fran")
                page.goto(f"{d.url}/console/sessions?date={day.isoformat()}")
                page.locator(f'a[href="/console/appointments/{appt}"]').click()
                receipt = cancel_and_watch(page, appt, systems=5)
                assert re.fullmatch(r"Cancelled in 5 of 5 systems in \d+\.\d s", receipt), receipt
                table = page.get_by_role("table", name="Systems").inner_text()
                assert all(name in table for name in systems), table
                _shot(page, "receipt-five-systems")
            for name, ext in copies().items():  # asked of each system itself, not of our records
                look = systems[name].look
                assert look is not None and asyncio.run(look(ext)).state != "live", name
        finally:
            watch.close()
            assert d.stop() == 0
    finally:
        for s in systems.values():
            s.close()
