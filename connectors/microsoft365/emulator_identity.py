"""The Microsoft identity platform's v2.0 endpoints, as far as msal uses them against the emulator.

Follows:
- OpenID discovery, ``GET /{tenant}/v2.0/.well-known/openid-configuration``
  (learn.microsoft.com/entra/identity-platform/v2-protocols-oidc#find-your-apps-openid-configuration-document-uri);
- client credentials with a secret or a certificate assertion (RS256 with ``x5t`` or PS256 with
  ``x5t#S256``, ``aud`` = the token endpoint, ``iss`` = ``sub`` = client id), scope
  ``<resource>/.default`` (learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow,
  /certificate-credentials);
- the device authorization grant: ``POST /{tenant}/oauth2/v2.0/devicecode``, then polling with
  ``grant_type=urn:ietf:params:oauth:grant-type:device_code`` answered ``authorization_pending``
  until the user signs in (learn.microsoft.com/entra/identity-platform/v2-oauth2-device-code);
- ``refresh_token`` grants (/v2-oauth2-auth-code-flow#refresh-the-access-token).

Errors use the platform's body: ``{"error", "error_description", "error_codes", ...}``, 400 for
bad grants and 401 for a client that fails to authenticate.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import jwt
from cryptography import x509
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from .emulator import GraphEmulator

__all__ = ["Identity", "TokenGrant"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
RESERVED_SCOPES = {"openid", "profile", "offline_access"}


@dataclass
class TokenGrant:
    """What an issued access token allows: every mailbox (app-only) or one user's (delegated)."""

    expires_at: float
    app_only: bool
    user: str | None = None


@dataclass
class _Device:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    user: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _error(status: int, error: str, description: str, code: int) -> JSONResponse:
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: {description}",
        "error_codes": [code],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "trace_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
    }
    return JSONResponse(body, status)


