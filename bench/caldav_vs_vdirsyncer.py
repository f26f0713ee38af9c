"""Benchmark: syncbridge's CalDAV connector against vdirsyncer 0.21, one real Radicale, same events.

    .venv/bin/python bench/caldav_vs_vdirsyncer.py --events 2000

What is measured, and why. syncbridge mirrors every session into a clinician's calendar and
must notice a move made in that calendar cheaply, because it polls every calendar every minute.
vdirsyncer is the established tool for keeping two CalDAV collections in step, so it is the
yardstick for both the bulk copy and the one-change case:

- vdirsyncer: collection A holds N events (one VEVENT each, America/New_York, spread over
  weeks); a pair copies A to B (``discover``, then the timed initial ``sync``). Then a calendar
  app moves one event in A (GET, shift DTSTART/DTEND, PUT under If-Match) and the next ``sync``
  is timed; this is repeated ``--repeat`` times with a different event each time. Process
  start-up is inside vdirsyncer's times (it is a command); it is measured on its own and
  printed as ``process_start_s``.
- syncbridge: the same N sessions exist in the canonical store (``engine.change``, as the
  contract suite books them); one clinician is mapped to two CalDAV connectors, ``cal_a`` on
  collection A' and ``cal_b`` on B'. Initial = draining the outbox until both collections hold
  N events; then one ``engine.sync`` per connector so cursors exist (counted separately). The
  same kind of move is made in A', and ``engine.sync("cal_a")`` + ``outbox.drain()`` (the move
  reaches B') is timed, ``--repeat`` times. The floor there is 1 REPORT on A' plus 1 PUT on
  B' = 2 requests. Polling B' after each move (it finds syncbridge's own write, an echo) is
  timed apart, as ``poll_b_after_move``.

Both tools send the same bytes per event: A is seeded with what syncbridge renders for the
same sessions. HTTP traffic is counted the same way for both: they talk to Radicale through a
small counting TCP proxy on loopback that parses request framing (request line, headers, body
length), passes bytes through untouched and counts bytes each way. REPORTs are counted by their
XML root (sync-collection, calendar-multiget, ...), PROPFINDs by Depth. Seeding, moves and
checks go to Radicale directly and are not counted. Repeated phases print the median seconds
and the traffic of their busiest run. Everything runs on 127.0.0.1; Radicale and the proxy are
stopped and the temporary directory removed when the run ends (``--keep`` keeps the directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import icalendar
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from syncbridge.config import PracticeConfig, parse_config  # noqa: E402
from syncbridge.engine import Engine  # noqa: E402
from syncbridge.logging import configure as configure_logging  # noqa: E402
from syncbridge.model import Snapshot, empty_snapshot, iso, new_canonical_id  # noqa: E402
from syncbridge.outbox import Outbox  # noqa: E402
from syncbridge.policy.privacy import event_text  # noqa: E402
from syncbridge.registry import build_connectors  # noqa: E402
from syncbridge.store import Store  # noqa: E402
from syncbridge_connectors.caldav.connector import CalDAVConnector  # noqa: E402
from syncbridge_connectors.caldav.mapping import render, resource_name, uid_for  # noqa: E402
from tests.servers import DavServer, start_radicale  # noqa: E402

ZONE = "America/New_York"
CLINICIAN = "dr_rivera"
SECRET_ENV = "SYNCBRIDGE_BENCH_CALDAV_PASSWORD"
FIRST_MONDAY = datetime(2027, 1, 4, tzinfo=ZoneInfo(ZONE))
SESSIONS_PER_DAY = 8  # 09:00 to 16:00, hourly, weekdays
COMMAND_TIMEOUT = 900.0  # seconds one vdirsyncer command may take before the run fails
UPLOAD_CONCURRENCY = 8
MOVE_BY = timedelta(hours=2)
_T = TypeVar("_T")


# --- counting proxy -----------------------------------------------------------------------------


@dataclass
class Traffic:
    """HTTP requests by kind, and bytes on the wire each way (headers and bodies)."""

    requests: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    received: int = 0

    def copy(self) -> Traffic:
        return Traffic(Counter(self.requests), self.sent, self.received)

    def add(self, after: Traffic, before: Traffic) -> None:
        """Add what happened between two snapshots."""
        self.requests.update(after.requests - before.requests)
        self.sent += after.sent - before.sent
        self.received += after.received - before.received

    @property
    def total(self) -> int:
        return sum(self.requests.values())


_REPORT_ROOT = re.compile(rb"<(?![?!])(?:[\w.-]+:)?([\w.-]+)")


class CountingProxy:
    """A loopback TCP proxy in front of one HTTP server, counting requests by kind.

    It reads each request's framing (request line, headers, Content-Length or chunked body) so
    it can count requests on keep-alive connections, and forwards the bytes unchanged; answers
    flow back as raw bytes. It runs its own event loop in a thread, so the benchmark's loop and
    vdirsyncer's process are both its clients.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._traffic = Traffic()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="counting-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.url = ""

    def start(self) -> str:
        """Listen on a free loopback port; returns the proxy's base URL."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def traffic(self) -> Traffic:
        with self._lock:
            return self._traffic.copy()

    @contextmanager
    def measure(self) -> Iterator[Traffic]:
        """Traffic inside the block (every request has been answered when the block ends)."""
        before = self.traffic()
        spent = Traffic()
        try:
            yield spent
        finally:
            spent.add(self.traffic(), before)

    def _count(self, method: str, headers: dict[str, str], size: int, body: bytes) -> None:
        key = method
        if method == "REPORT":
            root = _REPORT_ROOT.search(body)
            key = f"REPORT {root.group(1).decode() if root else '?'}"
        elif method == "PROPFIND":
            key = f"PROPFIND depth {headers.get('depth', 'infinity')}"
        with self._lock:
            self._traffic.requests[key] += 1
            self._traffic.sent += size

    def _received(self, size: int) -> None:
        with self._lock:
            self._traffic.received += size

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        upstream_r, upstream_w = await asyncio.open_connection(self._host, self._port)
        back = asyncio.create_task(self._answers(upstream_r, client_w))
        try:
            while True:
                head = await client_r.readuntil(b"\r\n\r\n")
                upstream_w.write(head)
                lines = head.decode("latin-1").split("\r\n")
                method = lines[0].split(" ", 1)[0]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await self._forward_body(client_r, upstream_w, headers)
                self._count(method, headers, len(head) + len(body), body)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass  # the client closed its connection (or sent something that is not HTTP)
        finally:
            upstream_w.close()
            await asyncio.gather(back, return_exceptions=True)
            client_w.close()
            self._handlers.discard(task)

    @staticmethod
    async def _forward_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bytes:
        """Forward one request body and return it (bodies here are at most a few hundred KB)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                writer.write(size_line)
                size = int(size_line.split(b";")[0].strip(), 16)
                chunk = await reader.readexactly(size + 2)  # data and its CRLF
                writer.write(chunk)
                body += chunk[:-2]
                if size == 0:
                    while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                        writer.write(trailer)
                    writer.write(b"\r\n")
                    return bytes(body)
        length = int(headers.get("content-length", "0") or 0)
        body_bytes = await reader.readexactly(length) if length else b""
        writer.write(body_bytes)
        await writer.drain()
        return body_bytes

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pass the server's answers back unchanged, counting their bytes."""
        try:
            while data := await reader.read(65536):
                self._received(len(data))
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


