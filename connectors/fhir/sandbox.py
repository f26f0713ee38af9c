"""The FHIR emulator on loopback as the EHR of ``syncbridge demo``.

Each clinician gets a Practitioner; access uses a static bearer token kept in a 0600 file, the
way a practice would store a token issued by its EHR. Nothing else is seeded: bookings made in
the demo flow in through the connector.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from pathlib import Path

import httpx

from syncbridge.connector import Sandbox, SeenCopy
from syncbridge.emulation import PERSON_HEADER, calls_by_kind

from .emulator import FHIREmulator, running

__all__ = ["practitioner_id", "start_sandbox"]


def practitioner_id(clinician: str) -> str:
    """A FHIR id ([A-Za-z0-9-.]{1,64}) for a clinician key such as ``dr_rivera``."""
    return ("pr-" + re.sub(r"[^A-Za-z0-9.-]", "-", clinician))[:64]


def start_sandbox(workdir: Path, clinicians: list[str]) -> Sandbox:
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    secret = workdir / "fhir-token"
    secret.write_text(token)
    secret.chmod(0o600)
    server = running(FHIREmulator(static_token=token, subscriptions=True))
    accounts = {}
    for key in clinicians:
        pid = practitioner_id(key)
        server.emulator.put({"resourceType": "Practitioner", "id": pid, "name": [{"text": key}]})
        accounts[key] = {"practitioner": f"Practitioner/{pid}"}

    async def delete_event(external_id: str) -> None:
        """What EHR staff do to call a session off: cancel the Appointment (EHRs do not delete)."""
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {token}", PERSON_HEADER: "1"}, timeout=10) as http:
            r = await http.get(f"/Appointment/{external_id}")
            r.raise_for_status()
            appt = r.json()
            appt.pop("meta", None)
            appt["status"] = "cancelled"
            appt["cancelationReason"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason", "code": "pat"}]
            }
            (await http.put(f"/Appointment/{external_id}", json=appt, headers={"If-Match": r.headers["ETag"]})).raise_for_status()

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {token}", PERSON_HEADER: "1"}, timeout=10)

    async def look(external_id: str) -> SeenCopy:
        async with client() as http:
            r = await http.get(f"/Appointment/{external_id}")
        if r.status_code in (404, 410):
            return SeenCopy("gone")
        r.raise_for_status()
        appt = r.json()
        state = "cancelled" if appt.get("status") in ("cancelled", "noshow", "entered-in-error") else "live"
        return SeenCopy(state, datetime.fromisoformat(appt["start"]), datetime.fromisoformat(appt["end"]))

    async def move(external_id: str, start: datetime, end: datetime) -> None:
        """Front-desk staff reschedule the Appointment."""
        async with client() as http:
            r = await http.get(f"/Appointment/{external_id}")
            r.raise_for_status()
            appt = r.json()
            appt.pop("meta", None)
            appt["start"], appt["end"] = start.isoformat(), end.isoformat()
            (await http.put(f"/Appointment/{external_id}", json=appt, headers={"If-Match": r.headers["ETag"]})).raise_for_status()

    async def live_ids() -> set[str]:
        out: set[str] = set()
        async with client() as http:
            url: str | None = "/Appointment?_count=500"
            while url:
                bundle = (await http.get(url)).raise_for_status().json()
                out |= {e["resource"]["id"] for e in bundle.get("entry", []) if e["resource"].get("status") not in ("cancelled", "noshow", "entered-in-error")}
                url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
        return out

    return Sandbox(
        live_ids=live_ids,
        look=look,
        move=move,
        injector=server.injector,
        calls=lambda: calls_by_kind(server.emulator.log),
        connector_config={"type": "fhir", "base_url": server.base_url, "auth": "static", "token": {"file": str(secret)}},
        accounts=accounts,
        close=server.stop,
        delete_event=delete_event,
        describe=f"FHIR R4 emulator on {server.base_url} ({len(clinicians)} practitioners)",
    )
