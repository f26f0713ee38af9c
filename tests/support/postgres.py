"""A throwaway PostgreSQL cluster for the tests, from Debian's binaries, and a fresh database per test.

The cluster lives in a temporary directory, listens on a unix socket there only (no port to
collide with, nothing on the network) and trusts local connections; it runs without fsync, since
nothing in it outlives the test session. As root it runs as ``nobody`` (PostgreSQL refuses root).
``make test`` installs Debian's ``postgresql`` package; where it is missing the PostgreSQL half of
each parametrized test is skipped with :data:`MISSING`, and the SQLite half still runs.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["Cluster", "MISSING", "NO_DRIVER", "find_binaries", "unavailable"]

MISSING = (
    "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb), so the store's PostgreSQL tests are skipped: "
    "install Debian's package (`sudo apt-get install postgresql`; `make test` does it when run as root)"
)
NO_DRIVER = (
    "the PostgreSQL driver is not installed, so the store's PostgreSQL tests are skipped: install the extra "
    "(`pip install '.[postgresql]'`; `make install` does it)"
)


def find_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb and pg_ctl (or $SYNCBRIDGE_PG_BIN)."""
    given = os.environ.get("SYNCBRIDGE_PG_BIN")
    candidates = [given] if given else sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for path in reversed(candidates):
        if path and (Path(path) / "initdb").exists() and (Path(path) / "pg_ctl").exists():
            return Path(path)
    return None


def driver_missing() -> str | None:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as err:
        return f"{NO_DRIVER} ({err})"
    return None


def unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    return driver_missing() or (MISSING if find_binaries() is None else None)


class Cluster:
    """One running cluster; :meth:`database` makes an empty database and returns its URL."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="syncbridge-pg-"))
        self.data = self.dir / "data"
        self.user = "syncbridge"
        self._as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]
        self._names = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        opts = (f"-c listen_addresses='' -c unix_socket_directories={self.dir} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o", opts, "start")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as, str(self.bin / tool), *args], capture_output=True, text=True, cwd=self.dir)
        if done.returncode:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()} {log[-2000:]}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.dir}"

    def admin(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(self.url(), autocommit=True)

    def database(self) -> str:
        """A new, empty database (from template0: nothing of another test's in it); its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
