"""Availability as a desired state (DESIGN section 7): busy time in, one row of wanted slots per
directory, clinician and local date out.

The planner computes each directory clinician's slots over the horizon with
:mod:`syncbridge.policy.availability` and records them in the store (``slot_states``); the slot
writer (:mod:`syncbridge.slot_writer`) converges each directory date to its row through the same
retry rules as every other write. What we last sent proves nothing about what a directory shows:
it removes a booked slot by itself and does not put it back when the booking is cancelled. So a
date whose directory side may differ (a booking, cancel or reschedule made there, a restart, the
daily sweep) is marked to be looked at, and rewritten when it differs.

Planning costs milliseconds per clinician: a change replans only the clinicians it touches; the
whole practice is planned at start, after busy time is read, and every ``availability.interval``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import structlog

from .config import PracticeConfig
from .connector import Connector, Slot
from .engine import ObserveReport
from .errors import SyncbridgeError, error_kind
from .model import iso, parse_iso, utcnow
from .overlaps import check_overlaps
from .policy.availability import Session, day_slots
from .store import Store, dumps

__all__ = ["PlanReport", "Publisher", "decode_slots", "encode_slots", "slot_digest"]

log = structlog.get_logger("syncbridge.publisher")


def encode_slots(slots: Sequence[Slot]) -> str:
    """The stored form of a date's wanted slots: [[start, end], ...] as UTC snapshot strings, with
    [modality, services, clients] after them where self-scheduling rules set them."""
    def one(s: Slot) -> list[object]:
        plain = s.modality is None and not s.services and s.clients is None
        return [iso(s.start), iso(s.end)] if plain else [iso(s.start), iso(s.end), s.modality, list(s.services), s.clients]

    return json.dumps([one(s) for s in sorted(slots, key=lambda s: (s.start, s.modality or "", s.clients or ""))], separators=(",", ":"))


def decode_slots(text: str, zone: ZoneInfo) -> list[Slot]:
    """Stored slots as aware instants in the clinician's zone (what ``Connector.publish`` takes)."""
    out = []
    for item in json.loads(text):
        start, end = parse_iso(item[0]).astimezone(zone), parse_iso(item[1]).astimezone(zone)
        out.append(Slot(start, end, item[2], tuple(item[3]), item[4]) if len(item) > 2 else Slot(start, end))
    return out


def slot_digest(encoded: str, account: object) -> str:
    """Identifies what a date's write sends: the slots and the account settings they go with, so
    a changed location or visit reason in the config rewrites every date."""
    return hashlib.sha256((encoded + "\x1f" + dumps(account)).encode()).hexdigest()[:32]


@dataclass(slots=True)
class PlanReport:
    clinicians: int = 0
    days: int = 0
    #: dates whose slots changed or whose directory is to be looked at
    due: int = 0


@dataclass(slots=True)
class _Wanted:
    """What the next plan must cover, gathered from the engine's reports between plans."""

    clinicians: set[str] = field(default_factory=set)
    #: (directory, clinician, start) of bookings made, moved or cancelled in a directory
    looks: set[tuple[str, str, str]] = field(default_factory=set)
    #: appointments that changed: checked for overlapping sessions
    changed: set[str] = field(default_factory=set)
    everything: bool = True
    look_everywhere: bool = True


