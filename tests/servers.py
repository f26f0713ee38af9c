"""Real CalDAV servers for the tests: Radicale and Xandikos as subprocesses on loopback.

Both come from PyPI through the ``test`` extra, so a fresh machine that ran ``make test`` has
them. Each server gets its own temporary directory and a free port, is polled until it answers,
and is stopped at teardown. Calendars are created with MKCALENDAR (RFC 4791 section 5.3.1), one
per test, so tests never see each other's events.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from syncbridge.emulation import free_port

__all__ = [
    "DavServer",
    "free_port",
    "radicale_server",
    "start_radicale",
    "start_xandikos",
    "stop_process",
    "xandikos_server",
]

USER = "clinician"
PASSWORD = "app-specific-secret"
STARTUP_SECONDS = 30.0


@dataclass
class DavServer:
    """One running server: where it listens, how to log in, where its calendars live."""

    kind: str  # "radicale" | "xandikos"
    base_url: str
    calendar_home: str  # path under which calendars are made, with trailing slash
    root: Path  # the server's storage directory
    proc: subprocess.Popen[bytes]
    log_path: Path
    username: str | None = None
    password: str | None = None
    calendars: list[str] = field(default_factory=list)

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username and self.password else None

    def http(self) -> httpx.Client:
        return httpx.Client(auth=self.auth, timeout=10.0)

    def make_calendar(self, name: str | None = None) -> str:
        """Create an empty calendar (MKCALENDAR, RFC 4791 section 5.3.1); returns its full URL."""
        name = name or "cal-" + uuid.uuid4().hex[:10]
        url = f"{self.base_url}{self.calendar_home}{name}/"
        with self.http() as client:
            r = client.request("MKCALENDAR", url)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"MKCALENDAR {url} answered {r.status_code}")
        self.calendars.append(url)
        return url

    def delete_calendar(self, url: str) -> None:
        with self.http() as client:
            client.delete(url)

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Ask a test server to stop, then make sure it has."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_until_up(server: DavServer) -> None:
    """Poll until the server answers any HTTP request; fail with its log if it died."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.kind} exited with {server.proc.returncode}:\n{server.log_path.read_text()[-4000:]}")
        try:
            httpx.request("OPTIONS", server.base_url + "/", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.kind} did not answer within {STARTUP_SECONDS}s:\n{server.log_path.read_text()[-4000:]}")


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()


def start_radicale(directory: Path) -> DavServer:
    """Radicale with htpasswd auth (plain-text user file), owner-only rights, storage in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    users = directory / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    port = free_port()
    config = directory / "config"
    config.write_text(
        "[server]\n"
        f"hosts = 127.0.0.1:{port}\n"
        "[auth]\n"
        "type = htpasswd\n"
        f"htpasswd_filename = {users}\n"
        "htpasswd_encryption = plain\n"
        "delay = 0\n"
        "[rights]\n"
        "type = owner_only\n"
        "[storage]\n"
        f"filesystem_folder = {directory / 'collections'}\n"
        "[logging]\n"
        "level = warning\n"
    )
    log_path = directory / "radicale.log"
    proc = _spawn([sys.executable, "-m", "radicale", "--config", str(config)], log_path)
    server = DavServer("radicale", f"http://127.0.0.1:{port}", f"/{USER}/", directory / "collections", proc, log_path, USER, PASSWORD)
    _wait_until_up(server)
    return server


def start_xandikos(directory: Path) -> DavServer:
    """Xandikos (no auth without TLS) serving ``directory``, principal ``/user/`` made by --defaults."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = directory / "xandikos.log"
    args = [
        sys.executable, "-m", "xandikos.web",
        "-d", str(directory / "data"),
        "--defaults",
        "--current-user-principal", "/user/",
        "-l", "127.0.0.1",
        "-p", str(port),
    ]  # fmt: skip
    help_text = subprocess.run([*args[:3], "--help"], capture_output=True, text=True, timeout=60).stdout
    if "--no-detect-systemd" in help_text:  # newer releases; older ones never look for systemd
        args.append("--no-detect-systemd")
    proc = _spawn(args, log_path)
    server = DavServer("xandikos", f"http://127.0.0.1:{port}", "/user/calendars/", directory / "data", proc, log_path)
    _wait_until_up(server)
    return server


@pytest.fixture(scope="session")
def radicale_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    """One Radicale for the session; tests isolate themselves with a calendar each."""
    server = start_radicale(tmp_path_factory.mktemp("radicale"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def xandikos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    """One Xandikos for the session; tests isolate themselves with a calendar each."""
    server = start_xandikos(tmp_path_factory.mktemp("xandikos"))
    try:
        yield server
    finally:
        server.stop()
