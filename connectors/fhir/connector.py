"""FHIR R4 EHR as the ``record`` (DESIGN section 3): appointments live here and claims are made here.

Pulls are watermark searches (``_lastUpdated=ge``) with an overlap against clock skew; the
cursor also remembers which (id, versionId) pairs inside the overlap were already returned, so a
re-read is not reported as a change and a held batch is re-read in full (the cursor only
advances with the engine's commit). Writes are conditional: create with ``If-None-Exist`` on the
canonical identifier, update with ``If-Match``. A cancelled or no-show session also runs claim
suppression (claims.py); its outcome is written on the Appointment as a billing-state extension
and reported back to the engine (``ApplyResult.reported``), which moves canonical ``billing``
forward as the record's own change.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from syncbridge.connector import ApplyResult, Capabilities, Connector, Link, Observation, PullResult, WebhookRoute
from syncbridge.errors import ConfigError, MalformedRecord, PermanentError
from syncbridge.limits import check_record_size
from syncbridge.model import CANCELLED_STATES, Role, Snapshot, iso, parse_iso, utcnow
from syncbridge.secrets import SecretRef

from .claims import suppress
from .subscription import AppointmentSubscription
from .client import FHIRClient
from .mapping import EXT_BILLING, extension, read_appointment, render_appointment, set_extension

if TYPE_CHECKING:
    from pathlib import Path

    from syncbridge.connector import Sandbox

__all__ = ["FHIRConnector", "FHIROptions"]

log = structlog.get_logger("syncbridge.fhir")

# SMART v2 scopes: read and search everything we reconcile, create and update what claim suppression touches
DEFAULT_SCOPE = "system/Appointment.cruds system/Encounter.rus system/ChargeItem.crus system/Claim.rus system/Subscription.crud"


class FHIROptions(BaseModel):
    """The connector's own config keys (validated by ``syncbridge check``)."""

    model_config = ConfigDict(extra="forbid")

    #: the FHIR R4 base URL ("service base URL" in the EHR's developer docs)
    base_url: str
    auth: Literal["smart-backend", "static"] = "smart-backend"
    client_id: str | None = None
    #: PEM RSA private key whose public half (JWKS) is registered with the EHR
    private_key: SecretRef | None = None
    #: JWT ``kid`` header; defaults to client_id
    kid: str | None = None
    #: the EHR's token endpoint; defaults to <base_url>/auth/token
    token_url: str | None = None
    #: static bearer token (auth: static)
    token: SecretRef | None = None
    scope: str = DEFAULT_SCOPE
    identifier_system: str = "urn:syncbridge:appointment"
    overlap_seconds: float = Field(60.0, ge=0)
    #: self-pay fee code; defaults to policy.cancellation.fee_code
    late_cancel_fee_code: str | None = None
    page_size: int = Field(100, ge=1, le=1000)
    #: ask the EHR to notify changes (R4 rest-hook Subscription) when the daemon has http.public_url
    subscription: bool = True
    #: days a subscription lasts before it is renewed (renewed a day before its end)
    subscription_days: int = Field(7, ge=2, le=365)

    @model_validator(mode="after")
    def _auth_complete(self) -> FHIROptions:
        if self.auth == "smart-backend" and not (self.client_id and self.private_key):
            raise ValueError("auth smart-backend needs client_id and private_key ({file: key.pem})")
        if self.auth == "static" and not self.token:
            raise ValueError("auth static needs token ({env: VAR} or {file: ...})")
        return self


