"""Configuration: YAML plus ``SYNCBRIDGE_`` environment overrides, validated before anything runs.

A bad config is refused with the key, the problem and, where the YAML gives one, the line.
Connector-specific options are validated by the connector's own ``Options`` model, found through
the entry-point registry, so the core never names a connector.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError, MalformedRecord
from .model import CancelledBy, Role, check_timezone
from .secrets import SecretRef

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "CancellationPolicy",
    "AvailabilityConfig",
    "AvailabilityRules",
    "ClinicianConfig",
    "ConnectorConfig",
    "ConsoleConfig",
    "ConsoleUser",
    "OnlineService",
    "PracticeConfig",
    "load_config",
    "parse_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _zone(value: str) -> str:
    try:
        check_timezone(value)
    except MalformedRecord as err:
        raise ValueError(str(err)) from None
    return value


class Practice(_Strict):
    name: str = "Practice"
    timezone: str = "America/New_York"
    _tz = field_validator("timezone")(_zone)


class StoreConfig(_Strict):
    #: the SQLite file (the default engine); not used when ``url`` is set
    path: Path = Path("syncbridge.db")
    #: SQLite page cache, MiB: most of the daemon's memory beyond Python itself. The store's pages
    #: are in the operating system's file cache anyway; a larger cache saves system calls, not I/O.
    cache_mb: int = Field(16, ge=1, le=4096)
    #: encrypts tokens obtained at run time (``syncbridge auth``); a reference, never the value
    secret_key: SecretRef | None = None
    #: a PostgreSQL database instead of the SQLite file: ``postgresql://ROLE@HOST:PORT/DATABASE?sslmode=...``
    #: (libpq's URL), without a password in it (docs/postgresql.md)
    url: str | None = None
    #: the role's password, by reference; unset: none, or libpq's own (~/.pgpass, a client certificate)
    password: SecretRef | None = None
    #: connections to PostgreSQL this process opens at most
    pool_size: int = Field(4, ge=1, le=100)
    #: this worker's name among the workers sharing one PostgreSQL database (default HOSTNAME:PID);
    #: two running workers never share a name (the second is refused). Not used with SQLite.
    worker: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:@-]{1,40}$")
    #: seconds a worker's leases (connectors, claimed writes) last unless renewed (every third of
    #: it): a worker killed or cut off has its work taken over within this plus one second
    lease_seconds: float = Field(25.0, ge=2, le=600)

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"{value.split('://')[0]}:// is not a store engine: give postgresql://ROLE@HOST/DATABASE, or leave url out for SQLite (path)")
        if urlsplit(value).password is not None or "password=" in value.lower():
            raise ValueError("the URL holds a password: leave it out and give store.password by reference ({credential: NAME}, {file: ...} or {env: ...})")
        return value

    @property
    def where(self) -> str:
        """The store as an admin names it: the URL or the file."""
        return self.url or str(self.path)

    def open(self, *, migrate: bool = True) -> Store:
        """The configured store, SQLite or PostgreSQL (its password revealed from its reference here)."""
        from .store import Store

        if self.url:
            return Store(self.url, migrate=migrate, password=self.password.reveal() if self.password else None, pool_size=self.pool_size)
        return Store(self.path, cache_mb=self.cache_mb, migrate=migrate)


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


def _spans(value: list[str]) -> list[str]:
    for span in value:
        m = _SPAN.match(span.strip())
        if not m:
            raise ValueError(f"{span!r} is not a span like 09:00-12:30")
        if (int(m[1]), int(m[2])) >= (int(m[3]), int(m[4])):
            raise ValueError(f"{span!r} ends before it starts")
    return [v.strip() for v in value]


class OnlineService(_Strict):
    """A service clients may book online (self-scheduling), by its service (CPT) code."""

    #: the session length this service is booked for
    minutes: int = Field(ge=5, le=480)
    #: an intake (a first assessment): the only services offered to clients new to the practice,
    #: and counted towards ``new_client_weekly_cap``; the others are offered to existing clients
    intake: bool = False


class AvailabilityRules(_Strict):
    """How free slots are offered to directories (DESIGN section 7); clinicians may override any key."""

    #: local working hours per weekday, e.g. ``mon: ["09:00-12:00", "13:00-17:00"]``; absent day = not
    #: working. With ``telehealth_hours`` set, these are the office (in person) hours
    working_hours: dict[str, list[str]] = Field(
        default_factory=lambda: {d: ["09:00-17:00"] for d in _WEEKDAYS[:5]}
    )
    #: local hours offered as telehealth, per weekday like ``working_hours``; published to the
    #: directory's virtual location, the working hours to the office. Empty: one kind of hours
    telehealth_hours: dict[str, list[str]] = Field(default_factory=dict)
    #: services bookable online, by service code, each with its own length: a slot is offered for
    #: every service that fits there. Empty: one service of ``session_minutes``, for any client
    online_services: dict[str, OnlineService] = Field(default_factory=dict)
    #: intake slots are no longer offered in a week (Monday to Sunday) already holding this many
    #: sessions of an intake service (null: no cap)
    new_client_weekly_cap: int | None = Field(None, ge=0)
    session_minutes: int = Field(50, ge=5, le=480)
    #: slot start times fall on this grid from the start of each working span
    granularity_minutes: int = Field(15, ge=5, le=240)
    #: free time kept before and after every session (notes, a break); buffers may overlap each other
    buffer_before_minutes: int = Field(0, ge=0, le=240)
    buffer_after_minutes: int = Field(10, ge=0, le=240)
    #: no slot is offered on a day that already holds this many sessions
    max_sessions_per_day: int | None = Field(8, ge=1)
    #: service codes of emotionally intensive sessions, and how many may follow one another
    intensive_service_codes: list[str] = Field(default_factory=lambda: ["90837", "90839", "90847"])
    max_consecutive_intensive: int | None = Field(3, ge=1)
    #: sessions closer than this are "consecutive" for the intensive rule
    consecutive_gap_minutes: int = Field(30, ge=0)
    #: a directory booking may be an intensive session (an intake): count the slot as intensive
    new_booking_intensive: bool = True
    minimum_notice_hours: float = Field(24.0, ge=0)

    @field_validator("working_hours", "telehealth_hours")
    @classmethod
    def _hours(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for day, spans in value.items():
            if day.lower()[:3] not in _WEEKDAYS or len(day) < 3:
                raise ValueError(f"unknown weekday {day!r}; use mon, tue, wed, thu, fri, sat, sun")
            out[day.lower()[:3]] = _spans(spans)
        return out

    @model_validator(mode="after")
    def _intake_cap(self) -> AvailabilityRules:
        if self.new_client_weekly_cap is not None and not any(s.intake for s in self.online_services.values()):
            raise ValueError("new_client_weekly_cap counts intake sessions: mark at least one of online_services as intake: true")
        return self


class AvailabilityConfig(AvailabilityRules):
    #: how many days ahead slots are published
    horizon_days: int = Field(21, ge=1, le=366)
    #: seconds between availability runs (changes also trigger one within seconds)
    interval: float = Field(300.0, gt=0)
    #: seconds between busy-time reads from calendars that report it
    busy_refresh_interval: float = Field(300.0, gt=0)
    #: seconds between looks at every published date in every directory (and at start): what a
    #: directory shows is compared with what it should show and rewritten where it differs
    sweep_interval: float = Field(86400.0, gt=0)


class ClinicianConfig(_Strict):
    """A clinician is a key; ``accounts`` maps each connector name to that system's identifiers."""

    display_name: str | None = None
    timezone: str | None = None
    accounts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: keys of ``availability`` that differ for this clinician (working hours, session length...)
    availability: dict[str, Any] = Field(default_factory=dict)
    _tz = field_validator("timezone")(lambda v: v if v is None else _zone(v))

    @field_validator("availability")
    @classmethod
    def _rules(cls, value: dict[str, Any]) -> dict[str, Any]:
        AvailabilityRules.model_validate(value)
        return value


