"""Access tokens for Graph through msal: app-only client credentials, or one clinician's device-code sign-in.

msal is synchronous (requests), so every call runs in a worker thread. It is given its own
``requests.Session``: with a ``ca_bundle`` configured the session ignores the environment
(``REQUESTS_CA_BUNDLE`` would otherwise override ``verify``) and trusts exactly that file.
``instance_discovery=False`` keeps msal from asking the public cloud about a sovereign or private
authority. A delegated sign-in's token cache (refresh token included) is kept only in the
daemon's encrypted vault (``host.vault_put``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msal
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from syncbridge.connector import Host
from syncbridge.errors import AuthError, TransientError, unreachable

__all__ = ["AppTokens", "DelegatedTokens", "http_session"]

CONSENT_HINT = (
    "grant the app the Calendars.ReadWrite application permission with admin consent, and check tenant, "
    "client_id and the secret or certificate in the config (see connectors/microsoft365/README.md)"
)


def http_session(ca_bundle: Path | None) -> requests.Session:
    """The session msal uses; with ``ca_bundle`` it trusts that file and nothing from the environment.

    The identity platform's throttling and transient errors (429, 5xx) are retried here, honouring
    Retry-After (token and discovery requests are safe to repeat); msal itself does not retry.
    """
    session = requests.Session()
    if ca_bundle is not None:
        session.trust_env = False
        session.verify = str(ca_bundle)
    retry = Retry(total=3, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                  respect_retry_after_header=True, raise_on_status=False)
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def _refused(result: dict[str, Any], action: str) -> AuthError:
    # error_description names the AADSTS code and the problem, never a secret
    first = str(result.get("error_description") or "").splitlines()[0][:300] if result.get("error_description") else ""
    return AuthError(f"Microsoft identity platform refused the request ({result.get('error')}: {first})", action=action)


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except requests.RequestException as err:
        raise unreachable("token endpoint", err) from err
    except json.JSONDecodeError as err:  # a proxy's or an overloaded endpoint's non-JSON answer
        raise TransientError("the identity platform answered something that is not JSON") from err
    except ValueError as err:
        if "HTTP status: 429" in str(err):  # OIDC discovery throttled past the retries
            raise TransientError("the identity platform asks to slow down (429)") from err  # msal raises ValueError for an unusable authority or credential
        raise AuthError(f"msal cannot use the configured authority or credential: {str(err)[:200]}", action=CONSENT_HINT) from err


class AppTokens:
    """Client-credentials tokens for every mailbox of the tenant (``<graph resource>/.default``)."""

    def __init__(self, client_id: str, authority: str, credential: str | dict[str, str], resource: str, ca_bundle: Path | None) -> None:
        self._args = (client_id, authority, credential)
        self._scopes = [resource.rstrip("/") + "/.default"]
        self._app: msal.ConfidentialClientApplication | None = None
        self._session = http_session(ca_bundle)
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self._session.close()

    async def token(self, clinician: str | None) -> str:
        async with self._lock:
            if self._token and self._token[1] > time.time() + 120:
                return self._token[0]
            if self._app is None:
                client_id, authority, credential = self._args
                self._app = await _call(
                    msal.ConfidentialClientApplication, client_id, client_credential=credential, authority=authority,
                    http_client=self._session, instance_discovery=False,
                )
            result = await _call(self._app.acquire_token_for_client, self._scopes)
            if "access_token" not in result:
                raise _refused(result, CONSENT_HINT)
            self._token = (result["access_token"], time.time() + float(result.get("expires_in", 300)))
            return self._token[0]

    def invalidate(self, clinician: str | None) -> None:
        """Forget the token (Graph refused it early); msal's own cache is bypassed on the next call."""
        self._token = None
        self._app = None


class DelegatedTokens:
    """One signed-in user per clinician, from the token cache ``authorize`` stored in the vault."""

    def __init__(self, client_id: str, authority: str, resource: str, ca_bundle: Path | None, host: Callable[[], Host], connector: str) -> None:
        self._client_id = client_id
        self._authority = authority
        self._scopes = [resource.rstrip("/") + "/Calendars.ReadWrite"]
        self._host = host
        self._connector = connector
        self._tokens: dict[str, tuple[str, float]] = {}
        self._stale: set[str] = set()
        self._session = http_session(ca_bundle)
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self._session.close()

    def _key(self, clinician: str) -> str:
        return f"msal_token_cache:{clinician}"

    def _app(self, cache: msal.SerializableTokenCache) -> msal.PublicClientApplication:
        return msal.PublicClientApplication(
            self._client_id, authority=self._authority, token_cache=cache, http_client=self._session, instance_discovery=False
        )

    def _cache(self, clinician: str) -> msal.SerializableTokenCache:
        cache = msal.SerializableTokenCache()
        stored = self._host().vault_get(self._key(clinician))
        if stored:
            cache.deserialize(stored)
        return cache

    def _save(self, clinician: str, cache: msal.SerializableTokenCache) -> None:
        if cache.has_state_changed:
            self._host().vault_put(self._key(clinician), cache.serialize())

    async def token(self, clinician: str | None) -> str:
        if clinician is None:
            raise AuthError("delegated sign-in has no tenant-wide token", action="use auth: app for subscriptions across mailboxes")
        async with self._lock:
            held = self._tokens.get(clinician)
            if held and held[1] > time.time() + 120:
                return held[0]
            action = f"run `syncbridge auth {self._connector} {clinician}` and sign in as the clinician"
            cache = self._cache(clinician)
            app = await _call(self._app, cache)
            accounts = app.get_accounts()
            if not accounts:
                raise AuthError(f"clinician {clinician} has not signed in to {self._connector}", action=action)
            # after Graph refused a token, skip msal's cached access token and redeem the refresh token
            result = await _call(app.acquire_token_silent, self._scopes, account=accounts[0], force_refresh=clinician in self._stale)
            self._stale.discard(clinician)
            self._save(clinician, cache)
            if not result or "access_token" not in result:
                raise _refused(result or {"error": "interaction_required"}, action)
            self._tokens[clinician] = (result["access_token"], time.time() + float(result.get("expires_in", 300)))
            return result["access_token"]

    def invalidate(self, clinician: str | None) -> None:
        if clinician is not None:
            self._tokens.pop(clinician, None)
            self._stale.add(clinician)

    async def sign_in(self, clinician: str, expected_user: str, say: Callable[[str], None]) -> str:
        """The device-code flow: ``say`` shows the verification URL and code; blocks until the user signed in."""
        cache = msal.SerializableTokenCache()
        app = await _call(self._app, cache)
        flow = await _call(app.initiate_device_flow, scopes=self._scopes)
        if "user_code" not in flow:
            raise _refused(flow, "register the app as a public client (allow public client flows) in Entra ID")
        say(str(flow["message"]))
        result = await _call(app.acquire_token_by_device_flow, flow)
        if "access_token" not in result:
            raise _refused(result, "start the sign-in again and finish it before the code expires")
        user = str((result.get("id_token_claims") or {}).get("preferred_username") or "")
        if user.lower() != expected_user.lower():
            raise AuthError(f"signed in as {user or 'an unknown user'}, not as {expected_user}",
                            action=f"sign in with the mailbox configured for {clinician}")
        self._host().vault_put(self._key(clinician), cache.serialize())
        self._tokens[clinician] = (result["access_token"], time.time() + float(result.get("expires_in", 300)))
        return user
