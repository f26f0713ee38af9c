"""Bulk operations: many sessions changed at once (a clinician off sick, a day of no-shows).

Always in two steps. :func:`preview` says what would change, in which systems, what happens to
each claim, and which sessions are left out and why (already under way, documented in the
record system, already cancelled). :func:`start` applies exactly what was previewed: it refuses
when any selected session changed since (the preview's ``token``), records the operation with its
sessions, then changes them one by one through the engine like any other change, so the outbox
converges every system within each vendor's limits and the freed slots are offered again.
An interrupted operation is finished by :func:`resume` (at the daemon's next start); a session
already changed is recognised and not changed twice. :func:`progress` follows the operation in
every system through each session's links, and its billing outcome.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import structlog

from .config import PracticeConfig
from .connector import Connector
from .engine import Engine
from .errors import ConflictError, SyncbridgeError
from .model import CANCELLED_STATES, Appointment, Billing, CancelledBy, Fee, Status, iso, parse_iso, utcnow
from .policy.cancellation import decide
from .receipts import holds_current
from .store import Store

__all__ = [
    "BadSelection",
    "BulkAction",
    "LeftOut",
    "Planned",
    "Preview",
    "Progress",
    "Selection",
    "StaleSelection",
    "operations",
    "preview",
    "progress",
    "resume",
    "start",
]

log = structlog.get_logger("syncbridge.operations")


class BulkAction(StrEnum):
    CANCEL = "cancel"
    NOSHOW = "noshow"
    ATTENDED = "attended"
    WAIVE = "waive"


class StaleSelection(ConflictError):
    """The selected sessions changed between the preview and its confirmation: preview again."""


class BadSelection(SyncbridgeError):
    """A selection naming what is not there (an unknown clinician, a range ending before it starts)."""

    kind = "selection"


@dataclass(frozen=True, slots=True)
class Selection:
    clinicians: tuple[str, ...]
    #: sessions starting in [start, end)
    start: datetime
    end: datetime
    #: only sessions at these locations (empty: any)
    locations: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"clinicians": list(self.clinicians), "start": iso(self.start), "end": iso(self.end), "locations": list(self.locations)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Selection:
        return cls(tuple(d["clinicians"]), parse_iso(d["start"]), parse_iso(d["end"]), tuple(d.get("locations") or ()))


@dataclass(frozen=True, slots=True)
class Planned:
    """One session the operation changes, and what it changes where."""

    appointment_id: str
    version: int
    clinician: str
    start: str
    end: str
    service_code: str | None
    client_key: str | None
    location: str | None
    status_after: str
    fee: str | None
    #: the systems holding a copy that will be changed
    systems: tuple[str, ...]
    #: suppress (claim not yet made), void (a claim went out: a person voids it), none
    billing: str


@dataclass(frozen=True, slots=True)
class LeftOut:
    appointment_id: str
    clinician: str
    start: str
    why: str


@dataclass(frozen=True, slots=True)
class Preview:
    action: BulkAction
    selection: Selection
    reason: str | None
    note: str | None
    #: who cancelled (client, clinician, practice), for cancellations
    by: str | None
    charge_fee: bool
    planned: tuple[Planned, ...]
    left_out: tuple[LeftOut, ...]
    #: names this exact preview: :func:`start` applies it only while the sessions are as shown
    token: str
    at: str

    def params(self) -> dict[str, Any]:
        return {"selection": self.selection.as_dict(), "reason": self.reason, "note": self.note, "by": self.by,
                "charge_fee": self.charge_fee, "token": self.token}

    def summary(self) -> dict[str, int]:
        """Counts for a confirmation line: sessions, copies per system, claims to suppress or void."""
        out: Counter[str] = Counter(sessions=len(self.planned), left_out=len(self.left_out))
        for p in self.planned:
            out.update(f"system:{s}" for s in p.systems)
            out[f"billing:{p.billing}"] += 1
        return dict(out)


def _why_left_out(appt: Appointment, action: BulkAction, now: datetime) -> str | None:
    status = appt.fields["status"]
    start, end = parse_iso(appt.fields["start"]), parse_iso(appt.fields["end"])
    if action in (BulkAction.CANCEL,):
        if status in CANCELLED_STATES:
            return f"already {status.replace('_', ' ')}"
        if status in (Status.ARRIVED, Status.FULFILLED):
            return f"documented in the record system ({status})"
        if start <= now < end:
            return "under way"
        if end <= now:
            return "already took place"
        return None
    if action == BulkAction.NOSHOW:
        if status in CANCELLED_STATES:
            return f"already {status.replace('_', ' ')}"
        if status in (Status.ARRIVED, Status.FULFILLED):
            return f"documented in the record system ({status})"
        if start > now:
            return "has not started yet"
        return None
    if action == BulkAction.ATTENDED:
        if status in CANCELLED_STATES:
            return f"{status.replace('_', ' ')}, not attended"
        if status == Status.FULFILLED:
            return "already attended"
        if start > now:
            return "has not started yet"
        return None
    # waive: cancelled sessions that carry a fee
    fee = (appt.fields.get("cancellation") or {}).get("fee")
    if status not in CANCELLED_STATES or fee != Fee.CHARGE:
        return "carries no fee"
    return None


def _after(appt: Appointment, action: BulkAction, pv: dict[str, Any], now: datetime) -> tuple[dict[str, Any], str | None]:
    """The session's snapshot after the action, and the fee it carries."""
    fields = dict(appt.fields)
    if action in (BulkAction.CANCEL, BulkAction.NOSHOW):
        status, record = decide(
            pv["policy"], start=parse_iso(fields["start"]), now=now, via=pv["via"],
            tags=frozenset() if pv["charge_fee"] else frozenset({"waive"}),
            by=pv["by"] or (CancelledBy.CLIENT if action == BulkAction.NOSHOW else None),
            kind="no_show" if action == BulkAction.NOSHOW else "cancel", reason=pv["reason"],
        )
        if pv["note"]:
            record["note"] = pv["note"]
        fields |= {"status": status, "cancellation": record}
        return fields, record["fee"]
    if action == BulkAction.ATTENDED:
        fields["status"] = str(Status.FULFILLED)
        return fields, None
    record = dict(fields.get("cancellation") or {}) | {"fee": str(Fee.WAIVED)}
    if pv["note"]:
        record["note"] = pv["note"]
    fields["cancellation"] = record
    return fields, str(Fee.WAIVED)


