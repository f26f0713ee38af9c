"""The console's read pages: sessions per clinician, an appointment's receipt, the worklist, status.

Client data stays out: a session is shown by its clinician, time, service code and the opaque
client key the EHR or directory gave it. The canonical record holds no client names, so there
are none to show.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote
from zoneinfo import ZoneInfo

from ..model import Appointment, iso, utcnow
from ..receipts import holds_current, receipt
from ..statuspage import status_sections
from .auth import Action, User
from .csrf import hidden
from .layout import e, pill, table

if TYPE_CHECKING:
    from ..runtime import Daemon

__all__ = ["appointment_page", "parse_day", "sessions_page", "status_page", "system_states", "week_of", "worklist_page"]

#: how each copy of a session stands, as the pill shows it
STATE_CLASS = {"live": "live", "applied": "live", "removed": "removed", "pending write": "pending", "dead letter": "dead", "not linked": "none"}


def _who(daemon: Daemon, clinician: str) -> str:
    c = daemon.config.clinicians.get(clinician)
    return c.display_name if c and c.display_name else clinician


def _local(daemon: Daemon, appt: Appointment) -> datetime:
    return appt.start.astimezone(ZoneInfo(daemon.config.clinician_zone(appt.fields["clinician"])))


def week_of(day: date) -> tuple[date, date]:
    """From ``day`` to the Sunday that ends its week, inclusive."""
    return day, day + timedelta(days=6 - day.weekday())


def system_states(daemon: Daemon, appt: Appointment, dead: set[tuple[str, str]]) -> list[tuple[str, str, str | None]]:
    """(connector, state, applied at) for every system that holds or should hold this session."""
    links = {link.connector: (link, at) for link, at in daemon.store.links_for(appt.id)}
    out = []
    for name, connector in daemon.connectors.items():
        found = links.get(name)
        if found is None:
            if daemon.engine.serves(connector, appt.fields["clinician"]) and not appt.cancelled:
                out.append((name, "dead letter" if (name, appt.id) in dead else "pending write", None))
            continue
        link, at = found
        if (name, appt.id) in dead:
            state = "dead letter"
        elif link.gone:
            state = "removed"
        elif not holds_current(link, appt, connector):
            state = "pending write"
        else:
            state = "applied" if appt.cancelled else "live"
        out.append((name, state, at))
    for name, (link, at) in links.items():  # a connector no longer configured
        if name not in daemon.connectors:
            out.append((name, "removed" if link.gone else "not linked", at))
    return out


def _pills(states: list[tuple[str, str, str | None]]) -> str:
    return " ".join(pill(f"{name}: {state}", STATE_CLASS.get(state, "none")) for name, state, _ in states) or '<span class="muted">none</span>'


def sessions_page(daemon: Daemon, first: date, clinician: str | None) -> str:
    """Sessions from ``first`` to the end of its week, per clinician, each with its state in every system."""
    cfg, store = daemon.config, daemon.store
    zone = ZoneInfo(cfg.practice.timezone)
    start_day, last_day = week_of(first)
    # a day or so either side: clinicians may keep another zone than the practice's
    lo = datetime.combine(start_day, time.min, zone) - timedelta(days=1)
    hi = datetime.combine(last_day + timedelta(days=1), time.min, zone) + timedelta(days=1)
    keys = [clinician] if clinician in cfg.clinicians else list(cfg.clinicians)
    dead = {(d.connector, d.appointment_id) for d in store.dead_letters()}
    sections = []
    for key in keys:
        ctz = ZoneInfo(cfg.clinician_zone(key))
        rows = []
        for appt in _sessions(daemon, key, iso(lo), iso(hi)):
            local = appt.start.astimezone(ctz)
            if not start_day <= local.date() <= last_day:
                continue
            f = appt.fields
            status = f["status"].replace("_", " ")
            rows.append([
                f'<a href="/console/appointments/{e(appt.id)}">{e(local.strftime("%a %d %b %H:%M"))}</a> <span class="muted">{e(local.tzname())}</span>',
                f'<span class="{"bad" if appt.cancelled else "ok"}">{e(status)}</span>',
                e(f.get("service_code") or "-"), f"<code>{e(f.get('client_key') or '-')}</code>", e(f.get("location") or f.get("modality")),
                _pills(system_states(daemon, appt, dead)),
            ])
        title = f"{_who(daemon, key)}"
        sections.append(
            f'<section aria-labelledby="c-{e(key)}"><h2 id="c-{e(key)}">{e(title)}</h2>'
            + table(["time", "status", "service", "client key", "where", "systems"], rows, "no sessions this week", f"Sessions of {title}")
            + "</section>"
        )
    today = datetime.now(zone).date()
    prev_week = start_day - timedelta(days=start_day.weekday() + 7)
    next_week = start_day + timedelta(days=7 - start_day.weekday())
    options = "".join(
        f'<option value="{e(k)}"{" selected" if k == clinician else ""}>{e(_who(daemon, k))}</option>' for k in cfg.clinicians
    )
    span = "Today and the rest of this week" if start_day == today else f"{start_day:%a %d %b} to {last_day:%a %d %b %Y}"
    picker = (
        '<form method="get" action="/console/sessions" class="action">'
        f'<label for="f-date">From</label><input type="date" id="f-date" name="date" value="{start_day.isoformat()}">'
        f'<label for="f-clin">Clinician</label><select id="f-clin" name="clinician"><option value="">All clinicians</option>{options}</select>'
        '<button type="submit" class="secondary">Show</button></form>'
    )
    nav = (
        f'<p><a href="/console/sessions?date={prev_week.isoformat()}">Previous week</a> · <a href="/console/sessions">Today</a> · '
        f'<a href="/console/sessions?date={next_week.isoformat()}">Next week</a></p>'
    )
    return f'<p class="big">{e(span)}</p>{nav}{picker}' + "".join(sections)


def _sessions(daemon: Daemon, clinician: str, start: str, end: str) -> list[Appointment]:
    """Every session of the clinician in [start, end), cancelled ones too."""
    return daemon.store.sessions_between([clinician], start, end)


def _receipt_line(daemon: Daemon, appt: Appointment) -> str:
    found = receipt(daemon.store, daemon.connectors, appt)
    done, total, seconds = found.done, found.total, found.seconds
    verb = {"cancelled": "Cancelled", "noshow": "No-show recorded"}.get(appt.fields["status"], "Current version")
    took = f" in {max(seconds, 0):.1f} s" if seconds is not None else ""
    return f"{verb} in {done} of {total} systems{took}"


def appointment_page(daemon: Daemon, appt: Appointment, user: User) -> str:
    """The receipt: where the current version landed and when, billing, the history; the actions a user may take."""
    f = appt.fields
    local = _local(daemon, appt)
    dead = {(d.connector, d.appointment_id) for d in daemon.store.dead_letters()}
    states = system_states(daemon, appt, dead)
    facts = [
        ("Clinician", _who(daemon, f["clinician"])), ("Time", f"{local:%a %d %b %Y %H:%M} {local.tzname()}"),
        ("Status", f["status"].replace("_", " ")), ("Service", f.get("service_code") or "-"), ("Client key", f.get("client_key") or "-"),
        ("Where", f.get("location") or f.get("modality") or "-"), ("Billing", (f.get("billing") or "-").replace("_", " ")),
        ("Version", appt.version), ("Last change", f"{appt.updated_at} via {appt.updated_via}"),
    ]
    record = f.get("cancellation") or {}
    if record:
        facts += [("Cancelled", f"{record.get('kind', '').replace('_', ' ')} by {record.get('by')}, fee {record.get('fee')}, via {record.get('via')}")]
        if record.get("reason"):
            facts.append(("Reason", record["reason"]))
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    rows = [[e(name) + item_link(daemon, name, appt.id), pill(state, STATE_CLASS.get(state, "none")), e(at or "-")] for name, state, at in states]
    history = [
        [e(x["at"]), e(x["kind"].replace("_", " ")), e(x["connector"] or ""), e(_detail(x["detail"]))]
        for x in daemon.store.audit_entries(appointment_id=appt.id, limit=100)
    ]
    body = (
        f'<p class="big" id="receipt">{e(_receipt_line(daemon, appt))}</p>'
        f'<dl class="facts">{dl}</dl>'
        f'<h2>Systems</h2>{table(["system", "copy", "current version applied at"], rows, "no system holds this session", "Systems")}'
        f"{_actions(appt, user)}"
        f'<h2>History</h2>{table(["when", "what", "through", "detail"], history, "nothing recorded", "History")}'
    )
    return body


def _detail(detail: dict[str, object]) -> str:
    """The audit detail without free text (reasons and notes stay on the page that owns them)."""
    keep = ("version", "status", "user", "kind", "by", "fee", "gone", "error", "operation", "changed")
    parts = []
    for k in keep:
        if k in detail and detail[k] not in (None, [], ""):
            v = detail[k]
            parts.append(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}")
    return "; ".join(parts)


def _actions(appt: Appointment, user: User) -> str:
    if appt.cancelled or not (user.may(Action.CANCEL) or user.may(Action.NOSHOW)):
        return ""
    by = "".join(f'<option value="{v}"{" selected" if v == "client" else ""}>{v}</option>' for v in ("client", "clinician", "practice"))
    cancel = (
        f'<form class="action" method="post" action="/console/appointments/{e(appt.id)}/cancel" aria-labelledby="cancel-h">'
        f'<h2 id="cancel-h">Cancel this session</h2>{hidden(user)}'
        f'<label for="c-by">Cancelled by</label><select id="c-by" name="by">{by}</select>'
        '<label for="c-reason">Reason (kept in the store and the EHR only)</label><textarea id="c-reason" name="reason" maxlength="500"></textarea>'
        '<label class="check"><input type="checkbox" name="waive" value="1" id="c-waive"> Waive any late-cancel fee</label>'
        '<button type="submit" class="danger">Cancel session</button></form>'
    )
    started = appt.start <= utcnow()
    noshow = (
        f'<form class="action" method="post" action="/console/appointments/{e(appt.id)}/noshow" aria-labelledby="noshow-h">'
        f'<h2 id="noshow-h">Mark as no-show</h2>{hidden(user)}'
        + ('' if started else '<p class="muted">This session has not started yet.</p>')
        + '<label for="n-reason">Note (optional)</label><textarea id="n-reason" name="reason" maxlength="500"></textarea>'
        '<label class="check"><input type="checkbox" name="waive" value="1" id="n-waive"> Waive the no-show fee</label>'
        '<button type="submit" class="danger">Mark no-show</button></form>'
    )
    return cancel + noshow


def worklist_page(daemon: Daemon, user: User) -> str:
    store = daemon.store
    rows = []
    for w in store.worklist():
        actions = []
        if user.may(Action.CONFIRM_HELD) and w.kind == "mass_cancel_guard":
            actions.append(
                f'<form class="inline" method="post" action="/console/worklist/{w.id}/confirm">{hidden(user)}'
                f'<button type="submit" class="danger" aria-label="Confirm the held cancellations of {e(w.connector)}">Confirm held cancellations</button></form>'
            )
        if user.may(Action.RETRY) and w.kind == "dead_letter" and w.connector and w.appointment_id:
            actions.append(_retry_form(user, w.connector, w.appointment_id))
        if user.may(Action.CLOSE_WORK):
            actions.append(
                f'<form method="post" action="/console/worklist/{w.id}/close">{hidden(user)}'
                f'<label for="note-{w.id}">Note for item {w.id}</label><input type="text" id="note-{w.id}" name="note" maxlength="500" required>'
                f'<button type="submit" class="secondary">Close item {w.id}</button></form>'
            )
        about = f' <a href="/console/appointments/{e(w.appointment_id)}">the session</a>' if w.appointment_id else ""
        if w.connector and w.appointment_id:
            about += item_link(daemon, w.connector, w.appointment_id)
        rows.append([e(w.id), e(w.kind.replace("_", " ")), e(w.connector or ""), e(w.opened_at), e(w.instruction) + about, "".join(actions) or '<span class="muted">-</span>'])
    dead_rows = []
    for d in store.dead_letters():
        act = _retry_form(user, d.connector, d.appointment_id) if user.may(Action.RETRY) else '<span class="muted">-</span>'
        dead_rows.append([e(d.connector), f'<a href="/console/appointments/{e(d.appointment_id)}">{e(d.appointment_id)}</a>', e(d.attempts), e(d.last_error), act])
    return (
        f'<h2>Open items</h2>{table(["id", "kind", "system", "opened", "what to do", "action"], rows, "nothing to do", "Worklist")}'
        f'<h2>Dead letters</h2>{table(["system", "appointment", "attempts", "last error", "action"], dead_rows, "none", "Dead letters")}'
    )


def item_link(daemon: Daemon, connector: str, appointment_id: str) -> str:
    """A link to the session's record in the system's own screens (``item_url``), if configured."""
    conf = daemon.config.connectors.get(connector)
    link = daemon.store.link(connector, appointment_id)
    if conf is None or conf.item_url is None or link is None or not link.external_id:
        return ""
    url = conf.item_url.format(external_id=quote(link.external_id, safe=""))
    return f' <a href="{e(url)}" rel="noopener noreferrer" target="_blank">open it in {e(connector)}</a>'


def _retry_form(user: User, connector: str, appointment_id: str) -> str:
    return (
        f'<form class="inline" method="post" action="/console/retry">{hidden(user)}'
        f'<input type="hidden" name="connector" value="{e(connector)}"><input type="hidden" name="appointment" value="{e(appointment_id)}">'
        f'<button type="submit" aria-label="Retry the write to {e(connector)}">Retry now</button></form>'
    )


def status_page(daemon: Daemon) -> str:
    return status_sections(daemon, datetime.now(UTC))


def parse_day(text: str | None, zone: str) -> date:
    """A ``YYYY-MM-DD`` query value, or today in ``zone``."""
    if text:
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    return datetime.now(ZoneInfo(zone)).date()

