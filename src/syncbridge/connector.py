"""The connector contract: a small async interface with capabilities declared as data.

The engine never asks *which* connector it talks to, only what it can do. A connector turns its
vendor's records into :class:`Observation` snapshots (in canonical field space, restricted to
``capabilities.fields``) and converges an external copy to a desired snapshot under a
precondition. Third-party connectors register a factory in the ``syncbridge.connectors``
entry-point group.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel

from .errors import CursorExpired, SyncbridgeError
from .model import CANCELLED_STATES, Role, Snapshot, Status

if TYPE_CHECKING:
    from .config import ConnectorConfig, PracticeConfig
    from .emulation import Injector

__all__ = [
    "ApplyResult",
    "account_cursor",
    "BusyInterval",
    "MIRROR_FIELDS",
    "calendar_capabilities",
    "CalendarConnector",
    "Capabilities",
    "Connector",
    "Host",
    "Link",
    "Observation",
    "PullResult",
    "Sandbox",
    "SeenCopy",
    "SessionEvent",
    "Slot",
    "WebhookRoute",
    "Write",
]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a connector can do; the engine reads only this, never the connector's type."""

    role: Role
    #: canonical fields the external copy expresses (and so can be compared and written)
    fields: frozenset[str]
    read_only: bool = False
    #: may hold appointments that originated elsewhere (an EHR, a calendar: yes; a directory: no)
    accepts_new: bool = True
    #: the vendor pushes change hints (webhooks, watch channels, subscriptions)
    push: bool = False
    #: reports free/busy time from events that are not appointments
    busy_time: bool = False
    #: statuses the external copy can express; others are shown as the mapped value
    status_map: Mapping[str, str] = field(default_factory=dict)
    #: offers clients bookable slots (a directory): the runtime computes them and calls ``publish``
    publishes_availability: bool = False
    #: the slots a directory shows can be read back (``published``), so a date whose directory
    #: side may have changed (a booking there) is compared instead of rewritten blind
    reads_availability: bool = False
    #: bookings may arrive unconfirmed (``Observation.pending``): confirmed with ``confirm`` once the
    #: record system holds the session, or left to a person (``Connector.confirm_by_hand``)
    confirms_bookings: bool = False

    def project(self, snap: Snapshot) -> Snapshot:
        """The canonical snapshot as this connector can hold it; equal projections need no write."""
        out = {k: snap.get(k) for k in self.fields}
        status = out.get("status")
        if isinstance(status, str) and status in self.status_map:
            out["status"] = self.status_map[status]
        return out


#: the usual mirror: a calendar shows a session or does not
MIRROR_STATUS_MAP: Mapping[str, str] = {
    Status.ARRIVED: Status.BOOKED,
    Status.FULFILLED: Status.BOOKED,
    **{s.value: Status.CANCELLED.value for s in CANCELLED_STATES},
}

#: what a calendar event expresses of a session
MIRROR_FIELDS = frozenset({"clinician", "start", "end", "timezone", "status", "modality", "location"})


def calendar_capabilities(*, push: bool) -> Capabilities:
    """A clinician's calendar: a mirror of sessions that reports busy time."""
    return Capabilities(role=Role.MIRROR, fields=MIRROR_FIELDS, status_map=MIRROR_STATUS_MAP, busy_time=True, accepts_new=True, push=push)


@dataclass(slots=True)
class Observation:
    """One external record as last seen, already mapped to canonical field space.

    ``fields`` holds only what the vendor expresses. ``deleted`` means the record is gone.
    ``tags`` are the reason tags (``late``, ``noshow``, ``waive``...) found in its text; the text
    itself never leaves the connector.
    """

    external_id: str
    etag: str | None = None
    canonical_id: str | None = None
    fields: Snapshot = field(default_factory=dict)
    deleted: bool = False
    tags: frozenset[str] = frozenset()
    modified_at: str | None = None
    #: a record/channel may report the full cancellation record (who, kind, fee, reason)
    cancellation: dict[str, Any] | None = None
    #: set when the record could not be understood (too large, no start...); the engine skips it
    problem: str | None = None
    #: the copy does not carry the canonical id yet (adopted from the system): write it back once
    #: linked, so a lost store can be rebuilt from the copies
    stamp: bool = False
    #: a booking the channel holds unconfirmed until the practice confirms it (Zocdoc
    #: ``pending_booking``); only for ``capabilities.confirms_bookings``
    pending: bool = False