def _billing(appt: Appointment, action: BulkAction) -> str:
    if action not in (BulkAction.CANCEL, BulkAction.NOSHOW):
        return "none"
    billing = appt.fields.get("billing")
    if billing in (Billing.BILLED, Billing.NEEDS_VOID):
        return "void"
    if billing in (None, Billing.PENDING):
        return "suppress"
    return "none"


def preview(
    store: Store, config: PracticeConfig, connectors: Mapping[str, Connector], selection: Selection, action: BulkAction, *,
    reason: str | None = None, note: str | None = None, by: str | None = None, charge_fee: bool = False, now: datetime | None = None,
) -> Preview:
    """What the operation would do; nothing is changed."""
    now = now or utcnow()
    unknown = [c for c in selection.clinicians if c not in config.clinicians]
    if unknown:
        raise BadSelection(f"no clinician {', '.join(map(repr, unknown))} in the configuration (known: {', '.join(config.clinicians)})")
    if selection.end <= selection.start:
        raise BadSelection("the date range ends before it starts")
    if by is not None and by not in {c.value for c in CancelledBy}:
        raise BadSelection(f"cancelled by {by!r}: use one of {', '.join(c.value for c in CancelledBy)}")
    if by is None and action == BulkAction.CANCEL:
        by = CancelledBy.CLINICIAN.value  # a session cancelled in bulk: the clinician is away, the practice closed
    pv = {"policy": config.policy.cancellation, "via": "bulk", "by": by, "reason": reason, "note": note, "charge_fee": charge_fee}
    planned: list[Planned] = []
    left: list[LeftOut] = []
    for appt in store.sessions_between(selection.clinicians, iso(selection.start), iso(selection.end)):
        f = appt.fields
        if selection.locations and f.get("location") not in selection.locations:
            continue
        why = _why_left_out(appt, action, now)
        if why is not None:
            left.append(LeftOut(appt.id, f["clinician"], f["start"], why))
            continue
        _, fee = _after(appt, action, pv, now)
        systems = tuple(sorted(
            link.connector for link, _ in store.links_for(appt.id) if not link.gone and link.external_id and link.connector in connectors
        ))
        planned.append(Planned(
            appt.id, appt.version, f["clinician"], f["start"], f["end"], f.get("service_code"), f.get("client_key"), f.get("location"),
            _status_after(appt, action), fee, systems, _billing(appt, action),
        ))
    digest = hashlib.sha256(repr((
        action.value, selection.as_dict(), reason, note, by, charge_fee, [(p.appointment_id, p.version) for p in planned],
    )).encode()).hexdigest()[:24]
    return Preview(action, selection, reason, note, by, charge_fee, tuple(planned), tuple(left), digest, iso(now))


