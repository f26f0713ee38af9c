"""A FHIR R4 server subset on loopback, for tests and ``syncbridge demo``.

Follows the RESTful API of https://hl7.org/fhir/R4/http.html for the interactions the connector
uses (cited by the page's anchors): ``#read`` (404 unknown, 410 deleted), ``#update`` with
version-aware ``If-Match`` (``#concurrency``, "Managing Resource Contention": 412 on a stale weak
ETag), ``#create`` (201 with ``Location: [base]/[type]/[id]/_history/[vid]``) and ``#ccreate``
(``If-None-Exist``: no match -> create, one match -> 200 with the existing resource, several ->
412), ``#search`` with paging links in a ``searchset`` Bundle (``#paging``, search.html#count) and
``_revinclude`` (search.html#revinclude, e.g. ``_revinclude=Claim:encounter``), ``batch`` and
``transaction`` Bundles POSTed to [base] (``#transaction``; emulator_bundles.py),
``#versioning`` (``ETag: W/"versionId"``, ``meta.versionId``/``meta.lastUpdated``) and
OperationOutcome bodies on errors (``#Status``). R4 rest-hook Subscriptions notify on changes
(emulator_subscriptions.py). Nothing is deleted by the connector (EHRs
cancel), but ``#delete`` exists so "gone" can be tested.

Search parameters kept (the reference each one follows is chosen to match R4's definitions):
``_lastUpdated=ge<instant>``, ``_count``, ``_sort=_lastUpdated``, ``identifier=system|value``,
``patient`` (Appointment.participant / Encounter.subject / ChargeItem.subject / Claim.patient),
``practitioner`` (Appointment.participant), ``appointment`` (Encounter.appointment), ``context``
(ChargeItem.context -> Encounter) and ``encounter`` (Claim.item.encounter).

Optional features are off by default, as on the least capable R4 server a practice may run
(each is a switch a test turns on): ``revinclude`` (search.html#revinclude: when off the
parameter is ignored and left out of the ``self`` link, as R4 asks a server to report only the
parameters it used), ``metadata`` (``GET [base]/metadata``, the CapabilityStatement: 404 when off),
``subscriptions`` (the Subscription resource: 404 when off) and ``atomic_transactions`` (when
off, a failed transaction keeps the changes made before the failing entry, as some servers do,
although http.html#transaction asks for all or nothing). ``_id``, and comma-separated values for
any parameter (search.html#combining: "or"), are core search and always on; ``_elements`` is
accepted and ignored (search.html#elements lets a server return more than asked).

Auth follows SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html):
``POST /auth/token`` with ``client_credentials`` and an RS384-signed JWT assertion (emulator_smart.py); a static
bearer token configured at start is also accepted. There is no referential integrity check, as
real servers differ on it.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from syncbridge.emulation import PERSON_HEADER, Injector, free_port, serve_in_thread

from .emulator_answers import Answer, issue, outcome, respond
from .emulator_bundles import process_bundle
from .emulator_smart import token_endpoint
from .emulator_subscriptions import RestHookNotifier

__all__ = ["FHIREmulator", "RESOURCE_TYPES", "running"]

RESOURCE_TYPES = ("Appointment", "Encounter", "ChargeItem", "Claim", "Patient", "Practitioner", "Subscription")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _refs(resource: dict[str, Any], param: str) -> list[str]:
    """The values a reference/token search parameter matches for ``resource`` (see module docstring)."""
    t = resource["resourceType"]
    if param == "identifier":
        return [f"{i.get('system', '')}|{i.get('value', '')}" for i in resource.get("identifier", [])]
    if param in ("patient", "practitioner"):
        if t == "Appointment":
            return [p.get("actor", {}).get("reference", "") for p in resource.get("participant", [])]
        key = {"Encounter": "subject", "ChargeItem": "subject", "Claim": "patient"}.get(t)
        return [resource.get(key, {}).get("reference", "")] if key else []
    if param == "appointment":
        return [r.get("reference", "") for r in resource.get("appointment", [])]
    if param == "context":
        return [resource.get("context", {}).get("reference", "")]
    if param == "encounter":
        return [e.get("reference", "") for item in resource.get("item", []) for e in item.get("encounter", [])]
    return []


def _matches(resource: dict[str, Any], param: str, value: str) -> bool:
    if param in ("patient", "practitioner", "appointment", "context", "encounter"):
        prefix = {"patient": "Patient/", "practitioner": "Practitioner/", "appointment": "Appointment/", "encounter": "Encounter/", "context": "Encounter/"}[param]
        wanted = value if "/" in value else prefix + value
        return wanted in _refs(resource, param)
    return value in _refs(resource, param)


@dataclass
class FHIREmulator:
    """The in-memory server. ``app`` is the starlette application; knobs are plain methods."""

    static_token: str | None = None
    #: SMART clients: client_id -> PEM public key
    clients: dict[str, bytes] = field(default_factory=dict)
    base_url: str = ""
    page_size: int = 50
    store: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {t: {} for t in RESOURCE_TYPES})
    deleted: set[tuple[str, str]] = field(default_factory=set)
    log: list[tuple[str, str]] = field(default_factory=list)
    _failures: list[tuple[int, float | None]] = field(default_factory=list)
    _tokens: dict[str, float] = field(default_factory=dict)
    _pages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _includes: dict[str, list[str]] = field(default_factory=dict)
    #: most entries one batch or transaction Bundle may hold (emulator_bundles.py)
    max_bundle_entries: int = 200
    #: the status every ``batch`` Bundle is answered with as a whole (400, 404, 405, 501: an egress
    #: proxy or a server without batch support); None (the default) processes them
    batch_refusal: int | None = None
    #: optional R4 features (module docstring), off like the least capable server's
    revinclude: bool = False
    metadata: bool = False
    subscriptions: bool = False
    atomic_transactions: bool = False
    #: (type, id) -> the status an update of that resource answers (a charge posted to an invoice
    #: that the EHR will not change: 422), as a business rule of the EHR would
    locked: dict[tuple[str, str], int] = field(default_factory=dict)
    #: resource types changed inside an open transaction, notified once it commits
    _held: list[str] | None = None
    #: (type, "system|value") -> ids: conditional creates stay cheap with tens of thousands of resources
    _ident: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    #: (type, id, resource before, was deleted) for each change of an open transaction
    _undo: list[tuple[str, str, dict[str, Any] | None, bool]] | None = None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    notifier: RestHookNotifier = field(init=False)

    def __post_init__(self) -> None:
        self.notifier = RestHookNotifier(self._subscription_failed)

    def _subscription_failed(self, sub_id: str, problem: str) -> None:
        with self._lock:
            sub = self.store["Subscription"].get(sub_id)
            if sub is not None and sub.get("status") == "active":
                self._save(dict(sub) | {"status": "error", "error": problem})

    # --- knobs --------------------------------------------------------------------------

    def full(self) -> FHIREmulator:
        """Every optional feature on (the richest server profile)."""
        self.revinclude = self.metadata = self.subscriptions = self.atomic_transactions = True
        return self

    def supports(self, rtype: str) -> bool:
        return rtype in RESOURCE_TYPES and (rtype != "Subscription" or self.subscriptions)

    def fail_next(self, status: int, n: int = 1, retry_after: float | None = None) -> None:
        """The next ``n`` FHIR requests answer ``status`` (429/503 throttling), with Retry-After."""
        self._failures.extend([(status, retry_after)] * n)

    def revoke_tokens(self) -> None:
        """Invalidate every issued access token early, as an EHR admin or a key rotation does."""
        self._tokens.clear()

    def register_client(self, client_id: str, public_key_pem: bytes) -> None:
        self.clients[client_id] = public_key_pem

    def reset(self) -> None:
        with self._lock:
            self.store = {t: {} for t in RESOURCE_TYPES}
            self.deleted.clear()
            self.log.clear()
            self._failures.clear()
            self._pages.clear()
            self._includes.clear()
            self._ident.clear()

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a resource directly (a new version when it exists), as EHR staff or billing would."""
        with self._lock:
            return self._save(dict(resource))

    def get(self, rtype: str, rid: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.store[rtype][rid]))

    def all(self, rtype: str) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(r)) for r in self.store[rtype].values()]

    # --- storage ------------------------------------------------------------------------

    def _save(self, resource: dict[str, Any]) -> dict[str, Any]:
        rtype = resource["resourceType"]
        rid = resource.get("id") or f"{rtype[:3].lower()}{next(self._ids)}"
        old = self.store[rtype].get(rid)
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        resource["id"] = rid
        resource["meta"] = {**resource.get("meta", {}), "versionId": str(version), "lastUpdated": _now()}
        if rtype == "Subscription" and resource.get("status") == "requested":
            resource["status"] = "active"  # subscription.html 2.46.7: the server sets it up
        self._journal(rtype, rid)
        self._reindex(rtype, rid, old, resource)
        self.store[rtype][rid] = resource
        self.deleted.discard((rtype, rid))
        if rtype != "Subscription":
            if self._held is not None:
                self._held.append(rtype)  # inside a transaction: notify once it is committed
            else:
                self.notifier.changed(rtype, list(self.store["Subscription"].values()))
        return json.loads(json.dumps(resource))

    def _reindex(self, rtype: str, rid: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        for key in _refs(old, "identifier") if old else []:
            self._ident.get((rtype, key), set()).discard(rid)
        for key in _refs(new, "identifier") if new else []:
            self._ident.setdefault((rtype, key), set()).add(rid)

    def _journal(self, rtype: str, rid: str) -> None:
        """Inside a transaction, remember how a resource was before its first change (for rollback)."""
        if self._undo is not None:
            self._undo.append((rtype, rid, self.store[rtype].get(rid), (rtype, rid) in self.deleted))

    def begin(self) -> None:
        """Open a transaction: changes are journalled and subscriptions notified only at commit."""
        self._undo, self._held = [], []

    def commit(self) -> None:
        held, self._undo, self._held = self._held or [], None, None
        subscriptions = list(self.store["Subscription"].values())
        for rtype in held:
            self.notifier.changed(rtype, subscriptions)

    def rollback(self) -> None:
        for rtype, rid, old, was_deleted in reversed(self._undo or []):
            self._reindex(rtype, rid, self.store[rtype].get(rid), old)
            if old is None:
                self.store[rtype].pop(rid, None)
            else:
                self.store[rtype][rid] = old
            (self.deleted.add if was_deleted else self.deleted.discard)((rtype, rid))
        self._undo, self._held = None, None

    def _headers(self, resource: dict[str, Any]) -> dict[str, str]:
        return {"ETag": f'W/"{resource["meta"]["versionId"]}"', "Last-Modified": resource["meta"]["lastUpdated"]}

    # --- interactions (the lock is held by the caller) -------------------------------------

    def read(self, rtype: str, rid: str) -> Answer:
        """http.html#read: 404 unknown, 410 deleted."""
        current = self.store[rtype].get(rid)
        if current is None:
            gone = (rtype, rid) in self.deleted
            return issue(410 if gone else 404, "deleted" if gone else "not-found", f"{rtype}/{rid} is not here")
        return Answer(200, json.loads(json.dumps(current)), self._headers(current))

    def delete(self, rtype: str, rid: str) -> Answer:
        self._journal(rtype, rid)
        if (old := self.store[rtype].pop(rid, None)) is not None:
            self._reindex(rtype, rid, old, None)
            self.deleted.add((rtype, rid))
        return Answer(204)

    def update(self, rtype: str, rid: str, body: dict[str, Any], if_match: str | None) -> Answer:
        """http.html#update under version-aware If-Match (#concurrency: 412 on a stale version)."""
        if body.get("id") != rid:
            return issue(400, "invalid", "the resource id must match the URL (http.html#update)")
        current = self.store[rtype].get(rid)
        if (rtype, rid) in self.locked:
            return issue(self.locked[(rtype, rid)], "business-rule", f"{rtype}/{rid} may not be changed")
        if if_match is not None and current is None and (rtype, rid) in self.deleted:
            return issue(410, "deleted", f"{rtype}/{rid} was deleted")  # a version of it can no longer match
        if if_match is not None and (current is None or if_match != f'W/"{current["meta"]["versionId"]}"'):
            return issue(412, "conflict", f"{rtype}/{rid} changed since version {if_match}")
        saved = self._save(body)
        return Answer(200 if current is not None else 201, saved, self._headers(saved))

    def create(self, rtype: str, body: dict[str, Any], if_none_exist: str | None) -> Answer:
        """http.html#create, and #ccreate with If-None-Exist (one match -> 200 with it, several -> 412)."""
        if if_none_exist:
            try:
                found = self._filter(rtype, [(k, v) for k, _, v in (p.partition("=") for p in if_none_exist.split("&"))])
            except ValueError as err:
                return issue(400, "invalid", f"If-None-Exist: {err}")
            if len(found) > 1:
                return issue(412, "duplicate", "If-None-Exist matched more than one resource")
            if found:
                return Answer(200, found[0], self._headers(found[0]))
        body.pop("id", None)
        saved = self._save(body)
        location = f"{self.base_url}/{rtype}/{saved['id']}/_history/{saved['meta']['versionId']}"
        return Answer(201, saved, self._headers(saved) | {"Location": location})

    def search(self, rtype: str, params: list[tuple[str, str]], self_url: str) -> Answer:
        """A searchset Bundle (http.html#search); the result is frozen at the first page so paging never skips."""
        q = dict(params)
        token = q.get("_page")
        if token is None:
            try:
                found = self._filter(rtype, [(k, v) for k, v in params if k not in ("_revinclude", "_elements")])
            except ValueError as err:
                return issue(400, "not-supported", str(err))
            found.sort(key=lambda r: r["meta"]["lastUpdated"])
            token = uuid.uuid4().hex
            self._pages[token] = found
            self._includes[token] = [v for k, v in params if k == "_revinclude"] if self.revinclude else []
            if not self.revinclude:  # the self link says which parameters were used (search.html#conformance)
                base, _, query = self_url.partition("?")
                self_url = base + "?" + "&".join(p for p in query.split("&") if not p.startswith("_revinclude="))
        found = self._pages.get(token)  # type: ignore[assignment]
        if found is None:
            return issue(410, "expired", "the paging link has expired; search again")
        count = max(1, min(int(q.get("_count", self.page_size)), 500))
        offset = int(q.get("_offset", 0))
        page = found[offset : offset + count]
        link = [{"relation": "self", "url": self_url}]
        if offset + count < len(found):
            link.append({"relation": "next", "url": f"{self.base_url}/{rtype}?_page={token}&_offset={offset + count}&_count={count}"})
        entries = [{"fullUrl": f"{self.base_url}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in page]
        for r in self._revincluded(rtype, page, self._includes.get(token, [])):
            entries.append({"fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "include"}})
        bundle = {"resourceType": "Bundle", "type": "searchset", "meta": {"lastUpdated": _now()}, "total": len(found), "link": link, "entry": entries}
        return Answer(200, bundle)

    def _revincluded(self, rtype: str, page: list[dict[str, Any]], includes: list[str]) -> list[dict[str, Any]]:
        """search.html#revinclude: resources of another type whose reference parameter names a match."""
        wanted = {f"{rtype}/{r['id']}" for r in page}
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for spec in includes:
            source, _, param = spec.partition(":")
            if source not in self.store:
                continue
            for r in self.store[source].values():
                if wanted & set(_refs(r, param)):
                    out[(source, r["id"])] = json.loads(json.dumps(r))
        return list(out.values())

    # --- HTTP ---------------------------------------------------------------------------

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/auth/token", self._token, methods=["POST"]),
                Route("/metadata", self._metadata, methods=["GET"]),
                Route("/", self._bundle, methods=["POST"]),
                Route("/{rtype}", self._type_level, methods=["GET", "POST"]),
                Route("/{rtype}/{rid}", self._instance, methods=["GET", "PUT", "DELETE"]),
            ]
        )

    def _gate(self, request: Request) -> Response | None:
        if PERSON_HEADER not in request.headers:  # what a person does at the EHR is not syncbridge's call
            self.log.append((request.method, request.url.path))
        if self._failures:
            status, retry_after = self._failures.pop(0)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
            return outcome(status, "throttled" if status == 429 else "transient", "try again later", headers)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and (
            (self.static_token is not None and token == self.static_token) or self._tokens.get(token, 0) > time.time()
        )
        if not ok:
            return outcome(401, "login", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        if not self.supports(request.path_params.get("rtype", "")) and request.url.path not in ("/", "/metadata"):
            return outcome(404, "not-supported", f"resource type {request.path_params['rtype']} is not supported")
        return None

    @staticmethod
    def checked(body: Any, rtype: str) -> dict[str, Any] | Answer:
        if not isinstance(body, dict) or body.get("resourceType") != rtype:
            return issue(400, "invalid", f"the body must be a {rtype} resource")
        return body

    async def _json(self, request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError:
            return None

    async def _instance(self, request: Request) -> Response:
        if (denied := self._gate(request)) is not None:
            return denied
        rtype, rid = request.path_params["rtype"], request.path_params["rid"]
        if request.method in ("GET", "DELETE"):
            with self._lock:
                return respond(self.read(rtype, rid) if request.method == "GET" else self.delete(rtype, rid))
        body = self.checked(await self._json(request), rtype)
        if isinstance(body, Answer):
            return respond(body)
        with self._lock:
            return respond(self.update(rtype, rid, body, request.headers.get("if-match")))

    async def _type_level(self, request: Request) -> Response:
        if (denied := self._gate(request)) is not None:
            return denied
        rtype = request.path_params["rtype"]
        if request.method == "GET":
            with self._lock:
                return respond(self.search(rtype, list(request.query_params.multi_items()), str(request.url)))
        body = self.checked(await self._json(request), rtype)
        if isinstance(body, Answer):
            return respond(body)
        with self._lock:
            return respond(self.create(rtype, body, request.headers.get("if-none-exist")))

    async def _metadata(self, request: Request) -> Response:
        """http.html#capabilities: what this server does, only when ``metadata`` is on."""
        if not self.metadata:
            return outcome(404, "not-supported", "this server serves no CapabilityStatement")
        revinclude = {"Encounter": ["ChargeItem:context", "Claim:encounter"]} if self.revinclude else {}
        resources = [
            {"type": t, "interaction": [{"code": c} for c in ("read", "update", "create", "search-type", "delete")]}
            | ({"searchRevInclude": revinclude[t]} if t in revinclude else {})
            for t in RESOURCE_TYPES if self.supports(t)
        ]
        body = {
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
            "format": ["json"], "date": _now(),
            "rest": [{"mode": "server", "resource": resources, "interaction": [{"code": "batch"}, {"code": "transaction"}]}],
        }
        return respond(Answer(200, body))

    async def _token(self, request: Request) -> Response:
        return await token_endpoint(self, request)

    async def _bundle(self, request: Request) -> Response:
        """POST [base] with a ``batch`` or ``transaction`` Bundle (http.html#transaction; emulator_bundles.py)."""
        if (denied := self._gate(request)) is not None:
            return denied
        body = await self._json(request)
        if self.batch_refusal is not None and isinstance(body, dict) and body.get("type") == "batch":
            return outcome(self.batch_refusal, "not-supported", "batch Bundles are not accepted here")
        minimal = "return=minimal" in request.headers.get("prefer", "")
        with self._lock:
            return respond(process_bundle(self, body, minimal=minimal))

    def _filter(self, rtype: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        token = next((v for k, v in params if k == "identifier" and "," not in v), None)
        if token is not None:
            out = [self.store[rtype][i] for i in self._ident.get((rtype, token), ()) if i in self.store[rtype]]
        else:
            out = list(self.store[rtype].values())
        for name, value in params:
            if name == "_lastUpdated":
                prefix, when = value[:2], value[2:]
                if prefix != "ge":
                    raise ValueError("only _lastUpdated=ge<instant> is supported")
                since = _instant(when)
                out = [r for r in out if _instant(r["meta"]["lastUpdated"]) >= since]
            elif name in ("identifier", "patient", "practitioner", "appointment", "context", "encounter"):
                out = [r for r in out if any(_matches(r, name, v) for v in value.split(","))]
            elif name == "_id":
                out = [r for r in out if r["id"] in value.split(",")]
            elif name == "status":
                out = [r for r in out if r.get("status") in value.split(",")]
            elif name not in ("_count", "_sort"):
                raise ValueError(f"search parameter {name} is not supported")
        return [json.loads(json.dumps(r)) for r in out]


@dataclass
class Running:
    emulator: FHIREmulator
    base_url: str
    stop: Callable[[], None]
    injector: Injector


def running(emulator: FHIREmulator | None = None) -> Running:
    """Serve ``emulator`` in a background thread on a free loopback port (its URL is needed first: token audience)."""
    emu = emulator or FHIREmulator()
    port = free_port()
    emu.base_url = f"http://127.0.0.1:{port}"
    server = serve_in_thread(emu.app, port=port)
    return Running(emu, emu.base_url, server.stop, server.injector)
