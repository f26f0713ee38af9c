"""A FHIR R4 server the project did not write, for the tests: Medplum's ``@medplum/fhir-router``.

It comes from the npm registry, pinned in ``tests/fhir_server/package-lock.json`` and installed by
``make test`` (``npm ci``), and runs as a Node subprocess on loopback behind
``tests/fhir_server/server.mjs``, a shim that only translates HTTP to the router's requests. What
the server honours and what it does not is measured and written down in
``tests/fhir_server/README.md``. The server keeps everything in memory: each start is empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from syncbridge.emulation import free_port
from tests.servers import stop_process

__all__ = ["SERVER_DIR", "TOKEN", "FHIRServer", "fhir_server_fixture", "installed_version", "launch", "locked_version", "start_fhir_server"]

SERVER_DIR = Path(__file__).parent / "fhir_server"
#: any bearer token is accepted; a request without one is answered 401
TOKEN = "third-party-fhir-test-token"
STARTUP_SECONDS = 20.0
PACKAGE = "@medplum/fhir-router"


@dataclass
class FHIRServer:
    """A running server: its FHIR base URL, its log, and how to stop it."""

    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def http(self) -> httpx.AsyncClient:
        """Plain FHIR REST as a person's tool would speak it (no connector code involved)."""
        return httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/fhir+json"}, timeout=10
        )

    def stop(self) -> None:
        stop_process(self.proc)


def missing_install() -> str | None:
    """Why the server cannot start here (no node, or ``npm ci`` not run), or None."""
    if shutil.which("node") is None:
        return "node is not installed: the third-party FHIR server runs on Node >= 20.19 (Debian's nodejs)"
    if not (SERVER_DIR / "node_modules" / PACKAGE / "package.json").exists():
        return f"{PACKAGE} is not installed in tests/fhir_server: run `make test` (it runs npm ci there)"
    return None


def installed_version(package: str = PACKAGE) -> str:
    """The version npm installed, to compare with the pin in package-lock.json."""
    return str(json.loads((SERVER_DIR / "node_modules" / package / "package.json").read_text())["version"])


def locked_version(package: str = PACKAGE) -> str:
    lock = json.loads((SERVER_DIR / "package-lock.json").read_text())
    return str(lock["packages"][f"node_modules/{package}"]["version"])


def start_fhir_server(tmp_dir: Path) -> tuple[str, Callable[[], None]]:
    """Start the server on a free loopback port, logging to ``tmp_dir``; returns (base URL, stop)."""
    server = launch(tmp_dir)
    return server.base_url, server.stop


def launch(tmp_dir: Path) -> FHIRServer:
    """Start the server on a free loopback port, logging to ``tmp_dir/fhir-router.log``.

    Polls ``GET [base]/Patient`` until it answers, so the caller gets a server ready for requests;
    a server that died or stayed silent fails with the end of its log.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = tmp_dir / "fhir-router.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["node", str(SERVER_DIR / "server.mjs"), "--port", str(port)],
            cwd=SERVER_DIR, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    server = FHIRServer(f"http://127.0.0.1:{port}/fhir/R4", proc, log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the FHIR server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            httpx.get(f"{server.base_url}/Patient", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1.0)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"the FHIR server did not answer within {STARTUP_SECONDS}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module", name="fhir_server")
def fhir_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FHIRServer]:
    """``fhir_server``: one server per test module; tests isolate themselves with a Practitioner each.

    Import ``fhir_server_fixture`` into a test module to use it (the name keeps flake8's F811 quiet).
    """
    reason = missing_install()
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason} (CI runs `make test`, which installs it: these tests must not be skipped there)")
    if reason:
        pytest.skip(reason)
    server = launch(tmp_path_factory.mktemp("fhir-router"))
    try:
        yield server
    finally:
        server.stop()
