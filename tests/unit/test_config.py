"""A bad config is refused with the key, the problem and the line; secrets are references only."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncbridge.config import parse_config
from syncbridge.errors import AuthError, ConfigError
from syncbridge.secrets import SecretRef

GOOD = """\
practice:
  name: Lakeside Therapy
  timezone: America/Chicago
clinicians:
  dr_lee:
    accounts:
      cal: {}
connectors:
  cal:
    type: tests.support.replica:ReplicaConnector
    path: /tmp/x.db
"""


def test_good_config_loads() -> None:
    """A valid file gives typed settings with defaults filled in."""
    cfg = parse_config(GOOD)
    assert cfg.practice.timezone == "America/Chicago"
    assert cfg.clinicians_of("cal") == {"dr_lee": {}}
    assert cfg.policy.cancellation.late_cancel_window_hours == 24


@pytest.mark.parametrize(
    ("text", "key", "line", "words"),
    [
        ("practice:\n  timezone: Mars/Olympus\n", "practice.timezone", 2, "unknown time zone 'Mars/Olympus'"),
        ("practice:\n  timezone: Europe/Lodnon\n", "practice.timezone", 2, "unknown time zone 'Europe/Lodnon' (did you mean 'Europe/London'?)"),
        ("practice: [1, 2\n", "<yaml>", 2, "not valid YAML"),
        ("connectors:\n  ehr:\n    type: epic-magic\n", "connectors.ehr.type", 3, "unknown connector type 'epic-magic'"),
        ("http:\n  port: 99999\n", "http.port", 2, "less than or equal to 65535"),
        ("http:\n  token: hunter2\n", "http.token", 2, "never inline"),
        ("clinicians:\n  dr_x:\n    accounts:\n      nowhere: {}\n", "clinicians.dr_x.accounts.nowhere", 4, "no connector named 'nowhere'"),
        ("polcy:\n  x: 1\n", "polcy", 1, "not a known option here (did you mean 'policy'?)"),
        ("logging:\n  jsn: false\n", "logging.jsn", 2, "not a known option here (did you mean 'json'?)"),
        ("clinicians:\n  dr_x:\n    acounts: {}\n", "clinicians.dr_x.acounts", 3, "(did you mean 'accounts'?)"),
        ("http:\n  colour: blue\n", "http.colour", 2, "not a known option here"),
        (
            "connectors:\n  cal:\n    type: caldav\n    url: http://127.0.0.1:1/\n    pasword: {env: X}\n",
            "connectors.cal.pasword", 5, "not a known option here (did you mean 'password'?)",
        ),
        (
            "connectors:\n  cal:\n    type: caldav\n    url: http://127.0.0.1:1/\n    poll_intervl: 30\n",
            "connectors.cal.poll_intervl", 5, "(did you mean 'poll_interval'?)",
        ),
        ("store:\n  path: x.db\n  cache_mb: 0\n", "store.cache_mb", 3, "greater than or equal to 1"),
        ("connectors:\n  cal:\n    type: tests.support.replica:ReplicaConnector\n    pth: /x\n", "connectors.cal.path", 2, "Field required"),
    ],
)
def test_bad_config_names_key_and_line(text: str, key: str, line: int, words: str) -> None:
    """Each mistake is reported with the offending key, what is wrong and where."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "practice.yaml")
    err = info.value
    assert err.key == key
    assert words in err.problem
    assert err.line == line
    assert str(err).startswith(f"practice.yaml:{line}: {key}:")


def test_every_mistake_is_reported_at_once() -> None:
    """A config with several mistakes lists them all, in file order, so one pass fixes them.

    The references (connector types, their options, clinicians' accounts) are checked even when
    another section is invalid.
    """
    text = (
        "practice:\n  timezone: Mars/Olympus\n"  # 2
        "store:\n  path: x.db\n  cache_mb: 0\n"  # 5
        "clinicians:\n  dr_x:\n    accounts:\n      cal: {}\n      nowhere: {}\n"  # 10
        "connectors:\n"
        "  cal:\n    type: tests.support.replica:ReplicaConnector\n    pth: /x\n"  # 12
        "  ehr:\n    type: epic-magic\n"  # 16
        "  odd:\n    role: mirror\n"  # 17
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "practice.yaml")
    found = [(p.key, p.line) for p in info.value.problems]
    assert found == [
        ("practice.timezone", 2),
        ("store.cache_mb", 5),
        ("clinicians.dr_x.accounts.nowhere", 10),
        ("connectors.cal.path", 12),
        ("connectors.ehr.type", 16),
        ("connectors.odd.type", 17),
    ]
    assert str(info.value).splitlines()[1] == "practice.yaml:5: store.cache_mb: Input should be greater than or equal to 1"


@pytest.mark.parametrize("text", ["", "\n", "  \n# only a comment\n"])
def test_empty_config_is_refused(text: str) -> None:
    """An empty file (often one read while it was being rewritten) is refused, not read as all
    defaults: the defaults name a store of their own, which would answer as if nothing were booked."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "practice.yaml")
    assert str(info.value) == "practice.yaml: <file>: the configuration is empty"


def test_environment_overrides_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNCBRIDGE_ variables override the file, nested with double underscores."""
    monkeypatch.setenv("SYNCBRIDGE_STORE__PATH", "/var/lib/syncbridge/x.db")
    monkeypatch.setenv("SYNCBRIDGE_HTTP__PORT", "9000")
    cfg = parse_config(GOOD)
    assert str(cfg.store.path) == "/var/lib/syncbridge/x.db" and cfg.http.port == 9000


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets resolve from the environment, a file or a systemd credential, and say where they were missing."""
    monkeypatch.setenv("SB_TOKEN", "from-env")
    assert SecretRef(env="SB_TOKEN").reveal() == "from-env"
    (tmp_path / "secret").write_text("from-file\n")
    assert SecretRef(file=tmp_path / "secret").reveal() == "from-file"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert SecretRef(credential="secret").reveal() == "from-file"
    with pytest.raises(AuthError, match="SB_MISSING is not set"):
        SecretRef(env="SB_MISSING").reveal()
    with pytest.raises(ValueError):
        SecretRef(env="A", file=tmp_path)


def test_example_config_is_valid() -> None:
    """The shipped config.example.yaml loads: it documents options that really exist."""
    from syncbridge.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "config.example.yaml")
    assert cfg.connectors and cfg.clinicians
