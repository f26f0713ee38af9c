"""Benchmark: the initial sync of a practice into every system: time, API calls, peak RSS.

    .venv/bin/python bench/initial_sync.py --clinicians 30 --weeks 52 --latency 0.05 --systems fhir,google_calendar,microsoft365
    .venv/bin/python bench/initial_sync.py --clinicians 30 --per-clinician 200 --systems google_calendar --write-batch 1

A practice of ``--clinicians`` clinicians with about 26 weekly sessions each for ``--weeks``
weeks (30 x 52 x 26 = 40,560 appointments) is in the canonical record when `syncbridge run`
starts as a process against the chosen sandboxes, each behind its injector adding ``--latency``
seconds to every API call. The clock runs until every appointment has a copy in every system
that holds sessions booked elsewhere and the outbox is empty. Peak RSS is the daemon's (VmHWM).
``--per-clinician`` seeds that many sessions per clinician instead of whole weeks; ``--write-batch``
sets every system's ``write_batch`` (1: no vendor batch requests). The API calls each system
answered are printed by kind where its sandbox counts them (batch parts one by one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from datetime import datetime, timedelta
from collections.abc import Iterable
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syncbridge.config import load_config  # noqa: E402
from syncbridge.demo import sandbox_config, start_sandboxes  # noqa: E402
from syncbridge.emulation import free_port  # noqa: E402
from syncbridge.engine import Engine  # noqa: E402
from syncbridge.logging import configure  # noqa: E402
from syncbridge.model import empty_snapshot, iso, new_canonical_id  # noqa: E402
from syncbridge.registry import build_connectors, connector_class  # noqa: E402
from syncbridge.store import Store  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402

NY = ZoneInfo("America/New_York")
#: connector types with a ``write_batch`` option
BATCHING = ("google_calendar", "microsoft365")
SLOTS = [(d, h) for d in range(5) for h in (9, 10, 11, 13, 14, 15)][:26]  # 26 sessions a week


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def seed(engine: Engine, names: Iterable[str], per_clinician: int, weeks: int = 0) -> int:
    """The canonical record as the practice's EHR export would fill it, from next Monday:
    ``per_clinician`` sessions for each clinician (or, if 0, ``weeks`` whole weeks); how many."""
    monday = datetime.now(NY).date() + timedelta(days=7 - datetime.now(NY).weekday())
    weeks = -(-per_clinician // len(SLOTS)) if per_clinician else weeks
    slots = [(w, d, h) for w in range(weeks) for d, h in SLOTS][: per_clinician or None]
    n = 0
    for k in names:
        for w, d, h in slots:
            day = monday + timedelta(days=7 * w + d)
            start = datetime(day.year, day.month, day.day, h, tzinfo=NY)
            engine.change(new_canonical_id(), empty_snapshot() | {
                "clinician": k, "client_key": f"c{n}", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                "timezone": "America/New_York", "service_code": "90834",
            }, via="import", kind="booked")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clinicians", type=int, default=30)
    ap.add_argument("--weeks", type=int, default=52)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--systems", default="", help="connector types to include (default: every installed sandbox)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--per-clinician", type=int, default=0, help="sessions per clinician (instead of --weeks)")
    ap.add_argument("--write-batch", type=int, default=0, help="write_batch of every system (default: each connector's own)")
    ap.add_argument("--concurrency", type=int, default=0, help="outbox.concurrency (default: the daemon's default)")
    ap.add_argument("--no-push", action="store_true", help="no public URL: systems are polled, nothing pushes")
    ap.add_argument("--poll", type=float, default=30.0, help="poll interval of every system, seconds (default 30)")
    args = ap.parse_args()
    configure("warning", json_logs=False)
    workdir = Path(tempfile.mkdtemp(prefix="sb-initial-"))
    names = {f"dr_{i:02d}": f"Clinician {i}" for i in range(args.clinicians)}
    wanted = [t for t in args.systems.split(",") if t]
    if wanted:
        sandboxes = {}
        for t in wanted:
            s = connector_class(t).sandbox(workdir / t, list(names))
            if s is not None:
                sandboxes[f"{t}_sandbox"] = s
    else:
        sandboxes = start_sandboxes(workdir, list(names), say=lambda _t: None)
    try:
        conf = sandbox_config(workdir, sandboxes, names, free_port(), poll_interval=args.poll, push=not args.no_push)
        conf["logging"] = {"level": "warning", "json": True}
        if args.concurrency:
            conf["outbox"] = {"concurrency": args.concurrency}
        if args.write_batch:
            for c in conf["connectors"].values():
                if c.get("type") in BATCHING:
                    c["write_batch"] = args.write_batch
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        cfg = load_config(path)
        connectors = build_connectors(cfg)
        holds = [n for n, c in connectors.items() if c.capabilities.accepts_new]
        store = Store(cfg.store.path)
        engine = Engine(store, connectors, cfg)
        seeded = time.perf_counter()
        n = seed(engine, names, args.per_clinician, args.weeks)
        print(f"{n} appointments in the canonical record ({time.perf_counter() - seeded:.0f}s to seed, not timed); systems: {', '.join(sandboxes)}")
        store.close()
        for c in connectors.values():
            asyncio.run(c.close())
        for s in sandboxes.values():
            if s.injector is not None:
                s.injector.configure(latency=args.latency)
                s.injector.reset_counts()
        started = time.monotonic()
        daemon = DaemonProcess(workdir, conf)
        watch = Store(cfg.store.path)
        peak = 0
        finished: dict[str, float] = {}
        try:
            while True:
                peak = max(peak, vm_hwm(daemon.proc.pid))
                linked = {h: watch.conn.execute("SELECT count(*) FROM links WHERE connector = ? AND external_id IS NOT NULL", (h,)).fetchone()[0] for h in holds}
                for h, v in linked.items():
                    if v >= n and h not in finished:
                        finished[h] = time.monotonic() - started
                pending = sum(p for p, _ in watch.outbox_counts().values())
                if all(v >= n for v in linked.values()) and pending == 0:
                    break
                if time.monotonic() - started > args.timeout:
                    print(f"timed out: {linked}, {pending} writes pending")
                    break
                time.sleep(2)
            took = time.monotonic() - started
            peak = max(peak, vm_hwm(daemon.proc.pid))
            fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            daemon_cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        finally:
            watch.close()
            daemon.stop()
        calls = {name: s.injector.requests for name, s in sandboxes.items() if s.injector}
        kinds = {name: s.calls() for name, s in sandboxes.items() if s.calls is not None}
        print(f"initial sync: {took:.0f}s ({took / 60:.1f} min) with {args.latency * 1000:.0f} ms per API call; daemon peak RSS {peak} MB")
        print("every appointment copied, by system: " + ", ".join(f"{h} {t:.0f}s" for h, t in sorted(finished.items(), key=lambda kv: kv[1])))
        own = resource.getrusage(resource.RUSAGE_SELF)
        print(f"daemon CPU: {daemon_cpu:.0f}s; the emulators' (this process): {own.ru_utime + own.ru_stime:.0f}s")
        print("HTTP requests: " + ", ".join(f"{k} {v} ({v / n:.2f} per appointment)" for k, v in calls.items()))
        for name, by_kind in kinds.items():
            print(f"{name} API calls by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    finally:
        for s in sandboxes.values():
            s.close()


if __name__ == "__main__":
    main()
