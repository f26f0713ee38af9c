"""The Zocdoc emulator on loopback as the directory of ``syncbridge demo``.

Each clinician gets a provider and a location; the client secret and the webhook signing key
are kept in 0600 files, the way a practice stores what Zocdoc issues. Nothing is booked up
front: ``book`` on the emulator is what a client does in the Zocdoc marketplace.
"""

from __future__ import annotations

import base64
import re
import secrets
from pathlib import Path

from syncbridge.connector import Sandbox

from .emulator import ZocdocEmulator, running

__all__ = ["location_id", "provider_id", "start_sandbox"]


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

    return Sandbox(
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
        # Zocdoc holds only sessions booked through it, never the demo's seeded ones, so it offers no
        # "delete a copy" action; clients cancel with ``emulator.patient_cancel``
        delete_event=None,
        describe=f"Zocdoc emulator on {server.base_url} ({len(clinicians)} providers)",
    )
