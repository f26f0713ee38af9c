"""One store transaction for the tasks that ask for one in the same turn of the event loop.

With one write per call (a vendor without batch requests, or ``write_batch: 1``), each write's
decision and its record took a transaction of their own, and their BEGIN and COMMIT cost more than
the rest of its bookkeeping (bench/RESULTS.md, "single writes"). Calls that answer together now
record together: each caller's function runs in one shared transaction, in the order asked. If
the shared transaction fails, each function runs again alone, so one bad item never fails the
others (their work was rolled back with the group and is done again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from .store import Store
from .tx import Tx

__all__ = ["TxGroup"]

T = TypeVar("T")

log = structlog.get_logger("syncbridge.store")


class TxGroup:
    """Runs ``fn(tx)`` for concurrent callers in shared transactions.

    A function must keep its effects to the transaction and its return value: it may run twice
    (once in the failed group, once alone)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: list[tuple[Callable[[Tx], Any], asyncio.Future[Any]]] = []
        #: transactions committed, and functions run in them (for the benchmark and tests)
        self.transactions = 0
        self.runs = 0

    async def run(self, fn: Callable[[Tx], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, future))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        try:
            results = []
            with self.store.tx() as tx:
                for fn, _ in queue:
                    results.append(fn(tx))
        except Exception as err:  # noqa: BLE001 - each function again, alone: only the one at fault fails
            if len(queue) > 1:
                log.warning("tx_group_split", size=len(queue), problem=type(err).__name__)
            for fn, future in queue:
                self._alone(fn, future)
            return
        except BaseException as err:
            for _, future in queue:
                if not future.done():
                    future.set_exception(err)
            raise
        self.transactions += 1
        self.runs += len(queue)
        for (_, future), result in zip(queue, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _alone(self, fn: Callable[[Tx], Any], future: asyncio.Future[Any]) -> None:
        try:
            with self.store.tx() as tx:
                result = fn(tx)
        except Exception as err:  # noqa: BLE001 - handed to the caller that asked
            if not future.done():
                future.set_exception(err)
            return
        self.transactions += 1
        self.runs += 1
        if not future.done():
            future.set_result(result)
