"""`syncbridge run` as a real process, the way systemd starts it, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]


class DaemonProcess:
    def __init__(self, tmp: Path, conf: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.tmp, self.path, self.log = tmp, tmp / "config.yaml", tmp / "daemon.log"
        self.write(conf)
        self.port = conf["http"]["port"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncbridge.cli", "run", "--config", str(self.path)],
            cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)} | (env or {}),
            stdout=subprocess.DEVNULL, stderr=self.log.open("ab"),
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_for(lambda: self.get("/healthz").status_code == 200, 20)

    def write(self, conf: dict[str, Any] | str) -> None:
        """Replace the config in one step: a CLI command may be reading it at that moment (a file
        truncated and then rewritten in place reads, for an instant, as empty)."""
        staged = self.path.with_suffix(".yaml.new")
        staged.write_text(conf if isinstance(conf, str) else yaml.safe_dump(conf))
        os.replace(staged, self.path)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        try:
            return httpx.get(self.url + path, timeout=5, **kw)
        except httpx.TransportError:
            return httpx.Response(599)

    def wait_for(self, predicate: Callable[[], object], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)
