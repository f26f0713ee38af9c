"""`syncbridge run` as a process: HTTP endpoints, SIGHUP reloads, SIGTERM mid-sync."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from syncbridge.emulation import free_port
from syncbridge.store import Store
from tests.support.daemon import DaemonProcess
from tests.support.replica import ReplicaVendor

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "status-token-for-tests"


def config(tmp: Path, port: int, latency: float = 0.0, poll: float = 0.3) -> dict:
    return {
        "practice": {"name": "Lakeside Therapy"},
        "store": {"path": str(tmp / "store.db")},
        "clinicians": {"dr_lee": {"display_name": "Dr. Lee", "accounts": {"cal": {}}}},
        "connectors": {
            "ehr": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp / "ehr.db"), "role": "record", "poll_interval": poll, "latency": latency},
            "cal": {"type": "tests.support.replica:ReplicaConnector", "path": str(tmp / "cal.db"), "poll_interval": poll, "latency": latency},
        },
        "http": {"port": port, "token": {"env": "SB_STATUS_TOKEN"}},
    }


def seed(tmp: Path, n: int) -> ReplicaVendor:
    ehr = ReplicaVendor(str(tmp / "ehr.db"))
    start = datetime.now(UTC).replace(microsecond=0, second=0, minute=0) + timedelta(days=3)
    for i in range(n):
        asyncio.run(ehr.book(start + timedelta(hours=i), start + timedelta(hours=i, minutes=50), f"c{i}", clinician="dr_lee"))
    return ehr


def synced(tmp: Path, n: int) -> bool:
    store = Store(tmp / "store.db")
    try:
        return len(store.links_of("cal")) == n and not store.outbox_due(float("inf"), 1)
    finally:
        store.close()


def test_endpoints_and_status_page(tmp_path: Path) -> None:
    """Health is open; metrics and the status page need the token and show a cancellation and where it went."""
    seed(tmp_path, 4)
    d = DaemonProcess(tmp_path, config(tmp_path, free_port()), env={"SB_STATUS_TOKEN": TOKEN})
    try:
        d.wait_for(lambda: synced(tmp_path, 4), 30)
        assert d.get("/readyz").json()["ready"] is True
        assert d.get("/metrics").status_code == 401
        assert d.get("/").status_code == 401 and "Basic" in d.get("/").headers["www-authenticate"]
        assert d.get("/", auth=("admin", "wrong")).status_code == 401
        metrics = d.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert metrics.status_code == 200 and 'syncbridge_writes_total{connector="cal",result="applied"} 4.0' in metrics.text
        store = Store(tmp_path / "store.db")
        appt = store.appointments()[1]
        store.close()
        ext = Store(tmp_path / "store.db").link("cal", appt.id).external_id
        asyncio.run(ReplicaVendor(str(tmp_path / "cal.db")).delete(ext))

        def shows_cancellation() -> bool:
            page = d.get("/", auth=("admin", TOKEN)).text
            return "late cancel by client" in page or "cancel by client" in page

        d.wait_for(shows_cancellation, 20)
        d.wait_for(lambda: "ehr: applied" in d.get("/", auth=("admin", TOKEN)).text, 20)
        page = d.get("/", auth=("admin", TOKEN)).text
        assert "Lakeside Therapy" in page and "Dr. Lee" in page and "cal: removed" in page
        assert "c1" not in page  # client keys never appear
        assert d.get("/webhooks/cal/nothing").status_code == 404
        big = httpx.post(d.url + "/webhooks/cal/x", content=b"x" * (300 << 10), timeout=5)
        assert big.status_code in (404, 413)
    finally:
        assert d.stop() == 0


def test_sighup_reloads_good_config_and_keeps_old_on_bad(tmp_path: Path) -> None:
    """SIGHUP applies a valid new config; a broken one is refused and the daemon keeps running."""
    port = free_port()
    seed(tmp_path, 2)
    conf = config(tmp_path, port)
    d = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN})
    try:
        d.wait_for(lambda: synced(tmp_path, 2), 30)
        d.write("practice:\n  timezone: Mars/Olympus\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for(lambda: "reload_refused" in d.log.read_text(), 10)
        assert "Mars/Olympus" in d.log.read_text()
        assert d.get("/healthz").status_code == 200
        # still syncing with the old config
        seed_more = ReplicaVendor(str(tmp_path / "ehr.db"))
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=9)
        asyncio.run(seed_more.book(start, start + timedelta(minutes=50), "c9", clinician="dr_lee"))
        d.wait_for(lambda: synced(tmp_path, 3), 20)
        conf["practice"]["name"] = "Lakeside Therapy North"
        d.write(conf)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for(lambda: "Lakeside Therapy North" in d.get("/", auth=("admin", TOKEN)).text, 10)
    finally:
        assert d.stop() == 0


def test_sigterm_mid_sync_finishes_writes_and_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM while writes are in flight exits 0; a restart finishes the rest with nothing lost or doubled."""
    seed(tmp_path, 40)
    conf = config(tmp_path, free_port(), latency=0.05)
    d = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN})
    d.wait_for(lambda: len(Store(tmp_path / "store.db").links_of("cal")) >= 3, 30)
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 15
    assert "stopped" in d.log.read_text()
    assert "Traceback" not in d.log.read_text()  # the pulls cut short are not reported as failures
    store = Store(tmp_path / "store.db")
    assert store.verify_audit().ok
    store.close()
    d = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN})
    try:
        d.wait_for(lambda: synced(tmp_path, 40), 60)
    finally:
        assert d.stop() == 0
    items = ReplicaVendor(str(tmp_path / "cal.db")).all_items()
    assert len(items) == 40 and len({i["canonical_id"] for i in items}) == 40


