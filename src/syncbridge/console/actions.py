"""What the console changes, each exactly as the command line does it, audited with the user's name.

A cancellation goes through ``Engine.change`` with the practice's cancellation policy (as
``syncbridge cancel``), closing or confirming a worklist item and retrying a dead letter do what
``syncbridge worklist`` and ``syncbridge retry`` do. Each is followed by a ``console_*`` audit entry
naming the user; the audit never holds client data, only ids, kinds and the note a user typed.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from ..errors import SyncbridgeError
from ..model import CANCELLED_STATES, CancelKind, CancelledBy, iso, utcnow
from ..policy.cancellation import decide
from ..store import Store, WorkItem

if TYPE_CHECKING:
    from ..runtime import Daemon

__all__ = ["ActionRefused", "cancel_session", "close_work", "confirm_held", "record_refusal", "retry_dead"]

log = structlog.get_logger("syncbridge.console")

VIA = "console"


class ActionRefused(SyncbridgeError):
    """The action cannot be done as asked (already cancelled, no such item); the message says why."""

    kind = "refused"


def _audit(store: Store, kind: str, user: str, appointment_id: str | None, detail: dict[str, Any], connector: str | None = VIA) -> None:
    with store.tx() as tx:
        tx.audit.add(iso(utcnow()), kind, connector, appointment_id, {"user": user, **detail})


def record_refusal(store: Store, user: str, tried: str, why: str) -> None:
    """A refused POST (no or wrong CSRF token, a role that may not act): in the audit, and the log."""
    _audit(store, "console_refused", user, None, {"tried": tried, "why": why})
    log.warning("console_refused", user=user, tried=tried, why=why)


def cancel_session(
    daemon: Daemon, user: str, appointment_id: str, *, by: str, reason: str | None, waive: bool, noshow: bool = False,
    now: datetime | None = None,
) -> tuple[int, dict[str, Any]]:
    """Cancel one session (or mark it a no-show) as ``syncbridge cancel`` would; (new version, record)."""
    appt = daemon.store.appointment(appointment_id)
    if appt is None:
        raise ActionRefused(f"no appointment {appointment_id}")
    if appt.fields["status"] in CANCELLED_STATES:
        raise ActionRefused(f"this session is already {appt.fields['status'].replace('_', ' ')}")
    if by not in {c.value for c in CancelledBy}:
        raise ActionRefused(f"cancelled by {by!r}: choose client, clinician or practice")
    now = now or utcnow()
    tags = frozenset({"waive"}) if waive else frozenset()
    kind = CancelKind.NO_SHOW.value if noshow else None
    status, record = decide(daemon.config.policy.cancellation, start=appt.start, now=now, via=VIA, tags=tags, by=by, kind=kind, reason=reason)
    version = daemon.engine.change(appt.id, dict(appt.fields) | {"status": status, "cancellation": record}, via=VIA, kind="cancelled",
                                   detail={"user": user, "action": "noshow" if noshow else "cancel"})
    log.info("console_cancel", user=user, appointment=appt.id, kind=record["kind"], version=version)
    daemon.poke.set()  # the outbox sends it now rather than at its next tick
    return version, record


def _open_item(store: Store, item_id: int) -> WorkItem:
    item = next((w for w in store.worklist() if w.id == item_id), None)
    if item is None:
        raise ActionRefused(f"no open worklist item {item_id}")
    return item


def close_work(store: Store, user: str, item_id: int, note: str | None) -> WorkItem:
    """Close a worklist item a person has dealt with, keeping their note in the audit."""
    item = _open_item(store, item_id)
    now = iso(utcnow())
    with store.tx() as tx:
        tx.close_work(item.key, now, f"{VIA}:{user}")
        tx.audit.add(now, "worklist_close", item.connector, item.appointment_id, {"key": item.key, "user": user, "via": VIA, "note": note})
    log.info("console_worklist_close", user=user, item=item.id, kind=item.kind)
    return item


def confirm_held(daemon: Daemon, user: str, item_id: int) -> WorkItem:
    """Let a held pull's cancellations through (the mass-cancel guard), as ``syncbridge worklist confirm``."""
    item = _open_item(daemon.store, item_id)
    if item.kind != "mass_cancel_guard" or item.connector is None:
        raise ActionRefused("only a held pull (mass-cancel guard) can be confirmed; close other items with a note")
    now = iso(utcnow())
    with daemon.store.tx() as tx:
        tx.approve_held(item.connector)
        tx.close_work(item.key, now, f"{VIA}:{user}")
        tx.audit.add(now, "worklist_confirm", item.connector, None, {"key": item.key, "user": user, "via": VIA})
    log.info("console_worklist_confirm", user=user, item=item.id, connector=item.connector)
    daemon.wake(item.connector)  # the next pull applies what was held
    return item


def retry_dead(daemon: Daemon, user: str, connector: str, appointment_id: str) -> None:
    """Queue a dead-lettered write again now, as ``syncbridge retry``."""
    if connector not in daemon.connectors:
        raise ActionRefused(f"no connector {connector!r}")
    appt = daemon.store.appointment(appointment_id)
    if appt is None:
        raise ActionRefused(f"no appointment {appointment_id}")
    now = iso(utcnow())
    with daemon.store.tx() as tx:
        tx.outbox_now(connector, appt.id, appt.version, time.time())
        tx.close_work(f"dead:{connector}:{appt.id}", now, f"{VIA}:{user}")
        tx.audit.add(now, "console_retry", connector, appt.id, {"user": user, "version": appt.version})
    log.info("console_retry", user=user, connector=connector, appointment=appt.id)
    daemon.poke.set()
