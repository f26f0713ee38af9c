"""Test-wide guards: nothing leaves loopback, and structlog is configured as in production."""

from __future__ import annotations

import ipaddress
import socket

import pytest

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _loopback_only(address: object) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            if host != "localhost":
                raise OSError(f"test tried to reach {host!r}: only loopback is allowed") from None
            return
        if not ip.is_loopback:
            raise OSError(f"test tried to reach {host}: only loopback is allowed")


def _guarded_connect(self: socket.socket, address: object) -> None:
    _loopback_only(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    _loopback_only(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _logging() -> None:
    from syncbridge.logging import configure

    configure(level="info", json_logs=True)


# --- the store on both engines ------------------------------------------------------------------


def pytest_report_header() -> str:
    """Say once, at the top, whether the store's PostgreSQL tests can run here."""
    from tests.support.postgres import unavailable

    return f"store engines: sqlite; postgresql {'SKIPPED: ' + why if (why := unavailable()) else 'available'}"


@pytest.fixture(scope="session")
def postgres_cluster():  # type: ignore[no-untyped-def]
    """A throwaway PostgreSQL cluster for the session (tests/support/postgres.py), or a skip saying why not."""
    from tests.support.postgres import Cluster, find_binaries, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    cluster = Cluster(find_binaries())  # type: ignore[arg-type]
    yield cluster
    cluster.stop()


class Stores:
    """Opens stores of one engine for a test: ``stores(path)`` is ``Store(path)`` on SQLite and a
    store on this test's own database on PostgreSQL (``path`` then only names which database:
    the same path, the same database). ``raw(path)`` is a bare connection to it (the store's SQL
    spelled SQLite's way works on both). Everything opened is closed after the test."""

    def __init__(self, engine: str, cluster) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.cluster = cluster
        self._urls: dict[str, str] = {}
        self._opened: list = []  # type: ignore[type-arg]

    def target(self, path) -> str:  # type: ignore[no-untyped-def]
        if self.engine == "sqlite":
            return str(path)
        key = str(path)
        if key not in self._urls:
            self._urls[key] = self.cluster.database()
        return self._urls[key]

    def __call__(self, path, **kwargs):  # type: ignore[no-untyped-def]
        from syncbridge.store import Store

        store = Store(self.target(path), **kwargs)
        self._opened.append(store)
        return store

    def raw(self, path):  # type: ignore[no-untyped-def]
        if self.engine == "sqlite":
            import sqlite3

            conn = sqlite3.connect(path, isolation_level=None)
        else:
            from syncbridge.pg import PgConnection

            conn = PgConnection(self.target(path), pool_size=1)
        self._opened.append(conn)
        return conn

    def close(self) -> None:
        for thing in reversed(self._opened):
            try:
                thing.close()
            except Exception:  # noqa: BLE001 - a test may have closed it already
                pass
        self._opened.clear()
        for url in self._urls.values():
            self.cluster.drop(url)
        self._urls.clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request):  # type: ignore[no-untyped-def]
    """Run the test once per store engine; PostgreSQL's half skips, saying why, where it is not installed."""
    cluster = request.getfixturevalue("postgres_cluster") if request.param == "postgresql" else None
    opened = Stores(request.param, cluster)
    yield opened
    opened.close()