class ConnectorConfig(BaseModel):
    """Common keys of every connector; the rest belongs to the connector's ``Options`` model."""

    model_config = ConfigDict(extra="allow")

    type: str
    role: Role | None = None
    enabled: bool = True
    poll_interval: float = Field(60.0, gt=0, description="seconds between incremental pulls")
    full_sweep_interval: float = Field(86400.0, gt=0, description="seconds between full reconciliations")
    #: a record in the system's own user interface, ``{external_id}`` standing for the copy's id
    #: there (the FHIR Appointment id, the Zocdoc appointment id): the console links worklist items
    #: and receipts to it, so a person lands on what the item concerns
    item_url: str | None = None

    @field_validator("item_url")
    @classmethod
    def _item_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("https://", "http://")) or "{external_id}" not in v:
            raise ValueError("must be an http(s) address with {external_id} where the record's id goes")
        try:
            v.format(external_id="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError("may hold no placeholder but {external_id}") from None
        return v

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CancellationPolicy(_Strict):
    late_cancel_window_hours: float = Field(24.0, ge=0)
    late_cancel_fee: bool = True
    no_show_fee: bool = True
    clinical_waives_fee: bool = True
    #: who cancelled when a calendar event is simply deleted (no tag)
    default_cancelled_by: CancelledBy = CancelledBy.CLIENT
    #: self-pay charge code the EHR connector uses for a late-cancel fee
    fee_code: str = "LATE-CANCEL-FEE"
    #: self-pay charge code for a no-show fee (a charge of its own, not the late-cancel one)
    no_show_fee_code: str = "NO-SHOW-FEE"
    fee_amount: float = Field(0.0, ge=0)


class PrivacyPolicy(_Strict):
    title_template: str = "Client session"
    busy_title: str = "Busy"
    telehealth_location: str = "Telehealth"


class GuardPolicy(_Strict):
    """Mass-disappearance guard: hold a pull that would cancel this much at once."""

    max_share: float = Field(0.3, gt=0, le=1)
    min_count: int = Field(5, ge=1)


class Policy(_Strict):
    cancellation: CancellationPolicy = Field(default_factory=CancellationPolicy)
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    mass_cancel_guard: GuardPolicy = Field(default_factory=GuardPolicy)


class OutboxConfig(_Strict):
    #: failures that are not transient (recurring conflicts, errors not understood) before a write is
    #: dead-lettered; a system that is unreachable or throttling is waited for however long it takes
    max_attempts: int = Field(8, ge=1)
    backoff_base: float = Field(1.0, gt=0)
    #: the longest wait between two attempts, so a write lands within this of its system's return
    backoff_max: float = Field(300.0, gt=0)
    #: seconds a connector's writes may keep failing transiently before a worklist item warns a person
    outage_warning: float = Field(3600.0, gt=0)
    #: due writes read from the store at a time per connector (at least two calls' worth in flight)
    batch: int = Field(50, ge=1)
    #: calls in flight per connector (one write or one vendor batch each), within each system's own
    #: limits: per account (4 per Google calendar or Graph mailbox) and per server (an EHR, a
    #: directory, a CalDAV server: 8)
    concurrency: int = Field(64, ge=1, le=64)


class HttpConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    #: the address vendors reach this listener at (https, through a reverse proxy); push channels
    #: and webhooks are registered under ``<public_url>/webhooks/<connector>``; unset = polling only
    public_url: str | None = None
    token: SecretRef | None = None
    #: seconds between checks that push channels exist and are renewed before they expire
    channel_check_interval: float = Field(600.0, gt=0)
    #: seconds a processed webhook notification is kept in the store's inbox (for diagnosis) before it is deleted
    inbox_retention: float = Field(86400.0, ge=0)


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_logs: bool = Field(True, alias="json")


class AuditConfig(_Strict):
    """Anchors of the audit chain kept outside the store (anchors.py)."""

    #: HMAC key the anchors are signed with; not in the store ({credential: audit-key})
    key: SecretRef | None = None
    #: a file the anchors are also appended to (make it append-only, or put it on another host);
    #: they always go to the log (the journal) as ``audit_anchor`` lines
    anchor_file: Path | None = None
    #: seconds between anchors (one more at shutdown); entries newer than the last are not covered yet
    anchor_interval: float = Field(60.0, gt=0)


class ConsoleUser(_Strict):
    """A person who may use the console; the password hash comes by reference (``syncbridge passwd``)."""

    #: viewer: read only; front_desk: cancel one session, mark a no-show, close worklist items;
    #: admin: everything (confirm held pulls, retry dead letters, bulk operations)
    role: Literal["viewer", "front_desk", "admin"]
    #: ``scrypt$n$r$p$salt$hash`` as ``syncbridge passwd`` prints it, in a file or variable
    password_hash: SecretRef


class ConsoleConfig(_Strict):
    """The practice manager's console on the HTTP listener (``/console``)."""

    enabled: bool = False
    #: signs the session cookies; unset: derived from ``store.secret_key``. One of the two is required
    session_key: SecretRef | None = None
    #: seconds without a request after which a person must log in again
    idle_timeout: float = Field(1800.0, ge=60, le=86400)
    users: dict[str, ConsoleUser] = Field(default_factory=dict)

    @field_validator("users")
    @classmethod
    def _names(cls, value: dict[str, ConsoleUser]) -> dict[str, ConsoleUser]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name):
                raise ValueError(f"user name {name!r}: use letters, digits and . _ @ - (up to 64)")
        return value


