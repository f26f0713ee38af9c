"""The status page in a real headless Chromium (Debian's package, driven by Playwright).

The screenshot is kept in test-artifacts/status-page.png.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from syncbridge.store import Store
from syncbridge.emulation import free_port
from tests.e2e.test_daemon import TOKEN, config, seed, synced
from tests.support.daemon import DaemonProcess
from tests.support.replica import ReplicaVendor

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_status_page_shows_cancellation_and_where_it_went(tmp_path: Path) -> None:
    """An admin logging in sees the cancellation, who made it, and that every system applied it."""
    from playwright.sync_api import sync_playwright

    seed(tmp_path, 5)
    d = DaemonProcess(tmp_path, config(tmp_path, free_port()), env={"SB_STATUS_TOKEN": TOKEN})
    try:
        d.wait_for(lambda: synced(tmp_path, 5), 30)
        store = Store(tmp_path / "store.db")
        appt = store.appointments()[2]
        ext = store.link("cal", appt.id).external_id
        store.close()
        asyncio.run(ReplicaVendor(str(tmp_path / "cal.db")).retitle(ext, "Client session #noshow"))
        d.wait_for(lambda: "ehr: applied" in d.get("/", auth=("admin", TOKEN)).text, 30)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                refused = browser.new_context().request.get(d.url + "/")
                assert refused.status == 401
                context = browser.new_context(http_credentials={"username": "admin", "password": TOKEN}, viewport={"width": 1280, "height": 900})
                page = context.new_page()
                response = page.goto(d.url + "/")
                assert response is not None and response.status == 200
                assert page.title() == "syncbridge: Lakeside Therapy"
                row = page.locator("h2:has-text('Recent cancellations') + table tbody tr").first
                text = row.inner_text()
                assert "no show by client" in text and "Dr. Lee" in text and "charge" in text
                assert row.locator(".pill").all_inner_texts() == ["cal: removed", "ehr: applied"]
                assert "2 of 2 within" in text
                health = page.locator("h2:has-text('Connectors') + table").inner_text()
                assert health.count("healthy") == 2
                artifacts = ROOT / "test-artifacts"
                artifacts.mkdir(exist_ok=True)
                page.screenshot(path=str(artifacts / "status-page.png"), full_page=True)
            finally:
                browser.close()
    finally:
        assert d.stop() == 0
