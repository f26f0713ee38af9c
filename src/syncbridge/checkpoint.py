"""WAL checkpoints from a thread of their own, so that no commit waits on their ``fsync``.

SQLite's automatic checkpoint runs inside the commit that crosses its limit, and that commit then
waits for the write-back of everything since the last checkpoint: the WAL is synced, its pages
copied into the database file, and that file synced. The batch committing at that moment stalls
for as long as the disk takes. A PASSIVE checkpoint from a second connection never blocks a
writer (https://www.sqlite.org/c3ref/wal_checkpoint_v2.html), so the store disables the automatic
one down to a backstop and lets this thread copy the WAL back after every commit. Commits made
while a checkpoint runs are covered by the next one, so under load checkpoints come as fast as the
disk allows and no faster. The work is as durable as before; the waiting moves off the path of a
batch, and checkpointing soon after each commit keeps the WAL short enough to start over often.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import structlog

__all__ = ["Checkpointer"]

log = structlog.get_logger("syncbridge.store")


class Checkpointer:
    """Checkpoints the WAL of ``path`` after commits.

    The thread starts on the first commit and ends after ``idle`` seconds without one (or at
    :meth:`close`), so a store that is no longer written holds no thread or connection.
    """

    def __init__(self, path: Path, *, idle: float = 10.0, gather: float = 0.2) -> None:
        self.path = path
        self.idle = idle
        self.gather = gather
        self.checkpoints = 0
        #: what the last checkpoint reported: (busy, frames in the WAL, frames copied back)
        self.last: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def committed(self) -> None:
        """A write transaction committed: copy the WAL back soon."""
        with self._lock:
            if self._closed.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="syncbridge-checkpoint", daemon=True)
                self._thread.start()
            self._wake.set()

    def close(self) -> None:
        """Stop the thread; a checkpoint under way finishes first."""
        with self._lock:
            self._closed.set()
            self._wake.set()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as err:  # the commits' backstop checkpoint still runs; the next commit tries again
            log.warning("checkpoint_failed", problem=str(err))
            with self._lock:
                self._thread = None
            return
        try:
            conn.execute("PRAGMA synchronous=NORMAL")  # the WAL is synced before copying, the file after
            while self._next():
                try:
                    self.last = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                except sqlite3.Error as err:
                    log.warning("checkpoint_failed", problem=str(err))
        finally:
            conn.close()

    def _next(self) -> bool:
        """Wait for a commit; False (and the thread forgotten) once idle or closed."""
        woken = self._wake.wait(self.idle)
        if woken:
            # the commits of the next moment join this checkpoint: the WAL starts over (and its
            # writer syncs the new header) a few times a second under load, not after every commit
            self._closed.wait(self.gather)
        with self._lock:
            if not woken or self._closed.is_set():
                self._thread = None
                return False
            self._wake.clear()
            return True
