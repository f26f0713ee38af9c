"""The OAuth 2.0 side of the Google Calendar emulator: token endpoint, consent endpoint, keys.

Follows Google's documented flows:

- Service accounts with domain-wide delegation
  (https://developers.google.com/identity/protocols/oauth2/service-account#authorizingrequests):
  ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` with an RS256 JWT whose ``iss`` is the
  service account's email, ``aud`` is ``https://oauth2.googleapis.com/token`` (google-auth signs for
  that audience whatever ``token_uri`` says), ``scope`` the requested scopes, ``sub`` the user to
  impersonate, and ``exp - iat`` at most one hour. A ``sub`` outside the delegation (scopes not
  granted in the Admin console) is refused with ``unauthorized_client`` as Google does.
- Installed apps (https://developers.google.com/identity/protocols/oauth2/native-app): an
  authorization endpoint that redirects to the loopback ``redirect_uri`` with ``code`` and
  ``state`` (consent is given by the emulator's ``consenting_user``), PKCE S256 checked at the
  token endpoint, and ``grant_type=refresh_token``.

Token errors use the OAuth JSON form ``{"error": ..., "error_description": ...}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["GOOGLE_TOKEN_AUDIENCE", "JWT_BEARER", "AuthServer", "Grant", "new_service_account_key"]

GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCESS_TTL = 3600


def new_service_account_key(client_email: str, token_uri: str, project_id: str = "syncbridge-test") -> tuple[dict[str, Any], bytes]:
    """A service-account JSON key (the file the Cloud console downloads) and its public key PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": str(100000000000000000000 + secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    return info, public_pem


@dataclass(frozen=True)
class Grant:
    """Who an access token acts for and with which scopes."""

    principal: str
    scopes: frozenset[str]
    expires: float


@dataclass
class _ServiceAccount:
    client_id: str
    public_pem: bytes
    #: scopes granted to this client id for domain-wide delegation (Admin console)
    delegated: frozenset[str] = frozenset()