class PracticeConfig(BaseSettings):
    """The whole configuration. Environment variables override YAML: ``SYNCBRIDGE_STORE__PATH``."""

    model_config = SettingsConfigDict(
        env_prefix="SYNCBRIDGE_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    practice: Practice = Field(default_factory=Practice)
    store: StoreConfig = Field(default_factory=StoreConfig)
    clinicians: dict[str, ClinicianConfig] = Field(default_factory=dict)
    connectors: dict[str, ConnectorConfig] = Field(default_factory=dict)
    policy: Policy = Field(default_factory=Policy)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    availability: AvailabilityConfig = Field(default_factory=AvailabilityConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)

    @field_validator("console")
    @classmethod
    def _console_key(cls, value: ConsoleConfig, info: ValidationInfo) -> ConsoleConfig:
        store = info.data.get("store")
        if value.enabled and value.session_key is None and (store is None or store.secret_key is None):
            raise ValueError(
                "the console needs a key to sign its session cookies: set console.session_key (a secret reference, "
                "e.g. {credential: console-session-key}) or store.secret_key"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    def clinician_zone(self, clinician: str) -> str:
        c = self.clinicians.get(clinician)
        return (c.timezone if c and c.timezone else None) or self.practice.timezone

    def availability_of(self, clinician: str) -> AvailabilityRules:
        """The practice's availability rules with the clinician's own keys laid over them."""
        base = {k: v for k, v in self.availability.model_dump().items() if k in AvailabilityRules.model_fields}
        c = self.clinicians.get(clinician)
        return AvailabilityRules.model_validate(base | (c.availability if c else {}))

    def clinicians_of(self, connector: str) -> dict[str, dict[str, Any]]:
        """Clinician key -> that clinician's account settings in ``connector``."""
        return {k: c.accounts[connector] for k, c in self.clinicians.items() if connector in c.accounts}


# --- loading -------------------------------------------------------------------------------


#: a configuration is a page of settings; anything near this is not one (and parsing it would be slow)
MAX_CONFIG_BYTES = 256 * 1024


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a configuration may not use (a key given twice, an alias)."""


class _StrictLoader(yaml.SafeLoader):
    """YAML as a configuration needs it: a key given twice is refused naming both lines (the last
    would otherwise silently win: a second ``password:``), and aliases are refused, so a few
    hundred bytes cannot expand into gigabytes (an alias bomb) and every value is where it is read."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(None, None, "aliases (*name) are not allowed in a configuration: write the value out", mark)
        return super().compose_node(parent, index)  # type: ignore[no-any-return]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, str) and key in first:
                raise _Refused(
                    None, None, f"key {key!r} is given twice (first at line {first[key]}); keep one", key_node.start_mark
                )
            if isinstance(key, str):
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Path of keys -> 1-based line, so a validation error can point at the YAML."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    root = yaml.compose(text, Loader=_StrictLoader)
    if root is not None:
        walk(root, ())
    return lines


def _message(error: Any) -> str:
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def _nearest_line(lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def parse_config(text: str, source: str = "<config>") -> PracticeConfig:
    """Parse and validate YAML text (plus environment overrides) into a PracticeConfig.

    Every problem found is reported at once, in file order: an admin fixing a new config should
    not need one run per typo.
    """
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader, stricter
        lines = _line_map(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        said = problem if isinstance(err, _Refused) else f"not valid YAML: {problem}"
        raise ConfigError("<yaml>", said, mark.line + 1 if mark else None, source) from err
    if data is None:
        # most often a file read while an editor or a deploy tool was rewriting it
        raise ConfigError("<file>", "the configuration is empty", None, source)
    if not isinstance(data, dict):
        raise ConfigError("<root>", "the top level must be a mapping of sections", 1, source)
    problems: list[ConfigError] = []
    cfg: PracticeConfig | None = None
    try:
        cfg = PracticeConfig(**data)
    except ValidationError as err:
        problems += _validation_problems(err, PracticeConfig, (), lines, source)
    if cfg is not None:
        connectors, accounts = cfg.connectors, {k: list(c.accounts) for k, c in cfg.clinicians.items()}
        names = set(connectors)
    else:
        # the references can still be checked where the sections themselves are sound
        connectors, names, accounts = _raw_references(data)
    problems += _reference_problems(connectors, names, accounts, lines, source)
    if problems:
        raise ConfigError.of(problems)
    assert cfg is not None
    return cfg


def _validation_problems(
    err: ValidationError, model: type[BaseModel], prefix: tuple[str, ...], lines: dict[tuple[str, ...], int], source: str,
    also: Iterable[str] = (),
) -> list[ConfigError]:
    """Each error of validating ``model`` (found under ``prefix``); ``also``: keys allowed beside its own."""
    problems = []
    for e in err.errors():
        rel = tuple(str(p) for p in e["loc"])
        loc = (*prefix, *rel)
        message = _message(e)
        if e["type"] == "extra_forbidden" and rel:
            at = _model_at(model, rel[:-1])
            known = [*also, *_keys_of(at)] if at is not None else []
            close = difflib.get_close_matches(rel[-1], known, n=1, cutoff=0.7)
            message = "not a known option here" + (f" (did you mean {close[0]!r}?)" if close else "")
        problems.append(ConfigError(".".join(loc) or "<root>", message, _nearest_line(lines, loc), source))
    return problems


def _keys_of(model: type[BaseModel]) -> list[str]:
    """The keys a model takes in YAML (an alias where the field has one)."""
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(model: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The model whose keys are allowed at ``path`` below ``model``, stepping through mappings by key."""
    current: Any = model
    for part in path:
        current = _unoptional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = next((f for name, f in current.model_fields.items() if (f.alias or name) == part), None)
            current = field.annotation if field is not None else None
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unoptional(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unoptional(annotation: Any) -> Any:
    """``Section | None`` as ``Section``; any other annotation as it is."""
    if get_origin(annotation) in (Union, UnionType):
        return next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return annotation


def _raw_references(data: dict[str, Any]) -> tuple[dict[str, ConnectorConfig], set[str], dict[str, list[str]]]:
    """Of a config that failed validation: the sound connectors, every connector name, the accounts."""
    raw = data.get("connectors", {})
    if not isinstance(raw, dict):
        return {}, set(), {}  # already reported; every account would look dangling
    connectors: dict[str, ConnectorConfig] = {}
    for name, entry in raw.items():
        try:
            connectors[str(name)] = ConnectorConfig.model_validate(entry)
        except ValidationError:
            continue  # already reported
    accounts: dict[str, list[str]] = {}
    clinicians = data.get("clinicians")
    for key, entry in (clinicians.items() if isinstance(clinicians, dict) else ()):
        acc = entry.get("accounts") if isinstance(entry, dict) else None
        if isinstance(acc, dict):
            accounts[str(key)] = [str(a) for a in acc]
    return connectors, {str(n) for n in raw}, accounts


def _reference_problems(
    connectors: dict[str, ConnectorConfig], names: set[str], accounts: dict[str, list[str]],
    lines: dict[tuple[str, ...], int], source: str,
) -> list[ConfigError]:
    """Connector types that are not installed, connector options their type refuses, accounts in no connector."""
    from .registry import connector_class, known_types  # late: the registry imports entry points

    problems: list[ConfigError] = []
    for name, conn in connectors.items():
        try:
            cls = connector_class(conn.type)
        except KeyError:
            problems.append(ConfigError(
                f"connectors.{name}.type",
                f"unknown connector type {conn.type!r} (installed: {', '.join(known_types()) or 'none'})",
                _nearest_line(lines, ("connectors", name, "type")),
                source,
            ))
            continue
        options_model = getattr(cls, "Options", None)
        if options_model is not None:
            try:
                options_model(**conn.options)
            except ValidationError as err:
                problems += _validation_problems(err, options_model, ("connectors", name), lines, source, also=_keys_of(ConnectorConfig))
    for key, used in accounts.items():
        for conn_name in used:
            if conn_name not in names:
                loc = ("clinicians", key, "accounts", conn_name)
                problems.append(ConfigError(
                    ".".join(loc),
                    f"no connector named {conn_name!r} is configured (known: {', '.join(sorted(names)) or 'none'})",
                    _nearest_line(lines, loc),
                    source,
                ))
    return problems


def load_config(path: str | os.PathLike[str], *, resolve_secrets: bool = False) -> PracticeConfig:
    """The validated configuration in ``path``; with ``resolve_secrets``, every secret it refers to
    is also looked up now (secret_check.py), and any that cannot be used is refused with its line."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError("<file>", f"cannot read {p}: {err.strerror}") from err
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("<file>", f"the file is over {MAX_CONFIG_BYTES // 1024} KiB: not a syncbridge configuration (is it the right file?)", None, str(p))
    if b"\0" in raw:
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise ConfigError("<file>", "the file is binary (it holds a NUL byte), not YAML text: is it the right file?", line, str(p))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError("<file>", f"the file is not UTF-8 text (byte 0x{raw[err.start]:02x}); save it as UTF-8", line, str(p)) from err
    cfg = parse_config(text, str(p))
    if resolve_secrets:
        from .secret_check import secret_problems

        if problems := secret_problems(cfg, _line_map(text), str(p)):
            raise ConfigError.of(problems)
    return cfg
