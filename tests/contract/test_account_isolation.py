"""One account's trouble stays its own (DESIGN section 9): with one of three Outlook mailboxes
failing, the other two clinicians' changes still arrive in the same pull, and the status names
the mailbox that could not be read."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.model import empty_snapshot, iso
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from syncbridge.runtime import Daemon
from syncbridge.store import Store
from syncbridge_connectors.microsoft365.emulator import RunningGraph
from tests.contract.suite import ZONE, next_weekday_at
from tests.contract.test_microsoft365 import CLIENT_ID, SECRET, SECRET_ENV, m365_config
from tests.support.emulators import microsoft365

MAILBOXES = {"dr_a": "dr.avery@lakeside.example", "dr_b": "dr.brooks@lakeside.example", "dr_c": "dr.chen@lakeside.example"}


@pytest.fixture
def graph(tmp_path: Path) -> Iterator[RunningGraph]:
    with microsoft365(tmp_path / "graph-tls", CLIENT_ID, SECRET, *MAILBOXES.values()) as server:
        yield server


def _config(graph: RunningGraph, tmp_path: Path) -> dict[str, object]:
    return {
        "practice": {"timezone": ZONE},
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {c: {"accounts": {"outlook": {"mailbox": m}}} for c, m in MAILBOXES.items()},
        "connectors": {"outlook": m365_config(graph, poll_interval=300)},
        "outbox": {"backoff_base": 0.05, "backoff_max": 0.5},
        "http": {"enabled": False},
    }


@dataclass
class Practice:
    store: Store
    engine: Engine
    outbox: Outbox
    graph: RunningGraph
    sessions: dict[str, str]  # clinician -> the appointment booked for them

    def book(self, clinician: str, start: datetime) -> str:
        appt = f"sb-{clinician}-{start:%H%M}"
        snap = empty_snapshot() | {"clinician": clinician, "client_key": "c1", "start": iso(start),
                                   "end": iso(start + timedelta(minutes=50)), "timezone": ZONE}
        self.engine.change(appt, snap, via="ehr")
        return appt

    def delete_in_outlook(self, appt: str) -> None:
        link = self.store.link("outlook", appt)
        assert link is not None and link.external_id
        clinician, _, event_id = link.external_id.partition("/")
        self.graph.emulator.user_delete(MAILBOXES[clinician], event_id)

    def cancelled(self, appt: str) -> bool:
        record = self.store.appointment(appt)
        return record is not None and record.cancelled


@contextlib.asynccontextmanager
async def practice(graph: RunningGraph, tmp_path: Path) -> AsyncIterator[Practice]:
    os.environ[SECRET_ENV] = SECRET
    cfg = parse_config(yaml.safe_dump(_config(graph, tmp_path)))
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    p = Practice(store, engine, Outbox(engine), graph, {})
    try:
        p.sessions = {c: p.book(c, next_weekday_at(9 + i)) for i, c in enumerate(MAILBOXES)}
        await p.outbox.drain()
        await engine.sync("outlook", full=True)
        yield p
    finally:
        for c in connectors.values():
            await c.close()
        store.close()
        os.environ.pop(SECRET_ENV, None)


@pytest.mark.parametrize("status", [403, 404])
async def test_one_mailbox_refused_the_others_are_read(graph: RunningGraph, tmp_path: Path, status: int) -> None:
    """Dr Brooks's mailbox answers 403 (an access policy now leaves it out) or 404 (removed): the
    cancellations made in Dr Avery's and Dr Chen's Outlook arrive in the same pull, the status
    names Dr Brooks's mailbox, and hers arrives once the mailbox answers again."""
    async with practice(graph, tmp_path) as p:
        graph.emulator.fail_mailbox(MAILBOXES["dr_b"], status)
        for appt in p.sessions.values():
            p.delete_in_outlook(appt)
        await p.engine.sync("outlook")
        assert p.cancelled(p.sessions["dr_a"]) and p.cancelled(p.sessions["dr_c"])
        assert not p.cancelled(p.sessions["dr_b"])
        state = p.store.connector_state("outlook")
        assert not state["healthy"] and MAILBOXES["dr_b"] in state["note"] and "dr_b" in state["note"]
        assert MAILBOXES["dr_a"] not in state["note"]

        graph.emulator.fail_mailbox(MAILBOXES["dr_b"], None)
        await p.engine.sync("outlook")
        assert p.cancelled(p.sessions["dr_b"])
        assert p.store.connector_state("outlook")["healthy"]


async def test_a_full_listing_missing_a_mailbox_cancels_none_of_its_sessions(graph: RunningGraph, tmp_path: Path) -> None:
    """The daily sweep while one mailbox answers 403: its sessions are unread, not gone; once it
    answers, it is listed and a session deleted there meanwhile is cancelled."""
    async with practice(graph, tmp_path) as p:
        second = p.book("dr_b", next_weekday_at(15))
        await p.outbox.drain()
        graph.emulator.fail_mailbox(MAILBOXES["dr_b"], 403)
        p.delete_in_outlook(p.sessions["dr_b"])
        await p.engine.sync("outlook", full=True)
        assert not p.cancelled(p.sessions["dr_b"]) and not p.cancelled(second)
        assert not p.store.connector_state("outlook")["healthy"]

        graph.emulator.fail_mailbox(MAILBOXES["dr_b"], None)
        await p.engine.sync("outlook")
        assert p.cancelled(p.sessions["dr_b"]) and not p.cancelled(second)
        assert p.store.connector_state("outlook")["healthy"]


async def test_a_throttled_mailbox_is_read_again_after_its_retry_after(graph: RunningGraph, tmp_path: Path) -> None:
    """Dr Brooks's mailbox answers 429 with Retry-After 1: the daemon applies the other two
    cancellations at once and reads her mailbox again after a second, not at the next poll."""
    async with practice(graph, tmp_path) as p:
        graph.emulator.fail_mailbox(MAILBOXES["dr_b"], 429, retry_after=1)
        for appt in p.sessions.values():
            p.delete_in_outlook(appt)
        daemon = Daemon(None, parse_config(yaml.safe_dump(_config(graph, tmp_path))))  # the same store
        try:
            started = time.monotonic()
            await daemon.poll("outlook")
            assert p.cancelled(p.sessions["dr_a"]) and p.cancelled(p.sessions["dr_c"])
            assert not p.cancelled(p.sessions["dr_b"])
            graph.emulator.fail_mailbox(MAILBOXES["dr_b"], None)
            deadline = time.monotonic() + 10
            while not p.cancelled(p.sessions["dr_b"]):
                assert time.monotonic() < deadline, "the throttled mailbox was not read again"
                await asyncio.sleep(0.05)
            assert 1.0 <= time.monotonic() - started < 5
        finally:
            daemon.stopping.set()
            await asyncio.gather(*daemon._retries.values(), return_exceptions=True)
            for c in daemon.connectors.values():
                await c.close()
            daemon.store.close()
            os.close(daemon._instance_lock)
