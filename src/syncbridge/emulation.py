"""Running a connector's emulator (an ASGI app) on loopback in a background thread.

Emulators are used by the tests, the benchmarks and ``syncbridge demo``; each binds 127.0.0.1 on
a free port behind an :class:`Injector`, which counts requests and can add latency and the
failures vendors produce (429 and 503 with Retry-After, 500, and an answer lost after the
request took effect), and can take the whole system down (:meth:`Injector.outage`: the port closes,
connections are refused, the data is kept), so chaos tests and benchmarks treat every system alike. A real server
(Radicale) gets the same treatment through :func:`reverse_proxy`. Tests script failures too: the
next requests (:meth:`Injector.fail_next`) or every request under a path (:meth:`Injector.fail_path`,
one account: a calendar, a mailbox) answer a status, with Retry-After when given.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

__all__ = ["PERSON_HEADER", "Injector", "RunningServer", "calls_by_kind", "free_port", "reverse_proxy", "serve_in_thread"]

_Scope = dict[str, Any]
_FAILURES = ("429", "503", "500", "lost")
#: requests a sandbox makes as a *person* using the system carry this header: they are not the
#: daemon's API calls, so they are neither counted nor delayed nor failed
PERSON_HEADER = "x-sandbox-person"
_PERSON = PERSON_HEADER.encode()


class Injector:
    """ASGI middleware: request counting, latency and vendor-like failures on a share of requests."""

    def __init__(self, app: Any, seed: int | None = None) -> None:
        self.app = app
        self.latency = 0.0
        self.error_rate = 0.0
        self.requests = 0
        self.failures: Counter[str] = Counter()
        self.by_method: Counter[str] = Counter()
        self._rng = random.Random(seed)
        #: closes (True) or reopens (False) the listening port; set by :func:`serve_in_thread`
        self.switch: Any = None
        self.down = False
        self._next: list[tuple[int, float | None]] = []
        self._paths: dict[str, tuple[int, float | None]] = {}

    def outage(self, down: bool) -> None:
        """Stop answering at all, as a stopped process does (connection refused), or come back with
        everything the system held."""
        if down != self.down and self.switch is not None:
            self.switch(down)
            self.down = down

    def fail_next(self, status: int, n: int = 1, retry_after: float | None = None) -> None:
        """The next ``n`` requests answer ``status`` (429 throttling, 5xx), with Retry-After when given."""
        self._next.extend([(status, retry_after)] * n)

    def fail_path(self, prefix: str, status: int | None, retry_after: float | None = None) -> None:
        """Every request whose path starts with ``prefix`` (one calendar, one mailbox) answers
        ``status`` until called again with None."""
        if status is None:
            self._paths.pop(prefix, None)
        else:
            self._paths[prefix] = (status, retry_after)

    def _scripted(self, path: str) -> tuple[int, float | None] | None:
        """The failure a test asked for this request, if any."""
        if self._next:
            return self._next.pop(0)
        return next((f for prefix, f in self._paths.items() if path.startswith(prefix)), None)

    def configure(self, *, latency: float = 0.0, error_rate: float = 0.0) -> None:
        self.latency, self.error_rate = latency, error_rate

    def reset_counts(self) -> None:
        self.requests = 0
        self.failures.clear()
        self.by_method.clear()

    def fault(self) -> str | None:
        """The failure this call gets at ``error_rate`` ("429", "503", "500" or "lost"), counted; mostly None.

        Also decided per part of a vendor batch request, where each part fails on its own.
        """
        if not self.error_rate or self._rng.random() >= self.error_rate:
            return None
        kind = self._rng.choice(_FAILURES)
        self.failures[kind] += 1
        return kind

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or any(k == _PERSON for k, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        self.requests += 1
        self.by_method[scope["method"]] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        scripted = self._scripted(scope["path"])
        if scripted is not None:
            await _answer(send, *scripted)
            return
        kind = self.fault()
        if kind is None:
            await self.app(scope, receive, send)
            return
        if kind == "lost":  # the request takes effect, the answer never arrives (a proxy gives up)
            async def swallow(message: dict[str, Any]) -> None:
                return None

            await self.app(scope, receive, swallow)
            await _answer(send, 504, None, b"upstream answer lost")
            return
        status = int(kind)
        await _answer(send, status, 1.0 if status in (429, 503) else None)


async def _answer(send: Any, status: int, retry_after: float | None, body: bytes = b"injected failure") -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", f"{retry_after:g}".encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def reverse_proxy(upstream: str) -> Any:
    """An ASGI app passing every request to ``upstream`` (a real test server behind an Injector)."""
    hop = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"content-encoding", b"host"}
    client = httpx.AsyncClient(base_url=upstream, timeout=60)

    async def app(scope: _Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope.get("raw_path") or scope["path"].encode()
        url = path.decode() + ("?" + scope["query_string"].decode() if scope.get("query_string") else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in hop]
        r = await client.request(scope["method"], url, headers=headers, content=body)
        out = [(k.encode(), v.encode()) for k, v in r.headers.items() if k.lower().encode() not in hop]
        out.append((b"content-length", str(len(r.content)).encode()))
        await send({"type": "http.response.start", "status": r.status_code, "headers": out})
        await send({"type": "http.response.body", "body": r.content})

    return app


@dataclass
class RunningServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    injector: Injector = field(default_factory=lambda: Injector(None))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int | None = None, **uvicorn_options: Any) -> RunningServer:
    """Start ``app`` behind an :class:`Injector` on ``port`` (a free one by default); returns once it
    accepts connections. ``uvicorn_options`` pass TLS settings (``ssl_certfile``...) through."""
    port = port or free_port(host)
    injector = Injector(app)
    server, thread = _start(injector, host, port, uvicorn_options)
    scheme = "https" if uvicorn_options.get("ssl_certfile") else "http"
    running = RunningServer(f"{scheme}://{host}:{port}", server, thread, injector)

    def switch(down: bool) -> None:
        if down:
            running.stop()
        else:
            running.server, running.thread = _start(injector, host, port, uvicorn_options)

    injector.switch = switch
    return running


def _start(injector: Injector, host: str, port: int, uvicorn_options: dict[str, Any]) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(
        uvicorn.Config(injector, host=host, port=port, log_config=None, lifespan="off", access_log=False, **uvicorn_options)
    )

    def run() -> None:  # off the main thread uvicorn installs no signal handlers
        asyncio.run(server.serve())

    thread = threading.Thread(target=run, name=f"emulator:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"emulator on {host}:{port} did not start")
        time.sleep(0.02)
    return server, thread


_ID_LIKE = re.compile(r"[0-9@%]|^[A-Za-z0-9_-]{20,}$")


def calls_by_kind(log: Iterable[tuple[str, str]]) -> dict[str, int]:
    """An emulator's request log as counts by kind: the method and the path with its ids left out
    (``DELETE /calendar/v3/calendars/{id}/events/{id}``), so benchmarks can say which calls a change costs."""
    out: Counter[str] = Counter()
    for method, path in list(log):
        shape = "/".join("{id}" if _ID_LIKE.search(part) else part for part in path.split("/"))
        out[f"{method} {shape}"] += 1
    return dict(out)
