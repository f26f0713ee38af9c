"""The Graph emulator on loopback as the Microsoft 365 tenant of ``syncbridge demo``.

One mailbox per clinician, an app registration whose client secret is kept in a 0600 file (the
way a practice stores it), and the emulator's own CA as ``ca_bundle``. Notifications may go to
the demo daemon's plain-http loopback listener; a real tenant requires an HTTPS public URL.
"""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from syncbridge.connector import Sandbox, SeenCopy
from syncbridge.emulation import calls_by_kind

from .emulator import running
from .mapping import canonical_id_of

__all__ = ["mailbox_for", "start_sandbox"]

DOMAIN = "practice.example"


def mailbox_for(clinician: str) -> str:
    """A user principal name for a clinician key such as ``dr_rivera``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", clinician).strip(".-_") + "@" + DOMAIN


def start_sandbox(workdir: Path, clinicians: list[str]) -> Sandbox:
    workdir.mkdir(parents=True, exist_ok=True)
    server = running(workdir / "tls")
    emu = server.emulator
    emu.notifier.allow_http = True
    client_id = str(uuid.uuid4())
    secret = secrets.token_urlsafe(32)
    secret_file = workdir / "m365-client-secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    emu.register_app(client_id, secret)
    accounts = {}
    for key in clinicians:
        emu.add_user(mailbox_for(key))
        accounts[key] = {"mailbox": mailbox_for(key)}

    async def delete_event(external_id: str) -> None:
        """What Outlook does when the therapist deletes the event (a change notification follows)."""
        clinician, _, event_id = external_id.partition("/")
        emu.user_delete(mailbox_for(clinician), event_id)

    async def look(external_id: str) -> SeenCopy:
        """The event as the clinician sees it in Outlook."""
        clinician, _, event_id = external_id.partition("/")
        event = next((e for e in emu.events_of(mailbox_for(clinician)) if e["id"] == event_id), None)
        if event is None:
            return SeenCopy("gone")
        start, end = (datetime.fromisoformat(event[k]["dateTime"][:19]).replace(tzinfo=UTC) for k in ("start", "end"))
        return SeenCopy("cancelled" if event.get("isCancelled") else "live", start, end)

    async def live_ids() -> set[str]:
        """Every session event (ours, not cancelled) in the clinicians' mailboxes."""
        return {
            f"{key}/{e['id']}"
            for key in clinicians
            for e in emu.events_of(mailbox_for(key))
            if canonical_id_of(e) is not None and not e.get("isCancelled")
        }

    async def move(external_id: str, start: datetime, end: datetime) -> None:
        """The clinician drags the event in Outlook (which sends the mailbox's Windows time zone name)."""
        clinician, _, event_id = external_id.partition("/")
        local = ZoneInfo("America/New_York")
        emu.user_update(mailbox_for(clinician), event_id, {
            k: {"dateTime": t.astimezone(local).strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": "Eastern Standard Time"}
            for k, t in (("start", start), ("end", end))
        })

    return Sandbox(
        connector_config={
            "type": "microsoft365",
            "tenant": emu.tenant,
            "client_id": client_id,
            "client_secret": {"file": str(secret_file)},
            "authority_host": server.authority_host,
            "graph_url": server.graph_url,
            "ca_bundle": str(server.ca_file),
        },
        accounts=accounts,
        close=server.stop,
        delete_event=delete_event,
        look=look,
        move=move,
        live_ids=live_ids,
        injector=server.injector,
        calls=lambda: calls_by_kind(server.emulator.log),
        describe=f"Microsoft Graph emulator on {server.base_url} ({len(clinicians)} mailboxes)",
    )
