"""Webhook delivery as Zocdoc does it, for the emulator (https://api-docs.zocdoc.com/guides/webhooks).

Each attempt is signed afresh: ``webhook-timestamp`` (unix seconds) and ``webhook-signature``
(``v1:<b64>;v2:<b64>``, HMAC-SHA256 over ``<timestamp>.<body>`` with each base64-issued key).
Retries use exponential backoff within a 48-hour window, and only after a transport failure or
no answer within 5 seconds: any HTTP answer, a 500 included, ends the delivery. The signing here
is written independently of the receiver in webhooks.py, so a mistake in one is not mirrored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import heapq
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["Delivery", "WebhookSender"]


@dataclass(frozen=True)
class Delivery:
    url: str
    attempt: int
    status: int | None
    error: str | None
    body: bytes


@dataclass
class WebhookSender:
    """A background queue of deliveries. ``url``/``keys`` are the registration Zocdoc holds."""

    url: str | None = None
    keys: dict[str, bytes] = field(default_factory=dict)
    retry_base: float = 1.0
    retry_window: float = 48 * 3600.0
    timeout: float = 5.0
    deliveries: list[Delivery] = field(default_factory=list)
    _heap: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _busy: int = 0
    _stopped: bool = False

    def register(self, url: str, key_b64: str, *, version: str = "v1", extra: dict[str, str] | None = None) -> None:
        """What the practice gives Zocdoc out of band: the receiving URL and the signing key(s)."""
        self.url = url
        self.keys = {version: base64.b64decode(key_b64)} | {v: base64.b64decode(k) for v, k in (extra or {}).items()}

    def send(self, url: str, keys: dict[str, bytes], event: dict[str, Any]) -> None:
        job = {"url": url, "keys": dict(keys), "body": json.dumps(event, separators=(",", ":")).encode(), "first": time.time(), "attempt": 0}
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="zocdoc-webhooks", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until nothing is queued or in flight (or ``timeout``); True when idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)

    @staticmethod
    def headers(keys: dict[str, bytes], body: bytes, timestamp: int) -> dict[str, str]:
        signed = str(timestamp).encode() + b"." + body
        sigs = ";".join(f"{v}:{base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()}" for v, k in keys.items())
        return {"content-type": "application/json", "webhook-timestamp": str(timestamp), "webhook-signature": sigs}

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as http:
            while True:
                with self._cond:
                    while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                        self._cond.wait(0.05 if not self._heap else max(0.0, min(0.05, self._heap[0][0] - time.monotonic())))
                    if self._stopped:
                        return
                    _, _, job = heapq.heappop(self._heap)
                    self._busy += 1
                try:
                    self._attempt(http, job)
                finally:
                    with self._cond:
                        self._busy -= 1
                        self._cond.notify_all()

    def _attempt(self, http: httpx.Client, job: dict[str, Any]) -> None:
        job["attempt"] += 1
        headers = self.headers(job["keys"], job["body"], int(time.time()))
        try:
            r = http.post(job["url"], content=job["body"], headers=headers)
        except httpx.TransportError as err:  # refused, reset, or no answer within the timeout: retried
            self.deliveries.append(Delivery(job["url"], job["attempt"], None, type(err).__name__, job["body"]))
            delay = self.retry_base * 2 ** (job["attempt"] - 1)
            if time.time() + delay - job["first"] <= self.retry_window:
                with self._cond:
                    heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), job))
            return
        self.deliveries.append(Delivery(job["url"], job["attempt"], r.status_code, None, job["body"]))
