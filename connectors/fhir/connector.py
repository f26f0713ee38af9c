"""FHIR R4 EHR as the ``record`` (DESIGN section 3): appointments live here and claims are made here.

Pulls are watermark searches (``_lastUpdated=ge``) with an overlap against clock skew; the
cursor also remembers which (id, versionId) pairs inside the overlap were already returned, so a
re-read is not reported as a change and a held batch is re-read in full (the cursor only
advances with the engine's commit). Writes are conditional: create with ``If-None-Exist`` on the
canonical identifier, update with ``If-Match``; ``apply_many`` sends up to ``write_batch`` of them
in one ``batch`` Bundle, each entry with its own outcome. A cancelled or no-show session also runs
claim suppression (claims.py plans it, suppression.py reads, writes and verifies it); the billing
state the EHR's answers show is written on the Appointment as a billing-state extension and
reported back to the engine (``ApplyResult.reported``), which moves canonical ``billing`` forward
as the record's own change; what could not be seen done goes to the worklist
(``ApplyResult.attention``). A re-booked session's self-pay fee is withdrawn the same way. A write
answered 404/410 finds the copy gone, as a read does.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from syncbridge.connector import ApplyResult, Capabilities, Connector, Link, Observation, PullResult, WebhookRoute, Write
from syncbridge.errors import ConfigError, MalformedRecord, PermanentError
from syncbridge.limits import check_record_size
from syncbridge.model import CANCELLED_STATES, Role, Snapshot, iso, parse_iso, utcnow
from syncbridge.secrets import SecretRef

from .claims import FEE_SYSTEM, Found, Plan, plan, withdraw_fees
from .client import BundleTooLarge, FHIRClient, entry_etag, entry_resource, entry_status, search_url
from .mapping import EXT_BILLING, SETTLED, client_reference, extension, read_appointment, render_appointment
from .subscription import AppointmentSubscription
from .suppression import Discovery, TransactionRefused, one_by_one, read_billing, settle

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
    #: self-pay fee codes; default to policy.cancellation.fee_code and no_show_fee_code
    late_cancel_fee_code: str | None = None
    no_show_fee_code: str | None = None
    page_size: int = Field(100, ge=1, le=1000)
    #: ask the EHR to notify changes (R4 rest-hook Subscription) when the daemon has http.public_url
    subscription: bool = True
    #: days a subscription lasts before it is renewed (renewed a day before its end)
    subscription_days: int = Field(7, ge=2, le=365)
    #: seconds between checks that the Appointments of live sessions still exist (a search never
    #: shows a deleted resource); 0 leaves deletions to the daily full sweep
    deletion_check_interval: float = Field(180.0, ge=0)

    @model_validator(mode="after")
    def _auth_complete(self) -> FHIROptions:
        if self.auth == "smart-backend" and not (self.client_id and self.private_key):
            raise ValueError("auth smart-backend needs client_id and private_key ({file: key.pem})")
        if self.auth == "static" and not self.token:
            raise ValueError("auth static needs token ({env: VAR} or {file: ...})")
        return self


#: how many recently seen Appointments are kept to spare a GET before an update (~2 kB each)
KNOWN_APPOINTMENTS = 2000
#: Appointment ids per ``_id`` search of a presence check (the URL stays well under 8 kB)
PRESENCE_CHUNK = 50
#: ``_id`` searches per ``batch`` Bundle: 500 Appointments, under 1 MB even where ``_elements`` is ignored
PRESENCE_SEARCHES = 10
#: what a written Appointment tells the EHR beyond a calendar's share (recorded in the audit)
DISCLOSED = ("client_key", "service_code", "cancellation")


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
    #: writes per ``batch`` Bundle (apply_many); lowered by itself when the EHR refuses a Bundle as too large
    write_batch = 50
    #: one EHR server, shared with the clinicians using it: at most this many calls at once
    max_concurrency = 8

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
        #: the last version of recent Appointments read, pulled or written: an update of a copy
        #: still at that version needs no GET (a newer one on the server fails its If-Match: 412)
        self._known: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: how this EHR's billing resources are found (``_revinclude`` only where seen honoured)
        self.discovery = Discovery()
        self._practitioners = frozenset(str(a["practitioner"]) for a in self.clinicians.values())
        self.presence_interval = self.options.deletion_check_interval or None

    def _remember(self, appt: dict[str, Any]) -> None:
        if appt.get("resourceType") == "Appointment" and appt.get("id") and appt.get("meta", {}).get("versionId"):
            self._known[str(appt["id"])] = appt
            self._known.move_to_end(str(appt["id"]))
            while len(self._known) > KNOWN_APPOINTMENTS:
                self._known.popitem(last=False)

    def _known_at(self, link: Link | None) -> dict[str, Any] | None:
        known = self._known.get(link.external_id) if link is not None and link.external_id else None
        return known if known is not None and link is not None and link.etag == _etag(known) else None

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
            self._client.on_batches = lambda note: self.host.degraded(note)
        return self._client

    def webhook_routes(self) -> list[WebhookRoute]:
        return [self.subscription.route()]

    async def maintain(self) -> None:
        await self.discovery.decide(self.client())  # once, so no cancellation pays for it
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
        self._remember(appt)
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
            stamp=canonical_id is None,  # adopted: write the canonical identifier onto it
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

    def _creates(self, link: Link | None) -> bool:
        return link is None or link.gone or link.external_id is None

    def _render_kw(self, desired: Snapshot) -> dict[str, Any]:
        return {
            "practitioner": self._practitioner(desired["clinician"]),
            "identifier_system": self.options.identifier_system,
            "practitioners": self._practitioners,
        }

    def _create_entry(self, appointment_id: str, desired: Snapshot) -> dict[str, Any]:
        """A conditional create on the canonical identifier (http.html#ccreate): a retry never duplicates."""
        body = render_appointment(None, appointment_id, desired, **self._render_kw(desired))
        condition = f"identifier={self.options.identifier_system}|{appointment_id}"
        return {"resource": body, "request": {"method": "POST", "url": "Appointment", "ifNoneExist": condition}}

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        if desired["status"] in CANCELLED_STATES:
            return await self._apply_cancelled(appointment_id, desired, link)
        client = self.client()
        if self._creates(link):
            entry = self._create_entry(appointment_id, desired)
            saved = await client.create(entry["resource"], if_none_exist=entry["request"]["ifNoneExist"])
            if_match = _etag(saved)  # an earlier, lost create answered with the existing copy
        else:
            assert link is not None and link.external_id is not None
            current = self._known_at(link) or await client.read("Appointment", link.external_id)
            if current is None:
                return ApplyResult(link.external_id, None, gone=True)
            saved, if_match = current, link.etag or _etag(current)
            if extension(current, EXT_BILLING) in SETTLED:
                return await self._rebooked(appointment_id, desired, current, if_match)
        body = render_appointment(saved, appointment_id, desired, **self._render_kw(desired))
        if body != _stripped(saved) or if_match != _etag(saved):
            updated = await client.update(body | {"id": saved["id"]}, if_match)
            if updated is None:
                return ApplyResult(str(saved["id"]), None, gone=True)
            saved = updated
        self._remember(saved)
        return ApplyResult(saved["id"], _etag(saved), disclosed=DISCLOSED)

    async def _rebooked(self, appointment_id: str, desired: Snapshot, current: dict[str, Any], if_match: str) -> ApplyResult:
        """A session back on the books owes no fee: its self-pay fee is withdrawn in the transaction
        that re-books the Appointment (written last), and the answers must show it."""
        client = self.client()
        fees = [r async for r in client.search("ChargeItem", {"identifier": f"{FEE_SYSTEM}|{appointment_id}"})]
        withdrawal = Plan(billing=str(desired.get("billing")))
        withdraw_fees(withdrawal, fees)
        settled = await settle(
            client, current, withdrawal, [], lambda res, _billing: render_appointment(res, appointment_id, desired, **self._render_kw(desired)), if_match
        )
        if settled.appointment is not None:
            self._remember(settled.appointment)
        return ApplyResult(str(current["id"]), settled.etag, disclosed=DISCLOSED, steps=tuple(settled.steps), attention=tuple(settled.attention))

    async def _apply_cancelled(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        """A cancelled or no-show session with claim suppression (suppression.py): read the
        Appointment and its billing resources, write every change with the Appointment last, and
        report the billing state the answers show."""
        client = self.client()
        expected: str | None
        if self._creates(link):
            entry = self._create_entry(appointment_id, desired)
            created = await client.create(entry["resource"], if_none_exist=entry["request"]["ifNoneExist"])
            external_id, expected = str(created["id"]), _etag(created)
        else:
            assert link is not None and link.external_id is not None
            external_id, expected = link.external_id, link.etag
        reading = await read_billing(client, self.discovery, self.name, external_id, appointment_id)
        if reading is None:
            return ApplyResult(external_id, None, gone=True)
        self._remember(reading.current)
        if_match = expected or _etag(reading.current)
        suppression = self._plan(appointment_id, desired, reading.current, reading.found)
        try:
            settled = await settle(client, reading.current, suppression, reading.refused, self._renderer(appointment_id, desired), if_match)
        except TransactionRefused:
            # part of it may have landed (not every server rolls back): read again, send the rest one by one
            reading = await read_billing(client, self.discovery, self.name, external_id, appointment_id)
            if reading is None:
                return ApplyResult(external_id, None, gone=True)
            suppression = self._plan(appointment_id, desired, reading.current, reading.found)
            settled = await one_by_one(client, reading.current, suppression, reading.refused, self._renderer(appointment_id, desired), if_match)
        if settled.appointment is not None:
            self._remember(settled.appointment)
        log.info("claim_suppression", connector=self.name, appointment=appointment_id, billing=settled.billing, unresolved=len(settled.attention))
        reported = {"billing": settled.billing} if settled.billing != desired.get("billing") else {}
        return ApplyResult(
            str(reading.current["id"]), settled.etag, disclosed=DISCLOSED, steps=tuple(settled.steps), reported=reported, attention=tuple(settled.attention)
        )

    def _renderer(self, appointment_id: str, desired: Snapshot) -> Any:
        def render(resource: dict[str, Any], billing: str) -> dict[str, Any]:
            return render_appointment(resource, appointment_id, desired | {"billing": billing}, **self._render_kw(desired))

        return render

    def _plan(self, appointment_id: str, desired: Snapshot, current: dict[str, Any], found: Found) -> Plan:
        policy = self.practice.policy.cancellation
        record = desired.get("cancellation") or {}
        if record.get("kind") == "no_show":
            code = self.options.no_show_fee_code or policy.no_show_fee_code
        else:
            code = self.options.late_cancel_fee_code or policy.fee_code
        client = desired.get("client_key")
        return plan(
            appointment=current,
            appointment_id=appointment_id,
            found=found,
            cancellation=desired.get("cancellation"),
            client_ref=client_reference(client) if client else None,
            fee_code=code,
            fee_amount=policy.fee_amount,
        )

    # --- batched writes (an initial sync) -------------------------------------------------------

    async def apply_many(self, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        """Up to :attr:`write_batch` writes in one ``batch`` Bundle of conditional creates and reads,
        then one of PUTs under ``ifMatch`` for those that need an update; each entry has its own
        outcome (a 412 fails that write alone). Cancellations take :meth:`apply` (claim suppression)."""
        results: list[ApplyResult | BaseException | None] = [None] * len(writes)
        single = [i for i, w in enumerate(writes) if w.desired.get("status") in CANCELLED_STATES]
        grouped = sorted(set(range(len(writes))) - set(single))

        async def alone(i: int) -> None:
            w = writes[i]
            try:
                results[i] = await self.apply(w.appointment_id, w.desired, w.link)
            except Exception as err:  # noqa: BLE001 - one result or error per write
                results[i] = err

        async def together(chunk: list[int]) -> None:
            for i, r in zip(chunk, await self._batched([writes[i] for i in chunk]), strict=True):
                results[i] = r

        chunks = [grouped[k : k + self.write_batch] for k in range(0, len(grouped), self.write_batch)]
        await asyncio.gather(*(together(c) for c in chunks), *(alone(i) for i in single))
        return [r if r is not None else PermanentError("no outcome") for r in results]

    async def _batched(self, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        out: list[ApplyResult | BaseException | None] = [None] * len(writes)
        first: list[dict[str, Any]] = []
        owners: list[int] = []
        second: list[dict[str, Any]] = []
        pending: list[tuple[int, dict[str, Any]]] = []
        rebooked: list[tuple[int, dict[str, Any], str]] = []

        def converge(i: int, saved: dict[str, Any], if_match: str) -> None:
            w = writes[i]
            if extension(saved, EXT_BILLING) in SETTLED:
                rebooked.append((i, saved, if_match))  # its fee is withdrawn on its own (_rebooked)
                return
            body = render_appointment(saved, w.appointment_id, w.desired, **self._render_kw(w.desired))
            if body != _stripped(saved) or if_match != _etag(saved):
                second.append({"resource": body | {"id": saved["id"]}, "request": {"method": "PUT", "url": f"Appointment/{saved['id']}", "ifMatch": if_match}})
                pending.append((i, saved))
            else:
                out[i] = ApplyResult(str(saved["id"]), _etag(saved), disclosed=DISCLOSED)

        for i, w in enumerate(writes):
            try:
                if self._creates(w.link):
                    first.append(self._create_entry(w.appointment_id, w.desired))
                elif (known := self._known_at(w.link)) is not None:
                    converge(i, known, _etag(known))  # the copy is as we last saw it: no read needed
                    continue
                else:
                    assert w.link is not None and w.link.external_id is not None
                    first.append({"request": {"method": "GET", "url": f"Appointment/{quote(w.link.external_id)}"}})
                owners.append(i)
            except PermanentError as err:
                out[i] = err
        try:
            answers = await self.client().bundle("batch", first) if first else []
        except BundleTooLarge:
            if len(writes) < 2:
                raise
            self.write_batch = max(1, len(writes) // 2)  # the EHR's limit: smaller Bundles from now on
            half = len(writes) // 2
            return [*await self._batched(writes[:half]), *await self._batched(writes[half:])]
        except Exception as err:  # noqa: BLE001 - the whole request failed: so did each write in it
            answers = [{"error": err}] * len(first)
        for answer, i in zip(answers, owners, strict=True):
            w = writes[i]
            creating = self._creates(w.link)
            try:
                if isinstance(answer.get("error"), BaseException):
                    raise answer["error"]
                if not creating and entry_status(answer) in (404, 410):
                    out[i] = ApplyResult(w.link.external_id if w.link else None, None, gone=True)
                    continue
                saved = entry_resource(answer, "POST Appointment in a batch" if creating else "GET Appointment in a batch")
            except Exception as err:  # noqa: BLE001 - this write's own outcome
                out[i] = err
                continue
            self._remember(saved)
            converge(i, saved, _etag(saved) if creating or w.link is None or not w.link.etag else w.link.etag)
        for i, saved, if_match in rebooked:
            try:
                out[i] = await self._rebooked(writes[i].appointment_id, writes[i].desired, saved, if_match)
            except Exception as err:  # noqa: BLE001 - this write's own outcome
                out[i] = err
        if second:
            try:
                updated: list[dict[str, Any]] = await self.client().bundle("batch", second)
            except Exception as err:  # noqa: BLE001
                updated = [{"error": err}] * len(second)
            for answer, (i, saved) in zip(updated, pending, strict=True):
                try:
                    if isinstance(answer.get("error"), BaseException):
                        raise answer["error"]
                    if entry_status(answer) in (404, 410):  # deleted since it was read
                        out[i] = ApplyResult(str(saved["id"]), None, gone=True)
                        continue
                    out[i] = ApplyResult(str(saved["id"]), entry_etag(answer), disclosed=DISCLOSED)
                    if isinstance(answer.get("resource"), dict):
                        self._remember(answer["resource"])
                except Exception as err:  # noqa: BLE001
                    out[i] = err
        return [r if r is not None else PermanentError("no outcome") for r in out]

    async def missing(self, external_ids: Sequence[str]) -> set[str]:
        """Which linked Appointments are gone: ``Appointment?_id=a,b,...`` searches (``_id`` is core
        search on every R4 server), :data:`PRESENCE_CHUNK` ids each, several to a ``batch`` Bundle;
        ``_elements=id`` asks for ids only where the server honours it."""
        client = self.client()
        ids = list(dict.fromkeys(external_ids))
        chunks = [ids[k : k + PRESENCE_CHUNK] for k in range(0, len(ids), PRESENCE_CHUNK)]
        present: set[str] = set()
        per_bundle = PRESENCE_SEARCHES
        for k in range(0, len(chunks), per_bundle):
            group = chunks[k : k + per_bundle]
            entries = [
                {"request": {"method": "GET", "url": search_url("Appointment", {"_id": ",".join(c), "_elements": "id", "_count": str(len(c))})}}
                for c in group
            ]
            for chunk, answer in zip(group, await client.batch(entries), strict=True):
                found = {str(e.get("resource", {}).get("id")) for e in entry_resource(answer, "presence search in a batch", searchset=True).get("entry", [])}
                if not found <= set(chunk):
                    log.warning("fhir_id_search_ignored", connector=self.name)  # deletions are left to the full sweep
                    self.presence_interval = None
                    return set()
                present |= found
        return set(ids) - present

    async def check(self) -> str:
        result = await self.pull(None)
        await self.discovery.decide(self.client())
        return f"{len(result.observations)} appointments visible; {self.discovery.describe}"

    def external_id_for(self, appointment_id: str) -> str | None:
        return None  # the EHR assigns ids; conditional create finds the copy by identifier instead

    @classmethod
    def sandbox(cls, workdir: Path, clinicians: list[str]) -> Sandbox | None:
        from .sandbox import start_sandbox

        return start_sandbox(workdir, clinicians)
