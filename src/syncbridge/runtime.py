"""The daemon: APScheduler runs the polls and sweeps, one task drains the outbox.

SIGTERM and SIGINT stop polling, let in-flight writes finish, and exit cleanly; SIGHUP reloads
the configuration, keeping the old one when the new one is refused.

A read that fails retryably (unreachable, throttled) is read again after a backoff, never sooner
than the vendor's Retry-After, whichever way it was asked for (the poll timer, a push, the sweep):
one mechanism for every connector, here, in :meth:`Daemon.poll`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .config import PracticeConfig, load_config
from .confirmations import Confirmer
from .connector import Connector
from .engine import Engine, ObserveReport
from .anchors import EVENT, append_anchor, make_anchor
from .errors import AuthError, ConfigError, RateLimited, SyncbridgeError, TransientError, error_kind
from .instance_lock import hold_store_lock, release, worker_name
from .leases import PRACTICE_JOBS, Leases
from .logging import configure
from .reloading import effects
from .host import DaemonHost, Vault
from .metrics import Metrics
from .model import iso, utcnow
from .operations import resume as resume_operations
from .outbox import Outbox
from .publisher import Publisher
from .registry import build_connectors
from .retry import Backoff
from .sdnotify import notify, watchdog_interval
from .slot_writer import SlotWriter
from .store import Store

__all__ = ["Daemon"]

log = structlog.get_logger("syncbridge.runtime")

#: pulls that must fail in a row before a connector is shown as unhealthy
FAILURES_BEFORE_UNHEALTHY = 3
#: seconds between whole-practice availability plans asked for by landed writes (a plan of 30
#: clinicians takes a few hundred milliseconds; an initial sync lands thousands of writes)
REPLAN_ALL_EVERY = 5.0


class Daemon:
    def __init__(self, config_path: str | os.PathLike[str] | None, config: PracticeConfig) -> None:
        self.config_path = Path(config_path) if config_path else None
        self.config = config
        self._instance_lock = hold_store_lock(config.store)
        #: settings changed by a reload that only a restart applies (reloading.py)
        self.pending_restart: tuple[str, ...] = ()
        #: the audit head last anchored (anchors.py)
        self._anchored: tuple[int, str] | None = None
        self.store: Store = config.store.open()
        self.store.check_integrity()
        self.connectors: dict[str, Connector] = build_connectors(config)
        self.engine = Engine(self.store, self.connectors, config)
        self.outbox = Outbox(self.engine)
        self.publisher = Publisher(self.store, self.connectors, config)
        self.slots = SlotWriter(self.store, self.connectors, config)
        self.confirmer = Confirmer(self.engine)
        #: this worker's name and its leases: with several workers on one PostgreSQL database, each
        #: works on the connectors (and the practice's jobs) it holds a lease for (leases.py)
        self.worker = worker_name(config.store)
        if self.store.engine == "postgresql":
            self.store.worker = self.worker
        self.leases = Leases(self.store, self.worker, config.store.lease_seconds, [*self.connectors, PRACTICE_JOBS])
        self.leases.gained.append(self._gained)
        #: push channels being set up for connectors taken over
        self._maintaining: set[asyncio.Task[None]] = set()
        self.leases.busy = self._pulling
        self.outbox.may = self.leases.holds
        self.outbox.lease_seconds = config.store.lease_seconds
        self.vault = Vault(self.store, config.store.secret_key)
        #: connectors a push hint or webhook asked to pull; drained by ``wake_loop``
        self.woken: set[str] = set()
        self.wake_event = asyncio.Event()
        self.availability_due = asyncio.Event()
        #: a write landed: plan the whole practice again (at most every ``REPLAN_ALL_EVERY`` seconds)
        self.replan_all = False
        self._pull_lock: dict[str, asyncio.Lock] = {}
        self._attach_hosts()
        self.scheduler = AsyncIOScheduler()
        self.stopping = asyncio.Event()
        self.poke = asyncio.Event()
        self.ready = asyncio.Event()
        self.exit_code = 0
        self.polls_done = 0
        #: connector -> pulls failed in a row since its last good one
        self.failing: dict[str, int] = {}
        #: when each connector may be read again after a retryable failure (reads follow the writes' rules)
        self.read_backoff = Backoff(config.outbox.backoff_base, config.outbox.backoff_max)
        #: when to read a connector again for accounts that failed retryably while the others were
        #: read; the connector is not held back meanwhile (its other accounts are fine)
        self.account_backoff = Backoff(config.outbox.backoff_base, config.outbox.backoff_max)
        #: connector -> a pull is owed once its backoff ends (True: a full sweep)
        self._owed: dict[str, bool] = {}
        self._retries: dict[str, asyncio.Task[None]] = {}
        self.metrics = Metrics()
        self.engine.listeners.append(self._observed)
        self.outbox.listeners.append(self._written)
        self.slots.listeners.append(self._slot_request)
        self.http: _QuietServer | None = None

    def _observed(self, name: str, report: ObserveReport) -> None:
        self.metrics.pulls.labels(name, "held" if report.held else "ok").inc()
        self.metrics.observed.labels(name).inc(report.created + report.updated)
        if self.slots.answered(name) | self.publisher.note(name, report):
            self.availability_due.set()

    def _written(self, name: str, outcome: str, seconds: float | None) -> None:
        self.metrics.writes.labels(name, outcome).inc()
        if outcome == "applied":  # a change made elsewhere (the CLI) reaches us as its writes land
            self.replan_all = True
            self.availability_due.set()
        if outcome == "throttled":
            self.metrics.throttled.labels(name).inc()
        if seconds is not None:
            self.metrics.propagation.labels(name).observe(seconds)

    def _slot_request(self, name: str, request: str, outcome: str, seconds: float | None) -> None:
        self.metrics.slot_requests.labels(name, request, outcome).inc()
        if seconds is not None:
            self.metrics.slot_latency.labels(name).observe(seconds)

    def _attach_hosts(self) -> None:
        base = self.config.http.public_url if self.config.http.enabled else None
        for name, connector in self.connectors.items():
            url = f"{base.rstrip('/')}/webhooks/{name}" if base else None
            connector.host = DaemonHost(name, self.store, self.vault, url, self.wake)

    def _pulling(self, name: str) -> bool:
        lock = self._pull_lock.get(name)
        return lock is not None and lock.locked()

    def _gained(self, name: str) -> None:
        """This worker took over ``name``: its notifications and a pull now, its push channels; the
        practice's jobs: bulk operations left unfinished, and every directory date looked at."""
        if name == PRACTICE_JOBS:
            if resumed := resume_operations(self.engine):
                log.info("bulk_operations_resumed", operations=resumed)
            self.publisher.note_everything(look=True)
            self.availability_due.set()
        elif name in self.connectors:
            self.wake(name)
            if self.ready.is_set():  # at start the scheduled maintenance does it, once the listener is up
                task = asyncio.get_running_loop().create_task(self._maintain_one(name))
                self._maintaining.add(task)
                task.add_done_callback(self._maintaining.discard)
        self.poke.set()

    def _shared_inbox(self) -> None:
        """Notifications another worker received for a connector this one holds."""
        for name in self.store.inbox_connectors():
            if name in self.connectors and self.leases.holds(name) and self.read_backoff.wait(name) <= 0:
                self.wake(name)

    def wake(self, name: str) -> None:
        """A push hint for ``name``: process its inbox and pull soon (many hints, one pull)."""
        self.woken.add(name)
        self.wake_event.set()

    # --- jobs ----------------------------------------------------------------------------

    async def wake_loop(self) -> None:
        """Drain push hints: first the persisted notifications, then an incremental pull."""
        self.woken.update(c for _, c, _, _ in self.store.inbox_pending())  # left over from before a restart
        while not self.stopping.is_set():
            if not self.woken:
                self.wake_event.clear()
                stop = asyncio.create_task(self.stopping.wait())
                woke = asyncio.create_task(self.wake_event.wait())
                await asyncio.wait({stop, woke}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                woke.cancel()
                continue
            await asyncio.sleep(0.2)  # let a burst of notifications collapse into one pull
            names, self.woken = set(self.woken), set()
            for name in sorted(names):
                if name in self.connectors and not self.stopping.is_set():
                    await self.process_inbox(name)

    async def process_inbox(self, name: str) -> None:
        if not self.leases.holds(name):  # stored: the connector's lease holder processes them
            return
        connector = self.connectors[name]
        pending = self.store.inbox_pending(name)
        targets: list[str] = []
        pull = not pending  # a bare pull_soon() hint
        accounts: set[str] = set()  # pulled alone when no notification asks for everything
        for _, _, headers, body in pending:
            try:
                named = connector.webhook_targets(headers, body)
                changed = connector.webhook_accounts(headers, body) if named is None else frozenset()
            except SyncbridgeError as err:
                log.warning("webhook_unreadable", connector=name, kind=error_kind(err))
                named, changed = [], frozenset()
            if named is not None:
                targets.extend(named)
            elif changed is None:
                pull = True
            else:
                accounts |= changed
        if self.read_backoff.wait(name) > 0:  # the vendor asked us to wait: the notifications wait too
            self._read_later(name)
            return
        try:
            if targets:
                report = await self.engine.refresh(name, targets)
                self._observed(name, report)
            if pull:
                await self.poll(name)
            elif accounts:
                await self.poll(name, accounts=frozenset(accounts))
        except SyncbridgeError as err:
            # keep the notifications; read them again after the backoff (not at once, in a loop)
            delay = self.read_backoff.failed(name, getattr(err, "retry_after", None))
            log.warning("webhook_refresh_failed", connector=name, kind=error_kind(err), retry_in=round(delay, 2))
            self._read_later(name)
            return
        if pending:
            now = utcnow()
            with self.store.tx() as tx:
                tx.inbox_done([i for i, _, _, _ in pending], iso(now))
                tx.inbox_prune(iso(now - timedelta(seconds=self.config.http.inbox_retention)))  # the inbox stays bounded
        self.poke.set()

    async def maintain(self) -> None:
        """Keep every connector's push channels alive; a failure here never stops polling."""
        for _ in range(100):  # vendors validate the webhook URL when a channel is made: listen first
            if self.http is None or self.http.started or self.stopping.is_set():
                break
            await asyncio.sleep(0.1)
        for name in list(self.connectors):
            await self._maintain_one(name)

    async def _maintain_one(self, name: str) -> None:
        connector = self.connectors.get(name)
        if connector is None or not self.leases.holds(name):
            return
        try:
            await connector.maintain()
        except SyncbridgeError as err:
            log.warning("maintain_failed", connector=name, kind=error_kind(err))
        except Exception:
            log.exception("maintain_unexpected", connector=name)

    async def availability_loop(self) -> None:
        """Keep every directory date converged to its wanted slots (publisher.py, slot_writer.py).

        A change replans the clinicians it touches within a fraction of a second; the whole
        practice is planned at start, after each busy-time read and every ``availability.interval``;
        every date is looked at in its directory at start and every ``availability.sweep_interval``.
        """
        planned_all = swept = time.monotonic()
        while not self.stopping.is_set():
            cfg = self.config.availability
            self.availability_due.clear()  # a change during this run triggers the next one
            if self.publisher.active() and self.leases.holds(PRACTICE_JOBS):
                try:
                    now = time.time()
                    if self.publisher.busy_read_at is None or now - self.publisher.busy_read_at >= cfg.busy_refresh_interval:
                        await self.publisher.refresh_busy()
                    since = time.monotonic() - planned_all
                    if since >= cfg.interval or self.replan_all and since >= REPLAN_ALL_EVERY:
                        self.replan_all = False
                        self.publisher.note_everything()
                    if time.monotonic() - swept >= cfg.sweep_interval:
                        self.publisher.note_everything(look=True)
                        swept = time.monotonic()
                    if self.publisher.pending():
                        everything = self.publisher.everything
                        plan = self.publisher.plan()
                        if everything:
                            planned_all = time.monotonic()
                        if plan.due:
                            log.info("availability_planned", clinicians=plan.clinicians, due=plan.due)
                    report = await self.slots.drain()
                    if report.written or report.dead:
                        log.info("availability_published", days=report.written, read=report.read, unchanged=report.unchanged,
                                 retried=report.retried, dead=report.dead)
                except Exception:
                    log.exception("availability_unexpected")
            due = self.slots.next_due()
            wait = min(cfg.interval - (time.monotonic() - planned_all), cfg.sweep_interval - (time.monotonic() - swept))
            if due is not None:
                wait = min(wait, due - time.time())
            if self.replan_all:
                wait = min(wait, REPLAN_ALL_EVERY - (time.monotonic() - planned_all))
            try:
                await asyncio.wait_for(self.availability_due.wait(), timeout=max(wait, 0.05))
                await asyncio.sleep(0.05)  # the rest of a burst of merged changes joins this plan
            except TimeoutError:
                pass

    async def poll(self, name: str, full: bool = False, accounts: frozenset[str] | None = None) -> None:
        """Pull ``name`` now, or, while it is backing off, once the backoff ends (then every account:
        what a push named is read with the rest). ``accounts``: only these (a push named them)."""
        if name not in self.connectors or not self.leases.holds(name):
            return
        if self.read_backoff.wait(name) > 0:
            self._owe(name, full)
            return
        async with self._pull_lock.setdefault(name, asyncio.Lock()):  # a push-triggered pull never races the poll
            await self._poll(name, full, accounts)

    def _owe(self, name: str, full: bool) -> None:
        self._owed[name] = self._owed.get(name, False) or full
        self._read_later(name)

    def _read_later(self, name: str) -> None:
        """Make sure ``name`` is read again when its backoff ends (one waiting task per connector)."""
        task = self._retries.get(name)
        if task is None or task.done():
            self._retries[name] = asyncio.get_running_loop().create_task(self._when_due(name))

    async def _when_due(self, name: str) -> None:
        while (wait := max(self.read_backoff.wait(name), self.account_backoff.wait(name))) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=wait)
            if self.stopping.is_set():
                return
        self._retries.pop(name, None)  # a failure from here on schedules the next read itself
        if name not in self.connectors:
            return
        if self.store.inbox_pending(name):
            await self.process_inbox(name)  # the notifications kept through the backoff (and a pull)
        if name in self._owed:
            await self.poll(name, self._owed.pop(name))

    async def _poll(self, name: str, full: bool, accounts: frozenset[str] | None = None) -> None:
        started = time.monotonic()
        try:
            report = await self.engine.sync(name, full=full, accounts=accounts)
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
            failures = self.failing[name] = self.failing.get(name, 0) + 1
            retry: dict[str, float] = {}
            if isinstance(err, TransientError):  # read again after the backoff, not at the next poll
                interval = self.connectors[name].config.poll_interval
                retry["retry_in"] = round(self.read_backoff.failed(name, err.retry_after, cap=interval), 2)
                self._owe(name, full)
            # the message names the call, the host and the reason, never record content
            log.warning("pull_failed", connector=name, kind=error_kind(err), problem=str(err), in_a_row=failures, **retry)
            if failures >= FAILURES_BEFORE_UNHEALTHY:
                # one failure is the weather; several in a row is something a person should see
                # (status, the status page, /readyz); the next good pull clears it
                with self.store.tx() as tx:
                    tx.set_health(name, False, f"the last {failures} pulls failed: {err}")
            return
        except Exception:
            log.exception("pull_unexpected", connector=name)
            return
        self.failing.pop(name, None)
        self.read_backoff.succeeded(name)
        self._probe_writes(name, report)
        self._accounts_failed(name, report)
        self.polls_done += 1
        if report.changed_ids or report.held:
            log.info(
                "pulled", connector=name, full=full, seen=report.seen, created=report.created, updated=report.updated,
                echoes=report.echoes, held=report.held, seconds=round(time.monotonic() - started, 3),
            )
        self.poke.set()

    def _probe_writes(self, name: str, report: ObserveReport) -> None:
        """A pull answered: of each account's writes waiting out a transient backoff (the accounts
        the pull read), one goes now, as a probe; once it lands the outbox sends that account's
        others at once (``Outbox._reachable``), so a system back from a long outage gets its writes
        within a poll, not up to ``outbox.backoff_max`` later."""
        with self.store.tx() as tx:
            tx.outbox_probe(name, time.time(), skip=report.failed_accounts)

    def _accounts_failed(self, name: str, report: ObserveReport) -> None:
        """Read again, after the backoff and their Retry-After, for accounts that failed retryably
        (the engine put every failed account in the connector's health)."""
        retryable = [e for e in report.failed_accounts.values() if isinstance(e, TransientError)]
        if not retryable:
            self.account_backoff.succeeded(name)
            return
        wait = max((e.retry_after or 0.0 for e in retryable), default=0.0) or None
        delay = self.account_backoff.failed(name, wait, cap=self.connectors[name].config.poll_interval)
        log.warning("accounts_unread", connector=name, accounts=sorted(report.failed_accounts), retry_in=round(delay, 2))
        self._owe(name, False)

    async def outbox_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.outbox.drain()
                if not self.outbox.halt.is_set() and self.leases.holds(PRACTICE_JOBS):
                    await self.confirmer.run()  # pending directory bookings the record system now holds
            except Exception:
                log.exception("outbox_unexpected")
            next_due = self.store.outbox_next_due()
            wait = 1.0 if next_due is None else min(1.0, max(0.0, next_due - time.time()))
            if not self.leases.single:  # the write due first may be another worker's: look again soon, not at once
                wait = max(wait, 0.25)
            self.poke.clear()
            try:
                await asyncio.wait_for(self.poke.wait(), timeout=wait)
            except TimeoutError:
                pass

    def schedule(self) -> None:
        for job in self.scheduler.get_jobs():
            job.remove()
        self.scheduler.add_job(
            self._until_stopped(self.maintain), "interval", seconds=self.config.http.channel_check_interval, id="maintain",
            max_instances=1, coalesce=True, next_run_time=_now(),
        )
        self.scheduler.add_job(self.anchor, "interval", seconds=self.config.audit.anchor_interval, id="audit_anchor", coalesce=True)
        poll = self._until_stopped(self.poll)
        for name, connector in self.connectors.items():
            interval = connector.config.poll_interval
            self.scheduler.add_job(
                poll, "interval", seconds=interval, jitter=interval * 0.1, args=[name], id=f"poll:{name}",
                max_instances=1, coalesce=True, next_run_time=_now(),
            )
            self.scheduler.add_job(
                poll, "interval", seconds=connector.config.full_sweep_interval, args=[name, True],
                id=f"sweep:{name}", max_instances=1, coalesce=True,
            )

    def anchor(self) -> None:
        """Sign the audit chain's head and keep it outside the store (anchors.py): the journal, and the
        anchor file when one is set. Nothing is written while the head has not moved."""
        if not self.leases.holds(PRACTICE_JOBS):
            return
        head = self.store.audit_head()
        if head is None or head == self._anchored:
            return
        try:
            key = self.config.audit.key.reveal() if self.config.audit.key else None
            anchor = make_anchor(head[0], head[1], key)
            if self.config.audit.anchor_file is not None:
                append_anchor(self.config.audit.anchor_file, anchor)
        except (SyncbridgeError, OSError) as err:
            log.error("audit_anchor_failed", problem=str(err))
            return
        log.info(EVENT, seq=anchor.seq, hash=anchor.hash, mac=anchor.mac, at=anchor.at)
        self._anchored = head

    def _until_stopped(self, job: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """``job`` as the scheduler runs it: cancelled quietly when the daemon stops.

        Stopping cancels the pulls in flight (a pull cut short is read again at the next start,
        as after a crash); without this the scheduler logs each as a failed job, traceback and all.
        """

        @functools.wraps(job)
        async def run(*args: Any) -> None:
            try:
                await job(*args)
            except asyncio.CancelledError:
                if not self.stopping.is_set():
                    raise

        return run

    async def _stop_scheduler(self) -> None:
        """Stop starting jobs, then cancel those in flight.

        The scheduler's wake-up and its shutdown both run later on the loop; a wake-up queued first
        would start jobs that the shutdown cancels before their first step, outside
        ``_until_stopped``, and each would be logged as a failed job. Pausing at once makes that
        wake-up start nothing; yielding once lets the jobs already started enter their wrapper.
        """
        self.scheduler.pause()
        await asyncio.sleep(0)
        self.scheduler.shutdown(wait=False)

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
        if new.store.where != self.config.store.where:
            log.error("reload_refused", problem="store.path and store.url cannot change while running; restart instead")
            return
        old, effect = self.connectors, effects(self.config, new)
        relog = self.config.logging != new.logging
        self.outbox.cfg = new.outbox
        self.pending_restart = tuple(dict.fromkeys((*self.pending_restart, *effect.restart)))
        self.config = new
        self.connectors = build_connectors(new)
        self.engine.connectors = self.connectors
        self.engine.config = new
        self.leases.set_names([*self.connectors, PRACTICE_JOBS])
        self.publisher.connectors, self.publisher.config = self.connectors, new
        self.slots.reconfigure(self.connectors, new)
        self.publisher.note_everything(look=True)  # a location or a rule may have changed: look at every date
        self.availability_due.set()
        self._attach_hosts()
        self.schedule()
        interval = watchdog_interval()
        if interval:
            self.scheduler.add_job(self._watchdog, "interval", seconds=interval, id="watchdog")
        for c in old.values():
            asyncio.get_running_loop().create_task(c.close())
        notify(status=f"reloaded: syncing {len(self.connectors)} connectors")
        log.info("reloaded", connectors=sorted(self.connectors), applied=list(effect.applied), needs_restart=list(self.pending_restart))
        if effect.restart:
            log.warning("reload_needs_restart", keys=list(effect.restart), action="systemctl restart syncbridge")
        if relog:  # after saying so at the old level, so a quieter level still shows the reload
            configure(new.logging.level, new.logging.json_logs)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.leases.single and (resumed := resume_operations(self.engine)):  # bulk operations a stop interrupted
            log.info("bulk_operations_resumed", operations=resumed)
        self.leases.tick()  # several workers: take a share of the leases before the first polls
        self.schedule()
        self.scheduler.start()
        worker = asyncio.create_task(self.outbox_loop())
        helpers = [asyncio.create_task(self.wake_loop()), asyncio.create_task(self.availability_loop()),
                   asyncio.create_task(self.leases.run(self.stopping, every=self._shared_inbox))]
        server_task = None
        if self.config.http.enabled:
            from .http import build_app

            self.http = _QuietServer(
                uvicorn.Config(build_app(self), host=self.config.http.host, port=self.config.http.port, log_config=None, lifespan="off", access_log=False)
            )
            server_task = asyncio.create_task(self._serve(self.http))
        self.ready.set()
        log.info("started", connectors=sorted(self.connectors), store=self.config.store.where)
        notify(ready=1, status=f"syncing {len(self.connectors)} connectors")
        interval = watchdog_interval()
        if interval:
            self.scheduler.add_job(self._watchdog, "interval", seconds=interval, id="watchdog")
        await self.stopping.wait()
        notify(stopping=1, status="finishing in-flight writes")
        log.info("stopping")
        await self._stop_scheduler()
        self.outbox.halt.set()
        self.poke.set()
        await worker  # the current drain finishes its in-flight writes
        helpers += self._retries.values()
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if self.http is not None and server_task is not None:
            self.http.should_exit = True
            await server_task
        await self.close()
        log.info("stopped")
        return self.exit_code

    async def close(self) -> None:
        """Let go of what the daemon holds: pending re-reads, the connectors, the store (with a last
        audit anchor) and the instance lock. Also ends a daemon that was never run (tests, tools)."""
        self.stopping.set()
        retries = list(self._retries.values())
        for task in retries:
            task.cancel()
        await asyncio.gather(*retries, return_exceptions=True)
        for c in self.connectors.values():
            await c.close()
        self.anchor()
        try:
            self.leases.release_all()  # the other workers take over at once, not after the expiry
        except Exception as err:
            log.warning("lease_release_failed", problem=str(err)[:300])
        self.store.close()
        release(self._instance_lock)


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
