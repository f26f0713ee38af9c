"""The FHIR R4 wire layer: every request the connector makes, and the one table from answers to errors.

Knows REST (hl7.org/fhir/R4/http.html), SMART Backend Services auth and nothing of
appointments. Every failure leaves as a :mod:`syncbridge.errors` exception, translated here and
only here; messages name the method and the resource type, never resource content.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from syncbridge.errors import (
    BATCH_REFUSED,
    AuthError,
    BatchRefused,
    ConflictError,
    PermanentError,
    RateLimited,
    SyncbridgeError,
    TransientError,
    retry_after_seconds,
    unreachable,
)
from syncbridge.limits import json_object

__all__ = [
    "BundleTooLarge",
    "FHIRClient",
    "entry_etag",
    "entry_id",
    "entry_resource",
    "entry_status",
    "error_for_status",
    "raise_for_status",
    "search_url",
    "signed_assertion",
]

FHIR_JSON = "application/fhir+json"
#: seconds a client sends each entry on its own after the EHR refused a ``batch`` Bundle as a whole,
#: before it tries a Bundle again
SINGLES_FOR = 300.0
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SMART_HINT = (
    "register this client's public key (JWKS) with the EHR as a SMART Backend Services app and make sure "
    "client_id, token_url and private_key in the config belong to that registration (see connectors/fhir/README.md)"
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_assertion(client_id: str, token_url: str, private_key_pem: str, kid: str | None = None) -> str:
    """The RS384 client assertion JWT of SMART Backend Services (iss = sub = client_id, aud = token URL)."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError) as err:
        raise AuthError("the FHIR private key is not an unencrypted PEM private key", action=SMART_HINT) from err
    if not isinstance(key, rsa.RSAPrivateKey):
        raise AuthError("the FHIR private key must be an RSA key (RS384)", action=SMART_HINT)
    header = {"alg": "RS384", "typ": "JWT", "kid": kid or client_id}
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": int(time.time()) + 300, "jti": uuid.uuid4().hex}
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA384())
    return f"{signing_input}.{_b64url(signature)}"


def error_for_status(status: int, what: str, *, retry_after: str | None = None) -> SyncbridgeError:
    """The one table from an unsuccessful HTTP status to what the caller must do (DESIGN section 9).

    Used for whole answers and for each failed entry of a batch or transaction Bundle alike.
    """
    if status == 401:
        return AuthError(f"{what}: the EHR refused the access token (401)", action=SMART_HINT)
    if status == 403:
        return AuthError(f"{what}: the client lacks a scope for this (403)", action="grant the scopes listed in connectors/fhir/README.md")
    if status in (409, 412):
        return ConflictError(f"{what}: the EHR's copy changed since it was read ({status})")
    if status in (429, 503):
        return RateLimited(f"{what}: the EHR asks to slow down ({status})", retry_after=retry_after_seconds(retry_after))
    if status >= 500 or status in (408, 425):
        return TransientError(f"{what}: server error ({status})", retry_after=retry_after_seconds(retry_after))
    return PermanentError(f"{what}: refused ({status})")


class BundleTooLarge(PermanentError):
    """The EHR refused a Bundle for its size (413); fewer entries per Bundle will pass."""


def search_url(rtype: str, params: dict[str, str]) -> str:
    """``[type]?name=value&...`` relative to the base, as a search request or a Bundle entry's url."""
    return f"{rtype}?" + "&".join(f"{k}={quote(v, safe='|:/')}" for k, v in params.items())


def raise_for_status(status: int, what: str, *, retry_after: str | None = None) -> NoReturn:
    raise error_for_status(status, what, retry_after=retry_after)


def entry_status(entry: dict[str, Any]) -> int:
    """The HTTP status of one response entry of a batch/transaction Bundle ("201 Created" -> 201)."""
    text = str(entry.get("response", {}).get("status", "")).strip()
    head = text.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def entry_resource(entry: dict[str, Any], what: str, *, searchset: bool = False) -> dict[str, Any]:
    """The resource of a successful Bundle response entry; a failed one raises its error."""
    status = entry_status(entry)
    if not 200 <= status < 300:
        raise error_for_status(status, what) if status else TransientError(f"{what}: the entry has no response status")
    resource = entry.get("resource")
    if not isinstance(resource, dict) or ("id" not in resource and not searchset):
        raise TransientError(f"{what}: the entry carries no resource")
    return resource


