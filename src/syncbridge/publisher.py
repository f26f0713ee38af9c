"""Availability publishing: busy time in, slot sets out, only for dates whose slots changed.

Reads every connector that reports busy time, computes each directory clinician's slots for the
horizon with :mod:`syncbridge.policy.availability`, and calls ``publish`` for a date only when its
slot digest differs from what was last published there. A failed publish is not recorded, so the
next run tries that date again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import structlog

from .config import PracticeConfig
from .connector import Connector
from .errors import SyncbridgeError, error_kind
from .model import iso, parse_iso, utcnow
from .policy.availability import Session, day_slots, slots_digest
from .store import Store

__all__ = ["PublishReport", "Publisher"]

log = structlog.get_logger("syncbridge.publisher")


@dataclass(slots=True)
class PublishReport:
    days_checked: int = 0
    published: int = 0
    failed: int = 0


class Publisher:
    def __init__(
        self, store: Store, connectors: dict[str, Connector], config: PracticeConfig, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.store = store
        self.connectors = connectors
        self.config = config
        self.clock = clock
        self.busy_read_at: float | None = None

    def active(self) -> bool:
        return any(c.capabilities.publishes_availability for c in self.connectors.values())

    async def refresh_busy(self) -> None:
        """Re-read busy time over the horizon from every connector that reports it."""
        now = self.clock()
        start, end = now - timedelta(days=1), now + timedelta(days=self.config.availability.horizon_days + 2)
        for name, connector in self.connectors.items():
            if not connector.capabilities.busy_time:
                continue
            try:
                intervals = await connector.busy(start, end)
            except SyncbridgeError as err:
                log.warning("busy_read_failed", connector=name, kind=error_kind(err))
                continue
            per: dict[str, list[tuple[str, str]]] = {k: [] for k in connector.clinicians}
            for b in intervals:
                per.setdefault(b.clinician, []).append((iso(b.start), iso(b.end)))
            with self.store.tx() as tx:
                for clinician, spans in per.items():
                    tx.replace_busy(name, clinician, spans)
        self.busy_read_at = now.timestamp()

    async def publish(self) -> PublishReport:
        report = PublishReport()
        now = self.clock()
        for name, connector in self.connectors.items():
            if not connector.capabilities.publishes_availability:
                continue
            for clinician in connector.clinicians:
                await self._publish_clinician(name, connector, clinician, now, report)
        return report

    async def _publish_clinician(self, name: str, connector: Connector, clinician: str, now: datetime, report: PublishReport) -> None:
        zone = ZoneInfo(self.config.clinician_zone(clinician))
        rules = self.config.availability_of(clinician)
        horizon = self.config.availability.horizon_days
        first = now.astimezone(zone).date()
        lo = iso(datetime.combine(first, datetime.min.time(), zone).astimezone(UTC) - timedelta(days=1))
        hi = iso(datetime.combine(first + timedelta(days=horizon + 1), datetime.min.time(), zone).astimezone(UTC))
        intensive = set(rules.intensive_service_codes)
        sessions = [
            Session(parse_iso(s["start"]), parse_iso(s["end"]), intensive=s.get("service_code") in intensive)
            for s in self.store.sessions_of(clinician, lo, hi)
        ]
        busy = [(parse_iso(a), parse_iso(b)) for a, b in self.store.busy_of(clinician, lo, hi)]
        published = self.store.published_digests(name, clinician)
        for offset in range(horizon):
            day = first + timedelta(days=offset)
            report.days_checked += 1
            slots = day_slots(day, zone, rules, sessions, busy, now)
            digest = slots_digest(slots)
            if published.get(day.isoformat()) == digest:
                continue
            try:
                await connector.publish(clinician, day, slots)
            except SyncbridgeError as err:
                report.failed += 1
                log.warning("publish_failed", connector=name, clinician=clinician, day=day.isoformat(), kind=error_kind(err))
                continue
            report.published += 1
            at = iso(self.clock())
            with self.store.tx() as tx:
                tx.conn.execute(
                    "INSERT INTO published_slots VALUES (?,?,?,?,?,?) ON CONFLICT (connector, clinician, day) DO UPDATE SET "
                    "digest = excluded.digest, slots = excluded.slots, published_at = excluded.published_at",
                    (name, clinician, day.isoformat(), digest, len(slots), at),
                )
                tx.audit.add(at, "availability_published", name, None, {"clinician": clinician, "day": day.isoformat(), "slots": len(slots)})
