"""The outbox worker: converge each (connector, appointment) to the canonical version.

Items are state-based: the worker renders the *current* canonical snapshot at apply time, so a
retry is always safe and ten edits become one write. Errors follow DESIGN section 9: conflict
-> re-read and re-merge; transient -> exponential backoff with jitter, honouring Retry-After, for
as long as the system stays unreachable (an outage is shown in the status and, once it lasts, on
the worklist; the writes wait and land when it returns); auth -> connector marked unhealthy, slow
retry; permanent -> dead letter plus a worklist item. Only failures that are neither transient nor
auth (recurring conflicts, errors not understood) count towards ``outbox.max_attempts``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from .account_turns import AccountTurns
from .batching import BatchFallback
from .connector import ApplyResult, Connector, Link, Observation, PullResult, Write
from .engine import Engine
from .errors import AuthError, ConflictError, PermanentError, SyncbridgeError, TransientError, error_kind
from .model import CANCELLED_STATES, Appointment, Snapshot, iso
from .retry import backoff_delay
from .store import OutboxItem
from .tx import Tx
from .tx_group import TxGroup

__all__ = ["ApplyReport", "Outbox", "backoff_delay"]

log = structlog.get_logger("syncbridge.outbox")

#: a due item about to be written: the item, the appointment, its copy's link and what the copy should hold
Todo = tuple[OutboxItem, Appointment, Link | None, Snapshot]
#: a write that landed: its todo and the system's answer
Landed = tuple[OutboxItem, Appointment, Link | None, Snapshot, ApplyResult]
#: fields a system reported back while applying: (appointment id, answer, what was written)
Reported = tuple[str, ApplyResult, Snapshot]


def chunks(items: list[OutboxItem], size: int) -> list[list[OutboxItem]]:
    """Due writes in the calls they go out in: ``size`` per call (a vendor batch, or one write)."""
    return [items[k : k + size] for k in range(0, len(items), size)]


@dataclass(slots=True)
class ApplyReport:
    applied: int = 0
    skipped: int = 0
    retried: int = 0
    conflicts: int = 0
    dead: int = 0


class Outbox:
    """Keeps every connector's calls in flight until nothing is due.

    Each connector gets its own feeder: it takes due items in ``write_batch``-sized chunks (one
    vendor batch request, or one write) and keeps up to ``outbox.concurrency`` of them in flight
    (within the system's own limits: ``Connector.in_flight``, ``account_concurrency``),
    starting the next as soon as one answers, so a slow write never holds up the others and an
    initial sync of a whole practice streams instead of moving in rounds.
    """

    #: a due item is sent at most this often per drain (a copy that keeps changing under us waits
    #: for the next drain instead of holding the loop)
    max_sends = 20

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.cfg = engine.config.outbox
        #: set to stop taking new items; writes already sent are finished and recorded
        self.halt = asyncio.Event()
        #: called with (connector, outcome, seconds from enqueue to applied or None) after each attempt
        self.listeners: list[Callable[[str, str, float | None], None]] = []
        #: a refused vendor batch falls back to single writes (and the connector shows degraded)
        self.batches = BatchFallback(self.store, self.cfg.backoff_max)
        #: the calls' decisions and records, sharing transactions
        self.group = TxGroup(self.store)
        #: whether this worker may write to a connector now (it holds the connector's lease; with one
        #: worker, always), and how long a claimed write stays its own (runtime.py, leases.py)
        self.may: Callable[[str], bool] = lambda _name: True
        self.lease_seconds = 25.0

    async def drain(self) -> ApplyReport:
        """Apply every due item, including items that fall due through re-merges meanwhile."""
        report = ApplyReport()
        feeders: dict[str, asyncio.Task[None]] = {}
        try:
            while not self.halt.is_set():
                for name in self.store.outbox_due_connectors(time.time()):
                    if name not in feeders and self.may(name):
                        feeders[name] = asyncio.create_task(self._feed(name, report))
                if not feeders:
                    break
                done, _ = await asyncio.wait(feeders.values(), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for name in [n for n, t in feeders.items() if t in done]:
                    feeders.pop(name).result()
        finally:
            if feeders:
                await asyncio.gather(*feeders.values(), return_exceptions=True)
        return report

    async def _feed(self, name: str, report: ApplyReport) -> None:
        connector = self.engine.connectors.get(name)
        size = max(1, connector.write_batch) if connector is not None else 1
        #: calls one account (a clinician's calendar or mailbox) may have in flight, where the vendor limits it
        per_account = connector.account_concurrency if connector is not None else None
        at_once = connector.in_flight(self.cfg.concurrency) if connector is not None else 1
        calls = asyncio.Semaphore(at_once)
        inflight: set[str] = set()
        busy: dict[str, int] = defaultdict(int)
        sends: dict[str, int] = defaultdict(int)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None], *, ids: list[str], account: str | None) -> None:
            calls.release()
            inflight.difference_update(ids)
            running.discard(task)
            if account is not None and (left := busy.pop(account) - 1) > 0:
                busy[account] = left

        turns = (AccountTurns(self.store, name, size=size, per_account=per_account, lease_seconds=self.lease_seconds)
                 if per_account is not None else None)
        while not self.halt.is_set() and self.may(name):
            if turns is not None:  # the accounts take turns, each with its vendor's limit of calls in flight
                if turns.due() and not turns.read(inflight, sends, self.max_sends) and not running:
                    break
                pending = iter(lambda: turns.take(busy) if not self.halt.is_set() else None, None)
            else:
                want = max(self.cfg.batch, size * at_once * 2)
                clock = time.time()
                due = self.store.claim_writes(self.store.worker, name, want + len(inflight), clock, clock + self.lease_seconds)
                items = [i for i in due if i.appointment_id not in inflight and sends[i.appointment_id] < self.max_sends][:want]
                if not items and not running:
                    break
                pending = iter(chunks(items, size))
            sent = 0
            for chunk in pending:
                await calls.acquire()
                if self.halt.is_set():
                    calls.release()
                    break
                account = chunk[0].account if turns is not None else None
                ids = [i.appointment_id for i in chunk]
                inflight.update(ids)
                if len(sends) > 20_000:  # bounded memory through a whole practice's initial sync
                    sends.clear()
                for i in ids:
                    sends[i] += 1
                if account is not None:
                    busy[account] += 1
                task = asyncio.create_task(self.apply_chunk(name, chunk, report))
                running.add(task)
                task.add_done_callback(functools.partial(finished, ids=ids, account=account))
                sent += 1
            if not sent and running:  # nothing to send until a call answers
                await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def apply_chunk(self, name: str, items: list[OutboxItem], report: ApplyReport) -> None:
        """Send one chunk of a connector's due items (one vendor batch) and record each outcome.

        The decision and the record each share a transaction with the chunks ready at the same
        moment (:class:`TxGroup`): with one write per call, that is most of a write's store work."""
        connector = self.engine.connectors.get(name)
        now = iso(self.engine.clock())
        todo, skipped = await self.group.run(functools.partial(self._decide, name, connector, items))
        report.skipped += skipped
        if not todo or connector is None:
            return
        results = await self.batches.apply(connector, [Write(appt.id, desired, link) for _, appt, link, desired in todo])
        if len(results) != len(todo):
            log.error("apply_many_mismatch", connector=name, sent=len(todo), answered=len(results))
            results = [TransientError("the connector answered a batch with the wrong number of results")] * len(todo)
        landed: list[Landed] = []
        for (item, appt, link, desired), result in zip(todo, results, strict=True):
            if isinstance(result, ApplyResult):
                landed.append((item, appt, link, desired, result))
            else:
                await self._failed(item, link, result, report)
        if not landed:
            return
        vanished, reported = await self.group.run(functools.partial(self._record, name, connector, landed, now))
        if vanished:
            self.engine.observe(name, PullResult(vanished, cursor=None), advance=False)
        for appt_id, result, desired in reported:
            # what the system decided while applying (say, a claim that already went out) flows back
            # through the merge; without an etag it is never mistaken for an echo of our write
            obs = Observation(external_id=result.external_id or "", etag=result.etag, canonical_id=appt_id, fields=desired | result.reported)
            self.engine.observe(name, PullResult([obs], cursor=None), advance=False)
        report.applied += len(landed)
        clock = time.time()
        for item, appt, _, _, _ in landed:
            self._tell(name, "applied", clock - item.due_at if item.attempts == 0 else None)
            log.info("applied", connector=name, appointment=appt.id, version=appt.version)

    @staticmethod
    def _decide(name: str, connector: Connector | None, items: list[OutboxItem], tx: Tx) -> tuple[list[Todo], int]:
        """Which items still need a write (the rest are done already), and how many were skipped."""
        tx.prefetch(name, (), [i.appointment_id for i in items])
        todo: list[Todo] = []
        skipped = 0
        for item in items:
            appt = tx.appointment(item.appointment_id)
            if connector is None or appt is None:
                tx.outbox_done(name, item.appointment_id, 1 << 62)
                skipped += 1
                continue
            link = tx.link(name, item.appointment_id)
            desired = connector.capabilities.project(appt.fields)
            if link is not None and (desired == link.base and not link.gone or link.gone and appt.fields["status"] in CANCELLED_STATES):
                # converged already, or a cancelled session whose copy is gone (the fan-out's rule)
                tx.outbox_done(name, item.appointment_id, appt.version)
                skipped += 1
                continue
            todo.append((item, appt, link, desired))
        return todo, skipped

    def _record(self, name: str, connector: Connector, landed: list[Landed], now: str, tx: Tx) -> tuple[list[Observation], list[Reported]]:
        """Record the writes that landed: the copies' links, the outbox, the audit and the worklist.
        Answers the copies found deleted meanwhile and the fields the systems reported back, for
        the merge."""
        reported: list[Reported] = []
        vanished: list[Observation] = []
        self._reachable(tx, name, now, {appt.fields.get("clinician") or "" for _, appt, _, _, _ in landed})
        tx.prefetch(name, (), [appt.id for _, appt, _, _, _ in landed])
        for _item, appt, link, desired, result in landed:
            if tx.link(name, appt.id) != link:
                # a pull recorded a later state of the copy while we were writing (someone edited it
                # right after our write landed): our answer is older, so keep the pull's view and
                # decide again from it rather than overwrite it with a stale etag
                tx.outbox_retry(name, appt.id, time.time(), "the copy changed while it was written; deciding again")
                tx.audit.add(now, "applied", name, appt.id, {"version": appt.version, "status": appt.fields["status"],
                             "disclosed": list(result.disclosed), "superseded": True})
                continue
            if result.gone and link is not None and not link.gone and link.external_id:
                # the copy was deleted in the system since it was last read: that is what a read
                # answering 404 says, so it is merged as the system's deletion, never dead-lettered
                tx.outbox_done(name, appt.id, appt.version)
                tx.audit.add(now, "applied", name, appt.id, {"version": appt.version, "status": appt.fields["status"], "gone": True})
                vanished.append(Observation(external_id=link.external_id, canonical_id=appt.id, deleted=True))
                continue
            # with fields reported back, the etag is left unknown until they are merged: if we stop
            # in between, the next pull reads the copy as a change instead of as our echo
            etag = None if result.reported else result.etag
            tx.put_link(Link(name, appt.id, result.external_id, etag, desired, appt.version, gone=result.gone), applied_at=now)
            tx.outbox_done(name, appt.id, appt.version)
            tx.audit.add(now, "applied", name, appt.id, {"version": appt.version, "status": appt.fields["status"], "disclosed": list(result.disclosed)}
                | ({"steps": list(result.steps)} if result.steps else {}) | ({"attention": list(result.attention)} if result.attention else {}))
            self._attention(tx, name, appt.id, result.attention, now)
            current = tx.appointment(appt.id)
            if current is not None and current.version > appt.version and connector.capabilities.project(current.fields) != desired:
                # the record moved on while we wrote, and its fan-out compared against the copy as
                # it was before this write (say, moved back to where the copy then was): the copy
                # now holds what we wrote, so it needs the record's current state after all
                tx.enqueue(name, appt.id, current.version, time.time())
            if result.reported:
                reported.append((appt.id, result, desired))
        return vanished, reported

    @staticmethod
    def _attention(tx: Tx, name: str, appt_id: str, lines: tuple[str, ...], now: str) -> None:
        """What a write left for a person (a charge still billable): one worklist item per copy,
        kept up to date while anything is left and closed by the first write that leaves nothing."""
        key = f"attention:{name}:{appt_id}"
        if lines:
            text = f"syncbridge could not finish appointment {appt_id} in {name}: " + "; ".join(lines)
            if tx.open_work(key, "needs_attention", text[:2000], now, name, appt_id):
                tx.audit.add(now, "needs_attention", name, appt_id, {"items": list(lines)})
        elif tx.close_work(key, now, "observed"):
            tx.audit.add(now, "worklist_closed", name, appt_id, {"key": key})

    async def _failed(self, item: OutboxItem, link: Link | None, err: BaseException, report: ApplyReport) -> None:
        if isinstance(err, ConflictError):
            report.conflicts += 1
            self._tell(item.connector, "conflict")
            await self._remerge(item, link)
        elif isinstance(err, TransientError):  # unreachable or throttled: wait for it, never give up
            self._tell(item.connector, error_kind(err))
            self._retry(item, err, err.retry_after, report)
            self._unreachable(item.connector, err)
        elif isinstance(err, AuthError):  # a person must act; the write waits for them
            with self.store.tx() as tx:
                tx.set_health(item.connector, False, f"authentication failed: {err}")
            self._retry(item, err, self.cfg.backoff_max, report)
        elif isinstance(err, PermanentError):
            self._tell(item.connector, "dead")
            self._dead(item, err, report)
        elif isinstance(err, Exception):  # a bug or an untranslated library error: retry, then dead-letter
            log.error("apply_unexpected", connector=item.connector, appointment=item.appointment_id,
                      error=type(err).__name__, exc_info=err)
            self._retry(item, err, None, report, strike=True)
        else:  # cancelled or interrupted mid-write: the item stays due for the next drain
            raise err

    def _unreachable(self, name: str, err: TransientError) -> None:
        """Count the failure towards the connector's outage; warn a person once it has lasted
        ``outbox.outage_warning`` (the item is brought up to date while the outage goes on)."""
        clock = time.time()
        with self.store.tx() as tx:
            outage = tx.outage_failed(name, clock, f"{error_kind(err)}: {err}"[:500])
            if clock - outage.since < self.cfg.outage_warning:
                return
            since = iso(datetime.fromtimestamp(outage.since, UTC))
            waiting = tx.outbox_waiting(name)
            text = (f"{name} unreachable since {since}; {waiting} writes waiting; they will be applied when it returns "
                    f"(last error: {outage.last_error})")
            if tx.open_work(f"outage:{name}", "unreachable", text, iso(self.engine.clock()), name):
                log.warning("outage_warning", connector=name, since=since, waiting=waiting)

    @staticmethod
    def _reachable(tx: Tx, name: str, now: str, accounts: set[str]) -> None:
        """Writes landed: an outage of ``name`` is over and its warning closes by itself, and the
        writes of these accounts (clinicians) still waiting out a backoff go now, not up to
        ``outbox.backoff_max`` later; another account's failing writes keep their own backoff."""
        released = tx.outbox_release(name, accounts, time.time())
        outage = tx.outage_over(name)
        if outage is None:
            return
        if tx.close_work(f"outage:{name}", now, "applied"):
            tx.audit.add(now, "worklist_closed", name, None, {"key": f"outage:{name}"})
        log.info("reachable_again", connector=name, failures=outage.failures, seconds=round(time.time() - outage.since, 1),
                 writes_due=released)

    def _tell(self, connector: str, outcome: str, seconds: float | None = None) -> None:
        for listener in self.listeners:
            listener(connector, outcome, seconds)

    async def _remerge(self, item: OutboxItem, link: Link | None) -> None:
        """Precondition failed: read the copy as it is, merge it, and let the fan-out re-enqueue."""
        connector = self.engine.connectors[item.connector]
        try:
            external_id = link.external_id if link is not None else connector.external_id_for(item.appointment_id)
            if external_id is None:
                raise ConflictError("create conflicted but the connector cannot say which copy exists")
            obs = await connector.read(external_id)
        except SyncbridgeError as err:
            self._retry(item, err, getattr(err, "retry_after", None), ApplyReport(), strike=not isinstance(err, (TransientError, AuthError)))
            return
        self.engine.observe(item.connector, PullResult([obs], cursor=None), advance=False)
        with self.store.tx() as tx:
            if item.strikes + 1 >= self.cfg.max_attempts:
                tx.outbox_dead(item.connector, item.appointment_id, "precondition kept failing")
            else:
                tx.outbox_retry(item.connector, item.appointment_id, time.time(), "precondition failed; re-merged", strike=True)

    def _retry(self, item: OutboxItem, err: BaseException, retry_after: float | None, report: ApplyReport, *, strike: bool = False) -> None:
        """Try again after the backoff; a ``strike`` (not transient) dead-letters at ``max_attempts``."""
        if strike and item.strikes + 1 >= self.cfg.max_attempts:
            self._dead(item, err, report)
            return
        delay = backoff_delay(item.attempts, self.cfg.backoff_base, self.cfg.backoff_max, retry_after)
        with self.store.tx() as tx:
            tx.outbox_retry(item.connector, item.appointment_id, time.time() + delay, f"{error_kind(err)}: {err}"[:500], strike=strike)
        report.retried += 1
        log.warning("apply_retry", connector=item.connector, appointment=item.appointment_id, kind=error_kind(err), delay=round(delay, 2))

    def _dead(self, item: OutboxItem, err: BaseException, report: ApplyReport) -> None:
        now = iso(self.engine.clock())
        message = f"{error_kind(err)}: {err}"[:500]
        with self.store.tx() as tx:
            tx.outbox_dead(item.connector, item.appointment_id, message)
            tx.open_work(
                f"dead:{item.connector}:{item.appointment_id}",
                "dead_letter",
                f"syncbridge could not update appointment {item.appointment_id} in {item.connector} ({message}). "
                f"Fix the cause, then run `syncbridge retry {item.connector} {item.appointment_id}`.",
                now,
                item.connector,
                item.appointment_id,
            )
            tx.audit.add(now, "dead_letter", item.connector, item.appointment_id, {"error": error_kind(err)})
        report.dead += 1
        log.error("dead_letter", connector=item.connector, appointment=item.appointment_id, kind=error_kind(err))
