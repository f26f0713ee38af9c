"""Writes to many accounts go in parallel up to ``outbox.concurrency``, never more per account than
the vendor allows, however the queue is ordered (an initial sync is queued clinician by clinician)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Link, Observation, PullResult, Write
from syncbridge.engine import Engine
from syncbridge.model import Role, Snapshot, empty_snapshot, iso, new_canonical_id
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.store import Store

CLINICIANS = [f"dr_{k}" for k in range(6)]


class PerMailbox(Connector):
    """Each call takes 20 ms; records how many calls run at once, overall and per account."""

    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status"}), status_map=MIRROR_STATUS_MAP)
    account_concurrency: int | None = 1
    now: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    peak_total = 0
    mixed_batches = 0

    async def pull(self, cursor: str | None) -> PullResult:
        return PullResult([], cursor, complete=cursor is None)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id=external_id, deleted=True)

    async def _call(self, accounts: set[str]) -> None:
        cls = PerMailbox
        cls.mixed_batches += len(accounts) > 1
        for a in accounts:
            cls.now[a] += 1
            cls.peak[a] = max(cls.peak[a], cls.now[a])
        cls.peak_total = max(cls.peak_total, sum(cls.now.values()))
        await asyncio.sleep(0.02)
        for a in accounts:
            cls.now[a] -= 1

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        await self._call({desired["clinician"]})
        return ApplyResult(f"ext-{appointment_id}", "e")

    async def apply_many(self, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        await self._call({w.desired["clinician"] for w in writes})
        return [ApplyResult(f"ext-{w.appointment_id}", "e") for w in writes]


def world(tmp_path: Path, *, limit: int | None, batch: int = 1, busy: int = len(CLINICIANS)) -> tuple[Engine, Outbox, int]:
    PerMailbox.now, PerMailbox.peak, PerMailbox.peak_total, PerMailbox.mixed_batches = Counter(), Counter(), 0, 0
    PerMailbox.account_concurrency = limit
    PerMailbox.write_batch = batch
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {c: {"accounts": {"cal": {}}} for c in CLINICIANS},
        "connectors": {"cal": {"type": "tests.unit.test_outbox_accounts:PerMailbox"}},
        "outbox": {"concurrency": 4},
    }))
    engine = Engine(Store(cfg.store.path), build_connectors(cfg), cfg)
    n = 0
    for c in CLINICIANS[:busy]:  # queued clinician by clinician, as an initial sync queues them
        for k in range(10):
            start = datetime(2027, 1, 4 + k, 10, tzinfo=UTC)
            engine.change(new_canonical_id(), empty_snapshot() | {
                "clinician": c, "start": iso(start), "end": iso(start + timedelta(minutes=50)), "timezone": "America/New_York",
            }, via="test")
            n += 1
    return engine, Outbox(engine), n


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    PerMailbox.account_concurrency, PerMailbox.write_batch = 1, 1


async def test_one_call_per_account_still_keeps_every_slot_busy(tmp_path: Path) -> None:
    engine, outbox, n = world(tmp_path, limit=1)
    report = await outbox.drain()
    assert report.applied == n
    assert max(PerMailbox.peak.values()) == 1  # never two calls for one mailbox
    assert PerMailbox.peak_total == 4  # but four mailboxes at once: outbox.concurrency
    engine.store.close()


async def test_a_higher_account_limit_is_used_and_kept(tmp_path: Path) -> None:
    """One busy mailbox among six: two calls for it at once (its limit), never three."""
    engine, outbox, n = world(tmp_path, limit=2, busy=1)
    assert (await outbox.drain()).applied == n
    assert max(PerMailbox.peak.values()) == 2
    assert PerMailbox.peak_total == 2
    engine.store.close()


async def test_the_accounts_take_turns(tmp_path: Path) -> None:
    """With room for four calls and six busy mailboxes, four different mailboxes are served at once."""
    engine, outbox, n = world(tmp_path, limit=2)
    assert (await outbox.drain()).applied == n
    assert PerMailbox.peak_total == 4 and max(PerMailbox.peak.values()) <= 2
    engine.store.close()


async def test_batches_hold_one_account_each(tmp_path: Path) -> None:
    """A vendor batch acts as one user: each holds one clinician's writes, and they go side by side."""
    engine, outbox, n = world(tmp_path, limit=1, batch=4)
    assert (await outbox.drain()).applied == n
    assert PerMailbox.mixed_batches == 0
    assert max(PerMailbox.peak.values()) == 1 and PerMailbox.peak_total == 4
    engine.store.close()


async def test_without_an_account_limit_writes_go_in_queue_order(tmp_path: Path) -> None:
    """A system with no per-account limit (one EHR) takes writes as they were queued."""
    engine, outbox, n = world(tmp_path, limit=None)
    assert (await outbox.drain()).applied == n
    assert PerMailbox.peak_total == 4
    engine.store.close()


async def test_a_system_with_its_own_limit_gets_no_more_calls_than_it_takes(tmp_path: Path) -> None:
    """One server shared by everyone (an EHR): its max_concurrency holds below outbox.concurrency."""
    engine, outbox, n = world(tmp_path, limit=None)
    PerMailbox.max_concurrency = 2
    try:
        assert (await outbox.drain()).applied == n
        assert PerMailbox.peak_total == 2
    finally:
        PerMailbox.max_concurrency = None
        engine.store.close()
