"""What a SIGHUP reload applies at once, and what only a restart can.

The daemon keeps running on a reload: the engine, the outbox, the publisher and the HTTP handlers
read the configuration as it is now, so most sections take effect at once. A few settings are
fixed when the process starts (the listener's address, the store's page cache) and are named,
in the log and on the status page, until the daemon is restarted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PracticeConfig

__all__ = ["RESTART_KEYS", "Reload", "effects"]

#: settings the running process cannot take up: the listener is bound, the store opened
RESTART_KEYS = ("http.enabled", "http.host", "http.port", "http.public_url", "store.cache_mb", "store.worker", "store.lease_seconds")


@dataclass(frozen=True, slots=True)
class Reload:
    #: sections (or connectors) whose new settings are in effect
    applied: tuple[str, ...]
    #: keys whose new values wait for a restart
    restart: tuple[str, ...]


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: data}


def effects(old: PracticeConfig, new: PracticeConfig) -> Reload:
    """Compare two configurations key by key: the changed sections applied, the fixed keys named."""
    before, after = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    restart = tuple(k for k in changed if k in RESTART_KEYS)
    applied: list[str] = []
    for key in changed:
        if key in RESTART_KEYS:
            continue
        parts = key.split(".")
        section = ".".join(parts[:2]) if parts[0] in ("connectors", "clinicians") and len(parts) > 1 else parts[0]
        if section not in applied:
            applied.append(section)
    return Reload(tuple(applied), restart)