@dataclass(slots=True)
class PullResult:
    """A batch of observations and the cursor that follows it.

    ``complete`` means the batch lists *every* current record in scope (a full sync): linked
    records missing from it are gone. ``more`` asks the engine to pull again right away.
    """

    observations: list[Observation]
    cursor: str | None
    complete: bool = False
    more: bool = False
    #: a complete listing that only covers sessions starting in [start, end) (UTC snapshot strings):
    #: linked sessions outside it are not missing, just out of view
    window: tuple[str, str] | None = None
    #: accounts (clinician keys: a mailbox, a calendar) whose read failed while the others' went on
    #: (DESIGN section 9): their part of ``cursor`` is left as it was, a complete listing does not
    #: cover their sessions, and the runtime shows them in the connector's health and retries them
    failed_accounts: dict[str, SyncbridgeError] = field(default_factory=dict)
    #: accounts listed in full in an incremental batch (say, one that failed during the last full
    #: listing): as with ``complete``, but only for them, their linked sessions missing are gone
    listed_accounts: frozenset[str] = frozenset()


class Link(NamedTuple):
    """What the store knows of one appointment's copy in one connector.

    An immutable record like the dataclasses here, but a named tuple: a batch builds thousands,
    and a frozen dataclass costs several times more to construct.
    """

    connector: str
    appointment_id: str
    external_id: str | None
    etag: str | None
    base: Snapshot | None
    applied_version: int = 0
    gone: bool = False


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of a write; ``etag`` is recorded so the echo of our own write is dropped."""

    external_id: str | None
    etag: str | None
    #: which privacy-relevant fields left for this destination (recorded in the audit)
    disclosed: tuple[str, ...] = ()
    gone: bool = False
    #: further changes the write made in the system, one short line each (recorded in the audit),
    #: e.g. "Encounter/12 cancelled", "Claim/9 active: left for a person to void"
    steps: tuple[str, ...] = ()
    #: fields the system itself set while applying (an EHR's billing outcome); merged back into the
    #: canonical record as that system's change, under the usual rules
    reported: Snapshot = field(default_factory=dict)
    #: what the write could not finish and a person must see to, one line each naming the external
    #: resource (a charge that could not be made not-billable); the outbox keeps one worklist item
    #: per (connector, appointment) open while this is non-empty and closes it when a later write
    #: comes back with nothing left
    attention: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Write:
    """One write the outbox hands a connector: converge ``appointment_id``'s copy to ``desired``."""

    appointment_id: str
    desired: Snapshot
    link: Link | None


@dataclass(frozen=True, slots=True)
class BusyInterval:
    clinician: str
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class Slot:
    """A bookable slot offered to clients; aware datetimes. ``end`` is that of the longest service."""

    start: datetime
    end: datetime
    #: "in_person" (the office) or "telehealth" (a directory's virtual location); None: the one location
    modality: str | None = None
    #: service codes bookable from ``start`` (each fits); empty: the one service of the rules
    services: tuple[str, ...] = ()
    #: "new" (clients new to the practice: intake services) or "existing"; None: any client
    clients: str | None = None


