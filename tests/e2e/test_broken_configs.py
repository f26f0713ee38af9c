"""A corpus of broken configurations, each refused by the CLI as an admin runs it.

Every one must exit 2 with the file, the line and a message saying what is wrong, and none may
create a store (the daemon refuses before it opens anything).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT

GOOD_HEAD = "practice:\n  timezone: America/New_York\n"

#: (name, file content, line the message names, what the message says)
CORPUS: list[tuple[str, bytes, int, str]] = [
    ("duplicate key", b"store:\n  path: STORE\n  path: /elsewhere.db\n", 3, "key 'path' is given twice (first at line 2)"),
    ("duplicate section", b"store: {path: STORE}\nhttp: {port: 8765}\nstore: {path: /x.db}\n", 3, "key 'store' is given twice (first at line 1)"),
    ("alias bomb", b"store: {path: STORE}\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n", 3, "aliases (*name) are not allowed"),
    ("merge key", b"base: &base {poll_interval: 60}\nconnectors:\n  cal:\n    <<: *base\n    type: caldav\n", 4, "aliases (*name) are not allowed"),
    ("not UTF-8", b"store: {path: STORE}\npractice:\n  name: Caf\xe9 Therapy\n", 3, "not UTF-8 text (byte 0xe9)"),
    ("binary file", b"SQLite format 3\x00\x10\x00\x01\x01", 1, "the file is binary"),
    ("too large", b"store: {path: STORE}\n" + b"# padding\n" * 30_000, 0, "over 256 KiB"),
    ("log level", b"store: {path: STORE}\nlogging:\n  level: verbose\n", 3, "logging.level: Input should be 'debug', 'info', 'warning' or 'error'"),
    ("time zone", b"store: {path: STORE}\npractice:\n  timezone: America/NewYork\n", 3, "unknown time zone 'America/NewYork' (did you mean 'America/New_York'?)"),
    ("misspelt key", b"store: {path: STORE}\npractice:\n  timezon: America/New_York\n", 3, "practice.timezon"),
    ("inline secret", b"store: {path: STORE}\nconnectors:\n  cal:\n    type: caldav\n    url: https://dav.example.com/\n    username: dr\n    password: hunter2\n", 7, "secrets are given by reference"),
    ("unknown secret kind", b"store: {path: STORE}\nhttp:\n  token: {vault: sb-token}\n", 3, "http.token"),
    ("unknown connector type", b"store: {path: STORE}\nconnectors:\n  ehr:\n    type: epic-magic\n", 4, "unknown connector type 'epic-magic'"),
    ("account of no connector", b"store: {path: STORE}\nclinicians:\n  dr_lee:\n    accounts:\n      nowhere: {}\n", 5, "nowhere"),
    ("negative interval", b"store: {path: STORE}\nconnectors:\n  cal:\n    type: caldav\n    url: https://dav.example.com/\n    poll_interval: -5\n", 6, "poll_interval"),
    ("wrong type", b"store:\n  path: STORE\n  cache_mb: lots\n", 3, "store.cache_mb"),
    ("zero concurrency", b"store: {path: STORE}\noutbox:\n  concurrency: 0\n", 3, "outbox.concurrency"),
    ("negative window", b"store: {path: STORE}\npolicy:\n  cancellation:\n    late_cancel_window_hours: -1\n", 4, "late_cancel_window_hours"),
    ("share over one", b"store: {path: STORE}\npolicy:\n  mass_cancel_guard:\n    max_share: 2\n", 4, "max_share"),
    ("unknown role", b"store: {path: STORE}\nconnectors:\n  cal:\n    type: caldav\n    url: https://dav.example.com/\n    role: boss\n", 6, "role"),
    ("unknown enum", b"store: {path: STORE}\npolicy:\n  cancellation:\n    default_cancelled_by: receptionist\n", 4, "default_cancelled_by"),
    ("syntax error", b"store: {path: STORE\npractice:\n  timezone: UTC\n", 2, "not valid YAML"),
    ("tab indentation", b"store:\n\tpath: STORE\n", 2, "not valid YAML"),
    ("list at the top", b"- store\n- practice\n", 1, "the top level must be a mapping of sections"),
    ("empty file", b"\n", 0, "the configuration is empty"),
]


def sb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", *args], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )


def test_the_corpus_is_large_enough() -> None:
    """At least twenty different ways a configuration goes wrong are tried."""
    assert len({name for name, *_ in CORPUS}) >= 20


@pytest.mark.parametrize(("name", "content", "line", "says"), CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_config_is_refused_with_file_line_and_reason(tmp_path: Path, name: str, content: bytes, line: int, says: str) -> None:
    """Exit 2, ``file:line: key: problem``, and no store anywhere, for check, check --no-connect and run."""
    store = tmp_path / "store.db"
    bad = tmp_path / "config.yaml"
    bad.write_bytes(content.replace(b"STORE", str(store).encode()))
    for command in (["check", "--no-connect"], ["check"], ["run"]):
        done = sb(*command, "--config", str(bad))
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert says in done.stderr, (command, done.stderr)
        where = f"{bad}:{line}:" if line else str(bad)
        assert where in done.stderr, (command, done.stderr)
        assert "Traceback" not in done.stderr
    assert not store.exists() and not list(tmp_path.glob("store.db*"))


FHIR = "connectors:\n  ehr:\n    type: fhir\n    base_url: https://ehr.example/R4\n    client_id: sb\n    private_key: {file: KEYFILE}\n"
ZOCDOC = "connectors:\n  zocdoc:\n    type: zocdoc\n    environment: sandbox\n    client_id: sb\n    client_secret: {env: SB_TEST_UNSET_SECRET}\n"


@pytest.mark.parametrize(
    ("name", "conf", "key_text", "line", "says"),
    [
        ("unset variable", ZOCDOC, None, 6, "connectors.zocdoc.client_secret: secret environment variable SB_TEST_UNSET_SECRET is not set"),
        ("missing file", FHIR, None, 6, "connectors.ehr.private_key: secret file"),
        ("empty file", FHIR, "\n", 6, "is empty"),
        ("not a key", FHIR, "ssh-rsa AAAAB3Nza... admin@host\n", 6, "is not a PEM private key"),
        ("credential without systemd", "http:\n  token: {credential: status-token}\n", None, 2, "needs $CREDENTIALS_DIRECTORY"),
    ],
)
def test_check_resolves_every_secret_without_network(tmp_path: Path, name: str, conf: str, key_text: str | None, line: int, says: str) -> None:
    """`check --no-connect` (the unit's ExecStartPre) looks every secret up: one that is unset,
    unreadable, empty or not a key is refused with exit 2 and its line, before a daemon starts."""
    key = tmp_path / "key.pem"
    if key_text is not None:
        key.write_text(key_text)
    bad = tmp_path / "config.yaml"
    bad.write_text(conf.replace("KEYFILE", str(key)))
    env = {k: v for k, v in os.environ.items() if k not in ("SB_TEST_UNSET_SECRET", "CREDENTIALS_DIRECTORY")}
    done = subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", "check", "--no-connect", "--config", str(bad)], cwd=ROOT,
        env=env | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and f"{bad}:{line}:" in done.stderr, done.stderr


def test_check_passes_when_every_secret_resolves(tmp_path: Path) -> None:
    """The same references, each present and of the right shape, check ok."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key = tmp_path / "key.pem"
    key.write_bytes(pem)
    good = tmp_path / "config.yaml"
    good.write_text(FHIR.replace("KEYFILE", str(key)))
    done = subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", "check", "--no-connect", "--config", str(good)], cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
