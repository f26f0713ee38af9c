"""Converging each directory date to its wanted slots, by the rules of every other write.

A due date (``slot_states``, planned by :mod:`syncbridge.publisher`) whose directory may show
something other than what we last wrote (``verify``), while its wanted slots are those last
written, is looked at first: one read, and a write only when they differ. Any other due date is
written: one request replacing the date's slots. Errors follow DESIGN section 9 as in the
outbox: a transient error (unreachable, 5xx, 429) is retried with backoff for as long as it
takes, never sooner than Retry-After, and counts towards the connector's outage; the date is
looked at again before it is rewritten, since a write that timed out may have landed. An auth
error marks the connector unhealthy; a permanent one dead-letters the date with a worklist item
naming the clinician's dates; errors not understood count strikes towards ``outbox.max_attempts``.

A directory's timeslot endpoint is one resource, so the backoff is the connector's (as for its
reads), not each date's: while it fails, one date probes after each backoff, or as soon as the
directory answers a read (a pull, a webhook's re-read) unless it asked for a Retry-After; when the
probe lands, every waiting date goes at once. A directory that answered a slot request within the
last minute is failing now and then rather than down, so its backoff stops growing at 2 s: it
converges within seconds. One that is down costs one request per backoff (growing to
``outbox.backoff_max``), however many dates wait.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import structlog

from .config import PracticeConfig
from .connector import Connector, Slot
from .errors import AuthError, PermanentError, TransientError, error_kind
from .model import iso, utcnow
from .publisher import decode_slots
from .retry import Backoff, backoff_delay
from .store import SlotState, Store
from .tx import Tx

__all__ = ["SlotReport", "SlotWriter", "same_slots"]

log = structlog.get_logger("syncbridge.slots")

#: a directory whose slot requests succeeded this recently is failing now and then, not down: its
#: backoff stops growing at ``_INTERMITTENT_CAP`` seconds (never below a Retry-After), because a slot
#: left open next to a new booking is a double booking waiting to happen
_INTERMITTENT_WINDOW = 60.0
_INTERMITTENT_CAP = 2.0
#: dates taken from the store per drain: a practice of 30 clinicians plans 630, all looked at after a
#: start; a booking meanwhile is planned between two drains, its write going ahead of the looks
_BATCH = 100


def same_slots(shown: Sequence[Slot], wanted: Sequence[Slot]) -> bool:
    """Whether a directory shows exactly the wanted slots: by start instant, modality (the office when
    not said) and kind of client, and by services where the wanted slot names them."""
    def key(s: Slot) -> tuple[object, ...]:
        return s.start.astimezone(UTC), s.modality or "in_person", s.clients

    want = {key(s): frozenset(s.services) for s in wanted}
    seen = {key(s): frozenset(s.services) for s in shown}
    return want.keys() == seen.keys() and all(not services or seen[k] == services for k, services in want.items())


@dataclass(slots=True)
class SlotReport:
    #: dates read back, and of those the ones found as wanted (no write needed)
    read: int = 0
    unchanged: int = 0
    written: int = 0
    retried: int = 0
    dead: int = 0


class SlotWriter:
    def __init__(
        self, store: Store, connectors: dict[str, Connector], config: PracticeConfig,
    ) -> None:
        self.store = store
        self.connectors = connectors
        self.config = config
        self.backoff = Backoff(config.outbox.backoff_base, config.outbox.backoff_max)
        #: connector -> until when it asked us to wait (Retry-After); a read answering does not cut that short
        self._asked_to_wait: dict[str, float] = {}
        #: connector -> when a slot request last succeeded (monotonic)
        self._answered_at: dict[str, float] = {}
        #: called with (connector, request "get" or "put", outcome, seconds the date waited or None)
        self.listeners: list[Callable[[str, str, str, float | None], None]] = []

    def reconfigure(self, connectors: dict[str, Connector], config: PracticeConfig) -> None:
        """A reload: new connectors (credentials may have been fixed), so no backoff is kept."""
        self.connectors, self.config = connectors, config
        self.backoff = Backoff(config.outbox.backoff_base, config.outbox.backoff_max)

    def answered(self, name: str) -> bool:
        """The directory answered a read (a pull, a webhook's re-read) while its slot writes were
        backing off: one date goes now as a probe, as the outbox does for its writes, so a directory
        failing now and then gets its withdrawn slots within seconds; True when a probe is due."""
        if not self.backoff.failures.get(name) or self.backoff.wait(name) <= 0 or self._asked_to_wait.get(name, 0) > time.time():
            return False  # not backing off, or the directory asked for the wait (Retry-After): honoured
        self.backoff.not_before.pop(name, None)  # the failure count stays: one date probes first
        with self.store.tx() as tx:
            tx.slot_probe_now(name, time.time())
        return True

    def next_due(self) -> float | None:
        """When the next date may be tried (a connector backing off holds its dates back)."""
        now = time.time()
        due = self.store.slot_due_by_connector()
        return min((max(at, now + self.backoff.wait(name, now)) for name, at in due.items()), default=None)

    async def drain(self) -> SlotReport:
        """One pass over the dates due now, each connector on its own."""
        report = SlotReport()
        by: dict[str, list[SlotState]] = defaultdict(list)
        for row in self.store.slot_due(time.time(), _BATCH):
            by[row.connector].append(row)
        await asyncio.gather(*(self._feed(name, rows, report) for name, rows in by.items()))
        return report

    async def _feed(self, name: str, rows: list[SlotState], report: SlotReport) -> None:
        connector = self.connectors.get(name)
        if connector is None or not connector.capabilities.publishes_availability:
            with self.store.tx() as tx:
                tx.slot_forget(name)
            return
        if self.backoff.wait(name) > 0:
            return
        if self.backoff.failures.get(name):  # it failed last time: one date probes before the others go
            await self._converge(connector, rows[0], report)
            rows = rows[1:]
        calls = asyncio.Semaphore(connector.in_flight(self.config.outbox.concurrency))

        async def one(row: SlotState) -> None:
            async with calls:
                if self.backoff.wait(name) <= 0:  # a failure meanwhile holds back the rest
                    await self._converge(connector, row, report)

        await asyncio.gather(*(one(r) for r in rows))

    async def _converge(self, connector: Connector, row: SlotState, report: SlotReport) -> None:
        name = connector.name
        wanted = decode_slots(row.slots, ZoneInfo(self.config.clinician_zone(row.clinician)))
        day = date.fromisoformat(row.day)
        request = "get"
        try:
            if row.verify and connector.capabilities.reads_availability and row.written in (None, row.digest):
                shown = await connector.published(row.clinician, day)
                report.read += 1
                if same_slots(shown, wanted):
                    report.unchanged += 1
                    self._settled(connector, row, "get", "unchanged")
                    return
                self._tell(name, "get", "differs", None)
                if row.written is not None:  # not a first look: the directory changed its slots by itself
                    log.info("slots_differ", connector=name, clinician=row.clinician, day=row.day, shown=len(shown), wanted=len(wanted))
            request = "put"
            await connector.publish(row.clinician, day, wanted)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 (sorted by kind in _failed)
            self._failed(name, row, request, err, report)
            return
        report.written += 1
        self._settled(connector, row, "put", "published")

    def _settled(self, connector: Connector, row: SlotState, request: str, outcome: str) -> None:
        name = connector.name
        recovered = bool(self.backoff.failures.get(name))
        self.backoff.succeeded(name)
        self._answered_at[name] = time.monotonic()
        now = iso(utcnow())
        with self.store.tx() as tx:
            tx.slot_settled(name, row.clinician, row.day, row.seq, row.digest, now)
            if recovered:  # the probe landed: every date waiting for this directory goes now
                tx.slot_all_due(name, time.time())
            self._reachable(tx, name, now)
            if not self.store.slot_dead_days(name, row.clinician) and tx.close_work(_work_key(name, row.clinician), now, "applied"):
                tx.audit.add(now, "worklist_closed", name, None, {"key": _work_key(name, row.clinician)})
            if request == "put":
                tx.audit.add(now, "availability_published", name, None, {"clinician": row.clinician, "day": row.day,
                                                                         "slots": len(json.loads(row.slots))})
        self._tell(name, request, outcome, time.time() - row.since if row.since else None)

    def _failed(self, name: str, row: SlotState, request: str, err: BaseException, report: SlotReport) -> None:
        now = time.time()
        message = f"{error_kind(err) if isinstance(err, Exception) else 'error'}: {err}"[:500]
        cfg = self.config.outbox
        if isinstance(err, TransientError):  # unreachable or throttled: wait for it, never give up
            intermittent = time.monotonic() - self._answered_at.get(name, float("-inf")) < _INTERMITTENT_WINDOW
            delay = self.backoff.failed(name, err.retry_after, cap=_INTERMITTENT_CAP if intermittent else None)
            if err.retry_after:
                self._asked_to_wait[name] = now + err.retry_after
            with self.store.tx() as tx:
                tx.slot_retry(name, row.clinician, row.day, now + delay, message)
            self._unreachable(name, err)
            report.retried += 1
            self._tell(name, request, error_kind(err), None)
            log.warning("slots_retry", connector=name, clinician=row.clinician, day=row.day, kind=error_kind(err), delay=round(delay, 2))
        elif isinstance(err, AuthError):  # a person must act; the dates wait for them
            self.backoff.failed(name, cfg.backoff_max)
            with self.store.tx() as tx:
                tx.set_health(name, False, f"authentication failed: {err}")
                tx.slot_retry(name, row.clinician, row.day, now + cfg.backoff_max, message)
            report.retried += 1
            self._tell(name, request, "auth", None)
        elif isinstance(err, PermanentError):
            self._dead(name, row, message, report)
        else:  # a conflict, a bug or an untranslated library error: retry, then dead-letter
            log.error("slots_unexpected", connector=name, clinician=row.clinician, day=row.day, error=type(err).__name__, exc_info=err)
            with self.store.tx() as tx:
                strikes = tx.slot_retry(name, row.clinician, row.day, now + backoff_delay(row.attempts, cfg.backoff_base, cfg.backoff_max),
                                        message, strike=True)
            if strikes >= cfg.max_attempts:
                self._dead(name, row, message, report)
            else:
                report.retried += 1
                self._tell(name, request, "strike", None)

    def _unreachable(self, name: str, err: TransientError) -> None:
        """Count the failure towards the connector's outage, which the outbox's writes share (status,
        /readyz); past ``outbox.outage_warning`` the outbox's warning item says the dates wait too."""
        clock = time.time()
        with self.store.tx() as tx:
            outage = tx.outage_failed(name, clock, f"{error_kind(err)}: {err}"[:500])
            if clock - outage.since < self.config.outbox.outage_warning:
                return
            since = iso(datetime.fromtimestamp(outage.since, UTC))
            waiting = sum(1 for s in self.store.slot_states(name) if s.due_at is not None and not s.dead)
            text = (f"{name} unreachable since {since}; {tx.outbox_waiting(name)} writes and {waiting} dates of free slots waiting; "
                    f"they will be applied when it returns (last error: {outage.last_error})")
            if tx.open_work(f"outage:{name}", "unreachable", text, iso(utcnow()), name):
                log.warning("outage_warning", connector=name, since=since, dates_waiting=waiting)

    @staticmethod
    def _reachable(tx: Tx, name: str, now: str) -> None:
        """A slot request was answered: the connector's outage is over, its warning item closes."""
        outage = tx.outage_over(name)
        if outage is not None and tx.close_work(f"outage:{name}", now, "applied"):
            tx.audit.add(now, "worklist_closed", name, None, {"key": f"outage:{name}"})

    def _dead(self, name: str, row: SlotState, message: str, report: SlotReport) -> None:
        at = iso(utcnow())
        with self.store.tx() as tx:
            tx.slot_dead(name, row.clinician, row.day, message)
            days = self.store.slot_dead_days(name, row.clinician)
            tx.open_work(
                _work_key(name, row.clinician), "dead_letter",
                f"syncbridge could not publish the free slots of {row.clinician} in {name} for {', '.join(days)} ({message}). "
                f"Fix the cause, then reload the daemon (systemctl reload syncbridge): every date is then looked at and written again.",
                at, name,
            )
            tx.audit.add(at, "dead_letter", name, None, {"clinician": row.clinician, "day": row.day, "error": message[:120]})
        report.dead += 1
        self._tell(name, "put", "dead", None)
        log.error("slots_dead_letter", connector=name, clinician=row.clinician, day=row.day, problem=message)

    def _tell(self, name: str, request: str, outcome: str, seconds: float | None) -> None:
        for listener in self.listeners:
            listener(name, request, outcome, seconds)


def _work_key(connector: str, clinician: str) -> str:
    return f"slots:{connector}:{clinician}"
