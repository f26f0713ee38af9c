"""Bulk operation pages (admins): a selection form, a preview of every change, one confirmation,
then the operation's progress. The engine side is ``syncbridge.operations``; nothing changes
until the confirmation, and the confirmation applies only what the preview showed (its token)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from ..model import parse_iso
from ..operations import BulkAction, Preview, Progress, Selection, operations, preview
from .auth import User
from .csrf import hidden
from .forms import Form
from .layout import e, notice, pill, table

if TYPE_CHECKING:
    from ..runtime import Daemon

__all__ = ["ACTIONS", "BadForm", "form_page", "preview_from", "preview_page", "progress_page"]

ACTIONS = {
    BulkAction.CANCEL: "Cancel the sessions",
    BulkAction.NOSHOW: "Mark them no-shows",
    BulkAction.ATTENDED: "Mark them attended",
    BulkAction.WAIVE: "Waive their fees",
}
_BILLING = {"suppress": "claim to be suppressed", "void": "claim already sent: needs voiding", "none": "no claim change"}


class BadForm(ValueError):
    """The selection form cannot be read (a missing date, no clinician): the message says what to fix."""


def _who(daemon: Daemon, key: str) -> str:
    c = daemon.config.clinicians.get(key)
    return c.display_name if c and c.display_name else key


def _local(daemon: Daemon, clinician: str, when: str) -> str:
    t = parse_iso(when).astimezone(ZoneInfo(daemon.config.clinician_zone(clinician)))
    return f"{t:%a %d %b %H:%M} {t.tzname()}"


def form_page(daemon: Daemon, user: User, values: Form | None = None, error: str | None = None) -> str:
    """The selection form (filled in again after a refusal), and the recent operations."""
    v = values or Form({})
    chosen = set(v.all("clinician"))
    today = datetime.now(ZoneInfo(daemon.config.practice.timezone)).date()
    boxes = "".join(
        f'<label class="check"><input type="checkbox" name="clinician" value="{e(k)}" id="b-c-{e(k)}"{" checked" if k in chosen else ""}> {e(_who(daemon, k))}</label>'
        for k in daemon.config.clinicians
    )
    action = v.get("action") or BulkAction.CANCEL.value
    radios = "".join(
        f'<label class="check"><input type="radio" name="action" value="{a.value}" id="b-a-{a.value}"{" checked" if a.value == action else ""}> {e(label)}</label>'
        for a, label in ACTIONS.items()
    )
    by_now = v.get("by") or "practice"
    by = "".join(f'<option value="{o}"{" selected" if o == by_now else ""}>{o}</option>' for o in ("practice", "clinician", "client"))
    recent = [
        [f'<a href="/console/operations/{e(p.operation)}">{e(p.operation)}</a>', e(p.action), e(p.created_by), e(p.created_at),
         e(f"{p.changed} of {p.total}"), pill("done", "live") if p.done else pill("in progress", "pending")]
        for p in operations(daemon.store, daemon.connectors, 10)
    ]
    return (
        (notice(error, "error") if error else "")
        + f'<form class="action" method="post" action="/console/bulk/preview">{hidden(user)}'
        f'<fieldset><legend>Clinicians</legend>{boxes}</fieldset>'
        f'<label for="b-from">First day</label><input type="date" id="b-from" name="start" required value="{e(v.get("start") or today.isoformat())}">'
        f'<label for="b-to">Last day (included)</label><input type="date" id="b-to" name="end" required value="{e(v.get("end") or today.isoformat())}">'
        f'<label for="b-loc">Locations (comma separated; empty: any)</label><input type="text" id="b-loc" name="locations" value="{e(v.get("locations") or "")}">'
        f'<fieldset><legend>Action</legend>{radios}</fieldset>'
        f'<label for="b-by">Cancelled by (cancel, no-show)</label><select id="b-by" name="by">{by}</select>'
        f'<label class="check"><input type="checkbox" name="charge_fee" value="1" id="b-fee"{" checked" if v.flag("charge_fee") else ""}> Charge late-cancel and no-show fees as the policy says (unticked: waived)</label>'
        f'<label for="b-reason">Reason (kept in the store and the EHR only)</label><input type="text" id="b-reason" name="reason" maxlength="500" value="{e(v.get("reason") or "")}">'
        f'<label for="b-note">Note</label><input type="text" id="b-note" name="note" maxlength="500" value="{e(v.get("note") or "")}">'
        '<button type="submit">Preview</button></form>'
        f'<h2>Recent operations</h2>{table(["operation", "action", "by", "confirmed", "sessions changed", "state"], recent, "none yet", "Recent operations")}'
    )


def _day(text: str | None, label: str) -> date:
    try:
        return date.fromisoformat(text or "")
    except ValueError:
        raise BadForm(f"{label}: give a date (YYYY-MM-DD)") from None


def preview_from(daemon: Daemon, form: Form, *, at: datetime | None = None) -> Preview:
    """The preview a submitted selection form asks for (``at``: as of that time, to confirm it)."""
    clinicians = tuple(c for c in form.all("clinician") if c)
    if not clinicians:
        raise BadForm("choose at least one clinician")
    first, last = _day(form.get("start"), "first day"), _day(form.get("end"), "last day")
    if last < first:
        raise BadForm("the last day is before the first")
    if (last - first).days > 366:
        raise BadForm("choose at most a year")
    try:
        action = BulkAction(form.get("action") or "")
    except ValueError:
        raise BadForm("choose an action") from None
    zone = ZoneInfo(daemon.config.practice.timezone)
    locations = tuple(x.strip() for x in (form.get("locations") or "").split(",") if x.strip())
    selection = Selection(clinicians, datetime.combine(first, time.min, zone), datetime.combine(last + timedelta(days=1), time.min, zone), locations)
    return preview(
        daemon.store, daemon.config, daemon.connectors, selection, action, reason=form.text("reason"), note=form.text("note"),
        by=form.get("by") or None, charge_fee=form.flag("charge_fee"), now=at,
    )


def _echo(form: Form, names: Sequence[str]) -> str:
    """The selection again, as hidden fields of the confirmation form."""
    out = []
    for name in names:
        for value in form.all(name):
            out.append(f'<input type="hidden" name="{e(name)}" value="{e(value)}">')
    return "".join(out)


def preview_page(daemon: Daemon, user: User, form: Form, shown: Preview, error: str | None = None) -> str:
    """Every session that would change and how, those left out and why, and one confirmation button."""
    summary: dict[str, Any] = shown.summary()
    systems = sorted(k.removeprefix("system:") for k in summary if k.startswith("system:"))
    per_system = ", ".join(f"{summary['system:' + s]} in {s}" for s in systems) or "no system copies"
    claims = ", ".join(f"{n} {_BILLING.get(k.removeprefix('billing:'), k)}" for k, n in sorted(summary.items()) if k.startswith("billing:"))
    planned = [
        [e(_who(daemon, p.clinician)), e(_local(daemon, p.clinician, p.start)), e(p.service_code or "-"), f"<code>{e(p.client_key or '-')}</code>",
         e(p.location or "-"), e(p.status_after.replace("_", " ")), e(p.fee or "-"),
         " ".join(pill(s, "pending") for s in p.systems) or '<span class="muted">none</span>', e(_BILLING.get(p.billing, p.billing))]
        for p in shown.planned
    ]
    left = [[e(_who(daemon, x.clinician)), e(_local(daemon, x.clinician, x.start)), e(x.why)] for x in shown.left_out]
    confirm = ""
    if shown.planned:
        confirm = (
            f'<form class="action" method="post" action="/console/bulk/confirm">{hidden(user)}'
            + _echo(form, ("clinician", "start", "end", "locations", "action", "by", "charge_fee", "reason", "note"))
            + f'<input type="hidden" name="token" value="{e(shown.token)}"><input type="hidden" name="at" value="{e(shown.at)}">'
            f'<p>{e(ACTIONS[shown.action])}: {len(shown.planned)} sessions. This cannot be undone from here.</p>'
            f'<button type="submit" class="danger">Confirm: {e(ACTIONS[shown.action].lower())} ({len(shown.planned)})</button></form>'
        )
    return (
        (notice(error, "error") if error else "")
        + f'<p class="big" id="summary">{len(shown.planned)} sessions would change; {len(shown.left_out)} left out</p>'
        f"<p>Copies to change: {e(per_system)}.{(' Claims: ' + e(claims) + '.') if claims else ''}</p>"
        + confirm
        + f'<h2>Would change</h2>{table(["clinician", "time", "service", "client key", "location", "status after", "fee", "systems", "claim"], planned, "nothing in this selection", "Would change")}'
        f'<h2>Left out</h2>{table(["clinician", "time", "why"], left, "none", "Left out")}'
        '<p><a href="/console/bulk">Change the selection</a></p>'
    )


def progress_page(daemon: Daemon, p: Progress) -> str:
    state = pill("done", "live") if p.done else pill("in progress", "pending")
    systems = [
        [e(name), e(c["applied"]), e(c["pending"]), e(c["failed"])] for name, c in sorted(p.systems.items())
    ]
    billing = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(p.billing.items())) or "-"
    rows = [
        [f'<a href="/console/appointments/{e(s.appointment_id)}">{e(_local(daemon, s.clinician, s.start) if s.start else s.appointment_id)}</a>',
         e(_who(daemon, s.clinician)), e(s.state),
         " ".join(pill(f"{k}: {v}", {"applied": "live", "pending": "pending", "failed": "dead"}.get(v, "none")) for k, v in sorted(s.systems.items())),
         e((s.billing or "-").replace("_", " "))]
        for s in p.sessions
    ]
    return (
        f'<p class="big" id="progress">{e(p.action)}: {p.changed} of {p.total} sessions changed{f", {p.skipped} skipped" if p.skipped else ""} {state}</p>'
        f'<p class="muted">Operation {e(p.operation)}, confirmed by {e(p.created_by)} at {e(p.created_at)}. Billing: {e(billing)}.</p>'
        + ("" if p.done else '<p class="muted">This page reloads every 2 seconds until every system has the change.</p>')
        + f'<h2>Systems</h2>{table(["system", "applied", "pending", "failed"], systems, "no system copies", "Systems")}'
        f'<h2>Sessions</h2>{table(["time", "clinician", "state", "systems", "billing"], rows, "none", "Sessions")}'
    )
