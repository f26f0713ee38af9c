"""One daemon per store.

Two daemons on one store would both drain the outbox and could write the same change to a
system twice (a second event in a calendar). The daemon holds an exclusive ``flock`` on
``<store>.lock`` for its whole life; the kernel drops it when the process ends, however it ends
(a SIGKILL included), so a crashed daemon never blocks its successor. CLI commands do not take
it: they work in short transactions alongside the daemon.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .errors import StoreError

__all__ = ["daemon_pid", "hold_instance_lock"]

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
