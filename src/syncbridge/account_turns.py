"""Due writes handed out account by account, for vendors that limit calls per account.

A connector with ``account_concurrency`` (a mailbox, a user's calendar) gets each call for one
account only, and the accounts take turns. The writes are read from the store a few per account
in one query (the queue may hold one clinician's whole initial sync before the next one's) and
kept here between reads, so a call that answers hands its turn on without another query.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Container, Mapping

from .store import OutboxItem, Store

__all__ = ["AccountTurns"]


class AccountTurns:
    """One connector's due writes per account, refreshed from the store at most every ``refresh`` seconds
    (or sooner, once every account's share was handed out)."""

    def __init__(
        self, store: Store, connector: str, *, size: int, per_account: int, refresh: float = 0.5, lease_seconds: float = 25.0,
    ) -> None:
        self.store, self.connector, self.size, self.per_account, self.refresh = store, connector, size, per_account, refresh
        #: how long the writes read stay this worker's (several workers on PostgreSQL claim them)
        self.lease_seconds = lease_seconds
        #: writes read per account: enough for every call the account may have in flight, twice over
        self.depth = max(size * per_account * 2, 4)
        self._queues: dict[str, deque[OutboxItem]] = {}
        self._order: deque[str] = deque()
        self._read_at = float("-inf")

    def due(self) -> bool:
        """Whether it is time to read the store again."""
        return not self._queues or time.monotonic() - self._read_at >= self.refresh

    def read(self, skip: Container[str], skip_sends: Mapping[str, int], max_sends: int) -> bool:
        """Read the due writes again (leaving out those in flight or sent too often); False if none."""
        self._read_at = time.monotonic()
        clock = time.time()
        items = self.store.claim_writes_per_account(self.store.worker, self.connector, self.depth, clock, clock + self.lease_seconds)
        queues: dict[str, deque[OutboxItem]] = {}
        for item in items:
            if item.appointment_id in skip or skip_sends.get(item.appointment_id, 0) >= max_sends:
                continue
            queues.setdefault(item.account or "", deque()).append(item)
        self._queues = queues
        self._order = deque(a for a in self._order if a in queues)
        self._order.extend(a for a in queues if a not in set(self._order))
        return bool(queues)

    def take(self, busy: Mapping[str, int]) -> list[OutboxItem] | None:
        """The next call's writes: ``size`` of the next account (in turn) with a call to spare; None
        when every account with writes has its calls in flight."""
        for _ in range(len(self._order)):
            account = self._order[0]
            self._order.rotate(-1)
            queue = self._queues.get(account)
            if not queue or busy.get(account, 0) >= self.per_account:
                continue
            chunk = [queue.popleft() for _ in range(min(self.size, len(queue)))]
            if not queue:
                del self._queues[account]
            return chunk
        return None
