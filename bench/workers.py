"""Benchmark: the initial sync of one practice by 1, 2 or 3 workers sharing one PostgreSQL database.

    python bench/workers.py --workers 1 --clinicians 30 --per-clinician 100 --systems google_calendar,microsoft365,fhir
    python bench/workers.py --workers 3 --clinicians 30 --per-clinician 100 --systems google_calendar,microsoft365,fhir --write-batch 1

A throwaway PostgreSQL cluster is started from /usr/lib/postgresql/*/bin (tests/support/postgres.py:
a unix socket only, no fsync, as ``nobody`` when run as root). ``--clinicians`` x ``--per-clinician``
sessions are seeded into the canonical record of one practice (not timed), as bench/initial_sync.py
does; the sandboxes of ``--systems`` run in this process, each behind its injector adding
``--latency`` seconds to every API call. Then ``--workers`` ``syncbridge run`` processes are started
at once on that database (workers ``w0``.., each its own http port; webhooks go to ``w0``'s, the
address a load balancer would give them all), and the clock runs from their launch until every
appointment has a copy in every system that takes new sessions and the outbox is empty.

Printed: the workers, the time, sessions per second, each worker's CPU seconds (utime + stime of
/proc/PID/stat), the database server's CPU over the run (the postmaster, its live backends and the
backends that ended, from the postmaster's cutime + cstime), the emulators' (this process) and which
worker held which connector lease (sampled every ``--every`` seconds; a change of holder is listed).
``--write-batch`` sets every batching system's ``write_batch`` (1: no vendor batch requests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syncbridge.config import load_config  # noqa: E402
from syncbridge.demo import sandbox_config  # noqa: E402
from syncbridge.emulation import free_port  # noqa: E402
from syncbridge.engine import Engine  # noqa: E402
from syncbridge.logging import configure  # noqa: E402
from syncbridge.registry import build_connectors, connector_class  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from tests.support.postgres import Cluster, find_binaries, unavailable  # noqa: E402

from bench.initial_sync import BATCHING, seed  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
#: the child processes run this checkout, whatever syncbridge the interpreter has installed
ENV = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_of(pid: int) -> float:
    """utime + stime of a live process, seconds."""
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / TICK


def server_cpu(postmaster: int) -> float:
    """The PostgreSQL server's CPU so far: the postmaster, the backends it reaped (cutime + cstime) and its live children."""
    f = _stat(postmaster)
    total = sum(int(x) for x in f[11:15])
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            c = _stat(int(entry.name))
        except (OSError, IndexError):
            continue
        if c[1] == str(postmaster):
            total += int(c[11]) + int(c[12])
    return total / TICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--clinicians", type=int, default=30)
    ap.add_argument("--per-clinician", type=int, default=100, help="sessions per clinician")
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--systems", default="google_calendar,microsoft365,fhir", help="connector types, comma-separated")
    ap.add_argument("--write-batch", type=int, default=0, help="write_batch of every batching system (default: each connector's own)")
    ap.add_argument("--poll", type=float, default=30.0, help="poll interval of every system, seconds (default 30)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between looks at the store while timing")
    args = ap.parse_args()
    why = unavailable()
    if why:
        sys.exit(why)
    configure("warning", json_logs=False)
    workdir = Path(tempfile.mkdtemp(prefix="sb-workers-"))
    names = {f"dr_{i:02d}": f"Clinician {i}" for i in range(args.clinicians)}
    bin_dir = find_binaries()
    assert bin_dir is not None
    cluster = Cluster(bin_dir)
    sandboxes: dict[str, Any] = {}
    try:
        url = cluster.database()
        for t in (t for t in args.systems.split(",") if t):
            s = connector_class(t).sandbox(workdir / t, list(names))
            if s is None:
                sys.exit(f"{t} has no sandbox here")
            sandboxes[f"{t}_sandbox"] = s
        ports = [free_port() for _ in range(args.workers)]
        conf = sandbox_config(workdir, sandboxes, names, ports[0], poll_interval=args.poll)
        conf["store"] = {"url": url, "secret_key": conf["store"]["secret_key"]}
        conf["logging"] = {"level": "warning", "json": True}
        if args.write_batch:
            for c in conf["connectors"].values():
                if c.get("type") in BATCHING:
                    c["write_batch"] = args.write_batch
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        cfg = load_config(path)
        connectors = build_connectors(cfg)
        holds = sorted(n for n, c in connectors.items() if c.capabilities.accepts_new)
        watch = cfg.store.open()
        engine = Engine(watch, connectors, cfg)
        seeded = time.perf_counter()
        n = seed(engine, names, args.per_clinician)
        print(f"{n} appointments in the canonical record ({time.perf_counter() - seeded:.0f}s to seed, not timed); "
              f"systems: {', '.join(sandboxes)}; {args.workers} worker(s); PostgreSQL {bin_dir.parent.name}")
        for c in connectors.values():
            asyncio.run(c.close())
        for s in sandboxes.values():
            if s.injector is not None:
                s.injector.configure(latency=args.latency)
                s.injector.reset_counts()
        postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        db_before = server_cpu(postmaster)
        own = resource.getrusage(resource.RUSAGE_SELF)
        own_before = own.ru_utime + own.ru_stime
        load_before = os.getloadavg()

        def config_of(k: int) -> dict[str, Any]:
            return conf | {"store": conf["store"] | {"worker": f"w{k}"}, "http": conf["http"] | {"port": ports[k]}}

        workers: list[DaemonProcess | None] = [None] * args.workers
        failed: list[BaseException] = []

        def start(k: int) -> None:
            (workdir / f"w{k}").mkdir(exist_ok=True)
            try:
                workers[k] = DaemonProcess(workdir / f"w{k}", config_of(k), env=ENV)
            except BaseException as err:  # noqa: BLE001
                failed.append(err)

        started = time.monotonic()
        threads = [threading.Thread(target=start, args=(k,)) for k in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        up = time.monotonic() - started
        try:
            if failed:
                raise failed[0]
            live = [w for w in workers if w is not None]
            finished: dict[str, float] = {}
            #: connector -> [(holder, seconds since launch when first seen holding it)]
            holders: dict[str, list[tuple[str | None, float]]] = {}
            timed_out = False
            while True:
                for w in live:
                    if w.proc.poll() is not None:
                        raise RuntimeError(f"worker exited with {w.proc.returncode}:\n{w.log.read_text()[-3000:]}")
                now, at = time.time(), time.monotonic() - started
                for name, holder, until in watch.leases():
                    if name.startswith("worker:"):
                        continue
                    h = holder if holder and until >= now else None
                    seen = holders.setdefault(name, [])
                    if not seen or seen[-1][0] != h:
                        seen.append((h, at))
                linked = dict.fromkeys(holds, 0) | {
                    r[0]: r[1] for r in watch.conn.execute(
                        "SELECT connector, count(*) FROM links WHERE external_id IS NOT NULL GROUP BY connector").fetchall()
                    if r[0] in holds}
                for h, v in linked.items():
                    if v >= n and h not in finished:
                        finished[h] = at
                pending = sum(p for p, _ in watch.outbox_counts().values())
                if all(v >= n for v in linked.values()) and pending == 0:
                    break
                if at > args.timeout:
                    print(f"timed out: {linked}, {pending} writes pending")
                    timed_out = True
                    break
                time.sleep(args.every)
            took = time.monotonic() - started
            cpus = {f"w{k}": cpu_of(w.proc.pid) for k, w in enumerate(live)}
            db_cpu = server_cpu(postmaster) - db_before
            own = resource.getrusage(resource.RUSAGE_SELF)
            emu_cpu = own.ru_utime + own.ru_stime - own_before
            load_after = os.getloadavg()
            dead = sum(d for _, d in watch.outbox_counts().values())
        finally:
            for w in workers:
                if w is not None:
                    w.stop()
            watch.close()
        print(f"{'TIMED OUT ' if timed_out else ''}{args.workers} worker(s): {took:.1f}s ({n / took:.0f} sessions/s, "
              f"{n * len(holds) / took:.0f} copies/s) with {args.latency * 1000:.0f} ms per API call; all workers up after {up:.1f}s")
        print("every appointment copied, by system: " + ", ".join(f"{h} {t:.0f}s" for h, t in sorted(finished.items(), key=lambda kv: kv[1])))
        print("CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in cpus.items())
              + f"; workers {sum(cpus.values()):.1f}; PostgreSQL {db_cpu:.1f}; emulators and this benchmark {emu_cpu:.1f}; "
              f"total {sum(cpus.values()) + db_cpu + emu_cpu:.1f} of {(os.cpu_count() or 1) * took:.0f} available")
        print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; dead letters {dead}")
        for name in sorted(holders):
            print(f"lease {name}: " + " -> ".join(f"{h or 'free'} (from {t:.0f}s)" for h, t in holders[name]))
        calls = {name: s.injector.requests for name, s in sandboxes.items() if s.injector}
        print("HTTP requests: " + ", ".join(f"{k} {v} ({v / n:.2f} per appointment)" for k, v in calls.items()))
    finally:
        for s in sandboxes.values():
            s.close()
        cluster.stop()


if __name__ == "__main__":
    main()
