"""A SIGHUP reload, section by section: what takes effect at once, and what is named as waiting for a restart."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.reloading import effects

BASE: dict[str, Any] = {
    "practice": {"name": "Lakeside", "timezone": "America/New_York"},
    "store": {"path": "/tmp/sb-reload.db", "cache_mb": 16},
    "clinicians": {"dr_lee": {"accounts": {"cal": {}}}},
    "connectors": {"cal": {"type": "caldav", "url": "https://dav.example.com/", "poll_interval": 60}},
    "http": {"port": 8765},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    conf = yaml.safe_load(yaml.safe_dump(BASE))
    node = conf
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return conf


@pytest.mark.parametrize(
    ("path", "value", "applied", "restart"),
    [
        ("practice.name", "Lakeside North", ("practice",), ()),
        ("logging.level", "debug", ("logging",), ()),
        ("policy.cancellation.late_cancel_window_hours", 48, ("policy",), ()),
        ("outbox.concurrency", 2, ("outbox",), ()),
        ("availability.session_minutes", 45, ("availability",), ()),
        ("audit.anchor_interval", 30, ("audit",), ()),
        ("connectors.cal.poll_interval", 30, ("connectors.cal",), ()),
        ("clinicians.dr_lee.display_name", "Dr. Lee", ("clinicians.dr_lee",), ()),
        ("http.channel_check_interval", 120, ("http",), ()),
        ("http.port", 9876, (), ("http.port",)),
        ("http.host", "0.0.0.0", (), ("http.host",)),
        ("http.public_url", "https://sb.example.org", (), ("http.public_url",)),
        ("store.cache_mb", 64, (), ("store.cache_mb",)),
    ],
)
def test_each_section_is_applied_or_named(path: str, value: Any, applied: tuple[str, ...], restart: tuple[str, ...]) -> None:
    """Every section a reload can take up is applied; the listener's address and the store's cache are named."""
    old, new = parse_config(yaml.safe_dump(BASE)), parse_config(yaml.safe_dump(_with(path, value)))
    effect = effects(old, new)
    assert effect.applied == applied and effect.restart == restart


def test_nothing_changed_nothing_said() -> None:
    """Reloading the same file applies nothing and names nothing."""
    same = parse_config(yaml.safe_dump(BASE))
    assert effects(same, parse_config(yaml.safe_dump(BASE))) == effects(same, same)
    assert effects(same, same).applied == () and effects(same, same).restart == ()
