"""The outbox worker: converge each (connector, appointment) to the canonical version.

Items are state-based: the worker renders the *current* canonical snapshot at apply time, so a
retry is always safe and ten edits become one write. Errors follow DESIGN section 9: conflict
-> re-read and re-merge; transient -> exponential backoff with jitter, honouring Retry-After;
auth -> connector marked unhealthy, slow retry; permanent -> dead letter plus a worklist item.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .connector import Link, Observation, PullResult
from .engine import Engine
from .errors import AuthError, ConflictError, PermanentError, SyncbridgeError, TransientError, error_kind
from .model import iso
from .store import OutboxItem

__all__ = ["ApplyReport", "Outbox", "backoff_delay"]

log = structlog.get_logger("syncbridge.outbox")


def backoff_delay(attempts: int, base: float, cap: float, retry_after: float | None = None, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff, never sooner than the vendor's Retry-After."""
    r = rng or random
    delay = min(cap, base * (2**attempts)) * r.uniform(0.5, 1.0)
    return max(delay, retry_after or 0.0)


@dataclass(slots=True)
class ApplyReport:
    applied: int = 0
    skipped: int = 0
    retried: int = 0
    conflicts: int = 0
    dead: int = 0


class Outbox:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.cfg = engine.config.outbox
        self._sems: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(self.cfg.concurrency))
        #: called with (connector, outcome, seconds from enqueue to applied or None) after each attempt
        self.listeners: list[Callable[[str, str, float | None], None]] = []

    async def drain(self, *, until_empty: bool = True, max_rounds: int = 20) -> ApplyReport:
        """Apply every due item (and items that became due through re-merges), bounded in rounds."""
        report = ApplyReport()
        for _ in range(max_rounds):
            items = self.store.outbox_due(time.time(), self.cfg.batch)
            if not items:
                break
            await asyncio.gather(*(self._guarded(item, report) for item in items))
            if not until_empty:
                break
        return report

    async def _guarded(self, item: OutboxItem, report: ApplyReport) -> None:
        async with self._sems[item.connector]:
            await self.apply_one(item, report)

    async def apply_one(self, item: OutboxItem, report: ApplyReport) -> None:
        engine = self.engine
        connector = engine.connectors.get(item.connector)
        now = iso(engine.clock())
        appt = self.store.appointment(item.appointment_id)
        if connector is None or appt is None:
            with self.store.tx() as tx:
                tx.outbox_done(item.connector, item.appointment_id, 1 << 62)
            report.skipped += 1
            return
        link = self.store.link(item.connector, item.appointment_id)
        desired = connector.capabilities.project(appt.fields)
        if link is not None and not link.gone and desired == link.base:
            with self.store.tx() as tx:
                tx.outbox_done(item.connector, item.appointment_id, appt.version)
            report.skipped += 1
            return
        try:
            result = await connector.apply(appt.id, desired, link)
        except ConflictError:
            report.conflicts += 1
            self._tell(item.connector, "conflict")
            await self._remerge(item, link)
            return
        except TransientError as err:
            self._tell(item.connector, error_kind(err))
            self._retry(item, err, err.retry_after, report)
            return
        except AuthError as err:
            with self.store.tx() as tx:
                tx.set_health(item.connector, False, f"authentication failed: {err}")
            self._retry(item, err, self.cfg.backoff_max, report)
            return
        except PermanentError as err:
            self._tell(item.connector, "dead")
            self._dead(item, err, report)
            return
        except Exception as err:  # a bug or an untranslated library error: retry, then dead-letter
            log.exception("apply_unexpected", connector=item.connector, appointment=item.appointment_id)
            self._retry(item, err, None, report)
            return
        with self.store.tx() as tx:
            # with fields reported back, the etag is left unknown until they are merged: if we stop
            # in between, the next pull reads the copy as a change instead of as our echo
            etag = None if result.reported else result.etag
            tx.put_link(Link(item.connector, appt.id, result.external_id, etag, desired, appt.version, gone=result.gone), applied_at=now)
            tx.outbox_done(item.connector, appt.id, appt.version)
            tx.audit.add(now, "applied", item.connector, appt.id, {"version": appt.version, "status": appt.fields["status"], "disclosed": list(result.disclosed)}
                | ({"steps": list(result.steps)} if result.steps else {}))
        if result.reported:
            # what the system decided while applying (say, a claim that already went out) flows back
            # through the merge; without an etag it is never mistaken for an echo of our write
            obs = Observation(external_id=result.external_id or "", etag=result.etag, canonical_id=appt.id, fields=desired | result.reported)
            self.engine.observe(item.connector, PullResult([obs], cursor=None), advance=False)
        report.applied += 1
        self._tell(item.connector, "applied", time.time() - item.due_at if item.attempts == 0 else None)
        log.info("applied", connector=item.connector, appointment=appt.id, version=appt.version)

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
            self._retry(item, err, None, ApplyReport())
            return
        self.engine.observe(item.connector, PullResult([obs], cursor=None), advance=False)
        with self.store.tx() as tx:
            tx.outbox_retry(item.connector, item.appointment_id, time.time(), "precondition failed; re-merged")
            attempts = item.attempts + 1
            if attempts >= self.cfg.max_attempts:
                tx.outbox_dead(item.connector, item.appointment_id, "precondition kept failing")

    def _retry(self, item: OutboxItem, err: BaseException, retry_after: float | None, report: ApplyReport) -> None:
        attempts = item.attempts + 1
        if attempts >= self.cfg.max_attempts:
            self._dead(item, err, report)
            return
        delay = backoff_delay(item.attempts, self.cfg.backoff_base, self.cfg.backoff_max, retry_after)
        with self.store.tx() as tx:
            tx.outbox_retry(item.connector, item.appointment_id, time.time() + delay, f"{error_kind(err)}: {err}"[:500])
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
