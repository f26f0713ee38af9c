"""A clinician off sick: ``syncbridge bulk cancel`` of 30 sessions over three days, run as an admin
runs it beside the daemon, seen through in every system (tests/support/bulk_scenario.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncbridge.store import Store
from tests.support.bulk_scenario import SICK, run

pytestmark = pytest.mark.slow


def test_a_clinicians_three_days_cancelled_in_bulk_everywhere(tmp_path: Path) -> None:
    out = run(tmp_path)
    assert out.sessions == 30
    assert "cancel: 30 sessions" in out.output and "operation op-" in out.output, out.output
    print(f"\n30 sessions: record {out.seconds['record']:.1f}s, every copy {out.seconds['copies']:.1f}s, "
          f"billing {out.seconds['billing']:.1f}s, slots {out.seconds['slots']:.1f}s; requests {out.requests}")
    store = Store(tmp_path / "syncbridge.db", migrate=False)
    try:
        [entry] = store.audit_entries(kind="bulk_operation")
        assert entry["detail"]["by_user"] == "office-admin" and entry["detail"]["sessions"] == 30
        cancelled = [a for a in store.appointments() if a.fields["clinician"] == SICK]
        assert len(cancelled) == 30 and all(a.fields["cancellation"]["by"] == "clinician" for a in cancelled)
        assert all(a.fields["cancellation"]["fee"] == "none" and a.fields["cancellation"]["reason"] == "illness" for a in cancelled)
    finally:
        store.close()