# --- the events ---------------------------------------------------------------------------------


def session(i: int) -> Snapshot:
    """Session ``i``: weekdays 09:00-16:00 New York time, 40 a week, so 2,000 span 50 weeks."""
    week, rest = divmod(i, 5 * SESSIONS_PER_DAY)
    day, slot = divmod(rest, SESSIONS_PER_DAY)
    start = FIRST_MONDAY + timedelta(weeks=week, days=day, hours=9 + slot)
    return empty_snapshot() | {
        "clinician": CLINICIAN,
        "client_key": f"client-{i % 300:04d}",
        "start": iso(start),
        "end": iso(start + timedelta(minutes=50)),
        "timezone": ZONE,
        "service_code": "90837",
        "location": "Room 2",
    }


def event_body(appointment_id: str, snap: Snapshot, practice: PracticeConfig) -> bytes:
    """Exactly what syncbridge writes for ``snap``, so both tools move the same bytes per event."""
    desired = CalDAVConnector.capabilities.project(snap)
    text = event_text(desired, practice.policy.privacy, "standard")
    return render(appointment_id, desired, text, now=datetime.now(UTC))


async def upload(server: DavServer, collection: str, events: list[tuple[str, bytes]]) -> None:
    """Seed a collection directly on the server (not counted): one PUT per event, a few at a time."""
    gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)
    headers = {"Content-Type": "text/calendar; charset=utf-8", "If-None-Match": "*"}
    async with httpx.AsyncClient(auth=server.auth, timeout=60.0) as http:

        async def put(name: str, body: bytes) -> None:
            async with gate:
                (await http.put(collection + name, content=body, headers=headers)).raise_for_status()

        await asyncio.gather(*(put(name, body) for name, body in events))


