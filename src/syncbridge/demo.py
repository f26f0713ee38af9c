"""``syncbridge demo``: the built-in sandbox.

Every installed connector type that can start a local stand-in for its system (an emulator or a
real test server) does so on loopback; a small practice is seeded; the daemon runs on SQLite;
one session is cancelled the way a therapist would (deleting its event), and the demo shows where
the cancellation was applied. It then keeps running until Ctrl-C; without ``--state-dir`` its
temporary folder (the store, its key, the sandboxes' data) is removed when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from .config import load_config
from .connector import Sandbox
from .logging import configure
from .model import empty_snapshot, iso, new_canonical_id
from .receipts import holds_current
from .registry import connector_class, known_types
from .runtime import Daemon

__all__ = ["run_demo", "sandbox_config", "start_sandboxes"]

CLINICIANS = {"dr_rivera": "Dr. Rivera", "dr_chen": "Dr. Chen", "dr_okafor": "Dr. Okafor"}
ZONE = "America/New_York"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _free_port(preferred: int = 8765) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def _seed(daemon: Daemon) -> list[str]:
    """A week of weekly sessions: three clinicians, three sessions a day, Monday to Friday."""
    tz = ZoneInfo(ZONE)
    today = datetime.now(tz).date()
    monday = today + timedelta(days=7 - today.weekday())
    ids = []
    for n, clinician in enumerate(CLINICIANS):
        for day in range(5):
            for slot, hour in enumerate((9 + n, 13, 16)):
                start = datetime(monday.year, monday.month, monday.day, hour, tzinfo=tz) + timedelta(days=day)
                snap = empty_snapshot() | {
                    "clinician": clinician,
                    "client_key": f"client-{n}{day}{slot}",
                    "start": iso(start),
                    "end": iso(start + timedelta(minutes=50)),
                    "timezone": ZONE,
                    "service_code": "90837",
                    "location": f"Room {n + 1}",
                    "modality": "telehealth" if slot == 2 else "in_person",
                }
                appt_id = new_canonical_id()
                daemon.engine.change(appt_id, snap, via="sandbox-seed", kind="booked")
                ids.append(appt_id)
    return ids


async def _until(predicate, timeout: float, step: float = 0.25) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return False


def start_sandboxes(workdir: Path, clinicians: list[str], say: Callable[[str], None] = _say) -> dict[str, Sandbox]:
    """Every installed connector type's local stand-in, named ``<type>_sandbox``."""
    sandboxes: dict[str, Sandbox] = {}
    try:
        for type_name in known_types():
            sandbox = connector_class(type_name).sandbox(workdir / type_name, clinicians)
            if sandbox is not None:
                sandboxes[f"{type_name}_sandbox"] = sandbox
                say(f"  started {sandbox.describe or type_name}")
    except BaseException:
        for s in sandboxes.values():
            s.close()
        raise
    return sandboxes


def sandbox_config(
    workdir: Path, sandboxes: dict[str, Sandbox], names: dict[str, str], port: int, poll_interval: float = 2.0, push: bool = True
) -> dict[str, Any]:
    """The practice config for the sandboxes: push on loopback (unless ``push`` is false), a generated vault key."""
    public = f"http://127.0.0.1:{port}" if push else None
    for name, s in sandboxes.items():
        if s.register_webhooks is not None and public:
            s.register_webhooks(f"{public}/webhooks/{name}")
    key = workdir / "store-key"
    if not key.exists():
        key.write_text(secrets.token_urlsafe(32))
        key.chmod(0o600)
    return {
        "practice": {"name": "Lakeside Therapy (sandbox)", "timezone": ZONE},
        "store": {"path": str(workdir / "syncbridge.db"), "secret_key": {"file": str(key)}},
        "clinicians": {
            key: {"display_name": name, "accounts": {c: s.accounts[key] for c, s in sandboxes.items() if key in s.accounts}}
            for key, name in names.items()
        },
        "connectors": {name: s.connector_config | {"poll_interval": poll_interval} for name, s in sandboxes.items()},
        "availability": {"minimum_notice_hours": 0, "interval": 30, "busy_refresh_interval": 30},
        "logging": {"level": "warning", "json": False},
        "http": {"host": "127.0.0.1", "port": port, "public_url": public},
    }


