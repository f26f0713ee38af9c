"""The daemon's side of :class:`~syncbridge.connector.Host`: push hints, the webhook inbox, the vault.

A verified notification is committed to the store's webhook inbox before the connector answers
the vendor, so a crash between answer and processing loses nothing: the inbox is drained at start.
Secrets a connector obtains at run time (refresh tokens, msal caches, subscription secrets) are
kept in the store encrypted with Fernet under a key derived from ``store.secret_key``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence

from cryptography.fernet import Fernet, InvalidToken

from .connector import Host
from .errors import AuthError, ConfigError
from .model import iso, utcnow
from .secrets import SecretRef
from .store import Store

__all__ = ["DaemonHost", "Vault"]


class Vault:
    """Encrypted key/value secrets per connector, in the store's ``secrets`` table."""

    def __init__(self, store: Store, key: SecretRef | None) -> None:
        self.store = store
        self.key = key
        self._fernet: Fernet | None = None

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            if self.key is None:
                raise ConfigError(
                    "store.secret_key", "not set; tokens obtained by `syncbridge auth` are stored encrypted with it "
                    "(give a file, an environment variable or a systemd credential holding a long random string)",
                )
            digest = hashlib.sha256(b"syncbridge-vault\0" + self.key.reveal().encode()).digest()
            self._fernet = Fernet(base64.urlsafe_b64encode(digest))
        return self._fernet

    def get(self, connector: str, key: str) -> str | None:
        token = self.store.secret(connector, key)
        if token is None:
            return None
        try:
            return self._cipher().decrypt(token).decode()
        except InvalidToken:
            raise AuthError(
                f"stored secret {key!r} of {connector} cannot be decrypted: store.secret_key changed",
                action=f"restore the previous store.secret_key, or sign in again with `syncbridge auth {connector} ...`",
            ) from None

    def put(self, connector: str, key: str, value: str) -> None:
        token = self._cipher().encrypt(value.encode())
        with self.store.tx() as tx:
            tx.put_secret(connector, key, token, iso(utcnow()))
            tx.audit.add(iso(utcnow()), "secret_stored", connector, None, {"key": key})

    def delete(self, connector: str, key: str) -> None:
        with self.store.tx() as tx:
            tx.delete_secret(connector, key)


class DaemonHost(Host):
    """One per connector; ``wake`` asks the runtime to process that connector's inbox and pull."""

    def __init__(self, name: str, store: Store, vault: Vault, public_url: str | None, wake: Callable[[str], None]) -> None:
        super().__init__(public_url)
        self.name = name
        self.store = store
        self.vault = vault
        self._wake = wake

    def pull_soon(self) -> None:
        self.pull_requests += 1
        self._wake(self.name)

    def accept_webhook(self, headers: Mapping[str, str], body: bytes) -> None:
        with self.store.tx() as tx:
            tx.inbox_put(self.name, iso(utcnow()), {k.lower(): v for k, v in headers.items()}, body)
        self._wake(self.name)

    def vault_get(self, key: str) -> str | None:
        return self.vault.get(self.name, key)

    def known_etag(self, external_id: str) -> str | None:
        link = self.store.link_by_external(self.name, external_id)
        return link.etag if link is not None else None

    def linked_between(self, lo: str, hi: str, clinicians: Sequence[str]) -> list[str]:
        return self.store.linked_in_window(self.name, float("inf"), lo, hi, list(clinicians), within=True) if clinicians else []

    def degraded(self, note: str | None) -> None:
        super().degraded(note)
        with self.store.tx() as tx:  # the outbox may have changed it meanwhile: always written
            tx.set_degraded(self.name, note)

    def vault_put(self, key: str, value: str) -> None:
        self.vault.put(self.name, key, value)

    def vault_delete(self, key: str) -> None:
        self.vault.delete(self.name, key)
