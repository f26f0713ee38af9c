"""A server that cannot be reached is named with the reason an admin can act on.

Real loopback sockets, through the HTTP libraries the connectors use (httpx for FHIR, Zocdoc,
Graph and iCal feeds; requests under msal): each wraps the operating system's error its own way.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from syncbridge.errors import TransientError, unreachable
from syncbridge_connectors.microsoft365.tls import make_tls_files


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.fixture
def self_signed(tmp_path: Path) -> Iterator[int]:
    """A TLS server whose certificate no public CA signed (what a test server or a proxy shows)."""
    tls = make_tls_files(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield int(server.getsockname()[1])
    server.close()


def _httpx(url: str) -> BaseException:
    with pytest.raises(httpx.HTTPError) as info:
        httpx.get(url, timeout=0.5)
    return info.value


def _requests(url: str) -> BaseException:
    with pytest.raises(requests.RequestException) as info:
        requests.get(url, timeout=0.5)
    return info.value


@pytest.mark.parametrize("call", [_httpx, _requests])
def test_refused(call) -> None:  # type: ignore[no-untyped-def]
    port = _closed_port()
    err = unreachable("GET Appointment", call(f"http://127.0.0.1:{port}/Appointment?patient=p-123"))
    assert isinstance(err, TransientError)
    assert str(err) == f"GET Appointment: 127.0.0.1:{port} refused the connection (is the service running, and the port right?)"


@pytest.mark.parametrize("call", [_httpx, _requests])
def test_no_answer(call, silent: int) -> None:  # type: ignore[no-untyped-def]
    err = unreachable("POST token", call(f"http://127.0.0.1:{silent}/token"))
    assert str(err) == f"POST token: 127.0.0.1:{silent} did not answer in time"


@pytest.mark.parametrize("call", [_httpx, _requests])
def test_untrusted_certificate(call, self_signed: int) -> None:  # type: ignore[no-untyped-def]
    err = unreachable("GET me", call(f"https://127.0.0.1:{self_signed}/me"))
    assert str(err) == f"GET me: 127.0.0.1:{self_signed} presented a TLS certificate this machine does not trust"


def test_names_the_host_only() -> None:
    """A path or query can name a record, and user info is a credential: neither is repeated."""
    port = _closed_port()
    err = unreachable("feed of dr_lee", _httpx(f"http://token:s3cret@127.0.0.1:{port}/feeds/abc123.ics?key=k"))
    assert f"127.0.0.1:{port} refused" in str(err)
    assert "s3cret" not in str(err) and "abc123" not in str(err) and "key=" not in str(err)


def test_other_failures_keep_their_kind() -> None:
    """An error that is not about reaching the server is not described as one."""
    err = unreachable("GET x", httpx.DecodingError("bad gzip"))
    assert str(err) == "GET x: the server did not complete the request (DecodingError)"


def test_host_from_the_caller_when_the_error_has_none() -> None:
    """httplib2 (under the Google client) raises the bare socket error: the caller's URL names the host."""
    port = _closed_port()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError) as info:
        s.connect(("127.0.0.1", port))
    err = unreachable("events.list", info.value, f"https://user:pw@127.0.0.1:{port}/calendar/v3/")
    assert str(err).startswith(f"events.list: 127.0.0.1:{port} refused the connection")
