"""Vendor batch requests that are refused as a whole fall back to single calls (DESIGN section 9).

An egress proxy with a path allow-list, or a tenant with the feature off, answers a batch request
itself with 400 or 404 (connectors raise :class:`~syncbridge.errors.BatchRefused` for each part):
none of its writes was tried, so each is sent on its own instead of being dead-lettered. The
connector's writes then go one by one for a while, the connector is shown degraded, and a batch
is tried again later; the first that succeeds clears the mark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from .connector import ApplyResult, Connector, Write
from .errors import BatchRefused
from .store import Store

__all__ = ["BatchFallback"]

log = structlog.get_logger("syncbridge.batching")


class BatchFallback:
    """Sends one chunk of a connector's writes: as its vendor batch while the endpoint takes them."""

    def __init__(self, store: Store, pause: float) -> None:
        self.store = store
        #: seconds of single calls after a refusal before a batch is tried again
        self.pause = pause
        self._singles_until: dict[str, float] = {}
        #: connectors this process has seen marked degraded, or not yet looked at
        self._marked: set[str] = set()
        self._looked: set[str] = set()

    async def apply(self, connector: Connector, writes: Sequence[Write]) -> list[ApplyResult | BaseException]:
        """One result or error per write, in order, as :meth:`Connector.apply_many` answers."""
        name = connector.name
        singles = time.monotonic() < self._singles_until.get(name, 0.0)
        try:
            # the contract's own apply_many sends each write with apply(): no batch request
            results = await (Connector.apply_many(connector, writes) if singles else connector.apply_many(writes))
        except Exception as err:  # the batch as a whole failed (no answer at all): each write shares the error
            results = [err] * len(writes)
        if len(results) != len(writes):
            return results  # the caller reports the mismatch
        refused = [k for k, r in enumerate(results) if isinstance(r, BatchRefused)]
        if refused:
            self._singles_until[name] = time.monotonic() + self.pause
            self._mark(name, f"its batch endpoint refused a request, so each write is sent on its own ({results[refused[0]]})")
            again = await Connector.apply_many(connector, [writes[k] for k in refused])
            for k, r in zip(refused, again, strict=True):
                results[k] = r
        elif not singles and connector.write_batch > 1 and len(writes) > 1 and any(isinstance(r, ApplyResult) for r in results):
            self._mark(name, None)  # a batch went through
        return results

    def _mark(self, name: str, note: str | None) -> None:
        if note is None and name in self._looked and name not in self._marked:
            return  # nothing to clear: no write per batch
        self._looked.add(name)
        with self.store.tx() as tx:
            changed = tx.set_degraded(name, note)
        if note is None:
            self._marked.discard(name)
        else:
            self._marked.add(name)
        if changed and note:
            log.warning("batch_refused", connector=name)
        elif changed:
            log.info("batch_accepted_again", connector=name)
