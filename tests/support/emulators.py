"""Emulators started for one test, with the accounts it needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from syncbridge_connectors.google_calendar.emulator import GoogleCalendarEmulator, Running, running


@contextmanager
def google_calendar(*emails: str, zone: str = "America/New_York") -> Iterator[Running]:
    """The Calendar API emulator with a Workspace user per address."""
    server = running(GoogleCalendarEmulator())
    for email in emails:
        server.emulator.add_user(email, time_zone=zone)
    try:
        yield server
    finally:
        server.stop()
