"""The Google Calendar emulator on loopback as the calendars of ``syncbridge demo``.

Each clinician gets a Workspace account of a demo domain; the connector reaches them through a
service account with domain-wide delegation whose JSON key is written to a 0600 file, exactly
as a practice's IT admin would set it up.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from syncbridge.connector import Sandbox, SeenCopy
from syncbridge.emulation import calls_by_kind

from .emulator import GoogleCalendarEmulator, running
from .mapping import ID_KEY

__all__ = ["DOMAIN", "account_email", "start_sandbox"]

DOMAIN = "practice.example"


def account_email(clinician: str) -> str:
    """A Workspace address for a clinician key such as ``dr_rivera``."""
    return re.sub(r"[^a-z0-9.]+", ".", clinician.lower()).strip(".") + "@" + DOMAIN


def start_sandbox(workdir: Path, clinicians: list[str]) -> Sandbox:
    workdir.mkdir(parents=True, exist_ok=True)
    server = running(GoogleCalendarEmulator())
    emulator = server.emulator
    accounts = {}
    for key in clinicians:
        emulator.add_user(account_email(key))
        accounts[key] = {"email": account_email(key)}
    info = emulator.add_service_account("syncbridge@demo-project.iam.gserviceaccount.com")
    secret = workdir / "google-service-account.json"
    secret.touch(mode=0o600)
    secret.write_text(json.dumps(info))

    async def delete_event(external_id: str) -> None:
        """What a clinician does in Google Calendar: delete the event."""
        calendar, _, event_id = external_id.rpartition("/")
        emulator.user_delete(calendar, event_id)

    async def look(external_id: str) -> SeenCopy:
        """The event as the clinician sees it in Google Calendar."""
        calendar, _, event_id = external_id.rpartition("/")
        event = emulator.event(calendar, event_id) if calendar in emulator.calendars else None
        if event is None or event.get("status") == "cancelled":
            return SeenCopy("gone")
        return SeenCopy("live", datetime.fromisoformat(event["start"]["dateTime"]), datetime.fromisoformat(event["end"]["dateTime"]))

    async def move(external_id: str, start: datetime, end: datetime) -> None:
        """The clinician drags the event to a new time."""
        calendar, _, event_id = external_id.rpartition("/")
        event = emulator.event(calendar, event_id)
        zone = (event or {}).get("start", {}).get("timeZone")
        emulator.user_patch(calendar, event_id, {
            "start": {"dateTime": start.isoformat()} | ({"timeZone": zone} if zone else {}),
            "end": {"dateTime": end.isoformat()} | ({"timeZone": zone} if zone else {}),
        })  # fmt: skip

    async def live_ids() -> set[str]:
        """Every live event carrying a canonical id in the clinicians' calendars (what they see as sessions)."""
        return {
            f"{account['email']}/{e['id']}"
            for account in accounts.values()
            for e in emulator.live_events(account["email"])
            if ID_KEY in ((e.get("extendedProperties") or {}).get("private") or {})
        }

    return Sandbox(
        live_ids=live_ids,
        look=look,
        move=move,
        injector=server.injector,
        calls=lambda: calls_by_kind(emulator.log),
        connector_config={"type": "google_calendar", "service_account_key": {"file": str(secret)}, "api_root": server.api_root},
        accounts=accounts,
        close=server.stop,
        delete_event=delete_event,
        describe=f"Google Calendar API emulator on {server.base_url} ({len(clinicians)} Workspace accounts)",
    )
