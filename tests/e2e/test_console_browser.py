"""The console in a real headless Chromium (Debian's package, driven by Playwright), against
`syncbridge run` as a process with a record system and a calendar (the replica vendor).

Screenshots of the main pages are kept in test-artifacts/console-*.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from syncbridge.console.passwords import hash_password
from syncbridge.emulation import free_port
from syncbridge.store import Store
from tests.e2e.test_daemon import TOKEN, config, seed, synced
from tests.support.daemon import DaemonProcess
from tests.support.replica import ReplicaVendor

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NY = ZoneInfo("America/New_York")
USERS = {"fran": ("front_desk", "front-desk-password"), "ada": ("admin", "admin-password-0"), "vera": ("viewer", "viewer-password-0")}


def console_section(tmp: Path) -> dict[str, Any]:
    """The console on, with USERS (their password hashes in 0600 files, as an admin keeps them)."""
    users = {}
    for name, (role, password) in USERS.items():
        secret = tmp / f"console-{name}"
        secret.write_text(hash_password(password) + "\n")
        secret.chmod(0o600)
        users[name] = {"role": role, "password_hash": {"file": str(secret)}}
    return {"enabled": True, "session_key": {"env": "SB_CONSOLE_KEY"}, "users": users}


def _console_config(tmp: Path) -> dict[str, Any]:
    return config(tmp, free_port()) | {"console": console_section(tmp)}


@contextmanager
def chromium() -> Iterator[Any]:
    """Playwright's sync API runs an event loop of its own: start it after any asyncio.run (seeding)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _start(tmp: Path, conf: dict[str, Any]) -> DaemonProcess:
    return DaemonProcess(tmp, conf, env={"SB_STATUS_TOKEN": TOKEN, "SB_CONSOLE_KEY": "console-key-for-the-browser-tests-0123"})


