"""``syncbridge bulk``: cancel a clinician's week, mark a day no-show, waive fees, from the shell.

The same two steps as the console: a preview, then one confirmation (``--yes``, or a prompt). The
changes go into the store; the running daemon applies them everywhere (or the next start does).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from .model import CancelledBy, parse_iso

if TYPE_CHECKING:  # the parser is built on every run of the CLI: the engine is loaded only for `bulk`
    from .config import PracticeConfig
    from .engine import Engine
    from .operations import Preview, Selection

__all__ = ["add_bulk_parser", "cmd_bulk", "render", "selection"]


def _when(text: str, zone: ZoneInfo, *, end: bool) -> datetime:
    """A date (the whole day, in the practice's time zone) or an ISO date-time."""
    from .operations import BadSelection

    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=1) if end else day, time(0), zone)
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=zone)
    except ValueError:
        raise BadSelection(f"{text!r} is not a date (2026-12-08) or a date and time (2026-12-08T13:00)") from None


def selection(cfg: PracticeConfig, args: argparse.Namespace) -> Selection:
    from .operations import Selection

    clinicians = tuple(dict.fromkeys(args.clinician))
    zone = ZoneInfo(cfg.clinician_zone(clinicians[0]))
    return Selection(clinicians, _when(args.start, zone, end=False), _when(args.end or args.start, zone, end=True), tuple(args.location or ()))


def render(shown: Preview, cfg: PracticeConfig) -> str:
    lines = [f"{shown.action.value}: {len(shown.planned)} sessions"]
    for p in shown.planned:
        zone = ZoneInfo(cfg.clinician_zone(p.clinician))
        when = parse_iso(p.start).astimezone(zone)
        billing = {"suppress": "claim to be suppressed", "void": "CLAIM ALREADY SENT: void it with the payer", "none": ""}[p.billing]
        fee = f", fee {p.fee}" if p.fee else ""
        lines.append(f"  {p.appointment_id}  {p.clinician}  {when:%a %d %b %H:%M}  {p.service_code or '-'}  -> {p.status_after}{fee}"
                     f"  in {', '.join(p.systems) or 'the record only'}" + (f"  ({billing})" if billing else ""))
    if shown.left_out:
        lines.append(f"left out: {len(shown.left_out)}")
        for o in shown.left_out:
            when = parse_iso(o.start).astimezone(ZoneInfo(cfg.clinician_zone(o.clinician)))
            lines.append(f"  {o.appointment_id}  {o.clinician}  {when:%a %d %b %H:%M}  {o.why}")
    return "\n".join(lines)


def cmd_bulk(args: argparse.Namespace, cfg: PracticeConfig, engine: Engine) -> int:
    from .operations import BulkAction, preview, progress, start

    if args.action == "status":
        found = progress(engine.store, engine.connectors, args.operation)
        if found is None:
            print(f"no operation {args.operation}", file=sys.stderr)
            return 1
        systems = ", ".join(f"{n} {c['applied']}/{sum(c.values())}" + (f" ({c['failed']} failed)" if c["failed"] else "")
                            for n, c in sorted(found.systems.items()))
        billing = ", ".join(f"{k} {v}" for k, v in sorted(found.billing.items()))
        print(f"{found.operation} {found.action} by {found.created_by} at {found.created_at}: {found.changed} of {found.total} "
              f"sessions changed{f', {found.skipped} skipped' if found.skipped else ''}; applied: {systems or 'nothing yet'}"
              f"{f'; billing: {billing}' if billing else ''}; {'done' if found.done else 'in progress'}")
        return 0
    shown = preview(engine.store, cfg, engine.connectors, selection(cfg, args), BulkAction(args.action), reason=args.reason,
                    note=args.note, by=args.by, charge_fee=args.charge_fee)
    print(render(shown, cfg))
    if not shown.planned:
        print("nothing to change")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("not applied: add --yes to confirm", file=sys.stderr)
            return 1
        if input(f"apply to these {len(shown.planned)} sessions? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not applied")
            return 1
    op_id = start(engine, shown, user=args.user)
    print(f"operation {op_id}: {len(shown.planned)} sessions changed in the record; the daemon applies them everywhere "
          f"(follow it with `syncbridge bulk status {op_id}`)")
    return 0


def add_bulk_parser(add: Callable[[str, Any, str], argparse.ArgumentParser], func: Any, common: argparse.ArgumentParser) -> None:
    b = add("bulk", func, "change many sessions at once (a clinician off sick): preview, then confirm")
    sub = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("cancel", "cancel every session of the selection (fee waived unless --charge-fee)"),
        ("noshow", "mark sessions that took place without the client as no-show"),
        ("attended", "mark sessions as attended"),
        ("waive", "waive the late-cancel and no-show fees of cancelled sessions"),
    ):
        s = sub.add_parser(action, help=text, description=text, parents=[common])
        s.add_argument("--clinician", action="append", required=True, help="clinician key (repeat for several)")
        s.add_argument("--from", dest="start", required=True, help="first day (2026-12-08) or date and time, in the practice's time zone")
        s.add_argument("--to", dest="end", help="last day, included (default: the first day)")
        s.add_argument("--location", action="append", help="only sessions at this location (repeat for several)")
        s.add_argument("--reason", help="why (illness, closure): kept in the store and the EHR")
        s.add_argument("--note", help="a note added to every session's record")
        s.add_argument("--by", choices=[e.value for e in CancelledBy], default=CancelledBy.CLINICIAN.value if action == "cancel" else None,
                       help="who cancelled (default for cancel: clinician)")
        s.add_argument("--charge-fee", action="store_true", help="charge the policy's fee instead of waiving it")
        s.add_argument("--yes", action="store_true", help="apply without asking (after printing the preview)")
        s.add_argument("--user", default="cli", help="the name the audit log records (default: cli)")
    st = sub.add_parser("status", help="where an operation stands in every system", parents=[common])
    st.add_argument("operation", help="operation id (op-...)")
