"""FHIR R4 EHR connector (Epic, Oracle Health, athenahealth, Canvas, Medplum...) as the record; see README.md."""

from __future__ import annotations

__all__ = ["FHIRConnector", "FHIROptions"]


def __getattr__(name: str) -> object:
    # lazy, so importing the package (entry-point scanning) stays cheap
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(name)
