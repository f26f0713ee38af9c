"""A push that names accounts pulls only those accounts, so its cost does not grow with the practice;
one known to be our own echo pulls nothing; one that names nothing still pulls everything."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
import yaml

from syncbridge.config import parse_config
from syncbridge.connector import MIRROR_STATUS_MAP, ApplyResult, Capabilities, Connector, Link, Observation, PullResult
from syncbridge.errors import TransientError
from syncbridge.model import Role, Snapshot
from syncbridge.runtime import Daemon

ACCOUNTS = ("dr_a", "dr_b", "dr_c")


class PerAccount(Connector):
    """One cursor entry per account; a notification's ``x-account`` header names the account (or
    ``echo``, or nothing at all)."""

    capabilities = Capabilities(role=Role.MIRROR, fields=frozenset({"clinician", "start", "end", "timezone", "status"}), status_map=MIRROR_STATUS_MAP)
    reads: list[tuple[str, ...]] = []
    failing: set[str] = set()

    def _read(self, cursor: str | None, accounts: tuple[str, ...]) -> PullResult:
        PerAccount.reads.append(accounts)
        state = json.loads(cursor) if cursor else dict.fromkeys(ACCOUNTS, 0)
        failed = {}
        for a in accounts:
            if a in PerAccount.failing:
                failed[a] = TransientError(f"{a} is down")
            else:
                state[a] += 1
        return PullResult([], json.dumps(state), complete=cursor is None, failed_accounts=failed)

    async def pull(self, cursor: str | None) -> PullResult:
        return self._read(cursor, ACCOUNTS)

    async def pull_accounts(self, cursor: str, accounts: frozenset[str]) -> PullResult:
        return self._read(cursor, tuple(sorted(accounts)))

    def webhook_accounts(self, headers: Mapping[str, str], body: bytes) -> frozenset[str] | None:
        named = headers.get("x-account")
        if named is None:
            return None
        return frozenset() if named == "echo" else frozenset({named})

    async def read(self, external_id: str) -> Observation:
        return Observation(external_id=external_id, deleted=True)

    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        return ApplyResult(f"ext-{appointment_id}", "e")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    PerAccount.reads, PerAccount.failing = [], set()
    cfg = parse_config(yaml.safe_dump({
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {a: {"accounts": {"cal": {}}} for a in ACCOUNTS},
        "connectors": {"cal": {"type": "tests.unit.test_push_scope:PerAccount", "poll_interval": 300}},
        "http": {"enabled": False},
    }))
    d = Daemon(None, cfg)
    await d.poll("cal")  # the first listing: every account
    PerAccount.reads.clear()
    yield d
    await d.close()


def cursor_of(d: Daemon) -> dict[str, int]:
    return json.loads(d.store.cursor("cal") or "{}")


async def test_a_push_naming_one_account_reads_that_account_alone(daemon: Daemon) -> None:
    daemon.connectors["cal"].host.accept_webhook({"x-account": "dr_b"}, b"")
    await daemon.process_inbox("cal")
    assert PerAccount.reads == [("dr_b",)]
    assert cursor_of(daemon) == {"dr_a": 1, "dr_b": 2, "dr_c": 1}  # the others' state kept
    assert daemon.store.inbox_pending("cal") == []


async def test_notifications_for_two_accounts_read_both_in_one_pull(daemon: Daemon) -> None:
    host = daemon.connectors["cal"].host
    host.accept_webhook({"x-account": "dr_a"}, b"")
    host.accept_webhook({"x-account": "dr_c"}, b"")
    host.accept_webhook({"x-account": "dr_a"}, b"")
    await daemon.process_inbox("cal")
    assert PerAccount.reads == [("dr_a", "dr_c")]


async def test_the_echo_of_our_own_write_reads_nothing(daemon: Daemon) -> None:
    daemon.connectors["cal"].host.accept_webhook({"x-account": "echo"}, b"")
    await daemon.process_inbox("cal")
    assert PerAccount.reads == []
    assert daemon.store.inbox_pending("cal") == []


async def test_a_notification_naming_nothing_reads_every_account(daemon: Daemon) -> None:
    host = daemon.connectors["cal"].host
    host.accept_webhook({"x-account": "dr_a"}, b"")
    host.accept_webhook({}, b"")
    await daemon.process_inbox("cal")
    assert PerAccount.reads == [ACCOUNTS]


async def test_reading_one_account_keeps_another_accounts_failure_on_show(daemon: Daemon) -> None:
    """dr_c cannot be read: the status says so until dr_c itself is read, not until a push for dr_a."""
    PerAccount.failing = {"dr_c"}
    await daemon.poll("cal")
    assert "dr_c" in (daemon.store.connector_state("cal")["note"] or "")
    daemon.connectors["cal"].host.accept_webhook({"x-account": "dr_a"}, b"")
    await daemon.process_inbox("cal")
    assert PerAccount.reads[-1] == ("dr_a",)
    assert "dr_c" in (daemon.store.connector_state("cal")["note"] or "")
    PerAccount.failing = set()
    await daemon.poll("cal")
    assert not daemon.store.connector_state("cal")["note"]
