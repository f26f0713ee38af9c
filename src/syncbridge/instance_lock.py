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
from pathlib import Path

from .errors import StoreError

__all__ = ["hold_instance_lock"]


def hold_instance_lock(store_path: Path) -> int:
    """Take the lock or refuse to start; returns the descriptor, kept open until the process exits."""
    path = store_path.with_name(store_path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"another syncbridge daemon (pid {holder}) is already running on the store {store_path}: stop it first "
            f"(`systemctl stop syncbridge`), or give this one a store of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    os.set_inheritable(fd, False)
    return fd