def test_tells_systemd_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    """Under systemd (Type=notify) the daemon reports READY, pings the watchdog and says when it stops."""
    seed(tmp_path, 1)
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(15)
    conf = config(tmp_path, free_port())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(conf))
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncbridge.cli", "run", "--config", str(tmp_path / "config.yaml")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ | {"PYTHONPATH": str(ROOT), "SB_STATUS_TOKEN": TOKEN, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"},
    )
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        assert any("READY=1" in m for m in messages)
        assert any("WATCHDOG=1" in m for m in messages)
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_second_daemon_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """Two daemons on one store could write a change twice: the second refuses to start and names
    the first; once the first is gone (SIGKILLed, with no cleanup), a new one starts at once."""
    seed(tmp_path, 3)
    conf = config(tmp_path, free_port())
    first = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN})
    try:
        first.wait_for(lambda: synced(tmp_path, 3), 30)
        second = tmp_path / "second.yaml"
        second.write_text(yaml.safe_dump(conf | {"http": {"port": free_port()}}))
        done = subprocess.run(
            [sys.executable, "-m", "syncbridge.cli", "run", "--config", str(second)],
            cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=30,
        )
        assert done.returncode == 1
        assert f"another syncbridge daemon (pid {first.proc.pid}) is already running on the store {tmp_path / 'store.db'}" in done.stderr
        assert first.proc.poll() is None and first.get("/healthz").status_code == 200
        assert f"daemon: running (pid {first.proc.pid})" in status(first.path)
    finally:
        first.proc.kill()
        first.proc.wait()
    assert "daemon: not running" in status(first.path)
    again = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN})
    assert again.stop() == 0


def status(config_path: Path) -> str:
    """`syncbridge status` as an admin runs it."""
    return subprocess.run(
        [sys.executable, "-m", "syncbridge.cli", "status", "--config", str(config_path)],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=30, check=True,
    ).stdout


def test_sigterm_during_a_slow_pull_stops_quietly(tmp_path: Path) -> None:
    """A pull still waiting on a slow system when SIGTERM arrives is abandoned (it is read again at
    the next start), not reported in the journal as a failed job with a traceback."""
    seed(tmp_path, 2)
    d = DaemonProcess(tmp_path, config(tmp_path, free_port(), latency=3.0), env={"SB_STATUS_TOKEN": TOKEN})
    time.sleep(1.0)  # the first pulls have started and wait on the systems
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 15
    log = d.log.read_text()
    assert "stopped" in log
    assert "Traceback" not in log and "raised an exception" not in log, log[-2000:]


def test_a_system_failing_pull_after_pull_is_shown_unhealthy_until_it_recovers(tmp_path: Path) -> None:
    """One failed pull is weather; three in a row mark the connector unhealthy with the reason
    (status, /readyz, the journal), and the first good pull clears it."""
    seed(tmp_path, 2)
    conf = config(tmp_path, free_port())
    conf["connectors"]["ehr"]["fail_rate"] = 2.0  # every call of the EHR answers 503
    d = DaemonProcess(tmp_path, conf, env={"SB_STATUS_TOKEN": TOKEN})
    try:
        d.wait_for(lambda: d.get("/readyz").status_code == 503, 20)
        unhealthy = d.get("/readyz").json()["unhealthy"]
        assert list(unhealthy) == ["ehr"] and re.fullmatch(r"the last \d+ pulls failed: 503 injected", unhealthy["ehr"])
        shown = status(d.path)
        assert "UNHEALTHY: the last" in shown and "pulls failed: 503 injected" in shown
        assert '"problem": "503 injected"' in d.log.read_text()
        conf["connectors"]["ehr"]["fail_rate"] = 0.0  # the EHR is back
        d.write(conf)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for(lambda: d.get("/readyz").status_code == 200, 20)
        d.wait_for(lambda: synced(tmp_path, 2), 20)
    finally:
        assert d.stop() == 0
