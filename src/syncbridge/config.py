"""Configuration: YAML plus ``SYNCBRIDGE_`` environment overrides, validated before anything runs.

A bad config is refused with the key, the problem and, where the YAML gives one, the line.
Connector-specific options are validated by the connector's own ``Options`` model, found through
the entry-point registry, so the core never names a connector.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError, MalformedRecord
from .model import CancelledBy, Role, check_timezone
from .secrets import SecretRef

__all__ = [
    "CancellationPolicy",
    "ClinicianConfig",
    "ConnectorConfig",
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
    path: Path = Path("syncbridge.db")


class ClinicianConfig(_Strict):
    """A clinician is a key; ``accounts`` maps each connector name to that system's identifiers."""

    display_name: str | None = None
    timezone: str | None = None
    accounts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    _tz = field_validator("timezone")(lambda v: v if v is None else _zone(v))


class ConnectorConfig(BaseModel):
    """Common keys of every connector; the rest belongs to the connector's ``Options`` model."""

    model_config = ConfigDict(extra="allow")

    type: str
    role: Role | None = None
    enabled: bool = True
    poll_interval: float = Field(60.0, gt=0, description="seconds between incremental pulls")
    full_sweep_interval: float = Field(86400.0, gt=0, description="seconds between full reconciliations")

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
    #: self-pay charge code the EHR connector uses for a late-cancel or no-show fee
    fee_code: str = "LATE-CANCEL-FEE"
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
    max_attempts: int = Field(8, ge=1)
    backoff_base: float = Field(1.0, gt=0)
    backoff_max: float = Field(900.0, gt=0)
    batch: int = Field(50, ge=1)


class HttpConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    public_url: str | None = None
    token: SecretRef | None = None


class LoggingConfig(_Strict):
    level: str = "info"
    json_logs: bool = Field(True, alias="json")


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

    def clinicians_of(self, connector: str) -> dict[str, dict[str, Any]]:
        """Clinician key -> that clinician's account settings in ``connector``."""
        return {k: c.accounts[connector] for k, c in self.clinicians.items() if connector in c.accounts}


# --- loading -------------------------------------------------------------------------------


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

    root = yaml.compose(text, Loader=yaml.SafeLoader)
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
    """Parse and validate YAML text (plus environment overrides) into a PracticeConfig."""
    try:
        data = yaml.safe_load(text) or {}
        lines = _line_map(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError("<yaml>", f"not valid YAML: {problem}", mark.line + 1 if mark else None, source) from err
    if not isinstance(data, dict):
        raise ConfigError("<root>", "the top level must be a mapping of sections", 1, source)
    try:
        cfg = PracticeConfig(**data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(str(p) for p in first["loc"])
        raise ConfigError(".".join(loc) or "<root>", _message(first), _nearest_line(lines, loc), source) from None
    _check_references(cfg, lines, source)
    return cfg


def _check_references(cfg: PracticeConfig, lines: dict[tuple[str, ...], int], source: str) -> None:
    from .registry import connector_class, known_types  # late: the registry imports entry points

    for name, conn in cfg.connectors.items():
        try:
            cls = connector_class(conn.type)
        except KeyError:
            raise ConfigError(
                f"connectors.{name}.type",
                f"unknown connector type {conn.type!r} (installed: {', '.join(known_types()) or 'none'})",
                _nearest_line(lines, ("connectors", name, "type")),
                source,
            ) from None
        options_model = getattr(cls, "Options", None)
        if options_model is not None:
            try:
                options_model(**conn.options)
            except ValidationError as err:
                first = err.errors()[0]
                loc = ("connectors", name, *(str(p) for p in first["loc"]))
                raise ConfigError(".".join(loc), _message(first), _nearest_line(lines, loc), source) from None
    for key, clin in cfg.clinicians.items():
        for conn_name in clin.accounts:
            if conn_name not in cfg.connectors:
                loc = ("clinicians", key, "accounts", conn_name)
                raise ConfigError(
                    ".".join(loc),
                    f"no connector named {conn_name!r} is configured (known: {', '.join(cfg.connectors) or 'none'})",
                    _nearest_line(lines, loc),
                    source,
                )


def load_config(path: str | os.PathLike[str]) -> PracticeConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError("<file>", f"cannot read {p}: {err.strerror}") from err
    return parse_config(text, str(p))