def entry_etag(entry: dict[str, Any]) -> str:
    """The version a successful write entry produced: ``response.etag``, else its resource's versionId."""
    status = entry_status(entry)
    if not 200 <= status < 300:
        raise error_for_status(status, "write in a Bundle") if status else TransientError("write in a Bundle: no response status")
    etag = entry.get("response", {}).get("etag")
    if etag:
        return str(etag)
    return f'W/"{entry_resource(entry, "write in a Bundle")["meta"]["versionId"]}"'


def entry_id(entry: dict[str, Any]) -> str:
    """The id a successful write entry names: its resource's, else the one in ``response.location``
    (``[type]/[id]/_history/[vid]``, possibly absolute), for a server answering ``return=minimal``."""
    resource = entry.get("resource")
    if isinstance(resource, dict) and resource.get("id"):
        return str(resource["id"])
    parts = str(entry.get("response", {}).get("location", "")).split("/")
    if "_history" in parts and parts.index("_history") >= 1:
        return parts[parts.index("_history") - 1]
    raise TransientError("write in a Bundle: the entry names no resource id")


class FHIRClient:
    """Thin async client: read, search (following ``next`` links), conditional create, update."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        client_id: str | None = None,
        private_key: str | None = None,
        token_url: str | None = None,
        scope: str = "",
        kid: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._static = token
        self._smart = (client_id, private_key, token_url or f"{self.base_url}/auth/token", scope, kid)
        self._access: tuple[str, float] | None = None
        self._http = httpx.AsyncClient(timeout=30.0)
        #: told when ``batch`` Bundles are refused (a note) and taken again (None): the connector's
        #: ``Host.degraded``, so the status shows why the EHR is read more slowly
        self.on_batches: Callable[[str | None], None] | None = None
        self._singles_until: float | None = None

    async def close(self) -> None:
        await self._http.aclose()

    async def _token(self) -> str:
        if self._static is not None:
            return self._static
        if self._access and self._access[1] > time.time() + 30:
            return self._access[0]
        client_id, key, token_url, scope, kid = self._smart
        if not client_id or not key:
            raise AuthError("SMART auth needs client_id and private_key", action=SMART_HINT)
        form = {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": signed_assertion(client_id, token_url, key, kid),
        }
        try:
            r = await self._http.post(token_url, data=form)
        except httpx.HTTPError as err:
            raise unreachable("POST token", err) from err
        if r.status_code in (400, 401, 403):
            try:
                detail = str(r.json().get("error_description") or r.json().get("error"))[:200]
            except ValueError:
                detail = ""
            raise AuthError(f"the EHR's token endpoint refused this client ({r.status_code}: {detail})", action=SMART_HINT)
        if r.status_code >= 300:
            raise_for_status(r.status_code, "POST token", retry_after=r.headers.get("retry-after"))
        body = r.json()
        self._access = (body["access_token"], time.time() + float(body.get("expires_in", 300)))
        return body["access_token"]

    async def _request(
        self, method: str, url: str, what: str, *, json_body: Any = None, headers: dict[str, str] | None = None, renewed: bool = False
    ) -> httpx.Response:
        full = url if url.startswith("http") else f"{self.base_url}/{url.lstrip('/')}"
        hdrs = {"Accept": FHIR_JSON, "Authorization": f"Bearer {await self._token()}", **(headers or {})}
        if json_body is not None:
            hdrs["Content-Type"] = FHIR_JSON
        try:
            r = await self._http.request(method, full, content=json.dumps(json_body) if json_body is not None else None, headers=hdrs)
        except httpx.HTTPError as err:
            raise unreachable(what, err) from err
        if r.status_code == 401 and self._static is None and not renewed:
            self._access = None  # the token may have been revoked early: fetch a new one, once
            return await self._request(method, url, what, json_body=json_body, headers=headers, renewed=True)
        return r

    @staticmethod
    def _resource(r: httpx.Response, what: str) -> dict[str, Any]:
        return json_object(r.content, what, kind="a resource")

    async def read(self, rtype: str, rid: str) -> dict[str, Any] | None:
        """The resource, or None when it is gone (404/410)."""
        what = f"GET {rtype}"
        r = await self._request("GET", f"{rtype}/{quote(rid)}", what)
        if r.status_code in (404, 410):
            return None
        if r.status_code >= 300:
            raise_for_status(r.status_code, what, retry_after=r.headers.get("retry-after"))
        return self._resource(r, what)

    async def capabilities(self) -> dict[str, Any] | None:
        """The server's CapabilityStatement (http.html#capabilities), or None where it serves none."""
        r = await self._request("GET", "metadata", "GET metadata")
        if r.status_code in (429, 503) or r.status_code >= 500:
            raise_for_status(r.status_code, "GET metadata", retry_after=r.headers.get("retry-after"))
        if r.status_code in (401, 403):
            raise_for_status(r.status_code, "GET metadata")
        if r.status_code >= 300:
            return None
        try:
            statement = self._resource(r, "GET metadata")
        except SyncbridgeError:
            return None
        return statement if statement.get("resourceType") == "CapabilityStatement" else None

    async def delete(self, rtype: str, rid: str) -> None:
        """DELETE (http.html#delete); a resource already gone is fine."""
        what = f"DELETE {rtype}"
        r = await self._request("DELETE", f"{rtype}/{quote(rid)}", what)
        if r.status_code >= 300 and r.status_code not in (404, 410):
            raise_for_status(r.status_code, what, retry_after=r.headers.get("retry-after"))

    async def search(self, rtype: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Every entry of a search, following the Bundle's ``next`` links (http.html#search, #paging)."""
        async for resource in self._pages(search_url(rtype, params), f"GET {rtype}?"):
            yield resource

    async def _pages(self, first: str, what: str) -> AsyncIterator[dict[str, Any]]:
        """Every page of a search. A server that says (``total``) there are more matches than it sent
        but gives no ``next`` link is asked on with ``_offset`` (search.html#count leaves paging to
        the server; some page only that way) rather than taken as finished; an empty page ends it."""
        url: str | None = first
        matched = 0
        while url:
            r = await self._request("GET", url, what)
            if r.status_code >= 300:
                raise_for_status(r.status_code, what, retry_after=r.headers.get("retry-after"))
            try:
                bundle = r.json()
            except ValueError as err:
                raise TransientError(f"{what}: the answer is not JSON") from err
            page = 0
            for entry in bundle.get("entry", []):
                if "resource" in entry:
                    page += entry.get("search", {}).get("mode", "match") == "match"
                    yield entry["resource"]
            matched += page
            url = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
            total = bundle.get("total")
            if url is None and isinstance(total, int) and total > matched and page:  # an empty page ends it (a stale total)
                base = "&".join(p for p in first.split("&") if not p.startswith("_offset="))
                url = f"{base}&_offset={matched}"

    async def create(self, resource: dict[str, Any], if_none_exist: str | None = None) -> dict[str, Any]:
        """POST, conditional when ``if_none_exist`` is given (http.html#ccreate): a retry makes no duplicate."""
        rtype = resource["resourceType"]
        what = f"POST {rtype}"
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        r = await self._request("POST", rtype, what, json_body=resource, headers=headers)
        if r.status_code >= 300:
            raise_for_status(r.status_code, what, retry_after=r.headers.get("retry-after"))
        return self._resource(r, what)

    async def update(self, resource: dict[str, Any], if_match: str | None) -> dict[str, Any] | None:
        """PUT under ``If-Match: W/"versionId"`` (http.html#concurrency); 412 -> ConflictError.

        None when the resource is gone (404/410: deleted since it was read), as :meth:`read` says.
        """
        rtype = resource["resourceType"]
        what = f"PUT {rtype}"
        headers = {"If-Match": if_match} if if_match else None
        r = await self._request("PUT", f"{rtype}/{quote(resource['id'])}", what, json_body=resource, headers=headers)
        if r.status_code in (404, 410):
            return None
        if r.status_code >= 300:
            raise_for_status(r.status_code, what, retry_after=r.headers.get("retry-after"))
        return self._resource(r, what)

    async def bundle(self, kind: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST a ``batch`` or ``transaction`` Bundle to [base] (http.html#transaction); one request.

        Returns the response entries in request order (``response.status``, ``etag``, ``location``,
        ``outcome``, and the resource: ``Prefer: return=representation``). A batch answers 200
        whatever its entries did: the caller reads each entry (:func:`entry_status`). A failed
        transaction changed nothing and raises the error of its status (412 -> ConflictError).
        """
        what = f"POST {kind} Bundle"
        body = {"resourceType": "Bundle", "type": kind, "entry": entries}
        r = await self._request("POST", "", what, json_body=body, headers={"Prefer": "return=representation"})
        if r.status_code == 413:
            raise BundleTooLarge(f"{what}: the EHR takes fewer than {len(entries)} entries per Bundle (413)")
        if kind == "batch" and r.status_code in BATCH_REFUSED:
            # none of its entries was tried: the caller sends them on their own (DESIGN section 9)
            raise BatchRefused(f"{what}: the EHR refused the Bundle as a whole ({r.status_code})")
        if r.status_code >= 300:
            raise_for_status(r.status_code, what, retry_after=r.headers.get("retry-after"))
        answer = self._resource(r, what)
        out = answer.get("entry")
        if answer.get("type") != f"{kind}-response" or not isinstance(out, list) or len(out) != len(entries):
            raise TransientError(f"{what}: the answer is not a {kind}-response with one entry per request")
        return [e if isinstance(e, dict) else {} for e in out]

    async def batch(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The answers of a ``batch`` Bundle; where the EHR refuses batch Bundles as a whole (a proxy
        allowing only [type] paths), each entry is sent on its own for :data:`SINGLES_FOR` seconds,
        answered in the same form: slower, never lost."""
        if self._singles_until is None or time.monotonic() >= self._singles_until:
            try:
                answers = await self.bundle("batch", entries)
            except BatchRefused as err:
                self._singles_until = time.monotonic() + SINGLES_FOR
                if self.on_batches is not None:
                    self.on_batches(f"its batch Bundles are refused, so each request is sent on its own ({err})")
            else:
                if self._singles_until is not None:
                    self._singles_until = None
                    if self.on_batches is not None:
                        self.on_batches(None)
                return answers
        return [await self._single(entry) for entry in entries]

    async def _single(self, entry: dict[str, Any]) -> dict[str, Any]:
        """One Bundle entry as its own request, answered as a batch-response entry would be
        (``response.status``, ``etag``, ``location``, the resource or ``outcome``). Throttling and
        server errors raise, as they would for the whole Bundle."""
        request = entry.get("request", {})
        method, url = str(request.get("method", "GET")).upper(), str(request.get("url", ""))
        headers = {"Prefer": "return=representation"} if method != "GET" else {}
        if request.get("ifMatch"):
            headers["If-Match"] = str(request["ifMatch"])
        if request.get("ifNoneExist"):
            headers["If-None-Exist"] = str(request["ifNoneExist"])
        what = f"{method} {url.partition('?')[0].partition('/')[0]}"
        r = await self._request(method, url, what, json_body=entry.get("resource"), headers=headers)
        if r.status_code in (429, 503) or r.status_code >= 500:
            raise_for_status(r.status_code, what, retry_after=r.headers.get("retry-after"))
        response = {"status": str(r.status_code)} | {k: r.headers[h] for k, h in (("etag", "etag"), ("location", "location")) if h in r.headers}
        answer: dict[str, Any] = {"response": response}
        if r.content:
            try:
                body = self._resource(r, what)
            except SyncbridgeError:
                return answer
            if r.status_code < 300:
                answer["resource"] = body
            else:
                response["outcome"] = body
        return answer

    async def rest_of(self, searchset: dict[str, Any]) -> list[dict[str, Any]]:
        """Every resource of a searchset Bundle (a batch entry's answer), following its ``next`` links."""
        found = [e["resource"] for e in searchset.get("entry", []) if isinstance(e, dict) and "resource" in e]
        after = next((link["url"] for link in searchset.get("link", []) if link.get("relation") == "next"), None)
        if after:
            found += [r async for r in self._pages(after, "GET next page")]
        return found
