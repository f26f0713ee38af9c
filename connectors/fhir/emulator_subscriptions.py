"""R4 rest-hook Subscriptions for the FHIR emulator (https://hl7.org/fhir/R4/subscription.html).

What the emulator does, following that page: a Subscription created with ``status: requested``
is set ``active`` by the server (2.46.7 "Subscription Statuses"); when a resource matching its
``criteria`` is created or updated, the server POSTs to ``channel.endpoint`` with each
``channel.header`` line as an HTTP header; without ``channel.payload`` the POST has no body and
the client searches for what changed ("rest-hook ... If payload is not present, then there is no
payload in the notification, just a notification"). A delivery that fails is retried a few
times, then the Subscription is set to ``error`` with the reason in ``Subscription.error``
(2.46.7.3 "Errors"). Only the resource type of ``criteria`` is matched here; search parameters
in it are accepted and not evaluated (the connector filters by practitioner itself).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

__all__ = ["RestHookNotifier"]


class RestHookNotifier:
    def __init__(self, on_error: Callable[[str, str], None]) -> None:
        self._queue: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._on_error = on_error
        self.sent: list[str] = []  # endpoints notified, for tests

    def changed(self, rtype: str, subscriptions: Iterable[dict[str, Any]]) -> None:
        for sub in subscriptions:
            criteria = str(sub.get("criteria", ""))
            channel = sub.get("channel", {})
            if sub.get("status") != "active" or criteria.partition("?")[0] != rtype or channel.get("type") != "rest-hook":
                continue
            headers = {}
            for line in channel.get("header", []):
                name, _, value = str(line).partition(":")
                headers[name.strip()] = value.strip()
            self._queue.put((str(sub["id"]), headers, str(channel.get("endpoint", "")).encode()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fhir-rest-hook", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while True:
                sub_id, headers, endpoint = self._queue.get()
                problem = ""
                for attempt in range(3):
                    try:
                        r = client.post(endpoint.decode(), headers=headers, content=b"")
                        if r.status_code < 300:
                            self.sent.append(endpoint.decode())
                            problem = ""
                            break
                        problem = f"endpoint answered {r.status_code}"
                    except httpx.HTTPError as err:
                        problem = f"endpoint unreachable: {type(err).__name__}"
                    time.sleep(0.2 * (attempt + 1))
                if problem:
                    self._on_error(sub_id, problem)
