"""SMART Backend Services token endpoint of the FHIR emulator
(https://hl7.org/fhir/smart-app-launch/backend-services.html#obtaining-an-access-token).

``POST /auth/token`` with ``grant_type=client_credentials`` and an RS384-signed JWT client
assertion (iss = sub = the registered client_id, aud = the token URL, exp at most five minutes
away), checked against the public key registered for that client; answers a bearer token valid
for 300 seconds, or an OAuth error (``invalid_client`` 401, ``unsupported_grant_type`` 400).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from .emulator import FHIREmulator

__all__ = ["ASSERTION_TYPE", "token_endpoint"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


async def token_endpoint(server: FHIREmulator, request: Request) -> Response:
    """client_credentials with a signed JWT assertion (backend-services.html#obtaining-an-access-token)."""
    server.log.append((request.method, request.url.path))
    # application/x-www-form-urlencoded, parsed here (starlette's form() needs python-multipart)
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode(), keep_blank_values=True).items()}

    def refuse(text: str) -> Response:
        return JSONResponse({"error": "invalid_client", "error_description": text}, 401)

    if form.get("grant_type") != "client_credentials":
        return JSONResponse({"error": "unsupported_grant_type"}, 400)
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        return JSONResponse({"error": "invalid_request", "error_description": "client_assertion_type must be jwt-bearer"}, 400)
    assertion = str(form.get("client_assertion", ""))
    try:
        unverified = jwt.api_jws.decode_complete(assertion, options={"verify_signature": False})
        header, claims = unverified["header"], json.loads(unverified["payload"])
    except (jwt.InvalidTokenError, ValueError):
        return refuse("client_assertion is not a JWT")
    if not isinstance(claims, dict):
        return refuse("client_assertion is not a JWT")
    if header.get("alg") != "RS384":
        return refuse("the assertion must be signed with RS384")
    client_id = str(claims.get("iss"))
    pem = server.clients.get(client_id)
    if pem is None or claims.get("sub") != client_id:
        return refuse("unknown client: iss and sub must be the registered client_id")
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        return refuse("the registered key is not an RSA key (RS384)")
    try:
        jwt.api_jws.decode_complete(assertion, key, algorithms=["RS384"])
    except jwt.InvalidSignatureError:
        return refuse("the assertion's signature does not match the registered public key")
    if claims.get("aud") != f"{server.base_url}/auth/token":
        return refuse("aud must be the token URL")
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] < time.time() or claims["exp"] > time.time() + 300 + 5:
        return refuse("exp must be in the future and at most five minutes away")
    token = uuid.uuid4().hex
    server._tokens[token] = time.time() + 300
    scope = str(form.get("scope", ""))
    return JSONResponse({"access_token": token, "token_type": "bearer", "expires_in": 300, "scope": scope})
