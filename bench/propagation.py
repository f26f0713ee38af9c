"""Benchmark: cancel-to-everywhere latency and API calls per propagated change, by origin system.

    .venv/bin/python bench/propagation.py --latency 0.05 --cancels 10 --poll 10

Every installed sandbox starts (emulators and a real Radicale), each behind its injector with
``--latency`` seconds added to every API call the daemon makes. `syncbridge run` runs as a
process. For each system able to cancel as its users do, ``--cancels`` sessions are cancelled
there one after another; the clock runs from the cancellation until every other system shows the
session as cancelled or gone (each observer check adds up to one look, ~0.1 s, so times are upper
bounds). Two modes: push (webhooks, watch channels, subscriptions on loopback; systems that push
are then polled only every ``--push-poll`` seconds, systems that cannot push every ``--poll``) and
polling only (no public URL, every system polled every ``--poll`` seconds). API calls per change are counted by each system's injector over the
propagation window, minus that system's idle polling over the same time (measured first).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syncbridge.config import load_config  # noqa: E402
from syncbridge.connector import Sandbox  # noqa: E402
from syncbridge.demo import sandbox_config, start_sandboxes  # noqa: E402
from syncbridge.emulation import free_port  # noqa: E402
from syncbridge.engine import Engine  # noqa: E402
from syncbridge.logging import configure  # noqa: E402
from syncbridge.model import Role, empty_snapshot, iso, new_canonical_id  # noqa: E402
from syncbridge.registry import build_connectors  # noqa: E402
from syncbridge.store import Store  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402

NY = ZoneInfo("America/New_York")
NAMES = {"dr_rivera": "Dr. Rivera", "dr_chen": "Dr. Chen"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def wait_until(predicate: Any, timeout: float, step: float = 0.05) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(step)
    return None


async def run_mode(push: bool, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"sb-prop-{'push' if push else 'poll'}-"))
    sandboxes = start_sandboxes(workdir, list(NAMES), say=lambda _t: None)
    try:
        return await _measure(workdir, sandboxes, push, args)
    finally:
        for s in sandboxes.values():
            s.close()


async def _measure(workdir: Path, sandboxes: dict[str, Sandbox], push: bool, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    conf = sandbox_config(workdir, sandboxes, NAMES, port, poll_interval=args.poll, push=push)
    conf["logging"] = {"level": "warning", "json": True}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    cfg = load_config(path)
    connectors = build_connectors(cfg)
    roles = {n: c.capabilities.role for n, c in connectors.items()}
    store = Store(cfg.store.path)
    engine = Engine(store, connectors, cfg)
    origins = [n for n, s in sandboxes.items() if s.delete_event]
    monday = datetime.now(NY).date() + timedelta(days=7 - datetime.now(NY).weekday())
    sessions: dict[str, list[str]] = {}
    for i, origin in enumerate(origins):
        if roles[origin] == Role.CHANNEL:
            continue  # a directory holds only its own bookings: booked there below
        sessions[origin] = []
        for k in range(args.cancels):
            start = datetime(monday.year, monday.month, monday.day, 9, tzinfo=NY) + timedelta(days=k % 5 + 7 * (k // 5), hours=2 * i)
            appt = new_canonical_id()
            engine.change(appt, empty_snapshot() | {
                "clinician": "dr_rivera", "client_key": f"c{i}-{k}", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                "timezone": "America/New_York", "service_code": "90834",
            }, via="front-desk", kind="booked")
            sessions[origin].append(appt)
    store.close()
    for c in connectors.values():
        await c.close()
    if push:
        # systems that push are polled only as a safety net, as a practice with push would run them;
        # their idle traffic is then near zero and the calls counted are the change's own
        for n, c in connectors.items():
            if c.capabilities.push:
                conf["connectors"][n]["poll_interval"] = args.push_poll
    daemon = DaemonProcess(workdir, conf)
    watch = Store(cfg.store.path)
    try:
        def settled() -> bool:
            return all(p == 0 for p, _ in watch.outbox_counts().values())

        def copies(appt: str) -> dict[str, str]:
            out = {}
            for n in sandboxes:
                link = watch.link(n, appt)
                if link is not None and link.external_id and not link.gone:
                    out[n] = link.external_id
            return out

        deadline = time.monotonic() + 300
        while not (settled() and all(len(copies(a)) >= 2 for ids in sessions.values() for a in ids)):
            if time.monotonic() > deadline:
                raise SystemExit(f"initial copy did not finish; see {daemon.log}")
            await asyncio.sleep(0.5)
        for name, channel in ((n, s) for n, s in sandboxes.items() if s.book and s.delete_event):
            sessions[name] = []
            for k in range(args.cancels):
                start = datetime(monday.year, monday.month, monday.day, 10, tzinfo=NY) + timedelta(days=14 + k % 5 + 7 * (k // 5))
                ext = await channel.book("dr_chen", start, start + timedelta(minutes=50))  # type: ignore[misc]
                while (link := watch.link_by_external(name, ext)) is None or len(copies(link.appointment_id)) < 2 or not settled():
                    await asyncio.sleep(0.2)
                sessions[name].append(link.appointment_id)
        for s in sandboxes.values():
            if s.injector is not None:
                s.injector.configure(latency=args.latency)
        # idle request rate per system (polls, pushes kept alive), to subtract from each change's count
        for s in sandboxes.values():
            if s.injector:
                s.injector.reset_counts()
        idle_window = max(10.0, 2 * args.poll)
        await asyncio.sleep(idle_window)
        idle = {n: s.injector.requests / idle_window for n, s in sandboxes.items() if s.injector}

        results: dict[str, Any] = {}
        for origin, ids in sessions.items():
            delete = sandboxes[origin].delete_event
            assert delete is not None
            times: list[float] = []
            calls: dict[str, list[float]] = {n: [] for n in sandboxes if sandboxes[n].injector}
            for appt in ids:
                targets = {n: e for n, e in copies(appt).items() if n != origin and sandboxes[n].look}
                # changes happen at any moment, not just after a poll: desynchronise from the poll timer
                await asyncio.sleep(random.uniform(0, args.poll))
                for s in sandboxes.values():
                    if s.injector:
                        s.injector.reset_counts()
                t0 = time.monotonic()
                await delete(copies(appt)[origin])

                async def everywhere(targets: dict[str, str] = targets) -> bool:
                    seen = await asyncio.gather(*(sandboxes[n].look(e) for n, e in targets.items()))  # type: ignore[misc]
                    return all(c.state != "live" for c in seen)

                took = await wait_until(everywhere, timeout=args.poll * 3 + 60, step=0.1)
                if took is None:
                    raise SystemExit(f"{origin}: a cancellation did not propagate; see {daemon.log}")
                times.append(took)
                # let trailing writes (billing marks, claim suppression) land before counting
                async def drained() -> bool:
                    return settled()

                await wait_until(drained, 30)
                window = time.monotonic() - t0
                for n in calls:
                    inj = sandboxes[n].injector
                    assert inj is not None
                    calls[n].append(max(0.0, inj.requests - idle[n] * window))
                await asyncio.sleep(0.5)
            results[origin] = {
                "p50": statistics.median(times), "p95": pct(times, 0.95), "max": max(times), "n": len(times),
                "calls": {n: statistics.mean(v) for n, v in calls.items() if v},
            }
        return {"results": results, "idle": idle}
    finally:
        watch.close()
        daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds added to every API call (default 0.05)")
    ap.add_argument("--cancels", type=int, default=10, help="cancellations per origin system (default 10)")
    ap.add_argument("--poll", type=float, default=10.0, help="poll interval in seconds (default 10)")
    ap.add_argument("--modes", default="push,poll")
    ap.add_argument("--push-poll", type=float, default=3600.0, help="poll interval of systems that push, in push mode (default 3600)")
    args = ap.parse_args()
    configure("warning", json_logs=False)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    for mode in args.modes.split(","):
        out = asyncio.run(run_mode(mode == "push", args))
        print(f"\n== {mode}: latency {args.latency * 1000:.0f} ms per call, poll interval {args.poll:.0f} s, {args.cancels} cancels per origin")
        print("idle requests/s by system: " + ", ".join(f"{n} {r:.2f}" for n, r in out["idle"].items()))
        print(f"{'origin':<24}{'p50 s':>8}{'p95 s':>8}{'max s':>8}   API calls per change by system (idle polling subtracted)")
        for origin, r in out["results"].items():
            calls = ", ".join(f"{n} {c:.1f}" for n, c in r["calls"].items())
            print(f"{origin:<24}{r['p50']:>8.2f}{r['p95']:>8.2f}{r['max']:>8.2f}   {calls}")
    print(f"\npeak RSS of this process (sandboxes, emulators): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
