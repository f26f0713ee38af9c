"""Google Calendar mirror connector (Workspace or personal accounts); see README.md."""

from __future__ import annotations

__all__ = ["GoogleCalendarConnector", "GoogleOptions"]


def __getattr__(name: str) -> object:
    # lazy, so importing the package (entry-point scanning) stays cheap
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(name)
