"""Shared by the calendar benchmarks: an initial copy through ``apply_many``, timed.

Run as part of a benchmark script in this folder (``python bench/<script>.py`` puts the folder on
the import path).
"""

from __future__ import annotations

import asyncio
import time

from syncbridge.connector import ApplyResult, Connector, Write

__all__ = ["copy_by_apply_many"]


async def copy_by_apply_many(connector: Connector, writes: list[Write], in_flight: int = 8) -> float:
    """Seconds to apply ``writes`` in ``apply_many`` calls of ``write_batch``, ``in_flight`` at once."""
    size = connector.write_batch
    gate = asyncio.Semaphore(in_flight)

    async def run(chunk: list[Write]) -> list[ApplyResult | BaseException]:
        async with gate:
            return await connector.apply_many(chunk)

    t0 = time.perf_counter()
    done = await asyncio.gather(*(run(writes[i : i + size]) for i in range(0, len(writes), size)))
    took = time.perf_counter() - t0
    failed = [r for rs in done for r in rs if not isinstance(r, ApplyResult)]
    if failed:
        raise RuntimeError(f"{len(failed)} writes failed, first: {failed[0]!r}")
    return took
