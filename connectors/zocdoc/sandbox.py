"""The Zocdoc emulator on loopback as the directory of ``syncbridge demo``.

Each clinician gets a provider and a location; the client secret and the webhook signing key
are kept in 0600 files, the way a practice stores what Zocdoc issues. Nothing is booked up
front: ``book`` on the emulator is what a client does in the Zocdoc marketplace.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Awaitable
from datetime import date, datetime
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo

from syncbridge.connector import Sandbox, SeenCopy
from syncbridge.emulation import calls_by_kind

from .emulator import ZocdocEmulator, running
from .webhooks import WEBHOOK_PATH

__all__ = ["location_id", "provider_id", "start_sandbox"]

_T = TypeVar("_T")


async def _done(value: _T) -> _T:
    """The emulator runs in this process: its knobs answer at once."""
    return value


def provider_id(clinician: str) -> str:
    return "pr_" + re.sub(r"[^A-Za-z0-9-]", "-", clinician)


def location_id(clinician: str) -> str:
    return "lo_" + re.sub(r"[^A-Za-z0-9-]", "-", clinician)


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value)
    path.chmod(0o600)
    return path


def start_sandbox(workdir: Path, clinicians: list[str], zone: str = "America/New_York") -> Sandbox:
    workdir.mkdir(parents=True, exist_ok=True)
    emulator = ZocdocEmulator(client_id="syncbridge-demo", client_secret=secrets.token_urlsafe(24))
    server = running(emulator)
    secret = _secret_file(workdir / "zocdoc-client-secret", emulator.client_secret)
    hook_key = _secret_file(workdir / "zocdoc-webhook-key", base64.b64encode(secrets.token_bytes(32)).decode())
    accounts = {}
    for key in clinicians:
        emulator.add_provider(provider_id(key), location_id(key), zone)
        accounts[key] = {"provider_id": provider_id(key), "location_id": location_id(key)}

    def book(clinician: str, start: datetime, end: datetime) -> Awaitable[str]:
        """A client books the clinician in the Zocdoc marketplace (50-minute therapy visit)."""
        return _done(emulator.book(provider_id(clinician), location_id(clinician), start))

    def cancel(appt_id: str) -> Awaitable[None]:
        """The client cancels in Zocdoc; Zocdoc sends the signed webhook."""
        emulator.patient_cancel(appt_id)
        return _done(None)

    def look(appt_id: str) -> Awaitable[SeenCopy]:
        with emulator._lock:
            a = emulator.appointments.get(appt_id)
            if a is None:
                return _done(SeenCopy("gone"))
            state = "cancelled" if a["status"] in ("cancelled", "no_show") else "live"
            return _done(SeenCopy(state, a["start"].astimezone(ZoneInfo(a["zone"]))))

    def offered(clinician: str, day: date) -> Awaitable[list[datetime]]:
        return _done(emulator.published(provider_id(clinician), day))

    def live_ids() -> Awaitable[set[str]]:
        with emulator._lock:
            return _done({k for k, a in emulator.appointments.items() if a["status"] not in ("cancelled", "no_show")})

    def register(url: str) -> None:
        emulator.sender.register(url + WEBHOOK_PATH, hook_key.read_text())

    return Sandbox(
        book=book,
        look=look,
        offered=offered,
        live_ids=live_ids,
        register_webhooks=register,
        injector=server.injector,
        calls=lambda: calls_by_kind(emulator.log),
        connector_config={
            "type": "zocdoc",
            "environment": "sandbox",
            "base_url": server.base_url,
            "token_url": server.token_url,
            "client_id": emulator.client_id,
            "client_secret": {"file": str(secret)},
            "webhook_secret": {"file": str(hook_key)},
        },
        accounts=accounts,
        close=server.stop,
        # Zocdoc holds only sessions booked through it: a client cancels those
        delete_event=cancel,
        describe=f"Zocdoc emulator on {server.base_url} ({len(clinicians)} providers)",
    )
