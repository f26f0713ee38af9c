"""Several workers on one PostgreSQL store: writes claimed by one worker at a time, connectors shared out, leases taken over once they expire."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncbridge.leases import PRACTICE_JOBS, Leases
from syncbridge.model import empty_snapshot
from syncbridge.store import Store


@pytest.fixture
def pg(postgres_cluster) -> Iterator[str]:  # type: ignore[no-untyped-def]
    url = postgres_cluster.database()
    try:
        yield url
    finally:
        postgres_cluster.drop(url)


def _queue(store: Store, n: int, connector: str = "cal") -> list[str]:
    ids = [f"sb-{k}" for k in range(n)]
    with store.tx() as tx:
        for k, appt in enumerate(ids):
            snap = empty_snapshot()
            snap.update(clinician=f"dr_{k % 2}", client_key=f"c{k}", start="2027-01-04T14:00:00Z", end="2027-01-04T14:50:00Z",
                        timezone="UTC", status="booked")
            tx.put_appointment(appt, snap, 1, "2027-01-01T00:00:00Z", "ehr")
            tx.enqueue(connector, appt, 1, 1.0 + k)
    return ids


def test_a_write_is_claimed_by_one_worker_at_a_time(pg: str) -> None:
    """Two workers asking for the same connector's writes get different ones; an expired claim is taken over."""
    a, b = Store(pg), Store(pg)
    a.worker, b.worker = "a", "b"
    try:
        ids = _queue(a, 6)
        now = 100.0
        got_a = a.claim_writes("a", "cal", 4, now, now + 30)
        got_b = b.claim_writes("b", "cal", 4, now, now + 30)
        assert [i.appointment_id for i in got_a] == ids[:4]  # by due time
        assert [i.appointment_id for i in got_b] == ids[4:]
        assert b.claim_writes("b", "cal", 4, now + 1, now + 31) == got_b  # its own, renewed; a's are not free
        per_account = b.claim_writes_per_account("b", "cal", 10, now + 31, now + 61)  # a's claims expired
        assert sorted(i.appointment_id for i in per_account) == ids and {i.account for i in per_account} == {"dr_0", "dr_1"}
    finally:
        a.close()
        b.close()


def test_a_worker_that_lost_its_claim_records_nothing(pg: str) -> None:
    """done, retry and dead hold only while the row is still leased to the worker recording them."""
    a, b = Store(pg), Store(pg)
    a.worker, b.worker = "a", "b"
    try:
        (appt,) = _queue(a, 1)
        a.claim_writes("a", "cal", 1, 100.0, 130.0)
        assert [i.appointment_id for i in b.claim_writes("b", "cal", 1, 131.0, 161.0)] == [appt]  # a's lease ran out
        with a.tx() as tx:
            tx.outbox_done("cal", appt, 1)
            tx.outbox_retry("cal", appt, 500.0, "late")
            tx.outbox_dead("cal", appt, "late")
        (row,) = a.outbox_due(200.0, 10, "cal")
        assert (row.attempts, row.dead, row.due_at) == (0, False, 1.0)
        with b.tx() as tx:
            tx.outbox_retry("cal", appt, 300.0, "transient: refused")
        assert b.outbox_due(300.0, 10, "cal")[0].attempts == 1
        assert [i.appointment_id for i in a.claim_writes("a", "cal", 1, 300.0, 330.0)] == [appt]  # a retry frees the row
        with a.tx() as tx:
            tx.outbox_done("cal", appt, 1)
        assert a.outbox_counts() == {}
    finally:
        a.close()
        b.close()


def _connectors(held: list[str]) -> list[str]:
    return [n for n in held if n != PRACTICE_JOBS]


def test_connectors_are_shared_out_and_taken_over_after_the_expiry(pg: str) -> None:
    """Three workers hold a share each; one stops renewing and its connectors go to the others once its leases expire."""
    names = ["ehr", "google", "graph", "job:practice"]
    stores = [Store(pg) for _ in range(3)]
    workers = [Leases(s, f"w{k}", 2.0, names) for k, s in enumerate(stores)]
    try:
        for _ in range(6):  # the first takes everything, then gives back one a tick as the others appear
            for w in workers:
                w.tick()
        held = [w.held() for w in workers]
        assert sorted(n for h in held for n in h) == names
        # a connector each; the practice's jobs are not counted in the share
        assert sorted(len(_connectors(h)) for h in held) == [1, 1, 1], held
        dead = workers.pop(0)
        orphaned = dead.held()
        lost_at = max(t for name, holder, t in stores[0].leases() if holder == "w0" and name in orphaned)
        taken_at = None
        while taken_at is None and time.time() < lost_at + 5:
            for w in workers:
                w.tick()
            if all(any(w.holds(n) for w in workers) for n in orphaned):
                taken_at = time.time()
            time.sleep(0.1)
        assert taken_at is not None and taken_at - lost_at < 1.0
        deadline = time.time() + 3  # the dead worker's heartbeat lapses too, and the two share everything out again
        def shared() -> bool:
            return sorted(n for w in workers for n in w.held()) == names and sorted(len(_connectors(w.held())) for w in workers) == [1, 2]

        while not shared() and time.time() < deadline:
            for w in workers:
                w.tick()
            time.sleep(0.1)
        assert shared(), [w.held() for w in workers]
        for w in workers:
            w.release_all()
        assert {holder for name, holder, _ in stores[1].leases() if not name.startswith("worker:w0")} == {None}
    finally:
        for s in stores:
            s.close()


def test_sqlite_has_one_worker_holding_everything(tmp_path: Path) -> None:
    """On SQLite nothing is leased: the daemon works on every connector and claims are today's due writes."""
    store = Store(tmp_path / "s.db")
    try:
        ids = _queue(store, 2)
        leases = Leases(store, "only", 30.0, ["cal", "job:practice"])
        assert leases.tick() == [] and leases.holds("cal") and leases.held() == ["cal", "job:practice"]
        assert [i.appointment_id for i in store.claim_writes(None, "cal", 5, 100.0, 130.0)] == ids
        with store.tx() as tx:
            tx.outbox_done("cal", ids[0], 1)
        assert [i.appointment_id for i in store.outbox_due(100.0, 5, "cal")] == ids[1:]
    finally:
        store.close()
