"""Emulators started for one test, with the accounts it needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from syncbridge_connectors.google_calendar.emulator import GoogleCalendarEmulator, Running, running
from syncbridge_connectors.microsoft365 import emulator as graph_emulator


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


@contextmanager
def microsoft365(workdir: Path, client_id: str, secret: str, *mailboxes: str, allow_http: bool = False) -> Iterator[graph_emulator.RunningGraph]:
    """The Graph emulator (TLS) with one registered app and a mailbox per address.

    ``allow_http`` lets its change notifications reach a plain-http loopback listener.
    """
    server = graph_emulator.running(workdir)
    server.emulator.notifier.allow_http = allow_http
    server.emulator.register_app(client_id, secret)
    for mailbox in mailboxes:
        server.emulator.add_user(mailbox)
    try:
        yield server
    finally:
        server.stop()
