"""Running a connector's emulator (an ASGI app) on loopback in a background thread.

Emulators are used by the tests and by ``syncbridge demo``; each binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

__all__ = ["RunningServer", "free_port", "serve_in_thread"]


@dataclass
class RunningServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int | None = None) -> RunningServer:
    """Start ``app`` on ``port`` (a free one by default); returns once it accepts connections."""
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off", access_log=False))

    def run() -> None:  # off the main thread uvicorn installs no signal handlers
        asyncio.run(server.serve())

    thread = threading.Thread(target=run, name=f"emulator:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"emulator on {host}:{port} did not start")
        time.sleep(0.02)
    return RunningServer(f"http://{host}:{port}", server, thread)
