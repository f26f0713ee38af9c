"""A real CalDAV server (Radicale, from PyPI) on loopback, for ``syncbridge demo``.

Radicale is the CalDAV connector's stand-in: it is a real RFC 4791/6578 server, so the demo
exercises exactly what a practice's Fastmail or Nextcloud account would.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import icalendar

from syncbridge.connector import Sandbox, SeenCopy
from syncbridge.emulation import free_port, reverse_proxy, serve_in_thread

__all__ = ["start_sandbox"]

USER = "sandbox"


def start_sandbox(workdir: Path, clinicians: list[str]) -> Sandbox | None:
    try:
        import radicale  # noqa: F401
    except ImportError:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    secret = workdir / "password"
    secret.write_text(password)
    secret.chmod(0o600)
    users = workdir / "users"
    users.write_text(f"{USER}:{password}\n")
    users.chmod(0o600)
    port = free_port()
    config = workdir / "radicale.conf"
    config.write_text(
        f"[server]\nhosts = 127.0.0.1:{port}\n"
        f"[auth]\ntype = htpasswd\nhtpasswd_filename = {users}\nhtpasswd_encryption = plain\ndelay = 0\n"
        f"[rights]\ntype = owner_only\n[storage]\nfilesystem_folder = {workdir / 'collections'}\n[logging]\nlevel = warning\n"
    )
    log = (workdir / "radicale.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "radicale", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    auth = (USER, password)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.request("OPTIONS", base + "/", timeout=1.0)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"Radicale did not start; see {workdir / 'radicale.log'}") from None
            time.sleep(0.1)
    # the daemon reaches Radicale through a proxy that can count requests and inject failures;
    # the "person" below (look, move, delete) talks to Radicale directly
    proxy = serve_in_thread(reverse_proxy(base))
    accounts = {}
    with httpx.Client(auth=auth, timeout=10) as client:
        for key in clinicians:
            client.request("MKCALENDAR", f"{base}/{USER}/{key}/")
            accounts[key] = {"calendar": f"{proxy.url}/{USER}/{key}/"}

    def close() -> None:
        proxy.stop()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    async def delete_event(href: str) -> None:
        """What a calendar app does when the therapist deletes the event."""
        async with httpx.AsyncClient(auth=auth, timeout=10) as client:
            r = await client.delete(url(href))
            r.raise_for_status()

    def url(href: str) -> str:
        return base + href if href.startswith("/") else href.replace(proxy.url, base, 1)

    async def look(href: str) -> SeenCopy:
        """What the therapist sees: no event, an event marked cancelled, or a live session."""
        async with httpx.AsyncClient(auth=auth, timeout=10) as client:
            r = await client.get(url(href))
        if r.status_code == 404:
            return SeenCopy("gone")
        r.raise_for_status()
        event = next(iter(icalendar.Calendar.from_ical(r.content).walk("VEVENT")))
        state = "cancelled" if str(event.get("STATUS", "")).upper() == "CANCELLED" else "live"
        return SeenCopy(state, event.decoded("DTSTART"), event.decoded("DTEND"))

    async def move(href: str, start: datetime, end: datetime) -> None:
        """Drag the event to a new time, as a calendar app does (a PUT of the edited event)."""
        async with httpx.AsyncClient(auth=auth, timeout=10) as client:
            r = await client.get(url(href))
            r.raise_for_status()
            cal = icalendar.Calendar.from_ical(r.content)
            for event in cal.walk("VEVENT"):
                for key, value in (("DTSTART", start), ("DTEND", end)):
                    del event[key]
                    event.add(key, value)
            put = await client.put(url(href), content=cal.to_ical(), headers={"If-Match": r.headers["ETag"], "Content-Type": "text/calendar"})
            put.raise_for_status()

    async def live_ids() -> set[str]:
        """Every event href in the clinicians' calendars that is not marked cancelled."""
        out: set[str] = set()
        async with httpx.AsyncClient(auth=auth, timeout=30) as client:
            for key in clinicians:
                r = await client.request("PROPFIND", f"{base}/{USER}/{key}/", headers={"Depth": "1"})
                r.raise_for_status()
                hrefs = [h for h in re.findall(r"<(?:\w+:)?href>([^<]+)</(?:\w+:)?href>", r.text) if h.endswith(".ics")]
                for href in hrefs:
                    if (await look(href)).state == "live":
                        out.add(href)
        return out

    return Sandbox(
        live_ids=live_ids,
        look=look,
        move=move,
        injector=proxy.injector,
        calls=lambda: dict(proxy.injector.by_method),  # a real server: its requests by method
        connector_config={"type": "caldav", "url": proxy.url + "/", "username": USER, "password": {"file": str(secret)}},
        accounts=accounts,
        close=close,
        delete_event=delete_event,
        describe=f"Radicale CalDAV server on {base} ({len(clinicians)} calendars)",
    )
