"""The Google Calendar emulator on loopback as the calendars of ``syncbridge demo``.

Each clinician gets a Workspace account of a demo domain; the connector reaches them through a
service account with domain-wide delegation whose JSON key is written to a 0600 file, exactly
as a practice's IT admin would set it up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from syncbridge.connector import Sandbox

from .emulator import GoogleCalendarEmulator, running

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

    return Sandbox(
        connector_config={"type": "google_calendar", "service_account_key": {"file": str(secret)}, "api_root": server.api_root},
        accounts=accounts,
        close=server.stop,
        delete_event=delete_event,
        describe=f"Google Calendar API emulator on {server.base_url} ({len(clinicians)} Workspace accounts)",
    )
