"""`syncbridge auth` run as an admin runs it: sign a clinician in, keep the token encrypted."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from syncbridge.store import Store
from syncbridge_connectors.google_calendar.emulator import Running
from tests.support.daemon import ROOT
from tests.support.emulators import google_calendar

pytestmark = pytest.mark.slow
EMAIL = "rivera@practice.example"


@pytest.fixture
def google() -> Iterator[Running]:
    with google_calendar(EMAIL) as server:
        yield server


def write_config(tmp: Path, google: Running, secret_key: bool = True) -> Path:
    client_id, secret = google.emulator.add_oauth_client()
    (tmp / "client-secret").write_text(secret)
    (tmp / "store-key").write_text("a long random string for the vault")
    conf = {
        "store": {"path": str(tmp / "store.db")} | ({"secret_key": {"file": str(tmp / "store-key")}} if secret_key else {}),
        "clinicians": {"dr_rivera": {"accounts": {"google": {"email": EMAIL}}}},
        "connectors": {"google": {
            "type": "google_calendar", "auth": "oauth", "client_id": client_id, "client_secret": {"file": str(tmp / "client-secret")},
            "token_uri": google.token_uri, "auth_uri": f"{google.base_url}/o/oauth2/auth", "api_root": google.api_root,
        }},
    }  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def cli(*args: str) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OAUTHLIB_INSECURE_TRANSPORT": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "syncbridge.cli", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def test_auth_signs_a_clinician_in_and_stores_the_token_encrypted(google: Running, tmp_path: Path) -> None:
    path = write_config(tmp_path, google)
    google.emulator.auth.consenting_user = EMAIL
    proc = cli("auth", "google", "dr_rivera", "--config", str(path))
    assert proc.stdout is not None
    printed, url = "", None
    deadline = time.monotonic() + 30
    while url is None and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            printed += proc.stdout.readline()
            url = next((w for w in printed.split() if w.startswith(google.base_url + "/o/oauth2/auth?")), None)
    assert url, f"no sign-in URL printed:\n{printed}"
    landed = httpx.get(url, follow_redirects=True, timeout=20)  # the clinician's browser, consenting
    assert landed.status_code == 200
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, printed + out
    assert "dr_rivera signed in to Google" in out and "1//" not in printed + out

    store = Store(tmp_path / "store.db")
    try:
        [(key, value)] = store.conn.execute("SELECT key, value FROM secrets WHERE connector = 'google'").fetchall()
        assert "dr_rivera" in key and b"1//" not in value  # Fernet ciphertext, not the token
    finally:
        store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert b"1//" not in raw


def test_auth_without_a_vault_key_is_refused_before_sign_in(google: Running, tmp_path: Path) -> None:
    path = write_config(tmp_path, google, secret_key=False)
    proc = cli("auth", "google", "dr_rivera", "--config", str(path))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "store.secret_key" in out and "oauth2/auth" not in out


def test_auth_names_an_unknown_clinician(google: Running, tmp_path: Path) -> None:
    path = write_config(tmp_path, google)
    proc = cli("auth", "google", "dr_nobody", "--config", str(path))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "dr_nobody" in out and "no account in google" in out
