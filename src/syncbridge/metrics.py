"""Prometheus metrics, on a registry of our own so tests and reloads never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .store import Store

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pulls = Counter("syncbridge_pulls_total", "Pulls by connector and result", ["connector", "result"], registry=r)
        self.observed = Counter("syncbridge_observed_changes_total", "Changes merged into the canonical record", ["connector"], registry=r)
        self.writes = Counter("syncbridge_writes_total", "Writes to external systems by result", ["connector", "result"], registry=r)
        self.errors = Counter("syncbridge_errors_total", "Errors by connector and kind", ["connector", "kind"], registry=r)
        self.throttled = Counter("syncbridge_throttled_total", "Throttling answers (429, rate limits) by connector", ["connector"], registry=r)
        self.outbox = Gauge("syncbridge_outbox_depth", "Writes waiting, by connector", ["connector"], registry=r)
        self.dead = Gauge("syncbridge_dead_letters", "Dead-lettered writes, by connector", ["connector"], registry=r)
        self.worklist = Gauge("syncbridge_worklist_open", "Open worklist items", registry=r)
        self.propagation = Histogram(
            "syncbridge_propagation_seconds", "From a change being committed to it being written to another system",
            ["connector"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r,
        )
        self.slot_requests = Counter(
            "syncbridge_slot_requests_total", "Directory slot reads (get) and writes (put) by outcome", ["connector", "request", "outcome"],
            registry=r,
        )
        self.slot_latency = Histogram(
            "syncbridge_slot_republish_seconds",
            "From a date's wanted slots changing (or a look being asked for) to the directory showing them",
            ["connector"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r,
        )
        self.slots_waiting = Gauge(
            "syncbridge_slot_dates_waiting", "Directory dates waiting for a write or a look", ["connector"], registry=r,
        )

    def refresh(self, store: Store, connectors: list[str]) -> None:
        """Gauges are read from the store when scraped, so they are right after a restart too."""
        counts = store.outbox_counts()
        for name in connectors:
            pending, dead = counts.get(name, (0, 0))
            self.outbox.labels(name).set(pending or 0)
            self.dead.labels(name).set(dead or 0)
        self.worklist.set(len(store.worklist()))
        for name, (_, waiting, _) in store.slot_counts().items():
            self.slots_waiting.labels(name).set(waiting)
