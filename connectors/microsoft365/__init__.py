"""Microsoft 365 / Outlook mirror connector over Microsoft Graph, with change notifications; see README.md."""

from __future__ import annotations

__all__ = ["Microsoft365Connector", "Microsoft365Options"]


def __getattr__(name: str) -> object:
    # lazy, so importing the package (entry-point scanning) stays cheap
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(name)
