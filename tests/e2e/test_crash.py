"""The daemon as a real process, SIGKILLed at random points while it pulls, commits and writes.

Three systems (an EHR and two calendars) live in their own files; between kills a "user" edits
them. After a final clean run everything converges: every system agrees with the canonical
record, nothing is duplicated, no cancellation is lost, and the audit chain verifies.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from syncbridge.config import load_config
from syncbridge.registry import build_connectors
from syncbridge.store import Store
from tests.support.converge import divergences
from tests.support.practice import replica_practice
from tests.support.replica import ReplicaVendor

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
REPLICAS = ("ehr", "cal_a", "cal_b")
BASE = datetime(2027, 2, 1, 14, 0, tzinfo=UTC)


def write_config(tmp: Path) -> Path:
    conf = replica_practice(
        tmp,
        connector={"poll_interval": 0.3, "latency": 0.004},
        outbox={"backoff_base": 0.05, "backoff_max": 0.5, "max_attempts": 100},
        policy={"mass_cancel_guard": {"min_count": 1000}},
    )
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "syncbridge.cli", "run", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    )


async def user_edits(rnd: random.Random, vendors: dict[str, ReplicaVendor], store_path: Path, cancelled: set[tuple[str, str]]) -> None:
    for _ in range(rnd.randint(1, 4)):
        name = rnd.choice(REPLICAS)
        items = sorted(
            (i for i in vendors[name].all_items() if not i["deleted"] and i["status"] == "booked" and i["start"]),
            key=lambda i: i["ext_id"],
        )
        if not items:
            continue
        item = rnd.choice(items)
        action = rnd.choice(["move", "move", "cancel", "tag"])
        if action == "move":
            start_at = datetime.fromisoformat(item["start"]) + timedelta(hours=rnd.choice([-2, -1, 1, 2]))
            await vendors[name].move(item["ext_id"], start_at, start_at + timedelta(minutes=50))
        elif action == "cancel":
            cancelled.add((name, item["ext_id"]))
            if name == "ehr":
                await vendors[name].set_status(item["ext_id"], "cancelled")
            else:
                await vendors[name].delete(item["ext_id"])
        elif name != "ehr":
            cancelled.add((name, item["ext_id"]))
            await vendors[name].retitle(item["ext_id"], "Client session #late")


def test_killed_daemon_converges(tmp_path: Path) -> None:
    """SIGKILL at random moments loses nothing and writes nothing twice."""
    rnd = random.Random(int(os.environ.get("SYNCBRIDGE_CRASH_SEED", "20261123")))
    config = write_config(tmp_path)
    log = tmp_path / "daemon.log"
    vendors = {name: ReplicaVendor(str(tmp_path / f"{name}.db")) for name in REPLICAS}
    for i in range(40):
        start_at = BASE + timedelta(hours=3 * i)
        asyncio.run(vendors["ehr"].book(start_at, start_at + timedelta(minutes=50), f"client-{i}", clinician="dr_a"))
    cancelled: set[tuple[str, str]] = set()
    kills = 0
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and kills < 25:
        proc = start(config, log)
        time.sleep(rnd.uniform(0.2, 1.5))
        asyncio.run(user_edits(rnd, vendors, tmp_path / "store.db", cancelled))
        time.sleep(rnd.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1

    # a last, uninterrupted run until everything agrees
    proc = start(config, log)
    cfg = load_config(config)
    caps = {name: c.capabilities for name, c in build_connectors(cfg).items()}
    problems: list[str] = ["not checked yet"]
    try:
        until = time.monotonic() + 60
        while time.monotonic() < until:
            time.sleep(1.0)
            store = Store(cfg.store.path)
            try:
                problems = divergences(store, caps, vendors, cancelled)
                pending = store.outbox_due(float("inf"), 1)
            finally:
                store.close()
            if not problems and not pending:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "the daemon did not stop cleanly on SIGTERM"
    assert kills >= 10
    assert problems == [], "\n".join(problems[:20])
    store = Store(cfg.store.path)
    assert store.verify_audit().ok
    assert len(store.appointments()) == 40, "an appointment was duplicated or lost"
    assert cancelled, "the run made no cancellations"
    done = subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", "audit", "--verify", "--config", str(config)],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
    )
    assert done.returncode == 0 and "audit ok" in done.stdout