async def _demo(workdir: Path, wait: bool) -> int:
    sandboxes = start_sandboxes(workdir, list(CLINICIANS))
    if not sandboxes:
        _say("no installed connector offers a sandbox")
        return 1
    config = sandbox_config(workdir, sandboxes, CLINICIANS, _free_port())
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = load_config(config_path)
    configure("warning", json_logs=False)
    daemon = Daemon(config_path, cfg)
    try:
        ids = _seed(daemon)
        _say(f"  seeded {len(ids)} sessions for {len(CLINICIANS)} clinicians (next week, {ZONE})")
        runner = asyncio.create_task(daemon.run())
        started = time.monotonic()
        mirrored = await _until(lambda: not daemon.store.outbox_counts() or all(p == 0 for p, _ in daemon.store.outbox_counts().values()), 120)
        _say(f"  copied in {time.monotonic() - started:.1f}s" + ("" if mirrored else " (still working)") + ": " + _copies(daemon, sandboxes))

        victim = ids[4]
        origin, sandbox = next((n, s) for n, s in sandboxes.items() if s.delete_event and daemon.store.link(n, victim))
        link = daemon.store.link(origin, victim)
        assert link is not None and link.external_id and sandbox.delete_event
        appt = daemon.store.appointment(victim)
        assert appt is not None
        when = appt.local_start.strftime("%a %d %b %H:%M")
        _say()
        _say(f"A therapist deletes the {when} session of {CLINICIANS[appt.fields['clinician']]} in {origin} ...")
        t0 = time.monotonic()
        await sandbox.delete_event(link.external_id)

        def cancelled_everywhere() -> bool:
            a = daemon.store.appointment(victim)
            return bool(a and a.cancelled and not daemon.store.outbox_due(float("inf"), 1))

        ok = await _until(cancelled_everywhere, 60)
        appt = daemon.store.appointment(victim)
        assert appt is not None
        elapsed = time.monotonic() - t0
        if not ok or not appt.cancelled:
            _say("  the cancellation has not arrived yet; see `syncbridge status` below")
        else:
            c = appt.fields["cancellation"]
            _say(f"  cancelled in {elapsed:.1f}s: by {c['by']}, {c['kind'].replace('_', ' ')}, fee {c['fee']}, via {c['via']}")
        for lk, applied_at in daemon.store.links_for(victim):
            state = "event removed" if lk.gone else ("applied" if holds_current(lk, appt, daemon.connectors.get(lk.connector)) else "pending")
            _say(f"    {lk.connector:<24} {state:<14} {applied_at or ''}")
        records = [n for n, c in daemon.connectors.items() if c.capabilities.role.value == "record"]
        if records:

            def billed() -> bool:
                a = daemon.store.appointment(victim)
                return bool(a and a.fields.get("billing") != "pending")

            await _until(billed, 20)
            appt = daemon.store.appointment(victim)
            assert appt is not None
            _say(f"  billing in {', '.join(records)}: {appt.fields.get('billing')} (no claim goes to the payer for this session)")
        else:
            _say("  no EHR is connected in this sandbox, so there is no claim to suppress yet")
        for name, s in sandboxes.items():
            if s.offered is None or appt.fields["clinician"] not in s.accounts:
                continue
            start = appt.start.astimezone(ZoneInfo(appt.fields["timezone"]))
            offered = s.offered

            async def again(offered=offered, start=start) -> bool:  # type: ignore[no-untyped-def]
                return start in await offered(appt.fields["clinician"], start.date())

            deadline = time.monotonic() + 30
            while not await again() and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            state = "offered again" if await again() else "not offered yet (see availability rules)"
            _say(f"  the {start:%a %H:%M} slot in {name}: {state}")
        if wait:
            _say()
            _say(f"Status page: http://127.0.0.1:{cfg.http.port}/  (open from this machine; no token is set in the sandbox)")
            _say("The sandbox keeps running. In another shell:")
            _say(f"  .venv/bin/syncbridge status --config {config_path}")
            _say(f"  .venv/bin/syncbridge status {victim} --config {config_path}")
            _say(f"  .venv/bin/syncbridge audit --verify --config {config_path}")
            _say("Press Ctrl-C to stop.")
            await runner
        else:
            daemon.stopping.set()
            await runner
        return 0
    finally:
        daemon.stopping.set()
        for s in sandboxes.values():
            s.close()


def _copies(daemon: Daemon, sandboxes: dict[str, Sandbox]) -> str:
    """What each system holds now, as it is: sessions copied there, or (a directory) dates of free slots offered."""
    parts = []
    for name in sandboxes:
        connector = daemon.connectors[name]
        held = sum(1 for link in daemon.store.links_of(name) if not link.gone)
        if connector.capabilities.publishes_availability:
            dates = sum(1 for s in daemon.store.slot_states(name) if s.written is not None)
            parts.append(f"{name} offers free slots on {dates} dates ({held} bookings made there)")
        else:
            parts.append(f"{name} {held} sessions")
    return ", ".join(parts)


def run_demo(args: argparse.Namespace) -> int:
    keep = bool(args.state_dir)
    workdir = Path(args.state_dir) if keep else Path(tempfile.mkdtemp(prefix="syncbridge-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"syncbridge sandbox in {workdir}" + ("" if keep else " (removed at the end; --state-dir keeps one)"))
    try:
        return asyncio.run(_demo(workdir, wait=not args.no_wait))
    except KeyboardInterrupt:
        return 0
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)  # the store, its key and the sandboxes' data
