"""The daemon: APScheduler runs the polls and sweeps, one task drains the outbox.

SIGTERM and SIGINT stop polling, let in-flight writes finish, and exit cleanly; SIGHUP reloads
the configuration, keeping the old one when the new one is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import uvicorn

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .config import PracticeConfig, load_config
from .connector import Connector
from .engine import Engine, ObserveReport
from .errors import AuthError, ConfigError, RateLimited, SyncbridgeError, error_kind
from .logging import configure
from .metrics import Metrics
from .outbox import Outbox
from .registry import build_connectors
from .sdnotify import notify, watchdog_interval
from .store import Store

__all__ = ["Daemon"]

log = structlog.get_logger("syncbridge.runtime")


class Daemon:
    def __init__(self, config_path: str | os.PathLike[str] | None, config: PracticeConfig) -> None:
        self.config_path = Path(config_path) if config_path else None
        self.config = config
        self.store = Store(config.store.path)
        self.connectors: dict[str, Connector] = build_connectors(config)
        self.engine = Engine(self.store, self.connectors, config)
        self.outbox = Outbox(self.engine)
        self.scheduler = AsyncIOScheduler()
        self.stopping = asyncio.Event()
        self.poke = asyncio.Event()
        self.ready = asyncio.Event()
        self.exit_code = 0
        self.polls_done = 0
        self.metrics = Metrics()
        self.engine.listeners.append(self._observed)
        self.outbox.listeners.append(self._written)
        self.http: _QuietServer | None = None

    def _observed(self, name: str, report: ObserveReport) -> None:
        self.metrics.pulls.labels(name, "held" if report.held else "ok").inc()
        self.metrics.observed.labels(name).inc(report.created + report.updated)

    def _written(self, name: str, outcome: str, seconds: float | None) -> None:
        self.metrics.writes.labels(name, outcome).inc()
        if outcome == "throttled":
            self.metrics.throttled.labels(name).inc()
        if seconds is not None:
            self.metrics.propagation.labels(name).observe(seconds)

    # --- jobs ----------------------------------------------------------------------------

    async def poll(self, name: str, full: bool = False) -> None:
        if name not in self.connectors:
            return
        started = time.monotonic()
        try:
            report = await self.engine.sync(name, full=full)
        except AuthError as err:
            self.metrics.errors.labels(name, "auth").inc()
            with self.store.tx() as tx:
                tx.set_health(name, False, f"authentication failed: {err}")
            log.error("pull_auth_failed", connector=name, action=err.action)
            return
        except SyncbridgeError as err:
            self.metrics.pulls.labels(name, "failed").inc()
            self.metrics.errors.labels(name, error_kind(err)).inc()
            if isinstance(err, RateLimited):
                self.metrics.throttled.labels(name).inc()
            log.warning("pull_failed", connector=name, kind=error_kind(err))
            return
        except Exception:
            log.exception("pull_unexpected", connector=name)
            return
        self.polls_done += 1
        if report.changed_ids or report.held:
            log.info(
                "pulled", connector=name, full=full, seen=report.seen, created=report.created, updated=report.updated,
                echoes=report.echoes, held=report.held, seconds=round(time.monotonic() - started, 3),
            )
        self.poke.set()

    async def outbox_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.outbox.drain()
            except Exception:
                log.exception("outbox_unexpected")
            next_due = self.store.outbox_next_due()
            wait = 1.0 if next_due is None else min(1.0, max(0.0, next_due - time.time()))
            self.poke.clear()
            try:
                await asyncio.wait_for(self.poke.wait(), timeout=wait)
            except TimeoutError:
                pass

    def schedule(self) -> None:
        for job in self.scheduler.get_jobs():
            job.remove()
        for name, connector in self.connectors.items():
            interval = connector.config.poll_interval
            self.scheduler.add_job(
                self.poll, "interval", seconds=interval, jitter=interval * 0.1, args=[name], id=f"poll:{name}",
                max_instances=1, coalesce=True, next_run_time=_now(),
            )
            self.scheduler.add_job(
                self.poll, "interval", seconds=connector.config.full_sweep_interval, args=[name, True],
                id=f"sweep:{name}", max_instances=1, coalesce=True,
            )

    async def _serve(self, server: uvicorn.Server) -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits when it cannot bind
            pass
        if not server.started:
            http = self.config.http
            log.error("http_listen_failed", host=http.host, port=http.port, action="free the port or set http.port")
            self.exit_code = 1
            self.stopping.set()

    def _watchdog(self) -> None:
        counts = self.store.outbox_counts()
        pending = sum(p for p, _ in counts.values())
        notify(watchdog=1, status=f"{len(self.connectors)} connectors, {pending} writes pending, {self.polls_done} pulls done")

    # --- lifecycle -------------------------------------------------------------------------

    def reload(self) -> None:
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            log.error("reload_refused", problem=str(err))
            return
        if new.store.path != self.config.store.path:
            log.error("reload_refused", problem="store.path cannot change while running; restart instead")
            return
        old = self.connectors
        self.config = new
        self.connectors = build_connectors(new)
        self.engine.connectors = self.connectors
        self.engine.config = new
        self.schedule()
        interval = watchdog_interval()
        if interval:
            self.scheduler.add_job(self._watchdog, "interval", seconds=interval, id="watchdog")
        for c in old.values():
            asyncio.get_running_loop().create_task(c.close())
        notify(status=f"reloaded: syncing {len(self.connectors)} connectors")
        log.info("reloaded", connectors=sorted(self.connectors))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.schedule()
        self.scheduler.start()
        worker = asyncio.create_task(self.outbox_loop())
        server_task = None
        if self.config.http.enabled:
            from .http import build_app

            self.http = _QuietServer(
                uvicorn.Config(build_app(self), host=self.config.http.host, port=self.config.http.port, log_config=None, lifespan="off", access_log=False)
            )
            server_task = asyncio.create_task(self._serve(self.http))
        self.ready.set()
        log.info("started", connectors=sorted(self.connectors), store=str(self.config.store.path))
        notify(ready=1, status=f"syncing {len(self.connectors)} connectors")
        interval = watchdog_interval()
        if interval:
            self.scheduler.add_job(self._watchdog, "interval", seconds=interval, id="watchdog")
        await self.stopping.wait()
        notify(stopping=1, status="finishing in-flight writes")
        log.info("stopping")
        self.scheduler.shutdown(wait=False)
        self.poke.set()
        await worker  # the current drain finishes its in-flight writes
        if self.http is not None and server_task is not None:
            self.http.should_exit = True
            await server_task
        for c in self.connectors.values():
            await c.close()
        self.store.close()
        log.info("stopped")
        return self.exit_code


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM, SIGINT and SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _now() -> datetime:
    return datetime.now().astimezone()


def run_daemon(config_path: str | None, config: PracticeConfig) -> int:
    configure(config.logging.level, config.logging.json_logs)
    return asyncio.run(Daemon(config_path, config).run())
