"""Zocdoc as a channel: bookings made by clients flow in, free slots are published; see README.md."""

from __future__ import annotations

__all__ = ["ZocdocConnector", "ZocdocOptions"]


def __getattr__(name: str) -> object:
    # lazy, so importing the package (entry-point scanning) stays cheap
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(name)
