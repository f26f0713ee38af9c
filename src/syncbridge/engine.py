"""Observe, match, merge, commit (DESIGN section 4): one SQLite transaction per pulled batch.

The engine knows connectors only through :class:`~syncbridge.connector.Capabilities`. After every
change it decides, per connector, whether that copy differs from the canonical record (compared
in the connector's projection) and enqueues a state-based outbox row, or, for a read-only
system, opens a worklist item saying what a person must do.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from .audit import ROUTINE_KIND
from .config import PracticeConfig
from .connector import Capabilities, Connector, Link, Observation, PullResult
from .errors import CursorExpired, MalformedRecord, SyncbridgeError, error_kind
from .merge import merge
from .model import CANCELLED_STATES, Billing, Role, Snapshot, canonical_id_for, iso, new_tuple, parse_iso, utcnow, validate_snapshot
from .policy.cancellation import CANCELLING_TAGS
from .store import Store, dumps
from .tx import Tx

__all__ = ["Engine", "ObserveReport"]

log = structlog.get_logger("syncbridge.engine")


@dataclass(slots=True)
class ObserveReport:
    seen: int = 0
    created: int = 0
    updated: int = 0
    echoes: int = 0
    ignored: int = 0
    rejected: int = 0
    conflicts: int = 0
    held: bool = False
    changed_ids: list[str] = field(default_factory=list)
    #: accounts whose read failed while the others' went on (``PullResult.failed_accounts``)
    failed_accounts: dict[str, SyncbridgeError] = field(default_factory=dict)
    #: (clinician, start) of sessions booked, moved or cancelled in a directory (before and after):
    #: the directory may have changed its own slots on those dates (``publishes_availability``)
    touched: list[tuple[str, str]] = field(default_factory=list)
    #: the cursor was left alone: it was reset (``syncbridge resync``) while the pull was in flight
    reset: bool = False

    def add(self, other: ObserveReport) -> None:
        for name in ("seen", "created", "updated", "echoes", "ignored", "rejected", "conflicts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.held = self.held or other.held
        self.changed_ids.extend(other.changed_ids)
        self.failed_accounts.update(other.failed_accounts)
        self.touched.extend(other.touched)


class Engine:
    #: observations committed per transaction; a larger pull is committed in slices of this size
    commit_batch = 1000

    def __init__(
        self,
        store: Store,
        connectors: dict[str, Connector],
        config: PracticeConfig,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.connectors = connectors
        self.config = config
        self.clock = clock
        #: called with (connector, report) after each committed batch; the runtime hooks metrics here
        self.listeners: list[Callable[[str, ObserveReport], None]] = []
        self._shapes: dict[str, _Shape] = {}
        #: when each connector's copies were last checked for deletions (monotonic seconds)
        self._presence_at: dict[str, float] = {}

    def _shape(self, connector: Connector) -> _Shape:
        """The connector's projection and field order, built once per capabilities object."""
        caps = connector.capabilities
        shape = self._shapes.get(connector.name)
        if shape is None or shape.caps is not caps:
            shape = self._shapes[connector.name] = _Shape(caps)
        return shape

    def _shapes_now(self) -> dict[str, _Shape]:
        """Every connector's shape as its capabilities are now: looked up once per batch, not per change."""
        return {name: self._shape(c) for name, c in self.connectors.items()}

    # --- pulling ------------------------------------------------------------------------

    async def sync(self, name: str, *, full: bool = False, accounts: frozenset[str] | None = None) -> ObserveReport:
        """Pull ``name`` from its stored cursor (or from scratch) until it has nothing more; with
        ``accounts``, only those accounts (a push named them), when there is a cursor to go on from."""
        connector = self.connectors[name]
        stored = self.store.cursor(name)  # the cursor advances only from this (a reset meanwhile wins)
        cursor = None if full else stored
        total = ObserveReport()
        restarted = False
        while True:
            pulled_at = self.clock()
            scoped = accounts is not None and cursor is not None
            try:
                if accounts is not None and cursor is not None:
                    result = await connector.pull_accounts(cursor, accounts)
                else:
                    result = await connector.pull(cursor)
            except CursorExpired:
                log.warning("cursor_expired", connector=name)
                with self.store.tx() as tx:
                    tx.audit.add(iso(self.clock()), "cursor_expired", name, None, {})
                scoped = False
                result = await connector.pull(None)
            report = self.observe(name, result, pulled_at=pulled_at, advance_from=(stored,), scoped=scoped)
            total.add(report)
            if report.reset and not restarted:
                # `syncbridge resync` ran while this pull was in flight: what it read is merged, but
                # its cursor is not written back over the reset; the full listing asked for is made now
                log.info("resync_during_pull", connector=name)
                restarted = True
                stored, cursor = self.store.cursor(name), None
                continue
            if report.held or report.reset or not result.more:
                break
            stored = cursor = result.cursor
        if not total.held and not result.complete:  # a complete listing already found what is gone
            total.add(await self.presence(name))
        return total

    async def presence(self, name: str) -> ObserveReport:
        """Copies deleted in a system whose incremental reads never show a deletion (a FHIR search):
        asked about at most every ``presence_interval`` seconds, merged as that system's deletions."""
        connector = self.connectors[name]
        every = connector.presence_interval
        now = time.monotonic()
        if not every or now - self._presence_at.get(name, now - every) < every:
            return ObserveReport()
        self._presence_at[name] = now
        linked = self.store.linked_live(name, iso(self.clock() - timedelta(days=1)))
        try:
            gone = await connector.missing(linked) if linked else set()
        except SyncbridgeError as err:  # the pull itself went well; the next check asks again
            log.warning("presence_check_failed", connector=name, kind=error_kind(err), problem=str(err))
            return ObserveReport()
        if not gone:
            return ObserveReport()
        log.info("copies_deleted", connector=name, count=len(gone))
        return self.observe(name, PullResult([Observation(external_id=e, deleted=True) for e in sorted(gone)], cursor=None), advance=False)

    async def refresh(self, name: str, external_ids: list[str]) -> ObserveReport:
        """Re-read the records a notification named and observe them; the cursor stays where it is."""
        connector = self.connectors[name]
        observations = [await connector.read(ext) for ext in dict.fromkeys(external_ids)]
        return self.observe(name, PullResult(observations, cursor=None), advance=False)

    def observe(
        self, name: str, result: PullResult, *, advance: bool = True, pulled_at: datetime | None = None,
        advance_from: tuple[str | None] | None = None, scoped: bool = False,
    ) -> ObserveReport:
        """Commit one batch: canonical versions, links, audit, outbox rows and the cursor, atomically.

        With ``advance_from`` (the stored cursor the pull started from) the cursor moves only if the
        store still holds it; otherwise ``report.reset`` says it was reset meanwhile. A ``scoped``
        pull read some accounts only: it leaves the health the others' last pull left."""
        connector = self.connectors[name]
        now_dt = self.clock()
        now = iso(now_dt)
        observations = list(result.observations)
        if result.complete or result.listed_accounts:
            # Linked copies missing from a full listing are gone, except those we wrote after the
            # listing began: the listing could not have seen them.
            seen = {o.external_id for o in observations}
            since = (pulled_at or now_dt).timestamp()
            lo, hi = result.window or ("", "\uffff")
            # the sessions of an account that could not be read are not missing, just unread
            scope, accounts = (" NOT IN", sorted(result.failed_accounts)) if result.complete else (" IN", sorted(result.listed_accounts))
            # the sessions of these accounts only (a listing of some accounts), or of every account but these
            listed = self.store.linked_in_window(name, since, lo, hi, accounts, within=scope == " IN")
            observations += [Observation(external_id=ext, deleted=True) for ext in listed if ext not in seen]
        report = ObserveReport(seen=len(observations), failed_accounts=dict(result.failed_accounts))
        # A batch allocates tens of thousands of short-lived containers and no reference cycles;
        # left on, the cyclic collector would walk them (and the long-lived heap) dozens of times
        # per batch for nothing. Collection resumes, and catches up, when the batch is committed.
        collecting = gc.isenabled()
        gc.disable()
        try:
            cancelling = [o for o in observations if o.deleted or o.fields.get("status") in CANCELLED_STATES or not o.tags.isdisjoint(CANCELLING_TAGS)]
            if len(cancelling) >= self.config.policy.mass_cancel_guard.min_count:
                # too few cancellations to trip the guard need no transaction of their own
                with self.store.tx() as tx:
                    report.held = self._guard(tx, connector, cancelling, now)
            if not report.held:
                # A large pull (an initial sync reading back thousands of our own writes) commits in
                # slices, so what a transaction caches stays bounded; the cursor moves with the
                # last slice only, and a pull cut short by a crash is read again from the old
                # cursor, where the slices already committed come back as echoes.
                step = self.commit_batch
                for k in range(0, max(len(observations), 1), step):
                    last = k + step >= len(observations)
                    self._commit(name, connector, result, observations[k : k + step], report, now_dt, now, advance and last, advance_from, scoped)
        finally:
            if collecting:
                gc.enable()
        if not report.held:
            for listener in self.listeners:
                listener(name, report)
        return report

    def _commit(
        self, name: str, connector: Connector, result: PullResult, observations: list[Observation], report: ObserveReport,
        now_dt: datetime, now: str, advance: bool, advance_from: tuple[str | None] | None = None, scoped: bool = False,
    ) -> None:
        with self.store.tx() as tx:
            tx.prefetch(name, (o.external_id for o in observations), (o.canonical_id for o in observations if o.canonical_id))
            # records seen for the first time get ids derived from their external ids: loaded in
            # bulk too (usually finding nothing), so creating them needs no query of its own
            tx.prefetch(name, (), (
                canonical_id_for(name, o.external_id) for o in observations
                if not o.canonical_id and not o.deleted and not tx.knows_external(name, o.external_id)
            ))
            shapes = self._shapes_now()
            for obs in observations:
                try:
                    if obs.problem:
                        raise MalformedRecord(obs.problem)
                    self._observe_one(tx, connector, shapes, obs, now_dt, now, report)
                except MalformedRecord as err:
                    report.rejected += 1
                    tx.audit.add(now, "rejected", name, None, {"external_id": obs.external_id, "problem": str(err)})
                    log.warning("record_rejected", connector=name, external_id=obs.external_id, problem=str(err))
            if advance and not tx.set_cursor(name, result.cursor, now, full=result.complete, only_from=advance_from, keep_health=scoped):
                report.reset = True
            elif advance and result.failed_accounts:  # the others were read; health names the ones that were not
                tx.set_health(name, False, "could not read " + "; ".join(
                    f"{account} ({error_kind(err)}: {err})" for account, err in sorted(result.failed_accounts.items())))

    def _guard(self, tx: Tx, connector: Connector, cancelling: list[Observation], now: str) -> bool:
        """Mass-disappearance guard: hold a batch whose ``cancelling`` observations would cancel too much at once."""
        policy = self.config.policy.mass_cancel_guard
        live_ids = {ext for ext, status in tx.linked_statuses(connector.name) if status not in CANCELLED_STATES}
        would = sum(1 for o in cancelling if o.external_id in live_ids)
        if would < policy.min_count or would <= policy.max_share * len(live_ids):
            return False
        if tx.take_approved_hold(connector.name):
            tx.audit.add(now, "guard_released", connector.name, None, {"would_cancel": would, "linked": len(live_ids)})
            return False
        tx.hold(connector.name, now, would, len(live_ids))
        note = f"held a pull that would cancel {would} of {len(live_ids)} appointments"
        tx.set_health(connector.name, False, note)
        tx.open_work(
            f"guard:{connector.name}",
            "mass_cancel_guard",
            f"{connector.name} reported {would} of {len(live_ids)} linked sessions as cancelled or gone at once. "
            f"Check that the calendar or account is still shared and authorised. If the cancellations are real, "
            f"run `syncbridge worklist confirm` on this item to apply them.",
            now,
            connector=connector.name,
        )
        tx.audit.add(now, "guard_held", connector.name, None, {"would_cancel": would, "linked": len(live_ids)})
        log.error("mass_cancel_guard", connector=connector.name, would_cancel=would, linked=len(live_ids))
        return True

    def _match(self, tx: Tx, connector: Connector, obs: Observation) -> tuple[str | None, Link | None]:
        name = connector.name
        link = tx.link_by_external(name, obs.external_id)
        if link is not None:
            return link.appointment_id, link
        if obs.canonical_id:
            return obs.canonical_id, tx.link(name, obs.canonical_id)
        if connector.capabilities.role != Role.MIRROR and not obs.deleted:
            f = obs.fields
            if f.get("clinician") and f.get("start"):
                for appt_id, client_key in tx.unlinked_at(name, f["clinician"], f["start"]):
                    if f.get("client_key") and client_key == f["client_key"]:
                        return appt_id, None
        return None, None

    def _observe_one(
        self, tx: Tx, connector: Connector, shapes: dict[str, _Shape], obs: Observation, now_dt: datetime, now: str, report: ObserveReport
    ) -> None:
        name = connector.name
        shape = shapes[name]
        caps = shape.caps
        appt_id, link = self._match(tx, connector, obs)
        if link is not None and link.external_id == obs.external_id and not obs.deleted and obs.etag and obs.etag == link.etag:
            report.echoes += 1
            return
        if caps.publishes_availability:  # even a booking seen only once it was cancelled changed the directory's slots
            for seen in (obs.fields, link.base if link else None):
                if seen and seen.get("clinician") and seen.get("start"):
                    report.touched.append((seen["clinician"], seen["start"]))
        if obs.deleted and (link is not None and link.gone or link is None and obs.canonical_id is None):
            report.ignored += 1
            return
        appt = tx.appointment(appt_id) if appt_id else None
        outcome = merge(
            role=caps.role,
            project=shape.project,
            base=link.base if link else None,
            canonical=appt.fields if appt else None,
            canonical_updated_at=appt.updated_at if appt else None,
            obs=obs,
            policy=self.config.policy.cancellation,
            now=now_dt,
            via=name,
        )
        if outcome.action == "ignore":
            report.ignored += 1
            return
        snap: Snapshot
        if outcome.action == "noop":
            assert appt is not None
            snap, version = appt.fields, appt.version
        else:
            assert outcome.new is not None
            snap = outcome.new
            if appt is None:
                appt_id = appt_id or canonical_id_for(name, obs.external_id)
                version = 1
                report.created += 1
            else:
                version = appt.version + 1
                report.updated += 1
            assert appt_id is not None
            tx.put_appointment(appt_id, snap, version, now, name)
            self._billing_work(tx, appt_id, appt.fields if appt else None, snap, now, name)
            report.changed_ids.append(appt_id)
            tx.audit.add(now, ROUTINE_KIND, name, appt_id, {"version": version, "changed": outcome.changed, "status": snap["status"]})
        assert appt_id is not None
        for c in outcome.conflicts:
            report.conflicts += 1
            tx.audit.add(now, "conflict", name, appt_id, {"field": c.field, "winner": c.winner, "rule": c.rule})
        # the copy as observed becomes the base; when it shows the canonical record (the usual
        # case) its encoding is also what fan-out compares this connector's base with
        encoded: dict[int, str] = {}
        base_text = None
        if obs.deleted:
            base = dict(link.base or shape.project(snap)) if link else shape.project(snap)
            base["status"] = "cancelled"
        else:
            observed = obs.fields
            base = {f: observed.get(f) for f in shape.fields}
            if base == shape.project(snap):
                base_text = encoded[shape.key] = dumps(base)
        agreed: Snapshot | None = base
        if obs.stamp and not caps.read_only:
            # the copy lacks the canonical id: no agreed base, so the fan-out writes it back once
            agreed, base_text = None, None
        tx.put_link(new_tuple(Link, (name, appt_id, obs.external_id, obs.etag, agreed, version, obs.deleted)), base_text=base_text)
        if caps.confirms_bookings:
            tx.set_pending(name, appt_id, obs.external_id, obs.pending and not obs.deleted and snap["status"] not in CANCELLED_STATES, now)
        self.fan_out(tx, appt_id, snap, version, now, shapes, encoded)

    # --- local changes (CLI, the runtime's policies) ---------------------------------------

    def change(self, appt_id: str, snap: Snapshot, *, via: str, kind: str = "changed", detail: Mapping[str, Any] | None = None) -> int:
        """Commit a change made here (``syncbridge cancel``, a booking); returns the new version.
        ``detail`` joins the change's audit entry (the console user, a bulk operation's id)."""
        validate_snapshot(snap)
        now = iso(self.clock())
        with self.store.tx() as tx:
            current = tx.appointment(appt_id)
            version = (current.version if current else 0) + 1
            tx.put_appointment(appt_id, snap, version, now, via)
            self._billing_work(tx, appt_id, current.fields if current else None, snap, now, via)
            changed = [k for k in snap if current is None or current.fields.get(k) != snap[k]]
            tx.audit.add(now, kind, via, appt_id, {"version": version, "changed": changed, "status": snap["status"]} | dict(detail or {}))
            self.fan_out(tx, appt_id, snap, version, now, self._shapes_now())
        return version

    def _billing_work(self, tx: Tx, appt_id: str, old: Snapshot | None, new: Snapshot, now: str, via: str) -> None:
        """A claim already sent for a session that did not happen: a person must void it with the payer."""
        key = f"void:{appt_id}"
        if new.get("billing") == Billing.NEEDS_VOID and (old is None or old.get("billing") != Billing.NEEDS_VOID):
            when = parse_iso(new["start"]).astimezone(ZoneInfo(new["timezone"]))
            clinician = self.config.clinicians.get(new["clinician"])
            who = clinician.display_name if clinician and clinician.display_name else new["clinician"]
            tx.open_work(
                key, "void_claim",
                f"A claim was already submitted for the {when:%-I:%M %p} session of {who} on {when:%a %-d %b %Y}, "
                f"which was {new['status'].replace('_', ' ')}. Void or replace the claim with the payer in {via}.",
                now, via, appt_id,
            )
            tx.audit.add(now, "claim_needs_void", via, appt_id, {})
        elif old is not None and old.get("billing") == Billing.NEEDS_VOID and new.get("billing") != Billing.NEEDS_VOID:
            tx.close_work(key, now, via)

    # --- deciding who must converge ------------------------------------------------------

    def serves(self, connector: Connector, clinician: str) -> bool:
        if connector.clinicians:
            return clinician in connector.clinicians
        return connector.capabilities.role != Role.MIRROR

    def fan_out(
        self, tx: Tx, appt_id: str, snap: Snapshot, version: int, now: str, shapes: dict[str, _Shape], encoded: dict[int, str] | None = None
    ) -> None:
        """Enqueue every connector whose copy differs from ``snap``; open or close read-only work.

        A copy differs when the encoded projection differs from the stored base text: bases are
        stored in the same canonical encoding, so nothing stored needs decoding, and connectors
        sharing a projection (two calendars) share one encoding of it. ``encoded`` holds encodings
        the caller already made, by ``_Shape.key``; ``shapes`` is ``_shapes_now()``.
        """
        links = tx.stored_links(appt_id)
        cancelled = snap["status"] in CANCELLED_STATES
        stamp = time.time()
        encoded = {} if encoded is None else encoded
        for name, shape in shapes.items():
            caps = shape.caps
            row = links.get(name)
            if row is None or row[6]:
                needed = not cancelled and caps.accepts_new and self.serves(self.connectors[name], snap["clinician"])
                if row is not None and cancelled:
                    needed = False
            elif row[4] is None:
                needed = True
            else:
                text = encoded.get(shape.key)
                if text is None:
                    text = encoded[shape.key] = dumps(shape.project(snap))
                needed = text != row[4]
            if caps.read_only:
                work_key = f"readonly:{name}:{appt_id}"
                if needed:
                    tx.open_work(work_key, "manual_update", self.connectors[name].instruction(snap, caps.project(snap)), now, name, appt_id)
                elif tx.close_work(work_key, now, "observed"):
                    tx.audit.add(now, "worklist_closed", name, appt_id, {"key": work_key})
            elif needed:
                tx.enqueue(name, appt_id, version, stamp)


