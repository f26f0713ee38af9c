"""What the Google connector remembers of its own writes, so their echoes cost no API call.

Google's push messages name the calendar (the channel) but never the event
(https://developers.google.com/workspace/calendar/api/guides/push), so a notification caused by
our own write cannot be told apart by content. :class:`EchoCredits` keeps, per calendar, one
short-lived credit per write we sent there; a notification for that calendar that finds a live
credit consumes it and is our echo. A notification Google drops or merges leaves a credit unused
until it expires: an outside change notified within that window waits for the next poll.

:class:`KnownEtags` remembers the last etag we wrote or read per session event, so a listing
(which asks Google for times only) reads an event's text (its tags) only when someone else
changed it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["EchoCredits", "KnownEtags"]


class EchoCredits:
    """Per calendar, the expiry times of the notifications our own writes will cause.

    Thread-safe: writes run in worker threads, notifications arrive on the web server's loop.
    A credit is granted before the write is sent (Google may notify before it answers) and
    withdrawn when Google refused the write (nothing changed, nothing will be notified).
    """

    def __init__(self, window: float, *, limit: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._limit = limit
        self._clock = clock
        self._credits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _live(self, calendar: str, now: float) -> deque[float]:
        queue = self._credits.setdefault(calendar, deque(maxlen=self._limit))
        while queue and queue[0] <= now:
            queue.popleft()
        return queue

    def expect(self, calendar: str) -> None:
        """A write to ``calendar`` is about to be sent."""
        if self.window <= 0:
            return
        with self._lock:
            now = self._clock()
            self._live(calendar, now).append(now + self.window)

    def withdraw(self, calendar: str) -> None:
        """The write was refused or failed: Google will not notify it (a lost answer costs one pull)."""
        with self._lock:
            queue = self._credits.get(calendar)
            if queue:
                queue.pop()

    def consume(self, calendar: str) -> bool:
        """True when a notification for ``calendar`` is the echo of one of our writes (the credit is used)."""
        with self._lock:
            queue = self._live(calendar, self._clock())
            if not queue:
                return False
            queue.popleft()
            return True

    def pending(self, calendar: str) -> int:
        with self._lock:
            return len(self._live(calendar, self._clock()))


class KnownEtags:
    """external id -> last etag we wrote or read, least recently used dropped beyond ``limit``.

    A forgotten event only costs one text read (events.get) the next time a listing shows it.
    """

    def __init__(self, limit: int = 50_000) -> None:
        self._limit = limit
        self._etags: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def knows(self, external_id: str, etag: str | None) -> bool:
        with self._lock:
            known = self._etags.get(external_id)
            if known is None or known != etag:
                return False
            self._etags.move_to_end(external_id)
            return True

    def note(self, external_id: str, etag: str | None) -> None:
        with self._lock:
            if etag is None:
                self._etags.pop(external_id, None)
                return
            self._etags[external_id] = etag
            self._etags.move_to_end(external_id)
            while len(self._etags) > self._limit:
                self._etags.popitem(last=False)

    def __len__(self) -> int:
        return len(self._etags)
