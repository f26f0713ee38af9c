"""Failed reads are retried by the daemon, for every connector: after a backoff, never sooner than
the vendor's Retry-After, and well before the next poll."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Link, Observation, PullResult
from syncbridge.errors import RateLimited, unreachable
from syncbridge.model import Role, Snapshot
from syncbridge.runtime import Daemon


class Throttled(Connector):
    """Answers its pulls from a script of errors, then with an empty page; records when it was read."""

    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status"}), status_map=MIRROR_STATUS_MAP)
    script: list[BaseException] = []
    pulls: list[float] = []

    async def pull(self, cursor: str | None) -> PullResult:
        Throttled.pulls.append(time.monotonic())
        if Throttled.script:
            raise Throttled.script.pop(0)
        return PullResult([], "c1", complete=cursor is None)

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id=external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        return ApplyResult(f"ext-{appointment_id}", "e")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    Throttled.script, Throttled.pulls = [], []
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_read_retry:Throttled", "poll_interval": 300}},
        "outbox": {"backoff_base": 0.05, "backoff_max": 300},
        "http": {"enabled": False},
    }))
    d = Daemon(None, cfg)
    yield d
    await d.close()


async def _until(check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_throttled_pull_is_read_again_after_retry_after(daemon: Daemon) -> None:
    """429 with Retry-After: 1.5 on a pull: read again 1.5 s later, not sooner (a push in between
    waits too) and not only at the next poll five minutes on."""
    Throttled.script = [RateLimited("429 too many requests", retry_after=1.5)]
    await daemon.poll("cal")
    assert len(Throttled.pulls) == 1
    await asyncio.sleep(0.3)
    await daemon.poll("cal")  # a push hint or the timer while throttled: no request yet
    assert len(Throttled.pulls) == 1
    await _until(lambda: len(Throttled.pulls) == 2, 10)
    assert 1.5 <= Throttled.pulls[1] - Throttled.pulls[0] < 5
    assert daemon.store.connector_state("cal")["last_good_pull"] is not None


async def test_an_unreachable_server_is_read_again_with_growing_backoff(daemon: Daemon) -> None:
    """Connection refused three times: read again each time, sooner than the poll, waits growing."""
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError as err:
        refused = unreachable("list events", err, "https://calendar.example/")
    Throttled.script = [refused] * 3
    await daemon.poll("cal")
    await _until(lambda: len(Throttled.pulls) == 4, 10)
    gaps = [b - a for a, b in zip(Throttled.pulls, Throttled.pulls[1:], strict=False)]
    assert gaps[0] >= 0.025 and gaps[2] >= 0.1  # base 0.05 s, doubling, jittered into the upper half
    assert daemon.store.connector_state("cal")["last_good_pull"] is not None


async def test_a_command_waits_out_a_throttled_read_within_its_budget() -> None:
    """`syncbridge dry-run` reads a throttled system again after its Retry-After; past its budget
    it reports the error instead of waiting on."""
    from syncbridge.retry import Backoff, retrying

    answers: list[BaseException | str] = [RateLimited("429", retry_after=0.3), "page"]

    async def read() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    started = time.monotonic()
    assert await retrying(read, Backoff(0.01, 1.0), "cal", budget=5) == "page"
    assert time.monotonic() - started >= 0.3
    answers[:] = [RateLimited("429", retry_after=30), "page"]
    with pytest.raises(RateLimited):
        await retrying(read, Backoff(0.01, 1.0), "cal", budget=5)


async def test_stopping_as_a_pull_starts_logs_no_failed_job(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM in the instant the scheduler wakes to start the due pulls: they are cut short quietly
    (read again at the next start), not reported as failed jobs with a traceback in the journal."""
    daemon.schedule()
    with caplog.at_level(logging.ERROR, logger="apscheduler"):
        daemon.scheduler.start()  # its wake-up, which starts the due jobs, is queued on the loop
        daemon.stopping.set()
        await daemon._stop_scheduler()
        await asyncio.sleep(0.1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
