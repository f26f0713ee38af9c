"""When to try again: one backoff rule for writes (the outbox) and reads (the runtime's pulls).

DESIGN section 9: a transient error is retried with exponential backoff and full jitter, never
sooner than the vendor's Retry-After, and never later than the cap, for as long as it takes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import SyncbridgeError, TransientError

__all__ = ["Backoff", "Resting", "backoff_delay", "retrying", "unless_all_failed"]

T = TypeVar("T")

#: past this many attempts the cap has long been reached; keeps 2**attempts a small number
_MAX_EXPONENT = 32


def backoff_delay(attempts: int, base: float, cap: float, retry_after: float | None = None, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff, never sooner than the vendor's Retry-After."""
    r = rng or random
    delay = min(cap, base * (2 ** min(attempts, _MAX_EXPONENT))) * r.uniform(0.5, 1.0)
    return max(delay, retry_after or 0.0)


@dataclass
class Backoff:
    """Per-key retry state (a connector's pulls): failures in a row and the earliest next try."""

    base: float
    cap: float
    failures: dict[str, int] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)

    def failed(self, key: str, retry_after: float | None = None, *, cap: float | None = None, now: float | None = None) -> float:
        """Record a retryable failure; the seconds to wait before the next try. ``cap`` lowers the
        usual cap (a pull is not put off past its next poll), never below Retry-After."""
        attempts = self.failures.get(key, 0)
        self.failures[key] = attempts + 1
        delay = backoff_delay(attempts, self.base, min(self.cap, cap) if cap is not None else self.cap, retry_after)
        self.not_before[key] = (time.time() if now is None else now) + delay
        return delay

    def succeeded(self, key: str) -> None:
        self.failures.pop(key, None)
        self.not_before.pop(key, None)

    def wait(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` may be tried again (0 when it may now)."""
        until = self.not_before.get(key)
        return 0.0 if until is None else max(0.0, until - (time.time() if now is None else now))


async def retrying(call: Callable[[], Awaitable[T]], backoff: Backoff, key: str, *, budget: float) -> T:
    """``call()`` until it succeeds, waiting out each retryable failure (by ``backoff``) while the
    waits fit in ``budget`` seconds; a command a person runs waits for a throttled read, not forever."""
    spent = 0.0
    while True:
        try:
            result = await call()
        except TransientError as err:
            delay = backoff.failed(key, err.retry_after)
            if spent + delay > budget:
                raise
            spent += delay
            await asyncio.sleep(delay)
            continue
        backoff.succeeded(key)
        return result


class Resting:
    """Accounts (a mailbox, a calendar) a vendor asked to leave alone for a while (Retry-After).

    A connector skips a resting account, reporting the error that sent it resting, so one
    throttled account is honoured without holding up the others' reads.
    """

    def __init__(self) -> None:
        self._until: dict[str, tuple[float, SyncbridgeError]] = {}

    def check(self, account: str) -> SyncbridgeError | None:
        """The error ``account`` is still resting from, or None when it may be read."""
        entry = self._until.get(account)
        if entry is None:
            return None
        if time.time() >= entry[0]:
            del self._until[account]
            return None
        return entry[1]

    def note(self, account: str, err: SyncbridgeError, where: str | None = None) -> SyncbridgeError:
        """Remember a failed read of ``account``: it rests for the Retry-After it was given, if any.
        ``where`` (a mailbox, a calendar) is put in front of the message, so the status names it."""
        if where and not str(err).startswith(where):
            err.args = (f"{where}: {err}",)
        retry_after = err.retry_after if isinstance(err, TransientError) else None
        if retry_after:
            self._until[account] = (time.time() + retry_after, err)
        return err


def unless_all_failed(failed: dict[str, SyncbridgeError], accounts: int) -> dict[str, SyncbridgeError]:
    """``failed`` for ``PullResult.failed_accounts``; when no account could be read at all, the
    pull as a whole failed: its first error is raised, for the runtime to retry and report."""
    if failed and len(failed) >= accounts:
        raise next(iter(failed.values()))
    return failed
