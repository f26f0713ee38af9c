"""What billing staff do at the sandbox EHR for a session, and what the EHR then shows.

Their requests carry the sandbox's person header: they are not syncbridge's calls and are not
counted as such.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from syncbridge.connector import Sandbox
from syncbridge.emulation import PERSON_HEADER

__all__ = ["SUPPRESSED", "bill", "billing_of", "ehr_client"]

#: a session's billing resources once its claim is suppressed
SUPPRESSED = {"Encounter": "cancelled", "ChargeItem": "not-billable", "Claim": "cancelled"}


def ehr_client(sandbox: Sandbox) -> httpx.Client:
    conf = sandbox.connector_config
    token = Path(conf["token"]["file"]).read_text().strip()
    return httpx.Client(base_url=conf["base_url"], headers={"Authorization": f"Bearer {token}", PERSON_HEADER: "1"}, timeout=30)


def bill(http: httpx.Client, appointment: str) -> dict[str, str]:
    """An Encounter for the Appointment, a billable charge and a draft claim: resource type -> id."""
    enc = http.post("/Encounter", json={"resourceType": "Encounter", "status": "planned",
                                        "appointment": [{"reference": f"Appointment/{appointment}"}]}).raise_for_status().json()
    ref = {"reference": f"Encounter/{enc['id']}"}
    charge = http.post("/ChargeItem", json={"resourceType": "ChargeItem", "status": "billable", "context": ref,
                                            "code": {"text": "90834"}}).raise_for_status().json()
    claim = http.post("/Claim", json={"resourceType": "Claim", "status": "draft", "use": "claim",
                                      "item": [{"sequence": 1, "encounter": [ref]}]}).raise_for_status().json()
    return {"Encounter": enc["id"], "ChargeItem": charge["id"], "Claim": claim["id"]}


def billing_of(http: httpx.Client, ids: dict[str, str]) -> dict[str, str]:
    """Each billing resource's status as the EHR shows it."""
    return {rtype: http.get(f"/{rtype}/{rid}").raise_for_status().json()["status"] for rtype, rid in ids.items()}
