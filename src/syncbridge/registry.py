"""Connector types, found through the ``syncbridge.connectors`` entry-point group."""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import PracticeConfig
    from .connector import Connector

__all__ = ["build_connectors", "connector_class", "known_types"]

GROUP = "syncbridge.connectors"


@cache
def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def known_types() -> list[str]:
    return sorted(_entry_points())


def connector_class(type_name: str) -> type[Connector]:
    """A registered type, or ``package.module:Class`` for a connector not packaged (yet)."""
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)  # type: ignore[no-any-return]
        except (ImportError, AttributeError) as err:
            raise KeyError(type_name) from err
    ep = _entry_points()[type_name]  # KeyError: unknown type
    return ep.load()  # type: ignore[attr-defined,no-any-return]


def build_connectors(cfg: PracticeConfig) -> dict[str, Connector]:
    out: dict[str, Connector] = {}
    for name, conn in cfg.connectors.items():
        if not conn.enabled:
            continue
        try:
            cls = connector_class(conn.type)
        except KeyError:
            raise ConfigError(f"connectors.{name}.type", f"unknown connector type {conn.type!r}") from None
        out[name] = cls(name, conn, cfg)
    return out
