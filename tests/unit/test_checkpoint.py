"""WAL checkpoints from their own thread: the WAL is copied back after commits, and no thread outlives its use.

Checkpoints are SQLite's own: only the last test runs on both engines."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from syncbridge.checkpoint import Checkpointer
from syncbridge.store import Store


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "syncbridge-checkpoint"]


def _write(store: Store, n: int) -> None:
    for i in range(n):
        with store.tx() as tx:
            tx.audit.add(f"2026-11-23T10:00:{i % 60:02d}Z", "observed", "cal", f"sb-{i}", {"version": 1})


def _until(condition, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_commits_are_copied_back_by_the_thread_and_close_stops_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    before = len(_threads())
    _write(store, 50)
    cp = store._checkpointer
    # the thread has copied every frame of the WAL back into the file at least once
    assert _until(lambda: cp.last is not None and cp.last[1] > 0 and cp.last[1] == cp.last[2]), cp.last
    store.close()
    assert len(_threads()) == before
    assert Store(tmp_path / "s.db").verify_audit().entries == 50


def test_an_idle_store_holds_no_thread_and_the_next_commit_starts_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store._checkpointer.close()
    store._checkpointer = Checkpointer(store.path, idle=0.2)
    _write(store, 3)
    assert store._checkpointer._thread is not None
    assert _until(lambda: store._checkpointer._thread is None), "the thread outlived its idle time"
    done = store._checkpointer.checkpoints
    _write(store, 3)
    assert _until(lambda: store._checkpointer.checkpoints > done), "a commit after the idle time was not checkpointed"
    store.close()


def test_only_sqlite_has_a_checkpoint_thread(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """WAL checkpoints are SQLite's; a PostgreSQL store commits without starting any thread."""
    before = set(_threads())  # other tests' threads may end meanwhile: only new ones count
    store = stores(tmp_path / "s.db")
    _write(store, 3)
    assert (store._checkpointer is not None) == (stores.engine == "sqlite")
    if stores.engine == "postgresql":
        assert set(_threads()) - before == set()
    store.close()
