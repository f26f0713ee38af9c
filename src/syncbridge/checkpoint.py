"""WAL checkpoints on a thread of their own, so a commit never waits for one.

With automatic checkpoints, the commit that crosses the threshold copies the whole WAL back
into the database before it returns: every few thousand changes one batch stalls while
megabytes are written. SQLite's documentation of ``wal_autocheckpoint`` suggests the
alternative used here for a process that writes continuously: turn automatic checkpoints off
on the writing connection and run passive checkpoints from another thread, on a connection of
its own (https://www.sqlite.org/wal.html#automatic_checkpoint). A passive checkpoint never
blocks the writer or readers; pages it cannot copy yet (a reader still needs them) are copied
by a later one.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import structlog

__all__ = ["JOURNAL_LIMIT", "Checkpointer"]

#: bytes a WAL file is cut back to once it has been copied back and restarts
JOURNAL_LIMIT = 64 * 2**20

log = structlog.get_logger("syncbridge.checkpoint")


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` every ``interval`` seconds until stopped."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_LIMIT}")
        try:
            while not self._stop.wait(self.interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as err:  # a locked or busy database: the next round tries again
                    log.warning("checkpoint_failed", problem=str(err))
        finally:
            conn.close()