class Host:
    """What the running daemon offers a connector; this detached default serves tests and the CLI.

    Connectors reach the daemon only through this object, so push channels, webhook inboxes and
    stored tokens work the same for every connector type.
    """

    def __init__(self, public_url: str | None = None) -> None:
        #: the external base URL of this connector's webhook routes (``.../webhooks/<name>``), or None
        #: when the daemon is not reachable from outside (push then stays off; polling still runs)
        self.public_url = public_url
        self._vault: dict[str, str] = {}
        self.pull_requests = 0
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        self.degraded_note: str | None = None

    def pull_soon(self) -> None:
        """Ask for an incremental pull right away (debounced); a push hint calls this."""
        self.pull_requests += 1

    def accept_webhook(self, headers: Mapping[str, str], body: bytes) -> None:
        """Persist an authenticated notification before answering; processed after (``webhook_targets``)."""
        self.accepted.append((dict(headers), body))
        self.pull_soon()

    def vault_get(self, key: str) -> str | None:
        """A secret the connector stored (a refresh token), decrypted; None if absent."""
        return self._vault.get(key)

    def known_etag(self, external_id: str) -> str | None:
        """The version tag of the copy as the store last recorded it (what we wrote or merged), so a
        listing tells an unchanged copy from an edited one after a restart too; None if unknown."""
        return None

    def linked_between(self, lo: str, hi: str, clinicians: Sequence[str]) -> list[str]:
        """External ids of the live copies of these clinicians' sessions starting in [lo, hi), as
        the store holds them: what a listing of that window must show. A connector reads one
        its listing lacks before it counts as gone (a move out of the window is not a deletion)."""
        return []

    def degraded(self, note: str | None) -> None:
        """Say the connector works, but not as it should (its batch endpoint refused: each call goes
        on its own); None when it is back to normal. The status shows it beside the health."""
        self.degraded_note = note

    def vault_put(self, key: str, value: str) -> None:
        """Store a secret encrypted at rest (the daemon uses ``store.secret_key``)."""
        self._vault[key] = value

    def vault_delete(self, key: str) -> None:
        self._vault.pop(key, None)


@dataclass(frozen=True, slots=True)
class SeenCopy:
    """What a person sees of one copy: ``state`` is "live", "cancelled" or "gone"."""

    state: str
    start: datetime | None = None
    end: datetime | None = None


@dataclass
class Sandbox:
    """A local stand-in for a connector's system (its emulator, or a real test server) for the demo.

    ``delete_event`` deletes (or cancels) a copy the way a person using that system would; the
    other callables let end-to-end tests look at the system as its users see it.
    """

    connector_config: dict[str, Any]
    accounts: dict[str, dict[str, Any]]
    close: Callable[[], None]
    delete_event: Callable[[str], Awaitable[None]] | None = None
    describe: str = ""
    #: a copy as a person looking at the system sees it
    look: Callable[[str], Awaitable[SeenCopy]] | None = None
    #: move a copy to a new time the way a person would (drag the event, reschedule in the EHR)
    move: Callable[[str, datetime, datetime], Awaitable[None]] | None = None
    #: a client books here (a directory): (clinician, start, end) -> the new external id
    book: Callable[[str, datetime, datetime], Awaitable[str]] | None = None
    #: start times a directory currently offers for a clinician on a local date
    offered: Callable[[str, date], Awaitable[list[datetime]]] | None = None
    #: tell the system where this connector's webhooks arrive (what a practice registers in the
    #: vendor's portal); called with ``<http.public_url>/webhooks/<connector name>``, to which the
    #: sandbox adds its connector's route path
    register_webhooks: Callable[[str], None] | None = None
    #: external ids of every copy that looks like a live session (duplicate checks)
    live_ids: Callable[[], Awaitable[set[str]]] | None = None
    #: counts the system's API requests and injects latency and failures (benchmarks, chaos tests)
    injector: Injector | None = None
    #: the API calls the system has answered, by kind ("list", "insert", "delete", ...), each part
    #: of a vendor batch request counted as its own call, as vendors' quotas count them (benchmarks)
    calls: Callable[[], dict[str, int]] | None = None


@dataclass(frozen=True, slots=True)
class WebhookRoute:
    """An HTTP route the runtime mounts; the handler authenticates before storing anything."""

    path: str
    methods: Sequence[str]
    handler: Any  # starlette endpoint: async (Request) -> Response


