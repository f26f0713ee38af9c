"""Config for a practice of file-backed test systems: one EHR (record) and calendars (mirrors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPLICA = "tests.support.replica:ReplicaConnector"


def replica_practice(tmp: Path, calendars: tuple[str, ...] = ("cal_a", "cal_b"), *, clinician: str = "dr_a",
                     connector: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A config dict: ``ehr`` plus ``calendars`` for one clinician; ``connector`` options go to every
    connector (a callable value is called with the connector's index), ``sections`` override the rest."""
    names = ("ehr", *calendars)
    conf: dict[str, Any] = {
        "store": {"path": str(tmp / "store.db")},
        "http": {"enabled": False},
        "clinicians": {clinician: {"accounts": {c: {} for c in calendars}}},
        "connectors": {
            name: {"type": REPLICA, "path": str(tmp / f"{name}.db"), "role": "record" if name == "ehr" else "mirror"}
            | {k: (v(i) if callable(v) else v) for k, v in (connector or {}).items()}
            for i, name in enumerate(names)
        },
    }
    return conf | sections
