"""The status page for the practice admin: plain server-rendered HTML, no scripts, no client data."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .receipts import holds_current, receipt

if TYPE_CHECKING:
    from .runtime import Daemon

__all__ = ["render_status", "status_sections"]

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#1d2430;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #d8dde6;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #eef0f4;vertical-align:top}
th{font-weight:600;color:#4a5568;font-size:.85rem;text-transform:uppercase;letter-spacing:.03em}
.ok{color:#17743a;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#6b7280}.pill{display:inline-block;padding:0 .45rem;border-radius:.6rem;background:#eef2ff;margin:.1rem}
.gone{background:#ecfdf3}.pending{background:#fff7e6}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(header: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_status(daemon: Daemon) -> str:
    cfg, now = daemon.config, datetime.now(UTC)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>syncbridge: {_e(cfg.practice.name)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head><body>
<h1>syncbridge &middot; {_e(cfg.practice.name)}</h1>{status_sections(daemon, now)}
</body></html>"""


def status_sections(daemon: Daemon, now: datetime) -> str:
    """The page's content without its frame: also shown inside the console."""
    store, cfg = daemon.store, daemon.config
    counts = store.outbox_counts()
    conn_rows = []
    for name, c in daemon.connectors.items():
        st = store.connector_state(name)
        health = '<span class="ok">healthy</span>' if st["healthy"] else f'<span class="bad">unhealthy</span> {_e(st["note"])}'
        if st["degraded"]:
            health += f' <span class="bad">degraded</span> {_e(st["degraded"])}'
        pending, dead = counts.get(name, (0, 0))
        conn_rows.append([_e(name), _e(c.config.type), _e(c.capabilities.role.value), health, _e(st["last_good_pull"] or "never"), _e(pending or 0), _e(dead or 0)])

    cancel_rows = []
    seen: set[str] = set()
    for entry in store.audit_entries(limit=400):
        appt_id = entry["appointment_id"]
        if not appt_id or appt_id in seen or entry["detail"].get("status") not in ("cancelled", "noshow"):
            continue
        seen.add(appt_id)
        appt = store.appointment(appt_id)
        if appt is None or not appt.cancelled:
            continue
        rec = appt.fields["cancellation"] or {}
        where = []
        for link, _ in store.links_for(appt_id):
            current = holds_current(link, appt, daemon.connectors.get(link.connector))
            label = "removed" if link.gone else ("applied" if current else "pending")
            where.append(f'<span class="pill {"gone" if current else "pending"}">{_e(link.connector)}: {label}</span>')
        done = receipt(store, daemon.connectors, appt)
        where.append(f'<span class="muted">{done.done} of {done.total}{f" within {max(done.seconds, 0):.0f} s" if done.seconds is not None else ""}</span>')
        clinician = cfg.clinicians.get(appt.fields["clinician"])
        who = clinician.display_name if clinician and clinician.display_name else appt.fields["clinician"]
        cancel_rows.append([
            _e(appt.local_start.strftime("%a %d %b %H:%M")), _e(who), _e(f"{rec.get('kind', '').replace('_', ' ')} by {rec.get('by')}"),
            _e(rec.get("fee")), _e(rec.get("via")), _e(appt.fields.get("billing")), " ".join(where),
        ])
        if len(cancel_rows) >= 20:
            break

    slot_rows = _slot_rows(daemon)
    pending_rows = _pending_rows(daemon)
    work_rows = [[_e(w.id), _e(w.kind), _e(w.connector), _e(w.opened_at), _e(w.instruction)] for w in store.worklist()]
    dead_rows = [[_e(d.connector), _e(d.appointment_id), _e(d.attempts), _e(d.last_error)] for d in store.dead_letters()]
    conflict_rows = [
        [_e(e["at"]), _e(e["connector"]), _e(e["appointment_id"]), _e(e["detail"].get("field")), _e(e["detail"].get("winner"))]
        for e in store.audit_entries(kind="conflict", limit=20)
    ]
    return f"""<p class="muted">as of {_e(now.strftime("%Y-%m-%d %H:%M:%S UTC"))}</p>{_restart_note(daemon)}
<h2>Connectors</h2>{_table(["name", "type", "role", "health", "last good pull", "writes waiting", "dead letters"], conn_rows, "no connectors configured")}
<h2>Recent cancellations</h2>{_table(["session", "clinician", "what", "fee", "came through", "billing", "where applied"], cancel_rows, "no cancellations yet")}
<h2>Directory availability</h2>{_table(["directory", "dates as wanted", "waiting", "since", "dead", "last error"], slot_rows, "none")}
<h2>Bookings awaiting confirmation</h2>{_table(["booked", "session", "clinician", "through", "confirmed by", "last error"], pending_rows, "none")}
<h2>Worklist</h2>{_table(["id", "kind", "system", "opened", "what to do"], work_rows, "nothing to do")}
<h2>Dead letters</h2>{_table(["system", "appointment", "attempts", "last error"], dead_rows, "none")}
<h2>Conflicts</h2>{_table(["when", "system", "appointment", "field", "kept"], conflict_rows, "none")}"""


def _restart_note(daemon: Daemon) -> str:
    """Settings a reload could not apply, until the daemon is restarted."""
    keys = getattr(daemon, "pending_restart", ())
    if not keys:
        return ""
    return f'<p class="bad">Changed in the configuration, applied only after a restart: {_e(", ".join(keys))}</p>'


def _slot_rows(daemon: Daemon) -> list[list[str]]:
    """Per directory: the dates kept, those waiting for a write or a look (and since when), dead letters."""
    rows = []
    for name, c in daemon.connectors.items():
        if not c.capabilities.publishes_availability:
            continue
        states = daemon.store.slot_states(name)
        waiting = [s for s in states if s.due_at is not None and not s.dead]
        dead = [s for s in states if s.dead]
        oldest = min((s.since for s in waiting if s.since), default=None)
        since = datetime.fromtimestamp(oldest, UTC).strftime("%H:%M:%S") if oldest else ""
        error = next((s.last_error for s in [*dead, *waiting] if s.last_error), None)
        rows.append([_e(name), _e(len(states) - len(waiting) - len(dead)), _e(len(waiting)), _e(since), _e(len(dead)), _e(error)])
    return rows


def _pending_rows(daemon: Daemon) -> list[list[str]]:
    """Directory bookings still pending confirmation (Zocdoc ``pending_booking``)."""
    rows = []
    for p in daemon.store.pending_bookings():
        appt = daemon.store.appointment(p.appointment_id)
        connector = daemon.connectors.get(p.connector)
        if appt is None:
            continue
        who = daemon.config.clinicians.get(appt.fields["clinician"])
        by = "the practice, in " + p.connector if connector is not None and connector.confirm_by_hand else "syncbridge, once recorded"
        rows.append([_e(p.since), _e(appt.local_start.strftime("%a %d %b %H:%M")), _e(who.display_name if who and who.display_name
                     else appt.fields["clinician"]), _e(p.connector), _e(by), _e(p.last_error)])
    return rows