class Connector(abc.ABC):
    """Base class of every connector. Subclasses set ``capabilities`` and implement the I/O."""

    capabilities: Capabilities
    #: pydantic model of the connector's own config keys (validated by ``syncbridge check``)
    Options: type[BaseModel] | None = None

    def __init__(self, name: str, config: ConnectorConfig, practice: PracticeConfig) -> None:
        self.name = name
        self.config = config
        self.practice = practice
        self.options: Any = self.Options(**config.options) if self.Options else config.options
        #: clinician key -> this connector's account settings for that clinician
        self.clinicians: dict[str, dict[str, Any]] = practice.clinicians_of(name)
        #: replaced by the daemon's own host when it runs the connector
        self.host: Host = Host()
        if config.role is not None and config.role != self.capabilities.role:
            from dataclasses import replace

            self.capabilities = replace(self.capabilities, role=config.role)

    @abc.abstractmethod
    async def pull(self, cursor: str | None) -> PullResult:
        """Changes since ``cursor``; ``None`` means a full listing (``complete=True``).

        Raise :class:`~syncbridge.errors.CursorExpired` when the vendor rejects the cursor.
        """

    async def pull_accounts(self, cursor: str, accounts: frozenset[str]) -> PullResult:
        """Changes since ``cursor`` in these accounts (clinicians) only, for a push notification
        that named them (:meth:`webhook_accounts`); the cursor returned keeps every other account's
        state as it was. The default pulls every account."""
        return await self.pull(cursor)

    @abc.abstractmethod
    async def read(self, external_id: str) -> Observation:
        """The record as it is now (``deleted=True`` if it is gone)."""

    @abc.abstractmethod
    async def apply(self, appointment_id: str, desired: Snapshot, link: Link | None) -> ApplyResult:
        """Converge the external copy to ``desired`` (a projection of the canonical snapshot).

        Create when ``link`` is None or gone, otherwise update under ``link.etag`` as precondition;
        raise :class:`~syncbridge.errors.ConflictError` when the precondition fails. A create
        must be idempotent (derive the external id from ``appointment_id``) so a retried create
        never duplicates.
        """

    #: most writes one :meth:`apply_many` call takes; above 1 when the vendor has a batch request
    write_batch: int = 1
    #: calls one account (a clinician's calendar or mailbox) may have in flight at once, where the
    #: vendor limits it per account; the outbox then sends each call for one account only and lets
    #: the accounts take turns. None: no per-account limit (one EHR, one directory)
    account_concurrency: int | None = None
    #: the most calls this system takes at once, whatever ``outbox.concurrency`` allows: one server
    #: shared with its own users (an EHR, a directory, a CalDAV server). None: no limit of its own
    max_concurrency: int | None = None

    def in_flight(self, configured: int) -> int:
        """Calls to keep in flight to this system: ``outbox.concurrency``, within its own limit."""
        return min(configured, self.max_concurrency) if self.max_concurrency else configured
    #: seconds between presence checks (:meth:`missing`), for systems whose incremental reads never
    #: show a deletion; None where pulls already report them
    presence_interval: float | None = None

    async def missing(self, external_ids: Sequence[str]) -> set[str]:
        """Which of these linked copies no longer exist in the system (deleted by a person there).

        The engine asks, at most every :attr:`presence_interval` seconds, about the copies of live
        sessions from yesterday on, and merges the answer as deletions (the mass-cancellation
        guard applies). Raise rather than guess: a copy not positively seen gone is not missing.
        """
        return set()

    async def apply_many(self, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        """Apply several writes; one result or raised error per write, in order.

        The default applies each on its own, concurrently. A connector whose vendor takes batch
        requests (Google's batch endpoint, Graph ``$batch``, a FHIR ``batch`` Bundle) overrides it
        and sets :attr:`write_batch`, so a practice's initial sync costs one request per batch
        rather than per appointment. Each write keeps :meth:`apply`'s semantics: its own
        precondition, its own idempotent create, its own error.
        """
        return list(await asyncio.gather(*(self.apply(w.appointment_id, w.desired, w.link) for w in writes), return_exceptions=True))

    def external_id_for(self, appointment_id: str) -> str | None:
        """The id a create for ``appointment_id`` uses, when the connector derives it (idempotent creates).

        Lets the engine re-read a copy whose create answer was lost before anything was linked.
        """
        return None

    @classmethod
    def sandbox(cls, workdir: Path, clinicians: list[str]) -> Sandbox | None:
        """Start a local stand-in for this system (used by ``syncbridge demo``); None if there is none."""
        return None

    async def busy(self, start: datetime, end: datetime) -> list[BusyInterval]:
        """Busy time from the clinician's other events; text is never returned."""
        return []

    def instruction(self, appointment: Snapshot, desired: Snapshot) -> str:
        """For read-only connectors: what a person must do in the vendor's UI."""
        return f"Update the appointment in {self.name} to status {desired.get('status')}"

    def webhook_routes(self) -> list[WebhookRoute]:
        return []

    def webhook_targets(self, headers: Mapping[str, str], body: bytes) -> list[str] | None:
        """External ids a persisted notification names, to be re-read; None means pull incrementally
        (the accounts :meth:`webhook_accounts` names, or every account)."""
        return None

    def webhook_accounts(self, headers: Mapping[str, str], body: bytes) -> frozenset[str] | None:
        """Accounts (clinicians) a notification that names no record says changed: only they are
        pulled (:meth:`pull_accounts`), so a push costs the same at 3 clinicians as at 30. Empty
        when the notification is known to be the echo of our own write; None pulls every account."""
        return None

    async def maintain(self) -> None:
        """Keep push channels alive: create missing ones, renew those near expiry (called at start and
        periodically). Stop them in :meth:`close`. Failures here must not stop polling."""
        return None

    async def publish(self, clinician: str, day: date, slots: Sequence[Slot]) -> None:
        """Offer exactly these slots for ``day`` (clinician's local date); only for
        ``capabilities.publishes_availability``. Called when the day's slot set changed, or when
        the directory was seen to show something else. Raise as :meth:`apply` does: transient
        errors are retried with backoff, permanent ones dead-letter the date with a worklist item."""
        raise NotImplementedError

    async def published(self, clinician: str, day: date) -> list[Slot]:
        """The slots the directory offers now for ``day``, as its clients see them (only for
        ``capabilities.reads_availability``). Compared by start time: a directory that keeps no
        end time may give each slot its usual length."""
        raise NotImplementedError

    #: the practice confirms pending bookings itself: a worklist item asks for it once the record
    #: system holds the session, instead of ``confirm``
    confirm_by_hand: bool = False

    async def confirm(self, external_id: str) -> None:
        """Confirm a pending booking (``capabilities.confirms_bookings``); one already confirmed is success.
        Called once the record system holds the session, so the client is told only of a recorded one."""
        raise NotImplementedError

    async def authorize(self, clinician: str) -> str:
        """Interactive sign-in for one clinician (``syncbridge auth``); stores what it obtains with
        ``host.vault_put`` and returns a line for the person who ran it."""
        raise NotImplementedError(f"{self.name} has no interactive sign-in; its credentials come from the config")

    async def check(self) -> str:
        """Authenticate and make one harmless read; returns a short description of what was seen."""
        result = await self.pull(None)
        return f"{len(result.observations)} appointments visible"

    async def close(self) -> None:
        return None


def account_cursor(cursor: str | None, accounts: Iterable[str]) -> dict[str, Any] | None:
    """A cursor kept per account (JSON: account -> its own state), or None for a full listing.

    Raises CursorExpired when it does not name exactly these accounts (a calendar added to or
    removed from the config): the connector then lists everything afresh."""
    if cursor is None:
        return None
    try:
        state = json.loads(cursor)
    except ValueError:
        state = None
    if not isinstance(state, dict) or set(state) != set(accounts):
        raise CursorExpired("the stored cursor does not match the configured calendars")
    return state


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """What one of our calendar events says, in canonical field space; its text is reduced to tags.

    Each calendar connector's mapping reads its vendor's event into one (adding what only that
    vendor tells, such as attendees), and builds the :class:`Observation` from it.
    """

    canonical_id: str
    fields: Snapshot
    tags: frozenset[str]
    modified_at: str | None


class CalendarConnector(Connector):
    """A clinician's calendar (set ``capabilities = calendar_capabilities(push=...)``).

    Its ``Options`` carry ``disclosure``: a ``busy`` calendar (one others can see) never holds the
    location, not even in a hidden property.
    """

    def __init__(self, name: str, config: ConnectorConfig, practice: PracticeConfig) -> None:
        super().__init__(name, config, practice)
        if getattr(self.options, "disclosure", "standard") == "busy":
            from dataclasses import replace

            self.capabilities = replace(self.capabilities, fields=self.capabilities.fields - {"location"})
