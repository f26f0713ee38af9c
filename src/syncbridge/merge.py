"""The three-way merge (DESIGN section 5) as a pure function of plain data.

``merge`` compares what one connector shows now (the observation) with what it showed when we
last agreed (the link's base) and with the canonical record, field by field, all in that
connector's projection. It never does I/O, so every rule below is tested exhaustively.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .config import CancellationPolicy
from .connector import Observation
from .model import CANCELLED_STATES, FIELDS, Billing, Role, Snapshot, Status, empty_snapshot, parse_iso, validate_snapshot
from .policy.cancellation import CANCELLING_TAGS, decide

__all__ = ["Conflict", "MergeOutcome", "merge", "MIRROR_WRITABLE", "TIME_FIELDS"]

TIME_FIELDS = ("start", "end", "timezone")
#: what a calendar may change; client, service, modality and billing belong to record and channel
MIRROR_WRITABLE = frozenset({*TIME_FIELDS, "status"})
_LIVE = frozenset(Status) - CANCELLED_STATES

# Plain fields, with the three time fields moving as one group so a move is never torn; status
# and cancellation follow their own rules (``_status``). Each group as its fields in order, the
# same as a set, and the name a conflict gets.
_ALL_GROUPS: tuple[tuple[tuple[str, ...], frozenset[str], str], ...] = ((TIME_FIELDS, frozenset(TIME_FIELDS), "time"),) + tuple(
    ((f,), frozenset((f,)), f) for f in FIELDS if f not in TIME_FIELDS and f not in ("status", "cancellation")
)
#: the groups a calendar may write
_MIRROR_GROUPS = tuple(g for g in _ALL_GROUPS if g[1] <= MIRROR_WRITABLE)

Action = Literal["create", "update", "noop", "ignore"]


@dataclass(frozen=True, slots=True)
class Conflict:
    """Both sides changed ``field`` since the base; ``winner`` says which value was kept."""

    field: str
    winner: Literal["observed", "canonical"]
    rule: str


@dataclass(slots=True)
class MergeOutcome:
    action: Action
    new: Snapshot | None = None
    changed: tuple[str, ...] = ()
    conflicts: list[Conflict] = field(default_factory=list)
    reason: str = ""


def _later(observed_at: str | None, canonical_at: str | None) -> int:
    """1 if the observation is the later modification, -1 if canonical is, 0 for a tie."""
    if observed_at is None or canonical_at is None:
        return 0
    a, b = parse_iso(observed_at), parse_iso(canonical_at)
    return (a > b) - (a < b)


def merge(
    *,
    role: Role,
    project: Callable[[Snapshot], Snapshot],
    base: Snapshot | None,
    canonical: Snapshot | None,
    canonical_updated_at: str | None,
    obs: Observation,
    policy: CancellationPolicy,
    now: datetime,
    via: str,
) -> MergeOutcome:
    """Merge one observation into the canonical snapshot; see the module docstring."""
    if canonical is None:
        return _create(role, obs, policy, now, via)
    if obs.deleted and canonical["status"] in CANCELLED_STATES:
        return MergeOutcome("noop", reason="already cancelled")

    c_proj = project(canonical)
    if obs.deleted:
        observed: Snapshot = dict(base or c_proj)
        observed["status"] = Status.CANCELLED.value
    else:
        observed = {k: v for k, v in obs.fields.items() if k in c_proj}
    new = dict(canonical)
    changed: list[str] = []
    conflicts: list[Conflict] = []

    for group, members, name in _MIRROR_GROUPS if role == Role.MIRROR else _ALL_GROUPS:
        if not observed.keys() >= members:
            continue
        ov = tuple([observed[f] for f in group])
        cv = tuple([c_proj[f] for f in group])
        if ov == cv:
            continue
        bv = tuple([base.get(f) for f in group]) if base is not None else None
        if bv is not None and ov == bv:
            continue  # unchanged on this side; canonical's change will be pushed
        if bv is not None and cv == bv:
            take = True
        else:
            order = _later(obs.modified_at, canonical_updated_at)
            take = order > 0 or (order == 0 and role == Role.RECORD)
            conflicts.append(Conflict(name, "observed" if take else "canonical", "later modification wins; ties to record"))
        if take:
            for f, v in zip(group, ov):  # noqa: B905 (ov was built from group)
                if new[f] != v:
                    new[f] = v
                    changed.append(f)

    status_change = _status(role, observed, obs, base, canonical, c_proj, policy, now, via)
    if status_change is not None:
        new.update(status_change)
        changed.extend(k for k in status_change if status_change[k] != canonical.get(k))

    # every field in ``changed`` differs from canonical, so ``new`` differs exactly when it is not empty
    if not changed:
        return MergeOutcome("noop", conflicts=conflicts)
    return MergeOutcome("update", validate_snapshot(new), tuple(dict.fromkeys(changed)), conflicts)


def _status(
    role: Role,
    observed: Snapshot,
    obs: Observation,
    base: Snapshot | None,
    canonical: Snapshot,
    c_proj: Snapshot,
    policy: CancellationPolicy,
    now: datetime,
    via: str,
) -> dict[str, Any] | None:
    """Status rules: cancellation dominates and is sticky; only record and channel re-book."""
    ostat = observed.get("status")
    bstat = base.get("status") if base is not None else None
    cstat = canonical["status"]
    explicit = obs.cancellation or {}
    cancel_tagged = not obs.deleted and not obs.tags.isdisjoint(CANCELLING_TAGS)
    authoritative = role != Role.MIRROR

    if cstat in CANCELLED_STATES:
        # A stale copy never un-cancels; nor does one we never agreed on (no base): it may be our
        # own create whose answer was lost, showing the booking as we sent it. Only a status the
        # record changed since we last agreed re-books.
        if not authoritative or ostat is None or bstat is None or ostat == bstat:
            return None
        if ostat in _LIVE:
            return {"status": ostat, "cancellation": None, "billing": observed.get("billing") or Billing.PENDING.value}
        if ostat != cstat:  # e.g. the EHR turns a cancel into a no-show
            status, record = decide(policy, start=parse_iso(canonical["start"]), now=now, via=via, tags=obs.tags, **_explicit(explicit, ostat))
            return {"status": status, "cancellation": record}
        return None

    off = ostat in CANCELLED_STATES and ostat != c_proj.get("status")
    changed_here = base is None or ostat != bstat or cancel_tagged
    if (off and changed_here) or cancel_tagged:
        kw = _explicit(explicit, ostat if authoritative else None)
        status, record = decide(policy, start=parse_iso(canonical["start"]), now=now, via=via, tags=obs.tags, **kw)
        return {"status": status, "cancellation": record}
    if authoritative and ostat in _LIVE and ostat != cstat and ostat != bstat:
        return {"status": ostat}
    return None


def _explicit(explicit: dict[str, Any], ostat: str | None) -> dict[str, Any]:
    kw = {k: explicit.get(k) for k in ("by", "kind", "reason", "clinical", "fee")}
    if ostat == Status.NOSHOW and not kw["kind"]:
        kw["kind"] = "no_show"
    return kw


def _create(role: Role, obs: Observation, policy: CancellationPolicy, now: datetime, via: str) -> MergeOutcome:
    if role == Role.MIRROR:
        return MergeOutcome("ignore", reason="a calendar cannot book; only record and channel create appointments")
    if obs.deleted:
        return MergeOutcome("ignore", reason="deleted before it was ever seen")
    new = empty_snapshot()
    new.update({k: v for k, v in obs.fields.items() if k in new})
    if new["status"] in CANCELLED_STATES and not new.get("cancellation"):
        status, record = decide(
            policy, start=parse_iso(new["start"]), now=now, via=via, tags=obs.tags, **_explicit(obs.cancellation or {}, new["status"])
        )
        new["status"], new["cancellation"] = status, record
    return MergeOutcome("create", validate_snapshot(new), tuple(FIELDS))