def _status_after(appt: Appointment, action: BulkAction) -> str:
    return {BulkAction.CANCEL: str(Status.CANCELLED), BulkAction.NOSHOW: str(Status.NOSHOW),
            BulkAction.ATTENDED: str(Status.FULFILLED)}.get(action, appt.fields["status"])


def start(engine: Engine, shown: Preview, *, user: str, now: datetime | None = None) -> str:
    """Apply what ``shown`` previewed, as one audited operation; returns its id.

    Raises :class:`StaleSelection` when the sessions are no longer as previewed (one was changed,
    booked or cancelled meanwhile): nothing is changed then."""
    now = now or utcnow()
    again = preview(engine.store, engine.config, engine.connectors, shown.selection, shown.action, reason=shown.reason,
                    note=shown.note, by=shown.by, charge_fee=shown.charge_fee, now=parse_iso(shown.at))
    if again.token != shown.token:
        raise StaleSelection("the selected sessions changed since the preview; preview again before confirming")
    op_id = "op-" + secrets.token_hex(6)
    at = iso(now)
    with engine.store.tx() as tx:
        tx.add_operation(op_id, shown.action.value, shown.params(), at, user, [(p.appointment_id, p.version) for p in shown.planned])
        tx.audit.add(at, "bulk_operation", "bulk", None, {
            "operation": op_id, "action": shown.action.value, "by_user": user, "sessions": len(shown.planned),
            "left_out": len(shown.left_out), "selection": shown.selection.as_dict(), "reason": shown.reason,
        })
    log.info("bulk_operation_started", operation=op_id, action=shown.action.value, sessions=len(shown.planned), user=user)
    _run(engine, op_id, now)
    return op_id


def resume(engine: Engine, now: datetime | None = None) -> list[str]:
    """Finish operations interrupted before every session was changed; returns their ids."""
    ids = engine.store.unfinished_operations()
    for op_id in ids:
        log.info("bulk_operation_resumed", operation=op_id)
        _run(engine, op_id, now or utcnow())
    return ids