def first_event(cal: icalendar.Calendar) -> tuple[icalendar.Event, datetime, datetime]:
    """The calendar object's VEVENT with its (timed, zoned) start and end."""
    event = cal.walk("VEVENT")[0]
    assert isinstance(event, icalendar.Event)
    start, end = event.start, event.end
    assert isinstance(start, datetime) and isinstance(end, datetime)
    return event, start, end


async def move_event(server: DavServer, url: str, by: timedelta) -> datetime:
    """A calendar app moves one event: GET, shift DTSTART/DTEND, bump SEQUENCE, LAST-MODIFIED and
    DTSTAMP, PUT under the ETag it read (as the contract suite's CalDAV vendor does). Returns the
    new start."""
    async with httpx.AsyncClient(auth=server.auth, timeout=30.0) as http:
        got = await http.get(url)
        got.raise_for_status()
        cal = icalendar.Calendar.from_ical(got.text)
        event, start, end = first_event(cal)
        start, end = start + by, end + by
        for name, value in (("DTSTART", start), ("DTEND", end)):
            event.pop(name)
            event.add(name, value)
        now = datetime.now(UTC).replace(microsecond=0)
        for name in ("LAST-MODIFIED", "DTSTAMP"):
            event.pop(name, None)
            event.add(name, now)
        event.add("SEQUENCE", int(event.pop("SEQUENCE", 0)) + 1)
        headers = {"Content-Type": "text/calendar; charset=utf-8", "If-Match": got.headers["ETag"]}
        (await http.put(url, content=cal.to_ical(), headers=headers)).raise_for_status()
    return start


async def member_count(server: DavServer, collection: str) -> int:
    """Resources in a collection (PROPFIND Depth 1, the collection itself not counted)."""
    async with httpx.AsyncClient(auth=server.auth, timeout=60.0) as http:
        r = await http.request("PROPFIND", collection, headers={"Depth": "1"}, content=b"")
    r.raise_for_status()
    return r.text.count("<D:response>") + r.text.count("<response>") - 1


async def start_of(server: DavServer, collection: str, uid: str) -> datetime:
    """DTSTART of the event with ``uid`` in ``collection``, found by a calendar-query on UID."""
    body = (
        '<?xml version="1.0" encoding="utf-8"?><C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
        '<D:prop><C:calendar-data/></D:prop><C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">'
        f'<C:prop-filter name="UID"><C:text-match collation="i;octet">{uid}</C:text-match></C:prop-filter>'
        "</C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"
    )
    async with httpx.AsyncClient(auth=server.auth, timeout=60.0) as http:
        r = await http.request("REPORT", collection, headers={"Depth": "1", "Content-Type": "application/xml"}, content=body)
    r.raise_for_status()
    found = re.findall(r"BEGIN:VCALENDAR.*?END:VCALENDAR", r.text.replace("&#13;", "\r"), re.S)
    if len(found) != 1:
        raise RuntimeError(f"expected one event {uid} in {collection}, found {len(found)}")
    return first_event(icalendar.Calendar.from_ical(found[0]))[1]


# --- results ------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    traffic: Traffic


@dataclass
class Phase:
    """One tool's phase: one run, or several (the incremental case), reported as median and worst."""

    tool: str
    phase: str
    runs: list[Run]
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        seconds = statistics.median(r.seconds for r in self.runs)
        worst = max(self.runs, key=lambda r: (r.traffic.total, r.traffic.received))
        out: dict[str, Any] = {
            "tool": self.tool,
            "phase": self.phase,
            "seconds": round(seconds, 3),
            "requests": worst.traffic.total,
            "by_kind": dict(sorted(worst.traffic.requests.items(), key=lambda kv: (-kv[1], kv[0]))),
            "kb_sent": round(worst.traffic.sent / 1024, 1),
            "kb_received": round(worst.traffic.received / 1024, 1),
        }
        if len(self.runs) > 1:
            out |= {
                "runs": len(self.runs),
                "seconds_each": [round(r.seconds, 3) for r in self.runs],
                "requests_each": [r.traffic.total for r in self.runs],
            }
        return json.dumps(out | self.extra)


async def timed(proxy: CountingProxy, work: Callable[[], Awaitable[_T]]) -> tuple[Run, _T]:
    """Wall-clock seconds and proxied traffic of ``work``."""
    with proxy.measure() as spent:
        started = time.perf_counter()
        result = await work()
        seconds = time.perf_counter() - started
    return Run(seconds, spent), result


