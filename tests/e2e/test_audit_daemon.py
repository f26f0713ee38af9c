"""The daemon anchors its audit log outside the store, and the anchors verify the log it leaves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from syncbridge.anchors import read_anchors
from syncbridge.emulation import free_port
from tests.e2e.test_daemon import config, seed, synced
from tests.support.daemon import ROOT, DaemonProcess
from tests.support.replica import ReplicaVendor

pytestmark = pytest.mark.slow


def test_daemon_anchors_and_verify_uses_them(tmp_path: Path) -> None:
    """Anchors go to the anchor file and the journal while the daemon runs and at shutdown;
    `audit --verify` checks the log against them with the key."""
    seed(tmp_path, 3)
    (tmp_path / "audit-key").write_text("k3y-only-systemd-knows")
    conf = config(tmp_path, free_port())
    conf["http"].pop("token")
    conf["audit"] = {"key": {"file": str(tmp_path / "audit-key")}, "anchor_file": str(tmp_path / "anchors.log"), "anchor_interval": 1}
    d = DaemonProcess(tmp_path, conf)
    try:
        d.wait_for(lambda: synced(tmp_path, 3), 30)
        d.wait_for(lambda: (tmp_path / "anchors.log").exists(), 10)
        ext = sorted(e["external_id"] for e in asyncio.run(ReplicaVendor(str(tmp_path / "cal.db")).live()))[0]
        asyncio.run(ReplicaVendor(str(tmp_path / "cal.db")).delete(ext))
    finally:
        assert d.stop() == 0
    anchors = read_anchors((tmp_path / "anchors.log").read_text().splitlines())
    journal = read_anchors(d.log.read_text().splitlines())
    assert anchors and all(a.mac for a in anchors) and anchors[-1] == journal[-1]
    done = subprocess.run([sys.executable, "-m", "syncbridge.cli", "audit", "--verify", "--config", str(d.path)], cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "key checked" in done.stdout, done.stdout + done.stderr