def _run(engine: Engine, op_id: str, now: datetime) -> None:
    """Change each pending session of the operation; one already changed (before a crash) is recognised."""
    op = engine.store.operation(op_id)
    if op is None:
        return
    action = BulkAction(op.action)
    params = op.params
    pv = {"policy": engine.config.policy.cancellation, "via": "bulk", "by": params.get("by"), "reason": params.get("reason"),
          "note": params.get("note"), "charge_fee": bool(params.get("charge_fee"))}
    for item in engine.store.operation_items(op_id):
        if item.state != "pending":
            continue
        appt = engine.store.appointment(item.appointment_id)
        state, version = "skipped", None
        if appt is not None and appt.version == item.seen_version:
            fields, _ = _after(appt, action, pv, now)
            version = engine.change(appt.id, fields, via="bulk", kind=_kind(action), detail={"operation": op_id, "user": op.created_by})
            state = "changed"
        elif appt is not None and _done_by(appt, action):
            state, version = "changed", appt.version  # changed by this operation before an interruption
        with engine.store.tx() as tx:
            tx.operation_item_done(op_id, item.appointment_id, state, version)
            if state == "skipped":
                tx.audit.add(iso(now), "bulk_skipped", "bulk", item.appointment_id, {"operation": op_id, "why": "changed since the preview"})
    with engine.store.tx() as tx:
        tx.finish_operation(op_id, iso(utcnow()))
        tx.audit.add(iso(utcnow()), "bulk_operation_applied", "bulk", None, {"operation": op_id})


def _done_by(appt: Appointment, action: BulkAction) -> bool:
    """Whether the session's newer version is a bulk change to what this operation wanted (written,
    then interrupted before it was recorded as done)."""
    return appt.updated_via == "bulk" and appt.fields["status"] == _status_after(appt, action)


def _kind(action: BulkAction) -> str:
    return {BulkAction.CANCEL: "cancelled", BulkAction.NOSHOW: "cancelled", BulkAction.ATTENDED: "attended"}.get(action, "fee_waived")


@dataclass(slots=True)
class SessionProgress:
    appointment_id: str
    clinician: str
    start: str
    state: str
    #: connector -> applied, pending, failed
    systems: dict[str, str] = field(default_factory=dict)
    billing: str | None = None


@dataclass(slots=True)
class Progress:
    operation: str
    action: str
    created_at: str
    created_by: str
    total: int
    changed: int
    skipped: int
    #: connector -> Counter of applied / pending / failed
    systems: dict[str, Counter[str]]
    billing: Counter[str]
    sessions: list[SessionProgress]

    @property
    def done(self) -> bool:
        """Every session changed in the record and settled in every system (applied, or failed and on the worklist)."""
        return self.changed + self.skipped == self.total and all(c["pending"] == 0 for c in self.systems.values())


def progress(store: Store, connectors: Mapping[str, Connector], op_id: str) -> Progress | None:
    """Where the operation stands, observed: a copy counts as applied once the system acknowledged
    the version the operation wrote (or a later one), no longer holds it, or holds what the
    session's current version asks of it (receipts.py)."""
    op = store.operation(op_id)
    if op is None:
        return None
    dead = {(d.connector, d.appointment_id) for d in store.dead_letters()}
    items = store.operation_items(op_id)
    appts = {a.id: a for a in store.appointments(i.appointment_id for i in items)}
    systems: dict[str, Counter[str]] = {}
    billing: Counter[str] = Counter()
    rows: list[SessionProgress] = []
    for item in items:
        appt = appts.get(item.appointment_id)
        row = SessionProgress(item.appointment_id, appt.fields["clinician"] if appt else "", appt.fields["start"] if appt else "", item.state)
        if appt is not None and item.version is not None:
            for link, _ in store.links_for(appt.id):
                if link.applied_version >= item.version or holds_current(link, appt, connectors.get(link.connector)):
                    state = "applied"
                elif (link.connector, appt.id) in dead:
                    state = "failed"
                else:
                    state = "pending"
                row.systems[link.connector] = state
                systems.setdefault(link.connector, Counter(applied=0, pending=0, failed=0))[state] += 1
            row.billing = appt.fields.get("billing")
            if row.billing:
                billing[row.billing] += 1
        rows.append(row)
    changed = sum(1 for i in items if i.state == "changed")
    skipped = sum(1 for i in items if i.state == "skipped")
    return Progress(op.id, op.action, op.created_at, op.created_by, len(items), changed, skipped, systems, billing, rows)


def operations(store: Store, connectors: Mapping[str, Connector], limit: int = 20) -> list[Progress]:
    """The newest operations with where each stands."""
    return [p for op in store.operations(limit) if (p := progress(store, connectors, op.id)) is not None]
