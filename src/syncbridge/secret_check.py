"""Every secret a configuration refers to, looked up the way the daemon will look it up.

``syncbridge check --no-connect`` (the unit's ``ExecStartPre``) resolves each reference without any
network: the variable is set, the file or systemd credential is readable and not empty, and a
key looks like a key. A daemon that would start with a connector failing for want of its
secret is refused before it starts, with the key and line of the reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .errors import AuthError, ConfigError
from .secrets import SecretRef

if TYPE_CHECKING:
    from .config import PracticeConfig

__all__ = ["secret_problems", "secret_refs"]


def _in_model(model: BaseModel, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], SecretRef]]:
    for name in type(model).model_fields:
        yield from _in_value(getattr(model, name), (*path, name))


def _in_value(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], SecretRef]]:
    if isinstance(value, SecretRef):
        yield path, value
    elif isinstance(value, BaseModel):
        yield from _in_model(value, path)
    elif isinstance(value, dict):
        if value and set(value) <= {"env", "file", "credential"}:
            try:
                yield path, SecretRef.model_validate(value)
            except ValidationError:
                pass  # not a reference after all: the connector's own validation speaks for it
            return
        for key, item in value.items():
            yield from _in_value(item, (*path, str(key)))


def secret_refs(cfg: PracticeConfig) -> Iterator[tuple[tuple[str, ...], SecretRef]]:
    """(key path, reference) of every secret: practice sections, connector options, clinician accounts."""
    from .registry import connector_class  # late: the registry imports entry points

    for section in ("store", "http", "audit", "console"):
        yield from _in_model(getattr(cfg, section), (section,))
    for name, conn in cfg.connectors.items():
        options_model = getattr(connector_class(conn.type), "Options", None)
        if options_model is not None:
            yield from _in_model(options_model(**conn.options), ("connectors", name))
    for key, clinician in cfg.clinicians.items():
        yield from _in_value(clinician.accounts, ("clinicians", key, "accounts"))


def _shape(field: str, value: str) -> str | None:
    """What is wrong with a secret of this kind, by the key it is given under; None if it looks right."""
    if field in ("private_key", "certificate_key") and not ("-----BEGIN" in value and "PRIVATE KEY-----" in value):
        return "is not a PEM private key (-----BEGIN ... PRIVATE KEY-----)"
    if field == "certificate" and "-----BEGIN CERTIFICATE-----" not in value:
        return "is not a PEM certificate (-----BEGIN CERTIFICATE-----)"
    if field == "service_account_key":
        try:
            key = json.loads(value)
        except ValueError:
            return "is not a service account's JSON key"
        if not isinstance(key, dict) or key.get("type") != "service_account" or not key.get("private_key") or not key.get("client_email"):
            return "is not a service account's JSON key (type service_account, with client_email and private_key)"
    return None


def secret_problems(cfg: PracticeConfig, lines: dict[tuple[str, ...], int], source: str) -> list[ConfigError]:
    """One error per reference that cannot be resolved, empty, or of the wrong shape."""
    from .config import _nearest_line

    problems: list[ConfigError] = []
    for path, ref in secret_refs(cfg):
        key = ".".join(path)
        try:
            value = ref.reveal()
        except AuthError as err:
            problems.append(ConfigError(key, f"{err} ({err.action})" if err.action else str(err), _nearest_line(lines, path), source))
            continue
        if not value.strip():
            problems.append(ConfigError(key, f"secret {ref.describe()} is empty", _nearest_line(lines, path), source))
        elif (wrong := _shape(path[-1], value)) is not None:
            problems.append(ConfigError(key, f"secret {ref.describe()} {wrong}", _nearest_line(lines, path), source))
    return problems