#: what makes two projections the same function -> the number standing for it (``_Shape.key``)
_SHAPE_KEYS: dict[Hashable, int] = {}


class _Shape:
    """A connector's projection, precomputed: the engine projects every change for every connector."""

    def __init__(self, caps: Capabilities) -> None:
        self.caps = caps
        self.fields = tuple(sorted(caps.fields))
        self.status_map = dict(caps.status_map)
        self.mapped = "status" in caps.fields and bool(self.status_map)
        #: a projection of the connector's own, used as is; None for the plain one
        self.own: Callable[[Snapshot], Snapshot] | None = caps.project if type(caps).project is not Capabilities.project else None
        #: equal for connectors whose projections are the same function of the snapshot: a small
        #: number standing for what makes them equal, as it is hashed for every connector of every change
        self.key: int = _SHAPE_KEYS.setdefault(
            id(caps) if self.own is not None else (self.fields, tuple(sorted(self.status_map.items())) if self.mapped else ()), len(_SHAPE_KEYS)
        )

    def project(self, snap: Snapshot) -> Snapshot:
        if self.own is not None:
            return self.own(snap)
        out = {f: snap.get(f) for f in self.fields}
        if self.mapped:
            status = out["status"]
            if isinstance(status, str):
                out["status"] = self.status_map.get(status, status)
        return out
