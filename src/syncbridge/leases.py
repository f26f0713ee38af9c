"""Which connectors (and practice-wide jobs) this worker works on, by leases held in the store.

Several ``syncbridge run`` workers may share one PostgreSQL database. Each connector is pulled,
written to and maintained by the one worker holding its lease; practice-wide jobs (availability
publishing, audit anchors, resuming bulk operations, confirming directory bookings) by the holder
of :data:`PRACTICE_JOBS`. A lease is a row with an expiry (``Store.lease_claim``): a worker renews
what it holds every ``ttl / 3`` seconds in one statement, and a worker that stops renewing (killed,
cut off from the database) loses everything once it expires; the others look every
:data:`TICK` seconds, so its work is taken over within ``ttl`` plus a tick.

Connectors are shared out evenly: each worker holds at most its share (the connectors over the
live workers, rounded up; each live worker keeps a heartbeat lease ``worker:NAME``), claims free or
expired ones up to it, and gives back one idle connector a tick while it holds more, or more than
the share rounded down while another worker holds less than that (a worker joining takes its part
within a few ticks). The practice's jobs are light and not counted in the share: whichever worker
finds their lease free takes it, so three workers and three connectors put one connector on each.

On SQLite there is one worker (the store's file lock), which holds everything: no lease is
written. A pull is leased per connector, not per account: a connector's cursor is one record
holding every account's position, so two workers pulling two accounts of one connector would
write it over each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence

import structlog

from .store import Store

__all__ = ["PRACTICE_JOBS", "TICK", "Leases"]

log = structlog.get_logger("syncbridge.leases")

#: the lease of the jobs run once for the whole practice
PRACTICE_JOBS = "job:practice"
#: seconds between looks at the leases (claims of free or expired ones, notifications stored by other workers)
TICK = 1.0
#: a lease is treated as lost this long before it expires (the work started under it must finish
#: its store transaction before another worker may begin)
MARGIN = 0.1


class Leases:
    """This worker's leases; ``store`` None or a SQLite store: the only worker, holding everything."""

    def __init__(self, store: Store, worker: str, ttl: float, names: Sequence[str]) -> None:
        self.store, self.worker, self.ttl = store, worker, ttl
        self.names = list(names)
        #: the only worker (SQLite): everything is held, nothing is written
        self.single = store.engine != "postgresql"
        #: name -> when our lease on it runs out (the expiry we last wrote)
        self._held: dict[str, float] = {}
        self._renewed = 0.0
        #: called with each name this worker starts holding (a pull, its notifications, its channels)
        self.gained: list[Callable[[str], None]] = []
        #: whether the worker is working on a name right now (a pull in flight): it is not given back then
        self.busy: Callable[[str], bool] = lambda _name: False

    def holds(self, name: str) -> bool:
        """Whether this worker may work on ``name`` now."""
        return self.single or self._held.get(name, 0.0) - MARGIN > time.time()

    def held(self) -> list[str]:
        return sorted(self.names) if self.single else sorted(n for n in self._held if self.holds(n))

    def set_names(self, names: Sequence[str]) -> None:
        """The connectors changed (a reload): leases of names no longer configured are given back."""
        gone = [n for n in self._held if n not in names]
        self.names = list(names)
        if gone and not self.single:
            self.store.lease_release(self.worker, gone)
            for n in gone:
                self._held.pop(n, None)

    def tick(self) -> list[str]:
        """Renew (every ttl/3), claim up to this worker's share, give back one idle lease beyond it;
        returns the names gained."""
        if self.single:
            return []
        now = time.time()
        until = now + self.ttl
        if now - self._renewed >= self.ttl / 3:
            self.store.lease_renew(self.worker, until, now)
            self._renewed = now
            self._held = {n: until for n, t in self._held.items() if t > now}
        self.store.lease_beat(self.worker, until)
        rows = self.store.leases()
        live = {holder for name, holder, t in rows if name.startswith("worker:") and holder and t >= now} | {self.worker}
        mine = {name: t for name, holder, t in rows if holder == self.worker and t >= now and name in self.names}
        lost = [n for n in self._held if n in self.names and n not in mine]
        for n in lost:
            log.warning("lease_lost", worker=self.worker, lease=n)
        self._held = dict(mine)
        # the connectors are shared out; the practice's jobs are light and go to whoever finds them free
        work = [n for n in self.names if n != PRACTICE_JOBS]
        share, least = math.ceil(len(work) / len(live)), len(work) // len(live)
        counts = dict.fromkeys(live, 0)
        for name, holder, t in rows:
            if holder in counts and t >= now and name in work:
                counts[holder] += 1
        held_work = [n for n in mine if n != PRACTICE_JOBS]
        gained: list[str] = []
        if len(held_work) < share:
            gained = self.store.lease_claim(self.worker, work, share - len(held_work), now, until)
        if PRACTICE_JOBS in self.names and PRACTICE_JOBS not in mine:
            gained += self.store.lease_claim(self.worker, [PRACTICE_JOBS], 1, now, until)
        for n in gained:
            self._held[n] = until
        if len(held_work) > share or len(held_work) > least and min(counts.values()) < least:
            idle = [n for n in sorted(held_work) if not self.busy(n)]
            if idle:
                self.store.lease_release(self.worker, [idle[-1]])
                self._held.pop(idle[-1], None)
                log.info("lease_given_back", worker=self.worker, lease=idle[-1], workers=len(live))
        if gained:
            log.info("lease_taken", worker=self.worker, leases=gained, workers=len(live))
            for name in gained:
                for call in self.gained:
                    call(name)
        return gained

    async def run(self, stopping: asyncio.Event, every: Callable[[], None] | None = None) -> None:
        """Tick until ``stopping``; ``every`` runs after each tick (a look at the shared inbox).
        A failing tick (the database unreachable) is logged; the leases then run out by themselves."""
        if self.single:
            return
        while not stopping.is_set():
            try:
                self.tick()  # on the loop's thread: the store's connection is not shared with another thread
                if every is not None:
                    every()
            except Exception as err:
                log.warning("lease_tick_failed", worker=self.worker, problem=str(err)[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=TICK)

    def release_all(self) -> None:
        """A clean stop: hand everything over at once (claimed writes included), not after the expiry."""
        if not self.single:
            self.store.lease_release(self.worker)
            self._held.clear()