@dataclass
class AuthServer:
    """Issued tokens and registered clients; ``users`` are the accounts of the Workspace domain."""

    users: set[str] = field(default_factory=set)
    service_accounts: dict[str, _ServiceAccount] = field(default_factory=dict)
    #: OAuth clients (installed app): client_id -> client_secret
    oauth_clients: dict[str, str] = field(default_factory=dict)
    #: who signs in and consents at the authorization endpoint (a test plays the person)
    consenting_user: str | None = None
    _access: dict[str, Grant] = field(default_factory=dict)
    _refresh: dict[str, tuple[str, str, frozenset[str]]] = field(default_factory=dict)
    _codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- registration ----------------------------------------------------------------------

    def add_service_account(self, client_email: str, client_id: str, public_pem: bytes, delegated_scopes: set[str]) -> None:
        self.service_accounts[client_email] = _ServiceAccount(client_id, public_pem, frozenset(delegated_scopes))

    def revoke_delegation(self, client_email: str) -> None:
        """What an admin removing the client id from domain-wide delegation does."""
        sa = self.service_accounts[client_email]
        sa.delegated = frozenset()
        self.revoke_tokens()

    def revoke_tokens(self) -> None:
        with self._lock:
            self._access.clear()

    def grant_for(self, authorization: str | None) -> Grant | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        grant = self._access.get(token)
        return grant if grant is not None and grant.expires > time.time() else None

    def _issue(self, principal: str, scopes: frozenset[str]) -> dict[str, Any]:
        token = "ya29." + secrets.token_urlsafe(32)
        with self._lock:
            self._access[token] = Grant(principal, scopes, time.time() + ACCESS_TTL)
        return {"access_token": token, "expires_in": ACCESS_TTL - 1, "token_type": "Bearer", "scope": " ".join(sorted(scopes))}

    # --- token endpoint -----------------------------------------------------------------------

    def token(self, form_body: bytes, authorization: str | None = None) -> tuple[int, dict[str, Any]]:
        """POST /token (application/x-www-form-urlencoded); client credentials in the form or as HTTP Basic."""
        form = {k: v[0] for k, v in parse_qs(form_body.decode(errors="replace"), keep_blank_values=True).items()}
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                cid, _, secret = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
            form |= {"client_id": unquote_plus(cid), "client_secret": unquote_plus(secret)}
        grant_type = form.get("grant_type")
        if grant_type == JWT_BEARER:
            return self._jwt_bearer(form.get("assertion", ""))
        if grant_type == "refresh_token":
            return self._refresh_grant(form)
        if grant_type == "authorization_code":
            return self._code_grant(form)
        return 400, {"error": "unsupported_grant_type", "error_description": f"Invalid grant_type: {grant_type}"}

    def _jwt_bearer(self, assertion: str) -> tuple[int, dict[str, Any]]:
        def invalid(text: str) -> tuple[int, dict[str, Any]]:
            return 400, {"error": "invalid_grant", "error_description": text}

        try:
            unverified = jwt.api_jws.decode_complete(assertion, options={"verify_signature": False})
            header, claims = unverified["header"], json.loads(unverified["payload"])
        except (jwt.InvalidTokenError, ValueError):
            return invalid("Invalid JWT: the assertion is not a signed JWT")
        if not isinstance(claims, dict):
            return invalid("Invalid JWT: the assertion is not a signed JWT")
        if header.get("alg") != "RS256":
            return invalid("Invalid JWT Signature.")
        sa = self.service_accounts.get(str(claims.get("iss")))
        if sa is None:
            return 401, {"error": "invalid_client", "error_description": "The OAuth client was not found."}
        try:
            jwt.api_jws.decode_complete(assertion, sa.public_pem, algorithms=["RS256"])
        except jwt.InvalidSignatureError:
            return invalid("Invalid JWT Signature.")
        if claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return invalid(f"Invalid JWT: Audience must be {GOOGLE_TOKEN_AUDIENCE}")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int | float) or not isinstance(exp, int | float) or exp - iat > 3600 or exp < now or iat > now + 300:
            return invalid("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.")
        scopes = frozenset(str(claims.get("scope", "")).split())
        if not scopes:
            return 400, {"error": "invalid_scope", "error_description": "Empty or missing scope not allowed."}
        subject = claims.get("sub")
        if subject is None:
            return 200, self._issue(str(claims["iss"]), scopes)  # the service account itself: it owns no calendars
        if subject not in self.users or not scopes <= sa.delegated:
            return 401, {
                "error": "unauthorized_client",
                "error_description": "Client is unauthorized to retrieve access tokens using this method, "
                "or client not authorized for any of the scopes requested.",
            }
        return 200, self._issue(str(subject), scopes)

    def _client_ok(self, form: dict[str, str]) -> bool:
        cid = form.get("client_id", "")
        return cid in self.oauth_clients and secrets.compare_digest(self.oauth_clients[cid], form.get("client_secret", ""))

    def _refresh_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if not self._client_ok(form):
            return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
        held = self._refresh.get(form.get("refresh_token", ""))
        if held is None or held[0] != form.get("client_id"):
            return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
        return 200, self._issue(held[1], held[2])

    def _code_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if not self._client_ok(form):
            return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
        with self._lock:
            code = self._codes.pop(form.get("code", ""), None)
        if code is None or code["client_id"] != form.get("client_id") or code["redirect_uri"] != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant", "error_description": "Malformed auth code."}
        if code.get("challenge"):
            verifier = form.get("code_verifier", "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if not secrets.compare_digest(digest, code["challenge"]):
                return 400, {"error": "invalid_grant", "error_description": "Invalid code verifier."}
        refresh = "1//" + secrets.token_urlsafe(40)
        with self._lock:
            self._refresh[refresh] = (code["client_id"], code["user"], code["scopes"])
        return 200, self._issue(code["user"], code["scopes"]) | {"refresh_token": refresh}

    # --- authorization endpoint -----------------------------------------------------------------

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, Any] | str]:
        """GET /o/oauth2/auth: the consent screen, answered for ``consenting_user``; returns a redirect URL."""
        redirect = query.get("redirect_uri", "")
        host = urlsplit(redirect).hostname
        if query.get("client_id") not in self.oauth_clients:
            return 401, {"error": "invalid_client", "error_description": "The OAuth client was not found."}
        if urlsplit(redirect).scheme != "http" or host not in ("127.0.0.1", "localhost", "::1"):
            return 400, {"error": "invalid_request", "error_description": "redirect_uri must be a loopback address for installed apps"}
        if query.get("response_type") != "code":
            return 400, {"error": "unsupported_response_type", "error_description": "response_type must be code"}
        if self.consenting_user is None:
            return 400, {"error": "access_denied", "error_description": "nobody signed in"}
        if query.get("code_challenge") and query.get("code_challenge_method", "plain") != "S256":
            return 400, {"error": "invalid_request", "error_description": "only code_challenge_method=S256 is supported here"}
        code = "4/" + uuid.uuid4().hex
        with self._lock:
            self._codes[code] = {
                "client_id": query["client_id"],
                "redirect_uri": redirect,
                "user": self.consenting_user,
                "scopes": frozenset(query.get("scope", "").split()),
                "challenge": query.get("code_challenge"),
            }
        params = {"code": code, "scope": query.get("scope", "")} | ({"state": query["state"]} if "state" in query else {})
        return 302, f"{redirect}{'&' if '?' in redirect else '?'}{urlencode(params)}"
