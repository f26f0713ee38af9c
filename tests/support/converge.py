"""Shared end-state checks: every system agrees with the canonical record, nothing duplicated,
no cancellation lost."""

from __future__ import annotations

from syncbridge.connector import Capabilities
from syncbridge.model import CANCELLED_STATES, Role
from syncbridge.store import Store
from tests.support.replica import ReplicaVendor


def divergences(store: Store, caps: dict[str, Capabilities], vendors: dict[str, ReplicaVendor], cancelled: set[tuple[str, str]]) -> list[str]:
    """Every way the systems disagree with the store; empty when converged."""
    problems: list[str] = []
    appts = {a.id: a for a in store.appointments()}
    for name, vendor in vendors.items():
        c = caps[name]
        by_canon: dict[str, list[dict]] = {}
        for item in vendor.all_items():
            link = store.link_by_external(name, item["ext_id"])
            cid = item["canonical_id"] or (link.appointment_id if link else None)
            if cid is None:
                problems.append(f"{name}/{item['ext_id']} is not linked")
            elif not item["deleted"]:
                by_canon.setdefault(cid, []).append(item)
        for cid, copies in by_canon.items():
            if len(copies) > 1:
                problems.append(f"{name} holds {len(copies)} copies of {cid}")
        for appt in appts.values():
            copies = by_canon.get(appt.id, [])
            want = c.project(appt.fields)
            if appt.cancelled and c.role == Role.MIRROR:
                if copies:
                    problems.append(f"{name} still shows cancelled {appt.id}")
                continue
            if len(copies) != 1:
                problems.append(f"{name} lacks {appt.id}")
                continue
            got = {k: copies[0][k] for k in want}
            if got != want:
                problems.append(f"{name} diverges on {appt.id}: {got} != {want}")
    for name, ext in cancelled:
        link = store.link_by_external(name, ext)
        if link is None:
            problems.append(f"cancelled copy {name}/{ext} was never linked")
        elif link.appointment_id not in appts or appts[link.appointment_id].fields["status"] not in CANCELLED_STATES:
            problems.append(f"cancellation in {name} of {link.appointment_id} was lost")
    if store.dead_letters():
        problems.append(f"{len(store.dead_letters())} dead letters")
    return problems