class Publisher:
    def __init__(
        self, store: Store, connectors: dict[str, Connector], config: PracticeConfig, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.store = store
        self.connectors = connectors
        self.config = config
        self.clock = clock
        self.busy_read_at: float | None = None
        #: a fresh publisher plans everything and looks at every date: the directories may have
        #: changed while the daemon was down
        self._wanted = _Wanted()

    def active(self) -> bool:
        return any(c.capabilities.publishes_availability for c in self.connectors.values())

    def directories(self) -> dict[str, Connector]:
        return {n: c for n, c in self.connectors.items() if c.capabilities.publishes_availability}

    # --- what to plan --------------------------------------------------------------------

    def note(self, connector: str, report: ObserveReport) -> bool:
        """Take in what a merged batch changed; True when a plan is needed."""
        if not self.active():
            return False
        w = self._wanted
        upcoming = self.store.upcoming_of(report.changed_ids, iso(self.clock() - timedelta(days=1))) if report.changed_ids else []
        for appt_id, clinician in upcoming:
            w.changed.add(appt_id)
            w.clinicians.add(clinician)
        for clinician, start in report.touched:
            w.looks.add((connector, clinician, start))
            w.clinicians.add(clinician)
        return bool(upcoming or report.touched)

    def note_everything(self, *, look: bool = False) -> None:
        """Plan the whole practice next (busy time changed, the config was reloaded); ``look``: and
        look at every date in every directory (the daily sweep, a restart)."""
        self._wanted.everything = True
        self._wanted.look_everywhere = self._wanted.look_everywhere or look

    @property
    def everything(self) -> bool:
        """Whether the next plan covers the whole practice."""
        return self._wanted.everything

    def pending(self) -> bool:
        w = self._wanted
        return bool(w.everything or w.clinicians or w.looks or w.changed)

    # --- busy time ---------------------------------------------------------------------

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
        self.note_everything()

    # --- planning ----------------------------------------------------------------------

    def plan(self) -> PlanReport:
        """Record the wanted slots of every date that may have changed; mark dates to look at."""
        w, self._wanted = self._wanted, _Wanted(everything=False, look_everywhere=False)
        report = PlanReport()
        now = self.clock()
        directories = self.directories()
        with self.store.tx() as tx:
            for name, connector in directories.items():
                clinicians = list(connector.clinicians) if w.everything else [c for c in connector.clinicians if c in w.clinicians]
                looks = {(c, s) for d, c, s in w.looks if d == name}
                for clinician in clinicians:
                    days, rows = self._plan_clinician(name, connector, clinician, now, looks, look_all=w.look_everywhere)
                    report.clinicians += 1
                    report.days += len(rows)
                    report.due += tx.plan_slots(rows, now.timestamp())
                    tx.slot_forget(name, clinician, before=days[0].isoformat(), keep=[d.isoformat() for d in days])
                if w.everything:
                    for gone in {s.clinician for s in self.store.slot_states(name)} - set(connector.clinicians):
                        tx.slot_forget(name, gone)
            if w.everything:
                for gone in {s.connector for s in self.store.slot_states()} - set(directories):
                    tx.slot_forget(gone)
            if w.changed:
                check_overlaps(tx, self.config, sorted(w.changed), directories=set(directories), at=iso(now))
        return report

    def _plan_clinician(
        self, name: str, connector: Connector, clinician: str, now: datetime, looks: set[tuple[str, str]], *, look_all: bool
    ) -> tuple[list[date], list[tuple[str, str, str, str, str, int]]]:
        zone = ZoneInfo(self.config.clinician_zone(clinician))
        rules = self.config.availability_of(clinician)
        horizon = self.config.availability.horizon_days
        first = now.astimezone(zone).date()
        monday = first - timedelta(days=first.weekday())  # the weekly intake cap counts the whole first week
        lo = iso(datetime.combine(monday, datetime.min.time(), zone).astimezone(UTC) - timedelta(days=1))
        hi = iso(datetime.combine(first + timedelta(days=horizon + 1), datetime.min.time(), zone).astimezone(UTC))
        intensive = set(rules.intensive_service_codes)
        sessions = [
            Session(parse_iso(s["start"]), parse_iso(s["end"]), intensive=s.get("service_code") in intensive, service_code=s.get("service_code"))
            for s in self.store.sessions_of(clinician, lo, hi)
        ]
        busy = [(parse_iso(a), parse_iso(b)) for a, b in self.store.busy_of(clinician, lo, hi)]
        look_days = {parse_iso(start).astimezone(zone).date() for c, start in looks if c == clinician}
        account = connector.clinicians.get(clinician, {})
        days = [first + timedelta(days=offset) for offset in range(horizon)]
        rows = []
        for day in days:
            encoded = encode_slots(day_slots(day, zone, rules, sessions, busy, now))
            rows.append((name, clinician, day.isoformat(), encoded, slot_digest(encoded, account), int(look_all or day in look_days)))
        return days, rows
