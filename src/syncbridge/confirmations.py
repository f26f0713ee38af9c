"""Bookings a channel holds unconfirmed (Zocdoc ``pending_booking``), confirmed once they are recorded.

A directory booking with manual confirmation is a request until the practice confirms it: the
client is told only then. syncbridge confirms it through the channel's API as soon as the record
system (the EHR) holds the session, so nobody is confirmed into a session the practice has no
record of; a practice that confirms by hand gets a worklist item instead
(``Connector.confirm_by_hand``). The store keeps every pending booking (the engine notes them as it
merges) until the channel shows it confirmed, cancelled or gone; the status page lists them.
Failures follow DESIGN section 9: a transient one is tried again after the connector's backoff,
any other is noted beside the booking and the booking re-read.
"""

from __future__ import annotations

import time
from zoneinfo import ZoneInfo

import structlog

from .connector import Connector
from .engine import Engine
from .errors import SyncbridgeError, TransientError, error_kind
from .model import Appointment, Role, iso, utcnow
from .retry import Backoff
from .store import PendingBooking

__all__ = ["Confirmer"]

log = structlog.get_logger("syncbridge.confirmations")


class Confirmer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        cfg = engine.config.outbox
        self.backoff = Backoff(cfg.backoff_base, cfg.backoff_max)
        #: (connector, appointment) -> when a confirmation that failed for good may be tried again
        self._resting: dict[tuple[str, str], float] = {}

    def recorded(self, appt: Appointment) -> str | None:
        """The record system holding the session (its name), "" when none serves the clinician, None when not yet."""
        records = [c for c in self.engine.connectors.values()
                   if c.capabilities.role == Role.RECORD and self.engine.serves(c, appt.fields["clinician"])]
        if not records:
            return ""
        for c in records:
            link = self.engine.store.link(c.name, appt.id)
            if link is not None and link.external_id and not link.gone:
                return c.name
        return None

    async def run(self) -> int:
        """Confirm (or ask a person to confirm) every pending booking now recorded; returns those confirmed."""
        confirmed = 0
        store = self.engine.store
        for row in store.pending_bookings():
            connector = self.engine.connectors.get(row.connector)
            appt = store.appointment(row.appointment_id)
            if connector is None or appt is None or appt.cancelled:
                self._forget(row)
                continue
            record = self.recorded(appt)
            if record is None:
                continue  # the EHR write is still on its way (or waiting out its own backoff)
            if connector.confirm_by_hand:
                self._ask(connector, appt, row, record)
                continue
            if self.backoff.wait(row.connector) > 0 or self._resting.get((row.connector, row.appointment_id), 0) > time.time():
                continue
            if await self._confirm(connector, row):
                confirmed += 1
        self._close_done()
        return confirmed

    def _close_done(self) -> None:
        """Close the items of bookings no longer pending (confirmed by the practice, cancelled, gone)."""
        store = self.engine.store
        pending = {_work_key(r) for r in store.pending_bookings()}
        now = iso(utcnow())
        with store.tx() as tx:
            for key in tx.open_work_keys("confirm:"):
                if key not in pending and tx.close_work(key, now, "observed"):
                    tx.audit.add(now, "worklist_closed", None, None, {"key": key})

    async def _confirm(self, connector: Connector, row: PendingBooking) -> bool:
        try:
            await connector.confirm(row.external_id)
        except SyncbridgeError as err:
            message = f"{error_kind(err)}: {err}"[:300]
            if isinstance(err, TransientError):
                delay = self.backoff.failed(row.connector, err.retry_after)
            else:  # refused: read the booking again (it may have been cancelled there) and retry slowly
                delay = self.engine.config.outbox.backoff_max
                self._resting[(row.connector, row.appointment_id)] = time.time() + delay
                await self._reread(row)
            with self.engine.store.tx() as tx:
                tx.pending_failed(row.connector, row.appointment_id, message)
            log.warning("confirm_failed", connector=row.connector, appointment=row.appointment_id, kind=error_kind(err), retry_in=round(delay, 1))
            return False
        self.backoff.succeeded(row.connector)
        self._resting.pop((row.connector, row.appointment_id), None)
        with self.engine.store.tx() as tx:
            tx.audit.add(iso(utcnow()), "booking_confirmed", row.connector, row.appointment_id, {})
        await self._reread(row)  # the channel now shows it confirmed: the engine clears it
        return True

    async def _reread(self, row: PendingBooking) -> None:
        try:
            await self.engine.refresh(row.connector, [row.external_id])
        except SyncbridgeError as err:  # the next pull reads it anyway
            log.warning("confirm_reread_failed", connector=row.connector, kind=error_kind(err))

    def _ask(self, connector: Connector, appt: Appointment, row: PendingBooking, record: str) -> None:
        local = appt.start.astimezone(ZoneInfo(appt.fields["timezone"]))
        clinician = self.engine.config.clinicians.get(appt.fields["clinician"])
        who = clinician.display_name if clinician and clinician.display_name else appt.fields["clinician"]
        where = f" It is recorded in {record}." if record else ""
        text = (f"Confirm the {connector.name} booking of {who} on {local:%a %-d %b %Y %-I:%M %p} in {connector.name} "
                f"(appointment {appt.id}, {connector.name} id {row.external_id}): the client waits for it.{where}")
        with self.engine.store.tx() as tx:
            tx.open_work(_work_key(row), "confirm_booking", text, iso(utcnow()), row.connector, row.appointment_id)

    def _forget(self, row: PendingBooking) -> None:
        now = iso(utcnow())
        with self.engine.store.tx() as tx:
            tx.set_pending(row.connector, row.appointment_id, row.external_id, False, now)
            tx.close_work(_work_key(row), now, "observed")


def _work_key(row: PendingBooking) -> str:
    return f"confirm:{row.connector}:{row.appointment_id}"
