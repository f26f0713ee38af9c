"""Tokens obtained at run time are stored encrypted, and a wrong key is named, not guessed around."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncbridge.errors import AuthError, ConfigError
from syncbridge.host import DaemonHost, Vault
from syncbridge.secrets import SecretRef
from syncbridge.store import Store


def test_refresh_token_is_encrypted_at_rest(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("a long random string kept in a credential file")
    store = Store(tmp_path / "s.db")
    host = DaemonHost("google", store, Vault(store, SecretRef(file=key)), None, lambda _n: None)
    host.vault_put("refresh:dr_rivera", "1//refresh-token-value")
    assert host.vault_get("refresh:dr_rivera") == "1//refresh-token-value"
    assert host.vault_get("refresh:nobody") is None
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("s.db*"))
    assert b"refresh-token-value" not in raw

    key.write_text("another key")
    store = Store(tmp_path / "s.db")
    host = DaemonHost("google", store, Vault(store, SecretRef(file=key)), None, lambda _n: None)
    with pytest.raises(AuthError, match="store.secret_key changed"):
        host.vault_get("refresh:dr_rivera")
    store.close()


def test_without_a_key_nothing_is_stored(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    host = DaemonHost("google", store, Vault(store, None), None, lambda _n: None)
    with pytest.raises(ConfigError, match="store.secret_key"):
        host.vault_put("refresh:dr_rivera", "x")
    assert store.conn.execute("SELECT count(*) FROM secrets").fetchone()[0] == 0
    store.close()


def test_webhook_is_persisted_before_processing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    woken: list[str] = []
    host = DaemonHost("zocdoc", store, Vault(store, None), "https://sync.example.org/webhooks/zocdoc", woken.append)
    host.accept_webhook({"X-Signature": "v1=abc"}, b'{"appointment_id": "1"}')
    assert woken == ["zocdoc"]
    [(_, connector, headers, body)] = store.inbox_pending("zocdoc")
    assert connector == "zocdoc" and headers == {"x-signature": "v1=abc"} and body == b'{"appointment_id": "1"}'
    store.close()


async def test_processed_notifications_leave_the_inbox_after_the_retention(tmp_path: Path) -> None:
    """The daemon deletes notifications processed longer ago than http.inbox_retention; new and
    unprocessed ones stay, so the inbox stays bounded."""
    import yaml

    from syncbridge.config import parse_config
    from syncbridge.model import iso, utcnow
    from syncbridge.runtime import Daemon

    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp_path / "cal.db")}},
        "http": {"enabled": False, "inbox_retention": 3600},
    }))
    d = Daemon(None, cfg)
    try:
        with d.store.tx() as tx:
            old = tx.inbox_put("cal", iso(utcnow()), {}, b"{}")
            tx.inbox_done([old], "2020-01-01T00:00:00+00:00")  # processed long ago
            pending = tx.inbox_put("other", iso(utcnow()), {}, b"{}")  # never processed: kept
        d.connectors["cal"].host.accept_webhook({}, b"{}")  # a notification arrives and is processed
        await d.process_inbox("cal")
        rows = d.store.conn.execute("SELECT id, processed_at IS NOT NULL FROM webhook_inbox ORDER BY id").fetchall()
        assert old not in [r[0] for r in rows]  # pruned
        assert (pending, 0) in rows and len(rows) == 2  # the unprocessed one, and the one just processed
    finally:
        await d.close()
