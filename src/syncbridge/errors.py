"""The one error hierarchy of syncbridge, grouped by what the caller must do.

    SyncbridgeError
    +-- ConfigError          refuse to start; names the key, the problem and the line
    +-- StoreError           the SQLite store cannot be used (damaged, locked, unwritable, disk full)
    +-- AuthError            an operator must act (re-consent, rotate a secret)
    +-- TransientError       retry with backoff and jitter, honouring ``retry_after``
    |   +-- RateLimited      the vendor throttled us (429, 403 rateLimitExceeded, 503)
    +-- ConflictError        a precondition failed (412/409): re-read, re-merge, retry
    +-- CursorExpired        the incremental cursor is no longer valid: full resync
    +-- BatchRefused         the vendor's batch endpoint refused the whole request: send the parts one by one
    +-- PermanentError       dead-letter this one item, raise a worklist item, go on
        +-- MalformedRecord  one external record cannot be understood

Connectors translate foreign exceptions at their boundary (``raise ... from err``) so the
engine only ever sees these.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

__all__ = [
    "BATCH_REFUSED",
    "AuthError",
    "BatchRefused",
    "ConfigError",
    "ConflictError",
    "CursorExpired",
    "MalformedRecord",
    "PermanentError",
    "RateLimited",
    "StoreError",
    "SyncbridgeError",
    "TransientError",
    "error_kind",
    "retry_after_seconds",
    "unreachable",
]


class SyncbridgeError(Exception):
    """Base of every error syncbridge raises on purpose."""

    kind = "error"


class ConfigError(SyncbridgeError):
    """The configuration cannot be used; nothing was started or changed."""

    kind = "config"

    def __init__(
        self, key: str, problem: str, line: int | None = None, source: str | None = None, *, more: Sequence[ConfigError] = ()
    ):
        self.key = key
        self.problem = problem
        self.line = line
        self.source = source
        #: the other problems found in the same file, so an admin can fix them all in one pass
        self.more = tuple(more)
        where = f"{source}:{line}: " if source and line else f"{source}: " if source else (f"line {line}: " if line else "")
        self.text = f"{where}{key}: {problem}"
        super().__init__("\n".join(p.text for p in self.problems))

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        """This problem and the others, in the order of the file."""
        return (self, *self.more)

    @classmethod
    def of(cls, problems: Sequence[ConfigError]) -> ConfigError:
        """One error for every problem found: in file order, one per key, the first leading."""
        by_key: dict[str, ConfigError] = {}
        for p in problems:
            by_key.setdefault(p.key, p)
        first, *rest = sorted(by_key.values(), key=lambda p: p.line if p.line is not None else 1 << 30)
        return cls(first.key, first.problem, first.line, first.source, more=rest)


class StoreError(SyncbridgeError):
    """The store cannot be read or written; the message says what an operator can do about it."""

    kind = "store"


class AuthError(SyncbridgeError):
    """Credentials were refused; retrying will not help until a person acts."""

    kind = "auth"

    def __init__(self, message: str, *, action: str = ""):
        self.action = action
        super().__init__(f"{message}{' -- ' + action if action else ''}")


class TransientError(SyncbridgeError):
    """Worth retrying later; ``retry_after`` (seconds) comes from the vendor when it said so."""

    kind = "transient"

    def __init__(self, message: str, *, retry_after: float | None = None):
        self.retry_after = retry_after
        super().__init__(message)


class RateLimited(TransientError):
    kind = "throttled"


class ConflictError(SyncbridgeError):
    """The external copy changed since we last read it (HTTP 412/409)."""

    kind = "conflict"


class CursorExpired(SyncbridgeError):
    """The sync token, delta link or watermark is no longer accepted."""

    kind = "cursor_expired"


class BatchRefused(SyncbridgeError):
    """A batch request was refused as a whole (an egress proxy's path allow-list, the endpoint turned
    off): none of its parts was tried, so each is sent on its own instead (DESIGN section 9)."""

    kind = "batch_refused"


#: statuses of a whole batch request (not of a part) that mean the batch endpoint itself is refused
#: here: 400 (Graph ``$batch`` behind a proxy), 404 (no such path), 405, 501
BATCH_REFUSED = frozenset({400, 404, 405, 501})


class PermanentError(SyncbridgeError):
    """This item will never succeed as it is; the rest carries on."""

    kind = "permanent"


class MalformedRecord(PermanentError):
    kind = "malformed"


def error_kind(exc: BaseException) -> str:
    """A short label for metrics and status, never containing record content."""
    return exc.kind if isinstance(exc, SyncbridgeError) else "unexpected"


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header as seconds to wait: delay-seconds or an HTTP-date (RFC 9110
    section 10.2.3); None when absent or unreadable (the caller's own backoff applies)."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def unreachable(what: str, err: BaseException, url: str | None = None) -> TransientError:
    """A failed connection as one plain sentence, whichever HTTP library failed.

    httpx, requests, niquests and httplib2 each wrap the operating system's error in their own
    exception (often twice), so the class name alone ("ConnectError") tells an admin little. The
    chain of causes is searched for the reason, and the request for its host; the path and
    query are left out, as they can name a record. ``url`` is the server's, for libraries whose
    errors do not carry the request (httplib2).
    """
    host = next(filter(None, map(_host_of, _chain(err))), None) or (_netloc(url) if url else None)
    where = f"{host} " if host else "the server "
    reason = next(filter(None, map(_reason_of, _chain(err))), None) or f"did not complete the request ({type(err).__name__})"
    return TransientError(f"{what}: {where}{reason}")


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _reason_of(err: BaseException) -> str | None:
    text = str(err)
    if isinstance(err, ConnectionRefusedError) or "Connection refused" in text:
        return "refused the connection (is the service running, and the port right?)"
    if isinstance(err, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return "presented a TLS certificate this machine does not trust"
    if isinstance(err, ssl.SSLError):
        return "failed the TLS handshake"
    if isinstance(err, socket.gaierror) or "Name or service not known" in text or "nodename nor servname" in text:
        return "is not a host name this machine can resolve"
    if isinstance(err, TimeoutError) or "timed out" in text.lower() or "Timeout" in type(err).__name__:
        return "did not answer in time"
    if isinstance(err, ConnectionResetError) or "Connection reset" in text:
        return "dropped the connection"
    return None


def _host_of(err: BaseException) -> str | None:
    try:
        request = getattr(err, "request", None)  # httpx raises RuntimeError when there is none
    except RuntimeError:
        return None
    url = getattr(request, "url", None)
    return _netloc(str(url)) if url is not None else None


def _netloc(url: str) -> str | None:
    """Host and port, without the user info (a credential)."""
    return urlsplit(url).netloc.rpartition("@")[2] or None
