"""Benchmark: the Zocdoc connector against its emulator on loopback.

    .venv/bin/python bench/zocdoc_sync.py --appointments 5000 --webhooks 50

Measures (1) a full listing of N appointments, which the API caps at 1,000 results per query,
so the connector walks windows of modification time: seconds and requests; (2) an incremental
pull after 100 client cancellations (``overlap_seconds: 0``: the N bookings are packed into
a second or two, so the default 120 s re-read window would cover all of them, which a practice's
real change rate never does); (3) webhook round trips: a client cancels in Zocdoc, the
emulator signs and POSTs the event, the connector's route verifies it and hands it to the host
(median and worst time from the cancel to the persisted event); (4) the HTTP time of one
connector-side cancel (``apply``: read, cancel, read back).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from starlette.applications import Starlette
from starlette.routing import Route

from syncbridge.config import parse_config
from syncbridge.connector import Host, Link
from syncbridge.emulation import serve_in_thread
from syncbridge.registry import build_connectors
from syncbridge_connectors.zocdoc.emulator import ZocdocEmulator, running

PROVIDER, LOCATION, ZONE = "pr_bench-1", "lo_bench-1", "America/New_York"


class TimedHost(Host):
    def __init__(self) -> None:
        super().__init__(public_url="https://bench.invalid/webhooks/zocdoc")
        self.times: list[float] = []

    def accept_webhook(self, headers, body) -> None:  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter())
        super().accept_webhook(headers, body)


def _requests(emulator: ZocdocEmulator) -> int:
    return sum(1 for m, p in emulator.log if (m, p) == ("GET", "/v1/appointments"))


async def main(n: int, hooks: int) -> None:
    server = running(ZocdocEmulator(client_id="bench", client_secret="bench-secret"))
    emu = server.emulator
    emu.add_provider(PROVIDER, LOCATION, ZONE)
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    os.environ["BENCH_ZD_SECRET"], os.environ["BENCH_ZD_KEY"] = "bench-secret", key
    tmp = Path(tempfile.mkdtemp(prefix="zocdoc-bench-"))
    cfg = parse_config(yaml.safe_dump({
        "practice": {"timezone": ZONE}, "store": {"path": str(tmp / "b.db")},
        "clinicians": {"dr_bench": {"accounts": {"zocdoc": {"provider_id": PROVIDER, "location_id": LOCATION}}}},
        "connectors": {"zocdoc": {"type": "zocdoc", "environment": "sandbox", "base_url": server.base_url, "token_url": server.token_url,
                                  "client_id": "bench", "client_secret": {"env": "BENCH_ZD_SECRET"},
                                  "webhook_secret": {"env": "BENCH_ZD_KEY"}, "overlap_seconds": 0}},
    }))
    conn = build_connectors(cfg)["zocdoc"]
    host = TimedHost()
    conn.host = host
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    ids = [emu.book(PROVIDER, LOCATION, start + timedelta(minutes=5 * i)) for i in range(n)]

    t0 = time.perf_counter()
    full = await conn.pull(None)
    full_s = time.perf_counter() - t0
    full_req = _requests(emu)
    assert len(full.observations) == n, len(full.observations)

    for ext in ids[:100]:
        emu.patient_cancel(ext)
    before = _requests(emu)
    t0 = time.perf_counter()
    inc = await conn.pull(full.cursor)
    inc_s = time.perf_counter() - t0
    inc_req = _requests(emu) - before
    assert sum(1 for o in inc.observations if o.fields.get("status") == "cancelled") == 100

    [route] = conn.webhook_routes()
    receiver = serve_in_thread(Starlette(routes=[Route(route.path, route.handler, methods=list(route.methods))]))
    emu.sender.register(receiver.url + route.path, key)
    lat: list[float] = []
    for ext in ids[100:100 + hooks]:
        seen = len(host.times)
        t0 = time.perf_counter()
        emu.patient_cancel(ext)
        emu.sender.wait_idle()
        assert len(host.times) == seen + 1
        lat.append(host.times[-1] - t0)
    receiver.stop()

    applies: list[float] = []
    for ext in ids[200:220]:
        obs = await conn.read(ext)
        link = Link("zocdoc", "sb-bench", ext, obs.etag, obs.fields)
        record = {"by": "client", "kind": "cancel", "fee": "none", "clinical": False, "reason": None, "at": None, "via": "bench"}
        t0 = time.perf_counter()
        await conn.apply("sb-bench", obs.fields | {"status": "cancelled", "cancellation": record}, link)
        applies.append(time.perf_counter() - t0)
    await conn.close()
    server.stop()

    print(f"python {sys.version.split()[0]}, {n} appointments")
    print(f"full listing: {full_s:.2f} s, {full_req} GET /v1/appointments ({n / full_s:,.0f} appointments/s)")
    print(f"incremental after 100 cancels: {inc_s:.3f} s, {inc_req} requests")
    print(f"webhook cancel -> verified and persisted: median {statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms ({hooks} events)")
    print(f"apply cancel (read, cancel, read back): median {statistics.median(applies) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appointments", type=int, default=5000)
    parser.add_argument("--webhooks", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.appointments, args.webhooks))
