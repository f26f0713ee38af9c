"""Google credentials for one clinician: a delegated service account, or an OAuth refresh token.

google-auth does the signing and refreshing. A service account is always used with a subject
(domain-wide delegation): without one it would act as itself, which owns no clinician's calendar.
"""

from __future__ import annotations

import json

from google.auth.credentials import Credentials
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from syncbridge.errors import AuthError
from syncbridge.secrets import SecretRef

__all__ = ["GOOGLE_TOKEN_URI", "SCOPE", "oauth_credentials", "service_account_credentials", "vault_key"]

SCOPE = "https://www.googleapis.com/auth/calendar.events"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
KEY_HINT = "download a JSON key for the service account (IAM > Service accounts > Keys) and point service_account_key at it"


def vault_key(clinician: str) -> str:
    """Where a clinician's refresh token is kept in the host's encrypted vault."""
    return f"refresh_token:{clinician}"


def service_account_credentials(key: SecretRef, subject: str, token_uri: str | None) -> Credentials:
    """The service account impersonating ``subject`` for the calendar.events scope."""
    try:
        info = json.loads(key.reveal())
    except ValueError as err:
        raise AuthError(f"the service account key in {key.describe()} is not JSON", action=KEY_HINT) from err
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise AuthError(f"{key.describe()} does not hold a service account key", action=KEY_HINT)
    try:
        creds = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
    except (ValueError, KeyError) as err:
        raise AuthError(f"the service account key in {key.describe()} is incomplete ({type(err).__name__})", action=KEY_HINT) from err
    creds = creds.with_subject(subject)
    return creds.with_token_uri(token_uri) if token_uri else creds


def oauth_credentials(client_id: str, client_secret: str, refresh_token: str, token_uri: str | None) -> Credentials:
    """A signed-in clinician's grant; access tokens are refreshed as needed by google-auth."""
    return user_credentials.Credentials(
        None,
        refresh_token=refresh_token,
        token_uri=token_uri or GOOGLE_TOKEN_URI,
        client_id=client_id,
        client_secret=client_secret,
        scopes=[SCOPE],
    )
