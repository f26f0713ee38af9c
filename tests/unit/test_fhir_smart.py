"""The FHIR emulator's SMART Backend Services token endpoint refuses what a real EHR refuses."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from syncbridge_connectors.fhir.emulator import FHIREmulator
from syncbridge_connectors.fhir.emulator_smart import ASSERTION_TYPE

TOKEN_URL = "http://ehr.test/auth/token"


@pytest.mark.parametrize(
    ("signer", "alg", "over", "status", "says"),
    [
        ("registered", "RS384", {}, 200, None),
        ("other", "RS384", {}, 401, "signature does not match"),
        ("registered", "RS256", {}, 401, "signed with RS384"),
        ("registered", "RS384", {"aud": "http://elsewhere/token"}, 401, "aud must be the token URL"),
        ("registered", "RS384", {"exp": 1}, 401, "exp must be in the future"),
    ],
)
async def test_client_assertion_is_checked(signer: str, alg: str, over: dict[str, object], status: int, says: str | None) -> None:
    keys = {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ("registered", "other")}
    emulator = FHIREmulator(base_url="http://ehr.test")
    public = keys["registered"].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    emulator.register_client("syncbridge", public)
    claims = {"iss": "syncbridge", "sub": "syncbridge", "aud": TOKEN_URL, "exp": int(time.time()) + 240, "jti": "1"} | over
    form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, keys[signer], algorithm=alg)}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app), base_url="http://ehr.test") as client:
        answer = await client.post("/auth/token", data=form)
    assert answer.status_code == status
    if says is None:
        assert answer.json()["token_type"] == "bearer"
    else:
        assert answer.json()["error"] == "invalid_client" and says in answer.json()["error_description"]


async def test_garbage_assertion_is_refused_by_name() -> None:
    emulator = FHIREmulator(base_url="http://ehr.test")
    form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE, "client_assertion": "not.a.jwt"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app), base_url="http://ehr.test") as client:
        answer = await client.post("/auth/token", data=form)
    assert answer.status_code == 401 and "not a JWT" in answer.json()["error_description"]