@dataclass
class Identity:
    """Registered applications, issued tokens and pending device sign-ins of one tenant."""

    emulator: GraphEmulator
    tenant: str
    #: client_id -> secret (str) or certificate (PEM bytes) or None for a public client
    clients: dict[str, str | bytes | None] = field(default_factory=dict)
    access_tokens: dict[str, TokenGrant] = field(default_factory=dict)
    refresh_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (client_id, user)
    devices: dict[str, _Device] = field(default_factory=dict)
    #: the user who signs in at the verification page for every device code (None: nobody yet)
    device_user: str | None = None
    token_lifetime: int = 3599

    @property
    def authority(self) -> str:
        return f"{self.emulator.base_url}/{self.tenant}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    def grant_for(self, token: str) -> TokenGrant | None:
        grant = self.access_tokens.get(token)
        return grant if grant is not None and grant.expires_at > time.time() else None

    def revoke_all(self) -> None:
        """Invalidate every access token early, as a key rotation or consent revocation does."""
        self.access_tokens.clear()

    # --- HTTP ---------------------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        self.emulator.record(request)
        if request.path_params["tenant"] != self.tenant:
            return _error(400, "invalid_tenant", f"Tenant '{request.path_params['tenant']}' not found.", 90002)
        base = self.authority
        return JSONResponse({
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": self.token_endpoint,
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "NA",
        })

    @staticmethod
    async def _form(request: Request) -> dict[str, str]:
        # application/x-www-form-urlencoded, parsed here (starlette's form() needs python-multipart)
        return {k: v[0] for k, v in parse_qs((await request.body()).decode(), keep_blank_values=True).items()}

    async def devicecode(self, request: Request) -> Response:
        self.emulator.record(request)
        form = await self._form(request)
        client_id = form.get("client_id", "")
        if client_id not in self.clients:
            return _error(400, "unauthorized_client", f"Application with identifier '{client_id}' was not found in the directory.", 700016)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        device = _Device(secrets.token_urlsafe(32), user_code, client_id, form.get("scope", ""), time.time() + 900)
        self.devices[device.device_code] = device
        uri = f"{self.emulator.base_url}/devicelogin"
        return JSONResponse({
            "user_code": user_code,
            "device_code": device.device_code,
            "verification_uri": uri,
            "expires_in": 900,
            "interval": 1,
            "message": f"To sign in, use a web browser to open the page {uri} and enter the code {user_code} to authenticate.",
        })

    async def token(self, request: Request) -> Response:
        self.emulator.record(request)
        if request.path_params["tenant"] != self.tenant:
            return _error(400, "invalid_tenant", f"Tenant '{request.path_params['tenant']}' not found.", 90002)
        form = await self._form(request)
        grant = form.get("grant_type")
        client_id = form.get("client_id", "")
        if client_id not in self.clients:
            return _error(400, "unauthorized_client", f"Application with identifier '{client_id}' was not found in the directory.", 700016)
        if grant == "client_credentials":
            refused = self._authenticate(client_id, form)
            if refused is not None:
                return refused
            scopes = set(form.get("scope", "").split()) - RESERVED_SCOPES
            if scopes != {self.emulator.resource + "/.default"}:
                return _error(400, "invalid_scope", "The provided value for scope is not valid. Client credential flows must have a scope "
                              "value with /.default suffixed to the resource identifier (application ID URI).", 1002012)
            return self._issue(TokenGrant(time.time() + self.token_lifetime, app_only=True), client_id)
        if grant == DEVICE_GRANT:
            device = self.devices.get(form.get("device_code", ""))
            if device is None or device.client_id != client_id or device.expires_at < time.time():
                self.devices.pop(form.get("device_code", ""), None)
                return _error(400, "expired_token", "The device code has expired or is unknown.", 70020)
            device.user = device.user or self.device_user
            if device.user is None:
                return _error(400, "authorization_pending", "The user hasn't finished authenticating.", 70016)
            del self.devices[device.device_code]
            return self._issue(TokenGrant(time.time() + self.token_lifetime, app_only=False, user=device.user), client_id, scope=device.scope)
        if grant == "refresh_token":
            held = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
            if held is None or held[0] != client_id:
                return _error(400, "invalid_grant", "The refresh token has expired or is invalid.", 700082)
            return self._issue(TokenGrant(time.time() + self.token_lifetime, app_only=False, user=held[1]), client_id, scope=form.get("scope", ""))
        return _error(400, "unsupported_grant_type", f"The grant type '{grant}' is not supported.", 70003)

    def _authenticate(self, client_id: str, form: dict[str, str]) -> Response | None:
        registered = self.clients[client_id]
        if isinstance(registered, str):
            if not secrets.compare_digest(form.get("client_secret", ""), registered):
                return _error(401, "invalid_client", f"Invalid client secret provided. Ensure the secret being sent in the request "
                              f"is the client secret value, not the client secret ID, for a secret added to app '{client_id}'.", 7000215)
            return None
        if registered is None:
            return _error(401, "invalid_client", "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.", 7000218)
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return _error(401, "invalid_client", "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.", 7000218)
        public_key = x509.load_pem_x509_certificate(registered).public_key()
        try:
            claims = jwt.decode(
                form.get("client_assertion", ""), public_key,  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"], audience=self.token_endpoint, options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as err:
            return _error(401, "invalid_client", f"Client assertion failed signature or claim validation ({type(err).__name__}).", 700027)
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            return _error(401, "invalid_client", "Client assertion contains an invalid issuer or subject.", 700024)
        return None

    def _issue(self, grant: TokenGrant, client_id: str, scope: str = "") -> JSONResponse:
        token = secrets.token_urlsafe(40)
        self.access_tokens[token] = grant
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": self.token_lifetime, "ext_expires_in": self.token_lifetime, "access_token": token}
        if not grant.app_only and grant.user is not None:
            user = self.emulator.users[grant.user]
            refresh = secrets.token_urlsafe(40)
            self.refresh_tokens[refresh] = (client_id, grant.user)
            now = int(time.time())
            claims = {
                "aud": client_id, "iss": f"{self.authority}/v2.0", "iat": now, "nbf": now, "exp": now + 3600,
                "oid": user.object_id, "tid": self.tenant, "sub": user.object_id, "preferred_username": user.upn,
                "name": user.upn.split("@")[0], "ver": "2.0",
            }
            body |= {
                "scope": " ".join(s for s in scope.split() if s not in RESERVED_SCOPES) or f"{self.emulator.resource}/Calendars.ReadWrite",
                "refresh_token": refresh,
                # unsigned on purpose: msal reads the claims and does not verify id_token signatures
                "id_token": f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}.",
                "client_info": _b64(json.dumps({"uid": user.object_id, "utid": self.tenant}).encode()),
            }
        return JSONResponse(body)