def _login(browser: Any, d: DaemonProcess, name: str, **context: Any) -> Any:
    page = browser.new_context(**({"viewport": {"width": 1280, "height": 900}} | context)).new_page()
    page.goto(d.url + "/")  # a browser without the token is sent to the console's login
    assert page.url.startswith(d.url + "/console/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(USERS[name][1])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r".*/console/sessions"))
    return page


def cancel_and_watch(page: Any, appt: str, *, systems: int, waive: bool = False, tries: int = 150) -> str:
    """On a session's page: cancel it as the clinician's ("clinician unwell"), then reload until
    the receipt says every one of ``systems`` holds it; returns the receipt line."""
    page.get_by_label("Cancelled by").select_option("clinician")
    page.get_by_label("Reason (kept in the store and the EHR only)").fill("clinician unwell")
    if waive:
        page.get_by_label("Waive any late-cancel fee").check()
    page.get_by_role("button", name="Cancel session").click()
    page.wait_for_url(re.compile(rf".*/console/appointments/{appt}\?done=cancelled"))
    assert "Cancelled. The systems below fill in" in page.get_by_role("status").inner_text()
    for _ in range(tries):
        if f"Cancelled in {systems} of {systems} systems" in page.locator("#receipt").inner_text():
            break
        page.wait_for_timeout(200)
        page.reload()
    return str(page.locator("#receipt").inner_text())


def _shot(page: Any, name: str, full: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=full)


def _audit(tmp: Path, kind: str) -> list[dict[str, Any]]:
    store = Store(tmp / "store.db", migrate=False)
    try:
        return store.audit_entries(kind=kind, limit=20)
    finally:
        store.close()


def _session_day(tmp: Path) -> tuple[str, str]:
    """(id, local day) of the third seeded session."""
    store = Store(tmp / "store.db", migrate=False)
    try:
        appt = store.appointments()[2]
        return appt.id, appt.start.astimezone(NY).date().isoformat()
    finally:
        store.close()


def test_front_desk_cancels_a_session_and_watches_its_receipt_fill_in(tmp_path: Path) -> None:
    """Logged in as front desk, a person finds the session, cancels it with a reason, and sees
    "Cancelled in 2 of 2 systems" once the calendar removed it and the EHR applied it."""
    seed(tmp_path, 5)
    d = _start(tmp_path, _console_config(tmp_path))
    try:
        d.wait_for(lambda: synced(tmp_path, 5), 30)
        with chromium() as browser:
            appt, day = _session_day(tmp_path)
            page = _login(browser, d, "fran")
            page.goto(f"{d.url}/console/sessions?date={day}")
            section = page.get_by_role("region", name="Dr. Lee")
            assert section.locator("tbody tr").count() >= 5
            assert "cal: live" in section.inner_text() and "ehr: live" in section.inner_text()
            _shot(page, "sessions")
            page.locator(f'a[href="/console/appointments/{appt}"]').click()
            receipt = cancel_and_watch(page, appt, systems=2, waive=True)
            assert re.fullmatch(r"Cancelled in 2 of 2 systems in \d+\.\d s", receipt), receipt
            systems = page.get_by_role("table", name="Systems").inner_text()
            assert "removed" in systems and "applied" in systems
            assert "clinician unwell" in page.locator("dl.facts").inner_text()
            assert page.get_by_role("button", name="Cancel session").count() == 0
            history = page.get_by_role("table", name="History").inner_text()
            assert "cancelled" in history and "console" in history and "user fran" in history and history.count("applied") >= 2
            _shot(page, "receipt")
    finally:
        assert d.stop() == 0
    live = asyncio.run(ReplicaVendor(str(tmp_path / "cal.db")).live())
    assert len(live) == 4
    entry = _audit(tmp_path, "cancelled")[0]
    assert entry["appointment_id"] == appt and entry["detail"]["user"] == "fran" and entry["detail"]["action"] == "cancel"


def _seed_three_days(tmp: Path) -> list[str]:
    """Ten sessions a day for Dr. Lee on the three days after tomorrow (New York time): 30 in all."""
    ehr = ReplicaVendor(str(tmp / "ehr.db"))
    first = datetime.now(NY).date() + timedelta(days=2)
    days = [first + timedelta(days=i) for i in range(3)]
    for day in days:
        for hour in range(8, 18):
            start = datetime(day.year, day.month, day.day, hour, tzinfo=NY).astimezone(UTC)
            asyncio.run(ehr.book(start, start + timedelta(minutes=50), f"k{day.day}-{hour}", clinician="dr_lee"))
    return [d.isoformat() for d in days]


def test_an_admin_previews_and_confirms_a_bulk_cancel_of_three_days(tmp_path: Path) -> None:
    """The admin selects Dr. Lee's next three days, sees the 30 sessions, the systems and claims each
    touches, confirms once, and watches the operation complete in both systems."""
    days = _seed_three_days(tmp_path)
    d = _start(tmp_path, _console_config(tmp_path))
    try:
        d.wait_for(lambda: synced(tmp_path, 30), 60)
        with chromium() as browser:
            page = _login(browser, d, "ada")
            page.get_by_role("link", name="Bulk operations").click()
            page.get_by_label("Dr. Lee").check()
            page.get_by_label("First day").fill(days[0])
            page.get_by_label("Last day (included)").fill(days[-1])
            page.get_by_label("Cancel the sessions").check()
            page.get_by_label("Cancelled by (cancel, no-show)").select_option("clinician")
            page.get_by_label("Reason (kept in the store and the EHR only)").fill("illness")
            _shot(page, "bulk-form")
            page.get_by_role("button", name="Preview").click()
            assert page.locator("#summary").inner_text() == "30 sessions would change; 0 left out"
            assert "30 in cal, 30 in ehr" in page.locator("main").inner_text()
            assert "30 claim to be suppressed" in page.locator("main").inner_text()
            assert page.get_by_role("table", name="Would change").locator("tbody tr").count() == 30
            _shot(page, "bulk-preview")
            store = Store(tmp_path / "store.db", migrate=False)
            assert all(a.fields["status"] == "booked" for a in store.appointments())  # a preview changes nothing
            store.close()
            page.get_by_role("button", name=re.compile(r"Confirm: cancel the sessions \(30\)")).click()
            page.wait_for_url(re.compile(r".*/console/operations/op-[0-9a-f]+"))
            page.wait_for_selector("#progress .pill.live", timeout=60_000)  # the page reloads itself until done
            progress = page.locator("#progress").inner_text()
            assert progress.startswith("cancel: 30 of 30 sessions changed") and progress.endswith("done")
            systems = page.get_by_role("table", name="Systems").inner_text()
            assert re.search(r"cal\s+30\s+0\s+0", systems) and re.search(r"ehr\s+30\s+0\s+0", systems), systems
            _shot(page, "bulk-progress")
    finally:
        assert d.stop() == 0
    assert asyncio.run(ReplicaVendor(str(tmp_path / "cal.db")).live()) == []
    [entry] = _audit(tmp_path, "bulk_operation")
    assert entry["detail"]["by_user"] == "ada" and entry["detail"]["sessions"] == 30


def test_a_viewer_sees_no_actions_and_forged_posts_are_refused_and_audited(tmp_path: Path) -> None:
    """A viewer's pages carry no action; a POST without the session's CSRF token (front desk's
    session) and a viewer's POST with a valid token are both answered 403, audited, and change nothing."""
    seed(tmp_path, 3)
    d = _start(tmp_path, _console_config(tmp_path))
    try:
        d.wait_for(lambda: synced(tmp_path, 3), 30)
        with chromium() as browser:
            appt, _ = _session_day(tmp_path)
            viewer = _login(browser, d, "vera")
            viewer.goto(f"{d.url}/console/appointments/{appt}")
            assert [b.inner_text() for b in viewer.get_by_role("button").all()] == ["Log out"]
            assert viewer.locator("form").count() == 1  # the log-out form only
            _shot(viewer, "viewer")
            viewer.goto(f"{d.url}/console/worklist")
            assert [b.inner_text() for b in viewer.get_by_role("button").all()] == ["Log out"]
            assert viewer.get_by_role("link", name="Bulk operations").count() == 0
            token = viewer.locator('input[name="csrf"]').first.get_attribute("value")
            as_viewer = viewer.context.request.post(f"{d.url}/console/appointments/{appt}/cancel", form={"csrf": token, "by": "client"})
            assert as_viewer.status == 403

            front = _login(browser, d, "fran")
            forged = front.context.request.post(f"{d.url}/console/appointments/{appt}/cancel", form={"by": "client", "reason": "forged"})
            assert forged.status == 403
            phone = _login(browser, d, "fran", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            phone.goto(f"{d.url}/console/appointments/{appt}")
            assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")  # no sideways scrolling
            _shot(phone, "phone")
            page = d.get(f"/console/appointments/{appt}")
            assert page.status_code == 303  # no session, no page
    finally:
        assert d.stop() == 0
    refused = {(e["detail"]["user"], e["detail"]["why"]) for e in _audit(tmp_path, "console_refused")}
    assert refused == {("vera", "role viewer may not cancel"), ("fran", "no or wrong CSRF token")}
    store = Store(tmp_path / "store.db", migrate=False)
    try:
        assert store.appointment(appt).fields["status"] == "booked"
    finally:
        store.close()
