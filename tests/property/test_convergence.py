"""Property: random edits and cancellations on several replicas, synced in random order with
duplicate notifications, expired cursors and lost write responses, always converge.

After quiescence every replica equals the canonical record, no cancellation is lost, and no
appointment has two copies in one system. It runs on both store engines (``stores``,
tests/conftest.py), each example on a store of its own.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncbridge.config import parse_config
from syncbridge.engine import Engine
from syncbridge.model import CANCELLED_STATES
from syncbridge.outbox import Outbox
from syncbridge.registry import build_connectors
from tests.support.converge import divergences
from tests.support.practice import replica_practice
from tests.support.replica import ReplicaVendor

REPLICAS = ("ehr", "cal_a", "cal_b")
BASE = datetime(2027, 1, 11, 15, 0, tzinfo=UTC)

op = st.one_of(
    st.tuples(st.just("book"), st.integers(0, 20)),
    st.tuples(st.just("move"), st.sampled_from(REPLICAS), st.integers(0, 7), st.integers(-3, 3)),
    st.tuples(st.just("cancel"), st.sampled_from(REPLICAS), st.integers(0, 7)),
    st.tuples(st.just("tag"), st.sampled_from(REPLICAS[1:]), st.integers(0, 7), st.sampled_from(["#late", "#noshow", "#waive"])),
    st.tuples(st.just("sync"), st.sampled_from(REPLICAS), st.booleans()),
    st.tuples(st.just("expire"), st.sampled_from(REPLICAS)),
    st.tuples(st.just("restore"), st.sampled_from(REPLICAS[1:]), st.integers(0, 7)),
    st.tuples(st.just("drain"),),
)


def world(tmp: Path, lossy: bool, stores):  # type: ignore[no-untyped-def]
    conf = replica_practice(
        tmp,
        connector={"fail_rate": 0.2 if lossy else 0.0, "seed": lambda i: i},
        outbox={"backoff_base": 0.001, "backoff_max": 0.002, "max_attempts": 50},
        policy={"mass_cancel_guard": {"min_count": 1000}},
    )
    cfg = parse_config(yaml.safe_dump(conf))
    store = stores(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    vendors = {name: ReplicaVendor(str(tmp / f"{name}.db")) for name in REPLICAS}
    return store, engine, Outbox(engine), vendors


def live_items(vendor: ReplicaVendor) -> list[dict]:
    return [i for i in vendor.all_items() if not i["deleted"] and i["status"] not in CANCELLED_STATES and i["start"]]


async def scenario(ops: list[tuple], rnd, tmp: Path, lossy: bool, stores) -> None:  # type: ignore[no-untyped-def]
    store, engine, outbox, vendors = world(tmp, lossy, stores)
    cancelled_ext: set[tuple[str, str]] = set()

    def pick(name: str, idx: int) -> dict | None:
        items = sorted(live_items(vendors[name]), key=lambda i: i["ext_id"])
        return items[idx % len(items)] if items else None

    async def safe(coro) -> None:
        try:
            await coro
        except Exception as err:  # injected faults surface as TransientError from pulls
            from syncbridge.errors import TransientError

            if not isinstance(err, TransientError):
                raise

    async def settle() -> None:
        order = list(REPLICAS)
        rnd.shuffle(order)
        for name in order:
            await safe(engine.sync(name))
        await outbox.drain()

    for o, then_settle in ops:
        kind = o[0]
        if kind == "book":
            start = BASE + timedelta(hours=o[1] * 2)
            await vendors["ehr"].book(start, start + timedelta(minutes=50), f"client-{o[1]}", clinician="dr_a")
        elif kind == "move":
            item = pick(o[1], o[2])
            if item:
                start = datetime.fromisoformat(item["start"]) + timedelta(hours=o[3] or 1)
                await vendors[o[1]].move(item["ext_id"], start, start + timedelta(minutes=50))
        elif kind == "cancel":
            item = pick(o[1], o[2])
            if item:
                cancelled_ext.add((o[1], item["ext_id"]))
                if o[1] == "ehr":
                    await vendors["ehr"].set_status(item["ext_id"], "cancelled")
                else:
                    await vendors[o[1]].delete(item["ext_id"])
        elif kind == "tag":
            item = pick(o[1], o[2])
            if item:
                if o[3] != "#waive":
                    cancelled_ext.add((o[1], item["ext_id"]))
                else:
                    # the new title replaces a cancelling tag typed before: if nobody saw that one
                    # yet, there is no cancellation to keep
                    link = store.link_by_external(o[1], item["ext_id"])
                    appt = store.appointment(link.appointment_id) if link else None
                    if appt is None or not appt.cancelled:
                        cancelled_ext.discard((o[1], item["ext_id"]))
                await vendors[o[1]].retitle(item["ext_id"], f"Client session {o[3]}")
        elif kind == "sync":
            # notifications are hints: duplicated and reordered, each just triggers a pull
            for _ in range(rnd.choice([1, 1, 2])):
                await safe(engine.sync(o[1], full=o[2]))
        elif kind == "restore":
            # a user restores a deleted event from the trash: the cancellation must still stand
            gone = sorted((i for i in vendors[o[1]].all_items() if i["deleted"]), key=lambda i: i["ext_id"])
            if gone:
                ext = gone[o[2] % len(gone)]["ext_id"]
                link = store.link_by_external(o[1], ext)
                appt = store.appointment(link.appointment_id) if link else None
                if appt is None or not appt.cancelled:
                    cancelled_ext.discard((o[1], ext))  # undone before anyone saw it: nothing to keep
                await vendors[o[1]].undelete(ext)
        elif kind == "expire":
            await vendors[o[1]].invalidate_cursor()
        else:
            await outbox.drain()
        if then_settle:
            await settle()

    # quiescence: keep pulling (in random order) and writing until nothing changes
    for _ in range(60):
        order = list(REPLICAS)
        rnd.shuffle(order)
        changed = 0
        for name in order:
            try:
                r = await engine.sync(name)
                changed += r.created + r.updated
            except Exception:
                changed += 1
        await outbox.drain()
        pending = store.outbox_due(float("inf"), 1)
        if not changed and not pending:
            break
        await asyncio.sleep(0.003)
    else:
        raise AssertionError("did not quiesce")

    caps = {name: c.capabilities for name, c in engine.connectors.items()}
    assert divergences(store, caps, vendors, cancelled_ext) == []
    # every link is unique per connector and appointment (the schema enforces it; check external ids too)
    rows = store.conn.execute("SELECT connector, external_id, COUNT(*) FROM links WHERE external_id IS NOT NULL GROUP BY 1, 2 HAVING COUNT(*) > 1").fetchall()
    assert rows == []
    assert store.verify_audit().ok
    for c in engine.connectors.values():
        await c.close()
    store.close()


@settings(max_examples=int(os.environ.get("SYNCBRIDGE_PROPERTY_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(op, st.booleans()), min_size=5, max_size=40), seed=st.integers(0, 2**32), lossy=st.booleans())
def test_replicas_converge(stores, ops: list[tuple], seed: int, lossy: bool) -> None:  # type: ignore[no-untyped-def]
    """Whatever order edits, cancellations and syncs arrive in, all systems end up agreeing and no cancellation is lost."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(ops, random.Random(seed), Path(tmp), lossy, stores))
