"""Only the daemon changes a store's schema: commands refuse a store of another release, and an
upgrade keeps a backup of the store as it was."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from syncbridge.errors import StoreError
from syncbridge import migrations
from syncbridge.migrations import newest
from syncbridge.store import Store


def _at_older_schema(path: Path) -> int:
    """A store as the previous release left it: every step but the newest applied."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:-1])
        Store(path).close()
        return migrations.newest()


def test_command_refuses_an_older_store_and_changes_nothing(tmp_path: Path) -> None:
    """A CLI command of the new release beside the old daemon: refused, naming both schemas and what to do."""
    path = tmp_path / "s.db"
    older = _at_older_schema(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as err:
        Store(path, migrate=False)
    said = str(err.value)
    assert f"schema {older}" in said and f"schema {newest()}" in said and "restart" in said
    assert path.read_bytes() == before


def test_command_refuses_a_newer_store(tmp_path: Path) -> None:
    """An old command against a store a newer daemon upgraded: refused, saying which install to use."""
    path = tmp_path / "s.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, datetime('now'))", (newest() + 1,))
    with pytest.raises(StoreError) as err:
        Store(path, migrate=False)
    assert f"schema {newest() + 1}, written by a newer syncbridge" in str(err.value)


def test_daemon_upgrade_keeps_a_backup_of_the_store_as_it_was(tmp_path: Path) -> None:
    """The daemon's open migrates, after copying the store aside at its old schema."""
    path = tmp_path / "s.db"
    older = _at_older_schema(path)
    store = Store(path)
    assert store.schema_version == newest()
    store.close()
    backup = tmp_path / f"s.db.schema-{older}.bak"
    with sqlite3.connect(backup) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == older
    assert backup.stat().st_mode & 0o777 == 0o600
    Store(path, migrate=False).close()  # and now the commands use it