def _etag(resource: dict[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def _stripped(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


class FHIRConnector(Connector):
    capabilities = Capabilities(
        role=Role.RECORD,
        fields=frozenset(
            {"clinician", "client_key", "start", "end", "timezone", "status", "cancellation", "modality", "location", "service_code", "series_id", "billing"}
        ),
        accepts_new=True,
        push=True,
    )
    Options = FHIROptions

    def __init__(self, name: str, config: Any, practice: Any) -> None:
        super().__init__(name, config, practice)
        self._client: FHIRClient | None = None
        #: practitioner id -> clinician key
        self.clinician_of: dict[str, str] = {}
        for key, account in self.clinicians.items():
            ref = str(account.get("practitioner", ""))
            if not ref.startswith("Practitioner/"):
                raise ConfigError(f"clinicians.{key}.accounts.{name}.practitioner", f"must look like 'Practitioner/<id>', got {ref!r}")
            self.clinician_of[ref.removeprefix("Practitioner/")] = key
        self.subscription = AppointmentSubscription(self)

    def client(self) -> FHIRClient:
        if self._client is None:
            o: FHIROptions = self.options
            if o.auth == "static":
                assert o.token is not None
                self._client = FHIRClient(o.base_url, token=o.token.reveal())
            else:
                assert o.private_key is not None
                self._client = FHIRClient(
                    o.base_url, client_id=o.client_id, private_key=o.private_key.reveal(), token_url=o.token_url, scope=o.scope, kid=o.kid
                )
        return self._client

    def webhook_routes(self) -> list[WebhookRoute]:
        return [self.subscription.route()]

    async def maintain(self) -> None:
        await self.subscription.maintain()

    async def close(self) -> None:
        await self.subscription.stop()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # --- reading ------------------------------------------------------------------------

    def _clinician(self, appt: dict[str, Any]) -> str | None:
        """The clinician of ours this Appointment belongs to, or None (another provider's)."""
        for p in appt.get("participant", []):
            ref = str(p.get("actor", {}).get("reference", ""))
            if ref.startswith("Practitioner/") and ref.removeprefix("Practitioner/") in self.clinician_of:
                return self.clinician_of[ref.removeprefix("Practitioner/")]
        return None

    def _ours(self, appt: dict[str, Any]) -> bool:
        return self._clinician(appt) is not None

    def _observe(self, appt: dict[str, Any]) -> Observation:
        rid = str(appt.get("id"))
        etag = _etag(appt) if appt.get("meta", {}).get("versionId") else None
        try:
            check_record_size(len(json.dumps(appt)), f"Appointment/{rid}")
            clinician = self._clinician(appt)
            zone = self.practice.clinician_zone(clinician) if clinician else self.practice.practice.timezone
            fields, reported, canonical_id, tags = read_appointment(
                appt, clinician_of=self.clinician_of, default_zone=zone, identifier_system=self.options.identifier_system
            )
        except MalformedRecord as err:
            return Observation(external_id=rid, etag=etag, problem=str(err))
        modified = appt.get("meta", {}).get("lastUpdated")
        return Observation(
            external_id=rid,
            etag=etag,
            canonical_id=canonical_id,
            fields=fields,
            tags=tags,
            modified_at=iso(parse_iso(modified)) if modified else None,
            cancellation=reported,
        )

    async def pull(self, cursor: str | None) -> PullResult:
        state = json.loads(cursor) if cursor else {}
        since: str | None = state.get("since")
        seen: dict[str, str] = state.get("seen", {})
        overlap = timedelta(seconds=self.options.overlap_seconds)
        params = {"_sort": "_lastUpdated", "_count": str(self.options.page_size)}
        if since:
            params["_lastUpdated"] = "ge" + (datetime.fromisoformat(since) - overlap).isoformat()
        observations: list[Observation] = []
        versions: dict[str, tuple[str, datetime]] = {}
        async for appt in self.client().search("Appointment", params):
            rid, meta = str(appt.get("id")), appt.get("meta", {})
            updated = datetime.fromisoformat(str(meta.get("lastUpdated", iso(utcnow()))).replace("Z", "+00:00"))
            versions[rid] = (str(meta.get("versionId")), updated)
            if seen.get(rid) == str(meta.get("versionId")) or not self._ours(appt):
                continue  # an overlap re-read, or another provider's appointment
            observations.append(self._observe(appt))
        newest = max((u for _, u in versions.values()), default=None)
        new_since = newest.isoformat() if newest else (since or (utcnow() - overlap).isoformat())
        floor = datetime.fromisoformat(new_since) - overlap
        keep = {rid: v for rid, (v, u) in versions.items() if u >= floor}
        if newest is None:
            keep = seen  # nothing new: the window did not move
        return PullResult(observations, json.dumps({"since": new_since, "seen": keep}), complete=cursor is None)

    async def read(self, external_id: str) -> Observation:
        appt = await self.client().read("Appointment", external_id)
        if appt is None:
            return Observation(external_id=external_id, deleted=True)
        return self._observe(appt)

    # --- writing ------------------------------------------------------------------------

    def _practitioner(self, clinician: str) -> str:
        account = self.clinicians.get(clinician)
        if not account:
            raise PermanentError(f"clinician {clinician} has no account in connector {self.name} (clinicians.{clinician}.accounts.{self.name}.practitioner)")
        return str(account["practitioner"])

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        client = self.client()
        system = self.options.identifier_system
        render_kw = {"practitioner": self._practitioner(desired["clinician"]), "identifier_system": system}
        if link is None or link.gone or link.external_id is None:
            body = render_appointment(None, appointment_id, desired, **render_kw)
            saved = await client.create(body, if_none_exist=f"identifier={system}|{appointment_id}")
            if_match = _etag(saved)  # an earlier, lost create answered with the existing copy
        else:
            current = await client.read("Appointment", link.external_id)
            if current is None:
                return ApplyResult(link.external_id, None, gone=True)
            saved, if_match = current, link.etag or _etag(current)
        body = render_appointment(saved, appointment_id, desired, **render_kw)
        if body != _stripped(saved) or if_match != _etag(saved):
            saved = await client.update(body | {"id": saved["id"]}, if_match)
        result = ApplyResult(saved["id"], _etag(saved), disclosed=("client_key", "service_code", "cancellation"))
        if desired["status"] in CANCELLED_STATES:
            steps: list[str] = []
            billing = await suppress(
                client,
                appointment=saved,
                appointment_id=appointment_id,
                cancellation=desired.get("cancellation"),
                client_key=desired.get("client_key"),
                fee_code=self.options.late_cancel_fee_code or self.practice.policy.cancellation.fee_code,
                fee_amount=self.practice.policy.cancellation.fee_amount,
                steps=steps,
            )
            result = replace(result, steps=tuple(steps))
            if extension(saved, EXT_BILLING) != billing:
                marked = _stripped(saved)
                set_extension(marked, EXT_BILLING, "valueCode", billing)
                saved = await client.update(marked | {"id": saved["id"]}, _etag(saved))
                log.info("claim_suppression", connector=self.name, appointment=appointment_id, billing=billing)
            result = replace(result, etag=_etag(saved), reported={"billing": billing} if billing != desired.get("billing") else {})
        return result

    def external_id_for(self, appointment_id: str) -> str | None:
        return None  # the EHR assigns ids; conditional create finds the copy by identifier instead

    @classmethod
    def sandbox(cls, workdir: Path, clinicians: list[str]) -> Sandbox | None:
        from .sandbox import start_sandbox

        return start_sandbox(workdir, clinicians)
