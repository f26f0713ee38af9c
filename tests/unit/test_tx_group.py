"""Writes that answer together are recorded in one transaction, and one bad record fails alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from syncbridge.store import Store
from syncbridge.tx import Tx
from syncbridge.tx_group import TxGroup


def _note(appt: str, *, fail: bool = False):  # type: ignore[no-untyped-def]
    def fn(tx: Tx) -> str:
        tx.audit.add("2026-12-07T10:00:00Z", "observed", "cal", appt, {"version": 1})
        if fail:
            raise ValueError(f"cannot record {appt}")
        return appt

    return fn


async def test_callers_ready_together_share_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    group = TxGroup(store)
    answers = await asyncio.gather(*(group.run(_note(f"sb-{i}")) for i in range(10)))
    assert answers == [f"sb-{i}" for i in range(10)]
    assert group.transactions == 1 and group.runs == 10
    await group.run(_note("sb-late"))
    assert group.transactions == 2
    assert store.verify_audit().entries == 11
    store.close()


async def test_a_failing_record_fails_alone_and_the_others_are_kept_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    group = TxGroup(store)
    answers = await asyncio.gather(
        group.run(_note("sb-1")), group.run(_note("sb-2", fail=True)), group.run(_note("sb-3")), return_exceptions=True,
    )
    assert answers[0] == "sb-1" and answers[2] == "sb-3"
    assert isinstance(answers[1], ValueError) and "sb-2" in str(answers[1])
    # the group was rolled back and each record made again alone: no entry twice, none of the failed one
    result = store.verify_audit()
    assert result.ok and result.entries == 2
    store.close()


async def test_a_cancelled_caller_still_has_its_record_made(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    group = TxGroup(store)
    task = asyncio.create_task(group.run(_note("sb-1")))
    await asyncio.sleep(0)  # queued, not yet flushed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await group.run(_note("sb-2"))
    assert store.verify_audit().entries == 2
    store.close()
