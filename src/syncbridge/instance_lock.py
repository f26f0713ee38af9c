"""One daemon per store.

Two daemons on one store would both drain the outbox and could write the same change to a
system twice (a second event in a calendar). The daemon holds an exclusive ``flock`` on
``<store>.lock`` for its whole life; the kernel drops it when the process ends, however it ends
(a SIGKILL included), so a crashed daemon never blocks its successor. CLI commands do not take
it: they work in short transactions alongside the daemon.

On PostgreSQL several daemons (workers) share one database, each working only on what it holds
a lease for (leases.py). The rule becomes one daemon per worker name: a session advisory lock
keyed by the name, held on a connection of the worker's own for its whole life; the server drops
it when that connection ends, however the worker ends (a machine lost too, once TCP keepalives
give up on it).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StoreError

if TYPE_CHECKING:
    from .config import StoreConfig

__all__ = ["daemon_pid", "hold_instance_lock", "hold_store_lock", "release", "store_daemon_pid", "worker_name"]

#: how long a starting daemon waits for the lock: ``daemon_pid`` holds it for an instant
_PATIENCE_S = 2.0


def _lock_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".lock")


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote into the file ("" while it has not yet)."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip()


def hold_instance_lock(store_path: Path) -> int:
    """Take the lock or refuse to start; returns the descriptor, kept open until the process exits."""
    path = _lock_path(store_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + _PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        holder = _holder(fd) or "unknown"
        os.close(fd)
        raise StoreError(
            f"another syncbridge daemon (pid {holder}) is already running on the store {store_path}: stop it first "
            f"(`systemctl stop syncbridge`), or give this one a store of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    os.set_inheritable(fd, False)
    return fd


def daemon_pid(store_path: Path) -> int | None:
    """The pid of the daemon running on this store, or None when none is."""
    try:
        fd = os.open(_lock_path(store_path), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _holder(fd)
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_session(cfg: StoreConfig, name: str) -> Any:
    from .pg import PgConnection

    password = cfg.password.reveal() if cfg.password else None
    return PgConnection.connect_once(str(cfg.url), password=password, application_name=name)


def _database_holders(conn: Any, worker: str | None = None) -> list[str]:
    """The application names of the sessions holding a worker's lock (of ``worker``, or of any)."""
    from .pg import WORKER_LOCK

    named = " AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid" if worker is not None else ""
    rows = conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        f"WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objsubid = 2 AND l.granted{named} ORDER BY a.backend_start",
        (WORKER_LOCK, *((worker,) if worker is not None else ())),
    ).fetchall()
    return [str(r[0]) for r in rows]


def worker_name(cfg: StoreConfig) -> str:
    """This worker's name: ``store.worker``, or HOSTNAME:PID."""
    return cfg.worker or f"{socket.gethostname()}:{os.getpid()}"


def hold_store_lock(cfg: StoreConfig) -> Any:
    """The daemon's lock on its store, whichever the engine; give it back with :func:`release`.
    On PostgreSQL, one per worker name (several workers share the database by leases)."""
    if not cfg.url:
        return hold_instance_lock(Path(cfg.path))
    from .pg import DAEMON_LOCK, WORKER_LOCK

    worker = worker_name(cfg)
    conn = _lock_session(cfg, f"syncbridge pid {os.getpid()} on {socket.gethostname()} worker {worker}"[:63])
    # a daemon of a release before workers holds DAEMON_LOCK alone and knows nothing of leases: it
    # would work on everything beside the workers. Every worker holds it shared, so neither starts
    # while the other kind runs
    if not conn.execute("SELECT pg_try_advisory_lock_shared(%s, %s)", DAEMON_LOCK).fetchone()[0]:
        conn.close()
        raise StoreError(
            f"a syncbridge daemon of an earlier release (one daemon per database, no workers) is running on the store "
            f"{cfg.where}: stop it first (`systemctl stop syncbridge` there), then start the workers"
        )
    if not conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (WORKER_LOCK, worker)).fetchone()[0]:
        holder = next(iter(_database_holders(conn, worker)), None) or "a syncbridge daemon"
        conn.close()
        raise StoreError(
            f"another syncbridge daemon ({holder}) is already running as worker {worker} on the store {cfg.where}: stop it "
            f"first (`systemctl stop syncbridge` there), or give this one another store.worker name"
        )
    return conn


def release(lock: Any) -> None:
    """Let go of what :func:`hold_store_lock` took."""
    if isinstance(lock, int):
        os.close(lock)
    else:
        lock.close()


def store_daemon_pid(cfg: StoreConfig) -> int | None:
    """:func:`daemon_pid` for either engine: on PostgreSQL the pid where the daemon runs on this
    machine, -1 where it runs on another one."""
    if not cfg.url:
        return daemon_pid(Path(cfg.path))
    conn = _lock_session(cfg, "syncbridge status")
    try:
        holders = _database_holders(conn)
    finally:
        conn.close()
    if not holders:
        return None
    for holder in holders:  # "syncbridge pid N on HOST worker NAME"
        words = holder.split()
        if len(words) >= 5 and words[1] == "pid" and words[2].isdigit() and words[4] == socket.gethostname()[: len(words[4])]:
            return int(words[2])
    return -1