# --- vdirsyncer -----------------------------------------------------------------------------------


def vdirsyncer_config(workdir: Path, server: DavServer, url_a: str, url_b: str) -> Path:
    """A pair of two caldav storages, each given as one collection's URL (``collections = null``)."""

    def storage(name: str, url: str) -> str:
        return (
            f'[storage {name}]\ntype = "caldav"\nurl = {json.dumps(url)}\n'
            f"username = {json.dumps(server.username)}\npassword = {json.dumps(server.password)}\n\n"
        )

    path = workdir / "vdirsyncer.conf"
    path.write_text(
        f"[general]\nstatus_path = {json.dumps(str(workdir / 'status'))}\n\n"
        '[pair bench]\na = "bench_a"\nb = "bench_b"\ncollections = null\n\n' + storage("bench_a", url_a) + storage("bench_b", url_b)
    )
    return path


def vdirsyncer_binary() -> str:
    beside = Path(sys.executable).parent / "vdirsyncer"
    found = str(beside) if beside.exists() else shutil.which("vdirsyncer")
    if not found:
        raise SystemExit("vdirsyncer is not installed: .venv/bin/pip install 'vdirsyncer==0.21.*' (the bench extra)")
    return found


async def run_vdirsyncer(config: Path, log: Path, *args: str) -> None:
    """One vdirsyncer command; its output goes to ``log``; a failure stops the benchmark."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    command = [vdirsyncer_binary(), "-c", str(config), *args]

    def run() -> subprocess.CompletedProcess[bytes]:
        with log.open("ab") as out:
            return subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=COMMAND_TIMEOUT, check=False
            )

    done = await asyncio.to_thread(run)
    if done.returncode != 0:
        raise RuntimeError(f"vdirsyncer {' '.join(args)} exited with {done.returncode}:\n{log.read_text()[-3000:]}")


def process_start_seconds() -> float:
    """What starting the vdirsyncer command costs before it does any work (``--version``)."""
    started = time.perf_counter()
    subprocess.run([vdirsyncer_binary(), "--version"], capture_output=True, check=True, timeout=60)
    return time.perf_counter() - started


async def bench_vdirsyncer(server: DavServer, proxy: CountingProxy, n: int, repeat: int, workdir: Path) -> list[Phase]:
    direct_a, direct_b = server.make_calendar("vdir-a"), server.make_calendar("vdir-b")
    practice = parse_config(yaml.safe_dump({"practice": {"timezone": ZONE}, "store": {"path": str(workdir / "unused.db")}}))
    ids = [new_canonical_id() for _ in range(n)]
    await upload(server, direct_a, [(resource_name(a), event_body(a, session(i), practice)) for i, a in enumerate(ids)])
    config = vdirsyncer_config(workdir, server, proxy.url + urlsplit(direct_a).path, proxy.url + urlsplit(direct_b).path)
    log = workdir / "vdirsyncer.log"
    start_cost = {"process_start_s": round(process_start_seconds(), 3)}

    discover, _ = await timed(proxy, lambda: run_vdirsyncer(config, log, "discover"))
    initial, _ = await timed(proxy, lambda: run_vdirsyncer(config, log, "sync"))
    copied = await member_count(server, direct_b)
    if copied != n:
        raise RuntimeError(f"vdirsyncer copied {copied} of {n} events")

    runs = []
    for moved in moved_sessions(ids, repeat):
        new_start = await move_event(server, direct_a + resource_name(moved), MOVE_BY)
        run, _ = await timed(proxy, lambda: run_vdirsyncer(config, log, "sync"))
        if await start_of(server, direct_b, uid_for(moved)) != new_start:
            raise RuntimeError("vdirsyncer's incremental sync did not carry the move to B")
        runs.append(run)
    return [
        Phase("vdirsyncer", "discover", [discover], start_cost),
        Phase("vdirsyncer", "initial", [initial], start_cost | {"events_in_b": copied}),
        Phase("vdirsyncer", "incremental", runs, start_cost | {"moves_arrived": len(runs)}),
    ]


def moved_sessions(ids: list[str], repeat: int) -> list[str]:
    """The sessions a calendar user moves, one per incremental run, from the middle of the list."""
    middle = len(ids) // 2
    return ids[middle : middle + repeat]


# --- syncbridge -----------------------------------------------------------------------------------


def syncbridge_config(workdir: Path, server: DavServer, proxy_url: str, url_a: str, url_b: str) -> PracticeConfig:
    """One clinician mapped to two CalDAV connectors, both reaching Radicale through the proxy."""
    connector = {"type": "caldav", "url": proxy_url + "/", "username": server.username, "password": {"env": SECRET_ENV}}
    via = lambda url: proxy_url + urlsplit(url).path  # noqa: E731
    return parse_config(
        yaml.safe_dump(
            {
                "practice": {"timezone": ZONE},
                "store": {"path": str(workdir / "syncbridge.db")},
                "clinicians": {CLINICIAN: {"accounts": {"cal_a": {"calendar": via(url_a)}, "cal_b": {"calendar": via(url_b)}}}},
                "connectors": {"cal_a": connector, "cal_b": connector},
            }
        )
    )


async def drain_all(outbox: Outbox) -> None:
    """Drain until nothing is due (one drain call covers at most its round limit)."""
    while outbox.store.outbox_due(float("inf"), 1):
        report = await outbox.drain()
        if report.applied == 0 and report.skipped == 0:
            raise RuntimeError(f"the outbox makes no progress: {report}")


async def bench_syncbridge(server: DavServer, proxy: CountingProxy, n: int, repeat: int, workdir: Path) -> list[Phase]:
    direct_a, direct_b = server.make_calendar("sb-a"), server.make_calendar("sb-b")
    os.environ[SECRET_ENV] = server.password or ""
    log = (workdir / "syncbridge.log").open("a")
    configure_logging("info", json_logs=True, stream=log)  # as the daemon logs, to a file
    cfg = syncbridge_config(workdir, server, proxy.url, direct_a, direct_b)
    store = Store(cfg.store.path)
    connectors = build_connectors(cfg)
    engine = Engine(store, connectors, cfg)
    outbox = Outbox(engine)
    try:
        ids = [new_canonical_id() for _ in range(n)]
        for i, appt_id in enumerate(ids):
            engine.change(appt_id, session(i), via="bench-record")

        phases = []
        initial, _ = await timed(proxy, lambda: drain_all(outbox))
        counts = {"events_in_a": await member_count(server, direct_a), "events_in_b": await member_count(server, direct_b)}
        if set(counts.values()) != {n}:
            raise RuntimeError(f"syncbridge wrote {counts}, expected {n} in each")
        phases.append(Phase("syncbridge", "initial", [initial], counts))

        async def first_pulls() -> None:
            for name in ("cal_a", "cal_b"):
                report = await engine.sync(name)
                if report.updated or report.created:
                    raise RuntimeError(f"the first pull of {name} changed sessions: {report}")

        cursors, _ = await timed(proxy, first_pulls)
        phases.append(Phase("syncbridge", "cursors", [cursors]))

        incremental_runs, poll_runs = [], []
        for moved in moved_sessions(ids, repeat):
            link = store.link("cal_a", moved)
            assert link is not None and link.external_id
            new_start = await move_event(server, server.base_url + link.external_id, MOVE_BY)

            async def incremental() -> tuple[int, int]:
                report = await engine.sync("cal_a")
                applied = await outbox.drain()
                return report.updated, applied.applied

            run, (updated, applied) = await timed(proxy, incremental)
            arrived = await start_of(server, direct_b, uid_for(moved)) == new_start
            if not (updated == 1 and applied == 1 and arrived):
                raise RuntimeError(f"the move did not travel: {updated} updated, {applied} applied, arrived in B': {arrived}")
            incremental_runs.append(run)
            run, echo = await timed(proxy, lambda: engine.sync("cal_b"))
            if echo.echoes != 1 or echo.updated:
                raise RuntimeError(f"polling B' after the move should find one echo and change nothing: {echo}")
            poll_runs.append(run)
        phases.append(Phase("syncbridge", "incremental", incremental_runs, {"moves_arrived": len(incremental_runs)}))
        phases.append(Phase("syncbridge", "poll_b_after_move", poll_runs, {"echoes_each": 1}))
        return phases
    finally:
        for connector in connectors.values():
            await connector.close()
        store.close()
        log.close()


# --- main -----------------------------------------------------------------------------------------


async def run(n: int, repeat: int, workdir: Path) -> None:
    server = start_radicale(workdir / "radicale")
    proxy = CountingProxy(server.base_url)
    try:
        proxy.start()
        for bench in (bench_vdirsyncer, bench_syncbridge):
            for phase in await bench(server, proxy, n, repeat, workdir):
                print(phase.line(), flush=True)
    finally:
        proxy.stop()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5, help="incremental runs, each after moving another event")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, store, Radicale's data)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sb-caldav-bench-"))
    try:
        asyncio.run(run(args.events, args.repeat, workdir))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
